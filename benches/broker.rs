//! The connection broker alone: logins per second and p50/p99 latency from
//! request to connection details, with 1,000 ready VMs across three
//! in-process servers on loopback QUIC (mutual TLS) and desks that reserve
//! at once. Two placements: most reservations remote (another server has
//! the most ready VMs, so the balancer picks it) and all local; the gap is
//! the peer RPC's cost. Password checking is measured separately, with the
//! real argon2id parameters, and the logins run both with a stand-in check
//! (the broker's own cost) and with real argon2 (what a user meets). A
//! third run connects with session tokens, as a portal does after one login
//! through the HTTPS API: the token looked up in the API's `SessionStore`,
//! then `connect_authenticated` (no password check; the user and their
//! entitlements checked against the snapshot). HTTP and TLS are left out.
//!
//! `cargo bench --bench broker [-- --logins N --argon2-logins N --token-connects N --concurrency C]`
//!
//! The hosting side here is a minimal `PeerHandler` that decodes the
//! request, asks the desk and encodes the answer: the federation's own
//! handler also checks the asker is not removed (one lock of the state on
//! the blocking pool), which this leaves out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use deskgrid::api::http::sessions::{SessionStore, SessionToken, TOKEN_BYTES};
use deskgrid::desktop::broker::{
    BrokerHost, BrokerSettings, BrokerSnapshot, ConnectRequest, ConnectionBroker, FederationDesks,
    Password,
};
use deskgrid::desktop::{DeskSlot, DesktopDesk, Reservation, ReserveFuture, ReserveRequest};
use deskgrid::federation::identity::GridCa;
use deskgrid::federation::protocol::{self, PeerRequest, PeerResponse};
use deskgrid::federation::transport::{
    BoxFuture, PeerEndpoint, PeerHandler, PeerIdentity, Revocations, TlsMaterial,
};
use deskgrid::model::{
    DisplayProtocol, Entitlement, EntitlementSubject, GridId, ImageVersionId, Role, ServerId,
    ServerRecord, SiteLabel, Template, TemplateName, User, UserName, VmId, VmRecord, VmState,
};
use deskgrid::placement::Liveness;
use deskgrid::state::{ConfigValue, GridState, HlcClock};

const USERS: usize = 1_000;
const PASSWORD: &str = "a benchmark password";

#[derive(Debug)]
struct InstantDesk {
    name: String,
}

impl DesktopDesk for InstantDesk {
    fn reserve(&self, request: ReserveRequest) -> ReserveFuture {
        let server = self.name.clone();
        Box::pin(async move {
            Ok(Reservation {
                vm: VmId::random(),
                template: request.template,
                server,
                protocol: DisplayProtocol::Spice,
                host: "127.0.0.1".to_owned(),
                port: 5900,
                password: "0123456789abcdef".to_owned(),
                expires_at_ms: 0,
                returning: false,
            })
        })
    }
}

/// The hosting side: decode, ask the desk, encode.
struct DeskHandler {
    desk: Arc<InstantDesk>,
}

impl PeerHandler for DeskHandler {
    fn handle_request(&self, _peer: PeerIdentity, request: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let desk = Arc::clone(&self.desk);
        Box::pin(async move {
            let answer = match protocol::decode::<PeerRequest>(&request) {
                Ok(PeerRequest::Reserve(request)) => match desk.reserve(request).await {
                    Ok(reservation) => PeerResponse::Reserved(Box::new(reservation)),
                    Err(refusal) => PeerResponse::ReserveRefused(refusal),
                },
                _ => PeerResponse::Refused {
                    reason: "not a reservation".to_owned(),
                },
            };
            protocol::encode(&answer)
        })
    }

    fn handle_datagram(&self, _peer: ServerId, _datagram: bytes::Bytes) {}
}

struct BenchHost {
    snapshot: Arc<BrokerSnapshot>,
    real_argon2: bool,
    phc: String,
}

impl BrokerHost for BenchHost {
    fn snapshot(&self) -> Arc<BrokerSnapshot> {
        Arc::clone(&self.snapshot)
    }
    fn verify_password(&self, password: &str, phc: Option<&str>) -> bool {
        if self.real_argon2 {
            deskgrid::service::accounts::verify_password(password, phc.unwrap_or(&self.phc))
        } else {
            password == PASSWORD && phc.is_some()
        }
    }
    fn report_unresponsive(&self, server: ServerId) {
        eprintln!("unresponsive: {server}");
    }
    fn wake_policy(&self) {}
}

fn endpoint(ca: &GridCa, id: ServerId) -> anyhow::Result<Arc<PeerEndpoint>> {
    let (key, certificate) = ca.issue_for_self(id)?;
    let material = TlsMaterial {
        ca_cert: ca.certificate_der(),
        cert_chain: vec![certificate.der],
        key: key.private_key_der(),
    };
    Ok(Arc::new(PeerEndpoint::bind(
        "127.0.0.1:0".parse()?,
        material,
        Revocations::default(),
    )?))
}

/// The grid: `ready[i]` ready VMs on server i, every user entitled.
fn grid_state(
    servers: &[(ServerId, SocketAddr)],
    ready: &[u32],
    phc: &str,
) -> anyhow::Result<GridState> {
    let mut state = GridState::new();
    let mut clock = HlcClock::new();
    let origin = servers[0].0;
    let template = TemplateName::new("office")?;
    let image = ImageVersionId::new("base-1")?;
    let mut put = |state: &mut GridState, value| -> anyhow::Result<()> {
        let hlc = clock.tick(1);
        state.put_config(origin, hlc, value)?;
        Ok(())
    };
    put(
        &mut state,
        ConfigValue::Template(Template {
            name: template.clone(),
            image: image.clone(),
            vcpus: 2,
            memory_mib: 2048,
            desired_vms: 1_000,
            min_idle_vms: 0,
            min_replicas: 1,
            concurrency_percent: 0,
            kind: deskgrid::model::TemplateKind::Pooled,
            display: DisplayProtocol::Spice,
            monitors: 1,
        }),
    )?;
    for index in 0..USERS {
        let name = UserName::new(format!("user{index}"))?;
        put(
            &mut state,
            ConfigValue::User(User {
                name: name.clone(),
                display_name: String::new(),
                password_hash: phc.to_owned(),
                role: Role::User,
                groups: Vec::new(),
            }),
        )?;
        put(
            &mut state,
            ConfigValue::Entitlement(Entitlement {
                subject: EntitlementSubject::User(name),
                template: template.clone(),
            }),
        )?;
    }
    for ((id, address), ready) in servers.iter().zip(ready) {
        let mut record = ServerRecord::new(
            format!("server-{address}"),
            vec![address.to_string()],
            SiteLabel::default(),
            1,
        );
        for _ in 0..*ready {
            let vm = VmId::random();
            record.vms.insert(
                vm,
                VmRecord {
                    id: vm,
                    template: template.clone(),
                    image: image.clone(),
                    state: VmState::Ready,
                    user: None,
                    vcpus: 2,
                    memory_mib: 2048,
                },
            );
        }
        let hlc = clock.tick(2);
        // Each server's record as if it wrote it.
        let mut own = GridState::new();
        let delta = own.update_server(*id, hlc, record)?;
        state.apply_delta(&delta)?;
    }
    Ok(state)
}

struct Figures {
    logins_per_s: f64,
    p50: Duration,
    p99: Duration,
    remote_share: f64,
}

/// How each connect proves who it is.
#[derive(Clone)]
enum Credentials {
    /// The password, checked by the broker (stand-in or argon2id, as the
    /// host says).
    Password,
    /// A session token issued at an earlier login, one per user.
    Token {
        sessions: Arc<std::sync::Mutex<SessionStore>>,
        tokens: Arc<Vec<SessionToken>>,
    },
}

impl Credentials {
    /// One token per user, issued as `POST /api/v1/login` does.
    fn tokens() -> anyhow::Result<Self> {
        let mut store = SessionStore::default();
        let mut tokens = Vec::new();
        for index in 0..USERS {
            let mut random = [0u8; TOKEN_BYTES];
            rand::Rng::fill(&mut rand::rng(), &mut random[..]);
            let token = SessionToken::from_random(random);
            store.issue(&token, UserName::new(format!("user{index}"))?, 1_000);
            tokens.push(token);
        }
        Ok(Self::Token {
            sessions: Arc::new(std::sync::Mutex::new(store)),
            tokens: Arc::new(tokens),
        })
    }
}

async fn connect_once(
    broker: &ConnectionBroker,
    credentials: &Credentials,
    index: usize,
) -> anyhow::Result<Reservation> {
    let user = UserName::new(format!("user{}", index % USERS))?;
    let answer = match credentials {
        Credentials::Password => {
            let request = ConnectRequest {
                user,
                password: Password::new(PASSWORD.to_owned()),
                template: None,
                client_site: None,
                source: format!("client-{index}"),
            };
            broker.connect(request, 1_000).await
        }
        Credentials::Token { sessions, tokens } => {
            let user = sessions
                .lock()
                .map_err(|_| anyhow::anyhow!("session store poisoned"))?
                .user(&tokens[index % USERS], 2_000)
                .context("an issued token is unknown")?;
            broker.connect_authenticated(&user, None, None).await
        }
    };
    answer.map_err(|error| anyhow::anyhow!("login failed: {error}"))
}

async fn run_logins(
    broker: Arc<ConnectionBroker>,
    credentials: Credentials,
    local_name: &str,
    logins: usize,
    concurrency: usize,
) -> anyhow::Result<Figures> {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let broker = Arc::clone(&broker);
        let credentials = credentials.clone();
        let next = Arc::clone(&next);
        let local_name = local_name.to_owned();
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut remote = 0usize;
            loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if index >= logins {
                    break;
                }
                let begun = Instant::now();
                let reservation = connect_once(&broker, &credentials, index).await?;
                latencies.push(begun.elapsed());
                if reservation.server != local_name {
                    remote += 1;
                }
            }
            anyhow::Ok((latencies, remote))
        }));
    }
    let mut latencies = Vec::new();
    let mut remote = 0;
    for worker in workers {
        let (mut some, some_remote) = worker.await??;
        latencies.append(&mut some);
        remote += some_remote;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |fraction: f64| {
        latencies[((latencies.len() as f64 * fraction) as usize).min(latencies.len() - 1)]
    };
    Ok(Figures {
        logins_per_s: logins as f64 / elapsed.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        remote_share: remote as f64 / logins as f64,
    })
}

fn argument(name: &str, default: usize) -> anyhow::Result<usize> {
    let arguments: Vec<String> = std::env::args().collect();
    match arguments.iter().position(|argument| argument == name) {
        Some(index) => arguments
            .get(index + 1)
            .with_context(|| format!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} takes a number")),
        None => Ok(default),
    }
}

fn main() -> anyhow::Result<()> {
    let logins = argument("--logins", 5_000)?;
    let concurrency = argument("--concurrency", 32)?;
    // Each costs an argon2id verification: tens of ms of a core.
    let argon2_logins = argument("--argon2-logins", 200)?;
    // Connects with a session token (no password check): as many as logins.
    let token_connects = argument("--token-connects", logins)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        // Argon2 alone, with the parameters `deskgrid user add` uses.
        let phc = deskgrid::service::accounts::hash_password(PASSWORD)?;
        let verifications = 20;
        let begun = Instant::now();
        for _ in 0..verifications {
            assert!(deskgrid::service::accounts::verify_password(PASSWORD, &phc));
        }
        let per_verify = begun.elapsed() / verifications;
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        println!(
            "argon2id verify: {:.1} ms each ({phc_params}); at most {:.0} logins/s on {cores} cores",
            per_verify.as_secs_f64() * 1000.0,
            cores as f64 / per_verify.as_secs_f64(),
            phc_params = phc.split('$').nth(3).unwrap_or("?"),
        );

        let ca = GridCa::create(GridId::random())?;
        let ids: Vec<ServerId> = (0..3).map(|_| ServerId::random()).collect();
        let mut endpoints = Vec::new();
        let mut servers = Vec::new();
        for (index, id) in ids.iter().enumerate() {
            let endpoint = endpoint(&ca, *id)?;
            let address = endpoint.local_addr()?;
            let desk = Arc::new(InstantDesk {
                name: format!("server-{address}"),
            });
            if index > 0 {
                tokio::spawn(Arc::clone(&endpoint).serve(Arc::new(DeskHandler { desk })));
            }
            servers.push((*id, address));
            endpoints.push(endpoint);
        }
        let local_name = format!("server-{}", servers[0].1);
        for (placement, ready) in [
            ("remote", [267u32, 400, 333]),
            ("local", [400u32, 267, 333]),
        ] {
            let state = grid_state(&servers, &ready, &phc)?;
            let snapshot = Arc::new(BrokerSnapshot::new(&state, ids[0], 7, |_| Liveness::Alive));
            for check in ["stand-in", "argon2id", "token"] {
                let host = Arc::new(BenchHost {
                    snapshot: Arc::clone(&snapshot),
                    real_argon2: check == "argon2id",
                    phc: phc.clone(),
                });
                let local = DeskSlot::default();
                let _ = local.set(Arc::new(InstantDesk {
                    name: local_name.clone(),
                }));
                let broker = Arc::new(ConnectionBroker::new(
                    host,
                    local,
                    Arc::new(FederationDesks::new(Some(Arc::clone(&endpoints[0])))),
                    BrokerSettings::default(),
                ));
                let (credentials, count, what) = match check {
                    "token" => (Credentials::tokens()?, token_connects, "connects"),
                    "argon2id" => (Credentials::Password, argon2_logins, "logins"),
                    _ => (Credentials::Password, logins, "logins"),
                };
                // Warm the connections up.
                run_logins(Arc::clone(&broker), credentials.clone(), &local_name, 50, 4).await?;
                let figures =
                    run_logins(broker, credentials, &local_name, count, concurrency).await?;
                let label = if check == "token" {
                    "session token, no password check".to_owned()
                } else {
                    format!("{check} password check")
                };
                println!(
                    "{placement:>6} reservations, {label:>32}: {:>7.0} {what}/s, p50 {:>6.2} ms, p99 {:>6.2} ms ({:.0}% remote, {count} {what}, {concurrency} at once)",
                    figures.logins_per_s,
                    figures.p50.as_secs_f64() * 1000.0,
                    figures.p99.as_secs_f64() * 1000.0,
                    figures.remote_share * 100.0,
                );
            }
        }
        anyhow::Ok(())
    })
}
