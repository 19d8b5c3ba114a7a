//! `DesktopService`: the desktop service of one server. It keeps an agent
//! channel ([`AgentChannel`]) and a [`VmLifecycle`] for every desktop VM in
//! this server's own record, turns what the agents say and the passing of
//! time into lifecycle events, carries out the lifecycle's effects (the VM's
//! state and sessions in the record), and answers the broker's
//! [`DesktopDesk::reserve`].
//!
//! # Who does what
//!
//! - **The policy loop owns the disks and domains**: it creates VMs, and it
//!   refreshes a pooled VM whose record says `Refreshing` (`RefreshVm`:
//!   throw the overlay away, clone afresh, start) and removes a `Failed` one
//!   (the planner then creates a replacement where it sees fit). This
//!   service never touches a disk: [`Effect::RefreshDisk`] is carried out by
//!   publishing `Refreshing`, [`Effect::Regenerate`] by publishing `Failed`
//!   (regeneration is replacement: a fresh VM from the base image, with a
//!   fresh lifecycle). A **personal** VM's disk is its owner's: when its
//!   lifecycle asks for `Regenerate { keep_disk: true }` this service
//!   powers the domain off and starts it again on the same disk (no disk is
//!   touched); a restart whose agent never says hello leaves it `Failed`
//!   with its owner, for the admin.
//! - **This service owns the VM's `state` and `user` from the moment its
//!   domain runs**, and the record's `sessions`. With the service running,
//!   the policy loop leaves a started VM `Provisioning`
//!   (`PolicySettings::ready_on_start = false`); the agent's hello makes it
//!   `Ready` here.
//! - **The lifecycle is the single decision point.** Every event goes
//!   through [`VmLifecycle::apply`] under one lock, and a reservation holds
//!   that lock from the decision to the record write, so two concurrent
//!   reserves can never both get one VM.
//!
//! # How the record tells the service what the policy loop did
//!
//! | record says    | lifecycle is                  | means                      | event               |
//! |----------------|-------------------------------|----------------------------|---------------------|
//! | `Provisioning` | `Provisioning`, domain runs   | the VM was created         | `Defined`, `Booted` |
//! | `Provisioning` | `Refreshing`                  | the refresh job restarted it | `RefreshDone`     |
//! | `Failed`, `Stopped`, gone | anything           | someone else decided       | forgotten           |
//!
//! A VM found in the record when the service starts (an appliance restart)
//! is adopted as booting: it is offered to nobody until its agent says hello
//! again, and nothing is written for it until then (the policy loop turns
//! left-over `Provisioning` VMs into `Failed` at its own start, so writing
//! `Provisioning` here would race with it).
//!
//! Record writes are batched: what the events of one tick period changed is
//! written once per tick; a reservation writes at once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch, Mutex};

use super::channels::{
    AgentChannel, AgentEvent, AgentReport, ChannelCountersSnapshot, ChannelLimits,
};
use super::lifecycle::{Effect, Event, LifecyclePolicy, Phase, VmLifecycle};
use super::reserve::{
    DesktopDesk, LogoffFuture, Reservation, ReserveFuture, ReserveRefusal, ReserveRequest,
};
use crate::actuator::{DisplayEvent, DisplayPhase, DisplayWatch, DomainState, Hypervisor};
use crate::model::{
    Policy, ServerRecord, SessionId, SessionRecord, Template, TemplateKind, TemplateName, UserName,
    VmId, VmState,
};

/// Reports queued from all agent channels at once. A report is a few dozen
/// bytes; agents send one every couple of seconds, so this absorbs a burst
/// from hundreds of VMs; beyond it a report is dropped and counted.
const REPORT_QUEUE: usize = 4096;

/// Viewer events queued from the hypervisor's event thread. A SPICE viewer
/// opens about eight connections, three events each: room for a 9 a.m.
/// wave of a few hundred viewers within one loop turn.
const DISPLAY_QUEUE: usize = 8192;

/// Viewer connections remembered per VM; more are not tracked (a SPICE
/// viewer needs about eight, a VNC viewer one).
const MAX_VIEWER_CONNECTIONS: usize = 64;

/// Wait between attempts to subscribe to display events.
const DISPLAY_WATCH_RETRY: Duration = Duration::from_secs(10);

/// What this service needs from the rest of the server. Calls may block (a
/// record write is an fsync): the service makes them on the blocking pool.
pub trait DesktopHost: Send + Sync + std::fmt::Debug + 'static {
    /// This server's name, as the broker shows it.
    fn server_name(&self) -> String;

    /// Unix milliseconds of the server's wall clock.
    fn now_ms(&self) -> u64;

    /// This server's own record and the templates of the grid, or `None`
    /// while the server has no record yet.
    fn own_view(&self) -> Option<OwnView>;

    /// Applies `change` to this server's own record and persists it, as
    /// every write does. A change that alters nothing writes nothing.
    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String>;

    /// The address viewers dial for a display that listens on every
    /// interface: this server's advertised (else listening) IP.
    fn display_address(&self) -> IpAddr;
}

/// What [`DesktopHost::own_view`] returns.
#[derive(Debug, Clone)]
pub struct OwnView {
    pub record: ServerRecord,
    pub templates: BTreeMap<TemplateName, Template>,
    /// The grid's policy (the disconnect grace comes from it).
    pub policy: Policy,
}

/// The service's timings.
#[derive(Debug, Clone, PartialEq)]
pub struct DesktopSettings {
    /// The lifecycle's timers; the disconnect grace is replaced by the
    /// grid policy's at every tick.
    pub lifecycle: LifecyclePolicy,
    pub limits: ChannelLimits,
    /// How often time is passed to the lifecycles and the record is synced.
    pub tick: Duration,
}

impl Default for DesktopSettings {
    fn default() -> Self {
        Self {
            lifecycle: LifecyclePolicy::default(),
            limits: ChannelLimits::default(),
            // Timers are late by at most a tick (see the lifecycle); a
            // second is nothing against a 15-second heartbeat timeout.
            tick: Duration::from_secs(1),
        }
    }
}

/// What the service itself dropped, for status and tests.
#[derive(Debug, Default)]
struct ServiceCounters {
    /// Logins, logouts and session lists naming a user or session that is
    /// not a valid name.
    invalid_names: AtomicU64,
    /// Agent events the lifecycle refused (a login while booting, say).
    refused_events: AtomicU64,
    /// Record writes that failed (retried at the next tick).
    failed_writes: AtomicU64,
    /// Viewer events from the hypervisor (every phase, every VM).
    display_events: AtomicU64,
    /// Viewer events dropped because the queue was full.
    display_events_dropped: AtomicU64,
}

/// [`DesktopService::counters`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DesktopCounters {
    pub invalid_names: u64,
    pub refused_events: u64,
    pub failed_writes: u64,
    pub display_events: u64,
    pub display_events_dropped: u64,
}

/// One desktop VM this service looks after.
#[derive(Debug)]
struct DeskVm {
    template: TemplateName,
    lifecycle: VmLifecycle,
    channel: Option<AgentChannel>,
    /// Handed to the policy loop as `Failed` (regeneration by replacement):
    /// nothing more happens here until it leaves the record.
    given_up: bool,
    /// The state and user the record should show, when it does not yet.
    unwritten: Option<(VmState, Option<UserName>)>,
    /// Authenticated viewer connections to the display (`address:port`),
    /// while the VM is reserved or in use.
    viewers: BTreeSet<String>,
    /// A personal VM that failed, to be restarted on its own disk at the
    /// next tick.
    restart: bool,
}

impl DeskVm {
    /// Queues a `LogOff` for the guest agent; `false` without a channel
    /// (or with its queue full).
    fn ask_agent_to_log_off(&self, user: &UserName) -> bool {
        self.channel.as_ref().is_some_and(|channel| {
            channel.send(super::protocol::Message::LogOff {
                user: user.to_string(),
            })
        })
    }

    fn wants_channel(&self) -> bool {
        !self.given_up
            && matches!(
                self.lifecycle.phase(),
                Phase::Booting { .. } | Phase::Ready | Phase::Reserved { .. } | Phase::InUse { .. }
            )
    }
}

/// Everything behind the service's one lock.
#[derive(Debug, Default)]
struct Desks {
    vms: BTreeMap<VmId, DeskVm>,
    templates: BTreeMap<TemplateName, Template>,
    /// Session records to add and remove at the next write.
    sessions_added: BTreeMap<SessionId, SessionRecord>,
    sessions_removed: BTreeSet<SessionId>,
    /// Sessions whose viewer went (`Some(when)`) or came back (`None`),
    /// for the next write.
    viewer_changes: BTreeMap<SessionId, Option<u64>>,
    /// The lifecycle's rules now: the settings' timers with the grid
    /// policy's disconnect grace.
    lifecycle: LifecyclePolicy,
}

#[derive(Debug)]
struct Shared {
    host: Arc<dyn DesktopHost>,
    hypervisor: Arc<dyn Hypervisor>,
    settings: DesktopSettings,
    desks: Mutex<Desks>,
    reports: mpsc::Sender<AgentReport>,
    incoming: std::sync::Mutex<Option<mpsc::Receiver<AgentReport>>>,
    displays: mpsc::Sender<DisplayEvent>,
    incoming_displays: std::sync::Mutex<Option<mpsc::Receiver<DisplayEvent>>>,
    counters: ServiceCounters,
}

/// The desktop service of one server: a cheap handle; [`DesktopService::run`]
/// is its loop, [`DesktopDesk::reserve`] the broker's way in.
#[derive(Debug, Clone)]
pub struct DesktopService {
    shared: Arc<Shared>,
}

impl DesktopService {
    pub fn new(
        host: Arc<dyn DesktopHost>,
        hypervisor: Arc<dyn Hypervisor>,
        settings: DesktopSettings,
    ) -> Self {
        let (reports, incoming) = mpsc::channel(REPORT_QUEUE);
        let (displays, incoming_displays) = mpsc::channel(DISPLAY_QUEUE);
        let desks = Desks {
            lifecycle: settings.lifecycle.clone(),
            ..Desks::default()
        };
        Self {
            shared: Arc::new(Shared {
                host,
                hypervisor,
                settings,
                desks: Mutex::new(desks),
                reports,
                incoming: std::sync::Mutex::new(Some(incoming)),
                displays,
                incoming_displays: std::sync::Mutex::new(Some(incoming_displays)),
                counters: ServiceCounters::default(),
            }),
        }
    }

    /// The handle the broker calls.
    pub fn desk(&self) -> Arc<dyn DesktopDesk> {
        Arc::new(self.clone())
    }

    /// What `vm`'s agent channel saw, while the service has one.
    pub async fn channel_counters(&self, vm: VmId) -> Option<ChannelCountersSnapshot> {
        let desks = self.shared.desks.lock().await;
        desks
            .vms
            .get(&vm)
            .and_then(|desk| desk.channel.as_ref())
            .map(AgentChannel::counters)
    }

    /// What the service itself dropped.
    pub fn counters(&self) -> DesktopCounters {
        let counters = &self.shared.counters;
        DesktopCounters {
            invalid_names: counters.invalid_names.load(Ordering::Relaxed),
            refused_events: counters.refused_events.load(Ordering::Relaxed),
            failed_writes: counters.failed_writes.load(Ordering::Relaxed),
            display_events: counters.display_events.load(Ordering::Relaxed),
            display_events_dropped: counters.display_events_dropped.load(Ordering::Relaxed),
        }
    }

    /// How many authenticated viewer connections `vm`'s display has, as
    /// the service counts them.
    pub async fn viewer_connections(&self, vm: VmId) -> usize {
        let desks = self.shared.desks.lock().await;
        desks.vms.get(&vm).map_or(0, |desk| desk.viewers.len())
    }

    /// Runs until `shutdown` turns true (or its sender goes). A second call
    /// returns at once: there is one loop per service.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let taken = self
            .shared
            .incoming
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let displays = self
            .shared
            .incoming_displays
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let (Some(mut incoming), Some(mut displays)) = (taken, displays) else {
            tracing::error!("desktop service: run called twice; the second returns");
            return;
        };
        let mut ticker = tokio::time::interval(self.shared.settings.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watch = DisplayWatchKeeper::default();
        loop {
            if *shutdown.borrow() {
                break;
            }
            tokio::select! {
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                Some(report) = incoming.recv() => {
                    let mut desks = self.shared.desks.lock().await;
                    self.shared.handle_report(&mut desks, report);
                    // Whatever else is queued, under the same lock.
                    while let Ok(report) = incoming.try_recv() {
                        self.shared.handle_report(&mut desks, report);
                    }
                }
                Some(event) = displays.recv() => {
                    let mut desks = self.shared.desks.lock().await;
                    self.shared.handle_display(&mut desks, event);
                    while let Ok(event) = displays.try_recv() {
                        self.shared.handle_display(&mut desks, event);
                    }
                }
                _ = ticker.tick() => {
                    watch.keep(&self.shared).await;
                    self.shared.tick().await;
                }
            }
        }
        // Dropping the channels asks their readers to stop.
        self.shared.desks.lock().await.vms.clear();
        tracing::info!("desktop service stopped");
    }
}

impl DesktopDesk for DesktopService {
    fn reserve(&self, request: ReserveRequest) -> ReserveFuture {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { shared.reserve(request).await })
    }

    fn log_off(&self, user: UserName) -> LogoffFuture {
        let shared = Arc::clone(&self.shared);
        Box::pin(async move { shared.log_off(user).await })
    }
}

impl Shared {
    /// One tick: sync with the record, pass time, start missing channels,
    /// write what changed.
    async fn tick(&self) {
        let host = Arc::clone(&self.host);
        let view = match tokio::task::spawn_blocking(move || host.own_view()).await {
            Ok(Some(view)) => view,
            Ok(None) => return,
            Err(error) => {
                tracing::error!(%error, "desktop service: reading the record failed");
                return;
            }
        };
        let running = self.running_domains(&view).await;
        self.restart_failed_personal_vms().await;
        let now_ms = self.host.now_ms();
        let mut desks = self.desks.lock().await;
        self.sync(&mut desks, &view, &running);
        let vms: Vec<VmId> = desks.vms.keys().copied().collect();
        for vm in vms {
            self.apply(&mut desks, vm, Event::Tick { now_ms });
        }
        self.start_channels(&mut desks);
        self.write(&mut desks).await;
    }

    /// Restarts the personal VMs whose lifecycle asked for it, each on its
    /// own disk (the domain is powered off and started again), and tells
    /// their lifecycles how it went. Host calls run without the lock.
    async fn restart_failed_personal_vms(&self) {
        let pending: Vec<VmId> = {
            let mut desks = self.desks.lock().await;
            desks
                .vms
                .iter_mut()
                .filter(|(_, desk)| desk.restart)
                .map(|(vm, desk)| {
                    desk.restart = false;
                    *vm
                })
                .collect()
        };
        for vm in pending {
            let hypervisor = Arc::clone(&self.hypervisor);
            let restarted = tokio::task::spawn_blocking(move || {
                hypervisor.destroy_domain(vm)?;
                hypervisor.start_domain(vm)
            })
            .await
            .unwrap_or(Err(crate::actuator::ActuatorError::Cancelled));
            let mut desks = self.desks.lock().await;
            match restarted {
                Ok(()) => {
                    tracing::info!(%vm, "personal desktop restarted on its own disk");
                    self.apply(&mut desks, vm, Event::Regenerated);
                }
                Err(error) => {
                    let reason = crate::error_chain(&error);
                    tracing::warn!(%vm, %reason, "cannot restart a personal desktop");
                    self.apply(&mut desks, vm, Event::Failed { reason });
                }
            }
        }
    }

    /// The VMs whose record says `Provisioning` and whose domain runs; the
    /// only host calls a tick makes (one per VM being provisioned).
    async fn running_domains(&self, view: &OwnView) -> BTreeSet<VmId> {
        let candidates: Vec<VmId> = view
            .record
            .vms
            .values()
            .filter(|vm| vm.state == VmState::Provisioning)
            .map(|vm| vm.id)
            .collect();
        if candidates.is_empty() {
            return BTreeSet::new();
        }
        let hypervisor = Arc::clone(&self.hypervisor);
        tokio::task::spawn_blocking(move || {
            candidates
                .into_iter()
                .filter(|vm| hypervisor.domain_state(*vm).ok() == Some(DomainState::Running))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Brings the set of VMs in line with the record (see the module doc).
    fn sync(&self, desks: &mut Desks, view: &OwnView, running: &BTreeSet<VmId>) {
        desks.templates = view.templates.clone();
        desks.lifecycle.disconnect_grace_ms = u64::from(view.policy.disconnect_grace_s) * 1_000;
        let record = &view.record;
        desks.vms.retain(|vm, _| {
            record
                .vms
                .get(vm)
                .is_some_and(|entry| !matches!(entry.state, VmState::Failed | VmState::Stopped))
        });
        for entry in record.vms.values() {
            if matches!(entry.state, VmState::Failed | VmState::Stopped) {
                continue;
            }
            let vm = entry.id;
            if let std::collections::btree_map::Entry::Vacant(slot) = desks.vms.entry(vm) {
                let kind = view
                    .templates
                    .get(&entry.template)
                    .map_or(TemplateKind::Pooled, |template| template.kind);
                let mut lifecycle = VmLifecycle::new(kind, entry.user.clone());
                if !matches!(entry.state, VmState::Provisioning | VmState::Refreshing) {
                    // Adopted after a restart: booting until its agent says
                    // hello again.
                    let adopted = lifecycle
                        .apply(Event::Defined, &self.settings.lifecycle)
                        .and_then(|_| lifecycle.apply(Event::Booted, &self.settings.lifecycle));
                    if let Err(refusal) = adopted {
                        tracing::error!(%vm, %refusal, "cannot adopt a VM");
                    }
                }
                tracing::info!(%vm, template = %entry.template, state = ?entry.state, "desktop service: tracking VM");
                slot.insert(DeskVm {
                    template: entry.template.clone(),
                    lifecycle,
                    channel: None,
                    given_up: false,
                    unwritten: None,
                    viewers: BTreeSet::new(),
                    restart: false,
                });
                continue;
            }
            if entry.state != VmState::Provisioning {
                continue;
            }
            let phase = desks
                .vms
                .get(&vm)
                .map(|desk| desk.lifecycle.phase().clone());
            match phase {
                Some(Phase::Provisioning { .. }) if running.contains(&vm) => {
                    self.apply(desks, vm, Event::Defined);
                    self.apply(desks, vm, Event::Booted);
                }
                Some(Phase::Refreshing) => {
                    self.apply(desks, vm, Event::RefreshDone);
                }
                _ => {}
            }
        }
        // Sessions on VMs that are gone go with them.
        for (id, session) in &record.sessions {
            if !record.vms.contains_key(&session.vm) {
                desks.sessions_removed.insert(*id);
            }
        }
    }

    fn start_channels(&self, desks: &mut Desks) {
        for (vm, desk) in desks.vms.iter_mut() {
            if !desk.wants_channel() {
                desk.channel = None;
                continue;
            }
            if desk
                .channel
                .as_ref()
                .is_some_and(|channel| !channel.is_finished())
            {
                continue;
            }
            match AgentChannel::start(
                Arc::clone(&self.hypervisor),
                *vm,
                self.settings.limits,
                self.reports.clone(),
            ) {
                Ok(channel) => desk.channel = Some(channel),
                Err(error) => {
                    tracing::warn!(%vm, %error, "cannot start an agent channel reader")
                }
            }
        }
    }

    /// What an agent said, as lifecycle events.
    fn handle_report(&self, desks: &mut Desks, report: AgentReport) {
        let vm = report.vm;
        let Some(desk) = desks.vms.get(&vm) else {
            return;
        };
        if desk.given_up {
            return;
        }
        let now_ms = self.host.now_ms();
        match report.event {
            AgentEvent::Hello {
                agent_version,
                os,
                hostname,
            } => {
                tracing::info!(%vm, %agent_version, %os, %hostname, "agent said hello");
                if let Phase::Provisioning { defined } = *desk.lifecycle.phase() {
                    if !defined {
                        self.apply(desks, vm, Event::Defined);
                    }
                    self.apply(desks, vm, Event::Booted);
                }
                self.apply(desks, vm, Event::AgentHello);
                // A hello is alive too: the heartbeat clock starts now, not
                // at the next tick.
                if matches!(
                    desks.vms.get(&vm).map(|desk| desk.lifecycle.phase()),
                    Some(Phase::Ready | Phase::Reserved { .. } | Phase::InUse { .. })
                ) {
                    self.apply(desks, vm, Event::AgentHeartbeat { now_ms });
                }
            }
            AgentEvent::Heartbeat { .. } => {
                self.apply(desks, vm, Event::AgentHeartbeat { now_ms });
            }
            AgentEvent::Login { user, session } => {
                if let Some((user, session)) = self.session_of(vm, &user, &session) {
                    self.apply(desks, vm, Event::AgentLogin { user, session });
                }
            }
            AgentEvent::Logout { user, session } => {
                if let Some((user, session)) = self.session_of(vm, &user, &session) {
                    self.apply(desks, vm, Event::AgentLogout { user, session });
                }
            }
            AgentEvent::Sessions { users } => self.reconcile_sessions(desks, vm, &users),
        }
    }

    /// A viewer connection event on a VM's display. A viewer is attached
    /// while at least one of its connections passed the display password
    /// (a SPICE viewer has several; a port scan authenticates none); the
    /// lifecycle hears of the first such connection and of the last one
    /// closing.
    fn handle_display(&self, desks: &mut Desks, event: DisplayEvent) {
        self.counters.display_events.fetch_add(1, Ordering::Relaxed);
        let vm = event.vm;
        let Some(desk) = desks.vms.get_mut(&vm) else {
            return;
        };
        if desk.given_up {
            return;
        }
        tracing::debug!(%vm, phase = ?event.phase, client = %event.client, "display event");
        match event.phase {
            DisplayPhase::Connected => {}
            DisplayPhase::Authenticated => {
                if !matches!(
                    desk.lifecycle.phase(),
                    Phase::Reserved { .. } | Phase::InUse { .. }
                ) || desk.viewers.len() >= MAX_VIEWER_CONNECTIONS
                {
                    tracing::debug!(%vm, phase = ?desk.lifecycle.phase(), "viewer connection not tracked");
                    return;
                }
                let first = desk.viewers.is_empty();
                if desk.viewers.insert(event.client) && first {
                    tracing::info!(%vm, "viewer connected");
                    let session = desk.lifecycle.session();
                    if self.apply(desks, vm, Event::ViewerConnected) {
                        if let Some(session) = session {
                            desks.viewer_changes.insert(session, None);
                        }
                    }
                }
            }
            DisplayPhase::Disconnected => {
                if desk.viewers.remove(&event.client) && desk.viewers.is_empty() {
                    let now_ms = self.host.now_ms();
                    tracing::info!(%vm, grace_s = desks.lifecycle.disconnect_grace_ms / 1_000, "viewer disconnected");
                    let session = desk.lifecycle.session();
                    if self.apply(desks, vm, Event::ViewerDisconnected { now_ms }) {
                        if let Some(session) = session {
                            desks.viewer_changes.insert(session, Some(now_ms));
                        }
                    }
                }
            }
        }
    }

    /// The guest's list of logged-in users heals a lost login or logout: a
    /// current user missing from it has logged out; on a VM nobody uses, a
    /// listed user has logged in (the one the VM is reserved for first).
    fn reconcile_sessions(&self, desks: &mut Desks, vm: VmId, users: &[String]) {
        let mut valid = Vec::new();
        for user in users {
            match UserName::new(user) {
                Ok(user) => valid.push(user),
                Err(_) => {
                    self.counters.invalid_names.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let Some(desk) = desks.vms.get(&vm) else {
            return;
        };
        match desk.lifecycle.phase().clone() {
            Phase::InUse { user, session, .. } if !valid.contains(&user) => {
                self.apply(desks, vm, Event::AgentLogout { user, session });
            }
            Phase::Ready | Phase::Reserved { .. } => {
                let reserved_for = desk.lifecycle.holder().cloned();
                let user = reserved_for
                    .filter(|user| valid.contains(user))
                    .or_else(|| valid.first().cloned());
                if let Some(user) = user {
                    // The agent's own Login names the real session; this one
                    // stands for "a session the list shows".
                    let session = session_id(vm, &format!("listed:{user}"));
                    self.apply(desks, vm, Event::AgentLogin { user, session });
                }
            }
            _ => {}
        }
    }

    /// A guest's user and session as the grid's types; invalid ones are
    /// counted and dropped.
    fn session_of(&self, vm: VmId, user: &str, session: &str) -> Option<(UserName, SessionId)> {
        match UserName::new(user) {
            Ok(user) => Some((user, session_id(vm, session))),
            Err(_) => {
                self.counters.invalid_names.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%vm, "agent named an invalid user; dropped");
                None
            }
        }
    }

    /// Applies `event` to `vm` and carries out its effects; a refusal is
    /// counted and logged, nothing else.
    fn apply(&self, desks: &mut Desks, vm: VmId, event: Event) -> bool {
        let now_ms = self.host.now_ms();
        let protocol = desks
            .vms
            .get(&vm)
            .and_then(|desk| desks.templates.get(&desk.template))
            .map(|template| template.display)
            .unwrap_or_default();
        let Some(desk) = desks.vms.get_mut(&vm) else {
            return false;
        };
        if desk.given_up {
            return false;
        }
        let name = event.name();
        let session_before = desk.lifecycle.session();
        let effects = match desk.lifecycle.apply(event, &desks.lifecycle) {
            Ok(effects) => effects,
            Err(refusal) => {
                if name != "tick" {
                    self.counters.refused_events.fetch_add(1, Ordering::Relaxed);
                }
                tracing::debug!(%vm, %refusal, "lifecycle refused an event");
                return false;
            }
        };
        let mut regenerate = false;
        for effect in effects {
            match effect {
                Effect::RecordState { state, user } => {
                    desk.unwritten = Some(if regenerate {
                        (VmState::Failed, user)
                    } else {
                        (state, user)
                    });
                }
                Effect::RefreshDisk => {
                    // The policy loop refreshes a `Refreshing` VM (RefreshVm);
                    // the RecordState that follows publishes it.
                    tracing::info!(%vm, "session over: the VM is refreshed from its base image");
                }
                Effect::Regenerate { keep_disk: true } => {
                    // A personal VM: its disk is its owner's. Restarted on
                    // that disk at the next tick; failing again before its
                    // agent says hello leaves it `Failed` for the admin.
                    desk.restart = true;
                    desk.channel = None;
                    tracing::warn!(%vm, phase = ?desk.lifecycle.phase(), "personal desktop failed; restarting it on its own disk");
                }
                Effect::Regenerate { keep_disk } => {
                    regenerate = true;
                    desk.given_up = true;
                    desk.channel = None;
                    let (_, user) = desk.lifecycle.record_state();
                    desk.unwritten = Some((VmState::Failed, user));
                    tracing::warn!(%vm, keep_disk, phase = ?desk.lifecycle.phase(), "desktop VM failed; recorded as failed so the planner replaces it");
                }
                Effect::LogOff { user } => {
                    // Best effort: a pooled guest is refreshed right after,
                    // which ends the session whatever the agent manages.
                    let asked = desk.ask_agent_to_log_off(&user);
                    tracing::info!(%vm, %user, agent_asked = asked, "logging the user off");
                }
                Effect::ReleaseReservation { user } => {
                    tracing::info!(%vm, %user, "reservation released");
                    self.lock_display(vm, protocol);
                }
                Effect::ReportLogin(anomaly) => {
                    tracing::warn!(%vm, ?anomaly, "a login the grid did not arrange");
                }
            }
        }
        if !matches!(
            desk.lifecycle.phase(),
            Phase::Reserved { .. } | Phase::InUse { .. }
        ) {
            // Nobody's session: whatever viewer was attached belonged to the
            // one that ended.
            desk.viewers.clear();
        }
        let session_after = desk.lifecycle.session();
        if session_before != session_after {
            if let Some(old) = session_before {
                desks.sessions_added.remove(&old);
                desks.sessions_removed.insert(old);
            }
            if let (Some(new), Some(user)) = (session_after, desk.lifecycle.holder().cloned()) {
                desks.sessions_removed.remove(&new);
                desks.sessions_added.insert(
                    new,
                    SessionRecord {
                        id: new,
                        user,
                        vm,
                        started_at_ms: now_ms,
                        viewer_gone_at_ms: None,
                    },
                );
            }
        }
        true
    }

    /// A reservation that ended unused: the display gets a password nobody
    /// knows again (best effort; the ticket expires by itself anyway).
    fn lock_display(&self, vm: VmId, protocol: crate::model::DisplayProtocol) {
        let hypervisor = Arc::clone(&self.hypervisor);
        tokio::task::spawn_blocking(move || {
            let password = crate::actuator::random_display_password(protocol);
            if let Err(error) = hypervisor.set_display_ticket(vm, &password, Duration::ZERO) {
                tracing::debug!(%vm, error = %crate::error_chain(&error), "cannot lock the display again");
            }
        });
    }

    /// Writes what changed since the last write, in one record update. A
    /// VM someone else marked `Failed` keeps that state.
    async fn write(&self, desks: &mut Desks) {
        let states: BTreeMap<VmId, (VmState, Option<UserName>)> = desks
            .vms
            .iter()
            .filter_map(|(vm, desk)| desk.unwritten.clone().map(|state| (*vm, state)))
            .collect();
        if states.is_empty()
            && desks.sessions_added.is_empty()
            && desks.sessions_removed.is_empty()
            && desks.viewer_changes.is_empty()
        {
            return;
        }
        let added = desks.sessions_added.clone();
        let removed = desks.sessions_removed.clone();
        let viewer_changes = desks.viewer_changes.clone();
        let host = Arc::clone(&self.host);
        let written = {
            let states = states.clone();
            tokio::task::spawn_blocking(move || {
                host.update_own_record(&mut |record| {
                    for (vm, (state, user)) in &states {
                        if let Some(entry) = record.vms.get_mut(vm) {
                            if entry.state != VmState::Failed {
                                entry.state = *state;
                                entry.user = user.clone();
                            }
                        }
                    }
                    for id in &removed {
                        record.sessions.remove(id);
                    }
                    for (id, session) in &added {
                        if record.vms.contains_key(&session.vm) {
                            record.sessions.insert(*id, session.clone());
                        }
                    }
                    for (id, gone) in &viewer_changes {
                        if let Some(session) = record.sessions.get_mut(id) {
                            session.viewer_gone_at_ms = *gone;
                        }
                    }
                })
            })
            .await
        };
        match written {
            Ok(Ok(())) => {
                for (vm, state) in states {
                    if let Some(desk) = desks.vms.get_mut(&vm) {
                        if desk.unwritten.as_ref() == Some(&state) {
                            desk.unwritten = None;
                        }
                    }
                }
                desks.sessions_added.clear();
                desks.sessions_removed.clear();
                desks.viewer_changes.clear();
            }
            Ok(Err(error)) => {
                self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "desktop service: cannot write this server's record; retried at the next tick");
            }
            Err(error) => {
                self.counters.failed_writes.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%error, "desktop service: the record write stopped");
            }
        }
    }

    /// Ends `user`'s reservations and pooled sessions here (an admin's
    /// `deskgrid session logoff`): each through its lifecycle, written at
    /// once. A personal desktop in use is refused: the agent cannot log a
    /// user off yet, and its disk is the owner's.
    async fn log_off(&self, user: UserName) -> Result<u32, ReserveRefusal> {
        let mut desks = self.desks.lock().await;
        let held: Vec<VmId> = desks
            .vms
            .iter()
            .filter(|(_, desk)| desk.lifecycle.holder() == Some(&user))
            .map(|(vm, _)| *vm)
            .collect();
        let mut ended = 0u32;
        let mut refused = None;
        for vm in held {
            let personal_in_use = desks.vms.get(&vm).is_some_and(|desk| {
                desk.lifecycle.kind() == crate::model::TemplateKind::Personal
                    && matches!(desk.lifecycle.phase(), Phase::InUse { .. })
            });
            if personal_in_use {
                // The disk is the owner's: the guest logs the user off,
                // and the agent's Logout ends the session here.
                let asked = desks
                    .vms
                    .get(&vm)
                    .is_some_and(|desk| desk.ask_agent_to_log_off(&user));
                if asked {
                    tracing::info!(%vm, %user, "the guest agent is asked to log the user off");
                    ended += 1;
                } else {
                    refused = Some(vm);
                }
                continue;
            }
            if self.apply(
                &mut desks,
                vm,
                Event::LogOffRequested { user: user.clone() },
            ) {
                ended += 1;
            }
        }
        self.write(&mut desks).await;
        match (ended, refused) {
            (0, Some(vm)) => Err(ReserveRefusal::Failed {
                reason: format!(
                    "{user} is logged in on personal desktop {vm}, whose agent cannot be reached now; try again when it is"
                ),
            }),
            _ => Ok(ended),
        }
    }

    async fn reserve(&self, request: ReserveRequest) -> Result<Reservation, ReserveRefusal> {
        let policy = &self.settings.lifecycle;
        let ttl_ms = policy.reservation_ttl_ms;
        // The lock is held from the decision to the record write.
        let mut desks = self.desks.lock().await;
        let Some(template) = desks.templates.get(&request.template).cloned() else {
            return Err(ReserveRefusal::NoneFree {
                template: request.template,
                preparing: 0,
            });
        };
        let user = request.user.clone();
        let now_ms = self.host.now_ms();

        // A returning user first: a session or reservation they hold (a new
        // ticket, nothing decided), then their personal VM, then any ready
        // VM of the template, in id order (deterministic).
        let of_template = |desk: &DeskVm| desk.template == request.template && !desk.given_up;
        let held = desks
            .vms
            .iter()
            .find(|(_, desk)| of_template(desk) && desk.lifecycle.holder() == Some(&user))
            .map(|(vm, _)| *vm);
        let (vm, returning) = if let Some(vm) = held {
            (vm, true)
        } else {
            let personal = desks
                .vms
                .iter()
                .find(|(_, desk)| {
                    of_template(desk)
                        && desk.lifecycle.owner() == Some(&user)
                        && *desk.lifecycle.phase() == Phase::Ready
                })
                .map(|(vm, _)| *vm);
            let free = || {
                desks
                    .vms
                    .iter()
                    .find(|(_, desk)| {
                        of_template(desk)
                            && *desk.lifecycle.phase() == Phase::Ready
                            && desk.lifecycle.owner().is_none()
                    })
                    .map(|(vm, _)| *vm)
            };
            match personal
                .map(|vm| (vm, true))
                .or_else(|| free().map(|vm| (vm, false)))
            {
                Some(found) => found,
                None => {
                    let preparing = desks
                        .vms
                        .values()
                        .filter(|desk| of_template(desk))
                        .filter(|desk| {
                            matches!(
                                desk.lifecycle.phase(),
                                Phase::Provisioning { .. }
                                    | Phase::Booting { .. }
                                    | Phase::Refreshing
                                    | Phase::Regenerating { .. }
                            )
                        })
                        .count();
                    return Err(ReserveRefusal::NoneFree {
                        template: request.template,
                        preparing: u32::try_from(preparing).unwrap_or(u32::MAX),
                    });
                }
            }
        };

        // Decided on a copy; committed only once the ticket is set.
        let decided = match desks.vms.get(&vm) {
            Some(desk) if !returning || *desk.lifecycle.phase() == Phase::Ready => {
                let mut copy = desk.lifecycle.clone();
                match copy.apply(
                    Event::Reserve {
                        user: user.clone(),
                        now_ms,
                        ttl_ms: Some(ttl_ms),
                    },
                    policy,
                ) {
                    Ok(_) => Some(copy),
                    Err(refusal) => {
                        return Err(ReserveRefusal::Failed {
                            reason: refusal.to_string(),
                        })
                    }
                }
            }
            // A session or reservation the user already holds.
            Some(_) => None,
            None => {
                return Err(ReserveRefusal::Unavailable {
                    reason: "the VM went away".to_owned(),
                })
            }
        };
        // A returning user's reservation keeps its expiry (nothing renews
        // it): the answer and the new ticket say so. A session the user is
        // logged in to outlasts the ticket, which is good for the TTL.
        let current = desks
            .vms
            .get(&vm)
            .map(|desk| desk.lifecycle.phase().clone());
        let expires_at_ms = match (decided.as_ref().map(VmLifecycle::phase), current) {
            (Some(Phase::Reserved { expires_at_ms, .. }), _) => *expires_at_ms,
            (None, Some(Phase::Reserved { expires_at_ms, .. })) => expires_at_ms,
            _ => now_ms.saturating_add(ttl_ms),
        };
        let ticket_ms = expires_at_ms.saturating_sub(now_ms).max(1_000);

        let password = crate::actuator::random_display_password(template.display);
        let hypervisor = Arc::clone(&self.hypervisor);
        let ticket = password.clone();
        let endpoint = tokio::task::spawn_blocking(move || {
            hypervisor.set_display_ticket(vm, &ticket, Duration::from_millis(ticket_ms))
        })
        .await
        .map_err(|error| ReserveRefusal::Failed {
            reason: format!("the ticket task stopped: {error}"),
        })?
        .map_err(|error| ReserveRefusal::Failed {
            reason: crate::error_chain(&error),
        })?;

        if let Some(decided) = decided {
            // Applied for real (the copy told us it is accepted), so its
            // effects (the record state) are carried out as for any event.
            let applied = self.apply(
                &mut desks,
                vm,
                Event::Reserve {
                    user: user.clone(),
                    now_ms,
                    ttl_ms: Some(ttl_ms),
                },
            );
            let matches = desks.vms.get(&vm).map(|desk| &desk.lifecycle) == Some(&decided);
            if !applied || !matches {
                return Err(ReserveRefusal::Failed {
                    reason: "the VM changed while it was reserved".to_owned(),
                });
            }
            self.write(&mut desks).await;
        }
        drop(desks);

        // A display listening everywhere is reached at the server's own
        // address; one bound to a specific address only there.
        let host = match endpoint.listen.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip.to_string(),
            _ => self.host.display_address().to_string(),
        };
        tracing::info!(%vm, user = %request.user, returning, "desktop reserved");
        Ok(Reservation {
            vm,
            template: request.template,
            server: self.host.server_name(),
            protocol: endpoint.protocol,
            host,
            port: endpoint.port,
            password,
            expires_at_ms,
            returning,
        })
    }
}

/// The grid's id of a guest session: the same for the same VM and session
/// name (`tty1`, a logind id), so a logout finds its login.
/// Keeps the service subscribed to the hypervisor's display events: at the
/// start, and again after the connection behind the subscription was lost.
#[derive(Debug, Default)]
struct DisplayWatchKeeper {
    watch: Option<Box<dyn DisplayWatch>>,
    last_attempt: Option<std::time::Instant>,
    failures: u32,
}

impl DisplayWatchKeeper {
    async fn keep(&mut self, shared: &Arc<Shared>) {
        if self.watch.as_ref().is_some_and(|watch| watch.is_alive()) {
            return;
        }
        if self.watch.take().is_some() {
            tracing::warn!(
                "display events stopped (hypervisor connection lost); subscribing again"
            );
        }
        if self
            .last_attempt
            .is_some_and(|at| at.elapsed() < DISPLAY_WATCH_RETRY)
        {
            return;
        }
        self.last_attempt = Some(std::time::Instant::now());
        let hypervisor = Arc::clone(&shared.hypervisor);
        let sender = shared.displays.clone();
        let weak = Arc::downgrade(shared);
        let sink: crate::actuator::DisplaySink = Box::new(move |event| {
            if sender.try_send(event).is_err() {
                if let Some(shared) = weak.upgrade() {
                    shared
                        .counters
                        .display_events_dropped
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        match tokio::task::spawn_blocking(move || hypervisor.watch_displays(sink)).await {
            Ok(Ok(watch)) => {
                self.watch = Some(watch);
                self.failures = 0;
            }
            Ok(Err(error)) => {
                self.failures += 1;
                // Said loudly once, then quietly: the service still works,
                // only disconnected viewers keep their sessions.
                if self.failures == 1 {
                    tracing::warn!(error = %crate::error_chain(&error), retry_s = DISPLAY_WATCH_RETRY.as_secs(), "cannot watch desktop displays: disconnected viewers are not noticed until this works");
                } else {
                    tracing::debug!(error = %crate::error_chain(&error), "still cannot watch desktop displays");
                }
            }
            Err(error) => tracing::error!(%error, "display watch task failed"),
        }
    }
}

fn session_id(vm: VmId, session: &str) -> SessionId {
    let digest = Sha256::new()
        .chain_update(vm.as_bytes())
        .chain_update(session.as_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    SessionId::from_bytes(bytes)
}
