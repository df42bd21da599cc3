//! One upstream download per digest, read by any number of clients while it lands.
//!
//! [`Flights::join`] hands the first caller a [`Role::Leader`] permit and
//! everyone else a [`Role::Reader`]. The leader's download runs in its own
//! task ([`download`]), so no client hanging up cancels it. It writes the body
//! to a temporary file while hashing it and publishes, through a `watch`
//! channel, how many bytes readers may read. The last chunk is withheld until
//! the digest has verified, so a body that arrives complete is the right one.
//! Then the file is fsynced and renamed into `blobs/`; readers holding the
//! temporary file open keep reading it (Linux keeps the inode alive), readers
//! arriving later open the final file. On failure the file is deleted and
//! every reader's body ends with an error, never cleanly.

use crate::reference::Digest;
use crate::store::{Store, StoreError};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// Largest read from disk: 512 KiB matched nginx's sendfile here (FIELD-NOTES,
/// "Load and measurement"); smaller reads cost throughput.
pub const READ_CHUNK: usize = 512 * 1024;
/// Smallest read, however many readers there are.
const MIN_READ_CHUNK: usize = 16 * 1024;
/// Chunks queued between a reader's disk thread and its HTTP body.
const BODY_QUEUE: usize = 2;
/// Bytes all readers together may hold in their queues. Each reader holds at
/// most `chunk * (BODY_QUEUE + 1)`, and the chunk shrinks as readers multiply, so
/// a storm of clients stays inside a fixed memory budget.
pub const READ_BUDGET: usize = 16 * 1024 * 1024;

/// Readers streaming right now, process-wide: the memory budget is the process's.
static ACTIVE_READERS: AtomicUsize = AtomicUsize::new(0);

/// Counts a reader for as long as it lives.
struct ReaderSlot;

impl ReaderSlot {
    fn take() -> ReaderSlot {
        ACTIVE_READERS.fetch_add(1, Ordering::Relaxed);
        ReaderSlot
    }

    /// How much to read next, given how many readers share the budget.
    fn chunk(&self) -> usize {
        let readers = ACTIVE_READERS.load(Ordering::Relaxed).max(1);
        (READ_BUDGET / (readers * (BODY_QUEUE + 1))).clamp(MIN_READ_CHUNK, READ_CHUNK)
    }
}

impl Drop for ReaderSlot {
    fn drop(&mut self) {
        ACTIVE_READERS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Chunks queued between the upstream body and the writer thread.
const WRITE_QUEUE: usize = 16;

/// Why a flight failed. Cloned to every reader.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlightError {
    /// Upstream refused or failed; the message says how.
    #[error("{0}")]
    Upstream(Arc<crate::upstream::UpstreamError>),
    /// Upstream's bytes did not hash to the digest asked for.
    #[error("upstream sent content that does not match {expected} (got {actual})")]
    DigestMismatch {
        /// The digest requested.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// Upstream's body was shorter or longer than it announced.
    #[error("upstream sent {actual} bytes where it announced {expected}")]
    SizeMismatch {
        /// Bytes announced.
        expected: u64,
        /// Bytes received.
        actual: u64,
    },
    /// Our side: the disk or the index failed.
    #[error("store: {0}")]
    Store(Arc<StoreError>),
    /// The download task ended without an outcome (it panicked).
    #[error("download abandoned")]
    Abandoned,
    /// Every client reading it went away and the policy is not to finish such downloads.
    #[error("every client left before the download finished")]
    Unwanted,
}

impl FlightError {
    /// Whether it happened on our side with upstream still willing: the disk
    /// failed, or every client left. A client then can still be served from
    /// upstream, uncached.
    pub fn is_local(&self) -> bool {
        matches!(self, FlightError::Store(_) | FlightError::Unwanted)
    }

    /// Whether upstream caused it (as opposed to our disk).
    pub fn is_upstream(&self) -> bool {
        !matches!(
            self,
            FlightError::Store(_) | FlightError::Abandoned | FlightError::Unwanted
        )
    }
}

fn store_error(e: StoreError) -> FlightError {
    FlightError::Store(Arc::new(e))
}

fn io_store_error(path: &std::path::Path, source: io::Error) -> FlightError {
    store_error(StoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Where a flight is.
#[derive(Debug, Clone)]
pub enum State {
    /// Waiting for upstream's answer.
    Starting,
    /// The body is landing; bytes `[0, visible)` of the temporary file may be read.
    Streaming {
        /// What upstream announced, if it did.
        size: Option<u64>,
        /// Verified-safe prefix readers may serve.
        visible: u64,
    },
    /// Verified and committed under `blobs/`.
    Done {
        /// The blob's size.
        size: u64,
    },
    /// Failed; the temporary file is gone.
    Failed(FlightError),
}

/// One download of one digest.
pub struct Flight {
    digest: Digest,
    /// The repository whose request started it (upstream confirmed it holds the digest).
    origin: String,
    tmp: PathBuf,
    done_path: PathBuf,
    state: watch::Sender<State>,
    /// Clients reading it now, and whether any ever did (prefetches have none).
    readers: AtomicUsize,
    had_reader: std::sync::atomic::AtomicBool,
    /// Every client that read from it, for the coalescing metric.
    served: AtomicUsize,
    /// How readers finish from upstream when our disk fails under them.
    resume: std::sync::OnceLock<Resume>,
}

/// Upstream's bytes of the blob from an offset on. A reader whose download
/// failed on our side (a full disk, a write error) finishes its response with
/// them instead of breaking off: the client's pull completes, uncached.
pub type Resume = Arc<
    dyn Fn(u64) -> futures_util::future::BoxFuture<'static, Result<Resumed, FlightError>>
        + Send
        + Sync,
>;

/// What a [`Resume`] got from upstream.
pub struct Resumed {
    /// The offset the body starts at: the one asked for, or 0 when upstream ignored the range.
    pub from: u64,
    /// Upstream's body.
    pub body: futures_util::stream::BoxStream<'static, Result<Bytes, FlightError>>,
}

impl Flight {
    /// The digest being downloaded.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// How many clients it served (see [`Flight::count_client`]).
    pub fn readers_served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Counts a client request on it, when it joins or leads (prefetches do
    /// not count). Counted at the join, not at the first read, so a download
    /// that ends before a joined client's first read still counts that client.
    pub fn count_client(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
    }

    /// The repository whose request started the download.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Waits until upstream has answered: the size it announced (if any), or why it failed.
    pub async fn started(&self) -> Result<Option<u64>, FlightError> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| !matches!(s, State::Starting))
            .await
            .expect("the flight owns its sender")
            .clone();
        match state {
            State::Starting => unreachable!("waited for a later state"),
            State::Streaming { size, .. } => Ok(size),
            State::Done { size } => Ok(Some(size)),
            State::Failed(e) => Err(e),
        }
    }

    /// Waits for the outcome: the committed size, or why it failed.
    pub async fn finished(&self) -> Result<u64, FlightError> {
        let mut rx = self.state.subscribe();
        let state = rx
            .wait_for(|s| matches!(s, State::Done { .. } | State::Failed(_)))
            .await
            .expect("the flight owns its sender")
            .clone();
        match state {
            State::Done { size } => Ok(size),
            State::Failed(e) => Err(e),
            _ => unreachable!("waited for an outcome"),
        }
    }

    /// Streams bytes `[start, end)` (to the end of the blob when `end` is `None`)
    /// as they land. The stream ends with an error if the flight fails.
    pub fn read(self: Arc<Self>, start: u64, end: Option<u64>) -> BodyStream {
        let (tx, rx) = mpsc::channel(BODY_QUEUE);
        let handle = tokio::runtime::Handle::current();
        self.readers.fetch_add(1, Ordering::SeqCst);
        self.had_reader.store(true, Ordering::SeqCst);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = self.pump(&handle, start, end, &tx) {
                let _ = tx.blocking_send(Err(e));
            }
            self.readers.fetch_sub(1, Ordering::SeqCst);
        });
        receiver_stream(rx)
    }

    /// Whether clients read it and every one of them has gone.
    fn unwanted(&self) -> bool {
        self.had_reader.load(Ordering::SeqCst) && self.readers.load(Ordering::SeqCst) == 0
    }

    /// Opens the bytes: the temporary file while downloading, else the final one.
    fn open(&self, handle: &tokio::runtime::Handle) -> io::Result<File> {
        let mut rx = self.state.subscribe();
        handle
            .block_on(rx.wait_for(|s| !matches!(s, State::Starting)))
            .map_err(|_| io::Error::other("flight vanished"))?;
        match File::open(&self.tmp) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // Renamed (done) or deleted (failed): which one, the outcome says.
                match handle.block_on(self.finished()) {
                    Ok(_) => File::open(&self.done_path),
                    Err(e) => Err(io::Error::other(e)),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn pump(
        &self,
        handle: &tokio::runtime::Handle,
        start: u64,
        end: Option<u64>,
        tx: &mpsc::Sender<io::Result<Bytes>>,
    ) -> io::Result<()> {
        let slot = ReaderSlot::take();
        let mut file = match self.open(handle) {
            Ok(file) => file,
            Err(e) => {
                return match self.resumable() {
                    Some(resume) => self.finish_from_upstream(handle, resume, None, start, end, tx),
                    None => Err(e),
                }
            }
        };
        file.seek(SeekFrom::Start(start))?;
        let mut pos = start;
        let mut rx = self.state.subscribe();
        loop {
            // A clone, so no lock on the state is held past this line.
            let state = rx.borrow_and_update().clone();
            let (readable, complete) = match &state {
                State::Starting => (0, None),
                State::Streaming { visible, .. } => (*visible, None),
                State::Done { size } => (*size, Some(*size)),
                State::Failed(e) => {
                    let e = io::Error::other(e.clone());
                    return match self.resumable() {
                        Some(resume) => {
                            self.finish_from_upstream(handle, resume, Some(&mut file), pos, end, tx)
                        }
                        None => Err(e),
                    };
                }
            };
            let limit = end.map_or(readable, |e| e.min(readable));
            let want = (limit.saturating_sub(pos) as usize).min(slot.chunk());
            // The chunk that ends a range waits for the verdict on the whole blob,
            // so a range of a lying download never ends cleanly.
            let ends_range = end.is_some_and(|e| pos + want as u64 >= e);
            if want > 0 && (!ends_range || complete.is_some()) {
                let chunk = read_chunk(&mut file, want)?;
                pos += want as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Ok(()); // the client hung up; the download goes on without it
                }
                continue;
            }
            if end.is_some_and(|e| pos >= e) || complete.is_some_and(|size| pos >= size) {
                return Ok(());
            }
            // Wait for more bytes, or notice at once that the client hung up, so
            // the flight knows how many readers it really has.
            let hung_up = handle.block_on(async {
                tokio::select! {
                    changed = rx.changed() => changed.map(|_| false),
                    _ = tx.closed() => Ok(true),
                }
            });
            match hung_up {
                Ok(false) => {}
                Ok(true) => return Ok(()),
                Err(_) => return Err(io::Error::other("flight vanished")),
            }
        }
    }
}

impl Flight {
    /// How to finish from upstream, when the flight failed on our side and the
    /// leader said how (a failure of upstream's is final: asking again is the
    /// client's call, with backoff).
    fn resumable(&self) -> Option<Resume> {
        let local = matches!(&*self.state.borrow(), State::Failed(e) if e.is_local());
        local.then(|| self.resume.get().cloned()).flatten()
    }

    /// Finishes a reader's bytes `[pos, end)` from upstream after our disk failed.
    /// The digest still guards the body: the prefix already served is hashed
    /// from this reader's descriptor (which outlives the deleted temporary
    /// file), the rest as it arrives, and the last chunk waits for the verdict
    /// (as `cache::verified` does for a body served whole; here the hash starts
    /// before the first byte this reader sends).
    ///
    /// Each reader resumes on its own: one upstream request per reader, not per
    /// blob, only while our disk is failing.
    fn finish_from_upstream(
        &self,
        handle: &tokio::runtime::Handle,
        resume: Resume,
        file: Option<&mut File>,
        pos: u64,
        end: Option<u64>,
        tx: &mpsc::Sender<io::Result<Bytes>>,
    ) -> io::Result<()> {
        tracing::warn!(digest = %self.digest, offset = pos, "download failed on our side; finishing from upstream uncached");
        let mut hasher = self.digest.algorithm().hasher();
        let mut hashed = 0u64;
        if let Some(file) = file {
            file.seek(SeekFrom::Start(0))?;
            while hashed < pos {
                let want = (pos - hashed).min(READ_CHUNK as u64) as usize;
                match read_chunk(file, want) {
                    Ok(chunk) => {
                        hasher.update(&chunk);
                        hashed += want as u64;
                    }
                    Err(_) => break,
                }
            }
        }
        if hashed < pos {
            hasher = self.digest.algorithm().hasher();
            hashed = 0;
        }
        let resumed = handle.block_on(resume(hashed)).map_err(io::Error::other)?;
        let mut at = resumed.from;
        if at != hashed {
            // Upstream ignored the range: hash it all again from the start.
            hasher = self.digest.algorithm().hasher();
            if at != 0 {
                return Err(io::Error::other(
                    "upstream resumed at an offset not asked for",
                ));
            }
        }
        let mut body = resumed.body;
        let mut held: Option<Bytes> = None;
        let end = end.unwrap_or(u64::MAX);
        while let Some(chunk) = handle.block_on(body.next()) {
            if tx.is_closed() {
                return Ok(()); // the client hung up: so does this download
            }
            let chunk = chunk.map_err(io::Error::other)?;
            hasher.update(&chunk);
            let (lo, hi) = (at, at + chunk.len() as u64);
            at = hi;
            let (from, to) = (lo.max(pos), hi.min(end));
            if from >= to {
                continue;
            }
            let part = chunk.slice((from - lo) as usize..(to - lo) as usize);
            if let Some(previous) = held.replace(part) {
                if tx.blocking_send(Ok(previous)).is_err() {
                    return Ok(());
                }
            }
        }
        let actual = hasher.finish();
        if actual != self.digest {
            return Err(io::Error::other(FlightError::DigestMismatch {
                expected: self.digest.to_string(),
                actual: actual.to_string(),
            }));
        }
        if let Some(last) = held {
            let _ = tx.blocking_send(Ok(last));
        }
        Ok(())
    }
}

/// Reads exactly `want` bytes into a fresh buffer. `read_to_end` fills spare
/// capacity without zeroing it first (std reads a `File` straight into it);
/// zeroing 512 KiB per chunk cost about 8% of warm-read CPU.
fn read_chunk(file: &mut File, want: usize) -> io::Result<Bytes> {
    let mut buf = Vec::with_capacity(want);
    file.take(want as u64).read_to_end(&mut buf)?;
    if buf.len() != want {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "blob file shorter than expected",
        ));
    }
    Ok(Bytes::from(buf))
}

/// A body: chunks of bytes, ending with an error if the bytes turned out bad.
pub type BodyStream = std::pin::Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

fn receiver_stream(rx: mpsc::Receiver<io::Result<Bytes>>) -> BodyStream {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// Streams `[start, end)` of a stored, verified file.
pub fn read_file(file: File, start: u64, end: u64) -> BodyStream {
    let (tx, rx) = mpsc::channel(BODY_QUEUE);
    tokio::task::spawn_blocking(move || {
        let result = (|| -> io::Result<()> {
            let slot = ReaderSlot::take();
            let mut file = file;
            file.seek(SeekFrom::Start(start))?;
            let mut pos = start;
            while pos < end {
                let want = ((end - pos) as usize).min(slot.chunk());
                let chunk = read_chunk(&mut file, want)?;
                pos += want as u64;
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    receiver_stream(rx)
}

/// A caller's part in a flight.
pub enum Role {
    /// First to ask: must start the download with [`download`] (or settle it).
    Leader(Permit),
    /// A download is already under way: read from it.
    Reader(Arc<Flight>),
}

/// Flights are per upstream: the same digest from two registries is two downloads.
type FlightKey = (String, Digest);

/// The map of downloads in progress; cheap to clone.
#[derive(Clone, Default)]
pub struct Flights {
    /// A std mutex: held only to look up, insert or remove, never across an await.
    map: Arc<Mutex<HashMap<FlightKey, Arc<Flight>>>>,
}

impl Flights {
    /// Joins the flight for `digest` from `upstream`, starting one if none is under way.
    pub fn join(&self, store: &Store, upstream: &str, digest: &Digest, origin: &str) -> Role {
        let key = (upstream.to_string(), digest.clone());
        let mut map = self.map.lock().expect("flight map poisoned");
        if let Some(f) = map.get(&key) {
            return Role::Reader(f.clone());
        }
        let flight = Arc::new(Flight {
            digest: digest.clone(),
            origin: origin.to_string(),
            tmp: store.tmp_path(digest),
            done_path: store.blob_path(digest),
            state: watch::channel(State::Starting).0,
            readers: AtomicUsize::new(0),
            had_reader: false.into(),
            served: AtomicUsize::new(0),
            resume: std::sync::OnceLock::new(),
        });
        map.insert(key.clone(), flight.clone());
        Role::Leader(Permit {
            flights: self.clone(),
            key,
            flight,
            settled: false,
        })
    }

    /// Downloads in progress now.
    pub fn in_progress(&self) -> usize {
        self.map.lock().expect("flight map poisoned").len()
    }

    /// What each download in progress is doing, for the status page.
    pub fn snapshot(&self) -> Vec<FlightView> {
        let flights: Vec<(String, Arc<Flight>)> = self
            .map
            .lock()
            .expect("flight map poisoned")
            .iter()
            .map(|((upstream, _), f)| (upstream.clone(), f.clone()))
            .collect();
        flights
            .into_iter()
            .map(|(upstream, f)| {
                let (bytes, size) = match &*f.state.borrow() {
                    State::Streaming { size, visible } => (*visible, *size),
                    State::Done { size } => (*size, Some(*size)),
                    State::Starting | State::Failed(_) => (0, None),
                };
                FlightView {
                    upstream,
                    repository: f.origin.clone(),
                    digest: f.digest.to_string(),
                    bytes,
                    size,
                    readers: f.readers.load(Ordering::SeqCst),
                }
            })
            .collect()
    }
}

/// One download in progress, as the status page shows it.
#[derive(Debug, Clone)]
pub struct FlightView {
    /// The upstream it comes from.
    pub upstream: String,
    /// The repository whose request started it.
    pub repository: String,
    /// What is being downloaded.
    pub digest: String,
    /// Bytes landed so far.
    pub bytes: u64,
    /// What upstream announced.
    pub size: Option<u64>,
    /// Clients reading it now.
    pub readers: usize,
}

/// The leader's right and duty to settle a flight. Dropping it unsettled fails the flight.
pub struct Permit {
    flights: Flights,
    key: FlightKey,
    flight: Arc<Flight>,
    settled: bool,
}

impl Permit {
    /// The flight this permit leads.
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// Ends the flight with `state` and removes it from the map, so the next
    /// request finds the blob in the store (done) or starts afresh (failed).
    fn settle(mut self, state: State) {
        self.settled = true;
        // Out of the map first: a request arriving now must not join a failed flight.
        self.flights
            .map
            .lock()
            .expect("flight map poisoned")
            .remove(&self.key);
        self.flight.state.send_replace(state);
    }

    /// Lets readers finish from upstream if the download fails on our side.
    /// Set it before the download starts.
    pub fn resume_with(&self, resume: Resume) {
        let _ = self.flight.resume.set(resume);
    }

    /// Settles as done without downloading: the store already had the blob.
    pub fn already_stored(self, size: u64) {
        self.settle(State::Done { size });
    }

    /// Settles as failed before any download began.
    pub fn fail(self, error: FlightError) {
        self.settle(State::Failed(error));
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.settled {
            if let Ok(mut map) = self.flights.map.lock() {
                map.remove(&self.key);
            }
            self.flight
                .state
                .send_replace(State::Failed(FlightError::Abandoned));
        }
    }
}

/// Called after the blob is committed and before readers are told it is done,
/// to record what the index needs (a manifest's media type, a repository link).
pub type OnCommit = Box<dyn FnOnce(&Store, u64) -> Result<(), StoreError> + Send>;

/// What a download does when every client reading it has gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenUnwanted {
    /// Finish it, so the next pull is a hit.
    Finish,
    /// Stop it and keep nothing.
    Stop,
}

/// What a download may be: the size upstream announced, and a cap.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `Content-Length`, if upstream sent one: the body must be exactly this long.
    pub size: Option<u64>,
    /// The body must not be longer than this (manifests have a cap; blobs do not).
    pub max: Option<u64>,
}

/// Runs a flight's download to its end: `body` is upstream's response body.
/// Spawn it: it must outlive every client.
///
/// The disk work runs on a thread of its own, not tokio's blocking pool: readers
/// park pool threads while they wait for bytes, so a writer drawn from the same
/// pool could starve behind them and never publish the bytes they wait for.
pub async fn download<S, E>(
    permit: Permit,
    store: Store,
    limits: Limits,
    body: S,
    on_commit: OnCommit,
    when_unwanted: WhenUnwanted,
) where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: Into<FlightError>,
{
    let (tx, rx) = mpsc::channel::<Option<Bytes>>(WRITE_QUEUE);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let flight = permit.flight.clone();
    let spawned = std::thread::Builder::new()
        .name("pullthrough-writer".into())
        .spawn(move || {
            let _ = done_tx.send(write(&flight, &store, limits, rx, on_commit));
        });
    if let Err(e) = spawned {
        let path = permit.flight.tmp.clone();
        permit.fail(store_error(StoreError::Io { path, source: e }));
        return;
    }
    let mut body = std::pin::pin!(body);
    let mut upstream_error = None;
    while let Some(chunk) = body.next().await {
        if when_unwanted == WhenUnwanted::Stop && permit.flight.unwanted() {
            upstream_error = Some(FlightError::Unwanted);
            break;
        }
        match chunk {
            Ok(bytes) => {
                if tx.send(Some(bytes)).await.is_err() {
                    break; // the writer failed; its error is the outcome
                }
            }
            Err(e) => {
                upstream_error = Some(e.into());
                break;
            }
        }
    }
    if upstream_error.is_none() {
        let _ = tx.send(None).await; // end of body: verify and commit
    }
    drop(tx);
    let outcome = match done_rx.await {
        Ok(Ok(size)) => State::Done { size },
        Ok(Err(e)) => State::Failed(upstream_error.unwrap_or(e)),
        Err(_) => State::Failed(FlightError::Abandoned),
    };
    if let State::Failed(e) = &outcome {
        tracing::warn!(digest = %permit.flight.digest, error = %e, "download failed");
    }
    permit.settle(outcome);
}

/// The writer thread: appends, hashes, publishes progress; verifies and commits at the end.
/// Returns an error (after deleting the temporary file) on any failure or a missing end mark.
fn write(
    flight: &Flight,
    store: &Store,
    limits: Limits,
    mut rx: mpsc::Receiver<Option<Bytes>>,
    on_commit: OnCommit,
) -> Result<u64, FlightError> {
    let tmp = flight.tmp.clone();
    let result = (|| {
        let mut file = File::create(&tmp).map_err(|e| io_store_error(&tmp, e))?;
        let size = limits.size;
        flight
            .state
            .send_replace(State::Streaming { size, visible: 0 });
        let mut hasher = flight.digest.algorithm().hasher();
        let mut written: u64 = 0;
        let mut ended = false;
        while let Some(msg) = rx.blocking_recv() {
            let Some(bytes) = msg else {
                ended = true;
                break;
            };
            file.write_all(&bytes)
                .map_err(|e| io_store_error(&tmp, e))?;
            hasher.update(&bytes);
            // Publish all but this chunk: the last one is released only after verification.
            let visible = written;
            written += bytes.len() as u64;
            if let Some(cap) = size.or(limits.max).filter(|cap| written > *cap) {
                return Err(FlightError::SizeMismatch {
                    expected: cap,
                    actual: written,
                });
            }
            flight
                .state
                .send_replace(State::Streaming { size, visible });
        }
        if !ended {
            return Err(FlightError::Abandoned);
        }
        if let Some(expected) = size.filter(|s| *s != written) {
            return Err(FlightError::SizeMismatch {
                expected,
                actual: written,
            });
        }
        let actual = hasher.finish();
        if actual != flight.digest {
            return Err(FlightError::DigestMismatch {
                expected: flight.digest.to_string(),
                actual: actual.to_string(),
            });
        }
        store.sync(&file).map_err(|e| io_store_error(&tmp, e))?;
        drop(file);
        // Index first, then the rename: once the file is visible under blobs/, its
        // links are already there, so no request sees it stored yet unlinked (and
        // asks upstream to confirm what upstream just served). An index entry
        // whose file never lands is harmless: the files are the truth.
        on_commit(store, written).map_err(store_error)?;
        store.commit(&tmp, &flight.digest).map_err(store_error)?;
        Ok(written)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;

impl From<crate::upstream::UpstreamError> for FlightError {
    fn from(e: crate::upstream::UpstreamError) -> FlightError {
        FlightError::Upstream(Arc::new(e))
    }
}
