//! `deskgrid user`, `entitle`, `session` and `connect` end to end: the real
//! binary against two running `deskgrid serve` processes (libvirt's test
//! driver). Users and entitlements made on one server reach the other;
//! `connect` gives the honest answers a grid without desktops has (the
//! desktop service and real VMs come with their own tests): a wrong
//! password, the rate limit, a template choice, and "none free".

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    create_template, deskgrid, init_new_grid, join_grid, join_token, refused, stderr, stdout,
    succeeded, Server, DESKGRID,
};

/// A push reaches a peer in milliseconds; anti-entropy (every 2 s) repairs a
/// lost one. Generous for a loaded CI machine, never reached when healthy.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `deskgrid ARGS` with `input` on standard input.
fn deskgrid_with_stdin(data_dir: &Path, arguments: &[&str], input: &str) -> Output {
    let mut child = Command::new(DESKGRID)
        .arg("--data-dir")
        .arg(data_dir)
        .args(arguments)
        .env_remove("DESKGRID_DATA_DIR")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Waits until `deskgrid user list` on `data_dir` says `expected`.
fn wait_for_users(data_dir: &Path, expected: &serde_json::Value) {
    let started = Instant::now();
    loop {
        let listed = json(&succeeded(deskgrid(
            data_dir,
            &["--output", "json", "user", "list"],
        )));
        if listed == *expected {
            eprintln!("users converged after {:?}", started.elapsed());
            return;
        }
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "users never converged: {listed}, expected {expected}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn users_and_entitlements_reach_the_other_server_and_connect_answers_honestly() {
    let temp = tempfile::tempdir().unwrap();
    let first = temp.path().join("server-1");
    let second = temp.path().join("server-2");
    let first_address = init_new_grid(&first, "server-1");
    let first_server = Server::start(&first);
    join_grid(&second, "server-2", &first_address, &join_token(&first));
    let second_server = Server::start(&second);
    create_template(&first, "office");
    create_template(&first, "cad");

    let alice_password = temp.path().join("alice.password");
    std::fs::write(&alice_password, "alice's long password\n").unwrap();
    let alice_password = alice_password.display().to_string();
    let added = json(&succeeded(deskgrid(
        &first,
        &[
            "--output",
            "json",
            "user",
            "add",
            "alice",
            "--password-file",
            &alice_password,
            "--display-name",
            "Alice Example",
        ],
    )));
    assert_eq!(added["name"], "alice");
    assert!(
        !added.to_string().contains("argon2"),
        "no hash in the answer"
    );

    // Refusals: a duplicate, a weak or empty password, no password source.
    refused(
        &deskgrid(
            &first,
            &["user", "add", "alice", "--password-file", &alice_password],
        ),
        "user alice exists; delete it first to replace it",
    );
    refused(
        &deskgrid_with_stdin(
            &first,
            &["user", "add", "bob", "--password-stdin"],
            "short\n",
        ),
        "the password is 5 characters long; use at least 12",
    );
    refused(
        &deskgrid_with_stdin(&first, &["user", "add", "bob", "--password-stdin"], "\n"),
        "the password is empty; nothing was written",
    );
    refused(
        &deskgrid_with_stdin(&first, &["user", "add", "bob"], ""),
        "give the password with --password-file FILE or --password-stdin",
    );
    let bob = succeeded(deskgrid_with_stdin(
        &first,
        &["user", "add", "bob", "--group", "staff", "--password-stdin"],
        "bob's long password\n",
    ));
    assert!(
        stdout(&bob).starts_with("user bob created"),
        "{}",
        stdout(&bob)
    );

    // Entitlements: by user, by group; unknown template and user refused.
    succeeded(deskgrid(
        &first,
        &["entitle", "--user", "alice", "--template", "office"],
    ));
    succeeded(deskgrid(
        &first,
        &["entitle", "--user", "alice", "--template", "cad"],
    ));
    let granted = succeeded(deskgrid(
        &first,
        &["entitle", "--group", "staff", "--template", "office"],
    ));
    assert_eq!(
        stdout(&granted).trim(),
        "group staff may use template office"
    );
    refused(
        &deskgrid(
            &first,
            &["entitle", "--user", "alice", "--template", "nope"],
        ),
        "no template nope in this grid (see `deskgrid template list`)",
    );
    refused(
        &deskgrid(
            &first,
            &["entitle", "--user", "zed", "--template", "office"],
        ),
        "no user zed in this grid (see `deskgrid user list`)",
    );

    // Everything reached the second server.
    let expected = json(&succeeded(deskgrid(
        &first,
        &["--output", "json", "user", "list"],
    )));
    let names: Vec<&str> = expected
        .as_array()
        .unwrap()
        .iter()
        .map(|user| user["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "alice", "bob"]);
    assert_eq!(
        expected[1]["templates"],
        serde_json::json!(["cad", "office"])
    );
    assert_eq!(
        expected[2]["templates"],
        serde_json::json!(["office"]),
        "through staff"
    );
    wait_for_users(&second, &expected);

    // Connect on the second server: no desktops exist anywhere.
    let vv_file = temp.path().join("desk.vv");
    let vv_file = vv_file.display().to_string();
    refused(
        &deskgrid_with_stdin(
            &second,
            &[
                "connect",
                "--user",
                "bob",
                "--password-stdin",
                "--vv-file",
                &vv_file,
            ],
            "bob's long password\n",
        ),
        "no free desktop of template office: none free, 0 being prepared; try again shortly",
    );
    refused(
        &deskgrid(
            &second,
            &[
                "connect",
                "--user",
                "alice",
                "--password-file",
                &alice_password,
            ],
        ),
        "user alice is entitled to several templates; choose one with --template: cad, office",
    );
    let answer = deskgrid(
        &second,
        &[
            "--output",
            "json",
            "connect",
            "--user",
            "alice",
            "--password-file",
            &alice_password,
            "--template",
            "cad",
        ],
    );
    assert!(!answer.status.success());
    assert_eq!(
        json(&answer)["error"],
        "the server refused: no free desktop of template cad: none free, 0 being prepared; try again shortly"
    );
    assert!(!Path::new(&vv_file).exists(), "no desktop, no .vv file");

    // Sessions: none anywhere, and a logoff says so.
    assert_eq!(
        json(&succeeded(deskgrid(
            &first,
            &["--output", "json", "session", "list"]
        ))),
        serde_json::json!([])
    );
    assert_eq!(
        stdout(&succeeded(deskgrid(&first, &["session", "list"]))).trim(),
        "no sessions"
    );
    refused(
        &deskgrid(&first, &["session", "logoff", "alice"]),
        "user alice has no session or reserved desktop in the grid state",
    );

    // A wrong password, then the rate limit (per user and per source: the
    // control socket is one source).
    let mut limited = None;
    for attempt in 1..=6 {
        let answer = deskgrid_with_stdin(
            &first,
            &["connect", "--user", "alice", "--password-stdin"],
            "not alice's password\n",
        );
        assert!(!answer.status.success());
        if stderr(&answer).contains("too many attempts, retry in") {
            limited = Some(attempt);
            break;
        }
        assert!(
            stderr(&answer).contains("wrong user name or password"),
            "{}",
            stderr(&answer)
        );
    }
    assert_eq!(limited, Some(6), "five failures allowed a minute");
    refused(
        &deskgrid(
            &first,
            &[
                "connect",
                "--user",
                "alice",
                "--password-file",
                &alice_password,
                "--template",
                "cad",
            ],
        ),
        "too many attempts, retry in",
    );

    // A deletion and an entitlement withdrawn travel back the other way.
    succeeded(deskgrid(&second, &["user", "delete", "alice"]));
    succeeded(deskgrid(
        &second,
        &[
            "entitle",
            "--remove",
            "--group",
            "staff",
            "--template",
            "office",
        ],
    ));
    let mut expected = json(&succeeded(deskgrid(
        &second,
        &["--output", "json", "user", "list"],
    )));
    assert_eq!(expected.as_array().unwrap().len(), 2);
    assert_eq!(expected[1]["templates"], serde_json::json!([]));
    wait_for_users(&first, &expected);
    refused(
        &deskgrid(&first, &["user", "delete", "admin"]),
        "user admin is the grid's last admin",
    );
    expected = json(&succeeded(deskgrid(
        &first,
        &["--output", "json", "user", "list"],
    )));
    assert_eq!(expected[0]["role"], "admin");

    for server in [second_server, first_server] {
        let stopped = server.stop();
        assert!(stopped.status.success(), "{}", stderr(&stopped));
        assert!(
            !stderr(&stopped).contains("long password"),
            "a password reached the log"
        );
    }
}
