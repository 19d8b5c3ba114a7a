//! Desktops end to end: two real `deskgrid serve` processes (QUIC on
//! 127.0.0.1) on `qemu:///system`, each with a libvirt pool of its own, the
//! tiny test guest with the real `deskgrid-agent` inside (TCG), and users
//! logging in through `deskgrid connect`, as an admin and a user would.
//!
//! The grid is made the way `scripts/demo.sh` makes it: alpha creates the
//! grid, beta joins with a token, the guest is imported on alpha (`deskgrid
//! image import`), a pooled template asks for two copies of the image and
//! then four small VMs, five users are added and entitled. The servers'
//! policy loops copy the image, create and boot the VMs; the agents' hellos
//! make them ready. Then:
//!
//! - four users connect at the same moment and get four different desktops
//!   (each with its own display and one-time ticket in a private `.vv`
//!   file), on the servers that host them; a fifth is told none are free;
//!   the grid shows the four reservations; the first user connecting again
//!   is sent back to the same desktop, which stays theirs as long as the
//!   new answer says; reservations nobody logs in to lapse and their
//!   desktops are ready again;
//! - with one desktop taken on server S (by a user who logs in through
//!   alpha's HTTPS API with curl: a token, then the reservation as JSON and
//!   as a `.vv` file), the other server K is the broker's first choice for
//!   a new user (least loaded). K is SIGKILLed (its VMs
//!   keep running, out of reach) and a user connects on S at once: the
//!   broker asks K, gets no answer within its deadline, falls back to S and
//!   the user gets S's free desktop; the missed deadline reaches S's failure
//!   detector as a hint.
//! - on one server with one pooled desktop whose guest logs carol in by
//!   itself (utmp, as login(1) writes it) and out again: the grid shows her
//!   session, the logout makes the policy loop refresh the desktop (a new
//!   QEMU process on a fresh disk), and it comes back ready; her next login
//!   lands on the same VM.
//!
//! Slow (about 20-30 s to get four guests ready under emulation on a 2-core
//! machine, then the first test waits out a reservation's 30 s lifetime); it runs in the suite because only real processes, QEMU and
//! agents show that the broker, the peer RPC and the desktop services fit
//! together. The tests take turns (one grid at a time is what the machine
//! affords). A host without libvirtd fails (run `bash
//! scripts/setup-host.sh`); it never skips. [`GridCleanup`] stops the
//! servers and removes the domains, pools, volumes and directories the test
//! made, whatever happens.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/desktop_guests.rs"]
mod desktop_guests;
#[path = "support/pool_grid.rs"]
mod pool_grid;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Output;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use common::{deskgrid, free_udp_port, stderr, stdout};
use deskgrid::desktop::broker::RESERVE_DEADLINE;
use desktop_guests::{
    count, guest_image, json, log_tail, ready_total, remove_domains_under, server, wall_clock_ms,
};
use pool_grid::{strings, token, Cleanup, Member, Serving, URI};
use serde_json::Value;
use virt::connect::Connect;

const IMAGE: &str = "desk-guest-1";
const TEMPLATE: &str = "desk";
const DESKTOPS: usize = 4;
const USERS: [&str; 5] = ["u1", "u2", "u3", "u4", "u5"];
const USER_PASSWORD: &str = "a desktop user's long password";
/// Each test, from the moment it has the machine to itself: four guests
/// booting at once under TCG on two cores say hello in about 30-90 s; the
/// rest takes seconds.
const TEST_BOUND: Duration = Duration::from_secs(240);
/// Status polls: cheap (one control-socket call), often enough to time the
/// steps to half a second.
const POLL: Duration = Duration::from_millis(500);
/// The returning user comes back a third of the way into the reservation
/// (`LifecyclePolicy::reservation_ttl_ms`, 30 s): well before it lapses.
const RETURN_AFTER: Duration = Duration::from_secs(10);
/// A lapse is noticed at the desktop service's next tick (1 s) and the
/// record travels to the other server in milliseconds.
const EXPIRY_SLACK_MS: u64 = 3_000;

/// One grid at a time: two would boot eight guests on two cores and blow
/// both tests' bounds.
static MACHINE: Mutex<()> = Mutex::new(());

/// Everything the test made on the host, removed when dropped (after a
/// failure too): the servers first (SIGKILL, so no policy loop makes a VM
/// after the sweep), then every domain whose disks are under the test's
/// directory, then (in `Cleanup`) the pools with their volumes, and last
/// the directory. After a failure the servers' last log lines are printed
/// before their logs go with it. Errors are ignored: each step may find its
/// object gone.
struct GridCleanup {
    inner: Cleanup,
    /// The test's directory: a domain whose XML names it is the test's.
    marker: String,
    /// Logs to print after a failure.
    logs: Vec<PathBuf>,
    /// Taken from `inner` (which would keep it after a failure) so that it
    /// goes after the pools: fields drop in order.
    dir_last: Option<tempfile::TempDir>,
}

impl Drop for GridCleanup {
    fn drop(&mut self) {
        self.inner.servers.clear();
        // A domain definition in flight when a server died may land a
        // moment later: sweep twice.
        for sweep in 0..2 {
            if sweep > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            remove_domains_under(&self.marker);
        }
        if std::thread::panicking() {
            for log in &self.logs {
                eprintln!("{}", log_tail(log));
            }
        }
        self.dir_last = self.inner.dir.take();
    }
}

/// The names of the running domains whose disks are in `member`'s pool.
fn domains_of(member: &Member) -> BTreeSet<String> {
    let marker = member.pool_path.display().to_string();
    let mut connection = Connect::open(Some(URI)).unwrap();
    let names = connection
        .list_all_domains(0)
        .unwrap()
        .into_iter()
        .filter(|domain| {
            domain
                .get_xml_desc(0)
                .is_ok_and(|xml| xml.contains(&marker))
        })
        .map(|domain| domain.get_name().unwrap())
        .collect();
    let _ = connection.close();
    names
}

/// A two-server grid with four ready desktops.
struct Grid {
    cleanup: GridCleanup,
    /// Server 0 made the grid; server 1 joined.
    members: [Member; 2],
    user_password: PathBuf,
    root: PathBuf,
    started: Instant,
}

impl Grid {
    fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|member| member.name == name)
            .unwrap_or_else(|| panic!("no server {name}"))
    }

    fn index_of(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|member| member.name == name)
            .unwrap()
    }

    fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Waits for `condition` on `member`'s status, within the test's bound;
    /// a timeout shows the status (and the cleanup the servers' last log
    /// lines).
    fn wait_for(&self, what: &str, member: &Member, condition: impl Fn(&Value) -> bool) -> Value {
        loop {
            let status = member.status();
            if condition(&status) {
                eprintln!("[{:6.1} s] {what}", self.elapsed());
                return status;
            }
            if self.started.elapsed() > TEST_BOUND {
                panic!(
                    "timed out after {:.1} s waiting until {what}; {}'s status:\n{status:#}",
                    self.elapsed(),
                    member.name,
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// `deskgrid --output json connect` for `user` through `member`'s
    /// server, its `.vv` file in the test's directory.
    fn connect(&self, member: &Member, user: &str) -> Connected {
        let vv_file = self
            .root
            .join(format!("{user}-via-{}-{}.vv", member.name, rand_suffix()));
        let password_file = self.user_password.display().to_string();
        let vv = vv_file.display().to_string();
        let started = Instant::now();
        let output = deskgrid(
            &member.data_dir,
            &[
                "--output",
                "json",
                "connect",
                "--user",
                user,
                "--password-file",
                &password_file,
                "--vv-file",
                &vv,
            ],
        );
        Connected {
            user: user.to_owned(),
            via: member.name,
            took: started.elapsed(),
            vv_file,
            output,
        }
    }

    /// `session list` as `member` sees it, sorted by user.
    fn sessions(&self, member: &Member) -> Vec<Value> {
        let output = deskgrid(&member.data_dir, &["--output", "json", "session", "list"]);
        assert!(output.status.success(), "session list: {}", stderr(&output));
        let mut sessions = json(&output).as_array().unwrap().clone();
        sessions.sort_by_key(|session| session["user"].as_str().unwrap_or("").to_owned());
        sessions
    }
}

/// Sleeps until the wall clock (what `expires_at_ms` is read against)
/// reaches `ms`.
fn sleep_until_wall_clock(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms.saturating_sub(wall_clock_ms())));
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// One `deskgrid connect` and what it answered.
struct Connected {
    user: String,
    via: &'static str,
    took: Duration,
    vv_file: PathBuf,
    output: Output,
}

impl Connected {
    /// The reservation of a connect that must have succeeded.
    fn reservation(&self) -> Value {
        assert!(
            self.output.status.success(),
            "{} via {} got no desktop ({}): {}{}",
            self.user,
            self.via,
            self.output.status,
            stdout(&self.output),
            stderr(&self.output)
        );
        let answer = json(&self.output);
        assert_eq!(
            answer["vv_file"].as_str(),
            Some(self.vv_file.to_str().unwrap())
        );
        answer["reservation"].clone()
    }
}

/// `vm` as libvirt names its domain (`dg-vm-` and 32 lowercase hex digits).
fn domain_name(vm: &Value) -> String {
    format!(
        "dg-vm-{}",
        vm.as_str().unwrap().replace('-', "").to_lowercase()
    )
}

/// `member`'s server settings, its desktops without a network card: this
/// host has no libvirt network named `default` (the setting's default),
/// and the agent talks over virtio-serial anyway.
fn settings(member: &Member, address: &str) -> Vec<String> {
    let mut settings = member.settings(address);
    // The HTTPS API on any free port (read back from `deskgrid status`).
    settings.extend(strings(&[
        "--network",
        "none",
        "--api-listen",
        "127.0.0.1:0",
    ]));
    settings
}

/// `curl` POSTing `body` to `member`'s HTTPS API at `path`, verifying the
/// server's certificate; the status and the body.
fn https_post(member: &Member, path: &str, body: &str, extra_headers: &[&str]) -> (u16, String) {
    let api = member.status()["api"].clone();
    assert_eq!(api["state"], "listening", "{api}");
    let certificate = member.data_dir.join("api/tls-cert.pem");
    let mut command = std::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "--max-time", "30"])
        .arg("--cacert")
        .arg(&certificate)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ])
        .args(["--write-out", "\n%{http_code}"]);
    for header in extra_headers {
        command.args(["-H", header]);
    }
    let output = command
        .arg(format!(
            "https://{}{path}",
            api["address"].as_str().unwrap()
        ))
        .output()
        .unwrap();
    assert!(output.status.success(), "curl: {}", stderr(&output));
    let text = stdout(&output);
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.trim().parse().unwrap(), body.to_owned())
}

/// Starts `member`'s server, logging to `member.log(1)`, and waits until it
/// has its pool running (an import at the same moment would race it to
/// define the pool).
/// `deskgrid init --new-grid` for `member` on a free loopback port, with
/// an admin password file in `root`; returns the address peers dial.
fn init_grid(member: &Member, root: &std::path::Path) -> String {
    let admin_password = root.join("admin-password");
    std::fs::write(&admin_password, "correct horse battery staple\n").unwrap();
    let address = format!("127.0.0.1:{}", free_udp_port());
    let mut init = strings(&[
        "init",
        "--new-grid",
        "--admin-password-file",
        &admin_password.display().to_string(),
    ]);
    init.extend(settings(member, &address));
    member.run(&init);
    address
}

/// The pooled test template: 1 vCPU, 192 MiB, `desired` desktops, `replicas`
/// copies of the image.
fn create_template(member: &Member, desired: usize, replicas: u32) {
    member.run(&strings(&[
        "template",
        "create",
        TEMPLATE,
        "--image",
        IMAGE,
        "--vcpus",
        "1",
        "--memory",
        "192",
        "--desired",
        &desired.to_string(),
        "--replicas",
        &replicas.to_string(),
    ]));
}

fn serve(cleanup: &mut GridCleanup, member: &Member, started: Instant) {
    cleanup
        .inner
        .servers
        .push(Serving::start(member, &member.log(1), &[]));
    loop {
        let mut connection = Connect::open(Some(URI)).unwrap();
        let active = virt::storage_pool::StoragePool::lookup_by_name(&connection, &member.pool)
            .is_ok_and(|pool| pool.is_active().unwrap_or(false));
        let _ = connection.close();
        if active {
            return;
        }
        assert!(
            started.elapsed() < TEST_BOUND,
            "{} never started pool {}",
            member.name,
            member.pool
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Alpha makes the grid, beta joins; the guest imported on alpha, copied to
/// beta, four desktops of 192 MiB booted and ready; users u1..u5 entitled.
fn ready_grid(label: &str) -> Grid {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix(&format!("deskgrid-desktop-grid-{label}-"))
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().to_owned();
    // Unique per run and per test: the pid, the label, and the random
    // directory's name below it.
    let suffix = format!("{}-{label}", std::process::id());
    let members = [
        Member::new(&root, &suffix, "alpha"),
        Member::new(&root, &suffix, "beta"),
    ];
    let mut cleanup = GridCleanup {
        inner: Cleanup {
            servers: Vec::new(),
            pools: members.iter().map(|member| member.pool.clone()).collect(),
            dir: Some(dir),
        },
        marker: root.display().to_string(),
        logs: members.iter().map(|member| member.log(1)).collect(),
        dir_last: None,
    };

    let guest = guest_image();
    eprintln!(
        "[{:6.1} s] guest image ready: {}",
        started.elapsed().as_secs_f64(),
        guest.display()
    );

    let [alpha, beta] = &members;
    let alpha_address = init_grid(alpha, &root);
    serve(&mut cleanup, alpha, started);

    let mut join = strings(&["join", &alpha_address, "--token", &token(alpha)]);
    join.extend(settings(beta, &format!("127.0.0.1:{}", free_udp_port())));
    beta.run(&join);
    serve(&mut cleanup, beta, started);
    eprintln!(
        "[{:6.1} s] both servers run",
        started.elapsed().as_secs_f64()
    );

    alpha.run(&strings(&[
        "image",
        "import",
        &guest.display().to_string(),
        "--name",
        IMAGE,
    ]));
    eprintln!(
        "[{:6.1} s] image imported on alpha",
        started.elapsed().as_secs_f64()
    );

    let user_password = root.join("user-password");
    std::fs::write(&user_password, format!("{USER_PASSWORD}\n")).unwrap();
    let grid = Grid {
        cleanup,
        members,
        user_password,
        root,
        started,
    };
    let [alpha, beta] = &grid.members;

    // Two copies first, then the desktops: with both servers holding the
    // image, the dynamic balancer deals the VMs out by headroom, so both
    // servers host some (a VM created before beta's copy is complete can
    // only go to alpha). The template is the one the brief asks for:
    // pooled, 4 desktops, 2 replicas, 1 vCPU, 192 MiB.
    create_template(alpha, 0, 2);
    grid.wait_for("beta holds a complete copy of the image", alpha, |status| {
        count(server(status, "beta"), "images_complete") >= 1
    });
    alpha.run(&strings(&[
        "template",
        "set",
        TEMPLATE,
        "--desired",
        &DESKTOPS.to_string(),
    ]));

    // Users while the guests boot.
    let password_file = grid.user_password.display().to_string();
    for user in USERS {
        alpha.run(&strings(&[
            "user",
            "add",
            user,
            "--password-file",
            &password_file,
        ]));
        alpha.run(&strings(&[
            "entitle",
            "--user",
            user,
            "--template",
            TEMPLATE,
        ]));
    }
    eprintln!("[{:6.1} s] users added and entitled", grid.elapsed());

    let status = grid.wait_for("4 desktops are ready (seen from alpha)", alpha, |status| {
        ready_total(status) == DESKTOPS as u64
    });
    let distribution: BTreeMap<&str, u64> = ["alpha", "beta"]
        .into_iter()
        .map(|name| (name, count(server(&status, name), "ready_vms")))
        .collect();
    eprintln!("             ready desktops per server: {distribution:?}");
    // Beta's broker must see the same, and the users.
    grid.wait_for("beta sees the 4 ready desktops", beta, |status| {
        ready_total(status) == DESKTOPS as u64
    });
    let users = deskgrid(&beta.data_dir, &["--output", "json", "user", "list"]);
    assert!(users.status.success(), "{}", stderr(&users));
    assert_eq!(
        json(&users).as_array().unwrap().len(),
        USERS.len() + 1,
        "beta knows the users and the admin: {}",
        stdout(&users)
    );
    grid
}

/// The `.vv` file of a reservation: private, remote-viewer's format, the
/// same display and ticket as the JSON answer.
fn check_viewer_file(connected: &Connected, reservation: &Value) {
    let mode = std::fs::metadata(&connected.vv_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", connected.vv_file.display());
    let text = std::fs::read_to_string(&connected.vv_file).unwrap();
    let settings: BTreeMap<&str, &str> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    assert!(text.starts_with("[virt-viewer]\n"), "{text}");
    assert_eq!(settings.get("type"), Some(&"spice"), "{text}");
    assert_eq!(settings.get("host"), Some(&"127.0.0.1"), "{text}");
    assert_eq!(
        settings.get("host").copied(),
        reservation["host"].as_str(),
        "{text}"
    );
    let port = settings["port"].parse::<u16>().unwrap();
    assert!(port > 0, "{text}");
    assert_eq!(Some(u64::from(port)), reservation["port"].as_u64());
    let password = settings["password"];
    assert!(password.len() >= 8, "a ticket worth the name: {text}");
    assert_eq!(Some(password), reservation["password"].as_str());
}

#[test]
fn four_users_at_once_get_four_different_desktops_and_a_fifth_is_told_none_are_free() {
    let _machine = MACHINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let grid = ready_grid("four");
    let status = grid.member("alpha").status();
    let ready_on: BTreeMap<String, u64> = ["alpha", "beta"]
        .into_iter()
        .map(|name| (name.to_owned(), count(server(&status, name), "ready_vms")))
        .collect();

    // Four logins at the same moment, two through each server's broker.
    let barrier = Barrier::new(DESKTOPS);
    let started = Instant::now();
    let connected: Vec<Connected> = std::thread::scope(|scope| {
        let handles: Vec<_> = USERS[..DESKTOPS]
            .iter()
            .enumerate()
            .map(|(index, user)| {
                let member = &grid.members[index % 2];
                let (grid, barrier) = (&grid, &barrier);
                scope.spawn(move || {
                    barrier.wait();
                    grid.connect(member, user)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    });
    let all_took = started.elapsed();
    let reservations: Vec<Value> = connected.iter().map(Connected::reservation).collect();
    for (connected, reservation) in connected.iter().zip(&reservations) {
        eprintln!(
            "             {} via {}: VM {} on {} (display port {}) in {:.2} s",
            connected.user,
            connected.via,
            reservation["vm"],
            reservation["server"],
            reservation["port"],
            connected.took.as_secs_f64()
        );
    }
    eprintln!(
        "[{:6.1} s] 4 concurrent connects answered within {:.2} s",
        grid.elapsed(),
        all_took.as_secs_f64()
    );

    // Four different desktops, each on the server that hosts it, each with
    // its own display, none a returning user's.
    let vms: BTreeSet<&str> = reservations
        .iter()
        .map(|reservation| reservation["vm"].as_str().unwrap())
        .collect();
    assert_eq!(
        vms.len(),
        DESKTOPS,
        "one desktop per user: {reservations:#?}"
    );
    let displays: BTreeSet<(String, u64)> = reservations
        .iter()
        .map(|reservation| {
            (
                reservation["host"].as_str().unwrap().to_owned(),
                reservation["port"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(displays.len(), DESKTOPS, "{reservations:#?}");
    let mut per_server: BTreeMap<String, u64> = BTreeMap::new();
    for reservation in &reservations {
        assert_eq!(reservation["template"], TEMPLATE);
        assert_eq!(reservation["returning"], false);
        *per_server
            .entry(reservation["server"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    // All four desktops are taken: each server gave exactly the ones it had.
    assert_eq!(per_server, ready_on, "{reservations:#?}");
    for (name, taken) in &per_server {
        let domains = domains_of(grid.member(name));
        for reservation in reservations
            .iter()
            .filter(|reservation| reservation["server"] == name.as_str())
        {
            assert!(
                domains.contains(&domain_name(&reservation["vm"])),
                "{name} hosts VM {} ({taken} taken there): its domains are {domains:?}",
                reservation["vm"]
            );
        }
    }
    for (connected, reservation) in connected.iter().zip(&reservations) {
        check_viewer_file(connected, reservation);
    }

    // A fifth user: none free, said clearly, no file written; on either server.
    for via in ["alpha", "beta"] {
        let fifth = grid.connect(grid.member(via), USERS[4]);
        eprintln!(
            "[{:6.1} s] u5 via {via}: {} in {:.2} s",
            grid.elapsed(),
            fifth.output.status,
            fifth.took.as_secs_f64()
        );
        assert_eq!(
            fifth.output.status.code(),
            Some(1),
            "{}",
            stdout(&fifth.output)
        );
        assert_eq!(
            json(&fifth.output)["error"],
            "the server refused: no free desktop of template desk: none free, 0 being prepared; try again shortly"
        );
        assert!(!fifth.vv_file.exists(), "no desktop, no .vv file");
    }

    // Both servers show the four reservations (each server's record
    // travels to the other).
    let expected: Vec<(String, String, String)> = {
        let mut rows: Vec<_> = connected
            .iter()
            .zip(&reservations)
            .map(|(connected, reservation)| {
                (
                    connected.user.clone(),
                    reservation["vm"].as_str().unwrap().to_owned(),
                    reservation["server"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    for member in &grid.members {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let sessions = grid.sessions(member);
            let rows: Vec<(String, String, String)> = sessions
                .iter()
                .map(|session| {
                    (
                        session["user"].as_str().unwrap_or("").to_owned(),
                        session["vm"].as_str().unwrap_or("").to_owned(),
                        session["server_name"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            if rows == expected {
                assert!(
                    sessions
                        .iter()
                        .all(|session| session["state"] == "reserved"
                            && session["template"] == TEMPLATE),
                    "{sessions:#?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} lists {sessions:#?}, expected {expected:?}",
                member.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let status = member.status();
        assert_eq!(ready_total(&status), 0, "{status:#}");
    }
    eprintln!(
        "[{:6.1} s] both servers list the 4 reservations",
        grid.elapsed()
    );

    // The returning user: u1 again a while later, through the other
    // server's broker, is sent back to the same desktop with a new ticket.
    let (first, first_reservation) = (&connected[0], &reservations[0]);
    let other = if first.via == "alpha" {
        "beta"
    } else {
        "alpha"
    };
    let return_at = started + RETURN_AFTER;
    std::thread::sleep(return_at.saturating_duration_since(Instant::now()));
    let again = grid.connect(grid.member(other), &first.user);
    let again_reservation = again.reservation();
    eprintln!(
        "[{:6.1} s] {} again via {other}: VM {} on {} (returning: {}) in {:.2} s",
        grid.elapsed(),
        first.user,
        again_reservation["vm"],
        again_reservation["server"],
        again_reservation["returning"],
        again.took.as_secs_f64()
    );
    assert_eq!(again_reservation["vm"], first_reservation["vm"]);
    assert_eq!(again_reservation["server"], first_reservation["server"]);
    assert_eq!(again_reservation["returning"], true);
    check_viewer_file(&again, &again_reservation);
    assert_eq!(grid.sessions(grid.member(other)).len(), DESKTOPS);

    // Nobody logs in: each reservation lapses when its answer said it
    // would, and its desktop is free again. Coming back renews nothing: u1's
    // second answer (and its new ticket) says the first reservation's
    // expiry, and u1 holds the desktop until then, not after.
    let first_expiry = first_reservation["expires_at_ms"].as_u64().unwrap();
    let again_expiry = again_reservation["expires_at_ms"].as_u64().unwrap();
    assert_eq!(
        again_expiry, first_expiry,
        "a returning user's answer must give the reservation's own expiry"
    );
    let sessions = grid.sessions(grid.member(first_reservation["server"].as_str().unwrap()));
    let held: Vec<&Value> = sessions
        .iter()
        .filter(|session| session["user"] == first.user.as_str())
        .collect();
    assert!(
        wall_clock_ms() < first_expiry,
        "the check must run before the expiry"
    );
    assert!(
        held.len() == 1 && held[0]["vm"] == first_reservation["vm"],
        "{} holds the desktop until {first_expiry} ms, but at {} ms the grid lists {sessions:#?}",
        first.user,
        wall_clock_ms()
    );
    sleep_until_wall_clock(again_expiry + EXPIRY_SLACK_MS);
    for member in &grid.members {
        grid.wait_for(
            &format!("{} sees all 4 desktops ready again", member.name),
            member,
            |status| ready_total(status) == DESKTOPS as u64,
        );
        assert_eq!(grid.sessions(member), Vec::<Value>::new());
    }

    eprintln!("whole test: {:.1} s", grid.elapsed());
    assert!(grid.started.elapsed() < TEST_BOUND);
    drop(grid);
}

#[test]
fn when_the_first_choice_is_killed_the_broker_falls_back() {
    let _machine = MACHINE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut grid = ready_grid("fallback");
    let status = grid.member("alpha").status();
    for name in ["alpha", "beta"] {
        assert!(
            count(server(&status, name), "ready_vms") >= 1,
            "the fallback needs a free desktop on each server: {status:#}"
        );
    }

    // u1 takes a desktop on some server S. S is then more loaded than the
    // other server K, so K is every broker's first choice for a new user
    // (the connection balancer ranks by load before anything else).
    // u1 comes through alpha's HTTPS API, as a portal would: one login
    // (one password check) for a token, then a connect with the token,
    // answered as JSON, then once more as the `.vv` file (u1's own desktop
    // again, with a new ticket).
    let alpha = grid.member("alpha");
    let login = serde_json::json!({"user": "u1", "password": USER_PASSWORD}).to_string();
    let (code, answer) = https_post(alpha, "/api/v1/login", &login, &[]);
    assert_eq!(code, 200, "{answer}");
    let token = serde_json::from_str::<Value>(&answer).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let bearer = format!("Authorization: Bearer {token}");
    let https_started = Instant::now();
    let (code, answer) = https_post(alpha, "/api/v1/connect", "{}", &[&bearer]);
    assert_eq!(code, 200, "{answer}");
    let first_reservation = serde_json::from_str::<Value>(&answer).unwrap()["reservation"].clone();
    assert_eq!(first_reservation["template"], TEMPLATE);
    assert_eq!(first_reservation["returning"], false);
    let (code, viewer_file) = https_post(
        alpha,
        "/api/v1/connect",
        "{}",
        &[&bearer, "Accept: application/x-virt-viewer"],
    );
    assert_eq!(code, 200, "{viewer_file}");
    let settings: BTreeMap<&str, &str> = viewer_file
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    assert!(
        viewer_file.starts_with("[virt-viewer]\ntype=spice\n"),
        "{viewer_file}"
    );
    assert_eq!(
        settings.get("host").copied(),
        first_reservation["host"].as_str()
    );
    assert_eq!(
        settings
            .get("port")
            .and_then(|port| port.parse::<u64>().ok()),
        first_reservation["port"].as_u64(),
        "the same desktop's display: {viewer_file}"
    );
    assert!(settings
        .get("password")
        .is_some_and(|ticket| ticket.len() >= 8));
    eprintln!(
        "[{:6.1} s] u1 via alpha's HTTPS API: VM {} on {}, JSON then .vv in {:.2} s",
        grid.elapsed(),
        first_reservation["vm"],
        first_reservation["server"],
        https_started.elapsed().as_secs_f64()
    );
    let survivor = first_reservation["server"].as_str().unwrap().to_owned();
    let killed = if survivor == "alpha" { "beta" } else { "alpha" };
    eprintln!(
        "[{:6.1} s] u1 got VM {} on {survivor}: {killed} is now the first choice",
        grid.elapsed(),
        first_reservation["vm"]
    );
    let status = grid.wait_for(
        "the survivor sees its own desktop taken and the other server alive with free ones",
        grid.member(&survivor),
        |status| {
            let own = server(status, &survivor);
            let other = server(status, killed);
            count(own, "ready_vms") + 1 == count(own, "vms")
                && count(other, "ready_vms") >= 1
                && other["state"] == "alive"
        },
    );
    let killed_id = server(&status, killed)["id"].as_str().unwrap().to_owned();
    let free_on_survivor: BTreeSet<String> = domains_of(grid.member(&survivor))
        .into_iter()
        .filter(|domain| *domain != domain_name(&first_reservation["vm"]))
        .collect();

    // SIGKILL the first choice; its VMs keep running (and cannot be
    // reserved: only their own server decides). Connect on the survivor at
    // once, before the failure detector has noticed.
    let killed_index = grid.index_of(killed);
    let kill_started = Instant::now();
    grid.cleanup.inner.servers[killed_index].kill();
    let second = grid.connect(grid.member(&survivor), "u2");
    let since_kill = kill_started.elapsed();
    let second_reservation = second.reservation();
    eprintln!(
        "[{:6.1} s] {killed} killed; u2 via {survivor}: VM {} on {} in {:.2} s ({:.2} s after the kill)",
        grid.elapsed(),
        second_reservation["vm"],
        second_reservation["server"],
        second.took.as_secs_f64(),
        since_kill.as_secs_f64()
    );
    assert_eq!(second_reservation["server"], survivor.as_str());
    assert_eq!(second_reservation["returning"], false);
    assert_ne!(second_reservation["vm"], first_reservation["vm"]);
    assert!(
        free_on_survivor.contains(&domain_name(&second_reservation["vm"])),
        "VM {} is not one of {survivor}'s free desktops {free_on_survivor:?}",
        second_reservation["vm"]
    );
    check_viewer_file(&second, &second_reservation);
    // Asked first, the killed server missed the deadline; then the survivor
    // answered: one deadline plus a login, far below the broker's worst
    // case (MAX_SERVERS_TRIED deadlines).
    let bound = RESERVE_DEADLINE + Duration::from_secs(3);
    assert!(
        second.took < bound,
        "the fallback took {:.2} s (bound {bound:?})",
        second.took.as_secs_f64()
    );
    let survivor_member = grid.member(&survivor);
    let survivor_log = std::fs::read_to_string(survivor_member.log(1)).unwrap();
    let missed: Vec<&str> = survivor_log
        .lines()
        .filter(|line| {
            line.contains("server did not answer a reservation; trying the next")
                && line.contains(&killed_id)
        })
        .collect();
    assert!(
        !missed.is_empty(),
        "the broker never asked {killed} ({killed_id}) first (its log follows)"
    );
    eprintln!("             {survivor}'s broker: {}", missed[0]);
    // The missed deadline reached the failure detector as a hint (made
    // suspect at once, or found already suspect by foca's own probes).
    let hinted = survivor_log.lines().find(|line| {
        line.contains(&killed_id)
            && (line.contains("missed a reservation deadline: suspect now")
                || line.contains("failure hint: the server is already suspect or missing"))
    });
    let Some(hinted) = hinted else {
        panic!("no failure hint about {killed} ({killed_id}) in {survivor}'s log")
    };
    eprintln!("             {survivor}'s membership: {hinted}");

    // The grid shows u2's reservation on the survivor.
    let sessions = grid.sessions(survivor_member);
    let u2: Vec<&Value> = sessions
        .iter()
        .filter(|session| session["user"] == "u2")
        .collect();
    assert_eq!(u2.len(), 1, "{sessions:#?}");
    assert_eq!(u2[0]["vm"], second_reservation["vm"]);
    assert_eq!(u2[0]["server_name"], survivor.as_str());
    assert_eq!(u2[0]["state"], "reserved");

    eprintln!("whole test: {:.1} s", grid.elapsed());
    assert!(grid.started.elapsed() < TEST_BOUND);
    drop(grid);
}

/// "Logout refreshes the VM and it comes back ready", with every real part:
/// one server, one pooled desktop whose guest logs carol in by itself
/// (`tests/guest/guest-init.sh` writes her utmp login 8 s after its agent
/// port appears, and the logout 3 s later). The grid shows her session on
/// the desktop; after the logout the server's policy loop throws the disk
/// away and clones it afresh (a new QEMU process for the same VM), and the
/// new boot's agent makes it ready again; carol's next login lands on the
/// same VM.
#[test]
fn a_logout_refreshes_the_desktop_and_it_comes_back_ready() {
    const LOGIN_AFTER_S: u32 = 8;
    const SESSION_S: u32 = 3;
    let _turn = MACHINE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-desktop-grid-refresh-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().to_owned();
    let member = Member::new(&root, &format!("{}-refresh", std::process::id()), "alpha");
    let mut cleanup = GridCleanup {
        inner: Cleanup {
            servers: Vec::new(),
            pools: vec![member.pool.clone()],
            dir: Some(dir),
        },
        marker: root.display().to_string(),
        logs: vec![member.log(1)],
        dir_last: None,
    };
    let guest = desktop_guests::guest_image_with_logins(
        &root,
        &format!("- carol {LOGIN_AFTER_S} {SESSION_S}\n"),
    );
    init_grid(&member, &root);
    serve(&mut cleanup, &member, started);
    member.run(&strings(&[
        "image",
        "import",
        &guest.display().to_string(),
        "--name",
        IMAGE,
    ]));
    create_template(&member, 1, 1);
    let elapsed = || started.elapsed().as_secs_f64();
    let carol_on = || -> Option<Value> {
        let output = deskgrid(&member.data_dir, &["--output", "json", "session", "list"]);
        assert!(output.status.success(), "session list: {}", stderr(&output));
        json(&output)
            .as_array()
            .unwrap()
            .iter()
            .find(|session| session["user"] == "carol" && session["state"] == "in-use")
            .map(|session| session["vm"].clone())
    };
    let domain_id = |vm: &Value| -> Option<u32> {
        let mut connection = Connect::open(Some(URI)).unwrap();
        let id = virt::domain::Domain::lookup_by_name(&connection, &domain_name(vm))
            .ok()
            .and_then(|domain| domain.get_id());
        let _ = connection.close();
        id
    };
    let until = |what: &str, condition: &dyn Fn() -> bool| {
        pool_grid::wait_until(what, TEST_BOUND.saturating_sub(started.elapsed()), || {
            let done = condition();
            if !done {
                std::thread::sleep(POLL);
            }
            done
        });
        eprintln!("[{:6.1} s] {what}", elapsed());
    };

    until("the desktop is ready", &|| {
        ready_total(&member.status()) == 1
    });
    until("carol is logged in at the guest", &|| carol_on().is_some());
    let vm = carol_on().unwrap();
    let first_boot = domain_id(&vm).expect("carol's desktop runs");
    eprintln!("             on VM {vm} (QEMU domain id {first_boot})");

    // Her logout: the session goes, the VM is refreshed (a new domain
    // process on a fresh disk) and becomes ready again.
    until("carol's session ended", &|| carol_on().is_none());
    until("the refreshed desktop is ready again", &|| {
        ready_total(&member.status()) == 1 && domain_id(&vm).is_some_and(|id| id != first_boot)
    });
    let log = std::fs::read_to_string(member.log(1)).unwrap();
    let vm_id = vm.as_str().unwrap();
    assert!(
        log.lines()
            .any(|line| line.contains("session over: the VM is refreshed") && line.contains(vm_id)),
        "no refresh of {vm_id} in the server's log"
    );
    // The fresh guest logs her in again: the same VM, back in service.
    until("carol is in again", &|| carol_on().is_some());
    assert_eq!(carol_on().unwrap(), vm, "the same desktop, refreshed");
    drop(cleanup);
}
