//! The service as the desktop service sees it ([`DesktopHost`]): this
//! server's own record, the grid's templates, and the address viewers dial.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::{now_ms, GridService};
use crate::appliance::config::Config;
use crate::desktop::service::{DesktopHost, OwnView};
use crate::model::ServerRecord;

/// [`DesktopHost`] over the [`GridService`].
#[derive(Debug, Clone)]
pub struct ServiceDesktopHost {
    service: Arc<Mutex<GridService>>,
    server_name: String,
    display_address: IpAddr,
}

impl ServiceDesktopHost {
    /// Viewers dial, for a display that listens on every interface, the
    /// hypervisor host's IP when libvirt is elsewhere and its URI names it
    /// (an appliance VM), else `server.advertise`'s IP, else
    /// `server.listen`'s.
    pub fn new(service: Arc<Mutex<GridService>>, config: &Config) -> Self {
        let display_address = config.libvirt.hypervisor_address().unwrap_or_else(|| {
            config
                .server
                .advertise
                .map_or(config.server.listen.ip(), |advertise| advertise.ip())
        });
        Self {
            service,
            server_name: config.server.name.clone(),
            display_address,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GridService> {
        // Writes are durable before they are applied: a panic while holding
        // the lock leaves at worst the state that is on disk.
        self.service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl DesktopHost for ServiceDesktopHost {
    fn server_name(&self) -> String {
        self.server_name.clone()
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn own_view(&self) -> Option<OwnView> {
        let service = self.lock();
        let record = service.state.server(service.server_id())?.clone();
        let templates = service
            .state
            .templates()
            .map(|template| (template.name.clone(), template.clone()))
            .collect::<BTreeMap<_, _>>();
        let policy = service.state.policy();
        Some(OwnView {
            record,
            templates,
            policy,
        })
    }

    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String> {
        self.lock()
            .update_own_record(change)
            .map_err(|error| crate::error_chain(&error))
    }

    fn display_address(&self) -> IpAddr {
        self.display_address
    }
}
