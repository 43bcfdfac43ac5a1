//! The DNS request handler: one query in, one response (or nothing) out.
//!
//! [`Shared::respond`] decides the whole response from the parsed request, the
//! cluster view, the GeoIP database and `now` (no I/O, so it is unit-tested with
//! byte-level requests); [`Handler`] is the hickory-server glue that sends it and
//! counts it.

use std::{
    iter,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hickory_proto::{
    ProtoError,
    op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{
            A, AAAA,
            opt::{ClientSubnet, EdnsCode, EdnsOption},
        },
    },
    serialize::binary::{BinDecoder, BinEncodable, BinEncoder, NameEncoding},
};
use hickory_server::{
    net::{runtime::Time, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::{MessageResponse, MessageResponseBuilder, Queries},
};
use tokio::sync::watch;
use tracing::{debug, warn};

use cdn_cluster::Member;
use cdn_node::ConfigError;

use crate::{
    config::{Config, MAX_ANSWERS},
    locate::{Database, Located, Locator, canonical},
    metrics::Metrics,
    mmdb::GeoDb,
    ratelimit::{RateLimiter, Verdict, client_network},
    select::{Family, Health, Policy, mix64, select},
    zone::{NameKind, Zone},
};

/// The UDP payload size we advertise and answer up to (the DNS flag day 2020 value).
pub(crate) const UDP_PAYLOAD: u16 = 1232;

/// The cluster view: every member, as the gossip layer sees it right now.
pub type MemberSource = Arc<dyn Fn() -> Arc<Vec<Member>> + Send + Sync>;

/// Where geo reads the cluster view from.
#[derive(Clone)]
pub enum MemberView {
    /// A function, called on every read (tests, embedders): a change shows in the
    /// next answer.
    Source(MemberSource),
    /// A watch channel (the cluster's view, [`cdn_cluster::Cluster::watch`]): its
    /// version tells a UDP thread whether the view changed since it last looked, so
    /// a fast-path query costs one atomic load unless it did.
    Watch(watch::Receiver<Arc<Vec<Member>>>),
}

impl std::fmt::Debug for MemberView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Source(_) => f.write_str("MemberView::Source"),
            Self::Watch(_) => f.write_str("MemberView::Watch"),
        }
    }
}

impl From<MemberSource> for MemberView {
    fn from(source: MemberSource) -> Self {
        Self::Source(source)
    }
}

impl From<watch::Receiver<Arc<Vec<Member>>>> for MemberView {
    fn from(receiver: watch::Receiver<Arc<Vec<Member>>>) -> Self {
        Self::Watch(receiver)
    }
}

impl MemberView {
    /// The view now.
    pub(crate) fn load(&self) -> Arc<Vec<Member>> {
        match self {
            Self::Source(source) => source(),
            Self::Watch(receiver) => receiver.borrow().clone(),
        }
    }

    /// The view now if it may have changed since this (clone of the) view last
    /// returned it, else `None`. A watch answers from its version; a function is
    /// called every time.
    pub(crate) fn changed(&mut self) -> Option<Arc<Vec<Member>>> {
        match self {
            Self::Source(source) => Some(source()),
            Self::Watch(receiver) => {
                // Closed (the cluster stopped): the last view stays readable.
                if matches!(receiver.has_changed(), Ok(false)) {
                    return None;
                }
                Some(receiver.borrow_and_update().clone())
            }
        }
    }
}

/// Logs at most once per period.
#[derive(Debug, Default)]
struct Throttle(Mutex<Option<Instant>>);

impl Throttle {
    fn ready(&self, now: Instant, every: Duration) -> bool {
        let mut last = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if last.is_some_and(|last| now.saturating_duration_since(last) < every) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Everything a query is answered from.
pub(crate) struct Shared {
    pub(crate) zone: Zone,
    pub(crate) locator: Locator,
    pub(crate) geodb: Arc<GeoDb>,
    pub(crate) members: MemberView,
    pub(crate) policy: Policy,
    pub(crate) ttl: u32,
    pub(crate) limiter: Option<Mutex<RateLimiter>>,
    pub(crate) metrics: Metrics,
    counter: AtomicU64,
    degraded_log: Throttle,
    /// ACME DNS-01 challenges the control plane publishes: name (lowercase, no
    /// trailing dot) → TXT values.
    pub(crate) challenges: arc_swap::ArcSwap<std::collections::HashMap<String, Vec<String>>>,
}

/// A decided response.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) metadata: Metadata,
    /// The question section, as [`echoed_question`] re-encodes it.
    pub(crate) question: Queries,
    pub(crate) answers: Vec<Record>,
    pub(crate) authorities: Vec<Record>,
    pub(crate) additionals: Vec<Record>,
    pub(crate) edns: Option<Edns>,
    /// The region of the first edge answered, for the metrics.
    pub(crate) region: Option<String>,
}

impl Reply {
    fn new(request: &Request) -> Self {
        let edns = request.edns.as_ref().map(|_| {
            let mut edns = Edns::new();
            edns.set_max_payload(UDP_PAYLOAD).set_version(0);
            edns
        });
        Self {
            metadata: Metadata::response_from_request(&request.metadata),
            question: echoed_question(&request.queries),
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
            edns,
            region: None,
        }
    }

    fn error(mut self, code: ResponseCode) -> Self {
        self.fail(code);
        self
    }

    /// Turns the reply into an error with no records.
    fn fail(&mut self, code: ResponseCode) {
        self.metadata.response_code = code;
        self.metadata.authoritative = false;
        self.answers.clear();
        self.authorities.clear();
        self.additionals.clear();
        self.region = None;
    }

    /// Echoes the client subnet with `scope`.
    fn set_ecs(&mut self, subnet: ClientSubnet, scope: u8) {
        if let Some(edns) = &mut self.edns {
            edns.options_mut().remove(EdnsCode::Subnet);
            edns.options_mut().insert(EdnsOption::Subnet(ClientSubnet::new(
                subnet.addr(),
                subnet.source_prefix(),
                scope,
            )));
        }
    }

    /// The response to send, as hickory-server builds it.
    fn response(
        &self,
    ) -> MessageResponse<
        '_,
        '_,
        impl Iterator<Item = &Record> + Send,
        impl Iterator<Item = &Record> + Send,
        impl Iterator<Item = &Record> + Send,
        impl Iterator<Item = &Record> + Send,
    > {
        MessageResponseBuilder::new(&self.question, self.edns.as_ref()).build(
            self.metadata,
            self.answers.iter(),
            self.authorities.iter(),
            iter::empty(),
            self.additionals.iter(),
        )
    }

    /// Encodes the reply as it would go on the wire.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        let mut buffer = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buffer);
        self.response().destructive_emit(&mut encoder)?;
        Ok(buffer)
    }
}

/// The question section of the response: the request's question re-encoded, its
/// name uncompressed and in its original case (resolvers check the 0x20 bits).
///
/// hickory-server would echo the question's bytes as they came, but a name may be
/// compressed to a pointer into the header, which differs in the response (the QR
/// bit, the counts): the echoed name would then read differently, or not at all.
/// A query with other than one question is malformed (FORMERR) and gets none back:
/// re-encoded, names that it compressed could make the question section far larger
/// than the query, past what UDP or even TCP can carry.
fn echoed_question(queries: &Queries) -> Queries {
    let [query] = queries.queries() else { return no_question() };
    let mut bytes = Vec::with_capacity(queries.as_bytes().len());
    let mut encoder = BinEncoder::new(&mut bytes);
    encoder.set_name_encoding(NameEncoding::Uncompressed);
    let read = query
        .original()
        .emit(&mut encoder)
        .map_err(|error| error.to_string())
        .and_then(|()| Queries::read(&mut BinDecoder::new(&bytes), 1).map_err(|error| error.to_string()));
    read.unwrap_or_else(|error| {
        // Cannot happen (the name was read from the request): answer without it.
        warn!(%error, "cannot re-encode the question");
        no_question()
    })
}

/// An empty question section.
pub(crate) fn no_question() -> Queries {
    Queries::read(&mut BinDecoder::new(&[]), 0).unwrap_or_else(|_| unreachable!("nothing to read"))
}

/// What to do with a query.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Send this.
    Send(Reply),
    /// Send nothing (rate limited).
    Drop,
}

/// The ECS option when it is well-formed (RFC 7871 §7.1.2: address bits beyond the
/// source prefix must be zero).
fn checked_subnet(subnet: &ClientSubnet) -> Option<ClientSubnet> {
    let source = subnet.source_prefix();
    let well_formed = match subnet.addr() {
        IpAddr::V4(v4) => source <= 32 && u32::from(v4).checked_shl(u32::from(source)).unwrap_or(0) == 0,
        IpAddr::V6(v6) => source <= 128 && u128::from(v6).checked_shl(u32::from(source)).unwrap_or(0) == 0,
    };
    well_formed.then_some(*subnet)
}

/// A 64-bit hash of the client's network, for spreading.
fn client_hash(addr: IpAddr) -> u64 {
    let bits = match canonical(addr) {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    mix64((bits as u64) ^ ((bits >> 64) as u64).rotate_left(17))
}

/// The seed of the spread among near edges for a client at `addr` (the ECS
/// address when `ecs`, else the query's source) and the query counter's `counter`.
pub(crate) fn seed(addr: IpAddr, ecs: bool, counter: u64) -> u64 {
    let client = if ecs { client_hash(addr) } else { client_hash(client_network(addr).network()) };
    mix64(client ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

impl Shared {
    /// Builds everything from a config (which must have passed `validate`).
    pub(crate) fn new(
        config: &Config,
        geodb: Arc<GeoDb>,
        members: impl Into<MemberView>,
        metrics: Metrics,
    ) -> Result<Self, ConfigError> {
        let zone = Zone::from_config(config).map_err(|problems| ConfigError { problems })?;
        let networks = config.parsed_networks().map_err(|problems| ConfigError { problems })?;
        let rate_limit = config.rate_limit;
        Ok(Self {
            zone,
            locator: Locator::new(networks, config.default_region.clone()),
            geodb,
            members: members.into(),
            policy: Policy {
                answers: config.answers.clamp(1, MAX_ANSWERS),
                near_radius_km: config.near_radius_km,
                max_load: config.max_load,
            },
            ttl: u32::try_from(config.ttl.as_secs()).unwrap_or(u32::MAX),
            limiter: (rate_limit > 0).then(|| Mutex::new(RateLimiter::new(rate_limit, 2, 100_000))),
            metrics,
            counter: AtomicU64::new(0),
            degraded_log: Throttle::default(),
            challenges: arc_swap::ArcSwap::default(),
        })
    }

    /// Decides the response to `request` at `now`.
    pub(crate) fn respond(&self, request: &Request, now: Instant) -> Outcome {
        let verdict = if request.protocol() == Protocol::Udp {
            self.rate_limit(request.src().ip(), now)
        } else {
            Verdict::Answer
        };
        self.respond_decided(request, verdict, self.next_counter(), now)
    }

    /// The next value of the query counter that seeds the spread among near edges.
    pub(crate) fn next_counter(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The rate limit's verdict on a UDP response to `addr` (counted when it is
    /// not [`Verdict::Answer`]).
    pub(crate) fn rate_limit(&self, addr: IpAddr, now: Instant) -> Verdict {
        let Some(limiter) = &self.limiter else { return Verdict::Answer };
        let verdict = limiter.lock().unwrap_or_else(PoisonError::into_inner).check(addr, now);
        if verdict != Verdict::Answer {
            self.metrics.rate_limited.inc();
        }
        verdict
    }

    /// Decides the response to `request` once the rate limit has ruled (`verdict`;
    /// [`Verdict::Answer`] over TCP), with `counter` seeding the spread.
    pub(crate) fn respond_decided(&self, request: &Request, verdict: Verdict, counter: u64, now: Instant) -> Outcome {
        let slip = match verdict {
            Verdict::Answer => false,
            Verdict::Slip => true,
            Verdict::Drop => return Outcome::Drop,
        };
        let mut reply = self.answer(request, slip, counter, now);
        if request.protocol() == Protocol::Udp {
            self.fit(request, &mut reply);
        }
        self.metrics.query(reply.metadata.response_code).inc();
        if let Some(region) = &reply.region {
            self.metrics.answers.with_label_values(&[region.as_str()]).inc();
        }
        Outcome::Send(reply)
    }

    fn answer(&self, request: &Request, slip: bool, counter: u64, now: Instant) -> Reply {
        let mut reply = Reply::new(request);
        if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            return reply.error(ResponseCode::BADVERS);
        }
        if request.metadata.op_code != OpCode::Query {
            return reply.error(ResponseCode::NotImp);
        }
        let [query] = request.queries.queries() else {
            return reply.error(ResponseCode::FormErr);
        };
        let ecs = match request.edns.as_ref().and_then(|edns| edns.option(EdnsCode::Subnet)) {
            Some(EdnsOption::Subnet(subnet)) => match checked_subnet(subnet) {
                Some(subnet) => Some(subnet),
                None => return reply.error(ResponseCode::FormErr),
            },
            _ => None,
        };
        if let Some(subnet) = ecs {
            // Not tailored unless an edge answer says otherwise.
            reply.set_ecs(subnet, 0);
        }
        if slip {
            reply.metadata.truncation = true;
            return reply;
        }
        if query.query_class() != DNSClass::IN {
            return reply.error(ResponseCode::Refused);
        }
        let qtype = query.query_type();
        let kind = self.zone.classify(query.name());
        if matches!(qtype, RecordType::AXFR | RecordType::IXFR) {
            // No zone transfers: the answers are computed, not stored.
            return reply.error(if kind == NameKind::Outside { ResponseCode::Refused } else { ResponseCode::NotImp });
        }
        if kind != NameKind::Outside
            && matches!(qtype, RecordType::TXT | RecordType::ANY)
            && let Some(records) = self.challenge(query.original().name())
        {
            // An ACME DNS-01 challenge: answered while the control plane publishes
            // it, never cached long (TTL 0).
            reply.metadata.authoritative = true;
            reply.answers.extend(records);
            return reply;
        }
        let (apex, service, nameserver) = match kind {
            NameKind::Outside => return reply.error(ResponseCode::Refused),
            NameKind::Missing => {
                reply.metadata.authoritative = true;
                reply.metadata.response_code = ResponseCode::NXDomain;
                reply.authorities.push(self.zone.negative_soa().clone());
                return reply;
            }
            NameKind::Known { apex, service, nameserver } => (apex, service, nameserver),
        };
        reply.metadata.authoritative = true;
        let owner = query.original().name().clone();
        if apex {
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                reply.answers.push(self.zone.soa().clone());
            }
            if matches!(qtype, RecordType::NS | RecordType::ANY) {
                reply.answers.extend(self.zone.ns().iter().cloned());
                reply.additionals.extend(self.zone.glue());
            }
        }
        if service && reply.answers.is_empty() {
            match qtype {
                RecordType::A | RecordType::ANY => {
                    self.edges(request, Family::V4, ecs, &mut reply, counter, now);
                }
                RecordType::AAAA => self.edges(request, Family::V6, ecs, &mut reply, counter, now),
                _ => {}
            }
        }
        if nameserver && reply.answers.is_empty() {
            match qtype {
                RecordType::A | RecordType::ANY => reply.answers.extend(self.zone.nameserver_addrs(&owner, false)),
                RecordType::AAAA => reply.answers.extend(self.zone.nameserver_addrs(&owner, true)),
                _ => {}
            }
        }
        if reply.answers.is_empty() {
            // NODATA.
            reply.additionals.clear();
            reply.authorities.push(self.zone.negative_soa().clone());
        }
        reply
    }

    /// Where the client at `addr` is.
    pub(crate) fn locate(&self, addr: IpAddr) -> Located<'_> {
        let db = self.geodb.current();
        self.locator.locate(addr, db.as_deref().map(|db| db as &dyn Database))
    }

    /// The TXT records of an ACME challenge name, when one is published.
    fn challenge(&self, name: &Name) -> Option<Vec<Record>> {
        let challenges = self.challenges.load();
        if challenges.is_empty() {
            return None;
        }
        let text = name.to_ascii();
        let key = text.trim_end_matches('.').to_ascii_lowercase();
        let values = challenges.get(&key)?;
        Some(
            values
                .iter()
                .map(|value| {
                    Record::from_rdata(
                        name.clone(),
                        0,
                        RData::TXT(hickory_proto::rr::rdata::TXT::new(vec![value.clone()])),
                    )
                })
                .collect(),
        )
    }

    /// Adds the nearest edges for the client to `reply`.
    fn edges(
        &self,
        request: &Request,
        family: Family,
        ecs: Option<ClientSubnet>,
        reply: &mut Reply,
        counter: u64,
        now: Instant,
    ) {
        // The records' owner: the question's name as asked (`answer` checked there is one).
        let [query] = request.queries.queries() else { return };
        let owner = query.original().name();
        let (addr, subnet) = match ecs {
            Some(subnet) if subnet.source_prefix() > 0 => (subnet.addr(), Some(subnet)),
            _ => (request.src().ip(), None),
        };
        let located = self.locate(addr);
        if let Some(subnet) = subnet {
            reply.set_ecs(subnet, located.scope);
        }
        let members = self.members.load();
        let seed = seed(addr, subnet.is_some(), counter);
        let selection = select(&members, &located.location, family, &self.policy, seed);
        if selection.health != Health::Healthy && !selection.edges.is_empty() {
            self.metrics.degraded.inc();
            if self.degraded_log.ready(now, Duration::from_secs(5)) {
                warn!(
                    health = ?selection.health,
                    ?family,
                    edges = selection.edges.len(),
                    "no healthy edge: answering with the least-bad edges"
                );
            }
        } else if selection.edges.is_empty() && self.degraded_log.ready(now, Duration::from_secs(5)) {
            warn!(?family, members = members.len(), "no edge with an address of this family: answering NODATA");
        }
        for edge in &selection.edges {
            let data = match edge.public_addr {
                Some(IpAddr::V4(v4)) => RData::A(A(v4)),
                Some(IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                None => continue,
            };
            reply.answers.push(Record::from_rdata(owner.clone(), self.ttl, data));
        }
        reply.region = selection.edges.first().map(|edge| edge.region.clone());
        debug!(
            client = %addr,
            source = ?located.source,
            scope = located.scope,
            first = selection.edges.first().map(|e| e.node_id.as_str()),
            "edge answer"
        );
    }

    /// Truncates a UDP reply that is larger than the client takes or than
    /// anti-amplification allows: max(512, 3 × the query's size), within the
    /// client's EDNS payload size (capped at ours).
    fn fit(&self, request: &Request, reply: &mut Reply) {
        let payload = match &request.edns {
            Some(edns) => usize::from(edns.max_payload().clamp(512, UDP_PAYLOAD)),
            None => 512,
        };
        let limit = payload.min((3 * request.as_slice().len()).max(512));
        match reply.encode() {
            Ok(bytes) if bytes.len() <= limit => {}
            Ok(_) => {
                reply.answers.clear();
                reply.authorities.clear();
                reply.additionals.clear();
                reply.metadata.truncation = true;
                reply.region = None;
                self.metrics.truncated.inc();
            }
            Err(error) => {
                warn!(%error, "cannot encode a response");
                reply.fail(ResponseCode::ServFail);
            }
        }
    }
}

/// The hickory-server request handler.
pub(crate) struct Handler(pub(crate) Arc<Shared>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, response_handle: R) -> ResponseInfo {
        let start = Instant::now();
        self.handle_decided(request, response_handle, None, start).await
    }
}

impl Handler {
    /// Answers `request` through `response_handle`, as [`RequestHandler::handle_request`]
    /// does, except that a UDP query's rate-limit verdict and query counter may
    /// have been decided already (by the UDP fast path, which then fell back here);
    /// `start` is when the query arrived.
    pub(crate) async fn handle_decided<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
        decided: Option<(Verdict, u64)>,
        start: Instant,
    ) -> ResponseInfo {
        let shared = &self.0;
        let outcome = match decided {
            Some((verdict, counter)) => shared.respond_decided(request, verdict, counter, start),
            None => shared.respond(request, start),
        };
        let reply = match outcome {
            Outcome::Send(reply) => reply,
            Outcome::Drop => {
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::Refused;
                return ResponseInfo::from(Header { metadata, counts: HeaderCounts::default() });
            }
        };
        let info = match response_handle.send_response(reply.response()).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, peer = %request.src(), "cannot send a dns response");
                ResponseInfo::from(Header { metadata: reply.metadata, counts: HeaderCounts::default() })
            }
        };
        shared.metrics.duration.observe(start.elapsed().as_secs_f64());
        info
    }
}

#[cfg(test)]
mod tests;
