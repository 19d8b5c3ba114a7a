//! Manifests: what a base image version's virtual disk holds, chunk by chunk.
//!
//! A manifest lists, for every chunk of the virtual disk (the bytes the guest
//! sees, not the file's format), either "all zero" (never sent) or the
//! SHA-256 of its bytes. The root digest hashes the chunk size, the virtual
//! size and every entry in order; it names the version everywhere
//! (`BaseImage::digest`), so a version rebuilt elsewhere — flattened from a
//! difference disk, say — verifies against the same digest.
//!
//! Pure: no I/O. [`ManifestBuilder`] takes the bytes in any slices.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::model::ImageDigest;

/// Chunk size for new manifests: large enough that per-chunk costs vanish,
/// small enough that a retry or a resume loses little.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 << 20;
pub const MIN_CHUNK_SIZE: u32 = 64 << 10;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// 16 TiB in 4 MiB chunks; a manifest is at most ~140 MiB of entries then,
/// so peers refuse anything longer.
pub const MAX_CHUNKS: usize = 4 << 20;

const ROOT_DOMAIN: &[u8] = b"deskgrid manifest v1\0";

/// One chunk of the virtual disk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChunkEntry {
    /// Every byte is zero: not stored in the manifest's digest list, never sent.
    Zero,
    /// SHA-256 of the chunk's bytes.
    Data(#[serde(with = "serde_bytes")] [u8; 32]),
}

impl fmt::Debug for ChunkEntry {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Zero => formatter.write_str("Zero"),
            Self::Data(digest) => write!(formatter, "Data({})", hex::encode(&digest[..6])),
        }
    }
}

/// Why a manifest or a chunk is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("chunk size {0} is not a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}")]
    ChunkSize(u32),
    #[error("virtual size {virtual_size} needs {expected} chunks of {chunk_size} bytes, the manifest lists {found}")]
    ChunkCount {
        virtual_size: u64,
        chunk_size: u32,
        expected: u64,
        found: usize,
    },
    #[error("the manifest's root digest is {found}, the grid says {expected}")]
    RootDigest {
        expected: ImageDigest,
        found: ImageDigest,
    },
    #[error("chunk {index} does not exist (the image has {chunks})")]
    NoSuchChunk { index: u64, chunks: usize },
    #[error("chunk {index} is {found} bytes long, it must be {expected}")]
    ChunkLength {
        index: u64,
        expected: u64,
        found: usize,
    },
    #[error("chunk {index} does not match its digest")]
    ChunkDigest { index: u64 },
}

/// The content of one base image version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub virtual_size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<ChunkEntry>,
}

impl Manifest {
    /// Chunks a virtual disk of `virtual_size` has.
    pub fn chunk_count(virtual_size: u64, chunk_size: u32) -> u64 {
        virtual_size.div_ceil(u64::from(chunk_size.max(1)))
    }

    /// Checks the shape: a sane chunk size and one entry per chunk.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(ManifestError::ChunkSize(self.chunk_size));
        }
        let expected = Self::chunk_count(self.virtual_size, self.chunk_size);
        if self.chunks.len() > MAX_CHUNKS || self.chunks.len() as u64 != expected {
            return Err(ManifestError::ChunkCount {
                virtual_size: self.virtual_size,
                chunk_size: self.chunk_size,
                expected,
                found: self.chunks.len(),
            });
        }
        Ok(())
    }

    /// The digest that names this content.
    pub fn root_digest(&self) -> ImageDigest {
        let mut hasher = Sha256::new();
        hasher.update(ROOT_DOMAIN);
        hasher.update(self.virtual_size.to_le_bytes());
        hasher.update(self.chunk_size.to_le_bytes());
        for entry in &self.chunks {
            match entry {
                ChunkEntry::Zero => hasher.update([0u8]),
                ChunkEntry::Data(digest) => {
                    hasher.update([1u8]);
                    hasher.update(digest);
                }
            }
        }
        ImageDigest::from_bytes(hasher.finalize().into())
    }

    /// Validates the shape and that the root digest is `expected`.
    pub fn verify(&self, expected: &ImageDigest) -> Result<(), ManifestError> {
        self.validate()?;
        let found = self.root_digest();
        if found == *expected {
            Ok(())
        } else {
            Err(ManifestError::RootDigest {
                expected: *expected,
                found,
            })
        }
    }

    /// Byte offset and length of chunk `index`.
    pub fn chunk_range(&self, index: u64) -> Result<(u64, u64), ManifestError> {
        if index >= self.chunks.len() as u64 {
            return Err(ManifestError::NoSuchChunk {
                index,
                chunks: self.chunks.len(),
            });
        }
        let offset = index * u64::from(self.chunk_size);
        let length = (self.virtual_size - offset).min(u64::from(self.chunk_size));
        Ok((offset, length))
    }

    /// Checks that `data` is chunk `index`.
    pub fn verify_chunk(&self, index: u64, data: &[u8]) -> Result<(), ManifestError> {
        let (_, length) = self.chunk_range(index)?;
        if data.len() as u64 != length {
            return Err(ManifestError::ChunkLength {
                index,
                expected: length,
                found: data.len(),
            });
        }
        let matches = match &self.chunks[index as usize] {
            ChunkEntry::Zero => data.iter().all(|byte| *byte == 0),
            ChunkEntry::Data(digest) => Sha256::digest(data).as_slice() == digest,
        };
        if matches {
            Ok(())
        } else {
            Err(ManifestError::ChunkDigest { index })
        }
    }

    /// Indices of the chunks that carry data (the ones a pull fetches).
    pub fn data_chunks(&self) -> impl Iterator<Item = u64> + '_ {
        self.chunks
            .iter()
            .enumerate()
            .filter(|(_, entry)| matches!(entry, ChunkEntry::Data(_)))
            .map(|(index, _)| index as u64)
    }

    /// Bytes in data chunks (what a full pull moves before compression).
    pub fn data_bytes(&self) -> u64 {
        self.data_chunks()
            .map(|index| self.chunk_range(index).map_or(0, |(_, length)| length))
            .sum()
    }
}

/// Builds a manifest from a virtual disk's bytes, fed in any slices.
#[derive(Debug)]
pub struct ManifestBuilder {
    chunk_size: u32,
    chunks: Vec<ChunkEntry>,
    hasher: Sha256,
    /// Bytes of the current chunk so far, and whether all were zero.
    filled: u32,
    all_zero: bool,
    total: u64,
}

impl ManifestBuilder {
    pub fn new(chunk_size: u32) -> Result<Self, ManifestError> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(ManifestError::ChunkSize(chunk_size));
        }
        Ok(Self {
            chunk_size,
            chunks: Vec::new(),
            hasher: Sha256::new(),
            filled: 0,
            all_zero: true,
            total: 0,
        })
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = (self.chunk_size - self.filled) as usize;
            let (head, rest) = bytes.split_at(room.min(bytes.len()));
            if self.all_zero {
                self.all_zero = head.iter().all(|byte| *byte == 0);
            }
            self.hasher.update(head);
            self.filled += head.len() as u32;
            self.total += head.len() as u64;
            if self.filled == self.chunk_size {
                self.finish_chunk();
            }
            bytes = rest;
        }
    }

    fn finish_chunk(&mut self) {
        let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        self.chunks.push(if self.all_zero {
            ChunkEntry::Zero
        } else {
            ChunkEntry::Data(digest)
        });
        self.filled = 0;
        self.all_zero = true;
    }

    /// Bytes taken so far.
    pub fn bytes(&self) -> u64 {
        self.total
    }

    pub fn finish(mut self) -> Manifest {
        if self.filled > 0 {
            self.finish_chunk();
        }
        Manifest {
            virtual_size: self.total,
            chunk_size: self.chunk_size,
            chunks: self.chunks,
        }
    }
}

/// A manifest of `data` (tests, small images).
pub fn manifest_of(data: &[u8], chunk_size: u32) -> Result<Manifest, ManifestError> {
    let mut builder = ManifestBuilder::new(chunk_size)?;
    builder.update(data);
    Ok(builder.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CHUNK: u32 = MIN_CHUNK_SIZE;

    fn sample() -> Vec<u8> {
        let mut data = vec![0u8; 3 * CHUNK as usize + 1000];
        data[CHUNK as usize + 5] = 7; // chunk 1 has data; 0 and 2 are zero
        data[3 * CHUNK as usize + 999] = 1; // the short last chunk has data
        data
    }

    #[test]
    fn zero_chunks_are_marked_and_the_last_chunk_may_be_short() {
        let manifest = manifest_of(&sample(), CHUNK).unwrap();
        assert_eq!(manifest.virtual_size, 3 * u64::from(CHUNK) + 1000);
        assert_eq!(manifest.chunks.len(), 4);
        assert_eq!(manifest.chunks[0], ChunkEntry::Zero);
        assert!(matches!(manifest.chunks[1], ChunkEntry::Data(_)));
        assert_eq!(manifest.chunks[2], ChunkEntry::Zero);
        assert_eq!(
            manifest.chunk_range(3).unwrap(),
            (3 * u64::from(CHUNK), 1000)
        );
        assert_eq!(manifest.data_chunks().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(manifest.data_bytes(), u64::from(CHUNK) + 1000);
        manifest.validate().unwrap();
    }

    #[test]
    fn chunks_verify_and_bad_ones_are_named() {
        let data = sample();
        let manifest = manifest_of(&data, CHUNK).unwrap();
        let chunk = |index: usize| {
            let start = index * CHUNK as usize;
            &data[start..(start + CHUNK as usize).min(data.len())]
        };
        for index in 0..4 {
            manifest.verify_chunk(index as u64, chunk(index)).unwrap();
        }
        let mut bad = chunk(1).to_vec();
        bad[0] ^= 1;
        assert_eq!(
            manifest.verify_chunk(1, &bad),
            Err(ManifestError::ChunkDigest { index: 1 })
        );
        assert_eq!(
            manifest.verify_chunk(0, &[1u8; CHUNK as usize]),
            Err(ManifestError::ChunkDigest { index: 0 })
        );
        assert!(matches!(
            manifest.verify_chunk(3, chunk(1)),
            Err(ManifestError::ChunkLength { index: 3, .. })
        ));
        assert!(matches!(
            manifest.verify_chunk(4, chunk(1)),
            Err(ManifestError::NoSuchChunk { index: 4, .. })
        ));
    }

    #[test]
    fn the_root_digest_names_the_content() {
        let data = sample();
        let manifest = manifest_of(&data, CHUNK).unwrap();
        let root = manifest.root_digest();
        manifest.verify(&root).unwrap();
        let mut changed = data.clone();
        changed[10] = 1;
        let other = manifest_of(&changed, CHUNK).unwrap();
        assert_ne!(other.root_digest(), root);
        assert!(matches!(
            other.verify(&root),
            Err(ManifestError::RootDigest { .. })
        ));
        // A lying shape is refused before any digest is trusted.
        let mut short = manifest.clone();
        short.chunks.pop();
        assert!(matches!(
            short.verify(&short.root_digest()),
            Err(ManifestError::ChunkCount { .. })
        ));
        let mut odd = manifest;
        odd.chunk_size = 100_000;
        assert_eq!(odd.validate(), Err(ManifestError::ChunkSize(100_000)));
    }

    /// Sparse bytes: runs of zeros and of data, like a disk.
    fn disk_like(seed: u64, len: usize) -> Vec<u8> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut data = vec![0u8; len];
        let mut at = 0;
        while at < len {
            let run = rng.random_range(1..40_000).min(len - at);
            if rng.random_bool(0.4) {
                rng.fill(&mut data[at..at + run]);
            }
            at += run;
        }
        data
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// However the bytes arrive, the manifest is the same.
        #[test]
        fn slicing_does_not_matter(
            seed in any::<u64>(),
            len in 0usize..400_000,
            cuts in proptest::collection::vec(1usize..70_000, 1..20),
        ) {
            let data = disk_like(seed, len);
            let whole = manifest_of(&data, CHUNK).unwrap();
            let mut builder = ManifestBuilder::new(CHUNK).unwrap();
            let mut rest = &data[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let (head, tail) = rest.split_at((*cut).min(rest.len()));
                builder.update(head);
                rest = tail;
            }
            prop_assert_eq!(builder.finish(), whole.clone());
            whole.validate().unwrap();
        }
    }
}
