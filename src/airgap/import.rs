//! `pullthrough import`: an OCI image layout (a directory or a tar: ours,
//! skopeo's `oci:`/`oci-archive:`, or `docker save` from Docker 25 on) into
//! the store. Every blob is staged under `tmp/` while it is hashed; only when
//! every digest and every size the layout's descriptors claim has checked out
//! are the blobs committed and the tags recorded. A bad layout leaves nothing.

use super::{document_type, is_index, AirgapError, Content};
use crate::imagelist::ImageRef;
use crate::reference::Digest;
use crate::store::{ManifestRecord, Store, TagRecord};
use crate::upstream::Upstreams;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to name what a layout holds.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The registry for names that carry none (`library/x:1`, skopeo's `oci:DIR:name`).
    pub registry: String,
    /// The repository for images named by a bare tag (`latest`).
    pub repository: Option<String>,
}

/// What an import added.
#[derive(Debug, Default, Clone)]
pub struct ImportReport {
    /// The images tagged, by full reference.
    pub images: Vec<String>,
    /// Images the layout gives no name: their content is imported, untagged
    /// (pullable by digest only, once a repository links it).
    pub unnamed: Vec<String>,
    /// Blobs (manifests included) the layout's images are made of.
    pub blobs: usize,
    /// Of those, the ones the store did not have.
    pub added: usize,
    /// Bytes of the blobs added.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for ImportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} images, {} blobs ({} new, {}) imported in {:.1}s",
            self.images.len(),
            self.blobs,
            self.added,
            bytesize::ByteSize(self.bytes),
            self.elapsed.as_secs_f64()
        )?;
        for image in &self.images {
            write!(f, "\n  {image}")?;
        }
        for digest in &self.unnamed {
            write!(
                f,
                "\n  {digest} (no name in the layout: content only, untagged)"
            )?;
        }
        Ok(())
    }
}

/// The largest `index.json` or manifest read into memory.
const MAX_DOCUMENT: u64 = 4 * 1024 * 1024;

#[derive(serde::Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(serde::Deserialize)]
struct Document {
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Blobs staged under the store's `tmp/`, each already checked against its
/// name; whatever is not committed is removed on drop.
struct Staged {
    store: Store,
    files: HashMap<Digest, (PathBuf, u64)>,
    /// A layout directory, whose blobs are staged when first named.
    dir: Option<PathBuf>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (path, _) in self.files.values() {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Staged {
    /// Copies `reader` to a staging file, hashing it; fails (keeping nothing)
    /// unless it hashes to `digest`. `expected` is the length a tar header
    /// promised: a tar cut off mid-entry ends the entry early without an
    /// error, and saying so beats a bare digest mismatch.
    fn stage(
        &mut self,
        digest: Digest,
        entry: &str,
        expected: Option<u64>,
        reader: &mut dyn Read,
    ) -> Result<(), AirgapError> {
        if self.files.contains_key(&digest) {
            return Ok(());
        }
        let tmp = self.store.tmp_path(&digest);
        let result = (|| {
            let mut file = std::fs::File::create(&tmp).map_err(AirgapError::io(&tmp))?;
            let mut hasher = digest.algorithm().hasher();
            let mut buf = vec![0u8; 256 * 1024];
            let mut size = 0u64;
            loop {
                let n = reader.read(&mut buf).map_err(|e| {
                    AirgapError::Layout(format!("reading {entry}: {e} (truncated?)"))
                })?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(AirgapError::io(&tmp))?;
                size += n as u64;
            }
            if let Some(expected) = expected.filter(|&e| e != size) {
                return Err(AirgapError::Layout(format!(
                    "{entry}: the tar ends after {size} of its {expected} bytes (truncated?); blob {digest} not imported"
                )));
            }
            let actual = hasher.finish();
            if actual != digest {
                return Err(AirgapError::Layout(format!(
                    "{entry}: content does not match its digest {digest} (it hashes to {actual})"
                )));
            }
            self.store.sync(&file).map_err(AirgapError::io(&tmp))?;
            Ok(size)
        })();
        match result {
            Ok(size) => {
                self.files.insert(digest, (tmp, size));
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// The staged blob for `digest`, staging it from the layout directory if
    /// need be; `None` if the layout lacks it.
    fn get(&mut self, digest: &Digest) -> Result<Option<(PathBuf, u64)>, AirgapError> {
        if let Some(found) = self.files.get(digest) {
            return Ok(Some(found.clone()));
        }
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let name = format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex());
        let path = dir.join(&name);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AirgapError::io(path)(e)),
        };
        self.stage(digest.clone(), &name, None, &mut file)?;
        Ok(self.files.get(digest).cloned())
    }

    /// Checks the blob a descriptor names (present, right size) and, for a
    /// manifest, everything it names in turn; collects them into `parts`.
    fn walk(
        &mut self,
        desc: &Descriptor,
        parent: &str,
        manifest: bool,
        parts: &mut Vec<Content>,
    ) -> Result<bool, AirgapError> {
        let digest: Digest = desc.digest.parse().map_err(|e| {
            AirgapError::Layout(format!(
                "{parent} names an invalid digest {:?}: {e}",
                desc.digest
            ))
        })?;
        let Some((path, size)) = self.get(&digest)? else {
            return Ok(false);
        };
        if size != desc.size {
            return Err(AirgapError::Layout(format!(
                "{digest}: {parent} says {} bytes, the blob has {size}",
                desc.size
            )));
        }
        if !manifest {
            parts.push(Content {
                digest,
                size,
                manifest_type: None,
            });
            return Ok(true);
        }
        if size > MAX_DOCUMENT {
            return Err(AirgapError::Layout(format!(
                "{digest}: a manifest of {size} bytes is too large"
            )));
        }
        let bytes = std::fs::read(&path).map_err(AirgapError::io(&path))?;
        let doc: Document = serde_json::from_slice(&bytes)
            .map_err(|e| AirgapError::Layout(format!("{digest}: not a manifest: {e}")))?;
        let media_type = desc
            .media_type
            .clone()
            .or_else(|| document_type(&bytes))
            .unwrap_or_default();
        parts.push(Content {
            digest: digest.clone(),
            size,
            manifest_type: Some(media_type.clone()),
        });
        let here = format!("manifest {digest}");
        if is_index(&media_type) {
            // Platforms an export left out are simply absent.
            for child in &doc.manifests {
                self.walk(child, &here, true, parts)?;
            }
            return Ok(true);
        }
        for blob in doc.config.iter().chain(&doc.layers) {
            // Foreign layers live elsewhere; the layout need not hold them.
            if !self.walk(blob, &here, false, parts)? && blob.urls.is_empty() {
                return Err(AirgapError::Layout(format!(
                    "{} named by {here} is missing from the layout",
                    blob.digest
                )));
            }
        }
        Ok(true)
    }
}

/// Imports the layout at `path`: a directory, or a tar file.
pub fn import_path(
    store: &Store,
    upstreams: &Upstreams,
    path: &Path,
    options: &ImportOptions,
) -> Result<ImportReport, AirgapError> {
    let started = Instant::now();
    if path.is_dir() {
        let mut staged = Staged {
            store: store.clone(),
            files: HashMap::new(),
            dir: Some(path.to_path_buf()),
        };
        let index = path.join("index.json");
        let index = std::fs::read(&index).map_err(AirgapError::io(index))?;
        let layout = path.join("oci-layout");
        let layout = std::fs::read(&layout).map_err(AirgapError::io(layout))?;
        check_layout(&layout)?;
        finish(&mut staged, upstreams, &index, options, started)
    } else {
        let file = std::fs::File::open(path).map_err(AirgapError::io(path))?;
        import_tar(
            store,
            upstreams,
            std::io::BufReader::with_capacity(1 << 20, file),
            options,
        )
    }
}

/// Imports a layout from a tar stream.
pub fn import_tar(
    store: &Store,
    upstreams: &Upstreams,
    reader: impl Read,
    options: &ImportOptions,
) -> Result<ImportReport, AirgapError> {
    let started = Instant::now();
    let mut staged = Staged {
        store: store.clone(),
        files: HashMap::new(),
        dir: None,
    };
    let mut index = None;
    let mut layout = None;
    let mut archive = tar::Archive::new(reader);
    let truncated =
        |e: std::io::Error| AirgapError::Layout(format!("reading the tar: {e} (truncated?)"));
    for entry in archive.entries().map_err(truncated)? {
        let mut entry = entry.map_err(truncated)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map_err(truncated)?
            .to_string_lossy()
            .into_owned();
        let name = name.trim_start_matches("./").to_string();
        let document = |entry: &mut tar::Entry<_>| {
            let mut bytes = Vec::new();
            entry
                .take(MAX_DOCUMENT)
                .read_to_end(&mut bytes)
                .map_err(|e| AirgapError::Layout(format!("reading {name}: {e} (truncated?)")))?;
            Ok::<_, AirgapError>(bytes)
        };
        match name.as_str() {
            "index.json" => index = Some(document(&mut entry)?),
            "oci-layout" => layout = Some(document(&mut entry)?),
            _ => {
                let Some(rest) = name.strip_prefix("blobs/") else {
                    continue; // docker save's manifest.json, repositories: not ours to read
                };
                let digest: Digest = rest
                    .replacen('/', ":", 1)
                    .parse()
                    .map_err(|e| AirgapError::Layout(format!("{name}: not a blob name: {e}")))?;
                let size = entry.size();
                staged.stage(digest, &name, Some(size), &mut entry)?;
            }
        }
    }
    check_layout(&layout.ok_or_else(|| {
        AirgapError::Layout("no oci-layout file: not an OCI image layout".into())
    })?)?;
    let index = index.ok_or_else(|| {
        AirgapError::Layout(
            "no index.json in the layout (exports write it last: is the tar complete?)".into(),
        )
    })?;
    finish(&mut staged, upstreams, &index, options, started)
}

fn check_layout(bytes: &[u8]) -> Result<(), AirgapError> {
    #[derive(serde::Deserialize)]
    struct Layout {
        #[serde(rename = "imageLayoutVersion")]
        version: String,
    }
    let layout: Layout = serde_json::from_slice(bytes)
        .map_err(|e| AirgapError::Layout(format!("oci-layout: {e}")))?;
    if !layout.version.starts_with("1.") {
        return Err(AirgapError::Layout(format!(
            "oci-layout: version {} is not supported",
            layout.version
        )));
    }
    Ok(())
}

/// What an image in the layout is called, under which upstream and repository.
struct Target {
    name: ImageRef,
    upstream: String,
    repo: crate::reference::RepoName,
}

/// Resolves a layout's name for an image: a full reference, one without
/// registry (the option's), or a bare tag (the option's repository).
fn resolve_name(
    raw: &str,
    upstreams: &Upstreams,
    options: &ImportOptions,
) -> Result<Target, AirgapError> {
    let bare_tag = !raw.contains(['/', ':', '@']);
    let full = if bare_tag {
        let repo = options.repository.as_deref().ok_or_else(|| {
            AirgapError::Layout(format!(
                "an image is named only {raw:?} in the layout: give --repository to import it under a name"
            ))
        })?;
        format!("{}/{repo}:{raw}", options.registry)
    } else {
        let first = raw.split('/').next().unwrap_or("");
        let has_registry =
            raw.contains('/') && (first.contains(['.', ':']) || first == "localhost");
        if has_registry {
            raw.to_string()
        } else {
            format!("{}/{raw}", options.registry)
        }
    };
    let name = ImageRef::parse(&full)
        .map_err(|e| AirgapError::Layout(format!("image name {raw:?}: {e}")))?;
    let up = upstreams
        .find(&name.registry)
        .ok_or_else(|| AirgapError::UnknownRegistry {
            image: name.to_string(),
            registry: name.registry.clone(),
        })?;
    Ok(Target {
        upstream: up.name().to_string(),
        repo: up.normalize(name.repository.clone()),
        name,
    })
}

/// Checks every image `index.json` names, then commits and tags them.
fn finish(
    staged: &mut Staged,
    upstreams: &Upstreams,
    index: &[u8],
    options: &ImportOptions,
    started: Instant,
) -> Result<ImportReport, AirgapError> {
    let index: Document = serde_json::from_slice(index)
        .map_err(|e| AirgapError::Layout(format!("index.json: {e}")))?;
    let mut images = Vec::new();
    for desc in &index.manifests {
        let raw = desc
            .annotations
            .get("io.containerd.image.name")
            .or_else(|| desc.annotations.get("org.opencontainers.image.ref.name"));
        let target = raw
            .map(|raw| resolve_name(raw, upstreams, options))
            .transpose()?;
        let mut parts = Vec::new();
        if !staged.walk(desc, "index.json", true, &mut parts)? {
            return Err(AirgapError::Layout(format!(
                "{} named by index.json is missing from the layout",
                desc.digest
            )));
        }
        images.push((target, parts));
    }
    // Everything checked: now it becomes visible. Each digest is pinned until the
    // import ends, so eviction cannot take what it adds before the tags name it.
    let store = staged.store.clone();
    let mut report = ImportReport::default();
    let mut pins = HashMap::new();
    for (_, parts) in &images {
        for part in parts {
            if pins.contains_key(&part.digest) {
                continue;
            }
            pins.insert(part.digest.clone(), store.pin(&part.digest));
            report.blobs += 1;
            // The record first, then the file (as a download does): a request
            // that finds the file finds what it is.
            if let Some(media_type) = &part.manifest_type {
                store.index().set_manifest(
                    &part.digest,
                    &ManifestRecord {
                        media_type: media_type.clone(),
                    },
                )?;
            }
            let (tmp, size) = staged.files[&part.digest].clone();
            if store.blob_size(&part.digest).is_none() {
                store.commit(&tmp, &part.digest)?;
                report.added += 1;
                report.bytes += size;
            }
            // Committed (or there already): the staged copy goes now; on an
            // error above it stays listed, and `Staged` removes it.
            staged.files.remove(&part.digest);
            let _ = std::fs::remove_file(&tmp);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for (target, parts) in &images {
        let Some(target) = target else {
            report.unnamed.push(parts[0].digest.to_string());
            continue;
        };
        for part in parts {
            store.link(&target.upstream, &target.repo, &part.digest)?;
        }
        let top = &parts[0];
        if let Some(tag) = &target.name.tag {
            store.index().set_tag(
                &target.upstream,
                &target.repo,
                tag,
                &TagRecord {
                    digest: top.digest.to_string(),
                    media_type: top.manifest_type.clone().unwrap_or_default(),
                    fetched_at_ms: now,
                },
            )?;
        }
        report.images.push(target.name.to_string());
    }
    store.flush()?;
    report.elapsed = started.elapsed();
    Ok(report)
}
