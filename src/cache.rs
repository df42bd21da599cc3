//! Cache policy: what to serve from the store, when to ask upstream, what to fetch.
//!
//! - Blobs and manifests by digest: a store hit is served (after upstream
//!   confirmed, once, that the asking repository holds the digest); a miss
//!   joins or starts the digest's flight.
//! - Manifests by tag: a mapping younger than `tag_ttl` is served as is; an
//!   older one is revalidated with `HEAD` and the manifest fetched by digest
//!   only if the digest changed; if upstream fails, the old mapping is served
//!   with a `Warning`.
//! - A client whose `Accept` lacks the type the tag points to gets what upstream
//!   gives it for its own `Accept`, never a type it did not ask for.

mod accept;
pub mod prefetch;

pub use accept::{Accept, MANIFEST_TYPES};

use crate::config::CacheConfig;
use crate::flight::{self, BodyStream, FlightError, Flights, Role};
use crate::metrics::{Metrics, Outcome, Route, Source};
use crate::reference::{Digest, RepoName, Tag};
use crate::store::{ManifestRecord, Store, StoreError, TagRecord};
use crate::upstream::{Answer, TagList, Upstream, UpstreamError, UpstreamErrorKind, Upstreams};
use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE};
use reqwest::Method;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Largest manifest accepted from upstream; Distribution's own default limit.
pub const MAX_MANIFEST_BYTES: u64 = 4 * 1024 * 1024;
/// Header upstream uses to name a manifest's digest.
const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Upstream failed or refused.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A download failed (upstream or disk).
    #[error(transparent)]
    Flight(#[from] FlightError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// One failure shared by every request that joined the same revalidation.
    #[error(transparent)]
    Shared(Arc<CacheError>),
}

impl CacheError {
    /// What upstream said, if the error came from upstream.
    pub fn upstream_kind(&self) -> Option<&UpstreamErrorKind> {
        match self {
            CacheError::Upstream(e) => Some(&e.kind),
            CacheError::Flight(FlightError::Upstream(e)) => Some(&e.kind),
            CacheError::Shared(e) => e.upstream_kind(),
            _ => None,
        }
    }

    /// Whether upstream (not the client, not our disk) caused it.
    pub fn is_upstream(&self) -> bool {
        match self {
            CacheError::Upstream(_) => true,
            CacheError::Flight(e) => e.is_upstream(),
            CacheError::Store(_) => false,
            CacheError::Shared(e) => e.is_upstream(),
        }
    }

    /// Whether upstream said it does not have the thing.
    pub fn is_not_found(&self) -> bool {
        self.upstream_kind() == Some(&UpstreamErrorKind::NotFound)
    }
}

/// A manifest ready to serve.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its digest (of exactly `bytes`).
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes, as upstream served them.
    pub bytes: Bytes,
    /// Served from an old mapping because upstream failed.
    pub stale: bool,
}

/// A blob answer: the size and, for `GET`, a body of the requested range.
pub struct BlobAnswer {
    /// The blob's whole size, when known before the body ends.
    pub size: Option<u64>,
    /// The byte range served, `[start, end)`, if a `Range` was honoured.
    pub range: Option<(u64, u64)>,
    /// The body; `None` for `HEAD`.
    pub body: Option<BodyStream>,
}

/// How a leader's download goes: through the store, or (no room) straight to its client.
enum Lead {
    Flight(Arc<flight::Flight>),
    Direct(Answer),
}

/// Upstream's body passed straight through, hashed on the way; the last chunk
/// is held back until the digest has verified, so a wrong body never ends cleanly.
fn verified(up: &Upstream, resp: Answer, digest: Digest) -> BodyStream {
    use futures_util::StreamExt;
    let name = up.name().to_string();
    let body = resp.bytes_stream();
    let state = (
        Box::pin(body),
        Some(digest.algorithm().hasher()),
        None::<Bytes>,
    );
    Box::pin(futures_util::stream::unfold(
        state,
        move |(mut body, mut hasher, mut held)| {
            let (digest, name) = (digest.clone(), name.clone());
            async move {
                let h = hasher.as_mut()?;
                loop {
                    match body.next().await {
                        Some(Ok(chunk)) => {
                            h.update(&chunk);
                            if let Some(previous) = held.replace(chunk) {
                                return Some((Ok(previous), (body, hasher, held)));
                            }
                        }
                        Some(Err(e)) => {
                            let e = std::io::Error::other(format!("upstream {name}: {e}"));
                            return Some((Err(e), (body, None, None)));
                        }
                        None => {
                            let actual = hasher.take()?.finish();
                            let last = if actual == digest {
                                Ok(held.take().unwrap_or_default())
                            } else {
                                Err(std::io::Error::other(format!(
                                    "upstream {name} sent {actual} for {digest}"
                                )))
                            };
                            return Some((last, (body, None, None)));
                        }
                    }
                }
            }
        },
    ))
}

/// Upstream's body as a flight takes it: counted into `upstream_bytes`, its
/// errors as upstream's.
fn upstream_body(
    up: &Upstream,
    resp: Answer,
) -> impl futures_util::Stream<Item = Result<Bytes, FlightError>> + Send + 'static {
    let (name, metrics) = (up.name().to_string(), up.metrics().clone());
    futures_util::StreamExt::map(resp.bytes_stream(), move |chunk| match chunk {
        Ok(chunk) => {
            metrics.upstream_bytes(&name, chunk.len() as u64);
            Ok(chunk)
        }
        Err(e) => Err(FlightError::from(UpstreamError {
            upstream: name.clone(),
            kind: crate::upstream::transport_kind(&e),
        })),
    })
}

/// A blob straight from upstream to one client, verified on the way, nothing kept.
fn direct(up: &Upstream, resp: Answer, digest: &Digest, metrics: &Metrics) -> BlobAnswer {
    BlobAnswer {
        size: header_len(&resp),
        range: None,
        body: Some(counted(
            verified(up, resp, digest.clone()),
            metrics,
            Source::flight,
        )),
    }
}

/// Keeps `pin` (the blob safe from eviction) for as long as `body` lives.
fn pinned(body: BodyStream, pin: crate::store::Pin) -> BodyStream {
    Box::pin(futures_util::StreamExt::map(body, move |chunk| {
        let _held = &pin;
        chunk
    }))
}

/// Counts a body's bytes into `served_bytes` as they go out.
fn counted(body: BodyStream, metrics: &Metrics, source: Source) -> BodyStream {
    use futures_util::StreamExt;
    let metrics = metrics.clone();
    Box::pin(body.inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            metrics.served(source, bytes.len() as u64);
        }
    }))
}

/// A `Range` request that cannot be satisfied.
#[derive(Debug, Clone, Copy)]
pub struct Unsatisfiable {
    /// The blob's size, for `Content-Range: bytes */size`.
    pub size: u64,
}

/// A single byte range as a client asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=start-` or `bytes=start-last`.
    From {
        /// First byte.
        start: u64,
        /// Last byte, inclusive.
        last: Option<u64>,
    },
    /// `bytes=-n`: the last `n` bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses a `Range` header holding exactly one byte range (RFC 9110 §14.1.2).
    /// `None` means "ignore the header and serve everything", as the RFC allows for
    /// forms we do not support (multiple ranges, other units).
    pub fn parse(header: &str) -> Option<ByteRange> {
        let spec = header.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.trim().split_once('-')?;
        if a.is_empty() {
            return b.parse().ok().map(ByteRange::Suffix);
        }
        let start = a.parse().ok()?;
        let last = if b.is_empty() {
            None
        } else {
            let last: u64 = b.parse().ok()?;
            if last < start {
                return None;
            }
            Some(last)
        };
        Some(ByteRange::From { start, last })
    }

    /// The range `[start, end)` within a blob of `size` bytes.
    pub fn resolve(self, size: u64) -> Result<(u64, u64), Unsatisfiable> {
        match self {
            ByteRange::From { start, last } if start < size => {
                Ok((start, last.map_or(size, |l| l.min(size - 1) + 1)))
            }
            ByteRange::Suffix(n) if n > 0 && size > 0 => Ok((size - n.min(size), size)),
            _ => Err(Unsatisfiable { size }),
        }
    }
}

/// The cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

/// Requests revalidating the same tag share one upstream `HEAD`.
type Revalidation = Arc<tokio::sync::OnceCell<Result<TagRecord, Arc<CacheError>>>>;

struct Inner {
    store: Store,
    flights: Flights,
    /// A std mutex: held only to find or insert a tag's revalidation, never across
    /// an await. Keyed by upstream, repository and tag (with `\0` and the Accept
    /// header for a per-Accept variant).
    revalidations: std::sync::Mutex<HashMap<(String, RepoName, String), Revalidation>>,
    upstreams: Upstreams,
    policy: CacheConfig,
    metrics: Metrics,
    /// Bounds prefetch downloads per upstream (by configured name).
    prefetch_slots: HashMap<String, Arc<tokio::sync::Semaphore>>,
}

/// How long ago upstream last confirmed a tag mapping.
fn age(record: &TagRecord) -> Duration {
    Duration::from_millis(now_ms().saturating_sub(record.fetched_at_ms))
}

/// Milliseconds since the Unix epoch: tag ages are compared with ttls of a few seconds.
/// The tag record for a manifest just fetched by tag.
fn record_now(m: Manifest) -> TagRecord {
    TagRecord {
        digest: m.digest.to_string(),
        media_type: m.media_type,
        fetched_at_ms: now_ms(),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn header_len(resp: &Answer) -> Option<u64> {
    resp.headers()
        .get(CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn header_str(resp: &Answer, name: impl reqwest::header::AsHeaderName) -> Option<String> {
    resp.headers()
        .get(name)?
        .to_str()
        .ok()
        .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
}

impl Cache {
    /// A cache over `store`, fetching from `upstreams`, with the `[cache]` policy.
    pub fn new(store: Store, upstreams: Upstreams, policy: CacheConfig, metrics: Metrics) -> Cache {
        let prefetch_slots = upstreams
            .all()
            .iter()
            .map(|u| {
                let slots = tokio::sync::Semaphore::new(policy.prefetch_concurrency);
                (u.name().to_string(), Arc::new(slots))
            })
            .collect();
        Cache {
            inner: Arc::new(Inner {
                store,
                flights: Flights::default(),
                revalidations: Default::default(),
                upstreams,
                policy,
                metrics,
                prefetch_slots,
            }),
        }
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The configured upstreams.
    pub fn upstreams(&self) -> &Upstreams {
        &self.inner.upstreams
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Downloads in progress.
    pub fn flights(&self) -> &Flights {
        &self.inner.flights
    }

    /// A manifest by tag, following the tag policy in the module docs.
    pub async fn manifest_by_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<Manifest, CacheError> {
        let policy = &self.inner.policy;
        let old = self.inner.store.index().tag(up.name(), repo, tag)?;
        if let Some(record) = &old {
            let expired = age(record) >= policy.tag_ttl;
            // Low on rate-limit budget: serve what we have rather than spend a pull on a HEAD.
            if !expired || up.health().budget_low() {
                return self.serve_tag(up, repo, tag, record, accept, expired).await;
            }
        }
        let stand_in = |e: &CacheError| old.as_ref().filter(|r| self.may_stand_in(e, r));
        let result = match self.revalidate(up, repo, tag, old.is_none()).await {
            Ok(record) => self.serve_tag(up, repo, tag, &record, accept, false).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) => match stand_in(&e) {
                Some(record) => {
                    tracing::warn!(upstream = up.name(), %repo, %tag, error = %e, "serving stale tag");
                    self.serve_tag(up, repo, tag, record, accept, true)
                        .await
                        .map_err(|_| e)
                }
                None => Err(e),
            },
            ok => ok,
        }
    }

    /// Serves the manifest a tag record points to (by digest), or what upstream
    /// gives a client whose `Accept` lacks its type.
    async fn serve_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
        accept: &Accept,
        stale: bool,
    ) -> Result<Manifest, CacheError> {
        if !accept.allows(&record.media_type) {
            return self.manifest_for_accept(up, repo, tag, accept).await;
        }
        let digest = self.record_digest(record)?;
        let mut manifest = self.manifest_by_digest(up, repo, &digest).await?;
        manifest.stale = stale;
        if stale {
            self.inner.metrics.stale_served(up.name());
            self.inner.metrics.outcome(Route::manifest, Outcome::stale);
        }
        Ok(manifest)
    }

    fn record_digest(&self, record: &TagRecord) -> Result<Digest, CacheError> {
        record.digest.parse().map_err(|_| {
            CacheError::Store(StoreError::Record(serde::de::Error::custom(format!(
                "tag record holds an invalid digest {:?}",
                record.digest
            ))))
        })
    }

    /// Whether an old mapping may stand in for what upstream failed to give:
    /// on an upstream failure (not a 404, unless configured), if it is not
    /// older than `max_stale`.
    fn may_stand_in(&self, e: &CacheError, record: &TagRecord) -> bool {
        let policy = &self.inner.policy;
        e.is_upstream()
            && (!e.is_not_found() || policy.serve_stale_on_not_found)
            && policy.max_stale.is_none_or(|max| age(record) <= max)
    }

    /// Revalidates `tag`, joining a revalidation already under way. If the request
    /// leading it goes away, the next waiter takes over (`OnceCell` semantics).
    async fn revalidate(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        cold: bool,
    ) -> Result<TagRecord, CacheError> {
        let key = (up.name().to_string(), repo.clone(), tag.to_string());
        self.once_per_key(key, || async {
            // A request that read the old record just before another one's
            // revalidation finished (and left the map) would ask upstream
            // again: the record as it is now may already be fresh.
            if let Ok(Some(now)) = self.inner.store.index().tag(up.name(), repo, tag) {
                if age(&now) < self.inner.policy.tag_ttl {
                    return Ok(now);
                }
            }
            self.inner
                .metrics
                .outcome(Route::manifest, Outcome::revalidated);
            self.refresh_tag(up, repo, tag, cold).await
        })
        .await
    }

    /// Runs `refresh` once for every request under `key` at the same time: the
    /// others wait for its result. If the request running it goes away, the next
    /// waiter takes over (`OnceCell` semantics).
    async fn once_per_key<F, Fut>(
        &self,
        key: (String, RepoName, String),
        refresh: F,
    ) -> Result<TagRecord, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<TagRecord, CacheError>>,
    {
        let cell = {
            let mut map = self
                .inner
                .revalidations
                .lock()
                .expect("revalidations poisoned");
            map.entry(key.clone()).or_default().clone()
        };
        let result = cell
            .get_or_init(|| async { refresh().await.map_err(Arc::new) })
            .await
            .clone();
        {
            let mut map = self
                .inner
                .revalidations
                .lock()
                .expect("revalidations poisoned");
            if map.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                map.remove(&key);
            }
        }
        result.map_err(CacheError::Shared)
    }

    /// Asks upstream what `tag` points to now, makes sure the manifest it names
    /// is in the store, and only then records the mapping: a failure fetching
    /// the manifest leaves the old mapping to serve stale.
    ///
    /// A tag never seen costs one request (a `GET` by tag: the manifest is needed
    /// anyway); a known one a `HEAD`, plus a `GET` by digest only if it moved.
    async fn refresh_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        cold: bool,
    ) -> Result<TagRecord, CacheError> {
        let record = if cold {
            record_now(self.fetch_by_tag(up, repo, tag, MANIFEST_TYPES).await?)
        } else {
            let record = self.head_tag(up, repo, tag, MANIFEST_TYPES).await?;
            let digest = self.record_digest(&record)?;
            self.manifest_by_digest(up, repo, &digest).await?;
            record
        };
        self.inner
            .store
            .index()
            .set_tag(up.name(), repo, tag, &record)?;
        Ok(record)
    }

    /// Asks upstream what `tag` points to now (a `HEAD`). The caller records the
    /// answer only once the manifest it names is in hand, so a failure fetching it
    /// leaves the old mapping to serve.
    async fn head_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        accept: &str,
    ) -> Result<TagRecord, CacheError> {
        let resp = up
            .manifest(Method::HEAD, repo, tag.as_str(), accept)
            .await?;
        let digest =
            header_str(&resp, DOCKER_CONTENT_DIGEST).and_then(|d| d.parse::<Digest>().ok());
        let media_type = header_str(&resp, CONTENT_TYPE);
        // Free the connection slot before a fallback request needs one.
        drop(resp);
        let record = match (digest, media_type) {
            (Some(digest), Some(media_type)) => TagRecord {
                digest: digest.to_string(),
                media_type,
                fetched_at_ms: now_ms(),
            },
            // Registries that leave the digest out of HEAD: fetch the tag and hash it.
            _ => record_now(self.fetch_by_tag(up, repo, tag, accept).await?),
        };
        Ok(record)
    }

    /// What upstream serves for `tag` to a client with this `Accept`. Recorded
    /// apart from the tag (as a variant for that `Accept`), under the same ttl and
    /// stale rules, so such clients cost no more upstream requests than others.
    async fn manifest_for_accept(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        accept: &Accept,
    ) -> Result<Manifest, CacheError> {
        let accept = accept.header_value();
        let index = self.inner.store.index();
        let ttl = self.inner.policy.tag_ttl;
        let old = index.variant(up.name(), repo, tag, &accept)?;
        if let Some(r) = old.as_ref().filter(|r| age(r) < ttl) {
            let digest = self.record_digest(r)?;
            return self.manifest_by_digest(up, repo, &digest).await;
        }
        // One revalidation per tag and Accept at a time, as for the tag itself.
        let key = (
            up.name().to_string(),
            repo.clone(),
            format!("{tag}\0{accept}"),
        );
        let refreshed = self
            .once_per_key(key, || async {
                if let Some(now) = index.variant(up.name(), repo, tag, &accept)? {
                    if age(&now) < ttl {
                        return Ok(now);
                    }
                }
                // Known: a HEAD (free on Docker Hub) says whether it moved. A
                // digest that changed is fetched by tag, not by digest: a
                // registry may convert for such a client (Distribution's signed
                // schema 1) into bytes it cannot serve by digest.
                let unchanged = match &old {
                    Some(old) => self
                        .head_tag(up, repo, tag, &accept)
                        .await?
                        .digest
                        .eq(&old.digest)
                        .then(|| old.clone()),
                    None => None,
                };
                let record = match unchanged {
                    Some(old) => TagRecord {
                        fetched_at_ms: now_ms(),
                        ..old
                    },
                    None => record_now(self.fetch_by_tag(up, repo, tag, &accept).await?),
                };
                index.set_variant(up.name(), repo, tag, &accept, &record)?;
                Ok(record)
            })
            .await;
        match refreshed {
            Ok(record) => {
                let digest = self.record_digest(&record)?;
                self.manifest_by_digest(up, repo, &digest).await
            }
            // The same rules as for the tag itself (`max_stale`, 404s).
            Err(e) if old.as_ref().is_some_and(|r| self.may_stand_in(&e, r)) => {
                let digest = self.record_digest(old.as_ref().expect("checked"))?;
                let mut m = self.manifest_by_digest(up, repo, &digest).await?;
                m.stale = true;
                self.inner.metrics.stale_served(up.name());
                Ok(m)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET`s a manifest by tag, stores it under the digest of its bytes.
    async fn fetch_by_tag(
        &self,
        up: &Upstream,
        repo: &RepoName,
        tag: &Tag,
        accept: &str,
    ) -> Result<Manifest, CacheError> {
        let resp = up.manifest(Method::GET, repo, tag.as_str(), accept).await?;
        let media_type = header_str(&resp, CONTENT_TYPE).unwrap_or_default();
        // A signed schema 1 manifest's digest covers its payload without the
        // signatures, not the bytes: nothing to check it against.
        let claimed = header_str(&resp, DOCKER_CONTENT_DIGEST)
            .and_then(|d| d.parse::<Digest>().ok())
            .filter(|_| !media_type.contains("prettyjws"));
        let bytes = read_manifest_body(up, resp).await?;
        let digest = match &claimed {
            Some(claimed) => claimed.same_algorithm_of(&bytes),
            None => Digest::sha256_of(&bytes),
        };
        if claimed.as_ref().is_some_and(|c| *c != digest) {
            return Err(up_error(
                up,
                UpstreamErrorKind::Invalid(format!(
                    "manifest bytes do not match the Docker-Content-Digest upstream sent ({})",
                    claimed.map(|c| c.to_string()).unwrap_or_default()
                )),
            )
            .into());
        }
        let store = &self.inner.store;
        if store.blob_size(&digest).is_none() {
            store.put_small(&digest, &bytes)?;
        }
        store.index().set_manifest(
            &digest,
            &ManifestRecord {
                media_type: media_type.clone(),
            },
        )?;
        store.link(up.name(), repo, &digest)?;
        Ok(Manifest {
            digest,
            media_type,
            bytes,
            stale: false,
        })
    }

    /// A manifest by digest: from the store, or through its flight.
    pub async fn manifest_by_digest(
        &self,
        up: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Manifest, CacheError> {
        let store = &self.inner.store;
        let metrics = &self.inner.metrics;
        let _pin = store.pin(digest);
        if store.blob_size(digest).is_some() {
            if let Some(record) = store.index().manifest(digest)? {
                self.confirm(up, repo, digest, true).await?;
                metrics.outcome(Route::manifest, Outcome::hit);
                return self.stored_manifest(digest, record.media_type);
            }
        }
        let flight = match self
            .inner
            .flights
            .join(store, up.name(), digest, repo.as_str())
        {
            Role::Reader(flight) => {
                flight.count_client();
                metrics.outcome(Route::manifest, Outcome::coalesced);
                flight
            }
            Role::Leader(permit) => {
                permit.flight().count_client();
                metrics.outcome(Route::manifest, Outcome::miss);
                // The upstream request runs in its own task: a client hanging up
                // now must not abandon the download the others joined.
                let (this, up2, repo2, digest2) =
                    (self.clone(), self.shared(up), repo.clone(), digest.clone());
                tokio::spawn(
                    async move { this.lead_manifest(&up2, &repo2, &digest2, permit).await },
                )
                .await
                .map_err(|_| CacheError::Flight(FlightError::Abandoned))??
            }
        };
        flight.finished().await?;
        let record = store.index().manifest(digest)?.unwrap_or(ManifestRecord {
            media_type: String::new(),
        });
        self.confirm(up, repo, digest, true).await?;
        self.stored_manifest(digest, record.media_type)
    }

    /// Starts the download of a manifest a leader's permit is for.
    async fn lead_manifest(
        &self,
        up: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        permit: flight::Permit,
    ) -> Result<Arc<flight::Flight>, CacheError> {
        let flight = permit.flight().clone();
        let resp = match up
            .manifest(Method::GET, repo, &digest.to_string(), MANIFEST_TYPES)
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                permit.fail(e.clone().into());
                return Err(e.into());
            }
        };
        let size = header_len(&resp);
        if size.is_some_and(|s| s > MAX_MANIFEST_BYTES) {
            let e = up_error(up, UpstreamErrorKind::Invalid("manifest too large".into()));
            permit.fail(e.clone().into());
            return Err(e.into());
        }
        let limits = flight::Limits {
            size,
            max: Some(MAX_MANIFEST_BYTES),
        };
        let media_type = header_str(&resp, CONTENT_TYPE).unwrap_or_default();
        let (name, repo) = (up.name().to_string(), repo.clone());
        let linked = digest.clone();
        let on_commit: flight::OnCommit = Box::new(move |store: &Store, _| {
            store
                .index()
                .set_manifest(&linked, &ManifestRecord { media_type })?;
            store.link(&name, &repo, &linked)
        });
        self.spawn_download(up, permit, limits, resp, on_commit, None);
        Ok(flight)
    }

    /// The shared handle of an upstream, for work that must outlive the request.
    fn shared(&self, up: &Upstream) -> Arc<Upstream> {
        self.inner
            .upstreams
            .find(up.name())
            .expect("every upstream comes from this cache's list")
            .clone()
    }

    fn stored_manifest(&self, digest: &Digest, media_type: String) -> Result<Manifest, CacheError> {
        // Every manifest served refreshes its image's place in the eviction order.
        self.inner.store.touch(digest);
        let bytes = Bytes::from(self.inner.store.read_small(digest)?);
        // Upstream may have sent no Content-Type: the document's own `mediaType` says it.
        let media_type = if media_type.is_empty() {
            #[derive(serde::Deserialize)]
            struct Typed {
                #[serde(rename = "mediaType")]
                media_type: Option<String>,
            }
            serde_json::from_slice::<Typed>(&bytes)
                .ok()
                .and_then(|t| t.media_type)
                .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".into())
        } else {
            media_type
        };
        Ok(Manifest {
            digest: digest.clone(),
            media_type,
            bytes,
            stale: false,
        })
    }

    /// Makes sure upstream has confirmed that `repo` holds `digest` before we serve it there.
    async fn confirm(
        &self,
        up: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        manifest: bool,
    ) -> Result<(), CacheError> {
        let store = &self.inner.store;
        if store.is_linked(up.name(), repo, digest) {
            return Ok(());
        }
        if manifest {
            up.manifest(Method::HEAD, repo, &digest.to_string(), MANIFEST_TYPES)
                .await?;
        } else {
            up.blob(Method::HEAD, repo, digest).await?;
        }
        store.link(up.name(), repo, digest)?;
        Ok(())
    }

    fn spawn_download(
        &self,
        up: &Upstream,
        permit: flight::Permit,
        limits: flight::Limits,
        resp: Answer,
        on_commit: flight::OnCommit,
        room: Option<crate::store::Room>,
    ) {
        let body = upstream_body(up, resp);
        let when_unwanted = if self.inner.policy.finish_abandoned {
            flight::WhenUnwanted::Finish
        } else {
            flight::WhenUnwanted::Stop
        };
        let (flight, metrics) = (permit.flight().clone(), self.inner.metrics.clone());
        let download = flight::download(
            permit,
            self.inner.store.clone(),
            limits,
            body,
            on_commit,
            when_unwanted,
        );
        tokio::spawn(async move {
            download.await;
            drop(room);
            metrics.flight_finished(flight.readers_served());
        });
    }

    /// A blob (or a range of it); `head` asks for the size only.
    pub async fn blob(
        &self,
        up: &Upstream,
        repo: &RepoName,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<Result<BlobAnswer, Unsatisfiable>, CacheError> {
        let store = &self.inner.store;
        let metrics = &self.inner.metrics;
        // Pinned from the first look: eviction cannot remove it between the
        // check and the open (the body then holds its own pin).
        let pin = store.pin(digest);
        if store.blob_size(digest).is_some() {
            self.confirm(up, repo, digest, false).await?;
            metrics.outcome(Route::blob, Outcome::hit);
            store.touch(digest);
            return Ok(self.stored_blob(digest, range, head)?);
        }
        if head {
            // A HEAD is a question, not a pull: answer it without downloading.
            let resp = up.blob(Method::HEAD, repo, digest).await?;
            return Ok(Ok(BlobAnswer {
                size: header_len(&resp),
                range: None,
                body: None,
            }));
        }
        let flight = match self
            .inner
            .flights
            .join(store, up.name(), digest, repo.as_str())
        {
            Role::Reader(flight) => {
                flight.count_client();
                self.confirm_reader(up, repo, &flight).await?;
                metrics.outcome(Route::blob, Outcome::coalesced);
                flight
            }
            Role::Leader(permit) => {
                // It may have landed between our look-up and the join.
                if let Some(size) = store.blob_size(digest) {
                    permit.already_stored(size);
                    self.confirm(up, repo, digest, false).await?;
                    metrics.outcome(Route::blob, Outcome::hit);
                    return Ok(self.stored_blob(digest, range, head)?);
                }
                permit.flight().count_client();
                metrics.outcome(Route::blob, Outcome::miss);
                // Its own task: a client hanging up must not abandon the others.
                let (this, up2, repo2) = (self.clone(), self.shared(up), repo.clone());
                let lead = tokio::spawn(async move { this.lead_blob(&up2, &repo2, permit).await })
                    .await
                    .map_err(|_| CacheError::Flight(FlightError::Abandoned))??;
                match lead {
                    Lead::Flight(flight) => flight,
                    // No room on disk: this client is served straight from
                    // upstream, verified on the way, and nothing is kept.
                    Lead::Direct(resp) => return Ok(Ok(direct(up, resp, digest, metrics))),
                }
            }
        };
        let size = match flight.started().await {
            Ok(size) => size,
            // Our disk failed before the first byte: this client is served
            // straight from upstream (the whole blob; a server may ignore a Range).
            Err(e) if e.is_local() => {
                tracing::warn!(%digest, error = %e, "cannot cache: serving straight from upstream");
                let resp = up.blob(Method::GET, repo, digest).await?;
                return Ok(Ok(direct(up, resp, digest, metrics)));
            }
            Err(e) => return Err(e.into()),
        };
        let (start, end, served) = match (range, size) {
            (Some(r), Some(size)) => match r.resolve(size) {
                Ok((s, e)) => (s, Some(e), Some((s, e))),
                Err(u) => return Ok(Err(u)),
            },
            _ => (0, size, None),
        };
        Ok(Ok(BlobAnswer {
            size,
            range: served,
            // Pinned until the body is dropped: a reader arriving as the download
            // commits opens the final file later, and eviction must leave it be.
            body: Some(counted(
                pinned(flight.read(start, end), pin),
                metrics,
                Source::flight,
            )),
        }))
    }

    /// Starts the download a leader's permit is for; the flight to read from.
    async fn lead_blob(
        &self,
        up: &Upstream,
        repo: &RepoName,
        permit: flight::Permit,
    ) -> Result<Lead, CacheError> {
        let flight = permit.flight().clone();
        let digest = flight.digest().clone();
        let resp = match up.blob(Method::GET, repo, &digest).await {
            Ok(resp) => resp,
            Err(e) => {
                permit.fail(e.clone().into());
                return Err(e.into());
            }
        };
        let limits = flight::Limits {
            size: header_len(&resp),
            max: None,
        };
        // Making room may evict, which walks the store: not on a runtime worker.
        let (store, size) = (self.inner.store.clone(), limits.size.unwrap_or(0));
        let room = tokio::task::spawn_blocking(move || store.make_room(size))
            .await
            .ok()
            .flatten();
        let Some(room) = room else {
            tracing::warn!(%digest, size = ?limits.size, "no room on disk: serving without caching");
            // Others who joined are served straight from upstream too (see
            // `blob`), each on its own, before any byte.
            permit.fail(FlightError::Store(Arc::new(StoreError::Io {
                path: self.inner.store.blob_path(&digest),
                source: std::io::Error::new(std::io::ErrorKind::StorageFull, "no room on disk"),
            })));
            return Ok(Lead::Direct(resp));
        };
        permit.resume_with(self.resume(up, repo, &digest));
        let (name, repo) = (up.name().to_string(), repo.clone());
        let on_commit: flight::OnCommit =
            Box::new(move |store: &Store, _| store.link(&name, &repo, &digest));
        self.spawn_download(up, permit, limits, resp, on_commit, Some(room));
        Ok(Lead::Flight(flight))
    }

    /// How a flight's readers finish from upstream if our disk fails under them.
    fn resume(&self, up: &Upstream, repo: &RepoName, digest: &Digest) -> flight::Resume {
        let (up, repo, digest) = (self.shared(up), repo.clone(), digest.clone());
        Arc::new(move |offset| {
            let (up, repo, digest) = (up.clone(), repo.clone(), digest.clone());
            Box::pin(async move {
                let resp = up
                    .blob_from(&repo, &digest, offset)
                    .await
                    .map_err(FlightError::from)?;
                let from = if resp.status() == reqwest::StatusCode::PARTIAL_CONTENT {
                    offset
                } else {
                    0
                };
                Ok(flight::Resumed {
                    from,
                    body: Box::pin(upstream_body(&up, resp)),
                })
            })
        })
    }

    /// Starts background downloads of what a client that got `manifest` asks for next.
    pub fn prefetch(&self, up: &Arc<Upstream>, repo: &RepoName, manifest: &Manifest) {
        if !self.inner.policy.prefetch {
            return;
        }
        let Some(slots) = self.inner.prefetch_slots.get(up.name()) else {
            return;
        };
        for target in prefetch::targets(&manifest.bytes, &self.inner.policy.prefetch_platforms) {
            let (prefetch::Target::Blob(digest) | prefetch::Target::Manifest(digest)) = &target;
            if self.inner.store.blob_size(digest).is_some() {
                continue;
            }
            let (this, up, repo, slots) = (self.clone(), up.clone(), repo.clone(), slots.clone());
            tokio::spawn(async move {
                let Ok(_slot) = slots.acquire_owned().await else {
                    return;
                };
                let result = match &target {
                    prefetch::Target::Manifest(d) => {
                        this.manifest_by_digest(&up, &repo, d).await.map(|_| ())
                    }
                    prefetch::Target::Blob(d) => this.warm_blob(&up, &repo, d).await,
                };
                if let Err(e) = result {
                    tracing::debug!(upstream = up.name(), %repo, ?target, error = %e, "prefetch failed");
                }
            });
        }
    }

    /// Downloads a blob into the store unless it is there or on its way.
    async fn warm_blob(
        &self,
        up: &Upstream,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(), CacheError> {
        let store = &self.inner.store;
        match self
            .inner
            .flights
            .join(store, up.name(), digest, repo.as_str())
        {
            Role::Reader(_) => Ok(()),
            Role::Leader(permit) => {
                if let Some(size) = store.blob_size(digest) {
                    permit.already_stored(size);
                    return Ok(());
                }
                // Hold the slot until the download ends, so the bound means something.
                self.inner.metrics.prefetch_started();
                if let Lead::Flight(flight) = self.lead_blob(up, repo, permit).await? {
                    flight.finished().await?;
                }
                Ok(())
            }
        }
    }

    /// A reader joining a flight started by another repository confirms its own repository first.
    async fn confirm_reader(
        &self,
        up: &Upstream,
        repo: &RepoName,
        flight: &flight::Flight,
    ) -> Result<(), CacheError> {
        if flight.origin() == repo.as_str() {
            return Ok(()); // the leader's GET is upstream's confirmation
        }
        self.confirm(up, repo, flight.digest(), false).await
    }

    fn stored_blob(
        &self,
        digest: &Digest,
        range: Option<ByteRange>,
        head: bool,
    ) -> Result<Result<BlobAnswer, Unsatisfiable>, StoreError> {
        let path = self.inner.store.blob_path(digest);
        let file = std::fs::File::open(&path).map_err(|source| StoreError::Io {
            path: path.clone(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| StoreError::Io { path, source })?
            .len();
        let (start, end, served) = match range.map(|r| r.resolve(size)) {
            Some(Ok((s, e))) => (s, e, Some((s, e))),
            Some(Err(u)) => return Ok(Err(u)),
            None => (0, size, None),
        };
        Ok(Ok(BlobAnswer {
            size: Some(size),
            range: served,
            body: (!head).then(|| {
                // Pinned while the body streams: eviction leaves a file being read alone.
                let pin = self.inner.store.pin(digest);
                let body = flight::read_file(file, start, end);
                counted(pinned(body, pin), &self.inner.metrics, Source::store)
            }),
        }))
    }

    /// A repository's tags from upstream; if upstream fails, the tags the cache knows.
    /// Sorted and paged here (`n`, `last`), since not every upstream pages
    /// (Distribution 2.8 ignores both).
    pub async fn tags(
        &self,
        up: &Upstream,
        repo: &RepoName,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<TagPage, CacheError> {
        // One more than asked for: if upstream honours `n`, the extra one tells
        // whether a next page exists.
        let ask = n.map(|n| n.saturating_add(1));
        let tags = match up.tags(repo, ask, last).await {
            Ok(list) => list.tags,
            Err(e) if e.kind != UpstreamErrorKind::NotFound => {
                let tags = self.inner.store.index().tags_of(up.name(), repo)?;
                if tags.is_empty() {
                    return Err(e.into());
                }
                tracing::warn!(upstream = up.name(), %repo, error = %e, "serving known tags");
                tags
            }
            Err(e) => return Err(e.into()),
        };
        Ok(TagPage::new(repo, tags, n, last))
    }
}

/// One page of a tag listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPage {
    /// The listing, as the spec's JSON body.
    pub list: TagList,
    /// Whether tags follow this page (the API then sends a `Link` to the next).
    pub more: bool,
}

impl TagPage {
    /// Sorts `tags`, keeps those after `last`, and at most `n` of them.
    pub fn new(
        repo: &RepoName,
        mut tags: Vec<String>,
        n: Option<u32>,
        last: Option<&str>,
    ) -> TagPage {
        tags.sort();
        tags.dedup();
        if let Some(last) = last {
            tags.retain(|t| t.as_str() > last);
        }
        let more = n.is_some_and(|n| tags.len() > n as usize);
        if let Some(n) = n {
            tags.truncate(n as usize);
        }
        TagPage {
            list: TagList {
                name: repo.to_string(),
                tags,
            },
            more,
        }
    }
}

fn up_error(up: &Upstream, kind: UpstreamErrorKind) -> UpstreamError {
    UpstreamError {
        upstream: up.name().to_string(),
        kind,
    }
}

/// Reads a manifest body whole, refusing anything over [`MAX_MANIFEST_BYTES`].
async fn read_manifest_body(up: &Upstream, resp: Answer) -> Result<Bytes, UpstreamError> {
    if header_len(&resp).is_some_and(|s| s > MAX_MANIFEST_BYTES) {
        return Err(up_error(
            up,
            UpstreamErrorKind::Invalid("manifest too large".into()),
        ));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| up_error(up, crate::upstream::transport_kind(&e)))?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(up_error(
            up,
            UpstreamErrorKind::Invalid("manifest too large".into()),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
