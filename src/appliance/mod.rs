//! The composition root: what `deskgrid serve` starts, in order, and how it
//! stops. Each long-lived component is one field of [`Appliance`].

pub mod config;
pub mod data_dir;

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::api::control_socket;
use crate::service::GridService;
use config::Config;
use data_dir::{DataDir, DataDirLock};

/// How long shutdown waits for in-flight work before it exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// **Test-only fault hook**, never for production: `N` makes this server
/// flip a byte in every Nth image chunk it serves, so tests can show that
/// receivers detect corrupt chunks, fetch them elsewhere and report the
/// holder (`tests/transfer_grid.rs`).
pub const TEST_CORRUPT_CHUNKS_ENV: &str = "DESKGRID_TEST_CORRUPT_CHUNKS";

/// A running appliance.
#[derive(Debug)]
pub struct Appliance {
    /// Keeps every other `deskgrid serve` off this data directory.
    _lock: DataDirLock,
    pub data_dir: DataDir,
    pub config: Config,
    /// The grid state and its durable store, shared by every face.
    pub service: Arc<Mutex<GridService>>,
    /// This server's desktop service as the broker calls it: refuses
    /// (`Unavailable`) until the policy loop has connected to libvirt and
    /// started the service (`service/policy_host.rs::run`).
    pub desk: crate::desktop::reserve::DeskSlot,
}

/// Runs the appliance until SIGTERM or SIGINT, then stops cleanly.
pub async fn serve(data_dir: DataDir) -> anyhow::Result<()> {
    use anyhow::Context as _;

    // Signals are caught from the start: a SIGTERM during start-up must stop
    // the server cleanly, not kill it half-started.
    let mut stop_signals = StopSignals::install()?;
    data_dir.require_initialised()?;
    let config = Config::load(&data_dir.config_file())?;
    tracing::info!(path = %data_dir.config_file().display(), "configuration loaded");
    if in_a_grid(&data_dir) {
        // Before anything is written: a grid member's record must say where
        // the others can dial it.
        config
            .server
            .peer_address()
            .with_context(|| format!("in {}", data_dir.config_file().display()))?;
    }
    let lock = data_dir.lock_exclusive()?;
    let server_id = data_dir.server_id()?;

    let state_dir = data_dir.state_dir();
    let (mut service, _report) =
        tokio::task::spawn_blocking(move || GridService::open(server_id, &state_dir))
            .await
            .context("state recovery stopped")?
            .context("cannot recover the grid state")?;
    // Subscribed before the first write, so the federation sends it too.
    let changes = service.subscribe_changes();
    service
        .publish_own_record(&config)
        .context("cannot record this server in the grid state")?;
    tracing::info!(server = %server_id, name = %config.server.name, "grid state ready");

    let appliance = Appliance {
        _lock: lock,
        data_dir,
        config,
        service: Arc::new(Mutex::new(service)),
        desk: crate::desktop::reserve::DeskSlot::new(),
    };

    let (shutdown_sender, shutdown) = watch::channel(false);
    let host_worker = tokio::spawn(crate::service::host_worker::run(
        appliance.config.libvirt.libvirt_options(),
        Arc::clone(&appliance.service),
        shutdown.clone(),
    ));
    tracing::info!(uri = %appliance.config.libvirt.uri, "host worker started");
    let federation_endpoint = federation_endpoint(&appliance)?;
    // The connection broker: local desktops through `desk`, the
    // others' over the federation's endpoint.
    // Missed reservation deadlines, from the broker to the membership.
    let failure_hints = crate::federation::FailureHints::new();
    let desktops = Arc::new(crate::service::desktops::DesktopAccess::new(
        Arc::clone(&appliance.service),
        appliance.desk.clone(),
        federation_endpoint.clone(),
        failure_hints.clone(),
    ));
    // Before the control socket: once the CLI can reach the server, `deskgrid
    // status` shows where the API listens, and a start that fails here
    // leaves no socket behind.
    let https_api = start_https_api(&appliance, Arc::clone(&desktops), shutdown.clone()).await?;
    let socket_path = appliance.data_dir.control_socket();
    let listener = control_socket::bind(&socket_path)?;
    let control = tokio::spawn(control_socket::serve(
        listener,
        Arc::clone(&appliance.service),
        desktops,
        appliance.data_dir.clone(),
        shutdown.clone(),
    ));
    tracing::info!(path = %socket_path.display(), "control socket listening");
    // Base images between servers: served to peers through the federation,
    // pulled through the same endpoint (a standalone server has none).
    let image_transfer = crate::service::policy_host::ImageTransfer::new(
        Arc::clone(&appliance.service),
        appliance.data_dir.transfer_dir(),
        federation_endpoint.clone(),
        test_corrupt_chunks(),
    );
    let (grid_id, server_id) = {
        let service = lock_service(&appliance.service);
        (service.grid_id(), service.server_id())
    };
    let advertiser = match (&federation_endpoint, grid_id) {
        (Some(_), Some(grid_id)) => advertise(&appliance.config, grid_id, server_id)?,
        _ => None,
    };
    let federation = match federation_endpoint {
        Some(endpoint) => {
            let advertised = appliance.config.server.peer_address()?;
            tracing::info!(listen = %appliance.config.server.listen, %advertised, seeds = appliance.config.server.seeds.len(), "federation listening (QUIC)");
            Some(tokio::spawn(crate::federation::node::run(
                endpoint,
                Arc::new(crate::service::grid::FederatedService(Arc::clone(
                    &appliance.service,
                ))),
                image_transfer.chunk_source(),
                appliance.desk.clone(),
                changes,
                crate::federation::node::NodeSettings::default(),
                advertised,
                appliance.config.server.seeds.clone(),
                failure_hints,
                shutdown.clone(),
            )))
        }
        None => {
            tracing::info!("not in a grid (no grid certificate): running standalone; `deskgrid join` or `init --new-grid` makes a grid member");
            None
        }
    };
    // After the grid identity is loaded: the planner's seed is the grid id.
    let policy = tokio::spawn(crate::service::policy_host::run(
        appliance.config.clone(),
        Arc::clone(&appliance.service),
        image_transfer,
        appliance.desk.clone(),
        shutdown.clone(),
    ));
    tracing::info!("policy worker started (the desktop service starts with it)");
    tracing::info!("deskgrid server running; stop it with SIGTERM or Ctrl-C");

    stop_signals.wait().await;
    tracing::info!("stopping");
    // Receivers only stop listening when they are gone; nothing to handle.
    let _ = shutdown_sender.send(true);
    let stopping = async {
        let _ = control.await;
        if let Some(https_api) = https_api {
            let _ = https_api.await;
        }
        let _ = host_worker.await;
        let _ = policy.await;
        if let Some(federation) = federation {
            let _ = federation.await;
        }
    };
    if tokio::time::timeout(SHUTDOWN_DEADLINE, stopping)
        .await
        .is_err()
    {
        tracing::warn!("workers did not stop within the deadline");
    }
    if let Some(advertiser) = advertiser {
        // Says goodbye on the network; waits at most a second.
        let _ = tokio::task::spawn_blocking(move || drop(advertiser)).await;
    }
    if let Err(error) = std::fs::remove_file(&socket_path) {
        tracing::warn!(path = %socket_path.display(), error = %error, "cannot remove the control socket");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The HTTPS API beside the control socket, as `api.listen` says: its
/// certificate loaded (made on the first start), its address bound, and
/// both in `deskgrid status`. An `"auto"` address that cannot be bound is
/// logged and the server goes on without the API; a configured one stops
/// the start.
async fn start_https_api(
    appliance: &Appliance,
    desktops: Arc<crate::service::desktops::DesktopAccess>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    use crate::api::http;
    use crate::service::ApiStatus;
    use anyhow::Context as _;
    use config::ApiListen;

    let config = &appliance.config;
    let listen = config
        .api
        .listen_address(&config.server)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("in {}", appliance.data_dir.config_file().display()))?;
    let Some(address) = listen.address() else {
        tracing::info!("HTTPS API off (api.listen = \"off\")");
        return Ok(None);
    };
    let mut ips = vec![address.ip(), config.server.listen.ip()];
    ips.extend(config.server.advertise.map(|advertise| advertise.ip()));
    let api_dir = appliance.data_dir.api_dir();
    let certificate = tokio::task::spawn_blocking(move || {
        http::tls::load_or_create(&api_dir, &http::tls::certificate_names(&ips))
    })
    .await
    .context("the API certificate task stopped")?
    .context("cannot set up the HTTPS API's certificate")?;
    if certificate.created {
        tracing::info!(path = %certificate.certificate_file.display(), "made a self-signed API certificate");
    }
    let tls_config = http::tls::server_config(&certificate)?;
    let listener = match http::TlsListener::bind(address, tls_config).await {
        Ok(listener) => listener,
        Err(error) if matches!(listen, ApiListen::Auto(_)) => {
            tracing::error!(%address, error = %error, "cannot listen for the HTTPS API on its automatic address; running without it (set api.listen in config.toml)");
            lock_service(&appliance.service).set_api_status(ApiStatus::Failed {
                address,
                reason: error.to_string(),
            });
            return Ok(None);
        }
        Err(error) => {
            return Err(error)
                .with_context(|| format!("cannot listen for the HTTPS API on {address}"))
        }
    };
    let address = axum::serve::Listener::local_addr(&listener)?;
    tracing::info!(%address, certificate_sha256 = %certificate.fingerprint, "HTTPS API listening");
    lock_service(&appliance.service).set_api_status(ApiStatus::Listening {
        address,
        certificate_sha256: certificate.fingerprint.clone(),
    });
    Ok(Some(tokio::spawn(http::serve(
        listener, desktops, shutdown,
    ))))
}

/// The test-only fault hook from [`TEST_CORRUPT_CHUNKS_ENV`], said loudly.
fn test_corrupt_chunks() -> Option<NonZeroU64> {
    let value = std::env::var(TEST_CORRUPT_CHUNKS_ENV).ok()?;
    match value.parse::<NonZeroU64>() {
        Ok(every) => {
            tracing::warn!(every, "TEST-ONLY fault hook on: a byte of every Nth image chunk served is flipped ({TEST_CORRUPT_CHUNKS_ENV})");
            Some(every)
        }
        Err(_) => {
            tracing::warn!(%value, "{TEST_CORRUPT_CHUNKS_ENV} is not a positive number; ignored");
            None
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => tracing::info!("SIGTERM received"),
            _ = self.interrupt.recv() => tracing::info!("SIGINT received"),
        }
    }
}

fn lock_service(service: &Mutex<GridService>) -> std::sync::MutexGuard<'_, GridService> {
    service
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether this server has a grid identity in `tls/`. Without one it was
/// initialised without --new-grid and never joined: a standalone server.
fn in_a_grid(data_dir: &DataDir) -> bool {
    use crate::federation::identity::TlsFiles;
    let files = TlsFiles::new(data_dir.tls_dir());
    files.ca_certificate_file().exists() || files.server_certificate_file().exists()
}

/// The grid identity from `tls/` and a QUIC endpoint bound with it, or
/// `None` for a server that is in no grid.
fn federation_endpoint(
    appliance: &Appliance,
) -> anyhow::Result<Option<Arc<crate::federation::transport::PeerEndpoint>>> {
    use crate::federation::identity::TlsFiles;
    use crate::federation::transport::{PeerEndpoint, Revocations, TlsMaterial};
    use anyhow::Context as _;

    let files = TlsFiles::new(appliance.data_dir.tls_dir());
    if !in_a_grid(&appliance.data_dir) {
        return Ok(None);
    }
    let loaded = files
        .load()
        .context("cannot load this server's grid identity")?;
    let server_id = appliance.data_dir.server_id()?;
    if loaded.server_id != server_id {
        anyhow::bail!(
            "the certificate in {} is for server {}, but this data directory is server {server_id}",
            appliance.data_dir.tls_dir().display(),
            loaded.server_id
        );
    }
    let material = TlsMaterial {
        ca_cert: loaded.ca_cert_der.clone(),
        cert_chain: loaded.server_certificate_chain(),
        key: loaded.server_private_key(),
    };
    let revocations = Revocations::default();
    revocations.replace_all(lock_service(&appliance.service).revoked_servers());
    let endpoint = PeerEndpoint::bind(appliance.config.server.listen, material, revocations)
        .with_context(|| {
            format!(
                "cannot listen for peers on {}",
                appliance.config.server.listen
            )
        })?;
    if let Some(grid_ca) = loaded.grid_ca {
        lock_service(&appliance.service).set_grid_ca(grid_ca);
    }
    tracing::info!(grid = %loaded.grid_id, "grid identity loaded");
    Ok(Some(Arc::new(endpoint)))
}

/// Announces the grid by mDNS when `server.mdns` asks for it.
fn advertise(
    config: &Config,
    grid_id: crate::model::GridId,
    server_id: crate::model::ServerId,
) -> anyhow::Result<Option<crate::federation::discovery::Advertiser>> {
    let Some(scope) = config::parse_mdns_scope(&config.server.mdns).map_err(anyhow::Error::msg)?
    else {
        return Ok(None);
    };
    let host_name = format!("deskgrid-{}", &server_id.to_string()[..8]);
    match crate::federation::discovery::Advertiser::start(
        &scope,
        grid_id,
        server_id,
        config.server.peer_address()?,
        &host_name,
    ) {
        Ok(advertiser) => {
            tracing::info!(scope = %config.server.mdns, "grid announced by mDNS");
            Ok(Some(advertiser))
        }
        Err(error) => {
            // Discovery is a convenience: the grid works without it.
            tracing::warn!(error = %crate::error_chain(&error), "cannot announce the grid by mDNS");
            Ok(None)
        }
    }
}
