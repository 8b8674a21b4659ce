//! An image's layers flattened (whiteouts applied) into one folder on the
//! host, for `mke2fs -d`. The folder holds the bytes and the shape (files,
//! folders, symlinks, hard links, fifos); the metadata the host may not let
//! an ordinary user set (owners, setuid, capabilities, device nodes) comes
//! from the merged tree and is written into the filesystem afterwards, so
//! the disk is the same whether kiln runs as root or not.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use kiln_cache::Store;

use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::image::ImageLayer;
use crate::listing::Listing;
use crate::tarball::TarKind;
use crate::unpack::remove_any as remove;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// The flattened root: the merged tree (metadata) and each path's mtime.
pub struct Flattened {
    pub tree: FsTree,
    pub mtimes: HashMap<String, u64>,
}

/// Unpacks `layers` in order into `root` (an empty folder). `tree` is
/// their merged tree ([`FsTree::of_layers`]): making it refused layers that
/// write through symlinks, so the unpacking never leaves `root`.
pub fn flatten(
    store: &Store,
    layers: &[ImageLayer],
    tree: &FsTree,
    root: &Path,
) -> Result<Flattened, BuildError> {
    let mut tree = tree.clone();
    let mut mtimes = HashMap::new();
    let mut implicit: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    for layer in layers {
        let bad = |e: io::Error| BuildError::BadLayer {
            layer: layer.digest,
            reason: format!("cannot unpack it: {e}"),
        };
        // Whiteouts and opaque markers hide what the layers below hold, and
        // only that: apply them before this layer's own entries.
        let listing = Listing::load(store, layer)?;
        for e in &listing.entries {
            let (parent, name) = match e.path.rsplit_once('/') {
                Some((p, n)) => (p, n),
                None => ("", e.path.as_str()),
            };
            if name == OPAQUE {
                let dir = root.join(parent);
                if let Ok(rd) = fs::read_dir(&dir) {
                    for child in rd.flatten() {
                        remove(&child.path()).map_err(bad)?;
                    }
                }
            } else if let Some(victim) = name.strip_prefix(WHITEOUT) {
                remove(&root.join(parent).join(victim)).map_err(bad)?;
            }
        }
        crate::listing::walk_layer(layer.open_tar(store)?, &layer.digest, &mut |e, data| {
            let name = e.path.rsplit('/').next().unwrap_or(e.path);
            if name.starts_with(WHITEOUT) {
                return Ok(());
            }
            let path = root.join(e.path);
            mtimes.insert(e.path.to_string(), e.mtime);
            // Layers need not list every parent folder: make the missing ones.
            if let Some((parent, _)) = e.path.rsplit_once('/') {
                if !root.join(parent).is_dir() {
                    let mut at = String::new();
                    for c in parent.split('/') {
                        at = if at.is_empty() { c.to_string() } else { format!("{at}/{c}") };
                        if fs::symlink_metadata(root.join(&at)).is_err() {
                            mkdir(&root.join(&at))?;
                            implicit.push(at.clone());
                        }
                    }
                }
            }
            match e.kind {
                TarKind::Dir => match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        remove(&path)?;
                        mkdir(&path)?;
                    }
                    Err(_) => mkdir(&path)?,
                },
                TarKind::File { .. } => {
                    remove(&path)?;
                    let mut f = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o644)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)?;
                    loop {
                        let n = data.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        f.write_all(&buf[..n])?;
                    }
                }
                TarKind::Symlink(target) => {
                    remove(&path)?;
                    std::os::unix::fs::symlink(target, &path)?;
                }
                TarKind::Hardlink(target) => {
                    remove(&path)?;
                    let src = inside(root, target)?;
                    fs::hard_link(src, &path)?;
                }
                TarKind::Fifo => {
                    remove(&path)?;
                    nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o644))
                        .map_err(io::Error::from)?;
                }
                // Device nodes are made in the filesystem itself (an ordinary
                // user cannot make them on the host).
                TarKind::CharDev(..) | TarKind::BlockDev(..) => remove(&path)?,
            }
            Ok(())
        })?;
    }
    for d in implicit {
        tree.entries.entry(d.clone()).or_insert_with(|| dir_entry(&d));
    }
    add_mount_points(&mut tree, root).map_err(BuildError::io_write(root))?;
    Ok(Flattened { tree, mtimes })
}

/// The folders the init mounts /proc, /sys and /dev on, made when the image
/// lacks them (as container engines make them at run time).
pub const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys"];

fn add_mount_points(tree: &mut FsTree, root: &Path) -> io::Result<()> {
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

/// `root/rel` for a hard link's target, refusing a path that goes through a
/// symlink (which could point outside the root) or is not a regular file.
fn inside(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut p = root.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        let m = fs::symlink_metadata(&p)?;
        let last = i + 1 == parts.len();
        if (!last && !m.is_dir()) || (last && !m.is_file()) {
            return Err(io::Error::other(format!("the hard link target `{rel}` is not a file in the image")));
        }
    }
    Ok(p)
}

fn mkdir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    // Whatever the umask: mke2fs must be able to read it.
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}
