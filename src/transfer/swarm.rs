//! Swarming: servers pulling a version serve the chunks they already have,
//! so the first holder's link is not the limit when many pull at once.
//!
//! A running pull registers its bitmap of written chunks in this server's
//! [`PartialImages`]; the chunk server answers chunk requests for a version
//! held partly from it (a chunk is listed only once it is verified and
//! written), and answers "which chunks do you have" ([`Have`]) so pullers
//! schedule a partial source only for chunks it holds. Pullers add partial
//! holders as sources as they appear in the grid state and ask them for
//! their [`Have`] every [`HAVE_REFRESH`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::progress::ChunkBitmap;
use super::Encoding;
use crate::model::{ImageDigest, ImageVersionId};

/// How often a puller asks a partial source what it holds now.
pub const HAVE_REFRESH: Duration = Duration::from_millis(400);

/// Which chunks a server holds of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Have {
    /// Every chunk: the version is held complete.
    Complete,
    /// The chunks set in a bitmap of `len` chunks
    /// ([`ChunkBitmap::as_bytes`]).
    Partial {
        len: u64,
        #[serde(with = "serde_bytes")]
        bits: Vec<u8>,
    },
}

impl Have {
    /// The bitmap a partial answer carries, when it fits a manifest of
    /// `n_chunks`; `None` for [`Have::Complete`]. An answer that does not
    /// fit is an error.
    pub fn bitmap(&self, n_chunks: u64) -> Result<Option<ChunkBitmap>, &'static str> {
        match self {
            Self::Complete => Ok(None),
            Self::Partial { len, bits } if *len == n_chunks => ChunkBitmap::from_bytes(*len, bits)
                .map(Some)
                .ok_or("the chunk bitmap is malformed"),
            Self::Partial { .. } => Err("the chunk bitmap is for another chunk count"),
        }
    }
}

/// The versions this server is pulling now, with the chunks written so far.
#[derive(Debug, Default)]
pub struct PartialImages {
    pulls: Mutex<BTreeMap<ImageVersionId, Arc<PartialImage>>>,
}

/// Wire bytes of the chunks a pull received last, kept to serve them again
/// as they came (no disk read, no second compression): other pullers ask
/// for what a puller just got, within a refresh or two.
const RECENT_WIRE_BYTES: usize = 48 << 20;

#[derive(Debug)]
struct PartialImage {
    digest: ImageDigest,
    have: Mutex<ChunkBitmap>,
    recent: Mutex<RecentChunks>,
}

/// Chunks as they travelled, newest last, within [`RECENT_WIRE_BYTES`].
#[derive(Debug, Default)]
struct RecentChunks {
    chunks: VecDeque<(u64, Encoding, Arc<Vec<u8>>)>,
    bytes: usize,
}

impl RecentChunks {
    fn push(&mut self, index: u64, encoding: Encoding, wire: Vec<u8>) {
        if wire.len() > RECENT_WIRE_BYTES {
            return;
        }
        self.bytes += wire.len();
        self.chunks.push_back((index, encoding, Arc::new(wire)));
        while self.bytes > RECENT_WIRE_BYTES {
            match self.chunks.pop_front() {
                Some((_, _, dropped)) => self.bytes -= dropped.len(),
                None => break,
            }
        }
    }

    fn get(&self, index: u64) -> Option<(Encoding, Arc<Vec<u8>>)> {
        self.chunks
            .iter()
            .rev()
            .find(|(kept, _, _)| *kept == index)
            .map(|(_, encoding, wire)| (*encoding, Arc::clone(wire)))
    }
}

impl PartialImage {
    fn have(&self) -> std::sync::MutexGuard<'_, ChunkBitmap> {
        // Bits are only ever set: a panic elsewhere leaves a usable bitmap.
        self.have
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, RecentChunks> {
        // A cache: whatever a panic left is still valid entries.
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl PartialImages {
    pub fn new() -> Self {
        Self::default()
    }

    fn pulls(&self) -> std::sync::MutexGuard<'_, BTreeMap<ImageVersionId, Arc<PartialImage>>> {
        // Holds whole values only.
        self.pulls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A pull of `image` (content `digest`) starts with the chunks `have`
    /// already in its volume; it is listed until the guard is dropped.
    pub fn register(
        self: &Arc<Self>,
        image: &ImageVersionId,
        digest: ImageDigest,
        have: ChunkBitmap,
    ) -> PartialGuard {
        let entry = Arc::new(PartialImage {
            digest,
            have: Mutex::new(have),
            recent: Mutex::new(RecentChunks::default()),
        });
        self.pulls().insert(image.clone(), Arc::clone(&entry));
        PartialGuard {
            registry: Arc::clone(self),
            image: image.clone(),
            entry,
        }
    }

    /// The chunks of `image` written here, if a pull of exactly `digest`
    /// runs.
    pub fn have(&self, image: &ImageVersionId, digest: &ImageDigest) -> Option<ChunkBitmap> {
        let entry = self.pulls().get(image).cloned()?;
        (entry.digest == *digest).then(|| entry.have().clone())
    }

    /// Whether chunk `index` of `image` (content `digest`) is written here.
    pub fn has_chunk(&self, image: &ImageVersionId, digest: &ImageDigest, index: u64) -> bool {
        let Some(entry) = self.pulls().get(image).cloned() else {
            return false;
        };
        entry.digest == *digest && entry.have().get(index)
    }
}

impl PartialImages {
    /// Chunk `index` of `image` (content `digest`) as it travelled here, if
    /// this server received it lately: to serve it again as it is.
    pub fn recent_chunk(
        &self,
        image: &ImageVersionId,
        digest: &ImageDigest,
        index: u64,
    ) -> Option<(Encoding, Vec<u8>)> {
        let entry = self.pulls().get(image).cloned()?;
        if entry.digest != *digest {
            return None;
        }
        let (encoding, wire) = entry.recent().get(index)?;
        Some((encoding, Vec::clone(&wire)))
    }
}

/// A running pull's entry in [`PartialImages`]; dropping it unlists the
/// pull.
#[derive(Debug)]
pub struct PartialGuard {
    registry: Arc<PartialImages>,
    image: ImageVersionId,
    entry: Arc<PartialImage>,
}

impl PartialGuard {
    /// Chunk `index` is verified and written: it may be served, from
    /// `wire` (the bytes as they travelled) while they are recent.
    pub fn written(&self, index: u64, wire: Option<(Encoding, Vec<u8>)>) {
        if let Some((encoding, wire)) = wire {
            self.entry.recent().push(index, encoding, wire);
        }
        self.entry.have().set(index);
    }
}

impl Drop for PartialGuard {
    fn drop(&mut self) {
        let mut pulls = self.registry.pulls();
        if pulls
            .get(&self.image)
            .is_some_and(|entry| Arc::ptr_eq(entry, &self.entry))
        {
            pulls.remove(&self.image);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_is_listed_with_its_chunks_until_it_ends() {
        let registry = Arc::new(PartialImages::new());
        let image = ImageVersionId::new("v1").unwrap();
        let digest = ImageDigest::from_bytes([7; 32]);
        let mut start = ChunkBitmap::new(10);
        start.set(3);
        let guard = registry.register(&image, digest, start);
        assert!(registry.has_chunk(&image, &digest, 3));
        assert!(!registry.has_chunk(&image, &digest, 4));
        assert!(
            !registry.has_chunk(&image, &ImageDigest::from_bytes([8; 32]), 3),
            "other content"
        );
        guard.written(4, Some((Encoding::Zstd, vec![4; 10])));
        assert!(registry.has_chunk(&image, &digest, 4));
        assert_eq!(
            registry.recent_chunk(&image, &digest, 4),
            Some((Encoding::Zstd, vec![4; 10]))
        );
        assert_eq!(registry.recent_chunk(&image, &digest, 3), None, "not kept");
        assert_eq!(registry.have(&image, &digest).unwrap().count(), 2);
        drop(guard);
        assert!(registry.have(&image, &digest).is_none());
    }

    #[test]
    fn recent_wire_bytes_are_bounded() {
        let mut recent = RecentChunks::default();
        let chunk = 5 << 20;
        for index in 0..20 {
            recent.push(index, Encoding::Raw, vec![0; chunk]);
        }
        assert!(recent.bytes <= RECENT_WIRE_BYTES);
        assert_eq!(recent.bytes, recent.chunks.len() * chunk);
        assert!(recent.get(19).is_some(), "the newest is kept");
        assert!(recent.get(0).is_none(), "the oldest went");
    }

    #[test]
    fn have_answers_must_fit_the_manifest() {
        let mut bitmap = ChunkBitmap::new(10);
        bitmap.set(9);
        let have = Have::Partial {
            len: 10,
            bits: bitmap.as_bytes().to_vec(),
        };
        assert_eq!(have.bitmap(10).unwrap().unwrap(), bitmap);
        assert!(have.bitmap(11).is_err());
        assert_eq!(Have::Complete.bitmap(10).unwrap(), None);
        let stray_bit = Have::Partial {
            len: 10,
            bits: vec![0, 0b1000_0000],
        };
        assert!(stray_bit.bitmap(10).is_err());
        let short = Have::Partial {
            len: 10,
            bits: vec![0],
        };
        assert!(short.bitmap(10).is_err());
    }
}
