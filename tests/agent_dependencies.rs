//! The guest agent runs inside every desktop VM and must stay small: it must
//! not link libvirt or the QUIC/TLS stack, and for now it uses only the
//! standard library (no tokio). This test reads the built `deskgrid-agent`
//! ELF in two ways: its dynamic dependencies (the `DT_NEEDED` entries, read
//! with `readelf -d`), and the Rust crates compiled into it (the crate source
//! paths rustc embeds in panic locations and debuginfo, and the crate names
//! in the symbol table, read with `nm`).
//!
//! The same scans run on the `deskgrid` binary as a control: they must find
//! tokio there, which `deskgrid` uses, or they are blind and a clean agent
//! proves nothing. `readelf` and `nm` come from binutils, which
//! `scripts/setup-host.sh` installs.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context as _};

const AGENT_BINARY: &str = env!("CARGO_BIN_EXE_deskgrid-agent");
const DESKGRID_BINARY: &str = env!("CARGO_BIN_EXE_deskgrid");

/// Shared libraries the agent must not load: libvirt, and the system TLS
/// libraries a QUIC/TLS stack would bring (OpenSSL's two, GnuTLS).
const FORBIDDEN_LIBRARY_PREFIXES: &[&str] = &["libvirt", "libssl", "libcrypto", "libgnutls"];

/// Crates the agent must not contain, as Cargo spells them: the libvirt
/// binding, the QUIC and TLS stack with its two crypto backends, and tokio
/// (the agent stays std-only for now). `quinn-udp` and `aws-lc-sys` come
/// along with `quinn` and `aws-lc-rs`; listing them catches a partial pull.
const FORBIDDEN_CRATES: &[&str] = &[
    "virt",
    "virt-sys",
    "quinn",
    "quinn-proto",
    "quinn-udp",
    "rustls",
    "tokio-rustls",
    "ring",
    "aws-lc-rs",
    "aws-lc-sys",
    "tokio",
];

/// A crate `deskgrid` is known to link: the control the scanners must find.
const CONTROL_CRATE: &str = "tokio";

#[test]
fn agent_loads_no_libvirt_or_tls_library() -> anyhow::Result<()> {
    let agent_needed = needed_libraries(Path::new(AGENT_BINARY))?;
    let deskgrid_needed = needed_libraries(Path::new(DESKGRID_BINARY))?;
    println!("deskgrid-agent DT_NEEDED: {agent_needed:?}");
    println!("deskgrid DT_NEEDED: {deskgrid_needed:?}");
    println!(
        "deskgrid loads these libraries forbidden to the agent: {:?}",
        forbidden_libraries(&deskgrid_needed)
    );

    // Control: every glibc-linked Rust binary needs libc, so an empty or
    // libc-less list means the reading is broken, not that the agent is clean.
    for (binary, needed) in [
        (DESKGRID_BINARY, &deskgrid_needed),
        (AGENT_BINARY, &agent_needed),
    ] {
        assert!(
            needed.iter().any(|library| library.starts_with("libc.so")),
            "no libc.so among the DT_NEEDED entries of {binary} ({needed:?}): the reading is broken"
        );
    }

    // Control: the daemon drives libvirt, so the same check must find it there.
    assert!(
        forbidden_libraries(&deskgrid_needed)
            .iter()
            .any(|library| library.starts_with("libvirt")),
        "the check finds no libvirt in deskgrid ({deskgrid_needed:?}), which links it: the check is broken"
    );

    let forbidden = forbidden_libraries(&agent_needed);
    assert!(
        forbidden.is_empty(),
        "deskgrid-agent ({AGENT_BINARY}) loads {forbidden:?}; the agent must not link libvirt or TLS"
    );
    Ok(())
}

#[test]
fn agent_contains_no_libvirt_quic_tls_or_tokio_crate() -> anyhow::Result<()> {
    let mut found_in_agent = Vec::new();
    for binary in [DESKGRID_BINARY, AGENT_BINARY] {
        let bytes =
            std::fs::read(binary).with_context(|| format!("reading the binary {binary}"))?;
        let by_path = crates_in_source_paths(&bytes, FORBIDDEN_CRATES);
        let by_symbol = crates_in_symbols(Path::new(binary), FORBIDDEN_CRATES)?;
        println!("{binary}: crates found by source path: {by_path:#?}");
        println!("{binary}: crates found by symbol: {by_symbol:#?}");

        if binary == DESKGRID_BINARY {
            // Control: a scanner that misses tokio in `deskgrid` would miss
            // it (and quinn, virt, ...) in the agent too. A stripped binary
            // or remapped source paths would show up here.
            assert!(
                by_path.contains_key(CONTROL_CRATE),
                "the source-path scan found no {CONTROL_CRATE} in {binary}, which uses it: the scan is blind"
            );
            assert!(
                by_symbol.contains_key(CONTROL_CRATE),
                "the symbol scan found no {CONTROL_CRATE} in {binary}, which uses it: the scan is blind"
            );
        } else {
            for (method, found) in [("source path", by_path), ("symbol", by_symbol)] {
                for (krate, evidence) in found {
                    found_in_agent.push(format!("{krate} (by {method}: {evidence})"));
                }
            }
        }
    }
    assert!(
        found_in_agent.is_empty(),
        "deskgrid-agent ({AGENT_BINARY}) contains crates it must not link:\n  {}",
        found_in_agent.join("\n  ")
    );
    Ok(())
}

#[test]
fn agent_runs_and_prints_its_version() -> anyhow::Result<()> {
    let output = Command::new(AGENT_BINARY)
        .arg("--version")
        .output()
        .with_context(|| format!("running {AGENT_BINARY} --version"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "deskgrid-agent --version failed with {}; stderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let expected = format!("deskgrid-agent {}", env!("CARGO_PKG_VERSION"));
    assert!(
        stdout.trim_end().starts_with(&expected),
        "deskgrid-agent --version printed {stdout:?}, expected a line starting with {expected:?}"
    );
    Ok(())
}

/// The scanners themselves, on made-up input: each must tell a forbidden
/// name from a harmless neighbour.
#[test]
fn scanners_tell_forbidden_names_from_their_neighbours() {
    let needed = [
        "libvirt.so.0",
        "libssl.so.3",
        "libcrypto.so.3",
        "libgnutls.so.30",
        "libc.so.6",
        "libgcc_s.so.1",
    ]
    .map(String::from);
    assert_eq!(
        forbidden_libraries(&needed),
        [
            "libvirt.so.0",
            "libssl.so.3",
            "libcrypto.so.3",
            "libgnutls.so.30"
        ]
    );

    let bytes = b"\0/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/quinn-proto-0.11.9/src/connection/mod.rs\0\
        /home/ci/vendor/ring/src/aead.rs\0/ring-buffer-notes/readme\0/virt-sys-0.3.1/src/lib.rs\0";
    let found = crates_in_source_paths(bytes, FORBIDDEN_CRATES);
    assert_eq!(
        found.keys().copied().collect::<Vec<_>>(),
        ["quinn-proto", "ring", "virt-sys"],
        "found {found:?}"
    );

    let symbols = "0000000000496560 T <tokio::runtime::blocking::task::BlockingTask<T> as core::future::future::Future>::poll\n\
        0000000000496600 T deskgrid::state::ring::rotate\n\
        0000000000496700 T aws_lc_rs::aead::seal\n";
    let found = crates_in_symbol_list(symbols, FORBIDDEN_CRATES);
    assert_eq!(
        found.keys().copied().collect::<Vec<_>>(),
        ["aws-lc-rs", "tokio"],
        "found {found:?}"
    );
}

/// The `DT_NEEDED` entries of an ELF file, read with `readelf -d`.
fn needed_libraries(binary: &Path) -> anyhow::Result<Vec<String>> {
    let output = Command::new("readelf")
        .args(["--dynamic", "--wide"])
        .arg(binary)
        .env("LC_ALL", "C")
        .output()
        .context("running readelf (from binutils; scripts/setup-host.sh installs it)")?;
    if !output.status.success() {
        bail!(
            "readelf -d {} failed with {}: {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Lines look like: ` 0x0000000000000001 (NEEDED)  Shared library: [libc.so.6]`.
    let listing = String::from_utf8_lossy(&output.stdout);
    let needed = listing
        .lines()
        .filter(|line| line.contains("(NEEDED)"))
        .filter_map(|line| {
            let start = line.find('[')? + 1;
            let end = line.rfind(']')?;
            line.get(start..end).map(String::from)
        })
        .collect();
    Ok(needed)
}

fn forbidden_libraries(needed: &[String]) -> Vec<&str> {
    needed
        .iter()
        .map(String::as_str)
        .filter(|library| {
            FORBIDDEN_LIBRARY_PREFIXES
                .iter()
                .any(|prefix| library.starts_with(prefix))
        })
        .collect()
}

/// Which of `crates` appear in the source paths embedded in a binary, with
/// one path each as evidence. Registry and git-less sources sit in
/// `.../<crate>-<version>/src/...`; vendored or git checkouts in
/// `.../<crate>/src/...`. Requiring the digit or `/src/` after the name keeps
/// `quinn` from matching `quinn-proto-0.11.9`.
fn crates_in_source_paths<'c>(bytes: &[u8], crates: &[&'c str]) -> BTreeMap<&'c str, String> {
    let mut found = BTreeMap::new();
    for (slash, _) in bytes.iter().enumerate().filter(|(_, &byte)| byte == b'/') {
        let rest = &bytes[slash + 1..];
        for &krate in crates {
            if found.contains_key(krate) {
                continue;
            }
            let Some(after) = rest.strip_prefix(krate.as_bytes()) else {
                continue;
            };
            let versioned =
                after.first() == Some(&b'-') && after.get(1).is_some_and(u8::is_ascii_digit);
            if versioned || after.starts_with(b"/src/") {
                found.insert(krate, printable_around(bytes, slash));
            }
        }
    }
    found
}

/// The printable run of bytes around `index`, for a readable piece of evidence.
fn printable_around(bytes: &[u8], index: usize) -> String {
    let printable = |byte: &u8| byte.is_ascii_graphic() || *byte == b' ';
    let start = bytes[..index]
        .iter()
        .rposition(|byte| !printable(byte))
        .map_or(0, |position| position + 1);
    let end = bytes[index..]
        .iter()
        .position(|byte| !printable(byte))
        .map_or(bytes.len(), |position| index + position);
    let start = start.max(index.saturating_sub(120));
    let end = end.min(index + 200);
    String::from_utf8_lossy(&bytes[start..end]).into_owned()
}

/// Which of `crates` name a path root in the binary's demangled symbol
/// table (`nm --demangle`), with one symbol each as evidence.
fn crates_in_symbols<'c>(
    binary: &Path,
    crates: &[&'c str],
) -> anyhow::Result<BTreeMap<&'c str, String>> {
    let output = Command::new("nm")
        .arg("--demangle")
        .arg(binary)
        .env("LC_ALL", "C")
        .output()
        .context("running nm (from binutils; scripts/setup-host.sh installs it)")?;
    // A stripped binary makes nm fail with "no symbols"; that is not an error
    // here: the control on `deskgrid` then fails and says the scan is blind.
    if !output.status.success() {
        println!(
            "nm {} failed with {}: {}",
            binary.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(crates_in_symbol_list(
        &String::from_utf8_lossy(&output.stdout),
        crates,
    ))
}

/// Which of `crates` start a path (`tokio::...`) in a demangled symbol list.
/// The character before the name must not belong to a path, so a module
/// `deskgrid::state::ring` is not the crate `ring`.
fn crates_in_symbol_list<'c>(symbols: &str, crates: &[&'c str]) -> BTreeMap<&'c str, String> {
    let mut found = BTreeMap::new();
    for &krate in crates {
        let needle = format!("{}::", krate.replace('-', "_"));
        let evidence = symbols.lines().find(|line| {
            line.match_indices(&needle).any(|(at, _)| {
                !line[..at].chars().next_back().is_some_and(|before| {
                    before.is_alphanumeric() || before == '_' || before == ':'
                })
            })
        });
        if let Some(line) = evidence {
            found.insert(krate, line.trim().to_owned());
        }
    }
    found
}
