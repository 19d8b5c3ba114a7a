//! The planner's input: a borrowed, canonically ordered view of the grid
//! state plus the membership view.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{
    BaseImage, EntitlementSubject, ImageVersionId, Policy, ServerId, ServerRecord, Template,
    TemplateName, UserName,
};
use crate::state::{ConfigValue, GridState};

/// What the failure detector says about a server.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum Liveness {
    /// Answering: counts, and may be given work.
    #[default]
    Alive,
    /// Not answering lately: its copies and VMs still count, it gets no new work.
    Suspect,
    /// Declared down: excluded from every plan until it returns.
    Missing,
}

/// One server as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct ServerView<'a> {
    pub id: ServerId,
    pub liveness: Liveness,
    pub record: &'a ServerRecord,
}

impl ServerView<'_> {
    /// Its copies and VMs count.
    pub fn counts(&self) -> bool {
        self.liveness != Liveness::Missing
    }

    /// It may be given new work.
    pub fn eligible(&self) -> bool {
        self.liveness == Liveness::Alive
    }
}

/// Everything a plan depends on, in canonical order: servers by id,
/// templates by name, images by id.
#[derive(Debug, Clone)]
pub struct GridView<'a> {
    pub(crate) servers: Vec<ServerView<'a>>,
    pub(crate) templates: Vec<&'a Template>,
    pub(crate) images: BTreeMap<&'a ImageVersionId, &'a BaseImage>,
    /// Distinct users entitled to each template (directly or by group).
    pub(crate) entitled_users: BTreeMap<&'a TemplateName, u32>,
    pub(crate) policy: Policy,
}

impl<'a> GridView<'a> {
    /// A view from parts (tests, benchmarks, simulations). Order does not
    /// matter: the view sorts everything by its stable key; a server listed
    /// twice keeps its first entry.
    pub fn new(
        servers: impl IntoIterator<Item = ServerView<'a>>,
        templates: impl IntoIterator<Item = &'a Template>,
        images: impl IntoIterator<Item = &'a BaseImage>,
        entitled_users: impl IntoIterator<Item = (&'a TemplateName, u32)>,
        policy: Policy,
    ) -> Self {
        let mut servers: Vec<ServerView<'a>> = servers.into_iter().collect();
        servers.sort_by_key(|server| server.id);
        servers.dedup_by_key(|server| server.id);
        let mut templates: Vec<&'a Template> = templates.into_iter().collect();
        templates.sort_by(|a, b| a.name.cmp(&b.name));
        templates.dedup_by(|a, b| a.name == b.name);
        let images = images.into_iter().map(|image| (&image.id, image)).collect();
        let entitled_users = entitled_users.into_iter().collect();
        Self {
            servers,
            templates,
            images,
            entitled_users,
            policy,
        }
    }

    /// The view of a replicated state: revoked servers left out, every other
    /// server's liveness from `liveness` (the failure detector's view).
    pub fn from_state(state: &'a GridState, liveness: impl Fn(ServerId) -> Liveness) -> Self {
        let mut revoked = BTreeSet::new();
        let mut templates = Vec::new();
        let mut images = Vec::new();
        let mut groups_of: BTreeMap<&UserName, &[crate::model::GroupName]> = BTreeMap::new();
        let mut entitlements = Vec::new();
        for value in state.config_values() {
            match value {
                ConfigValue::RevokedServer(server) => {
                    revoked.insert(*server);
                }
                ConfigValue::Template(template) => templates.push(template),
                ConfigValue::Image(image) => images.push(image),
                ConfigValue::User(user) => {
                    groups_of.insert(&user.name, &user.groups);
                }
                ConfigValue::Entitlement(entitlement) => entitlements.push(entitlement),
                _ => {}
            }
        }
        let mut entitled: BTreeMap<&TemplateName, BTreeSet<&UserName>> = BTreeMap::new();
        for entitlement in entitlements {
            let users = entitled.entry(&entitlement.template).or_default();
            match &entitlement.subject {
                EntitlementSubject::User(user) => {
                    if groups_of.contains_key(user) {
                        users.insert(user);
                    }
                }
                EntitlementSubject::Group(group) => {
                    users.extend(
                        groups_of
                            .iter()
                            .filter(|(_, groups)| groups.contains(group))
                            .map(|(user, _)| *user),
                    );
                }
            }
        }
        let servers =
            state
                .servers()
                .filter(|(id, _)| !revoked.contains(id))
                .map(|(id, record)| ServerView {
                    id,
                    liveness: liveness(id),
                    record,
                });
        Self::new(
            servers,
            templates,
            images,
            entitled
                .into_iter()
                .map(|(template, users)| (template, saturating_u32(users.len()))),
            state.policy(),
        )
    }

    pub fn servers(&self) -> &[ServerView<'a>] {
        &self.servers
    }

    pub fn templates(&self) -> &[&'a Template] {
        &self.templates
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn image(&self, id: &ImageVersionId) -> Option<&'a BaseImage> {
        self.images.get(id).copied()
    }

    pub fn server(&self, id: ServerId) -> Option<&ServerView<'a>> {
        self.servers
            .binary_search_by_key(&id, |server| server.id)
            .ok()
            .map(|index| &self.servers[index])
    }

    /// Distinct users entitled to `template`.
    pub fn entitled_users(&self, template: &TemplateName) -> u32 {
        self.entitled_users.get(template).copied().unwrap_or(0)
    }
}

pub(crate) fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}
