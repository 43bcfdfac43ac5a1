//! Conditional requests (RFC 9110 §13): `If-Match`, `If-Unmodified-Since`,
//! `If-None-Match`, `If-Modified-Since` and `If-Range`. Pure code: the caller passes
//! the request headers and the representation's [`Validators`] (the origin from a
//! file, the edge from a stored response's headers), and gets a [`Decision`].
//!
//! Entity-tag lists are parsed as RFC 9110 §8.8.3 writes them: an opaque tag is a
//! quoted string that may contain commas, `W/` marks a weak tag, `*` stands alone; a
//! malformed list matches nothing (and never panics).

use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Method, header};

/// The validators of the selected representation.
///
/// Free to build: a stored response's fields are looked up and parsed only when a
/// request's preconditions or `If-Range` need them (a cache HIT without them pays
/// nothing).
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a>(Source<'a>);

#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// Known outright: the entity tag as the `ETag` field sends it, and the
    /// modification time.
    Known { etag: Option<&'a str>, last_modified: Option<SystemTime> },
    /// A stored response's `ETag` and `Last-Modified` fields.
    Fields(&'a HeaderMap),
}

impl Default for Validators<'_> {
    fn default() -> Self {
        Self(Source::Known { etag: None, last_modified: None })
    }
}

impl<'a> Validators<'a> {
    /// The validators a stored response carries: its `ETag` and `Last-Modified`
    /// fields (either ignored when it is not valid).
    pub fn from_headers(headers: &'a HeaderMap) -> Self {
        Self(Source::Fields(headers))
    }

    /// Validators known outright (the origin's: a file's entity tag and mtime).
    pub fn new(etag: Option<&'a str>, last_modified: Option<SystemTime>) -> Self {
        Self(Source::Known { etag, last_modified })
    }

    /// The entity tag as sent, quotes included (`"abc"`, or `W/"abc"` for a weak
    /// one); `None` when the representation has none.
    pub fn etag(&self) -> Option<&'a str> {
        match self.0 {
            Source::Known { etag, .. } => etag,
            Source::Fields(headers) => headers.get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::trim),
        }
    }

    /// The modification time, if known and valid.
    pub fn last_modified(&self) -> Option<SystemTime> {
        match self.0 {
            Source::Known { last_modified, .. } => last_modified,
            Source::Fields(headers) => headers
                .get(header::LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v.trim()).ok()),
        }
    }

    /// Our entity tag, parsed; `None` when absent or malformed.
    fn tag(&self) -> Option<Tag<'a>> {
        match parse_tags(self.etag()?).as_deref() {
            Some(&[tag]) => Some(tag),
            _ => None,
        }
    }
}

/// What the preconditions decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on and serve the request.
    Proceed,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    PreconditionFailed,
}

/// Evaluates the preconditions of a request in the order of RFC 9110 §13.2.2:
/// `If-Match`, else `If-Unmodified-Since`; then `If-None-Match`, else (GET and HEAD
/// only) `If-Modified-Since`. `If-Range` is the range planner's ([`if_range_holds`]).
///
/// The caller evaluates only when the response without preconditions would be a 2xx
/// (RFC 9110 §13.2.1): a representation exists.
pub fn evaluate(method: &Method, headers: &HeaderMap, validators: Validators<'_>) -> Decision {
    if !has_preconditions(headers) {
        return Decision::Proceed;
    }
    let get_or_head = method == Method::GET || method == Method::HEAD;
    // 1. If-Match, else 2. If-Unmodified-Since.
    if headers.contains_key(header::IF_MATCH) {
        if !list_matches(headers, &header::IF_MATCH, validators.tag(), Comparison::Strong) {
            return Decision::PreconditionFailed;
        }
    } else if let Some(since) = date(headers, &header::IF_UNMODIFIED_SINCE)
        && let Some(modified) = validators.last_modified()
        && seconds(modified) > since
    {
        return Decision::PreconditionFailed;
    }
    // 3. If-None-Match, else 4. If-Modified-Since (GET and HEAD only).
    if headers.contains_key(header::IF_NONE_MATCH) {
        if list_matches(headers, &header::IF_NONE_MATCH, validators.tag(), Comparison::Weak) {
            return if get_or_head { Decision::NotModified } else { Decision::PreconditionFailed };
        }
    } else if get_or_head
        && let Some(since) = date(headers, &header::IF_MODIFIED_SINCE)
        && let Some(modified) = validators.last_modified()
        && seconds(modified) <= since
    {
        return Decision::NotModified;
    }
    Decision::Proceed
}

/// Whether the request carries any precondition field: one pass over its fields,
/// cheaper than looking each of the four up (most requests carry none).
pub fn has_preconditions(headers: &HeaderMap) -> bool {
    headers.keys().any(|name| {
        name == header::IF_MATCH
            || name == header::IF_NONE_MATCH
            || name == header::IF_MODIFIED_SINCE
            || name == header::IF_UNMODIFIED_SINCE
    })
}

/// Whether an `If-Range` value lets the Range apply (RFC 9110 §13.1.5): a strong
/// entity tag strongly equal to ours, or a date exactly equal to our Last-Modified.
pub fn if_range_holds(value: &HeaderValue, validators: Validators<'_>) -> bool {
    let Ok(text) = value.to_str() else { return false };
    let text = text.trim();
    if text.starts_with('"') || text.starts_with("W/") {
        return match (parse_tags(text).as_deref(), validators.tag()) {
            (Some(&[tag]), Some(ours)) => strong_match(tag, ours),
            _ => false,
        };
    }
    match (httpdate::parse_http_date(text), validators.last_modified()) {
        (Ok(date), Some(modified)) => seconds(date) == seconds(modified),
        _ => false,
    }
}

/// The fields of a stored 200 that its 304 carries (RFC 9110 §15.4.5): the ones a
/// cache uses to update what it holds, and `Last-Modified`.
pub const NOT_MODIFIED_FIELDS: [HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
    header::LAST_MODIFIED,
];

/// The [`NOT_MODIFIED_FIELDS`] of `headers`, every value kept.
pub fn not_modified_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in NOT_MODIFIED_FIELDS {
        for value in headers.get_all(&name) {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Comparison {
    Strong,
    Weak,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag<'a> {
    weak: bool,
    /// With its quotes.
    opaque: &'a str,
}

/// RFC 9110 §8.8.3.2: both strong and character-for-character equal.
fn strong_match(a: Tag<'_>, b: Tag<'_>) -> bool {
    !a.weak && !b.weak && a.opaque == b.opaque
}

/// Whether any value of the list field `name` matches our entity tag: `*` matches
/// (a representation exists), an unparseable value matches nothing.
fn list_matches(headers: &HeaderMap, name: &HeaderName, ours: Option<Tag<'_>>, comparison: Comparison) -> bool {
    headers.get_all(name).iter().any(|value| {
        let Ok(text) = value.to_str() else { return false };
        if text.trim() == "*" {
            return true;
        }
        let Some(ours) = ours else { return false };
        parse_tags(text).is_some_and(|tags| {
            tags.iter().any(|&tag| match comparison {
                Comparison::Strong => strong_match(tag, ours),
                Comparison::Weak => tag.opaque == ours.opaque,
            })
        })
    })
}

/// Parses `#entity-tag`: `"a", W/"b", "c,d"`. `None` if any element is malformed
/// or there is none.
fn parse_tags(text: &str) -> Option<Vec<Tag<'_>>> {
    let mut tags = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        let (weak, after) = match rest.strip_prefix("W/") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        let inner = after.strip_prefix('"')?;
        let close = inner.find('"')?;
        let opaque = &after[..close + 2];
        // etagc = %x21 / %x23-7E / obs-text: a comma is allowed, a space is not.
        if !inner.as_bytes()[..close].iter().all(|&b| b == 0x21 || (0x23..=0x7E).contains(&b) || b >= 0x80) {
            return None;
        }
        tags.push(Tag { weak, opaque });
        rest = &after[close + 2..];
        let trimmed = rest.trim_start_matches([' ', '\t']);
        if !(trimmed.is_empty() || trimmed.starts_with(',')) {
            return None;
        }
        rest = trimmed;
    }
    (!tags.is_empty()).then_some(tags)
}

fn date(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let value = headers.get(name)?.to_str().ok()?;
    httpdate::parse_http_date(value.trim()).ok().map(seconds)
}

/// HTTP dates have one-second resolution; compare on whole seconds.
fn seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const ETAG: &str = "\"abc\"";

    fn modified() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)
    }

    fn validators() -> Validators<'static> {
        Validators::new(Some(ETAG), Some(modified()))
    }

    fn at(secs: i64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs((1_700_000_000 + secs) as u64))
    }

    fn map(headers: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn decide(method: Method, headers: &[(&'static str, &str)]) -> Decision {
        evaluate(&method, &map(headers), validators())
    }

    #[test]
    fn parses_entity_tag_lists() {
        let tags = parse_tags(r#""a", W/"b",,"c,d" , "" "#).unwrap();
        let opaque: Vec<_> = tags.iter().map(|t| (t.weak, t.opaque)).collect();
        assert_eq!(opaque, [(false, "\"a\""), (true, "\"b\""), (false, "\"c,d\""), (false, "\"\"")]);
        for bad in ["a", "\"a", "\"a\" b", "W/a", "w/\"a\"", "\"a\"\"b\"", "", " , ", "\"a b\"", "*, \"a\"", "W/"] {
            assert_eq!(parse_tags(bad), None, "{bad}");
        }
    }

    #[test]
    fn if_match_and_if_unmodified_since_fail_with_412() {
        assert_eq!(decide(Method::GET, &[("if-match", ETAG)]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "*")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\", \"abc\"")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\""), ("if-match", "\"abc\"")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\"")]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::HEAD, &[("if-match", "\"x\"")]), Decision::PreconditionFailed);
        // If-Match uses the strong comparison.
        assert_eq!(decide(Method::GET, &[("if-match", "W/\"abc\"")]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::GET, &[("if-match", "garbage")]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::GET, &[("if-match", "")]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", &at(0))]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", &at(10))]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", &at(-1))]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::HEAD, &[("if-unmodified-since", &at(-1))]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", "not a date")]), Decision::Proceed);
        // If-Match present: If-Unmodified-Since is not evaluated.
        assert_eq!(decide(Method::GET, &[("if-match", ETAG), ("if-unmodified-since", &at(-100))]), Decision::Proceed);
        assert_eq!(
            decide(Method::GET, &[("if-match", "\"x\""), ("if-unmodified-since", &at(100))]),
            Decision::PreconditionFailed
        );
    }

    #[test]
    fn if_match_against_a_weak_or_missing_etag() {
        let weak = Validators::new(Some("W/\"abc\""), None);
        let none = Validators::new(None, None);
        let malformed = Validators::new(Some("abc"), None);
        for validators in [weak, none, malformed] {
            for value in [ETAG, "W/\"abc\""] {
                let headers = map(&[("if-match", value)]);
                assert_eq!(evaluate(&Method::GET, &headers, validators), Decision::PreconditionFailed, "{value}");
            }
            // `*`: a representation exists.
            assert_eq!(evaluate(&Method::GET, &map(&[("if-match", "*")]), validators), Decision::Proceed);
        }
        // If-None-Match compares weakly: a weak stored tag still matches.
        assert_eq!(evaluate(&Method::GET, &map(&[("if-none-match", ETAG)]), weak), Decision::NotModified);
        assert_eq!(evaluate(&Method::GET, &map(&[("if-none-match", ETAG)]), none), Decision::Proceed);
        assert_eq!(evaluate(&Method::GET, &map(&[("if-none-match", "*")]), none), Decision::NotModified);
    }

    #[test]
    fn commas_inside_entity_tags() {
        let validators = Validators::new(Some("\"v1,2\""), None);
        let decide = |name: &'static str, value: &str| evaluate(&Method::GET, &map(&[(name, value)]), validators);
        assert_eq!(decide("if-none-match", "\"x\", \"v1,2\""), Decision::NotModified);
        assert_eq!(decide("if-none-match", "W/\"v1,2\", \"y\""), Decision::NotModified);
        // Splitting on commas would see `"v1` and `2"` here, and `"v1` would not match
        // either; neither does the tag itself.
        assert_eq!(decide("if-none-match", "\"v1\", \"2\""), Decision::Proceed);
        assert_eq!(decide("if-none-match", "\"v1,2,3\""), Decision::Proceed);
        assert_eq!(decide("if-match", "\"a,b\", \"v1,2\""), Decision::Proceed);
        assert_eq!(decide("if-match", "\"v1\", \"2\""), Decision::PreconditionFailed);
        // Our tag `"a"` and a client tag `"a,b"`: no match by prefix.
        let plain = Validators::new(Some("\"a\""), None);
        let headers = map(&[("if-none-match", "\"a,b\"")]);
        assert_eq!(evaluate(&Method::GET, &headers, plain), Decision::Proceed);
        let headers = map(&[("if-range", "\"v1,2\"")]);
        assert!(if_range_holds(&headers[header::IF_RANGE], validators));
    }

    #[test]
    fn if_none_match_and_if_modified_since_give_304() {
        assert_eq!(decide(Method::GET, &[("if-none-match", ETAG)]), Decision::NotModified);
        assert_eq!(decide(Method::HEAD, &[("if-none-match", ETAG)]), Decision::NotModified);
        // Weak comparison.
        assert_eq!(decide(Method::GET, &[("if-none-match", "W/\"abc\"")]), Decision::NotModified);
        assert_eq!(decide(Method::GET, &[("if-none-match", "\"x\", W/\"abc\"")]), Decision::NotModified);
        assert_eq!(decide(Method::GET, &[("if-none-match", "*")]), Decision::NotModified);
        assert_eq!(decide(Method::GET, &[("if-none-match", "\"x\"")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-none-match", "\"x\" garbage, \"abc\"")]), Decision::Proceed);
        assert_eq!(decide(Method::POST, &[("if-none-match", ETAG)]), Decision::PreconditionFailed);
        assert_eq!(decide(Method::GET, &[("if-modified-since", &at(0))]), Decision::NotModified);
        assert_eq!(decide(Method::GET, &[("if-modified-since", &at(5))]), Decision::NotModified);
        assert_eq!(decide(Method::GET, &[("if-modified-since", &at(-1))]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-modified-since", "yesterday")]), Decision::Proceed);
        assert_eq!(decide(Method::POST, &[("if-modified-since", &at(0))]), Decision::Proceed);
        // If-None-Match present: If-Modified-Since is not evaluated.
        assert_eq!(
            decide(Method::GET, &[("if-none-match", "\"x\""), ("if-modified-since", &at(0))]),
            Decision::Proceed
        );
        // 412 checks come first.
        assert_eq!(
            decide(Method::GET, &[("if-match", "\"x\""), ("if-none-match", ETAG)]),
            Decision::PreconditionFailed
        );
        assert_eq!(
            decide(Method::GET, &[("if-unmodified-since", &at(-1)), ("if-none-match", ETAG)]),
            Decision::PreconditionFailed
        );
        // Both pass: then If-None-Match decides.
        assert_eq!(decide(Method::GET, &[("if-match", ETAG), ("if-none-match", ETAG)]), Decision::NotModified);
        assert_eq!(decide(Method::GET, &[]), Decision::Proceed);
    }

    #[test]
    fn without_last_modified_dates_are_ignored() {
        let headers = map(&[("if-modified-since", &at(0)), ("if-unmodified-since", &at(-100))]);
        let validators = Validators::new(Some(ETAG), None);
        assert_eq!(evaluate(&Method::GET, &headers, validators), Decision::Proceed);
    }

    #[test]
    fn if_range_needs_a_strong_match_or_the_exact_date() {
        let holds = |value: &str| if_range_holds(&HeaderValue::from_str(value).unwrap(), validators());
        assert!(holds(ETAG));
        assert!(holds(" \"abc\" "));
        assert!(!holds("W/\"abc\""));
        assert!(!holds("\"abd\""));
        assert!(!holds("\"abc\", \"abc\""));
        assert!(holds(&at(0)));
        assert!(!holds(&at(1)));
        assert!(!holds(&at(-1)));
        assert!(!holds("garbage"));
        assert!(!if_range_holds(&HeaderValue::from_bytes(b"\xff").unwrap(), validators()));
        // A stored weak tag never holds.
        let weak = Validators::new(Some("W/\"abc\""), None);
        assert!(!if_range_holds(&HeaderValue::from_static("\"abc\""), weak));
        assert!(!if_range_holds(&HeaderValue::from_static("W/\"abc\""), weak));
    }

    /// What the edge evaluates: the validators of a stored response's headers.
    #[test]
    fn validators_from_stored_headers() {
        let stored = map(&[("etag", "\"abc\""), ("last-modified", "Tue, 15 Nov 1994 12:45:26 GMT")]);
        let validators = Validators::from_headers(&stored);
        assert_eq!(validators.etag(), Some("\"abc\""));
        let decide = |headers: &[(&'static str, &str)]| evaluate(&Method::GET, &map(headers), validators);
        assert_eq!(decide(&[("if-none-match", "\"x\", W/\"abc\"")]), Decision::NotModified);
        assert_eq!(decide(&[("if-none-match", "*")]), Decision::NotModified);
        assert_eq!(decide(&[("if-none-match", "\"x\"")]), Decision::Proceed);
        assert_eq!(decide(&[("if-modified-since", "Tue, 15 Nov 1994 12:45:26 GMT")]), Decision::NotModified);
        assert_eq!(decide(&[("if-modified-since", "Mon, 14 Nov 1994 12:45:26 GMT")]), Decision::Proceed);
        assert_eq!(
            decide(&[("if-none-match", "\"x\""), ("if-modified-since", "Tue, 15 Nov 1994 12:45:26 GMT")]),
            Decision::Proceed
        );
        assert_eq!(decide(&[("if-unmodified-since", "Mon, 14 Nov 1994 12:45:26 GMT")]), Decision::PreconditionFailed);
        assert_eq!(decide(&[("if-unmodified-since", "Tue, 15 Nov 1994 12:45:26 GMT")]), Decision::Proceed);
        let holds = |value: &'static str| if_range_holds(&HeaderValue::from_static(value), validators);
        assert!(holds("\"abc\""));
        assert!(!holds("\"old\""));
        assert!(holds("Tue, 15 Nov 1994 12:45:26 GMT"));
        assert!(!holds("W/\"abc\""));

        let bad = map(&[("last-modified", "yesterday")]);
        let validators = Validators::from_headers(&bad);
        assert_eq!((validators.etag(), validators.last_modified()), (None, None));
    }

    #[test]
    fn a_304_keeps_only_the_update_fields() {
        let stored = map(&[
            ("etag", "\"abc\""),
            ("cache-control", "max-age=60"),
            ("vary", "accept-encoding"),
            ("vary", "origin"),
            ("content-type", "text/plain"),
            ("content-length", "5"),
            ("set-cookie", "a=b"),
        ]);
        let kept = not_modified_headers(&stored);
        assert_eq!(kept.len(), 4);
        assert_eq!(kept.get_all("vary").iter().count(), 2);
        assert!(!kept.contains_key("content-length") && !kept.contains_key("content-type"));
    }

    proptest! {
        #[test]
        fn arbitrary_fields_never_panic(value in "[ -~]{0,48}", etag in "(W/)?\"[!#-~]{0,8}\"") {
            let Ok(value) = HeaderValue::from_str(&value) else { return Ok(()) };
            let validators = Validators::new(Some(&etag), Some(modified()));
            for name in [header::IF_MATCH, header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE, header::IF_UNMODIFIED_SINCE] {
                let mut headers = HeaderMap::new();
                headers.insert(name, value.clone());
                let _ = evaluate(&Method::GET, &headers, validators);
            }
            let _ = if_range_holds(&value, validators);
        }

        #[test]
        fn a_tag_in_a_list_always_matches_itself(opaque in "[!#-~]{0,12}", others in proptest::collection::vec("[!#-~]{0,6}", 0..4)) {
            let ours = format!("\"{opaque}\"");
            let mut list: Vec<String> = others.iter().map(|o| format!("\"{o}\"")).collect();
            list.insert(list.len() / 2, ours.clone());
            let headers = map(&[("if-none-match", &list.join(", ")), ("if-match", &list.join(","))]);
            let validators = Validators::new(Some(&ours), None);
            // If-Match passes, then If-None-Match matches: 304.
            prop_assert_eq!(evaluate(&Method::GET, &headers, validators), Decision::NotModified);
        }
    }
}
