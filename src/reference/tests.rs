use super::*;

#[test]
fn repository_names_follow_the_spec_grammar() {
    for ok in [
        "alpine",
        "library/alpine",
        "a/b/c",
        "my-app",
        "my--app",
        "my_app",
        "my__app",
        "v1.2",
        "0x",
    ] {
        assert!(ok.parse::<RepoName>().is_ok(), "{ok} should be valid");
    }
    for bad in [
        "", "Alpine", "a//b", "/a", "a/", "a___b", "a..b", "-a", "a-", "a_-b", "a b", "..",
        "a/../b",
    ] {
        assert!(
            bad.parse::<RepoName>().is_err(),
            "{bad:?} should be invalid"
        );
    }
    let long = "a".repeat(256);
    assert!(long.parse::<RepoName>().is_err());
}

#[test]
fn docker_hub_names_get_library() {
    let n: RepoName = "alpine".parse().unwrap();
    assert_eq!(n.with_library_prefix().as_str(), "library/alpine");
    let n: RepoName = "bitnami/redis".parse().unwrap();
    assert_eq!(n.with_library_prefix().as_str(), "bitnami/redis");
}

#[test]
fn tags_follow_the_spec_grammar() {
    for ok in ["latest", "3.20", "_x", "v1-rc.1", &"a".repeat(128)] {
        assert!(ok.parse::<Tag>().is_ok(), "{ok} should be valid");
    }
    for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
        assert!(bad.parse::<Tag>().is_err(), "{bad:?} should be invalid");
    }
}

#[test]
fn digests_need_a_known_algorithm_and_exact_hex() {
    let hex = "a".repeat(64);
    let d: Digest = format!("sha256:{hex}").parse().unwrap();
    assert_eq!(d.algorithm(), Algorithm::Sha256);
    assert_eq!(d.to_string(), format!("sha256:{hex}"));
    assert!(format!("sha512:{}", "0".repeat(128))
        .parse::<Digest>()
        .is_ok());
    for bad in [
        "sha256:totallywrong".to_string(),
        format!("sha256:{}", "A".repeat(64)),
        format!("sha256:{}", "a".repeat(63)),
        format!("md5:{}", "a".repeat(32)),
        format!("sha256{}", "a".repeat(64)),
        "sha256:".to_string(),
    ] {
        assert!(bad.parse::<Digest>().is_err(), "{bad:?} should be invalid");
    }
}

#[test]
fn hashing_matches_known_vectors() {
    assert_eq!(
        Digest::sha256_of(b"").to_string(),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let d: Digest = format!("sha512:{}", "0".repeat(128)).parse().unwrap();
    assert!(d.same_algorithm_of(b"abc").hex().starts_with("ddaf35a1"));
}

#[test]
fn references_are_tags_or_digests() {
    assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
    let d = format!("sha256:{}", "b".repeat(64));
    assert!(matches!(Reference::parse(&d), Ok(Reference::Digest(_))));
    assert!(Reference::parse("sha256:nope").is_err());
    assert!(Reference::parse("-bad").is_err());
}
