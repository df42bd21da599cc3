use super::*;

#[test]
fn bearer_challenges_give_realm_service_and_scope() {
    let c = Challenge::parse(
        r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
    )
    .unwrap();
    assert_eq!(
        c,
        Challenge::Bearer {
            realm: "https://auth.docker.io/token".into(),
            service: Some("registry.docker.io".into()),
            scope: Some("repository:library/alpine:pull".into()),
        }
    );
}

#[test]
fn basic_and_unknown_challenges() {
    assert_eq!(
        Challenge::parse(r#"Basic realm="Registry Realm""#),
        Some(Challenge::Basic)
    );
    assert_eq!(Challenge::parse(r#"Negotiate"#), None);
    assert_eq!(
        Challenge::parse(r#"Bearer service="x""#),
        None,
        "a bearer challenge needs a realm"
    );
    // Several challenges in one header: the first we can answer wins.
    assert_eq!(
        Challenge::parse(r#"Negotiate, Basic realm="r""#),
        Some(Challenge::Basic)
    );
}

#[test]
fn statuses_map_to_what_they_mean() {
    let mut h = HeaderMap::new();
    assert_eq!(
        kind_of(StatusCode::NOT_FOUND, &h),
        UpstreamErrorKind::NotFound
    );
    assert_eq!(
        kind_of(StatusCode::FORBIDDEN, &h),
        UpstreamErrorKind::Denied
    );
    assert_eq!(
        kind_of(StatusCode::BAD_GATEWAY, &h),
        UpstreamErrorKind::Status(502)
    );
    h.insert(RETRY_AFTER, "30".parse().unwrap());
    assert_eq!(
        kind_of(StatusCode::TOO_MANY_REQUESTS, &h),
        UpstreamErrorKind::TooManyRequests {
            retry_after: Some("30".into())
        }
    );
}
