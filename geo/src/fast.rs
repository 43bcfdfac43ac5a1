//! The UDP fast path: the common query (a service name, A or AAAA, class IN, one
//! question, at most an OPT record with ECS) answered without hickory's generic
//! request path, and without allocating once warm.
//!
//! A [`Worker`] (one per UDP socket, owned by its thread) keeps, per client
//! location and address family, the [`Plan`] of the edge selection and each
//! candidate edge's answer record pre-encoded (by hickory) — rebuilt when the
//! member view changes. Per query it only checks the header and question in place,
//! locates the client, draws the near-tie spread from the plan with the same seed
//! the slow path would use, and writes the response: the query's ID and flags,
//! its question copied verbatim (letter case as sent), the records, and the OPT
//! record with the ECS option echoed with its scope. The bytes are the ones the
//! slow path sends for the same query (unit tests and the fuzz harness compare
//! them).
//!
//! Anything else — other names, types and opcodes, compressed or unusual
//! questions, EDNS versions and options beyond ECS, cookies and padding, rate
//! limited responses, answers with no healthy edge or no edge at all, answers too
//! large for the client — goes to the slow path: hickory-proto's parser, the
//! [`Handler`], and hickory-server's response encoder, exactly as before.

use std::{
    collections::HashMap,
    hash::BuildHasherDefault,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use futures_util::{FutureExt, StreamExt};
use hickory_proto::{
    op::{Header, MessageType, ResponseCode},
    rr::{Name, RData, Record, rdata},
    serialize::binary::{BinDecodable, BinDecoder, BinEncodable, BinEncoder},
};
use hickory_server::{
    net::{BufDnsStreamHandle, xfer::Protocol},
    server::{Request, ResponseHandle, ResponseHandler},
    zone_handler::MessageResponseBuilder,
};
use prometheus::IntCounter;
use rustc_hash::FxHasher;
use tracing::debug;

use cdn_cluster::Member;

use crate::{
    handler::{Handler, MemberView, Shared, UDP_PAYLOAD, no_question, seed},
    locate::LocationKey,
    ratelimit::Verdict,
    select::{Family, Health, Plan},
};

/// The largest datagram read (as hickory-server's UDP listener: longer ones are cut).
pub(crate) const MAX_DATAGRAM: usize = 4096;
/// Plans kept per worker; past this the cache starts over (a flood of distinct
/// GeoIP locations cannot grow it without bound).
const MAX_PLANS: usize = 16_384;
/// EDNS option codes a query may carry on the fast path besides ECS: hickory
/// keeps them as opaque bytes and geo ignores them (COOKIE, PADDING).
const IGNORED_OPTIONS: [u16; 2] = [10, 12];
const OPT_ECS: u16 = 8;
const TYPE_OPT: u16 = 41;

/// The EDNS Client Subnet option of a query, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ecs<'p> {
    /// The address, zero past the source prefix.
    pub(crate) addr: IpAddr,
    /// FAMILY, SOURCE PREFIX-LENGTH, the scope byte and ADDRESS as sent.
    family: u16,
    pub(crate) source: u8,
    address: &'p [u8],
}

/// A query the fast path can answer, read in place.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Query<'p> {
    /// The header's first four bytes (ID and flags).
    head: [u8; 4],
    /// The question section as sent: name, type, class.
    pub(crate) question: &'p [u8],
    /// The question's name (wire format, as sent).
    name: &'p [u8],
    pub(crate) family: Family,
    /// The client's EDNS payload size, when the query has an OPT record.
    pub(crate) payload: Option<u16>,
    pub(crate) ecs: Option<Ecs<'p>>,
}

fn u16_at(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]))
}

/// Reads `packet` as a query the fast path answers, or `None` for the slow path.
///
/// Accepted: a query (QR 0, opcode QUERY) with exactly one question, no answer or
/// authority records and at most one additional record, an OPT (root owner,
/// version 0, extended RCODE 0) whose options are one well-formed ECS at most and
/// otherwise only COOKIE or PADDING; the question's name uncompressed and one of
/// `services` (ASCII case ignored), type A or AAAA, class IN; nothing after the
/// last record. Anything else, well-formed or not, is left to hickory's parser.
pub(crate) fn parse<'p>(packet: &'p [u8], services: &[Vec<u8>]) -> Option<Query<'p>> {
    let head: [u8; 4] = packet.get(..4)?.try_into().ok()?;
    // QR = 0 and opcode 0 (QUERY); the other flags do not change the answer.
    if head[2] & 0xF8 != 0 {
        return None;
    }
    let counts = (u16_at(packet, 4)?, u16_at(packet, 6)?, u16_at(packet, 8)?, u16_at(packet, 10)?);
    let (1, 0, 0, additional @ (0 | 1)) = counts else { return None };
    // The name: uncompressed labels up to the root.
    let mut at = 12;
    loop {
        let len = usize::from(*packet.get(at)?);
        if len & 0xC0 != 0 {
            return None;
        }
        at += 1 + len;
        if len == 0 {
            break;
        }
    }
    let name = packet.get(12..at)?;
    if !services.iter().any(|service| service.eq_ignore_ascii_case(name)) {
        return None;
    }
    let family = match (u16_at(packet, at)?, u16_at(packet, at + 2)?) {
        (1, 1) => Family::V4,
        (28, 1) => Family::V6,
        _ => return None,
    };
    at += 4;
    let question = &packet[12..at];
    let mut query = Query { head, question, name, family, payload: None, ecs: None };
    if additional == 0 {
        return (at == packet.len()).then_some(query);
    }
    // The OPT record: root owner, TYPE 41, CLASS = payload, TTL = extended RCODE,
    // version, flags (DO is ignored: geo does not sign), then the options.
    let opt = packet.get(at..at + 11)?;
    if opt[0] != 0 || u16_at(opt, 1)? != TYPE_OPT || opt[5] != 0 || opt[6] != 0 {
        return None;
    }
    query.payload = Some(u16_at(opt, 3)?);
    let options = packet.get(at + 11..)?;
    if usize::from(u16_at(opt, 9)?) != options.len() {
        return None;
    }
    let mut rest = options;
    while !rest.is_empty() {
        let code = u16_at(rest, 0)?;
        let len = usize::from(u16_at(rest, 2)?);
        let data = rest.get(4..4 + len)?;
        rest = &rest[4 + len..];
        match code {
            OPT_ECS if query.ecs.is_none() => query.ecs = Some(parse_ecs(data)?),
            code if IGNORED_OPTIONS.contains(&code) => {}
            _ => return None,
        }
    }
    Some(query)
}

/// A well-formed ECS option (RFC 7871: the address as long as the source prefix
/// needs, no bits set past it), else `None`. Octets past those the prefix needs
/// are ignored, as hickory's parser does (dnsperf sends a whole IPv4 address with
/// a /24).
fn parse_ecs(data: &[u8]) -> Option<Ecs<'_>> {
    let family = u16_at(data, 0)?;
    let source = *data.get(2)?;
    let needed = usize::from(source).div_ceil(8);
    let address = data.get(4..4 + needed)?;
    let addr = match family {
        1 if source <= 32 => {
            let mut octets = [0; 4];
            octets[..needed].copy_from_slice(address);
            let bits = u32::from_be_bytes(octets);
            if bits.checked_shl(u32::from(source)).unwrap_or(0) != 0 {
                return None;
            }
            IpAddr::V4(Ipv4Addr::from(octets))
        }
        2 if source <= 128 => {
            let mut octets = [0; 16];
            octets[..needed].copy_from_slice(address);
            let bits = u128::from_be_bytes(octets);
            if bits.checked_shl(u32::from(source)).unwrap_or(0) != 0 {
                return None;
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(Ecs { addr, family, source, address })
}

/// One candidate edge of a cached plan.
#[derive(Debug, Clone)]
struct Edge {
    /// Its answer record after the owner name: TYPE, CLASS, TTL, RDLENGTH, RDATA.
    record: Vec<u8>,
    /// `cdn_dns_answers_total{region=<its region>}`.
    answers: IntCounter,
}

/// A plan with what answering from it needs.
#[derive(Debug, Clone)]
struct Cached {
    plan: Plan,
    /// Aligned with `plan.order`.
    edges: Vec<Edge>,
}

impl Cached {
    fn new(shared: &Shared, members: &[Member], plan: Plan) -> Option<Self> {
        let mut edges = Vec::with_capacity(plan.order.len());
        for &i in &plan.order {
            let member = &members[i];
            let data = match member.public_addr? {
                IpAddr::V4(v4) => RData::A(rdata::A(v4)),
                IpAddr::V6(v6) => RData::AAAA(rdata::AAAA(v6)),
            };
            // Encoded by hickory with the root as owner; the owner is written per query.
            let mut record = Vec::with_capacity(32);
            Record::from_rdata(Name::root(), shared.ttl, data).emit(&mut BinEncoder::new(&mut record)).ok()?;
            record.remove(0);
            edges.push(Edge { record, answers: shared.metrics.answers.with_label_values(&[member.region.as_str()]) });
        }
        Some(Self { plan, edges })
    }
}

type Plans = HashMap<(LocationKey, Family), Cached, BuildHasherDefault<FxHasher>>;

/// Answers UDP queries for one socket: the fast path, else the slow path.
pub(crate) struct Worker {
    shared: Arc<Shared>,
    handler: Handler,
    services: Vec<Vec<u8>>,
    /// This worker's reader of the member view (a watch keeps its own version).
    view: MemberView,
    /// The member view the plans were made from.
    members: Arc<Vec<Member>>,
    plans: Plans,
    /// Seeds the spread, as the slow path's query counter does.
    counter: u64,
    /// Fast-path answers whose duration is not observed yet ([`Worker::observe`]).
    untimed: u32,
    /// The response being written (reused).
    out: Vec<u8>,
    drawn: Vec<usize>,
    scratch: Vec<(f64, usize)>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("plans", &self.plans.len()).finish_non_exhaustive()
    }
}

/// Whether the fast path answered, or why not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fast {
    /// The response is in `out`.
    Answered,
    /// The slow path must answer.
    Fallback,
}

impl Worker {
    /// A worker over `shared`; `index` (the socket's) spreads the workers' counters.
    pub(crate) fn new(shared: Arc<Shared>, index: usize) -> Self {
        let services = shared.zone.service_wire_names();
        let mut view = shared.members.clone();
        let members = view.changed().unwrap_or_else(|| view.load());
        Self {
            handler: Handler(shared.clone()),
            shared,
            services,
            view,
            members,
            plans: Plans::default(),
            counter: (index as u64) << 48,
            untimed: 0,
            out: Vec::with_capacity(MAX_DATAGRAM),
            drawn: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The response to the UDP datagram `packet` from `src`, received at `start`,
    /// or `None` to send nothing (unreadable header, a response, rate limited).
    ///
    /// The slow path observes its answer's duration itself; a fast-path answer's is
    /// observed by the next [`Worker::observe`] (once per batch of datagrams).
    pub(crate) fn handle(&mut self, packet: &[u8], src: SocketAddr, start: Instant) -> Option<&[u8]> {
        let Some(query) = parse(packet, &self.services) else {
            return self.slow(packet, src, None, start);
        };
        let verdict = self.shared.rate_limit(src.ip(), start);
        let counter = self.counter;
        self.counter = self.counter.wrapping_add(1);
        match verdict {
            // As the slow path: nothing sent, nothing more counted.
            Verdict::Drop => None,
            Verdict::Slip => self.slow(packet, src, Some((verdict, counter)), start),
            Verdict::Answer => match self.fast(&query, packet.len(), src, counter) {
                Fast::Answered => Some(&self.out),
                Fast::Fallback => self.slow(packet, src, Some((verdict, counter)), start),
            },
        }
    }

    /// Observes the duration of the fast-path answers given since the last call,
    /// from `start` (when their batch arrived) to now: one clock read at most.
    pub(crate) fn observe(&mut self, start: Instant) {
        if self.untimed == 0 {
            return;
        }
        let seconds = start.elapsed().as_secs_f64();
        for _ in 0..self.untimed {
            self.shared.metrics.duration.observe(seconds);
        }
        self.untimed = 0;
    }

    /// Keeps the plans while the member view is the same: a watched view is only
    /// read again when its version changed.
    fn refresh_members(&mut self) {
        let Some(members) = self.view.changed() else { return };
        if !Arc::ptr_eq(&members, &self.members) {
            if *members != *self.members {
                self.plans.clear();
            }
            self.members = members;
        }
    }

    /// Answers `query` (of `len` bytes) from the plans into `out`, with `counter`
    /// seeding the spread; counts it (its duration: [`Worker::observe`]).
    pub(crate) fn fast(&mut self, query: &Query<'_>, len: usize, src: SocketAddr, counter: u64) -> Fast {
        let (addr, ecs) = match query.ecs {
            Some(ecs) if ecs.source > 0 => (ecs.addr, true),
            _ => (src.ip(), false),
        };
        self.refresh_members();
        let located = self.shared.locate(addr);
        let key = (located.key, query.family);
        if !self.plans.contains_key(&key) {
            let plan = Plan::new(&self.members, &located.location, query.family, &self.shared.policy);
            let Some(cached) = Cached::new(&self.shared, &self.members, plan) else { return Fast::Fallback };
            if self.plans.len() >= MAX_PLANS {
                self.plans.clear();
            }
            self.plans.insert(key, cached);
        }
        let Some(cached) = self.plans.get(&key) else { return Fast::Fallback };
        if cached.plan.health != Health::Healthy {
            // Degraded answers are counted and logged by the slow path.
            return Fast::Fallback;
        }
        cached.plan.draw(seed(addr, ecs, counter), &mut self.drawn, &mut self.scratch);
        let Some(&first) = self.drawn.first() else { return Fast::Fallback };
        let Ok(answers) = u16::try_from(self.drawn.len()) else { return Fast::Fallback };

        let out = &mut self.out;
        out.clear();
        let [id0, id1, flags0, flags1] = query.head;
        // QR, opcode QUERY, AA, RD as asked; CD as asked, RCODE NOERROR.
        out.extend_from_slice(&[id0, id1, 0x84 | (flags0 & 0x01), flags1 & 0x10]);
        out.extend_from_slice(&[0, 1]);
        out.extend_from_slice(&answers.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, u8::from(query.payload.is_some())]);
        out.extend_from_slice(query.question);
        // The first record's owner is the name as asked; the others point to it
        // (hickory compresses the same way).
        let owner = 12 + query.question.len();
        let pointer = (0xC000 | owner as u16).to_be_bytes();
        for (i, &at) in self.drawn.iter().enumerate() {
            if i == 0 {
                out.extend_from_slice(query.name);
            } else {
                out.extend_from_slice(&pointer);
            }
            out.extend_from_slice(&cached.edges[at].record);
        }
        let mut limit = 512;
        if let Some(payload) = query.payload {
            limit = usize::from(payload.clamp(512, UDP_PAYLOAD));
            // OPT: root owner, our payload size, RCODE/version/flags 0, the ECS echoed.
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&UDP_PAYLOAD.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0]);
            match query.ecs {
                Some(subnet) => {
                    let scope = if ecs { located.scope } else { 0 };
                    let option = 4 + subnet.address.len() as u16;
                    out.extend_from_slice(&(4 + option).to_be_bytes());
                    out.extend_from_slice(&OPT_ECS.to_be_bytes());
                    out.extend_from_slice(&option.to_be_bytes());
                    out.extend_from_slice(&subnet.family.to_be_bytes());
                    out.extend_from_slice(&[subnet.source, scope]);
                    out.extend_from_slice(subnet.address);
                }
                None => out.extend_from_slice(&[0, 0]),
            }
        }
        // Anti-amplification, as the slow path: larger answers go out truncated.
        if out.len() > limit.min((3 * len).max(512)) {
            return Fast::Fallback;
        }
        self.shared.metrics.query(ResponseCode::NoError).inc();
        cached.edges[first].answers.inc();
        self.untimed = self.untimed.saturating_add(1);
        debug!(client = %addr, scope = located.scope, first = %self.members[cached.plan.order[first]].node_id, "edge answer (fast path)");
        Fast::Answered
    }

    /// The slow path, as hickory-server's UDP listener runs it: no response to a
    /// datagram without a header, FORMERR to one hickory cannot parse, nothing to
    /// a response, else the [`Handler`] (with the rate limit's `decided` verdict
    /// and counter when the fast path already asked) and hickory's encoder.
    pub(crate) fn slow(
        &mut self,
        packet: &[u8],
        src: SocketAddr,
        decided: Option<(Verdict, u64)>,
        start: Instant,
    ) -> Option<&[u8]> {
        let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
        let (stream, mut sent) = BufDnsStreamHandle::new(src);
        let mut response = ResponseHandle::new(src, stream, Protocol::Udp);
        match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
            Err(error) => {
                debug!(%error, peer = %src, "unreadable dns query: FORMERR");
                let queries = no_question();
                let formerr =
                    MessageResponseBuilder::new(&queries, None).error_msg(&header.metadata, ResponseCode::FormErr);
                if let Some(Err(error)) = response.send_response(formerr).now_or_never() {
                    debug!(%error, peer = %src, "cannot encode FORMERR");
                }
            }
            Ok(request) if request.metadata.message_type == MessageType::Response => return None,
            Ok(request) => {
                // The handler does no I/O: it is ready at once.
                let _ = self.handler.handle_decided(&request, response, decided, start).now_or_never();
            }
        }
        let message = sent.next().now_or_never().flatten()?;
        self.out = message.into_parts().0;
        Some(&self.out)
    }

    /// Test hook: the fast path's answer to `packet` with `counter`, if it has one.
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn fast_only(&mut self, packet: &[u8], src: SocketAddr, counter: u64) -> Option<Vec<u8>> {
        let query = parse(packet, &self.services)?;
        match self.fast(&query, packet.len(), src, counter) {
            Fast::Answered => Some(self.out.clone()),
            Fast::Fallback => None,
        }
    }

    /// Test hook: the slow path's answer to `packet` with `counter` (no rate limit).
    #[cfg(any(test, feature = "test-util"))]
    pub(crate) fn slow_only(&mut self, packet: &[u8], src: SocketAddr, counter: u64) -> Option<Vec<u8>> {
        self.slow(packet, src, Some((Verdict::Answer, counter)), Instant::now()).map(<[u8]>::to_vec)
    }

    /// How many plans are cached (tests).
    #[cfg(test)]
    pub(crate) fn plans(&self) -> usize {
        self.plans.len()
    }
}

#[cfg(test)]
mod tests;
