//! Layers as folders, for the local backend's overlay: each entry made with
//! its owner, mode and time; whiteouts as 0:0 character devices and opaque
//! markers as `trusted.overlay.opaque=y`, the form overlayfs reads.
//!
//! Two ways in: [`unpack_blob`] reads a stored layer through kiln's own tar
//! walker (so its checks apply), and the layer writer fills a
//! [`Materializer`] as it writes a layer a `run` step is about to need, so
//! that layer is never read back.
//!
//! Regular files go through a pool in the store (`files/SHA-MODE-UID-GID-MTIME`,
//! one inode per content and metadata) and are hard-linked into the layer
//! folder: a layer that differs from an earlier one by one file costs one
//! file's bytes, not the whole layer's. A file enters the pool only after
//! its bytes hashed to the name; nothing ever writes to a pool file or a
//! layer folder afterwards (overlayfs copies a file up before changing it),
//! and `kiln cache gc` removes pool files no folder links to.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::listing::WalkEntry;
use crate::tarball::TarKind;

/// Extended attributes as (name, bytes).
type Xattrs = Vec<(String, Vec<u8>)>;

/// Makes entries under `root`, in layer order.
pub struct Materializer {
    root: PathBuf,
    pool: Option<PathBuf>,
    /// The xattr that marks opaque folders for the overlay that stacks them.
    opaque_xattr: &'static str,
    /// Every path made, its time and xattrs, for the final pass that sets them.
    made: Vec<(PathBuf, u64, Xattrs)>,
    /// A file being written into the pool.
    pending: Option<Pending>,
}

struct Pending {
    tmp: PathBuf,
    name: PathBuf,
    target: PathBuf,
    expect: Digest,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

/// The store's pool of unpacked files.
pub fn pool_dir(store: &Store) -> PathBuf {
    store.root().join("files")
}

impl Materializer {
    /// With `pool`, regular files whose digest is given go through it.
    pub fn new(root: PathBuf, pool: Option<PathBuf>) -> io::Result<Materializer> {
        fs::DirBuilder::new().mode(0o755).create(&root)?;
        if let Some(p) = &pool {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(p)?;
        }
        Ok(Materializer {
            root,
            pool,
            opaque_xattr: crate::changes::OPAQUE_TRUSTED,
            made: Vec::new(),
            pending: None,
        })
    }

    /// Makes one entry; for a regular file, returns the open file to write
    /// its content into (then call [`Materializer::file_done`]).
    /// With `sha256` (a regular file's digest), the file goes through the pool.
    pub fn entry(&mut self, e: &WalkEntry<'_>, sha256: Option<Digest>) -> io::Result<Option<fs::File>> {
        debug_assert!(self.pending.is_none(), "file_done after each pooled file");
        let WalkEntry { path, kind, mode, uid, gid, mtime, xattrs } = *e;
        // A file with xattrs keeps them on its own inode, outside the pool.
        let sha256 = sha256.filter(|_| xattrs.is_empty());
        let (parent, name) = match path.rsplit_once('/') {
            Some((p, n)) => (self.root.join(p), n),
            None => (self.root.clone(), path),
        };
        if !parent.is_dir() {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(&parent)?;
        }
        if name == ".wh..wh..opq" {
            rustix::fs::setxattr(&parent, self.opaque_xattr, b"y", rustix::fs::XattrFlags::empty())?;
            return Ok(None);
        }
        if let Some(victim) = name.strip_prefix(".wh.") {
            let target = parent.join(victim);
            remove_any(&target)?;
            nix::sys::stat::mknod(&target, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
                .map_err(io::Error::from)?;
            return Ok(None);
        }
        let full = parent.join(name);
        let existing = fs::symlink_metadata(&full).ok();
        if let Some(m) = &existing {
            if !(m.is_dir() && matches!(kind, TarKind::Dir)) {
                remove_any(&full)?;
            }
        }
        let mut file = None;
        match kind {
            TarKind::Dir => {
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    fs::DirBuilder::new().mode(0o700).create(&full)?;
                }
            }
            TarKind::File { .. } => {
                if let (Some(pool), Some(sha)) = (&self.pool, sha256) {
                    let name = pool.join(format!("{}-{:o}-{uid}-{gid}-{mtime}", sha.hex(), mode & 0o7777));
                    if name.exists() && link_or_copy(&name, &full).is_ok() {
                        return Ok(None);
                    }
                    let tmp = pool.join(format!(".tmp-{}-{}", std::process::id(), unique()));
                    let f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
                    self.pending =
                        Some(Pending { tmp, name, target: full, expect: sha, mode, uid, gid, mtime });
                    return Ok(Some(f));
                }
                file = Some(fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&full)?);
            }
            TarKind::Symlink(t) => std::os::unix::fs::symlink(t, &full)?,
            TarKind::Hardlink(t) => {
                fs::hard_link(self.root.join(t), &full)?;
                return Ok(None); // shares the target's inode and metadata
            }
            TarKind::CharDev(a, b) | TarKind::BlockDev(a, b) => {
                let t = if matches!(kind, TarKind::CharDev(..)) {
                    nix::sys::stat::SFlag::S_IFCHR
                } else {
                    nix::sys::stat::SFlag::S_IFBLK
                };
                let dev = libc::makedev(*a, *b);
                nix::sys::stat::mknod(&full, t, nix::sys::stat::Mode::empty(), dev)
                    .map_err(io::Error::from)?;
            }
            TarKind::Fifo => {
                nix::unistd::mkfifo(&full, nix::sys::stat::Mode::empty()).map_err(io::Error::from)?;
            }
        }
        // Owner first: chown clears setuid and setgid, the mode then sets them.
        std::os::unix::fs::lchown(&full, Some(uid), Some(gid))?;
        if !matches!(kind, TarKind::Symlink(_)) {
            fs::set_permissions(&full, fs::Permissions::from_mode(mode & 0o7777))?;
        }
        // Set in `finish`: chown and writing the content both drop file capabilities.
        let mut attrs = Vec::new();
        for (k, v) in xattrs {
            let v = hex::decode(v).map_err(|_| io::Error::other(format!("bad xattr value for {k}")))?;
            attrs.push((k.clone(), v));
        }
        self.made.push((full, mtime, attrs));
        Ok(file)
    }

    /// After a pooled file's content is written: `got` is what it hashed to.
    /// A file that does not match never enters the pool.
    pub fn file_done(&mut self, got: &Digest) -> io::Result<()> {
        let Some(p) = self.pending.take() else { return Ok(()) };
        if *got != p.expect {
            let _ = fs::remove_file(&p.tmp);
            return Err(io::Error::other(format!(
                "`{}` changed while it was unpacked (expected {}, got {got})",
                p.target.display(),
                p.expect
            )));
        }
        std::os::unix::fs::lchown(&p.tmp, Some(p.uid), Some(p.gid))?;
        fs::set_permissions(&p.tmp, fs::Permissions::from_mode(p.mode & 0o7777))?;
        set_time(&p.tmp, p.mtime)?;
        fs::rename(&p.tmp, &p.name)?;
        link_or_copy(&p.name, &p.target)
    }

    /// Sets every entry's time; call once, after the last entry (making
    /// an entry changes its folder's time).
    pub fn finish(self) -> io::Result<PathBuf> {
        for (p, mtime, attrs) in self.made.iter().rev() {
            for (k, v) in attrs {
                rustix::fs::lsetxattr(p, k.as_str(), v, rustix::fs::XattrFlags::empty())?;
            }
            set_time(p, *mtime)?;
        }
        Ok(self.root)
    }
}

fn set_time(p: &Path, mtime: u64) -> io::Result<()> {
    let at = rustix::fs::Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
    let t = rustix::fs::Timestamps { last_access: at, last_modification: at };
    rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// A hard link to a pool file; a copy if the file has too many links.
fn link_or_copy(pool_file: &Path, target: &Path) -> io::Result<()> {
    match fs::hard_link(pool_file, target) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
            fs::copy(pool_file, target)?;
            let md = fs::metadata(pool_file)?;
            std::os::unix::fs::lchown(target, Some(md.uid()), Some(md.gid()))?;
            fs::set_permissions(target, md.permissions())?;
            set_time(target, md.mtime() as u64)
        }
        Err(e) => Err(e),
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Removes whatever is at `p` (a folder with its contents); nothing there is fine.
pub(crate) fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Unpacks a stored layer into `dest` (a new folder), streaming its tar
/// through kiln's walker.
pub fn unpack_blob(store: &Store, layer: &ImageLayer, dest: &Path) -> Result<(), BuildError> {
    unpack_blob_styled(store, layer, dest, pool_dir(store), crate::changes::OPAQUE_TRUSTED)
}

/// [`unpack_blob`] with its own file pool and opaque marker (rootless
/// folders carry other owners and `user.overlay.opaque`).
pub fn unpack_blob_styled(
    store: &Store,
    layer: &ImageLayer,
    dest: &Path,
    pool: PathBuf,
    opaque_xattr: &'static str,
) -> Result<(), BuildError> {
    let bad =
        |e: io::Error| BuildError::BadLayer { layer: layer.digest, reason: format!("cannot unpack it: {e}") };
    let reader = layer.open_tar(store)?;
    let listing = crate::listing::Listing::load(store, layer)?;
    let sha_of = |path: &str| match listing.entries.binary_search_by(|e| e.path.as_str().cmp(path)) {
        Ok(i) => match &listing.entries[i].kind {
            crate::listing::Kind::File { sha256, .. } => Some(*sha256),
            _ => None,
        },
        Err(_) => None,
    };
    let mut m = Materializer::new(dest.to_path_buf(), Some(pool)).map_err(bad)?;
    m.opaque_xattr = opaque_xattr;
    let mut buf = vec![0u8; 256 * 1024];
    crate::listing::walk_layer(reader, &layer.digest, &mut |e, data| {
        let sha = if matches!(e.kind, TarKind::File { .. }) { sha_of(e.path) } else { None };
        if let Some(mut f) = m.entry(e, sha)? {
            use sha2::Digest as _;
            let mut hasher = sha2::Sha256::new();
            loop {
                let n = data.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                f.write_all(&buf[..n])?;
            }
            m.file_done(&Digest::from_hasher(hasher))?;
        }
        Ok(())
    })?;
    m.finish().map_err(bad)?;
    Ok(())
}
