//! The admin listener every node runs: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process serves at all; `/readyz` answers 200
//! only while the role says it can take traffic (see [`Readiness`]) and 503 with the
//! reasons otherwise — a load balancer or the geo-DNS takes a node out on 503.
//!
//! Roles run [`serve`] under their supervisor as the task that stops last
//! ([`crate::supervise::Supervisor::spawn_last`]), so `/readyz` answers 503 while
//! the other listeners drain.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError},
};

use http::{Method, Response, StatusCode, header};
use prometheus::{Encoder as _, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listener::{self, Body, Limits, full};

/// Named readiness conditions of a node; ready when every condition holds.
///
/// Roles register a condition (`"origin"`, `"cluster"`, `"shutdown"`, …) and flip it
/// as the world changes. Cheap to clone; clones share state.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    conditions: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// A readiness with no conditions (ready).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the condition `name`.
    pub fn set(&self, name: &'static str, ok: bool) {
        self.conditions.lock().unwrap_or_else(PoisonError::into_inner).insert(name, ok);
    }

    /// Whether every condition holds.
    pub fn is_ready(&self) -> bool {
        self.failing().is_empty()
    }

    /// The names of the conditions that do not hold.
    pub fn failing(&self) -> Vec<&'static str> {
        let conditions = self.conditions.lock().unwrap_or_else(PoisonError::into_inner);
        conditions.iter().filter(|(_, ok)| !**ok).map(|(name, _)| *name).collect()
    }
}

/// Answers one admin request.
pub fn respond(method: &Method, path: &str, registry: &Registry, readiness: &Readiness) -> Response<Body> {
    let text = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CACHE_CONTROL, "no-store")
            .body(full(body))
            .unwrap_or_else(|_| Response::new(listener::empty()))
    };
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n".into());
    }
    match path {
        "/metrics" => {
            let mut buffer = Vec::new();
            let encoder = TextEncoder::new();
            if let Err(error) = encoder.encode(&registry.gather(), &mut buffer) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n"));
            }
            Response::builder()
                .header(header::CONTENT_TYPE, encoder.format_type())
                .header(header::CACHE_CONTROL, "no-store")
                .body(full(buffer))
                .unwrap_or_else(|_| Response::new(listener::empty()))
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let failing = readiness.failing();
            if failing.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", failing.join(", ")))
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, registry: Registry, readiness: Readiness, shutdown: CancellationToken) {
    let limits = Limits { max_connections: 256, ..Limits::default() };
    listener::serve("admin", listener, None, limits, shutdown, move |req, _| {
        let response = respond(req.method(), req.uri().path(), &registry, &readiness);
        async move { response }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_lists_failing_conditions() {
        let registry = Registry::new();
        let readiness = Readiness::new();
        assert_eq!(respond(&Method::GET, "/readyz", &registry, &readiness).status(), StatusCode::OK);
        readiness.set("origin", false);
        readiness.set("cache", true);
        assert_eq!(readiness.failing(), vec!["origin"]);
        assert_eq!(respond(&Method::GET, "/readyz", &registry, &readiness).status(), StatusCode::SERVICE_UNAVAILABLE);
        readiness.set("origin", true);
        assert!(readiness.is_ready());
        assert_eq!(respond(&Method::GET, "/healthz", &registry, &readiness).status(), StatusCode::OK);
        assert_eq!(respond(&Method::GET, "/nope", &registry, &readiness).status(), StatusCode::NOT_FOUND);
        assert_eq!(respond(&Method::POST, "/metrics", &registry, &readiness).status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
