//! The HIT short ways: plain HTTP/1.1 GET and HEAD requests that are fresh cache
//! HITs, answered by the listener itself ([`cdn_node::listener::fast`]) without
//! hyper's dispatcher and without building a `Request` or a `Response`; and
//! HTTP/2 ones, answered by the edge's handler before the pipeline
//! ([`Pipeline::fast_hit_h2`]) with a header map prepared per object (hyper still
//! frames and HPACK-encodes it; its stream executor runs such a ready answer on the
//! connection's task, `cdn_node::listener::InlineFirst`).
//!
//! The rule is "anything unusual goes the full way": [`Pipeline::fast_hit`] answers
//! only when the answer is the one [`Pipeline::handle`] would give, byte for byte
//! (but for `Date`, which hyper writes from its own per-second clock), and
//! declines everything else, which then goes through the pipeline as before:
//! - request headers outside a short list of ones that cannot change a HIT
//!   (`Cache-Control`, `Pragma`, conditionals, `Range`,
//!   `Authorization`, the tiers' `CDN-*`... all go the full way);
//! - a `Host` that is not a plain lowercase name (with an optional port), a target
//!   with characters outside the URI's unreserved, sub-delims, `:@/?%`;
//! - a site with signed paths or whose rule for the path bypasses the cache or
//!   adds CORS;
//! - an object not in memory, that varies, is not a 200 with a body, is larger than
//!   [`MAX_BODY`] (the full way sends those with `sendfile`), is marked
//!   "hit-for-pass", or is not fresh (stale, soft-purged: revalidation and
//!   stale-while-revalidate go the full way);
//! - `Settings::fast_hits` off (something must see every request in `handle`: the
//!   edge turns it off when the access log is on);
//! - a client over its per-client rate (`[limits] client_rps`): the full way
//!   answers 429.
//!
//! A connection's first request that goes the full way hands the connection to
//! hyper for good: later HITs on it go the full way too (keep-alive clients that
//! start with a miss, e.g. a browser's first page, gain nothing on that connection).
//!
//! The response head is the full way's: `represent` and `Pipeline::decorate` build
//! its headers, encoded as hyper encodes them (lowercase names, in the header map's
//! order, `date` last). That encoding is kept per object, per thread, and reused
//! until its `Date`, `Age` or `Cache-Status` ttl change, at most once a second: a
//! HIT is then a cache lookup, a clock read, counters and one `writev`.

use std::{
    cell::RefCell,
    collections::HashMap,
    sync::{Arc, Weak, atomic::Ordering},
    thread::LocalKey,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use cdn_http::policy::{self, Action, Directives};
use cdn_node::listener::{Body, full};
use cdn_node::listener::{
    ConnInfo,
    fast::{Answer, FastPath, Simple},
};
use http::{HeaderMap, Method, StatusCode, Version, header};

use super::{
    Pipeline,
    respond::{Source, represent},
    ttl,
};
use crate::{
    cache::{Head, Object, status::CacheStatus},
    metrics::{CacheResult, Protocol},
    sites,
};

/// The largest body the short way sends (larger ones go the full way, which sends
/// big bodies from sealed memory with `sendfile`).
pub(crate) const MAX_BODY: usize = 256 * 1024;

/// Encoded heads kept per thread before the dead ones are dropped.
const KEEP: usize = 4096;

/// The edge's [`FastPath`]: the pipeline's [`Pipeline::fast_hit`].
pub(crate) struct FastHits(pub(crate) Arc<Pipeline>);

impl FastPath for FastHits {
    fn answer(&self, request: &Simple<'_>, info: &ConnInfo) -> impl Future<Output = Option<Answer>> + Send {
        self.0.fast_hit(request, info.tls, info.peer.ip())
    }
}

/// Request headers that cannot change what a HIT answers (lowercase).
const HARMLESS: &[&str] = &[
    "host",
    "connection",
    "user-agent",
    "accept",
    "accept-language",
    // Only objects without Vary are answered here; text the edge compresses is
    // stored with `Vary: Accept-Encoding` and goes the full way.
    "accept-encoding",
    "referer",
    "cookie",
    "dnt",
    "upgrade-insecure-requests",
    "sec-fetch-dest",
    "sec-fetch-mode",
    "sec-fetch-site",
    "sec-fetch-user",
    "sec-ch-ua",
    "sec-ch-ua-mobile",
    "sec-ch-ua-platform",
];

fn harmless(name: &str) -> bool {
    HARMLESS.iter().any(|known| known.eq_ignore_ascii_case(name))
}

/// The host of a `Host` value that is a plain name: lowercase letters, digits,
/// dots and hyphens, starting and ending with a letter or digit, with an optional
/// port of digits. Anything else (uppercase, IPv6 literals, odd bytes) goes the
/// full way, which has the one authority parser.
fn plain_host(value: &str) -> Option<&str> {
    let (host, port) = match value.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (value, None),
    };
    if let Some(port) = port
        && (port.is_empty()
            || port.len() > 5
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.parse::<u16>().is_err())
    {
        return None;
    }
    let bytes = host.as_bytes();
    let edge_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok = edge_ok(bytes.first())
        && edge_ok(bytes.last())
        && bytes.iter().all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && !host.contains("..");
    ok.then_some(host)
}

/// The path and query of an origin-form target made only of characters the URI
/// parser takes as they are (no fragment, no spaces, no quotes or brackets).
fn plain_target(target: &str) -> Option<(&str, Option<&str>)> {
    let plain = target.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'@'
                    | b'/'
                    | b'?'
                    | b'%'
            )
    });
    if !plain || !target.starts_with('/') {
        return None;
    }
    Some(match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    })
}

/// What a kept response part (an encoded head, a prepared header map) was made
/// for: it answers a HIT with the same stamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    /// The pipeline that built it (its `X-Served-By`, `Alt-Svc`).
    pipeline: usize,
    /// The `Date` second (0 where the part has no date: hyper adds it).
    date: u64,
    age: u64,
    ttl: i64,
    tls: bool,
}

/// A response part made for one object, kept per thread.
struct Kept<T> {
    /// The head it was built from (held weakly: its address is not reused while
    /// this lives, so the address keys it).
    owner: Weak<Head>,
    stamp: Stamp,
    value: T,
}

type Keep<T> = RefCell<HashMap<usize, Kept<T>>>;

thread_local! {
    /// Encoded HTTP/1.1 heads by their head's address.
    static ENCODED: Keep<Bytes> = RefCell::new(HashMap::new());
    /// Prepared HTTP/2 headers by their head's address.
    static PREPARED: Keep<HeaderMap> = RefCell::new(HashMap::new());
}

/// The part kept in `keep` for `head` at `stamp`, else `make`'s (kept for the next
/// HIT).
fn kept<T: Clone>(
    keep: &'static LocalKey<Keep<T>>,
    head: &Arc<Head>,
    stamp: Stamp,
    make: impl FnOnce() -> Option<T>,
) -> Option<T> {
    let id = Arc::as_ptr(head) as usize;
    let found = keep.with_borrow(|kept| kept.get(&id).filter(|k| k.stamp == stamp).map(|k| k.value.clone()));
    if found.is_some() {
        return found;
    }
    let value = make()?;
    keep.with_borrow_mut(|kept| {
        if kept.len() >= KEEP {
            kept.retain(|_, k| k.owner.strong_count() > 0);
            if kept.len() >= KEEP {
                kept.clear();
            }
        }
        kept.insert(id, Kept { owner: Arc::downgrade(head), stamp, value: value.clone() });
    });
    Some(value)
}

/// A fresh memory HIT of a plain object, found by [`Pipeline::fresh_hit`].
struct Hit {
    object: Object,
    site: Arc<sites::Site>,
    age: Duration,
    ttl: i64,
    /// The system clock when it was looked up.
    real: SystemTime,
}

impl Pipeline {
    /// The whole answer to a simple HTTP/1.1 request when it is a fresh HIT of a
    /// plain object; `None` sends it the full way. See the module docs.
    pub(crate) async fn fast_hit(&self, request: &Simple<'_>, tls: bool, client: std::net::IpAddr) -> Option<Answer> {
        if !self.settings.fast_hits || !request.headers.iter().all(|h| harmless(h.name)) {
            return None;
        }
        let host = plain_host(request.host)?;
        let (path, query) = plain_target(request.target)?;
        let hit = self.fresh_hit(host, path, query, tls).await?;
        let encoded = self.encoded_head(&hit.object, hit.age, hit.ttl, hit.real, tls)?;
        self.admit(&hit, client, Protocol::H1)?;
        let body = if request.head { Bytes::new() } else { hit.object.body.clone() };
        self.metrics.response_bytes.inc_by(body.len() as u64);
        Some(Answer { head: encoded, body })
    }

    /// The response to an HTTP/2 request when it is a fresh HIT of a plain object:
    /// the full way's response (`represent` + `decorate`), its header map kept per
    /// object and thread until Age or the ttl change, so that a HIT costs a lookup
    /// and a map clone instead of the pipeline. Hyper adds `date` as it does to
    /// every response. `None` sends it the full way; the rules are the HTTP/1.1
    /// short way's (module docs), with the host from `:authority` (a `Host` field
    /// must say exactly the same).
    pub(crate) async fn fast_hit_h2<B>(
        &self,
        request: &http::Request<B>,
        tls: bool,
        client: std::net::IpAddr,
    ) -> Option<http::Response<Body>> {
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => return None,
        };
        if !self.settings.fast_hits
            || request.version() != Version::HTTP_2
            || !request.headers().keys().all(|name| harmless(name.as_str()))
        {
            return None;
        }
        let authority = request.uri().authority()?.as_str();
        let mut fields = request.headers().get_all(header::HOST).iter();
        if let Some(field) = fields.next()
            && (field.as_bytes() != authority.as_bytes() || fields.next().is_some())
        {
            return None;
        }
        let host = plain_host(authority)?;
        let target = request.uri().path_and_query()?.as_str();
        let (path, query) = plain_target(target)?;
        let hit = self.fresh_hit(host, path, query, tls).await?;
        let headers = self.prepared_headers(&hit, tls)?;
        self.admit(&hit, client, Protocol::H2)?;
        let body = if head { Bytes::new() } else { hit.object.body.clone() };
        self.metrics.response_bytes.inc_by(body.len() as u64);
        let mut response = http::Response::new(full(body));
        *response.headers_mut() = headers;
        Some(response)
    }

    /// The object at (`host`, `path`, `query`) when it is a fresh memory HIT the
    /// short ways may answer (module docs).
    async fn fresh_hit(&self, host: &str, path: &str, query: Option<&str>, tls: bool) -> Option<Hit> {
        let sites::Found::Site(site) = self.sites.find(host) else { return None };
        if site.signed().is_some() {
            return None;
        }
        let rule_index = site.rule_index(path);
        let rule = site.rule(rule_index);
        if rule.is_some_and(|rule| rule.bypass || rule.cors) {
            return None;
        }
        let key = site.key_of(if tls { "https" } else { "http" }, host, path, query, rule);
        let object = self.cache.memory_object(&key).await?;
        if object.head.status != StatusCode::OK || object.body.is_empty() || object.body.len() > MAX_BODY {
            return None;
        }
        if self.cache.is_pass(&key) {
            return None;
        }
        let real = SystemTime::now();
        let now = self.clock.at(real);
        let head = &object.head;
        let age = head.timing.current_age(now);
        let lifetime = sites::forced_lifetime(rule, head.status).unwrap_or(head.lifetime);
        let action = policy::evaluate(
            &Directives::default(),
            false,
            &sites::with_rule(&head.directives, rule),
            lifetime,
            age,
            head.purged.load(Ordering::Acquire),
        );
        if action != Action::Fresh {
            return None;
        }
        let ttl = ttl(lifetime, age);
        Some(Hit { object, site, age, ttl, real })
    }

    /// The last step of a short-way HIT: the client's per-client rate (checked last,
    /// as a check that passes takes the client's share; over its rate the full way
    /// answers 429), then the counters.
    fn admit(&self, hit: &Hit, client: std::net::IpAddr, protocol: Protocol) -> Option<()> {
        if let Some(limits) = &self.limits
            && limits.check_rate(client).is_err()
        {
            return None;
        }
        self.metrics.count_request(Some(&hit.site.counters), protocol, CacheResult::Hit);
        self.metrics.fast_hits.inc();
        // Under a microsecond from here to the head; observed as 0 (the smallest
        // bucket is 0.5 ms) rather than paying two more clock reads per HIT.
        self.metrics.duration.observe(0.0);
        Some(())
    }

    /// The HTTP/2 response headers of `hit`: from this thread's prepared maps when
    /// one fits.
    fn prepared_headers(&self, hit: &Hit, tls: bool) -> Option<HeaderMap> {
        let pipeline = std::ptr::from_ref(self) as usize;
        let stamp = Stamp { pipeline, date: 0, age: hit.age.as_secs(), ttl: hit.ttl, tls };
        kept(&PREPARED, &hit.object.head, stamp, || self.hit_headers(&hit.object, hit.age, hit.ttl, tls, Protocol::H2))
    }

    /// The encoded response head of a HIT of `object`, `age` old with `ttl` left, at
    /// `real` (the system clock): from this thread's encodings when one fits.
    fn encoded_head(&self, object: &Object, age: Duration, ttl: i64, real: SystemTime, tls: bool) -> Option<Bytes> {
        let date = real.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let pipeline = std::ptr::from_ref(self) as usize;
        let stamp = Stamp { pipeline, date, age: age.as_secs(), ttl, tls };
        kept(&ENCODED, &object.head, stamp, || self.encode_head(object, age, ttl, date, tls))
    }

    /// Builds a HIT's response head as the full way does (`represent`, then
    /// `decorate`) and encodes it as hyper would; `None` when hyper would write
    /// something else than the headers as they are.
    fn encode_head(&self, object: &Object, age: Duration, ttl: i64, date: u64, tls: bool) -> Option<Bytes> {
        let headers = self.hit_headers(object, age, ttl, tls, Protocol::H1)?;
        let date = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(date));
        encode_h1(&headers, object.body.len(), &date)
    }

    /// A HIT's response headers as the full way builds them (`represent`, then
    /// `decorate`); `None` if that is not a 200.
    fn hit_headers(
        &self,
        object: &Object,
        age: Duration,
        ttl: i64,
        tls: bool,
        protocol: Protocol,
    ) -> Option<HeaderMap> {
        let (request, ()) = http::Request::get("/").body(()).ok()?.into_parts();
        let status = CacheStatus::hit(CacheResult::Hit, ttl);
        let served = represent(&request, &object.head, Source::Bytes(object.body.clone()), age, status);
        let (mut response, _) = served.response.into_parts();
        if response.status != StatusCode::OK {
            return None;
        }
        self.decorate(&mut response.headers, &served.status, tls, protocol, false);
        Some(response.headers)
    }
}

/// A 200's head as hyper's HTTP/1.1 server encodes it: the status line, each header
/// line in the map's order with its name in lowercase, `date` last unless the map
/// has one. `None` for what hyper treats specially (framing headers, a
/// `Content-Length` missing or not `body_len`).
fn encode_h1(headers: &HeaderMap, body_len: usize, date: &str) -> Option<Bytes> {
    let mut out = Vec::with_capacity(64 + headers.len() * 48);
    out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    let mut length = false;
    let mut wrote_date = false;
    for (name, value) in headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING || name == header::TRAILER {
            return None;
        }
        if name == header::CONTENT_LENGTH {
            if length || value.as_bytes() != body_len.to_string().as_bytes() {
                return None;
            }
            length = true;
        }
        wrote_date |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !length {
        return None;
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_hosts_only() {
        assert_eq!(plain_host("www.cdn.test"), Some("www.cdn.test"));
        assert_eq!(plain_host("127.0.0.1:8080"), Some("127.0.0.1"));
        for odd in [
            "WWW.cdn.test",
            "x.test:",
            "x.test:99999",
            "x.test:+80",
            "[::1]:80",
            "x..test",
            ".x.test",
            "x.test.",
            "-x.test",
            "",
            "x_y.test",
            "x.test:80:80",
            "user@x.test",
        ] {
            assert_eq!(plain_host(odd), None, "{odd}");
        }
    }

    #[test]
    fn plain_targets_only() {
        assert_eq!(plain_target("/a/b.js?v=1&x=%20"), Some(("/a/b.js", Some("v=1&x=%20"))));
        assert_eq!(plain_target("/a?"), Some(("/a", Some(""))));
        assert_eq!(plain_target("/"), Some(("/", None)));
        for odd in ["/a#b", "/a b", "/a\"b", "/a{b}", "/a|b", "/a^", "/a`", "/a<b>", "/a\\b", "*", "http://x/"] {
            assert_eq!(plain_target(odd), None, "{odd}");
        }
        // What the short way takes, the URI parser takes as it is.
        for target in ["/a/b.js?v=1&x=%20", "/a?", "/(x)*!$',;=:@~+"] {
            let uri: http::Uri = target.parse().unwrap();
            let (path, query) = plain_target(target).unwrap();
            assert_eq!((uri.path(), uri.query()), (path, query), "{target}");
        }
    }

    #[test]
    fn heads_are_encoded_as_hyper_does() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "text/plain".parse().unwrap());
        headers.append("x-two", "a".parse().unwrap());
        headers.append("x-two", "b".parse().unwrap());
        headers.insert("content-length", "3".parse().unwrap());
        let head = encode_h1(&headers, 3, "Tue, 15 Nov 1994 08:12:31 GMT").unwrap();
        assert_eq!(
            &head[..],
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nx-two: a\r\nx-two: b\r\ncontent-length: 3\r\ndate: Tue, 15 Nov 1994 08:12:31 GMT\r\n\r\n"
        );
        assert!(encode_h1(&headers, 4, "d").is_none(), "a length that is not the body's");
        headers.insert("date", "Mon, 14 Nov 1994 08:12:31 GMT".parse().unwrap());
        assert!(!String::from_utf8_lossy(&encode_h1(&headers, 3, "d").unwrap()).contains("date: d"));
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        assert!(encode_h1(&headers, 3, "d").is_none());
    }
}
