//! Waiting for something to become true, with a deadline and a message that says
//! what never happened.
//!
//! From tests/control/main.rs (`wait_until`, `wait_for_edges`' loop) and
//! tests/docker.rs (`wait_until`).

use std::time::{Duration, Instant};

/// Polls `check` every `every` until it gives a value, and returns it; fails the
/// test when `timeout` passes first, naming `what` was awaited.
pub async fn until<T>(what: &str, timeout: Duration, every: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(every).await;
    }
}

/// [`until`] for tests without a runtime (the docker deployment test): `check` may
/// block, and the thread sleeps between checks.
pub fn blocking<T>(what: &str, timeout: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(every);
    }
}
