//! Real clients pull through the cache, configured as their users configure
//! them (README "Point clients at it"): skopeo straight from the cache,
//! containerd through a `hosts.toml` mirror (`?ns=docker.io`), Podman through a
//! `registries.conf` mirror. A second pull, by a fresh client with empty
//! storage, must be served entirely by the cache.

mod support;

use std::time::Duration;
use support::cache::Rig;
use support::clients::{skopeo_copy, Containerd, Podman};
use support::front::LogLine;
use support::images::Image;
use support::registry::Registry;

/// What reached upstream since the last `quiesce`, once background work has stopped.
async fn upstream_requests(rig: &Rig) -> Vec<LogLine> {
    rig.front.settled(Duration::from_millis(300)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn skopeo_copies_every_platform_through_the_cache_and_the_second_copy_stays_local() {
    let img = Image::multi_arch(21);
    let rig = Rig::start(Registry::anonymous().image("library/multi", "1", img.clone())).await;
    let src = format!("{}/library/multi:1", rig.cache.host());
    let first = tempfile::tempdir().unwrap();
    skopeo_copy(&src, first.path())
        .all()
        .await
        .unwrap_or_else(|e| panic!("first copy: {e}"));
    for blob in img.blobs() {
        let path = first
            .path()
            .join("blobs/sha256")
            .join(&blob.digest["sha256:".len()..]);
        assert_eq!(std::fs::read(&path).unwrap(), blob.bytes, "{}", blob.digest);
    }
    rig.quiesce().await;
    let second = tempfile::tempdir().unwrap();
    skopeo_copy(&src, second.path())
        .all()
        .await
        .unwrap_or_else(|e| panic!("second copy: {e}"));
    let seen = upstream_requests(&rig).await;
    assert!(
        seen.is_empty(),
        "the second copy reached upstream: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_a_hosts_toml_mirror_and_a_second_node_is_served_from_the_cache() {
    let img = Image::multi_arch(22);
    let big = Image::big(23, 64 * 1024 * 1024);
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/multi", "1", img.clone())
            .image("library/big", "1", big.clone()),
    )
    .await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    // ctr sends the short name; the cache adds `library/` for Docker Hub.
    for reference in ["docker.io/library/multi:1", "docker.io/big:1"] {
        node.pull(reference)
            .await
            .unwrap_or_else(|e| panic!("{reference}: {e}\n{}", node.log_tail()));
    }
    let held = node.images().await;
    assert!(
        held.iter().any(|i| i == "docker.io/library/multi:1"),
        "{held:?}"
    );
    let reached = upstream_requests(&rig).await;
    assert!(
        reached
            .iter()
            .any(|l| l.uri.ends_with(&big.layers()[0].digest)),
        "the big layer came from upstream through the cache: {reached:#?}"
    );
    rig.quiesce().await;

    let second = Containerd::start().await;
    second.mirror("docker.io", &rig.cache.url());
    for reference in ["docker.io/library/multi:1", "docker.io/library/big:1"] {
        second
            .pull(reference)
            .await
            .unwrap_or_else(|e| panic!("second node, {reference}: {e}\n{}", second.log_tail()));
    }
    let seen = upstream_requests(&rig).await;
    assert!(
        seen.is_empty(),
        "the second node's pull reached upstream: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_a_docker_manifest_list_for_another_platform() {
    let list = Image::docker_list(24);
    let rig = Rig::start(Registry::anonymous().image("library/listed", "1", list.clone())).await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    node.pull("docker.io/library/listed:1")
        .platform("linux/arm64")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail()));
    let arm = list.child("arm64").expect("an arm64 child");
    let reached = upstream_requests(&rig).await;
    assert!(
        reached.iter().any(|l| l.uri.ends_with(arm.digest())),
        "the arm64 manifest came through the cache: {reached:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_pulls_through_a_registries_conf_mirror_and_a_second_pull_stays_local() {
    let img = Image::docker(25);
    let multi = Image::multi_arch(26);
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/pod", "1", img.clone())
            .image("library/podmulti", "1", multi.clone()),
    )
    .await;
    let first = Podman::new();
    first.mirror("docker.io", &rig.cache.host());
    for reference in ["docker.io/library/podmulti:1", "docker.io/library/pod:1"] {
        first
            .pull(reference)
            .await
            .unwrap_or_else(|e| panic!("first pull of {reference}: {e}"));
    }
    let reached = upstream_requests(&rig).await;
    for blob in img.blobs() {
        assert!(
            reached.iter().any(|l| l.uri.ends_with(&blob.digest)),
            "{} came from upstream through the cache: {reached:#?}",
            blob.digest
        );
    }
    rig.quiesce().await;
    let second = Podman::new();
    second.mirror("docker.io", &rig.cache.host());
    for reference in ["docker.io/library/podmulti:1", "docker.io/library/pod:1"] {
        second
            .pull(reference)
            .await
            .unwrap_or_else(|e| panic!("second pull of {reference}: {e}"));
    }
    let seen = upstream_requests(&rig).await;
    assert!(
        seen.is_empty(),
        "the second pull reached upstream: {seen:#?}"
    );
}
