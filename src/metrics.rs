//! Prometheus metrics: what the cache saves and what is wrong.
//!
//! Label sets are bounded: route kinds, outcomes, status classes and the
//! configured upstream names; never repositories, tags or digests. Values that
//! are state rather than events (circuit state, rate-limit headroom, downloads
//! in progress) are read when scraped, so they are never stale.

use crate::upstream::{CircuitState, Upstreams};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// What a request was for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Route {
    manifest,
    blob,
    tags,
    other,
}

/// What the cache did for a manifest or blob request.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Outcome {
    /// Served from the store, upstream not asked.
    hit,
    /// Started a download.
    miss,
    /// Joined a download already under way.
    coalesced,
    /// Served from an old mapping because upstream failed or the budget was low.
    stale,
    /// A tag checked with upstream (a HEAD, or a GET when cold).
    revalidated,
}

tokio::task_local! {
    /// What the request being handled on this task did, for its log line.
    static NOTE: std::cell::RefCell<Note>;
}

/// Which upstream a request went to and what the cache did for it, noted while
/// it is handled and logged when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Note {
    /// The upstream chosen.
    pub upstream: Option<String>,
    /// What the cache did (the last outcome noted: a revalidation, then a hit, says hit).
    pub outcome: Option<Outcome>,
}

/// Runs `request` with a fresh [`Note`] and returns what was noted in it.
pub async fn noting<F: std::future::Future>(request: F) -> (F::Output, Note) {
    NOTE.scope(Default::default(), async move {
        let out = request.await;
        (out, NOTE.with(|n| n.borrow().clone()))
    })
    .await
}

/// Notes the upstream a request goes to (outside [`noting`], nothing happens).
pub fn note_upstream(name: &str) {
    let _ = NOTE.try_with(|n| n.borrow_mut().upstream = Some(name.to_string()));
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::hit => "hit",
            Outcome::miss => "miss",
            Outcome::coalesced => "coalesced",
            Outcome::stale => "stale",
            Outcome::revalidated => "revalidated",
        }
    }
}

/// Where served bytes came from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types, missing_docs)]
pub enum Source {
    store,
    flight,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: Route,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: Route,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    kind: Route,
    outcome: Outcome,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamRequestLabels {
    upstream: String,
    method: String,
    status: String,
}

/// `2xx`, `4xx`, …; `error` when there was no answer.
pub fn status_class(status: Option<u16>) -> String {
    match status {
        Some(s) => format!("{}xx", s / 100),
        None => "error".into(),
    }
}

/// The metrics handle; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    /// A std-free registry: only `encode` reads it, after start-up nothing is registered.
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<RouteLabels, Histogram>,
    outcomes: Family<OutcomeLabels, Counter>,
    served_bytes: Family<SourceLabels, Counter>,
    upstream_requests: Family<UpstreamRequestLabels, Counter>,
    upstream_duration: Family<UpstreamLabels, Histogram>,
    upstream_bytes: Family<UpstreamLabels, Counter>,
    token_fetches: Family<UpstreamLabels, Counter>,
    stale_served: Family<UpstreamLabels, Counter>,
    prefetches: Counter,
    flight_readers: Histogram,
    flights_in_progress: Gauge,
    circuit_state: Family<UpstreamLabels, Gauge>,
    ratelimit_limit: Family<UpstreamLabels, Gauge>,
    ratelimit_remaining: Family<UpstreamLabels, Gauge>,
    store_bytes: Gauge,
    store_files: Gauge,
    store_max_bytes: Gauge,
    store_evicted_files: Gauge,
    store_evicted_bytes: Gauge,
    /// Manifest pulls per `upstream/repository`, for the status page's "most
    /// pulled" (never a metric label). A std mutex: held only to count.
    pulls: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Bytes fetched from every upstream together.
    fetched: std::sync::atomic::AtomicU64,
}

/// Repositories remembered for "most pulled"; past this, new ones are not counted.
const MAX_REPOSITORIES: usize = 10_000;

/// Totals since start, for the status page.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Requests answered from the store.
    pub hits: u64,
    /// Requests that started a download.
    pub misses: u64,
    /// Requests that joined a download.
    pub coalesced: u64,
    /// Tags served stale.
    pub stale: u64,
    /// Bytes served from the store.
    pub served_from_store: u64,
    /// Bytes served from downloads in flight.
    pub served_from_flights: u64,
    /// Bytes downloaded from upstream.
    pub fetched: u64,
}

fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 14))
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("pullthrough");
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration =
            Family::<RouteLabels, Histogram>::new_with_constructor(seconds as fn() -> Histogram);
        let outcomes = Family::<OutcomeLabels, Counter>::default();
        let served_bytes = Family::<SourceLabels, Counter>::default();
        let upstream_requests = Family::<UpstreamRequestLabels, Counter>::default();
        let upstream_duration =
            Family::<UpstreamLabels, Histogram>::new_with_constructor(seconds as fn() -> Histogram);
        let upstream_bytes = Family::<UpstreamLabels, Counter>::default();
        let token_fetches = Family::<UpstreamLabels, Counter>::default();
        let stale_served = Family::<UpstreamLabels, Counter>::default();
        let prefetches = Counter::default();
        let flight_readers = Histogram::new([1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0]);
        let flights_in_progress = Gauge::default();
        let circuit_state = Family::<UpstreamLabels, Gauge>::default();
        let ratelimit_limit = Family::<UpstreamLabels, Gauge>::default();
        let ratelimit_remaining = Family::<UpstreamLabels, Gauge>::default();
        let (store_bytes, store_max_bytes) = (Gauge::default(), Gauge::default());
        let store_files = Gauge::default();
        let (store_evicted_files, store_evicted_bytes) = (Gauge::default(), Gauge::default());
        registry.register(
            "store_bytes",
            "Bytes stored under blobs/",
            store_bytes.clone(),
        );
        registry.register(
            "store_files",
            "Files stored under blobs/",
            store_files.clone(),
        );
        registry.register(
            "store_max_bytes",
            "The store's cap (0: none)",
            store_max_bytes.clone(),
        );
        registry.register(
            "store_evicted_files",
            "Files evicted since start",
            store_evicted_files.clone(),
        );
        registry.register(
            "store_evicted_bytes",
            "Bytes evicted since start",
            store_evicted_bytes.clone(),
        );
        registry.register(
            "http_requests",
            "Requests by route kind and status class",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to the response's headers, by route kind",
            request_duration.clone(),
        );
        registry.register(
            "cache_outcomes",
            "What the cache did, by kind (manifest, blob) and outcome",
            outcomes.clone(),
        );
        registry.register(
            "served_bytes",
            "Bytes sent to clients, from the store or from downloads in flight",
            served_bytes.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests sent upstream, by upstream, method and status class",
            upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time to upstream's response headers",
            upstream_duration.clone(),
        );
        registry.register(
            "upstream_bytes",
            "Bytes downloaded from upstream into the store",
            upstream_bytes.clone(),
        );
        registry.register(
            "upstream_token_fetches",
            "Bearer tokens fetched from upstream token endpoints",
            token_fetches.clone(),
        );
        registry.register(
            "stale_served",
            "Tags served from an old mapping because upstream failed or its rate-limit budget ran low",
            stale_served.clone(),
        );
        registry.register(
            "prefetches",
            "Downloads started in the background after serving a manifest",
            prefetches.clone(),
        );
        registry.register(
            "flight_readers",
            "Clients served by each finished download (the coalescing factor)",
            flight_readers.clone(),
        );
        registry.register(
            "flights_in_progress",
            "Downloads from upstream in progress",
            flights_in_progress.clone(),
        );
        registry.register(
            "upstream_circuit_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            circuit_state.clone(),
        );
        registry.register(
            "upstream_ratelimit_limit",
            "Pulls allowed per window, as upstream last said (ratelimit-limit)",
            ratelimit_limit.clone(),
        );
        registry.register(
            "upstream_ratelimit_remaining",
            "Pulls left in the window, as upstream last said (ratelimit-remaining)",
            ratelimit_remaining.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                requests,
                request_duration,
                outcomes,
                served_bytes,
                upstream_requests,
                upstream_duration,
                upstream_bytes,
                token_fetches,
                stale_served,
                prefetches,
                flight_readers,
                flights_in_progress,
                circuit_state,
                ratelimit_limit,
                ratelimit_remaining,
                store_bytes,
                store_files,
                store_max_bytes,
                store_evicted_files,
                store_evicted_bytes,
                pulls: Default::default(),
                fetched: Default::default(),
            }),
        }
    }

    /// One client request answered.
    pub fn request(&self, route: Route, status: u16, seconds: f64) {
        let i = &self.inner;
        i.requests
            .get_or_create(&RequestLabels {
                route,
                status: status_class(Some(status)),
            })
            .inc();
        i.request_duration
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
    }

    /// What the cache did for one request.
    pub fn outcome(&self, kind: Route, outcome: Outcome) {
        let _ = NOTE.try_with(|n| n.borrow_mut().outcome = Some(outcome));
        self.inner
            .outcomes
            .get_or_create(&OutcomeLabels { kind, outcome })
            .inc();
    }

    /// Bytes handed to a client.
    pub fn served(&self, source: Source, bytes: u64) {
        self.inner
            .served_bytes
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
    }

    /// One request sent upstream and how it ended.
    pub fn upstream_request(
        &self,
        upstream: &str,
        method: &str,
        status: Option<u16>,
        seconds: f64,
    ) {
        let i = &self.inner;
        i.upstream_requests
            .get_or_create(&UpstreamRequestLabels {
                upstream: upstream.into(),
                method: method.into(),
                status: status_class(status),
            })
            .inc();
        i.upstream_duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .observe(seconds);
    }

    /// Bytes downloaded from upstream.
    pub fn upstream_bytes(&self, upstream: &str, bytes: u64) {
        self.inner
            .upstream_bytes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .inc_by(bytes);
        self.inner
            .fetched
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// A manifest pulled from `upstream`'s `repository` (for "most pulled").
    pub fn pulled(&self, upstream: &str, repository: &str) {
        let mut pulls = self.inner.pulls.lock().expect("pulls poisoned");
        let key = format!("{upstream}/{repository}");
        if let Some(n) = pulls.get_mut(&key) {
            *n += 1;
        } else if pulls.len() < MAX_REPOSITORIES {
            pulls.insert(key, 1);
        }
    }

    /// The `n` most pulled repositories, most first.
    pub fn most_pulled(&self, n: usize) -> Vec<(String, u64)> {
        let pulls = self.inner.pulls.lock().expect("pulls poisoned");
        let mut all: Vec<(String, u64)> = pulls.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// Totals since start.
    pub fn totals(&self) -> Totals {
        let i = &self.inner;
        let outcome = |outcome| {
            [Route::manifest, Route::blob]
                .into_iter()
                .map(|kind| {
                    i.outcomes
                        .get_or_create(&OutcomeLabels { kind, outcome })
                        .get()
                })
                .sum()
        };
        let source = |source| i.served_bytes.get_or_create(&SourceLabels { source }).get();
        Totals {
            hits: outcome(Outcome::hit),
            misses: outcome(Outcome::miss),
            coalesced: outcome(Outcome::coalesced),
            stale: outcome(Outcome::stale),
            served_from_store: source(Source::store),
            served_from_flights: source(Source::flight),
            fetched: i.fetched.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// A token fetched.
    pub fn token_fetched(&self, upstream: &str) {
        self.inner
            .token_fetches
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .inc();
    }

    /// A tag served stale.
    pub fn stale_served(&self, upstream: &str) {
        self.inner
            .stale_served
            .get_or_create(&UpstreamLabels {
                upstream: upstream.into(),
            })
            .inc();
    }

    /// A background download started.
    pub fn prefetch_started(&self) {
        self.inner.prefetches.inc();
    }

    /// A download finished having served `readers` clients.
    pub fn flight_finished(&self, readers: usize) {
        self.inner.flight_readers.observe(readers as f64);
    }

    /// The exposition, in Prometheus text format, with state read now.
    pub fn encode(
        &self,
        upstreams: &Upstreams,
        flights_in_progress: usize,
        store: &crate::store::Store,
    ) -> String {
        let i = &self.inner;
        i.flights_in_progress.set(flights_in_progress as i64);
        i.store_bytes.set(store.usage() as i64);
        i.store_files.set(store.file_count() as i64);
        i.store_max_bytes
            .set(store.cap().map_or(0, |c| c.max) as i64);
        let evicted = store.evicted();
        i.store_evicted_files.set(evicted.files as i64);
        i.store_evicted_bytes.set(evicted.bytes as i64);
        for up in upstreams.all() {
            let labels = UpstreamLabels {
                upstream: up.name().into(),
            };
            let state = match up.health().state() {
                CircuitState::Closed => 0,
                CircuitState::HalfOpen => 1,
                CircuitState::Open => 2,
            };
            i.circuit_state.get_or_create(&labels).set(state);
            if let Some(rl) = up.health().ratelimit() {
                i.ratelimit_remaining
                    .get_or_create(&labels)
                    .set(rl.remaining as i64);
                if let Some(limit) = rl.limit {
                    i.ratelimit_limit.get_or_create(&labels).set(limit as i64);
                }
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &i.registry);
        out
    }
}
