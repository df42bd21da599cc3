//! The status page at `/`: server-rendered HTML, readable without JavaScript,
//! showing state only (nothing on it acts, and no credential is ever on it).

use crate::cache::Cache;
use crate::upstream::CircuitState;
use std::fmt::Write;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Bytes as people read them.
fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// The whole page.
pub fn render(cache: &Cache) -> String {
    let metrics = cache.metrics();
    let totals = metrics.totals();
    let store = cache.store();
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\">\
         <title>pullthrough</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin-bottom:1.5em}}\
         td,th{{border:1px solid #ccc;padding:.3em .7em;text-align:left}}\
         th{{background:#f3f3f3}} .bad{{color:#b00}} .ok{{color:#070}}\
         </style></head><body><h1>pullthrough {}</h1>",
        env!("CARGO_PKG_VERSION")
    );

    let requests = totals.hits + totals.misses + totals.coalesced;
    let ratio = if requests == 0 {
        "—".to_string()
    } else {
        format!(
            "{:.1}%",
            100.0 * (totals.hits + totals.coalesced) as f64 / requests as f64
        )
    };
    let _ = write!(
        html,
        "<h2>Since start</h2><table>\
         <tr><th>hit ratio (hits and joined downloads)</th><td>{ratio}</td></tr>\
         <tr><th>hits / downloads started / joined / stale tags</th><td>{} / {} / {} / {}</td></tr>\
         <tr><th>served from the store</th><td>{}</td></tr>\
         <tr><th>served from downloads in flight</th><td>{}</td></tr>\
         <tr><th>fetched from upstream</th><td>{}</td></tr>\
         <tr><th>saved (served beyond what was fetched)</th><td>{}</td></tr></table>",
        totals.hits,
        totals.misses,
        totals.coalesced,
        totals.stale,
        human(totals.served_from_store),
        human(totals.served_from_flights),
        human(totals.fetched),
        human(
            (totals.served_from_store + totals.served_from_flights).saturating_sub(totals.fetched)
        ),
    );

    html.push_str(
        "<h2>Upstreams</h2><table><tr><th>name</th><th>circuit</th>\
         <th>rate limit (remaining / limit)</th><th>mode</th></tr>",
    );
    for up in cache.upstreams().all() {
        let health = up.health();
        let circuit = match health.state() {
            CircuitState::Closed => "<span class=\"ok\">closed</span>",
            CircuitState::HalfOpen => "<span class=\"bad\">half-open</span>",
            CircuitState::Open => "<span class=\"bad\">open</span>",
        };
        let rate = match health.ratelimit() {
            Some(r) => format!(
                "{} / {}{}",
                r.remaining,
                r.limit.map_or("?".into(), |l| l.to_string()),
                if health.budget_low() {
                    " (low: revalidation paused)"
                } else {
                    ""
                }
            ),
            None => "not reported".into(),
        };
        let mode = if up.is_offline() { "offline" } else { "online" };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{circuit}</td><td>{}</td><td>{mode}</td></tr>",
            esc(up.name()),
            esc(&rate)
        );
    }
    html.push_str("</table>");

    let flights = cache.flights().snapshot();
    let _ = write!(html, "<h2>Downloads in progress ({})</h2>", flights.len());
    if !flights.is_empty() {
        html.push_str(
            "<table><tr><th>upstream</th><th>repository</th><th>digest</th>\
             <th>so far</th><th>size</th><th>readers</th></tr>",
        );
        for f in &flights {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&f.upstream),
                esc(&f.repository),
                esc(&f.digest),
                human(f.bytes),
                f.size.map_or("unknown".into(), human),
                f.readers
            );
        }
        html.push_str("</table>");
    }

    let cap = store.cap().map_or("no cap".into(), |c| {
        format!("{} (evicting past {})", human(c.max), human(c.high))
    });
    let evicted = store.evicted();
    let _ = write!(
        html,
        "<h2>Store</h2><table><tr><th>used</th><td>{}</td></tr>\
         <tr><th>cap</th><td>{}</td></tr>\
         <tr><th>evicted since start</th><td>{} files, {}</td></tr></table>",
        human(store.usage()),
        esc(&cap),
        evicted.files,
        human(evicted.bytes)
    );

    let most = metrics.most_pulled(10);
    html.push_str("<h2>Most pulled</h2>");
    if most.is_empty() {
        html.push_str("<p>Nothing pulled yet.</p>");
    } else {
        html.push_str("<table><tr><th>image</th><th>manifest pulls</th></tr>");
        for (name, n) in most {
            let _ = write!(html, "<tr><td>{}</td><td>{n}</td></tr>", esc(&name));
        }
        html.push_str("</table>");
    }
    html.push_str(
        "<p>Metrics: <a href=\"/metrics\">/metrics</a>. This page refreshes every 5 seconds.</p></body></html>",
    );
    html
}
