//! Rollout storms: many clients asking for the same cold content at once make
//! one upstream fetch per digest, and every client streams from it. Counted in
//! the nginx front's access log, in front of a real Distribution upstream.

mod support;

use futures_util::future::join_all;
use futures_util::StreamExt;
use reqwest::Method;
use std::time::Duration;
use support::cache::{stream_digest, Rig};
use support::front::Mode;
use support::images::{media, Image};
use support::registry::Registry;

const ALL: (&str, &str) = ("accept", media::ACCEPT_ALL);

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_gets_of_a_cold_64_mib_blob_make_one_upstream_get() {
    let img = Image::big(51, 64 * 1024 * 1024);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/big", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let layer = img.layers().last().unwrap().clone();
    let url = format!("{}/v2/library/big/blobs/{}", rig.cache.url(), layer.digest);
    let got = join_all((0..50).map(|_| stream_digest(&url, &[]))).await;
    for g in &got {
        assert_eq!((g.status, g.error.as_deref()), (200, None));
        assert_eq!(
            (g.digest.as_str(), g.len),
            (layer.digest.as_str(), layer.size())
        );
    }
    assert_eq!(
        rig.front.count("GET", &layer.digest),
        1,
        "{:#?}",
        rig.front.requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_tag_requests_make_one_upstream_manifest_request() {
    let img = Image::single(52);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/tagged", "1", img.clone()),
        |c| c.prefetch(false).tag_ttl("5s"),
    )
    .await;
    let path = "/v2/library/tagged/manifests/1";
    let storm = || join_all((0..50).map(|_| rig.request(Method::GET, path, &[ALL])));
    for r in storm().await {
        assert_eq!((r.status, &r.body[..]), (200, &img.manifest()[..]));
    }
    // A cold tag costs exactly one request: the GET of the manifest by tag.
    let cold = rig.front.settled(Duration::from_millis(200)).await;
    assert_eq!(cold.len(), 1, "{cold:#?}");
    assert_eq!(
        (cold[0].method.as_str(), cold[0].uri.as_str()),
        ("GET", path)
    );
    // Once the tag is older than its ttl, a storm makes one revalidation (a HEAD), not fifty.
    rig.quiesce().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    for r in storm().await {
        assert_eq!(r.status, 200);
    }
    let warm = rig.front.settled(Duration::from_millis(200)).await;
    assert_eq!(warm.len(), 1, "{warm:#?}");
    assert_eq!(
        (warm[0].method.as_str(), warm[0].uri.as_str()),
        ("HEAD", path)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reader_that_hangs_up_leaves_the_others_and_the_stored_blob_intact() {
    let img = Image::big(53, 8 * 1024 * 1024);
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/slow", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    rig.front
        .set_mode(Mode::Slow {
            rate: 4 * 1024 * 1024,
        })
        .await;
    let layer = img.layers().last().unwrap().clone();
    let url = format!("{}/v2/library/slow/blobs/{}", rig.cache.url(), layer.digest);
    // One client reads a little and hangs up while the others read everything.
    let quitter = {
        let url = url.clone();
        tokio::spawn(async move {
            let resp = reqwest::get(&url).await.expect("request");
            assert_eq!(resp.status(), 200);
            let mut body = resp.bytes_stream();
            let first = body.next().await.expect("some bytes").expect("no error");
            assert!(!first.is_empty());
            // Dropping the stream closes the connection mid-body.
        })
    };
    let stayers = join_all((0..4).map(|_| stream_digest(&url, &[])));
    let (quit, stayed) = tokio::join!(quitter, stayers);
    quit.expect("the quitter ran");
    for s in stayed {
        assert_eq!(
            (s.error, s.digest, s.len),
            (None, layer.digest.clone(), layer.size())
        );
    }
    let stored = support::cache::blob_file(rig.cache.data(), &layer.digest);
    let bytes = std::fs::read(&stored).expect("the blob is stored");
    assert_eq!(support::images::sha256_digest(&bytes), layer.digest);
    rig.quiesce().await;
    rig.front.set_mode(Mode::Normal).await;
    let again = stream_digest(&url, &[]).await;
    assert_eq!(again.digest, layer.digest);
    let seen = rig.front.settled(Duration::from_millis(200)).await;
    assert!(seen.is_empty(), "the next pull is a hit: {seen:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_joiner_with_a_range_gets_its_bytes_from_the_flight() {
    let img = Image::big(54, 8 * 1024 * 1024);
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/late", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    rig.front
        .set_mode(Mode::Slow {
            rate: 2 * 1024 * 1024,
        })
        .await;
    let layer = img.layers().last().unwrap().clone();
    let url = format!("{}/v2/library/late/blobs/{}", rig.cache.url(), layer.digest);
    let first = reqwest::get(&url).await.expect("first request");
    let mut body = first.bytes_stream();
    let mut received = 0usize;
    while received < 1024 * 1024 {
        received += body.next().await.expect("bytes").expect("no error").len();
    }
    // The download is under way; a late client asks for a range past the start.
    let (start, end) = (3_000_000usize, 5_000_000usize);
    let range = format!("bytes={start}-{}", end - 1);
    let late = rig
        .request(
            Method::GET,
            &format!("/v2/library/late/blobs/{}", layer.digest),
            &[("range", &range)],
        )
        .await;
    assert_eq!(late.status, 206);
    assert_eq!(&late.body[..], &layer.bytes[start..end]);
    while let Some(chunk) = body.next().await {
        received += chunk.expect("no error").len();
    }
    assert_eq!(received as u64, layer.size());
    assert_eq!(rig.front.count("GET", &layer.digest), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lying_upstream_fails_every_reader_and_nothing_is_stored() {
    let img = Image::builder(55).layers(&[300_000]).build();
    let layer = img.layers()[0].clone();
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/liar", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    // The blob is redirected to a storage host that sends bytes of the right
    // length but the wrong content.
    let wrong = bytes::Bytes::from(vec![b'x'; layer.bytes.len()]);
    let liar = support::storage::StorageHost::start([(layer.digest.clone(), wrong)]).await;
    rig.front
        .set_mode(Mode::Directives(format!(
            "proxy_buffering off;\nif ($request_uri ~ \"/blobs/{}\") {{ return 307 {}$request_uri; }}",
            layer.digest,
            liar.url()
        )))
        .await;
    let url = format!("{}/v2/library/liar/blobs/{}", rig.cache.url(), layer.digest);
    let got = join_all((0..10).map(|_| stream_digest(&url, &[]))).await;
    for g in &got {
        let complete = g.status == 200 && g.error.is_none() && g.len == layer.size();
        assert!(!complete, "a reader got a body that looks complete: {g:?}");
        assert_ne!(
            g.digest,
            format!("sha256:{}", "x"),
            "never the wrong bytes in full"
        );
    }
    let stored = support::cache::blob_file(rig.cache.data(), &layer.digest);
    assert!(!stored.exists(), "nothing stored");
    let tmp: Vec<_> = std::fs::read_dir(rig.cache.data().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "temporary files removed: {tmp:?}");
    // Once upstream tells the truth, the next request starts a fresh flight and succeeds.
    rig.front.set_mode(Mode::Normal).await;
    let good = stream_digest(&url, &[]).await;
    assert_eq!(
        (good.status, good.error, good.digest),
        (200, None, layer.digest.clone())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_download_is_failed_not_left_hanging() {
    let upstream = support::storage::Stalling::start(1_000_000, 64 * 1024).await;
    let cache = support::cache::Cache::builder()
        .upstream("docker.io", &upstream.url())
        .upstream_option("idle_timeout", "\"1s\"")
        .prefetch(false)
        .start()
        .await;
    let digest = format!("sha256:{}", "5".repeat(64));
    let url = format!("{}/v2/library/stall/blobs/{digest}", cache.url());
    let got = tokio::time::timeout(Duration::from_secs(20), stream_digest(&url, &[]))
        .await
        .expect("the client is released, not left hanging");
    assert_eq!(
        got.status, 200,
        "headers went out as soon as upstream answered"
    );
    assert!(got.error.is_some(), "the body ends with an error: {got:?}");
    assert!(got.len < 1_000_000);
    let tmp: Vec<_> = std::fs::read_dir(cache.data().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "temporary file removed: {tmp:?}");
    assert!(upstream.requests() >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_bounds_what_runs_upstream_at_once() {
    for limit in [1usize, 3] {
        let upstream = support::storage::Stalling::start(1_000_000, 1024).await;
        let cache = support::cache::Cache::builder()
            .upstream("docker.io", &upstream.url())
            .upstream_option("idle_timeout", "\"1s\"")
            .upstream_option("max_connections", &limit.to_string())
            .prefetch(false)
            .start()
            .await;
        let urls: Vec<String> = (0..4)
            .map(|i| {
                format!(
                    "{}/v2/library/x/blobs/sha256:{}",
                    cache.url(),
                    i.to_string().repeat(64)
                )
            })
            .collect();
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            join_all(urls.iter().map(|u| stream_digest(u, &[]))),
        )
        .await
        .expect("every stalled download is failed in time");
        assert!(got.iter().all(|g| g.error.is_some()));
        assert_eq!(upstream.requests(), 4);
        assert_eq!(
            upstream.max_concurrent(),
            limit,
            "at most {limit} at once, and the limit was reached"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn serving_a_manifest_prefetches_what_the_client_asks_for_next() {
    let img = Image::single(56);
    let index = Image::builder(57).build_index(&["amd64", "arm64", "s390x"]);
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/pre", "1", img.clone())
            .image("library/pre", "multi", index.clone()),
    )
    .await;
    let m = rig
        .request(Method::GET, "/v2/library/pre/manifests/1", &[ALL])
        .await;
    assert_eq!(m.status, 200);
    let seen = rig.front.settled(Duration::from_millis(300)).await;
    for blob in img.own_blobs() {
        assert_eq!(
            rig.front.count("GET", &blob.digest),
            1,
            "{} prefetched: {seen:#?}",
            blob.digest
        );
    }
    rig.quiesce().await;
    for blob in img.own_blobs() {
        let path = format!("/v2/library/pre/blobs/{}", blob.digest);
        assert_eq!(rig.request(Method::GET, &path, &[]).await.body, blob.bytes);
    }
    let after = rig.front.settled(Duration::from_millis(200)).await;
    assert!(
        after.is_empty(),
        "the blobs came from the prefetch: {after:#?}"
    );
    // An index: the manifests of the configured platforms (amd64, arm64), not s390x.
    let i = rig
        .request(Method::GET, "/v2/library/pre/manifests/multi", &[ALL])
        .await;
    assert_eq!(i.status, 200);
    rig.front.settled(Duration::from_millis(300)).await;
    for (arch, expected) in [("amd64", 1), ("arm64", 1), ("s390x", 0)] {
        let child = index.child(arch).expect("child");
        assert_eq!(rig.front.count("GET", child.digest()), expected, "{arch}");
    }
}
