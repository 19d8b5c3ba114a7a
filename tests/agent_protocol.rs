//! The guest agent codec (`deskgrid::desktop::protocol`) on generated input:
//! any message survives any slicing of the byte stream, arbitrary bytes
//! never panic the decoder nor yield more than one message per smallest
//! frame (one error per length prefix), and oversized frames are refused from their length prefix. The
//! arbitrary-bytes property runs the fuzz target's own checks
//! (`fuzz/agent_frames_check.rs`).

// A test that unwraps fails with the value it met: exactly what a test should do.
#![allow(clippy::unwrap_used)]

use deskgrid::desktop::protocol;
use deskgrid::desktop::protocol::{
    encode, FrameDecoder, FrameError, Message, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD,
    MAX_SESSION_USERS, MAX_TEXT_LEN,
};
use proptest::collection::vec;
use proptest::prelude::*;

#[path = "../fuzz/agent_frames_check.rs"]
mod agent_frames_check;

/// Enough cases to cover every message type and many slicings, still well
/// under a second.
const CASES: u32 = 512;

/// Text up to the field limit: mostly short, sometimes at or near the limit,
/// with multi-byte characters so byte and character lengths differ.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9_./-]{0,12}",
        1 => "\\PC{0,64}",
        1 => (MAX_TEXT_LEN - 2..=MAX_TEXT_LEN).prop_map(|len| "u".repeat(len)),
    ]
    .prop_filter("over the field limit", |text| text.len() <= MAX_TEXT_LEN)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (text(), text(), text(), proptest::option::of(text())).prop_map(
            |(agent_version, os, hostname, vm_uuid)| Message::Hello {
                agent_version,
                os,
                hostname,
                vm_uuid
            }
        ),
        (any::<u64>(), any::<u64>())
            .prop_map(|(seq, uptime_ms)| Message::Heartbeat { seq, uptime_ms }),
        (text(), text()).prop_map(|(user, session)| Message::Login { user, session }),
        (text(), text()).prop_map(|(user, session)| Message::Logout { user, session }),
        prop_oneof![
            4 => vec(text(), 0..8),
            1 => vec(text(), MAX_SESSION_USERS..=MAX_SESSION_USERS),
        ]
        .prop_map(|users| Message::Sessions { users }),
        any::<u64>().prop_map(|seq| Message::Ack { seq }),
        any::<u32>().prop_map(|heartbeat_interval_ms| Message::HelloAck {
            heartbeat_interval_ms
        }),
        text().prop_map(|user| Message::LogOff { user }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    /// Messages encoded back to back and pushed in arbitrary slices come
    /// out whole, in order, and leave nothing behind.
    #[test]
    fn any_messages_roundtrip_through_any_slicing(
        messages in vec(message(), 0..12),
        cuts in vec(1usize..200, 1..32),
    ) {
        let stream: Vec<u8> = messages.iter().flat_map(|m| encode(m).unwrap()).collect();
        let mut decoder = FrameDecoder::new();
        let mut decoded = Vec::new();
        let mut rest = stream.as_slice();
        let mut cut_index = 0;
        while !rest.is_empty() {
            let (slice, tail) = rest.split_at(cuts[cut_index % cuts.len()].min(rest.len()));
            cut_index += 1;
            rest = tail;
            decoder.push(slice);
            while let Some(result) = decoder.next_message() {
                decoded.push(result.unwrap());
            }
        }
        prop_assert_eq!(decoded, messages);
        prop_assert_eq!(decoder.buffered_len(), 0);
    }

    /// Arbitrary bytes, and arbitrary bytes after valid frames: no panic,
    /// at most one result per smallest frame's worth of bytes, the same
    /// results however the bytes are sliced.
    #[test]
    fn arbitrary_bytes_never_panic_nor_overproduce(
        prefix in vec(message(), 0..3),
        junk_frames in vec((0u8..48, vec(any::<u8>(), 0..48)), 0..8),
        noise in vec(any::<u8>(), 0..2048),
    ) {
        agent_frames_check::check_agent_frames(&noise);
        let mut stream: Vec<u8> = prefix.iter().flat_map(|m| encode(m).unwrap()).collect();
        // Small declared lengths over random bytes: frames that get past the
        // length check and exercise every payload error (and mis-sized ones
        // that throw the stream out of step).
        for (declared_len, bytes) in &junk_frames {
            stream.extend([0, 0, 0, *declared_len]);
            stream.extend(bytes);
        }
        stream.extend(&noise);
        agent_frames_check::check_agent_frames(&stream);
    }

    /// Any declared length over the limit is refused as soon as the prefix
    /// is in, whatever follows, and the error says the stream is lost.
    #[test]
    fn oversized_frames_are_refused_from_the_prefix(
        len in (MAX_FRAME_PAYLOAD as u32 + 1)..=u32::MAX,
        body in vec(any::<u8>(), 0..64),
    ) {
        let mut decoder = FrameDecoder::new();
        decoder.push(&len.to_be_bytes());
        decoder.push(&body);
        let error = decoder.next_message().unwrap().unwrap_err();
        prop_assert_eq!(&error, &FrameError::FrameTooLarge { len, max: MAX_FRAME_PAYLOAD });
        prop_assert!(error.is_stream_fatal());
        prop_assert_eq!(decoder.next_message(), None);
        prop_assert_eq!(decoder.buffered_len(), 0);
    }
}

/// Inputs the fuzzer found (fuzz/artifacts), kept as regressions.
#[test]
fn fuzzer_findings_stay_fixed() {
    // A bare oversized length prefix: one error from 4 bytes, which the
    // check's first bound (one result per 6-byte frame) wrongly refused.
    agent_frames_check::check_agent_frames(&[0x01, 0x01, 0x32, 0x32]);
}

/// A frame at exactly the limit is read; one byte more is refused.
#[test]
fn the_limit_is_inclusive() {
    let at_limit = {
        let mut frame = (MAX_FRAME_PAYLOAD as u32).to_be_bytes().to_vec();
        frame.extend([protocol::PROTOCOL_VERSION, 0x02]);
        frame.extend(vec![0; MAX_FRAME_PAYLOAD - 2]);
        frame
    };
    assert_eq!(at_limit.len(), FRAME_HEADER_LEN + MAX_FRAME_PAYLOAD);
    let mut decoder = FrameDecoder::new();
    decoder.push(&at_limit);
    // A heartbeat with trailing bytes a later version might have added.
    assert_eq!(
        decoder.next_message(),
        Some(Ok(Message::Heartbeat {
            seq: 0,
            uptime_ms: 0
        }))
    );
    decoder.push(&(MAX_FRAME_PAYLOAD as u32 + 1).to_be_bytes());
    assert!(matches!(
        decoder.next_message(),
        Some(Err(FrameError::FrameTooLarge { .. }))
    ));
}
