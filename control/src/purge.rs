//! Purges as the API takes them: the request body and its validation into the
//! [`Target`] that gossip carries (matching lives with [`Target`] in `cdn-cluster`).
//!
//! # Layout
//! - [`log`]: the durable, append-only purge log of a control node.

pub mod log;

pub use cdn_cluster::purge::{PurgeRecord, Target};
use serde::{Deserialize, Serialize};

/// Most entries (URLs + prefixes + tags) one purge may carry.
pub const MAX_ENTRIES: usize = 1000;
/// Longest URL, prefix or tag.
pub const MAX_ENTRY_LEN: usize = 2048;

/// The body of `POST /v1/purge`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Absolute URLs.
    #[serde(default)]
    pub urls: Vec<String>,
    /// URL prefixes (`https://host/path` or `host/path`).
    #[serde(default)]
    pub prefixes: Vec<String>,
    /// Surrogate keys / cache tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Everything.
    #[serde(default)]
    pub all: bool,
    /// Mark stale (revalidate on next use) instead of deleting.
    #[serde(default)]
    pub soft: bool,
}

impl PurgeRequest {
    /// Validates and normalises the request; the error says what is wrong.
    pub fn target(&self) -> Result<Target, String> {
        let count = self.urls.len() + self.prefixes.len() + self.tags.len();
        if count == 0 && !self.all {
            return Err("empty purge: give urls, prefixes, tags or all".into());
        }
        if self.all && count > 0 {
            return Err("\"all\" purges everything; do not combine it with urls, prefixes or tags".into());
        }
        if count > MAX_ENTRIES {
            return Err(format!("too many entries ({count}); at most {MAX_ENTRIES} per purge"));
        }
        let mut target = Target { all: self.all, ..Target::default() };
        for url in &self.urls {
            target.urls.push(normalise_url(url)?);
        }
        for prefix in &self.prefixes {
            target.prefixes.push(normalise_prefix(prefix)?);
        }
        for tag in &self.tags {
            let tag = tag.trim();
            if tag.is_empty() || tag.len() > MAX_ENTRY_LEN || tag.chars().any(|c| c.is_whitespace() || c == ',') {
                return Err(format!("invalid tag {tag:?}"));
            }
            target.tags.push(tag.to_string());
        }
        Ok(target)
    }
}

/// `https://Host:443/p?q` → `host/p?q` (absolute http(s) URL required).
fn normalise_url(url: &str) -> Result<String, String> {
    if url.len() > MAX_ENTRY_LEN {
        return Err(format!("url longer than {MAX_ENTRY_LEN} bytes"));
    }
    let uri: http::Uri = url.parse().map_err(|_| format!("url {url:?} does not parse"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(format!("url {url:?} is not an absolute http(s) URL"));
    }
    let host = uri.host().filter(|h| !h.is_empty()).ok_or_else(|| format!("url {url:?} has no host"))?;
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let path_and_query = if path_and_query.is_empty() { "/" } else { path_and_query };
    let host = cdn_http::key::normalize_host(host).ok_or_else(|| format!("url {url:?} has an invalid host"))?;
    Ok(format!("{host}{path_and_query}"))
}

/// `https://host/v/` or `host/v/` → `host/v/`.
fn normalise_prefix(prefix: &str) -> Result<String, String> {
    if prefix.contains("://") {
        let normalised = normalise_url(prefix)?;
        return Ok(normalised);
    }
    if prefix.len() > MAX_ENTRY_LEN || prefix.chars().any(char::is_whitespace) {
        return Err(format!("invalid prefix {prefix:?}"));
    }
    let (host, path) = match prefix.find('/') {
        Some(i) => prefix.split_at(i),
        None => (prefix, "/"),
    };
    if host.is_empty() {
        return Err(format!("prefix {prefix:?} has no host (write host/path or https://host/path)"));
    }
    let uri: http::Uri =
        format!("http://{host}{path}").parse().map_err(|_| format!("prefix {prefix:?} does not parse"))?;
    let host = uri.host().unwrap_or(host);
    // The host as the edge keys it (case, brackets, one trailing dot).
    let host = cdn_http::key::normalize_host(host).ok_or_else(|| format!("prefix {prefix:?} has an invalid host"))?;
    Ok(format!("{host}{path}"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn request(json: &str) -> Result<PurgeRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn validation() {
        assert!(request(r#"{"urls": ["https://a/b"], "bogus": 1}"#).is_err(), "unknown fields refused");
        assert!(request("{").is_err());
        assert!(request(r#"{}"#).unwrap().target().is_err(), "empty purge");
        assert!(request(r#"{"urls": []}"#).unwrap().target().is_err(), "empty purge");
        assert!(request(r#"{"urls": ["not a url"]}"#).unwrap().target().is_err());
        assert!(request(r#"{"urls": ["/relative"]}"#).unwrap().target().is_err());
        assert!(request(r#"{"urls": ["ftp://h/x"]}"#).unwrap().target().is_err());
        assert!(request(r#"{"all": true, "tags": ["x"]}"#).unwrap().target().is_err());
        assert!(request(r#"{"tags": ["two words"]}"#).unwrap().target().is_err());
        let t = request(r#"{"urls": ["https://WWW.cdn.test/v/a.mp4?x=1"], "prefixes": ["www.cdn.test/v/", "http://h/p"], "tags": ["video"]}"#)
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(t.urls, ["www.cdn.test/v/a.mp4?x=1"]);
        assert_eq!(t.prefixes, ["www.cdn.test/v/", "h/p"]);
        assert_eq!(t.tags, ["video"]);
        // Hosts as the edge keys them: a trailing dot and the port go.
        let t = request(r#"{"urls": ["https://A.test.:443/x"], "prefixes": ["A.Test./v/", "https://a.test.:8443/w"]}"#)
            .unwrap()
            .target()
            .unwrap();
        assert_eq!(t.urls, ["a.test/x"]);
        assert_eq!(t.prefixes, ["a.test/v/", "a.test/w"]);
        assert!(request(r#"{"urls": ["https://a..test/x"]}"#).unwrap().target().is_err());
    }

    #[test]
    fn matching() {
        let t = request(r#"{"urls": ["https://www.cdn.test/v/a.mp4?x=1"]}"#).unwrap().target().unwrap();
        assert!(t.matches("https://www.cdn.test/v/a.mp4?x=1", &[]));
        assert!(t.matches("http://www.cdn.test/v/a.mp4?x=1", &[]), "either scheme");
        assert!(t.matches("https://www.cdn.test/v/a.mp4?x=1\u{1f}slice:3", &[]), "every slice");
        assert!(t.matches("https://www.cdn.test/v/a.mp4?x=1\u{1f}accept-encoding=gzip\n", &[]), "every variant");
        assert!(!t.matches("https://www.cdn.test/v/a.mp4", &[]));
        assert!(!t.matches("https://www.cdn.test/v/a.mp4?x=12", &[]));
        let p = request(r#"{"prefixes": ["www.cdn.test/v/"]}"#).unwrap().target().unwrap();
        assert!(p.matches("https://www.cdn.test/v/b.webm", &[]));
        assert!(!p.matches("https://other.test/v/b.webm", &[]));
        assert!(!p.matches("https://www.cdn.test/x", &[]));
        let tag = request(r#"{"tags": ["video"]}"#).unwrap().target().unwrap();
        assert!(tag.matches("https://h/x", &["page".into(), "video".into()]));
        assert!(!tag.matches("https://h/x", &["page".into()]));
        assert!(request(r#"{"all": true}"#).unwrap().target().unwrap().matches("anything", &[]));
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in ".{0,200}") {
            if let Ok(request) = serde_json::from_str::<PurgeRequest>(&body) {
                let _ = request.target();
            }
        }

        #[test]
        fn arbitrary_urls_never_panic(url in "[ -~]{0,100}") {
            let request = PurgeRequest { urls: vec![url.clone()], prefixes: vec![url], ..PurgeRequest::default() };
            if let Ok(target) = request.target() {
                let _ = target.matches("https://h/x", &[]);
            }
        }
    }
}
