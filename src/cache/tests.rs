use super::*;

#[test]
fn single_ranges_parse() {
    assert_eq!(
        ByteRange::parse("bytes=0-99"),
        Some(ByteRange::From {
            start: 0,
            last: Some(99)
        })
    );
    assert_eq!(
        ByteRange::parse("bytes=100-"),
        Some(ByteRange::From {
            start: 100,
            last: None
        })
    );
    assert_eq!(ByteRange::parse("bytes=-5"), Some(ByteRange::Suffix(5)));
    // Forms we ignore (and so serve the whole blob): several ranges, other units, nonsense.
    for ignored in [
        "bytes=0-1,5-6",
        "items=0-1",
        "bytes=5-1",
        "bytes=a-b",
        "0-1",
    ] {
        assert_eq!(ByteRange::parse(ignored), None, "{ignored}");
    }
}

#[test]
fn ranges_resolve_against_the_size() {
    let r = |s| ByteRange::parse(s).unwrap();
    assert_eq!(r("bytes=0-99").resolve(1000).unwrap(), (0, 100));
    assert_eq!(r("bytes=990-2000").resolve(1000).unwrap(), (990, 1000));
    assert_eq!(r("bytes=10-").resolve(1000).unwrap(), (10, 1000));
    assert_eq!(r("bytes=-100").resolve(1000).unwrap(), (900, 1000));
    assert_eq!(r("bytes=-5000").resolve(1000).unwrap(), (0, 1000));
    assert_eq!(r("bytes=1000-").resolve(1000).unwrap_err().size, 1000);
    assert!(r("bytes=-0").resolve(1000).is_err());
    assert!(r("bytes=0-").resolve(0).is_err());
}

#[test]
fn accept_negotiation() {
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    const V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
    let none = Accept::parse([]);
    assert!(none.allows(INDEX), "a client naming no type takes anything");
    let docker = Accept::parse([
        V2,
        "application/vnd.docker.distribution.manifest.list.v2+json; q=0.9",
    ]);
    assert!(docker.allows(V2) && docker.allows(LIST));
    assert!(!docker.allows(INDEX));
    let split = Accept::parse([format!("{V2}, {INDEX}").as_str()]);
    assert!(split.allows(INDEX));
    assert!(Accept::parse(["*/*"]).allows(INDEX));
    assert_eq!(docker.header_value(), format!("{V2}, {LIST}"));
    assert_eq!(none.header_value(), MANIFEST_TYPES);
}

#[test]
fn prefetch_targets_of_an_image_are_its_config_and_layers() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let image = serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "x", "digest": d('a'), "size": 1},
        "layers": [
            {"mediaType": "x", "digest": d('b'), "size": 1},
            {"mediaType": "x", "digest": d('c'), "size": 1, "urls": ["https://foreign.example/layer"]},
            {"mediaType": "x", "digest": "not-a-digest", "size": 1}
        ]
    });
    let t = prefetch::targets(image.to_string().as_bytes(), &[]);
    assert_eq!(
        t,
        vec![
            prefetch::Target::Blob(d('a').parse().unwrap()),
            prefetch::Target::Blob(d('b').parse().unwrap())
        ],
        "foreign layers and bad digests are skipped"
    );
}

#[test]
fn prefetch_targets_of_an_index_are_the_wanted_platforms() {
    let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [
            {"digest": d('a'), "platform": {"os": "linux", "architecture": "amd64"}},
            {"digest": d('b'), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"digest": d('c'), "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
            {"digest": d('e'), "platform": {"os": "windows", "architecture": "amd64"}},
            {"digest": d('f')}
        ]
    });
    let platforms = vec![
        "linux/amd64".to_string(),
        "linux/arm64".into(),
        "linux/arm/v6".into(),
    ];
    let t = prefetch::targets(index.to_string().as_bytes(), &platforms);
    assert_eq!(
        t,
        vec![
            prefetch::Target::Manifest(d('a').parse().unwrap()),
            prefetch::Target::Manifest(d('b').parse().unwrap())
        ]
    );
    assert!(prefetch::targets(b"not json", &platforms).is_empty());
}

#[test]
fn tag_pages_are_sorted_and_cut_after_last() {
    let repo: RepoName = "library/x".parse().unwrap();
    let tags = || vec!["c".to_string(), "a".into(), "b".into(), "a".into()];
    let page = TagPage::new(&repo, tags(), None, None);
    assert_eq!(page.list.tags, ["a", "b", "c"]);
    assert!(!page.more);
    let page = TagPage::new(&repo, tags(), Some(2), None);
    assert_eq!(
        (page.list.tags.as_slice(), page.more),
        (&["a".to_string(), "b".into()][..], true)
    );
    let page = TagPage::new(&repo, tags(), Some(2), Some("a"));
    assert_eq!(
        (page.list.tags.as_slice(), page.more),
        (&["b".to_string(), "c".into()][..], false)
    );
    assert!(TagPage::new(&repo, tags(), Some(0), None)
        .list
        .tags
        .is_empty());
}
