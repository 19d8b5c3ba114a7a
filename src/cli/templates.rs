//! `deskgrid template`: desktop templates in the grid state, changed through
//! the running server so each change is logged and sent to every peer.

use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

use super::output::Output;
use crate::api::control_socket::{self, ControlCommand, ControlReply};
use crate::appliance::data_dir::DataDir;
use crate::model::{
    DisplayProtocol, ImageVersionId, Template, TemplateKind, TemplateName, DEFAULT_MIN_REPLICAS,
};
use crate::service::templates::TemplateChange;

/// Without `--monitors`: one screen, the model's default for a template
/// stored without the field (a test below keeps the two equal).
const DEFAULT_MONITORS: u32 = 1;

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Create a template: the base image its desktops are cloned from, their
    /// size, and how many the grid keeps. The image may be imported later;
    /// until then no desktops are created.
    Create(CreateArgs),

    /// List the grid's templates.
    List,

    /// Change some settings of a template; the others keep their values.
    Set(SetArgs),

    /// Delete a template.
    Delete {
        /// The template's name (see `deskgrid template list`).
        name: TemplateName,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The template's name: letters, digits, '-', '_' and '.'.
    pub name: TemplateName,

    /// The base image version its desktops are cloned from.
    #[arg(long, value_name = "VERSION")]
    pub image: ImageVersionId,

    /// Virtual CPUs per desktop.
    #[arg(long, value_name = "N")]
    pub vcpus: u32,

    /// Memory per desktop, in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: u64,

    /// How many desktops of this template the grid keeps.
    #[arg(long, value_name = "N")]
    pub desired: u32,

    /// Ready, unassigned desktops kept as headroom for logins.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_idle: u32,

    /// The fewest servers that hold the base image, whatever the desktop count.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MIN_REPLICAS)]
    pub replicas: u32,

    /// Keep at least this percentage of the template's entitled users in
    /// desktops (0: only --desired counts).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub concurrency_percent: u32,

    #[command(flatten)]
    pub kind: KindArgs,

    /// The remote display protocol of its desktops.
    #[arg(long, value_enum, default_value_t = DisplayArg::Spice)]
    pub display: DisplayArg,

    /// Monitors per desktop.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MONITORS)]
    pub monitors: u32,
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// The template's name (see `deskgrid template list`).
    pub name: TemplateName,

    /// The base image version new desktops are cloned from.
    #[arg(long, value_name = "VERSION")]
    pub image: Option<ImageVersionId>,

    /// Virtual CPUs per desktop.
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u32>,

    /// Memory per desktop, in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,

    /// How many desktops of this template the grid keeps.
    #[arg(long, value_name = "N")]
    pub desired: Option<u32>,

    /// Ready, unassigned desktops kept as headroom for logins.
    #[arg(long, value_name = "N")]
    pub min_idle: Option<u32>,

    /// The fewest servers that hold the base image.
    #[arg(long, value_name = "N")]
    pub replicas: Option<u32>,

    /// Keep at least this percentage of the entitled users in desktops.
    #[arg(long, value_name = "N")]
    pub concurrency_percent: Option<u32>,

    #[command(flatten)]
    pub kind: KindArgs,

    /// The remote display protocol of its desktops.
    #[arg(long, value_enum)]
    pub display: Option<DisplayArg>,

    /// Monitors per desktop.
    #[arg(long, value_name = "N")]
    pub monitors: Option<u32>,
}

/// `--pooled` or `--personal`, never both.
#[derive(Debug, Args)]
pub struct KindArgs {
    /// Any entitled user gets any ready desktop, refreshed from the image at
    /// logout (the default for a new template).
    #[arg(long, conflicts_with = "personal")]
    pub pooled: bool,

    /// Each user keeps their own desktop and its disk across sessions.
    #[arg(long)]
    pub personal: bool,
}

impl KindArgs {
    fn kind(&self) -> Option<TemplateKind> {
        match (self.pooled, self.personal) {
            (true, _) => Some(TemplateKind::Pooled),
            (_, true) => Some(TemplateKind::Personal),
            _ => None,
        }
    }
}

/// The display protocols as the command line spells them (the model stays
/// free of clap).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DisplayArg {
    Spice,
    Vnc,
}

impl From<DisplayArg> for DisplayProtocol {
    fn from(display: DisplayArg) -> Self {
        match display {
            DisplayArg::Spice => DisplayProtocol::Spice,
            DisplayArg::Vnc => DisplayProtocol::Vnc,
        }
    }
}

impl CreateArgs {
    fn into_template(self) -> Template {
        Template {
            kind: self.kind.kind().unwrap_or_default(),
            name: self.name,
            image: self.image,
            vcpus: self.vcpus,
            memory_mib: self.memory,
            desired_vms: self.desired,
            min_idle_vms: self.min_idle,
            min_replicas: self.replicas,
            concurrency_percent: self.concurrency_percent,
            display: self.display.into(),
            monitors: self.monitors,
        }
    }
}

impl SetArgs {
    fn change(&self) -> TemplateChange {
        TemplateChange {
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory,
            desired_vms: self.desired,
            min_idle_vms: self.min_idle,
            min_replicas: self.replicas,
            concurrency_percent: self.concurrency_percent,
            kind: self.kind.kind(),
            display: self.display.map(Into::into),
            monitors: self.monitors,
        }
    }
}

/// Runs a `deskgrid template` command against the running server.
pub fn run(
    data_dir: &DataDir,
    command: TemplateCommand,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    data_dir.require_initialised()?;
    let call = |command| control_socket::call(&data_dir.control_socket(), data_dir.root(), command);
    match command {
        TemplateCommand::Create(args) => {
            let template = args.into_template();
            match call(ControlCommand::CreateTemplate { template })? {
                ControlReply::TemplateStored(stored) => output.template_stored(&stored, "created"),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
        }
        TemplateCommand::List => match call(ControlCommand::ListTemplates)? {
            ControlReply::Templates(templates) => output.templates(&templates),
            other => anyhow::bail!("unexpected answer from the server: {other:?}"),
        },
        TemplateCommand::Set(args) => {
            let change = args.change();
            match call(ControlCommand::UpdateTemplate {
                name: args.name,
                change,
            })? {
                ControlReply::TemplateStored(stored) => output.template_stored(&stored, "changed"),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
        }
        TemplateCommand::Delete { name } => match call(ControlCommand::DeleteTemplate { name })? {
            ControlReply::TemplateDeleted { name } => output.template_deleted(&name),
            other => anyhow::bail!("unexpected answer from the server: {other:?}"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(arguments: &[&str]) -> Result<TemplateCommand, clap::Error> {
        let cli = Cli::try_parse_from(["deskgrid", "template"].iter().chain(arguments))?;
        match cli.command {
            Command::Template(command) => Ok(command),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn create_defaults_are_the_models_defaults() {
        let Ok(TemplateCommand::Create(args)) = parse(&[
            "create",
            "office",
            "--image",
            "v1",
            "--vcpus",
            "2",
            "--memory",
            "4096",
            "--desired",
            "3",
        ]) else {
            panic!("create parses");
        };
        let from_cli = args.into_template();
        let from_model: Template = serde_json::from_value(serde_json::json!({
            "name": "office", "image": "v1", "vcpus": 2, "memory_mib": 4096, "desired_vms": 3,
        }))
        .expect("a template with only the required fields");
        assert_eq!(from_cli, from_model);
    }

    #[test]
    fn pooled_and_personal_conflict_and_set_takes_only_what_is_given() {
        let error = parse(&["set", "office", "--pooled", "--personal"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
        let Ok(TemplateCommand::Set(args)) =
            parse(&["set", "office", "--personal", "--memory", "8192"])
        else {
            panic!("set parses");
        };
        assert_eq!(
            args.change(),
            TemplateChange {
                memory_mib: Some(8192),
                kind: Some(TemplateKind::Personal),
                ..TemplateChange::default()
            }
        );
        assert!(parse(&["create", "bad name", "--image", "v1"]).is_err());
    }
}
