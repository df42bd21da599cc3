//! Air-gap benchmark: `seed` and `export` throughput for one 64 MiB layer from a
//! Distribution upstream, each quoted against a plain `cp` of the same blob file
//! measured in the same run (FIELD-NOTES, "Load and measurement": ratios, not
//! absolute figures, mean something on a shared 2-core machine).
//!
//! `cargo bench --bench airgap` prints a table and writes `target/bench-airgap.json`.
//! Every phase runs the real binary, as an operator would; each figure is the best
//! of its rounds (other load on the machine only ever slows a round down).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::cache::blob_file;
use support::images::Image;
use support::registry::Registry;

/// The layer's payload.
const LAYER_BYTES: usize = 64 * 1024 * 1024;
/// Rounds of each phase; the best is reported.
const ROUNDS: usize = 5;
/// Any one command's limit.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// One phase's rounds: bytes moved and the time each round took.
struct Phase {
    name: &'static str,
    bytes: u64,
    times: Vec<Duration>,
}

impl Phase {
    fn new(name: &'static str, bytes: u64) -> Phase {
        Phase {
            name,
            bytes,
            times: Vec::new(),
        }
    }

    fn best(&self) -> Duration {
        self.times.iter().min().copied().unwrap_or_default()
    }

    fn median(&self) -> Duration {
        let mut sorted = self.times.clone();
        sorted.sort();
        sorted.get(sorted.len() / 2).copied().unwrap_or_default()
    }

    /// MB/s (10^6 bytes) of the best round.
    fn rate(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.best().as_secs_f64().max(1e-9)
    }
}

#[tokio::main]
async fn main() {
    let began = Instant::now();
    eprintln!("airgap bench: building a {LAYER_BYTES}-byte image, starting the upstream…");
    let image = tokio::task::spawn_blocking(|| Image::big(7201, LAYER_BYTES))
        .await
        .expect("build the image");
    let layer = image.layers()[0].clone();
    let upstream = Registry::anonymous()
        .image("library/big", "1", image.clone())
        .start()
        .await;
    let dir = support::temp_dir("bench-airgap");
    let config = dir.path().join("pullthrough.toml");
    std::fs::write(
        &config,
        format!(
            "default_upstream = \"docker.io\"\n[[upstreams]]\nname = \"docker.io\"\nurl = \"{}\"\nlibrary_prefix = true\n",
            upstream.url()
        ),
    )
    .expect("write config");

    let total = image.total_size();
    let mut seed = Phase::new("seed (upstream → store)", total);
    let mut export_tar = Phase::new("export (store → tar)", total);
    let mut export_dir = Phase::new("export (store → dir)", total);
    let mut import_tar = Phase::new("import (tar → store)", total);
    let mut cp = Phase::new("cp of the layer file", layer.size());
    for round in 0..ROUNDS {
        eprintln!("airgap bench: round {}/{ROUNDS}…", round + 1);
        let data = dir.path().join(format!("data-{round}"));
        seed.times
            .push(pullthrough(&["seed", "big:1"], &config, &data).await);
        let stored = blob_file(&data, &layer.digest);
        assert_eq!(
            std::fs::metadata(&stored).map(|m| m.len()).ok(),
            Some(layer.size()),
            "the layer is in the store"
        );

        let tar = dir.path().join(format!("export-{round}.tar"));
        let args = ["export", "--output", tar.to_str().unwrap(), "big:1"];
        export_tar
            .times
            .push(pullthrough(&args, &config, &data).await);
        let out = dir.path().join(format!("export-{round}"));
        let args = ["export", "--output", out.to_str().unwrap(), "big:1"];
        export_dir
            .times
            .push(pullthrough(&args, &config, &data).await);

        let inside = dir.path().join(format!("inside-{round}"));
        let args = ["import", tar.to_str().unwrap()];
        import_tar
            .times
            .push(pullthrough(&args, &config, &inside).await);

        let copy = dir.path().join(format!("cp-{round}"));
        let mut command = Command::new("cp");
        command.arg(&stored).arg(&copy);
        cp.times.push(timed(command).await);

        for path in [&data, &out, &inside] {
            let _ = std::fs::remove_dir_all(path);
        }
        for path in [&tar, &copy] {
            let _ = std::fs::remove_file(path);
        }
    }

    let reference = cp.rate();
    println!();
    println!(
        "air gap, one {LAYER_BYTES}-byte layer ({total} bytes in all), best of {ROUNDS} rounds"
    );
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>8}",
        "phase", "best s", "median s", "MB/s", "× cp"
    );
    let phases = [&seed, &export_tar, &export_dir, &import_tar, &cp];
    for phase in phases {
        println!(
            "{:<28} {:>10.3} {:>10.3} {:>10.1} {:>8.2}",
            phase.name,
            phase.best().as_secs_f64(),
            phase.median().as_secs_f64(),
            phase.rate(),
            phase.rate() / reference
        );
    }
    println!("(each pullthrough figure includes the process's start and the store's open)");
    let report = json!({
        "layer_bytes": LAYER_BYTES,
        "total_bytes": total,
        "rounds": ROUNDS,
        "phases": phases.iter().map(|p| json!({
            "name": p.name,
            "bytes": p.bytes,
            "best_seconds": p.best().as_secs_f64(),
            "median_seconds": p.median().as_secs_f64(),
            "mb_per_second": p.rate(),
            "ratio_to_cp": p.rate() / reference,
        })).collect::<Vec<_>>(),
        "elapsed_seconds": began.elapsed().as_secs_f64(),
    });
    let path = report_path();
    std::fs::write(&path, serde_json::to_vec_pretty(&report).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    println!("wrote {}", path.display());
}

/// Runs `pullthrough ARGS --config CONFIG --data DATA`, which must succeed; its wall time.
async fn pullthrough(args: &[&str], config: &Path, data: &Path) -> Duration {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pullthrough"));
    command
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--data")
        .arg(data);
    timed(command).await
}

/// Runs `command`, which must succeed; its wall time.
async fn timed(command: Command) -> Duration {
    let shown = format!("{command:?}");
    let started = Instant::now();
    let done = support::run_async(command, COMMAND_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    assert!(done.success, "{shown}:\n{}", done.stderr);
    took
}

fn report_path() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-airgap.json")
}
