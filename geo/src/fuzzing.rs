//! A geo-DNS with a fixed zone and cluster, answering raw packets the way the
//! server does: for the `dns` fuzz target (fuzz/) and its corpus test
//! (tests/fuzz_corpus.rs). Not a stable API.
//!
//! [`Harness::exchange`] runs the server's own path. Over UDP: the worker each UDP
//! socket has (the fast path, else the slow path); and whenever the fast path
//! answers, the slow path must give the very same bytes for the same query
//! (checked on every input). Over TCP (and on the UDP slow path): the packet is
//! parsed as hickory-server parses it, handed to the same [`Handler`] the sockets
//! use, and the response is encoded by hickory-server's own `ResponseHandle` (the
//! one its listeners use, with their size limits), into a channel instead of a
//! socket.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use cdn_cluster::{GeoPoint, Member, MemberState, Role};
use futures_util::{FutureExt, StreamExt};
use hickory_proto::op::MessageType;
use hickory_server::{
    net::{BufDnsStreamHandle, runtime::TokioTime, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandle},
};

use crate::{
    config::{Config, Location, Network},
    fast::Worker,
    handler::{Handler, MemberSource, Shared},
    metrics::Metrics,
    mmdb::GeoDb,
};

/// The transport a packet arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// UDP: answers fit the client's payload size (512 without EDNS), else truncated.
    Udp,
    /// TCP (the length prefix already removed): answers whole.
    Tcp,
}

/// The zone the harness serves.
pub const ZONE: &str = "cdn.test";

/// A geo-DNS for `cdn.test` (service names `www`, `video` and the apex; name
/// servers `ns1.cdn.test` in the zone and `ns.example.net` outside it) over a
/// fixed cluster of 56 edges round the globe (IPv4 and IPv6, some dead, drained,
/// overloaded, not ready or without a location), static client networks for
/// IPv4 and IPv6, default region `eu-west`, 20 answers per query, no GeoIP
/// database and no rate limit (so that an input always gets the same kind of
/// answer).
pub struct Harness {
    handler: Handler,
    worker: Mutex<Worker>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness").finish_non_exhaustive()
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}

const REGIONS: [(&str, GeoPoint); 5] = [
    ("us-east", GeoPoint { lat: 40.71, lon: -74.01 }),
    ("eu-west", GeoPoint { lat: 53.35, lon: -6.26 }),
    ("ap-south", GeoPoint { lat: 19.08, lon: 72.88 }),
    ("sa-east", GeoPoint { lat: -23.55, lon: -46.63 }),
    ("ap-southeast", GeoPoint { lat: -33.87, lon: 151.21 }),
];

/// The fixed cluster: edges 0..24 with IPv4 addresses, 24..56 with IPv6 ones,
/// spread over [`REGIONS`], a few of them unhealthy; plus a control and a geo node.
pub fn members() -> Vec<Member> {
    let mut members: Vec<Member> = (0..56u8)
        .map(|i| {
            let (region, at) = REGIONS[usize::from(i) % REGIONS.len()];
            let public_addr: IpAddr = if i < 24 {
                IpAddr::from([198, 51, 100, i + 1])
            } else {
                IpAddr::from([0x2001, 0xdb8, 0xed, 0, 0, 0, 0, u16::from(i)])
            };
            let offset = f64::from(i) / 10.0;
            Member {
                node_id: format!("{region}-{i}"),
                role: Role::Edge,
                region: region.into(),
                location: (i % 11 != 7).then_some(GeoPoint { lat: at.lat + offset, lon: at.lon - offset }),
                public_addr: (i != 13).then_some(public_addr),
                admin_addr: None,
                gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7000 + u16::from(i))),
                state: match i % 9 {
                    4 => MemberState::Dead,
                    6 => MemberState::Drained,
                    _ => MemberState::Alive,
                },
                ready: i % 10 != 3,
                load: if i % 8 == 5 { 0.95 } else { f64::from(i % 5) / 10.0 },
            }
        })
        .collect();
    for (i, role) in [Role::Control, Role::Geo].into_iter().enumerate() {
        members.push(Member {
            node_id: format!("{role:?}-1").to_lowercase(),
            role,
            region: "eu-west".into(),
            location: None,
            public_addr: Some(IpAddr::from([192, 0, 2, 100 + i as u8])),
            admin_addr: None,
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7100 + i as u16)),
            state: MemberState::Alive,
            ready: true,
            load: 0.0,
        });
    }
    members
}

/// The fixed config (see [`Harness`]).
pub fn config() -> Config {
    let mut config = Config::new(ZONE);
    config.service_names = vec!["www".into(), "video".into(), "@".into()];
    config.answers = 20;
    config.default_region = Some("eu-west".into());
    config.rate_limit = 0;
    config.listen.admin = None;
    config.ns_names = vec!["ns1.cdn.test".into(), "ns.example.net".into()];
    config.ns_addrs = vec![IpAddr::from([192, 0, 2, 53]), "2001:db8::53".parse().expect("an address")];
    let at = |lat, lon| Some(Location { lat, lon });
    let region = |name: &str| Some(name.to_string());
    config.networks = vec![
        Network { cidr: "10.1.0.0/16".into(), location: at(40.7, -74.0), region: None },
        Network { cidr: "10.2.0.0/16".into(), location: None, region: region("eu-west") },
        Network { cidr: "10.3.0.0/16".into(), location: at(19.1, 72.9), region: region("ap-south") },
        Network { cidr: "192.0.2.0/24".into(), location: at(-23.5, -46.6), region: None },
        Network { cidr: "2001:db8:1::/48".into(), location: at(-33.9, 151.2), region: None },
        Network { cidr: "2001:db8:2::/48".into(), location: None, region: region("us-east") },
    ];
    config
}

impl Harness {
    /// Builds the handler for [`config`] and [`members`].
    ///
    /// # Panics
    /// If the fixed config does not validate (a bug in this module).
    pub fn new() -> Self {
        let config = config();
        config.validate().expect("the fuzzing config is valid");
        let members = Arc::new(members());
        let source: MemberSource = Arc::new(move || members.clone());
        let metrics = Metrics::register(&prometheus::Registry::new()).expect("fresh registry");
        let shared = Arc::new(
            Shared::new(&config, Arc::new(GeoDb::none()), source, metrics).expect("the fuzzing config is valid"),
        );
        Self { handler: Handler(shared.clone()), worker: Mutex::new(Worker::new(shared, 0)) }
    }

    /// Answers one packet from `src` as the server does, returning the response's
    /// bytes as they would go on the wire, or `None` when geo sends nothing: the
    /// packet is not a request hickory-server can parse (it then drops it, or
    /// answers FORMERR from the header alone without asking geo), it is a
    /// response (dropped against reflection), or the handler dropped it.
    ///
    /// # Panics
    /// If the handler waits on anything (it does no I/O), or the UDP fast path
    /// answers other than the slow path would.
    pub fn exchange(&self, packet: &[u8], src: SocketAddr, transport: Transport) -> Option<Vec<u8>> {
        let protocol = match transport {
            Transport::Udp => Protocol::Udp,
            Transport::Tcp => Protocol::Tcp,
        };
        let request = Request::from_bytes(packet.to_vec(), src, protocol).ok()?;
        if request.metadata.message_type == MessageType::Response {
            return None;
        }
        if transport == Transport::Udp {
            let mut worker = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
            for counter in [0, 1, 7] {
                if let Some(fast) = worker.fast_only(packet, src, counter) {
                    let slow = worker.slow_only(packet, src, counter);
                    assert_eq!(Some(&fast), slow.as_ref(), "the fast path answers as the slow path does");
                }
            }
            return worker.handle(packet, src, Instant::now()).map(<[u8]>::to_vec);
        }
        let (stream, mut sent) = BufDnsStreamHandle::new(src);
        let response = ResponseHandle::new(src, stream, protocol);
        self.handler
            .handle_request::<_, TokioTime>(&request, response)
            .now_or_never()
            .expect("the handler never waits");
        let message = sent.next().now_or_never().flatten()?;
        Some(message.into_parts().0)
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::{Edns, Message, Query, ResponseCode},
        rr::{Name, RecordType},
    };

    use super::*;

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = 7;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if edns {
            message.set_edns(Edns::new());
        }
        message.to_vec().unwrap()
    }

    #[test]
    fn answers_like_the_server() {
        let harness = Harness::new();
        let src = SocketAddr::from(([10, 1, 2, 3], 5353));
        let bytes = harness.exchange(&query("www.cdn.test.", RecordType::A, true), src, Transport::Udp).unwrap();
        let response = Message::from_vec(&bytes).unwrap();
        assert_eq!(response.metadata.id, 7);
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(!response.answers.is_empty());

        // AAAA from an IPv6 source: 20 edges do not fit 512 bytes, so truncated over
        // UDP, whole over TCP.
        let src = "[2001:db8:1::1]:5353".parse().unwrap();
        let aaaa = query("video.cdn.test.", RecordType::AAAA, false);
        let bytes = harness.exchange(&aaaa, src, Transport::Udp).unwrap();
        let response = Message::from_vec(&bytes).unwrap();
        assert!(response.metadata.truncation && response.answers.is_empty());
        let bytes = harness.exchange(&aaaa, src, Transport::Tcp).unwrap();
        assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 20);

        assert_eq!(harness.exchange(&[0; 5], src, Transport::Udp), None, "no header");
        let mut response = query("www.cdn.test.", RecordType::A, false);
        response[2] |= 0x80;
        assert_eq!(harness.exchange(&response, src, Transport::Udp), None, "a response");
    }
}
