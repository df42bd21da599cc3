//! The pre-puller against a real containerd through its CRI `ImageService`:
//! containerd's CRI pulls go through `hosts.toml` to the cache under test,
//! which fronts the test upstream. What reached upstream, and when, is read from
//! the nginx front's access log; what a node holds, from `ctr -n k8s.io images ls`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::cache::{run_binary, Rig};
use support::clients::Containerd;
use support::front::{LogLine, Mode};
use support::images::Image;
use support::registry::Registry;
use support::{Child, Finished};

/// How long one `prepull --once` may take before the test fails.
const PASS_TIMEOUT: Duration = Duration::from_secs(90);

/// `pullthrough prepull --once --cri-socket SOCK --file LIST EXTRA…`, run on a blocking
/// thread so that the in-process cache keeps serving (and several nodes can run at once).
async fn prepull_once(node: &Containerd, list: &Path, extra: &[&str]) -> Finished {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pullthrough"));
    command
        .args(["prepull", "--once", "--cri-socket"])
        .arg(node.socket())
        .arg("--file")
        .arg(list)
        .args(extra);
    support::run_async(command, PASS_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

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

/// The repository a registry request is for: `/v2/<repo>/manifests/…` or `/v2/<repo>/blobs/…`.
fn repository(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("/v2/")?;
    let end = rest.find("/manifests/").or_else(|| rest.find("/blobs/"))?;
    Some(&rest[..end])
}

/// The digest a `GET …/blobs/<digest>` fetched, if it is one.
fn blob_get(line: &LogLine) -> Option<&str> {
    if line.method != "GET" {
        return None;
    }
    let (_, digest) = line.uri.split_once("/blobs/")?;
    Some(digest.split('?').next().unwrap_or(digest))
}

/// When each repository was being fetched upstream: from the start of its first request
/// to the end of its last, in Unix milliseconds, from the front's access log.
fn busy_intervals(lines: &[LogLine]) -> BTreeMap<String, (u64, u64)> {
    let mut busy: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for line in lines {
        let Some(repo) = repository(&line.uri) else {
            continue;
        };
        let (Some(start), Some(end)) = (line.started_ms(), line.finished_ms) else {
            panic!("the front's log line has no timing: {line:?}");
        };
        let span = busy.entry(repo.to_string()).or_insert((start, end));
        span.0 = span.0.min(start);
        span.1 = span.1.max(end);
    }
    busy
}

/// The most intervals that were open at one instant. Each is first narrowed by 100 ms
/// at both ends, so that one ending as the next begins is not counted as an overlap:
/// nginx logs a request (its `$msec`) a little after its last byte went out, tens of
/// milliseconds later on a loaded machine (31 ms was seen in CI); real overlaps here
/// last about a second.
fn most_at_once(busy: &BTreeMap<String, (u64, u64)>) -> usize {
    const SLACK_MS: u64 = 100;
    let narrowed: Vec<(u64, u64)> = busy
        .values()
        .map(|&(start, end)| (start + SLACK_MS, end.saturating_sub(SLACK_MS)))
        .filter(|(start, end)| start < end)
        .collect();
    narrowed
        .iter()
        .map(|&(at, _)| {
            narrowed
                .iter()
                .filter(|&&(start, end)| start <= at && at < end)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Writes `text` as the image list the way a ConfigMap update does: a new file renamed over.
fn replace_list(list: &Path, text: &str) {
    let next = list.with_extension("next");
    std::fs::write(&next, text).unwrap();
    std::fs::rename(&next, list).unwrap();
}

/// Prepulls `slow{i}:1` for each `i` with `--concurrency concurrency` and returns the most
/// repositories upstream saw being fetched at once, with their busy intervals.
async fn observe(
    rig: &Rig,
    node: &Containerd,
    dir: &Path,
    images: std::ops::Range<u64>,
    concurrency: &str,
) -> (usize, BTreeMap<String, (u64, u64)>) {
    let list = dir.join(format!("images-{concurrency}.txt"));
    let names: Vec<String> = images.map(|i| format!("slow{i}:1\n")).collect();
    std::fs::write(&list, names.concat()).unwrap();
    rig.quiesce().await;
    let done = prepull_once(node, &list, &["--concurrency", concurrency]).await;
    assert!(
        done.success
            && done
                .stderr
                .contains("6 pulled, 0 already present, 0 failed"),
        "{}",
        done.stderr
    );
    let busy = busy_intervals(&rig.front.settled(Duration::from_millis(300)).await);
    assert_eq!(busy.len(), 6, "every image reached upstream: {busy:?}");
    (most_at_once(&busy), busy)
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_bounds_the_pulls_in_flight_as_upstream_sees_them() {
    // Prefetch off: every upstream request is then one containerd made during its pull,
    // so a repository's upstream activity lies inside the pull of that image.
    let mut upstream = Registry::anonymous();
    for i in 0..12u64 {
        upstream = upstream.image(&format!("library/slow{i}"), "1", Image::single(200 + i));
    }
    let mut rig = Rig::start_with(upstream, |c| c.prefetch(false)).await;
    // About 20 KiB of blobs per image at 16 KiB/s per connection: each pull lasts a second
    // or more at the front, long enough that pulls allowed to overlap visibly do.
    rig.front.set_mode(Mode::Slow { rate: 16 * 1024 }).await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    let dir = tempfile::tempdir().unwrap();

    let (bounded, busy) = observe(&rig, &node, dir.path(), 0..6, "2").await;
    assert_eq!(
        bounded, 2,
        "--concurrency 2: at most 2 pulls at once, and 2 did overlap: {busy:?}"
    );
    // The same observation sees a wider bound, so it would have caught a broken one.
    let (wider, busy) = observe(&rig, &node, dir.path(), 6..12, "4").await;
    assert!(
        (3..=4).contains(&wider),
        "--concurrency 4: {wider} pulls at once: {busy:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_prepulling_at_once_through_one_cache_fetch_each_blob_upstream_once() {
    let (a, b, c) = (Image::single(91), Image::multi_arch(92), Image::docker(93));
    // The cache as configured by default: prefetch on, for linux/amd64 and linux/arm64.
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/a", "1", a.clone())
            .image("team/b", "2", b.clone())
            .image("library/c", "3", c.clone()),
    )
    .await;
    let (n1, n2, n3) = tokio::join!(
        Containerd::start(),
        Containerd::start(),
        Containerd::start()
    );
    let nodes = [n1, n2, n3];
    for node in &nodes {
        node.mirror("docker.io", &rig.cache.url());
    }
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "a:1\ndocker.io/team/b:2\nlibrary/c:3\n").unwrap();

    let (r1, r2, r3) = tokio::join!(
        prepull_once(&nodes[0], &list, &[]),
        prepull_once(&nodes[1], &list, &[]),
        prepull_once(&nodes[2], &list, &[]),
    );
    for done in [&r1, &r2, &r3] {
        assert!(
            done.success
                && done
                    .stderr
                    .contains("3 pulled, 0 already present, 0 failed"),
            "{}",
            done.stderr
        );
    }
    for node in &nodes {
        let held = cri_images(node).await;
        for name in [
            "docker.io/library/a:1",
            "docker.io/team/b:2",
            "docker.io/library/c:3",
        ] {
            assert!(held.iter().any(|h| h == name), "{name} not in {held:?}");
        }
    }

    // Prefetches (arm64 included) may still be running: wait until upstream is quiet.
    let lines = rig.front.settled(Duration::from_millis(500)).await;
    let mut gets: BTreeMap<&str, usize> = BTreeMap::new();
    for line in &lines {
        if let Some(digest) = blob_get(line) {
            *gets.entry(digest).or_default() += 1;
        }
    }
    let twice: Vec<_> = gets.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.is_empty(),
        "blobs fetched upstream more than once: {twice:?}"
    );
    let amd64 = b.child("amd64").expect("an amd64 child");
    let pulled: BTreeSet<&str> = a
        .blobs()
        .into_iter()
        .chain(amd64.blobs())
        .chain(c.blobs())
        .map(|blob| blob.digest.as_str())
        .collect();
    for digest in &pulled {
        assert_eq!(
            gets.get(digest),
            Some(&1),
            "{digest} (linux/amd64, what containerd pulls) fetched once; upstream GETs: {gets:?}"
        );
    }
    let known: BTreeSet<&str> = a
        .blobs()
        .into_iter()
        .chain(b.blobs())
        .chain(c.blobs())
        .map(|blob| blob.digest.as_str())
        .collect();
    for digest in gets.keys() {
        assert!(
            known.contains(digest),
            "an unknown blob was fetched: {digest}"
        );
    }
}

/// The `fields` of every JSON log line whose message is `message`.
fn logged(path: &Path, message: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["fields"]["message"] == message)
        .map(|v| v["fields"].clone())
        .collect()
}

/// `pullthrough --log-format json prepull --jitter 0s …EXTRA` without `--once`, logging to `log`.
fn spawn_daemon(socket: &Path, list: &Path, log: &Path, extra: &[&str]) -> Child {
    Child::spawn(
        "pullthrough prepull",
        Command::new(env!("CARGO_BIN_EXE_pullthrough"))
            .args(["--log-format", "json", "prepull", "--cri-socket"])
            .arg(socket)
            .arg("--file")
            .arg(list)
            .args(["--jitter", "0s"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap()),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_pulls_again_when_the_list_changes_and_stops_on_sigterm() {
    let rig = Rig::start(
        Registry::anonymous()
            .image("library/a", "1", Image::single(101))
            .image("library/b", "2", Image::docker(102)),
    )
    .await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "a:1\n").unwrap();
    let log = dir.path().join("prepull.log");
    let mut daemon = spawn_daemon(node.socket(), &list, &log, &["--poll", "200ms"]);
    let passes = |n: usize| {
        let log = log.clone();
        async move {
            let done = logged(&log, "prepull pass done");
            (done.len() >= n).then_some(done)
        }
    };

    let first = support::wait_until("the first pass", PASS_TIMEOUT, || passes(1))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", support::tail(&log, 30)));
    assert_eq!(
        (
            &first[0]["pulled"],
            &first[0]["present"],
            &first[0]["failed"]
        ),
        (&1.into(), &0.into(), &0.into()),
        "{first:?}"
    );
    assert!(daemon.exited().is_none(), "it keeps running after a pass");

    replace_list(&list, "a:1\nlibrary/b:2\n");
    let done = support::wait_until("a pass after the list changed", PASS_TIMEOUT, || passes(2))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", support::tail(&log, 30)));
    assert_eq!(
        (&done[1]["pulled"], &done[1]["present"], &done[1]["failed"]),
        (&1.into(), &1.into(), &0.into()),
        "{done:?}"
    );
    let held = cri_images(&node).await;
    assert!(
        held.iter().any(|h| h == "docker.io/library/b:2"),
        "b:2 not in {held:?}"
    );
    assert_eq!(
        logged(&log, "prepull pass done").len(),
        2,
        "no pass without a change (no --interval)"
    );

    let term = Command::new("kill")
        .args(["-TERM", &daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = support::wait_until("an exit after SIGTERM", Duration::from_secs(10), || {
        let exit = daemon.exited();
        async move { exit }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        exit.ends_with("exit status: 0"),
        "{exit}\n{}",
        support::tail(&log, 10)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_retries_a_pass_that_found_no_runtime_even_without_an_interval() {
    let rig = Rig::start(Registry::anonymous().image("library/a", "1", Image::single(121))).await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "a:1\n").unwrap();
    // The agent starts before the runtime, as after a node reboot: its socket path is a
    // symlink that leads nowhere until the runtime "comes up".
    let socket = dir.path().join("cri.sock");
    let log = dir.path().join("prepull.log");
    let _daemon = spawn_daemon(
        &socket,
        &list,
        &log,
        &["--poll", "50ms", "--backoff", "200ms"],
    );
    let unreachable = "runtime unreachable; next pass will retry";
    support::wait_until("a pass to find no runtime", PASS_TIMEOUT, || {
        let seen = !logged(&log, unreachable).is_empty();
        async move { seen.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", support::tail(&log, 30)));

    std::os::unix::fs::symlink(node.socket(), &socket).unwrap();
    let done = support::wait_until("a pass that pulls", PASS_TIMEOUT, || {
        let done = logged(&log, "prepull pass done");
        async move { (!done.is_empty()).then_some(done) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", support::tail(&log, 30)));
    assert_eq!(done[0]["pulled"], 1, "{done:?}");
    let held = cri_images(&node).await;
    assert!(
        held.iter().any(|h| h == "docker.io/library/a:1"),
        "a:1 not in {held:?}"
    );
}

/// A Docker `config.json` with one `auth` entry for Docker Hub.
fn docker_config(auth: &str) -> String {
    format!(r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}}}}}}"#)
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_secrets_from_an_auth_file_reach_the_registry_and_bad_ones_are_refused_unread() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    // The node's mirror for docker.io is a registry that wants Basic auth: containerd
    // answers its challenge only with the credentials the pull request carried.
    let upstream = Registry::basic("puller", "s3cret-pass")
        .image("library/private", "1", Image::single(111))
        .start()
        .await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &upstream.url());
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("images.txt");
    std::fs::write(&list, "private:1\n").unwrap();
    let quick = ["--retries", "0", "--backoff", "10ms"];

    let without = prepull_once(&node, &list, &quick).await;
    assert!(
        !without.success
            && without
                .stderr
                .contains("0 pulled, 0 already present, 1 failed"),
        "{}",
        without.stderr
    );

    let good = dir.path().join("good.json");
    std::fs::write(&good, docker_config(&b64("puller:s3cret-pass"))).unwrap();
    let auth_file = good.to_str().unwrap();
    let with = prepull_once(
        &node,
        &list,
        &[&quick[..], &["--auth-file", auth_file]].concat(),
    )
    .await;
    assert!(
        with.success
            && with
                .stderr
                .contains("1 pulled, 0 already present, 0 failed"),
        "{}",
        with.stderr
    );
    assert!(
        cri_images(&node)
            .await
            .iter()
            .any(|h| h == "docker.io/library/private:1"),
        "the image is on the node"
    );

    // Refused before any pull, naming the file but none of its content; the socket is
    // never dialled, so a missing one shows the refusal comes first.
    let truncated = format!(
        r#"{{"auths":{{"docker.io":{{"auth":"{}""#,
        b64("leaky:hunter2")
    );
    let no_colon = docker_config(&b64("hunter2-without-a-user"));
    let not_base64 = docker_config("hunter2!!");
    for (what, text) in [
        ("truncated JSON", truncated),
        ("auth without user:pass", no_colon),
        ("auth not base64", not_base64),
    ] {
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, &text).unwrap();
        for once in [true, false] {
            let mut args = vec!["prepull", "--cri-socket", "/nonexistent/cri.sock"];
            args.extend(["--file", list.to_str().unwrap()]);
            args.extend(["--auth-file", bad.to_str().unwrap()]);
            if once {
                args.push("--once");
            }
            let refused = run_binary(&args, &[]);
            let shown = format!("{what} (--once: {once}): {}", refused.stderr);
            assert!(!refused.success, "{shown}");
            assert!(
                refused.stderr.contains("pull secrets") && refused.stderr.contains("bad.json"),
                "{shown}"
            );
            for secret in ["hunter2", "leaky", &b64("leaky:hunter2")] {
                assert!(!refused.stderr.contains(secret), "leaks {secret}: {shown}");
            }
        }
    }
}
