//! A small parser for the Prometheus text exposition format, so tests read
//! metric values rather than grep for lines.

use std::collections::BTreeMap;

/// A sample's labels, sorted.
pub type Labels = BTreeMap<String, String>;

/// Every sample of an exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    samples: BTreeMap<String, Vec<(Labels, f64)>>,
}

impl Exposition {
    /// Parses `name{a="x",b="y"} value` lines; comments and blank lines are skipped.
    pub fn parse(text: &str) -> Exposition {
        let mut out = Exposition::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = value.parse().expect("a numeric value");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    let labels = body
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label=value");
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            out.samples.entry(name).or_default().push((labels, value));
        }
        out
    }

    /// The sum of `name`'s samples whose labels include all of `labels` (0 if none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .get(name)
            .map(|samples| {
                samples
                    .iter()
                    .filter(|(l, _)| {
                        labels
                            .iter()
                            .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                    })
                    .map(|(_, v)| v)
                    .sum()
            })
            .unwrap_or(0.0)
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.contains_key(name)
    }
}
