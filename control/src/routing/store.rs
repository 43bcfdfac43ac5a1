//! The routing document a control node holds, in `data_dir/routing.json`: its
//! version, the control node that accepted it (`by`) and the document, as JSON.
//!
//! A document is stored before it is acknowledged or published: written whole to
//! `routing.json.tmp`, synced, renamed over `routing.json`, the directory synced
//! (`durable::replace`). So the file is always one complete document, the
//! old or the new, and a control node that restarts holds the version it
//! acknowledged last (or adopted from another control node).

use std::path::{Path, PathBuf};

use super::Versioned;

/// The file name in `data_dir`.
pub const FILE: &str = "routing.json";

/// Why the stored document could not be read at start.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file (or `data_dir`) could not be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The file is not a stored routing document.
    #[error("not a stored routing document: {0}")]
    Syntax(#[source] serde_json::Error),
    /// The document no longer validates (each problem as `field.path: what`).
    #[error("the stored document does not validate: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// The routing document this control node holds.
#[derive(Debug)]
pub struct RoutingStore {
    path: PathBuf,
    current: Option<Versioned>,
    /// Fail the next [`store`](Self::store) (unit tests).
    #[cfg(test)]
    fail_next: bool,
}

impl RoutingStore {
    /// Opens `dir/routing.json` (creating `dir`); no file: no document yet. A
    /// temporary file left by a crash mid-store is removed (that store was never
    /// acknowledged).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        match std::fs::remove_file(crate::durable::temp_path(&path)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
            _ => {}
        }
        let current = match std::fs::read(&path) {
            Ok(bytes) => {
                let versioned: Versioned = serde_json::from_slice(&bytes).map_err(StoreError::Syntax)?;
                versioned.routing.validate().map_err(StoreError::Invalid)?;
                Some(versioned)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(error.into()),
        };
        Ok(Self {
            path,
            current,
            #[cfg(test)]
            fail_next: false,
        })
    }

    /// Where the document is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The document held, if any.
    pub fn current(&self) -> Option<&Versioned> {
        self.current.as_ref()
    }

    /// The version held; 0: none.
    pub fn version(&self) -> u64 {
        self.current.as_ref().map_or(0, |versioned| versioned.version)
    }

    /// Stores `versioned` durably in place of the document held.
    ///
    /// On error the store still holds the previous document (in memory, and in the
    /// file unless only the final directory sync failed).
    pub fn store(&mut self, versioned: Versioned) -> std::io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next) {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let mut bytes = serde_json::to_vec_pretty(&versioned).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        crate::durable::replace(&self.path, &bytes)?;
        self.current = Some(versioned);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use cdn_cluster::routing::{OriginSpec, Routing, Site};

    use super::*;

    fn versioned(version: u64, by: &str, origin: &str) -> Versioned {
        let site = Site {
            name: "video".into(),
            hosts: vec!["www.cdn.test".into()],
            origins: vec![OriginSpec { url: origin.into(), weight: 1, backup: false, ca: None, host: None }],
            health: None,
            shield: Vec::new(),
            share: None,
            rules: Vec::new(),
            signed: None,
        };
        Versioned { version, by: by.into(), accepted_ms: 0, routing: Routing { default_site: None, sites: vec![site] } }
    }

    #[test]
    fn keeps_the_document_across_reopens_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RoutingStore::open(&dir.path().join("data")).unwrap();
        assert_eq!((store.version(), store.current()), (0, None));
        store.store(versioned(1, "c1", "http://a")).unwrap();
        store.store(versioned(2, "c2", "http://b")).unwrap();
        store.fail_next = true;
        assert!(store.store(versioned(3, "c1", "http://c")).is_err());
        assert_eq!(store.current(), Some(&versioned(2, "c2", "http://b")), "a failed store changes nothing");
        drop(store);
        // A crash mid-store leaves a temporary file: never acknowledged, removed.
        std::fs::write(dir.path().join("data/routing.json.tmp"), b"{\"version\": 3, \"by").unwrap();
        let store = RoutingStore::open(&dir.path().join("data")).unwrap();
        assert_eq!(store.current(), Some(&versioned(2, "c2", "http://b")));
        assert!(!dir.path().join("data/routing.json.tmp").exists());
    }

    #[test]
    fn a_damaged_or_invalid_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"version\": 1,").unwrap();
        assert!(matches!(RoutingStore::open(dir.path()), Err(StoreError::Syntax(_))));
        let mut invalid = versioned(1, "c1", "http://a");
        invalid.routing.default_site = Some("nope".into());
        std::fs::write(dir.path().join(FILE), serde_json::to_vec(&invalid).unwrap()).unwrap();
        let error = RoutingStore::open(dir.path()).unwrap_err();
        assert!(error.to_string().contains("default_site"), "{error}");
    }
}
