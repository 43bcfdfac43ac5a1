//! `storm`: a miss storm. Many concurrent HTTP/1.1 GETs for a few (uncached) objects,
//! all sent at the same moment.
//!
//! ```sh
//! storm --addr 127.0.0.42:8080 --path '/_gen/64KiB?v={n}&rate=65536' --objects 100 --per-object 10
//! ```
//!
//! Opens `objects × per-object` connections first (concurrently), then, once all are
//! open, sends one request on each at once: request `i` asks for object `first + i mod
//! objects` (`{n}` in `--path`), so every object's requests are spread over the storm.
//! Prints one JSON line: `seconds` from the moment the requests are sent to the last
//! body byte, `connect_s` (opening the connections, not in `seconds`), responses by
//! status and by `X-Cache`, errors (failed connections or requests, non-200 answers,
//! bodies that do not match `Content-Length`) and per-request latency p50/max.

#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpStream, sync::Barrier, task::JoinSet};

/// A miss storm: concurrent HTTP/1.1 GETs, sent at once, for a few objects.
#[derive(Debug, Parser)]
#[command(name = "storm", version, about)]
struct Args {
    /// The server, HOST:PORT (plain HTTP/1.1).
    #[arg(long)]
    addr: SocketAddr,
    /// The path; `{n}` becomes the object number.
    #[arg(long)]
    path: String,
    /// Distinct objects.
    #[arg(long, default_value_t = 100)]
    objects: u64,
    /// Concurrent requests per object.
    #[arg(long, default_value_t = 10)]
    per_object: u64,
    /// Number of the first object.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// A request (or connection) taking longer than this is an error.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Debug, Serialize)]
struct Report {
    requests: u64,
    objects: u64,
    seconds: f64,
    connect_s: f64,
    statuses: BTreeMap<String, u64>,
    x_cache: BTreeMap<String, u64>,
    errors: u64,
    error_messages: BTreeMap<String, u64>,
    p50_ms: Option<f64>,
    max_ms: Option<f64>,
}

/// What one request got.
struct Outcome {
    status: u16,
    x_cache: String,
    /// Body as long as Content-Length said.
    complete: bool,
    latency: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    let report = runtime.block_on(run(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<Report> {
    anyhow::ensure!(args.path.contains("{n}"), "--path needs {{n}} for the object number");
    let total = args.objects * args.per_object;
    let connect_start = Instant::now();
    // Everyone waits here once connected (or failed), and the storm starts at once.
    let barrier = Arc::new(Barrier::new(usize::try_from(total)? + 1));
    let mut tasks = JoinSet::new();
    for i in 0..total {
        let path = args.path.replace("{n}", &(args.first + i % args.objects).to_string());
        let (addr, timeout, barrier) = (args.addr, args.timeout, barrier.clone());
        tasks.spawn(async move {
            let connected = tokio::time::timeout(timeout, connect(addr)).await;
            barrier.wait().await;
            let start = Instant::now();
            let send = match connected {
                Ok(Ok(send)) => send,
                Ok(Err(e)) => return Err(e),
                Err(_) => anyhow::bail!("connect timed out"),
            };
            match tokio::time::timeout(timeout, fetch(send, &path, addr, start)).await {
                Ok(result) => result,
                Err(_) => anyhow::bail!("request timed out"),
            }
        });
    }
    barrier.wait().await;
    let connect_s = connect_start.elapsed().as_secs_f64();
    let start = Instant::now();

    let mut report = Report {
        requests: total,
        objects: args.objects,
        seconds: 0.0,
        connect_s: round(connect_s, 3),
        statuses: BTreeMap::new(),
        x_cache: BTreeMap::new(),
        errors: 0,
        error_messages: BTreeMap::new(),
        p50_ms: None,
        max_ms: None,
    };
    let mut latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.context("a request task panicked")? {
            Ok(outcome) => {
                *report.statuses.entry(outcome.status.to_string()).or_default() += 1;
                *report.x_cache.entry(outcome.x_cache).or_default() += 1;
                if outcome.status == 200 && outcome.complete {
                    latencies.push(outcome.latency);
                } else {
                    report.errors += 1;
                }
            }
            Err(e) => {
                report.errors += 1;
                *report.error_messages.entry(format!("{e:#}")).or_default() += 1;
            }
        }
    }
    report.seconds = round(start.elapsed().as_secs_f64(), 3);
    latencies.sort_unstable();
    let ms = |d: &Duration| round(d.as_secs_f64() * 1000.0, 1);
    // Nearest rank.
    report.p50_ms = latencies.get(latencies.len().div_ceil(2).saturating_sub(1)).map(ms);
    report.max_ms = latencies.last().map(ms);
    Ok(report)
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("tcp connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.context("h1 handshake")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

async fn fetch(mut send: Sender, path: &str, addr: SocketAddr, start: Instant) -> anyhow::Result<Outcome> {
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())
        .context("building the request")?;
    send.ready().await.context("h1 connection")?;
    let response = send.send_request(request).await.context("h1 request")?;
    let (parts, mut body) = response.into_parts();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.context("body")?.data_ref() {
            bytes += data.len() as u64;
        }
    }
    let declared = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    Ok(Outcome {
        status: parts.status.as_u16(),
        x_cache: parts.headers.get("x-cache").and_then(|v| v.to_str().ok()).unwrap_or("-").to_string(),
        complete: declared.is_none_or(|length| length == bytes),
        latency: start.elapsed(),
    })
}

fn round(x: f64, places: i32) -> f64 {
    (x * 10f64.powi(places)).round() / 10f64.powi(places)
}
