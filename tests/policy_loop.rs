//! The policy loop against the in-memory actuator fake, a fake image puller
//! and a fake host holding a real `GridState`: a server that is a step's
//! target does the step and one that is not does nothing; failures are
//! retried with back-off and reported in the server's record; a running job
//! is never started twice; boots are limited; VM creation waits for its
//! image; stopping is bounded.
//!
//! The plans are the tests' own (a small planner over the view, in
//! [`Want`]): these tests are about the loop, not about placement.
//!
//! Time is real, with the loop's timings shrunk to milliseconds
//! ([`settings`]): the loop does its host calls on tokio's blocking pool,
//! where paused virtual time would run ahead of them. Every wait is bounded
//! ([`eventually`]).

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deskgrid::actuator::domain_xml::NetworkAttachment;
use deskgrid::actuator::fake::FakeHypervisor;
use deskgrid::actuator::hypervisor::Progress;
use deskgrid::actuator::{
    ActuatorError, AsyncHypervisor, DisplayEndpoint, DomainKind, DomainSpec, DomainState,
    DomainStatus, GuestChannel, Hypervisor, PoolInfo, ShutdownOutcome, VolumeFormat, VolumeInfo,
    VolumeName,
};
use deskgrid::model::{
    BaseImage, HostCapacity, ImageDigest, ImageHolding, ImageState, ImageVersionId, JobRecord,
    JobState, Policy, ServerId, ServerRecord, SiteLabel, Template, TemplateName, VmId, VmRecord,
    VmState,
};
use deskgrid::placement::{Action, GridView, Liveness, Plan, Reason, Step};
use deskgrid::policy::{
    ImagePuller, NoImageTransfer, PolicyHost, PolicySettings, PolicySnapshot, PolicyWaker,
    PolicyWorker, PullFuture,
};
use deskgrid::state::{ConfigValue, GridState, HlcClock};
use tokio::sync::watch;

const MIB: u64 = 1 << 20;
/// Generous for a loop that plans every 50 ms: a slow CI machine still
/// finishes, a hung loop still fails.
const WAIT_LIMIT: Duration = Duration::from_secs(20);

fn settings() -> PolicySettings {
    PolicySettings {
        debounce: Duration::from_millis(10),
        replan_interval: Duration::from_millis(50),
        first_retry: Duration::from_millis(100),
        max_retry: Duration::from_millis(400),
        max_running_jobs: 16,
        stop_deadline: Duration::from_secs(2),
        // No desktop service (no agents) in these tests.
        ready_on_start: true,
    }
}

fn server(n: u8) -> ServerId {
    ServerId::from_bytes([n; 16])
}

fn image() -> ImageVersionId {
    ImageVersionId::new("base-1").unwrap()
}

fn office() -> TemplateName {
    TemplateName::new("office").unwrap()
}

fn template() -> Template {
    Template {
        name: office(),
        image: image(),
        vcpus: 1,
        memory_mib: 256,
        desired_vms: 0,
        min_idle_vms: 0,
        min_replicas: 1,
        concurrency_percent: 0,
        kind: Default::default(),
        display: Default::default(),
        monitors: 1,
    }
}

// ---------------------------------------------------------------------------
// The grid: one replicated state every fake server shares (a grid whose
// gossip is instant).

#[derive(Debug)]
struct Grid {
    state: GridState,
    clock: HlcClock,
    liveness: BTreeMap<ServerId, Liveness>,
    started: Instant,
}

type SharedGrid = Arc<Mutex<Grid>>;

impl Grid {
    fn now_ms(&self) -> u64 {
        1_700_000_000_000 + self.started.elapsed().as_millis() as u64
    }

    fn write(&mut self, origin: ServerId, value: ConfigValue) {
        let now = self.now_ms();
        let hlc = self.clock.tick(now);
        self.state.put_config(origin, hlc, value).unwrap();
    }

    fn update_record(&mut self, id: ServerId, change: impl FnOnce(&mut ServerRecord)) {
        let mut record = self.state.server(id).unwrap().clone();
        change(&mut record);
        let now = self.now_ms();
        let hlc = self.clock.tick(now);
        self.state.update_server(id, hlc, record).unwrap();
    }
}

/// Servers with records (holding `holding` of the image when given), the
/// template, the image and `policy`.
fn grid(servers: &[ServerId], holding: Option<ImageHolding>, policy: Policy) -> SharedGrid {
    let mut grid = Grid {
        state: GridState::new(),
        clock: HlcClock::new(),
        liveness: BTreeMap::new(),
        started: Instant::now(),
    };
    for (index, id) in servers.iter().enumerate() {
        let mut record = ServerRecord::new(
            format!("server-{index}"),
            vec![format!("192.0.2.{}:7443", index + 1)],
            SiteLabel::default(),
            grid.now_ms(),
        );
        record.capacity = HostCapacity {
            cpus: 8,
            memory_total_mib: 65_536,
            memory_free_mib: 65_536,
            storage_total_bytes: 1 << 40,
            storage_free_bytes: 1 << 40,
        };
        if let Some(holding) = &holding {
            record.images.insert(image(), holding.clone());
        }
        let now = grid.now_ms();
        let hlc = grid.clock.tick(now);
        grid.state.update_server(*id, hlc, record).unwrap();
    }
    let writer = servers[0];
    grid.write(writer, ConfigValue::Template(template()));
    grid.write(
        writer,
        ConfigValue::Image(BaseImage {
            id: image(),
            digest: Some(ImageDigest::from_bytes([7; 32])),
            virtual_size: 16 * MIB,
            parent: None,
            state: ImageState::Ready,
        }),
    );
    grid.write(writer, ConfigValue::Policy(policy));
    Arc::new(Mutex::new(grid))
}

fn lock(grid: &SharedGrid) -> std::sync::MutexGuard<'_, Grid> {
    grid.lock().unwrap()
}

fn record_of(grid: &SharedGrid, id: ServerId) -> ServerRecord {
    lock(grid).state.server(id).unwrap().clone()
}

fn job(grid: &SharedGrid, id: ServerId, key: &str) -> Option<JobRecord> {
    record_of(grid, id)
        .jobs
        .into_iter()
        .find(|job| job.key == key)
}

// ---------------------------------------------------------------------------
// The fake host.

#[derive(Debug)]
struct FakeHost {
    id: ServerId,
    grid: SharedGrid,
    record_writes: AtomicUsize,
}

impl FakeHost {
    fn new(id: ServerId, grid: &SharedGrid) -> Arc<Self> {
        Arc::new(Self {
            id,
            grid: Arc::clone(grid),
            record_writes: AtomicUsize::new(0),
        })
    }
}

impl PolicyHost for FakeHost {
    fn server_id(&self) -> ServerId {
        self.id
    }

    fn seed(&self) -> u64 {
        42
    }

    fn now_ms(&self) -> u64 {
        lock(&self.grid).now_ms()
    }

    fn snapshot(&self) -> PolicySnapshot {
        let grid = lock(&self.grid);
        PolicySnapshot {
            state: grid.state.clone(),
            liveness: grid.liveness.clone(),
        }
    }

    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String> {
        let mut grid = lock(&self.grid);
        let before = grid.state.server(self.id).ok_or("no record")?.clone();
        let mut record = before.clone();
        change(&mut record);
        if record == before {
            return Ok(());
        }
        let now = grid.now_ms();
        let hlc = grid.clock.tick(now);
        grid.state
            .update_server(self.id, hlc, record)
            .map_err(|error| error.to_string())?;
        self.record_writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn domain_spec(&self, template: &Template, vm: VmId, disk_path: String) -> DomainSpec {
        DomainSpec::for_template(
            template,
            vm,
            DomainKind::Qemu,
            disk_path,
            NetworkAttachment::None,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "locked".to_owned(),
        )
    }
}

// ---------------------------------------------------------------------------
// The fake host's hypervisor: the actuator fake, with slow and failing
// starts on demand and a count of starts in progress.

#[derive(Debug)]
struct InstrumentedHypervisor {
    inner: FakeHypervisor,
    start_delay: Mutex<Duration>,
    fail_starts: AtomicBool,
    starting: AtomicUsize,
    max_starting: AtomicUsize,
    start_calls: AtomicUsize,
}

impl InstrumentedHypervisor {
    /// A host with its pool and the base image volume.
    fn with_base_image() -> Arc<Self> {
        let inner = FakeHypervisor::new("deskgrid", 1 << 40, 8, 65_536);
        inner.ensure_pool().unwrap();
        inner
            .create_base_volume(&image(), 16 * MIB, VolumeFormat::Qcow2)
            .unwrap();
        Arc::new(Self {
            inner,
            start_delay: Mutex::new(Duration::ZERO),
            fail_starts: AtomicBool::new(false),
            starting: AtomicUsize::new(0),
            max_starting: AtomicUsize::new(0),
            start_calls: AtomicUsize::new(0),
        })
    }

    fn running_domains(&self) -> usize {
        self.inner
            .list_domains()
            .unwrap()
            .iter()
            .filter(|domain| domain.state == DomainState::Running)
            .count()
    }

    fn overlays(&self) -> usize {
        self.inner
            .list_volumes()
            .unwrap()
            .iter()
            .filter(|volume| matches!(volume.name, VolumeName::Overlay(_)))
            .count()
    }
}

impl Hypervisor for InstrumentedHypervisor {
    fn host_capacity(&self) -> Result<HostCapacity, ActuatorError> {
        self.inner.host_capacity()
    }
    fn ensure_pool(&self) -> Result<PoolInfo, ActuatorError> {
        self.inner.ensure_pool()
    }
    fn create_base_volume(
        &self,
        image: &ImageVersionId,
        capacity_bytes: u64,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, ActuatorError> {
        self.inner.create_base_volume(image, capacity_bytes, format)
    }
    fn import_base_image(
        &self,
        image: &ImageVersionId,
        format: VolumeFormat,
        size: u64,
        source: &mut dyn Read,
        progress: Progress<'_>,
    ) -> Result<VolumeInfo, ActuatorError> {
        self.inner
            .import_base_image(image, format, size, source, progress)
    }
    fn export_volume(
        &self,
        name: &VolumeName,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64, ActuatorError> {
        self.inner.export_volume(name, sink, progress)
    }
    fn write_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ActuatorError> {
        self.inner.write_volume_at(name, offset, data)
    }
    fn create_linked_clone(
        &self,
        vm: VmId,
        base: &ImageVersionId,
    ) -> Result<VolumeInfo, ActuatorError> {
        self.inner.create_linked_clone(vm, base)
    }
    fn delete_volume(&self, name: &VolumeName) -> Result<(), ActuatorError> {
        self.inner.delete_volume(name)
    }
    fn read_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ActuatorError> {
        self.inner.read_volume_at(name, offset, length)
    }
    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ActuatorError> {
        self.inner.list_volumes()
    }
    fn define_domain(&self, spec: &DomainSpec) -> Result<(), ActuatorError> {
        self.inner.define_domain(spec)
    }
    fn start_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        self.start_calls.fetch_add(1, Ordering::SeqCst);
        let now = self.starting.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_starting.fetch_max(now, Ordering::SeqCst);
        // This runs on the blocking pool, as a libvirt call would.
        std::thread::sleep(*self.start_delay.lock().unwrap());
        let result = if self.fail_starts.load(Ordering::SeqCst) {
            Err(ActuatorError::Libvirt {
                operation: "start a domain",
                message: "no memory for the guest".to_owned(),
            })
        } else {
            self.inner.start_domain(vm)
        };
        self.starting.fetch_sub(1, Ordering::SeqCst);
        result
    }
    fn shutdown_domain(
        &self,
        vm: VmId,
        timeout: Duration,
    ) -> Result<ShutdownOutcome, ActuatorError> {
        self.inner.shutdown_domain(vm, timeout)
    }
    fn destroy_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        self.inner.destroy_domain(vm)
    }
    fn undefine_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        self.inner.undefine_domain(vm)
    }
    fn list_domains(&self) -> Result<Vec<DomainStatus>, ActuatorError> {
        self.inner.list_domains()
    }
    fn domain_state(&self, vm: VmId) -> Result<DomainState, ActuatorError> {
        self.inner.domain_state(vm)
    }
    fn set_display_ticket(
        &self,
        vm: VmId,
        password: &str,
        valid_for: Duration,
    ) -> Result<DisplayEndpoint, ActuatorError> {
        self.inner.set_display_ticket(vm, password, valid_for)
    }
    fn open_guest_channel(&self, vm: VmId) -> Result<Box<dyn GuestChannel>, ActuatorError> {
        self.inner.open_guest_channel(vm)
    }
    fn watch_displays(
        &self,
        sink: deskgrid::actuator::DisplaySink,
    ) -> Result<Box<dyn deskgrid::actuator::DisplayWatch>, ActuatorError> {
        self.inner.watch_displays(sink)
    }
}

// ---------------------------------------------------------------------------
// The fake image puller: fails while told to, can be held on a gate, and
// on success writes the base volume into the host's pool.

#[derive(Debug)]
struct FakePuller {
    host: FakeHypervisor,
    fail: AtomicBool,
    gate: watch::Sender<bool>,
    calls: Mutex<Vec<Instant>>,
}

impl FakePuller {
    fn new(host: &InstrumentedHypervisor) -> Arc<Self> {
        Arc::new(Self {
            host: host.inner.clone(),
            fail: AtomicBool::new(false),
            gate: watch::channel(true).0,
            calls: Mutex::new(Vec::new()),
        })
    }

    fn n_calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }
}

impl ImagePuller for FakePuller {
    fn pull(&self, image: &BaseImage) -> PullFuture {
        self.calls.lock().unwrap().push(Instant::now());
        let fail = self.fail.load(Ordering::SeqCst);
        let mut gate = self.gate.subscribe();
        let host = self.host.clone();
        let image = image.clone();
        Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            if fail {
                return Err("source unreachable".to_owned());
            }
            match host.create_base_volume(&image.id, image.virtual_size, VolumeFormat::Qcow2) {
                Ok(_) | Err(ActuatorError::VolumeExists { .. }) => Ok(()),
                Err(error) => Err(error.to_string()),
            }
        })
    }
}

// ---------------------------------------------------------------------------
// The tests' planner: what the test wants, turned into steps against the
// view, so a done step is not planned again (as the real planner does).

#[derive(Debug, Clone)]
enum Want {
    /// `desired` VMs of the template on `target`: creates the deficit.
    Vms { target: ServerId, desired: u32 },
    /// The image on `target`: pulls it while it holds nothing.
    Image { target: ServerId },
    /// No image on `target`: drops it while held.
    NoImage { target: ServerId },
    /// No `vm` on `target`.
    NoVm { target: ServerId, vm: VmId },
    /// This step in every plan, done or not.
    Always(Step),
}

#[derive(Debug, Clone, Default)]
struct TestPlanner {
    wants: Arc<Mutex<Vec<Want>>>,
    rounds: Arc<AtomicUsize>,
}

impl TestPlanner {
    fn new(wants: Vec<Want>) -> Self {
        Self {
            wants: Arc::new(Mutex::new(wants)),
            rounds: Arc::default(),
        }
    }

    fn set(&self, wants: Vec<Want>) {
        *self.wants.lock().unwrap() = wants;
    }

    fn rounds(&self) -> usize {
        self.rounds.load(Ordering::SeqCst)
    }

    fn plan(&self, view: &GridView<'_>) -> Plan {
        self.rounds.fetch_add(1, Ordering::SeqCst);
        let record = |target| view.server(target).unwrap().record;
        let mut steps = Vec::new();
        for want in self.wants.lock().unwrap().iter() {
            match want {
                Want::Vms { target, desired } => {
                    let allocated = record(*target)
                        .vms
                        .values()
                        .filter(|vm| vm.template == office())
                        .count() as u32;
                    if allocated < *desired {
                        steps.push(Step {
                            target: *target,
                            action: Action::CreateVms {
                                template: office(),
                                image: image(),
                                count: desired - allocated,
                            },
                            reason: Reason::Deficit {
                                desired: *desired,
                                allocated,
                            },
                        });
                    }
                }
                Want::Image { target } => {
                    if !record(*target).images.contains_key(&image()) {
                        steps.push(Step {
                            target: *target,
                            action: Action::PullImage { image: image() },
                            reason: Reason::BelowMinReplicas {
                                holders: 0,
                                need: 1,
                            },
                        });
                    }
                }
                Want::NoImage { target } => {
                    if record(*target).images.contains_key(&image()) {
                        steps.push(Step {
                            target: *target,
                            action: Action::DropImage { image: image() },
                            reason: Reason::UnusedImage,
                        });
                    }
                }
                Want::NoVm { target, vm } => {
                    if record(*target).vms.contains_key(vm) {
                        steps.push(Step {
                            target: *target,
                            action: Action::RemoveVm {
                                vm: *vm,
                                template: office(),
                            },
                            reason: Reason::Surplus {
                                desired: 0,
                                allocated: 1,
                            },
                        });
                    }
                }
                Want::Always(step) => steps.push(step.clone()),
            }
        }
        steps.sort();
        Plan {
            steps,
            shortfalls: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Running loops.

struct RunningLoop {
    shutdown: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
    waker: PolicyWaker,
}

fn start(
    host: &Arc<FakeHost>,
    hypervisor: &Arc<InstrumentedHypervisor>,
    puller: Arc<dyn ImagePuller>,
    planner: &TestPlanner,
    settings: PolicySettings,
) -> RunningLoop {
    let planner = planner.clone();
    let worker = PolicyWorker::new(
        Arc::clone(host) as Arc<dyn PolicyHost>,
        AsyncHypervisor::new(Arc::clone(hypervisor) as Arc<dyn Hypervisor>),
        puller,
    )
    .with_planner(Arc::new(move |view: &GridView<'_>, _seed| {
        planner.plan(view)
    }))
    .with_settings(settings);
    let waker = worker.waker();
    let (shutdown, receiver) = watch::channel(false);
    let handle = tokio::spawn(worker.run(receiver));
    RunningLoop {
        shutdown,
        handle,
        waker,
    }
}

impl RunningLoop {
    /// Stops the loop; it must be gone within `limit`.
    async fn stop_within(self, limit: Duration) -> Duration {
        let begun = Instant::now();
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(limit, self.handle)
            .await
            .expect("the loop stops within its deadline")
            .unwrap();
        begun.elapsed()
    }

    async fn stop(self) {
        self.stop_within(Duration::from_secs(5)).await;
    }
}

/// Waits until `condition` holds, at most [`WAIT_LIMIT`].
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let begun = Instant::now();
    while !condition() {
        assert!(
            begun.elapsed() < WAIT_LIMIT,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lets the loop plan at least `rounds` more times.
async fn let_it_plan(planner: &TestPlanner, rounds: usize) {
    let target = planner.rounds() + rounds;
    eventually("the loop planned again", || planner.rounds() >= target).await;
}

fn vms_in(record: &ServerRecord, state: VmState) -> Vec<&VmRecord> {
    record.vms.values().filter(|vm| vm.state == state).collect()
}

// ---------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_does_the_step_and_the_others_do_nothing() {
    let (a, b) = (server(1), server(2));
    let grid = grid(&[a, b], Some(ImageHolding::Complete), Policy::default());
    let hosts = [FakeHost::new(a, &grid), FakeHost::new(b, &grid)];
    let hypervisors = [
        InstrumentedHypervisor::with_base_image(),
        InstrumentedHypervisor::with_base_image(),
    ];
    let planners = [
        TestPlanner::new(vec![Want::Vms {
            target: a,
            desired: 2,
        }]),
        TestPlanner::new(vec![Want::Vms {
            target: a,
            desired: 2,
        }]),
    ];
    let loops: Vec<RunningLoop> = (0..2)
        .map(|index| {
            start(
                &hosts[index],
                &hypervisors[index],
                Arc::new(NoImageTransfer),
                &planners[index],
                settings(),
            )
        })
        .collect();

    eventually("server A has two ready VMs", || {
        vms_in(&record_of(&grid, a), VmState::Ready).len() == 2
    })
    .await;
    // Plans on both servers keep coming; nothing more happens anywhere.
    let_it_plan(&planners[0], 3).await;
    let_it_plan(&planners[1], 3).await;

    let record_a = record_of(&grid, a);
    assert_eq!(record_a.vms.len(), 2, "{:?}", record_a.vms);
    assert_eq!(record_a.jobs, [], "a finished job leaves the record");
    for vm in record_a.vms.values() {
        assert_eq!((vm.vcpus, vm.memory_mib), (1, 256));
        assert_eq!((&vm.template, &vm.image), (&office(), &image()));
        let spec = hypervisors[0].inner.spec(vm.id).unwrap();
        assert_eq!(spec.template, office());
        assert_eq!(
            hypervisors[0].inner.domain_state(vm.id).unwrap(),
            DomainState::Running
        );
    }
    assert_eq!(hypervisors[0].running_domains(), 2);

    let record_b = record_of(&grid, b);
    assert!(record_b.vms.is_empty() && record_b.jobs.is_empty());
    assert_eq!(hypervisors[1].inner.list_domains().unwrap(), []);
    assert_eq!(hypervisors[1].start_calls.load(Ordering::SeqCst), 0);
    assert!(planners[1].rounds() >= 3, "server B planned too");

    for running in loops {
        running.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_pull_is_retried_with_backoff_reported_and_succeeds_when_fixed() {
    let a = server(1);
    let grid = grid(&[a], None, Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    hypervisor
        .inner
        .delete_volume(&VolumeName::Base(image()))
        .unwrap();
    let puller = FakePuller::new(&hypervisor);
    puller.fail.store(true, Ordering::SeqCst);
    let planner = TestPlanner::new(vec![Want::Image { target: a }]);
    let running = start(&host, &hypervisor, puller.clone(), &planner, settings());

    eventually("the pull failed four times", || {
        job(&grid, a, "pull-image:base-1").is_some_and(|job| job.attempts >= 4)
            && puller.n_calls() >= 4
    })
    .await;
    let failed = job(&grid, a, "pull-image:base-1").unwrap();
    assert!(
        matches!(failed.state, JobState::Failed | JobState::Running),
        "{failed:?}"
    );
    assert_eq!(
        failed.last_error.as_deref(),
        Some("cannot pull image base-1: source unreachable")
    );
    assert!(
        failed.summary.starts_with("pull image base-1"),
        "{failed:?}"
    );

    // Back-off: 100, 200, 400 ms between attempts (not the 50 ms replans).
    let calls = puller.calls.lock().unwrap().clone();
    let gaps: Vec<Duration> = calls.windows(2).map(|pair| pair[1] - pair[0]).collect();
    for (index, gap) in gaps.iter().take(3).enumerate() {
        let least = Duration::from_millis(100 << index);
        assert!(
            *gap >= least,
            "gap {index} is {gap:?}, at least {least:?} expected: {gaps:?}"
        );
    }
    // A failed pull that left no volume has nothing to resume: between
    // attempts, no partial copy stays behind to mislead the planners.
    eventually("the pull waits for its back-off", || {
        job(&grid, a, "pull-image:base-1").is_some_and(|job| job.state == JobState::Failed)
    })
    .await;
    assert!(!record_of(&grid, a).images.contains_key(&image()));

    puller.fail.store(false, Ordering::SeqCst);
    eventually("the image is complete and the job gone", || {
        let record = record_of(&grid, a);
        record.images.get(&image()) == Some(&ImageHolding::Complete) && record.jobs.is_empty()
    })
    .await;
    let n_calls = puller.n_calls();
    let_it_plan(&planner, 3).await;
    assert_eq!(
        puller.n_calls(),
        n_calls,
        "a done pull is not planned again"
    );
    assert_eq!(hypervisor.inner.list_volumes().unwrap().len(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_transfer_module_pulls_fail_and_say_why() {
    let a = server(1);
    let grid = grid(&[a], None, Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let planner = TestPlanner::new(vec![Want::Image { target: a }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        settings(),
    );
    eventually("the pull is reported as failing", || {
        job(&grid, a, "pull-image:base-1").is_some_and(|job| {
            job.state == JobState::Failed
                && job.last_error.as_deref()
                    == Some("cannot pull image base-1: image transfer is not available yet")
        })
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_boot_is_cleaned_up_retried_reported_and_succeeds_when_fixed() {
    let a = server(1);
    let grid = grid(&[a], Some(ImageHolding::Complete), Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    hypervisor.fail_starts.store(true, Ordering::SeqCst);
    let planner = TestPlanner::new(vec![Want::Vms {
        target: a,
        desired: 2,
    }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        settings(),
    );

    eventually("creating VMs failed three times", || {
        job(&grid, a, "create-vms:office")
            .is_some_and(|job| job.attempts >= 3 && job.state == JobState::Failed)
    })
    .await;
    let failed = job(&grid, a, "create-vms:office").unwrap();
    let error = failed.last_error.unwrap();
    assert!(
        error.starts_with("2 of 2 VM(s) could not be created: cannot start the domain for VM")
            && error.ends_with("libvirt start a domain failed: no memory for the guest"),
        "{error}"
    );
    // What failed was taken apart again: host and record.
    eventually("nothing is left of the failed VMs", || {
        record_of(&grid, a).vms.is_empty()
            && hypervisor.inner.list_domains().unwrap().is_empty()
            && hypervisor.overlays() == 0
    })
    .await;

    hypervisor.fail_starts.store(false, Ordering::SeqCst);
    eventually("two VMs are ready and the job is gone", || {
        let record = record_of(&grid, a);
        vms_in(&record, VmState::Ready).len() == 2 && record.jobs.is_empty()
    })
    .await;
    assert_eq!(hypervisor.running_domains(), 2);
    assert_eq!(hypervisor.overlays(), 2);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_is_never_started_twice() {
    let a = server(1);
    let grid = grid(&[a], None, Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let puller = FakePuller::new(&hypervisor);
    puller.gate.send_replace(false);
    // Planned in every round, even while the record shows the pull.
    let pull = Step {
        target: a,
        action: Action::PullImage { image: image() },
        reason: Reason::BelowMinReplicas {
            holders: 0,
            need: 1,
        },
    };
    let planner = TestPlanner::new(vec![Want::Always(pull)]);
    let running = start(&host, &hypervisor, puller.clone(), &planner, settings());

    eventually("the pull runs", || puller.n_calls() == 1).await;
    for _ in 0..20 {
        running.waker.state_changed();
    }
    let_it_plan(&planner, 10).await;
    assert_eq!(puller.n_calls(), 1, "one pull, however many plans ask");
    let shown = job(&grid, a, "pull-image:base-1").unwrap();
    assert_eq!((shown.state, shown.attempts), (JobState::Running, 1));
    assert!(matches!(
        record_of(&grid, a).images.get(&image()),
        Some(ImageHolding::Partial { .. })
    ));

    planner.set(Vec::new());
    puller.gate.send_replace(true);
    eventually("the pull finished and left the record", || {
        let record = record_of(&grid, a);
        record.images.get(&image()) == Some(&ImageHolding::Complete) && record.jobs.is_empty()
    })
    .await;
    assert_eq!(puller.n_calls(), 1);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boots_are_limited_by_the_policy() {
    let a = server(1);
    let policy = Policy {
        max_concurrent_boots: 2,
        ..Policy::default()
    };
    let grid = grid(&[a], Some(ImageHolding::Complete), policy);
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    *hypervisor.start_delay.lock().unwrap() = Duration::from_millis(150);
    let planner = TestPlanner::new(vec![Want::Vms {
        target: a,
        desired: 6,
    }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        settings(),
    );

    eventually("six VMs are ready", || {
        vms_in(&record_of(&grid, a), VmState::Ready).len() == 6
    })
    .await;
    assert_eq!(hypervisor.start_calls.load(Ordering::SeqCst), 6);
    assert_eq!(
        hypervisor.max_starting.load(Ordering::SeqCst),
        2,
        "at most two boots at once, and the two slots were used"
    );
    running.stop().await;
}

/// With the desktop service (`ready_on_start` false) a started VM keeps its
/// boot slot until its agent says hello (the service then records it
/// `Ready`): with two slots, the third and fourth VMs start only after the
/// first two are ready, not as soon as their domains were started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_slots_are_held_until_the_agent_says_hello() {
    let a = server(1);
    let policy = Policy {
        max_concurrent_boots: 2,
        ..Policy::default()
    };
    let grid = grid(&[a], Some(ImageHolding::Complete), policy);
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let planner = TestPlanner::new(vec![Want::Vms {
        target: a,
        desired: 4,
    }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        PolicySettings {
            ready_on_start: false,
            ..settings()
        },
    );
    let starts = || hypervisor.start_calls.load(Ordering::SeqCst);

    eventually("two VMs are started", || {
        vms_in(&record_of(&grid, a), VmState::Provisioning).len() >= 2 && starts() == 2
    })
    .await;
    // Their agents have not said hello: no third boot, however long.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(starts(), 2, "the slots are held while the VMs boot");

    // One agent says hello (the desktop service records it ready): one
    // more VM starts, not two.
    // The two whose domains run (the others are in the record, waiting for
    // a slot).
    let booted: Vec<VmId> = hypervisor
        .inner
        .list_domains()
        .unwrap()
        .into_iter()
        .filter(|domain| domain.state == DomainState::Running)
        .map(|domain| domain.vm)
        .collect();
    assert_eq!(booted.len(), 2, "{booted:?}");
    let mark_ready = |vm: VmId| {
        lock(&grid).update_record(a, |record| {
            record.vms.get_mut(&vm).unwrap().state = VmState::Ready;
        });
    };
    mark_ready(booted[0]);
    eventually("a third VM starts", || starts() == 3).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(starts(), 3, "one slot came free, one VM started");
    mark_ready(booted[1]);
    eventually("the fourth VM starts", || starts() == 4).await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_vms_waits_while_the_image_is_partial() {
    let a = server(1);
    let partial = ImageHolding::Partial {
        bytes_done: 4 * MIB,
        bytes_total: 16 * MIB,
    };
    let grid = grid(&[a], Some(partial), Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let planner = TestPlanner::new(vec![Want::Vms {
        target: a,
        desired: 2,
    }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        settings(),
    );

    eventually("the job waits", || {
        job(&grid, a, "create-vms:office").is_some_and(|job| job.state == JobState::Waiting)
    })
    .await;
    let_it_plan(&planner, 5).await;
    let waiting = job(&grid, a, "create-vms:office").unwrap();
    assert_eq!((waiting.state, waiting.attempts), (JobState::Waiting, 0));
    assert!(
        waiting
            .summary
            .ends_with("waits until the image is complete here"),
        "{waiting:?}"
    );
    assert!(record_of(&grid, a).vms.is_empty());
    assert_eq!(hypervisor.start_calls.load(Ordering::SeqCst), 0);

    // The image completes (as a transfer would report it).
    lock(&grid).update_record(a, |record| {
        record.images.insert(image(), ImageHolding::Complete);
    });
    running.waker.state_changed();
    eventually("two VMs are ready", || {
        let record = record_of(&grid, a);
        vms_in(&record, VmState::Ready).len() == 2 && record.jobs.is_empty()
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_and_images_are_removed_but_never_a_vm_in_use() {
    let a = server(1);
    let grid = grid(&[a], Some(ImageHolding::Complete), Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let planner = TestPlanner::new(vec![Want::Vms {
        target: a,
        desired: 2,
    }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        settings(),
    );
    eventually("two VMs are ready", || {
        vms_in(&record_of(&grid, a), VmState::Ready).len() == 2
    })
    .await;
    let vms: Vec<VmId> = record_of(&grid, a).vms.keys().copied().collect();
    // A user logs in to the second VM.
    lock(&grid).update_record(a, |record| {
        let vm = record.vms.get_mut(&vms[1]).unwrap();
        vm.state = VmState::InUse;
        vm.user = Some(deskgrid::model::UserName::new("alice").unwrap());
    });
    planner.set(vec![
        Want::NoVm {
            target: a,
            vm: vms[0],
        },
        Want::NoVm {
            target: a,
            vm: vms[1],
        },
    ]);
    let in_use_key = format!("remove-vm:{}", vms[1]);
    eventually("the idle VM is gone and the one in use refused", || {
        let record = record_of(&grid, a);
        !record.vms.contains_key(&vms[0])
            && job(&grid, a, &in_use_key).is_some_and(|job| job.state == JobState::Failed)
    })
    .await;
    let refused = job(&grid, a, &in_use_key).unwrap();
    assert_eq!(
        refused.last_error,
        Some(format!("VM {} is reserved or in use", vms[1]))
    );
    assert!(hypervisor.inner.spec(vms[0]).is_none());
    assert_eq!(
        hypervisor.inner.domain_state(vms[1]).unwrap(),
        DomainState::Running
    );

    // The user logs out and the VM goes; then the image.
    lock(&grid).update_record(a, |record| {
        let vm = record.vms.get_mut(&vms[1]).unwrap();
        vm.state = VmState::Ready;
        vm.user = None;
    });
    eventually("both VMs are gone", || {
        let record = record_of(&grid, a);
        record.vms.is_empty() && record.jobs.is_empty()
    })
    .await;
    planner.set(vec![Want::NoImage { target: a }]);
    eventually("the image is dropped", || {
        let record = record_of(&grid, a);
        record.images.is_empty() && record.jobs.is_empty()
    })
    .await;
    assert_eq!(hypervisor.inner.list_volumes().unwrap(), []);
    assert_eq!(hypervisor.inner.list_domains().unwrap(), []);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_plan_drops_leaves_the_record() {
    let a = server(1);
    let grid = grid(&[a], None, Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let planner = TestPlanner::new(vec![Want::Image { target: a }]);
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        settings(),
    );
    eventually("the pull fails", || {
        job(&grid, a, "pull-image:base-1").is_some_and(|job| job.state == JobState::Failed)
    })
    .await;
    // The failed pull left a volume (the host has one): its partial copy
    // stays and is resumed while the plan keeps it; a plan that drops the
    // copy ends the pull job too.
    assert!(matches!(
        record_of(&grid, a).images.get(&image()),
        Some(ImageHolding::Partial { .. })
    ));
    eventually("the pull is resumed after its back-off", || {
        job(&grid, a, "pull-image:base-1").is_some_and(|job| job.attempts >= 2)
    })
    .await;
    planner.set(vec![Want::NoImage { target: a }]);
    eventually("the job left the record", || {
        let record = record_of(&grid, a);
        record.jobs.is_empty() && record.images.is_empty()
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_is_bounded_and_leaves_no_job_shown() {
    let a = server(1);
    let grid = grid(&[a], None, Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let puller = FakePuller::new(&hypervisor);
    // A pull that never ends.
    puller.gate.send_replace(false);
    let planner = TestPlanner::new(vec![Want::Image { target: a }]);
    let stop_deadline = Duration::from_millis(300);
    let running = start(
        &host,
        &hypervisor,
        puller.clone(),
        &planner,
        PolicySettings {
            stop_deadline,
            ..settings()
        },
    );
    eventually("the pull runs", || {
        job(&grid, a, "pull-image:base-1").is_some_and(|job| job.state == JobState::Running)
    })
    .await;
    let took = running.stop_within(Duration::from_secs(5)).await;
    assert!(
        took >= stop_deadline,
        "it waited for the job first: {took:?}"
    );
    assert!(record_of(&grid, a).jobs.is_empty());
    assert!(host.record_writes.load(Ordering::SeqCst) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_marks_abandoned_vms_failed_and_resumes_pulls() {
    let a = server(1);
    let grid = grid(
        &[a],
        Some(ImageHolding::Partial {
            bytes_done: 1,
            bytes_total: 2,
        }),
        Policy::default(),
    );
    let vm = VmId::random();
    lock(&grid).update_record(a, |record| {
        record.vms.insert(
            vm,
            VmRecord {
                id: vm,
                template: office(),
                image: image(),
                state: VmState::Provisioning,
                user: None,
                vcpus: 1,
                memory_mib: 256,
            },
        );
        record.jobs.push(JobRecord {
            key: "pull-image:base-1".to_owned(),
            summary: "pull image base-1".to_owned(),
            state: JobState::Running,
            attempts: 1,
            last_error: None,
            updated_at_ms: 0,
        });
    });
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let puller = FakePuller::new(&hypervisor);
    puller.gate.send_replace(false);
    // A planner that asks for nothing: the partial copy counts as a holder.
    let planner = TestPlanner::new(Vec::new());
    let running = start(&host, &hypervisor, puller.clone(), &planner, settings());
    let_it_plan(&planner, 1).await;
    eventually("the interrupted pull is resumed", || puller.n_calls() == 1).await;
    let record = record_of(&grid, a);
    assert_eq!(record.vms[&vm].state, VmState::Failed);
    assert_eq!(
        record.images.get(&image()),
        Some(&ImageHolding::Partial {
            bytes_done: 1,
            bytes_total: 2
        }),
        "the partial copy and its progress are kept"
    );
    let resumed = job(&grid, a, "pull-image:base-1").unwrap();
    assert_eq!((resumed.state, resumed.attempts), (JobState::Running, 1));
    assert!(
        resumed.summary.starts_with("pull image base-1"),
        "{resumed:?}"
    );

    puller.gate.send_replace(true);
    eventually("the resumed pull completes and leaves no job", || {
        let record = record_of(&grid, a);
        record.images.get(&image()) == Some(&ImageHolding::Complete) && record.jobs.is_empty()
    })
    .await;
    let_it_plan(&planner, 3).await;
    assert_eq!(puller.n_calls(), 1, "a complete copy is not pulled again");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asked_to_plan_now_it_plans_at_once() {
    let a = server(1);
    let grid = grid(&[a], Some(ImageHolding::Complete), Policy::default());
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let planner = TestPlanner::new(Vec::new());
    // Only the first, immediate tick of the timer falls within the test.
    let running = start(
        &host,
        &hypervisor,
        Arc::new(NoImageTransfer),
        &planner,
        PolicySettings {
            replan_interval: Duration::from_secs(3600),
            ..settings()
        },
    );
    let_it_plan(&planner, 1).await;
    planner.set(vec![Want::Vms {
        target: a,
        desired: 1,
    }]);
    running.waker.plan_now();
    eventually("the VM is ready", || {
        vms_in(&record_of(&grid, a), VmState::Ready).len() == 1
    })
    .await;
    running.stop().await;
}

/// The real planner drives the loop: a template wanting two desktops gets
/// them on the only holder; when a pooled session ends (the desktop service
/// marks the VM `Refreshing`), the VM gets a fresh disk from the base image,
/// boots again and is ready for the next user, with nothing of the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_planner_fills_the_pool_and_refreshes_a_vm_after_logout() {
    let a = server(1);
    let grid = grid(&[a], Some(ImageHolding::Complete), Policy::default());
    let mut wanted = template();
    wanted.desired_vms = 2;
    lock(&grid).write(a, ConfigValue::Template(wanted));
    let host = FakeHost::new(a, &grid);
    let hypervisor = InstrumentedHypervisor::with_base_image();
    let worker = PolicyWorker::new(
        Arc::clone(&host) as Arc<dyn PolicyHost>,
        AsyncHypervisor::new(Arc::clone(&hypervisor) as Arc<dyn Hypervisor>),
        Arc::new(NoImageTransfer),
    )
    .with_settings(settings());
    let (shutdown, receiver) = watch::channel(false);
    let handle = tokio::spawn(worker.run(receiver));

    eventually("the pool holds two ready desktops", || {
        vms_in(&record_of(&grid, a), VmState::Ready).len() == 2
    })
    .await;
    let vm = *record_of(&grid, a).vms.keys().next().unwrap();
    let overlay = VolumeName::Overlay(vm);
    hypervisor
        .inner
        .write_volume_at(&overlay, 0, b"alice's files")
        .unwrap();
    let starts = hypervisor.start_calls.load(Ordering::SeqCst);

    // Alice logs out of her pooled desktop.
    lock(&grid).update_record(a, |record| {
        let entry = record.vms.get_mut(&vm).unwrap();
        entry.state = VmState::Refreshing;
        entry.user = Some(deskgrid::model::UserName::new("alice").unwrap());
    });
    eventually("the desktop is ready again", || {
        record_of(&grid, a)
            .vms
            .get(&vm)
            .is_some_and(|entry| entry.state == VmState::Ready && entry.user.is_none())
    })
    .await;
    let mut disk = Vec::new();
    hypervisor
        .inner
        .export_volume(&overlay, &mut disk, &mut |_| {})
        .unwrap();
    assert!(
        !disk.starts_with(b"alice's files"),
        "the next user would see the last one's files"
    );
    assert_eq!(hypervisor.start_calls.load(Ordering::SeqCst), starts + 1);
    assert_eq!(hypervisor.running_domains(), 2);
    assert_eq!(record_of(&grid, a).vms.len(), 2, "refreshed, not replaced");

    shutdown.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .unwrap()
        .unwrap();
}
