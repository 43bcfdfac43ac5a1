//! Byte ranges (RFC 9110 §14): parsing `Range`, resolving it against a length,
//! framing `multipart/byteranges`, and [`plan`]: what to answer a GET or HEAD of a
//! representation with (200, 206, multipart 206 or 416, `If-Range` included) and the
//! framing headers that go with it. Pure code — no I/O — shared by the origin and the
//! edge, which then build the body from a file and from the cache respectively.

use std::{fmt::Write as _, ops::Range};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use crate::conditional::{self, Validators};

/// Most ranges answered in one multipart response; more is treated as abuse and the
/// whole representation is sent instead (RFC 9110 §14.2 lets a server ignore Range).
pub const MAX_RANGES: usize = 16;

/// One `byte-range-spec` or `suffix-byte-range-spec` as written by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// `first-last` (inclusive) or `first-` when `last` is `None`.
    From {
        /// First byte position.
        first: u64,
        /// Last byte position, inclusive.
        last: Option<u64>,
    },
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// Parses a `Range` header value. `None` when it is not a syntactically valid
/// `bytes=` range set (the caller then ignores the header, as RFC 9110 asks).
pub fn parse(value: &str) -> Option<Vec<Spec>> {
    let value = value.trim();
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    for part in set.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue; // RFC 9110 list syntax allows empty elements
        }
        let (first, last) = part.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        let spec = if first.is_empty() {
            Spec::Suffix(digits(last)?)
        } else {
            let first = digits(first)?;
            let last = if last.is_empty() { None } else { Some(digits(last)?) };
            if last.is_some_and(|last| last < first) {
                return None;
            }
            Spec::From { first, last }
        };
        specs.push(spec);
    }
    (!specs.is_empty()).then_some(specs)
}

fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// What to send for a Range request on a representation of a known length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// Send the whole representation with 200 (no usable Range).
    Full,
    /// Send these ranges with 206 (one range: a single part; more: multipart).
    Partial(Vec<Range<u64>>),
    /// No range overlaps the representation: 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Resolves parsed specs against `len` bytes.
///
/// Overlapping or adjacent ranges are coalesced (RFC 9110 §14.3 allows it and it
/// defeats overlapping-range amplification); more than [`MAX_RANGES`] ranges, or a
/// set that after coalescing covers everything in several parts, yields [`Resolved::Full`].
pub fn resolve(specs: &[Spec], len: u64) -> Resolved {
    if specs.len() > MAX_RANGES {
        return Resolved::Full;
    }
    let mut ranges: Vec<Range<u64>> = specs.iter().filter_map(|spec| satisfiable(*spec, len)).collect();
    if ranges.is_empty() {
        return Resolved::Unsatisfiable;
    }
    if ranges.len() > 1 {
        let mut sorted = ranges.clone();
        sorted.sort_by_key(|r| r.start);
        let overlapping = sorted.windows(2).any(|w| w[1].start <= w[0].end);
        if overlapping {
            let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
            for range in sorted {
                match merged.last_mut() {
                    Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                    _ => merged.push(range),
                }
            }
            ranges = merged;
        }
    }
    Resolved::Partial(ranges)
}

fn satisfiable(spec: Spec, len: u64) -> Option<Range<u64>> {
    match spec {
        Spec::From { first, last } => {
            if first >= len {
                return None;
            }
            let end = last.map_or(len, |last| last.saturating_add(1).min(len));
            Some(first..end)
        }
        // A suffix of an empty representation selects nothing (RFC 9110 §14.1.1).
        Spec::Suffix(0) => None,
        Spec::Suffix(_) if len == 0 => None,
        Spec::Suffix(n) => Some(len.saturating_sub(n)..len),
    }
}

/// `Content-Range` value for a part.
pub fn content_range(range: &Range<u64>, len: u64) -> String {
    format!("bytes {}-{}/{}", range.start, range.end.saturating_sub(1), len)
}

/// `Content-Range` value of a 416.
pub fn unsatisfied_range(len: u64) -> String {
    format!("bytes */{len}")
}

/// The framing of a `multipart/byteranges` body: the part headers that precede each
/// range and the closing delimiter. The body is, in order, `heads[i]` followed by the
/// bytes of `ranges[i]` for each part, then `tail`.
#[derive(Debug, Clone)]
pub struct Multipart {
    /// `multipart/byteranges; boundary=...`, for the response's Content-Type.
    pub content_type: String,
    /// One head per range.
    pub heads: Vec<Bytes>,
    /// The closing delimiter.
    pub tail: Bytes,
    /// Total body length.
    pub content_length: u64,
}

impl Multipart {
    /// Frames `ranges` of a representation of `len` bytes whose type is `part_type`.
    pub fn new(ranges: &[Range<u64>], len: u64, part_type: Option<&str>, boundary: &str) -> Self {
        let mut heads = Vec::with_capacity(ranges.len());
        let mut total = 0u64;
        for (i, range) in ranges.iter().enumerate() {
            let mut head = String::with_capacity(96);
            if i > 0 {
                head.push_str("\r\n");
            }
            let _ = write!(head, "--{boundary}\r\n");
            if let Some(part_type) = part_type {
                let _ = write!(head, "Content-Type: {part_type}\r\n");
            }
            let _ = write!(head, "Content-Range: {}\r\n\r\n", content_range(range, len));
            total += head.len() as u64 + (range.end - range.start);
            heads.push(Bytes::from(head));
        }
        let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
        total += tail.len() as u64;
        Self { content_type: format!("multipart/byteranges; boundary={boundary}"), heads, tail, content_length: total }
    }
}

/// What to send for a GET or HEAD of a representation, once its preconditions
/// passed ([`conditional::evaluate`]).
#[derive(Debug, Clone)]
pub enum Plan {
    /// 200 with the whole representation: no Range, a Range that is ignored (not a
    /// GET, bad syntax, too many ranges) or an `If-Range` that does not hold.
    Full {
        /// The representation's length.
        len: u64,
    },
    /// 206 with one part.
    Single {
        /// The bytes to send.
        range: Range<u64>,
        /// The representation's length.
        len: u64,
    },
    /// 206 `multipart/byteranges`: the body is, for each range in order, its head
    /// from `framing` then its bytes, then `framing.tail`.
    Multipart {
        /// The parts' ranges, in the order they are sent.
        ranges: Vec<Range<u64>>,
        /// Part heads, closing delimiter, Content-Type and length.
        framing: Multipart,
    },
    /// 416: no range overlaps the representation.
    Unsatisfiable {
        /// The representation's length.
        len: u64,
    },
}

/// Decides what a `method` request with `request` headers gets of a representation
/// of `len` bytes with `validators`: a Range applies to GET only (RFC 9110 §14.2),
/// when `If-Range` is absent or holds (§13.1.5) and the header parses; otherwise the
/// whole representation. `part_type` gives the representation's Content-Type, which
/// each multipart part repeats; it and `boundary` are called only for a multipart
/// answer (a request without Range costs one header lookup).
pub fn plan<'t>(
    method: &Method,
    request: &HeaderMap,
    len: u64,
    validators: Validators<'_>,
    part_type: impl FnOnce() -> Option<&'t str>,
    boundary: impl FnOnce() -> String,
) -> Plan {
    if method != Method::GET {
        return Plan::Full { len };
    }
    let Some(value) = request.get(header::RANGE) else { return Plan::Full { len } };
    if request.get(header::IF_RANGE).is_some_and(|v| !conditional::if_range_holds(v, validators)) {
        return Plan::Full { len };
    }
    let Some(specs) = value.to_str().ok().and_then(parse) else { return Plan::Full { len } };
    match resolve(&specs, len) {
        Resolved::Full => Plan::Full { len },
        Resolved::Unsatisfiable => Plan::Unsatisfiable { len },
        Resolved::Partial(mut ranges) if ranges.len() == 1 => Plan::Single { range: ranges.remove(0), len },
        Resolved::Partial(ranges) => {
            let framing = Multipart::new(&ranges, len, part_type(), &boundary());
            Plan::Multipart { ranges, framing }
        }
    }
}

impl Plan {
    /// The response status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Full { .. } => StatusCode::OK,
            Self::Single { .. } | Self::Multipart { .. } => StatusCode::PARTIAL_CONTENT,
            Self::Unsatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        }
    }

    /// Sets the framing fields of the response: `Accept-Ranges: bytes`, and
    /// `Content-Length`, `Content-Range` and (multipart) `Content-Type` as the plan
    /// needs them; a `Content-Range` that does not belong is removed. A 416's body
    /// is the server's choice, so its `Content-Length` is left to the caller.
    pub fn set_headers(&self, headers: &mut HeaderMap) {
        headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        let content_range = match self {
            Self::Full { len } => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(*len));
                None
            }
            Self::Single { range, len } => {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(range.end - range.start));
                Some(content_range(range, *len))
            }
            Self::Multipart { framing, .. } => {
                if let Ok(value) = HeaderValue::try_from(framing.content_type.as_str()) {
                    headers.insert(header::CONTENT_TYPE, value);
                }
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(framing.content_length));
                None
            }
            Self::Unsatisfiable { len } => Some(unsatisfied_range(*len)),
        };
        match content_range.and_then(|value| HeaderValue::try_from(value).ok()) {
            Some(value) => headers.insert(header::CONTENT_RANGE, value),
            None => headers.remove(header::CONTENT_RANGE),
        };
    }
}

/// A boundary unlikely to appear in content: derived from a per-process counter and
/// the clock (content is never chosen to collide with it by an attacker who cannot
/// predict both).
pub fn boundary() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mixed = (t ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("cdn-{mixed:016x}{n:x}")
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse("bytes=0-99"), Some(vec![Spec::From { first: 0, last: Some(99) }]));
        assert_eq!(parse("bytes=-100"), Some(vec![Spec::Suffix(100)]));
        assert_eq!(parse("bytes=100-"), Some(vec![Spec::From { first: 100, last: None }]));
        assert_eq!(
            parse("Bytes = 1-2, 5-"),
            Some(vec![Spec::From { first: 1, last: Some(2) }, Spec::From { first: 5, last: None }])
        );
        for bad in [
            "bytes=",
            "bytes=a-b",
            "bytes=5-1",
            "items=0-1",
            "bytes=--1",
            "0-1",
            "bytes=1",
            "bytes=-",
            "bytes=+1-2",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves_against_a_length() {
        let r = |s| resolve(&parse(s).unwrap(), 1000);
        assert_eq!(r("bytes=0-99"), Resolved::Partial(vec![0..100]));
        assert_eq!(r("bytes=-100"), Resolved::Partial(vec![900..1000]));
        assert_eq!(r("bytes=100-"), Resolved::Partial(vec![100..1000]));
        assert_eq!(r("bytes=990-2000"), Resolved::Partial(vec![990..1000]));
        assert_eq!(r("bytes=-5000"), Resolved::Partial(vec![0..1000]));
        assert_eq!(r("bytes=1000-"), Resolved::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Resolved::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-9"), Resolved::Partial(vec![0..2, 5..10]));
        assert_eq!(r("bytes=0-10,5-20"), Resolved::Partial(vec![0..21]));
        assert_eq!(r("bytes=0-1,2000-3000"), Resolved::Partial(vec![0..2]));
        let many =
            format!("bytes={}", (0..20).map(|i| format!("{}-{}", i * 10, i * 10 + 1)).collect::<Vec<_>>().join(","));
        assert_eq!(r(&many), Resolved::Full);
        assert_eq!(resolve(&parse("bytes=0-").unwrap(), 0), Resolved::Unsatisfiable);
        assert_eq!(resolve(&parse("bytes=-1").unwrap(), 0), Resolved::Unsatisfiable);
    }

    #[test]
    fn multipart_length_matches_the_body() {
        let ranges = vec![0..2, 5..10];
        let m = Multipart::new(&ranges, 100, Some("video/mp4"), "XYZ");
        let mut body = Vec::new();
        for (head, range) in m.heads.iter().zip(&ranges) {
            body.extend_from_slice(head);
            body.extend(std::iter::repeat_n(b'a', (range.end - range.start) as usize));
        }
        body.extend_from_slice(&m.tail);
        assert_eq!(body.len() as u64, m.content_length);
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.starts_with("--XYZ\r\nContent-Type: video/mp4\r\nContent-Range: bytes 0-1/100\r\n\r\naa\r\n--XYZ\r\n")
        );
        assert!(text.ends_with("aaaaa\r\n--XYZ--\r\n"));
    }

    fn request(headers: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn plan_for(method: Method, headers: &[(&'static str, &str)]) -> Plan {
        let validators = Validators::new(Some("\"e1\""), None);
        plan(&method, &request(headers), 1000, validators, || Some("video/mp4"), || "XYZ".into())
    }

    fn framed(plan: &Plan) -> HeaderMap {
        let mut headers = request(&[("content-type", "video/mp4"), ("content-range", "bytes 0-1/2")]);
        plan.set_headers(&mut headers);
        headers
    }

    #[test]
    fn plans_the_answer_to_a_request() {
        let full = plan_for(Method::GET, &[]);
        assert!(matches!(full, Plan::Full { len: 1000 }));
        assert_eq!(full.status(), StatusCode::OK);
        let headers = framed(&full);
        assert_eq!(headers["content-length"], "1000");
        assert_eq!(headers["accept-ranges"], "bytes");
        assert_eq!(headers["content-type"], "video/mp4");
        assert!(!headers.contains_key("content-range"));

        let single = plan_for(Method::GET, &[("range", "bytes=10-19")]);
        assert!(matches!(&single, Plan::Single { range, len: 1000 } if *range == (10..20)));
        assert_eq!(single.status(), StatusCode::PARTIAL_CONTENT);
        let headers = framed(&single);
        assert_eq!(headers["content-length"], "10");
        assert_eq!(headers["content-range"], "bytes 10-19/1000");

        let multi = plan_for(Method::GET, &[("range", "bytes=0-1,10-11")]);
        let Plan::Multipart { ranges, framing } = &multi else { panic!("{multi:?}") };
        assert_eq!(ranges, &[0..2, 10..12]);
        assert!(framing.heads[0].starts_with(b"--XYZ\r\nContent-Type: video/mp4\r\n"));
        assert_eq!(multi.status(), StatusCode::PARTIAL_CONTENT);
        let headers = framed(&multi);
        assert_eq!(headers["content-type"], "multipart/byteranges; boundary=XYZ");
        assert_eq!(headers["content-length"], framing.content_length.to_string().as_str());
        assert!(!headers.contains_key("content-range"));

        let unsatisfiable = plan_for(Method::GET, &[("range", "bytes=1000-")]);
        assert!(matches!(unsatisfiable, Plan::Unsatisfiable { len: 1000 }));
        assert_eq!(unsatisfiable.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        let mut headers = HeaderMap::new();
        unsatisfiable.set_headers(&mut headers);
        assert_eq!(headers["content-range"], "bytes */1000");
        assert!(!headers.contains_key("content-length"), "a 416's body is the caller's");
    }

    #[test]
    fn plans_ignore_ranges_they_must_ignore() {
        for headers in [
            // Range applies to GET only.
            (Method::HEAD, &[("range", "bytes=0-1")][..]),
            (Method::POST, &[("range", "bytes=0-1")]),
            // Bad syntax, another unit.
            (Method::GET, &[("range", "bytes=9-1")]),
            (Method::GET, &[("range", "items=0-1")]),
            // An If-Range that does not hold, even for an unsatisfiable range.
            (Method::GET, &[("range", "bytes=0-1"), ("if-range", "\"old\"")]),
            (Method::GET, &[("range", "bytes=5000-"), ("if-range", "\"old\"")]),
            (Method::GET, &[("range", "bytes=0-1"), ("if-range", "W/\"e1\"")]),
            (Method::GET, &[("range", "bytes=0-1"), ("if-range", "Thu, 01 Jan 1998 00:00:00 GMT")]),
        ] {
            assert!(matches!(plan_for(headers.0.clone(), headers.1), Plan::Full { len: 1000 }), "{headers:?}");
        }
        let holds = plan_for(Method::GET, &[("range", "bytes=0-1"), ("if-range", "\"e1\"")]);
        assert!(matches!(holds, Plan::Single { .. }));
        // The boundary is only made when needed.
        let validators = Validators::default();
        let single =
            plan(&Method::GET, &request(&[("range", "bytes=0-1")]), 10, validators, || None, || unreachable!());
        assert!(matches!(single, Plan::Single { .. }));
    }

    /// The reference: which bytes of `0..len` a spec set selects, computed naively.
    fn reference(specs: &[Spec], len: u64) -> Vec<bool> {
        let mut selected = vec![false; len as usize];
        for spec in specs {
            for (i, s) in selected.iter_mut().enumerate() {
                let i = i as u64;
                let hit = match *spec {
                    Spec::From { first, last } => i >= first && last.is_none_or(|l| i <= l),
                    Spec::Suffix(n) => n > 0 && i + n >= len,
                };
                *s |= hit;
            }
        }
        selected
    }

    fn spec() -> impl Strategy<Value = Spec> {
        prop_oneof![
            (0u64..300, proptest::option::of(0u64..300))
                .prop_map(|(a, b)| Spec::From { first: a, last: b.map(|b| a + b) }),
            (0u64..300).prop_map(Spec::Suffix),
        ]
    }

    proptest! {
        #[test]
        fn resolved_ranges_select_exactly_the_reference_bytes(specs in proptest::collection::vec(spec(), 1..6), len in 0u64..250) {
            let want = reference(&specs, len);
            match resolve(&specs, len) {
                Resolved::Full => prop_assert!(false, "few ranges never give Full"),
                Resolved::Unsatisfiable => prop_assert!(want.iter().all(|b| !b)),
                Resolved::Partial(ranges) => {
                    let mut got = vec![false; len as usize];
                    for r in &ranges {
                        prop_assert!(r.start < r.end && r.end <= len);
                        for i in r.clone() { got[i as usize] = true; }
                    }
                    prop_assert_eq!(got, want);
                    // Parts never overlap (no amplification).
                    let mut sorted = ranges.clone();
                    sorted.sort_by_key(|r| r.start);
                    prop_assert!(sorted.windows(2).all(|w| w[0].end <= w[1].start));
                }
            }
        }

        #[test]
        fn parse_never_panics_and_round_trips(specs in proptest::collection::vec(spec(), 1..6)) {
            let text = specs.iter().map(|s| match s {
                Spec::From { first, last: Some(l) } => format!("{first}-{l}"),
                Spec::From { first, last: None } => format!("{first}-"),
                Spec::Suffix(n) => format!("-{n}"),
            }).collect::<Vec<_>>().join(", ");
            prop_assert_eq!(parse(&format!("bytes={text}")), Some(specs));
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,64}") {
            if let Some(specs) = parse(&s) { let _ = resolve(&specs, 1000); }
        }
    }
}
