//! nginx in front of an upstream: counts what reaches the upstream and injects faults.
//!
//! ```ignore
//! let front = Front::start(registry.addr()).await;
//! front.set_mode(Mode::Status503).await;
//! assert_eq!(front.count("GET", "/blobs/"), 1);
//! ```
//! nginx runs with its own prefix (pid, logs, temp paths) and `daemon off;`, so the process we
//! start is the master; on drop it and its workers are killed by PID. (`master_process off;`
//! would make that simpler, but a single-process nginx stops answering after a reload.)

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::Child;

/// How the front treats requests for the upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Pass everything through.
    Normal,
    /// Answer every request `503` with an OCI error body, without asking the upstream.
    Status503,
    /// Answer every request `429 TOOMANYREQUESTS` with `Retry-After`.
    TooMany {
        /// Seconds in the `Retry-After` header.
        retry_after: u32,
    },
    /// Pass through, but send response bodies at this many bytes per second.
    Slow {
        /// Bytes per second (`limit_rate`).
        rate: u64,
    },
    /// Answer every request with this status and an OCI error body.
    Status(u16),
    /// Raw nginx directives placed in the proxied `location` (escape hatch for later faults);
    /// they must say `proxy_buffering on|off;` themselves.
    Directives(String),
}

impl Mode {
    fn directives(&self) -> String {
        let error = |status: u16, code: &str| {
            format!(
                "default_type application/json;\nreturn {status} '{{\"errors\":[{{\"code\":\"{code}\",\"message\":\"injected by the test front\"}}]}}';\n"
            )
        };
        // Bodies stream unbuffered, except in Slow: nginx applies `limit_rate` only to
        // buffered proxying (with `proxy_buffering off` it is silently ignored).
        match self {
            Mode::Normal => "proxy_buffering off;\n".to_string(),
            Mode::Status503 => error(503, "UNAVAILABLE"),
            Mode::TooMany { retry_after } => format!(
                "add_header Retry-After {retry_after} always;\n{}",
                error(429, "TOOMANYREQUESTS")
            ),
            Mode::Slow { rate } => format!("proxy_buffering on;\nlimit_rate {rate};\n"),
            Mode::Status(status) => error(*status, "UNKNOWN"),
            Mode::Directives(raw) => format!("{raw}\n"),
        }
    }
}

/// One access-log line: a request that finished at the front.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// HTTP method.
    pub method: String,
    /// Request URI as sent, query included (e.g. `/v2/library/x/manifests/1?ns=docker.io`).
    pub uri: String,
    /// Status the front answered.
    pub status: u16,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// When nginx logged it, i.e. when the response ended (`$msec`, Unix milliseconds).
    pub finished_ms: Option<u64>,
    /// How long it took, first request byte to log (`$request_time`, milliseconds).
    pub duration_ms: Option<u64>,
}

impl LogLine {
    /// When the request started at the front (Unix milliseconds), if the log says.
    pub fn started_ms(&self) -> Option<u64> {
        Some(self.finished_ms?.saturating_sub(self.duration_ms?))
    }
}

/// A running nginx front; killed when dropped.
pub struct Front {
    child: Child,
    addr: SocketAddr,
    upstream: SocketAddr,
    generation: u64,
    instance: String,
    dir: tempfile::TempDir,
}

impl Front {
    /// Starts nginx on a free 127.0.0.1 port, proxying everything to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Front {
        let dir = super::temp_dir("front");
        for sub in [
            "logs",
            "tmp/body",
            "tmp/proxy",
            "tmp/fastcgi",
            "tmp/uwsgi",
            "tmp/scgi",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("create nginx dirs");
        }
        let mut failures = Vec::new();
        for attempt in 0..5 {
            let port = super::free_port();
            let instance = super::instance_id();
            write_file(&dir.path().join("mode.conf"), &Mode::Normal.directives());
            write_file(
                &dir.path().join("ready.conf"),
                &ready_directive(&instance, 0),
            );
            write_file(
                &conf_path(dir.path()),
                &nginx_conf(dir.path(), port, upstream),
            );
            let test = super::run(nginx(dir.path()).arg("-t"), super::READY_TIMEOUT)
                .unwrap_or_else(|e| panic!("{e} (apt-get install nginx)"));
            assert!(
                test.success,
                "nginx -t rejected the front's config:\n{}",
                test.stderr
            );
            let log = dir.path().join("logs/stderr.log");
            let out = File::create(&log).expect("create nginx stderr log");
            let mut child = Child::spawn(
                "nginx",
                nginx(dir.path())
                    .stdout(Stdio::from(out.try_clone().unwrap()))
                    .stderr(Stdio::from(out)),
            )
            .unwrap_or_else(|e| panic!("{e}"))
            .with_descendants();
            match wait_generation(&mut child, port, &instance, 0).await {
                Ok(()) => {
                    return Front {
                        child,
                        addr: super::localhost(port),
                        upstream,
                        generation: 0,
                        instance,
                        dir,
                    }
                }
                Err(e) => {
                    drop(child);
                    let tail = format!(
                        "{}\n{}",
                        super::tail(&log, 20),
                        super::tail(&dir.path().join("logs/error.log"), 20)
                    );
                    let collided = tail.contains("Address already in use");
                    failures.push(format!("attempt {attempt} on port {port}: {e}\n{tail}"));
                    if !collided {
                        break;
                    }
                }
            }
        }
        panic!(
            "nginx front did not become ready:\n{}",
            failures.join("\n---\n")
        );
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the host part of an image reference or a mirror location.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The upstream it proxies to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches fault mode: rewrites the included file, `nginx -s reload`, and waits until
    /// fresh connections are served by the new configuration.
    pub async fn set_mode(&mut self, mode: Mode) {
        let old_workers = super::descendants(self.child.pid());
        self.generation += 1;
        write_file(&self.dir.path().join("mode.conf"), &mode.directives());
        write_file(
            &self.dir.path().join("ready.conf"),
            &ready_directive(&self.instance, self.generation),
        );
        let test = super::run(nginx(self.dir.path()).arg("-t"), super::READY_TIMEOUT)
            .expect("run nginx -t");
        assert!(
            test.success,
            "nginx -t rejected mode {mode:?}:\n{}",
            test.stderr
        );
        let reload = super::run(
            nginx(self.dir.path()).args(["-s", "reload"]),
            super::READY_TIMEOUT,
        )
        .expect("run nginx -s reload");
        assert!(reload.success, "nginx -s reload failed:\n{}", reload.stderr);
        let port = self.addr.port();
        let (instance, generation) = (self.instance.clone(), self.generation);
        if let Err(e) = wait_generation(&mut self.child, port, &instance, generation).await {
            panic!(
                "nginx front did not switch to {mode:?}: {e}\n{}",
                self.error_log_tail()
            );
        }
        // A pooled keep-alive connection to an old worker would still see the old mode.
        // Old workers close their idle connections and exit at once on a reload, so wait
        // until every worker from before the reload is gone. One still finishing an
        // in-flight request (a slow body) may take longer, and may: in-flight requests
        // finish under the old mode, as in production. So that wait is bounded,
        // generously: on a loaded machine an idle old worker took over 5 s to go,
        // and a request that reached it saw the old mode.
        let _ = super::wait_until("old nginx workers to exit", Duration::from_secs(20), || {
            let alive = old_workers
                .iter()
                .filter(|pid| {
                    std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|stat| !stat.contains(") Z "))
                        .unwrap_or(false)
                })
                .count();
            async move { (alive == 0).then_some(()) }
        })
        .await;
    }

    /// Every request logged so far, oldest first (complete lines only).
    pub fn requests(&self) -> Vec<LogLine> {
        let text = std::fs::read_to_string(self.access_log()).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete.lines().filter_map(parse_line).collect()
    }

    /// How many logged requests had `method` and a URI containing `uri_part`.
    pub fn count(&self, method: &str, uri_part: &str) -> usize {
        self.requests()
            .iter()
            .filter(|l| l.method == method && l.uri.contains(uri_part))
            .count()
    }

    /// Waits until at least `n` requests are logged (nginx logs when a request ends).
    pub async fn wait_for_requests(&self, n: usize) -> Vec<LogLine> {
        let found = super::wait_until(
            &format!("{n} requests in the front's access log"),
            super::READY_TIMEOUT,
            || async {
                let lines = self.requests();
                (lines.len() >= n).then_some(lines)
            },
        )
        .await;
        found.unwrap_or_else(|e| panic!("{e}; log so far: {:#?}", self.requests()))
    }

    /// Waits until the access log has not grown for `quiet`, then returns it.
    pub async fn settled(&self, quiet: Duration) -> Vec<LogLine> {
        let mut last = (usize::MAX, Instant::now());
        let found = super::wait_until(
            "the front's access log to settle",
            super::READY_TIMEOUT,
            || {
                let lines = self.requests();
                let now = Instant::now();
                let done = if lines.len() != last.0 {
                    last = (lines.len(), now);
                    None
                } else if now.duration_since(last.1) >= quiet {
                    Some(lines)
                } else {
                    None
                };
                async move { done }
            },
        )
        .await;
        found.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Forgets what was logged so far (truncates the access log).
    pub fn clear(&self) {
        write_file(&self.access_log(), "");
    }

    /// Its access log file.
    pub fn access_log(&self) -> PathBuf {
        self.dir.path().join("logs/access.log")
    }

    /// The last lines of nginx's error log.
    pub fn error_log_tail(&self) -> String {
        super::tail(&self.dir.path().join("logs/error.log"), 40)
    }

    /// Kills nginx now: the port stops answering (connections are refused).
    pub fn stop(&mut self) {
        self.child.kill();
    }
}

/// `nginx -p DIR/ -e DIR/logs/error.log -c DIR/nginx.conf`: nothing outside the prefix.
fn nginx(dir: &Path) -> Command {
    let mut command = Command::new("nginx");
    command
        .arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-e")
        .arg(dir.join("logs/error.log"))
        .arg("-c")
        .arg(conf_path(dir));
    command
}

fn conf_path(dir: &Path) -> PathBuf {
    dir.join("nginx.conf")
}

fn write_file(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

fn ready_directive(instance: &str, generation: u64) -> String {
    format!("return 200 \"{instance} {generation}\";\n")
}

/// Ready when the private probe location answers with our instance id and generation.
async fn wait_generation(
    child: &mut Child,
    port: u16,
    instance: &str,
    generation: u64,
) -> Result<(), String> {
    let probe = super::probe_client();
    let url = format!("http://127.0.0.1:{port}/__pullthrough_front/ready");
    let want = format!("{instance} {generation}");
    let mut exited = None;
    let ok = super::wait_until("nginx front readiness", super::READY_TIMEOUT, || {
        exited = exited.take().or_else(|| child.exited());
        let gone = exited.is_some();
        let (probe, url, want) = (probe.clone(), url.clone(), want.clone());
        async move {
            if gone {
                return Some(false);
            }
            let body = probe.get(&url).send().await.ok()?.text().await.ok()?;
            (body == want).then_some(true)
        }
    })
    .await?;
    if ok {
        Ok(())
    } else {
        Err(exited.unwrap_or_else(|| "nginx exited".into()))
    }
}

fn parse_line(line: &str) -> Option<LogLine> {
    let mut fields = line.split(' ');
    Some(LogLine {
        method: fields.next()?.to_string(),
        uri: fields.next()?.to_string(),
        status: fields.next()?.parse().ok()?,
        bytes: fields.next()?.parse().ok()?,
        finished_ms: fields.next().and_then(parse_millis),
        duration_ms: fields.next().and_then(parse_millis),
    })
}

/// nginx's `SECONDS.MMM` (as `$msec` and `$request_time` print) in milliseconds.
fn parse_millis(text: &str) -> Option<u64> {
    let (secs, millis) = text.split_once('.')?;
    if millis.len() != 3 {
        return None;
    }
    Some(secs.parse::<u64>().ok()? * 1000 + millis.parse::<u64>().ok()?)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn nginx_conf(dir: &Path, port: u16, upstream: SocketAddr) -> String {
    let d = dir.display();
    // As root nginx would switch to `nobody`, which may lack a group here; stay root instead.
    let user = if running_as_root() {
        "user root root;"
    } else {
        ""
    };
    format!(
        r#"{user}
daemon off;
worker_processes 1;
pid {d}/logs/nginx.pid;
error_log {d}/logs/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;

    log_format counted '$request_method $request_uri $status $body_bytes_sent $msec $request_time';
    access_log {d}/logs/access.log counted;

    keepalive_requests 100000;
    large_client_header_buffers 8 64k;
    client_max_body_size 0;

    upstream pullthrough_upstream {{
        server {upstream};
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port};

        location = /__pullthrough_front/ready {{
            access_log off;
            default_type text/plain;
            include {d}/ready.conf;
        }}

        location / {{
            include {d}/mode.conf;
            proxy_pass http://pullthrough_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_request_buffering off;
            proxy_redirect off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
        }}
    }}
}}
"#
    )
}
