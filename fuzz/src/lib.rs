//! The bodies of the fuzz targets. `cargo fuzz` runs them under libFuzzer
//! (fuzz_targets/); the main test suite runs every saved corpus input through the
//! same functions (tests/fuzz_corpus.rs), so a crash found once stays fixed.

use std::time::Duration;

/// `Range` header parsing and range math: never panics, and every resolved range
/// lies inside the representation.
pub fn range(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some(specs) = cdn_origin::range::parse(text) else { return };
    for len in [0, 1, 2, 100, 1 << 20, u64::MAX / 2] {
        if let cdn_origin::range::Resolved::Partial(ranges) = cdn_origin::range::resolve(&specs, len) {
            for r in &ranges {
                assert!(r.start < r.end && r.end <= len, "{r:?} outside 0..{len}");
                let _ = cdn_origin::range::content_range(r, len);
            }
            let multipart = cdn_origin::range::Multipart::new(&ranges, len, Some("video/mp4"), "b");
            assert!(multipart.content_length >= ranges.iter().map(|r| r.end - r.start).sum::<u64>());
        }
    }
}

/// Cache-Control parsing and the freshness decision.
pub fn cache_control(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (request, response) = text.split_once('\n').unwrap_or((text, text));
    let request = cdn_edge::policy::Directives::parse(request);
    let response = cdn_edge::policy::Directives::parse(response);
    for (lifetime, age) in [(0, 0), (10, 5), (10, 20), (u32::MAX as u64, 1)] {
        let (lifetime, age) = (Duration::from_secs(lifetime), Duration::from_secs(age));
        let _ = cdn_edge::policy::evaluate(&request, false, &response, lifetime, age);
        let _ = cdn_edge::policy::stale_if_error(&request, &response, lifetime, age);
    }
}

/// Purge API bodies: parsing, validation and matching.
pub fn purge_body(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<cdn_control::purge::PurgeRequest>(data)
        && let Ok(target) = request.target()
    {
        let _ = target.matches("https://www.cdn.test/v/a.mp4?x=1\u{1f}slice:3", &["video".into()]);
    }
}

/// Config files of every role: parsing and validation never panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = toml::from_str::<cdn_edge::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<cdn_origin::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<cdn_control::server::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<cdn_geo::Config>(text) {
        let _ = config.validate();
    }
}
