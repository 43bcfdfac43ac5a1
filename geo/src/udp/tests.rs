use std::collections::HashMap;

use cdn_cluster::{GeoPoint, Member, MemberState, Role};

use hickory_proto::{
    op::{Edns, Message, Query, ResponseCode},
    rr::{
        Name, RecordType,
        rdata::opt::{ClientSubnet, EdnsOption},
    },
};

use super::*;
use crate::{config::Config, fuzzing, handler::MemberSource, metrics::Metrics, mmdb::GeoDb};

#[test]
fn answerable_sources() {
    assert!(answerable("192.0.2.1:53".parse().unwrap()));
    assert!(answerable("[2001:db8::1]:5353".parse().unwrap()));
    assert!(!answerable("192.0.2.1:0".parse().unwrap()));
    assert!(!answerable("0.0.0.0:53".parse().unwrap()));
    assert!(!answerable("255.255.255.255:53".parse().unwrap()));
    assert!(!answerable("[::]:53".parse().unwrap()));
}

#[test]
fn sockets_share_a_port() {
    let first = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    let addr = first.local_addr().unwrap();
    let second = bind(addr, true).unwrap();
    assert_eq!(second.local_addr().unwrap(), addr);
    // Without SO_REUSEPORT the port is taken.
    assert!(bind(addr, false).is_err());
    assert_eq!(socket_count(3), 3);
    assert!(socket_count(0) >= 1);
}

/// One IPv4 and one IPv6 edge per region, far apart.
fn members() -> Vec<Member> {
    let regions = [
        ("us-east", GeoPoint { lat: 40.71, lon: -74.01 }),
        ("eu-west", GeoPoint { lat: 53.35, lon: -6.26 }),
        ("ap-south", GeoPoint { lat: 19.08, lon: 72.88 }),
        ("sa-east", GeoPoint { lat: -23.55, lon: -46.63 }),
        ("ap-southeast", GeoPoint { lat: -33.87, lon: 151.21 }),
    ];
    let mut members = Vec::new();
    for (i, (region, at)) in regions.into_iter().enumerate() {
        let i = i as u8;
        for ip in
            [IpAddr::from([198, 51, 100, i + 1]), IpAddr::from([0x2001, 0xdb8, 0xed, 0, 0, 0, 0, u16::from(i) + 1])]
        {
            members.push(Member {
                node_id: format!("{region}-{ip}"),
                role: Role::Edge,
                region: region.into(),
                location: Some(at),
                public_addr: Some(ip),
                admin_addr: None,
                gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7000 + members.len() as u16)),
                state: MemberState::Alive,
                ready: true,
                load: 0.1,
            });
        }
    }
    members
}

/// The harness's zone over [`members`], two answers per query and no near-tie
/// spread, so that an answer does not depend on the order queries are answered in.
fn shared() -> Arc<Shared> {
    let mut config: Config = fuzzing::config();
    config.answers = 2;
    config.near_radius_km = 0.0;
    config.validate().unwrap();
    let members = Arc::new(members());
    let source: MemberSource = Arc::new(move || members.clone());
    let metrics = Metrics::register(&prometheus::Registry::new()).unwrap();
    Arc::new(Shared::new(&config, Arc::new(GeoDb::none()), source, metrics).unwrap())
}

fn query(id: u16, name: &str, qtype: RecordType, ecs: Option<&str>) -> Vec<u8> {
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(ecs) = ecs {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        if !ecs.is_empty() {
            edns.options_mut().insert(EdnsOption::Subnet(ecs.parse::<ClientSubnet>().unwrap()));
        }
        message.set_edns(edns);
    }
    message.to_vec().unwrap()
}

/// The `i`th query of a burst: service names in a letter case of their own (so
/// the echoed question tells queries apart), A and AAAA, with and without ECS,
/// and now and then one for the slow path (SOA, a name not in the zone, NXDOMAIN).
fn burst_query(id: u16, i: usize) -> Vec<u8> {
    let base = ["www.cdn.test.", "video.cdn.test.", "cdn.test."][i % 3];
    let name: String = base
        .chars()
        .enumerate()
        .map(|(at, c)| if (id as usize >> (at % 16)) & 1 == 1 { c.to_ascii_uppercase() } else { c })
        .collect();
    let ecs = [None, Some(""), Some("10.1.2.0/24"), Some("10.2.0.0/16"), Some("10.3.7.0/24"), Some("2001:db8:1::/48")];
    match i % 9 {
        4 => query(id, "cdn.test.", RecordType::SOA, None),
        7 => query(id, "nope.cdn.test.", RecordType::A, Some("")),
        8 => query(id, "example.org.", RecordType::A, None),
        _ => query(id, &name, if i.is_multiple_of(2) { RecordType::A } else { RecordType::AAAA }, ecs[i % ecs.len()]),
    }
}

fn id_of(bytes: &[u8]) -> u16 {
    u16::from_be_bytes([bytes[0], bytes[1]])
}

/// What a worker answers to each of `datagrams` (cut as the server reads them),
/// after checking that it does not depend on the worker's query counter.
fn expected(datagrams: &[(usize, Vec<u8>)], clients: &[UdpSocket]) -> Vec<Option<Vec<u8>>> {
    let mut first = Worker::new(shared(), 0);
    let mut second = Worker::new(shared(), 7);
    let now = Instant::now();
    datagrams
        .iter()
        .map(|(client, packet)| {
            let packet = &packet[..packet.len().min(MAX_DATAGRAM)];
            let from = clients[*client].local_addr().unwrap();
            let answer = first.handle(packet, from, now).map(<[u8]>::to_vec);
            assert_eq!(answer, second.handle(packet, from, now).map(<[u8]>::to_vec), "counter-independent");
            answer
        })
        .collect()
}

fn client() -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    socket
}

/// Sends `datagrams` (client index, bytes) to a fresh server socket before its
/// thread starts, so that they wait in its queue and are read in batches; then
/// serves them and returns what each client received, by query ID, once it has
/// as many answers as `expected` says it should (and nothing more came).
async fn serve_queued(
    datagrams: &[(usize, Vec<u8>)],
    clients: &[UdpSocket],
    expected: &[Option<Vec<u8>>],
) -> Vec<HashMap<u16, Vec<u8>>> {
    let server = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    let addr = server.local_addr().unwrap();
    for (client, packet) in datagrams {
        clients[*client].send_to(packet, addr).unwrap();
    }
    let mut servers = Servers::spawn(vec![server], &shared()).unwrap();
    let mut received = Vec::new();
    for (index, client) in clients.iter().enumerate() {
        let wanted = datagrams.iter().zip(expected).filter(|((c, _), answer)| *c == index && answer.is_some()).count();
        let mut answers = HashMap::new();
        let mut buffer = [0u8; 65_536];
        for _ in 0..wanted {
            let (len, from) = client.recv_from(&mut buffer).expect("an answer");
            assert_eq!(from, addr);
            let answer = buffer[..len].to_vec();
            assert!(answers.insert(id_of(&answer), answer).is_none(), "one answer per query");
        }
        client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(client.recv_from(&mut buffer).is_err(), "nothing more for client {index}");
        received.push(answers);
    }
    assert!(futures_util::FutureExt::now_or_never(servers.failed()).is_none(), "the server thread runs on");
    servers.stop().await;
    received
}

/// Each query's expected answer, by client and ID.
fn by_client(
    datagrams: &[(usize, Vec<u8>)],
    expected: &[Option<Vec<u8>>],
    clients: usize,
) -> Vec<HashMap<u16, Vec<u8>>> {
    let mut all = vec![HashMap::new(); clients];
    for ((client, packet), answer) in datagrams.iter().zip(expected) {
        if let Some(answer) = answer {
            assert!(all[*client].insert(id_of(packet), answer.clone()).is_none(), "IDs unique per client");
        }
    }
    all
}

#[test]
fn a_queued_burst_is_read_in_batches_with_each_source() {
    let server = bind("127.0.0.1:0".parse().unwrap(), true).unwrap();
    let addr = server.local_addr().unwrap();
    let clients = [client(), client()];
    for i in 0..BATCH + 8 {
        clients[i % 2].send_to(&burst_query(i as u16, i), addr).unwrap();
    }
    let mut inbox = Inbox::new();
    for (first, count) in [(0, BATCH), (BATCH, 8)] {
        assert_eq!(inbox.receive(&server).unwrap(), count);
        for index in 0..count {
            let i = first + index;
            let (packet, src) = inbox.datagram(index).unwrap();
            assert_eq!(packet, burst_query(i as u16, i), "datagram {i}");
            assert_eq!(src, Some(clients[i % 2].local_addr().unwrap()), "datagram {i}");
        }
        assert!(inbox.datagram(count).is_none());
    }
    // Nothing queued: the read timeout.
    let error = inbox.receive(&server).unwrap_err();
    assert!(matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{error}");
}

#[tokio::test]
async fn a_burst_from_several_clients_gets_each_query_its_own_answer() {
    let clients: Vec<UdpSocket> = (0..4).map(|_| client()).collect();
    // Round robin over the clients, so that each batch mixes them: 4 × 36 queries,
    // more than four full batches.
    let datagrams: Vec<(usize, Vec<u8>)> =
        (0..144).map(|i| (i % 4, burst_query(1000 * (i % 4) as u16 + (i / 4) as u16, i))).collect();
    let expected = expected(&datagrams, &clients);
    assert!(expected.iter().filter(|answer| answer.is_some()).count() > 130, "nearly all are answered");
    let received = serve_queued(&datagrams, &clients, &expected).await;
    let wanted = by_client(&datagrams, &expected, clients.len());
    for (client, (received, wanted)) in received.iter().zip(&wanted).enumerate() {
        assert_eq!(received.len(), wanted.len(), "client {client}");
        for (id, answer) in wanted {
            let got = received.get(id).unwrap_or_else(|| panic!("client {client}: no answer to {id}"));
            assert!(
                got == answer,
                "client {client}, query {id}: {:?}\nwanted {:?}",
                Message::from_vec(got),
                Message::from_vec(answer)
            );
        }
    }
}

#[tokio::test]
async fn a_malformed_datagram_in_a_batch_leaves_the_others_alone() {
    let clients = [client(), client()];
    let formerr = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xff];
    let mut response = query(3, "www.cdn.test.", RecordType::A, None);
    response[2] |= 0x80;
    // Longer than a datagram is read: cut, and answered as cut.
    let mut long = query(0x5555, "www.cdn.test.", RecordType::A, None);
    long.resize(5000, 0xAB);
    let datagrams = vec![
        (0, query(1, "www.cdn.test.", RecordType::A, Some("10.1.0.0/24"))),
        (0, vec![1, 2, 3]),
        (0, formerr),
        (1, query(2, "Video.cdn.test.", RecordType::AAAA, Some(""))),
        (0, response),
        (0, long),
        (1, query(4, "cdn.test.", RecordType::A, None)),
        (0, query(5, "WWW.cdn.test.", RecordType::A, Some("10.3.0.0/24"))),
    ];
    let expected = expected(&datagrams, &clients);
    let ids = |client: usize| {
        let mut ids: Vec<u16> = by_client(&datagrams, &expected, 2)[client].keys().copied().collect();
        ids.sort_unstable();
        ids
    };
    assert_eq!(ids(0), [1, 5, 0x1234, 0x5555], "no answer without a header or to a response");
    assert_eq!(ids(1), [2, 4]);
    let received = serve_queued(&datagrams, &clients, &expected).await;
    for (client, wanted) in by_client(&datagrams, &expected, 2).iter().enumerate() {
        assert_eq!(&received[client], wanted, "client {client}");
    }
    let rcode = |client: usize, id: u16| Message::from_vec(&received[client][&id]).unwrap().metadata.response_code;
    assert_eq!(rcode(0, 0x1234), ResponseCode::FormErr);
    for (client, id) in [(0, 1), (1, 2), (1, 4), (0, 5)] {
        assert_eq!(rcode(client, id), ResponseCode::NoError);
        assert_eq!(Message::from_vec(&received[client][&id]).unwrap().answers.len(), 2, "query {id}");
    }
}
