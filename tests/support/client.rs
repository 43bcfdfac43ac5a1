//! Clients for tests: hyper (HTTP/1.1 or HTTP/2 with prior knowledge) and curl.

use std::{ops::Range, path::Path, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// How long any one request may take before the test fails.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// A whole response.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Fetched {
    /// The header's value, or `""` when absent (or not text).
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// Which HTTP version a [`Http`] client speaks to a plain-TCP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c).
    H2c,
}

/// A pooled hyper client; reuse one per test to reuse connections.
#[derive(Clone)]
pub(crate) struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Http {
    pub(crate) fn new(protocol: Protocol) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        if protocol == Protocol::H2c {
            builder.http2_only(true);
        }
        Self { client: builder.build_http() }
    }

    /// Sends a request with `headers` and reads the whole response.
    pub(crate) async fn request(&self, method: Method, url: &str, headers: &[(&str, &str)]) -> Fetched {
        let mut request = Request::builder().method(method).uri(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Empty::new()).expect("valid request");
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .unwrap_or_else(|_| panic!("{url}: timed out"))
            .unwrap_or_else(|e| panic!("{url}: {e:?}"));
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(TIMEOUT, body.collect())
            .await
            .unwrap_or_else(|_| panic!("{url}: body timed out"))
            .unwrap_or_else(|e| panic!("{url}: body: {e:?}"))
            .to_bytes();
        Fetched { status: parts.status, version: parts.version, headers: parts.headers, body }
    }

    pub(crate) async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Fetched {
        self.request(Method::GET, url, headers).await
    }
}

/// One HTTP/1.1 GET on a fresh client.
pub(crate) async fn get(url: &str) -> Fetched {
    Http::new(Protocol::Http1).get(url, &[]).await
}

/// One HTTP/1.1 GET with request headers on a fresh client.
pub(crate) async fn get_with(url: &str, headers: &[(&str, &str)]) -> Fetched {
    Http::new(Protocol::Http1).get(url, headers).await
}

/// What curl received.
#[derive(Debug, Clone)]
pub(crate) struct Curl {
    /// 0 when curl got no response.
    pub(crate) status: u16,
    /// `1.1`, `2`, …
    pub(crate) version: String,
    /// Of the last response, names lowercased, in order.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    /// curl's stderr (its error message when it failed).
    pub(crate) stderr: String,
}

impl Curl {
    /// The first value of header `name` (any case), or `""`.
    pub(crate) fn header(&self, name: &str) -> &str {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map_or("", |(_, v)| v.as_str())
    }
}

/// Runs `curl -sS <args>` (add the URL and flags such as `--path-as-is`,
/// `--http2-prior-knowledge`, `-H`, `-r`, `-I`, `-k`) without blocking the runtime.
pub(crate) async fn curl(args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().expect("temp dir");
    let headers = dir.path().join("headers");
    let body = dir.path().join("body");
    let output = tokio::time::timeout(
        TIMEOUT,
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "20", "-D"])
            .arg(&headers)
            .arg("-o")
            .arg(&body)
            .args(["-w", "%{http_code} %{http_version}"])
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl timed out")
    .expect("curl runs (is it installed?)");
    let written = String::from_utf8_lossy(&output.stdout).into_owned();
    let (status, version) = written.split_once(' ').unwrap_or(("0", ""));
    Curl {
        status: status.trim().parse().unwrap_or(0),
        version: version.trim().to_owned(),
        headers: parse_header_dump(&headers),
        body: std::fs::read(&body).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The header lines of the last response in a `curl -D` dump.
fn parse_header_dump(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let last = text.split("\r\n\r\n").filter(|block| !block.trim().is_empty()).last().unwrap_or("");
    last.lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect()
}

/// One part of a `multipart/byteranges` body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) content_type: Option<String>,
    /// The bytes this part carries (from its `Content-Range`).
    pub(crate) range: Range<u64>,
    /// The complete length from `Content-Range`.
    pub(crate) complete_length: u64,
    pub(crate) body: Bytes,
}

/// Parses a `multipart/byteranges` body given the response's Content-Type; panics
/// (failing the test) on any framing error.
pub(crate) fn parse_multipart(content_type: &str, body: &[u8]) -> Vec<Part> {
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
pub(crate) fn parse_content_range(value: &str) -> Option<(Range<u64>, u64)> {
    let (range, complete) = value.strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    Some((first.parse().ok()?..last.parse::<u64>().ok()? + 1, complete.parse().ok()?))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only HTTP date
/// format servers may send.
pub(crate) fn parse_http_date(text: &str) -> Option<std::time::SystemTime> {
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
