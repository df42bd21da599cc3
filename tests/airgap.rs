//! Air-gapped clusters: `seed` pulls image lists into a store, `export` writes
//! an OCI layout, `import` verifies and adds one, and `serve --offline` serves
//! it to real clients with no upstream at all.

mod support;

use std::path::Path;
use support::cache::{run_binary, CacheProcess};
use support::clients::{Containerd, Podman};
use support::front::Front;
use support::images::Image;
use support::registry::Registry;

/// A config with one upstream, `docker.io`, at `url`.
fn config(url: &str) -> String {
    format!(
        "default_upstream = \"docker.io\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{url}\"\nlibrary_prefix = true\n"
    )
}

/// Runs `pullthrough ARGS --config CONFIG --data DATA`, which must succeed; its stderr.
fn pullthrough(args: &[&str], config: &Path, data: &Path) -> String {
    let mut full: Vec<&str> = args.to_vec();
    let (config, data) = (config.to_str().unwrap(), data.to_str().unwrap());
    full.extend(["--config", config, "--data", data]);
    let done = run_binary(&full, &[]);
    assert!(done.success, "pullthrough {full:?}:\n{}", done.stderr);
    done.stderr
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
    let outside = dir.path().join("outside.toml");
    std::fs::write(&outside, config(&front.url())).unwrap();
    let seeded = dir.path().join("seeded");
    let images = ["multi:1", "docker.io/library/list:2", "team/single:3"];
    let mut seed = vec!["seed"];
    seed.extend(images);
    pullthrough(&seed, &outside, &seeded);
    let tar = dir.path().join("images.tar");
    let mut export = vec!["export", "--output", tar.to_str().unwrap()];
    export.extend(images);
    pullthrough(&export, &outside, &seeded);

    // Inside the gap: a fresh store, no upstream reachable at all.
    upstream.stop();
    let inside = dir.path().join("inside.toml");
    std::fs::write(&inside, config("http://127.0.0.1:9")).unwrap();
    let data = dir.path().join("inside");
    let out = pullthrough(&["import", tar.to_str().unwrap()], &inside, &data);
    assert!(out.contains("docker.io/library/multi:1"), "{out}");
    let cache = CacheProcess::start_with_args(
        &std::fs::read_to_string(&inside).unwrap(),
        &[],
        Some(&data),
        &["--offline"],
    )
    .await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &cache.url());
    for reference in [
        "docker.io/library/multi:1",
        "docker.io/library/list:2",
        "docker.io/team/single:3",
    ] {
        node.pull(reference)
            .await
            .unwrap_or_else(|e| panic!("{reference}: {e}\n{}", node.log_tail()));
    }
    let podman = Podman::new();
    podman.mirror("docker.io", &cache.host());
    podman
        .pull("docker.io/library/multi:1")
        .await
        .unwrap_or_else(|e| panic!("podman: {e}"));
}
