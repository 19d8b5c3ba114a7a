//! The one question the connection broker asks a hosting server: "reserve
//! a desktop of this template for this user". Only the server that hosts a
//! VM decides its reservation (through its [`VmLifecycle`]), so two users
//! can never get the same VM, whatever the network does; the broker only
//! chooses whom to ask, in the connection balancer's order.
//!
//! [`VmLifecycle`]: super::lifecycle::VmLifecycle

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::model::{DisplayProtocol, TemplateName, UserName, VmId};

/// A user asks for a desktop of `template`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReserveRequest {
    pub user: UserName,
    pub template: TemplateName,
}

/// A desktop reserved for a user, and how to reach its display.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub vm: VmId,
    pub template: TemplateName,
    /// Name of the server that hosts the VM.
    pub server: String,
    pub protocol: DisplayProtocol,
    /// Address a viewer dials (the hosting server's display address).
    pub host: String,
    pub port: u16,
    /// The one-time display ticket (SPICE/VNC password).
    pub password: String,
    /// Wall-clock milliseconds after which the ticket and the reservation
    /// lapse unless the user has connected and logged in.
    pub expires_at_ms: u64,
    /// The user already had this desktop (a session or a personal VM).
    pub returning: bool,
}

impl std::fmt::Debug for Reservation {
    /// The ticket never reaches a log.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Reservation")
            .field("vm", &self.vm)
            .field("template", &self.template)
            .field("server", &self.server)
            .field("protocol", &self.protocol)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("password", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("returning", &self.returning)
            .finish()
    }
}

/// Why a hosting server reserved nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ReserveRefusal {
    /// No ready VM of the template here; `preparing` are on their way.
    #[error("no free desktop of template {template} on this server ({preparing} being prepared)")]
    NoneFree {
        template: TemplateName,
        preparing: u32,
    },
    /// The desktop service is not running here (yet).
    #[error("this server does not host desktops right now: {reason}")]
    Unavailable { reason: String },
    /// Something on the host failed (the display ticket could not be set).
    #[error("the desktop could not be prepared: {reason}")]
    Failed { reason: String },
}

/// What [`DesktopDesk::reserve`] resolves to.
pub type ReserveFuture =
    Pin<Box<dyn Future<Output = Result<Reservation, ReserveRefusal>> + Send + 'static>>;

/// What [`DesktopDesk::log_off`] resolves to: how many sessions and
/// reservations were ended.
pub type LogoffFuture = Pin<Box<dyn Future<Output = Result<u32, ReserveRefusal>> + Send + 'static>>;

/// The hosting side of a reservation: this server's desktop service.
pub trait DesktopDesk: Send + Sync + std::fmt::Debug {
    /// Reserves a ready VM of the request's template for its user (or the
    /// user's own session or personal VM, first), sets a one-time display
    /// ticket and says how to connect.
    fn reserve(&self, request: ReserveRequest) -> ReserveFuture;

    /// Ends `user`'s sessions and reservations on this server (the admin's
    /// `deskgrid session logoff`): a reservation is released, a session is
    /// logged off through the guest agent and its desktop refreshed as
    /// after a logout. Answers how many it ended. The default ends nothing
    /// and says so, for a desktop service that cannot yet.
    fn log_off(&self, user: UserName) -> LogoffFuture {
        Box::pin(async move {
            Err(ReserveRefusal::Unavailable {
                reason: format!("this server's desktop service cannot log {user} off yet"),
            })
        })
    }
}

/// This server's [`DesktopDesk`] before and after it exists: the desktop
/// service starts only once the policy loop has its libvirt connection,
/// but the broker (and the peer RPC) can hold this from the start. Until
/// the service is set, every reservation is refused as
/// [`ReserveRefusal::Unavailable`].
#[derive(Debug, Clone, Default)]
pub struct DeskSlot {
    desk: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn DesktopDesk>>>,
}

impl DeskSlot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts the running service in; a second call is ignored (there is one
    /// service per server) and says so with `false`.
    pub fn set(&self, desk: std::sync::Arc<dyn DesktopDesk>) -> bool {
        self.desk.set(desk).is_ok()
    }

    /// The service, once it runs.
    pub fn get(&self) -> Option<std::sync::Arc<dyn DesktopDesk>> {
        self.desk.get().cloned()
    }
}

impl DesktopDesk for DeskSlot {
    fn reserve(&self, request: ReserveRequest) -> ReserveFuture {
        match self.desk.get() {
            Some(desk) => desk.reserve(request),
            None => Box::pin(async {
                Err(ReserveRefusal::Unavailable {
                    reason: "the desktop service has not started (no host connection yet)"
                        .to_owned(),
                })
            }),
        }
    }

    fn log_off(&self, user: UserName) -> LogoffFuture {
        match self.desk.get() {
            Some(desk) => desk.log_off(user),
            None => Box::pin(async {
                Err(ReserveRefusal::Unavailable {
                    reason: "the desktop service has not started (no host connection yet)"
                        .to_owned(),
                })
            }),
        }
    }
}
