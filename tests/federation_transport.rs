//! The QUIC transport over real loopback sockets: mutual TLS under a grid
//! CA, revocation, CA-pinned joins, framing limits and deadlines.
//!
//! Certificates are made here with rcgen directly (a CA and servers with the
//! SAN URI `urn:deskgrid:server:<uuid>` and the DNS name `<uuid>.deskgrid`),
//! so these tests do not depend on the identity module. Raw quinn appears
//! where a test must speak to the server the way a broken or hostile client
//! would.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use deskgrid::federation::transport::{
    BoxFuture, JoinConnection, PeerEndpoint, PeerHandler, PeerIdentity, Revocations, TlsMaterial,
    TransportError, ALPN_PEER, CLOSE_PEER_CERTIFICATE_REQUIRED, CLOSE_REVOKED,
    MAX_JOIN_REQUEST_BYTES, MAX_MESSAGE_BYTES, RESET_MALFORMED_FRAME, RESET_MESSAGE_TOO_LARGE,
};
use deskgrid::model::ServerId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Generous for loopback; tests that wait for a failure use their own.
const DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// Certificates

/// A grid CA made with rcgen.
struct TestCa {
    certificate: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> anyhow::Result<Self> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, name);
        params.distinguished_name = subject;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let certificate = params.self_signed(&key)?;
        Ok(Self { certificate, key })
    }

    fn der(&self) -> CertificateDer<'static> {
        self.certificate.der().clone()
    }

    fn pin(&self) -> [u8; 32] {
        Sha256::digest(self.certificate.der()).into()
    }

    /// A server certificate for `server`, signed by this CA, with the chain
    /// [server, CA] and `trusted_ca` as the root the server trusts.
    fn server_material(
        &self,
        server: ServerId,
        trusted_ca: &TestCa,
    ) -> anyhow::Result<TlsMaterial> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, format!("deskgrid server {server}"));
        params.distinguished_name = subject;
        params.subject_alt_names = vec![
            SanType::URI(format!("urn:deskgrid:server:{server}").try_into()?),
            SanType::DnsName(format!("{server}.deskgrid").try_into()?),
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let certificate = params.signed_by(&key, &self.certificate, &self.key)?;
        Ok(TlsMaterial {
            ca_cert: trusted_ca.der(),
            cert_chain: vec![certificate.der().clone(), self.der()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        })
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

// ---------------------------------------------------------------------------
// A handler that records what reached it

/// Echoes requests, except: `slow…` sleeps before answering, `count…`
/// answers with the request's length.
struct RecordingHandler {
    requests: Mutex<Vec<(PeerIdentity, usize)>>,
    datagrams: mpsc::UnboundedSender<(ServerId, Bytes)>,
}

impl RecordingHandler {
    fn requests(&self) -> Vec<(PeerIdentity, usize)> {
        self.requests
            .lock()
            .expect("no test panics holding it")
            .clone()
    }
}

impl PeerHandler for RecordingHandler {
    fn handle_request(&self, peer: PeerIdentity, request: Vec<u8>) -> BoxFuture<Vec<u8>> {
        self.requests
            .lock()
            .expect("no test panics holding it")
            .push((peer, request.len()));
        Box::pin(async move {
            if request.starts_with(b"slow") {
                tokio::time::sleep(Duration::from_secs(10)).await;
                request
            } else if request.starts_with(b"count") {
                (request.len() as u64).to_le_bytes().to_vec()
            } else {
                request
            }
        })
    }

    fn handle_datagram(&self, peer: ServerId, datagram: Bytes) {
        // The receiver lives as long as the test that reads it.
        let _ = self.datagrams.send((peer, datagram));
    }
}

/// A serving endpoint of the grid `ca`.
struct TestServer {
    id: ServerId,
    addr: SocketAddr,
    endpoint: Arc<PeerEndpoint>,
    handler: Arc<RecordingHandler>,
    datagrams: mpsc::UnboundedReceiver<(ServerId, Bytes)>,
}

impl TestServer {
    fn start(tls: TlsMaterial, revocations: Revocations) -> anyhow::Result<Self> {
        let endpoint = Arc::new(PeerEndpoint::bind(loopback(), tls, revocations)?);
        let (sender, datagrams) = mpsc::unbounded_channel();
        let handler = Arc::new(RecordingHandler {
            requests: Mutex::new(Vec::new()),
            datagrams: sender,
        });
        tokio::spawn(endpoint.clone().serve(handler.clone()));
        Ok(Self {
            id: endpoint.server_id(),
            addr: endpoint.local_addr()?,
            endpoint,
            handler,
            datagrams,
        })
    }

    fn of_grid(ca: &TestCa) -> anyhow::Result<Self> {
        Self::start(
            ca.server_material(ServerId::random(), ca)?,
            Revocations::default(),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.endpoint.close();
    }
}

/// A client-only endpoint of the grid `ca` (it serves nothing).
fn client_of(ca: &TestCa) -> anyhow::Result<PeerEndpoint> {
    Ok(PeerEndpoint::bind(
        loopback(),
        ca.server_material(ServerId::random(), ca)?,
        Revocations::default(),
    )?)
}

// ---------------------------------------------------------------------------
// Raw quinn, for clients deskgrid itself would never be

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A quinn client that trusts `ca`, offers `alpn`, and presents `tls`'s
/// certificate when given one.
async fn raw_connect(
    ca: &TestCa,
    server: &TestServer,
    alpn: &[u8],
    client_certificate: Option<TlsMaterial>,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der())?;
    let builder = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match client_certificate {
        Some(material) => builder.with_client_auth_cert(material.cert_chain, material.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let endpoint = quinn::Endpoint::client(loopback())?;
    let connection = endpoint
        .connect_with(config, server.addr, &format!("{}.deskgrid", server.id))?
        .await?;
    Ok((endpoint, connection))
}

/// Sends `bytes` raw on a new stream, finishes, and reads what comes back.
async fn raw_exchange(
    connection: &quinn::Connection,
    bytes: &[u8],
) -> Result<Vec<u8>, quinn::ReadToEndError> {
    let (mut send, mut recv) = connection
        .open_bi()
        .await
        .map_err(quinn::ReadError::ConnectionLost)?;
    send.write_all(bytes)
        .await
        .map_err(|_| quinn::ReadError::ClosedStream)?;
    send.finish().map_err(|_| quinn::ReadError::ClosedStream)?;
    recv.read_to_end(64 * 1024).await
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

// ---------------------------------------------------------------------------
// Two servers of one grid

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_of_one_grid_exchange_requests_and_datagrams() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let mut server = TestServer::of_grid(&ca)?;
    let client = client_of(&ca)?;

    let peer = client.connection(server.addr, server.id).await?;
    assert_eq!(peer.remote_id(), server.id);
    assert_eq!(peer.remote_address(), server.addr);

    let response = peer.request(b"hello", DEADLINE).await?;
    assert_eq!(response, b"hello");

    // 10 MiB both ways.
    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let response = peer.request(&big, DEADLINE).await?;
    assert!(response == big, "the 10 MiB echo came back different");

    // The server knows who asked from the certificate alone.
    let requests = server.handler.requests();
    assert_eq!(
        requests,
        [
            (PeerIdentity::Server(client.server_id()), 5),
            (PeerIdentity::Server(client.server_id()), big.len()),
        ]
    );

    let max_datagram = peer
        .max_datagram_size()
        .context("the server accepts datagrams")?;
    eprintln!("max datagram size on loopback: {max_datagram} bytes");
    assert!(max_datagram >= 1100, "{max_datagram}");
    peer.send_datagram(Bytes::from_static(b"ping"))?;
    let (from, datagram) = tokio::time::timeout(DEADLINE, server.datagrams.recv())
        .await?
        .context("the datagram channel stays open")?;
    assert_eq!((from, &datagram[..]), (client.server_id(), &b"ping"[..]));

    // The cache hands out the same connection again.
    let again = client.connection(server.addr, server.id).await?;
    assert_eq!(again.stable_id(), peer.stable_id());
    // After it closes, a new one.
    peer.close();
    let fresh = client.connection(server.addr, server.id).await?;
    assert_ne!(fresh.stable_id(), peer.stable_id());
    assert_eq!(fresh.request(b"again", DEADLINE).await?, b"again");
    Ok(())
}

// ---------------------------------------------------------------------------
// Who may talk

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_from_another_ca_is_rejected_both_ways() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let foreign_ca = TestCa::new("another grid")?;
    let server = TestServer::of_grid(&ca)?;
    let foreign_server = TestServer::of_grid(&foreign_ca)?;

    // We connect to a server of another grid: its certificate does not verify.
    let client = client_of(&ca)?;
    let error = client
        .connect(foreign_server.addr, foreign_server.id)
        .await
        .err()
        .context("a foreign server must be refused")?;
    assert!(
        matches!(error, TransportError::UntrustedCertificate { .. }),
        "{error:?}"
    );
    eprintln!("foreign server: {}", deskgrid::error_chain(&error));

    // A client of another grid that trusts our CA (so it gets past its own
    // check) but presents its foreign certificate: our server refuses it.
    let intruder = PeerEndpoint::bind(
        loopback(),
        foreign_ca.server_material(ServerId::random(), &ca)?,
        Revocations::default(),
    )?;
    let outcome = async {
        intruder
            .connect(server.addr, server.id)
            .await?
            .request(b"let me in", DEADLINE)
            .await
    }
    .await;
    let error = outcome.err().context("a foreign client must be refused")?;
    assert!(
        matches!(
            error,
            TransportError::Handshake { .. } | TransportError::ConnectionLost { .. }
        ),
        "{error:?}"
    );
    eprintln!("foreign client: {}", deskgrid::error_chain(&error));
    assert_eq!(server.handler.requests(), []);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_server_is_refused() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server_revocations = Revocations::default();
    let server = TestServer::start(
        ca.server_material(ServerId::random(), &ca)?,
        server_revocations.clone(),
    )?;
    let client = client_of(&ca)?;

    // Revoked before it connects: the server closes right after the handshake.
    server_revocations.revoke(client.server_id());
    let outcome = async {
        client
            .connect(server.addr, server.id)
            .await?
            .request(b"hello", DEADLINE)
            .await
    }
    .await;
    match outcome {
        Err(TransportError::ClosedByPeer { code, .. }) => {
            assert_eq!(code, u64::from(CLOSE_REVOKED));
        }
        other => anyhow::bail!("expected a close for revocation, got {other:?}"),
    }

    // Revoked while connected: refused at its next request.
    server_revocations.replace_all([]);
    let peer = client.connection(server.addr, server.id).await?;
    assert_eq!(peer.request(b"one", DEADLINE).await?, b"one");
    server_revocations.revoke(client.server_id());
    match peer.request(b"two", DEADLINE).await {
        Err(TransportError::ClosedByPeer { code, .. }) => {
            assert_eq!(code, u64::from(CLOSE_REVOKED));
        }
        other => anyhow::bail!("expected a close for revocation, got {other:?}"),
    }
    assert_eq!(
        server.handler.requests(),
        [(PeerIdentity::Server(client.server_id()), 3)]
    );

    // The client side refuses to talk to a server it knows is revoked.
    client.revocations().revoke(server.id);
    let error = client
        .connect(server.addr, server.id)
        .await
        .err()
        .context("connecting to a revoked server must fail")?;
    assert!(
        matches!(error, TransportError::Revoked { server: id } if id == server.id),
        "{error:?}"
    );
    let error = peer
        .request(b"three", DEADLINE)
        .await
        .err()
        .context("a cached connection to a revoked server must refuse")?;
    assert!(matches!(error, TransportError::Revoked { .. }), "{error:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_a_server_that_is_not_the_expected_one() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;
    let client = client_of(&ca)?;
    let expected = ServerId::random();
    let error = client
        .connect(server.addr, expected)
        .await
        .err()
        .context("a different server must be refused")?;
    match &error {
        TransportError::UnexpectedServer {
            expected: wanted,
            actual,
            ..
        } => {
            assert_eq!((*wanted, *actual), (expected, server.id));
        }
        other => anyhow::bail!("expected UnexpectedServer, got {other:?}"),
    }
    eprintln!("{error}");
    assert_eq!(server.handler.requests(), []);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_an_address_learns_the_server_from_its_certificate() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;
    let client = client_of(&ca)?;

    // A seed: only its address is known.
    let peer = client.connect_to_address(server.addr).await?;
    assert_eq!(peer.remote_id(), server.id);
    assert_eq!(peer.request(b"hello", DEADLINE).await?, b"hello");
    assert_eq!(
        server.handler.requests(),
        [(PeerIdentity::Server(client.server_id()), 5)],
        "the server knows the client from its certificate too"
    );

    // Cached under the id it proved: dialling the id or the address again
    // reuses that connection.
    let seed = client.connection_to_address(server.addr).await?;
    assert_eq!(seed.remote_id(), server.id);
    let by_id = client.connection(server.addr, server.id).await?;
    assert_eq!(by_id.stable_id(), seed.stable_id());
    assert_eq!(
        client.connection_to_address(server.addr).await?.stable_id(),
        seed.stable_id()
    );

    // Our own address names ourselves: the caller sees whom it reached.
    let itself = TestServer::of_grid(&ca)?;
    let own = itself.endpoint.connect_to_address(itself.addr).await?;
    assert_eq!(own.remote_id(), itself.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialling_an_address_refuses_another_ca_and_a_revoked_server() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let foreign_ca = TestCa::new("another grid")?;
    let server = TestServer::of_grid(&ca)?;
    let foreign_server = TestServer::of_grid(&foreign_ca)?;
    let client = client_of(&ca)?;

    let error = client
        .connect_to_address(foreign_server.addr)
        .await
        .err()
        .context("a server of another grid must be refused")?;
    assert!(
        matches!(error, TransportError::UntrustedCertificate { .. }),
        "{error:?}"
    );
    assert_eq!(foreign_server.handler.requests(), []);

    client.revocations().revoke(server.id);
    for cached in [false, true] {
        let outcome = if cached {
            client.connection_to_address(server.addr).await
        } else {
            client.connect_to_address(server.addr).await
        };
        let error = outcome
            .err()
            .context("a revoked server must be refused by address too")?;
        assert!(
            matches!(error, TransportError::Revoked { server: id } if id == server.id),
            "{error:?}"
        );
    }
    assert_eq!(server.handler.requests(), []);

    // A live connection made before the revocation is not handed out either.
    client.revocations().replace_all([]);
    let before = client.connection_to_address(server.addr).await?;
    client.revocations().revoke(server.id);
    let error = client
        .connection_to_address(server.addr)
        .await
        .err()
        .context("the cached connection of a revoked server must not be reused")?;
    assert!(matches!(error, TransportError::Revoked { .. }), "{error:?}");
    assert!(matches!(
        before.request(b"hello", DEADLINE).await,
        Err(TransportError::Revoked { .. })
    ));
    Ok(())
}

// ---------------------------------------------------------------------------
// Joining

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_with_the_right_pin_talks_without_a_certificate() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;

    let join: JoinConnection =
        PeerEndpoint::connect_for_join(server.addr, ca.pin(), DEADLINE).await?;
    assert_eq!(join.seed_id(), server.id);
    assert_eq!(join.remote_address(), server.addr);
    let response = join.request(b"join secret", DEADLINE).await?;
    assert_eq!(response, b"join secret");
    let requests = server.handler.requests();
    assert!(
        matches!(requests.as_slice(), [(PeerIdentity::Joiner { .. }, 11)]),
        "{requests:?}"
    );

    // A joiner's request is small.
    let error = join
        .request(&vec![0; MAX_JOIN_REQUEST_BYTES + 1], DEADLINE)
        .await
        .err()
        .context("an oversized join request must be refused")?;
    assert!(
        matches!(error, TransportError::MessageTooLarge { .. }),
        "{error:?}"
    );
    join.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_with_a_wrong_pin_stops_before_sending_anything() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let other_ca = TestCa::new("someone else's grid")?;
    let server = TestServer::of_grid(&ca)?;

    let error = PeerEndpoint::connect_for_join(server.addr, other_ca.pin(), DEADLINE)
        .await
        .err()
        .context("a wrong pin must be refused")?;
    match &error {
        TransportError::CaPinMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, &hex::encode(other_ca.pin()));
            assert_eq!(actual, &hex::encode(ca.pin()));
        }
        other => anyhow::bail!("expected CaPinMismatch, got {other:?}"),
    }
    eprintln!("{error}");
    // Give a request that should not exist the time to arrive.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.handler.requests(), []);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_that_does_not_speak_quic_times_out_within_the_deadline() -> anyhow::Result<()> {
    let listener = tokio::net::UdpSocket::bind(loopback()).await?;
    let addr = listener.local_addr()?;
    // Reads and ignores whatever comes, like a service that is not ours.
    let sink = tokio::spawn(async move {
        let mut buffer = [0u8; 2048];
        while listener.recv_from(&mut buffer).await.is_ok() {}
    });

    let deadline = Duration::from_millis(500);
    let started = Instant::now();
    let error = PeerEndpoint::connect_for_join(addr, [0; 32], deadline)
        .await
        .err()
        .context("a udp listener that is not quic cannot be joined")?;
    let elapsed = started.elapsed();
    assert!(
        matches!(error, TransportError::HandshakeTimeout { .. }),
        "{error:?}"
    );
    assert!(elapsed < deadline + Duration::from_secs(1), "{elapsed:?}");
    eprintln!("{error} (after {elapsed:?})");
    sink.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_server_with_another_alpn_is_not_a_seed() -> anyhow::Result<()> {
    let ca = TestCa::new("elsewhere")?;
    let material = ca.server_material(ServerId::random(), &ca)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(material.cert_chain, material.key)?;
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    ));
    let other = quinn::Endpoint::server(config, loopback())?;
    let addr = other.local_addr()?;
    let accepting = tokio::spawn(async move {
        while let Some(incoming) = other.accept().await {
            let _ = incoming.await;
        }
    });

    let error = PeerEndpoint::connect_for_join(addr, ca.pin(), DEADLINE)
        .await
        .err()
        .context("a server without our alpn is not a seed")?;
    assert!(
        matches!(error, TransportError::NotDeskgrid { .. }),
        "{error:?}"
    );
    eprintln!("{error}");
    accepting.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_connection_without_a_certificate_is_refused() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;

    let (_endpoint, connection) = raw_connect(&ca, &server, ALPN_PEER, None).await?;
    let closed = tokio::time::timeout(DEADLINE, connection.closed()).await?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(
                close.error_code,
                quinn::VarInt::from_u32(CLOSE_PEER_CERTIFICATE_REQUIRED)
            );
        }
        other => anyhow::bail!("expected an application close, got {other:?}"),
    }
    assert_eq!(server.handler.requests(), []);
    Ok(())
}

// ---------------------------------------------------------------------------
// Frames, limits, deadlines

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_is_refused_with_its_size() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;
    let client = client_of(&ca)?;
    let peer = client.connection(server.addr, server.id).await?;

    let oversized = vec![0u8; MAX_MESSAGE_BYTES + 1];
    let error = peer
        .request(&oversized, DEADLINE)
        .await
        .err()
        .context("a request over the limit must be refused")?;
    assert!(
        matches!(
            error,
            TransportError::MessageTooLarge { size, limit }
                if size == oversized.len() as u64 && limit == MAX_MESSAGE_BYTES
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().contains(&oversized.len().to_string()),
        "{error}"
    );
    eprintln!("{error}");
    assert_eq!(server.handler.requests(), []);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_reset_their_stream_and_nothing_else() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;
    let material = ca.server_material(ServerId::random(), &ca)?;
    let (_endpoint, connection) = raw_connect(&ca, &server, ALPN_PEER, Some(material)).await?;

    let reset_code = |result: Result<Vec<u8>, quinn::ReadToEndError>| match result {
        Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))) => Ok(code),
        other => Err(anyhow::anyhow!("expected a stream reset, got {other:?}")),
    };
    // A length prefix far over the limit.
    let code = reset_code(raw_exchange(&connection, &u32::MAX.to_le_bytes()).await)?;
    assert_eq!(code, quinn::VarInt::from_u32(RESET_MESSAGE_TOO_LARGE));
    // A frame that promises 100 bytes and brings 10.
    let mut truncated = 100u32.to_le_bytes().to_vec();
    truncated.extend_from_slice(&[7; 10]);
    let code = reset_code(raw_exchange(&connection, &truncated).await)?;
    assert_eq!(code, quinn::VarInt::from_u32(RESET_MALFORMED_FRAME));
    // A header cut short.
    let code = reset_code(raw_exchange(&connection, &[1, 2]).await)?;
    assert_eq!(code, quinn::VarInt::from_u32(RESET_MALFORMED_FRAME));
    // Bytes after the frame.
    let mut trailing = frame(b"ok");
    trailing.push(0);
    let code = reset_code(raw_exchange(&connection, &trailing).await)?;
    assert_eq!(code, quinn::VarInt::from_u32(RESET_MALFORMED_FRAME));
    assert_eq!(server.handler.requests(), []);

    // The same connection still works, and so does the server.
    let response = raw_exchange(&connection, &frame(b"still here")).await?;
    assert_eq!(response, frame(b"still here"));
    let client = client_of(&ca)?;
    let peer = client.connection(server.addr, server.id).await?;
    assert_eq!(peer.request(b"valid", DEADLINE).await?, b"valid");
    assert_eq!(server.handler.requests().len(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handler_hits_the_deadline() -> anyhow::Result<()> {
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;
    let client = client_of(&ca)?;
    let peer = client.connection(server.addr, server.id).await?;

    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    let error = peer
        .request(b"slow please", deadline)
        .await
        .err()
        .context("the handler sleeps past the deadline")?;
    let elapsed = started.elapsed();
    assert!(
        matches!(error, TransportError::Timeout { deadline: d, .. } if d == deadline),
        "{error:?}"
    );
    assert!(elapsed < deadline + Duration::from_secs(1), "{elapsed:?}");
    eprintln!("{error}");
    // The connection outlives the abandoned request.
    assert_eq!(peer.request(b"quick", DEADLINE).await?, b"quick");
    Ok(())
}

/// Sends 64 MiB in 2 MiB requests and prints the rate (for the record; it
/// asserts only that every byte arrived). In a debug build this measures
/// mostly unoptimized crypto and copying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_of_64_mib_in_2_mib_requests() -> anyhow::Result<()> {
    const TOTAL: usize = 64 * 1024 * 1024;
    const CHUNK: usize = 2 * 1024 * 1024;
    let ca = TestCa::new("grid")?;
    let server = TestServer::of_grid(&ca)?;
    let client = client_of(&ca)?;
    let peer = client.connection(server.addr, server.id).await?;

    let mut chunk = vec![0u8; CHUNK];
    chunk[..5].copy_from_slice(b"count");
    let started = Instant::now();
    let mut received = 0u64;
    for _ in 0..TOTAL / CHUNK {
        let response = peer.request(&chunk, DEADLINE).await?;
        let counted: [u8; 8] = response
            .as_slice()
            .try_into()
            .context("the count is 8 bytes")?;
        received += u64::from_le_bytes(counted);
    }
    let elapsed = started.elapsed();
    assert_eq!(received, TOTAL as u64);
    eprintln!(
        "64 MiB in 2 MiB requests over loopback: {:.1} MB/s ({elapsed:?}, {} build)",
        TOTAL as f64 / 1e6 / elapsed.as_secs_f64(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    Ok(())
}
