//! The pre-puller: a node agent (a DaemonSet) that asks the node's container
//! runtime, through the CRI `ImageService` on its socket, to pull the images a
//! rollout will need, so the rollout starts from warm nodes instead of a pull
//! storm. It pulls through whatever the runtime is configured with (on our
//! nodes: the cache, by `hosts.toml`), so the cache sees the pulls.
//!
//! Pacing: a random start delay within `jitter` (a thousand nodes do not all
//! start in the same second), a bound on pulls at once, and retries with
//! jittered backoff. Then it waits, and runs again when the list changes or
//! `interval` has passed.

use crate::imagelist::ImageRef;
use futures_util::StreamExt;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, ImageSpec, ImageStatusRequest, PullImageRequest};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Why the pre-puller could not run.
#[derive(Debug, thiserror::Error)]
pub enum PrepullError {
    /// The runtime's socket did not answer.
    #[error("connecting to the CRI socket {path}: {reason}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The image list could not be read.
    #[error(transparent)]
    List(#[from] crate::imagelist::ListError),
    /// The pull secrets file could not be read.
    #[error("pull secrets {path}: {reason}")]
    Secrets {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// How to pre-pull.
#[derive(Debug, Clone)]
pub struct PrepullOptions {
    /// The container runtime's CRI socket.
    pub socket: PathBuf,
    /// The image list (plain or Kubernetes YAML).
    pub file: PathBuf,
    /// Pulls at once.
    pub concurrency: usize,
    /// Attempts after the first for a failing pull.
    pub retries: u32,
    /// The first retry's ceiling; doubled for each further one (full jitter).
    pub backoff: Duration,
    /// The window of the random delay before each run.
    pub jitter: Duration,
    /// A Docker `config.json` (a `kubernetes.io/dockerconfigjson` Secret) with pull credentials.
    pub auth_file: Option<PathBuf>,
}

/// What one run did.
#[derive(Debug, Default, Clone)]
pub struct PrepullReport {
    /// Images the runtime already had.
    pub present: Vec<String>,
    /// Images pulled now.
    pub pulled: Vec<String>,
    /// Images that could not be pulled, each with the runtime's reason.
    pub failed: Vec<(String, String)>,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for PrepullReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pulled, {} already present, {} failed in {:.1}s",
            self.pulled.len(),
            self.present.len(),
            self.failed.len(),
            self.elapsed.as_secs_f64()
        )?;
        for (image, reason) in &self.failed {
            write!(f, "\n  failed: {image}: {reason}")?;
        }
        Ok(())
    }
}

/// A random duration in `[0, window]`; per-process random keys seed it.
pub fn random_below(window: Duration) -> Duration {
    // RandomState's keys are random per process (and per call): that is the entropy.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let nanos = window.as_nanos() as u64;
    Duration::from_nanos(if nanos == 0 {
        0
    } else {
        h.finish() % (nanos + 1)
    })
}

/// Connects to the runtime's CRI socket.
pub async fn connect(socket: &Path) -> Result<ImageServiceClient<Channel>, PrepullError> {
    let path = socket.to_path_buf();
    let failed = |e: &dyn std::fmt::Display| PrepullError::Connect {
        path: socket.to_path_buf(),
        reason: e.to_string(),
    };
    // The URI is a placeholder: the connector below always dials the socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::]:50051")
        .map_err(|e| failed(&e))?
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| {
            // The whole chain, each cause in words ("transport error: No such file…").
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(": ");
                text.push_str(&c.to_string());
                cause = c.source();
            }
            failed(&text)
        })?;
    Ok(ImageServiceClient::new(channel))
}

/// Pull credentials by registry, from a Docker `config.json`.
#[derive(Default, Clone)]
pub struct Secrets {
    by_registry: HashMap<String, AuthConfig>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials themselves.
        f.debug_struct("Secrets")
            .field("registries", &self.by_registry.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Secrets {
    /// Reads a Docker `config.json`: `{"auths": {"registry": {"auth": base64("user:pass")}}}`
    /// (or `username` and `password`).
    pub fn read(path: &Path) -> Result<Secrets, PrepullError> {
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(default)]
            auth: String,
            #[serde(default)]
            username: String,
            #[serde(default)]
            password: String,
        }
        #[derive(serde::Deserialize)]
        struct File {
            #[serde(default)]
            auths: HashMap<String, Entry>,
        }
        let failed = |reason: String| PrepullError::Secrets {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
        // The error names no content: the file is secret.
        let file: File =
            serde_json::from_slice(&text).map_err(|_| failed("not a Docker config.json".into()))?;
        let mut by_registry = HashMap::new();
        for (server, entry) in file.auths {
            let registry = normalise_server(&server);
            // Checked here because the runtime, given a bad `auth`, fails the pull with
            // an error that quotes the decoded secret, which would then reach our logs.
            if !entry.auth.is_empty() && !is_user_pass(&entry.auth) {
                return Err(failed(format!(
                    "the auth for {registry} is not base64 of user:password"
                )));
            }
            let auth = AuthConfig {
                username: entry.username,
                password: entry.password,
                auth: entry.auth,
                ..AuthConfig::default()
            };
            by_registry.insert(registry, auth);
        }
        Ok(Secrets { by_registry })
    }

    fn for_image(&self, image: &ImageRef) -> Option<AuthConfig> {
        self.by_registry.get(&image.registry).cloned()
    }
}

/// Whether `auth` is what Docker writes: base64 (standard alphabet) of `user:password`.
fn is_user_pass(auth: &str) -> bool {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(auth)
        .is_ok_and(|raw| raw.contains(&b':'))
}

/// `https://index.docker.io/v1/` → `docker.io`; `ghcr.io` stays.
fn normalise_server(server: &str) -> String {
    let host = server
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".into()
        }
        other => other.to_string(),
    }
}

/// One pass over `images`: `ImageStatus` for each, `PullImage` for what is missing.
pub async fn run_once(
    client: &ImageServiceClient<Channel>,
    images: &[ImageRef],
    options: &PrepullOptions,
    secrets: &Secrets,
) -> PrepullReport {
    let started = Instant::now();
    let outcomes: Vec<_> = futures_util::stream::iter(images)
        .map(|image| {
            let mut client = client.clone();
            async move {
                let name = image.to_string();
                let outcome = pull_one(&mut client, image, &name, options, secrets).await;
                (name, outcome)
            }
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    let mut report = PrepullReport::default();
    for (name, outcome) in outcomes {
        match outcome {
            Ok(true) => report.pulled.push(name),
            Ok(false) => report.present.push(name),
            Err(reason) => report.failed.push((name, reason)),
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// `Ok(true)` if pulled now, `Ok(false)` if the runtime had it.
async fn pull_one(
    client: &mut ImageServiceClient<Channel>,
    image: &ImageRef,
    name: &str,
    options: &PrepullOptions,
    secrets: &Secrets,
) -> Result<bool, String> {
    let spec = ImageSpec {
        image: name.to_string(),
        ..ImageSpec::default()
    };
    let status = client
        .image_status(ImageStatusRequest {
            image: Some(spec.clone()),
            verbose: false,
        })
        .await
        .map_err(|s| format!("ImageStatus: {}", s.message()))?;
    if status.into_inner().image.is_some() {
        tracing::debug!(image = name, "already present");
        return Ok(false);
    }
    let mut attempt = 0;
    loop {
        tracing::info!(image = name, attempt, "pulling");
        let started = Instant::now();
        let pulled = client
            .pull_image(PullImageRequest {
                image: Some(spec.clone()),
                auth: secrets.for_image(image),
                sandbox_config: None,
            })
            .await;
        match pulled {
            Ok(resp) => {
                tracing::info!(
                    image = name,
                    image_ref = resp.into_inner().image_ref,
                    seconds = started.elapsed().as_secs_f64(),
                    "pulled"
                );
                return Ok(true);
            }
            Err(status) if attempt < options.retries => {
                let ceiling = options.backoff.saturating_mul(1 << attempt.min(16));
                let wait = random_below(ceiling);
                tracing::warn!(
                    image = name,
                    error = status.message(),
                    ?wait,
                    "pull failed; retrying"
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            Err(status) => return Err(format!("PullImage: {}", status.message())),
        }
    }
}

/// A fingerprint of the list file, to notice when it changes (a ConfigMap
/// update swaps the file behind a symlink; its content is what counts).
fn fingerprint(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    h.write(&bytes);
    Some(h.finish())
}

/// The longest wait before retrying a pass that left something to do.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(300);

/// The wait before retrying after `failing` incomplete passes in a row: between half
/// and all of `backoff` doubled per pass, at most [`MAX_RETRY_WAIT`].
fn retry_wait(backoff: Duration, failing: u32) -> Duration {
    let ceiling = backoff
        .saturating_mul(1 << failing.saturating_sub(1).min(16))
        .min(MAX_RETRY_WAIT);
    ceiling / 2 + random_below(ceiling / 2)
}

/// Runs until `stop`: a delayed first pass, then a pass whenever the list
/// changes or `interval` has passed, and after a backoff when a pass left
/// something to do. With no `interval` and nothing failing, only list changes.
pub async fn run(
    options: PrepullOptions,
    interval: Option<Duration>,
    poll: Duration,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), PrepullError> {
    let secrets = match &options.auth_file {
        Some(path) => Secrets::read(path)?,
        None => Secrets::default(),
    };
    let stop = std::pin::pin!(stop);
    let work = async {
        let delay = random_below(options.jitter);
        tracing::info!(?delay, "waiting before the first pass");
        tokio::time::sleep(delay).await;
        // Passes in a row that left something to do (runtime unreachable, images not
        // pulled): each is retried after a longer wait, with or without an `interval`.
        let mut failing_passes = 0u32;
        loop {
            let seen = fingerprint(&options.file);
            let mut incomplete = false;
            match crate::imagelist::read_list(&options.file) {
                Ok(images) => match connect(&options.socket).await {
                    Ok(client) => {
                        let report = run_once(&client, &images, &options, &secrets).await;
                        incomplete = !report.failed.is_empty();
                        tracing::info!(
                            pulled = report.pulled.len(),
                            present = report.present.len(),
                            failed = report.failed.len(),
                            seconds = report.elapsed.as_secs_f64(),
                            "prepull pass done"
                        );
                        for (image, reason) in &report.failed {
                            tracing::warn!(
                                image = image.as_str(),
                                reason = reason.as_str(),
                                "not pulled"
                            );
                        }
                    }
                    Err(e) => {
                        incomplete = true;
                        tracing::warn!(error = %e, "runtime unreachable; next pass will retry")
                    }
                },
                // Not retried: the pass reruns when the file changes (or appears).
                Err(e) => tracing::warn!(error = %e, "image list unreadable"),
            }
            failing_passes = if incomplete { failing_passes + 1 } else { 0 };
            let retry = (failing_passes > 0).then(|| retry_wait(options.backoff, failing_passes));
            let since = Instant::now();
            loop {
                tokio::time::sleep(poll).await;
                if fingerprint(&options.file) != seen {
                    tracing::info!("image list changed");
                    // Changes reach every node at once: spread the passes out again.
                    tokio::time::sleep(random_below(options.jitter)).await;
                    break;
                }
                if interval.is_some_and(|i| since.elapsed() >= i) {
                    break;
                }
                if retry.is_some_and(|r| since.elapsed() >= r) {
                    tracing::info!(failing_passes, "retrying the pass");
                    break;
                }
            }
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = work => {}
    }
    Ok(())
}
