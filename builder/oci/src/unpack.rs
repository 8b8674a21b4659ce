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
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode};

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::listing::WalkEntry;
use crate::rootdir::{self, RootDir};
use crate::tarball::TarKind;

/// The xattr that marks an opaque folder for an overlay mounted as root.
pub const OPAQUE_TRUSTED: &str = "trusted.overlay.opaque";
/// ... and for one mounted in a user namespace (`userxattr`).
pub const OPAQUE_USER: &str = "user.overlay.opaque";

/// Extended attributes as (name, bytes).
type Xattrs = Vec<(String, Vec<u8>)>;

/// Makes entries under `root`, in layer order, through a [`RootDir`]: no
/// entry is ever made, removed or linked through a symlink.
pub struct Materializer {
    root: RootDir,
    pool: Option<PathBuf>,
    /// The xattr that marks opaque folders for the overlay that stacks them.
    opaque_xattr: &'static str,
    /// Every path made, its time and xattrs, for the final pass that sets
    /// them; `None` for a path whose inode kiln must not touch (a link to a
    /// pool file or to another entry). The last record of a path wins.
    made: Vec<(String, Option<(u64, Xattrs)>)>,
    /// A file being written into the pool.
    pending: Option<Pending>,
}

struct Pending {
    tmp: PathBuf,
    name: PathBuf,
    target: String,
    expect: Digest,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
}

/// The pool file of a content (its sha256) with this metadata.
fn pool_name(pool: &Path, sha: &Digest, mode: u32, uid: u32, gid: u32, mtime: u64) -> PathBuf {
    pool.join(format!("{}-{:o}-{uid}-{gid}-{mtime}", sha.hex(), mode & 0o7777))
}

/// Puts `bytes`, whose sha256 the caller took as it read them, into the
/// pool with this metadata, unless the pool has that file: the layer
/// writer then links it instead of writing it (a .deb's files are pooled
/// as they are decoded, while the rest download). Returns the file's name
/// when this call made it (hold it in a [`PoolFiles`], which removes it
/// unless something links it). Best effort: a file that cannot be made is
/// made when the layer is written, as without this.
pub fn put_in_pool(
    pool: &Path,
    sha: &Digest,
    bytes: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
) -> Option<PathBuf> {
    let name = pool_name(pool, sha, mode, uid, gid, mtime);
    if name.exists() {
        return None;
    }
    debug_assert_eq!(Digest::of(bytes), *sha, "a file enters the pool only under its own digest");
    // A random name made with O_EXCL (kilns in several containers may
    // share the pool and the same pid), removed on any failure.
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(pool).ok()?;
    let made = (|| -> io::Result<()> {
        tmp.write_all(bytes)?;
        let f = tmp.as_file();
        // Owner first: chown clears setuid and setgid, the mode then sets them.
        std::os::unix::fs::fchown(f, Some(uid), Some(gid))?;
        f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
        let at = rustix::fs::Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
        rustix::fs::futimens(f, &rustix::fs::Timestamps { last_access: at, last_modification: at })?;
        Ok(())
    })();
    made.ok()?;
    tmp.persist(&name).ok()?;
    Some(name)
}

/// Pool files made ahead of the folder that is to link them. When this is
/// dropped, those that nothing links (one link left) are removed: a build
/// that failed before its folder was made, or a file the layer did not
/// take (a path shipped twice), leaves nothing behind in the pool.
#[derive(Debug, Default)]
pub struct PoolFiles(Vec<PathBuf>);

impl PoolFiles {
    pub fn push(&mut self, name: PathBuf) {
        self.0.push(name);
    }

    /// Takes `other`'s files over.
    pub fn append(&mut self, other: &mut PoolFiles) {
        self.0.append(&mut other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Drop for PoolFiles {
    fn drop(&mut self) {
        for name in self.0.drain(..) {
            if fs::symlink_metadata(&name).is_ok_and(|m| m.nlink() == 1) {
                let _ = fs::remove_file(&name);
            }
        }
    }
}

/// The store's pool of unpacked files.
pub fn pool_dir(store: &Store) -> PathBuf {
    store.file_pool_dir(None)
}

impl Materializer {
    /// With `pool`, regular files whose digest is given go through it.
    pub fn new(root: PathBuf, pool: Option<PathBuf>) -> io::Result<Materializer> {
        fs::DirBuilder::new().mode(0o755).create(&root)?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))?;
        if let Some(p) = &pool {
            fs::DirBuilder::new().recursive(true).mode(0o700).create(p)?;
        }
        Ok(Materializer {
            root: RootDir::open(&root)?,
            pool,
            opaque_xattr: OPAQUE_TRUSTED,
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
        // Layers need not list every parent: missing ones are made 0755.
        let (dir, name) = self.root.parent(path, Some(&mut |_| {}))?;
        if name == crate::whiteout::OPAQUE {
            rootdir::set_xattr(&dir, ".", self.opaque_xattr, b"y")?;
            return Ok(None);
        }
        if let Some(victim) = name.strip_prefix(crate::whiteout::WHITEOUT) {
            self.root.remove_in(&dir, victim)?;
            rustix::fs::mknodat(&dir, victim, FileType::CharacterDevice, Mode::empty(), 0)?;
            return Ok(None);
        }
        let existing = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(FileType::from_raw_mode(st.st_mode)),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(e.into()),
        };
        let is_dir = existing == Some(FileType::Directory);
        if existing.is_some() && !(is_dir && matches!(kind, TarKind::Dir)) {
            self.root.remove_in(&dir, name)?;
        }
        let mut file = None;
        match kind {
            TarKind::Dir => {
                if !is_dir {
                    rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))?;
                }
            }
            TarKind::File { .. } => {
                if let (Some(pool), Some(sha)) = (&self.pool, sha256) {
                    let pooled = pool_name(pool, &sha, mode, uid, gid, mtime);
                    if pooled.exists() && link_or_copy(&pooled, &dir, name).is_ok() {
                        self.made.push((path.to_string(), None));
                        return Ok(None);
                    }
                    // A random name made with O_EXCL (kilns in several
                    // containers may share the pool and the same pid).
                    let (f, tmp) = tempfile::Builder::new()
                        .prefix(".tmp-")
                        .tempfile_in(pool)?
                        .keep()
                        .map_err(|e| e.error)?;
                    self.made.push((path.to_string(), None));
                    self.pending = Some(Pending {
                        tmp,
                        name: pooled,
                        target: path.to_string(),
                        expect: sha,
                        mode,
                        uid,
                        gid,
                        mtime,
                    });
                    return Ok(Some(f));
                }
                file = Some(rootdir::create_file(&dir, name, 0o600)?);
            }
            TarKind::Symlink(t) => rustix::fs::symlinkat(t.as_str(), &dir, name)?,
            TarKind::Hardlink(t) => {
                // The target is resolved inside the root like any path, and
                // must be something this layer made that is not a folder.
                let (tdir, tname) = self.root.parent(t, None)?;
                let st = rustix::fs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW)?;
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                    return Err(io::Error::other(format!(
                        "the hard link `{path}` points to the folder `{t}`"
                    )));
                }
                rustix::fs::linkat(&tdir, tname, &dir, name, AtFlags::empty())?;
                self.made.push((path.to_string(), None));
                return Ok(None); // shares the target's inode and metadata
            }
            TarKind::CharDev(a, b) | TarKind::BlockDev(a, b) => {
                let t = if matches!(kind, TarKind::CharDev(..)) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                rustix::fs::mknodat(&dir, name, t, Mode::empty(), rustix::fs::makedev(*a, *b))?;
            }
            TarKind::Fifo => rustix::fs::mknodat(&dir, name, FileType::Fifo, Mode::empty(), 0)?,
        }
        // Owner first: chown clears setuid and setgid, the mode then sets them.
        rustix::fs::chownat(
            &dir,
            name,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if !matches!(kind, TarKind::Symlink(_)) {
            rustix::fs::chmodat(&dir, name, Mode::from_raw_mode(mode & 0o7777), AtFlags::empty())?;
        }
        // Set in `finish`: chown and writing the content both drop file capabilities.
        let mut attrs = Vec::new();
        for (k, v) in xattrs {
            let v = hex::decode(v).map_err(|_| io::Error::other(format!("bad xattr value for {k}")))?;
            attrs.push((k.clone(), v));
        }
        self.made.push((path.to_string(), Some((mtime, attrs))));
        Ok(file)
    }

    /// After a pooled file's content is written: `got` is what it hashed to.
    /// A file that does not match never enters the pool.
    pub(crate) fn file_done(&mut self, got: &Digest) -> io::Result<()> {
        let Some(p) = self.pending.take() else { return Ok(()) };
        if *got != p.expect {
            let _ = fs::remove_file(&p.tmp);
            return Err(io::Error::other(format!(
                "`{}` changed while it was unpacked (expected {}, got {got})",
                p.target, p.expect
            )));
        }
        std::os::unix::fs::lchown(&p.tmp, Some(p.uid), Some(p.gid))?;
        fs::set_permissions(&p.tmp, fs::Permissions::from_mode(p.mode & 0o7777))?;
        set_time(&p.tmp, p.mtime)?;
        fs::rename(&p.tmp, &p.name)?;
        let (dir, name) = self.root.parent(&p.target, None)?;
        link_or_copy(&p.name, &dir, name)
    }

    /// Sets every entry's time; call once, after the last entry (making
    /// an entry changes its folder's time).
    pub fn finish(mut self) -> io::Result<PathBuf> {
        let made = std::mem::take(&mut self.made);
        // Newest first: a path given twice gets what its last entry says,
        // and an earlier entry's xattrs or time never reach an inode a later
        // entry of the same path shares with the pool or another file.
        let mut done = std::collections::HashSet::new();
        for (p, what) in made.iter().rev() {
            if !done.insert(p.as_str()) {
                continue;
            }
            let Some((mtime, attrs)) = what else { continue };
            let (dir, name) = self.root.parent(p, None)?;
            for (k, v) in attrs {
                rootdir::set_xattr(&dir, name, k, v)?;
            }
            rootdir::set_time_at(&dir, name, *mtime)?;
        }
        Ok(self.root.path().to_path_buf())
    }
}

fn set_time(p: &Path, mtime: u64) -> io::Result<()> {
    let at = rustix::fs::Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
    let t = rustix::fs::Timestamps { last_access: at, last_modification: at };
    rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

/// A hard link to a pool file at `name` in `dir`; a copy if the file has
/// too many links.
fn link_or_copy(pool_file: &Path, dir: &OwnedFd, name: &str) -> io::Result<()> {
    match rustix::fs::linkat(rustix::fs::CWD, pool_file, dir, name, AtFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::MLINK) => {
            let mut src = fs::File::open(pool_file)?;
            let md = src.metadata()?;
            let mut dst = rootdir::create_file(dir, name, 0o600)?;
            io::copy(&mut src, &mut dst)?;
            std::os::unix::fs::fchown(&dst, Some(md.uid()), Some(md.gid()))?;
            dst.set_permissions(md.permissions())?;
            drop(dst);
            rootdir::set_time_at(dir, name, md.mtime() as u64)
        }
        Err(e) => Err(e.into()),
    }
}

/// Unpacks one layer blob into `dir/DIFF_ID` unless it is there, atomically:
/// a temp folder, then rename. Files go through `pool`; opaque folders get
/// `opaque_xattr` (root and rootless overlays read different ones).
pub fn unpack_into(
    store: &Store,
    layer: &ImageLayer,
    dir: &Path,
    pool: PathBuf,
    opaque_xattr: &'static str,
) -> Result<(), BuildError> {
    let dest = dir.join(layer.diff_id.hex());
    if dest.is_dir() {
        if check_seal(store, &dest, &pool) {
            return Ok(());
        }
        // Corrupt or unsealed: moved aside (a build using it keeps its
        // view) and made again.
        let aside = tempfile::Builder::new()
            .prefix("stale-")
            .tempdir_in(store.tmp_dir())
            .map_err(BuildError::io_write(store.tmp_dir()))?;
        if fs::rename(&dest, aside.path().join("layer")).is_err() && dest.is_dir() {
            return Err(BuildError::Environment {
                message: format!(
                    "The unpacked layer `{}` is corrupt and cannot be moved aside",
                    dest.display()
                ),
                hint: "run `kiln cache prune --max-size 0` (or remove the folder) and build again".into(),
            });
        }
    }
    fs::create_dir_all(dir).map_err(BuildError::io_write(dir))?;
    if !store.verify_blob(&layer.digest)? {
        return Err(BuildError::BadLayer {
            layer: layer.digest,
            reason: "its blob is missing or corrupt".into(),
        });
    }
    let tmp = store.tmp_dir();
    let stage =
        tempfile::Builder::new().prefix("unpack-").tempdir_in(&tmp).map_err(BuildError::io_write(&tmp))?;
    let root = stage.path().join("root");
    let listing = unpack_blob_styled(store, layer, &root, pool, opaque_xattr)?;
    adopt(&root, &dest)?;
    seal(store, &dest, &listing)
}

/// Moves an unpacked folder into place; another build may have been first.
pub fn adopt(root: &Path, dest: &Path) -> Result<bool, BuildError> {
    match fs::rename(root, dest) {
        Ok(()) => Ok(true),
        Err(_) if dest.is_dir() => Ok(false),
        Err(e) => Err(BuildError::Write { path: dest.to_path_buf(), source: e }),
    }
}

/// Unpacks a stored layer into `dest` (a new folder), streaming its tar
/// through kiln's walker.
#[cfg(test)]
pub(crate) fn unpack_blob(store: &Store, layer: &ImageLayer, dest: &Path) -> Result<(), BuildError> {
    unpack_blob_styled(store, layer, dest, pool_dir(store), OPAQUE_TRUSTED).map(drop)
}

/// [`unpack_blob`] with its own file pool and opaque marker (rootless
/// folders carry other owners and `user.overlay.opaque`). Returns the
/// layer's listing, which it reads anyway (for the folder's seal).
pub(crate) fn unpack_blob_styled(
    store: &Store,
    layer: &ImageLayer,
    dest: &Path,
    pool: PathBuf,
    opaque_xattr: &'static str,
) -> Result<crate::listing::ListingFile, BuildError> {
    let bad =
        |e: io::Error| BuildError::BadLayer { layer: layer.digest, reason: format!("cannot unpack it: {e}") };
    let reader = layer.open_tar(store)?;
    let listing = crate::listing::Listing::load(store, layer)?;
    let sha_of = |path: &str| -> io::Result<Option<Digest>> {
        Ok(match listing.get(path)?.map(|e| e.kind) {
            Some(crate::listing::Kind::File { sha256, .. }) => Some(sha256),
            _ => None,
        })
    };
    let mut m = Materializer::new(dest.to_path_buf(), Some(pool)).map_err(bad)?;
    m.opaque_xattr = opaque_xattr;
    let mut buf = vec![0u8; 256 * 1024];
    crate::listing::walk_layer(reader, &layer.digest, &mut |e, data| {
        let sha = if matches!(e.kind, TarKind::File { .. }) { sha_of(e.path)? } else { None };
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
    })
    .map_err(|e| under(e, dest))?;
    m.finish().map_err(bad)?;
    Ok(listing)
}

/// What an unpacked layer folder held when kiln made it: each regular
/// file's path, content digest and the stamp (inode, size, ctime) its
/// bytes had then. Any write to a file, through any of its hard links,
/// changes its ctime, so a folder whose stamps all match holds the bytes
/// its layer says; one that does not is re-hashed, and rebuilt if wrong,
/// like a blob of the store ([`kiln_cache::Store::verify_blob`]).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Seal {
    files: Vec<Sealed>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Sealed {
    path: String,
    sha256: Digest,
    ino: u64,
    size: u64,
    ctime: i64,
    ctime_nsec: i64,
}

/// The record name of the seal of `dir/DIFF_ID` (`dir` is `unpacked` or a
/// rootless mapping's folder).
fn seal_name(folder: &Path) -> String {
    let parent = folder.parent().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    let leaf = folder.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{}-{leaf}", parent.unwrap_or_default())
}

/// Records the seal of `folder`, just made from a layer with `listing`.
pub fn seal(store: &Store, folder: &Path, listing: &crate::listing::ListingFile) -> Result<(), BuildError> {
    let mut files = Vec::new();
    let damaged = |e: io::Error| BuildError::Integrity {
        message: format!("The listing of the layer unpacked at `{}` cannot be read: {e}", folder.display()),
        hint: "Remove the cache's `listings` folder: kiln lists each layer again from its blob.".into(),
    };
    for e in listing.iter().map_err(damaged)? {
        let e = e.map_err(damaged)?;
        if let crate::listing::Kind::File { sha256, .. } = &e.kind {
            let name = e.path.rsplit('/').next().unwrap_or(&e.path);
            if name.starts_with(crate::whiteout::WHITEOUT) {
                continue; // whiteouts are character devices in the folder
            }
            let md = fs::symlink_metadata(folder.join(&e.path))
                .map_err(BuildError::io_read(folder.join(&e.path)))?;
            files.push(Sealed {
                path: e.path.clone(),
                sha256: *sha256,
                ino: md.ino(),
                size: md.len(),
                ctime: md.ctime(),
                ctime_nsec: md.ctime_nsec(),
            });
        }
    }
    Ok(store.write_record(kiln_cache::RecordKind::Seal, &seal_name(folder), &Seal { files })?)
}

/// Whether `folder` still holds what its seal says. Files whose stamp
/// changed are hashed again: a right one gets a new stamp; a wrong one
/// (a flipped byte in the shared file pool) is removed from the pool with
/// every link to it, and `false` says the folder must be made again.
pub fn check_seal(store: &Store, folder: &Path, pool: &Path) -> bool {
    let name = seal_name(folder);
    let Some(mut seal) = store.read_record::<Seal>(kiln_cache::RecordKind::Seal, &name) else { return false };
    let mut changed = false;
    for f in &mut seal.files {
        let p = folder.join(&f.path);
        let Ok(md) = fs::symlink_metadata(&p) else { return false };
        if md.is_file()
            && (md.ino(), md.len(), md.ctime(), md.ctime_nsec()) == (f.ino, f.size, f.ctime, f.ctime_nsec)
        {
            continue;
        }
        let right = md.is_file()
            && md.len() == f.size
            && crate::image::open_regular(&p).is_ok_and(|file| {
                let mut h = sha2::Sha256::default();
                io::copy(&mut io::BufReader::new(file), &mut DigestWriter(&mut h)).is_ok()
                    && Digest::from_hasher(h) == f.sha256
            });
        if !right {
            tracing::warn!(file = %p.display(), "an unpacked file does not hold its layer's bytes; unpacking the layer again");
            remove_from_pool(pool, md.dev(), md.ino());
            return false;
        }
        // Re-read after hashing: the stamp the right bytes have now.
        let Ok(md) = fs::symlink_metadata(&p) else { return false };
        (f.ino, f.size, f.ctime, f.ctime_nsec) = (md.ino(), md.len(), md.ctime(), md.ctime_nsec());
        changed = true;
    }
    if changed {
        let _ = store.write_record(kiln_cache::RecordKind::Seal, &name, &seal);
    }
    true
}

/// Removes the pool file with this inode (it is corrupt).
fn remove_from_pool(pool: &Path, dev: u64, ino: u64) {
    let Ok(rd) = fs::read_dir(pool) else { return };
    for e in rd.flatten() {
        if let Ok(md) = e.metadata() {
            if md.dev() == dev && md.ino() == ino {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

struct DigestWriter<'a>(&'a mut sha2::Sha256);

impl Write for DigestWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sha2::Digest::update(self.0, buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A write error of a layer walk names the entry; the user needs where it was written.
pub fn under(e: BuildError, root: &Path) -> BuildError {
    match e {
        BuildError::Write { path, source } if path.is_relative() => {
            BuildError::Write { path: root.join(path), source }
        }
        e => e,
    }
}
