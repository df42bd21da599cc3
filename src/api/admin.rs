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
    // The whole body is always read, even after the importer has stopped (a bad
    // layout): an HTTP/1 client still uploading would otherwise see a broken
    // pipe instead of the answer saying which entry was bad.
    let pump = tokio::spawn(async move {
        let mut stream = body.into_data_stream();
        let mut tx = Some(tx);
        while let Some(chunk) = stream.next().await {
            let Some(sender) = &tx else {
                if chunk.is_err() {
                    break;
                }
                continue;
            };
            if sender
                .send(chunk.map_err(std::io::Error::other))
                .await
                .is_err()
            {
                tx = None; // the importer stopped: read on, discarding
            }
        }
    });
    let reader = BodyReader {
        rx,
        current: Bytes::new(),
    };
    let imported = tokio::task::spawn_blocking(move || {
        import_tar(cache.store(), cache.upstreams(), reader, &options)
    })
    .await;
    let _ = pump.await;
    let report = imported.map_err(|e| {
        // Our failure, not the layout's: a 500.
        ApiError::Import(crate::airgap::AirgapError::Io {
            path: "import task".into(),
            source: std::io::Error::other(e.to_string()),
        })
    })??;
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
        "unnamed": report.unnamed,
        "bytes": report.bytes,
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response())
}
