//! A cache mount's folder as a gzipped tar, for `--cache-mounts`: packed
//! from the store to push it, unpacked from a registry (another runner's
//! word) into a new folder.
//!
//! Unpacking takes folders, regular files and symlinks only, every name
//! relative and without `..`; symlinks are made last, each only under real
//! folders, so nothing is ever written through one. Files get their mode
//! without setuid, setgid or sticky bits, and their owner only when kiln
//! runs as root. The bytes and entries unpacked are bounded.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The most bytes a cache mount unpacks to.
const MAX_BYTES: u64 = 16 << 30;
/// The most entries it may hold.
const MAX_ENTRIES: u64 = 2_000_000;
/// The longest name (a GNU long-name entry) it may hold.
const MAX_NAME: usize = 4096;

/// Packs `dir` (never following a symlink; sockets, fifos and devices left
/// out) as a gzipped tar into `out`.
pub(crate) fn pack(dir: &Path, out: impl Write) -> std::io::Result<()> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::new(6));
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    let walk = walkdir::WalkDir::new(dir).follow_links(false).min_depth(1).sort_by_file_name();
    for e in walk {
        let e = e.map_err(std::io::Error::other)?;
        let rel = e.path().strip_prefix(dir).expect("under dir");
        let meta = e.path().symlink_metadata()?;
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode() & 0o777);
        h.set_uid(meta.uid().into());
        h.set_gid(meta.gid().into());
        h.set_mtime(meta.mtime().max(0) as u64);
        let ft = meta.file_type();
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            tar.append_data(&mut h, rel, std::io::empty())?;
        } else if ft.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            let f = fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(e.path())?;
            tar.append_data(&mut h, rel, f)?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            tar.append_link(&mut h, rel, fs::read_link(e.path())?)?;
        }
    }
    tar.into_inner()?.finish()?;
    Ok(())
}

/// Unpacks a gzipped tar made by [`pack`] into `dest`, an empty folder.
/// The error says what is wrong, never quoting a name from the archive.
pub(crate) fn unpack(input: impl Read, dest: &Path) -> Result<(), String> {
    let root = rustix::process::geteuid().is_root();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(input));
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    let (mut bytes, mut entries) = (0u64, 0u64);
    // Raw: the tar crate would read a GNU long name, or a PAX header (whose
    // `size` it would believe), whole into memory; kiln reads its own.
    let entries_iter = ar.entries().map_err(|_| "it is not a gzipped tar".to_string())?.raw(true);
    let (mut long_name, mut long_link): (Option<Vec<u8>>, Option<Vec<u8>>) = (None, None);
    for e in entries_iter {
        let mut e = e.map_err(|_| format!("its entry {} is malformed", entries + 1))?;
        entries += 1;
        if entries > MAX_ENTRIES {
            return Err(format!("it holds more than {MAX_ENTRIES} entries"));
        }
        let at = format!("entry {entries}");
        let h = e.header().clone();
        match h.entry_type() {
            tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {
                let mut buf = Vec::new();
                (&mut e)
                    .take(MAX_NAME as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|_| format!("its {at} is cut short"))?;
                if buf.len() > MAX_NAME {
                    return Err(format!("its {at} holds a name longer than {MAX_NAME} bytes"));
                }
                while buf.last() == Some(&0) {
                    buf.pop();
                }
                if h.entry_type() == tar::EntryType::GNULongName {
                    long_name = Some(buf);
                } else {
                    long_link = Some(buf);
                }
                continue;
            }
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => {
                return Err(format!("its {at} is an extended header, which kiln's cache mounts never hold"))
            }
            _ => {}
        }
        let name = long_name.take().unwrap_or_else(|| h.path_bytes().into_owned());
        let link = long_link.take().or_else(|| h.link_name_bytes().map(|l| l.into_owned()));
        let rel = clean(&name).ok_or_else(|| format!("its {at} is not a plain relative name"))?;
        let path = dest.join(&rel);
        let mode = h.mode().map_err(|_| format!("its {at} has a bad mode"))? & 0o777;
        match h.entry_type() {
            tar::EntryType::Directory => {
                real_dirs_above(dest, &rel).map_err(|why| format!("its {at}: {why}"))?;
                match fs::create_dir(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && is_real_dir(&path) => {}
                    Err(_) => return Err(format!("its {at} cannot be made a folder")),
                }
                fs::set_permissions(&path, fs::Permissions::from_mode(mode | 0o700))
                    .map_err(|e| format!("its {at}: {e}"))?;
            }
            tar::EntryType::Regular => {
                real_dirs_above(dest, &rel).map_err(|why| format!("its {at}: {why}"))?;
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                    .open(&path)
                    .map_err(|_| format!("its {at} cannot be written (a name twice?)"))?;
                // The bytes that come, counted: not what a header says.
                let room = MAX_BYTES - bytes;
                let n = std::io::copy(&mut (&mut e).take(room + 1), &mut f)
                    .map_err(|e| format!("its {at}: {e}"))?;
                bytes += n;
                if bytes > MAX_BYTES {
                    return Err(format!("it unpacks to more than {} GiB", MAX_BYTES >> 30));
                }
                f.set_permissions(fs::Permissions::from_mode(mode)).map_err(|e| format!("its {at}: {e}"))?;
            }
            tar::EntryType::Symlink => {
                let target =
                    link.filter(|l| !l.is_empty()).ok_or_else(|| format!("its {at} links to nothing"))?;
                let target = PathBuf::from(std::ffi::OsString::from_vec(target));
                links.push((rel.clone(), target));
                continue;
            }
            _ => return Err(format!("its {at} is neither a folder, a file nor a symlink")),
        }
        if root {
            let (uid, gid) = (h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32);
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid)).map_err(|e| format!("its {at}: {e}"))?;
        }
    }
    // Symlinks last: nothing above is written through one.
    for (rel, target) in links {
        real_dirs_above(dest, &rel)?;
        std::os::unix::fs::symlink(&target, dest.join(&rel))
            .map_err(|_| "a symlink of it cannot be made".to_string())?;
    }
    Ok(())
}

/// A relative name without `..`, `.` or empty parts dropped; `None` otherwise.
fn clean(raw: &[u8]) -> Option<PathBuf> {
    let s = std::str::from_utf8(raw).ok()?;
    if s.starts_with('/') || s.contains('\0') {
        return None;
    }
    let mut out = PathBuf::new();
    for part in s.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => out.push(p),
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

fn is_real_dir(p: &Path) -> bool {
    p.symlink_metadata().is_ok_and(|m| m.is_dir())
}

/// Every folder between `dest` and `rel` exists as a real folder (made when
/// missing), never a symlink or a file.
fn real_dirs_above(dest: &Path, rel: &Path) -> Result<(), String> {
    let mut at = dest.to_path_buf();
    if let Some(parent) = rel.parent() {
        for c in parent.components() {
            at.push(c);
            match at.symlink_metadata() {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err("a name in it lies under a file or a symlink".into()),
                Err(_) => fs::create_dir(&at).map_err(|e| format!("a folder of it cannot be made: {e}"))?,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tarball(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        let raw = b.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        gz.finish().unwrap()
    }

    fn header(kind: tar::EntryType, name: &str, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o4755);
        h.set_cksum();
        h
    }

    #[test]
    fn a_folder_round_trips_without_setuid_bits() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("wheels/sub")).unwrap();
        fs::write(src.path().join("wheels/sub/a.whl"), b"wheel").unwrap();
        fs::set_permissions(src.path().join("wheels/sub/a.whl"), fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::symlink("sub/a.whl", src.path().join("wheels/latest")).unwrap();
        let mut blob = Vec::new();
        pack(src.path(), &mut blob).unwrap();
        let dest = tempfile::tempdir().unwrap();
        unpack(blob.as_slice(), dest.path()).unwrap();
        assert_eq!(fs::read(dest.path().join("wheels/sub/a.whl")).unwrap(), b"wheel");
        assert_eq!(fs::read_link(dest.path().join("wheels/latest")).unwrap(), Path::new("sub/a.whl"));
        let mode = fs::metadata(dest.path().join("wheels/sub/a.whl")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755, "no setuid bit comes back");
    }

    #[test]
    fn long_names_round_trip_and_long_name_bombs_are_refused() {
        let src = tempfile::tempdir().unwrap();
        let deep = "d".repeat(120) + "/" + &"f".repeat(120);
        fs::create_dir_all(src.path().join("d".repeat(120))).unwrap();
        fs::write(src.path().join(&deep), b"x").unwrap();
        std::os::unix::fs::symlink("t".repeat(150), src.path().join("l")).unwrap();
        let mut blob = Vec::new();
        pack(src.path(), &mut blob).unwrap();
        let dest = tempfile::tempdir().unwrap();
        unpack(blob.as_slice(), dest.path()).unwrap();
        assert_eq!(fs::read(dest.path().join(&deep)).unwrap(), b"x");
        assert_eq!(fs::read_link(dest.path().join("l")).unwrap(), Path::new(&"t".repeat(150)));

        // A long name of 64 MiB, and a PAX header claiming a size: refused, never read whole.
        let bomb = tarball(|b| {
            let mut h = header(tar::EntryType::GNULongName, "././@LongLink", 64 << 20);
            h.set_cksum();
            b.append(&h, std::io::repeat(b'a').take(64 << 20)).unwrap();
        });
        let err = unpack(bomb.as_slice(), tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(err.contains("longer than 4096"), "{err}");
        let pax = tarball(|b| {
            let rec = b"20 size=67108864\n";
            b.append(&header(tar::EntryType::XHeader, "pax", rec.len() as u64), &rec[..]).unwrap();
            b.append(&header(tar::EntryType::Regular, "f", 0), std::io::empty()).unwrap();
        });
        let err = unpack(pax.as_slice(), tempfile::tempdir().unwrap().path()).unwrap_err();
        assert!(err.contains("extended header"), "{err}");
    }

    #[test]
    fn hostile_archives_write_nothing_outside() {
        let outside = tempfile::tempdir().unwrap();
        let out = outside.path().to_str().unwrap().to_string();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "dotdot",
                tarball(|b| b.append(&header(tar::EntryType::Regular, "../x", 1), &b"x"[..]).unwrap()),
            ),
            (
                "absolute",
                tarball(|b| b.append(&header(tar::EntryType::Regular, "/tmp/x", 1), &b"x"[..]).unwrap()),
            ),
            (
                "through a symlink",
                tarball(|b| {
                    let mut l = header(tar::EntryType::Symlink, "link", 0);
                    l.set_link_name(&out).unwrap();
                    l.set_cksum();
                    b.append(&l, std::io::empty()).unwrap();
                    b.append(&header(tar::EntryType::Regular, "link/x", 1), &b"x"[..]).unwrap();
                }),
            ),
            (
                "a device",
                tarball(|b| b.append(&header(tar::EntryType::Block, "dev", 0), std::io::empty()).unwrap()),
            ),
            (
                "a hard link",
                tarball(|b| {
                    let mut l = header(tar::EntryType::Link, "h", 0);
                    l.set_link_name("/etc/passwd").unwrap();
                    l.set_cksum();
                    b.append(&l, std::io::empty()).unwrap();
                }),
            ),
            ("not gzip", b"plain bytes".to_vec()),
        ];
        for (what, blob) in cases {
            let dest = tempfile::tempdir().unwrap();
            let r = unpack(blob.as_slice(), dest.path());
            if what == "through a symlink" {
                // The file lands in a real folder `link` or is refused; never outside.
                assert!(
                    r.is_err() || dest.path().join("link").symlink_metadata().is_ok_and(|m| m.is_dir()),
                    "{what}"
                );
            } else {
                assert!(r.is_err(), "{what}");
            }
            assert!(
                fs::read_dir(outside.path()).unwrap().next().is_none(),
                "{what}: something was written outside"
            );
            assert!(!Path::new("/tmp/x").exists(), "{what}");
        }
    }
}
