//! An image's layers flattened (whiteouts applied) into one folder on the
//! host: for `mke2fs -d` (`-o vm:`) and for the container backend's root.
//! The folder holds the bytes and the shape (files, folders, symlinks, hard
//! links, fifos); the metadata the host may not let an ordinary user set
//! (owners, setuid, capabilities, device nodes) comes from the returned
//! merged tree, and the caller writes it where it belongs (into the ext4
//! filesystem, or onto the folder as root), so the result is the same
//! whether kiln runs as root or not.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode};

use kiln_cache::Store;

use crate::error::BuildError;
use crate::fstree::TreeMap;
use crate::image::ImageLayer;
use crate::listing::Listing;
use crate::rootdir::{self, RootDir};
use crate::tarball::TarKind;

use crate::whiteout::{OPAQUE, WHITEOUT};

/// The flattened root: the merged tree (metadata) and each path's mtime.
pub struct Flattened {
    pub tree: TreeMap,
    pub mtimes: HashMap<String, u64>,
    /// Whether hard links are links (else copies).
    pub linked: bool,
}

/// Unpacks `layers` in order into `root` (an empty folder). `tree` is
/// their merged tree ([`crate::fstree::FsTree::of_layers`]): making it refused layers that
/// write through symlinks, so the unpacking never leaves `root`.
///
/// With `copy_links`, a hard link is made a copy of the file it links to,
/// as overlayfs copies a linked file up on its first change: a command that
/// changes one path then sees the other unchanged, on every backend.
pub fn flatten(
    store: &Store,
    layers: &[ImageLayer],
    tree: &TreeMap,
    root: &Path,
    copy_links: bool,
) -> Result<Flattened, BuildError> {
    let mut tree = tree.clone();
    let mut mtimes = HashMap::new();
    let mut implicit: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut rd = RootDir::open(root).map_err(BuildError::io_write(root))?;
    for layer in layers {
        let bad = |e: io::Error| BuildError::BadLayer {
            layer: layer.digest,
            reason: format!("cannot unpack it: {e}"),
        };
        // Whiteouts and opaque markers hide what the layers below hold, and
        // only that: apply them before this layer's own entries.
        let listing = Listing::load(store, layer)?;
        let damaged = |e: io::Error| BuildError::BadLayer {
            layer: layer.digest,
            reason: format!("its stored listing cannot be read: {e}"),
        };
        for e in listing.iter().map_err(damaged)? {
            let e = e.map_err(damaged)?;
            let (parent, name) = match e.path.rsplit_once('/') {
                Some((p, n)) => (p, n),
                None => ("", e.path.as_str()),
            };
            if name == OPAQUE {
                rd.empty(parent).map_err(bad)?;
            } else if let Some(victim) = name.strip_prefix(WHITEOUT) {
                let victim =
                    if parent.is_empty() { victim.to_string() } else { format!("{parent}/{victim}") };
                rd.remove(&victim).map_err(bad)?;
            }
        }
        crate::listing::walk_layer(layer.open_tar(store)?, &layer.digest, &mut |e, data| {
            let name = e.path.rsplit('/').next().unwrap_or(e.path);
            if name.starts_with(WHITEOUT) {
                return Ok(());
            }
            mtimes.insert(e.path.to_string(), e.mtime);
            // Layers need not list every parent folder: make the missing ones.
            let (dir, name) = rd.parent(e.path, Some(&mut |p| implicit.push(p.to_string())))?;
            let is_dir = matches!(
                rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW),
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory
            );
            if !(is_dir && matches!(e.kind, TarKind::Dir)) {
                rd.remove_in(&dir, name)?;
            }
            match e.kind {
                TarKind::Dir => {
                    if !is_dir {
                        mkdir_at(&dir, name)?;
                    }
                }
                TarKind::File { .. } => {
                    let mut f = rootdir::create_file(&dir, name, 0o644)?;
                    f.set_permissions(fs::Permissions::from_mode(0o644))?;
                    loop {
                        let n = data.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        f.write_all(&buf[..n])?;
                    }
                }
                TarKind::Symlink(target) => rustix::fs::symlinkat(target.as_str(), &dir, name)?,
                TarKind::Hardlink(target) => {
                    // Resolved inside the root like any path: a regular file (or a fifo) the image holds.
                    let (tdir, tname) = rd.parent(target, None)?;
                    let st = rustix::fs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW)?;
                    let kind = FileType::from_raw_mode(st.st_mode);
                    if kind != FileType::RegularFile && kind != FileType::Fifo {
                        return Err(io::Error::other(format!(
                            "the hard link target `{}` is not a file in the image",
                            crate::error::shown(target)
                        )));
                    }
                    if copy_links && kind == FileType::Fifo {
                        rustix::fs::mknodat(&dir, name, FileType::Fifo, Mode::from_raw_mode(0o644), 0)?;
                    } else if copy_links {
                        let from = rustix::fs::openat(
                            &tdir,
                            tname,
                            rustix::fs::OFlags::RDONLY
                                | rustix::fs::OFlags::NOFOLLOW
                                | rustix::fs::OFlags::CLOEXEC,
                            Mode::empty(),
                        )?;
                        let mut to = rootdir::create_file(&dir, name, 0o644)?;
                        io::copy(&mut fs::File::from(from), &mut to)?;
                    } else {
                        rustix::fs::linkat(&tdir, tname, &dir, name, AtFlags::empty())?;
                    }
                }
                TarKind::Fifo => {
                    rustix::fs::mknodat(&dir, name, FileType::Fifo, Mode::from_raw_mode(0o644), 0)?;
                }
                // Device nodes are made in the filesystem itself (an ordinary
                // user cannot make them on the host).
                TarKind::CharDev(..) | TarKind::BlockDev(..) => {}
            }
            Ok(())
        })
        .map_err(|e| crate::unpack::under(e, root))?;
    }
    for d in implicit {
        tree.entries.entry(d.clone()).or_insert_with(|| dir_entry(&d));
    }
    Ok(Flattened { tree, mtimes, linked: !copy_links })
}

/// A folder kiln makes (a parent a layer did not list): 0755 root.
pub fn dir_entry(path: &str) -> crate::listing::ListEntry {
    crate::listing::ListEntry {
        path: path.to_string(),
        kind: crate::listing::Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        xattrs: Default::default(),
    }
}

fn mkdir_at(dir: &impl std::os::fd::AsFd, name: &str) -> io::Result<()> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755))?;
    rustix::fs::chmodat(dir, name, Mode::from_raw_mode(0o755), AtFlags::empty())?;
    Ok(())
}

/// Gives a flattened root (see [`flatten`]) the metadata its tree holds,
/// as root: owners, modes (setuid included), file capabilities and times.
/// A device node the image holds is left an empty placeholder file with
/// its owner and mode, never a node: in a folder where a command runs
/// without a mount namespace of its own, a node would open the host's
/// device. Every path is reached through [`RootDir`], never a symlink.
pub fn own_as_root(root: &Path, flat: &Flattened) -> Result<(), BuildError> {
    use crate::listing::Kind;
    let mut rd = RootDir::open(root).map_err(BuildError::io_write(root))?;
    // The path is the image's: shown escaped, never as the bytes it holds.
    let err = |path: &str| {
        let shown = crate::error::shown(path);
        move |e: io::Error| {
            BuildError::Environment {
            message: format!("Cannot give `/{shown}` its owner, mode and times in the step's root: {e}"),
            hint: "kiln lays out a parent image as root (owners, setuid bits, file capabilities); check that the cache folder's file system keeps them".into(),
        }
        }
    };
    // The placeholders first: making one changes its folder's time.
    for (path, e) in &flat.tree.entries {
        if matches!(e.kind, Kind::Char { .. } | Kind::Block { .. }) {
            let (dir, name) = rd.parent(path, None).map_err(err(path))?;
            rootdir::create_file(&dir, name, 0).map_err(err(path))?;
        }
    }
    for (path, e) in &flat.tree.entries {
        // A hard link, flattened as a copy (`copy_links`), takes its file's metadata.
        let e = match &e.kind {
            Kind::Hardlink { target } => match flat.tree.get(target) {
                Some(t) if !flat.linked => t,
                _ => continue, // the inode of the path it links to, owned there
            },
            _ => e,
        };
        let (dir, name) = rd.parent(path, None).map_err(err(path))?;
        let st =
            rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| err(path)(e.into()))?;
        rustix::fs::chownat(
            &dir,
            name,
            Some(rustix::process::Uid::from_raw(e.uid)),
            Some(rustix::process::Gid::from_raw(e.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| err(path)(e.into()))?;
        // After the owner: a change of owner clears setuid bits and capabilities.
        if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
            rustix::fs::chmodat(&dir, name, Mode::from_raw_mode(e.mode & 0o7777), AtFlags::empty())
                .map_err(|e| err(path)(e.into()))?;
        }
        for (key, value) in e.xattr_pairs() {
            rootdir::set_xattr(&dir, name, &key, &value).map_err(err(path))?;
        }
        let mtime = flat.mtimes.get(path).copied().unwrap_or(0);
        rootdir::set_time_at(&dir, name, mtime).map_err(err(path))?;
    }
    Ok(())
}
