//! The harness shared by the transfer benches (benches/transfer.rs,
//! benches/swarm.rs, benches/transfer_diff.rs): the disk-like test image,
//! seeding a base image into a server's pool, real `deskgrid serve`
//! processes (optionally inside a network namespace) with their own libvirt
//! `dir` pools, and the cleanup that removes all of it at the end, on error,
//! on panic and on Ctrl-C.

// Each bench uses part of the harness.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::{DomainKind, Hypervisor, VolumeFormat};
use deskgrid::appliance::data_dir::DataDir;
use deskgrid::model::{BaseImage, ImageHolding, ImageState, ImageVersionId};
use deskgrid::service::GridService;
use deskgrid::state::ConfigValue;
use deskgrid::transfer::{Manifest, ManifestStore};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use virt::connect::Connect;
use virt::storage_pool::StoragePool;

pub const DESKGRID: &str = env!("CARGO_BIN_EXE_deskgrid");
pub const URI: &str = "qemu:///system";
pub const MIB: usize = 1 << 20;
/// Generous for a loaded 2-core machine; a healthy step takes a fraction.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Copy buffer of the raw TCP baselines: large enough that syscalls cost
/// nothing next to the bytes.
pub const TCP_BUFFER: usize = MIB;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// A disk-like image of `size` bytes: runs of 1 to 24 MiB, a third of them
/// all zeros, half real file content (files under /usr/lib and /usr/share,
/// in directory order, each at most 8 MiB), a sixth pseudo-random.
pub fn disk_like_image(size: usize) -> anyhow::Result<Vec<u8>> {
    let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
    let corpus = file_corpus(size / 2 + 24 * MIB)?;
    let mut corpus_at = 0;
    let mut data = vec![0u8; size];
    let mut at = 0;
    while at < size {
        let run = ((1 + next() % 24) as usize * MIB).min(size - at);
        let region = &mut data[at..at + run];
        match next() % 6 {
            0 | 1 => {}
            2..=4 => {
                for byte in region.iter_mut() {
                    *byte = corpus[corpus_at % corpus.len()];
                    corpus_at += 1;
                }
            }
            _ => {
                for word in region.chunks_mut(8) {
                    word.copy_from_slice(&next().to_le_bytes()[..word.len()]);
                }
            }
        }
        at += run;
    }
    Ok(data)
}

/// About `want` bytes of the regular files under /usr/lib and /usr/share.
pub fn file_corpus(want: usize) -> anyhow::Result<Vec<u8>> {
    /// One big file (a firmware blob, a locale archive) must not be most of
    /// the corpus: an OS disk is many files.
    const FILE_CAP: u64 = 8 << 20;
    let mut corpus = Vec::with_capacity(want);
    let mut stack = vec![PathBuf::from("/usr/share"), PathBuf::from("/usr/lib")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut entries: Vec<_> = entries.filter_map(Result::ok).collect();
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.file_name()));
        for entry in entries {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                if let Ok(file) = File::open(entry.path()) {
                    let _ = file.take(FILE_CAP).read_to_end(&mut corpus);
                }
                if corpus.len() >= want {
                    return Ok(corpus);
                }
            }
        }
    }
    ensure!(
        corpus.len() >= MIB,
        "found only {} bytes under /usr",
        corpus.len()
    );
    Ok(corpus)
}

pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    // xorshift64*: fast, and plenty for choosing regions and random bytes.
    move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The size of `data` compressed by zstd level 1 as one stream.
pub fn zstd_size(data: &[u8]) -> anyhow::Result<u64> {
    #[derive(Debug, Default)]
    struct Counter(u64);
    impl Write for Counter {
        fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
            self.0 += buffer.len() as u64;
            Ok(buffer.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut encoder = zstd::stream::Encoder::new(Counter::default(), 1)?;
    encoder.write_all(data)?;
    Ok(encoder.finish()?.0)
}

/// Puts `data` into `member`'s pool as the raw base volume of `image`, keeps
/// its manifest and registers the version as held complete by `member`, as
/// tests/transfer_grid.rs does. The member must be initialised and not
/// serving (its state files are opened here).
pub fn seed_image(
    member: &Member,
    image: &str,
    data: &[u8],
    manifest: &Manifest,
) -> anyhow::Result<()> {
    let host = LibvirtHypervisor::connect(LibvirtOptions {
        uri: URI.to_owned(),
        pool: member.pool.clone(),
        pool_path: member.pool_path.display().to_string(),
        domain_kind: Some(DomainKind::Qemu),
        streams_only: false,
    })?;
    host.ensure_pool()?;
    let image = ImageVersionId::new(image)?;
    host.import_base_image(
        &image,
        VolumeFormat::Raw,
        data.len() as u64,
        &mut &data[..],
        &mut |_| {},
    )?;
    let dir = DataDir::new(&member.data_dir);
    ManifestStore::new(dir.transfer_dir().join("manifests")).save(&image, manifest)?;
    let (mut service, _) = GridService::open(dir.server_id()?, &dir.state_dir())?;
    service.write(ConfigValue::Image(BaseImage {
        id: image.clone(),
        digest: Some(manifest.root_digest()),
        virtual_size: data.len() as u64,
        parent: None,
        state: ImageState::Ready,
    }))?;
    service.update_own_record(&mut |record| {
        record.images.insert(image.clone(), ImageHolding::Complete);
    })?;
    Ok(())
}

pub fn virsh(arguments: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(arguments)
        .output()?;
    ensure!(
        output.status.success(),
        "virsh {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

pub fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let mut a = std::io::BufReader::with_capacity(4 * MIB, File::open(a)?);
    let mut b = std::io::BufReader::with_capacity(4 * MIB, File::open(b)?);
    loop {
        let (left, right) = (a.fill_buf()?, b.fill_buf()?);
        let n = left.len().min(right.len());
        if n == 0 {
            return Ok(left.len() == right.len());
        }
        if left[..n] != right[..n] {
            return Ok(false);
        }
        a.consume(n);
        b.consume(n);
    }
}

/// `ip ARGUMENTS`, failing with its stderr.
pub fn ip(arguments: &[&str]) -> anyhow::Result<()> {
    tool("ip", arguments).map(drop)
}

/// `PROGRAM ARGUMENTS`, failing with its stderr; its output when it succeeds.
pub fn tool(program: &str, arguments: &[&str]) -> anyhow::Result<Output> {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(output)
}

/// A new network namespace with loopback up (one of the same name left by
/// an earlier run is removed first).
pub fn add_namespace(name: &str) -> anyhow::Result<()> {
    let _ = Command::new("ip").args(["netns", "del", name]).output();
    ip(&["netns", "add", name])?;
    ip(&["-n", name, "link", "set", "lo", "up"])
}

/// Bytes sent and received by `device` inside `namespace`, from its kernel
/// counters (`ip -s -j link`).
pub fn link_bytes(namespace: &str, device: &str) -> anyhow::Result<(u64, u64)> {
    let output = tool(
        "ip",
        &["-n", namespace, "-s", "-j", "link", "show", "dev", device],
    )?;
    let links: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let stats = &links[0]["stats64"];
    Ok((
        stats["tx"]["bytes"]
            .as_u64()
            .with_context(|| format!("no tx bytes for {device} in {namespace}: {links}"))?,
        stats["rx"]["bytes"]
            .as_u64()
            .with_context(|| format!("no rx bytes for {device} in {namespace}: {links}"))?,
    ))
}

/// One `deskgrid` server of a bench: its data directory, its libvirt pool
/// and, when it has one, the network namespace its commands run in.
#[derive(Debug)]
pub struct Member {
    pub name: &'static str,
    pub data_dir: PathBuf,
    pub pool: String,
    pub pool_path: PathBuf,
    pub namespace: Option<String>,
}

impl Member {
    /// A member whose pool is `{pool_prefix}-{name}`, with its files under `root`.
    pub fn new(root: &Path, pool_prefix: &str, name: &'static str) -> Self {
        Self {
            name,
            data_dir: root.join(name),
            pool: format!("{pool_prefix}-{name}"),
            pool_path: root.join(format!("pool-{name}")),
            namespace: None,
        }
    }

    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
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

    pub fn log(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    /// The raw base volume file of `version` in this member's pool.
    pub fn volume_file(&self, version: &str) -> PathBuf {
        self.pool_path.join(format!("dg-base-{version}"))
    }

    /// `PROGRAM`, run inside this member's namespace when it has one.
    pub fn command(&self, program: &str) -> Command {
        match &self.namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", namespace, program]);
                command
            }
            None => Command::new(program),
        }
    }

    /// `deskgrid --data-dir DATA_DIR`, in this member's namespace.
    pub fn deskgrid(&self) -> Command {
        let mut command = self.command(DESKGRID);
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .env_remove("DESKGRID_DATA_DIR")
            .env_remove("RUST_LOG");
        command
    }

    pub fn output(&self, arguments: &[&str]) -> anyhow::Result<Output> {
        let output = self.deskgrid().args(arguments).output()?;
        if !output.status.success() {
            bail!(
                "{} {arguments:?}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    pub fn run(&self, arguments: &[String]) -> anyhow::Result<()> {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        self.output(&arguments).map(drop)
    }

    /// `--output json ARGUMENTS`, parsed.
    pub fn json(&self, arguments: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(arguments);
        let output = self.output(&all)?;
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// A join token from this (running) member.
    pub fn token(&self) -> anyhow::Result<String> {
        let created = self.json(&["token", "create"])?;
        Ok(created["token"].as_str().context("no token")?.to_owned())
    }

    /// How `self` sees server `name`: its failure-detector state and its
    /// complete images.
    pub fn sees(&self, name: &str) -> anyhow::Result<(String, u64)> {
        let status = self.json(&["status"])?;
        let server = status["servers"]
            .as_array()
            .and_then(|servers| servers.iter().find(|server| server["name"] == name))
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        Ok((
            server["state"].as_str().unwrap_or("").to_owned(),
            server["images_complete"].as_u64().unwrap_or(0),
        ))
    }

    /// Server ids to names, as this member's status lists them.
    pub fn server_names(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let status = self.json(&["status"])?;
        Ok(status["servers"]
            .as_array()
            .map(|servers| {
                servers
                    .iter()
                    .filter_map(|server| {
                        Some((
                            server["id"].as_str()?.to_owned(),
                            server["name"].as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default())
    }
}

/// A child process (a `deskgrid serve`, an rsync daemon, a copy helper),
/// killed when dropped.
#[derive(Debug)]
pub struct Serving {
    pub name: String,
    pub child: Option<Child>,
    pub log: Option<PathBuf>,
}

impl Serving {
    /// `deskgrid serve` for `member`, logging to `member.log()` (a pipe nobody
    /// reads would stall it), once its control socket is there.
    pub fn start(member: &Member) -> anyhow::Result<Self> {
        let socket = member.data_dir.join("control.sock");
        // A killed server leaves its socket file behind.
        let _ = std::fs::remove_file(&socket);
        let child = member
            .deskgrid()
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(File::create(member.log())?)
            .spawn()?;
        let mut serving = Self {
            name: member.name.to_owned(),
            child: Some(child),
            log: Some(member.log()),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Some(status) = serving
                .child
                .as_mut()
                .and_then(|child| child.try_wait().ok().flatten())
            {
                bail!(
                    "{} exited at start-up with {status}: {}",
                    member.name,
                    std::fs::read_to_string(member.log()).unwrap_or_default()
                );
            }
            ensure!(Instant::now() < deadline, "{} did not start", member.name);
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(serving)
    }

    /// Any other child, killed when dropped.
    pub fn child(name: &str, child: Child) -> Self {
        Self {
            name: name.to_owned(),
            child: Some(child),
            log: None,
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `START_TIMEOUT`.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + START_TIMEOUT;
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                eprintln!("{} did not stop after SIGTERM: killing it", self.name);
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if let Some(log) = &self.log {
                eprintln!("{} killed; its log was {}", self.name, log.display());
            }
        }
    }
}

/// Removes what a bench made when dropped, after a failure too: the
/// processes, the pools with their volumes, the network namespaces, the
/// work directory.
#[derive(Debug)]
pub struct Cleanup {
    pub servers: Vec<Serving>,
    pub pools: Vec<String>,
    pub namespaces: Vec<String>,
    pub work: Option<tempfile::TempDir>,
}

impl Cleanup {
    /// Nothing to remove yet but `work`.
    pub fn new(work: tempfile::TempDir) -> Self {
        Self {
            servers: Vec::new(),
            pools: Vec::new(),
            namespaces: Vec::new(),
            work: Some(work),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.work
            .as_ref()
            .map_or_else(PathBuf::new, |work| work.path().to_owned())
    }

    /// Stops every process (SIGTERM first, so servers shut down cleanly).
    pub fn stop_servers(&mut self) {
        for server in self.servers.iter_mut() {
            server.stop();
        }
        self.servers.clear();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.servers.clear();
        remove_pools(&self.pools);
        for namespace in &self.namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .output();
        }
        if let Some(work) = self.work.take() {
            let _ = work.close();
        }
    }
}

pub fn remove_pools(pools: &[String]) {
    let Ok(mut connection) = Connect::open(Some(URI)) else {
        eprintln!("cannot open {URI}: pools {pools:?} may be left behind");
        return;
    };
    for name in pools {
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

/// `key=value` fields of a log line.
pub fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// The fields of the lines of `log` that carry `message` and `image=IMAGE`.
pub fn image_lines(log: &Path, message: &str, image: &str) -> Vec<BTreeMap<String, String>> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(message))
        .map(fields)
        .filter(|fields| fields.get("image").map(String::as_str) == Some(image))
        .collect()
}

/// Field `key` of a log line's fields, parsed.
pub fn field<T: std::str::FromStr>(line: &BTreeMap<String, String>, key: &str) -> anyhow::Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    line.get(key)
        .with_context(|| format!("no {key} in {line:?}"))?
        .parse()
        .with_context(|| format!("{key} in {line:?}"))
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition()? {
        check_interrupted()?;
        ensure!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A port free now; QUIC listens on UDP.
pub fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|line| line.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Ctrl-C and SIGTERM set a flag that every wait checks, so the bench stops
/// after its current step and its `Cleanup` runs; a second one exits at
/// once (then `leftovers` says what to look for).
pub fn install_signal_handler(leftovers: &'static str) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            eprintln!("no Ctrl-C cleanup: cannot start the signal runtime");
            return;
        };
        runtime.block_on(async {
            let Ok(mut terminate) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            else {
                eprintln!("no Ctrl-C cleanup: cannot listen for signals");
                return;
            };
            for _ in 0..2 {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                if INTERRUPTED.swap(true, Ordering::SeqCst) {
                    eprintln!("interrupted again: exiting without cleanup (look for {leftovers})");
                    std::process::exit(130);
                }
                eprintln!(
                    "interrupted: cleaning up after the current step (again to exit at once)"
                );
            }
        });
    });
}

pub fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
