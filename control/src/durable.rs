//! Files that survive a crash or a power cut once a call returns: written whole to
//! a file of their own and synced, renamed into place, the directory synced. The
//! purge log ([`crate::purge::log`]) rewrites itself this way when it compacts; the
//! routing store ([`crate::routing::store`]) keeps its document this way.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

/// Writes `bytes` to a new file `path` (replacing one there) and syncs it (data
/// and metadata) before returning.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut out = File::create(path)?;
    out.write_all(bytes)?;
    out.sync_all()
}

/// Syncs the directory holding `path`, so that a rename into it is durable.
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => File::open(dir)?.sync_all(),
        _ => File::open(".")?.sync_all(),
    }
}

/// The temporary file a replacement of `path` is written to first (`<path>.tmp`).
pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces `path` with `bytes` atomically and durably: the bytes go to
/// [`temp_path`] and are synced, the file is renamed over `path`, the directory is
/// synced.
///
/// An error before the rename leaves `path` as it was (and no temporary file
/// behind). An error syncing the directory comes after the rename: `path` then
/// holds the new bytes, but a crash could still bring back the old ones.
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    if let Err(error) = write_synced(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(error);
    }
    sync_parent(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_swaps_whole_files_and_leaves_nothing_behind_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("doc.json");
        replace(&path, b"one").unwrap();
        replace(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(temp_path(&path), dir.path().join("doc.json.tmp"));
        // A directory in the way of the temporary file: refused, the old file stays.
        std::fs::create_dir(temp_path(&path)).unwrap();
        assert!(replace(&path, b"three").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        std::fs::remove_dir(temp_path(&path)).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["doc.json"]);
    }
}
