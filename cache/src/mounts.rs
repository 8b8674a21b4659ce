//! Cache mounts: folders `run` steps mount read-write (`cache = [...]`),
//! kept in the store by id across builds. They are never part of a layer or
//! a key; `kiln cache du|ls|prune` count and remove them.
//!
//! ```text
//! v1/mounts/HEX/id      the id (HEX is its sha256); its mtime is the last use
//! v1/mounts/HEX/lock    flock: exclusive for a `locked` or `private` step
//! v1/mounts/HEX/data/   what the steps mount
//! ```
//!
//! What a step leaves in `data/` is the step's (it ran as root in its
//! sandbox): kiln only ever walks it without following links, and removes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::digest::Digest;
use crate::lock::StoreLock;
use crate::store::{Store, StoreError};

const MOUNTS: &str = "mounts";

/// One cache mount as `kiln cache ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CacheMountInfo {
    pub id: String,
    #[serde(skip)]
    pub(crate) dir: PathBuf,
    pub bytes: u64,
    pub files: u64,
    pub used_unix: u64,
}

/// A cache mount ready for a step: the folder to mount, whether it was just
/// made (so the step's user should own it), and the lock that keeps other
/// steps out while this one runs (`locked`, `private`).
#[derive(Debug)]
pub struct MountLease {
    pub data: PathBuf,
    pub fresh: bool,
    _lock: Option<StoreLock>,
    /// A private instance, removed when the lease is dropped.
    private: Option<tempfile::TempDir>,
}

impl Drop for MountLease {
    fn drop(&mut self) {
        if let Some(p) = self.private.take() {
            let _ = p.close();
        }
    }
}

/// How a step takes a cache mount (see `kiln_recipes::Sharing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Shared,
    Locked,
    Private,
}

impl Store {
    fn mounts_dir(&self) -> PathBuf {
        self.root().join(MOUNTS)
    }

    fn mount_dir(&self, id: &str) -> PathBuf {
        self.mounts_dir().join(Digest::of(id.as_bytes()).hex())
    }

    /// `mounts/`, 0700: what steps leave in a cache mount (device nodes,
    /// setuid programs they made as root in their sandbox) is reachable on
    /// the host by kiln's own user only.
    fn private_mounts_dir(&self) -> Result<PathBuf, StoreError> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = self.mounts_dir();
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io(&dir)(e)),
        }
        let meta = fs::symlink_metadata(&dir).map_err(StoreError::io(&dir))?;
        if !meta.is_dir() {
            return Err(StoreError::io(&dir)(std::io::Error::other("it is not a folder")));
        }
        if meta.permissions().mode() & 0o777 != 0o700 {
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(StoreError::io(&dir))?;
        }
        Ok(dir)
    }

    /// Takes the cache mount `id`, making it (0755, owned by kiln) when it is
    /// new. `locked` waits for the step using it (calling `waiting` first);
    /// `private` gets an empty folder of its own when another step has it.
    pub fn take_mount(&self, id: &str, how: Take, waiting: &dyn Fn()) -> Result<MountLease, StoreError> {
        self.private_mounts_dir()?;
        let dir = self.mount_dir(id);
        let data = dir.join("data");
        let mut fresh = false;
        if fs::symlink_metadata(&data).is_err() {
            fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
            let tmp = self.new_mount_dir("mount-")?;
            // Another build may make it at the same time: the first rename wins.
            match fs::rename(tmp.path(), &data) {
                Ok(()) => {
                    fresh = true;
                    let _ = tmp.keep(); // it is `data` now
                }
                Err(_) if data.is_dir() => {}
                Err(e) => return Err(StoreError::io(&data)(e)),
            }
        }
        let meta = fs::symlink_metadata(&data).map_err(StoreError::io(&data))?;
        if !meta.is_dir() {
            return Err(StoreError::io(&data)(std::io::Error::other(
                "the cache mount's folder is not a folder",
            )));
        }
        crate::store::write_atomic_in(&self.tmp_dir(), &dir.join("id"), id.as_bytes())
            .map_err(StoreError::io(dir.join("id")))?;
        let lock_path = dir.join("lock");
        let (lock, private) = match how {
            // Shared: with the other shared steps, so a `locked` step waits for them
            // and a `private` one sees them.
            Take::Shared => (
                Some(StoreLock::shared_waiting(&lock_path, waiting).map_err(StoreError::io(&lock_path))?),
                None,
            ),
            Take::Locked => {
                (Some(StoreLock::exclusive(&lock_path, waiting).map_err(StoreError::io(&lock_path))?), None)
            }
            Take::Private => {
                match StoreLock::try_exclusive(&lock_path).map_err(StoreError::io(&lock_path))? {
                    Some(l) => (Some(l), None),
                    None => {
                        let t = self.new_mount_dir("private-mount-")?;
                        return Ok(MountLease {
                            data: t.path().to_path_buf(),
                            fresh: true,
                            _lock: None,
                            private: Some(t),
                        });
                    }
                }
            }
        };
        Ok(MountLease { data, fresh, _lock: lock, private })
    }

    /// An empty folder in `tmp/`, 0755 whatever the umask.
    fn new_mount_dir(&self, prefix: &str) -> Result<tempfile::TempDir, StoreError> {
        let t = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(self.tmp_dir())
            .map_err(StoreError::io(self.tmp_dir()))?;
        fs::set_permissions(t.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(StoreError::io(t.path()))?;
        Ok(t)
    }

    /// The folder of the cache mount `id`, when there is one.
    pub fn mount_data(&self, id: &str) -> Option<PathBuf> {
        let data = self.mount_dir(id).join("data");
        fs::symlink_metadata(&data).is_ok_and(|m| m.is_dir()).then_some(data)
    }

    /// Makes the cache mount `id` from what `fill` puts in an empty folder,
    /// unless it exists (then `Ok(false)`): `--cache-from` with
    /// `--cache-mounts` never replaces a local cache.
    pub fn restore_mount(
        &self,
        id: &str,
        fill: &mut dyn FnMut(&Path) -> Result<(), String>,
    ) -> Result<Result<bool, String>, StoreError> {
        if self.mount_data(id).is_some() {
            return Ok(Ok(false));
        }
        self.private_mounts_dir()?;
        let tmp = self.new_mount_dir("restore-")?;
        if let Err(why) = fill(tmp.path()) {
            return Ok(Err(why));
        }
        let dir = self.mount_dir(id);
        fs::create_dir_all(&dir).map_err(StoreError::io(&dir))?;
        let data = dir.join("data");
        match fs::rename(tmp.path(), &data) {
            Ok(()) => {
                let _ = tmp.keep();
            }
            Err(_) if data.is_dir() => return Ok(Ok(false)), // another build made it first
            Err(e) => return Err(StoreError::io(&data)(e)),
        }
        crate::store::write_atomic_in(&self.tmp_dir(), &dir.join("id"), id.as_bytes())
            .map_err(StoreError::io(dir.join("id")))?;
        Ok(Ok(true))
    }

    /// Moves every cache mount of this store into `other` (which has none):
    /// `kiln verify`'s second build starts with what the first left.
    pub fn hand_mounts_to(&self, other: &Store) -> Result<(), StoreError> {
        let from = self.mounts_dir();
        if !from.exists() {
            return Ok(());
        }
        let to = other.mounts_dir();
        fs::rename(&from, &to).map_err(StoreError::io(&to))
    }

    /// Every cache mount, least recently used first, with its size.
    pub fn cache_mounts(&self) -> Result<Vec<CacheMountInfo>, StoreError> {
        let root = self.mounts_dir();
        let mut out = Vec::new();
        let rd = match fs::read_dir(&root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(StoreError::io(&root)(e)),
        };
        for e in rd {
            let e = e.map_err(StoreError::io(&root))?;
            let dir = e.path();
            let idf = dir.join("id");
            let Ok(id) = fs::read(&idf) else { continue };
            let used =
                fs::symlink_metadata(&idf).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
            let (bytes, files) = tree_size(&dir.join("data"));
            out.push(CacheMountInfo {
                id: String::from_utf8_lossy(&id).into_owned(),
                dir,
                bytes,
                files,
                used_unix: used.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            });
        }
        out.sort_by(|a, b| a.used_unix.cmp(&b.used_unix).then_with(|| a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Removes a cache mount (its folder and what the steps left in it). It
    /// is moved into `tmp/` first: files a rootless step's other users made
    /// there are not kiln's to remove, and `tmp/` is what the rootless
    /// cleanup (`rootless_garbage`) empties with the helper.
    pub(crate) fn remove_mount(&self, m: &CacheMountInfo) {
        let Some(name) = m.dir.file_name() else { return };
        let gone = self.tmp_dir().join(format!("gone-mount-{}", name.to_string_lossy()));
        let at = match fs::rename(&m.dir, &gone) {
            Ok(()) => gone,
            Err(_) => m.dir.clone(),
        };
        let _ = fs::remove_dir_all(&at);
    }
}

/// Bytes on disk (blocks, as `du` counts them: each inode once, a sparse
/// file by what it holds) and entries under `dir`, never following a symlink.
fn tree_size(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut files) = (0, 0);
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            files += 1;
            if seen.insert((m.dev(), m.ino())) {
                bytes += m.blocks() * 512;
            }
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, files)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn mounts_persist_by_id_and_lock_and_private_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.take_mount("pip", Take::Shared, &|| {}).unwrap();
        assert!(a.fresh);
        fs::write(a.data.join("wheel"), b"12345").unwrap();
        drop(a);
        let b = store.take_mount("pip", Take::Shared, &|| {}).unwrap();
        assert!(!b.fresh);
        assert_eq!(fs::read(b.data.join("wheel")).unwrap(), b"12345");
        // A shared user counts: a private step gets a folder of its own.
        let private = store.take_mount("pip", Take::Private, &|| {}).unwrap();
        assert_ne!(private.data, b.data);
        drop(private);
        let shared_data = b.data.clone();
        drop(b);

        let locked = store.take_mount("pip", Take::Locked, &|| {}).unwrap();
        // A private step finds it taken: it gets an empty folder of its own, gone after.
        let private = store.take_mount("pip", Take::Private, &|| {}).unwrap();
        assert_ne!(private.data, locked.data);
        assert!(private.fresh && fs::read_dir(&private.data).unwrap().next().is_none());
        let gone = private.data.clone();
        drop(private);
        assert!(!gone.exists());
        drop(locked);
        let private = store.take_mount("pip", Take::Private, &|| {}).unwrap();
        assert_eq!(private.data, shared_data, "free again: the shared folder itself");

        drop(private);
        let list = store.cache_mounts().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].id.as_str(), list[0].files), ("pip", 1));
        assert!(list[0].bytes >= 5, "{}", list[0].bytes);
        let mode = fs::metadata(dir.path().join("v1/mounts")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "what steps leave there is kiln's user's alone");
        store.remove_mount(&list[0]);
        assert!(store.cache_mounts().unwrap().is_empty());
    }

    #[test]
    fn sizes_do_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = store.take_mount("x", Take::Shared, &|| {}).unwrap();
        std::os::unix::fs::symlink("/", m.data.join("root")).unwrap();
        fs::create_dir(m.data.join("d")).unwrap();
        fs::write(m.data.join("d/f"), b"abc").unwrap();
        // A hard link counts once; a sparse file by its blocks.
        fs::hard_link(m.data.join("d/f"), m.data.join("d/g")).unwrap();
        let sparse = fs::File::create(m.data.join("sparse")).unwrap();
        sparse.set_len(1 << 30).unwrap();
        let list = store.cache_mounts().unwrap();
        assert_eq!(list[0].files, 5);
        assert!(list[0].bytes < 1 << 20, "on disk, not lengths: {}", list[0].bytes);
        store.remove_mount(&list[0]);
        assert!(Path::new("/").join("etc").exists(), "removal did not follow the link");
    }
}
