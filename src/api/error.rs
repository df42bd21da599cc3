//! The one place that turns errors into OCI error bodies.
//!
//! Body: `{"errors":[{"code":…,"message":…}]}` (distribution-spec, "Error
//! Codes"). `UNKNOWN` and `UNAVAILABLE` are Distribution's codes for failures
//! the spec does not name (here: upstream or disk trouble).

use crate::airgap::AirgapError;
use crate::cache::{CacheError, Unsatisfiable};
use crate::upstream::UpstreamErrorKind;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The error codes we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Malformed or mismatching digest.
    DigestInvalid,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// A manifest (here: an imported layout) that does not hold together.
    ManifestInvalid,
    /// Invalid repository name.
    NameInvalid,
    /// Repository (or registry) name not known.
    NameUnknown,
    /// Authentication required (upstream refused us).
    Unauthorized,
    /// Access denied.
    Denied,
    /// The operation is unsupported (a cache does not take pushes).
    Unsupported,
    /// Rate limited.
    #[serde(rename = "TOOMANYREQUESTS")]
    TooManyRequests,
    /// Upstream unreachable or failing.
    Unavailable,
    /// Our own failure.
    Unknown,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    errors: [ErrorInfo<'a>; 1],
}

#[derive(Serialize)]
struct ErrorInfo<'a> {
    code: ErrorCode,
    message: &'a str,
}

/// What a request asked for, so that "not found" gets the right code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A manifest.
    Manifest,
    /// A blob.
    Blob,
    /// A tag listing.
    Tags,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The repository name breaks the grammar.
    #[error("invalid repository name: {0}")]
    NameInvalid(String),
    /// A digest breaks the grammar.
    #[error("invalid digest: {0}")]
    DigestInvalid(String),
    /// A manifest reference that can name nothing (a tag breaking the grammar).
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// `?ns=` or a path prefix names a registry that is not configured.
    #[error("registry {0:?} is not configured on this cache")]
    UnknownRegistry(String),
    /// Pushes, deletes, uploads.
    #[error("{0}")]
    Unsupported(String),
    /// No such route.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// A `Range` beyond the blob.
    #[error("range not satisfiable")]
    Range(Unsatisfiable),
    /// An import (admin listener) failed; nothing of it was kept.
    #[error("import: {0}")]
    Import(#[from] crate::airgap::AirgapError),
    /// The cache could not answer.
    #[error("{error}")]
    Cache {
        /// What was asked for.
        target: Target,
        /// Why it failed.
        error: CacheError,
    },
}

impl ApiError {
    /// Wraps a cache error for a request about `target`.
    pub fn cache(target: Target) -> impl FnOnce(CacheError) -> ApiError {
        move |error| ApiError::Cache { target, error }
    }

    fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        match self {
            ApiError::NameInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid),
            ApiError::DigestInvalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid),
            ApiError::ManifestUnknown(_) => (StatusCode::NOT_FOUND, ErrorCode::ManifestUnknown),
            ApiError::UnknownRegistry(_) => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            ApiError::Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, ErrorCode::Unsupported),
            ApiError::Range(_) => (StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::BlobUnknown),
            ApiError::Import(e) => match e {
                AirgapError::Layout(_) => (StatusCode::BAD_REQUEST, ErrorCode::ManifestInvalid),
                AirgapError::UnknownRegistry { .. } => {
                    (StatusCode::NOT_FOUND, ErrorCode::NameUnknown)
                }
                _ => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown),
            },
            ApiError::Cache { target, error } => match error.upstream_kind() {
                // Offline, what the store lacks is as good as unknown: nothing
                // will fetch it (an air-gapped store says so with a 404).
                Some(UpstreamErrorKind::NotFound | UpstreamErrorKind::Offline) => (
                    StatusCode::NOT_FOUND,
                    match target {
                        Target::Manifest => ErrorCode::ManifestUnknown,
                        Target::Blob => ErrorCode::BlobUnknown,
                        Target::Tags => ErrorCode::NameUnknown,
                    },
                ),
                Some(UpstreamErrorKind::Unauthorized) => {
                    (StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized)
                }
                Some(UpstreamErrorKind::Denied) => (StatusCode::FORBIDDEN, ErrorCode::Denied),
                Some(UpstreamErrorKind::TooManyRequests { .. }) => {
                    (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests)
                }
                Some(UpstreamErrorKind::Timeout(_)) => {
                    (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable)
                }
                Some(UpstreamErrorKind::Status(503) | UpstreamErrorKind::CircuitOpen { .. }) => {
                    (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable)
                }
                Some(_) => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
                None if error.is_upstream() => (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable),
                None => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Unknown),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        }
        if let ApiError::Range(Unsatisfiable { size }) = self {
            let mut r = status.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
        let message = self.to_string();
        let body = serde_json::to_vec(&ErrorBody {
            errors: [ErrorInfo {
                code,
                message: &message,
            }],
        })
        .unwrap_or_default();
        let mut r = (status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ApiError::Cache { error, .. } = &self {
            let retry_after = match error.upstream_kind() {
                Some(UpstreamErrorKind::TooManyRequests { retry_after }) => retry_after.clone(),
                Some(UpstreamErrorKind::CircuitOpen { retry_in }) => {
                    Some(retry_in.as_secs().max(1).to_string())
                }
                _ => None,
            };
            if let Some(v) = retry_after.and_then(|a| HeaderValue::from_str(&a).ok()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}
