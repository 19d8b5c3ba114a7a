//! Users, groups, entitlements and join tokens.

use serde::{Deserialize, Serialize};

use super::{check_count, check_range, check_text, GroupName, ModelError, TemplateName, UserName};

/// Argon2id PHC strings are about 100 bytes; anything much longer is not one.
pub const MAX_PASSWORD_HASH_LEN: usize = 512;
pub const MAX_DISPLAY_NAME_LEN: usize = 256;
pub const MAX_GROUPS_PER_USER: usize = 256;

/// What a user may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Logs in to the portal and gets desktops.
    #[default]
    User,
    /// Manages the grid through the console, API and CLI.
    Admin,
}

/// A person who logs in (grid-wide configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub name: UserName,
    #[serde(default)]
    pub display_name: String,
    /// Argon2id PHC string (`$argon2id$v=19$...`); never the password itself.
    pub password_hash: String,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub groups: Vec<GroupName>,
}

impl User {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_text("display_name", &self.display_name, MAX_DISPLAY_NAME_LEN)?;
        check_text("password_hash", &self.password_hash, MAX_PASSWORD_HASH_LEN)?;
        if !self.password_hash.is_empty() && !self.password_hash.starts_with("$argon2id$") {
            return Err(ModelError::Inconsistent {
                field: "password_hash",
                problem: "must be an argon2id PHC string",
            });
        }
        check_count("groups", self.groups.len(), MAX_GROUPS_PER_USER)
    }
}

/// A group of users (grid-wide configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub name: GroupName,
    #[serde(default)]
    pub description: String,
}

impl Group {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_text("description", &self.description, MAX_DISPLAY_NAME_LEN)
    }
}

/// Who an entitlement is for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntitlementSubject {
    User(UserName),
    Group(GroupName),
}

/// Grants a user or a group desktops of a template (grid-wide configuration).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Entitlement {
    pub subject: EntitlementSubject,
    pub template: TemplateName,
}

/// The most uses a join token may be given.
pub const MAX_TOKEN_USES: u64 = 1_000;

/// A join token as the grid stores it: only the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    /// Hex SHA-256 of the token's secret; also the token's key in the state.
    pub secret_hash: String,
    /// Unix milliseconds after which the token admits nobody.
    pub expires_at_ms: u64,
    pub uses_left: u32,
}

impl JoinToken {
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.secret_hash.len() != 64
            || !self
                .secret_hash
                .bytes()
                .all(|byte| byte.is_ascii_hexdigit())
        {
            return Err(ModelError::InvalidId {
                kind: "join token hash",
                value: self.secret_hash.chars().take(80).collect(),
            });
        }
        check_range("uses_left", self.uses_left.into(), 0, MAX_TOKEN_USES)
    }
}
