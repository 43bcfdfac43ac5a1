//! A real origin (`cdn_origin::Origin`) in-process on loopback, over a temporary
//! content directory, and the sample content it serves.
//!
//! Moved from tests/support/origin.rs; also replaces tests/edge/ranges.rs's
//! `GenOrigin` ([`start_generator`]).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use prometheus::Registry;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Length of `/v/sample.mp4` in [`content_dir`].
pub const SAMPLE_LEN: usize = 300_000;

/// Deterministic bytes for sample files: byte `i` of every sample.
pub fn sample_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8).collect()
}

/// A content directory with a few files:
/// `/index.html`, `/hello.txt`, `/data.json`, `/v/sample.mp4` ([`SAMPLE_LEN`] bytes of
/// [`sample_bytes`]), `/v/index.html`, `/empty.txt`, `/dir/` (no index).
pub fn content_dir() -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("v")).expect("mkdir");
    std::fs::create_dir_all(root.join("dir")).expect("mkdir");
    std::fs::write(root.join("index.html"), "<!doctype html><title>test</title><h1>home</h1>\n").expect("write");
    std::fs::write(root.join("hello.txt"), "hello, world\n").expect("write");
    std::fs::write(root.join("data.json"), "{\"ok\": true}\n").expect("write");
    std::fs::write(root.join("v/sample.mp4"), sample_bytes(SAMPLE_LEN)).expect("write");
    std::fs::write(root.join("v/index.html"), "<h1>videos</h1>\n").expect("write");
    std::fs::write(root.join("empty.txt"), "").expect("write");
    dir
}

/// A config serving `root` on `127.0.0.1:0` (admin too), with `generate = true`.
pub fn config(root: &Path) -> cdn_origin::Config {
    let mut config = cdn_origin::Config::new(root);
    config.listen.http = SocketAddr::from(([127, 0, 0, 1], 0));
    config.listen.admin = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.generate = true;
    config
}

/// A running origin; stopped (token cancelled) when dropped.
pub struct TestOrigin {
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub root: PathBuf,
    pub registry: Registry,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), cdn_origin::Error>>>,
    /// The content directory, when the origin owns it.
    dir: Option<TempDir>,
}

impl TestOrigin {
    /// `http://127.0.0.1:port` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// `https://127.0.0.1:port` + `path`, when HTTPS is configured.
    pub fn https_url(&self, path: &str) -> String {
        format!("https://{}{path}", self.https.expect("origin has no https listener"))
    }

    /// The admin listener's `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin.expect("origin has no admin listener"))
    }

    /// Cancels the token and waits (at most `within`) for `serve` to return.
    pub async fn stop_within(mut self, within: Duration) -> Result<(), cdn_origin::Error> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        match tokio::time::timeout(within, task).await {
            Ok(joined) => joined.expect("origin task panicked"),
            Err(_) => panic!("origin did not stop within {within:?}"),
        }
    }

    /// Stops the origin, failing the test if that takes more than 15 s.
    pub async fn stop(self) -> Result<(), cdn_origin::Error> {
        self.stop_within(Duration::from_secs(15)).await
    }

    /// The sum of the samples of metric `name` whose labels include `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::metrics::sum_in(&self.registry, name, labels)
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds and serves `config` on a task of the current runtime.
pub async fn start(config: cdn_origin::Config) -> TestOrigin {
    let root = config.root.clone();
    let registry = Registry::new();
    let origin = cdn_origin::Origin::bind(config, &registry).await.expect("origin binds");
    let shutdown = CancellationToken::new();
    let (http, https, admin) = (origin.http_addr(), origin.https_addr(), origin.admin_addr());
    let task = tokio::spawn(origin.serve(shutdown.clone()));
    TestOrigin { http, https, admin, root, registry, shutdown, task: Some(task), dir: None }
}

/// An origin over a fresh [`content_dir`], `generate = true`.
pub async fn start_with_content() -> TestOrigin {
    start_with(|_| {}).await
}

/// An origin over a fresh [`content_dir`] with a config adjusted by `adjust`.
pub async fn start_with(adjust: impl FnOnce(&mut cdn_origin::Config)) -> TestOrigin {
    start_in(content_dir(), adjust).await
}

/// An origin over an empty directory, without an admin listener: only generated
/// objects (`/_gen/<size>`) exist, and `/` is a 404 (so an edge's readiness probe
/// is not counted among the 2xx responses).
pub async fn start_generator() -> TestOrigin {
    start_in(tempfile::tempdir().expect("temp dir"), |config| config.listen.admin = None).await
}

/// An origin that owns `dir` and serves it with a config adjusted by `adjust`.
/// An origin serving exactly `files` (name, body) from a fresh directory, without
/// an admin listener or generated objects.
pub async fn start_serving(files: &[(&str, &[u8])]) -> TestOrigin {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, body) in files {
        std::fs::write(dir.path().join(name), body).expect("content file");
    }
    start_in(dir, |config| {
        config.listen.admin = None;
        config.generate = false;
    })
    .await
}

async fn start_in(dir: TempDir, adjust: impl FnOnce(&mut cdn_origin::Config)) -> TestOrigin {
    let mut config = config(dir.path());
    adjust(&mut config);
    let mut origin = start(config).await;
    origin.dir = Some(dir);
    origin
}
