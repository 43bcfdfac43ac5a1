//! The control API's bodies, typed: what the server writes and what the client (and
//! so `cdn purge`, `cdn nodes`, `cdn drain`, `cdn routing`) reads are the same structs.
//!
//! The request body of `POST /v1/purge` is [`crate::purge::PurgeRequest`]; the one of
//! `PUT /v1/routing` is a [`Routing`] document (JSON or TOML, [`crate::routing`]).

use std::collections::BTreeMap;

use cdn_cluster::{MemberState, Role, routing::Routing};
use cdn_node::location::GeoPoint;
use serde::{Deserialize, Serialize};

/// `202` answer of `POST /v1/purge`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeAck {
    /// `<control>-<seq>`.
    pub id: String,
    /// Sequence number on the control node that accepted it.
    pub seq: u64,
}

/// Whether every live edge has applied a purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PurgeState {
    /// Some edge has not reported it yet (or no edge is in sight).
    Pending,
    /// Every live edge applied it.
    Complete,
}

/// One edge's progress on a purge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EdgeProgress {
    /// The edge reported it applied the purge.
    Applied,
    /// Not yet.
    Pending,
}

/// `GET /v1/purge/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PurgeStatus {
    /// The purge.
    pub id: String,
    /// Its sequence number.
    pub seq: u64,
    /// `pending` or `complete`.
    pub status: PurgeState,
    /// Each live edge's progress.
    pub edges: BTreeMap<String, EdgeProgress>,
    /// Acknowledgement to the last edge's report, when complete and measured by
    /// the control node that accepted the purge.
    pub completed_ms: Option<u64>,
}

/// One member in `GET /v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its id.
    pub node_id: String,
    /// Its role.
    pub role: Role,
    /// Its region (edges; empty otherwise).
    pub region: String,
    /// The address DNS hands out (edges), else the gossip address's IP.
    pub addr: String,
    /// Its gossip address.
    pub gossip_addr: String,
    /// Its admin listener.
    pub admin_addr: Option<String>,
    /// Where it is (edges).
    pub location: Option<GeoPoint>,
    /// Liveness (and drain).
    pub state: MemberState,
    /// Whether it says it can take traffic.
    pub ready: bool,
    /// Its load, 0.0..=1.0.
    pub load: f64,
    /// The last of this control node's purges it applied (edges).
    pub applied_seq: u64,
    /// The last purge it applied of every control node.
    pub applied: BTreeMap<String, u64>,
    /// The routing version it serves by (edges), as it reports it; `null` when it
    /// reports none.
    #[serde(default)]
    pub routing_version: Option<u64>,
}

/// `POST /v1/edges/{node}/drain` and `.../undrain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainAck {
    /// The edge.
    pub node_id: String,
    /// Whether it is now drained.
    pub drained: bool,
}

/// `200` answer of `PUT /v1/routing`: the version the document got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingAck {
    /// Its version.
    pub version: u64,
    /// The control node that accepted it (of two documents with one version, the
    /// one accepted by the greater node id wins).
    pub by: String,
}

/// `GET /v1/routing`: the routing document this control node holds, and the
/// version each edge serves by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoutingView {
    /// Its version.
    pub version: u64,
    /// The control node that accepted it.
    pub by: String,
    /// The document.
    pub routing: Routing,
    /// Every edge that is not dead: the version it reports it serves by (0: none
    /// reported yet).
    pub edges: BTreeMap<String, u64>,
}

/// Every error answer: `{"error": "..."}`; a refused routing document also lists
/// every problem, each naming its field (`{"error": .., "problems": [..]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What was wrong.
    pub error: String,
    /// Each problem, as `field.path: what is wrong` (refused routing documents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn wire_format() {
        let status = PurgeStatus {
            id: "c1-7".into(),
            seq: 7,
            status: PurgeState::Complete,
            edges: BTreeMap::from([("us-east".to_string(), EdgeProgress::Applied)]),
            completed_ms: Some(12),
        };
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            json!({"id": "c1-7", "seq": 7, "status": "complete", "edges": {"us-east": "applied"}, "completed_ms": 12})
        );
        let back: PurgeStatus = serde_json::from_value(serde_json::to_value(&status).unwrap()).unwrap();
        assert_eq!(back, status);
        let node: NodeView = serde_json::from_value(json!({
            "node_id": "e1", "role": "edge", "region": "eu", "addr": "127.0.0.12", "gossip_addr": "127.0.0.12:7946",
            "admin_addr": null, "location": {"lat": 1.0, "lon": 2.0}, "state": "drained", "ready": true,
            "load": 0.5, "applied_seq": 3, "applied": {"c1": 3}
        }))
        .unwrap();
        assert_eq!((node.role, node.state, node.applied_seq), (Role::Edge, MemberState::Drained, 3));
        assert_eq!(node.routing_version, None, "absent in older answers");

        let view: RoutingView = serde_json::from_value(json!({
            "version": 2, "by": "c1", "edges": {"e1": 2, "e2": 0},
            "routing": {"sites": [{"name": "a", "hosts": ["a.test"], "origins": [{"url": "http://o"}]}]}
        }))
        .unwrap();
        assert_eq!((view.version, view.edges["e1"], view.routing.sites[0].origins[0].weight), (2, 2, 1));
        let plain = ApiError { error: "no".into(), problems: Vec::new() };
        assert_eq!(serde_json::to_value(&plain).unwrap(), json!({"error": "no"}));
        let refused = ApiError { error: "bad".into(), problems: vec!["sites[0].name: x".into()] };
        assert_eq!(serde_json::to_value(&refused).unwrap(), json!({"error": "bad", "problems": ["sites[0].name: x"]}));
    }
}
