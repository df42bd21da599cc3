//! Upstream authentication against real Distribution: the Bearer token flow
//! (with the test token server), Basic (htpasswd), anonymous or with credentials.
//! One authentication serves every client; clients need no credentials of their own.

mod support;

use futures_util::future::join_all;
use reqwest::Method;
use support::cache::Rig;
use support::clients::Containerd;
use support::images::{media, Image};
use support::registry::Registry;

const ALL: (&str, &str) = ("accept", media::ACCEPT_ALL);

fn code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("an OCI error body");
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_serves_every_client_of_a_bearer_upstream() {
    let img = Image::single(31);
    let rig = Rig::start_with(
        Registry::token().image("library/tok", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let tokens = rig.upstream.token_server().expect("a token server");
    let before = tokens.issued();
    let manifests =
        join_all((0..20).map(|_| rig.request(Method::GET, "/v2/library/tok/manifests/1", &[ALL])))
            .await;
    assert!(manifests.iter().all(|r| r.status == 200));
    let blobs = join_all(img.own_blobs().into_iter().cycle().take(20).map(|b| {
        let path = format!("/v2/library/tok/blobs/{}", b.digest);
        let rig = &rig;
        async move { (rig.request(Method::GET, &path, &[]).await, b) }
    }))
    .await;
    for (r, b) in blobs {
        assert_eq!(r.status, 200);
        assert_eq!(r.body, b.bytes);
    }
    assert_eq!(
        tokens.issued() - before,
        1,
        "one token for 40 requests of one scope"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_go_to_the_token_endpoint_and_bad_ones_are_a_clear_401() {
    let img = Image::single(32);
    let rig = Rig::start_with(
        Registry::token_with_credentials("puller", "s3cret").image(
            "library/priv",
            "1",
            img.clone(),
        ),
        |c| c.credentials("puller", "s3cret"),
    )
    .await;
    let tokens = rig.upstream.token_server().unwrap();
    let before = tokens.log().len();
    let r = rig
        .request(Method::GET, "/v2/library/priv/manifests/1", &[ALL])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(&r.body[..], &img.manifest()[..]);
    let asked = &tokens.log()[before..];
    assert!(!asked.is_empty());
    assert!(
        asked
            .iter()
            .all(|t| t.account.as_deref() == Some("puller") && t.granted),
        "{asked:?}"
    );
    assert!(!String::from_utf8_lossy(&r.body).contains("s3cret"));

    for creds in [None, Some(("puller", "wrong"))] {
        let upstream_url = rig.front.url();
        let mut builder = support::cache::Cache::builder()
            .upstream("docker.io", &upstream_url)
            .library_prefix();
        if let Some((u, p)) = creds {
            builder = builder.credentials(u, p);
        }
        let cache = builder.start().await;
        let r = support::cache::raw_request(
            &format!("{}/v2/library/priv/manifests/1", cache.url()),
            Method::GET,
            &[ALL],
        )
        .await;
        assert_eq!(r.status, 401, "{creds:?}");
        assert_eq!(code(&r.body), "UNAUTHORIZED");
        assert!(!String::from_utf8_lossy(&r.body).contains("wrong"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_basic_auth_upstream_is_pulled_with_the_configured_credentials() {
    let img = Image::single(33);
    let rig = Rig::start_with(
        Registry::basic("u", "p4ss").image("library/basic", "1", img.clone()),
        |c| c.credentials("u", "p4ss"),
    )
    .await;
    let r = rig
        .request(Method::GET, "/v2/library/basic/manifests/1", &[ALL])
        .await;
    assert_eq!(r.status, 200);
    for blob in img.own_blobs() {
        let b = rig
            .request(
                Method::GET,
                &format!("/v2/library/basic/blobs/{}", blob.digest),
                &[],
            )
            .await;
        assert_eq!(b.status, 200);
        assert_eq!(b.body, blob.bytes);
    }
    let anonymous = support::cache::Cache::builder()
        .upstream("docker.io", &rig.front.url())
        .library_prefix()
        .start()
        .await;
    let r = support::cache::raw_request(
        &format!("{}/v2/library/basic/manifests/1", anonymous.url()),
        Method::GET,
        &[ALL],
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(code(&r.body), "UNAUTHORIZED");
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_pulls_from_a_token_upstream_with_no_credentials_of_its_own() {
    let img = Image::multi_arch(34);
    let rig = Rig::start(Registry::token().image("library/secure", "1", img)).await;
    let node = Containerd::start().await;
    node.mirror("docker.io", &rig.cache.url());
    node.pull("docker.io/library/secure:1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail()));
}

#[tokio::test(flavor = "multi_thread")]
async fn blob_redirects_are_followed_without_the_registry_credentials() {
    let img = Image::single(35);
    let layer = img.layers()[0].clone();
    let mut rig = Rig::start_with(
        Registry::token().image("library/redir", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let storage =
        support::storage::StorageHost::start([(layer.digest.clone(), layer.bytes.clone())]).await;
    // Like Docker Hub: blob GETs are sent to another host, everything else is the registry's.
    rig.front
        .set_mode(support::front::Mode::Directives(format!(
            "proxy_buffering off;\nif ($request_uri ~ \"/blobs/sha256:\") {{ return 307 {}$request_uri; }}",
            storage.url()
        )))
        .await;
    // The manifest makes the cache hold a token for the repository first.
    let m = rig
        .request(Method::GET, "/v2/library/redir/manifests/1", &[ALL])
        .await;
    assert_eq!(m.status, 200);
    let b = rig
        .request(
            Method::GET,
            &format!("/v2/library/redir/blobs/{}", layer.digest),
            &[],
        )
        .await;
    assert_eq!(b.status, 200);
    assert_eq!(b.body, layer.bytes);
    let seen = storage.authorizations();
    assert_eq!(
        seen,
        vec![None],
        "the storage host got no Authorization header"
    );
    assert_eq!(
        rig.front.count("GET", &layer.digest),
        1,
        "the registry was asked first"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_is_reused_until_it_expires_then_fetched_again() {
    let img = Image::single(36);
    let rig = Rig::start_with(
        Registry::token()
            .token_lifetime(10)
            .image("library/exp", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    let tokens = rig.upstream.token_server().unwrap();
    let before = tokens.issued();
    let blob = |i: usize| format!("/v2/library/exp/blobs/{}", img.own_blobs()[i % 2].digest);
    for i in 0..4 {
        assert_eq!(rig.request(Method::GET, &blob(i), &[]).await.status, 200);
    }
    assert_eq!(tokens.issued() - before, 1, "reused while valid");
    // A 10 s token is kept for half its life; past it the next request fetches a new one.
    tokio::time::sleep(std::time::Duration::from_millis(6000)).await;
    let m = rig
        .request(Method::GET, "/v2/library/exp/manifests/1", &[ALL])
        .await;
    assert_eq!(m.status, 200);
    assert_eq!(tokens.issued() - before, 2, "fetched again after expiry");
}
