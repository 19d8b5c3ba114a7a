//! The `Hypervisor` trait: everything deskgrid asks of its host, in deskgrid's
//! own terms. `libvirt.rs` implements it on a real libvirt connection and
//! `fake.rs` in memory, for fast tests of the code above it.
//!
//! Calls block (libvirt's API is synchronous): async callers go through
//! [`AsyncHypervisor`], which runs each call on tokio's blocking pool so no
//! libvirt call ever stalls an async worker thread.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::domain_xml::{DomainSpec, VolumeFormat};
use super::naming::VolumeName;
use crate::model::{HostCapacity, ImageVersionId, VmId};

/// A volume deskgrid created in its storage pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: VolumeName,
    pub path: String,
    /// Size of the disk the guest sees.
    pub capacity_bytes: u64,
    /// Space the volume takes in the pool.
    pub allocation_bytes: u64,
}

/// The storage pool deskgrid keeps its volumes in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub path: String,
    pub capacity_bytes: u64,
    pub available_bytes: u64,
}

/// What libvirt says a domain is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    Running,
    Paused,
    ShuttingDown,
    ShutOff,
    Crashed,
    Other,
}

/// One of deskgrid's domains, as found on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStatus {
    pub vm: VmId,
    pub template: crate::model::TemplateName,
    pub image: ImageVersionId,
    pub state: DomainState,
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// The guest powered off by itself within the timeout.
    Graceful,
    /// The guest did not stop in time and was destroyed.
    Forced,
    /// It was not running.
    AlreadyOff,
}

/// Where a user connects to a domain's display, once a ticket is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayEndpoint {
    pub protocol: crate::model::DisplayProtocol,
    pub listen: String,
    pub port: u16,
    /// VNC over websocket (for the browser console), when enabled.
    pub websocket_port: Option<u16>,
}

/// A raw volume's file, opened on this host for positioned I/O by callers
/// that do many reads or writes (a pull, a chunk server): the way to the
/// bytes is decided once, and several threads may read and write at once.
/// [`Hypervisor::open_volume_file`] hands it out only where the file holds
/// exactly the bytes the guest sees.
#[derive(Debug)]
pub struct VolumeFile {
    file: File,
    path: String,
    capacity: u64,
}

impl VolumeFile {
    /// `file` at `path`, a raw volume of `capacity` bytes.
    pub fn new(file: File, path: String, capacity: u64) -> Self {
        Self {
            file,
            path,
            capacity,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn check_range(
        &self,
        what: &'static str,
        offset: u64,
        length: u64,
    ) -> Result<(), ActuatorError> {
        match offset.checked_add(length) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(ActuatorError::OutOfBounds {
                what,
                name: self.path.clone(),
                limit: self.capacity,
            }),
        }
    }

    fn error(&self, operation: &'static str) -> impl Fn(std::io::Error) -> ActuatorError + '_ {
        move |source| ActuatorError::VolumeFile {
            operation,
            path: self.path.clone(),
            source,
        }
    }

    /// `length` bytes at `offset`.
    pub fn read_at(&self, offset: u64, length: u64) -> Result<Vec<u8>, ActuatorError> {
        self.check_range("a read", offset, length)?;
        let mut bytes = vec![0u8; usize::try_from(length).unwrap_or(usize::MAX)];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(self.error("a read"))?;
        Ok(bytes)
    }

    /// Writes `data` at `offset`; durable only after [`sync`](Self::sync).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), ActuatorError> {
        self.check_range("a write", offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset)
            .map_err(self.error("a write"))
    }

    /// Makes every write so far durable, whichever thread made it.
    pub fn sync(&self) -> Result<(), ActuatorError> {
        self.file.sync_data().map_err(self.error("a sync"))
    }
}

/// A byte stream to a guest agent's virtio-serial channel.
pub trait GuestChannel: Read + Write + Send + std::fmt::Debug {}

/// What a desktop's display saw of one viewer connection (libvirt's
/// graphics events). A SPICE viewer opens several connections (one per
/// channel); each has its own `client` address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisplayPhase {
    /// A client opened a connection; not yet authenticated (a port scan
    /// looks the same).
    Connected,
    /// The client passed the display password: a viewer is attached.
    Authenticated,
    /// The connection closed.
    Disconnected,
}

/// One graphics event of a deskgrid domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayEvent {
    pub vm: VmId,
    pub phase: DisplayPhase,
    /// The viewer's end of the connection (`address:port`), as the
    /// hypervisor reports it; tells one connection from another.
    pub client: String,
}

/// Where display events go. Called on the hypervisor's event thread: it must
/// return quickly and never block.
pub type DisplaySink = Box<dyn Fn(DisplayEvent) + Send + Sync>;

/// A subscription to display events; dropping it ends it.
pub trait DisplayWatch: Send + std::fmt::Debug {
    /// Whether events still arrive. `false` after the connection to the
    /// hypervisor was lost: subscribe again.
    fn is_alive(&self) -> bool;
}

/// Called with the bytes done so far during long transfers.
pub type Progress<'a> = &'a mut dyn FnMut(u64);

/// Why the host could not do what deskgrid asked.
#[derive(Debug, thiserror::Error)]
pub enum ActuatorError {
    #[error("cannot connect to libvirt at {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("libvirt {operation} failed: {message}")]
    Libvirt {
        operation: &'static str,
        message: String,
    },
    #[error("storage pool {pool} {problem}")]
    Pool { pool: String, problem: String },
    #[error("volume {name} not found in pool {pool}")]
    VolumeNotFound { pool: String, name: String },
    #[error("volume {name} is not deskgrid's: deskgrid only touches volumes it created")]
    NotOurVolume { name: String },
    #[error("volume {name} already exists in pool {pool}")]
    VolumeExists { pool: String, name: String },
    #[error("pool {pool} has {available_bytes} bytes free, {needed_bytes} are needed")]
    PoolFull {
        pool: String,
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error("no domain for VM {vm}")]
    DomainNotFound { vm: VmId },
    #[error("domain of VM {vm} is not running")]
    DomainNotRunning { vm: VmId },
    #[error("{what} of {name} runs past its {limit}-byte size")]
    OutOfBounds {
        what: &'static str,
        name: String,
        limit: u64,
    },
    #[error("libvirt returned XML deskgrid cannot use")]
    Xml(#[from] super::domain_xml::XmlError),
    #[error("stream {operation} of {name} failed")]
    Stream {
        operation: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{operation} of volume file {path} failed")]
    VolumeFile {
        operation: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the host call was cancelled")]
    Cancelled,
}

/// Everything deskgrid does to its host. Implementations are cheap to share
/// between threads; every call blocks until the host has done it.
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// CPUs, memory and pool space, as one record for the state engine.
    fn host_capacity(&self) -> Result<HostCapacity, ActuatorError>;

    /// Creates the configured pool when missing, starts it when inactive.
    fn ensure_pool(&self) -> Result<PoolInfo, ActuatorError>;

    /// Creates an empty base image volume of `capacity_bytes`, to be filled by
    /// [`write_volume_at`](Self::write_volume_at) or an upload.
    fn create_base_volume(
        &self,
        image: &ImageVersionId,
        capacity_bytes: u64,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, ActuatorError>;

    /// Imports a base image from any byte stream of exactly `size` bytes
    /// through a volume upload stream. A failed import leaves no volume behind.
    fn import_base_image(
        &self,
        image: &ImageVersionId,
        format: VolumeFormat,
        size: u64,
        source: &mut dyn Read,
        progress: Progress<'_>,
    ) -> Result<VolumeInfo, ActuatorError>;

    /// Streams a volume's bytes out; returns how many were written.
    fn export_volume(
        &self,
        name: &VolumeName,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64, ActuatorError>;

    /// Reads `length` bytes at `offset` of a volume (serving one chunk).
    fn read_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ActuatorError>;

    /// Writes `data` at `offset` of a volume (chunks arriving out of order).
    fn write_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ActuatorError>;

    /// Makes the bytes [`write_volume_at`](Self::write_volume_at) wrote to
    /// the volume durable: call it before recording them as written.
    ///
    /// The default does nothing, which is right for a host whose writes are
    /// durable when they return (the fake) and for one that offers no way to
    /// sync (libvirt streams); a host that writes through a page cache must
    /// override it, and a wrapper must forward it.
    fn sync_volume(&self, name: &VolumeName) -> Result<(), ActuatorError> {
        let _ = name;
        Ok(())
    }

    /// The volume's file for positioned I/O by one long task, when this host
    /// allows it (see [`VolumeFile`]); `None` means every read and write
    /// goes through [`read_volume_at`](Self::read_volume_at) and
    /// [`write_volume_at`](Self::write_volume_at), one write at a time. The
    /// default says `None`.
    fn open_volume_file(
        &self,
        name: &VolumeName,
        write: bool,
    ) -> Result<Option<VolumeFile>, ActuatorError> {
        let _ = (name, write);
        Ok(None)
    }

    /// A qcow2 overlay for `vm` whose backing store is the base image.
    fn create_linked_clone(
        &self,
        vm: VmId,
        base: &ImageVersionId,
    ) -> Result<VolumeInfo, ActuatorError>;

    /// Deletes one of deskgrid's volumes.
    fn delete_volume(&self, name: &VolumeName) -> Result<(), ActuatorError>;

    /// deskgrid's volumes in the pool (others are never listed).
    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ActuatorError>;

    /// Defines (or redefines) the domain of `spec.vm`; does not start it.
    fn define_domain(&self, spec: &DomainSpec) -> Result<(), ActuatorError>;

    fn start_domain(&self, vm: VmId) -> Result<(), ActuatorError>;

    /// Asks the guest to power off; destroys it after `timeout`.
    fn shutdown_domain(
        &self,
        vm: VmId,
        timeout: Duration,
    ) -> Result<ShutdownOutcome, ActuatorError>;

    /// Powers the domain off at once (no-op when it is off).
    fn destroy_domain(&self, vm: VmId) -> Result<(), ActuatorError>;

    /// Removes the domain definition and its overlay volume (it must be off).
    fn undefine_domain(&self, vm: VmId) -> Result<(), ActuatorError>;

    /// deskgrid's domains on this host, read from their metadata, so a
    /// restarted appliance adopts what it had.
    fn list_domains(&self) -> Result<Vec<DomainStatus>, ActuatorError>;

    fn domain_state(&self, vm: VmId) -> Result<DomainState, ActuatorError>;

    /// Sets a one-time display password valid for `valid_for` on a running
    /// domain and returns where to connect.
    fn set_display_ticket(
        &self,
        vm: VmId,
        password: &str,
        valid_for: Duration,
    ) -> Result<DisplayEndpoint, ActuatorError>;

    /// Opens the guest agent's channel of a running domain.
    fn open_guest_channel(&self, vm: VmId) -> Result<Box<dyn GuestChannel>, ActuatorError>;

    /// Subscribes `sink` to viewer connects and disconnects on every
    /// deskgrid domain of this host, until the returned watch is dropped.
    fn watch_displays(&self, sink: DisplaySink) -> Result<Box<dyn DisplayWatch>, ActuatorError>;
}

/// Runs [`Hypervisor`] calls off the async workers.
#[derive(Debug, Clone)]
pub struct AsyncHypervisor {
    inner: Arc<dyn Hypervisor>,
}

impl AsyncHypervisor {
    pub fn new(inner: Arc<dyn Hypervisor>) -> Self {
        Self { inner }
    }

    /// Runs `call` with the hypervisor on tokio's blocking pool.
    pub async fn run<T, F>(&self, call: F) -> Result<T, ActuatorError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Hypervisor) -> Result<T, ActuatorError> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || call(inner.as_ref()))
            .await
            .map_err(|_| ActuatorError::Cancelled)?
    }

    pub fn blocking(&self) -> &dyn Hypervisor {
        self.inner.as_ref()
    }
}
