//! `copy = "/path" from = "STAGE"`: files out of another stage's image. The
//! stage's merged tree says what is there; each file's bytes are read from
//! the topmost layer that holds it, one pass per layer, into a temp folder
//! (checked against the listing's sha256 when the new layer is written).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::image::ImageLayer;
use crate::layer::Content;
use crate::listing::{Kind, ListEntry};
use crate::tarball::TarKind;

/// One entry of the source, relative to it (empty for the source itself).
pub struct StageEntry {
    pub rel: String,
    pub kind: TarKind,
    pub mode: u32,
    pub content: Content,
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What `src` (absolute, normalized) holds in the image made of `layers`.
/// The returned temp folder holds the files' bytes until dropped.
pub fn stage_source(
    store: &Store,
    layers: &[ImageLayer],
    src: &str,
) -> Result<(Vec<StageEntry>, tempfile::TempDir), String> {
    let s = |e: BuildError| e.to_string();
    let tree = FsTree::of_layers(store, layers).map_err(s)?;
    let rel = tree.resolve_parents(src.trim_start_matches('/')).map_err(s)??;
    // (path relative to the source, layer, entry)
    let mut picked: Vec<(String, usize, ListEntry)> = Vec::new();
    if !rel.is_empty() {
        let (j, root) = tree
            .locate(&rel)
            .map_err(s)?
            .ok_or_else(|| format!("`{src}` does not exist in that stage's image"))?;
        picked.push((String::new(), j, root));
    }
    let skip = if rel.is_empty() { 0 } else { rel.len() + 1 };
    for x in tree.iter_under(&rel).map_err(s)? {
        let (j, e) = x.map_err(s)?;
        picked.push((e.path[skip..].to_string(), j, e));
    }

    // Which layer holds each file's bytes (for a hard link, its target's).
    let mut wanted: Vec<BTreeMap<String, Digest>> = vec![BTreeMap::new(); layers.len()];
    let mut source_of: HashMap<String, (usize, String, u64, Digest)> = HashMap::new();
    for (_, j, e) in &picked {
        let (layer, data_path, size, sha) = match &e.kind {
            Kind::File { size, sha256 } => (*j, e.path.clone(), *size, *sha256),
            // The target as the hard link's own layer holds it (a layer above
            // may have replaced the target's path with another file).
            Kind::Hardlink { target } => match tree.entry_in(*j, target).map_err(s)? {
                Some(ListEntry { kind: Kind::File { size, sha256 }, .. }) => {
                    (*j, target.clone(), size, sha256)
                }
                _ => {
                    return Err(format!(
                        "the hard link `/{}` points to `/{target}`, which is not a file",
                        e.path
                    ))
                }
            },
            _ => continue,
        };
        wanted[layer].insert(data_path.clone(), sha);
        source_of.insert(e.path.clone(), (layer, data_path, size, sha));
    }

    let tmp = tempfile::Builder::new()
        .prefix("from-stage-")
        .tempdir_in(store.tmp_dir())
        .map_err(|e| e.to_string())?;
    let mut files: HashMap<(usize, String), PathBuf> = HashMap::new();
    for (i, want) in wanted.iter().enumerate() {
        if want.is_empty() {
            continue;
        }
        let l = &layers[i];
        let mut ar = tar::Archive::new(l.open_tar(store).map_err(|e| e.to_string())?);
        for entry in ar.entries().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| e.to_string())?;
            if !entry.header().entry_type().is_file() {
                continue;
            }
            let raw = entry.path_bytes().into_owned();
            let Ok(Some(path)) = crate::listing::clean_path(&raw) else { continue };
            if want.contains_key(&path) {
                let out = tmp.path().join(format!("{i}-{}", files.len()));
                let mut w = fs::File::create(&out).map_err(|e| e.to_string())?;
                std::io::copy(&mut entry, &mut w).map_err(|e| e.to_string())?;
                files.insert((i, path), out);
            }
        }
    }

    let mut out = Vec::with_capacity(picked.len());
    for (rel, _, e) in picked {
        let (kind, content) = match &e.kind {
            Kind::Dir => (TarKind::Dir, Content::None),
            Kind::Symlink { target } => (TarKind::Symlink(target.clone()), Content::None),
            Kind::File { .. } | Kind::Hardlink { .. } => {
                let (layer, data_path, size, sha256) = &source_of[&e.path];
                let path = files
                    .get(&(*layer, data_path.clone()))
                    .ok_or_else(|| format!("the layer that should hold `/{data_path}` does not"))?;
                (
                    TarKind::File { size: *size },
                    Content::Path { path: path.clone(), sha256: *sha256, stamp: None },
                )
            }
            Kind::Char { major, minor } => (TarKind::CharDev(*major, *minor), Content::None),
            Kind::Block { major, minor } => (TarKind::BlockDev(*major, *minor), Content::None),
            Kind::Fifo => (TarKind::Fifo, Content::None),
        };
        out.push(StageEntry { rel: rel.to_string(), kind, mode: e.mode, content, xattrs: e.xattr_pairs() });
    }
    Ok((out, tmp))
}

/// The last component of an absolute path (`None` for `/`).
pub fn base_name(src: &str) -> Option<&str> {
    Path::new(src).file_name().and_then(|n| n.to_str())
}

/// The bytes of the regular file at `path` (relative, clean) in the image
/// made of `layers`, whose merged tree is `tree`; `None` when it is not a
/// regular file there.
pub fn read_file(
    store: &Store,
    layers: &[ImageLayer],
    tree: &FsTree,
    path: &str,
) -> Result<Option<Vec<u8>>, BuildError> {
    if !matches!(tree.kind(path)?, Some(Kind::File { .. })) {
        return Ok(None);
    }
    read_files(store, layers, tree, &[path.to_string()]).map(|mut m| m.remove(path))
}

/// The bytes of regular files (or hard links to one) in the image made of
/// `layers` (paths relative, parents resolved), reading each layer that
/// holds one of them once. Paths that are not regular files are left out.
pub fn read_files(
    store: &Store,
    layers: &[ImageLayer],
    tree: &FsTree,
    paths: &[String],
) -> Result<HashMap<String, Vec<u8>>, BuildError> {
    // The layer the tree takes each path from is the one that holds its bytes.
    let mut by_layer: Vec<HashMap<String, Vec<String>>> = vec![HashMap::new(); layers.len()];
    for p in paths {
        let (layer, source) = match tree.locate(p)? {
            Some((j, ListEntry { kind: Kind::File { .. }, .. })) => (j, p.clone()),
            Some((j, ListEntry { kind: Kind::Hardlink { target }, .. })) => {
                match tree.entry_in(j, &target)? {
                    Some(ListEntry { kind: Kind::File { .. }, .. }) => (j, target),
                    _ => continue,
                }
            }
            _ => continue,
        };
        if let Some(wanted) = by_layer.get_mut(layer) {
            wanted.entry(source).or_default().push(p.clone());
        }
    }
    let mut out = HashMap::new();
    for (layer, wanted) in layers.iter().zip(&by_layer) {
        if wanted.is_empty() {
            continue;
        }
        crate::listing::walk_layer(layer.open_tar(store)?, &layer.digest, &mut |e, data| {
            if let (Some(dests), TarKind::File { .. }) = (wanted.get(e.path), e.kind) {
                let mut bytes = Vec::new();
                data.read_to_end(&mut bytes)?;
                for d in dests {
                    out.insert(d.clone(), bytes.clone());
                }
            }
            Ok(())
        })?;
    }
    Ok(out)
}
