//! Test fixtures as a small builder language: real upstreams, a fault front and real clients.
//!
//! # Layout
//! - [`registry`]: a CNCF Distribution upstream (anonymous, Basic or Bearer auth), seeded with images.
//! - [`token`]: an in-process Docker-Hub-style token server that signs RS256 JWTs.
//! - [`images`]: deterministic synthetic images (OCI, Docker, index, list, big) and an HTTP pusher.
//! - [`storage`]: a blob storage host that registries redirect to, recording `Authorization`.
//! - [`front`]: nginx in front of an upstream, counting requests and injecting faults.
//! - [`cache`]: the cache under test, in-process on a free port.
//! - [`exposition`]: a parser for the Prometheus text format.
//! - [`clients`]: skopeo, containerd (`ctr`) and podman, each in its own temp dirs.
//!
//! Everything binds 127.0.0.1 on OS-assigned ports, waits for readiness with a deadline
//! (never a fixed sleep), and kills only the processes it started, by PID, on `Drop` — so
//! cleanup happens even when a test panics.
#![allow(dead_code)]

pub mod cache;
pub mod clients;
pub mod exposition;
pub mod front;
pub mod images;
pub mod layout;
pub mod registry;
pub mod storage;
pub mod token;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long any component may take to become ready before the test fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How often readiness and log conditions are re-checked while waiting.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A user name and password, for Basic auth or for a token server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub user: String,
    /// The password.
    pub pass: String,
}

impl Credentials {
    /// Builds credentials from a user name and a password.
    pub fn new(user: &str, pass: &str) -> Self {
        Self {
            user: user.to_string(),
            pass: pass.to_string(),
        }
    }

    /// The value of an `Authorization: Basic …` header for these credentials.
    pub fn basic_header(&self) -> String {
        use base64::Engine as _;
        let raw = format!("{}:{}", self.user, self.pass);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Ports handed out by [`free_port`] in this process, never handed out twice.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free 127.0.0.1 port for an external process: bound to port 0, then released.
///
/// Another process may still grab it before ours binds, so starters retry on collision;
/// within this test binary a port is never handed out twice.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local addr").port();
        if HANDED_OUT.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// A fresh temp dir whose name starts with `pt-<what>-`, removed on drop.
pub fn temp_dir(what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("pt-{what}-"))
        .tempdir()
        .expect("create temp dir")
}

/// A unique token for telling our own server apart from whoever else answers on a port.
pub fn instance_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// The last `lines` lines of a file, or a note that it cannot be read.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Polls `check` every [`POLL_INTERVAL`] until it yields `Some`, or fails after `timeout`.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The blocking twin of [`wait_until`], for code that runs outside the runtime.
pub fn wait_until_blocking<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A process we started; killed (SIGKILL, by PID) and reaped on drop.
pub struct Child {
    name: String,
    child: std::process::Child,
    with_descendants: bool,
}

impl Child {
    /// Spawns `command` with stdin closed, naming it `name` in messages.
    pub fn spawn(name: &str, command: &mut Command) -> Result<Child, String> {
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        Ok(Child {
            name: name.to_string(),
            child,
            with_descendants: false,
        })
    }

    /// Also kill the processes it forked (e.g. nginx workers), by their PIDs, when killed.
    pub fn with_descendants(mut self) -> Self {
        self.with_descendants = true;
        self
    }

    /// The PID of the process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(description of the exit)` if the process has already exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!("{} exited: {status}", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{} cannot be waited for: {e}", self.name)),
        }
    }

    /// Kills and reaps the process now (idempotent); see [`Child::with_descendants`].
    pub fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // Collected before the kill: once orphaned, they are no longer our descendants.
            let descendants = if self.with_descendants {
                descendants(self.child.id())
            } else {
                Vec::new()
            };
            let _ = self.child.kill();
            if !descendants.is_empty() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .args(descendants.iter().map(u32::to_string))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// PIDs of every live descendant of `pid`, from the parent PIDs in `/proc/*/stat`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`; comm may contain spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((child, ppid));
            }
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parent_of
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// What a finished command left behind.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Whether it exited with status 0.
    pub success: bool,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// Runs `command` to completion, killing it (by PID) if it outlives `timeout`.
///
/// Blocking: call it from `spawn_blocking` (see [`run_async`]) inside a test.
pub fn run(command: &mut Command, timeout: Duration) -> Result<Finished, String> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let waited = wait_until_blocking(&shown, timeout, || child.try_wait().ok().flatten());
    let status = match waited {
        Ok(status) => status,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            return Err(format!("{e}; killed it. stderr:\n{stderr}"));
        }
    };
    Ok(Finished {
        success: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// [`run`] on a blocking thread, so the test runtime keeps serving while a client works.
pub async fn run_async(mut command: Command, timeout: Duration) -> Result<Finished, String> {
    tokio::task::spawn_blocking(move || run(&mut command, timeout))
        .await
        .map_err(|e| format!("command thread panicked: {e}"))?
}

/// Mount points at or below `dir` (deepest first), from `/proc/self/mountinfo`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// Lazily unmounts everything mounted at or below `dir` (best effort, for cleanup).
pub fn unmount_all_under(dir: &Path) {
    for mount in mounts_under(dir) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&mount)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A reqwest client for readiness probes: short timeouts, no pooled connections.
pub fn probe_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
        .expect("build probe client")
}

/// `127.0.0.1:port` as a socket address.
pub fn localhost(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
