//! The broker against fake desks and a real `GridState`.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::desktop::DesktopDesk;
use crate::model::{
    DisplayProtocol, Entitlement, Group, ImageVersionId, Role, ServerRecord, User, VmId, VmRecord,
};
use crate::state::HlcClock;

fn server(byte: u8) -> ServerId {
    ServerId::from_bytes([byte; 16])
}

fn name(text: &str) -> UserName {
    UserName::new(text).expect("test names are valid")
}

fn template_name(text: &str) -> TemplateName {
    TemplateName::new(text).expect("test names are valid")
}

/// What a fake desk does when asked.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Reserve,
    NoneFree(u32),
    /// Never answers.
    Hang,
}

#[derive(Debug)]
struct FakeDesk {
    server: ServerId,
    behaviour: Behaviour,
    calls: Arc<Mutex<Vec<ServerId>>>,
}

impl FakeDesk {
    fn answer(&self, request: ReserveRequest) -> ReserveFuture {
        self.calls.lock().expect("test lock").push(self.server);
        let server = self.server;
        let behaviour = self.behaviour;
        Box::pin(async move {
            match behaviour {
                Behaviour::Reserve => Ok(Reservation {
                    vm: VmId::from_bytes([server.as_bytes()[0]; 16]),
                    template: request.template,
                    server: format!("server-{}", server.as_bytes()[0]),
                    protocol: DisplayProtocol::Spice,
                    host: "127.0.0.1".to_owned(),
                    port: 5900,
                    password: "ticket".to_owned(),
                    expires_at_ms: 1,
                    returning: false,
                }),
                Behaviour::NoneFree(preparing) => Err(ReserveRefusal::NoneFree {
                    template: request.template,
                    preparing,
                }),
                Behaviour::Hang => std::future::pending().await,
            }
        })
    }
}

use super::super::reserve::ReserveFuture;

impl DesktopDesk for FakeDesk {
    fn reserve(&self, request: ReserveRequest) -> ReserveFuture {
        self.answer(request)
    }
}

#[derive(Debug, Default)]
struct FakePeers {
    desks: BTreeMap<ServerId, FakeDesk>,
}

impl PeerDesks for FakePeers {
    fn reserve(
        &self,
        server: ServerId,
        _address: SocketAddr,
        request: ReserveRequest,
    ) -> PeerReserveFuture {
        match self.desks.get(&server) {
            Some(desk) => {
                let answer = desk.answer(request);
                Box::pin(async move { answer.await.map_err(PeerDeskError::Refused) })
            }
            None => Box::pin(async { Err(PeerDeskError::Unreachable("no route".to_owned())) }),
        }
    }

    fn log_off(
        &self,
        _server: ServerId,
        _address: SocketAddr,
        _user: UserName,
    ) -> PeerLogoffFuture {
        Box::pin(async { Ok(1) })
    }
}

#[derive(Debug)]
struct FakeHost {
    snapshot: Arc<BrokerSnapshot>,
    unresponsive: Mutex<Vec<ServerId>>,
    wakes: AtomicUsize,
}

impl BrokerHost for FakeHost {
    fn snapshot(&self) -> Arc<BrokerSnapshot> {
        Arc::clone(&self.snapshot)
    }
    /// Stands in for argon2: the "hash" is the password behind the prefix.
    fn verify_password(&self, password: &str, phc: Option<&str>) -> bool {
        phc.and_then(|phc| phc.strip_prefix("$argon2id$test$")) == Some(password)
    }
    fn report_unresponsive(&self, server: ServerId) {
        self.unresponsive.lock().expect("test lock").push(server);
    }
    fn wake_policy(&self) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A grid of servers 1..=n, server `s` with `ready[s-1]` ready VMs of
/// "office"; users alice (entitled directly), bob (through group "staff"),
/// carol (entitled to "office" and "cad"), dave (entitled to nothing).
struct Grid {
    state: GridState,
    clock: HlcClock,
    now: u64,
}

impl Grid {
    fn new(ready: &[u32], preparing_on_last: u32) -> Self {
        let mut grid = Self {
            state: GridState::new(),
            clock: HlcClock::new(),
            now: 1_000,
        };
        let office = crate::model::sample_template("office");
        let cad = crate::model::sample_template("cad");
        grid.put(ConfigValue::Template(office));
        grid.put(ConfigValue::Template(cad));
        for (user, groups) in [
            ("alice", vec![]),
            ("bob", vec![GroupName::new("staff").expect("valid")]),
            ("carol", vec![]),
            ("dave", vec![]),
        ] {
            grid.put(ConfigValue::User(User {
                name: name(user),
                display_name: String::new(),
                password_hash: format!("$argon2id$test${user}-secret"),
                role: Role::User,
                groups,
            }));
        }
        grid.put(ConfigValue::Group(Group {
            name: GroupName::new("staff").expect("valid"),
            description: String::new(),
        }));
        for (subject, template) in [
            (EntitlementSubject::User(name("alice")), "office"),
            (
                EntitlementSubject::Group(GroupName::new("staff").expect("valid")),
                "office",
            ),
            (EntitlementSubject::User(name("carol")), "office"),
            (EntitlementSubject::User(name("carol")), "cad"),
            // An entitlement to a template that does not exist counts for nothing.
            (EntitlementSubject::User(name("dave")), "gone"),
        ] {
            grid.put(ConfigValue::Entitlement(Entitlement {
                subject,
                template: template_name(template),
            }));
        }
        let n = ready.len();
        for (index, ready) in ready.iter().enumerate() {
            let byte = u8::try_from(index + 1).expect("few servers");
            let mut record = ServerRecord::new(
                format!("server-{byte}"),
                vec![format!("127.0.0.{byte}:7443")],
                SiteLabel::default(),
                grid.now,
            );
            let mut vm_byte = 0u8;
            let mut add_vm = |state: VmState| {
                vm_byte += 1;
                let id = VmId::from_bytes([byte.wrapping_mul(16).wrapping_add(vm_byte); 16]);
                record.vms.insert(
                    id,
                    VmRecord {
                        id,
                        template: template_name("office"),
                        image: ImageVersionId::new("base-1").expect("valid"),
                        state,
                        user: None,
                        vcpus: 2,
                        memory_mib: 4096,
                    },
                );
            };
            for _ in 0..*ready {
                add_vm(VmState::Ready);
            }
            if index + 1 == n {
                for _ in 0..preparing_on_last {
                    add_vm(VmState::Provisioning);
                }
            }
            let hlc = grid.clock.tick(grid.now);
            grid.state
                .update_server(server(byte), hlc, record)
                .expect("valid record");
        }
        grid
    }

    fn put(&mut self, value: ConfigValue) {
        self.now += 1;
        let hlc = self.clock.tick(self.now);
        self.state
            .put_config(server(1), hlc, value)
            .expect("valid value");
    }

    /// A broker on server 1: `desks[0]` is its own desk, the others peers.
    fn broker(&self, desks: &[Behaviour]) -> (ConnectionBroker, Arc<FakeHost>, Calls) {
        self.broker_with(desks, BrokerSettings::default())
    }

    fn broker_with(
        &self,
        desks: &[Behaviour],
        settings: BrokerSettings,
    ) -> (ConnectionBroker, Arc<FakeHost>, Calls) {
        let calls: Calls = Arc::default();
        let snapshot = BrokerSnapshot::new(&self.state, server(1), 7, |_| Liveness::Alive);
        let host = Arc::new(FakeHost {
            snapshot: Arc::new(snapshot),
            unresponsive: Mutex::new(Vec::new()),
            wakes: AtomicUsize::new(0),
        });
        let mut peers = FakePeers::default();
        let local = DeskSlot::default();
        for (index, behaviour) in desks.iter().enumerate() {
            let id = server(u8::try_from(index + 1).expect("few servers"));
            let desk = FakeDesk {
                server: id,
                behaviour: *behaviour,
                calls: Arc::clone(&calls),
            };
            if index == 0 {
                assert!(local.set(Arc::new(desk)), "set once");
            } else {
                peers.desks.insert(id, desk);
            }
        }
        let broker = ConnectionBroker::new(
            Arc::clone(&host) as Arc<dyn BrokerHost>,
            local,
            Arc::new(peers),
            settings,
        );
        (broker, host, calls)
    }
}

type Calls = Arc<Mutex<Vec<ServerId>>>;

fn login(user: &str, password: &str, template: Option<&str>) -> ConnectRequest {
    ConnectRequest {
        user: name(user),
        password: Password::new(password.to_owned()),
        template: template.map(template_name),
        client_site: None,
        source: "test".to_owned(),
    }
}

fn called(calls: &Calls) -> Vec<ServerId> {
    calls.lock().expect("test lock").clone()
}

#[tokio::test]
async fn the_ranking_is_followed_and_a_none_free_server_is_skipped() {
    // Server 2 has the most ready VMs, then 3, then 1 (equal load).
    let grid = Grid::new(&[1, 3, 2], 0);
    let snapshot = BrokerSnapshot::new(&grid.state, server(1), 7, |_| Liveness::Alive);
    assert_eq!(
        snapshot
            .index
            .rank(&name("alice"), &template_name("office"), None),
        [server(2), server(3), server(1)]
    );
    let (broker, host, calls) = grid.broker(&[
        Behaviour::Reserve,
        Behaviour::NoneFree(1),
        Behaviour::Reserve,
    ]);
    let reservation = broker
        .connect(login("alice", "alice-secret", None), 10_000)
        .await
        .expect("a desktop");
    assert_eq!(reservation.server, "server-3");
    assert_eq!(
        called(&calls),
        [server(2), server(3)],
        "ranked order, stops at the first yes"
    );
    assert_eq!(host.wakes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_local_desk_answers_for_this_server() {
    let grid = Grid::new(&[3, 1], 0);
    let (broker, _, calls) = grid.broker(&[Behaviour::Reserve, Behaviour::Reserve]);
    let reservation = broker
        .connect(login("alice", "alice-secret", None), 10_000)
        .await
        .expect("a desktop");
    assert_eq!(reservation.server, "server-1");
    assert_eq!(called(&calls), [server(1)]);
}

/// Real time with a short deadline: tokio's paused clock needs its
/// `test-util` feature, which this package does not build with.
#[tokio::test]
async fn an_unresponsive_server_is_reported_and_skipped_after_the_deadline() {
    let grid = Grid::new(&[1, 3, 2], 0);
    let deadline = Duration::from_millis(200);
    let (broker, host, calls) = grid.broker_with(
        &[Behaviour::Reserve, Behaviour::Hang, Behaviour::Reserve],
        BrokerSettings {
            reserve_deadline: deadline,
            ..BrokerSettings::default()
        },
    );
    let started = std::time::Instant::now();
    let reservation = broker
        .connect(login("alice", "alice-secret", None), 10_000)
        .await
        .expect("a desktop from the next server");
    assert_eq!(reservation.server, "server-3");
    assert_eq!(called(&calls), [server(2), server(3)]);
    assert_eq!(*host.unresponsive.lock().expect("test lock"), [server(2)]);
    let waited = started.elapsed();
    // The upper bound only catches a second wait; a loaded machine may
    // take longer than the deadline itself to get back.
    assert!(
        waited >= deadline && waited < deadline * 10,
        "waited {waited:?}"
    );
}

#[tokio::test]
async fn none_free_everywhere_sums_what_is_being_prepared_and_wakes_the_policy() {
    // Server 3 also prepares 2 VMs itself (in its record, not its answer).
    let grid = Grid::new(&[1, 1, 0], 2);
    let (broker, host, calls) = grid.broker(&[
        Behaviour::NoneFree(1),
        Behaviour::NoneFree(3),
        Behaviour::Reserve,
    ]);
    let error = broker
        .connect(login("bob", "bob-secret", None), 10_000)
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ConnectError::NoneFree {
            template: template_name("office"),
            preparing: 6
        }
    );
    assert_eq!(
        error.to_string(),
        "no free desktop of template office: none free, 6 being prepared; try again shortly"
    );
    assert_eq!(
        called(&calls).len(),
        2,
        "server 3 has no ready VM: not asked"
    );
    assert_eq!(host.wakes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn no_ready_vm_anywhere_is_none_free_without_asking() {
    let grid = Grid::new(&[0, 0], 0);
    let (broker, _, calls) = grid.broker(&[Behaviour::Reserve, Behaviour::Reserve]);
    let error = broker
        .connect(login("alice", "alice-secret", None), 10_000)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "no free desktop of template office: none free, 0 being prepared; try again shortly"
    );
    assert!(called(&calls).is_empty());
}

#[tokio::test]
async fn wrong_passwords_and_unknown_users_get_the_same_refusal() {
    let grid = Grid::new(&[1], 0);
    let (broker, _, calls) = grid.broker(&[Behaviour::Reserve]);
    for (user, password) in [
        ("alice", "wrong"),
        ("nobody", "alice-secret"),
        ("alice", ""),
    ] {
        let error = broker
            .connect(login(user, password, None), 10_000)
            .await
            .unwrap_err();
        assert_eq!(error, ConnectError::BadCredentials, "{user}");
        assert_eq!(error.to_string(), "wrong user name or password");
    }
    assert!(called(&calls).is_empty(), "nothing reserved");
}

#[tokio::test]
async fn failed_logins_are_rate_limited_per_user_and_per_source() {
    let grid = Grid::new(&[3], 0);
    let (broker, _, _) = grid.broker(&[Behaviour::Reserve]);
    let mut now = 100_000;
    for _ in 0..LOGIN_FAILURES_ALLOWED {
        now += 1_000;
        assert_eq!(
            broker.connect(login("alice", "wrong", None), now).await,
            Err(ConnectError::BadCredentials)
        );
    }
    // The right password is not even checked now.
    let error = broker
        .connect(login("alice", "alice-secret", None), now + 1_000)
        .await
        .unwrap_err();
    assert_eq!(error, ConnectError::TooManyAttempts { retry_in_s: 55 });
    assert_eq!(error.to_string(), "too many attempts, retry in 55 s");
    // From another source, bob is not limited by alice's user key, but the
    // source "test" is.
    let mut other_source = login("bob", "bob-secret", None);
    other_source.source = "elsewhere".to_owned();
    broker
        .connect(other_source, now + 1_000)
        .await
        .expect("another user from another source");
    assert!(matches!(
        broker
            .connect(login("bob", "bob-secret", None), now + 1_000)
            .await,
        Err(ConnectError::TooManyAttempts { .. })
    ));
    // Once the window has passed the oldest failures, alice may log in.
    broker
        .connect(login("alice", "alice-secret", None), now + 60_000)
        .await
        .expect("the window has moved on");
}

#[test]
fn the_limiter_forgets_on_success_and_bounds_its_keys() {
    let mut limiter = LoginLimiter::new(2, 1_000);
    limiter.record_failure(&["a"], 0);
    limiter.record_failure(&["a"], 10);
    assert_eq!(limiter.check(&["a"], 500), Err(500));
    assert_eq!(
        limiter.check(&["a"], 1_000),
        Ok(()),
        "the first failure left the window"
    );
    limiter.record_failure(&["a"], 2_000);
    limiter.record_failure(&["a"], 2_001);
    limiter.forget("a");
    assert_eq!(limiter.check(&["a"], 2_002), Ok(()));
    for index in 0..MAX_TRACKED_LOGIN_KEYS + 10 {
        limiter.record_failure(&[&format!("user:{index}")], 3_000);
    }
    assert_eq!(limiter.failures.len(), MAX_TRACKED_LOGIN_KEYS);
}

#[tokio::test]
async fn group_entitlements_count_and_a_choice_is_needed_among_several() {
    let grid = Grid::new(&[2], 0);
    let (broker, _, _) = grid.broker(&[Behaviour::Reserve]);
    // bob is entitled through his group.
    let reservation = broker
        .connect(login("bob", "bob-secret", None), 10_000)
        .await
        .expect("entitled through staff");
    assert_eq!(reservation.template, template_name("office"));

    let error = broker
        .connect(login("carol", "carol-secret", None), 10_000)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "user carol is entitled to several templates; choose one with --template: cad, office"
    );
    broker
        .connect(login("carol", "carol-secret", Some("office")), 10_000)
        .await
        .expect("a choice made");
    let error = broker
        .connect(login("bob", "bob-secret", Some("cad")), 10_000)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "user bob is not entitled to template cad (entitled: office)"
    );
    let error = broker
        .connect(login("dave", "dave-secret", None), 10_000)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "user dave is not entitled to any template (an admin grants one with `deskgrid entitle`)"
    );
}

#[tokio::test]
async fn refusals_other_than_none_free_are_listed_by_server() {
    let grid = Grid::new(&[1, 2], 0);
    // Server 2 ranks first and has no peer route; server 1 has no desk.
    let snapshot = BrokerSnapshot::new(&grid.state, server(1), 7, |_| Liveness::Alive);
    let host = Arc::new(FakeHost {
        snapshot: Arc::new(snapshot),
        unresponsive: Mutex::new(Vec::new()),
        wakes: AtomicUsize::new(0),
    });
    let broker = ConnectionBroker::new(
        Arc::clone(&host) as Arc<dyn BrokerHost>,
        DeskSlot::default(),
        Arc::new(FakePeers::default()),
        BrokerSettings::default(),
    );
    let error = broker
        .connect(login("alice", "alice-secret", None), 10_000)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "no desktop of template office could be reserved: none free, 0 being prepared; 2 server(s) failed: server-2: unreachable: no route; server-1: this server's desktop service is not running"
    );
    assert_eq!(*host.unresponsive.lock().expect("test lock"), [server(2)]);
}

#[test]
fn a_password_never_reaches_a_log() {
    let request = login("alice", "alice-secret", None);
    assert!(!format!("{request:?}").contains("alice-secret"));
}

#[tokio::test]
async fn authenticate_checks_once_and_an_authenticated_connect_rechecks_the_user() {
    let grid = Grid::new(&[2], 0);
    let (broker, _, calls) = grid.broker(&[Behaviour::Reserve]);
    let password = |text: &str| Password::new(text.to_owned());
    broker
        .authenticate(&name("alice"), &password("alice-secret"), "portal", 10_000)
        .await
        .expect("the right password");
    assert!(called(&calls).is_empty(), "authenticating reserves nothing");
    for (user, secret) in [("alice", "wrong"), ("nobody", "alice-secret")] {
        assert_eq!(
            broker
                .authenticate(&name(user), &password(secret), "portal", 10_000)
                .await,
            Err(ConnectError::BadCredentials),
            "{user}"
        );
    }
    let reservation = broker
        .connect_authenticated(&name("alice"), None, None)
        .await
        .expect("a desktop without a second password check");
    assert_eq!(reservation.template, template_name("office"));
    // A user deleted since (or never there) gets the login refusal.
    assert_eq!(
        broker
            .connect_authenticated(&name("nobody"), None, None)
            .await,
        Err(ConnectError::BadCredentials)
    );
    // Entitlements are read at connect time.
    assert_eq!(
        broker
            .connect_authenticated(&name("dave"), None, None)
            .await,
        Err(ConnectError::NotEntitled { user: name("dave") })
    );
    assert!(matches!(
        broker
            .connect_authenticated(&name("carol"), None, None)
            .await,
        Err(ConnectError::ChooseTemplate { .. })
    ));
}

#[tokio::test]
async fn authenticating_shares_the_rate_limits_of_logins() {
    let grid = Grid::new(&[1], 0);
    let (broker, _, _) = grid.broker(&[Behaviour::Reserve]);
    let wrong = Password::new("wrong".to_owned());
    for _ in 0..LOGIN_FAILURES_ALLOWED {
        assert_eq!(
            broker
                .authenticate(&name("alice"), &wrong, "10.0.0.9", 10_000)
                .await,
            Err(ConnectError::BadCredentials)
        );
    }
    let right = Password::new("alice-secret".to_owned());
    assert!(matches!(
        broker
            .authenticate(&name("alice"), &right, "10.0.0.9", 10_000)
            .await,
        Err(ConnectError::TooManyAttempts { retry_in_s: 60 })
    ));
}
