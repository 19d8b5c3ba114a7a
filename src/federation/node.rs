//! The federation runtime of one server: answers peers, pushes this server's
//! changes to every peer, and runs anti-entropy. The decisions are in
//! `dissemination.rs`; this file does the I/O.
//!
//! Backpressure: each peer has a bounded queue of pushes served by its own
//! task. A slow or unreachable peer fills its queue and further pushes to it
//! are dropped (and counted in the log); anti-entropy brings it up to date
//! when it is reachable again. Memory stays bounded whatever a peer does.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};

use super::dissemination::{Disseminator, Outgoing};
use super::membership::{
    MemberId, MemberState, Membership, MembershipOutput, MembershipSettings, MembershipTimer,
};
use super::protocol::{self, JoinGrant, JoinRequest, PeerRequest, PeerResponse};
use super::transport::{BoxFuture, PeerEndpoint, PeerHandler, PeerIdentity};
use crate::model::ServerId;
use crate::state::{Delta, VersionVector};

/// What the federation needs from the grid state. Calls may block (they
/// fsync); the runtime makes them on tokio's blocking pool.
pub trait GridStateAccess: Send + Sync + 'static {
    fn version_vector(&self) -> VersionVector;
    fn delta_since(&self, since: &VersionVector) -> Delta;
    /// Merges a peer's delta; returns how many entries were new.
    fn apply_remote(&self, from: ServerId, delta: &Delta) -> Result<usize, String>;
    fn admit_joiner(&self, request: &JoinRequest) -> Result<JoinGrant, String>;
    /// Every other server of the grid with its addresses.
    fn peers(&self) -> Vec<(ServerId, Vec<String>)>;
    fn revoked(&self) -> Vec<ServerId>;
    /// What the failure detector says of every other member.
    fn report_members(&self, members: BTreeMap<ServerId, MemberState>);
}

/// Timings of the runtime.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// How often anti-entropy pulls from one peer.
    pub anti_entropy_interval: Duration,
    /// How long one request may take.
    pub request_deadline: Duration,
}

impl Default for NodeSettings {
    fn default() -> Self {
        Self {
            // Each peer is visited every (peers × 2 s); pushes carry changes
            // at once, anti-entropy only repairs.
            anti_entropy_interval: Duration::from_secs(2),
            request_deadline: Duration::from_secs(30),
        }
    }
}

/// Pushes waiting for one peer before new ones are dropped.
const PUSH_QUEUE: usize = 64;
/// Membership datagrams waiting to be handled before new ones are dropped.
const DATAGRAM_QUEUE: usize = 1024;

/// Peers to push to and pull from: every known server but those the failure
/// detector declared down (missing). Servers it has not heard of yet are
/// tried: dissemination must not wait for membership to converge.
fn reachable(peers: &[(ServerId, Vec<String>)], membership: &Membership) -> Vec<ServerId> {
    let members = membership.members();
    peers
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| members.get(id) != Some(&MemberState::Down))
        .collect()
}

/// Carries out what the membership asked for: datagrams, timers, news.
fn drive_membership(
    membership: &mut Membership,
    endpoint: &Arc<PeerEndpoint>,
    timers: &mpsc::UnboundedSender<MembershipTimer>,
    access: &Arc<dyn GridStateAccess>,
) {
    let mut changed = false;
    for output in membership.take_outputs() {
        match output {
            MembershipOutput::Send { to, bytes } => {
                let endpoint = Arc::clone(endpoint);
                tokio::spawn(async move {
                    let sent = async {
                        let connection = endpoint.connection(to.address, to.server).await?;
                        connection.send_datagram(bytes::Bytes::from(bytes))
                    }
                    .await;
                    if let Err(error) = sent {
                        tracing::trace!(peer = %to.server, error = %error, "membership datagram not sent");
                    }
                });
            }
            MembershipOutput::ScheduleTimer { after, timer } => {
                let timers = timers.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = timers.send(timer);
                });
            }
            MembershipOutput::Notify(event) => {
                changed = true;
                match event.state {
                    MemberState::Alive => tracing::info!(server = %event.server, "member alive"),
                    MemberState::Suspect => {
                        tracing::warn!(server = %event.server, "member suspect")
                    }
                    MemberState::Down => tracing::warn!(server = %event.server, "member missing"),
                }
            }
        }
    }
    if changed {
        access.report_members(membership.members());
    }
}

/// Answers peers' requests and hands their datagrams to the membership.
struct RequestHandler {
    access: Arc<dyn GridStateAccess>,
    datagrams: mpsc::Sender<(ServerId, bytes::Bytes)>,
}

impl PeerHandler for RequestHandler {
    fn handle_request(&self, peer: PeerIdentity, request: Vec<u8>) -> BoxFuture<Vec<u8>> {
        let access = Arc::clone(&self.access);
        Box::pin(async move {
            let response = match protocol::decode::<PeerRequest>(&request) {
                Err(error) => {
                    tracing::warn!(%peer, error = %error, "undecodable request dropped");
                    PeerResponse::Refused {
                        reason: error.to_string(),
                    }
                }
                Ok(request) => {
                    tokio::task::spawn_blocking(move || dispatch(access.as_ref(), peer, request))
                        .await
                        .unwrap_or_else(|error| PeerResponse::Refused {
                            reason: format!("request failed: {error}"),
                        })
                }
            };
            protocol::encode(&response)
        })
    }

    fn handle_datagram(&self, peer: ServerId, datagram: bytes::Bytes) {
        // A full queue drops the datagram: SWIM is built to survive loss.
        if self.datagrams.try_send((peer, datagram)).is_err() {
            tracing::debug!(%peer, "membership datagram dropped: queue full");
        }
    }
}

fn dispatch(
    access: &dyn GridStateAccess,
    peer: PeerIdentity,
    request: PeerRequest,
) -> PeerResponse {
    let refused = |reason: String| PeerResponse::Refused { reason };
    if let PeerIdentity::Server(server) = peer {
        // The transport refuses new connections from a removed server; this
        // covers connections it opened before the removal reached us.
        if access.revoked().contains(&server) {
            tracing::warn!(peer = %server, "request from a removed server refused");
            return refused("this server was removed from the grid".to_owned());
        }
    }
    match (peer, request) {
        (PeerIdentity::Server(server), PeerRequest::PushDelta { delta }) => {
            match access.apply_remote(server, &delta) {
                Ok(changed) => PeerResponse::Merged { changed },
                Err(reason) => {
                    tracing::warn!(peer = %server, %reason, "pushed delta refused");
                    refused(reason)
                }
            }
        }
        (PeerIdentity::Server(_), PeerRequest::PullState { since }) => PeerResponse::State {
            delta: access.delta_since(&since),
            vector: access.version_vector(),
        },
        (PeerIdentity::Joiner { remote }, PeerRequest::Join(request)) => {
            match access.admit_joiner(&request) {
                Ok(grant) => PeerResponse::Joined(Box::new(grant)),
                Err(reason) => {
                    tracing::warn!(%remote, %reason, "join refused");
                    refused(reason)
                }
            }
        }
        (PeerIdentity::Joiner { remote }, _) => {
            tracing::warn!(%remote, "a connection without a certificate asked for more than a join");
            refused("a join connection may only join".to_owned())
        }
        (PeerIdentity::Server(_), PeerRequest::Join(_)) => {
            refused("this server is already a member".to_owned())
        }
    }
}

/// The first address of a peer that can be dialled.
fn dialable(addresses: &[String]) -> Option<SocketAddr> {
    addresses
        .iter()
        .filter_map(|address| address.parse::<SocketAddr>().ok())
        .find(|address| !address.ip().is_unspecified() && address.port() != 0)
}

/// Runs until `shutdown` turns true.
pub async fn run(
    endpoint: Arc<PeerEndpoint>,
    access: Arc<dyn GridStateAccess>,
    mut changes: broadcast::Receiver<Delta>,
    settings: NodeSettings,
    advertised: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let own = endpoint.server_id();
    let (datagram_sender, mut datagrams) = mpsc::channel(DATAGRAM_QUEUE);
    let server = tokio::spawn(Arc::clone(&endpoint).serve(Arc::new(RequestHandler {
        access: Arc::clone(&access),
        datagrams: datagram_sender,
    })));
    let interval_ms = u64::try_from(settings.anti_entropy_interval.as_millis()).unwrap_or(u64::MAX);
    let mut disseminator = Disseminator::new(own, interval_ms, rand::random());
    let mut push_queues: BTreeMap<ServerId, mpsc::Sender<Delta>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = tokio::time::Instant::now();
    let elapsed_ms = move || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let pull_running = Arc::new(tokio::sync::Mutex::new(()));

    // Membership: a new generation at every start, so a server once declared
    // down comes back as itself.
    let generation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        });
    let (timer_sender, mut timers) = mpsc::unbounded_channel::<MembershipTimer>();
    let mut membership = match Membership::new(
        MemberId::new(own, advertised, generation),
        MembershipSettings::default(),
        rand::random(),
    ) {
        Ok(membership) => membership,
        Err(error) => {
            tracing::error!(error = %crate::error_chain(&error), "cannot start membership");
            server.abort();
            return;
        }
    };
    let known: Vec<(ServerId, SocketAddr)> = blocking(&access, |access| access.peers())
        .await
        .into_iter()
        .filter_map(|(id, addresses)| dialable(&addresses).map(|address| (id, address)))
        .collect();
    if let Err(error) = membership.join_known(known, elapsed_ms()) {
        tracing::debug!(error = %crate::error_chain(&error), "membership join");
    }
    drive_membership(&mut membership, &endpoint, &timer_sender, &access);

    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some((peer, datagram)) = datagrams.recv() => {
                if let Err(error) = membership.handle_datagram(peer, &datagram, elapsed_ms()) {
                    tracing::debug!(%peer, error = %crate::error_chain(&error), "membership datagram dropped");
                }
                drive_membership(&mut membership, &endpoint, &timer_sender, &access);
            }
            Some(timer) = timers.recv() => {
                if let Err(error) = membership.handle_timer(timer, elapsed_ms()) {
                    tracing::debug!(error = %crate::error_chain(&error), "membership timer");
                }
                drive_membership(&mut membership, &endpoint, &timer_sender, &access);
            }
            change = changes.recv() => match change {
                Ok(delta) => {
                    let peers = blocking(&access, |access| access.peers()).await;
                    let alive = reachable(&peers, &membership);
                    for outgoing in disseminator.on_local_change(&delta, &alive) {
                        let Outgoing::Push { to, delta } = outgoing else { continue };
                        let Some(address) = peers.iter().find(|(id, _)| *id == to).and_then(|(_, addresses)| dialable(addresses)) else {
                            tracing::debug!(peer = %to, "no dialable address; anti-entropy will carry the change");
                            continue;
                        };
                        let queue = push_queues.entry(to).or_insert_with(|| {
                            spawn_push_worker(Arc::clone(&endpoint), Arc::clone(&access), to, address, settings.request_deadline)
                        });
                        if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(delta) {
                            tracing::warn!(peer = %to, "peer is slow: push dropped, anti-entropy will carry it");
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "federation fell behind local changes; anti-entropy will carry them");
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = tick.tick() => {
                let (peers, vector, revoked) = blocking(&access, |access| (access.peers(), access.version_vector(), access.revoked())).await;
                endpoint.revocations().replace_all(revoked);
                let alive = reachable(&peers, &membership);
                let now_ms = elapsed_ms();
                if let Some(Outgoing::Pull { from, since }) = disseminator.on_tick(now_ms, &alive, &vector) {
                    let Some(address) = peers.iter().find(|(id, _)| *id == from).and_then(|(_, addresses)| dialable(addresses)) else { continue };
                    let Ok(guard) = Arc::clone(&pull_running).try_lock_owned() else { continue };
                    let endpoint = Arc::clone(&endpoint);
                    let access = Arc::clone(&access);
                    let deadline = settings.request_deadline;
                    tokio::spawn(async move {
                        let _guard = guard;
                        if let Err(error) = pull(&endpoint, &access, from, address, since, deadline).await {
                            tracing::debug!(peer = %from, error = %format!("{error:#}"), "anti-entropy pull failed");
                        }
                    });
                }
            }
        }
    }
    drop(push_queues);
    endpoint.close();
    server.abort();
}

async fn blocking<T: Send + 'static>(
    access: &Arc<dyn GridStateAccess>,
    call: impl FnOnce(&dyn GridStateAccess) -> T + Send + 'static,
) -> T {
    let access = Arc::clone(access);
    match tokio::task::spawn_blocking(move || call(access.as_ref())).await {
        Ok(value) => value,
        Err(error) => std::panic::resume_unwind(error.into_panic()),
    }
}

fn spawn_push_worker(
    endpoint: Arc<PeerEndpoint>,
    access: Arc<dyn GridStateAccess>,
    peer: ServerId,
    address: SocketAddr,
    deadline: Duration,
) -> mpsc::Sender<Delta> {
    let (sender, mut receiver) = mpsc::channel::<Delta>(PUSH_QUEUE);
    tokio::spawn(async move {
        while let Some(delta) = receiver.recv().await {
            let outcome = async {
                let connection = endpoint.connection(address, peer).await?;
                let answer = connection
                    .request(
                        &protocol::encode(&PeerRequest::PushDelta { delta }),
                        deadline,
                    )
                    .await?;
                anyhow::Ok(protocol::decode::<PeerResponse>(&answer)?)
            }
            .await;
            match outcome {
                Ok(PeerResponse::Merged { .. }) => {}
                Ok(PeerResponse::Refused { reason }) => {
                    tracing::warn!(%peer, %reason, "peer refused a push")
                }
                Ok(other) => tracing::warn!(%peer, ?other, "unexpected answer to a push"),
                Err(error) => {
                    tracing::debug!(%peer, error = %format!("{error:#}"), "push failed; anti-entropy will carry it")
                }
            }
        }
        drop(access);
    });
    sender
}

async fn pull(
    endpoint: &PeerEndpoint,
    access: &Arc<dyn GridStateAccess>,
    peer: ServerId,
    address: SocketAddr,
    since: VersionVector,
    deadline: Duration,
) -> anyhow::Result<()> {
    let connection = endpoint.connection(address, peer).await?;
    let answer = connection
        .request(
            &protocol::encode(&PeerRequest::PullState { since }),
            deadline,
        )
        .await?;
    match protocol::decode::<PeerResponse>(&answer)? {
        PeerResponse::State { delta, vector } => {
            if !delta.is_empty() {
                let changed = blocking(access, move |access| access.apply_remote(peer, &delta))
                    .await
                    .map_err(anyhow::Error::msg)?;
                if changed > 0 {
                    tracing::info!(%peer, changed, "anti-entropy brought changes");
                }
            }
            // Push-pull: send back what the peer lacks, so a server that does
            // not know us yet still learns from us.
            let back = blocking(access, move |access| access.delta_since(&vector)).await;
            if !back.is_empty() {
                let answer = connection
                    .request(
                        &protocol::encode(&PeerRequest::PushDelta { delta: back }),
                        deadline,
                    )
                    .await?;
                if let PeerResponse::Refused { reason } = protocol::decode::<PeerResponse>(&answer)?
                {
                    anyhow::bail!("push-back refused: {reason}");
                }
            }
            Ok(())
        }
        PeerResponse::Refused { reason } => anyhow::bail!("refused: {reason}"),
        other => anyhow::bail!("unexpected answer {other:?}"),
    }
}
