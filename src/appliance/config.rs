//! `config.toml`: this server's own settings (not replicated).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::SiteLabel;

/// Where a pool deskgrid creates keeps its files: beside libvirt's own images.
pub const DEFAULT_POOL_PATH: &str = "/var/lib/libvirt/images/deskgrid";
/// The UDP port deskgrid's QUIC peer traffic uses unless configured otherwise.
pub const DEFAULT_PEER_PORT: u16 = 7443;
/// The most seed addresses a config may list: seeds are only a first contact.
pub const MAX_SEEDS: usize = 64;
/// The HTTPS API's TCP port beside the default QUIC port: `api.listen =
/// "auto"` takes the QUIC port plus this offset, so servers sharing an IP on
/// different QUIC ports (`scripts/demo.sh`: 7443, 7444, 7445) get different
/// API ports too (8443, 8444, 8445).
pub const API_PORT_OFFSET: u16 = 1000;

/// This server's settings, as `config.toml` holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSettings,
    #[serde(default)]
    pub libvirt: LibvirtSettings,
    #[serde(default)]
    pub api: ApiSettings,
}

/// The HTTPS API (`POST /api/v1/login`, `/connect`, `/logout`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSettings {
    /// `"auto"`, `"off"` or `"IP:PORT"`; see [`ApiSettings::listen_address`].
    pub listen: String,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            listen: "auto".to_owned(),
        }
    }
}

/// Where the HTTPS API listens, as `api.listen` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiListen {
    /// `"off"`: no API.
    Off,
    /// `"auto"`: derived from `server.listen`; a bind failure there is
    /// logged and the server runs without the API (tests and demos start
    /// many servers on one host, each with its own QUIC port).
    Auto(SocketAddr),
    /// An address the admin chose: not binding it stops the start.
    Configured(SocketAddr),
}

impl ApiListen {
    pub fn address(&self) -> Option<SocketAddr> {
        match self {
            Self::Off => None,
            Self::Auto(address) | Self::Configured(address) => Some(*address),
        }
    }
}

impl ApiSettings {
    /// `"off"`: none; `"auto"`: `server.listen`'s IP with its port plus
    /// [`API_PORT_OFFSET`] (8443 beside the default 7443); else the
    /// `IP:PORT` given (port 0: any free port, shown by `deskgrid status`).
    pub fn listen_address(&self, server: &ServerSettings) -> Result<ApiListen, String> {
        match self.listen.trim() {
            "off" => Ok(ApiListen::Off),
            "auto" | "" => {
                let port = server
                    .listen
                    .port()
                    .checked_add(API_PORT_OFFSET)
                    .ok_or_else(|| {
                        format!(
                            "api.listen \"auto\" adds {API_PORT_OFFSET} to server.listen's port {}, which is over 65535: set api.listen to \"IP:PORT\" or \"off\"",
                            server.listen.port()
                        )
                    })?;
                Ok(ApiListen::Auto(SocketAddr::new(server.listen.ip(), port)))
            }
            text => text.parse::<SocketAddr>().map(ApiListen::Configured).map_err(|_| {
                format!("api.listen {text:?} is not \"auto\", \"off\" or an IP:PORT address (like \"192.0.2.5:8443\")")
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Shown in the consoles; defaults to the host name.
    pub name: String,
    /// Servers with the same site label are near each other.
    pub site: SiteLabel,
    /// The address and UDP port the QUIC endpoint binds.
    pub listen: SocketAddr,
    /// The address other servers dial (published in this server's record),
    /// when it is not `listen`: required when `listen` is `0.0.0.0` or `::`,
    /// and for an address translated on the way (NAT, port forwarding).
    /// An IP address, not a host name: peers dial it without resolving.
    pub advertise: Option<SocketAddr>,
    /// Addresses of grid members to contact first.
    pub seeds: Vec<String>,
    /// Where this server announces its grid by mDNS: "off", "loopback",
    /// "all", or a comma-separated list of interface names.
    pub mdns: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            name: "deskgrid".to_owned(),
            site: SiteLabel::default(),
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PEER_PORT)),
            advertise: None,
            seeds: Vec::new(),
            mdns: "off".to_owned(),
        }
    }
}

impl ServerSettings {
    /// The address other servers dial to reach this one: `advertise`, else
    /// `listen`. Refused when that is every interface (`0.0.0.0`, `::`): a
    /// record saying so cannot be dialled. Only servers of a grid need one.
    pub fn peer_address(&self) -> Result<SocketAddr, NoPeerAddress> {
        match self.advertise {
            Some(advertise) => Ok(advertise),
            None if self.listen.ip().is_unspecified() => Err(NoPeerAddress {
                listen: self.listen,
            }),
            None => Ok(self.listen),
        }
    }
}

/// A server of a grid listens on every interface and says nowhere which
/// address the others should dial.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "server.listen is {listen}, every interface, which other servers cannot dial: set the address they should use with --advertise IP:PORT (server.advertise in config.toml)"
)]
pub struct NoPeerAddress {
    pub listen: SocketAddr,
}

/// How deskgrid runs VMs: KVM where the host has it, else QEMU's emulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DomainType {
    #[default]
    Auto,
    Kvm,
    Qemu,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtSettings {
    /// `qemu:///system` on the host itself; `qemu+tls://HOST/system` from an appliance VM.
    pub uri: String,
    /// The storage pool for base images and desktop disks.
    pub pool: String,
    /// Where the pool keeps its files when deskgrid has to create it.
    pub pool_path: String,
    /// The libvirt network desktop VMs attach to; `user-mode` for QEMU's
    /// user-mode networking, `none` for no network card.
    pub network: String,
    pub domain_type: DomainType,
    /// How image bytes reach volumes: `auto` writes a local `dir` pool's
    /// files directly (faster, several writers at once) and uses libvirt
    /// streams otherwise; `streams` always uses libvirt streams.
    pub volume_io: VolumeIo,
    /// Where SPICE displays listen on the hypervisor host. `None`: the
    /// server's listen address when libvirt runs on this host, else every
    /// address of the hypervisor host (an appliance VM's own address is
    /// not the host's); see [`LibvirtSettings::spice_listen`].
    pub display_listen: Option<IpAddr>,
}

/// See [`LibvirtSettings::volume_io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeIo {
    #[default]
    Auto,
    Streams,
}

impl Default for LibvirtSettings {
    fn default() -> Self {
        Self {
            uri: "qemu:///system".to_owned(),
            pool: "deskgrid".to_owned(),
            pool_path: DEFAULT_POOL_PATH.to_owned(),
            network: "default".to_owned(),
            domain_type: DomainType::Auto,
            volume_io: VolumeIo::Auto,
            display_listen: None,
        }
    }
}

impl LibvirtSettings {
    /// The address SPICE displays listen on, for a server listening at
    /// `server_listen`: `display_listen`, else `server_listen` when libvirt
    /// runs on this host, else every address (`0.0.0.0`).
    pub fn spice_listen(&self, server_listen: IpAddr) -> IpAddr {
        match self.display_listen {
            Some(listen) => listen,
            None if crate::actuator::libvirt::uri_is_local(&self.uri) => server_listen,
            None => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        }
    }

    /// The address viewers dial for a display listening on every address:
    /// the hypervisor host's, when the libvirt URI names it by IP (an
    /// appliance VM); `None` when this server's own address is the one.
    pub fn hypervisor_address(&self) -> Option<IpAddr> {
        if crate::actuator::libvirt::uri_is_local(&self.uri) {
            return None;
        }
        let rest = self.uri.split_once("://")?.1;
        let authority = rest.split('/').next()?;
        let host = authority
            .rsplit_once('@')
            .map_or(authority, |(_, host)| host);
        let host = match host.strip_prefix('[') {
            Some(bracketed) => bracketed.split(']').next()?,
            None => host.rsplit_once(':').map_or(host, |(host, _port)| host),
        };
        host.parse().ok()
    }

    /// The actuator's view of these settings.
    pub fn libvirt_options(&self) -> crate::actuator::libvirt::LibvirtOptions {
        use crate::actuator::DomainKind;
        crate::actuator::libvirt::LibvirtOptions {
            uri: self.uri.clone(),
            pool: self.pool.clone(),
            pool_path: self.pool_path.clone(),
            domain_kind: match self.domain_type {
                DomainType::Auto => None,
                DomainType::Kvm => Some(DomainKind::Kvm),
                DomainType::Qemu => Some(DomainKind::Qemu),
            },
            streams_only: self.volume_io == VolumeIo::Streams,
        }
    }
}

/// Why `config.toml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// A config file larger than this is not a config file.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let size = std::fs::metadata(path).map_err(read_error)?.len();
        if size > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                problem: format!("the file is {size} bytes, the limit is {MAX_CONFIG_BYTES}"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.server.name.is_empty() || self.server.name.len() > 253 {
            return Err("server.name must be 1 to 253 characters".to_owned());
        }
        if self.server.seeds.len() > MAX_SEEDS {
            return Err(format!(
                "server.seeds lists {} addresses, the limit is {MAX_SEEDS}",
                self.server.seeds.len()
            ));
        }
        if let Some(seed) = self
            .server
            .seeds
            .iter()
            .find(|seed| !looks_like_host_port(seed))
        {
            return Err(format!("server.seeds: {seed:?} is not HOST:PORT"));
        }
        if let Some(advertise) = self.server.advertise {
            if advertise.ip().is_unspecified() || advertise.port() == 0 {
                return Err(format!(
                    "server.advertise {advertise} is not an address other servers can dial"
                ));
            }
        }
        parse_mdns_scope(&self.server.mdns).map_err(|problem| format!("server.mdns: {problem}"))?;
        self.api.listen_address(&self.server)?;
        if !self.libvirt.uri.contains("://") {
            return Err(format!(
                "libvirt.uri {:?} is not a libvirt URI (like qemu:///system)",
                self.libvirt.uri
            ));
        }
        if !self.libvirt.pool_path.starts_with('/') {
            return Err(format!(
                "libvirt.pool_path {:?} must be an absolute path",
                self.libvirt.pool_path
            ));
        }
        if self.libvirt.network.is_empty() || self.libvirt.network.len() > 64 {
            return Err("libvirt.network must be 1 to 64 characters".to_owned());
        }
        crate::model::SiteLabel::new(self.libvirt.pool.clone()).map_err(|_| {
            format!(
                "libvirt.pool {:?} is not a valid pool name",
                self.libvirt.pool
            )
        })?;
        Ok(())
    }

    /// The file `deskgrid init` writes: every setting with its meaning and default.
    pub fn to_commented_toml(&self) -> String {
        let seeds = self
            .server
            .seeds
            .iter()
            .map(|seed| format!("{seed:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            r#"# deskgrid: settings of this server (this file is not shared with the grid).
# Grid-wide settings (templates, users, policy) live in the replicated state:
# change them with the `deskgrid` CLI, the REST API or the web console.
# Restart `deskgrid serve` after editing this file.

[server]
# Name shown in the consoles and in `deskgrid status`. Default: the host name.
name = {name:?}
# Site label. Servers with the same label are near each other: image copies
# between them are cheaper. Default: "default".
site = {site:?}
# Address and UDP port this server listens on for other servers (QUIC).
# Default: "0.0.0.0:{DEFAULT_PEER_PORT}".
listen = "{listen}"
# Address and UDP port other servers dial ("IP:PORT"), published in the grid
# state; needed when `listen` is 0.0.0.0 or :: (every interface) or when the
# address is translated on the way. Default: the `listen` address.
{advertise}
# Grid members to contact first when joining or after a restart ("HOST:PORT").
# Servers on the same network also find each other by mDNS. Default: [].
seeds = [{seeds}]
# Announce this grid by mDNS so new appliances can find it (`deskgrid
# discover`): "off", "all" (every interface), "loopback", or interface names
# ("eth0,eth1"). A join still needs a token. Default: "off".
mdns = {mdns:?}

[libvirt]
# How to reach this host's hypervisor: "qemu:///system" when deskgrid runs on
# the host, "qemu+tls://HOST/system" when it runs as a VM on it.
# Default: "qemu:///system".
uri = {uri:?}
# Storage pool for base images and desktop disks (created when missing).
# Default: "deskgrid".
pool = {pool:?}
# Directory of the pool when deskgrid creates it.
# Default: "{DEFAULT_POOL_PATH}".
pool_path = {pool_path:?}
# libvirt network the desktops' network cards attach to; "user-mode" for
# QEMU's user-mode networking (no host setup, outgoing only), "none" for no
# network card. Default: "default".
network = {network:?}
# "kvm", "qemu" (software emulation, slow) or "auto" (kvm when the host
# offers it). Default: "auto".
domain_type = "{domain_type}"
# How image bytes reach volumes: "auto" writes a local `dir` pool's files
# directly (faster, several writers at once) and uses libvirt streams
# otherwise; "streams" always uses libvirt streams. Default: "auto".
volume_io = "{volume_io}"
# Address SPICE displays listen on, on the hypervisor host. Default: this
# server's listen address when libvirt runs on this host, else every address
# of the hypervisor host (set it when deskgrid runs in an appliance VM).
{display_listen}

[api]
# Where the HTTPS API for users and portals listens (POST /api/v1/login,
# /api/v1/connect, /api/v1/logout): "IP:PORT", "off", or "auto" for
# server.listen's IP with its port plus {API_PORT_OFFSET} (8443 beside 7443); an
# "auto" address that cannot be bound is logged and the server runs without
# the API. Its certificate is DATA_DIR/api/tls-cert.pem (made self-signed on
# first start; replace it and tls-key.pem with your own pair if you like).
# Default: "auto".
listen = {api_listen:?}
"#,
            name = self.server.name,
            site = self.server.site.to_string(),
            listen = self.server.listen,
            advertise = match self.server.advertise {
                Some(advertise) => format!("advertise = \"{advertise}\""),
                None => "# advertise = \"IP:PORT\"".to_owned(),
            },
            uri = self.libvirt.uri,
            mdns = self.server.mdns,
            pool = self.libvirt.pool,
            pool_path = self.libvirt.pool_path,
            network = self.libvirt.network,
            domain_type = match self.libvirt.domain_type {
                DomainType::Auto => "auto",
                DomainType::Kvm => "kvm",
                DomainType::Qemu => "qemu",
            },
            display_listen = match self.libvirt.display_listen {
                Some(listen) => format!("display_listen = \"{listen}\""),
                None => "# display_listen = \"IP\"".to_owned(),
            },
            volume_io = match self.libvirt.volume_io {
                VolumeIo::Auto => "auto",
                VolumeIo::Streams => "streams",
            },
            api_listen = self.api.listen,
        )
    }
}

/// `server.mdns` as a discovery scope; `None` is "off".
pub fn parse_mdns_scope(
    text: &str,
) -> Result<Option<crate::federation::discovery::InterfaceScope>, String> {
    use crate::federation::discovery::InterfaceScope;
    match text.trim() {
        "off" | "" => Ok(None),
        "all" => Ok(Some(InterfaceScope::All)),
        "loopback" => Ok(Some(InterfaceScope::LoopbackOnly)),
        names => {
            let names: Vec<String> = names
                .split(',')
                .map(|name| name.trim().to_owned())
                .collect();
            if names.iter().any(|name| {
                name.is_empty() || name.len() > 15 || name.contains(char::is_whitespace)
            }) {
                return Err(format!(
                    "{text:?} is not \"off\", \"all\", \"loopback\" or interface names"
                ));
            }
            Ok(Some(InterfaceScope::Named(names)))
        }
    }
}

fn looks_like_host_port(value: &str) -> bool {
    match value.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commented_file_parses_back_to_the_same_settings() {
        let mut config = Config {
            server: ServerSettings::default(),
            libvirt: LibvirtSettings::default(),
            api: ApiSettings::default(),
        };
        config.server.seeds = vec!["10.0.0.5:7443".into(), "grid-a.example:7443".into()];
        config.server.site = SiteLabel::new("paris").unwrap();
        config.libvirt.domain_type = DomainType::Qemu;
        config.libvirt.volume_io = VolumeIo::Streams;
        let text = config.to_commented_toml();
        assert!(text.contains("# display_listen = \"IP\""), "{text}");
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, config);
        config.libvirt.display_listen = Some("192.0.2.9".parse().unwrap());
        let text = config.to_commented_toml();
        let parsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(parsed, config);
        assert!(text.contains("# Default: \"qemu:///system\"."));
        assert!(text.contains("# advertise = \"IP:PORT\""), "{text}");

        config.server.advertise = Some("192.0.2.7:7443".parse().unwrap());
        let parsed: Config = toml::from_str(&config.to_commented_toml()).unwrap();
        assert_eq!(parsed, config);
    }

    #[test]
    fn the_api_listens_beside_the_server_unless_told_otherwise() {
        let mut config = Config {
            server: ServerSettings::default(),
            libvirt: LibvirtSettings::default(),
            api: ApiSettings::default(),
        };
        let listen = |config: &Config| config.api.listen_address(&config.server);
        assert_eq!(
            listen(&config),
            Ok(ApiListen::Auto("0.0.0.0:8443".parse().unwrap()))
        );
        // The demo's servers share 127.0.0.1 on 7443, 7444, 7445.
        for (quic, api) in [(7443, "127.0.0.1:8443"), (7444, "127.0.0.1:8444")] {
            config.server.listen = SocketAddr::from(([127, 0, 0, 1], quic));
            assert_eq!(listen(&config), Ok(ApiListen::Auto(api.parse().unwrap())));
        }
        config.api.listen = "off".to_owned();
        assert_eq!(listen(&config), Ok(ApiListen::Off));
        assert_eq!(ApiListen::Off.address(), None);
        config.api.listen = "192.0.2.5:443".to_owned();
        assert_eq!(
            listen(&config),
            Ok(ApiListen::Configured("192.0.2.5:443".parse().unwrap()))
        );
        let parsed: Config = toml::from_str(&config.to_commented_toml()).unwrap();
        assert_eq!(parsed, config);
        config.api.listen = "everywhere".to_owned();
        let error = config.validate().unwrap_err();
        assert!(error.contains("api.listen \"everywhere\""), "{error}");
        config.api.listen = "auto".to_owned();
        config.server.listen = SocketAddr::from(([127, 0, 0, 1], 65000));
        let error = config.validate().unwrap_err();
        assert!(error.contains("over 65535"), "{error}");
    }

    #[test]
    fn every_interface_needs_an_advertised_address() {
        let mut server = ServerSettings {
            listen: "0.0.0.0:7000".parse().unwrap(),
            ..ServerSettings::default()
        };
        let error = server.peer_address().unwrap_err().to_string();
        assert!(error.contains("0.0.0.0:7000"), "{error}");
        assert!(error.contains("--advertise"), "{error}");
        assert!(error.contains("server.advertise"), "{error}");
        server.listen = "[::]:7000".parse().unwrap();
        assert!(server.peer_address().is_err());

        server.advertise = Some("10.0.0.5:7000".parse().unwrap());
        assert_eq!(server.peer_address(), Ok("10.0.0.5:7000".parse().unwrap()));
        server.advertise = None;
        server.listen = "10.0.0.6:7443".parse().unwrap();
        assert_eq!(server.peer_address(), Ok(server.listen));

        let mut config = Config {
            server: ServerSettings::default(),
            libvirt: LibvirtSettings::default(),
            api: ApiSettings::default(),
        };
        config.server.advertise = Some("0.0.0.0:7443".parse().unwrap());
        let error = config.validate().unwrap_err();
        assert!(error.contains("server.advertise 0.0.0.0:7443"), "{error}");
    }

    #[test]
    fn displays_listen_where_the_hypervisor_can_bind() {
        let listen: IpAddr = "10.0.0.6".parse().unwrap();
        let mut libvirt = LibvirtSettings::default();
        assert_eq!(libvirt.spice_listen(listen), listen, "libvirt on this host");
        assert_eq!(libvirt.hypervisor_address(), None);
        libvirt.uri = "qemu+tls://10.0.0.1/system".to_owned();
        assert_eq!(
            libvirt.spice_listen(listen),
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            "an appliance VM's address is not the host's"
        );
        assert_eq!(
            libvirt.hypervisor_address(),
            Some("10.0.0.1".parse().unwrap())
        );
        libvirt.uri = "qemu+ssh://root@[2001:db8::1]:22/system".to_owned();
        assert_eq!(
            libvirt.hypervisor_address(),
            Some("2001:db8::1".parse().unwrap())
        );
        libvirt.uri = "qemu+tls://hv1.example/system".to_owned();
        assert_eq!(
            libvirt.hypervisor_address(),
            None,
            "a name is not resolved here"
        );
        libvirt.display_listen = Some("10.0.0.1".parse().unwrap());
        assert_eq!(
            libvirt.spice_listen(listen),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn an_empty_file_means_all_defaults() {
        let parsed: Config = toml::from_str("").unwrap();
        assert_eq!(parsed.libvirt.uri, "qemu:///system");
        assert_eq!(parsed.libvirt.volume_io, VolumeIo::Auto);
        assert!(!parsed.libvirt.libvirt_options().streams_only);
        assert_eq!(parsed.server.listen.port(), DEFAULT_PEER_PORT);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[server]\nlisen = \"1.2.3.4:1\"\n").unwrap();
        let error = Config::load(&path).unwrap_err();
        let message = format!("{error}: {}", std::error::Error::source(&error).unwrap());
        assert!(message.contains("config.toml is not valid"), "{message}");
        assert!(message.contains("lisen"), "{message}");

        std::fs::write(&path, "[server]\nseeds = [\"nohost\"]\n").unwrap();
        let error = Config::load(&path).unwrap_err().to_string();
        assert!(error.contains("\"nohost\" is not HOST:PORT"), "{error}");
    }
}
