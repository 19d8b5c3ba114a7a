//! The resume file of a pull: `DATA_DIR/transfer/<version>.progress`, a
//! bitmap of the chunks already written into the base volume.
//!
//! Format, version 1 (little-endian integers):
//!
//! ```text
//! "DGPROG\0" | u8 version=1 | 32-byte root digest | u64 chunk count
//!   | bitmap: ceil(count / 8) bytes, chunk i is bit (i % 8) of byte i / 8
//!   | u32 crc32 of everything before
//! ```
//!
//! The digest ties the bitmap to one content: a file for other content (or
//! another chunk count) is refused, not trusted. A bit is set only after its
//! chunk was verified and written, and the file is replaced atomically
//! (temp, fsync, rename, fsync(dir)), so a crash at any moment leaves a
//! bitmap that claims nothing unwritten. It says nothing about a volume
//! made after it: the pull discards it whenever it creates the volume anew.

use std::fs;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use crate::model::{ImageDigest, ImageVersionId, Name};

use super::manifest::MAX_CHUNKS;

const MAGIC: &[u8; 7] = b"DGPROG\0";
const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = MAGIC.len() + 1 + 32 + 8;
/// The largest file read back: the header, a bitmap of [`MAX_CHUNKS`] and
/// the checksum.
const MAX_FILE_LEN: usize = HEADER_LEN + MAX_CHUNKS / 8 + 4;

/// Which chunks of a version are in the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkBitmap {
    bits: Vec<u8>,
    len: u64,
    n_set: u64,
}

impl ChunkBitmap {
    /// `len` chunks, none written.
    pub fn new(len: u64) -> Self {
        let n_bytes = usize::try_from(len.div_ceil(8)).unwrap_or(usize::MAX);
        Self {
            bits: vec![0; n_bytes],
            len,
            n_set: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Chunks marked written.
    pub fn count(&self) -> u64 {
        self.n_set
    }

    pub fn get(&self, index: u64) -> bool {
        index < self.len && self.bits[(index / 8) as usize] & (1 << (index % 8)) != 0
    }

    /// Marks chunk `index` written; out of range does nothing.
    pub fn set(&mut self, index: u64) {
        if index < self.len && !self.get(index) {
            self.bits[(index / 8) as usize] |= 1 << (index % 8);
            self.n_set += 1;
        }
    }

    /// The bits, chunk 0 in the lowest bit of the first byte.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// A bitmap of `len` chunks from [`as_bytes`](Self::as_bytes); `None`
    /// when the bytes cannot be one (wrong length, bits past `len`).
    pub fn from_bytes(len: u64, bytes: &[u8]) -> Option<Self> {
        if bytes.len() as u64 != len.div_ceil(8) {
            return None;
        }
        if len % 8 != 0 && bytes.last().is_some_and(|last| last >> (len % 8) != 0) {
            return None;
        }
        let n_set = bytes.iter().map(|byte| u64::from(byte.count_ones())).sum();
        Some(Self {
            bits: bytes.to_vec(),
            len,
            n_set,
        })
    }
}

/// Why a progress file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProgressError {
    #[error("cannot {action} {}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a progress file deskgrid can use: {problem}", .path.display())]
    Corrupt {
        path: PathBuf,
        problem: &'static str,
    },
    #[error("{} is for other content (digest or chunk count differ)", .path.display())]
    OtherContent { path: PathBuf },
}

/// The progress file of one version.
#[derive(Debug, Clone)]
pub struct ProgressFile {
    path: PathBuf,
}

impl ProgressFile {
    /// `<transfer_dir>/<version>.progress`.
    pub fn new(transfer_dir: &Path, image: &ImageVersionId) -> Self {
        Self {
            path: transfer_dir.join(format!("{}.progress", image.as_str())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bitmap stored for content `digest` of `n_chunks` chunks, `None`
    /// when there is no file.
    pub fn load(
        &self,
        digest: &ImageDigest,
        n_chunks: u64,
    ) -> Result<Option<ChunkBitmap>, ProgressError> {
        let file = match fs::File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.io("open", source)),
        };
        let mut bytes = Vec::new();
        file.take(MAX_FILE_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|source| self.io("read", source))?;
        let corrupt = |problem| ProgressError::Corrupt {
            path: self.path.clone(),
            problem,
        };
        if bytes.len() > MAX_FILE_LEN {
            return Err(corrupt("too large"));
        }
        if bytes.len() < HEADER_LEN + 4 {
            return Err(corrupt("too short"));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - 4);
        let checksum = u32::from_le_bytes(checksum.try_into().expect("split off 4 bytes"));
        if crc32fast::hash(body) != checksum {
            return Err(corrupt("checksum mismatch"));
        }
        if &body[..MAGIC.len()] != MAGIC {
            return Err(corrupt("no progress file magic"));
        }
        if body[MAGIC.len()] != FORMAT_VERSION {
            return Err(corrupt("unknown format version"));
        }
        let digest_at = MAGIC.len() + 1;
        let stored_digest = &body[digest_at..digest_at + 32];
        let stored_len = u64::from_le_bytes(
            body[digest_at + 32..HEADER_LEN]
                .try_into()
                .expect("8 bytes of header"),
        );
        if stored_digest != digest.as_bytes() || stored_len != n_chunks {
            return Err(ProgressError::OtherContent {
                path: self.path.clone(),
            });
        }
        let bitmap_bytes = &body[HEADER_LEN..];
        let mut bitmap = ChunkBitmap::new(n_chunks);
        if bitmap_bytes.len() != bitmap.bits.len() {
            return Err(corrupt("bitmap length does not match the chunk count"));
        }
        for index in 0..n_chunks {
            if bitmap_bytes[(index / 8) as usize] & (1 << (index % 8)) != 0 {
                bitmap.set(index);
            }
        }
        Ok(Some(bitmap))
    }

    /// Replaces the file with `bitmap` for content `digest`, atomically.
    pub fn save(&self, digest: &ImageDigest, bitmap: &ChunkBitmap) -> Result<(), ProgressError> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|source| self.io("create the directory of", source))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + bitmap.bits.len() + 4);
        bytes.extend_from_slice(MAGIC);
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(digest.as_bytes());
        bytes.extend_from_slice(&bitmap.len.to_le_bytes());
        bytes.extend_from_slice(&bitmap.bits);
        let checksum = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&checksum.to_le_bytes());

        let temp = self.path.with_extension("progress.tmp");
        let temp_io = |action, source| ProgressError::Io {
            action,
            path: temp.clone(),
            source,
        };
        let mut file = fs::File::create(&temp).map_err(|source| temp_io("create", source))?;
        file.write_all(&bytes)
            .map_err(|source| temp_io("write", source))?;
        file.sync_all().map_err(|source| temp_io("fsync", source))?;
        fs::rename(&temp, &self.path).map_err(|source| temp_io("rename", source))?;
        fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .map_err(|source| ProgressError::Io {
                action: "fsync",
                path: dir.to_owned(),
                source,
            })
    }

    /// Deletes the file; a missing file is no error.
    pub fn remove(&self) -> Result<(), ProgressError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(self.io("remove", source)),
        }
    }

    fn io(&self, action: &'static str, source: std::io::Error) -> ProgressError {
        ProgressError::Io {
            action,
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_count_and_ignore_what_is_out_of_range() {
        let mut bitmap = ChunkBitmap::new(10);
        assert_eq!((bitmap.len(), bitmap.count()), (10, 0));
        for index in [0, 3, 9, 3, 10, 99] {
            bitmap.set(index);
        }
        assert_eq!(bitmap.count(), 3);
        assert!(bitmap.get(0) && bitmap.get(3) && bitmap.get(9));
        assert!(!bitmap.get(1) && !bitmap.get(10));
        assert!(ChunkBitmap::new(0).is_empty());
    }

    #[test]
    fn a_saved_bitmap_comes_back_only_for_its_content() {
        let temp = tempfile::tempdir().unwrap();
        let image = ImageVersionId::new("office-v1").unwrap();
        let file = ProgressFile::new(&temp.path().join("transfer"), &image);
        assert!(file.path().ends_with("transfer/office-v1.progress"));
        let digest = ImageDigest::from_bytes([3; 32]);
        assert_eq!(file.load(&digest, 20).unwrap(), None);

        let mut bitmap = ChunkBitmap::new(20);
        bitmap.set(1);
        bitmap.set(17);
        file.save(&digest, &bitmap).unwrap();
        bitmap.set(5);
        file.save(&digest, &bitmap).unwrap();
        assert_eq!(file.load(&digest, 20).unwrap(), Some(bitmap));

        let other = ImageDigest::from_bytes([4; 32]);
        assert!(matches!(
            file.load(&other, 20),
            Err(ProgressError::OtherContent { .. })
        ));
        assert!(matches!(
            file.load(&digest, 21),
            Err(ProgressError::OtherContent { .. })
        ));

        // A flipped bit anywhere is caught by the checksum.
        let mut bytes = fs::read(file.path()).unwrap();
        let last_bitmap_byte = bytes.len() - 5;
        bytes[last_bitmap_byte] ^= 0x80;
        fs::write(file.path(), &bytes).unwrap();
        assert!(matches!(
            file.load(&digest, 20),
            Err(ProgressError::Corrupt {
                problem: "checksum mismatch",
                ..
            })
        ));
        fs::write(file.path(), b"DGPROG").unwrap();
        assert!(matches!(
            file.load(&digest, 20),
            Err(ProgressError::Corrupt {
                problem: "too short",
                ..
            })
        ));
        file.remove().unwrap();
        file.remove().unwrap();
        assert_eq!(file.load(&digest, 20).unwrap(), None);
    }
}
