use super::*;

const SHA: &str = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

/// The normalised form of every image in `text`, in the order `parse_list` gives them.
fn listed(text: &str) -> Vec<String> {
    parse_list(text)
        .unwrap_or_else(|e| panic!("list should parse: {e}"))
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn normalised(text: &str) -> String {
    ImageRef::parse(text)
        .unwrap_or_else(|e| panic!("{text:?} should parse: {e}"))
        .to_string()
}

#[test]
fn a_bare_name_is_a_docker_hub_official_image_at_latest() {
    let image = ImageRef::parse("nginx").unwrap();
    assert_eq!(image.registry, "docker.io");
    assert_eq!(image.repository.as_str(), "library/nginx");
    assert_eq!(image.tag.as_ref().map(Tag::as_str), Some("latest"));
    assert_eq!(image.digest, None);
    assert_eq!(image.to_string(), "docker.io/library/nginx:latest");
}

#[test]
fn a_first_component_without_dot_colon_or_localhost_is_a_docker_hub_namespace() {
    assert_eq!(normalised("team/app:1"), "docker.io/team/app:1");
    assert_eq!(normalised("a/b/c"), "docker.io/a/b/c:latest");
    // Docker Hub's rule adds `library/` only to one-component names.
    assert_eq!(
        normalised("docker.io/team/app"),
        "docker.io/team/app:latest"
    );
}

#[test]
fn a_first_component_with_a_dot_a_colon_or_localhost_is_a_registry() {
    assert_eq!(normalised("ghcr.io/o/app:v2"), "ghcr.io/o/app:v2");
    assert_eq!(normalised("quay.io/app"), "quay.io/app:latest");
    assert_eq!(normalised("registry:5000/app"), "registry:5000/app:latest");
    assert_eq!(normalised("localhost/app:dev"), "localhost/app:dev");
    let image = ImageRef::parse("registry.k8s.io/pause:3.10").unwrap();
    assert_eq!(image.registry, "registry.k8s.io");
    // Only Docker Hub gets `library/`.
    assert_eq!(image.repository.as_str(), "pause");
}

#[test]
fn docker_hub_aliases_normalise_to_docker_io() {
    for alias in [
        "docker.io",
        "index.docker.io",
        "registry-1.docker.io",
        "registry.hub.docker.com",
    ] {
        assert_eq!(
            normalised(&format!("{alias}/alpine:3.20")),
            "docker.io/library/alpine:3.20",
            "{alias}"
        );
        assert_eq!(
            normalised(&format!("{alias}/team/app")),
            "docker.io/team/app:latest",
            "{alias}"
        );
    }
}

#[test]
fn a_registry_port_is_not_a_tag() {
    let image = ImageRef::parse("127.0.0.1:5000/team/app:1").unwrap();
    assert_eq!(image.registry, "127.0.0.1:5000");
    assert_eq!(image.repository.as_str(), "team/app");
    assert_eq!(image.tag.as_ref().map(Tag::as_str), Some("1"));
    assert_eq!(
        normalised("localhost:5000/app"),
        "localhost:5000/app:latest"
    );
    assert_eq!(normalised("[::1]:5000/app:2"), "[::1]:5000/app:2");
}

#[test]
fn a_digest_alone_leaves_the_tag_empty_and_is_what_is_asked_for() {
    let image = ImageRef::parse(&format!("alpine@{SHA}")).unwrap();
    assert_eq!(image.tag, None);
    assert_eq!(image.digest, Some(SHA.parse().unwrap()));
    assert_eq!(image.reference(), Reference::Digest(SHA.parse().unwrap()));
    assert_eq!(image.to_string(), format!("docker.io/library/alpine@{SHA}"));
}

#[test]
fn a_tag_and_a_digest_are_both_kept_and_the_digest_wins() {
    let image = ImageRef::parse(&format!("127.0.0.1:5000/team/app:1.2@{SHA}")).unwrap();
    assert_eq!(image.tag.as_ref().map(Tag::as_str), Some("1.2"));
    assert_eq!(image.reference(), Reference::Digest(SHA.parse().unwrap()));
    assert_eq!(
        image.to_string(),
        format!("127.0.0.1:5000/team/app:1.2@{SHA}")
    );
}

#[test]
fn a_tag_is_what_is_asked_for_without_a_digest() {
    let image = ImageRef::parse("alpine:3.20").unwrap();
    assert_eq!(image.reference(), Reference::Tag("3.20".parse().unwrap()));
}

#[test]
fn the_normalised_form_parses_back_to_the_same_reference() {
    for text in [
        "nginx",
        "team/app:1",
        "127.0.0.1:5000/team/app:1",
        &format!("ghcr.io/o/app:v1@{SHA}"),
        &format!("alpine@{SHA}"),
    ] {
        let image = ImageRef::parse(text).unwrap();
        assert_eq!(ImageRef::parse(&image.to_string()).unwrap(), image);
    }
}

#[test]
fn malformed_references_are_refused_with_the_reason() {
    let problem = |text: &str| match ImageRef::parse(text) {
        Err(ListError::Reference { text: t, problem }) => {
            assert_eq!(t, text);
            problem
        }
        other => panic!("{text:?} should be refused, got {other:?}"),
    };
    assert_eq!(problem(""), Malformed::Empty);
    assert!(matches!(
        problem("Nginx"),
        Malformed::Part(ReferenceError::Name(_))
    ));
    assert!(matches!(
        problem("ghcr.io/Team/app"),
        Malformed::Part(ReferenceError::Name(_))
    ));
    assert!(matches!(
        problem("nginx:"),
        Malformed::Part(ReferenceError::Tag(_))
    ));
    assert!(matches!(
        problem("nginx:-bad"),
        Malformed::Part(ReferenceError::Tag(_))
    ));
    assert!(matches!(
        problem("nginx@sha256:abc"),
        Malformed::Part(ReferenceError::Digest(_))
    ));
    assert!(matches!(
        problem("nginx@latest"),
        Malformed::Part(ReferenceError::Digest(_))
    ));
    assert!(matches!(
        problem("example.com/"),
        Malformed::Part(ReferenceError::Name(_))
    ));
    assert!(matches!(
        problem("nginx 1.2"),
        Malformed::Part(ReferenceError::Name(_))
    ));
    assert_eq!(
        problem("bad_host.io/app"),
        Malformed::Registry("bad_host.io".into())
    );
    assert_eq!(
        problem("host:port/app"),
        Malformed::Registry("host:port".into())
    );
    let message = ImageRef::parse("Nginx").unwrap_err().to_string();
    assert!(message.contains("\"Nginx\""), "{message}");
}

#[test]
fn a_plain_list_ignores_comments_blank_lines_and_surrounding_whitespace() {
    let text = "\
# images the cluster needs
nginx:1.27

  alpine:3.20   # the base image
\tregistry.k8s.io/pause:3.10\t
   # an indented comment
";
    assert_eq!(
        listed(text),
        [
            "docker.io/library/nginx:1.27",
            "docker.io/library/alpine:3.20",
            "registry.k8s.io/pause:3.10",
        ]
    );
}

#[test]
fn a_plain_list_keeps_first_appearance_and_drops_duplicates_after_normalising() {
    let text = "\
alpine
nginx
docker.io/library/alpine:latest
index.docker.io/nginx
alpine:3.20
";
    assert_eq!(
        listed(text),
        [
            "docker.io/library/alpine:latest",
            "docker.io/library/nginx:latest",
            "docker.io/library/alpine:3.20",
        ]
    );
}

#[test]
fn an_image_named_kind_is_a_plain_list_line_not_yaml() {
    assert_eq!(listed("kind:v1\n"), ["docker.io/library/kind:v1"]);
}

#[test]
fn an_empty_list_has_no_images() {
    assert!(listed("").is_empty());
    assert!(listed("# nothing yet\n\n").is_empty());
}

#[test]
fn a_bad_plain_line_names_its_line_number_and_text() {
    let err = parse_list("nginx\n# comment\n\n  Alpine:3  # why\n").unwrap_err();
    match &err {
        ListError::Line { line, text, .. } => {
            assert_eq!(*line, 4);
            assert_eq!(text, "Alpine:3");
        }
        other => panic!("expected a line error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.starts_with("line 4:"), "{message}");
    assert!(message.contains("\"Alpine:3\""), "{message}");
}

#[test]
fn a_hash_glued_to_a_reference_is_not_a_comment() {
    assert!(matches!(
        parse_list("nginx#1\n"),
        Err(ListError::Line { line: 1, .. })
    ));
}

#[test]
fn a_document_marker_below_plain_lines_is_a_bad_line_not_yaml() {
    assert!(matches!(
        parse_list("nginx\n---\nalpine\n"),
        Err(ListError::Line { line: 2, .. })
    ));
}

#[test]
fn a_yaml_document_that_is_not_an_object_is_refused() {
    assert!(matches!(
        parse_list("# images\n---\nnginx\nalpine\n"),
        Err(ListError::NotAnObject { document: 1 })
    ));
    assert!(matches!(
        parse_list("kind: Service\n---\n- nginx\n"),
        Err(ListError::NotAnObject { document: 2 })
    ));
}

#[test]
fn a_byte_order_mark_is_ignored() {
    assert_eq!(
        listed("\u{feff}nginx\n"),
        ["docker.io/library/nginx:latest"]
    );
}

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: solo
spec:
  containers:
    - name: main
      image: busybox:1.36
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  template:
    spec:
      initContainers:
        - name: migrate
          image: ghcr.io/acme/migrate:2
      containers:
        - name: web
          image: nginx:1.27
        - name: sidecar
          image: busybox:1.36
      ephemeralContainers:
        - name: debug
          image: 127.0.0.1:5000/tools/debug:1
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
    - port: 80
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  image: not/an-image:ignored
---
# only a comment: an empty document
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
spec:
  template:
    spec:
      containers:
        - name: postgres
          image: postgres:16
---
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: agent
spec:
  template:
    spec:
      containers:
        - name: agent
          image: quay.io/prometheus/node-exporter:v1.8.2
---
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: rs
spec:
  template:
    spec:
      containers:
        - name: app
          image: registry.k8s.io/pause:3.10
---
apiVersion: batch/v1
kind: Job
metadata:
  name: once
spec:
  template:
    spec:
      containers:
        - name: job
          image: alpine:3.20
---
apiVersion: batch/v1
kind: CronJob
metadata:
  name: nightly
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          initContainers:
            - name: wait
              image: busybox@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
          containers:
            - name: backup
              image: ghcr.io/acme/backup:1@sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ReplicationController
    metadata:
      name: legacy
    spec:
      template:
        spec:
          containers:
            - name: legacy
              image: redis:7
  - apiVersion: v1
    kind: List
    items:
      - apiVersion: v1
        kind: Pod
        metadata:
          name: nested
        spec:
          containers:
            - name: nested
              image: memcached:1.6
  - apiVersion: v1
    kind: Service
    metadata:
      name: ignored
"#;

#[test]
fn kubernetes_yaml_yields_every_container_image_of_every_pod_template() {
    assert_eq!(
        listed(MANIFESTS),
        [
            "docker.io/library/busybox:1.36",
            "ghcr.io/acme/migrate:2",
            "docker.io/library/nginx:1.27",
            "127.0.0.1:5000/tools/debug:1",
            "docker.io/library/postgres:16",
            "quay.io/prometheus/node-exporter:v1.8.2",
            "registry.k8s.io/pause:3.10",
            "docker.io/library/alpine:3.20",
            &format!("docker.io/library/busybox@{SHA}"),
            &format!("ghcr.io/acme/backup:1@{SHA}"),
            "docker.io/library/redis:7",
            "docker.io/library/memcached:1.6",
        ]
    );
}

#[test]
fn a_typed_list_lends_its_kind_to_items_that_leave_it_out() {
    let text = r#"
apiVersion: v1
kind: PodList
items:
  - metadata:
      name: a
    spec:
      containers:
        - name: a
          image: nginx:1
"#;
    assert_eq!(listed(text), ["docker.io/library/nginx:1"]);
}

#[test]
fn helm_template_output_with_source_comments_is_read() {
    let text = r#"---
# Source: shop/templates/serviceaccount.yaml
apiVersion: v1
kind: ServiceAccount
metadata:
  name: shop
---
# Source: shop/templates/empty.yaml
---
# Source: shop/templates/service.yaml
apiVersion: v1
kind: Service
metadata:
  name: shop
  labels:
    helm.sh/chart: shop-0.1.0
spec:
  type: ClusterIP
  ports:
    - port: 80
      targetPort: http
---
# Source: shop/templates/deployment.yaml
apiVersion: apps/v1
kind: Deployment
metadata:
  name: shop
  labels:
    app.kubernetes.io/name: shop
spec:
  replicas: 1
  selector:
    matchLabels:
      app.kubernetes.io/name: shop
  template:
    metadata:
      labels:
        app.kubernetes.io/name: shop
    spec:
      serviceAccountName: shop
      containers:
        - name: shop
          image: "ghcr.io/acme/shop:0.1.0"
          imagePullPolicy: IfNotPresent
          ports:
            - name: http
              containerPort: 8080
        - name: proxy
          image: "docker.io/envoyproxy/envoy:v1.31.0"
---
# Source: shop/templates/tests/test-connection.yaml
apiVersion: v1
kind: Pod
metadata:
  name: "shop-test-connection"
  annotations:
    "helm.sh/hook": test
spec:
  containers:
    - name: wget
      image: busybox
      command: ['wget']
      args: ['shop:80']
  restartPolicy: Never
"#;
    assert_eq!(
        listed(text),
        [
            "ghcr.io/acme/shop:0.1.0",
            "docker.io/envoyproxy/envoy:v1.31.0",
            "docker.io/library/busybox:latest",
        ]
    );
}

#[test]
fn yaml_anchors_and_merge_keys_are_resolved() {
    let text = r#"
kind: Pod
metadata:
  name: p
spec:
  containers:
    - &base
      name: a
      image: nginx:1
    - <<: *base
      name: b
      image: nginx:2
"#;
    assert_eq!(
        listed(text),
        ["docker.io/library/nginx:1", "docker.io/library/nginx:2"]
    );
}

#[test]
fn a_bad_image_in_yaml_names_the_document_kind_name_and_container() {
    let text = "\
kind: Service
metadata:
  name: s
---
kind: Deployment
metadata:
  name: web
spec:
  template:
    spec:
      containers:
        - name: app
          image: Acme/App:1
";
    let err = parse_list(text).unwrap_err();
    match &err {
        ListError::Manifest { site, text, .. } => {
            let expected = Site {
                document: 2,
                kind: "Deployment".into(),
                name: "web".into(),
                container: "app".into(),
            };
            assert_eq!(**site, expected);
            assert_eq!(text, "Acme/App:1");
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.starts_with("document 2 (Deployment web, container app)"),
        "{message}"
    );
}

#[test]
fn an_image_that_is_not_a_string_is_refused() {
    let text = "kind: Pod\nspec:\n  containers:\n    - image: [nginx]\n";
    assert!(matches!(
        parse_list(text),
        Err(ListError::Manifest {
            problem: Malformed::NotText,
            ..
        })
    ));
}

#[test]
fn a_yaml_syntax_error_says_so_with_its_location() {
    let text = "kind: Pod\nspec:\n  containers:\n    - image: nginx\n   bad: [\n";
    let err = parse_list(text).unwrap_err();
    match &err {
        ListError::Yaml {
            document, location, ..
        } => {
            assert_eq!(*document, 1);
            let (line, _) = location.expect("libyaml knows where");
            assert!((4..=6).contains(&line), "line {line}");
        }
        other => panic!("expected a YAML error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.starts_with("YAML syntax error"), "{message}");
    assert!(message.contains(" at line "), "{message}");
}

#[test]
fn a_yaml_syntax_error_on_the_first_character_still_has_its_location() {
    let message = parse_list("---\n@\n").unwrap_err().to_string();
    assert!(message.contains(" at line 2 column 1"), "{message}");
    let message = parse_list("@\nkind: Pod\n").unwrap_err().to_string();
    assert!(message.contains(" at line 1 column 1"), "{message}");
}

#[test]
fn read_list_names_the_path_it_could_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.txt");
    let err = read_list(&missing).unwrap_err();
    assert!(matches!(err, ListError::Io { .. }));
    assert!(
        err.to_string().contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn read_list_reads_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("images.txt");
    std::fs::write(&file, "nginx\nalpine:3.20\n").unwrap();
    let images = read_list(&file).unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!(images[1].to_string(), "docker.io/library/alpine:3.20");
}
