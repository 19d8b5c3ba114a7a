//! The QUIC transport between appliances: one quinn endpoint per appliance,
//! mutual TLS under the grid CA, framed request/response streams, datagrams,
//! and the CA-pinned connection a joining server uses before it has a
//! certificate. The only file in deskgrid that names `quinn`.
//!
//! # Wire format
//!
//! One bidirectional QUIC stream per request. Each side writes one frame —
//! a `u32` little-endian length and that many payload bytes — and finishes
//! its half of the stream. Payloads are opaque here (callers put versioned
//! CBOR envelopes in them). Every frame is bounded: [`MAX_MESSAGE_BYTES`]
//! between servers, [`MAX_JOIN_REQUEST_BYTES`] for requests from a joiner
//! that has not authenticated yet. A malformed frame resets that stream
//! only; the connection and the endpoint keep running.
//!
//! # Who may talk
//!
//! The endpoint accepts two ALPNs. [`ALPN_PEER`] connections must present a
//! client certificate that chains to the grid CA, carries a
//! `urn:deskgrid:server:<uuid>` SAN URI and whose id is not revoked.
//! [`ALPN_JOIN`] connections present no certificate; their requests reach the
//! handler as [`PeerIdentity::Joiner`], and the handler decides (a join token
//! secret). rustls cannot make client authentication depend on ALPN, so the
//! TLS layer verifies a certificate when one is offered and the endpoint
//! checks the ALPN/certificate pairing right after the handshake.
//!
//! A server dials a peer it knows by id ([`PeerEndpoint::connect`]: the
//! certificate must name that id) or, for a seed from `config.toml` whose id
//! it does not know yet, by address ([`PeerEndpoint::connect_to_address`]:
//! any server of the grid that is not revoked). Either way the peer's id is
//! the one its verified certificate carries.
//!
//! Connections are one-way: the side that connects sends requests and
//! datagrams, the side that accepts serves them. Two servers talking both
//! ways hold two connections, one per direction; that keeps "who is asking"
//! answered by the TLS handshake of the connection the request came on.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};

use crate::model::ServerId;

/// ALPN of connections between two servers of a grid (mutual TLS).
pub const ALPN_PEER: &[u8] = b"deskgrid/1";
/// ALPN of a joining server that has no certificate yet.
pub const ALPN_JOIN: &[u8] = b"deskgrid-join/1";

/// Largest frame between servers, request or response. Image chunks and state
/// snapshots travel in pieces well below this; a bigger frame is a bug or an
/// attack, and the limit bounds what one stream can make us buffer.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;
/// Largest request from an unauthenticated joiner: a join request is a token
/// secret, a name and some addresses — a few hundred bytes. Anyone on the
/// network can open a join connection, so this stays small.
pub const MAX_JOIN_REQUEST_BYTES: usize = 64 * 1024;

/// The prefix of the SAN URI that names a server in its certificate.
pub const SERVER_ID_URI_PREFIX: &str = "urn:deskgrid:server:";
/// The DNS-name suffix in a server certificate (`<uuid>.deskgrid`).
pub const SERVER_DNS_SUFFIX: &str = "deskgrid";

/// Application close code: an [`ALPN_PEER`] connection came without a client
/// certificate.
pub const CLOSE_PEER_CERTIFICATE_REQUIRED: u32 = 1;
/// Application close code: the other side's server id is revoked.
pub const CLOSE_REVOKED: u32 = 2;
/// Application close code: the certificate has no readable server id.
pub const CLOSE_NO_SERVER_ID: u32 = 3;
/// Application close code: the server is not the one the client asked for.
pub const CLOSE_UNEXPECTED_SERVER: u32 = 4;
/// Application close code: the endpoint is shutting down.
pub const CLOSE_SHUTDOWN: u32 = 5;

/// Stream reset code: a frame was truncated or had trailing bytes.
pub const RESET_MALFORMED_FRAME: u32 = 1;
/// Stream reset code: a frame's length was over the limit.
pub const RESET_MESSAGE_TOO_LARGE: u32 = 2;
/// Stream reset code: the request took longer than [`REQUEST_READ_TIMEOUT`]
/// to arrive.
pub const RESET_READ_TIMEOUT: u32 = 3;

/// Incoming request streams one connection may have open at once. Each may
/// hold up to [`MAX_MESSAGE_BYTES`] while its handler runs, so this bounds
/// what one peer can make us hold (64 × 32 MiB in the worst case); further
/// streams wait in the peer's `open_bi` until one finishes.
const MAX_CONCURRENT_REQUESTS: u32 = 64;
/// A connection with no packets for this long is dead. Keep-alives every
/// [`KEEP_ALIVE_INTERVAL`] mean three must be lost in a row first; membership
/// (SWIM over datagrams) notices a dead server sooner and on its own.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keeps idle connections (and NAT bindings between sites) open.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long [`PeerEndpoint::connect`] waits for the handshake. A grid's
/// servers are on a LAN or a few WAN hops away: several round trips of
/// retransmitted Initials fit.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server waits for a whole request frame once its stream is
/// open, so a stalled peer cannot pin stream slots forever.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// UDP socket buffers. With the OS default (208 KiB) the receiver drops
/// packets under load (measured, DESIGN.md section 10); 4 MiB absorbs a
/// burst of a full congestion window on a LAN.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// A payload buffer grows as bytes arrive rather than trusting the length
/// prefix for one large allocation.
const INITIAL_PAYLOAD_CAPACITY: usize = 64 * 1024;

/// The certificates and key of one server.
pub struct TlsMaterial {
    /// The grid CA: the only root peers are verified against.
    pub ca_cert: CertificateDer<'static>,
    /// This server's certificate first; the CA certificate is appended when
    /// it is not already last, because joiners check their pin against the
    /// last certificate of the chain.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// This server's private key.
    pub key: PrivateKeyDer<'static>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("TlsMaterial")
            .field(
                "ca_cert_sha256",
                &hex::encode(Sha256::digest(&self.ca_cert)),
            )
            .field("n_chain_certs", &self.cert_chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The revoked server ids, shared between the endpoint, its connections and
/// whoever learns of revocations (the replicated state). Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    revoked: Arc<RwLock<BTreeSet<ServerId>>>,
}

impl Revocations {
    /// Revokes one server.
    pub fn revoke(&self, server: ServerId) {
        self.revoked
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(server);
    }

    /// Whether `server` is revoked.
    pub fn contains(&self, server: ServerId) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&server)
    }

    /// Replaces the whole set (after the replicated state changed).
    pub fn replace_all(&self, servers: impl IntoIterator<Item = ServerId>) {
        let servers: BTreeSet<ServerId> = servers.into_iter().collect();
        *self.revoked.write().unwrap_or_else(PoisonError::into_inner) = servers;
    }
}

/// Who sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A server of the grid, proven by its certificate.
    Server(ServerId),
    /// Someone without a certificate on an [`ALPN_JOIN`] connection: trust
    /// nothing it says until it has proven a join token.
    Joiner { remote: SocketAddr },
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerIdentity::Server(server) => write!(formatter, "server {server}"),
            PeerIdentity::Joiner { remote } => write!(formatter, "joiner at {remote}"),
        }
    }
}

/// A boxed future, so [`PeerHandler`] stays object-safe without `async_trait`.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the endpoint calls for incoming traffic. Implemented above the
/// transport (the federation's RPC dispatch); requests and responses are
/// opaque bytes here.
pub trait PeerHandler: Send + Sync {
    /// Answers one request. Runs on its own task; several run at once.
    /// A response over [`MAX_MESSAGE_BYTES`] is not sent (the stream is reset).
    fn handle_request(&self, peer: PeerIdentity, request: Vec<u8>) -> BoxFuture<Vec<u8>>;

    /// Takes one datagram from a server. Called inline on the connection's
    /// datagram loop: hand it off, do not block. Joiners cannot send these.
    fn handle_datagram(&self, peer: ServerId, datagram: Bytes);
}

/// Errors of the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind a udp socket on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the grid ca certificate is not usable as a trust anchor")]
    InvalidCaCertificate {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the tls configuration")]
    TlsConfig {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("certificate carries no deskgrid server id: {problem}")]
    NoServerId { problem: &'static str },
    #[error("cannot start a connection to {remote}")]
    Connect {
        remote: SocketAddr,
        #[source]
        source: quinn::ConnectError,
    },
    #[error("no quic handshake with {remote} within {deadline:?}")]
    HandshakeTimeout {
        remote: SocketAddr,
        deadline: Duration,
    },
    #[error("quic handshake with {remote} failed")]
    Handshake {
        remote: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("{remote} speaks quic but not deskgrid (no common alpn)")]
    NotDeskgrid { remote: SocketAddr },
    #[error(
        "the ca of {remote} does not match the pin: expected sha-256 {expected}, got {actual}"
    )]
    CaPinMismatch {
        remote: SocketAddr,
        expected: String,
        actual: String,
    },
    #[error("{remote} did not present its ca certificate at the end of its chain")]
    CaCertificateMissing { remote: SocketAddr },
    #[error("the certificate of {remote} does not verify against the grid ca")]
    UntrustedCertificate {
        remote: SocketAddr,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate of {remote} has no usable server id: {problem}")]
    PeerWithoutServerId {
        remote: SocketAddr,
        problem: &'static str,
    },
    #[error("{remote} is server {actual}, expected {expected}")]
    UnexpectedServer {
        remote: SocketAddr,
        expected: ServerId,
        actual: ServerId,
    },
    #[error("server {server} is revoked")]
    Revoked { server: ServerId },
    #[error("{remote} closed the connection: {meaning} (code {code})")]
    ClosedByPeer {
        remote: SocketAddr,
        code: u64,
        meaning: &'static str,
    },
    #[error("connection to {remote} lost")]
    ConnectionLost {
        remote: SocketAddr,
        #[source]
        source: quinn::ConnectionError,
    },
    #[error("no answer from {remote} within {deadline:?}")]
    Timeout {
        remote: SocketAddr,
        deadline: Duration,
    },
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    MessageTooLarge { size: u64, limit: usize },
    #[error("{remote} refused the request: {meaning} (code {code})")]
    RequestRefused {
        remote: SocketAddr,
        code: u64,
        meaning: &'static str,
    },
    #[error("the response from {remote} ended early")]
    Truncated { remote: SocketAddr },
    #[error("the response from {remote} has bytes after its frame")]
    TrailingBytes { remote: SocketAddr },
    #[error("the request stream to {remote} was closed")]
    StreamClosed { remote: SocketAddr },
    #[error("cannot send a datagram to {remote}")]
    Datagram {
        remote: SocketAddr,
        #[source]
        source: quinn::SendDatagramError,
    },
}

/// What an application close code means, for errors and logs.
fn close_code_meaning(code: u64) -> &'static str {
    match code {
        0 => "closed normally",
        c if c == u64::from(CLOSE_PEER_CERTIFICATE_REQUIRED) => {
            "a client certificate is required for peer connections"
        }
        c if c == u64::from(CLOSE_REVOKED) => "server id revoked",
        c if c == u64::from(CLOSE_NO_SERVER_ID) => "certificate has no server id",
        c if c == u64::from(CLOSE_UNEXPECTED_SERVER) => "not the expected server",
        c if c == u64::from(CLOSE_SHUTDOWN) => "shutting down",
        _ => "unknown reason",
    }
}

/// What a stream reset code means, for errors and logs.
fn reset_code_meaning(code: u64) -> &'static str {
    match code {
        c if c == u64::from(RESET_MALFORMED_FRAME) => "malformed frame",
        c if c == u64::from(RESET_MESSAGE_TOO_LARGE) => "message too large",
        c if c == u64::from(RESET_READ_TIMEOUT) => "request arrived too slowly",
        0 => "cancelled",
        _ => "unknown reason",
    }
}

// ---------------------------------------------------------------------------
// Certificates

/// The server id in a certificate's SAN URI `urn:deskgrid:server:<uuid>`.
/// Exactly one such URI must be present.
fn server_id_from_certificate(certificate: &CertificateDer<'_>) -> Result<ServerId, &'static str> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|_| "not a parsable x.509 certificate")?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|_| "malformed subject alternative name extension")?
        .ok_or("no subject alternative name extension")?;
    let mut ids = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => {
                uri.strip_prefix(SERVER_ID_URI_PREFIX)
            }
            _ => None,
        });
    let id = ids.next().ok_or("no urn:deskgrid:server: uri")?;
    if ids.next().is_some() {
        return Err("more than one urn:deskgrid:server: uri");
    }
    ServerId::from_str(id).map_err(|_| "the server uri does not hold a uuid")
}

/// The name a server's certificate is verified for: `<uuid>.deskgrid`.
fn server_name(server: ServerId) -> ServerName<'static> {
    ServerName::try_from(format!("{server}.{SERVER_DNS_SUFFIX}"))
        .expect("a hyphenated uuid followed by .deskgrid is a valid dns name")
}

/// The ring provider, named explicitly so the process-wide default (and
/// which crypto features other crates enable) does not matter.
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config_error(source: impl std::error::Error + Send + Sync + 'static) -> TransportError {
    TransportError::TlsConfig {
        source: Box::new(source),
    }
}

/// Why our own server-certificate verifier refused, kept so the caller gets a
/// precise [`TransportError`] instead of a TLS alert code.
#[derive(Debug, Clone)]
enum VerifyFailure {
    NoServerId(&'static str),
    Untrusted(rustls::Error),
    UnexpectedServer { actual: ServerId },
    Revoked(ServerId),
    CaMissing,
    CaPinMismatch { actual: [u8; 32] },
}

/// What a server certificate must prove.
#[derive(Debug)]
enum Expectation {
    /// A peer connection: chains to the grid CA, names a server that is not
    /// revoked, and that server is `expected` when one is given (`None`:
    /// dialling an address, such as a seed, whose server is not known yet).
    Server {
        grid_verifier: Arc<WebPkiServerVerifier>,
        expected: Option<ServerId>,
        revocations: Revocations,
    },
    /// A join connection: the chain ends in a CA with this SHA-256, and the
    /// leaf is signed by it and names the server in its SAN URI.
    PinnedCa { ca_pin: [u8; 32] },
}

/// The server-certificate verifier of outgoing connections: webpki for the
/// chain, then deskgrid's own rules. One per connection attempt, so the
/// failure and the verified id belong to that attempt.
#[derive(Debug)]
struct GridServerVerifier {
    provider: Arc<CryptoProvider>,
    expectation: Expectation,
    outcome: Mutex<Option<Result<ServerId, VerifyFailure>>>,
}

impl GridServerVerifier {
    fn new(provider: Arc<CryptoProvider>, expectation: Expectation) -> Arc<Self> {
        Arc::new(Self {
            provider,
            expectation,
            outcome: Mutex::new(None),
        })
    }

    fn outcome(&self) -> Option<Result<ServerId, VerifyFailure>> {
        self.outcome
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerId, VerifyFailure> {
        let server = server_id_from_certificate(end_entity).map_err(VerifyFailure::NoServerId)?;
        // Verified for the name the SAN URI implies, so the URI and the DNS
        // name of the certificate cannot disagree.
        let name = server_name(server);
        match &self.expectation {
            Expectation::Server {
                grid_verifier,
                expected,
                revocations,
            } => {
                grid_verifier
                    .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
                    .map_err(VerifyFailure::Untrusted)?;
                if expected.is_some_and(|expected| expected != server) {
                    return Err(VerifyFailure::UnexpectedServer { actual: server });
                }
                if revocations.contains(server) {
                    return Err(VerifyFailure::Revoked(server));
                }
            }
            Expectation::PinnedCa { ca_pin } => {
                let (ca, rest) = intermediates.split_last().ok_or(VerifyFailure::CaMissing)?;
                let actual: [u8; 32] = Sha256::digest(ca).into();
                if actual != *ca_pin {
                    return Err(VerifyFailure::CaPinMismatch { actual });
                }
                let mut roots = RootCertStore::empty();
                roots
                    .add(ca.clone().into_owned())
                    .map_err(VerifyFailure::Untrusted)?;
                let pinned_verifier = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|error| {
                    VerifyFailure::Untrusted(rustls::Error::General(error.to_string()))
                })?;
                pinned_verifier
                    .verify_server_cert(end_entity, rest, &name, ocsp_response, now)
                    .map_err(VerifyFailure::Untrusted)?;
            }
        }
        Ok(server)
    }
}

impl ServerCertVerifier for GridServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let outcome = self.check(end_entity, intermediates, ocsp_response, now);
        *self.outcome.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome.clone());
        match outcome {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(VerifyFailure::Untrusted(error)) => Err(error),
            Err(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn verify_failure_error(
    remote: SocketAddr,
    expected_server: Option<ServerId>,
    ca_pin: Option<[u8; 32]>,
    failure: VerifyFailure,
) -> TransportError {
    match failure {
        VerifyFailure::NoServerId(problem) => {
            TransportError::PeerWithoutServerId { remote, problem }
        }
        VerifyFailure::Untrusted(source) => TransportError::UntrustedCertificate { remote, source },
        VerifyFailure::UnexpectedServer { actual } => match expected_server {
            Some(expected) => TransportError::UnexpectedServer {
                remote,
                expected,
                actual,
            },
            None => TransportError::PeerWithoutServerId {
                remote,
                problem: "unexpected server",
            },
        },
        VerifyFailure::Revoked(server) => TransportError::Revoked { server },
        VerifyFailure::CaMissing => TransportError::CaCertificateMissing { remote },
        VerifyFailure::CaPinMismatch { actual } => TransportError::CaPinMismatch {
            remote,
            expected: ca_pin.map(hex::encode).unwrap_or_default(),
            actual: hex::encode(actual),
        },
    }
}

/// The certificates the other side presented in the handshake.
fn peer_certificates(connection: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    connection
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|certificates| *certificates)
}

fn negotiated_alpn(connection: &quinn::Connection) -> Option<Vec<u8>> {
    connection
        .handshake_data()?
        .downcast::<HandshakeData>()
        .ok()?
        .protocol
}

// ---------------------------------------------------------------------------
// Sockets and QUIC configuration

/// A UDP socket with [`SOCKET_BUFFER_BYTES`] buffers, made with socket2
/// because std cannot set buffer sizes before handing the socket to quinn.
fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // Linux silently caps the size at net.core.rmem_max (and reports double
    // what it grants): say so when the host's limit undercuts ours.
    let granted = socket.recv_buffer_size()?;
    if granted < SOCKET_BUFFER_BYTES {
        warn!(
            granted,
            wanted = SOCKET_BUFFER_BYTES,
            "udp receive buffer capped by the os (raise net.core.rmem_max)"
        );
    }
    Ok(socket.into())
}

fn quic_endpoint(
    addr: SocketAddr,
    server_config: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, TransportError> {
    let socket = udp_socket(addr).map_err(|source| TransportError::Bind { addr, source })?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server_config,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// Transport settings shared by both directions. GSO stays on (quinn's
/// default): 2.5–3.5x faster on loopback here (DESIGN.md section 10).
fn base_transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
            u32::try_from(IDLE_TIMEOUT.as_millis()).expect("the idle timeout fits in u32 ms"),
        ))))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        // deskgrid uses bidirectional streams only.
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport
}

/// Incoming connections: bounded request streams, datagrams accepted.
fn server_transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = base_transport_config();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_CONCURRENT_REQUESTS));
    Arc::new(transport)
}

/// Outgoing connections carry only our requests: the server may not open
/// streams or send datagrams towards us on them (see the module doc).
fn client_transport_config() -> Arc<quinn::TransportConfig> {
    let mut transport = base_transport_config();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
        // `None` would also forbid *sending* datagrams (quinn ties both to
        // this setting); zero advertises that we take no datagram payload.
        .datagram_receive_buffer_size(Some(0));
    Arc::new(transport)
}

/// Waits for a client handshake to finish, turning every failure into a
/// [`TransportError`] that says what went wrong.
async fn finish_handshake(
    connecting: quinn::Connecting,
    remote: SocketAddr,
    deadline: Duration,
    verifier: &GridServerVerifier,
    expected_server: Option<ServerId>,
    ca_pin: Option<[u8; 32]>,
) -> Result<(quinn::Connection, ServerId), TransportError> {
    let result = tokio::time::timeout(deadline, connecting).await;
    let failure = |verifier: &GridServerVerifier| {
        verifier
            .outcome()
            .and_then(Result::err)
            .map(|failure| verify_failure_error(remote, expected_server, ca_pin, failure))
    };
    let connection = match result {
        Err(_) => return Err(TransportError::HandshakeTimeout { remote, deadline }),
        Ok(Err(source)) => {
            if let Some(error) = failure(verifier) {
                return Err(error);
            }
            return Err(match source {
                // TLS alert 120, no_application_protocol: a QUIC server, not ours.
                quinn::ConnectionError::ConnectionClosed(close)
                    if close.error_code == quinn::TransportErrorCode::crypto(120) =>
                {
                    TransportError::NotDeskgrid { remote }
                }
                // The server refused us right after its side of the handshake.
                source @ quinn::ConnectionError::ApplicationClosed(_) => {
                    connection_error(remote, source)
                }
                source => TransportError::Handshake { remote, source },
            });
        }
        Ok(Ok(connection)) => connection,
    };
    match verifier.outcome() {
        Some(Ok(server)) => Ok((connection, server)),
        Some(Err(failure)) => {
            connection.close(quinn::VarInt::from_u32(CLOSE_NO_SERVER_ID), b"");
            Err(verify_failure_error(
                remote,
                expected_server,
                ca_pin,
                failure,
            ))
        }
        None => {
            // rustls verified no certificate: cannot happen with our config,
            // but never hand out an unverified connection.
            connection.close(quinn::VarInt::from_u32(CLOSE_NO_SERVER_ID), b"");
            Err(TransportError::PeerWithoutServerId {
                remote,
                problem: "the server certificate was not verified",
            })
        }
    }
}

// ---------------------------------------------------------------------------
// The endpoint

/// This appliance's QUIC endpoint: serves peers and joiners, and connects to
/// other servers of the grid.
pub struct PeerEndpoint {
    endpoint: quinn::Endpoint,
    server_id: ServerId,
    provider: Arc<CryptoProvider>,
    grid_verifier: Arc<WebPkiServerVerifier>,
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    revocations: Revocations,
    client_transport: Arc<quinn::TransportConfig>,
    /// Live outgoing connections by server id. Two concurrent
    /// [`PeerEndpoint::connection`] calls for one server may both connect;
    /// the later one replaces the earlier in the cache and both work.
    connections: Mutex<BTreeMap<ServerId, quinn::Connection>>,
}

impl fmt::Debug for PeerEndpoint {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PeerEndpoint")
            .field("server_id", &self.server_id)
            .field("local_addr", &self.endpoint.local_addr().ok())
            .field("n_cached_connections", &self.cached_connections().len())
            .finish_non_exhaustive()
    }
}

impl PeerEndpoint {
    /// Binds the endpoint on `addr` with this server's certificates.
    pub fn bind(
        addr: SocketAddr,
        tls: TlsMaterial,
        revoked: Revocations,
    ) -> Result<Self, TransportError> {
        let TlsMaterial {
            ca_cert,
            mut cert_chain,
            key,
        } = tls;
        let leaf = cert_chain.first().ok_or(TransportError::NoServerId {
            problem: "the certificate chain is empty",
        })?;
        let server_id = server_id_from_certificate(leaf)
            .map_err(|problem| TransportError::NoServerId { problem })?;
        if cert_chain.last() != Some(&ca_cert) {
            cert_chain.push(ca_cert.clone());
        }

        let provider = crypto_provider();
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_cert)
            .map_err(|source| TransportError::InvalidCaCertificate { source })?;
        let roots = Arc::new(roots);

        // A certificate that is offered is verified against the grid CA here;
        // whether one was required (ALPN_PEER) is checked after the handshake.
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .allow_unauthenticated()
                .build()
                .map_err(tls_config_error)?;
        let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config_error)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(cert_chain.clone(), key.clone_key())
            .map_err(tls_config_error)?;
        server_tls.alpn_protocols = vec![ALPN_PEER.to_vec(), ALPN_JOIN.to_vec()];
        // Every client config is built per connection attempt, so tickets
        // would never be used.
        server_tls.send_tls13_tickets = 0;
        let quic_server_tls = QuicServerConfig::try_from(server_tls).map_err(tls_config_error)?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_server_tls));
        server_config.transport_config(server_transport_config());

        let grid_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(tls_config_error)?;
        let endpoint = quic_endpoint(addr, Some(server_config))?;
        info!(
            server = %server_id,
            addr = %endpoint.local_addr().unwrap_or(addr),
            "quic endpoint bound"
        );
        Ok(Self {
            endpoint,
            server_id,
            provider,
            grid_verifier,
            cert_chain,
            key,
            revocations: revoked,
            client_transport: client_transport_config(),
            connections: Mutex::new(BTreeMap::new()),
        })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This server's id, from its certificate.
    pub fn server_id(&self) -> ServerId {
        self.server_id
    }

    /// The revocation set this endpoint checks.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Connects to the server `expected` at `addr`: its certificate must
    /// chain to the grid CA, be issued to `<expected>.deskgrid` with the SAN
    /// URI of `expected`, and `expected` must not be revoked. We present our
    /// own certificate. Always a new connection; see [`Self::connection`].
    pub async fn connect(
        &self,
        addr: SocketAddr,
        expected: ServerId,
    ) -> Result<PeerConnection, TransportError> {
        if self.revocations.contains(expected) {
            return Err(TransportError::Revoked { server: expected });
        }
        self.connect_verified(addr, Some(expected)).await
    }

    /// Connects to whichever server of the grid answers at `addr` (a seed
    /// from `config.toml`, whose id is not known yet): its certificate must
    /// chain to the grid CA and be issued to `<id>.deskgrid` with the SAN URI
    /// of that same id, and the id must not be revoked. The connection's
    /// [`PeerConnection::remote_id`] is that id, taken from the verified
    /// certificate, never from anything the server says. It may be this
    /// server's own id when `addr` is our own address. Always a new
    /// connection; see [`Self::connection_to_address`].
    pub async fn connect_to_address(
        &self,
        addr: SocketAddr,
    ) -> Result<PeerConnection, TransportError> {
        self.connect_verified(addr, None).await
    }

    async fn connect_verified(
        &self,
        addr: SocketAddr,
        expected: Option<ServerId>,
    ) -> Result<PeerConnection, TransportError> {
        let verifier = GridServerVerifier::new(
            self.provider.clone(),
            Expectation::Server {
                grid_verifier: self.grid_verifier.clone(),
                expected,
                revocations: self.revocations.clone(),
            },
        );
        let mut client_tls = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_auth_cert(self.cert_chain.clone(), self.key.clone_key())
            .map_err(tls_config_error)?;
        client_tls.alpn_protocols = vec![ALPN_PEER.to_vec()];
        let quic_client_tls = QuicClientConfig::try_from(client_tls).map_err(tls_config_error)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client_tls));
        client_config.transport_config(self.client_transport.clone());

        // Only fills the SNI field: the verifier checks the name the
        // certificate's own URI implies.
        let name = match expected {
            Some(expected) => format!("{expected}.{SERVER_DNS_SUFFIX}"),
            None => format!("peer.{SERVER_DNS_SUFFIX}"),
        };
        let connecting = self
            .endpoint
            .connect_with(client_config, addr, &name)
            .map_err(|source| TransportError::Connect {
                remote: addr,
                source,
            })?;
        let (connection, verified) =
            finish_handshake(connecting, addr, CONNECT_TIMEOUT, &verifier, expected, None).await?;

        // The verifier checked all of this already; read it again from what
        // the connection says it authenticated, so a mistake in one place
        // does not let a wrong server through.
        let presented = peer_certificates(&connection)
            .and_then(|chain| chain.first().map(server_id_from_certificate));
        let server = match presented {
            Some(Ok(server))
                if server == verified && expected.is_none_or(|expected| expected == server) =>
            {
                server
            }
            Some(Ok(actual)) => {
                connection.close(quinn::VarInt::from_u32(CLOSE_UNEXPECTED_SERVER), b"");
                return Err(match expected {
                    Some(expected) => TransportError::UnexpectedServer {
                        remote: addr,
                        expected,
                        actual,
                    },
                    None => TransportError::PeerWithoutServerId {
                        remote: addr,
                        problem: "the certificate presented is not the one verified",
                    },
                });
            }
            Some(Err(problem)) => {
                connection.close(quinn::VarInt::from_u32(CLOSE_NO_SERVER_ID), b"");
                return Err(TransportError::PeerWithoutServerId {
                    remote: addr,
                    problem,
                });
            }
            None => {
                connection.close(quinn::VarInt::from_u32(CLOSE_NO_SERVER_ID), b"");
                return Err(TransportError::PeerWithoutServerId {
                    remote: addr,
                    problem: "no certificate presented",
                });
            }
        };
        if self.revocations.contains(server) {
            connection.close(quinn::VarInt::from_u32(CLOSE_REVOKED), b"");
            return Err(TransportError::Revoked { server });
        }
        debug!(peer = %server, remote = %addr, "connected to peer");
        Ok(PeerConnection {
            connection,
            server,
            revocations: self.revocations.clone(),
        })
    }

    /// A connection to `expected`, reusing a live one from the cache or
    /// connecting to `addr`. A cached connection is reused whatever address
    /// it was made to: the id, not the address, names the server.
    pub async fn connection(
        &self,
        addr: SocketAddr,
        expected: ServerId,
    ) -> Result<PeerConnection, TransportError> {
        if self.revocations.contains(expected) {
            if let Some(connection) = self.cached_connections().remove(&expected) {
                connection.close(quinn::VarInt::from_u32(CLOSE_REVOKED), b"");
            }
            return Err(TransportError::Revoked { server: expected });
        }
        {
            let mut cache = self.cached_connections();
            cache.retain(|_, connection| connection.close_reason().is_none());
            if let Some(connection) = cache.get(&expected) {
                return Ok(PeerConnection {
                    connection: connection.clone(),
                    server: expected,
                    revocations: self.revocations.clone(),
                });
            }
        }
        let peer = self.connect(addr, expected).await?;
        self.cached_connections()
            .insert(expected, peer.connection.clone());
        Ok(peer)
    }

    /// A connection to whichever server of the grid answers at `addr`
    /// (see [`Self::connect_to_address`]): a live cached connection made to
    /// `addr` is reused, else a new one is made and cached under the id its
    /// certificate proved, so later [`Self::connection`] calls for that
    /// server reuse it.
    pub async fn connection_to_address(
        &self,
        addr: SocketAddr,
    ) -> Result<PeerConnection, TransportError> {
        {
            let mut cache = self.cached_connections();
            cache.retain(|_, connection| connection.close_reason().is_none());
            let cached = cache
                .iter()
                .find(|(_, connection)| connection.remote_address() == addr);
            if let Some((server, connection)) = cached {
                if !self.revocations.contains(*server) {
                    return Ok(PeerConnection {
                        connection: connection.clone(),
                        server: *server,
                        revocations: self.revocations.clone(),
                    });
                }
            }
        }
        let peer = self.connect_to_address(addr).await?;
        if peer.server != self.server_id {
            self.cached_connections()
                .insert(peer.server, peer.connection.clone());
        }
        Ok(peer)
    }

    fn cached_connections(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<ServerId, quinn::Connection>> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects to a seed server for joining, from a fresh client-only
    /// endpoint on an ephemeral port, without a certificate. The seed's
    /// chain must end in a CA certificate whose SHA-256 is `ca_pin`, and its
    /// leaf must be signed by that CA and name a server; only then does this
    /// return, so nothing (no join secret) is sent to an impostor.
    /// `deadline` bounds the handshake: a seed that does not speak QUIC
    /// gives [`TransportError::HandshakeTimeout`].
    pub async fn connect_for_join(
        addr: SocketAddr,
        ca_pin: [u8; 32],
        deadline: Duration,
    ) -> Result<JoinConnection, TransportError> {
        let provider = crypto_provider();
        let verifier = GridServerVerifier::new(provider.clone(), Expectation::PinnedCa { ca_pin });
        let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        client_tls.alpn_protocols = vec![ALPN_JOIN.to_vec()];
        let quic_client_tls = QuicClientConfig::try_from(client_tls).map_err(tls_config_error)?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_client_tls));
        client_config.transport_config(client_transport_config());

        let local: SocketAddr = if addr.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = quic_endpoint(local, None)?;
        // The verifier checks the name the certificate's own URI implies;
        // this one only fills the SNI field.
        let connecting = endpoint
            .connect_with(client_config, addr, "join.deskgrid")
            .map_err(|source| TransportError::Connect {
                remote: addr,
                source,
            })?;
        match finish_handshake(connecting, addr, deadline, &verifier, None, Some(ca_pin)).await {
            Ok((connection, seed)) => {
                debug!(seed = %seed, remote = %addr, "join connection established");
                Ok(JoinConnection {
                    endpoint,
                    connection,
                    seed,
                })
            }
            Err(error) => {
                endpoint.close(quinn::VarInt::from_u32(0), b"");
                Err(error)
            }
        }
    }

    /// Serves incoming connections until the endpoint is closed: requests go
    /// to `handler.handle_request`, datagrams from servers to
    /// `handler.handle_datagram`. Spawn it; it returns after [`Self::close`].
    pub async fn serve(self: Arc<Self>, handler: Arc<dyn PeerHandler>) {
        while let Some(incoming) = self.endpoint.accept().await {
            tokio::spawn(serve_connection(
                incoming,
                handler.clone(),
                self.revocations.clone(),
            ));
        }
        debug!(server = %self.server_id, "quic endpoint stopped accepting");
    }

    /// Closes every connection and stops [`Self::serve`].
    pub fn close(&self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), b"shutting down");
    }

    /// Closes, then waits until peers have been told (bounded by quinn to a
    /// few round trips).
    pub async fn shutdown(&self) {
        self.close();
        self.endpoint.wait_idle().await;
    }
}

// ---------------------------------------------------------------------------
// Connections

/// A mutual-TLS connection to another server of the grid.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    connection: quinn::Connection,
    server: ServerId,
    revocations: Revocations,
}

impl PeerConnection {
    /// Sends `payload` as one request and waits for its response, all within
    /// `deadline`.
    pub async fn request(
        &self,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        self.refuse_if_revoked()?;
        request_on(&self.connection, payload, MAX_MESSAGE_BYTES, deadline).await
    }

    /// Sends one unreliable datagram (at most [`Self::max_datagram_size`]).
    pub fn send_datagram(&self, datagram: Bytes) -> Result<(), TransportError> {
        self.refuse_if_revoked()?;
        self.connection
            .send_datagram(datagram)
            .map_err(|source| TransportError::Datagram {
                remote: self.connection.remote_address(),
                source,
            })
    }

    /// The largest datagram the path and the peer currently allow; `None`
    /// when the peer does not take datagrams.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.connection.max_datagram_size()
    }

    /// The server at the other end, proven by its certificate.
    pub fn remote_id(&self) -> ServerId {
        self.server
    }

    /// The address the connection currently talks to.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Identifies the underlying QUIC connection: equal for two handles of
    /// one connection (how the cache is observed in tests and logs).
    pub fn stable_id(&self) -> usize {
        self.connection.stable_id()
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(quinn::VarInt::from_u32(0), b"");
    }

    fn refuse_if_revoked(&self) -> Result<(), TransportError> {
        if self.revocations.contains(self.server) {
            self.connection
                .close(quinn::VarInt::from_u32(CLOSE_REVOKED), b"");
            return Err(TransportError::Revoked {
                server: self.server,
            });
        }
        Ok(())
    }
}

/// A joiner's connection to a seed server whose CA matched the pin.
#[derive(Debug)]
pub struct JoinConnection {
    /// The joiner's own client-only endpoint, kept alive with the connection.
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
    seed: ServerId,
}

impl JoinConnection {
    /// Sends one request (at most [`MAX_JOIN_REQUEST_BYTES`]) and waits for
    /// its response (at most [`MAX_MESSAGE_BYTES`]) within `deadline`.
    pub async fn request(
        &self,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<Vec<u8>, TransportError> {
        if payload.len() > MAX_JOIN_REQUEST_BYTES {
            return Err(TransportError::MessageTooLarge {
                size: payload.len() as u64,
                limit: MAX_JOIN_REQUEST_BYTES,
            });
        }
        request_on(&self.connection, payload, MAX_MESSAGE_BYTES, deadline).await
    }

    /// The seed's server id, from its verified certificate.
    pub fn seed_id(&self) -> ServerId {
        self.seed
    }

    /// The seed's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.connection.remote_address()
    }

    /// Closes the connection and the joiner's endpoint.
    pub async fn close(self) {
        self.connection.close(quinn::VarInt::from_u32(0), b"");
        self.endpoint.wait_idle().await;
    }
}

// ---------------------------------------------------------------------------
// Frames

/// Why a frame could not be read.
#[derive(Debug)]
enum FrameError {
    TooLarge { size: u64 },
    Truncated,
    TrailingBytes,
    Read(quinn::ReadError),
}

async fn write_frame(
    send: &mut quinn::SendStream,
    payload: &[u8],
) -> Result<(), quinn::WriteError> {
    let size = u32::try_from(payload.len())
        .expect("callers check the payload against a limit below u32::MAX");
    send.write_all(&size.to_le_bytes()).await?;
    send.write_all(payload).await
}

/// Reads one frame and the end of the stream after it.
async fn read_frame(recv: &mut quinn::RecvStream, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut header = [0u8; 4];
    recv.read_exact(&mut header)
        .await
        .map_err(|error| match error {
            quinn::ReadExactError::FinishedEarly(_) => FrameError::Truncated,
            quinn::ReadExactError::ReadError(error) => FrameError::Read(error),
        })?;
    let size = u32::from_le_bytes(header);
    let size_bytes = usize::try_from(size).unwrap_or(usize::MAX);
    if size_bytes > limit {
        return Err(FrameError::TooLarge {
            size: u64::from(size),
        });
    }
    let mut payload = Vec::with_capacity(size_bytes.min(INITIAL_PAYLOAD_CAPACITY));
    while payload.len() < size_bytes {
        match recv.read_chunk(size_bytes - payload.len(), true).await {
            Ok(Some(chunk)) => payload.extend_from_slice(&chunk.bytes),
            Ok(None) => return Err(FrameError::Truncated),
            Err(error) => return Err(FrameError::Read(error)),
        }
    }
    match recv.read_chunk(1, true).await {
        Ok(None) => Ok(payload),
        Ok(Some(_)) => Err(FrameError::TrailingBytes),
        Err(error) => Err(FrameError::Read(error)),
    }
}

fn connection_error(remote: SocketAddr, source: quinn::ConnectionError) -> TransportError {
    match source {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let code = close.error_code.into_inner();
            TransportError::ClosedByPeer {
                remote,
                code,
                meaning: close_code_meaning(code),
            }
        }
        source => TransportError::ConnectionLost { remote, source },
    }
}

fn read_error(remote: SocketAddr, error: quinn::ReadError) -> TransportError {
    match error {
        quinn::ReadError::Reset(code) => {
            let code = code.into_inner();
            TransportError::RequestRefused {
                remote,
                code,
                meaning: reset_code_meaning(code),
            }
        }
        quinn::ReadError::ConnectionLost(source) => connection_error(remote, source),
        quinn::ReadError::ClosedStream
        | quinn::ReadError::IllegalOrderedRead
        | quinn::ReadError::ZeroRttRejected => TransportError::StreamClosed { remote },
    }
}

fn write_error(remote: SocketAddr, error: quinn::WriteError) -> TransportError {
    match error {
        quinn::WriteError::Stopped(code) => {
            let code = code.into_inner();
            TransportError::RequestRefused {
                remote,
                code,
                meaning: reset_code_meaning(code),
            }
        }
        quinn::WriteError::ConnectionLost(source) => connection_error(remote, source),
        quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
            TransportError::StreamClosed { remote }
        }
    }
}

/// One request on its own stream: write the frame, finish, read the answer.
async fn request_on(
    connection: &quinn::Connection,
    payload: &[u8],
    response_limit: usize,
    deadline: Duration,
) -> Result<Vec<u8>, TransportError> {
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(TransportError::MessageTooLarge {
            size: payload.len() as u64,
            limit: MAX_MESSAGE_BYTES,
        });
    }
    let remote = connection.remote_address();
    let exchange = async {
        let (mut send, mut recv) = connection
            .open_bi()
            .await
            .map_err(|error| connection_error(remote, error))?;
        write_frame(&mut send, payload)
            .await
            .map_err(|error| write_error(remote, error))?;
        send.finish()
            .map_err(|_| TransportError::StreamClosed { remote })?;
        match read_frame(&mut recv, response_limit).await {
            Ok(response) => Ok(response),
            Err(FrameError::TooLarge { size }) => {
                // Ignore the error: the stream may already be gone.
                let _ = recv.stop(quinn::VarInt::from_u32(RESET_MESSAGE_TOO_LARGE));
                Err(TransportError::MessageTooLarge {
                    size,
                    limit: response_limit,
                })
            }
            Err(FrameError::Truncated) => Err(TransportError::Truncated { remote }),
            Err(FrameError::TrailingBytes) => Err(TransportError::TrailingBytes { remote }),
            Err(FrameError::Read(error)) => Err(read_error(remote, error)),
        }
    };
    // On timeout the streams are dropped: quinn stops our receiving half,
    // which tells the server to stop sending.
    tokio::time::timeout(deadline, exchange)
        .await
        .unwrap_or(Err(TransportError::Timeout { remote, deadline }))
}

// ---------------------------------------------------------------------------
// Serving

/// Finishes the handshake of one incoming connection, decides who it is,
/// then serves its streams (and datagrams, for servers) until it closes.
async fn serve_connection(
    incoming: quinn::Incoming,
    handler: Arc<dyn PeerHandler>,
    revocations: Revocations,
) {
    let remote = incoming.remote_address();
    let connection = match tokio::time::timeout(CONNECT_TIMEOUT, incoming).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(error)) => {
            info!(%remote, error = %error, "incoming quic handshake failed");
            return;
        }
        Err(_) => {
            info!(%remote, "incoming quic handshake timed out");
            return;
        }
    };
    let refuse = |code: u32, reason: &'static str| {
        connection.close(quinn::VarInt::from_u32(code), reason.as_bytes());
    };
    let alpn = negotiated_alpn(&connection);
    let peer = match alpn.as_deref() {
        Some(ALPN_PEER) => {
            // rustls verified the chain if one was presented; here we make
            // sure one was, and that it names a server that is not revoked.
            let Some(chain) = peer_certificates(&connection) else {
                warn!(%remote, "peer connection without a client certificate refused");
                refuse(
                    CLOSE_PEER_CERTIFICATE_REQUIRED,
                    "client certificate required",
                );
                return;
            };
            let server = match chain.first().map(server_id_from_certificate) {
                Some(Ok(server)) => server,
                Some(Err(problem)) => {
                    warn!(%remote, problem, "peer certificate without a server id refused");
                    refuse(CLOSE_NO_SERVER_ID, "certificate has no server id");
                    return;
                }
                None => {
                    warn!(%remote, "peer connection with an empty certificate chain refused");
                    refuse(
                        CLOSE_PEER_CERTIFICATE_REQUIRED,
                        "client certificate required",
                    );
                    return;
                }
            };
            if revocations.contains(server) {
                warn!(peer = %server, %remote, "revoked server refused");
                refuse(CLOSE_REVOKED, "server id revoked");
                return;
            }
            PeerIdentity::Server(server)
        }
        Some(ALPN_JOIN) => PeerIdentity::Joiner { remote },
        // rustls only completes a handshake on one of our ALPNs.
        _ => {
            warn!(%remote, "connection without a deskgrid alpn refused");
            connection.close(quinn::VarInt::from_u32(0), b"no alpn");
            return;
        }
    };
    debug!(%peer, %remote, "incoming connection established");

    if let PeerIdentity::Server(server) = peer {
        tokio::spawn(serve_datagrams(connection.clone(), server, handler.clone()));
    }
    let request_limit = match peer {
        PeerIdentity::Server(_) => MAX_MESSAGE_BYTES,
        PeerIdentity::Joiner { .. } => MAX_JOIN_REQUEST_BYTES,
    };
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(error) => {
                debug!(%peer, error = %error, "incoming connection ended");
                return;
            }
        };
        // A server revoked while connected loses the connection at its next
        // request.
        if let PeerIdentity::Server(server) = peer {
            if revocations.contains(server) {
                warn!(peer = %server, %remote, "connection of a revoked server closed");
                refuse(CLOSE_REVOKED, "server id revoked");
                return;
            }
        }
        tokio::spawn(serve_request(
            send,
            recv,
            peer,
            handler.clone(),
            request_limit,
        ));
    }
}

async fn serve_datagrams(
    connection: quinn::Connection,
    server: ServerId,
    handler: Arc<dyn PeerHandler>,
) {
    loop {
        match connection.read_datagram().await {
            Ok(datagram) => handler.handle_datagram(server, datagram),
            Err(error) => {
                debug!(peer = %server, error = %error, "datagram loop ended");
                return;
            }
        }
    }
}

/// Reads one request frame, runs the handler, writes the response. A bad
/// frame resets this stream only.
async fn serve_request(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: PeerIdentity,
    handler: Arc<dyn PeerHandler>,
    limit: usize,
) {
    let reset = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, code: u32| {
        // Either half may already be closed by the peer; nothing to do then.
        let _ = recv.stop(quinn::VarInt::from_u32(code));
        let _ = send.reset(quinn::VarInt::from_u32(code));
    };
    let request = match tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(&mut recv, limit))
        .await
    {
        Ok(Ok(request)) => request,
        Ok(Err(FrameError::TooLarge { size })) => {
            warn!(%peer, size, limit, "request over the size limit; stream reset");
            reset(&mut send, &mut recv, RESET_MESSAGE_TOO_LARGE);
            return;
        }
        Ok(Err(FrameError::Truncated)) => {
            warn!(%peer, "truncated request frame; stream reset");
            reset(&mut send, &mut recv, RESET_MALFORMED_FRAME);
            return;
        }
        Ok(Err(FrameError::TrailingBytes)) => {
            warn!(%peer, "bytes after the request frame; stream reset");
            reset(&mut send, &mut recv, RESET_MALFORMED_FRAME);
            return;
        }
        Ok(Err(FrameError::Read(error))) => {
            debug!(%peer, error = %error, "request stream failed");
            return;
        }
        Err(_) => {
            warn!(%peer, timeout = ?REQUEST_READ_TIMEOUT, "request did not arrive in time; stream reset");
            reset(&mut send, &mut recv, RESET_READ_TIMEOUT);
            return;
        }
    };
    let response = handler.handle_request(peer, request).await;
    if response.len() > MAX_MESSAGE_BYTES {
        warn!(
            %peer,
            size = response.len(),
            limit = MAX_MESSAGE_BYTES,
            "response over the size limit not sent; stream reset"
        );
        reset(&mut send, &mut recv, RESET_MESSAGE_TOO_LARGE);
        return;
    }
    if let Err(error) = write_frame(&mut send, &response).await {
        debug!(%peer, error = %error, "response not delivered");
        return;
    }
    // Finishing fails only if the peer already stopped the stream.
    let _ = send.finish();
}
