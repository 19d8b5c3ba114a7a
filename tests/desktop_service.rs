//! The desktop service (`desktop/service.rs`) on the actuator's fake host:
//! the test plays each guest's agent by writing frames into its channel
//! (`FakeHypervisor::guest_writes`) and reads the outcome in this server's
//! record, as the rest of the grid would. Real agents in real guests:
//! `tests/desktop_qemu.rs`.
//!
//! Timers run on the wall clock with a small `LifecyclePolicy` (the
//! channel readers are threads, outside tokio's virtual time); each test
//! takes well under a second.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deskgrid::actuator::domain_xml::NetworkAttachment;
use deskgrid::actuator::fake::FakeHypervisor;
use deskgrid::actuator::DisplayPhase;
use deskgrid::actuator::{DomainKind, DomainSpec, Hypervisor, VolumeFormat};
use deskgrid::desktop::channels::ChannelLimits;
use deskgrid::desktop::lifecycle::LifecyclePolicy;
use deskgrid::desktop::protocol::{encode, Message, MAX_FRAME_PAYLOAD};
use deskgrid::desktop::reserve::{ReserveRefusal, ReserveRequest};
use deskgrid::desktop::service::{DesktopHost, DesktopService, DesktopSettings, OwnView};
use deskgrid::model::{
    ImageVersionId, Policy, ServerRecord, SessionRecord, SiteLabel, Template, TemplateKind,
    TemplateName, UserName, VmId, VmRecord, VmState,
};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct TestHost {
    record: std::sync::Mutex<ServerRecord>,
    templates: BTreeMap<TemplateName, Template>,
    writes: AtomicU64,
    policy: std::sync::Mutex<Policy>,
}

impl TestHost {
    fn record(&self) -> ServerRecord {
        self.record.lock().unwrap().clone()
    }

    fn vm(&self, vm: VmId) -> VmRecord {
        self.record().vms.get(&vm).cloned().unwrap()
    }
}

impl DesktopHost for TestHost {
    fn server_name(&self) -> String {
        "test-server".to_owned()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    }

    fn own_view(&self) -> Option<OwnView> {
        Some(OwnView {
            record: self.record(),
            templates: self.templates.clone(),
            policy: self.policy.lock().unwrap().clone(),
        })
    }

    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String> {
        let mut record = self.record.lock().unwrap();
        change(&mut record);
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn display_address(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))
    }
}

fn image() -> ImageVersionId {
    ImageVersionId::new("base-1").unwrap()
}

fn office() -> TemplateName {
    TemplateName::new("office").unwrap()
}

fn template_of(kind: TemplateKind) -> Template {
    Template {
        name: office(),
        image: image(),
        vcpus: 1,
        memory_mib: 256,
        desired_vms: 0,
        min_idle_vms: 0,
        min_replicas: 1,
        concurrency_percent: 0,
        kind,
        display: deskgrid::model::DisplayProtocol::Spice,
        monitors: 1,
    }
}

struct Rig {
    host: Arc<TestHost>,
    hypervisor: FakeHypervisor,
    service: DesktopService,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn settings(lifecycle: LifecyclePolicy) -> DesktopSettings {
    DesktopSettings {
        lifecycle,
        limits: ChannelLimits {
            reopen_after: Duration::from_millis(20),
            ..ChannelLimits::default()
        },
        tick: Duration::from_millis(20),
    }
}

fn generous() -> LifecyclePolicy {
    LifecyclePolicy {
        reservation_ttl_ms: 30_000,
        heartbeat_timeout_ms: 60_000,
        disconnect_grace_ms: 60_000,
        boot_timeout_ms: 60_000,
    }
}

/// A service over a fake host with `n_vms` VMs of `office` in the
/// record as `Provisioning`, the first `n_started` of them running.
fn rig(n_vms: u8, n_started: u8, settings: DesktopSettings) -> (Rig, Vec<VmId>) {
    rig_of(TemplateKind::Pooled, n_vms, n_started, settings)
}

/// [`rig`] with a template of `kind`.
fn rig_of(
    kind: TemplateKind,
    n_vms: u8,
    n_started: u8,
    settings: DesktopSettings,
) -> (Rig, Vec<VmId>) {
    let hypervisor = FakeHypervisor::new("deskgrid", 1 << 40, 8, 65_536);
    hypervisor.ensure_pool().unwrap();
    hypervisor
        .create_base_volume(&image(), 1 << 20, VolumeFormat::Qcow2)
        .unwrap();
    let mut record = ServerRecord::new("test-server".into(), Vec::new(), SiteLabel::default(), 0);
    let mut vms = Vec::new();
    for n in 0..n_vms {
        let vm = VmId::from_bytes([n + 1; 16]);
        let volume = hypervisor.create_linked_clone(vm, &image()).unwrap();
        let spec = DomainSpec::for_template(
            &template_of(kind),
            vm,
            DomainKind::Qemu,
            volume.path,
            NetworkAttachment::None,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            "locked".to_owned(),
        );
        hypervisor.define_domain(&spec).unwrap();
        if n < n_started {
            hypervisor.start_domain(vm).unwrap();
        }
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
        vms.push(vm);
    }
    let host = Arc::new(TestHost {
        record: std::sync::Mutex::new(record),
        templates: BTreeMap::from([(office(), template_of(kind))]),
        writes: AtomicU64::new(0),
        policy: std::sync::Mutex::new(Policy::default()),
    });
    let service = DesktopService::new(
        Arc::clone(&host) as Arc<dyn DesktopHost>,
        Arc::new(hypervisor.clone()),
        settings,
    );
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(service.clone().run(shutdown));
    (
        Rig {
            host,
            hypervisor,
            service,
            stop,
            task,
        },
        vms,
    )
}

impl Rig {
    fn says(&self, vm: VmId, message: &Message) {
        self.hypervisor
            .guest_writes(vm, &encode(message).unwrap())
            .unwrap();
    }

    fn hello(&self, vm: VmId) {
        self.says(
            vm,
            &Message::Hello {
                agent_version: "test".into(),
                os: "test OS".into(),
                hostname: "guest".into(),
                vm_uuid: Some(vm.to_string()),
            },
        );
    }

    fn state(&self, vm: VmId) -> (VmState, Option<String>) {
        let entry = self.host.vm(vm);
        (entry.state, entry.user.map(|user| user.to_string()))
    }

    async fn until(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        let start = Instant::now();
        while !done(self) {
            assert!(
                start.elapsed() < WAIT,
                "timed out waiting until {what}: {:?}",
                self.host.record()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `vm`'s agent says hello, `user` reserves it and logs in on tty1.
    async fn logged_in(&self, vm: VmId, user: &str) {
        self.hello(vm);
        self.until_state(vm, VmState::Ready).await;
        self.service.desk().reserve(request(user)).await.unwrap();
        self.says(vm, &login(user, "tty1"));
        self.until_state(vm, VmState::InUse).await;
    }

    async fn until_state(&self, vm: VmId, state: VmState) {
        self.until(&format!("{vm} is {state:?}"), |rig| {
            rig.state(vm).0 == state
        })
        .await;
    }

    /// Stops the service and every fake domain (their readers end).
    async fn finish(self) {
        self.stop.send_replace(true);
        self.task.await.unwrap();
        for domain in self.hypervisor.list_domains().unwrap() {
            let _ = self.hypervisor.destroy_domain(domain.vm);
        }
    }
}

fn login(user: &str, session: &str) -> Message {
    Message::Login {
        user: user.into(),
        session: session.into(),
    }
}

fn logout(user: &str, session: &str) -> Message {
    Message::Logout {
        user: user.into(),
        session: session.into(),
    }
}

fn request(user: &str) -> ReserveRequest {
    ReserveRequest {
        user: UserName::new(user).unwrap(),
        template: office(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_login_logout_flow_into_the_record() {
    let (rig, vms) = rig(1, 1, settings(generous()));
    let vm = vms[0];
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rig.state(vm).0, VmState::Provisioning, "no hello yet");

    rig.hello(vm);
    rig.until_state(vm, VmState::Ready).await;
    rig.says(
        vm,
        &Message::Heartbeat {
            seq: 0,
            uptime_ms: 5,
        },
    );
    rig.until("the heartbeat is acknowledged", |rig| {
        // HelloAck then Ack{0}: the host answers on the channel.
        let bytes = rig.hypervisor.guest_reads(vm).unwrap();
        !bytes.is_empty()
    })
    .await;

    rig.says(vm, &login("alice", "tty1"));
    rig.until_state(vm, VmState::InUse).await;
    let record = rig.host.record();
    assert_eq!(rig.state(vm).1.as_deref(), Some("alice"));
    let sessions: Vec<&SessionRecord> = record.sessions.values().collect();
    assert_eq!(sessions.len(), 1, "one session record: {sessions:?}");
    assert_eq!(sessions[0].vm, vm);
    assert_eq!(sessions[0].user.to_string(), "alice");

    // The guest's list agrees: nothing changes.
    rig.says(
        vm,
        &Message::Sessions {
            users: vec!["alice".into()],
        },
    );
    rig.says(vm, &logout("alice", "tty1"));
    rig.until_state(vm, VmState::Refreshing).await;
    let record = rig.host.record();
    assert_eq!(record.vms[&vm].user, None);
    assert!(
        record.sessions.is_empty(),
        "the session ended: {:?}",
        record.sessions
    );
    assert_eq!(rig.service.counters().invalid_names, 0);

    // The policy loop refreshes it and starts it again: the record goes
    // back to Provisioning, the new agent's hello makes it Ready.
    rig.hypervisor.destroy_domain(vm).unwrap();
    rig.hypervisor.start_domain(vm).unwrap();
    rig.host
        .update_own_record(&mut |record| {
            record.vms.get_mut(&vm).unwrap().state = VmState::Provisioning;
        })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    rig.hello(vm);
    rig.until_state(vm, VmState::Ready).await;
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_agent_or_a_boot_without_hello_fails_the_vm() {
    let policy = LifecyclePolicy {
        heartbeat_timeout_ms: 300,
        boot_timeout_ms: 300,
        ..generous()
    };
    let (rig, vms) = rig(3, 3, settings(policy));
    let (silent, never, alive) = (vms[0], vms[1], vms[2]);
    rig.hello(silent);
    rig.hello(alive);
    rig.until_state(silent, VmState::Ready).await;
    let beating = {
        let hypervisor = rig.hypervisor.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seq = 0;
            while !stopping.load(Ordering::Relaxed) {
                let beat = encode(&Message::Heartbeat {
                    seq,
                    uptime_ms: seq,
                })
                .unwrap();
                if hypervisor.guest_writes(alive, &beat).is_err() {
                    return;
                }
                seq += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        (stop, thread)
    };
    rig.until_state(silent, VmState::Failed).await;
    rig.until_state(never, VmState::Failed).await;
    // Heartbeats keep the third alive well past both timeouts.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rig.state(alive).0, VmState::Ready);
    beating.0.store(true, Ordering::Relaxed);
    beating.1.join().unwrap();
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_reserves_get_one_vm_once_with_a_ticket() {
    let (rig, vms) = rig(1, 1, settings(generous()));
    let vm = vms[0];
    rig.hello(vm);
    rig.until_state(vm, VmState::Ready).await;

    let desk = rig.service.desk();
    let (first, second) =
        tokio::join!(desk.reserve(request("alice")), desk.reserve(request("bob")));
    let (winner, won, lost) = match (first, second) {
        (Ok(won), Err(lost)) => ("alice", won, lost),
        (Err(lost), Ok(won)) => ("bob", won, lost),
        other => panic!("exactly one reservation must succeed: {other:?}"),
    };
    assert_eq!(
        lost,
        ReserveRefusal::NoneFree {
            template: office(),
            preparing: 0
        }
    );
    assert_eq!(won.vm, vm);
    assert_eq!(won.server, "test-server");
    assert!(!won.returning);
    // Listens on 0.0.0.0: reached at the server's address.
    assert_eq!(won.host, "192.0.2.7");
    let (ticket, valid_for) = rig.hypervisor.ticket(vm).unwrap();
    assert_eq!(ticket, won.password);
    assert_eq!(ticket.len(), 32);
    assert_eq!(
        valid_for,
        Duration::from_millis(generous().reservation_ttl_ms)
    );
    let (state, user) = rig.state(vm);
    assert_eq!(state, VmState::Reserved, "published at once");
    assert_eq!(user.as_deref(), Some(winner));

    // The same user again gets the same VM back with a new ticket.
    let again = desk.reserve(request(winner)).await.unwrap();
    assert_eq!(again.vm, vm);
    assert!(again.returning);
    assert_ne!(again.password, won.password);
    assert_eq!(
        again.expires_at_ms, won.expires_at_ms,
        "coming back renews nothing: the reservation's own expiry"
    );
    let (_, again_valid_for) = rig.hypervisor.ticket(vm).unwrap();
    assert!(again_valid_for <= valid_for);

    // An admin's logoff releases the reservation: the VM is free again.
    let loser = if winner == "alice" { "bob" } else { "alice" };
    assert_eq!(
        desk.log_off(UserName::new(loser).unwrap()).await.unwrap(),
        0,
        "holds nothing"
    );
    assert_eq!(
        desk.log_off(UserName::new(winner).unwrap()).await.unwrap(),
        1
    );
    let (state, holder) = rig.state(vm);
    assert_eq!((state, holder), (VmState::Ready, None::<String>));
    let taken = desk.reserve(request(loser)).await.unwrap();
    assert_eq!(taken.vm, vm);
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn none_free_counts_the_vms_being_prepared() {
    // Two booting (one started, one not yet), one ready and taken.
    let (rig, vms) = rig(3, 2, settings(generous()));
    rig.hello(vms[0]);
    rig.until_state(vms[0], VmState::Ready).await;
    let desk = rig.service.desk();
    desk.reserve(request("alice")).await.unwrap();
    let refusal = desk.reserve(request("bob")).await.unwrap_err();
    assert_eq!(
        refusal,
        ReserveRefusal::NoneFree {
            template: office(),
            preparing: 2
        }
    );
    let unknown = desk
        .reserve(ReserveRequest {
            user: UserName::new("bob").unwrap(),
            template: TemplateName::new("cad").unwrap(),
        })
        .await
        .unwrap_err();
    assert!(matches!(
        unknown,
        ReserveRefusal::NoneFree { preparing: 0, .. }
    ));
    rig.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_counted_and_dropped_and_others_are_served() {
    let (rig, vms) = rig(3, 3, settings(generous()));
    let (hostile, honest, odd) = (vms[0], vms[1], vms[2]);
    rig.until("the channels are open", |_| true).await;

    // Claims to be the honest VM.
    rig.says(
        hostile,
        &Message::Hello {
            agent_version: "evil".into(),
            os: "x".into(),
            hostname: "x".into(),
            vm_uuid: Some(honest.to_string()),
        },
    );
    // Garbage: a frame of a length it has, with a payload that is not a
    // message; then a flood of heartbeats; then a length over the limit.
    rig.hypervisor
        .guest_writes(hostile, &[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .unwrap();
    let beat = encode(&Message::Heartbeat {
        seq: 1,
        uptime_ms: 1,
    })
    .unwrap();
    let flood: Vec<u8> = beat
        .iter()
        .copied()
        .cycle()
        .take(beat.len() * 2_000)
        .collect();
    rig.hypervisor.guest_writes(hostile, &flood).unwrap();
    let oversized = u32::try_from(MAX_FRAME_PAYLOAD + 1).unwrap().to_be_bytes();
    rig.hypervisor.guest_writes(hostile, &oversized).unwrap();
    rig.hypervisor.guest_writes(hostile, &[0xff; 64]).unwrap();

    // Another VM's agent with an invalid user name.
    rig.hello(odd);
    rig.says(odd, &login("../../root\n", "tty1"));
    rig.says(
        odd,
        &Message::Sessions {
            users: vec!["bad name!".into()],
        },
    );

    // The honest VM is served all along.
    rig.hello(honest);
    rig.until_state(honest, VmState::Ready).await;
    rig.until_state(odd, VmState::Ready).await;

    let start = Instant::now();
    let counters = loop {
        let counters = rig
            .service
            .channel_counters(hostile)
            .await
            .unwrap_or_default();
        if counters.resets >= 1 || start.elapsed() > WAIT {
            break counters;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        counters.foreign >= 1,
        "the foreign hello counted: {counters:?}"
    );
    assert!(
        counters.bad_frames >= 2,
        "garbage and the oversized length: {counters:?}"
    );
    assert!(
        counters.rate_limited >= 1_000,
        "the flood is limited: {counters:?}"
    );
    assert!(
        counters.resets >= 1,
        "the oversized length resets the channel: {counters:?}"
    );
    assert_eq!(
        counters.messages, 0,
        "nothing of it reached the service: {counters:?}"
    );
    assert_eq!(
        rig.state(hostile).0,
        VmState::Provisioning,
        "never believed"
    );
    rig.until("the invalid names are counted", |rig| {
        rig.service.counters().invalid_names >= 2
    })
    .await;
    assert_eq!(rig.state(odd), (VmState::Ready, None));
    assert!(rig.host.record().sessions.is_empty());

    // Still serving: a reservation gets one of the ready VMs.
    let reservation = rig.service.desk().reserve(request("carol")).await.unwrap();
    assert!([honest, odd].contains(&reservation.vm));
    rig.finish().await;
}

/// Viewer events (libvirt's graphics events; here the fake host raises
/// them): a session whose last authenticated viewer connection closed stays
/// the user's for the grid policy's grace, a reconnect within it keeps it,
/// and once the grace runs out the pooled desktop is logged off and
/// refreshed. Connections that never passed the display password (a port
/// scan) change nothing; a SPICE viewer's several connections count as one
/// viewer until the last one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_viewer_keeps_the_session_for_the_grace_then_the_desktop_is_refreshed() {
    const GRACE: Duration = Duration::from_secs(1);
    let (rig, vms) = rig(1, 1, settings(generous()));
    rig.host.policy.lock().unwrap().disconnect_grace_s = 1;
    let vm = vms[0];
    rig.hello(vm);
    rig.until_state(vm, VmState::Ready).await;
    let reservation = rig.service.desk().reserve(request("alice")).await.unwrap();
    assert_eq!(reservation.vm, vm);

    // A port scan: connected, never authenticated, gone.
    assert_eq!(
        rig.hypervisor
            .display_event(vm, DisplayPhase::Connected, "10.0.0.9:4000"),
        1
    );
    rig.hypervisor
        .display_event(vm, DisplayPhase::Disconnected, "10.0.0.9:4000");
    // Alice's viewer: two connections (SPICE main and display channels).
    for client in ["10.0.0.5:5001", "10.0.0.5:5002"] {
        rig.hypervisor
            .display_event(vm, DisplayPhase::Connected, client);
        rig.hypervisor
            .display_event(vm, DisplayPhase::Authenticated, client);
    }
    rig.says(vm, &login("alice", "tty1"));
    rig.until_state(vm, VmState::InUse).await;
    rig.until("both viewer connections are counted", |_| {
        futures_now(rig.service.viewer_connections(vm)) == 2
    })
    .await;

    // One channel closes: the viewer is still there, the grace never starts.
    rig.hypervisor
        .display_event(vm, DisplayPhase::Disconnected, "10.0.0.5:5001");
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(rig.state(vm), (VmState::InUse, Some("alice".to_owned())));

    // The last one closes, and the viewer comes back within the grace.
    rig.hypervisor
        .display_event(vm, DisplayPhase::Disconnected, "10.0.0.5:5002");
    let viewer_gone = |rig: &Rig| {
        rig.host
            .record()
            .sessions
            .values()
            .find(|session| session.vm == vm)
            .and_then(|session| session.viewer_gone_at_ms)
    };
    rig.until("the session record shows the viewer gone", |rig| {
        viewer_gone(rig).is_some()
    })
    .await;
    rig.hypervisor
        .display_event(vm, DisplayPhase::Authenticated, "10.0.0.7:6001");
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(
        rig.state(vm),
        (VmState::InUse, Some("alice".to_owned())),
        "a reconnect within the grace keeps the session"
    );
    assert_eq!(viewer_gone(&rig), None, "the record shows the viewer back");

    // Gone for good: the grace runs out, the pooled desktop is refreshed.
    let left = Instant::now();
    rig.hypervisor
        .display_event(vm, DisplayPhase::Disconnected, "10.0.0.7:6001");
    rig.until_state(vm, VmState::Refreshing).await;
    assert!(
        left.elapsed() >= GRACE,
        "refreshed {:?} after the disconnect, before the {GRACE:?} grace",
        left.elapsed()
    );
    let record = rig.host.record();
    assert!(record.sessions.is_empty(), "{:?}", record.sessions);
    assert_eq!(record.vms[&vm].user, None);
    assert_eq!(rig.service.viewer_connections(vm).await, 0);
    let counters = rig.service.counters();
    assert_eq!(counters.display_events, 10, "{counters:?}");
    assert_eq!(counters.display_events_dropped, 0, "{counters:?}");
    rig.finish().await;
}

/// A viewer that never authenticates and events for VMs the service does
/// not know change nothing; a disconnect without a viewer starts no grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_or_unknown_display_events_change_nothing() {
    let (rig, vms) = rig(1, 1, settings(generous()));
    rig.host.policy.lock().unwrap().disconnect_grace_s = 0;
    let vm = vms[0];
    rig.logged_in(vm, "bob").await;
    let stranger = VmId::from_bytes([0xee; 16]);
    rig.hypervisor
        .display_event(stranger, DisplayPhase::Authenticated, "10.0.0.1:1");
    rig.hypervisor
        .display_event(stranger, DisplayPhase::Disconnected, "10.0.0.1:1");
    for _ in 0..50 {
        rig.hypervisor
            .display_event(vm, DisplayPhase::Connected, "10.0.0.2:2");
        rig.hypervisor
            .display_event(vm, DisplayPhase::Disconnected, "10.0.0.2:2");
    }
    rig.until("all events are seen", |rig| {
        rig.service.counters().display_events == 102
    })
    .await;
    // Ticks pass with a zero grace: nothing started it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rig.state(vm), (VmState::InUse, Some("bob".to_owned())));
    assert_eq!(rig.service.viewer_connections(vm).await, 0);
    rig.finish().await;
}

/// Polls a future once on the current thread: the service's counters are
/// behind an async lock that is free between its loop turns.
fn futures_now<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

/// A personal desktop whose agent falls silent is restarted on its own
/// disk (its owner's files stay), never recorded `Failed` or handed to the
/// planner for replacement, and is its owner's again once the agent says
/// hello. A restart whose agent never says hello leaves it `Failed`,
/// still with its owner, for the admin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_personal_desktop_is_restarted_on_its_own_disk() {
    let policy = LifecyclePolicy {
        heartbeat_timeout_ms: 300,
        boot_timeout_ms: 400,
        ..generous()
    };
    let (rig, vms) = rig_of(TemplateKind::Personal, 1, 1, settings(policy));
    let vm = vms[0];
    rig.logged_in(vm, "alice").await;
    // Alice's files on the VM's own disk.
    let overlay = deskgrid::actuator::VolumeName::Overlay(vm);
    rig.hypervisor
        .write_volume_at(&overlay, 4096, b"alice's thesis")
        .unwrap();
    let guest_before = rig.hypervisor.guest_reads(vm).unwrap();
    assert!(!guest_before.is_empty(), "the host answered the agent");

    // The agent falls silent: the VM is restarted, shown as provisioning
    // for its owner meanwhile, never failed.
    let mut seen = std::collections::BTreeSet::new();
    rig.until("the VM was restarted and waits for its agent", |rig| {
        seen.insert(rig.state(vm));
        rig.state(vm) == (VmState::Provisioning, Some("alice".to_owned()))
    })
    .await;
    assert!(
        !seen.iter().any(|(state, _)| *state == VmState::Failed),
        "{seen:?}"
    );
    rig.until("the restarted domain runs", |rig| {
        rig.hypervisor.domain_state(vm).ok() == Some(deskgrid::actuator::DomainState::Running)
    })
    .await;
    // The new boot's agent says hello: alice's desktop again, her files there.
    tokio::time::sleep(Duration::from_millis(50)).await;
    rig.hello(vm);
    rig.until_state(vm, VmState::Ready).await;
    assert_eq!(rig.state(vm), (VmState::Ready, Some("alice".to_owned())));
    assert_eq!(
        rig.hypervisor.read_volume_at(&overlay, 4096, 14).unwrap(),
        b"alice's thesis"
    );
    let again = rig.service.desk().reserve(request("alice")).await.unwrap();
    assert_eq!(again.vm, vm);
    assert!(matches!(
        rig.service.desk().reserve(request("bob")).await,
        Err(ReserveRefusal::NoneFree { .. })
    ));

    // Down again, and the restart's agent never says hello: failed for
    // good, still alice's (her disk is not the planner's to replace).
    rig.hypervisor.destroy_domain(vm).unwrap();
    rig.until_state(vm, VmState::Failed).await;
    assert_eq!(rig.state(vm).1.as_deref(), Some("alice"));
    rig.finish().await;
}

/// An admin's logoff of a user on a personal desktop: the disk is the
/// owner's, so the VM is not refreshed; the guest agent is asked to log the
/// user off (a `LogOff` frame on the channel), and the agent's `Logout`
/// ends the session: the desktop is ready again for its owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_logoff_on_a_personal_desktop_goes_through_the_agent() {
    use deskgrid::desktop::protocol::FrameDecoder;
    let (rig, vms) = rig_of(TemplateKind::Personal, 1, 1, settings(generous()));
    let vm = vms[0];
    rig.logged_in(vm, "alice").await;
    // What the host said so far (HelloAck); the LogOff comes after.
    let _ = rig.hypervisor.guest_reads(vm).unwrap();

    let ended = rig
        .service
        .desk()
        .log_off(UserName::new("alice").unwrap())
        .await
        .unwrap();
    assert_eq!(ended, 1);
    // The reader sends it after the agent's next frame (a heartbeat).
    let mut decoder = FrameDecoder::new();
    let mut to_guest = Vec::new();
    rig.until("the LogOff reaches the guest", |rig| {
        rig.says(
            vm,
            &Message::Heartbeat {
                seq: 1,
                uptime_ms: 1,
            },
        );
        decoder.push(&rig.hypervisor.guest_reads(vm).unwrap());
        while let Some(message) = decoder.next_message() {
            to_guest.push(message.unwrap());
        }
        to_guest.contains(&Message::LogOff {
            user: "alice".into(),
        })
    })
    .await;
    assert_eq!(
        rig.state(vm),
        (VmState::InUse, Some("alice".to_owned())),
        "the guest is the truth: in use until the agent says she left"
    );
    rig.says(vm, &logout("alice", "tty1"));
    rig.until_state(vm, VmState::Ready).await;
    assert_eq!(
        rig.state(vm).1.as_deref(),
        Some("alice"),
        "still her desktop"
    );
    rig.finish().await;
}
