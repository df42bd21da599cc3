//! Prefetch: after an image manifest is served, its config and layers start
//! downloading, so the client's next requests join flights already under way.
//! For an index, the child manifests of the configured platforms are fetched.

use crate::reference::Digest;
use serde::Deserialize;

/// What to warm next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A config or layer blob.
    Blob(Digest),
    /// A child manifest of an index.
    Manifest(Digest),
}

/// A platform entry that selects every manifest of an index.
pub const ALL_PLATFORMS: &str = "*";

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
    /// Foreign layers live elsewhere; the registry does not have them.
    #[serde(default)]
    urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Whether `platform` is one of `wanted` (`os/arch` matches any variant;
/// `os/arch/variant` only that one; [`ALL_PLATFORMS`] every one).
fn wanted(platform: &Platform, wanted: &[String]) -> bool {
    wanted.iter().any(|w| {
        if w == ALL_PLATFORMS {
            return true;
        }
        let mut parts = w.split('/');
        let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
        os == Some(platform.os.as_str())
            && arch == Some(platform.architecture.as_str())
            && (variant.is_none() || variant == platform.variant.as_deref())
    })
}

/// What serving `manifest` makes worth fetching; nothing for documents we do not understand.
pub fn targets(manifest: &[u8], platforms: &[String]) -> Vec<Target> {
    sized_targets(manifest, platforms)
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

/// [`targets`], each with the size its descriptor gives.
pub fn sized_targets(manifest: &[u8], platforms: &[String]) -> Vec<(Target, u64)> {
    let Ok(doc) = serde_json::from_slice::<Document>(manifest) else {
        return Vec::new();
    };
    let digest = |d: &Descriptor| Some((d.digest.parse::<Digest>().ok()?, d.size));
    let children = doc
        .manifests
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| wanted(p, platforms)))
        .filter_map(digest)
        .map(|(d, size)| (Target::Manifest(d), size));
    let blobs = doc
        .config
        .iter()
        .chain(&doc.layers)
        .filter(|d| d.urls.as_ref().is_none_or(|u| u.is_empty()))
        .filter_map(digest)
        .map(|(d, size)| (Target::Blob(d), size));
    children.chain(blobs).collect()
}
