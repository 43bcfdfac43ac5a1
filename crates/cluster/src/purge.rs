//! Purges as the cluster carries them: what a purge matches and the record a control
//! node gossips. (The API's request body, and its validation into a [`Target`], are
//! the control role's.)

use serde::{Deserialize, Serialize};

/// What a purge matches, normalised: hosts lowercased, schemes removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `host/path?query`, exact.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// `host/path-prefix`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    /// Tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Everything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
}

impl Target {
    /// A purge of everything.
    pub fn everything() -> Self {
        Self { all: true, ..Self::default() }
    }

    /// Whether this purge matches the cached object under `key` (a cache key of
    /// [`cdn_http::key`]: any scheme, any variant or slice) tagged `tags`.
    pub fn matches(&self, key: &str, tags: &[String]) -> bool {
        if self.all {
            return true;
        }
        let url = cdn_http::key::url(key);
        self.urls.iter().any(|u| u == url)
            || self.prefixes.iter().any(|prefix| url.starts_with(prefix.as_str()))
            || self.tags.iter().any(|tag| tags.iter().any(|t| t == tag))
    }
}

/// A purge as logged by a control node and carried in gossip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurgeRecord {
    /// `<control node id>-<seq>`.
    pub id: String,
    /// Sequence number on the control node that accepted it.
    pub seq: u64,
    /// That control node.
    pub control: String,
    /// When it was accepted (ms since the Unix epoch).
    pub created_ms: u64,
    /// Mark stale instead of deleting.
    #[serde(default)]
    pub soft: bool,
    /// What it matches.
    pub target: Target,
}

#[cfg(test)]
mod tests {
    use cdn_http::key;

    use super::*;

    #[test]
    fn matching() {
        let t = Target { urls: vec!["www.cdn.test/v/a.mp4?x=1".into()], ..Target::default() };
        assert!(t.matches("https://www.cdn.test/v/a.mp4?x=1", &[]));
        assert!(t.matches("http://www.cdn.test/v/a.mp4?x=1", &[]), "either scheme");
        assert!(t.matches(&key::slice("https://www.cdn.test/v/a.mp4?x=1", 3), &[]), "every slice");
        let variant =
            key::variant("https://www.cdn.test/v/a.mp4?x=1", &[(http::header::ACCEPT_ENCODING, "gzip".into())]);
        assert!(t.matches(&variant, &[]), "every variant");
        assert!(!t.matches("https://www.cdn.test/v/a.mp4", &[]));
        assert!(!t.matches("https://www.cdn.test/v/a.mp4?x=12", &[]));
        let p = Target { prefixes: vec!["www.cdn.test/v/".into()], ..Target::default() };
        assert!(p.matches("https://www.cdn.test/v/b.webm", &[]));
        assert!(!p.matches("https://other.test/v/b.webm", &[]));
        assert!(!p.matches("https://www.cdn.test/x", &[]));
        let tag = Target { tags: vec!["video".into()], ..Target::default() };
        assert!(tag.matches("https://h/x", &["page".into(), "video".into()]));
        assert!(!tag.matches("https://h/x", &["page".into()]));
        assert!(Target::everything().matches("anything", &[]));
    }
}
