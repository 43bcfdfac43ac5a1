//! The disk tier: every stored entry also lives in a file of its own on one of the
//! `[[cache.disk]]` directories (chosen by the hash of its key), so a library
//! larger than memory stays cached and a restart starts warm.
//!
//! - Writes happen after a fill, off the request path (blocking pool, bounded: when
//!   too many are pending the entry stays in memory only). A file is written under
//!   `tmp/` and renamed into `objects/<2 hex>/<16 hex>`; it is published in the index
//!   only if no purge came since its fill started.
//! - Reads (a memory miss) go to a bounded blocking pool; concurrent readers of one
//!   key share one read; every byte is checked ([`file`]); what fails is a MISS,
//!   counted, and the file is dropped. What is read is promoted to memory; a large
//!   body keeps its file for `sendfile` on cleartext connections.
//! - Purges change the index at once (so nothing purged is found again) and the
//!   files behind it in order on the disk's janitor thread (deletes, soft-purge
//!   flags); [`Disks::persist`] waits for them, syncs the filesystem and then
//!   records the purge sequences applied (`purges.json`), so a restarted edge
//!   replays exactly what it may have missed.
//! - At start each disk's index is rebuilt from the file headers, in parallel,
//!   before the edge serves.
//! - A disk that reports full or read-only takes no writes for a while
//!   ([`PAUSE`]); reads go on.
//!
//! Why not a hybrid cache crate (foyer): see docs/caching.md ("Disk tier").

pub(crate) mod file;
pub(crate) mod index;

use std::{
    collections::HashMap,
    fs::{self, File},
    io,
    os::unix::fs::{FileExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use cdn_cluster::purge::Target;
use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use rustix::io::Errno;
use tokio::sync::{OnceCell, Semaphore, oneshot};
use tracing::{debug, info, warn};
use twox_hash::XxHash3_64;

use self::{
    file::ReadError,
    index::{FileId, Index, Slot},
};
use super::store::Entry;
use crate::{config, error::DiskError};

/// How long a disk that reported full or read-only takes no writes.
const PAUSE: Duration = Duration::from_secs(30);
/// Disk reads at once (the blocking pool's share for reads).
const READS: usize = 16;
/// Disk writes pending at once; past this, a fill stays in memory only.
const WRITES: usize = 1024;
/// Disk writes running at once (blocking threads).
const WRITERS: usize = 8;
/// The file recording the purge sequences applied, per control node.
const APPLIED: &str = "purges.json";
/// The index saved at a clean stop.
const SNAPSHOT: &str = "index.snapshot";

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> DiskError + '_ {
    move |source| DiskError::Io { path: path.to_path_buf(), source }
}

/// Checks that `path` can hold a disk tier (creating it), for config validation.
pub(crate) fn usable(path: &Path) -> Result<(), String> {
    for dir in [path.to_path_buf(), path.join("objects"), path.join("tmp")] {
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let probe = path.join("tmp").join(".probe");
    fs::write(&probe, b"probe").map_err(|e| format!("{}: not writable: {e}", path.display()))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// Metrics of the disk tier.
#[derive(Clone)]
pub(crate) struct DiskMetrics {
    read_bytes: IntCounter,
    write_bytes: IntCounter,
    errors: IntCounterVec,
    index_seconds: prometheus::Gauge,
}

impl DiskMetrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let read_bytes = IntCounter::new("cdn_cache_disk_read_bytes_total", "Body bytes read from the disk tier")?;
        let write_bytes =
            IntCounter::new("cdn_cache_disk_write_bytes_total", "Bytes written to the disk tier (files whole)")?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cdn_cache_disk_errors_total",
                "Disk tier failures: op = read|write|delete, kind = checksum|io|missing|full|read_only|busy",
            ),
            &["op", "kind"],
        )?;
        let index_seconds = prometheus::Gauge::new(
            "cdn_cache_disk_index_seconds",
            "Time the disk tier's index took to rebuild at start",
        )?;
        registry.register(Box::new(read_bytes.clone()))?;
        registry.register(Box::new(write_bytes.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(index_seconds.clone()))?;
        Ok(Self { read_bytes, write_bytes, errors, index_seconds })
    }

    fn error(&self, op: &str, kind: &str) {
        self.errors.with_label_values(&[op, kind]).inc();
    }
}

/// A chore of a disk's janitor thread, done in order.
enum Chore {
    /// Delete these files.
    Delete(Vec<FileId>),
    /// Set the soft-purge flag of these files.
    Flag(Vec<FileId>),
    /// Sync the filesystem (and write the applied purges, on the first disk), then
    /// answer.
    Sync(Option<Vec<u8>>, oneshot::Sender<()>),
    /// Save the index (the edge is stopping), then answer.
    Snapshot(oneshot::Sender<()>),
}

/// One directory of the disk tier.
struct Disk {
    root: PathBuf,
    capacity: u64,
    index: Arc<Mutex<Index>>,
    /// Held (shared) by a write from its epoch check until it is indexed, and
    /// (exclusive) by a purge while it changes the index: a write either sees the
    /// purge's epoch or is indexed before the purge looks.
    publish: Arc<RwLock<()>>,
    /// Writes paused until then (full or read-only).
    paused_until: Mutex<Option<Instant>>,
    janitor: Mutex<mpsc::Sender<Chore>>,
    /// Names temp files apart.
    next_tmp: AtomicU64,
    /// Keeps the directory's lock.
    _lock: File,
}

impl Disk {
    fn path(&self, hash: u64) -> PathBuf {
        object_path(&self.root, hash)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn chore(&self, chore: Chore) {
        let _ = self.janitor.lock().unwrap_or_else(PoisonError::into_inner).send(chore);
    }

    fn writable(&self) -> bool {
        let mut paused = self.paused_until.lock().unwrap_or_else(PoisonError::into_inner);
        match *paused {
            Some(until) if Instant::now() < until => false,
            Some(_) => {
                *paused = None;
                true
            }
            None => true,
        }
    }

    fn pause(&self) {
        *self.paused_until.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now() + PAUSE);
    }

    /// Drops `hash` from the index after its file at `path` failed to read (`read`:
    /// which file that was, `None` when there was none), unless that file is no
    /// longer the one at `path`: a fill of the same key renamed a fresh file into
    /// place during the read, and the slot is that file's now. Checked while no
    /// write publishes (blocking). The file dropped, if any.
    fn drop_failed(&self, hash: u64, path: &Path, read: Option<FileIdentity>) -> Option<FileId> {
        let _publishing = self.publish.write().unwrap_or_else(PoisonError::into_inner);
        if identity(path) != read {
            return None;
        }
        self.index().remove(hash).map(|slot| slot.file())
    }
}

/// Which file a path names (device, inode): a file renamed into place is another one.
type FileIdentity = (u64, u64);

fn identity(path: &Path) -> Option<FileIdentity> {
    fs::metadata(path).ok().map(|metadata| (metadata.dev(), metadata.ino()))
}

/// Reads the entry of `key` from its file at `path` (blocking); on failure, with
/// which file failed (`None`: there was none).
fn read_file(path: &Path, key: &str, verified: bool) -> Result<(Entry, u64), (ReadError, Option<FileIdentity>)> {
    let file = File::open(path).map_err(|error| {
        let error = ReadError::from(error);
        // There but not to be opened: that file failed (as far as can be told).
        let read = if matches!(error, ReadError::Missing) { None } else { identity(path) };
        (error, read)
    })?;
    let read = file.metadata().ok().map(|metadata| (metadata.dev(), metadata.ino()));
    file::read(file, key, verified).map_err(|error| (error, read))
}

fn object_path(root: &Path, hash: u64) -> PathBuf {
    root.join("objects").join(format!("{:02x}", hash >> 56)).join(format!("{hash:016x}"))
}

pub(crate) fn hash(key: &str) -> u64 {
    XxHash3_64::oneshot(key.as_bytes())
}

/// One read from disk, shared by the readers that asked at once.
type Read = OnceCell<Option<Entry>>;

/// The disk tier: every `[[cache.disk]]`.
pub(crate) struct Disks {
    disks: Vec<Arc<Disk>>,
    /// Reads under way, by key, with the purge epoch they started in: concurrent
    /// readers in the same epoch share one.
    loads: Mutex<HashMap<String, (u64, Arc<Read>)>>,
    reads: Arc<Semaphore>,
    /// Writes admitted (running or waiting for a writer).
    writes: Arc<Semaphore>,
    /// Writes running.
    writers: Arc<Semaphore>,
    /// Closed until purges missed while the edge was down are applied.
    open: AtomicBool,
    metrics: DiskMetrics,
}

impl Disks {
    /// Opens every disk and rebuilds their indexes (blocking; at start). `None`
    /// without disks.
    pub(crate) fn open(configs: &[config::Disk], metrics: DiskMetrics) -> Result<Option<Self>, DiskError> {
        if configs.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        let mut disks = Vec::with_capacity(configs.len());
        for config in configs {
            disks.push(Arc::new(open_disk(config, &metrics)?));
        }
        let elapsed = started.elapsed();
        metrics.index_seconds.set(elapsed.as_secs_f64());
        let (objects, bytes) = disks.iter().fold((0, 0), |(n, b), d| {
            let index = d.index();
            (n + index.len(), b + index.bytes())
        });
        info!(disks = disks.len(), objects, bytes, ms = elapsed.as_millis() as u64, "disk tier indexed");
        Ok(Some(Self {
            disks,
            loads: Mutex::default(),
            reads: Arc::new(Semaphore::new(READS)),
            writes: Arc::new(Semaphore::new(WRITES)),
            writers: Arc::new(Semaphore::new(WRITERS)),
            open: AtomicBool::new(false),
            metrics,
        }))
    }

    fn disk(&self, hash: u64) -> &Arc<Disk> {
        &self.disks[(hash % self.disks.len() as u64) as usize]
    }

    /// Lets lookups use the disk (once purges missed while down are applied).
    pub(crate) fn set_open(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            info!("disk tier open for lookups");
        }
    }

    /// Whether lookups use the disk.
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// The entry under `key`, read from disk (shared by concurrent readers), if no
    /// purge came since `start`, the purge epoch (`epoch`) the caller looked it up in.
    pub(crate) async fn load(&self, key: &str, start: u64, epoch: &AtomicU64) -> Option<Entry> {
        if !self.is_open() {
            return None;
        }
        let hash = hash(key);
        let disk = self.disk(hash).clone();
        let verified = disk.index().get(hash, key)?.verified;
        let cell = {
            let mut loads = self.loads.lock().unwrap_or_else(PoisonError::into_inner);
            match loads.get(key) {
                Some((started, cell)) if *started == start => cell.clone(),
                _ => {
                    let cell = Arc::new(OnceCell::new());
                    loads.insert(key.to_string(), (start, cell.clone()));
                    cell
                }
            }
        };
        let entry = cell
            .get_or_init(|| async {
                let Ok(_permit) = self.reads.acquire().await else { return None };
                let (reader, owned_key) = (disk.clone(), key.to_string());
                let result = tokio::task::spawn_blocking(move || {
                    let path = reader.path(hash);
                    read_file(&path, &owned_key, verified).map_err(|(error, read)| {
                        let dropped = reader.drop_failed(hash, &path, read);
                        if let Some(file) = dropped.filter(|_| !matches!(error, ReadError::Missing)) {
                            reader.chore(Chore::Delete(vec![file]));
                        }
                        (error, dropped.is_some())
                    })
                })
                .await;
                match result {
                    Ok(Ok((entry, bytes))) => {
                        self.metrics.read_bytes.inc_by(bytes);
                        disk.index().set_verified(hash, key);
                        Some(entry)
                    }
                    Ok(Err((error, dropped))) => {
                        self.metrics.error("read", error.kind());
                        if matches!(error, ReadError::Missing) {
                            debug!(%key, "disk entry missing; a miss");
                        } else if dropped {
                            warn!(%key, %error, "disk entry unreadable; a miss, file dropped");
                        } else {
                            warn!(%key, %error, "disk entry unreadable; a miss (a fresh file replaced it meanwhile)");
                        }
                        None
                    }
                    Err(_) => None,
                }
            })
            .await
            .clone();
        {
            let mut loads = self.loads.lock().unwrap_or_else(PoisonError::into_inner);
            if loads.get(key).is_some_and(|(_, current)| Arc::ptr_eq(current, &cell)) {
                loads.remove(key);
            }
        }
        // A purge since the lookup: what was read may be what it purged.
        if epoch.load(Ordering::Acquire) != start {
            return None;
        }
        let soft_purged = disk.index().get(hash, key).map(|slot| slot.soft_purged);
        match (entry, soft_purged) {
            (Some(entry), Some(soft)) => {
                if soft {
                    mark_soft_purged(&entry);
                }
                Some(entry)
            }
            _ => None,
        }
    }

    /// Writes `entry` under `key` in the background, unless a purge comes after
    /// `epoch` (the purge epoch when its fill started) before it is published. The
    /// write's task, to wait for (published, or given up), when one was started.
    pub(crate) fn store(
        &self,
        key: &str,
        entry: Entry,
        epoch: u64,
        current: &Arc<AtomicU64>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let hash = hash(key);
        let disk = self.disk(hash).clone();
        if !disk.writable() {
            return None;
        }
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            self.metrics.error("write", "busy");
            return None;
        };
        let (key, current, metrics, writers) =
            (key.to_string(), current.clone(), self.metrics.clone(), self.writers.clone());
        Some(tokio::spawn(async move {
            let Ok(writer) = writers.acquire_owned().await else { return };
            let _ = tokio::task::spawn_blocking(move || {
                let _permits = (permit, writer);
                write_entry(&disk, hash, &key, &entry, epoch, &current, &metrics);
            })
            .await;
        }))
    }

    /// Stops writing, lets every write and chore finish and saves each disk's index
    /// (a clean stop: the next start loads it instead of reading every file).
    pub(crate) async fn close(&self) {
        // Every admitted write holds one of these until it is published (or failed):
        // taking them all waits for the last one, and admits no more.
        let Ok(_all) = self.writes.acquire_many(WRITES as u32).await else { return };
        for disk in &self.disks {
            let (done, wait) = oneshot::channel();
            disk.chore(Chore::Snapshot(done));
            let _: Result<(), _> = wait.await;
        }
    }

    /// Applies a purge to every disk's index now, and to the files in order.
    pub(crate) fn purge(&self, target: &Target, soft: bool) {
        for disk in &self.disks {
            let _publishing = disk.publish.write().unwrap_or_else(PoisonError::into_inner);
            let files = disk.index().purge(target, soft);
            if !files.is_empty() {
                disk.chore(if soft { Chore::Flag(files) } else { Chore::Delete(files) });
            }
        }
    }

    /// Drops `primary` with all its variants and slices.
    pub(crate) fn invalidate_url(&self, primary: &str) {
        for disk in &self.disks {
            let files = disk.index().remove_url(primary);
            if !files.is_empty() {
                disk.chore(Chore::Delete(files));
            }
        }
    }

    /// Waits until every purge applied so far is on disk (files deleted or flagged,
    /// filesystems synced), then records `applied` (purge sequence per control node)
    /// beside the cache.
    pub(crate) async fn persist(&self, applied: &HashMap<String, u64>) {
        let json = serde_json::to_vec(applied).unwrap_or_default();
        // Every other disk synced first; then the first one syncs and records.
        for (i, disk) in self.disks.iter().enumerate().skip(1).chain(self.disks.iter().enumerate().take(1)) {
            let (done, wait) = oneshot::channel();
            disk.chore(Chore::Sync((i == 0).then(|| json.clone()), done));
            let _: Result<(), _> = wait.await;
        }
    }

    /// The purge sequences applied before the last stop, per control node.
    pub(crate) fn applied(&self) -> HashMap<String, u64> {
        let path = self.disks[0].root.join(APPLIED);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                warn!(path = %path.display(), %error, "applied purges unreadable; treated as none");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        }
    }

    /// Bytes of the files indexed.
    pub(crate) fn bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.index().bytes()).sum()
    }

    /// Files indexed.
    pub(crate) fn objects(&self) -> u64 {
        self.disks.iter().map(|d| d.index().len() as u64).sum()
    }
}

fn mark_soft_purged(entry: &Entry) {
    let head = match entry {
        Entry::Object(object) => &object.head,
        Entry::Sliced(sliced) => &sliced.head,
        Entry::Vary(_) | Entry::Slice(_) => return,
    };
    head.purged.store(true, Ordering::Release);
}

/// Encodes, writes and publishes one entry (blocking), counting what happens; a
/// full or read-only disk takes no writes for a while.
fn write_entry(
    disk: &Disk,
    hash: u64,
    key: &str,
    entry: &Entry,
    epoch: u64,
    current: &AtomicU64,
    metrics: &DiskMetrics,
) {
    let encoded = file::encode(key, entry);
    match write(disk, hash, key, &encoded, epoch, current) {
        Ok(written) => metrics.write_bytes.inc_by(written),
        Err(error) => {
            let code = error.raw_os_error();
            let kind = if code == Some(Errno::NOSPC.raw_os_error()) || code == Some(Errno::DQUOT.raw_os_error()) {
                "full"
            } else if code == Some(Errno::ROFS.raw_os_error()) {
                "read_only"
            } else {
                "io"
            };
            metrics.error("write", kind);
            disk.pause();
            warn!(disk = %disk.root.display(), %error, kind, "disk write failed; writes to this disk paused");
        }
    }
}

/// Writes and publishes one file; the bytes written.
fn write(
    disk: &Disk,
    hash: u64,
    key: &str,
    encoded: &file::Encoded,
    epoch: u64,
    current: &AtomicU64,
) -> io::Result<u64> {
    let tmp = disk.root.join("tmp").join(format!("{hash:016x}.{}", disk.next_tmp.fetch_add(1, Ordering::Relaxed)));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        encoded.write_to(&mut file)?;
        file.metadata()
    })();
    let metadata = match result {
        Ok(metadata) => metadata,
        Err(error) => {
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }
    };
    let size = on_disk(&metadata);
    let evicted = {
        let _publishing = disk.publish.read().unwrap_or_else(PoisonError::into_inner);
        if current.load(Ordering::Acquire) != epoch {
            drop(_publishing);
            let _ = fs::remove_file(&tmp);
            return Ok(0);
        }
        let path = disk.path(hash);
        if let Err(error) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }
        let mut index = disk.index();
        index.insert(Slot::new(key, &encoded.tags, size, encoded.kind, false));
        index.evict_to(disk.capacity)
    };
    for file in evicted {
        let _ = remove_unlisted(&disk.root, &disk.publish, &disk.index, file);
    }
    Ok(encoded.len())
}

/// What a file takes on disk (its blocks), at least its length rounded up to 4 KiB.
fn on_disk(metadata: &fs::Metadata) -> u64 {
    (metadata.blocks() * 512).max(metadata.len().div_ceil(4096) * 4096)
}

/// Locks, cleans and indexes one directory.
fn open_disk(config: &config::Disk, metrics: &DiskMetrics) -> Result<Disk, DiskError> {
    let root = config.path.clone();
    let err = io_error(&root);
    fs::create_dir_all(root.join("objects")).map_err(io_error(&root))?;
    fs::create_dir_all(root.join("tmp")).map_err(io_error(&root))?;
    let lock = File::create(root.join("lock")).map_err(err)?;
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(DiskError::Locked(root));
    }
    // What was being written when the edge stopped is incomplete: dropped.
    for entry in fs::read_dir(root.join("tmp")).map_err(io_error(&root))?.flatten() {
        let _ = fs::remove_file(entry.path());
    }
    for prefix in 0..=255u8 {
        fs::create_dir_all(root.join("objects").join(format!("{prefix:02x}"))).map_err(io_error(&root))?;
    }
    // After a clean stop the index was saved whole; it is taken (and removed, so a
    // crash from here on means a full scan next time) instead of reading every file.
    let mut index = match index::load_snapshot(&root.join(SNAPSHOT)) {
        Some(index) => {
            info!(disk = %root.display(), objects = index.len(), "disk index loaded from the clean stop's snapshot");
            index
        }
        None => scan(&root, metrics),
    };
    let _ = fs::remove_file(root.join(SNAPSHOT));
    if let Ok(dir) = File::open(&root) {
        let _ = dir.sync_all();
    }
    for hash in index.evict_to(config.size.as_u64()) {
        let _ = fs::remove_file(object_path(&root, hash));
    }
    let index = Arc::new(Mutex::new(index));
    let janitor_index = index.clone();
    let publish = Arc::new(RwLock::new(()));
    let janitor_publish = publish.clone();
    let (sender, receiver) = mpsc::channel();
    let janitor_root = root.clone();
    let janitor_metrics = metrics.clone();
    std::thread::Builder::new()
        .name("cdn-disk-janitor".into())
        .spawn(move || janitor(&janitor_root, &receiver, &janitor_metrics, &janitor_index, &janitor_publish))
        .map_err(io_error(&root))?;
    Ok(Disk {
        root,
        capacity: config.size.as_u64(),
        index,
        publish,
        paused_until: Mutex::new(None),
        janitor: Mutex::new(sender),
        next_tmp: AtomicU64::new(0),
        _lock: lock,
    })
}

/// Rebuilds the index of `root` from the files' headers, with a thread per core;
/// files that do not check out are deleted.
fn scan(root: &Path, metrics: &DiskMetrics) -> Index {
    // Reading headers is waiting on the device more than computing: more threads
    // than cores keep more reads in flight (a cold start of 100k files).
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get() * 8).clamp(8, 32);
    let next = AtomicU64::new(0);
    let slots: Mutex<Vec<Slot>> = Mutex::default();
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut found = Vec::new();
                loop {
                    let prefix = next.fetch_add(1, Ordering::Relaxed);
                    if prefix > 255 {
                        break;
                    }
                    let dir = root.join("objects").join(format!("{prefix:02x}"));
                    let Ok(entries) = fs::read_dir(&dir) else { continue };
                    for entry in entries.flatten() {
                        let path = entry.path();
                        let name = entry.file_name();
                        let Some(hash) = name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) else {
                            let _ = fs::remove_file(&path);
                            continue;
                        };
                        let summary = File::open(&path).map_err(ReadError::from).and_then(|file| {
                            let metadata = file.metadata()?;
                            Ok((file::summary(&file)?, metadata))
                        });
                        match summary {
                            Ok((summary, metadata)) if self::hash(&summary.key) == hash => found.push(Slot::new(
                                &summary.key,
                                &summary.tags,
                                on_disk(&metadata),
                                summary.kind,
                                summary.soft_purged,
                            )),
                            Ok(_) => {
                                metrics.error("read", "checksum");
                                let _ = fs::remove_file(&path);
                            }
                            Err(error) => {
                                metrics.error("read", error.kind());
                                warn!(path = %path.display(), %error, "cache file dropped at start");
                                let _ = fs::remove_file(&path);
                            }
                        }
                    }
                }
                slots.lock().unwrap_or_else(PoisonError::into_inner).append(&mut found);
            });
        }
    });
    let slots = slots.into_inner().unwrap_or_else(PoisonError::into_inner);
    let mut index = Index::with_capacity(slots.len());
    for slot in slots {
        index.insert(slot);
    }
    index
}

/// Deletes, flags and syncs in the order asked, until the disk is dropped.
fn janitor(
    root: &Path,
    chores: &mpsc::Receiver<Chore>,
    metrics: &DiskMetrics,
    index: &Mutex<Index>,
    publish: &RwLock<()>,
) {
    while let Ok(chore) = chores.recv() {
        match chore {
            Chore::Delete(files) => {
                for file in files {
                    if let Err(error) = remove_unlisted(root, publish, index, file) {
                        metrics.error("delete", "io");
                        warn!(%error, "cache file not deleted");
                    }
                }
            }
            Chore::Flag(files) => {
                for hash in files {
                    let path = object_path(root, hash);
                    let _publishing = publish.write().unwrap_or_else(PoisonError::into_inner);
                    // Only a file still listed as soft-purged: a refill since wrote a fresh one.
                    if index.lock().unwrap_or_else(PoisonError::into_inner).listed(hash) != Some(true) {
                        continue;
                    }
                    let flagged = fs::OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .and_then(|file| file.write_all_at(&[file::SOFT_PURGED], file::FLAGS_AT));
                    if let Err(error) = flagged
                        && error.kind() != io::ErrorKind::NotFound
                    {
                        metrics.error("write", "io");
                        warn!(%error, path = %path.display(), "soft-purge flag not written; file deleted instead");
                        let _ = fs::remove_file(&path);
                    }
                }
            }
            Chore::Sync(record, done) => {
                if let Ok(dir) = File::open(root)
                    && let Err(error) = rustix::fs::syncfs(&dir)
                {
                    warn!(%error, "syncfs failed");
                }
                if let Some(record) = record
                    && let Err(error) = write_durably(&root.join(APPLIED), &record)
                {
                    metrics.error("write", "io");
                    warn!(%error, "applied purges not recorded");
                }
                let _ = done.send(());
            }
            Chore::Snapshot(done) => {
                let bytes = index.lock().unwrap_or_else(PoisonError::into_inner).snapshot();
                match write_durably(&root.join(SNAPSHOT), &bytes) {
                    Ok(()) => info!(disk = %root.display(), "disk index saved for the next start"),
                    Err(error) => warn!(%error, "disk index not saved; the next start reads every file"),
                }
                let _ = done.send(());
            }
        }
    }
}

/// Deletes the file named `hash` unless the index lists it again (a refill of the
/// same key renamed a new file into place since it was dropped); checked while no
/// write publishes.
fn remove_unlisted(root: &Path, publish: &RwLock<()>, index: &Mutex<Index>, hash: FileId) -> io::Result<()> {
    let _publishing = publish.write().unwrap_or_else(PoisonError::into_inner);
    if index.lock().unwrap_or_else(PoisonError::into_inner).listed(hash).is_some() {
        return Ok(());
    }
    match fs::remove_file(object_path(root, hash)) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Replaces `path` with `bytes`: temp file, fsync, rename, fsync of the directory.
fn write_durably(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt as _;

    use bytes::Bytes;
    use bytesize::ByteSize;

    use super::*;
    use crate::cache::{Object, store::test_head};

    fn open(dir: &Path, size: u64) -> Disks {
        let metrics = DiskMetrics::register(&Registry::new()).unwrap();
        let configs = [config::Disk { path: dir.to_path_buf(), size: ByteSize::b(size) }];
        let disks = Disks::open(&configs, metrics).unwrap().unwrap();
        disks.set_open();
        disks
    }

    fn object(body: &[u8], tags: &[&str]) -> Entry {
        let tags = tags.iter().map(|t| t.to_string()).collect();
        Entry::Object(Object { head: Arc::new(test_head(tags, vec![])), body: Bytes::copy_from_slice(body) })
    }

    fn body(entry: Option<Entry>) -> Option<(Bytes, bool)> {
        match entry? {
            Entry::Object(object) => Some((object.body, object.head.purged.load(Ordering::Relaxed))),
            _ => None,
        }
    }

    impl Disks {
        async fn load_now(&self, key: &str, epoch: &AtomicU64) -> Option<Entry> {
            self.load(key, epoch.load(Ordering::Acquire), epoch).await
        }
    }

    async fn settle(disks: &Disks, objects: u64) {
        for _ in 0..200 {
            if disks.objects() == objects {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} objects on disk, expected {objects}", disks.objects());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn entries_and_purges_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = Arc::new(AtomicU64::new(0));
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        {
            let disks = open(dir.path(), 1 << 30);
            disks.store("http://h/1", object(b"one", &["a"]), 0, &epoch);
            disks.store("http://h/2", object(b"two", &["b"]), 0, &epoch);
            disks.store("http://h/3", object(&big, &[]), 0, &epoch);
            settle(&disks, 3).await;
            assert_eq!(body(disks.load_now("http://h/1", &epoch).await).unwrap().0, &b"one"[..]);
            assert!(disks.load_now("http://h/nothing", &epoch).await.is_none());

            disks.purge(&Target { tags: vec!["a".into()], ..Target::default() }, false);
            disks.purge(&Target { urls: vec!["h/2".into()], ..Target::default() }, true);
            assert!(disks.load_now("http://h/1", &epoch).await.is_none(), "purged: gone at once");
            assert_eq!(body(disks.load_now("http://h/2", &epoch).await), Some((Bytes::from_static(b"two"), true)));
            disks.persist(&HashMap::from([("control-1".to_string(), 7)])).await;
            assert!(!object_path(dir.path(), hash("http://h/1")).exists(), "file deleted before the record");
        }
        let disks = open(dir.path(), 1 << 30);
        assert_eq!(disks.applied(), HashMap::from([("control-1".to_string(), 7)]));
        disks.close().await;
        assert!(dir.path().join(SNAPSHOT).exists());
        drop(disks);
        let disks = open(dir.path(), 1 << 30);
        assert!(!dir.path().join(SNAPSHOT).exists(), "taken at start: a crash from now on means a scan");
        assert_eq!(disks.objects(), 2);
        assert!(disks.load_now("http://h/1", &epoch).await.is_none());
        assert_eq!(body(disks.load_now("http://h/2", &epoch).await), Some((Bytes::from_static(b"two"), true)));
        let (read, soft) = body(disks.load_now("http://h/3", &epoch).await).unwrap();
        assert_eq!((&read[..], soft), (&big[..], false));
        assert!(cdn_node::zerocopy::locate(&read).is_some(), "sent from its cache file");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_clean_stop_waits_for_every_write_it_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let epoch = Arc::new(AtomicU64::new(0));
        let disks = open(dir.path(), 1 << 30);
        for i in 0..300 {
            disks.store(&format!("http://h/{i}"), object(&[3; 5000], &[]), 0, &epoch);
        }
        disks.close().await;
        assert_eq!(disks.objects(), 300, "every write admitted before the stop is published");
        drop(disks);
        let disks = open(dir.path(), 1 << 30);
        assert_eq!(disks.objects(), 300, "and in the saved index");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_write_overtaken_by_a_purge_is_not_published() {
        let dir = tempfile::tempdir().unwrap();
        let disks = open(dir.path(), 1 << 30);
        let epoch = Arc::new(AtomicU64::new(1));
        disks.store("http://h/old", object(b"old", &[]), 0, &epoch);
        disks.store("http://h/new", object(b"new", &[]), 1, &epoch);
        settle(&disks, 1).await;
        assert!(disks.load_now("http://h/old", &epoch).await.is_none());
        assert!(disks.load_now("http://h/new", &epoch).await.is_some());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0, "no temp file left");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_failed_read_keeps_a_fresh_file_renamed_into_place_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let disks = open(dir.path(), 1 << 30);
        let epoch = Arc::new(AtomicU64::new(0));
        let key = "http://h/x";
        disks.store(key, object(&[7; 100_000], &[]), 0, &epoch);
        settle(&disks, 1).await;
        let path = object_path(dir.path(), hash(key));
        let failed = identity(&path);
        // A read of that file fails (say it is corrupt) while a refill of the key
        // writes a fresh file and publishes it, before the read drops its slot.
        disks.store(key, object(&[9; 100_000], &[]), 0, &epoch);
        for _ in 0..200 {
            if identity(&path) != failed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_ne!(identity(&path), failed, "the refill's file renamed into place");
        let disk = disks.disk(hash(key)).clone();
        assert_eq!(disk.drop_failed(hash(key), &path, failed), None, "the fresh file's slot is kept");
        assert_eq!(body(disks.load_now(key, &epoch).await).unwrap().0, Bytes::from(vec![9; 100_000]));
        // A failure of the file in place drops it.
        assert_eq!(disk.drop_failed(hash(key), &path, identity(&path)), Some(hash(key)));
        assert_eq!(disks.objects(), 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_corrupt_file_is_a_counted_miss_and_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let disks = open(dir.path(), 1 << 30);
        let epoch = Arc::new(AtomicU64::new(0));
        disks.store("http://h/x", object(&[7; 100_000], &[]), 0, &epoch);
        settle(&disks, 1).await;
        let path = object_path(dir.path(), hash("http://h/x"));
        let file = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let at = file.metadata().unwrap().len() - 5000;
        file.write_all_at(&[8], at).unwrap();
        assert!(disks.load_now("http://h/x", &epoch).await.is_none());
        assert_eq!(disks.metrics.errors.with_label_values(&["read", "checksum"]).get(), 1);
        assert_eq!(disks.objects(), 0);
        // Deleted by the janitor, in order before a sync.
        disks.persist(&HashMap::new()).await;
        assert!(!path.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_disk_keeps_to_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let disks = open(dir.path(), 1 << 20);
        let epoch = Arc::new(AtomicU64::new(0));
        for i in 0..30 {
            disks.store(&format!("http://h/{i}"), object(&[1; 100_000], &[]), 0, &epoch);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(disks.bytes() <= 1 << 20, "{} bytes", disks.bytes());
        assert!((8..=10).contains(&disks.objects()), "{} objects", disks.objects());
        let files: usize = fs::read_dir(dir.path().join("objects"))
            .unwrap()
            .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
            .sum();
        assert_eq!(files as u64, disks.objects(), "evicted files are deleted");
        // A second edge on the same directory is refused.
        let metrics = DiskMetrics::register(&Registry::new()).unwrap();
        let configs = [config::Disk { path: dir.path().to_path_buf(), size: ByteSize::mib(1) }];
        assert!(matches!(Disks::open(&configs, metrics), Err(DiskError::Locked(_))));
    }
}
