//! `cdn dev`: the whole CDN on loopback in one process.
//!
//! The topology of DESIGN.md: an origin on 127.0.0.1:8080 serving a content folder,
//! and three edges in three regions on 127.0.0.11, .12 and .13 (HTTP 8080, HTTPS
//! 8443, admin 9090). A self-signed certificate for all of them is made on first
//! run and kept in the dev data directory, so a browser told to trust it once keeps
//! trusting it.
//!
//! A second origin on 127.0.0.1:8081 serves a second folder (`examples/content-shop`),
//! and the routing document `examples/routing.toml` is applied through the control
//! API as an operator would (`cdn routing apply`): the site `video` on origin 1 with
//! origin 2 as its backup, the site `shop` on origin 2. The file is applied only when
//! it differs from the document the control node holds, so restarting `cdn dev` on
//! the same data directory keeps the version. Origin 1 stops while the file
//! `<data-dir>/origin-1.down` exists (and starts again once it is removed): the way to
//! watch the edges fail over to origin 2 and back.
//!
//! The edges keep their `[origin]` (origin 1): it is the implicit site they serve by
//! until they have applied the document, and the document's default site is on the
//! same origin, so requests by address (`curl http://127.0.0.11:8080/...`) are
//! answered alike before and after.
//!
//! Each role runs as one task of a [`Supervisor`]: when a role fails (one of its own
//! tasks failed), every role stops gracefully and `cdn dev` exits with 1.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use cdn_cluster::routing::Routing;
use cdn_control::{
    client::{ClientError, ControlClient},
    routing::Format,
};
use cdn_node::supervise::Supervisor;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Options of `cdn dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Content directory the origin serves.
    #[arg(long, default_value = "examples/content")]
    pub(crate) content: PathBuf,
    /// Content directory origin 2 (127.0.0.1:8081) serves.
    #[arg(long, default_value = "examples/content-shop")]
    pub(crate) shop_content: PathBuf,
    /// The routing document applied at start (TOML when the name ends in `.toml`,
    /// else JSON), when it differs from the one the control node holds.
    #[arg(long, default_value = "examples/routing.toml")]
    pub(crate) routing: PathBuf,
    /// Where the development certificate, the control node's purge log and routing
    /// document, the edges' disk tiers and origin 1's switch file are kept.
    #[arg(long, default_value = ".dev-data")]
    pub(crate) data_dir: PathBuf,
    /// The control API token (default: a new random one, printed).
    #[arg(long, env = "CDN_TOKEN")]
    pub(crate) token: Option<String>,
}

/// An edge of the dev topology.
pub(crate) struct DevEdge {
    pub(crate) node_id: &'static str,
    pub(crate) ip: Ipv4Addr,
    /// Clients in this documentation network (RFC 5737) are in the edge's region.
    pub(crate) clients: &'static str,
    pub(crate) lat: f64,
    pub(crate) lon: f64,
}

/// The three edges of `cdn dev`.
pub(crate) const EDGES: [DevEdge; 3] = [
    DevEdge { node_id: "us-east", ip: Ipv4Addr::new(127, 0, 0, 11), clients: "192.0.2.0/24", lat: 40.71, lon: -74.01 },
    DevEdge {
        node_id: "eu-west",
        ip: Ipv4Addr::new(127, 0, 0, 12),
        clients: "198.51.100.0/24",
        lat: 53.35,
        lon: -6.26,
    },
    DevEdge {
        node_id: "ap-south",
        ip: Ipv4Addr::new(127, 0, 0, 13),
        clients: "203.0.113.0/24",
        lat: 19.08,
        lon: 72.88,
    },
];

const ORIGIN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
/// Origin 2: the `shop` site, and the `video` site's backup.
const ORIGIN_2: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8081);
const CONTROL_API: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9000);
const DNS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5300);
const GEO_GOSSIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7947);
const CONTROL_GOSSIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7946);
/// Gossip port of every dev edge (on its own address).
const EDGE_GOSSIP_PORT: u16 = 7946;

/// Makes (or reuses) the development certificate; returns the cert and key paths.
fn dev_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let names = vec!["cdn.test".to_string(), "www.cdn.test".to_string(), "*.cdn.test".to_string()];
    let ips: Vec<IpAddr> = EDGES.iter().map(|e| IpAddr::V4(e.ip)).collect();
    let (cert_pem, key_pem) = cdn_node::tls::self_signed_pem(&names, &ips)?;
    std::fs::write(&cert, cert_pem).with_context(|| format!("writing {}", cert.display()))?;
    std::fs::write(&key, key_pem).with_context(|| format!("writing {}", key.display()))?;
    info!(path = %cert.display(), "created the development certificate");
    Ok((cert, key))
}

pub(crate) async fn run(args: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    for (dir, flag) in [(&args.content, "--content"), (&args.shop_content, "--shop-content")] {
        anyhow::ensure!(
            dir.is_dir(),
            "content directory {} does not exist (run from the repository root or pass {flag} DIR)",
            dir.display()
        );
    }
    let routing = read_routing(&args.routing)?;
    let (cert, key) = dev_certificate(&args.data_dir)?;
    let tls = cdn_node::tls::TlsConfig { cert: Some(cert.clone()), key: Some(key.clone()), ..Default::default() };
    let spki = cdn_node::tls::CertifiedKey::from_pem_files(&cert, &key)?.spki_sha256_base64()?;

    // Each role is one task: a role that fails (returns its error) stops the others.
    let mut roles = Supervisor::new("dev", shutdown.clone(), None);
    let token = args.token.clone().unwrap_or_else(cdn_control::server::random_token);
    // A new gossip secret per run: nothing outside this process can join.
    let secret = cdn_control::server::random_token();

    let mut origin = cdn_origin::Config::new(&args.content);
    origin.listen.http = ORIGIN;
    origin.listen.admin = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9091)));
    origin.generate = true;
    origin.rules = vec![
        cdn_origin::config::Rule {
            path_prefix: "/v/".into(),
            cache_control: Some("public, max-age=86400".into()),
            surrogate_keys: vec!["video".into()],
        },
        cdn_origin::config::Rule {
            path_prefix: "/index.html".into(),
            cache_control: Some("public, max-age=10, stale-while-revalidate=30".into()),
            surrogate_keys: vec!["page".into()],
        },
    ];
    origin.validate()?;
    // A switch file left over from an earlier run does not keep origin 1 down.
    let down = args.data_dir.join(ORIGIN_1_DOWN);
    if down.exists() {
        std::fs::remove_file(&down).with_context(|| format!("removing {}", down.display()))?;
        info!(file = %down.display(), "removed an earlier run's switch file: origin 1 starts up");
    }
    let first = cdn_origin::Origin::bind(origin.clone(), &prometheus::Registry::new()).await.context("origin 1")?;
    roles.spawn("origin-1", switched_origin(origin, first, down.clone(), shutdown.clone()));

    let mut shop = cdn_origin::Config::new(&args.shop_content);
    shop.listen.http = ORIGIN_2;
    shop.listen.admin = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9092)));
    shop.rules = vec![cdn_origin::config::Rule {
        path_prefix: "/static/".into(),
        cache_control: Some("public, max-age=3600".into()),
        surrogate_keys: vec!["shop-static".into()],
    }];
    shop.validate()?;
    let shop = cdn_origin::Origin::bind(shop, &prometheus::Registry::new()).await.context("origin 2")?;
    roles.spawn("origin-2", shop.serve(shutdown.clone()));

    let mut control = cdn_control::server::Config::new("control", args.data_dir.join("control"), token.clone());
    control.listen.api = CONTROL_API;
    control.listen.admin = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9001)));
    control.cluster = Some(cdn_cluster::ClusterConfig::new(CONTROL_GOSSIP, secret.clone()));
    let control = cdn_control::server::Control::bind(control, &prometheus::Registry::new()).await.context("control")?;
    roles.spawn("control", control.serve(shutdown.clone()));

    for edge in &EDGES {
        // `[origin]` stays: the implicit site until the routing document is applied.
        let mut config = cdn_edge::Config::new(edge.node_id, format!("http://{ORIGIN}"));
        config.region = edge.node_id.to_string();
        config.location = cdn_edge::config::Location { lat: edge.lat, lon: edge.lon };
        config.public_addr = Some(IpAddr::V4(edge.ip));
        config.listen.http = Some(SocketAddr::from((edge.ip, 8080)));
        config.listen.https = Some(SocketAddr::from((edge.ip, 8443)));
        config.listen.h3 = Some(SocketAddr::from((edge.ip, 8443)));
        config.listen.admin = Some(SocketAddr::from((edge.ip, 9090)));
        config.tls = Some(tls.clone());
        config.cache.memory = bytesize::ByteSize::mib(128);
        // A small disk tier each: a restarted `cdn dev` starts warm.
        config.cache.disk = vec![cdn_edge::config::Disk {
            path: args.data_dir.join("edges").join(edge.node_id),
            size: bytesize::ByteSize::gib(1),
        }];
        let mut cluster =
            cdn_cluster::ClusterConfig::new(SocketAddr::from((edge.ip, EDGE_GOSSIP_PORT)), secret.clone());
        cluster.seeds = vec![CONTROL_GOSSIP.to_string()];
        config.cluster = Some(cluster);
        let bound = cdn_edge::Edge::bind(config, &prometheus::Registry::new())
            .await
            .with_context(|| format!("edge {}", edge.node_id))?;
        roles.spawn(edge.node_id, bound.serve(shutdown.clone()));
    }

    let mut geo = cdn_geo::Config::new("cdn.test.");
    geo.listen.dns = DNS;
    geo.listen.admin = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9053)));
    geo.default_region = Some(EDGES[0].node_id.to_string());
    geo.networks = EDGES
        .iter()
        .map(|edge| cdn_geo::config::Network {
            cidr: edge.clients.to_string(),
            location: Some(cdn_geo::config::Location { lat: edge.lat, lon: edge.lon }),
            region: Some(edge.node_id.to_string()),
        })
        .collect();
    let mut cluster = cdn_cluster::ClusterConfig::new(GEO_GOSSIP, secret.clone());
    cluster.seeds = vec![CONTROL_GOSSIP.to_string()];
    geo.cluster = Some(cluster);
    geo.validate()?;
    roles.spawn("geo", cdn_geo::run(geo, shutdown.clone(), prometheus::Registry::new()));

    // The routing document goes through the control API like an operator's
    // `cdn routing apply`; then the banner, with what to try.
    let banner = Banner { spki, token: token.clone(), data_dir: args.data_dir.clone() };
    let shutdown_apply = shutdown.clone();
    roles.spawn_job("routing", async move {
        tokio::select! {
            () = shutdown_apply.cancelled() => {}
            applied = apply_routing(&args.routing, routing, &token) => {
                let applied = applied
                    .inspect_err(|error| warn!("routing document {} not applied: {error:#}", args.routing.display()))
                    .ok();
                print_banner(&banner, &args.routing, applied.as_ref());
            }
        }
        anyhow::Ok(())
    });

    // Until Ctrl-C, or until one role fails: then the others stop gracefully too.
    roles.run().await?;
    Ok(())
}

/// The file (under the data directory) whose presence stops origin 1.
const ORIGIN_1_DOWN: &str = "origin-1.down";

/// Origin 1: serves until `<data-dir>/origin-1.down` exists, is stopped while it
/// does, and starts again (bound anew, on the same address) once it is gone.
async fn switched_origin(
    config: cdn_origin::Config,
    first: cdn_origin::Origin,
    down: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut bound = Some(first);
    loop {
        let origin = match bound.take() {
            Some(origin) => origin,
            None => {
                if !wait_for(&down, false, &shutdown).await {
                    return Ok(());
                }
                let origin = cdn_origin::Origin::bind(config.clone(), &prometheus::Registry::new())
                    .await
                    .context("origin 1 (starting again)")?;
                info!(file = %down.display(), "origin 1 started again: the switch file is gone");
                origin
            }
        };
        let stop = shutdown.child_token();
        let mut serving = std::pin::pin!(origin.serve(stop.clone()));
        tokio::select! {
            served = &mut serving => return Ok(served?),
            switched = wait_for(&down, true, &shutdown) => {
                stop.cancel();
                serving.await?;
                if !switched {
                    return Ok(());
                }
                info!(
                    file = %down.display(),
                    "origin 1 stopped while the switch file exists: the video site fails over to origin 2"
                );
            }
        }
    }
}

/// Waits until `path` exists (or, with `exists` false, is gone): `true`; `false` when
/// `shutdown` came first.
async fn wait_for(path: &Path, exists: bool, shutdown: &CancellationToken) -> bool {
    loop {
        if shutdown.is_cancelled() {
            return false;
        }
        if path.exists() == exists {
            return true;
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Reads and validates the routing document before anything starts: a bad file
/// stops `cdn dev` with every problem.
fn read_routing(path: &Path) -> anyhow::Result<(Vec<u8>, Routing)> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the routing document {} (run from the repository root or pass --routing FILE)",
            path.display()
        )
    })?;
    match cdn_control::routing::parse(&bytes, Format::from_path(path)) {
        Ok(routing) => Ok((bytes, routing)),
        Err(refusal) => anyhow::bail!("{}: {}:\n  {}", path.display(), refusal.error, refusal.problems.join("\n  ")),
    }
}

/// What the control node holds after [`apply_routing`].
struct Applied {
    version: u64,
    /// Whether this start sent it (else it was already there).
    sent: bool,
    routing: Routing,
    /// Edges that serve by it, out of all the control node sees.
    edges: (usize, usize),
}

/// Sends the document to the control API unless the control node already holds the
/// same one (so restarts keep the version), then waits a little for the edges to
/// report it.
async fn apply_routing(path: &Path, (bytes, routing): (Vec<u8>, Routing), token: &str) -> anyhow::Result<Applied> {
    let client = ControlClient::new(&format!("http://{CONTROL_API}"), token)?;
    let held = match client.routing_get().await {
        Ok(view) => Some(view),
        Err(ClientError::NoRouting) => None,
        Err(error) => return Err(error.into()),
    };
    let (version, sent) = match held {
        Some(view) if view.routing == routing => {
            info!(version = view.version, file = %path.display(), "the control node already holds this routing document");
            (view.version, false)
        }
        _ => {
            let ack = match client.routing_put(bytes, Format::from_path(path)).await {
                Ok(ack) => ack,
                Err(ClientError::InvalidRouting { problems, .. }) => {
                    anyhow::bail!("refused:\n  {}", problems.join("\n  "))
                }
                Err(error) => return Err(error.into()),
            };
            info!(version = ack.version, by = %ack.by, file = %path.display(), "routing document applied");
            (ack.version, true)
        }
    };
    // The edges report the version they serve by; wait for all three (briefly).
    let started = Instant::now();
    let edges = loop {
        let view = client.routing_get().await?;
        let serving = view.edges.values().filter(|v| **v >= version).count();
        if (serving >= EDGES.len() && view.edges.len() >= EDGES.len()) || started.elapsed() > Duration::from_secs(10) {
            break (serving, view.edges.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if edges.0 < EDGES.len() {
        warn!(version, serving = edges.0, "not every edge serves by the routing document yet");
    }
    Ok(Applied { version, sent, routing, edges })
}

/// What the banner shows besides the routing document.
struct Banner {
    spki: String,
    token: String,
    data_dir: PathBuf,
}

fn print_banner(banner: &Banner, path: &Path, applied: Option<&Applied>) {
    let Banner { spki, token, data_dir } = banner;
    let e = &EDGES;
    let routing = match applied {
        Some(applied) => {
            let how = if applied.sent { "applied now" } else { "already held by the control node" };
            let mut lines = vec![format!(
                "{}, version {} ({how}); edges serving by it: {} of {}",
                path.display(),
                applied.version,
                applied.edges.0,
                applied.edges.1
            )];
            for site in &applied.routing.sites {
                let default = if applied.routing.default_site.as_deref() == Some(site.name.as_str()) {
                    ", the default"
                } else {
                    ""
                };
                let origins: Vec<String> = site
                    .origins
                    .iter()
                    .map(|o| {
                        format!("{}{}", o.url.trim_start_matches("http://"), if o.backup { " (backup)" } else { "" })
                    })
                    .collect();
                lines.push(format!(
                    "  site {:<6} {} -> {}{default}",
                    site.name,
                    if site.hosts.is_empty() { "(no hosts)".to_string() } else { site.hosts.join(" ") },
                    origins.join(", ")
                ));
            }
            lines.join("\n              ")
        }
        None => format!("{} NOT applied (see the log); the edges serve everything from origin 1", path.display()),
    };
    let down = data_dir.join(ORIGIN_1_DOWN);
    println!(
        r#"
  The local CDN is up.  Ctrl-C stops it.

  origin 1    http://127.0.0.1:8080/             (content, /_gen/<size> test objects)
  origin 2    http://127.0.0.1:8081/             (the shop content)
  edges       {a}  {b}  {c}   http :8080  https+h3 :8443  admin :9090
  control     http://127.0.0.1:9000/v1/          token {token}
  geo-DNS     127.0.0.1:5300 (udp+tcp), zone cdn.test.  clients 192.0.2.0/24 → us-east,
              198.51.100.0/24 → eu-west, 203.0.113.0/24 → ap-south
  routing     {routing}

  Try:
    curl -si http://{ai}:8080/hello.txt | grep -i -E 'x-cache|x-served-by|age'
    curl -si http://{bi}:8080/hello.txt | grep -i -E 'x-cache|x-served-by|age'
    curl -sik --http2 https://{ci}:8443/v/demo.mp4 -r 0-99 -o /dev/null -w '%{{http_version}} %{{http_code}}\n'
    curl -s http://{ai}:9090/metrics | grep cdn_requests_total
    curl -s -H 'Authorization: Bearer {token}' http://127.0.0.1:9000/v1/nodes
    dig @127.0.0.1 -p 5300 www.cdn.test A +subnet=198.51.100.0/24 +short
    curl -s -H 'Authorization: Bearer {token}' -d '{{"tags":["video"]}}' http://127.0.0.1:9000/v1/purge

  Sites, rules and failover (examples/routing.toml):
    curl -s -H 'Host: shop.cdn.test' http://{ai}:8080/hello.txt     # origin 2: the shop site
    curl -si -H 'Host: shop.cdn.test' http://{ai}:8080/api/cart.json | grep -i '^x-cache'   # BYPASS, every time
    curl -si http://{ai}:8080/hls/index.m3u8 | grep -i '^x-cache'    # HIT for 2 s, then asked again
    curl -si 'http://{ai}:8080/hello.txt?utm_source=a' | grep -i '^x-cache'   # any utm_*: one object
    touch {down}          # stops origin 1, so:
    curl -s 'http://{ai}:8080/hello.txt?n=1'                          # origin 2, the video site's backup
    rm {down}             # origin 1 again (after 2 good probes)
    CDN_TOKEN={token} cdn routing show

  Demo page (plays video through an edge):
    https://{ai}:8443/       (self-signed: trust .dev-data/cert.pem, or start Chromium with:)
    --ignore-certificate-errors-spki-list={spki}
"#,
        a = e[0].node_id,
        b = e[1].node_id,
        c = e[2].node_id,
        ai = e[0].ip,
        bi = e[1].ip,
        ci = e[2].ip,
        down = down.display(),
    );
}
