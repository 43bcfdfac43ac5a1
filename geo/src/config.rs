//! The geo-DNS configuration (`cdn geo --config geo.toml`).
//!
//! ```toml
//! node_id = "geo-1"
//! zone = "cdn.test"
//! service_names = ["www"]          # relative to the zone; "@" is the apex itself
//! answers = 2
//! ttl = "30s"
//! default_region = "us-east"
//! geoip_db = "/var/lib/cdn/GeoLite2-City.mmdb"
//! [listen]
//! dns = "0.0.0.0:53"
//! admin = "127.0.0.1:9053"
//! [[networks]]
//! cidr = "10.1.0.0/16"
//! location = { lat = 40.7, lon = -74.0 }
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use cdn_node::{ConfigError, location::GeoPoint};
use ipnet::IpNet;
use serde::Deserialize;

use crate::{locate::ClientLocation, zone::Zone};

/// Everything the geo-DNS needs to run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id, in logs, metrics and the cluster.
    pub node_id: String,
    /// The zone this server is authoritative for, e.g. `cdn.test` (trailing dot optional).
    pub zone: String,
    /// Names answered with the nearest edges, relative to the zone (`www` is
    /// `www.<zone>`); `@` is the zone apex itself.
    #[serde(default = "default_service_names")]
    pub service_names: Vec<String>,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// How many edges each A/AAAA answer carries, nearest first.
    #[serde(default = "default_answers")]
    pub answers: usize,
    /// TTL of the A/AAAA answers.
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Where clients go that no network entry or database knows: the edges of this
    /// region first (spread among them), then the others by distance from that
    /// region's edges. When unset, or when no edge has this region, unknown clients
    /// are spread over all edges.
    #[serde(default)]
    pub default_region: Option<String>,
    /// A MaxMind-format database (GeoIP2/GeoLite2/DB-IP City or Country). Reloaded
    /// when the file changes.
    #[serde(default)]
    pub geoip_db: Option<PathBuf>,
    /// How often the database file is checked for changes.
    #[serde(default = "default_geoip_reload", with = "humantime_serde")]
    pub geoip_reload: Duration,
    /// Static client networks, matched before the database (longest prefix wins).
    #[serde(default)]
    pub networks: Vec<Network>,
    /// The zone's name servers (NS records), absolute names. Empty: `ns1.<zone>`.
    #[serde(default)]
    pub ns_names: Vec<String>,
    /// Addresses answered for name servers inside the zone (and given as glue).
    /// Empty: the address of `listen.dns`, unless it is unspecified (`0.0.0.0`).
    #[serde(default)]
    pub ns_addrs: Vec<IpAddr>,
    /// The zone's SOA record.
    #[serde(default)]
    pub soa: Soa,
    /// Edges within this many kilometres of the nearest one count as equally near:
    /// answers spread over them by weight instead of all going to the nearest.
    #[serde(default = "default_near_radius")]
    pub near_radius_km: f64,
    /// An edge publishing this load (0.0..=1.0) or more leaves the answers.
    #[serde(default = "default_max_load")]
    pub max_load: f64,
    /// UDP responses per second to one client network (/24 for IPv4, /56 for
    /// IPv6); over it responses are dropped, every second one sent truncated
    /// instead so real clients retry over TCP. 0 turns the limit off.
    #[serde(default = "default_rate_limit")]
    pub rate_limit: u32,
    /// The cluster to join; the edges come from its view. Without it, geo knows no
    /// edges (useful only in tests that supply a member source).
    pub cluster: Option<cdn_cluster::ClusterConfig>,
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// DNS over UDP and TCP, on the same address.
    pub dns: SocketAddr,
    /// Admin: `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<SocketAddr>,
    /// UDP sockets on `dns`, each with its own thread (`SO_REUSEPORT`: the kernel
    /// spreads clients over them). 0: one per core.
    pub udp_sockets: usize,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            dns: SocketAddr::from(([127, 0, 0, 1], 5300)),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 9053))),
            udp_sockets: 0,
        }
    }
}

/// Most UDP sockets `listen.udp_sockets` may ask for.
const MAX_UDP_SOCKETS: usize = 256;

/// A point on the globe, degrees (the project's one lat/lon type).
pub type Location = GeoPoint;

/// `[[networks]]`: clients in `cidr` are at `location` and/or in `region`.
///
/// With a `region`, that region's edges come first (nearest to `location` first, or
/// spread when there is no location); with only a `location`, edges are ordered by
/// distance from it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// The network, e.g. `10.1.0.0/16` or `2001:db8::/32`.
    pub cidr: String,
    /// Where its clients are.
    #[serde(default)]
    pub location: Option<Location>,
    /// The region its clients belong to.
    #[serde(default)]
    pub region: Option<String>,
}

/// `[soa]`: the zone's SOA record. Names are absolute (trailing dot optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Soa {
    /// Primary name server; by default the first of `ns_names`.
    pub mname: Option<String>,
    /// Responsible mailbox, `hostmaster.cdn.test` or `hostmaster@cdn.test`; by
    /// default `hostmaster.<zone>`.
    pub rname: Option<String>,
    /// Serial number.
    pub serial: u32,
    /// Secondary refresh interval.
    #[serde(with = "humantime_serde")]
    pub refresh: Duration,
    /// Secondary retry interval.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
    /// Secondary expiry.
    #[serde(with = "humantime_serde")]
    pub expire: Duration,
    /// How long resolvers cache negative answers (NXDOMAIN, NODATA).
    #[serde(with = "humantime_serde")]
    pub minimum: Duration,
    /// TTL of the SOA and NS records and of the name servers' addresses.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
}

impl Default for Soa {
    fn default() -> Self {
        Self {
            mname: None,
            rname: None,
            serial: 1,
            refresh: Duration::from_secs(3600),
            retry: Duration::from_secs(600),
            expire: Duration::from_secs(7 * 86_400),
            minimum: Duration::from_secs(30),
            ttl: Duration::from_secs(3600),
        }
    }
}

fn default_service_names() -> Vec<String> {
    vec!["www".into()]
}

fn default_answers() -> usize {
    2
}

fn default_ttl() -> Duration {
    Duration::from_secs(30)
}

fn default_geoip_reload() -> Duration {
    Duration::from_secs(5)
}

fn default_near_radius() -> f64 {
    500.0
}

fn default_max_load() -> f64 {
    0.9
}

fn default_rate_limit() -> u32 {
    200
}

/// Largest `answers`: more would not fit a UDP answer anyway.
pub(crate) const MAX_ANSWERS: usize = 64;
/// Half the Earth's circumference: every point is within it.
const MAX_RADIUS_KM: f64 = 20_038.0;
/// Largest TTL a DNS record may carry (RFC 2181: 2^31 − 1 seconds).
const MAX_TTL: Duration = Duration::from_secs(i32::MAX as u64);

impl Config {
    /// A config for `zone` with defaults elsewhere (node id `geo`).
    pub fn new(zone: &str) -> Self {
        Self {
            node_id: "geo".into(),
            zone: zone.into(),
            service_names: default_service_names(),
            listen: Listen::default(),
            answers: default_answers(),
            ttl: default_ttl(),
            default_region: None,
            geoip_db: None,
            geoip_reload: default_geoip_reload(),
            networks: Vec::new(),
            ns_names: Vec::new(),
            ns_addrs: Vec::new(),
            soa: Soa::default(),
            near_radius_km: default_near_radius(),
            max_load: default_max_load(),
            rate_limit: default_rate_limit(),
            cluster: None,
        }
    }

    /// Checks every value, naming the key of each problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Some(cluster) = &self.cluster {
            problems.extend(cluster.problems("cluster"));
        }
        problems.extend(cdn_node::secret::node_id_problem(&self.node_id));
        if let Err(zone_problems) = Zone::from_config(self) {
            problems.extend(zone_problems);
        }
        if self.answers == 0 || self.answers > MAX_ANSWERS {
            problems.push(format!("answers: {} is not within 1..={MAX_ANSWERS}", self.answers));
        }
        if self.listen.udp_sockets > MAX_UDP_SOCKETS {
            problems.push(format!(
                "listen.udp_sockets: {} is over {MAX_UDP_SOCKETS} (0 is one per core)",
                self.listen.udp_sockets
            ));
        }
        if self.ttl > Duration::from_secs(86_400) {
            problems.push("ttl: must be at most 1 day".into());
        }
        if self.default_region.as_deref().is_some_and(str::is_empty) {
            problems.push("default_region: must not be empty".into());
        }
        if self.geoip_reload < Duration::from_millis(100) {
            problems.push("geoip_reload: must be at least 100ms".into());
        }
        if let Err(network_problems) = self.parsed_networks() {
            problems.extend(network_problems);
        }
        if !self.near_radius_km.is_finite() || !(0.0..=MAX_RADIUS_KM).contains(&self.near_radius_km) {
            problems.push(format!("near_radius_km: {} is not within 0..={MAX_RADIUS_KM}", self.near_radius_km));
        }
        if !self.max_load.is_finite() || self.max_load <= 0.0 {
            problems.push(format!("max_load: {} must be more than 0 (1.0 is a full edge)", self.max_load));
        }
        for (key, value) in [
            ("soa.refresh", self.soa.refresh),
            ("soa.retry", self.soa.retry),
            ("soa.expire", self.soa.expire),
            ("soa.minimum", self.soa.minimum),
            ("soa.ttl", self.soa.ttl),
        ] {
            if value > MAX_TTL {
                problems.push(format!("{key}: must be under 68 years"));
            }
        }
        ConfigError::check(problems)
    }

    /// The `[[networks]]` entries parsed, or a problem per bad entry.
    pub(crate) fn parsed_networks(&self) -> Result<Vec<(IpNet, ClientLocation)>, Vec<String>> {
        let mut problems = Vec::new();
        let mut networks: Vec<(IpNet, ClientLocation)> = Vec::new();
        for (i, network) in self.networks.iter().enumerate() {
            let key = format!("networks[{i}]");
            let cidr = match network.cidr.trim().parse::<IpNet>() {
                Ok(cidr) => cidr.trunc(),
                Err(_) => match network.cidr.trim().parse::<IpAddr>() {
                    Ok(addr) => IpNet::from(addr),
                    Err(_) => {
                        problems.push(format!("{key}.cidr: {:?} is not a network like 10.1.0.0/16", network.cidr));
                        continue;
                    }
                },
            };
            if networks.iter().any(|(other, _)| *other == cidr) {
                problems.push(format!("{key}.cidr: {cidr} is listed twice"));
            }
            if let Some(location) = network.location {
                problems.extend(location_problems(&format!("{key}.location"), location));
            }
            if network.region.as_deref().is_some_and(str::is_empty) {
                problems.push(format!("{key}.region: must not be empty"));
            }
            if network.location.is_none() && network.region.is_none() {
                problems.push(format!("{key}: needs a location or a region"));
            }
            networks.push((cidr, ClientLocation { point: network.location, region: network.region.clone() }));
        }
        if problems.is_empty() { Ok(networks) } else { Err(problems) }
    }
}

fn location_problems(key: &str, location: Location) -> Vec<String> {
    location.problems(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_defaults() {
        let config: Config = toml::from_str(
            r#"
            node_id = "geo-1"
            zone = "cdn.test."
            ttl = "45s"
            default_region = "eu-west"
            [listen]
            dns = "127.0.0.1:0"
            [[networks]]
            cidr = "10.1.0.0/16"
            location = { lat = 40.7, lon = -74.0 }
            [[networks]]
            cidr = "10.9.0.0/16"
            region = "eu-west"
            [soa]
            rname = "ops@cdn.test"
            minimum = "1m"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.service_names, ["www"]);
        assert_eq!(config.answers, 2);
        assert_eq!(config.ttl, Duration::from_secs(45));
        assert_eq!(config.listen.admin, Some("127.0.0.1:9053".parse().unwrap()));
        assert_eq!(config.soa.minimum, Duration::from_secs(60));
        assert_eq!(config.rate_limit, 200);
        assert_eq!(config.listen.udp_sockets, 0, "one per core");
        let networks = config.parsed_networks().unwrap();
        assert_eq!(networks.len(), 2);
        assert_eq!(networks[1].1.region.as_deref(), Some("eu-west"));
        Config::new("cdn.test").validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_name_their_keys() {
        let err = toml::from_str::<Config>("node_id = \"a\"\nzone = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        let err = toml::from_str::<Config>("node_id = \"a\"\nzone = \"x\"\nttl = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("ttl") || err.to_string().contains("line 3"), "{err}");
        let err =
            toml::from_str::<Config>("node_id = \"a\"\nzone = \"x\"\n[[networks]]\ncidr = \"10.0.0.0/8\"\nlat = 1\n")
                .unwrap_err();
        assert!(err.to_string().contains("lat"), "{err}");

        let mut config = Config::new(".");
        config.node_id = String::new();
        config.answers = 0;
        config.max_load = f64::NAN;
        config.near_radius_km = -1.0;
        config.service_names = vec!["a..b".into(), "www.other.test.".into()];
        config.ns_names = vec!["bad name!".repeat(10)];
        config.default_region = Some(String::new());
        config.networks = vec![
            Network { cidr: "10.0.0.0/33".into(), location: None, region: None },
            Network { cidr: "10.0.0.0/8".into(), location: Some(Location { lat: 91.0, lon: 0.0 }), region: None },
            Network { cidr: "10.1.2.3/8".into(), location: None, region: Some("x".into()) },
            Network { cidr: "10.2.0.0/16".into(), location: None, region: None },
        ];
        config.soa.ttl = Duration::from_secs(u64::MAX / 2);
        config.listen.udp_sockets = 100_000;
        let problems = config.validate().unwrap_err().problems;
        for key in [
            "node_id",
            "zone",
            "answers",
            "max_load",
            "near_radius_km",
            "default_region",
            "networks[0].cidr",
            "networks[1].location.lat",
            "networks[2].cidr",
            "networks[3]:",
            "soa.ttl",
            "listen.udp_sockets",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }

        let mut config = Config::new("cdn.test");
        config.service_names = vec!["a..b".into(), "www.other.test.".into(), String::new()];
        config.ns_names = vec!["ns 1.cdn.test".into()];
        config.soa.rname = Some("a.b@c".into());
        let problems = config.validate().unwrap_err().problems;
        for key in ["service_names[0]", "service_names[1]", "service_names[2]", "ns_names[0]", "soa.rname"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }
    }

    #[test]
    fn single_addresses_are_host_networks() {
        let mut config = Config::new("cdn.test");
        config.networks =
            vec![Network { cidr: "192.0.2.7".into(), location: Some(Location { lat: 1.0, lon: 2.0 }), region: None }];
        let networks = config.parsed_networks().unwrap();
        assert_eq!(networks[0].0, "192.0.2.7/32".parse::<IpNet>().unwrap());
    }
}
