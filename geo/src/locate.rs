//! Where a client is: its address (the EDNS Client Subnet or the query's source)
//! looked up in the static `[[networks]]` (longest prefix first), then in the GeoIP
//! database, else the default region.
//!
//! Pure: the database is passed in as a [`Database`], already in memory. The answer
//! carries the ECS *scope*: the shortest prefix around the address over which the
//! answer stays the same, so resolvers may cache it for that whole network.

use std::{borrow::Cow, net::IpAddr};

use cdn_node::location::GeoPoint;
use ipnet::IpNet;

/// Where a client is, as far as edge selection cares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClientLocation {
    /// A point on the globe: edges are ordered by distance from it.
    pub point: Option<GeoPoint>,
    /// A region: its edges come first.
    pub region: Option<String>,
}

impl ClientLocation {
    /// A location at `point`.
    pub fn at(point: GeoPoint) -> Self {
        Self { point: Some(point), region: None }
    }

    /// A location in `region`.
    pub fn in_region(region: impl Into<String>) -> Self {
        Self { point: None, region: Some(region.into()) }
    }
}

/// Which source located the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A static `[[networks]]` entry.
    Network,
    /// The GeoIP database.
    Database,
    /// Nothing knew the address: the default region.
    Default,
}

/// A located client.
#[derive(Debug, Clone, PartialEq)]
pub struct Located<'a> {
    /// Where it is.
    pub location: Cow<'a, ClientLocation>,
    /// The ECS scope prefix length: every address in `addr/scope` gets this answer.
    pub scope: u8,
    /// What located it.
    pub source: Source,
    /// Which location it is, for caching answers per location: clients with the
    /// same key are at the same [`location`](Self::location).
    pub(crate) key: LocationKey,
}

/// Identifies a client location without holding it: answers planned for one
/// location serve every client with its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LocationKey {
    /// The static network at this index (most specific first).
    Network(usize),
    /// A point from the GeoIP database (latitude and longitude bits).
    Point(u64, u64),
    /// The default location.
    Default,
}

/// What a GeoIP database says about an address.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbAnswer {
    /// The location, when the database has one (a city's coordinates, or a
    /// country's or continent's centroid).
    pub point: Option<GeoPoint>,
    /// The prefix length of the database network holding the address (also when
    /// the database has no data for it).
    pub prefix: u8,
}

/// A GeoIP database (the `.mmdb` reader, or a fake in tests).
pub trait Database: Send + Sync {
    /// Looks `addr` up; `None` when the lookup failed.
    fn lookup(&self, addr: IpAddr) -> Option<DbAnswer>;
}

/// Locates clients by the static networks, a database and the default region.
#[derive(Debug, Clone, Default)]
pub struct Locator {
    /// Most specific first.
    networks: Vec<(IpNet, ClientLocation)>,
    default: ClientLocation,
}

/// The address as IPv4 when it is an IPv4-mapped IPv6 address.
pub(crate) fn canonical(addr: IpAddr) -> IpAddr {
    addr.to_canonical()
}

/// How many leading bits `a` and `b` share (0 when the families differ).
fn common_prefix(a: IpAddr, b: IpAddr) -> u8 {
    let bits = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) ^ u32::from(b)).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a) ^ u128::from(b)).leading_zeros(),
        _ => 0,
    };
    u8::try_from(bits).unwrap_or(u8::MAX)
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl Locator {
    /// A locator over `networks`, sending unknown clients to `default_region`.
    pub fn new(mut networks: Vec<(IpNet, ClientLocation)>, default_region: Option<String>) -> Self {
        networks.sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix_len()));
        Self { networks, default: ClientLocation { point: None, region: default_region } }
    }

    /// Where the client at `addr` is.
    pub fn locate<'a>(&'a self, addr: IpAddr, db: Option<&dyn Database>) -> Located<'a> {
        let addr = canonical(addr);
        let (location, prefix, source, key) = if let Some((i, (net, location))) =
            self.networks.iter().enumerate().find(|(_, (net, _))| net.contains(&addr))
        {
            (Cow::Borrowed(location), net.prefix_len(), Source::Network, LocationKey::Network(i))
        } else {
            match db.and_then(|db| db.lookup(addr)) {
                Some(DbAnswer { point: Some(point), prefix }) => (
                    Cow::Owned(ClientLocation::at(point)),
                    prefix,
                    Source::Database,
                    LocationKey::Point(point.lat.to_bits(), point.lon.to_bits()),
                ),
                Some(DbAnswer { point: None, prefix }) => {
                    (Cow::Borrowed(&self.default), prefix, Source::Default, LocationKey::Default)
                }
                None => (Cow::Borrowed(&self.default), 0, Source::Default, LocationKey::Default),
            }
        };
        Located { location, scope: self.scope(addr, prefix), source, key }
    }

    /// The shortest prefix ≥ `prefix` around `addr` that overlaps no static network
    /// not containing `addr` (one that would answer differently).
    fn scope(&self, addr: IpAddr, prefix: u8) -> u8 {
        let conflicts = self
            .networks
            .iter()
            .filter(|(net, _)| net.addr().is_ipv4() == addr.is_ipv4() && !net.contains(&addr))
            .map(|(net, _)| common_prefix(addr, net.network()).saturating_add(1));
        conflicts.fold(prefix, u8::max).min(max_prefix(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NYC: GeoPoint = GeoPoint { lat: 40.71, lon: -74.01 };
    const DUBLIN: GeoPoint = GeoPoint { lat: 53.35, lon: -6.26 };

    struct FakeDb;

    impl Database for FakeDb {
        fn lookup(&self, addr: IpAddr) -> Option<DbAnswer> {
            match addr {
                IpAddr::V4(v4) if v4.octets()[0] == 81 => Some(DbAnswer { point: Some(DUBLIN), prefix: 20 }),
                IpAddr::V4(v4) if v4.octets()[0] == 82 => None,
                _ => Some(DbAnswer { point: None, prefix: 12 }),
            }
        }
    }

    fn locator() -> Locator {
        Locator::new(
            vec![
                ("10.0.0.0/8".parse().unwrap(), ClientLocation::in_region("us-east")),
                ("10.1.0.0/16".parse().unwrap(), ClientLocation::at(NYC)),
                ("10.1.2.0/24".parse().unwrap(), ClientLocation::at(DUBLIN)),
                ("2001:db8::/32".parse().unwrap(), ClientLocation::at(DUBLIN)),
            ],
            Some("eu-west".into()),
        )
    }

    fn at(addr: &str) -> IpAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_scope_avoids_more_specific_networks() {
        let locator = locator();
        let l = locator.locate(at("10.1.2.9"), None);
        assert_eq!((l.location.point, l.scope, l.source), (Some(DUBLIN), 24, Source::Network));
        // In the /16 but next to the /24: the answer only holds for a /24 here.
        let l = locator.locate(at("10.1.3.0"), None);
        assert_eq!((l.location.point, l.scope), (Some(NYC), 24));
        // The other half of the /16 holds no more specific network: a /17 is exact.
        let l = locator.locate(at("10.1.128.0"), None);
        assert_eq!((l.location.point, l.scope), (Some(NYC), 17));
        let l = locator.locate(at("10.200.0.0"), None);
        assert_eq!((l.location.region.as_deref(), l.scope), (Some("us-east"), 9));
        let l = locator.locate(at("2001:db8:1::"), None);
        assert_eq!((l.location.point, l.scope), (Some(DUBLIN), 32));
        // IPv4-mapped IPv6 sources are looked up as IPv4.
        let l = locator.locate(at("::ffff:10.1.2.3"), None);
        assert_eq!(l.location.point, Some(DUBLIN));
    }

    #[test]
    fn database_then_default() {
        let locator = locator();
        let l = locator.locate(at("81.2.69.142"), Some(&FakeDb));
        assert_eq!((l.location.point, l.scope, l.source), (Some(DUBLIN), 20, Source::Database));
        let l = locator.locate(at("192.0.2.1"), Some(&FakeDb));
        assert_eq!((l.location.region.as_deref(), l.source), (Some("eu-west"), Source::Default));
        assert_eq!(l.scope, 12, "the database's empty network");
        let l = locator.locate(at("82.0.0.1"), Some(&FakeDb));
        assert_eq!(l.source, Source::Default);
        // 82.x shares one leading bit with 10.x: 64.0.0.0/2 is clear of 10/8.
        assert_eq!(l.scope, 2);
        let l = locator.locate(at("192.0.2.1"), None);
        assert_eq!((l.location.region.as_deref(), l.scope), (Some("eu-west"), 1));
        let empty = Locator::default();
        let l = empty.locate(at("192.0.2.1"), None);
        assert_eq!((l.location.as_ref(), l.scope), (&ClientLocation::default(), 0));
    }

    #[test]
    fn common_prefix_lengths() {
        assert_eq!(common_prefix(at("10.0.0.0"), at("10.0.0.0")), 32);
        assert_eq!(common_prefix(at("10.0.0.0"), at("11.0.0.0")), 7);
        assert_eq!(common_prefix(at("::"), at("8000::")), 0);
        assert_eq!(common_prefix(at("::"), at("10.0.0.0")), 0);
    }
}
