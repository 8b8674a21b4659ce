//! `copy = "/path" from = "STAGE"`: files out of another stage's image. The
//! stage's merged tree says what is there; each file's bytes are read from
//! the topmost layer that holds it, one pass per layer, into a temp folder
//! (checked against the listing's sha256 when the new layer is written).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::image::ImageLayer;
use crate::layer::Content;
use crate::listing::{Kind, Listing};
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
    let mut tree = FsTree::default();
    let mut listings = Vec::with_capacity(layers.len());
    for l in layers {
        let listing = Listing::load(store, l).map_err(|e| e.to_string())?;
        tree.apply(&listing)?;
        listings.push(listing);
    }
    let rel = tree.resolve_parents(src.trim_start_matches('/'))?;
    let mut picked: Vec<(&str, &crate::listing::ListEntry)> = Vec::new();
    if !rel.is_empty() {
        let root = tree.get(&rel).ok_or_else(|| format!("`{src}` does not exist in that stage's image"))?;
        picked.push(("", root));
    }
    let prefix = if rel.is_empty() { String::new() } else { format!("{rel}/") };
    for (path, e) in tree.entries.range(prefix.clone()..) {
        if !path.starts_with(&prefix) {
            break;
        }
        if !path.is_empty() && path.len() > prefix.len() {
            picked.push((&path[prefix.len()..], e));
        }
    }

    // Which layer holds each file's bytes (for a hard link, its target's).
    let mut wanted: Vec<BTreeMap<String, Digest>> = vec![BTreeMap::new(); layers.len()];
    let mut source_of: HashMap<String, (usize, String)> = HashMap::new();
    for (_, e) in &picked {
        let (data_path, sha) = match &e.kind {
            Kind::File { sha256, .. } => (e.path.clone(), *sha256),
            Kind::Hardlink { target } => match tree.get(target).map(|t| &t.kind) {
                Some(Kind::File { sha256, .. }) => (target.clone(), *sha256),
                _ => {
                    return Err(format!(
                        "the hard link `/{}` points to `/{target}`, which is not a file",
                        e.path
                    ))
                }
            },
            _ => continue,
        };
        let layer = (0..layers.len())
            .rev()
            .find(|i| {
                listings[*i].entries.binary_search_by(|x| x.path.as_str().cmp(data_path.as_str())).is_ok_and(
                    |k| matches!(listings[*i].entries[k].kind, Kind::File { sha256, .. } if sha256 == sha),
                )
            })
            .ok_or_else(|| format!("no layer holds the bytes of `/{data_path}`"))?;
        wanted[layer].insert(data_path.clone(), sha);
        source_of.insert(e.path.clone(), (layer, data_path));
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
    for (rel, e) in picked {
        let (kind, content) = match &e.kind {
            Kind::Dir => (TarKind::Dir, Content::None),
            Kind::Symlink { target } => (TarKind::Symlink(target.clone()), Content::None),
            Kind::File { .. } | Kind::Hardlink { .. } => {
                let (layer, data_path) = &source_of[&e.path];
                let Some(Kind::File { size, sha256 }) = tree.get(data_path).map(|t| &t.kind) else {
                    unreachable!("checked above")
                };
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
) -> Result<Option<Vec<u8>>, String> {
    if !matches!(tree.get(path).map(|e| &e.kind), Some(Kind::File { .. })) {
        return Ok(None);
    }
    read_files(store, layers, tree, &[path.to_string()])
        .map(|mut m| m.remove(path))
        .map_err(|e| e.to_string())
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
    // The topmost layer with each path is the one that holds its bytes.
    let mut in_layer: Vec<HashSet<String>> = Vec::with_capacity(layers.len());
    for l in layers {
        in_layer.push(Listing::load(store, l)?.entries.into_iter().map(|e| e.path).collect());
    }
    let mut by_layer: Vec<HashMap<String, Vec<String>>> = vec![HashMap::new(); layers.len()];
    for p in paths {
        let source = match tree.get(p).map(|e| &e.kind) {
            Some(Kind::File { .. }) => p.clone(),
            Some(Kind::Hardlink { target }) => target.clone(),
            _ => continue,
        };
        if let Some(i) = (0..layers.len()).rev().find(|i| in_layer[*i].contains(&source)) {
            by_layer[i].entry(source).or_default().push(p.clone());
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
