//! Grid simulation benchmark: the real membership (foca), dissemination and
//! grid state of N servers in one process, in virtual time, over an
//! in-memory LAN (`federation::simulation`). For each N it reports how long a
//! config change takes to reach every server, how long a crashed server takes
//! to be seen down everywhere, what a quiet grid sends per server, and the
//! wall time the simulation took. BENCHMARKS.md has the figures.
//!
//! ```text
//! cargo bench --bench grid_simulation -- [--servers 100,1000] [--loss 0.0] [--seed 1]
//! ```
//!
//! Every figure is simulated time except "wall", measured here around the run.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use deskgrid::federation::simulation::{run_grid_scenario, GridScenario, SimulationConfig};

struct Options {
    servers: Vec<usize>,
    loss: f64,
    seed: u64,
}

fn parse_options() -> anyhow::Result<Options> {
    let mut options = Options {
        servers: vec![100, 1000],
        loss: 0.0,
        seed: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--servers" => {
                let list = args
                    .next()
                    .context("--servers needs a list like 100,1000")?;
                options.servers = list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--servers takes numbers separated by commas")?;
            }
            "--loss" => {
                options.loss = args
                    .next()
                    .context("--loss needs a probability")?
                    .parse()
                    .context("--loss takes a number between 0 and 1")?;
            }
            "--seed" => {
                options.seed = args
                    .next()
                    .context("--seed needs a number")?
                    .parse()
                    .context("--seed takes a number")?;
            }
            // `cargo bench` passes `--bench`; other harness flags mean nothing here.
            _ => {}
        }
    }
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.loss),
        "--loss must be between 0 and 1"
    );
    anyhow::ensure!(
        options.servers.iter().all(|n| *n >= 2),
        "a grid needs at least two servers"
    );
    Ok(options)
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "—".to_owned(),
        |duration| format!("{:.2}", duration.as_secs_f64()),
    )
}

fn main() -> anyhow::Result<()> {
    let options = parse_options()?;
    let mut rows = Vec::new();
    for &n_servers in &options.servers {
        let mut config = SimulationConfig::new(n_servers, options.seed);
        config.network.loss = options.loss;
        let scenario = GridScenario::new(config);
        let started = Instant::now();
        let report = run_grid_scenario(&scenario);
        let wall = started.elapsed();
        eprintln!("{report}  wall time: {:.1} s\n", wall.as_secs_f64());
        rows.push((report, wall));
    }

    println!(
        "| N | loss | membership converged (s) | config change: s, rounds, repaired | crash seen down by all (s) | restart seen alive (s) | steady B/server/s (membership + anti-entropy) | simulated (s) | wall (s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (report, wall) in &rows {
        let propagation = report.propagation.map_or_else(
            || "—".to_owned(),
            |propagation| {
                format!(
                    "{:.3}, {}, {}",
                    propagation.after.as_secs_f64(),
                    propagation.rounds,
                    propagation.repaired_by_anti_entropy
                )
            },
        );
        let steady = report.steady.map_or_else(
            || "—".to_owned(),
            |steady| {
                format!(
                    "{:.0} ({:.0} + {:.0})",
                    steady.total_bytes_per_server_s(),
                    steady.membership_bytes_per_server_s,
                    steady.dissemination_bytes_per_server_s
                )
            },
        );
        println!(
            "| {} | {:.0}% | {} | {} | {} | {} | {} | {:.0} | {:.1} |",
            report.n_servers,
            report.loss * 100.0,
            seconds(report.membership_converged),
            propagation,
            seconds(report.crash_detection),
            seconds(report.rejoin),
            steady,
            report.simulated.as_secs_f64(),
            wall.as_secs_f64()
        );
    }
    Ok(())
}
