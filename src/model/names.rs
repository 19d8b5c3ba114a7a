//! Validated names: templates, users, groups, image versions, sites.
//!
//! A name is 1 to 63 characters of ASCII letters, digits, `-`, `_` and `.`,
//! starting with a letter or digit: safe in file names, libvirt volume and
//! domain names, URLs and DNS labels, and unambiguous in logs.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The longest name: a DNS label's limit, so names can appear in host names.
pub const MAX_NAME_LEN: usize = 63;

/// Checks `value` against the naming rule; `kind` names the thing in errors.
pub fn validate_name(kind: &'static str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() {
        return Err(ModelError::EmptyName { kind });
    }
    let len = value.chars().count();
    if len > MAX_NAME_LEN {
        return Err(ModelError::NameTooLong {
            kind,
            name: value.chars().take(MAX_NAME_LEN).collect::<String>() + "…",
            len,
            max: MAX_NAME_LEN,
        });
    }
    for (position, found) in value.chars().enumerate() {
        let allowed =
            found.is_ascii_alphanumeric() || (position > 0 && matches!(found, '-' | '_' | '.'));
        if !allowed {
            return Err(ModelError::InvalidNameCharacter {
                kind,
                name: value.to_owned(),
                found,
                position,
            });
        }
    }
    Ok(())
}

/// A name of some kind; implemented by every validated name type.
pub trait Name: Sized {
    /// What this name names, for error messages ("template", "user", ...).
    const KIND: &'static str;
    fn as_str(&self) -> &str;
}

macro_rules! name_type {
    ($(#[$doc:meta])* $type:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $type(String);

        impl $type {
            /// Validates and wraps `value`.
            pub fn new(value: impl Into<String>) -> Result<Self, ModelError> {
                let value = value.into();
                validate_name($kind, &value)?;
                Ok(Self(value))
            }
        }

        impl Name for $type {
            const KIND: &'static str = $kind;
            fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $type {
            type Error = ModelError;
            fn try_from(value: String) -> Result<Self, ModelError> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $type {
            type Err = ModelError;
            fn from_str(value: &str) -> Result<Self, ModelError> {
                Self::new(value)
            }
        }

        impl From<$type> for String {
            fn from(name: $type) -> String {
                name.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl fmt::Debug for $type {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, formatter)
            }
        }
    };
}

name_type!(
    /// The name of a desktop template (`win11-office`).
    TemplateName,
    "template"
);
name_type!(
    /// A user's login name.
    UserName,
    "user"
);
name_type!(
    /// A group of users, for entitlements.
    GroupName,
    "group"
);
name_type!(
    /// One version of a base image (`win11-2026.11`); versions are immutable.
    ImageVersionId,
    "image version"
);
name_type!(
    /// A site label: servers with the same label are near each other.
    SiteLabel,
    "site"
);

impl Default for SiteLabel {
    fn default() -> Self {
        Self("default".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in ["a", "win11-office", "ubuntu_24.04", "X9", &"a".repeat(63)] {
            assert!(TemplateName::new(name).is_ok(), "{name} should be valid");
        }
    }

    #[test]
    fn refuses_bad_names_with_the_reason() {
        assert_eq!(
            UserName::new(""),
            Err(ModelError::EmptyName { kind: "user" })
        );
        assert!(matches!(
            TemplateName::new("a".repeat(64)),
            Err(ModelError::NameTooLong {
                len: 64,
                max: 63,
                ..
            })
        ));
        assert!(matches!(
            TemplateName::new("-leading"),
            Err(ModelError::InvalidNameCharacter {
                found: '-',
                position: 0,
                ..
            })
        ));
        assert!(matches!(
            GroupName::new("a/b"),
            Err(ModelError::InvalidNameCharacter {
                found: '/',
                position: 1,
                ..
            })
        ));
        let message = ImageVersionId::new("bad name").unwrap_err().to_string();
        assert!(
            message.contains("image version name \"bad name\""),
            "{message}"
        );
    }

    #[test]
    fn deserialization_validates() {
        let ok: TemplateName = serde_json::from_str("\"office\"").unwrap();
        assert_eq!(ok.as_str(), "office");
        let error = serde_json::from_str::<TemplateName>("\"../etc\"").unwrap_err();
        assert!(error.to_string().contains("template name"), "{error}");
    }
}
