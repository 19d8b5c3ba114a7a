//! Transfer benchmark, one source and one receiver on loopback: deskgrid's
//! pull of a base image (two real `deskgrid serve` processes on 127.0.0.1,
//! QUIC with mutual TLS, every chunk verified and written into the
//! receiver's libvirt `dir` pool) side by side with copies of the same image
//! file into the same pool directory: (a) a raw TCP copy with fsync, (b)
//! rsync to an rsync daemon on 127.0.0.1 when `rsync` is installed, (c)
//! `virsh vol-upload`. BENCHMARKS.md has the figures and how to read them.
//!
//! ```text
//! cargo bench --bench transfer -- [--size-mib 2048] [--runs 1]
//! ```
//!
//! Needs root and a running libvirtd (`bash scripts/setup-host.sh`). The pull
//! is set up as tests/transfer_grid.rs does it: A's image is seeded through
//! the library (a raw volume via the actuator, its manifest in A's
//! `ManifestStore`, the version registered complete in A's grid state), B
//! joins, and `template create --replicas 2` makes B's planner and policy
//! loop pull it. The pull is timed from B's "pulling image" log line to its
//! "image pulled" line (the log is polled every 10 ms); the pull's own
//! figures (seconds, bytes and wire bytes) come from that line.
//!
//! The image looks like an OS disk: about a third all-zero regions, half the
//! contents of real files under /usr/lib and /usr/share, the rest
//! pseudo-random, in runs of 1 to 24 MiB. Each run makes a new grid (pools
//! `dg-bench-xfer-<pid>-<run>-a|b` under /var/tmp); everything is removed at
//! the end, on error, on panic and on Ctrl-C.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead as _, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::{DomainKind, Hypervisor, VolumeFormat};
use deskgrid::appliance::data_dir::DataDir;
use deskgrid::model::{BaseImage, ImageHolding, ImageState, ImageVersionId};
use deskgrid::service::GridService;
use deskgrid::state::ConfigValue;
use deskgrid::transfer::manifest::{manifest_of, DEFAULT_CHUNK_SIZE};
use deskgrid::transfer::{Manifest, ManifestStore};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use virt::connect::Connect;
use virt::storage_pool::StoragePool;

const DESKGRID: &str = env!("CARGO_BIN_EXE_deskgrid");
const URI: &str = "qemu:///system";
const MIB: usize = 1 << 20;
const IMAGE: &str = "bench-image";
/// Generous for a loaded 2-core machine; a healthy step takes a fraction.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// 2 GiB at a pessimistic 20 MB/s.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Copy buffer of the raw TCP baseline: large enough that syscalls cost
/// nothing next to the bytes.
const TCP_BUFFER: usize = MIB;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Transfer benchmark: deskgrid's pull against raw TCP, rsync and virsh vol-upload.
#[derive(Debug, Parser)]
#[command(name = "transfer")]
struct BenchOptions {
    /// Size of the test image.
    #[arg(long, default_value_t = 2048)]
    size_mib: usize,
    /// Runs, each with a new grid and every baseline.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// How the receiver writes its volume: `auto` (a local `dir` pool's file
    /// directly) or `streams` (libvirt upload streams, as from an appliance
    /// VM), its `libvirt.volume_io` setting.
    #[arg(long, default_value = "auto", value_parser = ["auto", "streams"])]
    receiver_volume_io: String,
    /// Accepted for `cargo bench`, which passes it to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let options = BenchOptions::parse();
    ensure!(options.size_mib >= 64, "--size-mib must be at least 64");
    install_signal_handler();
    let work = tempfile::Builder::new()
        .prefix("dg-bench-xfer-")
        .tempdir_in("/var/tmp")
        .context("work directory under /var/tmp")?;
    let mut cleanup = Cleanup {
        servers: Vec::new(),
        pools: Vec::new(),
        work: Some(work),
    };
    let root = cleanup
        .work
        .as_ref()
        .expect("set just above")
        .path()
        .to_owned();
    println!("load average at start: {}", load_average());

    let started = Instant::now();
    let data = disk_like_image(options.size_mib * MIB)?;
    let image_file = root.join("image.raw");
    std::fs::write(&image_file, &data).context("writing the image file")?;
    let manifest = manifest_of(&data, DEFAULT_CHUNK_SIZE)?;
    let n_zero_chunks = manifest.chunks.len() as u64 - manifest.data_chunks().count() as u64;
    let zstd_started = Instant::now();
    let zstd_bytes = zstd_size(&data)?;
    let zstd_seconds = zstd_started.elapsed().as_secs_f64();
    println!(
        "image: {} MiB, {} chunks of {} MiB: {n_zero_chunks} all-zero, {} with data ({} MiB); \
         zstd -1 ratio {:.2} ({:.0} MB/s on one core); made in {:.1} s",
        options.size_mib,
        manifest.chunks.len(),
        DEFAULT_CHUNK_SIZE as usize / MIB,
        manifest.chunks.len() as u64 - n_zero_chunks,
        manifest.data_bytes() / MIB as u64,
        data.len() as f64 / zstd_bytes as f64,
        data.len() as f64 / zstd_seconds / 1e6,
        started.elapsed().as_secs_f64()
    );
    let rsync = which("rsync");
    if rsync.is_none() {
        println!("rsync is not installed: baseline (b) skipped");
    }

    let mut rows = Vec::new();
    for run in 1..=options.runs {
        let row = run_once(
            &mut cleanup,
            &root,
            run,
            &data,
            &manifest,
            &image_file,
            Receiver {
                rsync: rsync.as_deref(),
                volume_io: &options.receiver_volume_io,
            },
        )
        .with_context(|| format!("run {run}"))?;
        print_table(&rows_with(&rows, &row), data.len());
        rows.push(row);
    }
    println!("load average at end: {}", load_average());
    Ok(())
}

fn rows_with(rows: &[RunRow], row: &RunRow) -> Vec<RunRow> {
    let mut all = rows.to_vec();
    all.push(row.clone());
    all
}

/// One run's measurements, in seconds.
#[derive(Debug, Clone)]
struct RunRow {
    run: u32,
    load: String,
    /// `template create` to B's "pulling image" line (gossip, planner, manifest, volume).
    pull_delay: f64,
    /// B's "pulling image" line to its "image pulled" line.
    pull: f64,
    /// The pull's own `seconds`, `bytes_fetched`, `wire_bytes`.
    pull_reported: f64,
    pull_bytes: u64,
    pull_wire_bytes: u64,
    tcp: f64,
    rsync: Option<f64>,
    vol_upload: f64,
}

/// What the receiving side of a run uses.
#[derive(Debug, Clone, Copy)]
struct Receiver<'a> {
    /// rsync for baseline (b), when installed.
    rsync: Option<&'a Path>,
    /// B's `libvirt.volume_io`.
    volume_io: &'a str,
}

fn run_once(
    cleanup: &mut Cleanup,
    root: &Path,
    run: u32,
    data: &[u8],
    manifest: &Manifest,
    image_file: &Path,
    receiver: Receiver<'_>,
) -> anyhow::Result<RunRow> {
    let Receiver {
        rsync,
        volume_io: receiver_volume_io,
    } = receiver;
    let load = load_average();
    let suffix = format!("{}-{run}", std::process::id());
    let run_dir = root.join(format!("run-{run}"));
    std::fs::create_dir_all(&run_dir)?;
    let [a, b] = ["a", "b"].map(|name| Member::new(&run_dir, &suffix, name));
    cleanup.pools.extend([a.pool.clone(), b.pool.clone()]);

    // A: a new grid holding the image.
    let address_a = format!("127.0.0.1:{}", free_udp_port()?);
    let password = run_dir.join("admin-password");
    std::fs::write(&password, "correct horse battery staple\n")?;
    let mut init = vec![
        "init".to_owned(),
        "--new-grid".to_owned(),
        "--admin-password-file".to_owned(),
        password.display().to_string(),
    ];
    init.extend(a.settings(&address_a));
    a.run(&init)?;
    let seeded = Instant::now();
    seed_image(&a, data, manifest)?;
    println!(
        "run {run}: image seeded in A's pool in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    check_interrupted()?;
    cleanup.servers.push(Serving::start(&a)?);

    // B joins, then is told to hold the image.
    let address_b = format!("127.0.0.1:{}", free_udp_port()?);
    let token = {
        let output = a.output(&["--output", "json", "token", "create"])?;
        let created: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        created["token"].as_str().context("no token")?.to_owned()
    };
    let mut join = vec![
        "join".to_owned(),
        address_a.clone(),
        "--token".to_owned(),
        token,
    ];
    join.extend(b.settings(&address_b));
    b.run(&join)?;
    if receiver_volume_io != "auto" {
        let config_file = b.data_dir.join("config.toml");
        let config = std::fs::read_to_string(&config_file)?;
        let changed = config.replace(
            "volume_io = \"auto\"",
            &format!("volume_io = \"{receiver_volume_io}\""),
        );
        ensure!(
            changed != config,
            "no volume_io line in {}",
            config_file.display()
        );
        std::fs::write(&config_file, changed)?;
        println!("run {run}: B writes its volume with volume_io = {receiver_volume_io:?}");
    }
    cleanup.servers.push(Serving::start(&b)?);
    wait_until("A and B see each other", CONVERGE_TIMEOUT, || {
        Ok(a.sees("b")?.0 == "alive" && b.sees("a")?.0 == "alive")
    })?;
    let asked = Instant::now();
    a.run(
        &[
            "template",
            "create",
            "office",
            "--image",
            IMAGE,
            "--vcpus",
            "1",
            "--memory",
            "256",
            "--desired",
            "0",
            "--replicas",
            "2",
        ]
        .map(str::to_owned),
    )?;
    let mut pull_started = None;
    let pulled = loop {
        check_interrupted()?;
        ensure!(
            asked.elapsed() < PULL_TIMEOUT,
            "B did not pull the image in time"
        );
        let log = std::fs::read_to_string(b.log()).unwrap_or_default();
        if pull_started.is_none() && log.contains("pulling image") {
            pull_started = Some(Instant::now());
        }
        if let Some(line) = log.lines().find(|line| line.contains("image pulled")) {
            let done = Instant::now();
            ensure!(
                !log.contains("pull stopped"),
                "B's pull stopped before it was complete: see {}",
                b.log().display()
            );
            break (done, fields(line));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let (pulled_at, pulled_line) = pulled;
    let pull_started = pull_started.context("no \"pulling image\" line before \"image pulled\"")?;
    wait_until("B's record says complete", CONVERGE_TIMEOUT, || {
        Ok(b.sees("b")?.1 == 1)
    })?;
    let field = |key: &str| -> anyhow::Result<String> {
        pulled_line
            .get(key)
            .cloned()
            .with_context(|| format!("no {key} in {pulled_line:?}"))
    };
    let row_pull = (
        pull_started.duration_since(asked).as_secs_f64(),
        pulled_at.duration_since(pull_started).as_secs_f64(),
        field("seconds")?.parse::<f64>()?,
        field("bytes_fetched")?.parse::<u64>()?,
        field("wire_bytes")?.parse::<u64>()?,
    );
    // The servers would compete with the baselines for the two cores.
    for server in cleanup.servers.iter_mut() {
        server.stop();
    }
    cleanup.servers.clear();
    ensure!(
        same_file(&b.pool_path.join(format!("dg-base-{IMAGE}")), image_file)?,
        "B's volume differs from the image"
    );
    println!(
        "run {run}: deskgrid pull {:.2} s (its log: {:.2} s), B's volume verified byte for byte",
        row_pull.1, row_pull.2
    );
    check_interrupted()?;

    // (a) Raw TCP into B's pool directory, fsync included.
    let tcp_target = b.pool_path.join("bench-tcp-copy.raw");
    let tcp = tcp_copy(image_file, &tcp_target)?;
    ensure!(same_file(&tcp_target, image_file)?, "the TCP copy differs");
    std::fs::remove_file(&tcp_target)?;
    println!("run {run}: raw TCP copy {tcp:.2} s");
    check_interrupted()?;

    // (b) rsync to a daemon on 127.0.0.1.
    let rsync_seconds = match rsync {
        Some(rsync) => {
            let seconds = rsync_copy(rsync, &run_dir, image_file, &b.pool_path)?;
            println!("run {run}: rsync {seconds:.2} s");
            Some(seconds)
        }
        None => None,
    };
    check_interrupted()?;

    // (c) virsh vol-upload into a new raw volume of B's pool.
    let volume = "bench-vol-upload";
    virsh(&[
        "vol-create-as",
        &b.pool,
        volume,
        &data.len().to_string(),
        "--allocation",
        "0",
        "--format",
        "raw",
    ])?;
    let upload_started = Instant::now();
    let uploaded = virsh(&[
        "vol-upload",
        "--pool",
        &b.pool,
        volume,
        &image_file.display().to_string(),
    ]);
    let vol_upload = upload_started.elapsed().as_secs_f64();
    uploaded?;
    ensure!(
        same_file(&b.pool_path.join(volume), image_file)?,
        "the vol-upload copy differs"
    );
    virsh(&["vol-delete", "--pool", &b.pool, volume])?;
    println!("run {run}: virsh vol-upload {vol_upload:.2} s");

    remove_pools(&cleanup.pools);
    cleanup.pools.clear();
    let _ = std::fs::remove_dir_all(&run_dir);
    Ok(RunRow {
        run,
        load,
        pull_delay: row_pull.0,
        pull: row_pull.1,
        pull_reported: row_pull.2,
        pull_bytes: row_pull.3,
        pull_wire_bytes: row_pull.4,
        tcp,
        rsync: rsync_seconds,
        vol_upload,
    })
}

fn print_table(rows: &[RunRow], image_bytes: usize) {
    let rate = |seconds: f64| image_bytes as f64 / seconds / 1e6;
    println!();
    println!(
        "| run | load | deskgrid pull s (its log) | MB/s | wire MB (of {} MB fetched) | start delay s | raw TCP+fsync s | MB/s | rsync s | MB/s | vol-upload s | MB/s | **pull / TCP** | pull / rsync | **pull / vol-upload** |",
        rows.first().map_or(0, |row| row.pull_bytes / 1_000_000)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (rsync_s, rsync_rate, rsync_ratio) = match row.rsync {
            Some(seconds) => (
                format!("{seconds:.2}"),
                format!("{:.0}", rate(seconds)),
                format!("{:.2}", rate(row.pull) / rate(seconds)),
            ),
            None => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "| {} | {} | {:.2} ({:.2}) | {:.0} | {} | {:.2} | {:.2} | {:.0} | {rsync_s} | {rsync_rate} | {:.2} | {:.0} | **{:.2}** | {rsync_ratio} | **{:.2}** |",
            row.run,
            row.load,
            row.pull,
            row.pull_reported,
            rate(row.pull),
            row.pull_wire_bytes / 1_000_000,
            row.pull_delay,
            row.tcp,
            rate(row.tcp),
            row.vol_upload,
            rate(row.vol_upload),
            rate(row.pull) / rate(row.tcp),
            rate(row.pull) / rate(row.vol_upload),
        );
    }
    println!(
        "MB/s = image bytes ({image_bytes}) per second, zero regions included, for every column."
    );
    println!();
}

/// A disk-like image of `size` bytes: runs of 1 to 24 MiB, a third of them
/// all zeros, half real file content (files under /usr/lib and /usr/share,
/// in directory order, each at most 8 MiB), a sixth pseudo-random.
fn disk_like_image(size: usize) -> anyhow::Result<Vec<u8>> {
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
fn file_corpus(want: usize) -> anyhow::Result<Vec<u8>> {
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

fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
    // xorshift64*: fast, and plenty for choosing regions and random bytes.
    move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The size of `data` compressed by zstd level 1 as one stream.
fn zstd_size(data: &[u8]) -> anyhow::Result<u64> {
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

/// Puts `data` into A's pool as the raw base volume, keeps its manifest and
/// registers the version as held complete by A, as tests/transfer_grid.rs does.
fn seed_image(member: &Member, data: &[u8], manifest: &Manifest) -> anyhow::Result<()> {
    let host = LibvirtHypervisor::connect(LibvirtOptions {
        uri: URI.to_owned(),
        pool: member.pool.clone(),
        pool_path: member.pool_path.display().to_string(),
        domain_kind: Some(DomainKind::Qemu),
        streams_only: false,
    })?;
    host.ensure_pool()?;
    let image = ImageVersionId::new(IMAGE)?;
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

/// Sends `source` over a loopback TCP connection to a receiver thread that
/// writes it to `target` and fsyncs; seconds from connecting to the fsync.
fn tcp_copy(source: &Path, target: &Path) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?;
    let target = target.to_owned();
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut stream, _) = listener.accept()?;
        let mut file = File::create(&target)?;
        let mut buffer = vec![0u8; TCP_BUFFER];
        let mut total = 0;
        loop {
            let n = stream.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            file.write_all(&buffer[..n])?;
            total += n as u64;
        }
        file.sync_all()?;
        Ok(total)
    });
    let mut file = File::open(source)?;
    let started = Instant::now();
    let mut stream = TcpStream::connect(address)?;
    let mut buffer = vec![0u8; TCP_BUFFER];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        stream.write_all(&buffer[..n])?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let received = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("the TCP receiver panicked"))??;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(
        received == file.metadata()?.len(),
        "TCP copy received {received} bytes"
    );
    Ok(seconds)
}

/// Runs an rsync daemon on 127.0.0.1 whose module is `pool_path` and copies
/// `source` into it (`--inplace` off, whole file: what a first copy does).
fn rsync_copy(
    rsync: &Path,
    run_dir: &Path,
    source: &Path,
    pool_path: &Path,
) -> anyhow::Result<f64> {
    let port = free_tcp_port()?;
    let config = run_dir.join("rsyncd.conf");
    std::fs::write(
        &config,
        format!(
            "pid file = {}\nuse chroot = no\n[pool]\n  path = {}\n  read only = no\n  uid = root\n  gid = root\n",
            run_dir.join("rsyncd.pid").display(),
            pool_path.display()
        ),
    )?;
    let mut daemon = Serving {
        name: "rsync daemon",
        child: Some(
            Command::new(rsync)
                .args(["--daemon", "--no-detach", "--address", "127.0.0.1"])
                .arg(format!("--port={port}"))
                .arg(format!("--config={}", config.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ),
        log: None,
    };
    wait_until("the rsync daemon listens", START_TIMEOUT, || {
        Ok(TcpStream::connect(("127.0.0.1", port)).is_ok())
    })?;
    let started = Instant::now();
    let status = Command::new(rsync)
        .arg(source)
        .arg(format!("rsync://127.0.0.1:{port}/pool/bench-rsync.raw"))
        .status()?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(status.success(), "rsync failed: {status}");
    daemon.stop();
    let copy = pool_path.join("bench-rsync.raw");
    ensure!(same_file(&copy, source)?, "the rsync copy differs");
    std::fs::remove_file(copy)?;
    Ok(seconds)
}

fn virsh(arguments: &[&str]) -> anyhow::Result<()> {
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

fn same_file(a: &Path, b: &Path) -> anyhow::Result<bool> {
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

#[derive(Debug)]
struct Member {
    name: &'static str,
    data_dir: PathBuf,
    pool: String,
    pool_path: PathBuf,
}

impl Member {
    fn new(root: &Path, suffix: &str, name: &'static str) -> Self {
        Self {
            name,
            data_dir: root.join(name),
            pool: format!("dg-bench-xfer-{suffix}-{name}"),
            pool_path: root.join(format!("pool-{name}")),
        }
    }

    fn settings(&self, address: &str) -> Vec<String> {
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

    fn log(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    fn output(&self, arguments: &[&str]) -> anyhow::Result<Output> {
        let output = Command::new(DESKGRID)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(arguments)
            .env_remove("DESKGRID_DATA_DIR")
            .env_remove("RUST_LOG")
            .output()?;
        if !output.status.success() {
            bail!(
                "{} {arguments:?}: {}",
                self.name,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(output)
    }

    fn run(&self, arguments: &[String]) -> anyhow::Result<()> {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        self.output(&arguments).map(drop)
    }

    /// How `self` sees server `name`: its failure-detector state and its
    /// complete images.
    fn sees(&self, name: &str) -> anyhow::Result<(String, u64)> {
        let output = self.output(&["--output", "json", "status"])?;
        let status: serde_json::Value = serde_json::from_slice(&output.stdout)?;
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
}

/// A child process (a `deskgrid serve`, the rsync daemon), killed when dropped.
#[derive(Debug)]
struct Serving {
    name: &'static str,
    child: Option<Child>,
    log: Option<PathBuf>,
}

impl Serving {
    /// `deskgrid serve` for `member`, logging to `member.log()` (a pipe nobody
    /// reads would stall it), once its control socket is there.
    fn start(member: &Member) -> anyhow::Result<Self> {
        let socket = member.data_dir.join("control.sock");
        let child = Command::new(DESKGRID)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .arg("serve")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(File::create(member.log())?)
            .spawn()?;
        let mut serving = Self {
            name: member.name,
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

    /// SIGTERM, then SIGKILL if it has not exited within `START_TIMEOUT`.
    fn stop(&mut self) {
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

/// Removes what the bench made when dropped, after a failure too: the
/// servers, the pools with their volumes, the work directory.
#[derive(Debug)]
struct Cleanup {
    servers: Vec<Serving>,
    pools: Vec<String>,
    work: Option<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.servers.clear();
        remove_pools(&self.pools);
        if let Some(work) = self.work.take() {
            let _ = work.close();
        }
    }
}

fn remove_pools(pools: &[String]) {
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
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|field| field.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

fn wait_until(
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
fn free_udp_port() -> anyhow::Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|path| path.is_file())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|line| line.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

fn install_signal_handler() {
    std::thread::spawn(|| {
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
                    eprintln!("interrupted again: exiting without cleanup (look for dg-bench-xfer-* in virsh pool-list)");
                    std::process::exit(130);
                }
                eprintln!("interrupted: cleaning up after the current step (again to exit at once)");
            }
        });
    });
}

fn check_interrupted() -> anyhow::Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}
