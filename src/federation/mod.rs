//! The federation engine: what makes appliances one grid. Grid identity and
//! authenticated join, QUIC between peers with mutual TLS, SWIM membership,
//! state dissemination, and discovery by seed address and mDNS.
//!
//! The root re-exports what other adapters use (image transfer asks peers
//! for manifests and chunks and answers them through [`ChunkSource`]; the
//! connection broker asks peers for desktops with [`request_reserve`]).

pub mod discovery;
pub mod dissemination;
pub mod hints;
pub mod identity;
pub mod join_token;
pub mod membership;
pub mod node;
pub mod protocol;
pub mod simulation;
pub mod transport;

pub use hints::FailureHints;
pub use node::{
    request_chunk, request_diff_part, request_have, request_log_off, request_manifest,
    request_reserve, ChunkRefusal, ChunkReply, ChunkSource, DeskRequestError, DiffPart,
    ImageRequestError, CHUNK_REQUESTS_PER_PEER, CHUNK_REQUESTS_TOTAL,
};
pub use protocol::{ProtocolError, MAX_DIFF_PART_BYTES};
pub use transport::{PeerConnection, PeerEndpoint, TransportError};
