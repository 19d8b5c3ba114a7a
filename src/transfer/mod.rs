//! Image distribution: base image versions between servers, verified chunk
//! by chunk (DESIGN.md section 6).
//!
//! - `manifest`: what a version's virtual disk holds, chunk by chunk, and
//!   the root digest that names it (pure).
//! - `codec`: chunks on the wire, zstd when that pays (pure).

pub mod codec;
pub mod manifest;

pub use manifest::{ChunkEntry, Manifest, ManifestBuilder, ManifestError};
