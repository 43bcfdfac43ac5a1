//! `loadgen`: a small closed-loop HTTP load generator for HTTP/1.1, HTTP/2 and HTTP/3.
//!
//! It opens `--connections` connections and runs `--streams` concurrent request loops
//! on each (HTTP/2 and HTTP/3 multiplex them on the one connection; HTTP/1.1 has no
//! multiplexing, so there every loop gets a connection of its own). Each loop sends a
//! GET, reads the whole body, records the latency (request sent to last body byte)
//! and starts the next, until `--duration` is over; requests in flight then finish.
//! The result is one JSON line on stdout.
//!
//! # Layout
//! - `main.rs`: arguments, the run, the report.
//! - `client.rs`: connecting and fetching, one variant per protocol.
//! - `stats.rs`: counters and latency percentiles.
//! - `tls.rs`: rustls client configs (ring, ALPN, `--insecure`).

#![forbid(unsafe_code)]

mod client;
mod stats;
mod tls;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytesize::ByteSize;
use clap::{Parser, ValueEnum};
use tokio::task::JoinSet;

use crate::{
    client::{Connection, Fetched},
    stats::Stats,
};

/// Closed-loop HTTP load generator (HTTP/1.1, HTTP/2 over TLS, HTTP/3 over QUIC);
/// prints one JSON line with requests, errors, bytes, rates and latency percentiles.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// Protocol: h1 (http:// or https://), h2 (https://, ALPN h2), h3 (https://, QUIC).
    #[arg(long, value_enum)]
    proto: Proto,
    /// The URL to fetch, e.g. https://127.0.0.1:8443/_gen/1MiB
    #[arg(long)]
    url: http::Uri,
    /// Connections. For h1 each stream is a connection of its own (connections × streams).
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Concurrent request loops per connection.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// How long to send new requests, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Ask for random 1 MiB-aligned 1 MiB ranges of an object of this size (e.g. 1GiB).
    #[arg(long)]
    range_random: Option<ByteSize>,
    /// Spread requests over this many objects: each request replaces `{n}` in the URL
    /// with a number drawn uniformly from 1..=N (e.g. `--url 'http://h/_gen/1MiB?v={n}'
    /// --objects 1024`), so a cache sees a working set of N objects.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    objects: Option<u64>,
    /// With --range-random: ranges start at any byte (a 1 MiB range then spans two
    /// 1 MiB slices of a slicing cache), not on a 1 MiB boundary.
    #[arg(long, requires = "range_random")]
    range_unaligned: bool,
    /// Accept any server certificate (self-signed test servers).
    #[arg(long)]
    insecure: bool,
    /// Connect to this address instead of resolving the URL's host.
    #[arg(long)]
    connect_to: Option<SocketAddr>,
    /// Extra request header, `name: value` (repeatable).
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Per-stream receive window (h2 and h3).
    #[arg(long, default_value = "4MiB")]
    stream_window: ByteSize,
    /// Per-connection receive window (h2 and h3).
    #[arg(long, default_value = "16MiB")]
    connection_window: ByteSize,
    /// UDP receive buffer of each QUIC client socket (h3; capped by net.core.rmem_max).
    #[arg(long, default_value = "4MiB")]
    udp_recv_buffer: ByteSize,
    /// Largest UDP payload the client accepts (h3; QUIC's max_udp_payload_size transport
    /// parameter, 1200..=65527). The server's path-MTU discovery never goes above it:
    /// quinn's default, 1472, would hold a server on loopback (MTU 65536, where TCP
    /// sends 64 KiB segments) to Ethernet-sized datagrams.
    #[arg(long, default_value_t = 65527, value_parser = clap::value_parser!(u16).range(1200..=65527))]
    max_udp_payload: u16,
    /// A request (or connection attempt) taking longer than this counts as an error.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print each QUIC connection's statistics (MTU, RTT, datagrams) to stderr at its end.
    #[arg(long)]
    quic_stats: bool,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    H1,
    H2,
    H3,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Self::H1 => "h1",
            Self::H2 => "h2",
            Self::H3 => "h3",
        }
    }
}

/// What every connection and request loop shares.
struct Plan {
    proto: Proto,
    url: http::Uri,
    addr: SocketAddr,
    /// TLS server name (SNI), the URL's host.
    host: String,
    tls: bool,
    headers: http::HeaderMap,
    range_object: Option<u64>,
    range_unaligned: bool,
    /// `--objects`: `{n}` in the URL becomes a random number in 1..=objects.
    objects: Option<u64>,
    stream_window: u32,
    connection_window: u32,
    timeout: Duration,
    deadline: Instant,
    tls_config: Option<Arc<rustls::ClientConfig>>,
    quic_stats: bool,
    udp_recv_buffer: usize,
    max_udp_payload: u16,
}

/// The range size of `--range-random`.
const RANGE: u64 = 1024 * 1024;

impl Plan {
    /// The next request; `seed` drives the random ranges.
    fn request(&self, seed: &mut u64) -> anyhow::Result<http::Request<()>> {
        let url = match self.objects {
            Some(objects) => {
                let n = next_random(seed) % objects + 1;
                self.url.to_string().replace("{n}", &n.to_string()).parse()?
            }
            None => self.url.clone(),
        };
        let uri = match self.proto {
            // HTTP/1.1 wants origin-form; the Host header carries the authority.
            Proto::H1 => url.path_and_query().map_or("/", |p| p.as_str()).parse()?,
            Proto::H2 | Proto::H3 => url,
        };
        let mut builder = http::Request::get(uri);
        if self.proto == Proto::H1
            && let Some(authority) = self.url.authority()
        {
            builder = builder.header(http::header::HOST, authority.as_str());
        }
        let mut request = builder.body(())?;
        request.headers_mut().extend(self.headers.clone());
        if let Some(size) = self.range_object {
            let first = if self.range_unaligned {
                next_random(seed) % (size.saturating_sub(RANGE) + 1)
            } else {
                (next_random(seed) % size.div_ceil(RANGE).max(1)) * RANGE
            };
            let last = (first + RANGE).min(size) - 1;
            request.headers_mut().insert(http::header::RANGE, format!("bytes={first}-{last}").parse()?);
        }
        Ok(request)
    }
}

/// splitmix64: plenty for picking ranges.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.enable_all().build().context("starting the runtime")?;
    let report = runtime.block_on(run(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<stats::Report> {
    anyhow::ensure!(args.connections >= 1 && args.streams >= 1, "--connections and --streams must be at least 1");
    if args.objects.is_some() {
        // `{` and `}` are not valid in a URI: the template is checked as text.
        anyhow::ensure!(
            args.url.to_string().contains("%7Bn%7D") || args.url.to_string().contains("{n}"),
            "--objects needs `{{n}}` in --url"
        );
    }
    let scheme = args.url.scheme_str().unwrap_or("");
    let tls = match scheme {
        "https" => true,
        "http" if args.proto == Proto::H1 => false,
        _ => anyhow::bail!("--url must be https:// (or http:// with --proto h1): {}", args.url),
    };
    let host = args.url.host().context("--url has no host")?.trim_matches(['[', ']']).to_string();
    let port = args.url.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let addr = match args.connect_to {
        Some(addr) => addr,
        None => tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?,
    };
    let mut headers = http::HeaderMap::new();
    for line in &args.headers {
        let (name, value) = line.split_once(':').with_context(|| format!("--header {line:?} is not `name: value`"))?;
        headers.append(http::HeaderName::try_from(name.trim())?, http::HeaderValue::try_from(value.trim())?);
    }
    let window = |size: ByteSize, flag: &str| {
        u32::try_from(size.as_u64())
            .ok()
            .filter(|w| *w >= 65_536)
            .with_context(|| format!("{flag}: {size} not in 64KiB..4GiB"))
    };
    let tls_config = tls.then(|| tls::client_config(args.proto, args.insecure)).transpose()?.map(Arc::new);
    let cpu_before = stats::process_cpu_seconds();
    let started = Instant::now();
    let plan = Arc::new(Plan {
        proto: args.proto,
        url: args.url.clone(),
        addr,
        host,
        tls,
        headers,
        range_object: args.range_random.map(|s| s.as_u64()),
        range_unaligned: args.range_unaligned,
        objects: args.objects,
        stream_window: window(args.stream_window, "--stream-window")?,
        connection_window: window(args.connection_window, "--connection-window")?,
        timeout: args.timeout,
        deadline: started + args.duration,
        tls_config,
        quic_stats: args.quic_stats,
        udp_recv_buffer: usize::try_from(args.udp_recv_buffer.as_u64()).unwrap_or(usize::MAX),
        max_udp_payload: args.max_udp_payload,
    });

    // HTTP/1.1: one loop per connection; h2/h3: `streams` loops on each connection.
    let (slots, loops) = match args.proto {
        Proto::H1 => (args.connections * args.streams, 1),
        Proto::H2 | Proto::H3 => (args.connections, args.streams),
    };
    let mut tasks = JoinSet::new();
    for slot in 0..slots {
        tasks.spawn(connection_slot(plan.clone(), loops, slot as u64));
    }
    let mut total = Stats::default();
    // Requests in flight at the deadline may finish, within the request timeout.
    let hard_stop = tokio::time::sleep_until((plan.deadline + args.timeout + Duration::from_secs(1)).into());
    tokio::pin!(hard_stop);
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                Some(stats) => total.merge(stats.context("a connection task panicked")?),
                None => break,
            },
            () = &mut hard_stop => {
                total.error(format!("{} connections still busy at the hard stop", tasks.len()));
                tasks.abort_all();
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = stats::process_cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    for (message, count) in total.error_messages() {
        eprintln!("loadgen: {count} × {message}");
    }
    Ok(total.report(&args, seconds, cpu))
}

/// One connection (re-opened when it breaks) with `loops` request loops on it.
async fn connection_slot(plan: Arc<Plan>, loops: usize, slot: u64) -> Stats {
    let mut stats = Stats::default();
    let mut seed = slot.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x5EED;
    while Instant::now() < plan.deadline {
        let connected = tokio::time::timeout(plan.timeout, Connection::open(&plan, loops)).await;
        let connection = match connected {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => {
                stats.error(format!("connect: {error:#}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                stats.error("connect: timed out".into());
                continue;
            }
        };
        let (senders, guard) = connection.split();
        let mut set = JoinSet::new();
        for sender in senders {
            seed = next_random(&mut seed);
            set.spawn(request_loop(plan.clone(), sender, seed));
        }
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(loop_stats) => stats.merge(loop_stats),
                Err(error) => stats.error(format!("request loop: {error}")),
            }
        }
        guard.close(plan.quic_stats);
    }
    stats
}

/// Requests one after another until the deadline, or until the connection breaks.
async fn request_loop(plan: Arc<Plan>, mut sender: client::Sender, mut seed: u64) -> Stats {
    let mut stats = Stats::default();
    while Instant::now() < plan.deadline {
        let request = match plan.request(&mut seed) {
            Ok(request) => request,
            Err(error) => {
                stats.error(format!("building the request: {error}"));
                return stats;
            }
        };
        let start = Instant::now();
        let mut fetched = Fetched::default();
        let result = tokio::time::timeout(plan.timeout, sender.fetch(request, &mut fetched)).await;
        stats.bytes += fetched.bytes;
        match result {
            Ok(Ok(())) if plan.range_object.is_some() && fetched.status != http::StatusCode::PARTIAL_CONTENT => {
                stats.error(format!("status {} for a range request", fetched.status));
            }
            Ok(Ok(())) if fetched.status.is_success() => stats.ok(start.elapsed(), fetched.hit),
            Ok(Ok(())) => stats.error(format!("status {}", fetched.status)),
            Ok(Err(error)) => {
                stats.error(format!("{error:#}"));
                return stats; // the connection is probably gone: reconnect
            }
            Err(_) => {
                stats.error("request timed out".into());
                return stats;
            }
        }
    }
    stats
}

#[cfg(test)]
mod tests {
    #[test]
    fn uri_keeps_braces() {
        let uri: http::Uri = "http://127.0.0.1:8080/_gen/1MiB?v={n}".parse().unwrap();
        assert_eq!(uri.to_string(), "http://127.0.0.1:8080/_gen/1MiB?v={n}");
    }
}
