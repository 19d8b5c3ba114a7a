//! The grid side of the service: the grid's CA, join tokens, admitting new
//! servers, and merging what peers send.

use std::time::Duration;

use super::{now_ms, GridService, ServiceError};
use crate::federation::identity::GridCa;
use crate::federation::join_token::{self, JoinTokenText};
use crate::federation::protocol::{JoinGrant, JoinRequest};
use crate::model::{GridId, Role, ServerId, User, UserName};
use crate::state::{ConfigKey, ConfigValue, Delta, VersionVector};

pub use crate::federation::discovery::{DiscoveredGrid, InterfaceScope};

/// The grids announced by mDNS on `scope`, listening for `wait` (blocking).
pub fn discover_grids(
    scope: &InterfaceScope,
    wait: Duration,
) -> Result<Vec<DiscoveredGrid>, ServiceError> {
    crate::federation::discovery::browse(scope, wait)
        .map_err(|error| ServiceError::Grid(crate::error_chain(&error)))
}

impl GridService {
    /// Makes this server a member of the grid whose CA this is.
    pub fn set_grid_ca(&mut self, ca: GridCa) {
        self.grid_ca = Some(ca);
    }

    pub fn grid_id(&self) -> Option<GridId> {
        self.grid_ca.as_ref().map(GridCa::grid_id)
    }

    /// Deltas committed here from now on (for the federation to push).
    pub fn subscribe_changes(&self) -> tokio::sync::broadcast::Receiver<Delta> {
        self.changes.subscribe()
    }

    /// Creates the first admin account of a new grid.
    pub fn create_admin(
        &mut self,
        name: UserName,
        password_hash: String,
    ) -> Result<(), ServiceError> {
        let user = User {
            name,
            display_name: "grid administrator".to_owned(),
            password_hash,
            role: Role::Admin,
            groups: Vec::new(),
        };
        self.write(ConfigValue::User(user))
    }

    /// Writes a configuration value under its own key, stamped by this server.
    pub fn write(&mut self, value: ConfigValue) -> Result<(), ServiceError> {
        let now = now_ms();
        let hlc = self.clock.tick(now);
        let delta =
            self.state
                .prepare_config_write(self.server_id, hlc, value.key(), Some(value))?;
        self.commit(delta)
    }

    /// A new join token, valid for `ttl` and `uses` joins; only its hash is
    /// stored (and replicated), so any member can admit the joiner.
    /// Returns the token and when it expires (Unix milliseconds).
    pub fn create_join_token(
        &mut self,
        ttl: Duration,
        uses: u32,
    ) -> Result<(JoinTokenText, u64), ServiceError> {
        let ca = self.grid_ca.as_ref().ok_or(ServiceError::NotInAGrid)?;
        let (text, record) =
            join_token::create_token(ca.pin(), ttl, uses, now_ms(), &mut rand::rng())
                .map_err(|error| ServiceError::Grid(error.to_string()))?;
        let expires_at_ms = record.expires_at_ms;
        self.write(ConfigValue::JoinToken(record))?;
        Ok((text, expires_at_ms))
    }

    /// Admits a joining server presenting a token's secret: spends one use,
    /// certifies the joiner's key, and hands over the grid.
    pub fn admit_joiner(&mut self, request: &JoinRequest) -> Result<JoinGrant, ServiceError> {
        let refuse = |reason: String| ServiceError::Grid(reason);
        if self.grid_ca.is_none() {
            return Err(ServiceError::NotInAGrid);
        }
        let secret = join_token::parse_secret_hex(&request.secret_hex)
            .map_err(|error| refuse(error.to_string()))?;
        let key = ConfigKey::JoinToken(join_token::secret_hash(&secret));
        let Some(ConfigValue::JoinToken(record)) = self.state.config(&key).cloned() else {
            return Err(refuse(join_token::JoinRefusal::UnknownToken.to_string()));
        };
        if self.is_revoked(request.server_id) {
            return Err(refuse(format!(
                "server {} was removed from this grid and may not rejoin",
                request.server_id
            )));
        }
        if self.state.server(request.server_id).is_some() {
            return Err(refuse(format!(
                "server id {} is already in this grid",
                request.server_id
            )));
        }
        request
            .record
            .validate()
            .map_err(|error| refuse(format!("the joiner's record is invalid: {error}")))?;
        let spent = join_token::admit(&record, &secret, now_ms())
            .map_err(|refusal| refuse(refusal.to_string()))?;
        let (grid_id, certificate_pem, ca_certificate_pem, ca_key_pem) = {
            let ca = self.grid_ca.as_ref().ok_or(ServiceError::NotInAGrid)?;
            let certificate = ca
                .issue_server_certificate(&request.csr_pem, request.server_id)
                .map_err(|error| {
                    refuse(format!(
                        "cannot certify the joiner: {}",
                        crate::error_chain(&error)
                    ))
                })?;
            (
                ca.grid_id(),
                certificate.pem,
                ca.certificate_pem().to_owned(),
                ca.key_pem(),
            )
        };
        // Spend the use before answering: a lost answer costs a use, never
        // grants a second join for one.
        self.write(ConfigValue::JoinToken(spent))?;
        tracing::info!(server = %request.server_id, name = %request.record.name, "server admitted to the grid");
        Ok(JoinGrant {
            grid_id,
            certificate_pem,
            ca_certificate_pem,
            ca_key_pem,
            state: self.state.to_delta(),
        })
    }

    /// Removes `server` from the grid for good: its certificate is revoked
    /// on every member as the change spreads.
    pub fn remove_server(&mut self, server: ServerId) -> Result<(), ServiceError> {
        if server == self.server_id {
            return Err(ServiceError::Grid(
                "a server cannot remove itself: run `deskgrid server remove` on another member"
                    .to_owned(),
            ));
        }
        if self.state.server(server).is_none() {
            return Err(ServiceError::Grid(format!(
                "no server {server} in this grid (see `deskgrid status`)"
            )));
        }
        self.write(ConfigValue::RevokedServer(server))?;
        tracing::info!(%server, "server removed from the grid; its certificate is revoked");
        Ok(())
    }

    /// True when `server` was removed from the grid for good.
    pub fn is_revoked(&self, server: ServerId) -> bool {
        self.state
            .config(&ConfigKey::RevokedServer(server))
            .is_some()
    }

    /// Every server removed from the grid for good.
    pub fn revoked_servers(&self) -> Vec<ServerId> {
        self.state
            .config_values()
            .filter_map(|value| match value {
                ConfigValue::RevokedServer(server) => Some(*server),
                _ => None,
            })
            .collect()
    }

    /// Servers a peer may talk to: every known server but this one and the
    /// revoked, with their addresses.
    pub fn peers(&self) -> Vec<(ServerId, Vec<String>)> {
        self.state
            .servers()
            .filter(|(id, _)| *id != self.server_id && !self.is_revoked(*id))
            .map(|(id, record)| (id, record.addresses.clone()))
            .collect()
    }

    pub fn version_vector(&self) -> VersionVector {
        self.state.version_vector().clone()
    }

    pub fn delta_since(&self, since: &VersionVector) -> Delta {
        self.state.delta_since(since)
    }

    /// Merges a delta a peer sent: only what is new here is logged; returns
    /// how many entries changed. Our clock moves past the peer's stamps.
    pub fn apply_remote(&mut self, from: ServerId, delta: &Delta) -> Result<usize, ServiceError> {
        delta.validate()?;
        // Our own record may come back through relays: ours is newer or
        // equal unless we lost our state, and then merging it is right.
        let novel = self.state.novel_part(delta);
        if novel.is_empty() && !self.state.would_advance(&novel) {
            return Ok(0);
        }
        let now = now_ms();
        let newest = novel
            .config
            .iter()
            .map(|(_, entry)| entry.stamp.hlc)
            .chain(novel.servers.iter().map(|(_, entry)| entry.hlc))
            .max();
        if let Some(newest) = newest {
            if let Err(drift) = self.clock.observe(newest, now) {
                return Err(ServiceError::Grid(format!(
                    "delta from {from} refused: {drift}"
                )));
            }
        }
        let changed = novel.len();
        self.persist(&novel)?;
        Ok(changed)
    }
}

/// The service as the federation sees it.
#[derive(Debug, Clone)]
pub struct FederatedService(pub std::sync::Arc<std::sync::Mutex<GridService>>);

impl FederatedService {
    fn lock(&self) -> std::sync::MutexGuard<'_, GridService> {
        // A panic while holding the lock leaves the state as it was on disk at
        // worst (writes are durable before they are applied).
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl crate::federation::node::GridStateAccess for FederatedService {
    fn version_vector(&self) -> VersionVector {
        self.lock().version_vector()
    }

    fn delta_since(&self, since: &VersionVector) -> Delta {
        self.lock().delta_since(since)
    }

    fn apply_remote(&self, from: ServerId, delta: &Delta) -> Result<usize, String> {
        self.lock()
            .apply_remote(from, delta)
            .map_err(|error| crate::error_chain(&error))
    }

    fn admit_joiner(&self, request: &JoinRequest) -> Result<JoinGrant, String> {
        self.lock()
            .admit_joiner(request)
            .map_err(|error| crate::error_chain(&error))
    }

    fn peers(&self) -> Vec<(ServerId, Vec<String>)> {
        self.lock().peers()
    }

    fn revoked(&self) -> Vec<ServerId> {
        self.lock().revoked_servers()
    }

    fn report_members(
        &self,
        members: std::collections::BTreeMap<ServerId, crate::federation::membership::MemberState>,
    ) {
        let mut service = self.lock();
        if service.member_states != members {
            service.member_states = members;
            service.note_state_change();
        }
    }
}
