//! Upstream registries: one HTTP client each, with the registry auth flow.
//!
//! A request goes out with the token cached for its scope, if any. A `401`
//! carries a `WWW-Authenticate` challenge: `Bearer` sends us to the token
//! endpoint (anonymously or with the configured credentials) and the token is
//! cached per scope until it expires, shared by every client; `Basic` makes us
//! send the credentials from then on. Redirects (Docker Hub sends blobs to a
//! storage host) are followed by reqwest, which drops `Authorization` when the
//! host changes, so registry credentials never reach a storage host.

mod auth;
mod health;

pub use auth::Challenge;
pub use health::{CircuitState, Health, HealthPolicy, RateLimit};

use crate::config::{Credentials, UpstreamConfig};
use crate::reference::{Digest, RepoName};
use reqwest::header::{
    HeaderMap, HeaderName, ACCEPT, AUTHORIZATION, RANGE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode, Url};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What went wrong upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// 404: upstream does not have it.
    NotFound,
    /// 401: upstream refused our credentials (or wants some).
    Unauthorized,
    /// 403: upstream denies access.
    Denied,
    /// 429: rate limited; `Retry-After` as upstream sent it.
    TooManyRequests {
        /// Upstream's `Retry-After`, passed on to clients.
        retry_after: Option<String>,
    },
    /// Any other unexpected status, 5xx included.
    Status(u16),
    /// Connecting, TLS, a broken connection or body.
    Transport(String),
    /// No answer (or no more body bytes) within the configured time.
    Timeout(String),
    /// The token endpoint failed.
    Auth(String),
    /// Upstream answered something unusable.
    Invalid(String),
    /// The circuit is open after repeated failures; nothing was sent.
    CircuitOpen {
        /// When the next probe may go.
        retry_in: std::time::Duration,
    },
    /// The upstream is configured offline (or `serve --offline`); nothing was sent.
    Offline,
}

impl UpstreamErrorKind {
    /// Whether this says upstream is unwell (as opposed to a definite answer like 404).
    pub fn is_failure(&self) -> bool {
        match self {
            Self::Transport(_) | Self::Timeout(_) | Self::TooManyRequests { .. } => true,
            Self::Status(s) => *s >= 500,
            _ => false,
        }
    }
}

/// An error that came from an upstream registry, naming it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("upstream {upstream}: {kind}")]
pub struct UpstreamError {
    /// The upstream's configured name.
    pub upstream: String,
    /// What went wrong.
    pub kind: UpstreamErrorKind,
}

impl fmt::Display for UpstreamErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotFound => f.write_str("not found"),
            Self::Unauthorized => f.write_str("authentication failed (401)"),
            Self::Denied => f.write_str("access denied (403)"),
            Self::TooManyRequests { .. } => f.write_str("rate limited (429)"),
            Self::Status(s) => write!(f, "answered HTTP {s}"),
            Self::Transport(m) => write!(f, "unreachable: {m}"),
            Self::Timeout(m) => write!(f, "timed out: {m}"),
            Self::Auth(m) => write!(f, "token endpoint failed: {m}"),
            Self::Invalid(m) => write!(f, "invalid answer: {m}"),
            Self::CircuitOpen { retry_in } => write!(
                f,
                "failing repeatedly, not asked again for {}s",
                retry_in.as_secs().max(1)
            ),
            Self::Offline => f.write_str("offline: never contacted"),
        }
    }
}

/// The answer to a tags listing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TagList {
    /// The repository.
    pub name: String,
    /// Its tags (Distribution sends `null` for none).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub tags: Vec<String>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    use serde::Deserialize;
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

/// One configured upstream registry.
pub struct Upstream {
    name: String,
    base: Url,
    library_prefix: bool,
    client: reqwest::Client,
    auth: auth::Auth,
    /// One permit per request in progress, held until its body ends.
    slots: Arc<Semaphore>,
    health: Arc<Health>,
    offline: bool,
    metrics: crate::metrics::Metrics,
}

/// A successful upstream answer, holding one of the upstream's connection slots
/// until it (or its body stream) is dropped.
pub struct Answer {
    response: Response,
    slot: OwnedSemaphorePermit,
    /// A body that breaks off counts against the upstream's health like a 5xx.
    health: Arc<Health>,
}

impl std::ops::Deref for Answer {
    type Target = Response;

    fn deref(&self) -> &Response {
        &self.response
    }
}

impl Answer {
    /// The whole body.
    pub async fn bytes(self) -> reqwest::Result<bytes::Bytes> {
        let Answer {
            response,
            slot,
            health,
        } = self;
        let body = response.bytes().await;
        match &body {
            Ok(_) => health.body_succeeded(),
            Err(_) => health.body_failed(),
        }
        drop(slot);
        body
    }

    /// The body as it arrives; the slot is released when the stream is dropped.
    pub fn bytes_stream(
        self,
    ) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send {
        use futures_util::StreamExt;
        let Answer {
            response,
            slot,
            health,
        } = self;
        let body = Box::pin(response.bytes_stream());
        futures_util::stream::unfold(
            (body, slot, health, false),
            |(mut body, slot, health, ended)| async move {
                if ended {
                    return None;
                }
                match body.next().await {
                    Some(Ok(chunk)) => Some((Ok(chunk), (body, slot, health, false))),
                    Some(Err(e)) => {
                        health.body_failed();
                        Some((Err(e), (body, slot, health, true)))
                    }
                    None => {
                        health.body_succeeded();
                        None
                    }
                }
            },
        )
    }
}

impl Upstream {
    /// Builds the client for one `[[upstreams]]` entry (already validated).
    pub fn new(
        config: &UpstreamConfig,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Upstream, UpstreamError> {
        let error = |kind| UpstreamError {
            upstream: config.name.clone(),
            kind,
        };
        let base = Url::parse(&config.url)
            .map_err(|e| error(UpstreamErrorKind::Invalid(e.to_string())))?;
        let https = base.scheme() == "https";
        let credentials: Option<Credentials> = config
            .credentials()
            .map_err(|e| error(UpstreamErrorKind::Auth(e)))?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("pullthrough/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.idle_timeout)
            .redirect(reqwest::redirect::Policy::custom(|attempt| {
                // reqwest drops Authorization when the host changes, but not on an
                // https -> http hop to the same host: refuse downgrades outright.
                let downgrade = attempt.url().scheme() == "http"
                    && attempt.previous().iter().any(|u| u.scheme() == "https");
                if downgrade {
                    attempt.error("refusing a redirect from https to http")
                } else if attempt.previous().len() >= 10 {
                    attempt.error("too many redirects")
                } else {
                    attempt.follow()
                }
            }))
            .build()
            .map_err(|e| error(UpstreamErrorKind::Transport(e.to_string())))?;
        Ok(Upstream {
            name: config.name.clone(),
            base,
            library_prefix: config.library_prefix,
            client,
            auth: auth::Auth::new(credentials, https),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            health: Arc::new(Health::new(HealthPolicy {
                failures_to_open: config.failures_to_open,
                open_for: config.open_for,
                retries: config.retries,
                backoff: config.retry_backoff,
                max_backoff: config.retry_backoff.saturating_mul(16),
                ratelimit_reserve: config.ratelimit_reserve,
            })),
            offline: config.offline,
            metrics: metrics.clone(),
        })
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Circuit and rate-limit state.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The metrics this upstream reports to.
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    /// Whether this upstream is never contacted.
    pub fn is_offline(&self) -> bool {
        self.offline
    }

    /// Applies this registry's naming rules (Docker Hub's `library/`).
    pub fn normalize(&self, repo: RepoName) -> RepoName {
        if self.library_prefix {
            repo.with_library_prefix()
        } else {
            repo
        }
    }

    fn error(&self, kind: UpstreamErrorKind) -> UpstreamError {
        UpstreamError {
            upstream: self.name.clone(),
            kind,
        }
    }

    fn url(&self, repo: &RepoName, tail: &str) -> Url {
        let mut url = self.base.clone();
        let base_path = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base_path}/v2/{repo}/{tail}"));
        url
    }

    /// `GET`/`HEAD /v2/<repo>/manifests/<reference>`; only a 2xx answer is `Ok`.
    pub async fn manifest(
        &self,
        method: Method,
        repo: &RepoName,
        reference: &str,
        accept: &str,
    ) -> Result<Answer, UpstreamError> {
        let url = self.url(repo, &format!("manifests/{reference}"));
        self.send(method, url, repo, Some((ACCEPT, accept))).await
    }

    /// `GET`/`HEAD /v2/<repo>/blobs/<digest>`; only a 2xx answer is `Ok`.
    pub async fn blob(
        &self,
        method: Method,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<Answer, UpstreamError> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        self.send(method, url, repo, None).await
    }

    /// `GET` of a blob from byte `offset` on (`Range: bytes=offset-`). Upstream
    /// may ignore the range: a 200 rather than a 206 carries the whole blob.
    pub async fn blob_from(
        &self,
        repo: &RepoName,
        digest: &Digest,
        offset: u64,
    ) -> Result<Answer, UpstreamError> {
        let url = self.url(repo, &format!("blobs/{digest}"));
        let range = format!("bytes={offset}-");
        self.send(Method::GET, url, repo, Some((RANGE, &range)))
            .await
    }

    /// `GET /v2/<repo>/tags/list` with the spec's `n` and `last`.
    pub async fn tags(
        &self,
        repo: &RepoName,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<TagList, UpstreamError> {
        let mut url = self.url(repo, "tags/list");
        {
            let mut q = url.query_pairs_mut();
            if let Some(n) = n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(last) = last {
                q.append_pair("last", last);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let resp = self.send(Method::GET, url, repo, None).await?;
        let body = resp
            .bytes()
            .await
            .map_err(|e| self.error(transport_kind(&e)))?;
        serde_json::from_slice(&body)
            .map_err(|e| self.error(UpstreamErrorKind::Invalid(format!("tags list: {e}"))))
    }

    /// Sends a pull-scoped request through the circuit breaker, retrying
    /// failures (transport errors, 5xx, 429) with jittered backoff. Every request
    /// we make is a GET or HEAD, so every request may be retried.
    async fn send(
        &self,
        method: Method,
        url: Url,
        repo: &RepoName,
        header: Option<(HeaderName, &str)>,
    ) -> Result<Answer, UpstreamError> {
        if self.offline {
            return Err(self.error(UpstreamErrorKind::Offline));
        }
        let mut attempt = 0;
        loop {
            let ticket = self
                .health
                .admit()
                .map_err(|retry_in| self.error(UpstreamErrorKind::CircuitOpen { retry_in }))?;
            let result = self.attempt(&method, &url, repo, header.clone()).await;
            let failed = result.as_ref().err().filter(|e| e.kind.is_failure());
            // A GET is judged when its body ends (a body cut off is a failure); a
            // HEAD, an error, or a half-open probe (which must settle) at once.
            if failed.is_some() || method != Method::GET || ticket.is_probe() {
                ticket.record(failed.is_none());
            }
            let Some(error) = failed else {
                return result;
            };
            if attempt >= self.health.policy().retries {
                return result;
            }
            let mut wait = self.health.backoff(attempt);
            if let UpstreamErrorKind::TooManyRequests { retry_after } = &error.kind {
                match retry_after
                    .as_deref()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                {
                    Some(secs) if Duration::from_secs(secs) <= self.health.policy().max_backoff => {
                        wait = wait.max(Duration::from_secs(secs));
                    }
                    // Longer than we would ever wait for a client: fail now, serve stale.
                    Some(_) => return result,
                    None => {}
                }
            }
            tracing::debug!(upstream = %self.name, %url, error = %error, ?wait, "retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One attempt, answering one auth challenge if upstream asks.
    async fn attempt(
        &self,
        method: &Method,
        url: &Url,
        repo: &RepoName,
        header: Option<(HeaderName, &str)>,
    ) -> Result<Answer, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        let mut answered_challenge = false;
        loop {
            let slot = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let mut req = self.client.request(method.clone(), url.clone());
            if let Some((name, value)) = &header {
                req = req.header(name.clone(), *value);
            }
            let sent = self.auth.header_for(&scope);
            if let Some(value) = &sent {
                req = req.header(AUTHORIZATION, value.clone());
            }
            let started = std::time::Instant::now();
            let sent_at = req.send().await;
            let status = sent_at.as_ref().ok().map(|r| r.status().as_u16());
            self.metrics.upstream_request(
                &self.name,
                method.as_str(),
                status,
                started.elapsed().as_secs_f64(),
            );
            let resp = sent_at.map_err(|e| self.error(transport_kind(&e)))?;
            self.health.observe_ratelimit(resp.headers());
            if resp.status() == StatusCode::UNAUTHORIZED && !answered_challenge {
                answered_challenge = true;
                let challenge = resp
                    .headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .find_map(Challenge::parse);
                let Some(challenge) = challenge else {
                    return Err(self.error(UpstreamErrorKind::Unauthorized));
                };
                let fetched = self
                    .auth
                    .answer(&self.client, &challenge, &scope, sent.as_ref())
                    .await
                    .map_err(|kind| self.error(kind))?;
                if fetched {
                    self.metrics.token_fetched(&self.name);
                }
                continue;
            }
            let status = resp.status();
            if !status.is_success() {
                return Err(self.error(kind_of(status, resp.headers())));
            }
            return Ok(Answer {
                response: resp,
                slot,
                health: self.health.clone(),
            });
        }
    }
}

/// Maps a failed upstream status to what it means for us.
pub fn kind_of(status: StatusCode, headers: &HeaderMap) -> UpstreamErrorKind {
    match status {
        StatusCode::NOT_FOUND => UpstreamErrorKind::NotFound,
        StatusCode::UNAUTHORIZED => UpstreamErrorKind::Unauthorized,
        StatusCode::FORBIDDEN => UpstreamErrorKind::Denied,
        StatusCode::TOO_MANY_REQUESTS => UpstreamErrorKind::TooManyRequests {
            retry_after: headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        },
        s => UpstreamErrorKind::Status(s.as_u16()),
    }
}

/// What a reqwest failure means: a timeout, or another transport failure, with
/// reqwest's causes spelled out (its top-level message alone says little).
pub fn transport_kind(e: &reqwest::Error) -> UpstreamErrorKind {
    let mut msg = if e.is_connect() {
        "connection failed".to_string()
    } else if e.is_body() || e.is_decode() {
        "body".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    if e.is_timeout() {
        UpstreamErrorKind::Timeout(msg)
    } else {
        UpstreamErrorKind::Transport(msg)
    }
}

/// All configured upstreams, and the choice among them for a request.
pub struct Upstreams {
    list: Vec<std::sync::Arc<Upstream>>,
    configs: Vec<UpstreamConfig>,
    default: usize,
}

impl Upstreams {
    /// Builds a client for every configured upstream.
    pub fn new(
        configs: &[UpstreamConfig],
        default: &str,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Upstreams, UpstreamError> {
        let list = configs
            .iter()
            .map(|c| Upstream::new(c, metrics).map(std::sync::Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let default = configs
            .iter()
            .position(|c| c.answers_to(default))
            .ok_or_else(|| UpstreamError {
                upstream: default.to_string(),
                kind: UpstreamErrorKind::Invalid("not configured".into()),
            })?;
        Ok(Upstreams {
            list,
            configs: configs.to_vec(),
            default,
        })
    }

    /// The upstream answering to `name` (name or alias), if configured.
    pub fn find(&self, name: &str) -> Option<&std::sync::Arc<Upstream>> {
        self.configs
            .iter()
            .position(|c| c.answers_to(name))
            .map(|i| &self.list[i])
    }

    /// The upstream used when a request names none.
    pub fn default_upstream(&self) -> &std::sync::Arc<Upstream> {
        &self.list[self.default]
    }

    /// Every upstream, in configuration order.
    pub fn all(&self) -> &[std::sync::Arc<Upstream>] {
        &self.list
    }
}

#[cfg(test)]
mod tests;
