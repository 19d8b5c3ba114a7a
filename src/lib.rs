//! deskgrid: a shared-nothing desktop-virtualization grid.
//!
//! Every appliance holds the whole grid state, runs the same deterministic
//! algorithms on it and acts only on its own host. `ARCHITECTURE.md` at the
//! top of the repository is the map; each module below starts with a line
//! saying what it is.

/// Faces that serve callers: the local control socket (later the REST API).
pub mod api;
/// The composition root: data directory, config, and `serve`.
pub mod appliance;
/// The command line (`deskgrid ...`).
pub mod cli;
/// The desktop service: guest agent protocol and channels, VM lifecycle, broker.
pub mod desktop;
/// Typed identifiers and records; depends on nothing else here.
pub mod model;
/// The load balancers as pure functions: state in, plan out.
pub mod placement;
/// The reconcile loop: runs this server's plan steps as jobs on its host.
pub mod policy;
/// The service layer every face goes through.
pub mod service;
/// The state engine: replicated grid state, merge rules, crash-safe files.
pub mod state;
/// Image distribution: manifests, chunks, pulls from many holders.
pub mod transfer;

/// `error: cause: cause` — an error with its sources, for messages to people.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
/// The actualization engine: the host, through libvirt.
pub mod actuator;
/// The federation engine: identity, join, QUIC, membership, dissemination.
pub mod federation;
