//! Image distribution: base image versions between servers, verified chunk
//! by chunk (DESIGN.md section 6).
//!
//! - `manifest`: what a version's virtual disk holds, chunk by chunk, and
//!   the root digest that names it (pure).
//! - `codec`: chunks on the wire, zstd when that pays (pure).
//! - `manifest_store`: manifests on disk, verified when read back.

pub mod codec;
pub mod manifest;
pub mod manifest_store;

pub use manifest::{ChunkEntry, Manifest, ManifestBuilder, ManifestError};
pub use manifest_store::{ManifestStore, ManifestStoreError};
