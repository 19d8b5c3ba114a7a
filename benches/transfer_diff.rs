//! Difference-disk benchmark (issue 6): an update to a base image shipped
//! three ways, bytes on the wire and time side by side. A 2 GiB (by default)
//! disk-like version 1; an update changes 64 MiB of it in 16 scattered
//! regions (new file content and some random bytes, like an OS update);
//! the update becomes version 2 as an admin makes it (a qcow2 overlay on
//! version 1's volume, the changes written with `qemu-io`, then
//! `deskgrid image publish-diff`, as tests/transfer_diff.rs does).
//!
//! (a) A server holding version 1 gets version 2 as the zstd-compressed
//!     overlay and rebuilds it (its `image rebuilt from a difference disk`
//!     line gives the wire bytes and seconds).
//! (b) A server without version 1 pulls version 2 in full (its `image
//!     pulled` line).
//! (c) rsync's delta: version 1 already at the receiver, an rsync daemon on
//!     127.0.0.1, `rsync --inplace --no-whole-file --stats` of version 2
//!     (its "Total bytes sent/received").
//!
//! Everything runs in one network namespace of its own with only loopback,
//! so the loopback's kernel counters count exactly the bench's bytes (QUIC,
//! TLS and gossip included for deskgrid, the rsync protocol for rsync); they
//! are printed beside each tool's own figure. Servers: A holds version 1
//! (seeded through the library as benches/transfer.rs does) and B joins
//! and pulls it in full (the grid keeps two copies of a ready version); A
//! publishes version 2 and B rebuilds it (a). Then B is stopped and removed
//! from the grid, and C joins: C holds nothing, so it pulls version 2 in
//! full from A (b). With the servers stopped, rsync (c).
//!
//! ```text
//! cargo bench --bench transfer_diff -- [--size-mib 2048] [--change-mib 64] [--regions 16]
//! ```
//!
//! Needs root, iproute2, rsync, qemu-utils and a running libvirtd
//! (`bash scripts/setup-host.sh`). The namespace (`dgdiff-<pid>`), processes,
//! pools (`dg-bench-diff-<pid>-*`) and files under /var/tmp are removed at
//! the end, on error, on panic and on Ctrl-C.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use clap::Parser;
use common::{
    add_namespace, check_interrupted, disk_like_image, field, file_corpus, image_lines,
    install_signal_handler, link_bytes, load_average, remove_pools, same_file, seed_image, tool,
    wait_until, which, xorshift, zstd_size, Cleanup, Member, Serving, CONVERGE_TIMEOUT, MIB,
    START_TIMEOUT,
};
use deskgrid::transfer::manifest::{manifest_of, DEFAULT_CHUNK_SIZE};

const V1: &str = "bench-v1";
const V2: &str = "bench-v2";
/// 2 GiB at a pessimistic 20 MB/s.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// Ports inside the bench's own namespace: nothing else listens there.
const RSYNC_PORT: u16 = 8730;

/// Difference-disk update against a full pull and rsync's delta.
#[derive(Debug, Parser)]
#[command(name = "transfer_diff")]
struct BenchOptions {
    /// Size of the base image.
    #[arg(long, default_value_t = 2048)]
    size_mib: usize,
    /// How much of it the update changes.
    #[arg(long, default_value_t = 64)]
    change_mib: usize,
    /// In how many scattered regions.
    #[arg(long, default_value_t = 16)]
    regions: usize,
    /// Accepted for `cargo bench`, which passes it to every bench target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let options = BenchOptions::parse();
    ensure!(options.size_mib >= 64, "--size-mib must be at least 64");
    ensure!(
        options.regions >= 1 && options.change_mib * MIB / options.regions >= 64 * 1024,
        "each region must be at least 64 KiB"
    );
    ensure!(
        options.change_mib * 4 <= options.size_mib,
        "--change-mib must be at most a quarter of --size-mib"
    );
    let rsync = which("rsync").context("rsync is not installed (bash scripts/setup-host.sh)")?;
    install_signal_handler("dgdiff-* in `ip netns` and dg-bench-diff-* in virsh pool-list");
    let work = tempfile::Builder::new()
        .prefix("dg-bench-diff-")
        .tempdir_in("/var/tmp")
        .context("work directory under /var/tmp")?;
    let mut cleanup = Cleanup::new(work);
    let root = cleanup.root();
    println!("load average at start: {}", load_average());

    // Version 1, and version 2 = version 1 with the update's regions.
    let started = Instant::now();
    let size = options.size_mib * MIB;
    let mut data = disk_like_image(size)?;
    let v1_file = root.join("v1.raw");
    std::fs::write(&v1_file, &data).context("writing version 1")?;
    let manifest = manifest_of(&data, DEFAULT_CHUNK_SIZE)?;
    let zstd_v1 = zstd_size(&data)?;
    println!(
        "version 1: {} MiB, {} of {} chunks with data ({} MiB), zstd -1 ratio {:.2}; made in {:.1} s",
        options.size_mib,
        manifest.data_chunks().count(),
        manifest.chunks.len(),
        manifest.data_bytes() / MIB as u64,
        size as f64 / zstd_v1 as f64,
        started.elapsed().as_secs_f64()
    );
    let regions = update_regions(size, options.change_mib * MIB, options.regions)?;
    for (offset, bytes) in &regions {
        data[*offset..*offset + bytes.len()].copy_from_slice(bytes);
    }
    let v2_file = root.join("v2.raw");
    std::fs::write(&v2_file, &data).context("writing version 2")?;
    let v2_manifest = manifest_of(&data, DEFAULT_CHUNK_SIZE)?;
    let changed_chunks = manifest
        .chunks
        .iter()
        .zip(&v2_manifest.chunks)
        .filter(|(old, new)| old != new)
        .count();
    drop(data);
    println!(
        "update: {} MiB in {} regions of {} KiB (3/4 new file content, 1/4 random), \
         touching {changed_chunks} of {} chunks of {} MiB; version 2 has {} MiB of data chunks",
        options.change_mib,
        regions.len(),
        regions[0].1.len() / 1024,
        v2_manifest.chunks.len(),
        DEFAULT_CHUNK_SIZE as usize / MIB,
        v2_manifest.data_bytes() / MIB as u64
    );

    // One namespace with only loopback: its counters are the bench's bytes.
    let namespace = format!("dgdiff-{}", std::process::id());
    cleanup.namespaces.push(namespace.clone());
    add_namespace(&namespace)?;
    let lo = || -> anyhow::Result<u64> { Ok(link_bytes(&namespace, "lo")?.0) };
    let pool_prefix = format!("dg-bench-diff-{}", std::process::id());
    let [a, b, c] =
        ["a", "b", "c"].map(|name| Member::new(&root, &pool_prefix, name).in_namespace(&namespace));
    cleanup
        .pools
        .extend([a.pool.clone(), b.pool.clone(), c.pool.clone()]);
    let address = |port: u16| format!("127.0.0.1:{port}");

    // A holds version 1; B joins and pulls it in full (two copies of a
    // ready version).
    let password = root.join("admin-password");
    std::fs::write(&password, "correct horse battery staple\n")?;
    let mut init = vec![
        "init".to_owned(),
        "--new-grid".to_owned(),
        "--admin-password-file".to_owned(),
        password.display().to_string(),
    ];
    init.extend(a.settings(&address(7441)));
    a.run(&init)?;
    let v1_data = std::fs::read(&v1_file)?;
    seed_image(&a, V1, &v1_data, &manifest)?;
    drop(v1_data);
    cleanup.servers.push(Serving::start(&a)?);
    let before_v1 = lo()?;
    let mut join = vec![
        "join".to_owned(),
        address(7441),
        "--token".to_owned(),
        a.token()?,
    ];
    join.extend(b.settings(&address(7442)));
    b.run(&join)?;
    let joined = Instant::now();
    cleanup.servers.push(Serving::start(&b)?);
    let v1_pull = wait_for_line(&b, "image pulled", V1)?;
    let v1_since_join = joined.elapsed().as_secs_f64();
    let v1_lo = lo()? - before_v1;
    println!(
        "B pulled version 1 in full: {:.2} s in its log ({v1_since_join:.2} s after joining), \
         {:.0} MB on the wire, loopback {:.0} MB",
        field::<f64>(&v1_pull, "seconds")?,
        field::<u64>(&v1_pull, "wire_bytes")? as f64 / 1e6,
        v1_lo as f64 / 1e6
    );
    check_interrupted()?;

    // The admin's update on A: an overlay on version 1's volume, published.
    let overlay = root.join("update.qcow2");
    let overlay_name = overlay.display().to_string();
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            &a.volume_file(V1).display().to_string(),
            &overlay_name,
        ],
    )?;
    let mut writes = Vec::new();
    for (index, (offset, bytes)) in regions.iter().enumerate() {
        let source = root.join(format!("region-{index}"));
        std::fs::write(&source, bytes)?;
        writes.push("-c".to_owned());
        writes.push(format!(
            "write -s {} {offset} {}",
            source.display(),
            bytes.len()
        ));
    }
    let mut qemu_io = vec!["-f".to_owned(), "qcow2".to_owned()];
    qemu_io.extend(writes);
    qemu_io.push(overlay_name.clone());
    tool(
        "qemu-io",
        &qemu_io.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    for index in 0..regions.len() {
        std::fs::remove_file(root.join(format!("region-{index}")))?;
    }
    drop(regions);
    let overlay_bytes = std::fs::metadata(&overlay)?.len();
    let overlay_zstd = zstd_size(&std::fs::read(&overlay)?)?;
    let before_diff = lo()?;
    let publishing = Instant::now();
    let published = a.json(&[
        "image",
        "publish-diff",
        &overlay_name,
        "--parent",
        V1,
        "--name",
        V2,
    ])?;
    let publish_seconds = publishing.elapsed().as_secs_f64();
    let published_at = Instant::now();
    let kept_bytes = published["compressed_bytes"]
        .as_u64()
        .context("no compressed_bytes from publish-diff")?;
    println!(
        "published on A in {publish_seconds:.1} s: overlay {:.1} MB, kept zstd-compressed {:.1} MB \
         (zstd -1 of the overlay file: {:.1} MB)",
        overlay_bytes as f64 / 1e6,
        kept_bytes as f64 / 1e6,
        overlay_zstd as f64 / 1e6
    );

    // (a) B holds version 1: it rebuilds version 2 from the difference disk.
    let rebuilt = loop {
        check_interrupted()?;
        ensure!(
            published_at.elapsed() < PULL_TIMEOUT,
            "B did not get version 2 in time"
        );
        if let Some(line) = image_lines(&b.log(), "image rebuilt from a difference disk", V2).pop()
        {
            break line;
        }
        ensure!(
            image_lines(&b.log(), "image pulled", V2).is_empty(),
            "B pulled version 2 in full instead of rebuilding it: see {}",
            b.log().display()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let diff_since = published_at.elapsed().as_secs_f64();
    let diff_lo = lo()? - before_diff;
    let diff_own: f64 = field(&rebuilt, "seconds")?;
    let diff_wire: u64 = field(&rebuilt, "wire_bytes")?;
    wait_until(
        "B's record says it holds version 2",
        CONVERGE_TIMEOUT,
        || holds(&a, "b", V2),
    )?;
    ensure!(
        same_file(&b.volume_file(V2), &v2_file)?,
        "B's rebuilt version 2 differs"
    );
    println!(
        "(a) B rebuilt version 2: {diff_own:.2} s in its log, {diff_since:.2} s after publish-diff returned; \
         {diff_wire} bytes on the wire, loopback {:.1} MB; verified byte for byte",
        diff_lo as f64 / 1e6
    );
    check_interrupted()?;

    // (b) C, holding nothing, pulls version 2 in full from A alone (B is
    // stopped and removed from the grid first).
    let b_id = a
        .server_names()?
        .into_iter()
        .find_map(|(id, name)| (name == "b").then_some(id))
        .context("A does not list B")?;
    let mut b_server = cleanup.servers.pop().context("B was started last")?;
    b_server.stop();
    a.output(&["server", "remove", &b_id])?;
    let before_full = lo()?;
    let mut join = vec![
        "join".to_owned(),
        address(7441),
        "--token".to_owned(),
        a.token()?,
    ];
    join.extend(c.settings(&address(7443)));
    c.run(&join)?;
    let joined = Instant::now();
    cleanup.servers.push(Serving::start(&c)?);
    let full = wait_for_line(&c, "image pulled", V2)?;
    let full_since = joined.elapsed().as_secs_f64();
    let full_lo = lo()? - before_full;
    let full_own: f64 = field(&full, "seconds")?;
    let full_wire: u64 = field(&full, "wire_bytes")?;
    let full_sources = image_lines(&c.log(), "pull source", V2).len();
    ensure!(
        image_lines(&c.log(), "image pulled", V1).is_empty(),
        "C pulled version 1 too"
    );
    cleanup.stop_servers();
    ensure!(
        same_file(&c.volume_file(V2), &v2_file)?,
        "C's version 2 differs"
    );
    println!(
        "(b) C pulled version 2 in full from {full_sources} source(s): {full_own:.2} s in its log \
         ({full_since:.2} s after joining), {full_wire} bytes on the wire, loopback {:.1} MB \
         (join included); verified byte for byte",
        full_lo as f64 / 1e6
    );
    // The pools are done with: free their disk space for rsync's copies.
    remove_pools(&cleanup.pools);
    cleanup.pools.clear();
    check_interrupted()?;

    // (c) rsync's delta: version 1 at the receiver, version 2 sent.
    let module = root.join("rsync-module");
    std::fs::create_dir_all(&module)?;
    let target = module.join("image.raw");
    std::fs::copy(&v1_file, &target)?;
    std::fs::remove_file(&v1_file)?;
    let config = root.join("rsyncd.conf");
    std::fs::write(
        &config,
        format!(
            "pid file = {}\nuse chroot = no\n[image]\n  path = {}\n  read only = no\n  uid = root\n  gid = root\n",
            root.join("rsyncd.pid").display(),
            module.display()
        ),
    )?;
    let rsync = rsync.to_str().context("rsync's path is not UTF-8")?;
    let daemon = a
        .command(rsync)
        .args(["--daemon", "--no-detach", "--address", "127.0.0.1"])
        .arg(format!("--port={RSYNC_PORT}"))
        .arg(format!("--config={}", config.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    cleanup.servers.push(Serving::child("rsync daemon", daemon));
    let url = format!("rsync://127.0.0.1:{RSYNC_PORT}/image");
    wait_until("the rsync daemon listens", START_TIMEOUT, || {
        Ok(a.command(rsync)
            .arg(format!("{url}/"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?
            .success())
    })?;
    let before_rsync = lo()?;
    let rsync_started = Instant::now();
    let output = a
        .command(rsync)
        .args(["--inplace", "--no-whole-file", "--stats"])
        .arg(&v2_file)
        .arg(format!("{url}/image.raw"))
        .output()?;
    let rsync_seconds = rsync_started.elapsed().as_secs_f64();
    ensure!(
        output.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let rsync_lo = lo()? - before_rsync;
    let stats = String::from_utf8_lossy(&output.stdout).into_owned();
    let stat = |name: &str| -> anyhow::Result<u64> {
        let line = stats
            .lines()
            .find(|line| line.starts_with(name))
            .with_context(|| format!("no {name:?} in rsync's stats:\n{stats}"))?;
        let digits: String = line[name.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == ',' || *c == ' ')
            .filter(char::is_ascii_digit)
            .collect();
        Ok(digits.parse()?)
    };
    let (sent, received) = (stat("Total bytes sent:")?, stat("Total bytes received:")?);
    let (literal, matched) = (stat("Literal data:")?, stat("Matched data:")?);
    cleanup.stop_servers();
    ensure!(same_file(&target, &v2_file)?, "rsync's copy differs");
    println!(
        "(c) rsync --inplace --no-whole-file: {rsync_seconds:.2} s; sent {sent}, received {received} bytes \
         (literal data {literal}, matched {matched}); loopback {:.1} MB",
        rsync_lo as f64 / 1e6
    );

    let mb = |bytes: u64| bytes as f64 / 1e6;
    println!();
    println!(
        "Difference-disk update: {} MiB image, {} MiB changed in {} regions; overlay {:.1} MB, \
         kept zstd {:.1} MB, zstd -1 {:.1} MB; load average {} at end",
        options.size_mib,
        options.change_mib,
        options.regions,
        mb(overlay_bytes),
        mb(kept_bytes),
        mb(overlay_zstd),
        load_average()
    );
    println!();
    println!("| update path | wire MB (its own figure) | loopback MB (namespace's lo) | seconds (its own) | seconds (end to end) | wire / changed bytes |");
    println!("|---|---|---|---|---|---|");
    let changed = (options.change_mib * MIB) as f64;
    println!(
        "| (a) deskgrid difference disk, receiver holds v1 | {:.1} | {:.1} | {diff_own:.2} | {diff_since:.2} after publish-diff (which took {publish_seconds:.1}) | {:.2} |",
        mb(diff_wire),
        mb(diff_lo),
        diff_wire as f64 / changed
    );
    println!(
        "| (b) deskgrid full pull of v2, receiver holds nothing | {:.1} | {:.1} | {full_own:.2} | {full_since:.2} after joining | {:.2} |",
        mb(full_wire),
        mb(full_lo),
        full_wire as f64 / changed
    );
    println!(
        "| (c) rsync --inplace --no-whole-file, receiver holds v1 | {:.1} (sent {:.1} + received {:.1}) | {:.1} | — | {rsync_seconds:.2} | {:.2} |",
        mb(sent + received),
        mb(sent),
        mb(received),
        mb(rsync_lo),
        (sent + received) as f64 / changed
    );
    println!(
        "Own figures: deskgrid's `wire_bytes` (compressed payload, no QUIC/TLS framing) and `seconds`; \
         rsync's Total bytes sent + received. Loopback counts every byte the namespace moved in \
         that phase, both directions, headers and gossip included."
    );
    println!(
        "ratios: (a)/(b) wire {:.3}, time {:.2}; (a)/(c) wire {:.2}, time {:.2}; \
         (a) wire / kept zstd overlay {:.3}",
        diff_wire as f64 / full_wire as f64,
        diff_own / full_own,
        diff_wire as f64 / (sent + received) as f64,
        diff_own / rsync_seconds,
        diff_wire as f64 / kept_bytes as f64
    );
    Ok(())
}

/// The update: `n` regions of `total / n` bytes, one in each of `n` equal
/// stripes of the image at a pseudo-random 64 KiB-aligned place. Each is
/// three quarters new file content (bytes of files under /usr, each plus
/// one, so they compress like file content but match nothing already in
/// the image) and a quarter random bytes.
fn update_regions(size: usize, total: usize, n: usize) -> anyhow::Result<Vec<(usize, Vec<u8>)>> {
    const ALIGN: usize = 64 * 1024;
    let length = total / n / ALIGN * ALIGN;
    let stripe = size / n;
    ensure!(stripe >= length, "the regions do not fit the image");
    let corpus = file_corpus(total)?;
    let mut next = xorshift(0x5851_f42d_4c95_7f2d);
    let mut corpus_at = 0;
    let mut regions = Vec::with_capacity(n);
    for index in 0..n {
        let slack = (stripe - length) / ALIGN;
        let offset = index * stripe + (next() as usize % (slack + 1)) * ALIGN;
        let mut bytes = vec![0u8; length];
        let text = length / 4 * 3;
        for byte in &mut bytes[..text] {
            *byte = corpus[corpus_at % corpus.len()].wrapping_add(1);
            corpus_at += 1;
        }
        for word in bytes[text..].chunks_mut(8) {
            word.copy_from_slice(&next().to_le_bytes()[..word.len()]);
        }
        regions.push((offset, bytes));
    }
    Ok(regions)
}

/// Waits for `member`'s log line `message` about `image`; fails on a pull
/// that stopped first.
fn wait_for_line(
    member: &Member,
    message: &str,
    image: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let deadline = Instant::now() + PULL_TIMEOUT;
    loop {
        check_interrupted()?;
        if let Some(line) = image_lines(&member.log(), message, image).pop() {
            return Ok(line);
        }
        ensure!(
            image_lines(
                &member.log(),
                "pull stopped before the image was complete",
                image
            )
            .is_empty(),
            "{}'s pull of {image} stopped: see {}",
            member.name,
            member.log().display()
        );
        ensure!(
            Instant::now() < deadline,
            "{} did not get {image} in time",
            member.name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `asking` lists server `name` among the complete holders of `version`.
fn holds(asking: &Member, name: &str, version: &str) -> anyhow::Result<bool> {
    let images = asking.json(&["image", "list"])?;
    Ok(images.as_array().is_some_and(|images| {
        images.iter().any(|image| {
            image["id"] == version
                && image["complete_on"]
                    .as_array()
                    .is_some_and(|holders| holders.iter().any(|holder| holder["name"] == name))
        })
    }))
}
