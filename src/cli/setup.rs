//! Setting a server up: `deskgrid init` (optionally creating a new grid) and
//! `deskgrid join`. Both work on the data directory directly: no server runs
//! on it yet.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::output::Output;
use super::{InitArgs, JoinArgs, ServerSettingsArgs};
use crate::appliance::config::{ApiSettings, Config, LibvirtSettings, ServerSettings};
use crate::appliance::data_dir::DataDir;
use crate::service::accounts;
use crate::service::setup::{create_server, join_grid, NewGrid};

fn config_from(settings: ServerSettingsArgs) -> anyhow::Result<Config> {
    let name = match settings.name {
        Some(name) => name,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|name| name.into_string().ok())
            .unwrap_or_else(|| "deskgrid".to_owned()),
    };
    let config = Config {
        server: ServerSettings {
            name,
            site: settings.site,
            listen: settings.listen,
            advertise: settings.advertise,
            seeds: settings.seeds,
            mdns: settings.mdns,
        },
        libvirt: LibvirtSettings {
            uri: settings.libvirt,
            pool: settings.pool,
            pool_path: settings.pool_path,
            network: settings.network,
            domain_type: settings.domain_type,
            ..LibvirtSettings::default()
        },
        api: ApiSettings {
            listen: settings.api_listen,
        },
    };
    config
        .validate()
        .map_err(|problem| anyhow::anyhow!("invalid setting: {problem}"))?;
    Ok(config)
}

pub(super) fn init(
    data_dir: &DataDir,
    args: InitArgs,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    let config = config_from(args.settings)?;
    // Checked again when creating; asking for a password first would be rude.
    data_dir.require_uninitialised()?;
    // Everything that can be refused is checked before anything is written.
    let new_grid = if args.new_grid {
        // Before the password prompt: a grid member must be dialable.
        config.server.peer_address()?;
        let password = read_admin_password(args.admin_password_file.as_deref())?;
        Some(NewGrid {
            admin: args.admin_user.clone(),
            admin_password_hash: accounts::hash_password(&password)?,
        })
    } else {
        None
    };
    let (server_id, grid_id) = create_server(data_dir, &config, new_grid)?;
    output.initialised(
        data_dir,
        server_id,
        grid_id,
        args.new_grid.then_some(&args.admin_user),
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn join(
    data_dir: &DataDir,
    args: JoinArgs,
    output: &Output,
) -> anyhow::Result<ExitCode> {
    let config = config_from(args.settings)?;
    data_dir.require_uninitialised()?;
    config.server.peer_address()?;
    let seed = resolve(&args.seed)?;
    let (server_id, grid_id) = join_grid(data_dir, &config, &args.token, seed)?;
    output.joined(data_dir, server_id, grid_id, &args.seed);
    Ok(ExitCode::SUCCESS)
}

fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("{address:?} is not an address (HOST:PORT)"))?
        .next()
        .with_context(|| format!("{address:?} resolves to no address"))
}

/// The first admin's password: from a file, from standard input when it is
/// not a terminal, else asked twice with echo off.
fn read_admin_password(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return Ok(text.trim_end_matches(['\n', '\r']).to_owned());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("cannot read the password from standard input")?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    let first = prompt_hidden("password for the first admin: ")?;
    let second = prompt_hidden("again: ")?;
    if first != second {
        bail!("the two passwords differ; nothing was written");
    }
    Ok(first)
}

pub(super) fn prompt_hidden(prompt: &str) -> anyhow::Result<String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    let stdin = std::io::stdin();
    let saved = tcgetattr(&stdin).context("cannot read the terminal settings")?;
    let mut hidden = saved.clone();
    hidden.local_flags.remove(LocalFlags::ECHO);
    tcsetattr(&stdin, SetArg::TCSANOW, &hidden).context("cannot turn echo off")?;
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
    eprintln!();
    read.context("cannot read the password")?;
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// `30s`, `15m`, `2h`, `7d` (or plain seconds).
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(index) => text.split_at(index),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30m, 2h or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?}: use s, m, h or d"
            ))
        }
    };
    value
        .checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("2w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("h").is_err());
    }
}
