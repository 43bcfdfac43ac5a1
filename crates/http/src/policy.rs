//! RFC 9111 cache policy for a shared cache: Cache-Control parsing, storability,
//! freshness lifetime, age, and what to do with a stored response for a request.
//!
//! Pure code: every function takes the time it needs as an argument, so it can be
//! tested (and fuzzed) without a clock or sockets.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, Method, StatusCode, header};

/// The value RFC 9111 §1.2.2 says to use for delta-seconds that overflow.
const DELTA_MAX: u64 = 2_147_483_648;

/// Cache-Control directives of a request or a response (RFC 9111 §5.2).
///
/// Unknown directives are ignored; for a repeated directive the first occurrence
/// counts (§4.2.1); an invalid `max-age`/`s-maxage` value makes the response stale
/// (`Some(0)`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Directives {
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
                let arg = arg.trim();
                let arg = arg.strip_prefix('"').and_then(|a| a.strip_suffix('"')).unwrap_or(arg);
                (name.trim(), Some(arg))
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
    /// `no-store` on either side.
    NoStore,
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
    /// error standing in front of a stale copy.
    pub fn remember(self) -> bool {
        !matches!(self, Self::TooLarge | Self::ErrorOverStale)
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
    if request.no_store || response.no_store {
        return Err(Reason::NoStore);
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
    let explicit = response.max_age.is_some() || response.s_maxage.is_some() || headers.contains_key(header::EXPIRES);
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
    if headers.contains_key(header::EXPIRES) {
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

/// Headers a 304 must not replace in the stored response (RFC 9111 §3.2).
pub fn keep_on_update(name: &header::HeaderName) -> bool {
    name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING || name == header::CONTENT_RANGE
}

#[cfg(test)]
mod tests;
