//! TLS for the HTTPS API: its certificate files (made self-signed on first
//! start, or an admin's own pair) and a listener that does the handshakes
//! beside the accept loop, so one slow or broken client never stops it.

use std::future::Future as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::appliance::data_dir::{write_file_atomically, DataDirError};

/// A client has this long to finish its TLS handshake: a healthy one takes
/// a few round trips; a stalled one must not hold a connection slot.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once (handshakes included). Each costs a task and
/// a few tens of KiB of buffers; 256 is far beyond what portals and users
/// of one appliance open together, and keeps a flood from exhausting
/// memory or file descriptors. Beyond it new connections wait in the
/// kernel's backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection that neither reads nor writes for this long is closed:
/// hyper has no header timeout here, and an idle keep-alive or a client
/// that stops mid-request would otherwise hold its slot forever. Longer
/// than the slowest connect (8 servers × 2 s reservation deadline).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the self-signed certificate is valid: no public CA vouches for
/// it (clients pin it with `--cacert`), so it need not be short-lived, and
/// a renewal would make every pinned client fail.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

pub const CERTIFICATE_FILE: &str = "tls-cert.pem";
pub const KEY_FILE: &str = "tls-key.pem";

/// Why the API's TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot {operation} {}", .path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the API certificate")]
    Write(#[from] DataDirError),
    #[error("cannot make the API certificate")]
    Generate(#[source] rcgen::Error),
    #[error("{} holds no PEM certificate", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no PEM private key", .path.display())]
    NoKey { path: PathBuf },
    #[error("{} and {} are not a usable certificate and key", .certificate.display(), .key.display())]
    Unusable {
        certificate: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The API's certificate chain and key, and what clients pin.
#[derive(Debug)]
pub struct ApiCertificate {
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// SHA-256 of the leaf certificate (DER), as hex pairs joined by `:`
    /// (the form `openssl x509 -fingerprint -sha256` prints).
    pub fingerprint: String,
    /// Whether this start made it (it did not exist).
    pub created: bool,
    pub certificate_file: PathBuf,
}

/// `dir/tls-cert.pem` and `dir/tls-key.pem`, made self-signed for `names`
/// (IP addresses and DNS names) when the certificate file is missing; an
/// existing pair is used as it is, so an admin may put their own there.
pub fn load_or_create(dir: &Path, names: &[String]) -> Result<ApiCertificate, TlsSetupError> {
    let certificate_file = dir.join(CERTIFICATE_FILE);
    let key_file = dir.join(KEY_FILE);
    let io_error = |path: &Path, operation| {
        let path = path.to_owned();
        move |source| TlsSetupError::Io {
            path,
            operation,
            source,
        }
    };
    let created = !certificate_file.exists();
    if created {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir, "create directory"))?;
        let (certificate_pem, key_pem) = self_signed(names)?;
        // The key first: a certificate file is what marks the pair complete.
        write_file_atomically(&key_file, key_pem.as_bytes(), 0o600)?;
        write_file_atomically(&certificate_file, certificate_pem.as_bytes(), 0o644)?;
    }
    let certificate_pem =
        std::fs::read(&certificate_file).map_err(io_error(&certificate_file, "read"))?;
    let key_pem = std::fs::read(&key_file).map_err(io_error(&key_file, "read"))?;
    let chain = CertificateDer::pem_slice_iter(&certificate_pem)
        .filter_map(Result::ok)
        .collect::<Vec<_>>();
    let Some(leaf) = chain.first() else {
        return Err(TlsSetupError::NoCertificate {
            path: certificate_file,
        });
    };
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| TlsSetupError::NoKey { path: key_file })?;
    Ok(ApiCertificate {
        chain,
        key,
        fingerprint,
        created,
        certificate_file,
    })
}

/// `AB:CD:..` of the SHA-256 of `certificate`.
pub fn fingerprint(certificate: &CertificateDer<'_>) -> String {
    Sha256::digest(certificate.as_ref())
        .iter()
        .map(|byte| format!("{byte:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A self-signed certificate and its key (PEM) for `names`.
fn self_signed(names: &[String]) -> Result<(String, String), TlsSetupError> {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
        KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    let key_pair =
        KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(TlsSetupError::Generate)?;
    // IP addresses become IP SANs, everything else DNS SANs.
    let mut params = CertificateParams::new(names.to_vec()).map_err(TlsSetupError::Generate)?;
    let mut subject = DistinguishedName::new();
    subject.push(DnType::OrganizationName, "deskgrid");
    subject.push(
        DnType::CommonName,
        format!(
            "deskgrid API {}",
            names.first().map_or("server", String::as_str)
        ),
    );
    params.distinguished_name = subject;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    // A client whose clock is a little behind still accepts it.
    params.not_before = now - Duration::from_secs(24 * 3600);
    params.not_after = now + SELF_SIGNED_VALIDITY;
    let mut serial = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
    serial[0] &= 0x7f;
    serial[0] |= 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let certificate = params
        .self_signed(&key_pair)
        .map_err(TlsSetupError::Generate)?;
    Ok((certificate.pem(), key_pair.serialize_pem()))
}

/// The names a self-signed certificate is made for: the given IP
/// addresses (unspecified ones skipped), this host's name and `localhost`.
pub fn certificate_names(addresses: &[IpAddr]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for address in addresses {
        let text = address.to_string();
        if !address.is_unspecified() && !names.contains(&text) {
            names.push(text);
        }
    }
    if let Some(host) = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty() && name.parse::<IpAddr>().is_err())
    {
        if !names.contains(&host) {
            names.push(host);
        }
    }
    names.push("localhost".to_owned());
    names
}

/// The rustls server side for `certificate`, with the ring provider.
pub fn server_config(
    certificate: &ApiCertificate,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let unusable = |source| TlsSetupError::Unusable {
        certificate: certificate.certificate_file.clone(),
        key: certificate.certificate_file.with_file_name(KEY_FILE),
        source,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(unusable)?
        .with_no_client_auth()
        .with_single_cert(certificate.chain.clone(), certificate.key.clone_key())
        .map_err(unusable)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TCP listener whose connections come out TLS-terminated: the accept
/// loop runs in its own task, each handshake in another, bounded by
/// [`HANDSHAKE_TIMEOUT`] and [`MAX_CONNECTIONS`]. A failed handshake is
/// logged and forgotten; accepting goes on.
#[derive(Debug)]
pub struct TlsListener {
    local_addr: SocketAddr,
    handshaken: mpsc::Receiver<(TlsConnection, SocketAddr)>,
    accept_loop: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Binds `address` and starts accepting.
    pub async fn bind(address: SocketAddr, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let listener = TcpListener::bind(address).await?;
        let local_addr = listener.local_addr()?;
        // A few handshaken connections may wait for axum to pick them up.
        let (sender, handshaken) = mpsc::channel(16);
        let accept_loop = tokio::spawn(accept_loop(
            listener,
            tokio_rustls::TlsAcceptor::from(config),
            sender,
        ));
        Ok(Self {
            local_addr,
            handshaken,
            accept_loop,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    sender: mpsc::Sender<(TlsConnection, SocketAddr)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = sender.closed() => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = sender.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: wait, then go on.
                tracing::warn!(error = %error, "cannot accept an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let connection = TlsConnection::new(stream, permit);
                    // The server is stopping when nobody receives.
                    let _ = sender.send((connection, peer)).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(client = %peer, error = %error, "API TLS handshake failed");
                }
                Err(_) => {
                    tracing::debug!(client = %peer, "API TLS handshake timed out");
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            None => {
                // Only if the accept loop ended, which it does only when
                // this listener is dropped: accept nothing more.
                tracing::error!("the API's accept loop stopped");
                std::future::pending().await
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// One TLS connection, holding its connection slot until it closes, and
/// closed after [`IDLE_TIMEOUT`] without reading or writing anything.
#[derive(Debug)]
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    idle: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl TlsConnection {
    fn new(stream: tokio_rustls::server::TlsStream<TcpStream>, slot: OwnedSemaphorePermit) -> Self {
        Self {
            stream,
            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
            _slot: slot,
        }
    }

    fn touch(&mut self) {
        self.idle
            .as_mut()
            .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buffer.filled().len();
        match Pin::new(&mut self.stream).poll_read(context, buffer) {
            Poll::Ready(result) => {
                if buffer.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.idle.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "API connection idle too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.stream).poll_write(context, bytes);
        if matches!(result, Poll::Ready(Ok(written)) if written > 0) {
            self.touch();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_is_made_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt as _;
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().join("api");
        let names = certificate_names(&["127.0.0.2".parse().expect("ip")]);
        assert_eq!(names.first().map(String::as_str), Some("127.0.0.2"));
        assert_eq!(names.last().map(String::as_str), Some("localhost"));
        let first = load_or_create(&dir, &names).expect("made");
        assert!(first.created);
        let mode = |file| {
            std::fs::metadata(dir.join(file))
                .expect("stat")
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(KEY_FILE), 0o600);
        assert_eq!(first.fingerprint.len(), 32 * 3 - 1);
        server_config(&first).expect("a usable pair");

        let again = load_or_create(&dir, &names).expect("read back");
        assert!(!again.created);
        assert_eq!(again.fingerprint, first.fingerprint, "not made anew");

        std::fs::write(dir.join(CERTIFICATE_FILE), "not pem").expect("written");
        let error = load_or_create(&dir, &names).expect_err("no certificate");
        assert!(
            error.to_string().contains("holds no PEM certificate"),
            "{error}"
        );
    }
}
