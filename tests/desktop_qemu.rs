//! The desktop service on a real host: one server's `DesktopService` against
//! `qemu:///system`, with two linked clones of the tiny test guest
//! (`tests/guest/`, TCG) that run the real `deskgrid-agent`.
//!
//! Both VMs go from `Provisioning` to `Ready` in the record on their agents'
//! hellos, read through libvirt channel streams. Then a user logs in on one
//! guest: the guest's init writes the utmp records a console login and
//! logout leave behind (`/deskgrid/test-logins`, see
//! `tests/guest/guest-init.sh`; nobody types a password, but the agent reads
//! exactly what it would read after a real login). The record shows that VM
//! `InUse` by alice with her session, then `Refreshing` after the logout;
//! the other VM stays `Ready` all along and is the one a reservation gets,
//! with a display ticket set in QEMU.
//!
//! Then the viewer side, with libvirt's real graphics events: bob attaches
//! a real VNC viewer (`support/vnc_viewer.rs`) with his ticket and logs in
//! on his guest (its init writes his utmp login, and no logout). His viewer
//! goes away and comes back within the grid policy's disconnect grace (a
//! second `reserve` gives the returning user the same VM with a new
//! ticket): his session stays. It goes away for good: after the grace the
//! pooled desktop is logged off and refreshed, though the guest still
//! shows him logged in.
//!
//! Slow (30-60 s on a 2-core machine: two guests boot under emulation and a
//! session lasts a few seconds); it runs in the suite because only a real
//! guest shows that the agent, the channel and the service fit together.
//! A host without libvirtd fails (run `bash scripts/setup-host.sh`).
//! Whatever happens, [`Cleanup`] removes the domains, volumes, pool and
//! directories the test made.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/desktop_guests.rs"]
mod desktop_guests;
#[path = "support/pool_grid.rs"]
mod pool_grid;
#[path = "support/vnc_viewer.rs"]
mod vnc_viewer;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deskgrid::actuator::domain_xml::NetworkAttachment;
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::naming;
use deskgrid::actuator::{DomainKind, DomainSpec, Hypervisor, VolumeFormat};
use deskgrid::desktop::reserve::ReserveRequest;
use deskgrid::desktop::service::{DesktopHost, DesktopService, DesktopSettings, OwnView};
use deskgrid::model::{
    DisplayProtocol, ImageVersionId, ServerRecord, SiteLabel, Template, TemplateKind, TemplateName,
    UserName, VmId, VmRecord, VmState,
};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;

const URI: &str = "qemu:///system";
/// The guest whose SMBIOS UUID starts with this logs alice in (the first 4
/// bytes of its VM id; the rest is random, so runs do not collide).
const LOGIN_PREFIX: [u8; 4] = [0xd5, 0x6e, 0x70, 0x01];
/// The guest whose UUID starts with this logs bob in, for good.
const BOB_PREFIX: [u8; 4] = [0xd5, 0x6e, 0x70, 0x02];
/// After alice's session (and bob's reservation, made while she is in).
const BOB_LOGIN_AFTER_S: u32 = 20;
const BOB_SESSION_S: u32 = 3_600;
/// The grid policy's disconnect grace in this test.
const GRACE: Duration = Duration::from_secs(2);
/// Seconds after its agent port appears that the guest logs alice in, and
/// how long her session lasts: long enough to see `Ready` first and `InUse`
/// for a while at a 100 ms poll, short enough for the bound below.
const LOGIN_AFTER_S: u32 = 8;
const SESSION_S: u32 = 6;
/// Two guests booting at once under TCG say hello in 6-30 s (see
/// tests/actuator_qemu.rs); the login follows 8 s after, the logout 6 s
/// later. The whole test must end within 90 s.
const TEST_BOUND: Duration = Duration::from_secs(90);
const QEMU_LOG_DIR: &str = "/var/log/libvirt/qemu";
const SERIAL_TAIL_LINES: usize = 30;

/// Removes everything the test made on the host when dropped, after a
/// failure too. Errors are ignored: each step may find its object gone.
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
                    let _ = domain.destroy();
                    let _ = domain.undefine();
                }
                let _ = std::fs::remove_file(Path::new(QEMU_LOG_DIR).join(format!("{name}.log")));
            }
            if let Ok(pool) = StoragePool::lookup_by_name(&connection, &self.pool) {
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

/// This server as the desktop service sees it: its record in memory.
#[derive(Debug)]
struct TestHost {
    record: Mutex<ServerRecord>,
    templates: BTreeMap<TemplateName, Template>,
}

impl TestHost {
    fn vm(&self, vm: VmId) -> (VmState, Option<String>) {
        let record = self.record.lock().unwrap();
        let entry = &record.vms[&vm];
        (entry.state, entry.user.as_ref().map(ToString::to_string))
    }
}

impl DesktopHost for TestHost {
    fn server_name(&self) -> String {
        "qemu-test".to_owned()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap()
    }

    fn own_view(&self) -> Option<OwnView> {
        Some(OwnView {
            record: self.record.lock().unwrap().clone(),
            templates: self.templates.clone(),
            policy: deskgrid::model::Policy {
                disconnect_grace_s: GRACE.as_secs() as u32,
                ..deskgrid::model::Policy::default()
            },
        })
    }

    fn update_own_record(&self, change: &mut dyn FnMut(&mut ServerRecord)) -> Result<(), String> {
        change(&mut self.record.lock().unwrap());
        Ok(())
    }

    fn display_address(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_make_vms_ready_and_a_guest_login_shows_in_the_record() {
    let started = Instant::now();
    let suffix = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-desktop-qemu-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let dir_path = dir.path().to_owned();
    let mut login_bytes: [u8; 16] = rand::random();
    login_bytes[..4].copy_from_slice(&LOGIN_PREFIX);
    let alice_vm = VmId::from_bytes(login_bytes);
    let mut bob_bytes: [u8; 16] = rand::random();
    bob_bytes[..4].copy_from_slice(&BOB_PREFIX);
    let other_vm = VmId::from_bytes(bob_bytes);
    let vms = [alice_vm, other_vm];
    let cleanup = Cleanup {
        pool: format!("dg-test-desk-{suffix}"),
        vms: vms.to_vec(),
        dir: Some(dir),
    };

    let image_path = guest_image(&dir_path);
    eprintln!(
        "guest image ready after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let host = Arc::new(
        LibvirtHypervisor::connect(LibvirtOptions {
            uri: URI.to_owned(),
            pool: cleanup.pool.clone(),
            pool_path: dir_path.join("pool").to_string_lossy().into_owned(),
            domain_kind: Some(DomainKind::Qemu),
            streams_only: false,
        })
        .unwrap_or_else(|error| {
            panic!("{error}\nthis test needs libvirtd at {URI}: run `bash scripts/setup-host.sh`")
        }),
    );
    host.ensure_pool().unwrap();
    let image = ImageVersionId::new("desk-guest-1").unwrap();
    let mut file = File::open(&image_path).unwrap();
    let size = file.metadata().unwrap().len();
    host.import_base_image(&image, VolumeFormat::Raw, size, &mut file, &mut |_| {})
        .unwrap();

    let template = Template {
        name: TemplateName::new("desk-test").unwrap(),
        image: image.clone(),
        vcpus: 1,
        memory_mib: 256,
        desired_vms: 2,
        min_idle_vms: 0,
        min_replicas: 1,
        concurrency_percent: 0,
        kind: TemplateKind::Pooled,
        display: DisplayProtocol::Vnc,
        monitors: 1,
    };
    // What the policy loop does: the VMs in the record as Provisioning,
    // then clone, define, start.
    let mut record = ServerRecord::new("qemu-test".into(), Vec::new(), SiteLabel::default(), 0);
    for vm in vms {
        record.vms.insert(
            vm,
            VmRecord {
                id: vm,
                template: template.name.clone(),
                image: image.clone(),
                state: VmState::Provisioning,
                user: None,
                vcpus: 1,
                memory_mib: 256,
            },
        );
    }
    let test_host = Arc::new(TestHost {
        record: Mutex::new(record),
        templates: BTreeMap::from([(template.name.clone(), template.clone())]),
    });
    let service = DesktopService::new(
        Arc::clone(&test_host) as Arc<dyn DesktopHost>,
        Arc::clone(&host) as Arc<dyn Hypervisor>,
        DesktopSettings {
            tick: Duration::from_millis(200),
            ..DesktopSettings::default()
        },
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(service.clone().run(shutdown));
    for vm in vms {
        let overlay = host.create_linked_clone(vm, &image).unwrap();
        let mut spec = DomainSpec::for_template(
            &template,
            vm,
            DomainKind::Qemu,
            overlay.path,
            NetworkAttachment::None,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            "locked!!".to_owned(),
        );
        spec.console_log = Some(serial_log(&dir_path, vm).to_string_lossy().into_owned());
        host.define_domain(&spec).unwrap();
        host.start_domain(vm).unwrap();
    }
    let booted = Instant::now();

    // Each step waits for the record to show the next state.
    let waiter = Waiter {
        host: Arc::clone(&test_host),
        dir: dir_path.clone(),
        vms: vms.to_vec(),
        started,
        booted,
    };

    waiter
        .until("both VMs are ready", |host, vms| {
            vms.iter().all(|vm| host.vm(*vm).0 == VmState::Ready)
        })
        .await;
    assert_eq!(
        test_host.vm(alice_vm),
        (VmState::Ready, None),
        "ready before the login"
    );

    waiter
        .until("alice is logged in", |host, vms| {
            host.vm(vms[0]).0 == VmState::InUse
        })
        .await;
    assert_eq!(test_host.vm(alice_vm).1.as_deref(), Some("alice"));
    {
        let record = test_host.record.lock().unwrap();
        let sessions: Vec<_> = record.sessions.values().collect();
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        assert_eq!(sessions[0].vm, alice_vm);
        assert_eq!(sessions[0].user.to_string(), "alice");
    }
    assert_eq!(
        test_host.vm(other_vm),
        (VmState::Ready, None),
        "the other guest has nobody"
    );

    // Only the other VM is free now: a reservation gets it, with a ticket.
    let reservation = service
        .desk()
        .reserve(ReserveRequest {
            user: UserName::new("bob").unwrap(),
            template: template.name.clone(),
        })
        .await
        .unwrap();
    assert_eq!(reservation.vm, other_vm);
    assert_eq!(reservation.host, "127.0.0.1");
    assert!(reservation.port > 0);
    assert_eq!(
        test_host.vm(other_vm),
        (VmState::Reserved, Some("bob".to_owned()))
    );
    let display: SocketAddr = format!("{}:{}", reservation.host, reservation.port)
        .parse()
        .unwrap();
    let viewer = vnc_viewer::attach(display, &reservation.password).unwrap();
    waiter
        .until_viewers(&service, other_vm, 1, "bob's viewer is attached")
        .await;

    waiter
        .until("alice logged out", |host, vms| {
            host.vm(vms[0]).0 == VmState::Refreshing
        })
        .await;
    assert_eq!(test_host.vm(alice_vm).1, None);
    assert!(test_host.record.lock().unwrap().sessions.is_empty());

    waiter
        .until("bob is logged in", |host, vms| {
            host.vm(vms[1]).0 == VmState::InUse
        })
        .await;
    // His viewer drops and comes back within the grace: the returning user
    // gets the same VM and a new ticket, and keeps his session.
    drop(viewer);
    waiter
        .until_viewers(&service, other_vm, 0, "bob's viewer is gone")
        .await;
    let again = service
        .desk()
        .reserve(ReserveRequest {
            user: UserName::new("bob").unwrap(),
            template: template.name.clone(),
        })
        .await
        .unwrap();
    assert_eq!((again.vm, again.returning), (other_vm, true));
    assert_ne!(again.password, reservation.password, "a new ticket");
    let viewer = vnc_viewer::attach(display, &again.password).unwrap();
    waiter
        .until_viewers(&service, other_vm, 1, "bob's viewer is back")
        .await;
    tokio::time::sleep(GRACE * 2).await;
    assert_eq!(
        test_host.vm(other_vm),
        (VmState::InUse, Some("bob".to_owned())),
        "back within the grace: the session stays"
    );
    // Gone for good: after the grace the pooled desktop is refreshed, while
    // the guest itself still shows bob logged in.
    let left = Instant::now();
    drop(viewer);
    waiter
        .until("bob's disconnected session ended", |host, vms| {
            host.vm(vms[1]).0 == VmState::Refreshing
        })
        .await;
    assert!(
        left.elapsed() >= GRACE,
        "ended {:?} after the disconnect",
        left.elapsed()
    );
    assert!(test_host.record.lock().unwrap().sessions.is_empty());
    assert!(
        service.counters().display_events >= 6,
        "{:?}",
        service.counters()
    );
    let counters = service.counters();
    assert_eq!(counters.invalid_names, 0, "{counters:?}");
    for vm in vms {
        if let Some(channel) = service.channel_counters(vm).await {
            assert_eq!(channel.bad_frames, 0, "{vm}: {channel:?}");
            assert_eq!(channel.foreign, 0, "{vm}: {channel:?}");
        }
    }

    stop.send_replace(true);
    running.await.unwrap();
    for vm in vms {
        let _ = host.destroy_domain(vm);
        let _ = host.undefine_domain(vm);
    }
    drop(cleanup);
    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
    assert!(started.elapsed() < TEST_BOUND);
}

/// Waits for the record, within the test's bound.
struct Waiter {
    host: Arc<TestHost>,
    dir: PathBuf,
    vms: Vec<VmId>,
    started: Instant,
    booted: Instant,
}

impl Waiter {
    async fn until_viewers(&self, service: &DesktopService, vm: VmId, count: usize, what: &str) {
        loop {
            if service.viewer_connections(vm).await == count {
                eprintln!("{what} after {:.1} s", self.booted.elapsed().as_secs_f64());
                return;
            }
            assert!(
                self.started.elapsed() < TEST_BOUND,
                "timed out waiting until {what}: {:?}",
                service.counters()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn until(&self, what: &str, done: fn(&TestHost, &[VmId]) -> bool) {
        loop {
            if done(&self.host, &self.vms) {
                eprintln!("{what} after {:.1} s", self.booted.elapsed().as_secs_f64());
                return;
            }
            if self.started.elapsed() > TEST_BOUND {
                let tails: String = self
                    .vms
                    .iter()
                    .map(|vm| serial_tail(&self.dir, *vm))
                    .collect();
                panic!(
                    "timed out waiting until {what}; record: {:?}\n{tails}",
                    self.host.record.lock().unwrap().vms
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The test guest with the real agent and the login hook, built by
/// `tests/guest/build-guest.sh` or taken from its cache.
fn guest_image(dir: &Path) -> PathBuf {
    let hex =
        |prefix: [u8; 4]| -> String { prefix.iter().map(|byte| format!("{byte:02x}")).collect() };
    desktop_guests::guest_image_with_logins(
        dir,
        &format!(
            "{} alice {LOGIN_AFTER_S} {SESSION_S}\n{} bob {BOB_LOGIN_AFTER_S} {BOB_SESSION_S}\n",
            hex(LOGIN_PREFIX),
            hex(BOB_PREFIX)
        ),
    )
}

fn serial_log(dir: &Path, vm: VmId) -> PathBuf {
    dir.join(format!("serial-{vm}.log"))
}

fn serial_tail(dir: &Path, vm: VmId) -> String {
    let path = serial_log(dir, vm);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(SERIAL_TAIL_LINES)..];
            format!("serial log of VM {vm}:\n  | {}\n", tail.join("\n  | "))
        }
        Err(error) => format!("no serial log of VM {vm} at {}: {error}\n", path.display()),
    }
}
