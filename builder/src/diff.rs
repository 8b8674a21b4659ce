//! `kiln diff`: file-level differences between two images, from their layer
//! listings with whiteouts applied.

use serde::Serialize;

use kiln_cache::Store;
use kiln_recipes::ImageRef;

use crate::base::open_image as import;
use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::listing::{Kind, ListEntry};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "change")]
pub enum Change {
    Added { path: String },
    Removed { path: String },
    Modified { path: String, what: Vec<String> },
}

/// The merged file tree of an image.
pub(crate) fn image_tree(store: &Store, r: &ImageRef) -> Result<FsTree, BuildError> {
    let img = import(store, r)?;
    FsTree::of_layers(store, &img.layers)
}

pub fn diff(store: &Store, a: &ImageRef, b: &ImageRef) -> Result<Vec<Change>, BuildError> {
    diff_trees(&image_tree(store, a)?, &image_tree(store, b)?)
}

/// The changes from `a` to `b`, in path order: one walk over both merged
/// trees side by side.
pub(crate) fn diff_trees(a: &FsTree, b: &FsTree) -> Result<Vec<Change>, BuildError> {
    let mut out = Vec::new();
    let mut ia = a.iter()?;
    let mut ib = b.iter()?;
    let next = |it: &mut crate::fstree::Merged<'_>| it.next().transpose().map(|o| o.map(|(_, e)| e));
    let (mut ea, mut eb) = (next(&mut ia)?, next(&mut ib)?);
    loop {
        let order = match (&ea, &eb) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => x.path.cmp(&y.path),
        };
        match order {
            std::cmp::Ordering::Less => {
                let x = ea.take().expect("compared");
                out.push(Change::Removed { path: format!("/{}", x.path) });
                ea = next(&mut ia)?;
            }
            std::cmp::Ordering::Greater => {
                let y = eb.take().expect("compared");
                out.push(Change::Added { path: format!("/{}", y.path) });
                eb = next(&mut ib)?;
            }
            std::cmp::Ordering::Equal => {
                let (x, y) = (ea.take().expect("compared"), eb.take().expect("compared"));
                if x != y {
                    out.push(Change::Modified { path: format!("/{}", x.path), what: what_differs(&x, &y) });
                }
                ea = next(&mut ia)?;
                eb = next(&mut ib)?;
            }
        }
    }
    Ok(out)
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
