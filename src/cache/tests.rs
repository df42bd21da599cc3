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
