//! What the cache did for a response, typed: rendered once as `Cache-Status`
//! (RFC 9211, cache name `cdn`) and `X-Cache`, and counted in the metrics.

use std::fmt;

use http::HeaderValue;

use crate::metrics::CacheResult;

/// Why the request went forward to the origin (RFC 9211 §2.2 `fwd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fwd {
    /// The cache was not used (uncacheable method or key).
    Bypass,
    /// Nothing stored for the key.
    Miss,
    /// Something stored, but it could not be used for this request.
    UriMiss,
    /// A stored response had to be validated (or could not be).
    Stale,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Self::Bypass => "bypass",
            Self::Miss => "miss",
            Self::UriMiss => "uri-miss",
            Self::Stale => "stale",
        }
    }
}

/// Extra detail (RFC 9211 §2.8 `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detail {
    /// Served stale because the client allowed it.
    MaxStale,
    /// Served stale while the cache refreshes it.
    StaleWhileRevalidate,
    /// Served stale because the origin failed.
    StaleIfError,
    /// Stored in slices.
    Sliced,
    /// Read from the disk tier.
    Disk,
    /// The edge answered with this error itself.
    Error(u16),
}

impl Detail {
    /// The token (an error's status is written as its number instead).
    fn as_str(self) -> &'static str {
        match self {
            Self::MaxStale => "max-stale",
            Self::StaleWhileRevalidate => "stale-while-revalidate",
            Self::StaleIfError => "stale-if-error",
            Self::Sliced => "sliced",
            Self::Disk => "disk",
            Self::Error(_) => "error",
        }
    }
}

/// The cache's account of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheStatus {
    /// For `X-Cache` and `cdn_requests_total{cache}`.
    pub(crate) result: CacheResult,
    /// Served from storage without going forward.
    pub(crate) hit: bool,
    /// Why it went forward.
    pub(crate) fwd: Option<Fwd>,
    /// The origin's status, when it went forward.
    pub(crate) fwd_status: Option<u16>,
    /// Remaining freshness in seconds (negative when stale).
    pub(crate) ttl: Option<i64>,
    /// The origin's response was stored.
    pub(crate) stored: bool,
    /// Extra detail.
    pub(crate) detail: Option<Detail>,
}

impl CacheStatus {
    const EMPTY: Self = Self {
        result: CacheResult::Miss,
        hit: false,
        fwd: None,
        fwd_status: None,
        ttl: None,
        stored: false,
        detail: None,
    };

    /// Served from the cache (`result` HIT or STALE) with `ttl` left.
    pub(crate) fn hit(result: CacheResult, ttl: i64) -> Self {
        Self { result, hit: true, ttl: Some(ttl), ..Self::EMPTY }
    }

    /// Went forward for `fwd` and got `status` from the origin.
    pub(crate) fn forward(result: CacheResult, fwd: Fwd, status: u16) -> Self {
        Self { result, fwd: Some(fwd), fwd_status: Some(status), ..Self::EMPTY }
    }

    /// Not even sent forward: the edge answered `status` itself.
    pub(crate) fn error(result: CacheResult, status: u16) -> Self {
        Self { result, fwd: Some(Fwd::Miss), detail: Some(Detail::Error(status)), ..Self::EMPTY }
    }

    /// The cache was bypassed (`fwd=bypass`), with the origin's status when known.
    pub(crate) fn bypass(status: Option<u16>) -> Self {
        Self { result: CacheResult::Bypass, fwd: Some(Fwd::Bypass), fwd_status: status, ..Self::EMPTY }
    }

    /// With `detail`.
    pub(crate) fn with_detail(self, detail: Detail) -> Self {
        Self { detail: Some(detail), ..self }
    }

    /// With `ttl`.
    pub(crate) fn with_ttl(self, ttl: i64) -> Self {
        Self { ttl: Some(ttl), ..self }
    }

    /// Marked `stored`.
    pub(crate) fn stored(self) -> Self {
        Self { stored: true, ..self }
    }

    /// The `Cache-Status` field value, written without the formatting machinery
    /// (it is built for every response).
    pub(crate) fn header_value(&self) -> HeaderValue {
        let mut text = String::with_capacity(64);
        self.render(&mut text);
        // The String's buffer becomes the value's (no second copy).
        HeaderValue::from_maybe_shared(bytes::Bytes::from(text)).unwrap_or_else(|_| HeaderValue::from_static("cdn"))
    }

    fn render(&self, out: &mut String) {
        out.push_str("cdn");
        if self.hit {
            out.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            out.push_str("; fwd=");
            out.push_str(fwd.as_str());
        }
        if let Some(status) = self.fwd_status {
            out.push_str("; fwd-status=");
            push_int(out, i64::from(status));
        }
        if let Some(ttl) = self.ttl {
            out.push_str("; ttl=");
            push_int(out, ttl);
        }
        if self.stored {
            out.push_str("; stored");
        }
        if let Some(detail) = self.detail {
            out.push_str("; detail=");
            match detail {
                Detail::Error(status) => push_int(out, i64::from(status)),
                other => out.push_str(other.as_str()),
            }
        }
    }
}

/// Appends `n` in decimal.
fn push_int(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in &digits[at..] {
        out.push(char::from(digit));
    }
}

impl fmt::Display for CacheStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = String::with_capacity(64);
        self.render(&mut text);
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rfc_9211() {
        assert_eq!(CacheStatus::hit(CacheResult::Hit, 42).to_string(), "cdn; hit; ttl=42");
        assert_eq!(
            CacheStatus::hit(CacheResult::Stale, -3).with_detail(Detail::StaleWhileRevalidate).to_string(),
            "cdn; hit; ttl=-3; detail=stale-while-revalidate"
        );
        assert_eq!(
            CacheStatus::forward(CacheResult::Miss, Fwd::Miss, 200).stored().to_string(),
            "cdn; fwd=miss; fwd-status=200; stored"
        );
        assert_eq!(
            CacheStatus::forward(CacheResult::Revalidated, Fwd::Stale, 304).with_ttl(60).to_string(),
            "cdn; fwd=stale; fwd-status=304; ttl=60"
        );
        assert_eq!(CacheStatus::bypass(None).to_string(), "cdn; fwd=bypass");
        assert_eq!(CacheStatus::bypass(Some(201)).to_string(), "cdn; fwd=bypass; fwd-status=201");
        assert_eq!(CacheStatus::error(CacheResult::Miss, 504).to_string(), "cdn; fwd=miss; detail=504");
        assert_eq!(CacheStatus::bypass(None).header_value(), "cdn; fwd=bypass");
        assert_eq!(CacheStatus::hit(CacheResult::Hit, i64::MIN).to_string(), format!("cdn; hit; ttl={}", i64::MIN));
        assert_eq!(CacheStatus::hit(CacheResult::Hit, 0).to_string(), "cdn; hit; ttl=0");
    }
}
