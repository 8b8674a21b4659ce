//! The stat index of a context folder: for each file, the (size, mtime,
//! ctime, inode) it had when hashed and the sha256 of its content. A file
//! whose stat matches is not read again, so a no-op rebuild reads no content.
//! mtime is never part of a cache key; it only decides whether to re-hash.

use std::collections::HashMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::store::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    digest: Digest,
}

impl Entry {
    fn matches(&self, m: &Metadata) -> bool {
        self.size == m.size()
            && self.mtime_ns == mtime_ns(m)
            && self.ctime_ns == ctime_ns(m)
            && self.ino == m.ino()
    }
}

fn mtime_ns(m: &Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

fn ctime_ns(m: &Metadata) -> i128 {
    m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128
}

/// The index of one context folder (keyed by its canonical path).
#[derive(Debug)]
pub struct StatIndex {
    name: String,
    entries: HashMap<String, Entry>,
    dirty: bool,
}

/// How close to "now" an mtime must be for the entry to count as racy: a file
/// written again within the filesystem's timestamp granularity after it was
/// hashed would keep its stat, so such entries are hashed again next time.
const RACY_NS: i128 = 2_000_000_000;

impl StatIndex {
    pub fn load(store: &Store, context: &Path) -> StatIndex {
        let name = Digest::of(context.as_os_str().as_encoded_bytes()).hex();
        let entries = store.read_record(crate::RecordKind::Index, &name).unwrap_or_default();
        StatIndex { name, entries, dirty: false }
    }

    /// The content digest recorded for `rel` if its stat is unchanged.
    pub fn lookup(&self, rel: &str, meta: &Metadata) -> Option<Digest> {
        self.entries.get(rel).filter(|e| e.matches(meta)).map(|e| e.digest)
    }

    pub fn record(&mut self, rel: &str, meta: &Metadata, digest: Digest) {
        let e = Entry {
            size: meta.size(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            ino: meta.ino(),
            digest,
        };
        if self.entries.get(rel) != Some(&e) {
            self.entries.insert(rel.to_string(), e);
            self.dirty = true;
        }
    }

    /// Saves the index if it changed. Racy entries are left out.
    pub fn save(&mut self, store: &Store) -> Result<(), StoreError> {
        if !self.dirty {
            return Ok(());
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
        self.entries.retain(|_, e| now - e.mtime_ns > RACY_NS && now - e.ctime_ns > RACY_NS);
        store.write_record(crate::RecordKind::Index, &self.name, &self.entries)?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn unchanged_stat_hits_and_a_rewrite_misses() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let f = dir.path().join("a");
        std::fs::write(&f, "one").unwrap();
        // Age the file so the entry is not racy.
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        let meta = std::fs::metadata(&f).unwrap();

        let mut idx = StatIndex::load(&store, dir.path());
        idx.record("a", &meta, Digest::of(b"one"));
        std::thread::sleep(Duration::from_millis(10));
        idx.save(&store).unwrap();
        // ctime is "now", so the entry is racy and dropped until it ages.
        let idx2 = StatIndex::load(&store, dir.path());
        assert_eq!(idx2.lookup("a", &meta), None);

        let mut idx = StatIndex { name: idx.name.clone(), entries: HashMap::new(), dirty: false };
        idx.record("a", &meta, Digest::of(b"one"));
        assert_eq!(idx.lookup("a", &meta), Some(Digest::of(b"one")));
        std::fs::write(&f, "two").unwrap();
        assert_eq!(idx.lookup("a", &std::fs::metadata(&f).unwrap()), None);
    }
}
