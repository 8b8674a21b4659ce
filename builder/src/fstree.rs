//! The merged file tree of a stack of layers (whiteouts applied), built from
//! their listings. Steps use it to find the metadata of existing parent
//! folders and to resolve destinations through symlinks inside the root;
//! `kiln diff` compares two of them.

use std::collections::BTreeMap;

use kiln_cache::Store;

use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::listing::{Kind, ListEntry, Listing};

#[derive(Debug, Clone, Default)]
pub struct FsTree {
    pub entries: BTreeMap<String, ListEntry>,
}

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

impl FsTree {
    /// The merged tree of `layers`, checked: a layer that writes through a
    /// symlink is refused.
    pub fn of_layers(store: &Store, layers: &[ImageLayer]) -> Result<FsTree, BuildError> {
        let mut t = FsTree::default();
        for l in layers {
            let listing = Listing::load(store, l)?;
            t.apply(&listing).map_err(|reason| BuildError::BadLayer { layer: l.digest, reason })?;
        }
        Ok(t)
    }

    /// Applies one layer on top. Returns an error naming an entry that would
    /// be written through a symlink (a classic way for a layer to escape).
    pub fn apply(&mut self, layer: &Listing) -> Result<(), String> {
        // Opaque markers hide what the layers below hold, whatever sorts
        // before the marker in this layer (`d/-x` < `d/.wh..wh..opq`).
        for e in &layer.entries {
            if let (parent, OPAQUE) = split(&e.path) {
                match parent {
                    Some(p) => self.remove_children(p),
                    None => self.entries.clear(),
                }
            }
        }
        for e in &layer.entries {
            let (parent, name) = split(&e.path);
            if let Some(p) = parent {
                if let Some(Kind::Symlink { .. }) = self.entries.get(p).map(|x| &x.kind) {
                    return Err(format!("entry `{}` would be written through the symlink `/{p}`", e.path));
                }
                self.check_ancestors(p)
                    .map_err(|s| format!("entry `{}` would be written through the symlink `/{s}`", e.path))?;
            }
            if name == OPAQUE {
                continue;
            }
            if let Some(victim) = name.strip_prefix(WHITEOUT) {
                let target = match parent {
                    Some(p) => format!("{p}/{victim}"),
                    None => victim.to_string(),
                };
                self.entries.remove(&target);
                self.remove_children(&target);
                continue;
            }
            if !matches!(e.kind, Kind::Dir) {
                self.remove_children(&e.path);
            }
            self.entries.insert(e.path.clone(), e.clone());
        }
        Ok(())
    }

    fn check_ancestors<'a>(&self, mut p: &'a str) -> Result<(), &'a str> {
        while let Some((up, _)) = p.rsplit_once('/') {
            if let Some(Kind::Symlink { .. }) = self.entries.get(up).map(|x| &x.kind) {
                return Err(up);
            }
            p = up;
        }
        Ok(())
    }

    fn remove_children(&mut self, dir: &str) {
        let prefix = format!("{dir}/");
        let doomed: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    pub fn get(&self, path: &str) -> Option<&ListEntry> {
        self.entries.get(path)
    }

    /// Resolves the folders of `path` (relative, clean) through symlinks in
    /// the tree, never leaving the root. The last component is not followed.
    pub fn resolve_parents(&self, path: &str) -> Result<String, String> {
        let mut hops = 0;
        let mut todo: Vec<String> = path.split('/').rev().map(str::to_string).collect();
        let mut done: Vec<String> = Vec::new();
        while let Some(c) = todo.pop() {
            match c.as_str() {
                "" | "." => continue,
                ".." => {
                    done.pop();
                    continue;
                }
                _ => {}
            }
            let candidate = if done.is_empty() { c.clone() } else { format!("{}/{c}", done.join("/")) };
            let last = todo.is_empty();
            match self.entries.get(&candidate).map(|e| &e.kind) {
                Some(Kind::Symlink { target }) if !last => {
                    hops += 1;
                    if hops > 40 {
                        return Err(format!("too many levels of symlinks resolving `/{path}`"));
                    }
                    if target.starts_with('/') {
                        done.clear();
                    }
                    for part in target.split('/').rev() {
                        todo.push(part.to_string());
                    }
                }
                _ => done.push(c),
            }
        }
        Ok(done.join("/"))
    }
}

fn split(path: &str) -> (Option<&str>, &str) {
    match path.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind) -> ListEntry {
        ListEntry { path: path.into(), kind, mode: 0o755, uid: 0, gid: 0, xattrs: Default::default() }
    }

    fn sym(path: &str, t: &str) -> ListEntry {
        e(path, Kind::Symlink { target: t.into() })
    }

    #[test]
    fn whiteouts_and_opaque_dirs() {
        let mut t = FsTree::default();
        t.apply(&Listing {
            entries: vec![
                e("a", Kind::Dir),
                e("a/x", Kind::Dir),
                e("a/x/y", Kind::Dir),
                e("b", Kind::Dir),
                e("b/z", Kind::Dir),
            ],
        })
        .unwrap();
        t.apply(&Listing { entries: vec![e("a/.wh.x", Kind::Fifo), e("b/.wh..wh..opq", Kind::Fifo)] })
            .unwrap();
        assert_eq!(t.entries.keys().collect::<Vec<_>>(), vec!["a", "b"]);
        // What a layer adds beside its own opaque marker stays, even when it sorts first.
        t.apply(&Listing { entries: vec![e("b/-new", Kind::Dir), e("b/.wh..wh..opq", Kind::Fifo)] }).unwrap();
        assert_eq!(t.entries.keys().collect::<Vec<_>>(), vec!["a", "b", "b/-new"]);
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let mut t = FsTree::default();
        t.apply(&Listing { entries: vec![sym("evil", "/etc")] }).unwrap();
        let err = t.apply(&Listing { entries: vec![e("evil/passwd", Kind::Dir)] }).unwrap_err();
        assert!(err.contains("through the symlink `/evil`"), "{err}");
    }

    #[test]
    fn destinations_resolve_inside_the_root() {
        let mut t = FsTree::default();
        t.apply(&Listing {
            entries: vec![
                e("usr", Kind::Dir),
                e("usr/bin", Kind::Dir),
                sym("bin", "usr/bin"),
                sym("up", "../../../.."),
            ],
        })
        .unwrap();
        assert_eq!(t.resolve_parents("bin/sh").unwrap(), "usr/bin/sh");
        assert_eq!(t.resolve_parents("up/etc/x").unwrap(), "etc/x");
        assert_eq!(t.resolve_parents("bin").unwrap(), "bin", "the last component is not followed");
    }
}
