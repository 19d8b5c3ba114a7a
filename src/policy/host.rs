//! What the policy loop needs from the rest of the server, as narrow traits:
//! the service layer implements [`PolicyHost`] and [`ImagePuller`]
//! (`service/policy_host.rs`, the latter over `transfer::pull_image`);
//! tests use fakes.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::actuator::DomainSpec;
use crate::model::{BaseImage, ServerId, ServerRecord, Template, VmId, VmState};
use crate::placement::Liveness;
use crate::state::GridState;

/// A copy of what the planner reads: the replicated state and what the
/// failure detector says of the other servers.
#[derive(Debug, Clone, Default)]
pub struct PolicySnapshot {
    pub state: GridState,
    /// Servers missing from the map count as [`Liveness::Alive`] (a server
    /// the failure detector has not reported on yet); this server is always
    /// alive to itself.
    pub liveness: BTreeMap<ServerId, Liveness>,
}

/// The server as the policy loop sees it. Calls may block (a record update
/// is an fsync): the loop makes them on tokio's blocking pool.
pub trait PolicyHost: Send + Sync + fmt::Debug + 'static {
    fn server_id(&self) -> ServerId;

    /// The planner's seed: the same on every server of the grid, so that
    /// every server computes the same plan.
    fn seed(&self) -> u64;

    /// Unix milliseconds of the server's wall clock (shown in job records).
    fn now_ms(&self) -> u64;

    fn snapshot(&self) -> PolicySnapshot;

    /// The state of `vm` in this server's own record (`None`: not there).
    /// Asked every half second while a started VM holds a boot slot;
    /// implementations should answer without copying the grid state.
    fn own_vm_state(&self, vm: VmId) -> Option<VmState> {
        let snapshot = self.snapshot();
        snapshot
            .state
            .server(self.server_id())
            .and_then(|record| record.vms.get(&vm))
            .map(|entry| entry.state)
    }

    /// Applies `change` to this server's own record, then persists it and
    /// hands it to the federation, as every write does. A change that
    /// leaves the record as it was writes nothing. The error is for people.
    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String>;

    /// The domain of a new desktop VM of `template` on its overlay disk at
    /// `disk_path`, with this server's settings: domain type, network,
    /// display address, and a display password nobody knows (the display
    /// stays locked until the broker sets a ticket).
    fn domain_spec(&self, template: &Template, vm: VmId, disk_path: String) -> DomainSpec;
}

/// What [`ImagePuller::pull`] returns: resolves once the image is complete.
pub type PullFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'static>>;

/// Brings a base image version to this host from the servers that hold it.
pub trait ImagePuller: Send + Sync + fmt::Debug + 'static {
    /// Fetches `image` into this host's pool as its base volume
    /// (`dg-base-<version>`); resolves once the volume is complete and
    /// verified. Pulling an image that is already complete succeeds at once;
    /// a pull that failed or was interrupted resumes where it stopped.
    /// The error is for people.
    fn pull(&self, image: &BaseImage) -> PullFuture;
}

/// A puller for tests that need none: every pull fails, and the loop
/// reports the job as failing, with this reason, in the server's record.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoImageTransfer;

/// What a pull through [`NoImageTransfer`] fails with.
pub const NO_IMAGE_TRANSFER: &str = "image transfer is not available yet";

impl ImagePuller for NoImageTransfer {
    fn pull(&self, _image: &BaseImage) -> PullFuture {
        Box::pin(async { Err(NO_IMAGE_TRANSFER.to_owned()) })
    }
}
