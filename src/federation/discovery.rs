//! Finding grid members on the local network by mDNS (DNS-SD), so a new
//! appliance can join "by pointing at nothing": members advertise, a joiner
//! browses and offers the operator the grids it found.
//!
//! A member advertises one instance of [`SERVICE_TYPE`] named after its
//! server id. The SRV record carries its QUIC listen port, the A/AAAA records
//! its addresses, and the TXT record says which grid it belongs to:
//!
//! | key      | value                                   |
//! |----------|-----------------------------------------|
//! | `grid`   | the grid id (a UUID)                    |
//! | `server` | the server id (a UUID)                  |
//! | `v`      | [`ADVERTISEMENT_VERSION`]               |
//!
//! Everything a browse receives is untrusted: anyone on the link can
//! advertise anything. An entry with a missing or malformed value, or of
//! another advertisement version, is skipped with a `debug!` line; at most
//! [`MAX_DISCOVERED_SERVERS`] entries are kept. Discovery only suggests
//! where to connect: the join itself pins the grid's CA, so a forged
//! advertisement can waste a connection attempt, never admit anyone.
//!
//! **Invariant:** this is the only file that names `mdns_sd`.
//!
//! **Interfaces:** mDNS is multicast, so *which* interfaces it speaks on is a
//! decision, not a detail; [`InterfaceScope`] makes it explicit for
//! operators and tests. Tests run it only inside network namespaces they
//! create (loopback, or a veth pair between two namespaces), never on the
//! machine's real interfaces. Caveat: `mdns_sd::ServiceDaemon::new` binds a
//! socket (and joins the mDNS group) on every non-loopback interface before
//! the scope can be applied; nothing is *sent* before the scope applies,
//! because the daemon executes commands in order.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo, UnregisterStatus};
use serde::{Deserialize, Serialize};

use crate::model::{GridId, ServerId};

/// The DNS-SD service type deskgrid members advertise. `_udp` because the
/// peer protocol is QUIC.
pub const SERVICE_TYPE: &str = "_deskgrid._udp.local.";

/// The version of the advertisement's format (its TXT keys and what they
/// mean). The peer protocol has its own version, checked on the QUIC
/// connection; this one lets a future format coexist on the same link.
pub const ADVERTISEMENT_VERSION: u16 = 1;

/// At most this many servers are kept from one browse. A grid is tens to a
/// few hundred servers; the cap only stops a hostile or broken link from
/// growing the result without bound.
pub const MAX_DISCOVERED_SERVERS: usize = 1024;

/// At most this many addresses are kept per server: a host has a handful of
/// interfaces, and every address is a connection attempt for the joiner.
const MAX_ADDRESSES_PER_SERVER: usize = 16;

/// How long shutting down waits for the daemon to confirm each step. The
/// daemon answers within milliseconds unless it is wedged; the wait only
/// keeps `Drop` from hanging on a wedged one.
const DAEMON_REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// A DNS label is at most 63 bytes (RFC 1035 section 2.3.4).
const MAX_HOST_LABEL_LEN: usize = 63;

const TXT_GRID: &str = "grid";
const TXT_SERVER: &str = "server";
const TXT_VERSION: &str = "v";

/// Which network interfaces mDNS uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceScope {
    /// Every interface, loopback included (`IfKind::All`).
    All,
    /// Only IPv4 loopback (`IfKind::LoopbackV4`): one host, or a test's
    /// network namespace.
    LoopbackOnly,
    /// Only the interfaces with these names (`IfKind::Name`). A name that
    /// matches no interface is not an error: the daemon also picks up
    /// interfaces that appear later.
    Named(Vec<String>),
}

/// Why discovery could not run. Skipped advertisements are not errors: they
/// are logged and left out of the result.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot start the mdns daemon")]
    StartDaemon(#[source] mdns_sd::Error),
    #[error("cannot select the mdns interfaces {scope:?}")]
    SelectInterfaces {
        scope: InterfaceScope,
        #[source]
        source: mdns_sd::Error,
    },
    #[error("the interface list is empty: name at least one interface")]
    NoInterfacesNamed,
    #[error("host name {host_name:?} is not usable for mdns: {problem}")]
    InvalidHostName {
        host_name: String,
        problem: &'static str,
    },
    #[error("listen address {listen} has port 0: advertise the bound port")]
    UnboundListenPort { listen: SocketAddr },
    #[error("cannot describe the mdns service {instance}")]
    DescribeService {
        instance: String,
        #[source]
        source: mdns_sd::Error,
    },
    #[error("cannot register the mdns service {instance}")]
    Register {
        instance: String,
        #[source]
        source: mdns_sd::Error,
    },
    #[error("cannot unregister the mdns service {instance}")]
    Unregister {
        instance: String,
        #[source]
        source: mdns_sd::Error,
    },
    #[error("the mdns daemon did not confirm {operation} within {timeout:?}")]
    NoReply {
        operation: &'static str,
        timeout: Duration,
    },
    #[error("cannot browse for {service_type}")]
    Browse {
        service_type: &'static str,
        #[source]
        source: mdns_sd::Error,
    },
    #[error("the mdns daemon stopped while browsing")]
    DaemonStopped,
    #[error("cannot stop the mdns daemon")]
    StopDaemon(#[source] mdns_sd::Error),
}

/// One server found by [`browse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveredServer {
    pub server_id: ServerId,
    /// Where its QUIC endpoint listens, sorted; never empty.
    pub addresses: Vec<SocketAddr>,
    /// The advertisement version it used (today always
    /// [`ADVERTISEMENT_VERSION`]: other versions are skipped).
    pub version: u16,
}

/// The servers of one grid found by [`browse`], sorted by server id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscoveredGrid {
    pub grid_id: GridId,
    pub servers: Vec<DiscoveredServer>,
}

/// A member's advertisement, live until [`Advertiser::shutdown`] or drop,
/// which sends an mDNS goodbye so browsers forget it at once.
pub struct Advertiser {
    /// `None` once shut down.
    daemon: Option<ServiceDaemon>,
    /// `<server id>._deskgrid._udp.local.`
    instance_fullname: String,
    grid_id: GridId,
    server_id: ServerId,
}

impl fmt::Debug for Advertiser {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Advertiser")
            .field("instance_fullname", &self.instance_fullname)
            .field("grid_id", &self.grid_id)
            .field("server_id", &self.server_id)
            .field("running", &self.daemon.is_some())
            .finish()
    }
}

impl Advertiser {
    /// Starts advertising this server on the interfaces of `scope`.
    ///
    /// `listen` is the QUIC endpoint's bound address. When its IP is
    /// unspecified (`0.0.0.0` or `::`), the addresses advertised are those of
    /// the interfaces in scope, kept current by the daemon as they change;
    /// for `0.0.0.0` only IPv4 addresses, since the socket takes no IPv6.
    /// A specific IP is announced only on the in-scope interface whose
    /// subnet holds it (mdns-sd's rule), so it must belong to one.
    /// `host_name` names the host in the A/AAAA records (`appliance-7`,
    /// `appliance-7.local` and `appliance-7.local.` are the same name): one
    /// DNS label of letters, digits and `-`.
    ///
    /// Returns once the daemon has the registration; announcing takes the
    /// daemon about a second more (probing for name conflicts first).
    pub fn start(
        scope: &InterfaceScope,
        grid_id: GridId,
        server_id: ServerId,
        listen: SocketAddr,
        host_name: &str,
    ) -> Result<Self, DiscoveryError> {
        if listen.port() == 0 {
            return Err(DiscoveryError::UnboundListenPort { listen });
        }
        let host_fqdn = mdns_host_name(host_name)?;
        let service_info = advertisement(grid_id, server_id, listen, &host_fqdn)?;
        let instance_fullname = service_info.get_fullname().to_owned();

        let daemon = start_daemon(scope)?;
        // Build the value first so that an error below still stops the daemon
        // (through Drop).
        let advertiser = Self {
            daemon: Some(daemon),
            instance_fullname,
            grid_id,
            server_id,
        };
        let daemon = advertiser
            .daemon
            .as_ref()
            .expect("the daemon was stored just above");
        if listen.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED) {
            daemon.disable_interface(IfKind::IPv6).map_err(|source| {
                DiscoveryError::SelectInterfaces {
                    scope: scope.clone(),
                    source,
                }
            })?;
        }
        daemon
            .register(service_info)
            .map_err(|source| DiscoveryError::Register {
                instance: advertiser.instance_fullname.clone(),
                source,
            })?;
        tracing::info!(
            grid = %grid_id,
            server = %server_id,
            %listen,
            host = %host_fqdn,
            ?scope,
            "advertising on mdns"
        );
        Ok(advertiser)
    }

    /// The advertised instance, `<server id>._deskgrid._udp.local.`.
    pub fn instance_fullname(&self) -> &str {
        &self.instance_fullname
    }

    /// Withdraws the advertisement (an mDNS goodbye) and stops the daemon.
    /// Blocks up to about two seconds if the daemon is wedged, normally
    /// milliseconds.
    pub fn shutdown(mut self) -> Result<(), DiscoveryError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), DiscoveryError> {
        let Some(daemon) = self.daemon.take() else {
            return Ok(());
        };
        // The daemon runs commands in order, so the goodbye goes out before
        // the exit even if the unregister reply is lost; still stop the
        // daemon when unregistering fails, then report the first error.
        let unregistered = daemon
            .unregister(&self.instance_fullname)
            .map_err(|source| DiscoveryError::Unregister {
                instance: self.instance_fullname.clone(),
                source,
            })
            .and_then(|reply| match reply.recv_timeout(DAEMON_REPLY_TIMEOUT) {
                Ok(UnregisterStatus::OK) => Ok(()),
                Ok(UnregisterStatus::NotFound) => {
                    // The daemon had dropped it already (for instance a name
                    // conflict it lost); nothing left to withdraw.
                    tracing::debug!(instance = %self.instance_fullname, "mdns service was not registered");
                    Ok(())
                }
                Err(_) => Err(DiscoveryError::NoReply {
                    operation: "unregister",
                    timeout: DAEMON_REPLY_TIMEOUT,
                }),
            });
        let stopped = stop_daemon(&daemon);
        tracing::info!(server = %self.server_id, "stopped advertising on mdns");
        unregistered.and(stopped)
    }
}

impl Drop for Advertiser {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            tracing::warn!(
                instance = %self.instance_fullname,
                error = %crate::error_chain(&error),
                "stopping the mdns advertisement failed"
            );
        }
    }
}

/// Browses the interfaces of `scope` for `duration` and returns the grids
/// found, sorted by grid id, each with its servers sorted by server id.
///
/// Blocking: async callers run it on `spawn_blocking`. A server that said
/// goodbye during the browse is left out. Advertisements that are malformed,
/// of another version, or beyond [`MAX_DISCOVERED_SERVERS`] are skipped with
/// a `debug!` line.
pub fn browse(
    scope: &InterfaceScope,
    duration: Duration,
) -> Result<Vec<DiscoveredGrid>, DiscoveryError> {
    let daemon = start_daemon(scope)?;
    let result = collect_for(&daemon, duration);
    let stopped = stop_daemon(&daemon);
    let found = result?;
    stopped?;
    let grids = found.into_grids();
    tracing::debug!(
        n_grids = grids.len(),
        n_servers = grids.iter().map(|grid| grid.servers.len()).sum::<usize>(),
        "mdns browse finished"
    );
    Ok(grids)
}

fn collect_for(daemon: &ServiceDaemon, duration: Duration) -> Result<Found, DiscoveryError> {
    let events = daemon
        .browse(SERVICE_TYPE)
        .map_err(|source| DiscoveryError::Browse {
            service_type: SERVICE_TYPE,
            source,
        })?;
    let deadline = Instant::now() + duration;
    let mut found = Found::default();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(found);
        }
        match events.recv_timeout(remaining) {
            Ok(ServiceEvent::ServiceResolved(service_info)) => found.record_resolved(&service_info),
            Ok(ServiceEvent::ServiceRemoved(_, fullname)) => found.record_removed(&fullname),
            Ok(_) => {}
            Err(_) if events.is_disconnected() => return Err(DiscoveryError::DaemonStopped),
            // A timeout: the loop ends at the deadline check above.
            Err(_) => {}
        }
    }
}

/// A daemon limited to `scope`, stopped again if the scope cannot be set.
fn start_daemon(scope: &InterfaceScope) -> Result<ServiceDaemon, DiscoveryError> {
    if matches!(scope, InterfaceScope::Named(names) if names.is_empty()) {
        return Err(DiscoveryError::NoInterfacesNamed);
    }
    let daemon = ServiceDaemon::new().map_err(DiscoveryError::StartDaemon)?;
    if let Err(source) = select_interfaces(&daemon, scope) {
        if let Err(error) = stop_daemon(&daemon) {
            tracing::debug!(error = %crate::error_chain(&error), "stopping the mdns daemon failed");
        }
        return Err(DiscoveryError::SelectInterfaces {
            scope: scope.clone(),
            source,
        });
    }
    Ok(daemon)
}

/// Selections apply in order, later ones winning, so "disable everything,
/// then enable these" leaves exactly these.
fn select_interfaces(daemon: &ServiceDaemon, scope: &InterfaceScope) -> Result<(), mdns_sd::Error> {
    match scope {
        InterfaceScope::All => daemon.enable_interface(IfKind::All),
        InterfaceScope::LoopbackOnly => {
            daemon.disable_interface(IfKind::All)?;
            daemon.enable_interface(IfKind::LoopbackV4)
        }
        InterfaceScope::Named(names) => {
            daemon.disable_interface(IfKind::All)?;
            let kinds: Vec<IfKind> = names.iter().cloned().map(IfKind::Name).collect();
            daemon.enable_interface(kinds)
        }
    }
}

fn stop_daemon(daemon: &ServiceDaemon) -> Result<(), DiscoveryError> {
    let reply = daemon.shutdown().map_err(DiscoveryError::StopDaemon)?;
    match reply.recv_timeout(DAEMON_REPLY_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(_) => Err(DiscoveryError::NoReply {
            operation: "shutdown",
            timeout: DAEMON_REPLY_TIMEOUT,
        }),
    }
}

/// `name`, `name.local` or `name.local.` to `name.local.`, refusing what is
/// not one DNS label of letters, digits and `-`.
fn mdns_host_name(host_name: &str) -> Result<String, DiscoveryError> {
    let invalid = |problem| DiscoveryError::InvalidHostName {
        host_name: host_name.to_owned(),
        problem,
    };
    let trimmed = host_name.strip_suffix('.').unwrap_or(host_name);
    let label = trimmed.strip_suffix(".local").unwrap_or(trimmed);
    if label.is_empty() {
        return Err(invalid("it is empty"));
    }
    if label.len() > MAX_HOST_LABEL_LEN {
        return Err(invalid("it is longer than 63 bytes"));
    }
    if !label
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    {
        return Err(invalid("use only letters, digits and '-'"));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(invalid("it starts or ends with '-'"));
    }
    Ok(format!("{label}.local."))
}

/// The service record for one member.
fn advertisement(
    grid_id: GridId,
    server_id: ServerId,
    listen: SocketAddr,
    host_fqdn: &str,
) -> Result<ServiceInfo, DiscoveryError> {
    let instance = server_id.to_string();
    let properties = [
        (TXT_GRID, grid_id.to_string()),
        (TXT_SERVER, instance.clone()),
        (TXT_VERSION, ADVERTISEMENT_VERSION.to_string()),
    ];
    let addresses: Vec<IpAddr> = if listen.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![listen.ip()]
    };
    let service_info = ServiceInfo::new(
        SERVICE_TYPE,
        &instance,
        host_fqdn,
        &addresses[..],
        listen.port(),
        &properties[..],
    )
    .map_err(|source| DiscoveryError::DescribeService {
        instance: instance.clone(),
        source,
    })?;
    Ok(if addresses.is_empty() {
        service_info.enable_addr_auto()
    } else {
        service_info
    })
}

/// Why a received advertisement was left out.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
enum Skipped {
    #[error("the TXT record has no {key:?}")]
    Missing { key: &'static str },
    #[error("the TXT value of {key:?} is not valid: {value:?}")]
    Invalid { key: &'static str, value: String },
    #[error("advertisement version {found}, this build reads {ADVERTISEMENT_VERSION}")]
    OtherVersion { found: u16 },
    #[error("the SRV port is 0")]
    NoPort,
    #[error("no usable address")]
    NoAddress,
}

/// Reads one resolved service as a deskgrid member, or says why not.
fn parse_advertisement(service_info: &ServiceInfo) -> Result<(GridId, DiscoveredServer), Skipped> {
    // TXT values are untrusted bytes; mdns-sd gives "" for invalid UTF-8,
    // which then fails to parse like any other bad value.
    let txt = |key: &'static str| {
        service_info
            .get_property_val_str(key)
            .ok_or(Skipped::Missing { key })
    };
    let invalid = |key: &'static str, value: &str| Skipped::Invalid {
        key,
        // A hostile value can be up to 255 bytes; the log needs a glimpse.
        value: value.chars().take(40).collect(),
    };
    let version_text = txt(TXT_VERSION)?;
    let version: u16 = version_text
        .parse()
        .map_err(|_| invalid(TXT_VERSION, version_text))?;
    if version != ADVERTISEMENT_VERSION {
        return Err(Skipped::OtherVersion { found: version });
    }
    let grid_text = txt(TXT_GRID)?;
    let grid_id: GridId = grid_text
        .parse()
        .map_err(|_| invalid(TXT_GRID, grid_text))?;
    let server_text = txt(TXT_SERVER)?;
    let server_id: ServerId = server_text
        .parse()
        .map_err(|_| invalid(TXT_SERVER, server_text))?;
    let port = service_info.get_port();
    if port == 0 {
        return Err(Skipped::NoPort);
    }
    let addresses = usable_addresses(service_info.get_addresses(), port);
    if addresses.is_empty() {
        return Err(Skipped::NoAddress);
    }
    Ok((
        grid_id,
        DiscoveredServer {
            server_id,
            addresses,
            version,
        },
    ))
}

/// The addresses a joiner can connect to, sorted and capped. IPv6
/// link-local addresses are left out: mdns-sd reports them without the
/// interface (scope id) that makes them reachable.
fn usable_addresses(ips: &HashSet<IpAddr>, port: u16) -> Vec<SocketAddr> {
    let usable = |ip: &&IpAddr| match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local()),
    };
    let sorted: BTreeSet<IpAddr> = ips.iter().filter(usable).copied().collect();
    sorted
        .into_iter()
        .take(MAX_ADDRESSES_PER_SERVER)
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}

/// What a browse has seen so far, by instance full name (lowercase: DNS
/// names compare without case), so a later resolution of the same instance
/// replaces the earlier one and a goodbye removes it.
#[derive(Debug, Default)]
struct Found {
    by_instance: BTreeMap<String, (GridId, DiscoveredServer)>,
    n_over_cap: usize,
}

impl Found {
    fn record_resolved(&mut self, service_info: &ServiceInfo) {
        let instance = service_info.get_fullname().to_lowercase();
        match parse_advertisement(service_info) {
            Ok(entry) => {
                if self.by_instance.len() >= MAX_DISCOVERED_SERVERS
                    && !self.by_instance.contains_key(&instance)
                {
                    self.n_over_cap += 1;
                    tracing::debug!(
                        %instance,
                        n_over_cap = self.n_over_cap,
                        max = MAX_DISCOVERED_SERVERS,
                        "skipping mdns advertisement: too many servers"
                    );
                    return;
                }
                self.by_instance.insert(instance, entry);
            }
            Err(reason) => {
                tracing::debug!(%instance, %reason, "skipping mdns advertisement");
            }
        }
    }

    fn record_removed(&mut self, fullname: &str) {
        self.by_instance.remove(&fullname.to_lowercase());
    }

    /// Groups by grid. Two instances claiming the same server of the same
    /// grid are one server with the union of their addresses: which claim is
    /// true is for the authenticated connection to find out.
    fn into_grids(self) -> Vec<DiscoveredGrid> {
        let mut grids: BTreeMap<GridId, BTreeMap<ServerId, DiscoveredServer>> = BTreeMap::new();
        for (grid_id, server) in self.by_instance.into_values() {
            let servers = grids.entry(grid_id).or_default();
            match servers.get_mut(&server.server_id) {
                Some(known) => {
                    let merged: BTreeSet<SocketAddr> = known
                        .addresses
                        .iter()
                        .chain(&server.addresses)
                        .copied()
                        .collect();
                    known.addresses = merged.into_iter().take(MAX_ADDRESSES_PER_SERVER).collect();
                }
                None => {
                    servers.insert(server.server_id, server);
                }
            }
        }
        grids
            .into_iter()
            .map(|(grid_id, servers)| DiscoveredGrid {
                grid_id,
                servers: servers.into_values().collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    //! Pure tests: records are built with `ServiceInfo::new`, which does no
    //! I/O. No daemon is started here, so nothing touches the machine's
    //! interfaces; the real-network tests run inside network namespaces in
    //! `tests/federation_discovery.rs`.

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn grid(n: u8) -> GridId {
        GridId::from_bytes([n; 16])
    }

    fn server(n: u8) -> ServerId {
        ServerId::from_bytes([n; 16])
    }

    fn record(
        instance: &str,
        properties: &[(&str, &str)],
        addresses: &[IpAddr],
        port: u16,
    ) -> ServiceInfo {
        ServiceInfo::new(
            SERVICE_TYPE,
            instance,
            "host.local.",
            addresses,
            port,
            properties,
        )
        .expect("test records are well formed")
    }

    fn member(grid_id: GridId, server_id: ServerId, ip: [u8; 4], port: u16) -> ServiceInfo {
        record(
            &server_id.to_string(),
            &[
                ("grid", &grid_id.to_string()),
                ("server", &server_id.to_string()),
                ("v", "1"),
            ],
            &[IpAddr::from(ip)],
            port,
        )
    }

    #[test]
    fn host_names_normalise_to_one_local_label() {
        for given in ["appliance-7", "appliance-7.local", "appliance-7.local."] {
            assert_eq!(mdns_host_name(given).unwrap(), "appliance-7.local.");
        }
        for bad in [
            "",
            ".local.",
            "a.b",
            "under_score",
            "-x",
            "x-",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(
                    mdns_host_name(bad),
                    Err(DiscoveryError::InvalidHostName { .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn advertisement_carries_grid_server_and_version() {
        let info = advertisement(
            grid(1),
            server(2),
            "10.250.0.1:7443".parse().unwrap(),
            "host.local.",
        )
        .unwrap();
        assert_eq!(info.get_fullname(), format!("{}.{SERVICE_TYPE}", server(2)));
        assert_eq!(info.get_port(), 7443);
        assert!(!info.is_addr_auto());
        // Reading our own advertisement back gives what went in.
        let (grid_id, found) = parse_advertisement(&info).unwrap();
        assert_eq!(grid_id, grid(1));
        assert_eq!(
            found,
            DiscoveredServer {
                server_id: server(2),
                addresses: vec!["10.250.0.1:7443".parse().unwrap()],
                version: ADVERTISEMENT_VERSION,
            }
        );
    }

    #[test]
    fn unspecified_listen_address_lets_the_daemon_fill_in_addresses() {
        let info = advertisement(
            grid(1),
            server(2),
            "0.0.0.0:7443".parse().unwrap(),
            "host.local.",
        )
        .unwrap();
        assert!(info.is_addr_auto());
        assert!(info.get_addresses().is_empty());
    }

    #[test]
    fn hostile_or_foreign_advertisements_are_skipped() {
        let grid_text = grid(1).to_string();
        let server_text = server(2).to_string();
        let ip = [IpAddr::from([10, 0, 0, 1])];
        let cases: Vec<(ServiceInfo, Skipped)> = vec![
            (
                record(
                    "a",
                    &[("grid", &grid_text), ("server", &server_text)],
                    &ip,
                    1,
                ),
                Skipped::Missing { key: "v" },
            ),
            (
                record(
                    "b",
                    &[("grid", &grid_text), ("server", &server_text), ("v", "2")],
                    &ip,
                    1,
                ),
                Skipped::OtherVersion { found: 2 },
            ),
            (
                record(
                    "c",
                    &[("grid", &grid_text), ("server", &server_text), ("v", "x")],
                    &ip,
                    1,
                ),
                Skipped::Invalid {
                    key: "v",
                    value: "x".into(),
                },
            ),
            (
                record("d", &[("server", &server_text), ("v", "1")], &ip, 1),
                Skipped::Missing { key: "grid" },
            ),
            (
                record(
                    "e",
                    &[("grid", "not-a-uuid"), ("server", &server_text), ("v", "1")],
                    &ip,
                    1,
                ),
                Skipped::Invalid {
                    key: "grid",
                    value: "not-a-uuid".into(),
                },
            ),
            (
                record(
                    "f",
                    &[("grid", &grid_text), ("server", ""), ("v", "1")],
                    &ip,
                    1,
                ),
                Skipped::Invalid {
                    key: "server",
                    value: String::new(),
                },
            ),
            (
                record(
                    "g",
                    &[("grid", &grid_text), ("server", &server_text), ("v", "1")],
                    &ip,
                    0,
                ),
                Skipped::NoPort,
            ),
            (
                record(
                    "h",
                    &[("grid", &grid_text), ("server", &server_text), ("v", "1")],
                    &[
                        IpAddr::from(Ipv4Addr::UNSPECIFIED),
                        IpAddr::from([224, 0, 0, 251]),
                        IpAddr::from(Ipv4Addr::BROADCAST),
                        IpAddr::from(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
                    ],
                    1,
                ),
                Skipped::NoAddress,
            ),
        ];
        for (info, expected) in cases {
            assert_eq!(
                parse_advertisement(&info).unwrap_err(),
                expected,
                "{}",
                info.get_fullname()
            );
        }
    }

    #[test]
    fn overlong_values_are_shortened_in_the_skip_reason() {
        let long = "x".repeat(200);
        let info = record(
            "a",
            &[("grid", &long), ("server", "s"), ("v", "1")],
            &[IpAddr::from([10, 0, 0, 1])],
            1,
        );
        let Skipped::Invalid { value, .. } = parse_advertisement(&info).unwrap_err() else {
            panic!("expected an invalid value");
        };
        assert_eq!(value.len(), 40);
    }

    #[test]
    fn results_group_by_grid_sorted_and_goodbyes_remove() {
        let mut found = Found::default();
        // Fed out of order on purpose.
        found.record_resolved(&member(grid(9), server(5), [10, 0, 0, 5], 7000));
        found.record_resolved(&member(grid(1), server(3), [10, 0, 0, 3], 7000));
        found.record_resolved(&member(grid(1), server(2), [10, 0, 0, 2], 7000));
        found.record_resolved(&member(grid(1), server(4), [10, 0, 0, 4], 7000));
        // A re-resolution replaces the earlier one.
        found.record_resolved(&member(grid(1), server(2), [10, 0, 0, 22], 7001));
        found.record_removed(&format!("{}.{SERVICE_TYPE}", server(4)).to_uppercase());

        let grids = found.into_grids();
        type Summary = Vec<(GridId, Vec<(ServerId, Vec<SocketAddr>)>)>;
        let summary: Summary = grids
            .into_iter()
            .map(|grid| {
                (
                    grid.grid_id,
                    grid.servers
                        .into_iter()
                        .map(|server| (server.server_id, server.addresses))
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    grid(1),
                    vec![
                        (server(2), vec!["10.0.0.22:7001".parse().unwrap()]),
                        (server(3), vec!["10.0.0.3:7000".parse().unwrap()]),
                    ]
                ),
                (
                    grid(9),
                    vec![(server(5), vec!["10.0.0.5:7000".parse().unwrap()])]
                ),
            ]
        );
    }

    #[test]
    fn two_instances_claiming_one_server_merge_their_addresses() {
        let mut found = Found::default();
        // The same TXT under another instance name.
        let second = record(
            "impostor",
            &[
                ("grid", &grid(1).to_string()),
                ("server", &server(2).to_string()),
                ("v", "1"),
            ],
            &[IpAddr::from([10, 0, 0, 9])],
            7000,
        );
        found.record_resolved(&member(grid(1), server(2), [10, 0, 0, 1], 7000));
        found.record_resolved(&second);
        let grids = found.into_grids();
        assert_eq!(grids.len(), 1);
        assert_eq!(grids[0].servers.len(), 1);
        assert_eq!(
            grids[0].servers[0].addresses,
            vec![
                "10.0.0.1:7000".parse::<SocketAddr>().unwrap(),
                "10.0.0.9:7000".parse().unwrap()
            ]
        );
    }

    #[test]
    fn the_number_of_servers_kept_is_capped() {
        let mut found = Found::default();
        for index in 0..MAX_DISCOVERED_SERVERS + 10 {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&(index as u64).to_be_bytes());
            let server_id = ServerId::from_bytes(bytes);
            found.record_resolved(&member(grid(1), server_id, [10, 0, 0, 1], 7000));
        }
        assert_eq!(found.n_over_cap, 10);
        // An instance already kept may still be updated at the cap.
        let first = ServerId::from_bytes([0; 16]);
        found.record_resolved(&member(grid(1), first, [10, 0, 0, 2], 7000));
        assert_eq!(found.n_over_cap, 10);
        let grids = found.into_grids();
        assert_eq!(grids[0].servers.len(), MAX_DISCOVERED_SERVERS);
        assert_eq!(
            grids[0].servers[0].addresses,
            vec!["10.0.0.2:7000".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn addresses_per_server_are_capped_and_sorted() {
        let ips: HashSet<IpAddr> = (1..=40u8).map(|n| IpAddr::from([10, 0, 0, n])).collect();
        let addresses = usable_addresses(&ips, 9);
        assert_eq!(addresses.len(), MAX_ADDRESSES_PER_SERVER);
        assert!(addresses.windows(2).all(|pair| pair[0] < pair[1]));
    }

    #[test]
    fn an_empty_interface_list_is_refused_before_any_daemon_starts() {
        assert!(matches!(
            browse(&InterfaceScope::Named(Vec::new()), Duration::from_millis(1)),
            Err(DiscoveryError::NoInterfacesNamed)
        ));
    }
}
