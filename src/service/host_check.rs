//! `deskgrid host check`: is this host ready to run desktops? Each check says
//! what it found and, for every problem, what to do about it.

use serde::{Deserialize, Serialize};

use crate::actuator::libvirt::LibvirtHypervisor;
use crate::actuator::DomainKind;
use crate::appliance::config::{DomainType, LibvirtSettings};

/// Free pool space below this gets a warning: a few desktop base images.
const LOW_POOL_SPACE_BYTES: u64 = 20 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckStatus {
    Ok,
    /// Works, but not as well as it should.
    Warning,
    /// Desktops cannot run until this is fixed.
    Blocking,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheckItem {
    pub check: String,
    pub status: CheckStatus,
    pub found: String,
    /// What to do, when the status is not `ok`.
    pub fix: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCheckReport {
    pub libvirt_uri: String,
    pub checks: Vec<HostCheckItem>,
}

impl HostCheckReport {
    /// True when nothing blocks running desktops.
    pub fn ready(&self) -> bool {
        self.checks
            .iter()
            .all(|item| item.status != CheckStatus::Blocking)
    }

    fn add(&mut self, check: &str, status: CheckStatus, found: String, fix: Option<String>) {
        self.checks.push(HostCheckItem {
            check: check.to_owned(),
            status,
            found,
            fix,
        });
    }
}

/// Runs every check against the host `settings` point at. Creates nothing.
pub fn check_host(settings: &LibvirtSettings) -> HostCheckReport {
    use CheckStatus::{Blocking, Ok as Fine, Warning};
    let mut report = HostCheckReport {
        libvirt_uri: settings.uri.clone(),
        checks: Vec::new(),
    };

    let host = match LibvirtHypervisor::connect(settings.libvirt_options()) {
        Ok(host) => host,
        Err(error) => {
            report.add(
                "libvirt",
                Blocking,
                crate::error_chain(&error),
                Some(format!(
                    "start libvirtd on the host (scripts/setup-host.sh does it on Debian), or fix libvirt.uri in config.toml (now {:?})",
                    settings.uri
                )),
            );
            return report;
        }
    };
    match host.versions() {
        Ok((library, hypervisor)) => report.add(
            "libvirt",
            Fine,
            format!(
                "reachable at {}: libvirt {library}, hypervisor {hypervisor}",
                settings.uri
            ),
            None,
        ),
        Err(error) => report.add("libvirt", Warning, crate::error_chain(&error), None),
    }

    match host.offered_domain_kinds() {
        Ok(kinds) => {
            let has_kvm = kinds.contains(&DomainKind::Kvm);
            match (settings.domain_type, has_kvm) {
                (DomainType::Kvm, false) => report.add(
                    "virtualization",
                    Blocking,
                    "domain_type is \"kvm\" but the host offers no KVM".to_owned(),
                    Some("enable virtualization in the firmware and load kvm_intel or kvm_amd, or set libvirt.domain_type = \"auto\"".to_owned()),
                ),
                (DomainType::Qemu, _) => report.add(
                    "virtualization",
                    Warning,
                    "domain_type is \"qemu\": desktops run under software emulation (TCG), many times slower".to_owned(),
                    Some("set libvirt.domain_type = \"auto\" on hosts with KVM".to_owned()),
                ),
                (_, true) => report.add("virtualization", Fine, "KVM available: desktops run accelerated".to_owned(), None),
                (DomainType::Auto, false) => report.add(
                    "virtualization",
                    Warning,
                    "no KVM: desktops will run under software emulation (TCG), many times slower".to_owned(),
                    Some("enable virtualization in the firmware and load kvm_intel or kvm_amd".to_owned()),
                ),
            }
        }
        Err(error) => report.add("virtualization", Blocking, crate::error_chain(&error), None),
    }

    match host.pool_status() {
        Ok(None) => report.add(
            "storage pool",
            Fine,
            format!(
                "pool {:?} does not exist yet: `deskgrid serve` creates it at {}",
                settings.pool, settings.pool_path
            ),
            None,
        ),
        Ok(Some((false, _, _))) => report.add(
            "storage pool",
            Warning,
            format!("pool {:?} exists but is not active", settings.pool),
            Some(format!(
                "`deskgrid serve` starts it; or: virsh pool-start {}",
                settings.pool
            )),
        ),
        Ok(Some((true, capacity, available))) => {
            let found = format!(
                "pool {:?}: {} free of {}",
                settings.pool,
                human_bytes(available),
                human_bytes(capacity)
            );
            if available == 0 {
                report.add(
                    "storage pool",
                    Blocking,
                    found,
                    Some("free space in the pool or grow its filesystem".to_owned()),
                );
            } else if available < LOW_POOL_SPACE_BYTES {
                report.add(
                    "storage pool",
                    Warning,
                    found,
                    Some(format!(
                        "keep at least {} free for base images and desktop disks",
                        human_bytes(LOW_POOL_SPACE_BYTES)
                    )),
                );
            } else {
                report.add("storage pool", Fine, found, None);
            }
        }
        Err(error) => report.add("storage pool", Blocking, crate::error_chain(&error), None),
    }

    match settings.network.as_str() {
        "none" => report.add(
            "network",
            Fine,
            "desktops get no network card (network = \"none\")".to_owned(),
            None,
        ),
        "user-mode" => report.add(
            "network",
            Fine,
            "desktops use QEMU user-mode networking (outgoing only)".to_owned(),
            None,
        ),
        _ => check_network(&host, settings, &mut report),
    }
    report
}

/// Whether the libvirt network the desktops attach to exists and runs.
fn check_network(
    host: &LibvirtHypervisor,
    settings: &LibvirtSettings,
    report: &mut HostCheckReport,
) {
    use CheckStatus::{Blocking, Ok as Fine};
    match host.network_status(&settings.network) {
        Ok(Some(true)) => report.add("network", Fine, format!("network {:?} is active", settings.network), None),
        Ok(Some(false)) => report.add(
            "network",
            Blocking,
            format!("network {:?} exists but is not active: desktops would have no network", settings.network),
            Some(format!("virsh net-start {0} && virsh net-autostart {0}", settings.network)),
        ),
        Ok(None) => report.add(
            "network",
            Blocking,
            format!("network {:?} does not exist: desktops would have no network", settings.network),
            Some("define it (Debian: apt-get install libvirt-daemon-driver-network, then virsh net-start default), or set libvirt.network in config.toml".to_owned()),
        ),
        Err(error) => report.add(
            "network",
            Blocking,
            crate::error_chain(&error),
            Some("install libvirt's network driver (Debian: libvirt-daemon-driver-network)".to_owned()),
        ),
    }
}

fn human_bytes(bytes: u64) -> String {
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}
