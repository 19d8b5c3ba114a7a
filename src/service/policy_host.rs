//! The policy loop on this server: the service as its [`PolicyHost`], the
//! libvirt connection it acts through, what wakes it when the state
//! changes, and image transfer: the [`ChunkServer`] that answers peers and
//! the [`ImagePuller`] that fetches from them ([`GridImagePuller`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::desktop_host::ServiceDesktopHost;
use super::images::diffs::{diffs_dir, parent_volume_path, rebuild_from_diff};
use super::{now_ms, GridService, ServiceError};
use crate::actuator::domain_xml::NetworkAttachment;
use crate::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use crate::actuator::{AsyncHypervisor, DomainKind, DomainSpec, Hypervisor};
use crate::appliance::config::Config;
use crate::desktop::reserve::DeskSlot;
use crate::desktop::service::{DesktopService, DesktopSettings};
use crate::federation::membership::MemberState;
use crate::federation::{request_diff_part, ChunkSource, PeerEndpoint};
use crate::model::{
    BaseImage, DisplayProtocol, ImageHolding, ImageVersionId, ServerId, ServerRecord, Template,
    TransferRecord, VmId, VmState,
};
use crate::policy::{
    ImagePuller, PolicyHost, PolicySettings, PolicySnapshot, PolicyWaker, PolicyWorker, PullFuture,
};
use crate::state::{ConfigKey, ConfigValue};
use crate::transfer::swarm::PartialImages;
use crate::transfer::{
    pull_image, ChunkPeer, ChunkServer, HeldImages, ImageOnServer, ManifestStore, ProgressCallback,
    PullSettings, QuicChunkPeer, SourceFeed, Swarm,
};

/// How often the state is checked for changes that arrive without a local
/// write (a peer's delta, the failure detector's news). Local writes wake
/// the loop at once.
/// Backoff between libvirt connection attempts, as the host worker does.
const FIRST_CONNECT_RETRY: Duration = Duration::from_secs(1);
const MAX_CONNECT_RETRY: Duration = Duration::from_secs(60);

/// How this server's new VMs are plugged in, from `config.toml` and libvirt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSettings {
    pub kind: DomainKind,
    pub network: NetworkAttachment,
    /// Where SPICE displays listen: clients connect to them directly.
    pub spice_listen: IpAddr,
    /// Where VNC displays listen: loopback, because the appliance proxies
    /// them (noVNC) and an 8-byte VNC password must not face the network
    /// alone (DESIGN.md section 10).
    pub vnc_listen: IpAddr,
}

impl DomainSettings {
    pub fn from_config(config: &Config, kind: DomainKind) -> Self {
        Self {
            kind,
            network: network_attachment(&config.libvirt.network),
            spice_listen: config.libvirt.spice_listen(config.server.listen.ip()),
            vnc_listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// The network setting as an attachment: `none` (no network card),
/// `user-mode` (QEMU's user-mode networking: no host setup, outgoing
/// connections only), else the name of a libvirt network.
pub fn network_attachment(network: &str) -> NetworkAttachment {
    match network {
        "none" => NetworkAttachment::None,
        "user-mode" => NetworkAttachment::User,
        name => NetworkAttachment::Network(name.to_owned()),
    }
}

/// The service as the policy loop sees it.
#[derive(Debug, Clone)]
pub struct ServicePolicyHost {
    service: Arc<Mutex<GridService>>,
    server_id: ServerId,
    seed: u64,
    domains: DomainSettings,
}

impl ServicePolicyHost {
    pub fn new(service: Arc<Mutex<GridService>>, domains: DomainSettings) -> Self {
        let (server_id, seed) = {
            let service = lock(&service);
            (service.server_id(), service.policy_seed())
        };
        Self {
            service,
            server_id,
            seed,
            domains,
        }
    }
}

impl PolicyHost for ServicePolicyHost {
    fn server_id(&self) -> ServerId {
        self.server_id
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn now_ms(&self) -> u64 {
        now_ms()
    }

    fn snapshot(&self) -> PolicySnapshot {
        let service = lock(&self.service);
        // The same liveness `deskgrid plan` shows, so that it prints what
        // this loop does.
        let liveness = service
            .state
            .servers()
            .map(|(server, _)| (server, service.liveness_of(server)))
            .collect();
        PolicySnapshot {
            state: service.state.clone(),
            liveness,
        }
    }

    fn own_vm_state(&self, vm: VmId) -> Option<VmState> {
        let service = lock(&self.service);
        service
            .state
            .server(self.server_id)
            .and_then(|record| record.vms.get(&vm))
            .map(|entry| entry.state)
    }

    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String> {
        lock(&self.service)
            .update_own_record(change)
            .map_err(|error| crate::error_chain(&error))
    }

    fn domain_spec(&self, template: &Template, vm: VmId, disk_path: String) -> DomainSpec {
        let listen = match template.display {
            DisplayProtocol::Spice => self.domains.spice_listen,
            DisplayProtocol::Vnc => self.domains.vnc_listen,
        };
        let password = crate::actuator::random_display_password(template.display);
        DomainSpec::for_template(
            template,
            vm,
            self.domains.kind,
            disk_path,
            self.domains.network.clone(),
            listen,
            password,
        )
    }
}

impl GridService {
    /// Changes this server's own record with `change`, then persists it and
    /// hands it to the federation; a change that alters nothing writes
    /// nothing. For the policy loop, which owns the record's VMs, images
    /// and jobs.
    pub fn update_own_record(
        &mut self,
        change: &mut dyn FnMut(&mut ServerRecord),
    ) -> Result<(), ServiceError> {
        let Some(before) = self.state.server(self.server_id) else {
            return Err(ServiceError::Grid(
                "this server has no record in the grid state yet".to_owned(),
            ));
        };
        let mut record = before.clone();
        change(&mut record);
        if record == *before {
            return Ok(());
        }
        let now = now_ms();
        record.updated_at_ms = now;
        let hlc = self.clock.tick(now);
        let delta = self
            .state
            .prepare_server_update(self.server_id, hlc, record)?;
        self.commit(delta)
    }

    /// The planner's seed: from the grid id, so every member computes the
    /// same plans; a standalone server (no grid id) uses its own id.
    pub fn policy_seed(&self) -> u64 {
        match self.grid_id() {
            Some(grid) => crate::placement::seed_from_bytes(grid.as_bytes()),
            None => crate::placement::seed_from_bytes(self.server_id.as_bytes()),
        }
    }
}

/// Image transfer on this server: the chunk server that answers peers
/// (handed to the federation at start, given the host once the policy loop
/// has connected to it) and what the puller needs.
#[derive(Debug, Clone)]
pub struct ImageTransfer {
    chunk_server: Arc<ChunkServer>,
    /// Pulls running here, with the chunks they have: the chunk server
    /// serves those too.
    partial: Arc<PartialImages>,
    /// `None` for a standalone server: nobody to pull from.
    endpoint: Option<Arc<PeerEndpoint>>,
    /// `DATA_DIR/transfer`: manifests and progress files.
    transfer_dir: PathBuf,
}

impl ImageTransfer {
    /// `corrupt_every` is the test-only fault hook (see
    /// [`ChunkServer::corrupt_every`]); `None` in production.
    pub fn new(
        service: Arc<Mutex<GridService>>,
        transfer_dir: PathBuf,
        endpoint: Option<Arc<PeerEndpoint>>,
        corrupt_every: Option<NonZeroU64>,
    ) -> Self {
        let manifests = ManifestStore::new(transfer_dir.join("manifests"));
        let partial = Arc::new(PartialImages::new());
        let chunk_server = ChunkServer::new(manifests, Arc::new(ServiceImages(service)))
            .corrupt_every(corrupt_every)
            .diffs_dir(diffs_dir(&transfer_dir))
            .partial_images(Arc::clone(&partial));
        Self {
            chunk_server: Arc::new(chunk_server),
            partial,
            endpoint,
            transfer_dir,
        }
    }

    /// What the federation answers manifest and chunk requests with.
    pub fn chunk_source(&self) -> Arc<dyn ChunkSource> {
        Arc::clone(&self.chunk_server) as Arc<dyn ChunkSource>
    }
}

/// The grid state as the chunk server reads it.
#[derive(Debug)]
struct ServiceImages(Arc<Mutex<GridService>>);

impl HeldImages for ServiceImages {
    fn image_on_server(&self, image: &ImageVersionId) -> ImageOnServer {
        let service = lock(&self.0);
        let Some(ConfigValue::Image(base)) = service.state.config(&ConfigKey::Image(image.clone()))
        else {
            return ImageOnServer::NotInGrid;
        };
        let Some(digest) = base.digest else {
            return ImageOnServer::NoDigest;
        };
        let held = service
            .state
            .server(service.server_id())
            .and_then(|record| record.images.get(image));
        match held {
            Some(ImageHolding::Complete) => ImageOnServer::HeldComplete { digest },
            Some(ImageHolding::Partial { .. }) => ImageOnServer::HeldPartial { digest },
            None => ImageOnServer::NotHeldComplete,
        }
    }
}

/// The real [`ImagePuller`]: fetches a version from every server that holds
/// it complete (through the federation's endpoint) into this host's pool,
/// and shows the bytes done in this server's record as it goes.
#[derive(Debug, Clone)]
pub struct GridImagePuller {
    service: Arc<Mutex<GridService>>,
    endpoint: Option<Arc<PeerEndpoint>>,
    host: Arc<dyn Hypervisor>,
    transfer_dir: PathBuf,
    settings: PullSettings,
    partial: Arc<PartialImages>,
}

impl GridImagePuller {
    pub fn new(
        service: Arc<Mutex<GridService>>,
        transfer: &ImageTransfer,
        host: Arc<dyn Hypervisor>,
    ) -> Self {
        Self {
            service,
            endpoint: transfer.endpoint.clone(),
            host,
            transfer_dir: transfer.transfer_dir.clone(),
            settings: PullSettings::default(),
            partial: Arc::clone(&transfer.partial),
        }
    }
}

impl ImagePuller for GridImagePuller {
    fn pull(&self, image: &BaseImage) -> PullFuture {
        let puller = self.clone();
        let image = image.clone();
        Box::pin(async move {
            let Some(endpoint) = puller.endpoint.clone() else {
                return Err(
                    "this server is in no grid: there is nobody to pull images from".to_owned(),
                );
            };
            let reading = Arc::clone(&puller.service);
            let id = image.id.clone();
            let holders =
                tokio::task::spawn_blocking(move || complete_holders(&lock(&reading), &id))
                    .await
                    .map_err(|error| format!("cannot read the grid state: {error}"))?;
            if image.parent.is_some() {
                match puller.pull_by_diff(&endpoint, &image, &holders).await {
                    DiffOutcome::Rebuilt => return Ok(()),
                    DiffOutcome::NotTried => {}
                    DiffOutcome::Failed(reason) => {
                        tracing::warn!(image = %image.id, %reason, "difference disk unusable; pulling the full version");
                    }
                }
            }
            let peers = {
                let (endpoint, deadline) =
                    (Arc::clone(&endpoint), puller.settings.request_deadline);
                move |holders: Vec<(ServerId, SocketAddr)>| -> Vec<Arc<dyn ChunkPeer>> {
                    holders
                        .into_iter()
                        .map(|(server, address)| {
                            Arc::new(QuicChunkPeer::new(
                                Arc::clone(&endpoint),
                                server,
                                address,
                                deadline,
                            )) as Arc<dyn ChunkPeer>
                        })
                        .collect()
                }
            };
            let sources = peers(holders);
            // Servers that hold the version or pull it too, as they appear.
            let feed: SourceFeed = {
                let (service, id) = (Arc::clone(&puller.service), image.id.clone());
                Arc::new(move || peers(holders_of(&lock(&service), &id, true)))
            };
            let swarm = Swarm {
                more_sources: Some(feed),
                partial: Some(Arc::clone(&puller.partial)),
                start_seed: crate::placement::seed_from_bytes(
                    lock(&puller.service).server_id().as_bytes(),
                ),
            };
            let source_ids: Vec<ServerId> = sources.iter().map(|source| source.server()).collect();
            let recorder = Arc::new(TransferRecorder::new(
                &puller.service,
                &image.id,
                &source_ids,
                false,
            ));
            let on_progress: ProgressCallback = {
                let recorder = Arc::clone(&recorder);
                Arc::new(move |progress| recorder.record(progress.bytes_done, progress.bytes_total))
            };
            let result = pull_image(
                &image,
                sources,
                Arc::clone(&puller.host),
                &puller.transfer_dir,
                &puller.settings,
                on_progress,
                swarm,
            )
            .await;
            // Done or stopped: no longer a transfer in progress.
            let _ = tokio::task::spawn_blocking(move || recorder.clear()).await;
            result
                .map(|_| ())
                .map_err(|error| crate::error_chain(&error))
        })
    }
}

/// Shows one transfer of this server in its record ([`TransferRecord`]),
/// for every admin to see: bytes, rate and sources. Calls block briefly
/// (the service lock): from the blocking pool.
struct TransferRecorder {
    service: Arc<Mutex<GridService>>,
    image: ImageVersionId,
    sources: Vec<String>,
    difference_disk: bool,
    started: std::time::Instant,
    started_at_ms: u64,
    /// Bytes done at the first report: a resumed pull's rate counts only
    /// what this run moved.
    first_done: std::sync::Mutex<Option<u64>>,
}

impl TransferRecorder {
    fn new(
        service: &Arc<Mutex<GridService>>,
        image: &ImageVersionId,
        sources: &[ServerId],
        difference_disk: bool,
    ) -> Self {
        let sources = {
            let service = lock(service);
            sources
                .iter()
                .map(|server| {
                    service
                        .state
                        .server(*server)
                        .map_or_else(|| server.to_string(), |record| record.name.clone())
                })
                .collect()
        };
        Self {
            service: Arc::clone(service),
            image: image.clone(),
            sources,
            difference_disk,
            started: std::time::Instant::now(),
            started_at_ms: now_ms(),
            first_done: std::sync::Mutex::new(None),
        }
    }

    fn record(&self, bytes_done: u64, bytes_total: u64) {
        let first = *self
            .first_done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(bytes_done);
        let seconds = self.started.elapsed().as_secs_f64();
        let rate = if seconds > 0.0 {
            (bytes_done.saturating_sub(first) as f64 / seconds) as u64
        } else {
            0
        };
        let id = &self.image;
        // Only a pull the record shows is updated: a copy dropped meanwhile
        // is not brought back.
        let updated = lock(&self.service).update_own_record(&mut |record| {
            if let Some(holding @ ImageHolding::Partial { .. }) = record.images.get_mut(id) {
                if !self.difference_disk {
                    *holding = ImageHolding::Partial {
                        bytes_done,
                        bytes_total,
                    };
                }
                record.transfers.insert(
                    id.clone(),
                    TransferRecord {
                        bytes_done,
                        bytes_total,
                        rate_bytes_per_s: rate,
                        sources: self.sources.clone(),
                        started_at_ms: self.started_at_ms,
                        difference_disk: self.difference_disk,
                    },
                );
            }
        });
        if let Err(error) = updated {
            tracing::debug!(image = %id, error = %crate::error_chain(&error), "cannot record transfer progress");
        }
    }

    /// Done or stopped: no longer a transfer in progress.
    fn clear(&self) {
        let id = &self.image;
        let cleared = lock(&self.service).update_own_record(&mut |record| {
            record.transfers.remove(id);
        });
        if let Err(error) = cleared {
            tracing::debug!(image = %id, error = %crate::error_chain(&error), "cannot clear the transfer record");
        }
    }
}

/// How an attempt to rebuild a version from its difference disk ended.
#[derive(Debug)]
enum DiffOutcome {
    /// The version is in the pool, verified: the pull is done.
    Rebuilt,
    /// Not possible here (no parent held complete, a pull already under
    /// way, no holder kept the difference disk): pull the full version.
    NotTried,
    /// Tried and failed (nothing kept): pull the full version.
    Failed(String),
}

impl GridImagePuller {
    /// Rebuilds `image` from its parent, which this server must hold
    /// complete, and its compressed difference disk fetched from the first
    /// of `holders` that kept it: see [`rebuild_from_diff`]. The compressed
    /// overlay may not exceed the version's virtual size (a full pull moves
    /// less than that).
    async fn pull_by_diff(
        &self,
        endpoint: &Arc<PeerEndpoint>,
        image: &BaseImage,
        holders: &[(ServerId, SocketAddr)],
    ) -> DiffOutcome {
        let Some(parent) = image.parent.clone() else {
            return DiffOutcome::NotTried;
        };
        let (service, host, id) = (
            Arc::clone(&self.service),
            Arc::clone(&self.host),
            image.id.clone(),
        );
        let parent_path = tokio::task::spawn_blocking(move || {
            let holds_parent = {
                let service = lock(&service);
                service
                    .state
                    .server(service.server_id())
                    .is_some_and(|record| {
                        record.images.get(&parent) == Some(&ImageHolding::Complete)
                    })
            };
            if !holds_parent {
                return None;
            }
            // A volume of the version already here is a full pull to resume.
            let name = crate::actuator::VolumeName::Base(id);
            let volumes = host.list_volumes().ok()?;
            if volumes.iter().any(|volume| volume.name == name) {
                return None;
            }
            parent_volume_path(host.as_ref(), &parent).ok()
        })
        .await
        .ok()
        .flatten();
        let Some(parent_path) = parent_path else {
            return DiffOutcome::NotTried;
        };
        let started = std::time::Instant::now();
        let compressed = self
            .transfer_dir
            .join(format!("diff-{}.qcow2.zst.part", image.id));
        let mut fetched = None;
        for (server, address) in holders {
            let recorder = Arc::new(TransferRecorder::new(
                &self.service,
                &image.id,
                &[*server],
                true,
            ));
            let outcome = self
                .fetch_diff(endpoint, *server, *address, image, &compressed, &recorder)
                .await;
            let _ = tokio::task::spawn_blocking(move || recorder.clear()).await;
            match outcome {
                Ok(wire_bytes) => {
                    fetched = Some((*server, wire_bytes));
                    break;
                }
                Err(reason) => {
                    tracing::info!(image = %image.id, peer = %server, %reason, "no difference disk from this holder");
                }
            }
        }
        let Some((server, wire_bytes)) = fetched else {
            let _ = std::fs::remove_file(&compressed);
            return DiffOutcome::NotTried;
        };
        let (host, transfer_dir, to_rebuild, from) = (
            Arc::clone(&self.host),
            self.transfer_dir.clone(),
            image.clone(),
            compressed.clone(),
        );
        let rebuilt = tokio::task::spawn_blocking(move || {
            rebuild_from_diff(
                host.as_ref(),
                &transfer_dir,
                &to_rebuild,
                &parent_path,
                &from,
            )
        })
        .await;
        let _ = std::fs::remove_file(&compressed);
        match rebuilt {
            Ok(Ok(rebuild)) => {
                tracing::info!(
                    image = %image.id,
                    parent = ?image.parent,
                    peer = %server,
                    wire_bytes,
                    overlay_bytes = rebuild.overlay_bytes,
                    data_bytes = rebuild.data_bytes,
                    seconds = format_args!("{:.2}", started.elapsed().as_secs_f64()),
                    "image rebuilt from a difference disk"
                );
                DiffOutcome::Rebuilt
            }
            Ok(Err(error)) => DiffOutcome::Failed(crate::error_chain(&error)),
            Err(error) => DiffOutcome::Failed(format!("the rebuild stopped: {error}")),
        }
    }

    /// Fetches `image`'s compressed difference disk from `server` into
    /// `target`, part by part; returns the bytes received.
    async fn fetch_diff(
        &self,
        endpoint: &Arc<PeerEndpoint>,
        server: ServerId,
        address: SocketAddr,
        image: &BaseImage,
        target: &std::path::Path,
        recorder: &Arc<TransferRecorder>,
    ) -> Result<u64, String> {
        let limit = image.virtual_size;
        let connection = endpoint
            .connection(address, server)
            .await
            .map_err(|error| crate::error_chain(&error))?;
        let mut file = std::fs::File::create(target)
            .map_err(|error| format!("cannot create {}: {error}", target.display()))?;
        let mut offset = 0u64;
        let mut expected_total = None;
        loop {
            let part = request_diff_part(
                &connection,
                &image.id,
                offset,
                self.settings.request_deadline,
            )
            .await
            .map_err(|error| crate::error_chain(&error))?;
            if part.total > limit {
                return Err(format!(
                    "the difference disk is {} bytes, more than the {limit}-byte version",
                    part.total
                ));
            }
            if *expected_total.get_or_insert(part.total) != part.total {
                return Err("the difference disk changed size while it was fetched".to_owned());
            }
            let end = offset.saturating_add(part.data.len() as u64);
            if part.data.is_empty() || end > part.total {
                return Err(format!(
                    "a part of {} bytes at offset {offset} does not fit a {}-byte file",
                    part.data.len(),
                    part.total
                ));
            }
            // Megabytes per write: on the blocking pool, not the runtime's
            // threads.
            file = tokio::task::spawn_blocking(move || {
                std::io::Write::write_all(&mut file, &part.data).map(|()| file)
            })
            .await
            .map_err(|error| format!("the write stopped: {error}"))?
            .map_err(|error| format!("cannot write {}: {error}", target.display()))?;
            offset = end;
            let (done, total, recording) = (offset, part.total, Arc::clone(recorder));
            let _ = tokio::task::spawn_blocking(move || recording.record(done, total)).await;
            if offset == part.total {
                break;
            }
        }
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|error| format!("the write stopped: {error}"))?
            .map_err(|error| format!("cannot write {}: {error}", target.display()))?;
        Ok(offset)
    }
}

/// The other servers that hold `image` complete, with the address to dial:
/// removed servers and servers the failure detector declared missing are
/// left out, those it has not heard of yet are tried (as the federation
/// does), alive ones first.
fn complete_holders(service: &GridService, image: &ImageVersionId) -> Vec<(ServerId, SocketAddr)> {
    holders_of(service, image, false)
}

/// The other servers to pull `image` from: those that hold it complete,
/// and, with `pulling`, those pulling it too (they serve what they have).
fn holders_of(
    service: &GridService,
    image: &ImageVersionId,
    pulling: bool,
) -> Vec<(ServerId, SocketAddr)> {
    let own = service.server_id();
    let revoked = service.revoked_servers();
    let mut holders: Vec<(bool, ServerId, SocketAddr)> = service
        .state
        .servers()
        .filter(|(server, _)| *server != own && !revoked.contains(server))
        .filter(|(_, record)| match record.images.get(image) {
            Some(ImageHolding::Complete) => true,
            Some(ImageHolding::Partial { .. }) => pulling,
            None => false,
        })
        .filter_map(|(server, record)| {
            let state = service.member_states.get(&server);
            if state == Some(&MemberState::Down) {
                return None;
            }
            let address = record
                .addresses
                .iter()
                .filter_map(|address| address.parse::<SocketAddr>().ok())
                .find(|address| !address.ip().is_unspecified() && address.port() != 0)?;
            Some((state != Some(&MemberState::Alive), server, address))
        })
        .collect();
    holders.sort();
    holders
        .into_iter()
        .map(|(_, server, address)| (server, address))
        .collect()
}

/// Runs the policy loop until `shutdown` turns true: connects to libvirt
/// (retrying with backoff while it is away), hands the host to the chunk
/// server, starts the desktop service on the same connection (and puts it
/// in `desk`, where the broker finds it), then plans and acts, pulling
/// images through a [`GridImagePuller`]. VMs become `Ready` when their
/// agent says hello (`ready_on_start: false`).
pub async fn run(
    config: Config,
    service: Arc<Mutex<GridService>>,
    transfer: ImageTransfer,
    desk: DeskSlot,
    shutdown: watch::Receiver<bool>,
) {
    let options = config.libvirt.libvirt_options();
    let Some(host) = connect(options, shutdown.clone()).await else {
        return;
    };
    let domains = DomainSettings::from_config(&config, host.domain_kind());
    let host: Arc<dyn Hypervisor> = Arc::new(host);
    transfer.chunk_server.attach_host(Arc::clone(&host));
    let (changes, plan_now) = {
        let service = lock(&service);
        (service.watch_state(), service.policy_wake_handle())
    };
    let policy_host = Arc::new(ServicePolicyHost::new(Arc::clone(&service), domains));
    let puller = GridImagePuller::new(Arc::clone(&service), &transfer, Arc::clone(&host));
    let desktop = DesktopService::new(
        Arc::new(ServiceDesktopHost::new(Arc::clone(&service), &config)),
        Arc::clone(&host),
        DesktopSettings::default(),
    );
    desk.set(desktop.desk());
    let desktop = tokio::spawn(desktop.run(shutdown.clone()));
    tracing::info!("desktop service running");
    let worker = PolicyWorker::new(policy_host, AsyncHypervisor::new(host), Arc::new(puller))
        .with_plan_now(plan_now)
        .with_settings(PolicySettings {
            ready_on_start: false,
            ..PolicySettings::default()
        });
    let watcher = tokio::spawn(wake_on_changes(changes, worker.waker(), shutdown.clone()));
    tracing::info!("host ready; policy loop running");
    worker.run(shutdown).await;
    let _ = watcher.await;
    let _ = desktop.await;
}

/// Pokes the loop whenever the state changes: a local write, a peer's
/// delta, news from the failure detector.
async fn wake_on_changes(
    mut changes: watch::Receiver<u64>,
    waker: PolicyWaker,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = changes.changed() => match changed {
                Ok(()) => waker.state_changed(),
                Err(_) => return,
            },
        }
    }
}

/// A libvirt connection with the pool ready, or `None` when the server
/// stops first.
async fn connect(
    options: LibvirtOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Option<LibvirtHypervisor> {
    let mut retry = FIRST_CONNECT_RETRY;
    loop {
        let attempt = options.clone();
        let connected = tokio::task::spawn_blocking(move || {
            let host = LibvirtHypervisor::connect(attempt)?;
            host.ensure_pool()?;
            Ok::<_, crate::actuator::ActuatorError>(host)
        })
        .await;
        match connected {
            Ok(Ok(host)) => return Some(host),
            Ok(Err(error)) => {
                tracing::warn!(uri = %options.uri, error = %crate::error_chain(&error), retry_in = ?retry, "policy loop: host not ready");
            }
            Err(error) => {
                tracing::error!(error = %error, "policy loop: host connection task failed")
            }
        }
        tokio::select! {
            _ = shutdown.changed() => return None,
            _ = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(MAX_CONNECT_RETRY);
    }
}

fn lock(service: &Mutex<GridService>) -> std::sync::MutexGuard<'_, GridService> {
    // Writes are durable before they are applied: a panic while holding the
    // lock leaves at worst the state that is on disk.
    service
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    // A test that unwraps fails with the value it met: exactly what a test should do.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::actuator::domain_xml::VNC_PASSWORD_MAX_BYTES;
    use crate::appliance::config::{LibvirtSettings, ServerSettings};
    use crate::model::{ImageHolding, ImageVersionId};
    use std::collections::BTreeMap;

    #[test]
    fn the_service_hosts_the_policy_loop() {
        let temp = tempfile::tempdir().unwrap();
        let server_id = ServerId::random();
        let (mut service, _) = GridService::open(server_id, temp.path()).unwrap();
        let config = Config {
            server: ServerSettings::default(),
            libvirt: LibvirtSettings::default(),
            api: crate::appliance::config::ApiSettings::default(),
        };
        service.publish_own_record(&config).unwrap();
        let service = Arc::new(Mutex::new(service));
        let host = ServicePolicyHost::new(
            Arc::clone(&service),
            DomainSettings::from_config(&config, DomainKind::Qemu),
        );
        assert_eq!(host.server_id(), server_id);
        assert_eq!(
            host.seed(),
            crate::placement::seed_from_bytes(server_id.as_bytes()),
            "a standalone server seeds with its own id"
        );
        let log_records = || lock(&service).summary().log_records;

        let before = log_records();
        host.update_own_record(&mut |record| record.jobs.clear())
            .unwrap();
        assert_eq!(
            log_records(),
            before,
            "a change that changes nothing is not written"
        );
        let image = ImageVersionId::new("base-1").unwrap();
        host.update_own_record(&mut |record| {
            record.images.insert(image.clone(), ImageHolding::Complete);
        })
        .unwrap();
        assert_eq!(log_records(), before + 1);
        let snapshot = host.snapshot();
        assert_eq!(
            snapshot.state.server(server_id).unwrap().images.get(&image),
            Some(&ImageHolding::Complete)
        );
        assert_eq!(
            snapshot.liveness,
            BTreeMap::from([(server_id, crate::placement::Liveness::Alive)])
        );

        let mut template = crate::model::sample_template("office");
        template.display = DisplayProtocol::Vnc;
        let vm = VmId::random();
        let spec = host.domain_spec(&template, vm, "/pool/disk.qcow2".to_owned());
        assert_eq!(spec.display.listen, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(spec.display.password.len(), VNC_PASSWORD_MAX_BYTES);
        assert_eq!(
            spec.network,
            NetworkAttachment::Network("default".to_owned())
        );
        assert_eq!((spec.vm, spec.kind), (vm, DomainKind::Qemu));
    }

    /// What wakes the policy loop: a local write, a peer's delta, a change
    /// of the membership view; the same membership news twice does not.
    #[test]
    fn the_network_setting_names_a_libvirt_network_or_a_special_mode() {
        assert_eq!(network_attachment("none"), NetworkAttachment::None);
        assert_eq!(network_attachment("user-mode"), NetworkAttachment::User);
        assert_eq!(
            network_attachment("default"),
            NetworkAttachment::Network("default".to_owned())
        );
    }

    #[test]
    fn transfers_show_in_the_record_while_they_run_and_not_after() {
        let temp = tempfile::tempdir().unwrap();
        let server_id = ServerId::random();
        let (mut service, _) = GridService::open(server_id, temp.path()).unwrap();
        let config = Config {
            server: ServerSettings::default(),
            libvirt: LibvirtSettings::default(),
            api: crate::appliance::config::ApiSettings::default(),
        };
        service.publish_own_record(&config).unwrap();
        let image = ImageVersionId::new("base-2").unwrap();
        let partial = ImageHolding::Partial {
            bytes_done: 0,
            bytes_total: 100,
        };
        service
            .update_own_record(&mut |record| {
                record.images.insert(image.clone(), partial.clone());
            })
            .unwrap();
        let service = Arc::new(Mutex::new(service));
        let own = || lock(&service).state.server(server_id).unwrap().clone();

        let chunks = TransferRecorder::new(&service, &image, &[server_id], false);
        chunks.record(40, 100);
        let record = own();
        let transfer = &record.transfers[&image];
        assert_eq!((transfer.bytes_done, transfer.bytes_total), (40, 100));
        assert!(!transfer.difference_disk);
        assert_eq!(transfer.sources, vec![record.name.clone()]);
        assert_eq!(
            record.images[&image],
            ImageHolding::Partial {
                bytes_done: 40,
                bytes_total: 100
            },
            "a chunk pull's bytes are the image's"
        );
        chunks.clear();
        assert!(own().transfers.is_empty());

        // A difference disk's bytes are the overlay's, not the image's.
        let diff = TransferRecorder::new(&service, &image, &[server_id], true);
        diff.record(7, 9);
        let record = own();
        assert!(record.transfers[&image].difference_disk);
        assert_eq!(record.transfers[&image].bytes_done, 7);
        assert_eq!(
            record.images[&image],
            ImageHolding::Partial {
                bytes_done: 40,
                bytes_total: 100
            }
        );
        diff.clear();

        // A copy dropped meanwhile is not brought back by a late report.
        lock(&service)
            .update_own_record(&mut |record| {
                record.images.remove(&image);
            })
            .unwrap();
        chunks.record(60, 100);
        assert!(own().transfers.is_empty());
        assert!(!own().images.contains_key(&image));
    }

    #[test]
    fn every_kind_of_state_change_is_seen() {
        use crate::federation::node::GridStateAccess;
        let temp = tempfile::tempdir().unwrap();
        let (mut service, _) = GridService::open(ServerId::random(), temp.path()).unwrap();
        let mut changes = service.watch_state();
        let config = Config {
            server: ServerSettings::default(),
            libvirt: LibvirtSettings::default(),
            api: crate::appliance::config::ApiSettings::default(),
        };
        service.publish_own_record(&config).unwrap();
        assert!(changes.has_changed().unwrap(), "a local write");
        changes.mark_unchanged();

        let peer = ServerId::random();
        let mut remote = crate::state::GridState::new();
        let delta = remote
            .update_server(
                peer,
                crate::state::HlcClock::new().tick(now_ms()),
                ServerRecord::new("peer".to_owned(), Vec::new(), Default::default(), now_ms()),
            )
            .unwrap();
        let service = Arc::new(Mutex::new(service));
        let federated = crate::service::grid::FederatedService(Arc::clone(&service));
        assert_eq!(federated.apply_remote(peer, &delta).unwrap(), 1);
        assert!(changes.has_changed().unwrap(), "a peer's delta");
        changes.mark_unchanged();

        let members = BTreeMap::from([(peer, MemberState::Suspect)]);
        federated.report_members(members.clone());
        assert!(changes.has_changed().unwrap(), "membership news");
        changes.mark_unchanged();
        federated.report_members(members);
        assert!(!changes.has_changed().unwrap(), "the same news again");
    }

    #[test]
    fn display_passwords_fit_their_protocol_and_differ() {
        use crate::actuator::random_display_password;
        assert_eq!(
            random_display_password(DisplayProtocol::Vnc).len(),
            VNC_PASSWORD_MAX_BYTES
        );
        assert_eq!(random_display_password(DisplayProtocol::Spice).len(), 32);
        assert_ne!(
            random_display_password(DisplayProtocol::Spice),
            random_display_password(DisplayProtocol::Spice)
        );
    }
}
