//! The messages peers exchange, in a versioned envelope. The transport moves
//! opaque bytes; this file gives them meaning and refuses what it does not
//! understand with a clear error.
//!
//! Compatibility: fields added later default when absent (CBOR maps), and
//! a message from a newer protocol version is refused with both versions
//! named, so a mixed grid during a rolling upgrade fails loudly, not subtly.

use serde::{Deserialize, Serialize};

use crate::desktop::{Reservation, ReserveRefusal, ReserveRequest};
use crate::model::{GridId, ImageVersionId, ServerId, ServerRecord, UserName};
use crate::state::{Delta, VersionVector};
use crate::transfer::{Encoding, Manifest};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;

/// Most bytes of a difference disk in one [`PeerResponse::DiffPart`]: a
/// quarter of the transport's 32 MiB message limit, so an answer always
/// fits with room to spare, and few round trips for a typical update
/// (tens of MiB compressed).
pub const MAX_DIFF_PART_BYTES: u64 = 8 << 20;

/// Every request and response travels in one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u16,
    pub body: T,
}

/// What one server asks another.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerRequest {
    /// Here are changes made or learnt by the sender; merge them.
    PushDelta { delta: Delta },
    /// Send me what I lack: my version vector is `since`.
    PullState { since: VersionVector },
    /// A new server asks to join (only on a join connection).
    Join(Box<JoinRequest>),
    /// Send me the manifest of base image version `image`; answered with
    /// [`PeerResponse::Manifest`] by a server that holds it complete.
    GetManifest { image: ImageVersionId },
    /// Send me data chunk `index` of `image`; answered with
    /// [`PeerResponse::Chunk`] by a server that holds it complete. All-zero
    /// chunks are never asked for (the manifest marks them).
    GetChunk { image: ImageVersionId, index: u64 },
    /// Send me the bytes of `image`'s zstd-compressed difference disk (its
    /// qcow2 overlay on its parent) from `offset` on; answered with
    /// [`PeerResponse::DiffPart`] by a server that holds `image` complete
    /// and kept its difference disk. Parts keep every answer far under the
    /// message limit, however large the overlay.
    GetDiffPart { image: ImageVersionId, offset: u64 },
    /// Which chunks of `image` do you have? Answered with
    /// [`PeerResponse::Have`] by a server that holds it complete or is
    /// pulling it (swarming: a puller serves the chunks it already has).
    GetHave { image: ImageVersionId },
    /// A connection broker asks the server that hosts the desktops to
    /// reserve one for a user; answered with [`PeerResponse::Reserved`] or
    /// [`PeerResponse::ReserveRefused`]. Only grid members may ask.
    Reserve(ReserveRequest),
    /// An admin asks the hosting server to end `user`'s sessions and
    /// reservations there; answered with [`PeerResponse::LoggedOff`] or
    /// [`PeerResponse::ReserveRefused`].
    LogOff { user: UserName },
}

/// What a joining server sends once it has checked the grid's CA.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token's secret, hex; revealed only after the CA pin matched.
    pub secret_hex: String,
    /// The joiner's id, chosen by the joiner, certified by the grid.
    pub server_id: ServerId,
    /// Certificate signing request for the joiner's own key (PEM).
    pub csr_pem: String,
    pub record: ServerRecord,
}

impl std::fmt::Debug for JoinRequest {
    /// The secret never reaches a log.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("JoinRequest")
            .field("secret_hex", &"<redacted>")
            .field("server_id", &self.server_id)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// What a joiner receives.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct JoinGrant {
    pub grid_id: GridId,
    pub certificate_pem: String,
    pub ca_certificate_pem: String,
    /// Any member admits joiners, so every member holds the CA key.
    pub ca_key_pem: String,
    /// The whole grid state.
    pub state: Delta,
}

impl std::fmt::Debug for JoinGrant {
    /// The CA key never reaches a log.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("JoinGrant")
            .field("grid_id", &self.grid_id)
            .field("ca_key_pem", &"<redacted>")
            .field("state_entries", &self.state.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerResponse {
    /// A push was merged; `changed` entries were new here.
    Merged {
        changed: usize,
    },
    /// What the asker lacked, and the answerer's own vector, so the asker
    /// can push back what the answerer lacks (push-pull anti-entropy).
    State {
        delta: Delta,
        #[serde(default)]
        vector: VersionVector,
    },
    Joined(Box<JoinGrant>),
    /// The manifest asked for. The asker checks it against the root digest
    /// the grid state gives before trusting any of it.
    Manifest {
        manifest: Manifest,
    },
    /// One chunk's bytes as they travel (zstd when that paid off). The
    /// asker decodes within the chunk size and verifies the SHA-256 before
    /// writing a byte of it.
    Chunk {
        index: u64,
        encoding: Encoding,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Bytes of a compressed difference disk from the asked offset on (at
    /// most [`MAX_DIFF_PART_BYTES`]), and the file's whole length. The asker
    /// bounds `total` before it fetches more, and trusts none of it until
    /// the version it rebuilds verifies against the grid's root digest.
    DiffPart {
        total: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The chunks of the asked version the answerer holds now.
    Have(crate::transfer::Have),
    /// A desktop reserved for the user of a [`PeerRequest::Reserve`], with
    /// its one-time display ticket. The asker bounds its texts
    /// (`node::request_reserve`) before passing it on.
    Reserved(Box<Reservation>),
    /// The hosting server reserved nothing (none free, its desktop service
    /// not running, a failure on its host) or could not log a user off.
    ReserveRefused(ReserveRefusal),
    /// The sessions and reservations a [`PeerRequest::LogOff`] ended.
    LoggedOff {
        ended: u32,
    },
    /// Refused, with a reason for an operator.
    Refused {
        reason: String,
    },
}

/// Why bytes from a peer are not a message we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message cannot be decoded: {0}")]
    Malformed(String),
    #[error("peer speaks protocol version {found}, this server speaks {PROTOCOL_VERSION}: upgrade the older one")]
    Version { found: u16 },
}

/// Encodes a message in the current envelope.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(
        &Envelope {
            version: PROTOCOL_VERSION,
            body,
        },
        &mut bytes,
    )
    .expect("CBOR encoding of a message into memory cannot fail");
    bytes
}

/// Decodes a message, checking the envelope's version first.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ProtocolError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u16,
    }
    let header: VersionOnly = ciborium::from_reader(bytes)
        .map_err(|error| ProtocolError::Malformed(error.to_string()))?;
    if header.version != PROTOCOL_VERSION {
        return Err(ProtocolError::Version {
            found: header.version,
        });
    }
    let envelope: Envelope<T> = ciborium::from_reader(bytes)
        .map_err(|error| ProtocolError::Malformed(error.to_string()))?;
    Ok(envelope.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let request = PeerRequest::PullState {
            since: VersionVector::new(),
        };
        assert_eq!(decode::<PeerRequest>(&encode(&request)), Ok(request));
    }

    #[test]
    fn image_messages_round_trip_and_carry_chunks_as_byte_strings() {
        let image = ImageVersionId::new("office-v1").unwrap();
        for request in [
            PeerRequest::GetManifest {
                image: image.clone(),
            },
            PeerRequest::GetChunk {
                image: image.clone(),
                index: 7,
            },
            PeerRequest::GetDiffPart {
                image,
                offset: 8 << 20,
            },
        ] {
            assert_eq!(decode::<PeerRequest>(&encode(&request)), Ok(request));
        }
        let data = vec![0xa5u8; 100_000];
        let chunk = PeerResponse::Chunk {
            index: 7,
            encoding: Encoding::Raw,
            data: data.clone(),
        };
        let bytes = encode(&chunk);
        // A CBOR array of small integers would take up to two bytes each.
        assert!(bytes.len() < data.len() + 100, "{} bytes", bytes.len());
        assert_eq!(decode::<PeerResponse>(&bytes), Ok(chunk));
        let part = PeerResponse::DiffPart {
            total: 1 << 30,
            data: data.clone(),
        };
        let bytes = encode(&part);
        assert!(bytes.len() < data.len() + 100, "{} bytes", bytes.len());
        assert_eq!(decode::<PeerResponse>(&bytes), Ok(part));
        let manifest = Manifest {
            virtual_size: 3 << 16,
            chunk_size: 1 << 16,
            chunks: vec![
                crate::transfer::ChunkEntry::Zero,
                crate::transfer::ChunkEntry::Data([9; 32]),
                crate::transfer::ChunkEntry::Zero,
            ],
        };
        let answer = PeerResponse::Manifest { manifest };
        assert_eq!(decode::<PeerResponse>(&encode(&answer)), Ok(answer));
    }

    #[test]
    fn reservation_messages_round_trip_and_the_ticket_stays_out_of_debug() {
        let template = crate::model::TemplateName::new("office").unwrap();
        let user = UserName::new("alice").unwrap();
        for request in [
            PeerRequest::Reserve(ReserveRequest {
                user: user.clone(),
                template: template.clone(),
            }),
            PeerRequest::LogOff { user },
        ] {
            assert_eq!(decode::<PeerRequest>(&encode(&request)), Ok(request));
        }
        let reserved = PeerResponse::Reserved(Box::new(Reservation {
            vm: crate::model::VmId::from_bytes([3; 16]),
            template: template.clone(),
            server: "b".to_owned(),
            protocol: crate::model::DisplayProtocol::Spice,
            host: "10.0.0.2".to_owned(),
            port: 5901,
            password: "one-time-ticket".to_owned(),
            expires_at_ms: 99,
            returning: false,
        }));
        assert!(!format!("{reserved:?}").contains("one-time-ticket"));
        for answer in [
            reserved,
            PeerResponse::ReserveRefused(ReserveRefusal::NoneFree {
                template,
                preparing: 2,
            }),
            PeerResponse::LoggedOff { ended: 1 },
        ] {
            assert_eq!(decode::<PeerResponse>(&encode(&answer)), Ok(answer));
        }
    }

    #[test]
    fn another_version_is_refused_by_name() {
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &Envelope {
                version: 9,
                body: "whatever",
            },
            &mut bytes,
        )
        .unwrap();
        let error = decode::<PeerRequest>(&bytes).unwrap_err();
        assert_eq!(error, ProtocolError::Version { found: 9 });
        assert!(error.to_string().contains("version 9"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for garbage in [&b""[..], b"\xff\xff\xff", b"\xa1\x67version\x19\x00\x01"] {
            assert!(decode::<PeerRequest>(garbage).is_err());
        }
    }
}
