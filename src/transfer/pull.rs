//! Pulling a base image version into this server's pool from every server
//! that holds it complete, all at once.
//!
//! 1. The manifest: the one kept from an earlier attempt, else the first a
//!    holder sends that verifies against the grid's root digest (a holder
//!    whose manifest does not verify is reported). It is kept in the
//!    [`ManifestStore`] for resuming and for serving later.
//! 2. The raw base volume: created (a full pool is an error before anything
//!    is written), or reused when a pull was interrupted, with the progress
//!    file (`progress.rs`) saying which chunks it already holds.
//! 3. The data chunks: every source keeps [`PullSettings::streams_per_source`]
//!    requests in flight and takes the next missing chunk when one ends
//!    (`schedule.rs`), so the fastest holders serve the most. Each chunk is
//!    decoded within the chunk size, checked against its SHA-256 and only
//!    then written at its offset. A chunk that fails (bad bytes, no answer)
//!    is fetched again from another holder; the bad holder is logged with a
//!    warning, and dropped for this pull after repeated faults.
//!    Where the host lets deskgrid open the volume's file (a local `dir`
//!    pool, [`Hypervisor::open_volume_file`]), chunks are written into it
//!    from every stream at once; through libvirt streams they go one at a
//!    time, since libvirt refuses a second upload into a volume while one
//!    is open ("volume is still in use"), and then only the write is queued.
//! 4. Progress: the bitmap of written chunks is saved (atomically) before a
//!    stream takes its next chunk, several streams' chunks per save, so a
//!    restart refetches at most one chunk per stream beyond what was
//!    missing. The caller hears the bytes done about once a second.
//!
//! Every chunk verified and the manifest verified against the root digest
//! means the volume holds exactly the version the grid names. Nothing a
//! peer sends can make this panic: bad input is an error for that chunk.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::{JoinError, JoinHandle, JoinSet};

use super::codec::{self, CodecError, Encoding};
use super::progress::{ChunkBitmap, ProgressError, ProgressFile};
use super::schedule::{ChunkSchedule, Fault, ScheduleLimits};
use super::swarm::{Have, PartialGuard, PartialImages, HAVE_REFRESH};
use super::{ChunkEntry, Manifest, ManifestError, ManifestStore, ManifestStoreError};
use crate::actuator::{ActuatorError, Hypervisor, VolumeFile, VolumeFormat, VolumeName};
use crate::federation::{
    request_chunk, request_have, request_manifest, ChunkReply, ImageRequestError, PeerEndpoint,
    CHUNK_REQUESTS_PER_PEER,
};
use crate::model::{BaseImage, ImageDigest, ImageVersionId, ServerId};

/// What a [`ChunkPeer`] call resolves to.
pub type PeerFuture<T> =
    Pin<Box<dyn Future<Output = Result<T, ImageRequestError>> + Send + 'static>>;

/// A server to pull from: a holder of the version, reached over the
/// federation ([`QuicChunkPeer`]) or faked in tests.
pub trait ChunkPeer: Send + Sync + fmt::Debug {
    fn server(&self) -> ServerId;
    fn manifest(&self, image: &ImageVersionId) -> PeerFuture<Manifest>;
    fn chunk(&self, image: &ImageVersionId, index: u64) -> PeerFuture<ChunkReply>;

    /// Which chunks it holds. The default: every chunk (a complete holder).
    fn have(&self, image: &ImageVersionId) -> PeerFuture<Have> {
        let _ = image;
        Box::pin(async { Ok(Have::Complete) })
    }
}

/// Where a pull finds more sources and tells others what it has
/// (swarming, `swarm.rs`). The default: the sources given, nothing shared.
#[derive(Clone, Default)]
pub struct Swarm {
    /// Called about once a second while the pull runs: the servers to pull
    /// from now (holders and other pullers of the version); new ones join.
    pub more_sources: Option<SourceFeed>,
    /// Where this pull lists the chunks it has written, for this server's
    /// chunk server to serve them.
    pub partial: Option<Arc<PartialImages>>,
    /// Pullers take chunks in order from a start derived from this (e.g.
    /// their server id), so pullers that start together fetch different
    /// chunks first.
    pub start_seed: u64,
}

/// See [`Swarm::more_sources`].
pub type SourceFeed = Arc<dyn Fn() -> Vec<Arc<dyn ChunkPeer>> + Send + Sync>;

impl fmt::Debug for Swarm {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Swarm")
            .field("more_sources", &self.more_sources.is_some())
            .field("partial", &self.partial.is_some())
            .field("start_seed", &self.start_seed)
            .finish()
    }
}

/// How often a pull asks its feed for new sources.
const SOURCE_FEED_INTERVAL: Duration = Duration::from_secs(1);

/// A holder reached through this server's QUIC endpoint.
#[derive(Debug, Clone)]
pub struct QuicChunkPeer {
    endpoint: Arc<PeerEndpoint>,
    server: ServerId,
    address: SocketAddr,
    deadline: Duration,
}

impl QuicChunkPeer {
    /// `server` at `address`; every request must finish within `deadline`.
    pub fn new(
        endpoint: Arc<PeerEndpoint>,
        server: ServerId,
        address: SocketAddr,
        deadline: Duration,
    ) -> Self {
        Self {
            endpoint,
            server,
            address,
            deadline,
        }
    }
}

impl ChunkPeer for QuicChunkPeer {
    fn server(&self) -> ServerId {
        self.server
    }

    fn manifest(&self, image: &ImageVersionId) -> PeerFuture<Manifest> {
        let peer = self.clone();
        let image = image.clone();
        Box::pin(async move {
            let connection = peer.endpoint.connection(peer.address, peer.server).await?;
            request_manifest(&connection, &image, peer.deadline).await
        })
    }

    fn chunk(&self, image: &ImageVersionId, index: u64) -> PeerFuture<ChunkReply> {
        let peer = self.clone();
        let image = image.clone();
        Box::pin(async move {
            let connection = peer.endpoint.connection(peer.address, peer.server).await?;
            request_chunk(&connection, &image, index, peer.deadline).await
        })
    }

    fn have(&self, image: &ImageVersionId) -> PeerFuture<Have> {
        let peer = self.clone();
        let image = image.clone();
        Box::pin(async move {
            let connection = peer.endpoint.connection(peer.address, peer.server).await?;
            request_have(&connection, &image, peer.deadline).await
        })
    }
}

/// How a pull behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullSettings {
    /// Requests in flight per source: what a holder serves one peer at once
    /// (`CHUNK_REQUESTS_PER_PEER`), so none waits there.
    pub streams_per_source: u32,
    /// Bad chunks after which a source is dropped for this pull: one may be
    /// bit rot, three is a broken or lying holder.
    pub max_bad_chunks: u32,
    /// Failed requests in a row after which a source is dropped.
    pub max_errors_in_a_row: u32,
    /// How long one request may take, backpressure at the holder included.
    pub request_deadline: Duration,
    /// How often the caller hears of the progress.
    pub progress_interval: Duration,
    /// How long a pull waits, with nothing in flight, for sources that are
    /// pulling too to get the chunks it still lacks, before it gives up.
    pub partial_stall: Duration,
}

impl Default for PullSettings {
    fn default() -> Self {
        Self {
            streams_per_source: u32::try_from(CHUNK_REQUESTS_PER_PEER).unwrap_or(4),
            max_bad_chunks: 3,
            max_errors_in_a_row: 3,
            // A 4 MiB chunk waiting behind a holder's busy slots on a slow
            // WAN link still arrives well within this.
            request_deadline: Duration::from_secs(30),
            progress_interval: Duration::from_secs(1),
            partial_stall: Duration::from_secs(30),
        }
    }
}

/// Where a pull is: bytes of data chunks in the volume, of all there are
/// (all-zero chunks are never moved, so they count for neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PullProgress {
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// Told of the progress; may block (it writes a record), runs on the
/// blocking pool, never twice at once.
pub type ProgressCallback = Arc<dyn Fn(PullProgress) + Send + Sync>;

/// What one source did for a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceReport {
    pub server: ServerId,
    /// Chunks it delivered, their bytes and what they took on the wire.
    pub chunks: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
    pub bad_chunks: u32,
    pub errors: u32,
    pub dropped: bool,
}

/// What a finished pull did.
#[derive(Debug, Clone, PartialEq)]
pub struct PullReport {
    pub image: ImageVersionId,
    pub data_chunks: u64,
    /// Data chunks already in the volume when the pull started (resumed).
    pub chunks_already_here: u64,
    pub chunks_fetched: u64,
    /// Bytes of the chunks fetched, and what they took on the wire.
    pub bytes_fetched: u64,
    pub wire_bytes: u64,
    pub sources: Vec<SourceReport>,
    pub elapsed: Duration,
}

/// Why a chunk from a peer is refused.
#[derive(Debug, thiserror::Error)]
pub enum BadChunk {
    #[error("asked for chunk {asked}, the answer is chunk {got}")]
    WrongIndex { asked: u64, got: u64 },
    #[error("the chunk cannot be decoded")]
    Undecodable(#[source] CodecError),
    #[error("the chunk does not verify")]
    Verification(#[source] ManifestError),
    #[error("the answer is not a chunk")]
    Answer(#[source] ImageRequestError),
}

/// Why a peer gave no chunk.
#[derive(Debug, thiserror::Error)]
pub enum NoAnswer {
    #[error("the request failed")]
    Request(#[source] ImageRequestError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

/// Why a pull stopped.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("image version {image} has no digest yet: nothing to verify it against")]
    NoDigest { image: ImageVersionId },
    #[error("no reachable server holds image version {image} complete")]
    NoSources { image: ImageVersionId },
    #[error(
        "none of the {n_sources} holder(s) of image version {image} sent a manifest that verifies"
    )]
    NoManifest {
        image: ImageVersionId,
        n_sources: usize,
        #[source]
        last: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    #[error("cannot keep the manifest of image version {image}")]
    ManifestStore {
        image: ImageVersionId,
        #[source]
        source: Box<ManifestStoreError>,
    },
    #[error("cannot prepare the base volume of image version {image}")]
    Volume {
        image: ImageVersionId,
        #[source]
        source: ActuatorError,
    },
    #[error("cannot write chunk {index} of image version {image}")]
    Write {
        image: ImageVersionId,
        index: u64,
        #[source]
        source: ActuatorError,
    },
    #[error("cannot record the progress of image version {image}")]
    Progress {
        image: ImageVersionId,
        #[source]
        source: ProgressError,
    },
    #[error("every holder of image version {image} failed; {missing} of {total} data chunks are still missing and the next attempt resumes there")]
    SourcesExhausted {
        image: ImageVersionId,
        missing: u64,
        total: u64,
    },
    #[error("a task of the pull stopped unexpectedly")]
    TaskLost,
}

/// How fetching one chunk went wrong.
#[derive(Debug)]
enum ChunkFailure {
    Bad(BadChunk),
    NoAnswer(NoAnswer),
    /// Here, not at the peer: the pull stops.
    Local(Box<PullError>),
}

/// A chunk verified and written.
#[derive(Debug)]
struct Fetched {
    bytes: u64,
    wire_bytes: u64,
    /// The chunk as it travelled, when this pull shares what it has.
    wire: Option<(Encoding, Vec<u8>)>,
}

#[derive(Debug)]
struct ChunkOutcome {
    source: usize,
    index: u64,
    result: Result<Fetched, ChunkFailure>,
}

/// Pulls `image` from `sources` (servers that hold it complete) into
/// `host`'s pool as its raw base volume, keeping the manifest and the
/// progress file under `transfer_dir`. Resolves once every chunk is in and
/// verified; after a failure or an interruption the next call resumes.
pub async fn pull_image(
    image: &BaseImage,
    sources: Vec<Arc<dyn ChunkPeer>>,
    host: Arc<dyn Hypervisor>,
    transfer_dir: &Path,
    settings: &PullSettings,
    on_progress: ProgressCallback,
    swarm: Swarm,
) -> Result<PullReport, PullError> {
    let started = Instant::now();
    let id = image.id.clone();
    let digest = image
        .digest
        .ok_or_else(|| PullError::NoDigest { image: id.clone() })?;
    if sources.is_empty() {
        return Err(PullError::NoSources { image: id });
    }
    let store = ManifestStore::new(transfer_dir.join("manifests"));
    let (manifest, kept) = manifest_for(&id, &digest, &sources, &store, settings).await?;
    let manifest = Arc::new(manifest);
    if manifest.virtual_size != image.virtual_size {
        // The digest, which covers the size, is what names the content.
        tracing::warn!(image = %id, grid = image.virtual_size, manifest = manifest.virtual_size, "the grid's virtual size differs from the verified manifest's; using the manifest's");
    }
    let progress_file = ProgressFile::new(transfer_dir, &id);
    let mut bitmap = prepare_volume(&id, &digest, &manifest, &host, &progress_file).await?;
    let writer = {
        let (host, image) = (Arc::clone(&host), id.clone());
        blocking(move || ChunkWriter::open(&host, &image))
            .await?
            .map_err(|source| PullError::Volume {
                image: id.clone(),
                source,
            })?
    };
    if !kept {
        // After the volume: a pool without room is refused before anything
        // is written. Kept for resuming, and for serving once complete.
        let (store, version, to_store) = (store.clone(), id.clone(), Manifest::clone(&manifest));
        blocking(move || store.save(&version, &to_store))
            .await?
            .map_err(|source| PullError::ManifestStore {
                image: id.clone(),
                source: Box::new(source),
            })?;
    }
    // All-zero chunks are in a new raw volume already (it reads as zeros).
    for (index, entry) in manifest.chunks.iter().enumerate() {
        if *entry == ChunkEntry::Zero {
            bitmap.set(index as u64);
        }
    }
    let missing: Vec<u64> = manifest
        .data_chunks()
        .filter(|index| !bitmap.get(*index))
        .collect();
    let data_chunks = manifest.data_chunks().count() as u64;
    let bytes_total = manifest.data_bytes();
    let chunk_bytes = |index: u64| manifest.chunk_range(index).map_or(0, |(_, length)| length);
    let bytes_missing: u64 = missing.iter().map(|index| chunk_bytes(*index)).sum();
    let chunks_already_here = data_chunks - missing.len() as u64;
    tracing::info!(
        image = %id,
        sources = sources.len(),
        data_chunks,
        chunks_already_here,
        chunks_to_fetch = missing.len(),
        streams = sources.len() as u64 * u64::from(settings.streams_per_source),
        writes = match &writer {
            ChunkWriter::File(_) => "into the volume file, concurrent",
            ChunkWriter::Host(_) => "through the host, adjacent chunks in one upload",
        },
        "pulling image"
    );

    let n_sources = sources.len();
    let n_chunks = manifest.chunks.len() as u64;
    let guard = swarm
        .partial
        .as_ref()
        .map(|partial| partial.register(&id, digest, bitmap.clone()));
    let mut run = PullRun {
        image: id.clone(),
        digest,
        manifest: Arc::clone(&manifest),
        sources,
        feed: swarm.more_sources,
        guard,
        have_pending: vec![false; n_sources],
        last_progress: Instant::now(),
        settings: settings.clone(),
        progress_file,
        bitmap,
        on_progress,
        writer: Arc::new(writer),
        schedule: ChunkSchedule::new(
            missing,
            n_sources,
            ScheduleLimits {
                streams_per_source: settings.streams_per_source,
                max_bad_chunks: settings.max_bad_chunks,
                max_errors_in_a_row: settings.max_errors_in_a_row,
            },
        )
        .with_start(swarm.start_seed.checked_rem(n_chunks).unwrap_or(0)),
        per_source: vec![(0, 0); n_sources],
        bytes_done: bytes_total - bytes_missing,
        bytes_total,
    };
    let outcome = run.fetch_all().await;
    let report = run.report(data_chunks, chunks_already_here, started.elapsed());
    // Logged whatever the outcome: what a failed attempt fetched counts too.
    log_report(&report, outcome.is_ok());
    outcome?;
    Ok(report)
}

/// The manifest kept from an earlier attempt (then `true`), or the first
/// one a holder sends that verifies.
async fn manifest_for(
    image: &ImageVersionId,
    digest: &ImageDigest,
    sources: &[Arc<dyn ChunkPeer>],
    store: &ManifestStore,
    settings: &PullSettings,
) -> Result<(Manifest, bool), PullError> {
    let kept = {
        let (store, image, digest) = (store.clone(), image.clone(), *digest);
        blocking(move || store.load_verified(&image, &digest)).await?
    };
    match kept {
        Ok(Some(manifest)) => return Ok((manifest, true)),
        Ok(None) => {}
        Err(error) => {
            tracing::warn!(%image, error = %crate::error_chain(&error), "kept manifest unusable; asking the holders again");
        }
    }
    let mut asks = JoinSet::new();
    for peer in sources {
        let ask = peer.manifest(image);
        let (server, deadline) = (peer.server(), settings.request_deadline);
        asks.spawn(async move { (server, tokio::time::timeout(deadline, ask).await) });
    }
    let mut last: Option<Box<dyn std::error::Error + Send + Sync>> = None;
    let manifest = loop {
        let Some(joined) = asks.join_next().await else {
            return Err(PullError::NoManifest {
                image: image.clone(),
                n_sources: sources.len(),
                last,
            });
        };
        let Ok((server, answer)) = joined else {
            continue;
        };
        match answer {
            Ok(Ok(manifest)) => match manifest.verify(digest) {
                Ok(()) => break manifest,
                Err(error) => {
                    tracing::warn!(peer = %server, %image, error = %error, "holder sent a manifest that does not verify against the grid's digest");
                    last = Some(Box::new(error));
                }
            },
            Ok(Err(error)) => {
                tracing::info!(peer = %server, %image, error = %crate::error_chain(&error), "holder gave no manifest");
                last = Some(Box::new(error));
            }
            Err(_) => {
                last = Some(Box::new(NoAnswer::TimedOut(settings.request_deadline)));
            }
        }
    };
    // The others are not needed any more.
    asks.abort_all();
    Ok((manifest, false))
}

/// The base volume to write into and the chunks it already holds: a volume
/// of the right size left by an interrupted pull is resumed with its
/// progress file; otherwise a new one is made (after the old progress file
/// is gone, so it can never describe the new volume).
async fn prepare_volume(
    image: &ImageVersionId,
    digest: &ImageDigest,
    manifest: &Manifest,
    host: &Arc<dyn Hypervisor>,
    progress_file: &ProgressFile,
) -> Result<ChunkBitmap, PullError> {
    let (image, digest, host, progress_file) = (
        image.clone(),
        *digest,
        Arc::clone(host),
        progress_file.clone(),
    );
    let (virtual_size, n_chunks) = (manifest.virtual_size, manifest.chunks.len() as u64);
    blocking(move || {
        let volume_error = |source| PullError::Volume {
            image: image.clone(),
            source,
        };
        let progress_error = |source| PullError::Progress {
            image: image.clone(),
            source,
        };
        let name = VolumeName::Base(image.clone());
        let existing = host
            .list_volumes()
            .map_err(volume_error)?
            .into_iter()
            .find(|volume| volume.name == name);
        match existing {
            Some(volume) if volume.capacity_bytes == virtual_size => {
                match progress_file.load(&digest, n_chunks) {
                    Ok(Some(bitmap)) => return Ok(bitmap),
                    Ok(None) => {
                        tracing::info!(%image, "base volume found without a progress file; fetching every chunk")
                    }
                    Err(error) => {
                        tracing::warn!(%image, error = %crate::error_chain(&error), "progress file unusable; fetching every chunk")
                    }
                }
                return Ok(ChunkBitmap::new(n_chunks));
            }
            Some(volume) => {
                tracing::warn!(%image, found = volume.capacity_bytes, expected = virtual_size, "base volume of the wrong size; making it again");
                progress_file.remove().map_err(progress_error)?;
                host.delete_volume(&name).map_err(volume_error)?;
            }
            None => progress_file.remove().map_err(progress_error)?,
        }
        host.create_base_volume(&image, virtual_size, VolumeFormat::Raw)
            .map_err(volume_error)?;
        Ok(ChunkBitmap::new(n_chunks))
    })
    .await?
}

/// Attempts at one chunk's write: libvirt releases a volume after an upload
/// asynchronously (its pool refresh runs after the stream closed), so the
/// next upload can find it "still in use" for a moment.
const WRITE_ATTEMPTS: u32 = 6;
const FIRST_WRITE_RETRY: Duration = Duration::from_millis(10);

/// How verified chunks reach the base volume: its file, written from every
/// stream at once, or the host's calls (libvirt upload streams), one
/// upload at a time. Decided once per pull (asking the host which way
/// costs several libvirt calls).
#[derive(Debug)]
enum ChunkWriter {
    File(VolumeFile),
    Host(GroupWriter),
}

impl ChunkWriter {
    fn open(host: &Arc<dyn Hypervisor>, image: &ImageVersionId) -> Result<Self, ActuatorError> {
        let name = VolumeName::Base(image.clone());
        Ok(match host.open_volume_file(&name, true)? {
            Some(file) => Self::File(file),
            None => Self::Host(GroupWriter::new(Arc::clone(host), name)),
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ActuatorError> {
        match self {
            Self::File(file) => file.write_at(offset, data),
            Self::Host(group) => group.write(offset, data),
        }
    }

    /// Makes the chunks written so far durable.
    fn sync(&self) -> Result<(), ActuatorError> {
        match self {
            Self::File(file) => file.sync(),
            Self::Host(group) => group.host.sync_volume(&group.name),
        }
    }
}

/// Writes through the host one upload at a time (libvirt takes one upload
/// per volume), but not one chunk at a time: chunks that arrive while an
/// upload runs wait together, and the next writer uploads every run of
/// adjacent ones as one ("group commit"). Each upload costs a stream's
/// set-up and libvirt's release of the volume; a run of chunks pays it
/// once. Every caller returns once its own chunk is written or failed.
#[derive(Debug)]
struct GroupWriter {
    host: Arc<dyn Hypervisor>,
    name: VolumeName,
    state: std::sync::Mutex<GroupState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// Waiting to be written: ticket, offset, bytes.
    pending: Vec<(u64, u64, Vec<u8>)>,
    /// A writer is uploading now.
    writing: bool,
    next_ticket: u64,
    /// Outcomes not yet collected by their writers.
    outcomes: BTreeMap<u64, Result<(), String>>,
}

/// The most bytes one upload of a run carries.
const MAX_RUN_BYTES: usize = 64 << 20;

impl GroupWriter {
    fn new(host: Arc<dyn Hypervisor>, name: VolumeName) -> Self {
        Self {
            host,
            name,
            state: std::sync::Mutex::new(GroupState::default()),
            done: std::sync::Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GroupState> {
        // Whole values only; a panicked writer leaves its chunks pending
        // for the next one.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), ActuatorError> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.pending.push((ticket, offset, data.to_vec()));
        loop {
            if let Some(outcome) = state.outcomes.remove(&ticket) {
                return outcome.map_err(|message| ActuatorError::Libvirt {
                    operation: "write chunks through an upload stream",
                    message,
                });
            }
            if state.writing {
                state = self
                    .done
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                continue;
            }
            // This caller uploads everything waiting, its own chunk included.
            state.writing = true;
            let batch = std::mem::take(&mut state.pending);
            drop(state);
            let outcomes = self.upload_runs(batch);
            state = self.lock();
            state.outcomes.extend(outcomes);
            state.writing = false;
            self.done.notify_all();
        }
    }

    /// Uploads `batch` as runs of adjacent chunks; the outcome per ticket.
    fn upload_runs(&self, mut batch: Vec<(u64, u64, Vec<u8>)>) -> Vec<(u64, Result<(), String>)> {
        batch.sort_by_key(|(_, offset, _)| *offset);
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut run: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let mut run_bytes = 0usize;
        let flush = |run: &mut Vec<(u64, u64, Vec<u8>)>, outcomes: &mut Vec<_>| {
            let Some(&(_, start, _)) = run.first() else {
                return;
            };
            let outcome = if run.len() == 1 {
                write_chunk(self.host.as_ref(), &self.name, start, &run[0].2)
            } else {
                let mut joined =
                    Vec::with_capacity(run.iter().map(|(_, _, data)| data.len()).sum());
                for (_, _, data) in run.iter() {
                    joined.extend_from_slice(data);
                }
                write_chunk(self.host.as_ref(), &self.name, start, &joined)
            }
            .map_err(|error| crate::error_chain(&error));
            outcomes.extend(
                run.drain(..)
                    .map(|(ticket, _, _)| (ticket, outcome.clone())),
            );
        };
        for (ticket, offset, data) in batch {
            let adjacent = run
                .last()
                .is_some_and(|(_, last, bytes)| last + bytes.len() as u64 == offset);
            if !adjacent || run_bytes + data.len() > MAX_RUN_BYTES {
                flush(&mut run, &mut outcomes);
                run_bytes = 0;
            }
            run_bytes += data.len();
            run.push((ticket, offset, data));
        }
        flush(&mut run, &mut outcomes);
        outcomes
    }
}

/// Writes `data` at `offset` of the volume `name`, retrying what libvirt
/// may refuse for a moment (never a full pool or a missing volume).
fn write_chunk(
    host: &dyn Hypervisor,
    name: &VolumeName,
    offset: u64,
    data: &[u8],
) -> Result<(), ActuatorError> {
    let mut retry = FIRST_WRITE_RETRY;
    let mut attempt = 1;
    loop {
        match host.write_volume_at(name, offset, data) {
            Err(error @ ActuatorError::Libvirt { .. }) if attempt < WRITE_ATTEMPTS => {
                tracing::debug!(volume = %name, offset, attempt, error = %crate::error_chain(&error), "chunk write refused; trying again");
                std::thread::sleep(retry);
                retry *= 2;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// One pull's state while chunks arrive.
struct PullRun {
    image: ImageVersionId,
    digest: ImageDigest,
    manifest: Arc<Manifest>,
    sources: Vec<Arc<dyn ChunkPeer>>,
    /// More sources as they appear (swarming).
    feed: Option<SourceFeed>,
    /// This pull's listing of the chunks it has, for others.
    guard: Option<PartialGuard>,
    /// Per source: a "which chunks do you have" request in flight.
    have_pending: Vec<bool>,
    /// When the last chunk arrived (or the pull started).
    last_progress: Instant,
    settings: PullSettings,
    progress_file: ProgressFile,
    /// Chunks in the volume (zero chunks included).
    bitmap: ChunkBitmap,
    on_progress: ProgressCallback,
    writer: Arc<ChunkWriter>,
    schedule: ChunkSchedule,
    /// Per source: bytes delivered and what they took on the wire.
    per_source: Vec<(u64, u64)>,
    bytes_done: u64,
    bytes_total: u64,
}

impl PullRun {
    /// Fetches every missing chunk; returns once none is in flight.
    async fn fetch_all(&mut self) -> Result<(), PullError> {
        let mut tasks: JoinSet<ChunkOutcome> = JoinSet::new();
        // Sources whose delivered chunks wait for the next save, and the
        // save running now with the sources it will free.
        let mut to_record: Vec<usize> = Vec::new();
        let mut saving: Option<JoinHandle<Result<(), ProgressError>>> = None;
        let mut saving_slots: Vec<usize> = Vec::new();
        let mut reporting: Option<JoinHandle<()>> = None;
        let mut failure: Option<PullError> = None;
        let mut tick = tokio::time::interval(self.settings.progress_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut haves: JoinSet<(usize, Result<Have, NoAnswer>)> = JoinSet::new();
        let mut refresh = tokio::time::interval(HAVE_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut feed_tick = tokio::time::interval(SOURCE_FEED_INTERVAL);
        feed_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Until a source says what it has, it is given nothing.
        for source in 0..self.sources.len() {
            self.schedule.set_available(
                source,
                Some(ChunkBitmap::new(self.manifest.chunks.len() as u64)),
            );
        }
        self.ask_haves(&mut haves);

        loop {
            if failure.is_none() {
                for source in 0..self.sources.len() {
                    while let Some(index) = self.schedule.next_for(source) {
                        tasks.spawn(fetch_one(ChunkJob {
                            source,
                            peer: Arc::clone(&self.sources[source]),
                            image: self.image.clone(),
                            index,
                            manifest: Arc::clone(&self.manifest),
                            writer: Arc::clone(&self.writer),
                            deadline: self.settings.request_deadline,
                            share: self.guard.is_some(),
                        }));
                    }
                }
            }
            if saving.is_none() && !to_record.is_empty() {
                saving_slots = std::mem::take(&mut to_record);
                saving = Some(self.spawn_save());
            }
            // Nothing in flight, but a source pulling too may soon hold
            // what is missing: wait for it, up to a limit.
            let waiting_for_sources = failure.is_none()
                && !self.schedule.is_complete()
                && (self.schedule.partial_sources_live() || !haves.is_empty())
                && self.last_progress.elapsed() < self.settings.partial_stall;
            if tasks.is_empty() && saving.is_none() && !waiting_for_sources {
                break;
            }
            tokio::select! {
                Some(joined) = haves.join_next(), if !haves.is_empty() => {
                    if let Ok((source, answer)) = joined {
                        self.on_have(source, answer);
                    }
                }
                _ = refresh.tick(), if failure.is_none() => {
                    self.ask_haves(&mut haves);
                }
                _ = feed_tick.tick(), if failure.is_none() && self.feed.is_some() => {
                    self.add_sources();
                    self.ask_haves(&mut haves);
                }
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    match joined {
                        Ok(outcome) => {
                            if let Some(error) = self.on_outcome(outcome, &mut to_record) {
                                tasks.abort_all();
                                failure.get_or_insert(error);
                            }
                        }
                        Err(error) if error.is_cancelled() => {}
                        Err(_) => {
                            tasks.abort_all();
                            failure.get_or_insert(PullError::TaskLost);
                        }
                    }
                }
                saved = join_opt(&mut saving) => {
                    saving = None;
                    match saved {
                        Ok(Ok(())) => {
                            for source in saving_slots.drain(..) {
                                self.schedule.recorded(source);
                            }
                        }
                        Ok(Err(source)) => {
                            tasks.abort_all();
                            failure.get_or_insert(PullError::Progress { image: self.image.clone(), source });
                        }
                        Err(_) => {
                            tasks.abort_all();
                            failure.get_or_insert(PullError::TaskLost);
                        }
                    }
                }
                _ = tick.tick() => {
                    if reporting.as_ref().is_none_or(JoinHandle::is_finished) {
                        reporting = Some(self.spawn_report());
                    }
                }
            }
        }
        if let Some(reporting) = reporting {
            let _ = reporting.await;
        }
        if let Some(error) = failure {
            let _ = self.report_progress().await;
            return Err(error);
        }
        if !self.schedule.is_complete() {
            let _ = self.report_progress().await;
            return Err(PullError::SourcesExhausted {
                image: self.image.clone(),
                missing: self.schedule.n_missing(),
                total: self.manifest.data_chunks().count() as u64,
            });
        }
        // The final state on disk and in the record.
        self.spawn_save()
            .await
            .map_err(|_| PullError::TaskLost)?
            .map_err(|source| PullError::Progress {
                image: self.image.clone(),
                source,
            })?;
        self.report_progress().await
    }

    /// Asks every live source that holds only some chunks (or has not said
    /// yet) what it holds now; one request per source at a time.
    fn ask_haves(&mut self, haves: &mut JoinSet<(usize, Result<Have, NoAnswer>)>) {
        for source in 0..self.sources.len() {
            let live = self
                .schedule
                .tally(source)
                .is_some_and(|tally| !tally.dropped);
            if !live || !self.schedule.is_partial(source) || self.have_pending[source] {
                continue;
            }
            self.have_pending[source] = true;
            let ask = self.sources[source].have(&self.image);
            let deadline = self.settings.request_deadline;
            haves.spawn(async move {
                let answer = match tokio::time::timeout(deadline, ask).await {
                    Err(_) => Err(NoAnswer::TimedOut(deadline)),
                    Ok(answer) => answer.map_err(NoAnswer::Request),
                };
                (source, answer)
            });
        }
    }

    /// What a source said it holds.
    fn on_have(&mut self, source: usize, answer: Result<Have, NoAnswer>) {
        if let Some(pending) = self.have_pending.get_mut(source) {
            *pending = false;
        }
        let peer = self.sources[source].server();
        let image = &self.image;
        match answer.map(|have| have.bitmap(self.manifest.chunks.len() as u64)) {
            Ok(Ok(available)) => self.schedule.set_available(source, available),
            Ok(Err(problem)) => {
                tracing::warn!(%peer, %image, problem, "holder sent a chunk list that does not fit the manifest")
            }
            // It may have dropped the version, or be slow: asked again at
            // the next refresh; its chunk requests tell the rest.
            Err(error) => {
                tracing::debug!(%peer, %image, error = %crate::error_chain(&error), "holder did not say which chunks it has")
            }
        }
    }

    /// Adds the sources the feed knows and this pull does not.
    fn add_sources(&mut self) {
        let Some(feed) = self.feed.clone() else {
            return;
        };
        for peer in feed() {
            let server = peer.server();
            if self.sources.iter().any(|known| known.server() == server) {
                continue;
            }
            tracing::info!(image = %self.image, peer = %server, "a new source joins the pull");
            let index = self
                .schedule
                .add_source(Some(ChunkBitmap::new(self.manifest.chunks.len() as u64)));
            debug_assert_eq!(index, self.sources.len());
            self.sources.push(peer);
            self.have_pending.push(false);
            self.per_source.push((0, 0));
        }
    }

    /// Takes in one chunk's outcome; an error here stops the pull.
    fn on_outcome(
        &mut self,
        outcome: ChunkOutcome,
        to_record: &mut Vec<usize>,
    ) -> Option<PullError> {
        let ChunkOutcome {
            source,
            index,
            result,
        } = outcome;
        let peer = self.sources[source].server();
        let image = &self.image;
        let fault = match result {
            Ok(fetched) => {
                self.bitmap.set(index);
                self.last_progress = Instant::now();
                if let Some(guard) = &self.guard {
                    guard.written(index, fetched.wire);
                }
                self.schedule.delivered(source, index);
                to_record.push(source);
                self.bytes_done += fetched.bytes;
                let (bytes, wire) = &mut self.per_source[source];
                *bytes += fetched.bytes;
                *wire += fetched.wire_bytes;
                return None;
            }
            // Not the peer's fault: the pull stops, the source's tally stays.
            Err(ChunkFailure::Local(error)) => return Some(*error),
            Err(ChunkFailure::Bad(error)) => {
                tracing::warn!(%peer, %image, chunk = index, error = %crate::error_chain(&error), "bad chunk from holder; fetching it again from another");
                Fault::Bad
            }
            Err(ChunkFailure::NoAnswer(error)) => {
                tracing::info!(%peer, %image, chunk = index, error = %crate::error_chain(&error), "chunk request failed; asking another holder");
                Fault::Unavailable
            }
        };
        if self.schedule.failed(source, index, fault) {
            let tally = self.schedule.tally(source).cloned().unwrap_or_default();
            tracing::warn!(%peer, %image, bad_chunks = tally.bad_chunks, errors = tally.errors, "holder dropped for this pull");
        }
        None
    }

    fn spawn_save(&self) -> JoinHandle<Result<(), ProgressError>> {
        let (file, digest, bitmap) = (self.progress_file.clone(), self.digest, self.bitmap.clone());
        let (writer, image) = (Arc::clone(&self.writer), self.image.clone());
        tokio::task::spawn_blocking(move || {
            // The bitmap may only claim chunks that are on disk: sync them
            // first (a no-op where libvirt streams wrote them). If that
            // fails the bitmap is not saved this time; the chunks are
            // fetched again after a crash, never trusted unsynced.
            if let Err(error) = writer.sync() {
                tracing::warn!(%image, error = %crate::error_chain(&error), "cannot sync the base volume; progress not recorded this time");
                return Ok(());
            }
            file.save(&digest, &bitmap)
        })
    }

    fn progress(&self) -> PullProgress {
        PullProgress {
            bytes_done: self.bytes_done.min(self.bytes_total),
            bytes_total: self.bytes_total,
        }
    }

    fn spawn_report(&self) -> JoinHandle<()> {
        let (callback, progress) = (Arc::clone(&self.on_progress), self.progress());
        tokio::task::spawn_blocking(move || callback(progress))
    }

    async fn report_progress(&self) -> Result<(), PullError> {
        self.spawn_report().await.map_err(|_| PullError::TaskLost)
    }

    fn report(&self, data_chunks: u64, chunks_already_here: u64, elapsed: Duration) -> PullReport {
        let sources: Vec<SourceReport> = self
            .sources
            .iter()
            .enumerate()
            .map(|(index, peer)| {
                let tally = self.schedule.tally(index).cloned().unwrap_or_default();
                let (bytes, wire_bytes) = self.per_source.get(index).copied().unwrap_or((0, 0));
                SourceReport {
                    server: peer.server(),
                    chunks: tally.chunks,
                    bytes,
                    wire_bytes,
                    bad_chunks: tally.bad_chunks,
                    errors: tally.errors,
                    dropped: tally.dropped,
                }
            })
            .collect();
        PullReport {
            image: self.image.clone(),
            data_chunks,
            chunks_already_here,
            chunks_fetched: sources.iter().map(|source| source.chunks).sum(),
            bytes_fetched: sources.iter().map(|source| source.bytes).sum(),
            wire_bytes: sources.iter().map(|source| source.wire_bytes).sum(),
            sources,
            elapsed,
        }
    }
}

/// One chunk to fetch from one source, with what checking and writing it
/// takes.
struct ChunkJob {
    source: usize,
    peer: Arc<dyn ChunkPeer>,
    image: ImageVersionId,
    index: u64,
    manifest: Arc<Manifest>,
    writer: Arc<ChunkWriter>,
    deadline: Duration,
    /// Keep the chunk's wire bytes for serving it to other pullers.
    share: bool,
}

/// Fetches the job's chunk from its peer, checks it and writes it.
async fn fetch_one(job: ChunkJob) -> ChunkOutcome {
    let ChunkJob {
        source,
        peer,
        image,
        index,
        manifest,
        writer,
        deadline,
        share,
    } = job;
    let result = async {
        let reply = match tokio::time::timeout(deadline, peer.chunk(&image, index)).await {
            Err(_) => return Err(ChunkFailure::NoAnswer(NoAnswer::TimedOut(deadline))),
            Ok(Err(error)) if error.is_bad_answer() => {
                return Err(ChunkFailure::Bad(BadChunk::Answer(error)))
            }
            Ok(Err(error)) => return Err(ChunkFailure::NoAnswer(NoAnswer::Request(error))),
            Ok(Ok(reply)) => reply,
        };
        if reply.index != index {
            return Err(ChunkFailure::Bad(BadChunk::WrongIndex {
                asked: index,
                got: reply.index,
            }));
        }
        let wire_bytes = reply.data.len() as u64;
        // Decoding, hashing and the write are CPU and disk work.
        tokio::task::spawn_blocking(move || {
            let bad = |error| ChunkFailure::Bad(BadChunk::Verification(error));
            let (offset, length) = manifest.chunk_range(index).map_err(bad)?;
            let limit = usize::try_from(length).unwrap_or(usize::MAX);
            let encoding = reply.encoding;
            let compressed = (share && encoding != Encoding::Raw).then(|| reply.data.clone());
            let data = codec::decode(encoding, reply.data, limit)
                .map_err(|error| ChunkFailure::Bad(BadChunk::Undecodable(error)))?;
            manifest.verify_chunk(index, &data).map_err(bad)?;
            writer.write(offset, &data).map_err(|source| {
                ChunkFailure::Local(Box::new(PullError::Write {
                    image: image.clone(),
                    index,
                    source,
                }))
            })?;
            let wire = match compressed {
                Some(compressed) => Some((encoding, compressed)),
                None => share.then_some((Encoding::Raw, data)),
            };
            Ok(Fetched {
                bytes: length,
                wire_bytes,
                wire,
            })
        })
        .await
        .map_err(|_| ChunkFailure::Local(Box::new(PullError::TaskLost)))?
    }
    .await;
    ChunkOutcome {
        source,
        index,
        result,
    }
}

fn log_report(report: &PullReport, complete: bool) {
    let seconds = report.elapsed.as_secs_f64();
    let rate_mb_s = if seconds > 0.0 {
        report.bytes_fetched as f64 / seconds / 1e6
    } else {
        0.0
    };
    for source in &report.sources {
        tracing::info!(
            image = %report.image,
            peer = %source.server,
            chunks = source.chunks,
            bytes = source.bytes,
            wire_bytes = source.wire_bytes,
            bad_chunks = source.bad_chunks,
            errors = source.errors,
            dropped = source.dropped,
            "pull source"
        );
    }
    let (seconds, rate_mb_s) = (format!("{seconds:.2}"), format!("{rate_mb_s:.0}"));
    if complete {
        tracing::info!(
            image = %report.image,
            data_chunks = report.data_chunks,
            chunks_already_here = report.chunks_already_here,
            chunks_fetched = report.chunks_fetched,
            bytes_fetched = report.bytes_fetched,
            wire_bytes = report.wire_bytes,
            seconds = %seconds,
            rate_mb_s = %rate_mb_s,
            "image pulled"
        );
    } else {
        tracing::info!(
            image = %report.image,
            data_chunks = report.data_chunks,
            chunks_already_here = report.chunks_already_here,
            chunks_fetched = report.chunks_fetched,
            bytes_fetched = report.bytes_fetched,
            wire_bytes = report.wire_bytes,
            seconds = %seconds,
            rate_mb_s = %rate_mb_s,
            "pull stopped before the image was complete"
        );
    }
}

async fn join_opt<T>(handle: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match handle {
        Some(handle) => handle.await,
        None => std::future::pending().await,
    }
}

async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> T + Send + 'static,
) -> Result<T, PullError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|_| PullError::TaskLost)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::federation::ProtocolError;
    use crate::model::ImageState;
    use crate::transfer::manifest::{manifest_of, MIN_CHUNK_SIZE};
    use crate::transfer::test_pool::TestPool;
    use crate::transfer::Encoding;

    const CHUNK: usize = MIN_CHUNK_SIZE as usize;
    const N_CHUNKS: usize = 40;
    /// A source's other streams when it is dropped.
    const IN_FLIGHT_AT_DROP: u32 = CHUNK_REQUESTS_PER_PEER as u32 - 1;

    /// What a fake holder does with requests.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Behaviour {
        Honest,
        /// Flips a byte in every nth chunk it sends.
        CorruptEvery(u64),
        WrongIndex,
        Undecodable,
        Garbage,
        Oversized,
        Truncated,
        Refuses,
        Hangs,
        /// Sends a manifest for other content.
        LyingManifest,
    }

    #[derive(Debug)]
    struct FakePeer {
        /// Chunks it holds when it is pulling too (`None`: complete).
        holds: Mutex<Option<ChunkBitmap>>,
        server: ServerId,
        data: Arc<Vec<u8>>,
        manifest: Manifest,
        behaviour: Behaviour,
        delay: Duration,
        asked: AtomicU64,
    }

    impl FakePeer {
        fn new(byte: u8, disk: &Disk, behaviour: Behaviour, delay_ms: u64) -> Arc<Self> {
            Arc::new(Self {
                holds: Mutex::new(None),
                server: ServerId::from_bytes([byte; 16]),
                data: Arc::clone(&disk.data),
                manifest: disk.manifest.clone(),
                behaviour,
                delay: Duration::from_millis(delay_ms),
                asked: AtomicU64::new(0),
            })
        }

        fn asked(&self) -> u64 {
            self.asked.load(Ordering::SeqCst)
        }
    }

    impl ChunkPeer for FakePeer {
        fn server(&self) -> ServerId {
            self.server
        }

        fn manifest(&self, _image: &ImageVersionId) -> PeerFuture<Manifest> {
            let mut manifest = self.manifest.clone();
            match self.behaviour {
                Behaviour::Refuses => {
                    return Box::pin(async {
                        Err(ImageRequestError::Refused {
                            reason: "not held complete here".to_owned(),
                        })
                    })
                }
                Behaviour::LyingManifest => manifest.chunks.swap(0, 1),
                _ => {}
            }
            Box::pin(async move { Ok(manifest) })
        }

        fn have(&self, _image: &ImageVersionId) -> PeerFuture<Have> {
            let have = match &*self.holds.lock().unwrap() {
                None => Have::Complete,
                Some(bitmap) => Have::Partial {
                    len: bitmap.len(),
                    bits: bitmap.as_bytes().to_vec(),
                },
            };
            Box::pin(async move { Ok(have) })
        }

        fn chunk(&self, _image: &ImageVersionId, index: u64) -> PeerFuture<ChunkReply> {
            if self
                .holds
                .lock()
                .unwrap()
                .as_ref()
                .is_some_and(|holds| !holds.get(index))
            {
                panic!("chunk {index} asked of a puller that does not have it");
            }
            let n = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
            let (offset, length) = self.manifest.chunk_range(index).unwrap();
            let mut data = self.data[offset as usize..(offset + length) as usize].to_vec();
            let (behaviour, delay) = (self.behaviour, self.delay);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let raw = |index, data| ChunkReply {
                    index,
                    encoding: Encoding::Raw,
                    data,
                };
                match behaviour {
                    Behaviour::Honest | Behaviour::LyingManifest => {}
                    Behaviour::CorruptEvery(every) => {
                        if n % every == 0 {
                            data[7] ^= 1;
                        }
                    }
                    Behaviour::WrongIndex => return Ok(raw(index + 1, data)),
                    Behaviour::Undecodable => {
                        return Ok(ChunkReply {
                            index,
                            encoding: Encoding::Zstd,
                            data: b"not zstd at all".to_vec(),
                        })
                    }
                    Behaviour::Garbage => {
                        return Err(ImageRequestError::Protocol(ProtocolError::Malformed(
                            "garbage".to_owned(),
                        )))
                    }
                    Behaviour::Oversized => {
                        data.extend_from_slice(&[1; 100]);
                        return Ok(raw(index, data));
                    }
                    Behaviour::Truncated => {
                        data.truncate(data.len() / 2);
                        return Ok(raw(index, data));
                    }
                    Behaviour::Refuses => {
                        return Err(ImageRequestError::Refused {
                            reason: "not held complete here".to_owned(),
                        })
                    }
                    Behaviour::Hangs => std::future::pending().await,
                }
                let (encoding, data) = codec::encode(&data);
                Ok(ChunkReply {
                    index,
                    encoding,
                    data,
                })
            })
        }
    }

    /// A disk-like image: zero chunks, text-like chunks, random chunks, and
    /// a short last chunk.
    struct Disk {
        data: Arc<Vec<u8>>,
        manifest: Manifest,
        image: BaseImage,
    }

    fn disk() -> Disk {
        let mut data = vec![0u8; N_CHUNKS * CHUNK - 1000];
        let text = b"deskgrid pulls chunks from every holder at once; ".repeat(CHUNK / 40);
        for (index, chunk) in data.chunks_mut(CHUNK).enumerate() {
            match index % 3 {
                0 => {}
                1 => {
                    let length = chunk.len();
                    chunk.copy_from_slice(&text[..length]);
                    chunk[0] = index as u8;
                }
                _ => rand::Rng::fill(&mut rand::rng(), chunk),
            }
        }
        let manifest = manifest_of(&data, MIN_CHUNK_SIZE).unwrap();
        let image = BaseImage {
            id: ImageVersionId::new("office-v1").unwrap(),
            digest: Some(manifest.root_digest()),
            virtual_size: data.len() as u64,
            parent: None,
            state: ImageState::Ready,
        };
        Disk {
            data: Arc::new(data),
            manifest,
            image,
        }
    }

    fn host(pool_bytes: u64) -> TestPool {
        TestPool::new(pool_bytes)
    }

    fn settings() -> PullSettings {
        PullSettings {
            request_deadline: Duration::from_millis(300),
            progress_interval: Duration::from_millis(5),
            ..PullSettings::default()
        }
    }

    /// The progress reports a pull made.
    fn recorder() -> (ProgressCallback, Arc<Mutex<Vec<PullProgress>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let callback: ProgressCallback = Arc::new(move |progress| {
            sink.lock().unwrap().push(progress);
        });
        (callback, seen)
    }

    async fn pull(
        disk: &Disk,
        peers: &[&Arc<FakePeer>],
        host: &TestPool,
        dir: &Path,
    ) -> Result<PullReport, PullError> {
        let sources = peers
            .iter()
            .map(|peer| Arc::clone(peer) as Arc<dyn ChunkPeer>)
            .collect();
        let (callback, _) = recorder();
        pull_image(
            &disk.image,
            sources,
            Arc::new(host.clone()),
            dir,
            &settings(),
            callback,
            Swarm::default(),
        )
        .await
    }

    fn volume_bytes(host: &TestPool, disk: &Disk) -> Vec<u8> {
        host.read_volume_at(
            &VolumeName::Base(disk.image.id.clone()),
            0,
            disk.data.len() as u64,
        )
        .unwrap()
    }

    fn data_chunks(disk: &Disk) -> u64 {
        disk.manifest.data_chunks().count() as u64
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pullers_serve_each_other_what_they_have_and_list_what_they_wrote() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        let n_chunks = disk.manifest.chunks.len() as u64;
        let data: Vec<u64> = disk.manifest.data_chunks().collect();
        // The first holder is slow; another puller, fast, has the first
        // half of the data chunks and joins through the feed.
        let origin = FakePeer::new(1, &disk, Behaviour::Honest, 20);
        let puller = FakePeer::new(2, &disk, Behaviour::Honest, 1);
        let mut half = ChunkBitmap::new(n_chunks);
        for index in &data[..data.len() / 2] {
            half.set(*index);
        }
        *puller.holds.lock().unwrap() = Some(half.clone());
        let feed: SourceFeed = {
            let puller = Arc::clone(&puller);
            Arc::new(move || vec![Arc::clone(&puller) as Arc<dyn ChunkPeer>])
        };
        let partial = Arc::new(PartialImages::new());
        let listed = Arc::new(Mutex::new(Vec::new()));
        let (callback, _) = recorder();
        let watching = {
            let (partial, listed, image, digest) = (
                Arc::clone(&partial),
                Arc::clone(&listed),
                disk.image.id.clone(),
                disk.image.digest.unwrap(),
            );
            Arc::new(move |_progress: PullProgress| {
                if let Some(have) = partial.have(&image, &digest) {
                    listed.lock().unwrap().push(have.count());
                }
            }) as ProgressCallback
        };
        let _ = callback;
        let settings = PullSettings {
            progress_interval: Duration::from_millis(5),
            ..settings()
        };
        let report = pull_image(
            &disk.image,
            vec![Arc::clone(&origin) as Arc<dyn ChunkPeer>],
            Arc::new(host.clone()),
            temp.path(),
            &settings,
            watching,
            Swarm {
                more_sources: Some(feed),
                partial: Some(Arc::clone(&partial)),
                start_seed: 0,
            },
        )
        .await
        .unwrap();
        assert_eq!(volume_bytes(&host, &disk), *disk.data);
        assert_eq!(
            report.sources.len(),
            2,
            "the feed's puller joined: {report:?}"
        );
        let by_puller = &report.sources[1];
        assert!(by_puller.chunks > 0, "{report:?}");
        assert!(
            by_puller.chunks <= data.len() as u64 / 2,
            "only what it has: {report:?}"
        );
        assert_eq!(
            report.sources[0].chunks + by_puller.chunks,
            data.len() as u64
        );
        // While it ran, the pull listed what it had, growing; once done it
        // is no longer listed.
        let listed = listed.lock().unwrap().clone();
        assert!(
            listed.windows(2).all(|pair| pair[0] <= pair[1]),
            "{listed:?}"
        );
        assert!(listed.len() >= 2, "{listed:?}");
        assert!(partial
            .have(&disk.image.id, &disk.image.digest.unwrap())
            .is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_whose_only_sources_are_stuck_pullers_ends() {
        // Nobody holds it complete and the other puller has nothing: the
        // pull waits for it a while, then gives up with what is missing.
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        let stuck = FakePeer::new(3, &disk, Behaviour::Honest, 1);
        *stuck.holds.lock().unwrap() = Some(ChunkBitmap::new(disk.manifest.chunks.len() as u64));
        let (callback, _) = recorder();
        let settings = PullSettings {
            partial_stall: Duration::from_millis(300),
            ..settings()
        };
        let error = pull_image(
            &disk.image,
            vec![Arc::clone(&stuck) as Arc<dyn ChunkPeer>],
            Arc::new(host.clone()),
            temp.path(),
            &settings,
            callback,
            Swarm::default(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, PullError::SourcesExhausted { missing, .. } if missing == data_chunks(&disk)),
            "{error}"
        );
        assert_eq!(stuck.asked(), 0);
    }

    #[test]
    fn chunks_waiting_together_go_up_in_one_upload_per_run() {
        let host = host(1 << 30);
        let image = ImageVersionId::new("group").unwrap();
        let chunk = 64 * 1024;
        let n_chunks = 48u64;
        host.create_base_volume(&image, n_chunks * chunk, VolumeFormat::Raw)
            .unwrap();
        let writer = Arc::new(GroupWriter::new(
            Arc::new(host.clone()),
            VolumeName::Base(image.clone()),
        ));
        // Eight writers at once, each a stripe of chunks; two chunks are
        // left out so the runs have gaps.
        let threads: Vec<_> = (0..8u64)
            .map(|stripe| {
                let writer = Arc::clone(&writer);
                std::thread::spawn(move || {
                    for index in (stripe..n_chunks).step_by(8) {
                        if index == 10 || index == 31 {
                            continue;
                        }
                        let data = vec![u8::try_from(index).unwrap(); chunk as usize];
                        writer.write(index * chunk, &data).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let bytes = host
            .read_volume_at(&VolumeName::Base(image), 0, n_chunks * chunk)
            .unwrap();
        for index in 0..n_chunks {
            let expected = if index == 10 || index == 31 {
                0
            } else {
                index as u8
            };
            let at = (index * chunk) as usize;
            assert!(
                bytes[at..at + chunk as usize]
                    .iter()
                    .all(|byte| *byte == expected),
                "chunk {index}"
            );
        }
        assert_eq!(host.refused_writes(), 0, "one upload at a time");
        assert!(
            host.writes() < n_chunks - 2,
            "{} uploads for {} chunks: adjacent chunks went together",
            host.writes(),
            n_chunks - 2
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holders_share_the_work_and_the_faster_one_serves_more() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        let fast = FakePeer::new(1, &disk, Behaviour::Honest, 1);
        let slow = FakePeer::new(2, &disk, Behaviour::Honest, 15);
        let (callback, seen) = recorder();
        let report = pull_image(
            &disk.image,
            vec![
                Arc::clone(&slow) as Arc<dyn ChunkPeer>,
                Arc::clone(&fast) as Arc<dyn ChunkPeer>,
            ],
            Arc::new(host.clone()),
            temp.path(),
            &settings(),
            callback,
            Swarm::default(),
        )
        .await
        .unwrap();
        assert_eq!(volume_bytes(&host, &disk), *disk.data);
        assert_eq!(host.refused_writes(), 0, "one write at a time");
        assert_eq!(report.chunks_fetched, data_chunks(&disk));
        assert_eq!(report.chunks_already_here, 0);
        assert_eq!(report.bytes_fetched, disk.manifest.data_bytes());
        assert!(report.wire_bytes < report.bytes_fetched, "text compresses");
        let (by_slow, by_fast) = (&report.sources[0], &report.sources[1]);
        assert!(by_slow.chunks > 0, "{report:?}");
        assert!(by_fast.chunks > by_slow.chunks, "{report:?}");
        assert_eq!(fast.asked() + slow.asked(), data_chunks(&disk));
        // Zero chunks are never asked for; the progress ends at 100 %.
        let last = *seen.lock().unwrap().last().unwrap();
        assert_eq!(last.bytes_done, last.bytes_total);
        assert_eq!(last.bytes_total, disk.manifest.data_bytes());
        let bitmap = ProgressFile::new(temp.path(), &disk.image.id)
            .load(&disk.manifest.root_digest(), N_CHUNKS as u64)
            .unwrap()
            .unwrap();
        assert_eq!(bitmap.count(), N_CHUNKS as u64);
        // The manifest is kept, for serving and resuming.
        assert_eq!(
            ManifestStore::new(temp.path().join("manifests"))
                .load_verified(&disk.image.id, &disk.manifest.root_digest())
                .unwrap(),
            Some(disk.manifest.clone())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_chunks_are_fetched_again_elsewhere_and_the_bad_holder_dropped() {
        for behaviour in [
            Behaviour::CorruptEvery(1),
            Behaviour::WrongIndex,
            Behaviour::Undecodable,
            Behaviour::Garbage,
            Behaviour::Oversized,
            Behaviour::Truncated,
        ] {
            let temp = tempfile::tempdir().unwrap();
            let disk = disk();
            let host = host(1 << 30);
            let bad = FakePeer::new(1, &disk, behaviour, 0);
            let good = FakePeer::new(2, &disk, Behaviour::Honest, 2);
            let report = pull(&disk, &[&bad, &good], &host, temp.path())
                .await
                .unwrap_or_else(|error| panic!("{behaviour:?}: {}", crate::error_chain(&error)));
            assert_eq!(volume_bytes(&host, &disk), *disk.data, "{behaviour:?}");
            // Dropped at the third bad chunk; what it had in flight then
            // still comes back bad.
            let by_bad = &report.sources[0];
            assert!(
                by_bad.chunks == 0
                    && by_bad.dropped
                    && (3..=3 + IN_FLIGHT_AT_DROP).contains(&by_bad.bad_chunks),
                "{behaviour:?}: {report:?}"
            );
            assert_eq!(report.sources[1].chunks, data_chunks(&disk));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sometimes_corrupt_holder_still_serves_its_good_chunks() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        let flaky = FakePeer::new(1, &disk, Behaviour::CorruptEvery(5), 1);
        let good = FakePeer::new(2, &disk, Behaviour::Honest, 1);
        let report = pull(&disk, &[&flaky, &good], &host, temp.path())
            .await
            .unwrap();
        assert_eq!(volume_bytes(&host, &disk), *disk.data);
        let by_flaky = &report.sources[0];
        assert!(
            by_flaky.bad_chunks >= 1 && by_flaky.chunks > 0,
            "{report:?}"
        );
        assert_eq!(report.chunks_fetched, data_chunks(&disk));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holders_that_do_not_answer_are_dropped() {
        for behaviour in [Behaviour::Hangs, Behaviour::Refuses] {
            let temp = tempfile::tempdir().unwrap();
            let disk = disk();
            let host = host(1 << 30);
            let silent = FakePeer::new(1, &disk, behaviour, 0);
            let good = FakePeer::new(2, &disk, Behaviour::Honest, 1);
            let report = pull(&disk, &[&silent, &good], &host, temp.path())
                .await
                .unwrap();
            assert_eq!(volume_bytes(&host, &disk), *disk.data);
            let by_silent = &report.sources[0];
            assert!(
                by_silent.chunks == 0
                    && by_silent.dropped
                    && (3..=3 + IN_FLIGHT_AT_DROP).contains(&by_silent.errors),
                "{behaviour:?}: {report:?}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_pull_keeps_its_progress_and_the_next_fetches_only_the_rest() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        // The only holder corrupts every third chunk: dropped after three.
        let flaky = FakePeer::new(1, &disk, Behaviour::CorruptEvery(3), 0);
        let error = pull(&disk, &[&flaky], &host, temp.path())
            .await
            .unwrap_err();
        let PullError::SourcesExhausted { missing, total, .. } = error else {
            panic!("{}", crate::error_chain(&error));
        };
        assert_eq!(total, data_chunks(&disk));
        assert!(missing > 0 && missing < total, "{missing} of {total}");
        let bitmap = ProgressFile::new(temp.path(), &disk.image.id)
            .load(&disk.manifest.root_digest(), N_CHUNKS as u64)
            .unwrap()
            .unwrap();
        let zero_chunks = N_CHUNKS as u64 - total;
        assert_eq!(
            bitmap.count(),
            zero_chunks + total - missing,
            "every chunk written is recorded"
        );

        // The next attempt asks only for what is missing.
        let good = FakePeer::new(2, &disk, Behaviour::Honest, 0);
        let report = pull(&disk, &[&good], &host, temp.path()).await.unwrap();
        assert_eq!(report.chunks_already_here, total - missing);
        assert_eq!(report.chunks_fetched, missing);
        assert_eq!(good.asked(), missing);
        assert_eq!(volume_bytes(&host, &disk), *disk.data);

        // Complete: a third attempt fetches nothing.
        let report = pull(&disk, &[&good], &host, temp.path()).await.unwrap();
        assert_eq!(report.chunks_fetched, 0);
        assert_eq!(good.asked(), missing);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_volume_never_trusts_an_old_progress_file() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        let good = FakePeer::new(2, &disk, Behaviour::Honest, 0);
        pull(&disk, &[&good], &host, temp.path()).await.unwrap();
        // The image was dropped here (volume deleted, files left behind).
        host.delete_volume(&VolumeName::Base(disk.image.id.clone()))
            .unwrap();
        let report = pull(&disk, &[&good], &host, temp.path()).await.unwrap();
        assert_eq!(report.chunks_fetched, data_chunks(&disk));
        assert_eq!(volume_bytes(&host, &disk), *disk.data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_pool_is_refused_before_anything_is_written() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(disk.data.len() as u64 - 1);
        let good = FakePeer::new(2, &disk, Behaviour::Honest, 0);
        let error = pull(&disk, &[&good], &host, temp.path()).await.unwrap_err();
        let text = crate::error_chain(&error);
        assert!(
            text.starts_with(
                "cannot prepare the base volume of image version office-v1: pool test-pool has"
            ) && text.contains("are needed"),
            "{text}"
        );
        assert_eq!(good.asked(), 0);
        assert!(host.list_volumes().unwrap().is_empty());
        assert!(
            std::fs::read_dir(temp.path()).unwrap().next().is_none(),
            "no manifest, no progress file"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_manifest_that_does_not_verify_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let disk = disk();
        let host = host(1 << 30);
        let liar = FakePeer::new(1, &disk, Behaviour::LyingManifest, 0);
        let error = pull(&disk, &[&liar], &host, temp.path()).await.unwrap_err();
        let text = crate::error_chain(&error);
        assert!(
            text.starts_with("none of the 1 holder(s) of image version office-v1 sent a manifest that verifies: the manifest's root digest is"),
            "{text}"
        );
        assert!(host.list_volumes().unwrap().is_empty());

        let refuses = FakePeer::new(3, &disk, Behaviour::Refuses, 0);
        let good = FakePeer::new(2, &disk, Behaviour::Honest, 0);
        pull(&disk, &[&liar, &refuses, &good], &host, temp.path())
            .await
            .unwrap();
        assert_eq!(volume_bytes(&host, &disk), *disk.data);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_digest_or_holders_nothing_starts() {
        let temp = tempfile::tempdir().unwrap();
        let mut disk = disk();
        let host = host(1 << 30);
        assert!(matches!(
            pull(&disk, &[], &host, temp.path()).await,
            Err(PullError::NoSources { .. })
        ));
        disk.image.digest = None;
        let good = FakePeer::new(2, &disk, Behaviour::Honest, 0);
        assert!(matches!(
            pull(&disk, &[&good], &host, temp.path()).await,
            Err(PullError::NoDigest { .. })
        ));
    }
}
