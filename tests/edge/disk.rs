//! The disk tier (`[[cache.disk]]`, issue #18) with `cdn edge` as a process of its
//! own, so it can be stopped with SIGTERM, killed with SIGKILL and started again on
//! the same directory, and so its disk can be a tiny tmpfs in a mount namespace of
//! its own. The mock origin runs in the test and counts its requests: "no origin
//! request" is read there, and every body is compared with the origin's bytes.
//!
//! What the tests rely on (the contract): each stored entry (whole object, `Vary`
//! marker, head of a sliced object, each slice) is one file under
//! `<path>/objects/`, written shortly after its fill; `<path>/purges.json` records
//! the purges applied; the index is rebuilt before `/readyz` says ready; a response
//! read from disk says `Cache-Status: cdn; hit; detail=disk`; a file that fails its
//! checks is a MISS counted in `cdn_cache_disk_errors_total{op="read"}`; a full disk
//! stops writes (`op="write",kind="full"`) and nothing else; an unusable path is a
//! config error (exit 2) naming it.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use cdn_cluster::MemberState;
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use serde_json::{Value, json};
use tokio::process::Child;

use cdn_test_support::{
    client::{HttpClient, Reply, client, get, h2c_client, send, unpooled_client},
    control::{SECRET, TOKEN, TestControl, api},
    edge::TestEdge,
    metrics,
    mock_origin::{MockOrigin, Route},
    net::free_port,
};

// --- an edge process on a disk directory ------------------------------------------------

/// Everything an edge process is started with; a restart starts the same spec again
/// (same ports, same disk directory).
#[derive(Clone)]
struct Spec {
    node_id: String,
    origin: String,
    http: SocketAddr,
    admin: SocketAddr,
    /// The `[[cache.disk]]` path.
    disk: PathBuf,
    /// Its `size`.
    disk_size: &'static str,
    /// Lines of `[cache]` (`memory = "4MiB"`, ...).
    cache: String,
    /// `[cluster]`: this edge's gossip address and the seed it joins through.
    cluster: Option<(SocketAddr, SocketAddr)>,
    /// A tmpfs of this size (and mount options) mounted over the disk directory, in
    /// a mount namespace of the process's own (`unshare --mount`).
    tmpfs: Option<&'static str>,
    config: PathBuf,
}

impl Spec {
    /// An edge on 127.0.0.1 (fresh ports) keeping its disk tier in `<dir>/disk`.
    fn new(dir: &Path, node_id: &str, origin: &str, cache: &str) -> Self {
        Self {
            node_id: node_id.into(),
            origin: origin.into(),
            http: ([127, 0, 0, 1], free_port()).into(),
            admin: ([127, 0, 0, 1], free_port()).into(),
            disk: dir.join("disk"),
            disk_size: "256MiB",
            cache: cache.into(),
            cluster: None,
            tmpfs: None,
            config: dir.join("edge.toml"),
        }
    }

    fn write_config(&self) {
        let mut text = format!(
            "node_id = \"{id}\"\n[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n[origin]\nurl = \"{origin}\"\n\
             [cache]\n{cache}\n[[cache.disk]]\npath = \"{disk}\"\nsize = \"{size}\"\n[limits]\ngrace = \"2s\"\n",
            id = self.node_id,
            http = self.http,
            admin = self.admin,
            origin = self.origin,
            cache = self.cache,
            disk = self.disk.display(),
            size = self.disk_size,
        );
        if let Some((gossip, seed)) = self.cluster {
            text.push_str(&format!("[cluster]\nlisten = \"{gossip}\"\nseeds = [\"{seed}\"]\nsecret = \"{SECRET}\"\n"));
        }
        std::fs::write(&self.config, text).unwrap();
    }
}

/// A running `cdn edge`, its output captured. Killed when dropped.
struct EdgeProcess {
    child: Child,
    spec: Spec,
    output: Arc<Mutex<String>>,
}

impl EdgeProcess {
    /// Starts the process (without waiting for it to serve).
    fn spawn(spec: &Spec) -> Self {
        spec.write_config();
        let cdn = env!("CARGO_BIN_EXE_cdn");
        let mut command = match spec.tmpfs {
            None => {
                let mut command = tokio::process::Command::new(cdn);
                command.arg("edge").arg("--config").arg(&spec.config);
                command
            }
            Some(options) => {
                std::fs::create_dir_all(&spec.disk).unwrap();
                // unshare execs the shell and the shell execs cdn: one pid throughout.
                let mut command = tokio::process::Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount -t tmpfs -o "$1" tmpfs "$2" && exec "$3" edge --config "$4""#)
                    .arg("sh")
                    .arg(options)
                    .arg(&spec.disk)
                    .arg(cdn)
                    .arg(&spec.config);
                command
            }
        };
        let mut child = command
            .env("RUST_LOG", "info,chitchat=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cdn edge starts");
        let output = cdn_test_support::process::capture_output(&mut child);
        Self { child, spec: spec.clone(), output }
    }

    /// Starts the process and waits until `/readyz` says 200.
    async fn start(spec: &Spec) -> Self {
        let mut edge = Self::spawn(spec);
        edge.until_ready(async || {}).await;
        edge
    }

    /// Runs `meanwhile` again and again until `/readyz` says 200 (at most 30 s).
    async fn until_ready(&mut self, mut meanwhile: impl AsyncFnMut()) {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("cdn edge exited ({status}) before it was ready:\n{}", self.output());
            }
            if self.ready().await {
                eprintln!("{}: ready {:?} after the start", self.spec.node_id, started.elapsed());
                return;
            }
            if started.elapsed() > Duration::from_secs(30) {
                panic!("cdn edge not ready within 30 s:\n{}", self.output());
            }
            meanwhile().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    fn url(&self, path: &str) -> String {
        edge_url(&self.spec, path)
    }

    /// Whether `/readyz` answers 200.
    async fn ready(&self) -> bool {
        let url = format!("http://{}/readyz", self.spec.admin);
        let request = http::Request::get(url).body(Empty::<Bytes>::new()).unwrap();
        matches!(
            tokio::time::timeout(Duration::from_secs(5), unpooled_client().request(request)).await,
            Ok(Ok(response)) if response.status() == StatusCode::OK
        )
    }

    /// The sum of the samples of `name` whose labels include `labels`, from /metrics.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metrics::sum(&metrics::scrape(self.spec.admin).await, name, labels)
    }

    /// Waits until the disk tier indexes `n` entries (`cdn_cache_objects{tier="disk"}`).
    async fn wait_for_disk_entries(&self, n: usize) {
        let started = Instant::now();
        let mut have = 0.0;
        while started.elapsed() < Duration::from_secs(30) {
            have = self.metric("cdn_cache_objects", &[("tier", "disk")]).await;
            if have >= n as f64 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "{have} entries on disk after 30 s, expected {n}; files:\n{}\n{}",
            describe_files(&self.spec.disk),
            self.output()
        );
    }

    /// SIGTERM, then waits (at most 20 s) for a clean exit; returns the output.
    async fn sigterm(mut self) -> String {
        let pid = self.child.id().expect("running");
        let status =
            tokio::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().await.expect("kill runs");
        assert!(status.success(), "kill -TERM {pid}");
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("cdn edge still running 20 s after SIGTERM:\n{}", self.output()))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let output = self.output();
        assert!(exit.success(), "cdn edge exited with {exit} after SIGTERM:\n{output}");
        output
    }

    /// SIGKILL, and waits for the process to be gone.
    async fn kill9(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }

    /// Waits (at most 15 s) for the process to exit by itself.
    async fn exit(mut self) -> (ExitStatus, String) {
        let status = tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("cdn edge still running after 15 s:\n{}", self.output()))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        (status, self.output())
    }
}

// --- content, requests, files ----------------------------------------------------------

/// `len` pseudo-random bytes that depend on `name`: no two objects share content, so
/// a file read back under the wrong key shows.
fn content(name: &str, len: usize) -> Bytes {
    let mut state =
        name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A cacheable route for `body` with a strong ETag, answering ranges (so that objects
/// larger than a slice are sliced) and revalidations.
fn route(body: &Bytes, etag: &str) -> Route {
    Route::ok("public, max-age=3600", body.clone()).header("etag", &format!("\"{etag}\"")).ranges().revalidate()
}

/// What the origin sees when the edge fetches every 1 MiB slice of a `len`-byte
/// object once: one request per slice's `Range`, as `MockOrigin::range_hits` lists them.
fn each_slice_once(len: usize) -> Vec<(String, usize)> {
    let mut ranges: Vec<(String, usize)> =
        (0..len).step_by(MIB).map(|start| (format!("bytes={start}-{}", (start + MIB).min(len) - 1), 1)).collect();
    ranges.sort();
    ranges
}

/// `GET url` (with `headers`) that must answer 200 with exactly `want`.
async fn fetch_exact(c: &HttpClient, url: &str, headers: &[(&str, &str)], want: &Bytes) -> Reply {
    let reply = get(c, url, headers).await;
    assert_eq!(reply.status, StatusCode::OK, "{url}");
    assert_eq!(reply.body.len(), want.len(), "{url}: length (X-Cache {})", reply.x_cache());
    assert!(reply.body == *want, "{url}: the body differs from the origin's (X-Cache {})", reply.x_cache());
    reply
}

/// Requests a variant until the edge stored it (a HIT): a request for a second
/// variant that comes while the first one's fill is still in flight joins that
/// fill, finds that its Vary values differ, and is forwarded without being stored.
async fn store_variant(c: &HttpClient, url: &str, headers: &[(&str, &str)], want: &Bytes) {
    for _ in 0..20 {
        if fetch_exact(c, url, headers, want).await.x_cache() == "HIT" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} {headers:?}: never stored");
}

/// A GET that may fail (the edge may be killed under it).
async fn try_get(c: &HttpClient, url: &str) -> Option<Reply> {
    let request = http::Request::get(url).body(Empty::<Bytes>::new()).ok()?;
    let response = tokio::time::timeout(Duration::from_secs(30), c.request(request)).await.ok()?.ok()?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Reply { status: parts.status, version: parts.version, headers: parts.headers, body })
}

/// `http://<the spec's HTTP listener><path>`.
fn edge_url(spec: &Spec, path: &str) -> String {
    format!("http://{}{path}", spec.http)
}

fn is_disk_hit(reply: &Reply) -> bool {
    reply.x_cache() == "HIT" && reply.header("cache-status").starts_with("cdn; hit") && detail(reply) == "disk"
}

/// The `detail` parameter of `Cache-Status`, or "".
fn detail(reply: &Reply) -> &str {
    reply.header("cache-status").split(';').find_map(|p| p.trim().strip_prefix("detail=")).unwrap_or("")
}

/// Every regular file under `<disk>/objects` (each one a cache file), sorted.
fn cache_files(disk: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                walk(&entry.path(), out);
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    let mut out = Vec::new();
    walk(&disk.join("objects"), &mut out);
    out.sort();
    out
}

/// The disk tier's entries indexed (`cdn_cache_objects{tier="disk"}`) and the cache
/// files, once the gauge stopped changing (at most 10 s).
async fn settled(edge: &EdgeProcess) -> (f64, usize) {
    let started = Instant::now();
    let mut last = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let indexed = edge.metric("cdn_cache_objects", &[("tier", "disk")]).await;
        if indexed == last || started.elapsed() > Duration::from_secs(10) {
            return (indexed, cache_files(&edge.spec.disk).len());
        }
        last = indexed;
    }
}

/// Each cache file's size and the printable text near its start (its key is there).
fn describe_files(disk: &Path) -> String {
    let mut out = String::new();
    for file in cache_files(disk) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        let text: String =
            bytes.iter().take(200).map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
        out.push_str(&format!("  {} {} bytes: {text}\n", file.display(), bytes.len()));
    }
    out
}

/// Flips every bit of the byte at `at` in `path`.
fn flip(path: &Path, at: u64) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[!byte[0]], at).unwrap();
}

/// Whether this machine lets a test mount a tmpfs in a private mount namespace.
async fn can_mount_tmpfs() -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let output = tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(dir.path())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("unshare: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("unshare --mount + mount tmpfs: {}", String::from_utf8_lossy(&output.stderr).trim()))
    }
}

/// A purge through `control`'s API; its sequence number.
async fn purge(control: &TestControl, body: Value) -> u64 {
    let url = format!("http://{}/v1/purge", control.api);
    let (status, reply) = api(Method::POST, &url, Some(TOKEN), Some(&body.to_string())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}: {reply}");
    reply["seq"].as_u64().expect("a sequence number")
}

/// Waits until `control` sees `node` in `state` (phi-accrual needs a few seconds to
/// call a stopped node dead).
async fn wait_for_member(control: &TestControl, node: &str, state: MemberState, timeout: Duration) {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if control.cluster.members().iter().any(|m| m.node_id == node && m.state == state) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen: Vec<String> = control.cluster.members().iter().map(|m| format!("{} {:?}", m.node_id, m.state)).collect();
    panic!("{node} not {state:?} after {timeout:?}; members: {seen:?}");
}

// --- tests -----------------------------------------------------------------------------

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_library_many_times_larger_than_memory_is_served_from_disk() {
    let origin = MockOrigin::start().await;
    let objects: Vec<(String, Bytes)> =
        (0..40).map(|i| format!("/lib/{i}.bin")).map(|p| (p.clone(), content(&p, 512 * KIB))).collect();
    for (path, body) in &objects {
        origin.route(path, route(body, path));
    }
    let big = content("/lib/big.mp4", 20 * MIB);
    origin.route("/lib/big.mp4", route(&big, "big"));
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(dir.path(), "edge-disk-library", &origin.url(), "memory = \"4MiB\"");
    let edge = EdgeProcess::start(&spec).await;
    let (h1, h2) = (client(), h2c_client());

    for (path, body) in &objects {
        assert_eq!(fetch_exact(&h1, &edge.url(path), &[], body).await.x_cache(), "MISS", "{path}");
    }
    fetch_exact(&h1, &edge.url("/lib/big.mp4"), &[], &big).await;
    let big_fills = origin.hits("/lib/big.mp4");
    // 40 objects, the sliced object's head and its 20 slices: one file each.
    edge.wait_for_disk_entries(61).await;
    assert_eq!(cache_files(&spec.disk).len(), 61, "one file per entry under objects/");
    let disk_bytes = edge.metric("cdn_cache_bytes", &[("tier", "disk")]).await;
    assert!(disk_bytes >= (40 * 512 * KIB + 20 * MIB) as f64, "cdn_cache_bytes{{tier=disk}} {disk_bytes}");
    let written = edge.metric("cdn_cache_disk_write_bytes_total", &[]).await;
    assert!(written >= (40 * 512 * KIB + 20 * MIB) as f64, "cdn_cache_disk_write_bytes_total {written}");

    // Twice over the whole library, over HTTP/1.1 and h2c: every object a HIT,
    // byte-exact, and not one request more at the origin.
    let mut from_disk = 0;
    for round in 0..2 {
        for (i, (path, body)) in objects.iter().enumerate() {
            let c = if (i + round) % 2 == 0 { &h1 } else { &h2 };
            let reply = fetch_exact(c, &edge.url(path), &[], body).await;
            assert_eq!(reply.x_cache(), "HIT", "{path} (round {round}): {}", reply.header("cache-status"));
            from_disk += usize::from(is_disk_hit(&reply));
        }
        for c in [&h1, &h2] {
            let reply = fetch_exact(c, &edge.url("/lib/big.mp4"), &[], &big).await;
            assert_eq!(reply.x_cache(), "HIT", "/lib/big.mp4 (round {round}): {}", reply.header("cache-status"));
        }
    }
    for (path, _) in &objects {
        assert_eq!(origin.hits(path), 1, "{path}: origin requests");
    }
    assert_eq!(origin.hits("/lib/big.mp4"), big_fills, "the sliced object: origin requests");
    eprintln!("library: {from_disk} of 80 object HITs said detail=disk");
    assert!(from_disk >= 40, "only {from_disk} of 80 HITs came from disk with 20 MiB of objects over 4 MiB of memory");
    let read = edge.metric("cdn_cache_disk_read_bytes_total", &[]).await;
    assert!(read >= (20 * MIB) as f64, "cdn_cache_disk_read_bytes_total {read}");
    // The memory tier kept to its bound meanwhile.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let memory = edge.metric("cdn_cache_bytes", &[("tier", "memory")]).await;
    assert!(memory > 0.0 && memory <= (4 * MIB) as f64, "cdn_cache_bytes{{tier=memory}} {memory}, bound 4 MiB");
    assert_eq!(edge.metric("cdn_cache_disk_errors_total", &[]).await, 0.0, "{}", edge.output());
    edge.sigterm().await;
}

#[tokio::test]
async fn after_sigterm_and_a_restart_every_object_is_a_hit_from_disk() {
    let origin = MockOrigin::start().await;
    let mut whole: Vec<(String, Bytes)> =
        (0..10).map(|i| format!("/r/{i}.js")).map(|p| (p.clone(), content(&p, 300 * KIB))).collect();
    // Smaller than the size bodies are mapped from their files at.
    whole.push(("/r/small.txt".into(), content("/r/small.txt", 700)));
    for (path, body) in &whole {
        origin.route(path, route(body, path));
    }
    let (gzip, br) = (content("/r/vary gzip", 100 * KIB), content("/r/vary br", 90 * KIB));
    origin.route("/r/vary", Route::ok("public, max-age=3600", gzip.clone()).header("vary", "Accept-Encoding"));
    let sliced = content("/r/clip.mp4", 5 * MIB);
    origin.route("/r/clip.mp4", route(&sliced, "clip"));

    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(dir.path(), "edge-disk-restart", &origin.url(), "memory = \"8MiB\"");
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in &whole {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    fetch_exact(&c, &edge.url("/r/vary"), &[("accept-encoding", "gzip")], &gzip).await;
    origin.route("/r/vary", Route::ok("public, max-age=3600", br.clone()).header("vary", "Accept-Encoding"));
    store_variant(&c, &edge.url("/r/vary"), &[("accept-encoding", "br")], &br).await;
    fetch_exact(&c, &edge.url("/r/clip.mp4"), &[], &sliced).await;
    // 11 whole objects, the Vary marker and 2 variants, the sliced head and 5 slices.
    let entries = 11 + 3 + 6;
    edge.wait_for_disk_entries(entries).await;
    let files = cache_files(&spec.disk);
    assert_eq!(files.len(), entries, "one file per entry");
    drop(c);
    edge.sigterm().await;
    assert_eq!(cache_files(&spec.disk), files, "a clean stop keeps every file");

    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    // Indexed before ready: the first requests already find everything.
    let (h1, h2) = (client(), h2c_client());
    for (i, (path, body)) in whole.iter().enumerate() {
        let reply = fetch_exact(if i % 2 == 0 { &h1 } else { &h2 }, &edge.url(path), &[], body).await;
        assert!(
            is_disk_hit(&reply),
            "{path}: X-Cache {}, Cache-Status {}",
            reply.x_cache(),
            reply.header("cache-status")
        );
    }
    for (encoding, body) in [("gzip", &gzip), ("br", &br)] {
        let reply = fetch_exact(&h1, &edge.url("/r/vary"), &[("accept-encoding", encoding)], body).await;
        assert!(is_disk_hit(&reply), "/r/vary {encoding}: {}", reply.header("cache-status"));
    }
    for c in [&h1, &h2] {
        let reply = fetch_exact(c, &edge.url("/r/clip.mp4"), &[], &sliced).await;
        assert_eq!(reply.x_cache(), "HIT", "/r/clip.mp4: {}", reply.header("cache-status"));
    }
    // A range of the sliced object, across a slice boundary.
    let reply = get(&h1, &edge.url("/r/clip.mp4"), &[("range", "bytes=1048000-2097999")]).await;
    assert_eq!(reply.status, StatusCode::PARTIAL_CONTENT);
    assert!(reply.body == sliced.slice(1_048_000..2_098_000), "the range's bytes");
    for path in whole.iter().map(|(p, _)| p.as_str()).chain(["/r/vary", "/r/clip.mp4"]) {
        assert_eq!(origin.hits(path), 0, "{path}: origin requests after the restart");
    }
    assert_eq!(edge.metric("cdn_cache_objects", &[("tier", "disk")]).await, entries as f64);
    assert_eq!(edge.metric("cdn_cache_disk_errors_total", &[]).await, 0.0, "{}", edge.output());
    edge.sigterm().await;
}

#[tokio::test]
async fn kill_9_mid_fill_then_restart_serves_nothing_that_differs_from_the_origin() {
    let origin = MockOrigin::start().await;
    let mut objects: Vec<(String, Bytes)> = Vec::new();
    // Stored and written before the kill.
    for i in 0..5 {
        let path = format!("/k/pre{i}");
        let body = content(&path, 200 * KIB);
        origin.route(&path, route(&body, &path));
        objects.push((path, body));
    }
    // Filling when the kill comes: trickled at different paces, so that their fills
    // and disk writes end at different times.
    for i in 0..16u64 {
        let path = format!("/k/{i}");
        let body = content(&path, 600 * KIB);
        origin.route(&path, route(&body, &path).trickle(50 * KIB, Duration::from_millis(5 * (i + 1))));
        objects.push((path, body));
    }
    let whole = content("/k/whole", 3 * MIB);
    origin.route(
        "/k/whole",
        Route::ok("public, max-age=3600", whole.clone())
            .header("etag", "\"w\"")
            .trickle(256 * KIB, Duration::from_millis(100)),
    );
    objects.push(("/k/whole".into(), whole));
    let big = content("/k/big", 8 * MIB);
    origin.route("/k/big", route(&big, "big"));
    objects.push(("/k/big".into(), big));

    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(dir.path(), "edge-disk-kill", &origin.url(), "memory = \"4MiB\"");
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in &objects[..5] {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    edge.wait_for_disk_entries(5).await;
    let before: BTreeSet<PathBuf> = cache_files(&spec.disk).into_iter().collect();
    assert_eq!(before.len(), 5);

    let mut load = Vec::new();
    for (path, _) in &objects[5..] {
        let (c, url) = (unpooled_client(), edge.url(path));
        load.push(tokio::spawn(async move { try_get(&c, &url).await }));
    }
    // Kill as soon as a few more files landed: fills and writes are under way.
    let started = Instant::now();
    while cache_files(&spec.disk).len() < before.len() + 4 && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    edge.kill9().await;
    let files = cache_files(&spec.disk);
    eprintln!("kill -9 after {:?}: {} cache files", started.elapsed(), files.len());
    for task in load {
        let _ = task.await;
    }
    // What a power loss leaves: a published file cut short, one empty, a torn temp file.
    let new: Vec<&PathBuf> = files.iter().filter(|f| !before.contains(*f)).collect();
    assert!(new.len() >= 2, "{} new files", new.len());
    let len = std::fs::metadata(new[0]).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(new[0]).unwrap().set_len(len / 2).unwrap();
    std::fs::OpenOptions::new().write(true).open(new[1]).unwrap().set_len(0).unwrap();
    std::fs::create_dir_all(spec.disk.join("tmp")).unwrap();
    std::fs::write(spec.disk.join("tmp").join("00ff00ff00ff00ff.1"), b"CDNC\x01\x01 torn").unwrap();

    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    let mut served = Vec::new();
    for (path, body) in &objects {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        served.push(format!("{path} {} {}", reply.x_cache(), origin.hits(path)));
        if path.starts_with("/k/pre") {
            // Written whole before the kill: kept.
            assert!(is_disk_hit(&reply), "{path}: {}", reply.header("cache-status"));
        }
    }
    eprintln!("after kill -9 and restart: {served:?}");
    // And once more: what the second run stored is right too.
    for (path, body) in &objects {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    let read_errors = edge.metric("cdn_cache_disk_errors_total", &[("op", "read")]).await;
    assert!(read_errors >= 1.0, "the damaged files were not counted: {read_errors}\n{}", edge.output());
    edge.sigterm().await;
}

#[tokio::test]
async fn purges_missed_while_down_are_applied_to_disk_entries_before_serving() {
    let origin = MockOrigin::start().await;
    let mut bodies: Vec<(String, Bytes)> = Vec::new();
    for path in
        ["/t/a", "/t/b", "/p/a", "/p/b", "/u/a", "/s/a", "/keep/a", "/keep/b", "/keep/c", "/t/early", "/p/early"]
    {
        let body = content(path, 150 * KIB);
        let r = route(&body, &format!("{path}-v1"));
        origin.route(path, if path.starts_with("/t/") { r.header("surrogate-key", "red blue") } else { r });
        bodies.push((path.into(), body));
    }
    // Sliced objects: one tagged, one under the prefix, one kept.
    for path in ["/t/clip", "/p/clip", "/keep/clip"] {
        let body = content(path, 3 * MIB);
        let r = route(&body, &format!("{path}-v1"));
        origin.route(path, if path.starts_with("/t/") { r.header("surrogate-key", "red") } else { r });
        bodies.push((path.into(), body));
    }
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(dir.path(), "edge-disk-purge", &origin.url(), "memory = \"4MiB\"");
    spec.cluster = Some((([127, 0, 0, 1], free_port()).into(), control.cluster.gossip_addr()));
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in &bodies {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    // 11 whole objects, and 3 sliced ones of a head and 3 slices each.
    let entries = 11 + 3 * 4;
    edge.wait_for_disk_entries(entries).await;
    let record = spec.disk.join("purges.json");
    let started = Instant::now();
    while !record.exists() && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(record.exists(), "no purges.json beside the cache:\n{}", edge.output());
    drop(c);
    edge.sigterm().await;

    // While the edge is down: a purge of each kind, and the origin's purged objects change.
    purge(&control, json!({ "tags": ["red"] })).await;
    purge(&control, json!({ "prefixes": ["127.0.0.1/p/"] })).await;
    purge(&control, json!({ "urls": ["http://127.0.0.1/u/a"] })).await;
    let last = purge(&control, json!({ "urls": ["http://127.0.0.1/s/a"], "soft": true })).await;
    let mut changed = Vec::new();
    for path in ["/t/a", "/t/b", "/p/a", "/p/b", "/u/a", "/t/early", "/p/early"] {
        let body = content(&format!("{path} v2"), 150 * KIB);
        origin.route(path, route(&body, &format!("{path}-v2")));
        changed.push((path.to_string(), body));
    }
    let early = changed.split_off(5);
    origin.reset_hits();

    // From the moment it accepts requests until it says ready, the restarted edge
    // serves nothing the missed purges took away.
    let mut edge = EdgeProcess::spawn(&spec);
    let (probe, mut answered) = (unpooled_client(), 0);
    edge.until_ready(async || {
        for (path, body) in &early {
            if let Some(reply) = try_get(&probe, &edge_url(&spec, path)).await {
                assert_eq!(reply.status, StatusCode::OK, "{path} before ready");
                assert!(
                    reply.body == *body,
                    "{path} before ready: purged bytes served ({})",
                    reply.header("cache-status")
                );
                answered += 1;
            }
        }
    })
    .await;
    eprintln!("{answered} requests for purged objects answered before the edge was ready");
    origin.reset_hits();
    let applied = edge.metric("cdn_purge_applied_seq", &[("control", "control-1")]).await;
    assert!(applied >= last as f64, "ready having applied {applied} of {last} purges");
    let c = client();
    for (path, body) in &changed {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        assert_eq!(reply.x_cache(), "MISS", "{path} was purged: {}", reply.header("cache-status"));
        assert_eq!(origin.hits(path), 1, "{path}");
    }
    for (path, body) in bodies.iter().filter(|(p, _)| p.ends_with("/clip")) {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        if path.starts_with("/keep/") {
            assert_eq!(reply.x_cache(), "HIT", "{path}: {}", reply.header("cache-status"));
            assert_eq!(origin.hits(path), 0, "{path}");
        } else {
            // Purged with its slices: all three fetched again, each once (the probe
            // is the first slice's fetch, which its reader joins).
            assert_eq!(reply.x_cache(), "MISS", "{path} was purged: {}", reply.header("cache-status"));
            assert_eq!(origin.range_hits(path), each_slice_once(3 * MIB), "{path}: slices from disk after the purge");
        }
    }
    let body_of = |path: &str| bodies.iter().find(|(p, _)| p == path).unwrap().1.clone();
    let soft = fetch_exact(&c, &edge.url("/s/a"), &[], &body_of("/s/a")).await;
    assert_eq!(soft.x_cache(), "REVALIDATED", "/s/a was soft-purged: {}", soft.header("cache-status"));
    assert_eq!(origin.hits("/s/a"), 1);
    assert_eq!(origin.last_headers("/s/a").get("if-none-match").unwrap(), "\"/s/a-v1\"");
    for path in ["/keep/a", "/keep/b", "/keep/c"] {
        let reply = fetch_exact(&c, &edge.url(path), &[], &body_of(path)).await;
        assert!(is_disk_hit(&reply), "{path}: {}", reply.header("cache-status"));
        assert_eq!(origin.hits(path), 0, "{path}");
    }
    assert_eq!(edge.metric("cdn_purge_flushes_total", &[]).await, 0.0, "missed purges were all still in the log");

    // Everything stored again, and a restart with no purge meanwhile: all HITs, the
    // revalidated object too (fresh again, on disk as well).
    let current: Vec<(String, Bytes)> = bodies
        .iter()
        .map(|(path, body)| {
            let now = changed.iter().chain(&early).find(|(p, _)| p == path).map_or(body, |(_, b)| b);
            (path.clone(), now.clone())
        })
        .collect();
    for (path, body) in &current {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    edge.wait_for_disk_entries(entries).await;
    let indexed = edge.metric("cdn_cache_objects", &[("tier", "disk")]).await;
    drop(c);
    let stopped = edge.sigterm().await;
    let files = describe_files(&spec.disk);
    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in &current {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        assert_eq!(
            reply.x_cache(),
            "HIT",
            "{path} after a restart without purges: {}\n{indexed} entries indexed before the stop; the files \
             after it:\n{files}\nthe stopped edge:\n{stopped}\nthe restarted edge:\n{}",
            reply.header("cache-status"),
            edge.output()
        );
        assert_eq!(origin.hits(path), 0, "{path}");
    }
    drop(c);
    edge.sigterm().await;

    // A purge of everything while down.
    purge(&control, json!({ "all": true })).await;
    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in bodies.iter().filter(|(p, _)| p.starts_with("/keep/")) {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        assert_eq!(reply.x_cache(), "MISS", "{path} after a purge of everything: {}", reply.header("cache-status"));
    }
    for (path, body) in &changed {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        assert_eq!(reply.x_cache(), "MISS", "{path} after a purge of everything: {}", reply.header("cache-status"));
    }
    assert_eq!(origin.range_hits("/keep/clip"), each_slice_once(3 * MIB), "/keep/clip: every slice fetched again");
    drop(c);
    edge.sigterm().await;
    control.stop().await;
}

#[tokio::test]
async fn purges_missed_beyond_the_control_log_drop_the_whole_cache() {
    let origin = MockOrigin::start().await;
    let objects: Vec<(String, Bytes)> =
        (0..6).map(|i| format!("/f/{i}")).map(|p| (p.clone(), content(&p, 100 * KIB))).collect();
    for (path, body) in &objects {
        origin.route(path, route(body, path));
    }
    let doomed = content("/f/doomed", 100 * KIB);
    origin.route("/f/doomed", route(&doomed, "doomed-v1").header("surrogate-key", "doomed"));
    // Purges are collected as soon as every live edge applied them.
    let data = tempfile::tempdir().unwrap();
    let control =
        TestControl::start_with(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), |c| {
            c.retention = Duration::ZERO
        })
        .await;
    let seed = control.cluster.gossip_addr();
    // A second edge that stays up and applies what the first one misses.
    let other = TestEdge::join([127, 0, 0, 81], &origin.url(), seed, SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(dir.path(), "edge-disk-flush", &origin.url(), "memory = \"4MiB\"");
    spec.cluster = Some((([127, 0, 0, 1], free_port()).into(), seed));
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in &objects {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    fetch_exact(&c, &edge.url("/f/doomed"), &[], &doomed).await;
    edge.wait_for_disk_entries(objects.len() + 1).await;
    drop(c);
    edge.sigterm().await;

    // A purge of one object, applied by the other edge and then collected; the
    // origin's object changes.
    let seq = purge(&control, json!({ "tags": ["doomed"] })).await;
    let doomed = content("/f/doomed v2", 100 * KIB);
    origin.route("/f/doomed", route(&doomed, "doomed-v2"));
    wait_for_member(&control, "edge-disk-flush", MemberState::Dead, Duration::from_secs(30)).await;
    let started = Instant::now();
    loop {
        let floor = control.cluster.purges().await.get("control-1").and_then(|p| p.floor).unwrap_or(0);
        if floor > seq {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "purge {seq} not collected (floor {floor})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Until it is ready, the restarted edge never serves what the purge took away.
    let mut edge = EdgeProcess::spawn(&spec);
    let probe = unpooled_client();
    edge.until_ready(async || {
        if let Some(reply) = try_get(&probe, &edge_url(&spec, "/f/doomed")).await {
            assert_eq!(reply.status, StatusCode::OK, "/f/doomed before ready");
            assert!(
                reply.body == doomed,
                "/f/doomed before ready: purged bytes served ({})",
                reply.header("cache-status")
            );
        }
    })
    .await;
    origin.reset_hits();
    // The other objects: the missed purge did not match them, but the edge cannot
    // know what it missed: everything goes.
    assert_eq!(edge.metric("cdn_purge_flushes_total", &[]).await, 1.0, "{}", edge.output());
    let c = client();
    for (path, body) in &objects {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        assert_eq!(reply.x_cache(), "MISS", "{path}: the whole cache was to be dropped");
        assert_eq!(origin.hits(path), 1, "{path}");
    }
    drop(c);
    edge.sigterm().await;
    other.stop().await;
    control.stop().await;
}

#[tokio::test]
async fn a_flipped_byte_in_any_cache_file_is_a_counted_miss_never_wrong_bytes() {
    let origin = MockOrigin::start().await;
    let mut whole: Vec<(String, Bytes)> =
        (0..6).map(|i| format!("/c/{i}")).map(|p| (p.clone(), content(&p, 200 * KIB))).collect();
    whole.push(("/c/small".into(), content("/c/small", 2 * KIB)));
    for (path, body) in &whole {
        origin.route(path, route(body, path));
    }
    let (gzip, br) = (content("/c/vary gzip", 80 * KIB), content("/c/vary br", 70 * KIB));
    let vary = |body: &Bytes| Route::ok("public, max-age=3600", body.clone()).header("vary", "Accept-Encoding");
    let sliced = content("/c/clip", 3 * MIB);
    origin.route("/c/clip", route(&sliced, "clip"));
    // 7 whole objects, a Vary marker and 2 variants, a sliced head and 3 slices.
    let entries = 7 + 3 + 4;

    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(dir.path(), "edge-disk-flip", &origin.url(), "memory = \"8MiB\"");
    let mut edge = EdgeProcess::start(&spec).await;
    // Header bytes to flip: none is byte 6, the soft-purge flag (the one byte written
    // in place, outside the checksums by design: flipped, it only asks for a
    // revalidation).
    let header_offsets = [0u64, 3, 5, 7, 9, 13, 18, 22, 26, 30, 33, 38, 41, 47];
    for part in ["body", "header"] {
        let c = client();
        for (path, body) in &whole {
            fetch_exact(&c, &edge.url(path), &[], body).await;
        }
        origin.route("/c/vary", vary(&gzip));
        fetch_exact(&c, &edge.url("/c/vary"), &[("accept-encoding", "gzip")], &gzip).await;
        origin.route("/c/vary", vary(&br));
        store_variant(&c, &edge.url("/c/vary"), &[("accept-encoding", "br")], &br).await;
        fetch_exact(&c, &edge.url("/c/clip"), &[], &sliced).await;
        edge.wait_for_disk_entries(entries).await;
        let indexed = edge.metric("cdn_cache_objects", &[("tier", "disk")]).await;
        drop(c);
        let output = edge.sigterm().await;

        let files = cache_files(&spec.disk);
        assert_eq!(
            files.len(),
            entries,
            "before flipping {part} bytes: {indexed} entries indexed; files:\n{}\n{output}",
            describe_files(&spec.disk)
        );
        for (i, file) in files.iter().enumerate() {
            let len = std::fs::metadata(file).unwrap().len();
            let at = match part {
                // Near the end: the body, where a file has one.
                "body" => len - 1 - (i as u64 * 131) % (len / 4).max(1),
                _ => header_offsets[i % header_offsets.len()],
            };
            flip(file, at);
        }

        origin.reset_hits();
        edge = EdgeProcess::start(&spec).await;
        let c = client();
        for (path, body) in &whole {
            let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
            // Its only copy was damaged: fetched again.
            assert_eq!(reply.x_cache(), "MISS", "{path}, a flipped {part} byte: {}", reply.header("cache-status"));
            assert_eq!(origin.hits(path), 1, "{path}");
        }
        for (encoding, body) in [("gzip", &gzip), ("br", &br)] {
            origin.route("/c/vary", vary(body));
            let reply = fetch_exact(&c, &edge.url("/c/vary"), &[("accept-encoding", encoding)], body).await;
            assert_ne!(reply.x_cache(), "HIT", "/c/vary {encoding}, a flipped {part} byte");
        }
        fetch_exact(&c, &edge.url("/c/clip"), &[], &sliced).await;
        assert!(
            origin.hits("/c/clip") >= 3,
            "/c/clip: {} origin requests for 3 damaged slices",
            origin.hits("/c/clip")
        );
        let counted = edge.metric("cdn_cache_disk_errors_total", &[("op", "read"), ("kind", "checksum")]).await;
        eprintln!("flipped {part} bytes in {entries} files: {counted} checksum errors counted");
        // Each whole object's file is read (or dropped at the start): counted.
        assert!(counted >= whole.len() as f64, "{counted} checksum errors for {entries} damaged files");
        // What is stored now reads back right (from memory or from the new files).
        for (path, body) in &whole {
            let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
            assert_eq!(reply.x_cache(), "HIT", "{path} stored again");
        }
    }
    edge.sigterm().await;
}

#[tokio::test]
async fn a_full_disk_stops_writes_and_serving_goes_on() {
    if let Err(why) = can_mount_tmpfs().await {
        eprintln!(
            "\n\n*** SKIPPED a_full_disk_stops_writes_and_serving_goes_on: cannot mount a tmpfs here ({why}) ***\n\n"
        );
        return;
    }
    let origin = MockOrigin::start().await;
    let objects: Vec<(String, Bytes)> =
        (0..16).map(|i| format!("/full/{i}")).map(|p| (p.clone(), content(&p, 256 * KIB))).collect();
    for (path, body) in &objects {
        origin.route(path, route(body, path));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(dir.path(), "edge-disk-full", &origin.url(), "memory = \"8MiB\"");
    // The configured size is far more than the 1 MiB the filesystem has.
    spec.disk_size = "64MiB";
    spec.tmpfs = Some("size=1m");
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in &objects[..12] {
        fetch_exact(&c, &edge.url(path), &[], body).await;
        assert!(edge.ready().await, "/readyz while the disk fills");
    }
    let started = Instant::now();
    let mut full = 0.0;
    while started.elapsed() < Duration::from_secs(10) {
        full = edge.metric("cdn_cache_disk_errors_total", &[("op", "write"), ("kind", "full")]).await;
        if full >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(full >= 1.0, "no write counted as full on a 1 MiB filesystem:\n{}", edge.output());
    assert!(edge.ready().await, "/readyz after the disk filled up:\n{}", edge.output());
    // Everything stored is served, from memory, and new objects still come from the origin.
    for (path, body) in &objects[..12] {
        let reply = fetch_exact(&c, &edge.url(path), &[], body).await;
        assert_eq!(reply.x_cache(), "HIT", "{path}: {}", reply.header("cache-status"));
        assert_eq!(origin.hits(path), 1, "{path}");
    }
    for (path, body) in &objects[12..] {
        assert_eq!(fetch_exact(&c, &edge.url(path), &[], body).await.x_cache(), "MISS");
        assert_eq!(fetch_exact(&c, &edge.url(path), &[], body).await.x_cache(), "HIT");
    }
    assert!(edge.ready().await, "/readyz at the end");
    let disk = edge.metric("cdn_cache_bytes", &[("tier", "disk")]).await;
    assert!(disk <= MIB as f64, "cdn_cache_bytes{{tier=disk}} {disk} on a 1 MiB filesystem");
    drop(c);
    edge.sigterm().await;
}

#[tokio::test]
async fn a_disk_path_that_cannot_be_used_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-regular-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let mut cases = vec![("a regular file", file.clone(), None), ("under a regular file", file.join("cache"), None)];
    match can_mount_tmpfs().await {
        Ok(()) => cases.push(("on a read-only filesystem", dir.path().join("ro"), Some("ro,size=1m"))),
        Err(why) => eprintln!("*** the read-only case is skipped: cannot mount a tmpfs here ({why}) ***"),
    }
    for (what, path, tmpfs) in cases {
        let mut spec = Spec::new(dir.path(), "edge-disk-bad", "http://127.0.0.1:9", "memory = \"4MiB\"");
        spec.disk = path.clone();
        spec.tmpfs = tmpfs;
        let (status, output) = EdgeProcess::spawn(&spec).exit().await;
        assert_eq!(status.code(), Some(2), "{what}: {status}\n{output}");
        assert!(
            output.contains(&path.display().to_string()),
            "{what}: the message does not name {}:\n{output}",
            path.display()
        );
        assert!(std::net::TcpStream::connect(spec.http).is_err(), "{what}: nothing was to be bound");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory", "the file was left alone");
}

/// A purge (or a damaged file read back) has the key's file deleted by the disk's
/// janitor, later; a fill of the same key that lands first puts a new file under
/// the same name, which must survive that delete. (Found by this test: 30 to 100 of
/// 1200 keys were lost that way, listed in the index with their files gone, until
/// b2f5e2f.) A purge of everything gives the janitor thousands of files to delete
/// while the keys are filled again.
#[tokio::test]
async fn a_key_stored_again_right_after_its_purge_keeps_its_new_file() {
    const KEYS: usize = 1200;
    const TASKS: usize = 8;
    let origin = MockOrigin::start().await;
    // One route for every `/m?k=<i>` (the origin counts each query apart).
    origin.route("/m", Route::ok("public, max-age=3600", content("/m", 1024)).header("etag", "\"m\""));
    let data = tempfile::tempdir().unwrap();
    let control = TestControl::start(data.path(), "127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(dir.path(), "edge-disk-refill", &origin.url(), "memory = \"16MiB\"");
    spec.cluster = Some((([127, 0, 0, 1], free_port()).into(), control.cluster.gossip_addr()));
    let edge = EdgeProcess::start(&spec).await;

    // Each task GETs its share of the keys, round after round, until each of them
    // answered MISS once; returns the requests made.
    let sweep = || {
        let tasks: Vec<_> = (0..TASKS)
            .map(|task| {
                let urls: Vec<String> = (task..KEYS).step_by(TASKS).map(|k| edge.url(&format!("/m?k={k}"))).collect();
                tokio::spawn(async move {
                    let c = client();
                    let mut missed = vec![false; urls.len()];
                    let started = Instant::now();
                    let mut requests = 0;
                    while missed.contains(&false) {
                        assert!(started.elapsed() < Duration::from_secs(60), "keys never answered MISS");
                        for (url, missed) in urls.iter().zip(&mut missed) {
                            if !*missed {
                                let reply = get(&c, url, &[]).await;
                                assert_eq!(reply.status, StatusCode::OK, "{url}");
                                *missed = reply.x_cache() == "MISS";
                                requests += 1;
                            }
                        }
                    }
                    requests
                })
            })
            .collect();
        async move {
            let mut total = 0;
            for task in tasks {
                total += task.await.unwrap();
            }
            total
        }
    };
    sweep().await;
    // Writes beyond 64 pending are skipped (counted `busy`): a few may be missing.
    let (indexed, files) = settled(&edge).await;
    assert!(indexed == files as f64 && files > KEYS / 2, "{indexed} entries indexed, {files} files");

    // Purge everything, and ask for every key until each was a MISS again: filled
    // and stored after the purge, while the janitor deletes the old files.
    let requests = {
        let sweeping = tokio::spawn(sweep());
        purge(&control, json!({ "all": true })).await;
        sweeping.await.unwrap()
    };
    eprintln!("{requests} requests until every key was stored again after the purge");
    let (indexed, files) = settled(&edge).await;
    let busy = edge.metric("cdn_cache_disk_errors_total", &[("op", "write"), ("kind", "busy")]).await;
    eprintln!(
        "after the purge and the refill: {indexed} entries indexed, {files} files ({} writes skipped as busy)",
        busy as u64
    );
    edge.sigterm().await;

    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    let mut hits = 0;
    for k in 0..KEYS {
        hits += usize::from(get(&c, &edge.url(&format!("/m?k={k}")), &[]).await.x_cache() == "HIT");
    }
    eprintln!("after a clean restart: {hits} of {KEYS} keys HIT");
    assert!(
        indexed == files as f64,
        "{indexed} entries indexed but {files} files: {} files of keys stored after the purge were deleted \
         under the index (after a restart, {hits} of {KEYS} keys HIT)",
        indexed - files as f64
    );
    assert_eq!(hits, files, "after a clean restart");
    edge.sigterm().await;
    control.stop().await;
}

#[tokio::test]
async fn the_disk_tier_keeps_to_its_size() {
    let origin = MockOrigin::start().await;
    let objects: Vec<(String, Bytes)> =
        (0..48).map(|i| format!("/z/{i}")).map(|p| (p.clone(), content(&p, 512 * KIB))).collect();
    for (path, body) in &objects {
        origin.route(path, route(body, path));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut spec = Spec::new(dir.path(), "edge-disk-size", &origin.url(), "memory = \"4MiB\"");
    // 24 MiB of objects for 16 MiB of disk.
    spec.disk_size = "16MiB";
    let bound = 16 * MIB as u64;
    // (A file evicted meanwhile takes no room.)
    let on_disk =
        |disk: &Path| cache_files(disk).iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum::<u64>();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for round in 0..2 {
        for (path, body) in &objects {
            fetch_exact(&c, &edge.url(path), &[], body).await;
        }
        let (indexed, files) = settled(&edge).await;
        let bytes = edge.metric("cdn_cache_bytes", &[("tier", "disk")]).await;
        let used = on_disk(&spec.disk);
        eprintln!("round {round}: {indexed} entries indexed, {files} files, {bytes} bytes counted, {used} in files");
        assert!(bytes <= bound as f64 && used <= bound, "round {round}: {bytes} bytes counted, {used} in files");
        assert!(indexed == files as f64 && files >= 16, "round {round}: {indexed} entries indexed, {files} files");
    }
    drop(c);
    edge.sigterm().await;
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    let mut hits = 0;
    for (path, body) in &objects {
        hits += usize::from(fetch_exact(&c, &edge.url(path), &[], body).await.x_cache() == "HIT");
    }
    assert!(hits > 0, "nothing kept across the restart");
    assert!(on_disk(&spec.disk) <= bound, "{} bytes in files after the restart", on_disk(&spec.disk));
    assert_eq!(edge.metric("cdn_cache_disk_errors_total", &[]).await, 0.0, "{}", edge.output());
    drop(c);
    edge.sigterm().await;
}

#[tokio::test]
async fn an_unsafe_request_invalidates_the_disk_copy_too() {
    let origin = MockOrigin::start().await;
    let (a, b, clip) = (content("/inv/a", 200 * KIB), content("/inv/b", 200 * KIB), content("/inv/clip", 3 * MIB));
    origin.route("/inv/a", route(&a, "a"));
    origin.route("/inv/b", route(&b, "b"));
    origin.route("/inv/clip", route(&clip, "clip"));
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(dir.path(), "edge-disk-invalidate", &origin.url(), "memory = \"8MiB\"");
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (path, body) in [("/inv/a", &a), ("/inv/b", &b), ("/inv/clip", &clip)] {
        fetch_exact(&c, &edge.url(path), &[], body).await;
    }
    // Two objects and a head with 3 slices.
    edge.wait_for_disk_entries(6).await;
    for path in ["/inv/a", "/inv/clip"] {
        assert_eq!(send(&c, Method::POST, &edge.url(path), &[]).await.status, StatusCode::OK, "POST {path}");
    }
    drop(c);
    edge.sigterm().await;
    assert_eq!(cache_files(&spec.disk).len(), 1, "the invalidated files are deleted by a clean stop");

    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    let reply = fetch_exact(&c, &edge.url("/inv/b"), &[], &b).await;
    assert!(is_disk_hit(&reply), "/inv/b: {}", reply.header("cache-status"));
    assert_eq!(fetch_exact(&c, &edge.url("/inv/a"), &[], &a).await.x_cache(), "MISS", "/inv/a after a POST to it");
    assert_eq!(fetch_exact(&c, &edge.url("/inv/clip"), &[], &clip).await.x_cache(), "MISS", "/inv/clip after a POST");
    assert_eq!(origin.hits("/inv/clip"), 3, "/inv/clip: its slices were invalidated along");
    drop(c);
    edge.sigterm().await;
}

/// Compressed variants (docs/caching.md, "Compression") are disk entries like any
/// `Vary` variant: after a restart each encoding is a disk HIT, decoding to the
/// origin's text, with no origin request.
#[tokio::test]
async fn compressed_variants_are_disk_hits_after_a_restart() {
    use std::io::Read as _;
    let origin = MockOrigin::start().await;
    let text: String = (0..2000).map(|i| format!(".c{i} {{ margin: {i}px; }}\n")).collect();
    origin.route("/z/site.css", Route::ok("public, max-age=3600", text.clone()).header("content-type", "text/css"));
    let dir = tempfile::tempdir().unwrap();
    let spec = Spec::new(dir.path(), "edge-disk-compress", &origin.url(), "memory = \"8MiB\"");
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    assert_eq!(get(&c, &edge.url("/z/site.css"), &[]).await.body, text.as_bytes());
    // The Vary marker and the identity, gzip and br variants.
    edge.wait_for_disk_entries(4).await;
    assert_eq!(edge.metric("cdn_compressed_total", &[]).await, 2.0);
    drop(c);
    edge.sigterm().await;

    origin.reset_hits();
    let edge = EdgeProcess::start(&spec).await;
    let c = client();
    for (ae, encoding) in [("gzip, deflate", "gzip"), ("br", "br"), ("identity", "")] {
        let r = get(&c, &edge.url("/z/site.css"), &[("accept-encoding", ae)]).await;
        assert!(is_disk_hit(&r), "{ae}: X-Cache {}, Cache-Status {}", r.x_cache(), r.header("cache-status"));
        assert_eq!(r.header("content-encoding"), encoding, "{ae}");
        let mut decoded = String::new();
        match encoding {
            "gzip" => flate2::read::GzDecoder::new(&r.body[..]).read_to_string(&mut decoded).map(|_| ()).unwrap(),
            "br" => brotli::Decompressor::new(&r.body[..], 4096).read_to_string(&mut decoded).map(|_| ()).unwrap(),
            _ => decoded = String::from_utf8(r.body.to_vec()).unwrap(),
        }
        assert!(decoded == text, "{ae}: the origin's text");
    }
    assert_eq!(origin.hits("/z/site.css"), 0, "no origin request after the restart");
    assert_eq!(edge.metric("cdn_cache_disk_errors_total", &[]).await, 0.0, "{}", edge.output());
    edge.sigterm().await;
}
