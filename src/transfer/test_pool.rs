//! An in-memory storage pool for transfer's unit tests: base volumes that
//! can be created (within the pool's size), read, written, listed and
//! deleted; everything else a [`Hypervisor`] does is refused.
//!
//! The actuator's own fake is its internal (adapters use each other's root
//! items only), and transfer needs a sharper rule than it has anyway: like
//! libvirt, this pool refuses a second write into a volume while one is in
//! progress ("still in use"), so the tests show that a pull never writes
//! one volume from two streams at once.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::actuator::{
    ActuatorError, DisplayEndpoint, DomainSpec, DomainState, DomainStatus, GuestChannel,
    Hypervisor, PoolInfo, ShutdownOutcome, VolumeFormat, VolumeInfo, VolumeName,
};
use crate::model::{HostCapacity, ImageVersionId, VmId};

const POOL: &str = "test-pool";

/// A pool of `capacity` bytes; cloning shares it.
#[derive(Debug, Clone)]
pub(crate) struct TestPool {
    inner: Arc<Mutex<Pool>>,
    refused_writes: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Pool {
    capacity: u64,
    volumes: BTreeMap<VolumeName, Volume>,
}

#[derive(Debug)]
struct Volume {
    data: Vec<u8>,
    writing: bool,
}

impl TestPool {
    pub fn new(capacity: u64) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Pool {
                capacity,
                volumes: BTreeMap::new(),
            })),
            refused_writes: Arc::default(),
            writes: Arc::default(),
        }
    }

    /// Writes (uploads) that went through.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Writes refused because another was in progress on the volume.
    pub fn refused_writes(&self) -> u64 {
        self.refused_writes.load(Ordering::SeqCst)
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn not_found(name: &VolumeName) -> ActuatorError {
        ActuatorError::VolumeNotFound {
            pool: POOL.to_owned(),
            name: name.to_string(),
        }
    }
}

fn refused(operation: &'static str) -> ActuatorError {
    ActuatorError::Libvirt {
        operation,
        message: "not in the transfer tests' pool".to_owned(),
    }
}

impl Hypervisor for TestPool {
    fn host_capacity(&self) -> Result<HostCapacity, ActuatorError> {
        Err(refused("read host capacity"))
    }

    fn ensure_pool(&self) -> Result<PoolInfo, ActuatorError> {
        let pool = self.pool();
        let used: u64 = pool
            .volumes
            .values()
            .map(|volume| volume.data.len() as u64)
            .sum();
        Ok(PoolInfo {
            name: POOL.to_owned(),
            path: format!("/{POOL}"),
            capacity_bytes: pool.capacity,
            available_bytes: pool.capacity.saturating_sub(used),
        })
    }

    fn create_base_volume(
        &self,
        image: &ImageVersionId,
        capacity_bytes: u64,
        _format: VolumeFormat,
    ) -> Result<VolumeInfo, ActuatorError> {
        let available = self.ensure_pool()?.available_bytes;
        let mut pool = self.pool();
        if available < capacity_bytes {
            return Err(ActuatorError::PoolFull {
                pool: POOL.to_owned(),
                needed_bytes: capacity_bytes,
                available_bytes: available,
            });
        }
        let name = VolumeName::Base(image.clone());
        if pool.volumes.contains_key(&name) {
            return Err(ActuatorError::VolumeExists {
                pool: POOL.to_owned(),
                name: name.to_string(),
            });
        }
        let size = usize::try_from(capacity_bytes).expect("test volumes fit in memory");
        pool.volumes.insert(
            name.clone(),
            Volume {
                data: vec![0; size],
                writing: false,
            },
        );
        Ok(VolumeInfo {
            path: format!("/{POOL}/{name}"),
            name,
            capacity_bytes,
            allocation_bytes: capacity_bytes,
        })
    }

    fn import_base_image(
        &self,
        _image: &ImageVersionId,
        _format: VolumeFormat,
        _size: u64,
        _source: &mut dyn Read,
        _progress: &mut dyn FnMut(u64),
    ) -> Result<VolumeInfo, ActuatorError> {
        Err(refused("import a base image"))
    }

    fn export_volume(
        &self,
        _name: &VolumeName,
        _sink: &mut dyn Write,
        _progress: &mut dyn FnMut(u64),
    ) -> Result<u64, ActuatorError> {
        Err(refused("export a volume"))
    }

    fn read_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ActuatorError> {
        let pool = self.pool();
        let volume = pool
            .volumes
            .get(name)
            .ok_or_else(|| Self::not_found(name))?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(length).unwrap_or(usize::MAX));
        volume
            .data
            .get(start..end)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| ActuatorError::OutOfBounds {
                what: "a read",
                name: name.to_string(),
                limit: volume.data.len() as u64,
            })
    }

    fn write_volume_at(
        &self,
        name: &VolumeName,
        offset: u64,
        data: &[u8],
    ) -> Result<(), ActuatorError> {
        {
            let mut pool = self.pool();
            let volume = pool
                .volumes
                .get_mut(name)
                .ok_or_else(|| Self::not_found(name))?;
            if volume.writing {
                self.refused_writes.fetch_add(1, Ordering::SeqCst);
                return Err(ActuatorError::Libvirt {
                    operation: "start a volume upload",
                    message: format!("volume '{name}' is still in use"),
                });
            }
            volume.writing = true;
            self.writes.fetch_add(1, Ordering::SeqCst);
        }
        // Long enough for a second writer to run into the first.
        std::thread::sleep(Duration::from_micros(200));
        let mut pool = self.pool();
        let volume = pool
            .volumes
            .get_mut(name)
            .ok_or_else(|| Self::not_found(name))?;
        volume.writing = false;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(data.len());
        let limit = volume.data.len() as u64;
        let target = volume
            .data
            .get_mut(start..end)
            .ok_or_else(|| ActuatorError::OutOfBounds {
                what: "a write",
                name: name.to_string(),
                limit,
            })?;
        target.copy_from_slice(data);
        Ok(())
    }

    fn create_linked_clone(
        &self,
        _vm: VmId,
        _base: &ImageVersionId,
    ) -> Result<VolumeInfo, ActuatorError> {
        Err(refused("create a linked clone"))
    }

    fn delete_volume(&self, name: &VolumeName) -> Result<(), ActuatorError> {
        self.pool()
            .volumes
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| Self::not_found(name))
    }

    fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ActuatorError> {
        Ok(self
            .pool()
            .volumes
            .iter()
            .map(|(name, volume)| VolumeInfo {
                name: name.clone(),
                path: format!("/{POOL}/{name}"),
                capacity_bytes: volume.data.len() as u64,
                allocation_bytes: volume.data.len() as u64,
            })
            .collect())
    }

    fn define_domain(&self, _spec: &DomainSpec) -> Result<(), ActuatorError> {
        Err(refused("define a domain"))
    }

    fn start_domain(&self, _vm: VmId) -> Result<(), ActuatorError> {
        Err(refused("start a domain"))
    }

    fn shutdown_domain(
        &self,
        _vm: VmId,
        _timeout: Duration,
    ) -> Result<ShutdownOutcome, ActuatorError> {
        Err(refused("shut a domain down"))
    }

    fn destroy_domain(&self, _vm: VmId) -> Result<(), ActuatorError> {
        Err(refused("destroy a domain"))
    }

    fn undefine_domain(&self, _vm: VmId) -> Result<(), ActuatorError> {
        Err(refused("undefine a domain"))
    }

    fn list_domains(&self) -> Result<Vec<DomainStatus>, ActuatorError> {
        Ok(Vec::new())
    }

    fn domain_state(&self, vm: VmId) -> Result<DomainState, ActuatorError> {
        Err(ActuatorError::DomainNotFound { vm })
    }

    fn set_display_ticket(
        &self,
        vm: VmId,
        _password: &str,
        _valid_for: Duration,
    ) -> Result<DisplayEndpoint, ActuatorError> {
        Err(ActuatorError::DomainNotFound { vm })
    }

    fn open_guest_channel(&self, vm: VmId) -> Result<Box<dyn GuestChannel>, ActuatorError> {
        Err(ActuatorError::DomainNotFound { vm })
    }

    fn watch_displays(
        &self,
        _sink: crate::actuator::DisplaySink,
    ) -> Result<Box<dyn crate::actuator::DisplayWatch>, ActuatorError> {
        Err(refused("watch displays"))
    }
}
