//! The control node: the purge API, the routing document and drain/undrain, over
//! the cluster.
//!
//! Every `/v1` call needs `Authorization: Bearer <token>` (compared in constant
//! time). A purge is appended to the durable log and fsynced, then published in
//! gossip ([`Cluster::publish_purge`]) and pushed eagerly to every live edge; edges
//! report what they applied ([`Cluster::applied`]), and the node records when all of
//! them had it.
//!
//! A routing document (`PUT /v1/routing`) is validated, given the next version
//! (one more than the newest this node or any live control node holds), stored
//! durably ([`RoutingStore`]), then published ([`Cluster::publish_routing`]). Every
//! control node follows the cluster: when a live control node holds a document
//! that supersedes its own ([`Versioned::supersedes`]: a higher version, or the same
//! version accepted by a greater node id), it stores that one too, with its version
//! and author, and publishes it in turn; so a control node that restarts, or a new
//! one, goes on from the current version.
//!
//! The API, the admin listener and the background loops run under one
//! [`Supervisor`]: one that fails stops the node.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex as StdMutex, PoisonError},
    time::{Duration, Instant},
};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use prometheus::{IntCounter, IntGauge, Registry};
use serde::Deserialize;
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use cdn_cluster::{
    Cluster, ClusterConfig, Member, MemberState, NodeInfo, Role, now_ms,
    state::{Key, Topic},
};
use cdn_node::{
    ConfigError,
    admin::{self, Readiness},
    listener::{self, Body, Limits, full},
    secret::{constant_time_eq, node_id_problem},
    supervise::{Faults, Supervisor},
    tls::TlsConfig,
};

use crate::{
    Error,
    api::{ApiError, DrainAck, EdgeProgress, NodeView, PurgeAck, PurgeState, PurgeStatus, RoutingAck, RoutingView},
    purge::{PurgeRecord, PurgeRequest, log::PurgeLog},
    routing::{self, Format, Refusal, Versioned, store::RoutingStore},
};

/// The `cdn control` configuration. (Its `Debug` leaves the token out.)
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Stable id of this control node (its purge ids start with it).
    pub node_id: String,
    /// Listen addresses.
    #[serde(default)]
    pub listen: Listen,
    /// API token (or `token_file`). Never logged.
    pub token: Option<String>,
    /// File holding the API token.
    pub token_file: Option<PathBuf>,
    /// Where the purge log and the routing document live.
    pub data_dir: PathBuf,
    /// How long applied purges are kept before they are collected.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Serve the API over TLS.
    pub tls: Option<TlsConfig>,
    /// The cluster to join.
    pub cluster: Option<ClusterConfig>,
    /// Certificates for the fleet through ACME DNS-01 (see [`crate::acme`]).
    pub acme: Option<crate::acme::AcmeConfig>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("node_id", &self.node_id)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("token_file", &self.token_file)
            .field("data_dir", &self.data_dir)
            .field("retention", &self.retention)
            .field("tls", &self.tls)
            .field("cluster", &self.cluster)
            .field("acme", &self.acme)
            .finish()
    }
}

fn default_retention() -> Duration {
    Duration::from_secs(600)
}

/// `[listen]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// The purge/routing API.
    pub api: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<SocketAddr>,
}

impl Default for Listen {
    fn default() -> Self {
        Self { api: SocketAddr::from(([127, 0, 0, 1], 9000)), admin: Some(SocketAddr::from(([127, 0, 0, 1], 9001))) }
    }
}

impl Config {
    /// A control node `node_id` keeping its log in `data_dir`, with `token`.
    pub fn new(node_id: impl Into<String>, data_dir: impl Into<PathBuf>, token: impl Into<String>) -> Self {
        Self {
            node_id: node_id.into(),
            listen: Listen::default(),
            token: Some(token.into()),
            token_file: None,
            data_dir: data_dir.into(),
            retention: default_retention(),
            tls: None,
            cluster: None,
            acme: None,
        }
    }

    /// Checks every value, naming the key of each problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        problems.extend(node_id_problem(&self.node_id));
        match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => problems.push("token: set token or token_file, not both".into()),
            (None, None) => problems.push("token: required (or token_file)".into()),
            (Some(token), None) if token.len() < 16 => problems.push("token: must be at least 16 characters".into()),
            (None, Some(path)) if !path.is_file() => {
                problems.push(format!("token_file: {} is not a readable file", path.display()));
            }
            _ => {}
        }
        if let Some(tls) = &self.tls {
            problems.extend(tls.problems("tls"));
        }
        if let Some(cluster) = &self.cluster {
            problems.extend(cluster.problems("cluster"));
        }
        if let Some(acme) = &self.acme {
            problems.extend(acme.problems(self.cluster.is_some()));
        }
        ConfigError::check(problems)
    }

    fn load_token(&self) -> Result<String, Error> {
        match (&self.token, &self.token_file) {
            (Some(token), _) => Ok(token.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|source| Error::TokenFile { path: path.clone(), source }),
            (None, None) => Err(ConfigError { problems: vec!["token: required (or token_file)".into()] }.into()),
        }
    }
}

/// A fresh random token (32 hex characters) for development setups.
pub fn random_token() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No system randomness: fall back to the clock (still unguessable enough for dev).
        bytes.copy_from_slice(
            &u128::from(now_ms()).wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835).to_le_bytes(),
        );
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// When a purge was acknowledged and when every edge had applied it.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub(crate) acked: Instant,
    pub(crate) acked_ms: u64,
    pub(crate) completed_ms: Option<u64>,
    /// Edge → ms from acknowledgement to its report.
    pub(crate) per_edge: BTreeMap<String, u64>,
    /// What it purged, for the status page.
    pub(crate) summary: String,
}

pub(crate) struct State {
    pub(crate) node_id: String,
    token: String,
    pub(crate) cluster: Option<Arc<Cluster>>,
    log: Mutex<PurgeLog>,
    pub(crate) completions: StdMutex<HashMap<u64, Completion>>,
    pub(crate) rates: StdMutex<crate::status::Rates>,
    retention: Duration,
    unauthorized: IntCounter,
    log_errors: IntCounter,
    /// The routing document this node holds.
    routing: Mutex<RoutingStore>,
    /// `cdn_routing_version`: the version in `routing`.
    routing_version: IntGauge,
    /// `cdn_routing_store_errors_total`.
    routing_errors: IntCounter,
    /// Whether this node has heard from the cluster (or waited long enough alone
    /// to be the first node): a routing document accepted before then could take a
    /// version another control node already used.
    settled: watch::Sender<bool>,
    /// The ACME client, with `[acme]` (and a cluster).
    pub(crate) acme: Option<Arc<crate::acme::Acme>>,
}

/// A bound control node.
pub struct Control {
    state: Arc<State>,
    api: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    certs: Option<Arc<cdn_node::certs::Certs>>,
    admin: Option<TcpListener>,
    registry: Registry,
    cluster_shutdown: CancellationToken,
    faults: Faults,
}

impl Control {
    /// Opens the purge log, binds the listeners and joins the cluster.
    pub async fn bind(config: Config, registry: &Registry) -> Result<Self, Error> {
        config.validate()?;
        let token = config.load_token()?;
        let log = PurgeLog::open(&config.data_dir)
            .map_err(|source| Error::PurgeLog { dir: config.data_dir.clone(), source })?;
        let routing = RoutingStore::open(&config.data_dir)
            .map_err(|source| Error::RoutingStore { dir: config.data_dir.clone(), source })?;
        let api = listener::bind(config.listen.api).await?;
        let admin = match config.listen.admin {
            Some(addr) => Some(listener::bind(addr).await?),
            None => None,
        };
        let certs = match &config.tls {
            Some(tls) => {
                let certs = tls.certs(std::slice::from_ref(&config.node_id), &[config.listen.api.ip()])?;
                certs.register(registry)?;
                Some(certs)
            }
            None => None,
        };
        let tls = match &certs {
            Some(certs) => Some(Arc::new(certs.server_config(&[b"h2", b"http/1.1"], false)?)),
            None => None,
        };
        let cluster_shutdown = CancellationToken::new();
        let cluster = match &config.cluster {
            Some(cluster) => {
                let node = NodeInfo {
                    node_id: config.node_id.clone(),
                    role: Role::Control,
                    region: None,
                    location: None,
                    public_addr: None,
                    admin: admin.as_ref().and_then(|l| l.local_addr().ok()),
                };
                Some(Cluster::join(cluster, node, registry, cluster_shutdown.clone()).await?)
            }
            None => None,
        };
        let unauthorized = IntCounter::new("cdn_api_unauthorized_total", "Control API calls refused for a bad token")?;
        registry.register(Box::new(unauthorized.clone()))?;
        let log_errors = IntCounter::new(
            "cdn_purge_log_errors_total",
            "Purges refused because the purge log could not be written (disk full, I/O error)",
        )?;
        registry.register(Box::new(log_errors.clone()))?;
        let routing_version =
            IntGauge::new("cdn_routing_version", "Version of the routing document this control node holds (0: none)")?;
        registry.register(Box::new(routing_version.clone()))?;
        routing_version.set(i64::try_from(routing.version()).unwrap_or(i64::MAX));
        let routing_errors = IntCounter::new(
            "cdn_routing_store_errors_total",
            "Routing documents not stored because data_dir could not be written (refused or not adopted yet)",
        )?;
        registry.register(Box::new(routing_errors.clone()))?;
        let acme = match (&config.acme, &cluster, &config.cluster) {
            (Some(acme), Some(cluster), Some(cluster_config)) => Some(Arc::new(crate::acme::Acme::new(
                acme.clone(),
                &config.data_dir,
                &config.node_id,
                cluster.clone(),
                cdn_cluster::CertSeal::new(&cluster_config.secret),
            ))),
            _ => None,
        };
        let state = Arc::new(State {
            node_id: config.node_id.clone(),
            token,
            cluster,
            log: Mutex::new(log),
            completions: StdMutex::default(),
            rates: StdMutex::default(),
            retention: config.retention,
            unauthorized,
            log_errors,
            routing: Mutex::new(routing),
            routing_version,
            routing_errors,
            settled: watch::Sender::new(false),
            acme,
        });
        Ok(Self {
            state,
            api,
            tls,
            certs,
            admin,
            registry: registry.clone(),
            cluster_shutdown,
            faults: Faults::default(),
        })
    }

    /// The API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The cluster handle, when joined.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.state.cluster.clone()
    }

    /// Test hook: makes a named task (`api`, `admin`, `completions`, `gc`,
    /// `routing`, `cluster`) panic on demand (with `cdn-node`'s `test-util` feature;
    /// otherwise inert).
    #[doc(hidden)]
    pub fn faults(&self) -> Faults {
        self.faults.clone()
    }

    /// Serves until `shutdown`.
    ///
    /// Every task runs under one [`Supervisor`]: when one fails, `/readyz` turns
    /// 503, the others stop gracefully, and `serve` returns [`Error::Task`] naming it.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<(), Error> {
        let Self { state, api, tls, certs, admin, registry, cluster_shutdown, faults } = self;
        let readiness = Readiness::new();
        let mut tasks = Supervisor::new("control", shutdown.child_token(), Some(readiness.clone())).with_faults(faults);
        let token = tasks.token();
        if let Some(cluster) = &state.cluster {
            // Republish what the log holds (after a restart) before taking calls.
            {
                let log = state.log.lock().await;
                for record in log.records() {
                    cluster.publish_purge(record).await;
                }
                let floor = log.records().first().map_or(log.next_seq(), |r| r.seq);
                cluster.set_purge_floor(floor).await;
            }
            // And the routing document it holds (or that it holds none, so edges can
            // tell "none exists" from "not heard yet").
            {
                let store = state.routing.lock().await;
                match store.current() {
                    Some(versioned) => {
                        if let Err(error) = cluster.publish_routing(versioned).await {
                            warn!(%error, version = versioned.version, "stored routing document not published");
                        }
                    }
                    None => cluster.publish_no_routing().await,
                }
            }
            cluster.publish_health(true, 0.0).await;
            // Ready once the cluster view has other members (or after 5 s alone: the
            // first control node of a new cluster).
            readiness.set("cluster", false);
            tasks.spawn_job("cluster-ready", {
                let (cluster, readiness, shutdown) = (cluster.clone(), readiness.clone(), token.clone());
                let state = state.clone();
                async move {
                    let started = Instant::now();
                    while !shutdown.is_cancelled() {
                        let others = cluster.members().iter().any(|m| m.node_id != cluster.node_id());
                        if others || started.elapsed() > SETTLE {
                            readiness.set("cluster", true);
                            state.settled.send_replace(true);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            });
            tasks.spawn("completions", track_completions(state.clone(), cluster.clone(), token.clone()));
            tasks.spawn("gc", collect_garbage(state.clone(), cluster.clone(), token.clone()));
            tasks.spawn("routing", follow_routing(state.clone(), cluster.clone(), token.clone()));
            if let Some(acme) = &state.acme {
                tasks.spawn("acme", acme.clone().run(state.settled.subscribe(), token.clone()));
            }
            tasks.spawn("cluster", cluster.clone().supervise(token.clone()));
        } else {
            state.settled.send_replace(true);
        }
        if let Some(admin) = admin {
            // Stops after the others: `/readyz` says 503 while the API drains.
            tasks.spawn_last("admin", admin::serve(admin, registry, readiness.clone(), tasks.last_token()));
        }
        let handler_state = state.clone();
        let handler = move |request: Request<Incoming>, _| {
            let state = handler_state.clone();
            async move { handle(&state, request).await }
        };
        info!(node_id = %state.node_id, "control node started");
        if let Some(certs) = certs {
            tasks.spawn("certs", certs.watch(token.clone()));
        }
        tasks.spawn("api", listener::serve("control-api", api, tls, Limits::default(), token, handler));
        let result = tasks.run().await;
        cluster_shutdown.cancel();
        if let Some(cluster) = &state.cluster {
            cluster.stopped().await;
        }
        Ok(result?)
    }
}

/// Binds and serves a control node until `shutdown`; an error when a task failed.
pub async fn run(config: Config, shutdown: CancellationToken, registry: Registry) -> Result<(), Error> {
    Control::bind(config, &registry).await?.serve(shutdown).await
}

fn reply(status: StatusCode, body: &impl serde::Serialize) -> Response<Body> {
    // Serialising these plain structs cannot fail; an empty object would be the fallback.
    let text = serde_json::to_string(body).unwrap_or_else(|_| "{}".into());
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    response
}

fn failure(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    reply(status, &ApiError { error: message.into(), problems: Vec::new() })
}

/// Constant-time token check.
fn authorized(state: &State, request: &Request<Incoming>) -> bool {
    let Some(given) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
    else {
        return false;
    };
    constant_time_eq(given.trim().as_bytes(), state.token.as_bytes())
}

async fn handle(state: &Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_string();
    if path == "/" && request.method() == Method::GET {
        return crate::status::page();
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segments.first() != Some(&"v1") {
        return failure(StatusCode::NOT_FOUND, "not found");
    }
    if !authorized(state, &request) {
        state.unauthorized.inc();
        let mut response = failure(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        response.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
        return response;
    }
    let method = request.method().clone();
    match (&method, &segments[1..]) {
        (&Method::POST, ["purge"]) => purge(state, request).await,
        (&Method::GET, ["purge", id]) => purge_status(state, id).await,
        (&Method::GET, ["nodes"]) => nodes(state).await,
        (&Method::PUT, ["routing"]) => put_routing(state, request).await,
        (&Method::GET, ["routing"]) => get_routing(state).await,
        (&Method::GET, ["overview"]) => reply(StatusCode::OK, &crate::status::overview(state).await),
        (&Method::POST, ["certificates", "renew"]) => match &state.acme {
            Some(acme) => {
                acme.renew_now();
                reply(StatusCode::ACCEPTED, &serde_json::json!({"renewing": true}))
            }
            None => failure(StatusCode::NOT_FOUND, "no [acme] section on this control node"),
        },
        (&Method::GET, ["certificates"]) => match &state.acme {
            Some(acme) => {
                let current = acme
                    .current()
                    .map(|(label, not_after)| serde_json::json!({"label": label, "not_after": not_after}));
                reply(StatusCode::OK, &serde_json::json!({"certificate": current}))
            }
            None => failure(StatusCode::NOT_FOUND, "no [acme] section on this control node"),
        },
        (&Method::POST, ["edges", node, action @ ("drain" | "undrain")]) => {
            drain(state, node, *action == "drain").await
        }
        (_, ["purge"] | ["purge", _] | ["nodes"] | ["routing"] | ["edges", _, "drain" | "undrain"]) => {
            failure(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => failure(StatusCode::NOT_FOUND, "not found"),
    }
}

async fn purge(state: &Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let body = match Limited::new(request.into_body(), 1 << 20).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return failure(StatusCode::PAYLOAD_TOO_LARGE, "body over 1 MiB"),
    };
    let parsed: PurgeRequest = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(e) => return failure(StatusCode::BAD_REQUEST, format!("invalid purge body: {e}")),
    };
    let target = match parsed.target() {
        Ok(target) => target,
        Err(e) => return failure(StatusCode::BAD_REQUEST, e),
    };
    let record = {
        let mut log = state.log.lock().await;
        let seq = log.next_seq();
        let record = PurgeRecord {
            id: format!("{}-{seq}", state.node_id),
            seq,
            control: state.node_id.clone(),
            created_ms: now_ms(),
            soft: parsed.soft,
            target,
        };
        // Durable before acknowledged: a purge the log cannot hold is refused, and
        // (the log cut back, the number unused) it does not exist anywhere.
        if let Err(error) = log.append(record.clone()) {
            state.log_errors.inc();
            warn!(%error, seq, "purge log append failed; purge refused");
            let mut response = failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "purge not accepted: the purge log cannot be written ({error}); nothing was purged, retry later"
                ),
            );
            response.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
            return response;
        }
        record
    };
    state.completions.lock().unwrap_or_else(PoisonError::into_inner).insert(
        record.seq,
        Completion {
            acked: Instant::now(),
            acked_ms: record.created_ms,
            completed_ms: None,
            per_edge: BTreeMap::new(),
            summary: crate::status::summary(&record),
        },
    );
    if let Some(cluster) = &state.cluster {
        cluster.publish_purge(&record).await;
        // Eager push: a gossip round with every edge now, not at the next tick.
        for member in cluster.members().iter().filter(|m| m.role == Role::Edge && m.state != MemberState::Dead) {
            cluster.push_to(member.gossip_addr);
        }
    }
    info!(id = %record.id, soft = record.soft, "purge accepted");
    reply(StatusCode::ACCEPTED, &PurgeAck { id: record.id, seq: record.seq })
}

fn edges(cluster: &Cluster) -> Vec<Member> {
    cluster.members().iter().filter(|m| m.role == Role::Edge && m.state != MemberState::Dead).cloned().collect()
}

async fn purge_status(state: &Arc<State>, id: &str) -> Response<Body> {
    let Some((control, seq)) = id.rsplit_once('-').and_then(|(c, s)| Some((c.to_string(), s.parse::<u64>().ok()?)))
    else {
        return failure(StatusCode::BAD_REQUEST, "purge ids look like <control>-<seq>");
    };
    let known = if control == state.node_id {
        let log = state.log.lock().await;
        seq < log.next_seq()
    } else if let Some(cluster) = &state.cluster {
        cluster.purges().await.get(&control).is_some_and(|purges| purges.knows(seq))
    } else {
        false
    };
    if !known {
        return failure(StatusCode::NOT_FOUND, format!("no purge {id}"));
    }
    let mut edges_progress = BTreeMap::new();
    // With no edge in sight (a control node that just started, or a partition) a
    // purge is not "complete": nobody has confirmed it.
    let mut complete = state.cluster.as_ref().is_some_and(|cluster| !edges(cluster).is_empty());
    if let Some(cluster) = &state.cluster {
        let applied = cluster.applied(&control).await;
        for edge in edges(cluster) {
            let done = applied.get(&edge.node_id).is_some_and(|a| *a >= seq);
            complete &= done;
            edges_progress
                .insert(edge.node_id.clone(), if done { EdgeProgress::Applied } else { EdgeProgress::Pending });
        }
    }
    let completed_ms =
        state.completions.lock().unwrap_or_else(PoisonError::into_inner).get(&seq).and_then(|c| c.completed_ms);
    let completed_ms = if control == state.node_id { completed_ms } else { None };
    let status = if complete { PurgeState::Complete } else { PurgeState::Pending };
    reply(StatusCode::OK, &PurgeStatus { id: id.to_string(), seq, status, edges: edges_progress, completed_ms })
}

async fn nodes(state: &Arc<State>) -> Response<Body> {
    let Some(cluster) = &state.cluster else {
        return reply(StatusCode::OK, &Vec::<NodeView>::new());
    };
    let all_applied = cluster.applied_all().await;
    let routing_applied = cluster.routing_applied_all().await;
    let mut out = Vec::new();
    for member in cluster.members().iter() {
        let applied = all_applied.get(&member.node_id).cloned().unwrap_or_default();
        let addr = member.public_addr.map_or_else(|| member.gossip_addr.ip().to_string(), |a| a.to_string());
        out.push(NodeView {
            node_id: member.node_id.clone(),
            role: member.role,
            region: member.region.clone(),
            addr,
            gossip_addr: member.gossip_addr.to_string(),
            admin_addr: member.admin_addr.map(|a| a.to_string()),
            location: member.location,
            state: member.state,
            ready: member.ready,
            load: member.load,
            applied_seq: applied.get(&state.node_id).copied().unwrap_or(0),
            applied,
            routing_version: routing_applied.get(&member.node_id).copied(),
        });
    }
    reply(StatusCode::OK, &out)
}

async fn drain(state: &Arc<State>, node: &str, on: bool) -> Response<Body> {
    let Some(cluster) = &state.cluster else {
        return failure(StatusCode::CONFLICT, "this control node is not in a cluster");
    };
    let members = cluster.members();
    let Some(member) = members.iter().find(|m| m.node_id == node) else {
        return failure(StatusCode::NOT_FOUND, format!("no node {node}"));
    };
    if member.role != Role::Edge {
        return failure(StatusCode::BAD_REQUEST, format!("{node} is a {} node, not an edge", member.role.as_str()));
    }
    cluster.set_drain(node, on).await;
    for member in members.iter().filter(|m| m.state != MemberState::Dead && m.node_id != state.node_id) {
        cluster.push_to(member.gossip_addr);
    }
    info!(node, drained = on, "routing changed");
    reply(StatusCode::OK, &DrainAck { node_id: node.to_string(), drained: on })
}

/// How long a control node that sees no other member waits before it takes itself
/// for the first node of a new cluster.
const SETTLE: Duration = Duration::from_secs(5);

/// Pushes this node's gossip state to every member now, not at the next tick.
fn push_to_all(state: &State, cluster: &Cluster) {
    for member in cluster.members().iter().filter(|m| m.state != MemberState::Dead && m.node_id != state.node_id) {
        cluster.push_to(member.gossip_addr);
    }
}

/// `PUT /v1/routing`: validate, version, store durably, publish.
async fn put_routing(state: &Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let format =
        Format::from_content_type(request.headers().get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok()));
    let body = match Limited::new(request.into_body(), cdn_cluster::routing::MAX_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            return failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("routing document over {} bytes", cdn_cluster::routing::MAX_BYTES),
            );
        }
    };
    let document = match routing::parse(&body, format) {
        Ok(document) => document,
        Err(Refusal { error, problems }) => return reply(StatusCode::BAD_REQUEST, &ApiError { error, problems }),
    };
    // A node that just started may not know yet which versions the cluster used:
    // wait until it has heard from it (at most the time a lone node waits).
    let mut settled = state.settled.subscribe();
    let _ = tokio::time::timeout(SETTLE + Duration::from_secs(1), settled.wait_for(|settled| *settled)).await;

    let mut store = state.routing.lock().await;
    let newest_elsewhere = match &state.cluster {
        Some(cluster) => cluster.routing_heads().await.values().map(|head| head.version).max().unwrap_or(0),
        None => 0,
    };
    let versioned = Versioned {
        version: store.version().max(newest_elsewhere) + 1,
        by: state.node_id.clone(),
        accepted_ms: cdn_cluster::now_ms(),
        routing: document,
    };
    // Durable before published and acknowledged: a document the disk cannot hold is
    // refused, and exists nowhere.
    if let Err(error) = store.store(versioned.clone()) {
        state.routing_errors.inc();
        warn!(%error, version = versioned.version, "routing document not stored; refused");
        let mut response = failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "routing document not accepted: {} cannot be written ({error}); nothing changed, retry later",
                store.path().display()
            ),
        );
        response.headers_mut().insert(header::RETRY_AFTER, http::HeaderValue::from_static("5"));
        return response;
    }
    state.routing_version.set(i64::try_from(versioned.version).unwrap_or(i64::MAX));
    if let Some(cluster) = &state.cluster {
        // Validated above (size included): publishing cannot refuse it.
        if let Err(error) = cluster.publish_routing(&versioned).await {
            warn!(%error, version = versioned.version, "routing document stored but not published");
            return failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("routing document stored as version {} but not published: {error}", versioned.version),
            );
        }
        push_to_all(state, cluster);
    }
    drop(store);
    info!(version = versioned.version, sites = versioned.routing.sites.len(), "routing document accepted");
    reply(StatusCode::OK, &RoutingAck { version: versioned.version, by: versioned.by })
}

/// `GET /v1/routing`: the document this node holds and each edge's version.
async fn get_routing(state: &Arc<State>) -> Response<Body> {
    let Some(versioned) = state.routing.lock().await.current().cloned() else {
        return failure(StatusCode::NOT_FOUND, "no routing document yet: PUT /v1/routing (cdn routing apply) sets one");
    };
    let mut edges_applied = BTreeMap::new();
    if let Some(cluster) = &state.cluster {
        let applied = cluster.routing_applied_all().await;
        for edge in edges(cluster) {
            edges_applied.insert(edge.node_id.clone(), applied.get(&edge.node_id).copied().unwrap_or(0));
        }
    }
    let Versioned { version, by, routing, .. } = versioned;
    reply(StatusCode::OK, &RoutingView { version, by, routing, edges: edges_applied })
}

/// Follows the cluster's routing document: when a live control node holds one that
/// supersedes this node's, this node stores it (with its version and author) and
/// publishes it too.
async fn follow_routing(state: Arc<State>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut changes = cluster.subscribe(Topic::Routing).await;
    // A safety net for changes that arrived before the subscription, or a store
    // that failed and is tried again.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            change = changes.recv() => if change.is_none() { return },
            _ = tick.tick() => {}
        }
        // One look for a burst of changes (a document's chunks, then its head).
        while changes.try_recv().is_some() {}
        adopt_routing(&state, &cluster).await;
    }
}

/// One step of [`follow_routing`]: adopts the cluster's newest document if it
/// supersedes this node's.
async fn adopt_routing(state: &State, cluster: &Cluster) {
    let mine = state.routing.lock().await.current().map(|v| (v.version, v.by.clone()));
    // Cheap first: only the heads (no chunk is read).
    let newer_head = cluster.routing_heads().await.into_values().any(|head| {
        !head.is_none() && mine.as_ref().is_none_or(|(version, by)| (head.version, &head.by) > (*version, by))
    });
    if !newer_head {
        return;
    }
    // The newest complete, valid document (a newer one may still be arriving).
    let Some(newest) = cluster.routing().await else { return };
    let mut store = state.routing.lock().await;
    if store.current().is_some_and(|current| !newest.supersedes(current)) {
        return;
    }
    if let Err(error) = store.store(newest.clone()) {
        state.routing_errors.inc();
        warn!(%error, version = newest.version, by = %newest.by, "newer routing document not stored; tried again");
        return;
    }
    state.routing_version.set(i64::try_from(newest.version).unwrap_or(i64::MAX));
    if let Err(error) = cluster.publish_routing(&newest).await {
        warn!(%error, version = newest.version, "adopted routing document not published");
    }
    drop(store);
    push_to_all(state, cluster);
    info!(version = newest.version, by = %newest.by, "routing document adopted from the cluster");
}

/// Records when every edge has applied each of this node's purges.
async fn track_completions(state: Arc<State>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut changes = cluster.subscribe(Topic::Applied).await;
    let mine = Key::Applied(state.node_id.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            change = changes.recv() => match change {
                Some(change) if change.key != mine => continue,
                Some(_) => {}
                None => return,
            },
            _ = tick.tick() => {}
        }
        let pending: Vec<(u64, Instant)> = state
            .completions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, c)| c.completed_ms.is_none())
            .map(|(seq, c)| (*seq, c.acked))
            .collect();
        if pending.is_empty() {
            continue;
        }
        let applied = cluster.applied(&state.node_id).await;
        let edges = edges(&cluster);
        let mut completions = state.completions.lock().unwrap_or_else(PoisonError::into_inner);
        for (seq, acked) in pending {
            let elapsed = u64::try_from(acked.elapsed().as_millis()).unwrap_or(u64::MAX);
            let Some(completion) = completions.get_mut(&seq) else { continue };
            for (edge, done) in &applied {
                if *done >= seq {
                    completion.per_edge.entry(edge.clone()).or_insert(elapsed);
                }
            }
            if !edges.is_empty() && edges.iter().all(|e| applied.get(&e.node_id).is_some_and(|a| *a >= seq)) {
                completion.completed_ms = Some(elapsed);
            }
        }
    }
}

/// Drops purges every live edge applied more than `retention` ago, from the log
/// and from gossip, and publishes the new floor.
async fn collect_garbage(state: Arc<State>, cluster: Arc<Cluster>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let applied = cluster.applied(&state.node_id).await;
        let edges = edges(&cluster);
        let min_applied = edges.iter().map(|e| applied.get(&e.node_id).copied().unwrap_or(0)).min().unwrap_or(0);
        let cutoff = now_ms().saturating_sub(u64::try_from(state.retention.as_millis()).unwrap_or(u64::MAX));
        let mut log = state.log.lock().await;
        let collectable: Vec<u64> =
            log.records().iter().filter(|r| r.seq <= min_applied && r.created_ms <= cutoff).map(|r| r.seq).collect();
        if collectable.is_empty() {
            continue;
        }
        if let Err(error) = log.compact_with(|r| !collectable.contains(&r.seq)) {
            warn!(%error, "purge log compaction failed");
            continue;
        }
        let floor = log.records().first().map_or(log.next_seq(), |r| r.seq);
        drop(log);
        cluster.set_purge_floor(floor).await;
        for seq in &collectable {
            cluster.withdraw_purge(*seq).await;
        }
        state.completions.lock().unwrap_or_else(PoisonError::into_inner).retain(|seq, _| !collectable.contains(seq));
        info!(collected = collectable.len(), floor, "purge records collected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_leaves_the_token_and_secret_out() {
        let mut config = Config::new("c1", "/tmp/x", "the-api-token-0123456789");
        config.cluster = Some(ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "the-gossip-secret-0123456789"));
        let text = format!("{config:?}");
        assert!(!text.contains("the-api-token") && !text.contains("the-gossip-secret"), "{text}");
        assert!(text.contains("c1") && text.contains("redacted"), "{text}");
    }
}
