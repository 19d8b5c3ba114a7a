//! Laws of the VM lifecycle (`desktop::lifecycle`) over random event
//! sequences: pooled and personal VMs (with or without an owner), three
//! users, a few session ids, random policies, time that only moves forward.
//! Some events are "well-behaved guest" moves (log in as the reserved user,
//! log out of the current session) so that the sequences reach deep phases;
//! the rest are arbitrary, so most of them are refused, which is a law too.
//!
//! Every law is checked after every event. At the end, the run checks that
//! the sequences reached every phase and transition the laws are about, so
//! a law cannot pass for want of a case. One run is 1,000 sequences of up to
//! 240 events, about 5 s in a debug build: the rarest situation (a pooled
//! session logged off after its grace) needs that many to come up reliably.

use std::cell::RefCell;
use std::collections::BTreeMap;

use deskgrid::desktop::lifecycle::{
    Effect, Event, LifecyclePolicy, LoginAnomaly, Phase, Refusal, VmLifecycle,
    MAX_REGENERATIONS_IN_A_ROW,
};
use deskgrid::model::{SessionId, TemplateKind, UserName, VmState};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

const USERS: [&str; 3] = ["alice", "bob", "carol"];

#[derive(Debug, Clone)]
enum Op {
    Defined,
    Booted,
    AgentHello,
    AgentHeartbeat,
    Reserve {
        user: usize,
        ttl_ms: Option<u64>,
    },
    /// A login by anyone.
    AgentLogin {
        user: usize,
        session: u8,
    },
    /// A login by whoever holds the VM (or its owner), as a guest would.
    AgentLoginAsHolder {
        session: u8,
    },
    AgentLogout {
        user: usize,
        session: u8,
    },
    /// A logout of the current session, as a guest would.
    AgentLogoutCurrent,
    ViewerConnected,
    ViewerDisconnected,
    Tick,
    /// Time jumps to the reservation's expiry exactly (if later), then a
    /// tick: the boundary the expiry law is about.
    TickAtExpiry,
    RefreshDone,
    Failed,
    Regenerated,
    /// An admin logs off whoever holds the VM (or a user who does not).
    LogOffHolder,
}

#[derive(Debug, Clone)]
struct Case {
    kind: TemplateKind,
    owner: Option<usize>,
    policy: LifecyclePolicy,
    /// Start with Defined, Booted, AgentHello.
    boot_first: bool,
    /// A healthy agent: a heartbeat before every op (so sessions last long
    /// enough for reservations and disconnect graces to run out).
    agent_keeps_up: bool,
    /// Each op with the milliseconds that pass before it.
    ops: Vec<(u64, Op)>,
}

fn op() -> impl Strategy<Value = Op> {
    let user = 0..USERS.len();
    let session = 0u8..3;
    prop_oneof![
        1 => Just(Op::Defined),
        1 => Just(Op::Booted),
        2 => Just(Op::AgentHello),
        6 => Just(Op::AgentHeartbeat),
        4 => (user.clone(), prop::option::of(ms(0..90_000)))
            .prop_map(|(user, ttl_ms)| Op::Reserve { user, ttl_ms }),
        2 => (user.clone(), session.clone())
            .prop_map(|(user, session)| Op::AgentLogin { user, session }),
        4 => session.clone().prop_map(|session| Op::AgentLoginAsHolder { session }),
        1 => (user, session).prop_map(|(user, session)| Op::AgentLogout { user, session }),
        3 => Just(Op::AgentLogoutCurrent),
        2 => Just(Op::ViewerConnected),
        3 => Just(Op::ViewerDisconnected),
        8 => Just(Op::Tick),
        2 => Just(Op::TickAtExpiry),
        3 => Just(Op::RefreshDone),
        1 => Just(Op::Failed),
        3 => Just(Op::Regenerated),
        2 => Just(Op::LogOffHolder),
    ]
}

/// Times and durations are whole multiples of this, so that events land
/// exactly on deadlines often: `>` against `>=` is then a law, not luck.
const QUANTUM_MS: u64 = 250;

fn ms(range: std::ops::Range<u64>) -> impl Strategy<Value = u64> + Clone {
    (range.start / QUANTUM_MS..range.end / QUANTUM_MS).prop_map(|n| n * QUANTUM_MS)
}

fn case() -> impl Strategy<Value = Case> {
    let kind = prop_oneof![Just(TemplateKind::Pooled), Just(TemplateKind::Personal)];
    // Grace times are mostly short, so that a disconnected session outlives
    // its grace before the agent's heartbeats lapse.
    let grace = prop_oneof![2 => ms(0..5_000), 1 => ms(0..300_000)];
    let policy = (ms(0..60_000), ms(1_000..60_000), grace, ms(0..120_000)).prop_map(
        |(reservation_ttl_ms, heartbeat_timeout_ms, disconnect_grace_ms, boot_timeout_ms)| {
            LifecyclePolicy {
                reservation_ttl_ms,
                heartbeat_timeout_ms,
                disconnect_grace_ms,
                boot_timeout_ms,
            }
        },
    );
    // Mostly a few seconds between events (heartbeats keep up), sometimes
    // minutes (agents fall silent, reservations and graces run out).
    let elapsed = prop_oneof![12 => ms(0..3_000), 1 => ms(0..150_000)];
    (
        kind,
        prop::option::of(0..USERS.len()),
        policy,
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec((elapsed, op()), 0..120),
    )
        .prop_map(
            |(kind, owner, policy, boot_first, agent_keeps_up, ops)| Case {
                kind,
                owner,
                policy,
                boot_first,
                agent_keeps_up,
                ops,
            },
        )
}

fn user(index: usize) -> UserName {
    UserName::new(USERS[index]).expect("test names are valid")
}

fn session(n: u8) -> SessionId {
    SessionId::from_bytes([n; 16])
}

fn event(op: &Op, vm: &VmLifecycle, now_ms: u64) -> Event {
    match op {
        Op::Defined => Event::Defined,
        Op::Booted => Event::Booted,
        Op::AgentHello => Event::AgentHello,
        Op::AgentHeartbeat => Event::AgentHeartbeat { now_ms },
        Op::Reserve {
            user: index,
            ttl_ms,
        } => Event::Reserve {
            user: user(*index),
            now_ms,
            ttl_ms: *ttl_ms,
        },
        Op::AgentLogin {
            user: index,
            session: n,
        } => Event::AgentLogin {
            user: user(*index),
            session: session(*n),
        },
        Op::AgentLoginAsHolder { session: n } => Event::AgentLogin {
            user: vm
                .holder()
                .or(vm.owner())
                .cloned()
                .unwrap_or_else(|| user(0)),
            session: session(*n),
        },
        Op::AgentLogout {
            user: index,
            session: n,
        } => Event::AgentLogout {
            user: user(*index),
            session: session(*n),
        },
        Op::AgentLogoutCurrent => match vm.phase() {
            Phase::InUse { user, session, .. } => Event::AgentLogout {
                user: user.clone(),
                session: *session,
            },
            _ => Event::AgentLogout {
                user: user(0),
                session: session(0),
            },
        },
        Op::ViewerConnected => Event::ViewerConnected,
        Op::ViewerDisconnected => Event::ViewerDisconnected { now_ms },
        Op::Tick | Op::TickAtExpiry => Event::Tick { now_ms },
        Op::RefreshDone => Event::RefreshDone,
        Op::Failed => Event::Failed {
            reason: "domain crashed".to_owned(),
        },
        Op::Regenerated => Event::Regenerated,
        Op::LogOffHolder => Event::LogOffRequested {
            user: vm.holder().cloned().unwrap_or_else(|| user(0)),
        },
    }
}

/// What the laws track across one sequence.
#[derive(Debug, Default)]
struct Shadow {
    /// A pooled VM's disk has had a user on it since it was last made from
    /// the base image.
    used_disk: bool,
    /// Regenerations since the agent last said hello from `Booting`.
    regenerations: u32,
}

/// How often each checked situation came up, over the whole run.
type Coverage = BTreeMap<&'static str, u64>;

macro_rules! law {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(TestCaseError::fail(format!($($message)+)));
        }
    };
}

fn check_step(
    case: &Case,
    before: &VmLifecycle,
    event: &Event,
    result: &Result<Vec<Effect>, Refusal>,
    after: &VmLifecycle,
    shadow: &mut Shadow,
    coverage: &mut Coverage,
) -> Result<(), TestCaseError> {
    let pooled = case.kind == TemplateKind::Pooled;
    let mut seen = |what: &'static str| *coverage.entry(what).or_default() += 1;

    // Refusals change nothing; ticks are never refused.
    let effects = match result {
        Err(refusal) => {
            law!(
                after == before,
                "refused {event:?} ({refusal}) but changed the VM"
            );
            law!(
                !matches!(event, Event::Tick { .. }),
                "a tick was refused: {refusal}"
            );
            if matches!(refusal, Refusal::NotOwner { .. }) {
                seen("reserve refused: not the owner");
            }
            if matches!(event, Event::Reserve { .. }) && before.holder().is_some() {
                seen("reserve refused: held by someone");
            }
            return Ok(());
        }
        Ok(effects) => effects,
    };

    // RecordState exactly when the projection changed, last, and equal to it.
    let projection = after.record_state();
    let record_states: Vec<usize> = effects
        .iter()
        .enumerate()
        .filter(|(_, effect)| matches!(effect, Effect::RecordState { .. }))
        .map(|(index, _)| index)
        .collect();
    if before.record_state() == projection {
        law!(
            record_states.is_empty(),
            "RecordState without a change: {effects:?}"
        );
    } else {
        law!(
            record_states == [effects.len() - 1],
            "the projection changed but RecordState is not the one last effect: {effects:?}"
        );
        law!(
            effects.last()
                == Some(&Effect::RecordState {
                    state: projection.0,
                    user: projection.1.clone()
                }),
            "RecordState {effects:?} is not the projection {projection:?}"
        );
    }

    // The projection: Reserved and InUse carry their user, Refreshing none,
    // every other phase a personal VM's owner and a pooled VM nobody.
    let (state, recorded_user) = &projection;
    match after.phase() {
        Phase::Reserved { user, .. } | Phase::InUse { user, .. } => {
            law!(
                recorded_user.as_ref() == Some(user),
                "{state:?} records {recorded_user:?}, not {user}"
            );
            law!(
                matches!(state, VmState::Reserved | VmState::InUse),
                "a held VM is recorded {state:?}"
            );
        }
        Phase::Refreshing => law!(recorded_user.is_none(), "Refreshing records a user"),
        _ if pooled => law!(
            recorded_user.is_none(),
            "a pooled VM that nobody holds records {recorded_user:?} in {state:?}"
        ),
        _ => law!(
            recorded_user.as_ref() == after.owner(),
            "a personal VM records {recorded_user:?}, its owner is {:?}",
            after.owner()
        ),
    }
    if matches!(state, VmState::Reserved | VmState::InUse) {
        law!(recorded_user.is_some(), "{state:?} without a user");
    }

    // Exclusivity: a VM held by A is never held by B unless the guest says
    // B logged in, and then it is reported. Reserve succeeds only when
    // nobody holds the VM, so two reservations never both succeed.
    let (held_before, held_after) = (before.holder(), after.holder());
    if let Event::Reserve { user, .. } = event {
        law!(
            held_before.is_none(),
            "Reserve for {user} succeeded while held by {held_before:?}"
        );
        law!(
            before.phase() == &Phase::Ready,
            "Reserve succeeded from {}",
            before.phase().name()
        );
        seen("reserve granted");
    }
    if let (Some(a), Some(b)) = (held_before, held_after) {
        if a != b {
            let reported = effects.iter().any(|effect| {
                matches!(
                    effect,
                    Effect::ReportLogin(
                        LoginAnomaly::ReservedForOther { .. }
                            | LoginAnomaly::ReplacedSession { .. }
                    )
                )
            });
            law!(
                matches!(event, Event::AgentLogin { user, .. } if user == b) && reported,
                "held by {a}, then by {b} after {event:?} with {effects:?}"
            );
            seen("guest login over another user, reported");
        }
    }
    if held_before.is_none() && held_after.is_some() {
        law!(
            matches!(event, Event::Reserve { .. } | Event::AgentLogin { .. }),
            "{event:?} gave the VM to {held_after:?}"
        );
        if let Event::AgentLogin { user, .. } = event {
            law!(
                effects.contains(&Effect::ReportLogin(LoginAnomaly::Unreserved {
                    user: user.clone()
                })),
                "an unreserved login was not reported: {effects:?}"
            );
        }
    }

    // A personal VM: reserved only for its owner; an owner, once set, stays.
    if pooled {
        law!(after.owner().is_none(), "a pooled VM has an owner");
    } else {
        if let Some(owner) = before.owner() {
            law!(after.owner() == Some(owner), "a personal VM changed owner");
        }
        if let Phase::Reserved { user, .. } = after.phase() {
            law!(
                after.owner() == Some(user),
                "personal VM of {:?} reserved for {user}",
                after.owner()
            );
        }
        if let Event::Reserve { user, .. } = event {
            law!(
                before.owner().is_none_or(|owner| owner == user),
                "personal VM of {:?} reserved for {user}",
                before.owner()
            );
            seen("personal reserve granted");
        }
        law!(
            !matches!(after.phase(), Phase::Refreshing),
            "a personal VM is being refreshed (its owner's disk thrown away)"
        );
    }

    // Reservations: never longer than the policy allows, never alive after
    // a tick at or past their expiry.
    if let (Event::Reserve { now_ms, .. }, Phase::Reserved { expires_at_ms, .. }) =
        (event, after.phase())
    {
        law!(
            *expires_at_ms <= now_ms + case.policy.reservation_ttl_ms,
            "a reservation until {expires_at_ms} made at {now_ms}"
        );
    }
    if let Event::Tick { now_ms } = event {
        if matches!(before.phase(), Phase::Reserved { expires_at_ms, .. } if expires_at_ms == now_ms)
        {
            seen("tick exactly at a reservation's expiry");
        }
        if let Phase::Reserved { expires_at_ms, .. } = after.phase() {
            law!(
                expires_at_ms > now_ms,
                "reservation expiring at {expires_at_ms} outlived the tick at {now_ms}"
            );
        }
    }

    // ReleaseReservation exactly when a reservation ends without its user
    // logging in.
    let released: Vec<&UserName> = effects
        .iter()
        .filter_map(|effect| match effect {
            Effect::ReleaseReservation { user } => Some(user),
            _ => None,
        })
        .collect();
    match before.phase() {
        Phase::Reserved { user, .. } => {
            let ended_unused = match after.phase() {
                Phase::Reserved { user: still, .. } => still != user,
                Phase::InUse { user: now_in, .. } => now_in != user,
                _ => true,
            };
            if ended_unused {
                law!(
                    released == [user],
                    "reservation of {user} ended with {effects:?}"
                );
                seen("reservation released");
            } else {
                law!(released.is_empty(), "released a live reservation");
            }
        }
        _ => law!(released.is_empty(), "released a reservation nobody had"),
    }

    // LogOff only of the session's user, for a pooled VM, as it is refreshed.
    for effect in effects {
        if let Effect::LogOff { user } = effect {
            law!(
                pooled && before.holder() == Some(user) && after.phase() == &Phase::Refreshing,
                "LogOff of {user} from {} to {}",
                before.phase().name(),
                after.phase().name()
            );
            seen("disconnected pooled session logged off");
        }
    }

    // No user's disk reaches the next user: a pooled VM that had a user is
    // refreshed or regenerated from the base image before it is offered.
    if matches!(after.phase(), Phase::InUse { .. }) {
        shadow.used_disk = true;
    }
    if let Event::AgentLogout { .. } = event {
        if pooled {
            law!(
                after.phase() == &Phase::Refreshing && effects.contains(&Effect::RefreshDisk),
                "a pooled logout went to {} with {effects:?}",
                after.phase().name()
            );
            seen("pooled logout refreshed");
        } else {
            law!(
                after.phase() == &Phase::Ready,
                "a personal logout went to {}",
                after.phase().name()
            );
            seen("personal logout back to ready");
        }
    }
    let entered = |phase: fn(&Phase) -> bool| !phase(before.phase()) && phase(after.phase());
    if entered(|phase| matches!(phase, Phase::Refreshing)) {
        law!(
            effects.contains(&Effect::RefreshDisk),
            "Refreshing without RefreshDisk: {effects:?}"
        );
        shadow.used_disk = false;
    }
    if entered(|phase| matches!(phase, Phase::Regenerating { .. })) {
        law!(
            effects.contains(&Effect::Regenerate { keep_disk: !pooled }),
            "Regenerating without the right Regenerate: {effects:?}"
        );
        if pooled {
            shadow.used_disk = false;
        }
        shadow.regenerations += 1;
        seen("regenerated after a failure");
        law!(
            shadow.regenerations <= MAX_REGENERATIONS_IN_A_ROW,
            "regenerated {} times without a hello",
            shadow.regenerations
        );
    }
    if pooled && matches!(after.phase(), Phase::Ready | Phase::Reserved { .. }) {
        law!(
            !shadow.used_disk,
            "pooled VM {} with a used disk",
            after.phase().name()
        );
    }

    // Coverage of the phases and transitions above.
    if matches!(before.phase(), Phase::Booting { .. }) && after.phase() == &Phase::Ready {
        shadow.regenerations = 0;
    }
    if matches!(before.phase(), Phase::Reserved { .. })
        && after.phase() == &Phase::Ready
        && matches!(event, Event::Tick { .. })
    {
        seen("reservation expired");
    }
    if matches!(before.phase(), Phase::Reserved { .. })
        && matches!(after.phase(), Phase::InUse { .. })
    {
        seen("reserved user logged in");
    }
    if let Phase::InUse {
        disconnected_since_ms: Some(_),
        ..
    } = after.phase()
    {
        seen("in use, disconnected");
    }
    if matches!(after.phase(), Phase::Failed { .. })
        && !matches!(before.phase(), Phase::Failed { .. })
    {
        seen("failed for good");
    }
    if let Phase::Regenerating {
        reason: deskgrid::desktop::lifecycle::FailureReason::AgentSilent { .. },
    } = after.phase()
    {
        seen("agent silent");
    }
    Ok(())
}

fn run_case(case: &Case, coverage: &RefCell<Coverage>) -> Result<(), TestCaseError> {
    let owner = case.owner.map(user);
    let mut vm = VmLifecycle::new(case.kind, owner);
    let mut shadow = Shadow::default();
    let mut now_ms = 0u64;
    let prefix = if case.boot_first {
        vec![(0, Op::Defined), (0, Op::Booted), (0, Op::AgentHello)]
    } else {
        Vec::new()
    };
    for (elapsed_ms, op) in prefix.iter().chain(&case.ops) {
        now_ms += elapsed_ms;
        let heartbeat = case.agent_keeps_up.then_some(&Op::AgentHeartbeat);
        for op in heartbeat.into_iter().chain([op]) {
            if let (Op::TickAtExpiry, Phase::Reserved { expires_at_ms, .. }) = (op, vm.phase()) {
                now_ms = now_ms.max(*expires_at_ms);
            }
            let event = event(op, &vm, now_ms);
            let before = vm.clone();
            let result = vm.apply(event.clone(), &case.policy);
            check_step(
                case,
                &before,
                &event,
                &result,
                &vm,
                &mut shadow,
                &mut coverage.borrow_mut(),
            )?;
        }
    }
    Ok(())
}

#[test]
fn lifecycle_laws_hold_over_random_event_sequences() {
    let mut runner = TestRunner::new(Config {
        cases: 1_000,
        failure_persistence: None,
        ..Config::default()
    });
    let coverage = RefCell::new(Coverage::new());
    if let Err(error) = runner.run(&case(), |case| run_case(&case, &coverage)) {
        panic!("{error}");
    }
    let coverage = coverage.into_inner();
    // Each law above is about a situation; each must have come up, or the
    // law passed for want of a case. The rarest (a pooled session logged off
    // after its disconnect grace) comes up 20-30 times a run, so 5 is far
    // from chance.
    for situation in [
        "reserve granted",
        "personal reserve granted",
        "reserve refused: not the owner",
        "reserve refused: held by someone",
        "reserved user logged in",
        "guest login over another user, reported",
        "reservation expired",
        "tick exactly at a reservation's expiry",
        "reservation released",
        "in use, disconnected",
        "disconnected pooled session logged off",
        "pooled logout refreshed",
        "personal logout back to ready",
        "regenerated after a failure",
        "agent silent",
        "failed for good",
    ] {
        let count = coverage.get(situation).copied().unwrap_or(0);
        assert!(
            count >= 5,
            "{situation:?} came up {count} times: the generator does not reach it ({coverage:?})"
        );
    }
    eprintln!("coverage: {coverage:?}");
}
