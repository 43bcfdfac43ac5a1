//! `cdn dev` as a newcomer runs it (the binary this build made, from the repository
//! root, with its defaults): two origins, three edges, the control node and geo, and
//! the routing document `examples/routing.toml` applied through the control API.
//!
//! Checks that every edge applies the document and then routes by Host (`video` on
//! origin 1, `shop` on origin 2, the default site for other names), that the rules of
//! the document hold (bypass, CORS preflight at the edge, `utm_*` out of the key, a
//! playlist kept 2 s whatever the origin says), that the video site fails over to its
//! backup origin while origin 1 is switched off (`<data-dir>/origin-1.down`) and comes
//! back, and that a restarted `cdn dev` keeps the document's version (it does not
//! apply an unchanged file again).
//!
//! `cdn dev` binds fixed addresses (127.0.0.1:8080 ... 127.0.0.13:9090), so where it
//! may (root, or unprivileged user namespaces) the test runs itself again in a
//! network namespace of its own with only loopback, as tests/browser.rs does;
//! otherwise it runs here, and fails (naming the busy addresses) while another
//! `cdn dev` runs.

use std::{
    fs,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use cdn_test_support::{
    curl::{Curl, curl_blocking},
    metrics, wait,
};
use serde_json::Value;

/// Set in the namespaced run of this test.
const INSIDE: &str = "CDN_DEV_TEST_IN_NETNS";
const TOKEN: &str = "dev-test-token-0123456789abcdef";
const EDGES: [(&str, &str); 3] = [("us-east", "127.0.0.11"), ("eu-west", "127.0.0.12"), ("ap-south", "127.0.0.13")];
/// What origin 1 (examples/content) and origin 2 (examples/content-shop) answer for /hello.txt.
const ORIGIN_1_HELLO: &str = "Hello from the CDN origin.";
const ORIGIN_2_HELLO: &str = "Hello from origin 2";

/// Whether a private network namespace (with loopback up) can be made here.
fn netns_available() -> bool {
    Command::new("unshare")
        .args(["--net", "--", "ip", "link", "set", "lo", "up"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
fn dev_topology_routes_by_host_and_fails_over() {
    if std::env::var_os(INSIDE).is_none() && netns_available() {
        let exe = std::env::current_exe().expect("the test binary");
        let started = Instant::now();
        let out = Command::new("unshare")
            .args(["--net", "--", "sh", "-c", r#"ip link set lo up && exec "$@""#, "sh"])
            .arg(exe)
            .args(["dev_topology_routes_by_host_and_fails_over", "--exact", "--nocapture", "--test-threads=1"])
            .env(INSIDE, "1")
            .stdin(Stdio::null())
            .output()
            .expect("unshare runs");
        println!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("dev test: {:.1} s in a private network namespace", started.elapsed().as_secs_f64());
        assert!(out.status.success(), "the namespaced run failed ({}); its output is above", out.status);
        return;
    }
    let busy = busy_addresses();
    assert!(busy.is_empty(), "cannot start `cdn dev`, its addresses are in use (another `cdn dev`?): {busy:?}");
    checks();
}

/// The `cdn dev` addresses something else holds (src/dev.rs binds them).
fn busy_addresses() -> Vec<String> {
    let mut tcp: Vec<(&str, u16)> =
        [8080, 8081, 9000, 9001, 9053, 9091, 9092, 5300].into_iter().map(|port| ("127.0.0.1", port)).collect();
    let mut udp: Vec<(&str, u16)> = [5300, 7946, 7947].into_iter().map(|port| ("127.0.0.1", port)).collect();
    for (_, ip) in EDGES {
        tcp.extend([8080, 8443, 9090].map(|port| (ip, port)));
        udp.extend([8443, 7946].map(|port| (ip, port)));
    }
    let mut busy: Vec<String> = tcp
        .into_iter()
        .filter(|addr| TcpListener::bind(*addr).is_err())
        .map(|(ip, p)| format!("tcp {ip}:{p}"))
        .collect();
    busy.extend(udp.into_iter().filter(|addr| UdpSocket::bind(*addr).is_err()).map(|(ip, p)| format!("udp {ip}:{p}")));
    busy
}

/// A running `cdn dev`; SIGINT and a wait when dropped, its log printed when a check failed.
struct Dev {
    child: Option<Child>,
    log: PathBuf,
}

impl Dev {
    fn start(data: &Path, log: PathBuf) -> Self {
        let out = fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cdn"))
            .args(["dev", "--token", TOKEN, "--data-dir"])
            .arg(data)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,hickory_server=warn,quinn=warn,chitchat=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("cdn dev starts");
        Self { child: Some(child), log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGINT (a graceful stop), then the exit status.
    fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("`cdn dev` did not stop within 30 s of SIGINT:\n{}", tail(&self.log()));
            }
            sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Dev {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- cdn dev log ---\n{}", tail(&self.log()));
        }
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

fn curl(args: &[&str]) -> Curl {
    let mut all = vec!["--max-time", "10"];
    all.extend_from_slice(args);
    curl_blocking(&all)
}

/// GET `path` from the edge at `ip` with `Host: host`.
fn get(ip: &str, host: &str, path: &str) -> Curl {
    curl(&["-H", &format!("Host: {host}"), &format!("http://{ip}:8080{path}")])
}

fn api(path: &str) -> Curl {
    curl(&["-H", &format!("Authorization: Bearer {TOKEN}"), &format!("http://127.0.0.1:9000{path}")])
}

/// Waits until the control node holds a routing document and every edge reports
/// it serves by it: the view of `GET /v1/routing`.
fn wait_routing_applied(dev: &Dev) -> Value {
    let start = Instant::now();
    loop {
        let resp = api("/v1/routing");
        let view: Option<Value> = serde_json::from_slice(&resp.body).ok();
        if let Some(view) = view.filter(|view| {
            let version = view["version"].as_u64();
            version.is_some() && EDGES.iter().all(|(id, _)| view["edges"][id].as_u64() == version)
        }) {
            return view;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the edges did not all report the routing version within 30 s; GET /v1/routing: {} {}\n{}",
            resp.status,
            resp.text(),
            tail(&dev.log())
        );
        sleep(Duration::from_millis(100));
    }
}

fn checks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let mut dev = Dev::start(&data, dir.path().join("dev-1.log"));

    // The document from examples/routing.toml, applied by `cdn dev` itself.
    let view = wait_routing_applied(&dev);
    let version = view["version"].as_u64().expect("version");
    let names: Vec<&str> =
        view["routing"]["sites"].as_array().expect("sites").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["video", "shop"], "{view}");
    assert_eq!(view["routing"]["default_site"], "video");
    for (id, ip) in EDGES {
        let text = curl(&[&format!("http://{ip}:9090/metrics")]).text();
        assert_eq!(metrics::sum(&text, "cdn_routing_version", &[]), version as f64, "{id}: cdn_routing_version");
    }
    assert!(dev.log().contains("routing document applied"), "{}", tail(&dev.log()));

    // Host routing on every edge: video (exact and wildcard, and the default site for
    // other names and bare addresses) on origin 1, shop on origin 2.
    for (id, ip) in EDGES {
        for host in ["www.cdn.test", "a.video.test", "somewhere.example", ip] {
            let resp = get(ip, host, "/hello.txt");
            assert_eq!(resp.status, 200, "{id} Host {host}: {resp:?}");
            assert!(
                resp.text().starts_with(ORIGIN_1_HELLO),
                "{id} Host {host}: origin 1's file, got {:?}",
                resp.text()
            );
        }
        let shop = get(ip, "shop.cdn.test", "/hello.txt");
        assert_eq!(shop.status, 200, "{id} Host shop.cdn.test: {shop:?}");
        assert!(shop.text().starts_with(ORIGIN_2_HELLO), "{id} shop.cdn.test: origin 2's file, got {:?}", shop.text());
        let again = get(ip, "shop.cdn.test", "/hello.txt");
        assert_eq!(again.x_cache(), "HIT", "{id}: the shop's copy is cached apart from the video site's");
        assert!(again.text().starts_with(ORIGIN_2_HELLO));
        let shop_page = get(ip, "shop.cdn.test", "/");
        assert!(shop_page.text().contains("The demo shop"), "{id}: shop index: {:?}", shop_page.text());
        let nothing = get(ip, "shop.cdn.test", "/v/demo.mp4");
        assert_eq!(nothing.status, 404, "{id}: the shop's origin has no video");
    }

    // The rules (on us-east).
    let ip = EDGES[0].1;
    for _ in 0..2 {
        let api_call = get(ip, "shop.cdn.test", "/api/cart.json");
        assert_eq!((api_call.status, api_call.x_cache()), (200, "BYPASS"), "/api/ is never stored");
    }
    let preflight = curl(&[
        "-X",
        "OPTIONS",
        "-H",
        "Host: shop.cdn.test",
        "-H",
        "Origin: https://elsewhere.example",
        "-H",
        "Access-Control-Request-Method: GET",
        &format!("http://{ip}:8080/static/shop.css"),
    ]);
    assert_eq!(preflight.status, 204, "CORS preflight answered at the edge: {preflight:?}");
    assert_eq!(preflight.header("access-control-allow-origin"), "*");
    let css = get(ip, "shop.cdn.test", "/static/shop.css");
    assert_eq!((css.status, css.header("access-control-allow-origin")), (200, "*"));
    let first = get(ip, "www.cdn.test", "/info.json?utm_source=newsletter");
    let second = get(ip, "www.cdn.test", "/info.json?utm_campaign=other");
    assert_eq!((first.x_cache(), second.x_cache()), ("MISS", "HIT"), "utm_* parameters are not in the cache key");
    // The playlist: the origin says max-age=60, the document 2 s.
    let playlist = get(ip, "www.cdn.test", "/hls/index.m3u8");
    assert_eq!((playlist.status, playlist.x_cache()), (200, "MISS"));
    assert!(playlist.header("cache-control").contains("max-age=60"), "{:?}", playlist.header("cache-control"));
    assert!(playlist.text().contains("seg-0.ts"));
    let fetched = Instant::now();
    assert_eq!(get(ip, "www.cdn.test", "/hls/index.m3u8").x_cache(), "HIT");
    sleep(Duration::from_millis(2300).saturating_sub(fetched.elapsed()));
    let expired = get(ip, "www.cdn.test", "/hls/index.m3u8");
    assert_eq!(expired.status, 200);
    assert_ne!(expired.x_cache(), "HIT", "the playlist rule (ttl 2s) overrides the origin's 60 s");
    let segment = get(ip, "www.cdn.test", "/hls/seg-1.ts");
    assert_eq!((segment.status, segment.header("content-type")), (200, "video/mp2t"));

    // Failover: origin 1 switched off, the video site is served by its backup (origin
    // 2), with no failed request; switched on again, by origin 1.
    let switch = data.join("origin-1.down");
    fs::write(&switch, "").expect("switch file");
    wait::blocking("origin 1 to stop", Duration::from_secs(5), Duration::from_millis(50), || {
        (!curl(&["--max-time", "1", "http://127.0.0.1:8080/hello.txt"]).success).then_some(())
    });
    let off = Instant::now();
    let mut n = 0;
    let mut ask = |want: &str| {
        n += 1;
        let resp = get(ip, "www.cdn.test", &format!("/hello.txt?n={n}"));
        assert_eq!(resp.status, 200, "request {n} during the switch: {resp:?}");
        resp.text().starts_with(want).then_some(())
    };
    // Probes every 1 s, down after 2 fails: the backup within interval x fails + 1 s.
    wait::blocking("the backup origin to answer", Duration::from_secs(3), Duration::from_millis(100), || {
        ask(ORIGIN_2_HELLO)
    });
    println!(
        "dev test: origin 2 answered for the video site {:.0} ms after origin 1 stopped",
        off.elapsed().as_millis()
    );
    fs::remove_file(&switch).expect("remove the switch file");
    let on = Instant::now();
    wait::blocking("origin 1 to answer again", Duration::from_secs(6), Duration::from_millis(100), || {
        ask(ORIGIN_1_HELLO)
    });
    println!("dev test: origin 1 answered again {:.0} ms after its switch file was removed", on.elapsed().as_millis());

    // A restart on the same data directory keeps the version: the file is unchanged.
    let status = dev.stop();
    assert!(status.success(), "`cdn dev` exit status after SIGINT: {status}\n{}", tail(&dev.log()));
    let mut dev = Dev::start(&data, dir.path().join("dev-2.log"));
    let again = wait_routing_applied(&dev);
    assert_eq!(again["version"].as_u64(), Some(version), "restarted on the same data, same document: {again}");
    assert!(dev.log().contains("already holds this routing document"), "{}", tail(&dev.log()));
    let shop = get(ip, "shop.cdn.test", "/hello.txt");
    assert!(shop.text().starts_with(ORIGIN_2_HELLO), "after the restart: {:?}", shop.text());
    let status = dev.stop();
    assert!(status.success(), "`cdn dev` exit status after SIGINT: {status}");
}

/// The routing documents the repository ships parse and validate (what `cdn dev` and
/// the docker deployment apply), without starting anything.
#[test]
fn shipped_routing_documents_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["examples/routing.toml", "deploy/config/routing.toml"] {
        let text = fs::read(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let routing = cdn_control::routing::parse(&text, cdn_control::routing::Format::Toml)
            .unwrap_or_else(|refusal| panic!("{file}: {}", refusal.problems.join("; ")));
        assert_eq!(routing.default_site.as_deref(), Some("video"), "{file}");
        assert_eq!(routing.sites.len(), 2, "{file}");
    }
}
