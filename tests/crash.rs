//! The store survives crashes: the real binary is killed with SIGKILL in the
//! middle of a storm of concurrent pulls, several times, then restarted on the
//! same data directory. Every stored file must hash to its name, `tmp/` must be
//! empty, and every image must pull correctly. Also: `verify` and
//! `index rebuild` on a real store.

mod support;

use futures_util::future::join_all;
use std::path::Path;
use std::time::Duration;
use support::cache::{run_binary, stream_digest, CacheProcess};
use support::front::{Front, Mode};
use support::images::{media, sha256_digest, Image};
use support::registry::Registry;

fn config(upstream: &str) -> String {
    format!(
        "default_upstream = \"docker.io\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{upstream}\"\nlibrary_prefix = true\n"
    )
}

/// Every file under `blobs/` hashes to its name; returns how many there are.
fn check_every_blob(data: &Path) -> usize {
    let mut count = 0;
    let root = data.join("blobs/sha256");
    let Ok(prefixes) = std::fs::read_dir(&root) else {
        return 0;
    };
    for prefix in prefixes {
        for file in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let path = file.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().to_string();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(
                sha256_digest(&bytes),
                format!("sha256:{name}"),
                "{}",
                path.display()
            );
            count += 1;
        }
    }
    count
}

/// Pulls every image (manifest by tag, then every blob), checking each digest.
async fn pull_all(url: &str, images: &[(&str, Image)]) -> Result<(), String> {
    let pulls = images.iter().map(|(repo, img)| async move {
        let m = support::cache::raw_request(
            &format!("{url}/v2/{repo}/manifests/1"),
            reqwest::Method::GET,
            &[("accept", media::ACCEPT_ALL)],
        )
        .await;
        if m.status != 200 || m.body != img.manifest().clone() {
            return Err(format!("{repo}: manifest {}", m.status));
        }
        for blob in img.own_blobs() {
            let got = stream_digest(&format!("{url}/v2/{repo}/blobs/{}", blob.digest), &[]).await;
            if got.error.is_some() || got.digest != blob.digest {
                return Err(format!("{repo}: {} {got:?}", blob.digest));
            }
        }
        Ok(())
    });
    join_all(pulls).await.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_a_storm_never_leaves_a_wrong_byte() {
    crash_rounds(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_during_downloads_and_eviction_never_leaves_a_wrong_byte() {
    // A 16 MiB cap under ~23 MiB of images: eviction runs throughout the storms.
    crash_rounds(Some("16MiB")).await;
}

async fn crash_rounds(cap: Option<&str>) {
    let images: Vec<(&str, Image)> = vec![
        (
            "library/a",
            Image::builder(81).layers(&[3_000_000, 1_000_000]).build(),
        ),
        ("library/b", Image::builder(82).layers(&[6_000_000]).build()),
        ("library/c", Image::big(83, 12 * 1024 * 1024)),
    ];
    let mut builder = Registry::anonymous();
    for (repo, img) in &images {
        builder = builder.image(repo, "1", img.clone());
    }
    let upstream = builder.start().await;
    let mut front = Front::start(upstream.addr()).await;
    // Slow bodies, so that downloads are in flight when the kill comes.
    front
        .set_mode(Mode::Slow {
            rate: 4 * 1024 * 1024,
        })
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut config = config(&front.url());
    if let Some(cap) = cap {
        config += &format!("[storage]\nmax_size = \"{cap}\"\n");
    }
    // Kill points at random over the downloads; the seed is printed (and can be
    // set with PULLTHROUGH_CRASH_SEED) so that a failure replays.
    let seed: u64 = std::env::var("PULLTHROUGH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("crash seed: {seed} (PULLTHROUGH_CRASH_SEED={seed} replays it)");
    let mut x = seed | 1;
    let delays: Vec<u64> = (0..4)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            100 + x % 2400
        })
        .collect();
    for (round, delay_ms) in delays.into_iter().enumerate() {
        let mut cache = CacheProcess::start_in(&config, &[], Some(data.path())).await;
        let url = cache.url();
        let storm = tokio::spawn({
            let images = images.clone();
            async move {
                let storms = (0..4).map(|_| pull_all(&url, &images));
                join_all(storms).await
            }
        });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cache.kill();
        let _ = storm.await;
        let files = check_every_blob(data.path());
        eprintln!("round {round}: killed after {delay_ms} ms with {files} files stored");
    }
    front.set_mode(Mode::Normal).await;
    let cache = CacheProcess::start_in(&config, &[], Some(data.path())).await;
    let tmp: Vec<_> = std::fs::read_dir(data.path().join("tmp"))
        .unwrap()
        .collect();
    assert!(tmp.is_empty(), "tmp/ emptied at start: {tmp:?}");
    pull_all(&cache.url(), &images)
        .await
        .unwrap_or_else(|e| panic!("after the crashes: {e}\n{}", cache.log()));
    let files = check_every_blob(data.path());
    let expected: usize = images.iter().map(|(_, i)| i.own_blobs().len() + 1).sum();
    if cap.is_none() {
        assert_eq!(files, expected, "every blob and manifest stored once");
    } else {
        assert!(files > 0 && files <= expected, "{files} files");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_index_does_not_keep_the_cache_from_serving_what_it_has() {
    let img = Image::builder(89).layers(&[500_000, 700_000]).build();
    let upstream = Registry::anonymous()
        .image("library/i", "1", img.clone())
        .start()
        .await;
    let front = Front::start(upstream.addr()).await;
    let data = tempfile::tempdir().unwrap();
    let config = config(&front.url());
    let mut cache = CacheProcess::start_in(&config, &[], Some(data.path())).await;
    pull_all(&cache.url(), &[("library/i", img.clone())])
        .await
        .unwrap();
    cache.terminate();
    std::fs::remove_dir_all(data.path().join("index")).unwrap();
    front.settled(Duration::from_millis(200)).await;
    front.clear();
    let cache = CacheProcess::start_in(&config, &[], Some(data.path())).await;
    pull_all(&cache.url(), &[("library/i", img.clone())])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cache.log()));
    let seen = front.settled(Duration::from_millis(200)).await;
    for blob in img.own_blobs() {
        assert_eq!(
            front.count("GET", &blob.digest),
            0,
            "{} served from the files, not downloaded again: {seen:#?}",
            blob.digest
        );
    }
    assert_eq!(
        check_every_blob(data.path()),
        img.own_blobs().len() + 1,
        "no file lost"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_and_index_rebuild_on_a_real_store() {
    let img = Image::single(84);
    let upstream = Registry::anonymous()
        .image("library/v", "1", img.clone())
        .start()
        .await;
    let data = tempfile::tempdir().unwrap();
    let config = config(&upstream.url());
    let mut cache = CacheProcess::start_in(&config, &[], Some(data.path())).await;
    pull_all(&cache.url(), &[("library/v", img.clone())])
        .await
        .unwrap();
    let exit = cache.terminate();
    assert!(exit.contains("exit status: 0"), "{exit}");
    let dir = data.path().to_string_lossy().to_string();

    let ok = run_binary(&["verify", "--data", &dir], &[]);
    assert!(ok.success, "{}", ok.stderr);
    assert!(ok.stderr.contains("0 mismatching"), "{}", ok.stderr);

    let layer = &img.layers()[0];
    let path = support::cache::blob_file(data.path(), &layer.digest);
    std::fs::write(&path, b"flipped bits").unwrap();
    let bad = run_binary(&["verify", "--data", &dir], &[]);
    assert!(!bad.success);
    assert!(
        bad.stderr.contains("1 mismatching") && bad.stderr.contains(&layer.digest[7..]),
        "{}",
        bad.stderr
    );
    let repaired = run_binary(&["verify", "--data", &dir, "--repair"], &[]);
    assert!(repaired.success, "{}", repaired.stderr);
    assert!(!path.exists(), "quarantined");

    let rebuilt = run_binary(&["index", "rebuild", "--data", &dir], &[]);
    assert!(rebuilt.success, "{}", rebuilt.stderr);
    assert!(
        rebuilt.stderr.contains("1 manifests indexed"),
        "{}",
        rebuilt.stderr
    );
    // The rebuilt store serves again: the quarantined layer is fetched anew.
    let mut cache = CacheProcess::start_in(&config, &[], Some(data.path())).await;
    pull_all(&cache.url(), &[("library/v", img.clone())])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cache.log()));
    assert_eq!(std::fs::read(&path).unwrap(), layer.bytes.to_vec());
    cache.terminate();

    // gc evicts down to the low watermark of the configured cap (here: everything).
    let gc = run_binary(
        &["gc", "--data", &dir],
        &[("PULLTHROUGH_STORAGE__MAX_SIZE", "1KiB")],
    );
    assert!(gc.success, "{}", gc.stderr);
    assert!(gc.stderr.contains(", 0 after; evicted"), "{}", gc.stderr);
    assert!(!path.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_capped_store_evicts_the_least_recently_used_image() {
    let image = |seed| Image::builder(seed).layers(&[5 * 1024 * 1024]).build();
    let (a, b, c) = (image(85), image(86), image(87));
    let upstream = Registry::anonymous()
        .image("library/a", "1", a.clone())
        .image("library/b", "1", b.clone())
        .image("library/c", "1", c.clone())
        .start()
        .await;
    // 16 MiB cap: eviction past 14.4 MiB, down to 11.2 MiB. Each image is ~5 MiB.
    let cache = support::cache::Cache::builder()
        .upstream("docker.io", &upstream.url())
        .library_prefix()
        .prefetch(false)
        .storage_option("max_size", "\"16MiB\"")
        .storage_option("high_watermark", "0.9")
        .storage_option("low_watermark", "0.7")
        .start()
        .await;
    let url = cache.url();
    pull_all(&url, &[("library/a", a.clone())]).await.unwrap();
    pull_all(&url, &[("library/b", b.clone())]).await.unwrap();
    // A is pulled again: B is now the least recently used.
    pull_all(&url, &[("library/a", a.clone())]).await.unwrap();
    pull_all(&url, &[("library/c", c.clone())]).await.unwrap();
    let stored = |img: &Image| {
        img.own_blobs()
            .iter()
            .all(|b| support::cache::blob_file(cache.data(), &b.digest).exists())
    };
    let low = 0.7 * 16.0 * 1024.0 * 1024.0;
    let scrape = || {
        let url = format!("{url}/metrics");
        async move {
            let m = support::cache::raw_request(&url, reqwest::Method::GET, &[]).await;
            support::exposition::Exposition::parse(&String::from_utf8_lossy(&m.body))
        }
    };
    let m = support::wait_until(
        "eviction to reach the low watermark",
        Duration::from_secs(20),
        || async {
            let m = scrape().await;
            (m.value("pullthrough_store_bytes", &[]) <= low).then_some(m)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!stored(&b), "B, the least recently used, was evicted");
    assert!(
        stored(&a) && stored(&c),
        "A (used again) and C (just pulled) stay"
    );
    assert_eq!(
        m.value("pullthrough_store_max_bytes", &[]),
        16.0 * 1024.0 * 1024.0
    );
    assert!(m.value("pullthrough_store_evicted_files", &[]) >= 2.0);
    // An evicted image is fetched again on demand.
    pull_all(&url, &[("library/b", b.clone())]).await.unwrap();
}

/// A cache (prefetch off) on a fresh 8 MiB tmpfs, with `upstream` as docker.io.
async fn on_a_small_disk(
    upstream: &str,
) -> (
    support::storage::Tmpfs,
    std::path::PathBuf,
    support::cache::Cache,
) {
    let disk = support::storage::Tmpfs::mount("8m");
    let data = disk.path().join("data");
    let cache = support::cache::Cache::builder()
        .upstream("docker.io", upstream)
        .library_prefix()
        .prefetch(false)
        .data(&data)
        .start()
        .await;
    (disk, data, cache)
}

/// Pulls `url` again and waits for the blob to land at `stored`.
async fn cached_once_there_is_room(url: &str, digest: &str, stored: &Path) {
    let again = stream_digest(url, &[]).await;
    assert_eq!(again.digest, digest);
    let landed = support::wait_until("the blob to be stored", Duration::from_secs(10), || {
        let there = stored.exists();
        async move { there.then_some(()) }
    })
    .await;
    assert!(landed.is_ok(), "cached once there is room");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_serves_without_caching_and_recovers_when_space_returns() {
    let img = Image::big(88, 12 * 1024 * 1024);
    let layer = img.layers().last().unwrap().clone();
    let upstream = Registry::anonymous()
        .image("library/full", "1", img.clone())
        .start()
        .await;
    let (disk, data, cache) = on_a_small_disk(&upstream.url()).await;
    let stored = support::cache::blob_file(&data, &layer.digest);
    let url = format!("{}/v2/library/full/blobs/{}", cache.url(), layer.digest);
    // The 12 MiB layer cannot fit on the 8 MiB disk: the client still gets it, whole and right.
    let got = stream_digest(&url, &[]).await;
    assert_eq!((got.status, got.error.as_deref()), (200, None));
    assert_eq!(
        (got.digest.as_str(), got.len),
        (layer.digest.as_str(), layer.size())
    );
    assert!(!stored.exists(), "nothing kept");
    let tmp: Vec<_> = std::fs::read_dir(data.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "no partial file left: {tmp:?}");
    // Small things still cache.
    let m = support::cache::raw_request(
        &format!("{}/v2/library/full/manifests/1", cache.url()),
        reqwest::Method::GET,
        &[("accept", media::ACCEPT_ALL)],
    )
    .await;
    assert_eq!(m.status, 200);
    // Space returns: the next pull caches it.
    disk.resize("64m");
    cached_once_there_is_room(&url, &layer.digest, &stored).await;
    assert_eq!(
        sha256_digest(&std::fs::read(&stored).unwrap()),
        layer.digest
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_mid_download_still_completes_every_pull_from_upstream() {
    let img = Image::big(89, 5 * 1024 * 1024);
    let layer = img.layers().last().unwrap().clone();
    let upstream = Registry::anonymous()
        .image("library/filling", "1", img.clone())
        .start()
        .await;
    let mut front = Front::start(upstream.addr()).await;
    front.set_mode(Mode::Slow { rate: 1024 * 1024 }).await;
    let (disk, data, cache) = on_a_small_disk(&front.url()).await;
    let url = format!("{}/v2/library/filling/blobs/{}", cache.url(), layer.digest);
    // Two clients on one download: the leader's and a coalesced one.
    let first = tokio::spawn({
        let url = url.clone();
        async move { stream_digest(&url, &[]).await }
    });
    let tmp = data.join("tmp");
    let partial = support::wait_until("a partial download", Duration::from_secs(20), || {
        let landed = std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.metadata().is_ok_and(|m| m.len() >= 512 * 1024));
        async move { landed.then_some(()) }
    })
    .await;
    assert!(partial.is_ok(), "the download started");
    let second = tokio::spawn({
        let url = url.clone();
        async move { stream_digest(&url, &[]).await }
    });
    // Now the disk fills up under the download.
    let filler = disk.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
    }
    for got in [first.await.unwrap(), second.await.unwrap()] {
        assert_eq!((got.status, got.error.as_deref()), (200, None));
        assert_eq!(
            (got.digest.as_str(), got.len),
            (layer.digest.as_str(), layer.size()),
            "whole and right, finished from upstream"
        );
    }
    let stored = support::cache::blob_file(&data, &layer.digest);
    assert!(!stored.exists(), "nothing kept");
    let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "no partial file left: {left:?}");
    let ranged = front
        .requests()
        .into_iter()
        .filter(|l| l.method == "GET" && l.uri.contains(&layer.digest))
        .count();
    assert!(
        ranged >= 2,
        "readers resumed from upstream: {ranged} blob GETs"
    );
    // Space returns: the next pull caches it.
    std::fs::remove_file(&filler).unwrap();
    front.set_mode(Mode::Normal).await;
    cached_once_there_is_room(&url, &layer.digest, &stored).await;
}
