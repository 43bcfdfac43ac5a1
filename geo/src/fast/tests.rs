use std::sync::Mutex;

use cdn_cluster::MemberState;
use hickory_proto::{
    op::{Edns, Message, Query as HickoryQuery},
    rr::{
        RecordType,
        rdata::opt::{ClientSubnet, EdnsCode, EdnsOption},
    },
};

use super::*;
use crate::{
    config::Config,
    fuzzing,
    handler::{MemberSource, MemberView},
    metrics::Metrics,
    mmdb::GeoDb,
};

struct Fixture {
    worker: Worker,
    shared: Arc<Shared>,
    members: Arc<Mutex<Vec<Member>>>,
    registry: prometheus::Registry,
}

/// A worker over `config` and a cluster the test may change.
fn fixture_with(config: &Config, members: Vec<Member>) -> Fixture {
    config.validate().unwrap();
    let members = Arc::new(Mutex::new(members));
    let source: MemberSource = {
        let members = members.clone();
        Arc::new(move || Arc::new(members.lock().unwrap().clone()))
    };
    let registry = prometheus::Registry::new();
    let metrics = Metrics::register(&registry).unwrap();
    let shared = Arc::new(Shared::new(config, Arc::new(GeoDb::none()), source, metrics).unwrap());
    Fixture { worker: Worker::new(shared.clone(), 0), shared, members, registry }
}

/// The fuzzing harness's zone and cluster: 56 edges, near ties, six networks.
fn fixture() -> Fixture {
    fixture_with(&fuzzing::config(), fuzzing::members())
}

fn src(addr: &str) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), 40_000)
}

/// A query as a resolver sends it.
fn query(id: u16, name: &str, qtype: RecordType, edns: Option<(u16, Option<&str>)>) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(HickoryQuery::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some((payload, ecs)) = edns {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        if let Some(ecs) = ecs {
            edns.options_mut().insert(EdnsOption::Subnet(ecs.parse::<ClientSubnet>().unwrap()));
        }
        message.set_edns(edns);
    }
    message.to_vec().unwrap()
}

fn ecs_of(message: &Message) -> Option<ClientSubnet> {
    match message.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(subnet) => Some(*subnet),
        _ => None,
    }
}

fn addrs(message: &Message) -> Vec<String> {
    message.answers.iter().map(|record| record.data.to_string()).collect()
}

const SERVICES: [&str; 3] = ["www.cdn.test.", "video.cdn.test.", "cdn.test."];

#[test]
fn parse_takes_the_common_query_and_leaves_the_rest() {
    let services = fuzzing::config();
    let zone = crate::zone::Zone::from_config(&services).unwrap();
    let services = zone.service_wire_names();
    let fast = |packet: &[u8]| parse(packet, &services).is_some();

    let plain = query(1, "www.cdn.test.", RecordType::A, None);
    assert!(fast(&plain));
    let parsed = parse(&plain, &services).unwrap();
    assert_eq!((parsed.family, parsed.payload, parsed.ecs), (Family::V4, None, None));
    assert_eq!(parsed.question, &plain[12..]);
    assert!(fast(&query(1, "WwW.CdN.TeSt.", RecordType::AAAA, Some((1232, None)))));
    assert!(fast(&query(1, "cdn.test.", RecordType::A, Some((4096, Some("10.1.2.0/24"))))));
    let with_ecs = query(1, "video.cdn.test.", RecordType::A, Some((512, Some("2001:db8:1::/48"))));
    let ecs = parse(&with_ecs, &services).unwrap().ecs.unwrap();
    assert_eq!((ecs.addr, ecs.source), ("2001:db8:1::".parse().unwrap(), 48));

    // Left to the slow path: other names and types, another class, other
    // opcodes, responses, trailing bytes, cut packets.
    for name in ["nope.cdn.test.", "ns1.cdn.test.", "www.cdn.test.example.", "www.cdn.tes."] {
        assert!(!fast(&query(1, name, RecordType::A, None)), "{name}");
    }
    for qtype in [RecordType::ANY, RecordType::TXT, RecordType::SOA, RecordType::MX, RecordType::AXFR] {
        assert!(!fast(&query(1, "www.cdn.test.", qtype, None)), "{qtype}");
    }
    let mut chaos = plain.clone();
    let last = chaos.len() - 1;
    chaos[last] = 3;
    assert!(!fast(&chaos), "class CH");
    let mut notify = plain.clone();
    notify[2] |= 4 << 3;
    assert!(!fast(&notify), "opcode NOTIFY");
    let mut response = plain.clone();
    response[2] |= 0x80;
    assert!(!fast(&response), "a response");
    let mut trailing = plain.clone();
    trailing.push(0);
    assert!(!fast(&trailing), "bytes after the question");
    for len in 0..plain.len() {
        assert!(!fast(&plain[..len]), "cut at {len}");
    }
    let with_edns = query(1, "www.cdn.test.", RecordType::A, Some((1232, Some("10.1.2.0/24"))));
    for len in 0..with_edns.len() {
        assert!(!fast(&with_edns[..len]), "cut at {len}");
    }

    // The name compressed into the header.
    let mut compressed = plain[..12].to_vec();
    compressed.extend_from_slice(&[0xC0, 0x0C, 0, 1, 0, 1]);
    assert!(!fast(&compressed));
    // Two questions.
    let mut two = Message::query();
    two.add_query(HickoryQuery::query(Name::from_ascii("www.cdn.test.").unwrap(), RecordType::A));
    two.add_query(HickoryQuery::query(Name::from_ascii("www.cdn.test.").unwrap(), RecordType::A));
    assert!(!fast(&two.to_vec().unwrap()));

    // EDNS: version 1, NSID, an unknown option, a second ECS, a malformed ECS.
    let edns_with = |edit: &dyn Fn(&mut Edns)| {
        let mut message = Message::query();
        message.add_query(HickoryQuery::query(Name::from_ascii("www.cdn.test.").unwrap(), RecordType::A));
        let mut edns = Edns::new();
        edit(&mut edns);
        message.set_edns(edns);
        message.to_vec().unwrap()
    };
    assert!(!fast(&edns_with(&|edns| {
        edns.set_version(1);
    })));
    assert!(fast(&edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(10, vec![7; 8])))), "cookie");
    assert!(fast(&edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(12, vec![0; 20])))), "padding");
    assert!(!fast(&edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(3, Vec::new())))), "NSID");
    assert!(!fast(&edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(65001, vec![1])))));
    assert!(!fast(&edns_with(&|edns| {
        edns.options_mut().insert(EdnsOption::Subnet("10.1.0.0/16".parse().unwrap()));
        edns.options_mut().insert(EdnsOption::Subnet("10.2.0.0/16".parse().unwrap()));
    })));
    // Address bits past the source prefix (FORMERR on the slow path), a v4 prefix
    // over 32, an unknown family, the address shorter than the prefix needs.
    for option in [
        vec![0, 1, 12, 0, 10, 1],
        vec![0, 1, 33, 0, 10, 1, 2, 3, 4],
        vec![0, 3, 8, 0, 10],
        vec![0, 1, 24, 0, 10, 0],
        vec![0, 1],
    ] {
        let packet = edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(8, option.clone())));
        assert!(!fast(&packet), "{option:?}");
    }
    // Octets past those the prefix needs are ignored (as hickory does; dnsperf's -E).
    for option in [vec![0, 1, 24, 0, 192, 0, 2, 0], vec![0, 1, 16, 0, 10, 1, 2], vec![0, 1, 8, 0, 10, 0xff]] {
        let packet = edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(8, option.clone())));
        let ecs = parse(&packet, &services).unwrap().ecs.unwrap();
        assert_eq!(ecs.address.len(), usize::from(ecs.source).div_ceil(8), "{option:?}");
    }
    assert!(fast(&edns_with(&|edns| edns.options_mut().insert(EdnsOption::Unknown(8, vec![0, 1, 0, 0])))), "/0");
}

/// Queries over the harness's zone: service names in several cases, other names
/// and types, with and without EDNS and ECS, from clients everywhere.
fn queries() -> Vec<(Vec<u8>, SocketAddr)> {
    let mut all = Vec::new();
    let sources = ["10.1.2.3", "10.2.0.9", "10.3.7.7", "192.0.2.200", "203.0.113.5", "2001:db8:1::5", "2001:db8:ff::1"];
    let names = [
        "www.cdn.test.",
        "WWW.cdn.TEST.",
        "wWw.CdN.tEsT.",
        "video.cdn.test.",
        "cdn.test.",
        "CDN.Test.",
        "ns1.cdn.test.",
        "nope.cdn.test.",
        "example.org.",
    ];
    let ecs = [
        None,
        Some("10.1.0.0/16"),
        Some("10.1.2.0/24"),
        Some("10.2.3.0/24"),
        Some("10.3.0.0/20"),
        Some("192.0.2.0/24"),
        Some("198.51.100.0/24"),
        Some("0.0.0.0/0"),
        Some("2001:db8:1::/48"),
        Some("2001:db8:2:3::/56"),
        Some("2001:db8::1/128"),
    ];
    let mut id = 0u16;
    for source in sources {
        for name in names {
            for qtype in [RecordType::A, RecordType::AAAA, RecordType::ANY, RecordType::SOA, RecordType::TXT] {
                for edns in [None, Some((512, None)), Some((1232, None)), Some((4096, None)), Some((100, None))] {
                    id = id.wrapping_add(7919);
                    all.push((query(id, name, qtype, edns), src(source)));
                }
                for subnet in ecs {
                    for payload in [1232, 600] {
                        id = id.wrapping_add(7919);
                        all.push((query(id, name, qtype, Some((payload, subnet))), src(source)));
                    }
                }
            }
        }
    }
    // ECS options as some clients send them: the whole address with a shorter
    // prefix (ignored octets), or bits set past the prefix (FORMERR).
    for option in [
        vec![0, 1, 24, 0, 192, 0, 2, 0],
        vec![0, 1, 24, 0, 10, 3, 9, 77],
        vec![0, 1, 16, 0, 10, 1, 2],
        vec![0, 1, 12, 0, 10, 1],
        vec![0, 2, 48, 0, 0x20, 0x01, 0x0d, 0xb8, 0, 1, 9, 9],
    ] {
        let mut message = Message::query();
        message.metadata.id = 4242;
        message.add_query(HickoryQuery::query(Name::from_ascii("www.cdn.test.").unwrap(), RecordType::A));
        let mut edns = Edns::new();
        edns.options_mut().insert(EdnsOption::Unknown(8, option));
        message.set_edns(edns);
        all.push((message.to_vec().unwrap(), src("203.0.113.5")));
    }
    // Header flags the answer copies (RD, CD) or ignores (AD, and bits a query should not set).
    for flags in [0x00, 0x01, 0x10, 0x20, 0x30, 0x04, 0x02, 0x40, 0x80] {
        let mut packet = query(42, "www.cdn.test.", RecordType::A, Some((1232, Some("10.2.0.0/16"))));
        packet[2] = (packet[2] & !0x01) | (flags & 0x01);
        packet[2] |= flags & 0x06;
        packet[3] = flags & 0xF0;
        all.push((packet, src("10.1.2.3")));
    }
    all
}

#[test]
fn fast_answers_are_the_slow_paths_bytes() {
    // Few answers (fit any payload) and the harness's 20 (often too large for UDP).
    let mut few = fuzzing::config();
    few.answers = 2;
    for config in [few, fuzzing::config()] {
        let mut fixture = fixture_with(&config, fuzzing::members());
        let (mut fast, mut total) = (0, 0);
        for (packet, from) in queries() {
            for counter in [0, 1, 2, 99, 12_345] {
                total += 1;
                let slow = fixture.worker.slow_only(&packet, from, counter).expect("the slow path answers");
                let Some(answer) = fixture.worker.fast_only(&packet, from, counter) else { continue };
                fast += 1;
                if answer != slow {
                    let (answer, slow) = (Message::from_vec(&answer), Message::from_vec(&slow));
                    panic!("fast {answer:#?}\nslow {slow:#?}");
                }
            }
        }
        assert!(fast > total / 10, "the fast path answered {fast} of {total}");
        assert!(fast < total, "and left some to the slow path");
    }
}

#[test]
fn the_response_echoes_the_id_the_question_as_asked_and_the_ecs_scope() {
    let mut fixture = fixture();
    let packet = query(0xBEEF, "wWw.CdN.TeSt.", RecordType::A, Some((1232, Some("10.1.2.0/24"))));
    let response = fixture.worker.handle(&packet, src("192.0.2.1"), Instant::now()).unwrap().to_vec();
    assert!(fixture.worker.fast_only(&packet, src("192.0.2.1"), 0).is_some(), "a fast-path query");
    let message = Message::from_vec(&response).unwrap();
    assert_eq!(message.metadata.id, 0xBEEF);
    assert!(message.metadata.authoritative && message.metadata.recursion_desired);
    assert_eq!(message.metadata.response_code, ResponseCode::NoError);
    // The question exactly as sent, case included.
    let question = 12 + "wWw.CdN.TeSt.".len() + 1 + 4;
    assert_eq!(&response[12..question], &packet[12..question]);
    assert_eq!(message.queries[0].name().to_string(), "wWw.CdN.TeSt.");
    assert!(message.answers.iter().all(|record| record.name.to_string() == "wWw.CdN.TeSt."));
    // 10.1.0.0/16 is where the client is; no more specific network: scope 16.
    let subnet = ecs_of(&message).unwrap();
    assert_eq!((subnet.addr(), subnet.source_prefix(), subnet.scope_prefix()), ("10.1.2.0".parse().unwrap(), 24, 16));
    assert_eq!(subnet.scope_prefix(), fixture.shared.locate("10.1.2.0".parse().unwrap()).scope);
    // A healthy edge in New York comes first.
    assert!(
        ["198.51.100.1", "198.51.100.11", "198.51.100.21"].contains(&addrs(&message)[0].as_str()),
        "{:?}",
        addrs(&message)
    );

    // Another ID, another client network: the same cached plan patched anew.
    let packet = query(7, "WWW.CDN.TEST.", RecordType::A, Some((1232, Some("10.1.200.0/24"))));
    let response =
        Message::from_vec(fixture.worker.handle(&packet, src("192.0.2.1"), Instant::now()).unwrap()).unwrap();
    assert_eq!(response.metadata.id, 7);
    assert_eq!(response.queries[0].name().to_string(), "WWW.CDN.TEST.");
    assert_eq!(ecs_of(&response).map(|subnet| subnet.scope_prefix()), Some(16));
    // ECS with source prefix 0: the source address locates; scope 0.
    let packet = query(8, "www.cdn.test.", RecordType::A, Some((1232, Some("0.0.0.0/0"))));
    let response = Message::from_vec(fixture.worker.handle(&packet, src("10.3.0.1"), Instant::now()).unwrap()).unwrap();
    assert_eq!(ecs_of(&response).map(|subnet| subnet.scope_prefix()), Some(0));
    assert_eq!(fixture.worker.plans(), 2, "New York's and Mumbai's plans");
    let noerror = fixture.registry.gather();
    let noerror = noerror.iter().find(|family| family.name() == "cdn_dns_queries_total").unwrap();
    let count: f64 = noerror
        .get_metric()
        .iter()
        .filter(|m| m.get_label().iter().any(|l| l.value() == "noerror"))
        .map(|m| m.get_counter().get_value())
        .sum();
    assert_eq!(count, 4.0, "fast-path answers are counted (three, and the test hook's)");
}

#[test]
fn plans_are_kept_until_the_member_view_changes() {
    let mut config = fuzzing::config();
    config.answers = 2;
    let mut fixture = fixture_with(&config, fuzzing::members());
    let packet = query(1, "www.cdn.test.", RecordType::A, Some((1232, Some("10.3.0.0/24"))));
    let ask = |fixture: &mut Fixture| {
        let bytes = fixture.worker.fast_only(&packet, src("192.0.2.1"), 0).expect("a fast-path answer");
        addrs(&Message::from_vec(&bytes).unwrap())
    };
    let before = ask(&mut fixture);
    assert_eq!(before.len(), 2);
    assert_eq!(fixture.worker.plans(), 1);
    assert_eq!(ask(&mut fixture), before);
    assert_eq!(fixture.worker.plans(), 1, "the same view: the plan is reused");

    // The edges answered go down: the very next answer leaves them out.
    let set = |fixture: &Fixture, state: MemberState| {
        for member in fixture.members.lock().unwrap().iter_mut() {
            if member.public_addr.is_some_and(|ip| before.contains(&ip.to_string())) {
                member.state = state;
            }
        }
    };
    set(&fixture, MemberState::Drained);
    let after = ask(&mut fixture);
    assert_eq!(after.len(), 2);
    assert!(after.iter().all(|ip| !before.contains(ip)), "{after:?} still holds one of {before:?}");
    assert_eq!(fixture.worker.plans(), 1, "planned anew");
    // Back up: back in the answer.
    set(&fixture, MemberState::Alive);
    assert_eq!(ask(&mut fixture), before);
    // A load change is a change too.
    fixture.members.lock().unwrap().iter_mut().for_each(|member| member.load = 0.99);
    assert_eq!(
        fixture.worker.fast_only(&packet, src("192.0.2.1"), 0),
        None,
        "every edge overloaded: the slow path's degraded answer"
    );
}

#[test]
fn rate_limited_queries_are_dropped_or_slipped_once_counted() {
    let mut config = fuzzing::config();
    config.rate_limit = 3;
    config.answers = 2;
    let mut fixture = fixture_with(&config, fuzzing::members());
    let packet = query(1, "www.cdn.test.", RecordType::A, Some((1232, Some("10.3.0.0/24"))));
    let now = Instant::now();
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let response =
            fixture.worker.handle(&packet, src("192.0.2.1"), now).map(|bytes| Message::from_vec(bytes).unwrap());
        outcomes.push(
            response.map(|message| (message.metadata.truncation, message.answers.len(), ecs_of(&message).is_some())),
        );
    }
    assert_eq!(
        outcomes,
        [
            Some((false, 2, true)),
            Some((false, 2, true)),
            Some((false, 2, true)),
            None,
            Some((true, 0, true)),
            None,
            Some((true, 0, true)),
            None,
        ]
    );
    let families = fixture.registry.gather();
    let limited = families.iter().find(|family| family.name() == "cdn_dns_rate_limited_total").unwrap();
    assert_eq!(limited.get_metric()[0].get_counter().get_value(), 5.0, "each limited response counted once");
}

#[test]
fn malformed_packets_get_what_hickory_gave_them() {
    let mut fixture = fixture();
    let from = src("192.0.2.1");
    // No header: nothing.
    assert!(fixture.worker.handle(&[1, 2, 3], from, Instant::now()).is_none());
    // A header announcing a question that is not there: FORMERR, no question.
    let bytes = [0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xff];
    let response = Message::from_vec(fixture.worker.handle(&bytes, from, Instant::now()).unwrap()).unwrap();
    assert_eq!((response.metadata.id, response.metadata.response_code), (0x1234, ResponseCode::FormErr));
    assert!(response.queries.is_empty());
    // A response: dropped.
    let mut packet = query(1, "www.cdn.test.", RecordType::A, None);
    packet[2] |= 0x80;
    assert!(fixture.worker.handle(&packet, from, Instant::now()).is_none());
    // Bad ECS bits: FORMERR from the handler, the option echoed.
    let mut message = Message::query();
    message.add_query(HickoryQuery::query(Name::from_ascii("www.cdn.test.").unwrap(), RecordType::A));
    let mut edns = Edns::new();
    edns.options_mut().insert(EdnsOption::Unknown(8, vec![0, 1, 12, 0, 10, 1]));
    message.set_edns(edns);
    let response =
        Message::from_vec(fixture.worker.handle(&message.to_vec().unwrap(), from, Instant::now()).unwrap()).unwrap();
    assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
}

#[test]
fn services_cover_every_configured_name() {
    let zone = crate::zone::Zone::from_config(&fuzzing::config()).unwrap();
    let wire = zone.service_wire_names();
    assert_eq!(wire.len(), SERVICES.len());
    for name in SERVICES {
        let mut bytes = Vec::new();
        Name::from_ascii(name).unwrap().emit(&mut BinEncoder::new(&mut bytes)).unwrap();
        assert!(wire.contains(&bytes), "{name}");
    }
}

#[test]
fn a_watched_view_is_read_again_only_when_its_version_changes() {
    let mut config = fuzzing::config();
    config.answers = 2;
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(fuzzing::members()));
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    let shared = Arc::new(Shared::new(&config, Arc::new(GeoDb::none()), MemberView::Watch(rx), metrics).unwrap());

    // The view's version says whether to read it again.
    let mut view = shared.members.clone();
    assert!(view.changed().is_none(), "unchanged since the channel was made");
    let same = Arc::new(fuzzing::members());
    tx.send_replace(same.clone());
    assert!(Arc::ptr_eq(&view.changed().unwrap(), &same));
    assert!(view.changed().is_none(), "read once per change");

    let mut worker = Worker::new(shared.clone(), 0);
    assert!(Arc::ptr_eq(&worker.members, &same));
    let packet = query(1, "www.cdn.test.", RecordType::A, Some((1232, Some("10.3.0.0/24"))));
    let ask = |worker: &mut Worker| {
        let bytes = worker.fast_only(&packet, src("192.0.2.1"), 0).expect("a fast-path answer");
        addrs(&Message::from_vec(&bytes).unwrap())
    };
    let before = ask(&mut worker);
    assert_eq!(worker.plans(), 1);
    // The same members sent again: read, the plans kept.
    let again = Arc::new(fuzzing::members());
    tx.send_replace(again.clone());
    assert_eq!(ask(&mut worker), before);
    assert!(Arc::ptr_eq(&worker.members, &again), "the new view was read");
    assert_eq!(worker.plans(), 1, "and the plans kept");
    // The answered edges drained: the very next answer leaves them out.
    let mut drained = fuzzing::members();
    for member in &mut drained {
        if member.public_addr.is_some_and(|ip| before.contains(&ip.to_string())) {
            member.state = MemberState::Drained;
        }
    }
    tx.send_replace(Arc::new(drained));
    let after = ask(&mut worker);
    assert!(after.iter().all(|ip| !before.contains(ip)), "{after:?} still holds one of {before:?}");
    // The cluster gone (the channel closed): its last view still answers.
    drop(tx);
    assert_eq!(ask(&mut worker), after);
    assert_eq!(shared.members.load().len(), fuzzing::members().len());
}
