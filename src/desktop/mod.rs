//! The desktop service: agent protocol, per-VM agent channels, VM lifecycle, connection broker.

pub mod broker;
pub mod channels;
pub mod lifecycle;
pub mod protocol;
pub mod reserve;
pub mod service;

pub use reserve::{
    DeskSlot, DesktopDesk, LogoffFuture, Reservation, ReserveFuture, ReserveRefusal, ReserveRequest,
};
