//! The connection balancer: which servers to ask for a user's desktop.
//!
//! [`ConnectionIndex::new`] walks the view once per state change; ranking
//! one login then only sorts that template's candidates. Order: the servers
//! where the user already has a session or a personal VM of the template;
//! then servers with a ready VM of the template, by load (memory of VMs in
//! use per budget), most ready VMs, same site as the client, and a
//! rendezvous hash of (user, server).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use crate::model::{Name, ServerId, SiteLabel, TemplateName, UserName, VmState};

use super::balance::{budgets, vm_size};
use super::rendezvous::{object_hash, score};
use super::GridView;

#[derive(Debug, Clone)]
struct Candidate {
    server: ServerId,
    /// VMs in use: memory per million of budget.
    load: u64,
    ready: u32,
    site: SiteLabel,
}

/// Per-template candidates prepared once per state change, so that ranking
/// one login costs microseconds.
#[derive(Debug, Clone)]
pub struct ConnectionIndex {
    seed: u64,
    candidates: BTreeMap<TemplateName, Vec<Candidate>>,
    /// (user, template) -> servers holding their session or personal VM.
    owned: BTreeMap<(UserName, TemplateName), BTreeSet<ServerId>>,
}

impl ConnectionIndex {
    pub fn new(view: &GridView<'_>, seed: u64) -> Self {
        let mut candidates: BTreeMap<TemplateName, Vec<Candidate>> = BTreeMap::new();
        let mut owned: BTreeMap<(UserName, TemplateName), BTreeSet<ServerId>> = BTreeMap::new();
        for server in view.servers() {
            if !server.eligible() {
                continue;
            }
            let record = server.record;
            let (budget, _) = budgets(record, view.policy());
            let mut in_use_memory: i64 = 0;
            let mut ready: BTreeMap<&TemplateName, u32> = BTreeMap::new();
            for vm in record.vms.values() {
                let template = view
                    .templates()
                    .binary_search_by(|template| template.name.cmp(&vm.template))
                    .ok()
                    .map(|index| view.templates()[index]);
                match vm.state {
                    VmState::Reserved | VmState::InUse => {
                        in_use_memory += vm_size(vm, template).0;
                    }
                    VmState::Ready
                        if vm.user.is_none()
                            && template.is_some_and(|template| template.image == vm.image) =>
                    {
                        *ready.entry(&vm.template).or_default() += 1;
                    }
                    _ => {}
                }
                if let Some(user) = &vm.user {
                    if vm.state != VmState::Failed {
                        owned
                            .entry((user.clone(), vm.template.clone()))
                            .or_default()
                            .insert(server.id);
                    }
                }
            }
            for session in record.sessions.values() {
                if let Some(vm) = record.vms.get(&session.vm) {
                    owned
                        .entry((session.user.clone(), vm.template.clone()))
                        .or_default()
                        .insert(server.id);
                }
            }
            let load = if budget <= 0 {
                u64::MAX
            } else {
                u64::try_from(i128::from(in_use_memory.max(0)) * 1_000_000 / i128::from(budget))
                    .unwrap_or(u64::MAX)
            };
            for (template, ready) in ready {
                candidates
                    .entry(template.clone())
                    .or_default()
                    .push(Candidate {
                        server: server.id,
                        load,
                        ready,
                        site: record.site.clone(),
                    });
            }
        }
        Self {
            seed,
            candidates,
            owned,
        }
    }

    /// Servers to ask for a desktop of `template` for `user`, best first.
    pub fn rank(
        &self,
        user: &UserName,
        template: &TemplateName,
        client_site: Option<&SiteLabel>,
    ) -> Vec<ServerId> {
        let owned = self.owned.get(&(user.clone(), template.clone()));
        let mut ranked: Vec<ServerId> = owned.into_iter().flatten().copied().collect();
        let Some(candidates) = self.candidates.get(template) else {
            return ranked;
        };
        let object = object_hash(self.seed, user.as_str().as_bytes());
        // (load, most ready, other site, rendezvous) -> server
        type Key = (u64, Reverse<u32>, bool, Reverse<u64>, ServerId);
        let mut others: Vec<Key> = candidates
            .iter()
            .filter(|candidate| !owned.is_some_and(|owned| owned.contains(&candidate.server)))
            .map(|candidate| {
                (
                    candidate.load,
                    Reverse(candidate.ready),
                    client_site.is_some_and(|site| *site != candidate.site),
                    Reverse(score(object, candidate.server)),
                    candidate.server,
                )
            })
            .collect();
        others.sort_unstable();
        ranked.extend(others.into_iter().map(|(.., server)| server));
        ranked
    }
}
