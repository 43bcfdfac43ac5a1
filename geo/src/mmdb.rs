//! The MaxMind-format GeoIP database: lookups ([`Mmdb`]) and the file it is
//! loaded from, reloaded when it changes ([`GeoDb`]).

use std::{
    net::IpAddr,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use maxminddb::{Reader, geoip2};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use cdn_node::location::GeoPoint;

use crate::{
    countries,
    locate::{Database, DbAnswer},
};

#[cfg(test)]
pub(crate) mod writer;

/// An in-memory `.mmdb` (City or Country database).
pub(crate) struct Mmdb {
    reader: Reader<Vec<u8>>,
}

impl std::fmt::Debug for Mmdb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mmdb").field("database_type", &self.reader.metadata().database_type).finish()
    }
}

fn valid(point: GeoPoint) -> Option<GeoPoint> {
    let ok = point.lat.is_finite()
        && point.lon.is_finite()
        && (-90.0..=90.0).contains(&point.lat)
        && (-180.0..=180.0).contains(&point.lon);
    ok.then_some(point)
}

impl Mmdb {
    /// Parses a database held in memory.
    pub(crate) fn from_bytes(bytes: Vec<u8>) -> Result<Self, GeoDbError> {
        // The reader validates the file; the guard is for a reader bug on a hostile file.
        match catch_unwind(AssertUnwindSafe(|| Reader::from_source(bytes))) {
            Ok(Ok(reader)) => Ok(Self { reader }),
            Ok(Err(error)) => Err(GeoDbError::Invalid(error)),
            Err(_) => Err(GeoDbError::ReaderPanicked),
        }
    }

    /// The database type from its metadata (`GeoLite2-City`, …).
    pub(crate) fn database_type(&self) -> &str {
        &self.reader.metadata().database_type
    }

    fn lookup_inner(&self, addr: IpAddr) -> Option<DbAnswer> {
        let result = self.reader.lookup(addr).ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = result.network().map(|net| net.prefix()).unwrap_or(0).min(max);
        if !result.has_data() {
            return Some(DbAnswer { point: None, prefix });
        }
        let record = result.decode::<geoip2::City<'_>>().ok().flatten()?;
        let city = match (record.location.latitude, record.location.longitude) {
            (Some(lat), Some(lon)) => valid(GeoPoint { lat, lon }),
            _ => None,
        };
        let point = city
            .or_else(|| record.country.iso_code.and_then(countries::country))
            .or_else(|| record.registered_country.iso_code.and_then(countries::country))
            .or_else(|| record.continent.code.and_then(countries::continent));
        Some(DbAnswer { point, prefix })
    }
}

impl Database for Mmdb {
    fn lookup(&self, addr: IpAddr) -> Option<DbAnswer> {
        catch_unwind(AssertUnwindSafe(|| self.lookup_inner(addr))).ok().flatten()
    }
}

/// What identifies a version of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(metadata);
        #[cfg(not(unix))]
        let inode = 0;
        Self { modified: metadata.modified().ok(), len: metadata.len(), inode }
    }
}

/// The database file and the version of it in use.
#[derive(Debug, Default)]
pub(crate) struct GeoDb {
    path: Option<PathBuf>,
    /// Read on every query that no static network locates: lock-free.
    current: arc_swap::ArcSwapOption<Mmdb>,
    stamp: Mutex<Option<Stamp>>,
}

/// Why a database file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum GeoDbError {
    /// The file could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file is not a valid MaxMind database.
    #[error(transparent)]
    Invalid(maxminddb::MaxMindDbError),
    /// The reader panicked on the file (a reader bug; the file is refused).
    #[error("the database reader panicked")]
    ReaderPanicked,
    /// The loading task did not finish.
    #[error("loading task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

async fn load(path: &Path) -> Result<(Mmdb, Stamp), GeoDbError> {
    let metadata = tokio::fs::metadata(path).await?;
    let bytes = tokio::fs::read(path).await?;
    let db = tokio::task::spawn_blocking(move || Mmdb::from_bytes(bytes)).await??;
    Ok((db, Stamp::of(&metadata)))
}

impl GeoDb {
    /// No database.
    pub(crate) fn none() -> Self {
        Self::default()
    }

    /// Loads the database at `path`.
    pub(crate) async fn open(path: &Path) -> Result<Self, GeoDbError> {
        let (db, stamp) = load(path).await?;
        info!(path = %path.display(), database_type = db.database_type(), "geoip database loaded");
        Ok(Self {
            path: Some(path.to_path_buf()),
            current: arc_swap::ArcSwapOption::new(Some(Arc::new(db))),
            stamp: Mutex::new(Some(stamp)),
        })
    }

    /// The database in use, if any (a cheap guard: no reference count touched).
    pub(crate) fn current(&self) -> arc_swap::Guard<Option<Arc<Mmdb>>> {
        self.current.load()
    }

    /// Loads the file again when it changed since the last load; keeps the old
    /// database when the new file does not load (and retries on the next call).
    pub(crate) async fn reload_if_changed(&self) -> Result<bool, GeoDbError> {
        let Some(path) = &self.path else { return Ok(false) };
        let metadata = tokio::fs::metadata(path).await?;
        let stamp = Stamp::of(&metadata);
        if *self.stamp.lock().unwrap_or_else(PoisonError::into_inner) == Some(stamp) {
            return Ok(false);
        }
        let (db, stamp) = load(path).await?;
        info!(path = %path.display(), database_type = db.database_type(), "geoip database reloaded");
        self.current.store(Some(Arc::new(db)));
        *self.stamp.lock().unwrap_or_else(PoisonError::into_inner) = Some(stamp);
        Ok(true)
    }

    /// Checks the file every `interval` until `shutdown`.
    pub(crate) async fn watch(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        if self.path.is_none() {
            return;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut failing = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.reload_if_changed().await {
                Ok(_) => failing = false,
                Err(error) if !failing => {
                    warn!(%error, "cannot reload the geoip database; keeping the one loaded");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{writer::*, *};

    fn sample() -> Vec<u8> {
        write_v4(
            "GeoIP2-City",
            &[
                (Ipv4Addr::new(81, 2, 69, 0), 24, city(51.5, -0.13, "GB")),
                (Ipv4Addr::new(81, 0, 0, 0), 8, country("IE")),
                (Ipv4Addr::new(100, 64, 0, 0), 10, country("ZZ")),
                (Ipv4Addr::new(100, 96, 0, 0), 11, city(f64::NAN, 3.0, "FR")),
            ],
        )
    }

    fn at(addr: &str) -> IpAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn city_country_and_missing_records() {
        let db = Mmdb::from_bytes(sample()).unwrap();
        assert_eq!(db.database_type(), "GeoIP2-City");
        let a = db.lookup(at("81.2.69.142")).unwrap();
        assert_eq!((a.point, a.prefix), (Some(GeoPoint { lat: 51.5, lon: -0.13 }), 24));
        let a = db.lookup(at("81.3.0.1")).unwrap();
        assert_eq!(a.point, countries::country("IE"), "country-only record: the centroid");
        assert!(a.prefix >= 8 && a.prefix <= 16, "{}", a.prefix);
        let a = db.lookup(at("100.64.0.1")).unwrap();
        assert_eq!(a.point, None, "unknown country code");
        let a = db.lookup(at("100.96.0.1")).unwrap();
        assert_eq!(a.point, countries::country("FR"), "bad coordinates fall back to the country");
        let a = db.lookup(at("8.8.8.8")).unwrap();
        assert_eq!(a.point, None);
        assert!(a.prefix > 0);
        assert!(db.lookup(at("2001:db8::1")).is_none(), "IPv6 in an IPv4 database");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Mmdb::from_bytes(Vec::new()).is_err());
        assert!(Mmdb::from_bytes(b"not a database".to_vec()).is_err());
        let mut truncated = sample();
        truncated.truncate(truncated.len() / 2);
        assert!(Mmdb::from_bytes(truncated).is_err());
        // Flip bytes in the tree and data: lookups may fail but never panic.
        let mut mangled = sample();
        for i in (0..mangled.len().saturating_sub(120)).step_by(7) {
            mangled[i] ^= 0xA5;
        }
        if let Ok(db) = Mmdb::from_bytes(mangled) {
            for addr in ["81.2.69.142", "81.3.0.1", "100.96.0.1", "1.1.1.1", "255.255.255.255"] {
                let _ = db.lookup(at(addr));
            }
        }
    }

    #[tokio::test]
    async fn reloads_when_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("geo.mmdb");
        std::fs::write(&path, sample()).unwrap();
        let db = GeoDb::open(&path).await.unwrap();
        assert!(!db.reload_if_changed().await.unwrap());
        let before = db.current().as_ref().unwrap().lookup(at("81.2.69.142")).unwrap().point;
        let moved = write_v4("GeoIP2-City", &[(Ipv4Addr::new(81, 2, 69, 0), 24, city(19.0, 72.8, "IN"))]);
        std::fs::write(&path, &moved).unwrap();
        assert!(db.reload_if_changed().await.unwrap());
        let after = db.current().as_ref().unwrap().lookup(at("81.2.69.142")).unwrap().point;
        assert_ne!(before, after);
        assert_eq!(after, Some(GeoPoint { lat: 19.0, lon: 72.8 }));
        // A broken file keeps the old database and is retried.
        std::fs::write(&path, b"broken").unwrap();
        assert!(db.reload_if_changed().await.is_err());
        assert_eq!(db.current().as_ref().unwrap().lookup(at("81.2.69.142")).unwrap().point, after);
        assert!(db.reload_if_changed().await.is_err(), "still retrying");
        std::fs::write(&path, sample()).unwrap();
        assert!(db.reload_if_changed().await.unwrap());
        assert_eq!(db.current().as_ref().unwrap().lookup(at("81.2.69.142")).unwrap().point, before);
        assert!(GeoDb::open(&dir.path().join("missing.mmdb")).await.is_err());
        assert!(GeoDb::none().current().is_none());
    }
}
