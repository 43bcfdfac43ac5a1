//! The routing document on the control side: `PUT /v1/routing` (JSON and TOML),
//! validation naming the field, versions, durability across a restart, several
//! control nodes agreeing on the newest version, each edge's applied version in
//! `GET /v1/routing` and `/v1/nodes`, `cdn routing apply|show` as a process, and a
//! real `cdn control` whose data directory is full.
//!
//! The edges' side (applying the document) is stood in for by a bare cluster
//! member with the edge role that reports what it would serve by.

use std::{io::Write as _, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use cdn_cluster::{Cluster, ClusterConfig, NodeInfo, PacketLoss, Role, routing::Routing, state::Topic};
use cdn_control::{
    client::{ClientError, ControlClient},
    routing::Format,
};
use cdn_test_support::{
    control::{SECRET, TOKEN, TestControl, api, wait_for_edges},
    metrics, wait,
};
use http::{Method, StatusCode};
use prometheus::Registry;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Two sites: live playlists kept 2 s, segments a day, an API never cached.
const DOCUMENT: &str = r#"{
  "default_site": "video",
  "sites": [
    {"name": "video",
     "hosts": ["www.cdn.test", "*.video.test"],
     "origins": [{"url": "http://127.0.0.1:18080", "weight": 2},
                 {"url": "http://127.0.0.1:18081", "backup": true}],
     "health": {"path": "/healthz", "interval": "2s", "timeout": "1s", "fails": 2, "passes": 2},
     "rules": [
       {"path_suffix": ".m3u8", "ttl": "2s"},
       {"path_suffix": ".mpd", "ttl": "2s"},
       {"path_prefix": "/v/", "ttl": "1d", "stale_if_error": "1h"},
       {"path_prefix": "/", "query": {"ignore": ["utm_*"]}}]},
    {"name": "api",
     "hosts": ["api.cdn.test"],
     "origins": [{"url": "http://127.0.0.1:18082"}],
     "rules": [{"path_prefix": "/api/", "bypass": true}]}]
}"#;

/// The same kind of document in TOML, with one site.
const TOML_DOCUMENT: &str = r#"
default_site = "www"

[[sites]]
name = "www"
hosts = ["www.cdn.test"]

[[sites.origins]]
url = "http://127.0.0.1:18090"

[[sites.rules]]
path_suffix = ".m3u8"
ttl = "2s"
"#;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A control node `node_id` joined through `seed` (none: the first of its cluster).
async fn control(node_id: &'static str, data: &Path, seed: Option<SocketAddr>) -> TestControl {
    control_with_loss(node_id, data, seed, PacketLoss::default()).await
}

/// [`control`], dropping gossip datagrams as `loss` says.
async fn control_with_loss(
    node_id: &'static str,
    data: &Path,
    seed: Option<SocketAddr>,
    loss: PacketLoss,
) -> TestControl {
    TestControl::start_with(data, any(), any(), |config| {
        config.node_id = node_id.into();
        let cluster = config.cluster.as_mut().expect("a cluster");
        cluster.seeds = seed.iter().map(ToString::to_string).collect();
        cluster.loss = loss;
    })
    .await
}

fn url(control: &TestControl, path: &str) -> String {
    format!("http://{}{path}", control.api)
}

async fn put(control: &TestControl, body: &str) -> (StatusCode, Value) {
    api(Method::PUT, &url(control, "/v1/routing"), Some(TOKEN), Some(body)).await
}

async fn get(control: &TestControl) -> (StatusCode, Value) {
    api(Method::GET, &url(control, "/v1/routing"), Some(TOKEN), None).await
}

/// Waits (up to 10 s) until `control` holds `version`, accepted by `by`.
async fn wait_for_version(control: &TestControl, version: u64, by: &str) -> Value {
    let what = format!("routing version {version} by {by} on {}", control.cluster.node_id());
    wait::until(&what, Duration::from_secs(10), Duration::from_millis(50), async || {
        let (status, view) = get(control).await;
        (status == StatusCode::OK && view["version"] == version && view["by"] == by).then_some(view)
    })
    .await
}

fn routing_of(view: &Value) -> Routing {
    serde_json::from_value(view["routing"].clone()).expect("GET /v1/routing shows a document")
}

/// A stand-in for an edge: a cluster member with the edge role that reports, as an
/// edge does once it serves by it, the version of the newest document it sees
/// (when `follow`), or nothing.
struct FakeEdge {
    cluster: Arc<Cluster>,
    shutdown: CancellationToken,
}

impl FakeEdge {
    async fn join(node_id: &str, seed: SocketAddr, follow: bool) -> Self {
        let mut config = ClusterConfig::new(any(), SECRET);
        config.seeds = vec![seed.to_string()];
        let node = NodeInfo {
            node_id: node_id.into(),
            role: Role::Edge,
            region: Some("test".into()),
            location: None,
            public_addr: None,
            admin: None,
        };
        let shutdown = CancellationToken::new();
        let cluster = Cluster::join(&config, node, &Registry::new(), shutdown.clone()).await.expect("joins");
        cluster.publish_health(true, 0.0).await;
        if follow {
            let (cluster, shutdown) = (cluster.clone(), shutdown.clone());
            let mut changes = cluster.subscribe(Topic::Routing).await;
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        _ = changes.recv() => {}
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if let Some(newest) = cluster.routing().await {
                        cluster.set_routing_applied(newest.version).await;
                    }
                }
            });
        }
        Self { cluster, shutdown }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.cluster.stopped().await;
    }
}

#[tokio::test]
async fn routing_is_validated_versioned_and_kept_across_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let c1 = control("control-1", data.path(), None).await;

    // None yet.
    let (status, reply) = get(&c1).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("no routing document"), "{reply}");
    assert_eq!(c1.metric("cdn_routing_version", &[]), 0.0);

    // The first document is version 1 (a lone control node waits until it takes
    // itself for the first node of its cluster: a few seconds).
    let (status, reply) = put(&c1, DOCUMENT).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!((reply["version"].as_u64(), reply["by"].as_str()), (Some(1), Some("control-1")), "{reply}");
    let (status, view) = get(&c1).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!((view["version"].as_u64(), view["by"].as_str()), (Some(1), Some("control-1")), "{view}");
    assert_eq!(routing_of(&view), Routing::from_json(DOCUMENT.as_bytes()).unwrap());
    assert_eq!(view["edges"], serde_json::json!({}), "no edge in sight");

    // Bad documents: 400 naming the field, nothing changes.
    let bad_type = DOCUMENT.replace(r#""weight": 2"#, r#""weight": "heavy""#);
    let bad_meaning = DOCUMENT.replace(r#""default_site": "video""#, r#""default_site": "nope""#);
    let bad_rule = DOCUMENT.replace(r#""bypass": true"#, r#""bypass": true, "ttl": "1h""#);
    for (body, field) in [
        (bad_type.as_str(), "sites[0].origins[0].weight: "),
        (bad_meaning.as_str(), "default_site: "),
        (bad_rule.as_str(), "sites[1].rules[0].ttl: "),
        (r#"{"sites": [{"name": "x", "origins": [], "colour": "red"}]}"#, "sites[0]"),
        ("{not json", ""),
    ] {
        let (status, reply) = put(&c1, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {reply}");
        assert!(reply["error"].as_str().unwrap().starts_with("invalid routing document"), "{reply}");
        let problems = reply["problems"].as_array().unwrap();
        assert!(problems.iter().any(|p| p.as_str().unwrap().starts_with(field)), "{field} in {reply}");
    }
    let client = ControlClient::new(&url(&c1, ""), TOKEN).unwrap();
    let bad_toml = TOML_DOCUMENT.replace("url = ", "weight = 0\nurl = ");
    match client.routing_put(bad_toml, Format::Toml).await {
        Err(ClientError::InvalidRouting { status, problems, .. }) => {
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert!(problems[0].starts_with("sites[0].origins[0].weight: "), "{problems:?}");
        }
        other => panic!("a bad TOML document is refused, not {other:?}"),
    }
    let (_, view) = get(&c1).await;
    assert_eq!(view["version"], 1, "still the first document: {view}");
    assert_eq!(c1.metric("cdn_routing_version", &[]), 1.0);

    // No token, a wrong one: 401, nothing changes. Other methods: 405.
    for token in [None, Some("wrong-token-0123456789")] {
        let (status, _) = api(Method::PUT, &url(&c1, "/v1/routing"), token, Some(DOCUMENT)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _) = api(Method::GET, &url(&c1, "/v1/routing"), token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, _) = api(Method::POST, &url(&c1, "/v1/routing"), Some(TOKEN), Some(DOCUMENT)).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // The next one, in TOML through the typed client: version 2.
    let ack = client.routing_put(TOML_DOCUMENT, Format::Toml).await.unwrap();
    assert_eq!((ack.version, ack.by.as_str()), (2, "control-1"));
    let view = client.routing_get().await.unwrap();
    assert_eq!(view.version, 2);
    assert_eq!(view.routing, Routing::from_toml(TOML_DOCUMENT).unwrap());
    assert_eq!(c1.metric("cdn_routing_version", &[]), 2.0);

    // Restarted on the same data_dir: still version 2, and the next one is 3.
    let (api_addr, gossip) = (c1.api, c1.cluster.gossip_addr());
    c1.stop().await;
    assert!(data.path().join("routing.json").is_file());
    let c1 = TestControl::start(data.path(), api_addr, gossip).await;
    let (status, view) = get(&c1).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!((view["version"].as_u64(), view["by"].as_str()), (Some(2), Some("control-1")), "{view}");
    assert_eq!(routing_of(&view), Routing::from_toml(TOML_DOCUMENT).unwrap());
    assert_eq!(c1.metric("cdn_routing_version", &[]), 2.0);
    let (status, reply) = put(&c1, DOCUMENT).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(3)), "{reply}");
    c1.stop().await;
}

#[tokio::test]
async fn control_nodes_agree_on_the_newest_routing_version() {
    let (d1, d2, d3) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let c1 = control("control-1", d1.path(), None).await;
    let seed = c1.cluster.gossip_addr();
    let c2_loss = PacketLoss::new(2);
    let c2 = control_with_loss("control-2", d2.path(), Some(seed), c2_loss.clone()).await;
    let edge = FakeEdge::join("edge-1", seed, false).await;

    // Two documents on the first: the second adopts version 2 (by control-1).
    let (status, reply) = put(&c1, DOCUMENT).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(1)), "{reply}");
    let (status, reply) = put(&c1, DOCUMENT).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(2)), "{reply}");
    let started = std::time::Instant::now();
    let view = wait_for_version(&c2, 2, "control-1").await;
    eprintln!("control-2 adopted version 2 after {:?}", started.elapsed());
    assert_eq!(routing_of(&view), Routing::from_json(DOCUMENT.as_bytes()).unwrap());
    assert!(d2.path().join("routing.json").is_file(), "adopted documents are stored too");

    // A document on the second goes on from there: version 3, adopted by the first.
    let client = ControlClient::new(&url(&c2, ""), TOKEN).unwrap();
    let ack = client.routing_put(TOML_DOCUMENT, Format::Toml).await.unwrap();
    assert_eq!((ack.version, ack.by.as_str()), (3, "control-2"));
    let view = wait_for_version(&c1, 3, "control-2").await;
    assert_eq!(routing_of(&view), Routing::from_toml(TOML_DOCUMENT).unwrap());
    assert_eq!(c1.metric("cdn_routing_version", &[]), 3.0);

    // Edges, and the version each reports (none yet: 0 in the document's view, null
    // in /v1/nodes; then what it reports).
    let (_, view) = get(&c1).await;
    assert_eq!(view["edges"]["edge-1"], 0, "{view}");
    edge.cluster.set_routing_applied(3).await;
    wait::until("edge-1 to report version 3", Duration::from_secs(10), Duration::from_millis(50), async || {
        let (_, view) = get(&c1).await;
        (view["edges"]["edge-1"] == 3).then_some(())
    })
    .await;
    let (_, nodes) = api(Method::GET, &url(&c1, "/v1/nodes"), Some(TOKEN), None).await;
    let node = |id: &str| nodes.as_array().unwrap().iter().find(|n| n["node_id"] == id).cloned().unwrap();
    assert_eq!(node("edge-1")["routing_version"], 3, "{nodes}");
    assert_eq!(node("control-2")["routing_version"], Value::Null, "{nodes}");

    // A new control node, and one that restarts, go on from the current version.
    let c3 = control("control-3", d3.path(), Some(seed)).await;
    wait_for_version(&c3, 3, "control-2").await;
    let (api_addr, gossip) = (c1.api, c1.cluster.gossip_addr());
    c1.stop().await;
    let c1 = TestControl::start(d1.path(), api_addr, gossip).await;
    let (_, view) = get(&c1).await;
    assert_eq!((view["version"].as_u64(), view["by"].as_str()), (Some(3), Some("control-2")), "{view}");
    let (status, reply) = put(&c3, DOCUMENT).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(4)), "{reply}");
    wait_for_version(&c1, 4, "control-3").await;
    wait_for_version(&c2, 4, "control-3").await;

    // Two control nodes that cannot hear each other accept a document each: both
    // get version 5. Once they hear each other again, the one accepted by the
    // greater node id (control-2) wins everywhere.
    c2_loss.set(1.0, 1.0);
    let (status, reply) = put(&c1, DOCUMENT).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(5)), "{reply}");
    let ack = client.routing_put(TOML_DOCUMENT, Format::Toml).await.unwrap();
    assert_eq!((ack.version, ack.by.as_str()), (5, "control-2"));
    wait_for_version(&c3, 5, "control-1").await;
    c2_loss.set(0.0, 0.0);
    for control in [&c1, &c3, &c2] {
        let view = wait_for_version(control, 5, "control-2").await;
        assert_eq!(routing_of(&view), Routing::from_toml(TOML_DOCUMENT).unwrap());
    }

    edge.stop().await;
    for control in [c1, c2, c3] {
        control.stop().await;
    }
}

#[tokio::test]
async fn operator_commands_apply_and_show_routing() {
    let data = tempfile::tempdir().unwrap();
    let c1 = control("control-1", data.path(), None).await;
    let edge = FakeEdge::join("edge-f", c1.cluster.gossip_addr(), true).await;
    wait_for_edges(&c1, &["edge-f"]).await;
    let files = tempfile::tempdir().unwrap();
    let toml_file = files.path().join("routing.toml");
    std::fs::write(&toml_file, TOML_DOCUMENT).unwrap();
    let bad_file = files.path().join("bad.json");
    std::fs::write(&bad_file, DOCUMENT.replace(r#""weight": 2"#, r#""weight": 0"#)).unwrap();
    let cdn = |args: &[&str]| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cdn"));
        command
            .args(args)
            .env("CDN_CONTROL", url(&c1, ""))
            .env("CDN_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        command
    };
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();

    // Nothing to show yet.
    let out = cdn(&["routing", "show"]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no routing document yet"), "{}", text(&out.stderr));

    // TOML, waiting until the edge serves by it.
    let path = toml_file.to_str().unwrap();
    let out = cdn(&["routing", "apply", path, "--wait", "--timeout", "15s"]).output().await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("routing version 1 accepted (by control-1)"), "{stdout}");
    assert!(stdout.contains("edge-f") && stdout.contains("version 1 applied on 1 edges in"), "{stdout}");

    let out = cdn(&["routing", "show"]).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).expect("show prints JSON");
    assert_eq!((shown["version"].as_u64(), shown["edges"]["edge-f"].as_u64()), (Some(1), Some(1)), "{shown}");
    assert_eq!(routing_of(&shown), Routing::from_toml(TOML_DOCUMENT).unwrap());

    // A bad file: refused with its field, exit non-zero, nothing changes.
    let out = cdn(&["routing", "apply", bad_file.to_str().unwrap()]).output().await.unwrap();
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("refused") && stderr.contains("sites[0].origins[0].weight"), "{stderr}");
    let (_, view) = get(&c1).await;
    assert_eq!(view["version"], 1);

    // An edge that does not follow: --wait gives up after its timeout, naming it.
    let silent = FakeEdge::join("edge-silent", c1.cluster.gossip_addr(), false).await;
    wait::until("edge-silent in the view", Duration::from_secs(10), Duration::from_millis(50), async || {
        let (_, view) = get(&c1).await;
        view["edges"].get("edge-silent").map(|_| ())
    })
    .await;
    let out = cdn(&["routing", "apply", path, "--wait", "--timeout", "1s"]).output().await.unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("routing version 2 accepted"), "{stdout}");
    assert!(stderr.contains("not applied everywhere") && stderr.contains("edge-silent (version 0)"), "{stderr}");

    silent.stop().await;
    edge.stop().await;
    c1.stop().await;
}

#[tokio::test]
async fn a_full_disk_refuses_a_routing_document_and_publishes_nothing() {
    use crate::process::{ControlProcess, DataDir, can_mount_tmpfs};
    if let Err(why) = can_mount_tmpfs().await {
        eprintln!("\n\n*** SKIPPED a_full_disk_refuses_a_routing_document: cannot mount a tmpfs here ({why}) ***\n\n");
        return;
    }
    let control = ControlProcess::start(
        "control-disk",
        TOKEN,
        SECRET,
        ([127, 0, 0, 1], [127, 0, 0, 1]),
        DataDir::Tmpfs("64k"),
        "info",
    )
    .await;
    let seen = control.seen_data_dir();
    // What the control node publishes, seen from another member.
    let observer = FakeEdge::join("observer", control.gossip, false).await;
    let head_version = async || observer.cluster.routing_heads().await.get("control-disk").map(|head| head.version);
    let url = format!("http://{}/v1/routing", control.api);
    let (status, reply) = api(Method::PUT, &url, Some(TOKEN), Some(DOCUMENT)).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(1)), "{reply}");
    wait::until("version 1 in gossip", Duration::from_secs(10), Duration::from_millis(50), async || {
        (head_version().await == Some(1)).then_some(())
    })
    .await;

    // Fill the disk: the next document is refused with a JSON 503 and goes nowhere.
    let fill = seen.join("fill");
    {
        let mut file = std::fs::File::create(&fill).unwrap();
        let chunk = vec![0u8; 4096];
        let error = loop {
            if let Err(error) = file.write_all(&chunk) {
                break error;
            }
        };
        assert_eq!(error.raw_os_error(), Some(28), "filled up: {error}");
    }
    for _ in 0..3 {
        let (status, reply) = api(Method::PUT, &url, Some(TOKEN), Some(TOML_DOCUMENT_AS_JSON)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{reply}");
        let error = reply["error"].as_str().expect("a JSON error body");
        assert!(error.contains("routing.json") && error.contains("No space left on device"), "{error}");
    }
    let (_, view) = api(Method::GET, &url, Some(TOKEN), None).await;
    assert_eq!(view["version"], 1, "{view}");
    assert_eq!(routing_of(&view), Routing::from_json(DOCUMENT.as_bytes()).unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(head_version().await, Some(1), "nothing refused was published");
    let stored: Value = serde_json::from_slice(&std::fs::read(seen.join("routing.json")).unwrap()).unwrap();
    assert_eq!(stored["version"], 1, "the stored document is the old one, whole");
    assert!(!seen.join("routing.json.tmp").exists(), "no half-written copy left behind");

    // Space is back: the next document takes version 2 (the refused ones used none).
    std::fs::remove_file(&fill).unwrap();
    let (status, reply) = api(Method::PUT, &url, Some(TOKEN), Some(TOML_DOCUMENT_AS_JSON)).await;
    assert_eq!((status, reply["version"].as_u64()), (StatusCode::OK, Some(2)), "{reply}");
    wait::until("version 2 in gossip", Duration::from_secs(10), Duration::from_millis(50), async || {
        (head_version().await == Some(2)).then_some(())
    })
    .await;

    let metrics = metrics::scrape(control.admin).await;
    assert!(metrics.contains("cdn_routing_store_errors_total 3"), "{metrics}");
    assert!(metrics.contains("cdn_routing_version 2"), "{metrics}");
    let output = control.stop().await;
    assert!(output.contains("routing document not stored"), "{output}");
    observer.stop().await;
}

/// [`TOML_DOCUMENT`], as JSON.
const TOML_DOCUMENT_AS_JSON: &str = r#"{"default_site": "www", "sites": [{"name": "www", "hosts": ["www.cdn.test"],
  "origins": [{"url": "http://127.0.0.1:18090"}], "rules": [{"path_suffix": ".m3u8", "ttl": "2s"}]}]}"#;

/// The first fenced block in `lang` after `heading` in docs/routing.md.
fn doc_block(doc: &str, heading: &str, lang: &str) -> String {
    let from = doc.find(heading).unwrap_or_else(|| panic!("{heading} in docs/routing.md"));
    let fence = format!("```{lang}\n");
    let start =
        from + doc[from..].find(&fence).unwrap_or_else(|| panic!("a {lang} block after {heading}")) + fence.len();
    let end = start + doc[start..].find("```").expect("a closing fence");
    doc[start..end].to_string()
}

#[test]
fn the_documented_example_is_valid_and_the_same_in_json_and_toml() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/routing.md")).unwrap();
    let json = doc_block(&doc, "## A full example", "json");
    let toml = doc_block(&doc, "## A full example", "toml");
    let from_json = cdn_control::routing::parse(json.as_bytes(), Format::Json).expect("the JSON example is valid");
    let from_toml = cdn_control::routing::parse(toml.as_bytes(), Format::Toml).expect("the TOML example is valid");
    assert_eq!(from_json, from_toml);
    assert_eq!(from_json.sites.len(), 2);
    // And the test documents here.
    assert_eq!(
        Routing::from_json(TOML_DOCUMENT_AS_JSON.as_bytes()).unwrap(),
        Routing::from_toml(TOML_DOCUMENT).unwrap()
    );
    let router = cdn_cluster::routing::Router::new(from_json);
    assert_eq!(router.site_for("a.video.test").map(|s| s.name.as_str()), Some("video"));
    assert_eq!(router.site_for("SHOP.cdn.test:8443").map(|s| s.name.as_str()), Some("shop"));
    assert_eq!(router.site_for("a.b.video.test").map(|s| s.name.as_str()), Some("video"), "the default site");
    let shop = router.routing().site("shop").unwrap();
    assert!(shop.rule_for("/api/cart").is_some_and(|rule| rule.bypass));
}
