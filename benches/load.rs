//! Load benchmark: a pull storm on a cold image and warm-blob throughput, each quoted
//! against a reference measured in the same run (FIELD-NOTES, "Load and measurement").
//!
//! `cargo bench --bench load` prints a table and writes `target/bench-load.json`.
//! The product's targets are reported next to the figures, never asserted.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use support::cache::CacheProcess;
use support::front::{Front, LogLine};
use support::images::{media, sha256_digest, Image};
use support::registry::Registry;
use tokio::sync::Barrier;

/// The storm's image: manifest + config + three layers, about 1.8 MiB in all.
const STORM_REPO: &str = "library/storm";
const STORM_LAYERS: [usize; 3] = [1024 * 1024, 512 * 1024, 300 * 1024];
/// Concurrent pulls in a storm.
const STORM_PULLS: usize = 100;
/// Single cold pulls (each against a fresh cache); their median is "one pull".
const SINGLE_RUNS: usize = 5;
/// Storm rounds (direct, then through a fresh cache); the round with the median p99 is shown.
const STORM_ROUNDS: usize = 3;
/// The warm blob.
const BIG_REPO: &str = "library/big";
const BIG_BYTES: usize = 256 * 1024 * 1024;
/// Downloads per client in the throughput runs, for 1 and for 8 clients.
const THROUGHPUT_RUNS: [(usize, usize); 2] = [(1, 4), (8, 3)];
/// Throughput rounds, alternating cache and nginx; each one's best round is reported
/// (other load on the machine only ever slows a round down).
const THROUGHPUT_ROUNDS: usize = 7;
/// Any single request's limit, and any phase's.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const PHASE_TIMEOUT: Duration = Duration::from_secs(120);
/// Quiet time after which the front's access log counts as complete.
const SETTLE: Duration = Duration::from_millis(400);

/// Targets the product aims at (reported, not asserted).
const TARGET_STORM_P99_RATIO: f64 = 1.5;
const TARGET_THROUGHPUT_RATIO: f64 = 0.9;
const TARGET_RSS_MIB: f64 = 64.0;

#[tokio::main]
async fn main() {
    let began = Instant::now();
    let load_before = load_average();
    eprintln!("load bench: building images and starting the upstream…");
    let storm_image = Image::builder(7101).layers(&STORM_LAYERS).build();
    let big_image = tokio::task::spawn_blocking(|| Image::big(7102, BIG_BYTES))
        .await
        .expect("build the big image");
    let upstream = Registry::anonymous()
        .image(STORM_REPO, "1", storm_image.clone())
        .image(BIG_REPO, "1", big_image.clone())
        .start()
        .await;
    let front = Front::start(upstream.addr()).await;
    let config = cache_config(&front.url());

    // --- 1. Storm -------------------------------------------------------------------
    eprintln!("load bench: single pulls…");
    let mut single_direct = Vec::new();
    for _ in 0..SINGLE_RUNS {
        single_direct.push(timed_pull(&client(), &upstream.url(), STORM_REPO, &storm_image).await);
    }
    let mut single_cache = Vec::new();
    let mut single_rss = Vec::new();
    let mut single_upstream = None;
    for _ in 0..SINGLE_RUNS {
        let cache = CacheProcess::start(&config, &[]).await;
        front.clear();
        single_cache.push(timed_pull(&client(), &cache.url(), STORM_REPO, &storm_image).await);
        let log = front.settled(SETTLE).await;
        single_upstream.get_or_insert_with(|| UpstreamCounts::of(&log));
        single_rss.push(peak_rss_mib(cache.pid()));
    }
    let single_direct = Latencies::of(single_direct);
    let single_cache = Latencies::of(single_cache);
    let single_upstream = single_upstream.expect("at least one single run");

    eprintln!("load bench: storms, straight to the upstream and through a fresh cold cache…");
    let mut storms_direct = Vec::new();
    let mut storms_cache = Vec::new();
    for _ in 0..STORM_ROUNDS {
        storms_direct.push(Latencies::of(
            phase(storm(&upstream.url(), &storm_image)).await,
        ));
        let cache = CacheProcess::start(&config, &[]).await;
        front.clear();
        let latencies = Latencies::of(phase(storm(&cache.url(), &storm_image)).await);
        storms_cache.push(StormRound {
            latencies,
            upstream: UpstreamCounts::of(&front.settled(SETTLE).await),
            rss: peak_rss_mib(cache.pid()),
        });
    }

    // The cost of durability: the same cold storms with fsync off ([storage] fsync = false).
    eprintln!("load bench: storms through a cold cache without fsync…");
    let config_nosync = format!("{config}\n[storage]\nfsync = false\n");
    let mut storms_nosync = Vec::new();
    for _ in 0..STORM_ROUNDS {
        let cache = CacheProcess::start(&config_nosync, &[]).await;
        storms_nosync.push(Latencies::of(
            phase(storm(&cache.url(), &storm_image)).await,
        ));
    }
    let p99_median = |rounds: &[Duration]| {
        let mut v = rounds.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let with_fsync = p99_median(
        &storms_cache
            .iter()
            .map(|r| r.latencies.p99)
            .collect::<Vec<_>>(),
    );
    let without_fsync = p99_median(&storms_nosync.iter().map(|l| l.p99).collect::<Vec<_>>());

    // --- 2. Warm throughput ------------------------------------------------------------
    eprintln!("load bench: warm throughput…");
    let cache = CacheProcess::start(&config, &[]).await;
    let blob = &big_image.layers()[0];
    let fill =
        phase(async { timed_pull(&client(), &cache.url(), BIG_REPO, &big_image).await }).await;
    if let Err(e) = &fill.result {
        panic!("pulling the big image through the cache failed: {e}");
    }
    let hex = blob.digest.trim_start_matches("sha256:");
    let stored = data_dir(cache.pid())
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex);
    support::wait_until("the big blob to be committed", PHASE_TIMEOUT, || {
        let done = std::fs::metadata(&stored).is_ok_and(|m| m.len() == blob.size());
        async move { done.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", stored.display()));
    let nginx = StaticNginx::start(&stored).await;
    let cache_url = format!("{}/v2/{BIG_REPO}/blobs/{}", cache.url(), blob.digest);
    let nginx_url = nginx.url();
    // Warm-up: page cache, both servers' first connection.
    phase(throughput(&cache_url, 1, 1, blob.size())).await;
    phase(throughput(&nginx_url, 1, 1, blob.size())).await;
    let mut warm = Vec::new();
    for (clients, each) in THROUGHPUT_RUNS {
        let (mut via_cache, mut via_nginx) = (Vec::new(), Vec::new());
        for _ in 0..THROUGHPUT_ROUNDS {
            via_cache.push(phase(throughput(&cache_url, clients, each, blob.size())).await);
            via_nginx.push(phase(throughput(&nginx_url, clients, each, blob.size())).await);
        }
        warm.push(Warm {
            clients,
            each,
            cache: via_cache,
            nginx: via_nginx,
        });
    }
    let warm_rss = peak_rss_mib(cache.pid());
    drop(nginx);
    drop(cache);

    // --- 3. Report ---------------------------------------------------------------------
    let report = Report {
        image_bytes: storm_image.total_size(),
        blobs: storm_image.blobs().len(),
        single_direct,
        single_cache,
        single_rss: single_rss.iter().copied().fold(0.0, f64::max),
        single_upstream,
        storms_direct,
        storms_cache,
        warm,
        warm_rss,
        seconds: began.elapsed().as_secs_f64(),
        load: (load_before, load_average()),
    };
    report.print();
    println!(
        "\nDurability: storm p99 (median of {STORM_ROUNDS} rounds) with fsync {:.1} ms, without {:.1} ms: fsync costs {:.2}x",
        ms(with_fsync),
        ms(without_fsync),
        ratio(with_fsync, without_fsync)
    );
    let path = json_path();
    let mut json = report.json();
    json["durability"] = json!({
        "storm_p99_ms_with_fsync": ms(with_fsync),
        "storm_p99_ms_without_fsync": ms(without_fsync),
        "ratio": ratio(with_fsync, without_fsync),
        "failed_without_fsync": storms_nosync.iter().map(|l| l.failed).sum::<usize>(),
    });
    let text = serde_json::to_string_pretty(&json).expect("serialize report");
    match std::fs::write(&path, text + "\n") {
        Ok(()) => println!("\nwritten: {}", path.display()),
        Err(e) => println!("\ncannot write {}: {e}", path.display()),
    }
}

/// The cache's configuration: the front as Docker Hub.
fn cache_config(front: &str) -> String {
    format!(
        "default_upstream = \"docker.io\"\n\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{front}\"\nlibrary_prefix = true\n"
    )
}

/// A fresh client, as a fresh node would bring: its own connections.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build reqwest client")
}

/// Runs a phase under [`PHASE_TIMEOUT`]: a hang fails the bench, a slow figure does not.
async fn phase<T>(work: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PHASE_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| panic!("a bench phase took longer than {PHASE_TIMEOUT:?}"))
}

/// One pull's outcome: its latency, and the bytes it verified or why it failed.
struct Pulled {
    elapsed: Duration,
    result: Result<u64, String>,
}

async fn timed_pull(client: &reqwest::Client, base: &str, repo: &str, image: &Image) -> Pulled {
    let start = Instant::now();
    let result = pull(client, base, repo, image).await;
    Pulled {
        elapsed: start.elapsed(),
        result,
    }
}

/// A pull as containerd does it: the manifest by tag, then config and layers concurrently,
/// every body checked against its digest.
async fn pull(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    image: &Image,
) -> Result<u64, String> {
    let url = format!("{base}/v2/{repo}/manifests/1");
    let response = client
        .get(&url)
        .header("accept", media::ACCEPT_ALL)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if response.status() != 200 {
        return Err(format!("GET {url}: {}", response.status()));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if sha256_digest(&body) != image.digest() {
        return Err(format!("GET {url}: not the manifest pushed"));
    }
    let manifest: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    let digests: Vec<&str> = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten())
        .filter_map(|d| d["digest"].as_str())
        .collect();
    let blobs = futures_util::future::try_join_all(
        digests
            .iter()
            .map(|digest| fetch_blob(client, base, repo, digest)),
    )
    .await?;
    Ok(body.len() as u64 + blobs.iter().sum::<u64>())
}

/// GETs a blob, hashing it as it streams; fails unless it hashes to `digest`.
async fn fetch_blob(
    client: &reqwest::Client,
    base: &str,
    repo: &str,
    digest: &str,
) -> Result<u64, String> {
    let url = format!("{base}/v2/{repo}/blobs/{digest}");
    let mut response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if response.status() != 200 {
        return Err(format!("GET {url}: {}", response.status()));
    }
    let mut hasher = Sha256::new();
    let mut bytes = 0;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
    {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
    }
    let got = format!("sha256:{}", hex::encode(hasher.finalize()));
    if got != digest {
        return Err(format!("GET {url}: body hashed to {got}"));
    }
    Ok(bytes)
}

/// [`STORM_PULLS`] pulls, each with its own client, released together by a barrier.
async fn storm(base: &str, image: &Image) -> Vec<Pulled> {
    let barrier = Arc::new(Barrier::new(STORM_PULLS));
    let tasks: Vec<_> = (0..STORM_PULLS)
        .map(|_| {
            let (barrier, client) = (barrier.clone(), client());
            let (base, image) = (base.to_string(), image.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                timed_pull(&client, &base, STORM_REPO, &image).await
            })
        })
        .collect();
    let mut pulled = Vec::new();
    for task in tasks {
        pulled.push(task.await.expect("pull task panicked"));
    }
    pulled
}

/// `clients` keep-alive clients each downloading `url` `each` times, bytes counted and
/// discarded; GB/s (10^9 bytes) over the wall time from their common start.
///
/// The clients are blocking threads with a bare HTTP/1.1 reader (1 MiB reads), as curl
/// is: on 2 cores a heavier client (reqwest) caps both servers and hides the difference.
async fn throughput(url: &str, clients: usize, each: usize, size: u64) -> f64 {
    let (addr, path) = split_url(url);
    tokio::task::spawn_blocking(move || {
        let barrier = Arc::new(std::sync::Barrier::new(clients + 1));
        let threads: Vec<_> = (0..clients)
            .map(|_| {
                let (barrier, path) = (barrier.clone(), path.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    download(addr, &path, each, size)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let mut total = 0;
        for thread in threads {
            match thread.join().expect("download thread panicked") {
                Ok(bytes) => total += bytes,
                Err(e) => panic!("warm download of {path} failed: {e}"),
            }
        }
        total as f64 / start.elapsed().as_secs_f64() / 1e9
    })
    .await
    .expect("throughput thread panicked")
}

/// `http://HOST:PORT/PATH` as an address and a path.
fn split_url(url: &str) -> (SocketAddr, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    (host.parse().expect("a HOST:PORT address"), path.to_string())
}

/// GETs `path` `each` times over one keep-alive connection; every answer must be a
/// `200` with a `Content-Length` of `size`. Returns the body bytes received.
fn download(addr: SocketAddr, path: &str, each: usize, size: u64) -> Result<u64, String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(REQUEST_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1024 * 1024];
    let mut total = 0;
    for _ in 0..each {
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n")
            .map_err(|e| format!("send: {e}"))?;
        let mut filled = 0;
        let head_len = loop {
            let n = stream
                .read(&mut buf[filled..])
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed before the headers ended".into());
            }
            filled += n;
            if let Some(at) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if filled == buf.len() {
                return Err("headers too long".into());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!(
                "answer: {}",
                head.lines().next().unwrap_or_default()
            ));
        }
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or("answer without Content-Length")?;
        if length != size {
            return Err(format!("Content-Length {length}, not {size}"));
        }
        let mut got = (filled - head_len) as u64;
        while got < length {
            let n = stream.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("connection closed after {got} of {length} bytes"));
            }
            got += n as u64;
        }
        if got != length {
            return Err(format!("{got} bytes where {length} were announced"));
        }
        total += got;
    }
    Ok(total)
}

/// Latency figures of a set of pulls (failed pulls counted, not timed).
struct Latencies {
    pulls: usize,
    failed: usize,
    first_error: Option<String>,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latencies {
    fn of(pulled: Vec<Pulled>) -> Latencies {
        let pulls = pulled.len();
        let mut first_error = None;
        let mut times = Vec::new();
        for p in pulled {
            match p.result {
                Ok(_) => times.push(p.elapsed),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        times.sort();
        Latencies {
            pulls,
            failed: pulls - times.len(),
            first_error,
            p50: percentile(&times, 0.50),
            p99: percentile(&times, 0.99),
            max: times.last().copied().unwrap_or_default(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "pulls": self.pulls,
            "failed": self.failed,
            "first_error": self.first_error,
            "p50_ms": ms(self.p50),
            "p99_ms": ms(self.p99),
            "max_ms": ms(self.max),
        })
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The item whose `key` is the median (the upper one of an even count).
fn median_by<T>(items: &[T], key: impl Fn(&T) -> f64) -> &T {
    let mut sorted: Vec<&T> = items.iter().collect();
    sorted.sort_by(|a, b| key(a).total_cmp(&key(b)));
    sorted[sorted.len() / 2]
}

fn best(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// What reached the upstream, by kind, from the front's access log.
#[derive(Default)]
struct UpstreamCounts {
    head_manifest_tag: usize,
    get_manifest_tag: usize,
    get_manifest_digest: usize,
    get_blob: usize,
    other: Vec<String>,
}

impl UpstreamCounts {
    fn of(lines: &[LogLine]) -> UpstreamCounts {
        let mut counts = UpstreamCounts::default();
        for line in lines {
            let path = line.uri.split('?').next().unwrap_or_default();
            let (kind, reference) = if let Some((_, r)) = path.rsplit_once("/manifests/") {
                ("manifest", r)
            } else if let Some((_, r)) = path.rsplit_once("/blobs/") {
                ("blob", r)
            } else {
                ("other", "")
            };
            let by_digest = reference.contains(':');
            match (line.method.as_str(), kind, by_digest) {
                ("HEAD", "manifest", false) => counts.head_manifest_tag += 1,
                ("GET", "manifest", false) => counts.get_manifest_tag += 1,
                ("GET", "manifest", true) => counts.get_manifest_digest += 1,
                ("GET", "blob", _) => counts.get_blob += 1,
                _ => counts
                    .other
                    .push(format!("{} {} {}", line.method, line.uri, line.status)),
            }
        }
        counts
    }

    fn total(&self) -> usize {
        self.head_manifest_tag
            + self.get_manifest_tag
            + self.get_manifest_digest
            + self.get_blob
            + self.other.len()
    }

    fn json(&self) -> Value {
        json!({
            "head_manifest_by_tag": self.head_manifest_tag,
            "get_manifest_by_tag": self.get_manifest_tag,
            "get_manifest_by_digest": self.get_manifest_digest,
            "get_blob": self.get_blob,
            "other": self.other.len(),
            "other_requests": self.other,
            "total": self.total(),
        })
    }
}

/// Peak resident memory (`VmHWM`) of a process, in MiB (0 if unreadable).
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// The `--data` directory the cache process was started with (from its command line).
fn data_dir(pid: u32) -> PathBuf {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("read the cache's cmdline");
    let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
    let at = args
        .iter()
        .position(|a| *a == b"--data")
        .expect("the cache runs with --data");
    PathBuf::from(String::from_utf8_lossy(args[at + 1]).into_owned())
}

/// The 1-minute load average (`/proc/loadavg`).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn json_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-load.json")
}

/// nginx serving one stored file with `sendfile on`: the warm-throughput reference.
struct StaticNginx {
    _child: support::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl StaticNginx {
    /// Starts nginx on a free port, serving `file` at `/blob`, and waits until it answers.
    async fn start(file: &Path) -> StaticNginx {
        let dir = support::temp_dir("sendfile");
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("tmp")).expect("create nginx dirs");
        let user = if running_as_root() {
            "user root root;"
        } else {
            ""
        };
        let mut failures = Vec::new();
        for attempt in 0..5 {
            let port = support::free_port();
            let instance = support::instance_id();
            let conf = format!(
                r#"{user}
daemon off;
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path {d}/tmp;
    proxy_temp_path {d}/tmp;
    fastcgi_temp_path {d}/tmp;
    uwsgi_temp_path {d}/tmp;
    scgi_temp_path {d}/tmp;
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        location = /ready {{ return 200 "{instance}"; }}
        location = /blob {{
            default_type application/octet-stream;
            alias {file};
        }}
    }}
}}
"#,
                file = file.display()
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let log = dir.path().join("stderr.log");
            let out = std::fs::File::create(&log).expect("create nginx log");
            let mut child = support::Child::spawn(
                "nginx",
                Command::new("nginx")
                    .arg("-p")
                    .arg(format!("{d}/"))
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-c")
                    .arg(&conf_path)
                    .stdout(Stdio::from(out.try_clone().expect("dup log")))
                    .stderr(Stdio::from(out)),
            )
            .unwrap_or_else(|e| panic!("{e} (apt-get install nginx)"))
            .with_descendants();
            let probe = support::probe_client();
            let ready = format!("http://127.0.0.1:{port}/ready");
            let mut exited = None;
            let up = support::wait_until("sendfile nginx", support::READY_TIMEOUT, || {
                exited = exited.take().or_else(|| child.exited());
                let gone = exited.is_some();
                let (probe, ready, instance) = (probe.clone(), ready.clone(), instance.clone());
                async move {
                    if gone {
                        return Some(false);
                    }
                    let body = probe.get(&ready).send().await.ok()?.text().await.ok()?;
                    (body == instance).then_some(true)
                }
            })
            .await;
            if up == Ok(true) {
                return StaticNginx {
                    _child: child,
                    url: format!("http://127.0.0.1:{port}/blob"),
                    _dir: dir,
                };
            }
            drop(child);
            let tail = format!(
                "{}\n{}",
                support::tail(&log, 20),
                support::tail(&dir.path().join("error.log"), 20)
            );
            let collided = tail.contains("Address already in use");
            failures.push(format!("attempt {attempt} on port {port}: {up:?}\n{tail}"));
            if !collided {
                break;
            }
        }
        panic!(
            "sendfile nginx did not start:\n{}",
            failures.join("\n---\n")
        );
    }

    fn url(&self) -> String {
        self.url.clone()
    }
}

/// As root nginx would switch workers to `nobody`, who cannot read our temp dirs.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uid = s.lines().find(|l| l.starts_with("Uid:"))?;
            Some(uid.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// One storm through a fresh cold cache.
struct StormRound {
    latencies: Latencies,
    upstream: UpstreamCounts,
    /// Peak RSS of the cache process, MiB.
    rss: f64,
}

/// Warm throughput for one client count: GB/s of every round, via the cache and via nginx.
struct Warm {
    clients: usize,
    each: usize,
    cache: Vec<f64>,
    nginx: Vec<f64>,
}

impl Warm {
    /// Best cache round over best nginx round.
    fn ratio(&self) -> f64 {
        best(&self.cache) / best(&self.nginx)
    }
}

struct Report {
    image_bytes: u64,
    blobs: usize,
    single_direct: Latencies,
    single_cache: Latencies,
    single_rss: f64,
    single_upstream: UpstreamCounts,
    storms_direct: Vec<Latencies>,
    storms_cache: Vec<StormRound>,
    warm: Vec<Warm>,
    warm_rss: f64,
    seconds: f64,
    /// The 1-minute load average before and after: other work on the machine skews figures.
    load: (f64, f64),
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl Report {
    /// Upstream requests the product aims at: one per blob plus one per manifest.
    fn target_requests(&self) -> usize {
        self.blobs + 1
    }

    /// The direct storm with the median p99.
    fn storm_direct(&self) -> &Latencies {
        median_by(&self.storms_direct, |l| l.p99.as_secs_f64())
    }

    /// The storm through the cache with the median p99.
    fn storm_cache(&self) -> &StormRound {
        median_by(&self.storms_cache, |r| r.latencies.p99.as_secs_f64())
    }

    /// The highest peak RSS of any storm round.
    fn storm_rss(&self) -> f64 {
        self.storms_cache.iter().map(|r| r.rss).fold(0.0, f64::max)
    }

    /// The most upstream requests any storm round made.
    fn storm_requests(&self) -> usize {
        self.storms_cache
            .iter()
            .map(|r| r.upstream.total())
            .max()
            .unwrap_or_default()
    }

    fn storm_vs_single(&self) -> f64 {
        ratio(self.storm_cache().latencies.p99, self.single_cache.p50)
    }

    fn storm_vs_direct(&self) -> f64 {
        ratio(self.storm_cache().latencies.p99, self.storm_direct().p99)
    }

    fn print(&self) {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!();
        println!("pullthrough load benchmark — 2 cores shared by clients and servers; ratios are against references measured in this run");
        println!();
        println!(
            "Storm: {STORM_PULLS} concurrent pulls of {STORM_REPO}:1 (manifest + {} blobs, {:.2} MiB), each blob sha256-verified",
            self.blobs,
            mib(self.image_bytes)
        );
        println!(
            "  {:<34} {:>6} {:>7} {:>9} {:>9} {:>9} {:>13}",
            "", "pulls", "failed", "p50 ms", "p99 ms", "max ms", "peak RSS MiB"
        );
        let rows = [
            ("single pull, upstream direct", &self.single_direct, None),
            (
                "single pull, cold cache",
                &self.single_cache,
                Some(self.single_rss),
            ),
            ("storm, upstream direct", self.storm_direct(), None),
            (
                "storm, cold cache",
                &self.storm_cache().latencies,
                Some(self.storm_rss()),
            ),
        ];
        for (name, l, rss) in rows {
            println!(
                "  {:<34} {:>6} {:>7} {:>9.1} {:>9.1} {:>9.1} {:>13}",
                name,
                l.pulls,
                l.failed,
                ms(l.p50),
                ms(l.p99),
                ms(l.max),
                rss.map_or("-".to_string(), |r| format!("{r:.1}"))
            );
            if let Some(e) = &l.first_error {
                println!("      first failure: {e}");
            }
        }
        let p99s = |l: &mut dyn Iterator<Item = &Latencies>| {
            l.map(|l| format!("{:.0}", ms(l.p99)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  (single: median of {SINGLE_RUNS} pulls, each against a fresh cache; storms: the median-p99 round of {STORM_ROUNDS},"
        );
        println!(
            "   p99 ms per round: direct {}; cache {}; peak RSS: highest of the rounds)",
            p99s(&mut self.storms_direct.iter()),
            p99s(&mut self.storms_cache.iter().map(|r| &r.latencies))
        );
        println!();
        println!("Upstream requests (front's access log)");
        println!(
            "  {:<34} {:>9} {:>8} {:>11} {:>9} {:>6} {:>6} {:>7}",
            "", "HEAD tag", "GET tag", "GET digest", "GET blob", "other", "total", "target"
        );
        let mut rows = vec![("single pull, cold cache".to_string(), &self.single_upstream)];
        for (i, round) in self.storms_cache.iter().enumerate() {
            rows.push((
                format!("storm, cold cache, round {}", i + 1),
                &round.upstream,
            ));
        }
        for (name, c) in rows {
            println!(
                "  {:<34} {:>9} {:>8} {:>11} {:>9} {:>6} {:>6} {:>7}",
                name,
                c.head_manifest_tag,
                c.get_manifest_tag,
                c.get_manifest_digest,
                c.get_blob,
                c.other.len(),
                c.total(),
                self.target_requests()
            );
            for other in c.other.iter().take(5) {
                println!("      other: {other}");
            }
        }
        println!();
        println!(
            "Warm throughput: one {} MiB blob, stored; clients download over keep-alive, counting bytes",
            BIG_BYTES >> 20
        );
        println!(
            "  {:<34} {:>11} {:>11} {:>13} {:>8}",
            "", "cache GB/s", "nginx GB/s", "cache/nginx", "target"
        );
        for w in &self.warm {
            println!(
                "  {:<34} {:>11.2} {:>11.2} {:>13.2} {:>8}",
                format!("{} client(s) x {} downloads", w.clients, w.each),
                best(&w.cache),
                best(&w.nginx),
                w.ratio(),
                format!(">= {TARGET_THROUGHPUT_RATIO}")
            );
        }
        println!(
            "  (best of {THROUGHPUT_ROUNDS} alternating rounds each; nginx serves the cache's own stored file with sendfile)"
        );
        println!();
        println!("Targets");
        let requests = self.storm_requests();
        let lines = [
            (
                format!(
                    "storm upstream requests = {} (1 per blob + 1 per manifest)",
                    self.target_requests()
                ),
                format!("{requests}"),
                requests == self.target_requests(),
            ),
            (
                format!("storm p99 / single pull <= {TARGET_STORM_P99_RATIO}"),
                format!("{:.2}", self.storm_vs_single()),
                self.storm_vs_single() <= TARGET_STORM_P99_RATIO,
            ),
            (
                format!("storm p99 via cache / direct <= {TARGET_STORM_P99_RATIO}"),
                format!("{:.2}", self.storm_vs_direct()),
                self.storm_vs_direct() <= TARGET_STORM_P99_RATIO,
            ),
            (
                format!("peak RSS during the storm <= {TARGET_RSS_MIB} MiB"),
                format!("{:.1} MiB", self.storm_rss()),
                self.storm_rss() <= TARGET_RSS_MIB,
            ),
        ];
        for (what, got, ok) in lines {
            println!("  {what:<58} {got:>10}  {}", verdict(ok));
        }
        for w in &self.warm {
            println!(
                "  {:<58} {:>10}  {}",
                format!(
                    "warm throughput, {} client(s), cache/nginx >= {TARGET_THROUGHPUT_RATIO}",
                    w.clients
                ),
                format!("{:.2}", w.ratio()),
                verdict(w.ratio() >= TARGET_THROUGHPUT_RATIO)
            );
        }
        println!(
            "  (storm requests: the worst round; peak RSS of the cache after the warm runs: {:.1} MiB)",
            self.warm_rss
        );
        println!(
            "\nwhole bench {:.0} s; 1-minute load average {:.1} before, {:.1} after (other work on the machine skews the figures)",
            self.seconds, self.load.0, self.load.1
        );
    }

    fn json(&self) -> Value {
        json!({
            "storm": {
                "image": {"repo": STORM_REPO, "bytes": self.image_bytes, "blobs": self.blobs},
                "pulls": STORM_PULLS,
                "single_runs": SINGLE_RUNS,
                "single_direct": self.single_direct.json(),
                "single_cache": self.single_cache.json(),
                "single_cache_peak_rss_mib": self.single_rss,
                "single_cache_upstream_requests": self.single_upstream.json(),
                "rounds": STORM_ROUNDS,
                "storm_direct_rounds": self.storms_direct.iter().map(Latencies::json).collect::<Vec<_>>(),
                "storm_cache_rounds": self.storms_cache.iter().map(|r| json!({
                    "latency": r.latencies.json(),
                    "peak_rss_mib": r.rss,
                    "upstream_requests": r.upstream.json(),
                })).collect::<Vec<_>>(),
                "storm_direct_median": self.storm_direct().json(),
                "storm_cache_median": self.storm_cache().latencies.json(),
                "storm_cache_peak_rss_mib": self.storm_rss(),
                "storm_cache_upstream_requests_worst": self.storm_requests(),
                "target_upstream_requests": self.target_requests(),
                "p99_ratio_storm_over_single": self.storm_vs_single(),
                "p99_ratio_storm_cache_over_direct": self.storm_vs_direct(),
            },
            "warm": {
                "blob_bytes": BIG_BYTES,
                "rounds": THROUGHPUT_ROUNDS,
                "runs": self.warm.iter().map(|w| json!({
                    "clients": w.clients,
                    "downloads_per_client": w.each,
                    "cache_gb_per_s_rounds": w.cache,
                    "nginx_gb_per_s_rounds": w.nginx,
                    "cache_gb_per_s_best": best(&w.cache),
                    "nginx_gb_per_s_best": best(&w.nginx),
                    "ratio_cache_over_nginx": w.ratio(),
                })).collect::<Vec<_>>(),
                "cache_peak_rss_mib": self.warm_rss,
            },
            "targets": {
                "upstream_requests": self.target_requests(),
                "storm_p99_ratio_max": TARGET_STORM_P99_RATIO,
                "throughput_ratio_min": TARGET_THROUGHPUT_RATIO,
                "storm_peak_rss_mib_max": TARGET_RSS_MIB,
            },
            "seconds": self.seconds,
            "load_average_1m": {"before": self.load.0, "after": self.load.1},
        })
    }
}
