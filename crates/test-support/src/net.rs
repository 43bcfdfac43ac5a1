//! Loopback plumbing: ports free for TCP and UDP at once, and raw HTTP/1.1
//! exchanges for requests no well-behaved client would send.
//!
//! From tests/edge/harness.rs (`free_port`) and tests/edge/main.rs (`raw_request`).

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A port free on 127.0.0.1 for both TCP and UDP (for HTTPS + HTTP/3 on one port,
/// or for an address a process is told in its config file).
pub fn free_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = tcp.local_addr().expect("local address").port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Writes `raw` to a fresh connection to `addr` and returns what one read brings
/// back (at most 4 KiB, within 5 s; empty when the server closed first).
pub async fn raw_request(addr: SocketAddr, raw: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw.as_bytes()).await.expect("write the request");
    let mut buffer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
        .await
        .expect("an answer within 5 s")
        .unwrap_or(0);
    String::from_utf8_lossy(&buffer[..n]).into_owned()
}
