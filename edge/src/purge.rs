//! Applying purges that arrive through gossip.
//!
//! Control nodes publish purge records and a floor, the oldest record they still
//! hold ([`Cluster::purges`]). The edge applies each control node's records in
//! sequence order, exactly once, publishes what it applied ([`Cluster::set_applied`])
//! and pushes that back to the control node at once. An edge whose last applied
//! purge is older than a control node's floor has missed purges that were collected:
//! it drops its whole cache (correct, if costly) and says so.
//!
//! With a disk tier, what was applied is persisted beside the cache (after the
//! purges reached the files: [`Disks::persist`](crate::cache::disk::Disks::persist)),
//! so a restarted edge starts from there and replays exactly the purges it may
//! have missed; the disk serves lookups only once that replay is done.

use std::{collections::HashMap, sync::Arc, time::Duration};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use cdn_cluster::{
    Cluster, MemberState, Role, now_ms,
    purge::Target,
    state::{Purges, Topic},
};
use cdn_node::admin::Readiness;

use crate::cache::Cache;

/// Purge metrics of an edge.
#[derive(Clone)]
pub(crate) struct PurgeMetrics {
    applied: IntCounter,
    applied_seq: IntGaugeVec,
    lag: Histogram,
    flushes: IntCounter,
}

impl PurgeMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let applied = IntCounter::new("cdn_purges_applied_total", "Purges applied by this edge")?;
        let lag = Histogram::with_opts(
            HistogramOpts::new("cdn_purge_lag_seconds", "Time from purge acceptance to application here")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let flushes = IntCounter::new(
            "cdn_purge_flushes_total",
            "Whole-cache drops because purges were missed beyond the retained log",
        )?;
        let applied_seq = IntGaugeVec::new(
            Opts::new(
                "cdn_purge_applied_seq",
                "The last purge sequence applied, per control node (kept across restarts with a disk tier)",
            ),
            &["control"],
        )?;
        registry.register(Box::new(applied.clone()))?;
        registry.register(Box::new(applied_seq.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(flushes.clone()))?;
        Ok(Self { applied, applied_seq, lag, flushes })
    }
}

/// Applies purges from every control node until `shutdown`. The edge is not ready
/// from this call on, not from the task's first poll: until then `/readyz` could
/// say ready (every other condition holding) while the disk tier is still closed
/// and the purges missed while down are not applied.
pub(crate) fn run(
    cluster: Arc<Cluster>,
    cache: Arc<Cache>,
    metrics: PurgeMetrics,
    readiness: Readiness,
    published: tokio::sync::watch::Sender<HashMap<String, u64>>,
    announced: tokio::sync::watch::Sender<HashMap<String, u64>>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static {
    readiness.set("purges", false);
    apply_until(cluster, cache, metrics, readiness, published, announced, shutdown)
}

async fn apply_until(
    cluster: Arc<Cluster>,
    cache: Arc<Cache>,
    metrics: PurgeMetrics,
    readiness: Readiness,
    published: tokio::sync::watch::Sender<HashMap<String, u64>>,
    announced: tokio::sync::watch::Sender<HashMap<String, u64>>,
    shutdown: CancellationToken,
) {
    let mut events = cluster.subscribe(Topic::Purges).await;
    let mut applied: HashMap<String, u64> = cache.disks().map(|disks| disks.applied()).unwrap_or_default();
    if !applied.is_empty() {
        info!(?applied, "purges applied before the restart");
    }
    for (control, seq) in &applied {
        metrics.applied_seq.with_label_values(&[control]).set(i64::try_from(*seq).unwrap_or(i64::MAX));
    }
    // Never applied a purge: nothing on disk can be stale by one we missed... unless
    // a control node we never heard of purged meanwhile; that is what the wait for
    // the first catch-up below is for, bounded like readiness.
    let persisted_none = applied.is_empty();
    let (persist, persisted) = tokio::sync::watch::channel(applied.clone());
    let persister = cache.disks().is_some().then(|| tokio::spawn(persist_applied(cache.clone(), persisted)));
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            event = events.recv() => if event.is_none() { break },
            _ = tick.tick() => {}
        }
        // Drain whatever else arrived, then apply from the full state (anti-entropy
        // and events converge on the same code).
        while events.try_recv().is_some() {}
        let synced = apply_pending(&cluster, &cache, &metrics, &mut applied, &announced).await;
        if *persist.borrow() != applied {
            persist.send_replace(applied.clone());
        }
        if *announced.borrow() != applied {
            announced.send_replace(applied.clone());
        }
        if *published.borrow() != applied {
            published.send_replace(applied.clone());
        }
        // Ready once caught up with every live control node; with none in sight
        // after a while, serve anyway (an edge must not stay dark without control).
        let waited = started.elapsed() > Duration::from_secs(5);
        // The disk first: a request that comes as soon as the edge says ready finds
        // what is on disk.
        if let Some(disks) = cache.disks()
            && (synced || (waited && persisted_none))
        {
            disks.set_open();
        }
        readiness.set("purges", synced || waited);
    }
    // The persister records the last state and ends when its sender is gone.
    drop(persist);
    if let Some(persister) = persister {
        let _ = persister.await;
    }
}

/// Records the purges applied on disk whenever they change (the newest wins).
async fn persist_applied(cache: Arc<Cache>, mut applied: tokio::sync::watch::Receiver<HashMap<String, u64>>) {
    while applied.changed().await.is_ok() {
        let latest = applied.borrow_and_update().clone();
        if let Some(disks) = cache.disks() {
            disks.persist(&latest).await;
        }
    }
}

/// Applies every purge not yet applied; `true` when caught up with at least one
/// live control node and no record is missing.
async fn apply_pending(
    cluster: &Cluster,
    cache: &Cache,
    metrics: &PurgeMetrics,
    applied: &mut HashMap<String, u64>,
    announced: &tokio::sync::watch::Sender<HashMap<String, u64>>,
) -> bool {
    let controls: Vec<String> = cluster
        .members()
        .iter()
        .filter(|m| m.role == Role::Control && m.state != MemberState::Dead)
        .map(|m| m.node_id.clone())
        .collect();
    if controls.is_empty() {
        return false;
    }
    let mut purges = cluster.purges().await;
    let mut caught_up = true;
    for control in &controls {
        let Some(Purges { floor: Some(floor), records: held }) = purges.remove(control) else {
            caught_up = false; // not heard from it yet
            continue;
        };
        let mut done = applied.get(control).copied().unwrap_or(0);
        let before = done;
        if held.last_key_value().is_some_and(|(&last, _)| last < done) {
            // The control node's log starts over (its data was lost): what it
            // accepted meanwhile cannot be told apart, so start over too.
            warn!(control, applied = done, "the control node's purge log restarted: dropping the whole cache");
            metrics.flushes.inc();
            cache.purge(&Target::everything(), false);
            done = 0;
        }
        if done + 1 < floor {
            // Purges between `done` and `floor` were collected before we saw them.
            if done > 0 || !held.is_empty() || floor > 1 {
                warn!(
                    control,
                    applied = done,
                    floor,
                    "missed purges beyond the retained log: dropping the whole cache"
                );
                metrics.flushes.inc();
                cache.purge(&Target::everything(), false);
            }
            done = floor - 1;
        }
        for (seq, record) in held.range(done + 1..) {
            if *seq != done + 1 {
                caught_up = false; // a gap: wait for the missing record
                break;
            }
            // Announced before it is applied: a fill that starts from here on asks
            // other edges for an answer that includes this purge (`cdn-purged`); one
            // that started before is not stored (the purge's epoch). Other edges are
            // told this edge has applied it (`published`) only after.
            announced.send_modify(|announced| {
                announced.insert(control.clone(), *seq);
            });
            cache.purge(&record.target, record.soft);
            metrics.applied.inc();
            let lag_ms = now_ms().saturating_sub(record.created_ms);
            metrics.lag.observe(lag_ms as f64 / 1000.0);
            debug!(id = %record.id, lag_ms, "purge applied");
            done = *seq;
        }
        if done != before || !applied.contains_key(control) {
            applied.insert(control.clone(), done);
            metrics.applied_seq.with_label_values(&[control]).set(i64::try_from(done).unwrap_or(i64::MAX));
            cluster.set_applied(control, done).await;
            // Tell the control node now rather than at the next gossip round.
            if let Some(member) = cluster.members().iter().find(|m| &m.node_id == control) {
                cluster.push_to(member.gossip_addr);
            }
            if done != before {
                info!(control, applied = done, "purges applied");
            }
        }
    }
    caught_up
}

#[cfg(test)]
pub(crate) mod tests {
    use cdn_cluster::{ClusterConfig, NodeInfo};
    use prometheus::Registry;

    use super::*;

    /// A one-edge cluster on loopback, stopped with `shutdown`.
    pub(crate) async fn test_cluster(shutdown: &CancellationToken) -> Arc<Cluster> {
        let config = ClusterConfig::new("127.0.0.1:0".parse().unwrap(), "a-shared-secret-of-enough-bytes");
        let node = NodeInfo {
            node_id: "e".into(),
            role: Role::Edge,
            region: None,
            location: None,
            public_addr: None,
            admin: None,
        };
        Cluster::join(&config, node, &Registry::new(), shutdown.clone()).await.unwrap()
    }

    /// Not ready from the start of the purge task, not from its first poll: in
    /// between, every other condition may hold while the disk tier is still closed.
    #[tokio::test]
    async fn the_edge_is_not_ready_from_the_start_of_the_purge_task() {
        let shutdown = CancellationToken::new();
        let cluster = test_cluster(&shutdown).await;
        let readiness = Readiness::new();
        let metrics = PurgeMetrics::register(&Registry::new()).unwrap();
        let cache = Arc::new(Cache::new(1 << 20, None));
        let (published, announced) =
            (tokio::sync::watch::channel(HashMap::new()).0, tokio::sync::watch::channel(HashMap::new()).0);
        let task = run(cluster.clone(), cache, metrics, readiness.clone(), published, announced, shutdown.clone());
        assert_eq!(readiness.failing(), ["purges"], "not ready before the task first runs");
        drop(task);
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), cluster.stopped()).await.expect("the cluster stops");
    }
}
