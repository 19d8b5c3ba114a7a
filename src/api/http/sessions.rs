//! The HTTPS API's session tokens: issued at `POST /api/v1/login` after one
//! password check, so a portal's connects and reconnects do not pay
//! argon2id (about 20 ms of a core) each time; during a 9 a.m. login storm
//! every user pays it once.
//!
//! Sans I/O: the clock and the token bytes are arguments. Tokens live in
//! this appliance's memory only (a restart logs everyone out of the API,
//! not out of their desktops), and only their SHA-256 is kept: a memory
//! dump or a debug print shows no usable token. A token looked up by its
//! hash needs no constant-time comparison: the hash of a guess says
//! nothing about the real token.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::model::UserName;

/// How long a token works after login: a working day, so a user logs in
/// in the morning and the portal reconnects them all day.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Tokens kept at most (about 150 bytes each, so 15 MB): beyond it the
/// oldest is dropped, so a flood of logins cannot grow memory without bound.
/// Every user of a large grid logged in on one appliance fits.
pub const MAX_SESSIONS: usize = 100_000;
/// Bytes of randomness in a token: 256 bits, never guessed.
pub const TOKEN_BYTES: usize = 32;

/// A session token as the client holds it (64 hex digits): never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken(String);

impl SessionToken {
    /// The token for `random` bytes (from the OS's generator).
    pub fn from_random(random: [u8; TOKEN_BYTES]) -> Self {
        Self(hex::encode(random))
    }

    /// A token as a client sent it; any text, checked by lookup only.
    pub fn from_client(text: &str) -> Self {
        Self(text.to_owned())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("SessionToken(<redacted>)")
    }
}

#[derive(Debug, Clone)]
struct Session {
    user: UserName,
    expires_at_ms: u64,
    /// Issue order, the key in `by_age`.
    sequence: u64,
}

/// Live sessions by the SHA-256 of their token.
#[derive(Debug)]
pub struct SessionStore {
    sessions: HashMap<[u8; 32], Session>,
    /// Issue order → token digest: the oldest first, for eviction and
    /// expiry (every token has the same lifetime, so the oldest issued is
    /// the first to expire).
    by_age: BTreeMap<u64, [u8; 32]>,
    next_sequence: u64,
    ttl_ms: u64,
    capacity: usize,
}

impl Default for SessionStore {
    fn default() -> Self {
        Self::new(SESSION_TTL, MAX_SESSIONS)
    }
}

impl SessionStore {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            sessions: HashMap::new(),
            by_age: BTreeMap::new(),
            next_sequence: 0,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            capacity: capacity.max(1),
        }
    }

    /// Starts a session of `user` under `token` (made from fresh random
    /// bytes by the caller); returns when it expires.
    pub fn issue(&mut self, token: &SessionToken, user: UserName, now_ms: u64) -> u64 {
        self.expire(now_ms);
        while self.sessions.len() >= self.capacity {
            let Some((_, digest)) = self.by_age.pop_first() else {
                break;
            };
            self.sessions.remove(&digest);
        }
        let expires_at_ms = now_ms.saturating_add(self.ttl_ms);
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let digest = token.digest();
        if let Some(old) = self.sessions.insert(
            digest,
            Session {
                user,
                expires_at_ms,
                sequence,
            },
        ) {
            self.by_age.remove(&old.sequence);
        }
        self.by_age.insert(sequence, digest);
        expires_at_ms
    }

    /// The user of a live session, or `None` for a token unknown, logged
    /// out, evicted or expired.
    pub fn user(&mut self, token: &SessionToken, now_ms: u64) -> Option<UserName> {
        self.expire(now_ms);
        self.sessions
            .get(&token.digest())
            .map(|session| session.user.clone())
    }

    /// Ends the session; whether there was one.
    pub fn revoke(&mut self, token: &SessionToken) -> bool {
        match self.sessions.remove(&token.digest()) {
            Some(session) => {
                self.by_age.remove(&session.sequence);
                true
            }
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn expire(&mut self, now_ms: u64) {
        while let Some((&sequence, digest)) = self.by_age.first_key_value() {
            let expired = self
                .sessions
                .get(digest)
                .is_none_or(|session| session.expires_at_ms <= now_ms);
            if !expired {
                break;
            }
            let digest = *digest;
            self.by_age.remove(&sequence);
            self.sessions.remove(&digest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserName {
        UserName::new(name).expect("test names are valid")
    }

    fn token(byte: u8) -> SessionToken {
        SessionToken::from_random([byte; TOKEN_BYTES])
    }

    #[test]
    fn a_token_works_until_it_expires_or_is_revoked() {
        let mut store = SessionStore::new(Duration::from_secs(10), 100);
        let expires = store.issue(&token(1), user("alice"), 1_000);
        assert_eq!(expires, 11_000);
        assert_eq!(store.user(&token(1), 10_999), Some(user("alice")));
        assert_eq!(store.user(&token(2), 10_999), None, "another token");
        assert_eq!(store.user(&token(1), 11_000), None, "expired");
        assert!(store.is_empty(), "an expired session is dropped");

        store.issue(&token(3), user("bob"), 20_000);
        assert!(store.revoke(&token(3)));
        assert!(!store.revoke(&token(3)));
        assert_eq!(store.user(&token(3), 20_001), None);
    }

    #[test]
    fn at_capacity_the_oldest_session_goes() {
        let mut store = SessionStore::new(Duration::from_secs(3600), 3);
        for byte in 1..=3 {
            store.issue(&token(byte), user("alice"), 1_000 + u64::from(byte));
        }
        // A revoked one in the middle leaves room without an eviction.
        assert!(store.revoke(&token(2)));
        store.issue(&token(4), user("bob"), 2_000);
        assert_eq!(store.len(), 3);
        store.issue(&token(5), user("carol"), 3_000);
        assert_eq!(store.len(), 3);
        assert_eq!(store.user(&token(1), 3_001), None, "the oldest evicted");
        for byte in [3, 4, 5] {
            assert!(store.user(&token(byte), 3_001).is_some(), "{byte}");
        }
    }

    #[test]
    fn only_the_tokens_hash_is_kept_and_nothing_prints_it() {
        let mut store = SessionStore::default();
        let secret = token(0xab);
        store.issue(&secret, user("alice"), 0);
        let printed = format!("{store:?} {secret:?}");
        assert!(!printed.contains(secret.expose()), "{printed}");
        assert_eq!(secret.expose().len(), 2 * TOKEN_BYTES);
    }
}
