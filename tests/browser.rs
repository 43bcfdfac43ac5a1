//! Real-browser tests of streaming through the edges: runs the Python suite in
//! tests/browser (pytest + selenium driving Debian's Chromium, all installed by
//! scripts/test-deps.sh) against `cdn dev` started from this build's binary.
//!
//! Where it may (root, or unprivileged user namespaces), the suite runs in a network
//! namespace of its own with only loopback: Chromium aborts every request with
//! ERR_NETWORK_CHANGED when any interface of its namespace changes (containers and
//! test networks coming and going on a shared machine), and `cdn dev`'s fixed ports
//! cannot clash with anything else running there. Otherwise it runs in the machine's
//! namespace, and fails (naming the busy addresses) while another `cdn dev` runs.
//! Screenshots and logs: target/browser-artifacts/.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The whole suite takes about half a minute; this only guards against a hang.
const LIMIT: Duration = Duration::from_secs(240);

const PYTEST: [&str; 8] = ["python3", "-m", "pytest", "-q", "-rA", "--durations=0", "-p", "no:cacheprovider"];

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
fn browser_suite() {
    let root = env!("CARGO_MANIFEST_DIR");
    let log = tempfile::NamedTempFile::new().expect("temp file for pytest's output");
    let isolated = netns_available();
    let mut command = if isolated {
        let mut command = Command::new("unshare");
        // `sh` brings loopback up, then becomes pytest (same pid: SIGINT reaches it).
        command.args(["--net", "--", "sh", "-c", r#"ip link set lo up && exec "$@""#, "sh"]).args(PYTEST);
        command
    } else {
        let mut command = Command::new(PYTEST[0]);
        command.args(&PYTEST[1..]);
        command
    };
    let started = Instant::now();
    let mut child = command
        .arg("tests/browser")
        .current_dir(root)
        .env("CDN_BIN", env!("CARGO_BIN_EXE_cdn"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(log.reopen().expect("reopen the log"))
        .stderr(log.reopen().expect("reopen the log"))
        .spawn()
        .expect("running python3 (scripts/test-deps.sh installs pytest, selenium and Chromium)");
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for pytest") {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            // SIGINT first: pytest then runs its teardown (stops `cdn dev` and Chromium).
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let interrupted = Instant::now();
            while child.try_wait().ok().flatten().is_none() && interrupted.elapsed() < Duration::from_secs(30) {
                thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let output = fs::read_to_string(log.path()).unwrap_or_default();
    println!("{output}");
    println!(
        "browser suite: {:.1} s, {}",
        started.elapsed().as_secs_f64(),
        if isolated { "in a private network namespace" } else { "in the machine's network namespace" }
    );
    match status {
        Some(status) => assert!(status.success(), "the browser suite failed ({status}); pytest's output is above"),
        None => panic!("the browser suite did not finish within {} s; pytest's output is above", LIMIT.as_secs()),
    }
}
