//! The policy engine's reconcile loop: turns placement's plans into jobs on
//! this server's host (DESIGN.md sections 2 and 3, "decide globally, act
//! locally").
//!
//! [`PolicyWorker::run`] wakes when the state changes (debounced; planned
//! only when [`crate::placement::analyze`] says a balancer has work) and on a
//! timer (always planned), computes the plan from a snapshot of the state,
//! and runs the steps whose target is this server as jobs keyed by
//! [`crate::placement::Action::key`]. `jobs.rs` is the sans-IO job table
//! (which steps run, wait or back off; what the record shows), `steps.rs`
//! carries out one step on the host, `worker.rs` is the loop.
//!
//! **Invariants:**
//! - A job key never runs twice at once, and a running job is never stopped
//!   half-way by a new plan; it ends, and the next plan decides again.
//! - Only this server's host and this server's own record are changed. What
//!   a job is doing is visible in the record before the work starts (a VM as
//!   `Provisioning`, an image as `Partial`), so every plan counts it.
//! - Failing jobs are retried with an exponential, capped back-off, and
//!   shown in the record (`ServerRecord.jobs`) with their attempts and last
//!   error until they succeed or the plan no longer wants them.
//! - At most `Policy.max_concurrent_boots` VMs are provisioned at once;
//!   with the desktop service a VM holds its slot until its agent's hello
//!   (the record leaves `Provisioning`), so a pool refill is no boot storm.
//!
//! The loop reaches the rest of the server through narrow traits:
//! [`PolicyHost`] (the service layer: state, own record, settings) and
//! [`ImagePuller`] (image transfer, wired by the service layer); the host
//! itself is the actuator's [`crate::actuator::AsyncHypervisor`].
//!
//! A pull that fails once its volume exists, or is cut short by a restart,
//! keeps its partial copy (volume, progress file, `Partial` record) and is
//! resumed by the loop:
//! the planner counts a partial copy as a holder and plans no pull for it,
//! so the loop adds one itself while the plan does not drop the copy.

mod host;
mod jobs;
mod steps;
mod worker;

pub use host::{
    ImagePuller, NoImageTransfer, PolicyHost, PolicySnapshot, PullFuture, NO_IMAGE_TRANSFER,
};
pub use steps::PolicyError;
pub use worker::{Planner, PolicySettings, PolicyWaker, PolicyWorker};
