//! `HostWorker`: keeps this server's record of its host current. Connects to
//! libvirt (retrying with backoff while libvirt is away, so an appliance can
//! start before its host's libvirtd), makes sure the storage pool exists, and
//! publishes the host's capacity into the grid state when it changes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::GridService;
use crate::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use crate::actuator::{ActuatorError, Hypervisor};

/// How often capacity is read again: free memory moves with every desktop
/// started, and the balancers need it within a minute, not a second.
const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Backoff between connection attempts: quick at first, at most a minute.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

/// Runs until `shutdown` turns true.
pub async fn run(
    options: LibvirtOptions,
    service: Arc<Mutex<GridService>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut retry = FIRST_RETRY;
    let host = loop {
        let attempt_options = options.clone();
        let connected =
            tokio::task::spawn_blocking(move || connect_and_prepare(attempt_options)).await;
        match connected {
            Ok(Ok(host)) => break Arc::new(host),
            Ok(Err(error)) => {
                tracing::warn!(uri = %options.uri, error = %crate::error_chain(&error), retry_in = ?retry, "host not ready");
            }
            Err(error) => tracing::error!(error = %error, "host connection task failed"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(MAX_RETRY);
    };

    loop {
        let reading_host = Arc::clone(&host);
        let publishing_service = Arc::clone(&service);
        let outcome = tokio::task::spawn_blocking(move || {
            let capacity = reading_host.host_capacity()?;
            let mut service = publishing_service
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            Ok::<_, anyhow::Error>(service.publish_capacity(capacity)?)
        })
        .await;
        match outcome {
            Ok(Ok(true)) => tracing::debug!("host capacity published"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot publish host capacity")
            }
            Err(error) => tracing::error!(error = %error, "host capacity task failed"),
        }
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(REFRESH_INTERVAL) => {}
        }
    }
}

fn connect_and_prepare(options: LibvirtOptions) -> Result<LibvirtHypervisor, ActuatorError> {
    let host = LibvirtHypervisor::connect(options)?;
    let pool = host.ensure_pool()?;
    tracing::info!(
        pool = %pool.name,
        path = %pool.path,
        available_bytes = pool.available_bytes,
        domain_kind = ?host.domain_kind(),
        "host ready"
    );
    Ok(host)
}
