//! Image distribution: base image versions between servers, verified chunk
//! by chunk (DESIGN.md section 6).
//!
//! - `manifest`: what a version's virtual disk holds, chunk by chunk, and
//!   the root digest that names it (pure).
//! - `codec`: chunks on the wire, zstd when that pays (pure).
//! - `manifest_store`: manifests on disk, verified when read back.
//! - `serve`: a holder answers manifest, chunk and difference-disk
//!   requests from its pool (the federation's
//!   [`crate::federation::ChunkSource`]).
//! - `schedule`: which chunk each source fetches next (pure).
//! - `progress`: the resume file, a bitmap of the chunks written.
//! - `pull`: fetches a version from every holder at once (complete ones,
//!   and servers pulling it too), verifies each chunk, writes it at its
//!   offset, resumes after a restart.
//! - `swarm`: what a server pulling a version has, so it serves those
//!   chunks to others while it pulls.

pub mod codec;
pub mod manifest;
pub mod manifest_store;
pub mod progress;
pub mod pull;
pub mod schedule;
pub mod serve;
pub mod swarm;
#[cfg(test)]
mod test_pool;

pub use codec::Encoding;
pub use manifest::{ChunkEntry, Manifest, ManifestBuilder, ManifestError};
pub use manifest_store::{ManifestStore, ManifestStoreError};
pub use pull::{
    pull_image, ChunkPeer, ProgressCallback, PullError, PullProgress, PullReport, PullSettings,
    QuicChunkPeer, SourceFeed, SourceReport, Swarm,
};
pub use serve::{diff_file, ChunkServer, HeldImages, ImageOnServer};
pub use swarm::{Have, PartialImages};
