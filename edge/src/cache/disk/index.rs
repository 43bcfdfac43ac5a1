//! The in-memory index of one disk: which keys have a file, how big, with which
//! surrogate keys, and which were soft-purged; evictions in CLOCK order (an entry
//! read since the hand last passed gets another round).
//!
//! Files are named by the 64-bit hash of their key, so the index maps hashes to
//! slots; the key itself is kept for purges by URL and prefix (and checked against
//! the file's own copy on every read).

use cdn_cluster::purge::Target;
use hashbrown::HashTable;
use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;

use super::{file::Kind, hash};

/// Bytes per unit of [`Slot::blocks`].
const BLOCK: u64 = 4096;

/// One cache file: the hash it is named by and its inode. A file is deleted (or
/// flagged) only if the name still holds that inode: a refill of the same key may
/// have renamed a new file into place since.
pub(crate) type FileId = (u64, u64);

/// One file. Kept small: one per object on disk (the key's text is what grows).
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) key: Box<str>,
    pub(crate) tags: Box<[String]>,
    /// The file's inode.
    ino: u64,
    /// What the file takes on disk, in 4 KiB blocks.
    blocks: u32,
    pub(crate) kind: Kind,
    pub(crate) soft_purged: bool,
    /// Its body was checked since the edge started (the file never changes).
    pub(crate) verified: bool,
    referenced: bool,
}

impl Slot {
    pub(crate) fn new(key: &str, tags: &[String], size: u64, ino: u64, kind: Kind, soft_purged: bool) -> Self {
        Self {
            key: key.into(),
            tags: tags.into(),
            ino,
            blocks: u32::try_from(size.div_ceil(BLOCK)).unwrap_or(u32::MAX),
            kind,
            soft_purged,
            verified: false,
            referenced: false,
        }
    }

    /// Bytes the file takes.
    pub(crate) fn size(&self) -> u64 {
        u64::from(self.blocks) * BLOCK
    }

    /// The hash its file is named by.
    pub(crate) fn hash(&self) -> u64 {
        hash(&self.key)
    }

    /// Its file.
    pub(crate) fn file(&self) -> FileId {
        (self.hash(), self.ino)
    }
}

/// The index of one disk: slots in a vector (the CLOCK ring), found by their key's
/// hash through a table of slot numbers (4 bytes per entry; hashes are recomputed
/// from the keys when the table grows).
#[derive(Debug, Default)]
pub(crate) struct Index {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    table: HashTable<u32>,
    hand: usize,
    bytes: u64,
}

impl Index {
    /// An empty index with room for `n` entries.
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self { slots: Vec::with_capacity(n), table: HashTable::with_capacity(n), ..Self::default() }
    }

    /// Bytes of every file indexed.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Files indexed.
    pub(crate) fn len(&self) -> usize {
        self.table.len()
    }

    fn find(&self, hash: u64) -> Option<u32> {
        let slots = &self.slots;
        self.table.find(hash, |&at| slots[at as usize].as_ref().is_some_and(|s| s.hash() == hash)).copied()
    }

    /// The slot of `key` (marked as used), if indexed.
    pub(crate) fn get(&mut self, hash: u64, key: &str) -> Option<&Slot> {
        let at = self.find(hash)? as usize;
        let slot = self.slots[at].as_mut()?;
        if &*slot.key != key {
            return None;
        }
        slot.referenced = true;
        Some(slot)
    }

    /// Marks the body of `key` checked.
    pub(crate) fn set_verified(&mut self, hash: u64, key: &str) {
        if let Some(at) = self.find(hash)
            && let Some(slot) = self.slots[at as usize].as_mut()
            && &*slot.key == key
        {
            slot.verified = true;
        }
    }

    /// Indexes `slot`, replacing what had its hash.
    pub(crate) fn insert(&mut self, slot: Slot) {
        let hash = slot.hash();
        self.bytes += slot.size();
        if let Some(at) = self.find(hash) {
            if let Some(old) = self.slots[at as usize].replace(slot) {
                self.bytes -= old.size();
            }
            return;
        }
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
        let slots = &self.slots;
        self.table.insert_unique(hash, at, |&at| slots[at as usize].as_ref().map_or(0, Slot::hash));
    }

    /// Removes the slot of `hash`.
    pub(crate) fn remove(&mut self, hash: u64) -> Option<Slot> {
        let slots = &self.slots;
        let entry =
            self.table.find_entry(hash, |&at| slots[at as usize].as_ref().is_some_and(|s| s.hash() == hash)).ok()?;
        let (at, _) = entry.remove();
        let slot = self.slots[at as usize].take()?;
        self.free.push(at);
        self.bytes -= slot.size();
        Some(slot)
    }

    /// The index as bytes, for [`load_snapshot`]: every slot, then a checksum.
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        let saved: Vec<Saved<'_>> = self
            .slots
            .iter()
            .flatten()
            .map(|slot| Saved {
                key: &slot.key,
                tags: &slot.tags,
                ino: slot.ino,
                blocks: slot.blocks,
                kind: slot.kind as u8,
                soft_purged: slot.soft_purged,
            })
            .collect();
        let mut bytes = postcard::to_allocvec(&saved).unwrap_or_default();
        let sum = XxHash3_64::oneshot(&bytes);
        bytes.extend_from_slice(&sum.to_le_bytes());
        bytes
    }

    /// Removes entries in CLOCK order until at most `capacity` bytes are indexed;
    /// returns their files (to be deleted).
    pub(crate) fn evict_to(&mut self, capacity: u64) -> Vec<FileId> {
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
            let file = slot.file();
            self.remove(file.0);
            evicted.push(file);
        }
        evicted
    }

    /// Applies a purge to the index. Hard: the matching entries are removed, with
    /// every variant and slice of a matching URL (returned: their files are to be
    /// deleted); soft: the heads are marked (returned: their flags are to be set).
    pub(crate) fn purge(&mut self, target: &Target, soft: bool) -> Vec<FileId> {
        if target.all && !soft {
            let all = self.slots.iter().flatten().map(Slot::file).collect();
            *self = Self::default();
            return all;
        }
        let matches = |slot: &Slot| target.matches(&slot.key, &slot.tags);
        if soft {
            let mut marked = Vec::new();
            for slot in self.slots.iter_mut().flatten() {
                if slot.kind.has_head() && matches(slot) {
                    slot.soft_purged = true;
                    marked.push(slot.file());
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
        let doomed: Vec<FileId> = self
            .slots
            .iter()
            .flatten()
            .filter(|slot| matches(slot) || urls.iter().any(|url| cdn_http::key::belongs_to(&slot.key, url)))
            .map(Slot::file)
            .collect();
        for &(hash, _) in &doomed {
            self.remove(hash);
        }
        doomed
    }

    /// Removes `primary` with every variant and slice; returns their files.
    pub(crate) fn remove_url(&mut self, primary: &str) -> Vec<FileId> {
        let doomed: Vec<FileId> = self
            .slots
            .iter()
            .flatten()
            .filter(|slot| cdn_http::key::belongs_to(&slot.key, primary))
            .map(Slot::file)
            .collect();
        for &(hash, _) in &doomed {
            self.remove(hash);
        }
        doomed
    }
}

/// One slot as saved in a snapshot.
#[derive(Serialize)]
struct Saved<'a> {
    key: &'a str,
    tags: &'a [String],
    ino: u64,
    blocks: u32,
    kind: u8,
    soft_purged: bool,
}

/// A slot as read back from a snapshot.
#[derive(Deserialize)]
struct Loaded {
    key: String,
    tags: Vec<String>,
    ino: u64,
    blocks: u32,
    kind: u8,
    soft_purged: bool,
}

/// The index saved at `path` by a clean stop, if it is there and checks out.
pub(crate) fn load_snapshot(path: &std::path::Path) -> Option<Index> {
    let bytes = std::fs::read(path).ok()?;
    let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(8)?)?;
    if XxHash3_64::oneshot(body).to_le_bytes() != sum {
        tracing::warn!(path = %path.display(), "disk index snapshot does not check out; reading every file");
        return None;
    }
    let loaded: Vec<Loaded> = postcard::from_bytes(body).ok()?;
    let mut index = Index::with_capacity(loaded.len());
    for slot in loaded {
        let mut new = Slot::new(&slot.key, &slot.tags, 0, slot.ino, Kind::from_byte(slot.kind)?, slot.soft_purged);
        new.blocks = slot.blocks;
        index.insert(new);
    }
    Some(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(key: &str, tags: &[&str], kind: Kind) -> Slot {
        let tags: Vec<String> = tags.iter().map(|t| t.to_string()).collect();
        Slot::new(key, &tags, 100, 7, kind, false)
    }

    #[test]
    fn clock_eviction_spares_what_was_read() {
        let mut index = Index::default();
        for i in 0..10 {
            index.insert(slot(&format!("k{i}"), &[], Kind::Object));
        }
        assert_eq!((index.len(), index.bytes()), (10, 10 * BLOCK));
        assert!(index.get(hash("k3"), "k3").is_some());
        assert!(index.get(hash("k3"), "another key").is_none());
        let evicted = index.evict_to(5 * BLOCK);
        assert_eq!(evicted.len(), 5);
        assert!(!evicted.contains(&(hash("k3"), 7)), "{evicted:?}");
        assert_eq!(index.bytes(), 5 * BLOCK);
        // Replacing keeps the count right; freed slots are reused.
        index.insert(slot("k3", &[], Kind::Object));
        index.insert(slot("k42", &[], Kind::Object));
        assert_eq!((index.len(), index.bytes(), index.slots.len()), (6, 6 * BLOCK, 10));
        assert!(index.remove(hash("k42")).is_some() && index.get(hash("k42"), "k42").is_none());
    }

    #[test]
    fn a_snapshot_reads_back_and_a_damaged_one_is_refused() {
        let mut index = Index::default();
        index.insert(slot("a", &["t"], Kind::Object));
        index.insert(Slot::new("b", &[], 3 * BLOCK, 9, Kind::Slice, true));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap");
        let mut bytes = index.snapshot();
        std::fs::write(&path, &bytes).unwrap();
        let mut back = load_snapshot(&path).unwrap();
        assert_eq!((back.len(), back.bytes()), (2, 4 * BLOCK));
        assert_eq!(&*back.get(hash("a"), "a").unwrap().tags, ["t"]);
        assert!(back.get(hash("b"), "b").unwrap().soft_purged);
        assert_eq!(back.get(hash("b"), "b").unwrap().file(), (hash("b"), 9));
        bytes[3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(load_snapshot(&path).is_none());
        std::fs::write(&path, b"short").unwrap();
        assert!(load_snapshot(&path).is_none());
    }

    #[test]
    fn a_slot_stays_small() {
        assert!(std::mem::size_of::<Option<Slot>>() <= 48, "{}", std::mem::size_of::<Option<Slot>>());
    }

    #[test]
    fn purges_by_tag_take_slices_and_variants_along() {
        let mut index = Index::default();
        let video = cdn_http::key::primary("http", "h", &"/v.mp4".parse().unwrap(), false);
        let page = cdn_http::key::primary("http", "h", &"/page".parse().unwrap(), false);
        let slices = [cdn_http::key::slice(&video, 0), cdn_http::key::slice(&video, 1)];
        index.insert(slot(&video, &["movie"], Kind::Sliced));
        index.insert(slot(&slices[0], &[], Kind::Slice));
        index.insert(slot(&slices[1], &[], Kind::Slice));
        index.insert(slot(&page, &["page"], Kind::Object));
        let soft = index.purge(&Target { tags: vec!["page".into()], ..Target::default() }, true);
        assert_eq!(soft, [(hash(&page), 7)]);
        assert!(index.get(hash(&page), &page).unwrap().soft_purged);
        let mut hard: Vec<u64> = index
            .purge(&Target { tags: vec!["movie".into()], ..Target::default() }, false)
            .iter()
            .map(|f| f.0)
            .collect();
        hard.sort_unstable();
        let mut want = vec![hash(&video), hash(&slices[0]), hash(&slices[1])];
        want.sort_unstable();
        assert_eq!(hard, want);
        assert_eq!(index.len(), 1);
        let all = index.purge(&Target::everything(), false);
        assert_eq!((all, index.len(), index.bytes()), (vec![(hash(&page), 7)], 0, 0));
    }
}
