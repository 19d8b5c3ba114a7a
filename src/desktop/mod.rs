//! The desktop service: agent protocol, per-VM agent channels, VM lifecycle, connection broker.

pub mod lifecycle;
pub mod protocol;
