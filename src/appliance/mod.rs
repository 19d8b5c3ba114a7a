//! The composition root: what `deskgrid serve` starts, in order, and how it
//! stops. Each long-lived component is one field of [`Appliance`].

pub mod config;
pub mod data_dir;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::api::control_socket;
use crate::service::GridService;
use config::Config;
use data_dir::{DataDir, DataDirLock};

/// How long shutdown waits for in-flight work before it exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

/// A running appliance.
#[derive(Debug)]
pub struct Appliance {
    /// Keeps every other `deskgrid serve` off this data directory.
    _lock: DataDirLock,
    pub data_dir: DataDir,
    pub config: Config,
    /// The grid state and its durable store, shared by every face.
    pub service: Arc<Mutex<GridService>>,
}

/// Runs the appliance until SIGTERM or SIGINT, then stops cleanly.
pub async fn serve(data_dir: DataDir) -> anyhow::Result<()> {
    use anyhow::Context as _;

    data_dir.require_initialised()?;
    let config = Config::load(&data_dir.config_file())?;
    tracing::info!(path = %data_dir.config_file().display(), "configuration loaded");
    let lock = data_dir.lock_exclusive()?;
    let server_id = data_dir.server_id()?;

    let state_dir = data_dir.state_dir();
    let (mut service, _report) =
        tokio::task::spawn_blocking(move || GridService::open(server_id, &state_dir))
            .await
            .context("state recovery stopped")?
            .context("cannot recover the grid state")?;
    service
        .publish_own_record(&config)
        .context("cannot record this server in the grid state")?;
    tracing::info!(server = %server_id, name = %config.server.name, "grid state ready");

    let appliance = Appliance {
        _lock: lock,
        data_dir,
        config,
        service: Arc::new(Mutex::new(service)),
    };

    let (shutdown_sender, shutdown) = watch::channel(false);
    let socket_path = appliance.data_dir.control_socket();
    let listener = control_socket::bind(&socket_path)?;
    let control = tokio::spawn(control_socket::serve(
        listener,
        Arc::clone(&appliance.service),
        shutdown.clone(),
    ));
    tracing::info!(path = %socket_path.display(), "control socket listening");
    let host_worker = tokio::spawn(crate::service::host_worker::run(
        appliance.config.libvirt.libvirt_options(),
        Arc::clone(&appliance.service),
        shutdown.clone(),
    ));
    tracing::info!(uri = %appliance.config.libvirt.uri, "host worker started");
    tracing::info!("deskgrid server running; stop it with SIGTERM or Ctrl-C");

    wait_for_stop_signal().await?;
    tracing::info!("stopping");
    // Receivers only stop listening when they are gone; nothing to handle.
    let _ = shutdown_sender.send(true);
    let stopping = async {
        let _ = control.await;
        let _ = host_worker.await;
    };
    if tokio::time::timeout(SHUTDOWN_DEADLINE, stopping)
        .await
        .is_err()
    {
        tracing::warn!("workers did not stop within the deadline");
    }
    if let Err(error) = std::fs::remove_file(&socket_path) {
        tracing::warn!(path = %socket_path.display(), error = %error, "cannot remove the control socket");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_stop_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = interrupt.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
