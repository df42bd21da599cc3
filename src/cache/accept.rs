//! `Accept` negotiation for manifests.

/// Every manifest type we ask upstream for, so that a tag resolves to what it
/// really is (an index, a list, or an image manifest).
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The media types a client accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accept {
    types: Vec<String>,
}

impl Accept {
    /// Parses every `Accept` header value a client sent (parameters such as `q` are ignored).
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Accept {
        let types = values
            .into_iter()
            .flat_map(|v| v.split(','))
            .filter_map(|t| {
                let t = t
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase();
                (!t.is_empty()).then_some(t)
            })
            .collect();
        Accept { types }
    }

    /// Whether a manifest of `media_type` may be served. A client that names no
    /// type (curl) or `*/*` takes anything.
    pub fn allows(&self, media_type: &str) -> bool {
        self.types.is_empty()
            || self
                .types
                .iter()
                .any(|t| t == "*/*" || t.eq_ignore_ascii_case(media_type))
    }

    /// The header to send upstream on this client's behalf.
    pub fn header_value(&self) -> String {
        if self.types.is_empty() {
            MANIFEST_TYPES.to_string()
        } else {
            self.types.join(", ")
        }
    }
}
