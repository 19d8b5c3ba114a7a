//! The built `deskgrid-agent` against a real character device: a
//! pseudo-terminal in raw mode stands in for the virtio-serial port (both
//! are character devices the agent opens by path and reads and writes as a
//! byte stream), with a temporary utmp file and logind directory. The test
//! plays the host on the pty's master side with the shared decoder.
//!
//! Every wait has a deadline, and every agent is killed when its test ends
//! (`AgentProcess`'s `Drop`), passed or failed.

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use deskgrid::desktop::protocol::{encode, FrameDecoder, Message};
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};

const AGENT: &str = env!("CARGO_BIN_EXE_deskgrid-agent");
/// The agent's heartbeat interval in these tests: short, so a few beats
/// arrive quickly, long enough to tell from a busy loop.
const HEARTBEAT_MS: u64 = 200;
/// The agent polls sessions every second; a change must show within this.
const SESSION_DEADLINE: Duration = Duration::from_secs(5);
/// From start (or from the port appearing) to the agent's hello.
const HELLO_DEADLINE: Duration = Duration::from_secs(5);

/// glibc x86_64 `struct utmp` (bits/utmp.h): 384 bytes.
const UTMP_RECORD_LEN: usize = 384;
const USER_PROCESS: i16 = 7;
const DEAD_PROCESS: i16 = 8;

/// A pty pair in raw mode, so bytes pass both ways unchanged (no echo, no
/// newline translation). The slave stays open here, so its settings hold
/// while the agent closes and reopens it.
struct Pty {
    master: File,
    _slave: OwnedFd,
    slave_path: PathBuf,
}

fn open_raw_pty() -> Pty {
    let pair = nix::pty::openpty(None, None).unwrap();
    let mut termios = tcgetattr(&pair.slave).unwrap();
    cfmakeraw(&mut termios);
    tcsetattr(&pair.slave, SetArg::TCSANOW, &termios).unwrap();
    let slave_path =
        std::fs::read_link(format!("/proc/self/fd/{}", pair.slave.as_raw_fd())).unwrap();
    Pty {
        master: File::from(pair.master),
        _slave: pair.slave,
        slave_path,
    }
}

/// The host side: a thread decodes what the agent writes to the master.
struct Host {
    messages: mpsc::Receiver<(Instant, Message)>,
    master: File,
    /// Everything received so far, for failure messages.
    log: Vec<Message>,
}

impl Host {
    fn listen(master: File) -> Host {
        let mut reader = master.try_clone().unwrap();
        let (sender, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut decoder = FrameDecoder::new();
            let mut buffer = [0u8; 4096];
            // Ends with EIO once every slave descriptor is closed.
            while let Ok(len @ 1..) = reader.read(&mut buffer) {
                decoder.push(&buffer[..len]);
                while let Some(decoded) = decoder.next_message() {
                    let message = decoded.expect("the agent sends only valid frames");
                    if sender.send((Instant::now(), message)).is_err() {
                        return;
                    }
                }
            }
        });
        Host {
            messages,
            master,
            log: Vec::new(),
        }
    }

    /// The next message, or a failure naming what did arrive.
    fn next(&mut self, deadline: Duration) -> (Instant, Message) {
        match self.messages.recv_timeout(deadline) {
            Ok((at, message)) => {
                self.log.push(message.clone());
                (at, message)
            }
            Err(error) => panic!(
                "no message from the agent within {deadline:?} ({error}); received so far: {:?}",
                self.log
            ),
        }
    }

    /// Skips heartbeats and returns the first other message.
    fn next_event(&mut self, deadline: Duration) -> Message {
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.next(left) {
                (_, Message::Heartbeat { .. }) => continue,
                (_, message) => return message,
            }
        }
    }

    fn send(&mut self, message: &Message) {
        self.master.write_all(&encode(message).unwrap()).unwrap();
    }
}

/// The agent process; killed and reaped on drop.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(port: &Path, utmp: &Path, logind_dir: &Path) -> AgentProcess {
    let child = Command::new(AGENT)
        .arg(port)
        .args(["--heartbeat-ms", &HEARTBEAT_MS.to_string()])
        .arg("--utmp")
        .arg(utmp)
        .arg("--logind-dir")
        .arg(logind_dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    AgentProcess(child)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// Checks the first two messages of a connection: hello, then the sessions.
fn expect_hello_and_sessions(host: &mut Host, users: &[&str]) {
    match host.next(HELLO_DEADLINE).1 {
        Message::Hello {
            agent_version,
            hostname: their_hostname,
            os,
            ..
        } => {
            assert_eq!(agent_version, env!("CARGO_PKG_VERSION"));
            assert_eq!(their_hostname, hostname());
            assert!(!os.is_empty());
        }
        other => panic!("expected hello first, got {other:?}"),
    }
    assert_eq!(
        host.next(HELLO_DEADLINE).1,
        Message::Sessions {
            users: users.iter().map(|user| (*user).to_owned()).collect()
        }
    );
}

/// A utmp record as glibc's `pututline` writes it for a login: type, pid,
/// line, id, user, host, time.
fn utmp_record(ut_type: i16, line: &str, user: &str) -> [u8; UTMP_RECORD_LEN] {
    // The test's own pid: a live process, as a login shell's would be.
    utmp_record_of(ut_type, line, user, std::process::id())
}

/// [`utmp_record`] for the session led by process `pid`.
fn utmp_record_of(ut_type: i16, line: &str, user: &str, pid: u32) -> [u8; UTMP_RECORD_LEN] {
    let mut record = [0u8; UTMP_RECORD_LEN];
    record[0..2].copy_from_slice(&ut_type.to_ne_bytes());
    record[4..8].copy_from_slice(&(pid as i32).to_ne_bytes());
    record[8..8 + line.len()].copy_from_slice(line.as_bytes());
    let id = line.trim_start_matches("pts/");
    record[40..40 + id.len().min(4)].copy_from_slice(&id.as_bytes()[..id.len().min(4)]);
    record[44..44 + user.len()].copy_from_slice(user.as_bytes());
    record[76..85].copy_from_slice(b"10.0.0.10");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    record[340..344].copy_from_slice(&(now.as_secs() as i32).to_ne_bytes());
    record[344..348].copy_from_slice(&(now.subsec_micros() as i32).to_ne_bytes());
    record
}

#[test]
fn hello_heartbeats_and_utmp_logins_over_a_pty() {
    let directory = tempfile::tempdir().unwrap();
    let utmp = directory.path().join("utmp");
    // A boot record first, as on a real system: not a user.
    let mut boot = [0u8; UTMP_RECORD_LEN];
    boot[0..2].copy_from_slice(&2i16.to_ne_bytes());
    std::fs::write(&utmp, boot).unwrap();
    let logind_dir = directory.path().join("sessions");
    let pty = open_raw_pty();
    let mut host = Host::listen(pty.master.try_clone().unwrap());
    let _agent = start_agent(&pty.slave_path, &utmp, &logind_dir);

    expect_hello_and_sessions(&mut host, &[]);

    // Heartbeats: numbered from 0, about every HEARTBEAT_MS.
    let mut beats = Vec::new();
    while beats.len() < 5 {
        if let (at, Message::Heartbeat { seq, uptime_ms }) = host.next(Duration::from_secs(2)) {
            assert!(uptime_ms > 0);
            beats.push((at, seq));
        }
    }
    let seqs: Vec<u64> = beats.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
    let span = beats[4].0 - beats[0].0;
    let expected = Duration::from_millis(4 * HEARTBEAT_MS);
    assert!(
        span >= expected / 2 && span <= expected * 3,
        "4 heartbeat intervals took {span:?}, expected about {expected:?}"
    );

    // The host's HelloAck sets a slower interval: after the beat already
    // due, the next comes about a second later.
    host.send(&Message::HelloAck {
        heartbeat_interval_ms: 1000,
    });
    let mut after_ack = Vec::new();
    while after_ack.len() < 3 {
        if let (at, Message::Heartbeat { .. }) = host.next(Duration::from_secs(3)) {
            after_ack.push(at);
        }
    }
    let gap = after_ack[2] - after_ack[1];
    assert!(
        gap >= Duration::from_millis(700) && gap <= Duration::from_millis(2500),
        "heartbeats {gap:?} apart after HelloAck asked for 1000 ms"
    );

    // A login as glibc records it: a USER_PROCESS record appended.
    let login = utmp_record(USER_PROCESS, "pts/7", "alice");
    let offset = std::fs::metadata(&utmp).unwrap().len();
    let file = File::options().write(true).open(&utmp).unwrap();
    file.write_all_at(&login, offset).unwrap();
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Login {
            user: "alice".into(),
            session: "pts/7".into()
        }
    );
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Sessions {
            users: vec!["alice".into()]
        }
    );

    // The logout as glibc's logout(3) records it: the same record, in place,
    // turned DEAD_PROCESS with the user name cleared.
    let logout = utmp_record(DEAD_PROCESS, "pts/7", "");
    file.write_all_at(&logout, offset).unwrap();
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Logout {
            user: "alice".into(),
            session: "pts/7".into()
        }
    );
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Sessions { users: vec![] }
    );
}

#[test]
fn logind_session_files_log_users_in_and_out() {
    let directory = tempfile::tempdir().unwrap();
    let utmp = directory.path().join("no-utmp-here");
    let logind_dir = directory.path().join("sessions");
    std::fs::create_dir(&logind_dir).unwrap();
    // A greeter session from the start: not a user.
    std::fs::write(
        logind_dir.join("c1"),
        "# This is private data. Do not parse.\nUID=110\nUSER=lightdm\nACTIVE=1\nSTATE=active\nCLASS=greeter\n",
    )
    .unwrap();
    let pty = open_raw_pty();
    let mut host = Host::listen(pty.master.try_clone().unwrap());
    let _agent = start_agent(&pty.slave_path, &utmp, &logind_dir);
    expect_hello_and_sessions(&mut host, &[]);

    // logind writes a new file and renames it into place.
    let session_file = logind_dir.join("3");
    let write_session = |state: &str| {
        let temporary = logind_dir.join(".#3tmp");
        std::fs::write(
            &temporary,
            format!("# This is private data. Do not parse.\nUID=1000\nUSER=bob\nACTIVE=1\nIS_DISPLAY=1\nSTATE={state}\nREMOTE=0\nTYPE=x11\nCLASS=user\n"),
        )
        .unwrap();
        std::fs::rename(&temporary, &session_file).unwrap();
    };
    write_session("active");
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Login {
            user: "bob".into(),
            session: "3".into()
        }
    );
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Sessions {
            users: vec!["bob".into()]
        }
    );
    // Logging out: the session closes, then its file goes.
    write_session("closing");
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Logout {
            user: "bob".into(),
            session: "3".into()
        }
    );
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Sessions { users: vec![] }
    );
    std::fs::remove_file(&session_file).unwrap();
    write_session("online");
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Login {
            user: "bob".into(),
            session: "3".into()
        }
    );
}

/// The agent started before its port exists (the virtio device not there
/// yet) keeps trying and connects once the path appears.
#[test]
fn agent_connects_once_the_port_appears() {
    let directory = tempfile::tempdir().unwrap();
    let port = directory.path().join("org.deskgrid.agent.0");
    let pty = open_raw_pty();
    let mut host = Host::listen(pty.master.try_clone().unwrap());
    let mut agent = start_agent(
        &port,
        &directory.path().join("utmp"),
        &directory.path().join("sessions"),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        agent.0.try_wait().unwrap().is_none(),
        "the agent exited while its port was missing"
    );
    assert!(
        host.messages.try_recv().is_err(),
        "a message arrived before the port existed"
    );
    std::os::unix::fs::symlink(&pty.slave_path, &port).unwrap();
    expect_hello_and_sessions(&mut host, &[]);
    assert!(matches!(
        host.next(Duration::from_secs(2)).1,
        Message::Heartbeat { seq: 0, .. }
    ));
}

/// Junk from the host is dropped and the agent carries on; a length over
/// the limit makes the stream unusable, so the agent closes the port and
/// reopens it, starting over with a hello.
#[test]
fn host_junk_is_ignored_and_a_bad_length_resets_the_connection() {
    let directory = tempfile::tempdir().unwrap();
    let pty = open_raw_pty();
    let mut host = Host::listen(pty.master.try_clone().unwrap());
    let _agent = start_agent(
        &pty.slave_path,
        &directory.path().join("utmp"),
        &directory.path().join("sessions"),
    );
    expect_hello_and_sessions(&mut host, &[]);

    // An unknown type, a wrong version, a truncated ack: each a whole frame.
    let mut junk = vec![0, 0, 0, 2, 1, 0x7f];
    junk.extend([0, 0, 0, 10, 9, 0x81, 0, 0, 0, 0, 0, 0, 0, 1]);
    junk.extend([0, 0, 0, 5, 1, 0x81, 0, 0, 0]);
    junk.extend(encode(&Message::Ack { seq: 0 }).unwrap());
    host.master.write_all(&junk).unwrap();
    let mut seq_after_junk = None;
    while seq_after_junk.is_none() {
        match host.next(Duration::from_secs(2)).1 {
            Message::Heartbeat { seq, .. } if seq >= 3 => seq_after_junk = Some(seq),
            Message::Heartbeat { .. } => {}
            other => panic!("junk from the host made the agent send {other:?}"),
        }
    }

    // A length prefix of 1 GiB: the agent resets the connection.
    host.master.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    let until = Instant::now() + HELLO_DEADLINE;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match host.next(left).1 {
            Message::Heartbeat { .. } => continue,
            Message::Hello { .. } => break,
            other => panic!("expected a new hello after the reset, got {other:?}"),
        }
    }
    assert_eq!(
        host.next(HELLO_DEADLINE).1,
        Message::Sessions { users: vec![] }
    );
    // Heartbeats start over at 0 on the new connection.
    assert!(matches!(
        host.next(Duration::from_secs(2)).1,
        Message::Heartbeat { seq: 0, .. }
    ));
}

/// The host's `LogOff` ends a user's sessions in the guest: the agent
/// signals each session's leading process (here `sleep`s standing in for
/// login shells: one recorded in utmp as glibc does, one a logind session's
/// `LEADER`) and reports the `Logout` once the utmp session is gone. It
/// never ends root's sessions, nor anyone else's.
#[test]
fn a_logoff_from_the_host_ends_the_users_sessions() {
    struct Reaped(Vec<Child>);
    impl Drop for Reaped {
        fn drop(&mut self) {
            for child in &mut self.0 {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
    let spawn = || Command::new("sleep").arg("600").spawn().unwrap();
    let mut children = Reaped(vec![spawn(), spawn(), spawn(), spawn()]);
    let pid = |index: usize, children: &Reaped| children.0[index].id();
    let (carol, dave, root, erin) = (0, 1, 2, 3);

    let directory = tempfile::tempdir().unwrap();
    let utmp = directory.path().join("utmp");
    let mut records = Vec::new();
    records.extend(utmp_record_of(
        USER_PROCESS,
        "pts/1",
        "carol",
        pid(carol, &children),
    ));
    records.extend(utmp_record_of(
        USER_PROCESS,
        "pts/2",
        "root",
        pid(root, &children),
    ));
    records.extend(utmp_record_of(
        USER_PROCESS,
        "pts/3",
        "erin",
        pid(erin, &children),
    ));
    std::fs::write(&utmp, records).unwrap();
    let logind_dir = directory.path().join("sessions");
    std::fs::create_dir(&logind_dir).unwrap();
    std::fs::write(
        logind_dir.join("c7"),
        format!(
            "UID=1007\nUSER=dave\nACTIVE=1\nSTATE=active\nCLASS=user\nLEADER={}\n",
            pid(dave, &children)
        ),
    )
    .unwrap();
    let pty = open_raw_pty();
    let mut host = Host::listen(pty.master.try_clone().unwrap());
    let _agent = start_agent(&pty.slave_path, &utmp, &logind_dir);
    expect_hello_and_sessions(&mut host, &["carol", "dave", "erin", "root"]);

    let ends_within = |children: &mut Reaped, index: usize, limit: Duration| {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if children.0[index].try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    };

    host.send(&Message::LogOff {
        user: "carol".into(),
    });
    assert!(
        ends_within(&mut children, carol, SESSION_DEADLINE),
        "carol's session process still runs"
    );
    assert_eq!(
        host.next_event(SESSION_DEADLINE),
        Message::Logout {
            user: "carol".into(),
            session: "pts/1".into()
        }
    );

    host.send(&Message::LogOff {
        user: "dave".into(),
    });
    assert!(
        ends_within(&mut children, dave, SESSION_DEADLINE),
        "the leader of dave's logind session still runs"
    );

    host.send(&Message::LogOff {
        user: "root".into(),
    });
    assert!(
        !ends_within(&mut children, root, Duration::from_secs(1)),
        "root's session was ended"
    );
    assert!(
        !ends_within(&mut children, erin, Duration::from_millis(10)),
        "erin was never asked to leave"
    );
}
