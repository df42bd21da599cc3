//! `/v2/<name>/…` parsed from the right, so names of any depth work, and the
//! choice of upstream: `?ns=` → a leading component naming a configured
//! upstream → the default.

use super::ApiError;
use crate::reference::{Digest, Reference, RepoName};
use crate::upstream::{Upstream, Upstreams};
use std::sync::Arc;

/// What a `/v2/<name>/…` path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `/manifests/<reference>`
    Manifest(Reference),
    /// `/blobs/<digest>`
    Blob(Digest),
    /// `/tags/list`
    Tags,
}

/// A parsed pull route: the name as the client sent it, and the endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Everything before the endpoint, possibly with a registry prefix.
    pub name: String,
    /// The endpoint.
    pub endpoint: Endpoint,
}

impl Route {
    /// Parses the part of the path after `/v2/`.
    pub fn parse(rest: &str) -> Result<Route, ApiError> {
        let unsupported = || ApiError::NotFound(format!("/v2/{rest}"));
        if let Some(name) = rest.strip_suffix("/tags/list") {
            return Ok(Route {
                name: name.to_string(),
                endpoint: Endpoint::Tags,
            });
        }
        if rest.contains("/blobs/uploads") {
            return Err(ApiError::Unsupported(
                "blob uploads are not supported: this is a read-only pull-through cache".into(),
            ));
        }
        let (head, last) = rest.rsplit_once('/').ok_or_else(unsupported)?;
        let (name, kind) = head.rsplit_once('/').ok_or_else(unsupported)?;
        let endpoint = match kind {
            "manifests" => Endpoint::Manifest(parse_reference(last)?),
            "blobs" => Endpoint::Blob(
                last.parse()
                    .map_err(|_| ApiError::DigestInvalid(last.to_string()))?,
            ),
            _ => return Err(unsupported()),
        };
        Ok(Route {
            name: name.to_string(),
            endpoint,
        })
    }
}

/// A reference that looks like a digest but is malformed is `DIGEST_INVALID`;
/// a tag that breaks the grammar can name nothing, so it is `MANIFEST_UNKNOWN`.
fn parse_reference(s: &str) -> Result<Reference, ApiError> {
    Reference::parse(s).map_err(|_| {
        if s.contains(':') {
            ApiError::DigestInvalid(s.to_string())
        } else {
            ApiError::ManifestUnknown(s.to_string())
        }
    })
}

/// Whether a leading path component looks like a registry host (Docker's rule:
/// it has a `.` or a `:`, or is `localhost`).
fn looks_like_registry(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// Picks the upstream and the repository name within it.
pub fn select_upstream<'a>(
    upstreams: &'a Upstreams,
    name: &str,
    ns: Option<&String>,
) -> Result<(&'a Arc<Upstream>, RepoName), ApiError> {
    let (up, repo) = if let Some(ns) = ns {
        let up = upstreams
            .find(ns)
            .ok_or_else(|| ApiError::UnknownRegistry(ns.clone()))?;
        (up, name)
    } else {
        match name.split_once('/') {
            Some((first, rest)) if upstreams.find(first).is_some() => {
                (upstreams.find(first).expect("just found"), rest)
            }
            Some((first, _)) if looks_like_registry(first) => {
                return Err(ApiError::UnknownRegistry(first.to_string()))
            }
            _ => (upstreams.default_upstream(), name),
        }
    };
    let repo: RepoName = repo
        .parse()
        .map_err(|_| ApiError::NameInvalid(repo.to_string()))?;
    Ok((up, up.normalize(repo)))
}
