//! Opening the store, its records, and atomic writes.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::lock::StoreLock;

/// The schema version of the on-disk layout; a new layout gets a new folder.
pub(crate) const SCHEMA: &str = "v1";

/// The kinds of records kept beside the blobs, each in its own folder
/// (named by [`RecordKind::dir`], which is also how `kiln cache ls` shows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A step key -> its layer ([`StepRecord`]).
    Step,
    /// A built image -> the blobs it needs ([`ImageRecord`]).
    Image,
    /// An imported base that passed the checks -> its blobs ([`ImageRecord`]).
    Base,
    /// A Debian package file kept for `[packages]` ([`ImageRecord`]).
    Deb,
    /// A partition image kept for `-o vm:` ([`ImageRecord`]).
    Disk,
    /// A layer's file list (kiln's binary listing format).
    Listing,
    /// The stat index of one context folder.
    Index,
    /// When a blob was last hashed (a stamp, not JSON).
    Verified,
    /// The files of one unpacked layer folder, as unpacked.
    Seal,
}

impl RecordKind {
    pub(crate) const ALL: [RecordKind; 9] = [
        RecordKind::Step,
        RecordKind::Image,
        RecordKind::Base,
        RecordKind::Deb,
        RecordKind::Disk,
        RecordKind::Listing,
        RecordKind::Index,
        RecordKind::Verified,
        RecordKind::Seal,
    ];

    /// The kinds that keep blobs alive: what prune evicts and gc follows.
    pub(crate) const LIVE: [RecordKind; 5] =
        [RecordKind::Step, RecordKind::Image, RecordKind::Base, RecordKind::Deb, RecordKind::Disk];

    /// The kind's folder under the store root.
    pub(crate) fn dir(self) -> &'static str {
        match self {
            RecordKind::Step => "steps",
            RecordKind::Image => "images",
            RecordKind::Base => "bases",
            RecordKind::Deb => "debs",
            RecordKind::Disk => "disks",
            RecordKind::Listing => "listings",
            RecordKind::Index => "index",
            RecordKind::Verified => "verified",
            RecordKind::Seal => "seals",
        }
    }

    /// A record's file name: JSON, except stamps and binary listings.
    fn file_name(self, name: &str) -> String {
        match self {
            RecordKind::Verified => name.to_string(),
            RecordKind::Listing => format!("{name}.list"),
            _ => format!("{name}.json"),
        }
    }
}

impl std::fmt::Display for RecordKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.dir())
    }
}

impl Serialize for RecordKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.dir())
    }
}

/// Folders of data derived from blobs, which prune may remove and builds
/// make again: layers unpacked for the local backend, and the pool of
/// unpacked files they hard-link to. A rootless id mapping gets its own
/// (`unpacked-userns-ID`, `files-userns-ID`), as its files belong to
/// subordinate ids.
const UNPACKED: &str = "unpacked";
const FILE_POOL: &str = "files";
const MAPPING: &str = "-userns-";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Cannot use the cache at `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Blob {digest} in the cache is corrupt (its content hashes to {actual})")]
    Corrupt { digest: Digest, actual: Digest },
    #[error("Expected blob {expected}, but the bytes written hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("Blob {0} is not in the cache")]
    Missing(Digest),
}

impl StoreError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, source }
    }
}

/// A step key's result: the layer it produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    pub diff_id: Digest,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// A built or imported image and every blob it needs (what prune keeps alive).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub manifest: Digest,
    pub blobs: Vec<Digest>,
}

/// The store under one cache dir.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// `KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else `~/.cache/kiln`.
    pub fn default_dir() -> PathBuf {
        if let Some(d) = std::env::var_os("KILN_CACHE_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(d);
        }
        if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("kiln");
        }
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        home.join(".cache").join("kiln")
    }

    /// Opens (creating if needed) the store under `cache_dir`.
    ///
    /// The store's folder is 0700: layers unpacked for the sandbox, cache
    /// mounts and steps' working folders hold what steps made as root
    /// (setuid programs, device nodes), which no other user of the machine
    /// may reach.
    pub fn open(cache_dir: &Path) -> Result<Store, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let root = cache_dir.join(SCHEMA);
        fs::create_dir_all(&root).map_err(StoreError::io(&root))?;
        let meta = fs::symlink_metadata(&root).map_err(StoreError::io(&root))?;
        if meta.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(StoreError::io(&root))?;
        }
        for sub in ["blobs/sha256", "tmp"].into_iter().chain(RecordKind::ALL.map(RecordKind::dir)) {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(StoreError::io(&p))?;
        }
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The lock every build holds while it runs; prune and gc wait for it.
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        let p = self.root.join("store.lock");
        StoreLock::shared(&p).map_err(StoreError::io(&p))
    }

    /// The lock prune and gc hold; `waiting` is called when builds hold it.
    pub fn lock_exclusive(&self, waiting: &dyn Fn()) -> Result<StoreLock, StoreError> {
        let p = self.root.join("store.lock");
        StoreLock::exclusive(&p, waiting).map_err(StoreError::io(&p))
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.blobs_dir().join(d.hex())
    }

    /// Where layers are unpacked for the local backend, by diff_id: for
    /// root, or for one rootless id mapping (named by an id made of
    /// letters, digits and `-`).
    pub fn unpacked_dir(&self, mapping: Option<&str>) -> PathBuf {
        self.derived_dir(UNPACKED, mapping)
    }

    /// The pool of unpacked files, by content, that unpacked layers link to.
    pub fn file_pool_dir(&self, mapping: Option<&str>) -> PathBuf {
        self.derived_dir(FILE_POOL, mapping)
    }

    fn derived_dir(&self, kind: &str, mapping: Option<&str>) -> PathBuf {
        match mapping {
            None => self.root.join(kind),
            Some(id) => self.root.join(format!("{kind}{MAPPING}{id}")),
        }
    }

    /// Whether a folder directly under the root is one of a rootless
    /// mapping's derived folders: `Some(true)` for unpacked layers,
    /// `Some(false)` for a file pool.
    pub(crate) fn mapping_folder(name: &str) -> Option<bool> {
        let rest = |kind: &str| {
            name.strip_prefix(kind).and_then(|r| r.strip_prefix(MAPPING)).is_some_and(|id| !id.is_empty())
        };
        if rest(UNPACKED) {
            Some(true)
        } else if rest(FILE_POOL) {
            Some(false)
        } else {
            None
        }
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Reads a small blob (a config or manifest) and checks its digest.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.blob_path(d);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing(*d)),
            Err(e) => return Err(StoreError::Io { path: p, source: e }),
        };
        let actual = Digest::of(&bytes);
        if actual != *d {
            self.discard_blob(d);
            return Err(StoreError::Corrupt { digest: *d, actual });
        }
        Ok(bytes)
    }

    /// Stores `bytes` as a blob (no-op when present) and returns its digest.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let d = Digest::of(bytes);
        if self.verify_blob(&d)? {
            return Ok(d);
        }
        let mut w = crate::BlobWriter::new(self)?;
        w.write_all(bytes).map_err(StoreError::io(self.tmp_dir()))?;
        w.commit_expecting(&d)?;
        Ok(d)
    }

    /// Removes a blob found corrupt, and what was recorded about it.
    pub fn discard_blob(&self, d: &Digest) {
        let _ = fs::remove_file(self.blob_path(d));
        let _ = fs::remove_file(self.record_path(RecordKind::Verified, &d.hex()));
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The file of the record `name` of `kind`.
    pub fn record_path(&self, kind: RecordKind, name: &str) -> PathBuf {
        self.root.join(kind.dir()).join(kind.file_name(name))
    }

    /// Writes a file through a temp file and a rename, so readers see all of it or none.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic_in(&self.tmp_dir(), path, bytes).map_err(StoreError::io(path))
    }

    /// A record, or `None`: one that does not parse (e.g. from a future
    /// schema), is not a regular file, or is larger than any record kiln
    /// writes is a miss, not an error, and is made again. Large records (a
    /// seal of a layer of a million files is tens of MB) are parsed as they
    /// are read, not held twice.
    pub fn read_record<T: DeserializeOwned>(&self, kind: RecordKind, name: &str) -> Option<T> {
        const MAX_RECORD: u64 = 1 << 30;
        const READ_WHOLE: u64 = 16 << 20;
        let f = fs::File::open(self.record_path(kind, name)).ok()?;
        let md = f.metadata().ok()?;
        if !md.is_file() || md.len() > MAX_RECORD {
            return None;
        }
        if md.len() <= READ_WHOLE {
            let mut bytes = Vec::with_capacity(md.len() as usize);
            io::Read::read_to_end(&mut io::Read::take(f, READ_WHOLE + 1), &mut bytes).ok()?;
            return serde_json::from_slice(&bytes).ok();
        }
        serde_json::from_reader(io::BufReader::with_capacity(1 << 20, io::Read::take(f, MAX_RECORD))).ok()
    }

    /// Writes a record through a temp file and a rename, streaming its JSON.
    pub fn write_record<T: Serialize>(
        &self,
        kind: RecordKind,
        name: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.record_path(kind, name);
        let tmp_dir = self.tmp_dir();
        let tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(StoreError::io(&tmp_dir))?;
        let mut w = io::BufWriter::with_capacity(1 << 20, tmp);
        serde_json::to_writer(&mut w, value)
            .map_err(|e| StoreError::Io { path: path.clone(), source: e.into() })?;
        let tmp =
            w.into_inner().map_err(|e| StoreError::Io { path: path.clone(), source: e.into_error() })?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644)).map_err(StoreError::io(&path))?;
        tmp.persist(&path).map_err(|e| StoreError::Io { path: path.clone(), source: e.error })?;
        Ok(())
    }

    /// Marks a record as just used, for least-recently-used eviction.
    pub fn touch_record(&self, kind: RecordKind, name: &str) {
        let p = self.record_path(kind, name);
        if let Ok(f) = fs::File::options().write(true).open(&p) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    pub fn step(&self, key: &Digest) -> Option<StepRecord> {
        self.read_record(RecordKind::Step, &key.hex())
    }

    pub fn put_step(&self, key: &Digest, rec: &StepRecord) -> Result<(), StoreError> {
        self.write_record(RecordKind::Step, &key.hex(), rec)
    }
}

/// Atomically replaces `path` with `bytes` (mode 0644), staging the temp file
/// in `tmp_dir`, which must be on the same filesystem. Readers see all of the
/// old file or all of the new one.
pub fn write_atomic_in(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    // A regular file that already holds these bytes is only touched: a
    // rename over it costs a writeback and freeing the old inode, which is
    // most of a no-op build's time on some filesystems.
    // Opened without following a symlink or waiting on a fifo, then
    // checked as opened: a regular 0644 file of ours with one name.
    let held = {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        fs::OpenOptions::new()
            .read(true)
            .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(path)
            .ok()
            .filter(|f| {
                f.metadata().is_ok_and(|m| {
                    m.file_type().is_file()
                        && m.len() == bytes.len() as u64
                        && m.mode() & 0o7777 == 0o644
                        && m.nlink() == 1
                        && m.uid() == rustix::process::geteuid().as_raw()
                })
            })
    };
    if let Some(f) = held {
        let mut held = Vec::with_capacity(bytes.len());
        if io::Read::read_to_end(&mut io::Read::take(&f, bytes.len() as u64 + 1), &mut held).is_ok()
            && held == bytes
            && f.set_modified(std::time::SystemTime::now()).is_ok()
        {
            return Ok(());
        }
    }
    let mut tmp = tempfile::NamedTempFile::new_in(tmp_dir)?;
    tmp.write_all(bytes)?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_the_bytes_a_file_holds_only_touches_it() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path(), dir.path().join("record.json"));
        write_atomic_in(tmp, &path, b"{\"a\":1}").unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        fs::File::options().write(true).open(&path).unwrap().set_modified(old).unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        write_atomic_in(tmp, &path, b"{\"a\":1}").unwrap();
        let m = fs::metadata(&path).unwrap();
        assert_eq!(m.ino(), ino, "not replaced");
        assert!(m.modified().unwrap() > old, "but touched, as a write would");
        // Other bytes, a longer file, another mode: replaced.
        let cases: [(&[u8], u32, bool); 4] = [
            (b"{\"a\":2}", 0o644, false),
            (b"{\"a\":2}", 0o644, true),
            (b"{\"a\":2}", 0o600, false),
            (b"{\"a\":2} ", 0o644, false),
        ];
        for (bytes, mode, kept) in cases {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let ino = fs::metadata(&path).unwrap().ino();
            write_atomic_in(tmp, &path, bytes).unwrap();
            let m = fs::metadata(&path).unwrap();
            assert_eq!(fs::read(&path).unwrap(), bytes);
            assert_eq!(m.mode() & 0o777, 0o644);
            assert_eq!(m.ino() == ino, kept, "{bytes:?} {mode:o}");
        }
        // A symlink to a file with the same bytes is replaced, not followed.
        let target = dir.path().join("elsewhere");
        fs::write(&target, b"same").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_atomic_in(tmp, &path, b"same").unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        // A fifo is replaced without waiting for a writer.
        fs::remove_file(&path).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
        write_atomic_in(tmp, &path, b"same").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"same");
    }

    #[test]
    fn only_the_stores_own_mapping_folders_are_taken_for_them() {
        let store = Store { root: PathBuf::from("/c/v1") };
        assert_eq!(
            store.unpacked_dir(Some("1000-100000-65536")),
            PathBuf::from("/c/v1/unpacked-userns-1000-100000-65536")
        );
        assert_eq!(store.file_pool_dir(None), PathBuf::from("/c/v1/files"));
        assert_eq!(Store::mapping_folder("unpacked-userns-1000-100000-65536"), Some(true));
        assert_eq!(Store::mapping_folder("files-userns-1000-100000-65536"), Some(false));
        for other in ["unpacked", "files", "unpacked-userns-", "files-other", "unpacked-x", "steps", "tmp"] {
            assert_eq!(Store::mapping_folder(other), None, "{other}");
        }
    }
}
