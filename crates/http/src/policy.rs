//! RFC 9111 cache policy for a shared cache: Cache-Control parsing, storability,
//! freshness lifetime, age, and what to do with a stored response for a request.
//!
//! Pure code: every function takes the time it needs as an argument, so it can be
//! tested (and fuzzed) without a clock or sockets.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, header};

/// The value RFC 9111 §1.2.2 says to use for delta-seconds that overflow.
const DELTA_MAX: u64 = 2_147_483_648;

/// The targeted cache-control field of RFC 9213 aimed at CDNs.
pub const CDN_CACHE_CONTROL: header::HeaderName = header::HeaderName::from_static("cdn-cache-control");
/// The surrogate field of the W3C Edge Architecture note, as Fastly and Akamai users
/// send it.
pub const SURROGATE_CONTROL: header::HeaderName = header::HeaderName::from_static("surrogate-control");

/// Which response field a shared cache took its directives from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Source {
    /// `Cache-Control` (with `Expires`).
    #[default]
    CacheControl,
    /// `CDN-Cache-Control` (RFC 9213): `Cache-Control` and `Expires` are ignored.
    CdnCacheControl,
    /// `Surrogate-Control`: `Cache-Control` and `Expires` are ignored.
    SurrogateControl,
}

/// Cache-Control directives of a request or a response (RFC 9111 §5.2).
///
/// Unknown directives are ignored; for a repeated directive the first occurrence
/// counts (§4.2.1); an invalid `max-age`/`s-maxage` value makes the response stale
/// (`Some(0)`). A directive written with whitespace around its `=` (`max-age = 5`)
/// is not the RFC's syntax: its value counts as invalid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
    /// The field these directives came from (responses; see [`Directives::response`]).
    pub source: Source,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (qualified forms are treated like the unqualified one).
    pub no_cache: bool,
    /// `private` (qualified forms too: a shared cache must not store it).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `must-understand`.
    pub must_understand: bool,
    /// `max-age`.
    pub max_age: Option<u64>,
    /// `s-maxage`.
    pub s_maxage: Option<u64>,
    /// `stale-while-revalidate` (RFC 5861).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861).
    pub stale_if_error: Option<u64>,
    /// Request `max-stale`: `Some(None)` accepts any staleness.
    pub max_stale: Option<Option<u64>>,
    /// Request `min-fresh`.
    pub min_fresh: Option<u64>,
    /// Request `only-if-cached`.
    pub only_if_cached: bool,
}

impl Directives {
    /// Parses every `Cache-Control` field line of `headers`.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut directives = Self::default();
        let mut seen: Vec<String> = Vec::new();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for (name, arg) in split_directives(text) {
                let name = name.to_ascii_lowercase();
                if seen.contains(&name) {
                    continue;
                }
                directives.apply(&name, arg);
                seen.push(name);
            }
        }
        directives
    }

    /// The directives a shared cache (the edge) obeys for a response: a valid,
    /// non-empty `CDN-Cache-Control` (RFC 9213), else a `Surrogate-Control` with at
    /// least one caching directive, else `Cache-Control`. When one of the first two
    /// is used, `Cache-Control` and `Expires` are ignored for the edge's own
    /// decisions (RFC 9213 §2.1); they still reach downstream caches.
    pub fn response(headers: &HeaderMap) -> Self {
        Self::targeted(headers).or_else(|| Self::surrogate(headers)).unwrap_or_else(|| Self::from_headers(headers))
    }

    /// `CDN-Cache-Control` (RFC 9213 §2.2): every field line joined and parsed as a
    /// Structured Fields Dictionary. `None` when absent, empty, or when it does not
    /// parse (the field is then ignored as a whole). Members whose value violates a
    /// directive's constraints (`max-age=5.0`, `max-age="5"`, `no-store=3`) are
    /// ignored one by one; parameters are ignored.
    pub fn targeted(headers: &HeaderMap) -> Option<Self> {
        let mut lines = Vec::new();
        for value in headers.get_all(CDN_CACHE_CONTROL) {
            lines.push(value.to_str().ok()?);
        }
        if lines.is_empty() {
            return None;
        }
        let joined = lines.join(", ");
        let dictionary = sfv::Parser::new(&joined).parse::<sfv::Dictionary>().ok()?;
        if dictionary.is_empty() {
            return None;
        }
        let mut directives = Self { source: Source::CdnCacheControl, ..Self::default() };
        for (name, entry) in &dictionary {
            let value = match entry {
                sfv::ListEntry::Item(item) => match &item.bare_item {
                    sfv::BareItem::Boolean(true) => Targeted::Flag,
                    sfv::BareItem::Integer(n) => match u64::try_from(i64::from(*n)) {
                        Ok(n) => Targeted::Seconds(n.min(DELTA_MAX)),
                        Err(_) => continue,
                    },
                    sfv::BareItem::String(_) => Targeted::FieldNames,
                    _ => continue,
                },
                sfv::ListEntry::InnerList(_) => Targeted::FieldNames,
            };
            directives.apply_targeted(name.as_str(), value);
        }
        Some(directives)
    }

    fn apply_targeted(&mut self, name: &str, value: Targeted) {
        let qualified = matches!(value, Targeted::Flag | Targeted::FieldNames);
        let flag = matches!(value, Targeted::Flag);
        let seconds = match value {
            Targeted::Seconds(n) => Some(n),
            _ => None,
        };
        match name {
            "no-store" if flag => self.no_store = true,
            "no-cache" if qualified => self.no_cache = true,
            "private" if qualified => self.private = true,
            "public" if flag => self.public = true,
            "must-revalidate" if flag => self.must_revalidate = true,
            "proxy-revalidate" if flag => self.proxy_revalidate = true,
            "must-understand" if flag => self.must_understand = true,
            "max-age" if seconds.is_some() => self.max_age = seconds,
            "s-maxage" if seconds.is_some() => self.s_maxage = seconds,
            "stale-while-revalidate" if seconds.is_some() => self.stale_while_revalidate = seconds,
            "stale-if-error" if seconds.is_some() => self.stale_if_error = seconds,
            _ => {}
        }
    }

    /// `Surrogate-Control` (W3C Edge Architecture 1.0), parsed like Cache-Control:
    /// `max-age=N` (and `max-age=N+M`, `M` being a `stale-if-error` window),
    /// `no-store`, `no-store-remote` (the edge is a remote surrogate: not stored) and
    /// the Cache-Control response directives; `content="ESI/1.0"` and other
    /// unknown directives are ignored. `None` when it names no caching directive.
    pub fn surrogate(headers: &HeaderMap) -> Option<Self> {
        let mut directives = Self { source: Source::SurrogateControl, ..Self::default() };
        let mut seen: Vec<String> = Vec::new();
        for value in headers.get_all(SURROGATE_CONTROL) {
            let Ok(text) = value.to_str() else { continue };
            for (name, arg) in split_directives(text) {
                let name = match name.to_ascii_lowercase().as_str() {
                    "no-store-remote" => "no-store".to_string(),
                    name => name.to_string(),
                };
                if seen.contains(&name) || !RESPONSE_DIRECTIVES.contains(&name.as_str()) {
                    continue;
                }
                match (name.as_str(), arg.and_then(|a| a.split_once('+'))) {
                    ("max-age", Some((fresh, stale))) => {
                        directives.apply("max-age", Some(fresh));
                        if !seen.iter().any(|s| s == "stale-if-error") {
                            directives.apply("stale-if-error", Some(stale));
                            seen.push("stale-if-error".to_string());
                        }
                    }
                    _ => directives.apply(&name, arg),
                }
                seen.push(name);
            }
        }
        (!seen.is_empty()).then_some(directives)
    }

    /// Whether `Expires` counts for these directives: only beside `Cache-Control`
    /// (RFC 9213 §2.1: a targeted field replaces both).
    pub fn expires_applies(&self) -> bool {
        self.source == Source::CacheControl
    }

    /// Parses one Cache-Control value (for tests and fuzzing).
    pub fn parse(text: &str) -> Self {
        let mut headers = HeaderMap::new();
        if let Ok(value) = text.parse() {
            headers.insert(header::CACHE_CONTROL, value);
        }
        Self::from_headers(&headers)
    }

    fn apply(&mut self, name: &str, arg: Option<&str>) {
        // An argument that is not delta-seconds: for max-age/s-maxage the response
        // is treated as stale; for the others the directive is ignored.
        let seconds = || arg.and_then(delta_seconds);
        match name {
            "no-store" => self.no_store = true,
            "no-cache" => self.no_cache = true,
            "private" => self.private = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "must-understand" => self.must_understand = true,
            "only-if-cached" => self.only_if_cached = true,
            "max-age" => self.max_age = Some(seconds().unwrap_or(0)),
            "s-maxage" => self.s_maxage = Some(seconds().unwrap_or(0)),
            "stale-while-revalidate" => self.stale_while_revalidate = seconds(),
            "stale-if-error" => self.stale_if_error = seconds(),
            "min-fresh" => self.min_fresh = seconds(),
            "max-stale" => {
                self.max_stale = match arg {
                    None => Some(None),
                    Some(arg) => delta_seconds(arg).map(Some),
                }
            }
            _ => {}
        }
    }
}

/// A targeted field member's value, by the shape the directive allows.
#[derive(Clone, Copy)]
enum Targeted {
    /// Boolean true (a bare key).
    Flag,
    /// A non-negative Integer.
    Seconds(u64),
    /// A String or an Inner List (field names of qualified `private`/`no-cache`).
    FieldNames,
}

/// The response directives of Cache-Control a surrogate field may use.
const RESPONSE_DIRECTIVES: [&str; 11] = [
    "no-store",
    "no-cache",
    "private",
    "public",
    "must-revalidate",
    "proxy-revalidate",
    "max-age",
    "s-maxage",
    "stale-while-revalidate",
    "stale-if-error",
    "must-understand",
];

/// Splits a Cache-Control value into `(name, argument)` pairs, honouring quoted
/// strings (which may contain commas).
fn split_directives(text: &str) -> Vec<(&str, Option<&str>)> {
    fn piece(part: &str) -> Option<(&str, Option<&str>)> {
        let part = part.trim();
        if part.is_empty() {
            return None;
        }
        Some(match part.split_once('=') {
            None => (part, None),
            Some((name, arg)) => {
                // `cache-directive = token [ "=" ( token / quoted-string ) ]`: no
                // whitespace around "=". `max-age = 5` keeps its name but its value
                // is invalid (so a max-age written that way means stale).
                if name.ends_with(char::is_whitespace) || arg.starts_with(char::is_whitespace) {
                    return Some((name.trim_end(), Some("")));
                }
                let arg = arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')).unwrap_or(arg);
                (name, Some(arg))
            }
        })
    }
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, &b) in bytes.iter().enumerate() {
        if in_quotes {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quotes = false;
            }
        } else if b == b'"' {
            in_quotes = true;
        } else if b == b',' {
            out.extend(piece(&text[start..i]));
            start = i + 1;
        }
    }
    out.extend(piece(&text[start..]));
    out
}

/// delta-seconds: digits only; overflow saturates at 2^31 (RFC 9111 §1.2.2).
fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse::<u64>().map_or(DELTA_MAX, |v| v.min(DELTA_MAX)))
}

/// An HTTP date header, or `None` when absent or invalid.
pub fn date_header(headers: &HeaderMap, name: &header::HeaderName) -> Option<SystemTime> {
    headers.get(name)?.to_str().ok().and_then(|v| httpdate::parse_http_date(v.trim()).ok())
}

/// Status codes a cache may give a heuristic lifetime (RFC 9110 §15.1).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501)
}

/// Settings of the policy that operators may change.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Cap of a heuristic lifetime.
    pub heuristic_max: Duration,
    /// Fraction of (Date − Last-Modified) used as a heuristic lifetime.
    pub heuristic_fraction: f64,
    /// Store responses carrying `Set-Cookie`.
    pub store_set_cookie: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self { heuristic_max: Duration::from_secs(86_400), heuristic_fraction: 0.1, store_set_cookie: false }
    }
}

/// Why a response is not stored (for logs and `Cache-Status`'s `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Not a GET.
    Method,
    /// A status a cache does not store (1xx, 206, 304).
    Status,
    /// `no-store` in the response.
    NoStore,
    /// `no-store` in the request: this response is not stored, but the URL is not
    /// uncacheable for the next client.
    RequestNoStore,
    /// `private`.
    Private,
    /// The request had `Authorization` and the response did not allow sharing it.
    Authorization,
    /// `Vary: *` (or an unusable Vary).
    VaryStar,
    /// `Set-Cookie`, and the edge does not store such responses.
    SetCookie,
    /// Neither explicit nor heuristic freshness.
    NoFreshness,
    /// Larger than the largest object the cache keeps.
    TooLarge,
    /// A server error while a stored response may still serve stale (it must not
    /// replace that response).
    ErrorOverStale,
}

impl Reason {
    /// The reason as logs and `Cache-Status` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Method => "method",
            Self::Status => "status",
            Self::NoStore => "no-store",
            Self::RequestNoStore => "request-no-store",
            Self::Private => "private",
            Self::Authorization => "authorization",
            Self::VaryStar => "vary-star",
            Self::SetCookie => "set-cookie",
            Self::NoFreshness => "no-freshness",
            Self::TooLarge => "too-large",
            Self::ErrorOverStale => "error-over-stale",
        }
    }

    /// Whether the URL itself is uncacheable for a while ("hit-for-pass"): requests
    /// for it then skip coalescing. Not for a response that was only too large or an
    /// error standing in front of a stale copy, nor for a request's own `no-store`.
    pub fn remember(self) -> bool {
        !matches!(self, Self::TooLarge | Self::ErrorOverStale | Self::RequestNoStore)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a response fetched to fill the cache is kept: [`storable`], no larger
/// than `max_object` (by its announced length; the body is checked again as it
/// arrives), and never a server error over a stored response that may still serve
/// stale (`replacing_stale`: the fill revalidates such a response).
pub fn keep(
    storable: Result<(), Reason>,
    status: StatusCode,
    content_length: Option<u64>,
    max_object: u64,
    replacing_stale: bool,
) -> Result<(), Reason> {
    storable?;
    if content_length.is_some_and(|len| len > max_object) {
        return Err(Reason::TooLarge);
    }
    if replacing_stale && status.is_server_error() {
        return Err(Reason::ErrorOverStale);
    }
    Ok(())
}

/// Whether a shared cache may store `status`/`headers` received for a request with
/// `method`, `request` directives and `authorization` (RFC 9111 §3, §3.5).
pub fn storable(
    method: &Method,
    request: &Directives,
    authorization: bool,
    status: StatusCode,
    headers: &HeaderMap,
    response: &Directives,
    settings: &Settings,
) -> Result<(), Reason> {
    if method != Method::GET {
        return Err(Reason::Method);
    }
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Err(Reason::Status);
    }
    if response.no_store {
        return Err(Reason::NoStore);
    }
    if request.no_store {
        return Err(Reason::RequestNoStore);
    }
    if response.private {
        return Err(Reason::Private);
    }
    if authorization && !(response.public || response.must_revalidate || response.s_maxage.is_some()) {
        return Err(Reason::Authorization);
    }
    if vary_names(headers).is_none() {
        return Err(Reason::VaryStar);
    }
    if headers.contains_key(header::SET_COOKIE) && !settings.store_set_cookie {
        return Err(Reason::SetCookie);
    }
    let explicit = response.max_age.is_some()
        || response.s_maxage.is_some()
        || (response.expires_applies() && headers.contains_key(header::EXPIRES));
    if explicit || response.public || heuristically_cacheable(status) { Ok(()) } else { Err(Reason::NoFreshness) }
}

/// The header names in `Vary`, lowercased; `None` for `Vary: *` (or an invalid name).
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<header::HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        let Ok(text) = value.to_str() else { return None };
        for name in text.split(',') {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            if name == "*" {
                return None;
            }
            match header::HeaderName::from_bytes(name.as_bytes()) {
                Ok(name) if !names.contains(&name) => names.push(name),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
    Some(names)
}

/// The freshness lifetime of a stored response (RFC 9111 §4.2.1), shared cache.
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    response: &Directives,
    response_time: SystemTime,
    settings: &Settings,
) -> Duration {
    if let Some(s) = response.s_maxage {
        return Duration::from_secs(s);
    }
    if let Some(s) = response.max_age {
        return Duration::from_secs(s);
    }
    let date = date_header(headers, &header::DATE).unwrap_or(response_time);
    if response.expires_applies() && headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired.
        return date_header(headers, &header::EXPIRES)
            .and_then(|expires| expires.duration_since(date).ok())
            .unwrap_or_default();
    }
    if (heuristically_cacheable(status) || response.public)
        && let Some(modified) = date_header(headers, &header::LAST_MODIFIED)
        && let Ok(since) = date.duration_since(modified)
    {
        return since.mul_f64(settings.heuristic_fraction).min(settings.heuristic_max);
    }
    Duration::ZERO
}

/// Times recorded when a response was received, for the age calculation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// When the request that got the response was sent.
    pub request_time: SystemTime,
    /// When the response was received.
    pub response_time: SystemTime,
    /// `corrected_initial_age` of RFC 9111 §4.2.3, computed at receipt.
    pub initial_age: Duration,
}

impl Timing {
    /// Computes the corrected initial age from the response's `Date` and `Age`.
    pub fn new(headers: &HeaderMap, request_time: SystemTime, response_time: SystemTime) -> Self {
        let date = date_header(headers, &header::DATE).unwrap_or(response_time);
        let apparent_age = response_time.duration_since(date).unwrap_or_default();
        let age_value = headers
            .get(header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| delta_seconds(v.trim()))
            .map_or(Duration::ZERO, Duration::from_secs);
        let response_delay = response_time.duration_since(request_time).unwrap_or_default();
        let corrected_age_value = age_value + response_delay;
        Self { request_time, response_time, initial_age: apparent_age.max(corrected_age_value) }
    }

    /// `current_age` at `now` (RFC 9111 §4.2.3).
    pub fn current_age(&self, now: SystemTime) -> Duration {
        self.initial_age + now.duration_since(self.response_time).unwrap_or_default()
    }
}

/// What to do with a stored response for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Serve it: fresh enough for this request.
    Fresh,
    /// Serve it stale because the client allows it (`max-stale`).
    StaleAllowed,
    /// Serve it stale and refresh it in the background (`stale-while-revalidate`).
    StaleWhileRevalidate,
    /// Validate it with the origin before use.
    Revalidate,
}

/// Decides what to do with a stored response of `lifetime` and `age` given both
/// sides' directives (RFC 9111 §4, §5.2; RFC 5861). A response marked stale by a
/// soft purge (`invalidated`) is always revalidated before use.
pub fn evaluate(
    request: &Directives,
    request_pragma_no_cache: bool,
    response: &Directives,
    lifetime: Duration,
    age: Duration,
    invalidated: bool,
) -> Action {
    if invalidated {
        return Action::Revalidate;
    }
    // The caller passes `Pragma: no-cache` only when the request has no Cache-Control
    // (RFC 9111 §5.4: Pragma is ignored when Cache-Control is present).
    let no_cache_request = request.no_cache || request_pragma_no_cache;
    if no_cache_request || response.no_cache {
        return Action::Revalidate;
    }
    if request.max_age.is_some_and(|max| age > Duration::from_secs(max)) {
        return Action::Revalidate;
    }
    let fresh = age < lifetime;
    if fresh {
        let remaining = lifetime - age;
        if request.min_fresh.is_some_and(|min| remaining < Duration::from_secs(min)) {
            return Action::Revalidate;
        }
        return Action::Fresh;
    }
    if response.must_revalidate || response.proxy_revalidate || response.s_maxage.is_some() {
        return Action::Revalidate;
    }
    let staleness = age - lifetime;
    match request.max_stale {
        Some(None) => return Action::StaleAllowed,
        Some(Some(max)) if staleness <= Duration::from_secs(max) => return Action::StaleAllowed,
        _ => {}
    }
    if response.stale_while_revalidate.is_some_and(|swr| staleness <= Duration::from_secs(swr)) {
        return Action::StaleWhileRevalidate;
    }
    Action::Revalidate
}

/// Whether a stale response may be served because the origin failed
/// (`stale-if-error`, RFC 5861 §4), from either side's directive.
pub fn stale_if_error(request: &Directives, response: &Directives, lifetime: Duration, age: Duration) -> bool {
    if response.must_revalidate || response.proxy_revalidate || response.s_maxage.is_some() || response.no_cache {
        return false;
    }
    let staleness = age.saturating_sub(lifetime);
    let window = response.stale_if_error.max(request.stale_if_error);
    window.is_some_and(|w| staleness <= Duration::from_secs(w))
}

/// Headers of a 304 (or of a 200 to a HEAD) that must not replace or join the
/// stored response's (RFC 9111 §3.2): `Content-Length` (the stored body's framing
/// stays), `Transfer-Encoding`, `Content-Range` (a 304 says nothing about a part,
/// and the stored response is whole), and `Set-Cookie` when the edge does not store
/// responses carrying it (it would be handed to every later client).
pub fn keep_on_update(name: &header::HeaderName, settings: &Settings) -> bool {
    name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::CONTENT_RANGE
        || (name == header::SET_COOKIE && !settings.store_set_cookie)
}

/// What a 200 to a HEAD the edge forwarded does to the stored GET response for the
/// same request (RFC 9111 §4.3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadUpdate {
    /// The validators agree: update the stored headers as from a 304 (§4.3.4).
    Update,
    /// The representation changed (an `ETag` or `Last-Modified` the stored
    /// response does not have, or another `Content-Length`): drop the stored one.
    Invalidate,
}

/// Compares a HEAD response's `ETag`, `Last-Modified` and `Content-Length` with the
/// stored GET response's (RFC 9111 §4.3.5).
pub fn head_update(stored: &HeaderMap, head: &HeaderMap) -> HeadUpdate {
    let differs = |name: &header::HeaderName| head.get(name).is_some_and(|value| stored.get(name) != Some(value));
    let length_differs = stored.contains_key(header::CONTENT_LENGTH) && differs(&header::CONTENT_LENGTH);
    if differs(&header::ETAG) || differs(&header::LAST_MODIFIED) || length_differs {
        HeadUpdate::Invalidate
    } else {
        HeadUpdate::Update
    }
}

#[cfg(test)]
mod tests;
