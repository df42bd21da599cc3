//! A real CNCF Distribution (`docker-registry serve`) as the upstream, seeded with images.
//!
//! ```ignore
//! let up = Registry::token().image("library/alpine", "3", Image::multi_arch(1)).start().await;
//! ```
//! `start()` is async: it may start a [`TokenServer`] on the test runtime and push images.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::images::{Image, RegistryClient};
use super::token::TokenServer;
use super::{Child, Credentials};

/// A running Distribution registry with its own temp root; killed when dropped.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    credentials: Option<Credentials>,
    token: Option<TokenServer>,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// How the registry will authenticate clients.
#[derive(Clone, Debug)]
enum Auth {
    Anonymous,
    Basic(Credentials),
    Token(Option<Credentials>),
}

/// Describes a registry before starting it; see [`Registry::anonymous`] and friends.
pub struct RegistryBuilder {
    auth: Auth,
    images: Vec<(String, String, Image)>,
    /// The token server's `expires_in`, if not its default.
    token_lifetime: Option<u64>,
}

impl Registry {
    /// A registry that lets anyone pull and push.
    pub fn anonymous() -> RegistryBuilder {
        RegistryBuilder::new(Auth::Anonymous)
    }

    /// A registry behind htpasswd Basic auth (bcrypt cost 4) with one user.
    pub fn basic(user: &str, pass: &str) -> RegistryBuilder {
        RegistryBuilder::new(Auth::Basic(Credentials::new(user, pass)))
    }

    /// A registry behind Docker-Hub-style Bearer auth with an anonymous token server.
    pub fn token() -> RegistryBuilder {
        RegistryBuilder::new(Auth::Token(None))
    }

    /// A registry behind Bearer auth whose token server demands these credentials.
    pub fn token_with_credentials(user: &str, pass: &str) -> RegistryBuilder {
        RegistryBuilder::new(Auth::Token(Some(Credentials::new(user, pass))))
    }

    /// Its listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `127.0.0.1:PORT`, the host part of an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The credentials clients need (Basic user, or the token server's user), if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.credentials.as_ref()
    }

    /// The token server, for a registry started with [`Registry::token`].
    pub fn token_server(&self) -> Option<&TokenServer> {
        self.token.as_ref()
    }

    /// A distribution-spec client for this registry, authenticating as needed.
    pub fn client(&self) -> RegistryClient {
        RegistryClient::new(&self.url(), self.credentials.clone())
    }

    /// Pushes `image` as `repo:tag`, panicking with the registry log on failure.
    pub async fn push(&self, repo: &str, tag: &str, image: &Image) {
        if let Err(e) = self.client().push(repo, tag, image).await {
            panic!(
                "push {repo}:{tag} to {} failed: {e}\nregistry log:\n{}",
                self.url(),
                self.log_tail()
            );
        }
    }

    /// The last lines of its stderr log.
    pub fn log_tail(&self) -> String {
        super::tail(&self.log, 40)
    }

    /// Its storage root (`storage.filesystem.rootdirectory`).
    pub fn storage_root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Kills it now, e.g. to test an upstream that went away (the port stays closed).
    pub fn stop(&mut self) {
        self.child.kill();
    }
}

impl RegistryBuilder {
    fn new(auth: Auth) -> Self {
        RegistryBuilder {
            auth,
            images: Vec::new(),
            token_lifetime: None,
        }
    }

    /// Tokens the token server issues live this many seconds.
    pub fn token_lifetime(mut self, seconds: u64) -> Self {
        self.token_lifetime = Some(seconds);
        self
    }

    /// Pushes `image` as `repo:tag` once the registry is up.
    pub fn image(mut self, repo: &str, tag: &str, image: Image) -> Self {
        self.images.push((repo.to_string(), tag.to_string(), image));
        self
    }

    /// Starts the registry (and its token server), waits for `GET /v2/`, pushes the images.
    pub async fn start(self) -> Registry {
        let dir = super::temp_dir("registry");
        let (credentials, token, auth_yaml) = match &self.auth {
            Auth::Anonymous => (None, None, String::new()),
            Auth::Basic(c) => {
                let path = dir.path().join("htpasswd");
                write_htpasswd(&path, c);
                let yaml = format!(
                    "auth:\n  htpasswd:\n    realm: pullthrough-test\n    path: {}\n",
                    path.display()
                );
                (Some(c.clone()), None, yaml)
            }
            Auth::Token(c) => {
                let mut server = match c {
                    Some(c) => TokenServer::with_credentials(&c.user, &c.pass),
                    None => TokenServer::anonymous(),
                };
                if let Some(seconds) = self.token_lifetime {
                    server = server.expires_in(seconds);
                }
                let server = server.start().await;
                let yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    server.realm(),
                    server.service(),
                    server.issuer(),
                    server.cert_path().display()
                );
                (c.clone(), Some(server), yaml)
            }
        };
        let mut failures = Vec::new();
        for attempt in 0..5 {
            let port = super::free_port();
            let instance = super::instance_id();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                config_yaml(dir.path(), port, &instance, &auth_yaml),
            )
            .expect("write registry config");
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let out = File::create(&log).expect("create registry log");
            let mut child = Child::spawn(
                "docker-registry",
                Command::new("docker-registry")
                    .arg("serve")
                    .arg(&config)
                    .stdout(Stdio::from(out.try_clone().unwrap()))
                    .stderr(Stdio::from(out)),
            )
            .unwrap_or_else(|e| panic!("{e} (apt-get install docker-registry)"));
            match wait_ready(&mut child, port, &instance).await {
                Ok(()) => {
                    let registry = Registry {
                        child,
                        addr: super::localhost(port),
                        credentials,
                        token,
                        log,
                        dir,
                    };
                    for (repo, tag, image) in &self.images {
                        registry.push(repo, tag, image).await;
                    }
                    return registry;
                }
                Err(e) => {
                    drop(child);
                    let tail = super::tail(&log, 40);
                    let collided = tail.contains("address already in use");
                    failures.push(format!("attempt {attempt} on port {port}: {e}\n{tail}"));
                    if !collided {
                        break;
                    }
                }
            }
        }
        panic!(
            "docker-registry did not become ready:\n{}",
            failures.join("\n---\n")
        );
    }
}

/// Ready when `GET /v2/` answers 200 or 401 *from our instance* (a header only it sends).
async fn wait_ready(child: &mut Child, port: u16, instance: &str) -> Result<(), String> {
    let probe = super::probe_client();
    let url = format!("http://127.0.0.1:{port}/v2/");
    let mut exited = None;
    let result = super::wait_until("docker-registry GET /v2/", super::READY_TIMEOUT, || {
        exited = exited.take().or_else(|| child.exited());
        let gone = exited.is_some();
        let probe = probe.clone();
        let url = url.clone();
        async move {
            if gone {
                return Some(false);
            }
            let response = probe.get(&url).send().await.ok()?;
            let ours = response
                .headers()
                .get("x-pullthrough-instance")
                .is_some_and(|v| v.as_bytes() == instance.as_bytes());
            let status = response.status().as_u16();
            (ours && (status == 200 || status == 401)).then_some(true)
        }
    })
    .await?;
    match (result, exited) {
        (true, _) => Ok(()),
        (false, why) => Err(why.unwrap_or_else(|| "docker-registry exited".into())),
    }
}

fn config_yaml(dir: &Path, port: u16, instance: &str, auth: &str) -> String {
    format!(
        "version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: pullthrough-test-secret
  headers:
    X-Pullthrough-Instance: [\"{instance}\"]
{auth}",
        root = dir.join("data").display(),
    )
}

/// bcrypt at cost 4: at the default cost every request burns ~0.5 s of CPU.
fn write_htpasswd(path: &Path, credentials: &Credentials) {
    let done = super::run(
        Command::new("htpasswd")
            .args(["-Bbn", "-C", "4"])
            .arg(&credentials.user)
            .arg(&credentials.pass),
        super::READY_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e} (apt-get install apache2-utils)"));
    assert!(done.success, "htpasswd failed: {}", done.stderr);
    std::fs::write(path, done.stdout).expect("write htpasswd");
}
