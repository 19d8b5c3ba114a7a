//! Whole-state snapshot files: written by temp file, sync and rename; read all-or-nothing.
//!
//! # Format (version 1)
//!
//! ```text
//! header (16 bytes):  magic "DGSNAP\0" | u8 format version | u64 LE generation
//! body:               u64 LE payload length | payload | u32 LE CRC32(every byte before it)
//! ```
//!
//! The version is a single byte so that magic, version and generation make a 16-byte header like
//! the log's. A snapshot is either entirely valid or refused: unlike the log there is no torn
//! tail to forgive, because a snapshot only ever becomes visible by a rename after it was synced.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use super::{
    fsync_dir, io_error, read_capped, read_u32_le, read_u64_le, Corruption, HeaderProblem,
    StorageError,
};

/// First bytes of every snapshot file.
pub const SNAPSHOT_MAGIC: &[u8; 7] = b"DGSNAP\0";
/// The only format version this build writes and reads.
pub const SNAPSHOT_FORMAT_VERSION: u8 = 1;
/// Magic (7) + version (1) + generation (8).
pub const SNAPSHOT_HEADER_LEN: u64 = 16;
/// The whole grid state of a large site is a few tens of MiB; the cap keeps a damaged length or
/// a foreign file from making start-up allocate without bound.
pub const MAX_SNAPSHOT_PAYLOAD_LEN: u64 = 1024 * 1024 * 1024;

// Byte positions inside the file, in the parser's `usize`.
const HEADER_LEN: usize = SNAPSHOT_HEADER_LEN as usize;
/// Where the payload starts: after the header and the u64 length.
const PAYLOAD_START: usize = HEADER_LEN + 8;
const CHECKSUM_LEN: usize = 4;
/// Largest file `write_snapshot` produces.
const MAX_SNAPSHOT_FILE_LEN: u64 =
    PAYLOAD_START as u64 + MAX_SNAPSHOT_PAYLOAD_LEN + CHECKSUM_LEN as u64;

/// A snapshot read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Which generation of the state this is; the log continuing it carries the same number.
    pub generation: u64,
    pub payload: Vec<u8>,
}

/// Durably replaces `dir/file_name` with a snapshot of `payload`.
///
/// `file_name` is a plain name inside `dir`. The snapshot is written to `.{file_name}.tmp`
/// beside it, synced, renamed over `file_name`, and then `dir` is synced, so readers and a
/// crash see either the old or the new snapshot whole. Only one writer per `file_name` may run
/// at a time, since they share the temp file.
pub fn write_snapshot(
    dir: &Path,
    file_name: &str,
    generation: u64,
    payload: &[u8],
) -> Result<(), StorageError> {
    let final_path = dir.join(file_name);
    let temp_path = temp_path(dir, file_name);
    let payload_len = payload.len() as u64;
    if payload_len > MAX_SNAPSHOT_PAYLOAD_LEN {
        return Err(StorageError::TooLarge {
            path: final_path,
            offset: PAYLOAD_START as u64,
            len: payload_len,
            max: MAX_SNAPSHOT_PAYLOAD_LEN,
        });
    }
    let written = write_temp(&temp_path, generation, payload).and_then(|()| {
        fs::rename(&temp_path, &final_path).map_err(|source| StorageError::Io {
            path: final_path.clone(),
            operation: "rename the temporary snapshot to",
            source,
        })
    });
    if let Err(error) = written {
        // The temp file is useless now; `remove_stale_temp` would also clear it at start-up.
        if let Err(remove_error) = fs::remove_file(&temp_path) {
            if remove_error.kind() != ErrorKind::NotFound {
                warn!(path = %temp_path.display(), error = %remove_error, "cannot remove temporary snapshot");
            }
        }
        return Err(error);
    }
    fsync_dir(dir)?;
    debug!(path = %final_path.display(), generation, payload_len, "wrote snapshot");
    Ok(())
}

/// Reads and fully verifies a snapshot; `Ok(None)` if there is no file at `path`.
///
/// Any damage is an error naming the file and the byte offset where the check failed.
pub fn read_snapshot(path: &Path) -> Result<Option<Snapshot>, StorageError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(source) if source.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StorageError::Io {
                path: path.to_path_buf(),
                operation: "open",
                source,
            })
        }
    };
    let bytes = read_capped(path, file, MAX_SNAPSHOT_FILE_LEN)?;
    parse_snapshot(path, bytes).map(Some)
}

/// Removes a temp file left by a `write_snapshot` that a crash interrupted. Returns whether
/// there was one.
///
/// The directory is not synced afterwards: should the removal itself be lost in a crash, the
/// next start-up simply removes the file again.
pub fn remove_stale_temp(dir: &Path, file_name: &str) -> Result<bool, StorageError> {
    let temp_path = temp_path(dir, file_name);
    match fs::remove_file(&temp_path) {
        Ok(()) => {
            info!(path = %temp_path.display(), "removed temporary snapshot left by an interrupted write");
            Ok(true)
        }
        Err(source) if source.kind() == ErrorKind::NotFound => Ok(false),
        Err(source) => Err(StorageError::Io {
            path: temp_path,
            operation: "remove",
            source,
        }),
    }
}

fn temp_path(dir: &Path, file_name: &str) -> PathBuf {
    dir.join(format!(".{file_name}.tmp"))
}

fn write_temp(temp_path: &Path, generation: u64, payload: &[u8]) -> Result<(), StorageError> {
    // `truncate` because a temp file left by a crash may still be there.
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // Grid state holds user records and token hashes: owner only.
        .mode(0o600)
        .open(temp_path)
        .map_err(io_error(temp_path, "create"))?;
    let mut prefix = [0u8; PAYLOAD_START];
    prefix[..7].copy_from_slice(SNAPSHOT_MAGIC);
    prefix[7] = SNAPSHOT_FORMAT_VERSION;
    prefix[8..16].copy_from_slice(&generation.to_le_bytes());
    prefix[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&prefix);
    hasher.update(payload);
    let checksum = hasher.finalize().to_le_bytes();
    // Three writes instead of one buffer: nobody sees this file before the rename, so there is
    // no torn-write concern, and a 1 GiB payload is not copied.
    file.write_all(&prefix)
        .and_then(|()| file.write_all(payload))
        .and_then(|()| file.write_all(&checksum))
        .map_err(io_error(temp_path, "write"))?;
    file.sync_all().map_err(io_error(temp_path, "sync"))
}

fn parse_snapshot(path: &Path, mut bytes: Vec<u8>) -> Result<Snapshot, StorageError> {
    let file_len = bytes.len();
    let corrupt = |offset: usize, problem| StorageError::Corrupt {
        path: path.to_path_buf(),
        offset: offset as u64,
        problem,
    };
    let bad_header = |problem| StorageError::BadHeader {
        path: path.to_path_buf(),
        problem,
    };

    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(bad_header(HeaderProblem::Truncated {
            file_len: file_len as u64,
            header_len: SNAPSHOT_HEADER_LEN,
        }));
    };
    if &header[..7] != SNAPSHOT_MAGIC {
        return Err(bad_header(HeaderProblem::WrongMagic {
            found: header[..7].to_vec(),
            expected: SNAPSHOT_MAGIC,
        }));
    }
    if header[7] != SNAPSHOT_FORMAT_VERSION {
        return Err(bad_header(HeaderProblem::UnsupportedVersion {
            found: u16::from(header[7]),
            supported: u16::from(SNAPSHOT_FORMAT_VERSION),
        }));
    }
    let generation = read_u64_le(header, 8);

    if file_len < PAYLOAD_START {
        return Err(corrupt(
            file_len,
            Corruption::Truncated {
                expected_end: PAYLOAD_START as u64,
                file_len: file_len as u64,
            },
        ));
    }
    let payload_len = read_u64_le(&bytes, HEADER_LEN);
    if payload_len > MAX_SNAPSHOT_PAYLOAD_LEN {
        return Err(corrupt(
            HEADER_LEN,
            Corruption::LengthTooLarge {
                len: payload_len,
                max: MAX_SNAPSHOT_PAYLOAD_LEN,
            },
        ));
    }
    // `payload_len <= MAX_SNAPSHOT_PAYLOAD_LEN`, which fits in usize.
    let payload_end = PAYLOAD_START + payload_len as usize;
    let expected_end = payload_end + CHECKSUM_LEN;
    if file_len < expected_end {
        return Err(corrupt(
            file_len,
            Corruption::Truncated {
                expected_end: expected_end as u64,
                file_len: file_len as u64,
            },
        ));
    }
    if file_len > expected_end {
        return Err(corrupt(
            expected_end,
            Corruption::TrailingBytes {
                extra: (file_len - expected_end) as u64,
            },
        ));
    }
    let stored = read_u32_le(&bytes, payload_end);
    let computed = crc32fast::hash(&bytes[..payload_end]);
    if stored != computed {
        return Err(corrupt(
            payload_end,
            Corruption::FileChecksum {
                covered: payload_end as u64,
                stored,
                computed,
            },
        ));
    }
    bytes.truncate(payload_end);
    bytes.drain(..PAYLOAD_START);
    Ok(Snapshot {
        generation,
        payload: bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "state.snapshot";

    fn sample_payload() -> Vec<u8> {
        (0..200u32).map(|index| (index * 31 % 251) as u8).collect()
    }

    #[test]
    fn snapshot_round_trip_and_replacement() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);

        write_snapshot(dir.path(), NAME, 5, &sample_payload()).expect("write snapshot");
        assert_eq!(
            read_snapshot(&path).expect("read snapshot"),
            Some(Snapshot {
                generation: 5,
                payload: sample_payload(),
            })
        );
        assert_eq!(
            fs::metadata(&path).expect("metadata").len(),
            PAYLOAD_START as u64 + sample_payload().len() as u64 + CHECKSUM_LEN as u64
        );

        write_snapshot(dir.path(), NAME, 6, b"").expect("replace snapshot");
        assert_eq!(
            read_snapshot(&path).expect("read snapshot"),
            Some(Snapshot {
                generation: 6,
                payload: Vec::new(),
            })
        );
        assert!(
            !temp_path(dir.path(), NAME).exists(),
            "temp file left behind"
        );
    }

    #[test]
    fn missing_snapshot_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            read_snapshot(&dir.path().join(NAME)).expect("a missing snapshot is not an error"),
            None
        );
    }

    #[test]
    fn snapshot_with_any_flipped_byte_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);
        write_snapshot(dir.path(), NAME, 5, &sample_payload()).expect("write snapshot");
        let original = fs::read(&path).expect("read snapshot");
        let path_text = path.display().to_string();

        for index in 0..original.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bytes = original.clone();
                bytes[index] ^= mask;
                fs::write(&path, &bytes).expect("write damaged snapshot");
                let error = match read_snapshot(&path) {
                    Err(error) => error,
                    Ok(snapshot) => panic!("byte {index} mask {mask:#x} accepted: {snapshot:?}"),
                };
                let message = error.to_string();
                assert!(message.contains(&path_text), "{message}");
                match error {
                    // Magic and version are checked before the checksum, everything else by it.
                    StorageError::BadHeader { .. } => {
                        assert!(index < 8, "byte {index}: {message}")
                    }
                    StorageError::Corrupt { offset, .. } => {
                        assert!(index >= 8, "byte {index}: {message}");
                        assert!(offset <= original.len() as u64, "byte {index}: {message}");
                        assert!(message.contains(&format!("offset {offset}")), "{message}");
                    }
                    other => panic!("byte {index}: unexpected error {other:?}"),
                }
            }
        }
    }

    #[test]
    fn damaged_payload_names_the_checksum_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);
        write_snapshot(dir.path(), NAME, 5, &sample_payload()).expect("write snapshot");
        let mut bytes = fs::read(&path).expect("read snapshot");
        bytes[PAYLOAD_START + 10] ^= 0x04;
        fs::write(&path, &bytes).expect("write damaged snapshot");

        let checksum_offset = (bytes.len() - CHECKSUM_LEN) as u64;
        match read_snapshot(&path) {
            Err(StorageError::Corrupt {
                offset,
                problem: Corruption::FileChecksum { covered, .. },
                ..
            }) => {
                assert_eq!(offset, checksum_offset);
                assert_eq!(covered, checksum_offset);
            }
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
    }

    #[test]
    fn truncated_or_extended_snapshot_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(NAME);
        write_snapshot(dir.path(), NAME, 5, &sample_payload()).expect("write snapshot");
        let original = fs::read(&path).expect("read snapshot");

        for cut in 0..original.len() {
            fs::write(&path, &original[..cut]).expect("write truncated snapshot");
            match read_snapshot(&path) {
                Err(StorageError::BadHeader {
                    problem: HeaderProblem::Truncated { file_len, .. },
                    ..
                }) => {
                    assert!(cut < HEADER_LEN);
                    assert_eq!(file_len, cut as u64);
                }
                Err(StorageError::Corrupt {
                    offset,
                    problem: Corruption::Truncated { .. },
                    ..
                }) => {
                    assert!(cut >= HEADER_LEN);
                    assert_eq!(offset, cut as u64);
                }
                other => panic!("cut at {cut}: expected a truncation error, got {other:?}"),
            }
        }

        let mut extended = original.clone();
        extended.extend_from_slice(&[0, 0, 0]);
        fs::write(&path, &extended).expect("write extended snapshot");
        match read_snapshot(&path) {
            Err(StorageError::Corrupt {
                offset, problem, ..
            }) => {
                assert_eq!(offset, original.len() as u64);
                assert_eq!(problem, Corruption::TrailingBytes { extra: 3 });
            }
            other => panic!("expected trailing bytes, got {other:?}"),
        }
    }

    #[test]
    fn stale_temp_is_removed_and_the_snapshot_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_snapshot(dir.path(), NAME, 5, &sample_payload()).expect("write snapshot");
        let temp = temp_path(dir.path(), NAME);
        fs::write(&temp, b"half a snapshot").expect("write stale temp");

        assert!(remove_stale_temp(dir.path(), NAME).expect("remove stale temp"));
        assert!(!temp.exists());
        assert!(!remove_stale_temp(dir.path(), NAME).expect("nothing to remove"));
        let snapshot = read_snapshot(&dir.path().join(NAME)).expect("read snapshot");
        assert_eq!(snapshot.map(|snapshot| snapshot.generation), Some(5));
    }

    #[test]
    fn write_replaces_a_stale_temp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let temp = temp_path(dir.path(), NAME);
        fs::write(&temp, vec![0xAA; 4096]).expect("write stale temp");

        write_snapshot(dir.path(), NAME, 8, b"fresh").expect("write snapshot");
        assert!(!temp.exists());
        assert_eq!(
            read_snapshot(&dir.path().join(NAME)).expect("read snapshot"),
            Some(Snapshot {
                generation: 8,
                payload: b"fresh".to_vec(),
            })
        );
    }

    #[test]
    fn failed_write_leaves_the_old_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_snapshot(dir.path(), NAME, 5, b"old").expect("write snapshot");
        // A directory where the temp file should go makes creating it fail.
        fs::create_dir(temp_path(dir.path(), NAME)).expect("block the temp path");

        match write_snapshot(dir.path(), NAME, 6, b"new") {
            Err(StorageError::Io { operation, .. }) => assert_eq!(operation, "create"),
            other => panic!("expected an Io error, got {other:?}"),
        }
        assert_eq!(
            read_snapshot(&dir.path().join(NAME)).expect("read snapshot"),
            Some(Snapshot {
                generation: 5,
                payload: b"old".to_vec(),
            })
        );
    }
}
