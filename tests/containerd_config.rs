//! `pullthrough containerd-config` as the node DaemonSet runs it: the files it
//! writes make a real containerd pull through the cache, a hand-written file comes
//! back byte for byte, running it twice changes nothing, and the check of
//! containerd's own config says exactly what to add when `config_path` is missing.

mod support;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use support::cache::{blob_file, run_binary, Rig};
use support::clients::Containerd;
use support::images::Image;
use support::registry::Registry;
use support::Finished;

const ENDPOINT: &str = "http://127.0.0.1:5999";

/// `pullthrough containerd-config ARGS…`, which must succeed.
fn containerd_config(args: &[&str]) -> Finished {
    let mut full = vec!["containerd-config"];
    full.extend_from_slice(args);
    let done = run_binary(&full, &[]);
    assert!(
        done.success,
        "{full:?} failed\nstderr:\n{}\nstdout:\n{}",
        done.stderr, done.stdout
    );
    done
}

/// Applies `ENDPOINT` for `registries` into `dir`, with no containerd config to check.
fn apply(dir: &Path, registries: &str) -> Finished {
    containerd_config(&[
        "--endpoint",
        ENDPOINT,
        "--registries",
        registries,
        "--dir",
        &dir.display().to_string(),
        "--containerd-config",
        &dir.join("no-config.toml").display().to_string(),
    ])
}

fn restore(dir: &Path, registries: &str) -> Finished {
    containerd_config(&[
        "--restore",
        "--registries",
        registries,
        "--dir",
        &dir.display().to_string(),
    ])
}

fn hosts_toml(dir: &Path, registry: &str) -> PathBuf {
    dir.join(registry).join("hosts.toml")
}

/// Every file under `dir` with its bytes, inode and modification time.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u64, i64, i64)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                pending.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                found.push((path, bytes, meta.ino(), meta.mtime(), meta.mtime_nsec()));
            }
        }
    }
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_through_the_files_the_command_writes() {
    let img = Image::single(61);
    let rig = Rig::start(Registry::anonymous().image("library/nodecfg", "1", img.clone())).await;
    let node = Containerd::start().await;
    let hosts = node.hosts_dir().display().to_string();
    // The rig's upstream is named docker.io, so the file's fallback `server` is the
    // real registry-1.docker.io: unreachable here, so only the cache can answer.
    let done = containerd_config(&[
        "--endpoint",
        &rig.cache.url(),
        "--registries",
        "docker.io,ghcr.io",
        "--dir",
        &hosts,
        "--containerd-config",
        &node.config_file().display().to_string(),
    ]);
    assert!(
        done.stdout.contains("docker.io: written"),
        "{}",
        done.stdout
    );
    assert!(
        !done.stderr.contains("warning"),
        "the rig's containerd config names the hosts dir: {}",
        done.stderr
    );
    assert!(
        done.stdout.contains("config_path includes"),
        "{}",
        done.stdout
    );
    let written = std::fs::read_to_string(hosts_toml(node.hosts_dir(), "docker.io")).unwrap();
    assert!(written.starts_with("# Written by pullthrough"), "{written}");
    assert!(
        written.contains("server = \"https://registry-1.docker.io\""),
        "{written}"
    );

    node.pull("docker.io/library/nodecfg:1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail()));
    let listed = node
        .run(&["images", "ls"])
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let line = listed
        .stdout
        .lines()
        .find(|l| l.starts_with("docker.io/library/nodecfg:1 "))
        .unwrap_or_else(|| panic!("not listed: {}", listed.stdout));
    let digest = line.split_whitespace().nth(2).unwrap();
    assert_eq!(digest, img.digest(), "{line}");
    for blob in img.blobs() {
        assert!(
            blob_file(rig.cache.data(), &blob.digest).exists(),
            "{} was pulled through the cache",
            blob.digest
        );
    }
    let reached = rig.front.requests();
    assert!(
        reached.iter().any(|l| l.uri.contains("/manifests/")),
        "the cache asked upstream for the manifest: {reached:#?}"
    );
}

#[test]
fn a_hand_written_hosts_toml_is_backed_up_once_and_restored_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path();
    let hand = b"server = \"https://mirror.corp.example\"\r\n\r\n[host.\"https://mirror.corp.example\"]\n  capabilities = [\"pull\"]";
    std::fs::create_dir_all(certs.join("docker.io")).unwrap();
    std::fs::write(hosts_toml(certs, "docker.io"), hand).unwrap();
    let backup = certs.join("docker.io/hosts.toml.pullthrough-backup");

    let first = apply(certs, "docker.io,ghcr.io");
    assert!(
        first.stdout.contains("docker.io: backed up"),
        "{}",
        first.stdout
    );
    assert!(
        first.stdout.contains("ghcr.io: written"),
        "{}",
        first.stdout
    );
    assert_eq!(std::fs::read(&backup).unwrap(), hand);
    let ours = std::fs::read_to_string(hosts_toml(certs, "docker.io")).unwrap();
    assert!(ours.contains(ENDPOINT), "{ours}");

    // Our own file is overwritten without a second backup.
    let second = apply(certs, "docker.io,ghcr.io");
    assert!(
        second.stdout.contains("docker.io: unchanged"),
        "{}",
        second.stdout
    );
    assert_eq!(std::fs::read(&backup).unwrap(), hand);

    let restored = restore(certs, "docker.io,ghcr.io");
    assert!(
        restored.stdout.contains("docker.io: restored"),
        "{}",
        restored.stdout
    );
    assert!(
        restored.stdout.contains("ghcr.io: removed"),
        "{}",
        restored.stdout
    );
    assert_eq!(std::fs::read(hosts_toml(certs, "docker.io")).unwrap(), hand);
    assert!(!backup.exists());
    assert!(!certs.join("ghcr.io").exists());

    let before = snapshot(certs);
    let again = restore(certs, "docker.io,ghcr.io");
    assert!(again.stdout.contains("nothing changed"), "{}", again.stdout);
    assert_eq!(snapshot(certs), before);
}

#[test]
fn a_second_run_reports_unchanged_and_touches_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let registries = "docker.io,ghcr.io,quay.io,registry.k8s.io,gcr.io";
    let first = apply(dir.path(), registries);
    assert!(first.stdout.contains("5 written"), "{}", first.stdout);
    let before = snapshot(dir.path());
    assert_eq!(before.len(), 5, "{before:?}");
    let second = apply(dir.path(), registries);
    assert!(
        second.stdout.contains("nothing changed"),
        "{}",
        second.stdout
    );
    assert_eq!(second.stdout.matches(": unchanged").count(), 5);
    assert_eq!(
        snapshot(dir.path()),
        before,
        "same bytes, inodes and mtimes"
    );
}

#[test]
fn the_containerd_config_check_warns_with_the_stanza_for_the_version() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let certs_s = certs.display().to_string();
    let run_with = |config: &str| -> Finished {
        let path = dir.path().join("config.toml");
        std::fs::write(&path, config).unwrap();
        containerd_config(&[
            "--endpoint",
            ENDPOINT,
            "--registries",
            "docker.io",
            "--dir",
            &certs_s,
            "--containerd-config",
            &path.display().to_string(),
        ])
    };
    let v1x = run_with("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n");
    assert!(v1x.stderr.contains("warning"), "{}", v1x.stderr);
    let stanza = format!(
        "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{certs_s}\"\n"
    );
    assert!(v1x.stderr.contains(&stanza), "{}", v1x.stderr);

    let v2x = run_with("version = 3\n");
    let stanza = format!(
        "[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"{certs_s}\"\n"
    );
    assert!(v2x.stderr.contains(&stanza), "{}", v2x.stderr);

    let elsewhere = run_with(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/docker/certs.d\"\n",
    );
    assert!(
        elsewhere.stderr.contains("/etc/docker/certs.d"),
        "{}",
        elsewhere.stderr
    );

    let right = run_with(&format!(
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = '{certs_s}'\n"
    ));
    assert!(!right.stderr.contains("warning"), "{}", right.stderr);
    assert!(
        right.stdout.contains("config_path includes"),
        "{}",
        right.stdout
    );

    let missing = containerd_config(&[
        "--endpoint",
        ENDPOINT,
        "--registries",
        "docker.io",
        "--dir",
        &certs_s,
        "--containerd-config",
        "/nonexistent/containerd/config.toml",
    ]);
    assert!(
        missing
            .stderr
            .contains("/nonexistent/containerd/config.toml does not exist"),
        "{}",
        missing.stderr
    );
}

#[test]
fn bad_input_is_refused_with_a_clear_message_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().display().to_string();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--endpoint", "cache:5000", "--registries", "docker.io"],
            &["cache:5000", "http"],
        ),
        (
            &["--endpoint", "ftp://cache", "--registries", "docker.io"],
            &["ftp://cache", "http"],
        ),
        (
            &["--endpoint", ENDPOINT, "--registries", "docker.io,,ghcr.io"],
            &["registry", "empty"],
        ),
        (
            &["--endpoint", ENDPOINT, "--registries", "ghcr.io/org"],
            &["ghcr.io/org", "not a path"],
        ),
        (&["--registries", "docker.io"], &["--endpoint"]),
    ];
    for (args, expected) in cases {
        let mut full = vec!["containerd-config", "--dir", &certs];
        full.extend_from_slice(args);
        let done = run_binary(&full, &[]);
        assert!(!done.success, "{full:?} should be refused");
        for word in *expected {
            assert!(
                done.stderr.contains(word),
                "{full:?}: {word:?} not in {}",
                done.stderr
            );
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
}
