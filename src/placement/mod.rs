//! Placement: the seed's three load balancers as pure functions over a view of
//! the grid state.
//!
//! **Invariant:** nothing here does I/O, reads a clock, draws random numbers
//! or lets the iteration order of a hash map reach a decision. Every server
//! that feeds the same [`GridView`] and seed to [`plan`] gets the same
//! [`Plan`], whatever order the records were in; each server then carries
//! out only the steps whose target is itself (DESIGN.md sections 2 and 5).
//!
//! - [`plan`] runs the static balancer (which servers hold which base image
//!   versions) and the dynamic balancer (how many VMs of each template on
//!   which server) together, over one capacity ledger, so that a plan applied
//!   and planned again is empty.
//! - [`ConnectionIndex::rank`] is the connection balancer: for one login, the
//!   servers to ask for a desktop, best first.
//! - [`analyze`] is the seed's "should we balance at all?" step.
//!
//! All ratios are integers (per mille, percent); ties are broken by a
//! rendezvous hash of (object, server) mixed with a grid-wide seed, which
//! keeps movement small when a server joins or leaves.

mod analysis;
mod balance;
mod connection;
mod rendezvous;
mod view;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{ImageVersionId, ServerId, TemplateName, VmId};

pub use analysis::{analyze, Analysis};
pub use balance::{desired_vms, plan};
pub use connection::ConnectionIndex;
pub use rendezvous::{rendezvous, seed_from_bytes};
pub use view::{GridView, Liveness, ServerView};

/// What the failure detector says about a server, as placement sees it.
/// (Re-exported as [`Liveness`]; defined in `view`.)
///
/// A plan: every step names the one server that carries it out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Steps in a canonical order (by target, then action).
    pub steps: Vec<Step>,
    /// Demand the grid cannot meet now, and why.
    pub shortfalls: Vec<Shortfall>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps `server` carries out.
    pub fn steps_for(&self, server: ServerId) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |step| step.target == server)
    }
}

/// One thing one server does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Step {
    pub target: ServerId,
    pub action: Action,
    pub reason: Reason,
}

/// What a step does. Actions are idempotent goals: a server that is already
/// doing one (an image being pulled, VMs provisioning) shows it in its record,
/// and the next plan counts that.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// Fetch a base image version from the servers that hold it.
    PullImage { image: ImageVersionId },
    /// Delete this server's copy of a base image version.
    DropImage { image: ImageVersionId },
    /// Create `count` more VMs of `template` from `image`. The target holds
    /// the image, or is pulling it and creates the VMs once it is complete.
    CreateVms {
        template: TemplateName,
        image: ImageVersionId,
        count: u32,
    },
    /// Destroy one idle (or failed) VM and its disk.
    RemoveVm { vm: VmId, template: TemplateName },
    /// Give a pooled VM whose session ended a fresh disk from its base image
    /// and boot it again (`Refreshing` -> `Ready`).
    RefreshVm { vm: VmId, template: TemplateName },
}

impl Action {
    /// A stable key naming what the action changes: two plans that want the
    /// same thing done give the same key (the policy loop never runs a key
    /// twice at once).
    pub fn key(&self) -> String {
        match self {
            Self::PullImage { image } => format!("pull-image:{image}"),
            Self::DropImage { image } => format!("drop-image:{image}"),
            Self::CreateVms { template, .. } => format!("create-vms:{template}"),
            Self::RemoveVm { vm, .. } => format!("remove-vm:{vm}"),
            Self::RefreshVm { vm, .. } => format!("refresh-vm:{vm}"),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PullImage { image } => write!(formatter, "pull image {image}"),
            Self::DropImage { image } => write!(formatter, "drop image {image}"),
            Self::CreateVms {
                template,
                image,
                count,
            } => write!(
                formatter,
                "create {count} VM{} of template {template} from image {image}",
                if *count == 1 { "" } else { "s" }
            ),
            Self::RemoveVm { vm, template } => {
                write!(formatter, "remove VM {vm} of template {template}")
            }
            Self::RefreshVm { vm, template } => {
                write!(formatter, "refresh VM {vm} of template {template}")
            }
        }
    }
}

/// Why a step is in the plan, with the numbers that made it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "reason")]
pub enum Reason {
    /// Fewer servers hold the image than its templates' minimum replicas.
    BelowMinReplicas { holders: u32, need: u32 },
    /// The image's holders have no room for VMs its templates still need.
    RoomForVms {
        template: TemplateName,
        unplaced: u32,
    },
    /// More copies than needed plus the hysteresis margin.
    SurplusCopy { holders: u32, keep: u32 },
    /// The image is retired or unknown and no VM here uses it any more.
    UnusedImage,
    /// The template has fewer VMs than it wants.
    Deficit { desired: u32, allocated: u32 },
    /// The template has more VMs than it wants (idle ones go).
    Surplus { desired: u32, allocated: u32 },
    /// The VM failed; it is replaced by a fresh one.
    FailedVm,
    /// The idle VM runs an image version its template no longer uses.
    OutdatedImage,
    /// The VM's template was deleted.
    TemplateDeleted,
    /// A pooled session ended: the next user gets a fresh desktop.
    SessionEnded,
}

impl fmt::Display for Reason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BelowMinReplicas { holders, need } => write!(
                formatter,
                "{holders} server(s) hold the image, the templates need {need}"
            ),
            Self::RoomForVms { template, unplaced } => write!(
                formatter,
                "the image's holders have no room for {unplaced} VM(s) of {template}"
            ),
            Self::SurplusCopy { holders, keep } => write!(
                formatter,
                "{holders} copies, {keep} needed (with the hysteresis margin)"
            ),
            Self::UnusedImage => write!(formatter, "no template or VM uses this image"),
            Self::Deficit { desired, allocated } => {
                write!(formatter, "{allocated} of {desired} desired VMs exist")
            }
            Self::Surplus { desired, allocated } => {
                write!(formatter, "{allocated} VMs exist, {desired} desired")
            }
            Self::FailedVm => write!(formatter, "the VM failed"),
            Self::OutdatedImage => {
                write!(formatter, "its template moved to another image version")
            }
            Self::TemplateDeleted => write!(formatter, "its template was deleted"),
            Self::SessionEnded => write!(formatter, "its pooled session ended"),
        }
    }
}

/// Demand the plan could not meet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Shortfall {
    pub template: TemplateName,
    /// VMs the template wants that no server can take now.
    pub missing_vms: u32,
    pub cause: ShortfallCause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShortfallCause {
    /// The template's image version is not in the grid (or not ready).
    ImageNotReady,
    /// No alive server has memory, CPU or disk left for these VMs.
    NoCapacity,
    /// No server holds the image complete yet.
    ImageUnavailable,
}

impl fmt::Display for ShortfallCause {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::ImageNotReady => "its image version is not ready in the grid",
            Self::NoCapacity => "no alive server has memory, CPU or disk left",
            Self::ImageUnavailable => "no alive server holds its image complete",
        })
    }
}
