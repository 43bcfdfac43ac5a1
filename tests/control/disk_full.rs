//! The purge log on a full disk: a real `cdn control` whose data directory is a
//! 64 KiB tmpfs (in a mount namespace of its own). When the log cannot take a purge,
//! the purge is refused with a JSON 503, nothing reaches gossip, the log holds no
//! torn line and the sequence number is not used; once space is back, the next
//! purge works and takes that number.

use std::{collections::BTreeSet, io::Write as _, time::Duration};

use cdn_cluster::{Cluster, ClusterConfig, NodeInfo, Role, purge::PurgeRecord};
use cdn_control::purge::log::PurgeLog;
use http::{Method, StatusCode};
use prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use cdn_test_support::{
    control::{SECRET, TOKEN, api},
    metrics,
};

use crate::process::{ControlProcess, DataDir, can_mount_tmpfs};

/// The sequence numbers of the purge records of `control` an observer node sees in
/// gossip.
async fn published(observer: &Cluster, control: &str) -> BTreeSet<u64> {
    observer.purges().await.remove(control).map(|purges| purges.records.into_keys().collect()).unwrap_or_default()
}

/// The records in the log file, failing on any line that is not a whole record.
fn log_seqs(dir: &std::path::Path) -> Vec<u64> {
    let text = std::fs::read_to_string(dir.join("purges.log")).expect("the log is readable");
    text.lines()
        .filter(|l| !l.starts_with("#next_seq "))
        .map(|l| serde_json::from_str::<PurgeRecord>(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}")).seq)
        .collect()
}

#[tokio::test]
async fn a_full_disk_refuses_purges_and_loses_nothing() {
    if let Err(why) = can_mount_tmpfs().await {
        eprintln!(
            "\n\n*** SKIPPED a_full_disk_refuses_purges_and_loses_nothing: cannot mount a tmpfs here ({why}) ***\n\n"
        );
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
    assert!(seen.join("purges.log").exists(), "the log is on the tmpfs");
    assert!(!control.data_dir.join("purges.log").exists(), "and the mount is private to the control node");

    // A gossip observer: what the control node publishes.
    let shutdown = CancellationToken::new();
    let mut config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), SECRET);
    config.seeds = vec![control.gossip.to_string()];
    let node = NodeInfo {
        node_id: "observer".into(),
        role: Role::Geo,
        region: None,
        location: None,
        public_addr: None,
        admin: None,
    };
    let observer = Cluster::join(&config, node, &Registry::new(), shutdown.clone()).await.unwrap();

    let url = format!("http://{}/v1/purge", control.api);
    let purge = |n: usize| {
        let url = url.clone();
        async move { api(Method::POST, &url, Some(TOKEN), Some(&json!({ "tags": [format!("t{n}")] }).to_string())).await }
    };
    let (status, reply) = purge(0).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["seq"], 1);

    // Fill the disk.
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

    // The log's last page may still hold a few lines; then the disk is full.
    let mut last_accepted = 1;
    let mut refused = None;
    for n in 1..200 {
        let (status, reply) = purge(n).await;
        match status {
            StatusCode::ACCEPTED => {
                last_accepted = reply["seq"].as_u64().unwrap();
                assert_eq!(last_accepted, n as u64 + 1, "{reply}");
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                refused = Some(reply);
                break;
            }
            other => panic!("unexpected {other}: {reply}"),
        }
    }
    let refused = refused.expect("a purge was refused once the disk was full");
    let error = refused["error"].as_str().expect("a JSON error body");
    assert!(error.contains("purge log") && error.contains("No space left on device"), "{error}");
    eprintln!("disk full after {last_accepted} purges; refusal: {refused}");
    // Still full: still refused, however often it is tried.
    for n in 300..305 {
        assert_eq!(purge(n).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let refused_id = format!("control-disk-{}", last_accepted + 1);
    let (status, reply) =
        api(Method::GET, &format!("http://{}/v1/purge/{refused_id}", control.api), Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused purge does not exist: {reply}");

    // Every accepted purge is in gossip; no refused one ever is.
    let expected: BTreeSet<u64> = (1..=last_accepted).collect();
    let mut seen_in_gossip = BTreeSet::new();
    for _ in 0..100 {
        seen_in_gossip = published(&observer, "control-disk").await;
        if seen_in_gossip == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen_in_gossip, expected);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(published(&observer, "control-disk").await, expected, "nothing refused was published");

    // The log holds exactly the accepted purges, each a whole line.
    assert_eq!(log_seqs(&seen), expected.iter().copied().collect::<Vec<_>>());

    // Space is back: the next purge works and takes the number the refused ones did not use.
    std::fs::remove_file(&fill).unwrap();
    let (status, reply) = purge(400).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{reply}");
    assert_eq!(reply["seq"].as_u64(), Some(last_accepted + 1), "{reply}");
    let expected: BTreeSet<u64> = (1..=last_accepted + 1).collect();
    for _ in 0..100 {
        if published(&observer, "control-disk").await == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(published(&observer, "control-disk").await, expected);
    assert_eq!(log_seqs(&seen), expected.iter().copied().collect::<Vec<_>>());

    // A restart would read exactly this log: the same records, the numbering going on.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(seen.join("purges.log"), copy.path().join("purges.log")).unwrap();
    let reopened = PurgeLog::open(copy.path()).unwrap();
    assert_eq!(reopened.records().len() as u64, last_accepted + 1);
    assert_eq!(reopened.next_seq(), last_accepted + 2);

    // Operators see it.
    let metrics = metrics::scrape(control.admin).await;
    assert!(metrics.contains("cdn_purge_log_errors_total 6"), "{metrics}");
    let output = control.stop().await;
    assert!(output.contains("purge log append failed"), "{output}");
    shutdown.cancel();
}
