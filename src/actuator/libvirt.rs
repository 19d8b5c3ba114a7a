//! [`Hypervisor`] on a real libvirt connection (`virt` crate). With its
//! submodule `events` (viewer connects and disconnects), the only code in
//! deskgrid that talks to libvirt.
//!
//! One `Connect` is shared by all calls (libvirt connections are thread-safe);
//! a call that finds the connection dead reconnects with backoff and retries
//! once, and the reconnection is logged. Nothing here panics on what libvirt
//! returns.
//!
//! Positioned reads and writes of a volume (`read_volume_at`,
//! `write_volume_at`) take one of two paths, chosen per call by
//! `LibvirtHypervisor::volume_access` and logged at debug when it changes.
//! When libvirt runs on this very host (a URI without a host part) and the
//! volume is a raw file of a `dir` pool that deskgrid can open, deskgrid
//! reads and writes the file itself with `pread`/`pwrite`, so any number of
//! writes run at once and [`Hypervisor::sync_volume`] can `fdatasync` them.
//! Otherwise libvirt's upload/download streams carry the bytes, one upload
//! per volume at a time (libvirt refuses a second: "volume ... is still in
//! use") and with no way to sync.

mod events;

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{Error as VirtError, ErrorNumber};
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;
use virt::sys;

use super::domain_xml::{
    self, DomainKind, DomainSpec, VolumeFormat, AGENT_CHANNEL, DESKGRID_XMLNS,
};
use super::hypervisor::{
    ActuatorError, DisplayEndpoint, DisplaySink, DisplayWatch, DomainState, DomainStatus,
    GuestChannel, Hypervisor, PoolInfo, Progress, ShutdownOutcome, VolumeFile, VolumeInfo,
};
use super::naming::{self, VolumeName};
use crate::model::{HostCapacity, ImageVersionId, VmId};

/// Bytes per stream send and receive: the most data libvirt carries in one
/// stream message (`VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX`, 256 KiB less the
/// message header). A larger send is split into full messages plus a short
/// leftover one, which costs a round of work on both ends for a few bytes:
/// measured, a 1 GiB upload took 4.5 s with 1 MiB sends and 1.4 s with sends
/// of this size, and libvirtd used 3.5 times less CPU.
const STREAM_MESSAGE_PAYLOAD: usize = 262_120;
/// Attempts to start an inactive pool, and the wait between them.
const POOL_START_ATTEMPTS: u32 = 8;
const POOL_START_RETRY: Duration = Duration::from_millis(250);
/// Reconnection attempts before a call gives up, with doubling delays.
const RECONNECT_ATTEMPTS: u32 = 4;
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);

/// Where and how to reach this host's libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtOptions {
    pub uri: String,
    pub pool: String,
    /// Directory of the pool when deskgrid has to create it.
    pub pool_path: String,
    /// `None`: KVM when the host's capabilities offer it, else QEMU (TCG).
    pub domain_kind: Option<DomainKind>,
    /// Move volume bytes through libvirt streams only, even where the
    /// volume's file is on this host: for a deskgrid whose view of the pool
    /// directory is not libvirt's, and for comparing the two paths.
    pub streams_only: bool,
}

/// A libvirt connection with deskgrid's pool and naming rules.
#[derive(Debug)]
pub struct LibvirtHypervisor {
    options: LibvirtOptions,
    domain_kind: DomainKind,
    connection: Mutex<Arc<OwnedConnection>>,
    /// Whether positioned volume I/O may open the volume's file itself
    /// (see the module documentation); `false` forces libvirt streams.
    direct_volume_io: bool,
    /// The volume path last logged, so the choice is logged once, and again
    /// only when it changes.
    logged_volume_path: Mutex<Option<VolumePath>>,
}

/// How one positioned read or write reaches a volume's bytes.
enum VolumeAccess {
    /// The volume's file, opened on this host.
    File { file: File, path: String },
    /// libvirt upload/download streams.
    Stream,
}

/// Which path volume I/O takes, and why: what is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VolumePath {
    File,
    Stream { reason: &'static str },
}

impl LibvirtHypervisor {
    /// Starts an inactive pool. Several connections may ensure the same new
    /// pool at once (a server's host worker and policy loop do at start):
    /// one that finds the pool defined by another before that one built its
    /// directory builds it too (idempotent for a `dir` pool), and one that
    /// fails while another starts it waits for the other (up to ~2 s).
    fn start_pool(&self, pool: &StoragePool) -> Result<(), ActuatorError> {
        let mut last_error = None;
        for attempt in 0..POOL_START_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(POOL_START_RETRY);
                if pool.is_active().map_err(libvirt_error("read pool state"))? {
                    return Ok(());
                }
                // Its directory may not be there yet.
                let _ = pool.build(0);
            }
            match pool.create(0) {
                Ok(_) => {
                    tracing::info!(pool = %self.options.pool, "storage pool started");
                    return Ok(());
                }
                Err(error) => {
                    // Started by another process meanwhile: fine.
                    if pool.is_active().map_err(libvirt_error("read pool state"))? {
                        return Ok(());
                    }
                    last_error = Some(error.message().to_owned());
                }
            }
        }
        Err(ActuatorError::Pool {
            pool: self.options.pool.clone(),
            problem: format!(
                "cannot be started: {}",
                last_error.unwrap_or_else(|| "no reason given".to_owned())
            ),
        })
    }

    /// Connects and decides the domain type.
    pub fn connect(options: LibvirtOptions) -> Result<Self, ActuatorError> {
        // libvirt prints every error to stderr by default; deskgrid reports
        // them itself, with context, through `tracing`.
        virt::error::clear_error_callback();
        let connection = open(&options.uri)?;
        let domain_kind = match options.domain_kind {
            Some(kind) => kind,
            None => {
                let capabilities = connection
                    .get_capabilities()
                    .map_err(libvirt_error("read capabilities"))?;
                let kinds = domain_xml::parse_domain_kinds(&capabilities)?;
                if kinds.contains(&DomainKind::Kvm) {
                    DomainKind::Kvm
                } else {
                    DomainKind::Qemu
                }
            }
        };
        tracing::info!(uri = %options.uri, ?domain_kind, "connected to libvirt");
        Ok(Self {
            direct_volume_io: !options.streams_only,
            options,
            domain_kind,
            connection: Mutex::new(Arc::new(OwnedConnection(connection))),
            logged_volume_path: Mutex::new(None),
        })
    }

    /// The same host with [`LibvirtOptions::streams_only`] set.
    #[must_use]
    pub fn with_streams_only(mut self) -> Self {
        self.options.streams_only = true;
        self.direct_volume_io = false;
        self
    }

    pub fn domain_kind(&self) -> DomainKind {
        self.domain_kind
    }

    pub fn options(&self) -> &LibvirtOptions {
        &self.options
    }

    /// libvirt's and the hypervisor's versions, as "major.minor.micro".
    pub fn versions(&self) -> Result<(String, String), ActuatorError> {
        self.call("read versions", |connection| {
            let library = connection.get_lib_version()?;
            let hypervisor = connection.get_hyp_version()?;
            Ok((version_string(library), version_string(hypervisor)))
        })
    }

    /// Runs `operation` on the connection; reconnects and retries once when
    /// the connection turns out to be dead.
    fn call<T>(
        &self,
        operation: &'static str,
        mut body: impl FnMut(&Connect) -> Result<T, VirtError>,
    ) -> Result<T, ActuatorError> {
        let connection = self.current_connection();
        match body(&connection) {
            Ok(value) => Ok(value),
            Err(error) if connection_lost(&error, &connection) => {
                tracing::warn!(uri = %self.options.uri, operation, error = %error.message(), "libvirt connection lost; reconnecting");
                let connection = self.reconnect()?;
                body(&connection).map_err(libvirt_error(operation))
            }
            Err(error) => Err(libvirt_error(operation)(error)),
        }
    }

    fn current_connection(&self) -> Arc<OwnedConnection> {
        // A poisoned lock only means another thread panicked while swapping
        // connections; the value is still a connection.
        let guard = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(&guard)
    }

    fn reconnect(&self) -> Result<Arc<OwnedConnection>, ActuatorError> {
        let mut delay = RECONNECT_FIRST_DELAY;
        let mut last_error = None;
        for attempt in 1..=RECONNECT_ATTEMPTS {
            match open(&self.options.uri) {
                Ok(connection) => {
                    let connection = Arc::new(OwnedConnection(connection));
                    let mut guard = self
                        .connection
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    // The old connection closes when its last user is done.
                    *guard = Arc::clone(&connection);
                    tracing::info!(uri = %self.options.uri, attempt, "libvirt connection re-established");
                    return Ok(connection);
                }
                Err(error) => {
                    tracing::warn!(uri = %self.options.uri, attempt, error = %error, "cannot reconnect to libvirt yet");
                    last_error = Some(error);
                    std::thread::sleep(delay);
                    delay *= 2;
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ActuatorError::Connect {
            uri: self.options.uri.clone(),
            message: "no attempt made".to_owned(),
        }))
    }

    /// The configured pool, or `None` when it does not exist.
    fn find_pool(&self) -> Result<Option<StoragePool>, ActuatorError> {
        let pool_name = self.options.pool.clone();
        self.call(
            "look up the storage pool",
            |connection| match StoragePool::lookup_by_name(connection, &pool_name) {
                Ok(pool) => Ok(Some(pool)),
                Err(error) if error.code() == ErrorNumber::NoStoragePool => Ok(None),
                Err(error) => Err(error),
            },
        )
    }

    fn pool(&self) -> Result<StoragePool, ActuatorError> {
        self.find_pool()?.ok_or_else(|| ActuatorError::Pool {
            pool: self.options.pool.clone(),
            problem:
                "does not exist: `deskgrid serve` creates it, or check libvirt.pool in config.toml"
                    .to_owned(),
        })
    }

    fn volume(&self, pool: &StoragePool, name: &VolumeName) -> Result<StorageVol, ActuatorError> {
        let volume_name = name.to_string();
        StorageVol::lookup_by_name(pool, &volume_name).map_err(|error| {
            if error.code() == ErrorNumber::NoStorageVolume {
                ActuatorError::VolumeNotFound {
                    pool: self.options.pool.clone(),
                    name: volume_name.clone(),
                }
            } else {
                libvirt_error("look up a volume")(error)
            }
        })
    }

    /// The pool, the volume `name` in it and its capacity in bytes.
    fn volume_with_capacity(
        &self,
        name: &VolumeName,
    ) -> Result<(StoragePool, StorageVol, u64), ActuatorError> {
        let pool = self.pool()?;
        let volume = self.volume(&pool, name)?;
        let capacity = volume
            .get_info()
            .map_err(libvirt_error("read volume info"))?
            .capacity;
        Ok((pool, volume, capacity))
    }

    fn volume_info(
        &self,
        volume: &StorageVol,
        name: VolumeName,
    ) -> Result<VolumeInfo, ActuatorError> {
        let info = volume
            .get_info()
            .map_err(libvirt_error("read volume info"))?;
        Ok(VolumeInfo {
            name,
            path: volume
                .get_path()
                .map_err(libvirt_error("read volume path"))?,
            capacity_bytes: info.capacity,
            allocation_bytes: info.allocation,
        })
    }

    fn check_space(&self, pool: &StoragePool, needed_bytes: u64) -> Result<(), ActuatorError> {
        // Refresh first: other writers (and our own deletes) change free space.
        refresh_pool(pool)?;
        let info = pool.get_info().map_err(libvirt_error("read pool info"))?;
        if info.available < needed_bytes {
            return Err(ActuatorError::PoolFull {
                pool: self.options.pool.clone(),
                needed_bytes,
                available_bytes: info.available,
            });
        }
        Ok(())
    }

    fn create_volume(
        &self,
        pool: &StoragePool,
        name: &VolumeName,
        xml: &str,
    ) -> Result<StorageVol, ActuatorError> {
        match StorageVol::lookup_by_name(pool, &name.to_string()) {
            Ok(_) => Err(ActuatorError::VolumeExists {
                pool: self.options.pool.clone(),
                name: name.to_string(),
            }),
            Err(_) => {
                StorageVol::create_xml(pool, xml, 0).map_err(libvirt_error("create a volume"))
            }
        }
    }

    fn domain(&self, vm: VmId) -> Result<Domain, ActuatorError> {
        let name = naming::domain_name(vm);
        self.call(
            "look up a domain",
            |connection| match Domain::lookup_by_name(connection, &name) {
                Ok(domain) => Ok(Some(domain)),
                Err(error) if error.code() == ErrorNumber::NoDomain => Ok(None),
                Err(error) => Err(error),
            },
        )?
        .ok_or(ActuatorError::DomainNotFound { vm })
    }

    /// How positioned I/O reaches `volume` (see the module documentation):
    /// its file, opened for writing when `write`, or libvirt streams. Cheap
    /// enough per call (a few local libvirt calls and an `open`) that nothing
    /// is cached, so a pool or volume changed under deskgrid is seen at once.
    fn volume_access(
        &self,
        pool: &StoragePool,
        volume: &StorageVol,
        capacity: u64,
        write: bool,
    ) -> Result<VolumeAccess, ActuatorError> {
        let access = self.find_volume_file(pool, volume, capacity, write)?;
        let path = match &access {
            Ok((_, path)) => {
                tracing::trace!(%path, "volume I/O on the file");
                VolumePath::File
            }
            Err(reason) => VolumePath::Stream { reason },
        };
        let mut logged = self
            .logged_volume_path
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if *logged != Some(path) {
            match path {
                VolumePath::File => {
                    tracing::debug!(pool = %self.options.pool, "volume I/O opens the volume files on this host")
                }
                VolumePath::Stream { reason } => {
                    tracing::debug!(pool = %self.options.pool, reason, "volume I/O goes through libvirt streams")
                }
            }
            *logged = Some(path);
        }
        Ok(match access {
            Ok((file, path)) => VolumeAccess::File { file, path },
            Err(_) => VolumeAccess::Stream,
        })
    }

    /// `volume`'s file, open, when direct I/O applies; else why not.
    fn find_volume_file(
        &self,
        pool: &StoragePool,
        volume: &StorageVol,
        capacity: u64,
        write: bool,
    ) -> Result<Result<(File, String), &'static str>, ActuatorError> {
        if !self.direct_volume_io {
            return Ok(Err("streams only by choice"));
        }
        if !uri_is_local(&self.options.uri) {
            return Ok(Err("libvirt is on another host"));
        }
        let pool_xml = pool
            .get_xml_desc(0)
            .map_err(libvirt_error("read pool XML"))?;
        if domain_xml::parse_pool_type(&pool_xml)? != "dir" {
            return Ok(Err("not a dir pool"));
        }
        if !Path::new(&domain_xml::parse_pool_path(&pool_xml)?).is_dir() {
            return Ok(Err("the pool directory is not on this host"));
        }
        let volume_xml = volume
            .get_xml_desc(0)
            .map_err(libvirt_error("read volume XML"))?;
        // A qcow2 file's bytes are not the guest's: only raw is written as is.
        if domain_xml::parse_volume_format(&volume_xml)? != VolumeFormat::Raw {
            return Ok(Err("not a raw volume"));
        }
        let path = volume
            .get_path()
            .map_err(libvirt_error("read volume path"))?;
        let file = match OpenOptions::new().read(true).write(write).open(&path) {
            Ok(file) => file,
            Err(error) => {
                tracing::trace!(%path, %error, "cannot open the volume file");
                return Ok(Err("the volume file cannot be opened"));
            }
        };
        // A raw file is exactly the volume's size: another size means this
        // path is not the file libvirt sees (deskgrid in a container with a
        // directory of the same name), or not a plain file.
        match file.metadata() {
            Ok(metadata) if metadata.is_file() && metadata.len() == capacity => {
                Ok(Ok((file, path)))
            }
            _ => Ok(Err("the file at the volume path is not the volume")),
        }
    }

    fn upload(
        &self,
        volume: &StorageVol,
        name: &VolumeName,
        offset: u64,
        length: u64,
        source: &mut dyn Read,
        progress: Progress<'_>,
    ) -> Result<(), ActuatorError> {
        let stream_error = |operation, source| ActuatorError::Stream {
            operation,
            name: name.to_string(),
            source,
        };
        let connection = self.current_connection();
        let stream = Stream::new(&connection, 0).map_err(libvirt_error("open a stream"))?;
        volume
            .upload(&stream, offset, length, 0)
            .map_err(libvirt_error("start a volume upload"))?;
        let mut buffer = vec![0u8; STREAM_MESSAGE_PAYLOAD];
        let mut done = 0u64;
        while done < length {
            let want = usize::try_from((length - done).min(STREAM_MESSAGE_PAYLOAD as u64))
                .unwrap_or(STREAM_MESSAGE_PAYLOAD);
            let read = match source.read(&mut buffer[..want]) {
                Ok(0) => {
                    let _ = stream.abort();
                    return Err(stream_error(
                        "upload",
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("the source ended after {done} of {length} bytes"),
                        ),
                    ));
                }
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    let _ = stream.abort();
                    return Err(stream_error("read the source of", error));
                }
            };
            let mut sent = 0;
            while sent < read {
                match stream.send(&buffer[sent..read]) {
                    Ok(0) => {}
                    Ok(count) => sent += count,
                    Err(error) => {
                        let _ = stream.abort();
                        return Err(libvirt_error("send upload data")(error));
                    }
                }
            }
            done += read as u64;
            progress(done);
        }
        stream.finish().map_err(libvirt_error("finish the upload"))
    }
}

impl Hypervisor for LibvirtHypervisor {
    fn host_capacity(&self) -> Result<HostCapacity, ActuatorError> {
        let (node, free_bytes) = self.call("read host capacity", |connection| {
            Ok((connection.get_node_info()?, connection.get_free_memory()?))
        })?;
        let pool = self.pool()?;
        refresh_pool(&pool)?;
        let pool_info = pool.get_info().map_err(libvirt_error("read pool info"))?;
        Ok(HostCapacity {
            cpus: node.cpus,
            memory_total_mib: node.memory / 1024,
            memory_free_mib: free_bytes / (1024 * 1024),
            storage_total_bytes: pool_info.capacity,
            storage_free_bytes: pool_info.available,
        })
    }

    fn ensure_pool(&self) -> Result<PoolInfo, ActuatorError> {
        let pool = match self.find_pool()? {
            Some(pool) => pool,
            None => {
                let xml = domain_xml::render_pool_xml(&self.options.pool, &self.options.pool_path);
                match self.call("define the storage pool", |connection| {
                    StoragePool::define_xml(connection, &xml, 0)
                }) {
                    Ok(pool) => {
                        pool.build(0)
                            .map_err(libvirt_error("build the storage pool"))?;
                        pool.set_autostart(true)
                            .map_err(libvirt_error("set the pool to autostart"))?;
                        tracing::info!(pool = %self.options.pool, path = %self.options.pool_path, "storage pool defined");
                        pool
                    }
                    // Another process (this server's host worker and policy
                    // loop both ensure the pool at start, an import too) may
                    // have defined it a moment ago: use theirs.
                    Err(error) => self.find_pool()?.ok_or(error)?,
                }
            }
        };
        if !pool.is_active().map_err(libvirt_error("read pool state"))? {
            self.start_pool(&pool)?;
        }
        refresh_pool(&pool)?;
        let info = pool.get_info().map_err(libvirt_error("read pool info"))?;
        let xml = pool
            .get_xml_desc(0)
            .map_err(libvirt_error("read pool XML"))?;
        Ok(PoolInfo {
            name: self.options.pool.clone(),
            path: domain_xml::parse_pool_path(&xml)?,
            capacity_bytes: info.capacity,
            available_bytes: info.available,
        })
    }

    fn create_base_volume(
        &self,
        image: &ImageVersionId,
        capacity_bytes: u64,
        format: VolumeFormat,
    ) -> Result<VolumeInfo, ActuatorError> {
        let pool = self.pool()?;
        self.check_space(&pool, capacity_bytes)?;
        let name = VolumeName::Base(image.clone());
        let xml = domain_xml::render_base_volume_xml(&name.to_string(), capacity_bytes, format);
        let volume = self.create_volume(&pool, &name, &xml)?;
        self.volume_info(&volume, name)
    }

    fn import_base_image(
        &self,
        image: &ImageVersionId,
        format: VolumeFormat,
        size: u64,
        source: &mut dyn Read,
        progress: Progress<'_>,
    ) -> Result<VolumeInfo, ActuatorError> {
        let info = self.create_base_volume(image, size, format)?;
        let pool = self.pool()?;
        let volume = self.volume(&pool, &info.name)?;
        if let Err(error) = self.upload(&volume, &info.name, 0, size, source, progress) {
            // Never leave a half-imported image that looks complete.
            if let Err(delete_error) = volume.delete(0) {
                tracing::warn!(volume = %info.name, error = %delete_error.message(), "cannot remove a failed import");
            }
            return Err(error);
        }
        self.volume_info(&volume, info.name)
    }

    fn export_volume(
        &self,
        name: &VolumeName,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64, ActuatorError> {
        let pool = self.pool()?;
        let volume = self.volume(&pool, name)?;
        let connection = self.current_connection();
        let stream = Stream::new(&connection, 0).map_err(libvirt_error("open a stream"))?;
        volume
            .download(&stream, 0, 0, 0)
            .map_err(libvirt_error("start a volume download"))?;
        let mut buffer = vec![0u8; STREAM_MESSAGE_PAYLOAD];
        let mut done = 0u64;
        loop {
            let received = match stream.recv(&mut buffer) {
                Ok(received) => received,
                Err(error) => {
                    let _ = stream.abort();
                    return Err(libvirt_error("receive download data")(error));
                }
            };
            if received == 0 {
                break;
            }
            if let Err(error) = sink.write_all(&buffer[..received]) {
                let _ = stream.abort();
                return Err(ActuatorError::Stream {
                    operation: "write the download of",
                    name: name.to_string(),
                    source: error,
                });
            }
            done += received as u64;
            progress(done);
        }
        stream
            .finish()
            .map_err(libvirt_error("finish the download"))?;
        Ok(done)
    }

    fn read_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ActuatorError> {
        let (pool, volume, capacity) = self.volume_with_capacity(name)?;
        let end = offset.checked_add(length);
        if end.is_none_or(|end| end > capacity) {
            return Err(ActuatorError::OutOfBounds {
                what: "a read",
                name: name.to_string(),
                limit: capacity,
            });
        }
        if length == 0 {
            return Ok(Vec::new());
        }
        let wanted = usize::try_from(length).unwrap_or(usize::MAX);
        if let VolumeAccess::File { file, path } =
            self.volume_access(&pool, &volume, capacity, false)?
        {
            let mut bytes = vec![0u8; wanted];
            file.read_exact_at(&mut bytes, offset)
                .map_err(|source| ActuatorError::VolumeFile {
                    operation: "a read",
                    path,
                    source,
                })?;
            return Ok(bytes);
        }
        let connection = self.current_connection();
        let stream = Stream::new(&connection, 0).map_err(libvirt_error("open a stream"))?;
        volume
            .download(&stream, offset, length, 0)
            .map_err(libvirt_error("start a volume download"))?;
        let mut bytes = vec![0u8; wanted];
        let mut done = 0usize;
        while done < wanted {
            let received = match stream.recv(&mut bytes[done..]) {
                Ok(received) => received,
                Err(error) => {
                    let _ = stream.abort();
                    return Err(libvirt_error("receive download data")(error));
                }
            };
            if received == 0 {
                break;
            }
            done += received;
        }
        if done < wanted {
            let _ = stream.abort();
            return Err(ActuatorError::Stream {
                operation: "read",
                name: name.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the volume ended after {done} of {wanted} bytes"),
                ),
            });
        }
        stream
            .finish()
            .map_err(libvirt_error("finish the download"))?;
        Ok(bytes)
    }

    fn write_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ActuatorError> {
        let (pool, volume, capacity) = self.volume_with_capacity(name)?;
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > capacity) {
            return Err(ActuatorError::OutOfBounds {
                what: "a write",
                name: name.to_string(),
                limit: capacity,
            });
        }
        if let VolumeAccess::File { file, path } =
            self.volume_access(&pool, &volume, capacity, true)?
        {
            return file
                .write_all_at(data, offset)
                .map_err(|source| ActuatorError::VolumeFile {
                    operation: "a write",
                    path,
                    source,
                });
        }
        let mut source = data;
        self.upload(
            &volume,
            name,
            offset,
            data.len() as u64,
            &mut source,
            &mut |_| {},
        )
    }

    fn sync_volume(&self, name: &VolumeName) -> Result<(), ActuatorError> {
        let (pool, volume, capacity) = self.volume_with_capacity(name)?;
        match self.volume_access(&pool, &volume, capacity, true)? {
            // Flushes every write to the file, whichever descriptor made it.
            VolumeAccess::File { file, path } => {
                file.sync_data()
                    .map_err(|source| ActuatorError::VolumeFile {
                        operation: "a sync",
                        path,
                        source,
                    })
            }
            // libvirt has no call to sync a volume, and its uploads end
            // without one: what a stream wrote is durable when the host's
            // page cache is written back, and nothing here can hasten it.
            VolumeAccess::Stream => Ok(()),
        }
    }

    fn open_volume_file(
        &self,
        name: &VolumeName,
        write: bool,
    ) -> Result<Option<VolumeFile>, ActuatorError> {
        let (pool, volume, capacity) = self.volume_with_capacity(name)?;
        Ok(match self.volume_access(&pool, &volume, capacity, write)? {
            VolumeAccess::File { file, path } => Some(VolumeFile::new(file, path, capacity)),
            VolumeAccess::Stream => None,
        })
    }

    fn create_linked_clone(
        &self,
        vm: VmId,
        base: &ImageVersionId,
    ) -> Result<VolumeInfo, ActuatorError> {
        let pool = self.pool()?;
        let base_name = VolumeName::Base(base.clone());
        let base_volume = self.volume(&pool, &base_name)?;
        let base_info = self.volume_info(&base_volume, base_name)?;
        let base_xml = base_volume
            .get_xml_desc(0)
            .map_err(libvirt_error("read volume XML"))?;
        let base_format = domain_xml::parse_volume_format(&base_xml)?;
        // An overlay starts at a few hundred KiB and grows with the guest's writes.
        self.check_space(&pool, 1 << 20)?;
        let name = VolumeName::Overlay(vm);
        let xml = domain_xml::render_overlay_volume_xml(
            &name.to_string(),
            base_info.capacity_bytes,
            &base_info.path,
            base_format,
        );
        let volume = self.create_volume(&pool, &name, &xml)?;
        self.volume_info(&volume, name)
    }

    fn delete_volume(&self, name: &VolumeName) -> Result<(), ActuatorError> {
        let pool = self.pool()?;
        let volume = self.volume(&pool, name)?;
        volume.delete(0).map_err(libvirt_error("delete a volume"))
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ActuatorError> {
        let pool = self.pool()?;
        refresh_pool(&pool)?;
        let mut volumes = Vec::new();
        for volume in pool
            .list_all_volumes(0)
            .map_err(libvirt_error("list volumes"))?
        {
            let Ok(volume_name) = volume.get_name() else {
                continue;
            };
            // Volumes deskgrid did not create are never listed, so never touched.
            let Some(name) = naming::parse_volume_name(&volume_name) else {
                continue;
            };
            volumes.push(self.volume_info(&volume, name)?);
        }
        volumes.sort_by_key(|volume| volume.name.to_string());
        Ok(volumes)
    }

    fn define_domain(&self, spec: &DomainSpec) -> Result<(), ActuatorError> {
        let xml = domain_xml::render_domain_xml(spec);
        self.call("define a domain", |connection| {
            Domain::define_xml(connection, &xml)
        })?;
        Ok(())
    }

    fn start_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        let domain = self.domain(vm)?;
        domain.create().map_err(libvirt_error("start a domain"))?;
        Ok(())
    }

    fn shutdown_domain(
        &self,
        vm: VmId,
        timeout: Duration,
    ) -> Result<ShutdownOutcome, ActuatorError> {
        let domain = self.domain(vm)?;
        if domain_state(&domain)? == DomainState::ShutOff {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        domain
            .shutdown()
            .map_err(libvirt_error("shut down a domain"))?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if domain_state(&domain)? == DomainState::ShutOff {
                return Ok(ShutdownOutcome::Graceful);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        tracing::warn!(%vm, ?timeout, "guest did not power off in time; destroying it");
        self.destroy_domain(vm)?;
        Ok(ShutdownOutcome::Forced)
    }

    fn destroy_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        let domain = self.domain(vm)?;
        if domain_state(&domain)? == DomainState::ShutOff {
            return Ok(());
        }
        domain.destroy().map_err(libvirt_error("destroy a domain"))
    }

    fn undefine_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        let domain = self.domain(vm)?;
        if domain_state(&domain)? != DomainState::ShutOff {
            return Err(ActuatorError::Libvirt {
                operation: "undefine a domain",
                message: format!("VM {vm} is still running: shut it down first"),
            });
        }
        // Plain undefine: deskgrid domains boot BIOS-style and have no NVRAM yet.
        domain
            .undefine()
            .map_err(libvirt_error("undefine a domain"))?;
        match self.delete_volume(&VolumeName::Overlay(vm)) {
            Ok(()) | Err(ActuatorError::VolumeNotFound { .. }) => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn list_domains(&self) -> Result<Vec<DomainStatus>, ActuatorError> {
        let domains = self.call("list domains", |connection| connection.list_all_domains(0))?;
        let mut found = Vec::new();
        for domain in domains {
            let Ok(name) = domain.get_name() else {
                continue;
            };
            let Some(vm) = naming::parse_domain_name(&name) else {
                continue;
            };
            let metadata_xml = match domain.get_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(DESKGRID_XMLNS),
                0,
            ) {
                Ok(xml) => xml,
                // Undefined since the listing (a concurrent undefine).
                Err(error) if error.code() == ErrorNumber::NoDomain => continue,
                Err(error) => {
                    tracing::warn!(domain = %name, error = %error.message(), "domain named like deskgrid's has no deskgrid metadata; ignored");
                    continue;
                }
            };
            let Some(metadata) = domain_xml::parse_metadata(&metadata_xml)? else {
                continue;
            };
            if metadata.vm != vm {
                tracing::warn!(domain = %name, "domain metadata names another VM; ignored");
                continue;
            }
            let state = match libvirt_domain_state(&domain) {
                Ok(state) => state,
                // Undefined since the listing: gone, so not listed.
                Err(error) if error.code() == ErrorNumber::NoDomain => continue,
                Err(error) => return Err(libvirt_error("read domain state")(error)),
            };
            found.push(DomainStatus {
                vm,
                template: metadata.template,
                image: metadata.image,
                state,
            });
        }
        found.sort_by_key(|status| status.vm);
        Ok(found)
    }

    fn domain_state(&self, vm: VmId) -> Result<DomainState, ActuatorError> {
        domain_state(&self.domain(vm)?)
    }

    fn set_display_ticket(
        &self,
        vm: VmId,
        password: &str,
        valid_for: Duration,
    ) -> Result<DisplayEndpoint, ActuatorError> {
        let domain = self.domain(vm)?;
        if domain_state(&domain)? != DomainState::Running {
            return Err(ActuatorError::DomainNotRunning { vm });
        }
        let live = domain
            .get_xml_desc(0)
            .map_err(libvirt_error("read live domain XML"))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        let update =
            domain_xml::graphics_ticket_xml(&live, password, now + valid_for.as_secs().max(1))?;
        domain
            .update_device_flags(&update, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(libvirt_error("set the display ticket"))?;
        Ok(domain_xml::parse_display_endpoint(&live)?)
    }

    fn open_guest_channel(&self, vm: VmId) -> Result<Box<dyn GuestChannel>, ActuatorError> {
        // A channel gets a connection of its own: a read waiting for the
        // guest blocks its connection, and must not stall every other host
        // call (measured: several seconds per call on a shared connection).
        let connection = OwnedConnection(open(&self.options.uri)?);
        let domain = match Domain::lookup_by_name(&connection, &naming::domain_name(vm)) {
            Ok(domain) => domain,
            Err(error) if error.code() == ErrorNumber::NoDomain => {
                return Err(ActuatorError::DomainNotFound { vm })
            }
            Err(error) => return Err(libvirt_error("look up a domain")(error)),
        };
        if domain_state(&domain)? != DomainState::Running {
            return Err(ActuatorError::DomainNotRunning { vm });
        }
        let stream = Stream::new(&connection, 0).map_err(libvirt_error("open a stream"))?;
        // FORCE: one reader per VM; a stale stream from a crashed reader must
        // not lock the agent out (DESIGN.md section 10).
        domain
            .open_channel(Some(AGENT_CHANNEL), &stream, sys::VIR_DOMAIN_CHANNEL_FORCE)
            .map_err(libvirt_error("open the guest agent channel"))?;
        Ok(Box::new(LibvirtChannel {
            stream: stream.into(),
            vm,
            _connection: connection,
        }))
    }

    fn watch_displays(&self, sink: DisplaySink) -> Result<Box<dyn DisplayWatch>, ActuatorError> {
        let watch = events::LibvirtDisplayWatch::start(&self.options.uri, sink)?;
        Ok(Box::new(watch))
    }
}

/// A libvirt connection that is closed when dropped (`virt`'s `Connect` has
/// no `Drop`: every reference must be closed by hand, or it leaks).
#[derive(Debug)]
struct OwnedConnection(Connect);

impl std::ops::Deref for OwnedConnection {
    type Target = Connect;

    fn deref(&self) -> &Connect {
        &self.0
    }
}

impl Drop for OwnedConnection {
    fn drop(&mut self) {
        if let Err(error) = self.0.close() {
            tracing::debug!(error = %error.message(), "closing a libvirt connection");
        }
    }
}

/// What the host offers, for `deskgrid host check`: read-only, creates nothing.
impl LibvirtHypervisor {
    /// The configured pool: `None` when missing, else (active, capacity, available).
    pub fn pool_status(&self) -> Result<Option<(bool, u64, u64)>, ActuatorError> {
        let Some(pool) = self.find_pool()? else {
            return Ok(None);
        };
        let active = pool.is_active().map_err(libvirt_error("read pool state"))?;
        if active {
            refresh_pool(&pool)?;
        }
        let info = pool.get_info().map_err(libvirt_error("read pool info"))?;
        Ok(Some((active, info.capacity, info.available)))
    }

    /// A libvirt network: `None` when missing, else whether it is active.
    pub fn network_status(&self, name: &str) -> Result<Option<bool>, ActuatorError> {
        let name = name.to_owned();
        self.call(
            "look up a network",
            |connection| match virt::network::Network::lookup_by_name(connection, &name) {
                Ok(network) => network.is_active().map(Some),
                Err(error) if error.code() == ErrorNumber::NoNetwork => Ok(None),
                Err(error) => Err(error),
            },
        )
    }

    /// The domain types the host's capabilities offer.
    pub fn offered_domain_kinds(&self) -> Result<Vec<DomainKind>, ActuatorError> {
        let capabilities = self.call("read capabilities", |connection| {
            connection.get_capabilities()
        })?;
        Ok(domain_xml::parse_domain_kinds(&capabilities)?)
    }
}

/// A guest channel carried by a libvirt stream.
#[derive(Debug)]
struct LibvirtChannel {
    // Declared before the connection: dropped (freed) before it is closed.
    stream: SendStream,
    vm: VmId,
    _connection: OwnedConnection,
}

/// A libvirt stream may be used from one thread at a time, but from any
/// thread: libvirt locks the stream object in every call. `virt` does not
/// mark `Stream` as `Send`, so this one wrapper does.
struct SendStream(Stream);

impl std::fmt::Debug for SendStream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SendStream")
    }
}

#[allow(unsafe_code)]
// SAFETY: see `SendStream`: ownership moves between threads, never shared
// (`Sync` is not implemented), and libvirt's stream calls are thread-safe.
unsafe impl Send for SendStream {}

impl From<Stream> for SendStream {
    fn from(stream: Stream) -> Self {
        Self(stream)
    }
}

impl LibvirtChannel {
    fn io_error(&self, error: VirtError) -> std::io::Error {
        std::io::Error::other(format!(
            "agent channel of VM {}: {}",
            self.vm,
            error.message()
        ))
    }
}

impl Read for LibvirtChannel {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        self.stream
            .0
            .recv(buffer)
            .map_err(|error| self.io_error(error))
    }
}

impl Write for LibvirtChannel {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.stream
            .0
            .send(data)
            .map_err(|error| self.io_error(error))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl GuestChannel for LibvirtChannel {}

impl Drop for LibvirtChannel {
    fn drop(&mut self) {
        // Abort rather than finish: the guest end stays open, we just leave.
        let stream = self.stream.0.clone();
        if let Err(error) = stream.abort() {
            tracing::debug!(vm = %self.vm, error = %error.message(), "agent channel abort");
        }
    }
}

fn open(uri: &str) -> Result<Connect, ActuatorError> {
    Connect::open(Some(uri)).map_err(|error| ActuatorError::Connect {
        uri: uri.to_owned(),
        message: error.message().to_owned(),
    })
}

/// Whether `uri` reaches the libvirt of this very host, so the files of its
/// `dir` pools are this host's files: no host part (`qemu:///system`,
/// `qemu:///session`) and no network transport (`+unix` is local).
pub fn uri_is_local(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let local_transport = match scheme.split_once('+') {
        None => true,
        Some((_driver, transport)) => transport == "unix",
    };
    local_transport && rest.starts_with('/')
}

fn connection_lost(error: &VirtError, connection: &Connect) -> bool {
    matches!(
        error.code(),
        ErrorNumber::SystemError
            | ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::Rpc
    ) || !connection.is_alive().unwrap_or(false)
}

/// Attempts at a pool refresh while libvirt is busy with the pool.
const REFRESH_ATTEMPTS: u32 = 8;
const FIRST_REFRESH_RETRY: Duration = Duration::from_millis(25);

/// Refreshes `pool`, waiting out libvirt's "pool ... has asynchronous jobs
/// running" (a volume upload or clone in progress on another connection,
/// such as two desktops cloned at once): up to ~6 s, doubling waits.
fn refresh_pool(pool: &StoragePool) -> Result<(), ActuatorError> {
    let mut retry = FIRST_REFRESH_RETRY;
    let mut attempt = 1;
    loop {
        match pool.refresh(0) {
            Ok(_) => return Ok(()),
            Err(error)
                if attempt < REFRESH_ATTEMPTS
                    && error.message().contains("asynchronous jobs running") =>
            {
                tracing::debug!(attempt, error = %error.message(), "pool busy; refreshing again");
                std::thread::sleep(retry);
                retry *= 2;
                attempt += 1;
            }
            Err(error) => return Err(libvirt_error("refresh the pool")(error)),
        }
    }
}

fn libvirt_error(operation: &'static str) -> impl Fn(VirtError) -> ActuatorError {
    move |error| ActuatorError::Libvirt {
        operation,
        message: error.message().to_owned(),
    }
}

fn domain_state(domain: &Domain) -> Result<DomainState, ActuatorError> {
    libvirt_domain_state(domain).map_err(libvirt_error("read domain state"))
}

/// [`domain_state`] with libvirt's error kept, for callers that must tell a
/// domain undefined meanwhile (`ErrorNumber::NoDomain`) from a failure.
fn libvirt_domain_state(domain: &Domain) -> Result<DomainState, VirtError> {
    let (state, _reason) = domain.get_state()?;
    Ok(match state {
        sys::VIR_DOMAIN_RUNNING => DomainState::Running,
        sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_PMSUSPENDED => DomainState::Paused,
        sys::VIR_DOMAIN_SHUTDOWN => DomainState::ShuttingDown,
        sys::VIR_DOMAIN_SHUTOFF => DomainState::ShutOff,
        sys::VIR_DOMAIN_CRASHED => DomainState::Crashed,
        _ => DomainState::Other,
    })
}

fn version_string(version: u32) -> String {
    format!(
        "{}.{}.{}",
        version / 1_000_000,
        (version / 1_000) % 1_000,
        version % 1_000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_uris_without_a_host_are_local() {
        for uri in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///system",
            "qemu:///system?socket=/run/libvirt/libvirt-sock",
        ] {
            assert!(uri_is_local(uri), "{uri}");
        }
        for uri in [
            "qemu://host/system",
            "qemu://localhost/system",
            "qemu+ssh://root@host/system",
            "qemu+tcp://host/system",
            "qemu+ssh:///system",
            "qemu+ext:///system",
            "qemu",
            "",
        ] {
            assert!(!uri_is_local(uri), "{uri}");
        }
    }
}
