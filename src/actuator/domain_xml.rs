//! libvirt XML, rendered and parsed: domains, deskgrid's metadata marker,
//! display tickets, storage pools and volumes, host capabilities.
//!
//! **Invariant:** everything here is a pure function of its arguments: no
//! libvirt calls, no I/O, no clock (a ticket's expiry is an argument).
//!
//! Rendering escapes every text and attribute value: names are validated by
//! the model, but paths, passwords and network names are not, and must never
//! be able to add XML. Parsing uses `roxmltree` (which refuses DTDs, so no
//! entity expansion) and matches deskgrid's metadata on its namespace URI,
//! never on a prefix libvirt may rewrite.
//!
//! Checked by hand against libvirt 9.0 with QEMU 7.2 (TCG): the rendered
//! domains pass `virsh define --validate` and start; a ticket from
//! [`graphics_ticket_xml`] is accepted by a live `update-device` for SPICE
//! and for VNC with a websocket; pool and volume XML create a working
//! linked clone. The libvirt output quoted in the tests comes from there.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use roxmltree::{Document, Node};

use super::hypervisor::DisplayEndpoint;
use super::mac::MacAddress;
use super::naming;
use crate::model::{
    DisplayProtocol, ImageVersionId, ModelError, Name, Template, TemplateName, VmId,
};

/// The namespace of deskgrid's domain metadata. `virDomainGetMetadata(
/// VIR_DOMAIN_METADATA_ELEMENT, DESKGRID_XMLNS)` returns the `<vm>` element
/// that [`render_domain_xml`] puts under `<metadata>`. The trailing `1` is the
/// metadata format version: a new format gets a new URI, and old appliances
/// simply do not see it.
pub const DESKGRID_XMLNS: &str = "https://deskgrid.dev/xmlns/vm/1";
/// The prefix deskgrid writes for [`DESKGRID_XMLNS`]; also the `key` for
/// `virDomainSetMetadata`. Readers match the URI, not this prefix.
pub const DESKGRID_XMLNS_PREFIX: &str = "deskgrid";
/// The virtio-serial port the guest agent listens on (DESIGN.md section 6).
pub const AGENT_CHANNEL: &str = "org.deskgrid.agent.0";
/// The port spice-vdagent listens on: clipboard, display resize and the
/// monitor layout of a multi-monitor SPICE session go through it.
const SPICE_AGENT_CHANNEL: &str = "com.redhat.spice.0";
/// USB devices a SPICE client can redirect at once: two covers a smart-card
/// reader plus one storage stick or headset, the common VDI case.
const SPICE_USB_REDIRECTIONS: usize = 2;
/// The last second `YYYY-MM-DDTHH:MM:SS` can write (9999-12-31T23:59:59 UTC).
const LAST_FOUR_DIGIT_YEAR_SECOND: u64 = 253_402_300_799;
const SECONDS_PER_DAY: u64 = 86_400;
/// VNC authentication uses 8 bytes of password (DES); libvirt 9.0 refuses a
/// longer VNC password in a definition and in a live update alike.
pub const VNC_PASSWORD_MAX_BYTES: usize = 8;

/// Why libvirt XML could not be used.
#[derive(Debug, thiserror::Error)]
pub enum XmlError {
    /// Not well-formed XML, or XML deskgrid refuses (a DTD, for instance).
    #[error("malformed XML")]
    Malformed(#[source] roxmltree::Error),
    #[error("the root element is <{found}>, expected {expected}")]
    UnexpectedRoot {
        expected: &'static str,
        found: String,
    },
    #[error("no <{element}> element")]
    MissingElement { element: &'static str },
    #[error("<{element}> has no {attribute} attribute")]
    MissingAttribute {
        element: &'static str,
        attribute: &'static str,
    },
    #[error("{location} is {value:?}, expected {expected}")]
    InvalidValue {
        location: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("{location} is not a valid name or id")]
    InvalidName {
        location: &'static str,
        #[source]
        source: ModelError,
    },
    #[error("deskgrid metadata names VM {metadata_vm} but the domain's uuid is {domain_uuid}")]
    MetadataMismatch {
        metadata_vm: VmId,
        domain_uuid: String,
    },
    #[error("a display ticket needs a non-empty password")]
    EmptyTicketPassword,
    #[error("a VNC ticket password is at most {max} bytes, this one has {len}")]
    VncPasswordTooLong { len: usize, max: usize },
    #[error("ticket expiry {unix_seconds} is after 9999-12-31T23:59:59 UTC")]
    ExpiryOutOfRange { unix_seconds: u64 },
}

/// The `<domain type=...>`: hardware virtualisation or pure emulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DomainKind {
    /// KVM: production hosts, when the host's capabilities offer it.
    Kvm,
    /// QEMU's TCG emulator: tests and hosts without usable KVM (DESIGN.md
    /// section 10).
    Qemu,
}

impl DomainKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Qemu => "qemu",
        }
    }
}

impl fmt::Display for DomainKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// Where a VM's network interface is plugged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkAttachment {
    /// No network interface at all.
    None,
    /// A libvirt virtual network (`<interface type='network'>`).
    Network(String),
    /// A host bridge (`<interface type='bridge'>`).
    Bridge(String),
    /// QEMU user-mode networking (`<interface type='user'>`): no host setup,
    /// handy for tests.
    User,
}

/// The remote display of a VM.
#[derive(Clone, PartialEq, Eq)]
pub struct DisplaySpec {
    pub protocol: DisplayProtocol,
    /// The host address QEMU listens on for display clients.
    pub listen: IpAddr,
    /// The display password at boot. Give a random secret that nobody
    /// knows: the display then stays locked until a ticket is set with
    /// [`graphics_ticket_xml`]. Never printed by `Debug`. VNC: at most
    /// [`VNC_PASSWORD_MAX_BYTES`], or libvirt refuses the definition.
    pub password: String,
    /// Video heads; rendered as at least one.
    pub monitors: u32,
    /// VNC only: also serve the display over a websocket (noVNC), on a port
    /// libvirt picks.
    pub websocket: bool,
}

impl fmt::Debug for DisplaySpec {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("DisplaySpec")
            .field("protocol", &self.protocol)
            .field("listen", &self.listen)
            .field("password", &"<redacted>")
            .field("monitors", &self.monitors)
            .field("websocket", &self.websocket)
            .finish()
    }
}

/// Everything [`render_domain_xml`] needs to define a VM's domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    pub vm: VmId,
    pub template: TemplateName,
    pub image: ImageVersionId,
    pub kind: DomainKind,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The VM's overlay volume (a qcow2 linked clone).
    pub disk_path: String,
    pub network: NetworkAttachment,
    pub mac: MacAddress,
    pub display: DisplaySpec,
    /// Where the host keeps the serial console's output, when it should.
    pub console_log: Option<String>,
}

impl DomainSpec {
    /// The domain of `vm`, a desktop of `template`, on its overlay disk at
    /// `disk_path`: vCPUs, memory, display protocol and monitors come from the
    /// template, the MAC address from the VM id.
    pub fn for_template(
        template: &Template,
        vm: VmId,
        kind: DomainKind,
        disk_path: String,
        network: NetworkAttachment,
        display_listen: IpAddr,
        display_password: String,
    ) -> Self {
        Self {
            vm,
            template: template.name.clone(),
            image: template.image.clone(),
            kind,
            vcpus: template.vcpus,
            memory_mib: template.memory_mib,
            disk_path,
            network,
            mac: super::mac::derive_mac(vm),
            display: DisplaySpec {
                protocol: template.display,
                listen: display_listen,
                password: display_password,
                monitors: template.monitors,
                websocket: template.display == DisplayProtocol::Vnc,
            },
            console_log: None,
        }
    }

    /// The marker this spec's domain carries.
    pub fn metadata(&self) -> DeskgridMetadata {
        DeskgridMetadata {
            vm: self.vm,
            template: self.template.clone(),
            image: self.image.clone(),
        }
    }
}

/// deskgrid's marker in a domain's `<metadata>`: which VM, template and base
/// image the domain is. A restarted appliance adopts its domains from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeskgridMetadata {
    pub vm: VmId,
    pub template: TemplateName,
    pub image: ImageVersionId,
}

/// The on-disk format of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VolumeFormat {
    Raw,
    Qcow2,
}

impl VolumeFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }
}

impl fmt::Display for VolumeFormat {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The domain XML for `virDomainDefineXML`.
///
/// Beyond the devices DESIGN.md asks for, SPICE domains get the
/// spice-vdagent channel (multi-monitor layout and resize need it) and every
/// domain gets a USB tablet, so the pointer follows the client's without
/// grabbing (VNC, and SPICE before its agent runs).
///
/// The disk uses `cache='writeback'`: linked clones of one base image share
/// its blocks in the host's page cache, which carries a boot storm, and
/// `cache='none'` (`O_DIRECT`) would both lose that and fail on tmpfs. Guest
/// flushes still reach the disk, so durability is the guest's as with `none`.
pub fn render_domain_xml(spec: &DomainSpec) -> String {
    let mut xml = XmlWriter::new();
    xml.open("domain", &[("type", spec.kind.as_str())]);
    xml.text("name", &[], &naming::domain_name(spec.vm));
    xml.text("uuid", &[], &spec.vm.to_string());
    xml.open("metadata", &[]);
    write_metadata(&mut xml, &spec.metadata());
    xml.close();
    xml.text("memory", &[("unit", "MiB")], &spec.memory_mib.to_string());
    xml.text("vcpu", &[("placement", "static")], &spec.vcpus.to_string());
    xml.open("os", &[]);
    xml.text("type", &[("arch", "x86_64")], "hvm");
    xml.empty("boot", &[("dev", "hd")]);
    xml.close();
    // Without ACPI a guest kernel finds no RSDP (DESIGN.md section 10).
    xml.open("features", &[]);
    xml.empty("acpi", &[]);
    xml.empty("apic", &[]);
    xml.close();
    if spec.kind == DomainKind::Kvm {
        xml.empty("cpu", &[("mode", "host-passthrough")]);
    }
    xml.text("on_poweroff", &[], "destroy");
    xml.text("on_reboot", &[], "restart");
    // A crashed desktop is powered off; the reconciler decides what next.
    xml.text("on_crash", &[], "destroy");
    xml.open("devices", &[]);
    write_disk(&mut xml, &spec.disk_path);
    write_interface(&mut xml, &spec.network, spec.mac);
    xml.empty("controller", &[("type", "virtio-serial"), ("index", "0")]);
    xml.empty(
        "controller",
        &[("type", "usb"), ("index", "0"), ("model", "qemu-xhci")],
    );
    write_channel(&mut xml, "unix", AGENT_CHANNEL, true);
    if spec.display.protocol == DisplayProtocol::Spice {
        write_channel(&mut xml, "spicevmc", SPICE_AGENT_CHANNEL, false);
    }
    write_serial_console(&mut xml, spec.console_log.as_deref());
    xml.empty("input", &[("type", "tablet"), ("bus", "usb")]);
    write_display(&mut xml, &spec.display);
    xml.empty("memballoon", &[("model", "virtio")]);
    xml.close();
    xml.close();
    xml.finish()
}

/// The bare `<deskgrid:vm>` element, as `virDomainSetMetadata(
/// VIR_DOMAIN_METADATA_ELEMENT, .., DESKGRID_XMLNS_PREFIX, DESKGRID_XMLNS)`
/// takes it.
pub fn render_metadata_xml(metadata: &DeskgridMetadata) -> String {
    let mut xml = XmlWriter::new();
    write_metadata(&mut xml, metadata);
    xml.finish()
}

fn write_metadata(xml: &mut XmlWriter, metadata: &DeskgridMetadata) {
    xml.open("deskgrid:vm", &[("xmlns:deskgrid", DESKGRID_XMLNS)]);
    xml.text("deskgrid:id", &[], &metadata.vm.to_string());
    xml.text("deskgrid:template", &[], metadata.template.as_str());
    xml.text("deskgrid:image", &[], metadata.image.as_str());
    xml.close();
}

fn write_disk(xml: &mut XmlWriter, disk_path: &str) {
    xml.open("disk", &[("type", "file"), ("device", "disk")]);
    xml.empty(
        "driver",
        &[
            ("name", "qemu"),
            ("type", "qcow2"),
            ("cache", "writeback"),
            // Guest TRIM shrinks the overlay instead of leaving it at its peak.
            ("discard", "unmap"),
        ],
    );
    xml.empty("source", &[("file", disk_path)]);
    xml.empty("target", &[("dev", "vda"), ("bus", "virtio")]);
    xml.close();
}

fn write_interface(xml: &mut XmlWriter, network: &NetworkAttachment, mac: MacAddress) {
    let (interface_type, source) = match network {
        NetworkAttachment::None => return,
        NetworkAttachment::Network(name) => ("network", Some(("network", name.as_str()))),
        NetworkAttachment::Bridge(name) => ("bridge", Some(("bridge", name.as_str()))),
        NetworkAttachment::User => ("user", None),
    };
    xml.open("interface", &[("type", interface_type)]);
    xml.empty("mac", &[("address", &mac.to_string())]);
    if let Some(source) = source {
        xml.empty("source", &[source]);
    }
    xml.empty("model", &[("type", "virtio")]);
    xml.close();
}

/// A virtio-serial port named `name`; `bind` gives it a unix socket whose
/// path libvirt chooses (`virDomainOpenChannel` reaches it).
fn write_channel(xml: &mut XmlWriter, channel_type: &str, name: &str, bind: bool) {
    xml.open("channel", &[("type", channel_type)]);
    if bind {
        xml.empty("source", &[("mode", "bind")]);
    }
    xml.empty("target", &[("type", "virtio"), ("name", name)]);
    xml.close();
}

fn write_serial_console(xml: &mut XmlWriter, console_log: Option<&str>) {
    xml.open("serial", &[("type", "pty")]);
    if let Some(path) = console_log {
        // Each boot starts a fresh log: the file shows this boot only.
        xml.empty("log", &[("file", path), ("append", "off")]);
    }
    xml.empty("target", &[("port", "0")]);
    xml.close();
    xml.open("console", &[("type", "pty")]);
    xml.empty("target", &[("type", "serial"), ("port", "0")]);
    xml.close();
}

fn write_display(xml: &mut XmlWriter, display: &DisplaySpec) {
    let listen = display.listen.to_string();
    let heads = display.monitors.max(1).to_string();
    let (graphics_type, video_model) = match display.protocol {
        // QXL is SPICE's own device; VNC gains nothing from it.
        DisplayProtocol::Spice => ("spice", "qxl"),
        DisplayProtocol::Vnc => ("vnc", "virtio"),
    };
    let mut attributes = vec![("type", graphics_type), ("autoport", "yes")];
    if display.protocol == DisplayProtocol::Vnc && display.websocket {
        attributes.push(("websocket", "-1"));
    }
    attributes.push(("passwd", display.password.as_str()));
    xml.open("graphics", &attributes);
    xml.empty("listen", &[("type", "address"), ("address", &listen)]);
    xml.close();
    xml.open("video", &[]);
    xml.empty(
        "model",
        &[("type", video_model), ("heads", &heads), ("primary", "yes")],
    );
    xml.close();
    if display.protocol == DisplayProtocol::Spice {
        for _ in 0..SPICE_USB_REDIRECTIONS {
            xml.empty("redirdev", &[("bus", "usb"), ("type", "spicevmc")]);
        }
    }
}

/// Reads deskgrid's marker back, from either a full domain XML (`dumpxml`)
/// or the bare element `virDomainGetMetadata` returns. `Ok(None)`: a domain
/// without deskgrid metadata (not deskgrid's).
///
/// In a full domain XML the element is found by its namespace URI, whatever
/// prefix libvirt wrote. `virDomainGetMetadata(VIR_DOMAIN_METADATA_ELEMENT,
/// DESKGRID_XMLNS)` has already selected by URI and returns the element with
/// its namespace stripped (`<vm><id>…</id>…</vm>`, seen with libvirt 9.0), so
/// a root `<vm>` is accepted in deskgrid's namespace or in none.
///
/// In a full domain XML the metadata's VM id must equal the domain's
/// `<uuid>`: a domain that claims another VM's identity is refused.
pub fn parse_metadata(domain_xml: &str) -> Result<Option<DeskgridMetadata>, XmlError> {
    let document = parse_document(domain_xml)?;
    let root = document.root_element();
    if is_deskgrid_vm(root) || is_plain(root, "vm") {
        return read_metadata(root).map(Some);
    }
    if !is_plain(root, "domain") {
        return Err(unexpected_root(root, "<domain> or deskgrid's <vm>"));
    }
    let Some(vm_element) = child(root, "metadata")
        .and_then(|metadata| metadata.children().find(|node| is_deskgrid_vm(*node)))
    else {
        return Ok(None);
    };
    let metadata = read_metadata(vm_element)?;
    if let Some(uuid) = child(root, "uuid") {
        let domain_uuid = text_of(uuid);
        if domain_uuid.parse::<VmId>().ok() != Some(metadata.vm) {
            return Err(XmlError::MetadataMismatch {
                metadata_vm: metadata.vm,
                domain_uuid: domain_uuid.to_owned(),
            });
        }
    }
    Ok(Some(metadata))
}

fn is_deskgrid_vm(node: Node<'_, '_>) -> bool {
    node.is_element()
        && node.tag_name().namespace() == Some(DESKGRID_XMLNS)
        && node.tag_name().name() == "vm"
}

/// The fields of a `<vm>` marker: its children in its own namespace.
fn read_metadata(vm_element: Node<'_, '_>) -> Result<DeskgridMetadata, XmlError> {
    let namespace = vm_element.tag_name().namespace();
    let field = |name: &str, element: &'static str| {
        vm_element
            .children()
            .find(|node| {
                node.is_element()
                    && node.tag_name().namespace() == namespace
                    && node.tag_name().name() == name
            })
            .map(text_of)
            .ok_or(XmlError::MissingElement { element })
    };
    let invalid = |location| move |source| XmlError::InvalidName { location, source };
    Ok(DeskgridMetadata {
        vm: field("id", "deskgrid:id")?
            .parse()
            .map_err(invalid("deskgrid:id"))?,
        template: TemplateName::new(field("template", "deskgrid:template")?)
            .map_err(invalid("deskgrid:template"))?,
        image: ImageVersionId::new(field("image", "deskgrid:image")?)
            .map_err(invalid("deskgrid:image"))?,
    })
}

/// The `<graphics>` element for `virDomainUpdateDeviceFlags(..,
/// VIR_DOMAIN_AFFECT_LIVE)` that sets a display ticket: `password`, valid
/// until `valid_until_unix_seconds` (written as UTC, as libvirt reads it).
///
/// libvirt refuses a live graphics update that changes anything but the
/// password, so the element repeats the live one's attributes (type, the
/// live `port`, autoport, tlsPort, websocket, keymap, ...) and its
/// `<listen>` children; only `passwd` and `passwdValidTo` are replaced. The
/// first `<graphics>` of the domain is the one deskgrid rendered.
pub fn graphics_ticket_xml(
    live_domain_xml: &str,
    password: &str,
    valid_until_unix_seconds: u64,
) -> Result<String, XmlError> {
    if password.is_empty() {
        return Err(XmlError::EmptyTicketPassword);
    }
    let valid_to = format_utc(valid_until_unix_seconds)?;
    let document = parse_document(live_domain_xml)?;
    let graphics = first_graphics(&document)?;
    let graphics_type = graphics
        .attribute("type")
        .ok_or(XmlError::MissingAttribute {
            element: "graphics",
            attribute: "type",
        })?;
    if display_protocol(graphics_type)? == DisplayProtocol::Vnc
        && password.len() > VNC_PASSWORD_MAX_BYTES
    {
        return Err(XmlError::VncPasswordTooLong {
            len: password.len(),
            max: VNC_PASSWORD_MAX_BYTES,
        });
    }
    let mut attributes = vec![("type", graphics_type)];
    for attribute in graphics.attributes() {
        let name = attribute.name();
        let replaced = matches!(name, "type" | "passwd" | "passwdValidTo");
        if attribute.namespace().is_none() && !replaced {
            attributes.push((name, attribute.value()));
        }
    }
    attributes.push(("passwd", password));
    attributes.push(("passwdValidTo", &valid_to));
    let listens: Vec<Vec<(&str, &str)>> = children(graphics, "listen")
        .map(|listen| {
            listen
                .attributes()
                .filter(|attribute| attribute.namespace().is_none())
                .map(|attribute| (attribute.name(), attribute.value()))
                .collect()
        })
        .collect();
    let mut xml = XmlWriter::new();
    if listens.is_empty() {
        xml.empty("graphics", &attributes);
    } else {
        xml.open("graphics", &attributes);
        for listen in &listens {
            xml.empty("listen", listen);
        }
        xml.close();
    }
    Ok(xml.finish())
}

/// Where a running domain's display listens, from its live XML: the
/// protocol, the listen address (as QEMU binds it: `0.0.0.0` means every
/// host address), the port libvirt allocated and, for VNC, the websocket
/// port.
pub fn parse_display_endpoint(live_domain_xml: &str) -> Result<DisplayEndpoint, XmlError> {
    let document = parse_document(live_domain_xml)?;
    let graphics = first_graphics(&document)?;
    let protocol = display_protocol(graphics.attribute("type").ok_or(
        XmlError::MissingAttribute {
            element: "graphics",
            attribute: "type",
        },
    )?)?;
    let listen = children(graphics, "listen")
        .find_map(|listen| listen.attribute("address"))
        .or_else(|| graphics.attribute("listen"))
        .ok_or(XmlError::MissingAttribute {
            element: "graphics/listen",
            attribute: "address",
        })?;
    let port = graphics
        .attribute("port")
        .ok_or(XmlError::MissingAttribute {
            element: "graphics",
            attribute: "port",
        })?;
    let port = match allocated_port(port) {
        Some(port) => port,
        None => {
            return Err(XmlError::InvalidValue {
                location: "graphics port",
                value: port.to_owned(),
                expected: "a port from 1 to 65535 (is the domain running?)",
            })
        }
    };
    let websocket_port = match graphics.attribute("websocket") {
        None => None,
        Some(value) => match value.parse::<i64>() {
            // -1: asked for but not allocated (the domain is not running).
            Ok(-1 | 0) => None,
            _ => Some(allocated_port(value).ok_or(XmlError::InvalidValue {
                location: "graphics websocket",
                value: value.to_owned(),
                expected: "a port from 1 to 65535",
            })?),
        },
    };
    Ok(DisplayEndpoint {
        protocol,
        listen: listen.to_owned(),
        port,
        websocket_port,
    })
}

fn allocated_port(value: &str) -> Option<u16> {
    value.parse::<u16>().ok().filter(|port| *port > 0)
}

fn first_graphics<'a, 'input>(
    document: &'a Document<'input>,
) -> Result<Node<'a, 'input>, XmlError> {
    let root = document.root_element();
    if !is_plain(root, "domain") {
        return Err(unexpected_root(root, "<domain>"));
    }
    child(root, "devices")
        .and_then(|devices| child(devices, "graphics"))
        .ok_or(XmlError::MissingElement {
            element: "devices/graphics",
        })
}

fn display_protocol(graphics_type: &str) -> Result<DisplayProtocol, XmlError> {
    match graphics_type {
        "spice" => Ok(DisplayProtocol::Spice),
        "vnc" => Ok(DisplayProtocol::Vnc),
        other => Err(XmlError::InvalidValue {
            location: "graphics type",
            value: other.to_owned(),
            expected: "spice or vnc",
        }),
    }
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC, the form libvirt reads in `passwdValidTo`.
fn format_utc(unix_seconds: u64) -> Result<String, XmlError> {
    if unix_seconds > LAST_FOUR_DIGIT_YEAR_SECOND {
        return Err(XmlError::ExpiryOutOfRange { unix_seconds });
    }
    let (year, month, day) = civil_from_days(unix_seconds / SECONDS_PER_DAY);
    let second_of_day = unix_seconds % SECONDS_PER_DAY;
    Ok(format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60
    ))
}

/// The proleptic Gregorian (year, month, day) of `days` after 1970-01-01.
///
/// Howard Hinnant's `civil_from_days`
/// (<https://howardhinnant.github.io/date_algorithms.html>), restricted to
/// days on or after the epoch so all arithmetic is unsigned. It counts from
/// 0000-03-01 so the leap day is the last day of its year, then splits into
/// 400-year eras of 146,097 days, in which the Gregorian pattern repeats.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Days from 0000-03-01 to 1970-01-01.
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    // 0..=146_096
    let day_of_era = shifted - era * 146_097;
    // 0..=399: the corrections undo the leap days (every 4th year, not every
    // 100th, every 400th) so that dividing by 365 lands on the right year.
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    // 0..=365, counted from March 1.
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // 0..=11, March first: months from March have a 153-day, 5-month cycle.
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

/// A `dir` storage pool at `target_path`.
pub fn render_pool_xml(name: &str, target_path: &str) -> String {
    let mut xml = XmlWriter::new();
    xml.open("pool", &[("type", "dir")]);
    xml.text("name", &[], name);
    xml.open("target", &[]);
    xml.text("path", &[], target_path);
    xml.close();
    xml.close();
    xml.finish()
}

/// The directory of a storage pool, from its XML.
pub fn parse_pool_path(pool_xml: &str) -> Result<String, XmlError> {
    let document = parse_document(pool_xml)?;
    let root = document.root_element();
    if !is_plain(root, "pool") {
        return Err(unexpected_root(root, "<pool>"));
    }
    child(root, "target")
        .and_then(|target| child(target, "path"))
        .map(|path| text_of(path).to_owned())
        .ok_or(XmlError::MissingElement {
            element: "pool/target/path",
        })
}

/// The type of a storage pool (`dir`, `logical`, ...), from its XML.
pub fn parse_pool_type(pool_xml: &str) -> Result<String, XmlError> {
    let document = parse_document(pool_xml)?;
    let root = document.root_element();
    if !is_plain(root, "pool") {
        return Err(unexpected_root(root, "<pool>"));
    }
    root.attribute("type")
        .map(str::to_owned)
        .ok_or(XmlError::MissingAttribute {
            element: "pool",
            attribute: "type",
        })
}

/// An empty base image volume of `capacity_bytes`, allocated sparsely.
pub fn render_base_volume_xml(name: &str, capacity_bytes: u64, format: VolumeFormat) -> String {
    let mut xml = XmlWriter::new();
    write_volume_start(&mut xml, name, capacity_bytes, format);
    xml.close();
    xml.finish()
}

/// A qcow2 overlay on `backing_path` (a linked clone): reads fall through to
/// the base image, writes stay in the overlay. The backing format is written
/// out so QEMU never probes it.
pub fn render_overlay_volume_xml(
    name: &str,
    capacity_bytes: u64,
    backing_path: &str,
    backing_format: VolumeFormat,
) -> String {
    let mut xml = XmlWriter::new();
    write_volume_start(&mut xml, name, capacity_bytes, VolumeFormat::Qcow2);
    xml.open("backingStore", &[]);
    xml.text("path", &[], backing_path);
    xml.empty("format", &[("type", backing_format.as_str())]);
    xml.close();
    xml.close();
    xml.finish()
}

fn write_volume_start(xml: &mut XmlWriter, name: &str, capacity_bytes: u64, format: VolumeFormat) {
    xml.open("volume", &[]);
    xml.text("name", &[], name);
    xml.text(
        "capacity",
        &[("unit", "bytes")],
        &capacity_bytes.to_string(),
    );
    // Sparse: space is taken as data arrives, not up front.
    xml.text("allocation", &[("unit", "bytes")], "0");
    xml.open("target", &[]);
    xml.empty("format", &[("type", format.as_str())]);
    if format == VolumeFormat::Qcow2 {
        // libvirt writes qcow2 version 2 (compat 0.10) unless told otherwise;
        // version 3 has zero clusters, without which a guest's TRIM cannot
        // free an overlay's clusters above a backing file.
        xml.text("compat", &[], "1.1");
    }
    xml.close();
}

/// The format of a volume, from its XML (`<target><format type=...>`).
pub fn parse_volume_format(volume_xml: &str) -> Result<VolumeFormat, XmlError> {
    let document = parse_document(volume_xml)?;
    let root = document.root_element();
    if !is_plain(root, "volume") {
        return Err(unexpected_root(root, "<volume>"));
    }
    let format = child(root, "target")
        .and_then(|target| child(target, "format"))
        .ok_or(XmlError::MissingElement {
            element: "volume/target/format",
        })?;
    match format.attribute("type") {
        Some("raw") => Ok(VolumeFormat::Raw),
        Some("qcow2") => Ok(VolumeFormat::Qcow2),
        Some(other) => Err(XmlError::InvalidValue {
            location: "volume format",
            value: other.to_owned(),
            expected: "raw or qcow2",
        }),
        None => Err(XmlError::MissingAttribute {
            element: "volume/target/format",
            attribute: "type",
        }),
    }
}

/// The domain types the host offers for x86_64 `hvm` guests, from
/// `virConnectGetCapabilities`, in deskgrid's order of preference (KVM
/// first); types deskgrid does not use (xen, ...) are left out.
pub fn parse_domain_kinds(capabilities_xml: &str) -> Result<Vec<DomainKind>, XmlError> {
    let document = parse_document(capabilities_xml)?;
    let root = document.root_element();
    if !is_plain(root, "capabilities") {
        return Err(unexpected_root(root, "<capabilities>"));
    }
    let mut kinds = BTreeSet::new();
    for guest in children(root, "guest") {
        if child(guest, "os_type").map(text_of) != Some("hvm") {
            continue;
        }
        for arch in children(guest, "arch").filter(|arch| arch.attribute("name") == Some("x86_64"))
        {
            for domain in children(arch, "domain") {
                let kind = match domain.attribute("type") {
                    Some("kvm") => DomainKind::Kvm,
                    Some("qemu") => DomainKind::Qemu,
                    _ => continue,
                };
                kinds.insert(kind);
            }
        }
    }
    Ok(kinds.into_iter().collect())
}

fn parse_document(xml: &str) -> Result<Document<'_>, XmlError> {
    Document::parse(xml).map_err(XmlError::Malformed)
}

/// An element named `name` in no namespace (libvirt's own elements).
fn is_plain(node: Node<'_, '_>, name: &str) -> bool {
    node.is_element() && node.tag_name().namespace().is_none() && node.tag_name().name() == name
}

fn child<'a, 'input>(node: Node<'a, 'input>, name: &str) -> Option<Node<'a, 'input>> {
    node.children().find(|child| is_plain(*child, name))
}

fn children<'a, 'input: 'a>(
    node: Node<'a, 'input>,
    name: &'static str,
) -> impl Iterator<Item = Node<'a, 'input>> {
    node.children().filter(move |child| is_plain(*child, name))
}

/// An element's text, without the indentation a pretty-printer may add.
fn text_of<'a>(node: Node<'a, '_>) -> &'a str {
    node.text().unwrap_or("").trim()
}

fn unexpected_root(root: Node<'_, '_>, expected: &'static str) -> XmlError {
    XmlError::UnexpectedRoot {
        expected,
        found: root.tag_name().name().to_owned(),
    }
}

/// Text for an attribute value or element content: XML's five special
/// characters as entities, and tab, newline and carriage return as character
/// references so a parser's whitespace normalisation cannot change them.
fn escape(value: &str) -> Cow<'_, str> {
    let escaped = quick_xml::escape::escape(value);
    if !escaped.contains(['\t', '\n', '\r']) {
        return escaped;
    }
    let mut out = String::with_capacity(escaped.len() + 8);
    for character in escaped.chars() {
        match character {
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            other => out.push(other),
        }
    }
    Cow::Owned(out)
}

/// A small indenting XML writer. Attributes are single-quoted, as libvirt
/// writes them; every value goes through [`escape`]; element names are
/// deskgrid's own constants. Elements close in order from a stack, so the
/// output is always well-formed.
#[derive(Debug)]
struct XmlWriter {
    out: String,
    open_elements: Vec<&'static str>,
}

impl XmlWriter {
    fn new() -> Self {
        Self {
            out: String::new(),
            open_elements: Vec::new(),
        }
    }

    fn open(&mut self, name: &'static str, attributes: &[(&str, &str)]) {
        self.start_tag(name, attributes);
        self.out.push_str(">\n");
        self.open_elements.push(name);
    }

    fn empty(&mut self, name: &'static str, attributes: &[(&str, &str)]) {
        self.start_tag(name, attributes);
        self.out.push_str("/>\n");
    }

    fn text(&mut self, name: &'static str, attributes: &[(&str, &str)], text: &str) {
        self.start_tag(name, attributes);
        self.out.push('>');
        self.out.push_str(&escape(text));
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push_str(">\n");
    }

    fn close(&mut self) {
        if let Some(name) = self.open_elements.pop() {
            self.indent();
            self.out.push_str("</");
            self.out.push_str(name);
            self.out.push_str(">\n");
        }
    }

    fn finish(mut self) -> String {
        while !self.open_elements.is_empty() {
            self.close();
        }
        self.out
    }

    fn start_tag(&mut self, name: &str, attributes: &[(&str, &str)]) {
        self.indent();
        self.out.push('<');
        self.out.push_str(name);
        for (key, value) in attributes {
            self.out.push(' ');
            self.out.push_str(key);
            self.out.push_str("='");
            self.out.push_str(&escape(value));
            self.out.push('\'');
        }
    }

    fn indent(&mut self) {
        for _ in 0..self.open_elements.len() {
            self.out.push_str("  ");
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::actuator::mac::derive_mac;

    const VM: &str = "01234567-89ab-cdef-0123-456789abcdef";
    const DISK: &str = "/var/lib/deskgrid/pool/dg-vm-0123456789abcdef0123456789abcdef.qcow2";
    const CONSOLE_LOG: &str =
        "/var/log/deskgrid/console/dg-vm-0123456789abcdef0123456789abcdef.log";

    fn sample_spec(protocol: DisplayProtocol, kind: DomainKind) -> DomainSpec {
        let vm: VmId = VM.parse().unwrap();
        DomainSpec {
            vm,
            template: TemplateName::new("office").unwrap(),
            image: ImageVersionId::new("win11-2026.11").unwrap(),
            kind,
            vcpus: 2,
            memory_mib: 4096,
            disk_path: DISK.to_owned(),
            network: NetworkAttachment::Network("default".to_owned()),
            mac: derive_mac(vm),
            display: DisplaySpec {
                protocol,
                listen: "127.0.0.1".parse().unwrap(),
                password: "locked-until-ticket".to_owned(),
                monitors: 2,
                websocket: true,
            },
            console_log: Some(CONSOLE_LOG.to_owned()),
        }
    }

    /// The first element along `path` (`devices/disk/source`), or a panic
    /// naming the path.
    fn at<'a, 'input>(node: Node<'a, 'input>, path: &str) -> Node<'a, 'input> {
        path.split('/').fold(node, |node, step| {
            child(node, step).unwrap_or_else(|| panic!("no <{step}> on the way to {path}"))
        })
    }

    fn all<'a, 'input>(node: Node<'a, 'input>, name: &'static str) -> Vec<Node<'a, 'input>> {
        children(node, name).collect()
    }

    fn attr<'a>(node: Node<'a, '_>, name: &str) -> &'a str {
        node.attribute(name)
            .unwrap_or_else(|| panic!("<{}> has no {name}", node.tag_name().name()))
    }

    /// The child of `devices` of type `kind` whose `type` attribute is `type_`.
    fn device<'a, 'input>(
        devices: Node<'a, 'input>,
        kind: &'static str,
        type_: &str,
    ) -> Node<'a, 'input> {
        children(devices, kind)
            .find(|node| node.attribute("type") == Some(type_))
            .unwrap_or_else(|| panic!("no <{kind} type='{type_}'>"))
    }

    #[test]
    fn spice_domain_has_every_element() {
        let spec = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm);
        let xml = render_domain_xml(&spec);
        let document = Document::parse(&xml).unwrap();
        let domain = document.root_element();

        assert!(is_plain(domain, "domain"));
        assert_eq!(attr(domain, "type"), "kvm");
        assert_eq!(
            text_of(at(domain, "name")),
            "dg-vm-0123456789abcdef0123456789abcdef"
        );
        assert_eq!(text_of(at(domain, "uuid")), VM);
        assert_eq!(attr(at(domain, "memory"), "unit"), "MiB");
        assert_eq!(text_of(at(domain, "memory")), "4096");
        assert_eq!(text_of(at(domain, "vcpu")), "2");
        assert_eq!(attr(at(domain, "os/type"), "arch"), "x86_64");
        assert_eq!(text_of(at(domain, "os/type")), "hvm");
        assert_eq!(attr(at(domain, "os/boot"), "dev"), "hd");
        at(domain, "features/acpi");
        at(domain, "features/apic");
        assert_eq!(attr(at(domain, "cpu"), "mode"), "host-passthrough");
        assert_eq!(text_of(at(domain, "on_poweroff")), "destroy");
        assert_eq!(text_of(at(domain, "on_reboot")), "restart");
        assert_eq!(text_of(at(domain, "on_crash")), "destroy");

        let devices = at(domain, "devices");
        let disk = at(devices, "disk");
        assert_eq!((attr(disk, "type"), attr(disk, "device")), ("file", "disk"));
        assert_eq!(attr(at(disk, "driver"), "name"), "qemu");
        assert_eq!(attr(at(disk, "driver"), "type"), "qcow2");
        assert_eq!(attr(at(disk, "source"), "file"), DISK);
        assert_eq!(attr(at(disk, "target"), "dev"), "vda");
        assert_eq!(attr(at(disk, "target"), "bus"), "virtio");

        let interface = at(devices, "interface");
        assert_eq!(attr(interface, "type"), "network");
        assert_eq!(attr(at(interface, "mac"), "address"), spec.mac.to_string());
        assert_eq!(attr(at(interface, "source"), "network"), "default");
        assert_eq!(attr(at(interface, "model"), "type"), "virtio");

        device(devices, "controller", "virtio-serial");
        assert_eq!(
            attr(device(devices, "controller", "usb"), "model"),
            "qemu-xhci"
        );
        let agent = device(devices, "channel", "unix");
        assert_eq!(attr(at(agent, "source"), "mode"), "bind");
        assert_eq!(attr(at(agent, "target"), "type"), "virtio");
        assert_eq!(attr(at(agent, "target"), "name"), "org.deskgrid.agent.0");
        let vdagent = device(devices, "channel", "spicevmc");
        assert_eq!(attr(at(vdagent, "target"), "name"), "com.redhat.spice.0");

        let graphics = at(devices, "graphics");
        assert_eq!(attr(graphics, "type"), "spice");
        assert_eq!(attr(graphics, "autoport"), "yes");
        assert_eq!(attr(graphics, "passwd"), "locked-until-ticket");
        assert_eq!(
            graphics.attribute("websocket"),
            None,
            "websocket is VNC only"
        );
        assert_eq!(attr(at(graphics, "listen"), "type"), "address");
        assert_eq!(attr(at(graphics, "listen"), "address"), "127.0.0.1");
        assert_eq!(all(devices, "graphics").len(), 1);
        let video = at(devices, "video/model");
        assert_eq!(attr(video, "type"), "qxl");
        assert_eq!(attr(video, "heads"), "2");

        let redirdevs = all(devices, "redirdev");
        assert_eq!(redirdevs.len(), 2);
        for redirdev in redirdevs {
            assert_eq!(
                (attr(redirdev, "bus"), attr(redirdev, "type")),
                ("usb", "spicevmc")
            );
        }
        assert_eq!(attr(device(devices, "input", "tablet"), "bus"), "usb");

        let serial = device(devices, "serial", "pty");
        assert_eq!(attr(at(serial, "log"), "file"), CONSOLE_LOG);
        assert_eq!(attr(at(serial, "log"), "append"), "off");
        assert_eq!(attr(at(serial, "target"), "port"), "0");
        let console = device(devices, "console", "pty");
        assert_eq!(attr(at(console, "target"), "type"), "serial");
        assert_eq!(attr(at(devices, "memballoon"), "model"), "virtio");

        // The marker is where virDomainGetMetadata(ELEMENT, DESKGRID_XMLNS) looks:
        // a child of <metadata> in deskgrid's namespace, written with the
        // prefix that is also the key for virDomainSetMetadata.
        let marker = at(domain, "metadata").first_element_child().unwrap();
        assert_eq!(marker.tag_name().namespace(), Some(DESKGRID_XMLNS));
        assert_eq!(marker.tag_name().name(), "vm");
        assert_eq!(
            marker.lookup_prefix(DESKGRID_XMLNS),
            Some(DESKGRID_XMLNS_PREFIX)
        );
        assert_eq!(parse_metadata(&xml).unwrap(), Some(spec.metadata()));
    }

    #[test]
    fn vnc_domain_has_every_element() {
        let mut spec = sample_spec(DisplayProtocol::Vnc, DomainKind::Qemu);
        spec.display.monitors = 1;
        spec.display.listen = "::1".parse().unwrap();
        spec.console_log = None;
        spec.network = NetworkAttachment::User;
        let xml = render_domain_xml(&spec);
        let document = Document::parse(&xml).unwrap();
        let domain = document.root_element();

        assert_eq!(attr(domain, "type"), "qemu");
        assert!(
            child(domain, "cpu").is_none(),
            "host-passthrough is for KVM only"
        );
        at(domain, "features/acpi");
        at(domain, "features/apic");
        let devices = at(domain, "devices");
        let graphics = at(devices, "graphics");
        assert_eq!(attr(graphics, "type"), "vnc");
        assert_eq!(attr(graphics, "autoport"), "yes");
        assert_eq!(attr(graphics, "websocket"), "-1");
        assert_eq!(attr(graphics, "passwd"), "locked-until-ticket");
        assert_eq!(attr(at(graphics, "listen"), "address"), "::1");
        let video = at(devices, "video/model");
        assert_eq!(attr(video, "type"), "virtio");
        assert_eq!(attr(video, "heads"), "1");
        assert!(
            all(devices, "redirdev").is_empty(),
            "USB redirection is SPICE only"
        );
        assert!(children(devices, "channel")
            .all(|channel| channel.attribute("type") != Some("spicevmc")));
        assert_eq!(
            attr(at(device(devices, "channel", "unix"), "target"), "name"),
            AGENT_CHANNEL
        );
        device(devices, "controller", "virtio-serial");
        let interface = at(devices, "interface");
        assert_eq!(attr(interface, "type"), "user");
        assert!(child(interface, "source").is_none());
        assert_eq!(attr(at(interface, "mac"), "address"), spec.mac.to_string());
        assert!(child(device(devices, "serial", "pty"), "log").is_none());
        device(devices, "console", "pty");
        assert_eq!(parse_metadata(&xml).unwrap(), Some(spec.metadata()));

        spec.display.websocket = false;
        let xml = render_domain_xml(&spec);
        let document = Document::parse(&xml).unwrap();
        assert_eq!(
            at(document.root_element(), "devices/graphics").attribute("websocket"),
            None
        );
    }

    #[test]
    fn network_attachments() {
        let mut spec = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm);
        spec.network = NetworkAttachment::Bridge("br0".to_owned());
        let xml = render_domain_xml(&spec);
        let document = Document::parse(&xml).unwrap();
        let interface = at(document.root_element(), "devices/interface");
        assert_eq!(attr(interface, "type"), "bridge");
        assert_eq!(attr(at(interface, "source"), "bridge"), "br0");

        spec.network = NetworkAttachment::None;
        let xml = render_domain_xml(&spec);
        let document = Document::parse(&xml).unwrap();
        assert!(child(at(document.root_element(), "devices"), "interface").is_none());
    }

    #[test]
    fn monitors_render_as_at_least_one_head() {
        let mut spec = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm);
        spec.display.monitors = 0;
        let xml = render_domain_xml(&spec);
        let document = Document::parse(&xml).unwrap();
        assert_eq!(
            attr(at(document.root_element(), "devices/video/model"), "heads"),
            "1"
        );
    }

    #[test]
    fn unvalidated_values_are_escaped() {
        let hostile = "pa'ss\"<w>&rd</graphics><evil/>";
        let mut spec = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm);
        spec.display.password = hostile.to_owned();
        spec.disk_path = "/pool/it's <here> & \"there\".qcow2".to_owned();
        spec.network = NetworkAttachment::Network("net'<&>\"".to_owned());
        spec.console_log = Some("/logs/line\nbreak\ttab\rreturn.log".to_owned());
        let xml = render_domain_xml(&spec);
        assert!(!xml.contains("<evil"), "{xml}");
        let document = Document::parse(&xml).unwrap();
        let devices = at(document.root_element(), "devices");
        assert_eq!(attr(at(devices, "graphics"), "passwd"), hostile);
        assert_eq!(attr(at(devices, "disk/source"), "file"), spec.disk_path);
        assert_eq!(
            attr(at(devices, "interface/source"), "network"),
            "net'<&>\""
        );
        assert_eq!(
            attr(at(devices, "serial/log"), "file"),
            "/logs/line\nbreak\ttab\rreturn.log",
            "whitespace survives attribute normalisation"
        );
        assert_eq!(all(devices, "graphics").len(), 1);

        let pool = render_pool_xml("pool<&>", "/srv/it's here");
        assert_eq!(parse_pool_path(&pool).unwrap(), "/srv/it's here");
        let overlay = render_overlay_volume_xml("v", 1, "/srv/a'<b>&c", VolumeFormat::Raw);
        let document = Document::parse(&overlay).unwrap();
        assert_eq!(
            text_of(at(document.root_element(), "backingStore/path")),
            "/srv/a'<b>&c"
        );
    }

    #[test]
    fn the_password_stays_out_of_debug_output() {
        let spec = sample_spec(DisplayProtocol::Vnc, DomainKind::Kvm);
        let debug = format!("{spec:?}");
        assert!(!debug.contains("locked-until-ticket"), "{debug}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }

    /// A snapshot of the whole document: any change to what deskgrid asks
    /// libvirt for shows up here, on purpose.
    #[test]
    fn spice_domain_snapshot() {
        let spec = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm);
        let expected = "\
<domain type='kvm'>
  <name>dg-vm-0123456789abcdef0123456789abcdef</name>
  <uuid>01234567-89ab-cdef-0123-456789abcdef</uuid>
  <metadata>
    <deskgrid:vm xmlns:deskgrid='https://deskgrid.dev/xmlns/vm/1'>
      <deskgrid:id>01234567-89ab-cdef-0123-456789abcdef</deskgrid:id>
      <deskgrid:template>office</deskgrid:template>
      <deskgrid:image>win11-2026.11</deskgrid:image>
    </deskgrid:vm>
  </metadata>
  <memory unit='MiB'>4096</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='host-passthrough'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback' discard='unmap'/>
      <source file='/var/lib/deskgrid/pool/dg-vm-0123456789abcdef0123456789abcdef.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='network'>
      <mac address='7a:8a:ea:4c:c9:5c'/>
      <source network='default'/>
      <model type='virtio'/>
    </interface>
    <controller type='virtio-serial' index='0'/>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='org.deskgrid.agent.0'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='com.redhat.spice.0'/>
    </channel>
    <serial type='pty'>
      <log file='/var/log/deskgrid/console/dg-vm-0123456789abcdef0123456789abcdef.log' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <input type='tablet' bus='usb'/>
    <graphics type='spice' autoport='yes' passwd='locked-until-ticket'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <video>
      <model type='qxl' heads='2' primary='yes'/>
    </video>
    <redirdev bus='usb' type='spicevmc'/>
    <redirdev bus='usb' type='spicevmc'/>
    <memballoon model='virtio'/>
  </devices>
</domain>
";
        assert_eq!(render_domain_xml(&spec), expected);
    }

    #[test]
    fn metadata_element_round_trips_alone() {
        let metadata = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm).metadata();
        let xml = render_metadata_xml(&metadata);
        assert!(
            xml.starts_with("<deskgrid:vm xmlns:deskgrid='https://deskgrid.dev/xmlns/vm/1'>"),
            "{xml}"
        );
        assert_eq!(parse_metadata(&xml).unwrap(), Some(metadata));
    }

    #[test]
    fn metadata_as_libvirt_get_metadata_returns_it() {
        // `virsh metadata DOMAIN https://deskgrid.dev/xmlns/vm/1` on libvirt
        // 9.0 for a domain defined from `render_domain_xml`: the namespace
        // is stripped.
        let stripped = format!(
            "<vm>\n  <id>{VM}</id>\n  <template>office</template>\n  <image>win11-2026.11</image>\n</vm>\n"
        );
        let expected = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm).metadata();
        assert_eq!(parse_metadata(&stripped).unwrap(), Some(expected));
        // Children from another namespace are not deskgrid's fields.
        let mixed = format!(
            "<vm xmlns:x='urn:other'><x:id>{VM}</x:id><template>t</template><image>i</image></vm>"
        );
        assert!(matches!(
            parse_metadata(&mixed),
            Err(XmlError::MissingElement {
                element: "deskgrid:id"
            })
        ));
    }

    #[test]
    fn metadata_is_found_by_namespace_whatever_the_prefix() {
        let expected = sample_spec(DisplayProtocol::Spice, DomainKind::Kvm).metadata();
        let renamed = format!(
            "<ns0:vm xmlns:ns0='{DESKGRID_XMLNS}'>\n  <ns0:id>{VM}</ns0:id>\n  \
             <ns0:template>office</ns0:template>\n  <ns0:image>win11-2026.11</ns0:image>\n</ns0:vm>\n"
        );
        assert_eq!(parse_metadata(&renamed).unwrap(), Some(expected.clone()));

        let default_namespace = format!(
            "<vm xmlns=\"{DESKGRID_XMLNS}\"><id> {VM} </id><template>office</template>\
             <image>win11-2026.11</image></vm>"
        );
        assert_eq!(
            parse_metadata(&default_namespace).unwrap(),
            Some(expected.clone())
        );

        let in_domain = format!(
            "<domain type='kvm' id='7'>\n  <name>dg-vm-0123456789abcdef0123456789abcdef</name>\n  \
             <uuid>{VM}</uuid>\n  <metadata>\n    \
             <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
             <libosinfo:os id='http://microsoft.com/win/11'/></libosinfo:libosinfo>\n    {renamed}  </metadata>\n\
             <memory unit='KiB'>4194304</memory>\n</domain>\n"
        );
        assert_eq!(parse_metadata(&in_domain).unwrap(), Some(expected));
    }

    #[test]
    fn foreign_domains_have_no_metadata() {
        let plain = "<domain type='kvm'><name>debian12</name><uuid>2b1f0c9e-5a43-4f51-9a2e-3b6d1c2e4f50</uuid>\
                     <memory unit='KiB'>1048576</memory></domain>";
        assert_eq!(parse_metadata(plain).unwrap(), None);
        let other_metadata = "<domain type='kvm'><name>debian12</name><metadata>\
             <libosinfo:libosinfo xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'>\
             <libosinfo:os id='http://debian.org/debian/12'/></libosinfo:libosinfo></metadata></domain>";
        assert_eq!(parse_metadata(other_metadata).unwrap(), None);
        // Same prefix and local name, another namespace (a future format).
        let other_version = format!(
            "<domain type='kvm'><metadata><deskgrid:vm xmlns:deskgrid='https://deskgrid.dev/xmlns/vm/2'>\
             <deskgrid:id>{VM}</deskgrid:id></deskgrid:vm></metadata></domain>"
        );
        assert_eq!(parse_metadata(&other_version).unwrap(), None);
    }

    #[test]
    fn bad_metadata_is_an_error_that_says_why() {
        for garbage in [
            "",
            "not xml at all",
            "<domain>",
            "<domain></nodomain>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><domain/>",
        ] {
            let error = parse_metadata(garbage).unwrap_err();
            assert!(
                matches!(error, XmlError::Malformed(_)),
                "{garbage}: {error:?}"
            );
            assert!(
                crate::error_chain(&error).starts_with("malformed XML: "),
                "{error}"
            );
        }
        assert!(matches!(
            parse_metadata("<pool type='dir'/>"),
            Err(XmlError::UnexpectedRoot { found, .. }) if found == "pool"
        ));
        let missing_image =
            format!("<vm xmlns='{DESKGRID_XMLNS}'><id>{VM}</id><template>office</template></vm>");
        assert!(matches!(
            parse_metadata(&missing_image),
            Err(XmlError::MissingElement {
                element: "deskgrid:image"
            })
        ));
        let bad_template = format!(
            "<vm xmlns='{DESKGRID_XMLNS}'><id>{VM}</id><template>../etc</template><image>i</image></vm>"
        );
        assert!(matches!(
            parse_metadata(&bad_template),
            Err(XmlError::InvalidName {
                location: "deskgrid:template",
                ..
            })
        ));
        let bad_id = format!(
            "<vm xmlns='{DESKGRID_XMLNS}'><id>nope</id><template>t</template><image>i</image></vm>"
        );
        assert!(matches!(
            parse_metadata(&bad_id),
            Err(XmlError::InvalidName {
                location: "deskgrid:id",
                ..
            })
        ));
        let xml = render_domain_xml(&sample_spec(DisplayProtocol::Spice, DomainKind::Kvm));
        let impostor = xml.replace("<uuid>01234567-", "<uuid>ffffffff-");
        assert!(matches!(
            parse_metadata(&impostor),
            Err(XmlError::MetadataMismatch { .. })
        ));
    }

    /// A running SPICE domain as `virsh dumpxml` shows it (libvirt 9, QEMU
    /// 7.2): libvirt's own additions (ids, aliases, addresses, a second
    /// graphics device) included.
    const LIVE_SPICE_DOMAIN: &str = r#"<domain type='qemu' id='4'>
  <name>dg-vm-0123456789abcdef0123456789abcdef</name>
  <uuid>01234567-89ab-cdef-0123-456789abcdef</uuid>
  <metadata>
    <deskgrid:vm xmlns:deskgrid="https://deskgrid.dev/xmlns/vm/1">
      <deskgrid:id>01234567-89ab-cdef-0123-456789abcdef</deskgrid:id>
      <deskgrid:template>office</deskgrid:template>
      <deskgrid:image>win11-2026.11</deskgrid:image>
    </deskgrid:vm>
  </metadata>
  <memory unit='KiB'>4194304</memory>
  <currentMemory unit='KiB'>4194304</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <resource>
    <partition>/machine</partition>
  </resource>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact' check='full'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback' discard='unmap'/>
      <source file='/var/lib/deskgrid/pool/dg-vm-0123456789abcdef0123456789abcdef.qcow2' index='1'/>
      <backingStore type='file' index='2'>
        <format type='raw'/>
        <source file='/var/lib/deskgrid/pool/dg-base-win11-2026.11'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </disk>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-4-dg-vm-0123456789abcde/org.deskgrid.agent.0'/>
      <target type='virtio' name='org.deskgrid.agent.0' state='disconnected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='tablet' bus='usb'>
      <alias name='input0'/>
      <address type='usb' bus='0' port='1'/>
    </input>
    <graphics type='spice' port='5901' autoport='yes' listen='127.0.0.1'>
      <listen type='address' address='127.0.0.1'/>
      <image compression='off'/>
    </graphics>
    <graphics type='vnc' port='5902' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <video>
      <model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='2' primary='yes'/>
      <alias name='video0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </video>
  </devices>
  <seclabel type='dynamic' model='dac' relabel='yes'>
    <label>+0:+0</label>
    <imagelabel>+0:+0</imagelabel>
  </seclabel>
</domain>
"#;

    /// A running VNC domain with a websocket, as `virsh dumpxml` shows it.
    const LIVE_VNC_DOMAIN: &str = r#"<domain type='kvm' id='9'>
  <name>dg-vm-0123456789abcdef0123456789abcdef</name>
  <uuid>01234567-89ab-cdef-0123-456789abcdef</uuid>
  <devices>
    <graphics type='vnc' port='5900' autoport='yes' websocket='5700' listen='10.0.0.5' keymap='de'>
      <listen type='address' address='10.0.0.5'/>
    </graphics>
  </devices>
</domain>
"#;

    #[test]
    fn ticket_repeats_the_live_port_and_listen() {
        // 2026-11-05T08:30:00 UTC.
        let update = graphics_ticket_xml(LIVE_SPICE_DOMAIN, "one-time'<&>", 1_793_867_400).unwrap();
        let document = Document::parse(&update).unwrap();
        let graphics = document.root_element();
        assert!(is_plain(graphics, "graphics"), "{update}");
        assert_eq!(
            attr(graphics, "type"),
            "spice",
            "the first graphics element"
        );
        assert_eq!(attr(graphics, "port"), "5901");
        assert_eq!(attr(graphics, "autoport"), "yes");
        assert_eq!(attr(graphics, "listen"), "127.0.0.1");
        assert_eq!(attr(graphics, "passwd"), "one-time'<&>");
        assert_eq!(attr(graphics, "passwdValidTo"), "2026-11-05T08:30:00");
        assert_eq!(graphics.attribute("tlsPort"), None);
        let listens = all(graphics, "listen");
        assert_eq!(listens.len(), 1);
        assert_eq!(attr(listens[0], "type"), "address");
        assert_eq!(attr(listens[0], "address"), "127.0.0.1");
        assert!(
            child(graphics, "image").is_none(),
            "only listen children are repeated"
        );
        assert_eq!(
            update,
            "<graphics type='spice' port='5901' autoport='yes' listen='127.0.0.1' \
             passwd='one-time&apos;&lt;&amp;&gt;' passwdValidTo='2026-11-05T08:30:00'>\n  \
             <listen type='address' address='127.0.0.1'/>\n</graphics>\n"
        );
    }

    #[test]
    fn ticket_repeats_tls_port_websocket_and_keymap_and_replaces_an_old_password() {
        let live = LIVE_VNC_DOMAIN.replace(
            "keymap='de'",
            "keymap='de' passwd='old' passwdValidTo='2020-01-01T00:00:00'",
        );
        let update = graphics_ticket_xml(&live, "new", 951_827_696).unwrap();
        let document = Document::parse(&update).unwrap();
        let graphics = document.root_element();
        assert_eq!(attr(graphics, "type"), "vnc");
        assert_eq!(attr(graphics, "port"), "5900");
        assert_eq!(attr(graphics, "websocket"), "5700");
        assert_eq!(attr(graphics, "keymap"), "de");
        assert_eq!(attr(graphics, "passwd"), "new");
        assert_eq!(attr(graphics, "passwdValidTo"), "2000-02-29T12:34:56");
        assert_eq!(update.matches("passwd=").count(), 1, "{update}");
        assert_eq!(attr(at(graphics, "listen"), "address"), "10.0.0.5");

        let tls = LIVE_SPICE_DOMAIN.replace(
            "port='5901' autoport",
            "port='5901' tlsPort='5902' autoport",
        );
        let update = graphics_ticket_xml(&tls, "x", 0).unwrap();
        let document = Document::parse(&update).unwrap();
        assert_eq!(attr(document.root_element(), "tlsPort"), "5902");
        assert_eq!(
            attr(document.root_element(), "passwdValidTo"),
            "1970-01-01T00:00:00"
        );
    }

    #[test]
    fn ticket_errors_say_why() {
        let no_graphics = "<domain type='kvm'><name>x</name><devices><disk/></devices></domain>";
        assert!(matches!(
            graphics_ticket_xml(no_graphics, "p", 1),
            Err(XmlError::MissingElement {
                element: "devices/graphics"
            })
        ));
        assert!(matches!(
            graphics_ticket_xml("<domain", "p", 1),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(
            graphics_ticket_xml(LIVE_SPICE_DOMAIN, "", 1),
            Err(XmlError::EmptyTicketPassword)
        ));
        assert!(matches!(
            graphics_ticket_xml(LIVE_SPICE_DOMAIN, "p", LAST_FOUR_DIGIT_YEAR_SECOND + 1),
            Err(XmlError::ExpiryOutOfRange { .. })
        ));
        assert!(matches!(
            graphics_ticket_xml(LIVE_VNC_DOMAIN, "123456789", 1),
            Err(XmlError::VncPasswordTooLong { len: 9, max: 8 })
        ));
        assert!(graphics_ticket_xml(LIVE_VNC_DOMAIN, "12345678", 1).is_ok());
        assert!(graphics_ticket_xml(LIVE_SPICE_DOMAIN, "a much longer spice ticket", 1).is_ok());
        let sdl = "<domain><devices><graphics type='sdl' display=':0'/></devices></domain>";
        assert!(matches!(
            graphics_ticket_xml(sdl, "p", 1),
            Err(XmlError::InvalidValue {
                location: "graphics type",
                ..
            })
        ));
    }

    #[test]
    fn display_endpoint_from_live_xml() {
        let spice = parse_display_endpoint(LIVE_SPICE_DOMAIN).unwrap();
        assert_eq!(spice.protocol, DisplayProtocol::Spice);
        assert_eq!(spice.listen, "127.0.0.1");
        assert_eq!(spice.port, 5901);
        assert_eq!(spice.websocket_port, None);
        let vnc = parse_display_endpoint(LIVE_VNC_DOMAIN).unwrap();
        assert_eq!(vnc.protocol, DisplayProtocol::Vnc);
        assert_eq!(vnc.listen, "10.0.0.5");
        assert_eq!((vnc.port, vnc.websocket_port), (5900, Some(5700)));

        let stopped = render_domain_xml(&sample_spec(DisplayProtocol::Vnc, DomainKind::Kvm));
        let stopped = stopped.replace("autoport='yes'", "port='-1' autoport='yes'");
        assert!(matches!(
            parse_display_endpoint(&stopped),
            Err(XmlError::InvalidValue {
                location: "graphics port",
                ..
            })
        ));
    }

    #[test]
    fn utc_times_for_known_dates() {
        for (unix_seconds, expected) in [
            (0, "1970-01-01T00:00:00"),
            (94_694_399, "1972-12-31T23:59:59"),
            (951_827_696, "2000-02-29T12:34:56"),
            (1_709_251_199, "2024-02-29T23:59:59"),
            (1_793_867_400, "2026-11-05T08:30:00"),
            (2_147_483_648, "2038-01-19T03:14:08"),
            (4_107_542_400, "2100-03-01T00:00:00"),
            (4_107_542_399, "2100-02-28T23:59:59"),
            (LAST_FOUR_DIGIT_YEAR_SECOND, "9999-12-31T23:59:59"),
        ] {
            assert_eq!(
                format_utc(unix_seconds).unwrap(),
                expected,
                "{unix_seconds}"
            );
        }
        assert!(matches!(
            format_utc(u64::MAX),
            Err(XmlError::ExpiryOutOfRange {
                unix_seconds: u64::MAX
            })
        ));
    }

    fn is_leap(year: u64) -> bool {
        year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
    }

    fn days_in_month(year: u64, month: u64) -> u64 {
        match month {
            2 if is_leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        }
    }

    proptest! {
        /// Each day is the one after the previous day: the calendar walks
        /// forward one day at a time, with month and year rollovers and
        /// leap days exactly where the Gregorian rules put them.
        #[test]
        fn days_follow_one_another(days in 0u64..2_932_896) {
            let (year, month, day) = civil_from_days(days);
            let next = civil_from_days(days + 1);
            prop_assert!((1..=12).contains(&month));
            prop_assert!(day >= 1 && day <= days_in_month(year, month));
            let expected = if day < days_in_month(year, month) {
                (year, month, day + 1)
            } else if month < 12 {
                (year, month + 1, 1)
            } else {
                (year + 1, 1, 1)
            };
            prop_assert_eq!(next, expected);
        }
    }

    #[test]
    fn pool_xml_round_trips_its_path() {
        let xml = render_pool_xml("deskgrid", "/var/lib/deskgrid/pool");
        let document = Document::parse(&xml).unwrap();
        let pool = document.root_element();
        assert_eq!(attr(pool, "type"), "dir");
        assert_eq!(text_of(at(pool, "name")), "deskgrid");
        assert_eq!(parse_pool_path(&xml).unwrap(), "/var/lib/deskgrid/pool");
        assert!(matches!(
            parse_pool_path("<pool type='dir'><name>p</name></pool>"),
            Err(XmlError::MissingElement { .. })
        ));
        assert!(matches!(
            parse_pool_path("<volume/>"),
            Err(XmlError::UnexpectedRoot { .. })
        ));
    }

    #[test]
    fn volume_xml() {
        for format in [VolumeFormat::Raw, VolumeFormat::Qcow2] {
            let xml = render_base_volume_xml("dg-base-win11-2026.11", 64 << 30, format);
            let document = Document::parse(&xml).unwrap();
            let volume = document.root_element();
            assert_eq!(text_of(at(volume, "name")), "dg-base-win11-2026.11");
            assert_eq!(attr(at(volume, "capacity"), "unit"), "bytes");
            assert_eq!(text_of(at(volume, "capacity")), "68719476736");
            assert_eq!(attr(at(volume, "target/format"), "type"), format.as_str());
            assert!(child(volume, "backingStore").is_none());
            let compat = child(at(volume, "target"), "compat").map(text_of);
            let expected = (format == VolumeFormat::Qcow2).then_some("1.1");
            assert_eq!(compat, expected);
            assert_eq!(parse_volume_format(&xml).unwrap(), format);
        }
        let xml = render_overlay_volume_xml(
            "dg-vm-0123456789abcdef0123456789abcdef.qcow2",
            64 << 30,
            "/var/lib/deskgrid/pool/dg-base-win11-2026.11",
            VolumeFormat::Raw,
        );
        let document = Document::parse(&xml).unwrap();
        let volume = document.root_element();
        assert_eq!(attr(at(volume, "target/format"), "type"), "qcow2");
        assert_eq!(
            text_of(at(volume, "backingStore/path")),
            "/var/lib/deskgrid/pool/dg-base-win11-2026.11"
        );
        assert_eq!(attr(at(volume, "backingStore/format"), "type"), "raw");
        assert_eq!(text_of(at(volume, "target/compat")), "1.1");
        assert_eq!(parse_volume_format(&xml).unwrap(), VolumeFormat::Qcow2);
        let iso =
            "<volume type='file'><name>x.iso</name><target><format type='iso'/></target></volume>";
        assert!(matches!(
            parse_volume_format(iso),
            Err(XmlError::InvalidValue { .. })
        ));
    }

    /// `virsh pool-dumpxml` and `vol-dumpxml` (libvirt 9.0) of a pool and
    /// volumes created from `render_pool_xml` and `render_*_volume_xml`.
    const LIBVIRT_POOL: &str = "<pool type='dir'>
  <name>deskgrid</name>
  <uuid>b2e984e1-7c49-4f20-b704-c677f87888bd</uuid>
  <capacity unit='bytes'>270553174016</capacity>
  <allocation unit='bytes'>19779379200</allocation>
  <available unit='bytes'>250773794816</available>
  <source>
  </source>
  <target>
    <path>/var/lib/deskgrid/pool</path>
    <permissions>
      <mode>0755</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
  </target>
</pool>
";
    const LIBVIRT_OVERLAY_VOLUME: &str = "<volume type='file'>
  <name>dg-vm-0123456789abcdef0123456789abcdef.qcow2</name>
  <key>/var/lib/deskgrid/pool/dg-vm-0123456789abcdef0123456789abcdef.qcow2</key>
  <capacity unit='bytes'>67108864</capacity>
  <allocation unit='bytes'>200704</allocation>
  <physical unit='bytes'>196616</physical>
  <target>
    <path>/var/lib/deskgrid/pool/dg-vm-0123456789abcdef0123456789abcdef.qcow2</path>
    <format type='qcow2'/>
    <permissions>
      <mode>0600</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
    <timestamps>
      <atime>1795623271.426287910</atime>
      <mtime>1795623271.422831603</mtime>
      <ctime>1795623271.426245756</ctime>
      <btime>0</btime>
    </timestamps>
    <compat>1.1</compat>
  </target>
  <backingStore>
    <path>/var/lib/deskgrid/pool/dg-base-tiny-1</path>
    <format type='raw'/>
    <permissions>
      <mode>0600</mode>
      <owner>0</owner>
      <group>0</group>
    </permissions>
    <timestamps>
      <atime>1795623271.401998619</atime>
      <mtime>1795623271.401489638</mtime>
      <ctime>1795623271.401489638</ctime>
      <btime>0</btime>
    </timestamps>
  </backingStore>
</volume>
";

    #[test]
    fn libvirt_pool_and_volume_xml_parse() {
        assert_eq!(
            parse_pool_path(LIBVIRT_POOL).unwrap(),
            "/var/lib/deskgrid/pool"
        );
        assert_eq!(parse_pool_type(LIBVIRT_POOL).unwrap(), "dir");
        assert!(matches!(
            parse_pool_type("<pool><name>p</name></pool>"),
            Err(XmlError::MissingAttribute { .. })
        ));
        assert_eq!(
            parse_volume_format(LIBVIRT_OVERLAY_VOLUME).unwrap(),
            VolumeFormat::Qcow2
        );
        let base = LIBVIRT_OVERLAY_VOLUME.replace("<format type='qcow2'/>", "<format type='raw'/>");
        assert_eq!(parse_volume_format(&base).unwrap(), VolumeFormat::Raw);
    }

    fn capabilities(x86_64_domains: &str) -> String {
        format!(
            "<capabilities>\n\n  <host>\n    <uuid>4c4c4544-0042-3510-8052-b4c04f4e5932</uuid>\n    \
             <cpu>\n      <arch>x86_64</arch>\n      <model>Skylake-Client-IBRS</model>\n    </cpu>\n    \
             <secmodel>\n      <model>none</model>\n      <doi>0</doi>\n    </secmodel>\n  </host>\n\n  \
             <guest>\n    <os_type>hvm</os_type>\n    <arch name='i686'>\n      <wordsize>32</wordsize>\n      \
             <emulator>/usr/bin/qemu-system-i386</emulator>\n      <machine maxCpus='255'>pc-i440fx-7.2</machine>\n      \
             <domain type='qemu'/>\n      <domain type='kvm'/>\n    </arch>\n  </guest>\n\n  \
             <guest>\n    <os_type>hvm</os_type>\n    <arch name='x86_64'>\n      <wordsize>64</wordsize>\n      \
             <emulator>/usr/bin/qemu-system-x86_64</emulator>\n      <machine maxCpus='255'>pc-i440fx-7.2</machine>\n      \
             <machine canonical='pc-i440fx-7.2' maxCpus='255'>pc</machine>\n      {x86_64_domains}\n    </arch>\n    \
             <features>\n      <acpi default='on' toggle='yes'/>\n      <apic default='on' toggle='no'/>\n    \
             </features>\n  </guest>\n\n  <guest>\n    <os_type>xen</os_type>\n    <arch name='x86_64'>\n      \
             <domain type='kvm'/>\n    </arch>\n  </guest>\n\n</capabilities>\n"
        )
    }

    #[test]
    fn domain_kinds_from_capabilities() {
        let with_kvm = capabilities("<domain type='qemu'/>\n      <domain type='kvm'/>");
        assert_eq!(
            parse_domain_kinds(&with_kvm).unwrap(),
            vec![DomainKind::Kvm, DomainKind::Qemu]
        );
        // KVM offered only for i686 and for a non-hvm guest does not count.
        let without_kvm = capabilities("<domain type='qemu'/>");
        assert_eq!(
            parse_domain_kinds(&without_kvm).unwrap(),
            vec![DomainKind::Qemu]
        );
        assert_eq!(parse_domain_kinds(&capabilities("")).unwrap(), vec![]);
        assert!(matches!(
            parse_domain_kinds("<capabilities>"),
            Err(XmlError::Malformed(_))
        ));
        assert!(matches!(
            parse_domain_kinds("<domain/>"),
            Err(XmlError::UnexpectedRoot { .. })
        ));
    }
}
