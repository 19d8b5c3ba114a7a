//! Who is logged in to the guest: glibc's utmp file and systemd-logind's
//! session files, read with the standard library only.
//!
//! Both sources are read on every poll and their union taken: utmp covers
//! text and SSH logins and guests without systemd; logind covers graphical
//! sessions, whose display managers do not always write utmp. A user whose
//! name does not fit the protocol is left out and reported, never cut short
//! (a shortened name would be somebody else).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Live sessions by user: user name -> session names (tty lines such as
/// `pts/0`, or logind session ids such as `c2`).
pub type LiveSessions = BTreeMap<String, BTreeSet<String>>;

/// One glibc x86_64 `struct utmp` (bits/utmp.h): `ut_type` i16 at 0,
/// `ut_pid` i32 at 4, `ut_line[32]` at 8, `ut_id[4]` at 40, `ut_user[32]` at
/// 44, `ut_host[256]` at 76, `ut_exit` at 332, `ut_session` i32 at 336,
/// `ut_tv` (two i32) at 340, `ut_addr_v6` at 348, 20 reserved bytes at 364.
/// The session and time fields are 32-bit on x86_64 so 32- and 64-bit
/// programs share the file.
pub const UTMP_RECORD_LEN: usize = 384;
const UT_TYPE: usize = 0;
const UT_PID: usize = 4;
const UT_LINE: std::ops::Range<usize> = 8..40;
const UT_USER: std::ops::Range<usize> = 44..76;
/// `ut_type` of a logged-in user's process.
pub const USER_PROCESS: i16 = 7;

/// A utmp file holds one record per terminal line; a megabyte is thousands
/// of lines, far past any desktop, and keeps a runaway file from filling
/// the agent's memory.
const MAX_UTMP_BYTES: u64 = 1 << 20;
/// logind session files are a few hundred bytes.
const MAX_SESSION_FILE_BYTES: u64 = 64 * 1024;
/// The most session files looked at in one poll.
const MAX_SESSION_FILES: usize = 4096;

/// Where the sessions are read from.
#[derive(Debug, Clone)]
pub struct SessionSources {
    /// utmp files in order of preference; the first that exists is read.
    pub utmp_candidates: Vec<PathBuf>,
    /// logind's session directory; skipped when it does not exist.
    pub logind_dir: PathBuf,
}

/// The result of one poll: the sessions found, and what could not be read
/// (for one log line each; a missing file is not a problem).
#[derive(Debug, Default)]
pub struct SessionReading {
    pub sessions: LiveSessions,
    pub problems: Vec<String>,
}

/// Reads every source once.
pub fn read_live_sessions(sources: &SessionSources, max_name_len: usize) -> SessionReading {
    let mut reading = SessionReading::default();
    if let Some(utmp) = sources.utmp_candidates.iter().find(|path| path.exists()) {
        match read_bounded(utmp, MAX_UTMP_BYTES) {
            Ok(bytes) => {
                for (user, line) in utmp_user_sessions(&bytes) {
                    add_session(&mut reading, user, line, max_name_len);
                }
            }
            Err(error) => reading
                .problems
                .push(format!("cannot read {}: {error}", utmp.display())),
        }
    }
    match std::fs::read_dir(&sources.logind_dir) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => reading.problems.push(format!(
            "cannot list {}: {error}",
            sources.logind_dir.display()
        )),
        Ok(entries) => {
            for entry in entries.flatten().take(MAX_SESSION_FILES) {
                let file_name = entry.file_name();
                let Some(session_id) = file_name.to_str() else {
                    continue;
                };
                // `<id>.ref` FIFOs and temporary files sit beside the sessions.
                if session_id.contains('.') {
                    continue;
                }
                match read_bounded(&entry.path(), MAX_SESSION_FILE_BYTES) {
                    Ok(bytes) => {
                        if let Some(user) = logind_session_user(&String::from_utf8_lossy(&bytes)) {
                            add_session(&mut reading, user, session_id.to_owned(), max_name_len);
                        }
                    }
                    // Removed between listing and reading: the session ended.
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => reading
                        .problems
                        .push(format!("cannot read {}: {error}", entry.path().display())),
                }
            }
        }
    }
    reading
}

fn add_session(reading: &mut SessionReading, user: String, session: String, max_len: usize) {
    if user.len() > max_len || session.len() > max_len {
        reading.problems.push(format!(
            "session {session:?} of user {user:?} left out: a name is over {max_len} bytes"
        ));
        return;
    }
    reading.sessions.entry(user).or_default().insert(session);
}

fn read_bounded(path: &Path, max_bytes: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max_bytes)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `(user, line)` of every live `USER_PROCESS` record. A trailing partial
/// record (a write in progress) is skipped. A record whose process no longer
/// exists is stale (its login process died without writing `DEAD_PROCESS`)
/// and skipped too.
pub fn utmp_user_sessions(bytes: &[u8]) -> Vec<(String, String)> {
    utmp_user_records(bytes)
        .into_iter()
        .map(|(user, line, _)| (user, line))
        .collect()
}

/// `(user, line, pid)` of every live `USER_PROCESS` record (see
/// [`utmp_user_sessions`]).
fn utmp_user_records(bytes: &[u8]) -> Vec<(String, String, i32)> {
    bytes
        .chunks_exact(UTMP_RECORD_LEN)
        .filter_map(|record| {
            let ut_type = i16::from_ne_bytes([record[UT_TYPE], record[UT_TYPE + 1]]);
            if ut_type != USER_PROCESS {
                return None;
            }
            let pid = i32::from_ne_bytes([
                record[UT_PID],
                record[UT_PID + 1],
                record[UT_PID + 2],
                record[UT_PID + 3],
            ]);
            if pid > 0 && !Path::new(&format!("/proc/{pid}")).exists() {
                return None;
            }
            let user = fixed_text(&record[UT_USER]);
            if user.is_empty() {
                return None;
            }
            Some((user, fixed_text(&record[UT_LINE]), pid))
        })
        .collect()
}

/// The processes leading `user`'s live sessions: the login process of each
/// utmp record and the `LEADER` of each logind session. Ending them ends
/// the sessions (a login shell exits on SIGHUP, logind closes a session
/// whose leader is gone).
pub fn session_leaders(sources: &SessionSources, user: &str) -> Vec<u32> {
    let mut leaders = BTreeSet::new();
    if let Some(utmp) = sources.utmp_candidates.iter().find(|path| path.exists()) {
        if let Ok(bytes) = read_bounded(utmp, MAX_UTMP_BYTES) {
            for (owner, _, pid) in utmp_user_records(&bytes) {
                if owner == user {
                    if let Ok(pid) = u32::try_from(pid) {
                        leaders.insert(pid);
                    }
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&sources.logind_dir) {
        for entry in entries.flatten().take(MAX_SESSION_FILES) {
            if entry.file_name().to_string_lossy().contains('.') {
                continue;
            }
            let Ok(bytes) = read_bounded(&entry.path(), MAX_SESSION_FILE_BYTES) else {
                continue;
            };
            let contents = String::from_utf8_lossy(&bytes);
            if logind_session_user(&contents).as_deref() == Some(user) {
                if let Some(leader) = logind_session_leader(&contents) {
                    leaders.insert(leader);
                }
            }
        }
    }
    // Never init, never the agent itself.
    leaders.remove(&0);
    leaders.remove(&1);
    leaders.remove(&std::process::id());
    leaders.into_iter().collect()
}

/// The `LEADER=` pid of a logind session file.
fn logind_session_leader(contents: &str) -> Option<u32> {
    contents.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        (key.trim() == "LEADER")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// A `char[N]` field: up to the first NUL (or all N bytes: the fields are
/// not NUL-terminated when full).
fn fixed_text(field: &[u8]) -> String {
    let end = field
        .iter()
        .position(|&byte| byte == 0)
        .unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// The user of a live logind session file, or `None` when the session is
/// closing, belongs to a greeter or a service manager, or names no user.
/// The file is `KEY=value` lines (`USER=`, `STATE=`, `ACTIVE=`, `CLASS=`).
/// A session is live while `STATE` is `online` or `active` (`closing` means
/// logging out); `ACTIVE=0` does not end it (a session on another virtual
/// terminal is still logged in), and without `STATE` the file's existence
/// is what counts.
pub fn logind_session_user(contents: &str) -> Option<String> {
    let mut user = None;
    let mut state = None;
    let mut class = None;
    for line in contents.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key.trim() {
            "USER" | "NAME" => user = Some(value.trim().to_owned()),
            "STATE" => state = Some(value.trim().to_owned()),
            "CLASS" => class = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    if state
        .as_deref()
        .is_some_and(|state| state != "online" && state != "active")
    {
        return None;
    }
    // Greeters (the display manager's login screen) and the per-user
    // service managers systemd 256 registers are not people logging in.
    if class
        .as_deref()
        .is_some_and(|class| !class.starts_with("user"))
    {
        return None;
    }
    user.filter(|user| !user.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ut_type` once the login process has ended.
    const DEAD_PROCESS: i16 = 8;

    fn utmp_record(ut_type: i16, pid: i32, line: &str, user: &str) -> Vec<u8> {
        let mut record = vec![0; UTMP_RECORD_LEN];
        record[UT_TYPE..UT_TYPE + 2].copy_from_slice(&ut_type.to_ne_bytes());
        record[UT_PID..UT_PID + 4].copy_from_slice(&pid.to_ne_bytes());
        record[UT_LINE.start..UT_LINE.start + line.len()].copy_from_slice(line.as_bytes());
        record[UT_USER.start..UT_USER.start + user.len()].copy_from_slice(user.as_bytes());
        record
    }

    #[test]
    fn utmp_keeps_live_user_processes_only() {
        let own_pid = std::process::id() as i32;
        let mut file = utmp_record(USER_PROCESS, own_pid, "pts/0", "alice");
        file.extend(utmp_record(DEAD_PROCESS, own_pid, "pts/1", "bob"));
        file.extend(utmp_record(6, own_pid, "tty1", "LOGIN"));
        file.extend(utmp_record(USER_PROCESS, own_pid, "tty2", &"c".repeat(32)));
        // A process id no system hands out: a stale record.
        file.extend(utmp_record(USER_PROCESS, i32::MAX, "tty3", "ghost"));
        file.extend(&utmp_record(USER_PROCESS, own_pid, "tty4", "half")[..100]);
        assert_eq!(
            utmp_user_sessions(&file),
            [
                ("alice".to_owned(), "pts/0".to_owned()),
                ("c".repeat(32), "tty2".to_owned())
            ]
        );
    }

    #[test]
    fn logind_sessions_by_state_and_class() {
        let live = "# This is private data. Do not parse.\nUID=1000\nUSER=alice\nACTIVE=1\nSTATE=active\nCLASS=user\n";
        assert_eq!(logind_session_user(live), Some("alice".to_owned()));
        assert_eq!(
            logind_session_user("USER=bob\nSTATE=online\nACTIVE=0\n"),
            Some("bob".to_owned())
        );
        assert_eq!(
            logind_session_user("NAME=carol\n"),
            Some("carol".to_owned())
        );
        assert_eq!(logind_session_user("USER=alice\nSTATE=closing\n"), None);
        assert_eq!(
            logind_session_user("USER=gdm\nSTATE=active\nCLASS=greeter\n"),
            None
        );
        assert_eq!(
            logind_session_user("USER=alice\nSTATE=active\nCLASS=manager\n"),
            None
        );
        assert_eq!(logind_session_user("STATE=active\nUSER=\n"), None);
        assert_eq!(logind_session_user(""), None);
    }

    #[test]
    fn both_sources_are_merged_and_overlong_names_left_out() {
        let directory =
            std::env::temp_dir().join(format!("deskgrid-agent-sessions-{}", std::process::id()));
        let logind = directory.join("sessions");
        std::fs::create_dir_all(&logind).unwrap();
        let utmp = directory.join("utmp");
        let own_pid = std::process::id() as i32;
        std::fs::write(&utmp, utmp_record(USER_PROCESS, own_pid, "tty1", "alice")).unwrap();
        std::fs::write(logind.join("3"), "USER=alice\nSTATE=active\n").unwrap();
        std::fs::write(logind.join("4"), "USER=bob\nSTATE=online\n").unwrap();
        std::fs::write(logind.join("4.ref"), "junk").unwrap();
        std::fs::write(logind.join("5"), format!("USER={}\n", "x".repeat(40))).unwrap();
        let sources = SessionSources {
            utmp_candidates: vec![directory.join("missing"), utmp],
            logind_dir: logind,
        };
        let reading = read_live_sessions(&sources, 32);
        std::fs::remove_dir_all(&directory).unwrap();
        let expected: LiveSessions = [
            ("alice".to_owned(), ["3", "tty1"].map(String::from).into()),
            ("bob".to_owned(), ["4"].map(String::from).into()),
        ]
        .into();
        assert_eq!(reading.sessions, expected);
        assert_eq!(reading.problems.len(), 1, "{:?}", reading.problems);
    }
}
