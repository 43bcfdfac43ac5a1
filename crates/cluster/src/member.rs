//! What the cluster knows about each node: the view every role reads.

use std::net::{IpAddr, SocketAddr};

pub use cdn_node::location::GeoPoint;
use serde::{Deserialize, Serialize};

/// What a node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Content server.
    Origin,
    /// Caching proxy.
    Edge,
    /// Control plane.
    Control,
    /// Geo-DNS.
    Geo,
}

impl Role {
    /// The name used in gossip and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Origin => "origin",
            Self::Edge => "edge",
            Self::Control => "control",
            Self::Geo => "geo",
        }
    }

    /// Parses a role name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "origin" => Some(Self::Origin),
            "edge" => Some(Self::Edge),
            "control" => Some(Self::Control),
            "geo" => Some(Self::Geo),
            _ => None,
        }
    }
}

/// Liveness as the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heartbeats arrive.
    Alive,
    /// Heartbeats are late; not yet declared dead.
    Suspect,
    /// The failure detector declared it dead.
    Dead,
    /// Alive, but taken out of DNS answers by an operator.
    Drained,
}

/// One node of the cluster as seen from here.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// Its id.
    pub node_id: String,
    /// Its role.
    pub role: Role,
    /// Its region (edges).
    pub region: String,
    /// Where it is (edges).
    pub location: Option<GeoPoint>,
    /// The address DNS hands out (edges).
    pub public_addr: Option<IpAddr>,
    /// Its admin listener.
    pub admin_addr: Option<SocketAddr>,
    /// Its gossip address.
    pub gossip_addr: SocketAddr,
    /// Liveness (and drain).
    pub state: MemberState,
    /// Whether the node says it can take traffic (its `/readyz`).
    pub ready: bool,
    /// Load published by the node, 0.0 (idle) ..= 1.0 (full).
    pub load: f64,
}

impl Member {
    /// Whether DNS may hand this member out: an edge that is alive, ready, not
    /// drained and not overloaded.
    pub fn serves_traffic(&self, max_load: f64) -> bool {
        self.role == Role::Edge
            && self.state == MemberState::Alive
            && self.ready
            && self.load < max_load
            && self.public_addr.is_some()
    }
}
