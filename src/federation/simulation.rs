//! A grid in one process, in virtual time: the real [`Membership`], the real
//! [`Disseminator`] and the real [`GridState`] of N servers over an
//! in-memory network with loss, delay, crashes and partitions (DESIGN.md
//! section 9, level 4).
//!
//! # Model
//!
//! - **Time** is virtual (microseconds); events (a message arriving, a
//!   membership timer, a server's 200 ms tick as in `node.rs`) run in time
//!   order, ties in the order they were scheduled. No tokio, no sockets, no
//!   clock: a run is a pure function of its configuration and seed.
//! - **Start**: every server holds the same grid state (every server's
//!   record, as after they all joined) and starts at a random moment within
//!   the first probe period, joining through the servers that state names.
//! - **Membership** datagrams are the bytes [`Membership`] produces, carried
//!   as they are. Only members it says are Alive (not Suspect) are pushed to
//!   and pulled from.
//! - **Dissemination** follows `node.rs`: a local write is pushed to every
//!   peer membership says is Alive ([`PeerRequest::PushDelta`], answered
//!   with `Merged`); every tick the [`Disseminator`] may pull from one Alive
//!   peer ([`PeerRequest::PullState`] with the asker's version vector),
//!   answered with [`PeerResponse::State`] (`delta_since` and the answerer's
//!   vector), and the asker pushes back `delta_since(answerer's vector)` when
//!   that is not empty (push-pull).
//! - **Bytes**: every message counts at its sender: membership datagrams
//!   their length, dissemination messages their CBOR size through
//!   [`protocol::encode`]. QUIC and TLS overheads are not counted.
//! - **Loss** drops each message with the configured probability. For
//!   membership that is a lost datagram. Dissemination goes over QUIC
//!   streams, which retransmit; a lost one here stands for a request that
//!   failed (timeout, reset), so loss is pessimistic for dissemination.
//! - **Delay** is a fixed part plus a uniform jitter per message, so
//!   messages can overtake each other.
//! - **A crash** drops the server's membership and disseminator and every
//!   message and timer meant for it; its [`GridState`] stays (it is on
//!   disk). **A restart** starts both again with a new generation (the
//!   virtual time in milliseconds, as the Unix time would be) and joins
//!   through the servers its state names.
//! - **A partition** drops every message between the two sides until healed.
//!
//! [`Simulation::finish`] asserts that every fault the run was asked for
//! fired (loss dropped messages, jitter delayed some, crashes and restarts
//! happened, a partition dropped messages), so a knob that silently stopped
//! working fails the test instead of flattering it.
//!
//! **Invariant:** no I/O, no clock reads, randomness only from the seed.
//! Wall time, where reported, is measured by the caller.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, RngCore as _, SeedableRng as _};

use super::dissemination::{Disseminator, Outgoing};
use super::membership::{
    MemberId, MemberState, Membership, MembershipOutput, MembershipSettings, MembershipTimer,
};
use super::node::NodeSettings;
use super::protocol::{self, PeerRequest, PeerResponse};
use crate::model::{
    DisplayProtocol, ImageVersionId, ServerId, ServerRecord, SiteLabel, Template, TemplateKind,
    TemplateName,
};
use crate::state::{ConfigKey, ConfigValue, Delta, GridState, Hlc, HlcClock, Stamp};

/// `node.rs` ticks every 200 ms and asks the disseminator whether a pull is
/// due; the simulator does the same.
const NODE_TICK: Duration = Duration::from_millis(200);

/// The network between the servers.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkSettings {
    /// Probability that a message is lost, in `[0, 1]`.
    pub loss: f64,
    /// Every message takes at least this long.
    pub delay: Duration,
    /// Plus a uniform extra in `[0, jitter]`.
    pub jitter: Duration,
}

impl Default for NetworkSettings {
    /// A LAN: no loss, 0.5–1.5 ms one way.
    fn default() -> Self {
        Self {
            loss: 0.0,
            delay: Duration::from_micros(500),
            jitter: Duration::from_millis(1),
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulationConfig {
    pub n_servers: usize,
    pub seed: u64,
    pub network: NetworkSettings,
    pub membership: MembershipSettings,
    /// The runtime's anti-entropy interval (`NodeSettings`).
    pub anti_entropy_interval: Duration,
}

impl SimulationConfig {
    /// `n_servers` on a LAN with the runtime's default settings.
    pub fn new(n_servers: usize, seed: u64) -> Self {
        Self {
            n_servers,
            seed,
            network: NetworkSettings::default(),
            membership: MembershipSettings {
                expected_members: u32::try_from(n_servers).unwrap_or(u32::MAX),
                ..MembershipSettings::default()
            },
            anti_entropy_interval: NodeSettings::default().anti_entropy_interval,
        }
    }
}

/// Counters of everything the network did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkStats {
    pub messages_sent: u64,
    pub membership_bytes: u64,
    pub dissemination_bytes: u64,
    /// Lost to the `loss` knob.
    pub dropped_by_loss: u64,
    /// Lost because sender and receiver were on two sides of a partition.
    pub dropped_by_partition: u64,
    /// Arrived at a server that had crashed (or restarted) since it was sent.
    pub undeliverable: u64,
    /// Delayed by some jitter beyond the fixed delay.
    pub jittered: u64,
    /// Membership datagrams their receiver refused (SWIM refuses some in
    /// normal life, e.g. from a member it holds down).
    pub membership_refused: u64,
    /// Deltas `GridState::apply_delta` refused: must stay 0.
    pub merge_refused: u64,
}

/// What a member view can be, packed in a byte for the n×n view matrix.
const VIEW_UNKNOWN: u8 = 0;
const VIEW_ALIVE: u8 = 1;
const VIEW_SUSPECT: u8 = 2;
const VIEW_DOWN: u8 = 3;

fn view_code(state: MemberState) -> u8 {
    match state {
        MemberState::Alive => VIEW_ALIVE,
        MemberState::Suspect => VIEW_SUSPECT,
        MemberState::Down => VIEW_DOWN,
    }
}

/// A condition the simulation can run until.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// Every running server sees every other running server Alive.
    FullMembership,
    /// Every running server's grid state has the same digest.
    DigestsAgree,
    /// Every other running server sees this one Down.
    SeenDownByAll(usize),
    /// This server runs, every other running server sees it Alive, and it
    /// sees as many Alive as there are other running servers.
    SeenAliveByAll(usize),
}

/// One server: its durable state and, while it runs, its process.
struct SimServer {
    id: ServerId,
    address: SocketAddr,
    /// Bumped on every crash and restart: what was meant for an earlier
    /// process is dropped.
    epoch: u64,
    process: Option<Process>,
    /// Has run at least once.
    started: bool,
    state: GridState,
    clock: HlcClock,
    digest: [u8; 32],
    pulls_started: u64,
    membership_bytes: u64,
    dissemination_bytes: u64,
}

struct Process {
    membership: Membership,
    disseminator: Disseminator,
}

/// What travels. Requests and responses are boxed: a delta with its two
/// version vectors is ~300 bytes, and events are moved on every queue
/// operation.
enum Payload {
    Membership(Vec<u8>),
    Request {
        request: Box<PeerRequest>,
        /// Part of an anti-entropy exchange (a pull, a push-back), not the
        /// push of a local change.
        anti_entropy: bool,
    },
    Response(Box<PeerResponse>),
}

/// Who has the last config change written, and how they got it.
struct ChangeWatch {
    key: ConfigKey,
    stamp: Stamp,
    pulls_at_write: Vec<u64>,
    has_it: Vec<bool>,
    rounds: u64,
    repaired_by_anti_entropy: usize,
}

enum Event {
    Deliver {
        from: usize,
        to: usize,
        payload: Payload,
    },
    Timer {
        server: usize,
        timer: MembershipTimer,
    },
    Tick {
        server: usize,
    },
    /// A server's first start.
    Start {
        server: usize,
    },
}

struct Scheduled {
    at_us: u64,
    seq: u64,
    /// The target server's epoch when this was scheduled.
    epoch: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at_us, self.seq).cmp(&(other.at_us, other.seq))
    }
}

/// Fault knobs turned during a run, to check they fired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub crashes_requested: u64,
    pub crashes_fired: u64,
    pub restarts_requested: u64,
    pub restarts_fired: u64,
    pub partitions: u64,
}

/// A simulated grid.
pub struct Simulation {
    config: SimulationConfig,
    rng: StdRng,
    now_us: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    servers: Vec<SimServer>,
    index: HashMap<ServerId, usize>,
    /// Side of each server while partitioned.
    partition: Option<Vec<bool>>,
    stats: NetworkStats,
    faults: FaultCounts,
    n_running: usize,
    /// Servers whose first start is still to come.
    pending_starts: usize,
    /// `views[observer * n + subject]`: what `observer` last said of `subject`.
    views: Vec<u8>,
    /// Per subject, how many running observers see it Alive / Down.
    alive_seen_by: Vec<usize>,
    down_seen_by: Vec<usize>,
    /// Running subjects seen Alive by every other running server.
    fully_seen: usize,
    /// Running servers per state digest.
    digest_counts: HashMap<[u8; 32], usize>,
    /// Down events about a server that was running at the time (false
    /// suspicion, or the far side of a partition).
    downs_of_running_servers: u64,
    /// Set when a view or a digest changed: conditions are re-checked.
    changed: bool,
    change_watch: Option<ChangeWatch>,
}

impl fmt::Debug for Simulation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Simulation")
            .field("n_servers", &self.servers.len())
            .field("now", &self.now())
            .field("running", &self.n_running)
            .finish_non_exhaustive()
    }
}

impl Simulation {
    /// Starts every server within the first probe period with the same grid
    /// state (every server's record, as after they all joined), each joining
    /// through the servers that state names.
    pub fn new(config: SimulationConfig) -> Self {
        let n = config.n_servers;
        assert!(n >= 2, "a grid needs two servers to simulate");
        assert!(
            (0.0..=1.0).contains(&config.network.loss),
            "loss is a probability"
        );
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut initial = GridState::new();
        let mut servers = Vec::with_capacity(n);
        for server_idx in 0..n {
            let mut id_bytes = [0u8; 16];
            rng.fill_bytes(&mut id_bytes);
            let id = ServerId::from_bytes(id_bytes);
            let address = server_address(server_idx);
            let record = ServerRecord::new(
                format!("server-{server_idx}"),
                vec![address.to_string()],
                SiteLabel::default(),
                0,
            );
            initial
                .update_server(
                    id,
                    Hlc {
                        physical_ms: 0,
                        logical: 0,
                    },
                    record,
                )
                .expect("a fresh server record is valid");
            servers.push(SimServer {
                id,
                address,
                epoch: 0,
                process: None,
                started: false,
                state: GridState::new(),
                clock: HlcClock::new(),
                digest: [0; 32],
                pulls_started: 0,
                membership_bytes: 0,
                dissemination_bytes: 0,
            });
        }
        let digest = initial.digest();
        for server in &mut servers {
            server.state = initial.clone();
            server.digest = digest;
        }
        let index = servers
            .iter()
            .enumerate()
            .map(|(server_idx, server)| (server.id, server_idx))
            .collect();
        let mut simulation = Self {
            config,
            rng,
            now_us: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            servers,
            index,
            partition: None,
            stats: NetworkStats::default(),
            faults: FaultCounts::default(),
            n_running: 0,
            pending_starts: n,
            views: vec![VIEW_UNKNOWN; n * n],
            alive_seen_by: vec![0; n],
            down_seen_by: vec![0; n],
            fully_seen: 0,
            digest_counts: HashMap::new(),
            downs_of_running_servers: 0,
            changed: false,
            change_watch: None,
        };
        // Servers come up within one probe period of each other, as after a
        // power cut: not in lockstep, so their timers are not aligned.
        let spread = micros(simulation.config.membership.probe_period).max(1);
        for server_idx in 0..n {
            let at_us = simulation.rng.random_range(0..spread);
            simulation.schedule(at_us, server_idx, Event::Start { server: server_idx });
        }
        simulation
    }

    pub fn now(&self) -> Duration {
        Duration::from_micros(self.now_us)
    }

    pub fn n_servers(&self) -> usize {
        self.servers.len()
    }

    pub fn server_id(&self, server_idx: usize) -> ServerId {
        self.servers[server_idx].id
    }

    pub fn is_running(&self, server_idx: usize) -> bool {
        self.servers[server_idx].process.is_some()
    }

    pub fn state(&self, server_idx: usize) -> &GridState {
        &self.servers[server_idx].state
    }

    /// What `observer`'s membership says of `subject` (None: never seen, or
    /// `observer` is not running).
    pub fn member_state(&self, observer: usize, subject: usize) -> Option<MemberState> {
        let process = self.servers[observer].process.as_ref()?;
        process
            .membership
            .member(self.servers[subject].id)
            .map(|status| status.state)
    }

    /// The identity `server_idx` runs as (None while crashed).
    pub fn identity(&self, server_idx: usize) -> Option<MemberId> {
        self.servers[server_idx]
            .process
            .as_ref()
            .map(|process| *process.membership.identity())
    }

    pub fn stats(&self) -> &NetworkStats {
        &self.stats
    }

    /// For the last config change written: the most anti-entropy pulls a
    /// server started between the write and its receiving the change, and
    /// how many servers received it through anti-entropy (a lost or missed
    /// push) rather than from the writer's push.
    pub fn change_progress(&self) -> Option<(u64, usize)> {
        self.change_watch
            .as_ref()
            .map(|watch| (watch.rounds, watch.repaired_by_anti_entropy))
    }

    /// Anti-entropy pulls `server_idx` has started since the beginning.
    pub fn pulls_started(&self, server_idx: usize) -> u64 {
        self.servers[server_idx].pulls_started
    }

    /// Bytes sent so far by running servers: (membership, dissemination).
    fn running_bytes(&self) -> (u64, u64) {
        self.servers
            .iter()
            .filter(|server| server.process.is_some())
            .fold((0, 0), |(membership, dissemination), server| {
                (
                    membership + server.membership_bytes,
                    dissemination + server.dissemination_bytes,
                )
            })
    }

    /// Down events about servers that were running when they were seen down.
    pub fn downs_of_running_servers(&self) -> u64 {
        self.downs_of_running_servers
    }

    /// Writes `value` on `server_idx` now and pushes it to its Alive peers,
    /// as the runtime does. Returns the write's stamp.
    ///
    /// Precondition: `server_idx` is running.
    pub fn write_config(&mut self, server_idx: usize, value: ConfigValue) -> Stamp {
        let now_ms = self.now_ms();
        let server = &mut self.servers[server_idx];
        let process = server
            .process
            .as_ref()
            .expect("writes happen on running servers");
        let hlc = server.clock.tick(now_ms);
        let delta = server
            .state
            .put_config(server.id, hlc, value)
            .expect("the simulation writes valid values");
        let stamp = delta
            .config
            .first()
            .map(|(_, entry)| entry.stamp)
            .expect("a config write carries its entry");
        let pushes = process
            .disseminator
            .on_local_change(&delta, process.membership.alive_peers());
        let key = delta
            .config
            .first()
            .map(|(key, _)| key.clone())
            .expect("a config write carries its entry");
        let mut has_it = vec![false; self.servers.len()];
        has_it[server_idx] = true;
        self.change_watch = Some(ChangeWatch {
            key,
            stamp,
            pulls_at_write: self
                .servers
                .iter()
                .map(|server| server.pulls_started)
                .collect(),
            has_it,
            rounds: 0,
            repaired_by_anti_entropy: 0,
        });
        self.refresh_digest(server_idx);
        self.send_outgoing(server_idx, pushes);
        stamp
    }

    /// Crashes `server_idx` now (a no-op, counted as not fired, if it is
    /// already down).
    pub fn crash(&mut self, server_idx: usize) {
        self.faults.crashes_requested += 1;
        if self.servers[server_idx].process.is_none() {
            return;
        }
        self.faults.crashes_fired += 1;
        let server = &mut self.servers[server_idx];
        server.process = None;
        server.epoch += 1;
        let digest = server.digest;
        self.remove_digest(digest);
        let n = self.servers.len();
        for subject in 0..n {
            let cell = server_idx * n + subject;
            match self.views[cell] {
                VIEW_ALIVE => self.alive_seen_by[subject] -= 1,
                VIEW_DOWN => self.down_seen_by[subject] -= 1,
                _ => {}
            }
            self.views[cell] = VIEW_UNKNOWN;
        }
        self.n_running -= 1;
        self.recount_fully_seen();
        self.changed = true;
    }

    /// Restarts `server_idx` now with a new generation (a no-op, counted as
    /// not fired, if it is running).
    pub fn restart(&mut self, server_idx: usize) {
        self.faults.restarts_requested += 1;
        if self.servers[server_idx].process.is_some() {
            return;
        }
        self.faults.restarts_fired += 1;
        if !self.servers[server_idx].started {
            // Its first start is still queued; this one replaces it.
            self.pending_starts -= 1;
        }
        self.servers[server_idx].epoch += 1;
        self.start_process(server_idx);
    }

    /// `observer` is told that `subject` did not answer in time (what the
    /// broker reports after a missed reservation deadline); returns whether
    /// `subject` was alive to it and is now suspect.
    pub fn suspect(&mut self, observer: usize, subject: usize) -> bool {
        let now_ms = self.now_ms();
        let subject = self.servers[subject].id;
        let Some(process) = self.servers[observer].process.as_mut() else {
            return false;
        };
        let suspected = process.membership.suspect(subject, now_ms).unwrap_or(false);
        self.drain_membership(observer);
        suspected
    }

    /// Cuts the servers in `side` off from the others until [`heal`](Self::heal).
    pub fn partition(&mut self, side: &[usize]) {
        self.faults.partitions += 1;
        let mut sides = vec![false; self.servers.len()];
        for server_idx in side {
            sides[*server_idx] = true;
        }
        self.partition = Some(sides);
    }

    pub fn heal(&mut self) {
        self.partition = None;
    }

    /// Runs every event up to `duration` from now.
    pub fn run_for(&mut self, duration: Duration) {
        let deadline = self.now_us + micros(duration);
        while self.step_before(deadline) {}
        self.now_us = deadline;
    }

    /// Runs until `condition` holds, at most `limit`; returns how long it
    /// took, or None if it did not hold by then (time is then `limit` on).
    pub fn run_until(&mut self, condition: Condition, limit: Duration) -> Option<Duration> {
        let started = self.now_us;
        let deadline = started + micros(limit);
        if self.holds(condition) {
            return Some(Duration::ZERO);
        }
        while self.step_before(deadline) {
            if self.changed {
                self.changed = false;
                if self.holds(condition) {
                    return Some(Duration::from_micros(self.now_us - started));
                }
            }
        }
        self.now_us = deadline;
        None
    }

    /// Runs until no running server has membership updates left to
    /// piggyback (the gossip of joins is over), checking every second; returns
    /// how long it took, or None if not within `limit`.
    pub fn run_until_quiet(&mut self, limit: Duration) -> Option<Duration> {
        let started = self.now_us;
        let deadline = started + micros(limit);
        loop {
            let quiet = self.servers.iter().all(|server| {
                server
                    .process
                    .as_ref()
                    .is_none_or(|process| process.membership.pending_updates() == 0)
            });
            if quiet {
                return Some(Duration::from_micros(self.now_us - started));
            }
            if self.now_us >= deadline {
                return None;
            }
            let step = Duration::from_secs(1).min(Duration::from_micros(deadline - self.now_us));
            self.run_for(step);
        }
    }

    pub fn holds(&self, condition: Condition) -> bool {
        let others = self.n_running.saturating_sub(1);
        match condition {
            Condition::FullMembership => {
                self.pending_starts == 0 && self.fully_seen == self.n_running
            }
            Condition::DigestsAgree => self.digest_counts.len() <= 1,
            Condition::SeenDownByAll(subject) => {
                let observers = if self.is_running(subject) {
                    others
                } else {
                    self.n_running
                };
                self.down_seen_by[subject] == observers
            }
            Condition::SeenAliveByAll(subject) => self.servers[subject]
                .process
                .as_ref()
                .is_some_and(|process| {
                    self.alive_seen_by[subject] == others
                        && process.membership.alive_peers().len() == others
                }),
        }
    }

    /// Ends the run: asserts that every fault asked for fired, and returns
    /// the counters.
    pub fn finish(&self) -> (NetworkStats, FaultCounts) {
        let network = &self.config.network;
        if network.loss > 0.0 {
            assert!(self.stats.dropped_by_loss > 0, "loss knob had no effect");
        }
        if !network.jitter.is_zero() {
            assert!(self.stats.jittered > 0, "jitter knob had no effect");
        }
        assert_eq!(
            self.faults.crashes_fired, self.faults.crashes_requested,
            "a crash was asked for a server that was not running"
        );
        assert_eq!(
            self.faults.restarts_fired, self.faults.restarts_requested,
            "a restart was asked for a server that was running"
        );
        if self.faults.partitions > 0 {
            assert!(
                self.stats.dropped_by_partition > 0,
                "partition knob had no effect"
            );
        }
        assert_eq!(self.stats.merge_refused, 0, "a valid delta was refused");
        (self.stats.clone(), self.faults)
    }

    fn now_ms(&self) -> u64 {
        self.now_us / 1000
    }

    /// Handles the next event if it is due by `deadline`.
    fn step_before(&mut self, deadline: u64) -> bool {
        if self
            .queue
            .peek()
            .is_none_or(|Reverse(next)| next.at_us > deadline)
        {
            return false;
        }
        let Some(Reverse(next)) = self.queue.pop() else {
            return false;
        };
        self.now_us = next.at_us;
        let target = match &next.event {
            Event::Deliver { to, .. } => *to,
            Event::Timer { server, .. } | Event::Tick { server } | Event::Start { server } => {
                *server
            }
        };
        let is_start = matches!(next.event, Event::Start { .. });
        if next.epoch != self.servers[target].epoch
            || (self.servers[target].process.is_none() && !is_start)
        {
            if matches!(next.event, Event::Deliver { .. }) {
                self.stats.undeliverable += 1;
            }
            return true;
        }
        match next.event {
            Event::Deliver { from, to, payload } => self.deliver(from, to, payload),
            Event::Timer { server, timer } => {
                let now_ms = self.now_ms();
                if let Some(process) = self.servers[server].process.as_mut() {
                    // A failed timer is logged by the membership; the run
                    // goes on as the runtime's would.
                    let _ = process.membership.handle_timer(timer, now_ms);
                }
                self.drain_membership(server);
            }
            Event::Tick { server } => self.tick(server),
            Event::Start { server } => {
                self.pending_starts -= 1;
                self.start_process(server);
            }
        }
        true
    }

    fn start_process(&mut self, server_idx: usize) {
        let now_ms = self.now_ms();
        let membership_seed = self.rng.next_u64();
        let disseminator_seed = self.rng.next_u64();
        let server = &self.servers[server_idx];
        // The Unix time at start in a real server; virtual time here.
        let generation = now_ms + 1;
        let mut membership = Membership::new(
            MemberId::new(server.id, server.address, generation),
            self.config.membership.clone(),
            membership_seed,
        )
        .expect("simulation membership settings are valid");
        let known: Vec<(ServerId, SocketAddr)> = self
            .servers
            .iter()
            .filter(|other| other.id != server.id)
            .map(|other| (other.id, other.address))
            .collect();
        // Nothing is known yet, so nothing is refused.
        let _ = membership.join_known(known, now_ms);
        let interval_ms =
            u64::try_from(self.config.anti_entropy_interval.as_millis()).unwrap_or(u64::MAX);
        let disseminator = Disseminator::new(server.id, interval_ms, disseminator_seed);
        let digest = server.digest;
        self.servers[server_idx].started = true;
        self.servers[server_idx].process = Some(Process {
            membership,
            disseminator,
        });
        self.n_running += 1;
        *self.digest_counts.entry(digest).or_insert(0) += 1;
        self.recount_fully_seen();
        self.changed = true;
        // Servers start ticking at different offsets, as real ones do.
        let offset = self.rng.random_range(0..micros(NODE_TICK));
        self.schedule(
            self.now_us + offset,
            server_idx,
            Event::Tick { server: server_idx },
        );
        self.drain_membership(server_idx);
    }

    fn schedule(&mut self, at_us: u64, target: usize, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at_us,
            seq: self.seq,
            epoch: self.servers[target].epoch,
            event,
        }));
    }

    fn tick(&mut self, server_idx: usize) {
        let now_ms = self.now_ms();
        let server = &mut self.servers[server_idx];
        let Some(process) = server.process.as_mut() else {
            return;
        };
        let pull = process.disseminator.on_tick(
            now_ms,
            process.membership.alive_peers(),
            server.state.version_vector(),
        );
        if pull.is_some() {
            server.pulls_started += 1;
        }
        self.send_outgoing(server_idx, pull);
        self.schedule(
            self.now_us + micros(NODE_TICK),
            server_idx,
            Event::Tick { server: server_idx },
        );
    }

    fn send_outgoing(&mut self, from: usize, outgoing: impl IntoIterator<Item = Outgoing>) {
        for outgoing in outgoing {
            let (peer, request) = match outgoing {
                Outgoing::Push { to, delta } => (to, PeerRequest::PushDelta { delta }),
                Outgoing::Pull { from: peer, since } => (peer, PeerRequest::PullState { since }),
            };
            if let Some(&to) = self.index.get(&peer) {
                let anti_entropy = matches!(request, PeerRequest::PullState { .. });
                self.send(
                    from,
                    to,
                    Payload::Request {
                        request: Box::new(request),
                        anti_entropy,
                    },
                );
            }
        }
    }

    fn deliver(&mut self, from: usize, to: usize, payload: Payload) {
        match payload {
            Payload::Membership(bytes) => {
                let now_ms = self.now_ms();
                let sender = self.servers[from].id;
                if let Some(process) = self.servers[to].process.as_mut() {
                    if process
                        .membership
                        .handle_datagram(sender, &bytes, now_ms)
                        .is_err()
                    {
                        self.stats.membership_refused += 1;
                    }
                }
                self.drain_membership(to);
            }
            Payload::Request {
                request,
                anti_entropy,
            } => match *request {
                PeerRequest::PushDelta { delta } => {
                    let changed = self.apply(to, &delta, anti_entropy);
                    self.send(
                        to,
                        from,
                        Payload::Response(Box::new(PeerResponse::Merged { changed })),
                    );
                }
                PeerRequest::PullState { since } => {
                    let state = &self.servers[to].state;
                    let response = PeerResponse::State {
                        delta: state.delta_since(&since),
                        vector: state.version_vector().clone(),
                    };
                    self.send(to, from, Payload::Response(Box::new(response)));
                }
                // Joins, image transfer and desktops are not simulated.
                PeerRequest::Join(_)
                | PeerRequest::GetManifest { .. }
                | PeerRequest::GetChunk { .. }
                | PeerRequest::GetDiffPart { .. }
                | PeerRequest::GetHave { .. }
                | PeerRequest::Reserve(_)
                | PeerRequest::LogOff { .. } => {}
            },
            Payload::Response(response) => match *response {
                PeerResponse::State { delta, vector } => {
                    if !delta.is_empty() {
                        self.apply(to, &delta, true);
                    }
                    let back = self.servers[to].state.delta_since(&vector);
                    if !back.is_empty() {
                        self.send(
                            to,
                            from,
                            Payload::Request {
                                request: Box::new(PeerRequest::PushDelta { delta: back }),
                                anti_entropy: true,
                            },
                        );
                    }
                }
                PeerResponse::Merged { .. }
                | PeerResponse::Refused { .. }
                | PeerResponse::Reserved(_)
                | PeerResponse::ReserveRefused(_)
                | PeerResponse::LoggedOff { .. }
                | PeerResponse::Joined(_)
                | PeerResponse::Have(_)
                | PeerResponse::Manifest { .. }
                | PeerResponse::Chunk { .. }
                | PeerResponse::DiffPart { .. } => {}
            },
        }
    }

    /// Merges a delta on `server_idx`; returns how many entries changed.
    fn apply(&mut self, server_idx: usize, delta: &Delta, anti_entropy: bool) -> usize {
        match self.servers[server_idx].state.apply_delta(delta) {
            Ok(0) => 0,
            Ok(changed) => {
                self.refresh_digest(server_idx);
                let pulls_started = self.servers[server_idx].pulls_started;
                if let Some(watch) = self.change_watch.as_mut() {
                    let carries_it = delta
                        .config
                        .iter()
                        .any(|(key, entry)| *key == watch.key && entry.stamp == watch.stamp);
                    if carries_it && !watch.has_it[server_idx] {
                        watch.has_it[server_idx] = true;
                        watch.rounds = watch
                            .rounds
                            .max(pulls_started - watch.pulls_at_write[server_idx]);
                        if anti_entropy {
                            watch.repaired_by_anti_entropy += 1;
                        }
                    }
                }
                changed
            }
            Err(_) => {
                self.stats.merge_refused += 1;
                0
            }
        }
    }

    fn refresh_digest(&mut self, server_idx: usize) {
        let server = &mut self.servers[server_idx];
        let old = server.digest;
        server.digest = server.state.digest();
        let new = server.digest;
        if old != new && server.process.is_some() {
            self.remove_digest(old);
            *self.digest_counts.entry(new).or_insert(0) += 1;
            self.changed = true;
        }
    }

    fn remove_digest(&mut self, digest: [u8; 32]) {
        if let Some(count) = self.digest_counts.get_mut(&digest) {
            *count -= 1;
            if *count == 0 {
                self.digest_counts.remove(&digest);
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, payload: Payload) {
        let len = match &payload {
            Payload::Membership(bytes) => bytes.len(),
            Payload::Request { request, .. } => protocol::encode(request).len(),
            Payload::Response(response) => protocol::encode(response).len(),
        } as u64;
        self.stats.messages_sent += 1;
        if matches!(payload, Payload::Membership(_)) {
            self.stats.membership_bytes += len;
            self.servers[from].membership_bytes += len;
        } else {
            self.stats.dissemination_bytes += len;
            self.servers[from].dissemination_bytes += len;
        }
        if self
            .partition
            .as_ref()
            .is_some_and(|sides| sides[from] != sides[to])
        {
            self.stats.dropped_by_partition += 1;
            return;
        }
        let network = &self.config.network;
        if network.loss > 0.0 && self.rng.random_bool(network.loss) {
            self.stats.dropped_by_loss += 1;
            return;
        }
        let jitter_us = micros(network.jitter);
        let jitter = if jitter_us > 0 {
            self.rng.random_range(0..=jitter_us)
        } else {
            0
        };
        if jitter > 0 {
            self.stats.jittered += 1;
        }
        let at_us = self.now_us + micros(network.delay) + jitter;
        self.schedule(at_us, to, Event::Deliver { from, to, payload });
    }

    fn drain_membership(&mut self, server_idx: usize) {
        let Some(process) = self.servers[server_idx].process.as_mut() else {
            return;
        };
        for output in process.membership.take_outputs() {
            match output {
                MembershipOutput::Send { to, bytes } => {
                    if let Some(&to) = self.index.get(&to.server) {
                        self.send(server_idx, to, Payload::Membership(bytes));
                    }
                }
                MembershipOutput::ScheduleTimer { after, timer } => {
                    self.schedule(
                        self.now_us + micros(after),
                        server_idx,
                        Event::Timer {
                            server: server_idx,
                            timer,
                        },
                    );
                }
                MembershipOutput::Notify(event) => {
                    if let Some(&subject) = self.index.get(&event.server) {
                        self.record_view(server_idx, subject, event.state);
                    }
                }
            }
        }
    }

    fn record_view(&mut self, observer: usize, subject: usize, state: MemberState) {
        let n = self.servers.len();
        let cell = observer * n + subject;
        let old = self.views[cell];
        let new = view_code(state);
        if old == new {
            return;
        }
        self.views[cell] = new;
        self.changed = true;
        if new == VIEW_DOWN && self.is_running(subject) {
            self.downs_of_running_servers += 1;
        }
        let was_fully_seen = self.is_fully_seen(subject);
        match old {
            VIEW_ALIVE => self.alive_seen_by[subject] -= 1,
            VIEW_DOWN => self.down_seen_by[subject] -= 1,
            _ => {}
        }
        match new {
            VIEW_ALIVE => self.alive_seen_by[subject] += 1,
            VIEW_DOWN => self.down_seen_by[subject] += 1,
            _ => {}
        }
        match (was_fully_seen, self.is_fully_seen(subject)) {
            (false, true) => self.fully_seen += 1,
            (true, false) => self.fully_seen -= 1,
            _ => {}
        }
    }

    fn is_fully_seen(&self, subject: usize) -> bool {
        self.is_running(subject) && self.alive_seen_by[subject] + 1 == self.n_running
    }

    fn recount_fully_seen(&mut self) {
        self.fully_seen = (0..self.servers.len())
            .filter(|subject| self.is_fully_seen(*subject))
            .count();
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn server_address(server_idx: usize) -> SocketAddr {
    let [_, b, c, d] = u32::try_from(server_idx).unwrap_or(u32::MAX).to_be_bytes();
    SocketAddr::from(([10, b, c, d], 7001))
}

/// A template as an administrator would write it: the config change the
/// scenarios propagate.
pub fn office_template(desired_vms: u32) -> ConfigValue {
    ConfigValue::Template(Template {
        name: TemplateName::new("office").expect("a constant valid name"),
        image: ImageVersionId::new("office-base-1").expect("a constant valid name"),
        vcpus: 2,
        memory_mib: 4096,
        desired_vms,
        min_idle_vms: 2,
        min_replicas: 2,
        concurrency_percent: 0,
        kind: TemplateKind::Pooled,
        display: DisplayProtocol::Spice,
        monitors: 1,
    })
}

/// The standard run: warm up, measure a quiet grid, propagate a config
/// change, crash a server and bring it back.
#[derive(Debug, Clone)]
pub struct GridScenario {
    pub config: SimulationConfig,
    /// How long membership may take to see everyone at start.
    pub warmup_limit: Duration,
    /// After warm-up, how long to wait at most for the gossip of the joins
    /// to end (every membership update sent as often as foca sends it)
    /// before measuring steady traffic.
    pub settle_limit: Duration,
    /// The window steady-state traffic is averaged over.
    pub steady_window: Duration,
    /// Config changes written one after the other (on servers 0, 1, 2, ...),
    /// each once the previous one reached everyone; the report gives the
    /// slowest.
    pub config_changes: usize,
    pub propagation_limit: Duration,
    /// The server to crash after the propagation (None: no crash).
    pub crash: Option<usize>,
    pub detection_limit: Duration,
    pub rejoin_limit: Duration,
}

impl GridScenario {
    pub fn new(config: SimulationConfig) -> Self {
        let crash = Some(config.n_servers / 2);
        Self {
            config,
            warmup_limit: Duration::from_secs(60),
            settle_limit: Duration::from_secs(120),
            steady_window: Duration::from_secs(20),
            config_changes: 3,
            propagation_limit: Duration::from_secs(60),
            crash,
            detection_limit: Duration::from_secs(60),
            rejoin_limit: Duration::from_secs(60),
        }
    }
}

/// How config changes reached every running server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Propagation {
    /// Until every running server's digest matched (the slowest change).
    pub after: Duration,
    /// Anti-entropy rounds: the most pulls a server started between a write
    /// and its receiving the change (0: the push was enough everywhere).
    pub rounds: u64,
    /// Servers that received a change through anti-entropy (a pull or a
    /// push-back) because the writer's push was lost, summed over changes.
    pub repaired_by_anti_entropy: usize,
}

/// Traffic of a quiet grid, averaged per running server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SteadyTraffic {
    pub window: Duration,
    pub membership_bytes_per_server_s: f64,
    pub dissemination_bytes_per_server_s: f64,
}

impl SteadyTraffic {
    pub fn total_bytes_per_server_s(&self) -> f64 {
        self.membership_bytes_per_server_s + self.dissemination_bytes_per_server_s
    }
}

/// What a [`GridScenario`] measured. None: did not happen within its limit.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulationReport {
    pub n_servers: usize,
    pub loss: f64,
    /// Until every server saw every other Alive.
    pub membership_converged: Option<Duration>,
    /// Then until the gossip of the joins ended (no server had membership
    /// updates left to send).
    pub membership_settled: Option<Duration>,
    pub steady: Option<SteadyTraffic>,
    /// Over the config changes (None: one did not reach everyone within the
    /// limit).
    pub propagation: Option<Propagation>,
    pub config_changes: usize,
    /// Until every other server saw the crashed one Down.
    pub crash_detection: Option<Duration>,
    /// From its restart until it and every other server saw each other Alive.
    pub rejoin: Option<Duration>,
    /// Down events about running servers (false suspicions that won).
    pub downs_of_running_servers: u64,
    pub simulated: Duration,
    pub stats: NetworkStats,
    pub faults: FaultCounts,
}

impl fmt::Display for SimulationReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = |duration: Option<Duration>| match duration {
            Some(duration) => format!("{:.2} s", duration.as_secs_f64()),
            None => "not within the limit".to_owned(),
        };
        writeln!(
            formatter,
            "grid of {} servers, {:.1}% loss, {:.0} s simulated",
            self.n_servers,
            self.loss * 100.0,
            self.simulated.as_secs_f64()
        )?;
        writeln!(
            formatter,
            "  membership converged:   {} (gossip of the joins over {} later)",
            seconds(self.membership_converged),
            seconds(self.membership_settled)
        )?;
        match &self.steady {
            Some(steady) => writeln!(
                formatter,
                "  steady traffic:         {:.0} B/server/s ({:.0} membership + {:.0} anti-entropy) over {:.0} s",
                steady.total_bytes_per_server_s(),
                steady.membership_bytes_per_server_s,
                steady.dissemination_bytes_per_server_s,
                steady.window.as_secs_f64()
            )?,
            None => writeln!(formatter, "  steady traffic:         not measured")?,
        }
        match &self.propagation {
            Some(propagation) => writeln!(
                formatter,
                "  config change reached all: {:.3} s, {} anti-entropy rounds (slowest of {}; {} servers repaired by anti-entropy)",
                propagation.after.as_secs_f64(),
                propagation.rounds,
                self.config_changes,
                propagation.repaired_by_anti_entropy
            )?,
            None => writeln!(
                formatter,
                "  config change reached all: not within the limit"
            )?,
        }
        writeln!(
            formatter,
            "  crash seen down by all: {}",
            seconds(self.crash_detection)
        )?;
        writeln!(
            formatter,
            "  restart seen alive:     {}",
            seconds(self.rejoin)
        )?;
        writeln!(
            formatter,
            "  false downs: {}; messages {} ({} lost, {} partitioned, {} undeliverable, {} membership refused)",
            self.downs_of_running_servers,
            self.stats.messages_sent,
            self.stats.dropped_by_loss,
            self.stats.dropped_by_partition,
            self.stats.undeliverable,
            self.stats.membership_refused
        )
    }
}

/// Runs a [`GridScenario`] and checks that its faults fired.
pub fn run_grid_scenario(scenario: &GridScenario) -> SimulationReport {
    let mut simulation = Simulation::new(scenario.config.clone());
    let membership_converged =
        simulation.run_until(Condition::FullMembership, scenario.warmup_limit);

    let settled = simulation.run_until_quiet(scenario.settle_limit);
    let (membership_before, dissemination_before) = simulation.running_bytes();
    let running = simulation.n_running as f64;
    simulation.run_for(scenario.steady_window);
    let (membership_after, dissemination_after) = simulation.running_bytes();
    let per_server_s = |bytes: u64| bytes as f64 / running / scenario.steady_window.as_secs_f64();
    let steady = (!scenario.steady_window.is_zero()).then(|| SteadyTraffic {
        window: scenario.steady_window,
        membership_bytes_per_server_s: per_server_s(membership_after - membership_before),
        dissemination_bytes_per_server_s: per_server_s(dissemination_after - dissemination_before),
    });

    let mut propagation = Some(Propagation {
        after: Duration::ZERO,
        rounds: 0,
        repaired_by_anti_entropy: 0,
    });
    for change in 0..scenario.config_changes {
        let writer = change % simulation.n_servers();
        let desired_vms = u32::try_from(change).unwrap_or(u32::MAX).saturating_add(25);
        simulation.write_config(writer, office_template(desired_vms));
        let reached = simulation.run_until(Condition::DigestsAgree, scenario.propagation_limit);
        let (rounds, repaired) = simulation.change_progress().unwrap_or((0, 0));
        propagation = match (propagation, reached) {
            (Some(so_far), Some(after)) => Some(Propagation {
                after: so_far.after.max(after),
                rounds: so_far.rounds.max(rounds),
                repaired_by_anti_entropy: so_far.repaired_by_anti_entropy + repaired,
            }),
            _ => None,
        };
        // Let the next change start at another point of the rotation.
        simulation.run_for(scenario.config.anti_entropy_interval / 2);
    }
    if scenario.config_changes == 0 {
        propagation = None;
    }

    let (mut crash_detection, mut rejoin) = (None, None);
    if let Some(crashed) = scenario.crash {
        simulation.crash(crashed);
        crash_detection =
            simulation.run_until(Condition::SeenDownByAll(crashed), scenario.detection_limit);
        simulation.restart(crashed);
        rejoin = simulation.run_until(Condition::SeenAliveByAll(crashed), scenario.rejoin_limit);
    }

    let (stats, faults) = simulation.finish();
    SimulationReport {
        n_servers: scenario.config.n_servers,
        loss: scenario.config.network.loss,
        membership_converged,
        membership_settled: settled,
        steady,
        propagation,
        config_changes: scenario.config_changes,
        crash_detection,
        rejoin,
        downs_of_running_servers: simulation.downs_of_running_servers(),
        simulated: simulation.now(),
        stats,
        faults,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ConfigKey;

    #[test]
    fn a_change_converges_despite_five_percent_loss_and_a_crash_is_detected() {
        let mut config = SimulationConfig::new(30, 7);
        config.network.loss = 0.05;
        let scenario = GridScenario {
            steady_window: Duration::from_secs(10),
            ..GridScenario::new(config)
        };
        let report = run_grid_scenario(&scenario);
        eprintln!("{report}");

        assert!(report.stats.dropped_by_loss > 0, "loss knob had no effect");
        assert!(
            report.membership_converged.is_some(),
            "membership never converged"
        );
        let propagation = report.propagation.expect("the change reached everyone");
        assert!(
            propagation.after < Duration::from_secs(10),
            "took {:?}",
            propagation.after
        );
        assert!(
            propagation.repaired_by_anti_entropy > 0,
            "no push was lost: the test did not exercise anti-entropy"
        );
        let detection = report.crash_detection.expect("the crash was detected");
        assert!(
            detection < Duration::from_secs(15),
            "down everywhere after {detection:?}"
        );
        assert!(report.rejoin.is_some(), "the restarted server came back");
        assert_eq!(report.faults.crashes_fired, 1);
        assert_eq!(report.faults.restarts_fired, 1);
    }

    #[test]
    fn a_crashed_server_is_seen_down_by_all_and_alive_again_after_restart() {
        let settings = MembershipSettings::default();
        let mut simulation = Simulation::new(SimulationConfig::new(20, 11));
        assert!(simulation
            .run_until(Condition::FullMembership, Duration::from_secs(30))
            .is_some());
        simulation.run_for(Duration::from_secs(5));

        simulation.crash(3);
        let detection = simulation
            .run_until(Condition::SeenDownByAll(3), Duration::from_secs(60))
            .expect("the crash is detected");
        // A probe fails within a few periods, then the suspicion runs out,
        // then the news spreads.
        let bound =
            settings.probe_period * 5 + settings.suspect_to_down_after + Duration::from_secs(2);
        assert!(detection <= bound, "down everywhere after {detection:?}");
        assert_eq!(simulation.downs_of_running_servers(), 0);

        let old_generation = simulation.identity(4).map(|id| id.generation);
        simulation.restart(3);
        let rejoin = simulation
            .run_until(Condition::SeenAliveByAll(3), Duration::from_secs(30))
            .expect("the restarted server is alive everywhere again");
        assert!(rejoin < Duration::from_secs(5), "took {rejoin:?}");
        assert_eq!(
            simulation.identity(4).map(|id| id.generation),
            old_generation,
            "the others kept their identity"
        );
        for observer in (0..20).filter(|observer| *observer != 3) {
            assert_eq!(
                simulation.member_state(observer, 3),
                Some(MemberState::Alive)
            );
        }
        let (_, faults) = simulation.finish();
        assert_eq!((faults.crashes_fired, faults.restarts_fired), (1, 1));
    }

    /// The broker's hint (a missed reservation deadline) makes a member
    /// suspect at once: a crashed server is declared down one suspicion
    /// timeout after the hint, without waiting for a probe to fail; a
    /// server that is alive refutes the suspicion and nobody declares it
    /// down.
    #[test]
    fn a_broker_hint_suspects_at_once_and_a_live_server_refutes_it() {
        let settings = MembershipSettings::default();
        let mut simulation = Simulation::new(SimulationConfig::new(20, 23));
        assert!(simulation
            .run_until(Condition::FullMembership, Duration::from_secs(30))
            .is_some());
        simulation.run_for(Duration::from_secs(5));

        // Alive: suspected by one, refuted, never down.
        assert!(simulation.suspect(0, 5));
        assert_eq!(
            simulation.member_state(0, 5),
            Some(MemberState::Suspect),
            "suspect at once"
        );
        assert!(
            !simulation.suspect(0, 5),
            "already suspect: nothing more to do"
        );
        let refuted = simulation
            .run_until(Condition::SeenAliveByAll(5), Duration::from_secs(30))
            .expect("the live server refutes the suspicion");
        simulation.run_for(settings.suspect_to_down_after * 2);
        assert_eq!(
            simulation.downs_of_running_servers(),
            0,
            "refuted after {refuted:?}"
        );
        assert_eq!(simulation.member_state(0, 5), Some(MemberState::Alive));

        // Crashed, and the broker noticed first.
        simulation.crash(3);
        assert!(simulation.suspect(0, 3));
        let detection = simulation
            .run_until(Condition::SeenDownByAll(3), Duration::from_secs(60))
            .expect("the crash is detected");
        let bound = settings.suspect_to_down_after + Duration::from_secs(2);
        assert!(
            detection <= bound,
            "down everywhere after {detection:?}, bound {bound:?}"
        );
        assert_eq!(simulation.downs_of_running_servers(), 0);
    }

    #[test]
    fn a_healed_partition_converges_on_one_winner() {
        let n = 20;
        let mut simulation = Simulation::new(SimulationConfig::new(n, 23));
        assert!(simulation
            .run_until(Condition::FullMembership, Duration::from_secs(30))
            .is_some());

        let west: Vec<usize> = (0..n / 2).collect();
        simulation.partition(&west);
        // Each side declares the other down.
        simulation.run_for(Duration::from_secs(20));
        assert_eq!(simulation.member_state(0, n - 1), Some(MemberState::Down));
        assert_eq!(simulation.member_state(n - 1, 0), Some(MemberState::Down));

        // Both sides write the same template (LWW) and one each of their own.
        let west_stamp = simulation.write_config(1, office_template(10));
        simulation.run_for(Duration::from_secs(1));
        let east_stamp = simulation.write_config(n - 2, office_template(40));
        simulation.write_config(2, ConfigValue::Template(template_named("west-only")));
        simulation.write_config(n - 3, ConfigValue::Template(template_named("east-only")));
        simulation.run_for(Duration::from_secs(10));
        assert_ne!(
            simulation.state(0).digest(),
            simulation.state(n - 1).digest(),
            "the sides cannot have met"
        );

        simulation.heal();
        let converged = simulation
            .run_until(Condition::DigestsAgree, Duration::from_secs(120))
            .expect("the grid converges after the partition heals");
        eprintln!("converged {converged:?} after healing");
        let membership = simulation
            .run_until(Condition::FullMembership, Duration::from_secs(120))
            .expect("membership merges after the partition heals");
        eprintln!("membership merged {membership:?} later");

        let winner = if east_stamp > west_stamp { 40 } else { 10 };
        let key = ConfigKey::Template(TemplateName::new("office").unwrap());
        for server_idx in 0..n {
            let state = simulation.state(server_idx);
            assert_eq!(
                state.config(&key),
                Some(&office_template(winner)),
                "server {server_idx}"
            );
            assert_eq!(state.templates().count(), 3, "server {server_idx}");
        }
        let (stats, faults) = simulation.finish();
        assert!(
            stats.dropped_by_partition > 0,
            "partition knob had no effect"
        );
        assert_eq!(faults.partitions, 1);
    }

    fn template_named(name: &str) -> Template {
        let ConfigValue::Template(mut template) = office_template(1) else {
            unreachable!("office_template makes a template")
        };
        template.name = TemplateName::new(name).unwrap();
        template
    }

    #[test]
    fn runs_are_deterministic() {
        let run = || {
            let mut config = SimulationConfig::new(8, 5);
            config.network.loss = 0.1;
            let mut simulation = Simulation::new(config);
            simulation.run_for(Duration::from_secs(10));
            simulation.write_config(0, office_template(3));
            simulation.run_for(Duration::from_secs(5));
            (simulation.stats().clone(), simulation.state(7).digest())
        };
        assert_eq!(run(), run());
    }
}
