//! `deskgrid image import` and `deskgrid image list` with the real binary, a
//! running `deskgrid serve` and a real libvirt (`qemu:///system`) with a
//! storage pool of each test's own.
//!
//! - A disk-like raw file (zero regions, text-like data, random data) goes
//!   into the pool byte for byte; the grid lists it ready, held complete by
//!   this server, under the digest this test computes over the file itself.
//!   A qcow2 made from the same file imports under the same digest: the
//!   digest names the virtual disk, not the file format.
//! - Refusals (a missing file, a duplicate version, files qemu-img cannot
//!   read or that are not disks, an image with a backing file, no running
//!   server) say why and leave nothing in the pool, the grid or the data
//!   directory.
//!
//! A host without libvirtd fails (run `bash scripts/setup-host.sh`); it
//! never skips. [`TestHost`] removes the pool, the server and the files
//! whatever happens.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{deskgrid, init_new_grid_with_pool, stderr, stdout, Server, START_TIMEOUT};
use rand::{Rng as _, SeedableRng as _};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use virt::connect::Connect;
use virt::storage_pool::StoragePool;

const URI: &str = "qemu:///system";
const MIB: usize = 1 << 20;
/// The manifest's chunk size (`transfer::manifest::DEFAULT_CHUNK_SIZE`).
const CHUNK: usize = 4 * MIB;

/// A data directory with a running server on a pool of its own. Fields drop
/// in order: the server stops before its pool and files go.
struct TestHost {
    server: Option<Server>,
    pool: PoolCleanup,
    data_dir: PathBuf,
    pool_path: PathBuf,
    dir: tempfile::TempDir,
}

impl TestHost {
    /// Initialised, not started.
    fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("deskgrid-images-{label}-"))
            .tempdir_in("/var/tmp")
            .unwrap();
        let pool = PoolCleanup {
            name: format!("dg-test-{label}-{:08x}", rand::random::<u32>()),
        };
        let data_dir = dir.path().join("data");
        let pool_path = dir.path().join("pool");
        init_new_grid_with_pool(&data_dir, "alpha", URI, &pool.name, &pool_path);
        Self {
            server: None,
            pool,
            data_dir,
            pool_path,
            dir,
        }
    }

    /// Starts the server and waits until it has the pool running (an import
    /// started at the same moment would race it to define the pool).
    fn serve(&mut self) {
        self.server = Some(Server::start(&self.data_dir));
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.pool.is_active() {
            assert!(
                Instant::now() < deadline,
                "the server did not start pool {} in time",
                self.pool.name
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn run(&self, arguments: &[&str]) -> std::process::Output {
        deskgrid(&self.data_dir, arguments)
    }

    fn import(&self, file: &Path, version: &str, json: bool) -> std::process::Output {
        let file = file.display().to_string();
        let mut arguments = vec!["image", "import", &file, "--name", version];
        if json {
            arguments.splice(0..0, ["--output", "json"]);
        }
        self.run(&arguments)
    }

    fn list(&self) -> Vec<Value> {
        let output = self.run(&["--output", "json", "image", "list"]);
        assert!(output.status.success(), "image list: {}", stderr(&output));
        serde_json::from_slice::<Value>(&output.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }

    fn listed_versions(&self) -> Vec<String> {
        self.list()
            .iter()
            .map(|image| image["id"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Files in the pool's directory.
    fn pool_files(&self) -> BTreeSet<String> {
        file_names(&self.pool_path)
    }

    /// What the imports left in `DATA_DIR/transfer/` and its manifests.
    fn transfer_files(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        let transfer = self.data_dir.join("transfer");
        (
            file_names(&transfer),
            file_names(&transfer.join("manifests")),
        )
    }
}

fn file_names(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(error) => panic!("cannot list {}: {error}", dir.display()),
    }
}

fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|item| (*item).to_owned()).collect()
}

/// Removes the test's pool with every volume in it when dropped, after a
/// failure too. Errors are ignored: the pool may never have been made.
struct PoolCleanup {
    name: String,
}

impl PoolCleanup {
    fn is_active(&self) -> bool {
        let Ok(mut connection) = Connect::open(Some(URI)) else {
            panic!("this test needs libvirtd at {URI}: run `bash scripts/setup-host.sh` as root");
        };
        let active = StoragePool::lookup_by_name(&connection, &self.name)
            .and_then(|pool| pool.is_active())
            .unwrap_or(false);
        let _ = connection.close();
        active
    }

    fn exists(&self) -> bool {
        let mut connection = Connect::open(Some(URI)).unwrap();
        let exists = StoragePool::lookup_by_name(&connection, &self.name).is_ok();
        let _ = connection.close();
        exists
    }
}

impl Drop for PoolCleanup {
    fn drop(&mut self) {
        if let Ok(mut connection) = Connect::open(Some(URI)) {
            if let Ok(pool) = StoragePool::lookup_by_name(&connection, &self.name) {
                let _ = pool.refresh(0);
                for volume in pool.list_all_volumes(0).unwrap_or_default() {
                    let _ = volume.delete(0);
                }
                let _ = pool.destroy();
                let _ = pool.undefine();
            }
            let _ = connection.close();
        }
    }
}

/// `len` bytes that look like a used OS disk: about a third zero regions,
/// half text-like file content, the rest random, in runs that do not line up
/// with chunks; megabytes 20-32 (when there are so many) are zero, so whole
/// chunks are too.
fn disk_like(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "the",
        "grid",
        "desktop",
        "libvirt",
        "image",
        "kernel",
        "config",
        "user",
        "server",
        "volume",
        "=",
        "true",
        "#include",
        "<stdio.h>",
        "0x7f",
        "return",
        "{",
        "}",
        "\n",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let run = rng.random_range(64 << 10..MIB + 1).min(len - at);
        let region = &mut data[at..at + run];
        match rng.random_range(0..6) {
            0 | 1 => {} // zeros
            2 => rng.fill(region),
            _ => {
                let mut text = Vec::with_capacity(run);
                while text.len() < run {
                    text.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
                    text.push(b' ');
                }
                region.copy_from_slice(&text[..run]);
            }
        }
        at += run;
    }
    if len >= 32 * MIB {
        data[20 * MIB..32 * MIB].fill(0);
    }
    data
}

/// The root digest of `data`'s manifest, computed here from the format's
/// definition (not with deskgrid's builder), with its zero-chunk count.
fn manifest_digest(data: &[u8]) -> (String, usize) {
    let mut root = Sha256::new();
    root.update(b"deskgrid manifest v1\0");
    root.update((data.len() as u64).to_le_bytes());
    root.update((CHUNK as u32).to_le_bytes());
    let mut zero_chunks = 0;
    for chunk in data.chunks(CHUNK) {
        if chunk.iter().all(|byte| *byte == 0) {
            zero_chunks += 1;
            root.update([0u8]);
        } else {
            root.update([1u8]);
            root.update(Sha256::digest(chunk));
        }
    }
    (
        format!("sha256:{}", hex::encode(root.finalize())),
        zero_chunks,
    )
}

fn qemu_img(arguments: &[&str]) {
    let output = Command::new("qemu-img").args(arguments).output().unwrap();
    assert!(
        output.status.success(),
        "qemu-img {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The version listed as `version`, checked to be ready under `digest`,
/// `size` bytes, held complete by this server alone and pulled by nobody.
fn assert_listed_ready(host: &TestHost, version: &str, digest: &str, size: usize) {
    let images = host.list();
    let image = images
        .iter()
        .find(|image| image["id"] == version)
        .unwrap_or_else(|| panic!("{version} is not listed: {images:?}"));
    assert_eq!(image["state"], "ready");
    assert_eq!(image["digest"], digest);
    assert_eq!(image["virtual_size"], size as u64);
    assert_eq!(image["parent"], Value::Null);
    let holders = image["complete_on"].as_array().unwrap();
    assert_eq!(holders.len(), 1, "{image}");
    assert_eq!(holders[0]["name"], "alpha");
    assert_eq!(holders[0]["this_server"], true);
    assert_eq!(image["pulling_on"], serde_json::json!([]));
}

#[test]
fn raw_and_qcow2_imports_land_in_the_pool_and_the_grid_under_one_digest() {
    let started = Instant::now();
    let mut host = TestHost::new("import");
    host.serve();
    let data = disk_like(7, 64 * MIB);
    let (digest, zero_chunks) = manifest_digest(&data);
    assert!((3..16).contains(&zero_chunks), "{zero_chunks} zero chunks");
    let raw = host.dir.path().join("disk.raw");
    std::fs::write(&raw, &data).unwrap();

    let output = host.import(&raw, "office-v1", true);
    assert!(output.status.success(), "import: {}", stderr(&output));
    let report: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("{error}: {}", stdout(&output)));
    eprintln!("raw import: {report}");
    assert_eq!(report["version"], "office-v1");
    assert_eq!(report["digest"], digest.as_str());
    assert_eq!(report["source_format"], "raw");
    assert_eq!(report["virtual_size"], data.len() as u64);
    assert_eq!(report["chunks"], 16);
    assert_eq!(report["zero_chunks"], zero_chunks);
    assert_eq!(
        report["data_bytes"],
        ((16 - zero_chunks) * CHUNK) as u64,
        "every data chunk is whole"
    );
    assert!(report["mb_per_second"].as_f64().unwrap() > 0.0);
    assert_listed_ready(&host, "office-v1", &digest, data.len());
    let volume = host.pool_path.join("dg-base-office-v1");
    assert_eq!(report["volume_path"], volume.display().to_string());
    assert!(
        std::fs::read(&volume).unwrap() == data,
        "the pool volume holds other bytes than the file"
    );

    // The same disk as qcow2: converted, and the same content digest.
    let qcow2 = host.dir.path().join("disk.qcow2");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        &raw.display().to_string(),
        &qcow2.display().to_string(),
    ]);
    let output = host.import(&qcow2, "office-v2", false);
    assert!(output.status.success(), "import: {}", stderr(&output));
    let line = stdout(&output);
    eprintln!("qcow2 import: {line}");
    assert!(
        line.starts_with("imported office-v2: 64.00 MiB from qcow2, ")
            && line.contains(&digest)
            && line.contains(" MB/s ("),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");
    assert_listed_ready(&host, "office-v2", &digest, data.len());
    assert!(std::fs::read(host.pool_path.join("dg-base-office-v2")).unwrap() == data);

    // The temporary raw file is gone; the manifests stay for serving.
    assert_eq!(
        host.transfer_files(),
        (
            names(&["manifests"]),
            names(&["office-v1.manifest", "office-v2.manifest"])
        )
    );
    let text_list = host.run(&["image", "list"]);
    assert!(text_list.status.success());
    eprintln!("{}", stdout(&text_list));
    assert!(stdout(&text_list).contains("alpha (this)"));
    eprintln!("total: {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
fn refused_imports_say_why_and_leave_nothing_behind() {
    let mut host = TestHost::new("refuse");
    host.serve();
    let raw = host.dir.path().join("small.raw");
    std::fs::write(&raw, disk_like(3, 4 * MIB)).unwrap();
    let output = host.import(&raw, "base-1", false);
    assert!(output.status.success(), "import: {}", stderr(&output));
    let pool_before = host.pool_files();
    assert_eq!(pool_before, names(&["dg-base-base-1"]));
    let transfer_before = host.transfer_files();

    let other = host.dir.path().join("other.raw");
    std::fs::write(&other, disk_like(4, 4 * MIB)).unwrap();
    let text = host.dir.path().join("notes.txt");
    std::fs::write(&text, "not a disk\n").unwrap();
    // qcow2's magic and a version no qemu-img knows.
    let bad_header = host.dir.path().join("bad.qcow2");
    let mut header = b"QFI\xfb\x00\x00\x00\x63".to_vec();
    header.resize(64 * 1024, 0);
    std::fs::write(&bad_header, header).unwrap();
    let overlay = host.dir.path().join("overlay.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &raw.display().to_string(),
        "-F",
        "raw",
        &overlay.display().to_string(),
    ]);

    let missing = host.dir.path().join("missing.raw");
    let cases: [(&Path, &str, &str); 5] = [
        (&missing, "base-2", "cannot read"),
        (
            &other,
            "base-1",
            "image version base-1 is already in the grid",
        ),
        (&text, "base-2", "not a whole number of 512-byte sectors"),
        (
            &bad_header,
            "base-2",
            "is not a disk image qemu-img can read: Could not open",
        ),
        (&overlay, "base-2", "refers to another file (backing file"),
    ];
    for (file, version, expected) in cases {
        let output = host.import(file, version, false);
        let message = stderr(&output);
        assert!(
            !output.status.success(),
            "{} was imported: {}",
            file.display(),
            stdout(&output)
        );
        assert!(
            message.starts_with("error: cannot import ") && message.contains(expected),
            "{}: {message}",
            file.display()
        );
        assert_eq!(message.lines().count(), 1, "{message}");
        assert_eq!(host.pool_files(), pool_before, "after {}", file.display());
        assert_eq!(host.transfer_files(), transfer_before);
        assert_eq!(host.listed_versions(), vec!["base-1".to_owned()]);
    }
    // JSON errors for scripts.
    let output = host.import(&missing, "base-2", true);
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(answer["error"].as_str().unwrap().contains("cannot read"));
}

#[test]
fn without_a_running_server_the_import_is_refused_before_any_work() {
    let host = TestHost::new("noserver");
    let raw = host.dir.path().join("disk.raw");
    std::fs::write(&raw, disk_like(5, 4 * MIB)).unwrap();
    let output = host.import(&raw, "base-1", false);
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains("no deskgrid server is running on")
            && message.contains("start one with `deskgrid serve"),
        "{message}"
    );
    assert!(
        !host.pool.exists(),
        "the refused import made the pool already"
    );
    assert!(host.pool_files().is_empty());
    assert_eq!(host.transfer_files(), (BTreeSet::new(), BTreeSet::new()));
    let output = host.run(&["image", "list"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("no deskgrid server is running on"));
}
