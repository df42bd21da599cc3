//! The cache under test, run in-process on a free loopback port.
//!
//! `let cache = Cache::builder().upstream("docker.io", &front.url()).library_prefix().start().await;`

use pullthrough::config::Config;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::sync::oneshot;

struct UpstreamEntry {
    name: String,
    url: String,
    library_prefix: bool,
    credentials: Option<(String, String)>,
}

/// Describes a cache to start.
pub struct CacheBuilder {
    upstreams: Vec<UpstreamEntry>,
    tag_ttl: String,
}

/// A running cache; stopped (and its data removed) on drop.
pub struct Cache {
    addr: SocketAddr,
    data: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Cache {
    /// Starts describing a cache.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            upstreams: Vec::new(),
            tag_ttl: "5m".into(),
        }
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as registries.conf and image references want it.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The cache's data directory.
    pub fn data(&self) -> &Path {
        &self.data
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl CacheBuilder {
    /// Adds an upstream; the first one added is the default.
    pub fn upstream(mut self, name: &str, url: &str) -> Self {
        self.upstreams.push(UpstreamEntry {
            name: name.into(),
            url: url.into(),
            library_prefix: false,
            credentials: None,
        });
        self
    }

    /// The last upstream added follows Docker Hub's `library/` rule.
    pub fn library_prefix(mut self) -> Self {
        self.upstreams.last_mut().expect("an upstream first").library_prefix = true;
        self
    }

    /// The last upstream added authenticates with these credentials.
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.upstreams.last_mut().expect("an upstream first").credentials =
            Some((user.into(), password.into()));
        self
    }

    /// How long tags are served without revalidation.
    pub fn tag_ttl(mut self, ttl: &str) -> Self {
        self.tag_ttl = ttl.into();
        self
    }

    /// Starts the cache and waits until it answers `/v2/`.
    pub async fn start(self) -> Cache {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        let mut toml = format!(
            "default_upstream = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n[storage]\npath = {:?}\n[cache]\ntag_ttl = {:?}\n",
            self.upstreams.first().expect("at least one upstream").name,
            data,
            self.tag_ttl
        );
        for (i, up) in self.upstreams.iter().enumerate() {
            toml += &format!(
                "[[upstreams]]\nname = {:?}\nurl = {:?}\nlibrary_prefix = {}\n",
                up.name, up.url, up.library_prefix
            );
            if let Some((user, password)) = &up.credentials {
                let file = dir.path().join(format!("password-{i}"));
                std::fs::write(&file, password).expect("write password file");
                toml += &format!("username = {user:?}\npassword_file = {file:?}\n");
            }
        }
        let config = Config::from_toml(&toml).expect("test config is valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = pullthrough::run(listener, config, shutdown).await {
                panic!("cache stopped: {e}");
            }
        });
        let cache = Cache {
            addr,
            data,
            shutdown: Some(tx),
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(r) = client.get(format!("{}/v2/", cache.url())).send().await {
                if r.status().is_success() {
                    return cache;
                }
            }
            assert!(std::time::Instant::now() < deadline, "cache did not come up");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
