//! The plan this server computes, for people: `deskgrid plan`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{JobRecord, ServerId};
use crate::placement::{self, Action, GridView, Liveness};
use crate::state::GridState;

use super::GridService;

/// One step of the plan, in words and in fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStepReport {
    pub target: ServerId,
    pub target_name: String,
    /// True for the steps the asking server carries out itself.
    pub this_server: bool,
    /// `pull-image`, `drop-image`, `create-vms`, `remove-vm` or `refresh-vm`.
    pub action: String,
    /// The image version, template or VM the step is about.
    pub object: String,
    pub count: u32,
    pub summary: String,
    pub reason: String,
}

/// Demand the grid cannot meet now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShortfallReport {
    pub template: String,
    pub missing_vms: u32,
    pub cause: String,
}

/// The whole plan as one server computes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    pub server_id: ServerId,
    /// The state the plan was computed from: equal digests, equal plans
    /// (when the servers also agree on who is alive).
    pub state_digest: String,
    /// Servers the plan treats as missing (and gives nothing).
    pub missing: Vec<ServerId>,
    pub steps: Vec<PlanStepReport>,
    pub shortfalls: Vec<ShortfallReport>,
    /// This server's jobs as its record shows them.
    pub jobs: Vec<JobRecord>,
}

impl GridService {
    /// How placement sees `server`: this server is alive; the others as the
    /// failure detector last said; one it has not heard of yet is missing
    /// (it gets no work until it is seen).
    pub fn liveness_of(&self, server: ServerId) -> Liveness {
        use crate::federation::membership::MemberState;
        if server == self.server_id {
            return Liveness::Alive;
        }
        match self.member_states.get(&server) {
            Some(MemberState::Alive) => Liveness::Alive,
            Some(MemberState::Suspect) => Liveness::Suspect,
            Some(MemberState::Down) | None => Liveness::Missing,
        }
    }

    /// Asks the policy loop to plan and act now rather than at its next tick.
    pub fn wake_policy(&self) {
        self.policy_wake.notify_one();
    }

    /// What the policy loop waits on besides state changes and its timer.
    pub fn policy_wake_handle(&self) -> std::sync::Arc<tokio::sync::Notify> {
        std::sync::Arc::clone(&self.policy_wake)
    }

    /// The plan from this server's state and membership view.
    pub fn plan_report(&self) -> PlanReport {
        report(&self.state, self.server_id, self.policy_seed(), |server| {
            self.liveness_of(server)
        })
    }
}

fn report(
    state: &GridState,
    server_id: ServerId,
    seed: u64,
    liveness: impl Fn(ServerId) -> Liveness,
) -> PlanReport {
    let view = GridView::from_state(state, liveness);
    let plan = placement::plan(&view, seed);
    let names: BTreeMap<ServerId, &str> = view
        .servers()
        .iter()
        .map(|server| (server.id, server.record.name.as_str()))
        .collect();
    let steps = plan
        .steps
        .iter()
        .map(|step| {
            let (action, object, count) = match &step.action {
                Action::PullImage { image } => ("pull-image", image.to_string(), 1),
                Action::DropImage { image } => ("drop-image", image.to_string(), 1),
                Action::CreateVms {
                    template, count, ..
                } => ("create-vms", template.to_string(), *count),
                Action::RemoveVm { vm, .. } => ("remove-vm", vm.to_string(), 1),
                Action::RefreshVm { vm, .. } => ("refresh-vm", vm.to_string(), 1),
            };
            PlanStepReport {
                target: step.target,
                target_name: names.get(&step.target).copied().unwrap_or("?").to_owned(),
                this_server: step.target == server_id,
                action: action.to_owned(),
                object,
                count,
                summary: step.action.to_string(),
                reason: step.reason.to_string(),
            }
        })
        .collect();
    PlanReport {
        server_id,
        state_digest: hex::encode(state.digest()),
        missing: view
            .servers()
            .iter()
            .filter(|server| server.liveness == Liveness::Missing)
            .map(|server| server.id)
            .collect(),
        steps,
        shortfalls: plan
            .shortfalls
            .iter()
            .map(|shortfall| ShortfallReport {
                template: shortfall.template.to_string(),
                missing_vms: shortfall.missing_vms,
                cause: shortfall.cause.to_string(),
            })
            .collect(),
        jobs: state
            .server(server_id)
            .map(|record| record.jobs.clone())
            .unwrap_or_default(),
    }
}
