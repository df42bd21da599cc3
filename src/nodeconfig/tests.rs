use super::*;

fn endpoint() -> Endpoint {
    "http://cache.example:5000".parse().unwrap()
}

fn registries(names: &[&str]) -> Vec<Registry> {
    names.iter().map(|n| n.parse().unwrap()).collect()
}

fn file(dir: &Path, registry: &str) -> PathBuf {
    dir.join(registry).join(HOSTS_TOML)
}

#[test]
fn endpoints_are_http_urls_with_a_host_and_no_path() {
    for (given, wanted) in [
        ("http://cache:5000", "http://cache:5000"),
        ("http://cache:5000/", "http://cache:5000"),
        ("https://cache.example", "https://cache.example"),
        ("https://cache.example:443", "https://cache.example"),
        ("HTTP://Cache:5000", "http://cache:5000"),
        ("http://10.0.0.7:5000", "http://10.0.0.7:5000"),
        ("http://[fd00::7]:5000", "http://[fd00::7]:5000"),
    ] {
        assert_eq!(
            Endpoint::try_new(given).unwrap().as_str(),
            wanted,
            "{given}"
        );
    }
    for (bad, why) in [
        ("cache:5000", "http"),
        ("ftp://cache", "http"),
        ("cache", "URL"),
        ("", "URL"),
        ("http://u:p@cache:5000", "credentials"),
        ("http://cache:5000/v2", "path"),
        ("http://cache:5000/?x=1", "query"),
    ] {
        let e = Endpoint::try_new(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

#[test]
fn registry_names_are_one_directory_each() {
    for ok in [
        "docker.io",
        "registry.k8s.io",
        "registry.example:5000",
        "_default",
    ] {
        assert_eq!(Registry::try_new(ok).unwrap().as_str(), ok);
    }
    assert_eq!(Registry::try_new(" ghcr.io ").unwrap().as_str(), "ghcr.io");
    for (bad, why) in [
        ("", "empty"),
        ("  ", "empty"),
        ("ghcr.io/org", "not a path"),
        ("..", "not a host"),
        ("a b", "spaces"),
        ("a\"b", "quotes"),
    ] {
        let e = Registry::try_new(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad:?}: {e}");
    }
}

#[test]
fn the_real_registry_stays_the_server() {
    let server = |n: &str| Registry::try_new(n).unwrap().server();
    assert_eq!(
        server("docker.io").as_deref(),
        Some("https://registry-1.docker.io")
    );
    assert_eq!(server("ghcr.io").as_deref(), Some("https://ghcr.io"));
    assert_eq!(server("_default"), None);
}

#[test]
fn hosts_toml_is_marked_and_parses_as_containerd_reads_it() {
    let text = hosts_toml(&"docker.io".parse().unwrap(), &endpoint());
    assert!(text.starts_with(MARKER));
    let parsed: toml::Table = text.parse().unwrap();
    assert_eq!(
        parsed["server"].as_str(),
        Some("https://registry-1.docker.io")
    );
    let host = parsed["host"]["http://cache.example:5000"]
        .as_table()
        .unwrap();
    assert_eq!(
        host["capabilities"].as_array().unwrap(),
        &vec![
            toml::Value::from("pull".to_string()),
            toml::Value::from("resolve".to_string())
        ]
    );
    assert_eq!(host.len(), 1, "nothing else for a plain http host: {text}");
    let default = hosts_toml(&"_default".parse().unwrap(), &endpoint());
    assert!(!default
        .parse::<toml::Table>()
        .unwrap()
        .contains_key("server"));
}

#[test]
fn apply_writes_each_registry_once_and_a_second_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    let regs = registries(&["docker.io", "ghcr.io", "docker.io"]);
    let first = apply(&certs, &endpoint(), &regs).unwrap();
    assert_eq!(first.outcomes.len(), 2, "duplicates are applied once");
    assert!(first.outcomes.iter().all(|o| o.action == Applied::Written));
    assert!(first.to_string().contains("2 written"), "{first}");
    let written = fs::read(file(&certs, "ghcr.io")).unwrap();
    let second = apply(&certs, &endpoint(), &regs).unwrap();
    assert!(!second.changed());
    assert!(second.to_string().contains("nothing changed"), "{second}");
    assert_eq!(fs::read(file(&certs, "ghcr.io")).unwrap(), written);
    let names: Vec<_> = fs::read_dir(certs.join("ghcr.io"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![HOSTS_TOML], "no temporary file is left");
}

#[test]
fn a_new_endpoint_rewrites_our_file_without_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let regs = registries(&["quay.io"]);
    apply(dir.path(), &endpoint(), &regs).unwrap();
    let other: Endpoint = "https://other.example".parse().unwrap();
    let report = apply(dir.path(), &other, &regs).unwrap();
    assert_eq!(report.outcomes[0].action, Applied::Updated);
    assert!(fs::read_to_string(file(dir.path(), "quay.io"))
        .unwrap()
        .contains("[host.\"https://other.example\"]"));
    assert!(!dir.path().join("quay.io").join(BACKUP).exists());
}

#[test]
fn a_foreign_file_is_backed_up_once_and_restored_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let regs = registries(&["docker.io"]);
    let hand = b"server = \"https://mirror.corp\"\r\n# no newline at the end";
    fs::create_dir_all(dir.path().join("docker.io")).unwrap();
    fs::write(file(dir.path(), "docker.io"), hand).unwrap();
    let backup = dir.path().join("docker.io").join(BACKUP);

    let first = apply(dir.path(), &endpoint(), &regs).unwrap();
    assert_eq!(
        first.outcomes[0].action,
        Applied::BackedUp {
            backup: backup.clone()
        }
    );
    assert_eq!(fs::read(&backup).unwrap(), hand);
    let again = apply(dir.path(), &endpoint(), &regs).unwrap();
    assert_eq!(again.outcomes[0].action, Applied::Unchanged);
    assert_eq!(fs::read(&backup).unwrap(), hand);

    let restored = restore(dir.path(), &regs).unwrap();
    assert_eq!(restored.outcomes[0].action, Restored::Restored);
    assert_eq!(fs::read(file(dir.path(), "docker.io")).unwrap(), hand);
    assert!(!backup.exists());
    let twice = restore(dir.path(), &regs).unwrap();
    assert_eq!(
        twice.outcomes[0].action,
        Restored::NotOurs { backup_kept: false }
    );
    assert!(twice.to_string().contains("nothing changed"), "{twice}");
    assert_eq!(fs::read(file(dir.path(), "docker.io")).unwrap(), hand);
}

#[test]
fn restore_removes_our_file_and_its_empty_directory_but_never_the_root() {
    let dir = tempfile::tempdir().unwrap();
    let regs = registries(&["ghcr.io", "gcr.io"]);
    apply(dir.path(), &endpoint(), &regs).unwrap();
    fs::write(dir.path().join("gcr.io").join("ca.crt"), "a certificate").unwrap();
    let report = restore(dir.path(), &regs).unwrap();
    assert_eq!(
        report.outcomes[0].action,
        Restored::Removed { dir_removed: true }
    );
    assert_eq!(
        report.outcomes[1].action,
        Restored::Removed { dir_removed: false }
    );
    assert!(!dir.path().join("ghcr.io").exists());
    assert!(dir.path().join("gcr.io").join("ca.crt").exists());
    assert!(dir.path().exists());
    let again = restore(dir.path(), &regs).unwrap();
    assert_eq!(again.outcomes[0].action, Restored::Absent);
    assert!(!again.changed());
}

#[test]
fn restore_leaves_a_foreign_file_that_replaced_ours_and_keeps_the_backup() {
    let dir = tempfile::tempdir().unwrap();
    let regs = registries(&["docker.io"]);
    fs::create_dir_all(dir.path().join("docker.io")).unwrap();
    fs::write(file(dir.path(), "docker.io"), "old").unwrap();
    apply(dir.path(), &endpoint(), &regs).unwrap();
    fs::write(file(dir.path(), "docker.io"), "someone else's").unwrap();
    let report = restore(dir.path(), &regs).unwrap();
    assert_eq!(
        report.outcomes[0].action,
        Restored::NotOurs { backup_kept: true }
    );
    assert_eq!(
        fs::read_to_string(file(dir.path(), "docker.io")).unwrap(),
        "someone else's"
    );
    // Applying again keeps the newest foreign file, which restore then brings back.
    apply(dir.path(), &endpoint(), &regs).unwrap();
    restore(dir.path(), &regs).unwrap();
    assert_eq!(
        fs::read_to_string(file(dir.path(), "docker.io")).unwrap(),
        "someone else's"
    );
}

#[test]
fn stale_temporary_files_of_a_crashed_run_are_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let regs = registries(&["ghcr.io"]);
    fs::create_dir_all(dir.path().join("ghcr.io")).unwrap();
    let stale = dir
        .path()
        .join("ghcr.io")
        .join(".pullthrough-tmp-hosts.toml.1");
    fs::write(&stale, "half").unwrap();
    apply(dir.path(), &endpoint(), &regs).unwrap();
    assert!(!stale.exists());
}

fn check(config: Option<&str>, dir: &str) -> ConfigCheck {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.toml");
    if let Some(text) = config {
        fs::write(&path, text).unwrap();
    }
    check_containerd_config(&path, Path::new(dir)).unwrap()
}

#[test]
fn the_config_check_finds_config_path_where_each_version_keeps_it() {
    let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
    let v3 = "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d/'\n";
    let v1 = "[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
    let listed = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/docker/certs.d:/etc/containerd/certs.d\"\n";
    for (text, version) in [
        (v2, ConfigVersion::V2),
        (v3, ConfigVersion::V3),
        (v1, ConfigVersion::V1),
        (listed, ConfigVersion::V2),
    ] {
        let c = check(Some(text), "/etc/containerd/certs.d");
        assert_eq!(c.finding, Finding::Reads { version }, "{text}");
        assert_eq!(c.warning(), None);
        assert!(c.to_string().contains("config_path includes"), "{c}");
    }
    // The 1.x key in a 2.x config is not where containerd 2.x looks for it.
    let wrong_table = "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n";
    assert_eq!(
        check(Some(wrong_table), "/etc/containerd/certs.d").finding,
        Finding::NoConfigPath {
            version: ConfigVersion::V3
        }
    );
}

#[test]
fn the_warning_carries_the_stanza_for_the_containerd_version() {
    let dir = "/etc/containerd/certs.d";
    let v2 = check(Some("version = 2\n"), dir).warning().unwrap();
    assert!(
        v2.contains("[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"),
        "{v2}"
    );
    assert!(v2.contains("containerd 1.x"), "{v2}");
    let v3 = check(Some("version = 3\n"), dir).warning().unwrap();
    assert!(
        v3.contains("[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n"),
        "{v3}"
    );
    let elsewhere = check(
        Some("version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/other\"\n"),
        dir,
    );
    assert_eq!(
        elsewhere.finding,
        Finding::Elsewhere {
            version: ConfigVersion::V2,
            config_path: "/etc/other".into()
        }
    );
    assert!(elsewhere.warning().unwrap().contains("/etc/other"));
    let missing = check(None, dir);
    assert_eq!(missing.finding, Finding::Missing);
    let text = missing.warning().unwrap();
    assert!(text.contains("does not exist"), "{text}");
    assert!(
        text.contains("io.containerd.grpc.v1.cri") && text.contains("io.containerd.cri.v1.images")
    );
}

#[test]
fn the_warning_names_mirrors_and_imports_that_get_in_the_way() {
    let text = "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n\
                [plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n\
                endpoint = [\"https://mirror.example\"]\n";
    let c = check(Some(text), "/etc/containerd/certs.d");
    assert!(c.legacy_mirrors);
    let warning = c.warning().unwrap();
    assert!(
        warning.contains("remove the registry.mirrors table"),
        "{warning}"
    );
    assert!(warning.contains("conf.d/*.toml"), "{warning}");
}

#[test]
fn a_config_that_is_not_toml_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.toml");
    fs::write(&path, "version = = 2").unwrap();
    let e = check_containerd_config(&path, Path::new("/x")).unwrap_err();
    assert!(e.to_string().contains("config.toml"), "{e}");
}

#[test]
fn the_deploy_examples_are_what_apply_writes() {
    let endpoint: Endpoint = "http://10.96.0.50:5000".parse().unwrap();
    for (registry, example) in [
        (
            "docker.io",
            include_str!("../../deploy/containerd/certs.d/docker.io/hosts.toml"),
        ),
        (
            "ghcr.io",
            include_str!("../../deploy/containerd/certs.d/ghcr.io/hosts.toml"),
        ),
    ] {
        assert_eq!(
            hosts_toml(&registry.parse().unwrap(), &endpoint),
            example,
            "regenerate deploy/containerd/certs.d with pullthrough containerd-config"
        );
    }
    for (example, version) in [
        (
            include_str!("../../deploy/containerd/config-1.x.toml"),
            ConfigVersion::V2,
        ),
        (
            include_str!("../../deploy/containerd/config-2.x.toml"),
            ConfigVersion::V3,
        ),
    ] {
        let c = check(Some(example), "/etc/containerd/certs.d");
        assert_eq!(c.finding, Finding::Reads { version }, "{example}");
    }
}
