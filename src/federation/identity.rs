//! The grid's PKI: its certificate authority, server certificates and the
//! identities they carry, and the `tls/` files that hold them.
//!
//! # Design
//!
//! - **One CA per grid.** `deskgrid init --new-grid` creates a self-signed
//!   ECDSA P-256 CA (path length 0: it signs server certificates only). Its
//!   subject alternative name `urn:deskgrid:grid:<grid id>` records the grid.
//!   A [`CaPin`] (SHA-256 of the CA certificate's DER) is what a join token
//!   carries so that a joiner can check it reached the right grid before it
//!   reveals the token's secret.
//! - **A server's identity is its certificate's SAN URI**
//!   `urn:deskgrid:server:<server id>`; [`server_id_from_certificate`] reads it
//!   from a peer's certificate after the handshake. Each certificate also
//!   carries the DNS name `<server id>.deskgrid` because rustls clients verify
//!   a server against a DNS name: a peer dialling server `S` passes
//!   [`tls_server_name`]`(S)`, so the handshake itself proves it reached `S`.
//!   The CA sets both names from the server id it was told, never from the
//!   request's subject: a joiner cannot ask for someone else's name.
//! - **One certificate for both directions** of mutual TLS: extended key
//!   usage serverAuth and clientAuth.
//! - **The CA key lives on every member.** Any member may admit a joiner, so
//!   the joiner receives the CA key during the authenticated join (see
//!   `JoinGrant` in `protocol.rs`). The trade-off: no member is special and a
//!   grid keeps admitting servers whatever is down, but stealing the key file
//!   from any one member (or its backup) lets the thief mint members. Keys
//!   are 0600 in a 0700 directory, and loading refuses a wider key file.
//! - **Verification is rustls's webpki** (the `WebPkiClientVerifier` that
//!   the transport's handshakes use), so [`verify_issued_by`] accepts exactly
//!   what a handshake would. x509-parser's own `verify` feature is not enabled
//!   and is not needed.
//!
//! **Invariant:** file I/O happens only in [`TlsFiles`]. Everything else is
//! pure apart from key generation (the OS's randomness) and the wall clock
//! read once when a certificate is issued, to set its validity period;
//! checking a certificate takes the time as an argument.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use rand::RngCore as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
    SignatureAlgorithm, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::{
    alg_id, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_SIG_ECDSA_WITH_SHA256,
};
use x509_parser::prelude::FromDer as _;

use crate::model::{GridId, ServerId};

const SERVER_URI_PREFIX: &str = "urn:deskgrid:server:";
const GRID_URI_PREFIX: &str = "urn:deskgrid:grid:";
/// The DNS suffix of the name each server certificate carries for rustls.
/// Not a real domain: nothing resolves it, it only names a server in a
/// handshake (see [`tls_server_name`]).
pub const SERVER_DNS_SUFFIX: &str = "deskgrid";

/// A grid outlives several hardware generations, and replacing its CA means
/// re-issuing every member's certificate at once, so the CA lasts ~20 years.
const CA_VALIDITY: time::Duration = time::Duration::days(20 * 365);
/// ~5 years: about an appliance's service life between reinstalls, and a
/// bound on how long a leaked server key stays useful. Renewal re-issues.
const SERVER_CERTIFICATE_VALIDITY: time::Duration = time::Duration::days(5 * 365);
/// Servers' clocks may differ by minutes (NTP may not be set up yet at
/// install time); a certificate valid from the issuer's "now" would be
/// refused by a joiner whose clock is behind, so validity starts an hour
/// earlier.
const VALIDITY_BACKDATE: time::Duration = time::Duration::hours(1);
/// The TLS files are PEM certificates and keys of about 1 KiB; anything much
/// bigger was not written by deskgrid, and reading it whole would be a way to
/// make a server allocate without bound.
const MAX_TLS_FILE_LEN: u64 = 64 * 1024;

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate a key pair")]
    KeyGeneration {
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot sign the {what}")]
    Signing {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("the {what} is not PEM text holding exactly one {label} block")]
    NotPem {
        what: &'static str,
        label: &'static str,
    },
    #[error("the certificate signing request is not valid: {problem}")]
    InvalidCertificateRequest { problem: &'static str },
    #[error(
        "the certificate signing request's signature does not verify: the requester does not hold the key it asks a certificate for"
    )]
    CertificateRequestSignatureInvalid,
    #[error("the {what} is not a readable x.509 certificate")]
    CertificateUnreadable { what: &'static str },
    #[error("the {what} is not a pkcs#8 ecdsa p-256 private key")]
    KeyUnreadable { what: &'static str },
    #[error("the {what} private key does not belong to its certificate")]
    KeyDoesNotMatchCertificate { what: &'static str },
    #[error("the grid ca certificate is not a ca certificate (its basic constraints do not allow signing certificates)")]
    NotACaCertificate,
    #[error(
        "the grid ca certificate cannot be reproduced to sign with: it was not made by deskgrid's `GridCa::create`"
    )]
    CaSubjectNotReproducible,
    #[error(
        "the certificate names no deskgrid {kind}: it lacks the subject alternative name `urn:deskgrid:{kind}:<id>`"
    )]
    NoIdentity { kind: &'static str },
    #[error("the certificate names {count} deskgrid {kind}s, it must name exactly one")]
    SeveralIdentities { kind: &'static str, count: usize },
    #[error("the certificate's deskgrid {kind} name {uri:?} does not hold a valid {kind} id")]
    InvalidIdentity { kind: &'static str, uri: String },
    #[error("the {what} is not valid before {}", utc(.not_before_s))]
    NotYetValid {
        what: &'static str,
        not_before_s: i64,
    },
    #[error("the {what} expired at {}", utc(.not_after_s))]
    Expired {
        what: &'static str,
        not_after_s: i64,
    },
    #[error("the certificate was not issued by this grid's ca")]
    NotIssuedByGridCa,
    #[error("the certificate does not verify against the grid ca")]
    CertificateRejected {
        #[source]
        source: rustls::Error,
    },
    #[error("the grid ca certificate cannot serve as a trust anchor")]
    UnusableCa {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build a certificate verifier for the grid ca")]
    VerifierUnavailable {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error("a ca pin is 64 hex digits (the sha-256 of the grid ca certificate)")]
    InvalidCaPin,
    #[error(
        "{path} has mode {mode:04o}, wider than 0600: a private key must be readable by its owner only; run `chmod 600 {path}`",
        path = .path.display()
    )]
    KeyFileTooOpen { path: PathBuf, mode: u32 },
    #[error("{path} is larger than {limit} bytes: deskgrid did not write it", path = .path.display())]
    FileTooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is unusable", path = .path.display())]
    InvalidFile {
        path: PathBuf,
        #[source]
        source: Box<IdentityError>,
    },
    #[error("cannot {operation} {path}", path = .path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

type Result<T, E = IdentityError> = std::result::Result<T, E>;

/// `2031-05-04 10:00:00 UTC`, for error messages about validity periods.
fn utc(unix_seconds: &i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(*unix_seconds) {
        Ok(at) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        ),
        Err(_) => format!("unix time {unix_seconds}"),
    }
}

/// The SHA-256 of the grid CA certificate's DER: what a join token pins.
/// Shown and stored as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CaPin([u8; 32]);

impl CaPin {
    /// The pin of a CA certificate (DER).
    pub fn of_certificate(ca_cert_der: &[u8]) -> Self {
        Self(Sha256::digest(ca_cert_der).into())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// True when `ca_cert_der` is the certificate this pin was made from.
    /// Pins are public, so a plain comparison is fine here.
    pub fn matches(&self, ca_cert_der: &[u8]) -> bool {
        *self == Self::of_certificate(ca_cert_der)
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "CaPin({self})")
    }
}

impl FromStr for CaPin {
    type Err = IdentityError;

    /// 64 hex digits, either case.
    fn from_str(text: &str) -> Result<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| IdentityError::InvalidCaPin)?;
        Ok(Self(bytes))
    }
}

impl TryFrom<String> for CaPin {
    type Error = IdentityError;
    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<CaPin> for String {
    fn from(pin: CaPin) -> Self {
        pin.to_string()
    }
}

/// A certificate the grid CA issued, in both encodings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub der: CertificateDer<'static>,
    pub pem: String,
}

/// The grid's certificate authority: its certificate and its key.
pub struct GridCa {
    grid_id: GridId,
    certificate_der: CertificateDer<'static>,
    certificate_pem: String,
    key_pair: KeyPair,
    /// rcgen signs "by" a `Certificate` and reads only its subject name and
    /// key-identifier method. For a CA created here this is the CA itself;
    /// for one read back from PEM it is a re-signed copy with the same
    /// subject (checked byte for byte in [`GridCa::from_pem`]) that nobody
    /// ever sees: peers hold `certificate_der`.
    issuer: rcgen::Certificate,
}

impl fmt::Debug for GridCa {
    /// Never prints the key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("GridCa")
            .field("grid_id", &self.grid_id)
            .field("pin", &self.pin())
            .finish_non_exhaustive()
    }
}

impl GridCa {
    /// A new self-signed CA for `grid_id` (`deskgrid init --new-grid`).
    pub fn create(grid_id: GridId) -> Result<Self> {
        let key_pair = generate_key_pair()?;
        let mut params = ca_params(grid_id);
        let now = wall_clock_now();
        params.not_before = now - VALIDITY_BACKDATE;
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial_number());
        let certificate =
            params
                .self_signed(&key_pair)
                .map_err(|source| IdentityError::Signing {
                    what: "grid ca certificate",
                    source,
                })?;
        Ok(Self {
            grid_id,
            certificate_der: certificate.der().clone(),
            certificate_pem: certificate.pem(),
            key_pair,
            issuer: certificate,
        })
    }

    /// The CA as `ca.pem` and `ca.key` (or a `JoinGrant`) hold it. Checks
    /// that the certificate is a deskgrid grid CA and that the key is its key.
    pub fn from_pem(certificate_pem: &str, key_pem: &str) -> Result<Self> {
        let certificate_der = pem_block(certificate_pem, "CERTIFICATE", "grid ca certificate")?;
        let key_der = pem_block(key_pem, "PRIVATE KEY", "grid ca key")?;
        let grid_id = grid_id_from_ca(&certificate_der)?;
        let key_pair = key_pair_from_pkcs8(&key_der, "grid ca key")?;
        check_key_matches(&certificate_der, &key_pair, "grid ca")?;
        let issuer = ca_params(grid_id)
            .self_signed(&key_pair)
            .map_err(|source| IdentityError::Signing {
                what: "grid ca issuer copy",
                source,
            })?;
        if subject_raw(&certificate_der, "grid ca certificate")?
            != subject_raw(issuer.der(), "grid ca issuer copy")?
        {
            return Err(IdentityError::CaSubjectNotReproducible);
        }
        Ok(Self {
            grid_id,
            certificate_der: CertificateDer::from(certificate_der),
            certificate_pem: normalised_pem(certificate_pem),
            key_pair,
            issuer,
        })
    }

    pub fn grid_id(&self) -> GridId {
        self.grid_id
    }

    /// SHA-256 of the CA certificate: what join tokens pin.
    pub fn pin(&self) -> CaPin {
        CaPin::of_certificate(&self.certificate_der)
    }

    /// The CA certificate, as rustls takes it for a root store.
    pub fn certificate_der(&self) -> CertificateDer<'static> {
        self.certificate_der.clone()
    }

    pub fn certificate_pem(&self) -> &str {
        &self.certificate_pem
    }

    /// The CA's private key as PKCS#8 PEM. Secret: it goes only to `ca.key`
    /// and, over the authenticated join, to a joiner (module doc).
    pub fn key_pem(&self) -> String {
        self.key_pair.serialize_pem()
    }

    /// Signs the public key of `csr_pem` into a server certificate for
    /// `server_id`. The request's subject and extensions are ignored: names,
    /// key usage and validity are the CA's choice. The request's signature
    /// must verify (the requester holds the key), and the key must be ECDSA
    /// P-256, the only kind [`ServerKey`] makes.
    pub fn issue_server_certificate(
        &self,
        csr_pem: &str,
        server_id: ServerId,
    ) -> Result<IssuedCertificate> {
        let csr_der = pem_block(
            csr_pem,
            "CERTIFICATE REQUEST",
            "certificate signing request",
        )?;
        let public_key = requested_public_key(&csr_der)?;
        let mut params = server_params(server_id);
        let now = wall_clock_now();
        params.not_before = now - VALIDITY_BACKDATE;
        params.not_after = now + SERVER_CERTIFICATE_VALIDITY;
        params.serial_number = Some(random_serial_number());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let certificate = params
            .signed_by(&public_key, &self.issuer, &self.key_pair)
            .map_err(|source| IdentityError::Signing {
                what: "server certificate",
                source,
            })?;
        Ok(IssuedCertificate {
            der: certificate.der().clone(),
            pem: certificate.pem(),
        })
    }

    /// A key and a certificate for this CA's own server (`init --new-grid`),
    /// through the same request path a joiner takes.
    pub fn issue_for_self(&self, server_id: ServerId) -> Result<(ServerKey, IssuedCertificate)> {
        let server_key = ServerKey::generate()?;
        let csr_pem = server_key.certificate_request(server_id)?;
        let certificate = self.issue_server_certificate(&csr_pem, server_id)?;
        Ok((server_key, certificate))
    }
}

/// A server's freshly generated ECDSA P-256 key pair.
pub struct ServerKey {
    key_pair: KeyPair,
}

impl fmt::Debug for ServerKey {
    /// Never prints the key.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("ServerKey").finish_non_exhaustive()
    }
}

impl ServerKey {
    pub fn generate() -> Result<Self> {
        Ok(Self {
            key_pair: generate_key_pair()?,
        })
    }

    /// A key read back from PKCS#8 PEM.
    pub fn from_pem(key_pem: &str) -> Result<Self> {
        let key_der = pem_block(key_pem, "PRIVATE KEY", "server key")?;
        Ok(Self {
            key_pair: key_pair_from_pkcs8(&key_der, "server key")?,
        })
    }

    /// A PKCS#10 request (PEM) for this key. It names `server_id` for a
    /// human reading it; the CA ignores the names and sets its own.
    pub fn certificate_request(&self, server_id: ServerId) -> Result<String> {
        server_params(server_id)
            .serialize_request(&self.key_pair)
            .and_then(|request| request.pem())
            .map_err(|source| IdentityError::Signing {
                what: "certificate signing request",
                source,
            })
    }

    /// PKCS#8 PEM; secret, for `server.key` only.
    pub fn private_key_pem(&self) -> String {
        self.key_pair.serialize_pem()
    }

    /// The key as rustls takes it.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pair.serialize_der()))
    }
}

/// The name a peer dialling `server_id` verifies the server's certificate
/// against: `<server id>.deskgrid`, the DNS name every server certificate
/// carries. Verifying it proves the peer reached the server it meant.
pub fn tls_server_name(server_id: ServerId) -> ServerName<'static> {
    ServerName::try_from(server_dns_name(server_id))
        .expect("a hyphenated uuid followed by `.deskgrid` is a valid dns name")
}

/// The server id a certificate was issued for: its one SAN URI
/// `urn:deskgrid:server:<id>`. Use on a peer's certificate after the
/// handshake verified it against the grid CA.
pub fn server_id_from_certificate(cert_der: &[u8]) -> Result<ServerId> {
    let certificate = parse_certificate(cert_der, "server certificate")?;
    identity_from_san(&certificate, "server", SERVER_URI_PREFIX)
}

/// The grid a CA certificate belongs to (its SAN URI
/// `urn:deskgrid:grid:<id>`); refuses a certificate that is not a CA.
pub fn grid_id_from_ca(ca_cert_der: &[u8]) -> Result<GridId> {
    let certificate = parse_certificate(ca_cert_der, "grid ca certificate")?;
    let is_ca = certificate
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|constraints| constraints.value.ca);
    if !is_ca {
        return Err(IdentityError::NotACaCertificate);
    }
    identity_from_san(&certificate, "grid", GRID_URI_PREFIX)
}

/// Checks that `cert_der` was issued by the CA `ca_cert_der` and that both
/// are valid at `now_ms` (Unix milliseconds).
///
/// The chain check is rustls's webpki, through the `WebPkiClientVerifier`
/// a mutual-TLS handshake uses (so the certificate must also allow
/// clientAuth, which every server certificate does). webpki does not check
/// a trust anchor's validity period; this function does, and checks the
/// end certificate's too first, to give errors with dates in them.
pub fn verify_issued_by(cert_der: &[u8], ca_cert_der: &[u8], now_ms: u64) -> Result<()> {
    let now_s = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    check_validity(
        &parse_certificate(ca_cert_der, "grid ca certificate")?,
        now_s,
        "grid ca certificate",
    )?;
    check_validity(
        &parse_certificate(cert_der, "certificate")?,
        now_s,
        "certificate",
    )?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(&CertificateDer::from(ca_cert_der))?),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|source| IdentityError::VerifierUnavailable { source })?;
    let now = UnixTime::since_unix_epoch(Duration::from_millis(now_ms));
    match verifier.verify_client_cert(&CertificateDer::from(cert_der), &[], now) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => Err(IdentityError::NotIssuedByGridCa),
        Err(source) => Err(IdentityError::CertificateRejected { source }),
    }
}

/// A rustls root store holding only the grid CA: peers trust nothing else.
pub fn root_store(ca_cert_der: &CertificateDer<'_>) -> Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca_cert_der.clone().into_owned())
        .map_err(|source| IdentityError::UnusableCa { source })?;
    Ok(roots)
}

/// What `tls/` holds, read and checked.
#[derive(Debug)]
pub struct LoadedTls {
    pub grid_id: GridId,
    pub server_id: ServerId,
    pub ca_cert_der: CertificateDer<'static>,
    /// The CA with its key, checked to belong together. Present on every
    /// member in this design (module doc); `None` if `ca.key` is absent.
    pub grid_ca: Option<GridCa>,
    pub server_cert_der: CertificateDer<'static>,
    /// Checked to belong to `server_cert_der`.
    pub server_key_der: PrivatePkcs8KeyDer<'static>,
}

impl LoadedTls {
    /// The chain this server presents: its certificate, then the grid CA.
    /// Members already hold the CA; a joiner does not, and finds it at the
    /// end of the chain to check it against its token's pin.
    pub fn server_certificate_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.server_cert_der.clone(), self.ca_cert_der.clone()]
    }

    pub fn server_private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.server_key_der.clone_key())
    }

    /// A root store holding only this grid's CA.
    pub fn root_store(&self) -> Result<rustls::RootCertStore> {
        root_store(&self.ca_cert_der)
    }
}

/// The `tls/` directory: `ca.pem`, `ca.key`, `server.pem`, `server.key`.
/// Writes are atomic (temp file, fsync, rename, fsync the directory); key
/// files are created 0600 and never exist with a wider mode, even briefly.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    dir: PathBuf,
}

/// Certificates are public (every peer sees them in each handshake).
const CERTIFICATE_MODE: u32 = 0o644;
/// Private keys: the owner only, as `ssh` insists for its keys.
const PRIVATE_KEY_MODE: u32 = 0o600;

impl TlsFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn ca_certificate_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn ca_key_file(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    pub fn server_certificate_file(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key_file(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// Writes `ca.key` then `ca.pem`. A crash between the two leaves either
    /// no `ca.pem` or (when replacing a CA) a key that [`TlsFiles::load`]
    /// refuses as not matching, never a CA that silently signs certificates
    /// nobody accepts.
    pub fn save_ca(&self, grid_ca: &GridCa) -> Result<()> {
        self.create_dir()?;
        write_atomically(
            &self.ca_key_file(),
            grid_ca.key_pem().as_bytes(),
            PRIVATE_KEY_MODE,
        )?;
        write_atomically(
            &self.ca_certificate_file(),
            grid_ca.certificate_pem().as_bytes(),
            CERTIFICATE_MODE,
        )?;
        tracing::info!(
            grid = %grid_ca.grid_id(),
            pin = %grid_ca.pin(),
            dir = %self.dir.display(),
            "saved the grid ca"
        );
        Ok(())
    }

    /// Writes `server.key` then `server.pem`, after checking that the
    /// certificate is for this key.
    pub fn save_server(&self, certificate_pem: &str, server_key: &ServerKey) -> Result<()> {
        let certificate_der = pem_block(certificate_pem, "CERTIFICATE", "server certificate")?;
        check_key_matches(&certificate_der, &server_key.key_pair, "server")?;
        self.create_dir()?;
        write_atomically(
            &self.server_key_file(),
            server_key.private_key_pem().as_bytes(),
            PRIVATE_KEY_MODE,
        )?;
        write_atomically(
            &self.server_certificate_file(),
            normalised_pem(certificate_pem).as_bytes(),
            CERTIFICATE_MODE,
        )
    }

    /// Reads and checks all four files. Refuses a key file whose mode is
    /// wider than 0600; `ca.key` may be absent.
    pub fn load(&self) -> Result<LoadedTls> {
        let ca_path = self.ca_certificate_file();
        let ca_pem = read_text(&ca_path)?;
        let ca_cert_der = in_file(&ca_path, || {
            pem_block(&ca_pem, "CERTIFICATE", "grid ca certificate")
        })?;
        let grid_id = in_file(&ca_path, || grid_id_from_ca(&ca_cert_der))?;

        let ca_key_path = self.ca_key_file();
        let grid_ca = match read_private_key_text(&ca_key_path)? {
            None => None,
            Some(key_pem) => Some(in_file(&ca_key_path, || {
                GridCa::from_pem(&ca_pem, &key_pem)
            })?),
        };

        let server_path = self.server_certificate_file();
        let server_pem = read_text(&server_path)?;
        let server_cert_der = in_file(&server_path, || {
            pem_block(&server_pem, "CERTIFICATE", "server certificate")
        })?;
        let server_id = in_file(&server_path, || {
            server_id_from_certificate(&server_cert_der)
        })?;

        let server_key_path = self.server_key_file();
        let server_key_pem =
            read_private_key_text(&server_key_path)?.ok_or_else(|| IdentityError::Io {
                path: server_key_path.clone(),
                operation: "open",
                source: std::io::ErrorKind::NotFound.into(),
            })?;
        let server_key_der = in_file(&server_key_path, || {
            let key_der = pem_block(&server_key_pem, "PRIVATE KEY", "server key")?;
            let key_pair = key_pair_from_pkcs8(&key_der, "server key")?;
            check_key_matches(&server_cert_der, &key_pair, "server")?;
            Ok(PrivatePkcs8KeyDer::from(key_der))
        })?;

        Ok(LoadedTls {
            grid_id,
            server_id,
            ca_cert_der: CertificateDer::from(ca_cert_der),
            grid_ca,
            server_cert_der: CertificateDer::from(server_cert_der),
            server_key_der,
        })
    }

    fn create_dir(&self) -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_error(&self.dir, "create directory"))
    }
}

fn in_file<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    read().map_err(|source| IdentityError::InvalidFile {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn io_error<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        operation,
        source,
    }
}

/// Opens a private key file and refuses it if group or others may access it
/// (checked on the open file, so the file checked is the file read). `None`
/// when the file does not exist.
fn read_private_key_text(path: &Path) -> Result<Option<String>> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(io_error(path, "open")(error)),
    };
    let mode = file
        .metadata()
        .map_err(io_error(path, "stat"))?
        .permissions()
        .mode()
        & 0o777;
    if mode & !PRIVATE_KEY_MODE != 0 {
        return Err(IdentityError::KeyFileTooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    read_capped(file, path).map(Some)
}

fn read_text(path: &Path) -> Result<String> {
    let file = File::open(path).map_err(io_error(path, "open"))?;
    read_capped(file, path)
}

fn read_capped(file: File, path: &Path) -> Result<String> {
    let mut text = String::new();
    file.take(MAX_TLS_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(io_error(path, "read"))?;
    if text.len() as u64 > MAX_TLS_FILE_LEN {
        return Err(IdentityError::FileTooLarge {
            path: path.to_owned(),
            limit: MAX_TLS_FILE_LEN,
        });
    }
    Ok(text)
}

/// Write-temp, fsync, rename, fsync(dir). The temp file is created fresh
/// (`create_new`) with its final mode, so a stale temp file with a wider
/// mode can never become the key file.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy())
        .unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.tmp"));
    match fs::remove_file(&temp) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io_error(&temp, "remove stale")(error)),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .map_err(io_error(&temp, "create"))?;
    file.write_all(bytes).map_err(io_error(&temp, "write"))?;
    file.sync_all().map_err(io_error(&temp, "fsync"))?;
    drop(file);
    fs::rename(&temp, path).map_err(io_error(path, "rename into place"))?;
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error(dir, "fsync directory"))
}

fn wall_clock_now() -> time::OffsetDateTime {
    // Whole seconds: certificates store no fractions, and truncating here
    // keeps `not_before` from ending up a fraction later than intended.
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0).unwrap_or(now)
}

fn generate_key_pair() -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|source| IdentityError::KeyGeneration { source })
}

/// 16 random bytes (RFC 5280 asks for unpredictable serials of at most 20),
/// positive and without a leading zero byte so DER keeps all 16.
fn random_serial_number() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn ia5(text: String) -> Ia5String {
    Ia5String::try_from(text).expect("deskgrid names are ascii: a fixed prefix and a uuid")
}

/// Subject and names of the grid CA. Deterministic in `grid_id`: a CA read
/// back from files is rebuilt from these to sign with (`GridCa::from_pem`).
fn ca_params(grid_id: GridId) -> CertificateParams {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, format!("deskgrid grid {grid_id}"));
    distinguished_name.push(DnType::OrganizationName, "deskgrid");
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.subject_alt_names = vec![SanType::URI(ia5(format!("{GRID_URI_PREFIX}{grid_id}")))];
    // Path length 0: the grid CA signs server certificates, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn server_dns_name(server_id: ServerId) -> String {
    format!("{server_id}.{SERVER_DNS_SUFFIX}")
}

/// Subject and names of a server certificate (and of its request).
fn server_params(server_id: ServerId) -> CertificateParams {
    let mut distinguished_name = DistinguishedName::new();
    distinguished_name.push(DnType::CommonName, server_id.to_string());
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    params.subject_alt_names = vec![
        SanType::URI(ia5(format!("{SERVER_URI_PREFIX}{server_id}"))),
        SanType::DnsName(ia5(server_dns_name(server_id))),
    ];
    params
}

/// The DER of the one `label` block in `text`, refusing anything else
/// (another label, a second block, text around it).
fn pem_block(text: &str, label: &'static str, what: &'static str) -> Result<Vec<u8>> {
    let not_pem = || IdentityError::NotPem { what, label };
    let trimmed = text.trim();
    if !trimmed.starts_with("-----BEGIN ") {
        return Err(not_pem());
    }
    let (rest, pem) =
        x509_parser::pem::parse_x509_pem(trimmed.as_bytes()).map_err(|_| not_pem())?;
    if pem.label != label || !rest.iter().all(u8::is_ascii_whitespace) {
        return Err(not_pem());
    }
    Ok(pem.contents)
}

/// PEM text as stored and sent on: trimmed, one final newline.
fn normalised_pem(text: &str) -> String {
    format!("{}\n", text.trim())
}

fn parse_certificate<'a>(der: &'a [u8], what: &'static str) -> Result<X509Certificate<'a>> {
    match X509Certificate::from_der(der) {
        Ok(([], certificate)) => Ok(certificate),
        _ => Err(IdentityError::CertificateUnreadable { what }),
    }
}

fn subject_raw(der: &[u8], what: &'static str) -> Result<Vec<u8>> {
    Ok(parse_certificate(der, what)?.subject().as_raw().to_vec())
}

fn key_pair_from_pkcs8(der: &[u8], what: &'static str) -> Result<KeyPair> {
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(der), &PKCS_ECDSA_P256_SHA256)
        .map_err(|_| IdentityError::KeyUnreadable { what })
}

fn check_key_matches(cert_der: &[u8], key_pair: &KeyPair, what: &'static str) -> Result<()> {
    let certificate = parse_certificate(cert_der, "certificate")?;
    if certificate.public_key().subject_public_key.data.as_ref() == key_pair.public_key_raw() {
        Ok(())
    } else {
        Err(IdentityError::KeyDoesNotMatchCertificate { what })
    }
}

fn identity_from_san<Id: FromStr + fmt::Display>(
    certificate: &X509Certificate<'_>,
    kind: &'static str,
    prefix: &str,
) -> Result<Id> {
    let names = certificate.subject_alternative_name().map_err(|_| {
        IdentityError::CertificateUnreadable {
            what: "certificate's subject alternative names",
        }
    })?;
    let uris: Vec<&str> = names
        .iter()
        .flat_map(|extension| extension.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(prefix),
            _ => None,
        })
        .collect();
    let text = match uris.as_slice() {
        [] => return Err(IdentityError::NoIdentity { kind }),
        [one] => *one,
        several => {
            return Err(IdentityError::SeveralIdentities {
                kind,
                count: several.len(),
            })
        }
    };
    let invalid = || IdentityError::InvalidIdentity {
        kind,
        uri: format!("{prefix}{text}"),
    };
    let id: Id = text.parse().map_err(|_| invalid())?;
    // The uuid parser also takes braces, `urn:uuid:` and upper case; one
    // server must have one spelling.
    if id.to_string() != text {
        return Err(invalid());
    }
    Ok(id)
}

fn check_validity(certificate: &X509Certificate<'_>, now_s: i64, what: &'static str) -> Result<()> {
    let validity = certificate.validity();
    let not_before_s = validity.not_before.timestamp();
    let not_after_s = validity.not_after.timestamp();
    if now_s < not_before_s {
        Err(IdentityError::NotYetValid { what, not_before_s })
    } else if now_s > not_after_s {
        Err(IdentityError::Expired { what, not_after_s })
    } else {
        Ok(())
    }
}

/// A public key taken from a request, for rcgen to sign.
struct RequestedPublicKey {
    subject_public_key: Vec<u8>,
}

impl PublicKeyData for RequestedPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.subject_public_key
    }

    fn algorithm(&self) -> &SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

/// Parses a PKCS#10 request, checks that its key is ECDSA P-256 and that it
/// signed the request (proof of possession), and returns the key. Nothing
/// else of the request is used.
///
/// The signature is checked with the ECDSA P-256/SHA-256 verifier from
/// rustls's ring provider; rcgen's and x509-parser's own request checks
/// need crate features this build does not enable.
fn requested_public_key(csr_der: &[u8]) -> Result<RequestedPublicKey> {
    let invalid = |problem| IdentityError::InvalidCertificateRequest { problem };
    let request = match X509CertificationRequest::from_der(csr_der) {
        Ok(([], request)) => request,
        _ => return Err(invalid("it is not a pkcs#10 request")),
    };
    let info = &request.certification_request_info;
    let key_algorithm = &info.subject_pki.algorithm;
    let curve = key_algorithm
        .parameters
        .as_ref()
        .and_then(|parameters| parameters.as_oid().ok());
    if key_algorithm.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY || curve != Some(OID_EC_P256) {
        return Err(invalid("its key is not an ecdsa p-256 key"));
    }
    if request.signature_algorithm.algorithm != OID_SIG_ECDSA_WITH_SHA256 {
        return Err(invalid("it is not signed with ecdsa-with-sha256"));
    }
    let provider = rustls::crypto::ring::default_provider();
    let verifier = provider
        .signature_verification_algorithms
        .all
        .iter()
        .find(|algorithm| {
            algorithm.public_key_alg_id() == alg_id::ECDSA_P256
                && algorithm.signature_alg_id() == alg_id::ECDSA_SHA256
        })
        .ok_or(invalid("this build cannot verify ecdsa p-256 signatures"))?;
    let subject_public_key = info.subject_pki.subject_public_key.data.to_vec();
    verifier
        .verify_signature(&subject_public_key, info.raw, &request.signature_value.data)
        .map_err(|_| IdentityError::CertificateRequestSignatureInvalid)?;
    Ok(RequestedPublicKey { subject_public_key })
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::client::danger::ServerCertVerifier as _;

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    }

    const DAY_MS: u64 = 24 * 3600 * 1000;

    fn file_mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_not_the_request_chooses_the_name() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let server_key = ServerKey::generate().unwrap();
        let claimed = ServerId::random();
        let assigned = ServerId::random();
        let lying_request = server_key.certificate_request(claimed).unwrap();

        let issued = grid_ca
            .issue_server_certificate(&lying_request, assigned)
            .unwrap();

        assert_eq!(server_id_from_certificate(&issued.der).unwrap(), assigned);
        let (_, certificate) = X509Certificate::from_der(&issued.der).unwrap();
        let common_names: Vec<&str> = certificate
            .subject()
            .iter_common_name()
            .map(|name| name.as_str().unwrap())
            .collect();
        assert_eq!(common_names, [assigned.to_string()]);
        let san = certificate.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert!(!names.iter().any(|name| name.contains(&claimed.to_string())));
        assert!(
            names.contains(&format!("DNSName({assigned}.deskgrid)")),
            "{names:?}"
        );
        // The certificate is for the requester's key.
        check_key_matches(&issued.der, &server_key.key_pair, "server").unwrap();
        let eku = certificate.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!certificate.basic_constraints().unwrap().unwrap().value.ca);
    }

    #[test]
    fn server_and_grid_ids_round_trip_through_certificates() {
        let grid_id = GridId::random();
        let grid_ca = GridCa::create(grid_id).unwrap();
        assert_eq!(grid_ca.grid_id(), grid_id);
        assert_eq!(
            grid_id_from_ca(&grid_ca.certificate_der()).unwrap(),
            grid_id
        );
        let server_id = ServerId::random();
        let (_, issued) = grid_ca.issue_for_self(server_id).unwrap();
        assert_eq!(server_id_from_certificate(&issued.der).unwrap(), server_id);
        // A server certificate is not a CA, and a CA names no server.
        assert!(matches!(
            grid_id_from_ca(&issued.der),
            Err(IdentityError::NotACaCertificate)
        ));
        assert!(matches!(
            server_id_from_certificate(&grid_ca.certificate_der()),
            Err(IdentityError::NoIdentity { kind: "server" })
        ));
        assert!(matches!(
            server_id_from_certificate(b"not a certificate"),
            Err(IdentityError::CertificateUnreadable { .. })
        ));
    }

    #[test]
    fn a_certificate_naming_two_servers_is_refused() {
        let key_pair = generate_key_pair().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            SanType::URI(ia5(format!("{SERVER_URI_PREFIX}{}", ServerId::random()))),
            SanType::URI(ia5(format!("{SERVER_URI_PREFIX}{}", ServerId::random()))),
        ];
        let certificate = params.self_signed(&key_pair).unwrap();
        assert!(matches!(
            server_id_from_certificate(certificate.der()),
            Err(IdentityError::SeveralIdentities {
                kind: "server",
                count: 2
            })
        ));

        let mut params = CertificateParams::default();
        let braced = format!("{{{}}}", ServerId::random());
        params.subject_alt_names = vec![SanType::URI(ia5(format!("{SERVER_URI_PREFIX}{braced}")))];
        let certificate = params.self_signed(&key_pair).unwrap();
        assert!(matches!(
            server_id_from_certificate(certificate.der()),
            Err(IdentityError::InvalidIdentity { kind: "server", .. })
        ));
    }

    #[test]
    fn verification_accepts_only_the_issuing_ca_within_validity() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let other_grid_ca = GridCa::create(GridId::random()).unwrap();
        let (_, issued) = grid_ca.issue_for_self(ServerId::random()).unwrap();
        let now = now_ms();

        verify_issued_by(&issued.der, &grid_ca.certificate_der(), now).unwrap();
        assert!(matches!(
            verify_issued_by(&issued.der, &other_grid_ca.certificate_der(), now),
            Err(IdentityError::NotIssuedByGridCa)
        ));
        // An impostor CA with the same grid id, hence the same subject: only
        // the signature tells them apart.
        let impostor_ca = GridCa::create(grid_ca.grid_id()).unwrap();
        assert!(matches!(
            verify_issued_by(&issued.der, &impostor_ca.certificate_der(), now),
            Err(IdentityError::NotIssuedByGridCa)
        ));
        let six_years_on = now + 6 * 365 * DAY_MS;
        let error =
            verify_issued_by(&issued.der, &grid_ca.certificate_der(), six_years_on).unwrap_err();
        assert!(
            matches!(
                error,
                IdentityError::Expired {
                    what: "certificate",
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            error
                .to_string()
                .starts_with("the certificate expired at 20"),
            "{error}"
        );
        assert!(matches!(
            verify_issued_by(&issued.der, &grid_ca.certificate_der(), now - DAY_MS),
            Err(IdentityError::NotYetValid { .. })
        ));
        assert!(matches!(
            verify_issued_by(
                &issued.der,
                &grid_ca.certificate_der(),
                now + 21 * 365 * DAY_MS
            ),
            Err(IdentityError::Expired {
                what: "grid ca certificate",
                ..
            })
        ));
    }

    #[test]
    fn a_request_whose_signature_does_not_verify_is_refused() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let server_key = ServerKey::generate().unwrap();
        let request_pem = server_key.certificate_request(ServerId::random()).unwrap();
        let mut request_der = pem_block(&request_pem, "CERTIFICATE REQUEST", "request").unwrap();
        // The signature is the last field: flip a bit of its final byte.
        let last = request_der.len() - 1;
        request_der[last] ^= 0x01;
        let tampered = pem_from_der("CERTIFICATE REQUEST", &request_der);
        assert!(matches!(
            grid_ca.issue_server_certificate(&tampered, ServerId::random()),
            Err(IdentityError::CertificateRequestSignatureInvalid)
        ));
        assert!(matches!(
            grid_ca.issue_server_certificate(grid_ca.certificate_pem(), ServerId::random()),
            Err(IdentityError::NotPem { .. })
        ));
    }

    /// Tests only: rcgen's encoder through a CSR-shaped detour is not
    /// available, so encode base64 by hand.
    fn pem_from_der(label: &str, der: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut encoded = String::new();
        for chunk in der.chunks(3) {
            let bytes = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let triple = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]);
            for index in 0..4 {
                if index <= chunk.len() {
                    let sextet = (triple >> (18 - 6 * index)) & 0x3f;
                    encoded.push(ALPHABET[sextet as usize] as char);
                } else {
                    encoded.push('=');
                }
            }
        }
        let mut text = format!("-----BEGIN {label}-----\n");
        for line in encoded.as_bytes().chunks(64) {
            text.push_str(std::str::from_utf8(line).unwrap());
            text.push('\n');
        }
        text.push_str(&format!("-----END {label}-----\n"));
        text
    }

    #[test]
    fn peers_verify_a_server_by_its_dns_name() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let server_id = ServerId::random();
        let (_, issued) = grid_ca.issue_for_self(server_id).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(root_store(&grid_ca.certificate_der()).unwrap()),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let now = UnixTime::since_unix_epoch(Duration::from_millis(now_ms()));
        verifier
            .verify_server_cert(&issued.der, &[], &tls_server_name(server_id), &[], now)
            .unwrap();
        assert!(verifier
            .verify_server_cert(
                &issued.der,
                &[],
                &tls_server_name(ServerId::random()),
                &[],
                now
            )
            .is_err());
    }

    #[test]
    fn the_pin_is_stable_and_differs_between_cas() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let other = GridCa::create(GridId::random()).unwrap();
        assert_eq!(grid_ca.pin(), grid_ca.pin());
        assert_eq!(
            grid_ca.pin(),
            CaPin::of_certificate(&grid_ca.certificate_der())
        );
        assert!(grid_ca.pin().matches(&grid_ca.certificate_der()));
        assert_ne!(grid_ca.pin(), other.pin());

        let text = grid_ca.pin().to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<CaPin>().unwrap(), grid_ca.pin());
        assert_eq!(text.to_uppercase().parse::<CaPin>().unwrap(), grid_ca.pin());
        assert!(text[..63].parse::<CaPin>().is_err());
        assert!(format!("{text}0").parse::<CaPin>().is_err());
        let json = serde_json::to_string(&grid_ca.pin()).unwrap();
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<CaPin>(&json).unwrap(), grid_ca.pin());
        assert!(serde_json::from_str::<CaPin>("\"zz\"").is_err());
    }

    #[test]
    fn a_ca_read_back_from_pem_issues_certificates_the_original_accepts() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let reloaded = GridCa::from_pem(grid_ca.certificate_pem(), &grid_ca.key_pem()).unwrap();
        assert_eq!(reloaded.pin(), grid_ca.pin());
        assert_eq!(reloaded.grid_id(), grid_ca.grid_id());
        let (_, issued) = reloaded.issue_for_self(ServerId::random()).unwrap();
        verify_issued_by(&issued.der, &grid_ca.certificate_der(), now_ms()).unwrap();

        let other = GridCa::create(GridId::random()).unwrap();
        assert!(matches!(
            GridCa::from_pem(grid_ca.certificate_pem(), &other.key_pem()),
            Err(IdentityError::KeyDoesNotMatchCertificate { what: "grid ca" })
        ));
    }

    #[test]
    fn debug_output_shows_no_key() {
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let server_key = ServerKey::generate().unwrap();
        let key_hex = hex::encode(grid_ca.key_pair.serialize_der());
        let debug = format!("{grid_ca:?} {server_key:?}");
        assert!(!debug.contains(&key_hex[..16]), "{debug}");
        assert!(!debug.contains("serialized_der"), "{debug}");
        assert!(debug.contains(&grid_ca.pin().to_string()));
    }

    #[test]
    fn files_are_saved_private_and_load_back() {
        let parent = tempfile::tempdir().unwrap();
        let tls_files = TlsFiles::new(parent.path().join("tls"));
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let server_id = ServerId::random();
        let (server_key, issued) = grid_ca.issue_for_self(server_id).unwrap();
        tls_files.save_ca(&grid_ca).unwrap();
        tls_files.save_server(&issued.pem, &server_key).unwrap();

        assert_eq!(file_mode(tls_files.dir()), 0o700);
        assert_eq!(file_mode(&tls_files.ca_key_file()), 0o600);
        assert_eq!(file_mode(&tls_files.server_key_file()), 0o600);
        assert_eq!(file_mode(&tls_files.ca_certificate_file()) & 0o600, 0o600);
        assert_eq!(
            file_mode(&tls_files.server_certificate_file()) & 0o600,
            0o600
        );

        let loaded = tls_files.load().unwrap();
        assert_eq!(loaded.grid_id, grid_ca.grid_id());
        assert_eq!(loaded.server_id, server_id);
        assert_eq!(loaded.ca_cert_der, grid_ca.certificate_der());
        assert_eq!(loaded.server_cert_der, issued.der);
        assert_eq!(
            loaded.server_certificate_chain(),
            vec![issued.der.clone(), grid_ca.certificate_der()]
        );
        assert_eq!(loaded.server_private_key(), server_key.private_key_der());
        assert_eq!(loaded.grid_ca.as_ref().unwrap().pin(), grid_ca.pin());
        assert_eq!(loaded.root_store().unwrap().len(), 1);
        // No temporary files are left behind.
        let mut names: Vec<String> = fs::read_dir(tls_files.dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ca.key", "ca.pem", "server.key", "server.pem"]);

        // Saving again replaces the files and keeps them private.
        tls_files.save_ca(&grid_ca).unwrap();
        assert_eq!(file_mode(&tls_files.ca_key_file()), 0o600);

        // Without ca.key the server still loads; it just cannot admit joiners.
        fs::remove_file(tls_files.ca_key_file()).unwrap();
        assert!(tls_files.load().unwrap().grid_ca.is_none());
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        let tls_files = TlsFiles::new(parent.path());
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let (server_key, issued) = grid_ca.issue_for_self(ServerId::random()).unwrap();
        tls_files.save_ca(&grid_ca).unwrap();
        tls_files.save_server(&issued.pem, &server_key).unwrap();

        for key_file in [tls_files.server_key_file(), tls_files.ca_key_file()] {
            fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
            let error = tls_files.load().unwrap_err();
            match &error {
                IdentityError::KeyFileTooOpen { path, mode } => {
                    assert_eq!(path, &key_file);
                    assert_eq!(*mode, 0o644);
                }
                other => panic!("expected KeyFileTooOpen, got {other:?}"),
            }
            let message = error.to_string();
            assert!(
                message.contains(&format!("chmod 600 {}", key_file.display())),
                "{message}"
            );
            fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
        }
        tls_files.load().unwrap();
    }

    #[test]
    fn mismatched_or_foreign_files_are_refused() {
        let parent = tempfile::tempdir().unwrap();
        let tls_files = TlsFiles::new(parent.path());
        let grid_ca = GridCa::create(GridId::random()).unwrap();
        let (server_key, issued) = grid_ca.issue_for_self(ServerId::random()).unwrap();
        let other_key = ServerKey::generate().unwrap();
        assert!(matches!(
            tls_files.save_server(&issued.pem, &other_key),
            Err(IdentityError::KeyDoesNotMatchCertificate { what: "server" })
        ));
        tls_files.save_ca(&grid_ca).unwrap();
        tls_files.save_server(&issued.pem, &server_key).unwrap();

        // Another grid's key under this grid's certificate.
        let other_ca = GridCa::create(GridId::random()).unwrap();
        write_atomically(
            &tls_files.ca_key_file(),
            other_ca.key_pem().as_bytes(),
            0o600,
        )
        .unwrap();
        let error = tls_files.load().unwrap_err();
        assert!(
            matches!(&error, IdentityError::InvalidFile { path, source }
                if path == &tls_files.ca_key_file()
                    && matches!(**source, IdentityError::KeyDoesNotMatchCertificate { .. })),
            "{error:?}"
        );
        assert_eq!(
            crate::error_chain(&error),
            format!(
                "{} is unusable: the grid ca private key does not belong to its certificate",
                tls_files.ca_key_file().display()
            )
        );

        // A certificate file that is not PEM.
        write_atomically(&tls_files.server_certificate_file(), b"garbage", 0o644).unwrap();
        tls_files.save_ca(&grid_ca).unwrap();
        assert!(matches!(
            tls_files.load(),
            Err(IdentityError::InvalidFile { .. })
        ));

        // A missing directory names the file it lacks.
        let empty = TlsFiles::new(parent.path().join("absent"));
        let error = empty.load().unwrap_err();
        assert!(error.to_string().contains("ca.pem"), "{error}");
    }
}
