//! pullthrough: a pull-through cache for OCI registries.
//!
//! # Layout
//! ```text
//! client ─► api (axum router, OCI errors) ─► cache (policy) ─► store (disk + sled index)
//!                                               │
//!                                               └─► flight (one download per digest) ─► upstream (reqwest, auth)
//! ```
//! The dependency rule: `api → cache → {flight, store, upstream}`; `flight`
//! writes through `store`; `store` never calls `upstream`; `api` never
//! touches the disk. Names, tags and digests are validated once, at the edge,
//! into the types of [`reference`].
//!
//! - [`config`]: defaults < file < environment < flags, validated before anything binds.
//! - [`api`]: the distribution-spec pull routes.
//! - [`cache`]: what to serve from the store and when to ask upstream.
//! - [`flight`]: one upstream download per digest, tailed by every reader.
//! - [`store`]: content-addressed files and the index.
//! - [`upstream`]: registry clients with the token flow and health.
//! - [`metrics`]: Prometheus metrics, read by `/metrics`.
//! - [`api::admin`]: the loopback admin listener (`POST /import`).
//!
//! Beside the request path, for operators:
//! - [`imagelist`]: image lists (plain or Kubernetes YAML), one parser for all below.
//! - [`airgap`]: `seed` (through [`cache`]), `export` and `import` (into [`store`]).
//! - [`prepull`]: the node agent asking the runtime through CRI to pull lists.
//! - [`nodeconfig`]: a node's containerd `hosts.toml` files pointing at the cache
//!   (`pullthrough containerd-config`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod airgap;
pub mod api;
pub mod cache;
pub mod config;
pub mod flight;
pub mod imagelist;
pub mod metrics;
pub mod nodeconfig;
pub mod prepull;
pub mod reference;
pub mod store;
pub mod upstream;

use std::future::Future;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// An upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    /// Serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the cache described by `config`.
pub fn build(config: &config::Config) -> Result<cache::Cache, ServeError> {
    let cap = config
        .storage
        .watermarks()
        .map(|(max, high, low)| store::Cap { max, high, low });
    let store = store::Store::open_with(&config.storage.path, cap, config.storage.fsync)?;
    let metrics = metrics::Metrics::new();
    let upstreams =
        upstream::Upstreams::new(&config.upstreams, &config.default_upstream, &metrics)?;
    Ok(cache::Cache::new(
        store,
        upstreams,
        config.cache.clone(),
        metrics,
    ))
}

/// Serves the pull API on `listener` (and the admin API on
/// `[server] admin_listen`, if set) until `shutdown` completes.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: config::Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let cache = build(&config)?;
    let admin = match config.server.admin_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            ServeError::Io(std::io::Error::new(
                e.kind(),
                format!("binding the admin listener {addr}: {e}"),
            ))
        })?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(|a| a.local_addr()).transpose()?;
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = admin_addr.map(|a| a.to_string()),
        data = %config.storage.path.display(),
        upstreams = config.upstreams.len(),
        "pullthrough serving"
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let admin = admin.map(|admin| {
        let (app, done) = (api::admin::router(cache.clone()), until(stopped.clone()));
        tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, app).with_graceful_shutdown(done).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        })
    });
    let store = cache.store().clone();
    let served = serve(listener, cache, until(stopped)).await;
    // An import under way finishes (committing, tagging) before the index is flushed.
    if let Some(admin) = admin {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), admin).await;
    }
    store.flush()?;
    served
}

/// Serves the pull API over an already built cache until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cache: cache::Cache,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    axum::serve(listener, api::router(cache))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}
