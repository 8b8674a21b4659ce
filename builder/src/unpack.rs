//! Layers as folders, for the local backend's overlay: each entry made with
//! its owner, mode and time; whiteouts as 0:0 character devices and opaque
//! markers as `trusted.overlay.opaque=y`, the form overlayfs reads.
//!
//! Two ways in: [`unpack_blob`] reads a stored layer through kiln's own tar
//! walker (so its checks apply), and the layer writer fills a
//! [`Materializer`] as it writes a layer a `run` step is about to need, so
//! that layer is never read back.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_cache::Store;

use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::tarball::TarKind;

/// Makes entries under `root`, in layer order.
pub struct Materializer {
    root: PathBuf,
    /// Every path made and its time, for the final pass that sets times.
    made: Vec<(PathBuf, u64)>,
}

impl Materializer {
    pub fn new(root: PathBuf) -> io::Result<Materializer> {
        fs::DirBuilder::new().mode(0o755).create(&root)?;
        Ok(Materializer { root, made: Vec::new() })
    }

    /// Makes one entry; for a regular file, returns the open file to write
    /// its content into (then call [`Materializer::file_done`]).
    pub fn entry(
        &mut self,
        path: &str,
        kind: &TarKind,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: u64,
    ) -> io::Result<Option<fs::File>> {
        let (parent, name) = match path.rsplit_once('/') {
            Some((p, n)) => (self.root.join(p), n),
            None => (self.root.clone(), path),
        };
        if !parent.is_dir() {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(&parent)?;
        }
        if name == ".wh..wh..opq" {
            rustix::fs::setxattr(&parent, "trusted.overlay.opaque", b"y", rustix::fs::XattrFlags::empty())?;
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
        self.made.push((full, mtime));
        Ok(file)
    }

    /// Sets every entry's time; call once, after the last entry (making
    /// an entry changes its folder's time).
    pub fn finish(self) -> io::Result<PathBuf> {
        for (p, mtime) in self.made.iter().rev() {
            let at = rustix::fs::Timespec { tv_sec: *mtime as i64, tv_nsec: 0 };
            let t = rustix::fs::Timestamps { last_access: at, last_modification: at };
            rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)?;
        }
        Ok(self.root)
    }
}

fn remove_any(p: &Path) -> io::Result<()> {
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
    let bad =
        |e: io::Error| BuildError::BadLayer { layer: layer.digest, reason: format!("cannot unpack it: {e}") };
    let file = io::BufReader::with_capacity(1 << 20, store.open_blob(&layer.digest)?);
    let reader: Box<dyn Read> = if layer.media_type.ends_with("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut m = Materializer::new(dest.to_path_buf()).map_err(bad)?;
    let mut buf = vec![0u8; 256 * 1024];
    crate::listing::walk_layer(reader, &layer.digest, &mut |e, data| {
        if let Some(mut f) = m.entry(e.path, e.kind, e.mode, e.uid, e.gid, e.mtime)? {
            loop {
                let n = data.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                f.write_all(&buf[..n])?;
            }
        }
        Ok(())
    })?;
    m.finish().map_err(bad)?;
    Ok(())
}
