//! An image's layers flattened (whiteouts applied) into one folder on the
//! host, for `mke2fs -d`. The folder holds the bytes and the shape (files,
//! folders, symlinks, hard links, fifos); the metadata the host may not let
//! an ordinary user set (owners, setuid, capabilities, device nodes) comes
//! from the merged tree and is written into the filesystem afterwards, so
//! the disk is the same whether kiln runs as root or not.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode};

use kiln_cache::Store;

use crate::error::BuildError;
use crate::fstree::TreeMap;
use crate::image::ImageLayer;
use crate::listing::Listing;
use crate::rootdir::{self, RootDir};
use crate::tarball::TarKind;

use kiln_oci::whiteout::{OPAQUE, WHITEOUT};

/// The flattened root: the merged tree (metadata) and each path's mtime.
pub(crate) struct Flattened {
    pub(crate) tree: TreeMap,
    pub(crate) mtimes: HashMap<String, u64>,
}

/// Unpacks `layers` in order into `root` (an empty folder). `tree` is
/// their merged tree ([`kiln_oci::fstree::FsTree::of_layers`]): making it refused layers that
/// write through symlinks, so the unpacking never leaves `root`.
pub(crate) fn flatten(
    store: &Store,
    layers: &[ImageLayer],
    tree: &TreeMap,
    root: &Path,
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
                    // Resolved inside the root like any path: a regular file the image holds.
                    let (tdir, tname) = rd.parent(target, None)?;
                    let st = rustix::fs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW)?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                        return Err(io::Error::other(format!(
                            "the hard link target `{target}` is not a file in the image"
                        )));
                    }
                    rustix::fs::linkat(&tdir, tname, &dir, name, AtFlags::empty())?;
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
    add_mount_points(&mut tree, root).map_err(BuildError::io_write(root))?;
    Ok(Flattened { tree, mtimes })
}

/// The folders the init mounts /proc, /sys and /dev on, made when the image
/// lacks them (as container engines make them at run time).
pub(crate) const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys"];

fn add_mount_points(tree: &mut TreeMap, root: &Path) -> io::Result<()> {
    for d in MOUNT_POINTS {
        if tree.get(d).is_none() && fs::symlink_metadata(root.join(d)).is_err() {
            mkdir(&root.join(d))?;
            tree.entries.insert(d.to_string(), dir_entry(d));
        }
    }
    Ok(())
}

/// A folder kiln makes: 0755 root.
fn dir_entry(path: &str) -> crate::listing::ListEntry {
    crate::listing::ListEntry {
        path: path.to_string(),
        kind: crate::listing::Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        xattrs: Default::default(),
    }
}

fn mkdir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    // Whatever the umask: mke2fs must be able to read it.
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

fn mkdir_at(dir: &impl std::os::fd::AsFd, name: &str) -> io::Result<()> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o755))?;
    rustix::fs::chmodat(dir, name, Mode::from_raw_mode(0o755), AtFlags::empty())?;
    Ok(())
}
