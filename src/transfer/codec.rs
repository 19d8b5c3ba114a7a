//! Chunks on the wire: zstd-compressed when that pays, raw otherwise.
//!
//! Level 1 compresses an OS disk's file content ~2.6:1 at ~0.7 GB/s per
//! core; random data (already compressed files, encrypted blocks) would only
//! cost CPU, so a chunk that does not shrink by at least 1/8 goes raw.
//! Decoding is bounded: a chunk never inflates past the manifest's chunk size.

use serde::{Deserialize, Serialize};

/// zstd's fastest level: the network, not the CPU, should be the limit.
pub const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Encoding {
    Raw,
    Zstd,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("a compressed chunk does not decompress within {limit} bytes")]
    Decompress {
        limit: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("a raw chunk of {found} bytes is over the {limit}-byte chunk size")]
    TooLarge { found: usize, limit: usize },
}

/// The bytes to send for `data`, and how they are encoded.
pub fn encode(data: &[u8]) -> (Encoding, Vec<u8>) {
    if data.is_empty() {
        return (Encoding::Raw, Vec::new());
    }
    match zstd::bulk::compress(data, ZSTD_LEVEL) {
        Ok(compressed) if compressed.len() <= data.len() - data.len() / 8 => {
            (Encoding::Zstd, compressed)
        }
        _ => (Encoding::Raw, data.to_vec()),
    }
}

/// The chunk's bytes, refusing anything longer than `limit`.
pub fn decode(encoding: Encoding, bytes: Vec<u8>, limit: usize) -> Result<Vec<u8>, CodecError> {
    match encoding {
        Encoding::Raw if bytes.len() > limit => Err(CodecError::TooLarge {
            found: bytes.len(),
            limit,
        }),
        Encoding::Raw => Ok(bytes),
        Encoding::Zstd => zstd::bulk::decompress(&bytes, limit)
            .map_err(|source| CodecError::Decompress { limit, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_compressed_and_random_bytes_are_not() {
        let text = b"deskgrid desktop image file content ".repeat(2000);
        let (encoding, bytes) = encode(&text);
        assert_eq!(encoding, Encoding::Zstd);
        assert!(bytes.len() < text.len() / 10);
        assert_eq!(decode(encoding, bytes, text.len()).unwrap(), text);

        let mut random = vec![0u8; 65_536];
        rand::Rng::fill(&mut rand::rng(), &mut random[..]);
        let (encoding, bytes) = encode(&random);
        assert_eq!(encoding, Encoding::Raw);
        assert_eq!(decode(encoding, bytes, random.len()).unwrap(), random);
    }

    #[test]
    fn decoding_is_bounded() {
        let zeros = vec![0u8; 1 << 20];
        let (encoding, bomb) = encode(&zeros);
        assert_eq!(encoding, Encoding::Zstd);
        assert!(matches!(
            decode(encoding, bomb, 64 << 10),
            Err(CodecError::Decompress { .. })
        ));
        assert!(matches!(
            decode(Encoding::Raw, vec![1; 10], 9),
            Err(CodecError::TooLarge {
                found: 10,
                limit: 9
            })
        ));
        assert!(decode(Encoding::Zstd, b"not zstd".to_vec(), 100).is_err());
    }
}
