//! curl as a second client nobody here wrote: what it received, headers and body
//! apart, from async tests ([`curl`]) and from tests without a runtime
//! ([`curl_blocking`], the docker deployment test).
//!
//! Moved from tests/support/client.rs; tests/docker.rs's own curl runner (`Resp`)
//! is now [`curl_blocking`].

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use crate::client::TIMEOUT;

/// What curl received.
#[derive(Debug, Clone)]
pub struct Curl {
    /// 0 when curl got no response.
    pub status: u16,
    /// `1.1`, `2`, …
    pub version: String,
    /// Of the last response, names lowercased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// curl's stderr (its error message when it failed).
    pub stderr: String,
    /// Whether curl exited 0: a whole response came (a 4xx or 5xx included).
    pub success: bool,
}

impl Curl {
    /// The first value of header `name` (any case), or `""`.
    pub fn header(&self, name: &str) -> &str {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v.as_str())
    }

    /// `X-Cache`, or `""`.
    pub fn x_cache(&self) -> &str {
        self.header("x-cache")
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; fails the test when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Runs `curl -sS <args>` (add the URL and flags such as `--path-as-is`,
/// `--http2-prior-knowledge`, `-H`, `-r`, `-I`, `-k`) without blocking the runtime.
/// curl gives up after 20 s unless `args` say `--max-time` otherwise.
pub async fn curl(args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::from(command(dir.path(), args)).kill_on_drop(true).output(),
    )
    .await
    .expect("curl timed out")
    .expect("curl runs (is it installed?)");
    read(dir.path(), &output)
}

/// [`curl`], blocking the thread.
pub fn curl_blocking(args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = command(dir.path(), args).output().expect("curl runs (is it installed?)");
    read(dir.path(), &output)
}

/// curl writing the head to `dir/headers`, the body to `dir/body` and the status
/// and version to stdout.
fn command(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--max-time", "20", "-D"])
        .arg(dir.join("headers"))
        .arg("-o")
        .arg(dir.join("body"))
        .args(["-w", "%{http_code} %{http_version}"])
        .args(args)
        .stdin(Stdio::null());
    command
}

fn read(dir: &Path, output: &Output) -> Curl {
    let written = String::from_utf8_lossy(&output.stdout).into_owned();
    let (status, version) = written.split_once(' ').unwrap_or(("0", ""));
    Curl {
        status: status.trim().parse().unwrap_or(0),
        version: version.trim().to_owned(),
        headers: parse_header_dump(&dir.join("headers")),
        body: std::fs::read(dir.join("body")).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        success: output.status.success(),
    }
}

/// The header lines of the last response in a `curl -D` dump (after interim 1xx
/// heads and redirects).
fn parse_header_dump(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let last = text.split("\r\n\r\n").filter(|block| !block.trim().is_empty()).last().unwrap_or("");
    last.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_origin::{MockOrigin, Route};

    #[tokio::test]
    async fn what_came_and_whether_all_of_it_came() {
        let origin = MockOrigin::start().await;
        origin.route("/a", Route::ok("max-age=60", "{\"ok\": true}").header("x-cache", "HIT"));
        let got = curl(&[&format!("{}/a", origin.url())]).await;
        assert!(got.success, "{got:?}");
        assert_eq!((got.status, got.version.as_str(), got.x_cache()), (200, "1.1", "HIT"));
        assert_eq!(got.header("Cache-Control"), "max-age=60");
        assert_eq!(got.json()["ok"], true);
        let missing = curl(&[&format!("{}/none", origin.url())]).await;
        assert_eq!((missing.success, missing.status, missing.header("x-cache")), (true, 404, ""));
        // Nothing listens: no response, and curl says so.
        let url = format!("http://127.0.0.1:{}/", crate::net::free_port());
        let refused = tokio::task::spawn_blocking(move || curl_blocking(&["--max-time", "2", &url])).await.unwrap();
        assert_eq!((refused.success, refused.status), (false, 0), "{refused:?}");
        assert!(!refused.stderr.is_empty());
    }
}
