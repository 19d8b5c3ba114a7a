//! `deskgrid policy`: the grid-wide policy (planner thresholds, boot limit,
//! disconnect grace), changed through the running server so the change is
//! logged and sent to every peer.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use super::output::Output;
use crate::api::control_socket::{self, ControlCommand, ControlReply};
use crate::appliance::data_dir::DataDir;
use crate::service::grid_policy::PolicyChange;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Show the grid's policy.
    Show,
    /// Change some settings; the others keep their values. Every server
    /// plans with the new values once the change reaches it.
    Set(SetArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// How long a desktop whose viewer went away stays its user's before a
    /// pooled one is logged off and refreshed, in seconds (0 to 604800).
    #[arg(long, value_name = "SECONDS")]
    pub disconnect_grace: Option<u32>,

    /// Desktops one server boots at once (a slot is held until the agent
    /// says hello).
    #[arg(long, value_name = "N")]
    pub max_concurrent_boots: Option<u32>,

    /// vCPUs promised per physical CPU, in per mille (4000 = 4:1).
    #[arg(long, value_name = "PERMILLE")]
    pub cpu_overcommit: Option<u32>,

    /// Guest memory promised per byte of host memory, in per mille.
    #[arg(long, value_name = "PERMILLE")]
    pub memory_overcommit: Option<u32>,

    /// Memory kept free on every host for the host itself, in MiB.
    #[arg(long, value_name = "MIB")]
    pub host_reserved_memory: Option<u64>,

    /// Extra image copies tolerated before surplus copies are dropped.
    #[arg(long, value_name = "N")]
    pub replica_hysteresis: Option<u32>,

    /// Desired-count changes smaller than this trigger no rebalancing.
    #[arg(long, value_name = "N")]
    pub desired_change_threshold: Option<u32>,
}

impl SetArgs {
    fn change(&self) -> PolicyChange {
        PolicyChange {
            cpu_overcommit_permille: self.cpu_overcommit,
            memory_overcommit_permille: self.memory_overcommit,
            replica_hysteresis: self.replica_hysteresis,
            desired_change_threshold: self.desired_change_threshold,
            host_reserved_memory_mib: self.host_reserved_memory,
            max_concurrent_boots: self.max_concurrent_boots,
            disconnect_grace_s: self.disconnect_grace,
        }
    }
}

/// Runs a `deskgrid policy` command against the running server.
pub fn run(
    data_dir: &DataDir,
    command: PolicyCommand,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    data_dir.require_initialised()?;
    let command = match command {
        PolicyCommand::Show => ControlCommand::ShowPolicy,
        PolicyCommand::Set(args) => ControlCommand::UpdatePolicy {
            change: args.change(),
        },
    };
    match control_socket::call(&data_dir.control_socket(), data_dir.root(), command)? {
        ControlReply::Policy(policy) => output.policy(&policy),
        other => anyhow::bail!("unexpected answer from the server: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}
