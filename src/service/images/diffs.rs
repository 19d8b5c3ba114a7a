//! Difference disks: a new base image version published as a qcow2 overlay
//! on a version the grid has (its parent), and rebuilt from it elsewhere.
//!
//! Publishing (`deskgrid image publish-diff`, in the CLI's process like an
//! import): the overlay is copied, its copy rebased (unsafely: only the
//! header changes) onto this server's parent volume file, flattened by
//! `qemu-img convert -O raw` into a temporary raw file, and that file is
//! imported like any raw file (one pass: pool volume and manifest). The
//! overlay is kept zstd-compressed as `DATA_DIR/transfer/diffs/<version>
//! .qcow2.zst` (the chunk server serves it), and the version is registered
//! with its parent.
//!
//! Rebuilding ([`rebuild_from_diff`], on a server that holds the parent
//! complete): the compressed overlay a holder sent is decompressed within
//! a bound, rebased onto this server's parent volume file, flattened and
//! imported the same way, and its root digest must equal the grid's. The
//! digest covers the virtual disk's content, so a version rebuilt from a
//! difference disk verifies against the same digest as a full copy: nothing
//! the holder sent is trusted before that check, and a mismatch removes the
//! volume (the caller then pulls the full version).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{
    check_source, run_tool, tool_message, upload_with_manifest, DiskInfo, ImageError,
    ImageRegistry, ImportProgress, ImportReport, QemuImgInfo, QEMU_IMG,
};
use crate::actuator::libvirt::LibvirtHypervisor;
use crate::actuator::{Hypervisor, VolumeName};
use crate::appliance::config::Config;
use crate::appliance::data_dir::DataDir;
use crate::model::{BaseImage, ImageVersionId};
use crate::transfer::diff_file;

/// zstd level of a kept overlay: level 3 (zstd's default) compresses a
/// typical update well at a few hundred MB/s; it is done once per version.
pub const DIFF_ZSTD_LEVEL: i32 = 3;
/// The first bytes of every qcow2 file.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Where this server keeps compressed difference disks.
pub fn diffs_dir(transfer_dir: &Path) -> PathBuf {
    transfer_dir.join("diffs")
}

/// The most bytes an overlay of a `virtual_size` disk can take: every
/// cluster written plus qcow2's metadata (L2 tables and refcounts are far
/// under an eighth) and a fixed allowance for headers.
pub fn max_overlay_bytes(virtual_size: u64) -> u64 {
    virtual_size
        .saturating_add(virtual_size / 8)
        .saturating_add(64 << 20)
}

/// What a publication did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishReport {
    pub parent: ImageVersionId,
    /// The import of the flattened version.
    pub import: ImportReport,
    /// The overlay file's size as given.
    pub overlay_bytes: u64,
    /// The kept zstd-compressed overlay's size (what a pull moves).
    pub compressed_bytes: u64,
    pub diff_file: PathBuf,
}

/// What a rebuild from a difference disk did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffRebuild {
    /// The decompressed overlay's size.
    pub overlay_bytes: u64,
    /// Bytes in the rebuilt version's chunks that are not all zero (what a
    /// full pull would have moved, before compression).
    pub data_bytes: u64,
}

/// Publishes `overlay` (a qcow2 overlay on `parent`) as the new version
/// `version` whose parent is `parent`. This server must hold `parent`
/// complete.
#[allow(clippy::too_many_arguments)] // One call site (the CLI); a struct would only rename them.
pub fn publish_diff(
    data_dir: &DataDir,
    config: &Config,
    overlay: &Path,
    parent: &ImageVersionId,
    version: &ImageVersionId,
    registry: &dyn ImageRegistry,
    progress: &mut dyn FnMut(ImportProgress),
    cancel: &AtomicBool,
) -> Result<PublishReport, ImageError> {
    let started = Instant::now();
    let source = check_source(overlay)?;
    check_qcow2_magic(&source)?;
    let images = registry.images().map_err(ImageError::Registry)?;
    if images.iter().any(|image| image.id == *version) {
        return Err(ImageError::VersionExists {
            version: version.clone(),
        });
    }
    if !images.iter().any(|image| {
        image.id == *parent && image.complete_on.iter().any(|holder| holder.this_server)
    }) {
        return Err(ImageError::ParentNotHere {
            parent: parent.clone(),
        });
    }
    let host = LibvirtHypervisor::connect(config.libvirt.libvirt_options())?;
    let parent_path = parent_volume_path(&host, parent)?;

    let transfer_dir = data_dir.transfer_dir();
    let temp_error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::TempFile {
            action,
            path,
            source,
        }
    };
    fs::create_dir_all(&transfer_dir).map_err(temp_error("create", &transfer_dir))?;
    let copy = TempPath(transfer_dir.join(format!("publish-{version}.qcow2")));
    fs::copy(&source, &copy.0).map_err(temp_error("copy the overlay to", &copy.0))?;
    let disk = rebase_onto_parent(&copy.0, Path::new(&parent_path), cancel)?;
    let raw = TempPath(transfer_dir.join(format!("publish-{version}.raw")));
    flatten(&copy.0, &raw.0, cancel)?;
    drop(copy);

    let diffs = diffs_dir(&transfer_dir);
    fs::create_dir_all(&diffs).map_err(temp_error("create", &diffs))?;
    let kept = diff_file(&diffs, version);
    let compressed_bytes = compress_file(&source, &kept)?;
    let overlay_bytes = fs::metadata(&source)
        .map_err(|error| ImageError::Unreadable {
            path: source.clone(),
            source: error,
        })?
        .len();

    let import = super::Import {
        data_dir,
        source: raw.0.clone(),
        disk: DiskInfo {
            format: "raw".to_owned(),
            virtual_size: disk.virtual_size,
            actual_size: None,
        },
        version,
        parent: Some(parent),
        registry,
        started,
    };
    let imported = import.run(&host, progress, cancel);
    let import = match imported {
        Ok(report) => report,
        Err(error) => {
            if !registered_here_any(registry, version) {
                let _ = fs::remove_file(&kept);
            }
            return Err(error);
        }
    };
    Ok(PublishReport {
        parent: parent.clone(),
        import,
        overlay_bytes,
        compressed_bytes,
        diff_file: kept,
    })
}

/// Whether the grid lists `version` as held here (whatever its digest): a
/// registration whose answer was lost keeps its difference disk.
fn registered_here_any(registry: &dyn ImageRegistry, version: &ImageVersionId) -> bool {
    registry.images().is_ok_and(|images| {
        images.iter().any(|image| {
            image.id == *version && image.complete_on.iter().any(|holder| holder.this_server)
        })
    })
}

/// Rebuilds `image` (whose parent this server holds complete, in the volume
/// file `parent_path`) from the compressed overlay in `compressed`, into a
/// new raw base volume; checks its root digest against the grid's. On
/// success the manifest is saved and the compressed overlay kept, so this
/// server serves both; on any failure no volume is left.
pub fn rebuild_from_diff(
    host: &dyn Hypervisor,
    transfer_dir: &Path,
    image: &BaseImage,
    parent_path: &str,
    compressed: &Path,
) -> Result<DiffRebuild, ImageError> {
    let expected = image.digest.ok_or_else(|| ImageError::NoDigest {
        version: image.id.clone(),
    })?;
    let version = &image.id;
    let never = AtomicBool::new(false);
    let overlay = TempPath(transfer_dir.join(format!("diff-{version}.qcow2")));
    let overlay_bytes = decompress_bounded(
        compressed,
        &overlay.0,
        max_overlay_bytes(image.virtual_size),
    )?;
    check_qcow2_magic(&overlay.0)?;
    let disk = rebase_onto_parent(&overlay.0, Path::new(parent_path), &never)?;
    let raw = TempPath(transfer_dir.join(format!("diff-{version}.raw")));
    flatten(&overlay.0, &raw.0, &never)?;
    drop(overlay);
    let (_, manifest) = upload_with_manifest(
        host,
        version,
        &raw.0,
        disk.virtual_size,
        &mut |_| {},
        &never,
    )?;
    drop(raw);
    let remove_volume = |reason: &str| {
        tracing::warn!(image = %version, reason, "removing the volume rebuilt from a difference disk");
        if let Err(error) = host.delete_volume(&VolumeName::Base(version.clone())) {
            tracing::warn!(image = %version, error = %crate::error_chain(&error), "cannot remove the rebuilt volume");
        }
    };
    let actual = manifest.root_digest();
    if actual != expected {
        remove_volume("its digest is not the grid's");
        return Err(ImageError::DiffDigestMismatch {
            version: version.clone(),
            expected,
            actual,
        });
    }
    let data_dir_store = crate::transfer::ManifestStore::new(transfer_dir.join("manifests"));
    if let Err(error) = data_dir_store.save(version, &manifest) {
        remove_volume("the manifest was not saved");
        return Err(error.into());
    }
    // Kept for serving; a failure here costs only the diff path to others.
    let diffs = diffs_dir(transfer_dir);
    let kept = fs::create_dir_all(&diffs)
        .and_then(|()| fs::rename(compressed, diff_file(&diffs, version)));
    if let Err(error) = kept {
        tracing::warn!(image = %version, error = %error, "cannot keep the difference disk; serving only chunks");
    }
    Ok(DiffRebuild {
        overlay_bytes,
        data_bytes: manifest.data_bytes(),
    })
}

/// The file of this server's raw base volume of `parent`.
pub fn parent_volume_path(
    host: &dyn Hypervisor,
    parent: &ImageVersionId,
) -> Result<String, ImageError> {
    let name = VolumeName::Base(parent.clone());
    host.list_volumes()?
        .into_iter()
        .find(|volume| volume.name == name)
        .map(|volume| volume.path)
        .ok_or_else(|| ImageError::ParentNotHere {
            parent: parent.clone(),
        })
}

fn check_qcow2_magic(path: &Path) -> Result<(), ImageError> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .map_err(|source| ImageError::Unreadable {
            path: path.to_owned(),
            source,
        })?;
    if magic != QCOW2_MAGIC {
        return Err(ImageError::NotAnOverlay {
            path: path.to_owned(),
            reason: "it is not a qcow2 file".to_owned(),
        });
    }
    Ok(())
}

/// `qemu-img rebase -u` of the qcow2 `overlay` onto the raw `parent` file,
/// then `qemu-img info`: it must be qcow2, backed by `parent` only (no
/// external data file). The format is never probed.
fn rebase_onto_parent(
    overlay: &Path,
    parent: &Path,
    cancel: &AtomicBool,
) -> Result<DiskInfo, ImageError> {
    let not_an_overlay = |reason: String| ImageError::NotAnOverlay {
        path: overlay.to_owned(),
        reason,
    };
    let mut rebase = Command::new(QEMU_IMG);
    rebase
        .args(["rebase", "-u", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(parent)
        .arg(overlay);
    let run = run_tool(rebase, None, None, cancel)?;
    if !run.status.success() {
        return Err(not_an_overlay(tool_message(&run.stderr, run.status)));
    }
    let mut info = Command::new(QEMU_IMG);
    info.args(["info", "--output=json", "-f", "qcow2"])
        .arg(overlay);
    let run = run_tool(info, None, None, cancel)?;
    if !run.status.success() {
        return Err(not_an_overlay(tool_message(&run.stderr, run.status)));
    }
    let info: QemuImgInfo = serde_json::from_slice(&run.stdout)
        .map_err(|error| not_an_overlay(format!("qemu-img info answered {error}")))?;
    if info.format != "qcow2" {
        return Err(not_an_overlay(format!("its format is {}", info.format)));
    }
    if info
        .format_specific
        .as_ref()
        .and_then(|specific| specific.get("data"))
        .and_then(|data| data.get("data-file"))
        .is_some()
    {
        return Err(ImageError::ExternalReference {
            path: overlay.to_owned(),
            reference: "an external data file".to_owned(),
        });
    }
    if info.backing_filename.as_deref().map(Path::new) != Some(parent) {
        return Err(not_an_overlay(format!(
            "after the rebase it is backed by {:?}",
            info.backing_filename
        )));
    }
    Ok(DiskInfo {
        format: info.format,
        virtual_size: info.virtual_size,
        actual_size: info.actual_size,
    })
}

/// `qemu-img convert -O raw` of the qcow2 `overlay` (with its backing file)
/// into the new file `raw` (sparse).
fn flatten(overlay: &Path, raw: &Path, cancel: &AtomicBool) -> Result<(), ImageError> {
    let mut command = Command::new(QEMU_IMG);
    command
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(overlay)
        .arg(raw);
    let run = run_tool(command, None, None, cancel)?;
    if !run.status.success() {
        return Err(ImageError::Convert {
            path: overlay.to_owned(),
            reason: tool_message(&run.stderr, run.status),
        });
    }
    Ok(())
}

/// Compresses `source` into `target` (through a temporary file, renamed
/// when complete); returns the compressed size.
fn compress_file(source: &Path, target: &Path) -> Result<u64, ImageError> {
    let temp = target.with_extension("zst.part");
    let error = |action, path: &Path| {
        let path = path.to_owned();
        move |source| ImageError::TempFile {
            action,
            path,
            source,
        }
    };
    let mut input = File::open(source).map_err(|source_error| ImageError::Unreadable {
        path: source.to_owned(),
        source: source_error,
    })?;
    let output = File::create(&temp).map_err(error("create", &temp))?;
    let written = (|| -> io::Result<()> {
        let mut encoder = zstd::stream::Encoder::new(output, DIFF_ZSTD_LEVEL)?;
        io::copy(&mut input, &mut encoder)?;
        encoder.finish()?.sync_all()
    })();
    if let Err(source_error) = written {
        let _ = fs::remove_file(&temp);
        return Err(error("compress the overlay into", &temp)(source_error));
    }
    fs::rename(&temp, target).map_err(error("rename", &temp))?;
    Ok(fs::metadata(target).map_err(error("read", target))?.len())
}

/// Decompresses `source` into `target`, refusing more than `limit` bytes;
/// returns the decompressed size.
fn decompress_bounded(source: &Path, target: &Path, limit: u64) -> Result<u64, ImageError> {
    let bad = |reason: String| ImageError::BadDiff {
        path: source.to_owned(),
        reason,
    };
    let input = File::open(source).map_err(|error| ImageError::Unreadable {
        path: source.to_owned(),
        source: error,
    })?;
    let mut output = File::create(target).map_err(|error| ImageError::TempFile {
        action: "create",
        path: target.to_owned(),
        source: error,
    })?;
    let decoder =
        zstd::stream::Decoder::new(input).map_err(|error| bad(format!("not zstd: {error}")))?;
    // One byte over the limit tells a file at the limit from a larger one.
    let copied = io::copy(&mut decoder.take(limit + 1), &mut output)
        .map_err(|error| bad(format!("cannot be decompressed: {error}")))?;
    if copied > limit {
        return Err(bad(format!("it decompresses to more than {limit} bytes")));
    }
    output.flush().map_err(|error| ImageError::TempFile {
        action: "write",
        path: target.to_owned(),
        source: error,
    })?;
    Ok(copied)
}

/// A temporary file removed when dropped.
#[derive(Debug)]
struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        match fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.0.display(), error = %error, "cannot remove a temporary file")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    // A test that unwraps fails with the value it met: exactly what a test should do.
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn overlays_are_compressed_and_decompressed_within_a_bound() {
        let temp = tempfile::tempdir().unwrap();
        let source = temp.path().join("overlay");
        let mut data = b"QFI\xfb".to_vec();
        data.extend(std::iter::repeat_n(0x5a, 1 << 20));
        fs::write(&source, &data).unwrap();
        let kept = temp.path().join("v2.qcow2.zst");
        let compressed = compress_file(&source, &kept).unwrap();
        assert!(compressed < 4096, "{compressed} bytes");
        let back = temp.path().join("back");
        assert_eq!(
            decompress_bounded(&kept, &back, data.len() as u64).unwrap(),
            data.len() as u64
        );
        assert_eq!(fs::read(&back).unwrap(), data);
        check_qcow2_magic(&back).unwrap();
        assert!(matches!(
            decompress_bounded(&kept, &back, data.len() as u64 - 1),
            Err(ImageError::BadDiff { .. })
        ));
        fs::write(&back, b"not zstd at all").unwrap();
        assert!(matches!(
            decompress_bounded(&back, &temp.path().join("x"), 1 << 20),
            Err(ImageError::BadDiff { .. })
        ));
        assert!(matches!(
            check_qcow2_magic(&back),
            Err(ImageError::NotAnOverlay { .. })
        ));
    }

    #[test]
    fn the_overlay_bound_leaves_room_for_metadata() {
        assert_eq!(max_overlay_bytes(8 << 30), (9 << 30) + (64 << 20));
        assert_eq!(max_overlay_bytes(u64::MAX), u64::MAX);
    }
}
