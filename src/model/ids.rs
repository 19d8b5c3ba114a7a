//! Random identifiers for servers, VMs and sessions.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ModelError;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $type:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $type(uuid::Uuid);

        impl $type {
            /// A fresh random identifier.
            pub fn random() -> Self {
                Self(uuid::Uuid::new_v4())
            }

            /// The identifier with these 16 bytes (tests and fixtures).
            pub fn from_bytes(bytes: [u8; 16]) -> Self {
                Self(uuid::Uuid::from_bytes(bytes))
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
        }

        impl std::str::FromStr for $type {
            type Err = ModelError;
            fn from_str(value: &str) -> Result<Self, ModelError> {
                uuid::Uuid::parse_str(value.trim())
                    .map(Self)
                    .map_err(|_| ModelError::InvalidId { kind: $kind, value: value.to_owned() })
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), formatter)
            }
        }

        impl fmt::Debug for $type {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, concat!($kind, ":{}"), self.0.simple())
            }
        }
    };
}

uuid_id!(
    /// A server (one appliance and its host). Created by `deskgrid init`;
    /// later bound to the server's certificate.
    ServerId,
    "server"
);
uuid_id!(
    /// A desktop VM.
    VmId,
    "vm"
);
uuid_id!(
    /// A user's desktop session.
    SessionId,
    "session"
);
uuid_id!(
    /// A grid: every server of one grid carries its id, created by
    /// `deskgrid init --new-grid`.
    GridId,
    "grid"
);
