//! `deskgrid user`, `deskgrid entitle`, `deskgrid session` and `deskgrid
//! connect`: accounts and desktops, through the running server.
//!
//! Passwords are read from a file, standard input or the terminal (echo
//! off), never from the command line, where every user of the host could
//! read them. `user add` hashes on this side: the server only ever stores
//! and sees the argon2id hash.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::output::Output;
use crate::api::control_socket::{self, ControlCommand, ControlReply};
use crate::appliance::data_dir::DataDir;
use crate::model::{EntitlementSubject, GroupName, SiteLabel, TemplateName, UserName};
use crate::service::accounts;
use crate::service::desktops::{viewer_file_text, Password};
use crate::service::users::NewUser;

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user who can log in to desktops. The password is read from
    /// --password-file, --password-stdin, or asked for (twice) on a terminal.
    Add(AddArgs),

    /// List the grid's users with their groups and the templates they may use.
    List,

    /// Delete a user and the entitlements given to them by name.
    Delete {
        /// The user's login name.
        name: UserName,
    },
}

/// Where a password comes from: never the command line.
#[derive(Debug, Args)]
pub struct PasswordArgs {
    /// Read the password from this file (its first line).
    #[arg(long, value_name = "FILE", conflicts_with = "password_stdin")]
    pub password_file: Option<PathBuf>,

    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Login name: letters, digits, '-', '_' and '.'.
    pub name: UserName,

    #[command(flatten)]
    pub password: PasswordArgs,

    /// The name shown to people.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub display_name: String,

    /// A group the user belongs to (created if new); repeat for several.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<GroupName>,
}

#[derive(Debug, Args)]
pub struct EntitleArgs {
    /// The user to entitle.
    #[arg(
        long,
        value_name = "USER",
        conflicts_with = "group",
        required_unless_present = "group"
    )]
    pub user: Option<UserName>,

    /// The group to entitle: every member may use the template.
    #[arg(long, value_name = "GROUP")]
    pub group: Option<GroupName>,

    /// The template its desktops come from.
    #[arg(long, value_name = "TEMPLATE")]
    pub template: TemplateName,

    /// Withdraw the entitlement instead.
    #[arg(long)]
    pub remove: bool,
}

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Every session and reservation in the grid: user, desktop, server, since when.
    List,

    /// Log a user off: the servers hosting their sessions end them (and a
    /// pooled desktop is refreshed).
    Logoff {
        /// The user's login name.
        user: UserName,
    },
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// The user logging in.
    #[arg(long, value_name = "USER")]
    pub user: UserName,

    #[command(flatten)]
    pub password: PasswordArgs,

    /// The template, when the user may use several.
    #[arg(long, value_name = "TEMPLATE")]
    pub template: Option<TemplateName>,

    /// The client's site: among equally loaded servers, one there is preferred.
    #[arg(long, value_name = "LABEL")]
    pub site: Option<SiteLabel>,

    /// Where to write the remote-viewer file [default: deskgrid-USER.vv in
    /// the current directory]. Open it with `remote-viewer FILE`.
    #[arg(long, value_name = "PATH")]
    pub vv_file: Option<PathBuf>,
}

fn call(data_dir: &DataDir, command: ControlCommand) -> anyhow::Result<ControlReply> {
    data_dir.require_initialised()?;
    Ok(control_socket::call(
        &data_dir.control_socket(),
        data_dir.root(),
        command,
    )?)
}

pub fn run_user(
    data_dir: &DataDir,
    command: UserCommand,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    match command {
        UserCommand::Add(args) => {
            data_dir.require_initialised()?;
            let password =
                read_password(&args.password, &format!("password for {}", args.name), true)?;
            if password.is_empty() {
                anyhow::bail!("the password is empty; nothing was written");
            }
            let password_hash = accounts::hash_password(&password)?;
            let user = NewUser {
                name: args.name,
                display_name: args.display_name,
                password_hash,
                groups: args.groups,
            };
            match call(data_dir, ControlCommand::AddUser { user })? {
                ControlReply::UserAdded(summary) => output.user_added(&summary),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
        }
        UserCommand::List => match call(data_dir, ControlCommand::ListUsers)? {
            ControlReply::Users(users) => output.users(&users),
            other => anyhow::bail!("unexpected answer from the server: {other:?}"),
        },
        UserCommand::Delete { name } => {
            match call(data_dir, ControlCommand::DeleteUser { name })? {
                ControlReply::UserDeleted { name } => output.user_deleted(&name),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_entitle(
    data_dir: &DataDir,
    args: EntitleArgs,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    let subject = match (args.user, args.group) {
        (Some(user), _) => EntitlementSubject::User(user),
        (None, Some(group)) => EntitlementSubject::Group(group),
        (None, None) => anyhow::bail!("give --user USER or --group GROUP"),
    };
    match call(
        data_dir,
        ControlCommand::Entitle {
            subject,
            template: args.template,
            remove: args.remove,
        },
    )? {
        ControlReply::Entitlement(change) => output.entitlement(&change),
        other => anyhow::bail!("unexpected answer from the server: {other:?}"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_session(
    data_dir: &DataDir,
    command: SessionCommand,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    match command {
        SessionCommand::List => match call(data_dir, ControlCommand::ListSessions)? {
            ControlReply::Sessions(sessions) => output.sessions(&sessions),
            other => anyhow::bail!("unexpected answer from the server: {other:?}"),
        },
        SessionCommand::Logoff { user } => match call(data_dir, ControlCommand::LogOff { user })? {
            ControlReply::LoggedOff(report) => output.logged_off(&report),
            other => anyhow::bail!("unexpected answer from the server: {other:?}"),
        },
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run_connect(
    data_dir: &DataDir,
    args: ConnectArgs,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    data_dir.require_initialised()?;
    let password = read_password(
        &args.password,
        &format!("password for {}", args.user),
        false,
    )?;
    let vv_path = args
        .vv_file
        .unwrap_or_else(|| PathBuf::from(format!("deskgrid-{}.vv", args.user)));
    let reservation = match call(
        data_dir,
        ControlCommand::Connect {
            user: args.user,
            password: Password::new(password),
            template: args.template,
            client_site: args.site,
        },
    )? {
        ControlReply::Connected(reservation) => reservation,
        other => anyhow::bail!("unexpected answer from the server: {other:?}"),
    };
    let text = viewer_file_text(&reservation)?;
    write_private(&vv_path, &text).with_context(|| {
        format!(
            "the desktop is reserved, but {} cannot be written",
            vv_path.display()
        )
    })?;
    output.connected(&reservation, &vv_path);
    Ok(ExitCode::SUCCESS)
}

/// Writes `text` to a new file readable by its owner only (the ticket is a
/// credential): an existing file is replaced, a symbolic link at `path` is
/// never followed.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// The password from --password-file, --password-stdin, or the terminal
/// (asked twice when `confirm`, for a new password).
fn read_password(args: &PasswordArgs, prompt: &str, confirm: bool) -> anyhow::Result<String> {
    if let Some(path) = &args.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(text.lines().next().unwrap_or_default().to_owned());
    }
    let stdin = std::io::stdin();
    if args.password_stdin {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    if !stdin.is_terminal() {
        anyhow::bail!("give the password with --password-file FILE or --password-stdin (never on the command line)");
    }
    let first = super::setup::prompt_hidden(&format!("{prompt}: "))?;
    if confirm {
        let second = super::setup::prompt_hidden("again: ")?;
        if first != second {
            anyhow::bail!("the two passwords differ; nothing was written");
        }
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, Command};

    #[test]
    fn entitle_needs_exactly_one_subject_and_passwords_never_come_as_arguments() {
        let parse = |arguments: &[&str]| Cli::try_parse_from(["deskgrid"].iter().chain(arguments));
        assert!(parse(&["entitle", "--template", "office"]).is_err());
        assert!(parse(&[
            "entitle",
            "--user",
            "a",
            "--group",
            "g",
            "--template",
            "office"
        ])
        .is_err());
        let Ok(Cli {
            command: Command::Entitle(args),
            ..
        }) = parse(&[
            "entitle",
            "--group",
            "staff",
            "--template",
            "office",
            "--remove",
        ])
        else {
            panic!("entitle parses");
        };
        assert!(args.remove && args.user.is_none());
        assert!(parse(&["user", "add", "alice", "--password", "x"]).is_err());
        assert!(parse(&[
            "connect",
            "--user",
            "a",
            "--password-file",
            "f",
            "--password-stdin"
        ])
        .is_err());
    }

    #[test]
    fn a_viewer_file_is_private_and_replaces_what_was_there() {
        use std::os::unix::fs::PermissionsExt as _;
        let temp = tempfile::tempdir().expect("temp dir");
        let path = temp.path().join("desk.vv");
        std::fs::write(&path, "old").expect("written");
        super::write_private(&path, "new").expect("replaced");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "new");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
