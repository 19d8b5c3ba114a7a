//! Join tokens: how a new server proves it may join a grid, and how it knows
//! it reached the right grid before it proves anything.
//!
//! # Design (after kubeadm's discovery token)
//!
//! The operator runs `deskgrid token create` on any member and gets
//!
//! ```text
//! dgj1.<ca pin: 64 hex digits>.<secret: 64 hex digits>
//! ```
//!
//! - `dgj1` names the format and its version, so a later format is refused
//!   with a message instead of misread.
//! - The **CA pin** is the SHA-256 of the grid CA certificate. The joiner
//!   compares it with the CA certificate the member presents and sends
//!   nothing secret to a server whose CA does not match: a token typed into
//!   the wrong network reaches nobody who could replay it.
//! - The **secret** is 32 random bytes. It is written in hex, not base64url:
//!   hex is what the pin already uses, what `JoinRequest::secret_hex` carries,
//!   needs no extra crate, and survives any copy/paste or shell quoting; the
//!   cost is 21 more characters than base64url.
//! - The grid stores only `secret_hash` = hex SHA-256 of the secret (a
//!   `model::JoinToken`, keyed by that hash in the state), its expiry and the
//!   uses left. Reading the state (or a backup of it) gives no usable token.
//!
//! `Display` of [`JoinTokenText`] prints the whole token, secret included,
//! for showing it once to the operator; `Debug` and every error leave the
//! secret out, so a token never reaches a log by accident.
//!
//! A token's uses are a last-writer-wins register like all grid
//! configuration: two members admitting with the same token at the same
//! moment may both start from the same count, so a token may admit a few
//! more servers than its uses during a partition. Expiry is exact.
//!
//! **Invariant:** nothing here does I/O or reads the clock: the time and the
//! random source are arguments.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::federation::identity::CaPin;
use crate::model::JoinToken;

/// The first field of every token this version writes and reads.
pub const JOIN_TOKEN_PREFIX: &str = "dgj1";
const JOIN_TOKEN_VERSION: u32 = 1;
/// The most uses a token may be given: `model::users::MAX_TOKEN_USES`, which
/// `model` does not re-export yet; `the_use_limit_is_the_models` keeps the
/// two equal.
pub const MAX_TOKEN_USES: u32 = 1_000;
/// Bytes of randomness in a token's secret: 256 bits, beyond guessing.
pub const SECRET_LEN: usize = 32;
/// Shorter than this and the operator cannot paste the token on the other
/// host in time; it would only produce refusals.
pub const MIN_TOKEN_TTL: Duration = Duration::from_secs(60);
/// A join token is a standing invitation to hold the CA key; one that lives
/// past a month is forgotten rather than revoked. Longer-lived automation
/// creates tokens as it needs them.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a token's text or parameters were refused. No variant carries any of
/// the text it was given, so no message can reveal a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    #[error("the join token is empty")]
    Empty,
    #[error("this is not a deskgrid join token: a join token starts with `dgj1.`")]
    WrongPrefix,
    #[error(
        "the join token has format version {version}, this deskgrid reads version 1: create the token with a deskgrid of the same version"
    )]
    UnsupportedVersion { version: u32 },
    #[error(
        "a join token has 3 fields separated by '.', this one has {found}: check that it was copied whole"
    )]
    WrongFieldCount { found: usize },
    #[error(
        "the join token's {field} has {found} characters, it must have {expected}: check that it was copied whole"
    )]
    WrongLength {
        field: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("the join token's {field} is not hexadecimal (0-9, a-f)")]
    BadHex { field: &'static str },
    #[error("a join token's uses must be between 1 and {max}, not {uses}")]
    UsesOutOfRange { uses: u32, max: u32 },
    #[error(
        "a join token's lifetime must be between 1 minute and 30 days, not {ttl_seconds} seconds"
    )]
    TtlOutOfRange { ttl_seconds: u64 },
}

/// Why a member refused a joiner's token: a domain outcome, not a fault.
/// Every message tells the operator what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// No token with this secret exists (never created, revoked, or mistyped).
    #[error(
        "the join token is not known to this grid: check that it was copied whole, or create a new one with `deskgrid token create`"
    )]
    UnknownToken,
    #[error("the join token has expired: create a new one with `deskgrid token create`")]
    Expired { expired_at_ms: u64 },
    #[error(
        "the join token has been used as many times as it allows: create a new one with `deskgrid token create`"
    )]
    UsedUp,
}

/// A join token as the operator copies it: `dgj1.<ca pin>.<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokenText {
    /// The SHA-256 of the grid CA certificate the joiner must find.
    pub ca_pin: CaPin,
    secret: [u8; SECRET_LEN],
}

impl JoinTokenText {
    pub fn new(ca_pin: CaPin, secret: [u8; SECRET_LEN]) -> Self {
        Self { ca_pin, secret }
    }

    /// The secret, to send once the CA pin matched.
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// The secret as `JoinRequest::secret_hex` carries it.
    pub fn secret_hex(&self) -> String {
        hex::encode(self.secret)
    }

    /// The state's key for this token's record.
    pub fn secret_hash(&self) -> String {
        secret_hash(&self.secret)
    }
}

impl fmt::Debug for JoinTokenText {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("JoinTokenText")
            .field("ca_pin", &self.ca_pin)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl fmt::Display for JoinTokenText {
    /// The whole token, secret included: for showing it to the operator once.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{JOIN_TOKEN_PREFIX}.{}.{}",
            self.ca_pin,
            hex::encode(self.secret)
        )
    }
}

impl FromStr for JoinTokenText {
    type Err = JoinTokenError;

    /// Surrounding whitespace (a pasted newline) is ignored; hex may be of
    /// either case; anything else must be exact.
    fn from_str(text: &str) -> Result<Self, JoinTokenError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(JoinTokenError::Empty);
        }
        let fields: Vec<&str> = text.split('.').collect();
        check_prefix(fields[0])?;
        let [_, pin_hex, secret_hex] = fields.as_slice() else {
            return Err(JoinTokenError::WrongFieldCount {
                found: fields.len(),
            });
        };
        let ca_pin = CaPin::from_bytes(decode_hex_field(pin_hex, "ca pin")?);
        let secret = decode_hex_field(secret_hex, "secret")?;
        Ok(Self { ca_pin, secret })
    }
}

/// `dgj1`, or a clear word about which version this is if it is `dgj<n>`.
/// The field is never echoed: pasted alone, a secret would be this field.
fn check_prefix(field: &str) -> Result<(), JoinTokenError> {
    if field == JOIN_TOKEN_PREFIX {
        return Ok(());
    }
    let version = field
        .strip_prefix("dgj")
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|digits| digits.parse::<u32>().ok());
    match version {
        Some(version) if version != JOIN_TOKEN_VERSION => {
            Err(JoinTokenError::UnsupportedVersion { version })
        }
        _ => Err(JoinTokenError::WrongPrefix),
    }
}

fn decode_hex_field(field: &str, name: &'static str) -> Result<[u8; 32], JoinTokenError> {
    let mut bytes = [0u8; 32];
    let expected = bytes.len() * 2;
    let found = field.chars().count();
    if found != expected {
        return Err(JoinTokenError::WrongLength {
            field: name,
            found,
            expected,
        });
    }
    hex::decode_to_slice(field, &mut bytes).map_err(|_| JoinTokenError::BadHex { field: name })?;
    Ok(bytes)
}

/// A token's secret as `JoinRequest::secret_hex` carries it: 64 hex digits.
pub fn parse_secret_hex(text: &str) -> Result<[u8; SECRET_LEN], JoinTokenError> {
    decode_hex_field(text, "secret")
}

/// Hex SHA-256 of a secret: the record's `secret_hash`, and its key in the
/// state (`ConfigKey::JoinToken`).
pub fn secret_hash(secret: &[u8; SECRET_LEN]) -> String {
    hex::encode(Sha256::digest(secret))
}

/// A new token for the grid whose CA has `ca_pin`, valid for `ttl` from
/// `now_ms` (Unix milliseconds) and for `uses` joins: its text, to show the
/// operator once, and its record, to store in the grid state.
///
/// `uses` must be in `1..=MAX_TOKEN_USES` and `ttl` between
/// [`MIN_TOKEN_TTL`] and [`MAX_TOKEN_TTL`]. `rng` must be a cryptographic
/// generator (`rand::rng()` in production): the secret is the whole of the
/// token's strength.
pub fn create_token<R: rand::CryptoRng + ?Sized>(
    ca_pin: CaPin,
    ttl: Duration,
    uses: u32,
    now_ms: u64,
    rng: &mut R,
) -> Result<(JoinTokenText, JoinToken), JoinTokenError> {
    if !(1..=MAX_TOKEN_USES).contains(&uses) {
        return Err(JoinTokenError::UsesOutOfRange {
            uses,
            max: MAX_TOKEN_USES,
        });
    }
    if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&ttl) {
        return Err(JoinTokenError::TtlOutOfRange {
            ttl_seconds: ttl.as_secs(),
        });
    }
    let mut secret = [0u8; SECRET_LEN];
    rng.fill_bytes(&mut secret);
    let ttl_ms = u64::try_from(ttl.as_millis()).expect("ttl is at most 30 days in milliseconds");
    let record = JoinToken {
        secret_hash: secret_hash(&secret),
        expires_at_ms: now_ms.saturating_add(ttl_ms),
        uses_left: uses,
    };
    Ok((JoinTokenText::new(ca_pin, secret), record))
}

/// Decides whether `presented_secret` may join under `record` at `now_ms`;
/// if so, returns the record with one use fewer, to write back to the state.
///
/// Checks in this order: the secret (so a wrong secret learns nothing about
/// the token), the expiry (the token admits up to and including
/// `expires_at_ms`), the uses left.
///
/// The comparison is of SHA-256 outputs, with a loop that looks at every
/// byte whatever it finds. Even a comparison that stopped early would leak
/// only how much of the *hash* of a guess matches, which does not help find
/// a secret with that hash; the constant-time loop costs nothing, so it
/// stays, and no extra crate (`subtle`) is needed for it.
pub fn admit(
    record: &JoinToken,
    presented_secret: &[u8; SECRET_LEN],
    now_ms: u64,
) -> Result<JoinToken, JoinRefusal> {
    let presented_hash: [u8; 32] = Sha256::digest(presented_secret).into();
    let mut stored_hash = [0u8; 32];
    // A malformed stored hash matches no secret.
    if hex::decode_to_slice(&record.secret_hash, &mut stored_hash).is_err()
        || !hashes_equal(&presented_hash, &stored_hash)
    {
        return Err(JoinRefusal::UnknownToken);
    }
    if now_ms > record.expires_at_ms {
        return Err(JoinRefusal::Expired {
            expired_at_ms: record.expires_at_ms,
        });
    }
    let uses_left = record.uses_left.checked_sub(1).ok_or(JoinRefusal::UsedUp)?;
    Ok(JoinToken {
        uses_left,
        ..record.clone()
    })
}

fn hashes_equal(left: &[u8; 32], right: &[u8; 32]) -> bool {
    let difference = left
        .iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;
    use rand::SeedableRng as _;

    const NOW_MS: u64 = 1_700_000_000_000;
    const HOUR: Duration = Duration::from_secs(3600);

    fn pin() -> CaPin {
        CaPin::from_bytes([0xab; 32])
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    fn token() -> (JoinTokenText, JoinToken) {
        create_token(pin(), HOUR, 2, NOW_MS, &mut rng()).unwrap()
    }

    #[test]
    fn text_round_trips() {
        let (text, record) = token();
        let written = text.to_string();
        assert_eq!(written.len(), 4 + 1 + 64 + 1 + 64);
        assert!(written.starts_with(&format!("dgj1.{}.", pin())));
        assert_eq!(written.parse::<JoinTokenText>().unwrap(), text);
        assert_eq!(
            format!("  {}\n", written.to_uppercase().replace("DGJ1", "dgj1"))
                .parse::<JoinTokenText>()
                .unwrap(),
            text
        );
        assert_eq!(text.secret_hash(), record.secret_hash);
        assert_eq!(secret_hash(text.secret()), record.secret_hash);
        assert_eq!(
            parse_secret_hex(&text.secret_hex()).unwrap(),
            *text.secret()
        );
    }

    #[test]
    fn the_record_is_valid_and_holds_only_the_hash() {
        let (text, record) = token();
        record.validate().unwrap();
        assert_eq!(record.expires_at_ms, NOW_MS + 3_600_000);
        assert_eq!(record.uses_left, 2);
        assert!(!format!("{record:?}").contains(&text.secret_hex()));
        // Two tokens from one generator differ.
        let mut generator = rng();
        let (first, _) = create_token(pin(), HOUR, 1, NOW_MS, &mut generator).unwrap();
        let (second, _) = create_token(pin(), HOUR, 1, NOW_MS, &mut generator).unwrap();
        assert_ne!(first.secret(), second.secret());
    }

    #[test]
    fn each_parse_error_is_named_and_never_echoes_the_secret() {
        let (text, _) = token();
        let secret = text.secret_hex();
        let pin = pin().to_string();
        let cases: Vec<(String, JoinTokenError)> = vec![
            (String::new(), JoinTokenError::Empty),
            ("  \n".into(), JoinTokenError::Empty),
            (secret.clone(), JoinTokenError::WrongPrefix),
            (format!("kube1.{pin}.{secret}"), JoinTokenError::WrongPrefix),
            (format!("dgj01.{pin}.{secret}"), JoinTokenError::WrongPrefix),
            (format!("dgj+2.{pin}.{secret}"), JoinTokenError::WrongPrefix),
            (
                format!("dgj2.{pin}.{secret}"),
                JoinTokenError::UnsupportedVersion { version: 2 },
            ),
            (
                format!("dgj1.{pin}"),
                JoinTokenError::WrongFieldCount { found: 2 },
            ),
            (
                format!("dgj1.{pin}.{secret}.extra"),
                JoinTokenError::WrongFieldCount { found: 4 },
            ),
            (
                format!("dgj1.{}.{secret}", &pin[..63]),
                JoinTokenError::WrongLength {
                    field: "ca pin",
                    found: 63,
                    expected: 64,
                },
            ),
            (
                format!("dgj1.{pin}.{secret}0"),
                JoinTokenError::WrongLength {
                    field: "secret",
                    found: 65,
                    expected: 64,
                },
            ),
            (
                format!("dgj1.{pin}.{}g", &secret[..63]),
                JoinTokenError::BadHex { field: "secret" },
            ),
            (
                format!("dgj1.{}é.{secret}", &pin[..63]),
                JoinTokenError::BadHex { field: "ca pin" },
            ),
        ];
        for (input, expected) in cases {
            let error = input.parse::<JoinTokenText>().unwrap_err();
            assert_eq!(error, expected, "input {input:?}");
            let message = error.to_string();
            assert!(!message.contains(&secret[..16]), "{message}");
            assert!(!format!("{error:?}").contains(&secret[..16]));
        }
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let (text, _) = token();
        let debug = format!("{text:?}");
        assert!(!debug.contains(&text.secret_hex()[..16]), "{debug}");
        assert!(debug.contains("<redacted>"));
        assert!(debug.contains(&pin().to_string()));
    }

    #[test]
    fn creation_checks_uses_and_lifetime() {
        let create = |ttl, uses| create_token(pin(), ttl, uses, NOW_MS, &mut rng());
        assert_eq!(
            create(HOUR, 0).unwrap_err(),
            JoinTokenError::UsesOutOfRange { uses: 0, max: 1000 }
        );
        assert!(create(HOUR, 1000).is_ok());
        assert!(matches!(
            create(HOUR, 1001),
            Err(JoinTokenError::UsesOutOfRange { .. })
        ));
        assert!(create(MIN_TOKEN_TTL, 1).is_ok());
        assert!(create(MAX_TOKEN_TTL, 1).is_ok());
        assert_eq!(
            create(Duration::from_secs(59), 1).unwrap_err(),
            JoinTokenError::TtlOutOfRange { ttl_seconds: 59 }
        );
        assert!(matches!(
            create(MAX_TOKEN_TTL + Duration::from_secs(1), 1),
            Err(JoinTokenError::TtlOutOfRange { .. })
        ));
    }

    #[test]
    fn the_use_limit_is_the_models() {
        let (_, record) = token();
        let at_limit = JoinToken {
            uses_left: MAX_TOKEN_USES,
            ..record.clone()
        };
        at_limit.validate().unwrap();
        let over_limit = JoinToken {
            uses_left: MAX_TOKEN_USES + 1,
            ..record
        };
        assert!(over_limit.validate().is_err());
    }

    #[test]
    fn admission_uses_up_the_token() {
        let (text, record) = token();
        let once = admit(&record, text.secret(), NOW_MS).unwrap();
        assert_eq!(once.uses_left, 1);
        assert_eq!(once.secret_hash, record.secret_hash);
        assert_eq!(once.expires_at_ms, record.expires_at_ms);
        let twice = admit(&once, text.secret(), NOW_MS + 1).unwrap();
        assert_eq!(twice.uses_left, 0);
        assert_eq!(
            admit(&twice, text.secret(), NOW_MS + 2),
            Err(JoinRefusal::UsedUp)
        );
    }

    #[test]
    fn an_expired_token_admits_nobody() {
        let (text, record) = token();
        assert!(admit(&record, text.secret(), record.expires_at_ms).is_ok());
        let refusal = admit(&record, text.secret(), record.expires_at_ms + 1).unwrap_err();
        assert_eq!(
            refusal,
            JoinRefusal::Expired {
                expired_at_ms: record.expires_at_ms
            }
        );
        assert_eq!(
            refusal.to_string(),
            "the join token has expired: create a new one with `deskgrid token create`"
        );
    }

    #[test]
    fn a_wrong_secret_is_an_unknown_token_whatever_the_record_says() {
        let (text, record) = token();
        let mut wrong = *text.secret();
        wrong[31] ^= 1;
        assert_eq!(
            admit(&record, &wrong, NOW_MS),
            Err(JoinRefusal::UnknownToken)
        );
        // Even when the record is also expired and used up.
        let stale = JoinToken {
            uses_left: 0,
            ..record.clone()
        };
        assert_eq!(
            admit(&stale, &wrong, record.expires_at_ms + 1),
            Err(JoinRefusal::UnknownToken)
        );
        let malformed = JoinToken {
            secret_hash: "not hex".into(),
            ..record
        };
        assert_eq!(
            admit(&malformed, text.secret(), NOW_MS),
            Err(JoinRefusal::UnknownToken)
        );
    }

    proptest! {
        #[test]
        fn parsing_never_panics(input in any::<String>()) {
            let _ = input.parse::<JoinTokenText>();
        }

        #[test]
        fn parsing_token_shaped_text_never_panics(
            input in "(dgj[0-9]{0,3}|\\PC{0,5})(\\.[0-9a-fA-Fé]{0,70}){0,4}"
        ) {
            let _ = input.parse::<JoinTokenText>();
        }

        #[test]
        fn any_token_round_trips(pin in any::<[u8; 32]>(), secret in any::<[u8; 32]>()) {
            let text = JoinTokenText::new(CaPin::from_bytes(pin), secret);
            prop_assert_eq!(text.to_string().parse::<JoinTokenText>().unwrap(), text);
        }
    }
}
