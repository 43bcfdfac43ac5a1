//! A control node as a real `cdn control` process: its config file, its captured
//! log output, and optionally a private mount namespace with its data directory on
//! a tiny tmpfs.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Method, StatusCode};
use tokio::process::Child;

use cdn_test_support::{control::api, net::free_port};

/// Where the process keeps its data directory.
pub(crate) enum DataDir {
    /// A plain directory.
    Plain,
    /// A tmpfs of this size mounted over the directory, in a mount namespace of the
    /// process's own (`unshare --mount`), so the mount never leaks out of the test.
    Tmpfs(&'static str),
}

pub(crate) struct ControlProcess {
    pub(crate) child: Child,
    pub(crate) api: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) gossip: SocketAddr,
    pub(crate) data_dir: PathBuf,
    /// Everything the process wrote to stdout and stderr so far.
    pub(crate) output: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl ControlProcess {
    /// Starts `cdn control` with `token`, gossip `secret`, listening on `api_ip`
    /// (admin on `admin_ip`), `extra` appended to the config, and waits until the API
    /// answers.
    pub(crate) async fn start(
        node_id: &str,
        token: &str,
        secret: &str,
        (api_ip, admin_ip): ([u8; 4], [u8; 4]),
        data: DataDir,
        rust_log: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        let api = SocketAddr::from((api_ip, free_port()));
        let admin = SocketAddr::from((admin_ip, free_port()));
        let gossip = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = dir.path().join("control.toml");
        std::fs::write(
            &config,
            format!(
                r#"node_id = "{node_id}"
token = "{token}"
data_dir = "{data}"
[listen]
api = "{api}"
admin = "{admin}"
[cluster]
listen = "{gossip}"
secret = "{secret}"
"#,
                data = data_dir.display(),
            ),
        )
        .unwrap();
        let cdn = env!("CARGO_BIN_EXE_cdn");
        let mut command = match data {
            DataDir::Plain => {
                let mut command = tokio::process::Command::new(cdn);
                command.arg("control").arg("--config").arg(&config);
                command
            }
            DataDir::Tmpfs(size) => {
                // unshare execs the shell and the shell execs cdn: one pid throughout,
                // so /proc/<pid>/root shows the files as the process sees them.
                let mut command = tokio::process::Command::new("unshare");
                command
                    .args(["--mount", "--propagation", "private", "sh", "-c"])
                    .arg(r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && exec "$3" control --config "$4""#)
                    .arg("sh")
                    .arg(size)
                    .arg(&data_dir)
                    .arg(cdn)
                    .arg(&config);
                command
            }
        };
        let mut child = command
            .env("RUST_LOG", rust_log)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("cdn control starts");
        let output = cdn_test_support::process::capture_output(&mut child);
        let mut process = Self { child, api, admin, gossip, data_dir, output, _dir: dir };
        for _ in 0..200 {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!("cdn control exited ({status}):\n{}", process.output());
            }
            if tokio::net::TcpStream::connect(api).await.is_ok() {
                let (status, _) = api_call(&process, token).await;
                if status == StatusCode::OK {
                    return process;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process.child.start_kill().ok();
        panic!("cdn control did not answer on {api}:\n{}", process.output());
    }

    /// The data directory as the process sees it (through its mount namespace).
    pub(crate) fn seen_data_dir(&self) -> PathBuf {
        let pid = self.child.id().expect("running");
        Path::new(&format!("/proc/{pid}/root")).join(self.data_dir.strip_prefix("/").unwrap())
    }

    pub(crate) fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub(crate) async fn stop(mut self) -> String {
        self.child.start_kill().ok();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        // Let the readers take the last bytes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.output()
    }
}

async fn api_call(process: &ControlProcess, token: &str) -> (StatusCode, serde_json::Value) {
    api(Method::GET, &format!("http://{}/v1/nodes", process.api), Some(token), None).await
}

/// Whether this machine lets a test mount a tmpfs in a private mount namespace.
pub(crate) async fn can_mount_tmpfs() -> Result<(), String> {
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
