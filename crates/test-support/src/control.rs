//! A control node (`cdn_control::server::Control`) in-process on loopback, joined
//! to a gossip cluster, and calls to its JSON API.
//!
//! Moved from tests/control/main.rs (`RunningControl`, now [`TestControl`]; `api`;
//! `wait_for_edges`; `wait_until` on the cluster view, now [`wait_for_state`]; the
//! `TOKEN` and `SECRET` the suite uses).

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use bytes::Bytes;
use cdn_cluster::{Cluster, ClusterConfig, MemberState};
use cdn_control::server::{Config, Control};
use http::{Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prometheus::Registry;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The API token of a [`TestControl`].
pub const TOKEN: &str = "test-token-0123456789";
/// The gossip secret of a [`TestControl`]'s cluster.
pub const SECRET: &str = "cluster-secret-for-tests";

/// A running control node `control-1`: API token [`TOKEN`], gossip secret
/// [`SECRET`], no admin listener, purges kept an hour.
pub struct TestControl {
    pub api: SocketAddr,
    pub registry: Registry,
    pub cluster: Arc<Cluster>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestControl {
    /// A control node keeping its data in `data_dir`, its API on `api` and gossip on
    /// `gossip` (port 0 picks one; a restart passes the first run's addresses).
    pub async fn start(data_dir: &Path, api: SocketAddr, gossip: SocketAddr) -> Self {
        Self::start_with(data_dir, api, gossip, |_| {}).await
    }

    /// [`start`](Self::start), with the config changed by `tweak` first.
    pub async fn start_with(
        data_dir: &Path,
        api: SocketAddr,
        gossip: SocketAddr,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::new("control-1", data_dir, TOKEN);
        config.listen.api = api;
        config.listen.admin = None;
        config.retention = Duration::from_secs(3600);
        config.cluster = Some(ClusterConfig::new(gossip, SECRET));
        tweak(&mut config);
        let registry = Registry::new();
        let control = Control::bind(config, &registry).await.expect("control binds");
        let (api, cluster) = (control.api_addr(), control.cluster().expect("a cluster"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { control.serve(shutdown).await.expect("control serves") }
        });
        Self { api, registry, cluster, shutdown, task }
    }

    /// The sum of the samples of metric `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        crate::metrics::sum_in(&self.registry, name, labels)
    }

    /// Cancels the node and waits (at most 10 s) for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A control API call: `method url` with `Authorization: Bearer <token>` when
/// given and `body`; the status and the JSON answer (`Null` when not JSON).
pub async fn api(method: Method, url: &str, token: Option<&str>, body: Option<&str>) -> (StatusCode, Value) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = http::Request::builder().method(method).uri(url);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::new(Bytes::from(body.unwrap_or("").to_string()))).expect("a valid request");
    let response = client.request(request).await.expect("api call");
    let status = response.status();
    let bytes = response.into_body().collect().await.expect("the answer's body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// Waits (up to 10 s) until `control`'s `/v1/nodes` shows these edges alive and ready.
pub async fn wait_for_edges(control: &TestControl, edges: &[&str]) {
    let url = format!("http://{}/v1/nodes", control.api);
    crate::wait::until(
        &format!("edges {edges:?} to join"),
        Duration::from_secs(10),
        Duration::from_millis(50),
        async || {
            let (_, nodes) = api(Method::GET, &url, Some(TOKEN), None).await;
            edges
                .iter()
                .all(|id| {
                    nodes.as_array().is_some_and(|nodes| {
                        nodes.iter().any(|n| n["node_id"] == *id && n["state"] == "alive" && n["ready"] == true)
                    })
                })
                .then_some(())
        },
    )
    .await;
}

/// Waits (up to 5 s) until `control`'s own cluster view shows `node` in `state`.
pub async fn wait_for_state(control: &TestControl, node: &str, state: MemberState) {
    let what = format!("{node} to be {state:?} in the control node's view");
    crate::wait::until(&what, Duration::from_secs(5), Duration::from_millis(25), async || {
        control.cluster.members().iter().any(|m| m.node_id == node && m.state == state).then_some(())
    })
    .await;
}
