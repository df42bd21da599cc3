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
    /// Further `key = value` TOML lines for this upstream.
    options: Vec<String>,
}

/// Describes a cache to start.
pub struct CacheBuilder {
    upstreams: Vec<UpstreamEntry>,
    tag_ttl: String,
    prefetch: bool,
    /// Further `key = value` TOML lines for `[cache]`.
    cache_options: Vec<String>,
    /// A data directory to use (and keep) instead of a fresh one.
    data: Option<PathBuf>,
    /// Further `key = value` TOML lines for `[storage]`.
    storage_options: Vec<String>,
}

/// A running cache; stopped (and its data removed) on drop.
pub struct Cache {
    addr: SocketAddr,
    data: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Cache {
    /// Starts describing a cache.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            upstreams: Vec::new(),
            tag_ttl: "5m".into(),
            prefetch: true,
            cache_options: Vec::new(),
            data: None,
            storage_options: Vec::new(),
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

    /// Stops it and waits until the server has ended (a restart on the same data
    /// directory then waits for the store's lock in `start`).
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
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
            options: Vec::new(),
        });
        self
    }

    /// The last upstream added follows Docker Hub's `library/` rule.
    pub fn library_prefix(mut self) -> Self {
        self.upstreams
            .last_mut()
            .expect("an upstream first")
            .library_prefix = true;
        self
    }

    /// The last upstream added authenticates with these credentials.
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.upstreams
            .last_mut()
            .expect("an upstream first")
            .credentials = Some((user.into(), password.into()));
        self
    }

    /// How long tags are served without revalidation.
    pub fn tag_ttl(mut self, ttl: &str) -> Self {
        self.tag_ttl = ttl.into();
        self
    }

    /// Sets `key = value` (a TOML value, e.g. `"1s"` with its quotes) on the last upstream added.
    pub fn upstream_option(mut self, key: &str, value: &str) -> Self {
        let up = self.upstreams.last_mut().expect("an upstream first");
        up.options.push(format!("{key} = {value}"));
        self
    }

    /// Sets `key = value` (a TOML value) in `[cache]`.
    pub fn cache_option(mut self, key: &str, value: &str) -> Self {
        self.cache_options.push(format!("{key} = {value}"));
        self
    }

    /// Whether serving a manifest prefetches its blobs (on by default, as in production).
    pub fn prefetch(mut self, on: bool) -> Self {
        self.prefetch = on;
        self
    }

    /// Sets `key = value` (a TOML value) in `[storage]`.
    pub fn storage_option(mut self, key: &str, value: &str) -> Self {
        self.storage_options.push(format!("{key} = {value}"));
        self
    }

    /// Uses `dir` as the data directory (it outlives the cache: for restarts).
    pub fn data(mut self, dir: &Path) -> Self {
        self.data = Some(dir.to_path_buf());
        self
    }

    /// Starts the cache and waits until it answers `/v2/`.
    pub async fn start(self) -> Cache {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = self.data.clone().unwrap_or_else(|| dir.path().join("data"));
        let mut toml = format!(
            "default_upstream = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n[cache]\ntag_ttl = {:?}\nprefetch = {}\n",
            self.upstreams.first().expect("at least one upstream").name,
            self.tag_ttl,
            self.prefetch
        );
        for line in &self.cache_options {
            toml += &format!("{line}\n");
        }
        toml += &format!("[storage]\npath = {data:?}\n");
        for line in &self.storage_options {
            toml += &format!("{line}\n");
        }
        for (i, up) in self.upstreams.iter().enumerate() {
            toml += &format!(
                "[[upstreams]]\nname = {:?}\nurl = {:?}\nlibrary_prefix = {}\n",
                up.name, up.url, up.library_prefix
            );
            for line in &up.options {
                toml += &format!("{line}\n");
            }
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
        // A cache stopped a moment ago on the same data directory may still hold
        // the index lock (sled releases it from a background thread): retry.
        let built = super::wait_until("the store to open", super::READY_TIMEOUT, || {
            let built = pullthrough::build(&config);
            async move { built.ok() }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(async move {
            let shutdown = async {
                let _ = rx.await;
            };
            if let Err(e) = pullthrough::serve(listener, built, shutdown).await {
                panic!("cache stopped: {e}");
            }
        });
        let cache = Cache {
            addr,
            data,
            shutdown: Some(tx),
            server: Some(server),
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
            assert!(
                std::time::Instant::now() < deadline,
                "cache did not come up"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// The usual test rig: a seeded Distribution upstream behind the nginx front
/// (whose access log counts what reached upstream), and the cache over the front
/// as upstream `docker.io` with Docker Hub's `library/` rule.
pub struct Rig {
    /// The real upstream registry.
    pub upstream: super::registry::Registry,
    /// nginx between the cache and the upstream.
    pub front: super::front::Front,
    /// The cache under test.
    pub cache: Cache,
}

impl Rig {
    /// Starts the upstream, the front and a default cache over them.
    pub async fn start(upstream: super::registry::RegistryBuilder) -> Rig {
        Rig::start_with(upstream, |c| c).await
    }

    /// Like [`Rig::start`], with the cache builder adjusted by `configure`
    /// (which gets it with the `docker.io` upstream already added).
    pub async fn start_with(
        upstream: super::registry::RegistryBuilder,
        configure: impl FnOnce(CacheBuilder) -> CacheBuilder,
    ) -> Rig {
        let upstream = upstream.start().await;
        let front = super::front::Front::start(upstream.addr()).await;
        let builder = Cache::builder()
            .upstream("docker.io", &front.url())
            .library_prefix();
        let cache = configure(builder).start().await;
        Rig {
            upstream,
            front,
            cache,
        }
    }

    /// A raw HTTP request to the cache: `GET`/`HEAD` and so on, with `headers`.
    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> super::images::Fetched {
        raw_request(&format!("{}{path}", self.cache.url()), method, headers).await
    }

    /// The same request straight to the upstream, for comparison.
    pub async fn request_upstream(
        &self,
        method: reqwest::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> super::images::Fetched {
        raw_request(&format!("{}{path}", self.upstream.url()), method, headers).await
    }

    /// Waits until background work (prefetches) stops reaching upstream, then
    /// forgets the front's log, so that what follows is counted from zero.
    pub async fn quiesce(&self) {
        self.front
            .settled(std::time::Duration::from_millis(300))
            .await;
        self.front.clear();
    }
}

/// Where a cache with data directory `data` keeps the file for `digest` (`sha256:…`).
pub fn blob_file(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// What a streamed download delivered: status, the sha256 and length of the
/// body, or the error that ended it. Bodies are hashed as they arrive, never held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// HTTP status; 0 when the connection ended before any response.
    pub status: u16,
    /// `sha256:<hex>` of the bytes received.
    pub digest: String,
    /// Bytes received.
    pub len: u64,
    /// Why the body ended early, if it did.
    pub error: Option<String>,
}

/// GETs `url` with `headers`, hashing the body as it streams in.
pub async fn stream_digest(url: &str, headers: &[(&str, &str)]) -> Streamed {
    use futures_util::StreamExt;
    use sha2::Digest;
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut hasher = sha2::Sha256::new();
    let resp = match req.send().await {
        Ok(resp) => resp,
        // The server may abort before its headers go out (a body failing at once).
        Err(e) => {
            return Streamed {
                status: 0,
                digest: format!("sha256:{}", hex::encode(hasher.finalize())),
                len: 0,
                error: Some(format!("no response: {e}")),
            }
        }
    };
    let status = resp.status().as_u16();
    let (mut len, mut error) = (0u64, None);
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                hasher.update(&bytes);
                len += bytes.len() as u64;
            }
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    Streamed {
        status,
        digest: format!("sha256:{}", hex::encode(hasher.finalize())),
        len,
        error,
    }
}

/// One unauthenticated request; the body is read whole.
pub async fn raw_request(
    url: &str,
    method: reqwest::Method,
    headers: &[(&str, &str)],
) -> super::images::Fetched {
    let mut req = reqwest::Client::new().request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .bytes()
        .await
        .unwrap_or_else(|e| panic!("{url}: body: {e}"));
    super::images::Fetched {
        status,
        headers,
        body,
    }
}

/// The real `pullthrough` binary, run as a user runs it.
pub struct CacheProcess {
    child: super::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// `pullthrough ARGS…` run to completion with `env`: for commands and for refused configurations.
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> super::Finished {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    super::run(&mut command, std::time::Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("pullthrough {args:?}: {e}"))
}

impl CacheProcess {
    /// Starts `pullthrough serve --config FILE --listen 127.0.0.1:0 --log-format json`
    /// with `config` as FILE and `env` added, and waits for its "serving" log line.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> CacheProcess {
        CacheProcess::start_in(config, env, None).await
    }

    /// Like [`CacheProcess::start`], on the data directory `data` (which outlives it).
    pub async fn start_in(config: &str, env: &[(&str, &str)], data: Option<&Path>) -> CacheProcess {
        CacheProcess::start_with_args(config, env, data, &[]).await
    }

    /// Like [`CacheProcess::start_in`], with `args` added to `serve` (e.g. `--offline`).
    pub async fn start_with_args(
        config: &str,
        env: &[(&str, &str)],
        data: Option<&Path>,
        args: &[&str],
    ) -> CacheProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = data.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let file = dir.path().join("pullthrough.toml");
        std::fs::write(&file, config).expect("write config");
        let log = dir.path().join("pullthrough.log");
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_pullthrough"));
        command
            .args(["--log-format", "json", "serve", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(args)
            .arg("--config")
            .arg(&file)
            .arg("--data")
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = super::Child::spawn("pullthrough", &mut command).expect("spawn");
        let found = super::wait_until(
            "pullthrough to log its address",
            super::READY_TIMEOUT,
            || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let addr = text.lines().find_map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).ok()?;
                    let listen = v["fields"]["listen"].as_str()?.parse::<SocketAddr>().ok()?;
                    let admin = v["fields"]["admin"].as_str()?.parse::<SocketAddr>().ok()?;
                    Some((listen, admin))
                });
                let exited = if addr.is_none() { child.exited() } else { None };
                async move { addr.or_else(|| exited.map(|e| panic!("{e}"))) }
            },
        )
        .await;
        let addr = found.unwrap_or_else(|e| {
            panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
        });
        let (addr, admin) = addr;
        CacheProcess {
            child,
            addr,
            admin,
            log,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, as registries.conf and skopeo name a registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The admin listener, `http://127.0.0.1:PORT`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The PID of the cache process (e.g. to read `/proc/PID/status`).
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it with SIGKILL, mid-whatever it is doing: a crash.
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Stops it with SIGTERM, as an orchestrator would, and waits for the exit.
    pub fn terminate(&mut self) -> String {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.pid().to_string()])
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(exit) = self.child.exited() {
                return exit;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no exit after SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}
