use super::*;

fn with_upstreams(extra: &str) -> String {
    format!(
        r#"
default_upstream = "docker.io"
[server]
listen = "127.0.0.1:0"
[storage]
path = "/tmp/x"
[cache]
tag_ttl = "5m"
[[upstreams]]
name = "docker.io"
url = "https://registry-1.docker.io"
aliases = ["index.docker.io"]
library_prefix = true
{extra}
"#
    )
}

#[test]
fn the_embedded_default_is_valid() {
    let c = Config::load(None, &Overrides::default()).unwrap();
    assert_eq!(c.server.listen.port(), 5000);
    assert_eq!(c.cache.tag_ttl, Duration::from_secs(300));
    for name in [
        "docker.io",
        "index.docker.io",
        "ghcr.io",
        "quay.io",
        "registry.k8s.io",
        "gcr.io",
    ] {
        assert!(
            c.find_upstream(name).is_some(),
            "{name} should be configured"
        );
    }
    assert_eq!(
        c.find_upstream(&c.default_upstream).unwrap().name,
        "docker.io"
    );
}

#[test]
fn flags_override_the_defaults() {
    let o = Overrides {
        listen: Some("127.0.0.1:6000".parse().unwrap()),
        data: Some(PathBuf::from("/var/tmp/pt")),
        offline: true,
        ..Overrides::default()
    };
    let c = Config::load(None, &o).unwrap();
    assert_eq!(c.server.listen.port(), 6000);
    assert_eq!(c.storage.path, PathBuf::from("/var/tmp/pt"));
    assert!(
        c.upstreams.iter().all(|u| u.offline),
        "--offline takes every upstream offline"
    );
    assert!(Config::load(None, &Overrides::default())
        .unwrap()
        .upstreams
        .iter()
        .all(|u| !u.offline));
}

#[test]
fn a_file_overrides_the_defaults_and_replaces_the_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "default_upstream = \"mine\"\n[cache]\ntag_ttl = \"1h 30m\"\n[[upstreams]]\nname = \"mine\"\nurl = \"http://127.0.0.1:1\"\n",
    )
    .unwrap();
    let c = Config::load(Some(&path), &Overrides::default()).unwrap();
    assert_eq!(c.cache.tag_ttl, Duration::from_secs(5400));
    assert_eq!(c.upstreams.len(), 1);
    assert_eq!(
        c.server.listen.port(),
        5000,
        "untouched keys keep their default"
    );
}

fn error_of(text: &str) -> String {
    Config::from_toml(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key_and_the_problem() {
    let e = error_of(&with_upstreams("").replace("\"5m\"", "\"five minutes\""));
    assert!(e.contains("tag_ttl") && e.contains("five minutes"), "{e}");

    let e = error_of(&with_upstreams("").replace("127.0.0.1:0", "nowhere"));
    assert!(e.contains("listen"), "{e}");

    let e = error_of(&with_upstreams("").replace("[cache]", "[cache]\ntag_tll = \"1m\""));
    assert!(e.contains("tag_tll"), "{e}");

    let e = error_of(&with_upstreams("").replace(
        "default_upstream = \"docker.io\"",
        "default_upstream = \"nope\"",
    ));
    assert!(e.contains("default_upstream") && e.contains("nope"), "{e}");

    let e = error_of(&with_upstreams(
        "[[upstreams]]\nname = \"index.docker.io\"\nurl = \"https://x\"\n",
    ));
    assert!(e.contains("upstreams[1].name"), "{e}");

    let e = error_of(&with_upstreams(
        "[[upstreams]]\nname = \"x\"\nurl = \"ftp://x\"\n",
    ));
    assert!(e.contains("upstreams[1].url"), "{e}");

    let e = error_of(&with_upstreams(
        "[[upstreams]]\nname = \"x\"\nurl = \"https://x\"\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n",
    ));
    assert!(
        e.contains("upstreams[1].password") && e.contains("/nonexistent/pw"),
        "{e}"
    );
}

#[test]
fn a_missing_config_file_is_an_error() {
    let e = Config::load(
        Some(Path::new("/nonexistent/pt.toml")),
        &Overrides::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("/nonexistent/pt.toml"), "{e}");
}

#[test]
fn passwords_come_from_files_and_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "s3cret-value\n").unwrap();
    let text = with_upstreams(&format!(
        "[[upstreams]]\nname = \"x\"\nurl = \"https://x\"\nusername = \"u\"\npassword_file = \"{}\"\n",
        pw.display()
    ));
    let c = Config::from_toml(&text).unwrap();
    let creds = c.upstreams[1].credentials().unwrap().unwrap();
    assert_eq!(creds.password.expose(), "s3cret-value");
    let printed = format!("{c:?} {creds:?}");
    assert!(!printed.contains("s3cret"), "{printed}");
}

#[test]
fn credentials_in_an_upstream_url_are_refused_without_echoing_them() {
    let e = error_of(&with_upstreams(
        "[[upstreams]]\nname = \"x\"\nurl = \"https://user:hunter2@x.example\"\n",
    ));
    assert!(
        e.contains("upstreams[1].url") && e.contains("credentials"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
}
