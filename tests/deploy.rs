//! What ships beside the binary: the Dockerfile passes hadolint, the
//! Kubernetes manifests render with kustomize, validate against the Kubernetes
//! schemas and agree with each other and with the configuration loader, and the
//! Grafana dashboard charts exactly the metrics the real cache exports.
//!
//! The tools (`kubectl`, `kubernetes-validate`, `hadolint`) are installed by
//! `scripts/test`; a missing tool fails the test rather than skipping it.

mod support;

use base64::Engine;
use pullthrough::config::Config;
use reqwest::Method;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::cache::{CacheProcess, Rig};
use support::exposition::Exposition;
use support::front::Mode;
use support::images::{media, Image};
use support::registry::Registry;

const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the cache may take to observe a finished download in its metrics.
const READY: Duration = Duration::from_secs(10);

/// Kinds that ship no schema with kubernetes-validate (custom resources).
const SCHEMALESS_KINDS: &[&str] = &["ServiceMonitor"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs a tool to completion and fails the test, with its output, unless it succeeds.
fn run_ok(command: &mut Command) -> support::Finished {
    let shown = format!("{command:?}");
    let done = support::run(command, TOOL_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        done.success,
        "{shown} failed\nstdout:\n{}\nstderr:\n{}",
        done.stdout, done.stderr
    );
    done
}

/// `kubectl kustomize deploy/kubernetes/<dir>`, written to `<out>/<name>.yaml`.
fn render(dir: &str, out: &Path) -> (PathBuf, String) {
    let done = run_ok(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy/kubernetes").join(dir)),
    );
    let file = out.join(format!("{}.yaml", dir.replace('/', "-")));
    std::fs::write(&file, &done.stdout).expect("write rendered YAML");
    (file, done.stdout)
}

/// Every document of a multi-document YAML stream, as JSON values.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// `kubernetes-validate --strict` on `file`; every missing schema must be a known custom kind.
fn validate(file: &Path) {
    let done = run_ok(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .arg("--quiet")
            .arg(file),
    );
    let all = format!("{}{}", done.stdout, done.stderr);
    for line in all.lines().filter(|l| l.contains("Couldn't find schema")) {
        assert!(
            SCHEMALESS_KINDS
                .iter()
                .any(|k| line.contains(&format!("kind {k} "))),
            "{}: a kind without a schema (a typo in kind or apiVersion?): {line}",
            file.display()
        );
    }
    assert!(
        !all.contains("ERROR") && !all.contains("FAIL"),
        "{}: {all}",
        file.display()
    );
}

/// The one object of `kind` named `name` (generated names: by prefix `name-`).
fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let hits: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .filter(|d| {
            let n = d["metadata"]["name"].as_str().unwrap_or_default();
            n == name || generated_from(n, name)
        })
        .collect();
    assert_eq!(hits.len(), 1, "exactly one {kind} {name}, found {hits:?}");
    hits[0]
}

/// Whether `rendered` is `name` plus kustomize's content-hash suffix.
fn generated_from(rendered: &str, name: &str) -> bool {
    rendered
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hash| hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()))
}

fn pod_spec(workload: &Value) -> &Value {
    match workload["kind"].as_str() {
        Some("StatefulSet" | "DaemonSet" | "Deployment" | "Job") => {
            &workload["spec"]["template"]["spec"]
        }
        other => panic!("not a workload: {other:?}"),
    }
}

fn workloads(docs: &[Value]) -> Vec<&Value> {
    docs.iter()
        .filter(|d| {
            matches!(
                d["kind"].as_str(),
                Some("StatefulSet" | "DaemonSet" | "Deployment" | "Job")
            )
        })
        .collect()
}

fn containers(spec: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string"))
        .collect()
}

fn name_of(v: &Value) -> &str {
    v["metadata"]["name"].as_str().expect("a name")
}

/// The checks every rendering must pass: hardened containers, resources,
/// references that resolve, `$(VAR)` arguments that name defined variables.
fn check_workloads(what: &str, docs: &[Value], optional_missing_ok: bool) {
    let names = |kind: &str| -> BTreeSet<&str> {
        docs.iter()
            .filter(|d| d["kind"] == kind)
            .map(name_of)
            .collect()
    };
    let (config_maps, secrets) = (names("ConfigMap"), names("Secret"));
    let found = workloads(docs);
    assert!(found.len() >= 3, "{what}: the cache and two DaemonSets");
    for w in found {
        let at = format!("{what}: {} {}", w["kind"], name_of(w));
        let spec = pod_spec(w);
        assert_eq!(
            spec["automountServiceAccountToken"], false,
            "{at}: no API token"
        );
        for c in containers(spec) {
            let at = format!("{at} container {}", c["name"]);
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{at}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{at}");
            assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{at}");
            let seccomp = sc["seccompProfile"]["type"]
                .as_str()
                .or(spec["securityContext"]["seccompProfile"]["type"].as_str());
            assert_eq!(seccomp, Some("RuntimeDefault"), "{at}");
            for k in ["requests", "limits"] {
                for r in ["cpu", "memory"] {
                    assert!(c["resources"][k][r].is_string(), "{at}: resources.{k}.{r}");
                }
            }
            let env: BTreeSet<&str> = c["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["name"].as_str().unwrap())
                .collect();
            for arg in strings(&c["args"]) {
                if let Some(var) = arg.strip_prefix("$(").and_then(|a| a.strip_suffix(')')) {
                    assert!(env.contains(var), "{at}: argument {arg} names no env var");
                }
            }
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(cm) = e["valueFrom"]["configMapKeyRef"]["name"].as_str() {
                    assert!(config_maps.contains(cm), "{at}: ConfigMap {cm} missing");
                }
            }
            let mounts: BTreeSet<&str> = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m["name"].as_str().unwrap())
                .collect();
            let volumes: BTreeSet<&str> = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|v| v["name"].as_str().unwrap())
                .collect();
            let claims: BTreeSet<&str> = w["spec"]["volumeClaimTemplates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(name_of)
                .collect();
            for m in mounts {
                assert!(
                    volumes.contains(m) || claims.contains(m),
                    "{at}: mount {m} has no volume"
                );
            }
        }
        for v in spec["volumes"].as_array().into_iter().flatten() {
            let (kind, name, known) = if v["configMap"].is_object() {
                ("ConfigMap", &v["configMap"]["name"], &config_maps)
            } else if v["secret"].is_object() {
                ("Secret", &v["secret"]["secretName"], &secrets)
            } else {
                continue;
            };
            let name = name.as_str().unwrap();
            let optional = v["configMap"]["optional"] == true || v["secret"]["optional"] == true;
            assert!(
                known.contains(name) || (optional && optional_missing_ok),
                "{at}: volume {} names {kind} {name}, which is not rendered",
                v["name"]
            );
        }
    }
}

/// The cache's StatefulSet as the brief specifies it.
fn check_cache(what: &str, docs: &[Value]) {
    let sts = find(docs, "StatefulSet", "pullthrough");
    assert_eq!(sts["spec"]["replicas"], 1, "{what}");
    let spec = pod_spec(sts);
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
    let c = &spec["containers"][0];
    assert_eq!(
        strings(&c["args"]),
        [
            "serve",
            "--config",
            "/etc/pullthrough/pullthrough.toml",
            "--data",
            "/var/lib/pullthrough",
            "--log-format",
            "json"
        ],
        "{what}"
    );
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz", "{what}");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz", "{what}");
    let data = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/pullthrough")
        .expect("the data directory is mounted");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"], data["name"],
        "{what}: the data directory is the claim"
    );
    let svc = find(docs, "Service", "pullthrough");
    let port = &svc["spec"]["ports"][0];
    assert_eq!(
        (&port["name"], &port["port"]),
        (&"http".into(), &5000.into())
    );
    let selector = svc["spec"]["selector"].as_object().unwrap();
    let labels = spec_labels(sts);
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "{what}: the Service selects the cache"
        );
    }
    let pdb = find(docs, "PodDisruptionBudget", "pullthrough");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"], sts["spec"]["selector"]["matchLabels"],
        "{what}"
    );
}

fn spec_labels(workload: &Value) -> serde_json::Map<String, Value> {
    workload["spec"]["template"]["metadata"]["labels"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

/// The `pullthrough.toml` of the rendered `pullthrough-config` ConfigMap.
fn rendered_config(docs: &[Value]) -> String {
    find(docs, "ConfigMap", "pullthrough-config")["data"]["pullthrough.toml"]
        .as_str()
        .expect("pullthrough.toml in the ConfigMap")
        .to_string()
}

/// The mount path of the credentials Secret in the cache's container.
fn secrets_mount(docs: &[Value]) -> String {
    let spec = pod_spec(find(docs, "StatefulSet", "pullthrough"));
    let volume = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"].is_object())
        .expect("a Secret volume");
    let mount = spec["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the Secret is mounted");
    mount["mountPath"].as_str().unwrap().to_string()
}

#[test]
fn the_validator_rejects_what_kubernetes_would() {
    // The control for the tests below: strict validation must be able to fail.
    let dir = support::temp_dir("deploy");
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\nspec:\n  portz:\n    - port: 5000\n",
    )
    .unwrap();
    let done = support::run(
        Command::new("kubernetes-validate")
            .arg("--strict")
            .arg(&file),
        TOOL_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        !done.success,
        "an unknown field passed: {}{}",
        done.stdout, done.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_base_renders_validates_and_starts_without_the_secret() {
    let dir = support::temp_dir("deploy");
    let (file, yaml) = render("base", dir.path());
    validate(&file);
    let docs = documents(&yaml);
    assert!(
        docs.iter().all(|d| d["metadata"]["namespace"].is_null()),
        "the base is namespace-agnostic"
    );
    assert!(
        docs.iter().all(|d| d["kind"] != "Secret"),
        "the base ships no Secret"
    );
    check_workloads("base", &docs, true);
    check_cache("base", &docs);
    let config = rendered_config(&docs);
    let parsed = Config::from_toml(&config)
        .unwrap_or_else(|e| panic!("base pullthrough.toml is refused: {e}"));
    assert!(
        parsed.upstreams.iter().all(|u| u.password_file.is_none()),
        "the base must start without the optional Secret"
    );
    assert_eq!(
        parsed.storage.path,
        Path::new("/var/lib/pullthrough"),
        "storage.path matches --data"
    );
    // The binary starts with it (no Secret mounted) and answers both probes.
    let cache = CacheProcess::start(&config, &[]).await;
    for probe in ["/healthz", "/readyz"] {
        let r = support::probe_client()
            .get(format!("{}{probe}", cache.url()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {probe}: {e}"));
        assert_eq!(r.status(), 200, "{probe}\n{}", cache.log());
    }
}

#[test]
fn the_example_overlay_renders_validates_and_hangs_together() {
    let dir = support::temp_dir("deploy");
    let (file, yaml) = render("overlays/example", dir.path());
    validate(&file);
    let docs = documents(&yaml);
    for d in &docs {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "pullthrough", "{}", name_of(d));
        }
    }
    check_workloads("example", &docs, false);
    check_cache("example", &docs);

    // The image is the overlay's, tag included, everywhere pullthrough runs.
    for w in workloads(&docs) {
        for c in containers(pod_spec(w)) {
            let image = c["image"].as_str().unwrap();
            if !image.starts_with("registry.k8s.io/pause:") {
                assert_eq!(image, "registry.example.com/platform/pullthrough:0.1.0");
            }
        }
    }

    // The Docker Hub password file the configuration names is a key of the rendered Secret.
    let secret = find(&docs, "Secret", "pullthrough-credentials");
    let mount = secrets_mount(&docs);
    let files = support::temp_dir("deploy-secrets");
    for (key, value) in secret["data"].as_object().expect("Secret data") {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(value.as_str().unwrap())
            .unwrap();
        std::fs::write(files.path().join(key), bytes).unwrap();
    }
    // Loading reads every password_file: with the mount path pointed at the Secret's
    // keys written out here, it succeeds only if each one is a key of that Secret.
    let local = rendered_config(&docs).replace(
        &format!("{mount}/"),
        &format!("{}/", files.path().display()),
    );
    let parsed = Config::from_toml(&local)
        .unwrap_or_else(|e| panic!("example pullthrough.toml is refused: {e}"));
    for up in &parsed.upstreams {
        if let Some(file) = &up.password_file {
            assert!(
                file.starts_with(files.path()),
                "{}: password_file {} is not under the Secret's mount {mount}",
                up.name,
                file.display()
            );
        }
    }
    let docker = parsed.find_upstream("docker.io").unwrap();
    assert!(docker.credentials().unwrap().is_some());

    // Nodes reach the cache at the Service's fixed ClusterIP.
    let svc = find(&docs, "Service", "pullthrough");
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .expect("a fixed ClusterIP");
    let mirror = find(&docs, "ConfigMap", "pullthrough-node-mirror");
    assert_eq!(
        mirror["data"]["ENDPOINT"],
        format!("http://{ip}:{}", svc["spec"]["ports"][0]["port"])
    );
    let registries = mirror["data"]["REGISTRIES"].as_str().unwrap();
    for r in registries.split(',') {
        assert!(
            parsed.find_upstream(r).is_some(),
            "node mirror for {r}, which the cache does not serve"
        );
    }
    let ds = find(&docs, "DaemonSet", "pullthrough-node-mirror");
    let init = &pod_spec(ds)["initContainers"][0];
    assert_eq!(strings(&init["args"])[0], "containerd-config");
    let prepull = find(&docs, "DaemonSet", "pullthrough-prepull");
    assert_eq!(
        pod_spec(prepull)["tolerations"][0]["operator"],
        "Exists",
        "the pre-puller runs on every node"
    );

    // Monitoring: the ServiceMonitor selects the Service by its labels and port name,
    // and the pods carry scrape annotations.
    let sm = find(&docs, "ServiceMonitor", "pullthrough");
    let svc_labels = svc["metadata"]["labels"].as_object().unwrap();
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            svc_labels.get(k),
            Some(v),
            "ServiceMonitor selects the Service"
        );
    }
    let endpoint = &sm["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], svc["spec"]["ports"][0]["name"]);
    assert_eq!(endpoint["path"], "/metrics");
    let sts = find(&docs, "StatefulSet", "pullthrough");
    let annotations = &sts["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    assert_eq!(
        annotations["prometheus.io/port"],
        svc["spec"]["ports"][0]["port"].to_string()
    );

    // The seed Job reads the same image list as the pre-puller.
    let job = find(&docs, "Job", "pullthrough-seed");
    let images = |w: &Value| {
        pod_spec(w)["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str().map(str::to_string))
            .expect("an image list volume")
    };
    assert_eq!(images(job), images(prepull));
    let list = find(&docs, "ConfigMap", "pullthrough-images")["data"]["images.txt"]
        .as_str()
        .unwrap();
    assert!(
        list.lines().count() >= 3,
        "the example lists its own images"
    );
}

#[test]
fn hadolint_passes_on_the_dockerfile() {
    let done = run_ok(
        Command::new("hadolint")
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(repo().join("Dockerfile")),
    );
    assert!(done.stdout.trim().is_empty(), "{}", done.stdout);
}

/// The dashboard, and every PromQL expression in it (panels, rows, variables).
fn dashboard() -> (Value, Vec<String>) {
    let path = repo().join("deploy/grafana/pullthrough.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    let dash: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    fn panels(list: &Value, out: &mut Vec<Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p.clone());
            panels(&p["panels"], out);
        }
    }
    let mut all = Vec::new();
    panels(&dash["panels"], &mut all);
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for p in &all {
        assert!(
            ids.insert(p["id"].to_string()),
            "panel id {} twice",
            p["id"]
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            p["title"]
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}");
            exprs.push(t["expr"].as_str().expect("an expr").to_string());
        }
    }
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource"),
        "a DS_PROMETHEUS datasource variable"
    );
    for v in vars.iter().filter(|v| v["type"] == "query") {
        exprs.push(v["definition"].as_str().unwrap().to_string());
    }
    (dash, exprs)
}

/// Every `pullthrough_…` series name an expression mentions.
fn metric_names(exprs: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for e in exprs {
        let mut rest = e.as_str();
        let mut found = false;
        while let Some(at) = rest.find("pullthrough_") {
            let before = rest[..at].chars().next_back();
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                names.insert(tail[..end].to_string());
                found = true;
            }
            rest = &tail[end..];
        }
        assert!(found, "an expression charting no pullthrough metric: {e}");
    }
    names
}

/// Series names and `# TYPE` families of an exposition. prometheus-client writes
/// nothing, not even `# TYPE`, for a labelled family without samples.
fn exposition(text: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let mut series = BTreeSet::new();
    let mut families = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            families.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let end = line.find(['{', ' ']).expect("a sample line");
            series.insert(line[..end].to_string());
        }
    }
    (series, families)
}

/// The series a family of `kind` is queried by.
fn family_series(name: &str, kind: &str) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        "counter" => &["_total"],
        "histogram" => &["_bucket", "_sum", "_count"],
        _ => &[""],
    };
    suffixes.iter().map(|s| format!("{name}{s}")).collect()
}

/// The real cache after traffic that gives every family a sample: a token-auth
/// upstream (token fetches), rate-limit headers, a cold pull with prefetch
/// (misses, flights, upstream bytes), a warm one (store hits), and a stale
/// serve while upstream answers 503. Returns its exposition.
async fn exposition_after_traffic() -> String {
    let img = Image::single(75);
    let layer = img.layers()[0].clone();
    let mut rig = Rig::start_with(Registry::token().image("library/dash", "1", img), |c| {
        c.tag_ttl("0s")
    })
    .await;
    rig.front
        .set_mode(Mode::Directives(
            "proxy_buffering off;\nadd_header ratelimit-limit \"100;w=21600\" always;\nadd_header ratelimit-remaining \"42;w=21600\" always;".into(),
        ))
        .await;
    let manifest = "/v2/library/dash/manifests/1";
    let accept = ("accept", media::ACCEPT_ALL);
    assert_eq!(
        rig.request(Method::GET, manifest, &[accept]).await.status,
        200
    );
    let blob = format!("/v2/library/dash/blobs/{}", layer.digest);
    assert_eq!(rig.request(Method::GET, &blob, &[]).await.status, 200);
    rig.quiesce().await;
    assert_eq!(rig.request(Method::GET, &blob, &[]).await.status, 200);
    rig.front.set_mode(Mode::Status503).await;
    let stale = rig.request(Method::GET, manifest, &[accept]).await;
    assert_eq!(stale.status, 200, "served stale");
    let scrape = || async {
        let r = rig.request(Method::GET, "/metrics", &[]).await;
        assert_eq!(r.status, 200);
        String::from_utf8_lossy(&r.body).to_string()
    };
    // A download is observed in flight_readers just after it settles.
    support::wait_until("a finished download to be observed", READY, || async {
        let text = scrape().await;
        let m = Exposition::parse(&text);
        (m.value("pullthrough_flight_readers_count", &[]) >= 1.0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    scrape().await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_charts_exactly_the_metrics_the_cache_exports() {
    let (dash, exprs) = dashboard();
    assert_eq!(dash["schemaVersion"], 39);
    let charted = metric_names(&exprs);
    let text = exposition_after_traffic().await;
    let (series, families) = exposition(&text);
    assert!(families.len() >= 19, "every family has samples:\n{text}");

    let missing: Vec<&String> = charted.difference(&series).collect();
    assert!(
        missing.is_empty(),
        "the dashboard charts series the cache does not export: {missing:?}\nexported: {series:?}"
    );
    let uncharted: Vec<&String> = families
        .iter()
        .filter(|(name, kind)| {
            !family_series(name, kind)
                .iter()
                .any(|s| charted.contains(s))
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        uncharted.is_empty(),
        "metric families with no panel in deploy/grafana/pullthrough.json \
         (add one, or the dashboard drifts from the code): {uncharted:?}"
    );
}
