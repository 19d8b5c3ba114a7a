//! The guest agent: runs inside every desktop VM and reports heartbeats,
//! logins and logouts to the appliance over virtio-serial.
//!
//! **Invariant:** the agent uses only the standard library and the shared
//! agent protocol; it never links libvirt, QUIC or TLS
//! (`tests/agent_dependencies.rs` checks the binary).

fn main() -> std::process::ExitCode {
    let mut arguments = std::env::args().skip(1);
    match arguments.next().as_deref() {
        Some("--version") | Some("-V") => {
            println!("deskgrid-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        Some("--help") | Some("-h") | None => {
            println!(
                "deskgrid-agent {}: the deskgrid guest agent",
                env!("CARGO_PKG_VERSION")
            );
            println!("usage: deskgrid-agent --version");
            std::process::ExitCode::SUCCESS
        }
        Some(other) => {
            eprintln!("deskgrid-agent: unknown argument {other:?} (try --help)");
            std::process::ExitCode::from(2)
        }
    }
}
