//! Property tests of the replicated state's merge: the CRDT laws, convergence
//! under any delivery order, duplication and batching, and exact catch-up by
//! `delta_since`. Updates come from several simulated servers, each writing to
//! its own replica with its own hybrid logical clock, on a small key space so
//! that concurrent writes to the same register are common.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

use deskgrid::model::{
    ImageVersionId, Role, ServerId, ServerRecord, SiteLabel, Template, TemplateName, User, UserName,
};
use deskgrid::state::{ConfigKey, ConfigValue, Delta, GridState, HlcClock};
use proptest::prelude::*;

const WRITERS: usize = 4;
/// Cases per property: 4x proptest's default, still a few seconds in all.
const CASES: u32 = 1024;

#[derive(Debug, Clone)]
enum Operation {
    PutTemplate { name: u8, vcpus: u32 },
    DeleteTemplate { name: u8 },
    PutUser { name: u8, admin: bool },
    UpdateOwnRecord { cpus: u32 },
}

#[derive(Debug, Clone)]
struct Write {
    writer: usize,
    /// Wall clock the writer reads; small range, so clocks collide and go back.
    wall_ms: u64,
    operation: Operation,
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        4 => (0u8..4, 1u32..16).prop_map(|(name, vcpus)| Operation::PutTemplate { name, vcpus }),
        1 => (0u8..4).prop_map(|name| Operation::DeleteTemplate { name }),
        2 => (0u8..3, any::<bool>()).prop_map(|(name, admin)| Operation::PutUser { name, admin }),
        2 => (1u32..64).prop_map(|cpus| Operation::UpdateOwnRecord { cpus }),
    ]
}

fn writes(max: usize) -> impl Strategy<Value = Vec<Write>> {
    proptest::collection::vec(
        (0..WRITERS, 0u64..40, operation()).prop_map(|(writer, wall_ms, operation)| Write {
            writer,
            wall_ms,
            operation,
        }),
        1..max,
    )
}

fn server(writer: usize) -> ServerId {
    ServerId::from_bytes([writer as u8 + 1; 16])
}

fn template(name: u8, vcpus: u32) -> Template {
    Template {
        name: TemplateName::new(format!("t{name}")).unwrap(),
        image: ImageVersionId::new("base-1").unwrap(),
        vcpus,
        memory_mib: 2048,
        desired_vms: 4,
        min_idle_vms: 1,
        min_replicas: 2,
        concurrency_percent: 0,
        kind: Default::default(),
        display: Default::default(),
        monitors: 1,
    }
}

/// Plays the writes on each writer's own replica and returns, in order, the
/// delta each write produced: the updates the grid has to disseminate.
fn produce_deltas(writes: &[Write]) -> Vec<Delta> {
    let mut replicas = vec![GridState::new(); WRITERS];
    let mut clocks = vec![HlcClock::new(); WRITERS];
    writes
        .iter()
        .map(|write| {
            let origin = server(write.writer);
            let hlc = clocks[write.writer].tick(write.wall_ms);
            let replica = &mut replicas[write.writer];
            match &write.operation {
                Operation::PutTemplate { name, vcpus } => {
                    replica.put_config(origin, hlc, ConfigValue::Template(template(*name, *vcpus)))
                }
                Operation::DeleteTemplate { name } => replica.write_config(
                    origin,
                    hlc,
                    ConfigKey::Template(TemplateName::new(format!("t{name}")).unwrap()),
                    None,
                ),
                Operation::PutUser { name, admin } => replica.put_config(
                    origin,
                    hlc,
                    ConfigValue::User(User {
                        name: UserName::new(format!("u{name}")).unwrap(),
                        display_name: format!("written by {}", write.writer),
                        password_hash: String::new(),
                        role: if *admin { Role::Admin } else { Role::User },
                        groups: Vec::new(),
                    }),
                ),
                Operation::UpdateOwnRecord { cpus } => {
                    let mut record = ServerRecord::new(
                        format!("server-{}", write.writer),
                        vec![],
                        SiteLabel::default(),
                        write.wall_ms,
                    );
                    record.capacity.cpus = *cpus;
                    replica.update_server(origin, hlc, record)
                }
            }
            .expect("generated writes are valid")
        })
        .collect()
}

fn replica_from(deltas: &[Delta], picks: &[usize]) -> GridState {
    let mut replica = GridState::new();
    for pick in picks {
        replica.apply_delta(&deltas[pick % deltas.len()]).unwrap();
    }
    replica
}

fn joined(a: &GridState, b: &GridState) -> GridState {
    let mut result = a.clone();
    result.join(b);
    result
}

fn picks() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..40)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// a ⊔ b = b ⊔ a, (a ⊔ b) ⊔ c = a ⊔ (b ⊔ c), a ⊔ a = a: on whole replicas,
    /// version vectors included.
    #[test]
    fn join_is_commutative_associative_and_idempotent(
        writes in writes(40), a in picks(), b in picks(), c in picks(),
    ) {
        let deltas = produce_deltas(&writes);
        let (a, b, c) = (replica_from(&deltas, &a), replica_from(&deltas, &b), replica_from(&deltas, &c));
        prop_assert_eq!(joined(&a, &b), joined(&b, &a));
        prop_assert_eq!(joined(&joined(&a, &b), &c), joined(&a, &joined(&b, &c)));
        prop_assert_eq!(joined(&a, &a), a.clone());
        // Merging a whole replica as a delta is the same join.
        let mut via_delta = a.clone();
        via_delta.apply_delta(&b.to_delta()).unwrap();
        prop_assert_eq!(via_delta, joined(&a, &b));
    }

    /// Every update delivered in any order, any number of times, singly or in
    /// batches relayed through other replicas, gives the same content.
    #[test]
    fn any_delivery_order_duplication_or_batching_converges(
        writes in writes(60),
        seed in any::<u64>(),
        duplicates in proptest::collection::vec(any::<usize>(), 0..30),
        batch_sizes in proptest::collection::vec(1usize..8, 1..20),
    ) {
        let deltas = produce_deltas(&writes);
        let reference = replica_from(&deltas, &(0..deltas.len()).collect::<Vec<_>>());

        // Every update at least once, duplicates sprinkled in, shuffled by the seed.
        let mut delivery: Vec<usize> = (0..deltas.len()).chain(duplicates.iter().map(|d| d % deltas.len())).collect();
        shuffle(&mut delivery, seed);

        let one_by_one = replica_from(&deltas, &delivery);
        prop_assert_eq!(one_by_one.digest(), reference.digest());

        // Batches: each batch is gathered by a relay replica, which forwards
        // either its whole state or what the receiver lacks.
        let mut receiver = GridState::new();
        let mut start = 0;
        let mut batch_index = 0;
        while start < delivery.len() {
            let size = batch_sizes[batch_index % batch_sizes.len()];
            let end = (start + size).min(delivery.len());
            let relay = replica_from(&deltas, &delivery[start..end]);
            let forwarded = if batch_index % 2 == 0 {
                relay.to_delta()
            } else {
                relay.delta_since(receiver.version_vector())
            };
            receiver.apply_delta(&forwarded).unwrap();
            start = end;
            batch_index += 1;
        }
        prop_assert_eq!(receiver.digest(), reference.digest());

        // One anti-entropy exchange afterwards also aligns the version vectors.
        let mut catching_up = one_by_one.clone();
        catching_up.apply_delta(&reference.delta_since(catching_up.version_vector())).unwrap();
        prop_assert_eq!(catching_up.version_vector(), reference.version_vector());
        prop_assert_eq!(catching_up, reference);
    }

    /// A delta computed against a replica's version vector brings it exactly
    /// to the source (when the replica has nothing the source lacks), and in
    /// general to the join of both.
    #[test]
    fn delta_since_brings_a_replica_to_the_source(
        writes in writes(50), subset in picks(), other in picks(),
    ) {
        let deltas = produce_deltas(&writes);
        let source = replica_from(&deltas, &(0..deltas.len()).collect::<Vec<_>>());

        let mut behind = replica_from(&deltas, &subset);
        let delta = source.delta_since(behind.version_vector());
        // Only the novel part needs logging: applying it does exactly the same.
        let mut via_novel_part = behind.clone();
        via_novel_part.apply_delta(&behind.novel_part(&delta)).unwrap();
        prop_assert_eq!(&via_novel_part, &source);
        prop_assert!(delta.len() <= source.entry_count());
        behind.apply_delta(&delta).unwrap();
        prop_assert_eq!(&behind, &source);

        // A replica with writes of its own ends at the join, not at the source.
        let partial_source = replica_from(&deltas, &subset);
        let mut diverged = replica_from(&deltas, &other);
        let expected = joined(&partial_source, &diverged);
        diverged.apply_delta(&partial_source.delta_since(diverged.version_vector())).unwrap();
        prop_assert_eq!(diverged.digest(), expected.digest());
    }
}

/// Fisher–Yates with a tiny xorshift, so the permutation is a function of the seed.
fn shuffle(items: &mut [usize], mut seed: u64) {
    seed |= 1;
    for i in (1..items.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let j = (seed % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}
