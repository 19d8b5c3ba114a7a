//! The guest agent: runs inside every desktop VM and reports heartbeats,
//! logins and logouts to the appliance over virtio-serial.
//!
//! `deskgrid-agent [PORT] [--heartbeat-ms N] [--utmp PATH] [--logind-dir PATH]`
//!
//! It opens the port (by default `/dev/virtio-ports/org.deskgrid.agent.0`),
//! sends `Hello` and the current `Sessions`, then a `Heartbeat` every
//! interval (the host's `HelloAck` may change it), and polls the guest's
//! sessions every second, sending `Login`/`Logout` for users who appear or
//! disappear and a fresh `Sessions` after each change. When the port fails
//! (end of file, EIO, ENXIO: a virtio port does this while the host side is
//! closed) it logs one line, waits a second and reopens it, forever.
//!
//! Threads: the connection's own thread writes and keeps time; one reader
//! thread per connection decodes host frames and hands them over a channel.
//!
//! **Invariant:** the agent uses only the standard library and the shared
//! agent protocol; it never links libvirt, QUIC or TLS
//! (`tests/agent_dependencies.rs` checks the binary).

#[path = "deskgrid-agent/guest_sessions.rs"]
mod guest_sessions;
/// The library's `deskgrid::desktop::protocol`, the very same file, compiled
/// into the agent rather than linked: linking the library would also link,
/// through generic code shared between crates in debug builds, parts of its
/// tokio, QUIC and libvirt dependencies (tests/agent_dependencies.rs).
// The agent speaks the guest side only; the host side's helpers go unused.
#[allow(dead_code)]
#[path = "../desktop/protocol.rs"]
mod protocol;

use std::fmt;
use std::fs::File;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use protocol::{encode, FrameDecoder, FrameError, Message, MAX_SESSION_USERS, MAX_TEXT_LEN};

use guest_sessions::{read_live_sessions, session_leaders, LiveSessions, SessionSources};

const DEFAULT_PORT: &str = "/dev/virtio-ports/org.deskgrid.agent.0";
/// `/var/run` is a symlink to `/run` on current systems; older ones keep
/// utmp only under `/var/run`.
const DEFAULT_UTMP_CANDIDATES: &[&str] = &["/var/run/utmp", "/run/utmp"];
const DEFAULT_LOGIND_DIR: &str = "/run/systemd/sessions";
const DEFAULT_HEARTBEAT: Duration = Duration::from_millis(2000);
/// Bounds on the heartbeat interval, whoever sets it: a confused host can
/// neither make the agent spin nor silence it for long.
const MIN_HEARTBEAT: Duration = Duration::from_millis(100);
const MAX_HEARTBEAT: Duration = Duration::from_secs(600);
/// A login shows up on the host within about a second; reading two small
/// files once a second costs nothing measurable.
const SESSION_POLL: Duration = Duration::from_secs(1);
/// Between a failed port and the next open: quick to reconnect once the host
/// is back, slow enough that a missing port costs nothing.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// After a logoff's signals, the sessions are read again this soon.
const LOGOFF_SETTLE: Duration = Duration::from_millis(200);
/// Session processes still there this long after SIGHUP/SIGTERM are killed.
const LOGOFF_KILL_AFTER: Duration = Duration::from_secs(5);
/// One read from the port; host frames are a dozen bytes.
const READ_BUFFER_LEN: usize = 4096;

#[derive(Debug)]
struct Options {
    port: PathBuf,
    heartbeat: Duration,
    sources: SessionSources,
}

fn main() -> ExitCode {
    match parse_arguments(std::env::args().skip(1)) {
        Ok(Command::Run(options)) => run_forever(&options),
        Ok(Command::Version) => {
            println!("deskgrid-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Help) => {
            println!(
                "deskgrid-agent {}: the deskgrid guest agent\n\n\
                 usage: deskgrid-agent [PORT] [--heartbeat-ms N] [--utmp PATH] [--logind-dir PATH]\n\n  \
                 PORT               the virtio-serial port (default {DEFAULT_PORT})\n  \
                 --heartbeat-ms N   heartbeat interval until the host sets one (default {})\n  \
                 --utmp PATH        the utmp file (default {}, else {})\n  \
                 --logind-dir PATH  logind's session files (default {DEFAULT_LOGIND_DIR})\n  \
                 --version          print the version",
                env!("CARGO_PKG_VERSION"),
                DEFAULT_HEARTBEAT.as_millis(),
                DEFAULT_UTMP_CANDIDATES[0],
                DEFAULT_UTMP_CANDIDATES[1],
            );
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("deskgrid-agent: {message} (try --help)");
            ExitCode::from(2)
        }
    }
}

#[derive(Debug)]
enum Command {
    Run(Options),
    Version,
    Help,
}

fn parse_arguments(mut arguments: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut port = None;
    let mut heartbeat = DEFAULT_HEARTBEAT;
    let mut utmp = None;
    let mut logind_dir = PathBuf::from(DEFAULT_LOGIND_DIR);
    while let Some(argument) = arguments.next() {
        let mut value = |name: &str| {
            arguments
                .next()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match argument.as_str() {
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--heartbeat-ms" => {
                let text = value("--heartbeat-ms")?;
                let millis: u64 = text
                    .parse()
                    .map_err(|_| format!("--heartbeat-ms {text:?} is not a number"))?;
                heartbeat = clamp_heartbeat(Duration::from_millis(millis));
            }
            "--utmp" => utmp = Some(PathBuf::from(value("--utmp")?)),
            "--logind-dir" => logind_dir = PathBuf::from(value("--logind-dir")?),
            other if other.starts_with('-') => return Err(format!("unknown option {other:?}")),
            other if port.is_none() => port = Some(PathBuf::from(other)),
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    let utmp_candidates = match utmp {
        Some(path) => vec![path],
        None => DEFAULT_UTMP_CANDIDATES.iter().map(PathBuf::from).collect(),
    };
    Ok(Command::Run(Options {
        port: port.unwrap_or_else(|| PathBuf::from(DEFAULT_PORT)),
        heartbeat,
        sources: SessionSources {
            utmp_candidates,
            logind_dir,
        },
    }))
}

fn clamp_heartbeat(interval: Duration) -> Duration {
    interval.clamp(MIN_HEARTBEAT, MAX_HEARTBEAT)
}

/// Why a connection ended.
#[derive(Debug)]
enum ConnectionEnd {
    Open(std::io::Error),
    /// The port read end of file: on virtio-serial, the host side is closed.
    EndOfFile,
    Read(std::io::Error),
    Write(std::io::Error),
    /// The host's byte stream is out of step; only a new connection helps.
    HostStream(FrameError),
    ReaderThread(std::io::Error),
}

impl fmt::Display for ConnectionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionEnd::Open(error) => write!(f, "cannot open: {error}"),
            ConnectionEnd::EndOfFile => write!(f, "closed by the host (end of file)"),
            ConnectionEnd::Read(error) => write!(f, "read failed: {error}"),
            ConnectionEnd::Write(error) => write!(f, "write failed: {error}"),
            ConnectionEnd::HostStream(error) => write!(f, "host stream unusable: {error}"),
            ConnectionEnd::ReaderThread(error) => {
                write!(f, "cannot start the reader thread: {error}")
            }
        }
    }
}

/// What the reader thread hands to the connection.
#[derive(Debug)]
enum HostEvent {
    Message(Message),
    /// A frame the host should not have sent; dropped.
    BadFrame(FrameError),
    Ended(ConnectionEnd),
}

/// Connects, serves the connection until it fails, waits, again. Log lines
/// are not repeated while the port keeps failing the same way (a guest
/// whose host side is closed would otherwise log every second).
fn run_forever(options: &Options) -> ExitCode {
    eprintln!(
        "deskgrid-agent {} on {}",
        env!("CARGO_PKG_VERSION"),
        options.port.display()
    );
    let mut tracker = SessionTracker::default();
    let mut last_logged = None;
    loop {
        let end = serve_connection(options, &mut tracker, &mut last_logged);
        let line = format!("port {}: {end}; reopening", options.port.display());
        if last_logged.as_deref() != Some(line.as_str()) {
            eprintln!("deskgrid-agent: {line}");
            last_logged = Some(line);
        }
        std::thread::sleep(REOPEN_DELAY);
    }
}

/// One connection, from open to failure.
fn serve_connection(
    options: &Options,
    tracker: &mut SessionTracker,
    last_logged: &mut Option<String>,
) -> ConnectionEnd {
    let port = match File::options().read(true).write(true).open(&options.port) {
        Ok(port) => port,
        Err(error) => return ConnectionEnd::Open(error),
    };
    let mut connection = Connection {
        port,
        started: Instant::now(),
    };
    // What changed while disconnected reaches the host as this Sessions.
    tracker.update(read_sessions(options, last_logged));
    if let Err(end) = connection
        .send(&hello())
        .and_then(|()| connection.send(&tracker.sessions_message()))
    {
        return end;
    }

    // The reader starts after the first write: on virtio-serial a write
    // waits for the host, a read returns end of file while it is away.
    let (events, host_events) = mpsc::channel();
    let reader_port = match connection.port.try_clone() {
        Ok(port) => port,
        Err(error) => return ConnectionEnd::ReaderThread(error),
    };
    if let Err(error) = std::thread::Builder::new()
        .name("host-reader".into())
        .spawn(move || read_host_frames(reader_port, events))
    {
        return ConnectionEnd::ReaderThread(error);
    }

    let mut heartbeat = options.heartbeat;
    let mut seq = 0u64;
    let mut next_heartbeat = Instant::now();
    let mut next_poll = Instant::now() + SESSION_POLL;
    let mut host_answered = false;
    let mut bad_frame_logged = false;
    loop {
        let now = Instant::now();
        if now >= next_heartbeat {
            let beat = Message::Heartbeat {
                seq,
                uptime_ms: uptime_ms(),
            };
            if let Err(end) = connection.send(&beat) {
                return end;
            }
            seq += 1;
            next_heartbeat = now + heartbeat;
        }
        if now >= next_poll {
            let changes = tracker.update(read_sessions(options, last_logged));
            for message in changes {
                if let Err(end) = connection.send(&message) {
                    return end;
                }
            }
            next_poll = now + SESSION_POLL;
        }
        let wait = next_heartbeat
            .min(next_poll)
            .saturating_duration_since(Instant::now());
        match host_events.recv_timeout(wait) {
            Ok(HostEvent::Message(Message::HelloAck {
                heartbeat_interval_ms,
            })) => {
                heartbeat = clamp_heartbeat(Duration::from_millis(heartbeat_interval_ms.into()));
                next_heartbeat = next_heartbeat.min(Instant::now() + heartbeat);
                if !host_answered {
                    host_answered = true;
                    *last_logged = None;
                    eprintln!(
                        "deskgrid-agent: host answered on {}; heartbeat every {} ms",
                        options.port.display(),
                        heartbeat.as_millis()
                    );
                }
            }
            // Acks only say the host is there; nothing to do.
            Ok(HostEvent::Message(Message::Ack { .. })) => {}
            Ok(HostEvent::Message(Message::LogOff { user })) => {
                log_off(&options.sources, &user);
                // The next poll reports the Logout; make it soon.
                next_poll = Instant::now() + LOGOFF_SETTLE;
            }
            // Guest-to-host messages coming back: junk, dropped.
            Ok(HostEvent::Message(_)) => {}
            // Bad frames are dropped; the first of a connection is logged.
            Ok(HostEvent::BadFrame(error)) => {
                if !bad_frame_logged {
                    bad_frame_logged = true;
                    eprintln!("deskgrid-agent: ignoring bad frames from the host: {error}");
                }
            }
            Ok(HostEvent::Ended(end)) => return end,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return ConnectionEnd::EndOfFile,
        }
    }
}

struct Connection {
    port: File,
    started: Instant,
}

impl Connection {
    fn send(&mut self, message: &Message) -> Result<(), ConnectionEnd> {
        match encode(message) {
            // Each frame in one write, so frames never interleave.
            Ok(frame) => self.port.write_all(&frame).map_err(ConnectionEnd::Write),
            // The agent only builds messages within the limits (names are
            // checked when read, lists cut); if one slips through, drop it
            // rather than the connection.
            Err(error) => {
                eprintln!(
                    "deskgrid-agent: {} message not sent: {error} ({} s into the connection)",
                    message.name(),
                    self.started.elapsed().as_secs()
                );
                Ok(())
            }
        }
    }
}

/// The reader thread: decodes host frames until the port fails or the
/// connection has gone (the channel's receiver dropped). When the
/// connection ends for another reason (a failed write), this thread stays
/// in its read, holding the port open, until the port returns data or an
/// error; virtio-serial refuses a second open meanwhile (EBUSY), and the
/// reopen loop simply tries again a second later.
fn read_host_frames(mut port: File, events: mpsc::Sender<HostEvent>) {
    let mut decoder = FrameDecoder::new();
    let mut buffer = [0u8; READ_BUFFER_LEN];
    loop {
        let read_len = match port.read(&mut buffer) {
            Ok(0) => {
                let _ = events.send(HostEvent::Ended(ConnectionEnd::EndOfFile));
                return;
            }
            Ok(read_len) => read_len,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                let _ = events.send(HostEvent::Ended(ConnectionEnd::Read(error)));
                return;
            }
        };
        decoder.push(&buffer[..read_len]);
        while let Some(decoded) = decoder.next_message() {
            let event = match decoded {
                Ok(message) => HostEvent::Message(message),
                Err(error) if error.is_stream_fatal() => {
                    let _ = events.send(HostEvent::Ended(ConnectionEnd::HostStream(error)));
                    return;
                }
                Err(error) => HostEvent::BadFrame(error),
            };
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

/// Ends every session of `user` (an admin's logoff from the grid): SIGHUP
/// then SIGTERM to each session's leading process (a login shell exits on
/// hangup; logind closes a session whose leader is gone), and SIGKILL to
/// those still there a few seconds later, from a thread of its own so
/// heartbeats go on. The agent never ends root's sessions.
fn log_off(sources: &SessionSources, user: &str) {
    if user.is_empty() || user == "root" {
        eprintln!("deskgrid-agent: logoff of {user:?} refused");
        return;
    }
    let leaders = session_leaders(sources, user);
    eprintln!(
        "deskgrid-agent: logging {user} off ({} session process(es))",
        leaders.len()
    );
    if leaders.is_empty() {
        return;
    }
    let result = std::thread::Builder::new()
        .name("log-off".into())
        .spawn(move || {
            for signal in ["-HUP", "-TERM"] {
                signal_all(signal, &leaders);
            }
            std::thread::sleep(LOGOFF_KILL_AFTER);
            let left: Vec<u32> = leaders
                .iter()
                .copied()
                .filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
                .collect();
            if !left.is_empty() {
                signal_all("-KILL", &left);
            }
        });
    if let Err(error) = result {
        eprintln!("deskgrid-agent: cannot start the logoff: {error}");
    }
}

/// `kill SIGNAL PID...` (the standard library sends signals only to its own
/// children, and the agent links nothing else).
fn signal_all(signal: &str, pids: &[u32]) {
    let status = std::process::Command::new("kill")
        .arg(signal)
        .args(pids.iter().map(u32::to_string))
        .stderr(std::process::Stdio::null())
        .status();
    if let Err(error) = status {
        eprintln!("deskgrid-agent: cannot run kill: {error}");
    }
}

/// Reads the sessions, logging problems when they change.
fn read_sessions(options: &Options, last_logged: &mut Option<String>) -> LiveSessions {
    let reading = read_live_sessions(&options.sources, MAX_TEXT_LEN);
    if !reading.problems.is_empty() {
        let line = reading.problems.join("; ");
        if last_logged.as_deref() != Some(line.as_str()) {
            eprintln!("deskgrid-agent: {line}");
            *last_logged = Some(line);
        }
    }
    reading.sessions
}

/// Which users the host has been told about, and the session each was
/// reported with. The host tracks users (is someone at this desktop?), so
/// a second session of a logged-in user is no new login.
#[derive(Debug, Default)]
struct SessionTracker {
    reported: std::collections::BTreeMap<String, String>,
}

impl SessionTracker {
    /// Takes the sessions read now and returns what to tell the host:
    /// `Logout`s, `Login`s, then `Sessions`; nothing when no user came or went.
    fn update(&mut self, live: LiveSessions) -> Vec<Message> {
        let mut messages = Vec::new();
        let gone: Vec<String> = self
            .reported
            .keys()
            .filter(|user| !live.contains_key(*user))
            .cloned()
            .collect();
        for user in gone {
            if let Some(session) = self.reported.remove(&user) {
                messages.push(Message::Logout { user, session });
            }
        }
        for (user, sessions) in live {
            if self.reported.contains_key(&user) {
                continue;
            }
            let Some(session) = sessions.into_iter().next() else {
                continue;
            };
            self.reported.insert(user.clone(), session.clone());
            messages.push(Message::Login { user, session });
        }
        if !messages.is_empty() {
            messages.push(self.sessions_message());
        }
        messages
    }

    /// Every user with a live session, as many as a message holds (in name
    /// order; the per-user Login/Logout messages still cover the rest).
    fn sessions_message(&self) -> Message {
        Message::Sessions {
            users: self
                .reported
                .keys()
                .take(MAX_SESSION_USERS)
                .cloned()
                .collect(),
        }
    }
}

fn hello() -> Message {
    Message::Hello {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        os: truncated(os_pretty_name().unwrap_or_else(|| "unknown".to_owned())),
        hostname: truncated(
            read_trimmed("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown".to_owned()),
        ),
        // Readable by root only on most guests; the agent runs as root.
        vm_uuid: read_trimmed("/sys/class/dmi/id/product_uuid")
            .map(|uuid| truncated(uuid.to_ascii_lowercase())),
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// `PRETTY_NAME` of os-release(5), unquoted.
fn os_pretty_name() -> Option<String> {
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .ok()?;
    let value = text
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))?
        .trim();
    let unquoted = value
        .strip_prefix('"')
        .and_then(|value| value.strip_suffix('"'))
        .or_else(|| {
            value
                .strip_prefix('\'')
                .and_then(|value| value.strip_suffix('\''))
        })
        .unwrap_or(value);
    Some(unquoted.replace("\\\"", "\"").replace("\\\\", "\\"))
}

/// Descriptive text (host name, OS name) cut to the protocol's limit at a
/// character boundary. Names that identify someone are never cut.
fn truncated(mut text: String) -> String {
    if text.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Milliseconds since the guest booted (`/proc/uptime`), 0 when unknown.
fn uptime_ms() -> u64 {
    read_trimmed("/proc/uptime")
        .and_then(|text| text.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |seconds| (seconds * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(entries: &[(&str, &str)]) -> LiveSessions {
        let mut sessions = LiveSessions::new();
        for (user, session) in entries {
            sessions
                .entry((*user).to_owned())
                .or_default()
                .insert((*session).to_owned());
        }
        sessions
    }

    #[test]
    fn tracker_reports_users_who_come_and_go() {
        let mut tracker = SessionTracker::default();
        assert_eq!(tracker.update(live(&[])), []);
        assert_eq!(
            tracker.update(live(&[("alice", "tty1")])),
            [
                Message::Login {
                    user: "alice".into(),
                    session: "tty1".into()
                },
                Message::Sessions {
                    users: vec!["alice".into()]
                }
            ]
        );
        // A second session of the same user is no new login.
        assert_eq!(
            tracker.update(live(&[("alice", "tty1"), ("alice", "3")])),
            []
        );
        assert_eq!(
            tracker.update(live(&[("bob", "pts/0")])),
            [
                Message::Logout {
                    user: "alice".into(),
                    session: "tty1".into()
                },
                Message::Login {
                    user: "bob".into(),
                    session: "pts/0".into()
                },
                Message::Sessions {
                    users: vec!["bob".into()]
                }
            ]
        );
    }

    #[test]
    fn arguments_and_defaults() {
        let arguments = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let Ok(Command::Run(options)) = parse_arguments(arguments(&[]).into_iter()) else {
            panic!("no arguments must run with the defaults");
        };
        assert_eq!(options.port, PathBuf::from(DEFAULT_PORT));
        assert_eq!(options.heartbeat, DEFAULT_HEARTBEAT);
        assert_eq!(options.sources.utmp_candidates.len(), 2);
        let Ok(Command::Run(options)) = parse_arguments(
            arguments(&["/dev/pts/9", "--heartbeat-ms", "5", "--utmp", "/tmp/u"]).into_iter(),
        ) else {
            panic!("valid arguments refused");
        };
        assert_eq!(options.port, PathBuf::from("/dev/pts/9"));
        assert_eq!(options.heartbeat, MIN_HEARTBEAT);
        assert_eq!(options.sources.utmp_candidates, [PathBuf::from("/tmp/u")]);
        assert!(parse_arguments(arguments(&["--heartbeat-ms"]).into_iter()).is_err());
        assert!(parse_arguments(arguments(&["a", "b"]).into_iter()).is_err());
        assert!(parse_arguments(arguments(&["--bogus"]).into_iter()).is_err());
    }

    #[test]
    fn descriptive_text_is_cut_at_a_character_boundary() {
        let cut = truncated("é".repeat(MAX_TEXT_LEN));
        assert!(cut.len() <= MAX_TEXT_LEN && cut.len() >= MAX_TEXT_LEN - 1);
        assert_eq!(truncated("short".into()), "short");
    }
}
