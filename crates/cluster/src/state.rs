//! The gossip state, typed: every key a node writes, what its value means, and the
//! one place both are spelled on the wire.
//!
//! chitchat carries string keys and string values; this module turns them into a
//! [`Key`] and an [`Entry`] and back, and nothing else in the workspace spells them
//! ([`Cluster`](crate::Cluster) reads and writes them through typed accessors). The
//! wire format is a contract between versions — a cluster is upgraded one node at a
//! time — so it does not change: what this version cannot read (an unknown key, a
//! malformed value; a newer peer, a broken one) is an [`Error`] the reader logs and
//! skips, never a panic.
//!
//! Each node writes only its own keys:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `role` | `origin`, `edge`, `control` or `geo` | every node, when it joins |
//! | `region` | text | nodes with a region (edges) |
//! | `lat`, `lon` | degrees, as Rust prints an `f64` | nodes with a location (edges) |
//! | `public_addr` | IP address | nodes DNS hands out (edges) |
//! | `admin` | `ip:port` | nodes with an admin listener |
//! | `ready` | `1` or `0` (`0` when it joins) | every node |
//! | `load` | `0.000` ..= `1.000` | every node |
//! | `stats` | JSON [`Stats`] | edges |
//! | `purge:<seq>` | JSON [`PurgeRecord`] whose `seq` is `<seq>` | control nodes |
//! | `purge_floor` | the oldest `<seq>` still held (or the next one) | control nodes |
//! | `applied:<control>` | the last `<seq>` of `<control>` applied | edges |
//! | `drain:<node>` | `1:<ms>` drained or `0:<ms>` undrained, at `<ms>` since the Unix epoch | control nodes |
//! | `routing:head` | JSON [`RoutingHead`]: version, author, chunk count, length, checksum | control nodes |
//! | `routing:<xxh3>:<i>` | chunk `<i>` of the routing document's JSON whose XXH3-64 is `<xxh3>` (16 hex digits) | control nodes |
//! | `routing_applied` | the routing version this node serves by | edges |
//!
//! A routing document is too large for one gossip value (chitchat frames a value
//! with a 16-bit length and a datagram holds 64 KiB), so it travels as chunks of
//! [`RoutingHead::CHUNK_BYTES`] named by the checksum of the whole, and a head that
//! names them. The publisher writes the chunks first, then the head, then deletes the
//! chunks of the document before; chitchat delivers a node's keys in the order they
//! were written, so a reader that has a head has its chunks, and the chunks of the
//! previous head stay until the new head is there. Chunks of two documents never
//! share a key (unless they are the same document), and the checksum is checked
//! anyway: a reader never assembles a mix.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::Error,
    member::{GeoPoint, Role},
    purge::PurgeRecord,
    routing::{self, Routing, Versioned},
};

/// A key of a node's gossip state.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `role`.
    Role,
    /// `region`.
    Region,
    /// `lat`.
    Lat,
    /// `lon`.
    Lon,
    /// `public_addr`.
    PublicAddr,
    /// `admin`.
    Admin,
    /// `ready`.
    Ready,
    /// `load`.
    Load,
    /// `stats`.
    Stats,
    /// `purge:<seq>`.
    Purge(u64),
    /// `purge_floor`.
    PurgeFloor,
    /// `applied:<control>`.
    Applied(String),
    /// `drain:<node>`.
    Drain(String),
    /// `routing:head`.
    RoutingHead,
    /// `routing:<xxh3>:<index>`: chunk `index` of the routing document whose JSON
    /// has this XXH3-64.
    RoutingChunk {
        /// The checksum of the whole document's JSON.
        xxh3: u64,
        /// Which chunk, from 0.
        index: u32,
    },
    /// `routing_applied`.
    RoutingApplied,
    /// `serve`.
    Serve,
    /// `acme:<name>`: the TXT values of an ACME DNS-01 challenge name.
    Acme(String),
    /// `cert:<label>`: a certificate issued by the control plane, its key sealed.
    Cert(String),
}

impl Key {
    /// Reads a key from the wire; [`Error::UnknownKey`] for one this version does
    /// not know.
    pub fn parse(key: &str) -> Result<Self, Error> {
        let known = match key {
            "role" => Some(Self::Role),
            "region" => Some(Self::Region),
            "lat" => Some(Self::Lat),
            "lon" => Some(Self::Lon),
            "public_addr" => Some(Self::PublicAddr),
            "admin" => Some(Self::Admin),
            "ready" => Some(Self::Ready),
            "load" => Some(Self::Load),
            "stats" => Some(Self::Stats),
            "purge_floor" => Some(Self::PurgeFloor),
            "routing:head" => Some(Self::RoutingHead),
            "routing_applied" => Some(Self::RoutingApplied),
            "serve" => Some(Self::Serve),
            _ => {
                if let Some(seq) = key.strip_prefix("purge:") {
                    seq.parse().ok().map(Self::Purge)
                } else if let Some(control) = key.strip_prefix("applied:") {
                    (!control.is_empty()).then(|| Self::Applied(control.to_string()))
                } else if let Some(name) = key.strip_prefix("acme:") {
                    (!name.is_empty()).then(|| Self::Acme(name.to_string()))
                } else if let Some(label) = key.strip_prefix("cert:") {
                    (!label.is_empty()).then(|| Self::Cert(label.to_string()))
                } else if let Some(node) = key.strip_prefix("drain:") {
                    (!node.is_empty()).then(|| Self::Drain(node.to_string()))
                } else if let Some(chunk) = key.strip_prefix("routing:") {
                    Self::parse_chunk(chunk)
                } else {
                    None
                }
            }
        };
        known.ok_or_else(|| Error::UnknownKey { key: key.to_string() })
    }

    /// `<xxh3>:<index>` of a routing chunk's key: 16 lowercase hex digits, a number.
    fn parse_chunk(chunk: &str) -> Option<Self> {
        let (xxh3, index) = chunk.split_once(':')?;
        if xxh3.len() != 16 || !xxh3.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        let xxh3 = u64::from_str_radix(xxh3, 16).ok()?;
        index.parse().ok().map(|index| Self::RoutingChunk { xxh3, index })
    }

    /// Whether the member view ([`Member`](crate::Member)) is made of this key.
    pub(crate) fn describes_member(&self) -> bool {
        matches!(
            self,
            Self::Role
                | Self::Region
                | Self::Lat
                | Self::Lon
                | Self::PublicAddr
                | Self::Admin
                | Self::Ready
                | Self::Load
                | Self::Drain(_)
        )
    }
}

/// The key as it is on the wire.
impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Role => f.write_str("role"),
            Self::Region => f.write_str("region"),
            Self::Lat => f.write_str("lat"),
            Self::Lon => f.write_str("lon"),
            Self::PublicAddr => f.write_str("public_addr"),
            Self::Admin => f.write_str("admin"),
            Self::Ready => f.write_str("ready"),
            Self::Load => f.write_str("load"),
            Self::Stats => f.write_str("stats"),
            Self::Purge(seq) => write!(f, "purge:{seq}"),
            Self::PurgeFloor => f.write_str("purge_floor"),
            Self::Applied(control) => write!(f, "applied:{control}"),
            Self::Drain(node) => write!(f, "drain:{node}"),
            Self::RoutingHead => f.write_str("routing:head"),
            Self::RoutingChunk { xxh3, index } => write!(f, "routing:{xxh3:016x}:{index}"),
            Self::RoutingApplied => f.write_str("routing_applied"),
            Self::Serve => f.write_str("serve"),
            Self::Acme(name) => write!(f, "acme:{name}"),
            Self::Cert(label) => write!(f, "cert:{label}"),
        }
    }
}

/// A family of keys, to read or to [`subscribe`](crate::Cluster::subscribe) to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    /// Purge records and floors ([`Key::Purge`], [`Key::PurgeFloor`]).
    Purges,
    /// Applied sequences ([`Key::Applied`]).
    Applied,
    /// Traffic counters ([`Key::Stats`]).
    Stats,
    /// The routing document ([`Key::RoutingHead`], [`Key::RoutingChunk`]).
    Routing,
    /// Routing versions applied ([`Key::RoutingApplied`]).
    RoutingApplied,
    /// Edges' listeners for other edges ([`Key::Serve`]).
    Serve,
    /// ACME DNS-01 challenges ([`Key::Acme`]).
    Acme,
    /// Issued certificates ([`Key::Cert`]).
    Cert,
}

impl Topic {
    /// The prefix every key of the family starts with on the wire.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Self::Purges => "purge",
            Self::Applied => "applied:",
            Self::Stats => "stats",
            Self::Routing => "routing:",
            Self::RoutingApplied => "routing_applied",
            Self::Serve => "serve",
            Self::Acme => "acme:",
            Self::Cert => "cert:",
        }
    }
}

/// Whether an operator took an edge out of DNS answers, and when (set by a control
/// node; of several control nodes' word on one edge, the newest counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drain {
    /// Out of DNS answers.
    pub drained: bool,
    /// When it was decided, ms since the Unix epoch.
    pub at_ms: u64,
}

/// An edge's traffic counters since it started, for the control node's status page
/// (which turns them into rates).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests answered.
    pub requests: u64,
    /// Of which cache hits.
    pub hits: u64,
    /// Response bytes sent.
    pub bytes: u64,
    /// When the counters were read, ms since the Unix epoch.
    #[serde(default)]
    pub ms: u64,
    /// Requests this edge sent upstream, by kind (tiered caching).
    #[serde(default, skip_serializing_if = "Upstreams::is_zero")]
    pub upstream: Upstreams,
}

/// Requests an edge sent upstream since it started, by where they went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstreams {
    /// To its site's origins.
    pub origin: u64,
    /// To a shield edge.
    pub shield: u64,
    /// To the edge of its region that owns the key (`share = "region"`).
    pub peer: u64,
}

impl Upstreams {
    fn is_zero(&self) -> bool {
        *self == Self::default()
    }
}

/// Where an edge takes requests from other edges (tiered caching): its listeners'
/// addresses as other nodes reach them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serve {
    /// Plain HTTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    /// HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<SocketAddr>,
}

/// What one control node holds in gossip: its purge records and its floor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Purges {
    /// The oldest sequence number still held (records below it were collected);
    /// `None` until the control node published it.
    pub floor: Option<u64>,
    /// Its records by sequence number.
    pub records: BTreeMap<u64, PurgeRecord>,
}

impl Purges {
    /// Whether purge `seq` was published: held now, or collected below the floor.
    pub fn knows(&self, seq: u64) -> bool {
        self.records.contains_key(&seq) || self.floor.is_some_and(|floor| seq < floor)
    }
}

/// What a control node says about the routing document it holds (`routing:head`):
/// its version and author, and the chunks it travels in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingHead {
    /// The document's version; 0: this control node holds no document (yet).
    pub version: u64,
    /// The control node that accepted it.
    pub by: String,
    /// How many chunks (`routing:<xxh3>:0` ..).
    pub chunks: u32,
    /// The length of the whole JSON.
    pub bytes: u64,
    /// XXH3-64 of the whole JSON.
    pub xxh3: u64,
    /// When the document was accepted ([`Versioned::accepted_ms`]); absent (0) in
    /// heads written before it existed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub accepted_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl RoutingHead {
    /// Most bytes of JSON in one chunk. chitchat sends a node's keys in deltas of at
    /// most one datagram (64 KiB, less the digest), counted uncompressed, and
    /// cannot send a value larger than that at all: 15 KiB puts three or four
    /// chunks in each gossip message and leaves room for the rest of the state.
    pub const CHUNK_BYTES: usize = 15 * 1024;
    /// Most chunks a head may name (a [`routing::MAX_BYTES`] document needs 70).
    pub const MAX_CHUNKS: u32 = 128;

    /// The head of a control node that holds no document.
    pub fn none(by: impl Into<String>) -> Self {
        Self { version: 0, by: by.into(), chunks: 0, bytes: 0, xxh3: 0, accepted_ms: 0 }
    }

    /// Whether the control node holds no document.
    pub fn is_none(&self) -> bool {
        self.version == 0
    }

    /// The keys of its chunks, in order.
    pub fn chunk_keys(&self) -> impl Iterator<Item = Key> + '_ {
        (0..self.chunks).map(|index| Key::RoutingChunk { xxh3: self.xxh3, index })
    }

    /// What a control node writes to publish `versioned`: its chunks, then its head
    /// (in that order). [`Error::RoutingTooLarge`] past [`routing::MAX_BYTES`].
    pub fn split(versioned: &Versioned) -> Result<Vec<Entry>, Error> {
        let json = versioned.routing.to_json();
        if json.len() > routing::MAX_BYTES {
            return Err(Error::RoutingTooLarge { bytes: json.len(), max: routing::MAX_BYTES });
        }
        let xxh3 = twox_hash::XxHash3_64::oneshot(json.as_bytes());
        let mut entries = Vec::new();
        let mut rest = json.as_str();
        while !rest.is_empty() {
            // Values are strings: cut between characters.
            let mut end = rest.len().min(Self::CHUNK_BYTES);
            while !rest.is_char_boundary(end) {
                end -= 1;
            }
            let (text, tail) = rest.split_at(end);
            let index = u32::try_from(entries.len()).expect("at most MAX_CHUNKS chunks");
            entries.push(Entry::RoutingChunk { xxh3, index, text: text.to_string() });
            rest = tail;
        }
        let chunks = u32::try_from(entries.len()).expect("at most MAX_CHUNKS chunks");
        let bytes = json.len() as u64;
        entries.push(Entry::RoutingHead(Self {
            version: versioned.version,
            by: versioned.by.clone(),
            chunks,
            bytes,
            xxh3,
            accepted_ms: versioned.accepted_ms,
        }));
        Ok(entries)
    }

    /// The document from its chunks' texts, in order: they must be as many as the
    /// head says, as long, and have its checksum; then the JSON must parse (it is
    /// not validated here).
    pub fn assemble(&self, chunks: &[&str]) -> Result<Versioned, Error> {
        let bad = |why: String| Error::BadValue { key: Key::RoutingHead, source: why.into() };
        if self.is_none() {
            return Err(bad("the control node holds no document".into()));
        }
        if chunks.len() != self.chunks as usize {
            return Err(bad(format!("{} chunks of {}", chunks.len(), self.chunks)));
        }
        let json = chunks.concat();
        if json.len() as u64 != self.bytes || twox_hash::XxHash3_64::oneshot(json.as_bytes()) != self.xxh3 {
            return Err(bad(format!("the chunks of version {} do not add up (incomplete or mixed)", self.version)));
        }
        let routing = Routing::from_json(json.as_bytes())?;
        Ok(Versioned { version: self.version, by: self.by.clone(), accepted_ms: self.accepted_ms, routing })
    }

    /// Whether the head is consistent in itself.
    fn problem(&self) -> Option<&'static str> {
        if self.by.is_empty() {
            Some("no author")
        } else if self.is_none() {
            (self.chunks != 0 || self.bytes != 0).then_some("version 0 with chunks")
        } else if self.chunks == 0 || self.chunks > Self::MAX_CHUNKS {
            Some("chunk count out of range")
        } else if self.bytes > routing::MAX_BYTES as u64 || self.bytes < u64::from(self.chunks) {
            Some("length out of range")
        } else {
            None
        }
    }
}

/// One key of a node's gossip state with its value.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    /// What the node does.
    Role(Role),
    /// Its region.
    Region(String),
    /// Its latitude.
    Lat(f64),
    /// Its longitude.
    Lon(f64),
    /// The address DNS hands out.
    PublicAddr(IpAddr),
    /// Its admin listener.
    Admin(SocketAddr),
    /// Whether it can take traffic.
    Ready(bool),
    /// Its load, 0.0 (idle) ..= 1.0 (full); written with three decimals, clamped.
    Load(f64),
    /// Its traffic counters.
    Stats(Stats),
    /// A purge a control node accepted, under its sequence number.
    Purge(PurgeRecord),
    /// The oldest sequence number a control node still holds.
    PurgeFloor(u64),
    /// The last purge of `control` this node applied.
    Applied {
        /// The control node.
        control: String,
        /// Its sequence number.
        seq: u64,
    },
    /// A control node's word on draining `node`.
    Drain {
        /// The drained (or undrained) node.
        node: String,
        /// Drained or not, and when.
        drain: Drain,
    },
    /// What routing document a control node holds.
    RoutingHead(RoutingHead),
    /// A piece of a routing document's JSON.
    RoutingChunk {
        /// The checksum of the whole.
        xxh3: u64,
        /// Which piece, from 0.
        index: u32,
        /// The piece.
        text: String,
    },
    /// The routing version this node serves by.
    RoutingApplied(u64),
    /// Where this edge takes requests from other edges.
    Serve(Serve),
    /// The TXT values to answer for an ACME challenge name
    /// (`_acme-challenge.www.cdn.test`).
    Acme {
        /// The name, lowercase, without the trailing dot.
        name: String,
        /// Its TXT values.
        values: Vec<String>,
    },
    /// A certificate the control plane issued.
    Cert(SealedCert),
}

/// A certificate issued by the control plane as it travels in gossip: the chain in
/// clear, the private key sealed with a key derived from the cluster secret
/// ([`crate::peer::CertSeal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedCert {
    /// What it is for (the first name it covers); one entry per label.
    pub label: String,
    /// Its end of validity, seconds since the Unix epoch (the newest wins).
    pub not_after: i64,
    /// The PEM chain, leaf first.
    pub chain: String,
    /// The PEM private key, sealed (base64 of nonce ‖ AES-256-GCM ciphertext).
    pub key: String,
}

impl Entry {
    /// Its key.
    pub fn key(&self) -> Key {
        match self {
            Self::Role(_) => Key::Role,
            Self::Region(_) => Key::Region,
            Self::Lat(_) => Key::Lat,
            Self::Lon(_) => Key::Lon,
            Self::PublicAddr(_) => Key::PublicAddr,
            Self::Admin(_) => Key::Admin,
            Self::Ready(_) => Key::Ready,
            Self::Load(_) => Key::Load,
            Self::Stats(_) => Key::Stats,
            Self::Purge(record) => Key::Purge(record.seq),
            Self::PurgeFloor(_) => Key::PurgeFloor,
            Self::Applied { control, .. } => Key::Applied(control.clone()),
            Self::Drain { node, .. } => Key::Drain(node.clone()),
            Self::RoutingHead(_) => Key::RoutingHead,
            Self::RoutingChunk { xxh3, index, .. } => Key::RoutingChunk { xxh3: *xxh3, index: *index },
            Self::RoutingApplied(_) => Key::RoutingApplied,
            Self::Serve(_) => Key::Serve,
            Self::Acme { name, .. } => Key::Acme(name.clone()),
            Self::Cert(cert) => Key::Cert(cert.label.clone()),
        }
    }

    /// Its value as it is on the wire.
    pub fn value(&self) -> String {
        match self {
            Self::Role(role) => role.as_str().to_string(),
            Self::Region(region) => region.clone(),
            Self::Lat(degrees) | Self::Lon(degrees) => degrees.to_string(),
            Self::PublicAddr(addr) => addr.to_string(),
            Self::Admin(addr) => addr.to_string(),
            Self::Ready(ready) => if *ready { "1" } else { "0" }.to_string(),
            Self::Load(load) => format!("{:.3}", load.clamp(0.0, 1.0)),
            // Structs of strings, numbers and booleans: serde_json cannot fail on them.
            Self::Stats(stats) => serde_json::to_string(stats).expect("Stats serializes"),
            Self::Purge(record) => serde_json::to_string(record).expect("PurgeRecord serializes"),
            Self::RoutingHead(head) => serde_json::to_string(head).expect("RoutingHead serializes"),
            Self::Serve(serve) => serde_json::to_string(serve).expect("Serve serializes"),
            Self::Acme { values, .. } => serde_json::to_string(values).expect("strings serialize"),
            Self::Cert(cert) => serde_json::to_string(cert).expect("SealedCert serializes"),
            Self::RoutingChunk { text, .. } => text.clone(),
            Self::PurgeFloor(seq) | Self::Applied { seq, .. } | Self::RoutingApplied(seq) => seq.to_string(),
            Self::Drain { drain, .. } => format!("{}:{}", u8::from(drain.drained), drain.at_ms),
        }
    }

    /// Reads the value of `key`; [`Error::BadValue`] when it does not parse.
    pub fn decode(key: Key, value: &str) -> Result<Self, Error> {
        let bad = |key: Key, source: Box<dyn std::error::Error + Send + Sync>| Error::BadValue { key, source };
        match key {
            Key::Role => match Role::parse(value) {
                Some(role) => Ok(Self::Role(role)),
                None => Err(bad(key, format!("unknown role {value:?}").into())),
            },
            Key::Region => Ok(Self::Region(value.to_string())),
            Key::Lat => value.parse().map(Self::Lat).map_err(|e| bad(key, e.into())),
            Key::Lon => value.parse().map(Self::Lon).map_err(|e| bad(key, e.into())),
            Key::PublicAddr => value.parse().map(Self::PublicAddr).map_err(|e| bad(key, e.into())),
            Key::Admin => value.parse().map(Self::Admin).map_err(|e| bad(key, e.into())),
            Key::Ready => match value {
                "1" => Ok(Self::Ready(true)),
                "0" => Ok(Self::Ready(false)),
                _ => Err(bad(key, "expected 1 or 0".into())),
            },
            Key::Load => value.parse().map(Self::Load).map_err(|e| bad(key, e.into())),
            Key::Stats => serde_json::from_str(value).map(Self::Stats).map_err(|e| bad(key, e.into())),
            Key::Purge(seq) => match serde_json::from_str::<PurgeRecord>(value) {
                Ok(record) if record.seq == seq => Ok(Self::Purge(record)),
                Ok(record) => Err(bad(key, format!("the record says seq {}", record.seq).into())),
                Err(e) => Err(bad(key, e.into())),
            },
            Key::PurgeFloor => value.parse().map(Self::PurgeFloor).map_err(|e| bad(key, e.into())),
            Key::Applied(control) => match value.parse() {
                Ok(seq) => Ok(Self::Applied { control, seq }),
                Err(e) => Err(bad(Key::Applied(control), e.into())),
            },
            Key::Drain(node) => {
                let drained = match value.split_once(':') {
                    Some(("1", at)) => at.parse().map(|at_ms| Drain { drained: true, at_ms }),
                    Some(("0", at)) => at.parse().map(|at_ms| Drain { drained: false, at_ms }),
                    _ => return Err(bad(Key::Drain(node), "expected 1:<ms> or 0:<ms>".into())),
                };
                match drained {
                    Ok(drain) => Ok(Self::Drain { node, drain }),
                    Err(e) => Err(bad(Key::Drain(node), e.into())),
                }
            }
            Key::RoutingHead => match serde_json::from_str::<RoutingHead>(value) {
                Ok(head) => match head.problem() {
                    None => Ok(Self::RoutingHead(head)),
                    Some(problem) => Err(bad(key, problem.into())),
                },
                Err(e) => Err(bad(key, e.into())),
            },
            Key::RoutingChunk { xxh3, index } => Ok(Self::RoutingChunk { xxh3, index, text: value.to_string() }),
            Key::RoutingApplied => value.parse().map(Self::RoutingApplied).map_err(|e| bad(key, e.into())),
            Key::Serve => serde_json::from_str(value).map(Self::Serve).map_err(|e| bad(key, e.into())),
            Key::Acme(name) => match serde_json::from_str::<Vec<String>>(value) {
                Ok(values) => Ok(Self::Acme { name, values }),
                Err(e) => Err(bad(Key::Acme(name), e.into())),
            },
            Key::Cert(label) => match serde_json::from_str::<SealedCert>(value) {
                Ok(cert) if cert.label == label => Ok(Self::Cert(cert)),
                Ok(cert) => Err(bad(Key::Cert(label), format!("the entry says label {:?}", cert.label).into())),
                Err(e) => Err(bad(Key::Cert(label), e.into())),
            },
        }
    }

    /// Reads a key and its value from the wire.
    pub fn parse(key: &str, value: &str) -> Result<Self, Error> {
        Self::decode(Key::parse(key)?, value)
    }

    /// What a node writes about itself when it joins (not ready yet).
    pub(crate) fn announcement(node: &crate::NodeInfo) -> Vec<Self> {
        let mut entries = vec![Self::Role(node.role), Self::Ready(false)];
        entries.extend(node.region.clone().map(Self::Region));
        if let Some(location) = node.location {
            entries.extend([Self::Lat(location.lat), Self::Lon(location.lon)]);
        }
        entries.extend(node.public_addr.map(Self::PublicAddr));
        entries.extend(node.admin.map(Self::Admin));
        entries
    }
}

/// One node's member-view keys ([`Key::describes_member`]), decoded; absent or
/// unreadable keys keep their defaults (not ready, no load, no location).
#[derive(Debug, Default)]
pub(crate) struct NodeView {
    pub(crate) role: Option<Role>,
    pub(crate) region: Option<String>,
    lat: Option<f64>,
    lon: Option<f64>,
    pub(crate) public_addr: Option<IpAddr>,
    pub(crate) admin: Option<SocketAddr>,
    pub(crate) ready: bool,
    pub(crate) load: f64,
    /// Its word on draining other nodes (counts only if it is a control node).
    pub(crate) drains: Vec<(String, Drain)>,
}

impl NodeView {
    /// Takes one entry into the view (entries of other families are left out).
    pub(crate) fn add(&mut self, entry: Entry) {
        match entry {
            Entry::Role(role) => self.role = Some(role),
            Entry::Region(region) => self.region = Some(region),
            Entry::Lat(lat) => self.lat = Some(lat),
            Entry::Lon(lon) => self.lon = Some(lon),
            Entry::PublicAddr(addr) => self.public_addr = Some(addr),
            Entry::Admin(addr) => self.admin = Some(addr),
            Entry::Ready(ready) => self.ready = ready,
            Entry::Load(load) => self.load = load,
            Entry::Drain { node, drain } => self.drains.push((node, drain)),
            Entry::Stats(_)
            | Entry::Purge(_)
            | Entry::PurgeFloor(_)
            | Entry::Applied { .. }
            | Entry::RoutingHead(_)
            | Entry::RoutingChunk { .. }
            | Entry::RoutingApplied(_)
            | Entry::Serve(_)
            | Entry::Acme { .. }
            | Entry::Cert(_) => {}
        }
    }

    /// Where the node is, if it said both coordinates.
    pub(crate) fn location(&self) -> Option<GeoPoint> {
        Some(GeoPoint { lat: self.lat?, lon: self.lon? })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::{NodeInfo, purge::Target, routing::tests::sample};

    fn record(seq: u64) -> PurgeRecord {
        PurgeRecord {
            id: format!("c1-{seq}"),
            seq,
            control: "c1".into(),
            created_ms: 1_700_000_000_000,
            soft: true,
            target: Target { urls: vec!["www.cdn.test/v/a.mp4?x=1".into()], ..Target::default() },
        }
    }

    fn wire(entry: &Entry) -> (String, String) {
        (entry.key().to_string(), entry.value())
    }

    /// The exact strings on the wire: older and newer versions read these.
    #[test]
    fn wire_format() {
        let cases = [
            (Entry::Role(Role::Edge), "role", "edge"),
            (Entry::Role(Role::Control), "role", "control"),
            (Entry::Region("eu-west".into()), "region", "eu-west"),
            (Entry::Lat(48.8566), "lat", "48.8566"),
            (Entry::Lon(-0.5), "lon", "-0.5"),
            (Entry::Lat(10.0), "lat", "10"),
            (Entry::PublicAddr([127, 0, 0, 11].into()), "public_addr", "127.0.0.11"),
            (Entry::PublicAddr("2001:db8::1".parse().unwrap()), "public_addr", "2001:db8::1"),
            (Entry::Admin("127.0.0.11:9090".parse().unwrap()), "admin", "127.0.0.11:9090"),
            (Entry::Ready(true), "ready", "1"),
            (Entry::Ready(false), "ready", "0"),
            (Entry::Load(0.25), "load", "0.250"),
            (Entry::Load(1.7), "load", "1.000"),
            (Entry::Load(-1.0), "load", "0.000"),
            (
                Entry::Stats(Stats { requests: 10, hits: 7, bytes: 4096, ms: 1_700_000_000_000, ..Stats::default() }),
                "stats",
                r#"{"requests":10,"hits":7,"bytes":4096,"ms":1700000000000}"#,
            ),
            (
                Entry::Purge(record(7)),
                "purge:7",
                r#"{"id":"c1-7","seq":7,"control":"c1","created_ms":1700000000000,"soft":true,"target":{"urls":["www.cdn.test/v/a.mp4?x=1"]}}"#,
            ),
            (Entry::PurgeFloor(3), "purge_floor", "3"),
            (Entry::Applied { control: "control-1".into(), seq: 42 }, "applied:control-1", "42"),
            (
                Entry::Drain { node: "edge-2".into(), drain: Drain { drained: true, at_ms: 1700 } },
                "drain:edge-2",
                "1:1700",
            ),
            (
                Entry::Drain { node: "edge-2".into(), drain: Drain { drained: false, at_ms: 1800 } },
                "drain:edge-2",
                "0:1800",
            ),
            (
                Entry::RoutingHead(RoutingHead {
                    version: 3,
                    by: "c1".into(),
                    chunks: 2,
                    bytes: 20_000,
                    xxh3: 0x0123_4567_89ab_cdef,
                    accepted_ms: 0,
                }),
                "routing:head",
                r#"{"version":3,"by":"c1","chunks":2,"bytes":20000,"xxh3":81985529216486895}"#,
            ),
            (
                Entry::RoutingHead(RoutingHead::none("c2")),
                "routing:head",
                r#"{"version":0,"by":"c2","chunks":0,"bytes":0,"xxh3":0}"#,
            ),
            (
                Entry::RoutingChunk { xxh3: 0xab, index: 1, text: r#"{"sites":[]}"#.into() },
                "routing:00000000000000ab:1",
                r#"{"sites":[]}"#,
            ),
            (Entry::RoutingApplied(3), "routing_applied", "3"),
        ];
        for (entry, key, value) in cases {
            assert_eq!(wire(&entry), (key.to_string(), value.to_string()), "{entry:?}");
        }
    }

    #[test]
    fn entries_round_trip() {
        let entries = [
            Entry::Role(Role::Origin),
            Entry::Role(Role::Geo),
            Entry::Region("ap-south".into()),
            Entry::Lat(-33.8688),
            Entry::Lon(151.2093),
            Entry::PublicAddr("::1".parse().unwrap()),
            Entry::Admin("[::1]:9001".parse().unwrap()),
            Entry::Ready(true),
            Entry::Ready(false),
            Entry::Load(0.5),
            Entry::Load(0.0),
            Entry::Stats(Stats { requests: 1, hits: 0, bytes: u64::MAX, ms: 5, ..Stats::default() }),
            Entry::Stats(Stats { upstream: Upstreams { origin: 1, shield: 2, peer: 3 }, ..Stats::default() }),
            Entry::Serve(Serve { http: Some("127.0.0.11:8080".parse().unwrap()), https: None }),
            Entry::Serve(Serve { http: None, https: Some("[::1]:8443".parse().unwrap()) }),
            Entry::Acme { name: "_acme-challenge.www.cdn.test".into(), values: vec!["abc".into(), "def".into()] },
            Entry::Cert(SealedCert {
                label: "www.cdn.test".into(),
                not_after: 1,
                chain: "pem".into(),
                key: "k".into(),
            }),
            Entry::Purge(record(1)),
            Entry::Purge(PurgeRecord { soft: false, target: Target::everything(), ..record(u64::MAX) }),
            Entry::PurgeFloor(0),
            Entry::Applied { control: "c.1_x".into(), seq: 0 },
            Entry::Drain { node: "e".into(), drain: Drain { drained: true, at_ms: 0 } },
            Entry::RoutingHead(RoutingHead {
                version: u64::MAX,
                by: "c".into(),
                chunks: 128,
                bytes: 1 << 20,
                xxh3: u64::MAX,
                accepted_ms: u64::MAX,
            }),
            Entry::RoutingHead(RoutingHead::none("c")),
            Entry::RoutingChunk { xxh3: 0, index: u32::MAX, text: String::new() },
            Entry::RoutingChunk { xxh3: u64::MAX, index: 0, text: "é€,\"{}".into() },
            Entry::RoutingApplied(0),
        ];
        for entry in entries {
            let (key, value) = wire(&entry);
            assert_eq!(Key::parse(&key).unwrap(), entry.key(), "{key}");
            assert_eq!(Entry::parse(&key, &value).unwrap(), entry, "{key} = {value}");
        }
    }

    #[test]
    fn what_older_versions_wrote_still_reads() {
        // The edge's stats before they had a type, and a record without `soft`.
        let stats = Entry::parse("stats", r#"{"requests":3,"hits":1,"bytes":9,"ms":12}"#).unwrap();
        assert_eq!(stats, Entry::Stats(Stats { requests: 3, hits: 1, bytes: 9, ms: 12, ..Stats::default() }));
        let old = r#"{"id":"c-2","seq":2,"control":"c","created_ms":5,"target":{"all":true}}"#;
        let Entry::Purge(record) = Entry::parse("purge:2", old).unwrap() else { panic!("a purge") };
        assert!(!record.soft && record.target.all);
    }

    #[test]
    fn newer_fields_are_ignored() {
        let stats = Entry::parse("stats", r#"{"requests":3,"hits":1,"bytes":9,"ms":12,"errors":4}"#).unwrap();
        assert_eq!(stats, Entry::Stats(Stats { requests: 3, hits: 1, bytes: 9, ms: 12, ..Stats::default() }));
        let record = r#"{"id":"c-2","seq":2,"control":"c","created_ms":5,"target":{"all":true},"priority":1}"#;
        assert!(Entry::parse("purge:2", record).is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_not_panics() {
        let unknown = [
            "certs",
            "purge:",
            "purge:x",
            "purge:-1",
            "applied:",
            "drain:",
            "Role",
            "purge_floors",
            "",
            "routing",
            "routing:",
            "routing:heads",
            "routing:x:1",
            "routing:0123:1",
            "routing:0123456789ABCDEF:1",
            "routing:0123456789abcdef:",
            "routing:0123456789abcdef:-1",
            "routing:0123456789abcdef:1:2",
            "routing:+123456789abcdef:1",
            "routing_applied:c",
        ];
        for key in unknown {
            assert!(matches!(Key::parse(key), Err(Error::UnknownKey { .. })), "{key}");
        }
        let bad = [
            ("role", "shield"),
            ("lat", "north"),
            ("lon", ""),
            ("public_addr", "localhost"),
            ("admin", "127.0.0.1"),
            ("ready", "yes"),
            ("ready", ""),
            ("load", "busy"),
            ("stats", "{"),
            ("stats", r#"{"requests":1}"#),
            ("purge:1", "not json"),
            ("purge:1", &serde_json::to_string(&record(2)).unwrap()),
            ("purge_floor", "-1"),
            ("applied:c1", "seven"),
            ("drain:e1", "junk"),
            ("drain:e1", "1"),
            ("drain:e1", "2:1700"),
            ("drain:e1", "1:soon"),
            ("routing:head", "{}"),
            ("routing:head", "not json"),
            ("routing:head", r#"{"version":0,"by":"c","chunks":1,"bytes":10,"xxh3":0}"#),
            ("routing:head", r#"{"version":1,"by":"c","chunks":0,"bytes":0,"xxh3":0}"#),
            ("routing:head", r#"{"version":1,"by":"c","chunks":129,"bytes":200000,"xxh3":0}"#),
            ("routing:head", r#"{"version":1,"by":"c","chunks":1,"bytes":1048577,"xxh3":0}"#),
            ("routing:head", r#"{"version":1,"by":"c","chunks":3,"bytes":2,"xxh3":0}"#),
            ("routing:head", r#"{"version":1,"by":"","chunks":1,"bytes":2,"xxh3":0}"#),
            ("routing_applied", "three"),
            ("routing_applied", "-1"),
        ];
        for (key, value) in bad {
            let error = Entry::parse(key, value).unwrap_err();
            assert!(matches!(error, Error::BadValue { .. }), "{key} = {value}: {error}");
            assert!(error.to_string().contains(key), "{error}");
        }
    }

    #[test]
    fn the_announcement_of_a_node() {
        let node = NodeInfo {
            node_id: "edge-1".into(),
            role: Role::Edge,
            region: Some("us-east".into()),
            location: Some(GeoPoint { lat: 40.7, lon: -74.0 }),
            public_addr: Some([10, 0, 0, 1].into()),
            admin: Some("10.0.0.1:9090".parse().unwrap()),
        };
        let wire: Vec<(String, String)> = Entry::announcement(&node).iter().map(wire).collect();
        let expected = [
            ("role", "edge"),
            ("ready", "0"),
            ("region", "us-east"),
            ("lat", "40.7"),
            ("lon", "-74"),
            ("public_addr", "10.0.0.1"),
            ("admin", "10.0.0.1:9090"),
        ];
        assert_eq!(wire, expected.map(|(k, v)| (k.to_string(), v.to_string())));
        let control =
            NodeInfo { role: Role::Control, region: None, location: None, public_addr: None, admin: None, ..node };
        assert_eq!(Entry::announcement(&control), [Entry::Role(Role::Control), Entry::Ready(false)]);
    }

    #[test]
    fn a_node_view() {
        let mut view = NodeView::default();
        assert!(!view.ready && view.load == 0.0 && view.location().is_none());
        for (key, value) in [("role", "edge"), ("lat", "1.5"), ("ready", "1"), ("load", "0.750"), ("drain:e", "1:5")] {
            view.add(Entry::parse(key, value).unwrap());
        }
        assert_eq!(view.role, Some(Role::Edge));
        assert!(view.location().is_none(), "one coordinate is no location");
        view.add(Entry::Lon(2.5));
        assert_eq!(view.location(), Some(GeoPoint { lat: 1.5, lon: 2.5 }));
        assert!(view.ready && view.load == 0.75);
        assert_eq!(view.drains, [("e".to_string(), Drain { drained: true, at_ms: 5 })]);
        view.add(Entry::PurgeFloor(3));
        view.add(Entry::Applied { control: "c".into(), seq: 1 });
        assert_eq!(view.drains.len(), 1);
    }

    #[test]
    fn purges_know_collected_and_held_records() {
        let mut purges = Purges::default();
        assert!(!purges.knows(0));
        purges.floor = Some(5);
        purges.records.insert(6, record(6));
        assert!(purges.knows(4) && purges.knows(6));
        assert!(!purges.knows(5) && !purges.knows(7));
    }

    #[test]
    fn member_keys() {
        for key in ["role", "region", "lat", "lon", "public_addr", "admin", "ready", "load", "drain:e"] {
            assert!(Key::parse(key).unwrap().describes_member(), "{key}");
        }
        for key in [
            "stats",
            "purge:1",
            "purge_floor",
            "applied:c",
            "routing:head",
            "routing:00000000000000ab:0",
            "routing_applied",
        ] {
            assert!(!Key::parse(key).unwrap().describes_member(), "{key}");
        }
    }

    #[test]
    fn topics_cover_their_keys() {
        let cases = [
            (Topic::Purges, Key::Purge(3)),
            (Topic::Purges, Key::PurgeFloor),
            (Topic::Applied, Key::Applied("c".into())),
            (Topic::Stats, Key::Stats),
            (Topic::Routing, Key::RoutingHead),
            (Topic::Routing, Key::RoutingChunk { xxh3: 1, index: 2 }),
            (Topic::RoutingApplied, Key::RoutingApplied),
        ];
        for (topic, key) in cases {
            assert!(key.to_string().starts_with(topic.prefix()), "{topic:?} {key}");
        }
        // An edge watching the document is not woken by every edge's applied version.
        assert!(!Key::RoutingApplied.to_string().starts_with(Topic::Routing.prefix()));
    }

    fn versioned(version: u64, routing: Routing) -> Versioned {
        Versioned { version, by: "c1".into(), accepted_ms: 0, routing }
    }

    /// The chunk texts and the head of a split document.
    fn split(versioned: &Versioned) -> (Vec<String>, RoutingHead) {
        let mut entries = RoutingHead::split(versioned).unwrap();
        let Some(Entry::RoutingHead(head)) = entries.pop() else { panic!("the head comes last") };
        let chunks = entries
            .into_iter()
            .enumerate()
            .map(|(n, entry)| match entry {
                Entry::RoutingChunk { xxh3, index, text } => {
                    assert_eq!((xxh3, index as usize), (head.xxh3, n), "chunks in order, named by the checksum");
                    text
                }
                other => panic!("a chunk: {other:?}"),
            })
            .collect();
        (chunks, head)
    }

    #[test]
    fn a_document_splits_into_chunks_and_assembles_whole() {
        let small = versioned(1, sample(2));
        let (chunks, head) = split(&small);
        assert_eq!((head.version, head.by.as_str(), head.chunks), (1, "c1", 1));
        assert_eq!(head.bytes as usize, small.routing.to_json().len());
        let texts: Vec<&str> = chunks.iter().map(String::as_str).collect();
        assert_eq!(head.assemble(&texts).unwrap(), small);

        let large = versioned(2, sample(600));
        let (chunks, head) = split(&large);
        assert!(head.chunks > 10, "{} chunks", head.chunks);
        assert!(chunks.iter().all(|c| !c.is_empty() && c.len() <= RoutingHead::CHUNK_BYTES));
        let texts: Vec<&str> = chunks.iter().map(String::as_str).collect();
        assert_eq!(head.assemble(&texts).unwrap(), large);
        // A cut that would fall inside a character falls before it.
        let mut euros = sample(1);
        euros.sites[0].rules[1].path_prefix = Some(format!("/{}", "€".repeat(9000)));
        let (euro_chunks, euro_head) = split(&versioned(1, euros.clone()));
        assert!(euro_chunks[0].len() < RoutingHead::CHUNK_BYTES, "{}", euro_chunks[0].len());
        let texts: Vec<&str> = euro_chunks.iter().map(String::as_str).collect();
        assert_eq!(euro_head.assemble(&texts).unwrap().routing, euros);
        // On the wire and back.
        let (key, value) = wire(&Entry::RoutingHead(head.clone()));
        assert_eq!(Entry::parse(&key, &value).unwrap(), Entry::RoutingHead(head.clone()));
        assert_eq!(head.chunk_keys().count(), chunks.len());

        // The same document under another version: the same chunks.
        let (again, next) = split(&versioned(3, sample(600)));
        assert_eq!((again, next.xxh3), (chunks.clone(), head.xxh3));

        // What a reader must never take.
        let other = versioned(2, sample(599));
        let (other_chunks, _) = split(&other);
        let mut missing = texts.clone();
        missing.pop();
        let mut swapped = texts.clone();
        swapped.swap(0, 1);
        let mut mixed = texts.clone();
        mixed[1] = &other_chunks[1];
        let mut altered = chunks.clone();
        altered[3].replace_range(0..1, "#");
        let altered: Vec<&str> = altered.iter().map(String::as_str).collect();
        for (what, bad) in [("missing", missing), ("swapped", swapped), ("mixed", mixed), ("altered", altered)] {
            assert!(matches!(head.assemble(&bad), Err(Error::BadValue { key: Key::RoutingHead, .. })), "{what}");
        }
        assert!(RoutingHead::none("c1").assemble(&[]).is_err());
        // Adding up, but not a document.
        let junk = "not json";
        let head = RoutingHead {
            version: 1,
            by: "c".into(),
            chunks: 1,
            bytes: 8,
            xxh3: twox_hash::XxHash3_64::oneshot(junk.as_bytes()),
            accepted_ms: 0,
        };
        assert!(matches!(head.assemble(&[junk]), Err(Error::RoutingSyntax { .. })));
    }

    #[test]
    fn a_document_too_large_is_not_split() {
        let mut huge = sample(1);
        huge.sites[0].rules = (0..100)
            .map(|_| crate::routing::Rule {
                path_prefix: Some(format!("/{}", "p".repeat(11_000))),
                ..Default::default()
            })
            .collect();
        assert!(matches!(RoutingHead::split(&versioned(1, huge)), Err(Error::RoutingTooLarge { .. })));
        let most = RoutingHead::split(&versioned(1, sample(2500))).unwrap();
        assert!(most.len() <= RoutingHead::MAX_CHUNKS as usize, "{} chunks", most.len());
    }

    proptest! {
        #[test]
        fn arbitrary_keys_and_values_never_panic(key in ".{0,24}", value in ".{0,64}") {
            let _ = Entry::parse(&key, &value);
            for prefix in ["purge:", "applied:", "drain:", "routing:", "routing:0123456789abcdef:", ""] {
                for known in ["role", "lat", "ready", "load", "stats", "purge_floor", "1", "c", "head", "routing_applied"] {
                    let _ = Entry::parse(&format!("{prefix}{known}"), &value);
                }
            }
        }

        #[test]
        fn keys_round_trip(seq in any::<u64>(), node in "[a-zA-Z0-9._-]{1,20}") {
            for key in [Key::Purge(seq), Key::Applied(node.clone()), Key::Drain(node.clone())] {
                prop_assert_eq!(Key::parse(&key.to_string()).unwrap(), key);
            }
        }

        #[test]
        fn numbers_round_trip(seq in any::<u64>(), lat in -90.0f64..=90.0, load in 0.0f64..=1.0, at_ms in any::<u64>()) {
            for entry in [
                Entry::PurgeFloor(seq),
                Entry::Applied { control: "c".into(), seq },
                Entry::Lat(lat),
                Entry::Drain { node: "e".into(), drain: Drain { drained: seq % 2 == 0, at_ms } },
            ] {
                let (key, value) = wire(&entry);
                prop_assert_eq!(Entry::parse(&key, &value).unwrap(), entry);
            }
            // Load travels with three decimals.
            let Entry::Load(read) = Entry::parse("load", &Entry::Load(load).value()).unwrap() else { panic!("a load") };
            prop_assert!((read - load).abs() <= 0.0005);
        }
    }
}
