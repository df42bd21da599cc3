//! Deterministic synthetic images, and a plain-HTTP client that pushes them to a registry.
//!
//! The same seed always yields the same bytes, hence the same digests, in every run: tar
//! headers have fixed mtimes/uids/modes, file contents come from a seeded splitmix64 stream,
//! gzip headers carry mtime 0, and JSON is written with sorted keys. Layers unpack as a real
//! filesystem (a directory and two files) because containerd and podman unpack them.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

use super::Credentials;

/// Media types used by the images, named as in the OCI image spec and Docker schema 2.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// OCI image config.
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    /// OCI gzip layer.
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    /// Docker schema 2 manifest.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Docker image config.
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    /// Docker gzip layer.
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    /// An `Accept` header listing every manifest type above, as real clients send.
    pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, \
        application/vnd.docker.distribution.manifest.list.v2+json, \
        application/vnd.oci.image.manifest.v1+json, \
        application/vnd.docker.distribution.manifest.v2+json";
}

/// The fixed mtime of every tar entry (2023-11-14T22:13:20Z).
const TAR_MTIME: u64 = 1_700_000_000;
/// Layers bigger than this are gzipped without compression: random bytes do not shrink.
const STORE_ABOVE: usize = 1 << 20;

/// `sha256:<hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A content-addressed blob: an image config or a layer.
#[derive(Clone, Debug)]
pub struct Blob {
    /// Its media type in the manifest.
    pub media_type: &'static str,
    /// `sha256:<hex>` of `bytes`.
    pub digest: String,
    /// Its content.
    pub bytes: Bytes,
}

impl Blob {
    fn new(media_type: &'static str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type,
            digest: sha256_digest(&bytes),
            bytes: Bytes::from(bytes),
        }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.size()})
    }
}

/// Which manifest family an image is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OCI image manifest / OCI index.
    Oci,
    /// Docker schema 2 manifest / Docker manifest list.
    Docker,
}

/// An OS/architecture pair, as in an index entry and an image config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`, `arm64`.
    pub architecture: String,
}

impl Platform {
    /// `linux/<architecture>`.
    pub fn linux(architecture: &str) -> Platform {
        Platform {
            os: "linux".into(),
            architecture: architecture.into(),
        }
    }

    fn json(&self) -> Value {
        if self.architecture == "arm64" {
            json!({"os": self.os, "architecture": self.architecture, "variant": "v8"})
        } else {
            json!({"os": self.os, "architecture": self.architecture})
        }
    }
}

/// A built image: a manifest with its blobs, or an index/list with its child images.
#[derive(Clone, Debug)]
pub struct Image {
    manifest: Bytes,
    media_type: &'static str,
    digest: String,
    config: Option<Blob>,
    layers: Vec<Blob>,
    children: Vec<Image>,
    platform: Option<Platform>,
}

impl Image {
    /// An OCI linux/amd64 image with two small layers.
    pub fn single(seed: u64) -> Image {
        Image::builder(seed).build()
    }

    /// A Docker schema 2 linux/amd64 image with two small layers.
    pub fn docker(seed: u64) -> Image {
        Image::builder(seed).format(Format::Docker).build()
    }

    /// An OCI index over linux/amd64 and linux/arm64 images.
    pub fn multi_arch(seed: u64) -> Image {
        Image::builder(seed).build_index(&["amd64", "arm64"])
    }

    /// A Docker manifest list over linux/amd64 and linux/arm64 images.
    pub fn docker_list(seed: u64) -> Image {
        Image::builder(seed)
            .format(Format::Docker)
            .build_index(&["amd64", "arm64"])
    }

    /// An OCI linux/amd64 image with one incompressible layer carrying `bytes` of payload.
    pub fn big(seed: u64, bytes: usize) -> Image {
        Image::builder(seed).layers(&[bytes]).build()
    }

    /// A builder for anything in between (format, architecture, layer sizes).
    pub fn builder(seed: u64) -> ImageBuilder {
        ImageBuilder {
            seed,
            format: Format::Oci,
            architecture: "amd64".into(),
            layer_sizes: vec![4096, 16 * 1024],
        }
    }

    /// The manifest (or index/list) bytes exactly as pushed.
    pub fn manifest(&self) -> &Bytes {
        &self.manifest
    }

    /// The manifest's media type (the `Content-Type` it is pushed and served with).
    pub fn media_type(&self) -> &'static str {
        self.media_type
    }

    /// `sha256:<hex>` of the manifest bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Whether this is an OCI index or a Docker manifest list.
    pub fn is_index(&self) -> bool {
        !self.children.is_empty()
    }

    /// The config blob (None for an index/list).
    pub fn config(&self) -> Option<&Blob> {
        self.config.as_ref()
    }

    /// The layer blobs, base first (empty for an index/list).
    pub fn layers(&self) -> &[Blob] {
        &self.layers
    }

    /// This manifest's own blobs (config, then layers); empty for an index/list.
    pub fn own_blobs(&self) -> Vec<&Blob> {
        self.config.iter().chain(self.layers.iter()).collect()
    }

    /// Every blob reachable from here: own blobs, or every child's blobs for an index/list.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut all = self.own_blobs();
        for child in &self.children {
            all.extend(child.blobs());
        }
        all
    }

    /// The child images of an index/list, in index order.
    pub fn children(&self) -> &[Image] {
        &self.children
    }

    /// The child for `architecture` (e.g. `arm64`), if this is an index/list.
    pub fn child(&self, architecture: &str) -> Option<&Image> {
        self.children.iter().find(|c| {
            c.platform
                .as_ref()
                .is_some_and(|p| p.architecture == architecture)
        })
    }

    /// The platform of a single-platform image.
    pub fn platform(&self) -> Option<&Platform> {
        self.platform.as_ref()
    }

    /// Total bytes of manifests and blobs, i.e. what a full pull transfers.
    pub fn total_size(&self) -> u64 {
        self.manifest.len() as u64
            + self.own_blobs().iter().map(|b| b.size()).sum::<u64>()
            + self.children.iter().map(Image::total_size).sum::<u64>()
    }
}

/// Describes an image before building it; see [`Image::builder`].
#[derive(Clone, Debug)]
pub struct ImageBuilder {
    seed: u64,
    format: Format,
    architecture: String,
    layer_sizes: Vec<usize>,
}

impl ImageBuilder {
    /// OCI (default) or Docker media types.
    pub fn format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// The architecture of a single-platform image (default `amd64`).
    pub fn architecture(mut self, architecture: &str) -> Self {
        self.architecture = architecture.into();
        self
    }

    /// One layer per entry, each carrying that many bytes of seeded random payload.
    pub fn layers(mut self, payload_sizes: &[usize]) -> Self {
        self.layer_sizes = payload_sizes.to_vec();
        self
    }

    /// Builds a single-platform image manifest.
    pub fn build(&self) -> Image {
        let (config_type, layer_type, manifest_type) = match self.format {
            Format::Oci => (media::OCI_CONFIG, media::OCI_LAYER, media::OCI_MANIFEST),
            Format::Docker => (
                media::DOCKER_CONFIG,
                media::DOCKER_LAYER,
                media::DOCKER_MANIFEST,
            ),
        };
        let platform = Platform::linux(&self.architecture);
        let mut diff_ids = Vec::new();
        let mut history = Vec::new();
        let mut layers = Vec::new();
        for (index, &size) in self.layer_sizes.iter().enumerate() {
            let stream = mix(self.seed, &format!("{}/{}", self.architecture, index));
            let tar = layer_tar(self.seed, index, &self.architecture, size, stream);
            diff_ids.push(sha256_digest(&tar));
            history.push(json!({
                "created": "2023-11-14T22:13:20Z",
                "created_by": format!("pullthrough test layer {index} ({size} bytes)"),
            }));
            layers.push(Blob::new(layer_type, gzip(&tar)));
        }
        let mut config = json!({
            "architecture": self.architecture,
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": {
                "Cmd": ["/bin/sh"],
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
                "Labels": {"org.pullthrough.test.seed": self.seed.to_string()},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": history,
        });
        if self.architecture == "arm64" {
            config["variant"] = json!("v8");
        }
        let config = Blob::new(config_type, serde_json::to_vec(&config).unwrap());
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        Image {
            digest: sha256_digest(&manifest),
            manifest: Bytes::from(manifest),
            media_type: manifest_type,
            config: Some(config),
            layers,
            children: Vec::new(),
            platform: Some(platform),
        }
    }

    /// Builds an OCI index / Docker manifest list over one image per linux architecture.
    pub fn build_index(&self, architectures: &[&str]) -> Image {
        let children: Vec<Image> = architectures
            .iter()
            .map(|arch| self.clone().architecture(arch).build())
            .collect();
        let index_type = match self.format {
            Format::Oci => media::OCI_INDEX,
            Format::Docker => media::DOCKER_LIST,
        };
        let entries: Vec<Value> = children
            .iter()
            .map(|child| {
                json!({
                    "mediaType": child.media_type,
                    "digest": child.digest,
                    "size": child.manifest.len(),
                    "platform": child.platform.as_ref().unwrap().json(),
                })
            })
            .collect();
        let index = json!({"schemaVersion": 2, "mediaType": index_type, "manifests": entries});
        let index = serde_json::to_vec(&index).unwrap();
        Image {
            digest: sha256_digest(&index),
            manifest: Bytes::from(index),
            media_type: index_type,
            config: None,
            layers: Vec::new(),
            children,
            platform: None,
        }
    }
}

/// splitmix64: tiny, fast, and good enough that the bytes do not compress.
#[derive(Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for chunk in &mut chunks {
            chunk.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let last = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&last[..n]);
        }
    }
}

/// A seed derived from a base seed and a label (FNV-1a over the label, then mixed).
fn mix(seed: u64, label: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in label.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    SplitMix64::new(h).next_u64()
}

/// `left` bytes of seeded noise, readable in chunks so big layers are never copied twice.
///
/// The bytes do not depend on how the reader is chunked: partial words are carried over.
struct Noise {
    rng: SplitMix64,
    left: usize,
    carry: [u8; 8],
    carry_pos: usize,
}

impl Noise {
    fn new(seed: u64, len: usize) -> Noise {
        Noise {
            rng: SplitMix64::new(seed),
            left: len,
            carry: [0; 8],
            carry_pos: 8,
        }
    }
}

impl Read for Noise {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = self.left.min(buf.len());
        let mut i = 0;
        while i < want && self.carry_pos < 8 {
            buf[i] = self.carry[self.carry_pos];
            self.carry_pos += 1;
            i += 1;
        }
        let whole = (want - i) / 8 * 8;
        self.rng.fill(&mut buf[i..i + whole]);
        i += whole;
        if i < want {
            self.carry = self.rng.next_u64().to_le_bytes();
            self.carry_pos = 0;
            while i < want {
                buf[i] = self.carry[self.carry_pos];
                self.carry_pos += 1;
                i += 1;
            }
        }
        self.left -= want;
        Ok(want)
    }
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(TAR_MTIME);
    header.set_size(size);
    header
}

/// A layer tar: `pullthrough/`, a small text file and `size` bytes of noise.
fn layer_tar(seed: u64, index: usize, arch: &str, size: usize, stream: u64) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::with_capacity(size + 8192));
    let dir = format!("pullthrough/layer-{index}/");
    let text = format!("seed={seed} layer={index} arch={arch} payload={size}\n");
    let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, "pullthrough/", std::io::empty())
        .unwrap();
    let mut h = tar_header(tar::EntryType::Directory, 0o755, 0);
    tar.append_data(&mut h, &dir, std::io::empty()).unwrap();
    let mut h = tar_header(tar::EntryType::Regular, 0o644, text.len() as u64);
    tar.append_data(&mut h, format!("{dir}about.txt"), text.as_bytes())
        .unwrap();
    let mut h = tar_header(tar::EntryType::Regular, 0o644, size as u64);
    let noise = Noise::new(stream, size);
    tar.append_data(&mut h, format!("{dir}payload.bin"), noise)
        .unwrap();
    tar.into_inner().unwrap()
}

fn gzip(tar: &[u8]) -> Vec<u8> {
    let level = if tar.len() > STORE_ABOVE {
        flate2::Compression::none()
    } else {
        flate2::Compression::fast()
    };
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::with_capacity(tar.len() / 2 + 1024), level);
    gz.write_all(tar).unwrap();
    gz.finish().unwrap()
}

/// Pushes `image` to `registry_url` (e.g. `http://127.0.0.1:5000`) as `repo:tag`.
///
/// Plain HTTP per the distribution spec: blobs first (HEAD to skip existing, then a monolithic
/// POST+PUT upload), child manifests by digest, then the manifest by tag. Follows 401
/// challenges for Basic and Bearer auth with `credentials` if given.
pub async fn push(
    registry_url: &str,
    repo: &str,
    tag: &str,
    image: &Image,
    credentials: Option<&Credentials>,
) -> Result<(), String> {
    RegistryClient::new(registry_url, credentials.cloned())
        .push(repo, tag, image)
        .await
}

/// The answer to a GET/HEAD: status, headers and body.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// HTTP status code.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    /// Body bytes (empty for HEAD).
    pub body: Bytes,
}

impl Fetched {
    /// A response header as a string, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A small distribution-spec HTTP client that follows Basic and Bearer challenges.
pub struct RegistryClient {
    base: String,
    credentials: Option<Credentials>,
    http: reqwest::Client,
    /// `Authorization` values by scope (`""` for Basic); a std lock, never held across await.
    authorization: Mutex<HashMap<String, String>>,
    token_requests: std::sync::atomic::AtomicUsize,
}

impl RegistryClient {
    /// A client for the registry at `base_url`, authenticating with `credentials` if challenged.
    pub fn new(base_url: &str, credentials: Option<Credentials>) -> RegistryClient {
        RegistryClient {
            base: base_url.trim_end_matches('/').to_string(),
            credentials,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .expect("build HTTP client"),
            authorization: Mutex::new(HashMap::new()),
            token_requests: Default::default(),
        }
    }

    /// How many times it went to a token server.
    pub fn token_requests(&self) -> usize {
        self.token_requests
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// GETs `/v2/<repo>/manifests/<reference>` with a realistic `Accept`.
    pub async fn manifest(&self, repo: &str, reference: &str) -> Result<Fetched, String> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        self.fetch(reqwest::Method::GET, &url, repo, false).await
    }

    /// HEADs `/v2/<repo>/manifests/<reference>` with a realistic `Accept`.
    pub async fn head_manifest(&self, repo: &str, reference: &str) -> Result<Fetched, String> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        self.fetch(reqwest::Method::HEAD, &url, repo, false).await
    }

    /// GETs `/v2/<repo>/blobs/<digest>`.
    pub async fn blob(&self, repo: &str, digest: &str) -> Result<Fetched, String> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        self.fetch(reqwest::Method::GET, &url, repo, false).await
    }

    /// Pushes `image` as `repo:tag`; see [`push`].
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) -> Result<(), String> {
        for child in &image.children {
            self.push_manifest(repo, &child.digest, child).await?;
        }
        self.push_manifest(repo, tag, image).await
    }

    async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        image: &Image,
    ) -> Result<(), String> {
        for blob in image.own_blobs() {
            self.push_blob(repo, blob).await?;
        }
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let body = image.manifest.clone();
        let response = self
            .send(repo, true, || {
                self.http
                    .put(&url)
                    .header("content-type", image.media_type)
                    .body(body.clone())
            })
            .await?;
        expect_status(response, 201, &format!("PUT manifest {repo}:{reference}")).await?;
        Ok(())
    }

    /// Uploads one blob unless the registry already has it.
    pub async fn push_blob(&self, repo: &str, blob: &Blob) -> Result<(), String> {
        let url = format!("{}/v2/{repo}/blobs/{}", self.base, blob.digest);
        let head = self.send(repo, true, || self.http.head(&url)).await?;
        if head.status().as_u16() == 200 {
            return Ok(());
        }
        let start = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let started = self
            .send(repo, true, || {
                self.http.post(&start).header("content-length", "0")
            })
            .await?;
        let started = expect_status(started, 202, &format!("POST upload {repo}")).await?;
        let location = started
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or("upload answered 202 without Location")?;
        let mut put_url = if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            format!("{}{location}", self.base)
        };
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str("digest=");
        put_url.push_str(&blob.digest);
        let bytes = blob.bytes.clone();
        let put = self
            .send(repo, true, || {
                self.http
                    .put(&put_url)
                    .header("content-type", "application/octet-stream")
                    .body(bytes.clone())
            })
            .await?;
        expect_status(put, 201, &format!("PUT blob {} to {repo}", blob.digest)).await?;
        Ok(())
    }

    async fn fetch(
        &self,
        method: reqwest::Method,
        url: &str,
        repo: &str,
        push: bool,
    ) -> Result<Fetched, String> {
        let response = self
            .send(repo, push, || {
                self.http
                    .request(method.clone(), url)
                    .header("accept", media::ACCEPT_ALL)
            })
            .await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| format!("reading {url}: {e}"))?;
        Ok(Fetched {
            status,
            headers,
            body,
        })
    }

    /// Sends a request; on 401 answers the challenge once and sends it again.
    async fn send(
        &self,
        repo: &str,
        push: bool,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, String> {
        let scope = format!(
            "repository:{repo}:{}",
            if push { "pull,push" } else { "pull" }
        );
        let mut attempt = 0;
        loop {
            let known = {
                let auth = self.authorization.lock().unwrap();
                auth.get(&scope).or_else(|| auth.get("")).cloned()
            };
            let mut request = build();
            if let Some(value) = &known {
                request = request.header("authorization", value);
            }
            let response = request.send().await.map_err(|e| format!("{e:?}"))?;
            if response.status().as_u16() != 401 || attempt > 0 {
                return Ok(response);
            }
            attempt += 1;
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .ok_or("401 without WWW-Authenticate")?
                .to_string();
            let (key, value) = self.answer(&challenge, &scope).await?;
            self.authorization.lock().unwrap().insert(key, value);
        }
    }

    /// Turns a challenge into an `Authorization` value (and the scope it is good for).
    async fn answer(&self, challenge: &str, scope: &str) -> Result<(String, String), String> {
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        let params = parse_challenge_params(params);
        if scheme.eq_ignore_ascii_case("basic") {
            let credentials = self
                .credentials
                .as_ref()
                .ok_or("registry wants Basic auth but no credentials were given")?;
            return Ok((String::new(), credentials.basic_header()));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(format!("unsupported challenge: {challenge}"));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| format!("Bearer challenge without realm: {challenge}"))?;
        let mut url = format!("{realm}?scope={}", percent_encode(scope));
        if let Some(service) = params.get("service") {
            url.push_str(&format!("&service={}", percent_encode(service)));
        }
        let mut request = self.http.get(&url);
        if let Some(credentials) = &self.credentials {
            request = request.header("authorization", credentials.basic_header());
        }
        self.token_requests
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let response = request
            .send()
            .await
            .map_err(|e| format!("token request to {url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.bytes().await.map_err(|e| e.to_string())?;
        if status != 200 {
            return Err(format!(
                "token server answered {status}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let parsed: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let token = parsed["token"]
            .as_str()
            .or(parsed["access_token"].as_str())
            .ok_or("token response without token")?;
        Ok((scope.to_string(), format!("Bearer {token}")))
    }
}

async fn expect_status(
    response: reqwest::Response,
    want: u16,
    what: &str,
) -> Result<reqwest::Response, String> {
    let status = response.status().as_u16();
    if status == want {
        return Ok(response);
    }
    let body = response.text().await.unwrap_or_default();
    Err(format!("{what}: expected {want}, got {status}: {body}"))
}

/// Parses `realm="…",service="…",scope="repository:x:pull,push"` (commas inside quotes kept).
pub fn parse_challenge_params(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let Some((key, after)) = rest.split_once('=') else {
            break;
        };
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"').unwrap_or(quoted.len());
            (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        out.insert(key, value.to_string());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Base64 (standard, padded) — handy for `x5c` and Basic headers in tests.
pub fn base64_std(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
