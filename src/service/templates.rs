//! Desktop templates: create, change, delete and list them in the replicated
//! grid state. The CLI (through the control socket) and later the REST API
//! share these calls and [`TemplateChange`].

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{now_ms, GridService, ServiceError};
use crate::model::{
    DisplayProtocol, ImageVersionId, ModelError, Template, TemplateKind, TemplateName,
};
use crate::state::{ConfigKey, ConfigValue};

/// Why a template call was refused.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {0} exists; change it with `deskgrid template set {0} ...`")]
    Exists(TemplateName),
    #[error("no template {0} in this grid (see `deskgrid template list`)")]
    Unknown(TemplateName),
    #[error("invalid template {name}")]
    Invalid {
        name: TemplateName,
        #[source]
        source: ModelError,
    },
    #[error("nothing to change in template {0}: give at least one setting")]
    NothingToChange(TemplateName),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// A change to some settings of a template; `None` keeps the current value.
///
/// Unknown fields are refused rather than ignored: a misspelt field would
/// otherwise read as "keep the current value" and the change would silently
/// not happen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateChange {
    pub image: Option<ImageVersionId>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub desired_vms: Option<u32>,
    pub min_idle_vms: Option<u32>,
    pub min_replicas: Option<u32>,
    pub concurrency_percent: Option<u32>,
    pub kind: Option<TemplateKind>,
    pub display: Option<DisplayProtocol>,
    pub monitors: Option<u32>,
}

impl TemplateChange {
    /// True when the change sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// `template` with this change made (not validated).
    pub fn applied_to(&self, template: &Template) -> Template {
        let mut changed = template.clone();
        if let Some(image) = &self.image {
            changed.image = image.clone();
        }
        if let Some(vcpus) = self.vcpus {
            changed.vcpus = vcpus;
        }
        if let Some(memory_mib) = self.memory_mib {
            changed.memory_mib = memory_mib;
        }
        if let Some(desired_vms) = self.desired_vms {
            changed.desired_vms = desired_vms;
        }
        if let Some(min_idle_vms) = self.min_idle_vms {
            changed.min_idle_vms = min_idle_vms;
        }
        if let Some(min_replicas) = self.min_replicas {
            changed.min_replicas = min_replicas;
        }
        if let Some(concurrency_percent) = self.concurrency_percent {
            changed.concurrency_percent = concurrency_percent;
        }
        if let Some(kind) = self.kind {
            changed.kind = kind;
        }
        if let Some(display) = self.display {
            changed.display = display;
        }
        if let Some(monitors) = self.monitors {
            changed.monitors = monitors;
        }
        changed
    }
}

/// Something an admin should know about a template that was stored anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TemplateWarning {
    /// The template names an image version the grid does not have yet.
    ImageNotInGrid { image: ImageVersionId },
}

impl fmt::Display for TemplateWarning {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ImageNotInGrid { image } => write!(
                formatter,
                "image {image} is not in the grid yet: no VMs are created until it is imported"
            ),
        }
    }
}

/// A template as stored, with what the admin should know about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTemplate {
    pub template: Template,
    pub warnings: Vec<TemplateWarning>,
}

impl GridService {
    /// Every template in the grid, sorted by name.
    pub fn templates(&self) -> Vec<Template> {
        let mut templates: Vec<Template> = self.state.templates().cloned().collect();
        templates.sort_by(|left, right| left.name.cmp(&right.name));
        templates
    }

    /// Stores a new template; refuses a name already in use and invalid values.
    pub fn create_template(&mut self, template: Template) -> Result<StoredTemplate, TemplateError> {
        if self.template(&template.name).is_some() {
            return Err(TemplateError::Exists(template.name));
        }
        self.store_template(template)
    }

    /// Changes some settings of an existing template.
    pub fn update_template(
        &mut self,
        name: &TemplateName,
        change: &TemplateChange,
    ) -> Result<StoredTemplate, TemplateError> {
        if change.is_empty() {
            return Err(TemplateError::NothingToChange(name.clone()));
        }
        let current = self
            .template(name)
            .ok_or_else(|| TemplateError::Unknown(name.clone()))?;
        let changed = change.applied_to(current);
        if changed == *current {
            // Already so: nothing to log or send to the peers.
            let warnings = self.template_warnings(&changed);
            return Ok(StoredTemplate {
                template: changed,
                warnings,
            });
        }
        self.store_template(changed)
    }

    /// Deletes a template (a tombstone that replicates like any write).
    pub fn delete_template(&mut self, name: &TemplateName) -> Result<(), TemplateError> {
        if self.template(name).is_none() {
            return Err(TemplateError::Unknown(name.clone()));
        }
        self.delete(ConfigKey::Template(name.clone()))?;
        tracing::info!(template = %name, "template deleted");
        Ok(())
    }

    fn template(&self, name: &TemplateName) -> Option<&Template> {
        match self.state.config(&ConfigKey::Template(name.clone())) {
            Some(ConfigValue::Template(template)) => Some(template),
            _ => None,
        }
    }

    fn store_template(&mut self, template: Template) -> Result<StoredTemplate, TemplateError> {
        template
            .validate()
            .map_err(|source| TemplateError::Invalid {
                name: template.name.clone(),
                source,
            })?;
        let warnings = self.template_warnings(&template);
        self.write(ConfigValue::Template(template.clone()))?;
        tracing::info!(template = %template.name, image = %template.image, "template stored");
        Ok(StoredTemplate { template, warnings })
    }

    fn template_warnings(&self, template: &Template) -> Vec<TemplateWarning> {
        let image_known = self
            .state
            .config(&ConfigKey::Image(template.image.clone()))
            .is_some();
        if image_known {
            Vec::new()
        } else {
            vec![TemplateWarning::ImageNotInGrid {
                image: template.image.clone(),
            }]
        }
    }

    /// Deletes the configuration register `key`: a tombstone stamped by this
    /// server, so the deletion wins over older writes everywhere.
    pub(super) fn delete(&mut self, key: ConfigKey) -> Result<(), ServiceError> {
        let hlc = self.clock.tick(now_ms());
        let delta = self
            .state
            .prepare_config_write(self.server_id, hlc, key, None)?;
        self.commit(delta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServerId;

    fn sample(name: &str) -> Template {
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

    fn service(dir: &std::path::Path) -> GridService {
        GridService::open(ServerId::random(), dir)
            .expect("a fresh state directory opens")
            .0
    }

    #[test]
    fn create_update_delete_round_trip_and_survive_a_restart() {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut grid = service(temp.path());
        let created = grid.create_template(sample("office")).expect("created");
        assert_eq!(
            created.warnings,
            vec![TemplateWarning::ImageNotInGrid {
                image: ImageVersionId::new("base-1").expect("valid")
            }]
        );
        let name = TemplateName::new("office").expect("valid");
        assert!(matches!(
            grid.create_template(sample("office")),
            Err(TemplateError::Exists(_))
        ));
        let change = TemplateChange {
            desired_vms: Some(20),
            ..TemplateChange::default()
        };
        let updated = grid.update_template(&name, &change).expect("updated");
        assert_eq!(updated.template.desired_vms, 20);
        assert_eq!(updated.template.memory_mib, 4096, "others stay");
        grid.create_template(sample("lab")).expect("created");
        let names: Vec<String> = grid
            .templates()
            .iter()
            .map(|template| template.name.to_string())
            .collect();
        assert_eq!(names, ["lab", "office"]);

        grid.delete_template(&name).expect("deleted");
        assert!(matches!(
            grid.delete_template(&name),
            Err(TemplateError::Unknown(_))
        ));
        assert!(matches!(
            grid.update_template(&name, &change),
            Err(TemplateError::Unknown(_))
        ));
        let server_id = grid.server_id();
        drop(grid);
        let reopened = GridService::open(server_id, temp.path())
            .expect("reopens")
            .0;
        let names: Vec<String> = reopened
            .templates()
            .iter()
            .map(|template| template.name.to_string())
            .collect();
        assert_eq!(names, ["lab"], "the deletion is durable");
    }

    #[test]
    fn invalid_values_and_empty_changes_are_refused_and_nothing_is_written() {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut grid = service(temp.path());
        let mut template = sample("office");
        template.memory_mib = 0;
        let error = grid.create_template(template).unwrap_err();
        assert_eq!(
            crate::error_chain(&error),
            "invalid template office: memory_mib is 0, it must be between 128 and 1048576"
        );
        assert!(grid.templates().is_empty());

        grid.create_template(sample("office")).expect("created");
        let name = TemplateName::new("office").expect("valid");
        let entries = grid.state().entry_count();
        let digest = grid.state().digest();
        let error = grid
            .update_template(
                &name,
                &TemplateChange {
                    vcpus: Some(0),
                    ..TemplateChange::default()
                },
            )
            .unwrap_err();
        assert!(matches!(error, TemplateError::Invalid { .. }), "{error}");
        assert!(matches!(
            grid.update_template(&name, &TemplateChange::default()),
            Err(TemplateError::NothingToChange(_))
        ));
        assert_eq!(grid.state().entry_count(), entries);
        assert_eq!(grid.state().digest(), digest, "refusals write nothing");
    }

    #[test]
    fn an_image_in_the_grid_gives_no_warning() {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut grid = service(temp.path());
        grid.write(ConfigValue::Image(crate::model::BaseImage {
            id: ImageVersionId::new("base-1").expect("valid"),
            digest: None,
            virtual_size: 1 << 30,
            parent: None,
            state: crate::model::ImageState::Importing,
        }))
        .expect("image written");
        let created = grid.create_template(sample("office")).expect("created");
        assert_eq!(created.warnings, []);
        let name = TemplateName::new("office").expect("valid");
        let change = TemplateChange {
            image: Some(ImageVersionId::new("base-2").expect("valid")),
            ..TemplateChange::default()
        };
        let updated = grid.update_template(&name, &change).expect("updated");
        assert_eq!(
            updated.warnings,
            [TemplateWarning::ImageNotInGrid {
                image: ImageVersionId::new("base-2").expect("valid")
            }]
        );
        assert_eq!(
            updated.warnings[0].to_string(),
            "image base-2 is not in the grid yet: no VMs are created until it is imported"
        );
    }

    #[test]
    fn a_change_refuses_unknown_fields() {
        let error = serde_json::from_str::<TemplateChange>(r#"{"memroy_mib": 1024}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field"), "{error}");
        let change: TemplateChange =
            serde_json::from_str(r#"{"memory_mib": 1024}"#).expect("absent fields are None");
        assert_eq!(change.memory_mib, Some(1024));
        assert_eq!(change.vcpus, None);
    }
}
