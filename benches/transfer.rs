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

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use clap::Parser;
use common::{
    check_interrupted, disk_like_image, fields, free_tcp_port, free_udp_port,
    install_signal_handler, load_average, remove_pools, same_file, seed_image, virsh, wait_until,
    which, zstd_size, Cleanup, Member, Serving, CONVERGE_TIMEOUT, MIB, START_TIMEOUT, TCP_BUFFER,
};
use deskgrid::transfer::manifest::{manifest_of, DEFAULT_CHUNK_SIZE};
use deskgrid::transfer::Manifest;

const IMAGE: &str = "bench-image";
/// 2 GiB at a pessimistic 20 MB/s.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

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
    install_signal_handler("dg-bench-xfer-* in virsh pool-list");
    let work = tempfile::Builder::new()
        .prefix("dg-bench-xfer-")
        .tempdir_in("/var/tmp")
        .context("work directory under /var/tmp")?;
    let mut cleanup = Cleanup::new(work);
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
    let pool_prefix = format!("dg-bench-xfer-{suffix}");
    let [a, b] = ["a", "b"].map(|name| Member::new(&run_dir, &pool_prefix, name));
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
    seed_image(&a, IMAGE, data, manifest)?;
    println!(
        "run {run}: image seeded in A's pool in {:.1} s",
        seeded.elapsed().as_secs_f64()
    );
    check_interrupted()?;
    cleanup.servers.push(Serving::start(&a)?);

    // B joins, then is told to hold the image.
    let address_b = format!("127.0.0.1:{}", free_udp_port()?);
    let token = a.token()?;
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
    let mut daemon = Serving::child(
        "rsync daemon",
        Command::new(rsync)
            .args(["--daemon", "--no-detach", "--address", "127.0.0.1"])
            .arg(format!("--port={port}"))
            .arg(format!("--config={}", config.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
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
