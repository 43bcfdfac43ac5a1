//! The access log: one JSON line per response with every field, over HTTP/1.1,
//! HTTP/2 and HTTP/3; sampling; SIGHUP reopening after a rename; size rotation;
//! and a writer that blocks (a FIFO nobody reads) costing requests nothing while
//! the dropped lines are counted.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cdn_edge::access_log::Settings;
use cdn_test_support::{
    client::{client, get, h2c_client},
    edge::{TestEdge, start_tls_edge},
    http3::H3Client,
    metrics::{scrape, sum},
    mock_origin::{MockOrigin, Route},
    wait,
};
use http::StatusCode;
use serde_json::Value;

/// The lines of `path` once there are at least `n` (fails after 10 s).
async fn lines(path: &Path, n: usize) -> Vec<Value> {
    wait::until(
        &format!("{n} access log lines in {}", path.display()),
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<Value> =
                text.lines().map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))).collect();
            (lines.len() >= n).then_some(lines)
        },
    )
    .await
}

fn log_settings(path: &Path) -> Settings {
    Settings::new(path)
}

const BODY_LEN: usize = 1000;

fn segment() -> Route {
    Route::ok("public, max-age=600", "x".repeat(BODY_LEN))
}

#[tokio::test]
async fn every_field_over_h1_h2_and_h3() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let origin = MockOrigin::start().await;
    origin.route("/v/seg1.ts", segment());
    let edge = start_tls_edge(&origin.url(), |c| {
        c.access_log = Some(log_settings(&path));
        // The CMCD and signing parameters stay out of the key: one object.
        c.cache.ignore_query = true;
    })
    .await;

    // HTTP/1.1: CMCD in the query, a URI Signing Package that must not be logged.
    let cmcd = "br%3D3200%2Cbl%3D21300%2Cot%3Dv%2Csid%3D%226e2fb550%22%2Csu%2Cpr%3D1.25";
    let h1 = get(
        &client(),
        &edge.url(&format!("/v/seg1.ts?CMCD={cmcd}&URISigningPackage=eyJ.secret-token.sig")),
        &[("user-agent", "player/1.0"), ("referer", "https://app.test/watch")],
    )
    .await;
    assert_eq!(h1.status, StatusCode::OK);
    // HTTP/2 (h2c): a range of the now stored object.
    let h2 = get(&h2c_client(), &edge.url("/v/seg1.ts"), &[("range", "bytes=0-99")]).await;
    assert_eq!(h2.status, StatusCode::PARTIAL_CONTENT);
    // HTTP/3: CMCD in the headers.
    let mut h3 = H3Client::connect(edge.h3.unwrap()).await;
    let reply = h3.get("/v/seg1.ts", &[("cmcd-request", "bl=900,mtp=25400"), ("cmcd-object", "d=4004,ot=v")]).await;
    assert_eq!(reply.status, StatusCode::OK);

    let lines = lines(&path, 3).await;
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("secret-token"), "the signing package was logged:\n{text}");
    let by = |protocol: &str| {
        lines.iter().find(|l| l["protocol"] == protocol).unwrap_or_else(|| panic!("{protocol} in {text}"))
    };
    for line in &lines {
        for field in [
            "ts",
            "node",
            "client",
            "protocol",
            "method",
            "host",
            "path",
            "site",
            "status",
            "bytes",
            "complete",
            "range",
            "content_range",
            "ttfb_ms",
            "duration_ms",
            "cache",
            "cache_status",
            "user_agent",
            "referer",
        ] {
            assert!(line.get(field).is_some(), "{field} missing in {line}");
        }
        let time = line["ts"].as_str().unwrap();
        assert!(time.len() == 24 && time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
        line["client"].as_str().unwrap().parse::<SocketAddr>().unwrap();
        assert_eq!(line["node"], "edge-test-1");
        assert_eq!(line["method"], "GET");
        assert_eq!(line["host"], if line["protocol"] == "h3" { "localhost" } else { "127.0.0.1" });
        assert_eq!(line["site"], "_origin");
        assert_eq!(line["complete"], true);
        let (ttfb, total) = (line["ttfb_ms"].as_f64().unwrap(), line["duration_ms"].as_f64().unwrap());
        assert!(ttfb >= 0.0 && ttfb <= total, "{line}");
    }

    let h1 = by("h1");
    assert_eq!(h1["path"], format!("/v/seg1.ts?CMCD={cmcd}&URISigningPackage=REDACTED"));
    assert_eq!(h1["status"], 200);
    assert_eq!(h1["bytes"], BODY_LEN);
    assert_eq!(h1["cache"], "miss");
    assert!(h1["cache_status"].as_str().unwrap().starts_with("cdn; fwd=miss"), "{h1}");
    assert_eq!(h1["user_agent"], "player/1.0");
    assert_eq!(h1["referer"], "https://app.test/watch");
    assert_eq!(h1["range"], Value::Null);
    assert_eq!(
        h1["cmcd"],
        serde_json::json!({"br": 3200, "bl": 21300, "ot": "v", "sid": "6e2fb550", "su": true, "pr": 1.25})
    );

    let h2 = by("h2");
    assert_eq!(h2["path"], "/v/seg1.ts");
    assert_eq!(h2["status"], 206);
    assert_eq!(h2["bytes"], 100);
    assert_eq!(h2["range"], "bytes=0-99");
    assert_eq!(h2["content_range"], format!("bytes 0-99/{BODY_LEN}"));
    assert_eq!(h2["cache"], "hit");
    assert!(h2.get("cmcd").is_none(), "{h2}");

    let h3 = by("h3");
    assert_eq!(h3["status"], 200);
    assert_eq!(h3["bytes"], BODY_LEN);
    // Another key (https://localhost/...): fetched again.
    assert_eq!(h3["cache"], "miss");
    assert_eq!(h3["cmcd"], serde_json::json!({"bl": 900, "mtp": 25400, "d": 4004, "ot": "v"}));

    let metrics = scrape(edge.admin).await;
    assert_eq!(sum(&metrics, "cdn_access_log_lines_total", &[]), 3.0);
    assert_eq!(sum(&metrics, "cdn_access_log_dropped_total", &[]), 0.0);
    edge.stop().await;
}

/// Sends `n` requests for a stored object.
async fn requests(edge: &TestEdge, n: usize) {
    let c = client();
    for _ in 0..n {
        assert_eq!(get(&c, &edge.url("/v/seg1.ts"), &[]).await.status, StatusCode::OK);
    }
}

#[tokio::test]
async fn sampling_logs_the_share_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let origin = MockOrigin::start().await;
    origin.route("/v/seg1.ts", segment());
    let none = dir.path().join("none.log");
    let half = dir.path().join("half.log");
    let edge0 =
        TestEdge::start(&origin.url(), |c| c.access_log = Some(Settings { sample: 0.0, ..log_settings(&none) })).await;
    let edge5 =
        TestEdge::start(&origin.url(), |c| c.access_log = Some(Settings { sample: 0.5, ..log_settings(&half) })).await;
    requests(&edge0, 40).await;
    requests(&edge5, 40).await;
    // Every other request: 20 of 40.
    assert_eq!(lines(&half, 20).await.len(), 20);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(std::fs::read_to_string(&half).unwrap().lines().count(), 20);
    assert_eq!(std::fs::read(&none).unwrap().len(), 0, "sample 0.0 wrote lines");
    assert_eq!(edge0.metric("cdn_access_log_lines_total", &[]), 0.0);
    assert_eq!(edge5.metric("cdn_access_log_lines_total", &[]), 20.0);
    edge0.stop().await;
    edge5.stop().await;
}

#[tokio::test]
async fn sighup_reopens_after_a_rename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.old");
    let origin = MockOrigin::start().await;
    origin.route("/v/seg1.ts", segment());
    let edge = TestEdge::start(&origin.url(), |c| c.access_log = Some(log_settings(&path))).await;
    requests(&edge, 1).await;
    lines(&path, 1).await;
    // logrotate: rename, then SIGHUP. Until the signal, lines follow the open file.
    std::fs::rename(&path, &rotated).unwrap();
    requests(&edge, 1).await;
    lines(&rotated, 2).await;
    assert!(!path.exists());
    let status = std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().unwrap();
    assert!(status.success());
    // The signal is seen asynchronously: send until a line lands in the new file.
    wait::until("a line in the reopened file", Duration::from_secs(10), Duration::from_millis(50), async || {
        requests(&edge, 1).await;
        lines_now(&path).filter(|n| *n >= 1)
    })
    .await;
    let old = lines_now(&rotated).unwrap();
    assert!(old >= 2, "{old}");
    edge.stop().await;
}

fn lines_now(path: &Path) -> Option<usize> {
    std::fs::read_to_string(path).ok().map(|text| text.lines().count())
}

#[tokio::test]
async fn rotates_by_size_keeping_n_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let origin = MockOrigin::start().await;
    origin.route("/v/seg1.ts", segment());
    let settings = Settings { max_size: Some(bytesize::ByteSize::kib(4)), keep: 2, ..log_settings(&path) };
    let edge = TestEdge::start(&origin.url(), |c| c.access_log = Some(settings)).await;
    // Some 400-byte lines: 4 KiB holds about ten; 60 of them rotate several times.
    requests(&edge, 60).await;
    wait::until("60 lines written", Duration::from_secs(10), Duration::from_millis(20), async || {
        (edge.metric("cdn_access_log_lines_total", &[]) == 60.0).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let numbered = |n: u32| PathBuf::from(format!("{}.{n}", path.display()));
    for file in [path.clone(), numbered(1), numbered(2)] {
        let len = std::fs::metadata(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).len();
        assert!(len > 0 && len <= 4096, "{}: {len} bytes", file.display());
        // Whole lines only.
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            serde_json::from_str::<Value>(line).unwrap();
        }
    }
    assert!(!numbered(3).exists(), "keep = 2 kept a third file");
    edge.stop().await;
}

/// A full disk (`/dev/full`: every write fails with ENOSPC): lines are counted as
/// errors, requests are served.
#[tokio::test]
async fn a_full_disk_counts_errors() {
    let origin = MockOrigin::start().await;
    origin.route("/v/seg1.ts", segment());
    let edge = TestEdge::start(&origin.url(), |c| c.access_log = Some(log_settings(Path::new("/dev/full")))).await;
    requests(&edge, 5).await;
    wait::until("write errors counted", Duration::from_secs(10), Duration::from_millis(20), async || {
        (edge.metric("cdn_access_log_errors_total", &[]) >= 1.0).then_some(())
    })
    .await;
    requests(&edge, 1).await;
    edge.stop().await;
}

/// The `q`-quantile of `samples`.
fn quantile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * q).round() as usize]
}

/// An access log on a FIFO nobody reads: the writer thread blocks once the pipe is
/// full (as it would on a stalled disk). Requests keep their latency; the lines
/// beyond the queue are dropped and counted.
///
/// Run on a thread of its own with a deadline: a log written on the request path
/// would block the runtime's thread for good, and the test must fail, not hang.
#[test]
fn a_blocked_writer_costs_requests_nothing_and_drops_are_counted() {
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let run = std::panic::AssertUnwindSafe(|| {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(blocked_writer());
        });
        let _ = done.send(std::panic::catch_unwind(run));
    });
    match result.recv_timeout(Duration::from_secs(90)) {
        Ok(Ok(())) => {}
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("requests hang behind the blocked access log"),
    }
}

async fn blocked_writer() {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("access.fifo");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    // A reader that never reads, opened without blocking (O_NONBLOCK), so the edge's
    // open for writing succeeds; then the pipe's 64 KiB fill and writes block.
    const O_NONBLOCK: i32 = 0o4000;
    let _reader = std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(&fifo).unwrap();
    let origin = MockOrigin::start().await;
    origin.route("/v/seg1.ts", segment());
    let plain = TestEdge::start(&origin.url(), |_| {}).await;
    let logged =
        TestEdge::start(&origin.url(), |c| c.access_log = Some(Settings { queue: 64, ..log_settings(&fifo) })).await;
    let (a, b) = (client(), client());
    for edge in [&plain, &logged] {
        get(&a, &edge.url("/v/seg1.ts"), &[]).await;
        get(&b, &edge.url("/v/seg1.ts"), &[]).await;
    }
    // Interleaved, so both see the same machine load.
    let (mut base, mut with_log) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let started = Instant::now();
        assert_eq!(get(&a, &plain.url("/v/seg1.ts"), &[]).await.status, StatusCode::OK);
        base.push(started.elapsed());
        let started = Instant::now();
        assert_eq!(get(&b, &logged.url("/v/seg1.ts"), &[]).await.status, StatusCode::OK);
        with_log.push(started.elapsed());
    }
    let (p50_base, p50_log) = (quantile(&mut base, 0.5), quantile(&mut with_log, 0.5));
    let (p99_base, p99_log) = (quantile(&mut base, 0.99), quantile(&mut with_log, 0.99));
    eprintln!("p50 {p50_base:?} / {p50_log:?} with the blocked log; p99 {p99_base:?} / {p99_log:?}");
    assert!(
        p99_log <= p99_base * 3 + Duration::from_millis(5),
        "p99 {p99_log:?} with a blocked access log, {p99_base:?} without"
    );
    let metrics = scrape(logged.admin).await;
    let (written, dropped) =
        (sum(&metrics, "cdn_access_log_lines_total", &[]), sum(&metrics, "cdn_access_log_dropped_total", &[]));
    // 1002 lines; the pipe holds ~64 KiB (~200 lines), the queue 64: most are dropped.
    assert_eq!(written, 1002.0);
    assert!(dropped >= 500.0, "dropped {dropped} of {written}");
    plain.stop().await;
    logged.stop().await;
}
