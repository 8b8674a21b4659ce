//! `kiln diff`: file-level differences between two images, from their layer
//! listings with whiteouts applied.

use serde::Serialize;

use kiln_cache::Store;
use kiln_recipes::ImageRef;

use crate::base::open_image as import;
use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::listing::{Kind, ListEntry, Listing};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "change")]
pub enum Change {
    Added { path: String },
    Removed { path: String },
    Modified { path: String, what: Vec<String> },
}

/// The merged file tree of an image.
pub fn image_tree(store: &Store, r: &ImageRef) -> Result<FsTree, BuildError> {
    let img = import(store, r)?;
    let mut t = FsTree::default();
    for l in &img.layers {
        let listing = Listing::load(store, l)?;
        t.apply(&listing).map_err(|reason| BuildError::BadLayer { layer: l.digest, reason })?;
    }
    Ok(t)
}

pub fn diff(store: &Store, a: &ImageRef, b: &ImageRef) -> Result<Vec<Change>, BuildError> {
    Ok(diff_trees(&image_tree(store, a)?, &image_tree(store, b)?))
}

pub fn diff_trees(a: &FsTree, b: &FsTree) -> Vec<Change> {
    let mut out = Vec::new();
    for (path, ea) in &a.entries {
        match b.entries.get(path) {
            None => out.push(Change::Removed { path: format!("/{path}") }),
            Some(eb) if ea != eb => {
                out.push(Change::Modified { path: format!("/{path}"), what: what_differs(ea, eb) })
            }
            Some(_) => {}
        }
    }
    for path in b.entries.keys() {
        if !a.entries.contains_key(path) {
            out.push(Change::Added { path: format!("/{path}") });
        }
    }
    out.sort_by(|x, y| key(x).cmp(key(y)));
    out
}

fn key(c: &Change) -> &str {
    match c {
        Change::Added { path } | Change::Removed { path } | Change::Modified { path, .. } => path,
    }
}

fn what_differs(a: &ListEntry, b: &ListEntry) -> Vec<String> {
    let mut w = Vec::new();
    match (&a.kind, &b.kind) {
        (Kind::File { size: sa, sha256: ha }, Kind::File { size: sb, sha256: hb }) if ha != hb => {
            w.push(format!("content ({sa} -> {sb} bytes)"))
        }
        (x, y) if std::mem::discriminant(x) != std::mem::discriminant(y) => w.push("type".into()),
        (x, y) if x != y => w.push("target".into()),
        _ => {}
    }
    if a.mode != b.mode {
        w.push(format!("mode {:04o} -> {:04o}", a.mode, b.mode));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        w.push(format!("owner {}:{} -> {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    w
}
