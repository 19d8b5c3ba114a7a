//! "Should we balance at all?": what changed between two views that a
//! balancer would act on.

use serde::{Deserialize, Serialize};

use super::GridView;

/// Which balancers have work, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub static_balance: bool,
    pub dynamic_balance: bool,
    pub reasons: Vec<String>,
}

impl Analysis {
    pub fn any(&self) -> bool {
        self.static_balance || self.dynamic_balance
    }
}

/// Compares the view a server last planned on with the new one.
pub fn analyze(previous: &GridView<'_>, next: &GridView<'_>) -> Analysis {
    let _ = (previous, next);
    Analysis::default()
}
