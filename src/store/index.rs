//! The metadata index, in sled behind this narrow API so that it can be
//! swapped (redb is the fallback) without touching callers.
//!
//! Keys are `upstream \0 repository \0 tag|digest`; NUL never occurs in a
//! valid name, so keys cannot collide and a repository's records share a prefix.

use super::StoreError;
use crate::reference::{Digest, RepoName, Tag};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a tag pointed to when last checked with upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// The manifest digest upstream gave for the tag.
    pub digest: String,
    /// The manifest's media type.
    pub media_type: String,
    /// When upstream last confirmed the mapping, milliseconds since the Unix epoch.
    pub fetched_at_ms: u64,
}

/// What the store knows about a stored manifest besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// The `Content-Type` upstream served it with.
    pub media_type: String,
}

/// sled-backed index; cheap to clone (sled handles are `Arc`s).
#[derive(Clone)]
pub struct Index {
    tags: sled::Tree,
    /// What a tag resolves to for clients whose `Accept` lacks the tag's own type.
    variants: sled::Tree,
    /// Last access of each stored file (digest → milliseconds since the epoch), for LRU eviction.
    access: sled::Tree,
    manifests: sled::Tree,
    links: sled::Tree,
}

fn key(upstream: &str, repo: &RepoName, last: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(upstream.len() + repo.as_str().len() + last.len() + 2);
    k.extend_from_slice(upstream.as_bytes());
    k.push(0);
    k.extend_from_slice(repo.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(last.as_bytes());
    k
}

impl Index {
    /// Opens or creates the index directory.
    pub fn open(path: &Path) -> Result<Index, StoreError> {
        let db = sled::Config::new().path(path).open()?;
        Ok(Index {
            tags: db.open_tree("tags")?,
            variants: db.open_tree("variants")?,
            access: db.open_tree("access")?,
            manifests: db.open_tree("manifests")?,
            links: db.open_tree("links")?,
        })
    }

    /// Writes everything recorded so far to disk. sled otherwise flushes every
    /// half second and when its last handle drops; a process that exits with
    /// a handle still held elsewhere (a download's writer thread) would lose
    /// what came since the last flush.
    pub fn flush(&self) -> Result<(), StoreError> {
        // Trees share one page cache: flushing one flushes the database.
        self.tags.flush()?;
        Ok(())
    }

    /// The record for a tag, if the cache has seen it.
    pub fn tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
    ) -> Result<Option<TagRecord>, StoreError> {
        match self.tags.get(key(upstream, repo, tag.as_str()))? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Records (or refreshes) a tag.
    pub fn set_tag(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        record: &TagRecord,
    ) -> Result<(), StoreError> {
        self.tags.insert(
            key(upstream, repo, tag.as_str()),
            serde_json::to_vec(record)?,
        )?;
        Ok(())
    }

    /// What `tag` resolved to for clients sending `accept`, if recorded.
    pub fn variant(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        accept: &str,
    ) -> Result<Option<TagRecord>, StoreError> {
        let k = key(upstream, repo, &format!("{tag}\0{accept}"));
        match self.variants.get(k)? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Records what `tag` resolved to for clients sending `accept`.
    pub fn set_variant(
        &self,
        upstream: &str,
        repo: &RepoName,
        tag: &Tag,
        accept: &str,
        record: &TagRecord,
    ) -> Result<(), StoreError> {
        let k = key(upstream, repo, &format!("{tag}\0{accept}"));
        self.variants.insert(k, serde_json::to_vec(record)?)?;
        Ok(())
    }

    /// The tags of a repository that the cache knows, sorted.
    pub fn tags_of(&self, upstream: &str, repo: &RepoName) -> Result<Vec<String>, StoreError> {
        let prefix = key(upstream, repo, "");
        let mut out = Vec::new();
        for item in self.tags.scan_prefix(&prefix) {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k[prefix.len()..]).into_owned());
        }
        Ok(out)
    }

    /// The record of a stored manifest.
    pub fn manifest(&self, digest: &Digest) -> Result<Option<ManifestRecord>, StoreError> {
        match self.manifests.get(digest.to_string())? {
            Some(v) => Ok(Some(serde_json::from_slice(&v)?)),
            None => Ok(None),
        }
    }

    /// Records a stored manifest's media type.
    pub fn set_manifest(&self, digest: &Digest, record: &ManifestRecord) -> Result<(), StoreError> {
        self.manifests
            .insert(digest.to_string(), serde_json::to_vec(record)?)?;
        Ok(())
    }

    /// Records an access to a stored file now.
    pub fn touch(&self, digest: &Digest, now_ms: u64) -> Result<(), StoreError> {
        self.access
            .insert(digest.to_string(), &now_ms.to_be_bytes())?;
        Ok(())
    }

    /// When a stored file was last accessed, if recorded.
    pub fn last_access(&self, digest: &Digest) -> Option<u64> {
        let v = self.access.get(digest.to_string()).ok()??;
        Some(u64::from_be_bytes(v.as_ref().try_into().ok()?))
    }

    /// Forgets what the index says about a file that is gone (links stay: they
    /// are facts about upstream, and keep a re-fetch from needing a HEAD).
    pub fn forget(&self, digest: &Digest) -> Result<(), StoreError> {
        self.access.remove(digest.to_string())?;
        self.manifests.remove(digest.to_string())?;
        Ok(())
    }

    /// Records that upstream confirmed `repo` holds `digest`.
    pub fn link(&self, upstream: &str, repo: &RepoName, digest: &Digest) -> Result<(), StoreError> {
        self.links
            .insert(key(upstream, repo, &digest.to_string()), &[])?;
        Ok(())
    }

    /// Whether upstream confirmed `repo` holds `digest`.
    pub fn is_linked(&self, upstream: &str, repo: &RepoName, digest: &Digest) -> bool {
        self.links
            .contains_key(key(upstream, repo, &digest.to_string()))
            .unwrap_or(false)
    }
}
