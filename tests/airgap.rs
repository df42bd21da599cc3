//! Air-gapped clusters: `seed` pulls image lists into a store, `export` writes
//! an OCI layout, `import` verifies and adds one, and `serve --offline` serves
//! it to real clients with no upstream at all.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use support::cache::{blob_file, run_binary, stream_digest, CacheProcess};
use support::clients::{Containerd, Podman, CLIENT_TIMEOUT};
use support::front::{Front, LogLine};
use support::images::{sha256_digest, Image, RegistryClient};
use support::layout;
use support::registry::Registry;
use support::Finished;

/// A config with one upstream, `docker.io`, at `url`.
fn config(url: &str) -> String {
    format!(
        "default_upstream = \"docker.io\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{url}\"\nlibrary_prefix = true\n"
    )
}

/// The same, with `[cache] tag_ttl` set (e.g. `"0s"`).
fn config_with_ttl(url: &str, ttl: &str) -> String {
    format!("{}[cache]\ntag_ttl = {ttl:?}\n", config(url))
}

/// Where the air gap's inside is: an upstream nothing listens on.
const NOWHERE: &str = "http://127.0.0.1:9";

/// Runs `pullthrough ARGS --config CONFIG --data DATA` to completion.
fn pullthrough_run(args: &[&str], config: &Path, data: &Path) -> Finished {
    let mut full: Vec<&str> = args.to_vec();
    let (config, data) = (config.to_str().unwrap(), data.to_str().unwrap());
    full.extend(["--config", config, "--data", data]);
    run_binary(&full, &[])
}

/// Runs `pullthrough ARGS --config CONFIG --data DATA`, which must succeed; its stderr.
fn pullthrough(args: &[&str], config: &Path, data: &Path) -> String {
    let done = pullthrough_run(args, config, data);
    assert!(done.success, "pullthrough {args:?}:\n{}", done.stderr);
    done.stderr
}

/// Runs `pullthrough ARGS --config CONFIG --data DATA`, which must fail; its stderr.
fn pullthrough_fails(args: &[&str], config: &Path, data: &Path) -> String {
    let done = pullthrough_run(args, config, data);
    assert!(
        !done.success,
        "pullthrough {args:?} should have failed:\n{}",
        done.stderr
    );
    done.stderr
}

/// Writes `text` to `dir/name` and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The `seeded <image> (…)` lines of a seed's stderr: the images it reports as seeded.
fn seeded(stderr: &str) -> BTreeSet<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("seeded "))
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// Asserts the cache at `base` serves `repo:tag` as exactly `image`: the
/// manifest (by tag and by digest), the children named in `children`, and
/// every blob of those, each with the upstream's digest.
async fn assert_served(base: &str, repo: &str, tag: &str, image: &Image, children: &[&str]) {
    let client = RegistryClient::new(base, None);
    for reference in [tag, image.digest()] {
        let got = client.manifest(repo, reference).await.unwrap();
        assert_eq!(got.status, 200, "{repo}:{reference}");
        assert_eq!(
            sha256_digest(&got.body),
            image.digest(),
            "{repo}:{reference} body"
        );
        assert_eq!(
            got.header("docker-content-digest"),
            Some(image.digest()),
            "{repo}:{reference}"
        );
        assert_eq!(got.header("content-type"), Some(image.media_type()));
    }
    let mut manifests = vec![image];
    for arch in children {
        let child = image.child(arch).expect("a child for that architecture");
        let got = client.manifest(repo, child.digest()).await.unwrap();
        assert_eq!(got.status, 200, "{repo}@{} ({arch})", child.digest());
        assert_eq!(sha256_digest(&got.body), child.digest());
        manifests.push(child);
    }
    for blob in manifests.iter().flat_map(|m| m.own_blobs()) {
        let got = stream_digest(&format!("{base}/v2/{repo}/blobs/{}", blob.digest), &[]).await;
        assert_eq!(got.status, 200, "{repo} blob {}", blob.digest);
        assert_eq!(got.digest, blob.digest, "{repo} blob");
        assert_eq!(got.len, blob.size());
    }
}

/// Asserts the cache at `base` does not serve `repo`'s manifest `reference`: an OCI
/// error. Having nothing, a cache asks upstream, so it answers what that failure
/// maps to (`404` offline, `502` with the upstream gone).
async fn assert_not_served(base: &str, repo: &str, reference: &str) {
    let got = RegistryClient::new(base, None)
        .manifest(repo, reference)
        .await
        .unwrap();
    assert!(
        matches!(got.status, 404 | 502 | 503),
        "{repo}:{reference} answered {}: {:?}",
        got.status,
        got.body
    );
    let body: serde_json::Value = serde_json::from_slice(&got.body).unwrap();
    assert!(
        body["errors"][0]["code"].is_string(),
        "an OCI error: {body}"
    );
}

/// Runs a command with the client deadline; it must succeed.
async fn run_ok(command: Command) -> Finished {
    let shown = format!("{command:?}");
    let done = support::run_async(command, CLIENT_TIMEOUT).await.unwrap();
    assert!(done.success, "{shown}:\n{}\n{}", done.stderr, done.stdout);
    done
}

/// `skopeo --insecure-policy copy ARGS…`.
fn skopeo(args: &[&str]) -> Command {
    let mut command = Command::new("skopeo");
    command.args(["--insecure-policy", "copy"]).args(args);
    command
}

/// A fresh, offline cache serving the data directory `data`.
async fn offline_cache(data: &Path) -> CacheProcess {
    CacheProcess::start_with_args(&config(NOWHERE), &[], Some(data), &["--offline"]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn seed_export_import_and_serve_offline_to_containerd_and_podman() {
    let (multi, list, single) = (
        Image::multi_arch(71),
        Image::docker_list(72),
        Image::single(73),
    );
    let mut upstream = Registry::anonymous()
        .image("library/multi", "1", multi.clone())
        .image("library/list", "2", list.clone())
        .image("team/single", "3", single.clone())
        .start()
        .await;
    let front = Front::start(upstream.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let outside = write(dir.path(), "outside.toml", &config(&front.url()));
    let seeded = dir.path().join("seeded");
    let images = ["multi:1", "docker.io/library/list:2", "team/single:3"];
    let mut seed = vec!["seed"];
    seed.extend(images);
    pullthrough(&seed, &outside, &seeded);
    let tar = dir.path().join("images.tar");
    let mut export = vec!["export", "--output", tar.to_str().unwrap()];
    export.extend(images);
    pullthrough(&export, &outside, &seeded);

    // The tar is a layout naming each image by its full reference, for skopeo and containerd.
    let unpacked = dir.path().join("unpacked");
    layout::unpack(&tar, &unpacked);
    let index = layout::index(&unpacked);
    let mut named: Vec<(String, String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = m["annotations"][layout::REF_NAME].as_str().unwrap();
            let containerd = m["annotations"][layout::CONTAINERD_NAME].as_str().unwrap();
            assert_eq!(name, containerd);
            (
                name.to_string(),
                m["digest"].as_str().unwrap().to_string(),
                m["mediaType"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    named.sort();
    let want = |name: &str, image: &Image| {
        (
            name.to_string(),
            image.digest().to_string(),
            image.media_type().to_string(),
        )
    };
    assert_eq!(
        named,
        [
            want("docker.io/library/list:2", &list),
            want("docker.io/library/multi:1", &multi),
            want("docker.io/team/single:3", &single),
        ]
    );
    for image in [&multi, &list, &single] {
        assert_eq!(
            std::fs::read(layout::blob_path(&unpacked, image.digest())).unwrap(),
            image.manifest().to_vec(),
            "{} is exported byte for byte",
            image.digest()
        );
    }

    // Inside the gap: a fresh store, no upstream reachable at all.
    upstream.stop();
    let inside = write(dir.path(), "inside.toml", &config(NOWHERE));
    let data = dir.path().join("inside");
    let out = pullthrough(&["import", tar.to_str().unwrap()], &inside, &data);
    assert!(out.contains("docker.io/library/multi:1"), "{out}");
    let cache = offline_cache(&data).await;
    let base = cache.url();
    assert_served(&base, "library/multi", "1", &multi, &["amd64", "arm64"]).await;
    assert_served(&base, "library/list", "2", &list, &["amd64", "arm64"]).await;
    assert_served(&base, "team/single", "3", &single, &[]).await;

    let node = Containerd::start().await;
    node.mirror("docker.io", &cache.url());
    let pulled = [
        ("docker.io/library/multi:1", &multi),
        ("docker.io/library/list:2", &list),
        ("docker.io/team/single:3", &single),
    ];
    for (reference, _) in pulled {
        node.pull(reference)
            .await
            .unwrap_or_else(|e| panic!("{reference}: {e}\n{}", node.log_tail()));
    }
    // `ctr images ls`: REF TYPE DIGEST SIZE PLATFORMS LABELS.
    let listed = node.run(&["images", "ls"]).await.unwrap().stdout;
    for (reference, image) in pulled {
        let digest = listed
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .map(|cols| cols[2].to_string());
        assert_eq!(
            digest.as_deref(),
            Some(image.digest()),
            "containerd holds {reference} as the upstream's digest:\n{listed}"
        );
    }

    let podman = Podman::new();
    podman.mirror("docker.io", &cache.host());
    for (reference, image) in pulled {
        podman
            .pull(reference)
            .await
            .unwrap_or_else(|e| panic!("podman {reference}: {e}"));
        let inspected = podman
            .run(&[
                "image",
                "inspect",
                "--format",
                "{{json .RepoDigests}}",
                reference,
            ])
            .await
            .unwrap_or_else(|e| panic!("podman inspect {reference}: {e}"));
        let repo_digests: Vec<String> = serde_json::from_str(inspected.stdout.trim()).unwrap();
        let name = reference.rsplit_once(':').unwrap().0;
        let want = format!("{name}@{}", image.digest());
        assert!(
            repo_digests.contains(&want),
            "podman holds {reference} as {want}: {repo_digests:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_reads_our_export_and_its_own_layouts_import_and_serve_offline() {
    let (multi, x) = (Image::multi_arch(91), Image::single(92));
    let mut upstream = Registry::anonymous()
        .image("library/multi", "1", multi.clone())
        .image("library/x", "1", x.clone())
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let outside = write(dir.path(), "outside.toml", &config(&upstream.url()));

    // Our export, read by skopeo's oci-archive transport under the full reference.
    let tar = dir.path().join("export.tar");
    let args = ["export", "--output", tar.to_str().unwrap(), "multi:1"];
    pullthrough(&args, &outside, &dir.path().join("seeded"));
    let out = dir.path().join("from-archive");
    run_ok(skopeo(&[
        "--all",
        &format!("oci-archive:{}:docker.io/library/multi:1", tar.display()),
        &format!("dir:{}", out.display()),
    ]))
    .await;
    assert_eq!(
        std::fs::read(out.join("manifest.json")).unwrap(),
        multi.manifest().to_vec(),
        "skopeo read the index byte for byte"
    );
    for blob in multi.blobs() {
        let file = out.join(&blob.digest["sha256:".len()..]);
        assert_eq!(
            std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
            blob.bytes,
            "{}",
            blob.digest
        );
    }

    // skopeo's own layout (names without a registry), imported and served offline.
    let oci = dir.path().join("skopeo-layout");
    let from = |repo: &str| format!("docker://{}/{repo}", upstream.host());
    let to = |name: &str| format!("oci:{}:{name}", oci.display());
    run_ok(skopeo(&[
        "--src-tls-verify=false",
        &from("library/x:1"),
        &to("library/x:1"),
    ]))
    .await;
    run_ok(skopeo(&[
        "--all",
        "--src-tls-verify=false",
        &from("library/multi:1"),
        &to("library/multi2:1"),
    ]))
    .await;
    let mut names = layout::names(&oci);
    names.sort();
    assert_eq!(
        names,
        [
            ("library/multi2:1".to_string(), multi.digest().to_string()),
            ("library/x:1".to_string(), x.digest().to_string()),
        ]
    );
    upstream.stop();
    let inside = write(dir.path(), "inside.toml", &config(NOWHERE));
    let data = dir.path().join("inside");
    let report = pullthrough(
        &["import", oci.to_str().unwrap(), "--registry", "docker.io"],
        &inside,
        &data,
    );
    assert!(report.contains("docker.io/library/x:1"), "{report}");
    assert!(report.contains("docker.io/library/multi2:1"), "{report}");
    let cache = offline_cache(&data).await;
    assert_served(&cache.url(), "library/x", "1", &x, &[]).await;
    assert_served(
        &cache.url(),
        "library/multi2",
        "1",
        &multi,
        &["amd64", "arm64"],
    )
    .await;
    let pulled = dir.path().join("from-cache");
    run_ok(skopeo(&[
        "--src-tls-verify=false",
        &format!("docker://{}/library/x:1", cache.host()),
        &format!("dir:{}", pulled.display()),
    ]))
    .await;
    assert_eq!(
        std::fs::read(pulled.join("manifest.json")).unwrap(),
        x.manifest().to_vec()
    );
    for blob in x.blobs() {
        assert_eq!(
            std::fs::read(pulled.join(&blob.digest["sha256:".len()..])).unwrap(),
            blob.bytes,
            "{}",
            blob.digest
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tampered_layouts_are_rejected_and_leave_nothing_behind() {
    let (good, bad) = (
        Image::single(101),
        Image::builder(102).layers(&[8192, 4096]).build(),
    );
    let dir = tempfile::tempdir().unwrap();
    let good_dir = dir.path().join("good");
    layout::write(&good, "docker.io/library/good:1", &good_dir);
    let bad_dir = dir.path().join("bad");
    layout::write(&bad, "docker.io/team/bad:1", &bad_dir);
    let bad_tar = dir.path().join("bad.tar");
    layout::pack(&bad_dir, &bad_tar);
    let inside = write(dir.path(), "inside.toml", &config(NOWHERE));
    let data = dir.path().join("inside");
    pullthrough(&["import", good_dir.to_str().unwrap()], &inside, &data);
    let before = layout::files(&data.join("blobs"));
    assert_eq!(before.len(), 4, "the good image's four blobs: {before:#?}");

    let untouched = |what: &str| {
        assert_eq!(
            layout::files(&data.join("blobs")),
            before,
            "{what}: blobs/ changed"
        );
        let tmp: Vec<_> = std::fs::read_dir(data.join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "{what}: tmp/ holds {tmp:?}");
    };

    // A directory layout with one bit flipped in the last layer: named by its entry and digest.
    let layer = &bad.layers()[1].digest;
    let flipped = dir.path().join("flipped");
    layout::write(&bad, "docker.io/team/bad:1", &flipped);
    layout::flip_byte(&layout::blob_path(&flipped, layer), 100);
    let err = pullthrough_fails(&["import", flipped.to_str().unwrap()], &inside, &data);
    assert!(err.contains(layer), "names the layer {layer}: {err}");
    assert!(err.contains("does not match"), "{err}");
    untouched("flipped layer");

    // A tar whose manifest was edited (a layer digest's last hex digit), same size.
    let edited = dir.path().join("edited.tar");
    let manifest_entry = format!("blobs/sha256/{}", &bad.digest()["sha256:".len()..]);
    let mut found = false;
    layout::rewrite_tar(&bad_tar, &edited, |name, mut bytes| {
        if name == manifest_entry {
            let text = String::from_utf8(bytes).unwrap();
            let hex = &bad.layers()[0].digest;
            let other = format!(
                "{}{}",
                &hex[..hex.len() - 1],
                if hex.ends_with('0') { '1' } else { '0' }
            );
            assert!(text.contains(hex.as_str()));
            bytes = text.replace(hex.as_str(), &other).into_bytes();
            found = true;
        }
        bytes
    });
    assert!(
        found,
        "{manifest_entry} in {:#?}",
        layout::entries(&bad_tar)
    );
    let err = pullthrough_fails(&["import", edited.to_str().unwrap()], &inside, &data);
    assert!(
        err.contains(&manifest_entry),
        "names {manifest_entry}: {err}"
    );
    assert!(err.contains(bad.digest()), "names {}: {err}", bad.digest());
    untouched("edited manifest");

    // A tar cut off in the middle of its largest blob, as an interrupted copy leaves it.
    let entries = layout::entries(&bad_tar);
    let largest = entries.iter().max_by_key(|e| e.size).unwrap();
    let cut = dir.path().join("cut.tar");
    layout::truncate_copy(&bad_tar, &cut, largest.offset + largest.size / 2);
    let err = pullthrough_fails(&["import", cut.to_str().unwrap()], &inside, &data);
    assert!(err.contains("truncated"), "says truncated: {err}");
    assert!(err.contains(&largest.name), "names {}: {err}", largest.name);
    untouched("a tar cut mid-blob");

    // Cut between entries, just before index.json: nothing in the tar says it ended early.
    let index = entries.iter().find(|e| e.name == "index.json").unwrap();
    layout::truncate_copy(&bad_tar, &cut, index.offset - 512);
    let err = pullthrough_fails(&["import", cut.to_str().unwrap()], &inside, &data);
    assert!(err.contains("no index.json"), "{err}");
    untouched("truncated tar");

    // Served: the good image; not served: anything of the bad one.
    let cache = offline_cache(&data).await;
    assert_served(&cache.url(), "library/good", "1", &good, &[]).await;
    assert_not_served(&cache.url(), "team/bad", "1").await;
    assert_not_served(&cache.url(), "team/bad", bad.digest()).await;
    for blob in bad.blobs() {
        assert!(!blob_file(&data, &blob.digest).exists(), "{}", blob.digest);
        let got = stream_digest(
            &format!("{}/v2/team/bad/blobs/{}", cache.url(), blob.digest),
            &[],
        )
        .await;
        assert_ne!(got.status, 200, "{} is not served", blob.digest);
    }
}

/// Requests that fetched content rather than revalidating a tag: blobs, manifests by digest.
fn content_requests(log: &[LogLine]) -> Vec<&LogLine> {
    log.iter()
        .filter(|l| l.uri.contains("/blobs/") || (l.uri.contains("/manifests/sha256:")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn seeding_twice_transfers_nothing_the_second_time() {
    let (multi, list, single) = (
        Image::multi_arch(111),
        Image::docker_list(112),
        Image::single(113),
    );
    let upstream = Registry::anonymous()
        .image("library/multi", "1", multi.clone())
        .image("library/list", "2", list.clone())
        .image("team/single", "3", single.clone())
        .start()
        .await;
    let front = Front::start(upstream.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let images = ["seed", "multi:1", "list:2", "team/single:3"];
    let quiet = Duration::from_millis(300);

    // tag_ttl 0: every tag is revalidated (a HEAD), nothing else goes upstream.
    let revalidating = write(
        dir.path(),
        "ttl0.toml",
        &config_with_ttl(&front.url(), "0s"),
    );
    let first = pullthrough(&images, &revalidating, &data);
    assert_eq!(seeded(&first).len(), 3, "{first}");
    let log = front.settled(quiet).await;
    assert!(
        !content_requests(&log).is_empty(),
        "the first seed fetched: {log:#?}"
    );
    front.clear();
    let second = pullthrough(&images, &revalidating, &data);
    assert!(
        second.contains("3 images seeded, 0 failed; 0 blobs fetched"),
        "{second}"
    );
    let log = front.settled(quiet).await;
    assert!(
        content_requests(&log).is_empty(),
        "the second seed fetched content: {log:#?}"
    );
    let heads: Vec<&str> = log
        .iter()
        .filter(|l| l.method == "HEAD")
        .map(|l| l.uri.as_str())
        .collect();
    let mut heads_sorted = heads.clone();
    heads_sorted.sort();
    assert_eq!(
        heads_sorted,
        [
            "/v2/library/list/manifests/2",
            "/v2/library/multi/manifests/1",
            "/v2/team/single/manifests/3",
        ],
        "one HEAD per tag: {log:#?}"
    );
    assert!(
        log.iter().all(|l| l.method == "HEAD" || l.uri == "/v2/"),
        "only tag revalidations: {log:#?}"
    );

    // The default tag_ttl (5m): fresh tags are not even revalidated.
    front.clear();
    let fresh = write(dir.path(), "default.toml", &config(&front.url()));
    let third = pullthrough(&images, &fresh, &data);
    assert!(
        third.contains("3 images seeded, 0 failed; 0 blobs fetched"),
        "{third}"
    );
    let log = front.settled(quiet).await;
    assert!(
        log.is_empty(),
        "a seed within tag_ttl reached upstream: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn exporting_one_platform_keeps_the_index_and_leaves_the_others_out() {
    let (multi, list) = (Image::multi_arch(121), Image::docker_list(122));
    let mut upstream = Registry::anonymous()
        .image("library/multi", "1", multi.clone())
        .image("library/list", "2", list.clone())
        .start()
        .await;
    let dir = tempfile::tempdir().unwrap();
    let outside = write(dir.path(), "outside.toml", &config(&upstream.url()));
    let out = dir.path().join("arm64");
    let args = [
        "export",
        "--output",
        out.to_str().unwrap(),
        "--platform",
        "linux/arm64",
        "multi:1",
        "list:2",
    ];
    pullthrough(&args, &outside, &dir.path().join("seeded"));
    let mut names = layout::names(&out);
    names.sort();
    assert_eq!(
        names,
        [
            ("docker.io/library/list:2".into(), list.digest().into()),
            ("docker.io/library/multi:1".into(), multi.digest().into()),
        ]
    );
    for image in [&multi, &list] {
        assert_eq!(
            std::fs::read(layout::blob_path(&out, image.digest())).unwrap(),
            image.manifest().to_vec(),
            "the index keeps its bytes and digest"
        );
        let (arm, amd) = (image.child("arm64").unwrap(), image.child("amd64").unwrap());
        assert!(layout::has_blob(&out, arm.digest()), "arm64 manifest");
        for blob in arm.own_blobs() {
            assert!(
                layout::has_blob(&out, &blob.digest),
                "arm64 {}",
                blob.digest
            );
        }
        assert!(
            !layout::has_blob(&out, amd.digest()),
            "amd64 manifest left out"
        );
        for blob in amd.own_blobs() {
            assert!(
                !layout::has_blob(&out, &blob.digest),
                "amd64 {}",
                blob.digest
            );
        }
    }
    let expected = 2 * (1 + 1 + 3); // per image: index, arm64 manifest, config, 2 layers
    let held = layout::files(&out.join("blobs")).len();
    assert_eq!(held, expected, "nothing else in blobs/");

    upstream.stop();
    let inside = write(dir.path(), "inside.toml", &config(NOWHERE));
    let data = dir.path().join("inside");
    pullthrough(&["import", out.to_str().unwrap()], &inside, &data);
    let cache = offline_cache(&data).await;
    assert_served(&cache.url(), "library/multi", "1", &multi, &["arm64"]).await;
    assert_served(&cache.url(), "library/list", "2", &list, &["arm64"]).await;
    let amd = multi.child("amd64").unwrap();
    assert_not_served(&cache.url(), "library/multi", amd.digest()).await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &cache.url());
    node.pull("docker.io/library/list:2")
        .platform("linux/arm64")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail()));
}

#[tokio::test(flavor = "multi_thread")]
async fn seeding_from_kubernetes_yaml_takes_exactly_the_pods_images() {
    let names = ["web", "job", "init", "main", "unlisted"];
    let mut builder = Registry::anonymous();
    let images: Vec<Image> = (0..names.len() as u64)
        .map(|i| Image::single(130 + i))
        .collect();
    for (name, image) in names.iter().zip(&images) {
        builder = builder.image(&format!("library/{name}"), "1", image.clone());
    }
    builder = builder.image("team/side", "2", Image::docker(139));
    let upstream = builder.start().await;
    let front = Front::start(upstream.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = r#"# rendered by helm
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      containers:
        - name: web
          image: web:1
        - name: sidecar
          image: docker.io/team/side:2
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: job
              image: index.docker.io/library/job:1
---
apiVersion: v1
kind: Pod
metadata: {name: one}
spec:
  initContainers:
    - name: init
      image: docker.io/init:1
  containers:
    - name: main
      image: library/main:1
    - name: again
      image: web:1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"#;
    let file = write(dir.path(), "k8s.yaml", yaml);
    let outside = write(dir.path(), "outside.toml", &config(&front.url()));
    let data = dir.path().join("data");
    let out = pullthrough(&["seed", "--file", file.to_str().unwrap()], &outside, &data);
    let want: BTreeSet<String> = [
        "docker.io/library/web:1",
        "docker.io/team/side:2",
        "docker.io/library/job:1",
        "docker.io/library/init:1",
        "docker.io/library/main:1",
    ]
    .map(String::from)
    .into();
    assert_eq!(seeded(&out), want, "{out}");
    assert!(out.contains("5 images seeded, 0 failed"), "{out}");
    let log = front.settled(Duration::from_millis(300)).await;
    assert!(
        !log.iter().any(|l| l.uri.contains("unlisted")),
        "an image not in the YAML was fetched: {log:#?}"
    );

    let cache = offline_cache(&data).await;
    for (name, image) in names.iter().zip(&images) {
        if *name == "unlisted" {
            assert_not_served(&cache.url(), "library/unlisted", "1").await;
        } else {
            assert_served(&cache.url(), &format!("library/{name}"), "1", image, &[]).await;
        }
    }
    assert_served(&cache.url(), "team/side", "2", &Image::docker(139), &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_cache_seeds_and_imports_through_its_apis_and_keeps_its_data_dir() {
    let (multi, offline_only) = (Image::multi_arch(141), Image::single(142));
    let upstream = Registry::anonymous()
        .image("library/multi", "1", multi.clone())
        .start()
        .await;
    let mut front = Front::start(upstream.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let conf = write(dir.path(), "cache.toml", &config(&front.url()));
    let cache = CacheProcess::start_in(&config(&front.url()), &[], Some(&data)).await;

    // seed --server: through the running cache's registry API.
    let out = pullthrough(&["seed", "--server", &cache.url(), "multi:1"], &conf, &data);
    assert_eq!(
        seeded(&out),
        ["docker.io/library/multi:1".to_string()].into(),
        "{out}"
    );
    // Downloads commit as their last bytes go out; give that moment a bound.
    let digests: Vec<String> = multi.blobs().iter().map(|b| b.digest.clone()).collect();
    support::wait_until("seeded blobs in the store", support::READY_TIMEOUT, || {
        let all = digests.iter().all(|d| blob_file(&data, d).exists());
        async move { all.then_some(()) }
    })
    .await
    .unwrap();
    front.stop();
    assert_served(
        &cache.url(),
        "library/multi",
        "1",
        &multi,
        &["amd64", "arm64"],
    )
    .await;

    // import --server: a layout tar the upstream never had, through the admin listener.
    let layout_dir = dir.path().join("layout");
    layout::write(&offline_only, "docker.io/team/private:7", &layout_dir);
    let tar = dir.path().join("private.tar");
    layout::pack(&layout_dir, &tar);
    let args = [
        "import",
        tar.to_str().unwrap(),
        "--server",
        &cache.admin_url(),
    ];
    let out = pullthrough(&args, &conf, &data);
    assert!(out.contains("docker.io/team/private:7"), "{out}");
    assert_served(&cache.url(), "team/private", "7", &offline_only, &[]).await;

    // A tampered tar posted to the admin listener is refused with the reason, even
    // when the importer gives up on its first blob with megabytes still to come.
    let big = Image::builder(143).layers(&[16 << 20, 16 << 20]).build();
    let big_dir = dir.path().join("big");
    layout::write(&big, "docker.io/team/big:1", &big_dir);
    let big_tar = dir.path().join("big.tar");
    layout::pack(&big_dir, &big_tar);
    let first = layout::entries(&big_tar)
        .into_iter()
        .find(|e| e.name.starts_with("blobs/"))
        .unwrap();
    let edited = dir.path().join("edited.tar");
    layout::rewrite_tar(&big_tar, &edited, |name, mut bytes| {
        if name == first.name {
            bytes[10] ^= 1;
        }
        bytes
    });
    let args = [
        "import",
        edited.to_str().unwrap(),
        "--server",
        &cache.admin_url(),
    ];
    // Whether the client sees the answer or a broken pipe was a race when the
    // server stopped reading early: a few tries make a regression likely to show.
    for _ in 0..4 {
        let err = pullthrough_fails(&args, &conf, &data);
        assert!(err.contains(&first.name), "names {}: {err}", first.name);
        assert!(err.contains("does not match"), "{err}");
    }
    assert_not_served(&cache.url(), "team/big", "1").await;
    for blob in big.blobs() {
        assert!(!blob_file(&data, &blob.digest).exists(), "{}", blob.digest);
    }
    let tmp: Vec<_> = std::fs::read_dir(data.join("tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "the refused import left {tmp:?}");

    // Without --server, a second process on the data directory is refused at once.
    let in_use = format!(
        "data directory {} is in use by process {}",
        data.display(),
        cache.pid()
    );
    for args in [
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ][..],
        &["seed", "multi:1"][..],
        &["import", tar.to_str().unwrap()][..],
    ] {
        let started = Instant::now();
        let err = pullthrough_fails(args, &conf, &data);
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{args:?} took {:?}",
            started.elapsed()
        );
        assert!(
            err.contains(&in_use),
            "{args:?}: want {in_use:?} in:\n{err}"
        );
        assert!(err.contains("--server"), "{args:?} says how: {err}");
    }
    // And the running cache is unharmed.
    assert_served(&cache.url(), "team/private", "7", &offline_only, &[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_docker_save_archive_imports_under_its_full_names() {
    // What `docker save` writes since Docker 25: an OCI layout whose index names
    // each image twice (the full name for containerd, the tag alone in ref.name),
    // beside Docker's own manifest.json and repositories files.
    let img = Image::docker(121);
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved");
    layout::write(&img, "3.20", &saved);
    let mut index = layout::index(&saved);
    index["manifests"][0]["annotations"] = serde_json::json!({
        "io.containerd.image.name": "docker.io/library/saved:3.20",
        "org.opencontainers.image.ref.name": "3.20",
    });
    std::fs::write(
        saved.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let config_digest = &img.config().expect("a config").digest;
    let docker_manifest = serde_json::json!([{
        "Config": format!("blobs/sha256/{}", &config_digest["sha256:".len()..]),
        "RepoTags": ["saved:3.20"],
        "Layers": img.layers().iter()
            .map(|l| format!("blobs/sha256/{}", &l.digest["sha256:".len()..]))
            .collect::<Vec<_>>(),
    }]);
    std::fs::write(saved.join("manifest.json"), docker_manifest.to_string()).unwrap();
    std::fs::write(saved.join("repositories"), r#"{"saved":{"3.20":"x"}}"#).unwrap();
    let tar = dir.path().join("saved.tar");
    layout::pack(&saved, &tar);

    let inside = write(dir.path(), "inside.toml", &config(NOWHERE));
    let data = dir.path().join("data");
    // `--repository` is not needed: the full name is in the index.
    let out = pullthrough(&["import", tar.to_str().unwrap()], &inside, &data);
    assert!(out.contains("docker.io/library/saved:3.20"), "{out}");
    let cache = offline_cache(&data).await;
    assert_served(&cache.url(), "library/saved", "3.20", &img, &[]).await;
}
