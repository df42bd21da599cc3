//! A blob storage host, as Docker Hub redirects blob GETs to: serves the bytes
//! it is given by digest path and records the `Authorization` header of every
//! request, so tests can prove registry credentials never reach it.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Shared {
    blobs: HashMap<String, Bytes>,
    /// A std lock: only held to push or copy, never across an await.
    seen: Mutex<Vec<Option<String>>>,
}

/// A running storage host; stops with the test's runtime.
pub struct StorageHost {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl StorageHost {
    /// Serves each `(digest, bytes)` at any path ending in `/blobs/<digest>`.
    pub async fn start(blobs: impl IntoIterator<Item = (String, Bytes)>) -> StorageHost {
        let shared = Arc::new(Shared {
            blobs: blobs.into_iter().collect(),
            seen: Mutex::default(),
        });
        let app = Router::new()
            .route("/{*path}", get(serve))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind storage host");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        StorageHost { addr, shared }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `Authorization` header of every request so far (`None` where absent).
    pub fn authorizations(&self) -> Vec<Option<String>> {
        self.shared.seen.lock().unwrap().clone()
    }
}

async fn serve(
    State(shared): State<Arc<Shared>>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Result<Bytes, StatusCode> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    shared.seen.lock().unwrap().push(auth);
    let digest = path.rsplit('/').next().unwrap_or_default();
    shared
        .blobs
        .get(digest)
        .cloned()
        .ok_or(StatusCode::NOT_FOUND)
}
