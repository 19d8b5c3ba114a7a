//! The domain model: typed identifiers and the records the grid state holds.
//!
//! **Invariant:** `model` depends on nothing else in deskgrid and does no I/O.
//! Every value that can arrive from outside (a peer, a file, an API caller) is
//! checked here: names through their constructors (also on deserialization),
//! records through `validate()`, which the state engine calls before it merges.

mod ids;
mod image;
mod names;
mod policy;
mod server;
mod template;
mod users;

pub use ids::{GridId, ServerId, SessionId, VmId};
pub use image::{BaseImage, ImageDigest, ImageState};
pub use names::{GroupName, ImageVersionId, Name, SiteLabel, TemplateName, UserName};
pub use policy::Policy;
pub use server::{
    HostCapacity, ImageHolding, JobRecord, JobState, ServerRecord, SessionRecord, TransferRecord,
    VmRecord, VmState, MAX_JOBS_PER_SERVER, MAX_JOB_TEXT_LEN,
};
pub use template::{
    DisplayProtocol, Template, TemplateKind, DEFAULT_MIN_REPLICAS, MAX_DESIRED_VMS,
};
pub use users::{Entitlement, EntitlementSubject, Group, JoinToken, Role, User, MAX_TOKEN_USES};

/// Why a value was refused at the edge of the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} name is empty")]
    EmptyName { kind: &'static str },
    #[error("{kind} name {name:?} is {len} characters long, the limit is {max}")]
    NameTooLong {
        kind: &'static str,
        name: String,
        len: usize,
        max: usize,
    },
    #[error(
        "{kind} name {name:?} has {found:?} at position {position}: use letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    InvalidNameCharacter {
        kind: &'static str,
        name: String,
        found: char,
        position: usize,
    },
    #[error("{field} is {value}, it must be between {min} and {max}")]
    OutOfRange {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("{field} has {count} items, the limit is {max}")]
    TooMany {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error("{field} is {len} bytes long, the limit is {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field}: {problem}")]
    Inconsistent {
        field: &'static str,
        problem: &'static str,
    },
    #[error("{kind} {value:?} is not a valid identifier")]
    InvalidId { kind: &'static str, value: String },
}

/// Checks that `value` lies in `min..=max`, naming `field` when it does not.
pub(crate) fn check_range(
    field: &'static str,
    value: u64,
    min: u64,
    max: u64,
) -> Result<(), ModelError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ModelError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// Checks that a collection has at most `max` items.
pub(crate) fn check_count(field: &'static str, count: usize, max: usize) -> Result<(), ModelError> {
    if count <= max {
        Ok(())
    } else {
        Err(ModelError::TooMany { field, count, max })
    }
}

/// Checks that a free-text field is at most `max` bytes.
pub(crate) fn check_text(field: &'static str, text: &str, max: usize) -> Result<(), ModelError> {
    if text.len() <= max {
        Ok(())
    } else {
        Err(ModelError::TooLong {
            field,
            len: text.len(),
            max,
        })
    }
}

#[cfg(test)]
pub(crate) use template::sample_template;
