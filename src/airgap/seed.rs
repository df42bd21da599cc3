//! `pullthrough seed`: pulls image lists into the store, through this
//! process's own cache (auth, coalescing, verification, the store) or through
//! a running cache's registry API (`--server`).

use super::{document_type, is_index, AirgapError, Content, Platforms, Resolved};
use crate::cache::prefetch::{sized_targets, Target};
use crate::cache::{Accept, Cache, MANIFEST_TYPES};
use crate::imagelist::ImageRef;
use crate::reference::{Digest, Reference, RepoName};
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where seeding pulls from.
pub enum Puller {
    /// This process's own cache, on the data directory (no server may hold it).
    Local(Cache),
    /// A running cache's registry API at this base URL (`http://host:5000`).
    Remote {
        /// The cache's base URL.
        base: String,
        /// The HTTP client.
        client: reqwest::Client,
    },
}

/// How to seed.
#[derive(Debug, Clone)]
pub struct SeedOptions {
    /// Which platforms of an index to take.
    pub platforms: Platforms,
    /// Images seeded at once, and blob downloads at once.
    pub concurrency: usize,
}

/// How seeding went.
#[derive(Debug, Default)]
pub struct SeedReport {
    /// Images seeded whole.
    pub images: Vec<Resolved>,
    /// Images that failed, each with its reason.
    pub failures: Vec<(String, String)>,
    /// Blobs and manifests transferred.
    pub fetched: usize,
    /// Blobs already in the store (nothing transferred).
    pub present: usize,
    /// Bytes transferred.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl std::fmt::Display for SeedReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "{} images seeded, {} failed; {} blobs fetched ({}, {:.1} MB/s), {} already present; {:.1}s",
            self.images.len(),
            self.failures.len(),
            self.fetched,
            bytesize::ByteSize(self.bytes),
            self.bytes as f64 / 1e6 / secs.max(1e-9),
            self.present,
            secs
        )?;
        for (image, reason) in &self.failures {
            write!(f, "\n  failed: {image}: {reason}")?;
        }
        Ok(())
    }
}

/// Progress output: a bar on a terminal, plain lines otherwise.
#[derive(Clone)]
pub struct Progress {
    bar: ProgressBar,
    lines: bool,
}

impl Progress {
    /// A bar when stderr is a terminal, else one plain line per image.
    pub fn for_stderr() -> Progress {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("a valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            Progress { bar, lines: false }
        } else {
            Progress::quiet(true)
        }
    }

    /// No bar; plain lines if `lines`.
    pub fn quiet(lines: bool) -> Progress {
        Progress {
            bar: ProgressBar::hidden(),
            lines,
        }
    }

    fn line(&self, text: String) {
        if self.lines {
            eprintln!("{text}");
        } else {
            self.bar.set_message(text);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// A manifest as pulled.
struct Pulled {
    digest: Digest,
    media_type: String,
    bytes: Bytes,
}

/// Counters shared by every image of one run.
#[derive(Default)]
struct Tally {
    fetched: AtomicUsize,
    present: AtomicUsize,
    bytes: AtomicU64,
}

impl Puller {
    /// The configured upstream serving `image`, by its registry.
    fn upstream(&self, image: &ImageRef) -> Result<String, AirgapError> {
        match self {
            Puller::Local(cache) => cache
                .upstreams()
                .find(&image.registry)
                .map(|up| up.name().to_string())
                .ok_or_else(|| AirgapError::UnknownRegistry {
                    image: image.to_string(),
                    registry: image.registry.clone(),
                }),
            // The server decides; `?ns=` names the registry.
            Puller::Remote { .. } => Ok(image.registry.clone()),
        }
    }

    fn repo(&self, upstream: &str, image: &ImageRef) -> RepoName {
        match self {
            Puller::Local(cache) => match cache.upstreams().find(upstream) {
                Some(up) => up.normalize(image.repository.clone()),
                None => image.repository.clone(),
            },
            Puller::Remote { .. } => image.repository.clone(),
        }
    }

    async fn manifest(
        &self,
        upstream: &str,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<Pulled, String> {
        match self {
            Puller::Local(cache) => {
                let up = cache.upstreams().find(upstream).ok_or("upstream gone")?;
                let m = match reference {
                    Reference::Tag(tag) => {
                        cache
                            .manifest_by_tag(up, repo, tag, &Accept::default())
                            .await
                    }
                    Reference::Digest(d) => cache.manifest_by_digest(up, repo, d).await,
                }
                .map_err(|e| e.to_string())?;
                Ok(Pulled {
                    digest: m.digest,
                    media_type: m.media_type,
                    bytes: m.bytes,
                })
            }
            Puller::Remote { base, client } => {
                let url = format!("{base}/v2/{repo}/manifests/{reference}");
                let resp = client
                    .get(&url)
                    .query(&[("ns", upstream)])
                    .header(reqwest::header::ACCEPT, MANIFEST_TYPES)
                    .send()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let resp = checked(resp).await?;
                let media_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let bytes = resp.bytes().await.map_err(|e| format!("{url}: {e}"))?;
                let digest = match reference {
                    Reference::Digest(d) => d.same_algorithm_of(&bytes),
                    Reference::Tag(_) => Digest::sha256_of(&bytes),
                };
                let media_type = media_type
                    .or_else(|| document_type(&bytes))
                    .unwrap_or_default();
                Ok(Pulled {
                    digest,
                    media_type,
                    bytes,
                })
            }
        }
    }

    /// Pulls one blob into the store; `Ok(false)` if it was there already.
    async fn blob(
        &self,
        upstream: &str,
        repo: &RepoName,
        digest: &Digest,
        progress: &Progress,
        tally: &Tally,
    ) -> Result<bool, String> {
        let mut body = match self {
            Puller::Local(cache) => {
                let store = cache.store();
                let up = cache.upstreams().find(upstream).ok_or("upstream gone")?;
                if store.blob_size(digest).is_some() {
                    if !store.is_linked(upstream, repo, digest) {
                        // Stored through another repository: upstream confirms
                        // this one has it (a HEAD), nothing is transferred.
                        cache
                            .blob(up, repo, digest, None, true)
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|_| "range not satisfiable".to_string())?;
                    }
                    return Ok(false);
                }
                match cache.blob(up, repo, digest, None, false).await {
                    Ok(Ok(answer)) => answer.body.ok_or("no body")?,
                    Ok(Err(_)) => return Err("range not satisfiable".into()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Puller::Remote { base, client } => {
                let url = format!("{base}/v2/{repo}/blobs/{digest}");
                let resp = client
                    .get(&url)
                    .query(&[("ns", upstream)])
                    .send()
                    .await
                    .map_err(|e| format!("{url}: {e}"))?;
                let stream = checked(resp).await?.bytes_stream();
                Box::pin(stream.map(|r| r.map_err(std::io::Error::other)))
            }
        };
        // The cache verifies its own downloads; a remote one is checked here.
        let mut hasher = digest.algorithm().hasher();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            hasher.update(&chunk);
            progress.bar.inc(chunk.len() as u64);
            tally.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let actual = hasher.finish();
        if &actual != digest {
            return Err(format!("{digest}: received {actual}"));
        }
        // The cache may serve a blob it could not keep (no room on disk, a
        // write error): for a seed that is a failure, not a success.
        if let Puller::Local(cache) = self {
            if cache.store().blob_size(digest).is_none() {
                return Err(format!("{digest}: not stored (no room on disk?)"));
            }
        }
        Ok(true)
    }
}

/// A response with a success status, or its status and body as the error.
async fn checked(resp: reqwest::Response) -> Result<reqwest::Response, String> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let (url, status) = (resp.url().clone(), resp.status());
    let body = resp.text().await.unwrap_or_default();
    Err(format!("{url}: {status} {}", body.trim()))
}

/// Seeds `images`, several at a time, each through `puller`.
pub async fn seed(
    puller: &Puller,
    images: &[ImageRef],
    options: &SeedOptions,
    progress: &Progress,
) -> SeedReport {
    let started = Instant::now();
    let tally = Tally::default();
    let blobs = Arc::new(tokio::sync::Semaphore::new(options.concurrency.max(1)));
    let results: Vec<_> = futures_util::stream::iter(images)
        .map(|image| {
            let (tally, blobs) = (&tally, blobs.clone());
            async move {
                let result = seed_one(puller, image, options, progress, tally, &blobs).await;
                match &result {
                    Ok(r) => progress.line(format!(
                        "seeded {image} ({} parts, {})",
                        r.parts.len() + 1,
                        r.top.digest
                    )),
                    Err(e) => progress.line(format!("failed {image}: {e}")),
                }
                (image, result)
            }
        })
        .buffered(options.concurrency.max(1))
        .collect()
        .await;
    let mut report = SeedReport::default();
    for (image, result) in results {
        match result {
            Ok(resolved) => report.images.push(resolved),
            Err(e) => report.failures.push((image.to_string(), e.to_string())),
        }
    }
    report.fetched = tally.fetched.load(Ordering::Relaxed);
    report.present = tally.present.load(Ordering::Relaxed);
    report.bytes = tally.bytes.load(Ordering::Relaxed);
    report.elapsed = started.elapsed();
    if let Puller::Local(cache) = puller {
        // The index to disk before the command exits: a download's writer
        // thread may still hold the store, and with it sled's last flush.
        if let Err(e) = cache.store().flush() {
            report.failures.push(("index".into(), e.to_string()));
        }
    }
    report
}

/// Resolves one image and pulls everything it is made of.
async fn seed_one(
    puller: &Puller,
    image: &ImageRef,
    options: &SeedOptions,
    progress: &Progress,
    tally: &Tally,
    blobs: &tokio::sync::Semaphore,
) -> Result<Resolved, AirgapError> {
    let failed = |reason: String| AirgapError::Image {
        image: image.to_string(),
        reason,
    };
    let upstream = puller.upstream(image)?;
    let repo = puller.repo(&upstream, image);
    let platforms = options.platforms.as_list();
    let top = puller
        .manifest(&upstream, &repo, &image.reference())
        .await
        .map_err(failed)?;
    if let Some(want) = &image.digest {
        if &top.digest != want {
            return Err(failed(format!("got {} for {want}", top.digest)));
        }
    }
    let mut parts = Vec::new();
    let mut manifests = vec![top];
    let mut layers: Vec<(Digest, u64)> = Vec::new();
    let mut i = 0;
    while i < manifests.len() {
        let targets = sized_targets(&manifests[i].bytes, &platforms);
        if is_index(&manifests[i].media_type) && targets.is_empty() {
            return Err(failed(format!("no manifest for platforms {platforms:?}")));
        }
        for (target, size) in targets {
            match target {
                Target::Manifest(d) => {
                    let m = puller
                        .manifest(&upstream, &repo, &Reference::Digest(d.clone()))
                        .await
                        .map_err(failed)?;
                    if m.digest != d {
                        return Err(failed(format!("got {} for {d}", m.digest)));
                    }
                    parts.push(Content {
                        digest: d,
                        size: m.bytes.len() as u64,
                        manifest_type: Some(m.media_type.clone()),
                    });
                    manifests.push(m);
                }
                Target::Blob(d) => {
                    if !layers.iter().any(|(l, _)| l == &d) {
                        layers.push((d, size));
                    }
                }
            }
        }
        i += 1;
    }
    let results: Vec<_> = futures_util::stream::iter(&layers)
        .map(|(d, _)| async {
            let _slot = blobs.acquire().await.expect("never closed");
            let fetched = puller.blob(&upstream, &repo, d, progress, tally).await?;
            let counter = if fetched {
                &tally.fetched
            } else {
                &tally.present
            };
            counter.fetch_add(1, Ordering::Relaxed);
            Ok::<_, String>(())
        })
        .buffer_unordered(options.concurrency.max(1))
        .collect()
        .await;
    if let Some(e) = results.into_iter().find_map(Result::err) {
        return Err(failed(e));
    }
    parts.extend(layers.into_iter().map(|(digest, size)| Content {
        digest,
        size,
        manifest_type: None,
    }));
    let top = manifests.swap_remove(0);
    Ok(Resolved {
        image: image.clone(),
        upstream,
        top: Content {
            digest: top.digest,
            size: top.bytes.len() as u64,
            manifest_type: Some(top.media_type),
        },
        parts,
    })
}
