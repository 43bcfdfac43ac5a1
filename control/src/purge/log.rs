//! The durable purge log of a control node: one JSON line per purge, appended and
//! fsynced before the purge is acknowledged, so a restarted control node still
//! knows every acknowledged purge and its sequence numbers go on.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
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
}

impl PurgeLog {
    /// Opens (or creates) `dir/purges.log`, reading what it holds. A torn last line
    /// (a crash mid-append, never acknowledged) is dropped.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("purges.log");
        let mut records = Vec::new();
        let mut next_seq = 1;
        if path.exists() {
            let reader = BufReader::new(File::open(&path)?);
            for line in reader.lines() {
                let line = line?;
                if line.starts_with("#next_seq ") {
                    if let Some(n) = line.strip_prefix("#next_seq ").and_then(|n| n.trim().parse::<u64>().ok()) {
                        next_seq = next_seq.max(n);
                    }
                    continue;
                }
                if let Ok(record) = serde_json::from_str::<PurgeRecord>(&line) {
                    next_seq = next_seq.max(record.seq + 1);
                    records.push(record);
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut log = Self { path, file, records, next_seq };
        // Rewrite once so a torn tail never sits in front of new appends.
        log.compact_with(|_| true)?;
        Ok(log)
    }

    /// The sequence number the next purge gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Appends `record` (whose `seq` must be [`next_seq`](Self::next_seq)) durably.
    pub fn append(&mut self, record: PurgeRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.next_seq = record.seq + 1;
        self.records.push(record);
        Ok(())
    }

    /// Every retained purge, oldest first.
    pub fn records(&self) -> &[PurgeRecord] {
        &self.records
    }

    /// Keeps only the records `keep` accepts, rewriting the file atomically.
    pub fn compact_with(&mut self, keep: impl Fn(&PurgeRecord) -> bool) -> std::io::Result<()> {
        self.records.retain(|r| keep(r));
        let tmp = self.path.with_extension("log.tmp");
        {
            let mut out = File::create(&tmp)?;
            // The sequence survives even when every record is collected.
            writeln!(out, "#next_seq {}", self.next_seq)?;
            for record in &self.records {
                let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
                writeln!(out, "{line}")?;
            }
            out.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent()
            && let Ok(dir) = File::open(dir)
        {
            let _ = dir.sync_all();
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
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
}
