//! Every saved fuzz input (fuzz/corpus/<target>/) through its target's function: the
//! findings of `cargo fuzz` runs stay fixed.

#[path = "../fuzz/src/lib.rs"]
#[allow(unreachable_pub, dead_code)]
mod targets;

use std::path::Path;

fn corpus(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            run(&std::fs::read(&path).unwrap());
            count += 1;
        }
    }
    assert!(count > 0, "no corpus in {}", dir.display());
}

#[test]
fn range_corpus() {
    corpus("range", targets::range);
}

#[test]
fn cache_control_corpus() {
    corpus("cache_control", targets::cache_control);
}

#[test]
fn purge_body_corpus() {
    corpus("purge_body", targets::purge_body);
}

#[test]
fn config_corpus() {
    corpus("config", targets::config);
}

#[test]
fn dns_corpus() {
    corpus("dns", targets::dns);
}

#[test]
fn accept_encoding_corpus() {
    corpus("accept_encoding", targets::accept_encoding);
}
