//! Serving base images to peers: a holder answers manifest and chunk
//! requests from its pool ([`ChunkServer`], the federation's
//! [`ChunkSource`]).
//!
//! Only a version this server holds complete is served, and only with a
//! manifest that verifies against the digest the grid state gives: a
//! server never hands out what it could not vouch for. Chunks are read from
//! the raw base volume through the actuator and encoded with
//! [`codec::encode`] (zstd when that pays). All-zero chunks are never asked
//! for; a request for one is refused. How many requests are served at once
//! is the federation's business (`federation/node.rs`).
//!
//! Difference disks: a holder that kept a version's compressed overlay
//! (`DATA_DIR/transfer/diffs/<version>.qcow2.zst`, see [`diff_file`]) serves
//! it in parts to servers that hold the parent and rebuild the version
//! from it.
//!
//! A test-only fault hook ([`ChunkServer::corrupt_every`]) flips a byte in
//! every Nth chunk served, so the tests can show a receiver catching it.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::swarm::{Have, PartialImages};
use super::{codec, ChunkEntry, Encoding, Manifest, ManifestStore, ManifestStoreError};
use crate::actuator::{ActuatorError, Hypervisor, VolumeFile, VolumeName};
use crate::federation::{ChunkRefusal, ChunkSource, DiffPart, MAX_DIFF_PART_BYTES};
use crate::model::{ImageDigest, ImageVersionId, ServerId};

/// Where `version`'s compressed difference disk is kept under `diffs_dir`
/// (`DATA_DIR/transfer/diffs`).
pub fn diff_file(diffs_dir: &Path, version: &ImageVersionId) -> PathBuf {
    diffs_dir.join(format!("{version}.qcow2.zst"))
}

/// What the grid state says of an image version on this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageOnServer {
    /// The grid state has no such version.
    NotInGrid,
    /// The version has no digest yet (its import has not finished).
    NoDigest,
    /// This server does not hold the version complete.
    NotHeldComplete,
    /// This server holds it complete; its content has this digest.
    HeldComplete { digest: ImageDigest },
    /// This server is pulling it (its record says partial); its content
    /// has this digest.
    HeldPartial { digest: ImageDigest },
}

/// The grid state as the chunk server reads it (the service implements
/// it). Calls may block briefly (a lock).
pub trait HeldImages: Send + Sync + 'static {
    fn image_on_server(&self, image: &ImageVersionId) -> ImageOnServer;
}

/// Why a held image cannot be served right now.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("this server is not connected to its host yet")]
    HostNotReady,
    #[error("no manifest is stored for it")]
    NoManifest,
    #[error("its manifest cannot be used")]
    Manifest(#[source] ManifestStoreError),
    #[error("its volume cannot be read")]
    Read(#[source] ActuatorError),
    #[error("its difference disk cannot be read")]
    DiffRead(#[source] std::io::Error),
}

type VolumeFiles = BTreeMap<ImageVersionId, (ImageDigest, Option<Arc<VolumeFile>>)>;

/// Answers peers' manifest and chunk requests from this server's pool.
pub struct ChunkServer {
    /// Set once the policy loop has connected to libvirt; until then
    /// requests are refused (the asker tries another holder).
    host: OnceLock<Arc<dyn Hypervisor>>,
    manifests: ManifestStore,
    /// Where kept difference disks are (`None`: none are served).
    diffs_dir: Option<PathBuf>,
    images: Arc<dyn HeldImages>,
    /// Manifests already verified, by version, with the digest they were
    /// verified against (read from disk again if the grid's digest moved).
    verified: Mutex<BTreeMap<ImageVersionId, (ImageDigest, Arc<Manifest>)>>,
    /// The versions this server is pulling, with the chunks it has: served
    /// too (`None`: only complete versions are served).
    partial: Option<Arc<PartialImages>>,
    /// Per version held, how its volume is read, decided at the first chunk
    /// (asking the host costs several libvirt calls): its file, or the
    /// host's calls (`None`). Dropped with the manifest when the version
    /// is no longer held.
    volume_files: Mutex<VolumeFiles>,
    corrupt_every: Option<NonZeroU64>,
    served: AtomicU64,
}

impl fmt::Debug for ChunkServer {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ChunkServer")
            .field("host_ready", &self.host.get().is_some())
            .field("manifests", &self.manifests)
            .field("corrupt_every", &self.corrupt_every)
            .field("served", &self.served.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ChunkServer {
    pub fn new(manifests: ManifestStore, images: Arc<dyn HeldImages>) -> Self {
        Self {
            host: OnceLock::new(),
            manifests,
            diffs_dir: None,
            images,
            verified: Mutex::new(BTreeMap::new()),
            partial: None,
            volume_files: Mutex::new(BTreeMap::new()),
            corrupt_every: None,
            served: AtomicU64::new(0),
        }
    }

    /// **Test-only fault hook**: flip a byte in every `n`th chunk served
    /// (counted over all peers), so tests can show that receivers catch
    /// corrupt chunks. `deskgrid serve` sets it only from the
    /// `DESKGRID_TEST_CORRUPT_CHUNKS` environment variable.
    pub fn corrupt_every(mut self, n: Option<NonZeroU64>) -> Self {
        self.corrupt_every = n;
        self
    }

    /// Serves the chunks that pulls running here have written (swarming).
    pub fn partial_images(mut self, partial: Arc<PartialImages>) -> Self {
        self.partial = Some(partial);
        self
    }

    /// Serves the difference disks kept in `diffs_dir`.
    pub fn diffs_dir(mut self, diffs_dir: PathBuf) -> Self {
        self.diffs_dir = Some(diffs_dir);
        self
    }

    /// The host to read volumes from; the first call wins.
    pub fn attach_host(&self, host: Arc<dyn Hypervisor>) {
        if self.host.set(host).is_err() {
            tracing::debug!("chunk server already has a host");
        }
    }

    /// Chunks served so far.
    pub fn chunks_served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// The digest of a version this server serves, and whether it holds
    /// it complete (else it is pulling it and serves what it has).
    fn held_digest(&self, image: &ImageVersionId) -> Result<(ImageDigest, bool), ChunkRefusal> {
        match self.images.image_on_server(image) {
            ImageOnServer::HeldComplete { digest } => Ok((digest, true)),
            ImageOnServer::HeldPartial { digest }
                if self
                    .partial
                    .as_ref()
                    .is_some_and(|partial| partial.have(image, &digest).is_some()) =>
            {
                Ok((digest, false))
            }
            ImageOnServer::NotInGrid => Err(ChunkRefusal::UnknownImage {
                image: image.clone(),
            }),
            ImageOnServer::NoDigest
            | ImageOnServer::NotHeldComplete
            | ImageOnServer::HeldPartial { .. } => {
                self.forget(image);
                Err(ChunkRefusal::NotHeld {
                    image: image.clone(),
                })
            }
        }
    }

    fn forget(&self, image: &ImageVersionId) {
        self.cache().remove(image);
        self.files().remove(image);
    }

    fn files(&self) -> std::sync::MutexGuard<'_, VolumeFiles> {
        // Holds whole values only, like `cache`.
        self.volume_files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `length` bytes at `offset` of `image`'s base volume, held with
    /// `digest`: from its file when the host allows, else through the host.
    fn read_volume(
        &self,
        host: &dyn Hypervisor,
        image: &ImageVersionId,
        digest: ImageDigest,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ActuatorError> {
        let name = VolumeName::Base(image.clone());
        let known = self
            .files()
            .get(image)
            .filter(|(known, _)| *known == digest)
            .map(|(_, file)| file.clone());
        let file = match known {
            Some(file) => file,
            None => {
                let file = host.open_volume_file(&name, false)?.map(Arc::new);
                self.files().insert(image.clone(), (digest, file.clone()));
                file
            }
        };
        match file {
            Some(file) => file.read_at(offset, length),
            None => host.read_volume_at(&name, offset, length),
        }
    }

    fn cache(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<ImageVersionId, (ImageDigest, Arc<Manifest>)>> {
        // Holds whole values only: a panic elsewhere cannot leave one half-set.
        self.verified
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The manifest of a version held complete, verified against the grid.
    fn verified_manifest(&self, image: &ImageVersionId) -> Result<Arc<Manifest>, ChunkRefusal> {
        self.verified(image).map(|(_, _, manifest)| manifest)
    }

    /// The digest of a version served here, whether it is held complete,
    /// and its manifest, verified.
    fn verified(
        &self,
        image: &ImageVersionId,
    ) -> Result<(ImageDigest, bool, Arc<Manifest>), ChunkRefusal> {
        let (digest, complete) = self.held_digest(image)?;
        if let Some((known, manifest)) = self.cache().get(image) {
            if *known == digest {
                return Ok((digest, complete, Arc::clone(manifest)));
            }
        }
        let unavailable = |error: ServeError| ChunkRefusal::Unavailable {
            image: image.clone(),
            source: Box::new(error),
        };
        let manifest = self
            .manifests
            .load_verified(image, &digest)
            .map_err(|error| unavailable(ServeError::Manifest(error)))?
            .ok_or_else(|| unavailable(ServeError::NoManifest))?;
        let manifest = Arc::new(manifest);
        self.cache()
            .insert(image.clone(), (digest, Arc::clone(&manifest)));
        Ok((digest, complete, manifest))
    }
}

impl ChunkSource for ChunkServer {
    fn manifest(&self, image: &ImageVersionId) -> Result<Manifest, ChunkRefusal> {
        self.verified_manifest(image)
            .map(|manifest| Manifest::clone(&manifest))
    }

    fn read_chunk(
        &self,
        peer: ServerId,
        image: &ImageVersionId,
        index: u64,
    ) -> Result<(Encoding, Vec<u8>), ChunkRefusal> {
        let (digest, complete, manifest) = self.verified(image)?;
        let (offset, length) =
            manifest
                .chunk_range(index)
                .map_err(|_| ChunkRefusal::NoSuchChunk {
                    image: image.clone(),
                    index,
                    chunks: manifest.chunks.len() as u64,
                })?;
        if manifest.chunks.get(index as usize) == Some(&ChunkEntry::Zero) {
            return Err(ChunkRefusal::ZeroChunk {
                image: image.clone(),
                index,
            });
        }
        if !complete {
            let Some(partial) = self.partial.as_ref() else {
                return Err(ChunkRefusal::NotHeld {
                    image: image.clone(),
                });
            };
            if !partial.has_chunk(image, &digest, index) {
                return Err(ChunkRefusal::NotHereYet {
                    image: image.clone(),
                    index,
                });
            }
            // Just received: served as it came, verified here already.
            if let Some(recent) = partial.recent_chunk(image, &digest, index) {
                self.served.fetch_add(1, Ordering::Relaxed);
                return Ok(recent);
            }
        }
        let unavailable = |error: ServeError| ChunkRefusal::Unavailable {
            image: image.clone(),
            source: Box::new(error),
        };
        let host = self
            .host
            .get()
            .ok_or_else(|| unavailable(ServeError::HostNotReady))?;
        let mut data = self
            .read_volume(host.as_ref(), image, digest, offset, length)
            .map_err(|error| unavailable(ServeError::Read(error)))?;
        let served = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(every) = self.corrupt_every {
            if served % every.get() == 0 && !data.is_empty() {
                let middle = data.len() / 2;
                data[middle] ^= 0x5a;
                tracing::warn!(%peer, %image, chunk = index, "test fault hook: serving a corrupted chunk");
            }
        }
        Ok(codec::encode(&data))
    }

    fn have(&self, peer: ServerId, image: &ImageVersionId) -> Result<Have, ChunkRefusal> {
        let _ = peer;
        let (digest, complete) = self.held_digest(image)?;
        if complete {
            return Ok(Have::Complete);
        }
        self.partial
            .as_ref()
            .and_then(|partial| partial.have(image, &digest))
            .map(|bitmap| Have::Partial {
                len: bitmap.len(),
                bits: bitmap.as_bytes().to_vec(),
            })
            .ok_or_else(|| ChunkRefusal::NotHeld {
                image: image.clone(),
            })
    }

    fn read_diff_part(
        &self,
        peer: ServerId,
        image: &ImageVersionId,
        offset: u64,
    ) -> Result<DiffPart, ChunkRefusal> {
        // Only for a version held complete: the overlay rebuilds exactly it.
        if !self.held_digest(image)?.1 {
            return Err(ChunkRefusal::NotHeld {
                image: image.clone(),
            });
        }
        let no_diff = || ChunkRefusal::NoDiff {
            image: image.clone(),
        };
        let path = diff_file(self.diffs_dir.as_deref().ok_or_else(no_diff)?, image);
        let mut file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(no_diff()),
            Err(error) => {
                return Err(ChunkRefusal::Unavailable {
                    image: image.clone(),
                    source: Box::new(ServeError::DiffRead(error)),
                })
            }
        };
        let unavailable = |error| ChunkRefusal::Unavailable {
            image: image.clone(),
            source: Box::new(ServeError::DiffRead(error)),
        };
        let total = file.metadata().map_err(unavailable)?.len();
        if offset >= total {
            return Err(ChunkRefusal::DiffOffset {
                image: image.clone(),
                offset,
                total,
            });
        }
        let length = (total - offset).min(MAX_DIFF_PART_BYTES);
        let mut data = Vec::with_capacity(length as usize);
        file.seek(SeekFrom::Start(offset)).map_err(unavailable)?;
        file.take(length)
            .read_to_end(&mut data)
            .map_err(unavailable)?;
        tracing::debug!(%peer, %image, offset, bytes = data.len(), total, "serving a difference disk part");
        Ok(DiffPart { total, data })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actuator::VolumeFormat;
    use crate::transfer::manifest::{manifest_of, MIN_CHUNK_SIZE};
    use crate::transfer::progress::ChunkBitmap;
    use crate::transfer::test_pool::TestPool;

    #[derive(Debug)]
    struct Images(Mutex<ImageOnServer>);

    impl HeldImages for Images {
        fn image_on_server(&self, _image: &ImageVersionId) -> ImageOnServer {
            *self.0.lock().unwrap()
        }
    }

    fn content() -> Vec<u8> {
        let chunk = MIN_CHUNK_SIZE as usize;
        let mut data = vec![0u8; 3 * chunk + 100];
        data[..chunk].copy_from_slice(&b"text-like data ".repeat(chunk / 15 + 1)[..chunk]);
        rand::Rng::fill(&mut rand::rng(), &mut data[2 * chunk..]);
        data
    }

    struct Served {
        _temp: tempfile::TempDir,
        server: ChunkServer,
        images: Arc<Images>,
        data: Vec<u8>,
        manifest: Manifest,
        image: ImageVersionId,
    }

    fn served() -> Served {
        let temp = tempfile::tempdir().unwrap();
        let store = ManifestStore::new(temp.path().join("manifests"));
        let image = ImageVersionId::new("office-v1").unwrap();
        let data = content();
        let manifest = manifest_of(&data, MIN_CHUNK_SIZE).unwrap();
        store.save(&image, &manifest).unwrap();
        let host = TestPool::new(1 << 30);
        host.create_base_volume(&image, data.len() as u64, VolumeFormat::Raw)
            .unwrap();
        host.write_volume_at(&VolumeName::Base(image.clone()), 0, &data)
            .unwrap();
        let images = Arc::new(Images(Mutex::new(ImageOnServer::HeldComplete {
            digest: manifest.root_digest(),
        })));
        let server = ChunkServer::new(store, Arc::clone(&images) as Arc<dyn HeldImages>);
        server.attach_host(Arc::new(host));
        Served {
            _temp: temp,
            server,
            images,
            data,
            manifest,
            image,
        }
    }

    #[test]
    fn a_held_image_is_served_chunk_by_chunk() {
        let Served {
            _temp,
            server,
            data,
            manifest,
            image,
            ..
        } = served();
        let peer = ServerId::from_bytes([7; 16]);
        assert_eq!(server.manifest(&image).unwrap(), manifest);
        let chunk = MIN_CHUNK_SIZE as usize;
        let (encoding, bytes) = server.read_chunk(peer, &image, 0).unwrap();
        assert_eq!(encoding, Encoding::Zstd, "text-like data is compressed");
        assert_eq!(
            codec::decode(encoding, bytes, chunk).unwrap(),
            &data[..chunk]
        );
        let (encoding, bytes) = server.read_chunk(peer, &image, 3).unwrap();
        assert_eq!(encoding, Encoding::Raw, "random bytes are not");
        assert_eq!(bytes, &data[3 * chunk..]);
        assert!(matches!(
            server.read_chunk(peer, &image, 1),
            Err(ChunkRefusal::ZeroChunk { index: 1, .. })
        ));
        assert!(matches!(
            server.read_chunk(peer, &image, 4),
            Err(ChunkRefusal::NoSuchChunk {
                index: 4,
                chunks: 4,
                ..
            })
        ));
        assert_eq!(server.chunks_served(), 2);
    }

    #[test]
    fn a_server_pulling_a_version_serves_the_chunks_it_has_written() {
        let Served {
            _temp,
            server,
            images,
            data,
            manifest,
            image,
        } = served();
        let digest = manifest.root_digest();
        *images.0.lock().unwrap() = ImageOnServer::HeldPartial { digest };
        let partial = Arc::new(PartialImages::new());
        let server = server.partial_images(Arc::clone(&partial));
        let peer = ServerId::random();
        // Partly held, but no pull runs here: nothing is served.
        assert!(matches!(
            server.read_chunk(peer, &image, 0),
            Err(ChunkRefusal::NotHeld { .. })
        ));
        assert!(server.have(peer, &image).is_err());

        let n_chunks = manifest.chunks.len() as u64;
        let guard = partial.register(&image, digest, ChunkBitmap::new(n_chunks));
        guard.written(0, None);
        guard.written(2, Some((Encoding::Raw, b"as it came".to_vec())));
        let (encoding, bytes) = server.read_chunk(peer, &image, 0).unwrap();
        let chunk = MIN_CHUNK_SIZE as usize;
        assert_eq!(
            codec::decode(encoding, bytes, chunk).unwrap(),
            data[..chunk],
            "written, not recent: read from the volume"
        );
        assert_eq!(
            server.read_chunk(peer, &image, 2).unwrap(),
            (Encoding::Raw, b"as it came".to_vec()),
            "recent: served as it travelled"
        );
        assert!(matches!(
            server.read_chunk(peer, &image, 3),
            Err(ChunkRefusal::NotHereYet { index: 3, .. })
        ));
        match server.have(peer, &image).unwrap() {
            Have::Partial { len, bits } => {
                let bitmap = ChunkBitmap::from_bytes(len, &bits).unwrap();
                assert_eq!(len, n_chunks);
                assert!(bitmap.get(0) && bitmap.get(2) && !bitmap.get(3));
            }
            Have::Complete => panic!("only partly held"),
        }
        // A difference disk is only served for a version held complete.
        assert!(matches!(
            server.read_diff_part(peer, &image, 0),
            Err(ChunkRefusal::NotHeld { .. })
        ));
        // The pull ended: nothing partial is served any more.
        drop(guard);
        assert!(server.read_chunk(peer, &image, 0).is_err());

        *images.0.lock().unwrap() = ImageOnServer::HeldComplete { digest };
        assert_eq!(server.have(peer, &image).unwrap(), Have::Complete);
    }

    #[test]
    fn only_what_is_held_complete_and_verifies_is_served() {
        let Served {
            _temp,
            server,
            images,
            manifest,
            image,
            ..
        } = served();
        let peer = ServerId::from_bytes([7; 16]);
        *images.0.lock().unwrap() = ImageOnServer::NotHeldComplete;
        assert!(matches!(
            server.manifest(&image),
            Err(ChunkRefusal::NotHeld { .. })
        ));
        *images.0.lock().unwrap() = ImageOnServer::NotInGrid;
        assert!(matches!(
            server.read_chunk(peer, &image, 0),
            Err(ChunkRefusal::UnknownImage { .. })
        ));
        // The grid names other content: the stored manifest does not verify.
        *images.0.lock().unwrap() = ImageOnServer::HeldComplete {
            digest: ImageDigest::from_bytes([1; 32]),
        };
        let refusal = server.manifest(&image).unwrap_err();
        assert!(
            crate::error_chain(&refusal).contains("does not describe image office-v1"),
            "{}",
            crate::error_chain(&refusal)
        );
        *images.0.lock().unwrap() = ImageOnServer::HeldComplete {
            digest: manifest.root_digest(),
        };
        let other = ImageVersionId::new("other-v1").unwrap();
        let refusal = server.manifest(&other).unwrap_err();
        assert!(
            crate::error_chain(&refusal).contains("no manifest is stored"),
            "{}",
            crate::error_chain(&refusal)
        );
    }

    #[test]
    fn without_a_host_chunks_are_refused_and_the_fault_hook_corrupts_every_nth() {
        let Served {
            _temp,
            server,
            data,
            manifest,
            image,
            ..
        } = served();
        let peer = ServerId::from_bytes([7; 16]);
        let images = Arc::clone(&server.images);
        let hostless = ChunkServer::new(server.manifests.clone(), images);
        let refusal = hostless.read_chunk(peer, &image, 0).unwrap_err();
        assert!(crate::error_chain(&refusal).contains("not connected to its host"));

        let server = ChunkServer {
            corrupt_every: NonZeroU64::new(2),
            ..server
        };
        let chunk = MIN_CHUNK_SIZE as usize;
        let mut verdicts = Vec::new();
        for _ in 0..4 {
            let (encoding, bytes) = server.read_chunk(peer, &image, 0).unwrap();
            let bytes = codec::decode(encoding, bytes, chunk).unwrap();
            verdicts.push(manifest.verify_chunk(0, &bytes).is_ok());
            assert_eq!(bytes.len(), data[..chunk].len());
        }
        assert_eq!(verdicts, [true, false, true, false]);
    }
}
