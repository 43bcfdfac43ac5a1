//! Parsing what range responses carry, independently of the code under test:
//! `multipart/byteranges` bodies, `Content-Range` values and HTTP dates.
//!
//! Moved from tests/support/client.rs; tests/edge/ranges.rs's own multipart parser
//! now uses [`parse_multipart`].

use std::{ops::Range, time::Duration};

use bytes::Bytes;

/// One part of a `multipart/byteranges` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub content_type: Option<String>,
    /// The bytes this part carries (from its `Content-Range`).
    pub range: Range<u64>,
    /// The complete length from `Content-Range`.
    pub complete_length: u64,
    pub body: Bytes,
}

/// Parses a `multipart/byteranges` body given the response's Content-Type; panics
/// (failing the test) on any framing error.
pub fn parse_multipart(content_type: &str, body: &[u8]) -> Vec<Part> {
    let boundary = content_type
        .split(';')
        .find_map(|p| p.trim().strip_prefix("boundary="))
        .unwrap_or_else(|| panic!("no boundary in {content_type:?}"))
        .trim_matches('"');
    let delimiter = format!("--{boundary}");
    let mut rest = body;
    let mut parts = Vec::new();
    // Skip an optional preamble, then expect a delimiter.
    let start = find(rest, delimiter.as_bytes()).expect("first delimiter");
    rest = &rest[start + delimiter.len()..];
    loop {
        if rest.starts_with(b"--") {
            break; // close delimiter
        }
        rest = rest.strip_prefix(b"\r\n").expect("CRLF after delimiter");
        let end = find(rest, b"\r\n\r\n").expect("end of part headers");
        let head = std::str::from_utf8(&rest[..end]).expect("part headers are text");
        rest = &rest[end + 4..];
        let mut content_type = None;
        let mut content_range = None;
        for line in head.split("\r\n") {
            let (name, value) = line.split_once(':').expect("header line");
            match name.trim().to_ascii_lowercase().as_str() {
                "content-type" => content_type = Some(value.trim().to_owned()),
                "content-range" => content_range = Some(value.trim().to_owned()),
                _ => {}
            }
        }
        let content_range = content_range.expect("every part has a Content-Range");
        let (range, complete_length) = parse_content_range(&content_range).expect("valid Content-Range");
        let len = usize::try_from(range.end - range.start).expect("part fits in memory");
        let body = Bytes::copy_from_slice(&rest[..len]);
        rest = &rest[len..];
        rest = rest.strip_prefix(b"\r\n").expect("CRLF before delimiter");
        rest = rest.strip_prefix(delimiter.as_bytes()).expect("delimiter after part");
        parts.push(Part { content_type, range, complete_length, body });
    }
    parts
}

/// Parses `bytes first-last/complete` into (`first..last+1`, complete).
pub fn parse_content_range(value: &str) -> Option<(Range<u64>, u64)> {
    let (range, complete) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    Some((first.parse().ok()?..last.parse::<u64>().ok()? + 1, complete.parse().ok()?))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only HTTP date
/// format servers may send.
pub fn parse_http_date(text: &str) -> Option<std::time::SystemTime> {
    let rest = text.get(5..)?.strip_suffix(" GMT")?;
    let mut fields = rest.split([' ', ':']);
    let mut next = || fields.next();
    let day: u64 = next()?.parse().ok()?;
    let month_name = next()?;
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        .iter()
        .position(|m| *m == month_name)? as u64
        + 1;
    let year: u64 = next()?.parse().ok()?;
    let (hour, minute, second): (u64, u64, u64) = (next()?.parse().ok()?, next()?.parse().ok()?, next()?.parse().ok()?);
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil).
    let (y, m) = if month <= 2 { (year - 1, month + 9) } else { (year, month - 3) };
    let era = y / 400;
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}
