//! Hints for the failure detector from outside SWIM's own probes: the
//! connection broker reports a server that missed a reservation deadline,
//! and the membership makes it suspect at once (`Membership::suspect`)
//! instead of waiting for its own probe of that server to fail.

use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::mpsc;

use crate::model::ServerId;

/// Hints queued before the membership takes them; more are dropped (a hint
/// is advice, and one per server is all that matters).
const HINT_QUEUE: usize = 256;

/// A cheap handle: the broker reports through it, `node::run` takes the
/// receiving end once.
#[derive(Debug, Clone)]
pub struct FailureHints {
    sender: mpsc::Sender<ServerId>,
    receiver: Arc<Mutex<Option<mpsc::Receiver<ServerId>>>>,
}

impl Default for FailureHints {
    fn default() -> Self {
        Self::new()
    }
}

impl FailureHints {
    pub fn new() -> Self {
        let (sender, receiver) = mpsc::channel(HINT_QUEUE);
        Self {
            sender,
            receiver: Arc::new(Mutex::new(Some(receiver))),
        }
    }

    /// `server` did not answer in time. Never blocks; a full queue or a
    /// membership that is not running drops the hint.
    pub fn report(&self, server: ServerId) {
        if self.sender.try_send(server).is_err() {
            tracing::debug!(%server, "failure hint dropped (queue full or no membership running)");
        }
    }

    /// The receiving end, for the one membership loop of this server.
    pub(crate) fn take_receiver(&self) -> Option<mpsc::Receiver<ServerId>> {
        self.receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}
