//! Real grids for the transfer tests: `deskgrid serve` processes on
//! 127.0.0.1, each with its own libvirt `dir` pool under a temp directory,
//! cleaned up when dropped (shared by tests/transfer_grid.rs and
//! tests/transfer_diff.rs through `#[path]`).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{deskgrid, stderr, DESKGRID, START_TIMEOUT};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use virt::connect::Connect;
use virt::storage_pool::StoragePool;

pub const URI: &str = "qemu:///system";
pub const MIB: usize = 1 << 20;

/// Removes what the test made when dropped, after a failure too: the
/// servers (SIGKILL), the pools with their volumes, the directories.
pub struct Cleanup {
    pub servers: Vec<Serving>,
    pub pools: Vec<String>,
    pub dir: Option<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.servers.clear();
        if let Ok(mut connection) = Connect::open(Some(URI)) {
            for name in &self.pools {
                if let Ok(pool) = StoragePool::lookup_by_name(&connection, name) {
                    let _ = pool.refresh(0);
                    for volume in pool.list_all_volumes(0).unwrap_or_default() {
                        let _ = volume.delete(0);
                    }
                    let _ = pool.destroy();
                    let _ = pool.undefine();
                }
            }
            let _ = connection.close();
        }
        if let Some(dir) = self.dir.take() {
            if std::thread::panicking() {
                // The servers' logs are the evidence: keep them (the pools'
                // volumes are gone already).
                eprintln!("test failed: logs kept in {}", dir.keep().display());
            } else {
                let _ = dir.close();
            }
        }
    }
}

/// A `deskgrid serve` child logging to a file (a pipe nobody reads would
/// stall it); killed when dropped.
pub struct Serving {
    pub name: &'static str,
    pub child: Option<Child>,
}

impl Serving {
    pub fn start(member: &Member, log: &Path, env: &[(&str, &str)]) -> Self {
        let socket = member.data_dir.join("control.sock");
        // A SIGKILLed server leaves its socket file behind.
        let _ = std::fs::remove_file(&socket);
        let mut command = Command::new(DESKGRID);
        command
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("serve")
            .env_remove("RUST_LOG")
            .env_remove(deskgrid::appliance::TEST_CORRUPT_CHUNKS_ENV)
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut serving = Self {
            name: member.name,
            child: Some(command.spawn().unwrap()),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        // A socket file left by a killed server exists before the new one
        // listens: ready is when it accepts a connection.
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if let Some(status) = serving.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{} exited at start-up with {status}: {}",
                    member.name,
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "{} did not start", member.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        serving
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
            child.wait().unwrap();
        }
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + START_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{} did not stop after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Debug)]
pub struct Member {
    pub name: &'static str,
    pub data_dir: PathBuf,
    pub pool: String,
    pub pool_path: PathBuf,
}

impl Member {
    pub fn new(root: &Path, suffix: &str, name: &'static str) -> Self {
        Self {
            name,
            data_dir: root.join(name),
            pool: format!("dgx-{suffix}-{name}"),
            pool_path: root.join(format!("pool-{name}")),
        }
    }

    pub fn settings(&self, address: &str) -> Vec<String> {
        [
            "--name",
            self.name,
            "--listen",
            address,
            "--libvirt",
            URI,
            "--pool",
            &self.pool,
            "--pool-path",
            &self.pool_path.display().to_string(),
            "--domain-type",
            "qemu",
        ]
        .iter()
        .map(|argument| argument.to_string())
        .collect()
    }

    pub fn volume_file(&self, version: &str) -> PathBuf {
        self.pool_path.join(format!("dg-base-{version}"))
    }

    pub fn log(&self, run: u32) -> PathBuf {
        self.data_dir.with_extension(format!("log.{run}"))
    }

    pub fn status(&self) -> Value {
        let output = deskgrid(&self.data_dir, &["--output", "json", "status"]);
        assert!(output.status.success(), "status: {}", stderr(&output));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    /// How `self` sees server `name`: its failure-detector state and its
    /// complete images.
    pub fn sees(&self, name: &str) -> (String, u64) {
        let status = self.status();
        let server = status["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|server| server["name"] == name)
            .cloned()
            .unwrap_or(Value::Null);
        (
            server["state"].as_str().unwrap_or("").to_owned(),
            server["images_complete"].as_u64().unwrap_or(0),
        )
    }

    pub fn run(&self, arguments: &[String]) {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let output = deskgrid(&self.data_dir, &arguments);
        assert!(
            output.status.success(),
            "{} {:?}: {}",
            self.name,
            arguments,
            stderr(&output)
        );
    }
}

pub fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

/// A disk-like image: about a third in all-zero regions, half text-like
/// file content, the rest random bytes, in runs of 1 to 24 MiB.
pub fn disk_like_image(bytes: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift64*: fast and plenty for choosing regions.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let words: Vec<&[u8]> = [
        "desktop", "grid", "chunk", "server", "image", "the", "of", "a", "kernel", "libc",
        "config", "usr", "share", "locale", "font", "icon", "python3", "lib", "x86_64", "systemd",
        "unit", "service", "\n", "#include", "return", "=", "{", "}",
    ]
    .iter()
    .map(|word| word.as_bytes())
    .collect();
    let mut text = Vec::with_capacity(MIB + 64);
    while text.len() < MIB {
        text.extend_from_slice(words[(next() % words.len() as u64) as usize]);
        text.push(b' ');
    }
    text.truncate(MIB);
    let mut urandom = File::open("/dev/urandom").unwrap();
    let mut data = vec![0u8; bytes];
    let mut at = 0;
    while at < bytes {
        let run = ((1 + next() % 24) as usize * MIB).min(bytes - at);
        let kind = next() % 6;
        for mib in (at..at + run).step_by(MIB) {
            let block = &mut data[mib..mib + MIB];
            match kind {
                0 | 1 => {}
                2..=4 => {
                    // The same words, shifted and stamped, so no two
                    // chunks are equal.
                    let shift = (next() % MIB as u64) as usize;
                    block[..MIB - shift].copy_from_slice(&text[shift..]);
                    block[MIB - shift..].copy_from_slice(&text[..shift]);
                    block[..8].copy_from_slice(&(mib as u64).to_le_bytes());
                }
                _ => urandom.read_exact(block).unwrap(),
            }
        }
        at += run;
    }
    data
}

pub fn token(member: &Member) -> String {
    let output = deskgrid(&member.data_dir, &["--output", "json", "token", "create"]);
    assert!(output.status.success(), "token create: {}", stderr(&output));
    let created: Value = serde_json::from_slice(&output.stdout).unwrap();
    created["token"].as_str().unwrap().to_owned()
}

/// `key=value` fields of the log lines of `log` that carry `message`.
pub fn log_lines(log: &Path, message: &str) -> Vec<BTreeMap<String, String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(message))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|field| field.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect()
        })
        .collect()
}

pub fn field(line: &BTreeMap<String, String>, key: &str) -> u64 {
    line.get(key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .unwrap()
}

pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
