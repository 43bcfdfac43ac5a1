//! The geo role end to end: a real `cdn_geo::Geo` on loopback (`TestGeo` from
//! `cdn-test-support`), asked by hickory (raw messages over UDP and TCP, and
//! hickory's resolver) and by `dig`.

#[path = "../geo/src/mmdb/writer.rs"]
mod mmdb_writer;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use cdn_cluster::{GeoPoint, Member, MemberState, Role};
use cdn_geo::{Config, Geo, MemberSource, config::Location, config::Network};
use cdn_test_support::geo::{Dig, TIMEOUT, TestGeo};
use hickory_proto::{
    op::{Edns, Message, Query, ResponseCode},
    rr::{
        Name, RData, RecordType,
        rdata::opt::{ClientSubnet, EdnsCode, EdnsOption},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UdpSocket},
};

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
        gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7946)),
        state: MemberState::Alive,
        ready: true,
        load: 0.2,
    }
}

fn three_edges() -> Vec<Member> {
    vec![
        edge("us-east-1", "us-east", NYC, "127.0.0.11"),
        edge("eu-west-1", "eu-west", DUBLIN, "127.0.0.12"),
        edge("ap-south-1", "ap-south", MUMBAI, "127.0.0.13"),
    ]
}

/// The test config: zone `cdn.test`, three static networks, everything on port 0.
fn config() -> Config {
    let mut config = Config::new("cdn.test");
    config.listen.dns = "127.0.0.1:0".parse().unwrap();
    config.listen.admin = Some("127.0.0.1:0".parse().unwrap());
    config.default_region = Some("eu-west".into());
    for (cidr, at) in [("10.1.0.0/16", NYC), ("10.2.0.0/16", DUBLIN), ("10.3.0.0/16", MUMBAI)] {
        config.networks.push(Network {
            cidr: cidr.into(),
            location: Some(Location { lat: at.lat, lon: at.lon }),
            region: None,
        });
    }
    config
}

/// A query for `name`/`qtype` with EDNS (payload 1232) and optionally ECS.
fn query(name: &str, qtype: RecordType, ecs: Option<&str>) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some(ecs) = ecs {
        edns.options_mut().insert(EdnsOption::Subnet(ecs.parse::<ClientSubnet>().unwrap()));
    }
    message.set_edns(edns);
    message
}

/// Sends `message` over UDP; `None` when no answer comes within `wait`.
async fn udp_wait(server: SocketAddr, message: &Message, wait: Duration) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(&message.to_vec().unwrap(), server).await.unwrap();
    let mut buffer = vec![0; 65_535];
    let (len, _) = tokio::time::timeout(wait, socket.recv_from(&mut buffer)).await.ok()?.unwrap();
    let response = Message::from_vec(&buffer[..len]).expect("a well-formed response");
    assert_eq!(response.metadata.id, message.metadata.id);
    Some(response)
}

async fn udp(server: SocketAddr, message: &Message) -> Message {
    udp_wait(server, message, TIMEOUT).await.expect("an answer over udp")
}

async fn tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let bytes = message.to_vec().unwrap();
    stream.write_all(&u16::try_from(bytes.len()).unwrap().to_be_bytes()).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut len = [0u8; 2];
    tokio::time::timeout(TIMEOUT, stream.read_exact(&mut len)).await.expect("tcp answer in time").unwrap();
    let mut buffer = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buffer).await.unwrap();
    Message::from_vec(&buffer).unwrap()
}

fn addrs(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(aaaa) => Some(aaaa.0.to_string()),
            _ => None,
        })
        .collect()
}

fn ecs(message: &Message) -> Option<ClientSubnet> {
    match message.edns.as_ref()?.option(EdnsCode::Subnet)? {
        EdnsOption::Subnet(subnet) => Some(*subnet),
        _ => None,
    }
}

/// `dig` at `server`; it must get an answer.
async fn dig(server: &TestGeo, args: &[&str]) -> Dig {
    let dig = cdn_test_support::geo::dig(server.dns, args).await;
    assert!(dig.success, "dig {args:?} failed: {}{}", dig.out, dig.stderr);
    dig
}

#[tokio::test]
async fn ecs_from_each_region_gets_that_regions_edge_first() {
    let geo = TestGeo::start(config(), three_edges()).await;
    for (subnet, first, region) in [
        ("10.1.7.0/24", "127.0.0.11", "us-east"),
        ("10.2.3.0/24", "127.0.0.12", "eu-west"),
        ("10.3.200.0/24", "127.0.0.13", "ap-south"),
    ] {
        // hickory client.
        let response = udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some(subnet))).await;
        assert_eq!(response.metadata.response_code, ResponseCode::NoError);
        assert!(response.metadata.authoritative);
        let answers = addrs(&response);
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert_eq!(answers[0], first, "{subnet}");
        let echoed = ecs(&response).expect("ECS echoed");
        assert_eq!((echoed.source_prefix(), echoed.scope_prefix()), (24, 16), "{subnet}");
        assert_eq!(response.answers[0].ttl, 30);

        // dig as a peer.
        let out = dig(&geo, &["www.cdn.test", "A", &format!("+subnet={subnet}")]).await;
        assert_eq!(out.status(), "NOERROR", "{}", out.out);
        assert!(out.flags().contains(&"aa"), "{}", out.out);
        assert_eq!(out.a_records().first().copied(), Some(first), "{}", out.out);
        assert!(out.out.contains(&format!("CLIENT-SUBNET: {subnet}/16")), "scope echoed: {}", out.out);
        assert!(geo.metric("cdn_dns_answers_total", &[("region", region)]) >= 2.0);
    }
    // Without ECS the source address (127.0.0.1) is unknown: the default region.
    let response = udp(geo.dns, &query("www.cdn.test.", RecordType::A, None)).await;
    assert_eq!(addrs(&response)[0], "127.0.0.12");
    assert!(ecs(&response).is_none());
    assert!(geo.metric("cdn_dns_queries_total", &[("rcode", "noerror")]) >= 7.0);
    geo.stop().await;
}

#[tokio::test]
async fn hickory_resolver_gets_the_default_region_over_udp() {
    use hickory_resolver::{
        Resolver,
        config::{NameServerConfig, ResolverConfig, ResolverOpts},
        net::runtime::TokioRuntimeProvider,
    };
    let geo = TestGeo::start(config(), three_edges()).await;
    let mut server = NameServerConfig::udp_and_tcp(IpAddr::from([127, 0, 0, 1]));
    for connection in &mut server.connections {
        connection.port = geo.dns.port();
    }
    let mut options = ResolverOpts::default();
    options.timeout = Duration::from_secs(3);
    options.cache_size = 0;
    let resolver =
        Resolver::builder_with_config(ResolverConfig::from_name_servers(vec![server]), TokioRuntimeProvider::default())
            .with_options(options)
            .build()
            .unwrap();
    let lookup = resolver.lookup("www.cdn.test.", RecordType::A).await.unwrap();
    let answers: Vec<String> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(answers.first().map(String::as_str), Some("127.0.0.12"), "{answers:?}");
    let soa = resolver.lookup("cdn.test.", RecordType::SOA).await.unwrap();
    assert!(soa.answers().iter().any(|r| matches!(r.data, RData::SOA(_))));
    assert!(resolver.lookup("nope.cdn.test.", RecordType::A).await.is_err(), "NXDOMAIN");
    geo.stop().await;
}

#[tokio::test]
async fn zone_basics_with_dig() {
    let geo = TestGeo::start(config(), three_edges()).await;
    let soa = dig(&geo, &["cdn.test", "SOA"]).await;
    assert_eq!(soa.status(), "NOERROR", "{}", soa.out);
    assert!(soa.flags().contains(&"aa"), "{}", soa.out);
    let records = soa.answers();
    assert_eq!(records.len(), 1, "{}", soa.out);
    assert_eq!(records[0][3], "SOA");
    assert_eq!(records[0][4], "ns1.cdn.test.");
    assert_eq!(records[0][5], "hostmaster.cdn.test.");

    let ns = dig(&geo, &["cdn.test", "NS"]).await;
    assert_eq!(ns.status(), "NOERROR");
    assert!(ns.flags().contains(&"aa"));
    assert_eq!(ns.answers()[0][3..], ["NS", "ns1.cdn.test."]);
    assert!(ns.out.contains(";; ADDITIONAL SECTION:\nns1.cdn.test."), "glue: {}", ns.out);

    let missing = dig(&geo, &["nope.cdn.test", "A"]).await;
    assert_eq!(missing.status(), "NXDOMAIN", "{}", missing.out);
    assert!(missing.flags().contains(&"aa"));
    assert!(missing.out.contains(";; AUTHORITY SECTION:\ncdn.test."), "SOA in authority: {}", missing.out);

    let outside = dig(&geo, &["example.com", "A"]).await;
    assert_eq!(outside.status(), "REFUSED", "{}", outside.out);
    assert!(!outside.flags().contains(&"aa"));

    let nodata = dig(&geo, &["www.cdn.test", "MX"]).await;
    assert_eq!(nodata.status(), "NOERROR");
    assert!(nodata.answers().is_empty());
    assert!(nodata.out.contains(";; AUTHORITY SECTION:\ncdn.test."), "{}", nodata.out);

    // EDNS: our payload size is advertised.
    let edns = dig(&geo, &["www.cdn.test", "A", "+bufsize=4096"]).await;
    assert!(edns.out.contains("udp: 1232"), "{}", edns.out);
    // Over TCP too.
    let over_tcp = dig(&geo, &["www.cdn.test", "A", "+tcp", "+subnet=10.3.0.0/24"]).await;
    assert_eq!(over_tcp.a_records().first().copied(), Some("127.0.0.13"), "{}", over_tcp.out);
    assert!(geo.metric("cdn_dns_queries_total", &[("rcode", "nxdomain")]) >= 1.0);
    assert!(geo.metric("cdn_dns_queries_total", &[("rcode", "refused")]) >= 1.0);
    geo.stop().await;
}

#[tokio::test]
async fn large_answers_set_tc_over_udp_and_come_whole_over_tcp() {
    let mut config = config();
    config.answers = 40;
    let edges: Vec<Member> = (0..40)
        .map(|i| {
            let at = GeoPoint { lat: -60.0 + f64::from(i) * 3.0, lon: -170.0 + f64::from(i) * 8.0 };
            edge(&format!("edge-{i}"), "r", at, &format!("127.1.0.{}", i + 1))
        })
        .collect();
    let geo = TestGeo::start(config, edges).await;

    let truncated = dig(&geo, &["www.cdn.test", "A", "+notcp", "+ignore"]).await;
    assert!(truncated.flags().contains(&"tc"), "{}", truncated.out);
    assert!(truncated.a_records().is_empty(), "{}", truncated.out);
    let whole = dig(&geo, &["www.cdn.test", "A", "+tcp"]).await;
    assert!(!whole.flags().contains(&"tc"), "{}", whole.out);
    assert_eq!(whole.a_records().len(), 40, "{}", whole.out);
    // dig's default: retry over TCP on TC.
    let retried = dig(&geo, &["www.cdn.test", "A"]).await;
    assert_eq!(retried.a_records().len(), 40, "{}", retried.out);

    let response = udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("10.2.0.0/24"))).await;
    assert!(response.metadata.truncation);
    assert!(response.answers.is_empty());
    assert!(ecs(&response).is_some(), "the OPT record survives truncation");
    let response = tcp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("10.2.0.0/24"))).await;
    assert_eq!(addrs(&response).len(), 40);
    assert!(geo.metric("cdn_dns_truncated_total", &[]) >= 3.0);
    geo.stop().await;
}

#[tokio::test]
async fn unhealthy_edges_leave_the_next_answer_and_least_bad_answer_when_none_is_healthy() {
    let geo = TestGeo::start(config(), three_edges()).await;
    let from_dublin = query("www.cdn.test.", RecordType::A, Some("10.2.0.0/24"));
    assert_eq!(addrs(&udp(geo.dns, &from_dublin).await)[0], "127.0.0.12");

    geo.members.lock().unwrap()[1].state = MemberState::Drained;
    let answers = addrs(&udp(geo.dns, &from_dublin).await);
    assert_eq!(answers, ["127.0.0.11", "127.0.0.13"], "drained edge gone at once");
    geo.members.lock().unwrap()[0].load = 0.95;
    assert_eq!(addrs(&udp(geo.dns, &from_dublin).await), ["127.0.0.13"], "overloaded edge gone");
    geo.members.lock().unwrap()[1].state = MemberState::Alive;
    assert_eq!(addrs(&udp(geo.dns, &from_dublin).await)[0], "127.0.0.12", "undrained: back");

    for member in geo.members.lock().unwrap().iter_mut() {
        member.state = MemberState::Dead;
    }
    let response = udp(geo.dns, &from_dublin).await;
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addrs(&response), ["127.0.0.12", "127.0.0.11"], "least-bad edges, nearest first");
    assert!(geo.metric("cdn_dns_degraded_answers_total", &[]) >= 1.0);
    geo.stop().await;
}

#[tokio::test]
async fn garbage_gets_no_panic_and_the_server_keeps_answering() {
    let geo = TestGeo::start(config(), three_edges()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = query("www.cdn.test.", RecordType::A, Some("10.1.0.0/24")).to_vec().unwrap();
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut garbage: Vec<Vec<u8>> = vec![vec![], vec![0], vec![0xff; 11], vec![0xff; 12], vec![0; 512]];
    // A header announcing a question that is not there.
    garbage.push(vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xff]);
    for _ in 0..300 {
        let mut bytes = valid.clone();
        for _ in 0..(next() % 6 + 1) {
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        bytes.truncate(bytes.len() - (next() as usize) % 8);
        garbage.push(bytes);
    }
    for _ in 0..50 {
        garbage.push((0..(next() % 600)).map(|_| next() as u8).collect());
    }
    for bytes in &garbage {
        socket.send_to(bytes, geo.dns).await.unwrap();
    }
    // Garbage over TCP too: a length prefix and junk, then a closed connection.
    let mut stream = TcpStream::connect(geo.dns).await.unwrap();
    stream.write_all(&[0x00, 0x10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]).await.unwrap();
    drop(stream);

    let response = udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("10.1.0.0/24"))).await;
    assert_eq!(addrs(&response)[0], "127.0.0.11");
    let response = tcp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("10.3.0.0/24"))).await;
    assert_eq!(addrs(&response)[0], "127.0.0.13");
    let out = dig(&geo, &["www.cdn.test", "A", "+subnet=10.2.0.0/24"]).await;
    assert_eq!(out.a_records().first().copied(), Some("127.0.0.12"));
    geo.stop().await;
}

#[tokio::test]
async fn udp_responses_are_rate_limited_per_client_network() {
    let mut config = config();
    config.rate_limit = 5;
    let geo = TestGeo::start(config, three_edges()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let message = query("www.cdn.test.", RecordType::A, None);
    for _ in 0..30 {
        socket.send_to(&message.to_vec().unwrap(), geo.dns).await.unwrap();
    }
    let (mut full, mut slipped) = (0, 0);
    let mut buffer = vec![0; 4096];
    while let Ok(Ok((len, _))) = tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await {
        let response = Message::from_vec(&buffer[..len]).unwrap();
        if response.metadata.truncation {
            assert!(response.answers.is_empty());
            slipped += 1;
        } else {
            full += 1;
        }
    }
    assert!((5..=7).contains(&full), "about one second's worth answered: {full}");
    assert!(slipped >= 5, "every second limited response slips: {slipped}");
    assert!(full + slipped < 30, "the rest are dropped");
    assert!(geo.metric("cdn_dns_rate_limited_total", &[]) >= 20.0);
    // TCP is not limited.
    let response = tcp(geo.dns, &message).await;
    assert_eq!(addrs(&response).len(), 2);
    geo.stop().await;
}

#[tokio::test]
async fn mmdb_locates_clients_and_reloads_when_the_file_changes() {
    use mmdb_writer::{city, country, write_v4};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("geo.mmdb");
    let london = city(51.51, -0.13, "GB");
    std::fs::write(
        &path,
        write_v4(
            "GeoIP2-City",
            &[(Ipv4Addr::new(81, 2, 69, 0), 24, london.clone()), (Ipv4Addr::new(49, 0, 0, 0), 8, country("IN"))],
        ),
    )
    .unwrap();
    let mut config = config();
    config.geoip_db = Some(path.clone());
    config.geoip_reload = Duration::from_millis(200);
    config.default_region = Some("us-east".into());
    let geo = TestGeo::start(config, three_edges()).await;

    let from_london = query("www.cdn.test.", RecordType::A, Some("81.2.69.0/24"));
    let response = udp(geo.dns, &from_london).await;
    assert_eq!(addrs(&response)[0], "127.0.0.12", "London → Dublin");
    assert_eq!(ecs(&response).map(|s| s.scope_prefix()), Some(24), "the database network is the scope");
    let country_only = udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("49.1.0.0/16"))).await;
    assert_eq!(addrs(&country_only)[0], "127.0.0.13", "India's centroid → Mumbai");
    let unknown = udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("198.51.100.0/24"))).await;
    assert_eq!(addrs(&unknown)[0], "127.0.0.11", "not in the database: default region");
    // The static networks still win.
    let static_net = udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("10.3.0.0/24"))).await;
    assert_eq!(addrs(&static_net)[0], "127.0.0.13");

    // Rewrite the database: the London network moves to Mumbai. No restart.
    let moved = write_v4("GeoIP2-City", &[(Ipv4Addr::new(81, 2, 69, 0), 24, city(19.08, 72.88, "IN"))]);
    let tmp = dir.path().join("geo.mmdb.new");
    std::fs::write(&tmp, moved).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = udp(geo.dns, &from_london).await;
        if addrs(&response)[0] == "127.0.0.13" {
            break;
        }
        assert!(Instant::now() < deadline, "the database was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken file keeps the loaded database.
    std::fs::write(&path, b"not a database").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(addrs(&udp(geo.dns, &from_london).await)[0], "127.0.0.13");
    geo.stop().await;
}

#[tokio::test]
async fn admin_serves_metrics_and_readiness() {
    let geo = TestGeo::start(config(), three_edges()).await;
    udp(geo.dns, &query("www.cdn.test.", RecordType::A, Some("10.1.0.0/24"))).await;
    for (path, expect) in
        [("/readyz", "200 OK"), ("/metrics", "cdn_dns_queries_total{rcode=\"noerror\"} 1"), ("/healthz", "200 OK")]
    {
        let mut stream = TcpStream::connect(geo.admin).await.unwrap();
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut text = String::new();
        tokio::time::timeout(TIMEOUT, stream.read_to_string(&mut text)).await.unwrap().unwrap();
        assert!(text.contains(expect), "{path}: {text}");
        if path == "/metrics" {
            for name in [
                "cdn_dns_answers_total{region=\"us-east\"} 1",
                "cdn_dns_answer_duration_seconds_count",
                "cdn_dns_rate_limited_total 0",
                "cdn_dns_queries_total{rcode=\"nxdomain\"} 0",
            ] {
                assert!(text.contains(name), "{name} in {text}");
            }
        }
    }
    geo.stop().await;
}

#[tokio::test]
async fn bad_configs_fail_before_binding() {
    let mut config = config();
    config.zone = String::new();
    config.networks[0].cidr = "10.1.0.0/99".into();
    let source: MemberSource = Arc::new(|| Arc::new(Vec::new()));
    let error = Geo::bind(config, &prometheus::Registry::new(), source.clone()).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("zone") && text.contains("networks[0].cidr"), "{text}");
    let mut config = self::config();
    config.geoip_db = Some("/nonexistent/geo.mmdb".into());
    let error = Geo::bind(config, &prometheus::Registry::new(), source).await.unwrap_err();
    assert!(error.to_string().contains("geoip_db"), "{error}");
}
