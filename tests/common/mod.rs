//! Shared by the tests that run the real `deskgrid` binary: running commands
//! and `deskgrid serve` children that are always reaped.

#![allow(dead_code, clippy::unwrap_used)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub const DESKGRID: &str = env!("CARGO_BIN_EXE_deskgrid");
/// Generous: a cold start on a loaded 2-core CI machine, never reached when healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

pub fn deskgrid(data_dir: &Path, arguments: &[&str]) -> Output {
    Command::new(DESKGRID)
        .arg("--data-dir")
        .arg(data_dir)
        .args(arguments)
        .env_remove("DESKGRID_DATA_DIR")
        .env_remove("RUST_LOG")
        .output()
        .expect("the deskgrid binary runs")
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The command succeeded (else the test fails with what it printed).
pub fn succeeded(output: Output) -> Output {
    assert!(
        output.status.success(),
        "failed: {}{}",
        stdout(&output),
        stderr(&output)
    );
    output
}

/// A template `name` on image `win11-v1` (which need not exist): 2 vCPUs,
/// 2 GiB, 2 desktops.
pub fn create_template(data_dir: &Path, name: &str) {
    succeeded(deskgrid(
        data_dir,
        &[
            "template",
            "create",
            name,
            "--image",
            "win11-v1",
            "--vcpus",
            "2",
            "--memory",
            "2048",
            "--desired",
            "2",
        ],
    ));
}

/// The command failed, printed nothing on stdout, and said `expected`.
pub fn refused(output: &Output, expected: &str) {
    assert!(!output.status.success(), "accepted: {}", stdout(output));
    assert!(stdout(output).is_empty(), "{}", stdout(output));
    assert!(
        stderr(output).contains(expected),
        "expected {expected:?} in: {}",
        stderr(output)
    );
}

/// A `deskgrid serve` child, stopped with SIGKILL if a test fails before it
/// stops it properly.
pub struct Server {
    child: Option<Child>,
    pub socket: PathBuf,
}

impl Server {
    pub fn start(data_dir: &Path) -> Self {
        let child = Command::new(DESKGRID)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("deskgrid serve starts");
        let mut server = Self {
            child: Some(child),
            socket: data_dir.join("control.sock"),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        // A socket file left by a killed server exists before the new one
        // listens: ready is when it accepts a connection.
        while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
            if let Some(status) = server.child_mut().try_wait().expect("can poll the server") {
                panic!("deskgrid serve exited at start-up with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "deskgrid serve did not open its control socket in time"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("server still owned")
    }

    /// SIGTERM, then the exit status and everything it logged.
    pub fn stop(mut self) -> Output {
        let child = self.child.take().expect("server still owned");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("can signal the server");
        let deadline = Instant::now() + START_TIMEOUT;
        let mut child = child;
        loop {
            if child.try_wait().expect("can poll the server").is_some() {
                return child.wait_with_output().expect("server output");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("deskgrid serve did not stop within {START_TIMEOUT:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A UDP port free on 127.0.0.1 right now (for a server's QUIC listener).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `deskgrid init --new-grid` in `data_dir` on a free loopback port with
/// libvirt's test driver; returns the address peers reach it on.
pub fn init_new_grid(data_dir: &Path, name: &str) -> String {
    let address = format!("127.0.0.1:{}", free_udp_port());
    let password = data_dir.with_extension("admin-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let password = password.display().to_string();
    let output = deskgrid(
        data_dir,
        &[
            "init",
            "--new-grid",
            "--admin-password-file",
            &password,
            "--name",
            name,
            "--listen",
            &address,
            "--libvirt",
            "test:///default",
        ],
    );
    assert!(
        output.status.success(),
        "init --new-grid: {}",
        stderr(&output)
    );
    address
}

/// A one-use join token from the server running on `data_dir`.
pub fn join_token(data_dir: &Path) -> String {
    let output = deskgrid(data_dir, &["--output", "json", "token", "create"]);
    assert!(output.status.success(), "token create: {}", stderr(&output));
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// `deskgrid join SEED --token TOKEN` into `data_dir` on a free loopback
/// port with libvirt's test driver; returns its address.
pub fn join_grid(data_dir: &Path, name: &str, seed: &str, token: &str) -> String {
    let address = format!("127.0.0.1:{}", free_udp_port());
    let output = deskgrid(
        data_dir,
        &[
            "join",
            seed,
            "--token",
            token,
            "--name",
            name,
            "--listen",
            &address,
            "--libvirt",
            "test:///default",
        ],
    );
    assert!(output.status.success(), "join: {}", stderr(&output));
    address
}

/// `deskgrid init --new-grid` in `data_dir` on a free loopback port, on a
/// real libvirt (`uri`) with the test's own storage pool `pool` in
/// `pool_path` (created when the server or an import first needs it);
/// returns the address peers reach it on.
pub fn init_new_grid_with_pool(
    data_dir: &Path,
    name: &str,
    uri: &str,
    pool: &str,
    pool_path: &Path,
) -> String {
    let address = format!("127.0.0.1:{}", free_udp_port());
    let password = data_dir.with_extension("admin-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let password = password.display().to_string();
    let pool_path = pool_path.display().to_string();
    let output = deskgrid(
        data_dir,
        &[
            "init",
            "--new-grid",
            "--admin-password-file",
            &password,
            "--name",
            name,
            "--listen",
            &address,
            "--libvirt",
            uri,
            "--pool",
            pool,
            "--pool-path",
            &pool_path,
            "--domain-type",
            "qemu",
        ],
    );
    assert!(
        output.status.success(),
        "init --new-grid: {}",
        stderr(&output)
    );
    address
}
