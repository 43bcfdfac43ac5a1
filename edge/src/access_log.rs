//! Access logs: one JSON object per response, written off the request path.
//!
//! A request the sampling ratio picks gets a [`Pending`] record when it arrives
//! (method, host, path, range, CMCD...); the pipeline adds the response head
//! ([`Pending::responded`]) and the body wrapper finishes it when the body ends or
//! is dropped ([`Record::finish`]): bytes actually sent, time to the last byte. The
//! line goes to `tracing-appender`'s non-blocking writer: a bounded queue drained by
//! its worker thread. When the queue is full the line is dropped and counted
//! (`cdn_access_log_dropped_total`); a request never waits on the disk.
//!
//! The worker writes through [`LogFile`], which reopens the file when `SIGHUP`
//! asked it to (logrotate's `create` mode: rename, then signal) and rotates it by
//! size when `max_size` is set (`path.1` .. `path.<keep>`).
//!
//! Any part of the pipeline may put a [`Reason`] in a response's extensions: it is
//! logged as `reason` (why the edge refused a request) and never sent to the client.

use std::{
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use bytesize::ByteSize;
use cdn_node::listener::{Body, BoxError};
use http::{HeaderMap, Request, Response, header};
use prometheus::{IntCounter, Registry, core::Collector};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::metrics::Protocol;

/// Why the edge refused or failed a request, for the access log's `reason` field.
/// Put it in a response's extensions (`response.extensions_mut().insert(..)`); it
/// never reaches the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reason(pub &'static str);

/// `[access_log]`: off when the table is absent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The file lines are appended to (created if missing); `-` for stdout.
    pub path: PathBuf,
    /// The share of requests logged, 0.0..=1.0 (every n-th request, not random).
    #[serde(default = "default_sample")]
    pub sample: f64,
    /// Rotate when the file would grow past this (none: never; logrotate's job).
    pub max_size: Option<ByteSize>,
    /// Rotated files kept (`path.1` newest .. `path.<keep>`), with `max_size`.
    #[serde(default = "default_keep")]
    pub keep: usize,
    /// Lines waiting for the writer at most; more are dropped and counted.
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn default_sample() -> f64 {
    1.0
}

fn default_keep() -> usize {
    5
}

fn default_queue() -> usize {
    10_000
}

impl Settings {
    /// Logs every request to `path`, the other keys at their defaults.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sample: default_sample(),
            max_size: None,
            keep: default_keep(),
            queue: default_queue(),
        }
    }

    /// What is wrong with these settings, each naming its key.
    pub(crate) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !(0.0..=1.0).contains(&self.sample) {
            problems.push(format!("access_log.sample: {} is not within 0.0..1.0", self.sample));
        }
        if self.path.as_os_str().is_empty() {
            problems.push("access_log.path: empty".into());
        }
        if self.queue == 0 {
            problems.push("access_log.queue: must be at least 1".into());
        }
        if self.max_size.is_some_and(|size| size.as_u64() < 4096) {
            problems.push("access_log.max_size: must be at least 4KiB".into());
        }
        if self.max_size.is_some() && self.path.as_os_str() == "-" {
            problems.push("access_log.max_size: stdout (path \"-\") does not rotate".into());
        }
        if self.keep > 1000 {
            problems.push(format!("access_log.keep: {} is over 1000", self.keep));
        }
        problems
    }
}

/// The edge's access log: the queue to the writer thread and what picks requests.
pub(crate) struct AccessLog {
    writer: NonBlocking,
    _worker: WorkerGuard,
    sample: f64,
    seen: AtomicU64,
    node: String,
    reopen: Arc<AtomicBool>,
    lines: IntCounter,
}

impl AccessLog {
    /// Opens the log (an error when the file cannot be opened) and registers its
    /// metrics.
    pub(crate) fn open(settings: &Settings, node: &str, registry: &Registry) -> Result<Arc<Self>, crate::Error> {
        let lines = IntCounter::new(
            "cdn_access_log_lines_total",
            "Access log lines handed to the writer (written or dropped)",
        )?;
        let errors = IntCounter::new("cdn_access_log_errors_total", "Access log lines the writer failed to write")?;
        let reopen = Arc::new(AtomicBool::new(false));
        let file = LogFile::open(settings, reopen.clone(), errors.clone())
            .map_err(|source| crate::Error::AccessLog { path: settings.path.clone(), source })?;
        let (writer, worker) = NonBlockingBuilder::default()
            .lossy(true)
            .buffered_lines_limit(settings.queue)
            .thread_name("access-log")
            .finish(file);
        registry.register(Box::new(lines.clone()))?;
        registry.register(Box::new(errors))?;
        registry.register(Box::new(Dropped::new(writer.error_counter())?))?;
        info!(path = %settings.path.display(), sample = settings.sample, "access log open");
        Ok(Arc::new(Self {
            writer,
            _worker: worker,
            sample: settings.sample,
            seen: AtomicU64::new(0),
            node: node.to_string(),
            reopen,
            lines,
        }))
    }

    /// Whether this request is logged: exactly `sample` of them, evenly spread.
    fn sampled(&self) -> bool {
        if self.sample >= 1.0 {
            return true;
        }
        if self.sample <= 0.0 {
            return false;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) as f64;
        ((n + 1.0) * self.sample).floor() > (n * self.sample).floor()
    }

    /// A record for `request`, when it is sampled.
    pub(crate) fn start<B>(
        self: &Arc<Self>,
        request: &Request<B>,
        client: SocketAddr,
        protocol: Protocol,
    ) -> Option<Pending> {
        if !self.sampled() {
            return None;
        }
        let headers = request.headers();
        // The host as the client named it, without the port.
        let host = request.uri().host().map(str::to_string).or_else(|| {
            let value = headers.get(header::HOST)?.to_str().ok()?;
            Some(value.parse::<http::uri::Authority>().ok()?.host().to_string())
        });
        Some(Pending {
            log: self.clone(),
            time: SystemTime::now(),
            started: Instant::now(),
            client,
            protocol,
            method: request.method().as_str().to_string(),
            host: host.map(|h| capped(&h)),
            path: capped(&redacted(request.uri())),
            range: text(headers, header::RANGE),
            user_agent: text(headers, header::USER_AGENT),
            referer: text(headers, header::REFERER),
            cmcd: cmcd::from_request(request.uri().query(), headers),
        })
    }

    fn write(&self, line: &[u8]) {
        self.lines.inc();
        // Lossy: never blocks; a full queue counts the line as dropped.
        let _ = self.writer.clone().write_all(line);
    }

    /// Asks the writer to reopen the file on `SIGHUP` until `shutdown`.
    pub(crate) fn reopen_on_hangup(&self, shutdown: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        use tokio::signal::unix::{SignalKind, signal};
        // Installed now, before the edge serves: a SIGHUP from then on is seen.
        let mut hangup = signal(SignalKind::hangup()).map_err(|error| warn!(%error, "no SIGHUP handler")).ok();
        let reopen = self.reopen.clone();
        async move {
            let Some(hangup) = hangup.as_mut() else {
                shutdown.cancelled().await;
                return;
            };
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    Some(()) = hangup.recv() => {
                        info!("SIGHUP: reopening the access log");
                        reopen.store(true, Ordering::Release);
                    }
                }
            }
        }
    }
}

/// Field values longer than this are cut (a log line stays bounded).
const MAX_FIELD: usize = 2048;

fn capped(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers.get(name).map(|v| capped(&String::from_utf8_lossy(v.as_bytes())))
}

/// The query parameter (and path parameter) of RFC 9246's URI Signing Package,
/// whose value is a credential and never logged.
const SIGNING_PACKAGE: &str = "urisigningpackage";

/// The request target's path and query with any URI Signing Package value
/// replaced by `REDACTED`.
fn redacted(uri: &http::Uri) -> String {
    let path = uri.path();
    let path = if path.is_empty() { "/" } else { path };
    let mut out = String::with_capacity(path.len() + uri.query().map_or(0, |q| q.len() + 1));
    // Path-style parameters (`/a;URISigningPackage=...;b=c/x`, RFC 9246 §2.2).
    if path.contains(';') {
        for (i, segment) in path.split('/').enumerate() {
            if i > 0 {
                out.push('/');
            }
            for (j, param) in segment.split(';').enumerate() {
                if j > 0 {
                    out.push(';');
                }
                out.push_str(&redact_param(param, j > 0));
            }
        }
    } else {
        out.push_str(path);
    }
    if let Some(query) = uri.query() {
        out.push('?');
        for (i, param) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            out.push_str(&redact_param(param, true));
        }
    }
    out
}

fn redact_param(param: &str, is_param: bool) -> std::borrow::Cow<'_, str> {
    match param.split_once('=') {
        Some((name, _)) if is_param && name.eq_ignore_ascii_case(SIGNING_PACKAGE) => format!("{name}=REDACTED").into(),
        _ => param.into(),
    }
}

/// A request's record until the response head is known.
pub(crate) struct Pending {
    log: Arc<AccessLog>,
    time: SystemTime,
    started: Instant,
    client: SocketAddr,
    protocol: Protocol,
    method: String,
    host: Option<String>,
    path: String,
    range: Option<String>,
    user_agent: Option<String>,
    referer: Option<String>,
    cmcd: Option<Map<String, Value>>,
}

/// What the pipeline knows once the response head is ready.
pub(crate) struct Head<'a> {
    pub(crate) site: Option<&'a str>,
    /// `X-Cache`'s value: HIT, MISS, STALE, REVALIDATED, BYPASS.
    pub(crate) cache: &'static str,
    /// Our `Cache-Status` entry.
    pub(crate) cache_status: &'a str,
}

impl Pending {
    /// The record with the response head; finished when the body ends.
    pub(crate) fn responded<B>(self, response: &Response<B>, head: &Head<'_>) -> Record {
        let headers = response.headers();
        Record {
            ttfb: self.started.elapsed(),
            status: response.status().as_u16(),
            content_range: text(headers, header::CONTENT_RANGE),
            expected: headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()),
            site: head.site.map(str::to_string),
            cache: head.cache,
            cache_status: head.cache_status.to_string(),
            // Other refusals' types (URI signing's `SigningRejected`) are read here too.
            reason: response
                .extensions()
                .get::<Reason>()
                .map(|r| r.0)
                .or_else(|| response.extensions().get::<crate::signing::SigningRejected>().map(|r| r.0)),
            bytes: 0,
            pending: self,
        }
    }
}

/// A record waiting for the end of its response body.
pub(crate) struct Record {
    pending: Pending,
    ttfb: Duration,
    status: u16,
    content_range: Option<String>,
    /// The body length the head announced, to tell a whole body from a cut one.
    expected: Option<u64>,
    site: Option<String>,
    cache: &'static str,
    cache_status: String,
    reason: Option<&'static str>,
    /// Body bytes handed to the connection so far.
    pub(crate) bytes: u64,
}

/// The `X-Cache` value as the log spells it: `hit`, `miss`, `stale`,
/// `revalidated`, `bypass` (the contract's names).
fn lowercase(x_cache: &'static str) -> &'static str {
    match x_cache {
        "HIT" => "hit",
        "MISS" => "miss",
        "STALE" => "stale",
        "REVALIDATED" => "revalidated",
        "BYPASS" => "bypass",
        other => other,
    }
}

/// One access log line (see docs/access-logs.md).
#[derive(Serialize)]
struct Line<'a> {
    /// RFC 3339 (docs/design.md names the field `ts`).
    ts: String,
    node: &'a str,
    client: SocketAddr,
    protocol: &'static str,
    method: &'a str,
    host: Option<&'a str>,
    path: &'a str,
    site: Option<&'a str>,
    status: u16,
    bytes: u64,
    complete: bool,
    range: Option<&'a str>,
    content_range: Option<&'a str>,
    ttfb_ms: f64,
    duration_ms: f64,
    cache: &'static str,
    cache_status: &'a str,
    user_agent: Option<&'a str>,
    referer: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmcd: Option<&'a Map<String, Value>>,
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

impl Record {
    /// Writes the line: `ended` when the body reached its end (else it was dropped,
    /// whole only if every announced byte went out).
    pub(crate) fn finish(self, ended: bool) {
        let p = &self.pending;
        let complete = ended || self.expected.is_some_and(|n| n == self.bytes);
        let line = Line {
            ts: humantime::format_rfc3339_millis(p.time).to_string(),
            node: &p.log.node,
            client: p.client,
            protocol: p.protocol.as_str(),
            method: &p.method,
            host: p.host.as_deref(),
            path: &p.path,
            site: self.site.as_deref(),
            status: self.status,
            bytes: self.bytes,
            complete,
            range: p.range.as_deref(),
            content_range: self.content_range.as_deref(),
            ttfb_ms: millis(self.ttfb),
            duration_ms: millis(p.started.elapsed()),
            cache: lowercase(self.cache),
            cache_status: &self.cache_status,
            user_agent: p.user_agent.as_deref(),
            referer: p.referer.as_deref(),
            reason: self.reason,
            cmcd: p.cmcd.as_ref(),
        };
        let Ok(mut bytes) = serde_json::to_vec(&line) else { return };
        bytes.push(b'\n');
        p.log.write(&bytes);
    }
}

/// A response body that counts the bytes it hands out (`cdn_response_bytes_total`)
/// and finishes its access log record, if any, at its end or when dropped.
pub(crate) struct Counted {
    inner: Body,
    counter: IntCounter,
    record: Option<Record>,
}

impl Counted {
    pub(crate) fn new(inner: Body, counter: IntCounter, record: Option<Record>) -> Self {
        Self { inner, counter, record }
    }

    fn finish(&mut self, ended: bool) {
        if let Some(record) = self.record.take() {
            record.finish(ended);
        }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.counter.inc_by(n);
                    if let Some(record) = &mut this.record {
                        record.bytes += n;
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let ended = http_body::Body::is_end_stream(&self.inner);
        self.finish(ended);
    }
}

/// `cdn_access_log_dropped_total`, read from the writer's own drop counter when
/// scraped.
struct Dropped {
    source: ErrorCounter,
    counter: IntCounter,
    seen: Mutex<u64>,
}

impl Dropped {
    fn new(source: ErrorCounter) -> Result<Self, prometheus::Error> {
        let counter = IntCounter::new(
            "cdn_access_log_dropped_total",
            "Access log lines dropped because the writer's queue was full (the disk is slow or blocked)",
        )?;
        Ok(Self { source, counter, seen: Mutex::new(0) })
    }
}

impl Collector for Dropped {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.counter.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let now = self.source.dropped_lines() as u64;
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if now > *seen {
            self.counter.inc_by(now - *seen);
            *seen = now;
        }
        self.counter.collect()
    }
}

/// The file the writer thread writes to: reopened when asked (`SIGHUP`), rotated
/// by size. Runs on `tracing-appender`'s worker thread only.
struct LogFile {
    path: PathBuf,
    /// `None`: stdout.
    file: Option<BufWriter<File>>,
    written: u64,
    max_size: Option<u64>,
    keep: usize,
    reopen: Arc<AtomicBool>,
    errors: IntCounter,
    failing: bool,
    /// Lines in the buffer since the last flush (lost if the flush fails).
    buffered: u64,
}

impl LogFile {
    fn open(settings: &Settings, reopen: Arc<AtomicBool>, errors: IntCounter) -> io::Result<Self> {
        let mut log = Self {
            path: settings.path.clone(),
            file: None,
            written: 0,
            max_size: settings.max_size.map(|s| s.as_u64()),
            keep: settings.keep,
            reopen,
            errors,
            failing: false,
            buffered: 0,
        };
        if log.path.as_os_str() != "-" {
            log.open_file()?;
        }
        Ok(log)
    }

    fn open_file(&mut self) -> io::Result<()> {
        self.flush_file();
        let file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.written = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.file = Some(BufWriter::with_capacity(64 * 1024, file));
        Ok(())
    }

    /// `path` → `path.1` → ... → `path.<keep>` (the oldest goes), then a new `path`.
    fn rotate(&mut self) -> io::Result<()> {
        self.flush_file();
        self.file = None;
        let numbered = |n: usize| -> PathBuf {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            name.into()
        };
        if self.keep == 0 {
            remove(&self.path)?;
        } else {
            remove(&numbered(self.keep))?;
            for n in (1..self.keep).rev() {
                rename(&numbered(n), &numbered(n + 1))?;
            }
            rename(&self.path, &numbered(1))?;
        }
        self.open_file()
    }

    fn write_line(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.path.as_os_str() == "-" {
            return io::stdout().lock().write_all(buf);
        }
        if self.reopen.swap(false, Ordering::AcqRel) || self.file.is_none() {
            self.open_file()?;
        }
        if let Some(max) = self.max_size
            && self.written > 0
            && self.written + buf.len() as u64 > max
        {
            self.rotate()?;
        }
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("access log not open"))?;
        file.write_all(buf)?;
        self.written += buf.len() as u64;
        self.buffered += 1;
        Ok(())
    }

    /// Flushes the buffer; the lines in it are counted as errors if that fails.
    fn flush_file(&mut self) {
        let Some(file) = &mut self.file else { return };
        let lines = std::mem::take(&mut self.buffered);
        if let Err(error) = file.flush() {
            self.errors.inc_by(lines);
            if !self.failing {
                warn!(path = %self.path.display(), %error, "access log lines not written");
            }
            self.failing = true;
            // What is left in the buffer is lost: start afresh on the next line.
            self.file = None;
        }
    }
}

fn remove(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename(from: &Path, to: &Path) -> io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // A line that cannot be written is counted and lost; the worker goes on
        // with the next one (and retries opening the file then).
        match self.write_line(buf) {
            Ok(()) => self.failing = false,
            Err(error) => {
                self.errors.inc();
                if !self.failing {
                    warn!(path = %self.path.display(), %error, "access log line not written");
                }
                self.failing = true;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.path.as_os_str() == "-" {
            return io::stdout().flush();
        }
        self.flush_file();
        Ok(())
    }
}

/// CMCD (CTA-5004, Common Media Client Data): the `CMCD` query parameter and the
/// `CMCD-Request`, `CMCD-Object`, `CMCD-Status` and `CMCD-Session` headers, parsed
/// into typed fields.
pub(crate) mod cmcd {
    use http::HeaderMap;
    use serde_json::{Map, Number, Value};

    /// The most keys taken from one request; the rest are ignored.
    const MAX_KEYS: usize = 64;
    /// Longer CMCD data is not parsed at all.
    const MAX_LEN: usize = 4096;

    /// The types CTA-5004 gives its keys.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Integer,
        Decimal,
        String,
        Token,
        Boolean,
    }

    fn kind(key: &str) -> Option<Kind> {
        Some(match key {
            "br" | "bl" | "d" | "dl" | "mtp" | "rtp" | "tb" | "v" => Kind::Integer,
            "pr" => Kind::Decimal,
            "cid" | "sid" | "nor" | "nrr" => Kind::String,
            "ot" | "sf" | "st" => Kind::Token,
            "bs" | "su" => Kind::Boolean,
            _ => return None,
        })
    }

    /// The CMCD of a request: from the query's `CMCD` parameter, then the headers
    /// (a key in both: the query's). `None` when there is none.
    pub(crate) fn from_request(query: Option<&str>, headers: &HeaderMap) -> Option<Map<String, Value>> {
        let mut out = Map::new();
        if let Some(query) = query {
            for param in query.split('&') {
                if let Some(value) = param.strip_prefix("CMCD=")
                    && let Ok(value) = percent_encoding::percent_decode_str(value).decode_utf8()
                {
                    parse_into(&value, &mut out);
                }
            }
        }
        for name in ["cmcd-request", "cmcd-object", "cmcd-status", "cmcd-session"] {
            for value in headers.get_all(name) {
                if let Ok(value) = value.to_str() {
                    parse_into(value, &mut out);
                }
            }
        }
        (!out.is_empty()).then_some(out)
    }

    /// Parses `key=value,key,...` (RFC 8941 dictionary members as CTA-5004 uses
    /// them) into `out`; a member that does not parse, or whose value does not have
    /// its key's type, is skipped.
    pub(crate) fn parse_into(input: &str, out: &mut Map<String, Value>) {
        if input.len() > MAX_LEN {
            return;
        }
        for member in split_members(input) {
            if out.len() >= MAX_KEYS {
                return;
            }
            let member = member.trim_matches(|c| c == ' ' || c == '\t');
            let (key, value) = match member.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (member, None),
            };
            if !valid_key(key) || out.contains_key(key) {
                continue;
            }
            let Some(value) = parse_value(value) else { continue };
            let fits = match (kind(key), &value) {
                (None, _) => true,
                (Some(Kind::Integer), Value::Number(n)) => n.is_i64() || n.is_u64(),
                (Some(Kind::Decimal), Value::Number(_)) => true,
                (Some(Kind::Boolean), Value::Bool(_)) => true,
                (Some(Kind::String), Value::String(_)) => value_was_string(member),
                (Some(Kind::Token), Value::String(_)) => !value_was_string(member),
                _ => false,
            };
            if fits {
                out.insert(key.to_string(), value);
            }
        }
    }

    fn value_was_string(member: &str) -> bool {
        member.split_once('=').is_some_and(|(_, v)| v.starts_with('"'))
    }

    /// Keys: lowercase letters, digits and `_ - . *`, starting with a letter or `*`
    /// (RFC 8941 §3.1.2); custom keys carry a hyphen (`com.example-key`).
    fn valid_key(key: &str) -> bool {
        let mut chars = key.chars();
        chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '*')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.' | '*'))
            && key.len() <= 64
    }

    /// Splits on commas outside quoted strings.
    fn split_members(input: &str) -> Vec<&str> {
        let mut members = Vec::new();
        let (mut start, mut quoted, mut escaped) = (0, false, false);
        for (i, c) in input.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                ',' if !quoted => {
                    members.push(&input[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        members.push(&input[start..]);
        members
    }

    fn parse_value(value: Option<&str>) -> Option<Value> {
        let Some(value) = value else { return Some(Value::Bool(true)) };
        match value {
            "?1" => return Some(Value::Bool(true)),
            "?0" => return Some(Value::Bool(false)),
            _ => {}
        }
        if let Some(inner) = value.strip_prefix('"') {
            return parse_string(inner).map(Value::String);
        }
        let first = value.chars().next()?;
        if first == '-' || first.is_ascii_digit() {
            return parse_number(value);
        }
        // A token (RFC 8941 §3.3.4).
        let token = (first.is_ascii_alphabetic() || first == '*')
            && value.chars().all(|c| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~:/".contains(c));
        token.then(|| Value::String(value.to_string()))
    }

    /// RFC 8941 §3.3.3: the rest of a quoted string, its closing quote last.
    fn parse_string(inner: &str) -> Option<String> {
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next()? {
                    c @ ('"' | '\\') => out.push(c),
                    _ => return None,
                },
                '"' => return chars.next().is_none().then_some(out),
                c if (' '..='~').contains(&c) => out.push(c),
                _ => return None,
            }
        }
        None
    }

    /// RFC 8941 integers (15 digits at most) and decimals (3 fraction digits).
    fn parse_number(value: &str) -> Option<Value> {
        let digits = value.strip_prefix('-').unwrap_or(value);
        match digits.split_once('.') {
            None => {
                if digits.is_empty() || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                value.parse::<i64>().ok().map(|n| Value::Number(n.into()))
            }
            Some((int, frac)) => {
                let ok = !int.is_empty()
                    && int.len() <= 12
                    && (1..=3).contains(&frac.len())
                    && int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit());
                if !ok {
                    return None;
                }
                value.parse::<f64>().ok().and_then(Number::from_f64).map(Value::Number)
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use serde_json::json;

        fn parse(input: &str) -> Value {
            let mut out = Map::new();
            parse_into(input, &mut out);
            Value::Object(out)
        }

        #[test]
        fn typed_fields() {
            let parsed = parse(
                r#"bl=21300,br=3200,bs,cid="faec5fc2-ac30-11eabb37-0242ac130002",d=4004,dl=18500,mtp=48100,nor="..%2F300kbps%2Ftrack.m4v",ot=v,pr=1.08,rtp=12000,sf=d,sid="6e2fb550-c457-11e9-bb97-0800200c9a66",st=v,su,tb=6000,v=1"#,
            );
            assert_eq!(
                parsed,
                json!({
                    "bl": 21300, "br": 3200, "bs": true, "cid": "faec5fc2-ac30-11eabb37-0242ac130002",
                    "d": 4004, "dl": 18500, "mtp": 48100, "nor": "..%2F300kbps%2Ftrack.m4v", "ot": "v",
                    "pr": 1.08, "rtp": 12000, "sf": "d", "sid": "6e2fb550-c457-11e9-bb97-0800200c9a66",
                    "st": "v", "su": true, "tb": 6000, "v": 1
                })
            );
        }

        #[test]
        fn wrong_types_and_junk_are_skipped() {
            // A string where a number belongs, a token where a string belongs, bad
            // keys, unterminated strings, empty members.
            let parsed =
                parse(r#"br="3200",sid=abc,BR=5,=4,bl=12a,d=1.5,ot=v,,x-custom="a\"b",bs=?0,cid="unterminated"#);
            assert_eq!(parsed, json!({"ot": "v", "x-custom": "a\"b", "bs": false}));
            // A comma inside a quoted string does not split.
            assert_eq!(parse(r#"cid="a,b",br=1"#), json!({"cid": "a,b", "br": 1}));
            // The first of a repeated key wins.
            assert_eq!(parse("br=1,br=2"), json!({"br": 1}));
            assert_eq!(parse(&"a".repeat(5000)), json!({}));
            assert_eq!(parse(""), json!({}));
        }

        #[test]
        fn query_and_headers() {
            let mut headers = HeaderMap::new();
            headers.insert("cmcd-session", "sid=\"s1\",br=1".parse().unwrap());
            headers.insert("cmcd-request", "bl=300".parse().unwrap());
            let found =
                from_request(Some("a=1&CMCD=br%3D3200%2Cot%3Dv%2Csu&b=2"), &headers).map(Value::Object).unwrap();
            assert_eq!(found, json!({"br": 3200, "ot": "v", "su": true, "sid": "s1", "bl": 300}));
            assert_eq!(from_request(Some("a=1"), &HeaderMap::new()), None);
            assert_eq!(from_request(Some("CMCD=%ff%fe"), &HeaderMap::new()), None);
        }

        proptest::proptest! {
            #[test]
            fn never_panics(input in ".{0,300}") {
                let mut out = Map::new();
                parse_into(&input, &mut out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signing_packages_are_redacted() {
        let uri: http::Uri = "/v/a.m3u8?x=1&URISigningPackage=eyJhbGciOi.secret.sig&y=2".parse().unwrap();
        assert_eq!(redacted(&uri), "/v/a.m3u8?x=1&URISigningPackage=REDACTED&y=2");
        let uri: http::Uri = "/v;urisigningpackage=eyJ.secret/a.ts;k=v".parse().unwrap();
        assert_eq!(redacted(&uri), "/v;urisigningpackage=REDACTED/a.ts;k=v");
        let uri: http::Uri = "/plain?q".parse().unwrap();
        assert_eq!(redacted(&uri), "/plain?q");
        let uri: http::Uri = "https://a.test".parse().unwrap();
        assert_eq!(redacted(&uri), "/");
    }

    #[test]
    fn sampling_is_exact() {
        for (sample, expect) in [(0.0, 0), (0.5, 500), (0.1, 100), (1.0, 1000), (0.333, 333)] {
            let log = AccessLog {
                writer: NonBlockingBuilder::default().finish(io::sink()).0,
                _worker: NonBlockingBuilder::default().finish(io::sink()).1,
                sample,
                seen: AtomicU64::new(0),
                node: "n".into(),
                reopen: Arc::default(),
                lines: IntCounter::new("x", "x").unwrap(),
            };
            let n = (0..1000).filter(|_| log.sampled()).count();
            assert_eq!(n, expect, "sample {sample}");
        }
    }

    #[test]
    fn rotates_by_size_keeping_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let mut settings = Settings::new(&path);
        settings.max_size = Some(ByteSize::b(100));
        settings.keep = 2;
        let mut file = LogFile::open(&settings, Arc::default(), IntCounter::new("e", "e").unwrap()).unwrap();
        for i in 0..10 {
            file.write_all(format!("{i:039}\n").as_bytes()).unwrap(); // 40 bytes
            file.flush().unwrap();
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        // Two lines per file: 8,9 in the file; 6,7 in .1; 4,5 in .2; no .3.
        assert_eq!(read(&path).lines().count(), 2);
        assert!(read(&path).ends_with(&format!("{:039}\n", 9)));
        assert!(read(&dir.path().join("access.log.1")).starts_with(&format!("{:039}\n", 6)));
        assert!(read(&dir.path().join("access.log.2")).starts_with(&format!("{:039}\n", 4)));
        assert!(!dir.path().join("access.log.3").exists());
    }

    #[test]
    fn settings_problems_name_keys() {
        let mut settings = Settings::new("-");
        settings.sample = 1.5;
        settings.queue = 0;
        settings.max_size = Some(ByteSize::b(10));
        let problems = settings.problems();
        for key in ["access_log.sample", "access_log.queue", "access_log.max_size"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }
        assert!(Settings::new("/var/log/cdn/access.log").problems().is_empty());
    }
}
