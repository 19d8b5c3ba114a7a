//! The `deskgrid` binary end to end: `init`, `serve` with its control socket,
//! `status`, clean shutdown on SIGTERM, and the errors an admin meets.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{deskgrid, stderr, stdout, Server, DESKGRID, START_TIMEOUT};

fn init(data_dir: &Path) -> serde_json::Value {
    let output = deskgrid(
        data_dir,
        &[
            "--output",
            "json",
            "init",
            "--name",
            "test-1",
            "--listen",
            "127.0.0.1:7443",
            "--site",
            "lab",
        ],
    );
    assert!(output.status.success(), "init failed: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).expect("init --output json prints JSON")
}

#[test]
fn init_serve_status_and_clean_stop() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let initialised = init(&data_dir);
    let server_id = initialised["server_id"].as_str().unwrap().to_owned();

    let config = std::fs::read_to_string(data_dir.join("config.toml")).unwrap();
    assert!(config.contains("listen = \"127.0.0.1:7443\""), "{config}");
    assert!(
        config.contains("# Default:"),
        "config.toml documents defaults:\n{config}"
    );

    // No server yet: the CLI says so instead of touching the files.
    let output = deskgrid(&data_dir, &["status"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains(&format!(
            "no deskgrid server is running on {}",
            data_dir.display()
        )),
        "{}",
        stderr(&output)
    );

    let server = Server::start(&data_dir);
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "control socket is private");

    let output = deskgrid(&data_dir, &["--output", "json", "status"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["server_id"], server_id.as_str());
    assert_eq!(status["name"], "test-1");
    assert_eq!(status["site"], "lab");
    assert_eq!(status["state"]["servers"], 1);

    let output = deskgrid(&data_dir, &["status"]);
    assert!(
        stdout(&output).contains(&format!("server   test-1 ({server_id})")),
        "{}",
        stdout(&output)
    );

    // The host worker reaches libvirt, creates the pool and publishes capacity.
    let deadline = Instant::now() + START_TIMEOUT;
    let capacity = loop {
        let output = deskgrid(&data_dir, &["--output", "json", "status"]);
        let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        if status["capacity"]["cpus"].as_u64().unwrap_or(0) > 0 {
            break status["capacity"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "host capacity never published: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        capacity["memory_total_mib"].as_u64().unwrap() > 0,
        "{capacity}"
    );
    assert!(
        capacity["storage_total_bytes"].as_u64().unwrap() > 0,
        "the pool exists: {capacity}"
    );

    // A second server on the same directory is refused.
    let second = deskgrid(&data_dir, &["serve"]);
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("already running"),
        "{}",
        stderr(&second)
    );

    let output = deskgrid(&data_dir, &["--output", "json", "state", "compact"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let compacted: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(compacted["generation"], 1);
    assert_eq!(compacted["log_records"], 0);

    let socket = server.socket.clone();
    let stopped = server.stop();
    assert!(
        stopped.status.success(),
        "serve exits 0 on SIGTERM: {}",
        stderr(&stopped)
    );
    assert!(stderr(&stopped).contains("stopped"), "{}", stderr(&stopped));
    assert!(
        !socket.exists(),
        "the control socket is removed at shutdown"
    );

    let output = deskgrid(&data_dir, &["--output", "json", "state", "check"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let check: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(check["report"]["generation"], 1);
    assert_eq!(check["report"]["entries"], 1);
    assert_eq!(check["report"]["digest"], status["state"]["digest"]);

    // And it starts again on what it left.
    Server::start(&data_dir).stop();
}

#[test]
fn a_corrupted_state_file_stops_start_up_naming_file_and_offset() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    init(&data_dir);
    // serve appends a second record, so the first is an old one.
    Server::start(&data_dir).stop();

    let log = data_dir.join("state").join("log.0");
    let mut bytes = std::fs::read(&log).unwrap();
    let first_record = 16;
    bytes[first_record + 12 + 7] ^= 0x01;
    std::fs::write(&log, &bytes).unwrap();

    let expected = format!(
        "{}: corrupt data at byte offset {first_record}",
        log.display()
    );
    let check = deskgrid(&data_dir, &["state", "check"]);
    assert!(!check.status.success());
    assert!(stderr(&check).contains(&expected), "{}", stderr(&check));

    let serve = deskgrid(&data_dir, &["serve"]);
    assert!(
        !serve.status.success(),
        "serve must not start on damaged state"
    );
    assert!(stderr(&serve).contains(&expected), "{}", stderr(&serve));
    assert_eq!(
        std::fs::read(&log).unwrap(),
        bytes,
        "nothing was repaired away"
    );
}

#[test]
fn a_torn_last_record_is_reported_then_cut_off() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    init(&data_dir);
    let log = data_dir.join("state").join("log.0");
    let intact = std::fs::metadata(&log).unwrap().len();
    // Half a frame, as a crash in the middle of an append leaves it.
    let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    std::io::Write::write_all(&mut file, &[0x20, 0, 0, 0, 0xaa, 0xbb]).unwrap();
    drop(file);

    let check = deskgrid(&data_dir, &["state", "check"]);
    assert!(check.status.success(), "{}", stderr(&check));
    assert!(
        stdout(&check).contains(&format!("6 bytes at byte offset {intact}")),
        "{}",
        stdout(&check)
    );

    let stopped = Server::start(&data_dir).stop();
    assert!(stopped.status.success());
    assert!(
        stderr(&stopped).contains("torn"),
        "the cut is logged: {}",
        stderr(&stopped)
    );
    let check = deskgrid(&data_dir, &["--output", "json", "state", "check"]);
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["report"]["torn_tail"], serde_json::Value::Null);
    // init's record and serve's own record; the host worker may have added one.
    assert!(
        report["report"]["log_records"].as_u64().unwrap() >= 2,
        "{report}"
    );
}

#[test]
fn init_refuses_bad_settings_and_a_second_init() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");

    let output = deskgrid(&data_dir, &["init", "--site", "no spaces"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("site name \"no spaces\""),
        "{}",
        stderr(&output)
    );
    assert!(!data_dir.exists(), "a refused init creates nothing");

    let output = deskgrid(&data_dir, &["init", "--seed", "missing-port"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("\"missing-port\" is not HOST:PORT"),
        "{}",
        stderr(&output)
    );

    init(&data_dir);
    let output = deskgrid(&data_dir, &["init"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("already initialised"),
        "{}",
        stderr(&output)
    );

    let output = deskgrid(&temp.path().join("elsewhere"), &["state", "check"]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("run `deskgrid init"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn help_explains_every_command_and_the_data_dir_comes_from_the_environment() {
    let help = Command::new(DESKGRID).arg("--help").output().unwrap();
    let text = stdout(&help);
    for command in ["init", "serve", "status", "state"] {
        assert!(text.contains(command), "--help lists {command}:\n{text}");
    }
    assert!(text.contains("DESKGRID_DATA_DIR"), "{text}");
    assert!(text.contains("/var/lib/deskgrid"), "{text}");

    let version = Command::new(DESKGRID).arg("--version").output().unwrap();
    assert_eq!(
        stdout(&version).trim(),
        format!("deskgrid {}", env!("CARGO_PKG_VERSION"))
    );

    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("from-env");
    let output = Command::new(DESKGRID)
        .args(["init", "--name", "env"])
        .env("DESKGRID_DATA_DIR", &data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(data_dir.join("config.toml").exists());
}

#[test]
fn serve_starts_without_libvirt_and_says_so() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let output = deskgrid(&data_dir, &["init", "--libvirt", "nosuchdriver:///system"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let server = Server::start(&data_dir);
    let output = deskgrid(&data_dir, &["status"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("host     not reached yet"),
        "{}",
        stdout(&output)
    );
    let stopped = server.stop();
    assert!(stopped.status.success());
    let log = stderr(&stopped);
    assert!(
        log.contains("host not ready") && log.contains("nosuchdriver:///system"),
        "{log}"
    );
}

#[test]
fn host_check_names_each_problem_and_its_fix() {
    let temp = tempfile::tempdir().unwrap();
    let nowhere = temp.path().join("not-initialised");

    let output = deskgrid(
        &nowhere,
        &[
            "--output",
            "json",
            "host",
            "check",
            "--libvirt",
            "test:///default",
        ],
    );
    assert!(
        output.status.success(),
        "ready on the test driver: {}",
        stdout(&output)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["ready"], true);
    let checks: Vec<(String, String)> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["check"].as_str().unwrap().to_owned(),
                item["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let names: Vec<&str> = checks.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        names,
        ["libvirt", "virtualization", "storage pool", "network"]
    );
    assert_eq!(checks[1].1, "warning", "the test driver offers no KVM");

    let output = deskgrid(
        &nowhere,
        &[
            "host",
            "check",
            "--libvirt",
            "test:///default",
            "--network",
            "nonet",
        ],
    );
    assert!(!output.status.success());
    let text = stdout(&output);
    assert!(
        text.contains("BLOCKING network        network \"nonet\" does not exist"),
        "{text}"
    );
    assert!(text.contains("fix: define it"), "{text}");

    let output = deskgrid(
        &nowhere,
        &["host", "check", "--libvirt", "nosuchdriver:///system"],
    );
    assert!(!output.status.success());
    let text = stdout(&output);
    assert!(text.contains("BLOCKING libvirt"), "{text}");
    assert!(text.contains("fix: start libvirtd"), "{text}");
}

/// A command whose output goes to a pipe nobody reads any more (`deskgrid
/// status | head` once head has its lines) ends quietly by SIGPIPE, as Unix
/// tools do, instead of panicking on the failed write.
#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt as _;
    let (read_end, write_end) = nix::unistd::pipe().unwrap();
    // Closed before the command starts: its first write finds no reader.
    drop(read_end);
    let output = Command::new(DESKGRID)
        .args(["host", "check", "--libvirt", "test:///default"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::from(write_end))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert!(!stderr(&output).contains("panicked"), "{}", stderr(&output));
    assert_eq!(
        output.status.signal(),
        Some(nix::sys::signal::Signal::SIGPIPE as i32),
        "{:?}",
        output.status
    );
}
