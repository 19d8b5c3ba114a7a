//! Image transfer between real servers: three `deskgrid serve` processes on
//! 127.0.0.1 (QUIC, mutual TLS) with their own libvirt pools on
//! `qemu:///system`, the real planner and policy loops.
//!
//! Server A holds a 512 MiB disk-like image (zero regions, text-like and
//! random data) as a real raw volume. `template create --replicas 2` makes
//! B pull it from A; B is killed (SIGKILL) half-way, restarted, and resumes:
//! it fetches what was missing plus at most one chunk per stream. B comes
//! back with the test-only fault hook on (`DESKGRID_TEST_CORRUPT_CHUNKS`):
//! it corrupts every 8th chunk it serves. `--replicas 3` makes C pull from
//! A and B at once: both serve chunks, B's corrupt chunks are caught and
//! fetched from A, B is reported. Every copy is compared byte for byte with
//! A's volume file, and the pull rates are printed.
//!
//! Slow-ish (about 20-40 s on a 2-core machine): half a gigabyte moves three
//! times through libvirt streams and QUIC. It runs in the suite because only
//! real processes, sockets and pools show that a pull survives a SIGKILL.
//! A host without libvirtd fails the test (run `bash scripts/setup-host.sh`).
//!
//! [`Cleanup`] stops the servers and removes the pools and directories
//! whatever happens.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/pool_grid.rs"]
mod pool_grid;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::free_udp_port;
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::{DomainKind, Hypervisor, VolumeFormat};
use deskgrid::appliance::data_dir::DataDir;
use deskgrid::model::{BaseImage, ImageHolding, ImageState, ImageVersionId};
use deskgrid::service::GridService;
use deskgrid::state::ConfigValue;
use deskgrid::transfer::manifest::{manifest_of, DEFAULT_CHUNK_SIZE};
use deskgrid::transfer::progress::ProgressFile;
use deskgrid::transfer::{ChunkEntry, Manifest, ManifestStore};
use pool_grid::{
    disk_like_image, field, log_lines, strings, token, wait_until, Cleanup, Member, Serving, MIB,
    URI,
};
use serde_json::Value;

/// Large enough that B is still pulling when the test sees it half-way
/// (the progress file is polled every 10 ms), small enough for the budget.
const IMAGE_BYTES: usize = 512 * MIB;
const IMAGE: &str = "office-v1";
const CORRUPT_EVERY: &str = "8";
/// Requests in flight per source (`PullSettings::streams_per_source`).
const STREAMS_PER_SOURCE: u64 = 4;
/// Generous bounds for a loaded 2-core machine; a healthy run takes a
/// fraction of each.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
const PULL_TIMEOUT: Duration = Duration::from_secs(90);

/// Puts `data` into A's pool as the raw base volume, keeps its manifest and
/// registers the version as held complete by A (what a finished import
/// does; the import command is another piece of work).
fn seed_image(member: &Member, data: &[u8]) -> Manifest {
    let host = LibvirtHypervisor::connect(LibvirtOptions {
        uri: URI.to_owned(),
        pool: member.pool.clone(),
        pool_path: member.pool_path.display().to_string(),
        domain_kind: Some(DomainKind::Qemu),
        streams_only: false,
    })
    .unwrap();
    host.ensure_pool().unwrap();
    let image = ImageVersionId::new(IMAGE).unwrap();
    host.import_base_image(
        &image,
        VolumeFormat::Raw,
        data.len() as u64,
        &mut &data[..],
        &mut |_| {},
    )
    .unwrap();
    let manifest = manifest_of(data, DEFAULT_CHUNK_SIZE).unwrap();
    let dir = DataDir::new(&member.data_dir);
    ManifestStore::new(dir.transfer_dir().join("manifests"))
        .save(&image, &manifest)
        .unwrap();
    let (mut service, _) = GridService::open(dir.server_id().unwrap(), &dir.state_dir()).unwrap();
    service
        .write(ConfigValue::Image(BaseImage {
            id: image.clone(),
            digest: Some(manifest.root_digest()),
            virtual_size: data.len() as u64,
            parent: None,
            state: ImageState::Ready,
        }))
        .unwrap();
    service
        .update_own_record(&mut |record| {
            record.images.insert(image.clone(), ImageHolding::Complete);
        })
        .unwrap();
    manifest
}

fn data_chunks(manifest: &Manifest) -> Vec<u64> {
    manifest.data_chunks().collect()
}

/// The data chunks whose bytes in `file` are the image's.
fn chunks_in_file(file: &Path, data: &[u8], manifest: &Manifest) -> Vec<u64> {
    let copy = std::fs::read(file).unwrap_or_default();
    manifest
        .data_chunks()
        .filter(|index| {
            let (offset, length) = manifest.chunk_range(*index).unwrap();
            let range = offset as usize..(offset + length) as usize;
            copy.get(range.clone()) == Some(&data[range])
        })
        .collect()
}

/// The data chunks `member`'s progress file records as written.
fn chunks_recorded(member: &Member, manifest: &Manifest) -> Vec<u64> {
    let transfer_dir = DataDir::new(&member.data_dir).transfer_dir();
    let image = ImageVersionId::new(IMAGE).unwrap();
    let Ok(Some(bitmap)) = ProgressFile::new(&transfer_dir, &image)
        .load(&manifest.root_digest(), manifest.chunks.len() as u64)
    else {
        return Vec::new();
    };
    manifest
        .data_chunks()
        .filter(|index| bitmap.get(*index))
        .collect()
}

/// The `pull source` lines of the attempt that completed the pull, and its
/// `image pulled` line.
fn completed_pull(log: &Path) -> (Vec<BTreeMap<String, String>>, BTreeMap<String, String>) {
    let mut sources = Vec::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let fields = || {
            line.split_whitespace()
                .filter_map(|field| field.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        if line.contains("pulling image") {
            sources.clear();
        } else if line.contains("pull source") {
            sources.push(fields());
        } else if line.contains("image pulled") {
            return (sources, fields());
        }
    }
    panic!("no completed pull in {}", log.display());
}

fn assert_same_bytes(member: &Member, data: &[u8]) {
    let copy = std::fs::read(member.volume_file(IMAGE)).unwrap();
    assert!(
        copy == data,
        "{}'s volume differs from A's ({} bytes vs {})",
        member.name,
        copy.len(),
        data.len()
    );
}

#[test]
fn pulls_from_every_holder_resume_after_sigkill_and_refetch_corrupt_chunks() {
    let test_started = Instant::now();
    let suffix = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-transfer-grid-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().to_owned();
    let [a, b, c] = ["a", "b", "c"].map(|name| Member::new(&root, &suffix, name));
    let mut cleanup = Cleanup {
        servers: Vec::new(),
        pools: vec![a.pool.clone(), b.pool.clone(), c.pool.clone()],
        dir: Some(dir),
    };

    // A: a new grid holding the image.
    let address_a = format!("127.0.0.1:{}", free_udp_port());
    let password = root.join("admin-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let mut init = strings(&[
        "init",
        "--new-grid",
        "--admin-password-file",
        &password.display().to_string(),
    ]);
    init.extend(a.settings(&address_a));
    a.run(&init);
    let data = disk_like_image(IMAGE_BYTES);
    let manifest = seed_image(&a, &data);
    let all_data = data_chunks(&manifest);
    let n_data = all_data.len() as u64;
    let n_zero = manifest
        .chunks
        .iter()
        .filter(|entry| **entry == ChunkEntry::Zero)
        .count();
    let (_, wire) = deskgrid::transfer::codec::encode(&data[..16 * MIB]);
    eprintln!(
        "image: {} MiB, {} chunks of {} MiB: {n_zero} all-zero, {n_data} with data ({} MiB); \
         zstd -1 ratio of the first 16 MiB {:.2}; seeded in {:.1} s",
        IMAGE_BYTES / MIB,
        manifest.chunks.len(),
        DEFAULT_CHUNK_SIZE as usize / MIB,
        manifest.data_bytes() / MIB as u64,
        (16 * MIB) as f64 / wire.len() as f64,
        test_started.elapsed().as_secs_f64()
    );
    cleanup.servers.push(Serving::start(&a, &a.log(1), &[]));

    // B joins and is told to hold the image.
    let address_b = format!("127.0.0.1:{}", free_udp_port());
    let mut join = strings(&["join", &address_a, "--token", &token(&a)]);
    join.extend(b.settings(&address_b));
    b.run(&join);
    cleanup.servers.push(Serving::start(&b, &b.log(1), &[]));
    wait_until("A and B see each other", CONVERGE_TIMEOUT, || {
        a.sees("b").0 == "alive" && b.sees("a").0 == "alive"
    });
    a.run(&strings(&[
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
    ]));

    // Half-way, B is killed.
    let pull_started = Instant::now();
    let deadline = Instant::now() + PULL_TIMEOUT;
    while (chunks_recorded(&b, &manifest).len() as u64) * 3 < n_data {
        assert!(Instant::now() < deadline, "B's pull made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
    cleanup.servers[1].kill();
    let killed_after = pull_started.elapsed();
    let recorded = chunks_recorded(&b, &manifest);
    let written = chunks_in_file(&b.volume_file(IMAGE), &data, &manifest);
    eprintln!(
        "B killed {:.1} s into its pull: {} data chunks written, {} recorded, {} missing",
        killed_after.as_secs_f64(),
        written.len(),
        recorded.len(),
        n_data - written.len() as u64
    );
    assert!(
        (recorded.len() as u64) < n_data,
        "B finished before it was killed: make the image larger"
    );
    for index in &recorded {
        assert!(
            written.contains(index),
            "chunk {index} is recorded but not in the volume"
        );
    }
    let written_not_recorded = (written.len() - recorded.len()) as u64;
    assert!(
        written_not_recorded <= STREAMS_PER_SOURCE,
        "{written_not_recorded} chunks written but not recorded, one source has {STREAMS_PER_SOURCE} streams"
    );

    // B comes back, with the fault hook on, and finishes the pull.
    let restarted = Instant::now();
    cleanup.servers[1] = Serving::start(
        &b,
        &b.log(2),
        &[(deskgrid::appliance::TEST_CORRUPT_CHUNKS_ENV, CORRUPT_EVERY)],
    );
    wait_until("B holds the image complete", PULL_TIMEOUT, || {
        b.sees("b").1 == 1
    });
    eprintln!(
        "B complete {:.1} s after its restart",
        restarted.elapsed().as_secs_f64()
    );
    assert_same_bytes(&b, &data);
    let starts = log_lines(&b.log(2), "pulling image");
    assert!(!starts.is_empty(), "B's second run did not pull");
    assert_eq!(
        field(&starts[0], "chunks_already_here"),
        recorded.len() as u64,
        "the resumed pull starts from the progress file"
    );
    let ends: Vec<_> = ["image pulled", "pull stopped"]
        .iter()
        .flat_map(|message| log_lines(&b.log(2), message))
        .collect();
    let fetched_after_restart: u64 = ends.iter().map(|end| field(end, "chunks_fetched")).sum();
    let missing_at_kill = n_data - written.len() as u64;
    eprintln!(
        "B after its restart: fetched {fetched_after_restart} chunks; {missing_at_kill} were missing at the kill, \
         {} streams: at most {} allowed",
        STREAMS_PER_SOURCE,
        missing_at_kill + STREAMS_PER_SOURCE
    );
    assert!(fetched_after_restart >= missing_at_kill);
    assert!(
        fetched_after_restart <= missing_at_kill + STREAMS_PER_SOURCE,
        "fetched {fetched_after_restart}, missing {missing_at_kill}"
    );
    let b_rate = log_lines(&b.log(2), "image pulled");
    let b_id = b.status()["server_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let a_id = a.status()["server_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    // C joins; with three replicas wanted it pulls from A and B at once.
    let address_c = format!("127.0.0.1:{}", free_udp_port());
    let mut join = strings(&["join", &address_a, "--token", &token(&a)]);
    join.extend(c.settings(&address_c));
    c.run(&join);
    cleanup.servers.push(Serving::start(&c, &c.log(1), &[]));
    wait_until("C sees A and B alive", CONVERGE_TIMEOUT, || {
        c.sees("a").0 == "alive" && c.sees("b").0 == "alive"
    });
    let c_started = Instant::now();
    a.run(&strings(&["template", "set", "office", "--replicas", "3"]));
    // Every admin sees the pull in progress: A's status shows C's transfer.
    let mut seen_transfer: Option<Value> = None;
    wait_until("C holds the image complete", PULL_TIMEOUT, || {
        let status = a.status();
        let Some(server) = status["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|server| server["name"] == "c")
            .cloned()
        else {
            return false;
        };
        if seen_transfer.is_none() {
            seen_transfer = server["transfers"].get(IMAGE).cloned();
        }
        server["images_complete"] == 1
    });
    let transfer = seen_transfer.expect("A's status never showed C's pull in progress");
    let mut transfer_sources: Vec<&str> = transfer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap())
        .collect();
    transfer_sources.sort_unstable();
    assert_eq!(transfer_sources, ["a", "b"], "{transfer:#}");
    assert_eq!(transfer["bytes_total"], manifest.data_bytes());
    assert!(c.status()["servers"]
        .as_array()
        .unwrap()
        .iter()
        .all(|server| server["transfers"].as_object().unwrap().is_empty()));
    eprintln!(
        "C complete {:.1} s after --replicas 3",
        c_started.elapsed().as_secs_f64()
    );
    assert_same_bytes(&c, &data);

    let (sources, pulled) = completed_pull(&c.log(1));
    let by_peer = |id: &str| {
        sources
            .iter()
            .find(|source| source.get("peer").map(String::as_str) == Some(id))
            .cloned()
            .unwrap_or_else(|| panic!("no pull source line for {id} in {sources:?}"))
    };
    let (from_a, from_b) = (by_peer(&a_id), by_peer(&b_id));
    eprintln!("C's sources: A {from_a:?}; B {from_b:?}");
    assert!(field(&from_a, "chunks") > 0, "A served C nothing");
    assert!(field(&from_b, "chunks") > 0, "B served C nothing");
    assert_eq!(
        field(&pulled, "chunks_already_here") + field(&from_a, "chunks") + field(&from_b, "chunks"),
        n_data,
        "every data chunk once"
    );
    assert_eq!(field(&from_a, "bad_chunks"), 0);
    // Every bad chunk, in whichever attempt, was B's and was reported.
    let b_bad: u64 = log_lines(&c.log(1), "pull source")
        .iter()
        .filter(|source| source.get("peer") == Some(&b_id))
        .map(|source| field(source, "bad_chunks"))
        .sum();
    assert!(b_bad >= 1, "B's corrupt chunks were not caught");
    let reported = log_lines(&c.log(1), "bad chunk from holder");
    assert!(
        reported.iter().all(|line| line.get("peer") == Some(&b_id)),
        "only B is reported: {reported:?}"
    );
    assert_eq!(reported.len() as u64, b_bad);
    let corrupted = log_lines(&b.log(2), "test fault hook: serving a corrupted chunk");
    assert_eq!(
        corrupted.len() as u64,
        b_bad,
        "every corrupt chunk B served was caught"
    );
    let dropped = log_lines(&c.log(1), "holder dropped for this pull");
    eprintln!(
        "B served {} corrupt chunk(s), C caught {b_bad}; B dropped from the pull: {}",
        corrupted.len(),
        !dropped.is_empty()
    );

    for (name, log) in [("B (resumed)", b.log(2)), ("C (from A and B)", c.log(1))] {
        for done in log_lines(&log, "image pulled") {
            eprintln!(
                "{name}: {} chunks, {} MB in {} s = {} MB/s, {} MB on the wire",
                field(&done, "chunks_fetched"),
                field(&done, "bytes_fetched") / 1_000_000,
                done["seconds"],
                done["rate_mb_s"],
                field(&done, "wire_bytes") / 1_000_000
            );
        }
    }
    assert!(!b_rate.is_empty());

    for server in cleanup.servers.iter_mut() {
        server.stop();
    }
    eprintln!("whole test: {:.1} s", test_started.elapsed().as_secs_f64());
}
