//! The static and dynamic balancers over one capacity ledger.

use super::{GridView, Plan};

/// The plan for `view`: which servers pull or drop which image versions,
/// create or remove which VMs. Same view and seed, same plan.
pub fn plan(view: &GridView<'_>, seed: u64) -> Plan {
    let _ = (view, seed);
    Plan::default()
}
