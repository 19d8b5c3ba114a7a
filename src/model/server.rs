//! A server's own record: written only by that server, read by all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{
    check_count, check_range, check_text, ImageVersionId, ModelError, SessionId, SiteLabel,
    TemplateName, UserName, VmId,
};

pub const MAX_ADDRESSES: usize = 16;
pub const MAX_ADDRESS_LEN: usize = 128;
pub const MAX_IMAGES_PER_SERVER: usize = 1_024;
pub const MAX_VMS_PER_SERVER: usize = 4_096;
pub const MAX_SESSIONS_PER_SERVER: usize = 4_096;
pub const MAX_JOBS_PER_SERVER: usize = 256;
pub const MAX_JOB_TEXT_LEN: usize = 1_024;

/// What a host has and what is still free, as libvirt reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapacity {
    pub cpus: u32,
    pub memory_total_mib: u64,
    pub memory_free_mib: u64,
    pub storage_total_bytes: u64,
    pub storage_free_bytes: u64,
}

/// A base image version on this server: complete, or being pulled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "status")]
pub enum ImageHolding {
    Complete,
    Partial { bytes_done: u64, bytes_total: u64 },
}

/// Where a desktop VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Being cloned, defined or booted.
    Provisioning,
    /// Booted, agent said hello, nobody assigned.
    Ready,
    /// Promised to a user who is connecting.
    Reserved,
    /// A user is logged in.
    InUse,
    /// Being reset to its base image after a pooled session.
    Refreshing,
    Stopped,
    Failed,
}

/// A desktop VM on this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: VmId,
    pub template: TemplateName,
    pub image: ImageVersionId,
    pub state: VmState,
    pub user: Option<UserName>,
    /// What the VM was created with (its template may change or go later).
    #[serde(default)]
    pub vcpus: u32,
    #[serde(default)]
    pub memory_mib: u64,
}

/// A user's session on a VM of this server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: SessionId,
    pub user: UserName,
    pub vm: VmId,
    pub started_at_ms: u64,
    /// When the user's viewer went away (hosting server's clock, Unix ms);
    /// `None` while a viewer is attached or none was ever seen. After the
    /// grid policy's `disconnect_grace_s` a pooled desktop is logged off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewer_gone_at_ms: Option<u64>,
}

/// An image version this server is pulling now, for every admin to see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    /// Bytes of data chunks in place, of all there are.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Average rate of this pull so far.
    pub rate_bytes_per_s: u64,
    /// Names of the servers it pulls from.
    pub sources: Vec<String>,
    pub started_at_ms: u64,
    /// Fetching the version's difference disk (the bytes are the
    /// compressed overlay's), not its chunks.
    #[serde(default)]
    pub difference_disk: bool,
}

pub const MAX_TRANSFER_SOURCES: usize = 64;

/// Where one of this server's policy jobs is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    /// Being worked on now.
    Running,
    /// Waiting for something else (an image, a boot slot, a retry time).
    Waiting,
    /// Failed and will be retried after a back-off.
    Failed,
}

/// A plan step this server is carrying out, shown to every admin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The step's stable key (what it does to which object).
    pub key: String,
    /// What the step does, for people.
    pub summary: String,
    pub state: JobState,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub updated_at_ms: u64,
}

/// Everything one server says about itself (single writer: that server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    pub name: String,
    /// Peer addresses (`host:port`), most preferred first.
    pub addresses: Vec<String>,
    #[serde(default)]
    pub site: SiteLabel,
    pub software_version: String,
    #[serde(default)]
    pub capacity: HostCapacity,
    #[serde(default)]
    pub images: BTreeMap<ImageVersionId, ImageHolding>,
    #[serde(default)]
    pub vms: BTreeMap<VmId, VmRecord>,
    #[serde(default)]
    pub sessions: BTreeMap<SessionId, SessionRecord>,
    /// Policy jobs in progress or failing, by key.
    #[serde(default)]
    pub jobs: Vec<JobRecord>,
    /// Image pulls in progress.
    #[serde(default)]
    pub transfers: BTreeMap<ImageVersionId, TransferRecord>,
    /// Unix milliseconds of the writer's clock at the last update.
    pub updated_at_ms: u64,
}

impl ServerRecord {
    /// A record for a server that has just been set up: no capacity known yet.
    pub fn new(name: String, addresses: Vec<String>, site: SiteLabel, now_ms: u64) -> Self {
        Self {
            name,
            addresses,
            site,
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            capacity: HostCapacity::default(),
            images: BTreeMap::new(),
            vms: BTreeMap::new(),
            sessions: BTreeMap::new(),
            jobs: Vec::new(),
            transfers: BTreeMap::new(),
            updated_at_ms: now_ms,
        }
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        check_text("name", &self.name, 253)?;
        check_count("addresses", self.addresses.len(), MAX_ADDRESSES)?;
        for address in &self.addresses {
            check_text("address", address, MAX_ADDRESS_LEN)?;
        }
        check_text("software_version", &self.software_version, 64)?;
        check_count("images", self.images.len(), MAX_IMAGES_PER_SERVER)?;
        check_count("vms", self.vms.len(), MAX_VMS_PER_SERVER)?;
        check_count("sessions", self.sessions.len(), MAX_SESSIONS_PER_SERVER)?;
        check_count("jobs", self.jobs.len(), MAX_JOBS_PER_SERVER)?;
        check_count("transfers", self.transfers.len(), MAX_IMAGES_PER_SERVER)?;
        for transfer in self.transfers.values() {
            check_range(
                "transfer bytes_done",
                transfer.bytes_done,
                0,
                transfer.bytes_total,
            )?;
            check_count(
                "transfer sources",
                transfer.sources.len(),
                MAX_TRANSFER_SOURCES,
            )?;
            for source in &transfer.sources {
                check_text("transfer source", source, 253)?;
            }
        }
        for job in &self.jobs {
            check_text("job key", &job.key, MAX_JOB_TEXT_LEN)?;
            check_text("job summary", &job.summary, MAX_JOB_TEXT_LEN)?;
            check_text(
                "job error",
                job.last_error.as_deref().unwrap_or_default(),
                MAX_JOB_TEXT_LEN,
            )?;
        }
        for holding in self.images.values() {
            if let ImageHolding::Partial {
                bytes_done,
                bytes_total,
            } = holding
            {
                check_range("bytes_done", *bytes_done, 0, *bytes_total)?;
            }
        }
        for (id, vm) in &self.vms {
            if *id != vm.id {
                return Err(ModelError::Inconsistent {
                    field: "vms",
                    problem: "a VM is filed under another VM's id",
                });
            }
        }
        for (id, session) in &self.sessions {
            if *id != session.id {
                return Err(ModelError::Inconsistent {
                    field: "sessions",
                    problem: "a session is filed under another session's id",
                });
            }
        }
        Ok(())
    }
}
