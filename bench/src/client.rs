//! Connecting and fetching: HTTP/1.1 (plain or TLS) and HTTP/2 over TLS with hyper's
//! connection-level client, HTTP/3 with quinn + h3.

use std::{net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use bytes::{Buf as _, Bytes};
use http::{HeaderMap, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    task::JoinHandle,
};

use crate::{Plan, Proto};

/// The outcome of one request (filled in as far as it got).
#[derive(Debug, Default)]
pub(crate) struct Fetched {
    pub(crate) status: StatusCode,
    /// `X-Cache` said HIT.
    pub(crate) hit: bool,
    /// Body bytes received.
    pub(crate) bytes: u64,
}

/// A way to send requests on an open connection; one per request loop.
pub(crate) enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    H3(h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>),
}

/// An open connection: the senders for its request loops, and what keeps it alive.
pub(crate) struct Connection {
    senders: Vec<Sender>,
    guard: Guard,
}

/// The connection's driver task (and for QUIC its endpoint); closing it ends the connection.
pub(crate) struct Guard {
    driver: JoinHandle<()>,
    quic: Option<(quinn::Connection, quinn::Endpoint)>,
}

impl Guard {
    /// Closes the connection; `quic_stats` prints QUIC's connection statistics first.
    pub(crate) fn close(self, quic_stats: bool) {
        if let Some((connection, _endpoint)) = &self.quic {
            if quic_stats {
                let stats = connection.stats();
                eprintln!(
                    "loadgen: quic path: mtu {} rtt {:?} udp_rx {} datagrams / {} bytes, udp_tx {} datagrams, \
                     client-side lost packets {}",
                    stats.path.current_mtu,
                    stats.path.rtt,
                    stats.udp_rx.datagrams,
                    stats.udp_rx.bytes,
                    stats.udp_tx.datagrams,
                    stats.path.lost_packets,
                );
            }
            connection.close(0u32.into(), b"done");
        }
        self.driver.abort();
    }
}

impl Connection {
    /// Opens a connection for `loops` concurrent request loops (1 for HTTP/1.1).
    pub(crate) async fn open(plan: &Plan, loops: usize) -> anyhow::Result<Self> {
        match plan.proto {
            Proto::H1 => {
                let tcp = tcp(plan.addr).await?;
                if plan.tls { h1(tls(plan, tcp, b"http/1.1").await?).await } else { h1(tcp).await }
            }
            Proto::H2 => {
                let tls = tls(plan, tcp(plan.addr).await?, b"h2").await?;
                let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(plan.stream_window)
                    .initial_connection_window_size(plan.connection_window)
                    .handshake(TokioIo::new(tls))
                    .await
                    .context("h2 handshake")?;
                let driver = tokio::spawn(async move {
                    let _ = connection.await;
                });
                let senders = (0..loops).map(|_| Sender::H2(send.clone())).collect();
                Ok(Self { senders, guard: Guard { driver, quic: None } })
            }
            Proto::H3 => h3(plan, loops).await,
        }
    }

    pub(crate) fn split(self) -> (Vec<Sender>, Guard) {
        (self.senders, self.guard)
    }
}

async fn tcp(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await.with_context(|| format!("tcp connect to {addr}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

async fn tls(plan: &Plan, tcp: TcpStream, alpn: &[u8]) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let config = plan.tls_config.clone().context("no TLS config")?;
    let name = ServerName::try_from(plan.host.clone()).context("TLS server name")?;
    let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.context("TLS handshake")?;
    let negotiated = stream.get_ref().1.alpn_protocol();
    anyhow::ensure!(
        negotiated == Some(alpn),
        "ALPN: asked for {}, server chose {:?}",
        String::from_utf8_lossy(alpn),
        negotiated.map(String::from_utf8_lossy)
    );
    Ok(stream)
}

async fn h1<T>(io: T) -> anyhow::Result<Connection>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.context("h1 handshake")?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Connection { senders: vec![Sender::H1(send)], guard: Guard { driver, quic: None } })
}

async fn h3(plan: &Plan, loops: usize) -> anyhow::Result<Connection> {
    let config = plan.tls_config.clone().context("no TLS config")?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).context("QUIC TLS config")?;
    let mut transport = quinn::TransportConfig::default();
    transport
        .stream_receive_window(quinn::VarInt::from_u32(plan.stream_window))
        .receive_window(quinn::VarInt::from_u32(plan.connection_window));
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport));
    let bind: SocketAddr = if plan.addr.is_ipv4() { "0.0.0.0:0".parse()? } else { "[::]:0".parse()? };
    let socket = std::net::UdpSocket::bind(bind).context("binding the UDP socket")?;
    // A larger receive buffer than Linux's default (208 KiB) so that a client briefly
    // off the CPU does not drop datagrams (TCP autotunes its buffers; UDP does not).
    // The kernel caps it at net.core.rmem_max.
    quinn::udp::UdpSocketState::new((&socket).into())
        .and_then(|state| state.set_recv_buffer_size((&socket).into(), plan.udp_recv_buffer))
        .context("setting the UDP receive buffer")?;
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.max_udp_payload_size(plan.max_udp_payload).context("max UDP payload")?;
    let endpoint =
        quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime)).context("QUIC endpoint")?;
    let connection = endpoint
        .connect_with(client, plan.addr, &plan.host)
        .context("QUIC connect")?
        .await
        .context("QUIC handshake")?;
    let (mut driver, send) =
        h3::client::new(h3_quinn::Connection::new(connection.clone())).await.context("h3 connection setup")?;
    let driver = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    let senders = (0..loops).map(|_| Sender::H3(send.clone())).collect();
    Ok(Connection { senders, guard: Guard { driver, quic: Some((connection, endpoint)) } })
}

impl Sender {
    /// Sends `request` and reads the whole response body into the void, counting it.
    pub(crate) async fn fetch(&mut self, request: Request<()>, fetched: &mut Fetched) -> anyhow::Result<()> {
        match self {
            Self::H1(send) => {
                send.ready().await.context("h1 connection")?;
                let response = send.send_request(request.map(|()| Empty::new())).await.context("h1 request")?;
                read_hyper(response, fetched).await
            }
            Self::H2(send) => {
                send.ready().await.context("h2 connection")?;
                let response = send.send_request(request.map(|()| Empty::new())).await.context("h2 request")?;
                read_hyper(response, fetched).await
            }
            Self::H3(send) => {
                let mut stream = send.send_request(request).await.context("h3 request")?;
                stream.finish().await.context("h3 request end")?;
                let response = stream.recv_response().await.context("h3 response")?;
                head(response.headers(), response.status(), fetched);
                while let Some(chunk) = stream.recv_data().await.context("h3 body")? {
                    fetched.bytes += chunk.remaining() as u64;
                }
                check_length(response.headers(), fetched)
            }
        }
    }
}

fn head(headers: &HeaderMap, status: StatusCode, fetched: &mut Fetched) {
    fetched.status = status;
    fetched.hit = headers.get("x-cache").is_some_and(|v| v.as_bytes().starts_with(b"HIT"));
}

async fn read_hyper(response: http::Response<Incoming>, fetched: &mut Fetched) -> anyhow::Result<()> {
    let (parts, mut body) = response.into_parts();
    head(&parts.headers, parts.status, fetched);
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame.context("body")?.data_ref() {
            fetched.bytes += data.len() as u64;
        }
    }
    check_length(&parts.headers, fetched)
}

/// A body shorter or longer than its Content-Length is an error.
fn check_length(headers: &HeaderMap, fetched: &Fetched) -> anyhow::Result<()> {
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(length) if length != fetched.bytes => {
            anyhow::bail!("body of {} bytes, Content-Length {length}", fetched.bytes)
        }
        _ => Ok(()),
    }
}
