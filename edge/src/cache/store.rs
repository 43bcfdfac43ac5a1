//! The object store: a moka cache bounded in bytes, with `Vary` variants.
//!
//! An object without `Vary` lives under its primary key. An object with `Vary`
//! leaves a small marker (the varying header names) under the primary key and
//! lives under `primary ␟ secondary`, where the secondary key is the request's
//! values of those headers. Every entry's key starts with its primary key, so a
//! purge of a URL drops every variant and every slice with one predicate. The key
//! format is `cdn_http::key`'s.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use cdn_cluster::purge::Target;
use http::{HeaderMap, HeaderName, StatusCode};
use moka::future::Cache;

use cdn_http::{
    key::{self, vary_values},
    policy::{Directives, Timing},
};

/// Everything about a stored response but its body.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    /// End-to-end headers as received (hop-by-hop and surrogate keys removed).
    pub(crate) headers: HeaderMap,
    pub(crate) timing: Timing,
    pub(crate) directives: Directives,
    pub(crate) lifetime: Duration,
    /// Surrogate keys (`Surrogate-Key`, `Cache-Tag`) for purge by tag.
    pub(crate) tags: Vec<String>,
    /// The varying request headers and the values they had for this response.
    pub(crate) vary: Vec<(HeaderName, String)>,
    /// Set by a soft purge: the response must be revalidated before it is used.
    pub(crate) purged: std::sync::atomic::AtomicBool,
}

/// A stored response.
#[derive(Debug, Clone)]
pub(crate) struct Object {
    pub(crate) head: Arc<Head>,
    pub(crate) body: Bytes,
}

impl Object {
    fn weight(&self, key: &str) -> u32 {
        let headers: usize = self.head.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
        let total = self.body.len() + headers + key.len() + 256;
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// A large object stored in slices: its head, and where to find the slices.
#[derive(Debug)]
pub(crate) struct Sliced {
    /// The head of the whole representation (status 200, full Content-Length).
    pub(crate) head: Arc<Head>,
    /// Length of the whole representation.
    pub(crate) total: u64,
    /// Slice size the object was cut with.
    pub(crate) slice: u64,
    /// The strong validator every slice must carry (no splicing of two versions).
    pub(crate) etag: Option<http::HeaderValue>,
}

impl Sliced {
    /// The byte range of slice `index`.
    pub(crate) fn bounds(&self, index: u64) -> std::ops::Range<u64> {
        let start = index * self.slice;
        start..(start + self.slice).min(self.total)
    }
}

/// One slice of a sliced object.
#[derive(Debug, Clone)]
pub(crate) struct Slice {
    pub(crate) etag: Option<http::HeaderValue>,
    pub(crate) bytes: Bytes,
}

/// What one key holds.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    Object(Object),
    Vary(Arc<Vec<HeaderName>>),
    Sliced(Arc<Sliced>),
    Slice(Slice),
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub(crate) enum Found {
    /// A whole object.
    Object(Object),
    /// The head of a sliced object.
    Sliced(Arc<Sliced>),
}

impl Found {
    /// The head of what was found.
    pub(crate) fn head(&self) -> &Arc<Head> {
        match self {
            Self::Object(object) => &object.head,
            Self::Sliced(sliced) => &sliced.head,
        }
    }
}

/// The cache.
#[derive(Clone)]
pub(crate) struct Store {
    cache: Cache<String, Entry>,
}

impl Store {
    pub(crate) fn new(max_bytes: u64) -> Self {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, entry: &Entry| match entry {
                Entry::Object(object) => object.weight(key),
                Entry::Vary(names) => u32::try_from(key.len() + names.len() * 32 + 128).unwrap_or(u32::MAX),
                Entry::Sliced(sliced) => {
                    Object { head: sliced.head.clone(), body: Bytes::new() }.weight(key).saturating_add(64)
                }
                Entry::Slice(slice) => u32::try_from(key.len() + slice.bytes.len() + 128).unwrap_or(u32::MAX),
            })
            .support_invalidation_closures()
            .build();
        Self { cache }
    }

    /// The stored response for `primary` matching the request's headers.
    pub(crate) async fn lookup(&self, primary: &str, request: &HeaderMap) -> Option<Found> {
        match self.cache.get(primary).await? {
            Entry::Object(object) => object.head.vary.is_empty().then_some(Found::Object(object)),
            Entry::Sliced(sliced) => Some(Found::Sliced(sliced)),
            Entry::Slice(_) => None,
            Entry::Vary(names) => {
                let values = vary_values(&names, request);
                match self.cache.get(&key::variant(primary, &values)).await? {
                    Entry::Object(object) if object.head.vary == values => Some(Found::Object(object)),
                    _ => None,
                }
            }
        }
    }

    /// What `key` holds in memory.
    pub(crate) async fn get(&self, key: &str) -> Option<Entry> {
        self.cache.get(key).await
    }

    /// Puts `entry` under `key` as it is (an entry read back from disk).
    pub(crate) async fn put(&self, key: String, entry: Entry) {
        self.cache.insert(key, entry).await;
    }

    /// Drops what `key` holds (that key only).
    pub(crate) async fn remove(&self, key: &str) {
        self.cache.invalidate(key).await;
    }

    /// Stores the head of a sliced object under `primary`.
    pub(crate) async fn insert_sliced(&self, primary: &str, sliced: Arc<Sliced>) {
        self.cache.insert(primary.to_string(), Entry::Sliced(sliced)).await;
    }

    /// Slice `index` of `sliced`, if stored with the same validator.
    pub(crate) async fn slice(&self, primary: &str, sliced: &Sliced, index: u64) -> Option<Bytes> {
        match self.cache.get(&key::slice(primary, index)).await? {
            Entry::Slice(slice) if slice.etag == sliced.etag => Some(slice.bytes),
            _ => None,
        }
    }

    /// Stores slice `index` of `primary` with its validator.
    pub(crate) async fn insert_slice(&self, primary: &str, index: u64, etag: Option<http::HeaderValue>, bytes: Bytes) {
        self.cache.insert(key::slice(primary, index), Entry::Slice(Slice { etag, bytes })).await;
    }

    /// Stores `object` under `primary` (and its variant key when it varies).
    pub(crate) async fn insert(&self, primary: &str, object: Object) {
        if object.head.vary.is_empty() {
            self.cache.insert(primary.to_string(), Entry::Object(object)).await;
            return;
        }
        let names: Vec<HeaderName> = object.head.vary.iter().map(|(name, _)| name.clone()).collect();
        let variant = key::variant(primary, &object.head.vary);
        self.cache.insert(variant, Entry::Object(object)).await;
        self.cache.insert(primary.to_string(), Entry::Vary(Arc::new(names))).await;
    }

    /// Drops `primary` and all its variants.
    pub(crate) fn invalidate_url(&self, primary: &str) {
        let primary = primary.to_string();
        let _ = self.cache.invalidate_entries_if(move |stored, _| key::belongs_to(stored, &primary));
    }

    /// Applies a purge: drops (or, `soft`, marks stale) every entry it matches.
    /// Returns how many entries were marked (soft; a hard purge counts 0, its
    /// entries are dropped lazily).
    pub(crate) fn purge(&self, target: &Target, soft: bool) -> usize {
        if target.all && !soft {
            self.cache.invalidate_all();
            return 0;
        }
        if soft {
            let mut marked = 0;
            for (key, entry) in &self.cache {
                let head = match &entry {
                    Entry::Object(object) => &object.head,
                    Entry::Sliced(sliced) => &sliced.head,
                    Entry::Vary(_) | Entry::Slice(_) => continue,
                };
                if target.matches(&key, &head.tags) {
                    head.purged.store(true, std::sync::atomic::Ordering::Release);
                    marked += 1;
                }
            }
            return marked;
        }
        let target = target.clone();
        let _ = self.cache.invalidate_entries_if(move |key, entry| {
            let tags: &[String] = match entry {
                Entry::Object(object) => &object.head.tags,
                Entry::Sliced(sliced) => &sliced.head.tags,
                Entry::Vary(_) | Entry::Slice(_) => &[],
            };
            target.matches(key, tags)
        });
        0
    }

    /// Bytes held (weights), after pending maintenance.
    pub(crate) async fn bytes(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.weighted_size()
    }

    /// Entries held (objects and Vary markers).
    pub(crate) fn objects(&self) -> u64 {
        self.cache.entry_count()
    }
}

/// A fresh 200 head, 60 s of lifetime, for tests.
#[cfg(test)]
pub(crate) fn test_head(tags: Vec<String>, vary: Vec<(HeaderName, String)>) -> Head {
    let now = std::time::SystemTime::now();
    Head {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        timing: Timing { request_time: now, response_time: now, initial_age: Duration::ZERO },
        directives: Directives::default(),
        lifetime: Duration::from_secs(60),
        tags,
        vary,
        purged: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderValue, header};

    use super::*;

    fn object(vary: Vec<(HeaderName, String)>, body: &'static [u8]) -> Object {
        Object { head: Arc::new(test_head(vec![], vary)), body: Bytes::from_static(body) }
    }

    #[tokio::test]
    async fn variants_are_kept_apart_and_purged_together() {
        let store = Store::new(1 << 20);
        let mut gzip = HeaderMap::new();
        gzip.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        let mut br = HeaderMap::new();
        br.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("br"));
        let names = [header::ACCEPT_ENCODING];
        store.insert("k", object(vary_values(&names, &gzip), b"g")).await;
        store.insert("k", object(vary_values(&names, &br), b"b")).await;
        let body = |found: Option<Found>| match found {
            Some(Found::Object(object)) => object.body,
            other => panic!("{other:?}"),
        };
        assert_eq!(body(store.lookup("k", &gzip).await), Bytes::from_static(b"g"));
        assert_eq!(body(store.lookup("k", &br).await), Bytes::from_static(b"b"));
        assert!(store.lookup("k", &HeaderMap::new()).await.is_none());
        store.insert("kx", object(vec![], b"other")).await;
        store.invalidate_url("k");
        store.cache.run_pending_tasks().await;
        assert!(store.lookup("k", &gzip).await.is_none());
        assert!(store.lookup("k", &br).await.is_none());
        assert!(store.lookup("kx", &HeaderMap::new()).await.is_some());
    }
}
