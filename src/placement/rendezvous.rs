//! Rendezvous (highest-random-weight) hashing: a stable, platform-independent
//! score for every (object, server) pair, mixed with the grid's seed.
//!
//! FNV-1a folds the object's bytes and the server id; SplitMix64's finaliser
//! spreads the result. Neither depends on the process, the platform or the
//! Rust version, so every server computes the same scores.

use crate::model::ServerId;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// A grid-wide seed from any bytes (the grid id, in practice).
pub fn seed_from_bytes(bytes: &[u8]) -> u64 {
    mix(fnv1a(FNV_OFFSET, bytes))
}

/// The hash of an object's key under `seed`, computed once per object.
pub(crate) fn object_hash(seed: u64, key: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET ^ seed, key)
}

/// The score of `server` for an object whose [`object_hash`] is `object`.
pub(crate) fn score(object: u64, server: ServerId) -> u64 {
    mix(fnv1a(object, server.as_bytes()))
}

/// The rendezvous score of `server` for the object named `key`: the higher,
/// the more this server is preferred when everything else ties.
pub fn rendezvous(seed: u64, key: &[u8], server: ServerId) -> u64 {
    score(object_hash(seed, key), server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_fixed_numbers() {
        // Pinned values (computed independently from the FNV-1a and
        // SplitMix64 definitions): a change here changes every grid's
        // placement, and servers of different versions would disagree.
        let server = ServerId::from_bytes([7; 16]);
        assert_eq!(rendezvous(0, b"office", server), 0x7832_3f04_fa3f_ffcb);
        assert_eq!(rendezvous(1, b"office", server), 0xb5e5_ebbb_cbde_38b7);
        assert_eq!(seed_from_bytes(b""), 0xf52a_15e9_a9b5_e89b);
        assert_ne!(
            rendezvous(0, b"office", server),
            rendezvous(0, b"office", ServerId::from_bytes([8; 16]))
        );
    }

    #[test]
    fn the_top_server_is_spread_evenly() {
        let servers: Vec<ServerId> = (0..10u8).map(|i| ServerId::from_bytes([i; 16])).collect();
        let mut wins = [0u32; 10];
        for object in 0..10_000u32 {
            let key = object.to_le_bytes();
            let best = (0..10)
                .max_by_key(|&i| rendezvous(42, &key, servers[i]))
                .unwrap();
            wins[best] += 1;
        }
        for count in wins {
            assert!((800..1200).contains(&count), "uneven spread: {wins:?}");
        }
    }
}
