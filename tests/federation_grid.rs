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
    assert!(output.status.success(), "status: {}", stderr(&output));
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

    // Kill the third server without warning; change the grid; restart it.
    drop(third_server);
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
