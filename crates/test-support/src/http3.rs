//! HTTP/3 for tests: QUIC connections (quinn) with ALPN `h3` that accept any
//! certificate, and an h3 client that reads whole responses.
//!
//! Moved from tests/edge/h3.rs; its `H3Reply` is now a [`Reply`] with version
//! HTTP/3.

use std::{net::SocketAddr, sync::Arc};

use bytes::{Buf as _, Bytes, BytesMut};
use http::Version;

use crate::client::Reply;

/// A QUIC connection with ALPN h3 to `addr`, certificate not checked, and the
/// endpoint that carries it.
pub async fn quic_connect(addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    quic_connect_accepting(addr, 1472).await
}

/// [`quic_connect`], with a client that accepts UDP payloads up to `max_udp_payload`
/// (its `max_udp_payload_size` transport parameter; quinn's default is 1472).
pub async fn quic_connect_accepting(addr: SocketAddr, max_udp_payload: u16) -> (quinn::Endpoint, quinn::Connection) {
    let mut tls = crate::tls::any_certificate();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a QUIC-capable TLS config");
    let mut endpoint_config = quinn::EndpointConfig::default();
    endpoint_config.max_udp_payload_size(max_udp_payload).expect("a valid UDP payload size");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    let mut endpoint =
        quinn::Endpoint::new(endpoint_config, None, socket, Arc::new(quinn::TokioRuntime)).expect("a QUIC endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint.connect(addr, "localhost").expect("connect").await.expect("quic handshake");
    (endpoint, connection)
}

/// A QUIC connection with ALPN h3 to `addr` for server name `name`, the server's
/// certificate checked against `roots` only.
pub async fn quic_connect_to(
    addr: SocketAddr,
    name: &str,
    roots: rustls::RootCertStore,
) -> Result<(quinn::Endpoint, quinn::Connection), quinn::ConnectionError> {
    let mut tls = cdn_node::tls::client_config(cdn_node::tls::ClientTrust::Roots(roots), true, &[b"h3"])
        .expect("a TLS 1.3 client config");
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("a QUIC-capable TLS config");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")).expect("a QUIC endpoint");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connection = endpoint.connect(addr, name).expect("connect").await?;
    Ok((endpoint, connection))
}

/// An HTTP/3 client connection (quinn + h3) to one server.
pub struct H3Client {
    send: ::h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    authority: String,
    port: u16,
    /// The QUIC connection, for its statistics.
    pub connection: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl H3Client {
    /// Connects to `addr` as quinn's default client does (UDP payloads up to 1472).
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_accepting(addr, 1472).await
    }

    /// A client that accepts UDP payloads up to `max_udp_payload`.
    pub async fn connect_accepting(addr: SocketAddr, max_udp_payload: u16) -> Self {
        let (endpoint, connection) = quic_connect_accepting(addr, max_udp_payload).await;
        Self::over(endpoint, connection, "localhost", addr.port()).await
    }

    /// A client for `https://<name>:<port>` on `addr`, trusting `roots` only.
    pub async fn connect_to(
        addr: SocketAddr,
        name: &str,
        roots: rustls::RootCertStore,
    ) -> Result<Self, quinn::ConnectionError> {
        let (endpoint, connection) = quic_connect_to(addr, name, roots).await?;
        Ok(Self::over(endpoint, connection, name, addr.port()).await)
    }

    async fn over(endpoint: quinn::Endpoint, connection: quinn::Connection, authority: &str, port: u16) -> Self {
        let (mut driver, send) =
            ::h3::client::new(h3_quinn::Connection::new(connection.clone())).await.expect("h3 handshake");
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Self { send, authority: authority.to_string(), port, connection, _endpoint: endpoint }
    }

    /// The certificate chain the server presented.
    pub fn peer_chain(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok())
            .map(|chain| *chain)
            .unwrap_or_default()
    }

    /// `GET https://<name>:<port><path>` with `headers` (name: `localhost` unless
    /// connected with [`connect_to`](Self::connect_to)); the whole response.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = http::Request::get(format!("https://{}:{}{path}", self.authority, self.port));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut stream = self.send.send_request(request.body(()).expect("a valid request")).await.expect("send");
        stream.finish().await.expect("finish the request");
        let response = stream.recv_response().await.expect("a response");
        let mut body = BytesMut::new();
        while let Some(mut chunk) = stream.recv_data().await.expect("the body") {
            body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
        }
        Reply {
            status: response.status(),
            version: Version::HTTP_3,
            headers: response.headers().clone(),
            body: body.freeze(),
        }
    }
}
