//! Base image versions.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{check_range, ImageVersionId, ModelError};

/// The largest virtual disk deskgrid accepts (16 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 16 << 40;

/// SHA-256 root digest of a base image's virtual-disk content (see `transfer/`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageDigest([u8; 32]);

impl ImageDigest {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl TryFrom<String> for ImageDigest {
    type Error = ModelError;
    fn try_from(value: String) -> Result<Self, ModelError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(value.trim_start_matches("sha256:"), &mut bytes).map_err(|_| {
            ModelError::InvalidId {
                kind: "image digest",
                value: value.clone(),
            }
        })?;
        Ok(Self(bytes))
    }
}

impl From<ImageDigest> for String {
    fn from(digest: ImageDigest) -> String {
        digest.to_string()
    }
}

impl fmt::Display for ImageDigest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for ImageDigest {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, formatter)
    }
}

/// Where a base image version is in its life.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "kebab-case")]
pub enum ImageState {
    /// Being imported on one server; not yet replicated.
    #[default]
    Importing,
    /// Complete and verified: templates may use it, servers may replicate it.
    Ready,
    /// Superseded: dropped once no VM uses it.
    Retired,
}

/// One immutable version of a base image (grid-wide configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseImage {
    pub id: ImageVersionId,
    /// Known once the import has computed the manifest.
    pub digest: Option<ImageDigest>,
    pub virtual_size: u64,
    /// The version this one was built from by a difference disk.
    pub parent: Option<ImageVersionId>,
    pub state: ImageState,
}

impl BaseImage {
    pub fn validate(&self) -> Result<(), ModelError> {
        check_range("virtual_size", self.virtual_size, 1, MAX_VIRTUAL_SIZE)?;
        if self.parent.as_ref() == Some(&self.id) {
            return Err(ModelError::Inconsistent {
                field: "parent",
                problem: "an image version cannot be its own parent",
            });
        }
        if self.state == ImageState::Ready && self.digest.is_none() {
            return Err(ModelError::Inconsistent {
                field: "digest",
                problem: "a ready image version must have a digest",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_round_trips_and_rejects_garbage() {
        let digest = ImageDigest::from_bytes([0xab; 32]);
        let text = serde_json::to_string(&digest).unwrap();
        assert_eq!(serde_json::from_str::<ImageDigest>(&text).unwrap(), digest);
        assert!(serde_json::from_str::<ImageDigest>("\"sha256:zz\"").is_err());
    }

    #[test]
    fn a_ready_image_needs_a_digest() {
        let image = BaseImage {
            id: ImageVersionId::new("img-1").unwrap(),
            digest: None,
            virtual_size: 1 << 30,
            parent: None,
            state: ImageState::Ready,
        };
        assert!(matches!(
            image.validate(),
            Err(ModelError::Inconsistent {
                field: "digest",
                ..
            })
        ));
    }
}
