//! Pulls keep working when upstream fails: stale tags, cached digests, the
//! circuit breaker, and a start with upstream unreachable. Faults come from
//! the nginx front (and small misbehaving servers it redirects to), in front of
//! a real Distribution upstream.

mod support;

use reqwest::Method;
use std::time::Duration;
use support::cache::{Cache, CacheBuilder, Rig};
use support::clients::{skopeo_copy, Containerd};
use support::front::Mode;
use support::images::{media, Image};
use support::registry::Registry;
use support::storage::{Cutting, Relay, Silent};

const ALL: (&str, &str) = ("accept", media::ACCEPT_ALL);
/// Failures that open the circuit, and attempts per request: the most upstream
/// can see of an outage before the circuit opens is their product.
const FAILURES_TO_OPEN: usize = 3;
const ATTEMPTS: usize = 2;

/// Every pull revalidates (ttl 0), timeouts are short, and the circuit, once
/// open, stays open for the whole test.
fn outage_policy(c: CacheBuilder) -> CacheBuilder {
    c.tag_ttl("0s")
        .upstream_option("idle_timeout", "\"1s\"")
        .upstream_option("retries", &(ATTEMPTS - 1).to_string())
        .upstream_option("retry_backoff", "\"50ms\"")
        .upstream_option("failures_to_open", &FAILURES_TO_OPEN.to_string())
        .upstream_option("open_for", "\"10m\"")
}

enum Fault {
    Status503,
    TooMany,
    /// Upstream accepts and never answers: past the timeout.
    Slow,
    /// Upstream cuts its answer off mid-body.
    Reset,
    /// Nothing listens: connection refused.
    Stopped,
}

/// Warms the cache with containerd and skopeo, breaks upstream with `fault`,
/// then pulls by tag and by digest through a fresh containerd and skopeo.
async fn pulls_survive(fault: Fault) {
    let img = Image::multi_arch(61);
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/app", "1", img.clone()),
        outage_policy,
    )
    .await;
    let warm = Containerd::start().await;
    warm.mirror("docker.io", &rig.cache.url());
    warm.pull("docker.io/library/app:1")
        .await
        .unwrap_or_else(|e| panic!("warming: {e}\n{}", warm.log_tail()));
    let src = format!("{}/library/app:1", rig.cache.host());
    let dir = tempfile::tempdir().unwrap();
    skopeo_copy(&src, &dir.path().join("warm"))
        .all()
        .await
        .unwrap_or_else(|e| panic!("warming: {e}"));
    rig.quiesce().await;

    let helpers = (Silent::start().await, Cutting::start().await);
    let redirect = |url: &str| Mode::Directives(format!("return 307 {url}$request_uri;"));
    match fault {
        Fault::Status503 => rig.front.set_mode(Mode::Status503).await,
        Fault::TooMany => rig.front.set_mode(Mode::TooMany { retry_after: 30 }).await,
        Fault::Slow => rig.front.set_mode(redirect(&helpers.0.url())).await,
        Fault::Reset => rig.front.set_mode(redirect(&helpers.1.url())).await,
        Fault::Stopped => rig.front.stop(),
    }

    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    let by_digest = format!("docker.io/library/app@{}", img.digest());
    for reference in ["docker.io/library/app:1", by_digest.as_str()] {
        node.pull(reference)
            .await
            .unwrap_or_else(|e| panic!("{reference} during the outage: {e}\n{}", node.log_tail()));
    }
    for (i, src) in [
        src.clone(),
        format!("{}/library/app@{}", rig.cache.host(), img.digest()),
    ]
    .iter()
    .enumerate()
    {
        skopeo_copy(src, &dir.path().join(format!("out{i}")))
            .all()
            .await
            .unwrap_or_else(|e| panic!("{src} during the outage: {e}"));
    }
    let tag = rig
        .request(Method::GET, "/v2/library/app/manifests/1", &[ALL])
        .await;
    assert_eq!(tag.status, 200);
    assert_eq!(tag.header("warning"), Some("110 - \"Response is Stale\""));

    let reached = if matches!(fault, Fault::Stopped) {
        Vec::new()
    } else {
        rig.front.settled(Duration::from_millis(300)).await
    };
    assert!(
        reached.len() <= FAILURES_TO_OPEN * ATTEMPTS,
        "the circuit bounds what reaches upstream: {reached:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_upstream_503() {
    pulls_survive(Fault::Status503).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_upstream_429() {
    pulls_survive(Fault::TooMany).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_an_upstream_that_never_answers() {
    pulls_survive(Fault::Slow).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_an_upstream_that_cuts_off_mid_body() {
    pulls_survive(Fault::Reset).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_survive_upstream_gone() {
    pulls_survive(Fault::Stopped).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn old_tags_are_revalidated_with_head_only_and_a_moved_tag_is_picked_up() {
    let first = Image::single(62);
    let second = Image::single(63);
    let rig = Rig::start_with(
        Registry::anonymous().image("library/rev", "1", first.clone()),
        |c| c.tag_ttl("0s").prefetch(false),
    )
    .await;
    let path = "/v2/library/rev/manifests/1";
    assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
    rig.quiesce().await;
    for _ in 0..20 {
        let r = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!(&r.body[..], &first.manifest()[..]);
    }
    let seen = rig.front.settled(Duration::from_millis(200)).await;
    assert_eq!(seen.len(), 20, "{seen:#?}");
    assert!(
        seen.iter().all(|l| l.method == "HEAD"),
        "HEADs, which Docker Hub does not count: {seen:#?}"
    );
    rig.upstream.push("library/rev", "1", &second).await;
    let r = rig.request(Method::GET, path, &[ALL]).await;
    assert_eq!(
        &r.body[..],
        &second.manifest()[..],
        "the moved tag is picked up"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cold_cache_during_an_outage_answers_with_the_documented_error_and_stops_asking() {
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/cold", "1", Image::single(64)),
        outage_policy,
    )
    .await;
    rig.front.set_mode(Mode::Status503).await;
    let path = "/v2/library/cold/manifests/1";
    let first = rig.request(Method::GET, path, &[ALL]).await;
    assert_eq!(first.status, 503);
    let body = String::from_utf8_lossy(&first.body);
    assert!(
        body.contains("UNAVAILABLE") && body.contains("docker.io"),
        "{body}"
    );
    for _ in 0..10 {
        let r = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!(r.status, 503);
    }
    let reached = rig.front.settled(Duration::from_millis(200)).await;
    assert_eq!(
        reached.len(),
        FAILURES_TO_OPEN,
        "after {FAILURES_TO_OPEN} failed requests (with their retries) the circuit is open: {reached:#?}"
    );
    let open = rig.request(Method::GET, path, &[ALL]).await;
    assert!(
        open.header("retry-after").is_some(),
        "an open circuit says when to come back"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cache_starts_with_upstream_unreachable_and_recovers_without_restart() {
    let img = Image::single(65);
    let other = Image::single(66);
    let upstream = Registry::anonymous()
        .image("library/kept", "1", img.clone())
        .image("library/later", "1", other.clone())
        .start()
        .await;
    let relay = Relay::start(upstream.addr()).await;
    let data = tempfile::tempdir().unwrap();
    let build = || {
        Cache::builder()
            .upstream("docker.io", &relay.url())
            .library_prefix()
            .tag_ttl("0s")
            .upstream_option("retries", "0")
            .upstream_option("failures_to_open", "2")
            .upstream_option("open_for", "\"1s\"")
            .data(data.path())
    };
    let get = |cache: &Cache, path: &str| {
        let url = format!("{}{path}", cache.url());
        async move { support::cache::raw_request(&url, Method::GET, &[ALL]).await }
    };
    {
        let first = build().start().await;
        assert_eq!(
            get(&first, "/v2/library/kept/manifests/1").await.status,
            200
        );
        for blob in img.own_blobs() {
            let b = get(&first, &format!("/v2/library/kept/blobs/{}", blob.digest)).await;
            assert_eq!(b.body, blob.bytes);
        }
    }
    relay.down().await;
    let cache = build().start().await;
    let kept = get(&cache, "/v2/library/kept/manifests/1").await;
    assert_eq!((kept.status, &kept.body[..]), (200, &img.manifest()[..]));
    assert!(kept.header("warning").is_some());
    for blob in img.own_blobs() {
        let b = get(&cache, &format!("/v2/library/kept/blobs/{}", blob.digest)).await;
        assert_eq!(
            b.body, blob.bytes,
            "cached blobs are served with upstream gone"
        );
    }
    assert_eq!(
        get(&cache, "/v2/library/later/manifests/1").await.status / 100,
        5
    );
    relay.up().await;
    // Once the circuit's probe goes through, the cache fetches again, no restart.
    let recovered = support::wait_until(
        "the cache to reach upstream again",
        Duration::from_secs(20),
        || {
            let cache = &cache;
            async move {
                let r = get(cache, "/v2/library/later/manifests/1").await;
                (r.status == 200).then_some(r)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&recovered.body[..], &other.manifest()[..]);
    let fresh = get(&cache, "/v2/library/kept/manifests/1").await;
    assert_eq!(fresh.header("warning"), None, "revalidated again");
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_never_contacts_upstream_and_serves_the_store() {
    let img = Image::single(67);
    let rig = Rig::start(Registry::anonymous().image("library/off", "1", img.clone())).await;
    let data = tempfile::tempdir().unwrap();
    let build = |offline: bool| {
        Cache::builder()
            .upstream("docker.io", &rig.front.url())
            .library_prefix()
            .tag_ttl("0s")
            .upstream_option("offline", &offline.to_string())
            .data(data.path())
    };
    {
        let online = build(false).start().await;
        let url = format!("{}/v2/library/off/manifests/1", online.url());
        assert_eq!(
            support::cache::raw_request(&url, Method::GET, &[ALL])
                .await
                .status,
            200
        );
    }
    rig.quiesce().await;
    let offline = build(true).start().await;
    let url = |p: &str| format!("{}{p}", offline.url());
    let r =
        support::cache::raw_request(&url("/v2/library/off/manifests/1"), Method::GET, &[ALL]).await;
    assert_eq!((r.status, &r.body[..]), (200, &img.manifest()[..]));
    let miss =
        support::cache::raw_request(&url("/v2/library/none/manifests/1"), Method::GET, &[ALL])
            .await;
    // Nothing will ever fetch it: unknown, not unavailable.
    assert_eq!(miss.status, 404);
    let body = String::from_utf8_lossy(&miss.body);
    assert!(
        body.contains("MANIFEST_UNKNOWN") && body.contains("offline"),
        "{body}"
    );
    let seen = rig.front.settled(Duration::from_millis(200)).await;
    assert!(seen.is_empty(), "offline never reaches upstream: {seen:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_low_rate_limit_budget_stretches_revalidation() {
    let img = Image::single(68);
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/budget", "1", img.clone()),
        |c| {
            c.tag_ttl("0s")
                .prefetch(false)
                .upstream_option("ratelimit_reserve", "10")
        },
    )
    .await;
    let path = "/v2/library/budget/manifests/1";
    // Plenty left: every pull of an expired tag revalidates (the first, cold, is a GET).
    rig.front
        .set_mode(Mode::Directives(
            "proxy_buffering off;\nadd_header ratelimit-limit \"100;w=21600\" always;\nadd_header ratelimit-remaining \"50;w=21600\" always;".into(),
        ))
        .await;
    for _ in 0..3 {
        assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
    }
    assert_eq!(
        rig.front.count("HEAD", path),
        2,
        "{:#?}",
        rig.front.requests()
    );
    // Docker Hub says 5 pulls are left in the window: the cache stops spending them on tags.
    rig.front
        .set_mode(Mode::Directives(
            "proxy_buffering off;\nadd_header ratelimit-limit \"100;w=21600\" always;\nadd_header ratelimit-remaining \"5;w=21600\" always;".into(),
        ))
        .await;
    assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
    rig.quiesce().await;
    for _ in 0..5 {
        let r = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!((r.status, &r.body[..]), (200, &img.manifest()[..]));
        assert!(
            r.header("warning").is_some(),
            "served unrevalidated, and says so"
        );
    }
    let seen = rig.front.settled(Duration::from_millis(200)).await;
    assert!(
        seen.is_empty(),
        "no HEADs while the budget is low: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_stale_and_serve_stale_on_not_found_bound_stale_serving() {
    let img = Image::single(69);
    let rig_with = |extra: &'static [(&'static str, &'static str)]| {
        let img = img.clone();
        async move {
            Rig::start_with(Registry::anonymous().image("library/s", "1", img), |c| {
                let mut c = c.tag_ttl("0s");
                for (k, v) in extra {
                    c = c.cache_option(k, v);
                }
                c
            })
            .await
        }
    };
    let path = "/v2/library/s/manifests/1";
    // max_stale: a tag older than it is not served while upstream fails.
    let mut rig = rig_with(&[("max_stale", "\"5s\"")]).await;
    assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
    rig.front.set_mode(Mode::Status503).await;
    assert_eq!(
        rig.request(Method::GET, path, &[ALL]).await.status,
        200,
        "young enough"
    );
    tokio::time::sleep(Duration::from_millis(6000)).await;
    assert_eq!(
        rig.request(Method::GET, path, &[ALL]).await.status,
        503,
        "too old"
    );
    // Upstream says 404 for a tag we hold: refused by default, served when configured.
    for (serve, expected) in [(false, 404), (true, 200)] {
        let extra: &'static [(&str, &str)] = if serve {
            &[("serve_stale_on_not_found", "true")]
        } else {
            &[]
        };
        let mut rig = rig_with(extra).await;
        assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
        rig.front.set_mode(Mode::Status(404)).await;
        let r = rig.request(Method::GET, path, &[ALL]).await;
        assert_eq!(r.status, expected, "serve_stale_on_not_found = {serve}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_cut_off_mid_way_open_the_circuit_too() {
    let upstream = Cutting::start().await;
    let cache = Cache::builder()
        .upstream("docker.io", &upstream.url())
        .library_prefix()
        .upstream_option("retries", "0")
        .upstream_option("failures_to_open", "3")
        .upstream_option("open_for", "\"10m\"")
        .start()
        .await;
    for i in 0..10 {
        let url = format!("{}/v2/library/cut/manifests/{i}", cache.url());
        let r = support::cache::raw_request(&url, Method::GET, &[ALL]).await;
        assert_eq!(r.status / 100, 5, "a cut answer is an upstream failure");
    }
    assert_eq!(
        upstream.requests(),
        3,
        "healthy headers followed by broken bodies count as failures"
    );
}
