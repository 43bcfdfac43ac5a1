//! The routing document: which sites an edge serves, from which origins, under which
//! rules. The control plane owns it (`PUT /v1/routing`, `cdn routing apply`), the
//! cluster carries it ([`Cluster::publish_routing`](crate::Cluster::publish_routing),
//! [`Cluster::routing`](crate::Cluster::routing)), every edge applies it.
//!
//! ```json
//! {"default_site": "video",
//!  "sites": [
//!   {"name": "video",
//!    "hosts": ["www.cdn.test", "*.video.test"],
//!    "origins": [{"url": "http://10.0.0.1:8080", "weight": 2},
//!                {"url": "http://10.0.0.2:8080", "backup": true}],
//!    "health": {"path": "/healthz", "interval": "2s", "timeout": "1s", "fails": 2, "passes": 2},
//!    "shield": ["eu-west"],
//!    "rules": [
//!      {"path_suffix": ".m3u8", "ttl": "2s"},
//!      {"path_prefix": "/v/", "ttl": "1d", "stale_if_error": "1h", "cors": true},
//!      {"path_prefix": "/api/", "bypass": true},
//!      {"path_prefix": "/", "query": {"ignore": ["utm_*", "CMCD"]}, "negative_ttl": "10s"}],
//!    "signed": {"path_prefix": "/paid/", "keys": ["k1"]}}]}
//! ```
//!
//! The same document in TOML is `default_site = "video"` followed by `[[sites]]`
//! tables with `[[sites.origins]]` and `[[sites.rules]]`.
//!
//! Reading a document is two steps: [`Routing::from_json`] / [`Routing::from_toml`]
//! (the shape: unknown fields, wrong types; the error names the field), then
//! [`Routing::validate`] (the meaning: every problem, each as `field.path: what is
//! wrong`). An edge serves by a [`Router`], built once per version, whose lookups
//! ([`Router::site_for`], [`Site::rule_for`], [`QueryRule::strip`]) allocate nothing
//! on the common path.
//!
//! Decisions the contract leaves open, taken here:
//! - Hosts carry no port: the Host header's port is ignored when matching, so a site
//!   answers on every listener. Hosts are lowercase DNS names (IPv4 literals pass as
//!   such; IPv6 literals are not site hosts); a request's Host is compared
//!   case-insensitively, without a trailing dot.
//! - A wildcard `*.example.com` matches exactly one more label (`a.example.com`, not
//!   `example.com` nor `a.b.example.com`), as in certificates (RFC 6125 §6.4.3); so
//!   of the wildcards at most one can match a host and no "longest suffix" rule is
//!   needed. An exact host always wins over a wildcard.
//! - A host listed twice (by two sites, or twice by one) is an error, not a priority.
//! - A site without `health` has no active probes (passive marks only); `"health": {}`
//!   probes with the defaults (`/` every 2 s, 1 s timeout, 2 fails, 2 passes).
//! - `signed.path_prefix` defaults to `/` (the whole site).
//! - Query parameter names are compared as they are on the wire (not
//!   percent-decoded), case-sensitively.

use std::{borrow::Cow, collections::HashMap, time::Duration};

use serde::{Deserialize, Serialize};

use crate::error::Error;

mod validate;

/// Largest document, encoded as JSON (what the API takes and gossip carries).
pub const MAX_BYTES: usize = 1 << 20;
/// Most sites in a document.
pub const MAX_SITES: usize = 1000;
/// Most hosts, origins, rules (and shield regions, ignored query parameters) per
/// site.
pub const MAX_PER_SITE: usize = 100;
/// Largest origin weight.
pub const MAX_WEIGHT: u32 = 1000;
/// Longest `ttl`, `negative_ttl`, `stale_while_revalidate`, `stale_if_error`.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// The routing document.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    /// The site of requests whose Host no site lists; none: those get 421.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_site: Option<String>,
    /// The sites.
    #[serde(default)]
    pub sites: Vec<Site>,
}

/// One site: the hosts it answers for, where it fetches from, how it caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Its name (in cache keys and the `site` metric label): 1-64 of `a-z`, `0-9`,
    /// `.`, `_`, `-`, starting with a letter or digit.
    pub name: String,
    /// Host names (lowercase, no port) and `*.suffix` wildcards (one label).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The origin pool: weighted primaries, and backups for when none is healthy.
    pub origins: Vec<OriginSpec>,
    /// Active health probes of the origins; none: passive marks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Health>,
    /// Regions whose edges fetch this site's misses from the origins; the others
    /// fetch from one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shield: Vec<String>,
    /// Sharing of misses within a region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
    /// Cache rules, in order: the first that matches a path applies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// Paths that need a signed URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed: Option<Signed>,
}

/// One origin of a site's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OriginSpec {
    /// `http://host[:port]` or `https://host[:port]`, no path.
    pub url: String,
    /// Its share of the primaries' traffic, 1..=1000.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Used only when no primary is healthy.
    #[serde(default)]
    pub backup: bool,
    /// PEM certificates of a private CA that signs this (https) origin's
    /// certificate, inline: the document travels to every edge. Never a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
    /// The Host header sent to this origin, instead of the request's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

fn default_weight() -> u32 {
    1
}

/// Active health probes: `GET path` on every origin each `interval`; `fails`
/// failures in a row mark it down, `passes` successes up again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// The path probed (with a query if need be).
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Time between probes (at least 100ms).
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A probe not answered within this failed (less than `interval`).
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failures in a row that mark an origin down.
    #[serde(default = "default_health_count")]
    pub fails: u32,
    /// Successes in a row that mark it up again.
    #[serde(default = "default_health_count")]
    pub passes: u32,
}

fn default_health_path() -> String {
    "/".to_string()
}

fn default_health_interval() -> Duration {
    Duration::from_secs(2)
}

fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_health_count() -> u32 {
    2
}

impl Default for Health {
    fn default() -> Self {
        Self {
            path: default_health_path(),
            interval: default_health_interval(),
            timeout: default_health_timeout(),
            fails: default_health_count(),
            passes: default_health_count(),
        }
    }
}

/// How the edges of one region share a site's misses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Share {
    /// Each key has one owner edge per region (rendezvous hash over the region's
    /// live edges); the others fetch from it first.
    Region,
}

/// A cache rule. Absent fields leave the origin's word (or the edge's default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Matches paths that start with it (starts with `/`); absent: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Matches paths that end with it; absent: any path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_suffix: Option<String>,
    /// Freshness on the edge, instead of the origin's.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// How long a 404 or 410 is cached.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub negative_ttl: Option<Duration>,
    /// `stale-while-revalidate`, even when the origin does not say so.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// `stale-if-error`, even when the origin does not say so.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// Never store: every request goes to the origin.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bypass: bool,
    /// Answer CORS preflights at the edge and add CORS headers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cors: bool,
    /// Query parameters left out of the cache key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<QueryRule>,
}

/// Query parameters left out of the cache key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRule {
    /// Parameter names; a trailing `*` matches every name that starts with the
    /// rest (`utm_*`; `*` alone: the whole query).
    pub ignore: Vec<String>,
}

/// Paths that need a signed URL (RFC 9246), with the keys that may sign them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    /// Paths starting with it need a signature (default `/`: all of them).
    #[serde(default = "default_signed_prefix")]
    pub path_prefix: String,
    /// Ids (`kid`) of the edges' `[[signing.keys]]` accepted here; the secrets stay
    /// in the edges' config.
    pub keys: Vec<String>,
}

fn default_signed_prefix() -> String {
    "/".to_string()
}

impl Signed {
    /// Every problem of this table, each as `field.key: what is wrong` (what a
    /// document's validation says of a site's `signed`; for an edge's own
    /// `[origin] signed`).
    pub fn problems(&self, field: &str) -> Vec<String> {
        validate::signed_alone(self, field)
    }
}

/// Whether `id` is a signing key id (`kid`): 1-64 of `A-Z a-z 0-9 . _ -`.
pub fn is_key_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A routing document under its version, as the control plane publishes it.
///
/// Of two documents the one with the higher `version` is newer; on equal versions
/// (two control nodes that accepted a document at once) the one whose `by` is
/// greater (byte order) wins, on every node alike ([`supersedes`](Self::supersedes)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned {
    /// Its version (1, 2, ...).
    pub version: u64,
    /// The control node that accepted it.
    pub by: String,
    /// When it was accepted (ms since the Unix epoch, the accepting node's clock; 0:
    /// unknown, e.g. a document stored before this field existed). Edges measure how
    /// long it took to reach them from it (`cdn_routing_apply_seconds`).
    #[serde(default)]
    pub accepted_ms: u64,
    /// The document.
    pub routing: Routing,
}

impl Versioned {
    /// Whether this document replaces `other`: a higher version, or the same
    /// version accepted by a greater control node id.
    pub fn supersedes(&self, other: &Self) -> bool {
        (self.version, self.by.as_str()) > (other.version, other.by.as_str())
    }
}

impl Routing {
    /// Reads a document in JSON (what `PUT /v1/routing` takes); the error names the
    /// field (`sites[0].origins[1].weight: invalid type: ...`). Not validated: see
    /// [`validate`](Self::validate).
    pub fn from_json(bytes: &[u8]) -> Result<Self, Error> {
        if bytes.len() > MAX_BYTES {
            return Err(Error::RoutingTooLarge { bytes: bytes.len(), max: MAX_BYTES });
        }
        let mut deserializer = serde_json::Deserializer::from_slice(bytes);
        let routing = serde_path_to_error::deserialize(&mut deserializer).map_err(syntax)?;
        deserializer.end().map_err(|source| Error::RoutingSyntax { field: String::new(), source: source.into() })?;
        Ok(routing)
    }

    /// Reads a document in TOML (`default_site = ".."`, `[[sites]]`,
    /// `[[sites.origins]]`, `[[sites.rules]]`); the error names the field. Not
    /// validated: see [`validate`](Self::validate).
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        if text.len() > MAX_BYTES {
            return Err(Error::RoutingTooLarge { bytes: text.len(), max: MAX_BYTES });
        }
        let deserializer = toml::Deserializer::parse(text)
            .map_err(|source| Error::RoutingSyntax { field: String::new(), source: source.into() })?;
        serde_path_to_error::deserialize(deserializer).map_err(syntax)
    }

    /// The document as JSON, as gossip carries it and `GET /v1/routing` shows it.
    pub fn to_json(&self) -> String {
        // Strings, numbers, booleans and durations: serde_json cannot fail on them.
        serde_json::to_string(self).expect("a routing document serializes")
    }

    /// Every problem of the document, each as `field.path: what is wrong` (at most
    /// 100, then a count of the rest); `Ok` when it can be applied.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        validate::validate(self)
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|site| site.name == name)
    }
}

/// A parse error with the path of the field it happened at.
fn syntax<E: std::error::Error + Send + Sync + 'static>(error: serde_path_to_error::Error<E>) -> Error {
    let field = error.path().to_string();
    // The root's path prints as ".".
    let field = if field == "." { String::new() } else { field };
    Error::RoutingSyntax { field, source: error.into_inner().into() }
}

impl Site {
    /// The first rule whose `path_prefix` and `path_suffix` both match `path` (the
    /// request's path, without the query).
    pub fn rule_for(&self, path: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.matches(path))
    }

    /// Whether `path` needs a signed URL.
    pub fn needs_signature(&self, path: &str) -> bool {
        self.signed.as_ref().is_some_and(|signed| path.starts_with(signed.path_prefix.as_str()))
    }
}

impl Rule {
    /// Whether this rule applies to `path`: both its prefix and its suffix match
    /// (an absent one matches anything).
    pub fn matches(&self, path: &str) -> bool {
        self.path_prefix.as_deref().is_none_or(|prefix| path.starts_with(prefix))
            && self.path_suffix.as_deref().is_none_or(|suffix| path.ends_with(suffix))
    }
}

impl QueryRule {
    /// Whether the parameter `name` is ignored (exact, or a `prefix*` pattern).
    pub fn ignores(&self, name: &str) -> bool {
        self.ignore.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == pattern,
        })
    }

    /// `query` (without the `?`) with the ignored parameters removed and the others
    /// in their order (empty `&&` pieces dropped); `None` when nothing is left.
    pub fn strip(&self, query: &str) -> Option<String> {
        let mut kept = String::with_capacity(query.len());
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            if !self.ignores(name) {
                if !kept.is_empty() {
                    kept.push('&');
                }
                kept.push_str(pair);
            }
        }
        (!kept.is_empty()).then_some(kept)
    }
}

/// A document indexed for the edge's hot path: Host → site in two hash lookups.
/// Built once per version ([`Router::new`]); cheap to share behind an `Arc`.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routing: Routing,
    /// Exact host → index of its site.
    exact: HashMap<String, usize>,
    /// The suffix of `*.suffix` → index of its site.
    wildcard: HashMap<String, usize>,
    /// Index of the default site.
    default: Option<usize>,
}

impl Router {
    /// Indexes a document (a validated one: of a host listed twice, the first
    /// listing counts; a `default_site` naming no site is no default).
    pub fn new(routing: Routing) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (index, site) in routing.sites.iter().enumerate() {
            for host in &site.hosts {
                let host = host.to_ascii_lowercase();
                match host.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()).or_insert(index),
                    None => exact.entry(host).or_insert(index),
                };
            }
        }
        let default = routing.default_site.as_ref().and_then(|name| routing.sites.iter().position(|s| &s.name == name));
        Self { routing, exact, wildcard, default }
    }

    /// The document.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }

    /// The site of a request with this Host (or `:authority`): the site listing the
    /// host exactly (any case, any port, with or without a trailing dot), else the
    /// one listing `*.` and the host's parent, else the default site; `None`: the
    /// edge answers 421.
    pub fn site_for(&self, host: &str) -> Option<&Site> {
        self.index_for(host).map(|index| &self.routing.sites[index])
    }

    /// The index in [`routing().sites`](Self::routing) of the site
    /// [`site_for`](Self::site_for) finds.
    pub fn index_for(&self, host: &str) -> Option<usize> {
        let host = normalize_host(host);
        let index = self.exact.get(host.as_ref()).or_else(|| {
            let (label, parent) = host.split_once('.')?;
            if label.is_empty() || parent.is_empty() {
                return None;
            }
            self.wildcard.get(parent)
        });
        index.copied().or(self.default)
    }
}

impl From<Routing> for Router {
    fn from(routing: Routing) -> Self {
        Self::new(routing)
    }
}

/// The host of a Host header as sites list it: no port, no trailing dot, lowercase
/// (borrowed unless it had capitals).
fn normalize_host(host: &str) -> Cow<'_, str> {
    let host = match host.rsplit_once(':') {
        // `[v6]:port` keeps its brackets (and matches no site host); `name:port`
        // loses the port.
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some((name, port)) if name.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
pub(crate) mod tests;
