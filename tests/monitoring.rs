//! The monitoring files in deploy/ only name metrics the code registers.

use std::{collections::BTreeSet, path::Path};

fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("cdn_") {
        let start = i + found;
        let preceded_by_word = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end =
            text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(text.len(), |n| start + n);
        if !preceded_by_word {
            let name = &text[start..end];
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

#[test]
fn dashboards_and_alerts_use_registered_metrics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut source = String::new();
    // The roles and the libraries that register metrics for them (connections,
    // zero-copy sends, cluster members).
    for dir in ["edge/src", "control/src", "geo/src", "origin/src", "crates/node/src", "crates/cluster/src"] {
        for entry in walk(&root.join(dir)) {
            source.push_str(&std::fs::read_to_string(entry).unwrap());
        }
    }
    let registered = metric_names(&source);
    for file in ["deploy/monitoring/grafana-dashboard.json", "deploy/monitoring/alerts.yml"] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        for name in used {
            assert!(registered.contains(&name), "{file} uses {name}, which no role registers");
        }
    }
    serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(root.join("deploy/monitoring/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is valid JSON");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}
