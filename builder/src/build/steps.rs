//! What `copy`, `write` and `[packages]` steps put in their layer: entries
//! at their destination, resolved through the parent image's symlinks, with
//! the parent folders the image already has keeping their metadata.

use kiln_cache::Store;
use kiln_recipes::{CopyStep, Recipe, Step, WriteStep};

use crate::context::{CopySource, SourceKind};
use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::image::ImageLayer;
use crate::layer::{Content, LayerEntry};
use crate::listing::Kind;
use crate::packages::lockfile::PackageLock;
use crate::reporter::Reporter;
use crate::tarball::TarKind;

/// Entries for the folders above `path` (relative): their metadata in the
/// image when they exist, else 0755 root.
pub(super) fn parent_entries(
    recipe: &Recipe,
    step: &Step,
    tree: &FsTree,
    path: &str,
) -> Result<Vec<LayerEntry>, BuildError> {
    let mut out = Vec::new();
    let mut prefix = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        let (mode, uid, gid) = match tree.get(&prefix)? {
            Some(e) if matches!(e.kind, Kind::Dir) => (e.mode, e.uid, e.gid),
            Some(_) => {
                return Err(recipe
                    .error_at(
                        step.span.clone(),
                        format!("`/{prefix}` is not a folder in the image, so nothing can go under it"),
                    )
                    .with_hint("pick another destination, or remove that file in an earlier step")
                    .into())
            }
            None => (0o755, 0, 0),
        };
        out.push(LayerEntry {
            path: prefix.clone(),
            kind: TarKind::Dir,
            mode,
            uid,
            gid,
            content: Content::None,
            xattrs: Vec::new(),
        });
    }
    Ok(out)
}

pub(super) fn resolve(recipe: &Recipe, step: &Step, tree: &FsTree, abs: &str) -> Result<String, BuildError> {
    tree.resolve_parents(abs.trim_start_matches('/'))?.map_err(|m| {
        recipe
            .error_at(step.span.clone(), m)
            .with_hint("check the symlinks along the destination path")
            .into()
    })
}

/// One entry of a copy source, relative to it (empty for the source itself).
pub(super) struct Source {
    pub(super) rel: String,
    pub(super) kind: TarKind,
    pub(super) mode: u32,
    pub(super) content: Content,
    pub(super) xattrs: Vec<(String, Vec<u8>)>,
}

pub(super) fn copy_entries(
    recipe: &Recipe,
    step: &Step,
    c: &CopyStep,
    src: &CopySource,
    tree: &FsTree,
) -> Result<Vec<LayerEntry>, BuildError> {
    let root_is_dir = matches!(src.entries[0].kind, SourceKind::Dir);
    let sources = src
        .entries
        .iter()
        .map(|e| {
            let (kind, content) = match &e.kind {
                SourceKind::Dir => (TarKind::Dir, Content::None),
                SourceKind::Symlink(t) => (TarKind::Symlink(t.clone()), Content::None),
                SourceKind::File { size, sha256 } => (
                    TarKind::File { size: *size },
                    Content::Path { path: e.abs.clone(), sha256: *sha256, stamp: e.stamp },
                ),
            };
            Source { rel: e.rel.clone(), kind, mode: e.mode, content, xattrs: Vec::new() }
        })
        .collect();
    place_entries(recipe, step, c, root_is_dir, src.name.as_deref(), sources, tree)
}

/// Puts a copy's sources at their destination: a folder's contents at `to`;
/// a file at `to`, or into it when `to` ends in `/` or is a folder.
pub(super) fn place_entries(
    recipe: &Recipe,
    step: &Step,
    c: &CopyStep,
    root_is_dir: bool,
    name: Option<&str>,
    sources: Vec<Source>,
    tree: &FsTree,
) -> Result<Vec<LayerEntry>, BuildError> {
    let to_rel = resolve(recipe, step, tree, &c.to)?;
    let into_dir =
        !root_is_dir && (c.to_is_dir || c.to == "/" || matches!(tree.kind(&to_rel)?, Some(Kind::Dir)));
    let dest = if into_dir {
        let name = name.expect("a file source has a name");
        if to_rel.is_empty() {
            name.to_string()
        } else {
            format!("{to_rel}/{name}")
        }
    } else {
        to_rel
    };
    let mut entries = if dest.is_empty() { Vec::new() } else { parent_entries(recipe, step, tree, &dest)? };
    for e in sources {
        let path = match (dest.is_empty(), e.rel.is_empty()) {
            (true, true) => continue, // a root copied to `/`: `/` itself is not an entry
            (true, false) => e.rel.clone(),
            (false, true) => dest.clone(),
            (false, false) => format!("{dest}/{}", e.rel),
        };
        entries.push(LayerEntry {
            path,
            kind: e.kind,
            mode: e.mode,
            uid: c.owner.uid,
            gid: c.owner.gid,
            content: e.content,
            xattrs: e.xattrs,
        });
    }
    Ok(entries)
}

pub(super) fn write_entries(
    recipe: &Recipe,
    step: &Step,
    w: &WriteStep,
    tree: &FsTree,
) -> Result<Vec<LayerEntry>, BuildError> {
    let path = resolve(recipe, step, tree, &w.path)?;
    if let Some(Kind::Dir) = tree.kind(&path)? {
        return Err(recipe
            .error_at(step.span.clone(), format!("`{}` is a folder in the image", w.path))
            .with_hint("`write` makes a file; name a path that is not a folder")
            .into());
    }
    let mut entries = parent_entries(recipe, step, tree, &path)?;
    let bytes = w.content.clone().into_bytes();
    entries.push(LayerEntry {
        path,
        kind: TarKind::File { size: bytes.len() as u64 },
        mode: w.mode.0,
        uid: w.owner.uid,
        gid: w.owner.gid,
        content: Content::Bytes(bytes),
        xattrs: Vec::new(),
    });
    Ok(entries)
}

/// A `copy --from` a stage: the path out of the stage's image (whose layers
/// the store holds), placed like a context copy, and the scratch folder its
/// files are read from, which must outlive the layer's writing.
pub(super) fn copy_from_entries(
    store: &Store,
    recipe: &Recipe,
    step: &Step,
    c: &CopyStep,
    stage_layers: &[ImageLayer],
    tree: &FsTree,
) -> Result<(Vec<LayerEntry>, tempfile::TempDir), BuildError> {
    let stage = c.from.as_deref().expect("copy from a stage");
    let (entries, tmp) = crate::extract::stage_source(store, stage_layers, &c.src).map_err(|m| {
        BuildError::from(
            recipe
                .error_at(c.src_span.clone(), format!("cannot copy `{}` out of stage `{stage}`: {m}", c.src))
                .with_hint("the path is absolute in that stage's image; check what its steps make"),
        )
    })?;
    let root_is_dir = matches!(entries.first().map(|e| &e.kind), Some(TarKind::Dir)) || c.src == "/";
    let sources: Vec<Source> = entries
        .into_iter()
        .map(|e| {
            let mode = match (&e.kind, c.mode) {
                (TarKind::File { .. }, Some(m)) => m.0,
                _ => e.mode,
            };
            Source { rel: e.rel, kind: e.kind, mode, content: e.content, xattrs: e.xattrs }
        })
        .collect();
    let name = crate::extract::base_name(&c.src);
    let out = place_entries(recipe, step, c, root_is_dir, name, sources, tree)?;
    Ok((out, tmp))
}

/// What the packages' layer entries need until the layer is written: the
/// scratch folder their data is in, and the pool files made for its folder
/// (removed then unless the folder links them). Dropped in that order.
pub(super) struct PackageScratch {
    _pooled: kiln_oci::unpack::PoolFiles,
    _dir: tempfile::TempDir,
}

/// The packages' layer: the locked `.deb`s (downloaded if the store lacks
/// them), unpacked into a scratch folder that must outlive the layer's
/// writing, over the parent's dpkg status. With `unpacked_next`, the
/// layer will be made as a folder for the next step.
#[allow(clippy::too_many_arguments)]
pub(super) fn package_entries(
    store: &Store,
    rt: &tokio::runtime::Handle,
    reporter: &dyn Reporter,
    epoch: u64,
    p: &kiln_recipes::Packages,
    lock: &PackageLock,
    parent: (&[ImageLayer], &FsTree),
    unpacked_next: bool,
) -> Result<(Vec<LayerEntry>, PackageScratch), BuildError> {
    let (layers, tree) = parent;
    let scratch = tempfile::Builder::new()
        .prefix("packages-")
        .tempdir_in(store.tmp_dir())
        .map_err(BuildError::io_write(store.tmp_dir()))?;
    let base_status = crate::extract::read_file(store, layers, tree, "var/lib/dpkg/status")?;
    let below = crate::packages::install::Below {
        status: base_status.map(|b| String::from_utf8_lossy(&b).into_owned()),
        exists: &|path| Ok(tree.get(path)?.is_some()),
        is_dir: &|path| Ok(matches!(tree.kind(path)?, Some(Kind::Dir))),
    };
    // A layer the next step needs as a folder is made through the file
    // pool: the files go there as they are decoded.
    let pool = unpacked_next.then(|| kiln_oci::unpack::pool_dir(store));
    let (entries, pooled) = crate::packages::fetch_and_unpack(
        store,
        rt,
        p,
        lock,
        epoch,
        scratch.path(),
        pool.as_deref(),
        &below,
        reporter,
    )?;
    Ok((entries, PackageScratch { _pooled: pooled, _dir: scratch }))
}
