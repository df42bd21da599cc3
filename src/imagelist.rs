//! Image lists as operators have them: plain reference lists and Kubernetes YAML.
//!
//! This is the one parser behind `pullthrough seed`, `export` and `prepull`,
//! so all three agree on what a list means. References are normalised the way
//! Docker does it (`nginx` is `docker.io/library/nginx:latest`), which lets a
//! list that spells one image two ways name it once.

use crate::reference::{Digest, Reference, ReferenceError, RepoName, Tag};
use serde::Deserialize as _;
use serde_yaml_ng::Value;
use std::collections::HashSet;
use std::fmt;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Docker Hub's canonical registry name, what every alias normalises to.
const DOCKER_HUB: &str = "docker.io";

/// Other names Docker Hub answers to; an image named through one is the same image.
const DOCKER_HUB_ALIASES: [&str; 3] = [
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// Why an image list or a reference in it was refused.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// A reference given on its own is malformed.
    #[error("invalid image reference {text:?}: {problem}")]
    Reference {
        /// The reference as given.
        text: String,
        /// What is wrong with it.
        problem: Malformed,
    },
    /// A line of a plain list holds a malformed reference.
    #[error("line {line}: invalid image reference {text:?}: {problem}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The reference as written, comments and surrounding whitespace removed.
        text: String,
        /// What is wrong with it.
        problem: Malformed,
    },
    /// A container in a Kubernetes document names a malformed image.
    #[error("{site}: invalid image reference {text:?}: {problem}")]
    Manifest {
        /// Which container, in which object of which document.
        site: Box<Site>,
        /// The `image` value as written.
        text: String,
        /// What is wrong with it.
        problem: Malformed,
    },
    /// A YAML document is a bare value or a sequence, which no Kubernetes file
    /// holds; most likely a plain list that was taken for YAML.
    #[error("document {document} is not a Kubernetes object")]
    NotAnObject {
        /// 1-based number of the YAML document in the file.
        document: usize,
    },
    /// The list looked like Kubernetes YAML but is not valid YAML.
    #[error("YAML syntax error in document {document}{}: {source}", at(.location))]
    Yaml {
        /// 1-based number of the YAML document the parser was in.
        document: usize,
        /// 1-based line and column in the whole file, when the parser knows them.
        location: Option<(usize, usize)>,
        /// The parser's error.
        source: serde_yaml_ng::Error,
    },
    /// The list could not be read.
    #[error("reading image list {}: {source}", shown(.path))]
    Io {
        /// The path given; `-` is standard input.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
}

/// Where a container sits in a Kubernetes file, to point an operator at a bad image.
///
/// Boxed in [`ListError::Manifest`] to keep the error, and every `Result`
/// carrying it, small.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// 1-based number of the YAML document in the file.
    pub document: usize,
    /// The `kind` of the object holding the container (a `List` item's own kind).
    pub kind: String,
    /// The object's `metadata.name`, or `?` when it has none.
    pub name: String,
    /// The container's `name`, or `?` when it has none.
    pub container: String,
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "document {} ({} {}, container {})",
            self.document, self.kind, self.name, self.container
        )
    }
}

/// The location serde_yaml_ng leaves out of its message: it prints every
/// location but line 1 column 1, so only that one is added here.
fn at(location: &Option<(usize, usize)>) -> &'static str {
    match location {
        Some((1, 1)) => " at line 1 column 1",
        _ => "",
    }
}

/// Names the list's source the way the operator gave it.
fn shown(path: &Path) -> String {
    if path == Path::new("-") {
        "from standard input".to_string()
    } else {
        path.display().to_string()
    }
}

/// What is wrong with one image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// Nothing was given.
    #[error("empty reference")]
    Empty,
    /// The first path component looks like a registry host but is not a valid one.
    #[error("invalid registry host {0:?}")]
    Registry(String),
    /// The repository, tag or digest breaks the distribution-spec grammar.
    #[error(transparent)]
    Part(#[from] ReferenceError),
    /// A Kubernetes `image` field holds something other than a string.
    #[error("image is not a string")]
    NotText,
}

/// A fully normalised image reference: where it lives, which repository, which version.
///
/// A parsed reference always has a tag or a digest (or both); `tag` defaults to
/// `latest` only when neither was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    /// Registry host, with its port if any; Docker Hub is always `docker.io`.
    pub registry: String,
    /// Repository within the registry; Docker Hub official images carry `library/`.
    pub repository: RepoName,
    /// The tag, when one was written or implied.
    pub tag: Option<Tag>,
    /// The digest, when one was written; it pins the image whatever the tag says.
    pub digest: Option<Digest>,
}

impl ImageRef {
    /// Parses a reference as `docker pull` would read it.
    ///
    /// The first path component is a registry only if it contains `.` or `:`
    /// or is `localhost`, so `team/app` is on Docker Hub but `registry:5000/app`
    /// and `localhost/app` are not.
    pub fn parse(text: &str) -> Result<ImageRef, ListError> {
        parse_ref(text).map_err(|problem| ListError::Reference {
            text: text.to_string(),
            problem,
        })
    }

    /// What to ask the registry for: the digest when present, since it cannot
    /// move, else the tag (`latest` if a hand-built value has neither).
    pub fn reference(&self) -> Reference {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => Reference::Digest(digest.clone()),
            (None, Some(tag)) => Reference::Tag(tag.clone()),
            (None, None) => Reference::Tag(latest()),
        }
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

fn latest() -> Tag {
    "latest".parse().expect("`latest` is a valid tag")
}

fn parse_ref(text: &str) -> Result<ImageRef, Malformed> {
    if text.is_empty() {
        return Err(Malformed::Empty);
    }
    let (name_tag, digest) = match text.split_once('@') {
        Some((name_tag, digest)) => (name_tag, Some(digest.parse::<Digest>()?)),
        None => (text, None),
    };
    // A colon after the last slash starts the tag; one before it is a registry port.
    let last_slash = name_tag.rfind('/');
    let (name, tag) = match name_tag.rfind(':') {
        Some(colon) if last_slash.is_none_or(|slash| colon > slash) => (
            &name_tag[..colon],
            Some(name_tag[colon + 1..].parse::<Tag>()?),
        ),
        _ => (name_tag, None),
    };
    let (registry, path) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            if !is_valid_host(first) {
                return Err(Malformed::Registry(first.to_string()));
            }
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    };
    let mut repository = path.parse::<RepoName>()?;
    let registry = if DOCKER_HUB_ALIASES.contains(&registry) {
        DOCKER_HUB
    } else {
        registry
    };
    if registry == DOCKER_HUB {
        repository = repository.with_library_prefix();
    }
    let tag = match (&tag, &digest) {
        (None, None) => Some(latest()),
        _ => tag,
    };
    Ok(ImageRef {
        registry: registry.to_string(),
        repository,
        tag,
        digest,
    })
}

/// Docker's host grammar: DNS labels or a bracketed IPv6 address, then an optional port.
fn is_valid_host(host: &str) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.is_empty() || !v6.bytes().all(|c| c.is_ascii_hexdigit() || c == b':') {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("", Some(port)),
                None => return false,
            },
        }
    } else {
        match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        }
    };
    let label_ok = |label: &str| {
        let b = label.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|c| c.is_ascii_digit()));
    // An empty name here means the bracketed IPv6 case, already checked.
    let name_ok = (name.is_empty() && host.starts_with('[')) || name.split('.').all(label_ok);
    name_ok && port_ok
}

/// Parses an image list, plain or Kubernetes YAML, into its images in order of
/// first appearance with duplicates (after normalisation) removed.
///
/// The text is YAML when its first non-comment line is a document marker
/// (`---`) or any non-comment line starts with `apiVersion:` or `kind:`;
/// otherwise it is one reference per line, with `#` comments and blank lines
/// ignored.
pub fn parse_list(text: &str) -> Result<Vec<ImageRef>, ListError> {
    // Editors on Windows save a byte-order mark that is neither YAML nor a reference.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let images = if looks_like_kubernetes(text) {
        parse_yaml(text)?
    } else {
        parse_plain(text)?
    };
    let mut seen = HashSet::new();
    Ok(images
        .into_iter()
        .filter(|image| seen.insert(image.clone()))
        .collect())
}

/// Reads and parses an image list from `path`, or from standard input when `path` is `-`.
pub fn read_list(path: &Path) -> Result<Vec<ImageRef>, ListError> {
    let io_error = |source| ListError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(io_error)?;
        text
    } else {
        std::fs::read_to_string(path).map_err(io_error)?
    };
    parse_list(&text)
}

fn looks_like_kubernetes(text: &str) -> bool {
    // `kind:` must be followed by a space or the line's end: `kind:v1` is the
    // image `kind` at tag `v1`, a fine line in a plain list.
    let key = |line: &str, key: &str| {
        line.strip_prefix(key)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
    };
    let mut lines = text
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.trim_start().starts_with('#'))
        .peekable();
    // Only a leading `---` counts: a marker further down in what is otherwise
    // a plain list is a mistake better reported on its line.
    lines.peek().is_some_and(|first| key(first, "---"))
        || lines.any(|line| key(line, "apiVersion:") || key(line, "kind:"))
}

fn parse_plain(text: &str) -> Result<Vec<ImageRef>, ListError> {
    let mut images = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = strip_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        let image = parse_ref(line).map_err(|problem| ListError::Line {
            line: index + 1,
            text: line.to_string(),
            problem,
        })?;
        images.push(image);
    }
    Ok(images)
}

/// Cuts a `#` comment that starts the line or follows whitespace; a `#` glued
/// to a reference is left in so the reference is reported as malformed.
fn strip_comment(line: &str) -> &str {
    let mut previous = None;
    for (i, c) in line.char_indices() {
        if c == '#' && previous.is_none_or(char::is_whitespace) {
            return &line[..i];
        }
        previous = Some(c);
    }
    line
}

fn parse_yaml(text: &str) -> Result<Vec<ImageRef>, ListError> {
    let mut images = Vec::new();
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let number = index + 1;
        let yaml_error = |source: serde_yaml_ng::Error| ListError::Yaml {
            document: number,
            location: source.location().map(|l| (l.line(), l.column())),
            source,
        };
        let mut value = Value::deserialize(document).map_err(yaml_error)?;
        // Hand-written manifests share container blocks through `<<: *anchor`.
        value.apply_merge().map_err(yaml_error)?;
        // Refused rather than skipped so a misread list fails instead of
        // quietly pulling nothing; null is an empty document and is fine.
        if !(value.is_mapping() || value.is_null()) {
            return Err(ListError::NotAnObject { document: number });
        }
        collect_object(&value, None, number, &mut images)?;
    }
    Ok(images)
}

/// Adds the images of one Kubernetes object; `list_item_kind` is what a
/// `FooList`'s items are when they leave out their own `kind`, as API list
/// responses do.
fn collect_object(
    object: &Value,
    list_item_kind: Option<&str>,
    document: usize,
    images: &mut Vec<ImageRef>,
) -> Result<(), ListError> {
    // Empty documents (a `helm template` file whose template rendered to
    // nothing) are null, and hold no pods.
    if !object.is_mapping() {
        return Ok(());
    }
    let Some(kind) = object
        .get("kind")
        .and_then(Value::as_str)
        .or(list_item_kind)
    else {
        return Ok(());
    };
    let pod_spec = match kind {
        "Pod" => object.get("spec"),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => path(object, &["spec", "template", "spec"]),
        "CronJob" => path(object, &["spec", "jobTemplate", "spec", "template", "spec"]),
        _ if kind.ends_with("List") => {
            let item_kind = kind.strip_suffix("List").filter(|k| !k.is_empty());
            for item in object
                .get("items")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                collect_object(item, item_kind, document, images)?;
            }
            return Ok(());
        }
        _ => None,
    };
    let Some(pod_spec) = pod_spec.and_then(Value::as_mapping) else {
        return Ok(());
    };
    // Walk the spec's keys in written order so images come out as they appear.
    for (key, containers) in pod_spec {
        let is_container_list = matches!(
            key.as_str(),
            Some("containers" | "initContainers" | "ephemeralContainers")
        );
        if !is_container_list {
            continue;
        }
        for container in containers.as_sequence().into_iter().flatten() {
            let image = match container.get("image") {
                // A controller template may leave the image to a mutating webhook.
                None | Some(Value::Null) => continue,
                Some(image) => image,
            };
            let malformed = |text: String, problem| ListError::Manifest {
                site: Box::new(Site {
                    document,
                    kind: kind.to_string(),
                    name: text_at(object, &["metadata", "name"]),
                    container: text_at(container, &["name"]),
                }),
                text,
                problem,
            };
            let Some(text) = image.as_str() else {
                let written = serde_yaml_ng::to_string(image).unwrap_or_default();
                return Err(malformed(written.trim().to_string(), Malformed::NotText));
            };
            images.push(parse_ref(text).map_err(|problem| malformed(text.to_string(), problem))?);
        }
    }
    Ok(())
}

fn path<'a>(value: &'a Value, keys: &[&str]) -> Option<&'a Value> {
    keys.iter().try_fold(value, |value, key| value.get(key))
}

fn text_at(value: &Value, keys: &[&str]) -> String {
    path(value, keys)
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string()
}

#[cfg(test)]
mod tests;
