//! The `pullthrough` binary as a user runs it: configuration precedence and
//! errors, the embedded default, and logs that never carry a credential.

mod support;

use base64::Engine;
use reqwest::Method;
use support::cache::{raw_request, run_binary, CacheProcess};
use support::front::Front;
use support::images::{media, Image};
use support::registry::Registry;

const ALL: (&str, &str) = ("accept", media::ACCEPT_ALL);

fn config_file(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// Arguments after `serve`, environment, words the error must contain.
type Refusal = (
    Vec<String>,
    Vec<(&'static str, &'static str)>,
    &'static [&'static str],
);

#[test]
fn a_bad_configuration_exits_non_zero_naming_the_key_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<Refusal> = vec![
        (
            vec![
                "--config".into(),
                config_file(dir.path(), "a.toml", "[cache]\ntag_ttl = \"soon\"\n"),
            ],
            vec![],
            &["tag_ttl", "soon"],
        ),
        (
            vec![
                "--config".into(),
                config_file(dir.path(), "b.toml", "[cache]\ntag_tll = \"1m\"\n"),
            ],
            vec![],
            &["tag_tll"],
        ),
        (
            vec![],
            vec![("PULLTHROUGH_CACHE__TAG_TTL", "forever")],
            &["tag_ttl", "forever"],
        ),
        (
            vec![],
            vec![("PULLTHROUGH_DEFAULT_UPSTREAM", "nowhere.example")],
            &["default_upstream", "nowhere.example"],
        ),
        (
            vec!["--config".into(), "/nonexistent/pullthrough.toml".into()],
            vec![],
            &["/nonexistent/pullthrough.toml"],
        ),
        (
            vec!["--listen".into(), "not-an-address".into()],
            vec![],
            &["--listen"],
        ),
    ];
    for (args, env, expected) in cases {
        let mut full = vec!["serve"];
        full.extend(args.iter().map(String::as_str));
        let done = run_binary(&full, &env);
        assert!(!done.success, "{full:?} {env:?} should be refused");
        for word in expected {
            assert!(
                done.stderr.to_lowercase().contains(&word.to_lowercase()),
                "{full:?} {env:?}: {word:?} not in {}",
                done.stderr
            );
        }
    }
}

#[test]
fn default_config_prints_the_embedded_file() {
    let done = run_binary(&["default-config"], &[]);
    assert!(done.success);
    assert_eq!(done.stdout, include_str!("../config/pullthrough.toml"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_pulls_with_credentials_and_never_logs_them() {
    let img = Image::single(41);
    let basic = Registry::basic("basic-user", "basic-pa55word")
        .image("team/app", "1", img.clone())
        .start()
        .await;
    let token = Registry::token_with_credentials("token-user", "token-pa55word")
        .image("library/app", "1", img.clone())
        .start()
        .await;
    let front = Front::start(token.addr()).await;
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("basic-password");
    std::fs::write(&pw, "basic-pa55word\n").unwrap();
    let config = format!(
        r#"
default_upstream = "docker.io"
[[upstreams]]
name = "docker.io"
url = "{}"
library_prefix = true
username = "token-user"
password_env = "TEST_TOKEN_PASSWORD"
[[upstreams]]
name = "basic.example"
url = "{}"
username = "basic-user"
password_file = "{}"
"#,
        front.url(),
        basic.url(),
        pw.display()
    );
    let mut cache = CacheProcess::start(
        &config,
        &[
            ("RUST_LOG", "trace"),
            ("TEST_TOKEN_PASSWORD", "token-pa55word"),
        ],
    )
    .await;
    for path in [
        "/v2/app/manifests/1?ns=docker.io".to_string(),
        format!("/v2/library/app/blobs/{}", img.layers()[0].digest),
        "/v2/basic.example/team/app/manifests/1".to_string(),
        format!(
            "/v2/team/app/blobs/{}?ns=basic.example",
            img.layers()[0].digest
        ),
    ] {
        let r = raw_request(&format!("{}{path}", cache.url()), Method::GET, &[ALL]).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.body);
    }
    // What an operator sees: the status page and the metrics.
    let mut shown = String::new();
    for path in ["/", "/metrics"] {
        let r = raw_request(&format!("{}{path}", cache.url()), Method::GET, &[]).await;
        assert_eq!(r.status, 200, "{path}");
        shown.push_str(&String::from_utf8_lossy(&r.body));
    }
    assert!(
        shown.contains("basic.example"),
        "the page names the upstreams"
    );
    let exit = cache.terminate();
    assert!(
        exit.contains("exit status: 0"),
        "graceful stop on SIGTERM: {exit}"
    );
    let log = cache.log();
    assert!(log.lines().count() > 10, "trace logging was on: {log}");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    for secret in [
        "basic-pa55word".to_string(),
        "token-pa55word".to_string(),
        b64("basic-user:basic-pa55word"),
        b64("token-user:token-pa55word"),
        "Bearer ey".to_string(),
        "access_token".to_string(),
    ] {
        assert!(!log.contains(&secret), "{secret:?} appears in the log");
        assert!(
            !shown.contains(&secret),
            "{secret:?} appears on the page or in metrics"
        );
    }
    // The token endpoint was really used with the credentials.
    let tokens = token.token_server().unwrap().log();
    assert!(tokens
        .iter()
        .any(|t| t.account.as_deref() == Some("token-user") && t.granted));
}
