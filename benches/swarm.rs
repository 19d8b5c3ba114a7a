//! Swarm benchmark (issue 6): one source and four receivers on links like a
//! real grid's. Five real `deskgrid serve` processes, each in its own
//! network namespace with one veth into a bridge that lives in a sixth
//! namespace; every node's veth is limited with `tc` (a token bucket on the
//! egress of both ends, so each way) to `--rate-mbit` (default 1000). A holds
//! a new grid whose template `swarm` (`--replicas 5`) names the image before
//! it exists; B, C, D and E join; `deskgrid image import` on A registers the
//! image and all four pull it at once. (Seeding the image before the joins,
//! as benches/transfer.rs does, would not work here: a ready version is kept
//! by two servers even when no template names it, so the first receiver to
//! join would pull it alone.) Measured: the time until all four are complete, each receiver's
//! time, the bytes A's veth sent (kernel counters) against the image size,
//! and which sources each receiver pulled from (its `pull source` log lines).
//!
//! In the same run, through the same links: deskgrid's pull of a second copy
//! of the image by one receiver alone (imported first under another name
//! that no template names, so the grid's library default of two copies makes
//! one receiver pull it; that receiver holds only that copy, so the swarm's
//! four pulls start with A as the only complete holder), and with the servers stopped, raw TCP copies of the
//! image file from A's namespace into files in the receivers' pool
//! directories (1 MiB writes, then fsync): to one receiver (one transfer),
//! then to all four at once (the source alone serving four copies: its link
//! is the bottleneck).
//!
//! ```text
//! cargo bench --bench swarm -- [--size-mib 1024] [--rate-mbit 1000] [--unlimited]
//! ```
//!
//! `--unlimited` builds the same network without `tc`: all nodes then share
//! the two cores, the one disk and the kernel's veth speed.
//!
//! Needs root, iproute2 (`ip`, `tc`) and a running libvirtd
//! (`bash scripts/setup-host.sh`). Every node has its own pool
//! (`dg-bench-swarm-<pid>-<node>`, under a work directory in /var/tmp) on the
//! one libvirtd, reached through its unix socket from inside the namespaces.
//! Namespaces (`dgsw-<pid>-*`), processes, pools and files are removed at the
//! end, on error, on panic and on Ctrl-C.

mod common;

use std::fs::File;
use std::io::{BufRead as _, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use common::{
    add_namespace, check_interrupted, disk_like_image, field, image_lines, install_signal_handler,
    ip, link_bytes, load_average, same_file, tool, wait_until, zstd_size, Cleanup, Member, Serving,
    CONVERGE_TIMEOUT, MIB, START_TIMEOUT, TCP_BUFFER,
};
use deskgrid::transfer::manifest::{manifest_of, DEFAULT_CHUNK_SIZE};

/// The copy one receiver pulls alone, and the copy the swarm pulls: the
/// same bytes under two names, so the lone pull leaves no holder of the
/// swarm's version behind.
const IMAGE_ONE: &str = "bench-one";
const IMAGE_SWARM: &str = "bench-swarm";
const NODES: [&str; 5] = ["a", "b", "c", "d", "e"];
/// Addresses exist only inside the bench's namespaces.
const SUBNET: &str = "10.77.0";
const QUIC_PORT: u16 = 7443;
const TCP_PORT: u16 = 9100;
/// The node's end of its veth (inside the node's namespace).
const NODE_DEVICE: &str = "eth0";
/// 4 GiB at a pessimistic 20 MB/s.
const PULL_TIMEOUT: Duration = Duration::from_secs(900);
/// The token bucket's queue: 20 ms at the rate, a switch port's buffer.
const TBF_LATENCY: &str = "20ms";

/// Swarm benchmark: one source, four receivers, tc-limited links.
#[derive(Debug, Parser)]
#[command(name = "swarm")]
struct BenchOptions {
    /// Size of the test image.
    #[arg(long, default_value_t = 1024)]
    size_mib: usize,
    /// Every node's link rate, each way, in Mbit/s.
    #[arg(long, default_value_t = 1000)]
    rate_mbit: u32,
    /// No tc: the veths run as fast as the kernel moves bytes.
    #[arg(long)]
    unlimited: bool,
    /// Accepted for `cargo bench`, which passes it to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
    /// Helper run inside a namespace: accept one TCP connection on ADDRESS,
    /// write what arrives into FILE, fsync, print `received BYTES`.
    #[arg(long, hide = true, num_args = 2, value_names = ["ADDRESS", "FILE"])]
    tcp_receive: Option<Vec<String>>,
    /// Helper run inside a namespace: send FILE to every `--to` address at once.
    #[arg(long, hide = true)]
    tcp_send: Option<PathBuf>,
    #[arg(long, hide = true)]
    to: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let options = BenchOptions::parse();
    if let Some(receive) = &options.tcp_receive {
        return tcp_receive(&receive[0], Path::new(&receive[1]));
    }
    if let Some(file) = &options.tcp_send {
        return tcp_send(file, &options.to);
    }
    ensure!(options.size_mib >= 64, "--size-mib must be at least 64");
    ensure!(options.rate_mbit >= 10, "--rate-mbit must be at least 10");
    install_signal_handler("dgsw-* in `ip netns` and dg-bench-swarm-* in virsh pool-list");
    let work = tempfile::Builder::new()
        .prefix("dg-bench-swarm-")
        .tempdir_in("/var/tmp")
        .context("work directory under /var/tmp")?;
    let mut cleanup = Cleanup::new(work);
    let root = cleanup.root();
    println!("load average at start: {}", load_average());

    let started = Instant::now();
    let data = disk_like_image(options.size_mib * MIB)?;
    let image_file = root.join("image.raw");
    std::fs::write(&image_file, &data).context("writing the image file")?;
    let manifest = manifest_of(&data, DEFAULT_CHUNK_SIZE)?;
    let n_zero_chunks = manifest.chunks.len() as u64 - manifest.data_chunks().count() as u64;
    let zstd_bytes = zstd_size(&data)?;
    println!(
        "image: {} MiB, {} chunks of {} MiB: {n_zero_chunks} all-zero, {} with data ({} MiB); \
         zstd -1 ratio {:.2}; made in {:.1} s",
        options.size_mib,
        manifest.chunks.len(),
        DEFAULT_CHUNK_SIZE as usize / MIB,
        manifest.chunks.len() as u64 - n_zero_chunks,
        manifest.data_bytes() / MIB as u64,
        data.len() as f64 / zstd_bytes as f64,
        started.elapsed().as_secs_f64()
    );
    drop(data);

    let rate = (!options.unlimited).then_some(options.rate_mbit);
    let namespaces = build_network(&mut cleanup, rate)?;
    match rate {
        Some(rate) => println!(
            "network: 5 namespaces, one veth each into a bridge in a sixth; tc tbf {rate} Mbit/s \
             (burst {} bytes, latency {TBF_LATENCY}) on the egress of both ends of every veth",
            tbf_burst(rate)
        ),
        None => println!(
            "network: 5 namespaces, one veth each into a bridge in a sixth; no tc (--unlimited)"
        ),
    }

    let pool_prefix = format!("dg-bench-swarm-{}", std::process::id());
    let members: Vec<Member> = NODES
        .iter()
        .zip(&namespaces)
        .map(|(name, namespace)| Member::new(&root, &pool_prefix, name).in_namespace(namespace))
        .collect();
    cleanup
        .pools
        .extend(members.iter().map(|member| member.pool.clone()));
    let address = |index: usize| format!("{SUBNET}.{}:{QUIC_PORT}", index + 1);

    // A: a new grid; the swarm's template names its image before it exists.
    let a = &members[0];
    let password = root.join("admin-password");
    std::fs::write(&password, "correct horse battery staple\n")?;
    let mut init = vec![
        "init".to_owned(),
        "--new-grid".to_owned(),
        "--admin-password-file".to_owned(),
        password.display().to_string(),
    ];
    init.extend(a.settings(&address(0)));
    a.run(&init)?;
    cleanup.servers.push(Serving::start(a)?);
    a.run(&template_create("swarm", IMAGE_SWARM, 5))?;

    // The receivers join through A.
    for (index, member) in members.iter().enumerate().skip(1) {
        let mut join = vec![
            "join".to_owned(),
            address(0),
            "--token".to_owned(),
            a.token()?,
        ];
        join.extend(member.settings(&address(index)));
        member.run(&join)?;
        cleanup.servers.push(Serving::start(member)?);
    }
    let receivers = &members[1..];
    wait_until(
        "A and the receivers see each other",
        CONVERGE_TIMEOUT,
        || {
            for member in receivers {
                if a.sees(member.name)?.0 != "alive" || member.sees("a")?.0 != "alive" {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )?;
    let names = a.server_names()?;

    // One receiver alone: deskgrid's one transfer through these links. A
    // version no template names is kept by two servers (the grid's library
    // default), so importing it on A makes exactly one receiver pull it.
    let before = link_bytes(&namespaces[0], NODE_DEVICE)?.0;
    let import_seconds = import(a, &image_file, IMAGE_ONE)?;
    let asked = Instant::now();
    let (lone, lone_pull) = loop {
        check_interrupted()?;
        ensure!(
            asked.elapsed() < PULL_TIMEOUT,
            "no receiver pulled {IMAGE_ONE} in time"
        );
        let done = receivers.iter().find_map(|member| {
            image_lines(&member.log(), "image pulled", IMAGE_ONE)
                .pop()
                .map(|line| (member, line))
        });
        if let Some(done) = done {
            break done;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let lone_seconds = asked.elapsed().as_secs_f64();
    let lone_uploaded = link_bytes(&namespaces[0], NODE_DEVICE)?.0 - before;
    let lone_own: f64 = field(&lone_pull, "seconds")?;
    let lone_wire: u64 = field(&lone_pull, "wire_bytes")?;
    println!(
        "deskgrid, one receiver ({}) alone: {lone_seconds:.2} s after `image import` returned \
         (the import took {import_seconds:.1} s; the pull {lone_own:.2} s in its log), \
         {:.0} MB on the wire, A's veth sent {:.0} MB",
        lone.name,
        lone_wire as f64 / 1e6,
        lone_uploaded as f64 / 1e6
    );
    // Let A's side settle (the receiver's record, the last acks).
    std::thread::sleep(Duration::from_secs(2));
    check_interrupted()?;

    // The swarm: the template wants five holders, so once the version is
    // in the grid all four receivers pull it at once.
    let before = link_bytes(&namespaces[0], NODE_DEVICE)?.0;
    let import_seconds = import(a, &image_file, IMAGE_SWARM)?;
    let asked = Instant::now();
    let mut pulling: Vec<Option<Instant>> = vec![None; receivers.len()];
    let mut pulled: Vec<Option<Instant>> = vec![None; receivers.len()];
    while pulled.iter().any(Option::is_none) {
        check_interrupted()?;
        ensure!(
            asked.elapsed() < PULL_TIMEOUT,
            "the receivers did not all pull {IMAGE_SWARM} in time"
        );
        for (index, member) in receivers.iter().enumerate() {
            if pulled[index].is_some() {
                continue;
            }
            let log = std::fs::read_to_string(member.log()).unwrap_or_default();
            let lines = |message: &str| {
                log.lines()
                    .filter(move |line| {
                        line.contains(message) && line.contains(&format!("image={IMAGE_SWARM}"))
                    })
                    .count()
            };
            if pulling[index].is_none() && lines("pulling image") > 0 {
                pulling[index] = Some(Instant::now());
            }
            if lines("image pulled") > 0 {
                pulled[index] = Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let swarm_total = asked.elapsed().as_secs_f64();
    let first_pulling = pulling.iter().flatten().min().copied();
    let swarm_uploaded = link_bytes(&namespaces[0], NODE_DEVICE)?.0 - before;
    let mut swarm_rows = Vec::new();
    for (index, member) in receivers.iter().enumerate() {
        let done = image_lines(&member.log(), "image pulled", IMAGE_SWARM);
        let line = done.last().context("no image pulled line")?;
        let stopped = image_lines(
            &member.log(),
            "pull stopped before the image was complete",
            IMAGE_SWARM,
        )
        .len();
        let sources = image_lines(&member.log(), "pull source", IMAGE_SWARM)
            .iter()
            .map(|source| {
                let peer = source.get("peer").cloned().unwrap_or_default();
                let name = names.get(&peer).cloned().unwrap_or(peer);
                let wire: u64 = field(source, "wire_bytes").unwrap_or(0);
                let chunks: u64 = field(source, "chunks").unwrap_or(0);
                format!("{name}: {chunks} chunks, {:.0} MB wire", wire as f64 / 1e6)
            })
            .collect::<Vec<_>>()
            .join("; ");
        let pulled_at = pulled[index].context("checked above")?;
        swarm_rows.push(SwarmRow {
            name: member.name,
            since_asked: pulled_at.duration_since(asked).as_secs_f64(),
            pull: pulling[index]
                .map(|at| pulled_at.duration_since(at).as_secs_f64())
                .unwrap_or(f64::NAN),
            own: field(line, "seconds")?,
            wire: field(line, "wire_bytes")?,
            stopped,
            sources,
        });
    }
    cleanup.stop_servers();
    for member in receivers {
        ensure!(
            same_file(&member.volume_file(IMAGE_SWARM), &image_file)?,
            "{}'s volume differs from the image",
            member.name
        );
    }
    let swarm_span = first_pulling.map_or(f64::NAN, |first| {
        swarm_total - first.duration_since(asked).as_secs_f64()
    });
    println!(
        "deskgrid swarm: all four complete {swarm_total:.2} s after `image import` returned \
         (import {import_seconds:.1} s; first `pulling image` line to last `image pulled`: {swarm_span:.2} s); \
         A's veth sent {:.0} MB; every receiver's volume verified byte for byte",
        swarm_uploaded as f64 / 1e6
    );
    check_interrupted()?;

    // Raw TCP with the servers stopped: one transfer, then four at once.
    let (one_seconds, one_uploaded) = raw_copies(&members, &namespaces, &image_file, &[1])?;
    println!("raw TCP, one receiver: {:.2} s", one_seconds[0]);
    check_interrupted()?;
    let (four_seconds, four_uploaded) =
        raw_copies(&members, &namespaces, &image_file, &[1, 2, 3, 4])?;
    let four_total = four_seconds.iter().copied().fold(0.0, f64::max);
    println!("raw TCP, four receivers at once: {four_total:.2} s");

    let image_bytes = (options.size_mib * MIB) as f64;
    let one = one_seconds[0];
    let link = match rate {
        Some(rate) => format!("{rate} Mbit/s each way per node (tc tbf)"),
        None => "unlimited veths (no tc)".to_owned(),
    };
    println!();
    println!(
        "Swarm, {} MiB image, {link}; load average {} at end",
        options.size_mib,
        load_average()
    );
    println!();
    println!("| transfer | total s | per receiver s | × one raw transfer | source sent MB | source sent / image |");
    println!("|---|---|---|---|---|---|");
    let per = |seconds: &[f64]| {
        seconds
            .iter()
            .map(|seconds| format!("{seconds:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| raw TCP + fsync, one receiver (**one transfer**) | {one:.2} | {one:.2} | 1.00 | {:.0} | {:.2} |",
        one_uploaded as f64 / 1e6,
        one_uploaded as f64 / image_bytes
    );
    println!(
        "| raw TCP + fsync, source alone to four at once | {four_total:.2} | {} | {:.2} | {:.0} | {:.2} |",
        per(&four_seconds),
        four_total / one,
        four_uploaded as f64 / 1e6,
        four_uploaded as f64 / image_bytes
    );
    println!(
        "| deskgrid pull, one receiver alone ({}) | {lone_seconds:.2} | {lone_own:.2} (its log) | {:.2} | {:.0} | {:.2} |",
        lone.name,
        lone_seconds / one,
        lone_uploaded as f64 / 1e6,
        lone_uploaded as f64 / image_bytes
    );
    println!(
        "| **deskgrid swarm, four receivers** | **{swarm_total:.2}** | {} | **{:.2}** | {:.0} | **{:.2}** |",
        per(&swarm_rows.iter().map(|row| row.since_asked).collect::<Vec<_>>()),
        swarm_total / one,
        swarm_uploaded as f64 / 1e6,
        swarm_uploaded as f64 / image_bytes
    );
    println!(
        "Times run from `image import` returning on A (deskgrid; swarm from the first `pulling image` \
         line: {swarm_span:.2} s) or from starting the sender (raw TCP) to the receiver's last byte \
         being written and synced; \"source sent\" is A's veth tx_bytes."
    );
    println!();
    println!("| receiver | complete after s | pulling → pulled s | its log s | wire MB | stopped and retried | sources (its `pull source` lines) |");
    println!("|---|---|---|---|---|---|---|");
    for row in &swarm_rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} |",
            row.name,
            row.since_asked,
            row.pull,
            row.own,
            row.wire as f64 / 1e6,
            row.stopped,
            row.sources
        );
    }
    println!();
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    println!(
        "goals: swarm total ≤ 1.5 × one transfer: {:.2} ({}); source sent ≤ 1.5 × image: {:.2} ({}); \
         swarm total / deskgrid's own lone pull: {:.2}; source sent / lone pull's: {:.2}",
        swarm_total / one,
        verdict(swarm_total / one <= 1.5),
        swarm_uploaded as f64 / image_bytes,
        verdict(swarm_uploaded as f64 / image_bytes <= 1.5),
        swarm_total / lone_seconds,
        swarm_uploaded as f64 / lone_uploaded as f64
    );
    Ok(())
}

#[derive(Debug)]
struct SwarmRow {
    name: &'static str,
    since_asked: f64,
    pull: f64,
    own: f64,
    wire: u64,
    stopped: usize,
    sources: String,
}

/// `image import FILE --name NAME` on `member`; the seconds it took.
fn import(member: &Member, file: &Path, name: &str) -> anyhow::Result<f64> {
    let started = Instant::now();
    member.json(&[
        "image",
        "import",
        &file.display().to_string(),
        "--name",
        name,
    ])?;
    Ok(started.elapsed().as_secs_f64())
}

fn template_create(name: &str, image: &str, replicas: u32) -> Vec<String> {
    [
        "template",
        "create",
        name,
        "--image",
        image,
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--desired",
        "0",
        "--replicas",
        &replicas.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Bucket depth for `rate_mbit`: 4 ms at the rate, and never below what a
/// veth hands over at once (GSO packets of up to 64 KiB).
fn tbf_burst(rate_mbit: u32) -> u64 {
    (u64::from(rate_mbit) * 1_000_000 / 8 / 250).max(256 * 1024)
}

/// Six namespaces (`dgsw-<pid>-br` with bridge `br0`, one per node with
/// `eth0` at `SUBNET.N/24`), a veth per node into the bridge, and with a
/// rate, a token bucket on both ends of every veth. Returns the nodes'
/// namespaces; all six are in `cleanup` before they exist.
fn build_network(cleanup: &mut Cleanup, rate_mbit: Option<u32>) -> anyhow::Result<Vec<String>> {
    let pid = std::process::id();
    let bridge = format!("dgsw-{pid}-br");
    let nodes: Vec<String> = NODES
        .iter()
        .map(|node| format!("dgsw-{pid}-{node}"))
        .collect();
    cleanup.namespaces.push(bridge.clone());
    cleanup.namespaces.extend(nodes.iter().cloned());
    add_namespace(&bridge)?;
    ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
    let limit = |namespace: &str, device: &str| -> anyhow::Result<()> {
        if let Some(rate) = rate_mbit {
            tool(
                "tc",
                &[
                    "-n",
                    namespace,
                    "qdisc",
                    "replace",
                    "dev",
                    device,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{rate}mbit"),
                    "burst",
                    &tbf_burst(rate).to_string(),
                    "latency",
                    TBF_LATENCY,
                ],
            )?;
        }
        Ok(())
    };
    for (index, (node, namespace)) in NODES.iter().zip(&nodes).enumerate() {
        add_namespace(namespace)?;
        let port = format!("v-{node}");
        ip(&[
            "-n",
            namespace,
            "link",
            "add",
            NODE_DEVICE,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &bridge,
        ])?;
        ip(&["-n", &bridge, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &bridge, "link", "set", &port, "up"])?;
        ip(&[
            "-n",
            namespace,
            "addr",
            "add",
            &format!("{SUBNET}.{}/24", index + 1),
            "dev",
            NODE_DEVICE,
        ])?;
        ip(&["-n", namespace, "link", "set", NODE_DEVICE, "up"])?;
        limit(namespace, NODE_DEVICE)?;
        limit(&bridge, &port)?;
    }
    Ok(nodes)
}

/// Raw TCP copies of `image_file` from A's namespace to the members at
/// `targets` (indexes into `members`), all at once, each written into a file
/// in the receiver's pool directory and fsynced by a helper process in the
/// receiver's namespace. Returns each receiver's seconds from starting the
/// sender to its `received` line, and the bytes A's veth sent meanwhile.
fn raw_copies(
    members: &[Member],
    namespaces: &[String],
    image_file: &Path,
    targets: &[usize],
) -> anyhow::Result<(Vec<f64>, u64)> {
    let this = std::env::current_exe()?;
    let this = this.to_str().context("the bench's path is not UTF-8")?;
    let size = std::fs::metadata(image_file)?.len();
    let (lines, received) = mpsc::channel();
    let mut helpers = Vec::new();
    let mut files = Vec::new();
    for (slot, &target) in targets.iter().enumerate() {
        let member = &members[target];
        let file = member.pool_path.join("bench-tcp-copy.raw");
        let mut child = member
            .command(this)
            .arg("--tcp-receive")
            .arg(format!("{SUBNET}.{}:{TCP_PORT}", target + 1))
            .arg(&file)
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child.stdout.take().context("piped above")?;
        read_lines(slot, stdout, lines.clone());
        helpers.push(Serving::child(
            &format!("TCP receiver {}", member.name),
            child,
        ));
        files.push(file);
    }
    // Every receiver listens before the sender connects.
    let mut listening = 0;
    while listening < targets.len() {
        let (slot, _, line) = next_line(&received, START_TIMEOUT)?;
        ensure!(line == "listening", "receiver {slot} said {line:?}");
        listening += 1;
    }
    let before = link_bytes(&namespaces[0], NODE_DEVICE)?.0;
    let started = Instant::now();
    let mut sender = members[0].command(this);
    sender.arg("--tcp-send").arg(image_file);
    for &target in targets {
        sender
            .arg("--to")
            .arg(format!("{SUBNET}.{}:{TCP_PORT}", target + 1));
    }
    let mut sender = Serving::child("TCP sender", sender.spawn()?);
    let mut seconds = vec![f64::NAN; targets.len()];
    for _ in targets {
        let (slot, at, line) = next_line(&received, PULL_TIMEOUT)?;
        let bytes: u64 = line
            .strip_prefix("received ")
            .and_then(|bytes| bytes.parse().ok())
            .with_context(|| format!("receiver {slot} said {line:?}"))?;
        ensure!(
            bytes == size,
            "receiver {slot} received {bytes} of {size} bytes"
        );
        seconds[slot] = at.duration_since(started).as_secs_f64();
    }
    let status = sender
        .child
        .take()
        .context("just started")?
        .wait()
        .context("waiting for the TCP sender")?;
    ensure!(status.success(), "the TCP sender failed: {status}");
    let uploaded = link_bytes(&namespaces[0], NODE_DEVICE)?.0 - before;
    for helper in helpers.iter_mut() {
        helper.stop();
    }
    for file in &files {
        ensure!(same_file(file, image_file)?, "{} differs", file.display());
        std::fs::remove_file(file)?;
    }
    Ok((seconds, uploaded))
}

/// Sends every line `stdout` prints to `lines`, with its slot and when it came.
fn read_lines(slot: usize, stdout: ChildStdout, lines: mpsc::Sender<(usize, Instant, String)>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send((slot, Instant::now(), line)).is_err() {
                break;
            }
        }
    });
}

fn next_line(
    received: &mpsc::Receiver<(usize, Instant, String)>,
    timeout: Duration,
) -> anyhow::Result<(usize, Instant, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        match received.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => return Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                ensure!(
                    Instant::now() < deadline,
                    "a TCP helper said nothing in time"
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the TCP helpers exited"),
        }
    }
}

/// The receiving helper (inside a receiver's namespace).
fn tcp_receive(address: &str, target: &Path) -> anyhow::Result<()> {
    let listener = TcpListener::bind(address).with_context(|| format!("binding {address}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    let (mut stream, _) = listener.accept()?;
    let mut file = File::create(target)?;
    let mut buffer = vec![0u8; TCP_BUFFER];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        file.write_all(&buffer[..n])?;
        total += n as u64;
    }
    file.sync_all()?;
    println!("received {total}");
    std::io::stdout().flush()?;
    Ok(())
}

/// The sending helper (inside the source's namespace): one thread and one
/// connection per receiver, each reading the file on its own.
fn tcp_send(source: &Path, to: &[String]) -> anyhow::Result<()> {
    let senders: Vec<_> = to
        .iter()
        .cloned()
        .map(|address| {
            let source = source.to_owned();
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut file = File::open(&source)?;
                let mut stream = TcpStream::connect(&address)
                    .with_context(|| format!("connecting to {address}"))?;
                let mut buffer = vec![0u8; TCP_BUFFER];
                loop {
                    let n = file.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    stream.write_all(&buffer[..n])?;
                }
                stream.shutdown(std::net::Shutdown::Write)?;
                Ok(())
            })
        })
        .collect();
    for sender in senders {
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("a sender thread panicked"))??;
    }
    Ok(())
}
