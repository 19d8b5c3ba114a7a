//! The actualization engine: deskgrid's only way to touch its host, through libvirt.
//!
//! The rest of deskgrid sees the [`Hypervisor`] trait. `libvirt.rs` is its
//! real implementation (with `libvirt/events.rs`, the viewer events libvirt
//! raises: the only files that name the `virt` crate),
//! `fake.rs` an in-memory one for fast tests. What libvirt reads and writes as
//! XML is rendered and parsed by pure functions in `domain_xml.rs`; deskgrid's
//! names for volumes and domains live in `naming.rs`, MAC addresses in `mac.rs`.

pub mod domain_xml;
pub mod fake;
pub mod hypervisor;
pub mod libvirt;
pub mod mac;
pub mod naming;

pub use domain_xml::{DomainKind, DomainSpec, VolumeFormat};
pub use hypervisor::{
    ActuatorError, AsyncHypervisor, DisplayEndpoint, DisplayEvent, DisplayPhase, DisplaySink,
    DisplayWatch, DomainState, DomainStatus, GuestChannel, Hypervisor, PoolInfo, ShutdownOutcome,
    VolumeFile, VolumeInfo,
};
pub use naming::VolumeName;

/// A display password nobody knows, as long as the protocol takes (SPICE 32
/// hex characters, VNC the 8 bytes it counts): a new domain's display stays
/// locked with one until the broker sets a one-time ticket, and a one-time
/// ticket is one of these, handed to one user.
pub fn random_display_password(protocol: crate::model::DisplayProtocol) -> String {
    let len = match protocol {
        crate::model::DisplayProtocol::Spice => 32,
        crate::model::DisplayProtocol::Vnc => domain_xml::VNC_PASSWORD_MAX_BYTES,
    };
    let mut password = hex::encode(rand::random::<[u8; 32]>());
    password.truncate(len);
    password
}
