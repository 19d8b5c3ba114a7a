//! Per-VM agent channels on the appliance: one reader thread per running
//! desktop VM, reading its `org.deskgrid.agent.0` channel through the
//! actuator (a libvirt channel stream) and handing what the agent said to
//! the desktop service as [`AgentReport`]s.
//!
//! Every guest is hostile until shown otherwise, and none of it can crash
//! or stall the service:
//! - frames go through the shared [`FrameDecoder`] (bounded, never panics);
//!   a malformed frame is counted and dropped, an oversized length resets
//!   the channel (reopened with a fresh decoder);
//! - what a guest may send is rate-limited (bytes and messages, token
//!   buckets with a burst); what is over the limit is counted and dropped;
//! - a `Hello` naming another VM's UUID is counted and the channel is not
//!   believed until a `Hello` with its own UUID: a guest speaks only for
//!   its own VM, whatever it claims;
//! - reports go to the service through a bounded queue with `try_send`: a
//!   full queue drops the report (counted), it never blocks the reader, and
//!   a reader never blocks the service.
//!
//! The channel is the identity: a report carries the VM whose channel it
//! came from, never an id the guest sent.

use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::protocol::{encode, FrameDecoder, Message};
use crate::actuator::{ActuatorError, Hypervisor};
use crate::model::VmId;

/// What one guest may send. Agents send a heartbeat every couple of seconds
/// and a message per login or logout: the defaults leave a hundredfold
/// margin and still bound what a flood costs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChannelLimits {
    pub bytes_per_s: f64,
    pub burst_bytes: f64,
    pub messages_per_s: f64,
    pub burst_messages: f64,
    /// How long to wait before reopening a channel that failed or closed.
    pub reopen_after: Duration,
    /// The heartbeat interval the appliance asks agents for.
    pub heartbeat_interval: Duration,
}

impl Default for ChannelLimits {
    fn default() -> Self {
        Self {
            bytes_per_s: 16.0 * 1024.0,
            burst_bytes: 256.0 * 1024.0,
            messages_per_s: 20.0,
            burst_messages: 100.0,
            reopen_after: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(2),
        }
    }
}

/// What a channel saw, for status and tests; updated as it happens.
#[derive(Debug, Default)]
pub struct ChannelCounters {
    /// Messages accepted and reported.
    pub messages: AtomicU64,
    /// Frames that did not decode (dropped).
    pub bad_frames: AtomicU64,
    /// Messages or bytes over the rate limit (dropped).
    pub rate_limited: AtomicU64,
    /// Times the stream was reset (an oversized frame, a read error).
    pub resets: AtomicU64,
    /// `Hello`s naming another VM, and messages before a believable `Hello`.
    pub foreign: AtomicU64,
    /// Reports dropped because the service's queue was full.
    pub queue_full: AtomicU64,
}

impl ChannelCounters {
    pub fn snapshot(&self) -> ChannelCountersSnapshot {
        ChannelCountersSnapshot {
            messages: self.messages.load(Ordering::Relaxed),
            bad_frames: self.bad_frames.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            foreign: self.foreign.load(Ordering::Relaxed),
            queue_full: self.queue_full.load(Ordering::Relaxed),
        }
    }
}

/// [`ChannelCounters`] read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChannelCountersSnapshot {
    pub messages: u64,
    pub bad_frames: u64,
    pub rate_limited: u64,
    pub resets: u64,
    pub foreign: u64,
    pub queue_full: u64,
}

/// What a VM's agent did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// A believable `Hello`: the agent runs in this VM.
    Hello {
        agent_version: String,
        os: String,
        hostname: String,
    },
    Heartbeat {
        seq: u64,
        uptime_ms: u64,
    },
    Login {
        user: String,
        session: String,
    },
    Logout {
        user: String,
        session: String,
    },
    /// Every user with a live session in the guest.
    Sessions {
        users: Vec<String>,
    },
}

/// An [`AgentEvent`] from the channel of `vm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    pub vm: VmId,
    pub event: AgentEvent,
}

/// A running reader of one VM's channel. Dropping it asks the thread to
/// stop; it ends at its next read (heartbeats come every few seconds) or
/// when the domain goes.
#[derive(Debug)]
pub struct AgentChannel {
    vm: VmId,
    stop: Arc<AtomicBool>,
    counters: Arc<ChannelCounters>,
    thread: Option<JoinHandle<()>>,
    /// Host-to-guest messages; the reader writes them after its next read
    /// (the agent speaks every heartbeat, so within one interval).
    outgoing: std::sync::mpsc::SyncSender<Message>,
}

/// Host-to-guest messages queued per channel before more are refused.
const OUTGOING_QUEUE: usize = 16;

impl AgentChannel {
    /// Starts reading `vm`'s channel on a thread of its own (channel reads
    /// block in libvirt), reporting to `reports`.
    pub fn start(
        host: Arc<dyn Hypervisor>,
        vm: VmId,
        limits: ChannelLimits,
        reports: mpsc::Sender<AgentReport>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ChannelCounters::default());
        let (outgoing, to_send) = std::sync::mpsc::sync_channel(OUTGOING_QUEUE);
        let reader = Reader {
            host,
            vm,
            limits,
            reports,
            stop: Arc::clone(&stop),
            counters: Arc::clone(&counters),
            to_send,
        };
        let thread = std::thread::Builder::new()
            .name(format!("agent-{}", short(vm)))
            .spawn(move || reader.run())?;
        Ok(Self {
            vm,
            stop,
            counters,
            thread: Some(thread),
            outgoing,
        })
    }

    /// Queues `message` for the guest; `false` when the queue is full or
    /// the reader has ended.
    pub fn send(&self, message: Message) -> bool {
        self.outgoing.try_send(message).is_ok()
    }

    pub fn vm(&self) -> VmId {
        self.vm
    }

    pub fn counters(&self) -> ChannelCountersSnapshot {
        self.counters.snapshot()
    }

    /// Whether the reader thread has ended (the domain went away).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

impl Drop for AgentChannel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Not joined: the thread may sit in a read until the guest speaks.
        self.thread.take();
    }
}

fn short(vm: VmId) -> String {
    vm.to_string().chars().take(8).collect()
}

/// A token bucket: `rate` tokens a second up to `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            tokens: burst,
            rate,
            burst,
            at: Instant::now(),
        }
    }

    fn take(&mut self, amount: f64) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }
}

/// Why a channel session ended.
#[derive(Debug)]
enum Ended {
    Stopped,
    Open(ActuatorError),
    Read(std::io::Error),
    Closed,
    Desynchronised,
    /// The domain is gone or stopped: the reader ends.
    DomainGone,
}

struct Reader {
    host: Arc<dyn Hypervisor>,
    vm: VmId,
    limits: ChannelLimits,
    reports: mpsc::Sender<AgentReport>,
    stop: Arc<AtomicBool>,
    counters: Arc<ChannelCounters>,
    to_send: std::sync::mpsc::Receiver<Message>,
}

impl Reader {
    fn run(self) {
        let vm = self.vm;
        let mut bytes = Bucket::new(self.limits.bytes_per_s, self.limits.burst_bytes);
        let mut messages = Bucket::new(self.limits.messages_per_s, self.limits.burst_messages);
        loop {
            let ended = self.session(&mut bytes, &mut messages);
            match ended {
                Ended::Stopped => return,
                Ended::DomainGone => {
                    tracing::debug!(%vm, "agent channel: the domain is gone; reader ends");
                    return;
                }
                Ended::Open(error) => {
                    tracing::debug!(%vm, error = %crate::error_chain(&error), "agent channel cannot be opened yet")
                }
                Ended::Read(error) => {
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%vm, %error, "agent channel read failed; reopening")
                }
                Ended::Closed => {
                    tracing::debug!(%vm, "agent channel closed; reopening")
                }
                Ended::Desynchronised => {
                    self.counters.resets.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%vm, "agent sent a frame over the size limit; channel reset")
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(self.limits.reopen_after);
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }

    /// One open channel, until it fails or the reader is stopped.
    fn session(&self, bytes: &mut Bucket, messages: &mut Bucket) -> Ended {
        let mut channel = match self.host.open_guest_channel(self.vm) {
            Ok(channel) => channel,
            Err(ActuatorError::DomainNotFound { .. } | ActuatorError::DomainNotRunning { .. }) => {
                return Ended::DomainGone
            }
            Err(error) => return Ended::Open(error),
        };
        let mut decoder = FrameDecoder::new();
        let mut believed = false;
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ended::Stopped;
            }
            let read = match channel.read(&mut buffer) {
                Ok(0) => return Ended::Closed,
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Ended::Read(error),
            };
            if !bytes.take(read as f64) {
                // Over the byte budget: the bytes are dropped, and with them
                // the framing, so the stream starts afresh.
                self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                decoder.reset();
                continue;
            }
            decoder.push(&buffer[..read]);
            while let Some(decoded) = decoder.next_message() {
                let message = match decoded {
                    Ok(message) => message,
                    Err(error) if error.is_stream_fatal() => {
                        self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                        return Ended::Desynchronised;
                    }
                    Err(error) => {
                        self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(vm = %self.vm, %error, "agent frame dropped");
                        continue;
                    }
                };
                if !messages.take(1.0) {
                    self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Some(reply) = self.take(message, &mut believed) {
                    if let Ok(frame) = encode(&reply) {
                        if let Err(error) = channel.write_all(&frame) {
                            return Ended::Read(error);
                        }
                    }
                }
            }
            if decoder.is_desynchronised() {
                return Ended::Desynchronised;
            }
            // What the host has for the guest, now that it is listening.
            while let Ok(message) = self.to_send.try_recv() {
                if let Ok(frame) = encode(&message) {
                    if let Err(error) = channel.write_all(&frame) {
                        return Ended::Read(error);
                    }
                }
            }
        }
    }

    /// Handles one message; returns the answer to send, if any.
    fn take(&self, message: Message, believed: &mut bool) -> Option<Message> {
        let (event, reply) = match message {
            Message::Hello {
                agent_version,
                os,
                hostname,
                vm_uuid,
            } => {
                // The SMBIOS UUID is the domain's, which is the VM id; an
                // agent that could not read it is believed (the channel
                // is the VM's anyway), one that names another VM is not.
                let own = self.vm.to_string();
                if vm_uuid
                    .as_deref()
                    .is_some_and(|uuid| !uuid.trim().eq_ignore_ascii_case(&own))
                {
                    self.counters.foreign.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(vm = %self.vm, claimed = ?vm_uuid, "agent hello names another VM; ignored");
                    *believed = false;
                    return None;
                }
                *believed = true;
                let interval =
                    u32::try_from(self.limits.heartbeat_interval.as_millis()).unwrap_or(u32::MAX);
                (
                    AgentEvent::Hello {
                        agent_version,
                        os,
                        hostname,
                    },
                    Some(Message::HelloAck {
                        heartbeat_interval_ms: interval,
                    }),
                )
            }
            _ if !*believed => {
                self.counters.foreign.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Message::Heartbeat { seq, uptime_ms } => (
                AgentEvent::Heartbeat { seq, uptime_ms },
                Some(Message::Ack { seq }),
            ),
            Message::Login { user, session } => (AgentEvent::Login { user, session }, None),
            Message::Logout { user, session } => (AgentEvent::Logout { user, session }, None),
            Message::Sessions { users } => (AgentEvent::Sessions { users }, None),
            // Host-to-guest messages have no business coming from a guest.
            Message::Ack { .. } | Message::HelloAck { .. } | Message::LogOff { .. } => {
                self.counters.bad_frames.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        match self.reports.try_send(AgentReport { vm: self.vm, event }) {
            Ok(()) => {
                self.counters.messages.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
            }
        }
        reply
    }
}
