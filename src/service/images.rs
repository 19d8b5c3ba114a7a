//! Base image versions: importing a disk image file into this host's pool
//! and the grid, registering it with the running server, and listing them.
//!
//! `deskgrid image import` runs [`import_image`] in the CLI's own process on
//! the server's host (it needs the data directory and libvirt, as the server
//! does), and reaches the running server through an [`ImageRegistry`] the
//! CLI implements over the control socket; the server's side is
//! [`GridService::register_image`].
//!
//! An import streams the virtual disk's raw bytes once: every read goes both
//! to the manifest builder and to the pool volume's upload stream (a tee), so
//! the digest names exactly the bytes the pool holds. Base images are stored
//! as **raw** volumes: a volume's bytes are the virtual disk, so a chunk's
//! offset in the manifest is its offset in the volume (pulls write chunks
//! with `write_volume_at` and serve them with `read_volume_at`). A file in
//! another format is converted by `qemu-img` to a raw temporary file under
//! `DATA_DIR/transfer/` first.
//!
//! Nothing is left half-done: refusals come before any work, a failed or
//! interrupted upload leaves no volume, the manifest is saved before the
//! version is registered, and a registration the server refuses removes the
//! volume and the manifest again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub mod diffs;

use super::{now_ms, GridService, ServiceError};
use crate::actuator::libvirt::LibvirtHypervisor;
use crate::actuator::{ActuatorError, Hypervisor, VolumeFormat, VolumeName};
use crate::appliance::config::Config;
use crate::appliance::data_dir::DataDir;
use crate::model::{
    BaseImage, ImageDigest, ImageHolding, ImageState, ImageVersionId, ModelError, ServerId,
};
use crate::state::{ConfigKey, ConfigValue};
use crate::transfer::manifest::DEFAULT_CHUNK_SIZE;
use crate::transfer::{ChunkEntry, Manifest, ManifestBuilder, ManifestStore, ManifestStoreError};

const QEMU_IMG: &str = "qemu-img";
/// `qemu-img info` reads a few headers; a file that keeps it busy this long
/// is broken or hostile (OpenStack bounds it the same way).
const INSPECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running `qemu-img` is checked for an exit or an interrupt.
const CHILD_POLL: Duration = Duration::from_millis(100);
/// How often a `qemu-img` that closed its output is checked for its exit.
const EXIT_POLL: Duration = Duration::from_millis(2);
/// Raw disks are whole 512-byte sectors; a raw file of any other length is
/// not a disk (and QEMU would round its size up).
const SECTOR: u64 = 512;
/// What is kept of a `qemu-img` error output: its message, not a flood.
const MAX_TOOL_MESSAGE: usize = 4096;
/// `qemu-img info` JSON is a few hundred bytes; more is not an answer.
const MAX_INFO_OUTPUT: usize = 1 << 20;
/// Bytes handed to the upload stream per read: exactly libvirt's largest
/// stream message payload (`VIR_NET_MESSAGE_LEGACY_PAYLOAD_MAX`, 256 KiB
/// less a 24-byte header; what `virsh vol-upload` sends). libvirt splits a
/// larger send into messages of that size plus a short remainder, and the
/// short ones cost libvirtd dearly: 1 MiB reads made a 1 GiB import 3x slower.
const UPLOAD_READ: usize = 262_120;
/// Blocks read ahead of the manifest's thread (4 MiB: one chunk): enough to
/// smooth out both sides, little memory.
const HASH_QUEUE_BLOCKS: usize = 16;

/// The manifests this server keeps (and serves to pullers).
pub fn manifest_store(data_dir: &DataDir) -> ManifestStore {
    ManifestStore::new(data_dir.transfer_dir().join("manifests"))
}

/// Where an import is; sent to the progress callback as it goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImportPhase {
    /// `qemu-img` converts the file to a raw temporary file.
    Converting,
    /// The raw bytes go to the pool and the manifest.
    Importing,
    /// The running server records the version in the grid.
    Registering,
}

/// Bytes done of the current phase, out of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportProgress {
    pub phase: ImportPhase,
    pub done: u64,
    pub total: u64,
}

/// What an import did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportReport {
    pub version: ImageVersionId,
    pub digest: ImageDigest,
    /// Size of the disk the guest sees.
    pub virtual_size: u64,
    /// The file's format as `qemu-img` found it (`raw`, `qcow2`, ...).
    pub source_format: String,
    /// Bytes in chunks that are not all zero (what a pull moves).
    pub data_bytes: u64,
    pub chunks: u64,
    pub zero_chunks: u64,
    /// The volume's path in the storage pool.
    pub volume_path: String,
    /// Time spent converting to raw (0 for a raw file).
    pub convert_seconds: f64,
    /// Whole import, from the first check to the registration.
    pub seconds: f64,
    /// Virtual-disk megabytes (10^6 bytes) per second over the whole import.
    pub mb_per_second: f64,
}

/// A server that holds a version complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHolder {
    pub server: ServerId,
    pub name: String,
    pub this_server: bool,
}

/// A server pulling a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImagePull {
    pub server: ServerId,
    pub name: String,
    pub this_server: bool,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One base image version of the grid and where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub id: ImageVersionId,
    pub state: ImageState,
    pub virtual_size: u64,
    pub digest: Option<ImageDigest>,
    pub parent: Option<ImageVersionId>,
    /// Servers (not removed ones) whose record says they hold it complete.
    pub complete_on: Vec<ImageHolder>,
    /// Servers whose record says they are pulling it.
    pub pulling_on: Vec<ImagePull>,
}

/// What the import reports the server's answers as.
pub type RegistryError = Box<dyn std::error::Error + Send + Sync>;

/// The running server, as an import sees it. The CLI implements it over the
/// control socket (the service does not know the faces).
pub trait ImageRegistry {
    /// Every version in the grid; fails when no server runs.
    fn images(&self) -> Result<Vec<ImageSummary>, RegistryError>;

    /// Asks the server to register a version whose volume is in the pool and
    /// whose manifest is in this server's manifest store.
    fn register(
        &self,
        version: &ImageVersionId,
        digest: &ImageDigest,
        virtual_size: u64,
        parent: Option<&ImageVersionId>,
    ) -> Result<ImageSummary, RegistryError>;
}

/// Why an import, a registration or a listing was refused.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {}", .path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not a file or a block device", .path.display())]
    NotAFile { path: PathBuf },
    #[error("{} is not a disk image qemu-img can read: {reason}", .path.display())]
    NotADiskImage { path: PathBuf, reason: String },
    #[error("{} refers to another file ({reference}): import a self-contained image (`qemu-img convert -O qcow2 {} flat.qcow2` makes one)", .path.display(), .path.display())]
    ExternalReference { path: PathBuf, reference: String },
    #[error("{} holds an empty disk", .path.display())]
    EmptyDisk { path: PathBuf },
    #[error(
        "qemu-img is not installed (Debian package qemu-utils; scripts/setup-host.sh installs it)"
    )]
    QemuImgMissing,
    #[error("cannot run qemu-img")]
    QemuImg(#[source] io::Error),
    #[error("qemu-img did not finish reading {} within {seconds} s", .path.display())]
    InspectTimeout { path: PathBuf, seconds: u64 },
    #[error("image version {version} is already in the grid: versions never change, import under a new name")]
    VersionExists { version: ImageVersionId },
    #[error(transparent)]
    Registry(RegistryError),
    #[error(transparent)]
    Host(#[from] ActuatorError),
    #[error("pool {pool} has {available_bytes} bytes free; the image needs {needed_bytes} (its virtual size: base images are stored raw)")]
    PoolFull {
        pool: String,
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error("pool {pool} already holds a volume {volume} that no grid version owns (left by an interrupted import?): delete it with `virsh vol-delete --pool {pool} {volume}`, then import again")]
    VolumeExists { pool: String, volume: String },
    #[error("{} has {available_bytes} bytes free; converting needs at least {needed_bytes}", .dir.display())]
    NoRoomToConvert {
        dir: PathBuf,
        needed_bytes: u64,
        available_bytes: u64,
    },
    #[error("another import of {version} is converting into {}", .path.display())]
    ImportRunning {
        version: ImageVersionId,
        path: PathBuf,
    },
    #[error("cannot {action} {}", .path.display())]
    TempFile {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("qemu-img cannot convert {} to raw: {reason}", .path.display())]
    Convert { path: PathBuf, reason: String },
    #[error("the import was interrupted; nothing was kept")]
    Cancelled,
    #[error("cannot store the manifest")]
    Manifest(#[from] ManifestStoreError),
    #[error("this server has no manifest for {version}: an import stores it before it registers the version")]
    NoManifest { version: ImageVersionId },
    #[error("the manifest of {version} describes {manifest_size} bytes, the registration says {virtual_size}")]
    SizeMismatch {
        version: ImageVersionId,
        manifest_size: u64,
        virtual_size: u64,
    },
    #[error("invalid image version {version}")]
    Invalid {
        version: ImageVersionId,
        #[source]
        source: ModelError,
    },
    #[error("the server did not register {version}, so the uploaded volume and the manifest were removed")]
    NotRegistered {
        version: ImageVersionId,
        #[source]
        source: RegistryError,
    },
    #[error("this server does not hold image version {parent} complete: publish a difference disk on a server that does")]
    ParentNotHere { parent: ImageVersionId },
    #[error("{} is not a qcow2 overlay deskgrid can use: {reason}", .path.display())]
    NotAnOverlay { path: PathBuf, reason: String },
    #[error("{} is not a usable difference disk: {reason}", .path.display())]
    BadDiff { path: PathBuf, reason: String },
    #[error("image version {version} has no digest in the grid yet")]
    NoDigest { version: ImageVersionId },
    #[error("the version rebuilt from the difference disk of {version} has digest {actual}, the grid's is {expected}")]
    DiffDigestMismatch {
        version: ImageVersionId,
        expected: ImageDigest,
        actual: ImageDigest,
    },
    #[error("image version {parent} is not in the grid, so it cannot be a parent")]
    UnknownParent { parent: ImageVersionId },
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// Imports `file` as base image version `version`: checks, converts when
/// the file is not raw, streams it into a raw pool volume while computing
/// its manifest, saves the manifest, and has the running server register the
/// version. `cancel` turning true stops it at the next read and removes
/// what it made.
pub fn import_image(
    data_dir: &DataDir,
    config: &Config,
    file: &Path,
    version: &ImageVersionId,
    registry: &dyn ImageRegistry,
    progress: &mut dyn FnMut(ImportProgress),
    cancel: &AtomicBool,
) -> Result<ImportReport, ImageError> {
    let started = Instant::now();
    let source = check_source(file)?;
    // Before any work: the server must run, and the version must be new.
    if registry
        .images()
        .map_err(ImageError::Registry)?
        .iter()
        .any(|image| image.id == *version)
    {
        return Err(ImageError::VersionExists {
            version: version.clone(),
        });
    }
    let disk = inspect(&source, cancel)?;
    // The model's limits (size), checked before any work rather than at
    // registration after the upload.
    new_version(
        version,
        None,
        None,
        disk.virtual_size,
        ImageState::Importing,
    )
    .validate()
    .map_err(|source| ImageError::Invalid {
        version: version.clone(),
        source,
    })?;
    let host = LibvirtHypervisor::connect(config.libvirt.libvirt_options())?;
    let import = Import {
        data_dir,
        source,
        disk,
        version,
        parent: None,
        registry,
        started,
    };
    import.run(&host, progress, cancel)
}

/// An import whose file is checked and whose version is new, ready to go
/// onto a host.
struct Import<'a> {
    data_dir: &'a DataDir,
    source: PathBuf,
    disk: DiskInfo,
    version: &'a ImageVersionId,
    /// The version it derives from (a published difference disk), if any.
    parent: Option<&'a ImageVersionId>,
    registry: &'a dyn ImageRegistry,
    started: Instant,
}

impl Import<'_> {
    fn run(
        self,
        host: &dyn Hypervisor,
        progress: &mut dyn FnMut(ImportProgress),
        cancel: &AtomicBool,
    ) -> Result<ImportReport, ImageError> {
        let Self {
            data_dir,
            source,
            disk,
            version,
            parent,
            registry,
            started,
        } = self;
        let pool = host.ensure_pool()?;
        if pool.available_bytes < disk.virtual_size {
            return Err(ImageError::PoolFull {
                pool: pool.name,
                needed_bytes: disk.virtual_size,
                available_bytes: pool.available_bytes,
            });
        }
        let volume = VolumeName::Base(version.clone());
        if host.list_volumes()?.iter().any(|info| info.name == volume) {
            return Err(ImageError::VolumeExists {
                pool: pool.name,
                volume: volume.to_string(),
            });
        }
        check_cancel(cancel)?;

        // Dropped (the temporary file removed) on every way out of here.
        let mut converted = None;
        let convert_started = Instant::now();
        let raw_path = if disk.format == "raw" {
            source.clone()
        } else {
            let temp = TempRaw::create(data_dir, version, &disk)?;
            convert_to_raw(&source, &disk, temp.path(), progress, cancel)?;
            let path = temp.path().to_owned();
            converted = Some(temp);
            path
        };
        let convert_seconds = if converted.is_some() {
            convert_started.elapsed().as_secs_f64()
        } else {
            0.0
        };

        let total = disk.virtual_size;
        let (info, manifest) =
            upload_with_manifest(host, version, &raw_path, total, progress, cancel)?;
        drop(converted);
        let digest = manifest.root_digest();

        // From here on, any failure removes the volume and the manifest.
        let undo = |reason: &str| {
            tracing::warn!(image = %version, reason, "removing the imported volume and manifest");
            if let Err(error) = host.delete_volume(&volume) {
                tracing::warn!(volume = %volume, error = %crate::error_chain(&error), "cannot remove the imported volume");
            }
            if let Err(error) = manifest_store(data_dir).remove(version) {
                tracing::warn!(image = %version, error = %crate::error_chain(&error), "cannot remove the manifest");
            }
        };
        if manifest.virtual_size != total {
            // The upload reads exactly `total` bytes through the tee; anything
            // else is a bug, and must not be registered.
            undo("the manifest does not cover the volume");
            return Err(ImageError::SizeMismatch {
                version: version.clone(),
                manifest_size: manifest.virtual_size,
                virtual_size: total,
            });
        }
        if let Err(error) = manifest_store(data_dir).save(version, &manifest) {
            undo("the manifest was not saved");
            return Err(error.into());
        }
        if cancel.load(Ordering::SeqCst) {
            undo("interrupted");
            return Err(ImageError::Cancelled);
        }
        progress(ImportProgress {
            phase: ImportPhase::Registering,
            done: 0,
            total: 1,
        });
        if let Err(source) = registry.register(version, &digest, total, parent) {
            // A lost answer is not a refusal: undo only what the grid does not
            // list as this very content held here.
            if !registered_here(registry, version, &digest) {
                undo("the server did not register the version");
                return Err(ImageError::NotRegistered {
                    version: version.clone(),
                    source,
                });
            }
            tracing::warn!(image = %version, error = %source, "the registration's answer was lost, but the grid lists the version");
        }
        progress(ImportProgress {
            phase: ImportPhase::Registering,
            done: 1,
            total: 1,
        });

        let zero_chunks = manifest
            .chunks
            .iter()
            .filter(|entry| matches!(entry, ChunkEntry::Zero))
            .count() as u64;
        let seconds = started.elapsed().as_secs_f64();
        Ok(ImportReport {
            version: version.clone(),
            digest,
            virtual_size: total,
            source_format: disk.format,
            data_bytes: manifest.data_bytes(),
            chunks: manifest.chunks.len() as u64,
            zero_chunks,
            volume_path: info.path,
            convert_seconds,
            seconds,
            mb_per_second: total as f64 / 1e6 / seconds.max(1e-9),
        })
    }
}

/// Streams the raw file `raw_path` (`total` bytes) once into a new raw base
/// volume for `version` while building its manifest (a tee: the digest names
/// exactly the bytes the pool holds). A failed upload leaves no volume.
pub(super) fn upload_with_manifest(
    host: &dyn Hypervisor,
    version: &ImageVersionId,
    raw_path: &Path,
    total: u64,
    progress: &mut dyn FnMut(ImportProgress),
    cancel: &AtomicBool,
) -> Result<(crate::actuator::VolumeInfo, Manifest), ImageError> {
    let raw = File::open(raw_path).map_err(|source| ImageError::Unreadable {
        path: raw_path.to_owned(),
        source,
    })?;
    progress(ImportProgress {
        phase: ImportPhase::Importing,
        done: 0,
        total,
    });
    // The manifest is built on a thread of its own, so hashing overlaps the
    // upload instead of adding to it.
    let (blocks, received) = mpsc::sync_channel::<Vec<u8>>(HASH_QUEUE_BLOCKS);
    let (uploaded, manifest) = std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut manifest = ManifestBuilder::new(DEFAULT_CHUNK_SIZE)
                .expect("the default chunk size is valid (transfer::manifest tests it)");
            for block in received {
                manifest.update(&block);
            }
            manifest.finish()
        });
        let mut tee = TeeReader {
            source: raw,
            blocks,
            cancel,
        };
        let uploaded =
            host.import_base_image(version, VolumeFormat::Raw, total, &mut tee, &mut |done| {
                progress(ImportProgress {
                    phase: ImportPhase::Importing,
                    done,
                    total,
                })
            });
        // Closes the queue: the hasher finishes the last chunk.
        drop(tee);
        let manifest = hasher
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (uploaded, manifest)
    });
    match uploaded {
        Ok(info) => Ok((info, manifest)),
        // The actuator removed the volume.
        Err(_) if cancel.load(Ordering::SeqCst) => Err(ImageError::Cancelled),
        Err(error) => Err(error.into()),
    }
}

/// Whether the grid lists `version` with `digest`, held complete here.
fn registered_here(
    registry: &dyn ImageRegistry,
    version: &ImageVersionId,
    digest: &ImageDigest,
) -> bool {
    registry.images().is_ok_and(|images| {
        images.iter().any(|image| {
            image.id == *version
                && image.digest == Some(*digest)
                && image.complete_on.iter().any(|holder| holder.this_server)
        })
    })
}

/// A version made here: imported (no parent) or published from a
/// difference disk on `parent`.
fn new_version(
    version: &ImageVersionId,
    parent: Option<&ImageVersionId>,
    digest: Option<ImageDigest>,
    virtual_size: u64,
    state: ImageState,
) -> BaseImage {
    BaseImage {
        id: version.clone(),
        digest,
        virtual_size,
        parent: parent.cloned(),
        state,
    }
}

fn check_cancel(cancel: &AtomicBool) -> Result<(), ImageError> {
    if cancel.load(Ordering::SeqCst) {
        Err(ImageError::Cancelled)
    } else {
        Ok(())
    }
}

/// The file's absolute path, after checking it is a readable file or block
/// device (an admin may import from a disk or a logical volume).
fn check_source(file: &Path) -> Result<PathBuf, ImageError> {
    let unreadable = |source| ImageError::Unreadable {
        path: file.to_owned(),
        source,
    };
    let path = fs::canonicalize(file).map_err(unreadable)?;
    let kind = fs::metadata(&path).map_err(unreadable)?.file_type();
    if !kind.is_file() && !kind.is_block_device() {
        return Err(ImageError::NotAFile {
            path: file.to_owned(),
        });
    }
    File::open(&path).map_err(unreadable)?;
    Ok(path)
}

/// What `qemu-img info` says of a file, as far as an import needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DiskInfo {
    format: String,
    virtual_size: u64,
    /// Bytes the file takes on disk (what a sparse raw copy takes, about).
    actual_size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct QemuImgInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<serde_json::Value>,
}

fn inspect(path: &Path, cancel: &AtomicBool) -> Result<DiskInfo, ImageError> {
    let mut command = Command::new(QEMU_IMG);
    command.args(["info", "--output=json"]).arg(path);
    let deadline = Instant::now() + INSPECT_TIMEOUT;
    let run = run_tool(command, Some(deadline), None, cancel)?;
    if run.timed_out {
        return Err(ImageError::InspectTimeout {
            path: path.to_owned(),
            seconds: INSPECT_TIMEOUT.as_secs(),
        });
    }
    if !run.status.success() {
        return Err(ImageError::NotADiskImage {
            path: path.to_owned(),
            reason: tool_message(&run.stderr, run.status),
        });
    }
    let file_size = fs::metadata(path)
        .ok()
        .filter(|metadata| metadata.is_file())
        .map(|metadata| metadata.len());
    parse_info(path, &run.stdout, file_size)
}

/// Reads `qemu-img info --output=json`, refusing what deskgrid must not
/// import: images that pull in other files (a backing file, an external data
/// file, VMDK extents elsewhere: they could read any file on the host into
/// the grid), raw files that are not whole sectors, empty or huge disks.
fn parse_info(path: &Path, json: &[u8], file_size: Option<u64>) -> Result<DiskInfo, ImageError> {
    let not_a_disk = |reason: String| ImageError::NotADiskImage {
        path: path.to_owned(),
        reason,
    };
    let info: QemuImgInfo = serde_json::from_slice(json)
        .map_err(|error| not_a_disk(format!("qemu-img info answered {error}")))?;
    let external = |reference: String| ImageError::ExternalReference {
        path: path.to_owned(),
        reference,
    };
    if let Some(backing) = info.backing_filename {
        return Err(external(format!("backing file {backing}")));
    }
    let data = info
        .format_specific
        .as_ref()
        .and_then(|specific| specific.get("data"));
    if let Some(data_file) = data
        .and_then(|data| data.get("data-file"))
        .and_then(|file| file.as_str())
    {
        return Err(external(format!("data file {data_file}")));
    }
    let own_name = path.to_string_lossy();
    let extents = data
        .and_then(|data| data.get("extents"))
        .and_then(|extents| extents.as_array());
    for extent in extents.into_iter().flatten() {
        let name = extent
            .get("filename")
            .and_then(|name| name.as_str())
            .unwrap_or_default();
        if name != own_name {
            return Err(external(format!("extent {name}")));
        }
    }
    if info.format.is_empty() {
        return Err(not_a_disk("qemu-img found no format".to_owned()));
    }
    if info.virtual_size == 0 {
        return Err(ImageError::EmptyDisk {
            path: path.to_owned(),
        });
    }
    if info.format == "raw" {
        if let Some(size) = file_size {
            if size % SECTOR != 0 || size != info.virtual_size {
                return Err(not_a_disk(format!(
                    "as a raw disk it would be {size} bytes, not a whole number of {SECTOR}-byte sectors"
                )));
            }
        }
    }
    Ok(DiskInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
    })
}

/// The raw temporary file a conversion writes, removed when dropped. A lock
/// on it keeps two imports of one version from sharing it; a file left by a
/// killed import is reused.
#[derive(Debug)]
struct TempRaw {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

impl TempRaw {
    fn create(
        data_dir: &DataDir,
        version: &ImageVersionId,
        disk: &DiskInfo,
    ) -> Result<Self, ImageError> {
        let dir = data_dir.transfer_dir();
        let temp_error = |action, path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::TempFile {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&dir).map_err(temp_error("create", &dir))?;
        // A sparse raw copy takes about what the file takes.
        let needed_bytes = disk.actual_size.unwrap_or(disk.virtual_size);
        let space = nix::sys::statvfs::statvfs(dir.as_path())
            .map_err(|errno| temp_error("read the free space of", &dir)(errno.into()))?;
        let available_bytes = space
            .blocks_available()
            .saturating_mul(space.fragment_size());
        if available_bytes < needed_bytes {
            return Err(ImageError::NoRoomToConvert {
                dir,
                needed_bytes,
                available_bytes,
            });
        }
        let path = dir.join(format!("import-{version}.raw"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(temp_error("create", &path))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| ImageError::ImportRunning {
                version: version.clone(),
                path: path.clone(),
            })?;
        // Empty first, then sized: a reused file keeps none of its old bytes.
        lock.set_len(0)
            .and_then(|()| lock.set_len(disk.virtual_size))
            .map_err(temp_error("size", &path))?;
        Ok(Self { path, _lock: lock })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempRaw {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %error, "cannot remove the temporary raw file");
        }
    }
}

/// `qemu-img convert` of `source` into the raw file `target` (created and
/// sized already), reporting progress from its `-p` output.
fn convert_to_raw(
    source: &Path,
    disk: &DiskInfo,
    target: &Path,
    progress: &mut dyn FnMut(ImportProgress),
    cancel: &AtomicBool,
) -> Result<(), ImageError> {
    let total = disk.virtual_size;
    progress(ImportProgress {
        phase: ImportPhase::Converting,
        done: 0,
        total,
    });
    let mut command = Command::new(QEMU_IMG);
    // The format is given, never probed again; -n writes into our file.
    command
        .args(["convert", "-p", "-n", "-f", &disk.format, "-O", "raw"])
        .arg(source)
        .arg(target);
    let mut on_percent = |percent: f64| {
        let done = (total as f64 * percent / 100.0) as u64;
        progress(ImportProgress {
            phase: ImportPhase::Converting,
            done: done.min(total),
            total,
        });
    };
    let run = run_tool(command, None, Some(&mut on_percent), cancel)?;
    if !run.status.success() {
        return Err(ImageError::Convert {
            path: source.to_owned(),
            reason: tool_message(&run.stderr, run.status),
        });
    }
    Ok(())
}

/// How a `qemu-img` run ended.
#[derive(Debug)]
struct ToolRun {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    timed_out: bool,
}

/// Runs `command` until it exits, `deadline` passes (it is killed, and
/// `timed_out` says so) or `cancel` turns true ([`ImageError::Cancelled`]).
/// With `on_percent`, stdout is read as `qemu-img -p` progress.
fn run_tool(
    mut command: Command,
    deadline: Option<Instant>,
    mut on_percent: Option<&mut dyn FnMut(f64)>,
    cancel: &AtomicBool,
) -> Result<ToolRun, ImageError> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound => ImageError::QemuImgMissing,
            _ => ImageError::QemuImg(error),
        })?;
    let parse_progress = on_percent.is_some();
    let (percent_sender, percents) = mpsc::channel();
    let stdout = child.stdout.take().map(|stdout| {
        std::thread::spawn(move || read_stdout(stdout, parse_progress, &percent_sender))
    });
    let stderr = child
        .stderr
        .take()
        .map(|stderr| std::thread::spawn(move || read_limited(stderr, MAX_TOOL_MESSAGE)));
    let mut timed_out = false;
    let status = loop {
        match percents.recv_timeout(CHILD_POLL) {
            Ok(percent) => {
                if let Some(on_percent) = on_percent.as_mut() {
                    on_percent(percent);
                }
            }
            // Output closed: the child is exiting; reap it soon.
            Err(mpsc::RecvTimeoutError::Disconnected) => std::thread::sleep(EXIT_POLL),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Some(status) = child.try_wait().map_err(ImageError::QemuImg)? {
            break status;
        }
        if cancel.load(Ordering::SeqCst) {
            // Interrupted either way; a child that cannot be reaped is the
            // system's problem, not this import's.
            let _ = stop(&mut child);
            return Err(ImageError::Cancelled);
        }
        if deadline.is_some_and(|deadline| Instant::now() > deadline) {
            timed_out = true;
            break stop(&mut child).map_err(ImageError::QemuImg)?;
        }
    };
    let stdout = stdout
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    let stderr = stderr
        .and_then(|reader| reader.join().ok())
        .unwrap_or_default();
    Ok(ToolRun {
        status,
        stdout,
        stderr,
        timed_out,
    })
}

fn stop(child: &mut Child) -> io::Result<ExitStatus> {
    // It may have exited on its own meanwhile; the wait reaps it either way.
    let _ = child.kill();
    child.wait()
}

/// Reads a child's stdout (at most [`MAX_INFO_OUTPUT`] kept); with
/// `parse_progress`, sends every `(NN.NN/100%)` it finds.
fn read_stdout(mut stdout: impl Read, parse_progress: bool, sender: &mpsc::Sender<f64>) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut pending = String::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = match stdout.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if parse_progress {
            pending.push_str(&String::from_utf8_lossy(&buffer[..read]));
            let (percents, rest) = parse_progress_output(&pending);
            for percent in percents {
                let _ = sender.send(percent);
            }
            pending = rest.to_owned();
        } else if kept.len() < MAX_INFO_OUTPUT {
            kept.extend_from_slice(&buffer[..read]);
        }
    }
    kept
}

/// The percentages in `qemu-img -p` output (`    (12.34/100%)\r`), and the
/// unfinished tail to keep for the next read.
fn parse_progress_output(text: &str) -> (Vec<f64>, &str) {
    let mut percents = Vec::new();
    let mut rest = text;
    while let Some(end) = rest.find(['\r', '\n']) {
        let line = rest[..end].trim();
        if let Some(percent) = line
            .strip_prefix('(')
            .and_then(|line| line.strip_suffix("/100%)"))
            .and_then(|number| number.parse::<f64>().ok())
        {
            percents.push(percent.clamp(0.0, 100.0));
        }
        rest = &rest[end + 1..];
    }
    (percents, rest)
}

fn read_limited(mut reader: impl Read, limit: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..read.min(room)]);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    kept
}

/// The message `qemu-img` printed, without its name, or its exit status.
fn tool_message(stderr: &[u8], status: ExitStatus) -> String {
    let text = String::from_utf8_lossy(stderr);
    let message = text
        .lines()
        .map(|line| line.trim().trim_start_matches("qemu-img: "))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if message.is_empty() {
        format!("qemu-img ended with {status}")
    } else {
        message
    }
}

/// Hands a copy of every block the upload reads to the manifest's thread.
struct TeeReader<'a> {
    source: File,
    blocks: mpsc::SyncSender<Vec<u8>>,
    cancel: &'a AtomicBool,
}

impl Read for TeeReader<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::SeqCst) {
            // Not `Interrupted`: readers retry that.
            return Err(io::Error::other("the import was interrupted"));
        }
        let limit = buffer.len().min(UPLOAD_READ);
        let read = self.source.read(&mut buffer[..limit])?;
        if read > 0 {
            self.blocks
                .send(buffer[..read].to_vec())
                .map_err(|_| io::Error::other("the manifest's thread stopped"))?;
        }
        Ok(read)
    }
}

impl GridService {
    /// Every base image version in the grid, sorted, with where it is.
    pub fn images(&self) -> Vec<ImageSummary> {
        let mut images: Vec<ImageSummary> = self
            .state
            .config_values()
            .filter_map(|value| match value {
                ConfigValue::Image(image) => Some(self.image_summary(image)),
                _ => None,
            })
            .collect();
        images.sort_by(|left, right| left.id.cmp(&right.id));
        images
    }

    fn image_summary(&self, image: &BaseImage) -> ImageSummary {
        let mut complete_on = Vec::new();
        let mut pulling_on = Vec::new();
        for (server, record) in self.state.servers() {
            if self.is_revoked(server) {
                continue;
            }
            let this_server = server == self.server_id;
            match record.images.get(&image.id) {
                Some(ImageHolding::Complete) => complete_on.push(ImageHolder {
                    server,
                    name: record.name.clone(),
                    this_server,
                }),
                Some(ImageHolding::Partial {
                    bytes_done,
                    bytes_total,
                }) => pulling_on.push(ImagePull {
                    server,
                    name: record.name.clone(),
                    this_server,
                    bytes_done: *bytes_done,
                    bytes_total: *bytes_total,
                }),
                None => {}
            }
        }
        ImageSummary {
            id: image.id.clone(),
            state: image.state,
            virtual_size: image.virtual_size,
            digest: image.digest,
            parent: image.parent.clone(),
            complete_on,
            pulling_on,
        }
    }

    /// Registers a version imported on this server: its manifest must be in
    /// this server's store under `digest` and describe `virtual_size` bytes,
    /// and its `parent` (a version published from a difference disk) must be
    /// in the grid. Writes the version as ready and this server as its
    /// complete holder.
    pub fn register_image(
        &mut self,
        data_dir: &DataDir,
        version: &ImageVersionId,
        digest: &ImageDigest,
        virtual_size: u64,
        parent: Option<&ImageVersionId>,
    ) -> Result<ImageSummary, ImageError> {
        let key = ConfigKey::Image(version.clone());
        if self.state.config(&key).is_some() {
            return Err(ImageError::VersionExists {
                version: version.clone(),
            });
        }
        if let Some(parent) = parent {
            if self
                .state
                .config(&ConfigKey::Image(parent.clone()))
                .is_none()
            {
                return Err(ImageError::UnknownParent {
                    parent: parent.clone(),
                });
            }
        }
        let manifest = manifest_store(data_dir)
            .load_verified(version, digest)?
            .ok_or_else(|| ImageError::NoManifest {
                version: version.clone(),
            })?;
        if manifest.virtual_size != virtual_size {
            return Err(ImageError::SizeMismatch {
                version: version.clone(),
                manifest_size: manifest.virtual_size,
                virtual_size,
            });
        }
        let image = new_version(
            version,
            parent,
            Some(*digest),
            virtual_size,
            ImageState::Ready,
        );
        image.validate().map_err(|source| ImageError::Invalid {
            version: version.clone(),
            source,
        })?;
        self.write(ConfigValue::Image(image.clone()))?;
        let holding = self.update_own_record(&mut |record| {
            record
                .images
                .insert(version.clone(), ImageHolding::Complete);
        });
        if let Err(error) = holding {
            // Nothing half-registered: a version nobody holds is taken back.
            let hlc = self.clock.tick(now_ms());
            let undone = self
                .state
                .prepare_config_write(self.server_id, hlc, key, None)
                .map_err(ServiceError::from)
                .and_then(|delta| self.commit(delta));
            if let Err(undo_error) = undone {
                tracing::error!(image = %version, error = %crate::error_chain(&undo_error), "cannot take back a version this server does not hold");
            }
            return Err(error.into());
        }
        tracing::info!(image = %version, %digest, virtual_size, "image version registered");
        Ok(self.image_summary(&image))
    }
}

#[cfg(test)]
mod tests {
    // A test that unwraps fails with the value it met: exactly what a test should do.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::appliance::config::{LibvirtSettings, ServerSettings};
    use crate::transfer::manifest::{manifest_of, MIN_CHUNK_SIZE};

    const QCOW2_INFO: &str = r#"{
        "virtual-size": 4194304, "filename": "/images/a.qcow2", "cluster-size": 65536,
        "format": "qcow2", "actual-size": 3280896,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false}},
        "dirty-flag": false
    }"#;

    #[test]
    fn qemu_img_info_is_read_and_images_that_reach_other_files_are_refused() {
        let path = Path::new("/images/a.qcow2");
        assert_eq!(
            parse_info(path, QCOW2_INFO.as_bytes(), Some(3_280_896)).unwrap(),
            DiskInfo {
                format: "qcow2".to_owned(),
                virtual_size: 4 << 20,
                actual_size: Some(3_280_896),
            }
        );
        let with = |extra: &str| {
            QCOW2_INFO.replacen(
                "\"dirty-flag\": false",
                &format!("\"dirty-flag\": false, {extra}"),
                1,
            )
        };
        let backing = with(r#""backing-filename": "/etc/shadow""#);
        assert!(matches!(
            parse_info(path, backing.as_bytes(), None),
            Err(ImageError::ExternalReference { reference, .. }) if reference == "backing file /etc/shadow"
        ));
        let data_file = QCOW2_INFO.replace(
            r#""corrupt": false"#,
            r#""corrupt": false, "data-file": "/dev/sda""#,
        );
        assert!(matches!(
            parse_info(path, data_file.as_bytes(), None),
            Err(ImageError::ExternalReference { .. })
        ));
        let vmdk = |extent: &str| {
            format!(
                r#"{{"virtual-size": 4194304, "format": "vmdk", "format-specific":
                    {{"type": "vmdk", "data": {{"extents": [{{"filename": "{extent}"}}]}}}}}}"#
            )
        };
        let own = Path::new("/images/a.vmdk");
        assert!(parse_info(own, vmdk("/images/a.vmdk").as_bytes(), None).is_ok());
        assert!(matches!(
            parse_info(own, vmdk("/root/secret").as_bytes(), None),
            Err(ImageError::ExternalReference { .. })
        ));
        assert!(matches!(
            parse_info(path, b"not json", None),
            Err(ImageError::NotADiskImage { .. })
        ));
    }

    #[test]
    fn raw_files_must_be_whole_sectors_and_disks_not_empty() {
        let raw = |size: u64| {
            format!(
                r#"{{"virtual-size": {}, "format": "raw"}}"#,
                size.div_ceil(512) * 512
            )
        };
        let path = Path::new("/images/a.raw");
        assert!(parse_info(path, raw(1 << 20).as_bytes(), Some(1 << 20)).is_ok());
        // "hello\n" is a 512-byte raw disk to qemu-img; not to deskgrid.
        assert!(matches!(
            parse_info(path, raw(6).as_bytes(), Some(6)),
            Err(ImageError::NotADiskImage { .. })
        ));
        // A block device has no file length: qemu-img's size stands.
        assert!(parse_info(path, raw(1 << 20).as_bytes(), None).is_ok());
        assert!(matches!(
            parse_info(path, raw(0).as_bytes(), Some(0)),
            Err(ImageError::EmptyDisk { .. })
        ));
    }

    #[test]
    fn convert_progress_is_read_across_reads() {
        let (percents, rest) = parse_progress_output("    (0.00/100%)\r    (69.57/100%)\r    (10");
        assert_eq!(percents, vec![0.0, 69.57]);
        assert_eq!(rest, "    (10");
        let (percents, rest) = parse_progress_output("    (100.00/100%)\r\n");
        assert_eq!(percents, vec![100.0]);
        assert_eq!(rest, "");
        assert_eq!(parse_progress_output("noise\r").0, Vec::<f64>::new());
    }

    #[test]
    fn tool_messages_drop_the_tool_name() {
        use std::os::unix::process::ExitStatusExt as _;
        let status = ExitStatus::from_raw(1 << 8);
        assert_eq!(
            tool_message(
                b"qemu-img: Could not open 'x': Unsupported qcow2 version 99\n",
                status
            ),
            "Could not open 'x': Unsupported qcow2 version 99"
        );
        assert!(tool_message(b"", status).contains("exit status: 1"));
    }

    fn service(dir: &Path) -> GridService {
        let (mut service, _) = GridService::open(ServerId::random(), &dir.join("state")).unwrap();
        let config = Config {
            server: ServerSettings {
                name: "alpha".to_owned(),
                ..ServerSettings::default()
            },
            libvirt: LibvirtSettings::default(),
            api: crate::appliance::config::ApiSettings::default(),
        };
        service.publish_own_record(&config).unwrap();
        service
    }

    #[test]
    fn registration_needs_the_manifest_and_writes_the_version_and_its_holder() {
        let temp = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(temp.path());
        let mut grid = service(temp.path());
        let version = ImageVersionId::new("office-v1").unwrap();
        let mut data = vec![0u8; 3 * MIN_CHUNK_SIZE as usize];
        data[7] = 1;
        let manifest = manifest_of(&data, MIN_CHUNK_SIZE).unwrap();
        let digest = manifest.root_digest();
        let size = data.len() as u64;

        assert!(matches!(
            grid.register_image(&data_dir, &version, &digest, size, None),
            Err(ImageError::NoManifest { .. })
        ));
        manifest_store(&data_dir).save(&version, &manifest).unwrap();
        let other = ImageDigest::from_bytes([7; 32]);
        assert!(matches!(
            grid.register_image(&data_dir, &version, &other, size, None),
            Err(ImageError::Manifest(ManifestStoreError::Mismatch { .. }))
        ));
        assert!(matches!(
            grid.register_image(&data_dir, &version, &digest, size + 1, None),
            Err(ImageError::SizeMismatch { .. })
        ));
        assert!(grid.images().is_empty(), "refusals write nothing");

        let summary = grid
            .register_image(&data_dir, &version, &digest, size, None)
            .unwrap();
        let expected = ImageSummary {
            id: version.clone(),
            state: ImageState::Ready,
            virtual_size: size,
            digest: Some(digest),
            parent: None,
            complete_on: vec![ImageHolder {
                server: grid.server_id(),
                name: "alpha".to_owned(),
                this_server: true,
            }],
            pulling_on: Vec::new(),
        };
        assert_eq!(summary, expected);
        assert_eq!(grid.images(), vec![expected]);
        assert!(matches!(
            grid.register_image(&data_dir, &version, &digest, size, None),
            Err(ImageError::VersionExists { .. })
        ));
    }

    /// What a pretend server answers a registration with.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Answer {
        Registered,
        Refused,
        /// The server registered it, but the answer never came back.
        Lost,
    }

    #[derive(Debug)]
    struct FakeRegistry {
        answer: Answer,
        images: std::sync::Mutex<Vec<ImageSummary>>,
    }

    impl ImageRegistry for FakeRegistry {
        fn images(&self) -> Result<Vec<ImageSummary>, RegistryError> {
            Ok(self.images.lock().unwrap().clone())
        }

        fn register(
            &self,
            version: &ImageVersionId,
            digest: &ImageDigest,
            virtual_size: u64,
            parent: Option<&ImageVersionId>,
        ) -> Result<ImageSummary, RegistryError> {
            if self.answer == Answer::Refused {
                return Err("the server refused: no".into());
            }
            let summary = ImageSummary {
                id: version.clone(),
                state: ImageState::Ready,
                virtual_size,
                digest: Some(*digest),
                parent: parent.cloned(),
                complete_on: vec![ImageHolder {
                    server: ServerId::random(),
                    name: "alpha".to_owned(),
                    this_server: true,
                }],
                pulling_on: Vec::new(),
            };
            self.images.lock().unwrap().push(summary.clone());
            match self.answer {
                Answer::Lost => Err("cannot talk to the server: broken pipe".into()),
                _ => Ok(summary),
            }
        }
    }

    /// Imports 9 MiB (chunk 1 all zero) onto a fake host; returns the
    /// outcome, the host and the data directory.
    fn import_onto_fake_host(
        answer: Answer,
        cancel_after_bytes: Option<u64>,
    ) -> (
        Result<ImportReport, ImageError>,
        crate::actuator::fake::FakeHypervisor,
        tempfile::TempDir,
        Vec<u8>,
    ) {
        let temp = tempfile::tempdir().unwrap();
        let mut data = vec![7u8; 9 << 20];
        data[4 << 20..8 << 20].fill(0);
        let file = temp.path().join("disk.raw");
        fs::write(&file, &data).unwrap();
        let host = crate::actuator::fake::FakeHypervisor::new("pool", 1 << 30, 4, 8192);
        let registry = FakeRegistry {
            answer,
            images: std::sync::Mutex::new(Vec::new()),
        };
        let data_dir = DataDir::new(temp.path().join("data"));
        let version = ImageVersionId::new("office-v1").unwrap();
        let import = Import {
            data_dir: &data_dir,
            source: file,
            disk: DiskInfo {
                format: "raw".to_owned(),
                virtual_size: data.len() as u64,
                actual_size: None,
            },
            version: &version,
            parent: None,
            registry: &registry,
            started: Instant::now(),
        };
        let cancel = AtomicBool::new(false);
        let mut phases = Vec::new();
        let outcome = import.run(
            &host,
            &mut |progress| {
                phases.push(progress.phase);
                if cancel_after_bytes.is_some_and(|bytes| progress.done >= bytes) {
                    cancel.store(true, Ordering::SeqCst);
                }
            },
            &cancel,
        );
        if outcome.is_ok() {
            assert_eq!(phases.first(), Some(&ImportPhase::Importing));
            assert_eq!(phases.last(), Some(&ImportPhase::Registering));
        }
        (outcome, host, temp, data)
    }

    #[test]
    fn an_import_streams_once_into_the_volume_and_the_manifest() {
        let (outcome, host, temp, data) = import_onto_fake_host(Answer::Registered, None);
        let report = outcome.unwrap();
        let expected = manifest_of(&data, DEFAULT_CHUNK_SIZE).unwrap();
        assert_eq!(report.digest, expected.root_digest());
        assert_eq!(
            (report.chunks, report.zero_chunks, report.data_bytes),
            (3, 1, 5 << 20)
        );
        let volume = VolumeName::Base(report.version.clone());
        assert_eq!(
            host.read_volume_at(&volume, 0, data.len() as u64).unwrap(),
            data
        );
        let store = manifest_store(&DataDir::new(temp.path().join("data")));
        assert_eq!(
            store
                .load_verified(&report.version, &report.digest)
                .unwrap(),
            Some(expected)
        );
    }

    #[test]
    fn a_refused_registration_leaves_no_volume_and_no_manifest() {
        let (outcome, host, temp, _) = import_onto_fake_host(Answer::Refused, None);
        let error = outcome.unwrap_err();
        assert!(matches!(error, ImageError::NotRegistered { .. }), "{error}");
        assert!(crate::error_chain(&error).ends_with("the server refused: no"));
        assert_eq!(host.list_volumes().unwrap(), vec![]);
        let version = ImageVersionId::new("office-v1").unwrap();
        let store = manifest_store(&DataDir::new(temp.path().join("data")));
        assert!(!store.path(&version).exists());
    }

    #[test]
    fn a_lost_answer_to_a_registration_that_happened_keeps_the_import() {
        let (outcome, host, _temp, _) = import_onto_fake_host(Answer::Lost, None);
        assert!(outcome.is_ok());
        assert_eq!(host.list_volumes().unwrap().len(), 1);
    }

    #[test]
    fn an_interrupted_import_leaves_nothing() {
        let (outcome, host, temp, _) = import_onto_fake_host(Answer::Registered, Some(1 << 20));
        assert!(matches!(outcome, Err(ImageError::Cancelled)));
        assert_eq!(host.list_volumes().unwrap(), vec![]);
        assert!(!temp.path().join("data/transfer/manifests").exists());
    }

    #[test]
    fn pulls_in_progress_are_listed() {
        let temp = tempfile::tempdir().unwrap();
        let mut grid = service(temp.path());
        let version = ImageVersionId::new("office-v2").unwrap();
        grid.write(ConfigValue::Image(BaseImage {
            id: version.clone(),
            digest: Some(ImageDigest::from_bytes([1; 32])),
            virtual_size: 1 << 30,
            parent: Some(ImageVersionId::new("office-v1").unwrap()),
            state: ImageState::Ready,
        }))
        .unwrap();
        grid.update_own_record(&mut |record| {
            record.images.insert(
                version.clone(),
                ImageHolding::Partial {
                    bytes_done: 1 << 29,
                    bytes_total: 1 << 30,
                },
            );
        })
        .unwrap();
        let images = grid.images();
        assert_eq!(images.len(), 1);
        assert!(images[0].complete_on.is_empty());
        assert_eq!(images[0].pulling_on[0].bytes_done, 1 << 29);
        assert_eq!(
            images[0].parent,
            Some(ImageVersionId::new("office-v1").unwrap())
        );
    }
}
