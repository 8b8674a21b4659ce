//! An image's layers flattened into one folder for `mke2fs -d`
//! ([`kiln_oci::flatten`]), with the folders the init mounts /proc, /sys and
//! /dev on added where the image lacks them.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use kiln_cache::Store;

use crate::error::BuildError;
use crate::fstree::TreeMap;
use crate::image::ImageLayer;

pub(crate) use kiln_oci::flatten::Flattened;

/// Unpacks `layers` into `root` (an empty folder), then adds the mount points.
pub(crate) fn flatten(
    store: &Store,
    layers: &[ImageLayer],
    tree: &TreeMap,
    root: &Path,
) -> Result<Flattened, BuildError> {
    let mut flat = kiln_oci::flatten::flatten(store, layers, tree, root, false)?;
    add_mount_points(&mut flat.tree, root).map_err(BuildError::io_write(root))?;
    Ok(flat)
}

/// The folders the init mounts /proc, /sys and /dev on, made when the image
/// lacks them (as container engines make them at run time).
pub(crate) const MOUNT_POINTS: &[&str] = &["dev", "proc", "sys"];

fn add_mount_points(tree: &mut TreeMap, root: &Path) -> io::Result<()> {
    for d in MOUNT_POINTS {
        if tree.get(d).is_none() && fs::symlink_metadata(root.join(d)).is_err() {
            fs::DirBuilder::new().mode(0o755).create(root.join(d))?;
            // Whatever the umask: mke2fs must be able to read it.
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o755))?;
            tree.entries.insert(d.to_string(), kiln_oci::flatten::dir_entry(d));
        }
    }
    Ok(())
}
