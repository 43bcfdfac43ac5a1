//! `cdn dev`: the whole CDN on loopback in one process.
//!
//! The topology of DESIGN.md: an origin on 127.0.0.1:8080 serving a content folder,
//! and three edges in three regions on 127.0.0.11, .12 and .13 (HTTP 8080, HTTPS
//! 8443, admin 9090). A self-signed certificate for all of them is made on first
//! run and kept in the dev data directory, so a browser told to trust it once keeps
//! trusting it.
//!
//! Each role runs as one task of a [`Supervisor`]: when a role fails (one of its own
//! tasks failed), every role stops gracefully and `cdn dev` exits with 1.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use cdn_node::supervise::Supervisor;
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Options of `cdn dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Content directory the origin serves.
    #[arg(long, default_value = "examples/content")]
    pub(crate) content: PathBuf,
    /// Where the development certificate and the purge log are kept.
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
    anyhow::ensure!(
        args.content.is_dir(),
        "content directory {} does not exist (run from the repository root or pass --content DIR)",
        args.content.display()
    );
    let (cert, key) = dev_certificate(&args.data_dir)?;
    let tls = cdn_node::tls::TlsConfig { cert: Some(cert.clone()), key: Some(key.clone()), self_signed: false };
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
    let origin = cdn_origin::Origin::bind(origin, &prometheus::Registry::new()).await.context("origin")?;
    roles.spawn("origin", origin.serve(shutdown.clone()));

    let mut control = cdn_control::server::Config::new("control", args.data_dir.join("control"), token.clone());
    control.listen.api = CONTROL_API;
    control.listen.admin = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 9001)));
    control.cluster = Some(cdn_cluster::ClusterConfig::new(CONTROL_GOSSIP, secret.clone()));
    let control = cdn_control::server::Control::bind(control, &prometheus::Registry::new()).await.context("control")?;
    roles.spawn("control", control.serve(shutdown.clone()));

    for edge in &EDGES {
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

    print_banner(&spki, &token);

    // Until Ctrl-C, or until one role fails: then the others stop gracefully too.
    roles.run().await?;
    Ok(())
}

fn print_banner(spki: &str, token: &str) {
    let e = &EDGES;
    println!(
        r#"
  The local CDN is up.  Ctrl-C stops it.

  origin      http://127.0.0.1:8080/             (content, /_gen/<size> test objects)
  edges       {a}  {b}  {c}   http :8080  https+h3 :8443  admin :9090
  control     http://127.0.0.1:9000/v1/          token {token}
  geo-DNS     127.0.0.1:5300 (udp+tcp), zone cdn.test.  clients 192.0.2.0/24 → us-east,
              198.51.100.0/24 → eu-west, 203.0.113.0/24 → ap-south

  Try:
    curl -si http://{ai}:8080/hello.txt | grep -i -E 'x-cache|x-served-by|age'
    curl -si http://{bi}:8080/hello.txt | grep -i -E 'x-cache|x-served-by|age'
    curl -sik --http2 https://{ci}:8443/v/demo.mp4 -r 0-99 -o /dev/null -w '%{{http_version}} %{{http_code}}\n'
    curl -s http://{ai}:9090/metrics | grep cdn_requests_total
    curl -s -H 'Authorization: Bearer {token}' http://127.0.0.1:9000/v1/nodes
    dig @127.0.0.1 -p 5300 www.cdn.test A +subnet=198.51.100.0/24 +short
    curl -s -H 'Authorization: Bearer {token}' -d '{{"tags":["video"]}}' http://127.0.0.1:9000/v1/purge

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
    );
}
