//! The store: the only code that touches the disk.
//!
//! ```text
//! <root>/blobs/sha256/ab/abcd…   immutable, content-addressed files (blobs and manifests)
//! <root>/tmp/                    downloads in progress; emptied at start
//! <root>/index/                  sled: tags, manifest media types, repository links
//! ```
//! A file under `blobs/` exists only once its bytes hashed to its name: the
//! flight verifies, fsyncs, then renames into place and fsyncs the directory.
//! The files are the truth; the index only says what they mean.

mod index;

pub use index::{Index, ManifestRecord, TagRecord};

use crate::reference::{Digest, RepoName};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why the store failed; always an internal (our side) error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file operation failed.
    #[error("store I/O at {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The sled index failed.
    #[error("store index: {0}")]
    Index(#[from] sled::Error),
    /// An index record could not be decoded.
    #[error("store index record: {0}")]
    Record(#[from] serde_json::Error),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Handle on the data directory; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    index: Index,
    /// Makes temporary file names unique within this process.
    next_tmp: AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and empties `tmp/`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let blobs = root.join("blobs");
        let tmp = root.join("tmp");
        fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        // The index's lock first: a second process on the same directory fails here,
        // before it could touch the running one's downloads.
        let index = Index::open(&root.join("index"))?;
        // Anything left in tmp/ is a download a previous process never finished.
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_at(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        Ok(Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                index,
                next_tmp: AtomicU64::new(0),
            }),
        })
    }

    /// The metadata index.
    pub fn index(&self) -> &Index {
        &self.inner.index
    }

    /// Where the verified file for `digest` lives (whether or not it exists yet).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.inner
            .root
            .join("blobs")
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// The size of the stored file for `digest`, if it is stored.
    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(digest)).ok().map(|m| m.len())
    }

    /// A fresh path under `tmp/` for a download.
    pub fn tmp_path(&self, digest: &Digest) -> PathBuf {
        let n = self.inner.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.inner.root.join("tmp").join(format!(
            "{}-{}-{n}",
            digest.algorithm().as_str(),
            &digest.hex()[..16]
        ))
    }

    /// Moves a verified, fsynced temporary file into place as `digest`, durably.
    pub fn commit(&self, tmp: &Path, digest: &Digest) -> Result<PathBuf, StoreError> {
        let dest = self.blob_path(digest);
        let dir = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        fs::rename(tmp, &dest).map_err(io_at(&dest))?;
        // The rename is durable only once the directory entry is.
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_at(dir))?;
        Ok(dest)
    }

    /// Reads a small stored file (a manifest) whole.
    pub fn read_small(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(digest);
        fs::read(&path).map_err(io_at(&path))
    }

    /// Writes a small verified document (a manifest) durably under its digest.
    pub fn put_small(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        use std::io::Write;
        let tmp = self.tmp_path(digest);
        let mut f = fs::File::create(&tmp).map_err(io_at(&tmp))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(io_at(&tmp))?;
        self.commit(&tmp, digest).map(|_| ())
    }

    /// Records that `repo` on `upstream` is known (by upstream) to hold `digest`.
    pub fn link(&self, upstream: &str, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        self.inner.index.link(upstream, repo, digest)
    }

    /// Whether `repo` on `upstream` is known to hold `digest`.
    pub fn is_linked(&self, upstream: &str, repo: &RepoName, digest: &Digest) -> bool {
        self.inner.index.is_linked(upstream, repo, digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_empties_tmp_and_keeps_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(b"kept");
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_small(&digest, b"kept").unwrap();
            std::fs::write(store.tmp_path(&digest), b"half a download").unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(store.read_small(&digest).unwrap(), b"kept");
    }

    #[test]
    fn a_second_process_on_the_same_directory_fails_before_touching_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(b"x");
        let first = Store::open(dir.path()).unwrap();
        let in_flight = first.tmp_path(&digest);
        std::fs::write(&in_flight, b"downloading").unwrap();
        assert!(Store::open(dir.path()).is_err(), "the index is locked");
        assert!(
            in_flight.exists(),
            "the running store's download is untouched"
        );
    }
}
