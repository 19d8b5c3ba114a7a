//! Provisioning benchmark: N desktop VMs as linked clones (qcow2 overlay +
//! define + start) side by side with N full copies of the same base image
//! (libvirt's clone-from-volume + define + start), in one run, on a real
//! libvirtd. BENCHMARKS.md has the figures and how to read them.
//!
//! ```text
//! cargo bench --bench provisioning -- [--vms N] [--base-size-mib M] [--boot-wait]
//!     [--no-boot-wait] [--boot-wait-vms K] [--full-copy-format qcow2|raw] [--fsync-disks]
//! ```
//!
//! Needs root and a running libvirtd with QEMU (`bash scripts/setup-host.sh`);
//! the guest is tests/guest/build-guest.sh's tiny image (built and cached on
//! first use). Domains are `<domain type='qemu'>` (TCG), as in the tests
//! (DESIGN.md section 10).
//!
//! Two bases are imported with `import_base_image` into a pool of the bench's
//! own under /var/tmp: the test guest image itself, and a larger one (the
//! guest image followed by pseudo-random bytes up to `--base-size-mib`) so a
//! full copy has real bytes to move: zeros would be skipped by sparse copies
//! and flatter the baseline. For each base, one phase provisions N linked
//! clones and one N full copies, each VM started as soon as its disk is
//! defined; every phase's domains are destroyed before the next phase starts,
//! so phases never contend with each other's guests. With boot waiting on, the
//! first K VMs of each phase also report the time from the `start_domain` call
//! to the first line the guest writes on its agent channel.
//!
//! Everything the bench creates (domains, volumes, pool, directory) is
//! removed at the end, on error, on panic and on Ctrl-C (SIGINT/SIGTERM; a
//! second one exits at once without cleaning up).
//!
//! This file uses the `virt` crate directly, which deskgrid keeps to
//! `actuator/libvirt.rs` (STYLE.md): deskgrid never makes full copies, so
//! `virStorageVolCreateXMLFrom` has no place in the `Hypervisor` trait, and
//! the baseline needs it.

use std::fs::File;
use std::io::{BufRead as _, Read};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use deskgrid::actuator::domain_xml::{self, NetworkAttachment};
use deskgrid::actuator::libvirt::{LibvirtHypervisor, LibvirtOptions};
use deskgrid::actuator::naming;
use deskgrid::actuator::{
    ActuatorError, DomainKind, DomainSpec, Hypervisor, VolumeFormat, VolumeInfo,
};
use deskgrid::model::{ImageVersionId, Template, TemplateName, VmId};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;

const MIB: u64 = 1 << 20;
/// 512 MiB keeps a default run (base + 5 full copies, ~3 GiB) well inside
/// the disk a CI machine has; `--base-size-mib` goes bigger.
const DEFAULT_BASE_SIZE_MIB: u64 = 512;
/// Two cores run five TCG guests at once; more and each one crawls.
const DEFAULT_VMS: usize = 5;
/// Enough boots to see a spread, few enough that their TCG CPU use does not
/// swamp the provisioning they overlap with.
const DEFAULT_BOOT_WAIT_VMS: usize = 3;
/// A lone test guest speaks after ~5 s under TCG; five sharing two cores
/// take several times that.
const DEFAULT_BOOT_TIMEOUT_SECONDS: u64 = 180;
/// The test guest is a kernel and a busybox initramfs: 256 MiB is plenty.
const GUEST_MEMORY_MIB: u64 = 256;
/// What the test guest writes on its agent channel once booted
/// (tests/guest/guest-init.sh).
const GUEST_HELLO: &str = "deskgrid-test-guest hello";
/// Room for the overlays, pool metadata and the filesystem's own needs.
const DISK_SLACK_BYTES: u64 = 256 * MIB;

/// Set by the signal thread; every step checks it.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Provisioning benchmark: linked clones vs full copies on a real libvirtd.
#[derive(Debug, Parser)]
#[command(name = "provisioning")]
struct BenchOptions {
    /// VMs provisioned in each phase.
    #[arg(long = "vms", default_value_t = DEFAULT_VMS)]
    n_vms: usize,
    /// Size of the large base image (guest image + pseudo-random bytes).
    #[arg(long, default_value_t = DEFAULT_BASE_SIZE_MIB)]
    base_size_mib: u64,
    /// Wait for the first agent line of the first VMs of each phase (default).
    #[arg(long, overrides_with = "no_boot_wait")]
    boot_wait: bool,
    /// Do not wait for guests to boot.
    #[arg(long, overrides_with = "boot_wait")]
    no_boot_wait: bool,
    /// How many VMs per phase the boot wait covers.
    #[arg(long, default_value_t = DEFAULT_BOOT_WAIT_VMS)]
    boot_wait_vms: usize,
    /// Give up on a guest's first agent line after this long.
    #[arg(long, default_value_t = DEFAULT_BOOT_TIMEOUT_SECONDS)]
    boot_timeout_seconds: u64,
    /// Format of the full copies: qcow2 (libvirt runs `qemu-img convert`,
    /// and deskgrid's domain XML takes the disk as is) or raw (libvirt copies
    /// the bytes itself; the bench patches the disk driver type to raw).
    #[arg(long, value_enum, default_value_t = CopyFormat::Qcow2)]
    full_copy_format: CopyFormat,
    /// fsync each new disk (overlay or copy) before defining its domain, so
    /// the copy is on disk rather than in the page cache when it is timed.
    #[arg(long)]
    fsync_disks: bool,
    /// Read the guests' agent channels on the connection that provisions
    /// (as deskgrid's one shared `Connect` would) instead of on a second one.
    #[arg(long)]
    channels_on_shared_connection: bool,
    /// libvirt URI.
    #[arg(long, default_value = "qemu:///system")]
    uri: String,
    /// The guest image; default: the last stdout line of tests/guest/build-guest.sh.
    #[arg(long)]
    guest_image: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench target; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CopyFormat {
    Qcow2,
    Raw,
}

impl CopyFormat {
    fn volume_format(self) -> VolumeFormat {
        match self {
            Self::Qcow2 => VolumeFormat::Qcow2,
            Self::Raw => VolumeFormat::Raw,
        }
    }
}

/// How a phase gives each VM its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Provisioning {
    /// `create_linked_clone`: a qcow2 overlay on the base.
    LinkedClone,
    /// `virStorageVolCreateXMLFrom`: a whole copy of the base.
    FullCopy(CopyFormat),
}

impl Provisioning {
    fn label(self) -> &'static str {
        match self {
            Self::LinkedClone => "linked clone",
            Self::FullCopy(CopyFormat::Qcow2) => "full copy (qcow2)",
            Self::FullCopy(CopyFormat::Raw) => "full copy (raw)",
        }
    }
}

/// A base image in the bench's pool.
#[derive(Debug)]
struct BaseImage {
    label: &'static str,
    image: ImageVersionId,
    volume: VolumeInfo,
    import_time: Duration,
}

/// One VM's provisioning, step by step.
#[derive(Debug, Clone, Copy)]
struct VmTiming {
    disk: Duration,
    define: Duration,
    start: Duration,
    /// When `start_domain` was called: boot times count from here.
    start_called: Instant,
}

impl VmTiming {
    fn total(&self) -> Duration {
        self.disk + self.define + self.start
    }
}

/// How a boot-waited guest's first agent line went.
#[derive(Debug)]
enum BootOutcome {
    Line {
        /// From the `start_domain` call to the line's arrival.
        since_start: Duration,
        /// The guest's own uptime when it wrote the line.
        guest_boot_ms: Option<u64>,
        uuid_matches: bool,
    },
    Failed(String),
    TimedOut,
}

#[derive(Debug)]
struct PhaseReport {
    provisioning: Provisioning,
    base_label: &'static str,
    base_bytes: u64,
    wall: Duration,
    vms: Vec<VmTiming>,
    boots: Vec<BootOutcome>,
    /// The boot of one VM provisioned after the phase, alone on the host.
    lone_boot: Option<BootOutcome>,
}

impl PhaseReport {
    fn vms_per_second(&self) -> f64 {
        self.vms.len() as f64 / self.wall.as_secs_f64()
    }
}

/// The bench's libvirt objects, removed when this is dropped.
#[derive(Debug)]
struct Bench {
    host: Arc<LibvirtHypervisor>,
    /// A second connection for the boot waiters' agent channels: a blocking
    /// channel read stalls other calls on its connection until the guest
    /// speaks (BENCHMARKS.md), which would distort every timing here.
    channel_host: Arc<LibvirtHypervisor>,
    /// The bench's own connection, for the full-copy baseline.
    connection: Connect,
    pool_name: String,
    pool_path: PathBuf,
    /// Domains that may exist: destroyed and undefined on cleanup.
    live_vms: Vec<VmId>,
    /// Full-copy volumes that may exist (undefine does not remove them).
    live_copies: Vec<String>,
    template_name: TemplateName,
}

fn main() -> anyhow::Result<()> {
    let options = BenchOptions::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if options.n_vms == 0 {
        bail!("--vms must be at least 1");
    }
    install_signal_handler();
    let guest_image = match &options.guest_image {
        Some(path) => path.clone(),
        None => build_guest_image()?,
    };
    let guest_bytes = std::fs::metadata(&guest_image)
        .with_context(|| format!("cannot read the guest image {}", guest_image.display()))?
        .len();
    let large_bytes = options.base_size_mib * MIB;
    if large_bytes < guest_bytes {
        bail!(
            "--base-size-mib {} is smaller than the guest image ({} bytes)",
            options.base_size_mib,
            guest_bytes
        );
    }

    let mut bench = Bench::connect(&options.uri, options.channels_on_shared_connection)?;
    let pool = bench
        .host
        .ensure_pool()
        .context("cannot create the bench pool")?;
    // Each phase keeps N disks at once; full copies are whole bases.
    let copies = options.n_vms as u64 + 1;
    let needed_bytes = copies * (guest_bytes + large_bytes) + DISK_SLACK_BYTES;
    if pool.available_bytes < needed_bytes {
        bail!(
            "{} has {} MiB free, the bench needs about {} MiB: lower --vms or --base-size-mib",
            pool.path,
            pool.available_bytes / MIB,
            needed_bytes / MIB
        );
    }
    let (libvirt_version, qemu_version) = bench.host.versions()?;
    let capacity = bench.host.host_capacity()?;
    let boot_wait_vms = if options.no_boot_wait {
        0
    } else {
        options.boot_wait_vms.min(options.n_vms)
    };
    println!("deskgrid provisioning benchmark");
    println!(
        "host: {} CPUs, libvirt {libvirt_version}, QEMU {qemu_version}, domain type {} (TCG), pool {}",
        capacity.cpus,
        bench.host.domain_kind(),
        pool.path
    );
    println!(
        "load average at start: {}; other running domains on this libvirtd: {}",
        load_average(),
        bench.foreign_running_domains()
    );
    println!(
        "per phase: {} VMs (1 vCPU, {GUEST_MEMORY_MIB} MiB, SPICE, no NIC), each started as soon as it is defined; boot wait on the first {boot_wait_vms}{}",
        options.n_vms,
        if options.fsync_disks { "; each new disk fsynced before define" } else { "" }
    );
    println!();

    let mut source = File::open(&guest_image)
        .with_context(|| format!("cannot open {}", guest_image.display()))?;
    let guest_base = bench.import("guest", "bench-guest", guest_bytes, &mut source)?;
    let mut source = File::open(&guest_image)
        .with_context(|| format!("cannot open {}", guest_image.display()))?
        .chain(PseudoRandomBytes::new(large_bytes - guest_bytes));
    let large_base = bench.import("large", "bench-large", large_bytes, &mut source)?;
    let bases = [guest_base, large_base];
    print_imports(&bases);

    let full = Provisioning::FullCopy(options.full_copy_format);
    let mut reports = Vec::new();
    for base in &bases {
        for provisioning in [Provisioning::LinkedClone, full] {
            let report = bench.run_phase(base, provisioning, &options, boot_wait_vms)?;
            eprintln!(
                "provisioning: {} on {} done: {:.2} VMs/s",
                provisioning.label(),
                base.label,
                report.vms_per_second()
            );
            reports.push(report);
        }
    }
    println!();
    print_phases(&reports);
    print_ratios(&reports);
    if boot_wait_vms > 0 {
        print_boots(&reports);
    }
    println!();
    println!(
        "load average at end: {}; other running domains: {}",
        load_average(),
        bench.foreign_running_domains()
    );
    println!(
        "note: a desktop base image is several GiB (a Windows desktop 20-40 GiB); a full copy's time grows with it, a linked clone's does not"
    );
    drop(bench);
    Ok(())
}

impl Bench {
    fn connect(uri: &str, channels_on_shared_connection: bool) -> anyhow::Result<Self> {
        // Unique per run: the pool, its directory and every VM id (random)
        // never collide with a test or another bench on the same libvirtd.
        let stem = format!(
            "dg-bench-{}-{}",
            std::process::id(),
            &VmId::random().to_string()[..8]
        );
        let pool_path = PathBuf::from("/var/tmp").join(&stem);
        let options = LibvirtOptions {
            uri: uri.to_owned(),
            pool: stem.clone(),
            pool_path: pool_path.display().to_string(),
            domain_kind: Some(DomainKind::Qemu),
            streams_only: false,
        };
        let host = Arc::new(LibvirtHypervisor::connect(options.clone()).context(
            "cannot connect to libvirt (is libvirtd running? bash scripts/setup-host.sh)",
        )?);
        let channel_host = if channels_on_shared_connection {
            Arc::clone(&host)
        } else {
            Arc::new(LibvirtHypervisor::connect(options)?)
        };
        let connection = Connect::open(Some(uri)).context("cannot open a second connection")?;
        Ok(Self {
            host,
            channel_host,
            connection,
            pool_name: stem,
            pool_path,
            live_vms: Vec::new(),
            live_copies: Vec::new(),
            template_name: TemplateName::new("bench").context("template name")?,
        })
    }

    fn import(
        &self,
        label: &'static str,
        image: &str,
        size: u64,
        source: &mut dyn Read,
    ) -> anyhow::Result<BaseImage> {
        let image = ImageVersionId::new(image).context("image version")?;
        let mut source = Interruptible(source);
        let started = Instant::now();
        let volume = self
            .host
            .import_base_image(&image, VolumeFormat::Raw, size, &mut source, &mut |_| {})
            .with_context(|| format!("cannot import the {label} base"))?;
        Ok(BaseImage {
            label,
            image,
            volume,
            import_time: started.elapsed(),
        })
    }

    fn run_phase(
        &mut self,
        base: &BaseImage,
        provisioning: Provisioning,
        options: &BenchOptions,
        boot_wait_vms: usize,
    ) -> anyhow::Result<PhaseReport> {
        eprintln!(
            "provisioning: {} x{} on the {} base...",
            provisioning.label(),
            options.n_vms,
            base.label
        );
        let template = Template {
            name: self.template_name.clone(),
            image: base.image.clone(),
            vcpus: 1,
            memory_mib: GUEST_MEMORY_MIB,
            desired_vms: u32::try_from(options.n_vms).unwrap_or(u32::MAX),
            min_idle_vms: 0,
            min_replicas: 1,
            concurrency_percent: 0,
            kind: Default::default(),
            display: Default::default(),
            monitors: 1,
        };
        let mut vms = Vec::with_capacity(options.n_vms);
        let mut waiters = Vec::new();
        let phase_started = Instant::now();
        for vm_idx in 0..options.n_vms {
            check_interrupted()?;
            let (vm, timing) = self.provision_vm(base, provisioning, &template, options)?;
            if vm_idx < boot_wait_vms {
                waiters.push(spawn_boot_waiter(
                    Arc::clone(&self.channel_host),
                    vm,
                    timing.start_called,
                ));
            }
            eprintln!(
                "  VM {}: disk {:.0} ms, define {:.0} ms, start {:.0} ms",
                vm_idx + 1,
                milliseconds(timing.disk),
                milliseconds(timing.define),
                milliseconds(timing.start)
            );
            vms.push(timing);
        }
        let wall = phase_started.elapsed();
        let boot_timeout = Duration::from_secs(options.boot_timeout_seconds);
        let deadline = Instant::now() + boot_timeout;
        let mut boots = Vec::with_capacity(waiters.len());
        for waiter in waiters {
            boots.push(wait_for_boot(&waiter, deadline)?);
        }
        self.tear_down_phase()?;

        // One more VM, provisioned and booted with nothing else running:
        // the best case a user waits for.
        let lone_boot = if boot_wait_vms > 0 {
            check_interrupted()?;
            let (vm, timing) = self.provision_vm(base, provisioning, &template, options)?;
            let waiter = spawn_boot_waiter(Arc::clone(&self.channel_host), vm, timing.start_called);
            let outcome = wait_for_boot(&waiter, Instant::now() + boot_timeout)?;
            self.tear_down_phase()?;
            Some(outcome)
        } else {
            None
        };
        Ok(PhaseReport {
            provisioning,
            base_label: base.label,
            base_bytes: base.volume.capacity_bytes,
            wall,
            vms,
            boots,
            lone_boot,
        })
    }

    /// Disk, define, start: one VM, timed step by step.
    fn provision_vm(
        &mut self,
        base: &BaseImage,
        provisioning: Provisioning,
        template: &Template,
        options: &BenchOptions,
    ) -> anyhow::Result<(VmId, VmTiming)> {
        let vm = VmId::random();
        self.live_vms.push(vm);
        let disk_started = Instant::now();
        let disk_path = match provisioning {
            Provisioning::LinkedClone => {
                self.host
                    .create_linked_clone(vm, &base.image)
                    .context("create_linked_clone")?
                    .path
            }
            Provisioning::FullCopy(format) => self.full_copy(vm, base, format)?,
        };
        if options.fsync_disks {
            File::open(&disk_path)
                .and_then(|file| file.sync_all())
                .with_context(|| format!("cannot fsync {disk_path}"))?;
        }
        let define_started = Instant::now();
        let spec = DomainSpec::for_template(
            template,
            vm,
            DomainKind::Qemu,
            disk_path,
            NetworkAttachment::None,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            // Nobody connects to the display; a fresh secret keeps it locked.
            VmId::random().to_string(),
        );
        match provisioning {
            Provisioning::FullCopy(CopyFormat::Raw) => self.define_raw_disk_domain(&spec)?,
            _ => self.host.define_domain(&spec).context("define_domain")?,
        }
        let start_called = Instant::now();
        self.host.start_domain(vm).context("start_domain")?;
        let started = Instant::now();
        Ok((
            vm,
            VmTiming {
                disk: define_started - disk_started,
                define: start_called - define_started,
                start: started - start_called,
                start_called,
            },
        ))
    }

    /// The baseline: a whole copy of the base, made by libvirt.
    fn full_copy(
        &mut self,
        vm: VmId,
        base: &BaseImage,
        format: CopyFormat,
    ) -> anyhow::Result<String> {
        let name = format!(
            "dg-bench-copy-{}.{}",
            hex_of(vm),
            format.volume_format().as_str()
        );
        let pool = StoragePool::lookup_by_name(&self.connection, &self.pool_name)
            .context("look up the bench pool")?;
        let base_volume = StorageVol::lookup_by_name(&pool, &naming::base_volume_name(&base.image))
            .context("look up the base volume")?;
        let xml = domain_xml::render_base_volume_xml(
            &name,
            base.volume.capacity_bytes,
            format.volume_format(),
        );
        self.live_copies.push(name.clone());
        let copy = StorageVol::create_xml_from(&pool, &xml, &base_volume, 0)
            .with_context(|| format!("cannot copy the {} base to {name}", base.label))?;
        copy.get_path().context("read the copy's path")
    }

    /// deskgrid's domain XML always opens its disk as qcow2; a raw copy needs
    /// the driver type changed, so this defines the domain itself.
    fn define_raw_disk_domain(&self, spec: &DomainSpec) -> anyhow::Result<()> {
        const QCOW2_DRIVER: &str = "<driver name='qemu' type='qcow2'";
        let xml = domain_xml::render_domain_xml(spec);
        if !xml.contains(QCOW2_DRIVER) {
            bail!(
                "the domain XML no longer has {QCOW2_DRIVER:?}: update the bench's raw-disk patch"
            );
        }
        let xml = xml.replacen(QCOW2_DRIVER, "<driver name='qemu' type='raw'", 1);
        Domain::define_xml(&self.connection, &xml).context("define a raw-disk domain")?;
        Ok(())
    }

    /// Running domains that are not this bench's (other tests on the same
    /// libvirtd compete for the same cores).
    fn foreign_running_domains(&self) -> String {
        match self
            .connection
            .list_all_domains(virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        {
            Ok(domains) => domains
                .iter()
                .filter_map(|domain| domain.get_name().ok())
                .filter(|name| {
                    !self
                        .live_vms
                        .iter()
                        .any(|vm| *name == naming::domain_name(*vm))
                })
                .count()
                .to_string(),
            Err(error) => format!("unknown ({})", error.message()),
        }
    }

    /// Destroys and undefines the phase's domains (with their overlays) and
    /// deletes its full copies.
    fn tear_down_phase(&mut self) -> anyhow::Result<()> {
        for vm in std::mem::take(&mut self.live_vms) {
            remove_domain(&*self.host, vm).with_context(|| format!("cannot remove VM {vm}"))?;
        }
        if !self.live_copies.is_empty() {
            let pool = StoragePool::lookup_by_name(&self.connection, &self.pool_name)
                .context("look up the bench pool")?;
            for name in std::mem::take(&mut self.live_copies) {
                if let Ok(volume) = StorageVol::lookup_by_name(&pool, &name) {
                    volume
                        .delete(0)
                        .with_context(|| format!("cannot delete {name}"))?;
                }
            }
        }
        Ok(())
    }

    /// Best effort: everything the bench made goes, whatever state it is in.
    fn clean_up(&mut self) {
        for vm in std::mem::take(&mut self.live_vms) {
            if let Err(error) = remove_domain(&*self.host, vm) {
                eprintln!("cleanup: VM {vm}: {error}");
            }
        }
        self.live_copies.clear();
        if let Ok(pool) = StoragePool::lookup_by_name(&self.connection, &self.pool_name) {
            if pool.is_active().unwrap_or(false) {
                let _ = pool.refresh(0);
                for volume in pool.list_all_volumes(0).unwrap_or_default() {
                    if let Err(error) = volume.delete(0) {
                        eprintln!("cleanup: volume: {}", error.message());
                    }
                }
                if let Err(error) = pool.destroy() {
                    eprintln!("cleanup: stop pool {}: {}", self.pool_name, error.message());
                }
            }
            if let Err(error) = pool.undefine() {
                eprintln!(
                    "cleanup: undefine pool {} (virsh pool-undefine {0}): {}",
                    self.pool_name,
                    error.message()
                );
            }
        }
        match std::fs::remove_dir_all(&self.pool_path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => eprintln!("cleanup: {}: {error}", self.pool_path.display()),
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        self.clean_up();
    }
}

/// Off (destroyed if running) and undefined, with its overlay; a VM whose
/// domain was never defined is fine.
fn remove_domain(host: &dyn Hypervisor, vm: VmId) -> Result<(), ActuatorError> {
    match host.destroy_domain(vm) {
        Ok(()) => host.undefine_domain(vm),
        Err(ActuatorError::DomainNotFound { .. }) => {
            match host.delete_volume(&deskgrid::actuator::VolumeName::Overlay(vm)) {
                Ok(()) | Err(ActuatorError::VolumeNotFound { .. }) => Ok(()),
                Err(error) => Err(error),
            }
        }
        Err(error) => Err(error),
    }
}

/// A thread that opens the VM's agent channel and reports its first line.
fn spawn_boot_waiter(
    host: Arc<LibvirtHypervisor>,
    vm: VmId,
    start_called: Instant,
) -> mpsc::Receiver<BootOutcome> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let outcome = match read_first_line(&*host, vm) {
            Ok(line) => {
                let since_start = start_called.elapsed();
                if line.starts_with(GUEST_HELLO) {
                    BootOutcome::Line {
                        since_start,
                        guest_boot_ms: field(&line, "boot_ms=").and_then(|ms| ms.parse().ok()),
                        uuid_matches: field(&line, "uuid=")
                            .is_some_and(|uuid| uuid.eq_ignore_ascii_case(&vm.to_string())),
                    }
                } else {
                    BootOutcome::Failed(format!("unexpected first line {line:?}"))
                }
            }
            Err(error) => BootOutcome::Failed(format!("{error:#}")),
        };
        // The receiver is gone when the bench stopped waiting; nothing to do.
        let _ = sender.send(outcome);
    });
    receiver
}

fn read_first_line(host: &dyn Hypervisor, vm: VmId) -> anyhow::Result<String> {
    let channel = host.open_guest_channel(vm).context("open_guest_channel")?;
    let mut line = String::new();
    let read = std::io::BufReader::new(channel)
        .read_line(&mut line)
        .context("read the agent channel")?;
    if read == 0 {
        bail!("the agent channel closed before a line");
    }
    Ok(line.trim_end().to_owned())
}

/// The value after `key` in a `key=value key=value` line.
fn field<'line>(line: &'line str, key: &str) -> Option<&'line str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key))
}

fn wait_for_boot(
    waiter: &mpsc::Receiver<BootOutcome>,
    deadline: Instant,
) -> anyhow::Result<BootOutcome> {
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= deadline {
            return Ok(BootOutcome::TimedOut);
        }
        // Short slices so Ctrl-C is noticed while guests boot.
        let slice = (deadline - now).min(Duration::from_millis(200));
        match waiter.recv_timeout(slice) {
            Ok(outcome) => return Ok(outcome),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Ok(BootOutcome::Failed("the waiter thread died".to_owned()))
            }
        }
    }
}

/// Runs tests/guest/build-guest.sh (cached after the first build) and
/// returns the image path it prints last.
fn build_guest_image() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/build-guest.sh");
    let output = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed: {}", script.display(), output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .with_context(|| format!("{} printed no image path", script.display()))?;
    Ok(PathBuf::from(path))
}

fn install_signal_handler() {
    std::thread::spawn(|| {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("no Ctrl-C cleanup: cannot start the signal runtime: {error}");
                return;
            }
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
                    eprintln!("interrupted again: exiting without cleanup (look for dg-bench-* in virsh pool-list)");
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

/// A reader that fails once the bench is interrupted, so a long import stops
/// (and `import_base_image` removes the half volume).
struct Interruptible<'source>(&'source mut dyn Read);

impl Read for Interruptible<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if INTERRUPTED.load(Ordering::SeqCst) {
            // Not `ErrorKind::Interrupted`: readers retry on that.
            return Err(std::io::Error::other("interrupted"));
        }
        self.0.read(buffer)
    }
}

/// `remaining` bytes of xorshift64* output: incompressible and never zero
/// for long, so neither sparse copies nor zero detection can skip them, and
/// generated at several GB/s so the import measures libvirt, not this.
struct PseudoRandomBytes {
    state: u64,
    remaining: u64,
}

impl PseudoRandomBytes {
    fn new(remaining: u64) -> Self {
        Self {
            // Any non-zero seed; fixed, so every run copies the same bytes.
            state: 0x9E37_79B9_7F4A_7C15,
            remaining,
        }
    }

    fn next_word(&mut self) -> u64 {
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl Read for PseudoRandomBytes {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let length = usize::try_from(self.remaining)
            .unwrap_or(usize::MAX)
            .min(buffer.len());
        let buffer = &mut buffer[..length];
        let mut chunks = buffer.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_word().to_le_bytes());
        }
        let tail = chunks.into_remainder();
        let word = self.next_word().to_le_bytes();
        let tail_length = tail.len();
        tail.copy_from_slice(&word[..tail_length]);
        self.remaining -= length as u64;
        Ok(length)
    }
}

/// The 1, 5 and 15 minute load averages: the machine may be shared.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn hex_of(vm: VmId) -> String {
    hex::encode(vm.as_bytes())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn megabytes_per_second(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Nearest-rank percentile (`fraction` in 0..=1) of unsorted `values`;
/// with five values, p95 is the largest.
fn percentile(values: &[Duration], fraction: f64) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (fraction * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(values: &[Duration]) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        length if length % 2 == 1 => sorted[length / 2],
        length => (sorted[length / 2 - 1] + sorted[length / 2]) / 2,
    }
}

fn print_imports(bases: &[BaseImage]) {
    println!("base images (import_base_image: raw, one libvirt upload stream)");
    println!(
        "{:<8} {:>10} {:>10} {:>8}",
        "base", "size MiB", "import s", "MB/s"
    );
    for base in bases {
        println!(
            "{:<8} {:>10.1} {:>10.2} {:>8.0}",
            base.label,
            mib(base.volume.capacity_bytes),
            base.import_time.as_secs_f64(),
            megabytes_per_second(base.volume.capacity_bytes, base.import_time)
        );
    }
}

fn print_phases(reports: &[PhaseReport]) {
    println!("provisioning (per VM: disk + define + start; VMs/s = N / phase wall time)");
    println!(
        "{:<18} {:<6} {:>9} {:>3} {:>8} {:>7} {:>10} {:>8} {:>8} {:>9} {:>8}",
        "phase",
        "base",
        "base MiB",
        "N",
        "total s",
        "VMs/s",
        "median ms",
        "p95 ms",
        "disk ms",
        "define ms",
        "start ms"
    );
    for report in reports {
        let totals: Vec<Duration> = report.vms.iter().map(VmTiming::total).collect();
        let step = |pick: fn(&VmTiming) -> Duration| {
            milliseconds(median(&report.vms.iter().map(pick).collect::<Vec<_>>()))
        };
        println!(
            "{:<18} {:<6} {:>9.0} {:>3} {:>8.2} {:>7.2} {:>10.0} {:>8.0} {:>8.0} {:>9.0} {:>8.0}",
            report.provisioning.label(),
            report.base_label,
            mib(report.base_bytes),
            report.vms.len(),
            report.wall.as_secs_f64(),
            report.vms_per_second(),
            milliseconds(median(&totals)),
            milliseconds(percentile(&totals, 0.95)),
            step(|timing| timing.disk),
            step(|timing| timing.define),
            step(|timing| timing.start),
        );
    }
    println!("(disk, define, start: medians of each step)");
    for report in reports {
        if let Provisioning::FullCopy(_) = report.provisioning {
            let disks: Vec<Duration> = report.vms.iter().map(|timing| timing.disk).collect();
            println!(
                "full copy of the {} base: {:.0} MB/s (median copy)",
                report.base_label,
                megabytes_per_second(report.base_bytes, median(&disks))
            );
        }
    }
}

fn print_ratios(reports: &[PhaseReport]) {
    println!();
    for pair in reports.chunks(2) {
        if let [linked, full] = pair {
            let linked_totals: Vec<Duration> = linked.vms.iter().map(VmTiming::total).collect();
            let full_totals: Vec<Duration> = full.vms.iter().map(VmTiming::total).collect();
            let linked_disks: Vec<Duration> = linked.vms.iter().map(|timing| timing.disk).collect();
            let full_disks: Vec<Duration> = full.vms.iter().map(|timing| timing.disk).collect();
            println!(
                "ratio on the {} base ({:.0} MiB): linked/full {:.2}x VMs/s, per VM {:.2}x faster (median), disk step alone {:.1}x faster (median)",
                linked.base_label,
                mib(linked.base_bytes),
                linked.vms_per_second() / full.vms_per_second(),
                median(&full_totals).as_secs_f64() / median(&linked_totals).as_secs_f64(),
                median(&full_disks).as_secs_f64() / median(&linked_disks).as_secs_f64()
            );
        }
    }
}

fn print_boots(reports: &[PhaseReport]) {
    println!();
    println!("boot: start_domain call -> first agent line; in brackets the guest's own uptime at that line (TCG clock, approximate)");
    println!(
        "{:<18} {:<6} {:>14}  {:<46} median",
        "phase", "base", "lone VM", "first VMs of the phase (all N running)"
    );
    for report in reports {
        let lone = report
            .lone_boot
            .as_ref()
            .map_or("-".to_owned(), |boot| boot_cell(boot).0);
        let mut times = Vec::new();
        let mut cells = Vec::new();
        for boot in &report.boots {
            let (cell, time) = boot_cell(boot);
            cells.push(cell);
            times.extend(time);
        }
        let summary = if times.is_empty() {
            "no line".to_owned()
        } else {
            format!("{:.1} s", median(&times).as_secs_f64())
        };
        println!(
            "{:<18} {:<6} {:>14}  {:<46} {summary}",
            report.provisioning.label(),
            report.base_label,
            lone,
            cells.join(", "),
        );
    }
}

/// "12.3 s (4100)" and the time, or what went wrong.
fn boot_cell(boot: &BootOutcome) -> (String, Option<Duration>) {
    match boot {
        BootOutcome::Line {
            since_start,
            guest_boot_ms,
            uuid_matches,
        } => {
            let uptime = guest_boot_ms.map_or("?".to_owned(), |ms| format!("{ms}"));
            let uuid = if *uuid_matches { "" } else { " UUID MISMATCH" };
            (
                format!("{:.1} s ({uptime}){uuid}", since_start.as_secs_f64()),
                Some(*since_start),
            )
        }
        BootOutcome::Failed(error) => (format!("failed: {error}"), None),
        BootOutcome::TimedOut => ("timed out".to_owned(), None),
    }
}
