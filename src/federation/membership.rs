//! Who is in the grid, sans I/O: SWIM failure detection (foca) behind
//! deskgrid's own versioned datagram envelope.
//!
//! DESIGN.md section 6 asks for an existing SWIM implementation carried over
//! the QUIC endpoint's datagrams; this module wraps [`foca`] so that the
//! runtime (`node.rs`) only moves bytes and timers:
//!
//! ```text
//!   QUIC datagram from peer P ──► handle_datagram(P, bytes, now) ─┐
//!   a timer comes due         ──► handle_timer(timer, now)        ├─► take_outputs():
//!   start / restart           ──► join_known(peers, now)          ┘     Send { to, bytes }
//!                                                                       ScheduleTimer { after, timer }
//!                                                                       Notify(MemberEvent)
//! ```
//!
//! # Identity and generations
//!
//! A member is a [`MemberId`]: the server, the address it listens on, and a
//! *generation* that grows on every start. SWIM's Down is final for an
//! identity, so a server once declared down (crashed, or cut off by a
//! partition) comes back as a new generation: on restart because the caller
//! picks a higher one, and while running because foca calls
//! [`foca::Identity::renew`] when it learns the grid thinks it is down.
//! Two identities of one server resolve to the higher generation.
//!
//! # The wire
//!
//! foca has no encryption and no protocol version. Its bytes travel only
//! inside the mutual-TLS QUIC connections (so only grid members can speak),
//! and every datagram starts with one byte,
//! [`MEMBERSHIP_PROTOCOL_VERSION`]; a datagram with another first byte is
//! refused, logged at debug level and dropped, so a grid with mixed versions
//! during a rolling upgrade fails loudly, not subtly. The sender a datagram
//! claims inside foca's header must be the server the QUIC connection
//! authenticated.
//!
//! # States
//!
//! foca tells when a member comes up, goes down or is renamed, but not when it
//! becomes suspect; this module keeps its own view of every member and emits a
//! [`MemberEvent`] for each change of state or identity, after each input, in
//! server order. To stay cheap in a grid of a thousand it compares with foca
//! only the members an input can have changed (those a datagram names with
//! news, those foca notifies, a member whose probe failed); debug builds check
//! after every input that the whole view still matches foca. A member foca
//! forgets (24 hours after it went down) stays [`MemberState::Down`] here:
//! DESIGN.md section 4 keeps a missing server's record, shown as missing.
//!
//! # Joining, rejoining, healing
//!
//! Three gaps of plain foca, each found in the simulator (`simulation.rs`),
//! are closed here:
//!
//! - **A newcomer learns quiet members slowly**: SWIM tells it about a member
//!   only when that member probes it or appears in an answer to an announce.
//!   [`Membership::join_known`] therefore sweeps: it announces to every known
//!   server not seen yet, a few at a time, until all were seen or tried.
//! - **A rejoin can deadlock**: after renewing its identity foca stops its
//!   timers and ignores messages addressed to its old identity until someone
//!   addresses the new one. When a healed partition makes every member of
//!   both sides rejoin at once, nobody does. After a rejoin this module
//!   announces (an announce reaches any generation of its receiver, and the
//!   answer reconnects foca), and again every
//!   [`MembershipSettings::rejoin_period`] until foca is in touch.
//! - **Nobody answers**: at a cold start with the others down, or when cut
//!   off from everyone, foca has no timer left; the same rejoin timer keeps
//!   announcing.
//!
//! **Invariant:** no I/O, no clock reads (time is an argument), randomness
//! only from the seed given. This is the only file that names `foca`.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{
    AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PeriodicParams, PostcardCodec,
    Timer,
};
use rand::rngs::StdRng;
use rand::seq::{IteratorRandom as _, SliceRandom as _};
use rand::{RngCore as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

use crate::model::ServerId;

/// The first byte of every membership datagram. Raise it when foca's wire
/// format changes (a foca upgrade, another codec, another identity layout).
pub const MEMBERSHIP_PROTOCOL_VERSION: u8 = 1;

/// Bytes deskgrid's envelope puts before foca's: the version.
const ENVELOPE_LEN: usize = 1;

/// The smallest datagram size accepted in [`MembershipSettings`]: a header
/// with two identities is about 80 bytes, and a feed or gossip that cannot
/// carry a handful of members makes the protocol crawl.
const MIN_DATAGRAM_SIZE: usize = 512;

/// The fewest times each membership update is piggybacked. Each member that
/// learns an update passes it to this many random members, so a member misses
/// it with probability about e^-t (1 in 20,000 at 10), and a member that
/// misses a Down learns it only when its own probe round reaches the dead
/// member: up to one probe period per member later. memberlist repairs such
/// misses with a periodic full-state exchange; foca has none, so small grids,
/// where `new_lan` would give 5 transmissions, get more. Updates are rare, so
/// the bytes are few.
const MIN_TRANSMISSIONS: u8 = 10;

/// One incarnation of one server in the grid.
///
/// Equal servers with different generations are different identities; the
/// higher generation wins (see [`foca::Identity::win_addr_conflict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberId {
    pub server: ServerId,
    /// Where the server's QUIC endpoint listens.
    pub address: SocketAddr,
    /// Grows on every start and every rejoin. A good choice at start is the
    /// Unix time in milliseconds: it grows across restarts without being
    /// stored, and a rejoin (+1) never catches up with the next start.
    pub generation: u64,
}

impl MemberId {
    pub fn new(server: ServerId, address: SocketAddr, generation: u64) -> Self {
        Self {
            server,
            address,
            generation,
        }
    }

    /// An identity to address an announce to when only the server and its
    /// address are known: foca accepts an announce for any generation of
    /// the receiver.
    fn any_generation(server: ServerId, address: SocketAddr) -> Self {
        Self::new(server, address, 0)
    }
}

impl fmt::Display for MemberId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{}@{}#{}",
            self.server, self.address, self.generation
        )
    }
}

impl foca::Identity for MemberId {
    /// Two identities of one server are one member: foca keeps the winner.
    type Addr = ServerId;

    /// The next generation. foca calls this when it learns the grid has
    /// declared this identity down, and rejoins with the result.
    fn renew(&self) -> Option<Self> {
        let generation = self.generation.checked_add(1)?;
        Some(Self {
            generation,
            ..*self
        })
    }

    fn addr(&self) -> ServerId {
        self.server
    }

    /// The higher generation wins; between equal generations (two processes
    /// started with one generation: a misconfiguration) the higher address
    /// wins, so every member picks the same one.
    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, self.address) > (adversary.generation, adversary.address)
    }
}

/// A member's state as this server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemberState {
    /// Answers probes.
    Alive,
    /// Missed a probe; still counted as up until it refutes the suspicion or
    /// [`MembershipSettings::suspect_to_down_after`] passes.
    Suspect,
    /// Declared down by the grid: "missing" in DESIGN.md's words. Excluded
    /// from every plan until it comes back as a new generation.
    Down,
}

impl From<foca::State> for MemberState {
    fn from(state: foca::State) -> Self {
        match state {
            foca::State::Alive => Self::Alive,
            foca::State::Suspect => Self::Suspect,
            foca::State::Down => Self::Down,
        }
    }
}

/// What this server knows about one member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberStatus {
    /// The member's newest identity known here.
    pub identity: MemberId,
    pub state: MemberState,
    /// When (`now_ms` of the input) the state or identity last changed.
    pub since_ms: u64,
}

/// A member changed state or identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberEvent {
    pub server: ServerId,
    pub state: MemberState,
    /// Its newest identity: where to reach it, and which generation.
    pub identity: MemberId,
}

/// A timer for the runtime to hand back through
/// [`Membership::handle_timer`]. Opaque, so that only this file names foca.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipTimer(TimerKind);

#[derive(Debug, Clone, PartialEq, Eq)]
enum TimerKind {
    Swim(Timer<MemberId>),
    /// Announce again while no member answers (all down, or cut off).
    Rejoin,
    /// The next batch of the discovery sweep.
    Sweep,
}

/// What the runtime must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipOutput {
    /// Send `bytes` to `to` as one QUIC datagram (unreliable, unordered;
    /// SWIM tolerates loss). Precondition for the runtime: the connection
    /// to `to.server` is authenticated as that server; the bytes fit
    /// [`MembershipSettings::max_datagram_size`].
    Send { to: MemberId, bytes: Vec<u8> },
    /// Hand `timer` back through [`Membership::handle_timer`] after `after`.
    /// Every timer must be delivered, in the order they come due; a lost
    /// timer stalls probing.
    ScheduleTimer {
        after: Duration,
        timer: MembershipTimer,
    },
    /// A member changed state or identity.
    Notify(MemberEvent),
}

/// Why a membership input was refused. Nothing of a refused datagram is
/// applied (foca checks a packet whole before it applies it), except for
/// [`Rejected`](Self::Rejected) of an unexpected message kind, which foca
/// reports after it has applied the updates the datagram carried.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("membership datagram is empty")]
    Empty,
    #[error("membership datagram is {len} bytes, the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error(
        "peer speaks membership protocol version {found}, this server speaks {MEMBERSHIP_PROTOCOL_VERSION}: upgrade the older one"
    )]
    UnknownVersion { found: u8 },
    #[error("datagram from {from} claims to come from {claimed}")]
    ForgedSender { from: ServerId, claimed: ServerId },
    #[error("membership datagram refused")]
    Rejected(#[source] foca::Error),
    #[error("membership timer failed")]
    Timer(#[source] foca::Error),
    #[error("announce to {to} failed")]
    Announce {
        to: ServerId,
        #[source]
        source: foca::Error,
    },
    #[error("leaving the grid failed")]
    Leave(#[source] foca::Error),
    #[error("membership settings cannot change that way while running")]
    Reconfigure(#[source] foca::Error),
    #[error("membership setting {setting} is invalid: {requirement}")]
    InvalidSetting {
        setting: &'static str,
        requirement: &'static str,
    },
}

/// Timings of the failure detector.
///
/// The base is foca's [`foca::Config::new_lan`] (memberlist's LAN defaults:
/// periodic gossip, telling a member it was declared down, transmissions
/// per update scaled with the grid's size), not `Config::simple()` (no
/// extensions: a healed partition would never merge) nor `new_wan` (5 s
/// probes: too slow for "down within ~10 s"). `new_lan` stretches the
/// suspicion timeout with log10(members) (12 s at 1000); here it is fixed, so
/// detection time does not grow with the grid: the refutation it waits for
/// spreads by gossip every 200 ms, which reaches 1000 members in about
/// log3(1000) ≈ 6.3 rounds, 1.3 s.
///
/// With the defaults on a LAN, a crashed server is first probed within
/// about a second (every member probes one member per period, so N probes a
/// period cover the grid), suspected at the end of that probe's period
/// (~1–3 s after the crash) and down 5 s later, known everywhere within a
/// second or two more: 7–10 s in all in the simulator at 30 to 1000 servers
/// (BENCHMARKS.md).
#[derive(Debug, Clone, PartialEq)]
pub struct MembershipSettings {
    /// How often this server probes one member. 1 s: memberlist's LAN value.
    pub probe_period: Duration,
    /// How long a direct probe may take before indirect probes start. LAN
    /// round trips are well under a millisecond; 500 ms leaves room for a
    /// busy appliance (fsync, VM starts) and for the indirect cycle inside
    /// the period. Must be less than `probe_period`.
    pub probe_rtt: Duration,
    /// Members asked to probe indirectly when a direct probe gets no answer:
    /// 3 routes around one lossy link.
    pub num_indirect_probes: usize,
    /// How long a suspect member may refute before it is declared down.
    /// 5 s: long enough for the suspicion to reach it and its refutation to
    /// come back by gossip in a grid of a thousand (see above).
    pub suspect_to_down_after: Duration,
    /// The grid size to plan for; sets how many times each update is
    /// piggybacked: 4·log10(n+1) (12 at 1000), but at least 10 (see
    /// `MIN_TRANSMISSIONS`), so it matters from about 316 servers on. It is
    /// the only setting the grid size changes: the suspicion timeout and the
    /// gossip fan-out stay fixed (see above). `node.rs` keeps it at the
    /// number of servers in the grid through
    /// [`Membership::set_expected_members`].
    pub expected_members: u32,
    /// How often pending updates are gossiped, and to how many members.
    /// Nothing is sent when there is no news, so this costs nothing in a
    /// quiet grid. 200 ms × 3: memberlist's LAN value.
    pub gossip_period: Duration,
    pub gossip_fanout: usize,
    /// How often to ask one random member for its member list: repairs a
    /// view that missed someone. 30 s: memberlist's LAN value.
    pub announce_period: Duration,
    /// How often to announce to two members believed down. This is what
    /// merges the two sides of a healed partition (each side holds the other
    /// down), and how a member that missed the gossip of another's restart
    /// (it happens: one of 999 in a simulated restart) learns it; 15 s bounds
    /// that wait, and costs one small datagram per member per 15 s while
    /// some member is down.
    pub announce_to_down_period: Duration,
    /// While no member answers (a cold start with the others down, or a
    /// server cut off from everyone), announce again this often.
    pub rejoin_period: Duration,
    /// How many known members a join (or a rejoin) announces to at once. Each
    /// answer carries up to ~30 members, and the discovery sweep reaches the
    /// rest; 5 still joins when four of them are down.
    pub join_fanout: usize,
    /// The largest datagram sent or accepted, envelope included. 1,178
    /// bytes is what QUIC carries in one datagram on any path (its minimum
    /// 1,200-byte packet less headers and tag), measured with quinn here
    /// (DESIGN.md section 10).
    pub max_datagram_size: usize,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            num_indirect_probes: 3,
            suspect_to_down_after: Duration::from_secs(5),
            expected_members: 100,
            gossip_period: Duration::from_millis(200),
            gossip_fanout: 3,
            announce_period: Duration::from_secs(30),
            announce_to_down_period: Duration::from_secs(15),
            rejoin_period: Duration::from_secs(5),
            join_fanout: 5,
            max_datagram_size: 1_178,
        }
    }
}

impl MembershipSettings {
    fn foca_config(&self) -> Result<foca::Config, MembershipError> {
        let invalid = |setting, requirement| MembershipError::InvalidSetting {
            setting,
            requirement,
        };
        let positive = |setting, value: Duration| {
            if value.is_zero() {
                Err(invalid(setting, "must be more than zero"))
            } else {
                Ok(value)
            }
        };
        let non_zero = |setting, value: usize| {
            NonZeroUsize::new(value).ok_or_else(|| invalid(setting, "must be at least 1"))
        };
        positive("probe_period", self.probe_period)?;
        positive("probe_rtt", self.probe_rtt)?;
        if self.probe_rtt >= self.probe_period {
            return Err(invalid("probe_rtt", "must be less than probe_period"));
        }
        if self.max_datagram_size < MIN_DATAGRAM_SIZE {
            return Err(invalid("max_datagram_size", "must be at least 512 bytes"));
        }
        non_zero("join_fanout", self.join_fanout)?;
        positive("rejoin_period", self.rejoin_period)?;

        let expected = NonZeroU32::new(self.expected_members.max(1)).unwrap_or(NonZeroU32::MIN);
        let mut config = foca::Config::new_lan(expected);
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.num_indirect_probes = non_zero("num_indirect_probes", self.num_indirect_probes)?;
        config.suspect_to_down_after =
            positive("suspect_to_down_after", self.suspect_to_down_after)?;
        config.max_packet_size =
            non_zero("max_datagram_size", self.max_datagram_size - ENVELOPE_LEN)?;
        config.max_transmissions = config
            .max_transmissions
            .max(NonZeroU8::new(MIN_TRANSMISSIONS).unwrap_or(NonZeroU8::MIN));
        config.notify_down_members = true;
        config.periodic_gossip = Some(PeriodicParams {
            frequency: positive("gossip_period", self.gossip_period)?,
            num_members: non_zero("gossip_fanout", self.gossip_fanout)?,
        });
        config.periodic_announce = Some(PeriodicParams {
            frequency: positive("announce_period", self.announce_period)?,
            num_members: NonZeroUsize::MIN,
        });
        config.periodic_announce_to_down_members = Some(PeriodicParams {
            frequency: positive("announce_to_down_period", self.announce_to_down_period)?,
            num_members: NonZeroUsize::MIN.saturating_add(1),
        });
        Ok(config)
    }
}

type SwimFoca = Foca<MemberId, PostcardCodec, StdRng, NoCustomBroadcast>;

/// A server to announce to.
type Target = (ServerId, SocketAddr);

/// Announces the discovery sweep sends per gossip period (see
/// [`Membership::join_known`]): 10 every 200 ms is 50 small datagrams a second
/// and their answers, for a few seconds after a start.
const SWEEP_BATCH: usize = 10;

/// Passes of the discovery sweep, `rejoin_period` apart. An announce or its
/// answer can be lost; a member stays unseen after three passes only if all
/// three round trips failed (1 in 1,000 at 10% round-trip loss), and even
/// then learns of us from its own probe round or a periodic announce. One
/// pass left a restarted server short of a few members for over a minute at
/// 5% loss in a simulated grid of a thousand.
const SWEEP_PASSES: u8 = 3;

/// What the view holds about a member: its status and foca's incarnation of
/// it, which tells whether an update can change anything.
#[derive(Debug, Clone, Copy)]
struct ViewEntry {
    status: MemberStatus,
    incarnation: foca::Incarnation,
}

/// Which members an input may have changed.
enum Touched {
    None,
    /// These servers (unsorted, maybe repeated).
    Some(Vec<ServerId>),
    /// Anything: compare every member.
    All,
}

impl Touched {
    fn add(&mut self, server: ServerId) {
        match self {
            Self::None => *self = Self::Some(vec![server]),
            Self::Some(servers) => servers.push(server),
            Self::All => {}
        }
    }
}

/// The membership of one server: foca, its outputs, and the view of every
/// member's state.
pub struct Membership {
    foca: SwimFoca,
    runtime: AccumulatingRuntime<MemberId>,
    settings: MembershipSettings,
    /// Picks whom to announce to (foca has its own, seeded from the same seed).
    rng: StdRng,
    /// Looked up for every member a datagram names, so hashed; whatever
    /// leaves this module is sorted.
    view: HashMap<ServerId, ViewEntry>,
    /// Servers in `view` that are Alive, sorted.
    alive: Vec<ServerId>,
    /// Every server we may announce to: given to `join_known` or seen.
    known: BTreeMap<ServerId, SocketAddr>,
    rejoin_pending: bool,
    /// Known servers the current pass of the discovery sweep has still to
    /// announce to.
    sweep: Vec<(ServerId, SocketAddr)>,
    sweep_passes_left: u8,
    sweep_pending: bool,
    /// foca is in touch with the grid (from its Active / Idle / Rejoin /
    /// Defunct notifications; foca does not expose it).
    connected: bool,
    outputs: Vec<MembershipOutput>,
}

impl fmt::Debug for Membership {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Membership")
            .field("identity", self.foca.identity())
            .field("members", &self.view.len())
            .field("alive", &self.alive.len())
            .field("connected", &self.connected)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// A server that knows nobody yet; call [`join_known`](Self::join_known)
    /// next. `seed` drives every random choice (tests fix it).
    pub fn new(
        own: MemberId,
        settings: MembershipSettings,
        seed: u64,
    ) -> Result<Self, MembershipError> {
        let config = settings.foca_config()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let foca_rng = StdRng::seed_from_u64(rng.next_u64());
        Ok(Self {
            foca: Foca::new(own, config, foca_rng, PostcardCodec),
            runtime: AccumulatingRuntime::new(),
            settings,
            rng,
            view: HashMap::new(),
            alive: Vec::new(),
            known: BTreeMap::new(),
            rejoin_pending: false,
            sweep: Vec::new(),
            sweep_passes_left: 0,
            sweep_pending: false,
            connected: false,
            outputs: Vec::new(),
        })
    }

    /// This server's current identity (its generation grows on a rejoin).
    pub fn identity(&self) -> &MemberId {
        self.foca.identity()
    }

    pub fn settings(&self) -> &MembershipSettings {
        &self.settings
    }

    /// Plans for a grid of `n_servers` servers (this one included) from now
    /// on: [`MembershipSettings::expected_members`], and with it how many
    /// times each update is piggybacked. Call it when the grid grows or
    /// shrinks; a call with the current size changes nothing.
    pub fn set_expected_members(&mut self, n_servers: u32) -> Result<(), MembershipError> {
        if n_servers == self.settings.expected_members {
            return Ok(());
        }
        let settings = MembershipSettings {
            expected_members: n_servers,
            ..self.settings.clone()
        };
        self.foca
            .set_config(settings.foca_config()?)
            .map_err(MembershipError::Reconfigure)?;
        self.settings = settings;
        Ok(())
    }

    /// Whether some member answers (foca's Active, until Idle or a rejoin).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Asks `server` at `address` for its member list (SWIM's join). The
    /// answer, if any, arrives as a datagram.
    pub fn announce(
        &mut self,
        server: ServerId,
        address: SocketAddr,
        now_ms: u64,
    ) -> Result<(), MembershipError> {
        let result = self
            .foca
            .announce(MemberId::any_generation(server, address), &mut self.runtime)
            .map_err(|source| MembershipError::Announce { to: server, source });
        self.after_input(Touched::None, now_ms);
        result
    }

    /// Joins the grid through the servers it is known to have (from the grid
    /// state). Call it at start and whenever servers are added to the grid.
    ///
    /// It announces at once to up to [`MembershipSettings::join_fanout`] of
    /// them, chosen at random, and again every
    /// [`MembershipSettings::rejoin_period`] while nobody answers. Then a
    /// discovery sweep announces to every known server not seen yet, a few
    /// every gossip period, in up to three passes: SWIM
    /// alone tells a newcomer about a quiet member only when that member's
    /// probe round reaches it (up to one probe period per member) or it
    /// shows up in an answer (~30 random members each), so without the sweep
    /// a server restarted into a grid of a thousand took minutes to see
    /// everyone (in the simulator).
    pub fn join_known(
        &mut self,
        known: impl IntoIterator<Item = (ServerId, SocketAddr)>,
        now_ms: u64,
    ) -> Result<(), MembershipError> {
        let own = self.identity().server;
        self.known
            .extend(known.into_iter().filter(|(server, _)| *server != own));
        let result = self.announce_to_known(now_ms);
        self.schedule_rejoin();
        self.sweep_passes_left = SWEEP_PASSES;
        self.start_sweep_pass();
        self.schedule_sweep();
        result
    }

    /// Handles one datagram that arrived on the connection authenticated as
    /// `from`. A refused datagram is logged at debug level and its error
    /// returned, so the caller may count it; it is never a reason to close
    /// the connection.
    pub fn handle_datagram(
        &mut self,
        from: ServerId,
        datagram: &[u8],
        now_ms: u64,
    ) -> Result<(), MembershipError> {
        let (result, touched) = match self.check_datagram(from, datagram) {
            Ok((payload, touched)) => (
                self.foca
                    .handle_data(payload, &mut self.runtime)
                    .map_err(MembershipError::Rejected),
                touched,
            ),
            Err(error) => (Err(error), Touched::None),
        };
        if let Err(error) = &result {
            tracing::debug!(
                peer = %from,
                len = datagram.len(),
                error = %crate::error_chain(error),
                "membership datagram dropped"
            );
        }
        self.after_input(touched, now_ms);
        result
    }

    /// Checks the envelope and the claimed sender; returns foca's payload and
    /// the members it may change.
    fn check_datagram<'a>(
        &self,
        from: ServerId,
        datagram: &'a [u8],
    ) -> Result<(&'a [u8], Touched), MembershipError> {
        let max = self.settings.max_datagram_size;
        let (&version, payload) = datagram.split_first().ok_or(MembershipError::Empty)?;
        if datagram.len() > max {
            return Err(MembershipError::TooLarge {
                len: datagram.len(),
                max,
            });
        }
        if version != MEMBERSHIP_PROTOCOL_VERSION {
            return Err(MembershipError::UnknownVersion { found: version });
        }
        // foca's packet is decoded twice, here and in foca: the price of
        // checking the claimed sender before foca believes anything in it,
        // and of knowing which members the packet can change (comparing all
        // of them after every datagram made a simulated grid of a thousand
        // spend most of its time here).
        let mut rest = payload;
        let header = foca::Codec::<MemberId>::decode_header(&mut PostcardCodec, &mut rest)
            .map_err(|error| MembershipError::Rejected(foca::Error::Decode(Box::new(error))))?;
        if header.src.server != from {
            return Err(MembershipError::ForgedSender {
                from,
                claimed: header.src.server,
            });
        }
        let mut touched = Touched::None;
        if self.may_change(&header.src, header.src_incarnation, foca::State::Alive) {
            touched.add(header.src.server);
        }
        if rest.len() >= 2 && header.message != foca::Message::Broadcast {
            let count = u16::from_be_bytes([rest[0], rest[1]]);
            rest = &rest[2..];
            for _ in 0..count {
                match foca::Codec::<MemberId>::decode_member(&mut PostcardCodec, &mut rest) {
                    Ok(member) => {
                        if self.may_change(member.id(), member.incarnation(), member.state()) {
                            touched.add(member.id().server);
                        }
                    }
                    // foca will refuse the packet; compare everything anyway.
                    Err(_) => return Ok((payload, Touched::All)),
                }
            }
        }
        Ok((payload, touched))
    }

    /// Whether foca could change its record of `identity`'s server on
    /// learning (`incarnation`, `state`): SWIM's rules (section 4.2 of the
    /// paper, foca's `Member::can_change`) say no when the view holds the
    /// same identity Down, or in the same state with an incarnation at least
    /// as high, or a newer identity. Erring towards "yes" only costs a
    /// comparison.
    fn may_change(
        &self,
        identity: &MemberId,
        incarnation: foca::Incarnation,
        state: foca::State,
    ) -> bool {
        if identity.server == self.identity().server {
            // About us: foca handles it, and says so if it rejoins.
            return false;
        }
        let Some(entry) = self.view.get(&identity.server) else {
            return true;
        };
        let known = &entry.status;
        if known.identity != *identity {
            return !foca::Identity::win_addr_conflict(&known.identity, identity);
        }
        known.state != MemberState::Down
            && !(known.state == MemberState::from(state) && incarnation <= entry.incarnation)
    }

    /// Handles a timer given earlier in [`MembershipOutput::ScheduleTimer`].
    pub fn handle_timer(
        &mut self,
        timer: MembershipTimer,
        now_ms: u64,
    ) -> Result<(), MembershipError> {
        match timer.0 {
            TimerKind::Swim(timer) => {
                let result = self
                    .foca
                    .handle_timer(timer, &mut self.runtime)
                    .map_err(MembershipError::Timer);
                if let Err(error) = &result {
                    tracing::warn!(error = %crate::error_chain(error), "membership timer failed");
                }
                // A timer changes a member without foca saying so only when
                // a probe failed, and then foca schedules the suspect's
                // deadline: `after_input` looks for that.
                self.after_input(Touched::None, now_ms);
                result
            }
            TimerKind::Rejoin => {
                self.rejoin_pending = false;
                if self.connected {
                    return Ok(());
                }
                tracing::debug!(
                    known = self.known.len(),
                    "not in touch with the grid; announcing again"
                );
                let result = self.announce_to_known(now_ms);
                self.schedule_rejoin();
                result
            }
            TimerKind::Sweep => {
                self.sweep_pending = false;
                if self.sweep.is_empty() {
                    self.start_sweep_pass();
                }
                let mut batch = Vec::with_capacity(SWEEP_BATCH);
                while batch.len() < SWEEP_BATCH {
                    let Some((server, address)) = self.sweep.pop() else {
                        break;
                    };
                    if !self.view.contains_key(&server) {
                        batch.push((server, address));
                    }
                }
                let result = self.announce_all(batch, now_ms);
                self.schedule_sweep();
                result
            }
        }
    }

    /// Tells the grid this server is leaving (a clean shutdown), so the
    /// others mark it down at once instead of after the suspicion timeout.
    /// The membership answers nothing afterwards; a restart uses a new
    /// generation.
    pub fn leave(&mut self, now_ms: u64) -> Result<(), MembershipError> {
        let result = self
            .foca
            .leave_cluster(&mut self.runtime)
            .map_err(MembershipError::Leave);
        self.sweep.clear();
        self.sweep_passes_left = 0;
        self.after_input(Touched::None, now_ms);
        result
    }

    /// A hint from outside SWIM's own probes (the broker's reservation to
    /// `server` got no answer in time): if the member is alive, it becomes
    /// suspect now, as if a probe had failed, and the suspicion is gossiped.
    /// A member that is in fact alive refutes it within a probe round or
    /// two; one that is gone is declared down after the suspicion timeout
    /// instead of after its next failed probe. Returns whether the member
    /// was alive and is now suspect.
    pub fn suspect(&mut self, server: ServerId, now_ms: u64) -> Result<bool, MembershipError> {
        let alive = self
            .foca
            .iter_membership_state()
            .find(|member| member.id().server == server && member.state() == foca::State::Alive)
            .map(|member| (*member.id(), member.incarnation()));
        let Some((identity, incarnation)) = alive else {
            return Ok(false);
        };
        let result = self
            .foca
            .apply_many(
                std::iter::once(foca::Member::new(
                    identity,
                    incarnation,
                    foca::State::Suspect,
                )),
                true,
                &mut self.runtime,
            )
            .map_err(MembershipError::Rejected);
        self.after_input(Touched::Some(vec![server]), now_ms);
        result.map(|()| true)
    }

    /// Everything to do since the last call, in order.
    pub fn take_outputs(&mut self) -> Vec<MembershipOutput> {
        std::mem::take(&mut self.outputs)
    }

    /// The state of every member ever seen, this server excluded.
    pub fn members(&self) -> BTreeMap<ServerId, MemberState> {
        self.view
            .iter()
            .map(|(server, entry)| (*server, entry.status.state))
            .collect()
    }

    /// What is known about one member.
    pub fn member(&self, server: ServerId) -> Option<&MemberStatus> {
        self.view.get(&server).map(|entry| &entry.status)
    }

    /// Every member's status, in server order.
    pub fn statuses(&self) -> Vec<(ServerId, MemberStatus)> {
        let mut statuses: Vec<(ServerId, MemberStatus)> = self
            .view
            .iter()
            .map(|(server, entry)| (*server, entry.status))
            .collect();
        statuses.sort_unstable_by_key(|(server, _)| *server);
        statuses
    }

    /// Membership updates still waiting to be piggybacked (foca's backlog):
    /// zero in a quiet grid.
    pub fn pending_updates(&self) -> usize {
        self.foca.updates_backlog()
    }

    /// Members that are Alive (not Suspect, not Down), sorted: whom to push
    /// changes to and pull from.
    pub fn alive_peers(&self) -> &[ServerId] {
        &self.alive
    }

    /// Announces to up to `join_fanout` known members chosen at random, half
    /// among those believed Alive (they answer, which reconnects us) and half
    /// among the others (after a partition, the far side: it learns our
    /// identity from the announce itself).
    fn announce_to_known(&mut self, now_ms: u64) -> Result<(), MembershipError> {
        let fanout = self.settings.join_fanout;
        let (alive, others): (Vec<Target>, Vec<Target>) = self
            .known
            .iter()
            .map(|(server, address)| (*server, *address))
            .partition(|(server, _)| self.alive.binary_search(server).is_ok());
        let from_alive = if others.is_empty() {
            fanout
        } else {
            fanout.div_ceil(2)
        };
        let mut chosen = alive.into_iter().choose_multiple(&mut self.rng, from_alive);
        let rest = fanout.saturating_sub(chosen.len());
        chosen.extend(others.into_iter().choose_multiple(&mut self.rng, rest));
        self.announce_all(chosen, now_ms)
    }

    fn announce_all(
        &mut self,
        targets: Vec<(ServerId, SocketAddr)>,
        now_ms: u64,
    ) -> Result<(), MembershipError> {
        let mut first_error = Ok(());
        for (server, address) in targets {
            let result = self
                .foca
                .announce(MemberId::any_generation(server, address), &mut self.runtime);
            if let Err(source) = result {
                if first_error.is_ok() {
                    first_error = Err(MembershipError::Announce { to: server, source });
                }
            }
        }
        self.after_input(Touched::None, now_ms);
        first_error
    }

    fn schedule_rejoin(&mut self) {
        if !self.rejoin_pending && !self.known.is_empty() {
            self.rejoin_pending = true;
            self.outputs.push(MembershipOutput::ScheduleTimer {
                after: self.settings.rejoin_period,
                timer: MembershipTimer(TimerKind::Rejoin),
            });
        }
    }

    /// The next pass of the discovery sweep: every known server not seen
    /// yet, in random order.
    fn start_sweep_pass(&mut self) {
        if self.sweep_passes_left == 0 {
            return;
        }
        self.sweep_passes_left -= 1;
        let mut unseen: Vec<Target> = self
            .known
            .iter()
            .filter(|(server, _)| !self.view.contains_key(*server))
            .map(|(server, address)| (*server, *address))
            .collect();
        unseen.shuffle(&mut self.rng);
        self.sweep = unseen;
    }

    fn schedule_sweep(&mut self) {
        if self.sweep_pending {
            return;
        }
        let after = if !self.sweep.is_empty() {
            self.settings.gossip_period
        } else if self.sweep_passes_left > 0
            && self
                .known
                .keys()
                .any(|server| !self.view.contains_key(server))
        {
            self.settings.rejoin_period
        } else {
            return;
        };
        self.sweep_pending = true;
        self.outputs.push(MembershipOutput::ScheduleTimer {
            after,
            timer: MembershipTimer(TimerKind::Sweep),
        });
    }

    /// Moves foca's outputs to ours and brings the view up to date.
    fn after_input(&mut self, mut touched: Touched, now_ms: u64) {
        while let Some((to, data)) = self.runtime.to_send() {
            let mut bytes = Vec::with_capacity(ENVELOPE_LEN + data.len());
            bytes.push(MEMBERSHIP_PROTOCOL_VERSION);
            bytes.extend_from_slice(&data);
            self.outputs.push(MembershipOutput::Send { to, bytes });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            if let Timer::ChangeSuspectToDown { member_id, .. } = &timer {
                // A probe failed: the member is suspect now.
                touched.add(member_id.server);
            }
            self.outputs.push(MembershipOutput::ScheduleTimer {
                after,
                timer: MembershipTimer(TimerKind::Swim(timer)),
            });
        }
        let mut rejoined = false;
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(member) | OwnedNotification::MemberDown(member) => {
                    touched.add(member.server);
                }
                OwnedNotification::Rename(_, member) => touched.add(member.server),
                OwnedNotification::Idle => {
                    tracing::info!("no member of the grid answers");
                    self.connected = false;
                    self.schedule_rejoin();
                }
                OwnedNotification::Active => {
                    tracing::info!("in touch with the grid");
                    self.connected = true;
                }
                OwnedNotification::Rejoin(identity) => {
                    tracing::info!(%identity, "declared down by the grid; rejoining as a new generation");
                    self.connected = false;
                    rejoined = true;
                }
                OwnedNotification::Defunct => {
                    tracing::warn!("declared down by the grid and cannot rejoin");
                    self.connected = false;
                }
            }
        }
        self.refresh_view(touched, now_ms);
        #[cfg(debug_assertions)]
        self.assert_view_matches_foca();
        if rejoined {
            // After a rejoin foca stops its timers and waits to be addressed
            // under its new identity, while its peers still address the old
            // one, which it ignores; foca's own gossip of the new identity
            // goes to peers addressed by their identity, which ignore it in
            // turn if they are rejoining too. When a healed partition makes
            // every member rejoin at once, the grid deadlocks: no one sends,
            // no one listens (seen in the simulator). An announce is
            // accepted under any generation of its receiver, and its answer
            // reconnects foca, so announce at once, and again while not
            // connected.
            if let Err(error) = self.announce_to_known(now_ms) {
                tracing::debug!(error = %crate::error_chain(&error), "announce after a rejoin failed");
            }
            self.schedule_rejoin();
        }
    }

    /// Debug builds check after every input that skipping members `may_change`
    /// ruled out missed nothing: the view must say what foca says.
    #[cfg(debug_assertions)]
    fn assert_view_matches_foca(&self) {
        let own = self.foca.identity().server;
        for member in self.foca.iter_membership_state() {
            if member.id().server == own {
                continue;
            }
            let status = self.view.get(&member.id().server).map(|entry| entry.status);
            assert_eq!(
                status.map(|status| (status.identity, status.state)),
                Some((*member.id(), MemberState::from(member.state()))),
                "the membership view missed a change"
            );
        }
    }

    /// Compares foca's record of the touched members with the view; records
    /// and announces changes, in server order.
    fn refresh_view(&mut self, touched: Touched, now_ms: u64) {
        let touched = match touched {
            Touched::None => return,
            Touched::Some(mut servers) => {
                servers.sort_unstable();
                servers.dedup();
                Some(servers)
            }
            Touched::All => None,
        };
        let own = self.foca.identity().server;
        let mut events = Vec::new();
        for member in self.foca.iter_membership_state() {
            let identity = *member.id();
            if identity.server == own {
                // An older identity of ours, which foca keeps as down.
                continue;
            }
            if touched
                .as_ref()
                .is_some_and(|servers| servers.binary_search(&identity.server).is_err())
            {
                continue;
            }
            let state = MemberState::from(member.state());
            let incarnation = member.incarnation();
            let status = MemberStatus {
                identity,
                state,
                since_ms: now_ms,
            };
            match self.view.entry(identity.server) {
                Entry::Vacant(vacant) => {
                    vacant.insert(ViewEntry {
                        status,
                        incarnation,
                    });
                }
                Entry::Occupied(mut occupied) => {
                    let entry = occupied.get_mut();
                    entry.incarnation = incarnation;
                    if entry.status.identity == identity && entry.status.state == state {
                        continue;
                    }
                    entry.status = status;
                }
            }
            events.push(MemberEvent {
                server: identity.server,
                state,
                identity,
            });
        }
        events.sort_by_key(|event| event.server);
        for event in events {
            self.known.insert(event.server, event.identity.address);
            match (self.alive.binary_search(&event.server), event.state) {
                (Err(position), MemberState::Alive) => self.alive.insert(position, event.server),
                (Ok(position), MemberState::Suspect | MemberState::Down) => {
                    self.alive.remove(position);
                }
                _ => {}
            }
            match event.state {
                MemberState::Alive => tracing::debug!(member = %event.identity, "member alive"),
                MemberState::Suspect => {
                    tracing::debug!(member = %event.identity, "member suspect")
                }
                MemberState::Down => tracing::info!(member = %event.identity, "member down"),
            }
            self.outputs.push(MembershipOutput::Notify(event));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use foca::Identity as _;

    use super::*;

    fn server(byte: u8) -> ServerId {
        ServerId::from_bytes([byte; 16])
    }

    fn member(byte: u8, generation: u64) -> MemberId {
        MemberId::new(
            server(byte),
            SocketAddr::from(([10, 0, 0, byte], 7001)),
            generation,
        )
    }

    #[test]
    fn renew_bumps_the_generation_and_the_higher_generation_wins() {
        let old = member(1, 7);
        let new = old.renew().expect("generation 7 has a successor");
        assert_eq!(new.generation, 8);
        assert_eq!(new.addr(), old.addr());
        assert!(new.win_addr_conflict(&old));
        assert!(!old.win_addr_conflict(&new));

        let elsewhere = MemberId {
            address: SocketAddr::from(([10, 0, 0, 99], 7001)),
            ..old
        };
        assert!(
            elsewhere.win_addr_conflict(&old) != old.win_addr_conflict(&elsewhere),
            "exactly one of two equal generations wins"
        );
        assert_eq!(
            MemberId {
                generation: u64::MAX,
                ..old
            }
            .renew(),
            None
        );
    }

    fn transmissions(settings: &MembershipSettings) -> u8 {
        settings.foca_config().unwrap().max_transmissions.get()
    }

    #[test]
    fn transmissions_per_update_follow_the_expected_grid_size() {
        let with = |expected_members| MembershipSettings {
            expected_members,
            ..MembershipSettings::default()
        };
        // Small grids get the floor; 4·log10(n+1) takes over above ~316.
        assert_eq!(transmissions(&with(1)), MIN_TRANSMISSIONS);
        assert_eq!(transmissions(&with(3)), MIN_TRANSMISSIONS);
        assert_eq!(transmissions(&with(300)), MIN_TRANSMISSIONS);
        assert_eq!(transmissions(&with(1_000)), 12);
        assert_eq!(transmissions(&with(100_000)), 20);
        // Timeouts and fan-out stay fixed on purpose (see MembershipSettings).
        let (small, large) = (
            with(0).foca_config().unwrap(),
            with(100_000).foca_config().unwrap(),
        );
        assert_eq!(small.suspect_to_down_after, large.suspect_to_down_after);
        assert_eq!(small.probe_period, large.probe_period);
        assert_eq!(
            small.periodic_gossip.map(|gossip| gossip.num_members),
            large.periodic_gossip.map(|gossip| gossip.num_members)
        );
    }

    #[test]
    fn the_expected_grid_size_changes_while_running() {
        let mut membership =
            Membership::new(member(1, 1), MembershipSettings::default(), 7).unwrap();
        membership
            .join_known([(server(2), member(2, 0).address)], 0)
            .unwrap();
        let before = membership.take_outputs();
        assert!(!before.is_empty(), "joining announces");

        membership.set_expected_members(3).unwrap();
        assert_eq!(membership.settings().expected_members, 3);
        membership.set_expected_members(2_000).unwrap();
        assert_eq!(membership.settings().expected_members, 2_000);
        assert_eq!(transmissions(membership.settings()), 13);
        assert!(
            membership.take_outputs().is_empty(),
            "a new size sends and schedules nothing by itself"
        );
        // foca took the new configuration and keeps working with it.
        membership
            .announce(server(3), member(3, 0).address, 10)
            .unwrap();
        assert!(!membership.take_outputs().is_empty());
    }

    #[test]
    fn invalid_settings_are_refused_by_name() {
        let settings = MembershipSettings {
            probe_rtt: Duration::from_secs(2),
            ..MembershipSettings::default()
        };
        let error = Membership::new(member(1, 1), settings, 0).unwrap_err();
        assert!(
            matches!(
                error,
                MembershipError::InvalidSetting {
                    setting: "probe_rtt",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn bad_datagrams_are_errors_not_panics() {
        let mut membership =
            Membership::new(member(1, 1), MembershipSettings::default(), 1).unwrap();
        let from = server(2);
        assert!(matches!(
            membership.handle_datagram(from, &[], 0),
            Err(MembershipError::Empty)
        ));
        assert!(matches!(
            membership.handle_datagram(from, &[2, 0, 0], 0),
            Err(MembershipError::UnknownVersion { found: 2 })
        ));
        assert!(matches!(
            membership.handle_datagram(from, &vec![1; 5000], 0),
            Err(MembershipError::TooLarge { len: 5000, .. })
        ));
        for garbage in [&[1u8][..], &[1, 0xff, 0xff, 0xff], &[1, 16, 1, 2, 3]] {
            assert!(matches!(
                membership.handle_datagram(from, garbage, 0),
                Err(MembershipError::Rejected(_))
            ));
        }
        assert!(membership.members().is_empty());
    }

    #[test]
    fn a_datagram_must_come_from_the_server_it_names() {
        let mut alice = Membership::new(member(1, 1), MembershipSettings::default(), 1).unwrap();
        let mut bob = Membership::new(member(2, 1), MembershipSettings::default(), 2).unwrap();
        alice.announce(server(2), member(2, 0).address, 0).unwrap();
        let bytes = alice
            .take_outputs()
            .into_iter()
            .find_map(|output| match output {
                MembershipOutput::Send { bytes, .. } => Some(bytes),
                _ => None,
            })
            .expect("an announce sends a datagram");
        assert_eq!(bytes[0], MEMBERSHIP_PROTOCOL_VERSION);
        let error = bob.handle_datagram(server(3), &bytes, 0).unwrap_err();
        assert!(
            matches!(error, MembershipError::ForgedSender { from, claimed } if from == server(3) && claimed == server(1)),
            "{error}"
        );
        assert!(
            bob.members().is_empty(),
            "a forged datagram teaches nothing"
        );
        bob.handle_datagram(server(1), &bytes, 0).unwrap();
        assert_eq!(
            bob.members(),
            BTreeMap::from([(server(1), MemberState::Alive)])
        );
    }

    /// A tiny deterministic network in virtual time: every datagram arrives
    /// 1 ms after it is sent, unless its receiver is stopped by then.
    struct TestGrid {
        nodes: Vec<Option<Membership>>,
        /// Bumped on every start and stop: what was queued for an earlier
        /// process of a server is dropped.
        epochs: Vec<u64>,
        queue: BinaryHeap<Reverse<Scheduled>>,
        seq: u64,
        now_ms: u64,
        /// (time, observer, event), in order.
        events: Vec<(u64, usize, MemberEvent)>,
    }

    #[derive(Debug)]
    struct Scheduled {
        at_ms: u64,
        seq: u64,
        to: usize,
        epoch: u64,
        pending: Pending,
    }

    #[derive(Debug)]
    enum Pending {
        Datagram { from: ServerId, bytes: Vec<u8> },
        Timer(MembershipTimer),
    }

    impl PartialEq for Scheduled {
        fn eq(&self, other: &Self) -> bool {
            (self.at_ms, self.seq) == (other.at_ms, other.seq)
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
            (self.at_ms, self.seq).cmp(&(other.at_ms, other.seq))
        }
    }

    /// Whom a starting server knows.
    #[derive(Debug, Clone, Copy)]
    enum Join {
        Nobody,
        /// Server 0 (server 1 for server 0): as after a join that handed it
        /// the grid state.
        Seed,
        /// Every other server: a restart with the grid state on disk.
        Everyone,
    }

    impl TestGrid {
        fn empty(n: usize) -> Self {
            Self {
                nodes: (0..n).map(|_| None).collect(),
                epochs: vec![0; n],
                queue: BinaryHeap::new(),
                seq: 0,
                now_ms: 0,
                events: Vec::new(),
            }
        }

        /// `n` servers; each joins through server 0 (server 0 through 1),
        /// as after a join that handed them the grid state.
        fn new(n: usize) -> Self {
            let mut grid = Self::empty(n);
            for index in 0..n {
                grid.start(index, 1, Join::Seed);
            }
            grid
        }

        fn start(&mut self, index: usize, generation: u64, join: Join) {
            let byte = u8::try_from(index).unwrap();
            let mut membership = Membership::new(
                member(byte, generation),
                MembershipSettings::default(),
                generation * 1000 + u64::from(byte),
            )
            .unwrap();
            let known: Vec<u8> = match join {
                Join::Nobody => Vec::new(),
                Join::Seed => vec![u8::from(index == 0)],
                Join::Everyone => (0..self.nodes.len())
                    .map(|other| u8::try_from(other).unwrap())
                    .filter(|other| *other != byte)
                    .collect(),
            };
            if !known.is_empty() {
                membership
                    .join_known(
                        known
                            .into_iter()
                            .map(|other| (server(other), member(other, 0).address)),
                        self.now_ms,
                    )
                    .unwrap();
            }
            self.epochs[index] += 1;
            self.nodes[index] = Some(membership);
            self.drain(index);
        }

        fn stop(&mut self, index: usize) {
            self.nodes[index] = None;
            self.epochs[index] += 1;
        }

        fn push(&mut self, at_ms: u64, to: usize, pending: Pending) {
            self.seq += 1;
            self.queue.push(Reverse(Scheduled {
                at_ms,
                seq: self.seq,
                to,
                epoch: self.epochs[to],
                pending,
            }));
        }

        fn drain(&mut self, index: usize) {
            let Some(membership) = self.nodes[index].as_mut() else {
                return;
            };
            let from = membership.identity().server;
            for output in membership.take_outputs() {
                match output {
                    MembershipOutput::Send { to, bytes } => {
                        let to = usize::from(to.server.as_bytes()[0]);
                        self.push(self.now_ms + 1, to, Pending::Datagram { from, bytes });
                    }
                    MembershipOutput::ScheduleTimer { after, timer } => {
                        let at_ms = self.now_ms + u64::try_from(after.as_millis()).unwrap();
                        self.push(at_ms, index, Pending::Timer(timer));
                    }
                    MembershipOutput::Notify(event) => {
                        self.events.push((self.now_ms, index, event));
                    }
                }
            }
        }

        fn run_until(&mut self, until_ms: u64) {
            while self
                .queue
                .peek()
                .is_some_and(|Reverse(next)| next.at_ms <= until_ms)
            {
                let Reverse(next) = self.queue.pop().unwrap();
                self.now_ms = next.at_ms;
                // A server started after this was queued, or stopped.
                if next.epoch != self.epochs[next.to] {
                    continue;
                }
                let Some(membership) = self.nodes[next.to].as_mut() else {
                    continue;
                };
                match next.pending {
                    Pending::Datagram { from, bytes } => {
                        // Refusals are part of SWIM's life (a member declared
                        // down is told so); the views are what is checked.
                        let _ = membership.handle_datagram(from, &bytes, next.at_ms);
                    }
                    Pending::Timer(timer) => membership.handle_timer(timer, next.at_ms).unwrap(),
                }
                self.drain(next.to);
            }
            self.now_ms = until_ms;
        }

        fn view(&self, observer: usize) -> BTreeMap<ServerId, MemberState> {
            self.nodes[observer].as_ref().unwrap().members()
        }

        /// When `observer` first saw `subject` in `state` after `after_ms`.
        fn first_seen(
            &self,
            observer: usize,
            subject: u8,
            state: MemberState,
            after_ms: u64,
        ) -> Option<u64> {
            self.events
                .iter()
                .find(|(at, seen_by, event)| {
                    *at >= after_ms
                        && *seen_by == observer
                        && event.server == server(subject)
                        && event.state == state
                })
                .map(|(at, ..)| *at)
        }
    }

    #[test]
    fn five_members_find_each_other_detect_a_crash_and_take_it_back() {
        let settings = MembershipSettings::default();
        let mut grid = TestGrid::new(5);

        grid.run_until(2_000);
        for observer in 0..5 {
            let view = grid.view(observer);
            assert_eq!(view.len(), 4, "server {observer} sees {view:?}");
            assert!(
                view.values().all(|state| *state == MemberState::Alive),
                "server {observer} sees {view:?}"
            );
        }

        // Server 3 stops answering. Each other member must see it suspect
        // first, then down, within bounds derived from the settings: the
        // last prober reaches it after a full round of the others, its probe
        // fails at the end of the period, and news spreads in under a second.
        let crashed_at = 10_000;
        grid.run_until(crashed_at);
        grid.stop(3);
        grid.run_until(crashed_at + 30_000);
        let period_ms = u64::try_from(settings.probe_period.as_millis()).unwrap();
        let suspect_bound = crashed_at + 5 * period_ms + 1_000;
        let down_bound = suspect_bound
            + u64::try_from(settings.suspect_to_down_after.as_millis()).unwrap()
            + 1_000;
        for observer in [0, 1, 2, 4] {
            let suspect = grid
                .first_seen(observer, 3, MemberState::Suspect, crashed_at)
                .unwrap_or_else(|| panic!("server {observer} never suspected server 3"));
            let down = grid
                .first_seen(observer, 3, MemberState::Down, crashed_at)
                .unwrap_or_else(|| panic!("server {observer} never saw server 3 down"));
            assert!(
                suspect <= suspect_bound,
                "server {observer} suspected at {suspect} ms"
            );
            assert!(
                suspect < down && down <= down_bound,
                "server {observer} saw it down at {down} ms"
            );
            assert_eq!(grid.view(observer)[&server(3)], MemberState::Down);
        }
        // No one else was hurt.
        for observer in [0, 1, 2, 4] {
            let view = grid.view(observer);
            let alive = view
                .values()
                .filter(|state| **state == MemberState::Alive)
                .count();
            assert_eq!(alive, 3, "server {observer} sees {view:?}");
        }

        // It comes back as a new generation and is alive everywhere again.
        let restarted_at = grid.now_ms;
        grid.start(3, 2, Join::Seed);
        grid.run_until(restarted_at + 3_000);
        for observer in [0, 1, 2, 4] {
            let status = grid.nodes[observer]
                .as_ref()
                .unwrap()
                .member(server(3))
                .copied()
                .unwrap();
            assert_eq!(status.state, MemberState::Alive, "seen by {observer}");
            assert_eq!(status.identity.generation, 2, "seen by {observer}");
        }
        let view = grid.view(3);
        assert_eq!(view.len(), 4);
        assert!(view.values().all(|state| *state == MemberState::Alive));
    }

    #[test]
    fn a_lone_server_keeps_announcing_until_someone_answers() {
        let settings = MembershipSettings::default();
        let rejoin_ms = u64::try_from(settings.rejoin_period.as_millis()).unwrap();
        let mut grid = TestGrid::empty(2);
        // Server 1 knows only server 0, which is not up yet.
        grid.start(1, 1, Join::Seed);
        grid.run_until(3 * rejoin_ms + 100);
        assert!(grid.view(1).is_empty());
        // Server 0 comes up without announcing: only server 1's next
        // rejoin announce can bring them together.
        grid.start(0, 1, Join::Nobody);
        grid.run_until(4 * rejoin_ms + 100);
        assert_eq!(
            grid.view(1),
            BTreeMap::from([(server(0), MemberState::Alive)])
        );
        assert_eq!(
            grid.view(0),
            BTreeMap::from([(server(1), MemberState::Alive)])
        );
    }

    #[test]
    fn a_restarted_server_sweeps_to_every_member_it_has_not_seen() {
        // Big enough that the answers to the first announces (~30 members
        // each) cannot name everyone.
        let n = 100;
        let mut grid = TestGrid::new(n);
        grid.run_until(15_000);
        grid.stop(7);
        grid.run_until(30_000);
        assert_eq!(grid.view(0)[&server(7)], MemberState::Down);

        grid.start(7, 2, Join::Everyone);
        // The sweep announces to 50 a second; the grid is quiet, so little
        // else tells server 7 about the others in that time.
        grid.run_until(30_000 + 3_000);
        let view = grid.view(7);
        let alive = view
            .values()
            .filter(|state| **state == MemberState::Alive)
            .count();
        assert_eq!(alive, n - 1, "server 7 sees {alive} alive");
        let sweeping = grid.nodes[7].as_ref().unwrap().sweep.len();
        assert_eq!(sweeping, 0, "the sweep stops once everyone was seen");
    }
}
