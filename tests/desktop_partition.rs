//! Issue 7: under a partition made with network namespaces, many concurrent
//! logins from both sides never reserve one VM for two users.
//!
//! Two real `deskgrid serve` processes, each in a network namespace of its
//! own, joined by a veth pair (the servers reach libvirtd through its Unix
//! socket, the CLI reaches each server through its control socket), each
//! with its own libvirt pool; the tiny test guest with the real agent (TCG),
//! a pooled template of four desktops split over the two servers, eight
//! entitled users. The link is cut; eight logins at the same moment, four
//! from each side (`ip netns exec`), answered within the broker's deadline.
//! The cut goes on until each side's failure detector declares the other
//! missing; the first round's users are logged off and all eight log in
//! again: still each side reserves only its own desktops, and the missing
//! side is not asked. The link is healed; once both servers' state digests
//! agree, every reservation record is checked against the second round.
//!
//! A host without libvirtd fails (run `bash scripts/setup-host.sh`); a host
//! where namespaces cannot be made (not root) fails too. [`PartitionCleanup`]
//! stops the servers and removes the domains, pools, directories and
//! namespaces the test made, whatever happens.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "support/desktop_guests.rs"]
mod desktop_guests;
#[path = "support/pool_grid.rs"]
mod pool_grid;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{deskgrid, stderr, stdout, DESKGRID};
use desktop_guests::{
    count, guest_image, json, log_tail, ready_total, remove_domains_under, server, wall_clock_ms,
};
use pool_grid::{strings, token, Cleanup, Member, URI};
use serde_json::Value;
use virt::connect::Connect;

const IMAGE: &str = "desk-guest-1";
const TEMPLATE: &str = "desk";
const DESKTOPS: u64 = 4;
const USERS: [&str; 8] = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"];
const USER_PASSWORD: &str = "a desktop user's long password";
const TEST_BOUND: Duration = Duration::from_secs(240);
const POLL: Duration = Duration::from_millis(500);
/// After the heal: a push or a few anti-entropy rounds.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(40);
/// A reservation whose expiry is this close may be gone from the records
/// by the time they are read (the service notices a lapse within 1 s).
const EXPIRY_SLACK_MS: u64 = 2_000;
const LEFT_ADDRESS: &str = "10.251.9.1";
const RIGHT_ADDRESS: &str = "10.251.9.2";

fn ip(arguments: &[&str]) -> bool {
    Command::new("ip")
        .args(arguments)
        .output()
        .map(|output| output.status.success())
        .unwrap_or(false)
}

/// Two namespaces joined by a veth pair, removed when dropped.
struct SplitNetwork {
    namespaces: [String; 2],
}

impl SplitNetwork {
    const DEVICES: [&'static str; 2] = ["dgp-left", "dgp-right"];

    fn create() -> Self {
        let pid = std::process::id();
        let network = Self {
            namespaces: [format!("dgpl-{pid}"), format!("dgpr-{pid}")],
        };
        for namespace in &network.namespaces {
            let _ = ip(&["netns", "del", namespace]);
            assert!(
                ip(&["netns", "add", namespace]),
                "cannot create network namespace {namespace} (needs root and iproute2)"
            );
            assert!(ip(&["-n", namespace, "link", "set", "lo", "up"]));
        }
        let [left, right] = &network.namespaces;
        let [left_device, right_device] = Self::DEVICES;
        assert!(
            ip(&[
                "-n",
                left,
                "link",
                "add",
                left_device,
                "type",
                "veth",
                "peer",
                "name",
                right_device,
                "netns",
                right,
            ]) && ip(&[
                "-n",
                left,
                "addr",
                "add",
                &format!("{LEFT_ADDRESS}/24"),
                "dev",
                left_device,
            ]) && ip(&[
                "-n",
                right,
                "addr",
                "add",
                &format!("{RIGHT_ADDRESS}/24"),
                "dev",
                right_device,
            ]),
            "cannot make the veth pair"
        );
        network.connect(true);
        network
    }

    /// Cuts (`false`) or heals (`true`) the link.
    fn connect(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        for (namespace, device) in self.namespaces.iter().zip(Self::DEVICES) {
            assert!(
                ip(&["-n", namespace, "link", "set", device, state]),
                "ip link set {device} {state}"
            );
        }
    }
}

impl Drop for SplitNetwork {
    fn drop(&mut self) {
        for namespace in &self.namespaces {
            let _ = ip(&["netns", "del", namespace]);
        }
    }
}

/// `deskgrid --data-dir DATA_DIR ARGUMENTS` inside `namespace`.
fn deskgrid_in(namespace: &str, data_dir: &Path, arguments: &[&str]) -> Command {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", namespace, DESKGRID, "--data-dir"])
        .arg(data_dir)
        .args(arguments)
        .env_remove("DESKGRID_DATA_DIR")
        .env_remove("RUST_LOG");
    command
}

/// A `deskgrid serve` in a namespace, logging to a file; killed when dropped.
struct NamespacedServer(Child);

impl Drop for NamespacedServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the test made, removed when dropped, in field order: the
/// servers (SIGKILL), then the test's domains, then (in `inner`) the pools,
/// then the directory, then the namespaces.
struct PartitionCleanup {
    servers: Vec<NamespacedServer>,
    marker: String,
    logs: Vec<PathBuf>,
    inner: Cleanup,
    dir_last: Option<tempfile::TempDir>,
    network: Option<SplitNetwork>,
}

impl Drop for PartitionCleanup {
    fn drop(&mut self) {
        self.servers.clear();
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
        // `inner` drops (pools, then the directory it no longer holds),
        // then `dir_last`, then the network: fields drop in order after
        // this body.
    }
}

fn wait_for(
    started: Instant,
    what: &str,
    member: &Member,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let status = member.status();
        if condition(&status) {
            eprintln!("[{:6.1} s] {what}", started.elapsed().as_secs_f64());
            return status;
        }
        assert!(
            started.elapsed() < TEST_BOUND,
            "timed out after {:.1} s waiting until {what}; {}'s status:\n{status:#}",
            started.elapsed().as_secs_f64(),
            member.name
        );
        std::thread::sleep(POLL);
    }
}

/// Starts `member`'s server in `namespace` and waits for its control socket
/// and its pool.
fn serve(cleanup: &mut PartitionCleanup, namespace: &str, member: &Member) {
    let socket = member.data_dir.join("control.sock");
    let child = deskgrid_in(namespace, &member.data_dir, &["serve"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(member.log(1)).unwrap())
        .spawn()
        .unwrap();
    cleanup.servers.push(NamespacedServer(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut connection = Connect::open(Some(URI)).unwrap();
        let active = virt::storage_pool::StoragePool::lookup_by_name(&connection, &member.pool)
            .is_ok_and(|pool| pool.is_active().unwrap_or(false));
        let _ = connection.close();
        if active && socket.exists() {
            return;
        }
        let server = cleanup.servers.last_mut().unwrap();
        if let Some(status) = server.0.try_wait().unwrap() {
            panic!(
                "{} exited at start-up with {status}: {}",
                member.name,
                log_tail(&member.log(1))
            );
        }
        assert!(Instant::now() < deadline, "{} did not start", member.name);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until both servers know both servers and their digests agree.
fn wait_for_agreement(members: &[Member; 2]) -> String {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let statuses: Vec<Value> = members.iter().map(Member::status).collect();
        let digests: Vec<String> = statuses
            .iter()
            .map(|status| status["state_digest"].as_str().unwrap().to_owned())
            .collect();
        let counts: Vec<usize> = statuses
            .iter()
            .map(|status| status["servers"].as_array().unwrap().len())
            .collect();
        if counts.iter().all(|count| *count == 2) && digests[0] == digests[1] {
            return digests[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no agreement within {CONVERGE_TIMEOUT:?}: servers {counts:?}, digests {digests:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One successful login: who, which VM, on which server, until when, and
/// the side (server name) whose broker answered.
#[derive(Debug, Clone)]
struct Answer {
    user: String,
    via: &'static str,
    vm: String,
    server: String,
    expires_at_ms: u64,
}

#[test]
fn no_desktop_is_reserved_for_two_users_across_a_partition() {
    let started = Instant::now();
    let network = SplitNetwork::create();
    let dir = tempfile::Builder::new()
        .prefix("deskgrid-desktop-partition-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let root = dir.path().to_owned();
    let suffix = format!("{}-partition", std::process::id());
    let members = [
        Member::new(&root, &suffix, "alpha"),
        Member::new(&root, &suffix, "beta"),
    ];
    let mut cleanup = PartitionCleanup {
        servers: Vec::new(),
        marker: root.display().to_string(),
        logs: members.iter().map(|member| member.log(1)).collect(),
        inner: Cleanup {
            servers: Vec::new(),
            pools: members.iter().map(|member| member.pool.clone()).collect(),
            dir: Some(dir),
        },
        dir_last: None,
        network: None,
    };
    let namespaces = network.namespaces.clone();
    cleanup.network = Some(network);
    let guest = guest_image();
    eprintln!(
        "[{:6.1} s] guest image ready",
        started.elapsed().as_secs_f64()
    );

    let [alpha, beta] = &members;
    let admin_password = root.join("admin-password");
    std::fs::write(&admin_password, "correct horse battery staple\n").unwrap();
    let alpha_address = format!("{LEFT_ADDRESS}:7443");
    let beta_address = format!("{RIGHT_ADDRESS}:7443");
    let run_in = |namespace: &str, member: &Member, arguments: &[String]| {
        let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
        let output = deskgrid_in(namespace, &member.data_dir, &arguments)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{} {arguments:?}: {}",
            member.name,
            stderr(&output)
        );
    };
    let mut init = strings(&[
        "init",
        "--new-grid",
        "--admin-password-file",
        &admin_password.display().to_string(),
    ]);
    init.extend(alpha.settings(&alpha_address));
    init.extend(strings(&["--network", "none"]));
    run_in(&namespaces[0], alpha, &init);
    serve(&mut cleanup, &namespaces[0], alpha);
    let mut join = strings(&["join", &alpha_address, "--token", &token(alpha)]);
    join.extend(beta.settings(&beta_address));
    join.extend(strings(&["--network", "none"]));
    run_in(&namespaces[1], beta, &join);
    serve(&mut cleanup, &namespaces[1], beta);
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
    alpha.run(&strings(&[
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
        "0",
        "--replicas",
        "2",
        // SPICE displays listen on the server's listen address, which
        // exists only inside its namespace, while QEMU runs in libvirtd's
        // (the host's): SPICE cannot bind there. VNC displays listen on
        // loopback, which QEMU has.
        "--display",
        "vnc",
    ]));
    wait_for(
        started,
        "beta holds a complete copy of the image",
        alpha,
        |status| count(server(status, "beta"), "images_complete") >= 1,
    );
    alpha.run(&strings(&[
        "template",
        "set",
        TEMPLATE,
        "--desired",
        &DESKTOPS.to_string(),
    ]));
    let user_password = root.join("user-password");
    std::fs::write(&user_password, format!("{USER_PASSWORD}\n")).unwrap();
    let password_file = user_password.display().to_string();
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
    eprintln!(
        "[{:6.1} s] 8 users added and entitled",
        started.elapsed().as_secs_f64()
    );
    let status = wait_for(started, "4 desktops are ready (alpha)", alpha, |status| {
        ready_total(status) == DESKTOPS
    });
    wait_for(started, "beta sees the 4 ready desktops", beta, |status| {
        ready_total(status) == DESKTOPS
    });
    wait_for_agreement(&members);
    let ready_on: BTreeMap<&str, u64> = ["alpha", "beta"]
        .into_iter()
        .map(|name| (name, count(server(&status, name), "ready_vms")))
        .collect();
    eprintln!("             ready desktops per server: {ready_on:?}");

    // The cut, then eight logins at the same moment: u1..u4 through
    // alpha's broker inside alpha's namespace, u5..u8 through beta's.
    network_of(&cleanup).connect(false);
    let cut_at = Instant::now();
    eprintln!("[{:6.1} s] link cut", started.elapsed().as_secs_f64());
    let outputs = login_round(&members, &namespaces, &root, &password_file);
    eprintln!(
        "[{:6.1} s] 8 concurrent connects answered within {:.2} s of the cut",
        started.elapsed().as_secs_f64(),
        cut_at.elapsed().as_secs_f64()
    );
    let first = answers_of(&members, &outputs);
    check_partitioned(&first, &ready_on);

    // The cut goes on until each side's failure detector has declared the
    // other missing (SWIM's suspicion timeout, not the broker's deadline).
    // The first round's users leave (an admin's logoff on their own side),
    // and everyone logs in again: still each side only its own desktops,
    // and the missing side is not even asked.
    for answer in &first {
        let side = members
            .iter()
            .position(|member| member.name == answer.via)
            .unwrap();
        let output = deskgrid_in(
            &namespaces[side],
            &members[side].data_dir,
            &["session", "logoff", &answer.user],
        )
        .output()
        .unwrap();
        assert!(
            output.status.success(),
            "logoff of {}: {}",
            answer.user,
            stderr(&output)
        );
    }
    for (side, other) in [(0, 1), (1, 0)] {
        wait_for(
            started,
            &format!(
                "{} sees {} missing",
                members[side].name, members[other].name
            ),
            &members[side],
            |status| server(status, members[other].name)["state"] == "missing",
        );
    }
    eprintln!(
        "[{:6.1} s] each side sees the other missing, {:.1} s after the cut",
        started.elapsed().as_secs_f64(),
        cut_at.elapsed().as_secs_f64()
    );
    let outputs = login_round(&members, &namespaces, &root, &password_file);
    let answers = answers_of(&members, &outputs);
    check_partitioned(&answers, &ready_on);
    for (user, side, output, _) in &outputs {
        assert!(
            output.status.success() || !stderr(output).contains("unreachable"),
            "{user} via {}: the missing side was asked: {}",
            members[*side].name,
            stderr(output)
        );
    }

    // The heal; once the digests agree, every reservation record on both
    // sides.
    network_of(&cleanup).connect(true);
    let healed = Instant::now();
    let digest = wait_for_agreement(&members);
    eprintln!(
        "[{:6.1} s] digests agree {:.2} s after the heal ({digest})",
        started.elapsed().as_secs_f64(),
        healed.elapsed().as_secs_f64()
    );
    for member in &members {
        let read_at_ms = wall_clock_ms();
        let output = deskgrid(&member.data_dir, &["--output", "json", "session", "list"]);
        assert!(output.status.success(), "session list: {}", stderr(&output));
        let sessions = json(&output).as_array().unwrap().clone();
        eprintln!(
            "             {} lists {} reservations: {:?}",
            member.name,
            sessions.len(),
            sessions
                .iter()
                .map(|session| format!(
                    "{}:{}@{}",
                    session["user"].as_str().unwrap_or(""),
                    session["vm"].as_str().unwrap_or(""),
                    session["server_name"].as_str().unwrap_or("")
                ))
                .collect::<Vec<_>>()
        );
        let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for session in &sessions {
            listed
                .entry(session["vm"].as_str().unwrap().to_owned())
                .or_default()
                .insert(session["user"].as_str().unwrap().to_owned());
        }
        for (vm, users) in &listed {
            assert_eq!(
                users.len(),
                1,
                "{} records VM {vm} held by {users:?}: {sessions:#?}",
                member.name
            );
        }
        // No record without an answer: a refused login holds nothing.
        for session in &sessions {
            let answered = answers.iter().any(|answer| {
                session["user"] == answer.user.as_str() && session["vm"] == answer.vm.as_str()
            });
            assert!(
                answered,
                "{} records a reservation no login was given: {session:#}; answers {answers:#?}",
                member.name
            );
        }
        for answer in &answers {
            if answer.expires_at_ms <= read_at_ms + EXPIRY_SLACK_MS {
                eprintln!(
                    "             ({}'s reservation expires at {} ms, read at {read_at_ms} ms: not checked)",
                    answer.user, answer.expires_at_ms
                );
                continue;
            }
            let held = sessions.iter().any(|session| {
                session["user"] == answer.user.as_str()
                    && session["vm"] == answer.vm.as_str()
                    && session["server_name"] == answer.server.as_str()
            });
            assert!(
                held,
                "{} was given VM {} on {} (until {} ms) but {} lists at {read_at_ms} ms: {sessions:#?}",
                answer.user,
                answer.vm,
                answer.server,
                answer.expires_at_ms,
                member.name
            );
        }
    }

    eprintln!("whole test: {:.1} s", started.elapsed().as_secs_f64());
    assert!(started.elapsed() < TEST_BOUND);
    drop(cleanup);
}

/// Eight logins at the same moment: u1..u4 through alpha's broker inside
/// alpha's namespace, u5..u8 through beta's.
fn login_round(
    members: &[Member; 2],
    namespaces: &[String; 2],
    root: &Path,
    password_file: &str,
) -> Vec<(&'static str, usize, Output, Duration)> {
    let barrier = Barrier::new(USERS.len());
    std::thread::scope(|scope| {
        let handles: Vec<_> = USERS
            .iter()
            .enumerate()
            .map(|(index, user)| {
                let side = index / 4;
                let member = &members[side];
                let namespace = namespaces[side].clone();
                let barrier = &barrier;
                scope.spawn(move || {
                    let vv = root.join(format!("{user}.vv")).display().to_string();
                    barrier.wait();
                    let begun = Instant::now();
                    let output = deskgrid_in(
                        &namespace,
                        &member.data_dir,
                        &[
                            "--output",
                            "json",
                            "connect",
                            "--user",
                            user,
                            "--password-file",
                            password_file,
                            "--vv-file",
                            &vv,
                        ],
                    )
                    .output()
                    .unwrap();
                    (*user, side, output, begun.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap())
            .collect()
    })
}

/// The desktops a round's logins were given (refusals printed).
fn answers_of(
    members: &[Member; 2],
    outputs: &[(&'static str, usize, Output, Duration)],
) -> Vec<Answer> {
    let mut answers: Vec<Answer> = Vec::new();
    for (user, side, output, took) in outputs {
        let via = members[*side].name;
        if output.status.success() {
            let reservation = &json(output)["reservation"];
            let answer = Answer {
                user: (*user).to_owned(),
                via,
                vm: reservation["vm"].as_str().unwrap().to_owned(),
                server: reservation["server"].as_str().unwrap().to_owned(),
                expires_at_ms: reservation["expires_at_ms"].as_u64().unwrap(),
            };
            eprintln!(
                "             {user} via {via}: VM {} on {} in {:.2} s",
                answer.vm,
                answer.server,
                took.as_secs_f64()
            );
            answers.push(answer);
        } else {
            eprintln!(
                "             {user} via {via}: refused ({}) in {:.2} s: {}{}",
                output.status,
                took.as_secs_f64(),
                stdout(output).trim(),
                stderr(output).trim()
            );
        }
    }
    answers
}

/// During the cut each side reserves only its own desktops, at most as
/// many as it has, and every one of them for at most one user.
fn check_partitioned(answers: &[Answer], ready_on: &BTreeMap<&str, u64>) {
    for answer in answers {
        assert_eq!(
            answer.server, answer.via,
            "during the cut, {} via {} got a desktop on the other side: {answers:#?}",
            answer.user, answer.via
        );
    }
    for (name, ready) in ready_on {
        let taken = answers.iter().filter(|answer| answer.via == *name).count();
        assert!(
            taken as u64 <= *ready,
            "{name} gave {taken} desktops but had {ready} ready: {answers:#?}"
        );
    }
    let mut holders: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for answer in answers {
        holders
            .entry(answer.vm.as_str())
            .or_default()
            .insert(answer.user.as_str());
    }
    for (vm, users) in &holders {
        assert_eq!(
            users.len(),
            1,
            "VM {vm} was given to {users:?} during the partition: {answers:#?}"
        );
    }
    assert!(
        !answers.is_empty(),
        "nobody got a desktop during the cut (each side had its own free ones)"
    );
}

fn network_of(cleanup: &PartitionCleanup) -> &SplitNetwork {
    cleanup.network.as_ref().unwrap()
}
