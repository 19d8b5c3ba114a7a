//! The `deskgrid` command line: one consistent style for every command.
//!
//! Every command takes `--data-dir` (default `/var/lib/deskgrid`, or
//! `DESKGRID_DATA_DIR`) and `--output text|json`. While `deskgrid serve` runs,
//! commands reach it through the control socket; only `init` and `state check`
//! work on the files directly.

mod images;
mod output;
mod policy;
mod setup;
mod templates;
mod users;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::api::control_socket::{self, ControlCommand, ControlReply};
use crate::appliance::config::{Config, DomainType, LibvirtSettings, DEFAULT_PEER_PORT};
use crate::appliance::data_dir::{DataDir, DEFAULT_DATA_DIR};
use crate::model::SiteLabel;
use output::{Output, OutputFormat};

/// deskgrid: a shared-nothing desktop-virtualization grid.
///
/// One deskgrid server runs on every hypervisor host. The servers share one
/// grid state peer to peer and place base images and desktop VMs among
/// themselves: no SAN, no database server, no management cluster.
#[derive(Debug, Parser)]
#[command(
    name = "deskgrid",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    /// This server's data directory (config.toml, keys, grid state).
    #[arg(long, global = true, env = "DESKGRID_DATA_DIR", default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,

    /// How to print results: for people, or JSON for scripts.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Set up this server: create the data directory, a server id and a
    /// commented config.toml. Run once per server, before `serve`.
    Init(InitArgs),

    /// Join an existing grid through any of its servers, with a join token.
    /// Creates this server's data directory like `init`, verifies the grid's
    /// certificate authority against the token before revealing the token's
    /// secret, and receives a certificate and the grid state.
    Join(JoinArgs),

    /// Join tokens for new servers (asks the running server).
    #[command(subcommand)]
    Token(TokenCommand),

    /// Run this server until SIGTERM or Ctrl-C. Logs go to stderr (RUST_LOG
    /// sets the level, default info).
    Serve,

    /// Show the running server's view of the grid.
    Status,

    /// Inspect or maintain the grid state files.
    #[command(subcommand)]
    State(StateCommand),

    /// The plan this server computes from its current state: every step,
    /// the server that carries it out and why. Servers whose states agree
    /// print the same plan. Also wakes this server's policy loop so its own
    /// steps start now, unless --dry-run.
    Plan {
        /// Only print the plan; do not wake the policy loop.
        #[arg(long)]
        dry_run: bool,
    },

    /// List the deskgrid grids announced by mDNS on this network (grids
    /// whose servers have `mdns` on). Needs no data directory.
    Discover {
        /// Where to listen: all, loopback, or interface names (eth0,eth1).
        #[arg(long, value_name = "SCOPE", default_value = "all")]
        scope: String,
        /// How long to listen.
        #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = setup::parse_duration)]
        wait: std::time::Duration,
    },

    /// Servers of the grid (asks the running server).
    #[command(subcommand)]
    Server(ServerCommand),

    /// This server's host: is it ready for desktops?
    #[command(subcommand)]
    Host(HostCommand),

    /// Desktop templates of the grid (asks the running server).
    #[command(subcommand)]
    Template(templates::TemplateCommand),

    /// The grid's policy: planner thresholds, the boot limit and the
    /// disconnect grace (asks the running server).
    #[command(subcommand)]
    Policy(policy::PolicyCommand),

    /// Base images of the grid: import one, list them.
    #[command(subcommand)]
    Image(images::ImageCommand),

    /// Users who log in to desktops (asks the running server).
    #[command(subcommand)]
    User(users::UserCommand),

    /// Let a user or a group use a template's desktops (or, with --remove,
    /// no longer).
    Entitle(users::EntitleArgs),

    /// Users' sessions across the grid.
    #[command(subcommand)]
    Session(users::SessionCommand),

    /// Log a user in and reserve a desktop on whichever server has one free:
    /// prints the connection details and writes a remote-viewer (.vv) file.
    Connect(users::ConnectArgs),
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Check that this host can run desktops: libvirt reachable (and its
    /// version), KVM or software emulation, the storage pool and its free
    /// space, the network. Says what to do about each problem, and exits
    /// non-zero when something blocks desktops. Uses config.toml when the
    /// data directory has one; the options override it. Changes nothing.
    Check(HostCheckArgs),
}

#[derive(Debug, clap::Args)]
pub struct HostCheckArgs {
    /// libvirt URI to check [default: from config.toml, else qemu:///system].
    #[arg(long, value_name = "URI")]
    pub libvirt: Option<String>,

    /// Storage pool to check [default: from config.toml, else deskgrid].
    #[arg(long, value_name = "NAME")]
    pub pool: Option<String>,

    /// libvirt network to check [default: from config.toml, else default].
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,

    /// Domain type to check [default: from config.toml, else auto].
    #[arg(long, value_enum)]
    pub domain_type: Option<DomainType>,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Verify the snapshot and log without starting a server: every record's
    /// checksum and content. Reports damage with the file and byte offset, and
    /// a torn last record (left by a crash) that the next start will cut off.
    /// Exits non-zero when the state cannot be recovered.
    Check,

    /// Fold the log into a new snapshot now (the running server does this by
    /// itself when the log grows).
    Compact,
}

#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Create a new grid with this server as its first member: a grid id, the
    /// grid's certificate authority, this server's certificate and the first
    /// admin account.
    #[arg(long)]
    pub new_grid: bool,

    /// Login name of the first admin (with --new-grid).
    #[arg(
        long,
        value_name = "NAME",
        default_value = "admin",
        requires = "new_grid"
    )]
    pub admin_user: crate::model::UserName,

    /// Read the first admin's password from this file (with --new-grid);
    /// without it the password is read from standard input, or asked for
    /// when standard input is a terminal. Never give it on the command line.
    #[arg(long, value_name = "FILE", requires = "new_grid")]
    pub admin_password_file: Option<PathBuf>,

    #[command(flatten)]
    pub settings: ServerSettingsArgs,
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// Address (HOST:PORT) of any server of the grid.
    #[arg(value_name = "SEED_ADDRESS")]
    pub seed: String,

    /// The join token from `deskgrid token create` on a grid member.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "DESKGRID_JOIN_TOKEN",
        hide_env_values = true
    )]
    pub token: String,

    #[command(flatten)]
    pub settings: ServerSettingsArgs,
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Remove a server from the grid for good: its certificate is revoked
    /// everywhere, no server talks to it again, and it cannot rejoin with
    /// the same identity. Its record stays, marked removed.
    Remove {
        /// The server's id (see `deskgrid status`).
        id: crate::model::ServerId,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token: a new server joins with
    /// `deskgrid join SEED --token TOKEN`. The token pins this grid's
    /// certificate authority and carries a secret; only its hash is stored.
    Create {
        /// How long the token admits servers (e.g. 30m, 2h, 7d).
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = setup::parse_duration)]
        ttl: std::time::Duration,
        /// How many servers may join with it.
        #[arg(long, value_name = "N", default_value_t = 1)]
        uses: u32,
    },
}

#[derive(Debug, clap::Args)]
pub struct ServerSettingsArgs {
    /// Name shown in the consoles [default: this machine's host name].
    #[arg(long)]
    pub name: Option<String>,

    /// Address and UDP port this server listens on for other servers (QUIC).
    #[arg(long, value_name = "ADDR", default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PEER_PORT)))]
    pub listen: SocketAddr,

    /// libvirt URI of this host: qemu:///system on the host itself,
    /// qemu+tls://HOST/system from an appliance VM.
    #[arg(long, value_name = "URI", default_value = "qemu:///system")]
    pub libvirt: String,

    /// libvirt storage pool for base images and desktop disks.
    #[arg(long, value_name = "NAME", default_value = "deskgrid")]
    pub pool: String,

    /// Directory of the pool when deskgrid creates it.
    #[arg(long, value_name = "DIR", default_value = crate::appliance::config::DEFAULT_POOL_PATH)]
    pub pool_path: String,

    /// libvirt network the desktops attach to; `user-mode` for QEMU's
    /// user-mode networking (no host setup), `none` for no network card.
    #[arg(long, value_name = "NAME", default_value = "default")]
    pub network: String,

    /// Site label: servers with the same label are near each other.
    #[arg(long, value_name = "LABEL", default_value = "default")]
    pub site: SiteLabel,

    /// A grid member to contact first (HOST:PORT); repeat for several.
    #[arg(long = "seed", value_name = "ADDR")]
    pub seeds: Vec<String>,

    /// Address and UDP port (IP:PORT) other servers dial to reach this one,
    /// when not the --listen address; required with --listen 0.0.0.0 or ::.
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,

    /// Announce the grid by mDNS: off, all, loopback, or interface names
    /// (eth0,eth1).
    #[arg(long, value_name = "SCOPE", default_value = "off")]
    pub mdns: String,

    /// kvm, qemu (software emulation) or auto (kvm when the host offers it).
    #[arg(long, value_enum, default_value_t = DomainType::Auto)]
    pub domain_type: DomainType,

    /// Where the HTTPS API listens: IP:PORT, off, or auto (the --listen IP,
    /// its port plus 1000: 8443 beside 7443).
    #[arg(long, value_name = "ADDR", default_value = "auto")]
    pub api_listen: String,
}

/// Runs the command line; what `main` of the `deskgrid` binary calls.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve);
    if !serving {
        die_quietly_on_a_closed_pipe();
    }
    init_logging(serving);
    let output = Output::new(cli.output);
    match run(cli, &output) {
        Ok(code) => code,
        Err(error) => {
            output.error(&error);
            ExitCode::FAILURE
        }
    }
}

/// A CLI command whose output goes to a pipe that closed (`deskgrid status
/// | head`) ends quietly, as Unix tools do, instead of panicking on the
/// failed write: SIGPIPE gets its default action back (Rust ignores it so
/// writes return an error). Never for `serve`: a daemon must see EPIPE on
/// a peer's closed socket as an error, not die of it.
fn die_quietly_on_a_closed_pipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    #[allow(unsafe_code)]
    // SAFETY: called once at start, before any other thread exists;
    // SIG_DFL installs no handler code.
    let restored = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    if let Err(error) = restored {
        tracing::debug!(%error, "cannot restore the default SIGPIPE action");
    }
}

fn init_logging(serving: bool) {
    let default_level = if serving { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli, output: &Output) -> anyhow::Result<ExitCode> {
    let data_dir = DataDir::new(cli.data_dir.clone());
    match cli.command {
        Command::Init(args) => setup::init(&data_dir, args, output),
        Command::Join(args) => setup::join(&data_dir, args, output),
        Command::Discover { scope, wait } => {
            let scope = crate::appliance::config::parse_mdns_scope(&scope)
                .map_err(anyhow::Error::msg)?
                .context("--scope off discovers nothing")?;
            let grids = crate::service::grid::discover_grids(&scope, wait)?;
            output.discovered(&grids);
            Ok(ExitCode::SUCCESS)
        }
        Command::Server(ServerCommand::Remove { id }) => {
            data_dir.require_initialised()?;
            match control_socket::call(
                &data_dir.control_socket(),
                data_dir.root(),
                ControlCommand::RemoveServer { id },
            )? {
                ControlReply::ServerRemoved { id } => output.server_removed(id),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Create { ttl, uses }) => {
            data_dir.require_initialised()?;
            match control_socket::call(
                &data_dir.control_socket(),
                data_dir.root(),
                ControlCommand::CreateJoinToken {
                    ttl_seconds: ttl.as_secs(),
                    uses,
                },
            )? {
                ControlReply::JoinToken {
                    token,
                    expires_at_ms,
                } => output.join_token(&token, expires_at_ms, uses),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { dry_run } => {
            data_dir.require_initialised()?;
            match control_socket::call(
                &data_dir.control_socket(),
                data_dir.root(),
                ControlCommand::Plan { run_now: !dry_run },
            )? {
                ControlReply::Plan(plan) => output.plan(&plan),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Template(command) => templates::run(&data_dir, command, output),
        Command::Policy(command) => policy::run(&data_dir, command, output),
        Command::Image(command) => images::run(&data_dir, command, output),
        Command::User(command) => users::run_user(&data_dir, command, output),
        Command::Entitle(args) => users::run_entitle(&data_dir, args, output),
        Command::Session(command) => users::run_session(&data_dir, command, output),
        Command::Connect(args) => users::run_connect(&data_dir, args, output),
        Command::Serve => {
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(crate::appliance::serve(data_dir))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            data_dir.require_initialised()?;
            match control_socket::call(
                &data_dir.control_socket(),
                data_dir.root(),
                ControlCommand::Status,
            )? {
                ControlReply::Status(status) => output.status(&status),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::State(StateCommand::Check) => {
            data_dir.require_initialised()?;
            let running = data_dir.is_locked();
            let report = crate::state::store::check(&data_dir.state_dir()).with_context(|| {
                format!(
                    "the grid state in {} cannot be recovered",
                    data_dir.state_dir().display()
                )
            })?;
            output.state_check(&data_dir.state_dir(), &report, running);
            Ok(ExitCode::SUCCESS)
        }
        Command::Host(HostCommand::Check(args)) => {
            let mut settings = if data_dir.is_initialised() {
                Config::load(&data_dir.config_file())?.libvirt
            } else {
                LibvirtSettings::default()
            };
            if let Some(uri) = args.libvirt {
                settings.uri = uri;
            }
            if let Some(pool) = args.pool {
                settings.pool = pool;
            }
            if let Some(network) = args.network {
                settings.network = network;
            }
            if let Some(domain_type) = args.domain_type {
                settings.domain_type = domain_type;
            }
            let report = crate::service::host_check::check_host(&settings);
            output.host_check(&report);
            Ok(if report.ready() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::State(StateCommand::Compact) => {
            data_dir.require_initialised()?;
            match control_socket::call(
                &data_dir.control_socket(),
                data_dir.root(),
                ControlCommand::CompactState,
            )? {
                ControlReply::Compacted(summary) => output.compacted(&summary),
                other => anyhow::bail!("unexpected answer from the server: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
