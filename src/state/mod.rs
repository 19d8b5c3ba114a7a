//! The state engine: replicated grid state, its merge rules and durable storage.
//!
//! **Invariant:** `hlc` and `grid_state` are pure: no I/O, no clock reads
//! (time is an argument), no randomness. `storage` and `store` are the only
//! parts that touch files.

pub mod grid_state;
pub mod hlc;
pub mod storage;
pub mod store;

pub use grid_state::{ConfigKey, ConfigValue, Delta, GridState, MergeError, Stamp, VersionVector};
pub use hlc::{Hlc, HlcClock};
pub use store::{RecoveryReport, StateStore, StoreError};
