//! Difference disks between real servers: two `deskgrid serve` processes
//! on 127.0.0.1 (QUIC, mutual TLS) with their own libvirt pools on
//! `qemu:///system`, the real planner and policy loops, real `qemu-img`.
//!
//! A imports a 256 MiB disk-like parent (`deskgrid image import`); with
//! `--replicas 2` B pulls it in full. On A, an admin's update is a qcow2
//! overlay on the parent's volume file with 16 MiB of half text-like, half
//! random bytes written into it (`qemu-io`); `deskgrid image publish-diff` makes it version 2, and
//! `template set --image` makes B get it: B holds the parent, so it fetches
//! only the compressed overlay, rebuilds the version and verifies its
//! digest. B's volume must equal A's byte for byte, and the bytes on the
//! wire must be the compressed overlay's (the ratio to the full version's
//! data bytes is printed). Then version 3 is published the same way on
//! version 2, and A's kept difference disk is corrupted (test-only: one
//! byte of the overlay's written data flipped, recompressed so it still
//! decompresses): B's digest check catches it, B falls back to the full
//! pull and still ends with A's bytes.
//!
//! About 15-30 s on a 2-core machine (a quarter gigabyte imported, pulled
//! once in full, two versions rebuilt and one pulled in full). It runs in
//! the suite because only real `qemu-img`, pools and processes show that a
//! rebuilt version verifies against the digest computed where it was
//! published. A host without libvirtd fails the test (run
//! `bash scripts/setup-host.sh`).

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/pool_grid.rs"]
mod pool_grid;

use std::fs::File;
use std::io::Read as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{deskgrid, free_udp_port, stderr};
use deskgrid::appliance::data_dir::DataDir;
use pool_grid::{
    disk_like_image, field, log_lines, strings, token, wait_until, Cleanup, Member, Serving, MIB,
};
use serde_json::Value;

/// Disk-like and big enough that a full copy clearly costs more than the
/// overlay, small enough for the budget.
const IMAGE_BYTES: usize = 256 * MIB;
const V1: &str = "office-v1";
const V2: &str = "office-v2";
const V3: &str = "office-v3";
/// Where the updates write: 4 MiB at each of four places (16 MiB).
const WRITES: [(usize, usize); 4] = [
    (8 * MIB, 4 * MIB),
    (70 * MIB + 4096, 4 * MIB),
    (150 * MIB, 4 * MIB),
    (250 * MIB, 4 * MIB),
];
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
const PULL_TIMEOUT: Duration = Duration::from_secs(90);

/// Whether `member` holds `version` complete, as `image list` says.
fn holds(member: &Member, version: &str) -> bool {
    let output = deskgrid(&member.data_dir, &["--output", "json", "image", "list"]);
    assert!(output.status.success(), "image list: {}", stderr(&output));
    let images: Value = serde_json::from_slice(&output.stdout).unwrap();
    images.as_array().unwrap().iter().any(|image| {
        image["id"] == version
            && image["complete_on"]
                .as_array()
                .unwrap()
                .iter()
                .any(|holder| holder["name"] == member.name)
    })
}

fn tool(program: &str, arguments: &[&str]) {
    let output = Command::new(program).args(arguments).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What an update writes: `Some(byte)` fills with it (easy to find in the
/// overlay), `None` writes disk-like bytes (half text-like, half random),
/// so the compressed overlay's size means something.
type Content = Option<u8>;

/// An admin's update on A: a qcow2 overlay on `parent`'s volume file with
/// `content` written at [`WRITES`]; then `publish-diff`. Returns the report.
fn publish_update(a: &Member, root: &Path, parent: &str, version: &str, content: Content) -> Value {
    let overlay = root.join(format!("{version}.qcow2"));
    let backing = a.volume_file(parent).display().to_string();
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
            &backing,
            &overlay_name,
        ],
    );
    let source = root.join("update-data");
    for (offset, length) in WRITES {
        let write = match content {
            Some(byte) => format!("write -P {byte:#04x} {offset} {length}"),
            None => {
                let mut bytes = b"usr share locale font icon python3 lib systemd unit "
                    .repeat(length / 2 / 50 + 1);
                bytes.truncate(length / 2);
                let mut random = vec![0u8; length - bytes.len()];
                File::open("/dev/urandom")
                    .unwrap()
                    .read_exact(&mut random)
                    .unwrap();
                bytes.extend(random);
                std::fs::write(&source, &bytes).unwrap();
                format!("write -s {} {offset} {length}", source.display())
            }
        };
        tool("qemu-io", &["-f", "qcow2", "-c", &write, &overlay_name]);
    }
    let output = deskgrid(
        &a.data_dir,
        &[
            "--output",
            "json",
            "image",
            "publish-diff",
            &overlay_name,
            "--parent",
            parent,
            "--name",
            version,
        ],
    );
    assert!(output.status.success(), "publish-diff: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

fn assert_same_volumes(a: &Member, b: &Member, version: &str) {
    let on_a = std::fs::read(a.volume_file(version)).unwrap();
    let on_b = std::fs::read(b.volume_file(version)).unwrap();
    assert!(
        on_a == on_b,
        "B's {version} differs from A's ({} bytes vs {})",
        on_b.len(),
        on_a.len()
    );
}

/// Flips one byte of the update's written data inside A's kept difference
/// disk and compresses it again, so it still decompresses and only the
/// digest check can tell.
fn corrupt_kept_diff(a: &Member, version: &str, pattern: u8) {
    let path = DataDir::new(&a.data_dir)
        .transfer_dir()
        .join("diffs")
        .join(format!("{version}.qcow2.zst"));
    let compressed = std::fs::read(&path).unwrap();
    let mut overlay = zstd::decode_all(&compressed[..]).unwrap();
    let run = vec![pattern; 4096];
    let at = overlay
        .windows(run.len())
        .position(|window| window == &run[..])
        .expect("the overlay holds the written pattern");
    overlay[at + 100] ^= 0xff;
    std::fs::write(&path, zstd::encode_all(&overlay[..], 3).unwrap()).unwrap();
}

#[test]
fn a_version_published_as_a_difference_disk_travels_as_its_overlay_and_is_verified() {
    let test_started = Instant::now();
    let suffix = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-transfer-diff-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().to_owned();
    let [a, b] = ["a", "b"].map(|name| Member::new(&root, &suffix, name));
    let mut cleanup = Cleanup {
        servers: Vec::new(),
        pools: vec![a.pool.clone(), b.pool.clone()],
        dir: Some(dir),
    };

    // A: a new grid; the parent imported.
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
    cleanup.servers.push(Serving::start(&a, &a.log(1), &[]));
    let parent_file = root.join("parent.raw");
    std::fs::write(&parent_file, disk_like_image(IMAGE_BYTES)).unwrap();
    let output = deskgrid(
        &a.data_dir,
        &[
            "--output",
            "json",
            "image",
            "import",
            &parent_file.display().to_string(),
            "--name",
            V1,
        ],
    );
    assert!(output.status.success(), "import: {}", stderr(&output));
    let imported: Value = serde_json::from_slice(&output.stdout).unwrap();
    std::fs::remove_file(&parent_file).unwrap();

    // B joins and pulls the parent in full.
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
        V1,
        "--vcpus",
        "1",
        "--memory",
        "256",
        "--desired",
        "0",
        "--replicas",
        "2",
    ]));
    wait_until("B holds the parent", PULL_TIMEOUT, || holds(&b, V1));
    let full = log_lines(&b.log(1), "image pulled");
    assert_eq!(full.len(), 1, "{full:?}");
    let full_wire = field(&full[0], "wire_bytes");
    let full_data = imported["data_bytes"].as_u64().unwrap();
    eprintln!(
        "parent: {} MiB, {} MiB of data chunks; B's full pull moved {:.1} MiB on the wire ({:.1} s in)",
        IMAGE_BYTES / MIB,
        full_data / MIB as u64,
        full_wire as f64 / MIB as f64,
        test_started.elapsed().as_secs_f64()
    );

    // Version 2 published as a difference disk; B rebuilds it.
    let published = publish_update(&a, &root, V1, V2, None);
    let compressed = published["compressed_bytes"].as_u64().unwrap();
    let overlay_bytes = published["overlay_bytes"].as_u64().unwrap();
    assert_eq!(published["parent"], V1);
    let switched = Instant::now();
    a.run(&strings(&["template", "set", "office", "--image", V2]));
    wait_until("B holds version 2", PULL_TIMEOUT, || holds(&b, V2));
    assert_same_volumes(&a, &b, V2);
    let rebuilt = log_lines(&b.log(1), "image rebuilt from a difference disk");
    assert_eq!(
        rebuilt.len(),
        1,
        "B did not rebuild from the diff: {rebuilt:?}"
    );
    assert_eq!(rebuilt[0]["image"], V2);
    let wire = field(&rebuilt[0], "wire_bytes");
    assert_eq!(wire, compressed, "the compressed overlay, and nothing else");
    assert!(
        log_lines(&b.log(1), "image pulled").len() == 1,
        "version 2 was not pulled in full too"
    );
    let v2_data = field(&rebuilt[0], "data_bytes");
    eprintln!(
        "version 2: 16 MiB changed; overlay {:.1} MiB, {:.1} MiB zstd-compressed = {wire} bytes on the wire \
         ({:.1}% of the version's {:.1} MiB of data chunks, {:.1}% of the parent's full pull); \
         B had it {:.1} s after the switch",
        overlay_bytes as f64 / MIB as f64,
        compressed as f64 / MIB as f64,
        100.0 * wire as f64 / v2_data as f64,
        v2_data as f64 / MIB as f64,
        100.0 * wire as f64 / full_wire as f64,
        switched.elapsed().as_secs_f64()
    );
    assert!(
        wire * 4 < v2_data,
        "a diff must cost far less than the version"
    );

    // Version 3, whose kept difference disk on A is corrupt: B catches it
    // with the digest and pulls the full version.
    publish_update(&a, &root, V2, V3, Some(0xa5));
    corrupt_kept_diff(&a, V3, 0xa5);
    a.run(&strings(&["template", "set", "office", "--image", V3]));
    wait_until("B holds version 3", PULL_TIMEOUT, || holds(&b, V3));
    assert_same_volumes(&a, &b, V3);
    // At least once: a pull retried under load tries the diff again first.
    let log = std::fs::read_to_string(b.log(1)).unwrap();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("difference disk unusable"))
        .collect();
    assert!(!refusals.is_empty(), "B never refused the corrupt diff");
    for reason in &refusals {
        assert!(reason.contains("digest"), "{reason}");
    }
    assert_eq!(
        log_lines(&b.log(1), "image rebuilt from a difference disk").len(),
        1,
        "version 3 was not rebuilt"
    );
    let pulled = log_lines(&b.log(1), "image pulled");
    assert_eq!(
        pulled.len(),
        2,
        "version 3 came by the full pull: {pulled:?}"
    );
    assert!(!b.volume_file(V3).with_extension("raw").exists());

    for server in cleanup.servers.iter_mut() {
        server.stop();
    }
    eprintln!("whole test: {:.1} s", test_started.elapsed().as_secs_f64());
}
