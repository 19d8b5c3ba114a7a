//! Crash recovery of the state store: a writer process killed with SIGKILL at random moments
//! never loses a record it reported as committed and never leaves one half-applied, and a
//! damaged byte anywhere in an old log record or in the snapshot stops recovery, naming the
//! file, without anything being "repaired" away.
//!
//! The writer is this test binary itself, re-executed with `--exact crash_child_writer`: that
//! test does nothing unless [`CHILD_DIR_ENV`] is set, so it costs nothing in a normal run, and
//! the same trick works under `cargo test` and `cargo nextest run` (both run this binary).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _};
use deskgrid::model::{GroupName, Role, ServerId, User, UserName};
use deskgrid::service::now_ms;
use deskgrid::state::storage::log_file::{read_log, FRAME_HEADER_LEN};
use deskgrid::state::store::check;
use deskgrid::state::{ConfigValue, Delta, GridState, HlcClock, RecoveryReport, StateStore};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// Set (to the state directory) only in the re-executed child: it makes `crash_child_writer`
/// the writer instead of a no-op.
const CHILD_DIR_ENV: &str = "DESKGRID_CRASH_CHILD_DIR";
/// Replays the kill delays of an earlier run. Only the delays: where a kill lands inside the
/// child still depends on scheduling and disk speed.
const SEED_ENV: &str = "DESKGRID_CRASH_SEED";

/// The issue asks for at least 200 kills.
const MIN_KILLS: usize = 200;
/// The kills are spread over several fresh state directories because a debug build decodes
/// state at about 10 MB/s: on one directory that only grows, each recovery (the child's and
/// the test's) would take longer than the last, and the last ones a few hundred milliseconds.
/// 20 kills still take a directory through about ten compactions.
const DIRECTORIES: usize = 11;
const KILLS_PER_DIRECTORY: usize = 20;
/// How long after the spawn, or after the child reports that it recovered, the kill comes:
/// from "barely started" to a few dozen records in.
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 2..=40;
/// One kill in this many is timed from the spawn rather than from the end of recovery, so that
/// recovery itself (truncating a torn tail, removing a compaction's leftovers, creating the
/// log) is interrupted too.
const KILL_AFTER_SPAWN_ONE_IN: u32 = 4;
/// A child that makes no progress for this long is stuck, not slow: a record costs one fsync.
const STALL_LIMIT: Duration = Duration::from_secs(5);
/// Compacting this often puts a few percent of the kills inside a compaction.
const COMPACT_EVERY_RECORDS: u64 = 25;
/// One record in this many is large (see [`record_user`]).
const LARGE_RECORD_ONE_IN: u64 = 16;
/// Every record writes these three users in one delta, so a half-applied record would show
/// up as one or two of them.
const PARTS: [char; 3] = ['a', 'b', 'c'];

/// The server all records are written as.
fn writer_id() -> ServerId {
    ServerId::from_bytes([0xc7; 16])
}

/// The child: recovers the directory, then commits record after record until it is killed,
/// printing `committed N` once record N is durable and applied.
#[test]
fn crash_child_writer() -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return Ok(());
    };
    let dir = PathBuf::from(dir);
    let (mut store, mut state, _report) = StateStore::open(&dir).context("child recovery")?;
    let mut clock = HlcClock::starting_after(state.max_hlc());
    let mut record = records_present(&state)?
        .keys()
        .max()
        .map_or(1, |last| last + 1);
    let mut stdout = std::io::stdout().lock();
    // The leading newline ends libtest's "test crash_child_writer ... " line, so that every
    // line of ours stands alone.
    writeln!(stdout, "\nchild-ready")?;
    stdout.flush()?;
    loop {
        commit_record(&mut store, &mut state, &mut clock, record)?;
        writeln!(stdout, "committed {record}")?;
        stdout.flush()?;
        if record % COMPACT_EVERY_RECORDS == 0 {
            store.compact(&state)?;
        }
        record += 1;
    }
}

#[test]
fn killed_writers_never_lose_a_committed_record_or_half_apply_one() -> anyhow::Result<()> {
    let seed = match std::env::var(SEED_ENV) {
        Ok(seed) => seed.parse().context(SEED_ENV)?,
        Err(_) => SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64,
    };
    eprintln!("crash test seed: {SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut tally = Tally::default();
    for directory in 0..DIRECTORIES {
        let dir = tempfile::tempdir()?;
        kill_writers_in(dir.path(), &mut rng, &mut tally)
            .with_context(|| format!("state directory {directory} (seed {seed})"))?;
    }

    eprintln!(
        "crash test: {} kills in {:.1?} over {DIRECTORIES} state directories \
         ({} before the child finished recovery), {} records committed, \
         {} durable but unreported when killed, {} torn tails seen, \
         {} recoveries with an old log left by an interrupted compaction, \
         {} with a half-written snapshot, {} compactions",
        tally.kills,
        started.elapsed(),
        tally.died_before_ready,
        tally.commits,
        tally.durable_unreported,
        tally.torn_tails,
        tally.stale_files,
        tally.temp_snapshots,
        tally.compactions,
    );
    assert!(tally.kills >= MIN_KILLS, "only {} kills", tally.kills);
    assert!(
        tally.commits > tally.kills,
        "only {} records committed: the kills came too early to test much",
        tally.commits
    );
    assert!(
        tally.compactions > 0,
        "no compaction ever finished, so no kill can have tested one"
    );
    Ok(())
}

/// [`KILLS_PER_DIRECTORY`] writers, one after the other on `dir`, each killed; after each,
/// recovery must hold every record reported as committed, whole, and nothing else but the one
/// append that may have been in flight.
fn kill_writers_in(dir: &Path, rng: &mut StdRng, tally: &mut Tally) -> anyhow::Result<()> {
    // Everything the children reported, and the highest record the last recovery held.
    let mut committed_ever = BTreeSet::new();
    let mut highest_present = 0;
    let mut last_progress = Instant::now();
    for iteration in 0..KILLS_PER_DIRECTORY {
        let delay = Duration::from_millis(rng.random_range(KILL_AFTER_MS));
        let kill_at = if rng.random_ratio(1, KILL_AFTER_SPAWN_ONE_IN) {
            KillAt::AfterSpawn(delay)
        } else {
            KillAt::AfterReady(delay)
        };
        let run = run_child_until_killed(dir, kill_at)
            .with_context(|| format!("iteration {iteration}, {kill_at:?}"))?;
        let killed = !run.exited_by_itself && run.status.signal() == Some(sigkill_number());
        ensure!(
            killed,
            "iteration {iteration}: the child was not killed but ended with {}\nstdout:\n{}\nstderr:\n{}",
            run.status,
            run.stdout,
            run.stderr
        );
        tally.kills += 1;
        tally.died_before_ready += usize::from(!run.was_ready);

        let committed_now = committed_lines(&run.stdout)?;
        let expected_first = highest_present + 1;
        let expected = expected_first..expected_first + committed_now.len() as u64;
        ensure!(
            committed_now.iter().copied().eq(expected),
            "iteration {iteration}: the child should have committed consecutive records from {expected_first}, it reported {committed_now:?}"
        );
        if !committed_now.is_empty() {
            last_progress = Instant::now();
        }
        ensure!(
            last_progress.elapsed() < STALL_LIMIT,
            "iteration {iteration}: no record committed for {STALL_LIMIT:?}\nlast child's stdout:\n{}\nstderr:\n{}",
            run.stdout,
            run.stderr
        );
        tally.commits += committed_now.len();
        committed_ever.extend(committed_now.iter().copied());

        // `open` removes a half-written snapshot before anything else, and neither its report
        // nor `check`'s mentions one, so look for it here.
        let temp_snapshot = dir.join(".snapshot.tmp");
        tally.temp_snapshots += usize::from(temp_snapshot.exists());
        let recovered = recover_and_verify(dir)
            .with_context(|| format!("iteration {iteration}, {kill_at:?}: recovery"))?;
        ensure!(
            !temp_snapshot.exists(),
            "iteration {iteration}, {kill_at:?}: recovery left {}",
            temp_snapshot.display()
        );
        tally.torn_tails += usize::from(recovered.report.torn_tail.is_some());
        tally.stale_files += usize::from(!recovered.report.stale_files.is_empty());

        // Nothing committed is lost, and nothing is there beyond the one record whose append
        // may have been durable before its `committed` line went out.
        let last_committed = committed_now.last().copied().unwrap_or(highest_present);
        let highest = recovered.highest_record;
        if let Some(lost) = committed_ever.iter().find(|record| **record > highest) {
            bail!("iteration {iteration}, {kill_at:?}: committed record {lost} was lost, recovery holds records up to {highest}");
        }
        ensure!(
            highest >= highest_present,
            "iteration {iteration}, {kill_at:?}: recovery holds records up to {highest}, the previous one up to {highest_present}"
        );
        ensure!(
            highest <= last_committed + 1,
            "iteration {iteration}, {kill_at:?}: recovery holds records up to {highest}, but only {last_committed} were committed and a single append was in flight"
        );
        tally.durable_unreported += usize::from(highest == last_committed + 1);
        highest_present = highest;
        if iteration + 1 == KILLS_PER_DIRECTORY {
            tally.compactions += recovered.report.generation;
        }
    }
    Ok(())
}

#[test]
fn flipping_a_byte_inside_an_old_record_is_detected() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (mut store, mut state, _) = StateStore::open(dir.path())?;
    let mut clock = HlcClock::new();
    for record in 1..=10 {
        commit_record(&mut store, &mut state, &mut clock, record)?;
    }
    drop(store);

    let log_path = dir.path().join("log.0");
    let contents = read_log(&log_path)?;
    ensure!(contents.records.len() == 10, "ten records, one frame each");
    let third = &contents.records[2];
    let frame_len = FRAME_HEADER_LEN as usize + third.payload.len();
    // Every byte of the frame: its length, both checksums and the payload.
    for inside in 0..frame_len {
        let position = third.offset as usize + inside;
        let error = with_flipped_byte(dir.path(), &log_path, position, |errors| {
            for error in errors {
                ensure!(
                    error.contains(&log_path.display().to_string()),
                    "the error does not name the log: {error}"
                );
                ensure!(
                    offsets_named(error) == [third.offset],
                    "the error does not name the damaged record's offset {}: {error}",
                    third.offset
                );
            }
            Ok(())
        })
        .with_context(|| format!("byte {inside} of the frame at offset {}", third.offset))?;
        if inside == FRAME_HEADER_LEN as usize {
            eprintln!("flipped first payload byte of the third record: {error}");
        }
    }
    let (mut store, mut state, report) = StateStore::open(dir.path())?;
    assert_eq!(
        report.log_records, 10,
        "undamaged again, all records are back"
    );

    store.compact(&state)?;
    for record in 11..=13 {
        commit_record(&mut store, &mut state, &mut clock, record)?;
    }
    drop(store);
    let snapshot_path = dir.path().join("snapshot");
    let snapshot_len = fs::metadata(&snapshot_path)?.len() as usize;
    // Every byte, header included: the file checksum covers the generation too, so a damaged
    // generation can never make recovery delete `log.1` as stale.
    for position in 0..snapshot_len {
        let error = with_flipped_byte(dir.path(), &snapshot_path, position, |errors| {
            for error in errors {
                ensure!(
                    error.contains(&snapshot_path.display().to_string()),
                    "the error does not name the snapshot: {error}"
                );
            }
            Ok(())
        })
        .with_context(|| format!("byte {position} of the snapshot"))?;
        if position == snapshot_len / 2 {
            eprintln!("flipped a byte in the middle of the snapshot: {error}");
        }
    }
    let (_, recovered, report) = StateStore::open(dir.path())?;
    assert_eq!((report.generation, report.log_records), (1, 3));
    assert_eq!(recovered, state);
    Ok(())
}

/// Flips one bit of byte `position` in `path`, runs `check` and `open` (both must fail; their
/// messages go to `judge`), checks that neither changed any file, and restores the byte.
/// Returns `open`'s message.
fn with_flipped_byte(
    dir: &Path,
    path: &Path,
    position: usize,
    judge: impl FnOnce(&[String; 2]) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let original = fs::read(path)?[position];
    let damaged = original ^ (1 << (position % 8));
    // In place, as a disk would do it (rewriting the whole file would also make ext4 flush it).
    let file = OpenOptions::new().write(true).open(path)?;
    file.write_all_at(&[damaged], position as u64)?;
    let before = directory_contents(dir)?;

    let checked = match check(dir) {
        Ok(report) => bail!("check accepted the damage: {report:?}"),
        Err(error) => deskgrid::error_chain(&error),
    };
    let opened = match StateStore::open(dir) {
        Ok((_, _, report)) => bail!("open accepted the damage: {report:?}"),
        Err(error) => deskgrid::error_chain(&error),
    };
    ensure!(
        directory_contents(dir)? == before,
        "recovery changed the state directory"
    );
    judge(&[checked, opened.clone()])?;
    file.write_all_at(&[original], position as u64)?;
    Ok(opened)
}

/// Every file in `dir`, by name, with its content.
fn directory_contents(dir: &Path) -> anyhow::Result<BTreeMap<OsString, Vec<u8>>> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        files.insert(entry.file_name(), fs::read(entry.path())?);
    }
    Ok(files)
}

/// Every number written as "byte offset N" in `message`.
fn offsets_named(message: &str) -> Vec<u64> {
    message
        .split("byte offset ")
        .skip(1)
        .filter_map(|after| {
            let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// What the crash test counts; it prints all of it so a run can be judged, and asserts only
/// what does not depend on timing.
#[derive(Debug, Default)]
struct Tally {
    kills: usize,
    /// Kills that landed before the child had recovered (exec, libtest start-up, `open`).
    died_before_ready: usize,
    commits: usize,
    /// Kills after an append was durable but before its `committed` line went out.
    durable_unreported: usize,
    /// Recoveries that cut off an append interrupted mid-write.
    torn_tails: usize,
    /// Recoveries that found files left by an interrupted compaction.
    stale_files: usize,
    /// Recoveries that found a snapshot whose writing was interrupted.
    temp_snapshots: usize,
    /// Compactions that finished, over all directories.
    compactions: u64,
}

/// One child's life.
#[derive(Debug)]
struct ChildRun {
    status: ExitStatus,
    /// True when the child had already ended when the kill was due.
    exited_by_itself: bool,
    /// True when the child had finished recovery and started writing.
    was_ready: bool,
    stdout: String,
    stderr: String,
}

/// When the kill is due.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// This long after the spawn: mostly lands in exec, libtest start-up or recovery.
    AfterSpawn(Duration),
    /// This long after the child reported that it recovered: lands among the writes.
    AfterReady(Duration),
}

/// Kills and reaps the child if a test fails while it runs, so no writer outlives the test.
#[derive(Debug)]
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // Both fail only if the child is already reaped, which is fine.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run_child_until_killed(dir: &Path, kill_at: KillAt) -> anyhow::Result<ChildRun> {
    let child = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "crash_child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn the child writer")?;
    let spawned = Instant::now();
    let mut guard = ChildGuard(child);
    let stdout_pipe = guard.0.stdout.take().context("child stdout is piped")?;
    let stderr_pipe = guard.0.stderr.take().context("child stderr is piped")?;
    let (ready_sender, ready) = mpsc::channel();
    // Reads until the child is gone, telling the test when recovery is done.
    let stdout_reader = thread::spawn(move || -> std::io::Result<String> {
        let mut stdout = BufReader::new(stdout_pipe);
        let mut text = String::new();
        loop {
            let start = text.len();
            if stdout.read_line(&mut text)? == 0 {
                return Ok(text);
            }
            if text[start..].trim_end() == "child-ready" {
                // The receiver is gone only when the kill came first.
                let _ = ready_sender.send(());
            }
        }
    });
    let stderr_reader = thread::spawn(move || -> std::io::Result<String> {
        let mut stderr = String::new();
        BufReader::new(stderr_pipe).read_to_string(&mut stderr)?;
        Ok(stderr)
    });

    let mut was_ready = false;
    match kill_at {
        KillAt::AfterSpawn(delay) => thread::sleep(delay),
        KillAt::AfterReady(delay) => {
            // A stuck child is killed without waiting for it, and then reported below.
            was_ready = ready.recv_timeout(STALL_LIMIT).is_ok();
            if was_ready {
                thread::sleep(delay);
            }
        }
    }
    let exited_by_itself = guard.0.try_wait()?.is_some();
    // `Child::kill` is SIGKILL on unix: no destructor, no flush, no chance to finish a write.
    guard.0.kill().context("kill the child writer")?;
    let status = guard.0.wait()?;
    let stdout = join_reader(stdout_reader, "stdout")?;
    let stderr = join_reader(stderr_reader, "stderr")?;
    let was_ready = was_ready || ready.try_recv().is_ok();
    if let KillAt::AfterReady(_) = kill_at {
        ensure!(
            was_ready || exited_by_itself,
            "the child did not finish recovery within {STALL_LIMIT:?} of its start ({:?} ago)\nstdout:\n{stdout}\nstderr:\n{stderr}",
            spawned.elapsed()
        );
    }
    Ok(ChildRun {
        status,
        exited_by_itself,
        was_ready,
        stdout,
        stderr,
    })
}

fn join_reader(
    reader: thread::JoinHandle<std::io::Result<String>>,
    what: &str,
) -> anyhow::Result<String> {
    match reader.join() {
        Ok(text) => text.with_context(|| format!("read the child's {what}")),
        Err(_) => bail!("the thread reading the child's {what} panicked"),
    }
}

fn sigkill_number() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// The record numbers of the complete `committed N` lines; a last line without its newline was
/// cut short by the kill and proves nothing.
fn committed_lines(stdout: &str) -> anyhow::Result<Vec<u64>> {
    let complete = stdout.rfind('\n').map_or("", |end| &stdout[..end]);
    complete
        .lines()
        .filter_map(|line| line.strip_prefix("committed "))
        .map(|number| {
            number
                .parse()
                .with_context(|| format!("bad line from the child: committed {number}"))
        })
        .collect()
}

struct Recovered {
    report: RecoveryReport,
    highest_record: u64,
}

/// Recovers `dir` the way start-up does, after `check` has looked at it, and verifies that
/// the state holds records `1..=highest` exactly, each whole.
fn recover_and_verify(dir: &Path) -> anyhow::Result<Recovered> {
    let checked = check(dir).context("check")?;
    let (store, state, report) = StateStore::open(dir).context("open")?;
    ensure!(
        checked == report,
        "check and open disagree:\ncheck: {checked:#?}\nopen: {report:#?}"
    );
    drop(store);
    if report.torn_tail.is_some() || !report.stale_files.is_empty() {
        // `open` repaired what the kill left; a second look finds nothing more to repair.
        let again = check(dir).context("check after open")?;
        ensure!(
            again.torn_tail.is_none() && again.stale_files.is_empty(),
            "open left something to repair: {again:#?}"
        );
        ensure!(
            again.digest == report.digest,
            "open changed the content it recovered"
        );
    }

    let records = records_present(&state)?;
    let highest_record = records.keys().max().copied().unwrap_or(0);
    for record in 1..=highest_record {
        let parts = records.get(&record).map(|parts| parts.len()).unwrap_or(0);
        ensure!(
            parts == PARTS.len(),
            "record {record} has {parts} of its {} parts (records up to {highest_record} exist)",
            PARTS.len()
        );
    }
    // Each record took three numbers of the writer's sequence, and the version vector says
    // that every one of them is reflected.
    let seen = state.version_vector().get(writer_id());
    ensure!(
        seen == highest_record * PARTS.len() as u64,
        "version vector says {seen} writes, the state holds {highest_record} records of {} writes",
        PARTS.len()
    );
    Ok(Recovered {
        report,
        highest_record,
    })
}

/// The parts of every record in `state`, each checked against what the writer wrote.
fn records_present(state: &GridState) -> anyhow::Result<BTreeMap<u64, BTreeSet<char>>> {
    let mut records: BTreeMap<u64, BTreeSet<char>> = BTreeMap::new();
    for value in state.config_values() {
        let ConfigValue::User(user) = value else {
            bail!("only the writer's users belong in this state: {value:?}");
        };
        let (record, part) = parse_user_name(user.name.to_string().as_str())
            .with_context(|| format!("unexpected user {}", user.name))?;
        ensure!(
            *user == record_user(record, part)?,
            "user {} holds something the writer never wrote",
            user.name
        );
        records.entry(record).or_default().insert(part);
    }
    Ok(records)
}

/// `r{record}-{part}` back into its parts.
fn parse_user_name(name: &str) -> Option<(u64, char)> {
    let (record, part) = name.strip_prefix('r')?.split_once('-')?;
    let mut part_chars = part.chars();
    let part = part_chars.next().filter(|part| PARTS.contains(part))?;
    if part_chars.next().is_some() {
        return None;
    }
    Some((record.parse().ok()?, part))
}

/// Commits record `record` the way the service commits a write: prepare, append (durable on
/// return), apply.
fn commit_record(
    store: &mut StateStore,
    state: &mut GridState,
    clock: &mut HlcClock,
    record: u64,
) -> anyhow::Result<()> {
    let delta = record_delta(state, clock, record)?;
    store.append(&delta)?;
    state.apply_delta(&delta)?;
    Ok(())
}

/// One delta writing all three users of `record`: three `prepare_config_write`s, each on a
/// replica that has the previous one applied so that they take consecutive sequence numbers,
/// combined into one delta from the first one's `since` to the last one's `upto`.
fn record_delta(state: &GridState, clock: &mut HlcClock, record: u64) -> anyhow::Result<Delta> {
    let mut scratch = state.clone();
    let mut combined = Delta::default();
    for (index, part) in PARTS.into_iter().enumerate() {
        let value = ConfigValue::User(record_user(record, part)?);
        let write = scratch.prepare_config_write(
            writer_id(),
            clock.tick(now_ms()),
            value.key(),
            Some(value),
        )?;
        scratch.apply_delta(&write)?;
        if index == 0 {
            combined.since = write.since.clone();
        }
        combined.upto = write.upto;
        combined.config.extend(write.config);
    }
    Ok(combined)
}

/// The user `r{record}-{part}`: a pure function of its name, so that recovery can check every
/// byte of it. Part `c` of one record in [`LARGE_RECORD_ONE_IN`] carries a long display name
/// and up to a hundred long group names (up to 5 KiB), so that some kills land in the middle
/// of a write spanning pages; the rest stay small to keep recovery quick.
fn record_user(record: u64, part: char) -> anyhow::Result<User> {
    let large = part == 'c' && record % LARGE_RECORD_ONE_IN == LARGE_RECORD_ONE_IN / 2;
    let (display_name_len, group_count) = if large {
        (256, 1 + (record * 7_919) % 100)
    } else {
        (0, 0)
    };
    let groups = (0..group_count)
        .map(|group| GroupName::new(format!("g{record}-{group}-{}", "x".repeat(40))))
        .collect::<Result<Vec<_>, _>>()?;
    let label = format!("record {record} part {part}");
    Ok(User {
        name: UserName::new(format!("r{record}-{part}"))?,
        display_name: format!("{label:.<display_name_len$}"),
        password_hash: String::new(),
        role: if part == 'a' { Role::Admin } else { Role::User },
        groups,
    })
}
