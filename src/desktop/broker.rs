//! The connection broker: a user's login routed to a free desktop anywhere
//! in the grid.
//!
//! A login is checked here (password, rate limits, entitlements), the
//! connection balancer ranks the servers from a snapshot of the replicated
//! state, and each server in turn is asked to reserve a desktop with a
//! short deadline: this server through its own [`DesktopDesk`], the others
//! over the peer RPC ([`PeerDesks`]). The broker never reserves anything
//! itself: only the hosting server decides (DESIGN.md section 2.5), so a
//! stale snapshot costs a refusal and the next server, never a VM handed to
//! two users.
//!
//! What the broker needs from the rest of the server is behind
//! [`BrokerHost`] (state snapshot, password check, failure hints, the
//! policy loop's wake-up), so its tests run with fake desks and a real
//! [`GridState`] and no process, socket or libvirt.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::reserve::{DeskSlot, Reservation, ReserveRefusal, ReserveRequest};
use crate::model::{
    EntitlementSubject, GroupName, ServerId, SiteLabel, TemplateName, UserName, VmState,
};
use crate::placement::{ConnectionIndex, GridView, Liveness};
use crate::state::{ConfigValue, GridState};

/// How long one server may take to answer a reservation: a hosting server
/// answers from memory and sets a display ticket (one libvirt call, a few
/// ms); two seconds is far beyond a healthy answer and short enough that a
/// user whose first choice hangs still gets a desktop in seconds.
pub const RESERVE_DEADLINE: Duration = Duration::from_secs(2);
/// Servers asked for one login at most: a login then waits at most
/// 8 × [`RESERVE_DEADLINE`] however many servers hang, and servers ranked
/// below the eighth are the least likely to have a free desktop.
pub const MAX_SERVERS_TRIED: usize = 8;
/// Failed logins allowed per user and per source within
/// [`LOGIN_FAILURE_WINDOW_MS`] before further attempts are refused unseen:
/// a person mistyping gets several tries, a guesser gets 5 a minute.
pub const LOGIN_FAILURES_ALLOWED: usize = 5;
pub const LOGIN_FAILURE_WINDOW_MS: u64 = 60_000;
/// Users and sources the rate limiter tracks at most (about 100 bytes
/// each): a flood of made-up user names cannot grow memory without bound.
/// At the cap no new key is tracked, but the flood's source still is.
const MAX_TRACKED_LOGIN_KEYS: usize = 100_000;

/// A password on its way to be checked: never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(String);

impl Password {
    pub fn new(password: String) -> Self {
        Self(password)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Password(<redacted>)")
    }
}

/// One login.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    pub user: UserName,
    pub password: Password,
    /// The template asked for; needed when the user is entitled to several.
    pub template: Option<TemplateName>,
    /// The client's site, preferred among equally loaded servers.
    pub client_site: Option<SiteLabel>,
    /// Where the login came from (an address, or the local control socket),
    /// for the per-source rate limit.
    pub source: String,
}

/// Why a login got no desktop.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("too many attempts, retry in {retry_in_s} s")]
    TooManyAttempts { retry_in_s: u64 },
    /// The same answer for an unknown user and a wrong password.
    #[error("wrong user name or password")]
    BadCredentials,
    #[error(
        "user {user} is not entitled to any template (an admin grants one with `deskgrid entitle`)"
    )]
    NotEntitled { user: UserName },
    #[error("user {user} is entitled to several templates; choose one with --template: {}", names(.templates))]
    ChooseTemplate {
        user: UserName,
        templates: Vec<TemplateName>,
    },
    #[error("user {user} is not entitled to template {template} (entitled: {})", names(.entitled))]
    TemplateNotEntitled {
        user: UserName,
        template: TemplateName,
        entitled: Vec<TemplateName>,
    },
    #[error("no free desktop of template {template}: none free, {preparing} being prepared; try again shortly")]
    NoneFree {
        template: TemplateName,
        preparing: u32,
    },
    #[error("no desktop of template {template} could be reserved: none free, {preparing} being prepared; {} server(s) failed: {}", .failures.len(), .failures.join("; "))]
    NoDesktop {
        template: TemplateName,
        preparing: u32,
        /// `server: what went wrong`, one per server that failed.
        failures: Vec<String>,
    },
}

fn names(templates: &[TemplateName]) -> String {
    templates
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why logging a user off did not reach every server that hosts them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogoffError {
    #[error("user {user} has no session or reserved desktop in the grid state")]
    NoSession { user: UserName },
    #[error("the sessions of user {user} could not all be ended: {}", .failures.join("; "))]
    Incomplete {
        user: UserName,
        /// Sessions that did end.
        ended: u32,
        failures: Vec<String>,
    },
}

/// What a logoff did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogoffReport {
    pub user: UserName,
    /// Sessions and reservations the hosting servers ended.
    pub ended: u32,
    /// Names of the servers asked.
    pub servers: Vec<String>,
}

/// Why a peer gave no reservation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerDeskError {
    /// The peer answered: no.
    #[error(transparent)]
    Refused(ReserveRefusal),
    /// The peer could not be reached or answered nonsense: a hint for the
    /// failure detector.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

pub type PeerReserveFuture =
    Pin<Box<dyn Future<Output = Result<Reservation, PeerDeskError>> + Send + 'static>>;
pub type PeerLogoffFuture =
    Pin<Box<dyn Future<Output = Result<u32, PeerDeskError>> + Send + 'static>>;

/// The other servers' desktop services, over the peer RPC.
pub trait PeerDesks: Send + Sync + 'static {
    /// Asks `server` (at `address`) to reserve a desktop.
    fn reserve(
        &self,
        server: ServerId,
        address: SocketAddr,
        request: ReserveRequest,
    ) -> PeerReserveFuture;
    /// Asks `server` to end `user`'s sessions and reservations there.
    fn log_off(&self, server: ServerId, address: SocketAddr, user: UserName) -> PeerLogoffFuture;
}

/// [`PeerDesks`] over the federation's QUIC endpoint (the peer RPC of
/// `federation::node`). Without an endpoint (a server in no grid) every
/// peer is unreachable, which a standalone server never asks anyway.
#[derive(Debug, Clone)]
pub struct FederationDesks {
    endpoint: Option<Arc<crate::federation::PeerEndpoint>>,
}

impl FederationDesks {
    pub fn new(endpoint: Option<Arc<crate::federation::PeerEndpoint>>) -> Self {
        Self { endpoint }
    }
}

/// The broker's deadline bounds the whole call; the RPC's own deadline is
/// only a backstop for a call nobody awaits any more.
const RPC_BACKSTOP: Duration = Duration::from_secs(30);

fn peer_error(error: crate::federation::DeskRequestError) -> PeerDeskError {
    use crate::federation::DeskRequestError;
    match error {
        DeskRequestError::Refused(refusal) => PeerDeskError::Refused(refusal),
        // A federation-level refusal (removed server, older peer) is an
        // answer, not a sign the peer is down.
        DeskRequestError::PeerRefused { reason } => {
            PeerDeskError::Refused(ReserveRefusal::Unavailable { reason })
        }
        other => PeerDeskError::Unreachable(crate::error_chain(&other)),
    }
}

impl PeerDesks for FederationDesks {
    fn reserve(
        &self,
        server: ServerId,
        address: SocketAddr,
        request: ReserveRequest,
    ) -> PeerReserveFuture {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            let endpoint = endpoint.ok_or_else(|| {
                PeerDeskError::Unreachable("this server is in no grid".to_owned())
            })?;
            let connection = endpoint
                .connection(address, server)
                .await
                .map_err(|error| PeerDeskError::Unreachable(crate::error_chain(&error)))?;
            crate::federation::request_reserve(&connection, &request, RPC_BACKSTOP)
                .await
                .map_err(peer_error)
        })
    }

    fn log_off(&self, server: ServerId, address: SocketAddr, user: UserName) -> PeerLogoffFuture {
        let endpoint = self.endpoint.clone();
        Box::pin(async move {
            let endpoint = endpoint.ok_or_else(|| {
                PeerDeskError::Unreachable("this server is in no grid".to_owned())
            })?;
            let connection = endpoint
                .connection(address, server)
                .await
                .map_err(|error| PeerDeskError::Unreachable(crate::error_chain(&error)))?;
            crate::federation::request_log_off(&connection, &user, RPC_BACKSTOP)
                .await
                .map_err(peer_error)
        })
    }
}

/// What the broker needs from the server it runs in.
pub trait BrokerHost: Send + Sync + 'static {
    /// The state as the broker decides from it; cheap when nothing changed.
    fn snapshot(&self) -> Arc<BrokerSnapshot>;
    /// Whether `password` matches the PHC string `phc`; `None` (no such
    /// user) checks against a stand-in hash so that the answer takes as
    /// long and tells nothing. Blocking: argon2 takes tens of ms.
    fn verify_password(&self, password: &str, phc: Option<&str>) -> bool;
    /// `server` did not answer in time or could not be reached.
    fn report_unresponsive(&self, server: ServerId);
    /// A login found nothing free: plan now rather than at the next tick.
    fn wake_policy(&self);
}

#[derive(Debug, Clone)]
struct UserEntry {
    password_hash: String,
    groups: Vec<GroupName>,
}

/// What one login needs from the replicated state, built once per state
/// change ([`BrokerSnapshot::new`] walks the state; a login only looks up).
#[derive(Debug)]
pub struct BrokerSnapshot {
    own: ServerId,
    users: BTreeMap<UserName, UserEntry>,
    user_templates: BTreeMap<UserName, BTreeSet<TemplateName>>,
    group_templates: BTreeMap<GroupName, BTreeSet<TemplateName>>,
    index: ConnectionIndex,
    /// Every server not removed: its name and the address peers dial.
    servers: BTreeMap<ServerId, (String, Option<SocketAddr>)>,
    /// VMs being prepared, per template and server (servers not missing).
    preparing: BTreeMap<TemplateName, BTreeMap<ServerId, u32>>,
    /// Servers where a user has a session or a desktop reserved or in use.
    hosting_user: BTreeMap<UserName, BTreeSet<ServerId>>,
}

impl BrokerSnapshot {
    /// The snapshot of `state` for server `own`; `liveness` is the failure
    /// detector's view, `seed` the grid's placement seed.
    pub fn new(
        state: &GridState,
        own: ServerId,
        seed: u64,
        liveness: impl Fn(ServerId) -> Liveness,
    ) -> Self {
        let view = GridView::from_state(state, liveness);
        let index = ConnectionIndex::new(&view, seed);
        let templates: BTreeSet<&TemplateName> = view
            .templates()
            .iter()
            .map(|template| &template.name)
            .collect();
        let mut users = BTreeMap::new();
        let mut user_templates: BTreeMap<UserName, BTreeSet<TemplateName>> = BTreeMap::new();
        let mut group_templates: BTreeMap<GroupName, BTreeSet<TemplateName>> = BTreeMap::new();
        for value in state.config_values() {
            match value {
                ConfigValue::User(user) => {
                    users.insert(
                        user.name.clone(),
                        UserEntry {
                            password_hash: user.password_hash.clone(),
                            groups: user.groups.clone(),
                        },
                    );
                }
                // An entitlement to a deleted template entitles to nothing.
                ConfigValue::Entitlement(entitlement)
                    if templates.contains(&entitlement.template) =>
                {
                    let template = entitlement.template.clone();
                    match &entitlement.subject {
                        EntitlementSubject::User(user) => {
                            user_templates
                                .entry(user.clone())
                                .or_default()
                                .insert(template);
                        }
                        EntitlementSubject::Group(group) => {
                            group_templates
                                .entry(group.clone())
                                .or_default()
                                .insert(template);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut servers = BTreeMap::new();
        let mut preparing: BTreeMap<TemplateName, BTreeMap<ServerId, u32>> = BTreeMap::new();
        let mut hosting_user: BTreeMap<UserName, BTreeSet<ServerId>> = BTreeMap::new();
        for server in view.servers() {
            let record = server.record;
            let address = record
                .addresses
                .iter()
                .filter_map(|address| address.parse::<SocketAddr>().ok())
                .find(|address| !address.ip().is_unspecified() && address.port() != 0);
            servers.insert(server.id, (record.name.clone(), address));
            for vm in record.vms.values() {
                if vm.state == VmState::Provisioning && server.counts() {
                    *preparing
                        .entry(vm.template.clone())
                        .or_default()
                        .entry(server.id)
                        .or_default() += 1;
                }
                if let (Some(user), VmState::Reserved | VmState::InUse) = (&vm.user, vm.state) {
                    hosting_user
                        .entry(user.clone())
                        .or_default()
                        .insert(server.id);
                }
            }
            for session in record.sessions.values() {
                hosting_user
                    .entry(session.user.clone())
                    .or_default()
                    .insert(server.id);
            }
        }
        Self {
            own,
            users,
            user_templates,
            group_templates,
            index,
            servers,
            preparing,
            hosting_user,
        }
    }

    /// The templates `user` may use: their own entitlements and their
    /// groups', sorted.
    pub fn entitled_templates(&self, user: &UserName) -> Vec<TemplateName> {
        let mut templates: BTreeSet<&TemplateName> = self
            .user_templates
            .get(user)
            .into_iter()
            .flatten()
            .collect();
        if let Some(entry) = self.users.get(user) {
            for group in &entry.groups {
                templates.extend(self.group_templates.get(group).into_iter().flatten());
            }
        }
        templates.into_iter().cloned().collect()
    }

    fn server_name(&self, server: ServerId) -> String {
        self.servers
            .get(&server)
            .map_or_else(|| server.to_string(), |(name, _)| name.clone())
    }

    /// VMs of `template` being prepared on servers other than `asked`.
    fn preparing_elsewhere(&self, template: &TemplateName, asked: &BTreeSet<ServerId>) -> u32 {
        self.preparing
            .get(template)
            .into_iter()
            .flatten()
            .filter(|(server, _)| !asked.contains(server))
            .map(|(_, count)| *count)
            .fold(0, u32::saturating_add)
    }
}

/// Failed logins per key (a user, a source) in a sliding window; sans I/O,
/// the time is an argument.
#[derive(Debug)]
pub struct LoginLimiter {
    failures: BTreeMap<String, VecDeque<u64>>,
    allowed: usize,
    window_ms: u64,
}

impl Default for LoginLimiter {
    fn default() -> Self {
        Self::new(LOGIN_FAILURES_ALLOWED, LOGIN_FAILURE_WINDOW_MS)
    }
}

impl LoginLimiter {
    pub fn new(allowed: usize, window_ms: u64) -> Self {
        Self {
            failures: BTreeMap::new(),
            allowed: allowed.max(1),
            window_ms,
        }
    }

    /// `Err(ms)` when any key has used up its failures: the wait until the
    /// oldest of them leaves the window.
    pub fn check(&mut self, keys: &[&str], now_ms: u64) -> Result<(), u64> {
        let mut wait_ms = 0;
        for key in keys {
            if let Some(times) = self.failures.get_mut(*key) {
                expire(times, now_ms, self.window_ms);
                if times.len() >= self.allowed {
                    let oldest = times.front().copied().unwrap_or(now_ms);
                    wait_ms = wait_ms.max((oldest + self.window_ms).saturating_sub(now_ms));
                }
            }
        }
        if wait_ms == 0 {
            Ok(())
        } else {
            Err(wait_ms)
        }
    }

    pub fn record_failure(&mut self, keys: &[&str], now_ms: u64) {
        if self.failures.len() >= MAX_TRACKED_LOGIN_KEYS {
            let window_ms = self.window_ms;
            self.failures.retain(|_, times| {
                expire(times, now_ms, window_ms);
                !times.is_empty()
            });
        }
        for key in keys {
            if let Some(times) = self.failures.get_mut(*key) {
                times.push_back(now_ms);
                // Only the last `allowed` matter for the next check.
                while times.len() > self.allowed {
                    times.pop_front();
                }
            } else if self.failures.len() < MAX_TRACKED_LOGIN_KEYS {
                self.failures
                    .insert((*key).to_owned(), VecDeque::from([now_ms]));
            }
        }
    }

    /// A successful login clears the key's failures.
    pub fn forget(&mut self, key: &str) {
        self.failures.remove(key);
    }
}

fn expire(times: &mut VecDeque<u64>, now_ms: u64, window_ms: u64) {
    while times
        .front()
        .is_some_and(|time| time.saturating_add(window_ms) <= now_ms)
    {
        times.pop_front();
    }
}

/// Timings and limits of the broker.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    pub reserve_deadline: Duration,
    pub max_servers_tried: usize,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            reserve_deadline: RESERVE_DEADLINE,
            max_servers_tried: MAX_SERVERS_TRIED,
        }
    }
}

/// The broker of one server.
pub struct ConnectionBroker {
    host: Arc<dyn BrokerHost>,
    local: DeskSlot,
    peers: Arc<dyn PeerDesks>,
    limiter: Mutex<LoginLimiter>,
    settings: BrokerSettings,
}

impl std::fmt::Debug for ConnectionBroker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ConnectionBroker")
            .field("local_desk", &self.local.get().is_some())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// How one server answered.
enum Attempt {
    Reserved(Reservation),
    NoneFree(u32),
    Failed(String),
}

impl ConnectionBroker {
    pub fn new(
        host: Arc<dyn BrokerHost>,
        local: DeskSlot,
        peers: Arc<dyn PeerDesks>,
        settings: BrokerSettings,
    ) -> Self {
        Self {
            host,
            local,
            peers,
            limiter: Mutex::new(LoginLimiter::default()),
            settings,
        }
    }

    fn limiter(&self) -> std::sync::MutexGuard<'_, LoginLimiter> {
        // The limiter holds plain counters: a panic elsewhere leaves them usable.
        self.limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Authenticates the user, picks the template and asks the servers in
    /// the connection balancer's order until one reserves a desktop.
    /// `now_ms` is the wall clock (for the rate limits).
    pub async fn connect(
        &self,
        request: ConnectRequest,
        now_ms: u64,
    ) -> Result<Reservation, ConnectError> {
        let snapshot = self
            .check_password(&request.user, &request.password, &request.source, now_ms)
            .await?;
        let template = choose_template(&snapshot, &request.user, request.template)?;
        self.reserve(
            &snapshot,
            &request.user,
            template,
            request.client_site.as_ref(),
        )
        .await
    }

    /// Checks `user`'s password once, under the same rate limits as
    /// [`ConnectionBroker::connect`], and reserves nothing: what a face
    /// that keeps its own sessions (the HTTPS API's tokens) calls at login.
    pub async fn authenticate(
        &self,
        user: &UserName,
        password: &Password,
        source: &str,
        now_ms: u64,
    ) -> Result<(), ConnectError> {
        self.check_password(user, password, source, now_ms)
            .await
            .map(drop)
    }

    /// A desktop for `user`, authenticated earlier (a session the caller
    /// keeps): the user must still exist, and entitlements are checked
    /// now, so a deleted user's sessions stop working at once (the same
    /// [`ConnectError::BadCredentials`] as a wrong password).
    pub async fn connect_authenticated(
        &self,
        user: &UserName,
        template: Option<TemplateName>,
        client_site: Option<&SiteLabel>,
    ) -> Result<Reservation, ConnectError> {
        let host = Arc::clone(&self.host);
        // The snapshot may wait for the state's lock: off the async workers.
        let snapshot = tokio::task::spawn_blocking(move || host.snapshot())
            .await
            .map_err(|_| ConnectError::BadCredentials)?;
        if !snapshot.users.contains_key(user) {
            tracing::info!(%user, "session refused: the user no longer exists");
            return Err(ConnectError::BadCredentials);
        }
        let template = choose_template(&snapshot, user, template)?;
        self.reserve(&snapshot, user, template, client_site).await
    }

    /// The password check with its rate limits (per user and per source);
    /// the snapshot it checked against on success.
    async fn check_password(
        &self,
        user: &UserName,
        password: &Password,
        source: &str,
        now_ms: u64,
    ) -> Result<Arc<BrokerSnapshot>, ConnectError> {
        let user_key = format!("user:{user}");
        let source_key = format!("source:{source}");
        let keys = [user_key.as_str(), source_key.as_str()];
        self.limiter()
            .check(&keys, now_ms)
            .map_err(|wait_ms| ConnectError::TooManyAttempts {
                retry_in_s: wait_ms.div_ceil(1000),
            })?;
        let host = Arc::clone(&self.host);
        let password = password.clone();
        let checked_user = user.clone();
        // argon2 takes tens of ms of CPU, and a snapshot may wait for the
        // state's lock: both off the async workers.
        let checked = tokio::task::spawn_blocking(move || {
            let snapshot = host.snapshot();
            let phc = snapshot
                .users
                .get(&checked_user)
                .map(|entry| entry.password_hash.as_str())
                .filter(|phc| !phc.is_empty());
            let verified = host.verify_password(password.expose(), phc);
            (snapshot, verified)
        })
        .await;
        let Ok((snapshot, true)) = checked else {
            self.limiter().record_failure(&keys, now_ms);
            tracing::info!(%user, %source, "login refused: wrong user name or password");
            return Err(ConnectError::BadCredentials);
        };
        self.limiter().forget(&user_key);
        Ok(snapshot)
    }

    async fn reserve(
        &self,
        snapshot: &BrokerSnapshot,
        user: &UserName,
        template: TemplateName,
        client_site: Option<&SiteLabel>,
    ) -> Result<Reservation, ConnectError> {
        let ranked = snapshot.index.rank(user, &template, client_site);
        let mut asked = BTreeSet::new();
        let mut preparing: u32 = 0;
        let mut failures = Vec::new();
        for server in ranked.into_iter().take(self.settings.max_servers_tried) {
            asked.insert(server);
            let request = ReserveRequest {
                user: user.clone(),
                template: template.clone(),
            };
            match self.attempt(snapshot, server, request).await {
                Attempt::Reserved(reservation) => {
                    tracing::info!(%user, %template, vm = %reservation.vm, server = %reservation.server, returning = reservation.returning, "desktop reserved");
                    return Ok(reservation);
                }
                Attempt::NoneFree(count) => preparing = preparing.saturating_add(count),
                Attempt::Failed(reason) => {
                    failures.push(format!("{}: {reason}", snapshot.server_name(server)));
                }
            }
        }
        let preparing = preparing.saturating_add(snapshot.preparing_elsewhere(&template, &asked));
        // Nothing free: the dynamic balancer should know now, not at its tick.
        self.host.wake_policy();
        tracing::info!(%user, %template, preparing, failed = failures.len(), "no free desktop");
        if failures.is_empty() {
            Err(ConnectError::NoneFree {
                template,
                preparing,
            })
        } else {
            Err(ConnectError::NoDesktop {
                template,
                preparing,
                failures,
            })
        }
    }

    async fn attempt(
        &self,
        snapshot: &BrokerSnapshot,
        server: ServerId,
        request: ReserveRequest,
    ) -> Attempt {
        let deadline = self.settings.reserve_deadline;
        let outcome = if server == snapshot.own {
            let Some(desk) = self.local.get() else {
                return Attempt::Failed("this server's desktop service is not running".to_owned());
            };
            match tokio::time::timeout(deadline, desk.reserve(request)).await {
                Ok(answer) => answer.map_err(PeerDeskError::Refused),
                Err(_) => Err(PeerDeskError::Unreachable(format!(
                    "no answer within {deadline:?}"
                ))),
            }
        } else {
            let Some((_, Some(address))) = snapshot.servers.get(&server) else {
                return Attempt::Failed("no address to dial".to_owned());
            };
            match tokio::time::timeout(deadline, self.peers.reserve(server, *address, request))
                .await
            {
                Ok(answer) => answer,
                Err(_) => Err(PeerDeskError::Unreachable(format!(
                    "no answer within {deadline:?}"
                ))),
            }
        };
        match outcome {
            Ok(reservation) => Attempt::Reserved(reservation),
            Err(PeerDeskError::Refused(ReserveRefusal::NoneFree { preparing, .. })) => {
                Attempt::NoneFree(preparing)
            }
            Err(PeerDeskError::Refused(refusal)) => {
                tracing::warn!(%server, reason = %refusal, "reservation refused");
                Attempt::Failed(refusal.to_string())
            }
            Err(error @ PeerDeskError::Unreachable(_)) => {
                tracing::warn!(%server, reason = %error, "server did not answer a reservation; trying the next");
                self.host.report_unresponsive(server);
                Attempt::Failed(error.to_string())
            }
        }
    }

    /// Asks every server that hosts a session or reservation of `user` (as
    /// the state says) to end them.
    pub async fn log_off(&self, user: &UserName) -> Result<LogoffReport, LogoffError> {
        let snapshot = self.host.snapshot();
        let Some(servers) = snapshot
            .hosting_user
            .get(user)
            .filter(|set| !set.is_empty())
        else {
            return Err(LogoffError::NoSession { user: user.clone() });
        };
        let deadline = self.settings.reserve_deadline;
        let mut ended: u32 = 0;
        let mut failures = Vec::new();
        let mut names = Vec::new();
        for server in servers {
            let name = snapshot.server_name(*server);
            names.push(name.clone());
            let outcome = if *server == snapshot.own {
                match self.local.get() {
                    Some(desk) => tokio::time::timeout(deadline, desk.log_off(user.clone()))
                        .await
                        .map(|answer| answer.map_err(PeerDeskError::Refused)),
                    None => Ok(Err(PeerDeskError::Refused(ReserveRefusal::Unavailable {
                        reason: "this server's desktop service is not running".to_owned(),
                    }))),
                }
            } else {
                match snapshot.servers.get(server) {
                    Some((_, Some(address))) => {
                        tokio::time::timeout(
                            deadline,
                            self.peers.log_off(*server, *address, user.clone()),
                        )
                        .await
                    }
                    _ => Ok(Err(PeerDeskError::Unreachable(
                        "no address to dial".to_owned(),
                    ))),
                }
            };
            match outcome {
                Ok(Ok(count)) => ended = ended.saturating_add(count),
                Ok(Err(error)) => failures.push(format!("{name}: {error}")),
                Err(_) => {
                    self.host.report_unresponsive(*server);
                    failures.push(format!("{name}: no answer within {deadline:?}"));
                }
            }
        }
        if failures.is_empty() {
            tracing::info!(%user, ended, "user logged off");
            Ok(LogoffReport {
                user: user.clone(),
                ended,
                servers: names,
            })
        } else {
            Err(LogoffError::Incomplete {
                user: user.clone(),
                ended,
                failures,
            })
        }
    }
}

/// The template of this login: the one asked for if the user is entitled
/// to it, else their only one.
fn choose_template(
    snapshot: &BrokerSnapshot,
    user: &UserName,
    asked: Option<TemplateName>,
) -> Result<TemplateName, ConnectError> {
    let entitled = snapshot.entitled_templates(user);
    match asked {
        Some(template) if entitled.contains(&template) => Ok(template),
        Some(template) => Err(ConnectError::TemplateNotEntitled {
            user: user.clone(),
            template,
            entitled,
        }),
        None => match entitled.as_slice() {
            [] => Err(ConnectError::NotEntitled { user: user.clone() }),
            [only] => Ok(only.clone()),
            _ => Err(ConnectError::ChooseTemplate {
                user: user.clone(),
                templates: entitled,
            }),
        },
    }
}

#[cfg(test)]
mod tests;
