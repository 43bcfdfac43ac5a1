//! Which edges answer a client: the nearest healthy ones by great-circle distance,
//! near-ties spread by weight.
//!
//! Pure: members, the client's location and a seed in, an ordered list out. The
//! seed (the server mixes the client's subnet with a query counter) drives a
//! deterministic weighted choice among edges within `near_radius_km` of the
//! nearest, so one edge does not take a whole continent while a farther edge idles.
//! When no edge is healthy, the least-bad ones answer (see [`Health`]).

use cdn_cluster::{GeoPoint, Member, MemberState, Role};

use crate::locate::ClientLocation;

/// Mean Earth radius, km.
const EARTH_RADIUS_KM: f64 = 6371.0;

/// Great-circle distance between two points, km (haversine formula).
pub fn haversine_km(a: GeoPoint, b: GeoPoint) -> f64 {
    let (lat1, lat2) = (a.lat.to_radians(), b.lat.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.lon - a.lon).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().clamp(0.0, 1.0).asin()
}

/// The address family asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// A records.
    V4,
    /// AAAA records.
    V6,
}

/// How an edge may be used, best first. Answers come from the best class that has
/// any edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Health {
    /// Alive, ready, not drained, under `max_load`.
    #[default]
    Healthy,
    /// Alive and ready but at or over `max_load`.
    Overloaded,
    /// Alive but not ready.
    NotReady,
    /// Drained by an operator, or suspected dead.
    Unavailable,
    /// Declared dead.
    Dead,
}

impl Health {
    /// Classifies `member` (an edge) against `max_load`.
    pub fn of(member: &Member, max_load: f64) -> Self {
        if member.serves_traffic(max_load) {
            return Self::Healthy;
        }
        match member.state {
            MemberState::Alive if member.ready => Self::Overloaded,
            MemberState::Alive => Self::NotReady,
            MemberState::Drained | MemberState::Suspect => Self::Unavailable,
            MemberState::Dead => Self::Dead,
        }
    }
}

/// The knobs of selection.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// How many edges to return.
    pub answers: usize,
    /// Edges this close to the nearest count as near-ties.
    pub near_radius_km: f64,
    /// Load at which an edge stops being healthy.
    pub max_load: f64,
}

/// The chosen edges, best first.
#[derive(Debug)]
pub struct Selection<'a> {
    /// At most `answers` edges.
    pub edges: Vec<&'a Member>,
    /// The health class they came from (`Healthy` unless every edge is worse).
    pub health: Health,
}

/// Picks the edges answering a client at `client` for `family`.
pub fn select<'a>(
    members: &'a [Member],
    client: &ClientLocation,
    family: Family,
    policy: &Policy,
    seed: u64,
) -> Selection<'a> {
    let plan = Plan::new(members, client, family, policy);
    let (mut drawn, mut scratch) = (Vec::new(), Vec::new());
    plan.draw(seed, &mut drawn, &mut scratch);
    Selection { edges: drawn.iter().map(|&at| &members[plan.order[at]]).collect(), health: plan.health }
}

/// The part of a selection that does not depend on the seed: the candidate edges
/// in their base order, and the runs of them that a seed orders by a weighted draw.
/// [`select`] is a plan and one [`draw`](Self::draw); the UDP fast path keeps the
/// plan per client location (until the member view changes) and only draws per
/// query.
#[derive(Debug, Clone, Default)]
pub(crate) struct Plan {
    /// Indices into the members the plan was made from, in base order.
    pub(crate) order: Vec<usize>,
    /// Each position's weight in its run (sanitized: finite and positive).
    weights: Vec<f64>,
    /// Weighted runs over `order`, in order and disjoint; positions outside them
    /// keep their base order.
    runs: Vec<Run>,
    /// The health class of every candidate (`Healthy` when there is none).
    pub(crate) health: Health,
    /// How many edges an answer carries.
    need: usize,
}

/// Positions `start..end` of a plan, of which the first `draws` places are drawn by
/// weight without replacement, the rest following in base order.
#[derive(Debug, Clone, Copy)]
struct Run {
    start: usize,
    end: usize,
    draws: usize,
}

impl Plan {
    /// Plans the selection for a client at `client` for `family`.
    pub(crate) fn new(members: &[Member], client: &ClientLocation, family: Family, policy: &Policy) -> Self {
        let mut plan = Self { need: policy.answers, ..Self::default() };
        let candidates: Vec<(usize, Health)> = members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Edge)
            .filter(|(_, m)| m.public_addr.is_some_and(|ip| ip.is_ipv4() == (family == Family::V4)))
            .map(|(i, m)| (i, Health::of(m, policy.max_load)))
            .collect();
        let Some(health) = candidates.iter().map(|(_, health)| *health).min() else {
            plan.health = Health::Healthy;
            return plan;
        };
        plan.health = health;
        let pool: Vec<usize> = candidates.into_iter().filter(|(_, h)| *h == health).map(|(i, _)| i).collect();
        let need = policy.answers;

        let home_region = client.region.as_deref().filter(|region| pool.iter().any(|&i| members[i].region == *region));
        match (home_region, client.point) {
            (Some(region), point) => {
                let (home, away): (Vec<usize>, Vec<usize>) =
                    pool.into_iter().partition(|&i| members[i].region == region);
                let anchor = point.or_else(|| centroid(&home.iter().map(|&i| &members[i]).collect::<Vec<_>>()));
                match point {
                    Some(point) => plan.by_distance(members, home, point, policy, need),
                    None => plan.spread(members, home, policy, need),
                }
                let placed = plan.order.len();
                if placed < need {
                    match anchor {
                        Some(anchor) => plan.by_distance(members, away, anchor, policy, need - placed),
                        None => plan.spread(members, away, policy, need - placed),
                    }
                }
            }
            (None, Some(point)) => plan.by_distance(members, pool, point, policy, need),
            (None, None) => plan.spread(members, pool, policy, need),
        }
        plan
    }

    /// Appends `edges` ordered by distance from `point`; those within the near
    /// radius of the nearest are drawn by weight (headroom, and somewhat by
    /// closeness).
    fn by_distance(&mut self, members: &[Member], edges: Vec<usize>, point: GeoPoint, policy: &Policy, need: usize) {
        let mut ranked: Vec<(f64, usize)> = edges
            .into_iter()
            .map(|i| (members[i].location.map_or(f64::INFINITY, |at| haversine_km(point, at)), i))
            .map(|(d, i)| (if d.is_nan() { f64::INFINITY } else { d }, i))
            .collect();
        ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| members[a.1].node_id.cmp(&members[b.1].node_id)));
        let Some(&(nearest, _)) = ranked.first() else { return };
        if nearest.is_infinite() {
            // Nobody has a location: distance cannot decide.
            self.spread(members, ranked.into_iter().map(|(_, i)| i).collect(), policy, need);
            return;
        }
        let radius = policy.near_radius_km.max(0.0);
        let split = ranked.iter().position(|(d, _)| *d > nearest + radius).unwrap_or(ranked.len());
        let start = self.order.len();
        for (at, &(d, i)) in ranked.iter().enumerate() {
            let weight = if at < split {
                let closeness = if radius > 0.0 { 1.0 - 0.5 * ((d - nearest) / radius).clamp(0.0, 1.0) } else { 1.0 };
                headroom(&members[i], policy.max_load) * closeness
            } else {
                1.0
            };
            self.push(i, weight);
        }
        self.runs.push(Run { start, end: start + split, draws: need });
    }

    /// Appends `edges` in a weighted random order (weight: headroom).
    fn spread(&mut self, members: &[Member], mut edges: Vec<usize>, policy: &Policy, need: usize) {
        edges.sort_by(|&a, &b| members[a].node_id.cmp(&members[b].node_id));
        let start = self.order.len();
        for i in edges {
            self.push(i, headroom(&members[i], policy.max_load));
        }
        self.runs.push(Run { start, end: self.order.len(), draws: need });
    }

    fn push(&mut self, member: usize, weight: f64) {
        self.order.push(member);
        self.weights.push(if weight.is_finite() && weight > 0.0 { weight } else { 1e-6 });
    }

    /// The answer for `seed`: positions in [`order`](Self::order), at most `need`
    /// of them, into `out` (`scratch` is working space; both are reused so that a
    /// draw allocates nothing once they have grown).
    pub(crate) fn draw(&self, seed: u64, out: &mut Vec<usize>, scratch: &mut Vec<(f64, usize)>) {
        out.clear();
        let mut rng = SplitMix64(seed);
        let mut next = 0;
        for run in &self.runs {
            if out.len() >= self.need {
                break;
            }
            out.extend(next..run.start);
            // Draws up to `draws` places, each with probability proportional to its
            // weight; the rest follow in base order.
            scratch.clear();
            scratch.extend((run.start..run.end).map(|at| (self.weights[at], at)));
            let mut drawn = 0;
            while !scratch.is_empty() && drawn < run.draws {
                let total: f64 = scratch.iter().map(|(w, _)| w).sum();
                let mut target = rng.next_f64() * total;
                let mut pick = scratch.len() - 1;
                for (i, (w, _)) in scratch.iter().enumerate() {
                    if target < *w {
                        pick = i;
                        break;
                    }
                    target -= w;
                }
                out.push(scratch.remove(pick).1);
                drawn += 1;
            }
            out.extend(scratch.iter().map(|(_, at)| *at));
            next = run.end;
        }
        if out.len() < self.need {
            out.extend(next..self.order.len());
        }
        out.truncate(self.need);
    }
}

/// Spare capacity as a weight: an idle edge weighs 1, one at `max_load` 0.05.
fn headroom(member: &Member, max_load: f64) -> f64 {
    let spare = max_load - member.load;
    if spare.is_finite() { spare.clamp(0.05, 1.0) } else { 0.05 }
}

/// The mean position of the members that have one (on the sphere).
fn centroid(members: &[&Member]) -> Option<GeoPoint> {
    let (mut x, mut y, mut z, mut n) = (0.0, 0.0, 0.0, 0u32);
    for point in members.iter().filter_map(|m| m.location) {
        let (lat, lon) = (point.lat.to_radians(), point.lon.to_radians());
        x += lat.cos() * lon.cos();
        y += lat.cos() * lon.sin();
        z += lat.sin();
        n += 1;
    }
    let norm = (x * x + y * y + z * z).sqrt();
    if n == 0 || !norm.is_finite() || norm < 1e-9 {
        return None;
    }
    Some(GeoPoint { lat: (z / norm).asin().to_degrees(), lon: y.atan2(x).to_degrees() })
}

/// A small deterministic generator (SplitMix64): the seed fully decides the spread.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The SplitMix64 finaliser: a good 64-bit hash of `x`.
pub(crate) fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {

    /// The selection as it was before [`Plan`]: the reference the plan must match.
    mod reference {
        use super::super::*;

        /// Picks the edges answering a client at `client` for `family`.
        pub(super) fn select<'a>(
            members: &'a [Member],
            client: &ClientLocation,
            family: Family,
            policy: &Policy,
            seed: u64,
        ) -> Selection<'a> {
            let candidates: Vec<(&Member, Health)> = members
                .iter()
                .filter(|m| m.role == Role::Edge)
                .filter(|m| m.public_addr.is_some_and(|ip| ip.is_ipv4() == (family == Family::V4)))
                .map(|m| (m, Health::of(m, policy.max_load)))
                .collect();
            let Some(health) = candidates.iter().map(|(_, health)| *health).min() else {
                return Selection { edges: Vec::new(), health: Health::Healthy };
            };
            let pool: Vec<&Member> = candidates.into_iter().filter(|(_, h)| *h == health).map(|(m, _)| m).collect();
            let need = policy.answers;
            let mut rng = SplitMix64(seed);

            let home_region = client.region.as_deref().filter(|region| pool.iter().any(|m| m.region == *region));
            let mut edges = match (home_region, client.point) {
                (Some(region), point) => {
                    let (home, away): (Vec<&Member>, Vec<&Member>) = pool.into_iter().partition(|m| m.region == region);
                    let anchor = point.or_else(|| centroid(&home));
                    let mut edges = match point {
                        Some(point) => by_distance(home, point, policy, need, &mut rng),
                        None => spread(home, |m| headroom(m, policy.max_load), need, &mut rng),
                    };
                    if edges.len() < need {
                        edges.extend(match anchor {
                            Some(anchor) => by_distance(away, anchor, policy, need - edges.len(), &mut rng),
                            None => spread(away, |m| headroom(m, policy.max_load), need - edges.len(), &mut rng),
                        });
                    }
                    edges
                }
                (None, Some(point)) => by_distance(pool, point, policy, need, &mut rng),
                (None, None) => spread(pool, |m| headroom(m, policy.max_load), need, &mut rng),
            };
            edges.truncate(need);
            Selection { edges, health }
        }

        /// Spare capacity as a weight: an idle edge weighs 1, one at `max_load` 0.05.
        fn headroom(member: &Member, max_load: f64) -> f64 {
            let spare = max_load - member.load;
            if spare.is_finite() { spare.clamp(0.05, 1.0) } else { 0.05 }
        }

        /// `members` ordered by distance from `point`; those within the near radius of the
        /// nearest are spread by weight (headroom, and somewhat by closeness).
        fn by_distance<'a>(
            members: Vec<&'a Member>,
            point: GeoPoint,
            policy: &Policy,
            need: usize,
            rng: &mut SplitMix64,
        ) -> Vec<&'a Member> {
            let mut ranked: Vec<(f64, &Member)> = members
                .into_iter()
                .map(|m| (m.location.map_or(f64::INFINITY, |at| haversine_km(point, at)), m))
                .map(|(d, m)| (if d.is_nan() { f64::INFINITY } else { d }, m))
                .collect();
            ranked.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.node_id.cmp(&b.1.node_id)));
            let Some(&(nearest, _)) = ranked.first() else { return Vec::new() };
            if nearest.is_infinite() {
                // Nobody has a location: distance cannot decide.
                return spread(
                    ranked.into_iter().map(|(_, m)| m).collect(),
                    |m| headroom(m, policy.max_load),
                    need,
                    rng,
                );
            }
            let radius = policy.near_radius_km.max(0.0);
            let split = ranked.iter().position(|(d, _)| *d > nearest + radius).unwrap_or(ranked.len());
            let far = ranked.split_off(split);
            let near_weights: Vec<f64> = ranked
                .iter()
                .map(|(d, m)| {
                    let closeness =
                        if radius > 0.0 { 1.0 - 0.5 * ((d - nearest) / radius).clamp(0.0, 1.0) } else { 1.0 };
                    headroom(m, policy.max_load) * closeness
                })
                .collect();
            let near: Vec<&Member> = ranked.into_iter().map(|(_, m)| m).collect();
            let mut edges = weighted_order(near, &near_weights, need, rng);
            edges.extend(far.into_iter().map(|(_, m)| m));
            edges
        }

        /// `members` in a weighted random order (only the first `need` places are drawn).
        fn spread<'a>(
            members: Vec<&'a Member>,
            weight: impl Fn(&Member) -> f64,
            need: usize,
            rng: &mut SplitMix64,
        ) -> Vec<&'a Member> {
            let mut members = members;
            members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            let weights: Vec<f64> = members.iter().map(|m| weight(m)).collect();
            weighted_order(members, &weights, need, rng)
        }

        /// Draws up to `need` members without replacement, each with probability
        /// proportional to its weight; the rest follow in their given order.
        fn weighted_order<'a>(
            members: Vec<&'a Member>,
            weights: &[f64],
            need: usize,
            rng: &mut SplitMix64,
        ) -> Vec<&'a Member> {
            let mut pool: Vec<(f64, &Member)> = members
                .into_iter()
                .zip(weights.iter().copied().chain(std::iter::repeat(1.0)))
                .map(|(m, w)| (if w.is_finite() && w > 0.0 { w } else { 1e-6 }, m))
                .collect();
            let mut out = Vec::with_capacity(pool.len());
            while !pool.is_empty() && out.len() < need {
                let total: f64 = pool.iter().map(|(w, _)| w).sum();
                let mut target = rng.next_f64() * total;
                let mut pick = pool.len() - 1;
                for (i, (w, _)) in pool.iter().enumerate() {
                    if target < *w {
                        pick = i;
                        break;
                    }
                    target -= w;
                }
                out.push(pool.remove(pick).1);
            }
            out.extend(pool.into_iter().map(|(_, m)| m));
            out
        }
    }
    use std::{
        collections::HashMap,
        net::{IpAddr, SocketAddr},
    };

    use super::*;

    const NYC: GeoPoint = GeoPoint { lat: 40.71, lon: -74.01 };
    const WASHINGTON: GeoPoint = GeoPoint { lat: 38.90, lon: -77.04 };
    const DUBLIN: GeoPoint = GeoPoint { lat: 53.35, lon: -6.26 };
    const LONDON: GeoPoint = GeoPoint { lat: 51.51, lon: -0.13 };
    const MUMBAI: GeoPoint = GeoPoint { lat: 19.08, lon: 72.88 };

    fn edge(id: &str, region: &str, at: GeoPoint, ip: &str) -> Member {
        Member {
            node_id: id.into(),
            role: Role::Edge,
            region: region.into(),
            location: Some(at),
            public_addr: Some(ip.parse::<IpAddr>().unwrap()),
            admin_addr: None,
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            state: MemberState::Alive,
            ready: true,
            load: 0.1,
        }
    }

    fn three() -> Vec<Member> {
        vec![
            edge("us-east-1", "us-east", NYC, "127.0.0.11"),
            edge("eu-west-1", "eu-west", DUBLIN, "127.0.0.12"),
            edge("ap-south-1", "ap-south", MUMBAI, "127.0.0.13"),
        ]
    }

    const POLICY: Policy = Policy { answers: 2, near_radius_km: 500.0, max_load: 0.9 };

    fn ids<'a>(selection: &Selection<'a>) -> Vec<&'a str> {
        selection.edges.iter().map(|m| m.node_id.as_str()).collect()
    }

    #[test]
    fn haversine_distances() {
        assert!(haversine_km(NYC, NYC).abs() < 1e-9);
        let nyc_london = haversine_km(NYC, LONDON);
        assert!((nyc_london - 5570.0).abs() < 20.0, "{nyc_london}");
        assert!((haversine_km(LONDON, NYC) - nyc_london).abs() < 1e-9);
        let antipode = haversine_km(GeoPoint { lat: 0.0, lon: 0.0 }, GeoPoint { lat: 0.0, lon: 180.0 });
        assert!((antipode - std::f64::consts::PI * EARTH_RADIUS_KM).abs() < 1e-6);
        let dateline = haversine_km(GeoPoint { lat: 0.0, lon: 179.5 }, GeoPoint { lat: 0.0, lon: -179.5 });
        assert!((dateline - 111.2).abs() < 0.5, "{dateline}");
        assert!(haversine_km(GeoPoint { lat: f64::NAN, lon: 0.0 }, NYC).is_nan());
    }

    #[test]
    fn nearest_first_for_each_region() {
        let members = three();
        for (point, first, second) in [
            (WASHINGTON, "us-east-1", "eu-west-1"),
            (LONDON, "eu-west-1", "us-east-1"),
            (MUMBAI, "ap-south-1", "eu-west-1"),
        ] {
            for seed in 0..50 {
                let s = select(&members, &ClientLocation::at(point), Family::V4, &POLICY, seed);
                assert_eq!(ids(&s), [first, second]);
                assert_eq!(s.health, Health::Healthy);
            }
        }
        let all = Policy { answers: 10, ..POLICY };
        let s = select(&members, &ClientLocation::at(LONDON), Family::V4, &all, 0);
        assert_eq!(ids(&s), ["eu-west-1", "us-east-1", "ap-south-1"]);
    }

    #[test]
    fn near_ties_are_spread_by_weight() {
        let mut members = three();
        members.push(edge("eu-west-2", "eu-west", LONDON, "127.0.0.14"));
        let client = ClientLocation::at(GeoPoint { lat: 52.5, lon: -3.0 }); // between Dublin and London
        let mut firsts: HashMap<&str, u32> = HashMap::new();
        for seed in 0..2000 {
            let s = select(&members, &client, Family::V4, &POLICY, seed);
            *firsts.entry(s.edges[0].node_id.as_str()).or_default() += 1;
            assert!(ids(&s).iter().all(|id| id.starts_with("eu-west")), "{:?}", ids(&s));
        }
        assert!(firsts["eu-west-1"] > 600 && firsts["eu-west-2"] > 600, "{firsts:?}");
        // A loaded edge gets a much smaller share.
        members[3].load = 0.85;
        let mut loaded = 0;
        for seed in 0..2000 {
            if select(&members, &client, Family::V4, &POLICY, seed).edges[0].node_id == "eu-west-2" {
                loaded += 1;
            }
        }
        assert!(loaded < 200, "{loaded}");
        // The same seed gives the same answer.
        let a = select(&members, &client, Family::V4, &POLICY, 42);
        let b = select(&members, &client, Family::V4, &POLICY, 42);
        assert_eq!(ids(&a), ids(&b));
        // Without a radius only exact ties spread.
        let strict = Policy { near_radius_km: 0.0, ..POLICY };
        for seed in 0..100 {
            let s = select(&members, &ClientLocation::at(DUBLIN), Family::V4, &strict, seed);
            assert_eq!(s.edges[0].node_id, "eu-west-1");
        }
    }

    #[test]
    fn unhealthy_edges_leave_and_least_bad_answer_when_none_is_healthy() {
        let mut members = three();
        let client = ClientLocation::at(LONDON);
        members[1].state = MemberState::Drained;
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!(ids(&s), ["us-east-1", "ap-south-1"]);
        members[0].load = 0.95;
        members[2].ready = false;
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!((ids(&s), s.health), (vec!["us-east-1"], Health::Overloaded));
        members[0].state = MemberState::Dead;
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!((ids(&s), s.health), (vec!["ap-south-1"], Health::NotReady));
        members[2].state = MemberState::Suspect;
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!((ids(&s), s.health), (vec!["eu-west-1", "ap-south-1"], Health::Unavailable));
        for member in &mut members {
            member.state = MemberState::Dead;
        }
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!((ids(&s), s.health), (vec!["eu-west-1", "us-east-1"], Health::Dead));
        members[2].load = f64::NAN;
        members[2].state = MemberState::Alive;
        members[2].ready = true;
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!((ids(&s), s.health), (vec!["ap-south-1"], Health::Overloaded));
    }

    #[test]
    fn families_roles_and_missing_locations() {
        let mut members = three();
        members.push(edge("eu-west-6", "eu-west", DUBLIN, "2001:db8::12"));
        let mut origin = edge("origin", "eu-west", DUBLIN, "127.0.0.20");
        origin.role = Role::Origin;
        members.push(origin);
        let client = ClientLocation::at(DUBLIN);
        let s = select(&members, &client, Family::V6, &POLICY, 0);
        assert_eq!(ids(&s), ["eu-west-6"]);
        let s = select(&members, &client, Family::V4, &Policy { answers: 10, ..POLICY }, 0);
        assert_eq!(s.edges.len(), 3, "no origin, no IPv6 in A answers");
        assert!(select(&members[..3], &client, Family::V6, &POLICY, 0).edges.is_empty());
        assert!(select(&[], &client, Family::V4, &POLICY, 0).edges.is_empty());
        // Edges without a location sort last; with none located, they are spread.
        let mut members = three();
        members[1].location = None;
        let s = select(&members, &ClientLocation::at(LONDON), Family::V4, &Policy { answers: 3, ..POLICY }, 0);
        assert_eq!(ids(&s)[2], "eu-west-1");
        for member in &mut members {
            member.location = None;
        }
        let s = select(&members, &ClientLocation::at(LONDON), Family::V4, &POLICY, 0);
        assert_eq!(s.edges.len(), 2);
    }

    #[test]
    fn regions_come_first_and_unknown_clients_spread() {
        let members = three();
        // A client in NYC assigned to eu-west gets eu-west first, then the nearest.
        let client = ClientLocation { point: Some(NYC), region: Some("eu-west".into()) };
        let s = select(&members, &client, Family::V4, &POLICY, 0);
        assert_eq!(ids(&s), ["eu-west-1", "us-east-1"]);
        // A region without a point: that region, then by distance from its edges.
        let s = select(&members, &ClientLocation::in_region("ap-south"), Family::V4, &POLICY, 7);
        assert_eq!(ids(&s), ["ap-south-1", "eu-west-1"]);
        // An unknown region (and no point): spread over everything.
        let mut firsts: HashMap<String, u32> = HashMap::new();
        for seed in 0..900 {
            let s = select(&members, &ClientLocation::in_region("mars"), Family::V4, &POLICY, seed);
            assert_eq!(s.edges.len(), 2);
            *firsts.entry(s.edges[0].node_id.clone()).or_default() += 1;
        }
        assert_eq!(firsts.len(), 3);
        assert!(firsts.values().all(|n| *n > 200), "{firsts:?}");
        let s = select(&members, &ClientLocation::default(), Family::V4, &POLICY, 1);
        assert_eq!(s.edges.len(), 2);
    }

    #[test]
    fn centroid_of_edges() {
        let a = edge("a", "r", GeoPoint { lat: 0.0, lon: 10.0 }, "127.0.0.1");
        let b = edge("b", "r", GeoPoint { lat: 0.0, lon: 20.0 }, "127.0.0.2");
        let c = centroid(&[&a, &b]).unwrap();
        assert!(c.lat.abs() < 1e-9 && (c.lon - 15.0).abs() < 1e-9, "{c:?}");
        let d = edge("d", "r", GeoPoint { lat: 0.0, lon: -170.0 }, "127.0.0.3");
        assert!(centroid(&[&d, &edge("e", "r", GeoPoint { lat: 0.0, lon: 10.0 }, "127.0.0.4")]).is_none());
        assert!(centroid(&[]).is_none());
    }

    /// A varied cluster: 40 edges over five regions, IPv4 and IPv6, some without a
    /// location, some unhealthy, loads from idle to over the limit, plus non-edges.
    fn varied() -> Vec<Member> {
        let regions =
            [("us-east", NYC), ("eu-west", DUBLIN), ("eu-west", LONDON), ("ap-south", MUMBAI), ("us-east", WASHINGTON)];
        let mut members: Vec<Member> = (0..40u8)
            .map(|i| {
                let (region, at) = regions[usize::from(i) % regions.len()];
                let ip = if i % 3 == 0 { format!("2001:db8::{i}") } else { format!("127.0.1.{i}") };
                let offset = f64::from(i) / 7.0;
                let mut m = edge(
                    &format!("{region}-{i}"),
                    region,
                    GeoPoint { lat: at.lat + offset, lon: at.lon - offset },
                    &ip,
                );
                m.location = (i % 11 != 7).then_some(m.location.unwrap());
                m.state = match i % 9 {
                    4 => MemberState::Dead,
                    6 => MemberState::Drained,
                    8 => MemberState::Suspect,
                    _ => MemberState::Alive,
                };
                m.ready = i % 10 != 3;
                m.load = if i % 8 == 5 { 0.95 } else { f64::from(i % 5) / 10.0 };
                m
            })
            .collect();
        let mut origin = edge("origin", "eu-west", DUBLIN, "127.0.0.20");
        origin.role = Role::Origin;
        members.push(origin);
        members
    }

    #[test]
    fn plans_draw_what_the_reference_selection_picks() {
        let clients = [
            ClientLocation::at(NYC),
            ClientLocation::at(LONDON),
            ClientLocation::at(GeoPoint { lat: -33.9, lon: 151.2 }),
            ClientLocation { point: Some(MUMBAI), region: Some("eu-west".into()) },
            ClientLocation::in_region("us-east"),
            ClientLocation::in_region("mars"),
            ClientLocation::default(),
        ];
        let mut clusters = vec![varied(), three(), Vec::new()];
        let mut dead = varied();
        for member in &mut dead {
            member.state = MemberState::Dead;
        }
        clusters.push(dead);
        let mut unlocated = varied();
        for member in &mut unlocated {
            member.location = None;
        }
        clusters.push(unlocated);
        let mut compared = 0;
        for members in &clusters {
            for client in &clients {
                for family in [Family::V4, Family::V6] {
                    for answers in [1, 2, 3, 20, 64] {
                        for near_radius_km in [0.0, 500.0, 3000.0, 20_000.0] {
                            let policy = Policy { answers, near_radius_km, max_load: 0.9 };
                            for seed in 0..40u64 {
                                let seed = mix64(seed);
                                let got = select(members, client, family, &policy, seed);
                                let want = reference::select(members, client, family, &policy, seed);
                                assert_eq!(ids(&got), ids(&want), "{client:?} {family:?} {policy:?} {seed}");
                                assert_eq!(got.health, want.health);
                                compared += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(compared > 10_000);
    }

    #[test]
    fn one_plan_many_draws() {
        let members = three();
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        // Nearest first and no near tie: every seed gives the same answer.
        let plan = Plan::new(&members, &ClientLocation::at(LONDON), Family::V4, &POLICY);
        let mut seen = std::collections::HashSet::new();
        for seed in 0..100 {
            plan.draw(mix64(seed), &mut out, &mut scratch);
            seen.insert(out.iter().map(|&at| members[plan.order[at]].node_id.clone()).collect::<Vec<_>>());
        }
        assert_eq!(seen.len(), 1);
        assert_eq!(seen.into_iter().next().unwrap(), ["eu-west-1", "us-east-1"]);
        // Nowhere in particular: spread over all three, two at a time.
        let plan = Plan::new(&members, &ClientLocation::default(), Family::V4, &POLICY);
        let mut firsts = std::collections::HashSet::new();
        for seed in 0..100 {
            plan.draw(mix64(seed), &mut out, &mut scratch);
            assert_eq!(out.len(), 2);
            firsts.insert(out[0]);
        }
        assert_eq!(firsts.len(), 3);
        // No candidate: nothing drawn.
        let plan = Plan::new(&members, &ClientLocation::at(LONDON), Family::V6, &POLICY);
        plan.draw(1, &mut out, &mut scratch);
        assert!(out.is_empty());
    }
}
