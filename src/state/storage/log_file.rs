//! Append-only log of opaque byte records, with a torn-tail-tolerant, corruption-refusing reader.
//!
//! # Format (version 1)
//!
//! ```text
//! header (16 bytes):  magic "DGLOG\0" | u16 LE format version | u64 LE generation
//! record frame:       u32 LE payload length | u32 LE CRC32(payload)
//!                     | u32 LE CRC32(previous 8 bytes) | payload
//! ```
//!
//! The generation is the snapshot generation this log continues. The header checksum covers the
//! length, so a damaged length is never trusted to say where the next record starts.
//!
//! # Reading after a crash
//!
//! [`LogWriter::append`] writes one frame with one `write` and syncs before returning, so at most
//! the last frame can be incomplete after a crash. [`read_log`] accepts the following as a torn
//! tail (reported in [`LogContents::torn_tail`], dropped by [`LogWriter::open_append`]):
//!
//! - fewer than 12 bytes after the last complete record (a frame header cut short);
//! - a frame header whose checksum fails where every byte up to the end of the file is zero
//!   (space the file system allocated but the write never reached). Eight zero bytes never carry
//!   a valid header checksum, since CRC32 of them is not zero, so zeros are never read as records;
//! - a valid frame header whose payload runs past the end of the file;
//! - a payload checksum mismatch in a frame that ends exactly at the end of the file (the last
//!   write may be partly on disk).
//!
//! Anything else is [`StorageError::Corrupt`] at the damaged frame's offset. In particular a
//! damaged byte in any record that is followed by another record is always reported, never
//! dropped: the records behind it were acknowledged and must not disappear quietly.
//!
//! An existing log with a bad or incomplete header is an error, not a torn tail.
//! [`LogWriter::create`] writes and syncs the header before it returns, so no record is ever
//! appended to a log without a durable header. A power loss inside `create` itself can leave an
//! empty or header-less file; that log never held a record, and the error names the file.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use tracing::{debug, error, warn};

use super::{
    fsync_dir, io_error, parent_dir, read_capped, read_u32_le, read_u64_le, Corruption,
    HeaderProblem, StorageError,
};

/// First bytes of every log file.
pub const LOG_MAGIC: &[u8; 6] = b"DGLOG\0";
/// The only format version this build writes and reads.
pub const LOG_FORMAT_VERSION: u16 = 1;
/// Magic (6) + version (2) + generation (8).
pub const LOG_HEADER_LEN: u64 = 16;
/// Payload length (4) + payload checksum (4) + header checksum (4).
pub const FRAME_HEADER_LEN: u64 = 12;
/// Records carry changes to grid state, orders of magnitude smaller than this. The cap bounds
/// what one append buffers and what a length that passes its checksum by chance can make the
/// reader expect.
pub const MAX_RECORD_LEN: u64 = 16 * 1024 * 1024;
/// `read_log` holds the whole file in memory. The store compacts the log into a snapshot long
/// before this size, so a larger file is not one we wrote and is refused instead of read.
pub const MAX_LOG_FILE_LEN: u64 = 4 * 1024 * 1024 * 1024;

// The parser works in `usize`; these are the same constants in that type.
const HEADER_LEN: usize = LOG_HEADER_LEN as usize;
const FRAME_LEN: usize = FRAME_HEADER_LEN as usize;

/// One record read back from a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    /// Byte offset of the record's frame in the file (what `append` returned for it).
    pub offset: u64,
    pub payload: Vec<u8>,
}

/// Why the end of a log was judged to be an interrupted append rather than corruption.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TornReason {
    /// Fewer bytes than a frame header remain.
    #[error("only {available} bytes left, too few for a record header")]
    IncompleteFrameHeader { available: u64 },
    /// The rest of the file is zeros: allocated by the file system but never written.
    #[error("the rest of the file is zero-filled")]
    ZeroFilled,
    /// A valid frame header declares more payload than the file holds.
    #[error("record declares {declared} payload bytes but only {available} follow")]
    IncompletePayload { declared: u64, available: u64 },
    /// The last frame is complete in length but its payload checksum fails.
    #[error("the last record's payload checksum does not match")]
    LastPayloadChecksum,
}

/// The unusable end of a log left by an interrupted append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// Where the torn frame starts; equal to [`LogContents::valid_len`].
    pub offset: u64,
    /// Bytes from `offset` to the end of the file.
    pub discarded_bytes: u64,
    pub reason: TornReason,
}

/// Everything [`read_log`] recovered from a log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogContents {
    /// The snapshot generation this log continues.
    pub generation: u64,
    /// Every intact record, in file order.
    pub records: Vec<LogRecord>,
    /// Length of the header plus every intact record: where the next append belongs.
    pub valid_len: u64,
    /// The interrupted last append, if the file has one.
    pub torn_tail: Option<TornTail>,
}

/// Appends records to one log file, each durable before `append` returns.
///
/// After a failed write or sync the writer is poisoned: every later `append` fails with
/// [`StorageError::WriterPoisoned`]. The file may then hold a partial frame, and a failed
/// `fsync` may even have dropped earlier dirty pages, so the only safe way on is to read the
/// log again ([`read_log`]) and reopen it ([`LogWriter::open_append`]).
#[derive(Debug)]
pub struct LogWriter {
    path: PathBuf,
    file: File,
    /// Length of the file as far as we wrote it, which is where the next frame goes.
    len: u64,
    generation: u64,
    poisoned: bool,
}

impl LogWriter {
    /// Creates a new, empty log continuing snapshot `generation`. Fails if `path` exists.
    ///
    /// The header and the directory entry are durable when this returns.
    pub fn create(path: &Path, generation: u64) -> Result<Self, StorageError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            // Grid state holds user records and token hashes: owner only.
            .mode(0o600)
            .open(path)
            .map_err(io_error(path, "create"))?;
        let header = encode_header(generation);
        if let Err(source) = file.write_all(&header).and_then(|()| file.sync_all()) {
            // `read_log` refuses a log without a complete header; removing it lets a retry
            // create the log again instead of failing on `create_new`.
            if let Err(remove_error) = fs::remove_file(path) {
                warn!(path = %path.display(), error = %remove_error, "cannot remove half-created log");
            }
            return Err(StorageError::Io {
                path: path.to_path_buf(),
                operation: "write the header of",
                source,
            });
        }
        fsync_dir(parent_dir(path))?;
        debug!(path = %path.display(), generation, "created log");
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: LOG_HEADER_LEN,
            generation,
            poisoned: false,
        })
    }

    /// Opens a log that [`read_log`] has just read, to append after its last intact record.
    ///
    /// A torn tail found by `read_log` is cut off (and the cut synced) first, so new records
    /// never follow garbage. The file must still have the length `read_log` saw.
    pub fn open_append(path: &Path, contents: &LogContents) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io_error(path, "open for appending"))?;
        let actual_len = file
            .metadata()
            .map_err(io_error(path, "read the metadata of"))?
            .len();
        let torn_len = contents
            .torn_tail
            .as_ref()
            .map_or(0, |torn| torn.discarded_bytes);
        let expected_len = contents.valid_len + torn_len;
        if actual_len != expected_len || contents.valid_len < LOG_HEADER_LEN {
            return Err(StorageError::ChangedSinceRead {
                path: path.to_path_buf(),
                expected_len,
                actual_len,
            });
        }
        if let Some(torn) = &contents.torn_tail {
            warn!(
                path = %path.display(),
                offset = torn.offset,
                discarded_bytes = torn.discarded_bytes,
                reason = %torn.reason,
                "truncating torn tail of log left by an interrupted append"
            );
            file.set_len(contents.valid_len)
                .map_err(io_error(path, "truncate"))?;
            // The new length must be durable before anything is appended after it.
            file.sync_all().map_err(io_error(path, "sync"))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: contents.valid_len,
            generation: contents.generation,
            poisoned: false,
        })
    }

    /// Appends one record and returns its frame's byte offset once it is durable.
    ///
    /// An empty payload is a valid record. Oversized payloads and a full log are refused
    /// without touching the file; a failed write or sync poisons the writer.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StorageError> {
        if self.poisoned {
            return Err(StorageError::WriterPoisoned {
                path: self.path.clone(),
            });
        }
        let payload_len = payload.len() as u64;
        if payload_len > MAX_RECORD_LEN {
            return Err(StorageError::TooLarge {
                path: self.path.clone(),
                offset: self.len,
                len: payload_len,
                max: MAX_RECORD_LEN,
            });
        }
        let frame = encode_frame(payload);
        let frame_len = frame.len() as u64;
        if self.len + frame_len > MAX_LOG_FILE_LEN {
            return Err(StorageError::LogFull {
                path: self.path.clone(),
                len: self.len,
                record_len: frame_len,
                max: MAX_LOG_FILE_LEN,
            });
        }
        let offset = self.len;
        // One buffer in one `write_all`: the frame is never interleaved with anything else,
        // and a crash leaves at most this one frame incomplete.
        if let Err(source) = self.file.write_all(&frame) {
            return Err(self.poison("append a record to", offset, source));
        }
        if let Err(source) = self.file.sync_data() {
            return Err(self.poison("sync", offset, source));
        }
        self.len += frame_len;
        Ok(offset)
    }

    /// Length of the file: header plus every record appended or recovered.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True while the log holds no records, only its header.
    pub fn is_empty(&self) -> bool {
        self.len == LOG_HEADER_LEN
    }

    /// The snapshot generation this log continues.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn poison(
        &mut self,
        operation: &'static str,
        offset: u64,
        source: std::io::Error,
    ) -> StorageError {
        self.poisoned = true;
        error!(
            path = %self.path.display(),
            offset,
            error = %source,
            "log append failed, the end of the log is unknown and the writer is now unusable"
        );
        StorageError::Io {
            path: self.path.clone(),
            operation,
            source,
        }
    }
}

/// Reads a whole log, tolerating a torn tail and refusing any other damage.
///
/// Never modifies the file. See the module documentation for what counts as torn.
pub fn read_log(path: &Path) -> Result<LogContents, StorageError> {
    let file = File::open(path).map_err(io_error(path, "open"))?;
    let bytes = read_capped(path, file, MAX_LOG_FILE_LEN)?;
    parse_log(path, &bytes)
}

fn encode_header(generation: u64) -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[..6].copy_from_slice(LOG_MAGIC);
    header[6..8].copy_from_slice(&LOG_FORMAT_VERSION.to_le_bytes());
    header[8..16].copy_from_slice(&generation.to_le_bytes());
    header
}

/// The whole frame for `payload`; the caller has checked it against `MAX_RECORD_LEN`, so its
/// length fits the u32 field.
fn encode_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(FRAME_LEN + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let header_checksum = crc32fast::hash(&frame[..8]);
    frame.extend_from_slice(&header_checksum.to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn parse_log(path: &Path, bytes: &[u8]) -> Result<LogContents, StorageError> {
    let generation = parse_header(path, bytes)?;
    let mut records = Vec::new();
    let mut offset = HEADER_LEN;
    let torn_tail = loop {
        if offset == bytes.len() {
            break None;
        }
        match parse_frame(&bytes[offset..]) {
            Frame::Record { payload, frame_len } => {
                records.push(LogRecord {
                    offset: offset as u64,
                    payload: payload.to_vec(),
                });
                offset += frame_len;
            }
            Frame::Torn(reason) => {
                break Some(TornTail {
                    offset: offset as u64,
                    discarded_bytes: (bytes.len() - offset) as u64,
                    reason,
                })
            }
            Frame::Corrupt(problem) => {
                return Err(StorageError::Corrupt {
                    path: path.to_path_buf(),
                    offset: offset as u64,
                    problem,
                })
            }
        }
    };
    Ok(LogContents {
        generation,
        records,
        valid_len: offset as u64,
        torn_tail,
    })
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<u64, StorageError> {
    let bad_header = |problem| StorageError::BadHeader {
        path: path.to_path_buf(),
        problem,
    };
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(bad_header(HeaderProblem::Truncated {
            file_len: bytes.len() as u64,
            header_len: LOG_HEADER_LEN,
        }));
    };
    if &header[..6] != LOG_MAGIC {
        return Err(bad_header(HeaderProblem::WrongMagic {
            found: header[..6].to_vec(),
            expected: LOG_MAGIC,
        }));
    }
    let version = u16::from_le_bytes([header[6], header[7]]);
    if version != LOG_FORMAT_VERSION {
        return Err(bad_header(HeaderProblem::UnsupportedVersion {
            found: version,
            supported: LOG_FORMAT_VERSION,
        }));
    }
    Ok(read_u64_le(header, 8))
}

/// What the bytes at one frame offset turned out to be.
enum Frame<'a> {
    Record { payload: &'a [u8], frame_len: usize },
    Torn(TornReason),
    Corrupt(Corruption),
}

/// Judges the frame at the start of `rest`, which runs to the end of the file.
fn parse_frame(rest: &[u8]) -> Frame<'_> {
    let Some(header) = rest.get(..FRAME_LEN) else {
        return Frame::Torn(TornReason::IncompleteFrameHeader {
            available: rest.len() as u64,
        });
    };
    let declared_len = read_u32_le(header, 0);
    let payload_checksum = read_u32_le(header, 4);
    let header_checksum = read_u32_le(header, 8);
    let computed_header_checksum = crc32fast::hash(&header[..8]);
    if header_checksum != computed_header_checksum {
        // Only an append that never reached the disk explains a bad header followed by nothing
        // but zeros; bad bytes followed by anything else are damage to a written record.
        if rest.iter().all(|&byte| byte == 0) {
            return Frame::Torn(TornReason::ZeroFilled);
        }
        return Frame::Corrupt(Corruption::FrameHeaderChecksum {
            stored: header_checksum,
            computed: computed_header_checksum,
        });
    }
    let declared_len = u64::from(declared_len);
    if declared_len > MAX_RECORD_LEN {
        return Frame::Corrupt(Corruption::LengthTooLarge {
            len: declared_len,
            max: MAX_RECORD_LEN,
        });
    }
    // `declared_len <= MAX_RECORD_LEN`, which fits in usize.
    let frame_len = FRAME_LEN + declared_len as usize;
    let Some(payload) = rest.get(FRAME_LEN..frame_len) else {
        return Frame::Torn(TornReason::IncompletePayload {
            declared: declared_len,
            available: (rest.len() - FRAME_LEN) as u64,
        });
    };
    let computed_payload_checksum = crc32fast::hash(payload);
    if payload_checksum != computed_payload_checksum {
        // The last write may be on disk only in part; a record with others behind it was
        // complete once, since those others were appended after its sync.
        if frame_len == rest.len() {
            return Frame::Torn(TornReason::LastPayloadChecksum);
        }
        return Frame::Corrupt(Corruption::PayloadChecksum {
            stored: payload_checksum,
            computed: computed_payload_checksum,
        });
    }
    Frame::Record { payload, frame_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE_PAYLOADS: [&[u8]; 3] = [
        b"first record",
        b"second record",
        b"third record, a little longer than the others",
    ];

    /// Writes a fresh log holding `payloads` and returns each record's offset.
    fn write_log(path: &Path, generation: u64, payloads: &[&[u8]]) -> Vec<u64> {
        let mut writer = LogWriter::create(path, generation).expect("create log");
        payloads
            .iter()
            .map(|payload| writer.append(payload).expect("append record"))
            .collect()
    }

    fn payloads_of(contents: &LogContents) -> Vec<&[u8]> {
        contents
            .records
            .iter()
            .map(|record| record.payload.as_slice())
            .collect()
    }

    /// The offset, problem and message of a `Corrupt` error; fails the test on anything else.
    fn expect_corrupt(result: Result<LogContents, StorageError>) -> (u64, Corruption, String) {
        let message = match &result {
            Err(error) => error.to_string(),
            Ok(_) => String::new(),
        };
        match result {
            Err(StorageError::Corrupt {
                offset, problem, ..
            }) => (offset, problem, message),
            other => panic!("expected a Corrupt error, got {other:?}"),
        }
    }

    #[test]
    fn round_trip_of_many_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        let payloads: Vec<Vec<u8>> = (0..300u32)
            .map(|index| {
                (0..(index * 7) % 1000)
                    .map(|byte| (byte ^ index) as u8)
                    .collect()
            })
            .collect();
        let mut writer = LogWriter::create(&path, 42).expect("create log");
        assert!(writer.is_empty());
        let offsets: Vec<u64> = payloads
            .iter()
            .map(|payload| writer.append(payload).expect("append"))
            .collect();
        assert!(!writer.is_empty());
        assert_eq!(offsets[0], LOG_HEADER_LEN);

        let contents = read_log(&path).expect("read log");
        assert_eq!(contents.generation, 42);
        assert_eq!(contents.torn_tail, None);
        assert_eq!(contents.valid_len, writer.len());
        assert_eq!(fs::metadata(&path).expect("metadata").len(), writer.len());
        assert_eq!(contents.records.len(), payloads.len());
        for ((record, payload), offset) in contents.records.iter().zip(&payloads).zip(&offsets) {
            assert_eq!(&record.payload, payload);
            assert_eq!(record.offset, *offset);
        }
    }

    #[test]
    fn reopened_log_continues_after_its_last_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        write_log(&path, 7, &[b"one", b""]);

        let contents = read_log(&path).expect("read log");
        let mut writer = LogWriter::open_append(&path, &contents).expect("open append");
        assert_eq!(writer.generation(), 7);
        assert_eq!(writer.len(), contents.valid_len);
        let offset = writer.append(b"three").expect("append");
        assert_eq!(offset, contents.valid_len);

        let reread = read_log(&path).expect("read log again");
        assert_eq!(payloads_of(&reread), vec![&b"one"[..], b"", b"three"]);
        assert_eq!(reread.records[2].offset, offset);
        assert_eq!(reread.torn_tail, None);
    }

    #[test]
    fn header_only_log_has_no_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        LogWriter::create(&path, 3).expect("create log");
        let contents = read_log(&path).expect("read log");
        assert_eq!(
            contents,
            LogContents {
                generation: 3,
                records: Vec::new(),
                valid_len: LOG_HEADER_LEN,
                torn_tail: None,
            }
        );
    }

    #[test]
    fn torn_tail_of_every_length_is_dropped_and_appending_repairs_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full_path = dir.path().join("full.log");
        let offsets = write_log(&full_path, 9, &THREE_PAYLOADS);
        let full = fs::read(&full_path).expect("read full log");
        let last_offset = offsets[2];
        let last_payload_len = THREE_PAYLOADS[2].len() as u64;
        assert_eq!(
            full.len() as u64,
            last_offset + FRAME_HEADER_LEN + last_payload_len
        );

        for cut in last_offset + 1..full.len() as u64 {
            let path = dir.path().join(format!("cut-{cut}.log"));
            fs::write(&path, &full[..cut as usize]).expect("write truncated log");
            let kept = cut - last_offset;
            let expected_reason = if kept < FRAME_HEADER_LEN {
                TornReason::IncompleteFrameHeader { available: kept }
            } else {
                TornReason::IncompletePayload {
                    declared: last_payload_len,
                    available: kept - FRAME_HEADER_LEN,
                }
            };

            let contents = read_log(&path).expect("a torn tail is not an error");
            assert_eq!(
                payloads_of(&contents),
                THREE_PAYLOADS[..2].to_vec(),
                "cut at {cut}"
            );
            assert_eq!(contents.records[1].offset, offsets[1]);
            assert_eq!(contents.valid_len, last_offset);
            assert_eq!(
                contents.torn_tail,
                Some(TornTail {
                    offset: last_offset,
                    discarded_bytes: kept,
                    reason: expected_reason,
                }),
                "cut at {cut}"
            );

            let mut writer = LogWriter::open_append(&path, &contents).expect("open append");
            assert_eq!(fs::metadata(&path).expect("metadata").len(), last_offset);
            let offset = writer.append(b"written after recovery").expect("append");
            assert_eq!(offset, last_offset);

            let repaired = read_log(&path).expect("read repaired log");
            assert_eq!(repaired.torn_tail, None, "cut at {cut}");
            assert_eq!(
                payloads_of(&repaired),
                vec![
                    THREE_PAYLOADS[0],
                    THREE_PAYLOADS[1],
                    b"written after recovery"
                ]
            );
            assert_eq!(repaired.valid_len, writer.len());
        }
    }

    #[test]
    fn trailing_zeros_after_the_last_record_are_a_torn_tail() {
        // The zero-fill rule relies on zeros never carrying a valid header checksum.
        assert_ne!(crc32fast::hash(&[0u8; 8]), 0);
        let dir = tempfile::tempdir().expect("tempdir");
        let full_path = dir.path().join("full.log");
        write_log(&full_path, 1, &THREE_PAYLOADS);
        let full = fs::read(&full_path).expect("read full log");

        for zeros in 1..=64u64 {
            let path = dir.path().join(format!("zeros-{zeros}.log"));
            let mut bytes = full.clone();
            bytes.resize(full.len() + zeros as usize, 0);
            fs::write(&path, &bytes).expect("write log with zeros");
            let expected_reason = if zeros < FRAME_HEADER_LEN {
                TornReason::IncompleteFrameHeader { available: zeros }
            } else {
                TornReason::ZeroFilled
            };

            let contents = read_log(&path).expect("zeros at the end are not an error");
            assert_eq!(payloads_of(&contents), THREE_PAYLOADS.to_vec());
            assert_eq!(contents.valid_len, full.len() as u64);
            assert_eq!(
                contents.torn_tail,
                Some(TornTail {
                    offset: full.len() as u64,
                    discarded_bytes: zeros,
                    reason: expected_reason,
                })
            );
        }
    }

    #[test]
    fn zero_filled_payload_of_the_last_record_is_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        let offsets = write_log(&path, 1, &THREE_PAYLOADS);
        let mut bytes = fs::read(&path).expect("read log");
        let payload_start = (offsets[2] + FRAME_HEADER_LEN) as usize;
        bytes[payload_start + 4..].fill(0);
        fs::write(&path, &bytes).expect("write log");

        let contents = read_log(&path).expect("a torn last payload is not an error");
        assert_eq!(payloads_of(&contents), THREE_PAYLOADS[..2].to_vec());
        assert_eq!(
            contents.torn_tail,
            Some(TornTail {
                offset: offsets[2],
                discarded_bytes: bytes.len() as u64 - offsets[2],
                reason: TornReason::LastPayloadChecksum,
            })
        );
    }

    #[test]
    fn any_damaged_byte_of_a_record_followed_by_another_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        let offsets = write_log(&path, 1, &[b"first record payload", b"second"]);
        let original = fs::read(&path).expect("read log");
        let path_text = path.display().to_string();

        for index in offsets[0]..offsets[1] {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bytes = original.clone();
                bytes[index as usize] ^= mask;
                fs::write(&path, &bytes).expect("write damaged log");

                let (offset, problem, message) = expect_corrupt(read_log(&path));
                assert_eq!(offset, offsets[0], "byte {index} mask {mask:#x}");
                let in_frame_header = index < offsets[0] + FRAME_HEADER_LEN;
                assert_eq!(
                    matches!(problem, Corruption::FrameHeaderChecksum { .. }),
                    in_frame_header,
                    "byte {index}: {problem}"
                );
                assert_eq!(
                    matches!(problem, Corruption::PayloadChecksum { .. }),
                    !in_frame_header,
                    "byte {index}: {problem}"
                );
                assert!(message.contains(&path_text), "{message}");
                assert!(
                    message.contains(&format!("offset {}", offsets[0])),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn damaged_length_of_a_middle_record_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        let offsets = write_log(&path, 1, &THREE_PAYLOADS);
        let original = fs::read(&path).expect("read log");
        let middle = offsets[1] as usize;
        let real_len = THREE_PAYLOADS[1].len() as u32;

        let write_length = |declared: u32, fix_header_checksum: bool| {
            let mut bytes = original.clone();
            bytes[middle..middle + 4].copy_from_slice(&declared.to_le_bytes());
            if fix_header_checksum {
                let checksum = crc32fast::hash(&bytes[middle..middle + 8]);
                bytes[middle + 8..middle + 12].copy_from_slice(&checksum.to_le_bytes());
            }
            fs::write(&path, &bytes).expect("write damaged log");
        };

        // A damaged length fails the header checksum, so it is never used to find the next frame.
        for declared in [0, real_len - 1, real_len + 1, u32::MAX] {
            write_length(declared, false);
            let (offset, problem, _) = expect_corrupt(read_log(&path));
            assert_eq!(offset, offsets[1]);
            assert!(
                matches!(problem, Corruption::FrameHeaderChecksum { .. }),
                "{problem}"
            );
        }

        // Even a length whose header checksum was recomputed cannot hide damage.
        let too_large = MAX_RECORD_LEN as u32 + 1;
        write_length(too_large, true);
        let (offset, problem, _) = expect_corrupt(read_log(&path));
        assert_eq!(offset, offsets[1]);
        assert_eq!(
            problem,
            Corruption::LengthTooLarge {
                len: u64::from(too_large),
                max: MAX_RECORD_LEN,
            }
        );

        write_length(real_len - 1, true);
        let (offset, problem, _) = expect_corrupt(read_log(&path));
        assert_eq!(offset, offsets[1]);
        assert!(
            matches!(problem, Corruption::PayloadChecksum { .. }),
            "{problem}"
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        write_log(&path, 1, &[b"record"]);
        let original = fs::read(&path).expect("read log");

        let cases: Vec<(Vec<u8>, HeaderProblem)> = vec![
            (
                Vec::new(),
                HeaderProblem::Truncated {
                    file_len: 0,
                    header_len: LOG_HEADER_LEN,
                },
            ),
            (
                original[..10].to_vec(),
                HeaderProblem::Truncated {
                    file_len: 10,
                    header_len: LOG_HEADER_LEN,
                },
            ),
            (
                [b"DGSNAP".as_slice(), &original[6..]].concat(),
                HeaderProblem::WrongMagic {
                    found: b"DGSNAP".to_vec(),
                    expected: LOG_MAGIC,
                },
            ),
            (
                [&original[..6], &2u16.to_le_bytes(), &original[8..]].concat(),
                HeaderProblem::UnsupportedVersion {
                    found: 2,
                    supported: LOG_FORMAT_VERSION,
                },
            ),
        ];
        for (bytes, expected_problem) in cases {
            fs::write(&path, &bytes).expect("write log");
            match read_log(&path) {
                Err(StorageError::BadHeader { problem, .. }) => {
                    assert_eq!(problem, expected_problem)
                }
                other => panic!("expected BadHeader {expected_problem}, got {other:?}"),
            }
        }
    }

    #[test]
    fn read_log_does_not_modify_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        write_log(&path, 1, &THREE_PAYLOADS);
        let mut bytes = fs::read(&path).expect("read log");
        bytes.truncate(bytes.len() - 5);
        fs::write(&path, &bytes).expect("write torn log");

        let contents = read_log(&path).expect("read log");
        assert!(contents.torn_tail.is_some());
        assert_eq!(fs::read(&path).expect("read log again"), bytes);
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        write_log(&path, 1, &[b"keep me"]);
        match LogWriter::create(&path, 2) {
            Err(StorageError::Io {
                operation, source, ..
            }) => {
                assert_eq!(operation, "create");
                assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
            }
            other => panic!("expected an Io error, got {other:?}"),
        }
        assert_eq!(
            payloads_of(&read_log(&path).expect("read log")),
            vec![&b"keep me"[..]]
        );
    }

    #[test]
    fn open_append_refuses_a_log_that_changed_since_it_was_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        write_log(&path, 1, &[b"record"]);
        let contents = read_log(&path).expect("read log");
        let mut bytes = fs::read(&path).expect("read log");
        bytes.extend_from_slice(b"appended by someone else");
        fs::write(&path, &bytes).expect("write log");

        match LogWriter::open_append(&path, &contents) {
            Err(StorageError::ChangedSinceRead {
                expected_len,
                actual_len,
                ..
            }) => {
                assert_eq!(expected_len, contents.valid_len);
                assert_eq!(actual_len, bytes.len() as u64);
            }
            other => panic!("expected ChangedSinceRead, got {other:?}"),
        }
    }

    #[test]
    fn oversized_record_is_refused_without_poisoning_the_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        let mut writer = LogWriter::create(&path, 1).expect("create log");
        let oversized = vec![0u8; MAX_RECORD_LEN as usize + 1];
        match writer.append(&oversized) {
            Err(StorageError::TooLarge {
                offset, len, max, ..
            }) => {
                assert_eq!(offset, LOG_HEADER_LEN);
                assert_eq!(len, MAX_RECORD_LEN + 1);
                assert_eq!(max, MAX_RECORD_LEN);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        assert_eq!(fs::metadata(&path).expect("metadata").len(), LOG_HEADER_LEN);
        assert_eq!(writer.append(b"fits").expect("append"), LOG_HEADER_LEN);
    }

    #[test]
    fn append_after_a_failed_write_fails_even_once_writing_works_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("grid.log");
        let mut writer = LogWriter::create(&path, 1).expect("create log");
        writer.append(b"durable").expect("append");
        let len_before = writer.len();

        // A read-only handle makes the next write fail the way a full or failing disk would.
        let writable =
            std::mem::replace(&mut writer.file, File::open(&path).expect("open read-only"));
        match writer.append(b"lost") {
            Err(StorageError::Io { operation, .. }) => assert_eq!(operation, "append a record to"),
            other => panic!("expected an Io error, got {other:?}"),
        }

        // With a working handle back, the writer must still refuse: the tail is unknown.
        writer.file = writable;
        match writer.append(b"after the failure") {
            Err(error @ StorageError::WriterPoisoned { .. }) => {
                assert!(error.to_string().contains(&path.display().to_string()))
            }
            other => panic!("expected WriterPoisoned, got {other:?}"),
        }
        assert_eq!(writer.len(), len_before);
        assert_eq!(fs::metadata(&path).expect("metadata").len(), len_before);
        assert_eq!(
            payloads_of(&read_log(&path).expect("read log")),
            vec![&b"durable"[..]]
        );
    }
}
