//! Grid-wide thresholds for the load balancers.

use serde::{Deserialize, Serialize};

use super::{check_range, ModelError};

/// Policy thresholds (one grid-wide register). Ratios are in per mille so that
/// every server computes exactly the same plan: no floating point in decisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Policy {
    /// vCPUs that may be promised per physical CPU, in per mille (4000 = 4:1).
    pub cpu_overcommit_permille: u32,
    /// Guest memory that may be promised per byte of host memory, in per mille.
    pub memory_overcommit_permille: u32,
    /// Extra image copies tolerated before surplus copies are dropped.
    pub replica_hysteresis: u32,
    /// Desired-count changes smaller than this trigger no rebalancing.
    pub desired_change_threshold: u32,
    /// Memory kept free on every host for the host itself, in MiB.
    pub host_reserved_memory_mib: u64,
    /// Desktop VMs one server boots at the same time (a 9 a.m. pool refill
    /// must not become a boot storm).
    pub max_concurrent_boots: u32,
    /// How long a desktop whose viewer went away stays reserved for its user
    /// (a reconnect lands on the same session) before a pooled desktop is
    /// logged off and refreshed, in seconds.
    pub disconnect_grace_s: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            cpu_overcommit_permille: 4000,
            memory_overcommit_permille: 1000,
            replica_hysteresis: 1,
            desired_change_threshold: 1,
            host_reserved_memory_mib: 2048,
            max_concurrent_boots: 4,
            // A laptop lid closed over lunch keeps its session; a user gone
            // for the day does not hold a pooled desktop all afternoon.
            disconnect_grace_s: 3_600,
        }
    }
}

impl Policy {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_range(
            "cpu_overcommit_permille",
            self.cpu_overcommit_permille.into(),
            100,
            64_000,
        )?;
        check_range(
            "memory_overcommit_permille",
            self.memory_overcommit_permille.into(),
            100,
            4_000,
        )?;
        check_range("replica_hysteresis", self.replica_hysteresis.into(), 0, 16)?;
        check_range(
            "desired_change_threshold",
            self.desired_change_threshold.into(),
            0,
            10_000,
        )?;
        check_range(
            "host_reserved_memory_mib",
            self.host_reserved_memory_mib,
            0,
            1 << 20,
        )?;
        check_range(
            "max_concurrent_boots",
            self.max_concurrent_boots.into(),
            1,
            256,
        )?;
        check_range(
            "disconnect_grace_s",
            self.disconnect_grace_s.into(),
            0,
            7 * 24 * 3_600,
        )
    }
}
