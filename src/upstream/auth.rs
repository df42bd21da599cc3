//! The registry auth flow: `WWW-Authenticate` challenges, bearer tokens per scope.
//! See the distribution "token authentication specification" (docker/distribution
//! `docs/spec/auth/token.md`): realm, service and scope parameters; the token
//! endpoint answers `token` or `access_token` with `expires_in` (default 60 s).

use super::UpstreamErrorKind;
use crate::config::Credentials;
use base64::Engine;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tokens are dropped this long before they expire, so none expires in flight.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// The longest a token request may take, start to end.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// What the token spec says to assume when `expires_in` is absent.
const DEFAULT_EXPIRES_IN: u64 = 60;

/// A parsed `WWW-Authenticate` challenge we can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// Fetch a token from `realm`.
    Bearer {
        /// The token endpoint's URL.
        realm: String,
        /// The `service` to ask a token for.
        service: Option<String>,
        /// The scope upstream wants, if it said.
        scope: Option<String>,
    },
    /// Send the credentials with every request.
    Basic,
}

impl Challenge {
    /// Parses one `WWW-Authenticate` header value, keeping the first challenge we can answer.
    pub fn parse(header: &str) -> Option<Challenge> {
        let challenges = http_auth::parse_challenges(header).ok()?;
        challenges.into_iter().find_map(|c| {
            let param = |name: &str| {
                c.params
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.to_unescaped())
            };
            if c.scheme.eq_ignore_ascii_case("bearer") {
                Some(Challenge::Bearer {
                    realm: param("realm")?,
                    service: param("service"),
                    scope: param("scope"),
                })
            } else if c.scheme.eq_ignore_ascii_case("basic") {
                Some(Challenge::Basic)
            } else {
                None
            }
        })
    }
}

struct Token {
    header: HeaderValue,
    expires: Instant,
}

/// Auth state of one upstream, shared by every client of it.
pub struct Auth {
    basic: Option<HeaderValue>,
    /// The upstream speaks https: its credentials never go to a plain-http realm.
    require_tls: bool,
    /// Set once upstream asked for Basic; from then on every request carries it.
    use_basic: std::sync::atomic::AtomicBool,
    /// A std mutex: only ever held to read or insert, never across an await.
    tokens: Mutex<HashMap<String, Token>>,
    /// One lock per scope: a burst of clients for a repository makes one token
    /// fetch, not one each, while other repositories' fetches go on in parallel.
    /// (The outer lock is std: held only to find or insert a scope's lock.)
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Auth {
    /// Auth state for an upstream with these credentials (or none: anonymous).
    pub fn new(credentials: Option<Credentials>, require_tls: bool) -> Auth {
        let basic = credentials.as_ref().map(|c| {
            let raw = format!("{}:{}", c.username, c.password.expose());
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
            let mut v = HeaderValue::from_str(&format!("Basic {encoded}"))
                .expect("base64 is a valid header value");
            v.set_sensitive(true);
            v
        });
        Auth {
            basic,
            require_tls,
            use_basic: false.into(),
            tokens: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashMap::new()),
        }
    }

    /// The `Authorization` value to send for `scope`, if we have one.
    pub fn header_for(&self, scope: &str) -> Option<HeaderValue> {
        if self.use_basic.load(std::sync::atomic::Ordering::Relaxed) {
            return self.basic.clone();
        }
        let tokens = self.tokens.lock().expect("token cache poisoned");
        tokens
            .get(scope)
            .filter(|t| t.expires > Instant::now())
            .map(|t| t.header.clone())
    }

    /// Answers a challenge so that the next request for `scope` is authorised.
    /// `sent` is what the challenged request carried, so that a token another
    /// client fetched meanwhile is used rather than fetched again. Says whether
    /// a token was fetched.
    pub async fn answer(
        &self,
        client: &reqwest::Client,
        challenge: &Challenge,
        scope: &str,
        sent: Option<&HeaderValue>,
    ) -> Result<bool, UpstreamErrorKind> {
        match challenge {
            Challenge::Basic => {
                if self.basic.is_none() || sent.is_some() && sent == self.basic.as_ref() {
                    return Err(UpstreamErrorKind::Unauthorized);
                }
                self.use_basic
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(false)
            }
            Challenge::Bearer {
                realm,
                service,
                scope: asked,
            } => {
                let lock = self
                    .fetching
                    .lock()
                    .expect("token locks poisoned")
                    .entry(scope.to_string())
                    .or_default()
                    .clone();
                let _one_at_a_time = lock.lock().await;
                if let Some(current) = self.header_for(scope) {
                    if Some(&current) != sent {
                        return Ok(false); // fetched by another client while we waited
                    }
                }
                let scope_to_ask = asked.as_deref().unwrap_or(scope);
                let token = self
                    .fetch(client, realm, service.as_deref(), scope_to_ask)
                    .await?;
                self.tokens
                    .lock()
                    .expect("token cache poisoned")
                    .insert(scope.to_string(), token);
                Ok(true)
            }
        }
    }

    async fn fetch(
        &self,
        client: &reqwest::Client,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, UpstreamErrorKind> {
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| UpstreamErrorKind::Auth(format!("realm {realm:?} is not a URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = service {
                q.append_pair("service", service);
            }
            q.append_pair("scope", scope);
        }
        if self.basic.is_some() && self.require_tls && url.scheme() != "https" {
            return Err(UpstreamErrorKind::Auth(format!(
                "refusing to send credentials to a realm that is not https ({})",
                url.origin().ascii_serialization()
            )));
        }
        let mut req = client.get(url).timeout(TOKEN_TIMEOUT);
        if let Some(basic) = &self.basic {
            req = req.header(AUTHORIZATION, basic.clone());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| UpstreamErrorKind::Auth(format!("request failed: {e}")))?;
        match resp.status().as_u16() {
            200..=299 => {}
            401 => return Err(UpstreamErrorKind::Unauthorized),
            403 => return Err(UpstreamErrorKind::Denied),
            s => return Err(UpstreamErrorKind::Auth(format!("answered HTTP {s}"))),
        }
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| UpstreamErrorKind::Auth(format!("reading the answer: {e}")))?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| UpstreamErrorKind::Auth(format!("answer is not a token: {e}")))?;
        let value = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| UpstreamErrorKind::Auth("answer holds no token".into()))?;
        let mut header = HeaderValue::from_str(&format!("Bearer {value}"))
            .map_err(|_| UpstreamErrorKind::Auth("token is not a valid header value".into()))?;
        header.set_sensitive(true);
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(DEFAULT_EXPIRES_IN));
        // Short-lived tokens keep half their life, not nothing.
        let margin = EXPIRY_MARGIN.min(lifetime / 2);
        Ok(Token {
            header,
            expires: Instant::now() + lifetime.saturating_sub(margin),
        })
    }
}
