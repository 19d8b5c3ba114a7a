//! `deskgrid template create|list|set|delete` end to end: the real binary
//! against a running `deskgrid serve` (libvirt's test driver), every refusal
//! an admin can meet, and a template made on one server of a two-server
//! grid listed on the other.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use common::{
    deskgrid, free_udp_port, init_new_grid, join_grid, join_token, refused, stderr, stdout,
    succeeded, Server,
};

/// A push reaches a peer in milliseconds; anti-entropy (every 2 s) repairs a
/// lost one. Generous for a loaded CI machine, never reached when healthy.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

const WARNING: &str =
    "warning: image win11-v1 is not in the grid yet: no VMs are created until it is imported";

/// A standalone server's data directory (no grid: templates need none).
fn init_standalone(data_dir: &Path) {
    let address = format!("127.0.0.1:{}", free_udp_port());
    let output = deskgrid(
        data_dir,
        &[
            "init",
            "--name",
            "solo",
            "--listen",
            &address,
            "--libvirt",
            "test:///default",
        ],
    );
    assert!(output.status.success(), "init: {}", stderr(&output));
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap()
}

fn list_json(data_dir: &Path) -> serde_json::Value {
    json(&succeeded(deskgrid(
        data_dir,
        &["--output", "json", "template", "list"],
    )))
}

#[test]
fn templates_are_created_listed_changed_and_deleted() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    init_standalone(&data_dir);
    let server = Server::start(&data_dir);

    let empty = succeeded(deskgrid(&data_dir, &["template", "list"]));
    assert!(
        stdout(&empty).starts_with("no templates yet: create one with `deskgrid template create"),
        "{}",
        stdout(&empty)
    );
    assert_eq!(list_json(&data_dir), serde_json::json!([]));

    // Create, text: a summary on stdout, the missing image as a warning.
    let created = succeeded(deskgrid(
        &data_dir,
        &[
            "template",
            "create",
            "office",
            "--image",
            "win11-v1",
            "--vcpus",
            "2",
            "--memory",
            "4096",
            "--desired",
            "10",
            "--min-idle",
            "2",
        ],
    ));
    assert!(
        stdout(&created).starts_with("template office created: image win11-v1, 2 vCPUs, 4096 MiB"),
        "{}",
        stdout(&created)
    );
    assert_eq!(stderr(&created).trim(), WARNING);

    // Create, JSON: the stored template on stdout (stdout stays JSON), the
    // warning still on stderr.
    let created = succeeded(deskgrid(
        &data_dir,
        &[
            "--output",
            "json",
            "template",
            "create",
            "cad",
            "--image",
            "win11-v1",
            "--vcpus",
            "8",
            "--memory",
            "16384",
            "--desired",
            "3",
            "--replicas",
            "3",
            "--personal",
            "--display",
            "vnc",
            "--monitors",
            "2",
            "--concurrency-percent",
            "50",
        ],
    ));
    let cad = serde_json::json!({
        "name": "cad",
        "image": "win11-v1",
        "vcpus": 8,
        "memory_mib": 16384,
        "desired_vms": 3,
        "min_idle_vms": 0,
        "min_replicas": 3,
        "concurrency_percent": 50,
        "kind": "personal",
        "display": "vnc",
        "monitors": 2,
    });
    assert_eq!(json(&created), cad);
    assert_eq!(stderr(&created).trim(), WARNING);

    // List: sorted by name, in a table and as an array.
    let listed = stdout(&succeeded(deskgrid(&data_dir, &["template", "list"])));
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    for column in [
        "name", "image", "vcpus", "memory", "desired", "min idle", "replicas", "kind",
    ] {
        assert!(lines[0].contains(column), "no {column} column: {listed}");
    }
    let cells: Vec<Vec<&str>> = lines[1..]
        .iter()
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(
        cells,
        [
            ["cad", "win11-v1", "8", "16384", "MiB", "3", "0", "3", "personal"],
            ["office", "win11-v1", "2", "4096", "MiB", "10", "2", "2", "pooled"],
        ]
    );
    let listed = list_json(&data_dir);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0], cad);
    assert_eq!(listed[1]["name"], "office");

    // Set: the given fields change, the others stay.
    let changed = succeeded(deskgrid(
        &data_dir,
        &[
            "--output",
            "json",
            "template",
            "set",
            "office",
            "--desired",
            "20",
            "--memory",
            "8192",
        ],
    ));
    let office = json(&changed);
    assert_eq!(office["desired_vms"], 20);
    assert_eq!(office["memory_mib"], 8192);
    assert_eq!(office["vcpus"], 2);
    assert_eq!(office["min_idle_vms"], 2);
    assert_eq!(office["min_replicas"], 2);
    assert_eq!(office["kind"], "pooled");
    assert_eq!(office["display"], "spice");
    assert_eq!(list_json(&data_dir)[1], office, "list shows the change");
    let changed = succeeded(deskgrid(
        &data_dir,
        &["template", "set", "office", "--personal"],
    ));
    assert!(
        stdout(&changed).starts_with("template office changed:"),
        "{}",
        stdout(&changed)
    );
    assert_eq!(list_json(&data_dir)[1]["kind"], "personal");

    // Refusals, each with its reason; none changes the state.
    let before = list_json(&data_dir);
    refused(
        &deskgrid(
            &data_dir,
            &[
                "template",
                "create",
                "office",
                "--image",
                "win11-v1",
                "--vcpus",
                "1",
                "--memory",
                "1024",
                "--desired",
                "1",
            ],
        ),
        "template office exists; change it with `deskgrid template set office ...`",
    );
    refused(
        &deskgrid(&data_dir, &["template", "set", "nosuch", "--desired", "1"]),
        "no template nosuch in this grid (see `deskgrid template list`)",
    );
    refused(
        &deskgrid(&data_dir, &["template", "delete", "nosuch"]),
        "no template nosuch in this grid (see `deskgrid template list`)",
    );
    refused(
        &deskgrid(
            &data_dir,
            &[
                "template",
                "create",
                "tiny",
                "--image",
                "win11-v1",
                "--vcpus",
                "1",
                "--memory",
                "0",
                "--desired",
                "1",
            ],
        ),
        "invalid template tiny: memory_mib is 0, it must be between 128 and 1048576",
    );
    refused(
        &deskgrid(&data_dir, &["template", "set", "office", "--memory", "0"]),
        "invalid template office: memory_mib is 0, it must be between 128 and 1048576",
    );
    refused(
        &deskgrid(
            &data_dir,
            &["template", "set", "office", "--pooled", "--personal"],
        ),
        "cannot be used with",
    );
    refused(
        &deskgrid(
            &data_dir,
            &[
                "template",
                "create",
                "both",
                "--image",
                "win11-v1",
                "--vcpus",
                "1",
                "--memory",
                "1024",
                "--desired",
                "1",
                "--pooled",
                "--personal",
            ],
        ),
        "cannot be used with",
    );
    refused(
        &deskgrid(&data_dir, &["template", "set", "office"]),
        "nothing to change in template office",
    );
    refused(
        &deskgrid(&data_dir, &["template", "delete", "../etc"]),
        "template name \"../etc\" has '.' at position 0",
    );
    let json_refusal = deskgrid(
        &data_dir,
        &["--output", "json", "template", "delete", "nosuch"],
    );
    assert!(!json_refusal.status.success());
    assert_eq!(
        json(&json_refusal)["error"],
        "the server refused: no template nosuch in this grid (see `deskgrid template list`)"
    );
    assert_eq!(list_json(&data_dir), before, "refusals change nothing");

    // Delete: gone from the list, and the name is free again.
    let deleted = succeeded(deskgrid(
        &data_dir,
        &["--output", "json", "template", "delete", "office"],
    ));
    assert_eq!(json(&deleted), serde_json::json!({ "deleted": "office" }));
    let deleted = succeeded(deskgrid(&data_dir, &["template", "delete", "cad"]));
    assert_eq!(stdout(&deleted).trim(), "template cad deleted");
    assert_eq!(list_json(&data_dir), serde_json::json!([]));
    succeeded(deskgrid(
        &data_dir,
        &[
            "template",
            "create",
            "office",
            "--image",
            "win11-v2",
            "--vcpus",
            "4",
            "--memory",
            "2048",
            "--desired",
            "1",
        ],
    ));

    // Every change was durable: a restarted server lists the same.
    let before_restart = list_json(&data_dir);
    let stopped = server.stop();
    assert!(stopped.status.success(), "{}", stderr(&stopped));
    let server = Server::start(&data_dir);
    assert_eq!(list_json(&data_dir), before_restart);
    assert_eq!(before_restart[0]["image"], "win11-v2");
    let stopped = server.stop();
    assert!(stopped.status.success(), "{}", stderr(&stopped));
}

#[test]
fn without_a_server_the_cli_says_how_to_start_one() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    init_standalone(&data_dir);
    refused(
        &deskgrid(&data_dir, &["template", "list"]),
        &format!("no deskgrid server is running on {}", data_dir.display()),
    );
}

#[test]
fn a_template_created_on_one_server_is_listed_on_the_other() {
    let temp = tempfile::tempdir().unwrap();
    let first = temp.path().join("server-1");
    let second = temp.path().join("server-2");
    let first_address = init_new_grid(&first, "server-1");
    let first_server = Server::start(&first);
    join_grid(&second, "server-2", &first_address, &join_token(&first));
    let second_server = Server::start(&second);

    let created = json(&succeeded(deskgrid(
        &first,
        &[
            "--output",
            "json",
            "template",
            "create",
            "office",
            "--image",
            "win11-v1",
            "--vcpus",
            "2",
            "--memory",
            "4096",
            "--desired",
            "5",
        ],
    )));
    let started = Instant::now();
    loop {
        let listed = list_json(&second);
        if listed == serde_json::json!([created.clone()]) {
            break;
        }
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the template never reached the second server: {listed}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "template reached the other server after {:?}",
        started.elapsed()
    );

    // A deletion on the other server travels back the same way.
    succeeded(deskgrid(&second, &["template", "delete", "office"]));
    let started = Instant::now();
    while list_json(&first) != serde_json::json!([]) {
        assert!(
            started.elapsed() < CONVERGE_TIMEOUT,
            "the deletion never reached the first server"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    for server in [second_server, first_server] {
        let stopped = server.stop();
        assert!(stopped.status.success(), "{}", stderr(&stopped));
    }
}
