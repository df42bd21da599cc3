//! `pullthrough export`: seeded images as an OCI image layout, a directory or
//! a tar streamed from the store's files (no temporary copy).
//!
//! `index.json` names each image by its full reference (registry, repository,
//! tag) in `org.opencontainers.image.ref.name` (what skopeo's `oci:` and
//! `oci-archive:` transports look up) and in `io.containerd.image.name` (what
//! `ctr images import` and `docker load` read), so import restores tags under
//! the right upstream. An index is exported byte-identical, its digest kept;
//! platforms left out by `--platform` are simply absent.

use super::{AirgapError, Resolved};
use crate::reference::Digest;
use crate::store::Store;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What an export wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ExportReport {
    /// Images named in `index.json`.
    pub images: usize,
    /// Blobs written (manifests included).
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for ExportReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} images, {} blobs, {} written in {:.1}s ({:.1} MB/s)",
            self.images,
            self.blobs,
            bytesize::ByteSize(self.bytes),
            secs,
            self.bytes as f64 / 1e6 / secs.max(1e-9)
        )
    }
}

/// The `oci-layout` file's content.
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes `images` (all in the store) as a layout at `output`: a tar when the
/// name ends in `.tar`, else a directory (which must not exist or be empty).
pub fn write_layout(
    store: &Store,
    images: &[Resolved],
    output: &Path,
) -> Result<ExportReport, AirgapError> {
    let started = Instant::now();
    let mut blobs: BTreeMap<Digest, u64> = BTreeMap::new();
    let mut index = Vec::new();
    let mut named = std::collections::BTreeSet::new();
    for r in images {
        for c in std::iter::once(&r.top).chain(&r.parts) {
            blobs.insert(c.digest.clone(), c.size);
        }
        let name = r.image.to_string();
        if !named.insert(name.clone()) {
            continue;
        }
        index.push(serde_json::json!({
            "mediaType": r.top.manifest_type,
            "digest": r.top.digest.to_string(),
            "size": r.top.size,
            "annotations": {
                "org.opencontainers.image.ref.name": name,
                "io.containerd.image.name": name,
            },
        }));
    }
    let index = serde_json::to_vec_pretty(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": index,
    }))
    .expect("JSON values serialise");
    // Nothing exported may be evicted under us.
    let _pins: Vec<_> = blobs.keys().map(|d| store.pin(d)).collect();
    for (digest, size) in &blobs {
        let actual = store.blob_size(digest);
        if actual != Some(*size) {
            return Err(AirgapError::Layout(format!(
                "{digest} is not in the store with size {size} (found {actual:?}); seed again"
            )));
        }
    }
    let is_tar = output.extension().is_some_and(|e| e == "tar");
    if is_tar {
        write_tar(store, &blobs, &index, output)?;
    } else {
        write_dir(store, &blobs, &index, output)?;
    }
    Ok(ExportReport {
        images: named.len(),
        blobs: blobs.len(),
        bytes: blobs.values().sum(),
        elapsed: started.elapsed(),
    })
}

fn blob_name(digest: &Digest) -> String {
    format!("blobs/{}/{}", digest.algorithm().as_str(), digest.hex())
}

fn write_dir(
    store: &Store,
    blobs: &BTreeMap<Digest, u64>,
    index: &[u8],
    output: &Path,
) -> Result<(), AirgapError> {
    if output.exists() {
        let empty = std::fs::read_dir(output)
            .map_err(AirgapError::io(output))?
            .next()
            .is_none();
        if !empty {
            return Err(AirgapError::Layout(format!(
                "{} exists and is not empty",
                output.display()
            )));
        }
    }
    for digest in blobs.keys() {
        let dest = output.join(blob_name(digest));
        let dir = dest.parent().expect("blob paths have a parent");
        std::fs::create_dir_all(dir).map_err(AirgapError::io(dir))?;
        std::fs::copy(store.blob_path(digest), &dest).map_err(AirgapError::io(&dest))?;
    }
    // index.json last: a layout cut short has none, and no tool takes it for whole.
    let layout = output.join("oci-layout");
    std::fs::write(&layout, OCI_LAYOUT).map_err(AirgapError::io(&layout))?;
    let path = output.join("index.json");
    std::fs::write(&path, index).map_err(AirgapError::io(&path))
}

fn write_tar(
    store: &Store,
    blobs: &BTreeMap<Digest, u64>,
    index: &[u8],
    output: &Path,
) -> Result<(), AirgapError> {
    let partial = PathBuf::from(format!("{}.partial", output.display()));
    let result = (|| {
        let file = std::fs::File::create(&partial).map_err(AirgapError::io(&partial))?;
        let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let io = AirgapError::io(&partial);
        fn add(
            tar: &mut tar::Builder<impl Write>,
            name: &str,
            size: u64,
            data: &mut dyn std::io::Read,
        ) -> std::io::Result<()> {
            let mut header = tar::Header::new_ustar();
            header.set_size(size);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut header, name, data)
        }
        let result = (|| {
            add(
                &mut tar,
                "oci-layout",
                OCI_LAYOUT.len() as u64,
                &mut &OCI_LAYOUT[..],
            )?;
            for (digest, size) in blobs {
                let mut file = std::fs::File::open(store.blob_path(digest))?;
                add(&mut tar, &blob_name(digest), *size, &mut file)?;
            }
            add(&mut tar, "index.json", index.len() as u64, &mut &index[..])?;
            let mut out = tar.into_inner()?;
            out.flush()?;
            out.get_ref().sync_all()
        })();
        result.map_err(io)?;
        std::fs::rename(&partial, output).map_err(AirgapError::io(output))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}
