//! Configuration: the embedded default, a TOML file, `PULLTHROUGH_…`
//! environment variables and flags, merged in that order, then validated
//! completely before anything binds.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The documented default configuration, compiled into the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../config/pullthrough.toml");

/// Why a configuration was refused. Each names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The TOML or environment could not be read or has a wrong type or unknown key.
    /// (Not a `source`: figment's message already is the whole story.)
    #[error("configuration: {0}")]
    Parse(Box<figment::Error>),
    /// A value parsed but makes no sense.
    #[error("configuration: {key}: {problem}")]
    Invalid {
        /// The offending key, e.g. `upstreams[2].url`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(e: Box<figment::Error>) -> ConfigError {
        ConfigError::Parse(e)
    }
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The whole configuration of one pullthrough process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name (or alias) of the upstream used when a request names none.
    pub default_upstream: String,
    /// The HTTP listener.
    pub server: ServerConfig,
    /// Where the store lives.
    pub storage: StorageConfig,
    /// Cache policy.
    pub cache: CacheConfig,
    /// The registries pulled through.
    pub upstreams: Vec<UpstreamConfig>,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The admin listener (`POST /import`), loopback by default; `""` turns it off.
    #[serde(default, with = "optional_addr")]
    pub admin_listen: Option<SocketAddr>,
}

/// `[storage]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// The data directory.
    pub path: PathBuf,
    /// The most the store may hold (`50GiB`); unset: no cap.
    #[serde(default)]
    pub max_size: Option<bytesize::ByteSize>,
    /// Eviction starts when the store passes this fraction of `max_size`…
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
    /// …and removes least recently used blobs until it is under this fraction.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,
    /// fsync data before the rename into `blobs/` and the directory after it.
    /// Turn off only where the disk does not outlive the node (an emptyDir).
    #[serde(default = "yes")]
    pub fsync: bool,
}

fn default_high_watermark() -> f64 {
    0.9
}

fn default_low_watermark() -> f64 {
    0.8
}

impl StorageConfig {
    /// `(max, high, low)` in bytes, if a cap is set.
    pub fn watermarks(&self) -> Option<(u64, u64, u64)> {
        let max = self.max_size?.as_u64();
        let at = |fraction: f64| (max as f64 * fraction) as u64;
        Some((max, at(self.high_watermark), at(self.low_watermark)))
    }
}

/// `[cache]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long a tag is served without asking upstream.
    #[serde(with = "human_duration")]
    pub tag_ttl: Duration,
    /// Whether serving an image manifest starts downloading its config and layers.
    #[serde(default = "yes")]
    pub prefetch: bool,
    /// Platforms (`os/arch[/variant]`) whose manifests are prefetched when an index is served.
    #[serde(default = "default_platforms")]
    pub prefetch_platforms: Vec<String>,
    /// Prefetch downloads running at once, per upstream.
    #[serde(default = "default_prefetch_concurrency")]
    pub prefetch_concurrency: usize,
    /// Whether a download goes on when every client reading it has gone, so the next pull is a hit.
    #[serde(default = "yes")]
    pub finish_abandoned: bool,
    /// How old a tag may be and still be served when upstream fails; unset: however old.
    #[serde(default, with = "human_duration_opt")]
    pub max_stale: Option<Duration>,
    /// Whether a tag upstream now says is unknown (404) is still served from the cache.
    #[serde(default)]
    pub serve_stale_on_not_found: bool,
}

fn yes() -> bool {
    true
}

fn default_platforms() -> Vec<String> {
    vec!["linux/amd64".into(), "linux/arm64".into()]
}

fn default_prefetch_concurrency() -> usize {
    4
}

/// One `[[upstreams]]` entry.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// What `?ns=` and path prefixes match, e.g. `docker.io`.
    pub name: String,
    /// Base URL of the registry, e.g. `https://registry-1.docker.io`.
    pub url: String,
    /// Other names for the same registry.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Docker Hub's rule: one-component names live under `library/`.
    #[serde(default)]
    pub library_prefix: bool,
    /// User name for Basic auth or for the token endpoint.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (e.g. a mounted Secret).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Requests to this upstream in progress at once (a download holds one until its body ends).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// How long to wait for a connection (TCP and TLS).
    #[serde(default = "default_connect_timeout", with = "human_duration")]
    pub connect_timeout: Duration,
    /// How long an answer may stall (headers, or the next body bytes) before it is failed.
    #[serde(default = "default_idle_timeout", with = "human_duration")]
    pub idle_timeout: Duration,
    /// Retries of a failed request (transport error, 5xx, 429), with jittered backoff.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// First backoff ceiling; doubles per retry.
    #[serde(default = "default_retry_backoff", with = "human_duration")]
    pub retry_backoff: Duration,
    /// Failures in a row that open the circuit (no upstream traffic, stale served at once).
    #[serde(default = "default_failures_to_open")]
    pub failures_to_open: u32,
    /// How long the circuit stays open before one probe request.
    #[serde(default = "default_open_for", with = "human_duration")]
    pub open_for: Duration,
    /// Below this many remaining pulls (`ratelimit-remaining`), tags are not revalidated.
    #[serde(default = "default_ratelimit_reserve")]
    pub ratelimit_reserve: u64,
    /// Never contact this upstream; serve what the store holds.
    #[serde(default)]
    pub offline: bool,
}

fn default_retries() -> u32 {
    2
}

fn default_retry_backoff() -> Duration {
    Duration::from_millis(200)
}

fn default_failures_to_open() -> u32 {
    5
}

fn default_open_for() -> Duration {
    Duration::from_secs(30)
}

fn default_ratelimit_reserve() -> u64 {
    10
}

fn default_max_connections() -> usize {
    64
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

impl fmt::Debug for UpstreamConfig {
    // Written by hand so that nothing about credentials but their presence is ever printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("aliases", &self.aliases)
            .field("library_prefix", &self.library_prefix)
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("idle_timeout", &self.idle_timeout)
            .field("retries", &self.retries)
            .field("retry_backoff", &self.retry_backoff)
            .field("failures_to_open", &self.failures_to_open)
            .field("open_for", &self.open_for)
            .field("ratelimit_reserve", &self.ratelimit_reserve)
            .field("offline", &self.offline)
            .finish()
    }
}

/// A password read from a file or the environment; never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for building an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Credentials for one upstream, resolved at start-up.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: Secret,
}

/// Values given on the command line; they override everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`
    pub listen: Option<SocketAddr>,
    /// `--data`
    pub data: Option<PathBuf>,
    /// `--offline`: no upstream is ever contacted.
    pub offline: bool,
    /// `--admin-listen`
    pub admin_listen: Option<SocketAddr>,
}

impl Config {
    /// Merges default < `file` < environment < `overrides`, then validates.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_CONFIG));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(invalid(
                    "--config",
                    format!("{} does not exist or is not a file", file.display()),
                ));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed("PULLTHROUGH_").split("__"));
        if let Some(listen) = overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if let Some(admin) = overrides.admin_listen {
            figment = figment.merge(Serialized::default(
                "server.admin_listen",
                admin.to_string(),
            ));
        }
        if let Some(data) = &overrides.data {
            figment = figment.merge(Serialized::default("storage.path", data));
        }
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if overrides.offline {
            config.upstreams.iter_mut().for_each(|u| u.offline = true);
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses a complete TOML document (no defaults merged) and validates it.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstreams.is_empty() {
            return Err(invalid("upstreams", "at least one upstream is required"));
        }
        let mut seen: Vec<String> = Vec::new();
        for (i, up) in self.upstreams.iter().enumerate() {
            let key = |k: &str| format!("upstreams[{i}].{k}");
            if up.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            for n in std::iter::once(&up.name).chain(&up.aliases) {
                let n = n.to_ascii_lowercase();
                if seen.contains(&n) {
                    return Err(invalid(
                        key("name"),
                        format!("{n:?} names more than one upstream"),
                    ));
                }
                seen.push(n);
            }
            let url = reqwest::Url::parse(&up.url)
                .map_err(|e| invalid(key("url"), format!("{:?} is not a URL: {e}", up.url)))?;
            if !url.username().is_empty() || url.password().is_some() {
                return Err(invalid(
                    key("url"),
                    "must not carry credentials: use username and password_file or password_env",
                ));
            }
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(invalid(
                    key("url"),
                    format!(
                        "{:?} must be an http:// or https:// URL with a host",
                        up.url
                    ),
                ));
            }
            if up.password_file.is_some() && up.password_env.is_some() {
                return Err(invalid(
                    key("password_file"),
                    "set password_file or password_env, not both",
                ));
            }
            if (up.password_file.is_some() || up.password_env.is_some()) && up.username.is_none() {
                return Err(invalid(key("username"), "a password needs a username"));
            }
            up.credentials().map_err(|p| invalid(key("password"), p))?;
            if up.failures_to_open == 0 {
                return Err(invalid(key("failures_to_open"), "must be at least 1"));
            }
            if up.max_connections == 0 {
                return Err(invalid(key("max_connections"), "must be at least 1"));
            }
            for (name, d) in [
                ("connect_timeout", up.connect_timeout),
                ("idle_timeout", up.idle_timeout),
            ] {
                if d.is_zero() {
                    return Err(invalid(key(name), "must be more than zero"));
                }
            }
        }
        if self.find_upstream(&self.default_upstream).is_none() {
            return Err(invalid(
                "default_upstream",
                format!("{:?} names no configured upstream", self.default_upstream),
            ));
        }
        for (i, p) in self.cache.prefetch_platforms.iter().enumerate() {
            let parts: Vec<&str> = p.split('/').collect();
            if !(2..=3).contains(&parts.len()) || parts.iter().any(|x| x.is_empty()) {
                return Err(invalid(
                    format!("cache.prefetch_platforms[{i}]"),
                    format!("{p:?} is not os/arch or os/arch/variant"),
                ));
            }
        }
        if self.cache.prefetch_concurrency == 0 {
            return Err(invalid("cache.prefetch_concurrency", "must be at least 1"));
        }
        let (high, low) = (self.storage.high_watermark, self.storage.low_watermark);
        if !(0.0 < low && low < high && high <= 1.0) {
            return Err(invalid(
                "storage.low_watermark",
                format!("need 0 < low_watermark ({low}) < high_watermark ({high}) <= 1"),
            ));
        }
        if self.cache.tag_ttl > Duration::from_secs(365 * 24 * 3600) {
            return Err(invalid("cache.tag_ttl", "must be at most a year"));
        }
        Ok(())
    }

    /// The upstream called `name`, by its name, an alias or its URL's host.
    pub fn find_upstream(&self, name: &str) -> Option<&UpstreamConfig> {
        self.upstreams.iter().find(|u| u.answers_to(name))
    }
}

impl UpstreamConfig {
    /// Whether `name` (from `?ns=` or a path prefix) means this upstream.
    pub fn answers_to(&self, name: &str) -> bool {
        let name = name.to_ascii_lowercase();
        name == self.name.to_ascii_lowercase()
            || self.aliases.iter().any(|a| a.to_ascii_lowercase() == name)
    }

    /// Reads the configured credentials, if any.
    pub fn credentials(&self) -> Result<Option<Credentials>, String> {
        let Some(username) = self.username.clone() else {
            return Ok(None);
        };
        let password = if let Some(path) = &self.password_file {
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read password_file {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string()
        } else if let Some(var) = &self.password_env {
            std::env::var(var).map_err(|_| format!("environment variable {var} is not set"))?
        } else {
            return Err("username is set but neither password_file nor password_env".into());
        };
        Ok(Some(Credentials {
            username,
            password: Secret::new(password),
        }))
    }
}

/// Durations written as people write them: `30s`, `5m`, `1h 30m`.
mod human_duration {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration like \"5m\": {e}"))
        })
    }
}

/// An optional human duration; absent means `None`.
mod human_duration_opt {
    use super::*;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => human_duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        human_duration::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests;

/// An address that may be turned off with an empty string.
mod optional_addr {
    use serde::{Deserialize, Deserializer};
    use std::net::SocketAddr;

    pub fn serialize<S: serde::Serializer>(
        a: &Option<SocketAddr>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&a.map(|a| a.to_string()).unwrap_or_default())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        text.trim()
            .parse()
            .map(Some)
            .map_err(serde::de::Error::custom)
    }
}
