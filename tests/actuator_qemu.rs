//! The `Hypervisor` on a real host: `LibvirtHypervisor` against
//! `qemu:///system`, booting the tiny test guest (`tests/guest/`) under TCG.
//!
//! One test walks a VM's whole life on the host: a base image goes in through
//! the upload stream and comes back out byte for byte; chunks written out of
//! order land where they belong; three linked clones of the base boot, each
//! says hello with its own UUID on its own agent channel; a display ticket
//! reaches QEMU with its expiry; the guests power off on the ACPI button and
//! leave nothing behind.
//!
//! Slow (15-30 s on a 2-core machine): three guests boot under emulation.
//! It still runs in the suite because no fake can show that deskgrid's libvirt
//! calls work on a real host. A host without libvirtd fails the test (run
//! `bash scripts/setup-host.sh`); it never skips.
//!
//! A second, fast test writes chunks into a raw base volume of the `dir`
//! pool from several threads at once: on this host deskgrid writes the
//! volume's file itself, where libvirt's upload streams would refuse all but
//! one writer ("volume ... is still in use"). It also times the same writes
//! through streams; `DESKGRID_TEST_CHUNKS` sets how many 4 MiB chunks (16 by
//! default, to stay fast; 256 gives a 1 GiB measurement).
//!
//! Whatever happens, [`Cleanup`] removes the test's domains, volumes, pool and
//! directories, so a failed run leaves the host as it found it.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

#[path = "support/vnc_viewer.rs"]
mod vnc_viewer;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deskgrid::actuator::domain_xml::NetworkAttachment;
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::naming;
use deskgrid::actuator::{
    ActuatorError, DisplayEndpoint, DomainKind, DomainSpec, DomainState, GuestChannel, Hypervisor,
    ShutdownOutcome, VolumeFormat, VolumeName,
};
use deskgrid::model::{DisplayProtocol, ImageVersionId, Template, TemplateName, VmId};
use sha2::{Digest as _, Sha256};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;

const URI: &str = "qemu:///system";
const MIB: u64 = 1 << 20;
const N_VMS: usize = 3;
/// Three guests booting at once on two cores say hello 6-7 s after their
/// start under TCG on a quiet machine, and took up to 27 s while other
/// builds and guests competed for the cores. 90 s leaves room for a loaded
/// machine and still fails long before CI would time out.
const HELLO_WAIT: Duration = Duration::from_secs(90);
/// The guest powers off within a second of the ACPI button (busybox acpid).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const TICKET_VALID_FOR: Duration = Duration::from_secs(60);
/// Seconds between the clock reading in `set_display_ticket` and ours, plus
/// the whole-second rounding of `passwdValidTo`.
const TICKET_SLACK_SECONDS: u64 = 5;
/// Where Debian's libvirtd writes each domain's QEMU log.
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";
const HELLO_PREFIX: &str = "deskgrid-test-guest hello ";
/// How often the serial logs of silent guests are read for a kernel panic.
const SERIAL_LOG_POLL: Duration = Duration::from_secs(1);
/// What a panicking guest kernel prints (with `quiet` too).
const KERNEL_PANIC: &[u8] = b"Kernel panic";
/// Lines of a guest's serial log shown when it fails.
const SERIAL_TAIL_LINES: usize = 40;

/// Removes everything the test made on the host when dropped, after a
/// failure too: the domains of the test's VM ids with libvirt's QEMU logs of
/// them, the pool with every volume in it, and the temporary directory.
/// Errors are ignored: each step may find its object already gone.
struct Cleanup {
    pool: String,
    vms: Vec<VmId>,
    dir: Option<tempfile::TempDir>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(mut connection) = Connect::open(Some(URI)) {
            for vm in &self.vms {
                let name = naming::domain_name(*vm);
                if let Ok(domain) = Domain::lookup_by_name(&connection, &name) {
                    eprintln!("cleanup: removing leftover domain {name}");
                    let _ = domain.destroy();
                    let _ = domain.undefine();
                }
                // libvirt keeps a QEMU log per domain name forever; random
                // VM ids would pile up three files a run.
                let qemu_log = Path::new(QEMU_LOG_DIR).join(format!("{name}.log"));
                let _ = std::fs::remove_file(qemu_log);
            }
            if let Ok(pool) = StoragePool::lookup_by_name(&connection, &self.pool) {
                eprintln!("cleanup: removing leftover pool {}", self.pool);
                let _ = pool.refresh(0);
                for volume in pool.list_all_volumes(0).unwrap_or_default() {
                    let _ = volume.delete(0);
                }
                let _ = pool.destroy();
                let _ = pool.undefine();
            }
            let _ = connection.close();
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

#[test]
fn three_linked_clones_boot_and_answer_on_their_own_channels() {
    let test_started = Instant::now();
    let suffix = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-actuator-qemu-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir_path = dir.path().to_owned();
    let pool_path = dir_path.join("pool");
    let vms: Vec<VmId> = (0..N_VMS).map(|_| VmId::random()).collect();
    let cleanup = Cleanup {
        pool: format!("dg-test-{suffix}"),
        vms: vms.clone(),
        dir: Some(dir),
    };

    let host = connect(&cleanup.pool, &pool_path);
    let (libvirt_version, qemu_version) = host.versions().unwrap();
    eprintln!(
        "libvirt {libvirt_version}, QEMU {qemu_version}, pool {}",
        cleanup.pool
    );
    let image_path = guest_image();

    let pool = host.ensure_pool().unwrap();
    assert_eq!(Path::new(&pool.path), pool_path);
    assert!(
        pool_path.is_dir(),
        "ensure_pool builds the pool's directory"
    );
    assert_eq!(host.list_volumes().unwrap(), vec![]);

    short_import_leaves_nothing(&host);
    let image = ImageVersionId::new("test-guest-1").unwrap();
    let image_size = import_round_trip(&host, &image, &image_path);
    writes_out_of_order_land_in_place(&host);

    let template = Template {
        name: TemplateName::new("qemu-test").unwrap(),
        image: image.clone(),
        vcpus: 1,
        memory_mib: 256,
        desired_vms: N_VMS as u32,
        min_idle_vms: 0,
        min_replicas: 1,
        concurrency_percent: 0,
        kind: Default::default(),
        display: DisplayProtocol::Spice,
        monitors: 1,
    };
    let boot_password = random_secret("boot");
    for &vm in &vms {
        let overlay = host.create_linked_clone(vm, &image).unwrap();
        assert_eq!(overlay.name, VolumeName::Overlay(vm));
        assert_eq!(overlay.capacity_bytes, image_size);
        let mut spec = DomainSpec::for_template(
            &template,
            vm,
            DomainKind::Qemu,
            overlay.path,
            NetworkAttachment::None,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            boot_password.clone(),
        );
        spec.console_log = Some(serial_log(&dir_path, vm).to_string_lossy().into_owned());
        host.define_domain(&spec).unwrap();
        assert_eq!(host.domain_state(vm).unwrap(), DomainState::ShutOff);
    }

    let mut start_instants = Vec::new();
    for &vm in &vms {
        let started = Instant::now();
        host.start_domain(vm).unwrap();
        eprintln!(
            "VM {vm}: start_domain took {:.2} s",
            started.elapsed().as_secs_f64()
        );
        start_instants.push((vm, started));
    }
    let ours: Vec<_> = host
        .list_domains()
        .unwrap()
        .into_iter()
        .filter(|status| vms.contains(&status.vm))
        .collect();
    assert_eq!(ours.len(), N_VMS, "list_domains finds every VM: {ours:?}");
    for status in &ours {
        assert_eq!(status.template, template.name);
        assert_eq!(status.image, image);
        assert_eq!(status.state, DomainState::Running);
    }

    // Channels open only after every start and the listing: while a reader
    // waits in a blocking `recv`, other calls on the hypervisor's shared
    // libvirt connection stall until data arrives (seen with libvirt 9.0),
    // which would delay the later starts and skew their boot timings.
    let (hello_sender, hello_receiver) = mpsc::channel();
    for (vm, started) in start_instants {
        let channel = host.open_guest_channel(vm).unwrap();
        spawn_hello_reader(vm, channel, started, hello_sender.clone());
    }
    drop(hello_sender);

    wait_for_hello_lines(&vms, &hello_receiver, &dir_path);

    let mut connection = Connect::open(Some(URI)).unwrap();
    for &vm in &vms {
        display_ticket_reaches_qemu(&host, &connection, vm, &boot_password);
    }

    shut_down_and_remove(&host, &vms, &image);
    let pool = StoragePool::lookup_by_name(&connection, &cleanup.pool).unwrap();
    pool.destroy().unwrap();
    pool.undefine().unwrap();
    drop(pool);
    connection.close().unwrap();
    // `remove_dir`, not `remove_dir_all`: the pool's directory must be empty.
    std::fs::remove_dir(&pool_path).unwrap();
    drop(cleanup);
    assert!(!dir_path.exists());
    eprintln!("total: {:.1} s", test_started.elapsed().as_secs_f64());
}

/// Chunks written in [`concurrent_writes_reach_the_volume_file`]: the size
/// the transfer pull uses.
const CHUNK_LEN: usize = 4 * MIB as usize;
/// Chunks written there unless `DESKGRID_TEST_CHUNKS` says otherwise: 64 MiB,
/// written twice, takes well under a second.
const DEFAULT_TEST_CHUNKS: usize = 16;
/// Threads writing at once on the direct path.
const N_WRITERS: usize = 4;

#[test]
fn concurrent_writes_reach_the_volume_file() {
    let suffix = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-actuator-direct-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let pool_path = dir.path().join("pool");
    let cleanup = Cleanup {
        pool: format!("dg-test-{suffix}"),
        vms: Vec::new(),
        dir: Some(dir),
    };
    let host = connect(&cleanup.pool, &pool_path);
    let streams_only = connect(&cleanup.pool, &pool_path).with_streams_only();
    // Several connections ensure the same new pool at the same moment (a
    // server's host worker and policy loop do at start): all succeed.
    let extra: Vec<LibvirtHypervisor> =
        (0..2).map(|_| connect(&cleanup.pool, &pool_path)).collect();
    let start = std::sync::Barrier::new(2 + extra.len());
    std::thread::scope(|scope| {
        let ensuring: Vec<_> = [&host, &streams_only]
            .into_iter()
            .chain(&extra)
            .map(|each| {
                let start = &start;
                scope.spawn(move || {
                    start.wait();
                    each.ensure_pool()
                })
            })
            .collect();
        for ensured in ensuring {
            ensured.join().unwrap().unwrap();
        }
    });

    let n_chunks = std::env::var("DESKGRID_TEST_CHUNKS")
        .map_or(DEFAULT_TEST_CHUNKS, |value| value.parse().unwrap());
    let capacity = (n_chunks * CHUNK_LEN) as u64;
    let chunks: Vec<Vec<u8>> = (0..n_chunks)
        .map(|index| pattern(index as u8, CHUNK_LEN))
        .collect();

    // The stream path, one write at a time as it must, then the file from
    // one writer and from several at once (libvirt would refuse all but one
    // of their uploads), each into a volume of its own. Writers take every
    // n-th chunk in order, as the pull roughly does.
    let runs = [
        ("streams", &streams_only, 1),
        ("file", &host, 1),
        ("file", &host, N_WRITERS),
    ];
    let mut volumes = Vec::new();
    let mut timings = Vec::new();
    for (index, (path, writing_host, n_writers)) in runs.into_iter().enumerate() {
        let volume = base_volume(&host, &format!("{path}-{index}"), capacity);
        let started = Instant::now();
        thread::scope(|scope| {
            for writer in 0..n_writers {
                let (chunks, name) = (&chunks, &volume.name);
                scope.spawn(move || {
                    for index in (writer..n_chunks).step_by(n_writers) {
                        writing_host
                            .write_volume_at(name, (index * CHUNK_LEN) as u64, &chunks[index])
                            .unwrap();
                    }
                });
            }
        });
        let write_seconds = started.elapsed().as_secs_f64();
        // Also before the next run's clock starts, which would otherwise
        // wait for this run's dirty pages. `host` syncs the file: the stream
        // path has no sync of its own.
        let started = Instant::now();
        host.sync_volume(&volume.name).unwrap();
        timings.push(format!(
            "{path} with {n_writers} writer(s): {write_seconds:.3} s + {:.3} s sync",
            started.elapsed().as_secs_f64()
        ));
        volumes.push(volume);
    }
    eprintln!(
        "{n_chunks} chunks of {CHUNK_LEN} bytes: {}",
        timings.join("; ")
    );

    for volume in &volumes {
        // Every run gives the same volume, read back and in the file.
        for (index, data) in chunks.iter().enumerate() {
            let read = host
                .read_volume_at(&volume.name, (index * CHUNK_LEN) as u64, CHUNK_LEN as u64)
                .unwrap();
            assert!(read == *data, "{}: chunk {index} differs", volume.name);
        }
        let mut file = File::open(&volume.path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), capacity);
        let mut read = vec![0u8; CHUNK_LEN];
        for (index, data) in chunks.iter().enumerate() {
            file.read_exact(&mut read).unwrap();
            assert!(
                read == *data,
                "{}: chunk {index} differs in the file",
                volume.name
            );
        }
        // The stream path reads the file's bytes too.
        let tail = streams_only
            .read_volume_at(&volume.name, capacity - 100, 100)
            .unwrap();
        assert_eq!(tail[..], chunks[n_chunks - 1][CHUNK_LEN - 100..]);
        assert!(matches!(
            host.write_volume_at(&volume.name, capacity - 10, &[0; 11]),
            Err(ActuatorError::OutOfBounds { .. })
        ));
        assert!(matches!(
            host.read_volume_at(&volume.name, capacity - 10, 11),
            Err(ActuatorError::OutOfBounds { .. })
        ));
        assert!(matches!(
            host.write_volume_at(&volume.name, u64::MAX, &[0]),
            Err(ActuatorError::OutOfBounds { .. })
        ));
        host.delete_volume(&volume.name).unwrap();
    }
    drop(cleanup);
}

/// An empty raw base volume of `capacity` bytes named after `image`.
fn base_volume(
    host: &dyn Hypervisor,
    image: &str,
    capacity: u64,
) -> deskgrid::actuator::VolumeInfo {
    host.create_base_volume(
        &ImageVersionId::new(image).unwrap(),
        capacity,
        VolumeFormat::Raw,
    )
    .unwrap()
}

/// A libvirt on `qemu:///system` with the test's own pool, or a failure that
/// says how to get one.
fn connect(pool: &str, pool_path: &Path) -> LibvirtHypervisor {
    LibvirtHypervisor::connect(LibvirtOptions {
        uri: URI.to_owned(),
        pool: pool.to_owned(),
        pool_path: pool_path.to_string_lossy().into_owned(),
        domain_kind: Some(DomainKind::Qemu),
        streams_only: false,
    })
    .unwrap_or_else(|error| {
        panic!(
            "{error}\nthis test needs libvirtd with QEMU at {URI}: \
             run `bash scripts/setup-host.sh` as root"
        )
    })
}

/// libvirt's graphics events reach [`Hypervisor::watch_displays`] from a
/// real QEMU display and a real VNC viewer (`support/vnc_viewer.rs`): a
/// wrong password shows as a connection that never authenticates; the
/// right ticket as connected, authenticated and, when the viewer goes,
/// disconnected, each naming the viewer's own address and port; after the
/// watch is dropped nothing more arrives. The domain needs no guest: QEMU
/// serves the display from the firmware on (an empty disk), so this is fast.
#[test]
fn display_events_follow_a_real_vnc_viewer() {
    use deskgrid::actuator::{DisplayEvent, DisplayPhase};
    use std::net::SocketAddr;
    let suffix = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-actuator-display-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let pool_path = dir.path().join("pool");
    let vm = VmId::random();
    let cleanup = Cleanup {
        pool: format!("dg-test-display-{suffix}"),
        vms: vec![vm],
        dir: Some(dir),
    };
    let host = connect(&cleanup.pool, &pool_path);
    host.ensure_pool().unwrap();
    let image = ImageVersionId::new("display-test-1").unwrap();
    base_volume(&host, "display-test-1", 16 * MIB);
    let overlay = host.create_linked_clone(vm, &image).unwrap();
    let template = Template {
        name: TemplateName::new("display-test").unwrap(),
        image: image.clone(),
        vcpus: 1,
        memory_mib: 64,
        desired_vms: 1,
        min_idle_vms: 0,
        min_replicas: 1,
        concurrency_percent: 0,
        kind: deskgrid::model::TemplateKind::Pooled,
        display: DisplayProtocol::Vnc,
        monitors: 1,
    };
    let spec = DomainSpec::for_template(
        &template,
        vm,
        DomainKind::Qemu,
        overlay.path,
        NetworkAttachment::None,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        "locked".to_owned(),
    );
    host.define_domain(&spec).unwrap();

    let (events, received) = mpsc::channel::<DisplayEvent>();
    let events = std::sync::Mutex::new(events);
    let watch = host
        .watch_displays(Box::new(move |event| {
            let _ = events.lock().unwrap().send(event);
        }))
        .unwrap();
    assert!(watch.is_alive());
    host.start_domain(vm).unwrap();
    let ticket = "t1cket42";
    let endpoint = host
        .set_display_ticket(vm, ticket, TICKET_VALID_FOR)
        .unwrap();
    let address: SocketAddr = format!("127.0.0.1:{}", endpoint.port).parse().unwrap();
    // Collects this VM's events until `until` says enough or `wait` passed.
    let collect_for = |wait: Duration, until: &dyn Fn(&[DisplayEvent]) -> bool| {
        let deadline = Instant::now() + wait;
        let mut seen = Vec::new();
        while !until(&seen) && Instant::now() < deadline {
            if let Ok(event) = received.recv_timeout(Duration::from_millis(50)) {
                if event.vm == vm {
                    seen.push(event);
                }
            }
        }
        seen
    };
    let collect =
        |until: &dyn Fn(&[DisplayEvent]) -> bool| collect_for(Duration::from_secs(10), until);
    let phases = |seen: &[DisplayEvent], client: &str| -> Vec<DisplayPhase> {
        seen.iter()
            .filter(|event| event.client == client)
            .map(|event| event.phase)
            .collect()
    };

    // A wrong password: connected, refused, gone; never authenticated.
    match vnc_viewer::attach(address, "wrong-pw") {
        Err(refused @ vnc_viewer::VncError::Refused(_)) => eprintln!("{refused}"),
        other => panic!("a wrong password must be refused: {other:?}"),
    }
    let seen = collect(&|seen| seen.iter().any(|e| e.phase == DisplayPhase::Disconnected));
    assert_eq!(
        seen.iter().map(|event| event.phase).collect::<Vec<_>>(),
        vec![DisplayPhase::Connected, DisplayPhase::Disconnected],
        "{seen:?}"
    );

    // The ticket: connected, authenticated, then disconnected when the
    // viewer closes, all for the viewer's own address.
    let viewer = vnc_viewer::attach(address, ticket).unwrap();
    assert_eq!(
        viewer.desktop_name,
        format!("QEMU ({})", naming::domain_name(vm)),
        "the VM's own display"
    );
    let client = viewer.local_addr().to_string();
    let seen = collect(&|seen| phases(seen, &client).contains(&DisplayPhase::Authenticated));
    assert_eq!(
        phases(&seen, &client),
        vec![DisplayPhase::Connected, DisplayPhase::Authenticated],
        "{seen:?}"
    );
    drop(viewer);
    let seen = collect(&|seen| !seen.is_empty());
    assert_eq!(
        phases(&seen, &client),
        vec![DisplayPhase::Disconnected],
        "{seen:?}"
    );

    // Once the watch is gone, a viewer raises nothing here.
    drop(watch);
    let viewer = vnc_viewer::attach(address, ticket).unwrap();
    drop(viewer);
    let late = collect_for(Duration::from_secs(1), &|_| false);
    assert!(late.is_empty(), "events after the watch ended: {late:?}");

    let _ = host.destroy_domain(vm);
    let _ = host.undefine_domain(vm);
    drop(cleanup);
}

/// The test guest's raw image, built by `tests/guest/build-guest.sh` or taken
/// from its cache.
fn guest_image() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
    let output = Command::new("bash").arg(&script).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(stdout.lines().last().unwrap_or_default());
    assert!(path.is_file(), "build-guest.sh printed {stdout:?}");
    path
}

/// Imports the guest image through the upload stream and exports it back:
/// the bytes must survive the round trip. Returns the image's size.
fn import_round_trip(host: &dyn Hypervisor, image: &ImageVersionId, image_path: &Path) -> u64 {
    let mut file = File::open(image_path).unwrap();
    let size = file.metadata().unwrap().len();
    let expected = Sha256::digest(std::fs::read(image_path).unwrap());

    let mut progress_calls = Vec::new();
    let started = Instant::now();
    let base = host
        .import_base_image(image, VolumeFormat::Raw, size, &mut file, &mut |done| {
            progress_calls.push(done)
        })
        .unwrap();
    let import_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "import: {size} bytes in {import_seconds:.3} s ({:.0} MB/s, {} progress calls)",
        size as f64 / 1e6 / import_seconds,
        progress_calls.len()
    );
    assert_eq!(base.name, VolumeName::Base(image.clone()));
    assert_eq!(base.capacity_bytes, size);
    assert_progress(&progress_calls, size);

    // Into memory, hashed after the clock stops: SHA-256 in a debug build
    // runs at about 50 MB/s and would be all the export time measured.
    let mut exported_bytes = Vec::with_capacity(usize::try_from(size).unwrap());
    let mut progress_calls = Vec::new();
    let started = Instant::now();
    let exported = host
        .export_volume(&base.name, &mut exported_bytes, &mut |done| {
            progress_calls.push(done)
        })
        .unwrap();
    let export_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "export: {exported} bytes in {export_seconds:.3} s ({:.0} MB/s)",
        exported as f64 / 1e6 / export_seconds
    );
    assert_eq!(exported, size);
    assert_eq!(exported_bytes.len() as u64, size);
    assert_progress(&progress_calls, size);
    assert_eq!(
        Sha256::digest(&exported_bytes),
        expected,
        "the exported volume differs from the imported file"
    );
    size
}

/// An upload whose source ends early fails and leaves no volume behind.
fn short_import_leaves_nothing(host: &dyn Hypervisor) {
    let image = ImageVersionId::new("short-1").unwrap();
    let data = pattern(4, 3 * MIB as usize);
    let mut source = &data[..];
    let error = host
        .import_base_image(&image, VolumeFormat::Raw, 4 * MIB, &mut source, &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(&error, ActuatorError::Stream { source, .. }
            if source.kind() == std::io::ErrorKind::UnexpectedEof),
        "{error}"
    );
    assert_eq!(host.list_volumes().unwrap(), vec![]);
}

/// Progress counts bytes done: it only grows and ends at the total.
fn assert_progress(calls: &[u64], total: u64) {
    assert!(!calls.is_empty(), "progress was never reported");
    assert!(
        calls.windows(2).all(|pair| pair[0] < pair[1]),
        "progress went backwards or stood still: {calls:?}"
    );
    assert_eq!(calls.last().copied(), Some(total), "{calls:?}");
}

/// Chunks written at offsets, last first, make up the volume with zeros
/// between them.
fn writes_out_of_order_land_in_place(host: &dyn Hypervisor) {
    let scratch = ImageVersionId::new("scratch-1").unwrap();
    let capacity = 4 * MIB;
    let volume = host
        .create_base_volume(&scratch, capacity, VolumeFormat::Raw)
        .unwrap();
    let chunk_len = 64 * 1024;
    // The end of the volume, then an unaligned offset, then the start.
    let chunks = [
        (capacity - chunk_len as u64, pattern(1, chunk_len)),
        (MIB + 12_345, pattern(2, chunk_len)),
        (0, pattern(3, chunk_len)),
    ];
    for (offset, data) in &chunks {
        host.write_volume_at(&volume.name, *offset, data).unwrap();
    }
    let mut expected = vec![0u8; capacity as usize];
    for (offset, data) in &chunks {
        let offset = *offset as usize;
        expected[offset..offset + data.len()].copy_from_slice(data);
    }
    let mut exported = Vec::new();
    host.export_volume(&volume.name, &mut exported, &mut |_| {})
        .unwrap();
    assert_eq!(exported.len(), expected.len());
    if let Some(first_difference) = exported
        .iter()
        .zip(&expected)
        .position(|(got, want)| got != want)
    {
        panic!("out-of-order writes: the exported volume differs first at byte {first_difference}");
    }
    // Reads at offsets (how chunks are served) see the same bytes.
    for (offset, data) in &chunks {
        let read = host
            .read_volume_at(&volume.name, *offset, data.len() as u64)
            .unwrap();
        assert!(read == *data, "the chunk read at {offset} differs");
    }
    let across = host.read_volume_at(&volume.name, MIB - 100, 200).unwrap();
    assert_eq!(
        &across[..],
        &expected[(MIB - 100) as usize..(MIB + 100) as usize]
    );
    assert!(matches!(
        host.read_volume_at(&volume.name, capacity - 10, 11),
        Err(ActuatorError::OutOfBounds { .. })
    ));
    host.delete_volume(&volume.name).unwrap();
}

/// Bytes that differ per chunk and per position, so a misplaced chunk shows.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|index| (index % 251) as u8 ^ seed.wrapping_mul(37))
        .collect()
}

/// What a reader thread reports: the VM, and its hello line with the time
/// since `start_domain`, or why there is none.
type HelloReport = (VmId, Result<(String, Duration), String>);

/// Reads `vm`'s channel on a thread of its own: a libvirt stream's `recv`
/// blocks with no timeout, so the waiting side bounds the wait instead.
fn spawn_hello_reader(
    vm: VmId,
    mut channel: Box<dyn GuestChannel>,
    started: Instant,
    sender: mpsc::Sender<HelloReport>,
) {
    thread::spawn(move || {
        let result = read_hello_line(&mut channel).map(|line| (line, started.elapsed()));
        // The receiver is gone only when the test already failed.
        let _ = sender.send((vm, result));
    });
}

/// The first complete hello line on the channel; other lines are skipped.
fn read_hello_line(channel: &mut impl Read) -> Result<String, String> {
    let mut pending = Vec::new();
    let mut skipped = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = channel
            .read(&mut buffer)
            .map_err(|error| format!("reading the channel failed: {error}"))?;
        if read == 0 {
            return Err(format!(
                "the channel closed; skipped lines {skipped:?}, then {:?}",
                String::from_utf8_lossy(&pending)
            ));
        }
        pending.extend_from_slice(&buffer[..read]);
        while let Some(newline) = pending.iter().position(|byte| *byte == b'\n') {
            let line: Vec<u8> = pending.drain(..=newline).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_owned();
            if line.starts_with(HELLO_PREFIX) {
                return Ok(line);
            }
            skipped.push(line);
        }
    }
}

/// Waits, at most [`HELLO_WAIT`] in all, for every VM's hello line and checks
/// that each names its own VM: the line came through that VM's channel. A
/// guest whose kernel panicked fails the test at once.
fn wait_for_hello_lines(vms: &[VmId], receiver: &mpsc::Receiver<HelloReport>, dir: &Path) {
    let deadline = Instant::now() + HELLO_WAIT;
    let mut hello = BTreeMap::new();
    while hello.len() < vms.len() {
        let silent: Vec<VmId> = vms
            .iter()
            .copied()
            .filter(|vm| !hello.contains_key(vm))
            .collect();
        if let Some(&vm) = silent.iter().find(|vm| kernel_panicked(dir, **vm)) {
            panic!("the kernel of VM {vm} panicked\n{}", serial_tail(dir, vm));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let logs: String = silent.iter().map(|vm| serial_tail(dir, *vm)).collect();
            panic!("no hello line within {HELLO_WAIT:?} from {silent:?}\n{logs}");
        }
        let (vm, result) = match receiver.recv_timeout(left.min(SERIAL_LOG_POLL)) {
            Ok(report) => report,
            Err(_) => continue,
        };
        let (line, elapsed) = result.unwrap_or_else(|problem| {
            panic!("VM {vm}: {problem}\n{}", serial_tail(dir, vm));
        });
        let (uuid, boot_ms) = parse_hello(&line);
        assert_eq!(
            uuid,
            vm.to_string(),
            "VM {vm} got another guest's line on its channel: {line:?}"
        );
        eprintln!(
            "VM {vm}: hello {:.2} s after start_domain (guest uptime {boot_ms} ms)",
            elapsed.as_secs_f64()
        );
        hello.insert(vm, line);
    }
}

/// `deskgrid-test-guest hello uuid=<uuid> boot_ms=<ms>` into its fields.
fn parse_hello(line: &str) -> (String, u64) {
    let fields = line
        .strip_prefix(HELLO_PREFIX)
        .and_then(|rest| rest.strip_prefix("uuid="))
        .and_then(|rest| rest.split_once(" boot_ms="));
    let Some((uuid, boot_ms)) = fields else {
        panic!("unexpected hello line {line:?}");
    };
    let boot_ms = boot_ms
        .parse()
        .unwrap_or_else(|_| panic!("unexpected boot_ms in {line:?}"));
    (uuid.to_owned(), boot_ms)
}

/// Whether `vm`'s serial log shows a kernel panic (the guest then hangs).
fn kernel_panicked(dir: &Path, vm: VmId) -> bool {
    std::fs::read(serial_log(dir, vm)).is_ok_and(|log| {
        log.windows(KERNEL_PANIC.len())
            .any(|window| window == KERNEL_PANIC)
    })
}

fn serial_log(dir: &Path, vm: VmId) -> PathBuf {
    dir.join(format!("serial-{vm}.log"))
}

/// The last lines of `vm`'s serial log, for a failure message.
fn serial_tail(dir: &Path, vm: VmId) -> String {
    let path = serial_log(dir, vm);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..];
            format!(
                "serial log of VM {vm} ({}), last {} lines:\n  | {}\n",
                path.display(),
                tail.len(),
                tail.join("\n  | ")
            )
        }
        Err(error) => format!("no serial log of VM {vm} at {}: {error}\n", path.display()),
    }
}

/// A ticket set through deskgrid shows in the live XML (read with the
/// secrets) with its expiry, and the endpoint names the live port.
fn display_ticket_reaches_qemu(
    host: &dyn Hypervisor,
    connection: &Connect,
    vm: VmId,
    boot_password: &str,
) {
    let domain = Domain::lookup_by_name(connection, &naming::domain_name(vm)).unwrap();
    let before = live_graphics(&domain);
    assert_eq!(before.passwd.as_deref(), Some(boot_password));
    assert_eq!(before.passwd_valid_to, None);

    let ticket = random_secret("ticket");
    let endpoint: DisplayEndpoint = host
        .set_display_ticket(vm, &ticket, TICKET_VALID_FOR)
        .unwrap();
    let now = unix_now();
    let after = live_graphics(&domain);
    assert_eq!(after.passwd.as_deref(), Some(ticket.as_str()));
    let valid_to = after
        .passwd_valid_to
        .as_deref()
        .unwrap_or_else(|| panic!("VM {vm}: no passwdValidTo after the ticket"));
    let valid_until = parse_utc(valid_to);
    let expected = now + TICKET_VALID_FOR.as_secs();
    assert!(
        valid_until.abs_diff(expected) <= TICKET_SLACK_SECONDS,
        "VM {vm}: passwdValidTo {valid_to} is {valid_until}, expected about {expected}"
    );

    eprintln!(
        "VM {vm}: ticket valid to {valid_to} UTC ({} s from now), SPICE on {}:{}",
        valid_until as i64 - now as i64,
        endpoint.listen,
        endpoint.port
    );
    assert_eq!(endpoint.protocol, DisplayProtocol::Spice);
    assert_eq!(endpoint.listen, "127.0.0.1");
    assert!(endpoint.port > 0);
    assert_eq!(
        Some(endpoint.port),
        after.port,
        "VM {vm}: endpoint vs live XML"
    );
    assert_eq!(endpoint.websocket_port, None);
}

/// The first `<graphics>` of a live domain, read with its secrets.
#[derive(Debug)]
struct LiveGraphics {
    passwd: Option<String>,
    passwd_valid_to: Option<String>,
    port: Option<u16>,
}

fn live_graphics(domain: &Domain) -> LiveGraphics {
    let xml = domain
        .get_xml_desc(virt::sys::VIR_DOMAIN_XML_SECURE)
        .unwrap();
    let document = roxmltree::Document::parse(&xml).unwrap();
    let graphics = document
        .descendants()
        .find(|node| node.has_tag_name("graphics"))
        .unwrap_or_else(|| panic!("no <graphics> in the live XML:\n{xml}"));
    LiveGraphics {
        passwd: graphics.attribute("passwd").map(str::to_owned),
        passwd_valid_to: graphics.attribute("passwdValidTo").map(str::to_owned),
        port: graphics
            .attribute("port")
            .and_then(|port| port.parse().ok()),
    }
}

/// Seconds since the epoch of a UTC `YYYY-MM-DDTHH:MM:SS`.
fn parse_utc(value: &str) -> u64 {
    let number = |range: std::ops::Range<usize>| -> i64 {
        value
            .get(range)
            .and_then(|digits| digits.parse().ok())
            .unwrap_or_else(|| panic!("not a YYYY-MM-DDTHH:MM:SS time: {value:?}"))
    };
    assert_eq!(value.len(), 19, "not a YYYY-MM-DDTHH:MM:SS time: {value:?}");
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let seconds_of_day = number(11..13) * 3_600 + number(14..16) * 60 + number(17..19);
    // Howard Hinnant's days_from_civil: a year that starts in March puts the
    // leap day last.
    let shifted_year = if month <= 2 { year - 1 } else { year };
    let era = shifted_year.div_euclid(400);
    let year_of_era = shifted_year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    u64::try_from(days * 86_400 + seconds_of_day).unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn random_secret(kind: &str) -> String {
    format!("{kind}-{:016x}", rand::random::<u64>())
}

/// Powers the guests off on the ACPI button (all at once), undefines them
/// with their overlays, and deletes the base image.
fn shut_down_and_remove(host: &LibvirtHypervisor, vms: &[VmId], image: &ImageVersionId) {
    thread::scope(|scope| {
        let shutdowns: Vec<_> = vms
            .iter()
            .map(|&vm| {
                scope.spawn(move || {
                    let started = Instant::now();
                    let outcome = host.shutdown_domain(vm, SHUTDOWN_TIMEOUT);
                    (vm, outcome, started.elapsed())
                })
            })
            .collect();
        for shutdown in shutdowns {
            let (vm, outcome, elapsed) = shutdown.join().unwrap();
            match outcome.unwrap() {
                ShutdownOutcome::Graceful => eprintln!(
                    "VM {vm}: powered off {:.2} s after shutdown_domain",
                    elapsed.as_secs_f64()
                ),
                ShutdownOutcome::Forced => eprintln!(
                    "VM {vm}: ignored the ACPI button for {SHUTDOWN_TIMEOUT:?}; destroyed"
                ),
                ShutdownOutcome::AlreadyOff => panic!("VM {vm} was off before shutdown_domain"),
            }
        }
    });
    for &vm in vms {
        assert_eq!(host.domain_state(vm).unwrap(), DomainState::ShutOff);
        host.undefine_domain(vm).unwrap();
        assert!(matches!(
            host.domain_state(vm),
            Err(ActuatorError::DomainNotFound { .. })
        ));
    }
    assert!(!host
        .list_domains()
        .unwrap()
        .iter()
        .any(|status| vms.contains(&status.vm)));
    let remaining: Vec<VolumeName> = host
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|volume| volume.name)
        .collect();
    assert_eq!(
        remaining,
        vec![VolumeName::Base(image.clone())],
        "undefine_domain removes the overlays"
    );
    host.delete_volume(&VolumeName::Base(image.clone()))
        .unwrap();
    assert_eq!(host.list_volumes().unwrap(), vec![]);
}
