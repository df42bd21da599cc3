//! The status page in a real browser: headless Chromium loads `/` while a slow
//! download is in flight and must show it with its readers. A screenshot is
//! written under the target directory (outside git) for a human to look at.

mod support;

use std::process::Command;
use std::time::Duration;
use support::cache::{stream_digest, Rig};
use support::front::Mode;
use support::images::Image;
use support::registry::Registry;

/// How long one Chromium run may take.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(60);

/// Headless Chromium with the flags this closed network needs, its own profile.
fn chromium(profile: &std::path::Path) -> Command {
    let mut c = Command::new("chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1800",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The cells of the table row that mentions `needle`.
fn row_with(dom: &str, needle: &str) -> Option<Vec<String>> {
    let at = dom.find(needle)?;
    let start = dom[..at].rfind("<tr")?;
    let end = at + dom[at..].find("</tr>")?;
    Some(
        dom[start..end]
            .split("<td>")
            .skip(1)
            .map(|cell| {
                let cell = cell.split("</td>").next().unwrap_or("");
                cell.replace("<code>", "").replace("</code>", "")
            })
            .collect(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn chromium_shows_a_download_in_flight_with_its_readers() {
    let img = Image::big(91, 3 * 1024 * 1024);
    let layer = img.layers()[0].digest.clone();
    let mut rig = Rig::start_with(
        Registry::anonymous().image("library/slow", "1", img.clone()),
        |c| c.prefetch(false),
    )
    .await;
    rig.front.set_mode(Mode::Slow { rate: 192 * 1024 }).await;
    let url = format!("{}/v2/library/slow/blobs/{layer}", rig.cache.url());
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { stream_digest(&url, &[]).await })
        })
        .collect();
    // Both clients on the one download before the browser looks.
    let page = format!("{}/", rig.cache.url());
    let ready = support::wait_until(
        "two readers on the download",
        Duration::from_secs(15),
        || {
            let page = page.clone();
            let layer = layer.clone();
            async move {
                let html = reqwest::get(&page).await.ok()?.text().await.ok()?;
                let row = row_with(&html, &layer)?;
                (row.last().map(String::as_str) == Some("2")).then_some(())
            }
        },
    )
    .await;
    assert!(ready.is_ok(), "the page never showed 2 readers");

    let profile = tempfile::tempdir().unwrap();
    let mut dump = chromium(profile.path());
    dump.arg("--dump-dom").arg(&page);
    let dom = support::run_async(dump, BROWSER_TIMEOUT)
        .await
        .expect("chromium ran");
    assert!(dom.success, "chromium failed: {}", dom.stderr);
    let row = row_with(&dom.stdout, &layer)
        .unwrap_or_else(|| panic!("the download is not on the rendered page:\n{}", dom.stdout));
    assert_eq!(row[0], "docker.io", "upstream: {row:?}");
    assert_eq!(row[1], "library/slow", "repository: {row:?}");
    assert_eq!(
        row.last().map(String::as_str),
        Some("2"),
        "readers: {row:?}"
    );
    assert!(
        dom.stdout.contains("Downloads in progress (1)"),
        "{}",
        dom.stdout
    );

    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let mut screenshot = chromium(profile.path());
    screenshot
        .arg(format!("--screenshot={}", shot.display()))
        .arg(&page);
    let taken = support::run_async(screenshot, BROWSER_TIMEOUT)
        .await
        .expect("chromium ran");
    assert!(taken.success, "screenshot failed: {}", taken.stderr);
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "a real PNG"
    );
    eprintln!("screenshot: {}", shot.display());

    // The page only looks: both downloads finish whole and right.
    for r in readers {
        assert_eq!(r.await.unwrap().digest, layer);
    }
}
