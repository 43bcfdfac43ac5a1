use std::net::SocketAddr;

use cdn_cluster::{GeoPoint, MemberState, Role};
use hickory_proto::op::{Message, MessageType, Query};

use super::*;

const NYC: GeoPoint = GeoPoint { lat: 40.71, lon: -74.01 };
const DUBLIN: GeoPoint = GeoPoint { lat: 53.35, lon: -6.26 };
const MUMBAI: GeoPoint = GeoPoint { lat: 19.08, lon: 72.88 };

fn edge(id: &str, region: &str, at: GeoPoint, ip: &str) -> Member {
    Member {
        node_id: id.into(),
        role: Role::Edge,
        region: region.into(),
        location: Some(at),
        public_addr: Some(ip.parse().unwrap()),
        admin_addr: None,
        gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
        state: MemberState::Alive,
        ready: true,
        load: 0.1,
    }
}

fn three() -> Vec<Member> {
    vec![
        edge("us-east-1", "us-east", NYC, "127.0.0.11"),
        edge("eu-west-1", "eu-west", DUBLIN, "127.0.0.12"),
        edge("ap-south-1", "ap-south", MUMBAI, "127.0.0.13"),
    ]
}

fn config() -> Config {
    let mut config = Config::new("cdn.test");
    config.default_region = Some("eu-west".into());
    for (cidr, at) in [("10.1.0.0/16", NYC), ("10.2.0.0/16", DUBLIN), ("10.3.0.0/16", MUMBAI)] {
        config.networks.push(crate::config::Network {
            cidr: cidr.into(),
            location: Some(crate::config::Location { lat: at.lat, lon: at.lon }),
            region: None,
        });
    }
    config
}

struct Fixture {
    shared: Shared,
    members: Arc<Mutex<Vec<Member>>>,
    registry: prometheus::Registry,
}

fn fixture_with(config: Config, members: Vec<Member>) -> Fixture {
    config.validate().unwrap();
    let members = Arc::new(Mutex::new(members));
    let source = {
        let members = members.clone();
        Arc::new(move || Arc::new(members.lock().unwrap().clone())) as MemberSource
    };
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).unwrap();
    let shared = Shared::new(&config, Arc::new(GeoDb::none()), source, metrics).unwrap();
    Fixture { shared, members, registry }
}

fn fixture() -> Fixture {
    fixture_with(config(), three())
}

/// Options of a test query.
#[derive(Clone, Copy)]
struct Ask<'a> {
    name: &'a str,
    qtype: RecordType,
    ecs: Option<&'a str>,
    payload: Option<u16>,
    src: &'a str,
    protocol: Protocol,
}

impl Default for Ask<'_> {
    fn default() -> Self {
        Self {
            name: "www.cdn.test.",
            qtype: RecordType::A,
            ecs: None,
            payload: Some(1232),
            src: "192.0.2.1:5353",
            protocol: Protocol::Udp,
        }
    }
}

fn query_bytes(ask: &Ask<'_>) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = 4242;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(ask.name).unwrap(), ask.qtype));
    if let Some(payload) = ask.payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        if let Some(ecs) = ask.ecs {
            edns.options_mut().insert(EdnsOption::Subnet(ecs.parse().unwrap()));
        }
        message.set_edns(edns);
    }
    message.to_vec().unwrap()
}

impl Fixture {
    fn raw(&self, bytes: Vec<u8>, src: &str, protocol: Protocol) -> Option<Message> {
        let request = Request::from_bytes(bytes, src.parse().unwrap(), protocol).ok()?;
        match self.shared.respond(&request, Instant::now()) {
            Outcome::Drop => None,
            Outcome::Send(reply) => {
                let bytes = reply.encode().unwrap();
                if protocol == Protocol::Udp {
                    assert!(bytes.len() <= 512.max(3 * request.as_slice().len()), "amplification: {}", bytes.len());
                }
                let message = Message::from_vec(&bytes).unwrap();
                assert_eq!(message.metadata.id, request.metadata.id);
                assert_eq!(message.metadata.message_type, MessageType::Response);
                Some(message)
            }
        }
    }

    fn ask(&self, ask: Ask<'_>) -> Message {
        self.raw(query_bytes(&ask), ask.src, ask.protocol).expect("an answer")
    }

    fn metric(&self, name: &str) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().iter().map(|m| m.get_counter().get_value()))
            .sum()
    }
}

fn addrs(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .map(|record| match &record.data {
            RData::A(a) => a.0.to_string(),
            RData::AAAA(aaaa) => aaaa.0.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

fn ecs_scope(message: &Message) -> Option<(u8, u8)> {
    match message.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(subnet) => Some((subnet.source_prefix(), subnet.scope_prefix())),
        _ => None,
    }
}

#[test]
fn ecs_from_each_region_gets_its_edge_first_with_the_scope() {
    let f = fixture();
    for (ecs, first) in [("10.1.7.0/24", "127.0.0.11"), ("10.2.3.0/24", "127.0.0.12"), ("10.3.9.0/24", "127.0.0.13")] {
        for _ in 0..20 {
            let r = f.ask(Ask { ecs: Some(ecs), ..Ask::default() });
            assert_eq!(r.metadata.response_code, ResponseCode::NoError);
            assert!(r.metadata.authoritative);
            let answers = addrs(&r);
            assert_eq!(answers.len(), 2, "{answers:?}");
            assert_eq!(answers[0], first);
            assert_eq!(ecs_scope(&r), Some((24, 16)), "source echoed, scope = the /16");
            assert_eq!(r.answers[0].ttl, 30);
            assert_eq!(r.edns.as_ref().unwrap().max_payload(), UDP_PAYLOAD);
        }
    }
    assert_eq!(f.metric("cdn_dns_answers_total"), 60.0);
}

#[test]
fn source_address_locates_without_ecs() {
    let f = fixture();
    let r = f.ask(Ask { src: "10.3.0.9:4000", payload: None, ..Ask::default() });
    assert_eq!(addrs(&r)[0], "127.0.0.13");
    assert!(r.edns.is_none(), "no OPT in the answer to a query without one");
    // ECS with source prefix 0: the client opted out; the resolver's address counts.
    let r = f.ask(Ask { src: "10.1.0.9:4000", ecs: Some("0.0.0.0/0"), ..Ask::default() });
    assert_eq!(addrs(&r)[0], "127.0.0.11");
    assert_eq!(ecs_scope(&r), Some((0, 0)));
    // Unknown clients: the default region.
    let r = f.ask(Ask { ecs: Some("198.51.100.0/24"), ..Ask::default() });
    assert_eq!(addrs(&r)[0], "127.0.0.12");
    // Names are case-insensitive.
    let r = f.ask(Ask { name: "WwW.CdN.TeSt.", ecs: Some("10.1.7.0/24"), ..Ask::default() });
    assert_eq!(addrs(&r)[0], "127.0.0.11");
}

#[test]
fn malformed_ecs_is_formerr() {
    let f = fixture();
    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    let mut edns = Edns::new();
    edns.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new("10.2.3.0".parse().unwrap(), 20, 0)));
    message.set_edns(edns);
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert!(r.answers.is_empty());
}

#[test]
fn zone_basics() {
    let f = fixture();
    let r = f.ask(Ask { name: "cdn.test.", qtype: RecordType::SOA, ..Ask::default() });
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert!(matches!(r.answers[..], [Record { data: RData::SOA(_), .. }]));
    assert_eq!(ecs_scope(&r), None);

    let r = f.ask(Ask { name: "cdn.test.", qtype: RecordType::NS, ecs: Some("10.1.0.0/16"), ..Ask::default() });
    assert!(r.metadata.authoritative);
    assert!(matches!(&r.answers[..], [Record { data: RData::NS(ns), .. }] if ns.0.to_string() == "ns1.cdn.test."));
    assert_eq!(r.additionals.len(), 1, "glue for ns1.cdn.test");
    assert_eq!(ecs_scope(&r), Some((16, 0)), "not tailored: scope 0");

    let r = f.ask(Ask { name: "ns1.cdn.test.", ..Ask::default() });
    assert_eq!(addrs(&r), ["127.0.0.1"]);

    let r = f.ask(Ask { name: "nope.cdn.test.", ..Ask::default() });
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(r.metadata.authoritative);
    assert!(r.answers.is_empty());
    assert!(matches!(&r.authorities[..], [Record { data: RData::SOA(_), ttl: 30, .. }]));

    for name in ["example.com.", "test.", "."] {
        let r = f.ask(Ask { name, ..Ask::default() });
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "{name}");
        assert!(!r.metadata.authoritative);
    }

    // NODATA: a name that exists, a type we do not serve.
    for (name, qtype) in
        [("www.cdn.test.", RecordType::MX), ("www.cdn.test.", RecordType::AAAA), ("cdn.test.", RecordType::A)]
    {
        let r = f.ask(Ask { name, qtype, ..Ask::default() });
        assert_eq!(r.metadata.response_code, ResponseCode::NoError, "{name} {qtype}");
        assert!(r.metadata.authoritative);
        assert!(r.answers.is_empty());
        assert!(matches!(&r.authorities[..], [Record { data: RData::SOA(_), .. }]));
    }

    let r = f.ask(Ask { name: "cdn.test.", qtype: RecordType::AXFR, protocol: Protocol::Tcp, ..Ask::default() });
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
    let r = f.ask(Ask { name: "cdn.test.", qtype: RecordType::ANY, ..Ask::default() });
    assert_eq!(r.answers.len(), 2, "SOA and NS");
    assert_eq!(f.metric("cdn_dns_answers_total"), 0.0);
}

#[test]
fn protocol_errors() {
    let f = fixture();
    // EDNS version 1: BADVERS (extended rcode, needs the OPT record).
    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    let mut edns = Edns::new();
    edns.set_version(1);
    message.set_edns(edns);
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(u16::from(r.metadata.response_code), 16, "BADVERS");
    assert_eq!(r.edns.as_ref().map(Edns::version), Some(0));

    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    message.metadata.op_code = OpCode::Notify;
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::NotImp);

    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    message.add_query(Query::query(Name::from_ascii("cdn.test.").unwrap(), RecordType::SOA));
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);

    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    message.queries.clear();
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);

    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    message.queries[0].set_query_class(DNSClass::CH);
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}

fn many_edges(n: usize) -> Vec<Member> {
    (0..n)
        .map(|i| {
            let at = GeoPoint { lat: -60.0 + i as f64, lon: -170.0 + 8.0 * i as f64 };
            edge(&format!("edge-{i}"), "r", at, &format!("127.1.0.{}", i + 1))
        })
        .collect()
}

#[test]
fn large_answers_are_truncated_over_udp_and_whole_over_tcp() {
    let mut forty = config();
    forty.answers = 40;
    let f = fixture_with(forty, many_edges(40));
    let r = f.ask(Ask { ecs: Some("10.1.0.0/24"), ..Ask::default() });
    assert!(r.metadata.truncation);
    assert!(r.answers.is_empty());
    assert_eq!(ecs_scope(&r), Some((24, 16)), "the OPT record and its ECS survive truncation");
    // A client with a small payload size, no EDNS at all, or TCP.
    let r = f.ask(Ask { payload: Some(512), ..Ask::default() });
    assert!(r.metadata.truncation);
    let r = f.ask(Ask { payload: None, ..Ask::default() });
    assert!(r.metadata.truncation);
    let r = f.ask(Ask { protocol: Protocol::Tcp, ..Ask::default() });
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 40);
    assert_eq!(f.metric("cdn_dns_truncated_total"), 3.0);

    // 35 answers fit the client's 1232 bytes but not max(512, 3 × the query).
    let mut many = config();
    many.answers = 35;
    let f = fixture_with(many, many_edges(35));
    let r = f.ask(Ask::default());
    assert!(r.metadata.truncation, "amplification cap");
    // A query padded past a third of the answer is answered whole.
    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    edns.options_mut().insert(EdnsOption::Unknown(12, vec![0; 200]));
    message.set_edns(edns);
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert!(!r.metadata.truncation);
    assert_eq!(r.answers.len(), 35);
}

#[test]
fn rate_limit_drops_and_slips_per_network() {
    let mut config = config();
    config.rate_limit = 3;
    let f = fixture_with(config, three());
    let results: Vec<Option<bool>> = (0..7)
        .map(|_| f.raw(query_bytes(&Ask::default()), "192.0.2.1:53", Protocol::Udp).map(|m| m.metadata.truncation))
        .collect();
    assert_eq!(results, [Some(false), Some(false), Some(false), None, Some(true), None, Some(true)]);
    assert_eq!(f.metric("cdn_dns_rate_limited_total"), 4.0);
    // Other networks and TCP are not limited.
    assert!(f.raw(query_bytes(&Ask::default()), "192.0.3.1:53", Protocol::Udp).is_some());
    let r = f.raw(query_bytes(&Ask::default()), "192.0.2.1:53", Protocol::Tcp).unwrap();
    assert_eq!(r.answers.len(), 2);
}

#[test]
fn health_changes_apply_on_the_next_query() {
    let f = fixture();
    let ask = Ask { ecs: Some("10.2.0.0/24"), ..Ask::default() };
    assert_eq!(addrs(&f.ask(ask))[0], "127.0.0.12");
    f.members.lock().unwrap()[1].state = MemberState::Drained;
    let answers = addrs(&f.ask(ask));
    assert!(!answers.contains(&"127.0.0.12".to_string()), "{answers:?}");
    for member in f.members.lock().unwrap().iter_mut() {
        member.state = MemberState::Dead;
    }
    let answers = addrs(&f.ask(ask));
    assert_eq!(answers[0], "127.0.0.12", "least-bad: still the nearest");
    assert_eq!(f.metric("cdn_dns_degraded_answers_total"), 1.0);
    f.members.lock().unwrap().clear();
    let r = f.ask(ask);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.answers.is_empty());
    // IPv6 edges answer AAAA.
    f.members.lock().unwrap().push(edge("v6", "eu-west", DUBLIN, "2001:db8::12"));
    let r = f.ask(Ask { qtype: RecordType::AAAA, ..ask });
    assert_eq!(addrs(&r), ["2001:db8::12"]);
}

#[test]
fn mangled_packets_never_panic() {
    let f = fixture();
    let mut seed = 0x1234_5678_u64;
    let mut next = move || {
        seed = mix64(seed.wrapping_add(1));
        seed
    };
    let base = query_bytes(&Ask { ecs: Some("10.2.3.0/24"), ..Ask::default() });
    let mut parsed = 0;
    for _ in 0..5000 {
        let mut bytes = base.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        if next() % 5 == 0 {
            bytes.truncate((next() as usize) % bytes.len());
        }
        let protocol = if next() % 2 == 0 { Protocol::Udp } else { Protocol::Tcp };
        if Request::from_bytes(bytes.clone(), "192.0.2.1:53".parse().unwrap(), protocol).is_ok() {
            parsed += 1;
            let _ = f.raw(bytes, "192.0.2.1:53", protocol);
        }
    }
    assert!(parsed > 100, "{parsed}");
}

#[test]
fn a_question_compressed_into_the_header_is_echoed_as_it_read() {
    // Found by the `dns` fuzz target: the question's name is a pointer to offset 2,
    // the flags byte, which reads as the root in the query (0x00: no label) but not
    // in the response, where the QR bit makes it 0x80, an invalid label type. The
    // echoed question must be the one the query asked, whatever its encoding.
    let f = fixture();
    let mut bytes = vec![0x12, 0x34, 0x00, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    bytes.extend([0xc0, 0x02, 0x00, 0x01, 0x00, 0x01]); // name → offset 2, A, IN
    let query = Message::from_vec(&bytes).unwrap();
    assert_eq!(query.queries[0].name(), &Name::root());
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let r = f.raw(bytes.clone(), "192.0.2.1:53", protocol).expect("an answer");
        assert_eq!(r.queries, query.queries);
        assert_eq!(r.metadata.response_code, ResponseCode::Refused, "the root is outside the zone");
    }

    // The question's case is kept (resolvers check 0x20 bits).
    let r = f.ask(Ask { name: "WwW.cDn.TeSt.", ..Ask::default() });
    assert_eq!(r.queries[0].name().to_string(), "WwW.cDn.TeSt.");
    assert_eq!(r.answers.len(), 2);
}

#[test]
fn queries_with_many_questions_get_formerr_without_them() {
    // Found by the `dns` fuzz target: seven long questions in a UDP query without
    // EDNS. Echoed, they did not fit 512 bytes even truncated, and hickory-server
    // sent a bare SERVFAIL instead. Names compressed in the query could also make
    // the echo far larger than the query, even past 64 KiB over TCP.
    let f = fixture();
    let mut message = Message::query();
    message.metadata.id = 9;
    let long = format!("{}.{}.{}.cdn.test.", "a".repeat(60), "b".repeat(60), "c".repeat(60));
    for i in 0..7 {
        message.add_query(Query::query(Name::from_ascii(format!("x{i}.{long}")).unwrap(), RecordType::A));
    }
    let bytes = message.to_vec().unwrap();
    for protocol in [Protocol::Udp, Protocol::Tcp] {
        let r = f.raw(bytes.clone(), "192.0.2.1:53", protocol).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr, "{protocol}");
        assert!(r.queries.is_empty(), "{protocol}");
        assert!(!r.metadata.truncation, "{protocol}");
    }
    // Two short ones: the same.
    let mut message = Message::from_vec(&query_bytes(&Ask::default())).unwrap();
    message.add_query(Query::query(Name::from_ascii("cdn.test.").unwrap(), RecordType::SOA));
    let r = f.raw(message.to_vec().unwrap(), "192.0.2.1:53", Protocol::Udp).unwrap();
    assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
    assert!(r.queries.is_empty());
}

#[test]
fn acme_challenges_are_answered_while_published() {
    let f = fixture();
    let ask = Ask { name: "_acme-challenge.WWW.cdn.test.", qtype: RecordType::TXT, ..Ask::default() };
    let r = f.ask(ask);
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "nothing published");
    let mut published = std::collections::HashMap::new();
    published.insert("_acme-challenge.www.cdn.test".to_string(), vec!["v1".to_string(), "v2".to_string()]);
    published.insert("_acme-challenge.other.example".to_string(), vec!["x".to_string()]);
    f.shared.challenges.store(Arc::new(published));
    let r = f.ask(ask);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    let values: Vec<String> = r
        .answers
        .iter()
        .map(|record| match &record.data {
            RData::TXT(txt) => String::from_utf8(txt.txt_data[0].to_vec()).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(values, ["v1", "v2"]);
    assert!(r.answers.iter().all(|record| record.ttl == 0));
    // Only TXT, and only inside the zone.
    let r = f.ask(Ask { qtype: RecordType::A, ..ask });
    assert!(r.answers.is_empty());
    let r = f.ask(Ask { name: "_acme-challenge.other.example.", qtype: RecordType::TXT, ..Ask::default() });
    assert_eq!(r.metadata.response_code, ResponseCode::Refused);
}
