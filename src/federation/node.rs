//! The federation runtime of one server: answers peers, pushes this server's
//! changes to every peer, and runs anti-entropy. The decisions are in
//! `dissemination.rs`; this file does the I/O.
//!
//! Backpressure: each peer has a bounded queue of pushes served by its own
//! task. A slow or unreachable peer fills its queue and further pushes to it
//! are dropped (and counted in the log); anti-entropy brings it up to date
//! when it is reachable again. Memory stays bounded whatever a peer does.
//!
//! Connections: this server sends its requests and membership datagrams on
//! the connections it opens, and answers on those others open to it (see
//! `transport.rs`); nothing is ever sent back on a connection a peer
//! opened. A push-pull exchange therefore stays on the asker's connection:
//! the answer to a pull carries what the asker lacks, and the asker pushes
//! back what the answerer lacks.
//!
//! Seeds: the `server.seeds` of `config.toml` are dialled by address, since
//! their ids are unknown until their certificates tell them. At start, and
//! again with backoff until each has answered once, this server pulls from
//! every seed with the same push-pull exchange as anti-entropy: the answer
//! brings the grid's state (its servers and their addresses) and the
//! push-back gives the seed this server's record, so both sides learn of
//! each other even when neither's state knew a reachable address of the
//! other (a restart after the grid's addresses changed). The membership is
//! then told of every server the state now knows. After that a seed is a
//! peer like any other.
//!
//! The membership plans for the grid's size: the number of servers the
//! state knows that are not removed, this one included, updated as it
//! changes.
//!
//! Base images: manifest and chunk requests are answered through a
//! [`ChunkSource`] (the transfer module's), on tokio's blocking pool. A peer
//! has at most [`CHUNK_REQUESTS_PER_PEER`] chunk requests served at once and
//! the server [`CHUNK_REQUESTS_TOTAL`]; further requests wait for a slot
//! (backpressure: the asker's request simply takes longer), they are never
//! refused for being many. Difference-disk parts take the same slots.
//! [`request_manifest`], [`request_chunk`] and [`request_diff_part`] are
//! the asking side.
//!
//! Desktops: a broker's [`PeerRequest::Reserve`] and an admin's
//! [`PeerRequest::LogOff`] go to the [`DesktopDesk`] in the [`DeskSlot`]
//! the serve process fills once its desktop service runs (empty: the
//! answer is `Unavailable`); only grid members may ask. [`request_reserve`]
//! and [`request_log_off`] are the asking side; they bound what comes back.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::dissemination::{Disseminator, Outgoing};
use super::membership::{
    MemberId, MemberState, Membership, MembershipOutput, MembershipSettings, MembershipTimer,
};
use super::protocol::{self, JoinGrant, JoinRequest, PeerRequest, PeerResponse, ProtocolError};
use super::transport::{
    BoxFuture, PeerConnection, PeerEndpoint, PeerHandler, PeerIdentity, TransportError,
    MAX_MESSAGE_BYTES,
};
use crate::desktop::{DeskSlot, DesktopDesk, Reservation, ReserveRefusal, ReserveRequest};
use crate::model::{ImageVersionId, ServerId, UserName};
use crate::state::{Delta, VersionVector};
use crate::transfer::{Encoding, Manifest};

/// What the federation needs from the grid state. Calls may block (they
/// fsync); the runtime makes them on tokio's blocking pool.
pub trait GridStateAccess: Send + Sync + 'static {
    fn version_vector(&self) -> VersionVector;
    fn delta_since(&self, since: &VersionVector) -> Delta;
    /// Merges a peer's delta; returns how many entries were new.
    fn apply_remote(&self, from: ServerId, delta: &Delta) -> Result<usize, String>;
    fn admit_joiner(&self, request: &JoinRequest) -> Result<JoinGrant, String>;
    /// Every other server of the grid with its addresses.
    fn peers(&self) -> Vec<(ServerId, Vec<String>)>;
    fn revoked(&self) -> Vec<ServerId>;
    /// What the failure detector says of every other member.
    fn report_members(&self, members: BTreeMap<ServerId, MemberState>);
}

/// What this server serves of the base images it holds: the transfer
/// module implements it over the pool and the manifest store. Calls block
/// (pool reads); the runtime makes them on tokio's blocking pool.
pub trait ChunkSource: Send + Sync + 'static {
    /// The manifest of `image`, checked against the grid's digest.
    fn manifest(&self, image: &ImageVersionId) -> Result<Manifest, ChunkRefusal>;

    /// Data chunk `index` of `image` as it travels, for `peer`.
    fn read_chunk(
        &self,
        peer: ServerId,
        image: &ImageVersionId,
        index: u64,
    ) -> Result<(Encoding, Vec<u8>), ChunkRefusal>;

    /// Which chunks of `image` this server holds, for `peer`. The default
    /// holds every chunk of what [`manifest`](Self::manifest) serves.
    fn have(
        &self,
        peer: ServerId,
        image: &ImageVersionId,
    ) -> Result<crate::transfer::Have, ChunkRefusal> {
        let _ = peer;
        self.manifest(image)
            .map(|_| crate::transfer::Have::Complete)
    }

    /// Bytes of `image`'s compressed difference disk from `offset` on (at
    /// most [`protocol::MAX_DIFF_PART_BYTES`]) and the file's length, for
    /// `peer`. The default holds no difference disks.
    fn read_diff_part(
        &self,
        peer: ServerId,
        image: &ImageVersionId,
        offset: u64,
    ) -> Result<DiffPart, ChunkRefusal> {
        let _ = (peer, offset);
        Err(ChunkRefusal::NoDiff {
            image: image.clone(),
        })
    }
}

/// A piece of a compressed difference disk as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffPart {
    /// The whole file's length.
    pub total: u64,
    pub data: Vec<u8>,
}

/// Why a manifest or chunk request is refused; the asker gets the text.
#[derive(Debug, thiserror::Error)]
pub enum ChunkRefusal {
    #[error("image version {image} is not in the grid state")]
    UnknownImage { image: ImageVersionId },
    #[error("image version {image} is not held complete here")]
    NotHeld { image: ImageVersionId },
    #[error("image version {image} has no chunk {index} (it has {chunks})")]
    NoSuchChunk {
        image: ImageVersionId,
        index: u64,
        chunks: u64,
    },
    #[error("image version {image} has no difference disk here")]
    NoDiff { image: ImageVersionId },
    #[error(
        "the difference disk of image version {image} has {total} bytes, none at offset {offset}"
    )]
    DiffOffset {
        image: ImageVersionId,
        offset: u64,
        total: u64,
    },
    #[error("chunk {index} of image version {image} is not here yet (this server is pulling it)")]
    NotHereYet { image: ImageVersionId, index: u64 },
    #[error("chunk {index} of image version {image} is all zeros and never sent")]
    ZeroChunk { image: ImageVersionId, index: u64 },
    #[error("image version {image} cannot be read here now")]
    Unavailable {
        image: ImageVersionId,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Chunk requests one peer may have served at once. A puller keeps about
/// this many in flight per source, so a healthy one never waits; a greedy
/// or broken one cannot take every slot.
pub const CHUNK_REQUESTS_PER_PEER: usize = 4;
/// Chunk requests served at once in total: each holds a 4 MiB chunk twice
/// (read and encoded, 64 MiB at most) and a thread of the blocking pool,
/// and compresses on a CPU the server's own work needs too.
pub const CHUNK_REQUESTS_TOTAL: usize = 8;

/// The serving slots for chunk requests: per peer, then in total. A
/// request waits for both (the per-peer slot first, so one peer's queue
/// never holds slots of the shared pool).
#[derive(Debug)]
struct ChunkLimits {
    per_peer_limit: usize,
    per_peer: std::sync::Mutex<BTreeMap<ServerId, Arc<Semaphore>>>,
    total: Arc<Semaphore>,
}

impl ChunkLimits {
    fn new(per_peer_limit: usize, total_limit: usize) -> Self {
        Self {
            per_peer_limit: per_peer_limit.max(1),
            per_peer: std::sync::Mutex::new(BTreeMap::new()),
            total: Arc::new(Semaphore::new(total_limit.max(1))),
        }
    }

    /// Waits for a slot for `peer`; the slot is held until the permits drop.
    async fn acquire(&self, peer: ServerId) -> (OwnedSemaphorePermit, OwnedSemaphorePermit) {
        let own = {
            // One semaphore per peer that ever asked: bounded by the grid.
            let mut per_peer = self
                .per_peer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            Arc::clone(
                per_peer
                    .entry(peer)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer_limit))),
            )
        };
        let own = own
            .acquire_owned()
            .await
            .expect("chunk slot semaphores are never closed");
        let shared = Arc::clone(&self.total)
            .acquire_owned()
            .await
            .expect("chunk slot semaphores are never closed");
        (own, shared)
    }
}

/// Why asking a peer for a manifest or a chunk failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageRequestError {
    #[error("the request did not complete")]
    Transport(#[from] TransportError),
    #[error("the answer cannot be decoded")]
    Protocol(#[from] ProtocolError),
    #[error("refused: {reason}")]
    Refused { reason: String },
    #[error("the answer to a {asked} request is something else")]
    Unexpected { asked: &'static str },
}

impl ImageRequestError {
    /// The peer answered, but with bytes no honest server sends (as opposed
    /// to not answering or refusing): it counts against the peer.
    pub fn is_bad_answer(&self) -> bool {
        matches!(self, Self::Protocol(_) | Self::Unexpected { .. })
    }
}

/// One chunk as it arrived; the asker checks the index and decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkReply {
    pub index: u64,
    pub encoding: Encoding,
    pub data: Vec<u8>,
}

/// Asks the server at the other end of `connection` for `image`'s manifest.
pub async fn request_manifest(
    connection: &PeerConnection,
    image: &ImageVersionId,
    deadline: Duration,
) -> Result<Manifest, ImageRequestError> {
    let request = PeerRequest::GetManifest {
        image: image.clone(),
    };
    let answer = connection
        .request(&protocol::encode(&request), deadline)
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::Manifest { manifest } => Ok(manifest),
        PeerResponse::Refused { reason } => Err(ImageRequestError::Refused { reason }),
        _ => Err(ImageRequestError::Unexpected { asked: "manifest" }),
    }
}

/// Asks the server at the other end of `connection` for chunk `index` of
/// `image`. The reply is as the peer sent it: unchecked.
pub async fn request_chunk(
    connection: &PeerConnection,
    image: &ImageVersionId,
    index: u64,
    deadline: Duration,
) -> Result<ChunkReply, ImageRequestError> {
    let request = PeerRequest::GetChunk {
        image: image.clone(),
        index,
    };
    let answer = connection
        .request(&protocol::encode(&request), deadline)
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::Chunk {
            index,
            encoding,
            data,
        } => Ok(ChunkReply {
            index,
            encoding,
            data,
        }),
        PeerResponse::Refused { reason } => Err(ImageRequestError::Refused { reason }),
        _ => Err(ImageRequestError::Unexpected { asked: "chunk" }),
    }
}

/// Asks the server at the other end of `connection` which chunks of
/// `image` it holds. Unchecked: the asker fits the answer to its manifest.
pub async fn request_have(
    connection: &PeerConnection,
    image: &ImageVersionId,
    deadline: Duration,
) -> Result<crate::transfer::Have, ImageRequestError> {
    let request = PeerRequest::GetHave {
        image: image.clone(),
    };
    let answer = connection
        .request(&protocol::encode(&request), deadline)
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::Have(have) => Ok(have),
        PeerResponse::Refused { reason } => Err(ImageRequestError::Refused { reason }),
        _ => Err(ImageRequestError::Unexpected {
            asked: "chunk list",
        }),
    }
}

/// Asks the server at the other end of `connection` for the bytes of
/// `image`'s compressed difference disk from `offset` on. Unchecked: the
/// asker bounds the sizes.
pub async fn request_diff_part(
    connection: &PeerConnection,
    image: &ImageVersionId,
    offset: u64,
    deadline: Duration,
) -> Result<DiffPart, ImageRequestError> {
    let request = PeerRequest::GetDiffPart {
        image: image.clone(),
        offset,
    };
    let answer = connection
        .request(&protocol::encode(&request), deadline)
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::DiffPart { total, data } => Ok(DiffPart { total, data }),
        PeerResponse::Refused { reason } => Err(ImageRequestError::Refused { reason }),
        _ => Err(ImageRequestError::Unexpected {
            asked: "difference disk",
        }),
    }
}

/// Why asking a peer for a desktop (or a logoff) got no answer from its
/// desktop service.
#[derive(Debug, thiserror::Error)]
pub enum DeskRequestError {
    #[error("the request did not complete")]
    Transport(#[from] TransportError),
    #[error("the answer cannot be decoded")]
    Protocol(#[from] ProtocolError),
    /// The desktop service answered no.
    #[error(transparent)]
    Refused(ReserveRefusal),
    /// The federation refused before the desktop service saw the request
    /// (a removed server, a peer of an older version).
    #[error("refused: {reason}")]
    PeerRefused { reason: String },
    #[error("the answer to a {asked} request is something else")]
    Unexpected { asked: &'static str },
    #[error("the answer's {field} is {len} bytes long, the limit is {max}")]
    Oversized {
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// The longest display host, server name or ticket a peer may send back: a
/// DNS name is at most 253 bytes, a SPICE ticket far shorter.
/// At most one failure hint per server this often (milliseconds).
const HINT_INTERVAL_MS: u64 = 5_000;
const MAX_RESERVATION_TEXT: usize = 253;
/// The longest refusal reason kept from a peer.
const MAX_REFUSAL_TEXT: usize = 1024;

/// Asks the server at the other end of `connection` to reserve a desktop.
/// The texts of the answer are bounded before it is returned.
pub async fn request_reserve(
    connection: &PeerConnection,
    request: &ReserveRequest,
    deadline: Duration,
) -> Result<Reservation, DeskRequestError> {
    let answer = connection
        .request(
            &protocol::encode(&PeerRequest::Reserve(request.clone())),
            deadline,
        )
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::Reserved(reservation) => {
            for (field, text) in [
                ("server", &reservation.server),
                ("host", &reservation.host),
                ("password", &reservation.password),
            ] {
                bound(field, text, MAX_RESERVATION_TEXT)?;
            }
            Ok(*reservation)
        }
        PeerResponse::ReserveRefused(refusal) => Err(bounded_refusal(refusal)?),
        PeerResponse::Refused { reason } => Err(DeskRequestError::PeerRefused { reason }),
        _ => Err(DeskRequestError::Unexpected { asked: "reserve" }),
    }
}

/// Asks the server at the other end of `connection` to end `user`'s
/// sessions and reservations; answers how many ended.
pub async fn request_log_off(
    connection: &PeerConnection,
    user: &UserName,
    deadline: Duration,
) -> Result<u32, DeskRequestError> {
    let answer = connection
        .request(
            &protocol::encode(&PeerRequest::LogOff { user: user.clone() }),
            deadline,
        )
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::LoggedOff { ended } => Ok(ended),
        PeerResponse::ReserveRefused(refusal) => Err(bounded_refusal(refusal)?),
        PeerResponse::Refused { reason } => Err(DeskRequestError::PeerRefused { reason }),
        _ => Err(DeskRequestError::Unexpected { asked: "logoff" }),
    }
}

fn bound(field: &'static str, text: &str, max: usize) -> Result<(), DeskRequestError> {
    if text.len() > max {
        return Err(DeskRequestError::Oversized {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

/// The refusal as an error, once its texts are bounded.
fn bounded_refusal(refusal: ReserveRefusal) -> Result<DeskRequestError, DeskRequestError> {
    match &refusal {
        ReserveRefusal::NoneFree { .. } => {}
        ReserveRefusal::Unavailable { reason } | ReserveRefusal::Failed { reason } => {
            bound("refusal reason", reason, MAX_REFUSAL_TEXT)?;
        }
    }
    Ok(DeskRequestError::Refused(refusal))
}

/// Answers a desktop request from `peer` through this server's desktop
/// service: only grid members that are not removed may ask.
async fn answer_desk(
    access: &Arc<dyn GridStateAccess>,
    desk: &DeskSlot,
    peer: PeerIdentity,
    request: PeerRequest,
) -> PeerResponse {
    let server = match peer {
        PeerIdentity::Server(server) => server,
        PeerIdentity::Joiner { remote } => {
            tracing::warn!(%remote, "a connection without a certificate asked for a desktop");
            return PeerResponse::Refused {
                reason: "a join connection may only join".to_owned(),
            };
        }
    };
    if blocking(access, move |access| access.revoked().contains(&server)).await {
        tracing::warn!(peer = %server, "desktop request from a removed server refused");
        return PeerResponse::Refused {
            reason: "this server was removed from the grid".to_owned(),
        };
    }
    let Some(desk): Option<Arc<dyn DesktopDesk>> = desk.get() else {
        return PeerResponse::ReserveRefused(ReserveRefusal::Unavailable {
            reason: "the desktop service is not running on this server".to_owned(),
        });
    };
    match request {
        PeerRequest::Reserve(request) => match desk.reserve(request).await {
            Ok(reservation) => PeerResponse::Reserved(Box::new(reservation)),
            Err(refusal) => PeerResponse::ReserveRefused(refusal),
        },
        PeerRequest::LogOff { user } => match desk.log_off(user).await {
            Ok(ended) => PeerResponse::LoggedOff { ended },
            Err(refusal) => PeerResponse::ReserveRefused(refusal),
        },
        _ => PeerResponse::Refused {
            reason: "not a desktop request".to_owned(),
        },
    }
}

/// Timings of the runtime.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// How often anti-entropy pulls from one peer.
    pub anti_entropy_interval: Duration,
    /// How long one request may take.
    pub request_deadline: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            // Each peer is visited every (peers × 2 s); pushes carry changes
            // at once, anti-entropy only repairs.
            anti_entropy_interval: Duration::from_secs(2),
            request_deadline: Duration::from_secs(30),
        }
    }
}

/// Pushes waiting for one peer before new ones are dropped.
const PUSH_QUEUE: usize = 64;
/// The longest wait between two attempts at a seed that does not answer: a
/// seed matters most when nothing else is reachable, so it is retried for
/// good, but an address that stays dead costs one attempt a minute.
const MAX_SEED_RETRY: Duration = Duration::from_secs(60);
/// Membership datagrams waiting to be handled before new ones are dropped.
const DATAGRAM_QUEUE: usize = 1024;

/// Peers to push to and pull from: every known server but those the failure
/// detector declared down (missing). Servers it has not heard of yet are
/// tried: dissemination must not wait for membership to converge.
fn reachable(peers: &[(ServerId, Vec<String>)], membership: &Membership) -> Vec<ServerId> {
    let members = membership.members();
    peers
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| members.get(id) != Some(&MemberState::Down))
        .collect()
}

/// Carries out what the membership asked for: datagrams, timers, news.
fn drive_membership(
    membership: &mut Membership,
    endpoint: &Arc<PeerEndpoint>,
    timers: &mpsc::UnboundedSender<MembershipTimer>,
    access: &Arc<dyn GridStateAccess>,
) {
    let mut changed = false;
    for output in membership.take_outputs() {
        match output {
            MembershipOutput::Send { to, bytes } => {
                let endpoint = Arc::clone(endpoint);
                tokio::spawn(async move {
                    let sent = async {
                        let connection = endpoint.connection(to.address, to.server).await?;
                        connection.send_datagram(bytes::Bytes::from(bytes))
                    }
                    .await;
                    if let Err(error) = sent {
                        tracing::trace!(peer = %to.server, error = %error, "membership datagram not sent");
                    }
                });
            }
            MembershipOutput::ScheduleTimer { after, timer } => {
                let timers = timers.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = timers.send(timer);
                });
            }
            MembershipOutput::Notify(event) => {
                changed = true;
                match event.state {
                    MemberState::Alive => tracing::info!(server = %event.server, "member alive"),
                    MemberState::Suspect => {
                        tracing::warn!(server = %event.server, "member suspect")
                    }
                    MemberState::Down => tracing::warn!(server = %event.server, "member missing"),
                }
            }
        }
    }
    if changed {
        access.report_members(membership.members());
    }
}

/// Answers peers' requests and hands their datagrams to the membership.
struct RequestHandler {
    access: Arc<dyn GridStateAccess>,
    chunks: Arc<dyn ChunkSource>,
    desk: DeskSlot,
    chunk_limits: Arc<ChunkLimits>,
    datagrams: mpsc::Sender<(ServerId, bytes::Bytes)>,
}

impl PeerHandler for RequestHandler {
    fn handle_request(&self, peer: PeerIdentity, request: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let access = Arc::clone(&self.access);
        let chunks = Arc::clone(&self.chunks);
        let chunk_limits = Arc::clone(&self.chunk_limits);
        let desk = self.desk.clone();
        Box::pin(async move {
            let request = match protocol::decode::<PeerRequest>(&request) {
                Err(error) => {
                    tracing::warn!(%peer, error = %error, "undecodable request dropped");
                    return protocol::encode(&PeerResponse::Refused {
                        reason: error.to_string(),
                    });
                }
                Ok(request) => request,
            };
            // Desktop requests wait on the desktop service (async), not on
            // the state: answered here, off the blocking pool.
            if matches!(
                request,
                PeerRequest::Reserve(_) | PeerRequest::LogOff { .. }
            ) {
                return encode_answer(&answer_desk(&access, &desk, peer, request).await);
            }
            // Held until the answer is encoded: a chunk's bytes are what
            // the slots bound.
            let _slot = match (&peer, &request) {
                (
                    PeerIdentity::Server(server),
                    PeerRequest::GetChunk { .. } | PeerRequest::GetDiffPart { .. },
                ) => Some(chunk_limits.acquire(*server).await),
                _ => None,
            };
            // Encoded on the blocking pool too: a chunk is megabytes.
            tokio::task::spawn_blocking(move || {
                encode_answer(&dispatch(access.as_ref(), chunks.as_ref(), peer, request))
            })
            .await
            .unwrap_or_else(|error| {
                protocol::encode(&PeerResponse::Refused {
                    reason: format!("request failed: {error}"),
                })
            })
        })
    }

    fn handle_datagram(&self, peer: ServerId, datagram: bytes::Bytes) {
        // A full queue drops the datagram: SWIM is built to survive loss.
        if self.datagrams.try_send((peer, datagram)).is_err() {
            tracing::debug!(%peer, "membership datagram dropped: queue full");
        }
    }
}

/// `response` encoded, or a refusal when it is too large for one message
/// (the transport would reset the stream and the asker learn nothing).
fn encode_answer(response: &PeerResponse) -> Vec<u8> {
    let bytes = protocol::encode(response);
    if bytes.len() <= MAX_MESSAGE_BYTES {
        return bytes;
    }
    tracing::warn!(
        size = bytes.len(),
        limit = MAX_MESSAGE_BYTES,
        "answer too large for one message; refused instead"
    );
    protocol::encode(&PeerResponse::Refused {
        reason: format!(
            "the answer is {} bytes, over the {MAX_MESSAGE_BYTES}-byte message limit",
            bytes.len()
        ),
    })
}

fn dispatch(
    access: &dyn GridStateAccess,
    chunks: &dyn ChunkSource,
    peer: PeerIdentity,
    request: PeerRequest,
) -> PeerResponse {
    let refused = |reason: String| PeerResponse::Refused { reason };
    if let PeerIdentity::Server(server) = peer {
        // The transport refuses new connections from a removed server; this
        // covers connections it opened before the removal reached us.
        if access.revoked().contains(&server) {
            tracing::warn!(peer = %server, "request from a removed server refused");
            return refused("this server was removed from the grid".to_owned());
        }
    }
    match (peer, request) {
        (PeerIdentity::Server(server), PeerRequest::PushDelta { delta }) => {
            match access.apply_remote(server, &delta) {
                Ok(changed) => PeerResponse::Merged { changed },
                Err(reason) => {
                    tracing::warn!(peer = %server, %reason, "pushed delta refused");
                    refused(reason)
                }
            }
        }
        (PeerIdentity::Server(_), PeerRequest::PullState { since }) => PeerResponse::State {
            delta: access.delta_since(&since),
            vector: access.version_vector(),
        },
        (PeerIdentity::Joiner { remote }, PeerRequest::Join(request)) => {
            match access.admit_joiner(&request) {
                Ok(grant) => PeerResponse::Joined(Box::new(grant)),
                Err(reason) => {
                    tracing::warn!(%remote, %reason, "join refused");
                    refused(reason)
                }
            }
        }
        (PeerIdentity::Joiner { remote }, _) => {
            tracing::warn!(%remote, "a connection without a certificate asked for more than a join");
            refused("a join connection may only join".to_owned())
        }
        (PeerIdentity::Server(_), PeerRequest::Join(_)) => {
            refused("this server is already a member".to_owned())
        }
        (PeerIdentity::Server(server), PeerRequest::GetManifest { image }) => {
            match chunks.manifest(&image) {
                Ok(manifest) => PeerResponse::Manifest { manifest },
                Err(refusal) => {
                    tracing::debug!(peer = %server, %image, reason = %crate::error_chain(&refusal), "manifest request refused");
                    refused(crate::error_chain(&refusal))
                }
            }
        }
        (PeerIdentity::Server(server), PeerRequest::GetChunk { image, index }) => {
            match chunks.read_chunk(server, &image, index) {
                Ok((encoding, data)) => PeerResponse::Chunk {
                    index,
                    encoding,
                    data,
                },
                Err(refusal) => {
                    tracing::debug!(peer = %server, %image, index, reason = %crate::error_chain(&refusal), "chunk request refused");
                    refused(crate::error_chain(&refusal))
                }
            }
        }
        (PeerIdentity::Server(server), PeerRequest::GetHave { image }) => {
            match chunks.have(server, &image) {
                Ok(have) => PeerResponse::Have(have),
                Err(refusal) => {
                    tracing::debug!(peer = %server, %image, reason = %crate::error_chain(&refusal), "have request refused");
                    refused(crate::error_chain(&refusal))
                }
            }
        }
        (PeerIdentity::Server(_), PeerRequest::Reserve(_) | PeerRequest::LogOff { .. }) => {
            refused("desktop requests are answered by the desktop service".to_owned())
        }
        (PeerIdentity::Server(server), PeerRequest::GetDiffPart { image, offset }) => {
            match chunks.read_diff_part(server, &image, offset) {
                Ok(DiffPart { total, data }) => PeerResponse::DiffPart { total, data },
                Err(refusal) => {
                    tracing::debug!(peer = %server, %image, offset, reason = %crate::error_chain(&refusal), "difference disk request refused");
                    refused(crate::error_chain(&refusal))
                }
            }
        }
    }
}

/// The servers of the grid, this one included: the known peers (which
/// leave out removed servers) and us.
fn grid_size(peers: &[(ServerId, Vec<String>)]) -> u32 {
    u32::try_from(peers.len())
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

/// Keeps the membership's plan at the grid's current size.
fn follow_grid_size(membership: &mut Membership, peers: &[(ServerId, Vec<String>)]) {
    let n_servers = grid_size(peers);
    if n_servers == membership.settings().expected_members {
        return;
    }
    match membership.set_expected_members(n_servers) {
        Ok(()) => tracing::debug!(n_servers, "membership planned for the grid's size"),
        Err(error) => {
            tracing::warn!(n_servers, error = %crate::error_chain(&error), "membership keeps its planned grid size")
        }
    }
}

/// The seeds of `config.toml` and what contacting them taught, sans I/O:
/// which to contact now and when to try again.
#[derive(Debug)]
struct SeedContacts {
    seeds: Vec<SeedContact>,
    /// The first retry after a failure; doubles up to [`MAX_SEED_RETRY`].
    retry_ms: u64,
}

#[derive(Debug)]
struct SeedContact {
    /// As configured: `HOST:PORT`, resolved at every attempt.
    address: String,
    /// The server that answered there, from its certificate. Set once an
    /// exchange succeeded; the seed is not contacted as a seed again.
    server: Option<ServerId>,
    in_flight: bool,
    failures: u32,
    next_attempt_ms: u64,
}

impl SeedContacts {
    fn new(addresses: Vec<String>, retry: Duration) -> Self {
        let retry_ms = u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1);
        Self {
            seeds: addresses
                .into_iter()
                .map(|address| SeedContact {
                    address,
                    server: None,
                    in_flight: false,
                    failures: 0,
                    next_attempt_ms: 0,
                })
                .collect(),
            retry_ms,
        }
    }

    /// The seeds to contact now (index and address): those that have not
    /// answered yet, are not being contacted and are due. They count as
    /// being contacted until [`Self::on_outcome`].
    fn due(&mut self, now_ms: u64) -> Vec<(usize, String)> {
        self.seeds
            .iter_mut()
            .enumerate()
            .filter(|(_, seed)| {
                seed.server.is_none() && !seed.in_flight && now_ms >= seed.next_attempt_ms
            })
            .map(|(index, seed)| {
                seed.in_flight = true;
                (index, seed.address.clone())
            })
            .collect()
    }

    /// How contacting seed `index` went: the server that answered, or
    /// `None` for a failure, tried again after a wait that doubles with
    /// every failure in a row.
    fn on_outcome(&mut self, index: usize, answered: Option<ServerId>, now_ms: u64) {
        let max_retry_ms = u64::try_from(MAX_SEED_RETRY.as_millis()).unwrap_or(u64::MAX);
        let retry_ms = self.retry_ms;
        let Some(seed) = self.seeds.get_mut(index) else {
            return;
        };
        seed.in_flight = false;
        match answered {
            Some(server) => seed.server = Some(server),
            None => {
                let wait_ms = retry_ms
                    .saturating_mul(1 << seed.failures.min(16))
                    .min(max_retry_ms);
                seed.failures = seed.failures.saturating_add(1);
                seed.next_attempt_ms = now_ms.saturating_add(wait_ms);
            }
        }
    }

    /// Seed `index` as configured.
    fn address(&self, index: usize) -> &str {
        self.seeds
            .get(index)
            .map_or("", |seed| seed.address.as_str())
    }

    /// How many times in a row seed `index` has failed.
    fn failures(&self, index: usize) -> u32 {
        self.seeds.get(index).map_or(0, |seed| seed.failures)
    }
}

/// Tells the membership of every server the state knows, and of `also`
/// (a seed at the address it answered on), after the state learnt of new
/// servers from outside the membership.
fn join_known_peers(
    membership: &mut Membership,
    peers: &[(ServerId, Vec<String>)],
    also: Option<(ServerId, SocketAddr)>,
    now_ms: u64,
) {
    let known = peers
        .iter()
        .filter_map(|(id, addresses)| dialable(addresses).map(|address| (*id, address)))
        .chain(also);
    if let Err(error) = membership.join_known(known, now_ms) {
        tracing::debug!(error = %crate::error_chain(&error), "membership join");
    }
}

/// The first address of a peer that can be dialled.
fn dialable(addresses: &[String]) -> Option<SocketAddr> {
    addresses
        .iter()
        .filter_map(|address| address.parse::<SocketAddr>().ok())
        .find(|address| !address.ip().is_unspecified() && address.port() != 0)
}

/// Runs until `shutdown` turns true. `advertised` is the address other
/// servers dial (the membership tells it to them); `seeds` are the
/// `HOST:PORT` addresses of `server.seeds`; `chunks` answers peers'
/// manifest and chunk requests; `desk` their reservations, once the serve
/// process has put this server's desktop service in it.
#[allow(
    clippy::too_many_arguments,
    reason = "the composition root hands each component over once, by name"
)]
pub async fn run(
    endpoint: Arc<PeerEndpoint>,
    access: Arc<dyn GridStateAccess>,
    chunks: Arc<dyn ChunkSource>,
    desk: DeskSlot,
    mut changes: broadcast::Receiver<Delta>,
    settings: NodeSettings,
    advertised: SocketAddr,
    seeds: Vec<String>,
    hints: super::FailureHints,
    mut shutdown: watch::Receiver<bool>,
) {
    let own = endpoint.server_id();
    // The broker's hints; a second loop on the same handle gets none.
    let (_no_hints, spare) = mpsc::channel(1);
    let mut hints = hints.take_receiver().unwrap_or(spare);
    let mut last_hint_ms: BTreeMap<ServerId, u64> = BTreeMap::new();
    let (datagram_sender, mut datagrams) = mpsc::channel(DATAGRAM_QUEUE);
    let server = tokio::spawn(Arc::clone(&endpoint).serve(Arc::new(RequestHandler {
        access: Arc::clone(&access),
        chunks,
        desk,
        chunk_limits: Arc::new(ChunkLimits::new(
            CHUNK_REQUESTS_PER_PEER,
            CHUNK_REQUESTS_TOTAL,
        )),
        datagrams: datagram_sender,
    })));
    let interval_ms = u64::try_from(settings.anti_entropy_interval.as_millis()).unwrap_or(u64::MAX);
    let mut disseminator = Disseminator::new(own, interval_ms, rand::random());
    let mut push_queues: BTreeMap<ServerId, mpsc::Sender<(Delta, SocketAddr)>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    let elapsed_ms = move || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let pull_running = Arc::new(tokio::sync::Mutex::new(()));
    let mut seeds = SeedContacts::new(seeds, settings.anti_entropy_interval);
    let (seed_outcome_sender, mut seed_outcomes) =
        mpsc::unbounded_channel::<(usize, anyhow::Result<(ServerId, SocketAddr)>)>();

    // Membership: a new generation at every start, so a server once declared
    // down comes back as itself.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        });
    let (timer_sender, mut timers) = mpsc::unbounded_channel::<MembershipTimer>();
    let peers = blocking(&access, |access| access.peers()).await;
    let mut membership = match Membership::new(
        MemberId::new(own, advertised, generation),
        MembershipSettings {
            expected_members: grid_size(&peers),
            ..MembershipSettings::default()
        },
        rand::random(),
    ) {
        Ok(membership) => membership,
        Err(error) => {
            tracing::error!(error = %crate::error_chain(&error), "cannot start membership");
            server.abort();
            return;
        }
    };
    join_known_peers(&mut membership, &peers, None, elapsed_ms());
    drive_membership(&mut membership, &endpoint, &timer_sender, &access);

    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some((peer, datagram)) = datagrams.recv() => {
                if let Err(error) = membership.handle_datagram(peer, &datagram, elapsed_ms()) {
                    tracing::debug!(%peer, error = %crate::error_chain(&error), "membership datagram dropped");
                }
                drive_membership(&mut membership, &endpoint, &timer_sender, &access);
            }
            Some((index, outcome)) = seed_outcomes.recv() => {
                match outcome {
                    Ok((server, _)) if server == own => {
                        tracing::debug!(seed = %seeds.address(index), "seed is this server");
                        seeds.on_outcome(index, Some(server), elapsed_ms());
                    }
                    Ok((server, address)) => {
                        tracing::info!(seed = %seeds.address(index), %server, "seed answered; grid state exchanged");
                        seeds.on_outcome(index, Some(server), elapsed_ms());
                        // The state may know servers the membership does not.
                        let peers = blocking(&access, |access| access.peers()).await;
                        follow_grid_size(&mut membership, &peers);
                        join_known_peers(&mut membership, &peers, Some((server, address)), elapsed_ms());
                        drive_membership(&mut membership, &endpoint, &timer_sender, &access);
                    }
                    Err(error) => {
                        let seed = seeds.address(index);
                        let error = format!("{error:#}");
                        if seeds.failures(index) == 0 {
                            tracing::info!(%seed, %error, "seed not reached; trying again later");
                        } else {
                            tracing::debug!(%seed, %error, "seed not reached");
                        }
                        seeds.on_outcome(index, None, elapsed_ms());
                    }
                }
            }
            Some(server) = hints.recv() => {
                let now_ms = elapsed_ms();
                // One hint per server per interval: a login storm against a
                // dead server suspects it once, not once per login.
                let recent = last_hint_ms
                    .get(&server)
                    .is_some_and(|at| now_ms.saturating_sub(*at) < HINT_INTERVAL_MS);
                if server != own && !recent {
                    last_hint_ms.insert(server, now_ms);
                    match membership.suspect(server, now_ms) {
                        Ok(true) => tracing::warn!(%server, "server missed a reservation deadline: suspect now (it refutes if alive)"),
                        Ok(false) => tracing::info!(%server, "failure hint: the server is already suspect or missing"),
                        Err(error) => tracing::debug!(%server, error = %crate::error_chain(&error), "failure hint refused"),
                    }
                    drive_membership(&mut membership, &endpoint, &timer_sender, &access);
                }
            }
            Some(timer) = timers.recv() => {
                if let Err(error) = membership.handle_timer(timer, elapsed_ms()) {
                    tracing::debug!(error = %crate::error_chain(&error), "membership timer");
                }
                drive_membership(&mut membership, &endpoint, &timer_sender, &access);
            }
            change = changes.recv() => match change {
                Ok(delta) => {
                    let peers = blocking(&access, |access| access.peers()).await;
                    let alive = reachable(&peers, &membership);
                    for outgoing in disseminator.on_local_change(&delta, &alive) {
                        let Outgoing::Push { to, delta } = outgoing else { continue };
                        let Some(address) = peers.iter().find(|(id, _)| *id == to).and_then(|(_, addresses)| dialable(addresses)) else {
                            tracing::debug!(peer = %to, "no dialable address; anti-entropy will carry the change");
                            continue;
                        };
                        let queue = push_queues.entry(to).or_insert_with(|| {
                            spawn_push_worker(Arc::clone(&endpoint), Arc::clone(&access), to, settings.request_deadline)
                        });
                        if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send((delta, address)) {
                            tracing::warn!(peer = %to, "peer is slow: push dropped, anti-entropy will carry it");
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "federation fell behind local changes; anti-entropy will carry them");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                let (peers, vector, revoked) = blocking(&access, |access| (access.peers(), access.version_vector(), access.revoked())).await;
                endpoint.revocations().replace_all(revoked);
                follow_grid_size(&mut membership, &peers);
                let alive = reachable(&peers, &membership);
                let now_ms = elapsed_ms();
                for (index, seed) in seeds.due(now_ms) {
                    let endpoint = Arc::clone(&endpoint);
                    let access = Arc::clone(&access);
                    let outcomes = seed_outcome_sender.clone();
                    let deadline = settings.request_deadline;
                    tokio::spawn(async move {
                        let outcome = pull_from_seed(&endpoint, &access, &seed, deadline).await;
                        // The loop is gone only when shutting down.
                        let _ = outcomes.send((index, outcome));
                    });
                }
                if let Some(Outgoing::Pull { from, since }) = disseminator.on_tick(now_ms, &alive, &vector) {
                    let Some(address) = peers.iter().find(|(id, _)| *id == from).and_then(|(_, addresses)| dialable(addresses)) else { continue };
                    let Ok(guard) = Arc::clone(&pull_running).try_lock_owned() else { continue };
                    let endpoint = Arc::clone(&endpoint);
                    let access = Arc::clone(&access);
                    let deadline = settings.request_deadline;
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(error) = pull(&endpoint, &access, from, address, since, deadline).await {
                            tracing::debug!(peer = %from, error = %format!("{error:#}"), "anti-entropy pull failed");
                        }
                    });
                }
            }
        }
    }
    drop(push_queues);
    endpoint.close();
    server.abort();
}

async fn blocking<T: Send + 'static>(
    access: &Arc<dyn GridStateAccess>,
    call: impl FnOnce(&dyn GridStateAccess) -> T + Send + 'static,
) -> T {
    let access = Arc::clone(access);
    match tokio::task::spawn_blocking(move || call(access.as_ref())).await {
        Ok(value) => value,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

/// The worker that pushes to `peer`. Each push carries the peer's address
/// as the state knew it when the push was queued, so a peer whose address
/// changed is dialled at the new one.
fn spawn_push_worker(
    endpoint: Arc<PeerEndpoint>,
    access: Arc<dyn GridStateAccess>,
    peer: ServerId,
    deadline: Duration,
) -> mpsc::Sender<(Delta, SocketAddr)> {
    let (sender, mut receiver) = mpsc::channel::<(Delta, SocketAddr)>(PUSH_QUEUE);
    tokio::spawn(async move {
        while let Some((delta, address)) = receiver.recv().await {
            let outcome = async {
                let connection = endpoint.connection(address, peer).await?;
                let answer = connection
                    .request(
                        &protocol::encode(&PeerRequest::PushDelta { delta }),
                        deadline,
                    )
                    .await?;
                anyhow::Ok(protocol::decode::<PeerResponse>(&answer)?)
            }
            .await;
            match outcome {
                Ok(PeerResponse::Merged { .. }) => {}
                Ok(PeerResponse::Refused { reason }) => {
                    tracing::warn!(%peer, %reason, "peer refused a push")
                }
                Ok(other) => tracing::warn!(%peer, ?other, "unexpected answer to a push"),
                Err(error) => {
                    tracing::debug!(%peer, error = %format!("{error:#}"), "push failed; anti-entropy will carry it")
                }
            }
        }
        drop(access);
    });
    sender
}

async fn pull(
    endpoint: &PeerEndpoint,
    access: &Arc<dyn GridStateAccess>,
    peer: ServerId,
    address: SocketAddr,
    since: VersionVector,
    deadline: Duration,
) -> anyhow::Result<()> {
    let connection = endpoint.connection(address, peer).await?;
    pull_over(&connection, access, since, deadline).await
}

/// Contacts one seed (`HOST:PORT`, tried at each address it resolves to):
/// the server that answers, proven by its certificate, is asked for what we
/// lack and given what it lacks. Returns that server and the address it
/// answered on; it may be this server itself, and then nothing is exchanged.
async fn pull_from_seed(
    endpoint: &PeerEndpoint,
    access: &Arc<dyn GridStateAccess>,
    seed: &str,
    deadline: Duration,
) -> anyhow::Result<(ServerId, SocketAddr)> {
    use anyhow::Context as _;

    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(seed)
        .await
        .with_context(|| format!("cannot resolve {seed}"))?
        .collect();
    let mut last_error = anyhow::anyhow!("{seed} resolves to no address");
    for address in addresses {
        let connection = match endpoint.connection_to_address(address).await {
            Ok(connection) => connection,
            Err(error) => {
                last_error = error.into();
                continue;
            }
        };
        let server = connection.remote_id();
        if server == endpoint.server_id() {
            connection.close();
            return Ok((server, address));
        }
        let since = blocking(access, |access| access.version_vector()).await;
        pull_over(&connection, access, since, deadline)
            .await
            .with_context(|| format!("exchange with server {server} at {address}"))?;
        return Ok((server, address));
    }
    Err(last_error)
}

/// One push-pull exchange on `connection`: pull what a replica at `since`
/// lacks, then push back what the peer lacks.
async fn pull_over(
    connection: &PeerConnection,
    access: &Arc<dyn GridStateAccess>,
    since: VersionVector,
    deadline: Duration,
) -> anyhow::Result<()> {
    let peer = connection.remote_id();
    let answer = connection
        .request(
            &protocol::encode(&PeerRequest::PullState { since }),
            deadline,
        )
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::State { delta, vector } => {
            if !delta.is_empty() {
                let changed = blocking(access, move |access| access.apply_remote(peer, &delta))
                    .await
                    .map_err(anyhow::Error::msg)?;
                if changed > 0 {
                    tracing::info!(%peer, changed, "anti-entropy brought changes");
                }
            }
            // Push-pull: send back what the peer lacks, so a server that does
            // not know us yet still learns from us.
            let back = blocking(access, move |access| access.delta_since(&vector)).await;
            if !back.is_empty() {
                let answer = connection
                    .request(
                        &protocol::encode(&PeerRequest::PushDelta { delta: back }),
                        deadline,
                    )
                    .await?;
                if let PeerResponse::Refused { reason } = protocol::decode::<PeerResponse>(&answer)?
                {
                    anyhow::bail!("push-back refused: {reason}");
                }
            }
            Ok(())
        }
        PeerResponse::Refused { reason } => anyhow::bail!("refused: {reason}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(byte: u8) -> ServerId {
        ServerId::from_bytes([byte; 16])
    }

    fn peers(n: u8) -> Vec<(ServerId, Vec<String>)> {
        (2..n.saturating_add(2))
            .map(|byte| (server(byte), vec![format!("10.0.0.{byte}:7443")]))
            .collect()
    }

    #[test]
    fn every_seed_is_contacted_at_once_then_retried_with_backoff_until_it_answers() {
        let mut seeds = SeedContacts::new(
            vec!["a:1".to_owned(), "b:2".to_owned()],
            Duration::from_secs(2),
        );
        assert_eq!(seeds.due(0), [(0, "a:1".to_owned()), (1, "b:2".to_owned())]);
        assert_eq!(seeds.due(100_000), [], "not again while being contacted");

        seeds.on_outcome(0, Some(server(7)), 500);
        seeds.on_outcome(1, None, 500);
        // a answered: a peer like any other now. b waits 2 s, then 4, 8, ...
        let mut now = 500;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let mut wait = 0;
            while seeds.due(now + wait).is_empty() {
                wait += 100;
            }
            waits.push(wait);
            now += wait;
            seeds.on_outcome(1, None, now);
        }
        assert_eq!(
            waits,
            [2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000],
            "doubling up to MAX_SEED_RETRY"
        );
        seeds.on_outcome(1, Some(server(8)), now);
        assert_eq!(seeds.due(u64::MAX), [], "every seed answered");
        assert_eq!(seeds.address(1), "b:2");
    }

    #[tokio::test]
    async fn chunk_requests_wait_for_a_slot_per_peer_and_in_total() {
        let limits = ChunkLimits::new(2, 3);
        let wait = Duration::from_millis(30);
        let first = limits.acquire(server(1)).await;
        let _second = limits.acquire(server(1)).await;
        assert!(
            tokio::time::timeout(wait, limits.acquire(server(1)))
                .await
                .is_err(),
            "a third request of one peer waits"
        );
        let _other = limits.acquire(server(2)).await;
        assert!(
            tokio::time::timeout(wait, limits.acquire(server(3)))
                .await
                .is_err(),
            "every shared slot is taken"
        );
        let waiting = tokio::spawn({
            let limits = Arc::new(limits);
            async move {
                let _slot = limits.acquire(server(3)).await;
            }
        });
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("a freed slot goes to the waiting peer")
            .unwrap();
    }

    #[derive(Debug, Default)]
    struct Grid {
        revoked: Vec<ServerId>,
    }

    impl GridStateAccess for Grid {
        fn version_vector(&self) -> VersionVector {
            VersionVector::new()
        }
        fn delta_since(&self, _since: &VersionVector) -> Delta {
            Delta::default()
        }
        fn apply_remote(&self, _from: ServerId, _delta: &Delta) -> Result<usize, String> {
            Ok(0)
        }
        fn admit_joiner(&self, _request: &JoinRequest) -> Result<JoinGrant, String> {
            Err("no joins here".to_owned())
        }
        fn peers(&self) -> Vec<(ServerId, Vec<String>)> {
            Vec::new()
        }
        fn revoked(&self) -> Vec<ServerId> {
            self.revoked.clone()
        }
        fn report_members(&self, _members: BTreeMap<ServerId, MemberState>) {}
    }

    #[derive(Debug)]
    struct Chunks;

    impl ChunkSource for Chunks {
        fn manifest(&self, image: &ImageVersionId) -> Result<Manifest, ChunkRefusal> {
            Err(ChunkRefusal::NotHeld {
                image: image.clone(),
            })
        }
        fn read_chunk(
            &self,
            _peer: ServerId,
            image: &ImageVersionId,
            index: u64,
        ) -> Result<(Encoding, Vec<u8>), ChunkRefusal> {
            if index < 2 {
                Ok((Encoding::Raw, vec![index as u8; 10]))
            } else {
                Err(ChunkRefusal::NoSuchChunk {
                    image: image.clone(),
                    index,
                    chunks: 2,
                })
            }
        }
    }

    #[test]
    fn image_requests_reach_the_chunk_source_from_members_only() {
        let image = ImageVersionId::new("office-v1").unwrap();
        let grid = Grid {
            revoked: vec![server(9)],
        };
        let ask = |peer, index| {
            dispatch(
                &grid,
                &Chunks,
                peer,
                PeerRequest::GetChunk {
                    image: image.clone(),
                    index,
                },
            )
        };
        assert_eq!(
            ask(PeerIdentity::Server(server(1)), 1),
            PeerResponse::Chunk {
                index: 1,
                encoding: Encoding::Raw,
                data: vec![1; 10]
            }
        );
        let refusal = |response| match response {
            PeerResponse::Refused { reason } => reason,
            other => panic!("not refused: {other:?}"),
        };
        assert_eq!(
            refusal(ask(PeerIdentity::Server(server(1)), 5)),
            "image version office-v1 has no chunk 5 (it has 2)"
        );
        assert_eq!(
            refusal(ask(PeerIdentity::Server(server(9)), 0)),
            "this server was removed from the grid"
        );
        let joiner = PeerIdentity::Joiner {
            remote: "127.0.0.1:9".parse().unwrap(),
        };
        assert_eq!(refusal(ask(joiner, 0)), "a join connection may only join");
        let manifest = dispatch(
            &grid,
            &Chunks,
            PeerIdentity::Server(server(1)),
            PeerRequest::GetManifest {
                image: image.clone(),
            },
        );
        assert_eq!(
            refusal(manifest),
            "image version office-v1 is not held complete here"
        );
    }

    #[test]
    fn an_answer_too_large_for_one_message_becomes_a_refusal() {
        let small = PeerResponse::Merged { changed: 1 };
        assert_eq!(encode_answer(&small), protocol::encode(&small));
        let huge = PeerResponse::Chunk {
            index: 0,
            encoding: Encoding::Raw,
            data: vec![0; MAX_MESSAGE_BYTES],
        };
        let answer = protocol::decode::<PeerResponse>(&encode_answer(&huge)).unwrap();
        assert!(
            matches!(&answer, PeerResponse::Refused { reason } if reason.contains("message limit")),
            "{answer:?}"
        );
    }

    #[test]
    fn the_membership_plans_for_the_grid_size_as_it_changes() {
        let own = MemberId::new(server(1), "10.0.0.1:7443".parse().unwrap(), 1);
        let mut membership = Membership::new(own, MembershipSettings::default(), 3).unwrap();
        for (n_peers, n_servers) in [(0, 1), (2, 3), (2, 3), (120, 121), (4, 5)] {
            follow_grid_size(&mut membership, &peers(n_peers));
            assert_eq!(
                membership.settings().expected_members,
                n_servers,
                "{n_peers} peers and this server"
            );
        }
    }

    /// A desk that reserves at once, with a ticket of `ticket_len` bytes.
    #[derive(Debug)]
    struct InstantDesk {
        ticket_len: usize,
    }

    impl DesktopDesk for InstantDesk {
        fn reserve(&self, request: ReserveRequest) -> crate::desktop::ReserveFuture {
            let ticket = "t".repeat(self.ticket_len);
            Box::pin(async move {
                Ok(Reservation {
                    vm: crate::model::VmId::from_bytes([5; 16]),
                    template: request.template,
                    server: "host".to_owned(),
                    protocol: crate::model::DisplayProtocol::Spice,
                    host: "127.0.0.1".to_owned(),
                    port: 5900,
                    password: ticket,
                    expires_at_ms: 1,
                    returning: false,
                })
            })
        }
    }

    fn endpoint(ca: &super::super::identity::GridCa) -> Arc<PeerEndpoint> {
        let (key, certificate) = ca.issue_for_self(ServerId::random()).unwrap();
        let material = super::super::transport::TlsMaterial {
            ca_cert: ca.certificate_der(),
            cert_chain: vec![certificate.der],
            key: key.private_key_der(),
        };
        Arc::new(
            PeerEndpoint::bind(
                "127.0.0.1:0".parse().unwrap(),
                material,
                super::super::transport::Revocations::default(),
            )
            .unwrap(),
        )
    }

    #[tokio::test]
    async fn a_reservation_travels_over_quic_to_the_desk_and_back_bounded() {
        let ca = super::super::identity::GridCa::create(crate::model::GridId::random()).unwrap();
        let host = endpoint(&ca);
        let broker = endpoint(&ca);
        let desk = DeskSlot::default();
        let (datagrams, _) = mpsc::channel(1);
        let serving = tokio::spawn(Arc::clone(&host).serve(Arc::new(RequestHandler {
            access: Arc::new(Grid {
                revoked: Vec::new(),
            }),
            chunks: Arc::new(Chunks),
            desk: desk.clone(),
            chunk_limits: Arc::new(ChunkLimits::new(1, 1)),
            datagrams,
        })));
        let connection = broker
            .connection(host.local_addr().unwrap(), host.server_id())
            .await
            .unwrap();
        let request = ReserveRequest {
            user: UserName::new("alice").unwrap(),
            template: crate::model::TemplateName::new("office").unwrap(),
        };
        let deadline = Duration::from_secs(10);

        // No desktop service yet: a clear refusal, not a failure.
        let error = request_reserve(&connection, &request, deadline)
            .await
            .unwrap_err();
        assert!(
            matches!(
                &error,
                DeskRequestError::Refused(ReserveRefusal::Unavailable { .. })
            ),
            "{error:?}"
        );
        let error = request_log_off(&connection, &request.user, deadline)
            .await
            .unwrap_err();
        assert!(matches!(error, DeskRequestError::Refused(_)), "{error:?}");

        assert!(desk.set(Arc::new(InstantDesk { ticket_len: 16 })));
        let reservation = request_reserve(&connection, &request, deadline)
            .await
            .unwrap();
        assert_eq!(reservation.template, request.template);
        assert_eq!(reservation.password.len(), 16);
        // The default logoff of a desk that cannot log off yet says so.
        let error = request_log_off(&connection, &request.user, deadline)
            .await
            .unwrap_err();
        assert!(
            crate::error_chain(&error).contains("cannot log alice off yet"),
            "{error}"
        );
        serving.abort();

        // A hosting server that sends back a huge ticket is refused by the asker.
        let lying_host = endpoint(&ca);
        let lying_desk = DeskSlot::default();
        assert!(lying_desk.set(Arc::new(InstantDesk { ticket_len: 10_000 })));
        let (datagrams, _) = mpsc::channel(1);
        let serving = tokio::spawn(Arc::clone(&lying_host).serve(Arc::new(RequestHandler {
            access: Arc::new(Grid { revoked: vec![] }),
            chunks: Arc::new(Chunks),
            desk: lying_desk,
            chunk_limits: Arc::new(ChunkLimits::new(1, 1)),
            datagrams,
        })));
        let connection = broker
            .connection(lying_host.local_addr().unwrap(), lying_host.server_id())
            .await
            .unwrap();
        let error = request_reserve(&connection, &request, deadline)
            .await
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the answer's password is 10000 bytes long, the limit is 253"
        );
        serving.abort();
    }

    #[tokio::test]
    async fn only_members_that_are_not_removed_may_ask_for_a_desktop() {
        let removed = server(9);
        let access: Arc<dyn GridStateAccess> = Arc::new(Grid {
            revoked: vec![removed],
        });
        let desk = DeskSlot::default();
        assert!(desk.set(Arc::new(InstantDesk { ticket_len: 8 })));
        let request = || {
            PeerRequest::Reserve(ReserveRequest {
                user: UserName::new("alice").unwrap(),
                template: crate::model::TemplateName::new("office").unwrap(),
            })
        };
        let joiner = PeerIdentity::Joiner {
            remote: "127.0.0.1:9".parse().unwrap(),
        };
        for (peer, expected) in [
            (joiner, "a join connection may only join"),
            (
                PeerIdentity::Server(removed),
                "this server was removed from the grid",
            ),
        ] {
            match answer_desk(&access, &desk, peer, request()).await {
                PeerResponse::Refused { reason } => assert_eq!(reason, expected),
                other => panic!("not refused: {other:?}"),
            }
        }
        assert!(matches!(
            answer_desk(&access, &desk, PeerIdentity::Server(server(1)), request()).await,
            PeerResponse::Reserved(_)
        ));
    }
}
