//! Carrying out one plan step on this host: pull or drop a base image,
//! create or remove desktop VMs. Every step is idempotent (what is already
//! done is skipped, what is already gone is not an error), so a retry after
//! a failure half-way, or after a crash, finishes the work.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::host::{ImagePuller, PolicyHost};
use crate::actuator::{ActuatorError, AsyncHypervisor, VolumeName};
use crate::model::{
    BaseImage, ImageHolding, ImageVersionId, ServerRecord, Template, TemplateName, VmId, VmRecord,
    VmState,
};
use crate::placement::Action;

/// Why a policy job failed.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("template {template} is not in the grid state")]
    UnknownTemplate { template: TemplateName },
    #[error("image version {image} is not in the grid state")]
    UnknownImage { image: ImageVersionId },
    #[error("image {image} is not complete on this server")]
    ImageNotComplete { image: ImageVersionId },
    #[error("image {image} is still used by {n_vms} VM(s) here")]
    ImageInUse { image: ImageVersionId, n_vms: usize },
    #[error("VM {vm} is reserved or in use")]
    VmInUse { vm: VmId },
    #[error("cannot pull image {image}: {reason}")]
    Pull {
        image: ImageVersionId,
        reason: String,
    },
    #[error("cannot {operation} for VM {vm}")]
    Vm {
        operation: &'static str,
        vm: VmId,
        #[source]
        source: ActuatorError,
    },
    #[error("cannot delete a volume of image {image}")]
    DropVolume {
        image: ImageVersionId,
        #[source]
        source: ActuatorError,
    },
    #[error("{failed} of {count} VM(s) could not be created")]
    CreateVms {
        failed: u32,
        count: u32,
        #[source]
        first: Box<PolicyError>,
    },
    #[error("cannot update this server's record: {reason}")]
    Record { reason: String },
    #[error("the server is stopping")]
    Stopping,
    #[error("the job's task stopped unexpectedly")]
    TaskLost,
}

/// How often a started VM's record is read while it holds a boot slot.
const BOOT_SLOT_POLL: Duration = Duration::from_millis(500);
/// The longest a started VM holds its boot slot: the desktop service's boot
/// timeout (`LifecyclePolicy::boot_timeout_ms`) fails it by then anyway.
const BOOT_SLOT_MAX_HOLD: Duration = Duration::from_secs(300);

/// How many VMs this server provisions at once (`Policy.max_concurrent_boots`).
/// The limit is the grid's policy and may change while VMs are booting: a
/// new limit takes a new semaphore, boots under the old one finish under it.
#[derive(Debug)]
pub(crate) struct BootSlots {
    current: Mutex<(u32, Arc<Semaphore>)>,
}

impl BootSlots {
    pub fn new(limit: u32) -> Self {
        let limit = limit.max(1);
        Self {
            current: Mutex::new((limit, Arc::new(Semaphore::new(limit as usize)))),
        }
    }

    pub fn set_limit(&self, limit: u32) {
        let limit = limit.max(1);
        let mut current = self.lock();
        if current.0 != limit {
            tracing::info!(
                from = current.0,
                to = limit,
                "concurrent boot limit changed"
            );
            *current = (limit, Arc::new(Semaphore::new(limit as usize)));
        }
    }

    async fn acquire(&self) -> OwnedSemaphorePermit {
        let semaphore = Arc::clone(&self.lock().1);
        // The semaphore is never closed, so acquiring cannot fail; should it
        // ever be, boot without a slot rather than never.
        match semaphore.acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => Arc::new(Semaphore::new(1))
                .try_acquire_owned()
                .expect("a fresh one-permit semaphore has its permit"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u32, Arc<Semaphore>)> {
        // Holds two plain values: a panic elsewhere cannot leave them half-set.
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What every job shares.
#[derive(Debug)]
pub(crate) struct StepContext {
    pub host: Arc<dyn PolicyHost>,
    pub hypervisor: AsyncHypervisor,
    pub images: Arc<dyn ImagePuller>,
    pub boots: BootSlots,
    /// Turns true when the server stops: jobs stop before their next VM.
    pub shutdown: watch::Receiver<bool>,
    /// `PolicySettings::ready_on_start`.
    pub ready_on_start: bool,
}

/// What a step needs from the state the plan was made on.
#[derive(Debug, Clone, Default)]
pub(crate) struct StepInput {
    /// This server's record as the plan saw it.
    pub own: Option<ServerRecord>,
    /// The `CreateVms` step's template.
    pub template: Option<Template>,
    /// The `PullImage` step's image version.
    pub image: Option<BaseImage>,
}

/// Carries out `action` on this host.
pub(crate) async fn execute(
    context: Arc<StepContext>,
    action: Action,
    input: StepInput,
) -> Result<(), PolicyError> {
    match action {
        Action::PullImage { image } => pull_image(&context, image, input).await,
        Action::DropImage { image } => drop_image(&context, image, input).await,
        Action::CreateVms {
            template,
            image,
            count,
        } => create_vms(&context, template, image, count, input).await,
        Action::RemoveVm { vm, .. } => remove_vm(&context, vm, input).await,
        Action::RefreshVm { vm, template } => refresh_vm(&context, vm, template, input).await,
    }
}

async fn pull_image(
    context: &StepContext,
    image: ImageVersionId,
    input: StepInput,
) -> Result<(), PolicyError> {
    if holding(input.own.as_ref(), &image) == Some(&ImageHolding::Complete) {
        return Ok(());
    }
    let base = input.image.ok_or_else(|| PolicyError::UnknownImage {
        image: image.clone(),
    })?;
    // Shown as pulling while it runs, so every plan counts this server as
    // a holder and nobody else starts a pull for the same need. A pull
    // resumed after a failure or a restart keeps the progress it shows.
    let bytes_total = base.virtual_size;
    let marked = image.clone();
    update_record(&context.host, move |record| {
        record
            .images
            .entry(marked.clone())
            .or_insert(ImageHolding::Partial {
                bytes_done: 0,
                bytes_total,
            });
    })
    .await?;
    match context.images.pull(&base).await {
        Ok(()) => {
            let complete = image.clone();
            update_record(&context.host, move |record| {
                record
                    .images
                    .insert(complete.clone(), ImageHolding::Complete);
            })
            .await
        }
        Err(reason) => {
            // A pull that left a base volume keeps it, its progress file and
            // the `Partial` record: the loop resumes it after its back-off
            // (`worker.rs`, `resume_pulls`), fetching only what is missing.
            // One that left nothing (no holder answered, say) has nothing
            // to resume: the record forgets it, so the next plan sees the
            // need again.
            let name = VolumeName::Base(image.clone());
            let left = context
                .hypervisor
                .run(move |host| {
                    Ok(host
                        .list_volumes()?
                        .iter()
                        .any(|volume| volume.name == name))
                })
                .await;
            match left {
                Ok(true) => {}
                Ok(false) => {
                    let abandoned = image.clone();
                    let cleared = update_record(&context.host, move |record| {
                        if matches!(
                            record.images.get(&abandoned),
                            Some(ImageHolding::Partial { .. })
                        ) {
                            record.images.remove(&abandoned);
                        }
                    })
                    .await;
                    if let Err(error) = cleared {
                        tracing::warn!(%image, error = %crate::error_chain(&error), "cannot clear a failed pull from the record");
                    }
                }
                Err(error) => {
                    tracing::warn!(%image, error = %crate::error_chain(&error), "cannot tell whether a failed pull left a volume; its record stays");
                }
            }
            Err(PolicyError::Pull { image, reason })
        }
    }
}

async fn drop_image(
    context: &StepContext,
    image: ImageVersionId,
    input: StepInput,
) -> Result<(), PolicyError> {
    let n_vms = input.own.as_ref().map_or(0, |record| {
        record.vms.values().filter(|vm| vm.image == image).count()
    });
    if n_vms > 0 {
        return Err(PolicyError::ImageInUse { image, n_vms });
    }
    for name in [
        VolumeName::Base(image.clone()),
        VolumeName::Partial(image.clone()),
    ] {
        let deleted = context
            .hypervisor
            .run(move |host| match host.delete_volume(&name) {
                Ok(()) | Err(ActuatorError::VolumeNotFound { .. }) => Ok(()),
                Err(error) => Err(error),
            })
            .await;
        deleted.map_err(|source| PolicyError::DropVolume {
            image: image.clone(),
            source,
        })?;
    }
    let dropped = image.clone();
    update_record(&context.host, move |record| {
        record.images.remove(&dropped);
    })
    .await
}

async fn create_vms(
    context: &Arc<StepContext>,
    template_name: TemplateName,
    image: ImageVersionId,
    count: u32,
    input: StepInput,
) -> Result<(), PolicyError> {
    let template = input
        .template
        .filter(|template| template.name == template_name)
        .ok_or(PolicyError::UnknownTemplate {
            template: template_name,
        })?;
    if holding(input.own.as_ref(), &image) != Some(&ImageHolding::Complete) {
        return Err(PolicyError::ImageNotComplete { image });
    }
    let vms: Vec<VmId> = (0..count).map(|_| VmId::random()).collect();
    // Recorded before any work, in one write: every plan from now on counts
    // them, so no server creates them a second time, and a crash leaves a
    // trace the next start marks failed.
    let provisioning: Vec<VmRecord> = vms
        .iter()
        .map(|vm| VmRecord {
            id: *vm,
            template: template.name.clone(),
            image: image.clone(),
            state: VmState::Provisioning,
            user: None,
            vcpus: template.vcpus,
            memory_mib: template.memory_mib,
        })
        .collect();
    update_record(&context.host, move |record| {
        for vm in &provisioning {
            record.vms.insert(vm.id, vm.clone());
        }
    })
    .await?;

    let mut creations = JoinSet::new();
    for vm in vms {
        let context = Arc::clone(context);
        let template = template.clone();
        let image = image.clone();
        creations.spawn(async move { create_vm(&context, &template, &image, vm).await });
    }
    let mut failed = 0u32;
    let mut first_error = None;
    while let Some(joined) = creations.join_next().await {
        let outcome = joined.unwrap_or(Err(PolicyError::TaskLost));
        if let Err(error) = outcome {
            failed += 1;
            first_error.get_or_insert(error);
        }
    }
    match first_error {
        None => Ok(()),
        Some(first) => Err(PolicyError::CreateVms {
            failed,
            count,
            first: Box::new(first),
        }),
    }
}

/// One VM: a boot slot, then linked clone, domain, start; on failure
/// whatever was made is removed again, from the host and the record.
async fn create_vm(
    context: &StepContext,
    template: &Template,
    image: &ImageVersionId,
    vm: VmId,
) -> Result<(), PolicyError> {
    let mut shutdown = context.shutdown.clone();
    // The slot covers clone, define and start, and with the desktop service
    // the boot itself: it is held until the agent's hello (see
    // `hold_until_booted`), which is what tames a 9 a.m. boot storm.
    let slot = tokio::select! {
        slot = context.boots.acquire() => Some(slot),
        _ = shutdown.wait_for(|stopping| *stopping) => None,
    };
    let result = match slot {
        Some(_) => provision(context, template, image, vm).await,
        None => Err(PolicyError::Stopping),
    };
    match result {
        Ok(()) => {
            // Started. With the desktop service (`ready_on_start` false) the
            // VM is `Provisioning` until its agent says hello, and that
            // service makes it `Ready`; a refreshed VM goes from
            // `Refreshing` back to `Provisioning`, which is how the service
            // learns that the refresh is done. Without it, ready at once.
            let state = if context.ready_on_start {
                VmState::Ready
            } else {
                VmState::Provisioning
            };
            update_record(&context.host, move |record| {
                if let Some(entry) = record.vms.get_mut(&vm) {
                    entry.state = state;
                }
            })
            .await?;
            if let (false, Some(slot)) = (context.ready_on_start, slot) {
                hold_until_booted(context, vm, slot);
            }
            Ok(())
        }
        Err(error) => {
            if let Err(cleanup) = destroy(&context.hypervisor, vm).await {
                tracing::warn!(%vm, error = %crate::error_chain(&cleanup), "cannot clean up a VM that failed to provision");
            }
            let forgotten = update_record(&context.host, move |record| {
                record.vms.remove(&vm);
            })
            .await;
            if let Err(forget) = forgotten {
                tracing::warn!(%vm, error = %crate::error_chain(&forget), "cannot remove a failed VM from the record");
            }
            Err(error)
        }
    }
}

/// Keeps a started VM's boot slot until the VM leaves `Provisioning` (its
/// agent said hello, or it failed or went away), the boot timeout passed,
/// or the server stops. The job goes on meanwhile; the next VM waits for a
/// free slot.
fn hold_until_booted(context: &StepContext, vm: VmId, slot: OwnedSemaphorePermit) {
    let host = Arc::clone(&context.host);
    let mut shutdown = context.shutdown.clone();
    tokio::spawn(async move {
        let held_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(BOOT_SLOT_POLL) => {}
                _ = shutdown.wait_for(|stopping| *stopping) => break,
            }
            let asking = Arc::clone(&host);
            let state = tokio::task::spawn_blocking(move || asking.own_vm_state(vm))
                .await
                .ok()
                .flatten();
            if state != Some(VmState::Provisioning) {
                break;
            }
            if held_since.elapsed() >= BOOT_SLOT_MAX_HOLD {
                tracing::warn!(%vm, held_s = held_since.elapsed().as_secs(), "a VM still boots; its boot slot is released anyway");
                break;
            }
        }
        drop(slot);
    });
}

async fn provision(
    context: &StepContext,
    template: &Template,
    image: &ImageVersionId,
    vm: VmId,
) -> Result<(), PolicyError> {
    let vm_error = |operation| {
        move |source| PolicyError::Vm {
            operation,
            vm,
            source,
        }
    };
    let base = image.clone();
    let volume = context
        .hypervisor
        .run(move |host| host.create_linked_clone(vm, &base))
        .await
        .map_err(vm_error("create the disk"))?;
    let mut spec = context.host.domain_spec(template, vm, volume.path);
    // The plan's image, which the template may have moved away from since.
    spec.image = image.clone();
    context
        .hypervisor
        .run(move |host| host.define_domain(&spec))
        .await
        .map_err(vm_error("define the domain"))?;
    context
        .hypervisor
        .run(move |host| host.start_domain(vm))
        .await
        .map_err(vm_error("start the domain"))
}

async fn remove_vm(context: &StepContext, vm: VmId, input: StepInput) -> Result<(), PolicyError> {
    let record = input.own.as_ref().and_then(|own| own.vms.get(&vm));
    // The plan only removes idle or failed VMs; one reserved since is kept.
    if record.is_some_and(|record| {
        record.user.is_some() || matches!(record.state, VmState::Reserved | VmState::InUse)
    }) {
        return Err(PolicyError::VmInUse { vm });
    }
    destroy(&context.hypervisor, vm)
        .await
        .map_err(|source| PolicyError::Vm {
            operation: "remove the VM",
            vm,
            source,
        })?;
    update_record(&context.host, move |record| {
        record.vms.remove(&vm);
    })
    .await
}

/// A pooled VM whose session ended: its disk is thrown away and cloned
/// afresh from the base image, then it boots again (through a boot slot,
/// like a new VM) and is ready for the next user. Already refreshed: done.
/// If it cannot be made again it leaves the record, and the next plan
/// creates a replacement.
async fn refresh_vm(
    context: &Arc<StepContext>,
    vm: VmId,
    template_name: TemplateName,
    input: StepInput,
) -> Result<(), PolicyError> {
    let Some(record) = input.own.as_ref().and_then(|own| own.vms.get(&vm)) else {
        return Ok(());
    };
    match record.state {
        VmState::Refreshing => {}
        VmState::Reserved | VmState::InUse => return Err(PolicyError::VmInUse { vm }),
        _ => return Ok(()),
    }
    let image = record.image.clone();
    let template = input
        .template
        .filter(|template| template.name == template_name)
        .ok_or(PolicyError::UnknownTemplate {
            template: template_name,
        })?;
    if holding(input.own.as_ref(), &image) != Some(&ImageHolding::Complete) {
        return Err(PolicyError::ImageNotComplete { image });
    }
    update_record(&context.host, move |record| {
        if let Some(entry) = record.vms.get_mut(&vm) {
            entry.user = None;
        }
    })
    .await?;
    destroy(&context.hypervisor, vm)
        .await
        .map_err(|source| PolicyError::Vm {
            operation: "throw away the old disk",
            vm,
            source,
        })?;
    create_vm(context, &template, &image, vm).await
}

/// Off, undefined, disk deleted; what is already gone is no error.
async fn destroy(hypervisor: &AsyncHypervisor, vm: VmId) -> Result<(), ActuatorError> {
    hypervisor
        .run(move |host| {
            match host.destroy_domain(vm) {
                Ok(()) => host.undefine_domain(vm)?,
                Err(ActuatorError::DomainNotFound { .. }) => {}
                Err(error) => return Err(error),
            }
            // `undefine_domain` deletes the overlay; a clone whose domain was
            // never defined is deleted here.
            match host.delete_volume(&VolumeName::Overlay(vm)) {
                Ok(()) | Err(ActuatorError::VolumeNotFound { .. }) => Ok(()),
                Err(error) => Err(error),
            }
        })
        .await
}

fn holding<'a>(own: Option<&'a ServerRecord>, image: &ImageVersionId) -> Option<&'a ImageHolding> {
    own.and_then(|record| record.images.get(image))
}

/// Changes this server's record on the blocking pool (the write is an fsync).
pub(crate) async fn update_record(
    host: &Arc<dyn PolicyHost>,
    mut change: impl FnMut(&mut ServerRecord) + Send + 'static,
) -> Result<(), PolicyError> {
    let host = Arc::clone(host);
    tokio::task::spawn_blocking(move || host.update_own_record(&mut change))
        .await
        .map_err(|_| PolicyError::TaskLost)?
        .map_err(|reason| PolicyError::Record { reason })
}
