//! HTTP/3: a quinn + h3 client (`cdn_test_support::http3`), and aioquic's client as
//! a peer nobody here wrote.

use std::time::Duration;

use bytes::Bytes;
use cdn_test_support::{
    client::tls_client,
    edge::start_tls_edge,
    http3::H3Client,
    mock_origin::{MockOrigin, Route},
};
use http::StatusCode;

#[tokio::test]
async fn miss_hit_range_and_a_large_body_over_http3() {
    let origin = MockOrigin::start().await;
    origin.route("/h3", Route::ok("max-age=60", "over quic"));
    let big: Vec<u8> = (0..10_000_000u32).map(|i| (i % 253) as u8).collect();
    origin.route("/big", Route::ok("max-age=60", big.clone()).header("etag", "\"big\"").ranges());
    let edge = start_tls_edge(&origin.url(), |_| {}).await;
    let mut client = H3Client::connect(edge.h3.unwrap()).await;
    let first = client.get("/h3", &[]).await;
    assert_eq!((first.status, first.header("x-cache")), (StatusCode::OK, "MISS"));
    assert_eq!(first.body, "over quic");
    let second = client.get("/h3", &[]).await;
    assert_eq!((second.status, second.header("x-cache")), (StatusCode::OK, "HIT"));
    assert_eq!(second.header("x-served-by"), "edge-test-1");
    assert!(second.headers.get("alt-svc").is_none(), "no Alt-Svc over h3 itself");
    let range = client.get("/big", &[("range", "bytes=1000-1999")]).await;
    assert_eq!(range.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.header("content-range"), "bytes 1000-1999/10000000");
    assert_eq!(&range.body[..], &big[1000..2000]);
    let whole = client.get("/big", &[]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body.len(), big.len());
    assert!(whole.body == big, "10 MB byte-exact over h3");
    assert!(edge.metric("cdn_requests_total", &[("protocol", "h3")]) >= 4.0);
    assert_eq!(edge.metric("cdn_connections", &[("protocol", "h3")]), 1.0);
    // The same cache behind all protocols: the h3 fill is a hit over h2 (same
    // scheme and host, so the same key).
    let url = format!("https://localhost:{}/h3", edge.https.unwrap().port());
    let h2 = tls_client()
        .request(http::Request::get(url).body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(h2.version(), http::Version::HTTP_2);
    assert_eq!(h2.headers()["x-cache"], "HIT");
    edge.stop().await;
}

#[tokio::test]
async fn datagrams_grow_to_what_the_path_and_the_client_accept() {
    let origin = MockOrigin::start().await;
    let big: Vec<u8> = (0..6_000_000u32).map(|i| (i % 249) as u8).collect();
    origin.route("/big", Route::ok("max-age=60", big.clone()));
    // Average UDP payload the client received during one download.
    async fn average_datagram(origin: &MockOrigin, ceiling: Option<u16>, accepts: u16, big: &[u8]) -> u64 {
        let edge = start_tls_edge(&origin.url(), |c| {
            if let Some(ceiling) = ceiling {
                c.quic.max_udp_payload = ceiling;
            }
        })
        .await;
        let mut client = H3Client::connect_accepting(edge.h3.unwrap(), accepts).await;
        client.get("/big", &[]).await; // fill, and time for path-MTU discovery
        let before = client.connection.stats().udp_rx;
        let reply = client.get("/big", &[]).await;
        assert!(reply.body == big, "byte-exact (ceiling {ceiling:?}, client accepts {accepts})");
        let after = client.connection.stats().udp_rx;
        edge.stop().await;
        (after.bytes - before.bytes) / (after.datagrams - before.datagrams)
    }
    // A client that accepts only Ethernet-sized datagrams gets them.
    let ethernet = average_datagram(&origin, None, 1472, &big).await;
    assert!((1300..=1472).contains(&ethernet), "average datagram {ethernet} B for a 1472-byte client");
    // Loopback carries 64 KiB: by default the edge goes up to 6500 bytes (GSO batches).
    let batched = average_datagram(&origin, None, 65527, &big).await;
    assert!((5000..=6500).contains(&batched), "average datagram {batched} B with the default ceiling");
    // Above 6500, datagrams go out one by one, still without a black hole (GSO sends
    // over 64 KiB would all be refused and discovery would fall back to 1200 bytes).
    let single = average_datagram(&origin, Some(20_000), 65527, &big).await;
    assert!((12_000..=20_000).contains(&single), "average datagram {single} B with a 20000-byte ceiling");
}

#[tokio::test]
async fn aioquic_peer_client_fetches_an_object_and_a_range() {
    let Some(client) = aioquic_client() else {
        panic!("aioquic's http3_client.py is missing: run scripts/test-deps.sh (./test.sh does)");
    };
    let origin = MockOrigin::start().await;
    let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    origin.route("/peer.bin", Route::ok("max-age=60", body.clone()).header("etag", "\"p\"").ranges());
    let edge = start_tls_edge(&origin.url(), |_| {}).await;
    let port = edge.h3.unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2 {
        let out = dir.path().join(format!("r{round}"));
        std::fs::create_dir_all(&out).unwrap();
        let status = tokio::process::Command::new("python3")
            .arg(&client)
            .args(["--insecure", "--output-dir"])
            .arg(&out)
            .arg(format!("https://127.0.0.1:{port}/peer.bin"))
            .kill_on_drop(true)
            .status();
        let status = tokio::time::timeout(Duration::from_secs(60), status).await.unwrap().unwrap();
        assert!(status.success(), "aioquic client failed");
        let fetched = std::fs::read(out.join("peer.bin")).unwrap();
        assert!(fetched == body, "aioquic got the object byte-exact (round {round})");
    }
    assert!(edge.metric("cdn_requests_total", &[("protocol", "h3"), ("cache", "hit")]) >= 1.0);
    // A range through a peer: aioquic's client takes no request headers, so drive
    // its library directly with a tiny script.
    let script = dir.path().join("range.py");
    std::fs::write(&script, AIOQUIC_RANGE).unwrap();
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(port.to_string())
        .arg("/peer.bin")
        .arg("bytes=100-199")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await.unwrap().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8_lossy(&output.stdout);
    let (head, hex) = text.split_once("\n\n").expect("status line, blank line, hex body");
    assert!(head.contains(":status 206"), "{head}");
    assert!(head.contains("content-range bytes 100-199/3000000"), "{head}");
    let bytes: Vec<u8> =
        (0..hex.trim().len()).step_by(2).map(|i| u8::from_str_radix(&hex.trim()[i..i + 2], 16).unwrap()).collect();
    assert_eq!(bytes, &body[100..200]);
    edge.stop().await;
}

/// Where scripts/test-deps.sh put aioquic's example client.
fn aioquic_client() -> Option<std::path::PathBuf> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peers/aioquic/examples/http3_client.py");
    path.exists().then_some(path)
}

const AIOQUIC_RANGE: &str = r#"
import asyncio, ssl, sys
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration

class Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.http = H3Connection(self._quic)
        self.done = asyncio.get_event_loop().create_future()
        self.headers, self.body = [], b""
    def quic_event_received(self, event):
        for e in self.http.handle_event(event):
            if isinstance(e, HeadersReceived):
                self.headers += e.headers
            elif isinstance(e, DataReceived):
                self.body += e.data
            if getattr(e, "stream_ended", False) and not self.done.done():
                self.done.set_result(None)

async def main(port, path, rng):
    config = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, verify_mode=ssl.CERT_NONE)
    async with connect("127.0.0.1", port, configuration=config, create_protocol=Client) as client:
        sid = client._quic.get_next_available_stream_id()
        client.http.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
            (b":authority", f"localhost:{port}".encode()), (b":path", path.encode()), (b"range", rng.encode())], end_stream=True)
        client.transmit()
        await asyncio.wait_for(client.done, 30)
        for k, v in client.headers:
            print(k.decode(), v.decode())
        print()
        print(client.body.hex())

asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
"#;
