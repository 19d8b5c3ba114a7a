//! `deskgrid policy show|set` end to end: the real binary against two
//! running `deskgrid serve` processes (libvirt's test driver). A change made
//! on one server reaches the other; invalid values and an empty change are
//! refused with a clear message and change nothing.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{deskgrid, init_new_grid, join_grid, join_token, stderr, stdout, Server};
use deskgrid::model::Policy;

/// A push reaches a peer in milliseconds; anti-entropy repairs a lost one.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(15);

fn policy(data_dir: &Path) -> Policy {
    let output = deskgrid(data_dir, &["--output", "json", "policy", "show"]);
    assert!(output.status.success(), "policy show: {}", stderr(&output));
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn a_policy_change_reaches_every_server_and_bad_values_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let first = temp.path().join("server-1");
    let second = temp.path().join("server-2");
    let first_address = init_new_grid(&first, "server-1");
    let _first_server = Server::start(&first);
    join_grid(&second, "server-2", &first_address, &join_token(&first));
    let _second_server = Server::start(&second);

    assert_eq!(policy(&first), Policy::default());
    let text = deskgrid(&first, &["policy", "show"]);
    assert!(
        stdout(&text).contains("disconnect grace          3600 s"),
        "{}",
        stdout(&text)
    );

    let changed = deskgrid(
        &first,
        &[
            "--output",
            "json",
            "policy",
            "set",
            "--disconnect-grace",
            "600",
            "--max-concurrent-boots",
            "2",
        ],
    );
    assert!(changed.status.success(), "policy set: {}", stderr(&changed));
    let expected = Policy {
        disconnect_grace_s: 600,
        max_concurrent_boots: 2,
        ..Policy::default()
    };
    assert_eq!(
        serde_json::from_slice::<Policy>(&changed.stdout).unwrap(),
        expected
    );
    assert_eq!(policy(&first), expected);
    let begun = Instant::now();
    while policy(&second) != expected {
        assert!(
            begun.elapsed() < CONVERGE_TIMEOUT,
            "server-2 still has {:?}",
            policy(&second)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    for (arguments, says) in [
        (
            &["policy", "set", "--max-concurrent-boots", "0"][..],
            "max_concurrent_boots",
        ),
        (
            &["policy", "set", "--disconnect-grace", "999999999"][..],
            "disconnect_grace_s",
        ),
        (&["policy", "set"][..], "give at least one setting"),
    ] {
        let refused = deskgrid(&second, arguments);
        assert!(!refused.status.success(), "{arguments:?} accepted");
        assert!(
            stderr(&refused).contains(says),
            "{arguments:?}: expected {says:?} in {}",
            stderr(&refused)
        );
    }
    assert_eq!(policy(&second), expected, "refusals change nothing");
}
