//! OCI image layouts on disk (image-spec `image-layout.md`), for tests of export and import.
//!
//! ```ignore
//! layout::write(&Image::single(1), "docker.io/library/x:1", dir.path());
//! layout::pack(dir.path(), &tar);
//! assert_eq!(layout::names(dir.path()), [("docker.io/library/x:1".into(), img.digest().into())]);
//! ```
//! Layouts written here follow the spec literally (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), so they stand for any producer, not just our exporter.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::images::Image;

/// The annotation skopeo and our exporter name an image by.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation `ctr images import` reads.
pub const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Where the layout at `dir` keeps the blob `digest` (`sha256:…`).
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let (algorithm, hex) = digest.split_once(':').expect("a digest is algo:hex");
    dir.join("blobs").join(algorithm).join(hex)
}

/// Whether the layout at `dir` holds the blob `digest`.
pub fn has_blob(dir: &Path, digest: &str) -> bool {
    blob_path(dir, digest).is_file()
}

/// The layout's `index.json`, parsed.
pub fn index(dir: &Path) -> Value {
    let path = dir.join("index.json");
    let text = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `(name, digest)` of every entry of `index.json`, by its `ref.name` annotation (`""` if none).
pub fn names(dir: &Path) -> Vec<(String, String)> {
    index(dir)["manifests"]
        .as_array()
        .expect("index.json has manifests")
        .iter()
        .map(|m| {
            (
                m["annotations"][REF_NAME]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                m["digest"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// Writes `image` (every blob, every child of an index) as a layout at `dir`, named `name`.
pub fn write(image: &Image, name: &str, dir: &Path) {
    std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create blobs/sha256");
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("write oci-layout");
    let put = |digest: &str, bytes: &[u8]| {
        std::fs::write(blob_path(dir, digest), bytes).expect("write blob");
    };
    put(image.digest(), image.manifest());
    for child in image.children() {
        put(child.digest(), child.manifest());
    }
    for blob in image.blobs() {
        put(&blob.digest, &blob.bytes);
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": image.media_type(),
            "digest": image.digest(),
            "size": image.manifest().len(),
            "annotations": {REF_NAME: name},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap())
        .expect("write index.json");
}

/// Every regular file under `dir`, by path relative to it, with its bytes' digest.
pub fn files(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(at) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                let relative = path.strip_prefix(dir).unwrap().to_path_buf();
                found.insert(relative, super::images::sha256_digest(&bytes));
            }
        }
    }
    found
}

/// Packs the layout at `dir` into the tar file `tar` (entries relative, `oci-layout` first).
pub fn pack(dir: &Path, tar: &Path) {
    let mut builder = tar::Builder::new(std::fs::File::create(tar).expect("create tar"));
    builder
        .append_path_with_name(dir.join("oci-layout"), "oci-layout")
        .expect("add oci-layout");
    for relative in files(dir).keys() {
        if relative != Path::new("oci-layout") {
            builder
                .append_path_with_name(dir.join(relative), relative)
                .expect("add a file");
        }
    }
    builder.finish().expect("finish tar");
}

/// Unpacks the tar file `tar` into `dir`.
pub fn unpack(tar: &Path, dir: &Path) {
    let file = std::fs::File::open(tar).unwrap_or_else(|e| panic!("{}: {e}", tar.display()));
    tar::Archive::new(file)
        .unpack(dir)
        .unwrap_or_else(|e| panic!("unpack {}: {e}", tar.display()));
}

/// One entry of a tar file: its name, where its data starts, and its length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarEntry {
    /// The entry's path.
    pub name: String,
    /// The offset of its first data byte in the file (its header is the 512 bytes before).
    pub offset: u64,
    /// Its data's length.
    pub size: u64,
}

/// The entries of the tar file `tar`, in order.
pub fn entries(tar: &Path) -> Vec<TarEntry> {
    let file = std::fs::File::open(tar).unwrap_or_else(|e| panic!("{}: {e}", tar.display()));
    let mut archive = tar::Archive::new(file);
    archive
        .entries()
        .expect("read tar")
        .map(|e| {
            let e = e.expect("tar entry");
            TarEntry {
                name: e.path().expect("entry path").to_string_lossy().into_owned(),
                offset: e.raw_file_position(),
                size: e.size(),
            }
        })
        .collect()
}

/// Writes the first `len` bytes of the file `from` to `to`: a copy cut off.
pub fn truncate_copy(from: &Path, to: &Path, len: u64) {
    let bytes = std::fs::read(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    std::fs::write(to, &bytes[..len as usize]).expect("write the cut copy");
}

/// Copies the tar file `from` to `to`, passing each entry's bytes through `edit(name, bytes)`.
pub fn rewrite_tar(from: &Path, to: &Path, mut edit: impl FnMut(&str, Vec<u8>) -> Vec<u8>) {
    let file = std::fs::File::open(from).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    let mut archive = tar::Archive::new(file);
    let mut builder = tar::Builder::new(std::fs::File::create(to).expect("create tar"));
    for entry in archive.entries().expect("read tar") {
        let mut entry = entry.expect("tar entry");
        let name = entry
            .path()
            .expect("entry path")
            .to_string_lossy()
            .into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("read entry");
        let bytes = edit(&name, bytes);
        let mut header = entry.header().clone();
        header.set_size(bytes.len() as u64);
        header.set_cksum();
        builder
            .append_data(&mut header, &name, &bytes[..])
            .expect("write entry");
    }
    builder.finish().expect("finish tar");
}

/// Flips one bit of the byte at `offset` of the file at `path`, in place.
pub fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes[offset] ^= 0x01;
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}
