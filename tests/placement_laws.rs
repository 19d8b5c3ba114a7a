//! Laws of the planner over random grids (1–200 servers, 1–50 templates,
//! random capacities, sites, suspect and missing servers): determinism,
//! invariants after a plan is carried out, fixpoint, bounded movement.

#[path = "support/placement_grid.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};

use deskgrid::model::{ImageHolding, ImageState, ImageVersionId, Name, ServerId, Template};
use deskgrid::placement::{
    plan, Action, ConnectionIndex, GridView, Liveness, Plan, Reason, ServerView,
};
use deskgrid::state::{ConfigValue, GridState, HlcClock};
use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use support::{budgets, used, Grid, GridSpec};

/// Plans carried out before the plan is empty. One, except where a surplus
/// complete copy of an image is kept while the pull that will replace it is
/// still running (the planner never goes below the need in *complete*
/// copies): that copy is dropped by the next plan, once the pull finished.
/// Over 300 random grids: 284 settle after one plan, 16 after two.
const SETTLE_ROUNDS: usize = 2;

fn spec() -> impl Strategy<Value = (GridSpec, u64)> {
    (1usize..=200, 1usize..=50, any::<u64>(), any::<bool>()).prop_map(
        |(servers, templates, seed, ample)| {
            let mut spec = GridSpec::small(servers, templates);
            spec.ample = ample;
            (spec, seed)
        },
    )
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 96,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The plan does not depend on the order of the input records.
    #[test]
    fn the_plan_ignores_input_order((spec, seed) in spec()) {
        let grid = Grid::random(&spec, seed);
        let expected = plan(&grid.view(), seed);
        let mut shuffled = grid.clone();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
        shuffled.servers.shuffle(&mut rng);
        shuffled.templates.shuffle(&mut rng);
        shuffled.images.shuffle(&mut rng);
        shuffled.entitled.shuffle(&mut rng);
        prop_assert_eq!(plan(&shuffled.view(), seed), expected);
    }

    /// After every target carries out its steps: replicas, capacity, images
    /// under every VM, nothing for servers that are not alive.
    #[test]
    fn a_carried_out_plan_keeps_the_invariants((spec, seed) in spec()) {
        let mut grid = Grid::random(&spec, seed);
        let before = grid.clone();
        let planned = plan(&grid.view(), seed);
        let liveness: BTreeMap<ServerId, Liveness> =
            grid.servers.iter().map(|(id, _, liveness)| (*id, *liveness)).collect();
        for step in &planned.steps {
            prop_assert_eq!(liveness[&step.target], Liveness::Alive, "step for a server that is not alive: {:?}", step);
        }
        grid.apply(&planned);
        check_invariants(&before, &grid)?;
    }

    /// Planning again after a plan is carried out settles within a few rounds
    /// and then stays settled.
    #[test]
    fn plans_reach_a_fixpoint_and_stay((spec, seed) in spec()) {
        let mut grid = Grid::random(&spec, seed);
        let rounds = grid.converge(seed, SETTLE_ROUNDS + 1);
        prop_assert!(rounds.is_some_and(|rounds| rounds <= SETTLE_ROUNDS), "no fixpoint in {} rounds", SETTLE_ROUNDS);
        let settled = grid.clone();
        for _ in 0..100 {
            let again = plan(&grid.view(), seed);
            prop_assert!(again.is_empty(), "a settled grid planned {:?}", again.steps);
            grid.apply(&again);
        }
        prop_assert_eq!(format!("{:?}", grid.servers), format!("{:?}", settled.servers));
    }

    /// Adding a server to a settled grid moves no copy it does not need, and
    /// at most ⌈copies / N⌉; losing one re-creates only copies it held, one
    /// per image at most.
    #[test]
    fn movement_is_bounded((servers, templates, seed) in (2usize..=120, 1usize..=30, any::<u64>())) {
        let mut spec = GridSpec::small(servers, templates);
        spec.ample = true;
        spec.missing_permille = 0;
        spec.suspect_permille = 0;
        let mut grid = Grid::random(&spec, seed);
        prop_assert!(grid.converge(seed, SETTLE_ROUNDS + 1).is_some());
        let copies: usize = grid.servers.iter().map(|(_, record, _)| record.images.len()).sum();

        let mut grown = grid.clone();
        let newcomer = Grid::random(&GridSpec { servers: servers + 1, holding_permille: 0, vms: 0, ..spec.clone() }, seed);
        let (_, mut record, _) = newcomer.servers[servers].clone();
        record.images.clear();
        grown.servers.push((support::server_id(servers), record, Liveness::Alive));
        let after_join = plan(&grown.view(), seed);
        let moved = after_join.steps.iter().filter(|step| matches!(step.action, Action::PullImage { .. } | Action::DropImage { .. })).count();
        prop_assert!(moved <= copies.div_ceil(servers), "{} copy moves for {} copies on {} servers", moved, copies, servers);

        let lost = seed as usize % servers;
        let held: BTreeSet<ImageVersionId> = grid.servers[lost].1.images.keys().cloned().collect();
        grid.servers[lost].2 = Liveness::Missing;
        let after_loss = plan(&grid.view(), seed);
        let mut pulls: BTreeMap<&ImageVersionId, usize> = BTreeMap::new();
        for step in &after_loss.steps {
            if let Action::PullImage { image } = &step.action {
                prop_assert!(held.contains(image), "pulled {} which the lost server did not hold", image);
                *pulls.entry(image).or_default() += 1;
            }
            prop_assert!(!matches!(step.action, Action::DropImage { .. }), "a loss dropped a copy: {:?}", step);
        }
        for (image, count) in pulls {
            prop_assert!(count <= 1, "{} re-created {} times", image, count);
        }
    }
}

fn check_invariants(before: &Grid, after: &Grid) -> Result<(), TestCaseError> {
    let policy = &after.policy;
    let counting: Vec<_> = after
        .servers
        .iter()
        .filter(|(_, _, liveness)| *liveness != Liveness::Missing)
        .collect();
    // Capacity: every server that got work stays within its budgets and disk.
    for ((id, record, liveness), (_, old, _)) in after.servers.iter().zip(&before.servers) {
        let (memory_budget, cpu_budget) = budgets(record, policy);
        let (memory, cpu) = used(record);
        let (old_memory, old_cpu) = used(old);
        prop_assert!(
            memory <= memory_budget.max(old_memory) && cpu <= cpu_budget.max(old_cpu),
            "server {:?} ({:?}) over budget: memory {}/{}, cpu {}/{}",
            id,
            liveness,
            memory,
            memory_budget,
            cpu,
            cpu_budget
        );
        if *liveness != Liveness::Alive {
            prop_assert_eq!(record, old, "a server that is not alive changed");
        }
        // Every VM sits on a copy of its image (the ones there before the plan too).
        for vm in record.vms.values() {
            if !old.vms.contains_key(&vm.id) {
                prop_assert_eq!(
                    record.images.get(&vm.image),
                    Some(&ImageHolding::Complete),
                    "VM {:?} created without its image",
                    vm.id
                );
            } else if old.images.contains_key(&vm.image) {
                prop_assert!(
                    record.images.contains_key(&vm.image),
                    "a copy under VM {:?} was dropped",
                    vm.id
                );
            }
        }
    }
    // Replicas: every placeable image in use has min(min replicas, possible)
    // holders among the servers that count.
    for template in &after.templates {
        let Some(image) = after.images.iter().find(|image| image.id == template.image) else {
            continue;
        };
        if image.state == ImageState::Importing {
            continue;
        }
        let had_source = before.servers.iter().any(|(_, record, liveness)| {
            *liveness != Liveness::Missing
                && record.images.get(&image.id) == Some(&ImageHolding::Complete)
        });
        if !had_source {
            continue;
        }
        let need = after
            .templates
            .iter()
            .filter(|other| other.image == image.id)
            .map(|other| other.min_replicas)
            .max()
            .unwrap_or(2) as usize;
        let possible = counting
            .iter()
            .filter(|(_, record, liveness)| {
                record.images.contains_key(&image.id)
                    || (*liveness == Liveness::Alive
                        && record.capacity.storage_free_bytes >= image.virtual_size)
            })
            .count();
        let holders = counting
            .iter()
            .filter(|(_, record, _)| record.images.contains_key(&image.id))
            .count();
        prop_assert!(
            holders >= need.min(possible),
            "image {} on {} servers, needs {} (possible {})",
            image.id,
            holders,
            need,
            possible
        );
    }
    Ok(())
}

fn sample_grid() -> Grid {
    let mut spec = GridSpec::small(12, 6);
    spec.missing_permille = 0;
    spec.suspect_permille = 0;
    Grid::random(&spec, 7)
}

/// Computed "on" each of three replicas that received the same records in
/// different orders, through `GridState`, the plans are identical.
#[test]
fn every_replica_computes_the_same_plan() {
    let grid = sample_grid();
    let mut writes: Vec<(usize, ConfigValue)> = Vec::new();
    for template in &grid.templates {
        writes.push((0, ConfigValue::Template(template.clone())));
    }
    for image in &grid.images {
        writes.push((1, ConfigValue::Image(image.clone())));
    }
    let mut source = GridState::new();
    let mut clock = HlcClock::new();
    let mut deltas = Vec::new();
    for (index, (_, value)) in writes.iter().enumerate() {
        let origin = grid.servers[index % grid.servers.len()].0;
        deltas.push(
            source
                .put_config(origin, clock.tick(1_000 + index as u64), value.clone())
                .unwrap(),
        );
    }
    for (id, record, _) in &grid.servers {
        deltas.push(
            source
                .update_server(*id, clock.tick(5_000), record.clone())
                .unwrap(),
        );
    }
    let alive = |_: ServerId| Liveness::Alive;
    let reference = plan(&GridView::from_state(&source, alive), 99);
    assert!(!reference.is_empty(), "the sample grid has work to plan");
    for order in 0..3u64 {
        let mut shuffled = deltas.clone();
        shuffled.shuffle(&mut rand::rngs::StdRng::seed_from_u64(order));
        let mut replica = GridState::new();
        // Out-of-order deltas wait until their predecessors arrive, as with anti-entropy.
        while replica.digest() != source.digest() {
            for delta in &shuffled {
                replica.apply_delta(delta).unwrap();
            }
        }
        assert_eq!(plan(&GridView::from_state(&replica, alive), 99), reference);
    }
}

fn view_with<'a>(grid: &'a Grid, templates: &'a [Template]) -> GridView<'a> {
    GridView::new(
        grid.servers
            .iter()
            .map(|(id, record, liveness)| ServerView {
                id: *id,
                liveness: *liveness,
                record,
            }),
        templates,
        &grid.images,
        grid.entitled.iter().map(|(name, users)| (name, *users)),
        grid.policy.clone(),
    )
}

/// The seed's analysis step: a template property alone triggers nothing; a
/// lost server, a new server, a desired count beyond the threshold do.
#[test]
fn analysis_says_when_balancing_has_work() {
    use deskgrid::placement::analyze;
    let mut grid = sample_grid();
    grid.converge(1, SETTLE_ROUNDS + 1).unwrap();
    let templates = grid.templates.clone();

    let mut display_changed = templates.clone();
    display_changed[0].monitors = 2;
    display_changed[0].display = deskgrid::model::DisplayProtocol::Vnc;
    let analysis = analyze(
        &view_with(&grid, &templates),
        &view_with(&grid, &display_changed),
    );
    assert!(!analysis.any(), "{analysis:?}");

    let mut more = templates.clone();
    more[0].desired_vms += 50;
    let analysis = analyze(&view_with(&grid, &templates), &view_with(&grid, &more));
    assert!(analysis.dynamic_balance, "{analysis:?}");

    let mut lost = grid.clone();
    lost.servers[3].2 = Liveness::Missing;
    let analysis = analyze(&grid.view(), &lost.view());
    assert!(
        analysis.static_balance && analysis.dynamic_balance,
        "{analysis:?}"
    );
    assert!(analysis.reasons[0].contains("Missing"), "{analysis:?}");

    let mut grown = grid.clone();
    let extra = Grid::random(&GridSpec::small(13, 6), 7).servers[12].clone();
    grown
        .servers
        .push((support::server_id(12), extra.1, Liveness::Alive));
    let analysis = analyze(&grid.view(), &grown.view());
    assert!(
        analysis.static_balance && analysis.dynamic_balance,
        "{analysis:?}"
    );

    // Below the threshold: no work.
    let mut policy_grid = grid.clone();
    policy_grid.policy.desired_change_threshold = 5;
    let mut one_more = templates.clone();
    one_more[0].desired_vms += 1;
    let analysis = analyze(
        &view_with(&policy_grid, &templates),
        &view_with(&policy_grid, &one_more),
    );
    assert!(!analysis.any(), "{analysis:?}");
}

/// A hand-made grid whose plan is known step by step.
#[test]
fn a_small_grid_plans_what_a_person_would() {
    let mut grid = Grid::random(
        &GridSpec {
            servers: 3,
            templates: 1,
            images: 1,
            holding_permille: 0,
            vms: 0,
            missing_permille: 0,
            suspect_permille: 0,
            ..GridSpec::small(3, 1)
        },
        3,
    );
    grid.images[0].state = ImageState::Ready;
    for (index, (_, record, _)) in grid.servers.iter_mut().enumerate() {
        record.capacity.cpus = 16;
        record.capacity.memory_total_mib = 32 * 1024 + 2048 + index as u64 * 1024; // 32..34 GiB for VMs
        record.capacity.storage_free_bytes = 1 << 40;
    }
    grid.servers[0]
        .1
        .images
        .insert(grid.images[0].id.clone(), ImageHolding::Complete);
    let template = &mut grid.templates[0];
    template.memory_mib = 4096;
    template.vcpus = 2;
    template.desired_vms = 10;
    template.min_idle_vms = 0;
    template.min_replicas = 2;
    template.concurrency_percent = 0;
    grid.entitled.clear();

    let first = plan(&grid.view(), 1);
    let pulls: Vec<_> = first
        .steps
        .iter()
        .filter(|step| matches!(step.action, Action::PullImage { .. }))
        .collect();
    // Min replicas 2: the server with the most free memory (index 2) pulls.
    assert_eq!(pulls.len(), 1, "{first:#?}");
    assert_eq!(pulls[0].target, grid.servers[2].0);
    assert!(matches!(
        pulls[0].reason,
        Reason::BelowMinReplicas {
            holders: 1,
            need: 2
        }
    ));
    // 10 VMs: the complete holder fills first (8 fit in 32 GiB), the puller takes the rest.
    let created: BTreeMap<ServerId, u32> = first
        .steps
        .iter()
        .filter_map(|step| match step.action {
            Action::CreateVms { count, .. } => Some((step.target, count)),
            _ => None,
        })
        .collect();
    assert_eq!(created.values().sum::<u32>(), 10);
    assert_eq!(created[&grid.servers[0].0], 8, "{first:#?}");
    assert_eq!(created[&grid.servers[2].0], 2);

    grid.apply(&first);
    assert_eq!(plan(&grid.view(), 1), Plan::default());

    // A pooled session ends: the VM is refreshed for the next user...
    let (holder, vm) = (
        grid.servers[0].0,
        *grid.servers[0].1.vms.keys().next().unwrap(),
    );
    grid.servers[0].1.vms.get_mut(&vm).unwrap().state = deskgrid::model::VmState::Refreshing;
    let refresh = plan(&grid.view(), 1);
    assert_eq!(refresh.steps.len(), 1, "{refresh:#?}");
    assert_eq!(refresh.steps[0].target, holder);
    assert!(
        matches!(refresh.steps[0].action, Action::RefreshVm { vm: refreshed, .. } if refreshed == vm)
    );
    // ...unless the pool shrinks at the same time: then that VM goes first.
    grid.templates[0].desired_vms = 9;
    let shrink_one = plan(&grid.view(), 1);
    assert_eq!(shrink_one.steps.len(), 1, "{shrink_one:#?}");
    assert!(
        matches!(shrink_one.steps[0].action, Action::RemoveVm { vm: removed, .. } if removed == vm)
    );
    grid.apply(&shrink_one);
    grid.templates[0].desired_vms = 10;
    grid.apply(&plan(&grid.view(), 1));
    assert_eq!(plan(&grid.view(), 1), Plan::default());

    // Desired down to 4: idle VMs go from the most loaded server first.
    grid.templates[0].desired_vms = 4;
    let shrink = plan(&grid.view(), 1);
    let removed: Vec<ServerId> = shrink
        .steps
        .iter()
        .filter(|step| matches!(step.action, Action::RemoveVm { .. }))
        .map(|step| step.target)
        .collect();
    assert_eq!(removed.len(), 6, "{shrink:#?}");
    assert!(
        removed
            .iter()
            .filter(|&&id| id == grid.servers[0].0)
            .count()
            >= 4,
        "{shrink:#?}"
    );
}

/// The connection balancer: own session first, then least loaded, then most
/// ready VMs; only alive servers with a ready VM of the template.
#[test]
fn logins_go_to_the_users_server_then_the_least_loaded() {
    let mut grid = sample_grid();
    grid.converge(5, SETTLE_ROUNDS + 1).unwrap();
    let view = grid.view();
    let index = ConnectionIndex::new(&view, 5);
    for template in &grid.templates {
        let user = deskgrid::model::UserName::new("nobody-yet").unwrap();
        let ranked = index.rank(&user, &template.name, None);
        let with_ready: BTreeSet<ServerId> = grid
            .servers
            .iter()
            .filter(|(_, record, liveness)| {
                *liveness == Liveness::Alive
                    && record.vms.values().any(|vm| {
                        vm.template == template.name
                            && vm.state == deskgrid::model::VmState::Ready
                            && vm.user.is_none()
                            && vm.image == template.image
                    })
            })
            .map(|(id, ..)| *id)
            .collect();
        assert_eq!(
            ranked.iter().copied().collect::<BTreeSet<_>>(),
            with_ready,
            "template {}",
            template.name.as_str()
        );
        assert_eq!(ranked.len(), with_ready.len(), "no server listed twice");
    }
    // A user with a session is sent back to it first.
    let (owner_server, vm) = grid
        .servers
        .iter()
        .filter(|(_, _, liveness)| *liveness == Liveness::Alive)
        .find_map(|(id, record, _)| {
            record
                .vms
                .values()
                .find(|vm| vm.user.is_some())
                .map(|vm| (*id, vm.clone()))
        })
        .expect("the sample grid has a VM in use");
    let ranked = index.rank(vm.user.as_ref().unwrap(), &vm.template, None);
    assert_eq!(ranked.first(), Some(&owner_server));
}

/// A new version published as a difference disk of the old one: its copies
/// go first to servers holding the old one (a small diff travels), the old
/// version stays while the new one is short of copies, then goes wherever
/// no VM uses it, and from the last server once its last user logged out.
#[test]
fn a_superseded_version_goes_once_its_successor_is_placed_and_unused() {
    use deskgrid::model::{BaseImage, VmState};
    let mut grid = Grid::random(
        &GridSpec {
            holding_permille: 0,
            vms: 0,
            missing_permille: 0,
            suspect_permille: 0,
            ..GridSpec::small(3, 1)
        },
        11,
    );
    for (_, record, _) in grid.servers.iter_mut() {
        record.capacity.cpus = 16;
        record.capacity.memory_total_mib = 64 * 1024;
        record.capacity.storage_free_bytes = 1 << 40;
        record.site = deskgrid::model::SiteLabel::new("one-site").unwrap();
    }
    let v1 = grid.images[0].id.clone();
    grid.images[0].state = ImageState::Ready;
    let mut v2_image: BaseImage = grid.images[0].clone();
    v2_image.id = ImageVersionId::new("image-0-v2").unwrap();
    v2_image.parent = Some(v1.clone());
    let v2 = v2_image.id.clone();
    let template = &mut grid.templates[0];
    template.image = v1.clone();
    template.desired_vms = 2;
    template.min_idle_vms = 0;
    template.min_replicas = 2;
    template.concurrency_percent = 0;
    grid.entitled.clear();
    let ids: Vec<ServerId> = grid.servers.iter().map(|(id, ..)| *id).collect();
    // A seed whose rendezvous hash prefers server 2 for v2: only holding
    // the parent can make server 1 win.
    let seed = (0..64u64)
        .find(|&seed| {
            let score = |id| deskgrid::placement::rendezvous(seed, v2.as_str().as_bytes(), id);
            score(ids[2]) > score(ids[1])
        })
        .unwrap();
    // v1 on servers 0 and 1 with its desktops.
    grid.servers[0]
        .1
        .images
        .insert(v1.clone(), ImageHolding::Complete);
    grid.servers[1]
        .1
        .images
        .insert(v1.clone(), ImageHolding::Complete);
    grid.converge(seed, 3).unwrap();
    assert!(grid.servers[2].1.images.is_empty());
    // Someone works on a v1 desktop on server 0.
    let in_use = grid.servers[0]
        .1
        .vms
        .values_mut()
        .next()
        .expect("server 0 hosts a v1 desktop");
    in_use.state = VmState::InUse;
    let in_use = in_use.id;

    // v2 is published on server 0, and the template moves to it.
    grid.images.push(v2_image);
    grid.servers[0]
        .1
        .images
        .insert(v2.clone(), ImageHolding::Complete);
    grid.templates[0].image = v2.clone();
    let first = plan(&grid.view(), seed);
    let pulls: Vec<ServerId> = first
        .steps
        .iter()
        .filter(|step| matches!(&step.action, Action::PullImage { image } if *image == v2))
        .map(|step| step.target)
        .collect();
    assert_eq!(
        pulls,
        [ids[1]],
        "the other holder of v1 gets v2: {first:#?}"
    );
    assert!(
        !first
            .steps
            .iter()
            .any(|step| matches!(&step.action, Action::DropImage { image } if *image == v1)),
        "v1 went before v2 had its copies: {first:#?}"
    );
    grid.apply(&first);
    let second = plan(&grid.view(), seed);
    let drops: Vec<ServerId> = second
        .steps
        .iter()
        .filter(|step| matches!(&step.action, Action::DropImage { image } if *image == v1))
        .map(|step| step.target)
        .collect();
    assert_eq!(
        drops,
        [ids[1]],
        "v1 stays under the desktop in use: {second:#?}"
    );
    grid.apply(&second);
    assert_eq!(plan(&grid.view(), seed), Plan::default());

    // The last user logs out: the desktop goes, then v1 with it.
    grid.servers[0].1.vms.get_mut(&in_use).unwrap().state = VmState::Refreshing;
    let rounds = grid.converge(seed, 3).unwrap();
    assert!(rounds <= 2);
    assert!(grid
        .servers
        .iter()
        .all(|(_, record, _)| !record.images.contains_key(&v1)));
    assert!(grid
        .servers
        .iter()
        .all(|(_, record, _)| record.vms.values().all(|vm| vm.image == v2)));
}
