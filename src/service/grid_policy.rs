//! The grid-wide policy register (`deskgrid policy show|set`): thresholds
//! every server's planner reads, and the desktop service's disconnect grace.

use serde::{Deserialize, Serialize};

use super::{GridService, ServiceError};
use crate::model::{ModelError, Policy};
use crate::state::ConfigValue;

/// Why a policy change was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid policy")]
    Invalid(#[source] ModelError),
    #[error("nothing to change in the policy: give at least one setting")]
    NothingToChange,
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// Settings to change; `None` leaves one as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyChange {
    pub cpu_overcommit_permille: Option<u32>,
    pub memory_overcommit_permille: Option<u32>,
    pub replica_hysteresis: Option<u32>,
    pub desired_change_threshold: Option<u32>,
    pub host_reserved_memory_mib: Option<u64>,
    pub max_concurrent_boots: Option<u32>,
    pub disconnect_grace_s: Option<u32>,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `policy` with this change applied.
    pub fn applied_to(&self, policy: &Policy) -> Policy {
        Policy {
            cpu_overcommit_permille: self
                .cpu_overcommit_permille
                .unwrap_or(policy.cpu_overcommit_permille),
            memory_overcommit_permille: self
                .memory_overcommit_permille
                .unwrap_or(policy.memory_overcommit_permille),
            replica_hysteresis: self.replica_hysteresis.unwrap_or(policy.replica_hysteresis),
            desired_change_threshold: self
                .desired_change_threshold
                .unwrap_or(policy.desired_change_threshold),
            host_reserved_memory_mib: self
                .host_reserved_memory_mib
                .unwrap_or(policy.host_reserved_memory_mib),
            max_concurrent_boots: self
                .max_concurrent_boots
                .unwrap_or(policy.max_concurrent_boots),
            disconnect_grace_s: self.disconnect_grace_s.unwrap_or(policy.disconnect_grace_s),
        }
    }
}

impl GridService {
    /// The grid's policy (the defaults until an admin changed it).
    pub fn policy(&self) -> Policy {
        self.state.policy()
    }

    /// Changes some policy settings; the new policy replicates like any
    /// write and every server plans with it.
    pub fn update_policy(&mut self, change: &PolicyChange) -> Result<Policy, PolicyError> {
        if change.is_empty() {
            return Err(PolicyError::NothingToChange);
        }
        let current = self.policy();
        let changed = change.applied_to(&current);
        changed.validate().map_err(PolicyError::Invalid)?;
        if changed != current {
            self.write(ConfigValue::Policy(changed.clone()))?;
            tracing::info!(?changed, "grid policy changed");
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_touches_only_what_it_names() {
        let policy = Policy::default();
        let change = PolicyChange {
            disconnect_grace_s: Some(600),
            ..PolicyChange::default()
        };
        let changed = change.applied_to(&policy);
        assert_eq!(changed.disconnect_grace_s, 600);
        assert_eq!(
            Policy {
                disconnect_grace_s: policy.disconnect_grace_s,
                ..changed
            },
            policy
        );
        assert!(PolicyChange::default().is_empty());
        assert!(!change.is_empty());
    }
}
