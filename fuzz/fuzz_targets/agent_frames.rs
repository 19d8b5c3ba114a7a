//! Fuzz target: arbitrary bytes into the guest agent frame decoder
//! (`src/desktop/protocol.rs`). The checks live in `../agent_frames_check.rs`,
//! which `tests/agent_protocol.rs` also runs in the normal test suite.

#![no_main]

// The codec is compiled in from the library's source, as the agent does, so
// the fuzz build needs neither tokio nor libvirt (see fuzz/README.md).
#[allow(dead_code)]
#[path = "../../src/desktop/protocol.rs"]
mod protocol;

#[path = "../agent_frames_check.rs"]
mod agent_frames_check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    agent_frames_check::check_agent_frames(data);
});
