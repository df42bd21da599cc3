//! The pre-puller against a real containerd through its CRI `ImageService`:
//! containerd's CRI pulls go through `hosts.toml` to the cache under test,
//! which fronts the test upstream.

mod support;

use support::cache::{run_binary, Rig};
use support::clients::Containerd;
use support::images::Image;
use support::registry::Registry;

/// The images containerd's CRI namespace holds.
async fn cri_images(node: &Containerd) -> Vec<String> {
    let done = node
        .run(&["-n", "k8s.io", "images", "ls", "-q"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    done.stdout.lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prepull_pulls_what_is_missing_reports_what_fails_and_a_second_pass_pulls_nothing() {
    let (a, b, c) = (Image::single(81), Image::multi_arch(82), Image::docker(83));
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/a", "1", a)
            .image("team/b", "2", b)
            .image("library/c", "3", c),
    )
    .await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(
        &list,
        "# what the rollout needs\na:1\ndocker.io/team/b:2\nlibrary/c:3\ndocker.io/library/missing:9\n",
    )
    .unwrap();
    let socket = node.socket().to_str().unwrap().to_string();
    let args = [
        "prepull",
        "--once",
        "--cri-socket",
        &socket,
        "--file",
        list.to_str().unwrap(),
        "--retries",
        "1",
        "--backoff",
        "10ms",
    ];
    let first = run_binary(&args, &[]);
    assert!(!first.success, "a missing image fails the pass");
    assert!(
        first
            .stderr
            .contains("3 pulled, 0 already present, 1 failed")
            && first.stderr.contains("docker.io/library/missing:9"),
        "{}",
        first.stderr
    );
    let held = cri_images(&node).await;
    for name in [
        "docker.io/library/a:1",
        "docker.io/team/b:2",
        "docker.io/library/c:3",
    ] {
        assert!(held.iter().any(|h| h == name), "{name} not in {held:?}");
    }
    rig.quiesce().await;
    let second = run_binary(&args, &[]);
    assert!(
        second
            .stderr
            .contains("0 pulled, 3 already present, 1 failed"),
        "{}",
        second.stderr
    );
}
