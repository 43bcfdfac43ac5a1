//! The durable purge log of a control node: one JSON line per purge, appended and
//! fsynced before the purge is acknowledged, so a restarted control node still
//! knows every acknowledged purge and its sequence numbers go on.
//!
//! An append that fails (disk full, I/O error, failed fsync) leaves nothing behind:
//! the file is cut back to its last complete line and the sequence number is not
//! used, so the purge simply does not exist and the next one takes that number. A
//! half-written line left in the file would otherwise glue itself to the next
//! append and make *that* (acknowledged) record unreadable after a restart.

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
};

use super::PurgeRecord;

/// The log file and what it holds.
#[derive(Debug)]
pub struct PurgeLog {
    path: PathBuf,
    file: File,
    records: Vec<PurgeRecord>,
    next_seq: u64,
    /// Length of the file up to its last complete, synced line.
    len: u64,
    /// A failed append could not be cut back yet: repair before the next one.
    torn: bool,
    /// Failures to inject into the next appends (unit tests).
    #[cfg(test)]
    faults: std::collections::VecDeque<Fault>,
}

/// A failure injected into an append (unit tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Write this many bytes of the line, then fail as a full disk does.
    ShortWrite(usize),
    /// Write the whole line, then fail the fsync.
    Sync,
    /// Like `ShortWrite`, and cutting the file back fails too (once).
    ShortWriteAndTruncate(usize),
}

impl PurgeLog {
    /// Opens (or creates) `dir/purges.log`, reading what it holds. A torn last line
    /// (a crash mid-append, never acknowledged: only a line with its newline was) is
    /// dropped. The file is then rewritten clean; if that is impossible (a full
    /// disk), the torn tail is cut off in place instead, so the node still starts.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("purges.log");
        let mut records = Vec::new();
        let mut next_seq = 1;
        let text = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        // Only whole lines: up to and including the last newline.
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in text[..whole].split(|b| *b == b'\n') {
            let Ok(line) = std::str::from_utf8(line) else { continue };
            if let Some(n) = line.strip_prefix("#next_seq ") {
                if let Ok(n) = n.trim().parse::<u64>() {
                    next_seq = next_seq.max(n);
                }
                continue;
            }
            if let Ok(record) = serde_json::from_str::<PurgeRecord>(line) {
                next_seq = next_seq.max(record.seq + 1);
                records.push(record);
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut log = Self {
            path,
            file,
            records,
            next_seq,
            len: whole as u64,
            torn: whole < text.len(),
            #[cfg(test)]
            faults: Default::default(),
        };
        // Rewrite once so a torn tail never sits in front of new appends.
        if let Err(error) = log.compact_with(|_| true) {
            if !log.torn {
                return Ok(log);
            }
            log.file.set_len(log.len).map_err(|_| error)?;
            log.torn = false;
        }
        Ok(log)
    }

    /// The sequence number the next purge gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends `record` (whose `seq` must be [`next_seq`](Self::next_seq)) durably.
    ///
    /// On error nothing changes: the record is not in the log (the file is cut back
    /// to its previous length) and [`next_seq`](Self::next_seq) stays the same.
    pub fn append(&mut self, record: PurgeRecord) -> std::io::Result<()> {
        if self.torn {
            // The tail of an earlier failed append is still there: cut it first.
            self.file.set_len(self.len)?;
            self.torn = false;
        }
        let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        if let Err(error) = self.write_durably(&line) {
            // Whatever part of the line reached the file goes (an fsync that failed
            // may have left it there, unsynced).
            if self.cut_back().is_err() {
                self.torn = true;
            }
            return Err(error);
        }
        self.len += line.len() as u64;
        self.next_seq = record.seq + 1;
        self.records.push(record);
        Ok(())
    }

    fn write_durably(&mut self, line: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(fault) = self.faults.pop_front() {
            let full = || std::io::Error::from_raw_os_error(28); // ENOSPC
            return match fault {
                Fault::ShortWrite(n) | Fault::ShortWriteAndTruncate(n) => {
                    self.file.write_all(&line[..n.min(line.len())])?;
                    if matches!(fault, Fault::ShortWriteAndTruncate(_)) {
                        self.faults.push_front(Fault::ShortWriteAndTruncate(usize::MAX));
                    }
                    Err(full())
                }
                Fault::Sync => {
                    self.file.write_all(line)?;
                    Err(std::io::Error::from_raw_os_error(5)) // EIO
                }
            };
        }
        self.file.write_all(line)?;
        self.file.sync_data()
    }

    fn cut_back(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if matches!(self.faults.front(), Some(Fault::ShortWriteAndTruncate(usize::MAX))) {
            self.faults.pop_front();
            return Err(std::io::Error::from_raw_os_error(5));
        }
        self.file.set_len(self.len)?;
        self.file.sync_data()
    }

    /// Every retained purge, oldest first.
    pub fn records(&self) -> &[PurgeRecord] {
        &self.records
    }

    /// Keeps only the records `keep` accepts, rewriting the file atomically.
    ///
    /// On error (a full disk) the log keeps its old file and every record: the
    /// half-written copy is removed so it does not hold on to the space.
    pub fn compact_with(&mut self, keep: impl Fn(&PurgeRecord) -> bool) -> std::io::Result<()> {
        let kept: Vec<PurgeRecord> = self.records.iter().filter(|r| keep(r)).cloned().collect();
        let tmp = self.path.with_extension("log.tmp");
        // The append handle is opened on the copy before it is renamed into place,
        // so once the rename is done nothing else can fail.
        let copied = Self::write_copy(&tmp, self.next_seq, &kept)
            .and_then(|len| Ok((len, OpenOptions::new().append(true).open(&tmp)?)))
            .and_then(|copied| std::fs::rename(&tmp, &self.path).map(|()| copied));
        let (len, file) = match copied {
            Ok(copied) => copied,
            Err(error) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(error);
            }
        };
        // Best effort: the rename is done, and refusing now would leave the log's
        // memory and its file apart.
        let _ = crate::durable::sync_parent(&self.path);
        self.file = file;
        self.records = kept;
        self.len = len;
        self.torn = false;
        Ok(())
    }

    /// Writes and syncs a complete log holding `records` to `path`; returns its length.
    fn write_copy(path: &Path, next_seq: u64, records: &[PurgeRecord]) -> std::io::Result<u64> {
        let mut text = String::new();
        // The sequence survives even when every record is collected.
        text.push_str(&format!("#next_seq {next_seq}\n"));
        for record in records {
            text.push_str(&serde_json::to_string(record).map_err(std::io::Error::other)?);
            text.push('\n');
        }
        crate::durable::write_synced(path, text.as_bytes())?;
        Ok(text.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::purge::Target;

    fn record(seq: u64) -> PurgeRecord {
        PurgeRecord {
            id: format!("c1-{seq}"),
            seq,
            control: "c1".into(),
            created_ms: 1,
            soft: false,
            target: Target { tags: vec!["t".into()], ..Target::default() },
        }
    }

    #[test]
    fn survives_reopen_and_torn_tails_and_keeps_counting_after_gc() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PurgeLog::open(dir.path()).unwrap();
        assert_eq!(log.next_seq(), 1);
        log.append(record(1)).unwrap();
        log.append(record(2)).unwrap();
        drop(log);
        // A crash mid-append leaves half a line.
        let mut file = OpenOptions::new().append(true).open(dir.path().join("purges.log")).unwrap();
        file.write_all(b"{\"id\":\"c1-3\",\"se").unwrap();
        drop(file);
        let mut log = PurgeLog::open(dir.path()).unwrap();
        assert_eq!(log.records().len(), 2);
        assert_eq!(log.next_seq(), 3);
        log.append(record(3)).unwrap();
        log.compact_with(|_| false).unwrap();
        drop(log);
        let log = PurgeLog::open(dir.path()).unwrap();
        assert!(log.records().is_empty());
        assert_eq!(log.next_seq(), 4, "sequence numbers go on after everything was collected");
    }

    fn file_text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("purges.log")).unwrap()
    }

    #[test]
    fn a_failed_append_leaves_no_trace_and_the_next_one_takes_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PurgeLog::open(dir.path()).unwrap();
        log.append(record(1)).unwrap();
        let before = file_text(dir.path());

        // A full disk mid-line: refused, the half line is cut off, the number unused.
        log.faults.push_back(Fault::ShortWrite(17));
        let error = log.append(record(2)).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(28), "{error}");
        assert_eq!(log.next_seq(), 2);
        assert_eq!(log.records().len(), 1);
        assert_eq!(file_text(dir.path()), before, "no torn line left behind");

        // A failed fsync: the line reached the file but is not durable; it goes too.
        log.faults.push_back(Fault::Sync);
        assert!(log.append(record(2)).is_err());
        assert_eq!((log.next_seq(), log.records().len()), (2, 1));
        assert_eq!(file_text(dir.path()), before);

        // Cutting back fails as well: the next append repairs the file first.
        log.faults.push_back(Fault::ShortWriteAndTruncate(9));
        assert!(log.append(record(2)).is_err());
        assert_ne!(file_text(dir.path()), before, "the torn tail is still there");
        assert_eq!(log.next_seq(), 2);

        // Space is back: the next purge takes number 2 and is readable after a restart.
        log.append(record(2)).unwrap();
        log.append(record(3)).unwrap();
        drop(log);
        let text = file_text(dir.path());
        assert!(text.lines().skip(1).all(|l| serde_json::from_str::<PurgeRecord>(l).is_ok()), "{text}");
        let log = PurgeLog::open(dir.path()).unwrap();
        let seqs: Vec<u64> = log.records().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
        assert_eq!(log.next_seq(), 4);
    }

    #[test]
    fn a_node_restarting_on_a_full_disk_still_opens_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PurgeLog::open(dir.path()).unwrap();
        log.append(record(1)).unwrap();
        drop(log);
        // A crash mid-append (even one that wrote the whole record but its newline).
        let mut file = OpenOptions::new().append(true).open(dir.path().join("purges.log")).unwrap();
        file.write_all(serde_json::to_string(&record(2)).unwrap().as_bytes()).unwrap();
        drop(file);
        // No room for the clean copy.
        std::fs::create_dir(dir.path().join("purges.log.tmp")).unwrap();
        let mut log = PurgeLog::open(dir.path()).unwrap();
        assert_eq!((log.records().len(), log.next_seq()), (1, 2), "the unterminated record was never acknowledged");
        log.append(record(2)).unwrap();
        drop(log);
        std::fs::remove_dir(dir.path().join("purges.log.tmp")).unwrap();
        let log = PurgeLog::open(dir.path()).unwrap();
        let seqs: Vec<u64> = log.records().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn a_failed_compaction_keeps_the_old_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = PurgeLog::open(dir.path()).unwrap();
        log.append(record(1)).unwrap();
        log.append(record(2)).unwrap();
        // The copy cannot be written where a directory stands in its way.
        std::fs::create_dir(dir.path().join("purges.log.tmp")).unwrap();
        assert!(log.compact_with(|r| r.seq > 1).is_err());
        assert_eq!(log.records().len(), 2, "nothing dropped from memory");
        std::fs::remove_dir(dir.path().join("purges.log.tmp")).unwrap();
        log.append(record(3)).unwrap();
        log.compact_with(|r| r.seq > 1).unwrap();
        log.append(record(4)).unwrap();
        drop(log);
        let log = PurgeLog::open(dir.path()).unwrap();
        let seqs: Vec<u64> = log.records().iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [2, 3, 4]);
        assert!(!dir.path().join("purges.log.tmp").exists());
    }
}
