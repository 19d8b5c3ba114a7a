//! Placement at grid scale: the full plan for 1,000 servers, 200 templates
//! and 100,000 VMs, and the connection ranking of one login in that grid,
//! side by side with the goals (issue 5: plan well under 100 ms, a login
//! ranking under 100 µs, on one core).
//!
//! `cargo bench --bench placement [-- --servers N --templates N --vms N --runs N]`

#[path = "../tests/support/placement_grid.rs"]
mod support;

use std::time::{Duration, Instant};

use deskgrid::model::{UserName, VmState};
use deskgrid::placement::{plan, ConnectionIndex, GridView, Liveness, Plan};
use deskgrid::state::{ConfigValue, GridState, HlcClock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{Grid, GridSpec};

const SEED: u64 = 0xdeb5_6121;

struct Args {
    servers: usize,
    templates: usize,
    vms: u32,
    runs: usize,
}

fn args() -> Args {
    let mut parsed = Args {
        servers: 1000,
        templates: 200,
        vms: 100_000,
        runs: 15,
    };
    let mut words = std::env::args().skip(1);
    while let Some(word) = words.next() {
        let mut value = || {
            words
                .next()
                .and_then(|value| value.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("{word} needs a number"))
        };
        match word.as_str() {
            "--servers" => parsed.servers = value(),
            "--templates" => parsed.templates = value(),
            "--vms" => parsed.vms = u32::try_from(value()).expect("--vms fits in u32"),
            "--runs" => parsed.runs = value(),
            // cargo bench passes --bench; anything else is a typo.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    parsed
}

/// A grid shaped like a large site: mixed hosts, 2 templates per image,
/// every template's desired count summing to `vms`, each image imported on
/// one server.
fn grid(args: &Args) -> Grid {
    let spec = GridSpec {
        servers: args.servers,
        templates: args.templates,
        images: args.templates.div_ceil(2),
        sites: 4,
        suspect_permille: 0,
        missing_permille: 0,
        holding_permille: 0,
        vms: 0,
        max_desired: 0,
        ample: false,
    };
    let mut grid = Grid::random(&spec, SEED);
    let mut rng = StdRng::seed_from_u64(SEED);
    for (_, record, _) in &mut grid.servers {
        record.capacity.cpus = rng.random_range(48..=128);
        record.capacity.memory_total_mib = 1024 * rng.random_range(512..=1536);
        record.capacity.storage_free_bytes = 1 << 42;
    }
    let per_template = args.vms / args.templates as u32;
    for (index, template) in grid.templates.iter_mut().enumerate() {
        template.desired_vms =
            per_template + u32::from((index as u32) < args.vms % args.templates as u32);
        template.min_idle_vms = 0;
        template.concurrency_percent = 0;
    }
    grid.entitled.clear();
    for (index, image) in grid.images.iter_mut().enumerate() {
        image.state = deskgrid::model::ImageState::Ready;
        let holder = index * 7 % args.servers;
        grid.servers[holder]
            .1
            .images
            .insert(image.id.clone(), deskgrid::model::ImageHolding::Complete);
    }
    grid
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn time<T>(runs: usize, mut work: impl FnMut() -> T) -> (Duration, T) {
    let mut samples = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let out = work();
        samples.push(start.elapsed());
        last = Some(out);
    }
    (median(samples), last.expect("runs > 0"))
}

fn vms(grid: &Grid) -> usize {
    grid.servers
        .iter()
        .map(|(_, record, _)| record.vms.len())
        .sum()
}

fn summary(plan: &Plan) -> String {
    let creates: u32 = plan
        .steps
        .iter()
        .map(|step| match step.action {
            deskgrid::placement::Action::CreateVms { count, .. } => count,
            _ => 0,
        })
        .sum();
    format!(
        "{} steps ({} VMs to create), {} shortfalls",
        plan.steps.len(),
        creates,
        plan.shortfalls.len()
    )
}

fn row(what: &str, measured: Duration, goal: Option<Duration>, note: &str) {
    let goal_text = goal.map_or("-".to_owned(), |goal| format!("{goal:?}"));
    let verdict = match goal {
        Some(goal) if measured <= goal => "meets goal",
        Some(_) => "MISSES goal",
        None => "",
    };
    println!("| {what} | {measured:.2?} | {goal_text} | {verdict} | {note} |");
}

fn main() {
    let args = args();
    let runs = args.runs.max(1);
    println!(
        "placement benchmark: {} servers, {} templates, {} VMs wanted; median of {runs} runs, one thread\n",
        args.servers, args.templates, args.vms
    );
    println!("| what | median | goal | verdict | notes |");
    println!("|---|---|---|---|---|");

    let mut grid = grid(&args);
    let (cold, cold_plan) = time(runs, || plan(&grid.view(), SEED));
    row(
        "plan, cold grid (place every VM)",
        cold,
        None,
        &summary(&cold_plan),
    );

    let rounds = grid.converge(SEED, 10).expect("the bench grid settles");
    let placed = vms(&grid);
    let (steady, steady_plan) = time(runs, || plan(&grid.view(), SEED));
    row(
        "plan, settled grid (full plan)",
        steady,
        Some(Duration::from_millis(100)),
        &format!(
            "{placed} VMs placed after {rounds} rounds; {}",
            summary(&steady_plan)
        ),
    );

    // Lose the busiest server: its VMs and copies must be made again elsewhere.
    let mut lost = grid.clone();
    let busiest = (0..lost.servers.len())
        .max_by_key(|&index| lost.servers[index].1.vms.len())
        .expect("the grid has servers");
    let lost_vms = lost.servers[busiest].1.vms.len();
    lost.servers[busiest].2 = Liveness::Missing;
    let (after_loss, loss_plan) = time(runs, || plan(&lost.view(), SEED));
    row(
        "plan, one server missing",
        after_loss,
        Some(Duration::from_millis(100)),
        &format!("it had {lost_vms} VMs; {}", summary(&loss_plan)),
    );

    // Half the desktops in use, so the ranking has loads to compare.
    let mut rng = StdRng::seed_from_u64(SEED ^ 1);
    for (_, record, _) in &mut grid.servers {
        for vm in record.vms.values_mut() {
            if rng.random_bool(0.5) {
                vm.state = VmState::InUse;
                vm.user = Some(
                    UserName::new(format!("user-{}", rng.random_range(0..60_000)))
                        .expect("generated names are valid"),
                );
            }
        }
    }
    let view = grid.view();
    let (index_time, index) = time(runs, || ConnectionIndex::new(&view, SEED));
    row(
        "connection index build (once per state change)",
        index_time,
        None,
        "",
    );
    let users: Vec<UserName> = (0..1000)
        .map(|n| UserName::new(format!("login-{n}")).expect("building the bench grid"))
        .collect();
    let mut samples = Vec::with_capacity(users.len() * 10);
    let mut candidates = 0;
    for round in 0..10 {
        for (n, user) in users.iter().enumerate() {
            let template = &grid.templates[(n + round) % grid.templates.len()].name;
            let start = Instant::now();
            let ranked = index.rank(user, template, None);
            samples.push(start.elapsed());
            candidates += ranked.len();
        }
    }
    let logins = samples.len();
    row(
        "connection ranking, one login",
        median(samples),
        Some(Duration::from_micros(100)),
        &format!(
            "{logins} logins, {} candidate servers on average",
            candidates / logins
        ),
    );

    // What the running server pays on top: the view from the replicated state.
    let mut state = GridState::new();
    let mut clock = HlcClock::new();
    let origin = grid.servers[0].0;
    for template in &grid.templates {
        state
            .put_config(
                origin,
                clock.tick(1),
                ConfigValue::Template(template.clone()),
            )
            .expect("building the bench grid");
    }
    for image in &grid.images {
        state
            .put_config(origin, clock.tick(1), ConfigValue::Image(image.clone()))
            .expect("building the bench grid");
    }
    for (id, record, _) in &grid.servers {
        state
            .update_server(*id, clock.tick(2), record.clone())
            .expect("building the bench grid");
    }
    let (from_state, _) = time(runs, || {
        GridView::from_state(&state, |_| Liveness::Alive)
            .servers()
            .len()
    });
    row("view from the grid state", from_state, None, "");
    let (state_plan, _) = time(runs, || {
        plan(&GridView::from_state(&state, |_| Liveness::Alive), SEED)
    });
    row(
        "view + plan from the grid state",
        state_plan,
        Some(Duration::from_millis(100)),
        "what the policy loop runs per round",
    );
}
