//! Node configuration: points a node's containerd at the cache, and takes it back.
//!
//! containerd reads `<dir>/<registry>/hosts.toml` (containerd docs, `docs/hosts.md`)
//! on every pull, so writing these files needs no restart. Each file names the cache
//! as a `[host]` to try first and keeps the real registry as `server`, so a node whose
//! cache is down falls back to the registry instead of failing.
//!
//! - [`apply`] writes the files; an existing file pullthrough did not write is kept
//!   aside once as `hosts.toml.pullthrough-backup`.
//! - [`restore`] puts the backups back, or removes the files pullthrough wrote.
//! - [`check_containerd_config`] tells whether the CRI plugin (the kubelet's pulls)
//!   reads that directory at all: `ctr --hosts-dir` does not need it, Kubernetes does.
//!
//! Every write is a temporary file renamed over the old one, so containerd never
//! reads half a file, and running either command twice changes nothing.

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The first line of every file pullthrough writes; how it recognises its own files.
pub const MARKER: &str = "# Written by pullthrough containerd-config.";

/// The file name containerd reads in each registry's directory.
pub const HOSTS_TOML: &str = "hosts.toml";

/// Where a hosts.toml pullthrough replaced is kept, next to it.
pub const BACKUP: &str = "hosts.toml.pullthrough-backup";

/// Prefix of the temporary files renamed into place (left behind only by a crash).
const TEMP_PREFIX: &str = ".pullthrough-tmp-";

/// Why node configuration was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeConfigError {
    /// The cache endpoint is not a usable `http(s)://host[:port]` URL.
    #[error("invalid endpoint {given:?}: {reason}")]
    Endpoint {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A registry name cannot be a directory under certs.d.
    #[error("invalid registry name {given:?}: {reason}")]
    Registry {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file or directory could not be read, written, renamed or removed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which path.
        path: PathBuf,
        /// The operating system's answer.
        source: io::Error,
    },
    /// containerd's config file is not TOML.
    #[error("{} is not valid TOML: {source}", path.display())]
    ContainerdConfig {
        /// The config file.
        path: PathBuf,
        /// The parser's complaint, with line and column.
        source: Box<toml::de::Error>,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> NodeConfigError {
    let path = path.to_path_buf();
    move |source| NodeConfigError::Io {
        action,
        path,
        source,
    }
}

/// The cache's base URL as containerd's `[host."…"]` key wants it: `http://cache:5000`.
///
/// Scheme, host and port only: containerd appends `/v2` to the path itself, and a
/// trailing `/` would make it ask for `//v2/…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(String);

impl Endpoint {
    /// Validates `given` as an `http://` or `https://` URL with a host and no path.
    pub fn try_new(given: &str) -> Result<Endpoint, NodeConfigError> {
        let refuse = |reason: String| NodeConfigError::Endpoint {
            given: given.to_string(),
            reason,
        };
        let url = reqwest::Url::parse(given.trim()).map_err(|e| {
            refuse(format!(
                "not a URL ({e}); write it like http://pullthrough.example:5000"
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(refuse(format!(
                "the scheme must be http or https, not {:?}; write it like http://{given}",
                url.scheme()
            )));
        }
        let host = match url.host_str() {
            Some(host) if !host.is_empty() => host,
            _ => return Err(refuse("no host".into())),
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(refuse(
                "credentials do not belong in the endpoint (the cache pulls for its clients)"
                    .into(),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(refuse("no query or fragment, please".into()));
        }
        if url.path() != "/" {
            return Err(refuse(format!(
                "no path, please ({:?}): the cache serves /v2/ at its root",
                url.path()
            )));
        }
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        Ok(Endpoint(format!("{}://{host}{port}", url.scheme())))
    }

    /// The URL, e.g. `http://cache:5000`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Endpoint {
    type Err = NodeConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::try_new(s)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registry host as containerd names its directory: `docker.io`, `ghcr.io`,
/// `registry.example:5000`, or `_default` (the file for every other registry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry(String);

impl Registry {
    /// The directory containerd falls back to for registries without their own.
    pub const DEFAULT: &'static str = "_default";

    /// Validates `given` (surrounding spaces trimmed) as one directory name under certs.d.
    pub fn try_new(given: &str) -> Result<Registry, NodeConfigError> {
        let name = given.trim();
        let refuse = |reason| NodeConfigError::Registry {
            given: given.to_string(),
            reason,
        };
        if name.is_empty() {
            return Err(refuse("empty (a doubled or trailing comma?)"));
        }
        if name.contains('/') {
            return Err(refuse(
                "a registry is a host (with an optional :port), not a path: hosts.toml applies to every repository of the host",
            ));
        }
        if name == "." || name == ".." {
            return Err(refuse("not a host name"));
        }
        if name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\'))
        {
            return Err(refuse(
                "spaces, quotes, backslashes and control characters cannot be in a host name",
            ));
        }
        Ok(Registry(name.to_string()))
    }

    /// The name, e.g. `docker.io`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The real registry, kept as `server` so nodes fall back to it: Docker Hub's API
    /// lives at `registry-1.docker.io`; `None` for `_default`, where containerd uses
    /// each pulled registry's own host.
    pub fn server(&self) -> Option<String> {
        match self.0.as_str() {
            Registry::DEFAULT => None,
            "docker.io" => Some("https://registry-1.docker.io".to_string()),
            other => Some(format!("https://{other}")),
        }
    }
}

impl FromStr for Registry {
    type Err = NodeConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Registry::try_new(s)
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The hosts.toml pullthrough writes for `registry`: the cache first, the registry as fallback.
pub fn hosts_toml(registry: &Registry, endpoint: &Endpoint) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let pulls = match registry.as_str() {
        Registry::DEFAULT => "Pulls from registries without a directory of their own".to_string(),
        name => format!("Pulls from {name}"),
    };
    let mut text = format!(
        "{MARKER}\n\
         # {pulls} try the pullthrough cache first.\n\
         # `pullthrough containerd-config --restore` puts back the file that was here\n\
         # before (or removes this one).\n"
    );
    match registry.server() {
        Some(server) => {
            text +=
                "# The real registry stays the server: when the cache is down, pulls go there.\n";
            text += &format!("server = {}\n", quote(&server));
        }
        None => {
            text += "# No server: containerd falls back to each pulled registry's own host.\n";
        }
    }
    // A plain http:// host needs nothing more: containerd talks HTTP to it as written.
    text += &format!(
        "\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        quote(endpoint.as_str())
    );
    text
}

/// What [`apply`] did to one registry's hosts.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// There was no file; pullthrough's is written.
    Written,
    /// pullthrough's own earlier file differed (another endpoint, an older format); rewritten.
    Updated,
    /// A file pullthrough did not write was moved to the backup, then pullthrough's written.
    BackedUp {
        /// Where the previous file now is.
        backup: PathBuf,
    },
    /// The file already says exactly this; not touched.
    Unchanged,
}

/// What [`restore`] did to one registry's hosts.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The backup was put back in place.
    Restored,
    /// pullthrough's file was removed (and the registry's directory, if it became empty).
    Removed {
        /// Whether the directory was removed too.
        dir_removed: bool,
    },
    /// The file is not pullthrough's; left alone.
    NotOurs {
        /// A backup exists but was not put back, since it would replace this file.
        backup_kept: bool,
    },
    /// No file and no backup: nothing to do.
    Absent,
}

/// One registry's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<A> {
    /// The registry.
    pub registry: Registry,
    /// Its `hosts.toml`.
    pub file: PathBuf,
    /// What happened to it.
    pub action: A,
}

/// What [`apply`] did, one line per registry and a count, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The endpoint the files name.
    pub endpoint: Endpoint,
    /// One entry per registry, in the order given.
    pub outcomes: Vec<Outcome<Applied>>,
}

impl ApplyReport {
    /// Whether any file was written.
    pub fn changed(&self) -> bool {
        self.outcomes.iter().any(|o| o.action != Applied::Unchanged)
    }

    fn count(&self, pick: impl Fn(&Applied) -> bool) -> usize {
        self.outcomes.iter().filter(|o| pick(&o.action)).count()
    }
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for o in &self.outcomes {
            let file = o.file.display();
            match &o.action {
                Applied::Written => writeln!(f, "{}: written {file}", o.registry)?,
                Applied::Updated => writeln!(f, "{}: updated {file}", o.registry)?,
                Applied::BackedUp { backup } => writeln!(
                    f,
                    "{}: backed up the existing file to {}, written {file}",
                    o.registry,
                    backup.display()
                )?,
                Applied::Unchanged => writeln!(f, "{}: unchanged {file}", o.registry)?,
            }
        }
        if self.changed() {
            writeln!(
                f,
                "{} written, {} updated, {} backed up, {} unchanged; pulls go to {} first",
                self.count(|a| *a == Applied::Written),
                self.count(|a| *a == Applied::Updated),
                self.count(|a| matches!(a, Applied::BackedUp { .. })),
                self.count(|a| *a == Applied::Unchanged),
                self.endpoint
            )
        } else {
            writeln!(
                f,
                "nothing changed: every hosts.toml already points at {}",
                self.endpoint
            )
        }
    }
}

/// What [`restore`] did, one line per registry and a count, ready to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// One entry per registry, in the order given.
    pub outcomes: Vec<Outcome<Restored>>,
}

impl RestoreReport {
    /// Whether any file was restored or removed.
    pub fn changed(&self) -> bool {
        self.outcomes
            .iter()
            .any(|o| matches!(o.action, Restored::Restored | Restored::Removed { .. }))
    }
}

impl fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for o in &self.outcomes {
            let file = o.file.display();
            let r = &o.registry;
            match o.action {
                Restored::Restored => writeln!(f, "{r}: restored {file} from its backup")?,
                Restored::Removed { dir_removed: true } => {
                    writeln!(f, "{r}: removed {file} and its empty directory")?
                }
                Restored::Removed { dir_removed: false } => writeln!(f, "{r}: removed {file}")?,
                Restored::NotOurs { backup_kept: false } => {
                    writeln!(f, "{r}: unchanged {file} (not written by pullthrough)")?
                }
                Restored::NotOurs { backup_kept: true } => writeln!(
                    f,
                    "{r}: unchanged {file} (not written by pullthrough; {BACKUP} kept beside it)"
                )?,
                Restored::Absent => writeln!(f, "{r}: unchanged (no {HOSTS_TOML})")?,
            }
        }
        if !self.changed() {
            writeln!(f, "nothing changed: no file of pullthrough's was left")?;
        }
        Ok(())
    }
}

/// Whether `bytes` is a file pullthrough wrote.
fn is_ours(bytes: &[u8]) -> bool {
    bytes.starts_with(MARKER.as_bytes())
}

/// Registries in the order given, each once.
fn unique(registries: &[Registry]) -> Vec<&Registry> {
    let mut seen = std::collections::BTreeSet::new();
    registries.iter().filter(|r| seen.insert(*r)).collect()
}

/// Reads `path`, `None` if it does not exist.
fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, NodeConfigError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("reading", path)(e)),
    }
}

/// A temporary name in `dir` for the file about to become `name`.
fn temp_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{TEMP_PREFIX}{name}.{}", std::process::id()))
}

/// Flushes a directory's entries (a rename's durability), best effort: not every
/// filesystem lets a directory be opened for it.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so readers
/// see the old file or the new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), NodeConfigError> {
    let dir = path.parent().expect("a file in a directory");
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = temp_path(dir, name);
    let written = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    if let Err(e) = written.and_then(|()| fs::rename(&temp, path)) {
        let _ = fs::remove_file(&temp);
        return Err(io_error("writing", path)(e));
    }
    sync_dir(dir);
    Ok(())
}

/// Keeps the current `file` as `backup`, byte for byte (a hard link, so mode, owner
/// and times stay too; a copy where links are refused), replacing an older backup.
fn back_up(file: &Path, backup: &Path) -> Result<(), NodeConfigError> {
    let dir = file.parent().expect("a file in a directory");
    let temp = temp_path(dir, BACKUP);
    let _ = fs::remove_file(&temp);
    let kept = fs::hard_link(file, &temp)
        .or_else(|_| fs::copy(file, &temp).map(|_| ()))
        .and_then(|()| fs::rename(&temp, backup));
    if let Err(e) = kept {
        let _ = fs::remove_file(&temp);
        return Err(io_error("backing up", file)(e));
    }
    sync_dir(dir);
    Ok(())
}

/// Removes temporary files a crashed run of ours left in `dir` (never anything else).
fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let ours = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(TEMP_PREFIX));
        if ours {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Points containerd's pulls of each registry at `endpoint`: writes
/// `dir/<registry>/hosts.toml` for each, creating directories as needed.
///
/// A file already saying exactly this is not touched. A file pullthrough did not
/// write is first kept as `hosts.toml.pullthrough-backup` (a newer hand-written file
/// replaces an older backup, so `restore` brings back the latest); pullthrough's own
/// files are simply rewritten. Stops at the first registry that fails.
pub fn apply(
    dir: &Path,
    endpoint: &Endpoint,
    registries: &[Registry],
) -> Result<ApplyReport, NodeConfigError> {
    let mut outcomes = Vec::new();
    for registry in unique(registries) {
        let reg_dir = dir.join(registry.as_str());
        let file = reg_dir.join(HOSTS_TOML);
        let wanted = hosts_toml(registry, endpoint);
        fs::create_dir_all(&reg_dir).map_err(io_error("creating", &reg_dir))?;
        remove_stale_temps(&reg_dir);
        let action = match read_if_exists(&file)? {
            Some(current) if current == wanted.as_bytes() => Applied::Unchanged,
            Some(current) if is_ours(&current) => {
                write_atomically(&file, wanted.as_bytes())?;
                Applied::Updated
            }
            Some(_) => {
                let backup = reg_dir.join(BACKUP);
                back_up(&file, &backup)?;
                write_atomically(&file, wanted.as_bytes())?;
                Applied::BackedUp { backup }
            }
            None => {
                write_atomically(&file, wanted.as_bytes())?;
                Applied::Written
            }
        };
        outcomes.push(Outcome {
            registry: registry.clone(),
            file,
            action,
        });
    }
    Ok(ApplyReport {
        endpoint: endpoint.clone(),
        outcomes,
    })
}

/// Undoes [`apply`] for each registry: puts the backup back if there is one, else
/// removes pullthrough's file (and the registry's directory if that leaves it empty).
/// A file pullthrough did not write is left alone, backup or not. `dir` itself stays.
pub fn restore(dir: &Path, registries: &[Registry]) -> Result<RestoreReport, NodeConfigError> {
    let mut outcomes = Vec::new();
    for registry in unique(registries) {
        let reg_dir = dir.join(registry.as_str());
        let file = reg_dir.join(HOSTS_TOML);
        let backup = reg_dir.join(BACKUP);
        remove_stale_temps(&reg_dir);
        let current = read_if_exists(&file)?;
        let has_backup = fs::symlink_metadata(&backup).is_ok();
        let action = match current {
            Some(bytes) if !is_ours(&bytes) => Restored::NotOurs {
                backup_kept: has_backup,
            },
            _ if has_backup => {
                fs::rename(&backup, &file).map_err(io_error("restoring", &file))?;
                sync_dir(&reg_dir);
                Restored::Restored
            }
            Some(_) => {
                fs::remove_file(&file).map_err(io_error("removing", &file))?;
                sync_dir(&reg_dir);
                let dir_removed = match fs::remove_dir(&reg_dir) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => false,
                    Err(e) => return Err(io_error("removing", &reg_dir)(e)),
                };
                Restored::Removed { dir_removed }
            }
            None => Restored::Absent,
        };
        outcomes.push(Outcome {
            registry: registry.clone(),
            file,
            action,
        });
    }
    Ok(RestoreReport { outcomes })
}

/// containerd's config file format, which decides where `config_path` lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigVersion {
    /// No `version` (or `version = 1`): containerd 1.x's first format, short plugin names.
    V1,
    /// `version = 2`: containerd 1.x (containerd 2.x migrates it on load).
    V2,
    /// `version = 3`: containerd 2.x, where CRI image settings have their own plugin.
    V3,
}

impl ConfigVersion {
    /// The table that holds `config_path`, as TOML keys.
    pub fn registry_table(self) -> &'static [&'static str] {
        match self {
            ConfigVersion::V1 => &["plugins", "cri", "registry"],
            ConfigVersion::V2 => &["plugins", "io.containerd.grpc.v1.cri", "registry"],
            ConfigVersion::V3 => &["plugins", "io.containerd.cri.v1.images", "registry"],
        }
    }

    /// The stanza that makes the CRI plugin read `dir`, ready to paste into the config.
    pub fn stanza(self, dir: &Path) -> String {
        let header = match self {
            ConfigVersion::V1 => "[plugins.cri.registry]",
            ConfigVersion::V2 => "[plugins.\"io.containerd.grpc.v1.cri\".registry]",
            ConfigVersion::V3 => "[plugins.\"io.containerd.cri.v1.images\".registry]",
        };
        let path = toml::Value::String(dir.display().to_string()).to_string();
        format!("{header}\n  config_path = {path}\n")
    }
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConfigVersion::V1 => "containerd 1.x, config version 1",
            ConfigVersion::V2 => "containerd 1.x, config version 2",
            ConfigVersion::V3 => "containerd 2.x, config version 3",
        })
    }
}

/// What containerd's config says about reading the certs.d directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// The config file does not exist.
    Missing,
    /// `config_path` names the directory (alone or in a `:`-separated list).
    Reads {
        /// The config's format.
        version: ConfigVersion,
    },
    /// No `config_path`: CRI pulls ignore every hosts.toml.
    NoConfigPath {
        /// The config's format.
        version: ConfigVersion,
    },
    /// `config_path` names other directories.
    Elsewhere {
        /// The config's format.
        version: ConfigVersion,
        /// What it says.
        config_path: String,
    },
}

/// The result of [`check_containerd_config`], with the advice to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigCheck {
    /// The config file checked.
    pub path: PathBuf,
    /// The certs.d directory it should name.
    pub dir: PathBuf,
    /// What it says.
    pub finding: Finding,
    /// Its `imports`, which may set `config_path` where this check does not look.
    pub imports: Vec<String>,
    /// It has a non-empty `registry.mirrors` table, which containerd refuses next to `config_path`.
    pub legacy_mirrors: bool,
}

impl ConfigCheck {
    /// Whether the CRI plugin reads the directory.
    pub fn is_ok(&self) -> bool {
        matches!(self.finding, Finding::Reads { .. })
    }

    /// What to tell the operator when the CRI plugin will not read the directory:
    /// the problem, the exact stanza to add, and what else to know; `None` when fine.
    pub fn warning(&self) -> Option<String> {
        let path = self.path.display();
        let dir = self.dir.display();
        let mut text = match &self.finding {
            Finding::Reads { .. } => return None,
            Finding::Missing => format!(
                "{path} does not exist, so Kubernetes pulls will not read {dir}. Create it with, for containerd 1.x:\n\n\
                 version = 2\n{}\nor for containerd 2.x:\n\nversion = 3\n{}",
                ConfigVersion::V2.stanza(&self.dir),
                ConfigVersion::V3.stanza(&self.dir)
            ),
            Finding::NoConfigPath { version } => format!(
                "{path} ({version}) sets no registry config_path, so Kubernetes pulls will not read {dir}. Add:\n\n{}",
                version.stanza(&self.dir)
            ),
            Finding::Elsewhere {
                version,
                config_path,
            } => format!(
                "{path} ({version}) has registry config_path = {config_path:?}, so Kubernetes pulls will not read {dir}. Change it to:\n\n{}",
                version.stanza(&self.dir)
            ),
        };
        if self.legacy_mirrors {
            text += "\nand remove the registry.mirrors table: containerd refuses to load its CRI plugin \
                     when both mirrors and config_path are set.\n";
        }
        if !self.imports.is_empty() {
            text += &format!(
                "\nIt imports {:?}, which this check does not read; if one of them sets config_path, ignore this.\n",
                self.imports
            );
        }
        text += "\nThen restart containerd. (ctr --hosts-dir reads the files without any of this.)";
        Some(text)
    }
}

impl fmt::Display for ConfigCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.finding, self.warning()) {
            (Finding::Reads { version }, _) => write!(
                f,
                "{} ({version}): config_path includes {}",
                self.path.display(),
                self.dir.display()
            ),
            (_, Some(warning)) => f.write_str(&warning),
            (_, None) => Ok(()),
        }
    }
}

/// Looks `keys` up through nested tables.
fn lookup<'a>(table: &'a toml::Table, keys: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = keys.split_last()?;
    let mut table = table;
    for key in parents {
        table = table.get(*key)?.as_table()?;
    }
    table.get(*last)
}

/// Whether a `config_path` value (one directory or a `:`-separated list) names `dir`.
fn names_dir(config_path: &str, dir: &Path) -> bool {
    config_path
        .split(':')
        .filter(|p| !p.is_empty())
        .any(|p| Path::new(p).components().eq(dir.components()))
}

/// Reads containerd's config at `path` and tells whether its CRI plugin reads
/// hosts.toml files from `dir` (`config_path`, whose table depends on the config's
/// `version`). A missing file is a finding, not an error; one that is not TOML is.
pub fn check_containerd_config(path: &Path, dir: &Path) -> Result<ConfigCheck, NodeConfigError> {
    let mut check = ConfigCheck {
        path: path.to_path_buf(),
        dir: dir.to_path_buf(),
        finding: Finding::Missing,
        imports: Vec::new(),
        legacy_mirrors: false,
    };
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(check);
    };
    let text = String::from_utf8_lossy(&bytes);
    let config: toml::Table = text
        .parse()
        .map_err(|source| NodeConfigError::ContainerdConfig {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    let version = match config.get("version").and_then(toml::Value::as_integer) {
        Some(3) => ConfigVersion::V3,
        Some(2) => ConfigVersion::V2,
        _ => ConfigVersion::V1,
    };
    let registry = version.registry_table();
    let config_path = lookup(&config, &[registry, &["config_path"]].concat())
        .and_then(toml::Value::as_str)
        .filter(|p| !p.is_empty());
    check.legacy_mirrors = lookup(&config, &[registry, &["mirrors"]].concat())
        .and_then(toml::Value::as_table)
        .is_some_and(|m| !m.is_empty());
    check.imports = config
        .get("imports")
        .and_then(toml::Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    check.finding = match config_path {
        Some(p) if names_dir(p, dir) => Finding::Reads { version },
        Some(p) => Finding::Elsewhere {
            version,
            config_path: p.to_string(),
        },
        None => Finding::NoConfigPath { version },
    };
    Ok(check)
}

#[cfg(test)]
mod tests;
