//! The service layer: the one place the faces (CLI, control socket, and later
//! the REST API and console TUI) read and change this server's grid state.
//!
//! Every change goes the same way: build the delta, append it to the log
//! (durable), then apply it in memory. Nothing in memory is ahead of disk.

pub mod accounts;
pub mod desktop_host;
pub mod desktops;
pub mod grid;
pub mod grid_policy;
pub mod host_check;
pub mod host_worker;
pub mod images;
pub mod plan;
pub mod policy_host;
pub mod setup;
pub mod templates;
pub mod users;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::appliance::config::Config;
use crate::model::{HostCapacity, ServerId, ServerRecord};
use crate::state::{
    Delta, GridState, HlcClock, MergeError, RecoveryReport, StateStore, StoreError,
};

/// Local changes queued for the federation before the oldest are dropped
/// (anti-entropy then brings peers up to date).
const CHANGE_QUEUE: usize = 1024;

/// Why a service call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("grid state")]
    Store(#[from] StoreError),
    #[error("the change was refused")]
    Refused(#[from] MergeError),
    #[error("this server is not in a grid: create one with `deskgrid init --new-grid` or join one with `deskgrid join`")]
    NotInAGrid,
    #[error("{0}")]
    Grid(String),
}

/// What `deskgrid status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub server_id: ServerId,
    pub name: String,
    pub site: String,
    pub software_version: String,
    pub uptime_ms: u64,
    /// The host as last published (all zero until libvirt answered).
    pub capacity: HostCapacity,
    /// The grid this server belongs to (none: standalone).
    pub grid_id: Option<crate::model::GridId>,
    /// SHA-256 of the replicated state: servers that agree show the same.
    pub state_digest: String,
    /// Every server the grid state knows, this one included.
    pub servers: Vec<ServerSummary>,
    pub state: StateSummary,
    /// The HTTPS API of this server.
    #[serde(default)]
    pub api: ApiStatus,
}

/// The HTTPS API as this server runs it (`deskgrid status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum ApiStatus {
    /// `api.listen = "off"` (or not started yet).
    #[default]
    Off,
    Listening {
        address: std::net::SocketAddr,
        /// SHA-256 of the certificate (DER), hex pairs joined by `:`.
        certificate_sha256: String,
    },
    /// The derived (`"auto"`) address could not be bound.
    Failed {
        address: std::net::SocketAddr,
        reason: String,
    },
}

/// One server as the grid state describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSummary {
    pub id: ServerId,
    pub name: String,
    pub addresses: Vec<String>,
    pub site: String,
    /// When the server last updated its own record (its clock, Unix ms).
    pub updated_at_ms: u64,
    pub this_server: bool,
    /// Removed from the grid for good (`deskgrid server remove`).
    pub removed: bool,
    /// `alive`, `suspect` or `missing` as the failure detector sees it;
    /// `unknown` until it has heard of the server (or without a grid).
    pub state: String,
    /// Desktop VMs on the server and, of those, ready for a login.
    #[serde(default)]
    pub vms: usize,
    #[serde(default)]
    pub ready_vms: usize,
    /// Base image versions it holds complete / is pulling.
    #[serde(default)]
    pub images_complete: usize,
    #[serde(default)]
    pub images_pulling: usize,
    /// Its policy jobs in progress or failing, as its record says.
    #[serde(default)]
    pub jobs: Vec<crate::model::JobRecord>,
    /// Its image pulls in progress (version, bytes, rate, sources).
    #[serde(default)]
    pub transfers:
        std::collections::BTreeMap<crate::model::ImageVersionId, crate::model::TransferRecord>,
}

/// The grid state as this server holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSummary {
    pub servers: usize,
    pub templates: usize,
    pub entries: usize,
    /// SHA-256 of the state's content: equal on servers that agree.
    pub digest: String,
    pub generation: u64,
    pub log_records: u64,
    pub log_bytes: u64,
}

/// This server's view of the grid, with its durable store.
#[derive(Debug)]
pub struct GridService {
    server_id: ServerId,
    state: GridState,
    store: StateStore,
    clock: HlcClock,
    started_at_ms: u64,
    /// The grid's CA (with its key), when this server is in a grid.
    grid_ca: Option<crate::federation::identity::GridCa>,
    /// Every delta written here (this server's own writes), for the
    /// federation to push; receivers that fall behind miss some and
    /// anti-entropy heals. Learnt deltas are not sent on: anti-entropy
    /// spreads them.
    changes: tokio::sync::broadcast::Sender<Delta>,
    /// What the failure detector last said of the other servers.
    member_states: std::collections::BTreeMap<ServerId, crate::federation::membership::MemberState>,
    /// Counts changes to what plans depend on: every write merged here,
    /// local or a peer's, and every change of the membership view.
    state_generation: tokio::sync::watch::Sender<u64>,
    /// Poked when someone asks the policy loop to act now (`deskgrid plan`).
    policy_wake: std::sync::Arc<tokio::sync::Notify>,
    /// What the HTTPS API reported at start, for `deskgrid status`.
    api_status: ApiStatus,
}

impl GridService {
    /// Recovers the state from `state_dir`.
    pub fn open(
        server_id: ServerId,
        state_dir: &std::path::Path,
    ) -> Result<(Self, RecoveryReport), ServiceError> {
        let (store, state, report) = StateStore::open(state_dir)?;
        let clock = HlcClock::starting_after(state.max_hlc());
        let service = Self {
            server_id,
            state,
            store,
            clock,
            started_at_ms: now_ms(),
            grid_ca: None,
            changes: tokio::sync::broadcast::channel(CHANGE_QUEUE).0,
            member_states: std::collections::BTreeMap::new(),
            policy_wake: std::sync::Arc::new(tokio::sync::Notify::new()),
            state_generation: tokio::sync::watch::channel(0).0,
            api_status: ApiStatus::Off,
        };
        Ok((service, report))
    }

    pub fn server_id(&self) -> ServerId {
        self.server_id
    }

    pub fn state(&self) -> &GridState {
        &self.state
    }

    /// Writes this server's own record from its config and what it knows now.
    pub fn publish_own_record(&mut self, config: &Config) -> Result<(), ServiceError> {
        let now = now_ms();
        let mut record = self
            .state
            .server(self.server_id)
            .cloned()
            .unwrap_or_else(|| {
                ServerRecord::new(String::new(), Vec::new(), config.server.site.clone(), now)
            });
        record.name = config.server.name.clone();
        // The address peers dial: `advertise`, else the listen address.
        let address = config.server.peer_address().unwrap_or(config.server.listen);
        record.addresses = vec![address.to_string()];
        record.site = config.server.site.clone();
        record.software_version = env!("CARGO_PKG_VERSION").to_owned();
        record.updated_at_ms = now;
        let hlc = self.clock.tick(now);
        let delta = self
            .state
            .prepare_server_update(self.server_id, hlc, record)?;
        self.commit(delta)
    }

    /// Records the host's capacity in this server's record, when it changed
    /// enough to matter to the balancers. Returns whether it wrote.
    pub fn publish_capacity(&mut self, capacity: HostCapacity) -> Result<bool, ServiceError> {
        let Some(mut record) = self.state.server(self.server_id).cloned() else {
            return Ok(false);
        };
        if !capacity_changed(&record.capacity, &capacity) {
            return Ok(false);
        }
        let now = now_ms();
        record.capacity = capacity;
        record.updated_at_ms = now;
        let hlc = self.clock.tick(now);
        let delta = self
            .state
            .prepare_server_update(self.server_id, hlc, record)?;
        self.commit(delta)?;
        Ok(true)
    }

    /// Persists a delta made here, applies it, and hands it to the federation.
    fn commit(&mut self, delta: Delta) -> Result<(), ServiceError> {
        self.persist(&delta)?;
        // No receiver (a standalone server) is not an error.
        let _ = self.changes.send(delta);
        Ok(())
    }

    /// Appends a delta to the log (durable), then applies it in memory.
    fn persist(&mut self, delta: &Delta) -> Result<(), ServiceError> {
        if self.store.compaction_incomplete() {
            // Finish the failed compaction first, or the write would be lost.
            self.store.compact(&self.state)?;
        }
        self.store.append(delta)?;
        self.state.apply_delta(delta)?;
        self.note_state_change();
        if self.store.should_compact() {
            // The write is durable already: a failed compaction is retried
            // before the next write, not reported as a failed write.
            if let Err(error) = self.store.compact(&self.state) {
                tracing::warn!(error = %crate::error_chain(&error), "compaction failed; it is retried before the next write");
            }
        }
        Ok(())
    }

    fn note_state_change(&self) {
        self.state_generation
            .send_modify(|generation| *generation += 1);
    }

    /// Changes as they happen (local writes, peers' deltas, membership),
    /// for whoever plans on the state.
    pub fn watch_state(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state_generation.subscribe()
    }

    /// Folds the log into a new snapshot now.
    pub fn compact(&mut self) -> Result<StateSummary, ServiceError> {
        self.store.compact(&self.state)?;
        Ok(self.summary())
    }

    /// Records how the HTTPS API runs, for `deskgrid status`.
    pub fn set_api_status(&mut self, status: ApiStatus) {
        self.api_status = status;
    }

    pub fn status(&self) -> StatusReport {
        let own = self.state.server(self.server_id);
        StatusReport {
            server_id: self.server_id,
            name: own.map(|record| record.name.clone()).unwrap_or_default(),
            site: own
                .map(|record| record.site.to_string())
                .unwrap_or_default(),
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_ms: now_ms().saturating_sub(self.started_at_ms),
            capacity: own
                .map(|record| record.capacity.clone())
                .unwrap_or_default(),
            grid_id: self.grid_id(),
            state_digest: hex::encode(self.state.digest()),
            servers: self
                .state
                .servers()
                .map(|(id, record)| ServerSummary {
                    id,
                    name: record.name.clone(),
                    addresses: record.addresses.clone(),
                    site: record.site.to_string(),
                    updated_at_ms: record.updated_at_ms,
                    this_server: id == self.server_id,
                    removed: self.is_revoked(id),
                    state: self.member_state(id).to_owned(),
                    vms: record.vms.len(),
                    ready_vms: record
                        .vms
                        .values()
                        .filter(|vm| vm.state == crate::model::VmState::Ready)
                        .count(),
                    images_complete: record
                        .images
                        .values()
                        .filter(|holding| matches!(holding, crate::model::ImageHolding::Complete))
                        .count(),
                    images_pulling: record
                        .images
                        .values()
                        .filter(|holding| {
                            matches!(holding, crate::model::ImageHolding::Partial { .. })
                        })
                        .count(),
                    jobs: record.jobs.clone(),
                    transfers: record.transfers.clone(),
                })
                .collect(),
            state: self.summary(),
            api: self.api_status.clone(),
        }
    }

    fn summary(&self) -> StateSummary {
        StateSummary {
            servers: self.state.servers().count(),
            templates: self.state.templates().count(),
            entries: self.state.entry_count(),
            digest: hex::encode(self.state.digest()),
            generation: self.store.generation(),
            log_records: self.store.log_records(),
            log_bytes: self.store.log_bytes(),
        }
    }
}

impl GridService {
    fn member_state(&self, server: ServerId) -> &'static str {
        use crate::federation::membership::MemberState;
        if server == self.server_id {
            return "alive";
        }
        match self.member_states.get(&server) {
            Some(MemberState::Alive) => "alive",
            Some(MemberState::Suspect) => "suspect",
            Some(MemberState::Down) => "missing",
            None => "unknown",
        }
    }
}

/// Free memory and space move all the time; only changes the balancers would
/// act on are written (and gossiped): 256 MiB of memory, 1 GiB of storage.
fn capacity_changed(old: &HostCapacity, new: &HostCapacity) -> bool {
    const MEMORY_STEP_MIB: u64 = 256;
    const STORAGE_STEP_BYTES: u64 = 1 << 30;
    old.cpus != new.cpus
        || old.memory_total_mib != new.memory_total_mib
        || old.storage_total_bytes != new.storage_total_bytes
        || old.memory_free_mib.abs_diff(new.memory_free_mib) >= MEMORY_STEP_MIB
        || old.storage_free_bytes.abs_diff(new.storage_free_bytes) >= STORAGE_STEP_BYTES
}

/// Unix milliseconds from the wall clock (the shells read time; the core takes it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
