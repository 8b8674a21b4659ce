//! Size accounting, least-recently-used eviction to a budget, and garbage
//! collection. Both prune and gc hold the store's exclusive lock, which every
//! running build holds shared: nothing a running build uses can be removed.
//!
//! `unpacked/DIFF_ID` folders (layers the local backend stacks) are derived
//! data: gc removes those of layers no record uses, and prune removes them
//! all, oldest first, before it evicts any record.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::digest::Digest;
use crate::store::{ImageRecord, RecordKind, StepRecord, Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct StoreUsage {
    pub root: PathBuf,
    pub blobs: u64,
    pub blob_bytes: u64,
    /// Layers unpacked for the local backend, and their bytes.
    pub unpacked: u64,
    pub unpacked_bytes: u64,
    pub steps: u64,
    pub images: u64,
    pub bases: u64,
    /// Debian package files kept for `[packages]`.
    pub debs: u64,
    /// Partition images kept for `-o vm:` (root filesystems, boot partitions).
    pub disks: u64,
    /// `run` steps' cache mounts, and the bytes of their files.
    pub mounts: u64,
    pub mount_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub removed_blobs: u64,
    pub removed_bytes: u64,
    pub removed_records: u64,
    /// Cache mounts removed (their bytes are in `removed_bytes`).
    pub removed_mounts: u64,
    pub remaining_bytes: u64,
}

struct Unpacked {
    path: PathBuf,
    bytes: u64,
    modified: SystemTime,
}

/// A record that keeps blobs alive.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub kind: RecordKind,
    pub name: String,
    #[serde(skip)]
    pub(crate) used: SystemTime,
    pub used_unix: u64,
    pub(crate) blobs: Vec<Digest>,
    pub label: String,
}

impl Store {
    fn blob_sizes(&self) -> Result<HashMap<Digest, u64>, StoreError> {
        let dir = self.blobs_dir();
        let mut out = HashMap::new();
        for e in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
            let e = e.map_err(StoreError::io(&dir))?;
            if let Some(d) = e.file_name().to_str().and_then(Digest::from_hex) {
                out.insert(d, e.metadata().map(|m| m.len()).unwrap_or(0));
            }
        }
        Ok(out)
    }

    /// Every record that keeps blobs alive, oldest use first.
    pub fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for kind in RecordKind::LIVE {
            let dir = self.root().join(kind.dir());
            for e in fs::read_dir(&dir).map_err(StoreError::io(&dir))? {
                let e = e.map_err(StoreError::io(&dir))?;
                let file = e.file_name().to_string_lossy().into_owned();
                let Some(name) = file.strip_suffix(".json") else { continue };
                let used = e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
                let (blobs, label) = if kind == RecordKind::Step {
                    match self.read_record::<StepRecord>(kind, name) {
                        Some(r) => (vec![r.digest], format!("layer {} ({} bytes)", r.digest, r.size)),
                        None => (vec![], "unreadable".into()),
                    }
                } else {
                    match self.read_record::<ImageRecord>(kind, name) {
                        Some(r) => (r.blobs, format!("{} {}", r.name, r.manifest)),
                        None => (vec![], "unreadable".into()),
                    }
                };
                let used_unix = used.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                out.push(Entry { kind, name: name.to_string(), used, used_unix, blobs, label });
            }
        }
        out.sort_by(|a, b| a.used.cmp(&b.used).then_with(|| a.name.cmp(&b.name)));
        Ok(out)
    }

    pub fn usage(&self) -> Result<StoreUsage, StoreError> {
        let sizes = self.blob_sizes()?;
        let entries = self.entries()?;
        let count = |k: RecordKind| entries.iter().filter(|e| e.kind == k).count() as u64;
        let unpacked = self.unpacked()?;
        let mounts = self.cache_mounts()?;
        Ok(StoreUsage {
            root: self.root().to_path_buf(),
            blobs: sizes.len() as u64,
            blob_bytes: sizes.values().sum(),
            unpacked: unpacked.len() as u64,
            unpacked_bytes: unpacked.iter().map(|u| u.bytes).sum(),
            steps: count(RecordKind::Step),
            images: count(RecordKind::Image),
            bases: count(RecordKind::Base),
            debs: count(RecordKind::Deb),
            disks: count(RecordKind::Disk),
            mounts: mounts.len() as u64,
            mount_bytes: mounts.iter().map(|m| m.bytes).sum(),
        })
    }

    /// Evicts least-recently-used records until the blobs take at most
    /// `max_bytes`, removing blobs no remaining record needs. Waits for
    /// running builds to finish first (calling `waiting` if there are any),
    /// so nothing a running build holds is removed.
    pub fn prune(&self, max_bytes: u64, waiting: &dyn Fn()) -> Result<PruneReport, StoreError> {
        let _lock = self.lock_exclusive(waiting)?;
        let mut report = self.collect_garbage()?;
        let sizes = self.blob_sizes()?;
        let blob_total: u64 = sizes.values().sum();
        let mut unpacked = self.unpacked()?;
        unpacked.sort_by_key(|u| u.modified);
        let mut unpacked_total: u64 = unpacked.iter().map(|u| u.bytes).sum();
        // Cache mounts count toward the budget and go, oldest first, after the
        // unpacked folders (derived data) and before any record.
        let mounts = self.cache_mounts()?;
        let mut mount_total: u64 = mounts.iter().map(|m| m.bytes).sum();
        for u in unpacked {
            if blob_total + unpacked_total + mount_total <= max_bytes {
                break;
            }
            let _ = fs::remove_dir_all(&u.path);
            unpacked_total -= u.bytes;
            report.removed_bytes += u.bytes;
        }
        self.sweep_file_pool(&mut report);
        for m in &mounts {
            if blob_total + unpacked_total + mount_total <= max_bytes {
                break;
            }
            self.remove_mount(m);
            mount_total -= m.bytes;
            report.removed_bytes += m.bytes;
            report.removed_mounts += 1;
        }
        let max_bytes = max_bytes.saturating_sub(unpacked_total + mount_total);
        let entries = self.entries()?;
        let mut refcount: HashMap<Digest, usize> = HashMap::new();
        for e in &entries {
            for b in &e.blobs {
                *refcount.entry(*b).or_default() += 1;
            }
        }
        let mut total: u64 = sizes.values().sum();
        for e in &entries {
            if total <= max_bytes {
                break;
            }
            let _ = fs::remove_file(self.record_path(e.kind, &e.name));
            report.removed_records += 1;
            for b in &e.blobs {
                let n = refcount.get_mut(b).expect("counted above");
                *n -= 1;
                if *n == 0 {
                    if let Some(size) = sizes.get(b) {
                        self.remove_blob_and_records(b);
                        total -= size;
                        report.removed_blobs += 1;
                        report.removed_bytes += size;
                    }
                }
            }
        }
        report.remaining_bytes = total;
        Ok(report)
    }

    /// Removes blobs no record needs, records whose blobs are gone, and
    /// leftovers of interrupted writes. Waits for running builds to finish.
    pub fn gc(&self, waiting: &dyn Fn()) -> Result<PruneReport, StoreError> {
        let _lock = self.lock_exclusive(waiting)?;
        let mut r = self.collect_garbage()?;
        r.remaining_bytes = self.blob_sizes()?.values().sum();
        Ok(r)
    }

    fn collect_garbage(&self) -> Result<PruneReport, StoreError> {
        let mut report = PruneReport::default();
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).map_err(StoreError::io(&tmp))?.flatten() {
            let _ = fs::remove_file(e.path()).or_else(|_| fs::remove_dir_all(e.path()));
        }
        let sizes = self.blob_sizes()?;
        let mut live: HashSet<Digest> = HashSet::new();
        for e in self.entries()? {
            if e.blobs.iter().all(|b| sizes.contains_key(b)) && !e.blobs.is_empty() {
                live.extend(e.blobs);
            } else {
                let _ = fs::remove_file(self.record_path(e.kind, &e.name));
                report.removed_records += 1;
            }
        }
        let mut dead: BTreeMap<Digest, u64> = BTreeMap::new();
        for (d, size) in sizes {
            if !live.contains(&d) {
                dead.insert(d, size);
            }
        }
        for (d, size) in dead {
            self.remove_blob_and_records(&d);
            report.removed_blobs += 1;
            report.removed_bytes += size;
        }
        let layers = self.live_diff_ids();
        for u in self.unpacked()? {
            let keep = u.path.file_name().and_then(|n| n.to_str()).and_then(Digest::from_hex);
            if !keep.is_some_and(|d| layers.contains(&d)) {
                let _ = fs::remove_dir_all(&u.path);
                report.removed_bytes += u.bytes;
            }
        }
        self.sweep_file_pool(&mut report);
        self.sweep_seals();
        Ok(report)
    }

    /// Removes the seals of unpacked folders that are gone
    /// (`seals/FOLDER-DIFFID.json` for `FOLDER/DIFFID`).
    pub fn sweep_seals(&self) {
        let dir = self.root().join(RecordKind::Seal.dir());
        let Ok(rd) = fs::read_dir(&dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((folder, hex)) = name.strip_suffix(".json").and_then(|n| n.rsplit_once('-')) else {
                continue;
            };
            if !self.root().join(folder).join(hex).is_dir() {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// Removes files of the unpacked-file pool that no unpacked layer links
    /// to any more (link count 1), and leftovers of interrupted writes.
    fn sweep_file_pool(&self, report: &mut PruneReport) {
        use std::os::unix::fs::MetadataExt;
        let Ok(rd) = fs::read_dir(self.file_pool_dir(None)) else { return };
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            let leftover = e.file_name().to_string_lossy().starts_with(".tmp-");
            if md.is_file() && (md.nlink() == 1 || leftover) && fs::remove_file(e.path()).is_ok() {
                report.removed_bytes += md.len();
            }
        }
    }

    /// What only a user namespace can remove, after a gc: layers unpacked
    /// for rootless runs that no record uses, their pool files no layer
    /// links to, and leftovers in tmp/ (their files belong to subordinate ids).
    pub fn rootless_garbage(&self) -> Vec<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let layers = self.live_diff_ids();
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(self.root()) else { return out };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(inner) = fs::read_dir(e.path()) else { continue };
            if Store::mapping_folder(&name) == Some(true) {
                for d in inner.flatten() {
                    let hex = d.file_name().to_string_lossy().into_owned();
                    if !Digest::from_hex(&hex).is_some_and(|d| layers.contains(&d)) {
                        out.push(d.path());
                    }
                }
            } else if Store::mapping_folder(&name) == Some(false) {
                for f in inner.flatten() {
                    if f.metadata().is_ok_and(|m| m.is_file() && m.nlink() == 1) {
                        out.push(f.path());
                    }
                }
            } else if name == "tmp" {
                out.extend(inner.flatten().map(|t| t.path()));
            }
        }
        out
    }

    /// The diff_ids of every layer a record still names: step records
    /// directly, images and bases through their manifest and config.
    fn live_diff_ids(&self) -> HashSet<Digest> {
        let mut out = HashSet::new();
        let Ok(entries) = self.entries() else { return out };
        for e in entries {
            if e.kind == RecordKind::Step {
                if let Some(r) = self.read_record::<StepRecord>(RecordKind::Step, &e.name) {
                    out.insert(r.diff_id);
                }
                continue;
            }
            if matches!(e.kind, RecordKind::Deb | RecordKind::Disk) {
                continue; // a package file or a partition image, not an image
            }
            let Some(r) = self.read_record::<ImageRecord>(e.kind, &e.name) else { continue };
            let config = self
                .read_blob(&r.manifest)
                .ok()
                .and_then(|m| serde_json::from_slice::<serde_json::Value>(&m).ok())
                .and_then(|m| {
                    m["config"]["digest"]
                        .as_str()
                        .and_then(|d| d.strip_prefix("sha256:"))
                        .and_then(Digest::from_hex)
                })
                .and_then(|c| self.read_blob(&c).ok())
                .and_then(|c| serde_json::from_slice::<serde_json::Value>(&c).ok());
            if let Some(ids) = config.as_ref().and_then(|c| c["rootfs"]["diff_ids"].as_array()) {
                out.extend(
                    ids.iter().filter_map(|d| d.as_str()?.strip_prefix("sha256:").and_then(Digest::from_hex)),
                );
            }
        }
        out
    }

    /// The unpacked layer folders, with their size and age.
    fn unpacked(&self) -> Result<Vec<Unpacked>, StoreError> {
        let dir = self.unpacked_dir(None);
        let mut out = Vec::new();
        let Ok(rd) = fs::read_dir(&dir) else { return Ok(out) };
        for e in rd.flatten() {
            let path = e.path();
            let modified = e.metadata().and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            let mut bytes = 0;
            let mut stack = vec![path.clone()];
            while let Some(d) = stack.pop() {
                let Ok(rd) = fs::read_dir(&d) else { continue };
                for c in rd.flatten() {
                    match c.file_type() {
                        Ok(t) if t.is_dir() => stack.push(c.path()),
                        Ok(t) if t.is_file() => bytes += c.metadata().map(|m| m.len()).unwrap_or(0),
                        _ => {}
                    }
                }
            }
            out.push(Unpacked { path, bytes, modified });
        }
        Ok(out)
    }

    fn remove_blob_and_records(&self, d: &Digest) {
        let _ = fs::remove_file(self.blob_path(d));
        let _ = fs::remove_file(self.record_path(RecordKind::Verified, &d.hex()));
    }
}

/// Parses sizes such as `500M`, `2G`, `1.5GiB`, `1024`.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return None,
    };
    (n >= 0.0).then_some((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("2K"), Some(2048));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("10MiB"), Some(10 << 20));
        assert_eq!(parse_size("ten"), None);
        assert_eq!(parse_size("5X"), None);
    }

    #[test]
    fn prune_evicts_oldest_and_keeps_shared_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = store.put_blob(&[1u8; 1000]).unwrap();
        let shared = store.put_blob(&[2u8; 1000]).unwrap();
        let new = store.put_blob(&[3u8; 1000]).unwrap();
        let rec =
            |name: &str, blobs: Vec<Digest>| ImageRecord { name: name.into(), manifest: blobs[0], blobs };
        store.write_record(RecordKind::Image, "old", &rec("old", vec![old, shared])).unwrap();
        let past = SystemTime::now() - std::time::Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(store.record_path(RecordKind::Image, "old"))
            .unwrap()
            .set_modified(past)
            .unwrap();
        store.write_record(RecordKind::Image, "new", &rec("new", vec![new, shared])).unwrap();
        let orphan = store.put_blob(&[4u8; 1000]).unwrap();

        let r = store.prune(2000, &|| {}).unwrap();
        assert!(!store.has_blob(&orphan), "unreferenced blobs go first");
        assert!(!store.has_blob(&old), "the least recently used image goes");
        assert!(store.has_blob(&shared) && store.has_blob(&new));
        assert_eq!(r.remaining_bytes, 2000);
    }
}
