//! The guest agent protocol: the one codec shared by `deskgrid-agent` in the
//! guest and the appliance on the host, over the virtio-serial port
//! `org.deskgrid.agent.0`.
//!
//! A frame is a 4-byte big-endian payload length, then the payload: one byte
//! of protocol version ([`PROTOCOL_VERSION`]), one byte of message type, and
//! the message's fields in order:
//!
//! ```text
//! u32 len | u8 version | u8 type | fields...          (len = 2 + fields)
//! string  = u16 len | UTF-8 bytes                      (len <= MAX_TEXT_LEN)
//! option  = u8 0 (absent) | u8 1, string
//! list    = u16 count | string * count                 (count <= MAX_SESSION_USERS)
//! integer = big-endian u32 / u64
//! ```
//!
//! The encoding is written by hand because the agent binary stays std-only
//! (`tests/agent_dependencies.rs`): no serde, no allocation driven by a
//! length the peer chose, every field bounded.
//!
//! Compatibility: bytes after a message's known fields are ignored, so a
//! later version of the protocol can append fields that older readers skip
//! and newer readers default when absent. A different protocol version byte
//! or an unknown message type is refused with its own error.
//!
//! Errors: a frame whose length is known but whose payload is bad (unknown
//! type, a string over its limit, ...) is dropped whole and decoding goes on
//! with the next frame. A length over [`MAX_FRAME_PAYLOAD`] means the stream
//! is out of step (or hostile) and cannot be trusted again:
//! [`FrameError::FrameTooLarge`] says so, the decoder stops, and the caller
//! resets the channel ([`FrameError::is_stream_fatal`]).
//!
//! **Invariant:** this file does no I/O, reads no clock, and names nothing
//! but `std` and `thiserror` (a compile-time macro): `deskgrid-agent`
//! compiles this very file into itself (`#[path]`) instead of linking the
//! library, which would bring parts of tokio, QUIC and libvirt with it
//! (`tests/agent_dependencies.rs`). A `crate::` path here breaks the agent.

/// The protocol version this build speaks and accepts.
pub const PROTOCOL_VERSION: u8 = 1;

/// The largest payload a frame may carry (DESIGN.md section 6). Agent
/// messages are a few hundred bytes; the limit bounds what a hostile guest
/// can make the appliance buffer per channel.
pub const MAX_FRAME_PAYLOAD: usize = 64 * 1024;

/// Bytes of the length prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// The most bytes of one text field (user, session, hostname, OS name, ...).
/// Linux user names stop at 32 bytes and host names at 64; 256 leaves room
/// for other guests' names and a long `PRETTY_NAME` without letting one
/// field fill a frame.
pub const MAX_TEXT_LEN: usize = 256;

/// The most users in one [`Message::Sessions`]. A desktop VM has one user,
/// a shared terminal server a few dozen; at the limit the message still
/// fits a frame with room to spare (checked at compile time below).
pub const MAX_SESSION_USERS: usize = 128;

/// Version and type bytes at the start of every payload.
const PAYLOAD_HEADER_LEN: usize = 2;

/// The smallest possible frame: a length prefix and the two header bytes.
pub const MIN_FRAME_LEN: usize = FRAME_HEADER_LEN + PAYLOAD_HEADER_LEN;

// The largest messages (a full Sessions list, a Hello with every text at
// its limit) must fit in one frame, so a message that passes the field
// limits can always be sent.
const LARGEST_SESSIONS: usize = PAYLOAD_HEADER_LEN + 2 + MAX_SESSION_USERS * (2 + MAX_TEXT_LEN);
const LARGEST_HELLO: usize = PAYLOAD_HEADER_LEN + 4 * (2 + MAX_TEXT_LEN) + 1;
const _: () = assert!(LARGEST_SESSIONS <= MAX_FRAME_PAYLOAD);
const _: () = assert!(LARGEST_HELLO <= MAX_FRAME_PAYLOAD);

/// A message between the agent and the appliance. Guest to host:
/// `Hello`, `Heartbeat`, `Login`, `Logout`, `Sessions`; host to guest:
/// `HelloAck`, `Ack`, `LogOff`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The agent's first message on every (re)connection.
    Hello {
        /// `deskgrid-agent`'s version (`CARGO_PKG_VERSION`).
        agent_version: String,
        /// The guest OS as it names itself (`PRETTY_NAME` of os-release).
        os: String,
        /// The guest's host name.
        hostname: String,
        /// The SMBIOS product UUID when the agent could read it; the
        /// appliance compares it with the VM the channel belongs to.
        vm_uuid: Option<String>,
    },
    /// The agent is alive; sent every heartbeat interval.
    Heartbeat {
        /// Counts up from 0 on each connection; echoed in [`Message::Ack`].
        seq: u64,
        /// Milliseconds since the guest booted.
        uptime_ms: u64,
    },
    /// A user session began in the guest.
    Login {
        user: String,
        /// The tty line (`tty1`, `pts/0`, `:0`) or the logind session id.
        session: String,
    },
    /// A user session ended in the guest.
    Logout { user: String, session: String },
    /// Every user with a live session, sent after `Hello` and on every
    /// change, so a lost `Login` or `Logout` heals.
    Sessions { users: Vec<String> },
    /// The appliance received heartbeat `seq`.
    Ack { seq: u64 },
    /// The appliance accepted the agent's `Hello`; heartbeats are expected
    /// every `heartbeat_interval_ms` from now on.
    HelloAck { heartbeat_interval_ms: u32 },
    /// The appliance asks the guest to end every session of `user` (an
    /// admin's logoff). The agent reports the `Logout` once they are gone.
    LogOff { user: String },
}

/// The message type byte of each [`Message`]. Host-to-guest types have the
/// high bit set, so a frame echoed back by a loop is recognisably wrong.
mod message_type {
    pub const HELLO: u8 = 0x01;
    pub const HEARTBEAT: u8 = 0x02;
    pub const LOGIN: u8 = 0x03;
    pub const LOGOUT: u8 = 0x04;
    pub const SESSIONS: u8 = 0x05;
    pub const ACK: u8 = 0x81;
    pub const HELLO_ACK: u8 = 0x82;
    pub const LOG_OFF: u8 = 0x83;
}

impl Message {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Heartbeat { .. } => "heartbeat",
            Message::Login { .. } => "login",
            Message::Logout { .. } => "logout",
            Message::Sessions { .. } => "sessions",
            Message::Ack { .. } => "ack",
            Message::HelloAck { .. } => "hello-ack",
            Message::LogOff { .. } => "log-off",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => message_type::HELLO,
            Message::Heartbeat { .. } => message_type::HEARTBEAT,
            Message::Login { .. } => message_type::LOGIN,
            Message::Logout { .. } => message_type::LOGOUT,
            Message::Sessions { .. } => message_type::SESSIONS,
            Message::Ack { .. } => message_type::ACK,
            Message::HelloAck { .. } => message_type::HELLO_ACK,
            Message::LogOff { .. } => message_type::LOG_OFF,
        }
    }
}

/// Why a message cannot be encoded: a field over its limit. The decoder
/// would refuse it, so it is refused here rather than cut short.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{message} field {field} is {len} bytes, more than the limit of {max}")]
    TextTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{message} field {field} has {len} entries, more than the limit of {max}")]
    ListTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over the limit: the stream is out of step or
    /// hostile. Nothing after it can be trusted; reset the channel.
    #[error(
        "frame length {len} is over the limit of {max} bytes; the stream cannot be resynchronised"
    )]
    FrameTooLarge { len: u32, max: usize },
    /// The payload is too short to hold the version and type bytes.
    #[error("frame payload of {len} bytes is too short for a message header")]
    PayloadTooShort { len: usize },
    #[error("protocol version {version} is not supported (this build speaks {supported})")]
    UnsupportedVersion { version: u8, supported: u8 },
    #[error("unknown message type {message_type:#04x}")]
    UnknownMessageType { message_type: u8 },
    /// A field runs past the end of the frame.
    #[error("{message} frame ends inside field {field}")]
    Truncated {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message} field {field} is {len} bytes, more than the limit of {max}")]
    TextTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{message} field {field} has {len} entries, more than the limit of {max}")]
    ListTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{message} field {field} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message} field {field} has presence tag {tag}, expected 0 or 1")]
    InvalidOptionTag {
        message: &'static str,
        field: &'static str,
        tag: u8,
    },
}

impl FrameError {
    /// Whether the stream is unusable after this error: the caller must
    /// reset the channel (and [`FrameDecoder::reset`]). Every other error
    /// dropped one frame and decoding goes on with the next.
    pub fn is_stream_fatal(&self) -> bool {
        matches!(self, FrameError::FrameTooLarge { .. })
    }
}

/// The whole frame (length prefix included) for `message`.
pub fn encode(message: &Message) -> Result<Vec<u8>, EncodeError> {
    let name = message.name();
    let mut frame = vec![0; FRAME_HEADER_LEN];
    frame.push(PROTOCOL_VERSION);
    frame.push(message.type_byte());
    match message {
        Message::Hello {
            agent_version,
            os,
            hostname,
            vm_uuid,
        } => {
            put_text(&mut frame, name, "agent_version", agent_version)?;
            put_text(&mut frame, name, "os", os)?;
            put_text(&mut frame, name, "hostname", hostname)?;
            match vm_uuid {
                None => frame.push(0),
                Some(vm_uuid) => {
                    frame.push(1);
                    put_text(&mut frame, name, "vm_uuid", vm_uuid)?;
                }
            }
        }
        Message::Heartbeat { seq, uptime_ms } => {
            frame.extend_from_slice(&seq.to_be_bytes());
            frame.extend_from_slice(&uptime_ms.to_be_bytes());
        }
        Message::Login { user, session } | Message::Logout { user, session } => {
            put_text(&mut frame, name, "user", user)?;
            put_text(&mut frame, name, "session", session)?;
        }
        Message::Sessions { users } => {
            if users.len() > MAX_SESSION_USERS {
                return Err(EncodeError::ListTooLong {
                    message: name,
                    field: "users",
                    len: users.len(),
                    max: MAX_SESSION_USERS,
                });
            }
            // Fits: MAX_SESSION_USERS < u16::MAX.
            frame.extend_from_slice(&(users.len() as u16).to_be_bytes());
            for user in users {
                put_text(&mut frame, name, "users", user)?;
            }
        }
        Message::Ack { seq } => frame.extend_from_slice(&seq.to_be_bytes()),
        Message::HelloAck {
            heartbeat_interval_ms,
        } => frame.extend_from_slice(&heartbeat_interval_ms.to_be_bytes()),
        Message::LogOff { user } => put_text(&mut frame, name, "user", user)?,
    }
    // Fits: the field limits keep every message under MAX_FRAME_PAYLOAD
    // (the compile-time checks above), which is far below u32::MAX.
    let payload_len = (frame.len() - FRAME_HEADER_LEN) as u32;
    frame[..FRAME_HEADER_LEN].copy_from_slice(&payload_len.to_be_bytes());
    Ok(frame)
}

fn put_text(
    frame: &mut Vec<u8>,
    message: &'static str,
    field: &'static str,
    text: &str,
) -> Result<(), EncodeError> {
    if text.len() > MAX_TEXT_LEN {
        return Err(EncodeError::TextTooLong {
            message,
            field,
            len: text.len(),
            max: MAX_TEXT_LEN,
        });
    }
    // Fits: MAX_TEXT_LEN < u16::MAX.
    frame.extend_from_slice(&(text.len() as u16).to_be_bytes());
    frame.extend_from_slice(text.as_bytes());
    Ok(())
}

/// Decodes one payload (the bytes after the length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<Message, FrameError> {
    let [version, type_byte, fields @ ..] = payload else {
        return Err(FrameError::PayloadTooShort { len: payload.len() });
    };
    if *version != PROTOCOL_VERSION {
        return Err(FrameError::UnsupportedVersion {
            version: *version,
            supported: PROTOCOL_VERSION,
        });
    }
    let message = match *type_byte {
        message_type::HELLO => "hello",
        message_type::HEARTBEAT => "heartbeat",
        message_type::LOGIN => "login",
        message_type::LOGOUT => "logout",
        message_type::SESSIONS => "sessions",
        message_type::ACK => "ack",
        message_type::HELLO_ACK => "hello-ack",
        message_type::LOG_OFF => "log-off",
        other => {
            return Err(FrameError::UnknownMessageType {
                message_type: other,
            })
        }
    };
    let mut reader = FieldReader {
        message,
        rest: fields,
    };
    // Bytes left after the known fields are ignored: later versions append.
    match *type_byte {
        message_type::HELLO => Ok(Message::Hello {
            agent_version: reader.text("agent_version")?,
            os: reader.text("os")?,
            hostname: reader.text("hostname")?,
            vm_uuid: reader.optional_text("vm_uuid")?,
        }),
        message_type::HEARTBEAT => Ok(Message::Heartbeat {
            seq: reader.u64("seq")?,
            uptime_ms: reader.u64("uptime_ms")?,
        }),
        message_type::LOGIN => Ok(Message::Login {
            user: reader.text("user")?,
            session: reader.text("session")?,
        }),
        message_type::LOGOUT => Ok(Message::Logout {
            user: reader.text("user")?,
            session: reader.text("session")?,
        }),
        message_type::SESSIONS => {
            let count = usize::from(reader.u16("users")?);
            if count > MAX_SESSION_USERS {
                return Err(FrameError::ListTooLong {
                    message,
                    field: "users",
                    len: count,
                    max: MAX_SESSION_USERS,
                });
            }
            let mut users = Vec::with_capacity(count);
            for _ in 0..count {
                users.push(reader.text("users")?);
            }
            Ok(Message::Sessions { users })
        }
        message_type::ACK => Ok(Message::Ack {
            seq: reader.u64("seq")?,
        }),
        message_type::LOG_OFF => Ok(Message::LogOff {
            user: reader.text("user")?,
        }),
        // Only HELLO_ACK is left: every other type returned above.
        _ => Ok(Message::HelloAck {
            heartbeat_interval_ms: reader.u32("heartbeat_interval_ms")?,
        }),
    }
}

/// Reads fields front to back from one payload.
struct FieldReader<'a> {
    message: &'static str,
    rest: &'a [u8],
}

impl<'a> FieldReader<'a> {
    fn take(&mut self, field: &'static str, len: usize) -> Result<&'a [u8], FrameError> {
        if self.rest.len() < len {
            return Err(FrameError::Truncated {
                message: self.message,
                field,
            });
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], FrameError> {
        let mut bytes = [0; N];
        bytes.copy_from_slice(self.take(field, N)?);
        Ok(bytes)
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, FrameError> {
        self.array(field).map(u16::from_be_bytes)
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, FrameError> {
        self.array(field).map(u32::from_be_bytes)
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, FrameError> {
        self.array(field).map(u64::from_be_bytes)
    }

    fn text(&mut self, field: &'static str) -> Result<String, FrameError> {
        let len = usize::from(self.u16(field)?);
        if len > MAX_TEXT_LEN {
            return Err(FrameError::TextTooLong {
                message: self.message,
                field,
                len,
                max: MAX_TEXT_LEN,
            });
        }
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| FrameError::InvalidUtf8 {
                message: self.message,
                field,
            })
    }

    fn optional_text(&mut self, field: &'static str) -> Result<Option<String>, FrameError> {
        match self.array::<1>(field)? {
            [0] => Ok(None),
            [1] => self.text(field).map(Some),
            [tag] => Err(FrameError::InvalidOptionTag {
                message: self.message,
                field,
                tag,
            }),
        }
    }
}

/// Turns a byte stream into messages: push bytes as they arrive, in slices
/// of any size (half a frame, several frames at once), then pull messages
/// with [`FrameDecoder::next_message`] until it returns `None`.
///
/// It never panics on any input and never allocates from a length the peer
/// chose: a frame over the limit is refused from its 4-byte prefix, before
/// its body is read. It holds only the bytes pushed and not yet decoded.
///
/// After a [stream-fatal](FrameError::is_stream_fatal) error it discards
/// everything and yields nothing until [`FrameDecoder::reset`].
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buffer: Vec<u8>,
    /// Where the undecoded bytes start in `buffer`; the decoded prefix is
    /// dropped in one move when it grows large, not after every frame.
    start: usize,
    desynchronised: bool,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes from the stream. Ignored while desynchronised.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.desynchronised {
            return;
        }
        if self.start > 0 && self.start >= self.buffer.len() / 2 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete frame's message or error; `None` when no complete
    /// frame is buffered (or the decoder is desynchronised).
    pub fn next_message(&mut self) -> Option<Result<Message, FrameError>> {
        if self.desynchronised {
            return None;
        }
        let pending = &self.buffer[self.start..];
        let header: [u8; FRAME_HEADER_LEN] = pending.get(..FRAME_HEADER_LEN)?.try_into().ok()?;
        let declared_len = u32::from_be_bytes(header);
        let payload_len = match usize::try_from(declared_len) {
            Ok(len) if len <= MAX_FRAME_PAYLOAD => len,
            _ => {
                self.desynchronise();
                return Some(Err(FrameError::FrameTooLarge {
                    len: declared_len,
                    max: MAX_FRAME_PAYLOAD,
                }));
            }
        };
        let payload = pending.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + payload_len)?;
        let decoded = decode_payload(payload);
        self.start += FRAME_HEADER_LEN + payload_len;
        if self.start == self.buffer.len() {
            self.buffer.clear();
            self.start = 0;
        }
        Some(decoded)
    }

    /// Whether a stream-fatal error stopped the decoder.
    pub fn is_desynchronised(&self) -> bool {
        self.desynchronised
    }

    /// Bytes pushed and not yet decoded.
    pub fn buffered_len(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// Forgets everything, for a fresh stream (a reopened channel).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    fn desynchronise(&mut self) {
        self.buffer = Vec::new();
        self.start = 0;
        self.desynchronised = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_message() -> Vec<Message> {
        vec![
            Message::Hello {
                agent_version: "0.1.0".into(),
                os: "Debian GNU/Linux 12 (bookworm)".into(),
                hostname: "desk-01".into(),
                vm_uuid: Some("4c4c4544-0042-3510-8044-b4c04f4e3332".into()),
            },
            Message::Hello {
                agent_version: String::new(),
                os: String::new(),
                hostname: "h".into(),
                vm_uuid: None,
            },
            Message::Heartbeat {
                seq: 7,
                uptime_ms: u64::MAX,
            },
            Message::Login {
                user: "alice".into(),
                session: "pts/0".into(),
            },
            Message::Logout {
                user: "alice".into(),
                session: "c2".into(),
            },
            Message::Sessions {
                users: vec!["alice".into(), "bob".into()],
            },
            Message::Sessions { users: vec![] },
            Message::Ack { seq: 0 },
            Message::HelloAck {
                heartbeat_interval_ms: 2000,
            },
            Message::LogOff {
                user: "alice".into(),
            },
        ]
    }

    fn frame(version: u8, type_byte: u8, fields: &[u8]) -> Vec<u8> {
        let mut frame = ((fields.len() + 2) as u32).to_be_bytes().to_vec();
        frame.push(version);
        frame.push(type_byte);
        frame.extend_from_slice(fields);
        frame
    }

    fn decode_all(bytes: &[u8]) -> Vec<Result<Message, FrameError>> {
        let mut decoder = FrameDecoder::new();
        decoder.push(bytes);
        std::iter::from_fn(|| decoder.next_message()).collect()
    }

    #[test]
    fn every_message_roundtrips_through_one_frame() {
        for message in every_message() {
            let frame = encode(&message).unwrap();
            assert_eq!(
                u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize,
                frame.len() - 4
            );
            assert_eq!(decode_all(&frame), [Ok(message)]);
        }
    }

    /// The wire layout, pinned: a change here breaks agents in the field.
    #[test]
    fn heartbeat_and_login_have_the_documented_layout() {
        let heartbeat = encode(&Message::Heartbeat {
            seq: 1,
            uptime_ms: 0x0102,
        })
        .unwrap();
        assert_eq!(
            heartbeat,
            [
                0, 0, 0, 18, // length
                1, 0x02, // version, type
                0, 0, 0, 0, 0, 0, 0, 1, // seq
                0, 0, 0, 0, 0, 0, 1, 2, // uptime_ms
            ]
        );
        let login = encode(&Message::Login {
            user: "al".into(),
            session: "x".into(),
        })
        .unwrap();
        assert_eq!(login, [0, 0, 0, 9, 1, 0x03, 0, 2, b'a', b'l', 0, 1, b'x']);
    }

    #[test]
    fn byte_by_byte_and_all_at_once_give_the_same_messages() {
        let stream: Vec<u8> = every_message()
            .iter()
            .flat_map(|message| encode(message).unwrap())
            .collect();
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        for byte in &stream {
            decoder.push(std::slice::from_ref(byte));
            while let Some(message) = decoder.next_message() {
                decoded.push(message.unwrap());
            }
        }
        assert_eq!(decoded, every_message());
        assert_eq!(decoder.buffered_len(), 0);
        assert_eq!(
            decode_all(&stream),
            every_message().into_iter().map(Ok).collect::<Vec<_>>()
        );
    }

    #[test]
    fn oversized_length_is_refused_from_the_prefix_alone() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&(MAX_FRAME_PAYLOAD as u32 + 1).to_be_bytes());
        let error = decoder.next_message().unwrap().unwrap_err();
        assert_eq!(
            error,
            FrameError::FrameTooLarge {
                len: MAX_FRAME_PAYLOAD as u32 + 1,
                max: MAX_FRAME_PAYLOAD
            }
        );
        assert!(error.is_stream_fatal());
        assert!(decoder.is_desynchronised());
        // Nothing more comes out, whatever follows, until reset.
        decoder.push(&encode(&Message::Ack { seq: 1 }).unwrap());
        assert_eq!(decoder.next_message(), None);
        assert_eq!(decoder.buffered_len(), 0);
        decoder.reset();
        decoder.push(&encode(&Message::Ack { seq: 1 }).unwrap());
        assert_eq!(decoder.next_message(), Some(Ok(Message::Ack { seq: 1 })));
    }

    #[test]
    fn a_frame_at_the_limit_is_read_and_dropped_without_losing_step() {
        let mut stream = frame(PROTOCOL_VERSION, 0x7f, &vec![0; MAX_FRAME_PAYLOAD - 2]);
        stream.extend(encode(&Message::Ack { seq: 9 }).unwrap());
        assert_eq!(
            decode_all(&stream),
            [
                Err(FrameError::UnknownMessageType { message_type: 0x7f }),
                Ok(Message::Ack { seq: 9 })
            ]
        );
    }

    #[test]
    fn bad_frames_are_dropped_and_decoding_goes_on() {
        let ack = encode(&Message::Ack { seq: 3 }).unwrap();
        let too_long_user = {
            let mut fields = (MAX_TEXT_LEN as u16 + 1).to_be_bytes().to_vec();
            fields.extend(vec![b'a'; MAX_TEXT_LEN + 1]);
            fields.extend([0, 0]);
            frame(PROTOCOL_VERSION, message_type::LOGIN, &fields)
        };
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (vec![0, 0, 0, 0], FrameError::PayloadTooShort { len: 0 }),
            (vec![0, 0, 0, 1, 1], FrameError::PayloadTooShort { len: 1 }),
            (
                frame(2, message_type::ACK, &[0; 8]),
                FrameError::UnsupportedVersion {
                    version: 2,
                    supported: 1,
                },
            ),
            (
                frame(PROTOCOL_VERSION, 0x42, &[]),
                FrameError::UnknownMessageType { message_type: 0x42 },
            ),
            (
                frame(PROTOCOL_VERSION, message_type::ACK, &[0; 7]),
                FrameError::Truncated {
                    message: "ack",
                    field: "seq",
                },
            ),
            (
                frame(PROTOCOL_VERSION, message_type::LOGIN, &[0, 5, b'a']),
                FrameError::Truncated {
                    message: "login",
                    field: "user",
                },
            ),
            (
                too_long_user,
                FrameError::TextTooLong {
                    message: "login",
                    field: "user",
                    len: MAX_TEXT_LEN + 1,
                    max: MAX_TEXT_LEN,
                },
            ),
            (
                frame(PROTOCOL_VERSION, message_type::LOGOUT, &[0, 1, 0xff, 0, 0]),
                FrameError::InvalidUtf8 {
                    message: "logout",
                    field: "user",
                },
            ),
            (
                frame(
                    PROTOCOL_VERSION,
                    message_type::HELLO,
                    &[0, 0, 0, 0, 0, 0, 2],
                ),
                FrameError::InvalidOptionTag {
                    message: "hello",
                    field: "vm_uuid",
                    tag: 2,
                },
            ),
            (
                frame(PROTOCOL_VERSION, message_type::SESSIONS, &[0xff, 0xff]),
                FrameError::ListTooLong {
                    message: "sessions",
                    field: "users",
                    len: 0xffff,
                    max: MAX_SESSION_USERS,
                },
            ),
        ];
        for (bad, expected) in cases {
            assert!(!expected.is_stream_fatal());
            let mut stream = bad.clone();
            stream.extend(&ack);
            assert_eq!(
                decode_all(&stream),
                [Err(expected.clone()), Ok(Message::Ack { seq: 3 })],
                "frame {bad:?}"
            );
        }
    }

    #[test]
    fn unknown_version_and_unknown_type_are_distinct_errors() {
        let unknown_version = decode_payload(&[9, message_type::ACK]).unwrap_err();
        let unknown_type = decode_payload(&[PROTOCOL_VERSION, 0x00]).unwrap_err();
        assert!(matches!(
            unknown_version,
            FrameError::UnsupportedVersion { version: 9, .. }
        ));
        assert!(matches!(
            unknown_type,
            FrameError::UnknownMessageType { message_type: 0 }
        ));
    }

    #[test]
    fn fields_appended_by_a_later_version_are_ignored() {
        let mut fields = 5u64.to_be_bytes().to_vec();
        fields.extend([0xde, 0xad]);
        assert_eq!(
            decode_all(&frame(PROTOCOL_VERSION, message_type::ACK, &fields)),
            [Ok(Message::Ack { seq: 5 })]
        );
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        let long = "x".repeat(MAX_TEXT_LEN + 1);
        assert_eq!(
            encode(&Message::Login {
                user: "a".into(),
                session: long
            }),
            Err(EncodeError::TextTooLong {
                message: "login",
                field: "session",
                len: MAX_TEXT_LEN + 1,
                max: MAX_TEXT_LEN
            })
        );
        let users = vec![String::new(); MAX_SESSION_USERS + 1];
        assert!(matches!(
            encode(&Message::Sessions { users }),
            Err(EncodeError::ListTooLong { len, .. }) if len == MAX_SESSION_USERS + 1
        ));
        let full = Message::Sessions {
            users: vec!["u".repeat(MAX_TEXT_LEN); MAX_SESSION_USERS],
        };
        let frame = encode(&full).unwrap();
        assert!(frame.len() - FRAME_HEADER_LEN <= MAX_FRAME_PAYLOAD);
        assert_eq!(decode_all(&frame), [Ok(full)]);
    }

    #[test]
    fn the_buffer_holds_only_undecoded_bytes() {
        let ack = encode(&Message::Ack { seq: 1 }).unwrap();
        let mut decoder = FrameDecoder::new();
        for _ in 0..1000 {
            decoder.push(&ack);
            decoder.push(&ack[..5]);
            assert!(decoder.next_message().is_some());
            decoder.push(&ack[5..]);
            assert!(decoder.next_message().is_some());
            assert_eq!(decoder.next_message(), None);
        }
        assert_eq!(decoder.buffered_len(), 0);
        assert!(decoder.buffer.capacity() < 4 * ack.len());
    }
}
