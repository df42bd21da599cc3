//! Air-gapped clusters: `seed` pulls image lists into the store through the
//! same cache path as the server, `export` writes them as an OCI image layout
//! (a directory or a tar), `import` verifies any OCI layout (ours, skopeo's,
//! `docker save`'s) and adds it to the store.
//!
//! - [`seed`]: resolving images (index → platform manifests → blobs) and pulling them.
//! - [`export`]: the layout writer, streamed from the store.
//! - [`import`]: the layout reader; nothing becomes visible until every digest and size checked.

pub mod export;
pub mod import;
pub mod seed;

use crate::reference::Digest;
use std::path::PathBuf;

/// Why seeding, exporting or importing failed.
#[derive(Debug, thiserror::Error)]
pub enum AirgapError {
    /// An image could not be resolved or pulled.
    #[error("{image}: {reason}")]
    Image {
        /// The image, as the list named it.
        image: String,
        /// What went wrong.
        reason: String,
    },
    /// The registry an image names is not a configured upstream.
    #[error("{image}: registry {registry} is not a configured upstream (add it to [[upstreams]], or name it in `aliases`)")]
    UnknownRegistry {
        /// The image.
        image: String,
        /// Its registry.
        registry: String,
    },
    /// A layout is malformed or its content does not match what it claims.
    #[error("{0}")]
    Layout(String),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl AirgapError {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> AirgapError {
        let path = path.into();
        move |source| AirgapError::Io { path, source }
    }
}

/// Which manifests of an index to take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Platforms {
    /// Every platform the index lists.
    All,
    /// Only these (`os/arch` or `os/arch/variant`).
    Only(Vec<String>),
}

impl Platforms {
    /// The list form [`crate::cache::prefetch::targets`] takes.
    fn as_list(&self) -> Vec<String> {
        match self {
            Platforms::All => vec![crate::cache::prefetch::ALL_PLATFORMS.to_string()],
            Platforms::Only(list) => list.clone(),
        }
    }
}

/// A piece of content an image is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// A manifest's media type; `None` for a config or layer blob.
    pub manifest_type: Option<String>,
}

/// One image as seeded: where it comes from and everything it is made of.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The image as listed, normalised.
    pub image: crate::imagelist::ImageRef,
    /// The configured upstream serving it.
    pub upstream: String,
    /// The manifest the reference resolves to (an index or an image manifest).
    pub top: Content,
    /// Everything below it that was taken: platform manifests, configs, layers.
    pub parts: Vec<Content>,
}

/// The media type of a manifest's bytes, from its own `mediaType` (or its shape).
fn document_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(bytes).ok()?;
    Some(match (doc.media_type, doc.manifests.is_some()) {
        (Some(t), _) => t,
        (None, true) => "application/vnd.oci.image.index.v1+json".into(),
        (None, false) => "application/vnd.oci.image.manifest.v1+json".into(),
    })
}

/// Whether a media type is an index or a manifest list.
fn is_index(media_type: &str) -> bool {
    media_type.contains("index") || media_type.contains("manifest.list")
}
