//! Manifests on disk: `DATA_DIR/transfer/manifests/<version>.manifest`.
//!
//! A holder keeps the manifest of every version it holds so it can serve it;
//! a file is CBOR, replaced atomically (temp, fsync, rename, fsync(dir)). A
//! file read back is checked against the root digest the grid state gives
//! before it is trusted ([`ManifestStore::load_verified`]).

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::model::{ImageDigest, ImageVersionId, Name};

use super::{Manifest, ManifestError};

/// The largest manifest file read back (16 TiB of 4 MiB chunks ≈ 140 MiB).
pub const MAX_MANIFEST_FILE: u64 = 192 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ManifestStoreError {
    #[error("cannot {action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a manifest deskgrid can read: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("{} does not describe image {image}", .path.display())]
    Mismatch {
        path: PathBuf,
        image: ImageVersionId,
        #[source]
        source: ManifestError,
    },
}

/// Where this server keeps manifests.
#[derive(Debug, Clone)]
pub struct ManifestStore {
    dir: PathBuf,
}

impl ManifestStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, image: &ImageVersionId) -> PathBuf {
        self.dir.join(format!("{}.manifest", image.as_str()))
    }

    /// Stores `manifest` for `image`, replacing any older file atomically.
    pub fn save(
        &self,
        image: &ImageVersionId,
        manifest: &Manifest,
    ) -> Result<(), ManifestStoreError> {
        let io = |action, path: &Path| {
            let path = path.to_owned();
            move |source| ManifestStoreError::Io {
                action,
                path,
                source,
            }
        };
        fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
        let path = self.path(image);
        let temp = path.with_extension("manifest.tmp");
        let mut bytes = Vec::new();
        ciborium::into_writer(manifest, &mut bytes).map_err(|error| {
            ManifestStoreError::Corrupt {
                path: path.clone(),
                reason: error.to_string(),
            }
        })?;
        let mut file = fs::File::create(&temp).map_err(io("create", &temp))?;
        file.write_all(&bytes).map_err(io("write", &temp))?;
        file.sync_all().map_err(io("fsync", &temp))?;
        fs::rename(&temp, &path).map_err(io("rename", &temp))?;
        fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io("fsync", &self.dir))
    }

    /// The manifest stored for `image`, if any, checked against `digest`.
    pub fn load_verified(
        &self,
        image: &ImageVersionId,
        digest: &ImageDigest,
    ) -> Result<Option<Manifest>, ManifestStoreError> {
        let path = self.path(image);
        let file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ManifestStoreError::Io {
                    action: "open",
                    path,
                    source,
                })
            }
        };
        let manifest: Manifest =
            ciborium::from_reader(std::io::Read::take(file, MAX_MANIFEST_FILE)).map_err(
                |error| ManifestStoreError::Corrupt {
                    path: path.clone(),
                    reason: error.to_string(),
                },
            )?;
        manifest
            .verify(digest)
            .map_err(|source| ManifestStoreError::Mismatch {
                path,
                image: image.clone(),
                source,
            })?;
        Ok(Some(manifest))
    }

    /// Forgets `image`'s manifest (the version was dropped here).
    pub fn remove(&self, image: &ImageVersionId) -> Result<(), ManifestStoreError> {
        let path = self.path(image);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(ManifestStoreError::Io {
                action: "remove",
                path,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::manifest::{manifest_of, MIN_CHUNK_SIZE};

    #[test]
    fn manifests_round_trip_and_a_damaged_file_is_refused() {
        let temp = tempfile::tempdir().unwrap();
        let store = ManifestStore::new(temp.path().join("manifests"));
        let image = ImageVersionId::new("office-v1").unwrap();
        let mut data = vec![0u8; 3 * MIN_CHUNK_SIZE as usize];
        data[100] = 1;
        let manifest = manifest_of(&data, MIN_CHUNK_SIZE).unwrap();
        let digest = manifest.root_digest();
        assert!(store.load_verified(&image, &digest).unwrap().is_none());
        store.save(&image, &manifest).unwrap();
        assert_eq!(
            store.load_verified(&image, &digest).unwrap(),
            Some(manifest.clone())
        );

        let other = ImageDigest::from_bytes([9; 32]);
        assert!(matches!(
            store.load_verified(&image, &other),
            Err(ManifestStoreError::Mismatch { .. })
        ));
        fs::write(store.path(&image), b"garbage").unwrap();
        assert!(matches!(
            store.load_verified(&image, &digest),
            Err(ManifestStoreError::Corrupt { .. })
        ));
        store.remove(&image).unwrap();
        store.remove(&image).unwrap();
        assert!(store.load_verified(&image, &digest).unwrap().is_none());
    }
}
