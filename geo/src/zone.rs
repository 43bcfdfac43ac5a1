//! The zone this server is authoritative for: its names and static records.
//!
//! Pure data built once from the config; the request handler asks it what a
//! query name is ([`Zone::classify`]) and for the SOA/NS records.

use std::net::IpAddr;

use hickory_proto::{
    rr::{
        LowerName, Name, RData, Record,
        rdata::{A, AAAA, NS, SOA},
    },
    serialize::binary::{BinEncodable, BinEncoder, NameEncoding},
};

use crate::config::Config;

/// What a query name is to this zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameKind {
    /// Not in the zone: REFUSED.
    Outside,
    /// A name that exists (possibly as an empty non-terminal when every flag is false).
    Known {
        /// The zone apex (SOA, NS).
        apex: bool,
        /// A service name (A/AAAA with the nearest edges).
        service: bool,
        /// A name server inside the zone (A/AAAA from `ns_addrs`).
        nameserver: bool,
    },
    /// In the zone but nonexistent: NXDOMAIN.
    Missing,
}

/// The zone's names and static records.
#[derive(Debug, Clone)]
pub(crate) struct Zone {
    origin: LowerName,
    services: Vec<LowerName>,
    nameservers_in_zone: Vec<LowerName>,
    ns_addrs: Vec<IpAddr>,
    soa: Record,
    negative_soa: Record,
    ns: Vec<Record>,
    static_ttl: u32,
}

fn ttl_secs(duration: std::time::Duration) -> u32 {
    u32::try_from(duration.as_secs()).unwrap_or(u32::MAX).min(i32::MAX as u32)
}

fn secs_i32(duration: std::time::Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

/// Parses a host name of letters, digits, `-` and `_` labels; absolute (fqdn).
fn parse_name(text: &str) -> Result<Name, String> {
    let trimmed = text.strip_suffix('.').unwrap_or(text);
    if trimmed.is_empty() {
        return Err("is empty".into());
    }
    if trimmed.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("{text:?} has an empty or over-long label"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("{text:?} may only hold letters, digits, '-' and '_'"));
        }
    }
    let mut name = Name::from_ascii(trimmed).map_err(|error| format!("{text:?}: {error}"))?;
    name.set_fqdn(true);
    Ok(name.to_lowercase())
}

/// Appends `zone` to the relative `name`.
fn in_zone(name: Name, zone: &Name) -> Result<Name, String> {
    let mut relative = name;
    relative.set_fqdn(false);
    relative.append_domain(zone).map(|name| name.to_lowercase()).map_err(|error| format!("too long: {error}"))
}

impl Zone {
    /// Builds the zone from the config, or lists every problem with its key.
    pub(crate) fn from_config(config: &Config) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let zone = match parse_name(&config.zone) {
            Ok(zone) => zone,
            Err(error) => {
                problems.push(format!("zone: {error} (e.g. \"cdn.test\")"));
                Name::root()
            }
        };

        let mut services = Vec::new();
        if config.service_names.is_empty() {
            problems.push("service_names: name at least one (e.g. [\"www\"])".into());
        }
        for (i, service) in config.service_names.iter().enumerate() {
            let key = format!("service_names[{i}]");
            if service == "@" {
                services.push(LowerName::new(&zone));
                continue;
            }
            let name = match parse_name(service) {
                Ok(name) => name,
                Err(error) => {
                    problems.push(format!("{key}: {error}"));
                    continue;
                }
            };
            let name = if service.ends_with('.') {
                if !zone.zone_of(&name) {
                    problems.push(format!("{key}: {service:?} is outside the zone"));
                    continue;
                }
                name
            } else {
                match in_zone(name, &zone) {
                    Ok(name) => name,
                    Err(error) => {
                        problems.push(format!("{key}: {error}"));
                        continue;
                    }
                }
            };
            services.push(LowerName::new(&name));
        }

        let mut nameservers = Vec::new();
        if config.ns_names.is_empty() {
            match in_zone(Name::from_labels([b"ns1" as &[u8]]).unwrap_or_default(), &zone) {
                Ok(name) => nameservers.push(name),
                Err(error) => problems.push(format!("ns_names: ns1.<zone> is {error}")),
            }
        }
        for (i, ns) in config.ns_names.iter().enumerate() {
            match parse_name(ns) {
                Ok(name) => nameservers.push(name),
                Err(error) => problems.push(format!("ns_names[{i}]: {error}")),
            }
        }

        let mname = match &config.soa.mname {
            Some(mname) => parse_name(mname).unwrap_or_else(|error| {
                problems.push(format!("soa.mname: {error}"));
                Name::root()
            }),
            None => nameservers.first().cloned().unwrap_or_else(Name::root),
        };
        let rname = match &config.soa.rname {
            Some(rname) => {
                let text = match rname.split_once('@') {
                    Some((local, _)) if local.contains('.') => {
                        problems.push(format!("soa.rname: the mailbox {local:?} may not contain '.'"));
                        String::new()
                    }
                    Some((local, domain)) => format!("{local}.{domain}"),
                    None => rname.clone(),
                };
                parse_name(&text).unwrap_or_else(|error| {
                    if !text.is_empty() {
                        problems.push(format!("soa.rname: {error}"));
                    }
                    Name::root()
                })
            }
            None => in_zone(Name::from_labels([b"hostmaster" as &[u8]]).unwrap_or_default(), &zone).unwrap_or_else(
                |error| {
                    problems.push(format!("soa.rname: hostmaster.<zone> is {error}"));
                    Name::root()
                },
            ),
        };

        if zone.is_root() && problems.iter().all(|p| !p.starts_with("zone")) {
            problems.push("zone: the root zone is not served".into());
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let static_ttl = ttl_secs(config.soa.ttl);
        let negative_ttl = ttl_secs(config.soa.minimum).min(static_ttl);
        let soa_data = SOA::new(
            mname,
            rname,
            config.soa.serial,
            secs_i32(config.soa.refresh),
            secs_i32(config.soa.retry),
            secs_i32(config.soa.expire),
            ttl_secs(config.soa.minimum),
        );
        let soa = Record::from_rdata(zone.clone(), static_ttl, RData::SOA(soa_data.clone()));
        let negative_soa = Record::from_rdata(zone.clone(), negative_ttl, RData::SOA(soa_data));
        let ns = nameservers
            .iter()
            .map(|target| Record::from_rdata(zone.clone(), static_ttl, RData::NS(NS(target.clone()))))
            .collect();
        let origin = LowerName::new(&zone);
        let nameservers_in_zone =
            nameservers.iter().map(LowerName::new).filter(|name| origin.zone_of(name)).collect::<Vec<_>>();
        let ns_addrs = if config.ns_addrs.is_empty() {
            let ip = config.listen.dns.ip();
            if ip.is_unspecified() { Vec::new() } else { vec![ip] }
        } else {
            config.ns_addrs.clone()
        };
        Ok(Self { origin, services, nameservers_in_zone, ns_addrs, soa, negative_soa, ns, static_ttl })
    }

    /// What `name` is to this zone.
    pub(crate) fn classify(&self, name: &LowerName) -> NameKind {
        if !self.origin.zone_of(name) {
            return NameKind::Outside;
        }
        let apex = *name == self.origin;
        let service = self.services.contains(name);
        let nameserver = self.nameservers_in_zone.contains(name);
        // An ancestor of a name we hold exists too (an empty non-terminal).
        let ancestor = || self.services.iter().chain(&self.nameservers_in_zone).any(|known| name.zone_of(known));
        if apex || service || nameserver || ancestor() {
            NameKind::Known { apex, service, nameserver }
        } else {
            NameKind::Missing
        }
    }

    /// The service names in wire format, lowercase and uncompressed (what the UDP
    /// fast path compares a query's name with, ignoring ASCII case).
    pub(crate) fn service_wire_names(&self) -> Vec<Vec<u8>> {
        self.services
            .iter()
            .filter_map(|name| {
                let mut bytes = Vec::with_capacity(name.len() + 2);
                let mut encoder = BinEncoder::new(&mut bytes);
                encoder.set_name_encoding(NameEncoding::Uncompressed);
                Name::from(name.clone()).emit(&mut encoder).ok()?;
                Some(bytes)
            })
            .collect()
    }

    /// The SOA record for the answer section.
    pub(crate) fn soa(&self) -> &Record {
        &self.soa
    }

    /// The SOA record for the authority section of negative answers (RFC 2308:
    /// TTL no longer than the SOA minimum).
    pub(crate) fn negative_soa(&self) -> &Record {
        &self.negative_soa
    }

    /// The apex NS records.
    pub(crate) fn ns(&self) -> &[Record] {
        &self.ns
    }

    /// Address records of an in-zone name server, `v6` picking AAAA over A.
    pub(crate) fn nameserver_addrs(&self, name: &Name, v6: bool) -> Vec<Record> {
        self.ns_addrs
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .map(|ip| {
                let data = match ip {
                    IpAddr::V4(v4) => RData::A(A(*v4)),
                    IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
                };
                Record::from_rdata(name.clone(), self.static_ttl, data)
            })
            .collect()
    }

    /// Glue for the in-zone name servers (additional section of NS answers).
    pub(crate) fn glue(&self) -> Vec<Record> {
        let mut glue = Vec::new();
        for name in &self.nameservers_in_zone {
            let name = Name::from(name.clone());
            glue.extend(self.nameserver_addrs(&name, false));
            glue.extend(self.nameserver_addrs(&name, true));
        }
        glue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(name: &str) -> LowerName {
        LowerName::new(&Name::from_ascii(name).unwrap())
    }

    #[test]
    fn classifies_names() {
        let mut config = Config::new("CDN.test");
        config.service_names = vec!["www".into(), "video.edge".into(), "@".into()];
        config.ns_names = vec!["ns1.cdn.test".into(), "ns.example.net.".into()];
        let zone = Zone::from_config(&config).unwrap();
        let known = |apex, service, nameserver| NameKind::Known { apex, service, nameserver };
        assert_eq!(zone.classify(&lower("cdn.test.")), known(true, true, false));
        assert_eq!(zone.classify(&lower("WWW.cdn.test.")), known(false, true, false));
        assert_eq!(zone.classify(&lower("video.edge.cdn.test.")), known(false, true, false));
        assert_eq!(zone.classify(&lower("edge.cdn.test.")), known(false, false, false));
        assert_eq!(zone.classify(&lower("ns1.cdn.test.")), known(false, false, true));
        assert_eq!(zone.classify(&lower("nope.cdn.test.")), NameKind::Missing);
        assert_eq!(zone.classify(&lower("x.www.cdn.test.")), NameKind::Missing);
        assert_eq!(zone.classify(&lower("cdn.test.example.")), NameKind::Outside);
        assert_eq!(zone.classify(&lower("test.")), NameKind::Outside);
        assert_eq!(zone.classify(&lower(".")), NameKind::Outside);
        assert_eq!(zone.ns().len(), 2);
        assert_eq!(zone.glue().len(), 1, "only the in-zone name server gets glue");
    }

    #[test]
    fn soa_defaults_and_negative_ttl() {
        let zone = Zone::from_config(&Config::new("cdn.test")).unwrap();
        let RData::SOA(soa) = &zone.soa().data else { panic!("not a soa") };
        assert_eq!(soa.mname.to_string(), "ns1.cdn.test.");
        assert_eq!(soa.rname.to_string(), "hostmaster.cdn.test.");
        assert_eq!(zone.soa().ttl, 3600);
        assert_eq!(zone.negative_soa().ttl, 30);

        let mut config = Config::new("cdn.test.");
        config.soa.rname = Some("ops@example.org".into());
        let zone = Zone::from_config(&config).unwrap();
        let RData::SOA(soa) = &zone.soa().data else { panic!("not a soa") };
        assert_eq!(soa.rname.to_string(), "ops.example.org.");
    }

    #[test]
    fn ns_addresses_default_to_the_listen_address() {
        let mut config = Config::new("cdn.test");
        config.listen.dns = "0.0.0.0:53".parse().unwrap();
        assert!(Zone::from_config(&config).unwrap().glue().is_empty());
        config.listen.dns = "127.0.0.1:5300".parse().unwrap();
        assert_eq!(Zone::from_config(&config).unwrap().glue().len(), 1);
        config.ns_addrs = vec!["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()];
        let zone = Zone::from_config(&config).unwrap();
        let name = Name::from_ascii("ns1.cdn.test.").unwrap();
        assert_eq!(zone.nameserver_addrs(&name, true).len(), 1);
        assert_eq!(zone.glue().len(), 2);
    }
}
