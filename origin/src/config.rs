//! The origin's configuration (`cdn origin --config origin.toml`).
//!
//! ```toml
//! root = "examples/content"
//! generate = true                       # enables /_gen/<size>
//! default_cache_control = "public, max-age=60"
//!
//! [listen]
//! http = "127.0.0.1:8080"
//! https = "127.0.0.1:8443"              # optional; needs [tls]
//! admin = "127.0.0.1:9091"
//!
//! [tls]
//! self_signed = true
//!
//! [[rules]]
//! path_prefix = "/v/"
//! cache_control = "public, max-age=86400"
//! surrogate_keys = ["video"]
//! ```

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use cdn_node::{ConfigError, tls::TlsConfig};
use http::HeaderValue;
use serde::Deserialize;

/// The whole origin configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The content directory served at `/`.
    pub root: PathBuf,
    /// Listening addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Certificate for `listen.https`; required exactly when that is set.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// `Cache-Control` of responses no rule sets one for.
    #[serde(default = "default_cache_control")]
    pub default_cache_control: String,
    /// Per-path cache policy; the rule with the longest matching prefix wins.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Serve deterministic generated objects under `/_gen/<size>`.
    #[serde(default)]
    pub generate: bool,
}

/// The `[listen]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Plain HTTP (HTTP/1.1 and h2c).
    #[serde(default = "default_http")]
    pub http: SocketAddr,
    /// HTTPS (HTTP/1.1 and HTTP/2 by ALPN).
    #[serde(default)]
    pub https: Option<SocketAddr>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    #[serde(default = "default_admin")]
    pub admin: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self { http: default_http(), https: None, admin: default_admin() }
    }
}

/// One `[[rules]]` entry: the cache policy of every path under `path_prefix`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Matched against the served path (`/` serves `/index.html`), starting with `/`.
    pub path_prefix: String,
    /// `Cache-Control` for matching paths; `default_cache_control` when absent.
    #[serde(default)]
    pub cache_control: Option<String>,
    /// Sent as `Surrogate-Key: a b c` so edges can purge by tag.
    #[serde(default)]
    pub surrogate_keys: Vec<String>,
}

/// The default `default_cache_control`.
pub const DEFAULT_CACHE_CONTROL: &str = "public, max-age=60";

fn default_cache_control() -> String {
    DEFAULT_CACHE_CONTROL.to_owned()
}

fn default_http() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8080))
}

// serde's `default = "..."` needs a function returning the field's type.
#[allow(clippy::unnecessary_wraps)]
fn default_admin() -> Option<SocketAddr> {
    Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9091)))
}

impl Config {
    /// A configuration serving `root` with every other key at its default.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            listen: Listen::default(),
            tls: None,
            default_cache_control: default_cache_control(),
            rules: Vec::new(),
            generate: false,
        }
    }

    /// Checks everything types cannot; reports every problem, each naming its key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        check_root(&self.root, &mut problems);

        let mut seen: Vec<(&str, SocketAddr)> = vec![("listen.http", self.listen.http)];
        for (key, addr) in [("listen.https", self.listen.https), ("listen.admin", self.listen.admin)] {
            let Some(addr) = addr else { continue };
            if addr.port() != 0
                && let Some((other, _)) = seen.iter().find(|(_, a)| *a == addr)
            {
                problems.push(format!("{key}: {addr} is already used by {other}"));
            }
            seen.push((key, addr));
        }

        match (&self.listen.https, &self.tls) {
            (Some(_), Some(tls)) => problems.extend(tls.problems("tls")),
            (Some(_), None) => problems.push("tls: required when listen.https is set".to_owned()),
            (None, Some(_)) => problems.push("tls: set, but listen.https is not (nothing would use it)".to_owned()),
            (None, None) => {}
        }

        if let Err(reason) = header_value("default_cache_control", &self.default_cache_control) {
            problems.push(reason);
        }

        let mut prefixes = HashSet::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let key = format!("rules[{i}]");
            if !rule.path_prefix.starts_with('/') {
                problems.push(format!("{key}.path_prefix: {:?} must start with /", rule.path_prefix));
            } else if !prefixes.insert(rule.path_prefix.as_str()) {
                problems.push(format!("{key}.path_prefix: {:?} appears in an earlier rule", rule.path_prefix));
            }
            if let Some(cache_control) = &rule.cache_control
                && let Err(reason) = header_value(&format!("{key}.cache_control"), cache_control)
            {
                problems.push(reason);
            }
            for (j, tag) in rule.surrogate_keys.iter().enumerate() {
                if tag.is_empty() || !tag.bytes().all(|b| b.is_ascii_graphic()) {
                    problems.push(format!(
                        "{key}.surrogate_keys[{j}]: {tag:?} must be non-empty visible ASCII without spaces"
                    ));
                }
            }
        }
        ConfigError::check(problems)
    }
}

fn check_root(root: &Path, problems: &mut Vec<String>) {
    match std::fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => problems.push(format!("root: {} is not a directory", root.display())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            problems.push(format!("root: directory {} does not exist", root.display()));
        }
        Err(error) => problems.push(format!("root: cannot read {}: {error}", root.display())),
    }
}

fn header_value(key: &str, value: &str) -> Result<HeaderValue, String> {
    if value.trim().is_empty() {
        return Err(format!("{key}: must not be empty"));
    }
    HeaderValue::from_str(value).map_err(|_| format!("{key}: {value:?} is not a valid header value"))
}

/// The rules, compiled into header values, ready for lookups.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    default: HeaderValue,
    /// Longest prefix first.
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    prefix: String,
    cache_control: Option<HeaderValue>,
    surrogate_key: Option<HeaderValue>,
}

/// The policy of one served path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PathPolicy {
    pub(crate) cache_control: HeaderValue,
    pub(crate) surrogate_key: Option<HeaderValue>,
}

impl Policy {
    /// Compiles a validated config's rules.
    pub(crate) fn new(config: &Config) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut value = |key: String, text: &str| match header_value(&key, text) {
            Ok(value) => Some(value),
            Err(problem) => {
                problems.push(problem);
                None
            }
        };
        let default = value("default_cache_control".into(), &config.default_cache_control);
        let mut rules: Vec<CompiledRule> = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| CompiledRule {
                prefix: rule.path_prefix.clone(),
                cache_control: rule
                    .cache_control
                    .as_deref()
                    .and_then(|cc| value(format!("rules[{i}].cache_control"), cc)),
                surrogate_key: (!rule.surrogate_keys.is_empty())
                    .then(|| value(format!("rules[{i}].surrogate_keys"), &rule.surrogate_keys.join(" ")))
                    .flatten(),
            })
            .collect();
        ConfigError::check(problems)?;
        rules.sort_by_key(|rule| std::cmp::Reverse(rule.prefix.len()));
        Ok(Self { default: default.unwrap_or_else(|| HeaderValue::from_static(DEFAULT_CACHE_CONTROL)), rules })
    }

    /// The policy of `path` (decoded, starting with `/`).
    pub(crate) fn lookup(&self, path: &str) -> PathPolicy {
        match self.rules.iter().find(|rule| path.starts_with(&rule.prefix)) {
            Some(rule) => PathPolicy {
                cache_control: rule.cache_control.clone().unwrap_or_else(|| self.default.clone()),
                surrogate_key: rule.surrogate_key.clone(),
            },
            None => PathPolicy { cache_control: self.default.clone(), surrogate_key: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn defaults_fill_everything_but_root() {
        let config = parse("root = '/tmp'").unwrap();
        assert_eq!(config, Config::new("/tmp"));
        assert_eq!(config.listen.http, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(config.listen.admin, Some("127.0.0.1:9091".parse().unwrap()));
        assert_eq!(config.listen.https, None);
        assert_eq!(config.default_cache_control, "public, max-age=60");
        assert!(!config.generate);
        config.validate().unwrap();
        assert!(parse("generate = true").unwrap_err().to_string().contains("root"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = parse("root = '/tmp'\nroots = 1").unwrap_err().to_string();
        assert!(err.contains("roots"), "{err}");
        let err = parse("root = '/tmp'\n[listen]\nhttps_port = 1").unwrap_err().to_string();
        assert!(err.contains("https_port"), "{err}");
        let err = parse("root = '/tmp'\n[[rules]]\npath_prefix = '/'\nttl = 1").unwrap_err().to_string();
        assert!(err.contains("ttl"), "{err}");
        let err = parse("root = '/tmp'\n[listen]\nhttp = 'nope'").unwrap_err().to_string();
        assert!(err.contains("http"), "{err}");
    }

    #[test]
    fn every_problem_names_its_key() {
        let config = parse(
            r#"
            root = "/definitely/not/here"
            default_cache_control = "bad\nvalue"
            [listen]
            http = "127.0.0.1:8080"
            https = "127.0.0.1:8080"
            [[rules]]
            path_prefix = "v/"
            cache_control = ""
            surrogate_keys = ["ok", "not ok", ""]
            [[rules]]
            path_prefix = "/a"
            [[rules]]
            path_prefix = "/a"
            "#,
        )
        .unwrap();
        let problems = config.validate().unwrap_err().problems;
        let expect = [
            "root: directory /definitely/not/here does not exist",
            "listen.https: 127.0.0.1:8080 is already used by listen.http",
            "tls: required when listen.https is set",
            "default_cache_control: ",
            "rules[0].path_prefix: ",
            "rules[0].cache_control: must not be empty",
            "rules[0].surrogate_keys[1]: ",
            "rules[0].surrogate_keys[2]: ",
            "rules[2].path_prefix: \"/a\" appears in an earlier rule",
        ];
        for want in expect {
            assert!(problems.iter().any(|p| p.starts_with(want)), "missing {want:?} in {problems:#?}");
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    }

    #[test]
    fn tls_goes_with_https() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::new(dir.path());
        config.tls = Some(TlsConfig { self_signed: true, ..TlsConfig::default() });
        let problems = config.validate().unwrap_err().problems;
        assert!(problems[0].starts_with("tls: set, but listen.https is not"), "{problems:?}");
        config.listen.https = Some("127.0.0.1:0".parse().unwrap());
        config.validate().unwrap();
        config.tls = Some(TlsConfig::default());
        let problems = config.validate().unwrap_err().problems;
        assert!(problems[0].starts_with("tls: needs cert and key"), "{problems:?}");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let problems = Config::new(&file).validate().unwrap_err().problems;
        assert!(problems[0].starts_with("root: ") && problems[0].ends_with("is not a directory"), "{problems:?}");
    }

    #[test]
    fn longest_prefix_wins() {
        let config = parse(
            r#"
            root = "/tmp"
            default_cache_control = "public, max-age=5"
            [[rules]]
            path_prefix = "/v/"
            cache_control = "public, max-age=86400"
            surrogate_keys = ["video", "all"]
            [[rules]]
            path_prefix = "/v/live/"
            cache_control = "public, max-age=2"
            [[rules]]
            path_prefix = "/keys-only/"
            surrogate_keys = ["k"]
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        let policy = Policy::new(&config).unwrap();
        let p = policy.lookup("/v/a.mp4");
        assert_eq!(p.cache_control, "public, max-age=86400");
        assert_eq!(p.surrogate_key.unwrap(), "video all");
        let p = policy.lookup("/v/live/x.m3u8");
        assert_eq!(p.cache_control, "public, max-age=2");
        assert_eq!(p.surrogate_key, None);
        let p = policy.lookup("/keys-only/x");
        assert_eq!(p.cache_control, "public, max-age=5");
        assert_eq!(p.surrogate_key.unwrap(), "k");
        assert_eq!(policy.lookup("/other").cache_control, "public, max-age=5");
        assert_eq!(policy.lookup("/v").cache_control, "public, max-age=5");
    }
}
