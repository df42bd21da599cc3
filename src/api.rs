//! HTTP: the OCI distribution-spec pull API. Parses routes, picks the
//! upstream, negotiates media types, writes headers; turns every failure into
//! an OCI error body (in [`error`], the only place that does). Never touches the disk.

pub mod admin;
mod error;
mod route;
mod status;

pub use error::{ApiError, ErrorCode, Target};
pub use route::{Endpoint, Route};

use crate::cache::{Accept, ByteRange, Cache};
use crate::metrics::{Route as RouteKind, Source};
use crate::reference::Reference;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use std::collections::HashMap;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

/// The digest of what is served, on every manifest and blob answer.
pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The HTTP application over a cache.
pub fn router(cache: Cache) -> Router {
    Router::new()
        .route("/v2", any(version_check))
        .route("/v2/", any(version_check))
        .route("/v2/{*rest}", any(v2))
        .route("/", get(home))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(axum::middleware::from_fn_with_state(cache.clone(), measure))
        .with_state(cache)
        // Every answer, errors included, says which API it speaks.
        .layer(SetResponseHeaderLayer::overriding(
            API_VERSION,
            HeaderValue::from_static("registry/2.0"),
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            // Spans and hyper-level detail at debug; the one info line per request
            // is written by `measure`.
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::DEBUG))
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// Counts and times every request by route kind and status class.
async fn measure(
    State(cache): State<Cache>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path();
    let route = if !path.starts_with("/v2/") {
        RouteKind::other
    } else if path.contains("/manifests/") {
        RouteKind::manifest
    } else if path.contains("/blobs/") {
        RouteKind::blob
    } else if path.ends_with("/tags/list") {
        RouteKind::tags
    } else {
        RouteKind::other
    };
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (method, uri) = (request.method().clone(), request.uri().clone());
    let started = std::time::Instant::now();
    let (response, note) = crate::metrics::noting(next.run(request)).await;
    let elapsed = started.elapsed();
    cache
        .metrics()
        .request(route, response.status().as_u16(), elapsed.as_secs_f64());
    // One line per request. Headers are never logged: they may carry credentials.
    let bytes = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_string();
    tracing::info!(
        request_id,
        %method,
        %uri,
        status = response.status().as_u16(),
        upstream = note.upstream.as_deref().unwrap_or("-"),
        cache = note.outcome.map_or("-", |o| o.as_str()),
        bytes,
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        "request"
    );
    response
}

async fn metrics(State(cache): State<Cache>) -> impl IntoResponse {
    let text = cache.metrics().encode(
        cache.upstreams(),
        cache.flights().in_progress(),
        cache.store(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

async fn home(State(cache): State<Cache>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        status::render(&cache),
    )
}

/// The process serves: for liveness probes.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The store is open and writable: for readiness probes. Upstream reachability
/// is deliberately not part of it, so an upstream outage never takes the cache
/// out of its Service (it serves what it has).
async fn readyz(State(cache): State<Cache>) -> Response {
    let store = cache.store().clone();
    let writable = tokio::task::spawn_blocking(move || store.writable())
        .await
        .unwrap_or(false);
    if writable {
        "ready\n".into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "the store is not writable\n",
        )
            .into_response()
    }
}

async fn version_check(method: Method) -> Result<impl IntoResponse, ApiError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(unsupported(&method));
    }
    Ok(([(header::CONTENT_TYPE, "application/json")], "{}"))
}

fn unsupported(method: &Method) -> ApiError {
    ApiError::Unsupported(format!(
        "{method} is not supported: this is a read-only pull-through cache"
    ))
}

async fn v2(
    State(cache): State<Cache>,
    method: Method,
    Path(rest): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    // The method first: a push is refused as a push, whatever it names.
    if method != Method::GET && method != Method::HEAD {
        return Err(unsupported(&method));
    }
    let route = Route::parse(&rest)?;
    let head = method == Method::HEAD;
    let (up, repo) = route::select_upstream(cache.upstreams(), &route.name, query.get("ns"))?;
    crate::metrics::note_upstream(up.name());
    let response = match route.endpoint {
        Endpoint::Manifest(reference) => {
            let accept = Accept::parse(
                headers
                    .get_all(header::ACCEPT)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let manifest = match &reference {
                Reference::Tag(tag) => cache.manifest_by_tag(up, &repo, tag, &accept).await,
                Reference::Digest(digest) => cache.manifest_by_digest(up, &repo, digest).await,
            }
            .map_err(ApiError::cache(Target::Manifest))?;
            if !head {
                if matches!(reference, Reference::Tag(_)) {
                    cache.metrics().pulled(up.name(), repo.as_str());
                }
                cache.prefetch(up, &repo, &manifest);
                cache
                    .metrics()
                    .served(Source::store, manifest.bytes.len() as u64);
            }
            let mut r = if head {
                Body::empty().into_response()
            } else {
                Body::from(manifest.bytes.clone()).into_response()
            };
            let h = r.headers_mut();
            insert(h, header::CONTENT_TYPE, &manifest.media_type);
            insert(h, header::CONTENT_LENGTH, &manifest.bytes.len().to_string());
            insert(h, DOCKER_CONTENT_DIGEST, &manifest.digest.to_string());
            insert(h, header::ETAG, &format!("\"{}\"", manifest.digest));
            if manifest.stale {
                insert(h, header::WARNING, "110 - \"Response is Stale\"");
            }
            r
        }
        Endpoint::Blob(digest) => {
            let range = headers
                .get(header::RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(ByteRange::parse);
            let answer = cache
                .blob(up, &repo, &digest, range, head)
                .await
                .map_err(ApiError::cache(Target::Blob))?
                .map_err(ApiError::Range)?;
            let mut r = match answer.body {
                Some(body) => Body::from_stream(body).into_response(),
                None => Body::empty().into_response(),
            };
            let h = r.headers_mut();
            insert(h, header::CONTENT_TYPE, "application/octet-stream");
            insert(h, DOCKER_CONTENT_DIGEST, &digest.to_string());
            insert(h, header::ETAG, &format!("\"{digest}\""));
            insert(h, header::ACCEPT_RANGES, "bytes");
            match (answer.range, answer.size) {
                (Some((start, end)), Some(size)) => {
                    *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                    let h = r.headers_mut();
                    insert(h, header::CONTENT_LENGTH, &(end - start).to_string());
                    insert(
                        h,
                        header::CONTENT_RANGE,
                        &format!("bytes {start}-{}/{size}", end - 1),
                    );
                }
                (_, Some(size)) => {
                    insert(r.headers_mut(), header::CONTENT_LENGTH, &size.to_string())
                }
                _ => {}
            }
            r
        }
        Endpoint::Tags => {
            let n = query.get("n").and_then(|n| n.parse().ok());
            let last = query.get("last").map(String::as_str);
            let page = cache
                .tags(up, &repo, n, last)
                .await
                .map_err(ApiError::cache(Target::Tags))?;
            let body = serde_json::to_vec(&page.list).unwrap_or_default();
            let mut r = if head {
                Body::empty().into_response()
            } else {
                Body::from(body.clone()).into_response()
            };
            let h = r.headers_mut();
            insert(h, header::CONTENT_TYPE, "application/json");
            insert(h, header::CONTENT_LENGTH, &body.len().to_string());
            if let (true, Some(n), Some(last)) = (page.more, n, page.list.tags.last()) {
                // distribution-spec "Listing Tags": the next page, named as the client named it.
                let mut next = format!("/v2/{}/tags/list?n={n}&last={last}", route.name);
                if let Some(ns) = query.get("ns") {
                    next = format!("{next}&ns={ns}");
                }
                insert(h, header::LINK, &format!("<{next}>; rel=\"next\""));
            }
            r
        }
    };
    Ok(response)
}

fn insert(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}
