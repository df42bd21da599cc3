//! `/metrics`: the exposition (parsed, not grepped) tells what the cache did,
//! against the real upstream and the fault front.

mod support;

use futures_util::future::join_all;
use reqwest::Method;
use std::time::Duration;
use support::cache::{stream_digest, Rig};
use support::exposition::Exposition;
use support::front::Mode;
use support::images::{media, Image};
use support::registry::Registry;

const ALL: (&str, &str) = ("accept", media::ACCEPT_ALL);

async fn scrape(rig: &Rig) -> Exposition {
    let r = rig.request(Method::GET, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap_or_default()
        .starts_with("text/plain"));
    Exposition::parse(&String::from_utf8_lossy(&r.body))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_exposition_counts_hits_misses_coalescing_and_stale_serves() {
    const N: usize = 8;
    let img = Image::builder(71).layers(&[2 * 1024 * 1024]).build();
    let layer = img.layers()[0].clone();
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/m", "1", img.clone()),
        |c| c.prefetch(false).tag_ttl("0s"),
    )
    .await;
    // A coalesced burst: N concurrent GETs of one cold blob.
    let url = format!("{}/v2/library/m/blobs/{}", rig.cache.url(), layer.digest);
    for got in join_all((0..N).map(|_| stream_digest(&url, &[]))).await {
        assert_eq!(got.digest, layer.digest);
    }
    let m = scrape(&rig).await;
    let blob = |outcome| {
        m.value(
            "pullthrough_cache_outcomes_total",
            &[("kind", "blob"), ("outcome", outcome)],
        )
    };
    assert_eq!(blob("miss"), 1.0);
    assert_eq!(blob("coalesced"), (N - 1) as f64);
    let blob_gets = m.value(
        "pullthrough_upstream_requests_total",
        &[
            ("upstream", "docker.io"),
            ("method", "GET"),
            ("status", "2xx"),
        ],
    );
    assert_eq!(blob_gets, 1.0, "one upstream GET for the burst");
    assert_eq!(
        m.value("pullthrough_served_bytes_total", &[("source", "flight")]),
        (N as u64 * layer.size()) as f64
    );
    assert_eq!(
        m.value("pullthrough_upstream_bytes_total", &[]),
        layer.size() as f64
    );
    // The download is observed just after it settles: wait for that.
    let m = support::wait_until(
        "the download to be observed",
        Duration::from_secs(10),
        || async {
            let m = scrape(&rig).await;
            (m.value("pullthrough_flight_readers_count", &[]) == 1.0).then_some(m)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.value("pullthrough_flight_readers_sum", &[]), N as f64);

    // A warm pull: a hit, served from the store.
    assert_eq!(stream_digest(&url, &[]).await.digest, layer.digest);
    let m = scrape(&rig).await;
    assert_eq!(
        m.value(
            "pullthrough_cache_outcomes_total",
            &[("kind", "blob"), ("outcome", "hit")]
        ),
        1.0
    );
    assert_eq!(
        m.value("pullthrough_served_bytes_total", &[("source", "store")]),
        layer.size() as f64
    );
    assert_eq!(
        m.value("pullthrough_store_files", &[]),
        1.0,
        "the one layer"
    );
    assert_eq!(m.value("pullthrough_store_bytes", &[]), layer.size() as f64);

    // A cold tag pull, then a stale serve while upstream answers 503.
    let path = "/v2/library/m/manifests/1";
    assert_eq!(rig.request(Method::GET, path, &[ALL]).await.status, 200);
    rig.front.set_mode(Mode::Status503).await;
    let stale = rig.request(Method::GET, path, &[ALL]).await;
    assert!(stale.header("warning").is_some());
    let m = scrape(&rig).await;
    assert_eq!(
        m.value(
            "pullthrough_stale_served_total",
            &[("upstream", "docker.io")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "pullthrough_cache_outcomes_total",
            &[("kind", "manifest"), ("outcome", "revalidated")]
        ),
        2.0
    );
    assert!(m.value("pullthrough_upstream_requests_total", &[("status", "5xx")]) >= 1.0);
    assert_eq!(
        m.value(
            "pullthrough_http_requests_total",
            &[("route", "manifest"), ("status", "2xx")]
        ),
        2.0
    );
    assert_eq!(
        m.value(
            "pullthrough_http_requests_total",
            &[("route", "blob"), ("status", "2xx")]
        ),
        (N + 1) as f64
    );
    assert!(m.has("pullthrough_upstream_circuit_state"));
    assert_eq!(m.value("pullthrough_flights_in_progress", &[]), 0.0);
    rig.front.settled(Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_headroom_and_circuit_state_are_exposed() {
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/r", "1", Image::single(72)),
        |c| {
            c.upstream_option("failures_to_open", "1")
                .upstream_option("retries", "0")
                .upstream_option("open_for", "\"10m\"")
        },
    )
    .await;
    rig.front
        .set_mode(Mode::Directives(
            "proxy_buffering off;\nadd_header ratelimit-limit \"100;w=21600\" always;\nadd_header ratelimit-remaining \"42;w=21600\" always;".into(),
        ))
        .await;
    assert_eq!(
        rig.request(Method::GET, "/v2/library/r/manifests/1", &[ALL])
            .await
            .status,
        200
    );
    let m = scrape(&rig).await;
    let up = [("upstream", "docker.io")];
    assert_eq!(m.value("pullthrough_upstream_ratelimit_limit", &up), 100.0);
    assert_eq!(
        m.value("pullthrough_upstream_ratelimit_remaining", &up),
        42.0
    );
    assert_eq!(
        m.value("pullthrough_upstream_circuit_state", &up),
        0.0,
        "closed"
    );
    rig.front.set_mode(Mode::Status503).await;
    // A keep-alive connection to an nginx worker from before the switch, slow
    // to exit on a loaded machine, may still answer the old way (404) once.
    let failed = support::wait_until(
        "upstream's 503 to reach the client",
        Duration::from_secs(15),
        || async {
            let r = rig
                .request(Method::GET, "/v2/library/r/manifests/other", &[ALL])
                .await;
            (r.status != 404).then_some(r.status)
        },
    )
    .await;
    assert_eq!(failed, Ok(503));
    let m = scrape(&rig).await;
    assert_eq!(
        m.value("pullthrough_upstream_circuit_state", &up),
        2.0,
        "open"
    );
    let text =
        String::from_utf8_lossy(&rig.request(Method::GET, "/metrics", &[]).await.body).to_string();
    assert!(!text.contains("library/"), "no repository names in labels");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_shows_downloads_in_flight_upstreams_and_most_pulled_without_secrets() {
    let img = Image::big(73, 8 * 1024 * 1024);
    let layer = img.layers().last().unwrap().clone();
    let mut rig = Rig::start_with(
        Registry::basic("pagen", "s3cret-pa55").image("library/page", "1", img.clone()),
        |c| c.prefetch(false).credentials("pagen", "s3cret-pa55"),
    )
    .await;
    assert_eq!(
        rig.request(Method::GET, "/v2/library/page/manifests/1", &[ALL])
            .await
            .status,
        200
    );
    rig.front.set_mode(Mode::Slow { rate: 1024 * 1024 }).await;
    // Two clients read one slow download.
    let url = format!("{}/v2/library/page/blobs/{}", rig.cache.url(), layer.digest);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { stream_digest(&url, &[]).await })
        })
        .collect();
    let page = support::wait_until(
        "the page to show the download",
        Duration::from_secs(20),
        || async {
            let r = rig.request(Method::GET, "/", &[]).await;
            let text = String::from_utf8_lossy(&r.body).to_string();
            (text.contains(&layer.digest) && text.contains("<td>2</td>")).then_some((r, text))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (response, text) = page;
    assert_eq!(
        response.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(text.contains("Downloads in progress (1)"), "{text}");
    assert!(
        text.contains("library/page"),
        "the repository and most pulled: {text}"
    );
    assert!(text.contains("docker.io"), "upstreams: {text}");
    assert!(
        !text.contains("s3cret") && !text.contains("pagen"),
        "no credentials: {text}"
    );
    assert!(
        !text.contains("<script") && !text.contains("<form"),
        "no JavaScript, nothing to act with"
    );
    for r in readers {
        assert_eq!(r.await.unwrap().digest, layer.digest);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn health_and_readiness_follow_the_process_and_the_store_not_upstream() {
    let disk = support::storage::Tmpfs::mount("16m");
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/h", "1", Image::single(74)),
        |c| c.data(&disk.path().join("data")),
    )
    .await;
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            rig.request(Method::GET, path, &[]).await.status,
            200,
            "{path}"
        );
    }
    rig.front.stop();
    assert_eq!(
        rig.request(Method::GET, "/readyz", &[]).await.status,
        200,
        "an upstream outage is not unreadiness"
    );
    // Fill the disk to the last byte: the store can no longer write.
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        while f.write_all(&[0u8]).is_ok() {}
    }
    assert_eq!(
        rig.request(Method::GET, "/readyz", &[]).await.status,
        503,
        "a store that cannot write is"
    );
    assert_eq!(rig.request(Method::GET, "/healthz", &[]).await.status, 200);
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(rig.request(Method::GET, "/readyz", &[]).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_request_logs_one_json_line_with_its_upstream_and_cache_outcome() {
    let img = Image::single(74);
    let layer = img.layers()[0].digest.clone();
    let upstream = Registry::anonymous()
        .image("library/logged", "1", img.clone())
        .start()
        .await;
    let config = format!(
        "default_upstream = \"docker.io\"\n[cache]\nprefetch = false\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\nlibrary_prefix = true\n",
        upstream.url()
    );
    let cache = support::cache::CacheProcess::start(&config, &[]).await;
    let url = format!("{}/v2/library/logged/blobs/{layer}", cache.url());
    for _ in 0..2 {
        assert_eq!(stream_digest(&url, &[]).await.digest, layer);
    }
    let lines = support::wait_until("two request lines", Duration::from_secs(10), || {
        let lines: Vec<serde_json::Value> = cache
            .log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["fields"]["message"] == "request")
            .filter(|v| {
                v["fields"]["uri"]
                    .as_str()
                    .is_some_and(|u| u.contains(&layer))
            })
            .collect();
        async move { (lines.len() == 2).then_some(lines) }
    })
    .await
    .expect("one line per request");
    let seen: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|v| {
            let f = &v["fields"];
            (
                f["upstream"].as_str().unwrap_or(""),
                f["cache"].as_str().unwrap_or(""),
                f["request_id"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        seen.iter().map(|s| (s.0, s.1)).collect::<Vec<_>>(),
        [("docker.io", "miss"), ("docker.io", "hit")],
        "{lines:#?}"
    );
    assert!(
        seen.iter().all(|s| !s.2.is_empty()),
        "a request id on each line"
    );
}
