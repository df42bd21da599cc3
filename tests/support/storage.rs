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

/// An upstream that answers `200` with a `Content-Length` of `announced`, sends
/// `sent` bytes of it, then stalls with the connection open: the hanging upstream.
pub struct Stalling {
    addr: SocketAddr,
    requests: Arc<std::sync::atomic::AtomicUsize>,
    open: Arc<Gauge>,
}

/// Connections open now, and the most ever open at once.
type Gauge = (
    std::sync::atomic::AtomicUsize,
    std::sync::atomic::AtomicUsize,
);

impl Stalling {
    /// Starts it on a free loopback port; it stops with the test's runtime.
    pub async fn start(announced: usize, sent: usize) -> Stalling {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stalling upstream");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let open: Arc<Gauge> = Arc::default();
        let (counter, gauge) = (requests.clone(), Arc::clone(&open));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                use std::sync::atomic::Ordering::SeqCst;
                counter.fetch_add(1, SeqCst);
                let gauge = gauge.clone();
                tokio::spawn(async move {
                    // Count it open a moment after accepting: a client that frees its
                    // slot drops the old connection just before opening the next, and
                    // that close must be seen first or the two would look concurrent.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    let now = gauge.0.fetch_add(1, SeqCst) + 1;
                    gauge.1.fetch_max(now, SeqCst);
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {announced}\r\n\r\n"
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&vec![b'z'; sent]).await;
                    // Hold the connection open, silent, until the peer gives up.
                    let _ = socket.read(&mut buf).await;
                    gauge.0.fetch_sub(1, SeqCst);
                });
            }
        });
        Stalling {
            addr,
            requests,
            open,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The most connections that were ever open at once.
    pub fn max_concurrent(&self) -> usize {
        self.open.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A TCP relay on a fixed loopback port that can be taken down (connections
/// refused, open ones cut) and brought back: an upstream that goes away and returns.
pub struct Relay {
    port: u16,
    target: SocketAddr,
    /// The accept loop and every relayed connection, aborted on `down`.
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    /// Relays a free loopback port to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let port = listener.local_addr().expect("local addr").port();
        let relay = Relay {
            port,
            target,
            tasks: Arc::default(),
        };
        relay.serve(listener);
        relay
    }

    fn serve(&self, listener: tokio::net::TcpListener) {
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops listening and cuts every open connection.
    pub async fn down(&self) {
        let tasks: Vec<_> = self.tasks.lock().unwrap().drain(..).collect();
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port.
    pub async fn up(&self) {
        let listener = super::wait_until(
            "the relay's port to bind again",
            super::READY_TIMEOUT,
            || async {
                tokio::net::TcpListener::bind(("127.0.0.1", self.port))
                    .await
                    .ok()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        self.serve(listener);
    }
}

/// An upstream that accepts connections and never answers: the hanging upstream.
pub struct Silent {
    addr: SocketAddr,
}

impl Silent {
    /// Starts it on a free loopback port; it stops with the test's runtime.
    pub async fn start() -> Silent {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind silent upstream");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        Silent { addr }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// An upstream that answers `200` with a body it cuts off half way (the
/// connection closes mid-body): a reset.
pub struct Cutting {
    addr: SocketAddr,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl Cutting {
    /// Starts it on a free loopback port; it stops with the test's runtime.
    pub async fn start() -> Cutting {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind cutting upstream");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n";
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(&[b'{'; 100]).await;
                    // Dropping the socket here closes it 900 bytes short.
                });
            }
        });
        Cutting { addr, requests }
    }

    /// Connections accepted so far.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A small tmpfs mounted (as root) for the test: a disk that fills up.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `8m`) on a fresh directory.
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().expect("temp dir");
        let done = super::run(
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path()),
            super::READY_TIMEOUT,
        )
        .expect("run mount");
        assert!(
            done.success,
            "mounting a tmpfs (needs root): {}",
            done.stderr
        );
        Tmpfs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Grows (or shrinks) it in place: space returns.
    pub fn resize(&self, size: &str) {
        self.remount(&format!("size={size}"));
    }

    /// Remounts it with other options.
    fn remount(&self, options: &str) {
        let done = super::run(
            std::process::Command::new("mount")
                .args(["-o", &format!("remount,{options}")])
                .arg(self.dir.path()),
            super::READY_TIMEOUT,
        )
        .expect("run mount");
        assert!(
            done.success,
            "remounting the tmpfs ({options}): {}",
            done.stderr
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: files a test left open do not keep the mount alive.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
