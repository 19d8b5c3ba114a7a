//! An in-memory [`Hypervisor`] for fast tests of the code above the actuator.
//! It keeps the same rules as the libvirt one (the contract tests in
//! `tests/actuator_contract.rs` run both): deskgrid's names only, a pool that
//! must exist and can fill up, domains that must be off to be undefined.

use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::domain_xml::{DomainSpec, VolumeFormat};
use super::hypervisor::{
    ActuatorError, DisplayEndpoint, DisplayEvent, DisplayPhase, DisplaySink, DisplayWatch,
    DomainState, DomainStatus, GuestChannel, Hypervisor, PoolInfo, Progress, ShutdownOutcome,
    VolumeInfo,
};
use super::naming::VolumeName;
use crate::model::{HostCapacity, ImageVersionId, VmId};

/// A pretend host. Cloning shares the host (like two connections to it).
#[derive(Debug, Clone)]
pub struct FakeHypervisor {
    host: Arc<Mutex<FakeHost>>,
}

#[derive(Debug)]
struct FakeHost {
    pool_name: String,
    pool_capacity: u64,
    pool_exists: bool,
    cpus: u32,
    memory_mib: u64,
    volumes: BTreeMap<String, FakeVolume>,
    /// Volumes deskgrid did not create: they take space, deskgrid never sees them.
    foreign_volumes: BTreeMap<String, u64>,
    domains: BTreeMap<VmId, FakeDomain>,
    next_port: u16,
    /// Subscribers to display events; a dropped watch leaves a dead entry.
    display_sinks: Vec<std::sync::Weak<DisplaySink>>,
}

#[derive(Debug)]
struct FakeVolume {
    name: VolumeName,
    capacity: u64,
    /// Bytes written so far; the rest of the disk reads as zeros.
    data: Vec<u8>,
    backing: Option<String>,
}

#[derive(Debug)]
struct FakeDomain {
    spec: DomainSpec,
    state: DomainState,
    port: u16,
    ticket: Option<(String, Duration)>,
    channel: Option<Arc<ChannelPipe>>,
}

/// Bytes in flight between a fake guest and the host.
#[derive(Debug, Default)]
struct ChannelPipe {
    buffers: Mutex<ChannelBuffers>,
    ready: Condvar,
}

#[derive(Debug, Default)]
struct ChannelBuffers {
    to_host: VecDeque<u8>,
    to_guest: VecDeque<u8>,
    closed: bool,
}

impl FakeHypervisor {
    /// A host with `cpus`, `memory_mib` and a pool of `pool_capacity` bytes
    /// named `pool_name` that does not exist until `ensure_pool`.
    pub fn new(pool_name: &str, pool_capacity: u64, cpus: u32, memory_mib: u64) -> Self {
        Self {
            host: Arc::new(Mutex::new(FakeHost {
                pool_name: pool_name.to_owned(),
                pool_capacity,
                pool_exists: false,
                cpus,
                memory_mib,
                volumes: BTreeMap::new(),
                foreign_volumes: BTreeMap::new(),
                domains: BTreeMap::new(),
                next_port: 5900,
                display_sinks: Vec::new(),
            })),
        }
    }

    fn host(&self) -> MutexGuard<'_, FakeHost> {
        // Tests that panicked mid-call leave a usable host behind.
        self.host
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a volume deskgrid did not create (to test that it is left alone).
    pub fn add_foreign_volume(&self, name: &str, capacity: u64) {
        self.host()
            .foreign_volumes
            .insert(name.to_owned(), capacity);
    }

    /// What the guest of `vm` writes to its agent channel.
    pub fn guest_writes(&self, vm: VmId, bytes: &[u8]) -> Result<(), ActuatorError> {
        let pipe = self.pipe(vm)?;
        let mut buffers = pipe
            .buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        buffers.to_host.extend(bytes);
        pipe.ready.notify_all();
        Ok(())
    }

    /// Everything the host wrote to `vm`'s agent channel so far.
    pub fn guest_reads(&self, vm: VmId) -> Result<Vec<u8>, ActuatorError> {
        let pipe = self.pipe(vm)?;
        let mut buffers = pipe
            .buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(buffers.to_guest.drain(..).collect())
    }

    /// The display ticket last set on `vm`.
    pub fn ticket(&self, vm: VmId) -> Option<(String, Duration)> {
        self.host()
            .domains
            .get(&vm)
            .and_then(|domain| domain.ticket.clone())
    }

    /// A viewer connection event on `vm`'s display, as libvirt would raise
    /// it, delivered to every live [`Hypervisor::watch_displays`] sink.
    /// Returns how many sinks got it.
    pub fn display_event(&self, vm: VmId, phase: DisplayPhase, client: &str) -> usize {
        let sinks: Vec<Arc<DisplaySink>> = {
            let mut host = self.host();
            host.display_sinks.retain(|sink| sink.strong_count() > 0);
            host.display_sinks
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .collect()
        };
        for sink in &sinks {
            sink(DisplayEvent {
                vm,
                phase,
                client: client.to_owned(),
            });
        }
        sinks.len()
    }

    /// The domain spec last defined for `vm`.
    pub fn spec(&self, vm: VmId) -> Option<DomainSpec> {
        self.host()
            .domains
            .get(&vm)
            .map(|domain| domain.spec.clone())
    }

    fn pipe(&self, vm: VmId) -> Result<Arc<ChannelPipe>, ActuatorError> {
        let mut host = self.host();
        let domain = host
            .domains
            .get_mut(&vm)
            .ok_or(ActuatorError::DomainNotFound { vm })?;
        if domain.state != DomainState::Running {
            return Err(ActuatorError::DomainNotRunning { vm });
        }
        Ok(Arc::clone(
            domain.channel.get_or_insert_with(Default::default),
        ))
    }
}

impl FakeHost {
    fn require_pool(&self) -> Result<(), ActuatorError> {
        if self.pool_exists {
            Ok(())
        } else {
            Err(ActuatorError::Pool {
                pool: self.pool_name.clone(),
                problem: "does not exist: `deskgrid serve` creates it, or check libvirt.pool in config.toml".to_owned(),
            })
        }
    }

    fn used(&self) -> u64 {
        self.volumes
            .values()
            .map(|volume| {
                if volume.backing.is_some() {
                    volume.data.len() as u64
                } else {
                    volume.capacity
                }
            })
            .sum()
    }

    fn available(&self) -> u64 {
        self.pool_capacity.saturating_sub(self.used())
    }

    fn check_space(&self, needed_bytes: u64) -> Result<(), ActuatorError> {
        if self.available() < needed_bytes {
            return Err(ActuatorError::PoolFull {
                pool: self.pool_name.clone(),
                needed_bytes,
                available_bytes: self.available(),
            });
        }
        Ok(())
    }

    fn add_volume(
        &mut self,
        name: VolumeName,
        capacity: u64,
        backing: Option<String>,
    ) -> Result<VolumeInfo, ActuatorError> {
        let key = name.to_string();
        if self.volumes.contains_key(&key) {
            return Err(ActuatorError::VolumeExists {
                pool: self.pool_name.clone(),
                name: key,
            });
        }
        let volume = FakeVolume {
            name,
            capacity,
            data: Vec::new(),
            backing,
        };
        let info = self.info(&volume);
        self.volumes.insert(key, volume);
        Ok(info)
    }

    fn info(&self, volume: &FakeVolume) -> VolumeInfo {
        VolumeInfo {
            name: volume.name.clone(),
            path: format!("/fake/{}/{}", self.pool_name, volume.name),
            capacity_bytes: volume.capacity,
            allocation_bytes: volume.data.len() as u64,
        }
    }

    fn volume_mut(&mut self, name: &VolumeName) -> Result<&mut FakeVolume, ActuatorError> {
        let pool = self.pool_name.clone();
        self.volumes
            .get_mut(&name.to_string())
            .ok_or_else(|| ActuatorError::VolumeNotFound {
                pool,
                name: name.to_string(),
            })
    }

    fn domain_mut(&mut self, vm: VmId) -> Result<&mut FakeDomain, ActuatorError> {
        self.domains
            .get_mut(&vm)
            .ok_or(ActuatorError::DomainNotFound { vm })
    }
}

impl Hypervisor for FakeHypervisor {
    fn host_capacity(&self) -> Result<HostCapacity, ActuatorError> {
        let host = self.host();
        host.require_pool()?;
        let used_memory: u64 = host
            .domains
            .values()
            .filter(|domain| domain.state == DomainState::Running)
            .map(|domain| domain.spec.memory_mib)
            .sum();
        Ok(HostCapacity {
            cpus: host.cpus,
            memory_total_mib: host.memory_mib,
            memory_free_mib: host.memory_mib.saturating_sub(used_memory),
            storage_total_bytes: host.pool_capacity,
            storage_free_bytes: host.available(),
        })
    }

    fn ensure_pool(&self) -> Result<PoolInfo, ActuatorError> {
        let mut host = self.host();
        host.pool_exists = true;
        Ok(PoolInfo {
            name: host.pool_name.clone(),
            path: format!("/fake/{}", host.pool_name),
            capacity_bytes: host.pool_capacity,
            available_bytes: host.available(),
        })
    }

    fn create_base_volume(
        &self,
        image: &ImageVersionId,
        capacity_bytes: u64,
        _format: VolumeFormat,
    ) -> Result<VolumeInfo, ActuatorError> {
        let mut host = self.host();
        host.require_pool()?;
        host.check_space(capacity_bytes)?;
        host.add_volume(VolumeName::Base(image.clone()), capacity_bytes, None)
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
        let mut data = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        while (data.len() as u64) < size {
            let want = usize::try_from(size - data.len() as u64)
                .unwrap_or(usize::MAX)
                .min(buffer.len());
            let read = match source.read(&mut buffer[..want]) {
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    self.host().volumes.remove(&info.name.to_string());
                    return Err(ActuatorError::Stream {
                        operation: "read the source of",
                        name: info.name.to_string(),
                        source: error,
                    });
                }
            };
            if read == 0 {
                self.host().volumes.remove(&info.name.to_string());
                return Err(ActuatorError::Stream {
                    operation: "upload",
                    name: info.name.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the source ended after {} of {size} bytes", data.len()),
                    ),
                });
            }
            data.extend_from_slice(&buffer[..read]);
            progress(data.len() as u64);
        }
        let mut host = self.host();
        let volume = host.volume_mut(&info.name)?;
        volume.data = data;
        let volume = &host.volumes[&info.name.to_string()];
        Ok(host.info(volume))
    }

    fn export_volume(
        &self,
        name: &VolumeName,
        sink: &mut dyn Write,
        progress: Progress<'_>,
    ) -> Result<u64, ActuatorError> {
        let (data, capacity) = {
            let mut host = self.host();
            let volume = host.volume_mut(name)?;
            (volume.data.clone(), volume.capacity)
        };
        let stream_error = |source| ActuatorError::Stream {
            operation: "write the download of",
            name: name.to_string(),
            source,
        };
        sink.write_all(&data).map_err(stream_error)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut done = data.len() as u64;
        while done < capacity {
            let count = usize::try_from(capacity - done)
                .unwrap_or(usize::MAX)
                .min(zeros.len());
            sink.write_all(&zeros[..count]).map_err(stream_error)?;
            done += count as u64;
            progress(done);
        }
        Ok(capacity)
    }

    fn read_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ActuatorError> {
        let mut host = self.host();
        let volume = host.volume_mut(name)?;
        let end = offset.checked_add(length);
        let Some(end) = end.filter(|end| *end <= volume.capacity) else {
            return Err(ActuatorError::OutOfBounds {
                what: "a read",
                name: name.to_string(),
                limit: volume.capacity,
            });
        };
        let mut bytes = vec![0u8; (end - offset) as usize];
        let stored = volume.data.len() as u64;
        if offset < stored {
            let copied = (end.min(stored) - offset) as usize;
            let start = offset as usize;
            bytes[..copied].copy_from_slice(&volume.data[start..start + copied]);
        }
        Ok(bytes)
    }

    fn write_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ActuatorError> {
        let mut host = self.host();
        let volume = host.volume_mut(name)?;
        let end = offset.checked_add(data.len() as u64);
        let Some(end) = end.filter(|end| *end <= volume.capacity) else {
            return Err(ActuatorError::OutOfBounds {
                what: "a write",
                name: name.to_string(),
                limit: volume.capacity,
            });
        };
        let (start, end) = (offset as usize, end as usize);
        if volume.data.len() < end {
            volume.data.resize(end, 0);
        }
        volume.data[start..end].copy_from_slice(data);
        Ok(())
    }

    fn create_linked_clone(
        &self,
        vm: VmId,
        base: &ImageVersionId,
    ) -> Result<VolumeInfo, ActuatorError> {
        let mut host = self.host();
        host.require_pool()?;
        let base_name = VolumeName::Base(base.clone());
        let capacity = host.volume_mut(&base_name)?.capacity;
        host.check_space(1 << 20)?;
        host.add_volume(
            VolumeName::Overlay(vm),
            capacity,
            Some(base_name.to_string()),
        )
    }

    fn delete_volume(&self, name: &VolumeName) -> Result<(), ActuatorError> {
        let mut host = self.host();
        host.volume_mut(name)?;
        host.volumes.remove(&name.to_string());
        Ok(())
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ActuatorError> {
        let host = self.host();
        host.require_pool()?;
        Ok(host
            .volumes
            .values()
            .map(|volume| host.info(volume))
            .collect())
    }

    fn define_domain(&self, spec: &DomainSpec) -> Result<(), ActuatorError> {
        let mut host = self.host();
        match host.domains.get_mut(&spec.vm) {
            Some(domain) => domain.spec = spec.clone(),
            None => {
                host.domains.insert(
                    spec.vm,
                    FakeDomain {
                        spec: spec.clone(),
                        state: DomainState::ShutOff,
                        port: 0,
                        ticket: None,
                        channel: None,
                    },
                );
            }
        }
        Ok(())
    }

    fn start_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        let mut host = self.host();
        let port = host.next_port;
        let domain = host.domain_mut(vm)?;
        if domain.state == DomainState::Running {
            return Err(ActuatorError::Libvirt {
                operation: "start a domain",
                message: "domain is already running".to_owned(),
            });
        }
        domain.state = DomainState::Running;
        domain.port = port;
        host.next_port += 1;
        Ok(())
    }

    fn shutdown_domain(
        &self,
        vm: VmId,
        _timeout: Duration,
    ) -> Result<ShutdownOutcome, ActuatorError> {
        let mut host = self.host();
        let domain = host.domain_mut(vm)?;
        if domain.state == DomainState::ShutOff {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        stop(domain);
        Ok(ShutdownOutcome::Graceful)
    }

    fn destroy_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        let mut host = self.host();
        stop(host.domain_mut(vm)?);
        Ok(())
    }

    fn undefine_domain(&self, vm: VmId) -> Result<(), ActuatorError> {
        let mut host = self.host();
        if host.domain_mut(vm)?.state != DomainState::ShutOff {
            return Err(ActuatorError::Libvirt {
                operation: "undefine a domain",
                message: format!("VM {vm} is still running: shut it down first"),
            });
        }
        host.domains.remove(&vm);
        host.volumes.remove(&VolumeName::Overlay(vm).to_string());
        Ok(())
    }

    fn list_domains(&self) -> Result<Vec<DomainStatus>, ActuatorError> {
        Ok(self
            .host()
            .domains
            .values()
            .map(|domain| DomainStatus {
                vm: domain.spec.vm,
                template: domain.spec.template.clone(),
                image: domain.spec.image.clone(),
                state: domain.state,
            })
            .collect())
    }

    fn domain_state(&self, vm: VmId) -> Result<DomainState, ActuatorError> {
        Ok(self.host().domain_mut(vm)?.state)
    }

    fn set_display_ticket(
        &self,
        vm: VmId,
        password: &str,
        valid_for: Duration,
    ) -> Result<DisplayEndpoint, ActuatorError> {
        let mut host = self.host();
        let domain = host.domain_mut(vm)?;
        if domain.state != DomainState::Running {
            return Err(ActuatorError::DomainNotRunning { vm });
        }
        domain.ticket = Some((password.to_owned(), valid_for));
        Ok(DisplayEndpoint {
            protocol: domain.spec.display.protocol,
            listen: domain.spec.display.listen.to_string(),
            port: domain.port,
            websocket_port: None,
        })
    }

    fn open_guest_channel(&self, vm: VmId) -> Result<Box<dyn GuestChannel>, ActuatorError> {
        Ok(Box::new(FakeChannel {
            pipe: self.pipe(vm)?,
        }))
    }

    fn watch_displays(&self, sink: DisplaySink) -> Result<Box<dyn DisplayWatch>, ActuatorError> {
        let sink = Arc::new(sink);
        self.host().display_sinks.push(Arc::downgrade(&sink));
        Ok(Box::new(FakeDisplayWatch { _sink: sink }))
    }
}

/// Holds its sink alive; [`FakeHypervisor::display_event`] reaches it.
struct FakeDisplayWatch {
    _sink: Arc<DisplaySink>,
}

impl std::fmt::Debug for FakeDisplayWatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("FakeDisplayWatch")
    }
}

impl DisplayWatch for FakeDisplayWatch {
    fn is_alive(&self) -> bool {
        true
    }
}

fn stop(domain: &mut FakeDomain) {
    domain.state = DomainState::ShutOff;
    domain.ticket = None;
    if let Some(pipe) = domain.channel.take() {
        pipe.buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .closed = true;
        pipe.ready.notify_all();
    }
}

/// The host's end of a fake guest channel: reads block until the guest
/// writes or the domain stops (end of stream).
#[derive(Debug)]
struct FakeChannel {
    pipe: Arc<ChannelPipe>,
}

impl Read for FakeChannel {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let mut buffers = self
            .pipe
            .buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        while buffers.to_host.is_empty() && !buffers.closed {
            buffers = self
                .pipe
                .ready
                .wait(buffers)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        let count = buffer.len().min(buffers.to_host.len());
        for (slot, byte) in buffer.iter_mut().zip(buffers.to_host.drain(..count)) {
            *slot = byte;
        }
        Ok(count)
    }
}

impl Write for FakeChannel {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut buffers = self
            .pipe
            .buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buffers.closed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the domain stopped",
            ));
        }
        buffers.to_guest.extend(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl GuestChannel for FakeChannel {}
