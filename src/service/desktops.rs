//! Desktops for users: the connection broker wired to this server's grid
//! state, its failure detector and its policy loop (`deskgrid connect`,
//! `deskgrid session logoff`). The faces call [`DesktopAccess`]; the
//! broker itself is `desktop::broker`.

use std::sync::{Arc, Mutex, OnceLock};

use super::GridService;
use crate::desktop::broker::{
    BrokerHost, BrokerSettings, BrokerSnapshot, ConnectRequest, ConnectionBroker, FederationDesks,
};
use crate::desktop::DeskSlot;
use crate::federation::PeerEndpoint;
use crate::model::{ServerId, SiteLabel, TemplateName, UserName};

pub use crate::desktop::broker::{ConnectError, LogoffError, LogoffReport, Password};
pub use crate::desktop::Reservation;

/// The broker's view of this server: a state snapshot rebuilt only when
/// the state or the membership view changed.
struct ServiceBrokerHost {
    service: Arc<Mutex<GridService>>,
    hints: crate::federation::FailureHints,
    generation: tokio::sync::watch::Receiver<u64>,
    cached: Mutex<Option<(u64, Arc<BrokerSnapshot>)>>,
}

impl ServiceBrokerHost {
    fn service(&self) -> std::sync::MutexGuard<'_, GridService> {
        // Writes are durable before they are applied: a panic while the
        // lock was held leaves the state as on disk at worst.
        self.service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl BrokerHost for ServiceBrokerHost {
    fn snapshot(&self) -> Arc<BrokerSnapshot> {
        let generation = *self.generation.borrow();
        let mut cached = self
            .cached
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((built_at, snapshot)) = cached.as_ref() {
            if *built_at == generation {
                return Arc::clone(snapshot);
            }
        }
        // Read before the state: a change in between only makes the next
        // login rebuild once more.
        let snapshot = {
            let service = self.service();
            Arc::new(BrokerSnapshot::new(
                service.state(),
                service.server_id(),
                service.policy_seed(),
                |server| service.liveness_of(server),
            ))
        };
        *cached = Some((generation, Arc::clone(&snapshot)));
        snapshot
    }

    fn verify_password(&self, password: &str, phc: Option<&str>) -> bool {
        match phc {
            Some(phc) => super::accounts::verify_password(password, phc),
            None => {
                // The same work for an unknown user, and never a match.
                static STAND_IN: OnceLock<String> = OnceLock::new();
                let stand_in = STAND_IN.get_or_init(|| {
                    super::accounts::hash_password("stand-in for users who do not exist")
                        .unwrap_or_default()
                });
                let _ = super::accounts::verify_password(password, stand_in);
                false
            }
        }
    }

    /// Hands the membership a hint: the server becomes suspect at once
    /// (SWIM's suspicion, gossiped; a live server refutes it).
    fn report_unresponsive(&self, server: ServerId) {
        tracing::warn!(%server, "server missed a reservation deadline; the failure detector is told");
        self.hints.report(server);
    }

    fn wake_policy(&self) {
        self.service().wake_policy();
    }
}

/// `deskgrid connect` and `deskgrid session logoff` on this server.
#[derive(Debug)]
pub struct DesktopAccess {
    broker: ConnectionBroker,
}

impl DesktopAccess {
    /// The broker of this server: `desk` is where the serve process puts
    /// the desktop service (also handed to the federation, which answers
    /// peers' reservations from it); `endpoint` carries reservations to
    /// peers (none for a server in no grid).
    pub fn new(
        service: Arc<Mutex<GridService>>,
        desk: DeskSlot,
        endpoint: Option<Arc<PeerEndpoint>>,
        hints: crate::federation::FailureHints,
    ) -> Self {
        let generation = service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .watch_state();
        let host = ServiceBrokerHost {
            service,
            hints,
            generation,
            cached: Mutex::new(None),
        };
        Self {
            broker: ConnectionBroker::new(
                Arc::new(host),
                desk,
                Arc::new(FederationDesks::new(endpoint)),
                BrokerSettings::default(),
            ),
        }
    }

    /// Logs `user` in and reserves a desktop anywhere in the grid.
    /// `source` names where the login came from, for the rate limits.
    pub async fn connect(
        &self,
        user: UserName,
        password: Password,
        template: Option<TemplateName>,
        client_site: Option<SiteLabel>,
        source: String,
    ) -> Result<Reservation, ConnectError> {
        self.broker
            .connect(
                ConnectRequest {
                    user,
                    password,
                    template,
                    client_site,
                    source,
                },
                super::now_ms(),
            )
            .await
    }

    /// Checks `user`'s password (with the login rate limits; `source` as
    /// for [`DesktopAccess::connect`]) and reserves nothing: the HTTPS API
    /// logs a user in once and then connects with its own session token.
    pub async fn authenticate(
        &self,
        user: &UserName,
        password: &Password,
        source: &str,
    ) -> Result<(), ConnectError> {
        self.broker
            .authenticate(user, password, source, super::now_ms())
            .await
    }

    /// Reserves a desktop for `user`, authenticated earlier by
    /// [`DesktopAccess::authenticate`]: the user must still exist and be
    /// entitled (a deleted user gets [`ConnectError::BadCredentials`]).
    pub async fn connect_authenticated(
        &self,
        user: &UserName,
        template: Option<TemplateName>,
        client_site: Option<SiteLabel>,
    ) -> Result<Reservation, ConnectError> {
        self.broker
            .connect_authenticated(user, template, client_site.as_ref())
            .await
    }

    /// Asks the servers that host `user`'s sessions to end them.
    pub async fn log_off(&self, user: &UserName) -> Result<LogoffReport, LogoffError> {
        self.broker.log_off(user).await
    }
}

/// Why a reservation cannot be written as a `.vv` file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViewerFileError {
    /// A line break would let a peer's text add settings to the file.
    #[error("the reservation's {field} holds a line break; refused")]
    LineBreak { field: &'static str },
}

/// The remote-viewer connection file for `reservation` (virt-viewer's
/// `[virt-viewer]` format). `delete-this-file=1` makes remote-viewer delete
/// it once read: the ticket is single-use anyway.
pub fn viewer_file_text(reservation: &Reservation) -> Result<String, ViewerFileError> {
    let protocol = match reservation.protocol {
        crate::model::DisplayProtocol::Spice => "spice",
        crate::model::DisplayProtocol::Vnc => "vnc",
    };
    let title = format!(
        "{} on {} (deskgrid)",
        reservation.template, reservation.server
    );
    for (field, text) in [
        ("host", reservation.host.as_str()),
        ("password", reservation.password.as_str()),
        ("server", reservation.server.as_str()),
    ] {
        if text.contains(['\n', '\r']) {
            return Err(ViewerFileError::LineBreak { field });
        }
    }
    Ok(format!(
        "[virt-viewer]\ntype={protocol}\nhost={}\nport={}\npassword={}\ndelete-this-file=1\ntitle={title}\n",
        reservation.host, reservation.port, reservation.password
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reservation() -> Reservation {
        Reservation {
            vm: crate::model::VmId::from_bytes([1; 16]),
            template: TemplateName::new("office").expect("valid"),
            server: "host-b".to_owned(),
            protocol: crate::model::DisplayProtocol::Spice,
            host: "10.0.0.2".to_owned(),
            port: 5901,
            password: "t1ck3t".to_owned(),
            expires_at_ms: 0,
            returning: false,
        }
    }

    #[test]
    fn the_viewer_file_is_remote_viewers_format() {
        assert_eq!(
            viewer_file_text(&reservation()).expect("renders"),
            "[virt-viewer]\ntype=spice\nhost=10.0.0.2\nport=5901\npassword=t1ck3t\ndelete-this-file=1\ntitle=office on host-b (deskgrid)\n"
        );
        let mut vnc = reservation();
        vnc.protocol = crate::model::DisplayProtocol::Vnc;
        assert!(viewer_file_text(&vnc)
            .expect("renders")
            .contains("type=vnc\n"));
    }

    #[test]
    fn a_line_break_from_a_peer_cannot_add_settings() {
        let mut hostile = reservation();
        hostile.password = "x\nhost=evil".to_owned();
        assert_eq!(
            viewer_file_text(&hostile),
            Err(ViewerFileError::LineBreak { field: "password" })
        );
    }
}
