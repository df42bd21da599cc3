//! The `pullthrough` command: parses flags, loads configuration, runs.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use pullthrough::config::{Config, Overrides};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;

/// A pull-through cache and mirror for OCI container registries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log lines as human text or as JSON.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the pull API.
    Serve {
        /// A TOML configuration file, merged over the embedded default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides `[server] listen`).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (overrides `[storage] path`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Never contact any upstream; serve only what the store holds.
        #[arg(long)]
        offline: bool,
        /// Address of the admin listener (overrides `[server] admin_listen`).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
    },
    /// Pull images into the store: their manifests (the platforms wanted) and blobs.
    /// A second run transfers nothing already present.
    Seed {
        #[command(flatten)]
        images: ImageArgs,
        /// Seed through a running cache's registry API (`http://127.0.0.1:5000`)
        /// instead of opening the store (which the running cache holds).
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Node agent: ask the container runtime (CRI `ImageService`) to pull every
    /// image of a list it lacks; then run again when the list changes (or every
    /// `--interval`). `--once` does one pass and exits.
    Prepull {
        /// The runtime's CRI socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        cri_socket: PathBuf,
        /// The image list: one reference a line (`#` comments) or Kubernetes YAML.
        #[arg(long)]
        file: PathBuf,
        /// Pulls at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Retries of a failing pull, with jittered exponential backoff.
        #[arg(long, default_value_t = 3)]
        retries: u32,
        /// The first retry's backoff ceiling; also the first wait before a pass
        /// that found no runtime or left images unpulled runs again (doubling,
        /// up to 5 minutes).
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        backoff: std::time::Duration,
        /// Each pass starts after a random delay within this window, so that many
        /// nodes do not pull at the same second.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        jitter: std::time::Duration,
        /// Run again this often, besides when the list changes.
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<std::time::Duration>,
        /// How often to look whether the list changed.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        poll: std::time::Duration,
        /// Pull credentials: a Docker config.json (a dockerconfigjson Secret).
        #[arg(long)]
        auth_file: Option<PathBuf>,
        /// One pass, a summary, and exit (non-zero if an image failed).
        #[arg(long)]
        once: bool,
    },
    /// Write images as an OCI image layout: a tar if OUTPUT ends in `.tar`, else a
    /// directory. Images not yet in the store are seeded first.
    Export {
        /// Where to write the layout.
        #[arg(long)]
        output: PathBuf,
        #[command(flatten)]
        images: ImageArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Add an OCI image layout (directory or tar: ours, skopeo's, `docker save`'s)
    /// to the store, verifying every digest and size before anything is visible.
    Import {
        /// The layout: a directory or a tar file.
        path: PathBuf,
        /// Registry for image names without one (default: `default_upstream`).
        #[arg(long)]
        registry: Option<String>,
        /// Repository for images named by a bare tag.
        #[arg(long)]
        repository: Option<String>,
        /// Import into a running cache through its admin listener
        /// (`http://127.0.0.1:5001`); PATH must then be a tar.
        #[arg(long)]
        server: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print the embedded default configuration.
    DefaultConfig,
    /// Re-hash every stored blob; report (and with --repair quarantine) mismatches.
    /// Run it while the cache is stopped: the store is locked by a running cache.
    Verify {
        /// A TOML configuration file, for `[storage] path`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides `[storage] path`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Move mismatching files to `quarantine/` in the data directory.
        #[arg(long)]
        repair: bool,
    },
    /// Evict least recently used blobs down to the low watermark now (needs
    /// `[storage] max_size`), empty tmp/, and report what was freed.
    Gc {
        /// A TOML configuration file, for `[storage]`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides `[storage] path`).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Index maintenance.
    Index {
        #[command(subcommand)]
        command: IndexCommand,
    },
    /// Point this node's containerd at the cache: write DIR/<registry>/hosts.toml for each
    /// registry (or, with --restore, put back what was there) and check containerd's
    /// config_path. Run by the node DaemonSet; safe to run again.
    ContainerdConfig {
        /// The cache's base URL, e.g. http://pullthrough.pullthrough.svc:5000.
        #[arg(long, required_unless_present = "restore")]
        endpoint: Option<pullthrough::nodeconfig::Endpoint>,
        /// Registries to send through the cache, comma-separated (docker.io,ghcr.io,…).
        #[arg(long, required = true, value_delimiter = ',')]
        registries: Vec<pullthrough::nodeconfig::Registry>,
        /// containerd's hosts directory (its registry `config_path`).
        #[arg(long, default_value = "/etc/containerd/certs.d")]
        dir: PathBuf,
        /// containerd's config file, checked for a `config_path` naming --dir.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: PathBuf,
        /// Undo: restore the backed-up files, remove the ones pullthrough wrote.
        #[arg(long)]
        restore: bool,
    },
}

/// Which images, and which of their platforms.
#[derive(clap::Args)]
struct ImageArgs {
    /// Image references (`alpine:3.20`, `ghcr.io/org/app@sha256:…`).
    images: Vec<String>,
    /// An image list: one reference a line (`#` comments) or Kubernetes YAML; `-` is stdin.
    #[arg(long)]
    file: Vec<PathBuf>,
    /// A platform to take from multi-platform images (`os/arch[/variant]`);
    /// repeat it. Default: `[cache] prefetch_platforms`.
    #[arg(long)]
    platform: Vec<String>,
    /// Take every platform.
    #[arg(long, conflicts_with = "platform")]
    all_platforms: bool,
    /// Images, and blob downloads, at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

/// Where the store is.
#[derive(clap::Args)]
struct StoreArgs {
    /// A TOML configuration file (upstreams, `[storage]`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory (overrides `[storage] path`).
    #[arg(long)]
    data: Option<PathBuf>,
}

impl StoreArgs {
    fn load(&self) -> anyhow::Result<Config> {
        let overrides = Overrides {
            data: self.data.clone(),
            ..Overrides::default()
        };
        Ok(Config::load(self.config.as_deref(), &overrides)?)
    }
}

impl ImageArgs {
    fn list(&self) -> anyhow::Result<Vec<pullthrough::imagelist::ImageRef>> {
        let mut images = Vec::new();
        for text in &self.images {
            images.push(pullthrough::imagelist::ImageRef::parse(text)?);
        }
        for file in &self.file {
            images.extend(pullthrough::imagelist::read_list(file)?);
        }
        let mut seen = std::collections::HashSet::new();
        images.retain(|i| seen.insert(i.clone()));
        if images.is_empty() {
            anyhow::bail!("no images given: name them, or give a list with --file");
        }
        Ok(images)
    }

    fn options(&self, config: &Config) -> pullthrough::airgap::seed::SeedOptions {
        use pullthrough::airgap::Platforms;
        let platforms = if self.all_platforms {
            Platforms::All
        } else if self.platform.is_empty() {
            Platforms::Only(config.cache.prefetch_platforms.clone())
        } else {
            Platforms::Only(self.platform.clone())
        };
        pullthrough::airgap::seed::SeedOptions {
            platforms,
            concurrency: self.concurrency.max(1),
        }
    }
}

/// Seeds `images` and prints the summary; fails if any image failed.
async fn seed_all(
    puller: &pullthrough::airgap::seed::Puller,
    images: &ImageArgs,
    config: &Config,
) -> anyhow::Result<pullthrough::airgap::seed::SeedReport> {
    let list = images.list()?;
    let progress = pullthrough::airgap::seed::Progress::for_stderr();
    let report =
        pullthrough::airgap::seed::seed(puller, &list, &images.options(config), &progress).await;
    progress.finish();
    eprintln!("{report}");
    if !report.failures.is_empty() {
        anyhow::bail!("{} of {} images failed", report.failures.len(), list.len());
    }
    Ok(report)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the runtime")
}

#[derive(Subcommand)]
enum IndexCommand {
    /// Rebuild the index from the blob files (verifying them), keeping the old one aside.
    Rebuild {
        /// A TOML configuration file, for `[storage] path`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Data directory (overrides `[storage] path`).
        #[arg(long)]
        data: Option<PathBuf>,
    },
}

/// A progress bar on a terminal, nothing otherwise (the summary line always).
fn progress_bar(what: &'static str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    if std::io::stderr().is_terminal() {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(what);
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

fn store_at(config: Option<PathBuf>, data: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let overrides = Overrides {
        data,
        ..Overrides::default()
    };
    Ok(Config::load(config.as_deref(), &overrides)?.storage.path)
}

fn summary(report: &pullthrough::store::VerifyReport, started: std::time::Instant) {
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} files, {} bytes hashed in {:.1}s ({:.0} MiB/s); {} mismatching",
        report.files,
        report.bytes,
        secs,
        report.bytes as f64 / (1 << 20) as f64 / secs.max(1e-9),
        report.bad.len()
    );
    for bad in &report.bad {
        eprintln!("  mismatch: {}", bad.display());
    }
}

/// `containerd-config`: the files first, then the config check, which only warns.
fn containerd_config(
    endpoint: Option<pullthrough::nodeconfig::Endpoint>,
    registries: &[pullthrough::nodeconfig::Registry],
    dir: &std::path::Path,
    containerd_config: &std::path::Path,
    restore: bool,
) -> anyhow::Result<()> {
    use pullthrough::nodeconfig;
    if restore {
        print!("{}", nodeconfig::restore(dir, registries)?);
        return Ok(());
    }
    let endpoint = endpoint.context("--endpoint is required")?;
    print!("{}", nodeconfig::apply(dir, &endpoint, registries)?);
    match nodeconfig::check_containerd_config(containerd_config, dir) {
        Ok(check) if check.is_ok() => println!("{check}"),
        Ok(check) => eprintln!("pullthrough: warning: {check}"),
        Err(e) => eprintln!("pullthrough: warning: cannot check containerd's config: {e}"),
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes), not a debug dump.
            eprintln!("pullthrough: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", pullthrough::config::DEFAULT_CONFIG);
            Ok(())
        }
        Command::Verify {
            config,
            data,
            repair,
        } => {
            let path = store_at(config, data)?;
            let store = pullthrough::store::Store::open(&path)
                .with_context(|| format!("opening the store at {}", path.display()))?;
            let bar = progress_bar("verifying");
            let started = std::time::Instant::now();
            let report = store.verify(repair, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            summary(&report, started);
            if !report.bad.is_empty() && !repair {
                anyhow::bail!(
                    "{} blob(s) do not match their digest; run with --repair",
                    report.bad.len()
                );
            }
            Ok(())
        }
        Command::Gc { config, data } => {
            let overrides = Overrides {
                data,
                ..Overrides::default()
            };
            let config = Config::load(config.as_deref(), &overrides)?;
            let path = &config.storage.path;
            let store = pullthrough::store::Store::open(path).with_context(|| {
                format!(
                    "opening the store at {} (is the cache running?)",
                    path.display()
                )
            })?;
            let before = store.usage();
            let report = match config.storage.watermarks() {
                Some((_, _, low)) => store.evict_to(low)?,
                None => pullthrough::store::EvictReport::default(),
            };
            eprintln!(
                "store: {before} bytes before, {} after; evicted {} files ({} bytes){}",
                store.usage(),
                report.files,
                report.bytes,
                if config.storage.max_size.is_none() {
                    " (no [storage] max_size set: nothing to evict)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        Command::Index {
            command: IndexCommand::Rebuild { config, data },
        } => {
            let path = store_at(config, data)?;
            let index = path.join("index");
            // Fail now, and clearly, if a cache is running on this store; an
            // unreadable index is exactly what this command is for.
            let lock = pullthrough::store::Lock::take(&path)?;
            if index.exists() {
                let aside = path.join(format!(
                    "index.old-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ));
                std::fs::rename(&index, &aside)
                    .with_context(|| format!("moving {} aside", index.display()))?;
                eprintln!("old index kept at {}", aside.display());
            }
            drop(lock); // the store takes it again
            let store = pullthrough::store::Store::open(&path)?;
            let bar = progress_bar("rebuilding");
            let started = std::time::Instant::now();
            let report = store.rebuild_index(|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            summary(&report, started);
            eprintln!(
                "{} manifests indexed; tags and links come back on demand",
                report.manifests
            );
            Ok(())
        }
        Command::Seed {
            images,
            server,
            store,
        } => {
            let config = store.load()?;
            init_logging(cli.log_format);
            runtime()?.block_on(async {
                let puller = match server {
                    Some(base) => pullthrough::airgap::seed::Puller::Remote {
                        base: base.trim_end_matches('/').to_string(),
                        client: reqwest::Client::new(),
                    },
                    None => pullthrough::airgap::seed::Puller::Local(pullthrough::build(&config)?),
                };
                seed_all(&puller, &images, &config).await.map(|_| ())
            })
        }
        Command::Export {
            output,
            images,
            store,
        } => {
            let config = store.load()?;
            init_logging(cli.log_format);
            runtime()?.block_on(async {
                let cache = pullthrough::build(&config)?;
                let puller = pullthrough::airgap::seed::Puller::Local(cache.clone());
                let seeded = seed_all(&puller, &images, &config).await?;
                let written = tokio::task::spawn_blocking(move || {
                    pullthrough::airgap::export::write_layout(
                        cache.store(),
                        &seeded.images,
                        &output,
                    )
                })
                .await??;
                eprintln!("exported {written}");
                anyhow::Ok(())
            })
        }
        Command::Import {
            path,
            registry,
            repository,
            server,
            store,
        } => {
            let config = store.load()?;
            init_logging(cli.log_format);
            let registry = registry.unwrap_or_else(|| config.default_upstream.clone());
            runtime()?.block_on(async {
                if let Some(base) = server {
                    if !path.is_file() {
                        anyhow::bail!(
                            "--server takes a layout tar; for a directory: tar -cf layout.tar -C {} .",
                            path.display()
                        );
                    }
                    let file = tokio::fs::File::open(&path)
                        .await
                        .with_context(|| format!("opening {}", path.display()))?;
                    let mut query = vec![("registry", registry)];
                    query.extend(repository.map(|r| ("repository", r)));
                    let url = format!("{}/import", base.trim_end_matches('/'));
                    let resp = reqwest::Client::new()
                        .post(&url)
                        .query(&query)
                        .body(file)
                        .send()
                        .await
                        .with_context(|| format!("sending to {url}"))?;
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    if !status.is_success() {
                        anyhow::bail!("{url}: {status}: {}", text.trim());
                    }
                    eprintln!("imported into the running cache: {text}");
                    return Ok(());
                }
                let cache = pullthrough::build(&config)?;
                let options = pullthrough::airgap::import::ImportOptions {
                    registry,
                    repository,
                };
                let report = tokio::task::spawn_blocking(move || {
                    pullthrough::airgap::import::import_path(
                        cache.store(),
                        cache.upstreams(),
                        &path,
                        &options,
                    )
                })
                .await??;
                eprintln!("imported {report}");
                anyhow::Ok(())
            })
        }
        Command::Prepull {
            cri_socket,
            file,
            concurrency,
            retries,
            backoff,
            jitter,
            interval,
            poll,
            auth_file,
            once,
        } => {
            init_logging(cli.log_format);
            let options = pullthrough::prepull::PrepullOptions {
                socket: cri_socket,
                file,
                concurrency,
                retries,
                backoff,
                jitter,
                auth_file,
            };
            runtime()?.block_on(async {
                if !once {
                    pullthrough::prepull::run(options, interval, poll, shutdown_signal()).await?;
                    return Ok(());
                }
                let images = pullthrough::imagelist::read_list(&options.file)?;
                let secrets = match &options.auth_file {
                    Some(path) => pullthrough::prepull::Secrets::read(path)?,
                    None => pullthrough::prepull::Secrets::default(),
                };
                tokio::time::sleep(pullthrough::prepull::random_below(options.jitter)).await;
                let client = pullthrough::prepull::connect(&options.socket).await?;
                let report =
                    pullthrough::prepull::run_once(&client, &images, &options, &secrets).await;
                eprintln!("{report}");
                if !report.failed.is_empty() {
                    anyhow::bail!(
                        "{} of {} images not pulled",
                        report.failed.len(),
                        images.len()
                    );
                }
                anyhow::Ok(())
            })
        }
        Command::ContainerdConfig {
            endpoint,
            registries,
            dir,
            containerd_config: config,
            restore,
        } => containerd_config(endpoint, &registries, &dir, &config, restore),
        Command::Serve {
            config,
            listen,
            data,
            offline,
            admin_listen,
        } => {
            let overrides = Overrides {
                listen,
                data,
                offline,
                admin_listen,
            };
            let config = Config::load(config.as_deref(), &overrides)?;
            init_logging(cli.log_format);
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(config.server.listen)
                    .await
                    .with_context(|| format!("binding {}", config.server.listen))?;
                pullthrough::run(listener, config, shutdown_signal()).await?;
                anyhow::Ok(())
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
