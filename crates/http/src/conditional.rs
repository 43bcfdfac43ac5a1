//! Conditional requests (RFC 9110 §13): `If-Match`, `If-Unmodified-Since`,
//! `If-None-Match`, `If-Modified-Since` and `If-Range`. Pure code: the caller passes
//! the request headers and the representation's validators, and gets a decision.

use std::time::{SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, header};

/// The validators of the selected representation.
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a> {
    /// The strong entity tag, quotes included (`"abc"`).
    pub etag: &'a str,
    /// The modification time, if known.
    pub last_modified: Option<SystemTime>,
}

/// What the preconditions decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on and serve the request.
    Proceed,
    /// 304 Not Modified.
    NotModified,
    /// 412 Precondition Failed.
    Failed,
}

/// Evaluates the preconditions of a GET or HEAD in the order of RFC 9110 §13.2.2.
pub fn evaluate(method: &Method, headers: &HeaderMap, validators: Validators<'_>) -> Decision {
    let get_or_head = method == Method::GET || method == Method::HEAD;
    // 1. If-Match, else 2. If-Unmodified-Since.
    if headers.contains_key(header::IF_MATCH) {
        if !list_matches(headers, header::IF_MATCH, validators.etag, Comparison::Strong) {
            return Decision::Failed;
        }
    } else if let Some(since) = date(headers, header::IF_UNMODIFIED_SINCE)
        && let Some(modified) = validators.last_modified
        && seconds(modified) > since
    {
        return Decision::Failed;
    }
    // 3. If-None-Match, else 4. If-Modified-Since (GET and HEAD only).
    if headers.contains_key(header::IF_NONE_MATCH) {
        if list_matches(headers, header::IF_NONE_MATCH, validators.etag, Comparison::Weak) {
            return if get_or_head { Decision::NotModified } else { Decision::Failed };
        }
    } else if get_or_head
        && let Some(since) = date(headers, header::IF_MODIFIED_SINCE)
        && let Some(modified) = validators.last_modified
        && seconds(modified) <= since
    {
        return Decision::NotModified;
    }
    Decision::Proceed
}

/// Whether an `If-Range` value lets the Range apply (RFC 9110 §13.1.5): a strong
/// ETag equal to ours, or a date exactly equal to our Last-Modified.
pub fn if_range_holds(value: &HeaderValue, validators: Validators<'_>) -> bool {
    let Ok(text) = value.to_str() else { return false };
    let text = text.trim();
    if text.starts_with('"') || text.starts_with("W/") {
        return match parse_tags(text).as_deref() {
            Some([tag]) => !tag.weak && tag.opaque == validators.etag,
            _ => false,
        };
    }
    match (httpdate::parse_http_date(text), validators.last_modified) {
        (Ok(date), Some(modified)) => seconds(date) == seconds(modified),
        _ => false,
    }
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

/// Whether any value of the list header `name` matches our (strong) `etag`.
/// `*` matches (the representation exists); unparseable lists match nothing.
fn list_matches(headers: &HeaderMap, name: header::HeaderName, etag: &str, comparison: Comparison) -> bool {
    headers.get_all(name).iter().any(|value| {
        let Ok(text) = value.to_str() else { return false };
        if text.trim() == "*" {
            return true;
        }
        parse_tags(text).is_some_and(|tags| {
            tags.iter().any(|tag| tag.opaque == etag && (comparison == Comparison::Weak || !tag.weak))
        })
    })
}

/// Parses `#entity-tag`: `"a", W/"b"`. `None` if any element is malformed.
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
        if !opaque.bytes().skip(1).take(close).all(|b| b == 0x21 || (0x23..=0x7E).contains(&b) || b >= 0x80) {
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

fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<u64> {
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

    use super::*;

    const ETAG: &str = "\"abc\"";

    fn modified() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)
    }

    fn validators() -> Validators<'static> {
        Validators { etag: ETAG, last_modified: Some(modified()) }
    }

    fn at(secs: i64) -> String {
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs((1_700_000_000 + secs) as u64))
    }

    fn decide(method: Method, headers: &[(&'static str, &str)]) -> Decision {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        evaluate(&method, &map, validators())
    }

    #[test]
    fn parses_entity_tag_lists() {
        let tags = parse_tags(r#""a", W/"b",,"c,d" , "" "#).unwrap();
        let opaque: Vec<_> = tags.iter().map(|t| (t.weak, t.opaque)).collect();
        assert_eq!(opaque, [(false, "\"a\""), (true, "\"b\""), (false, "\"c,d\""), (false, "\"\"")]);
        for bad in ["a", "\"a", "\"a\" b", "W/a", "w/\"a\"", "\"a\"\"b\"", ""] {
            assert_eq!(parse_tags(bad), None, "{bad}");
        }
    }

    #[test]
    fn if_match_and_if_unmodified_since_fail_with_412() {
        assert_eq!(decide(Method::GET, &[("if-match", ETAG)]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "*")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\", \"abc\"")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\""), ("if-match", "\"abc\"")]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\"")]), Decision::Failed);
        // If-Match uses the strong comparison.
        assert_eq!(decide(Method::GET, &[("if-match", "W/\"abc\"")]), Decision::Failed);
        assert_eq!(decide(Method::GET, &[("if-match", "garbage")]), Decision::Failed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", &at(0))]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", &at(10))]), Decision::Proceed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", &at(-1))]), Decision::Failed);
        assert_eq!(decide(Method::GET, &[("if-unmodified-since", "not a date")]), Decision::Proceed);
        // If-Match present: If-Unmodified-Since is not evaluated.
        assert_eq!(decide(Method::GET, &[("if-match", ETAG), ("if-unmodified-since", &at(-100))]), Decision::Proceed);
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
        assert_eq!(decide(Method::POST, &[("if-none-match", ETAG)]), Decision::Failed);
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
        assert_eq!(decide(Method::GET, &[("if-match", "\"x\""), ("if-none-match", ETAG)]), Decision::Failed);
        assert_eq!(decide(Method::GET, &[]), Decision::Proceed);
    }

    #[test]
    fn without_last_modified_dates_are_ignored() {
        let mut map = HeaderMap::new();
        map.insert("if-modified-since", HeaderValue::from_str(&at(0)).unwrap());
        map.insert("if-unmodified-since", HeaderValue::from_str(&at(-100)).unwrap());
        let validators = Validators { etag: ETAG, last_modified: None };
        assert_eq!(evaluate(&Method::GET, &map, validators), Decision::Proceed);
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
    }
}
