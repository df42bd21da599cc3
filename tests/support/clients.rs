//! Real clients, each confined to its own temp dirs: skopeo, containerd (`ctr`) and podman.
//!
//! ```ignore
//! skopeo_copy(&format!("{}/library/x:1", up.host()), out.path()).all().await?;
//! let ctd = Containerd::start().await;
//! ctd.mirror("docker.io", &cache.url());
//! ctd.pull("docker.io/library/x:1").await?;
//! let podman = Podman::new();
//! podman.mirror("docker.io", &cache.host());
//! podman.pull("docker.io/library/x:1").await?;
//! ```
//! Every client call runs the CLI on a blocking thread with a deadline, so an in-process
//! server on the same runtime keeps serving, and a stuck client fails the test instead of
//! hanging it. There is no real internet here: a mirror miss falls back to
//! registry-1.docker.io and fails, which is what tests of a broken mirror should see.

use std::fs::File;
use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Child, Credentials, Finished};

/// How long a single client command (a pull, a copy) may take.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// What a client call yields: its output on success, its stderr (and stdout) on failure.
pub type ClientResult = Result<Finished, String>;

type Pending = Pin<Box<dyn Future<Output = ClientResult> + Send>>;

async fn run_checked(command: Command) -> ClientResult {
    let shown = format!("{command:?}");
    let done = super::run_async(command, CLIENT_TIMEOUT).await?;
    if done.success {
        Ok(done)
    } else {
        Err(format!(
            "{shown} failed\nstderr:\n{}\nstdout:\n{}",
            done.stderr, done.stdout
        ))
    }
}

/// `user:pass` as the CLIs want it.
fn user_pass(credentials: &Credentials) -> String {
    format!("{}:{}", credentials.user, credentials.pass)
}

// ---------------------------------------------------------------------------------------
// skopeo

/// Starts describing `skopeo copy docker://SRC oci:DEST`; `.await` it to run.
///
/// `src` is `HOST:PORT/REPO:TAG` (a leading `docker://` is optional); plain HTTP is allowed.
pub fn skopeo_copy(src: &str, dest_dir: &Path) -> SkopeoCopy {
    let src = src.strip_prefix("docker://").unwrap_or(src).to_string();
    SkopeoCopy {
        src,
        dest: dest_dir.to_path_buf(),
        all: false,
        credentials: None,
        arch: None,
    }
}

/// A `skopeo copy` about to run; see [`skopeo_copy`].
#[must_use = "a copy does nothing until awaited"]
pub struct SkopeoCopy {
    src: String,
    dest: PathBuf,
    all: bool,
    credentials: Option<Credentials>,
    arch: Option<String>,
}

impl SkopeoCopy {
    /// Copies every platform of an index (`--all`).
    pub fn all(mut self) -> Self {
        self.all = true;
        self
    }

    /// Authenticates to the source (`--src-creds user:pass`).
    pub fn creds(mut self, credentials: &Credentials) -> Self {
        self.credentials = Some(credentials.clone());
        self
    }

    /// Authenticates to the source if `credentials` is `Some`.
    pub fn creds_opt(mut self, credentials: Option<&Credentials>) -> Self {
        self.credentials = credentials.cloned();
        self
    }

    /// Picks this architecture from an index (`--override-arch`).
    pub fn arch(mut self, arch: &str) -> Self {
        self.arch = Some(arch.to_string());
        self
    }

    /// The command that will run.
    pub fn command(&self) -> Command {
        let mut command = Command::new("skopeo");
        // Our own policy choice, not whatever /etc/containers/policy.json says.
        command.args(["--insecure-policy", "copy", "--src-tls-verify=false"]);
        if self.all {
            command.arg("--all");
        }
        if let Some(credentials) = &self.credentials {
            command.arg("--src-creds").arg(user_pass(credentials));
        }
        if let Some(arch) = &self.arch {
            command.args(["--override-arch", arch]);
        }
        command
            .arg(format!("docker://{}", self.src))
            .arg(format!("oci:{}", self.dest.display()));
        command
    }
}

impl IntoFuture for SkopeoCopy {
    type Output = ClientResult;
    type IntoFuture = Pending;

    fn into_future(self) -> Pending {
        Box::pin(run_checked(self.command()))
    }
}

// ---------------------------------------------------------------------------------------
// containerd

/// A containerd 1.6 daemon of our own (root, state, socket, hosts dir in a temp dir).
pub struct Containerd {
    child: Child,
    socket: PathBuf,
    hosts: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Starts containerd with the native snapshotter and waits for `ctr version`.
    pub async fn start() -> Containerd {
        let dir = super::temp_dir("containerd");
        let hosts = dir.path().join("hosts");
        std::fs::create_dir_all(&hosts).expect("create hosts dir");
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, containerd_config(dir.path(), &socket, &hosts))
            .expect("write containerd config");
        let log = dir.path().join("containerd.log");
        let out = File::create(&log).expect("create containerd log");
        let child = Child::spawn(
            "containerd",
            Command::new("containerd")
                .arg("--config")
                .arg(&config)
                .stdout(Stdio::from(out.try_clone().unwrap()))
                .stderr(Stdio::from(out)),
        )
        .unwrap_or_else(|e| panic!("{e} (apt-get install containerd)"));
        let mut containerd = Containerd {
            child,
            socket,
            hosts,
            log,
            dir,
        };
        containerd.wait_ready().await;
        containerd
    }

    async fn wait_ready(&mut self) {
        let socket = self.socket.clone();
        let mut why = None;
        let result = super::wait_until("containerd (ctr version)", super::READY_TIMEOUT, || {
            why = why.take().or_else(|| self.child.exited());
            let gone = why.is_some();
            let socket = socket.clone();
            async move {
                if gone {
                    return Some(false);
                }
                let mut command = Command::new("ctr");
                command.arg("-a").arg(&socket).arg("version");
                let done = super::run_async(command, Duration::from_secs(5))
                    .await
                    .ok()?;
                done.success.then_some(true)
            }
        })
        .await;
        match result {
            Ok(true) => {}
            Ok(false) => panic!(
                "containerd exited: {}\n{}",
                why.unwrap_or_default(),
                self.log_tail()
            ),
            Err(e) => panic!("{e}\n{}", self.log_tail()),
        }
    }

    /// Its gRPC socket, for `ctr -a` (and CRI clients: the CRI plugin serves the same socket).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The hosts dir given to `--hosts-dir` and to the CRI plugin's `config_path`.
    pub fn hosts_dir(&self) -> &Path {
        &self.hosts
    }

    /// Its config file, whose CRI `config_path` names [`Containerd::hosts_dir`].
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// Where the native snapshotter unpacks layers (one numbered dir per snapshot).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("root/io.containerd.snapshotter.v1.native/snapshots")
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        super::tail(&self.log, 40)
    }

    /// Sends `registry` (e.g. `docker.io`) to `mirror_url` (e.g. `http://127.0.0.1:PORT`) first.
    ///
    /// Writes `HOSTS/<registry>/hosts.toml`; the real registry stays the fallback `server`.
    pub fn mirror(&self, registry: &str, mirror_url: &str) -> &Self {
        let server = if registry == "docker.io" {
            "https://registry-1.docker.io".to_string()
        } else {
            format!("https://{registry}")
        };
        let dir = self.hosts.join(registry);
        std::fs::create_dir_all(&dir).expect("create hosts.toml dir");
        let toml = format!(
            "server = \"{server}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
        );
        std::fs::write(dir.join("hosts.toml"), toml).expect("write hosts.toml");
        self
    }

    /// Starts describing `ctr images pull` of `reference`; `.await` it to run.
    pub fn pull(&self, reference: &str) -> CtrPull {
        CtrPull {
            command: self.ctr(),
            hosts: self.hosts.clone(),
            reference: reference.to_string(),
            platform: None,
            all_platforms: false,
            credentials: None,
        }
    }

    /// `ctr -a SOCK` with nothing else: add any subcommand.
    pub fn ctr(&self) -> Command {
        let mut command = Command::new("ctr");
        command.arg("-a").arg(&self.socket);
        command
    }

    /// Runs `ctr -a SOCK ARGS…` and returns its output or its stderr.
    pub async fn run(&self, args: &[&str]) -> ClientResult {
        let mut command = self.ctr();
        command.args(args);
        run_checked(command).await
    }

    /// The image names containerd holds (`ctr images ls -q`).
    pub async fn images(&self) -> Vec<String> {
        let done = self
            .run(&["images", "ls", "-q"])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        done.stdout.lines().map(str::to_string).collect()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.child.kill();
        super::unmount_all_under(self.dir.path());
    }
}

/// A `ctr images pull` about to run; see [`Containerd::pull`].
#[must_use = "a pull does nothing until awaited"]
pub struct CtrPull {
    command: Command,
    hosts: PathBuf,
    reference: String,
    platform: Option<String>,
    all_platforms: bool,
    credentials: Option<Credentials>,
}

impl CtrPull {
    /// Pulls and unpacks this platform (`--platform linux/arm64`), not the host's.
    pub fn platform(mut self, platform: &str) -> Self {
        self.platform = Some(platform.to_string());
        self
    }

    /// Fetches every platform of an index (`--all-platforms`).
    pub fn all_platforms(mut self) -> Self {
        self.all_platforms = true;
        self
    }

    /// Authenticates (`--user user:pass`).
    pub fn creds(mut self, credentials: &Credentials) -> Self {
        self.credentials = Some(credentials.clone());
        self
    }
}

impl IntoFuture for CtrPull {
    type Output = ClientResult;
    type IntoFuture = Pending;

    fn into_future(mut self) -> Pending {
        self.command
            .args(["images", "pull", "--snapshotter", "native", "--hosts-dir"])
            .arg(&self.hosts);
        if let Some(platform) = &self.platform {
            self.command.args(["--platform", platform]);
        }
        if self.all_platforms {
            self.command.arg("--all-platforms");
        }
        if let Some(credentials) = &self.credentials {
            self.command.arg("--user").arg(user_pass(credentials));
        }
        self.command.arg(&self.reference);
        Box::pin(run_checked(self.command))
    }
}

fn containerd_config(dir: &Path, socket: &Path, hosts: &Path) -> String {
    let d = dir.display();
    let s = socket.display();
    let h = hosts.display();
    // Snapshotters that probe kernel features we may not have are disabled; CRI starts fine
    // without CNI (it only logs that pod networking is not configured). Debug and metrics
    // listeners are off and the CRI stream server takes port 0, so instances never collide.
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
]

[grpc]
  address = "{s}"

[ttrpc]
  address = "{s}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{h}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
    )
}

// ---------------------------------------------------------------------------------------
// podman

/// Podman confined to its own storage (vfs), run root, tmp dir and config files.
pub struct Podman {
    dir: tempfile::TempDir,
    mirrors: std::sync::Mutex<Vec<(String, String)>>,
}

impl Podman {
    /// Prepares an empty podman world in a temp dir (no daemon to start).
    pub fn new() -> Podman {
        let dir = super::temp_dir("podman");
        let d = dir.path();
        for sub in ["root", "runroot", "tmp"] {
            std::fs::create_dir_all(d.join(sub)).expect("create podman dirs");
        }
        std::fs::write(
            d.join("policy.json"),
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )
        .expect("write policy.json");
        std::fs::write(
            d.join("storage.conf"),
            format!(
                "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
                d.join("runroot").display(),
                d.join("root").display()
            ),
        )
        .expect("write storage.conf");
        // No systemd (PID 1) and no journald in this sandbox: cgroupfs and a file event log.
        std::fs::write(
            d.join("containers.conf"),
            format!(
                "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nevents_logfile_path = \"{}\"\ntmp_dir = \"{}\"\n",
                d.join("events.log").display(),
                d.join("tmp").display()
            ),
        )
        .expect("write containers.conf");
        let podman = Podman {
            dir,
            mirrors: std::sync::Mutex::new(Vec::new()),
        };
        podman.write_registries_conf();
        podman
    }

    /// Sends pulls of `prefix` (e.g. `docker.io`) to the plain-HTTP mirror `host` (`127.0.0.1:PORT`).
    pub fn mirror(&self, prefix: &str, host: &str) -> &Self {
        self.mirrors
            .lock()
            .unwrap()
            .push((prefix.to_string(), host.to_string()));
        self.write_registries_conf();
        self
    }

    fn write_registries_conf(&self) {
        let mut text = String::from("unqualified-search-registries = []\n");
        for (prefix, host) in self.mirrors.lock().unwrap().iter() {
            let location = if prefix == "docker.io" {
                "registry-1.docker.io"
            } else {
                prefix.as_str()
            };
            text.push_str(&format!(
                "\n[[registry]]\nprefix = \"{prefix}\"\nlocation = \"{location}\"\n\n[[registry.mirror]]\nlocation = \"{host}\"\ninsecure = true\n"
            ));
        }
        std::fs::write(self.dir.path().join("registries.conf"), text)
            .expect("write registries.conf");
    }

    /// `podman` with this instance's storage, run root, config files and flags.
    pub fn podman(&self) -> Command {
        let d = self.dir.path();
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"))
            .env("TMPDIR", d.join("tmp"))
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(["--events-backend", "file"])
            .arg("--tmpdir")
            .arg(d.join("tmp"));
        command
    }

    /// Starts describing `podman pull REFERENCE`; `.await` it to run.
    pub fn pull(&self, reference: &str) -> PodmanPull {
        PodmanPull {
            command: self.podman(),
            policy: self.dir.path().join("policy.json"),
            reference: reference.to_string(),
            arch: None,
            credentials: None,
        }
    }

    /// Runs `podman ARGS…` and returns its output or its stderr.
    pub async fn run(&self, args: &[&str]) -> ClientResult {
        let mut command = self.podman();
        command.args(args);
        run_checked(command).await
    }
}

impl Default for Podman {
    fn default() -> Self {
        Podman::new()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        super::unmount_all_under(self.dir.path());
    }
}

/// A `podman pull` about to run; see [`Podman::pull`].
#[must_use = "a pull does nothing until awaited"]
pub struct PodmanPull {
    command: Command,
    policy: PathBuf,
    reference: String,
    arch: Option<String>,
    credentials: Option<Credentials>,
}

impl PodmanPull {
    /// Picks this architecture from an index (`--arch`).
    pub fn arch(mut self, arch: &str) -> Self {
        self.arch = Some(arch.to_string());
        self
    }

    /// Authenticates (`--creds user:pass`).
    pub fn creds(mut self, credentials: &Credentials) -> Self {
        self.credentials = Some(credentials.clone());
        self
    }
}

impl IntoFuture for PodmanPull {
    type Output = ClientResult;
    type IntoFuture = Pending;

    fn into_future(mut self) -> Pending {
        self.command
            .args(["pull", "--quiet", "--signature-policy"])
            .arg(&self.policy);
        if let Some(arch) = &self.arch {
            self.command.args(["--arch", arch]);
        }
        if let Some(credentials) = &self.credentials {
            self.command.arg("--creds").arg(user_pass(credentials));
        }
        self.command.arg(&self.reference);
        Box::pin(run_checked(self.command))
    }
}
