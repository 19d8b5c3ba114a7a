//! mDNS discovery over real multicast, inside network namespaces this test
//! creates, never on the machine's real interfaces (DESIGN.md section 10).
//!
//! Each test runs as a parent and one or more children. The parent (root)
//! creates the namespaces and re-executes this test binary inside them with
//! `ip netns exec NS <this binary> --exact <test> --nocapture`, telling the
//! child what to do through `DESKGRID_DISCOVERY_TEST_ROLE`; a child ends its
//! output with `CHILD-OK <role>`, which the parent requires, so a renamed
//! test cannot pass by running nothing. The namespaces are deleted by a
//! guard even when the test fails; namespaces left by a test process that
//! was killed outright are deleted by the next run.
//!
//! What multicast needs in a namespace (found here, iproute2 6.1, Linux 6.x):
//! nothing beyond `ip -n NS link set lo up`. `lo` shows no `MULTICAST` flag
//! and the namespace has no multicast route, yet mdns-sd's socket sets
//! `IP_MULTICAST_IF` to the interface address and joins 224.0.0.251 on it,
//! which is all the kernel needs to deliver looped-back multicast; no
//! `link set lo multicast on` and no `route add 224.0.0.0/4` was needed. A
//! veth pair between two namespaces carries multicast as it is, once both
//! ends have an IPv4 address and are up.
//!
//! Without root or without `ip netns`, a test prints a line starting
//! `SKIPPED:` with the reason and passes (visible with `--nocapture`).
//! A failure to discover is a failure, not a skip.
//!
//! Slow on purpose: every browse listens for a fixed 1.5–2.5 s, because mDNS
//! answers arrive when they arrive; each test stays under ~10 s.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use deskgrid::federation::discovery::{
    self, Advertiser, DiscoveredGrid, DiscoveredServer, InterfaceScope, ADVERTISEMENT_VERSION,
    SERVICE_TYPE,
};
use deskgrid::model::{GridId, ServerId};
use mdns_sd::ServiceInfo;

const ROLE_VAR: &str = "DESKGRID_DISCOVERY_TEST_ROLE";
/// Every namespace this test makes is `dgdisc-<pid>-<tag>`.
const NETNS_PREFIX: &str = "dgdisc-";
/// Long enough for mdns-sd to probe (about 750 ms), announce and answer a
/// query with room to spare on a loaded 2-core machine; short enough to
/// keep the suite quick.
const BROWSE_TIME: Duration = Duration::from_millis(2500);
/// A browse that expects to find nothing, or only confirms a goodbye.
const SHORT_BROWSE_TIME: Duration = Duration::from_millis(1500);
/// A child that runs longer than this is killed and the test fails.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

const LOOPBACK_TEST: &str = "loopback_namespace_discovers_grids";
const VETH_TEST: &str = "veth_pair_discovers_across_namespaces";

/// Both ends of the veth pair live only inside the test's namespaces, so
/// these names and addresses cannot collide with anything on the host.
const VETH_ADVERTISER: &str = "dg-veth0";
const VETH_BROWSER: &str = "dg-veth1";
const VETH_ADVERTISER_CIDR: &str = "10.250.0.1/24";
const VETH_BROWSER_CIDR: &str = "10.250.0.2/24";

fn grid_a() -> GridId {
    GridId::from_bytes([0xa0; 16])
}
fn grid_b() -> GridId {
    GridId::from_bytes([0xb0; 16])
}
fn server_a1() -> ServerId {
    ServerId::from_bytes([0xa1; 16])
}
fn server_a2() -> ServerId {
    ServerId::from_bytes([0xa2; 16])
}
fn server_b1() -> ServerId {
    ServerId::from_bytes([0xb1; 16])
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("test addresses are well formed")
}

fn server(server_id: ServerId, addresses: &[&str]) -> DiscoveredServer {
    DiscoveredServer {
        server_id,
        addresses: addresses.iter().map(|text| addr(text)).collect(),
        version: ADVERTISEMENT_VERSION,
    }
}

/// Three members of two grids on one namespace's loopback, plus two
/// advertisements a browser must skip; one member then leaves.
#[test]
fn loopback_namespace_discovers_grids() -> anyhow::Result<()> {
    if let Some(role) = child_role() {
        return run_child(&role);
    }
    let Some(()) = check_prerequisites()? else {
        return Ok(());
    };
    let Some(netns) = Netns::create("lo")? else {
        return Ok(());
    };
    netns.ip(&["link", "set", "lo", "up"])?;

    let child = NetnsChild::spawn(&netns, LOOPBACK_TEST, "loopback", false)?;
    child.finish_ok("loopback")?;
    Ok(())
}

/// A member advertises on one end of a veth pair; a browser in another
/// namespace finds it on the other end, and does not on loopback.
#[test]
fn veth_pair_discovers_across_namespaces() -> anyhow::Result<()> {
    if let Some(role) = child_role() {
        return run_child(&role);
    }
    let Some(()) = check_prerequisites()? else {
        return Ok(());
    };
    let Some(advertiser_netns) = Netns::create("va")? else {
        return Ok(());
    };
    let Some(browser_netns) = Netns::create("vb")? else {
        return Ok(());
    };
    // Created inside the first namespace with its peer moved straight into
    // the second: neither end ever exists in the host's namespace.
    advertiser_netns.ip(&[
        "link",
        "add",
        VETH_ADVERTISER,
        "type",
        "veth",
        "peer",
        "name",
        VETH_BROWSER,
        "netns",
        &browser_netns.name,
    ])?;
    advertiser_netns.ip(&["addr", "add", VETH_ADVERTISER_CIDR, "dev", VETH_ADVERTISER])?;
    browser_netns.ip(&["addr", "add", VETH_BROWSER_CIDR, "dev", VETH_BROWSER])?;
    for (netns, device) in [
        (&advertiser_netns, VETH_ADVERTISER),
        (&browser_netns, VETH_BROWSER),
    ] {
        netns.ip(&["link", "set", "lo", "up"])?;
        netns.ip(&["link", "set", device, "up"])?;
    }

    let mut advertiser = NetnsChild::spawn(&advertiser_netns, VETH_TEST, "veth-advertise", true)?;
    advertiser.wait_for_line("READY", Duration::from_secs(10))?;
    let browser = NetnsChild::spawn(&browser_netns, VETH_TEST, "veth-browse", false)?;
    let browsed = browser.finish_ok("veth-browse");
    // Closing its stdin tells the advertiser to withdraw and exit.
    advertiser.close_stdin();
    let advertised = advertiser.finish_ok("veth-advertise");
    browsed?;
    advertised?;
    Ok(())
}

// ---------------------------------------------------------------- children

fn child_role() -> Option<String> {
    std::env::var(ROLE_VAR).ok()
}

fn run_child(role: &str) -> anyhow::Result<()> {
    // RUST_LOG=deskgrid=debug shows skipped advertisements.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    match role {
        "loopback" => loopback_child(),
        "veth-advertise" => veth_advertise_child(),
        "veth-browse" => veth_browse_child(),
        other => bail!("unknown {ROLE_VAR} {other:?}"),
    }?;
    println!("CHILD-OK {role}");
    Ok(())
}

fn loopback_child() -> anyhow::Result<()> {
    let scope = InterfaceScope::LoopbackOnly;
    let a1 = Advertiser::start(
        &scope,
        grid_a(),
        server_a1(),
        addr("127.0.0.1:7001"),
        "member-a1",
    )?;
    // Listening on every address: the daemon fills in the loopback address.
    let _a2 = Advertiser::start(
        &scope,
        grid_a(),
        server_a2(),
        addr("0.0.0.0:7002"),
        "member-a2",
    )?;
    let _b1 = Advertiser::start(
        &scope,
        grid_b(),
        server_b1(),
        addr("127.0.0.1:7003"),
        "member-b1",
    )?;
    let _foreign = ForeignAdvertisements::start()?;

    let started = Instant::now();
    let grids = discovery::browse(&scope, BROWSE_TIME)?;
    println!("browse of 3 members took {:?}", started.elapsed());
    let expected = vec![
        DiscoveredGrid {
            grid_id: grid_a(),
            servers: vec![
                server(server_a1(), &["127.0.0.1:7001"]),
                server(server_a2(), &["127.0.0.1:7002"]),
            ],
        },
        DiscoveredGrid {
            grid_id: grid_b(),
            servers: vec![server(server_b1(), &["127.0.0.1:7003"])],
        },
    ];
    ensure!(
        grids == expected,
        "found {grids:#?}\nexpected {expected:#?}"
    );

    // A member that shuts down is no longer found.
    a1.shutdown()?;
    let started = Instant::now();
    let grids = discovery::browse(&scope, SHORT_BROWSE_TIME)?;
    println!("browse after a goodbye took {:?}", started.elapsed());
    let expected = vec![
        DiscoveredGrid {
            grid_id: grid_a(),
            servers: vec![server(server_a2(), &["127.0.0.1:7002"])],
        },
        DiscoveredGrid {
            grid_id: grid_b(),
            servers: vec![server(server_b1(), &["127.0.0.1:7003"])],
        },
    ];
    ensure!(
        grids == expected,
        "after a1 left, found {grids:#?}\nexpected {expected:#?}"
    );
    Ok(())
}

fn veth_advertise_child() -> anyhow::Result<()> {
    let advertiser = Advertiser::start(
        &InterfaceScope::Named(vec![VETH_ADVERTISER.to_owned()]),
        grid_a(),
        server_a1(),
        addr("0.0.0.0:7443"),
        "member-veth",
    )?;
    println!("READY");
    // Serve until the parent closes stdin, or give up at the deadline.
    let (eof_sender, eof_receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        let _ = eof_sender.send(());
    });
    eof_receiver
        .recv_timeout(CHILD_DEADLINE)
        .context("the parent never closed stdin")?;
    advertiser.shutdown()?;
    Ok(())
}

fn veth_browse_child() -> anyhow::Result<()> {
    let started = Instant::now();
    let on_loopback = discovery::browse(&InterfaceScope::LoopbackOnly, SHORT_BROWSE_TIME)?;
    println!("loopback-only browse took {:?}", started.elapsed());
    ensure!(
        on_loopback.is_empty(),
        "a loopback-only browse reached across the veth: {on_loopback:#?}"
    );

    let started = Instant::now();
    let grids = discovery::browse(
        &InterfaceScope::Named(vec![VETH_BROWSER.to_owned()]),
        BROWSE_TIME,
    )?;
    println!("browse over the veth took {:?}", started.elapsed());
    let advertiser_ip = VETH_ADVERTISER_CIDR
        .split('/')
        .next()
        .expect("a CIDR has an address part");
    let expected = vec![DiscoveredGrid {
        grid_id: grid_a(),
        servers: vec![server(server_a1(), &[&format!("{advertiser_ip}:7443")])],
    }];
    ensure!(
        grids == expected,
        "found {grids:#?}\nexpected {expected:#?}"
    );
    Ok(())
}

/// Advertisements of the deskgrid service type that a browser must skip:
/// one of another advertisement version, one with a malformed grid id.
/// Made with mdns-sd directly, since `Advertiser` cannot make them.
struct ForeignAdvertisements {
    daemon: mdns_sd::ServiceDaemon,
}

impl ForeignAdvertisements {
    fn start() -> anyhow::Result<Self> {
        let daemon = mdns_sd::ServiceDaemon::new()?;
        daemon.disable_interface(mdns_sd::IfKind::All)?;
        daemon.enable_interface(mdns_sd::IfKind::LoopbackV4)?;
        let newer_version = ServiceInfo::new(
            SERVICE_TYPE,
            "from-the-future",
            "future.local.",
            "127.0.0.1",
            7101,
            &[
                ("grid", grid_a().to_string()),
                ("server", ServerId::from_bytes([0xf1; 16]).to_string()),
                ("v", "2".to_owned()),
            ][..],
        )?;
        let malformed = ServiceInfo::new(
            SERVICE_TYPE,
            "malformed",
            "malformed.local.",
            "127.0.0.1",
            7102,
            &[
                ("grid", "not-a-grid".to_owned()),
                ("server", ServerId::from_bytes([0xf2; 16]).to_string()),
                ("v", "1".to_owned()),
            ][..],
        )?;
        daemon.register(newer_version)?;
        daemon.register(malformed)?;
        Ok(Self { daemon })
    }
}

impl Drop for ForeignAdvertisements {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

// ---------------------------------------------------------------- parent

/// `Some(())` when the test can run; `None` after printing why it cannot.
fn check_prerequisites() -> anyhow::Result<Option<()>> {
    if !nix::unistd::geteuid().is_root() {
        println!("SKIPPED: network namespaces need root, and this test runs as another user");
        return Ok(None);
    }
    match Command::new("ip").arg("-V").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            println!(
                "SKIPPED: `ip -V` failed ({}), iproute2 is needed for network namespaces",
                output.status
            );
            return Ok(None);
        }
        Err(error) => {
            println!("SKIPPED: cannot run `ip` ({error}): install iproute2");
            return Ok(None);
        }
    }
    // Once per process: the tests run in parallel threads and would race.
    static STALE_REMOVED: std::sync::Once = std::sync::Once::new();
    STALE_REMOVED.call_once(remove_stale_namespaces);
    Ok(Some(()))
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
struct Netns {
    name: String,
}

impl Netns {
    /// `None` (after printing `SKIPPED:`) when this machine refuses to make
    /// a namespace at all.
    fn create(tag: &str) -> anyhow::Result<Option<Self>> {
        let name = format!("{NETNS_PREFIX}{}-{tag}", std::process::id());
        let output = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .context("running ip netns add")?;
        if !output.status.success() {
            println!(
                "SKIPPED: `ip netns add {name}` failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return Ok(None);
        }
        Ok(Some(Self { name }))
    }

    /// `ip -n <this namespace> <args>`, failing with its stderr.
    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .with_context(|| format!("running ip -n {} {}", self.name, args.join(" ")))?;
        ensure!(
            output.status.success(),
            "ip -n {} {} failed ({}): {}",
            self.name,
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

fn delete_netns(name: &str) {
    match Command::new("ip").args(["netns", "del", name]).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "could not delete network namespace {name} ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => eprintln!("could not run ip netns del {name}: {error}"),
    }
}

/// Deletes `dgdisc-<pid>-*` namespaces whose test process no longer runs
/// (one killed before its guards ran).
fn remove_stale_namespaces() {
    let Ok(output) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // Lines are `name` or `name (id: N)`.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("removing stale network namespace {name}");
            delete_netns(name);
        }
    }
}

/// This test binary, re-executed inside a namespace in a child role. Killed
/// on drop if it still runs.
struct NetnsChild {
    child: Child,
    description: String,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stdout_reader: Option<JoinHandle<()>>,
    stderr_reader: Option<JoinHandle<String>>,
}

impl NetnsChild {
    fn spawn(netns: &Netns, test_name: &str, role: &str, keep_stdin: bool) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this test binary")?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns.name])
            .arg(&exe)
            .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
            .env(ROLE_VAR, role)
            .stdin(if keep_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ip netns exec")?;
        let stdout = child.stdout.take().context("the child's stdout is piped")?;
        let stderr = child.stderr.take().context("the child's stderr is piped")?;
        let (line_sender, lines) = mpsc::channel();
        let stdout_reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            text
        });
        Ok(Self {
            child,
            description: format!("{role} in {}", netns.name),
            lines,
            seen: Vec::new(),
            stdout_reader: Some(stdout_reader),
            stderr_reader: Some(stderr_reader),
        })
    }

    fn wait_for_line(&mut self, wanted: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(remaining) {
                Ok(line) => {
                    let found = line_ends_with(&line, wanted);
                    self.seen.push(line);
                    if found {
                        return Ok(());
                    }
                }
                Err(_) => bail!(
                    "{} did not print {wanted:?} within {timeout:?}; stdout so far:\n{}",
                    self.description,
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn close_stdin(&mut self) {
        drop(self.child.stdin.take());
    }

    /// Waits for the child (killing it at the deadline), prints its output,
    /// and requires success and its `CHILD-OK` line.
    fn finish_ok(mut self, role: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let status = self.wait_until(started + CHILD_DEADLINE)?;
        if let Some(reader) = self.stdout_reader.take() {
            let _ = reader.join();
        }
        self.seen.extend(self.lines.try_iter());
        let stderr = self
            .stderr_reader
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default();
        let stdout = self.seen.join("\n");
        println!("--- {} stdout:\n{stdout}", self.description);
        if !stderr.trim().is_empty() {
            println!("--- {} stderr:\n{stderr}", self.description);
        }
        let Some(status) = status else {
            bail!(
                "{} was still running after {CHILD_DEADLINE:?} and was killed",
                self.description
            );
        };
        ensure!(status.success(), "{} failed: {status}", self.description);
        let marker = format!("CHILD-OK {role}");
        ensure!(
            self.seen.iter().any(|line| line_ends_with(line, &marker)),
            "{} exited without {marker:?}: did it run the test at all?",
            self.description
        );
        Ok(())
    }

    /// The exit status, or `None` if it had to be killed at `deadline`.
    fn wait_until(&mut self, deadline: Instant) -> anyhow::Result<Option<ExitStatus>> {
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                self.child.wait()?;
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The test harness prints `test NAME ... ` with no newline before the
/// test's own output, so a marker can end a line rather than fill it.
fn line_ends_with(line: &str, marker: &str) -> bool {
    let line = line.trim_end();
    line == marker || line.ends_with(&format!(" {marker}"))
}

impl Drop for NetnsChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
