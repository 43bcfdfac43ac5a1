//! The cluster: gossip membership and per-node state (chitchat), joined by every role.
//!
//! # Layout
//! - [`member`]: the view of one node ([`Member`]).

pub mod member;

pub use member::{GeoPoint, Member, MemberState, Role};
