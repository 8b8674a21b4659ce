//! One resolver for paths inside an image root on the host: unpacking a
//! layer for the local backend and flattening an image for `-o vm:` make
//! every entry through it, so a hostile layer cannot make kiln write,
//! delete or link anything outside the root.
//!
//! Every folder on the way to an entry is opened one component at a time
//! with `O_NOFOLLOW | O_DIRECTORY` from the root's own descriptor, and the
//! entry itself is then made, removed or changed with the `*at` calls on
//! that folder's descriptor, never following a symlink in its last
//! component either. A symlink the image holds is something kiln makes,
//! never something it goes through (runc and filepath-securejoin resolve
//! the same way; CVE-2024-21626 is what happens when one path does not).

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

/// A folder on the host whose entries are all reached without symlinks.
pub struct RootDir {
    path: PathBuf,
    fd: OwnedFd,
    /// The last folder looked up, reused for its siblings (tar entries come
    /// grouped by folder). Dropped whenever something is removed.
    last: Option<(String, OwnedFd)>,
}

impl RootDir {
    /// Opens `path`, an existing folder kiln owns (not a symlink).
    pub fn open(path: &Path) -> io::Result<RootDir> {
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty())?;
        Ok(RootDir { path: path.to_path_buf(), fd, last: None })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The folder `rel` (relative, clean; "" is the root), reached without
    /// following any symlink. With `make`, missing folders are made 0755
    /// (whatever the umask) and `made` is told each one's relative path.
    pub(crate) fn dir(&mut self, rel: &str, make: Option<&mut dyn FnMut(&str)>) -> io::Result<OwnedFd> {
        if rel.is_empty() {
            return self.fd.try_clone();
        }
        if let Some((p, fd)) = &self.last {
            if p == rel {
                return fd.try_clone();
            }
        }
        let mut make = make;
        let mut cur = self.fd.try_clone()?;
        let mut at = 0;
        for c in rel.split('/') {
            check_component(c)?;
            at += c.len();
            let here = &rel[..at];
            at += 1;
            cur = match rustix::fs::openat(&cur, c, dir_flags(), Mode::empty()) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) if make.is_some() => {
                    rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o755))?;
                    rustix::fs::chmodat(&cur, c, Mode::from_raw_mode(0o755), AtFlags::empty())?;
                    if let Some(f) = make.as_mut() {
                        f(here);
                    }
                    rustix::fs::openat(&cur, c, dir_flags(), Mode::empty())?
                }
                Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
                    return Err(io::Error::other(format!(
                        "`/{here}` is not a folder (a symlink or a file), so kiln does not go through it"
                    )));
                }
                Err(e) => return Err(e.into()),
            };
        }
        self.last = Some((rel.to_string(), cur.try_clone()?));
        Ok(cur)
    }

    /// The parent folder of `rel` and the last component's name.
    pub fn parent<'a>(
        &mut self,
        rel: &'a str,
        make: Option<&mut dyn FnMut(&str)>,
    ) -> io::Result<(OwnedFd, &'a str)> {
        let (parent, name) = split(rel);
        check_component(name)?;
        Ok((self.dir(parent, make)?, name))
    }

    /// Removes whatever is at `rel` (a folder with everything in it); a
    /// missing path, or a missing parent, is fine.
    pub fn remove(&mut self, rel: &str) -> io::Result<()> {
        let (dir, name) = match self.parent(rel, None) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.last = None;
        remove_at(&dir, name)
    }

    /// Removes `name` in `dir` (a folder this root gave out), as [`remove_at`].
    pub fn remove_in(&mut self, dir: &OwnedFd, name: &str) -> io::Result<()> {
        check_component(name)?;
        self.last = None;
        remove_at(dir, name)
    }

    /// Removes everything inside the folder `rel`, keeping the folder.
    /// When `rel` is not a folder (a file the layer replaces with one, as
    /// an opaque folder made where a file was), nothing is below it.
    pub fn empty(&mut self, rel: &str) -> io::Result<()> {
        if !rel.is_empty() {
            let (parent, name) = match self.parent(rel, None) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            };
            match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Directory =>
                {
                    return Ok(());
                }
                _ => {}
            }
        }
        let dir = match self.dir(rel, None) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.last = None;
        let readable = rustix::fs::openat(
            &dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for name in names(&readable)? {
            remove_at(&dir, OsStr::from_bytes(&name))?;
        }
        Ok(())
    }
}

fn dir_flags() -> OFlags {
    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// A component of a clean relative path: never empty, `.` or `..`, no `/`.
fn check_component(c: &str) -> io::Result<()> {
    if c.is_empty() || c == "." || c == ".." || c.contains('/') || c.contains('\0') {
        return Err(io::Error::other(format!("`{c}` is not a name inside the image")));
    }
    Ok(())
}

fn split(rel: &str) -> (&str, &str) {
    match rel.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", rel),
    }
}

/// The names in a folder opened for reading (not `.` and `..`).
fn names(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    while let Some(e) = d.read() {
        let e = e?;
        let n = e.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

/// Removes `name` in `dir` and, for a folder, everything in it, never
/// following a symlink (a symlink is removed, not its target).
pub(crate) fn remove_at(dir: &impl AsFd, name: impl AsRef<OsStr>) -> io::Result<()> {
    let name = name.as_ref();
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        // A folder: EISDIR on Linux (EPERM elsewhere).
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(e.into()),
    }
    let sub = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    for child in names(&sub)? {
        remove_at(&sub, OsStr::from_bytes(&child))?;
    }
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Creates the regular file `name` in `dir` (it must not exist), open for writing.
pub fn create_file(dir: &impl AsFd, name: &str, mode: u32) -> io::Result<File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    Ok(File::from(fd))
}

/// Sets an extended attribute on `name` in `dir`, a regular file or a
/// folder (other entries carry none: the attribute is skipped); never
/// through a symlink, and a device node is never opened.
pub(crate) fn set_xattr(dir: &impl AsFd, name: &str, key: &str, value: &[u8]) -> io::Result<()> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
    if !matches!(
        rustix::fs::FileType::from_raw_mode(st.st_mode),
        rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory
    ) {
        return Ok(());
    }
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::RegularFile | rustix::fs::FileType::Directory => {}
        _ => return Err(io::Error::other(format!("`{name}` cannot carry the attribute `{key}`"))),
    }
    rustix::fs::fsetxattr(&fd, key, value, rustix::fs::XattrFlags::empty())?;
    Ok(())
}

/// Sets the access and modification times of `name` in `dir` (not following a symlink).
pub(crate) fn set_time_at(dir: &impl AsFd, name: &str, mtime: u64) -> io::Result<()> {
    let at = rustix::fs::Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
    let t = rustix::fs::Timestamps { last_access: at, last_modification: at };
    rustix::fs::utimensat(dir, name, &t, AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_inside_the_root_are_never_followed() {
        let host = tempfile::tempdir().unwrap();
        let outside = host.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("precious"), b"keep").unwrap();
        let root = host.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
        std::os::unix::fs::symlink("../outside", root.join("rel")).unwrap();
        let mut r = RootDir::open(&root).unwrap();
        for p in ["d/new", "rel/new", "d/x/y"] {
            let err = r.parent(p, Some(&mut |_| {})).unwrap_err();
            assert!(err.to_string().contains("is not a folder"), "{p}: {err}");
        }
        assert!(r.remove("d/precious").is_err());
        // An opaque marker on a symlink (or a file): nothing below it to hide, and the target untouched.
        r.empty("d").unwrap();
        assert!(outside.join("precious").exists());
        assert!(r.empty("d/x").is_err(), "never through the symlink");
        assert!(std::fs::symlink_metadata(root.join("d")).unwrap().file_type().is_symlink());
        std::fs::write(root.join("file"), b"kept").unwrap();
        r.empty("file").unwrap();
        assert_eq!(std::fs::read(root.join("file")).unwrap(), b"kept");
        // Removing the symlink itself removes the link, not its target.
        r.remove("d").unwrap();
        assert!(outside.join("precious").exists());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
    }

    #[test]
    fn folders_are_made_0755_whatever_the_umask_and_reported() {
        let host = tempfile::tempdir().unwrap();
        let mut r = RootDir::open(host.path()).unwrap();
        let mut made = Vec::new();
        let (dir, name) = r.parent("a/b/c", Some(&mut |p| made.push(p.to_string()))).unwrap();
        assert_eq!(name, "c");
        assert_eq!(made, ["a", "a/b"]);
        create_file(&dir, name, 0o600).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(host.path().join("a/b")).unwrap().permissions().mode();
        assert_eq!(m & 0o777, 0o755);
        r.remove("a").unwrap();
        assert!(!host.path().join("a").exists());
    }
}
