//! Cache keys: how a cached object is named, and how a purge finds it.
//!
//! A primary key is `scheme://host/path?query` (the query left out when the edge
//! ignores it). Everything stored for one URL — its `Vary` variants and the slices
//! of a large object — lives under `primary ␟ suffix`, so a purge of a URL matches
//! every entry whose key's [`url`] is that URL.

use http::{HeaderMap, HeaderName, Uri};

/// Separates a primary key from a variant or slice suffix.
pub const SEPARATOR: char = '\u{1f}';

/// The header naming an object's surrogate keys (space-separated).
pub const SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
/// The header naming an object's cache tags (comma-separated).
pub const CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// The primary cache key: scheme, host, path and (unless ignored) query.
pub fn primary(scheme: &str, host: &str, uri: &Uri, ignore_query: bool) -> String {
    let path = if uri.path().is_empty() { "/" } else { uri.path() };
    match uri.query().filter(|_| !ignore_query) {
        Some(query) => format!("{scheme}://{host}{path}?{query}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

/// A host as the cache key, site matching and purge matching use it (RFC 9110 §4.2.3
/// equivalence, and the root's trailing dot): lowercase, IPv6 brackets and one
/// trailing dot removed. `None` for an empty host or one with an empty label
/// (`a..test`, `.`).
pub fn normalize_host(host: &str) -> Option<String> {
    if let Some(literal) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return literal.parse::<std::net::Ipv6Addr>().is_ok().then(|| literal.to_ascii_lowercase());
    }
    if host.contains(':') {
        return host.parse::<std::net::Ipv6Addr>().is_ok().then(|| host.to_ascii_lowercase());
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    // reg-name (RFC 3986 §3.2.2): unreserved, pct-encoded and sub-delims.
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
    if host.is_empty() || !host.bytes().all(allowed) || host.split('.').any(str::is_empty) {
        return None;
    }
    Some(host.to_ascii_lowercase())
}

/// A request's `Host` field value or `:authority` (RFC 9110 §7.2: `uri-host [":"
/// port]`, no userinfo), normalised: the host by [`normalize_host`], the port `None`
/// when absent or the default of `scheme` (80 for http, 443 for https). `None`
/// when it is not a valid authority.
pub fn request_authority(authority: &str, scheme: &str) -> Option<(String, Option<u16>)> {
    if authority.contains('@') {
        return None;
    }
    let parsed: http::uri::Authority = authority.parse().ok()?;
    // After the host: nothing, or ":" and digits (an empty port is allowed).
    let rest = &parsed.as_str()[parsed.host().len()..];
    if let Some(digits) = rest.strip_prefix(':') {
        if !digits.bytes().all(|b| b.is_ascii_digit()) || (!digits.is_empty() && digits.parse::<u16>().is_err()) {
            return None;
        }
    } else if !rest.is_empty() {
        return None;
    }
    let default = match scheme {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    let port = parsed.port_u16().filter(|port| Some(*port) != default);
    Some((normalize_host(parsed.host())?, port))
}

/// The key of slice `index` of the object under `primary`.
pub fn slice(primary: &str, index: u64) -> String {
    format!("{primary}{SEPARATOR}slice:{index}")
}

/// The key of the variant of `primary` whose varying request headers had `values`.
pub fn variant(primary: &str, values: &[(HeaderName, String)]) -> String {
    let mut key = String::with_capacity(primary.len() + 32);
    key.push_str(primary);
    key.push(SEPARATOR);
    for (name, value) in values {
        key.push_str(name.as_str());
        key.push('=');
        key.push_str(value);
        key.push('\n');
    }
    key
}

/// The primary key of any key: `key` without its variant or slice suffix.
pub fn primary_of(key: &str) -> &str {
    key.split(SEPARATOR).next().unwrap_or(key)
}

/// Whether `key` is `primary` itself or one of its variants or slices.
pub fn belongs_to(key: &str, primary: &str) -> bool {
    key.strip_prefix(primary).is_some_and(|rest| rest.is_empty() || rest.starts_with(SEPARATOR))
}

/// The URL a key stands for, without scheme and suffix: `host/path?query` — what a
/// purge by URL or prefix is matched against.
pub fn url(key: &str) -> &str {
    let primary = primary_of(key);
    primary.split_once("://").map_or(primary, |(_, rest)| rest)
}

/// The request's values of the varying headers, normalised (all field lines joined,
/// whitespace around commas removed). `Accept-Encoding` is folded into the coding
/// it prefers (`br`, `gzip` or `identity`, see [`crate::coding::preferred`]): the
/// many spellings of that header make at most three variants.
pub fn vary_values(names: &[HeaderName], request: &HeaderMap) -> Vec<(HeaderName, String)> {
    names
        .iter()
        .map(|name| {
            if name == http::header::ACCEPT_ENCODING {
                return (name.clone(), crate::coding::preferred(request).as_str().to_string());
            }
            let joined = request
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
                .join(",");
            (name.clone(), joined)
        })
        .collect()
}

/// Tags from `Surrogate-Key` (space-separated) and `Cache-Tag` (comma-separated),
/// each once, in order.
pub fn surrogate_keys(headers: &HeaderMap) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    let mut add = |tag: &str| {
        let tag = tag.trim();
        if !tag.is_empty() && !tags.iter().any(|t| t == tag) {
            tags.push(tag.to_string());
        }
    };
    for value in headers.get_all(SURROGATE_KEY).iter().filter_map(|v| v.to_str().ok()) {
        value.split_ascii_whitespace().for_each(&mut add);
    }
    for value in headers.get_all(CACHE_TAG).iter().filter_map(|v| v.to_str().ok()) {
        value.split(',').for_each(&mut add);
    }
    tags
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn keys() {
        let uri: Uri = "/v/a.mp4?x=1".parse().unwrap();
        assert_eq!(primary("https", "www.cdn.test", &uri, false), "https://www.cdn.test/v/a.mp4?x=1");
        assert_eq!(primary("https", "www.cdn.test", &uri, true), "https://www.cdn.test/v/a.mp4");
        let key = primary("https", "h", &uri, false);
        assert_eq!(url(&key), "h/v/a.mp4?x=1");
        assert_eq!(url(&slice(&key, 3)), "h/v/a.mp4?x=1");
        let values = vec![(http::header::ACCEPT_ENCODING, "gzip".to_string())];
        assert_eq!(url(&variant(&key, &values)), "h/v/a.mp4?x=1");
        assert!(belongs_to(&slice(&key, 3), &key));
        assert!(belongs_to(&variant(&key, &values), &key));
        assert!(belongs_to(&key, &key));
        assert!(!belongs_to("https://h/v/a.mp4?x=12", &key));
    }

    #[test]
    fn hosts() {
        for same in ["a.test", "A.Test", "a.test.", "A.TEST."] {
            assert_eq!(normalize_host(same).as_deref(), Some("a.test"), "{same}");
        }
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
        for bad in ["", ".", "a..test", ".a.test", "a.test.."] {
            assert_eq!(normalize_host(bad), None, "{bad:?}");
        }
        let a = |text: &str, scheme: &str| request_authority(text, scheme);
        assert_eq!(a("a.test:443", "https"), Some(("a.test".into(), None)));
        assert_eq!(a("a.test.:80", "http"), Some(("a.test".into(), None)));
        assert_eq!(a("a.test:80", "https"), Some(("a.test".into(), Some(80))));
        assert_eq!(a("[::1]:8443", "https"), Some(("::1".into(), Some(8443))));
        for bad in ["", "user@a.test", "a.test:x", "a test", "a.test:99999", "a..test"] {
            assert_eq!(a(bad, "http"), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn host_normalisation_is_idempotent(host in "[a-zA-Z0-9.:\\[\\]-]{0,30}", port in proptest::option::of(0u16..)) {
            if let Some(once) = normalize_host(&host) {
                proptest::prop_assert_eq!(normalize_host(&once), Some(once.clone()));
                proptest::prop_assert!(!once.ends_with('.') || once.contains(':'));
                proptest::prop_assert_eq!(once.to_ascii_lowercase(), once.clone());
            }
            let text = match port { Some(port) => format!("{host}:{port}"), None => host.clone() };
            if let Some((name, port)) = request_authority(&text, "https") {
                proptest::prop_assert_eq!(normalize_host(&name), Some(name.clone()));
                proptest::prop_assert_ne!(port, Some(443));
            }
        }
    }

    #[test]
    fn accept_encoding_makes_three_variants_at_most() {
        let names = [http::header::ACCEPT_ENCODING, http::header::ACCEPT_LANGUAGE];
        let mut seen = std::collections::HashSet::new();
        for ae in
            ["gzip, deflate, br", "br", "gzip;q=0, br", "br, gzip", "*", "gzip", "x-gzip, deflate", "", "identity"]
        {
            let mut headers = HeaderMap::new();
            headers.insert(http::header::ACCEPT_ENCODING, HeaderValue::from_str(ae).unwrap());
            headers.insert(http::header::ACCEPT_LANGUAGE, HeaderValue::from_static("en,  fr"));
            let values = vary_values(&names, &headers);
            assert_eq!(values[1].1, "en,fr");
            seen.insert(values[0].1.clone());
        }
        seen.insert(vary_values(&names, &HeaderMap::new())[0].1.clone());
        let mut seen: Vec<_> = seen.into_iter().collect();
        seen.sort();
        assert_eq!(seen, ["br", "gzip", "identity"]);
    }

    #[test]
    fn tags() {
        let mut headers = HeaderMap::new();
        headers.append(SURROGATE_KEY, HeaderValue::from_static("video  home"));
        headers.append(CACHE_TAG, HeaderValue::from_static("a, b,video"));
        assert_eq!(surrogate_keys(&headers), vec!["video", "home", "a", "b"]);
    }
}
