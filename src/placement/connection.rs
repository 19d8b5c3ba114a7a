//! The connection balancer: which servers to ask for a user's desktop.

use crate::model::{ServerId, SiteLabel, TemplateName, UserName};

use super::GridView;

/// Per-template candidates prepared once per state change, so that ranking
/// one login costs microseconds.
#[derive(Debug, Clone)]
pub struct ConnectionIndex {
    seed: u64,
}

impl ConnectionIndex {
    pub fn new(view: &GridView<'_>, seed: u64) -> Self {
        let _ = view;
        Self { seed }
    }

    /// Servers to ask for a desktop of `template` for `user`, best first.
    pub fn rank(
        &self,
        user: &UserName,
        template: &TemplateName,
        client_site: Option<&SiteLabel>,
    ) -> Vec<ServerId> {
        let _ = (user, template, client_site, self.seed);
        Vec::new()
    }
}
