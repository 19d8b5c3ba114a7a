//! State dissemination, sans I/O: decides what to send to whom. The runtime
//! in `node.rs` does the sending; the simulator drives the same code.
//!
//! Two mechanisms, as DESIGN.md section 6 says:
//!
//! - **Push**: a change made here goes at once to every alive peer. Grid
//!   changes are rare (an admin's edit, a server's own record), so pushing
//!   to all is cheap and makes the common case one round trip.
//! - **Anti-entropy**: every `interval`, pull from one peer what we lack by
//!   sending our version vector. Peers are taken in a rotating order that
//!   starts at a seeded offset, so every peer is visited once per cycle and
//!   servers do not all pick the same one. This heals lost pushes,
//!   partitions, restarts and new servers.
//!
//! **Invariant:** no clock reads, no randomness beyond the seed given.

use crate::model::ServerId;
use crate::state::{Delta, VersionVector};

/// What the runtime should send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    /// Push this delta to `to`.
    Push { to: ServerId, delta: Delta },
    /// Ask `from` for what a replica with vector `since` lacks.
    Pull {
        from: ServerId,
        since: VersionVector,
    },
}

/// The dissemination state of one server.
#[derive(Debug, Clone)]
pub struct Disseminator {
    own: ServerId,
    interval_ms: u64,
    next_anti_entropy_ms: u64,
    /// Position in the rotation over alive peers.
    cursor: u64,
}

impl Disseminator {
    /// `seed` picks where the rotation starts (any value; tests fix it).
    pub fn new(own: ServerId, interval_ms: u64, seed: u64) -> Self {
        Self {
            own,
            interval_ms: interval_ms.max(1),
            next_anti_entropy_ms: 0,
            cursor: seed,
        }
    }

    /// A change made on this server: push it to every alive peer.
    pub fn on_local_change(&self, delta: &Delta, alive_peers: &[ServerId]) -> Vec<Outgoing> {
        alive_peers
            .iter()
            .filter(|peer| **peer != self.own)
            .map(|peer| Outgoing::Push {
                to: *peer,
                delta: delta.clone(),
            })
            .collect()
    }

    /// Called often; returns an anti-entropy pull when one is due.
    /// `alive_peers` must be sorted (any stable order works; sorted is the
    /// one every caller can produce).
    pub fn on_tick(
        &mut self,
        now_ms: u64,
        alive_peers: &[ServerId],
        own_vector: &VersionVector,
    ) -> Option<Outgoing> {
        if now_ms < self.next_anti_entropy_ms {
            return None;
        }
        self.next_anti_entropy_ms = now_ms + self.interval_ms;
        let peers: Vec<ServerId> = alive_peers
            .iter()
            .copied()
            .filter(|peer| *peer != self.own)
            .collect();
        if peers.is_empty() {
            return None;
        }
        let peer = peers[(self.cursor % peers.len() as u64) as usize];
        self.cursor = self.cursor.wrapping_add(1);
        Some(Outgoing::Pull {
            from: peer,
            since: own_vector.clone(),
        })
    }

    /// Makes the next tick pull at once (a new or returning server, or a
    /// push that arrived with a gap).
    pub fn pull_soon(&mut self) {
        self.next_anti_entropy_ms = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(byte: u8) -> ServerId {
        ServerId::from_bytes([byte; 16])
    }

    #[test]
    fn pushes_go_to_every_peer_but_self() {
        let disseminator = Disseminator::new(server(1), 1000, 0);
        let peers = [server(1), server(2), server(3)];
        let targets: Vec<ServerId> = disseminator
            .on_local_change(&Delta::default(), &peers)
            .into_iter()
            .map(|outgoing| match outgoing {
                Outgoing::Push { to, .. } => to,
                Outgoing::Pull { .. } => panic!("a change only pushes"),
            })
            .collect();
        assert_eq!(targets, [server(2), server(3)]);
    }

    #[test]
    fn anti_entropy_visits_every_peer_once_per_cycle_at_the_interval() {
        let mut disseminator = Disseminator::new(server(1), 1000, 7);
        let peers = [server(1), server(2), server(3), server(4)];
        let vector = VersionVector::new();
        let mut visited = Vec::new();
        let mut now = 0;
        for _ in 0..3 {
            match disseminator.on_tick(now, &peers, &vector) {
                Some(Outgoing::Pull { from, .. }) => visited.push(from),
                other => panic!("expected a pull at {now}, got {other:?}"),
            }
            assert_eq!(
                disseminator.on_tick(now + 999, &peers, &vector),
                None,
                "not before the interval"
            );
            now += 1000;
        }
        visited.sort();
        assert_eq!(visited, [server(2), server(3), server(4)]);
    }

    #[test]
    fn alone_there_is_nothing_to_pull() {
        let mut disseminator = Disseminator::new(server(1), 1000, 0);
        assert_eq!(
            disseminator.on_tick(0, &[server(1)], &VersionVector::new()),
            None
        );
    }
}
