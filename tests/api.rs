//! The distribution-spec pull API against a real Distribution upstream behind
//! the nginx front, whose access log counts what reached upstream.

mod support;

use futures_util::future::join_all;
use reqwest::Method;
use support::cache::{Cache, Rig};
use support::front::Mode;
use support::images::{media, sha256_digest, Fetched, Image};
use support::registry::Registry;

const ALL: (&str, &str) = ("accept", media::ACCEPT_ALL);

fn error_code(f: &Fetched) -> String {
    let v: serde_json::Value = serde_json::from_slice(&f.body)
        .unwrap_or_else(|e| panic!("not an OCI error body ({e}): {:?}", f.body));
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_version_check_names_the_api() {
    let rig = Rig::start(Registry::anonymous()).await;
    let r = rig.request(Method::GET, "/v2/", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn manifests_are_served_with_exact_bytes_and_the_same_headers_for_head() {
    let img = Image::single(1);
    let rig = Rig::start(Registry::anonymous().image("library/one", "1", img.clone())).await;
    for path in [
        "/v2/library/one/manifests/1",
        "/v2/one/manifests/1?ns=docker.io",
    ] {
        let get = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!(get.status, 200, "{path}");
        assert_eq!(&get.body[..], &img.manifest()[..]);
        assert_eq!(get.header("content-type"), Some(img.media_type()));
        assert_eq!(get.header("docker-content-digest"), Some(img.digest()));
        assert_eq!(sha256_digest(&get.body), img.digest());
        let len = img.manifest().len().to_string();
        assert_eq!(get.header("content-length"), Some(len.as_str()));
        let head = rig.request(Method::HEAD, path, &[ALL]).await;
        assert_eq!(head.status, 200);
        assert!(head.body.is_empty());
        for h in ["content-type", "content-length", "docker-content-digest"] {
            assert_eq!(
                head.header(h),
                get.header(h),
                "{h} differs between HEAD and GET"
            );
        }
    }
    let by_digest = rig
        .request(
            Method::GET,
            &format!("/v2/library/one/manifests/{}", img.digest()),
            &[ALL],
        )
        .await;
    assert_eq!(by_digest.status, 200);
    assert_eq!(&by_digest.body[..], &img.manifest()[..]);
}

#[tokio::test(flavor = "multi_thread")]
async fn indexes_and_manifest_lists_keep_their_types_and_children() {
    let index = Image::multi_arch(2);
    let list = Image::docker_list(3);
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/multi", "oci", index.clone())
            .image("library/multi", "docker", list.clone()),
    )
    .await;
    for (tag, img) in [("oci", &index), ("docker", &list)] {
        let r = rig
            .request(
                Method::GET,
                &format!("/v2/library/multi/manifests/{tag}"),
                &[ALL],
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(img.media_type()));
        assert_eq!(&r.body[..], &img.manifest()[..]);
        for child in img.children() {
            let c = rig
                .request(
                    Method::GET,
                    &format!("/v2/library/multi/manifests/{}", child.digest()),
                    &[ALL],
                )
                .await;
            assert_eq!(c.status, 200);
            assert_eq!(c.header("content-type"), Some(child.media_type()));
            assert_eq!(&c.body[..], &child.manifest()[..]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_whose_accept_lacks_the_type_gets_what_upstream_would_give_it() {
    let index = Image::multi_arch(4);
    let list = Image::docker_list(5);
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/neg", "oci", index)
            .image("library/neg", "docker", list),
    )
    .await;
    // Warm both tags with a client that takes everything, so the cache holds the indexes.
    for tag in ["oci", "docker"] {
        let path = format!("/v2/library/neg/manifests/{tag}");
        assert_eq!(rig.request(Method::GET, &path, &[ALL]).await.status, 200);
    }
    for accept in [
        media::DOCKER_MANIFEST,
        media::OCI_MANIFEST,
        media::DOCKER_LIST,
    ] {
        for tag in ["oci", "docker"] {
            let path = format!("/v2/library/neg/manifests/{tag}");
            let ours = rig.request(Method::GET, &path, &[("accept", accept)]).await;
            let theirs = rig
                .request_upstream(Method::GET, &path, &[("accept", accept)])
                .await;
            let what = format!("{tag} with Accept {accept}");
            assert_eq!(ours.status, theirs.status, "{what}");
            if theirs.status == 200 {
                assert_eq!(
                    ours.header("content-type"),
                    theirs.header("content-type"),
                    "{what}"
                );
                // Distribution converts to signed schema 1 for such clients; the
                // signature carries a timestamp, so only other types compare byte for byte.
                if !ours
                    .header("content-type")
                    .unwrap_or_default()
                    .contains("prettyjws")
                {
                    assert_eq!(ours.body, theirs.body, "{what}");
                }
                assert_eq!(
                    ours.header("docker-content-digest"),
                    Some(sha256_digest(&ours.body).as_str())
                );
            } else {
                assert_eq!(error_code(&ours), "MANIFEST_UNKNOWN", "{what}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_stream_whole_or_by_range() {
    let img = Image::big(6, 64 * 1024 * 1024);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/big", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let layer = img.layers().last().expect("a layer").clone();
    let path = format!("/v2/library/big/blobs/{}", layer.digest);
    // A range first, while the blob is not cached: it is served from the flight.
    let cold = rig
        .request(Method::GET, &path, &[("range", "bytes=1000-1999")])
        .await;
    assert_eq!(cold.status, 206);
    assert_eq!(&cold.body[..], &layer.bytes[1000..2000]);
    let whole = rig.request(Method::GET, &path, &[]).await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body.len(), layer.bytes.len());
    assert_eq!(sha256_digest(&whole.body), layer.digest);
    assert_eq!(
        whole.header("docker-content-digest"),
        Some(layer.digest.as_str())
    );
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    let size = layer.bytes.len();
    let r = rig
        .request(Method::GET, &path, &[("range", "bytes=10-19")])
        .await;
    assert_eq!(r.status, 206);
    assert_eq!(&r.body[..], &layer.bytes[10..20]);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes 10-19/{size}").as_str())
    );
    let r = rig
        .request(Method::GET, &path, &[("range", "bytes=-100")])
        .await;
    assert_eq!(&r.body[..], &layer.bytes[size - 100..]);
    let r = rig
        .request(Method::GET, &path, &[("range", &format!("bytes={size}-"))])
        .await;
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{size}").as_str())
    );
    let head = rig.request(Method::HEAD, &path, &[]).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(size.to_string().as_str())
    );
    assert_eq!(
        rig.front.count("GET", &layer.digest),
        1,
        "one upstream GET for the cold range, the whole body and everything after"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_pull_never_reaches_upstream() {
    let img = Image::multi_arch(7);
    let rig = Rig::start(Registry::anonymous().image("library/twice", "1", img.clone())).await;
    let pull = || async {
        let m = rig
            .request(Method::GET, "/v2/library/twice/manifests/1", &[ALL])
            .await;
        assert_eq!(m.status, 200);
        for child in img.children() {
            let c = rig
                .request(
                    Method::GET,
                    &format!("/v2/library/twice/manifests/{}", child.digest()),
                    &[ALL],
                )
                .await;
            assert_eq!(c.status, 200);
            for blob in child.own_blobs() {
                let b = rig
                    .request(
                        Method::GET,
                        &format!("/v2/library/twice/blobs/{}", blob.digest),
                        &[],
                    )
                    .await;
                assert_eq!(b.status, 200);
                assert_eq!(b.body, blob.bytes);
            }
        }
    };
    pull().await;
    assert!(
        !rig.front.requests().is_empty(),
        "the first pull went upstream"
    );
    rig.quiesce().await;
    pull().await;
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    assert!(seen.is_empty(), "second pull reached upstream: {seen:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_tag_is_revalidated_with_head_and_refetched_only_when_it_moved() {
    let first = Image::single(8);
    let second = Image::single(9);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/moving", "1", first.clone()),
        |c| c.tag_ttl("0s"),
    )
    .await;
    let get = || rig.request(Method::GET, "/v2/library/moving/manifests/1", &[ALL]);
    assert_eq!(get().await.body, first.manifest().clone());
    rig.quiesce().await;
    assert_eq!(get().await.body, first.manifest().clone());
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("HEAD", "/v2/library/moving/manifests/1")
    );
    rig.upstream.push("library/moving", "1", &second).await;
    rig.quiesce().await;
    assert_eq!(get().await.body, second.manifest().clone());
    assert_eq!(rig.front.count("HEAD", "/manifests/1"), 1);
    assert_eq!(
        rig.front
            .count("GET", &format!("/manifests/{}", second.digest())),
        1
    );
    assert_eq!(
        rig.front.count("GET", "/manifests/1"),
        0,
        "the tag itself is never GET"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_tag_costs_no_upstream_request() {
    let img = Image::single(10);
    let rig = Rig::start(Registry::anonymous().image("library/fresh", "1", img)).await;
    let get = || rig.request(Method::GET, "/v2/library/fresh/manifests/1", &[ALL]);
    assert_eq!(get().await.status, 200);
    rig.quiesce().await;
    assert_eq!(get().await.status, 200);
    assert_eq!(
        rig.request(Method::HEAD, "/v2/library/fresh/manifests/1", &[ALL])
            .await
            .status,
        200
    );
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    assert!(seen.is_empty(), "{seen:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_oci_errors_and_never_reach_upstream() {
    let rig = Rig::start(Registry::anonymous().image("library/x", "1", Image::single(11))).await;
    let zeros = format!("sha256:{}", "0".repeat(64));
    let cases: Vec<(Method, String, u16, &str)> = vec![
        (
            Method::GET,
            "/v2/library/x/manifests/sha256:totallywrong".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/library/x/blobs/sha256:abc".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/library/x/blobs/latest".into(),
            400,
            "DIGEST_INVALID",
        ),
        (
            Method::GET,
            "/v2/library/x/manifests/-bad-tag".into(),
            404,
            "MANIFEST_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/Library/X/manifests/1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/a//b/manifests/1".into(),
            400,
            "NAME_INVALID",
        ),
        (
            Method::GET,
            "/v2/x/manifests/1?ns=evil.example".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            Method::GET,
            "/v2/evil.example/x/manifests/1".into(),
            404,
            "NAME_UNKNOWN",
        ),
        (
            Method::PUT,
            "/v2/library/x/manifests/1".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            format!("/v2/library/x/manifests/{zeros}"),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::POST,
            "/v2/library/x/blobs/uploads/".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::PATCH,
            "/v2/library/x/blobs/uploads/abc".into(),
            405,
            "UNSUPPORTED",
        ),
        (
            Method::DELETE,
            "/v2/library/x/blobs/sha256:bad".into(),
            405,
            "UNSUPPORTED",
        ),
        (Method::POST, "/v2/".into(), 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in &cases {
        let r = rig.request(method.clone(), path, &[ALL]).await;
        assert_eq!(r.status, *status, "{method} {path}");
        assert_eq!(error_code(&r), *code, "{method} {path}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    assert!(
        seen.is_empty(),
        "refused requests reached upstream: {seen:#?}"
    );
    // Misses upstream are 404s with the right code, never 5xx.
    let misses = [
        ("/v2/library/x/manifests/nope", "MANIFEST_UNKNOWN"),
        (
            &*format!("/v2/library/x/manifests/{zeros}"),
            "MANIFEST_UNKNOWN",
        ),
        (&*format!("/v2/library/x/blobs/{zeros}"), "BLOB_UNKNOWN"),
        ("/v2/library/nothing/tags/list", "NAME_UNKNOWN"),
    ];
    for (path, code) in misses {
        let r = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(error_code(&r), code, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_is_chosen_by_ns_then_path_prefix_then_default() {
    let hub_img = Image::single(12);
    let ghcr_img = Image::single(13);
    let hub = Registry::anonymous()
        .image("library/app", "1", hub_img.clone())
        .start()
        .await;
    let ghcr = Registry::anonymous()
        .image("org/app", "1", ghcr_img.clone())
        .start()
        .await;
    let cache: Cache = Cache::builder()
        .upstream("docker.io", &hub.url())
        .library_prefix()
        .upstream("ghcr.io", &ghcr.url())
        .start()
        .await;
    let get = |path: String| {
        let url = format!("{}{path}", cache.url());
        async move { support::cache::raw_request(&url, Method::GET, &[ALL]).await }
    };
    let cases = [
        ("/v2/app/manifests/1?ns=docker.io", &hub_img),
        ("/v2/library/app/manifests/1", &hub_img),
        ("/v2/app/manifests/1", &hub_img),
        ("/v2/docker.io/library/app/manifests/1", &hub_img),
        ("/v2/org/app/manifests/1?ns=ghcr.io", &ghcr_img),
        ("/v2/ghcr.io/org/app/manifests/1", &ghcr_img),
    ];
    for (path, img) in cases {
        let r = get(path.to_string()).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(
            r.header("docker-content-digest"),
            Some(img.digest()),
            "{path}"
        );
    }
    assert_eq!(
        get("/v2/org/app/manifests/1".into()).await.status,
        404,
        "default is docker.io"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_list_pages_and_falls_back_to_known_tags_when_upstream_fails() {
    let img = Image::single(14);
    let mut rig = Rig::start(
        Registry::anonymous()
            .image("library/t", "a", img.clone())
            .image("library/t", "b", img.clone())
            .image("library/t", "c", img.clone()),
    )
    .await;
    let tags = |f: Fetched| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&f.body).expect("json");
        assert_eq!(v["name"], "library/t");
        serde_json::from_value(v["tags"].clone()).expect("tags")
    };
    async fn list(rig: &Rig, q: &str) -> Fetched {
        rig.request(Method::GET, &format!("/v2/library/t/tags/list{q}"), &[])
            .await
    }
    assert_eq!(tags(list(&rig, "").await), ["a", "b", "c"]);
    let page = list(&rig, "?n=2").await;
    assert_eq!(
        page.header("link"),
        Some("</v2/library/t/tags/list?n=2&last=b>; rel=\"next\"")
    );
    assert_eq!(tags(page), ["a", "b"]);
    assert_eq!(
        list(&rig, "?n=3").await.header("link"),
        None,
        "no page follows"
    );
    assert_eq!(tags(list(&rig, "?last=a").await), ["b", "c"]);
    for tag in ["a", "c"] {
        let r = rig
            .request(
                Method::GET,
                &format!("/v2/library/t/manifests/{tag}"),
                &[ALL],
            )
            .await;
        assert_eq!(r.status, 200);
    }
    rig.front.set_mode(Mode::Status503).await;
    assert_eq!(
        tags(list(&rig, "").await),
        ["a", "c"],
        "the tags the cache knows"
    );
    assert_eq!(tags(list(&rig, "?last=a").await), ["c"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_old_tag_is_served_stale_while_upstream_fails() {
    let img = Image::single(15);
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/stale", "1", img.clone()),
        |c| c.tag_ttl("0s"),
    )
    .await;
    let path = "/v2/library/stale/manifests/1";
    let r = rig.request(Method::GET, path, &[ALL]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("warning"), None);
    for blob in img.own_blobs() {
        let b = rig
            .request(
                Method::GET,
                &format!("/v2/library/stale/blobs/{}", blob.digest),
                &[],
            )
            .await;
        assert_eq!(b.status, 200);
    }
    for mode in [
        Mode::Status503,
        Mode::TooMany { retry_after: 30 },
        Mode::Status(500),
    ] {
        rig.front.set_mode(mode.clone()).await;
        let r = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!(r.status, 200, "{mode:?}");
        assert_eq!(&r.body[..], &img.manifest()[..]);
        assert_eq!(
            r.header("warning"),
            Some("110 - \"Response is Stale\""),
            "{mode:?}"
        );
        for blob in img.own_blobs() {
            let b = rig
                .request(
                    Method::GET,
                    &format!("/v2/library/stale/blobs/{}", blob.digest),
                    &[],
                )
                .await;
            assert_eq!(b.status, 200, "{mode:?}: cached blobs are served");
        }
    }
    rig.front.stop();
    let r = rig.request(Method::GET, path, &[ALL]).await;
    assert_eq!(r.status, 200, "upstream gone");
    assert!(r.header("warning").is_some());
    // Nothing cached and upstream gone: a clear error, not a hang. By now the
    // failures have opened the circuit, so the answer is immediate.
    let r = rig
        .request(Method::GET, "/v2/library/other/manifests/1", &[ALL])
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(error_code(&r), "UNAVAILABLE");
    assert!(r.header("retry-after").is_some());
    let message = String::from_utf8_lossy(&r.body);
    assert!(
        message.contains("docker.io"),
        "the message names the upstream: {message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limits_pass_through_with_retry_after_when_nothing_is_cached() {
    let mut rig =
        Rig::start(Registry::anonymous().image("library/rl", "1", Image::single(16))).await;
    rig.front.set_mode(Mode::TooMany { retry_after: 42 }).await;
    let r = rig
        .request(Method::GET, "/v2/library/rl/manifests/1", &[ALL])
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(error_code(&r), "TOOMANYREQUESTS");
    assert_eq!(r.header("retry-after"), Some("42"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_cached_for_one_repository_is_served_for_another_only_if_upstream_has_it_there() {
    let img = Image::single(17);
    let rig = Rig::start_with(
        Registry::anonymous()
            .image("library/a", "1", img.clone())
            .image("library/b", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let layer = &img.layers()[0];
    let blob = |repo: &str| format!("/v2/{repo}/blobs/{}", layer.digest);
    assert_eq!(
        rig.request(Method::GET, &blob("library/a"), &[])
            .await
            .status,
        200
    );
    rig.quiesce().await;
    let r = rig.request(Method::GET, &blob("library/c"), &[]).await;
    assert_eq!(r.status, 404, "library/c does not have it upstream");
    assert_eq!(error_code(&r), "BLOB_UNKNOWN");
    let r = rig.request(Method::GET, &blob("library/b"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, layer.bytes);
    assert_eq!(
        rig.request(Method::GET, &blob("library/b"), &[])
            .await
            .status,
        200
    );
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    let methods: Vec<&str> = seen.iter().map(|l| l.method.as_str()).collect();
    assert_eq!(
        methods,
        ["HEAD", "HEAD"],
        "one confirmation each, no download: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_refusals_map_to_the_right_client_errors() {
    let mut rig =
        Rig::start(Registry::anonymous().image("library/x", "1", Image::single(18))).await;
    for (status, code) in [
        (403, "DENIED"),
        (401, "UNAUTHORIZED"),
        (404, "MANIFEST_UNKNOWN"),
    ] {
        rig.front.set_mode(Mode::Status(status)).await;
        let r = rig
            .request(Method::GET, "/v2/library/x/manifests/1", &[ALL])
            .await;
        assert_eq!((r.status, error_code(&r)), (status, code.to_string()));
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains("injected by the test front"),
            "upstream's body is not echoed: {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_heads_carry_the_same_headers_as_gets_cached_or_not() {
    let img = Image::single(19);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/h", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let layer = &img.layers()[0];
    let path = format!("/v2/library/h/blobs/{}", layer.digest);
    let cold_head = rig.request(Method::HEAD, &path, &[]).await;
    assert_eq!(cold_head.status, 200);
    assert!(cold_head.body.is_empty());
    assert_eq!(
        rig.front.count("GET", &layer.digest),
        0,
        "a HEAD downloads nothing"
    );
    let get = rig.request(Method::GET, &path, &[]).await;
    let warm_head = rig.request(Method::HEAD, &path, &[]).await;
    for h in ["content-type", "content-length", "docker-content-digest"] {
        assert_eq!(cold_head.header(h), get.header(h), "{h}: cold HEAD vs GET");
        assert_eq!(warm_head.header(h), get.header(h), "{h}: warm HEAD vs GET");
    }
    assert_eq!(
        get.header("docker-content-digest"),
        Some(layer.digest.as_str())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_without_list_support_costs_no_more_upstream_requests_than_others() {
    let list = Image::docker_list(20);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/old", "1", list.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let path = "/v2/library/old/manifests/1";
    assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
    let only_v2 = ("accept", media::DOCKER_MANIFEST);
    let first = rig.request(Method::GET, path, &[only_v2]).await;
    let theirs = rig.request_upstream(Method::GET, path, &[only_v2]).await;
    assert_eq!(
        (first.status, first.header("content-type")),
        (theirs.status, theirs.header("content-type"))
    );
    assert_eq!(first.body, theirs.body);
    rig.quiesce().await;
    let again = rig.request(Method::GET, path, &[only_v2]).await;
    assert_eq!(again.body, first.body);
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    assert!(
        seen.is_empty(),
        "a fresh tag costs no upstream request, whatever the Accept: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_variant_is_revalidated_with_one_head_for_a_burst_of_such_clients() {
    let list = Image::docker_list(21);
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/oldv", "1", list.clone()),
        |c| c.prefetch(false).tag_ttl("0s"),
    )
    .await;
    let path = "/v2/library/oldv/manifests/1";
    let only_v2 = [("accept", media::DOCKER_MANIFEST)];
    let first = rig.request(Method::GET, path, &only_v2).await;
    assert_eq!(first.status, 200);
    rig.quiesce().await;
    // tag_ttl 0: every request revalidates; a burst shares one HEAD for the tag
    // and one for the variant, and an unchanged variant fetches nothing.
    let burst = join_all((0..10).map(|_| rig.request(Method::GET, path, &only_v2))).await;
    for r in &burst {
        assert_eq!((r.status, &r.body), (200, &first.body));
    }
    let seen = rig
        .front
        .settled(std::time::Duration::from_millis(200))
        .await;
    assert!(
        seen.iter().all(|l| l.method == "HEAD"),
        "an unchanged variant costs no GET: {seen:#?}"
    );
    // Unshared, that would be 20 HEADs (one for the tag and one for the variant
    // per request); shared, 2 per wave of requests that overlap.
    assert!(
        (2..10).contains(&seen.len()),
        "a burst of 10 shares its revalidations: {seen:#?}"
    );
    // When upstream fails, the variant is served stale.
    rig.front.set_mode(Mode::Status503).await;
    let stale = rig.request(Method::GET, path, &only_v2).await;
    assert_eq!((stale.status, &stale.body), (200, &first.body));
}
