//! The edge's cache: the one owner of what is stored and of what is being fetched.
//!
//! [`Cache`] holds the store (moka, bounded in bytes), the fills in flight (one per
//! key: concurrent misses join it), the purge epoch and the "hit-for-pass" marks.
//! Two tiers: memory (moka, bounded in bytes) over the optional disk tier
//! ([`disk`]): every entry stored is written to disk too, a memory miss reads the
//! disk and promotes what it finds (moka's admission decides whether it stays).
//!
//! Requests go through [`Cache::lookup`] and [`Cache::join_or_start`]; every purge,
//! from gossip or from an unsafe request, goes through [`Cache::purge`] or
//! [`Cache::invalidate_url`] — nothing else changes what is stored except the fills
//! (`crate::fetch`) writing what they fetched.
//!
//! # Layout
//! - [`store`]: stored objects, Vary variants, sliced objects and their slices.
//! - [`disk`]: the disk tier (cache files, their index, restart, purges on disk).
//! - [`flight`]: a fill in flight and what it produced ([`Fill`], [`Outcome`]).
//! - [`status`]: the `Cache-Status` (RFC 9211) and `X-Cache` of a response, typed.

pub(crate) mod disk;
pub(crate) mod flight;
pub(crate) mod status;
pub(crate) mod store;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use cdn_cluster::purge::Target;
use cdn_http::key;
use http::{HeaderMap, HeaderValue};

use self::{
    disk::Disks,
    store::{Entry, Slice, Store},
};
pub(crate) use self::{
    flight::{Fill, Outcome},
    store::{Found, Head, Object, Sliced},
};

/// Where a lookup found its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tier {
    Memory,
    Disk,
}

/// How long a key found uncacheable skips coalescing.
const PASS_TTL: Duration = Duration::from_secs(30);

/// A request's place in a fill: it started it (and the caller runs it) or joined one.
pub(crate) enum Flight {
    /// This request started the fill: the caller must run it and then call
    /// [`Cache::land`].
    Leader(Arc<Fill>),
    /// A fill for the key is already under way.
    Follower(Arc<Fill>),
}

impl Flight {
    /// The fill, whoever runs it.
    pub(crate) fn fill(&self) -> &Arc<Fill> {
        match self {
            Self::Leader(fill) | Self::Follower(fill) => fill,
        }
    }
}

/// Everything the edge stores and everything it is fetching.
pub(crate) struct Cache {
    store: Store,
    /// Fills under way, by key (primary keys, and slice keys with their validator).
    inflight: Mutex<HashMap<String, Arc<Fill>>>,
    /// Keys recently found uncacheable: requests for them skip coalescing.
    pass_marks: moka::sync::Cache<String, ()>,
    /// Bumped by every purge: a fill that started before a purge is not stored.
    epoch: Arc<AtomicU64>,
    /// The disk tier, if configured.
    disks: Option<Disks>,
}

impl Cache {
    /// A cache holding at most `max_bytes` in memory (weights of bodies, heads and
    /// keys), over `disks` when given.
    pub(crate) fn new(max_bytes: u64, disks: Option<Disks>) -> Self {
        Self {
            store: Store::new(max_bytes),
            inflight: Mutex::default(),
            pass_marks: moka::sync::Cache::builder().max_capacity(100_000).time_to_live(PASS_TTL).build(),
            epoch: Arc::default(),
            disks,
        }
    }

    /// The disk tier, if configured.
    pub(crate) fn disks(&self) -> Option<&Disks> {
        self.disks.as_ref()
    }

    /// The stored response for `key` matching the request's headers (Vary): from
    /// memory, else from disk (promoted to memory).
    pub(crate) async fn lookup(&self, key: &str, request: &HeaderMap) -> Option<(Found, Tier)> {
        if let Some(found) = self.store.lookup(key, request).await {
            return Some((found, Tier::Memory));
        }
        let disks = self.disks.as_ref().filter(|disks| disks.is_open())?;
        let start = self.epoch();
        let names = match self.store.get(key).await {
            Some(Entry::Vary(names)) => names,
            Some(_) => return None,
            None => match disks.load(key, start, &self.epoch).await? {
                Entry::Object(object) if object.head.vary.is_empty() => {
                    self.promote(key.to_string(), Entry::Object(object.clone()), start).await?;
                    return Some((Found::Object(object), Tier::Disk));
                }
                Entry::Sliced(sliced) => {
                    self.promote(key.to_string(), Entry::Sliced(sliced.clone()), start).await?;
                    return Some((Found::Sliced(sliced), Tier::Disk));
                }
                Entry::Vary(names) => {
                    self.promote(key.to_string(), Entry::Vary(names.clone()), start).await?;
                    names
                }
                Entry::Object(_) | Entry::Slice(_) => return None,
            },
        };
        let values = key::vary_values(&names, request);
        let variant = key::variant(key, &values);
        match disks.load(&variant, start, &self.epoch).await? {
            Entry::Object(object) if object.head.vary == values => {
                self.promote(variant, Entry::Object(object.clone()), start).await?;
                Some((Found::Object(object), Tier::Disk))
            }
            _ => None,
        }
    }

    /// The whole object stored in memory under `key`, when it does not vary: what
    /// [`lookup`](Self::lookup) finds first for any request (the HIT short way).
    pub(crate) async fn memory_object(&self, key: &str) -> Option<Object> {
        match self.store.get(key).await? {
            Entry::Object(object) if object.head.vary.is_empty() => Some(object),
            _ => None,
        }
    }

    /// Puts an entry read from disk into memory, unless a purge came since `start`
    /// (then it is taken out again: the purge may not have seen it).
    async fn promote(&self, key: String, entry: Entry, start: u64) -> Option<()> {
        if self.epoch() != start {
            return None;
        }
        self.store.put(key.clone(), entry).await;
        if self.epoch() != start {
            self.store.remove(&key).await;
            return None;
        }
        Some(())
    }

    /// Joins the fill of `key`, or starts one (the caller then runs it).
    pub(crate) fn join_or_start(&self, key: &str) -> Flight {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(fill) = inflight.get(key) {
            return Flight::Follower(fill.clone());
        }
        let fill = Fill::new();
        inflight.insert(key.to_string(), fill.clone());
        Flight::Leader(fill)
    }

    /// Whether a fill for `key` is under way.
    pub(crate) fn is_filling(&self, key: &str) -> bool {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner).contains_key(key)
    }

    /// Ends the fill of `key` (if `fill` is still the one in flight): later
    /// requests look the key up again.
    pub(crate) fn land(&self, key: &str, fill: &Arc<Fill>) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        if inflight.get(key).is_some_and(|current| Arc::ptr_eq(current, fill)) {
            inflight.remove(key);
        }
    }

    /// The purge epoch: a fill remembers it when it starts and stores what it
    /// fetched only if no purge came in between (its response may be what was purged).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Applies a purge — the one place purges reach the cache. Hard: matching
    /// entries are dropped; soft: they are marked for revalidation (the policy then
    /// revalidates them before use). Fills under way are not stored, and are no
    /// longer joined: a request after the purge starts a fill of its own rather than
    /// wait for one that may be fetching what was purged (those already waiting get
    /// its answer: they asked before the purge).
    pub(crate) fn purge(&self, target: &Target, soft: bool) -> usize {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner).clear();
        if !soft {
            self.pass_marks.invalidate_all();
        }
        if let Some(disks) = &self.disks {
            disks.purge(target, soft);
        }
        self.store.purge(target, soft)
    }

    /// Drops `key` with all its variants and slices (after an unsafe request, or
    /// an object that changed between slices).
    pub(crate) fn invalidate_url(&self, key: &str) {
        if let Some(disks) = &self.disks {
            disks.invalidate_url(key);
        }
        self.store.invalidate_url(key);
    }

    /// Whether `key` was recently found uncacheable.
    pub(crate) fn is_pass(&self, key: &str) -> bool {
        self.pass_marks.contains_key(key)
    }

    /// Remembers for a while that `key` is not cacheable.
    pub(crate) fn mark_pass(&self, key: &str) {
        self.pass_marks.insert(key.to_string(), ());
    }

    /// Stores a whole object under `key` (and its variant key when it varies), in
    /// both tiers, unless a purge came after `epoch` (when its fill started).
    pub(crate) async fn insert(&self, key: &str, object: Object, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        if let Some(disks) = &self.disks {
            if object.head.vary.is_empty() {
                disks.store(key, Entry::Object(object.clone()), epoch, &self.epoch);
            } else {
                let names = object.head.vary.iter().map(|(name, _)| name.clone()).collect();
                disks.store(&key::variant(key, &object.head.vary), Entry::Object(object.clone()), epoch, &self.epoch);
                disks.store(key, Entry::Vary(Arc::new(names)), epoch, &self.epoch);
            }
        }
        self.store.insert(key, object).await;
    }

    /// Stores a whole object in memory only, unless a purge came after `epoch`:
    /// what lookups find while a fill's compressed variants are made, until
    /// [`insert`](Self::insert) stores those in both tiers (the disk gets one write
    /// per entry, never a stale one racing the variants').
    pub(crate) async fn insert_memory(&self, key: &str, object: Object, epoch: u64) {
        if self.epoch() == epoch {
            self.store.insert(key, object).await;
        }
    }

    /// Stores the head of a sliced object under `key`, unless a purge came after
    /// `epoch`.
    pub(crate) async fn insert_sliced(&self, key: &str, sliced: Arc<Sliced>, epoch: u64) {
        if self.epoch() != epoch {
            return;
        }
        if let Some(disks) = &self.disks {
            disks.store(key, Entry::Sliced(sliced.clone()), epoch, &self.epoch);
        }
        self.store.insert_sliced(key, sliced).await;
    }

    /// Slice `index` of `sliced`, if stored with the same validator: from memory,
    /// else from disk (promoted).
    pub(crate) async fn slice(&self, key: &str, sliced: &Sliced, index: u64) -> Option<Bytes> {
        if let Some(bytes) = self.store.slice(key, sliced, index).await {
            return Some(bytes);
        }
        let disks = self.disks.as_ref().filter(|disks| disks.is_open())?;
        let start = self.epoch();
        let slice_key = key::slice(key, index);
        match disks.load(&slice_key, start, &self.epoch).await? {
            Entry::Slice(slice) if slice.etag == sliced.etag => {
                let bytes = slice.bytes.clone();
                self.promote(slice_key, Entry::Slice(slice), start).await?;
                Some(bytes)
            }
            _ => None,
        }
    }

    /// Stores slice `index` of `key` with its validator, unless a purge came after
    /// `epoch`; returns once the disk has it too (its fill lands only then). Memory
    /// may not keep it (moka's admission turns a new entry away when full), and a
    /// reader that found it in neither tier after the fill landed would fetch it
    /// again.
    pub(crate) async fn insert_slice(
        &self,
        key: &str,
        index: u64,
        etag: Option<HeaderValue>,
        bytes: Bytes,
        epoch: u64,
    ) {
        if self.epoch() != epoch {
            return;
        }
        let written = self.disks.as_ref().and_then(|disks| {
            let slice = Slice { etag: etag.clone(), bytes: bytes.clone() };
            disks.store(&key::slice(key, index), Entry::Slice(slice), epoch, &self.epoch)
        });
        self.store.insert_slice(key, index, etag, bytes).await;
        if let Some(written) = written {
            let _ = written.await;
        }
    }

    /// Bytes held in memory, after pending maintenance.
    pub(crate) async fn bytes(&self) -> u64 {
        self.store.bytes().await
    }

    /// Entries held in memory.
    pub(crate) fn objects(&self) -> u64 {
        self.store.objects()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice fill lands once its slice can be found: a slice that memory turns
    /// away is found on disk as soon as it was stored.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_slice_memory_turns_away_is_on_disk_once_stored() {
        let dir = tempfile::tempdir().unwrap();
        let configs = [crate::config::Disk { path: dir.path().to_path_buf(), size: bytesize::ByteSize::mib(64) }];
        let metrics = disk::DiskMetrics::register(&prometheus::Registry::new()).unwrap();
        let disks = Disks::open(&configs, metrics).unwrap().unwrap();
        disks.set_open();
        // Less memory than one slice: moka never keeps it.
        let cache = Cache::new(64 * 1024, Some(disks));
        let etag = HeaderValue::from_static("\"v1\"");
        let head = Arc::new(store::test_head(vec![], vec![]));
        let sliced = Sliced { head, total: 300_000, slice: 100_000, etag: Some(etag.clone()) };
        let bytes = Bytes::from(vec![5u8; 100_000]);
        cache.insert_slice("http://h/clip", 0, Some(etag), bytes.clone(), cache.epoch()).await;
        assert_eq!(cache.bytes().await, 0, "turned away from memory");
        assert!(cache.slice("http://h/clip", &sliced, 0).await == Some(bytes), "read from disk");
    }

    #[test]
    fn a_purge_detaches_the_fills_in_flight() {
        let cache = Cache::new(1 << 20, None);
        let Flight::Leader(before) = cache.join_or_start("k") else { panic!("the first request leads") };
        assert!(matches!(cache.join_or_start("k"), Flight::Follower(_)), "coalesced before the purge");
        let target = Target { urls: vec!["other/x".into()], ..Target::default() };
        cache.purge(&target, false);
        // After a purge (of anything), nobody joins a fill that started before it.
        let Flight::Leader(after) = cache.join_or_start("k") else { panic!("a new fill after the purge") };
        assert!(!Arc::ptr_eq(&before, &after));
        // The old fill landing does not end the new one.
        cache.land("k", &before);
        assert!(cache.is_filling("k"));
        cache.land("k", &after);
        assert!(!cache.is_filling("k"));
    }
}
