//! The admin listener: `POST /import` takes an OCI image layout tar into the
//! running cache's store. It writes to the store, so it listens on loopback
//! unless an operator says otherwise (`[server] admin_listen`).

use super::ApiError;
use crate::airgap::import::{import_tar, ImportOptions};
use crate::cache::Cache;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::io::Read;
use tokio::sync::mpsc;

/// The admin application over a cache.
pub fn router(cache: Cache) -> Router {
    Router::new()
        .route("/import", post(import))
        .with_state(cache)
}

/// A request body read on a blocking thread, for the synchronous importer.
struct BodyReader {
    rx: mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// `POST /import?registry=docker.io&repository=team/app` with a layout tar as the body.
async fn import(
    State(cache): State<Cache>,
    Query(query): Query<HashMap<String, String>>,
    body: Body,
) -> Result<Response, ApiError> {
    let options = ImportOptions {
        registry: query
            .get("registry")
            .cloned()
            .unwrap_or_else(|| cache.upstreams().default_upstream().name().to_string()),
        repository: query.get("repository").cloned(),
    };
    let (tx, rx) = mpsc::channel(8);
    let pump = tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(std::io::Error::other);
            if tx.send(chunk).await.is_err() {
                break; // the importer stopped (a bad layout): the rest is not needed
            }
        }
    });
    let reader = BodyReader {
        rx,
        current: Bytes::new(),
    };
    let report = tokio::task::spawn_blocking(move || {
        import_tar(cache.store(), cache.upstreams(), reader, &options)
    })
    .await
    .map_err(|e| {
        ApiError::Import(crate::airgap::AirgapError::Layout(format!(
            "import task: {e}"
        )))
    })??;
    pump.abort();
    tracing::info!(
        images = report.images.len(),
        blobs = report.blobs,
        added = report.added,
        "imported"
    );
    let body = serde_json::json!({
        "images": report.images,
        "blobs": report.blobs,
        "added": report.added,
        "bytes": report.bytes,
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}
