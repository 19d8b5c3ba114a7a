//! Desktop templates: what a desktop VM looks like and how many the grid keeps.

use serde::{Deserialize, Serialize};

use super::{check_range, ImageVersionId, ModelError, TemplateName};

/// Limits a template must respect. Generous for real desktops, tight enough
/// that a typo (memory in bytes, a count with extra zeros) is refused.
pub const MAX_VCPUS: u64 = 64;
pub const MIN_MEMORY_MIB: u64 = 128;
pub const MAX_MEMORY_MIB: u64 = 1024 * 1024;
pub const MAX_DESIRED_VMS: u64 = 100_000;
pub const MAX_REPLICAS: u64 = 64;
pub const MAX_MONITORS: u64 = 4;

/// Whether a desktop is handed back fresh after each use or belongs to one user.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateKind {
    /// Any entitled user gets any ready VM; it is refreshed from the base image at logout.
    #[default]
    Pooled,
    /// Each user keeps their own VM (and its disk) across sessions.
    Personal,
}

/// The remote display protocol a template's VMs offer.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum DisplayProtocol {
    #[default]
    Spice,
    Vnc,
}

/// A desktop template (grid-wide configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    pub name: TemplateName,
    /// The base image version new VMs are cloned from.
    pub image: ImageVersionId,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// How many VMs of this template the grid keeps.
    pub desired_vms: u32,
    /// Ready, unassigned VMs kept as headroom for logins.
    #[serde(default)]
    pub min_idle_vms: u32,
    /// The fewest servers that must hold the base image, whatever the VM count.
    #[serde(default = "default_min_replicas")]
    pub min_replicas: u32,
    /// When above zero, the grid keeps at least this percentage of the
    /// template's entitled users in VMs (`desired_vms` stays the floor).
    #[serde(default)]
    pub concurrency_percent: u32,
    #[serde(default)]
    pub kind: TemplateKind,
    #[serde(default)]
    pub display: DisplayProtocol,
    #[serde(default = "default_monitors")]
    pub monitors: u32,
}

/// Servers that hold a base image when its template says nothing else.
pub const DEFAULT_MIN_REPLICAS: u32 = 2;

fn default_min_replicas() -> u32 {
    DEFAULT_MIN_REPLICAS
}

fn default_monitors() -> u32 {
    1
}

impl Template {
    /// Checks every field against its limits.
    pub fn validate(&self) -> Result<(), ModelError> {
        check_range("vcpus", self.vcpus.into(), 1, MAX_VCPUS)?;
        check_range(
            "memory_mib",
            self.memory_mib,
            MIN_MEMORY_MIB,
            MAX_MEMORY_MIB,
        )?;
        check_range("desired_vms", self.desired_vms.into(), 0, MAX_DESIRED_VMS)?;
        check_range("min_idle_vms", self.min_idle_vms.into(), 0, MAX_DESIRED_VMS)?;
        check_range("min_replicas", self.min_replicas.into(), 1, MAX_REPLICAS)?;
        check_range(
            "concurrency_percent",
            self.concurrency_percent.into(),
            0,
            100,
        )?;
        check_range("monitors", self.monitors.into(), 1, MAX_MONITORS)?;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) fn sample_template(name: &str) -> Template {
    Template {
        name: TemplateName::new(name).expect("test names are valid"),
        image: ImageVersionId::new("base-1").expect("test names are valid"),
        vcpus: 2,
        memory_mib: 4096,
        desired_vms: 10,
        min_idle_vms: 2,
        min_replicas: 2,
        concurrency_percent: 0,
        kind: TemplateKind::Pooled,
        display: DisplayProtocol::Spice,
        monitors: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sane_template_validates() {
        assert_eq!(sample_template("office").validate(), Ok(()));
    }

    #[test]
    fn limits_are_enforced_with_the_field_named() {
        let mut template = sample_template("office");
        template.memory_mib = 4 * 1024 * 1024 * 1024;
        let error = template.validate().unwrap_err();
        assert!(matches!(
            error,
            ModelError::OutOfRange {
                field: "memory_mib",
                ..
            }
        ));
        assert!(error
            .to_string()
            .starts_with("memory_mib is 4294967296, it must be between"));

        let mut template = sample_template("office");
        template.vcpus = 0;
        assert!(matches!(
            template.validate(),
            Err(ModelError::OutOfRange { field: "vcpus", .. })
        ));
    }

    #[test]
    fn absent_optional_fields_take_defaults() {
        let template: Template = serde_json::from_str(
            r#"{"name":"t","image":"i","vcpus":1,"memory_mib":1024,"desired_vms":3}"#,
        )
        .unwrap();
        assert_eq!(template.min_replicas, 2);
        assert_eq!(template.monitors, 1);
        assert_eq!(template.kind, TemplateKind::Pooled);
    }
}
