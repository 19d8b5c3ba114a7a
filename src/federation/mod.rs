//! The federation engine: what makes appliances one grid. Grid identity and
//! authenticated join, QUIC between peers with mutual TLS, SWIM membership,
//! state dissemination, and discovery by seed address and mDNS.

pub mod discovery;
pub mod dissemination;
pub mod identity;
pub mod join_token;
pub mod membership;
pub mod node;
pub mod protocol;
pub mod simulation;
pub mod transport;
