//! The in-memory index of one disk: which keys have a file, how big, with which
//! surrogate keys, and which were soft-purged; evictions in CLOCK order (an entry
//! read since the hand last passed gets another round).
//!
//! Files are named by the 64-bit hash of their key, so the index maps hashes to
//! slots; the key itself is kept for purges by URL and prefix (and checked against
//! the file's own copy on every read).

use std::collections::HashMap;

use cdn_cluster::purge::Target;

use super::file::Kind;

/// One file.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) hash: u64,
    pub(crate) key: Box<str>,
    pub(crate) tags: Box<[String]>,
    /// Bytes the file takes on disk.
    pub(crate) size: u64,
    pub(crate) kind: Kind,
    pub(crate) soft_purged: bool,
    /// Its body was checked since the edge started (the file never changes).
    pub(crate) verified: bool,
    referenced: bool,
}

impl Slot {
    pub(crate) fn new(hash: u64, key: &str, tags: &[String], size: u64, kind: Kind, soft_purged: bool) -> Self {
        Self { hash, key: key.into(), tags: tags.into(), size, kind, soft_purged, verified: false, referenced: false }
    }
}

/// The index of one disk.
#[derive(Debug, Default)]
pub(crate) struct Index {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    by_hash: HashMap<u64, u32>,
    hand: usize,
    bytes: u64,
}

impl Index {
    /// Bytes of every file indexed.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Files indexed.
    pub(crate) fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// The slot of `key` (marked as used), if indexed.
    pub(crate) fn get(&mut self, hash: u64, key: &str) -> Option<&Slot> {
        let at = *self.by_hash.get(&hash)? as usize;
        let slot = self.slots[at].as_mut()?;
        if &*slot.key != key {
            return None;
        }
        slot.referenced = true;
        Some(slot)
    }

    /// Marks the body of `key` checked.
    pub(crate) fn set_verified(&mut self, hash: u64, key: &str) {
        if let Some(&at) = self.by_hash.get(&hash)
            && let Some(slot) = self.slots[at as usize].as_mut()
            && &*slot.key == key
        {
            slot.verified = true;
        }
    }

    /// Indexes `slot`, replacing what had its hash.
    pub(crate) fn insert(&mut self, slot: Slot) {
        self.bytes += slot.size;
        if let Some(&at) = self.by_hash.get(&slot.hash) {
            if let Some(old) = self.slots[at as usize].replace(slot) {
                self.bytes -= old.size;
            }
            return;
        }
        let hash = slot.hash;
        let at = match self.free.pop() {
            Some(at) => {
                self.slots[at as usize] = Some(slot);
                at
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.by_hash.insert(hash, at);
    }

    /// Removes the slot of `hash`.
    pub(crate) fn remove(&mut self, hash: u64) -> Option<Slot> {
        let at = self.by_hash.remove(&hash)?;
        let slot = self.slots[at as usize].take()?;
        self.free.push(at);
        self.bytes -= slot.size;
        Some(slot)
    }

    /// Removes entries in CLOCK order until at most `capacity` bytes are indexed;
    /// returns the hashes removed (their files are to be deleted).
    pub(crate) fn evict_to(&mut self, capacity: u64) -> Vec<u64> {
        let mut evicted = Vec::new();
        let mut steps = 0;
        while self.bytes > capacity && !self.slots.is_empty() && steps <= 2 * self.slots.len() {
            self.hand = (self.hand + 1) % self.slots.len();
            steps += 1;
            let Some(slot) = self.slots[self.hand].as_mut() else { continue };
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            let hash = slot.hash;
            self.remove(hash);
            evicted.push(hash);
        }
        evicted
    }

    /// Applies a purge to the index. Hard: the matching entries are removed, with
    /// every variant and slice of a matching URL (returned: their files are to be
    /// deleted); soft: the heads are marked (returned: their flags are to be set).
    pub(crate) fn purge(&mut self, target: &Target, soft: bool) -> Vec<u64> {
        if target.all && !soft {
            let all = self.by_hash.keys().copied().collect();
            *self = Self::default();
            return all;
        }
        let matches = |slot: &Slot| target.matches(&slot.key, &slot.tags);
        if soft {
            let mut marked = Vec::new();
            for slot in self.slots.iter_mut().flatten() {
                if slot.kind.has_head() && matches(slot) {
                    slot.soft_purged = true;
                    marked.push(slot.hash);
                }
            }
            return marked;
        }
        // Heads matched by tag take their variants and slices along (they carry no
        // tags of their own): first the URLs, then everything under them.
        let urls: Vec<Box<str>> = self
            .slots
            .iter()
            .flatten()
            .filter(|slot| slot.kind.has_head() && !slot.tags.is_empty() && matches(slot))
            .map(|slot| cdn_http::key::primary_of(&slot.key).into())
            .collect();
        let doomed: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|slot| matches(slot) || urls.iter().any(|url| cdn_http::key::belongs_to(&slot.key, url)))
            .map(|slot| slot.hash)
            .collect();
        for &hash in &doomed {
            self.remove(hash);
        }
        doomed
    }

    /// Removes `primary` with every variant and slice; returns their hashes.
    pub(crate) fn remove_url(&mut self, primary: &str) -> Vec<u64> {
        let doomed: Vec<u64> = self
            .slots
            .iter()
            .flatten()
            .filter(|slot| cdn_http::key::belongs_to(&slot.key, primary))
            .map(|slot| slot.hash)
            .collect();
        for &hash in &doomed {
            self.remove(hash);
        }
        doomed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(hash: u64, key: &str, tags: &[&str], kind: Kind) -> Slot {
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        Slot::new(hash, key, &tags, 100, kind, false)
    }

    #[test]
    fn clock_eviction_spares_what_was_read() {
        let mut index = Index::default();
        for i in 0..10 {
            index.insert(slot(i, &format!("k{i}"), &[], Kind::Object));
        }
        assert_eq!((index.len(), index.bytes()), (10, 1000));
        assert!(index.get(3, "k3").is_some());
        assert!(index.get(3, "other key, same hash").is_none());
        let evicted = index.evict_to(500);
        assert_eq!(evicted.len(), 5);
        assert!(!evicted.contains(&3), "{evicted:?}");
        assert_eq!(index.bytes(), 500);
        // Replacing keeps the count right; freed slots are reused.
        index.insert(slot(3, "k3", &[], Kind::Object));
        index.insert(slot(42, "k42", &[], Kind::Object));
        assert_eq!((index.len(), index.bytes()), (6, 600));
    }

    #[test]
    fn purges_by_tag_take_slices_and_variants_along() {
        let mut index = Index::default();
        let video = cdn_http::key::primary("http", "h", &"/v.mp4".parse().unwrap(), false);
        let page = cdn_http::key::primary("http", "h", &"/page".parse().unwrap(), false);
        index.insert(slot(1, &video, &["movie"], Kind::Sliced));
        index.insert(slot(2, &cdn_http::key::slice(&video, 0), &[], Kind::Slice));
        index.insert(slot(3, &cdn_http::key::slice(&video, 1), &[], Kind::Slice));
        index.insert(slot(4, &page, &["page"], Kind::Object));
        let soft = index.purge(&Target { tags: vec!["page".into()], ..Target::default() }, true);
        assert_eq!(soft, [4]);
        assert!(index.get(4, &page).unwrap().soft_purged);
        let mut hard = index.purge(&Target { tags: vec!["movie".into()], ..Target::default() }, false);
        hard.sort_unstable();
        assert_eq!(hard, [1, 2, 3]);
        assert_eq!(index.len(), 1);
        let all = index.purge(&Target::everything(), false);
        assert_eq!((all, index.len(), index.bytes()), (vec![4], 0, 0));
    }
}
