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
use std::collections::HashMap;
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
    /// Another process has the data directory open.
    #[error("data directory {path} is in use by {holder}; stop it first, or seed and import through it (--server)")]
    InUse {
        /// The data directory.
        path: PathBuf,
        /// Who holds it, as well as we know (`process 1234`).
        holder: String,
    },
}

/// The data directory's lock: one process at a time opens a store. The lock
/// file holds the owner's PID, so the one refused can say who holds it.
pub struct Lock {
    _file: fs::File,
}

impl Lock {
    /// Takes the lock on the data directory `root` (created if missing), or
    /// fails at once naming the process holding it.
    pub fn take(root: &Path) -> Result<Lock, StoreError> {
        use fs2::FileExt;
        use std::io::{Read, Seek, Write};
        fs::create_dir_all(root).map_err(io_at(root))?;
        let path = root.join("lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_at(&path))?;
        if file.try_lock_exclusive().is_err() {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => "another process".to_string(),
                pid => format!("process {pid}"),
            };
            return Err(StoreError::InUse {
                path: root.to_path_buf(),
                holder,
            });
        }
        file.set_len(0)
            .and_then(|_| file.rewind())
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(io_at(&path))?;
        Ok(Lock { _file: file })
    }
}

/// What [`Store::verify`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Files checked.
    pub files: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// Files whose bytes do not match their name (moved to `quarantine/` when repairing).
    pub bad: Vec<PathBuf>,
    /// Manifests recognised (by [`Store::rebuild_index`]).
    pub manifests: u64,
}

/// The media type of a manifest document, or `None` if the bytes are not one.
fn manifest_media_type(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let doc: Doc = serde_json::from_slice(bytes).ok()?;
    if doc.schema_version != Some(2) {
        return None;
    }
    match (
        doc.media_type,
        doc.manifests.is_some(),
        doc.layers.is_some(),
    ) {
        (Some(t), _, _) if t.contains("manifest") || t.contains("index") => Some(t),
        (None, true, _) => Some("application/vnd.oci.image.index.v1+json".into()),
        (None, false, true) => Some("application/vnd.oci.image.manifest.v1+json".into()),
        _ => None,
    }
}

/// Manifests larger than this are not read for their references during eviction.
const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;

/// The digests a manifest names: an image's config and layers, an index's manifests.
fn references(bytes: &[u8]) -> Vec<Digest> {
    #[derive(serde::Deserialize)]
    struct Descriptor {
        digest: String,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        config: Option<Descriptor>,
        #[serde(default)]
        layers: Vec<Descriptor>,
        #[serde(default)]
        manifests: Vec<Descriptor>,
    }
    let Ok(doc) = serde_json::from_slice::<Doc>(bytes) else {
        return Vec::new();
    };
    doc.config
        .into_iter()
        .chain(doc.layers)
        .chain(doc.manifests)
        .filter_map(|d| d.digest.parse().ok())
        .collect()
}

/// Whether sled's error says the index itself is unreadable (as opposed to the
/// disk being full, a permission, or another process holding it: those must
/// not cost the index).
fn is_corruption(e: &sled::Error) -> bool {
    match e {
        sled::Error::Corruption { .. }
        | sled::Error::Unsupported(_)
        | sled::Error::ReportableBug(_) => true,
        sled::Error::Io(io) => {
            !is_lock_error(e)
                && matches!(
                    io.kind(),
                    io::ErrorKind::InvalidData
                        | io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::InvalidInput
                )
        }
        _ => false,
    }
}

/// Whether sled failed because another process holds the directory.
/// (sled 0.34 wraps the `flock` failure in an error of kind `Other` whose text
/// names it, so both are checked: mistaking a live index for a broken one would
/// move a running cache's index aside.)
pub fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == io::ErrorKind::WouldBlock
            || io.raw_os_error() == Some(11)
            || io.to_string().contains("could not acquire lock"))
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Space kept free on the data directory's disk beyond a download's size.
const ROOM_MARGIN: u64 = 1024 * 1024;

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
    /// Bytes under `blobs/`: counted at open, kept up to date by commits and evictions.
    usage: AtomicU64,
    /// Files under `blobs/`, kept like `usage`.
    files: AtomicU64,
    /// The size cap, if any.
    cap: Option<Cap>,
    /// Whether data and directory entries are fsynced before a file counts as stored.
    fsync: bool,
    /// Files being read; never evicted. A std mutex: held only to count.
    pins: std::sync::Mutex<std::collections::HashMap<Digest, usize>>,
    /// Whether an eviction is running (one at a time).
    evicting: std::sync::atomic::AtomicBool,
    /// Files evicted since start, and their bytes.
    evicted: (AtomicU64, AtomicU64),
    /// Digests whose access is being recorded now. A std mutex: held only to
    /// insert or remove.
    touching: std::sync::Mutex<std::collections::HashSet<Digest>>,
    /// Held while the store is open: one process per data directory.
    _lock: Lock,
    /// Bytes promised to downloads under way (see [`Room`]), so concurrent
    /// downloads cannot together cross the cap or overfill the disk.
    reserved: AtomicU64,
}

/// Room on disk held for one download until it is dropped (after the commit,
/// which counts the bytes as stored, or after a failure).
pub struct Room {
    store: Store,
    size: u64,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.store
            .inner
            .reserved
            .fetch_sub(self.size, Ordering::SeqCst);
    }
}

/// Keeps a stored file from eviction while it lives.
pub struct Pin {
    store: Store,
    digest: Digest,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.store.inner.pins.lock().expect("pins poisoned");
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

/// A size cap: past `high` bytes, evict least recently used files down to `low`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// The configured `max_size`.
    pub max: u64,
    /// Eviction starts above this.
    pub high: u64,
    /// Eviction stops at or below this.
    pub low: u64,
}

/// What an eviction removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EvictReport {
    /// Files removed.
    pub files: u64,
    /// Bytes freed.
    pub bytes: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root` and empties `tmp/`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Store::open_with(root, None, true)
    }

    /// Like [`Store::open`], evicting least recently used files past `cap`'s
    /// high watermark until usage is under its low one, and fsyncing (the
    /// durable default) or not (for disposable storage).
    pub fn open_with(root: &Path, cap: Option<Cap>, fsync: bool) -> Result<Store, StoreError> {
        let lock = Lock::take(root)?;
        let blobs = root.join("blobs");
        let tmp = root.join("tmp");
        fs::create_dir_all(&blobs).map_err(io_at(&blobs))?;
        // (The data directory's lock, taken above, keeps a second process from
        // touching the running one's downloads; the index has its own lock too.)
        let index_dir = root.join("index");
        let (index, rebuilt) = match Index::open(&index_dir) {
            Ok(index) => (index, false),
            Err(StoreError::Index(e)) if is_corruption(&e) => {
                // The files are the truth: an unreadable index is set aside and
                // rebuilt from them rather than keeping the cache from starting.
                let aside = root.join(format!("index.broken-{}", unix_secs()));
                tracing::warn!(error = %e, aside = %aside.display(), "index unreadable; rebuilding it from the blob files");
                fs::rename(&index_dir, &aside).map_err(io_at(&aside))?;
                (Index::open(&index_dir)?, true)
            }
            Err(e) => return Err(e),
        };
        // Anything left in tmp/ is a download a previous process never finished.
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(io_at(&tmp))?;
        }
        fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
        let store = Store {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                index,
                next_tmp: AtomicU64::new(0),
                usage: AtomicU64::new(0),
                files: AtomicU64::new(0),
                cap,
                fsync,
                pins: Default::default(),
                evicting: false.into(),
                evicted: Default::default(),
                reserved: AtomicU64::new(0),
                touching: Default::default(),
                _lock: lock,
            }),
        };
        let sizes: Vec<u64> = store
            .files()?
            .iter()
            .filter_map(|(_, p)| fs::metadata(p).ok())
            .map(|m| m.len())
            .collect();
        store
            .inner
            .usage
            .store(sizes.iter().sum(), Ordering::Relaxed);
        store
            .inner
            .files
            .store(sizes.len() as u64, Ordering::Relaxed);
        store.after_write();
        if rebuilt {
            let report = store.rebuild_index(|_, _| {})?;
            tracing::warn!(
                files = report.files,
                bytes = report.bytes,
                quarantined = report.bad.len(),
                manifests = report.manifests,
                "index rebuilt"
            );
        }
        Ok(store)
    }

    /// Every stored file: its digest (from its name) and path. Files whose
    /// names are not digests are listed with `None`.
    pub fn files(&self) -> Result<Vec<(Option<Digest>, PathBuf)>, StoreError> {
        let mut out = Vec::new();
        let blobs = self.inner.root.join("blobs");
        for alg in fs::read_dir(&blobs).map_err(io_at(&blobs))? {
            let alg = alg.map_err(io_at(&blobs))?.path();
            let Some(alg_name) = alg.file_name().and_then(|n| n.to_str()).map(str::to_string)
            else {
                continue;
            };
            for prefix in fs::read_dir(&alg).map_err(io_at(&alg))? {
                let prefix = prefix.map_err(io_at(&alg))?.path();
                for file in fs::read_dir(&prefix).map_err(io_at(&prefix))? {
                    let path = file.map_err(io_at(&prefix))?.path();
                    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    let digest = format!("{alg_name}:{name}").parse::<Digest>().ok();
                    out.push((digest, path));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Re-hashes every stored file. With `repair`, a file whose bytes do not
    /// match its name is moved to `quarantine/` (never deleted: an operator may
    /// want to look). `progress` hears bytes hashed so far and the total.
    pub fn verify(
        &self,
        repair: bool,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        use std::io::Read;
        let files = self.files()?;
        let total: u64 = files
            .iter()
            .filter_map(|(_, p)| fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let mut report = VerifyReport::default();
        let mut done = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        for (digest, path) in files {
            let ok = match &digest {
                None => false,
                Some(digest) => {
                    let mut file = fs::File::open(&path).map_err(io_at(&path))?;
                    let mut hasher = digest.algorithm().hasher();
                    loop {
                        let n = file.read(&mut buf).map_err(io_at(&path))?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        done += n as u64;
                        report.bytes += n as u64;
                        progress(done, total);
                    }
                    hasher.finish() == *digest
                }
            };
            report.files += 1;
            if !ok {
                if repair {
                    let quarantine = self.inner.root.join("quarantine");
                    fs::create_dir_all(&quarantine).map_err(io_at(&quarantine))?;
                    let name = path
                        .strip_prefix(self.inner.root.join("blobs"))
                        .map(|p| p.to_string_lossy().replace('/', "-"))
                        .unwrap_or_else(|_| "unknown".into());
                    let dest = quarantine.join(name);
                    let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    fs::rename(&path, &dest).map_err(io_at(&dest))?;
                    self.count_removed(size);
                }
                report.bad.push(path);
            }
        }
        Ok(report)
    }

    /// Rebuilds what the index can learn from the files: verifies every file
    /// (quarantining bad ones) and records the media type of every manifest.
    /// Tags and repository links cannot be learnt from files; they come back on
    /// demand (a tag is fetched again, a link confirmed with a `HEAD`).
    pub fn rebuild_index(
        &self,
        progress: impl FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        let mut report = self.verify(true, progress)?;
        for (digest, path) in self.files()? {
            let Some(digest) = digest else { continue };
            let small = fs::metadata(&path)
                .map(|m| m.len() <= 4 * 1024 * 1024)
                .unwrap_or(false);
            if !small {
                continue;
            }
            let bytes = fs::read(&path).map_err(io_at(&path))?;
            if let Some(media_type) = manifest_media_type(&bytes) {
                self.inner
                    .index
                    .set_manifest(&digest, &ManifestRecord { media_type })?;
                report.manifests += 1;
            }
        }
        Ok(report)
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
        let size = fs::metadata(tmp).map(|m| m.len()).unwrap_or(0);
        // A link, not a rename: it never replaces. If the same digest landed
        // meanwhile (two tags of one manifest, say), that file is the same bytes;
        // keep it, drop ours, and count it once.
        let fresh = match fs::hard_link(tmp, &dest) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => {
                return Err(StoreError::Io {
                    path: dest,
                    source: e,
                })
            }
        };
        let _ = fs::remove_file(tmp);
        // The link is durable only once the directory entry is.
        if fresh && self.inner.fsync {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_at(dir))?;
        }
        if fresh {
            self.inner.usage.fetch_add(size, Ordering::Relaxed);
            self.inner.files.fetch_add(1, Ordering::Relaxed);
        }
        self.touch(digest);
        self.after_write();
        Ok(dest)
    }

    /// Flushes a file's data to disk before it is committed (unless the store
    /// was opened without fsync).
    pub fn sync(&self, file: &fs::File) -> io::Result<()> {
        if self.inner.fsync {
            file.sync_all()
        } else {
            Ok(())
        }
    }

    /// Holds room for a download of `size` bytes (0 when upstream did not say):
    /// under the cap's maximum and with a margin of disk left free, counting
    /// the room other downloads hold. Least recently used files are evicted to
    /// make it; `None` means even that was not enough.
    pub fn make_room(&self, size: u64) -> Option<Room> {
        let reserved = self.inner.reserved.fetch_add(size, Ordering::SeqCst) + size;
        let room = Room {
            store: self.clone(),
            size,
        };
        if let Some(cap) = self.inner.cap {
            // Others' downloads together with this one past the low watermark:
            // room would cost the whole cache; this one goes uncached. (One blob
            // alone that big may empty it: that is what LRU asks for.)
            if reserved > cap.low && reserved > size {
                return None;
            }
            // A write that would cross the cap's high watermark evicts first.
            if self.usage().saturating_add(reserved) > cap.high {
                self.evict_once(cap.low.saturating_sub(reserved), "before a download");
            }
            if self.usage().saturating_add(reserved) > cap.max {
                return None;
            }
        }
        // Only this download's size: what others wrote to tmp/ is already gone
        // from the free space, and if their rest does not fit, their readers
        // finish from upstream.
        let free = || fs2::available_space(&self.inner.root).unwrap_or(u64::MAX);
        let needed = size.saturating_add(ROOM_MARGIN);
        if free() >= needed {
            return Some(room);
        }
        let short = needed - free();
        self.evict_once(self.usage().saturating_sub(short), "to make room");
        (free() >= needed).then_some(room)
    }

    /// Evicts down to `target` unless an eviction is already running (whose
    /// result this one would only repeat).
    fn evict_once(&self, target: u64, why: &str) {
        if self.inner.evicting.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Err(e) = self.evict_to(target) {
            tracing::warn!(error = %e, why, "eviction failed");
        }
        self.inner.evicting.store(false, Ordering::SeqCst);
    }

    /// Whether a file can be created (and removed) under `tmp/` right now.
    pub fn writable(&self) -> bool {
        let probe = self.inner.root.join("tmp").join(format!(
            "ready-{}",
            self.inner.next_tmp.fetch_add(1, Ordering::Relaxed)
        ));
        let ok = fs::write(&probe, b"ok").is_ok();
        let _ = fs::remove_file(&probe);
        ok
    }

    /// Bytes stored under `blobs/`.
    pub fn usage(&self) -> u64 {
        self.inner.usage.load(Ordering::Relaxed)
    }

    /// Writes the index to disk now (before a command exits, say).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.index.flush()
    }

    /// Files stored under `blobs/`.
    pub fn file_count(&self) -> u64 {
        self.inner.files.load(Ordering::Relaxed)
    }

    /// Counts a file of `size` bytes out of `blobs/`.
    fn count_removed(&self, size: u64) {
        let _ = self
            .inner
            .usage
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(size))
            });
        let _ = self
            .inner
            .files
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some(f.saturating_sub(1))
            });
    }

    /// The size cap, if any.
    pub fn cap(&self) -> Option<Cap> {
        self.inner.cap
    }

    /// Files and bytes evicted since start.
    pub fn evicted(&self) -> EvictReport {
        EvictReport {
            files: self.inner.evicted.0.load(Ordering::Relaxed),
            bytes: self.inner.evicted.1.load(Ordering::Relaxed),
        }
    }

    /// Records an access (a hit refreshes a file's place in the LRU order).
    /// A touch of a digest that another thread is recording right now is that
    /// one: a storm of hits on one manifest would otherwise be as many
    /// concurrent index writes (100 of them cost the storm benchmark 6-8 MiB
    /// of peak memory).
    pub fn touch(&self, digest: &Digest) {
        if !self
            .inner
            .touching
            .lock()
            .expect("touching poisoned")
            .insert(digest.clone())
        {
            return;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // Out of the set however this ends (even by a panic in the index).
        struct Done<'a>(&'a Store, &'a Digest);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                if let Ok(mut set) = self.0.inner.touching.lock() {
                    set.remove(self.1);
                }
            }
        }
        let _done = Done(self, digest);
        if let Err(e) = self.inner.index.touch(digest, now) {
            tracing::warn!(error = %e, "recording an access failed");
        }
    }

    /// Keeps `digest` from eviction until the returned guard is dropped.
    pub fn pin(&self, digest: &Digest) -> Pin {
        *self
            .inner
            .pins
            .lock()
            .expect("pins poisoned")
            .entry(digest.clone())
            .or_default() += 1;
        Pin {
            store: self.clone(),
            digest: digest.clone(),
        }
    }

    /// Past the high watermark, starts an eviction in the background (one at a time).
    fn after_write(&self) {
        let Some(Cap { high, low, .. }) = self.inner.cap else {
            return;
        };
        if self.usage() <= high || self.inner.evicting.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("pullthrough-evict".into())
            .spawn(move || {
                match store.evict_to(low) {
                    Ok(r) => tracing::info!(
                        files = r.files,
                        bytes = r.bytes,
                        usage = store.usage(),
                        "evicted"
                    ),
                    Err(e) => tracing::warn!(error = %e, "eviction failed"),
                }
                store.inner.evicting.store(false, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.inner.evicting.store(false, Ordering::SeqCst);
        }
    }

    /// Removes least recently used files (never a pinned one) until usage is at
    /// most `target`. Files with no recorded access count by their mtime.
    pub fn evict_to(&self, target: u64) -> Result<EvictReport, StoreError> {
        let mut report = EvictReport::default();
        if self.usage() <= target {
            return Ok(report);
        }
        let mut candidates: Vec<(u64, Digest, PathBuf, u64)> = self
            .files()?
            .into_iter()
            .filter_map(|(digest, path)| {
                let digest = digest?;
                let meta = fs::metadata(&path).ok()?;
                let mtime = meta
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?
                    .as_millis() as u64;
                let last = self.inner.index.last_access(&digest).unwrap_or(mtime);
                Some((last, digest, path, meta.len()))
            })
            .collect();
        // Whole images go together: a blob is as recent as the most recently
        // used manifest that names it (an index passes its time on to its
        // manifests first), so an image's layers leave with it, and a layer
        // shared with an image in use stays.
        let mut last: HashMap<Digest, u64> = candidates
            .iter()
            .map(|(t, d, _, _)| (d.clone(), *t))
            .collect();
        let mut edges = Vec::new();
        for (_, digest, path, size) in &candidates {
            if *size <= MAX_MANIFEST_BYTES && self.inner.index.manifest(digest)?.is_some() {
                if let Ok(bytes) = fs::read(path) {
                    edges.extend(references(&bytes).into_iter().map(|c| (digest.clone(), c)));
                }
            }
        }
        for _ in 0..2 {
            for (parent, child) in &edges {
                let t = last.get(parent).copied().unwrap_or(0);
                if let Some(c) = last.get_mut(child) {
                    *c = (*c).max(t);
                }
            }
        }
        for c in &mut candidates {
            c.0 = last[&c.1];
        }
        candidates.sort();
        for (_, digest, path, size) in candidates {
            if self.usage() <= target {
                break;
            }
            if self
                .inner
                .pins
                .lock()
                .expect("pins poisoned")
                .contains_key(&digest)
            {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::Io { path, source: e }),
            }
            // A download may have committed the same digest again since the
            // removal: its index entries are then fresh, not ours to forget.
            if !path.exists() {
                self.inner.index.forget(&digest)?;
            }
            self.count_removed(size);
            self.inner.evicted.0.fetch_add(1, Ordering::Relaxed);
            self.inner.evicted.1.fetch_add(size, Ordering::Relaxed);
            report.files += 1;
            report.bytes += size;
        }
        Ok(report)
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
            .and_then(|_| self.sync(&f))
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

    fn manifest_bytes() -> Vec<u8> {
        br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{},"layers":[]}"#.to_vec()
    }

    #[test]
    fn verify_finds_and_quarantines_files_that_do_not_match_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = Digest::sha256_of(b"good");
        store.put_small(&good, b"good").unwrap();
        let bad = Digest::sha256_of(b"original");
        store.put_small(&bad, b"original").unwrap();
        std::fs::write(store.blob_path(&bad), b"bit rot").unwrap();
        let report = store.verify(false, |_, _| {}).unwrap();
        assert_eq!((report.files, report.bad.len()), (2, 1));
        assert!(
            store.blob_path(&bad).exists(),
            "without repair nothing moves"
        );
        let report = store.verify(true, |_, _| {}).unwrap();
        assert_eq!(report.bad, vec![store.blob_path(&bad)]);
        assert!(!store.blob_path(&bad).exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("quarantine"))
                .unwrap()
                .count(),
            1
        );
        assert!(store.blob_path(&good).exists());
        assert!(store.verify(false, |_, _| {}).unwrap().bad.is_empty());
    }

    #[test]
    fn an_unreadable_index_is_rebuilt_from_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let manifest = Digest::sha256_of(&manifest_bytes());
        let layer = Digest::sha256_of(b"layer bytes");
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_small(&manifest, &manifest_bytes()).unwrap();
            store.put_small(&layer, b"layer bytes").unwrap();
        }
        // Scribble over every file of the index.
        for entry in std::fs::read_dir(dir.path().join("index")).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::write(&path, vec![0xA5; 4096]).unwrap();
            }
        }
        let store = Store::open(dir.path()).expect("starts despite the broken index");
        let record = store
            .index()
            .manifest(&manifest)
            .unwrap()
            .expect("manifest re-learnt");
        assert_eq!(
            record.media_type,
            "application/vnd.oci.image.manifest.v1+json"
        );
        assert!(store.index().manifest(&layer).unwrap().is_none());
        assert_eq!(store.read_small(&layer).unwrap(), b"layer bytes");
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("index.broken-")
            })
            .count();
        assert_eq!(aside, 1, "the broken index is kept aside for inspection");
    }

    #[test]
    fn eviction_removes_least_recently_used_files_and_never_a_pinned_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blobs: Vec<(Digest, Vec<u8>)> = (0..4u8)
            .map(|i| {
                let bytes = vec![i; 1000];
                (Digest::sha256_of(&bytes), bytes)
            })
            .collect();
        for (d, b) in &blobs {
            store.put_small(d, b).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(store.usage(), 4000);
        // Blob 0 is read again (now the most recent); blob 1 is being read.
        store.touch(&blobs[0].0);
        let pin = store.pin(&blobs[1].0);
        let report = store.evict_to(2000).unwrap();
        assert_eq!(
            report,
            EvictReport {
                files: 2,
                bytes: 2000
            }
        );
        assert_eq!(store.usage(), 2000);
        let kept: Vec<bool> = blobs
            .iter()
            .map(|(d, _)| store.blob_path(d).exists())
            .collect();
        assert_eq!(
            kept,
            [true, true, false, false],
            "LRU order, pinned blob 1 spared"
        );
        drop(pin);
        assert_eq!(store.evict_to(1000).unwrap().files, 1);
        assert!(
            !store.blob_path(&blobs[1].0).exists(),
            "unpinned, it is the oldest now"
        );
    }

    #[test]
    fn eviction_takes_whole_images_and_keeps_layers_an_image_in_use_shares() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = |fill: u8| {
            let bytes = vec![fill; 1000];
            let d = Digest::sha256_of(&bytes);
            store.put_small(&d, &bytes).unwrap();
            d
        };
        let (l1, l2, shared) = (blob(1), blob(2), blob(3));
        let image = |layers: &[&Digest]| {
            let layers: Vec<String> = layers
                .iter()
                .map(|d| format!(r#"{{"digest":"{d}","size":1000}}"#))
                .collect();
            let bytes = format!(
                r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","layers":[{}]}}"#,
                layers.join(",")
            );
            let d = Digest::sha256_of(bytes.as_bytes());
            store.put_small(&d, bytes.as_bytes()).unwrap();
            let media_type = "application/vnd.oci.image.manifest.v1+json".to_string();
            store
                .index()
                .set_manifest(&d, &ManifestRecord { media_type })
                .unwrap();
            d
        };
        let (m1, m2) = (image(&[&l1, &shared]), image(&[&l2, &shared]));
        // Image 1 pulled, then image 2, then image 1's manifest asked for again
        // (a node re-resolving a tag whose layers it has).
        for (t, d) in [
            (10, &m1),
            (11, &l1),
            (12, &shared),
            (20, &m2),
            (21, &l2),
            (22, &shared),
            (30, &m1),
        ] {
            store.index().touch(d, t).unwrap();
        }
        let image1 = 2000 + fs::metadata(store.blob_path(&m1)).unwrap().len();
        store.evict_to(image1).unwrap();
        let kept = |d: &Digest| store.blob_path(d).exists();
        assert!(kept(&m1) && kept(&l1) && kept(&shared), "image 1 whole");
        assert!(!kept(&m2) && !kept(&l2), "image 2 went, together");
    }

    #[test]
    fn room_held_by_one_download_counts_against_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let cap = Cap {
            max: 10_000,
            high: 9_000,
            low: 5_000,
        };
        let store = Store::open_with(dir.path(), Some(cap), false).unwrap();
        let first = store.make_room(6_000).expect("room for the first");
        assert!(store.make_room(6_000).is_none(), "both would cross the cap");
        drop(first);
        assert!(
            store.make_room(6_000).is_some(),
            "room once the first let go"
        );
    }

    #[test]
    fn the_same_digest_committed_twice_is_kept_and_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = Digest::sha256_of(b"same bytes");
        store.put_small(&digest, b"same bytes").unwrap();
        store.put_small(&digest, b"same bytes").unwrap();
        assert_eq!(store.usage(), 10);
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(store.read_small(&digest).unwrap(), b"same bytes");
    }

    #[test]
    fn a_second_process_on_the_same_directory_fails_before_touching_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let digest = Digest::sha256_of(b"x");
        let first = Store::open(dir.path()).unwrap();
        let in_flight = first.tmp_path(&digest);
        std::fs::write(&in_flight, b"downloading").unwrap();
        let refused = Store::open(dir.path()).err().expect("the store is locked");
        let message = refused.to_string();
        assert!(
            message.contains(&dir.path().display().to_string())
                && message.contains(&format!("process {}", std::process::id())),
            "names the directory and the holder: {message}"
        );
        assert!(
            in_flight.exists(),
            "the running store's download is untouched"
        );
    }
}
