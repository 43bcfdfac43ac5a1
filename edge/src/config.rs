//! The edge's configuration (`cdn edge --config edge.toml`).

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use bytesize::ByteSize;
use cdn_node::{ConfigError, tls::TlsConfig};
use serde::Deserialize;

/// The largest datagram sent with segmentation offload (GSO). quinn hands the kernel
/// up to 10 datagrams per `sendmsg`, and Linux refuses a GSO send of more than 64 KiB
/// (EMSGSIZE): with larger datagrams every batch would be lost, and quinn's path-MTU
/// discovery would fall back to 1200 bytes. Above this, datagrams go out one by one.
pub(crate) const GSO_MAX_PAYLOAD: u16 = 6500;

/// Everything an edge needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id, in `X-Served-By`, metrics and the cluster.
    pub node_id: String,
    /// The region this edge serves (e.g. `us-east`).
    #[serde(default = "default_region")]
    pub region: String,
    /// Where the edge is, for nearest-edge DNS answers.
    #[serde(default)]
    pub location: Location,
    /// The address DNS hands out for this edge (defaults to the HTTPS/HTTP listen address).
    pub public_addr: Option<IpAddr>,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// TLS for the HTTPS and HTTP/3 listeners.
    pub tls: Option<TlsConfig>,
    /// The origin the edge pulls from until a routing document exists (the
    /// implicit site, answering every Host). Required without `[cluster]`.
    pub origin: Option<Origin>,
    /// The cache.
    #[serde(default)]
    pub cache: Cache,
    /// Client-facing connection limits.
    #[serde(default)]
    pub limits: Limits,
    /// QUIC transport of the HTTP/3 listener.
    #[serde(default)]
    pub quic: Quic,
    /// The cluster to join (purges, routing, health); standalone without it.
    pub cluster: Option<cdn_cluster::ClusterConfig>,
    /// Keys for signed URLs (RFC 9246), `[[signing.keys]]`.
    #[serde(default)]
    pub signing: crate::signing::SigningConfig,
    /// The access log (`[access_log]`); none when absent.
    pub access_log: Option<crate::access_log::Settings>,
    /// `[log] access = "path"`: the short form of `[access_log] path` (defaults
    /// for the rest).
    #[serde(default)]
    pub log: Log,
}

/// QUIC congestion controllers quinn offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// CUBIC (RFC 9438), quinn's default.
    Cubic,
    /// BBR (quinn marks it experimental).
    Bbr,
    /// NewReno.
    #[serde(rename = "newreno")]
    NewReno,
}

/// `[quic]`: transport settings of the HTTP/3 listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Quic {
    /// Congestion controller: `cubic`, `bbr` or `newreno`.
    pub congestion: Congestion,
    /// A connection with no traffic for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Flow-control window per stream (what a client may have in flight per request).
    pub stream_window: ByteSize,
    /// Flow-control window per connection.
    pub connection_window: ByteSize,
    /// The largest UDP payload path-MTU discovery may try (1200..=65527), never more
    /// than the client accepts. Probing above a path's MTU only costs lost probes;
    /// paths with a larger MTU (jumbo frames, loopback) carry more per datagram. Up to
    /// 6500 datagrams leave in batches (GSO); above, one by one.
    pub max_udp_payload: u16,
    /// Kernel send and receive buffer of the QUIC socket (capped by
    /// `net.core.wmem_max` / `rmem_max`).
    pub socket_buffer: ByteSize,
}

impl Default for Quic {
    fn default() -> Self {
        Self {
            congestion: Congestion::Cubic,
            idle_timeout: Duration::from_secs(30),
            stream_window: ByteSize::mib(4),
            connection_window: ByteSize::mib(16),
            max_udp_payload: GSO_MAX_PAYLOAD,
            socket_buffer: ByteSize::mib(4),
        }
    }
}

fn default_region() -> String {
    "default".into()
}

/// A point on the globe, degrees (the project's one lat/lon type).
pub type Location = cdn_node::location::GeoPoint;

/// `[listen]`. Keys left out keep their defaults (HTTP on 127.0.0.1:8081, admin on
/// 127.0.0.1:9090, no HTTPS or HTTP/3).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Plain HTTP (HTTP/1.1 and h2c).
    pub http: Option<SocketAddr>,
    /// HTTPS (HTTP/1.1 and HTTP/2 over TLS).
    pub https: Option<SocketAddr>,
    /// HTTP/3 over QUIC (UDP); usually the same port as `https`.
    pub h3: Option<SocketAddr>,
    /// Admin: `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            https: None,
            h3: None,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
        }
    }
}

/// `[origin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// Base URL, `http://host:port` or `https://…`; request paths are appended.
    pub url: String,
    /// Time to establish a connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time to wait for response headers, and the longest pause between body chunks.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Host header sent to the origin; by default the client's.
    pub host: Option<String>,
    /// Accept any certificate from an `https` origin (testing only).
    #[serde(default)]
    pub insecure: bool,
    /// Paths of the implicit site that need a signed URL (as a routing document's
    /// `signed`).
    pub signed: Option<cdn_cluster::routing::Signed>,
}

/// `origin.connect_timeout` when not set (and for a routing document's origins
/// when there is no `[origin]`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// `origin.timeout` when not set (and for a routing document's origins when there
/// is no `[origin]`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

fn default_connect_timeout() -> Duration {
    DEFAULT_CONNECT_TIMEOUT
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Memory bound of the cache (bodies plus headers).
    #[serde(default = "default_memory")]
    pub memory: ByteSize,
    /// Slice size for large objects.
    #[serde(default = "default_slice")]
    pub slice: ByteSize,
    /// Largest object stored whole; larger ones are streamed (or sliced).
    #[serde(default = "default_max_object")]
    pub max_object: ByteSize,
    /// Leave the query string out of the cache key.
    #[serde(default)]
    pub ignore_query: bool,
    /// Store responses that set cookies (off: they are passed through).
    #[serde(default)]
    pub store_set_cookie: bool,
    /// Cap of heuristic freshness (10% of Date − Last-Modified).
    #[serde(default = "default_heuristic_max", with = "humantime_serde")]
    pub heuristic_max: Duration,
    /// The disk tier: one `[[cache.disk]]` table per disk (none: memory only).
    #[serde(default)]
    pub disk: Vec<Disk>,
    /// Compress text the origin sends uncompressed, once, into stored `br` and
    /// `gzip` variants (docs/caching.md, "Compression").
    #[serde(default = "default_compress")]
    pub compress: bool,
    /// Bodies smaller than this are not compressed.
    #[serde(default = "default_compress_min")]
    pub compress_min: ByteSize,
}

fn default_compress() -> bool {
    true
}

fn default_compress_min() -> ByteSize {
    ByteSize::b(256)
}

/// `[[cache.disk]]`: one directory of the disk tier.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// A directory of its own (created if missing; locked against a second edge).
    pub path: std::path::PathBuf,
    /// The most the cache keeps in it (files, as the filesystem counts them).
    pub size: ByteSize,
}

fn default_memory() -> ByteSize {
    ByteSize::mib(512)
}

fn default_slice() -> ByteSize {
    ByteSize::mib(1)
}

fn default_max_object() -> ByteSize {
    ByteSize::mib(64)
}

fn default_heuristic_max() -> Duration {
    Duration::from_secs(86_400)
}

impl Default for Cache {
    fn default() -> Self {
        Self {
            memory: default_memory(),
            slice: default_slice(),
            max_object: default_max_object(),
            ignore_query: false,
            store_set_cookie: false,
            heuristic_max: default_heuristic_max(),
            disk: Vec::new(),
            compress: default_compress(),
            compress_min: default_compress_min(),
        }
    }
}

/// `[limits]`: what one client may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Time allowed for the TLS handshake and for request headers.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head.
    #[serde(default = "default_max_header")]
    pub max_header_size: ByteSize,
    /// Concurrent streams per HTTP/2 or HTTP/3 connection.
    #[serde(default = "default_streams")]
    pub max_concurrent_streams: u32,
    /// Open client connections per listener.
    #[serde(default = "default_connections")]
    pub max_connections: usize,
    /// A client connection (HTTP/1.1, HTTP/2 or HTTP/3) with no request in
    /// progress for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A client that takes no response data for this long is disconnected (slow or
    /// stalled readers; time spent waiting on the origin does not count).
    #[serde(default = "default_send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// How long shutdown waits for open requests.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace: Duration,
    /// Requests per second one client (IPv4 address, IPv6 /64) may send; more get
    /// 429 with `Retry-After`. None: no limit.
    #[serde(default)]
    pub client_rps: Option<u32>,
    /// Requests a client may send at once above its rate (default: the rate).
    #[serde(default)]
    pub client_burst: Option<u32>,
    /// Open connections one client may have (TCP and QUIC counted together); more
    /// are closed at accept. None: no limit.
    #[serde(default)]
    pub client_connections: Option<u32>,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_header() -> ByteSize {
    ByteSize::kib(64)
}

fn default_streams() -> u32 {
    256
}

fn default_connections() -> usize {
    10_000
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_send_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_grace() -> Duration {
    Duration::from_secs(10)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: default_header_timeout(),
            max_header_size: default_max_header(),
            max_concurrent_streams: default_streams(),
            max_connections: default_connections(),
            idle_timeout: default_idle_timeout(),
            send_timeout: default_send_timeout(),
            grace: default_grace(),
            client_rps: None,
            client_burst: None,
            client_connections: None,
        }
    }
}

impl Limits {
    pub(crate) fn listener(&self) -> cdn_node::listener::Limits {
        cdn_node::listener::Limits {
            header_read_timeout: self.header_read_timeout,
            max_header_size: usize::try_from(self.max_header_size.as_u64()).unwrap_or(usize::MAX),
            max_concurrent_streams: self.max_concurrent_streams,
            max_connections: self.max_connections,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            grace: self.grace,
            connections: None,
            closed: None,
            admission: None,
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// The access log's file (`"-"`: standard output).
    pub access: Option<std::path::PathBuf>,
}

impl Config {
    /// The access log's settings, from `[access_log]` or `[log] access`.
    pub fn access_log_settings(&self) -> Option<crate::access_log::Settings> {
        self.access_log.clone().or_else(|| self.log.access.as_ref().map(crate::access_log::Settings::new))
    }

    /// A config for an edge of `node_id` in front of `origin_url`, defaults elsewhere.
    pub fn new(node_id: impl Into<String>, origin_url: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            region: default_region(),
            location: Location::default(),
            public_addr: None,
            listen: Listen::default(),
            tls: None,
            origin: Some(Origin {
                url: origin_url.into(),
                connect_timeout: default_connect_timeout(),
                timeout: default_timeout(),
                host: None,
                insecure: false,
                signed: None,
            }),
            cache: Cache::default(),
            limits: Limits::default(),
            quic: Quic::default(),
            cluster: None,
            signing: crate::signing::SigningConfig::default(),
            access_log: None,
            log: Log::default(),
        }
    }

    /// Checks every value, naming the key of each problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        problems.extend(cdn_node::secret::node_id_problem(&self.node_id));
        problems.extend(self.location.problems("location"));
        match &self.origin {
            Some(origin) => {
                match origin.url.parse::<http::Uri>() {
                    Ok(uri) if matches!(uri.scheme_str(), Some("http" | "https")) && uri.authority().is_some() => {}
                    _ => problems.push(format!("origin.url: {:?} is not an http:// or https:// URL", origin.url)),
                }
                if origin.timeout.is_zero() {
                    problems.push("origin.timeout: must be more than 0s".into());
                }
                if origin.connect_timeout.is_zero() {
                    problems.push("origin.connect_timeout: must be more than 0s".into());
                }
                if let Some(host) = &origin.host
                    && http::HeaderValue::from_str(host).is_err()
                {
                    problems.push(format!("origin.host: {host:?} is not a valid Host header"));
                }
                if let Some(signed) = &origin.signed {
                    problems.extend(signed.problems("origin.signed"));
                    for (k, id) in signed.keys.iter().enumerate() {
                        if !self.signing.has(id) {
                            problems.push(format!("origin.signed.keys[{k}]: {id:?} is not in [[signing.keys]]"));
                        }
                    }
                }
            }
            None if self.cluster.is_none() => problems.push(
                "origin: required without [cluster] (with a cluster, the routing document can name the origins)".into(),
            ),
            None => {}
        }
        if self.listen.http.is_none() && self.listen.https.is_none() {
            problems.push("listen: set listen.http or listen.https".into());
        }
        if self.listen.https.is_some() || self.listen.h3.is_some() {
            match &self.tls {
                Some(tls) => problems.extend(tls.problems("tls")),
                None => problems.push("tls: required when listen.https or listen.h3 is set".into()),
            }
        }
        if self.cache.slice.as_u64() < 64 * 1024 || self.cache.slice.as_u64() > 64 * 1024 * 1024 {
            problems.push(format!("cache.slice: {} is not within 64KiB..64MiB", self.cache.slice));
        }
        if self.cache.max_object.as_u64() > u64::from(u32::MAX) / 2 {
            problems.push(format!("cache.max_object: {} is over 2GiB", self.cache.max_object));
        }
        if self.cache.memory.as_u64() < 1024 * 1024 {
            problems.push(format!("cache.memory: {} is under 1MiB", self.cache.memory));
        }
        for (i, disk) in self.cache.disk.iter().enumerate() {
            if disk.size.as_u64() < 16 * 1024 * 1024 {
                problems.push(format!("cache.disk[{i}].size: {} is under 16MiB", disk.size));
            }
            if disk.path.as_os_str().is_empty() {
                problems.push(format!("cache.disk[{i}].path: empty"));
            }
            if self.cache.disk[..i].iter().any(|other| other.path == disk.path) {
                problems.push(format!("cache.disk[{i}].path: {} is listed twice", disk.path.display()));
            } else if let Err(problem) = crate::cache::disk::usable(&disk.path) {
                problems.push(format!("cache.disk[{i}].path: {problem}"));
            }
        }
        if !(1200..=65527).contains(&self.quic.max_udp_payload) {
            problems.push(format!("quic.max_udp_payload: {} is not within 1200..65527", self.quic.max_udp_payload));
        }
        if self.quic.socket_buffer.as_u64() > 1024 * 1024 * 1024 {
            problems.push(format!("quic.socket_buffer: {} is over 1GiB", self.quic.socket_buffer));
        }
        if self.quic.idle_timeout.is_zero() || self.quic.idle_timeout > Duration::from_secs(3600) {
            problems.push("quic.idle_timeout: must be within 1ms..1h".into());
        }
        for (key, size) in
            [("quic.stream_window", self.quic.stream_window), ("quic.connection_window", self.quic.connection_window)]
        {
            if size.as_u64() < 64 * 1024 || size.as_u64() > u64::from(u32::MAX) {
                problems.push(format!("{key}: {size} is not within 64KiB..4GiB"));
            }
        }
        if let (Some(h3), Some(https)) = (self.listen.h3, self.listen.https)
            && h3.port() != https.port()
            && h3.port() != 0
            && https.port() != 0
        {
            problems.push(format!(
                "listen.h3: port {} differs from listen.https port {}; Alt-Svc advertises the h3 port",
                h3.port(),
                https.port()
            ));
        }
        if let Some(cluster) = &self.cluster {
            problems.extend(cluster.problems("cluster"));
        }
        problems.extend(self.signing.problems("signing"));
        if self.limits.max_connections == 0 {
            problems.push("limits.max_connections: must be at least 1".into());
        }
        if self.limits.max_concurrent_streams == 0 {
            problems.push("limits.max_concurrent_streams: must be at least 1".into());
        }
        if self.limits.client_burst.is_some_and(|b| b > 0) && self.limits.client_rps.is_none_or(|r| r == 0) {
            problems.push("limits.client_burst: needs limits.client_rps".into());
        }
        if self.access_log.is_some() && self.log.access.is_some() {
            problems.push("log.access: set either [log] access or [access_log] path, not both".into());
        }
        if let Some(access_log) = &self.access_log_settings() {
            problems.extend(access_log.problems());
        }
        ConfigError::check(problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_access_is_the_short_form_of_access_log() {
        let base = "node_id = \"a\"\n[origin]\nurl = \"http://o\"\n";
        let short: Config = toml::from_str(&format!("{base}[log]\naccess = \"/tmp/a.log\"\n")).unwrap();
        let settings = short.access_log_settings().unwrap();
        assert_eq!((settings.path.to_str(), settings.sample), (Some("/tmp/a.log"), 1.0));
        assert!(toml::from_str::<Config>(base).unwrap().access_log_settings().is_none());
        let both: Config =
            toml::from_str(&format!("{base}[log]\naccess = \"/tmp/a.log\"\n[access_log]\npath = \"/tmp/b.log\"\n"))
                .unwrap();
        let err = both.validate().unwrap_err().to_string();
        assert!(err.contains("log.access: set either"), "{err}");
    }

    #[test]
    fn sizes_and_durations_parse() {
        let config: Config = toml::from_str(
            r#"
            node_id = "us-east-1"
            region = "us-east"
            location = { lat = 40.7, lon = -74.0 }
            [origin]
            url = "http://127.0.0.1:8080"
            timeout = "250ms"
            [cache]
            memory = "512MiB"
            slice = "1MiB"
            "#,
        )
        .unwrap();
        assert_eq!(config.cache.memory.as_u64(), 512 * 1024 * 1024);
        assert_eq!(config.origin.as_ref().unwrap().timeout, Duration::from_millis(250));
        config.validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_keys() {
        let err = toml::from_str::<Config>("node_id = \"a\"\n[origin]\nurl = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = toml::from_str::<Config>("node_id = \"a\"\n[origin]\nurl = \"x\"\n[cache]\nmemory = \"lots\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("memory") || err.to_string().contains("line 5"), "{err}");
        let mut config = Config::new("", "ftp://x");
        config.location.lat = 100.0;
        config.listen.https = Some("127.0.0.1:0".parse().unwrap());
        let problems = config.validate().unwrap_err().problems;
        for key in ["node_id", "origin.url", "location.lat", "tls"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }
    }
}
