//! The bodies of the fuzz targets. `cargo fuzz` runs them under libFuzzer
//! (fuzz_targets/); the main test suite runs every saved corpus input through the
//! same functions (tests/fuzz_corpus.rs), so a crash found once stays fixed.

use std::{
    net::{IpAddr, SocketAddr},
    sync::OnceLock,
    time::Duration,
};

use cdn_geo::fuzzing::{Harness, Transport};
use hickory_proto::op::{Message, MessageType, ResponseCode};

/// `Range` header parsing and range math: never panics, and every resolved range
/// lies inside the representation.
pub fn range(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Some(specs) = cdn_http::range::parse(text) else { return };
    for len in [0, 1, 2, 100, 1 << 20, u64::MAX / 2] {
        if let cdn_http::range::Resolved::Partial(ranges) = cdn_http::range::resolve(&specs, len) {
            for r in &ranges {
                assert!(r.start < r.end && r.end <= len, "{r:?} outside 0..{len}");
                let _ = cdn_http::range::content_range(r, len);
            }
            let multipart = cdn_http::range::Multipart::new(&ranges, len, Some("video/mp4"), "b");
            assert!(multipart.content_length >= ranges.iter().map(|r| r.end - r.start).sum::<u64>());
        }
    }
}

/// Cache-Control parsing and the freshness decision; the response line is also tried
/// as `CDN-Cache-Control` (a Structured Fields Dictionary) and `Surrogate-Control`,
/// and the host line (the third) as a `Host` field.
pub fn cache_control(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (request, rest) = text.split_once('\n').unwrap_or((text, text));
    let (response, host) = rest.split_once('\n').unwrap_or((rest, rest));
    if let Some((name, port)) = cdn_http::key::request_authority(host, "https") {
        assert_eq!(cdn_http::key::normalize_host(&name), Some(name.clone()), "normalising is idempotent");
        assert_ne!(port, Some(443), "the default port is dropped");
    }
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_str(response) {
        for name in [cdn_http::policy::CDN_CACHE_CONTROL, cdn_http::policy::SURROGATE_CONTROL, http::header::AGE] {
            headers.append(name, value.clone());
        }
    }
    let targeted = cdn_http::policy::Directives::response(&headers);
    let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let settings = cdn_http::policy::Settings::default();
    let lifetime = cdn_http::policy::freshness_lifetime(http::StatusCode::OK, &headers, &targeted, now, &settings);
    assert!(lifetime <= Duration::from_secs(1 << 31), "lifetime {lifetime:?}");
    let _ = cdn_http::policy::Timing::new(&headers, now, now);
    let request = cdn_http::policy::Directives::parse(request);
    let response = cdn_http::policy::Directives::parse(response);
    for (lifetime, age) in [(0, 0), (10, 5), (10, 20), (u32::MAX as u64, 1)] {
        let (lifetime, age) = (Duration::from_secs(lifetime), Duration::from_secs(age));
        let _ = cdn_http::policy::evaluate(&request, false, &response, lifetime, age, false);
        let _ = cdn_http::policy::stale_if_error(&request, &response, lifetime, age);
    }
}

/// Purge API bodies: parsing, validation and matching.
pub fn purge_body(data: &[u8]) {
    if let Ok(request) = serde_json::from_slice::<cdn_control::purge::PurgeRequest>(data)
        && let Ok(target) = request.target()
    {
        let _ = target.matches("https://www.cdn.test/v/a.mp4?x=1\u{1f}slice:3", &["video".into()]);
    }
}

/// Config files of every role: parsing and validation never panic.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = toml::from_str::<cdn_edge::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<cdn_origin::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<cdn_control::server::Config>(text) {
        let _ = config.validate();
    }
    if let Ok(config) = toml::from_str::<cdn_geo::Config>(text) {
        let _ = config.validate();
    }
}

/// The geo DNS request handler, over UDP and TCP, as the server runs it
/// (`cdn_geo::fuzzing`). The input is a source address then a DNS message: the
/// first byte's low bit picks IPv4 (4 address bytes follow) or IPv6 (16).
///
/// Every request geo answers gets a response that parses, carries the query's id,
/// is a response, echoes the question (a query with other than one question gets
/// none back), has an OPT record exactly when the query had one, and over UDP fits
/// 512 bytes (no EDNS) or the advertised payload size (at most 1232), and
/// max(512, 3 × the query) against amplification. A UDP response is either
/// truncated (TC, no records) or the same answer as over TCP.
pub fn dns(data: &[u8]) {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    let Some((&first, rest)) = data.split_first() else { return };
    let (ip, packet) = if first & 1 == 0 {
        let Some((addr, packet)) = rest.split_first_chunk::<4>() else { return };
        (IpAddr::from(*addr), packet)
    } else {
        let Some((addr, packet)) = rest.split_first_chunk::<16>() else { return };
        (IpAddr::from(*addr), packet)
    };
    let src = SocketAddr::new(ip, 53_000);
    let harness = HARNESS.get_or_init(Harness::new);
    let udp = harness.exchange(packet, src, Transport::Udp);
    let tcp = harness.exchange(packet, src, Transport::Tcp);
    assert_eq!(udp.is_some(), tcp.is_some(), "answered over one transport only");
    let (Some(udp), Some(tcp)) = (udp, tcp) else { return };
    // How the query reads to a plain parser (`None` where only the server's parses it).
    let query = Message::from_vec(packet).ok();
    let id = u16::from_be_bytes([packet[0], packet[1]]);
    let check = |bytes: &[u8], transport: &str| -> Message {
        let response = Message::from_vec(bytes).unwrap_or_else(|error| panic!("{transport} response: {error}"));
        assert_eq!(response.metadata.id, id, "{transport}: id");
        assert_eq!(response.metadata.message_type, MessageType::Response, "{transport}: QR");
        if let Some(query) = &query {
            assert_eq!(response.edns.is_some(), query.edns.is_some(), "{transport}: OPT echoed ({response:?})");
            // One question is echoed; queries with others are FORMERR and get none.
            let echoed = if query.queries.len() == 1 { &query.queries[..] } else { &[] };
            assert_eq!(response.queries, echoed, "{transport}: the question echoed");
        }
        response
    };
    let (on_udp, on_tcp) = (check(&udp, "udp"), check(&tcp, "tcp"));

    let payload = match query.as_ref().map(|query| query.edns.as_ref().map(|edns| edns.max_payload())) {
        Some(None) => 512,
        Some(Some(advertised)) => usize::from(advertised.clamp(512, 1232)),
        None => 1232,
    };
    let limit = payload.min((3 * packet.len()).max(512));
    assert!(udp.len() <= limit, "udp response of {} bytes over {limit}", udp.len());
    if on_udp.metadata.truncation {
        assert!(on_udp.answers.is_empty() && on_udp.authorities.is_empty(), "truncated yet with records");
    } else {
        assert_eq!(on_udp.metadata.response_code, on_tcp.metadata.response_code, "udp and tcp rcodes");
        assert_eq!(on_udp.answers.len(), on_tcp.answers.len(), "udp and tcp answers");
    }
    assert!(!on_tcp.metadata.truncation, "truncated over tcp");
    assert_ne!(on_tcp.metadata.response_code, ResponseCode::ServFail, "tcp: SERVFAIL");
}

/// `Accept-Encoding` folding (the `Vary: Accept-Encoding` cache key): never panics,
/// and never picks a coding the header gives `q=0` first.
pub fn accept_encoding(data: &[u8]) {
    use cdn_http::coding::{Coding, preferred};
    use http::{HeaderMap, HeaderValue, header::ACCEPT_ENCODING};
    let Ok(value) = HeaderValue::from_bytes(data) else { return };
    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT_ENCODING, value.clone());
    let _ = preferred(&headers);
    for (excluded, coding) in [("br;q=0", Coding::Br), ("gzip;q=0", Coding::Gzip)] {
        let mut headers = HeaderMap::new();
        headers.append(ACCEPT_ENCODING, HeaderValue::from_static(excluded));
        headers.append(ACCEPT_ENCODING, value.clone());
        assert_ne!(preferred(&headers), coding, "{value:?}");
    }
}
