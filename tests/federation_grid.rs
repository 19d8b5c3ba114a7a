//! A real grid: several `deskgrid serve` processes on 127.0.0.1, talking QUIC
//! with mutual TLS. Create a grid, join servers with tokens, see a change
//! made on one server reach all, see refusals for bad tokens, and see a
//! server that was killed catch up after a restart.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{deskgrid, stderr, stdout, Server};

/// Convergence here takes a push (milliseconds) or at worst a few
/// anti-entropy rounds (2 s each); this bound is for a loaded CI machine.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(40);

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[derive(Debug)]
struct Member {
    data_dir: PathBuf,
    address: String,
}

fn settings(name: &str, address: &str) -> Vec<String> {
    [
        "--name",
        name,
        "--listen",
        address,
        "--libvirt",
        "test:///default",
    ]
    .iter()
    .map(|argument| argument.to_string())
    .collect()
}

fn run(data_dir: &Path, arguments: &[String]) -> std::process::Output {
    let arguments: Vec<&str> = arguments.iter().map(String::as_str).collect();
    deskgrid(data_dir, &arguments)
}

fn create_grid(root: &Path) -> Member {
    let address = format!("127.0.0.1:{}", free_udp_port());
    let data_dir = root.join("server-1");
    let password = root.join("admin-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let mut arguments = vec![
        "init".to_owned(),
        "--new-grid".to_owned(),
        "--admin-password-file".to_owned(),
        password.display().to_string(),
    ];
    arguments.extend(settings("server-1", &address));
    let output = run(&data_dir, &arguments);
    assert!(
        output.status.success(),
        "init --new-grid: {}",
        stderr(&output)
    );
    Member { data_dir, address }
}

fn token(member: &Member, uses: u32) -> String {
    let output = deskgrid(
        &member.data_dir,
        &[
            "--output",
            "json",
            "token",
            "create",
            "--uses",
            &uses.to_string(),
            "--ttl",
            "10m",
        ],
    );
    assert!(output.status.success(), "token create: {}", stderr(&output));
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    created["token"].as_str().unwrap().to_owned()
}

fn join(root: &Path, name: &str, seed: &Member, token: &str) -> Result<Member, String> {
    let address = format!("127.0.0.1:{}", free_udp_port());
    let data_dir = root.join(name);
    let mut arguments = vec![
        "join".to_owned(),
        seed.address.clone(),
        "--token".to_owned(),
        token.to_owned(),
    ];
    arguments.extend(settings(name, &address));
    let output = run(&data_dir, &arguments);
    if output.status.success() {
        Ok(Member { data_dir, address })
    } else {
        Err(stderr(&output))
    }
}

fn status(member: &Member) -> serde_json::Value {
    let output = deskgrid(&member.data_dir, &["--output", "json", "status"]);
    assert!(
        output.status.success(),
        "status: {}{}",
        stdout(&output),
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Waits until every member knows `servers` servers and all digests agree.
fn wait_for_agreement(members: &[&Member], servers: usize) -> String {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let statuses: Vec<serde_json::Value> =
            members.iter().map(|member| status(member)).collect();
        let digests: Vec<&str> = statuses
            .iter()
            .map(|status| status["state_digest"].as_str().unwrap())
            .collect();
        let counts: Vec<usize> = statuses
            .iter()
            .map(|status| status["servers"].as_array().unwrap().len())
            .collect();
        if counts.iter().all(|count| *count == servers)
            && digests.windows(2).all(|pair| pair[0] == pair[1])
        {
            return digests[0].to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no agreement within {CONVERGE_TIMEOUT:?}: servers {counts:?}, digests {digests:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `member` sees `server` in `state` (alive, suspect, missing).
/// The failure detector declares a server missing about 7–10 s after it
/// stops answering (1 s probes, 5 s to refute a suspicion); 40 s is the bound
/// for a loaded CI machine.
fn wait_for_member_state(member: &Member, server: &str, state: &str) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let report = status(member);
        let seen = report["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["id"] == server)
            .map(|entry| entry["state"].clone());
        if seen.as_ref().and_then(|state| state.as_str()) == Some(state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} never saw {server} {state} (last: {seen:?})",
            member.data_dir.display()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn servers_join_converge_refuse_bad_tokens_and_catch_up_after_a_crash() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let first = create_grid(root);
    let first_server = Server::start(&first.data_dir);
    let grid_id = status(&first)["grid_id"].as_str().unwrap().to_owned();

    let shared_token = token(&first, 2);
    let second = join(root, "server-2", &first, &shared_token).unwrap();
    let third = join(root, "server-3", &first, &shared_token).unwrap();
    let used_up = join(root, "server-4", &first, &shared_token).unwrap_err();
    assert!(
        used_up.contains("used as many times as it allows"),
        "{used_up}"
    );
    assert!(
        !root.join("server-4").join("config.toml").exists(),
        "a refused join writes nothing"
    );

    let second_server = Server::start(&second.data_dir);
    let third_server = Server::start(&third.data_dir);
    let digest = wait_for_agreement(&[&first, &second, &third], 3);
    for member in [&first, &second, &third] {
        assert_eq!(status(member)["grid_id"], grid_id.as_str());
    }

    // A change made on one server reaches every other.
    let _ = token(&third, 1);
    let changed = wait_for_agreement(&[&first, &second, &third], 3);
    assert_ne!(changed, digest, "the change is in every digest");

    // Refusals: a wrong secret, and a token pinning another grid's CA.
    let mut wrong_secret = token(&second, 1);
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    let refused = join(root, "server-5", &second, &wrong_secret).unwrap_err();
    assert!(refused.contains("refused the join"), "{refused}");
    assert!(refused.contains("join token"), "{refused}");
    let mut fields: Vec<String> = wrong_secret.split('.').map(str::to_owned).collect();
    fields[1] = "ab".repeat(32);
    let wrong_pin = fields.join(".");
    let refused = join(root, "server-6", &second, &wrong_pin).unwrap_err();
    assert!(refused.contains("cannot join through"), "{refused}");
    assert!(
        refused.to_lowercase().contains("pin"),
        "the error names the CA pin: {refused}"
    );

    // Kill the third server without warning: the others mark it missing.
    let third_id = status(&third)["server_id"].as_str().unwrap().to_owned();
    let killed = Instant::now();
    drop(third_server);
    for member in [&first, &second] {
        wait_for_member_state(member, &third_id, "missing");
    }
    eprintln!(
        "killed server marked missing on both others after {:?}",
        killed.elapsed()
    );
    let _ = token(&first, 1);
    let _ = token(&second, 1);
    wait_for_agreement(&[&first, &second], 3);
    let entries_while_down = status(&first)["state"]["entries"].as_u64().unwrap();
    let third_server = Server::start(&third.data_dir);
    // Agreement of all three means the restarted server has every change
    // made while it was down (its own restart adds its fresh record too).
    wait_for_agreement(&[&first, &second, &third], 3);
    assert_eq!(
        status(&third)["state"]["entries"].as_u64().unwrap(),
        entries_while_down
    );
    // It rejoined the membership by itself, with a new generation.
    for member in [&first, &second] {
        wait_for_member_state(member, &third_id, "alive");
    }

    // Remove the third server for good: every member stops listening to it.
    let output = deskgrid(&first.data_dir, &["server", "remove", &third_id]);
    assert!(
        output.status.success(),
        "server remove: {}",
        stderr(&output)
    );
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let seen = status(&second)["servers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|server| server["id"] == third_id.as_str() && server["removed"] == true);
        if seen {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the removal never reached the second server"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let before = status(&first)["state_digest"].as_str().unwrap().to_owned();
    let _ = token(&third, 1);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        status(&first)["state_digest"],
        before.as_str(),
        "a removed server's changes are refused"
    );
    let removing_itself = deskgrid(
        &first.data_dir,
        &[
            "server",
            "remove",
            status(&first)["server_id"].as_str().unwrap(),
        ],
    );
    assert!(
        stderr(&removing_itself).contains("cannot remove itself"),
        "{}",
        stderr(&removing_itself)
    );

    for server in [first_server, second_server, third_server] {
        let stopped = server.stop();
        assert!(stopped.status.success(), "{}", stderr(&stopped));
    }
}

#[test]
fn a_seed_that_is_not_a_deskgrid_server_is_a_clear_error() {
    let temp = tempfile::tempdir().unwrap();
    // A UDP port where nothing answers QUIC.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let seed = silent.local_addr().unwrap().to_string();
    let token = format!("dgj1.{}.{}", "cd".repeat(32), "ef".repeat(32));
    let started = Instant::now();
    let output = deskgrid(
        &temp.path().join("joiner"),
        &[
            "join",
            &seed,
            "--token",
            &token,
            "--listen",
            "127.0.0.1:7443",
            "--libvirt",
            "test:///default",
        ],
    );
    assert!(!output.status.success());
    let message = stderr(&output);
    assert!(
        message.contains(&format!("cannot join through {seed}")),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded by the handshake deadline"
    );
    assert!(
        !temp.path().join("joiner").exists(),
        "nothing written: {}",
        stdout(&output)
    );
}

/// Rewrites one `key = value` line of a server's `config.toml`.
fn edit_config(member: &Member, line_starting: &str, replacement: &str) {
    let path = member.data_dir.join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut found = false;
    let edited: Vec<&str> = text
        .lines()
        .map(|line| {
            if line.starts_with(line_starting) {
                found = true;
                replacement
            } else {
                line
            }
        })
        .collect();
    assert!(found, "no line starting with {line_starting:?} in\n{text}");
    std::fs::write(&path, edited.join("\n") + "\n").unwrap();
}

/// The addresses and failure-detector state `observer` shows for `server`.
fn seen_as(observer: &Member, server: &str) -> (serde_json::Value, serde_json::Value) {
    let report = status(observer);
    let entry = report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["id"] == server)
        .cloned()
        .unwrap_or_default();
    (entry["addresses"].clone(), entry["state"].clone())
}

#[test]
fn a_server_whose_peers_all_moved_finds_the_grid_through_a_seed() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    let mut first = create_grid(root);
    let first_server = Server::start(&first.data_dir);
    let join_token = token(&first, 1);
    let mut second = join(root, "server-2", &first, &join_token).unwrap();
    let second_server = Server::start(&second.data_dir);
    wait_for_agreement(&[&first, &second], 2);
    let first_id = status(&first)["server_id"].as_str().unwrap().to_owned();
    let second_id = status(&second)["server_id"].as_str().unwrap().to_owned();
    for server in [first_server, second_server] {
        assert!(server.stop().status.success());
    }

    // The grid is renumbered while both are down: each state now knows the
    // other only at an address where nobody answers, so neither can reach
    // the other through its state. Only the seed in the second's
    // config.toml leads it to the first.
    first.address = format!("127.0.0.1:{}", free_udp_port());
    second.address = format!("127.0.0.1:{}", free_udp_port());
    edit_config(
        &first,
        "listen = ",
        &format!("listen = {:?}", first.address),
    );
    edit_config(
        &second,
        "listen = ",
        &format!("listen = {:?}", second.address),
    );
    edit_config(
        &second,
        "seeds = ",
        &format!("seeds = [{:?}]", first.address),
    );

    let first_server = Server::start(&first.data_dir);
    // A change while the second is away, which must reach it.
    let _ = token(&first, 1);
    let second_server = Server::start(&second.data_dir);
    let started = Instant::now();
    wait_for_agreement(&[&first, &second], 2);
    eprintln!("converged through the seed in {:?}", started.elapsed());

    // Both know where the other is now, and the failure detector sees both.
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let (first_seen, second_seen) = (seen_as(&second, &first_id), seen_as(&first, &second_id));
        if first_seen
            == (
                serde_json::json!([first.address]),
                serde_json::json!("alive"),
            )
            && second_seen
                == (
                    serde_json::json!([second.address]),
                    serde_json::json!("alive"),
                )
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the second sees the first as {first_seen:?}, the first sees the second as {second_seen:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let second_log = stderr(&second_server.stop());
    assert!(second_log.contains("seed answered"), "{second_log}");
    assert!(first_server.stop().status.success());
}

#[test]
fn a_grid_member_listening_on_every_interface_must_advertise_an_address() {
    let temp = tempfile::tempdir().unwrap();
    let password = temp.path().join("admin-password");
    std::fs::write(&password, "correct horse battery staple\n").unwrap();
    let data_dir = temp.path().join("server");
    let init = |extra: &[&str]| {
        let mut arguments = vec![
            "--output",
            "json",
            "init",
            "--new-grid",
            "--admin-password-file",
            password.to_str().unwrap(),
            "--libvirt",
            "test:///default",
        ];
        arguments.extend_from_slice(extra);
        deskgrid(&data_dir, &arguments)
    };
    let says_to_advertise = |message: &str, listen: &str| {
        assert!(message.contains(listen), "{message}");
        assert!(message.contains("--advertise"), "{message}");
        assert!(message.contains("server.advertise"), "{message}");
    };

    let refused = init(&["--listen", "0.0.0.0:7000"]);
    assert!(!refused.status.success());
    says_to_advertise(&stdout(&refused), "0.0.0.0:7000");
    assert!(!data_dir.exists(), "a refused init writes nothing");
    let refused = deskgrid(
        &temp.path().join("joiner"),
        &[
            "join",
            "127.0.0.1:9",
            "--token",
            &format!("dgj1.{}.{}", "cd".repeat(32), "ef".repeat(32)),
            "--listen",
            "[::]:7000",
        ],
    );
    assert!(!refused.status.success());
    says_to_advertise(&stderr(&refused), "[::]:7000");
    assert!(!temp.path().join("joiner").exists());

    let port = free_udp_port();
    let advertised = format!("127.0.0.1:{port}");
    let listen = format!("0.0.0.0:{port}");
    let created = init(&["--listen", &listen, "--advertise", &advertised]);
    assert!(created.status.success(), "{}", stderr(&created));
    let config = std::fs::read_to_string(data_dir.join("config.toml")).unwrap();
    assert!(
        config.contains(&format!("advertise = {advertised:?}")),
        "{config}"
    );
    let member = Member {
        data_dir: data_dir.clone(),
        address: advertised.clone(),
    };
    let server = Server::start(&data_dir);
    let report = status(&member);
    let own = report["server_id"].as_str().unwrap();
    assert_eq!(seen_as(&member, own).0, serde_json::json!([advertised]));
    assert!(server.stop().status.success());

    // Without it in config.toml, serve refuses to start rather than tell
    // the grid an address nobody can dial.
    edit_config(&member, "advertise = ", "# advertise = \"IP:PORT\"");
    let mut serve = std::process::Command::new(common::DESKGRID)
        .arg("--data-dir")
        .arg(&data_dir)
        .arg("serve")
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + common::START_TIMEOUT;
    while serve.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = serve.kill();
            panic!("serve started without an address to advertise");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = serve.wait_with_output().unwrap();
    assert!(!refused.status.success());
    says_to_advertise(&stderr(&refused), &listen);
}

/// `deskgrid --data-dir DATA_DIR ARGUMENTS` run inside `namespace`.
fn deskgrid_in(namespace: &str, data_dir: &Path, arguments: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new("ip");
    command
        .args(["netns", "exec", namespace, common::DESKGRID, "--data-dir"])
        .arg(data_dir)
        .args(arguments)
        .env_remove("RUST_LOG");
    command
}

/// A network namespace with only loopback, removed when dropped.
struct Namespace(String);

impl Namespace {
    fn create() -> Option<Self> {
        let name = format!("dggrid-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &name])
            .output();
        let created = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .ok()?;
        if !created.status.success() {
            return None;
        }
        let namespace = Self(name);
        let up = std::process::Command::new("ip")
            .args(["-n", &namespace.0, "link", "set", "lo", "up"])
            .output()
            .ok()?;
        up.status.success().then_some(namespace)
    }

    fn command(&self, data_dir: &Path, arguments: &[&str]) -> std::process::Command {
        deskgrid_in(&self.0, data_dir, arguments)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .output();
    }
}

#[test]
fn a_grid_announced_by_mdns_is_discovered() {
    // mDNS only inside a namespace of our own: never on a real interface.
    let Some(namespace) = Namespace::create() else {
        println!("SKIPPED: cannot create a network namespace (needs root and iproute2)");
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("server");
    let password = temp.path().join("password");
    std::fs::write(&password, "correct horse battery staple").unwrap();
    let output = namespace
        .command(
            &data_dir,
            &[
                "--output",
                "json",
                "init",
                "--new-grid",
                "--admin-password-file",
                password.to_str().unwrap(),
                "--listen",
                "127.0.0.1:7443",
                "--libvirt",
                "test:///default",
                "--mdns",
                "loopback",
            ],
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let created: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let grid_id = created["grid_id"].as_str().unwrap().to_owned();

    let server = NamespacedServer::start(namespace.command(&data_dir, &["serve"]), &data_dir);
    let found = namespace
        .command(
            &temp.path().join("unused"),
            &[
                "--output", "json", "discover", "--scope", "loopback", "--wait", "3s",
            ],
        )
        .output()
        .unwrap();
    drop(server);
    assert!(found.status.success(), "{}", stderr(&found));
    let grids: serde_json::Value = serde_json::from_slice(&found.stdout).unwrap();
    let grid = grids
        .as_array()
        .unwrap()
        .iter()
        .find(|grid| grid["grid_id"] == grid_id.as_str())
        .unwrap_or_else(|| panic!("grid {grid_id} not discovered: {grids}"));
    assert_eq!(grid["servers"][0]["addresses"][0], "127.0.0.1:7443");
}

/// Two namespaces joined by a veth pair: a network of our own, which the
/// test can cut and heal. The addresses exist only inside these namespaces.
struct SplitNetwork {
    left: String,
    right: String,
}

impl SplitNetwork {
    const LEFT_ADDRESS: &'static str = "10.251.7.1";
    const RIGHT_ADDRESS: &'static str = "10.251.7.2";

    fn create() -> Option<Self> {
        let pid = std::process::id();
        let network = Self {
            left: format!("dgleft-{pid}"),
            right: format!("dgright-{pid}"),
        };
        let ip = |arguments: &[&str]| {
            std::process::Command::new("ip")
                .args(arguments)
                .output()
                .map(|output| output.status.success())
                .unwrap_or(false)
        };
        for namespace in [&network.left, &network.right] {
            let _ = ip(&["netns", "del", namespace]);
            if !ip(&["netns", "add", namespace]) {
                return None;
            }
            ip(&["-n", namespace, "link", "set", "lo", "up"]);
        }
        let created = ip(&[
            "-n",
            &network.left,
            "link",
            "add",
            "dg-left",
            "type",
            "veth",
            "peer",
            "name",
            "dg-right",
            "netns",
            &network.right,
        ]) && ip(&[
            "-n",
            &network.left,
            "addr",
            "add",
            &format!("{}/24", Self::LEFT_ADDRESS),
            "dev",
            "dg-left",
        ]) && ip(&[
            "-n",
            &network.right,
            "addr",
            "add",
            &format!("{}/24", Self::RIGHT_ADDRESS),
            "dev",
            "dg-right",
        ]) && ip(&["-n", &network.left, "link", "set", "dg-left", "up"])
            && ip(&["-n", &network.right, "link", "set", "dg-right", "up"]);
        created.then_some(network)
    }

    /// Cuts (`false`) or heals (`true`) the link between the two sides.
    fn connect(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        for (namespace, device) in [(&self.left, "dg-left"), (&self.right, "dg-right")] {
            let output = std::process::Command::new("ip")
                .args(["-n", namespace, "link", "set", device, state])
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "ip link set {device} {state}: {}",
                stderr(&output)
            );
        }
    }

    fn deskgrid(
        &self,
        namespace: &str,
        data_dir: &Path,
        arguments: &[&str],
    ) -> std::process::Command {
        deskgrid_in(namespace, data_dir, arguments)
    }
}

impl Drop for SplitNetwork {
    fn drop(&mut self) {
        for namespace in [&self.left, &self.right] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", namespace])
                .output();
        }
    }
}

/// A `deskgrid serve` inside a namespace, killed when dropped.
struct NamespacedServer(std::process::Child);

impl NamespacedServer {
    /// Starts `serve` (a command from [`deskgrid_in`]) and waits for its socket.
    fn start(mut serve: std::process::Command, data_dir: &Path) -> Self {
        let child = serve
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let server = Self(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready when the socket accepts a connection (a killed server's
        // socket file may still be there).
        while std::os::unix::net::UnixStream::connect(data_dir.join("control.sock")).is_err() {
            assert!(
                Instant::now() < deadline,
                "serve did not start in its namespace"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for NamespacedServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `deskgrid --output json template ARGUMENTS` against `member`'s server,
/// which must accept it; what it printed.
fn template(member: &Member, arguments: &[&str]) -> serde_json::Value {
    let mut all = vec!["--output", "json", "template"];
    all.extend_from_slice(arguments);
    let output = deskgrid(&member.data_dir, &all);
    assert!(
        output.status.success(),
        "template {}: {}",
        arguments.join(" "),
        stderr(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Waits until `template list` on `member` prints `expected`.
fn wait_for_templates(member: &Member, expected: &serde_json::Value) {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let listed = template(member, &["list"]);
        if listed == *expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} lists {listed}, never {expected}",
            member.data_dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both sides write while cut off from each other: different keys (join
/// tokens) and the same keys (templates `office` and `lab`, a different value
/// on each side). After the heal both hold everything, and for each shared
/// key both pick the write that came later by hybrid logical clock.
#[test]
fn both_sides_of_a_partition_keep_writing_and_converge_after_the_heal() {
    let Some(network) = SplitNetwork::create() else {
        println!(
            "SKIPPED: cannot create network namespaces and a veth pair (needs root and iproute2)"
        );
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let password = temp.path().join("password");
    std::fs::write(&password, "correct horse battery staple").unwrap();
    let left_listen = format!("{}:7443", SplitNetwork::LEFT_ADDRESS);
    let right_listen = format!("{}:7443", SplitNetwork::RIGHT_ADDRESS);
    let left = Member {
        data_dir: temp.path().join("left"),
        address: left_listen.clone(),
    };
    let right = Member {
        data_dir: temp.path().join("right"),
        address: right_listen.clone(),
    };

    let output = network
        .deskgrid(
            &network.left,
            &left.data_dir,
            &[
                "init",
                "--new-grid",
                "--admin-password-file",
                password.to_str().unwrap(),
                "--listen",
                &left_listen,
                "--libvirt",
                "test:///default",
            ],
        )
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let _left_server = NamespacedServer::start(
        network.deskgrid(&network.left, &left.data_dir, &["serve"]),
        &left.data_dir,
    );
    // The CLI reaches a server through its Unix socket, from any namespace.
    let join_token = token(&left, 1);
    let output = network
        .deskgrid(
            &network.right,
            &right.data_dir,
            &[
                "join",
                &left_listen,
                "--token",
                &join_token,
                "--listen",
                &right_listen,
                "--libvirt",
                "test:///default",
            ],
        )
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "join across the veth pair: {}",
        stderr(&output)
    );
    let _right_server = NamespacedServer::start(
        network.deskgrid(&network.right, &right.data_dir, &["serve"]),
        &right.data_dir,
    );
    wait_for_agreement(&[&left, &right], 2);

    network.connect(false);
    let _ = token(&left, 1);
    let _ = token(&right, 1);
    // The same key written on both sides, the right's write last: after
    // the heal, last-writer-wins by hybrid logical clock must pick it on
    // both. A second key written in the opposite order (the left's last)
    // shows that the later write wins, not a favoured side or server id.
    let create = |member: &Member, name: &str, image: &str, vcpus: &str, memory: &str, desired| {
        template(
            member,
            &[
                "create",
                name,
                "--image",
                image,
                "--vcpus",
                vcpus,
                "--memory",
                memory,
                "--desired",
                desired,
            ],
        )
    };
    // Both namespaces read the same wall clock, and the clock counts
    // milliseconds: writes 100 ms apart are ordered by their physical time
    // with a wide margin, never by a tie-break.
    let write_spacing = Duration::from_millis(100);
    let office_first = create(&left, "office", "img-a", "1", "512", "2");
    std::thread::sleep(write_spacing);
    let office_second = create(&right, "office", "img-b", "2", "1024", "5");
    let lab_first = create(&right, "lab", "img-c", "4", "2048", "1");
    std::thread::sleep(write_spacing);
    let lab_second = create(&left, "lab", "img-d", "8", "4096", "3");
    assert_eq!(
        [&office_first, &office_second, &lab_first, &lab_second].map(|written| &written["image"]),
        ["img-a", "img-b", "img-c", "img-d"]
    );
    std::thread::sleep(Duration::from_secs(3));
    let (left_digest, right_digest) = (
        status(&left)["state_digest"].clone(),
        status(&right)["state_digest"].clone(),
    );
    assert_ne!(
        left_digest, right_digest,
        "the partition really separated them (both sides wrote)"
    );
    // `template list` is sorted by name: lab, then office.
    assert_eq!(
        template(&left, &["list"]),
        serde_json::json!([lab_second, office_first]),
        "while cut, the left sees only its own writes"
    );
    assert_eq!(
        template(&right, &["list"]),
        serde_json::json!([lab_first, office_second]),
        "while cut, the right sees only its own writes"
    );

    network.connect(true);
    let healed = Instant::now();
    wait_for_agreement(&[&left, &right], 2);
    eprintln!("converged {:?} after the heal", healed.elapsed());
    for member in [&left, &right] {
        assert_eq!(
            template(member, &["list"]),
            serde_json::json!([lab_second, office_second]),
            "the later write of each key wins on {}",
            member.data_dir.display()
        );
    }

    // The side that lost `office` writes it again after the heal: `set`
    // changes the template it holds, the winner now, and the change travels
    // to the other side.
    let changed = template(&left, &["set", "office", "--desired", "7"]);
    let mut office_changed = office_second.clone();
    office_changed["desired_vms"] = serde_json::json!(7);
    assert_eq!(changed, office_changed);
    let sent = Instant::now();
    wait_for_templates(&right, &serde_json::json!([lab_second, office_changed]));
    eprintln!(
        "a write after the heal reached the other side in {:?}",
        sent.elapsed()
    );
    wait_for_agreement(&[&left, &right], 2);
}
