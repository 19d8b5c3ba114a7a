//! The durable grid state: a snapshot plus an append-only log of deltas.
//!
//! Files in the state directory:
//!
//! - `snapshot`: the whole state at generation `G` (absent before the first
//!   compaction, which means generation 0 and an empty state);
//! - `log.G`: every delta applied since that snapshot, one checksummed record
//!   each, durable before [`StateStore::append`] returns.
//!
//! Compaction writes snapshot `G+1` atomically, then creates `log.G+1`, then
//! deletes `log.G`. A crash between any two steps leaves files that recovery
//! understands: a log older than the snapshot is already inside it (and
//! replaying it would be harmless anyway, since merging is idempotent).
//!
//! **Invariant:** a record is applied whole or not at all. A torn last record
//! (a crash in the middle of an append) is cut off and logged; damage anywhere
//! before it stops start-up with the file and byte offset.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::grid_state::{Delta, GridState, MergeError};
use super::storage::log_file::{read_log, LogContents, LogWriter, TornTail};
use super::storage::snapshot_file::{read_snapshot, write_snapshot};
use super::storage::{fsync_dir, HeaderProblem, StorageError};

const SNAPSHOT_FILE: &str = "snapshot";

/// Compact once the log holds this many bytes: replaying 64 MiB of deltas at
/// start-up takes well under a second, and a snapshot of a large grid is of
/// the same order, so the log never costs more than the snapshot to read.
pub const COMPACT_AFTER_LOG_BYTES: u64 = 64 << 20;
/// ... or this many records, whichever comes first.
pub const COMPACT_AFTER_LOG_RECORDS: u64 = 100_000;

/// A log record's payload: a versioned envelope, so later formats can be read
/// next to old records.
#[derive(Debug, Serialize, Deserialize)]
enum LogRecordBody {
    #[serde(rename = "delta-v1")]
    DeltaV1(Delta),
}

/// A snapshot's payload.
#[derive(Debug, Serialize, Deserialize)]
enum SnapshotBody {
    #[serde(rename = "state-v1")]
    StateV1(Delta),
}

/// Why the state could not be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{}: record at byte offset {offset} cannot be decoded: {problem}", .path.display())]
    Undecodable {
        path: PathBuf,
        offset: u64,
        problem: String,
    },
    #[error("{}: record at byte offset {offset} is refused", .path.display())]
    Refused {
        path: PathBuf,
        offset: u64,
        #[source]
        source: MergeError,
    },
    #[error(
        "{}: log continues generation {log_generation} but the snapshot is generation {snapshot_generation}: the snapshot is missing or older than the log",
        .path.display()
    )]
    LogAheadOfSnapshot {
        path: PathBuf,
        log_generation: u64,
        snapshot_generation: u64,
    },
    #[error(
        "{}: an earlier compaction did not finish, so new records would be lost; compact again (deskgrid state compact) before writing",
        .dir.display()
    )]
    CompactionIncomplete { dir: PathBuf },
    #[error("cannot {operation} {}", .path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What recovery found and did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryReport {
    pub generation: u64,
    pub snapshot_bytes: Option<u64>,
    pub log_records: u64,
    pub log_bytes: u64,
    /// The interrupted last append that recovery cut off (or, for `check`, would).
    pub torn_tail: Option<TornTailReport>,
    /// Files left by a crash during compaction (removed by `open`, listed by `check`).
    pub stale_files: Vec<PathBuf>,
    pub entries: usize,
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TornTailReport {
    pub path: PathBuf,
    pub offset: u64,
    pub discarded_bytes: u64,
    pub reason: String,
}

/// The state directory, open for appending. Single writer: the data
/// directory's lock keeps a second process out.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
    log: LogWriter,
    log_records: u64,
    /// A compaction failed part-way: the new snapshot may already be in
    /// place, which makes the current log stale. Appending to it would write
    /// records that the next start discards, so appends are refused until a
    /// compaction succeeds.
    compaction_incomplete: bool,
}

/// Everything read from the state directory, before anything is changed.
struct Loaded {
    state: GridState,
    generation: u64,
    snapshot_bytes: Option<u64>,
    /// The current generation's log; `None` when it is absent or was never
    /// fully created (a header cut short by a crash: no record can follow it).
    log: Option<LogContents>,
    stale_files: Vec<PathBuf>,
}

impl StateStore {
    /// Recovers the state from `dir` (creating an empty store if `dir` has
    /// none), repairs what a crash can leave behind, and opens the log.
    pub fn open(dir: &Path) -> Result<(Self, GridState, RecoveryReport), StoreError> {
        fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            operation: "create directory",
            source,
        })?;
        let loaded = load(dir)?;
        for stale in &loaded.stale_files {
            tracing::info!(path = %stale.display(), "removing a file left by an interrupted compaction");
            fs::remove_file(stale).map_err(|source| StoreError::Io {
                path: stale.clone(),
                operation: "remove",
                source,
            })?;
        }
        let log_path = log_path(dir, loaded.generation);
        let (log, log_records) = match &loaded.log {
            Some(contents) => {
                // Truncates a torn tail (and logs it) before the first append.
                let writer = LogWriter::open_append(&log_path, contents)?;
                (writer, contents.records.len() as u64)
            }
            None => {
                if log_path.exists() {
                    fs::remove_file(&log_path).map_err(|source| StoreError::Io {
                        path: log_path.clone(),
                        operation: "remove",
                        source,
                    })?;
                }
                (LogWriter::create(&log_path, loaded.generation)?, 0)
            }
        };
        let report = report(dir, &loaded);
        tracing::info!(
            generation = report.generation,
            log_records = report.log_records,
            entries = report.entries,
            torn_tail = report.torn_tail.is_some(),
            "grid state recovered"
        );
        let store = Self {
            dir: dir.to_owned(),
            log,
            log_records,
            compaction_incomplete: false,
        };
        Ok((store, loaded.state, report))
    }

    /// Appends a delta to the log; returns once it is on disk.
    pub fn append(&mut self, delta: &Delta) -> Result<(), StoreError> {
        if self.compaction_incomplete {
            return Err(StoreError::CompactionIncomplete {
                dir: self.dir.clone(),
            });
        }
        let payload = encode(&LogRecordBody::DeltaV1(delta.clone()));
        self.log.append(&payload)?;
        self.log_records += 1;
        Ok(())
    }

    /// True when the log has grown enough to be folded into a snapshot.
    pub fn should_compact(&self) -> bool {
        self.log.len() >= COMPACT_AFTER_LOG_BYTES || self.log_records >= COMPACT_AFTER_LOG_RECORDS
    }

    pub fn generation(&self) -> u64 {
        self.log.generation()
    }

    pub fn log_bytes(&self) -> u64 {
        self.log.len()
    }

    pub fn log_records(&self) -> u64 {
        self.log_records
    }

    /// Writes `state` (which must include every appended delta) as the next
    /// snapshot and starts a new, empty log.
    pub fn compact(&mut self, state: &GridState) -> Result<(), StoreError> {
        self.compaction_incomplete = true;
        self.try_compact(state)?;
        self.compaction_incomplete = false;
        Ok(())
    }

    /// True after a failed compaction, until one succeeds.
    pub fn compaction_incomplete(&self) -> bool {
        self.compaction_incomplete
    }

    fn try_compact(&mut self, state: &GridState) -> Result<(), StoreError> {
        let old_generation = self.log.generation();
        // After an earlier failure the snapshot may be ahead of our log: go
        // past whatever is on disk.
        let on_disk = read_snapshot(&self.dir.join(SNAPSHOT_FILE))
            .ok()
            .flatten()
            .map_or(0, |snapshot| snapshot.generation);
        let generation = old_generation.max(on_disk) + 1;
        let payload = encode(&SnapshotBody::StateV1(state.to_delta()));
        write_snapshot(&self.dir, SNAPSHOT_FILE, generation, &payload)?;
        let new_log = log_path(&self.dir, generation);
        if new_log.exists() {
            // Left by an earlier failed attempt; it holds no record.
            fs::remove_file(&new_log).map_err(|source| StoreError::Io {
                path: new_log.clone(),
                operation: "remove",
                source,
            })?;
        }
        self.log = LogWriter::create(&new_log, generation)?;
        self.log_records = 0;
        for (stale_generation, stale) in log_files(&self.dir)? {
            if stale_generation < generation {
                fs::remove_file(&stale).map_err(|source| StoreError::Io {
                    path: stale,
                    operation: "remove",
                    source,
                })?;
            }
        }
        fsync_dir(&self.dir)?;
        tracing::info!(
            generation,
            snapshot_bytes = payload.len(),
            "grid state compacted"
        );
        Ok(())
    }
}

/// Reads and verifies the state directory without changing anything: what
/// `deskgrid state check` reports, and exactly what `open` would recover.
pub fn check(dir: &Path) -> Result<RecoveryReport, StoreError> {
    let loaded = load(dir)?;
    Ok(report(dir, &loaded))
}

fn load(dir: &Path) -> Result<Loaded, StoreError> {
    let snapshot_path = dir.join(SNAPSHOT_FILE);
    let (mut state, generation, snapshot_bytes) = match read_snapshot(&snapshot_path)? {
        Some(snapshot) => {
            // The snapshot's payload offset: after its 16-byte header and 8-byte length.
            let body: SnapshotBody = decode(&snapshot.payload, &snapshot_path, 24)?;
            let SnapshotBody::StateV1(delta) = body;
            let state = GridState::from_delta(&delta).map_err(|source| StoreError::Refused {
                path: snapshot_path.clone(),
                offset: 24,
                source,
            })?;
            (
                state,
                snapshot.generation,
                Some(snapshot.payload.len() as u64),
            )
        }
        None => (GridState::new(), 0, None),
    };

    let mut stale_files = Vec::new();
    // A snapshot being written when the crash came; the old one still stands.
    let temp_snapshot = dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
    if temp_snapshot.exists() {
        stale_files.push(temp_snapshot);
    }
    let mut current_log = None;
    for (log_generation, path) in log_files(dir)? {
        if log_generation < generation {
            stale_files.push(path);
        } else if log_generation > generation {
            return Err(StoreError::LogAheadOfSnapshot {
                path,
                log_generation,
                snapshot_generation: generation,
            });
        } else {
            current_log = Some(path);
        }
    }

    let log = match current_log {
        None => None,
        Some(path) => match read_log(&path) {
            // `LogWriter::create` writes the header before anyone appends: a
            // header cut short means the crash came before the first record.
            Err(StorageError::BadHeader {
                problem: HeaderProblem::Truncated { .. },
                ..
            }) => {
                stale_files.push(path);
                None
            }
            Err(error) => return Err(error.into()),
            Ok(contents) => {
                for record in &contents.records {
                    let body: LogRecordBody = decode(&record.payload, &path, record.offset)?;
                    let LogRecordBody::DeltaV1(delta) = body;
                    state
                        .apply_delta(&delta)
                        .map_err(|source| StoreError::Refused {
                            path: path.clone(),
                            offset: record.offset,
                            source,
                        })?;
                }
                Some(contents)
            }
        },
    };
    Ok(Loaded {
        state,
        generation,
        snapshot_bytes,
        log,
        stale_files,
    })
}

fn report(dir: &Path, loaded: &Loaded) -> RecoveryReport {
    let torn_tail = loaded
        .log
        .as_ref()
        .and_then(|log| log.torn_tail.as_ref())
        .map(|torn: &TornTail| TornTailReport {
            path: log_path(dir, loaded.generation),
            offset: torn.offset,
            discarded_bytes: torn.discarded_bytes,
            reason: torn.reason.to_string(),
        });
    RecoveryReport {
        generation: loaded.generation,
        snapshot_bytes: loaded.snapshot_bytes,
        log_records: loaded
            .log
            .as_ref()
            .map_or(0, |log| log.records.len() as u64),
        log_bytes: loaded.log.as_ref().map_or(0, |log| log.valid_len),
        torn_tail,
        stale_files: loaded.stale_files.clone(),
        entries: loaded.state.entry_count(),
        digest: hex::encode(loaded.state.digest()),
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("log.{generation}"))
}

/// `log.N` files in `dir`, by generation.
fn log_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(StoreError::Io {
                path: dir.to_owned(),
                operation: "list",
                source,
            })
        }
    };
    let mut logs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            operation: "list",
            source,
        })?;
        let name = entry.file_name();
        let Some(generation) = name
            .to_str()
            .and_then(|name| name.strip_prefix("log."))
            .and_then(|generation| generation.parse::<u64>().ok())
        else {
            continue;
        };
        logs.push((generation, entry.path()));
    }
    logs.sort();
    Ok(logs)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(value, &mut bytes)
        .expect("CBOR encoding of the state into memory cannot fail");
    bytes
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    path: &Path,
    offset: u64,
) -> Result<T, StoreError> {
    ciborium::from_reader(bytes).map_err(|error| StoreError::Undecodable {
        path: path.to_owned(),
        offset,
        problem: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{sample_template, ServerId};
    use crate::state::{ConfigKey, ConfigValue, Hlc};

    fn write_templates(store: &mut StateStore, state: &mut GridState, names: &[&str]) {
        let origin = ServerId::from_bytes([7; 16]);
        for (index, name) in names.iter().enumerate() {
            let hlc = Hlc {
                physical_ms: 1_000 + index as u64,
                logical: 0,
            };
            let delta = state
                .put_config(origin, hlc, ConfigValue::Template(sample_template(name)))
                .unwrap();
            store.append(&delta).unwrap();
        }
    }

    #[test]
    fn appended_deltas_survive_a_restart_and_a_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state, report) = StateStore::open(dir.path()).unwrap();
        assert_eq!(report.entries, 0);
        write_templates(&mut store, &mut state, &["a", "b"]);
        drop(store);

        let (mut store, mut recovered, report) = StateStore::open(dir.path()).unwrap();
        assert_eq!(recovered, state);
        assert_eq!(report.log_records, 2);
        store.compact(&recovered).unwrap();
        write_templates(&mut store, &mut recovered, &["c"]);
        drop(store);

        let (store, after, report) = StateStore::open(dir.path()).unwrap();
        assert_eq!(after.templates().count(), 3);
        assert_eq!((report.generation, report.log_records), (1, 1));
        assert_eq!(store.generation(), 1);
        assert!(!log_path(dir.path(), 0).exists(), "the old log is gone");
    }

    #[test]
    fn an_interrupted_compaction_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state, _) = StateStore::open(dir.path()).unwrap();
        write_templates(&mut store, &mut state, &["a", "b"]);
        // As if the crash came after the snapshot was renamed into place but
        // before the new log existed: the old log is still there.
        let payload = encode(&SnapshotBody::StateV1(state.to_delta()));
        write_snapshot(dir.path(), SNAPSHOT_FILE, 1, &payload).unwrap();
        drop(store);

        let checked = check(dir.path()).unwrap();
        assert_eq!(checked.stale_files, vec![log_path(dir.path(), 0)]);
        let (_, recovered, report) = StateStore::open(dir.path()).unwrap();
        assert_eq!(recovered, state);
        assert_eq!(report.generation, 1);
        assert!(!log_path(dir.path(), 0).exists());
        assert!(log_path(dir.path(), 1).exists());
    }

    #[test]
    fn a_damaged_old_record_stops_recovery_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state, _) = StateStore::open(dir.path()).unwrap();
        write_templates(&mut store, &mut state, &["a", "b", "c"]);
        drop(store);
        let path = log_path(dir.path(), 0);
        let mut bytes = fs::read(&path).unwrap();
        let inside_first_record = 16 + 12 + 5;
        bytes[inside_first_record] ^= 0x40;
        fs::write(&path, &bytes).unwrap();

        let error = StateStore::open(dir.path()).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("byte offset 16"), "{error}");
        assert_eq!(check(dir.path()).unwrap_err().to_string(), error);
        // Nothing was repaired away: the file is as it was.
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn a_failed_compaction_refuses_appends_until_one_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, mut state, _) = StateStore::open(dir.path()).unwrap();
        write_templates(&mut store, &mut state, &["alice"]);
        // Something in the way of the new log: the snapshot lands, the log cannot.
        fs::create_dir(log_path(dir.path(), 1)).unwrap();
        assert!(store.compact(&state).is_err());
        assert!(store.compaction_incomplete());
        let origin = ServerId::from_bytes([7; 16]);
        let delta = state
            .prepare_config_write(
                origin,
                Hlc {
                    physical_ms: 9_000,
                    logical: 0,
                },
                ConfigKey::Policy,
                None,
            )
            .unwrap();
        assert!(matches!(
            store.append(&delta),
            Err(StoreError::CompactionIncomplete { .. })
        ));

        fs::remove_dir(log_path(dir.path(), 1)).unwrap();
        store.compact(&state).unwrap();
        write_templates(&mut store, &mut state, &["bob"]);
        drop(store);
        let (_, recovered, _) = StateStore::open(dir.path()).unwrap();
        assert_eq!(recovered, state, "nothing acknowledged was lost");
        assert_eq!(recovered.templates().count(), 2);
    }

    #[test]
    fn a_leftover_snapshot_temp_is_reported_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        let temp = dir.path().join(".snapshot.tmp");
        fs::write(&temp, b"half a snapshot").unwrap();
        assert_eq!(check(dir.path()).unwrap().stale_files, vec![temp.clone()]);
        let (_, _, report) = StateStore::open(dir.path()).unwrap();
        assert_eq!(report.stale_files, vec![temp.clone()]);
        assert!(!temp.exists());
    }

    #[test]
    fn a_log_from_the_future_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateStore::open(dir.path()).unwrap());
        fs::rename(log_path(dir.path(), 0), log_path(dir.path(), 3)).unwrap();
        let error = StateStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(
                error,
                StoreError::LogAheadOfSnapshot {
                    log_generation: 3,
                    ..
                }
            ),
            "{error}"
        );
    }
}
