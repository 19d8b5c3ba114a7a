//! The body of the `agent_frames` fuzz target, shared with the proptest in
//! `tests/agent_protocol.rs` so the normal test suite runs the same checks
//! (included there and in `fuzz_targets/agent_frames.rs` with `#[path]`).
//! The including crate provides the codec as a root module `protocol`.

use super::protocol::{encode, FrameDecoder, Message, FRAME_HEADER_LEN, MIN_FRAME_LEN};

/// Feeds `data` to a [`FrameDecoder`] twice, all at once and in slices
/// whose sizes come from the data itself, and checks what must hold for
/// any input: the same results both ways, no more than one message per
/// smallest frame and one error per length prefix, a buffer no larger than what was pushed, and every
/// message decoded re-encodes to a frame that decodes to itself. A panic
/// anywhere (in the decoder or here) is the failure the fuzzer reports.
pub fn check_agent_frames(data: &[u8]) {
    let whole = decode(data, &[data.len().max(1)]);
    // Slice sizes 1..=16 from the first bytes: splits land everywhere,
    // inside length prefixes and inside fields.
    let sizes: Vec<usize> = data
        .iter()
        .take(32)
        .map(|byte| usize::from(byte % 16) + 1)
        .collect();
    let sliced = decode(data, if sizes.is_empty() { &[1] } else { &sizes });
    assert_eq!(whole, sliced, "slicing changed what was decoded");

    // A message needs a whole frame header; an error may come from a bare
    // length prefix (one over the limit, or a payload too short to hold the
    // header).
    let messages = whole.iter().filter(|result| result.is_ok()).count();
    assert!(
        messages <= data.len() / MIN_FRAME_LEN,
        "{messages} messages from {} bytes",
        data.len()
    );
    assert!(
        whole.len() <= data.len() / FRAME_HEADER_LEN,
        "{} results from {} bytes",
        whole.len(),
        data.len()
    );
    for result in &whole {
        let Ok(message) = result else { continue };
        let frame = encode(message).expect("a decoded message is within the limits");
        assert_eq!(decode(&frame, &[frame.len()]), [Ok(message.clone())]);
    }
}

type Decoded = Vec<Result<Message, super::protocol::FrameError>>;

/// Pushes `data` in slices of the given sizes (cycled) and drains messages
/// after every push.
fn decode(data: &[u8], sizes: &[usize]) -> Decoded {
    let mut decoder = FrameDecoder::new();
    let mut results = Vec::new();
    let mut rest = data;
    let mut size_index = 0;
    while !rest.is_empty() {
        let size = sizes[size_index % sizes.len()].min(rest.len());
        size_index += 1;
        let (slice, tail) = rest.split_at(size);
        rest = tail;
        decoder.push(slice);
        assert!(decoder.buffered_len() <= data.len());
        while let Some(result) = decoder.next_message() {
            results.push(result);
        }
    }
    results
}
