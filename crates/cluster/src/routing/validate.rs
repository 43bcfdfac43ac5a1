//! What a routing document must be to be applied: every rule in one place, each
//! problem reported as `field.path: what is wrong`.

use std::{
    collections::{HashMap, HashSet},
    fmt::Display,
    net::Ipv6Addr,
    time::Duration,
};

use rustls_pki_types::{CertificateDer, pem::PemObject as _};

use super::{
    Health, MAX_BYTES, MAX_PER_SITE, MAX_SITES, MAX_TTL, MAX_WEIGHT, OriginSpec, QueryRule, Routing, Rule, Signed, Site,
};

/// Most problems reported (then their count): a document with thousands of bad
/// hosts gets a readable answer, not megabytes.
const MAX_PROBLEMS: usize = 100;
/// Longest path (a rule's prefix or suffix, a probe's path, a signed prefix).
const MAX_PATH: usize = 1024;
/// Shortest probe interval.
const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest probe interval.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Most failures or successes in a row a probe counts.
const MAX_COUNT: u32 = 100;

#[derive(Default)]
struct Problems {
    list: Vec<String>,
    more: usize,
}

impl Problems {
    fn add(&mut self, field: impl Display, what: impl Display) {
        if self.list.len() < MAX_PROBLEMS {
            self.list.push(format!("{field}: {what}"));
        } else {
            self.more += 1;
        }
    }

    fn finish(mut self) -> Result<(), Vec<String>> {
        if self.more > 0 {
            self.list.push(format!("... and {} more problems", self.more));
        }
        if self.list.is_empty() { Ok(()) } else { Err(self.list) }
    }
}

pub(super) fn validate(routing: &Routing) -> Result<(), Vec<String>> {
    let mut problems = Problems::default();
    let encoded = serde_json::to_vec(routing).map_or(0, |json| json.len());
    if encoded > MAX_BYTES {
        problems.add("(document)", format!("{encoded} bytes encoded, at most {MAX_BYTES}"));
    }
    if routing.sites.len() > MAX_SITES {
        problems.add("sites", format!("{} sites, at most {MAX_SITES}", routing.sites.len()));
    }
    if let Some(name) = &routing.default_site
        && routing.site(name).is_none()
    {
        problems.add("default_site", format!("{name:?} names no site"));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut hosts: HashMap<&str, usize> = HashMap::new();
    for (index, site) in routing.sites.iter().enumerate() {
        let field = format!("sites[{index}]");
        if let Some(first) = names.insert(&site.name, index).filter(|_| !site.name.is_empty()) {
            names.insert(&site.name, first);
            problems.add(format!("{field}.name"), format!("{:?} is also the name of sites[{first}]", site.name));
        }
        for (h, host) in site.hosts.iter().enumerate() {
            if let Some(first) = hosts.insert(host, index) {
                hosts.insert(host, first);
                let by = if first == index { "this site".to_string() } else { format!("sites[{first}]") };
                problems.add(format!("{field}.hosts[{h}]"), format!("{host:?} is also listed by {by}"));
            }
        }
        site_problems(site, &field, &mut problems);
    }
    problems.finish()
}

fn site_problems(site: &Site, field: &str, problems: &mut Problems) {
    if !is_name(&site.name) {
        problems.add(
            format!("{field}.name"),
            format_args!(
                "{:?} is not a site name (1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit)",
                site.name
            ),
        );
    }
    limit(problems, &format!("{field}.hosts"), "hosts", site.hosts.len());
    for (h, host) in site.hosts.iter().enumerate() {
        if let Some(what) = host_problem(host) {
            problems.add(format!("{field}.hosts[{h}]"), what);
        }
    }

    let origins = format!("{field}.origins");
    if site.origins.is_empty() {
        problems.add(&origins, "at least one origin is needed");
    } else if site.origins.iter().all(|origin| origin.backup) {
        problems.add(&origins, "at least one origin must not be a backup");
    }
    limit(problems, &origins, "origins", site.origins.len());
    let mut urls: HashMap<&str, usize> = HashMap::new();
    for (o, origin) in site.origins.iter().enumerate() {
        let field = format!("{origins}[{o}]");
        if let Some(first) = urls.insert(&origin.url, o) {
            urls.insert(&origin.url, first);
            problems.add(format!("{field}.url"), format_args!("{:?} is also origins[{first}]", origin.url));
        }
        origin_problems(origin, &field, problems);
    }

    if let Some(health) = &site.health {
        health_problems(health, &format!("{field}.health"), problems);
    }

    limit(problems, &format!("{field}.shield"), "regions", site.shield.len());
    let mut regions = HashSet::new();
    for (r, region) in site.shield.iter().enumerate() {
        if !is_region(region) {
            problems.add(format!("{field}.shield[{r}]"), format_args!("{region:?} is not a region name"));
        } else if !regions.insert(region) {
            problems.add(format!("{field}.shield[{r}]"), format_args!("{region:?} is listed twice"));
        }
    }

    limit(problems, &format!("{field}.rules"), "rules", site.rules.len());
    for (r, rule) in site.rules.iter().enumerate() {
        rule_problems(rule, &format!("{field}.rules[{r}]"), problems);
    }

    if let Some(signed) = &site.signed {
        signed_problems(signed, &format!("{field}.signed"), problems);
    }
}

fn limit(problems: &mut Problems, field: &str, what: &str, count: usize) {
    if count > MAX_PER_SITE {
        problems.add(field, format_args!("{count} {what}, at most {MAX_PER_SITE}"));
    }
}

fn origin_problems(origin: &OriginSpec, field: &str, problems: &mut Problems) {
    if let Some(what) = url_problem(&origin.url) {
        problems.add(format!("{field}.url"), what);
    }
    if !(1..=MAX_WEIGHT).contains(&origin.weight) {
        problems.add(format!("{field}.weight"), format_args!("{} is not within 1..={MAX_WEIGHT}", origin.weight));
    }
    if let Some(ca) = &origin.ca {
        let what = if origin.url.starts_with("https://") {
            ca_problem(ca)
        } else {
            Some("only an https origin takes a ca".into())
        };
        if let Some(what) = what {
            problems.add(format!("{field}.ca"), what);
        }
    }
    if let Some(host) = &origin.host
        && !is_host_header(host)
    {
        problems.add(format!("{field}.host"), format_args!("{host:?} is not a host name with an optional :port"));
    }
}

/// What is wrong with an origin's URL: it must be `http(s)://authority` with no
/// credentials, path (but `/`) or query.
fn url_problem(url: &str) -> Option<String> {
    let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) else {
        return Some(format!("{url:?} does not start with http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Some(format!("{url:?} has a path or query: an origin is scheme://host[:port]"));
    }
    if authority.contains('@') {
        return Some(format!("{url:?} carries credentials: the document travels in gossip, keep secrets out"));
    }
    if !is_authority(authority) {
        return Some(format!("{url:?} has no valid host[:port]"));
    }
    None
}

/// `host[:port]` with a non-empty host (a name, an IPv4 or a bracketed IPv6
/// literal) and a port 1..=65535 if any.
fn is_authority(authority: &str) -> bool {
    let (host_ok, port) = match authority.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let name = authority.split_once(':').map_or(authority, |(name, _)| name);
            (is_dns_name(&name.to_ascii_lowercase()), &authority[name.len()..])
        }
    };
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|port| {
            !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
    host_ok && port_ok
}

/// A Host header value: a host name with an optional port.
fn is_host_header(host: &str) -> bool {
    !host.contains('@') && is_authority(host)
}

/// What is wrong with a private CA: it must be PEM certificates that rustls takes as
/// trust anchors, and never hold a private key.
fn ca_problem(ca: &str) -> Option<String> {
    if ca.contains("PRIVATE KEY") {
        return Some("holds a private key: the document travels in gossip, keep secrets out".into());
    }
    let certs = match CertificateDer::pem_slice_iter(ca.as_bytes()).collect::<Result<Vec<_>, _>>() {
        Ok(certs) => certs,
        Err(error) => return Some(format!("is not PEM: {error}")),
    };
    if certs.is_empty() {
        return Some("holds no PEM CERTIFICATE block".into());
    }
    for (n, cert) in certs.into_iter().enumerate() {
        if let Err(error) = rustls::RootCertStore::empty().add(cert) {
            return Some(format!("certificate {n} is not usable as a CA: {error}"));
        }
    }
    None
}

fn health_problems(health: &Health, field: &str, problems: &mut Problems) {
    // A probe may carry a query (`/status?full=1`).
    let path = health.path.split_once('?').map_or(health.path.as_str(), |(path, _)| path);
    let query_ok =
        health.path.len() <= MAX_PATH && !health.path.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#');
    if let Some(what) = path_problem(path, true) {
        problems.add(format!("{field}.path"), what);
    } else if !query_ok {
        problems.add(format!("{field}.path"), format_args!("{:?} is not a path and query", health.path));
    }
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&health.interval) {
        problems.add(
            format!("{field}.interval"),
            format_args!("{} is not within 100ms..=1h", humantime::format_duration(health.interval)),
        );
    }
    if health.timeout.is_zero() {
        problems.add(format!("{field}.timeout"), "must be more than 0");
    } else if health.timeout >= health.interval {
        problems.add(
            format!("{field}.timeout"),
            format_args!(
                "{} must be less than the interval ({})",
                humantime::format_duration(health.timeout),
                humantime::format_duration(health.interval)
            ),
        );
    }
    for (name, count) in [("fails", health.fails), ("passes", health.passes)] {
        if !(1..=MAX_COUNT).contains(&count) {
            problems.add(format!("{field}.{name}"), format_args!("{count} is not within 1..={MAX_COUNT}"));
        }
    }
}

fn rule_problems(rule: &Rule, field: &str, problems: &mut Problems) {
    if let Some(prefix) = &rule.path_prefix
        && let Some(what) = path_problem(prefix, true)
    {
        problems.add(format!("{field}.path_prefix"), what);
    }
    if let Some(suffix) = &rule.path_suffix
        && let Some(what) = path_problem(suffix, false)
    {
        problems.add(format!("{field}.path_suffix"), what);
    }
    let durations = [
        ("ttl", rule.ttl),
        ("negative_ttl", rule.negative_ttl),
        ("stale_while_revalidate", rule.stale_while_revalidate),
        ("stale_if_error", rule.stale_if_error),
    ];
    for (name, duration) in durations {
        let Some(duration) = duration else { continue };
        if duration > MAX_TTL {
            problems.add(format!("{field}.{name}"), "is more than a year (365d)");
        } else if rule.bypass {
            problems.add(format!("{field}.{name}"), "has no effect with bypass (nothing is stored)");
        }
    }
    if let Some(query) = &rule.query {
        if rule.bypass {
            problems.add(format!("{field}.query"), "has no effect with bypass (nothing is stored)");
        }
        query_problems(query, &format!("{field}.query"), problems);
    }
}

fn query_problems(query: &QueryRule, field: &str, problems: &mut Problems) {
    if query.ignore.is_empty() {
        problems.add(format!("{field}.ignore"), "lists no parameter");
    }
    limit(problems, &format!("{field}.ignore"), "parameters", query.ignore.len());
    for (i, pattern) in query.ignore.iter().enumerate() {
        let name = pattern.strip_suffix('*').unwrap_or(pattern);
        let bad = (pattern.is_empty() || name.contains('*'))
            || name.len() > MAX_PATH
            || name.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '&' | '=' | '#'));
        if bad {
            problems.add(
                format!("{field}.ignore[{i}]"),
                format_args!("{pattern:?} is not a parameter name (a trailing * matches a prefix)"),
            );
        }
    }
}

/// The problems of one `signed` table alone (an edge's `[origin] signed`).
pub(super) fn signed_alone(signed: &Signed, field: &str) -> Vec<String> {
    let mut problems = Problems::default();
    signed_problems(signed, field, &mut problems);
    problems.finish().err().unwrap_or_default()
}

fn signed_problems(signed: &Signed, field: &str, problems: &mut Problems) {
    if let Some(what) = path_problem(&signed.path_prefix, true) {
        problems.add(format!("{field}.path_prefix"), what);
    }
    if signed.keys.is_empty() {
        problems.add(format!("{field}.keys"), "lists no key id");
    }
    limit(problems, &format!("{field}.keys"), "keys", signed.keys.len());
    for (k, key) in signed.keys.iter().enumerate() {
        if !super::is_key_id(key) {
            problems.add(
                format!("{field}.keys[{k}]"),
                format_args!("{key:?} is not a key id (1-64 of A-Z, a-z, 0-9, '.', '_', '-')"),
            );
        }
    }
}

/// What is wrong with a path (a prefix when `absolute`, else a suffix).
fn path_problem(path: &str, absolute: bool) -> Option<String> {
    if absolute && !path.starts_with('/') {
        return Some(format!("{path:?} does not start with /"));
    }
    if path.is_empty() {
        return Some("is empty".into());
    }
    if path.len() > MAX_PATH {
        return Some(format!("is {} bytes long, at most {MAX_PATH}", path.len()));
    }
    if path.chars().any(|c| c.is_whitespace() || c.is_control() || matches!(c, '?' | '#')) {
        return Some(format!("{path:?} is not a path (no spaces, control characters, ? or #)"));
    }
    None
}

/// What is wrong with a site's host.
fn host_problem(host: &str) -> Option<String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if is_dns_name(name) {
        return None;
    }
    let what = if host.bytes().any(|b| b.is_ascii_uppercase()) && is_dns_name(&name.to_ascii_lowercase()) {
        "must be lowercase"
    } else if name.rsplit_once(':').is_some_and(|(n, port)| is_dns_name(n) && port.parse::<u16>().is_ok()) {
        "has a port: hosts carry none (every port matches)"
    } else if name.strip_suffix('.').is_some_and(is_dns_name) {
        "ends with a dot (write it without)"
    } else {
        "is not a host or *.wildcard"
    };
    Some(format!("{host:?} {what}"))
}

/// A lowercase DNS name: labels of `a-z`, `0-9`, `-`, `_`, 1-63 bytes, not starting
/// or ending with `-`, 253 bytes at most.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        })
}

/// A site name: 1-64 of `a-z`, `0-9`, `.`, `_`, `-`, starting with a letter or digit.
fn is_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

/// A region name: 1-64 characters, no spaces or control characters.
fn is_region(region: &str) -> bool {
    (1..=64).contains(&region.len()) && !region.chars().any(|c| c.is_whitespace() || c.is_control())
}
