//! The merged file tree of a stack of layers (whiteouts applied), read from
//! their listings on disk as overlayfs reads its lower folders: a lookup
//! asks the layers from the top down, and whole-tree readers get a merge of
//! the layers' sorted listings. Nothing here holds a layer's entries, only
//! each layer's whiteouts and opaque markers, so a base of a million files
//! costs what its listings' sparse indexes cost (a few MB).
//!
//! Steps use it to find the metadata of existing parent folders and to
//! resolve destinations through symlinks inside the root; `kiln diff`
//! compares two of them; `copy --from` and `-o vm:` read files out of it.
//!
//! The rules, as the OCI image spec gives them: an entry of layer `j` hides
//! the same path below `j`; a whiteout `.wh.NAME` in `j` hides `NAME` (and
//! what is under it) below `j`, not in `j` itself; an opaque marker
//! `.wh..wh..opq` in `D` hides what layers below `j` hold under `D`; an
//! entry that is not a folder hides what layers below hold under it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::listing::{Kind, ListEntry, Listing, ListingFile};

pub(crate) use crate::whiteout::{OPAQUE, WHITEOUT};

/// How many folders' visibility a tree remembers before forgetting all.
const MEMO: usize = 1 << 16;

#[derive(Default)]
pub struct FsTree {
    layers: Vec<Layer>,
    /// Keys the hashes of whiteouts and opaque folders (16 bytes each, not
    /// the path: a layer of a million long whiteout names costs 16 MB).
    keys: [std::collections::hash_map::RandomState; 2],
    /// Per folder: the lowest layer whose entries under it are visible.
    floors: Mutex<HashMap<String, usize>>,
}

impl std::fmt::Debug for FsTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FsTree").field("layers", &self.layers.len()).finish()
    }
}

struct Layer {
    digest: Digest,
    source: Source,
    /// The paths this layer's whiteouts hide below it, by [`FsTree::key`].
    whiteouts: HashSet<u128>,
    /// The folders whose lower contents this layer's opaque markers hide
    /// (`""` for the root), by [`FsTree::key`].
    opaque: HashSet<u128>,
}

/// A layer's sorted entries: its stored listing, or one in memory.
enum Source {
    File(ListingFile),
    Memory(Vec<ListEntry>),
}

type Entries<'a> = Box<dyn Iterator<Item = std::io::Result<ListEntry>> + Send + 'a>;

impl Source {
    fn get(&self, path: &str) -> std::io::Result<Option<ListEntry>> {
        match self {
            Source::File(f) => f.get(path),
            Source::Memory(v) => {
                Ok(v.binary_search_by(|e| e.path.as_str().cmp(path)).ok().map(|i| v[i].clone()))
            }
        }
    }

    fn iter_from<'a>(&'a self, from: &str) -> std::io::Result<Entries<'a>> {
        Ok(match self {
            Source::File(f) => Box::new(f.iter_from(from)?),
            Source::Memory(v) => {
                let i = v.partition_point(|e| e.path.as_str() < from);
                Box::new(v[i..].iter().cloned().map(Ok))
            }
        })
    }
}

impl FsTree {
    /// The merged tree of `layers`, checked: a layer that writes through a
    /// symlink of the layers below is refused.
    pub fn of_layers(store: &Store, layers: &[ImageLayer]) -> Result<FsTree, BuildError> {
        let mut t = FsTree::default();
        for l in layers {
            t.push_layer(store, l)?;
        }
        Ok(t)
    }

    /// Puts a stored layer on top (its listing read or made).
    pub fn push_layer(&mut self, store: &Store, layer: &ImageLayer) -> Result<(), BuildError> {
        let file = Listing::load(store, layer)?;
        self.push(layer.digest, Source::File(file))
    }

    /// Puts a stored listing on top.
    pub fn push_file(&mut self, layer: Digest, file: ListingFile) -> Result<(), BuildError> {
        self.push(layer, Source::File(file))
    }

    /// Puts a listing held in memory on top (tests, small layers).
    pub fn apply(&mut self, listing: &Listing) -> Result<(), String> {
        let mut v = listing.entries.clone();
        v.sort_by(|a, b| a.path.cmp(&b.path));
        self.push(Digest::of(b""), Source::Memory(v)).map_err(|e| match e {
            BuildError::BadLayer { reason, .. } => reason,
            e => e.to_string(),
        })
    }

    /// One pass over the new layer: gathers its whiteouts and opaque
    /// markers, and refuses an entry whose parent folders are, below it,
    /// symlinks (a classic way for a layer to escape).
    fn push(&mut self, digest: Digest, source: Source) -> Result<(), BuildError> {
        let bad = |reason: String| BuildError::BadLayer { layer: digest, reason };
        let mut whiteouts = HashSet::new();
        let mut opaque = HashSet::new();
        // Folders known not to be (or be under) a symlink below.
        let mut checked: HashSet<String> = HashSet::new();
        for e in source.iter_from("").map_err(|e| self.damaged(&digest, e))? {
            let e = e.map_err(|e| self.damaged(&digest, e))?;
            let (parent, name) = split(&e.path);
            if let Some(p) = parent {
                if let Some(s) = self.symlink_on(p, &mut checked)? {
                    return Err(bad(format!(
                        "entry `{}` would be written through the symlink `/{s}`",
                        e.path
                    )));
                }
            }
            if name == OPAQUE {
                opaque.insert(self.key(parent.unwrap_or("")));
            } else if let Some(victim) = name.strip_prefix(WHITEOUT) {
                whiteouts.insert(self.key(&join(parent, victim)));
            }
        }
        self.layers.push(Layer { digest, source, whiteouts, opaque });
        self.floors.lock().expect("floors").clear();
        Ok(())
    }

    /// `dir` or the first of its parents that is a symlink in the tree.
    /// Folders found clean go into `checked`, so a deep tree is walked once.
    fn symlink_on<'a>(
        &self,
        dir: &'a str,
        checked: &mut HashSet<String>,
    ) -> Result<Option<&'a str>, BuildError> {
        let mut at = Some(dir);
        let mut clean = Vec::new();
        while let Some(d) = at {
            if checked.contains(d) {
                break;
            }
            if let Some(Kind::Symlink { .. }) = self.get(d)?.map(|e| e.kind) {
                return Ok(Some(d));
            }
            clean.push(d);
            at = split(d).0;
        }
        if checked.len() + clean.len() > MEMO {
            checked.clear();
        }
        checked.extend(clean.into_iter().map(str::to_string));
        Ok(None)
    }

    /// A path's hash under this tree's random keys.
    fn key(&self, path: &str) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.keys[0].hash_one(path)) << 64) | u128::from(self.keys[1].hash_one(path))
    }

    fn damaged(&self, layer: &Digest, e: std::io::Error) -> BuildError {
        BuildError::Integrity {
            message: format!("The stored listing of layer {layer} cannot be read: {e}"),
            hint: "Remove the cache's `listings` folder: kiln lists each layer again from its blob.".into(),
        }
    }

    fn lookup(&self, j: usize, path: &str) -> Result<Option<ListEntry>, BuildError> {
        let l = &self.layers[j];
        l.source.get(path).map_err(|e| self.damaged(&l.digest, e))
    }

    /// The lowest layer whose entries under `dir` are visible (`None`: the root).
    fn floor(&self, dir: Option<&str>) -> Result<usize, BuildError> {
        let Some(d) = dir else {
            let root = self.key("");
            return Ok(self.layers.iter().rposition(|l| l.opaque.contains(&root)).unwrap_or(0));
        };
        if let Some(f) = self.floors.lock().expect("floors").get(d) {
            return Ok(*f);
        }
        let mut floor = self.floor(split(d).0)?;
        let k = self.key(d);
        for j in (floor..self.layers.len()).rev() {
            // Not a folder in `j`: nothing of `j` or below is under it.
            if self.lookup(j, d)?.is_some_and(|e| !matches!(e.kind, Kind::Dir)) {
                floor = j + 1;
                break;
            }
            let l = &self.layers[j];
            if l.whiteouts.contains(&k) || l.opaque.contains(&k) {
                floor = j;
                break;
            }
        }
        let mut memo = self.floors.lock().expect("floors");
        if memo.len() >= MEMO {
            memo.clear();
        }
        memo.insert(d.to_string(), floor);
        Ok(floor)
    }

    /// The entry at `path` (relative, clean) and the index of the layer it
    /// comes from.
    pub(crate) fn locate(&self, path: &str) -> Result<Option<(usize, ListEntry)>, BuildError> {
        let floor = self.floor(split(path).0)?;
        let k = self.key(path);
        for j in (floor..self.layers.len()).rev() {
            if let Some(e) = self.lookup(j, path)? {
                return Ok(Some((j, e)));
            }
            if self.layers[j].whiteouts.contains(&k) {
                return Ok(None);
            }
        }
        Ok(None)
    }

    /// The entry at `path` in layer `j` alone (a hard link's target is in
    /// the hard link's own layer, whatever the layers above made of it).
    pub(crate) fn entry_in(&self, j: usize, path: &str) -> Result<Option<ListEntry>, BuildError> {
        self.lookup(j, path)
    }

    /// The entry at `path` (relative, clean), if the tree holds it.
    pub fn get(&self, path: &str) -> Result<Option<ListEntry>, BuildError> {
        Ok(self.locate(path)?.map(|(_, e)| e))
    }

    pub fn kind(&self, path: &str) -> Result<Option<Kind>, BuildError> {
        Ok(self.get(path)?.map(|e| e.kind))
    }

    /// Every entry of the tree in path order, with the layer it comes from.
    pub fn iter(&self) -> Result<Merged<'_>, BuildError> {
        self.iter_from("", None)
    }

    /// The entries under the folder `dir` (relative, clean; `""` for all),
    /// in path order, with the layer each comes from.
    pub(crate) fn iter_under(&self, dir: &str) -> Result<Merged<'_>, BuildError> {
        if dir.is_empty() {
            return self.iter();
        }
        let prefix = format!("{dir}/");
        self.iter_from(&prefix, Some(prefix.clone()))
    }

    fn iter_from(&self, from: &str, prefix: Option<String>) -> Result<Merged<'_>, BuildError> {
        let mut sources = Vec::with_capacity(self.layers.len());
        let mut heads = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut it = l.source.iter_from(from).map_err(|e| self.damaged(&l.digest, e))?;
            let head = next_entry(&mut it, prefix.as_deref()).map_err(|e| self.damaged(&l.digest, e))?;
            sources.push(it);
            heads.push(head);
        }
        Ok(Merged { tree: self, sources, heads, prefix })
    }

    /// Resolves the folders of `path` (relative, clean) through symlinks in
    /// the tree, never leaving the root. The last component is not followed.
    /// The outer error is the store's; the inner, why the path does not
    /// resolve (a symlink loop).
    pub fn resolve_parents(&self, path: &str) -> Result<Result<String, String>, BuildError> {
        resolve_parents(path, &|p| self.kind(p))
    }

    /// Every entry, in a map (for readers that hold the whole tree anyway,
    /// such as `-o vm:`).
    pub(crate) fn to_map(&self) -> Result<BTreeMap<String, ListEntry>, BuildError> {
        let mut out = BTreeMap::new();
        for e in self.iter()? {
            let (_, e) = e?;
            out.insert(e.path.clone(), e);
        }
        Ok(out)
    }
}

/// A merged tree held whole in memory, for readers that need all of it
/// anyway (`-o vm:` writes every entry into a filesystem), with the same
/// lookups as [`FsTree`].
#[derive(Debug, Clone, Default)]
pub struct TreeMap {
    pub entries: BTreeMap<String, ListEntry>,
}

impl TreeMap {
    pub fn of(tree: &FsTree) -> Result<TreeMap, BuildError> {
        Ok(TreeMap { entries: tree.to_map()? })
    }

    pub fn get(&self, path: &str) -> Option<&ListEntry> {
        self.entries.get(path)
    }

    /// [`FsTree::resolve_parents`], over the map.
    pub fn resolve_parents(&self, path: &str) -> Result<String, String> {
        let lookup = |p: &str| Ok::<_, std::convert::Infallible>(self.entries.get(p).map(|e| e.kind.clone()));
        match resolve_parents(path, &lookup) {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// The next entry of a layer's stream that is not a whiteout or an opaque
/// marker, if still under `prefix`.
fn next_entry(it: &mut Entries<'_>, prefix: Option<&str>) -> std::io::Result<Option<ListEntry>> {
    for e in it.by_ref() {
        let e = e?;
        if prefix.is_some_and(|p| !e.path.starts_with(p)) {
            return Ok(None);
        }
        if !split(&e.path).1.starts_with(WHITEOUT) {
            return Ok(Some(e));
        }
    }
    Ok(None)
}

/// The merge of the layers' sorted listings: the visible entries in path order.
pub struct Merged<'a> {
    tree: &'a FsTree,
    sources: Vec<Entries<'a>>,
    heads: Vec<Option<ListEntry>>,
    prefix: Option<String>,
}

impl Iterator for Merged<'_> {
    type Item = Result<(usize, ListEntry), BuildError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let path = self.heads.iter().flatten().map(|e| e.path.as_str()).min()?.to_string();
            // Which layers hold it, and move each past it.
            let mut holders: Vec<(usize, ListEntry)> = Vec::new();
            for j in 0..self.heads.len() {
                if self.heads[j].as_ref().is_some_and(|e| e.path == path) {
                    let next = match next_entry(&mut self.sources[j], self.prefix.as_deref()) {
                        Ok(n) => n,
                        Err(e) => return Some(Err(self.tree.damaged(&self.tree.layers[j].digest, e))),
                    };
                    let e = std::mem::replace(&mut self.heads[j], next).expect("checked");
                    holders.push((j, e));
                }
            }
            let floor = match self.tree.floor(split(&path).0) {
                Ok(f) => f,
                Err(e) => return Some(Err(e)),
            };
            let k = self.tree.key(&path);
            for j in (floor..self.tree.layers.len()).rev() {
                if let Some(i) = holders.iter().position(|(h, _)| *h == j) {
                    return Some(Ok(holders.swap_remove(i)));
                }
                if self.tree.layers[j].whiteouts.contains(&k) {
                    break;
                }
            }
        }
    }
}

/// Resolves the folders of `path` (relative, clean) through symlinks, as
/// `kind_of` tells them, never leaving the root. The last component is not
/// followed. The outer error is the lookup's; the inner, the path's.
pub(crate) fn resolve_parents<E>(
    path: &str,
    kind_of: &dyn Fn(&str) -> Result<Option<Kind>, E>,
) -> Result<Result<String, String>, E> {
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
        match kind_of(&candidate)? {
            Some(Kind::Symlink { target }) if !last => {
                hops += 1;
                if hops > 40 {
                    return Ok(Err(format!("too many levels of symlinks resolving `/{path}`")));
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
    Ok(Ok(done.join("/")))
}

pub(crate) fn split(path: &str) -> (Option<&str>, &str) {
    match path.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, path),
    }
}

fn join(parent: Option<&str>, name: &str) -> String {
    match parent {
        Some(p) => format!("{p}/{name}"),
        None => name.to_string(),
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

    fn paths(t: &FsTree) -> Vec<String> {
        t.iter().unwrap().map(|x| x.unwrap().1.path).collect()
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
        assert_eq!(paths(&t), vec!["a", "b"]);
        assert_eq!(t.get("a/x/y").unwrap(), None);
        // What a layer adds beside its own opaque marker stays, even when it sorts first.
        t.apply(&Listing { entries: vec![e("b/-new", Kind::Dir), e("b/.wh..wh..opq", Kind::Fifo)] }).unwrap();
        assert_eq!(paths(&t), vec!["a", "b", "b/-new"]);
        // A file over a folder hides what was under it; a folder made again does not bring it back.
        t.apply(&Listing { entries: vec![e("b", Kind::Fifo)] }).unwrap();
        t.apply(&Listing { entries: vec![e("b", Kind::Dir), e("b/new", Kind::Dir)] }).unwrap();
        assert_eq!(paths(&t), vec!["a", "b", "b/new"]);
        assert_eq!(t.locate("b").unwrap().unwrap().0, 4);
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let mut t = FsTree::default();
        t.apply(&Listing { entries: vec![sym("evil", "/etc")] }).unwrap();
        let err = t.apply(&Listing { entries: vec![e("evil/passwd", Kind::Dir)] }).unwrap_err();
        assert!(err.contains("through the symlink `/evil`"), "{err}");
        let err = t.apply(&Listing { entries: vec![e("evil/a/b/c", Kind::Dir)] }).unwrap_err();
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
        let r = |p: &str| t.resolve_parents(p).unwrap().unwrap();
        assert_eq!(r("bin/sh"), "usr/bin/sh");
        assert_eq!(r("up/etc/x"), "etc/x");
        assert_eq!(r("bin"), "bin", "the last component is not followed");
    }

    /// A plain model of the spec's rules, applied layer after layer to a map.
    fn model(layers: &[Vec<ListEntry>]) -> BTreeMap<String, ListEntry> {
        let mut m: BTreeMap<String, ListEntry> = BTreeMap::new();
        let under = |m: &mut BTreeMap<String, ListEntry>, d: &str| {
            let p = if d.is_empty() { String::new() } else { format!("{d}/") };
            m.retain(|k, _| !k.starts_with(&p) || k.as_str() == d);
            if d.is_empty() {
                m.clear();
            }
        };
        for l in layers {
            let mut next = m.clone();
            for x in l {
                let (parent, name) = split(&x.path);
                if name == OPAQUE {
                    under(&mut next, parent.unwrap_or(""));
                } else if let Some(v) = name.strip_prefix(WHITEOUT) {
                    let v = join(parent, v);
                    next.remove(&v);
                    under(&mut next, &v);
                } else if !matches!(x.kind, Kind::Dir) {
                    under(&mut next, &x.path);
                }
            }
            // This layer's own entries, after what hides the layers below.
            for x in l {
                if !split(&x.path).1.starts_with(WHITEOUT) {
                    next.insert(x.path.clone(), x.clone());
                }
            }
            m = next;
        }
        m
    }

    #[test]
    fn lookups_and_the_merge_agree_with_the_spec_model() {
        use proptest::prelude::*;
        let names = ["a", "b", "-c", "a/x", "a/-y", "b/x", "b/x/z", "a/x/q"];
        let entry = (0..names.len(), 0..6u8).prop_map(move |(n, t)| {
            let path = names[n];
            let (parent, name) = split(path);
            match t {
                0 => e(path, Kind::Dir),
                1 => e(path, Kind::Fifo),
                2 => e(&join(parent, &format!(".wh.{name}")), Kind::Fifo),
                3 => e(&join(Some(path), OPAQUE), Kind::Fifo),
                4 => e(path, Kind::File { size: 1, sha256: Digest::of(path.as_bytes()) }),
                _ => e(path, Kind::Dir),
            }
        });
        let layer = proptest::collection::vec(entry, 0..8);
        let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
            cases: 512,
            ..Default::default()
        });
        runner
            .run(&proptest::collection::vec(layer, 1..5), |layers| {
                // One entry per path in a layer; no entry under a non-folder of its own layer.
                let mut clean = Vec::new();
                for l in layers {
                    let mut by_path: BTreeMap<String, ListEntry> = BTreeMap::new();
                    for x in l {
                        by_path.insert(x.path.clone(), x);
                    }
                    let v: Vec<ListEntry> = by_path.values().cloned().collect();
                    let v: Vec<ListEntry> = v
                        .iter()
                        .filter(|x| {
                            !v.iter().any(|y| {
                                !matches!(y.kind, Kind::Dir) && x.path.starts_with(&format!("{}/", y.path))
                            })
                        })
                        .cloned()
                        .collect();
                    clean.push(v);
                }
                let want = model(&clean);
                let mut t = FsTree::default();
                for l in &clean {
                    t.apply(&Listing { entries: l.clone() }).unwrap();
                }
                let got: BTreeMap<String, ListEntry> = t.to_map().unwrap();
                prop_assert_eq!(&got, &want);
                for n in names {
                    prop_assert_eq!(t.get(n).unwrap(), want.get(n).cloned(), "{}", n);
                }
                let under_a: Vec<String> = t.iter_under("a").unwrap().map(|x| x.unwrap().1.path).collect();
                let want_a: Vec<String> = want.keys().filter(|k| k.starts_with("a/")).cloned().collect();
                prop_assert_eq!(under_a, want_a);
                Ok(())
            })
            .unwrap();
    }
}
