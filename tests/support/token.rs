//! A Docker-Hub-style token server, in-process: `GET /token?service=…&scope=…` → RS256 JWT.
//!
//! Distribution verifies the JWT against `auth.token.rootcertbundle`; the signing certificate
//! travels in the header's `x5c`, so a self-signed certificate made with the `openssl` CLI at
//! test time is enough (see FIELD-NOTES, "Bearer").

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine as _;
use serde::Serialize;

use super::Credentials;

/// The `service` (JWT audience) every test token server and registry agree on.
pub const SERVICE: &str = "pullthrough-test-registry";
/// The `issuer` every test token server signs as and every registry trusts.
pub const ISSUER: &str = "pullthrough-test-issuer";

/// A running token server; stops when dropped.
pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cert_path: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

/// How a [`TokenServer`] will behave once started.
pub struct TokenServerBuilder {
    credentials: Option<Credentials>,
    expires_in: u64,
}

/// One request the token server received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// `GET` (Docker token flow) or `POST` (OAuth2 form flow).
    pub method: String,
    /// The scopes asked for, e.g. `repository:library/alpine:pull`.
    pub scopes: Vec<String>,
    /// The user name presented, if any.
    pub account: Option<String>,
    /// Whether a token was issued (false when credentials were missing or wrong).
    pub granted: bool,
}

/// One entry of the JWT `access` claim.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Access {
    /// Resource type, e.g. `repository`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Resource name, e.g. `library/alpine`.
    pub name: String,
    /// Granted actions, e.g. `["pull", "push"]`.
    pub actions: Vec<String>,
}

#[derive(Serialize)]
struct Claims {
    iss: String,
    aud: String,
    sub: String,
    iat: u64,
    nbf: u64,
    exp: u64,
    jti: String,
    access: Vec<Access>,
}

struct Shared {
    credentials: Option<Credentials>,
    expires_in: u64,
    key: jsonwebtoken::EncodingKey,
    x5c: String,
    requests: AtomicUsize,
    issued: AtomicUsize,
    next_jti: AtomicU64,
    log: Mutex<Vec<TokenRequest>>,
}

/// Key and certificate generated once per test binary: `openssl` RSA keygen is slow-ish.
struct KeyMaterial {
    key_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    cert_der_b64: String,
}

static KEY_MATERIAL: OnceLock<KeyMaterial> = OnceLock::new();

fn key_material() -> &'static KeyMaterial {
    KEY_MATERIAL.get_or_init(|| {
        let dir = super::temp_dir("tokenkey");
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let done = super::run(
            std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3",
                ])
                .args(["-subj", "/CN=pullthrough-test-token-issuer"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert),
            super::READY_TIMEOUT,
        )
        .expect("run openssl");
        assert!(done.success, "openssl req failed:\n{}", done.stderr);
        let key_pem = std::fs::read(&key).expect("read key");
        let cert_pem = std::fs::read(&cert).expect("read cert");
        // The body of a PEM certificate is the base64 of its DER: exactly what `x5c` wants.
        let body: String = String::from_utf8_lossy(&cert_pem)
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(&body)
            .expect("certificate PEM body is base64");
        KeyMaterial {
            key_pem,
            cert_pem,
            cert_der_b64: base64::engine::general_purpose::STANDARD.encode(der),
        }
    })
}

impl TokenServer {
    /// A token server that issues tokens to anyone, like Docker Hub for anonymous pulls.
    pub fn anonymous() -> TokenServerBuilder {
        TokenServerBuilder {
            credentials: None,
            expires_in: 300,
        }
    }

    /// A token server that answers 401 unless given these Basic (or OAuth2 form) credentials.
    pub fn with_credentials(user: &str, pass: &str) -> TokenServerBuilder {
        TokenServerBuilder {
            credentials: Some(Credentials::new(user, pass)),
            expires_in: 300,
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The realm URL to put in `auth.token.realm`: `http://127.0.0.1:PORT/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The `service` it expects and puts in `aud`.
    pub fn service(&self) -> &'static str {
        SERVICE
    }

    /// The `iss` it signs as.
    pub fn issuer(&self) -> &'static str {
        ISSUER
    }

    /// A PEM file holding its signing certificate, for `auth.token.rootcertbundle`.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }

    /// The credentials it demands, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.shared.credentials.as_ref()
    }

    /// How many requests reached it (granted or not).
    pub fn requests(&self) -> usize {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// How many tokens it issued.
    pub fn issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    /// Every request it received, oldest first.
    pub fn log(&self) -> Vec<TokenRequest> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Signs a token for `scopes` (e.g. `repository:library/x:pull`) without an HTTP round trip.
    pub fn issue(&self, subject: &str, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.shared.sign(subject, &scopes)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TokenServerBuilder {
    /// Sets the token lifetime in seconds (`exp` and `expires_in`); 300 by default.
    pub fn expires_in(mut self, seconds: u64) -> Self {
        self.expires_in = seconds;
        self
    }

    /// Binds 127.0.0.1:0 with a listen backlog of 1024 and serves until dropped.
    pub async fn start(self) -> TokenServer {
        let material = tokio::task::spawn_blocking(key_material)
            .await
            .expect("key generation thread");
        let dir = super::temp_dir("token");
        let cert_path = dir.path().join("token-signer.crt");
        std::fs::write(&cert_path, &material.cert_pem).expect("write cert");
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&material.key_pem).expect("RSA key");
        let shared = Arc::new(Shared {
            credentials: self.credentials,
            expires_in: self.expires_in,
            key,
            x5c: material.cert_der_b64.clone(),
            requests: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
            next_jti: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        // Storms hit the token server too: a large backlog keeps connects from being dropped.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket.bind(super::localhost(0)).expect("bind token server");
        let listener = socket.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("local addr");
        let app = Router::new()
            .route("/token", get(token_get).post(token_post))
            .with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenServer {
            addr,
            shared,
            cert_path,
            _dir: dir,
            task,
        }
    }
}

impl Shared {
    fn sign(&self, subject: &str, scopes: &[String]) -> String {
        let now = unix_now();
        let jti = format!("{}-{}", now, self.next_jti.fetch_add(1, Ordering::Relaxed));
        let claims = Claims {
            iss: ISSUER.to_string(),
            aud: SERVICE.to_string(),
            sub: subject.to_string(),
            iat: now,
            nbf: now.saturating_sub(10),
            exp: now + self.expires_in,
            jti,
            access: scopes.iter().filter_map(|s| parse_scope(s)).collect(),
        };
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5c = Some(vec![self.x5c.clone()]);
        jsonwebtoken::encode(&header, &claims, &self.key).expect("sign JWT")
    }

    fn answer(
        &self,
        method: Method,
        scopes: Vec<String>,
        presented: Option<Credentials>,
    ) -> Response {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let granted = match (&self.credentials, &presented) {
            (None, _) => true,
            (Some(wanted), Some(given)) => wanted == given,
            (Some(_), None) => false,
        };
        self.log.lock().unwrap().push(TokenRequest {
            method: method.to_string(),
            scopes: scopes.clone(),
            account: presented.as_ref().map(|c| c.user.clone()),
            granted,
        });
        if !granted {
            return (
                StatusCode::UNAUTHORIZED,
                [
                    (
                        header::WWW_AUTHENTICATE,
                        "Basic realm=\"pullthrough-test-token\"",
                    ),
                    (header::CONTENT_TYPE, "application/json"),
                ],
                r#"{"details":"incorrect username or password"}"#,
            )
                .into_response();
        }
        let subject = presented.map(|c| c.user).unwrap_or_default();
        let token = self.sign(&subject, &scopes);
        self.issued.fetch_add(1, Ordering::SeqCst);
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": rfc3339(unix_now()),
        });
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

async fn token_get(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs = parse_form(query.as_deref().unwrap_or(""));
    let scopes = pairs
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    shared.answer(Method::GET, scopes, basic_credentials(&headers))
}

/// The OAuth2 password grant that containerd tries first when it has credentials.
async fn token_post(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let pairs = parse_form(&body);
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let scopes = field("scope")
        .unwrap_or_default()
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let presented = match (field("username"), field("password")) {
        (Some(user), Some(pass)) => Some(Credentials { user, pass }),
        _ => basic_credentials(&headers),
    };
    shared.answer(Method::POST, scopes, presented)
}

/// `repository:library/x:pull,push` → an access entry granting exactly what was asked.
fn parse_scope(scope: &str) -> Option<Access> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some(Access {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect(),
    })
}

fn basic_credentials(headers: &HeaderMap) -> Option<Credentials> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some(Credentials::new(user, pass))
}

/// Decodes `application/x-www-form-urlencoded` (also query strings) into pairs.
pub fn parse_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(hi), Some(lo)) => {
                    out.push((hi * 16 + lo) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// Formats Unix seconds as RFC 3339 UTC (`2024-01-02T03:04:05Z`) without a date crate.
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}
