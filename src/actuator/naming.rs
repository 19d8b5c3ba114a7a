//! deskgrid's names for the libvirt objects it creates, and the parsers that
//! recognise them, so that deskgrid never touches a volume or domain it did not
//! create.
//!
//! | object | name | example |
//! |---|---|---|
//! | base image volume | `dg-base-<image version>` | `dg-base-win11-2026.11` |
//! | base image volume being imported | `dg-part-<image version>` | `dg-part-win11-2026.11` |
//! | VM overlay volume (linked clone) | `dg-vm-<vm id, 32 lowercase hex>.qcow2` | `dg-vm-0123…cdef.qcow2` |
//! | domain | `dg-vm-<vm id, 32 lowercase hex>` | `dg-vm-0123…cdef` |
//!
//! A VM's domain and its overlay share a stem, so `virsh list` and
//! `virsh vol-list` read side by side. Volumes and domains live in separate
//! libvirt namespaces, so the shared stem cannot clash.
//!
//! **Invariant:** every name deskgrid renders parses back to the same value,
//! and a parser accepts only the exact form deskgrid renders: no uppercase hex,
//! no hyphenated UUIDs, no image version that the model would refuse. Anything
//! else is foreign and gets `None`, so the actuator leaves it alone.
//!
//! Base volumes carry no file extension: an image version may itself contain
//! `.` (`win11-2026.11`), and its format is in the volume's XML, not its name.
//!
//! The `dg-part-` staging name is for imports that cannot finish in one step
//! (a resumable transfer): a volume under that name is never a backing store,
//! so a crash mid-import can never leave something that looks like a complete
//! base image, and one found without a matching transfer record is garbage to
//! delete. libvirt has no volume rename, so promoting a staged volume to its
//! `dg-base-` name is a copy (`virStorageVolCreateXMLFrom`); an import that
//! completes in one stream (and deletes its volume on failure) can write the
//! `dg-base-` name directly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::model::{ImageVersionId, VmId};

const BASE_PREFIX: &str = "dg-base-";
const PARTIAL_PREFIX: &str = "dg-part-";
const VM_PREFIX: &str = "dg-vm-";
const OVERLAY_SUFFIX: &str = ".qcow2";
/// A UUID in `simple` form: 32 hex digits, no hyphens.
const SIMPLE_UUID_LEN: usize = 32;

/// Why a name is not one of deskgrid's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NamingError {
    #[error("{name:?} is not a deskgrid volume name")]
    NotOurVolume { name: String },
}

/// One of deskgrid's volumes, identified by its name in the pool.
///
/// `Display` writes the libvirt volume name; serde uses the same string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum VolumeName {
    /// A complete base image: `dg-base-<image version>`.
    Base(ImageVersionId),
    /// A base image still being imported: `dg-part-<image version>`.
    Partial(ImageVersionId),
    /// A VM's qcow2 overlay on its base image: `dg-vm-<id>.qcow2`.
    Overlay(VmId),
}

/// The volume name of a complete base image.
pub fn base_volume_name(image: &ImageVersionId) -> String {
    VolumeName::Base(image.clone()).to_string()
}

/// The volume name of a base image while it is being imported.
pub fn partial_volume_name(image: &ImageVersionId) -> String {
    VolumeName::Partial(image.clone()).to_string()
}

/// The volume name of a VM's overlay (its linked clone).
pub fn overlay_volume_name(vm: VmId) -> String {
    VolumeName::Overlay(vm).to_string()
}

/// The libvirt domain name of a VM.
pub fn domain_name(vm: VmId) -> String {
    format!("{VM_PREFIX}{}", simple_hex(vm))
}

/// The volume `name` stands for, or `None` when deskgrid did not create it.
pub fn parse_volume_name(name: &str) -> Option<VolumeName> {
    if let Some(image) = name.strip_prefix(BASE_PREFIX) {
        return ImageVersionId::new(image).ok().map(VolumeName::Base);
    }
    if let Some(image) = name.strip_prefix(PARTIAL_PREFIX) {
        return ImageVersionId::new(image).ok().map(VolumeName::Partial);
    }
    let hex = name.strip_prefix(VM_PREFIX)?.strip_suffix(OVERLAY_SUFFIX)?;
    parse_simple_hex(hex).map(VolumeName::Overlay)
}

/// The VM whose domain is called `name`, or `None` when deskgrid did not
/// create it.
pub fn parse_domain_name(name: &str) -> Option<VmId> {
    parse_simple_hex(name.strip_prefix(VM_PREFIX)?)
}

impl fmt::Display for VolumeName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Base(image) => write!(formatter, "{BASE_PREFIX}{image}"),
            Self::Partial(image) => write!(formatter, "{PARTIAL_PREFIX}{image}"),
            Self::Overlay(vm) => {
                write!(formatter, "{VM_PREFIX}{}{OVERLAY_SUFFIX}", simple_hex(*vm))
            }
        }
    }
}

impl FromStr for VolumeName {
    type Err = NamingError;
    fn from_str(name: &str) -> Result<Self, NamingError> {
        parse_volume_name(name).ok_or_else(|| NamingError::NotOurVolume {
            name: name.to_owned(),
        })
    }
}

impl TryFrom<String> for VolumeName {
    type Error = NamingError;
    fn try_from(name: String) -> Result<Self, NamingError> {
        name.parse()
    }
}

impl From<VolumeName> for String {
    fn from(name: VolumeName) -> String {
        name.to_string()
    }
}

fn simple_hex(vm: VmId) -> String {
    hex::encode(vm.as_bytes())
}

/// Exactly 32 lowercase hex digits, as [`simple_hex`] writes them.
fn parse_simple_hex(hex: &str) -> Option<VmId> {
    let canonical = hex.len() == SIMPLE_UUID_LEN
        && hex
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    if !canonical {
        return None;
    }
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(hex, &mut bytes).ok()?;
    Some(VmId::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn image(name: &str) -> ImageVersionId {
        ImageVersionId::new(name).unwrap()
    }

    fn sample_vm() -> VmId {
        "01234567-89ab-cdef-0123-456789abcdef".parse().unwrap()
    }

    #[test]
    fn names_have_the_documented_form() {
        let vm = sample_vm();
        assert_eq!(
            base_volume_name(&image("win11-2026.11")),
            "dg-base-win11-2026.11"
        );
        assert_eq!(
            partial_volume_name(&image("win11-2026.11")),
            "dg-part-win11-2026.11"
        );
        assert_eq!(
            overlay_volume_name(vm),
            "dg-vm-0123456789abcdef0123456789abcdef.qcow2"
        );
        assert_eq!(domain_name(vm), "dg-vm-0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn documented_examples_parse_back() {
        let vm = sample_vm();
        assert_eq!(
            parse_volume_name("dg-base-win11-2026.11"),
            Some(VolumeName::Base(image("win11-2026.11")))
        );
        assert_eq!(
            parse_volume_name("dg-part-win11-2026.11"),
            Some(VolumeName::Partial(image("win11-2026.11")))
        );
        assert_eq!(
            parse_volume_name("dg-vm-0123456789abcdef0123456789abcdef.qcow2"),
            Some(VolumeName::Overlay(vm))
        );
        assert_eq!(
            parse_domain_name("dg-vm-0123456789abcdef0123456789abcdef"),
            Some(vm)
        );
        // An image version may end like a file name; the prefix decides.
        assert_eq!(
            parse_volume_name("dg-base-disk.qcow2"),
            Some(VolumeName::Base(image("disk.qcow2")))
        );
    }

    #[test]
    fn base_prefix_with_an_invalid_image_version_is_foreign() {
        for name in [
            "dg-base-",
            "dg-base--leading-dash",
            "dg-base-.hidden",
            "dg-base-a/b",
            "dg-base-has space",
            "dg-part-",
            "dg-part-../etc",
        ] {
            assert_eq!(parse_volume_name(name), None, "{name}");
        }
        let too_long = format!("dg-base-{}", "a".repeat(64));
        assert_eq!(parse_volume_name(&too_long), None);
    }

    #[test]
    fn foreign_and_almost_ours_names_are_foreign() {
        let hex = "0123456789abcdef0123456789abcdef";
        let volumes = [
            "debian12.qcow2".to_owned(),
            "dg-base".to_owned(),
            "DG-base-win11".to_owned(),
            "dg-vm-.qcow2".to_owned(),
            format!("dg-vm-{hex}"),
            format!("dg-vm-{hex}.raw"),
            format!("dg-vm-{hex}.qcow2.bak"),
            format!("dg-vm-{}.qcow2", hex.to_uppercase()),
            format!("dg-vm-{}.qcow2", &hex[..31]),
            format!("dg-vm-{hex}0.qcow2"),
            "dg-vm-01234567-89ab-cdef-0123-456789abcdef.qcow2".to_owned(),
            format!("dg-vm-{}.qcow2", "g".repeat(32)),
        ];
        for name in &volumes {
            assert_eq!(parse_volume_name(name), None, "{name}");
            assert!(name.parse::<VolumeName>().is_err(), "{name}");
        }
        let domains = [
            "debian12".to_owned(),
            "dg-vm-".to_owned(),
            format!("dg-{hex}"),
            format!("dg-vm-{hex}.qcow2"),
            format!("dg-vm-{}", hex.to_uppercase()),
            format!("dg-vm-{hex} "),
            format!(" dg-vm-{hex}"),
            "dg-vm-01234567-89ab-cdef-0123-456789abcdef".to_owned(),
            "dg-base-win11".to_owned(),
        ];
        for name in &domains {
            assert_eq!(parse_domain_name(name), None, "{name}");
        }
    }

    #[test]
    fn serde_uses_the_volume_name() {
        let name = VolumeName::Overlay(sample_vm());
        let json = serde_json::to_string(&name).unwrap();
        assert_eq!(json, "\"dg-vm-0123456789abcdef0123456789abcdef.qcow2\"");
        assert_eq!(serde_json::from_str::<VolumeName>(&json).unwrap(), name);
        let error = serde_json::from_str::<VolumeName>("\"debian12.qcow2\"").unwrap_err();
        assert!(
            error.to_string().contains("not a deskgrid volume name"),
            "{error}"
        );
    }

    proptest! {
        #[test]
        fn vm_names_round_trip(bytes in any::<[u8; 16]>()) {
            let vm = VmId::from_bytes(bytes);
            prop_assert_eq!(parse_domain_name(&domain_name(vm)), Some(vm));
            prop_assert_eq!(
                parse_volume_name(&overlay_volume_name(vm)),
                Some(VolumeName::Overlay(vm))
            );
            // A domain name is not a volume name and the reverse.
            prop_assert_eq!(parse_volume_name(&domain_name(vm)), None);
            prop_assert_eq!(parse_domain_name(&overlay_volume_name(vm)), None);
        }

        #[test]
        fn image_names_round_trip(name in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}") {
            let image = ImageVersionId::new(name).unwrap();
            prop_assert_eq!(
                parse_volume_name(&base_volume_name(&image)),
                Some(VolumeName::Base(image.clone()))
            );
            prop_assert_eq!(
                parse_volume_name(&partial_volume_name(&image)),
                Some(VolumeName::Partial(image.clone()))
            );
            prop_assert_eq!(parse_domain_name(&base_volume_name(&image)), None);
        }

        #[test]
        fn parsers_never_panic_and_accept_only_what_they_render(name in "\\PC{0,80}") {
            if let Some(volume) = parse_volume_name(&name) {
                prop_assert_eq!(volume.to_string(), name.clone());
            }
            if let Some(vm) = parse_domain_name(&name) {
                prop_assert_eq!(domain_name(vm), name);
            }
        }
    }
}
