//! Crash-safe flat files: the byte formats of the append-only record log and of whole-state snapshots.
//!
//! Both files start with a magic string, a format version and the snapshot generation, and every
//! byte after that is covered by a CRC32. Neither format knows what its payloads mean: the store
//! above encodes grid state into them and decides when to write which.
//!
//! # Durability design
//!
//! - A snapshot is written to `.{name}.tmp` in the same directory, synced, renamed over the old
//!   snapshot, and then the directory is synced. After a crash either the old or the new snapshot
//!   is visible, never a mix of both.
//! - A log record is appended with a single `write` of the whole frame followed by `fdatasync`,
//!   and the append returns only after the sync. A caller that acknowledges a change after
//!   `append` returned therefore never loses an acknowledged change.
//! - After a crash only the last append, which nobody was told about, can be damaged. Reading a
//!   log tolerates exactly the damage an interrupted append at the end of the file can cause (a
//!   "torn tail") and refuses everything else with [`StorageError::Corrupt`]: a flipped bit in the
//!   middle of the log must stop start-up, not silently drop the records behind it.
//!
//! **Invariant:** nothing here reads the clock or interprets payloads, and reading a file never
//! modifies it (`deskgrid state check` relies on that).

pub mod log_file;
pub mod snapshot_file;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Why a state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An operating-system call on a file or directory failed.
    #[error("cannot {operation} {}", .path.display())]
    Io {
        path: PathBuf,
        operation: &'static str,
        source: io::Error,
    },
    /// The file's content is damaged at `offset` in a way a crash cannot explain.
    #[error("{}: corrupt data at byte offset {offset}: {problem}", .path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        problem: Corruption,
    },
    /// The file does not start with a header this build understands.
    #[error("{}: bad file header: {problem}", .path.display())]
    BadHeader {
        path: PathBuf,
        problem: HeaderProblem,
    },
    /// A record or payload was refused before writing because it exceeds the format's limit.
    #[error(
        "{}: refusing a {len}-byte payload at byte offset {offset}, the limit is {max} bytes",
        .path.display()
    )]
    TooLarge {
        path: PathBuf,
        offset: u64,
        len: u64,
        max: u64,
    },
    /// A file is larger than any file this format writes, so it was not read into memory.
    #[error("{}: file is {len} bytes long, the limit is {max} bytes", .path.display())]
    FileTooLarge { path: PathBuf, len: u64, max: u64 },
    /// Appending would grow the log past what `read_log` accepts; it needs a snapshot first.
    #[error(
        "{}: log is {len} bytes long and a {record_len}-byte record would pass the {max}-byte limit",
        .path.display()
    )]
    LogFull {
        path: PathBuf,
        len: u64,
        record_len: u64,
        max: u64,
    },
    /// The log's length on disk is not what `read_log` saw, so its recovery result is stale.
    #[error(
        "{}: log is {actual_len} bytes long but was {expected_len} bytes when it was read",
        .path.display()
    )]
    ChangedSinceRead {
        path: PathBuf,
        expected_len: u64,
        actual_len: u64,
    },
    /// An earlier write or sync of this log failed, so the end of the file is unknown.
    #[error("{}: log writer is unusable after an earlier failed write or sync", .path.display())]
    WriterPoisoned { path: PathBuf },
}

/// What exactly is damaged inside a state file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// The checksum over a log record's length and payload checksum does not match.
    #[error("record header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    FrameHeaderChecksum { stored: u32, computed: u32 },
    /// A log record's payload does not match its checksum.
    #[error("record payload checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    PayloadChecksum { stored: u32, computed: u32 },
    /// A checksummed length is larger than the writer ever writes.
    #[error("declared length {len} is larger than the limit of {max} bytes")]
    LengthTooLarge { len: u64, max: u64 },
    /// The file ends before the content its header declares.
    #[error("file ends at byte {file_len}, before the end of its content at byte {expected_end}")]
    Truncated { expected_end: u64, file_len: u64 },
    /// The file continues after the content its header declares.
    #[error("{extra} unexpected bytes after the end of the content")]
    TrailingBytes { extra: u64 },
    /// The checksum over the whole file does not match.
    #[error("checksum over bytes 0..{covered} mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    FileChecksum {
        covered: u64,
        stored: u32,
        computed: u32,
    },
}

/// Why a file header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    /// The file is shorter than its fixed-size header.
    #[error("file is {file_len} bytes long, shorter than the {header_len}-byte header")]
    Truncated { file_len: u64, header_len: u64 },
    /// The file is not this kind of deskgrid file (or its first bytes are damaged).
    #[error(
        "wrong magic bytes \"{}\", expected \"{}\"",
        .found.escape_ascii(),
        .expected.escape_ascii()
    )]
    WrongMagic {
        found: Vec<u8>,
        expected: &'static [u8],
    },
    /// The file was written by a build with a format this build cannot read.
    #[error("unsupported format version {found}, this build reads version {supported}")]
    UnsupportedVersion { found: u16, supported: u16 },
}

/// Makes a directory entry change (create, rename, truncate-by-replace) durable.
///
/// Syncing a file makes its content durable but not its name: after a power loss a freshly
/// created or renamed file can vanish unless its directory was synced too.
pub fn fsync_dir(dir: &Path) -> Result<(), StorageError> {
    // `Path::parent` of a bare file name is "", which means the current directory.
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let handle = File::open(dir).map_err(io_error(dir, "open directory"))?;
    handle.sync_all().map_err(io_error(dir, "sync directory"))
}

/// The directory holding `path`, for syncing after creating or renaming `path`.
fn parent_dir(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Builds the `map_err` closure for an I/O failure of `operation` on `path`.
fn io_error<'a>(
    path: &'a Path,
    operation: &'static str,
) -> impl FnOnce(io::Error) -> StorageError + 'a {
    move |source| StorageError::Io {
        path: path.to_path_buf(),
        operation,
        source,
    }
}

/// Reads the whole of an opened file, refusing files longer than `max` bytes.
///
/// The length is checked before reading and the read itself is capped, so a file that grows
/// while it is read cannot make us allocate more than `max + 1` bytes.
fn read_capped(path: &Path, file: File, max: u64) -> Result<Vec<u8>, StorageError> {
    let len = file
        .metadata()
        .map_err(io_error(path, "read the metadata of"))?
        .len();
    if len > max {
        return Err(StorageError::FileTooLarge {
            path: path.to_path_buf(),
            len,
            max,
        });
    }
    // `len <= max` and both limits fit in memory on the 64-bit hosts deskgrid runs on; on a
    // smaller target the capacity hint simply falls back to growing.
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error(path, "read"))?;
    let read_len = bytes.len() as u64;
    if read_len > max {
        return Err(StorageError::FileTooLarge {
            path: path.to_path_buf(),
            len: read_len,
            max,
        });
    }
    Ok(bytes)
}

/// Little-endian `u32` at `at`; callers have already checked that the bytes exist.
fn read_u32_le(bytes: &[u8], at: usize) -> u32 {
    let mut field = [0u8; 4];
    field.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(field)
}

/// Little-endian `u64` at `at`; callers have already checked that the bytes exist.
fn read_u64_le(bytes: &[u8], at: usize) -> u64 {
    let mut field = [0u8; 8];
    field.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(field)
}
