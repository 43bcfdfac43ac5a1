//! HTTP/3 over QUIC (quinn + h3): the same pipeline as HTTP/1.1 and HTTP/2.
//!
//! Responses stream with QUIC flow control as backpressure: `send_data` waits while
//! the client's window is full, so a slow reader never makes the edge buffer the
//! object. 0-RTT stays off (replayable requests).

use std::{
    net::{Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::{Buf as _, Bytes};
use futures_util::stream;
use http::Response;
use http_body_util::BodyExt as _;
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt, congestion};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use cdn_node::listener::{
    Body, BoxError,
    activity::{Activity, Closed, Reason, RequestGuard, Tracked, Verdict},
};

use crate::{
    Error,
    config::{Congestion, GSO_MAX_PAYLOAD, Limits, Quic},
    metrics::Protocol,
    pipeline::{Conn, Pipeline},
};

/// Builds the QUIC server configuration: TLS 1.3 only, ALPN `h3`, transport tuned
/// for video (large windows, the configured congestion controller, GSO).
pub(crate) fn server_config(
    certs: &Arc<cdn_node::certs::Certs>,
    quic: &Quic,
    max_streams: u32,
) -> Result<quinn::ServerConfig, Error> {
    let tls = certs.server_config(&[b"h3"], true)?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = TransportConfig::default();
    let idle = IdleTimeout::try_from(quic.idle_timeout)?;
    let window = u32::try_from(quic.stream_window.as_u64()).unwrap_or(u32::MAX);
    let connection_window = u32::try_from(quic.connection_window.as_u64()).unwrap_or(u32::MAX);
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(8))
        .max_idle_timeout(Some(idle))
        .stream_receive_window(VarInt::from_u32(window))
        .receive_window(VarInt::from_u32(connection_window))
        .send_window(quic.connection_window.as_u64())
        .enable_segmentation_offload(quic.max_udp_payload <= GSO_MAX_PAYLOAD);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(quic.max_udp_payload);
    transport.mtu_discovery_config(Some(mtu));
    match quic.congestion {
        Congestion::Cubic => transport.congestion_controller_factory(Arc::new(congestion::CubicConfig::default())),
        Congestion::Bbr => transport.congestion_controller_factory(Arc::new(congestion::BbrConfig::default())),
        Congestion::NewReno => transport.congestion_controller_factory(Arc::new(congestion::NewRenoConfig::default())),
    };
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Binds the QUIC endpoint with `socket_buffer` bytes of kernel buffer each way; an
/// unspecified IPv4 address binds dual-stack `[::]` (Chromium tries `::1` first for
/// `localhost` and does not fall back for QUIC).
pub(crate) fn bind(addr: SocketAddr, config: quinn::ServerConfig, socket_buffer: u64) -> Result<Endpoint, Error> {
    use socket2::{Domain, Protocol as IpProtocol, Socket, Type};
    let addr = if addr.ip().is_unspecified() { SocketAddr::from((Ipv6Addr::UNSPECIFIED, addr.port())) } else { addr };
    let bind_error = |source| Error::Node(cdn_node::Error::Bind { addr, source });
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(IpProtocol::UDP)).map_err(bind_error)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).map_err(bind_error)?;
    }
    let buffer = usize::try_from(socket_buffer).unwrap_or(usize::MAX);
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    if let Err(error) = socket.set_recv_buffer_size(buffer).and_then(|()| socket.set_send_buffer_size(buffer)) {
        warn!(%error, "could not size the QUIC socket buffers");
    }
    socket.bind(&addr.into()).map_err(bind_error)?;
    let runtime = quinn::default_runtime().ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))?;
    Endpoint::new(quinn::EndpointConfig::default(), Some(config), socket.into(), runtime).map_err(bind_error)
}

/// H3_EXCESSIVE_LOAD: the peer generates excessive load (RFC 9114, 8.1).
const H3_EXCESSIVE_LOAD: u32 = 0x107;

/// Accepts QUIC connections until `shutdown`; then sends GOAWAY on every
/// connection, lets open requests finish within the grace period, and closes the
/// endpoint. Connections are closed as the TCP listener closes them: idle, stalled
/// readers, and clients that cancel most of their requests (see
/// [`cdn_node::listener::activity`]).
pub(crate) async fn serve(endpoint: Endpoint, pipeline: Arc<Pipeline>, shutdown: CancellationToken, limits: Limits) {
    let grace = limits.grace;
    let limits = Arc::new(limits);
    if let Ok(addr) = endpoint.local_addr() {
        info!(listener = "h3", %addr, "listening");
    }
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let incoming = tokio::select! {
            () = shutdown.cancelled() => break,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => break,
            },
        };
        // Per-client connection limit: refused before the handshake.
        let slot = match pipeline.client_limits().map(|l| l.admit(incoming.remote_address().ip())) {
            Some(None) => {
                incoming.refuse();
                continue;
            }
            Some(Some(slot)) => Some(slot),
            None => None,
        };
        connections.spawn(connection(incoming, pipeline.clone(), shutdown.clone(), limits.clone(), slot));
        while connections.try_join_next().is_some() {}
    }
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!(listener = "h3", "grace period over, closing open QUIC connections");
    }
    endpoint.close(VarInt::from_u32(0x100), b"shutdown"); // H3_NO_ERROR
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

async fn connection(
    incoming: quinn::Incoming,
    pipeline: Arc<Pipeline>,
    shutdown: CancellationToken,
    limits: Arc<Limits>,
    _slot: Option<crate::limits::Slot>,
) {
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            debug!(%error, "quic handshake failed");
            return;
        }
    };
    let peer = connection.remote_address();
    let gauge = pipeline.metrics.connections.with_label_values(&["h3"]);
    gauge.inc();
    let _guard = scopeguard(move || gauge.dec());
    let quic = connection.clone();
    let mut h3 = match h3::server::builder().build::<_, Bytes>(h3_quinn::Connection::new(connection)).await {
        Ok(h3) => h3,
        Err(error) => {
            debug!(%error, %peer, "h3 setup failed");
            return;
        }
    };
    let mut requests = tokio::task::JoinSet::new();
    let mut going_away = false;
    let activity = Activity::new(Instant::now());
    let closed = Closed::of(&pipeline.metrics.connections_closed, "h3");
    let (idle, send) = (limits.idle_timeout, limits.send_timeout);
    let mut next = Instant::now() + idle.min(send);
    loop {
        if going_away && requests.is_empty() {
            break; // dropping the connection closes it (H3_NO_ERROR)
        }
        let accepted = tokio::select! {
            () = shutdown.cancelled(), if !going_away => {
                going_away = true;
                // GOAWAY: requests already accepted complete; no new ones.
                let _ = h3.shutdown(0).await;
                continue;
            }
            Some(_) = requests.join_next(), if going_away => continue,
            () = activity.abused() => {
                let (finished, cancelled) = activity.counts();
                warn!(%peer, finished, cancelled, "h3 client cancels most of its requests; connection closed");
                closed.count(Reason::Cancels);
                quic.close(VarInt::from_u32(H3_EXCESSIVE_LOAD), b"too many cancelled requests");
                requests.abort_all();
                break;
            }
            () = tokio::time::sleep_until(next.into()) => {
                let now = Instant::now();
                match activity.verdict(now, idle, send, None) {
                    Verdict::Fine(at) => next = at,
                    Verdict::Idle if !going_away => {
                        closed.count(Reason::Idle);
                        going_away = true;
                        let _ = h3.shutdown(0).await;
                        next = now + send;
                    }
                    Verdict::Idle => break,
                    // No head timer for QUIC (`None` above): its handshake has its own.
                    Verdict::SlowHead => break,
                    Verdict::Stalled => {
                        debug!(%peer, "h3 client stopped reading; connection closed");
                        closed.count(Reason::Stalled);
                        quic.close(VarInt::from_u32(H3_EXCESSIVE_LOAD), b"client stopped reading");
                        requests.abort_all();
                        break;
                    }
                }
                continue;
            }
            accepted = h3.accept() => accepted,
        };
        match accepted {
            Ok(Some(resolver)) => {
                let pipeline = pipeline.clone();
                let guard = activity.start();
                requests.spawn(async move {
                    match resolver.resolve_request().await {
                        Ok((request, stream)) => request_task(pipeline, request, stream, peer, guard).await,
                        Err(error) => debug!(%error, %peer, "bad h3 request"),
                    }
                });
            }
            Ok(None) => break,
            Err(error) => {
                debug!(%error, %peer, "h3 connection ended");
                break;
            }
        }
        while requests.try_join_next().is_some() {}
    }
    while requests.join_next().await.is_some() {}
}

type Stream = h3::server::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

async fn request_task(
    pipeline: Arc<Pipeline>,
    request: http::Request<()>,
    stream: Stream,
    peer: SocketAddr,
    mut guard: RequestGuard,
) {
    let (mut send, recv) = stream.split();
    let request = request.map(|()| request_body(recv));
    let response = pipeline.handle(request, Conn { protocol: Protocol::H3, peer, tls: true }).await;
    guard.responded();
    let (parts, body) = response.into_parts();
    // Driven to its end below: no announced length needed.
    let mut body = Tracked::new(body, guard, None);
    if let Err(error) = send.send_response(Response::from_parts(parts, ())).await {
        debug!(%error, %peer, "h3 response head not sent");
        return;
    }
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data()
                    && let Err(error) = send.send_data(data).await
                {
                    debug!(%error, %peer, "h3 client went away");
                    return;
                }
            }
            Err(error) => {
                // The body failed mid-way (origin reset, object changed): reset the
                // stream so the client cannot take a short body for a whole one.
                debug!(%error, %peer, "h3 response body failed");
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return;
            }
        }
    }
    let _ = send.finish().await;
}

fn request_body(recv: h3::server::RequestStream<h3_quinn::RecvStream, Bytes>) -> Body {
    let chunks = stream::unfold(Some(recv), |recv| async move {
        let mut recv = recv?;
        match recv.recv_data().await {
            Ok(Some(mut data)) => Some((Ok(data.copy_to_bytes(data.remaining())), Some(recv))),
            Ok(None) => None,
            Err(error) => Some((Err(BoxError::from(error.to_string())), None)),
        }
    });
    crate::pipeline::stream_body(chunks)
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
