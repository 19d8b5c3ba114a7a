//! The life of one desktop VM on its hosting server, as a pure state machine.
//!
//! **Invariant:** no I/O, no clock, no randomness. Time arrives as `now_ms`
//! inside events; what must happen on the host or in the grid record comes
//! out as [`Effect`]s for the caller to carry out, in the order given.
//!
//! # Phases
//!
//! ```text
//! Provisioning --Defined--> Provisioning(defined) --Booted--> Booting --AgentHello--> Ready
//! Ready --Reserve--> Reserved --AgentLogin--> InUse --AgentLogout--> Refreshing (pooled)
//!                        |                      |                 \-> Ready (personal)
//!                        +--Tick (expired)--> Ready
//! InUse, viewer gone for disconnect_grace_ms --Tick--> Refreshing (pooled; LogOff first)
//! Refreshing --RefreshDone--> Booting
//! any live phase --Failed / agent silent / boot timeout--> Regenerating --Regenerated--> Booting
//! Provisioning, or a second failure before the agent said hello again --> Failed (terminal)
//! ```
//!
//! # Decisions
//!
//! - **Exclusivity.** [`Event::Reserve`] succeeds only from `Ready`, so two
//!   reservations can never both succeed: this is the decision the broker
//!   relies on (DESIGN.md principle 5, one authority per VM). A personal VM is
//!   reserved only for its owner; one without an owner yet is bound to the
//!   first user it is reserved for (or who logs in), and keeps that owner.
//! - **The guest is the truth about who is logged in.** A login without a
//!   reservation, for another user than the one reserved, over another
//!   user's session, or on someone else's personal VM is accepted (the record
//!   must say who is really on the desktop) and reported with
//!   [`Effect::ReportLogin`]; the machine itself never hands a VM held by one
//!   user to another.
//! - **No user's disk reaches the next user.** A pooled VM whose session
//!   ended (logout, or disconnect grace ran out) goes to `Refreshing` with
//!   [`Effect::RefreshDisk`]; one that failed is regenerated from the base
//!   image. A pooled VM is `Ready` only with a disk nobody has used.
//! - **Failure.** A failure of a VM that exists is first repaired here: the
//!   VM goes straight to `Regenerating` (recorded as `Provisioning`, so the
//!   planner counts it and does not remove it meanwhile) with
//!   [`Effect::Regenerate`]. If it fails again before its agent says hello,
//!   regeneration does not help (a bad image, a sick host): it rests in
//!   `Failed`, which the planner removes and replaces wherever it sees fit.
//! - **Refusals change nothing.** An event that does not fit the phase is
//!   refused with a [`Refusal`]; the machine is exactly as before.
//! - **Timers start at the first tick.** Events that enter `Booting` or make
//!   the agent speak carry no time; the boot and heartbeat clocks start at the
//!   first [`Event::Tick`] seen afterwards, so they are late by at most one
//!   tick period, never early.

use std::fmt;

use crate::model::{SessionId, TemplateKind, UserName, VmState};

/// Regenerations allowed before the agent says hello again. One: a second
/// failure right after a fresh disk and a fresh boot is not something a
/// third try fixes, and the planner replaces a `Failed` VM on the best host.
pub const MAX_REGENERATIONS_IN_A_ROW: u32 = 1;

/// Timing rules of the lifecycle. Not (yet) part of the replicated
/// [`crate::model::Policy`]: these are this server's own timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecyclePolicy {
    /// Longest a reservation holds a VM for a user who does not log in. Also
    /// the cap on what a broker may ask for in [`Event::Reserve`].
    pub reservation_ttl_ms: u64,
    /// Agent silence after which a VM that said hello is failed.
    pub heartbeat_timeout_ms: u64,
    /// How long a pooled desktop whose viewer went away keeps its session
    /// before the user is logged off and the VM refreshed.
    pub disconnect_grace_ms: u64,
    /// How long a started VM may take to say hello.
    pub boot_timeout_ms: u64,
}

impl Default for LifecyclePolicy {
    fn default() -> Self {
        Self {
            // Long enough for a portal to hand over a ticket and a viewer to
            // start; short enough that an abandoned click frees the VM soon.
            reservation_ttl_ms: 30_000,
            // Three missed heartbeats at the agent's 5-second interval: one
            // lost frame or a busy guest is no failure.
            heartbeat_timeout_ms: 15_000,
            // The grid's `Policy::disconnect_grace_s` default; the desktop
            // service takes the grid's value at every tick.
            disconnect_grace_ms: 3_600_000,
            // A desktop guest under load (a 9 a.m. boot storm) can take
            // minutes; TCG test guests boot in seconds.
            boot_timeout_ms: 300_000,
        }
    }
}

/// Why a VM failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureReason {
    /// The agent said hello, then stopped speaking.
    AgentSilent { silent_for_ms: u64 },
    /// The VM started but its agent never said hello.
    NeverSaidHello { waited_ms: u64 },
    /// The caller saw it fail (the domain crashed, a clone failed).
    Reported { reason: String },
}

impl fmt::Display for FailureReason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::AgentSilent { silent_for_ms } => {
                write!(formatter, "agent silent for {silent_for_ms} ms")
            }
            Self::NeverSaidHello { waited_ms } => {
                write!(formatter, "agent never said hello in {waited_ms} ms")
            }
            Self::Reported { reason } => formatter.write_str(reason),
        }
    }
}

/// Where one VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Its disk is being cloned and its domain defined (`defined` once the
    /// domain exists).
    Provisioning { defined: bool },
    /// Started; waiting for the agent's hello. `since_ms` is the first tick
    /// seen in this phase.
    Booting { since_ms: Option<u64> },
    /// The agent said hello; nobody holds the VM (a personal VM waits for
    /// its owner).
    Ready,
    /// Promised to `user`, who is connecting.
    Reserved { user: UserName, expires_at_ms: u64 },
    /// `user` is logged in. `disconnected_since_ms` when no viewer is
    /// attached.
    InUse {
        user: UserName,
        session: SessionId,
        disconnected_since_ms: Option<u64>,
    },
    /// A pooled VM whose session ended; its disk is being reset.
    Refreshing,
    /// Being rebuilt after a failure.
    Regenerating { reason: FailureReason },
    /// Given up on: the planner removes and replaces it.
    Failed { reason: FailureReason },
}

impl Phase {
    /// The phase in words, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Provisioning { .. } => "provisioning",
            Self::Booting { .. } => "booting",
            Self::Ready => "ready",
            Self::Reserved { .. } => "reserved",
            Self::InUse { .. } => "in use",
            Self::Refreshing => "refreshing",
            Self::Regenerating { .. } => "regenerating",
            Self::Failed { .. } => "failed",
        }
    }
}

/// What can happen to a VM. Each variant says where it is accepted; anywhere
/// else it is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Its domain has been defined. Accepted in `Provisioning`, once.
    Defined,
    /// Its domain has been started. Accepted in `Provisioning` once defined.
    Booted,
    /// The agent announced itself. From `Booting` the VM is `Ready`; in
    /// `Ready`, `Reserved` and `InUse` it is an agent restart and restarts
    /// the heartbeat clock.
    AgentHello,
    /// The agent is alive. Accepted in `Ready`, `Reserved` and `InUse`.
    AgentHeartbeat { now_ms: u64 },
    /// The broker asks for the VM for `user`, for `ttl_ms` (the policy's
    /// `reservation_ttl_ms` when absent, never longer). Accepted only in
    /// `Ready`, and on a personal VM only for its owner.
    Reserve {
        user: UserName,
        now_ms: u64,
        ttl_ms: Option<u64>,
    },
    /// The agent says `user` logged in. Accepted in `Ready`, `Reserved` and
    /// `InUse`; anything unexpected is reported, not refused.
    AgentLogin { user: UserName, session: SessionId },
    /// The agent says `user` logged out of `session`. Accepted in `InUse`
    /// for its current user and session.
    AgentLogout { user: UserName, session: SessionId },
    /// A viewer attached to the display. Accepted in `Reserved` and `InUse`.
    ViewerConnected,
    /// The last viewer detached. Accepted in `Reserved` and `InUse`.
    ViewerDisconnected { now_ms: u64 },
    /// Time passes. Always accepted: expires reservations, fails silent
    /// agents and slow boots, ends pooled sessions past the disconnect grace.
    Tick { now_ms: u64 },
    /// The disk has been reset and the VM started again. Accepted in
    /// `Refreshing`.
    RefreshDone,
    /// The caller saw the VM fail. Accepted everywhere but `Failed`.
    Failed { reason: String },
    /// The VM has been rebuilt and started again. Accepted in
    /// `Regenerating`.
    Regenerated,
    /// An admin ends `user`'s use of the VM (`deskgrid session logoff`): a
    /// reservation is released; a pooled session is logged off and the VM
    /// refreshed. Refused for a personal VM in use (the agent cannot log a
    /// user off yet, and its disk must stay) and for a VM `user` does not
    /// hold.
    LogOffRequested { user: UserName },
}

impl Event {
    /// The event in words, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Defined => "defined",
            Self::Booted => "booted",
            Self::AgentHello => "agent hello",
            Self::AgentHeartbeat { .. } => "agent heartbeat",
            Self::Reserve { .. } => "reserve",
            Self::AgentLogin { .. } => "agent login",
            Self::AgentLogout { .. } => "agent logout",
            Self::ViewerConnected => "viewer connected",
            Self::ViewerDisconnected { .. } => "viewer disconnected",
            Self::Tick { .. } => "tick",
            Self::RefreshDone => "refresh done",
            Self::Failed { .. } => "failed",
            Self::Regenerated => "regenerated",
            Self::LogOffRequested { .. } => "logoff requested",
        }
    }
}

/// Something the caller must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish this projection ([`VmLifecycle::record_state`]) in this
    /// server's `VmRecord`. Emitted exactly when the projection changed, and
    /// always last, so the record never runs ahead of the host.
    RecordState {
        state: VmState,
        user: Option<UserName>,
    },
    /// Throw the disk away, clone it afresh from the base image, start the
    /// VM, then send [`Event::RefreshDone`].
    RefreshDisk,
    /// Ask the guest to log `user` off. Best effort: for a pooled VM the
    /// disk is refreshed right after whatever the guest does.
    LogOff { user: UserName },
    /// Rebuild the VM, then send [`Event::Regenerated`]: with a fresh disk
    /// from the base image (pooled), or on its own disk (`keep_disk`,
    /// personal: the owner's data stays).
    Regenerate { keep_disk: bool },
    /// The reservation for `user` ended without their login (it expired, or
    /// the VM failed, or someone else logged in): drop what was prepared for
    /// it (display ticket, waiting broker request).
    ReleaseReservation { user: UserName },
    /// A login the grid did not arrange; log it and show it to admins.
    ReportLogin(LoginAnomaly),
}

/// A login the guest reported that the grid did not arrange. It is accepted
/// (the guest knows who is logged in), but someone should look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginAnomaly {
    /// Nobody had reserved the VM.
    Unreserved { user: UserName },
    /// The VM was reserved for another user.
    ReservedForOther {
        reserved_for: UserName,
        user: UserName,
    },
    /// Another user's session was current: its logout was never reported.
    ReplacedSession {
        previous_user: UserName,
        previous_session: SessionId,
        user: UserName,
    },
    /// A personal VM, and not its owner.
    NotOwner { owner: UserName, user: UserName },
}

/// Why an event was refused. A refusal leaves the machine unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("{event} is not accepted while the VM is {phase}")]
    WrongPhase {
        event: &'static str,
        phase: &'static str,
    },
    #[error("the VM is already reserved for {user}")]
    AlreadyReserved { user: UserName },
    #[error("the VM is in use by {user}")]
    InUseBy { user: UserName },
    #[error("the VM is the personal desktop of {owner}, not of {user}")]
    NotOwner { owner: UserName, user: UserName },
    #[error("{user} is not logged in on this VM")]
    NotLoggedIn { user: UserName },
    #[error("session {session} of {user} is not the VM's current session")]
    StaleSession { user: UserName, session: SessionId },
    #[error("{user} is logged in on their personal desktop; the agent cannot log a user off yet")]
    PersonalSession { user: UserName },
}

/// One desktop VM on the server that hosts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmLifecycle {
    kind: TemplateKind,
    /// A personal VM's user, once it has one; always `None` when pooled.
    owner: Option<UserName>,
    phase: Phase,
    /// When the agent was last heard from, in `Ready`, `Reserved` and
    /// `InUse`; `None` until the first tick after a hello.
    agent_heard_at_ms: Option<u64>,
    regenerations_in_a_row: u32,
}

impl VmLifecycle {
    /// A VM about to be provisioned. `owner` counts only for a personal VM.
    pub fn new(kind: TemplateKind, owner: Option<UserName>) -> Self {
        Self {
            kind,
            owner: match kind {
                TemplateKind::Pooled => None,
                TemplateKind::Personal => owner,
            },
            phase: Phase::Provisioning { defined: false },
            agent_heard_at_ms: None,
            regenerations_in_a_row: 0,
        }
    }

    pub fn kind(&self) -> TemplateKind {
        self.kind
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// A personal VM's owner.
    pub fn owner(&self) -> Option<&UserName> {
        self.owner.as_ref()
    }

    /// The user the VM is reserved for or in use by.
    pub fn holder(&self) -> Option<&UserName> {
        match &self.phase {
            Phase::Reserved { user, .. } | Phase::InUse { user, .. } => Some(user),
            _ => None,
        }
    }

    /// The current session, for the record's `sessions`.
    pub fn session(&self) -> Option<SessionId> {
        match &self.phase {
            Phase::InUse { session, .. } => Some(*session),
            _ => None,
        }
    }

    /// The projection onto the replicated `VmRecord` (`state`, `user`):
    ///
    /// | phase                    | state          | user                      |
    /// |--------------------------|----------------|---------------------------|
    /// | `Provisioning`           | `Provisioning` | owner (personal)          |
    /// | `Booting`                | `Provisioning` | owner (personal)          |
    /// | `Ready`                  | `Ready`        | owner (personal)          |
    /// | `Reserved`               | `Reserved`     | the reserved user         |
    /// | `InUse` (viewer or not)  | `InUse`        | the logged-in user        |
    /// | `Refreshing`             | `Refreshing`   | none                      |
    /// | `Regenerating`           | `Provisioning` | owner (personal)          |
    /// | `Failed`                 | `Failed`       | owner (personal)          |
    ///
    /// A pooled VM has no owner, so outside `Reserved` and `InUse` it carries
    /// no user. A personal VM carries its owner in every other phase because
    /// the planner reads `user` as ownership: the connection index routes the
    /// owner to it and does not count it as a free ready VM, and
    /// `RemoveVm` refuses a VM with a user (so the owner's disk is never
    /// thrown away as surplus). `Booting` and `Regenerating` are
    /// `Provisioning` so the planner counts the VM without offering it or
    /// removing it; a server restart turns a left-over `Provisioning` into
    /// `Failed`, as for any VM cut short.
    pub fn record_state(&self) -> (VmState, Option<UserName>) {
        match &self.phase {
            Phase::Provisioning { .. } | Phase::Booting { .. } | Phase::Regenerating { .. } => {
                (VmState::Provisioning, self.owner.clone())
            }
            Phase::Ready => (VmState::Ready, self.owner.clone()),
            Phase::Reserved { user, .. } => (VmState::Reserved, Some(user.clone())),
            Phase::InUse { user, .. } => (VmState::InUse, Some(user.clone())),
            Phase::Refreshing => (VmState::Refreshing, None),
            Phase::Failed { .. } => (VmState::Failed, self.owner.clone()),
        }
    }

    /// Applies `event`: the effects to carry out, in order, or why it was
    /// refused (then nothing changed).
    pub fn apply(
        &mut self,
        event: Event,
        policy: &LifecyclePolicy,
    ) -> Result<Vec<Effect>, Refusal> {
        let before = self.record_state();
        let mut effects = self.transition(event, policy)?;
        let after = self.record_state();
        if after != before {
            let (state, user) = after;
            effects.push(Effect::RecordState { state, user });
        }
        Ok(effects)
    }

    fn wrong_phase(&self, event: &Event) -> Refusal {
        Refusal::WrongPhase {
            event: event.name(),
            phase: self.phase.name(),
        }
    }

    fn transition(
        &mut self,
        event: Event,
        policy: &LifecyclePolicy,
    ) -> Result<Vec<Effect>, Refusal> {
        match event {
            Event::Defined => match self.phase {
                Phase::Provisioning { defined: false } => {
                    self.phase = Phase::Provisioning { defined: true };
                    Ok(Vec::new())
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::Booted => match self.phase {
                Phase::Provisioning { defined: true } => {
                    self.enter_booting();
                    Ok(Vec::new())
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::AgentHello => match self.phase {
                Phase::Booting { .. } => {
                    self.phase = Phase::Ready;
                    self.agent_heard_at_ms = None;
                    self.regenerations_in_a_row = 0;
                    Ok(Vec::new())
                }
                Phase::Ready | Phase::Reserved { .. } | Phase::InUse { .. } => {
                    self.agent_heard_at_ms = None;
                    Ok(Vec::new())
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::AgentHeartbeat { now_ms } => match self.phase {
                Phase::Ready | Phase::Reserved { .. } | Phase::InUse { .. } => {
                    let heard = self.agent_heard_at_ms.map_or(now_ms, |at| at.max(now_ms));
                    self.agent_heard_at_ms = Some(heard);
                    Ok(Vec::new())
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::Reserve {
                ref user,
                now_ms,
                ttl_ms,
            } => self.reserve(&event, user, now_ms, ttl_ms, policy),
            Event::AgentLogin { user, session } => self.login(user, session),
            Event::AgentLogout { ref user, session } => match &self.phase {
                Phase::InUse {
                    user: current,
                    session: current_session,
                    ..
                } => {
                    if current != user {
                        Err(Refusal::NotLoggedIn { user: user.clone() })
                    } else if *current_session != session {
                        Err(Refusal::StaleSession {
                            user: user.clone(),
                            session,
                        })
                    } else {
                        Ok(self.end_session())
                    }
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::ViewerConnected => match &mut self.phase {
                Phase::InUse {
                    disconnected_since_ms,
                    ..
                } => {
                    *disconnected_since_ms = None;
                    Ok(Vec::new())
                }
                // The user may attach before logging in at the guest; the
                // reservation's expiry covers a user who never does.
                Phase::Reserved { .. } => Ok(Vec::new()),
                _ => Err(self.wrong_phase(&event)),
            },
            Event::ViewerDisconnected { now_ms } => match &mut self.phase {
                Phase::InUse {
                    disconnected_since_ms,
                    ..
                } => {
                    disconnected_since_ms.get_or_insert(now_ms);
                    Ok(Vec::new())
                }
                Phase::Reserved { .. } => Ok(Vec::new()),
                _ => Err(self.wrong_phase(&event)),
            },
            Event::Tick { now_ms } => Ok(self.tick(now_ms, policy)),
            Event::RefreshDone => match self.phase {
                Phase::Refreshing => {
                    self.enter_booting();
                    Ok(Vec::new())
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::Failed { reason } => match self.phase {
                Phase::Failed { .. } => Err(Refusal::WrongPhase {
                    event: "failed",
                    phase: self.phase.name(),
                }),
                _ => Ok(self.fail(FailureReason::Reported { reason })),
            },
            Event::Regenerated => match self.phase {
                Phase::Regenerating { .. } => {
                    self.enter_booting();
                    Ok(Vec::new())
                }
                _ => Err(self.wrong_phase(&event)),
            },
            Event::LogOffRequested { ref user } => match &self.phase {
                Phase::Reserved { user: holder, .. } if holder == user => {
                    let user = holder.clone();
                    self.phase = Phase::Ready;
                    Ok(vec![Effect::ReleaseReservation { user }])
                }
                Phase::InUse { user: holder, .. } if holder == user => {
                    if self.kind == TemplateKind::Personal {
                        return Err(Refusal::PersonalSession { user: user.clone() });
                    }
                    let mut effects = vec![Effect::LogOff { user: user.clone() }];
                    effects.extend(self.end_session());
                    Ok(effects)
                }
                _ => Err(Refusal::NotLoggedIn { user: user.clone() }),
            },
        }
    }

    fn reserve(
        &mut self,
        event: &Event,
        user: &UserName,
        now_ms: u64,
        ttl_ms: Option<u64>,
        policy: &LifecyclePolicy,
    ) -> Result<Vec<Effect>, Refusal> {
        match &self.phase {
            Phase::Ready => {}
            Phase::Reserved { user: holder, .. } => {
                return Err(Refusal::AlreadyReserved {
                    user: holder.clone(),
                })
            }
            Phase::InUse { user: holder, .. } => {
                return Err(Refusal::InUseBy {
                    user: holder.clone(),
                })
            }
            _ => return Err(self.wrong_phase(event)),
        }
        if self.kind == TemplateKind::Personal {
            match &self.owner {
                Some(owner) if owner != user => {
                    return Err(Refusal::NotOwner {
                        owner: owner.clone(),
                        user: user.clone(),
                    })
                }
                Some(_) => {}
                None => self.owner = Some(user.clone()),
            }
        }
        let ttl_ms = ttl_ms.map_or(policy.reservation_ttl_ms, |ttl_ms| {
            ttl_ms.min(policy.reservation_ttl_ms)
        });
        self.phase = Phase::Reserved {
            user: user.clone(),
            expires_at_ms: now_ms.saturating_add(ttl_ms),
        };
        Ok(Vec::new())
    }

    fn login(&mut self, user: UserName, session: SessionId) -> Result<Vec<Effect>, Refusal> {
        let mut effects = Vec::new();
        match &self.phase {
            Phase::Ready => effects.push(Effect::ReportLogin(LoginAnomaly::Unreserved {
                user: user.clone(),
            })),
            Phase::Reserved {
                user: reserved_for, ..
            } => {
                if *reserved_for != user {
                    effects.push(Effect::ReleaseReservation {
                        user: reserved_for.clone(),
                    });
                    effects.push(Effect::ReportLogin(LoginAnomaly::ReservedForOther {
                        reserved_for: reserved_for.clone(),
                        user: user.clone(),
                    }));
                }
            }
            Phase::InUse {
                user: current,
                session: current_session,
                ..
            } => {
                if *current == user && *current_session == session {
                    // The same frame again: nothing new.
                    return Ok(Vec::new());
                }
                // The same user with a new session is an agent restart or a
                // quick re-login: nothing to report.
                if *current != user {
                    effects.push(Effect::ReportLogin(LoginAnomaly::ReplacedSession {
                        previous_user: current.clone(),
                        previous_session: *current_session,
                        user: user.clone(),
                    }));
                }
            }
            _ => {
                return Err(Refusal::WrongPhase {
                    event: "agent login",
                    phase: self.phase.name(),
                })
            }
        }
        if self.kind == TemplateKind::Personal {
            match &self.owner {
                Some(owner) if *owner != user => {
                    effects.push(Effect::ReportLogin(LoginAnomaly::NotOwner {
                        owner: owner.clone(),
                        user: user.clone(),
                    }));
                }
                Some(_) => {}
                // The user's files are on this disk from now on.
                None => self.owner = Some(user.clone()),
            }
        }
        self.phase = Phase::InUse {
            user,
            session,
            disconnected_since_ms: None,
        };
        Ok(effects)
    }

    /// The session is over: a pooled VM is refreshed, a personal one waits
    /// for its owner again.
    fn end_session(&mut self) -> Vec<Effect> {
        match self.kind {
            TemplateKind::Pooled => {
                self.phase = Phase::Refreshing;
                self.agent_heard_at_ms = None;
                vec![Effect::RefreshDisk]
            }
            TemplateKind::Personal => {
                self.phase = Phase::Ready;
                Vec::new()
            }
        }
    }

    fn tick(&mut self, now_ms: u64, policy: &LifecyclePolicy) -> Vec<Effect> {
        match &mut self.phase {
            Phase::Booting { since_ms: None } => {
                self.phase = Phase::Booting {
                    since_ms: Some(now_ms),
                };
                Vec::new()
            }
            Phase::Booting {
                since_ms: Some(since_ms),
            } => {
                let waited_ms = now_ms.saturating_sub(*since_ms);
                if waited_ms > policy.boot_timeout_ms {
                    self.fail(FailureReason::NeverSaidHello { waited_ms })
                } else {
                    Vec::new()
                }
            }
            Phase::Ready | Phase::Reserved { .. } | Phase::InUse { .. } => {
                let heard_at_ms = *self.agent_heard_at_ms.get_or_insert(now_ms);
                let silent_for_ms = now_ms.saturating_sub(heard_at_ms);
                if silent_for_ms > policy.heartbeat_timeout_ms {
                    return self.fail(FailureReason::AgentSilent { silent_for_ms });
                }
                match &self.phase {
                    Phase::Reserved {
                        user,
                        expires_at_ms,
                    } if now_ms >= *expires_at_ms => {
                        let user = user.clone();
                        self.phase = Phase::Ready;
                        vec![Effect::ReleaseReservation { user }]
                    }
                    Phase::InUse {
                        user,
                        disconnected_since_ms: Some(since_ms),
                        ..
                    } if self.kind == TemplateKind::Pooled
                        && now_ms.saturating_sub(*since_ms) >= policy.disconnect_grace_ms =>
                    {
                        let user = user.clone();
                        let mut effects = vec![Effect::LogOff { user }];
                        effects.extend(self.end_session());
                        effects
                    }
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    }

    /// Repairs the VM once by regenerating it; gives up when that already
    /// happened since the agent last said hello, or when there is nothing
    /// to regenerate yet.
    fn fail(&mut self, reason: FailureReason) -> Vec<Effect> {
        let mut effects = Vec::new();
        if let Phase::Reserved { user, .. } = &self.phase {
            effects.push(Effect::ReleaseReservation { user: user.clone() });
        }
        self.agent_heard_at_ms = None;
        let nothing_built = matches!(self.phase, Phase::Provisioning { .. });
        if nothing_built || self.regenerations_in_a_row >= MAX_REGENERATIONS_IN_A_ROW {
            self.phase = Phase::Failed { reason };
        } else {
            self.regenerations_in_a_row += 1;
            self.phase = Phase::Regenerating { reason };
            effects.push(Effect::Regenerate {
                keep_disk: self.kind == TemplateKind::Personal,
            });
        }
        effects
    }

    fn enter_booting(&mut self) {
        self.phase = Phase::Booting { since_ms: None };
        self.agent_heard_at_ms = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserName {
        UserName::new(name).expect("test names are valid")
    }

    fn session(n: u8) -> SessionId {
        SessionId::from_bytes([n; 16])
    }

    fn policy() -> LifecyclePolicy {
        LifecyclePolicy::default()
    }

    fn apply(vm: &mut VmLifecycle, event: Event) -> Result<Vec<Effect>, Refusal> {
        let before = vm.clone();
        let result = vm.apply(event, &policy());
        if result.is_err() {
            assert_eq!(*vm, before, "a refusal changed the machine");
        }
        result
    }

    fn ok(vm: &mut VmLifecycle, event: Event) -> Vec<Effect> {
        apply(vm, event).expect("the event is accepted")
    }

    fn recorded(state: VmState, user: Option<&str>) -> Effect {
        Effect::RecordState {
            state,
            user: user.map(self::user),
        }
    }

    fn ready(kind: TemplateKind, owner: Option<&str>) -> VmLifecycle {
        let mut vm = VmLifecycle::new(kind, owner.map(user));
        ok(&mut vm, Event::Defined);
        ok(&mut vm, Event::Booted);
        ok(&mut vm, Event::AgentHello);
        ok(&mut vm, Event::Tick { now_ms: 0 });
        vm
    }

    fn reserve(name: &str, now_ms: u64) -> Event {
        Event::Reserve {
            user: user(name),
            now_ms,
            ttl_ms: None,
        }
    }

    fn login(name: &str, n: u8) -> Event {
        Event::AgentLogin {
            user: user(name),
            session: session(n),
        }
    }

    fn logout(name: &str, n: u8) -> Event {
        Event::AgentLogout {
            user: user(name),
            session: session(n),
        }
    }

    fn in_use(kind: TemplateKind, owner: Option<&str>, name: &str) -> VmLifecycle {
        let mut vm = ready(kind, owner);
        ok(&mut vm, reserve(name, 0));
        ok(&mut vm, login(name, 1));
        vm
    }

    #[test]
    fn an_admin_logoff_releases_a_reservation_and_ends_a_pooled_session() {
        let logoff = |name: &str| Event::LogOffRequested { user: user(name) };
        // A reservation: released, the VM ready again.
        let mut vm = ready(TemplateKind::Pooled, None);
        ok(&mut vm, reserve("alice", 0));
        assert_eq!(
            ok(&mut vm, logoff("alice")),
            vec![
                Effect::ReleaseReservation {
                    user: user("alice")
                },
                recorded(VmState::Ready, None)
            ]
        );
        // A pooled session: logged off and refreshed.
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        assert!(matches!(
            apply(&mut vm, logoff("bob")),
            Err(Refusal::NotLoggedIn { .. })
        ));
        assert_eq!(
            ok(&mut vm, logoff("alice")),
            vec![
                Effect::LogOff {
                    user: user("alice")
                },
                Effect::RefreshDisk,
                recorded(VmState::Refreshing, None)
            ]
        );
        // A personal session stays: its disk is the owner's.
        let mut vm = in_use(TemplateKind::Personal, Some("alice"), "alice");
        assert!(matches!(
            apply(&mut vm, logoff("alice")),
            Err(Refusal::PersonalSession { .. })
        ));
        // Nothing held: refused.
        let mut vm = ready(TemplateKind::Pooled, None);
        assert!(apply(&mut vm, logoff("alice")).is_err());
    }

    #[test]
    fn provisioning_defined_booted_hello_makes_a_ready_vm() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        assert_eq!(vm.record_state(), (VmState::Provisioning, None));
        assert_eq!(ok(&mut vm, Event::Defined), vec![]);
        assert_eq!(vm.phase(), &Phase::Provisioning { defined: true });
        assert_eq!(ok(&mut vm, Event::Booted), vec![]);
        assert_eq!(vm.phase(), &Phase::Booting { since_ms: None });
        assert_eq!(vm.record_state(), (VmState::Provisioning, None));
        assert_eq!(
            ok(&mut vm, Event::AgentHello),
            vec![recorded(VmState::Ready, None)]
        );
        assert_eq!(vm.phase(), &Phase::Ready);
    }

    #[test]
    fn out_of_order_provisioning_events_are_refused() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        assert_eq!(
            apply(&mut vm, Event::Booted),
            Err(Refusal::WrongPhase {
                event: "booted",
                phase: "provisioning"
            })
        );
        assert!(apply(&mut vm, Event::AgentHello).is_err());
        ok(&mut vm, Event::Defined);
        assert!(apply(&mut vm, Event::Defined).is_err());
        let refusal = apply(&mut vm, reserve("alice", 0)).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "reserve is not accepted while the VM is provisioning"
        );
    }

    #[test]
    fn reserve_from_ready_and_never_twice() {
        let mut vm = ready(TemplateKind::Pooled, None);
        assert_eq!(
            ok(&mut vm, reserve("alice", 1_000)),
            vec![recorded(VmState::Reserved, Some("alice"))]
        );
        assert_eq!(
            vm.phase(),
            &Phase::Reserved {
                user: user("alice"),
                expires_at_ms: 31_000
            }
        );
        assert_eq!(
            apply(&mut vm, reserve("bob", 1_001)),
            Err(Refusal::AlreadyReserved {
                user: user("alice")
            })
        );
        assert_eq!(
            apply(&mut vm, reserve("alice", 1_001)),
            Err(Refusal::AlreadyReserved {
                user: user("alice")
            })
        );
        ok(&mut vm, login("alice", 1));
        let refusal = apply(&mut vm, reserve("bob", 2_000)).unwrap_err();
        assert_eq!(refusal.to_string(), "the VM is in use by alice");
    }

    #[test]
    fn a_reservation_lasts_at_most_the_policy_ttl() {
        let mut vm = ready(TemplateKind::Pooled, None);
        ok(
            &mut vm,
            Event::Reserve {
                user: user("alice"),
                now_ms: 0,
                ttl_ms: Some(3_600_000),
            },
        );
        assert!(matches!(
            vm.phase(),
            Phase::Reserved {
                expires_at_ms: 30_000,
                ..
            }
        ));
        let mut vm = ready(TemplateKind::Pooled, None);
        ok(
            &mut vm,
            Event::Reserve {
                user: user("alice"),
                now_ms: 0,
                ttl_ms: Some(5_000),
            },
        );
        assert!(matches!(
            vm.phase(),
            Phase::Reserved {
                expires_at_ms: 5_000,
                ..
            }
        ));
    }

    #[test]
    fn an_expired_reservation_frees_the_vm_at_the_next_tick() {
        let mut vm = ready(TemplateKind::Pooled, None);
        ok(&mut vm, reserve("alice", 0));
        ok(&mut vm, Event::AgentHeartbeat { now_ms: 29_000 });
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 29_999 }), vec![]);
        assert_eq!(
            ok(&mut vm, Event::Tick { now_ms: 30_000 }),
            vec![
                Effect::ReleaseReservation {
                    user: user("alice")
                },
                recorded(VmState::Ready, None)
            ]
        );
        assert_eq!(vm.phase(), &Phase::Ready);
        ok(&mut vm, reserve("bob", 30_001));
    }

    #[test]
    fn the_reserved_users_login_makes_it_in_use() {
        let mut vm = ready(TemplateKind::Pooled, None);
        ok(&mut vm, reserve("alice", 0));
        assert_eq!(
            ok(&mut vm, login("alice", 1)),
            vec![recorded(VmState::InUse, Some("alice"))]
        );
        assert_eq!(vm.session(), Some(session(1)));
        assert_eq!(vm.holder(), Some(&user("alice")));
        // The same frame twice changes nothing.
        assert_eq!(ok(&mut vm, login("alice", 1)), vec![]);
        // A new session of the same user (agent restart) is taken silently.
        assert_eq!(ok(&mut vm, login("alice", 2)), vec![]);
        assert_eq!(vm.session(), Some(session(2)));
    }

    #[test]
    fn unarranged_logins_are_accepted_and_reported() {
        let mut vm = ready(TemplateKind::Pooled, None);
        assert_eq!(
            ok(&mut vm, login("mallory", 1)),
            vec![
                Effect::ReportLogin(LoginAnomaly::Unreserved {
                    user: user("mallory")
                }),
                recorded(VmState::InUse, Some("mallory"))
            ]
        );

        let mut vm = ready(TemplateKind::Pooled, None);
        ok(&mut vm, reserve("alice", 0));
        assert_eq!(
            ok(&mut vm, login("bob", 1)),
            vec![
                Effect::ReleaseReservation {
                    user: user("alice")
                },
                Effect::ReportLogin(LoginAnomaly::ReservedForOther {
                    reserved_for: user("alice"),
                    user: user("bob")
                }),
                recorded(VmState::InUse, Some("bob"))
            ]
        );

        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        assert_eq!(
            ok(&mut vm, login("bob", 2)),
            vec![
                Effect::ReportLogin(LoginAnomaly::ReplacedSession {
                    previous_user: user("alice"),
                    previous_session: session(1),
                    user: user("bob")
                }),
                recorded(VmState::InUse, Some("bob"))
            ]
        );
    }

    #[test]
    fn logins_before_hello_or_during_refresh_are_refused() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        ok(&mut vm, Event::Defined);
        ok(&mut vm, Event::Booted);
        assert!(apply(&mut vm, login("alice", 1)).is_err());
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        ok(&mut vm, logout("alice", 1));
        assert_eq!(
            apply(&mut vm, login("alice", 1)),
            Err(Refusal::WrongPhase {
                event: "agent login",
                phase: "refreshing"
            })
        );
    }

    #[test]
    fn a_pooled_logout_refreshes_the_disk() {
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        assert_eq!(
            ok(&mut vm, logout("alice", 1)),
            vec![Effect::RefreshDisk, recorded(VmState::Refreshing, None)]
        );
        assert!(apply(&mut vm, reserve("bob", 0)).is_err());
        assert_eq!(
            ok(&mut vm, Event::RefreshDone),
            vec![recorded(VmState::Provisioning, None)]
        );
        assert_eq!(
            ok(&mut vm, Event::AgentHello),
            vec![recorded(VmState::Ready, None)]
        );
    }

    #[test]
    fn logouts_must_match_the_current_user_and_session() {
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        assert_eq!(
            apply(&mut vm, logout("bob", 1)),
            Err(Refusal::NotLoggedIn { user: user("bob") })
        );
        assert_eq!(
            apply(&mut vm, logout("alice", 9)),
            Err(Refusal::StaleSession {
                user: user("alice"),
                session: session(9)
            })
        );
        let mut vm = ready(TemplateKind::Pooled, None);
        assert!(apply(&mut vm, logout("alice", 1)).is_err());
    }

    #[test]
    fn a_personal_vm_is_reserved_only_for_its_owner() {
        let mut vm = ready(TemplateKind::Personal, Some("alice"));
        assert_eq!(vm.record_state(), (VmState::Ready, Some(user("alice"))));
        assert_eq!(
            apply(&mut vm, reserve("bob", 0)),
            Err(Refusal::NotOwner {
                owner: user("alice"),
                user: user("bob")
            })
        );
        assert_eq!(
            ok(&mut vm, reserve("alice", 0)),
            vec![recorded(VmState::Reserved, Some("alice"))]
        );
    }

    #[test]
    fn an_unowned_personal_vm_belongs_to_its_first_user() {
        let mut vm = ready(TemplateKind::Personal, None);
        assert_eq!(vm.record_state(), (VmState::Ready, None));
        ok(&mut vm, reserve("alice", 0));
        assert_eq!(vm.owner(), Some(&user("alice")));
        ok(&mut vm, Event::Tick { now_ms: 30_000 });
        assert!(apply(&mut vm, reserve("bob", 30_001)).is_err());

        let mut vm = ready(TemplateKind::Personal, None);
        ok(&mut vm, login("carol", 1));
        assert_eq!(vm.owner(), Some(&user("carol")));
    }

    #[test]
    fn a_personal_logout_leaves_it_ready_for_its_owner() {
        let mut vm = in_use(TemplateKind::Personal, Some("alice"), "alice");
        assert_eq!(
            ok(&mut vm, logout("alice", 1)),
            vec![recorded(VmState::Ready, Some("alice"))]
        );
        assert_eq!(vm.phase(), &Phase::Ready);
    }

    #[test]
    fn a_stranger_on_a_personal_vm_is_reported() {
        let mut vm = ready(TemplateKind::Personal, Some("alice"));
        let effects = ok(&mut vm, login("bob", 1));
        assert!(
            effects.contains(&Effect::ReportLogin(LoginAnomaly::NotOwner {
                owner: user("alice"),
                user: user("bob")
            }))
        );
        assert_eq!(vm.owner(), Some(&user("alice")));
        assert_eq!(vm.record_state(), (VmState::InUse, Some(user("bob"))));
    }

    #[test]
    fn viewer_events_track_the_disconnect() {
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        assert_eq!(
            ok(&mut vm, Event::ViewerDisconnected { now_ms: 10 }),
            vec![]
        );
        ok(&mut vm, Event::ViewerDisconnected { now_ms: 20 });
        assert!(matches!(
            vm.phase(),
            Phase::InUse {
                disconnected_since_ms: Some(10),
                ..
            }
        ));
        // Disconnected is still in use, for the same user.
        assert_eq!(vm.record_state(), (VmState::InUse, Some(user("alice"))));
        ok(&mut vm, Event::ViewerConnected);
        assert!(matches!(
            vm.phase(),
            Phase::InUse {
                disconnected_since_ms: None,
                ..
            }
        ));
        let mut vm = ready(TemplateKind::Pooled, None);
        assert!(apply(&mut vm, Event::ViewerConnected).is_err());
        assert!(apply(&mut vm, Event::ViewerDisconnected { now_ms: 1 }).is_err());
        ok(&mut vm, reserve("alice", 0));
        assert_eq!(ok(&mut vm, Event::ViewerConnected), vec![]);
    }

    #[test]
    fn a_pooled_desktop_left_disconnected_is_logged_off_and_refreshed() {
        let grace = policy().disconnect_grace_ms;
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        ok(&mut vm, Event::ViewerDisconnected { now_ms: 1_000 });
        ok(
            &mut vm,
            Event::AgentHeartbeat {
                now_ms: 1_000 + grace - 1,
            },
        );
        assert_eq!(
            ok(
                &mut vm,
                Event::Tick {
                    now_ms: 1_000 + grace - 1
                }
            ),
            vec![]
        );
        assert_eq!(
            ok(
                &mut vm,
                Event::Tick {
                    now_ms: 1_000 + grace
                }
            ),
            vec![
                Effect::LogOff {
                    user: user("alice")
                },
                Effect::RefreshDisk,
                recorded(VmState::Refreshing, None)
            ]
        );
    }

    #[test]
    fn a_personal_desktop_left_disconnected_stays_with_its_owner() {
        let mut vm = in_use(TemplateKind::Personal, Some("alice"), "alice");
        ok(&mut vm, Event::ViewerDisconnected { now_ms: 1_000 });
        ok(&mut vm, Event::AgentHeartbeat { now_ms: 10_000_000 });
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 10_000_000 }), vec![]);
        assert_eq!(vm.holder(), Some(&user("alice")));
    }

    #[test]
    fn a_silent_agent_fails_the_vm_and_it_is_regenerated() {
        let mut vm = ready(TemplateKind::Pooled, None);
        ok(&mut vm, reserve("alice", 0));
        ok(&mut vm, Event::AgentHeartbeat { now_ms: 1_000 });
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 16_000 }), vec![]);
        assert_eq!(
            ok(&mut vm, Event::Tick { now_ms: 16_001 }),
            vec![
                Effect::ReleaseReservation {
                    user: user("alice")
                },
                Effect::Regenerate { keep_disk: false },
                recorded(VmState::Provisioning, None)
            ]
        );
        assert_eq!(
            vm.phase(),
            &Phase::Regenerating {
                reason: FailureReason::AgentSilent {
                    silent_for_ms: 15_001
                }
            }
        );
        ok(&mut vm, Event::Regenerated);
        assert_eq!(vm.phase(), &Phase::Booting { since_ms: None });
        ok(&mut vm, Event::AgentHello);
        assert_eq!(vm.phase(), &Phase::Ready);
    }

    #[test]
    fn the_heartbeat_clock_starts_at_the_first_tick_after_hello() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        ok(&mut vm, Event::Defined);
        ok(&mut vm, Event::Booted);
        ok(&mut vm, Event::AgentHello);
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 1_000_000 }), vec![]);
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 1_015_000 }), vec![]);
        assert!(!ok(&mut vm, Event::Tick { now_ms: 1_015_001 }).is_empty());
    }

    #[test]
    fn a_personal_vm_is_regenerated_on_its_own_disk() {
        let mut vm = in_use(TemplateKind::Personal, Some("alice"), "alice");
        assert_eq!(
            ok(
                &mut vm,
                Event::Failed {
                    reason: "domain crashed".to_owned()
                }
            ),
            vec![
                Effect::Regenerate { keep_disk: true },
                recorded(VmState::Provisioning, Some("alice"))
            ]
        );
    }

    #[test]
    fn a_second_failure_before_hello_gives_up() {
        let mut vm = ready(TemplateKind::Pooled, None);
        let failed = |reason: &str| Event::Failed {
            reason: reason.to_owned(),
        };
        ok(&mut vm, failed("domain crashed"));
        assert_eq!(
            ok(&mut vm, failed("clone failed")),
            vec![recorded(VmState::Failed, None)]
        );
        assert_eq!(
            vm.phase(),
            &Phase::Failed {
                reason: FailureReason::Reported {
                    reason: "clone failed".to_owned()
                }
            }
        );
        // Failed is terminal.
        assert!(apply(&mut vm, failed("again")).is_err());
        assert!(apply(&mut vm, Event::Regenerated).is_err());
        assert!(apply(&mut vm, Event::AgentHello).is_err());
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 1 }), vec![]);
    }

    #[test]
    fn a_vm_that_never_says_hello_fails_after_the_boot_timeout() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        ok(&mut vm, Event::Defined);
        ok(&mut vm, Event::Booted);
        ok(&mut vm, Event::Tick { now_ms: 0 });
        assert_eq!(ok(&mut vm, Event::Tick { now_ms: 300_000 }), vec![]);
        assert_eq!(
            ok(&mut vm, Event::Tick { now_ms: 300_001 }),
            vec![Effect::Regenerate { keep_disk: false }]
        );
        ok(&mut vm, Event::Regenerated);
        ok(&mut vm, Event::Tick { now_ms: 400_000 });
        ok(&mut vm, Event::Tick { now_ms: 700_001 });
        assert_eq!(
            vm.phase(),
            &Phase::Failed {
                reason: FailureReason::NeverSaidHello { waited_ms: 300_001 }
            }
        );
    }

    #[test]
    fn a_failure_while_provisioning_is_final() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        assert_eq!(
            ok(
                &mut vm,
                Event::Failed {
                    reason: "no space in the pool".to_owned()
                }
            ),
            vec![recorded(VmState::Failed, None)]
        );
    }

    #[test]
    fn a_failed_refresh_is_regenerated_from_the_base_image() {
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        ok(&mut vm, logout("alice", 1));
        assert_eq!(
            ok(
                &mut vm,
                Event::Failed {
                    reason: "clone failed".to_owned()
                }
            ),
            vec![
                Effect::Regenerate { keep_disk: false },
                recorded(VmState::Provisioning, None)
            ]
        );
    }

    #[test]
    fn heartbeats_and_hellos_outside_live_phases_are_refused() {
        let mut vm = VmLifecycle::new(TemplateKind::Pooled, None);
        assert!(apply(&mut vm, Event::AgentHeartbeat { now_ms: 1 }).is_err());
        assert!(apply(&mut vm, Event::RefreshDone).is_err());
        assert!(apply(&mut vm, Event::Regenerated).is_err());
        let mut vm = in_use(TemplateKind::Pooled, None, "alice");
        // An agent restart keeps the session.
        assert_eq!(ok(&mut vm, Event::AgentHello), vec![]);
        assert_eq!(vm.holder(), Some(&user("alice")));
    }

    #[test]
    fn failure_reasons_read_well() {
        assert_eq!(
            FailureReason::AgentSilent {
                silent_for_ms: 15_001
            }
            .to_string(),
            "agent silent for 15001 ms"
        );
        assert_eq!(
            Refusal::NotOwner {
                owner: user("alice"),
                user: user("bob")
            }
            .to_string(),
            "the VM is the personal desktop of alice, not of bob"
        );
    }
}
