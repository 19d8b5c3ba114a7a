//! Users, groups and entitlements in the replicated grid state, and the
//! sessions every server records: `deskgrid user`, `deskgrid entitle` and
//! `deskgrid session list`. Passwords arrive here already hashed (argon2id,
//! `accounts::hash_password`); nothing here sees or logs one.

use serde::{Deserialize, Serialize};

use super::{GridService, ServiceError};
use crate::model::{
    Entitlement, EntitlementSubject, Group, GroupName, ModelError, Role, ServerId, TemplateName,
    User, UserName, VmId, VmState,
};
use crate::state::{ConfigKey, ConfigValue};

/// Why a user, group or entitlement call was refused.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("user {0} exists; delete it first to replace it")]
    Exists(UserName),
    #[error("no user {0} in this grid (see `deskgrid user list`)")]
    Unknown(UserName),
    #[error("no template {0} in this grid (see `deskgrid template list`)")]
    UnknownTemplate(TemplateName),
    #[error("{subject} is not entitled to template {template}")]
    NoSuchEntitlement {
        subject: String,
        template: TemplateName,
    },
    #[error("user {0} is the grid's last admin; make another admin before deleting it")]
    LastAdmin(UserName),
    #[error("invalid user {name}")]
    Invalid {
        name: UserName,
        #[source]
        source: ModelError,
    },
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// A user to create: the password is already an argon2id PHC string.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub name: UserName,
    #[serde(default)]
    pub display_name: String,
    pub password_hash: String,
    #[serde(default)]
    pub groups: Vec<GroupName>,
}

impl std::fmt::Debug for NewUser {
    /// Even a hash stays out of logs: it can be attacked offline.
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NewUser")
            .field("name", &self.name)
            .field("display_name", &self.display_name)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

/// A user as an admin sees it: never the hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    pub name: UserName,
    pub display_name: String,
    pub role: Role,
    pub groups: Vec<GroupName>,
    /// Templates the user may use, directly or through a group, sorted.
    pub templates: Vec<TemplateName>,
}

/// An entitlement as written or removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntitlementChange {
    pub entitlement: Entitlement,
    /// False when the state already said so (nothing was written).
    pub changed: bool,
    pub removed: bool,
}

/// One session or reservation, as the hosting server's record shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub user: UserName,
    pub vm: VmId,
    pub template: Option<TemplateName>,
    pub server: ServerId,
    pub server_name: String,
    /// `in-use` (a session), `disconnected` (a session whose viewer went
    /// away) or `reserved` (reserved, not yet logged in).
    pub state: String,
    /// When the session started (Unix ms); none for a reservation.
    pub since_ms: Option<u64>,
    /// When the user's viewer went away (Unix ms), for a session whose
    /// state is `disconnected`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewer_gone_at_ms: Option<u64>,
}

impl GridService {
    fn user(&self, name: &UserName) -> Option<&User> {
        match self.state.config(&ConfigKey::User(name.clone())) {
            Some(ConfigValue::User(user)) => Some(user),
            _ => None,
        }
    }

    fn template_exists(&self, name: &TemplateName) -> bool {
        matches!(
            self.state.config(&ConfigKey::Template(name.clone())),
            Some(ConfigValue::Template(_))
        )
    }

    /// Creates a user (role `user`); groups that do not exist yet are
    /// created with it.
    pub fn add_user(&mut self, new: NewUser) -> Result<UserSummary, UserError> {
        if self.user(&new.name).is_some() {
            return Err(UserError::Exists(new.name));
        }
        let mut groups = new.groups;
        groups.sort();
        groups.dedup();
        let user = User {
            name: new.name,
            display_name: new.display_name,
            password_hash: new.password_hash,
            role: Role::User,
            groups,
        };
        // An empty hash would be a user nobody can log in as; refuse it too.
        if !user.password_hash.starts_with("$argon2id$") {
            return Err(UserError::Invalid {
                name: user.name,
                source: ModelError::Inconsistent {
                    field: "password_hash",
                    problem: "must be an argon2id PHC string",
                },
            });
        }
        user.validate().map_err(|source| UserError::Invalid {
            name: user.name.clone(),
            source,
        })?;
        for group in &user.groups {
            self.ensure_group(group)?;
        }
        let name = user.name.clone();
        self.write(ConfigValue::User(user))?;
        tracing::info!(user = %name, "user created");
        self.user_summary(&name).ok_or(UserError::Unknown(name))
    }

    /// Deletes a user and the entitlements given to them by name.
    pub fn delete_user(&mut self, name: &UserName) -> Result<(), UserError> {
        let user = self
            .user(name)
            .ok_or_else(|| UserError::Unknown(name.clone()))?;
        if user.role == Role::Admin {
            let admins = self
                .state
                .config_values()
                .filter(
                    |value| matches!(value, ConfigValue::User(user) if user.role == Role::Admin),
                )
                .count();
            if admins <= 1 {
                return Err(UserError::LastAdmin(name.clone()));
            }
        }
        let own_entitlements: Vec<Entitlement> = self
            .state
            .config_values()
            .filter_map(|value| match value {
                ConfigValue::Entitlement(entitlement)
                    if entitlement.subject == EntitlementSubject::User(name.clone()) =>
                {
                    Some(entitlement.clone())
                }
                _ => None,
            })
            .collect();
        for entitlement in own_entitlements {
            self.delete(ConfigKey::Entitlement(entitlement))?;
        }
        self.delete(ConfigKey::User(name.clone()))?;
        tracing::info!(user = %name, "user deleted");
        Ok(())
    }

    /// Every user, sorted by name.
    pub fn users(&self) -> Vec<UserSummary> {
        let mut names: Vec<UserName> = self
            .state
            .config_values()
            .filter_map(|value| match value {
                ConfigValue::User(user) => Some(user.name.clone()),
                _ => None,
            })
            .collect();
        names.sort();
        names
            .iter()
            .filter_map(|name| self.user_summary(name))
            .collect()
    }

    fn user_summary(&self, name: &UserName) -> Option<UserSummary> {
        let user = self.user(name)?;
        let mut templates: Vec<TemplateName> = self
            .state
            .config_values()
            .filter_map(|value| match value {
                ConfigValue::Entitlement(entitlement) => Some(entitlement),
                _ => None,
            })
            .filter(|entitlement| match &entitlement.subject {
                EntitlementSubject::User(user_name) => user_name == name,
                EntitlementSubject::Group(group) => user.groups.contains(group),
            })
            .filter(|entitlement| self.template_exists(&entitlement.template))
            .map(|entitlement| entitlement.template.clone())
            .collect();
        templates.sort();
        templates.dedup();
        Some(UserSummary {
            name: user.name.clone(),
            display_name: user.display_name.clone(),
            role: user.role,
            groups: user.groups.clone(),
            templates,
        })
    }

    fn ensure_group(&mut self, name: &GroupName) -> Result<(), UserError> {
        if self.state.config(&ConfigKey::Group(name.clone())).is_none() {
            self.write(ConfigValue::Group(Group {
                name: name.clone(),
                description: String::new(),
            }))?;
            tracing::info!(group = %name, "group created");
        }
        Ok(())
    }

    /// Grants (or with `remove`, withdraws) `subject` desktops of `template`.
    pub fn entitle(
        &mut self,
        subject: EntitlementSubject,
        template: TemplateName,
        remove: bool,
    ) -> Result<EntitlementChange, UserError> {
        let entitlement = Entitlement {
            subject: subject.clone(),
            template: template.clone(),
        };
        let key = ConfigKey::Entitlement(entitlement.clone());
        let exists = self.state.config(&key).is_some();
        if remove {
            if !exists {
                return Err(UserError::NoSuchEntitlement {
                    subject: subject_text(&subject),
                    template,
                });
            }
            self.delete(key)?;
            tracing::info!(subject = %subject_text(&subject), %template, "entitlement removed");
            return Ok(EntitlementChange {
                entitlement,
                changed: true,
                removed: true,
            });
        }
        if !self.template_exists(&template) {
            return Err(UserError::UnknownTemplate(template));
        }
        match &subject {
            EntitlementSubject::User(user) => {
                if self.user(user).is_none() {
                    return Err(UserError::Unknown(user.clone()));
                }
            }
            EntitlementSubject::Group(group) => self.ensure_group(group)?,
        }
        if !exists {
            self.write(ConfigValue::Entitlement(entitlement.clone()))?;
            tracing::info!(subject = %subject_text(&subject), %template, "entitlement granted");
        }
        Ok(EntitlementChange {
            entitlement,
            changed: !exists,
            removed: false,
        })
    }

    /// Every session and reservation in the grid, from every server's own
    /// record: by user, then server.
    pub fn sessions(&self) -> Vec<SessionSummary> {
        let mut rows = Vec::new();
        for (server, record) in self.state.servers() {
            let template_of = |vm: &VmId| {
                record
                    .vms
                    .get(vm)
                    .map(|vm_record| vm_record.template.clone())
            };
            let mut in_session = std::collections::BTreeSet::new();
            for session in record.sessions.values() {
                in_session.insert(session.vm);
                rows.push(SessionSummary {
                    user: session.user.clone(),
                    vm: session.vm,
                    template: template_of(&session.vm),
                    server,
                    server_name: record.name.clone(),
                    state: if session.viewer_gone_at_ms.is_some() {
                        "disconnected"
                    } else {
                        "in-use"
                    }
                    .to_owned(),
                    since_ms: Some(session.started_at_ms),
                    viewer_gone_at_ms: session.viewer_gone_at_ms,
                });
            }
            for vm in record.vms.values() {
                if let (Some(user), VmState::Reserved | VmState::InUse) = (&vm.user, vm.state) {
                    if in_session.contains(&vm.id) {
                        continue;
                    }
                    rows.push(SessionSummary {
                        user: user.clone(),
                        vm: vm.id,
                        template: Some(vm.template.clone()),
                        server,
                        server_name: record.name.clone(),
                        state: if vm.state == VmState::Reserved {
                            "reserved"
                        } else {
                            "in-use"
                        }
                        .to_owned(),
                        since_ms: None,
                        viewer_gone_at_ms: None,
                    });
                }
            }
        }
        rows.sort_by(|left, right| {
            (&left.user, &left.server_name, left.vm).cmp(&(
                &right.user,
                &right.server_name,
                right.vm,
            ))
        });
        rows
    }
}

fn subject_text(subject: &EntitlementSubject) -> String {
    match subject {
        EntitlementSubject::User(user) => format!("user {user}"),
        EntitlementSubject::Group(group) => format!("group {group}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SessionId, SessionRecord};

    fn service(dir: &std::path::Path) -> GridService {
        GridService::open(ServerId::random(), dir)
            .expect("a fresh state directory opens")
            .0
    }

    fn new_user(name: &str, groups: &[&str]) -> NewUser {
        NewUser {
            name: UserName::new(name).expect("valid"),
            display_name: format!("{name} example"),
            password_hash: crate::service::accounts::hash_password("a long enough password")
                .expect("hashes"),
            groups: groups
                .iter()
                .map(|group| GroupName::new(*group).expect("valid"))
                .collect(),
        }
    }

    #[test]
    fn users_groups_and_entitlements_round_trip_with_clear_refusals() {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut grid = service(temp.path());
        grid.create_template(crate::model::sample_template("office"))
            .expect("template");
        let office = TemplateName::new("office").expect("valid");
        let alice = UserName::new("alice").expect("valid");
        let staff = GroupName::new("staff").expect("valid");

        grid.add_user(new_user("alice", &[])).expect("created");
        let error = grid.add_user(new_user("alice", &[])).unwrap_err();
        assert_eq!(
            error.to_string(),
            "user alice exists; delete it first to replace it"
        );
        let mut no_hash = new_user("bob", &["staff"]);
        no_hash.password_hash = String::new();
        assert_eq!(
            crate::error_chain(&grid.add_user(no_hash).unwrap_err()),
            "invalid user bob: password_hash: must be an argon2id PHC string"
        );
        grid.add_user(new_user("bob", &["staff", "staff"]))
            .expect("created");

        let error = grid
            .entitle(
                EntitlementSubject::User(alice.clone()),
                TemplateName::new("cad").expect("valid"),
                false,
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "no template cad in this grid (see `deskgrid template list`)"
        );
        let error = grid
            .entitle(
                EntitlementSubject::User(UserName::new("nobody").expect("valid")),
                office.clone(),
                false,
            )
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "no user nobody in this grid (see `deskgrid user list`)"
        );
        let granted = grid
            .entitle(
                EntitlementSubject::User(alice.clone()),
                office.clone(),
                false,
            )
            .expect("granted");
        assert!(granted.changed);
        let again = grid
            .entitle(
                EntitlementSubject::User(alice.clone()),
                office.clone(),
                false,
            )
            .expect("idempotent");
        assert!(!again.changed, "nothing written twice");
        grid.entitle(
            EntitlementSubject::Group(staff.clone()),
            office.clone(),
            false,
        )
        .expect("granted to the group");

        let users = grid.users();
        let names: Vec<String> = users.iter().map(|user| user.name.to_string()).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(
            users[1].groups,
            std::slice::from_ref(&staff),
            "deduplicated"
        );
        assert_eq!(
            users[1].templates,
            std::slice::from_ref(&office),
            "through the group"
        );
        assert!(
            !format!("{users:?}").contains("argon2"),
            "no hash in a summary"
        );

        grid.entitle(
            EntitlementSubject::Group(staff.clone()),
            office.clone(),
            true,
        )
        .expect("removed");
        let error = grid
            .entitle(EntitlementSubject::Group(staff), office.clone(), true)
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "group staff is not entitled to template office"
        );
        assert!(grid.users()[1].templates.is_empty());

        grid.delete_user(&alice).expect("deleted");
        assert!(
            grid.state()
                .config(&ConfigKey::Entitlement(Entitlement {
                    subject: EntitlementSubject::User(alice.clone()),
                    template: office,
                }))
                .is_none(),
            "her entitlements go with her"
        );
        assert_eq!(
            grid.delete_user(&alice).unwrap_err().to_string(),
            "no user alice in this grid (see `deskgrid user list`)"
        );
    }

    #[test]
    fn the_last_admin_stays() {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut grid = service(temp.path());
        let admin = UserName::new("admin").expect("valid");
        grid.create_admin(admin.clone(), new_user("x", &[]).password_hash)
            .expect("admin");
        assert_eq!(
            grid.delete_user(&admin).unwrap_err().to_string(),
            "user admin is the grid's last admin; make another admin before deleting it"
        );
    }

    #[test]
    fn sessions_and_reservations_are_listed_from_the_records() {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut grid = service(temp.path());
        let config = crate::appliance::config::Config {
            server: crate::appliance::config::ServerSettings {
                name: "a".to_owned(),
                ..crate::appliance::config::ServerSettings::default()
            },
            libvirt: crate::appliance::config::LibvirtSettings::default(),
            api: crate::appliance::config::ApiSettings::default(),
        };
        grid.publish_own_record(&config).expect("record");
        let mut record = grid.state().server(grid.server_id()).cloned().expect("own");
        let vm = |byte: u8, state: VmState, user: Option<&str>| crate::model::VmRecord {
            id: VmId::from_bytes([byte; 16]),
            template: TemplateName::new("office").expect("valid"),
            image: crate::model::ImageVersionId::new("base-1").expect("valid"),
            state,
            user: user.map(|user| UserName::new(user).expect("valid")),
            vcpus: 2,
            memory_mib: 2048,
        };
        for vm in [
            vm(1, VmState::InUse, Some("bob")),
            vm(2, VmState::Reserved, Some("alice")),
            vm(3, VmState::Ready, None),
        ] {
            record.vms.insert(vm.id, vm);
        }
        let session = SessionRecord {
            id: SessionId::from_bytes([9; 16]),
            user: UserName::new("bob").expect("valid"),
            vm: VmId::from_bytes([1; 16]),
            started_at_ms: 1_234,
            viewer_gone_at_ms: None,
        };
        record.sessions.insert(session.id, session);
        let hlc = grid.clock.tick(super::super::now_ms());
        let delta = grid
            .state
            .prepare_server_update(grid.server_id(), hlc, record)
            .expect("valid");
        grid.commit(delta).expect("committed");

        let rows = grid.sessions();
        let summary: Vec<(String, String, Option<u64>)> = rows
            .iter()
            .map(|row| (row.user.to_string(), row.state.clone(), row.since_ms))
            .collect();
        assert_eq!(
            summary,
            [
                ("alice".to_owned(), "reserved".to_owned(), None),
                ("bob".to_owned(), "in-use".to_owned(), Some(1_234)),
            ]
        );
        assert_eq!(rows[1].server_name, "a");
    }
}
