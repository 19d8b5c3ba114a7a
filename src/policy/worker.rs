//! `PolicyWorker`: the reconcile loop. Wakes on state changes (debounced)
//! and on a timer, plans, and runs this server's steps as jobs.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::host::{ImagePuller, PolicyHost, PolicySnapshot};
use super::jobs::{Backoff, JobTable};
use super::steps::{self, BootSlots, PolicyError, StepContext, StepInput};
use crate::actuator::AsyncHypervisor;
use crate::model::{ImageHolding, JobRecord, Policy, ServerId, VmState};
use crate::placement::{self, Action, GridView, Liveness, Plan, Step};
use crate::state::{ConfigKey, ConfigValue};

/// The planning function: [`placement::plan`] in production; tests give
/// their own so that they choose the steps.
pub type Planner = Arc<dyn Fn(&GridView<'_>, u64) -> Plan + Send + Sync>;

/// The loop's timings and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySettings {
    /// A burst of changes (a peer's pushes, a pool of VMs reporting) is
    /// planned once, this long after it starts.
    pub debounce: Duration,
    /// The loop plans this often even when nothing seems to change: a
    /// missed notification or a clock-dependent decision costs at most this.
    pub replan_interval: Duration,
    /// Back-off after a job's first failure, doubled after each further one.
    pub first_retry: Duration,
    /// The longest back-off: a host fixed by an admin is used within it.
    pub max_retry: Duration,
    /// Jobs running at once; the rest wait for a slot. Each job holds a
    /// task and, during host calls, a thread of the blocking pool.
    pub max_running_jobs: usize,
    /// How long stopping waits for running jobs before it abandons them
    /// (the next start finds what they left and marks it failed).
    pub stop_deadline: Duration,
    /// Whether a VM is `Ready` as soon as its domain runs. `false` in
    /// `deskgrid serve`: the desktop service marks it `Ready` when its guest
    /// agent says hello, and a started VM stays `Provisioning` until then.
    /// `true` only where no desktop service runs (the policy loop's own
    /// tests, with fake hosts that have no agents).
    pub ready_on_start: bool,
}

impl Default for PolicySettings {
    fn default() -> Self {
        Self {
            // Long enough to gather a peer's burst of pushes, short against
            // the seconds a desktop takes to boot.
            debounce: Duration::from_millis(200),
            replan_interval: Duration::from_secs(10),
            first_retry: Duration::from_secs(5),
            max_retry: Duration::from_secs(300),
            // Well under tokio's 512 blocking threads, shared with the rest
            // of the server; VM creation is bounded by the boot limit anyway.
            max_running_jobs: 16,
            // Below the appliance's 10 s exit deadline, so the rest of the
            // shutdown still gets its share.
            stop_deadline: Duration::from_secs(5),
            ready_on_start: false,
        }
    }
}

/// Wakes the loop; cheap, never blocks, and a burst of calls makes one plan.
#[derive(Debug, Clone)]
pub struct PolicyWaker {
    changes: watch::Sender<u64>,
    plan_now: Arc<Notify>,
}

impl PolicyWaker {
    /// The grid state changed: the loop plans after the debounce, when
    /// [`placement::analyze`] says a balancer has work.
    pub fn state_changed(&self) {
        self.changes
            .send_modify(|generation| *generation = generation.wrapping_add(1));
    }

    /// Someone asks for a plan now (`deskgrid plan`): the loop plans and
    /// starts its steps at once, whatever the analysis says.
    pub fn plan_now(&self) {
        self.plan_now.notify_one();
    }
}

/// What woke the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    /// The state changed: planned only when [`placement::analyze`] says a
    /// balancer has work.
    StateChanged,
    /// The timer, a job that ended, a back-off that ran out, a request to
    /// plan now: always planned.
    Always,
}

/// The reconcile loop of one server.
pub struct PolicyWorker {
    host: Arc<dyn PolicyHost>,
    hypervisor: AsyncHypervisor,
    images: Arc<dyn ImagePuller>,
    planner: Planner,
    settings: PolicySettings,
    changes: watch::Receiver<u64>,
    waker: PolicyWaker,
}

impl fmt::Debug for PolicyWorker {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PolicyWorker")
            .field("host", &self.host)
            .field("hypervisor", &self.hypervisor)
            .field("images", &self.images)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PolicyWorker {
    /// A loop with [`placement::plan`] and the default settings.
    pub fn new(
        host: Arc<dyn PolicyHost>,
        hypervisor: AsyncHypervisor,
        images: Arc<dyn ImagePuller>,
    ) -> Self {
        let (sender, changes) = watch::channel(0);
        Self {
            host,
            hypervisor,
            images,
            planner: Arc::new(placement::plan),
            settings: PolicySettings::default(),
            changes,
            waker: PolicyWaker {
                changes: sender,
                plan_now: Arc::new(Notify::new()),
            },
        }
    }

    pub fn with_planner(mut self, planner: Planner) -> Self {
        self.planner = planner;
        self
    }

    pub fn with_settings(mut self, settings: PolicySettings) -> Self {
        self.settings = settings;
        self
    }

    /// Plans at once whenever `plan_now` is notified (the service's handle
    /// behind `deskgrid plan`); [`PolicyWaker::plan_now`] notifies it too.
    pub fn with_plan_now(mut self, plan_now: Arc<Notify>) -> Self {
        self.waker.plan_now = plan_now;
        self
    }

    /// The handle the service pokes when the state changes.
    pub fn waker(&self) -> PolicyWaker {
        self.waker.clone()
    }

    /// Runs until `shutdown` turns true (or its sender goes), then waits up
    /// to [`PolicySettings::stop_deadline`] for running jobs.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let Self {
            host,
            hypervisor,
            images,
            planner,
            settings,
            mut changes,
            waker,
        } = self;
        let plan_now = Arc::clone(&waker.plan_now);
        let own = host.server_id();
        let seed = host.seed();
        let started = Instant::now();
        adopt_leftovers(&host).await;

        let context = Arc::new(StepContext {
            host: Arc::clone(&host),
            hypervisor,
            images,
            boots: BootSlots::new(Policy::default().max_concurrent_boots),
            shutdown: shutdown.clone(),
            ready_on_start: settings.ready_on_start,
        });
        let mut table = JobTable::new(
            Backoff {
                first: settings.first_retry,
                max: settings.max_retry,
            },
            settings.max_running_jobs,
        );
        let mut running: JoinSet<Result<(), PolicyError>> = JoinSet::new();
        // Task id -> job key: a task that panics still names its job.
        let mut running_keys: HashMap<tokio::task::Id, String> = HashMap::new();
        let mut planned_on: Option<PolicySnapshot> = None;
        let mut published: Option<Vec<JobRecord>> = None;
        let mut timer = tokio::time::interval(settings.replan_interval);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            if *shutdown.borrow() {
                break;
            }
            let retry_at = table.next_retry().map(|after| started + after);
            let trigger = tokio::select! {
                _ = shutdown.changed() => break,
                Some(joined) = running.join_next_with_id() => {
                    let (id, outcome) = match joined {
                        Ok((id, outcome)) => (id, outcome),
                        Err(error) => (error.id(), Err(PolicyError::TaskLost)),
                    };
                    if let Some(key) = running_keys.remove(&id) {
                        let outcome = outcome.map_err(|error| crate::error_chain(&error));
                        match &outcome {
                            Ok(()) => tracing::info!(job = %key, "policy job done"),
                            Err(error) => tracing::warn!(job = %key, error = %error, "policy job failed; retried after a back-off"),
                        }
                        table.finished(&key, outcome, started.elapsed(), host.now_ms());
                    }
                    Trigger::Always
                }
                _ = timer.tick() => Trigger::Always,
                _ = plan_now.notified() => Trigger::Always,
                _ = changes.changed() => {
                    tokio::select! {
                        _ = shutdown.changed() => break,
                        _ = tokio::time::sleep(settings.debounce) => {}
                    }
                    changes.borrow_and_update();
                    Trigger::StateChanged
                }
                _ = sleep_until_opt(retry_at), if retry_at.is_some() => Trigger::Always,
            };

            let Some(snapshot) = blocking(&host, |host| host.snapshot()).await else {
                // Logged by `blocking`; a pause keeps a due retry from
                // spinning on a host that keeps failing.
                tokio::time::sleep(settings.debounce).await;
                continue;
            };
            let Some(steps) = plan_round(
                &planner,
                &snapshot,
                planned_on.as_ref(),
                own,
                seed,
                trigger,
                &context.boots,
            ) else {
                continue;
            };
            let own_record = snapshot.state.server(own);
            let starts = table.reconcile(&steps, own_record, started.elapsed(), host.now_ms());
            for action in starts {
                let input = step_input(&action, &snapshot, own);
                let key = action.key();
                tracing::info!(job = %key, step = %action, "policy job started");
                let handle = running.spawn(steps::execute(Arc::clone(&context), action, input));
                running_keys.insert(handle.id(), key);
            }
            planned_on = Some(snapshot);
            publish(&host, &table, &mut published).await;
        }

        if !running.is_empty() {
            tracing::info!(jobs = running.len(), "waiting for policy jobs to stop");
            let deadline = tokio::time::sleep(settings.stop_deadline);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    joined = running.join_next() => if joined.is_none() { break },
                    _ = &mut deadline => {
                        tracing::warn!(jobs = running.len(), "policy jobs did not stop in time; abandoned");
                        running.abort_all();
                        break;
                    }
                }
            }
        }
        // Nothing runs any more: say so, best effort.
        if let Err(error) = steps::update_record(&host, |record| record.jobs.clear()).await {
            tracing::debug!(error = %crate::error_chain(&error), "cannot clear the jobs on stop");
        }
        tracing::info!("policy loop stopped");
    }
}

/// Plans when the trigger calls for it: the steps for this server, or
/// `None` when a state change gives no balancer work.
fn plan_round(
    planner: &Planner,
    snapshot: &PolicySnapshot,
    planned_on: Option<&PolicySnapshot>,
    own: ServerId,
    seed: u64,
    trigger: Trigger,
    boots: &BootSlots,
) -> Option<Vec<Step>> {
    let view = view_of(snapshot, own);
    if trigger == Trigger::StateChanged {
        if let Some(previous) = planned_on {
            let analysis = placement::analyze(&view_of(previous, own), &view);
            if !analysis.any() {
                tracing::trace!("state changed; no balancer has work");
                return None;
            }
            tracing::debug!(reasons = ?analysis.reasons, "state changed; planning");
        }
    }
    boots.set_limit(view.policy().max_concurrent_boots);
    let plan = planner(&view, seed);
    let mut steps: Vec<Step> = plan.steps_for(own).cloned().collect();
    resume_pulls(snapshot, own, &mut steps);
    Some(steps)
}

/// Adds a pull step for every image this server's record shows as
/// `Partial` that the plan neither pulls nor drops: a pull that failed, or
/// was cut short by a restart, is finished from where it stopped. The
/// planner counts a partial copy as a holder, so it never plans that pull
/// again by itself; the job table's back-off still paces the attempts.
fn resume_pulls(snapshot: &PolicySnapshot, own: ServerId, steps: &mut Vec<Step>) {
    let Some(record) = snapshot.state.server(own) else {
        return;
    };
    for (image, holding) in &record.images {
        if !matches!(holding, ImageHolding::Partial { .. }) {
            continue;
        }
        let planned = steps.iter().any(|step| match &step.action {
            Action::PullImage { image: pulled } | Action::DropImage { image: pulled } => {
                pulled == image
            }
            _ => false,
        });
        let in_grid = matches!(
            snapshot.state.config(&ConfigKey::Image(image.clone())),
            Some(ConfigValue::Image(_))
        );
        if planned || !in_grid {
            continue;
        }
        // The plan's own view of the copies: complete ones, and all it
        // counts (this one included).
        let (mut complete, mut counted) = (0u32, 0u32);
        for (_, other) in snapshot.state.servers() {
            match other.images.get(image) {
                Some(ImageHolding::Complete) => {
                    complete += 1;
                    counted += 1;
                }
                Some(ImageHolding::Partial { .. }) => counted += 1,
                None => {}
            }
        }
        steps.push(Step {
            target: own,
            action: Action::PullImage {
                image: image.clone(),
            },
            reason: placement::Reason::BelowMinReplicas {
                holders: complete,
                need: counted,
            },
        });
    }
}

fn view_of(snapshot: &PolicySnapshot, own: ServerId) -> GridView<'_> {
    GridView::from_state(&snapshot.state, |server| {
        if server == own {
            Liveness::Alive
        } else {
            snapshot
                .liveness
                .get(&server)
                .copied()
                .unwrap_or(Liveness::Alive)
        }
    })
}

/// What a starting step needs from the snapshot its plan was made on.
fn step_input(action: &Action, snapshot: &PolicySnapshot, own: ServerId) -> StepInput {
    let mut input = StepInput {
        own: snapshot.state.server(own).cloned(),
        template: None,
        image: None,
    };
    match action {
        Action::CreateVms { template, .. } | Action::RefreshVm { template, .. } => {
            if let Some(ConfigValue::Template(found)) = snapshot
                .state
                .config(&ConfigKey::Template(template.clone()))
            {
                input.template = Some(found.clone());
            }
        }
        Action::PullImage { image } => {
            if let Some(ConfigValue::Image(found)) =
                snapshot.state.config(&ConfigKey::Image(image.clone()))
            {
                input.image = Some(found.clone());
            }
        }
        Action::DropImage { .. } | Action::RemoveVm { .. } => {}
    }
    input
}

/// Writes the job records when they changed since the last write.
async fn publish(
    host: &Arc<dyn PolicyHost>,
    table: &JobTable,
    published: &mut Option<Vec<JobRecord>>,
) {
    let records = table.records();
    if published.as_ref() == Some(&records) {
        return;
    }
    let written = records.clone();
    match steps::update_record(host, move |record| record.jobs = written.clone()).await {
        Ok(()) => *published = Some(records),
        Err(error) => {
            // Tried again after the next round.
            tracing::warn!(error = %crate::error_chain(&error), "cannot publish the policy jobs");
        }
    }
}

/// At start: what a previous run left half-done. VMs still provisioning
/// were abandoned (marked failed, so the plan replaces them), no job runs,
/// and partial images stay partial: their pulls resume ([`resume_pulls`]).
async fn adopt_leftovers(host: &Arc<dyn PolicyHost>) {
    let adopted = steps::update_record(host, |record| {
        for vm in record.vms.values_mut() {
            if vm.state == VmState::Provisioning {
                vm.state = VmState::Failed;
            }
        }
        record.jobs.clear();
    })
    .await;
    if let Err(error) = adopted {
        tracing::warn!(error = %crate::error_chain(&error), "cannot tidy this server's record at start");
    }
}

/// Runs a host call on the blocking pool; `None` when the task was lost.
async fn blocking<T: Send + 'static>(
    host: &Arc<dyn PolicyHost>,
    call: impl FnOnce(&dyn PolicyHost) -> T + Send + 'static,
) -> Option<T> {
    let host = Arc::clone(host);
    match tokio::task::spawn_blocking(move || call(host.as_ref())).await {
        Ok(value) => Some(value),
        Err(error) => {
            tracing::error!(error = %error, "policy host call failed");
            None
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
