//! What the real-QEMU desktop tests share (`tests/desktop_grid.rs`,
//! `tests/desktop_partition.rs`): the test guest with the real agent, the
//! sweep of a test's domains, and reading `deskgrid status` JSON.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;
use virt::connect::Connect;

use crate::common::{stderr, stdout};
use crate::pool_grid::URI;

/// The guest agent the test guest runs.
pub const AGENT: &str = env!("CARGO_BIN_EXE_deskgrid-agent");
/// Where libvirt keeps each domain's QEMU log.
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";
/// Lines of a server's log shown when a test fails.
const LOG_TAIL_LINES: usize = 40;

pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
    format!(
        "last lines of {}:\n  | {}\n",
        log.display(),
        tail.join("\n  | ")
    )
}

pub fn remove_domains_under(marker: &str) {
    let Ok(mut connection) = Connect::open(Some(URI)) else {
        return;
    };
    for domain in connection.list_all_domains(0).unwrap_or_default() {
        let ours = domain.get_xml_desc(0).is_ok_and(|xml| xml.contains(marker));
        if !ours {
            continue;
        }
        let _ = domain.destroy();
        let _ = domain.undefine();
        if let Ok(name) = domain.get_name() {
            let _ = std::fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{name}.log")));
        }
    }
    let _ = connection.close();
}

/// The test guest with the real agent, built by `tests/guest/build-guest.sh`
/// or taken from its cache.
pub fn guest_image() -> PathBuf {
    build_guest(&[format!("{AGENT}:/deskgrid/agent")])
}

/// The test guest with the agent and `/deskgrid/test-logins` (written to
/// `dir`): lines `UUID_PREFIX USER LOGIN_AFTER_S SESSION_S`, the prefix
/// `-` matching every guest (see `tests/guest/guest-init.sh`).
pub fn guest_image_with_logins(dir: &Path, logins: &str) -> PathBuf {
    let file = dir.join("test-logins");
    std::fs::write(&file, logins).unwrap();
    build_guest(&[
        format!("{AGENT}:/deskgrid/agent"),
        format!("{}:/deskgrid/test-logins", file.display()),
    ])
}

fn build_guest(adds: &[String]) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
    let mut command = Command::new("bash");
    command.arg(&script);
    for add in adds {
        command.arg("--add").arg(add);
    }
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        output.status,
        stderr(&output)
    );
    let printed = stdout(&output);
    let path = PathBuf::from(printed.lines().last().unwrap_or_default());
    assert!(path.is_file(), "build-guest.sh printed {printed:?}");
    path
}

pub fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}", stdout(output)))
}

pub fn wall_clock_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Server `name`'s entry in a status report.
pub fn server<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|server| server["name"] == name)
        .unwrap_or(&Value::Null)
}

pub fn count(server: &Value, field: &str) -> u64 {
    server[field].as_u64().unwrap_or(0)
}

pub fn ready_total(status: &Value) -> u64 {
    status["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|server| count(server, "ready_vms"))
        .sum()
}
