//! The build: plan each step's cache key, reuse the layers the store has,
//! write the ones it does not, assemble the config and manifest, export.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::json;

use kiln_cache::{Digest, StatIndex, Store};
use kiln_recipes::diagnostic::line_col;
use kiln_recipes::recipe::Platform;
use kiln_recipes::{CopyStep, ImageRef, Recipe, Step, StepKind, WriteStep};

use crate::base::{load_base, BaseImage};
use crate::context::{scan_copy, Context, CopySource, SourceKind};
use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::image::{self, history, ImageLayer, StoredImage};
use crate::layer::{self, Content, LayerEntry};
use crate::listing::{Kind, Listing};
use crate::reporter::{Reporter, StepInfo};
use crate::tarball::TarKind;

/// Bump when anything that decides a layer's bytes changes, so old cache
/// entries are never taken for new ones.
pub const KEY_SCHEMA: u32 = 1;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The context folder; default: the recipe's folder.
    pub context: Option<PathBuf>,
    pub cache_dir: PathBuf,
    /// Ignore cached steps (they are still written for next time).
    pub no_cache: bool,
    pub platform: Option<Platform>,
    /// SOURCE_DATE_EPOCH: overrides the recipe's `epoch`.
    pub epoch_override: Option<u64>,
    pub outputs: Vec<ImageRef>,
}

/// A step with its cache key, and whether the store has its layer.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub info: StepInfo,
    pub key: Digest,
    pub hit: bool,
}

#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub image: StoredImage,
    pub steps: Vec<PlannedStep>,
}

/// What a step needs to write its layer on a miss.
enum Prepared {
    Copy(CopySource),
    Write,
}

struct Session<'a> {
    recipe: &'a Recipe,
    store: Store,
    ctx: Context,
    platform: Platform,
    epoch: u64,
    index: StatIndex,
    base: BaseImage,
}

impl<'a> Session<'a> {
    fn open(
        recipe: &'a Recipe,
        opts: &'a BuildOptions,
    ) -> Result<(Session<'a>, kiln_cache::StoreLock), BuildError> {
        let store = Store::open(&opts.cache_dir)?;
        let lock = store.lock_shared()?;
        let ctx = Context::open(opts.context.as_deref().unwrap_or(&recipe.dir))?;
        let platform =
            opts.platform.clone().or_else(|| recipe.image.platform.clone()).unwrap_or_else(Platform::host);
        let epoch = opts.epoch_override.or(recipe.image.epoch).unwrap_or(0);
        let index = StatIndex::load(&store, &ctx.root);
        let base = load_base(&store, recipe, &platform)?;
        Ok((Session { recipe, store, ctx, platform, epoch, index, base }, lock))
    }

    fn info(&self, step: &Step) -> StepInfo {
        StepInfo {
            index: step.index,
            total: self.recipe.steps.len(),
            description: describe(step),
            line: line_col(&self.recipe.source, step.span.start).0,
        }
    }

    /// The step's key, and what writing its layer needs.
    fn key(&mut self, parent: &str, step: &Step) -> Result<(Digest, Prepared), BuildError> {
        let (params, prepared) = match &step.kind {
            StepKind::Copy(c) => {
                let src = scan_copy(&self.ctx, self.recipe, c, &mut self.index)?;
                let p = json!({
                    "copy": c.src, "to": c.to, "to_is_dir": c.to_is_dir,
                    "owner": c.owner.to_string(), "mode": c.mode.map(|m| m.to_string()),
                    "inputs": src.inputs.to_string(),
                });
                (p, Prepared::Copy(src))
            }
            StepKind::Write(w) => {
                let p = json!({
                    "write": w.path, "content": Digest::of(w.content.as_bytes()).to_string(),
                    "owner": w.owner.to_string(), "mode": w.mode.to_string(),
                });
                (p, Prepared::Write)
            }
        };
        let doc = json!({
            "schema": KEY_SCHEMA, "parent": parent, "platform": self.platform.to_string(),
            "epoch": self.epoch, "step": params,
        });
        Ok((Digest::of(&serde_json::to_vec(&doc).expect("json")), prepared))
    }

    /// Whether the store holds `key`'s layer intact.
    fn lookup(&self, key: &Digest) -> Result<Cached, BuildError> {
        let Some(rec) = self.store.step(key) else { return Ok(Cached::Miss) };
        Ok(if self.store.verify_blob(&rec.digest)? { Cached::Hit(rec.into()) } else { Cached::Corrupt })
    }
}

enum Cached {
    Hit(ImageLayer),
    Miss,
    /// A record whose blob is gone or failed its digest check.
    Corrupt,
}

/// Computes every step's key and whether it is cached; builds nothing.
pub fn plan(recipe: &Recipe, opts: &BuildOptions) -> Result<Vec<PlannedStep>, BuildError> {
    let (mut s, _lock) = Session::open(recipe, opts)?;
    let mut parent = s.base.id.clone();
    let mut out = Vec::new();
    for step in &recipe.steps {
        let (key, _) = s.key(&parent, step)?;
        let hit = !opts.no_cache && matches!(s.lookup(&key)?, Cached::Hit(_));
        out.push(PlannedStep { info: s.info(step), key, hit });
        parent = key.to_string();
    }
    s.index.save(&s.store)?;
    Ok(out)
}

/// Builds the recipe into the store and writes every output.
pub fn build(
    recipe: &Recipe,
    opts: &BuildOptions,
    reporter: &dyn Reporter,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
    let (mut s, _lock) = Session::open(recipe, opts)?;
    reporter.on_build_start(&recipe.image.name, recipe.steps.len());

    let mut layers: Vec<ImageLayer> = s.base.layers.clone();
    let mut history_entries = s.base.config.history().clone().unwrap_or_default();
    let mut lower: Option<FsTree> = None; // built on the first miss
    let mut parent = s.base.id.clone();
    let mut planned = Vec::new();

    for step in &recipe.steps {
        let t = Instant::now();
        let info = s.info(step);
        reporter.on_step_start(&info);
        let (key, prepared) = s.key(&parent, step)?;
        let cached = if opts.no_cache { Cached::Miss } else { s.lookup(&key)? };
        let hit = matches!(cached, Cached::Hit(_));
        let (layer, written) = match cached {
            Cached::Hit(layer) => {
                s.store.touch_record("steps", &key.hex());
                reporter.on_cache_hit(&info, &key);
                (layer, None)
            }
            Cached::Miss | Cached::Corrupt => {
                if matches!(cached, Cached::Corrupt) {
                    reporter.on_notice(&format!(
                        "step {}: the cached layer was missing or corrupt; rebuilding it",
                        step.index + 1
                    ));
                }
                if lower.is_none() {
                    lower = Some(lower_tree(&s.store, &layers)?);
                }
                let tree = lower.as_ref().expect("just built");
                let entries = match (&step.kind, &prepared) {
                    (StepKind::Copy(c), Prepared::Copy(src)) => copy_entries(recipe, step, c, src, tree)?,
                    (StepKind::Write(w), Prepared::Write) => write_entries(recipe, step, w, tree)?,
                    _ => unreachable!("prepared matches the step kind"),
                };
                let (blob, listing) = layer::write_layer(&s.store, entries, s.epoch)?;
                reporter.on_layer_written(&info, &blob);
                let layer = ImageLayer {
                    diff_id: blob.diff_id,
                    digest: blob.digest,
                    size: blob.size,
                    media_type: layer::MEDIA_TYPE.to_string(),
                };
                s.store.put_step(&key, &layer.step_record())?;
                (layer, Some(listing))
            }
        };
        if let Some(tree) = lower.as_mut() {
            let listing = match written {
                Some(l) => l,
                None => Listing::load(&s.store, &layer)?,
            };
            tree.apply(&listing).map_err(|reason| BuildError::BadLayer { layer: layer.digest, reason })?;
        }
        layers.push(layer);
        history_entries.push(history(s.epoch, &format!("kiln: {}", info.description), false));
        reporter.on_step_finish(&info, hit, t.elapsed());
        planned.push(PlannedStep { info, key, hit });
        parent = key.to_string();
    }
    s.index.save(&s.store)?;

    let mut config = s.base.config.clone();
    config.set_config(Some(image::merge_config(s.base.config.config().as_ref(), &recipe.config)));
    config.set_architecture(s.platform.architecture.as_str().into());
    config.set_os(s.platform.os.as_str().into());
    config.set_variant(s.platform.variant.clone());
    config.set_history(Some(history_entries));
    let image = image::store_image(&s.store, config, layers, s.epoch, BTreeMap::new())?;
    image.record(&s.store, "images", &image.manifest.hex(), &recipe.image.name)?;

    let outputs = if opts.outputs.is_empty() {
        vec![crate::export::default_output(&recipe.image.name)]
    } else {
        opts.outputs.clone()
    };
    for out in &outputs {
        crate::export::export(&s.store, &image, &recipe.image.name, out)?;
        reporter.on_output_written(&out.to_string());
    }
    reporter.on_build_finish(&image.manifest, started.elapsed());
    Ok(BuildOutcome { image, steps: planned })
}

fn describe(step: &Step) -> String {
    match &step.kind {
        StepKind::Copy(c) => {
            format!("COPY {} -> {}{}", c.src, c.to, if c.to_is_dir && c.to != "/" { "/" } else { "" })
        }
        StepKind::Write(w) => format!("WRITE {}", w.path),
    }
}

/// The merged tree of the layers below a step.
fn lower_tree(store: &Store, layers: &[ImageLayer]) -> Result<FsTree, BuildError> {
    let mut t = FsTree::default();
    for l in layers {
        let listing = Listing::load(store, l)?;
        t.apply(&listing).map_err(|reason| BuildError::BadLayer { layer: l.digest, reason })?;
    }
    Ok(t)
}

/// Entries for the folders above `path` (relative): their metadata in the
/// image when they exist, else 0755 root.
fn parent_entries(
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
        let (mode, uid, gid) = match tree.get(&prefix) {
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
        });
    }
    Ok(out)
}

fn resolve(recipe: &Recipe, step: &Step, tree: &FsTree, abs: &str) -> Result<String, BuildError> {
    tree.resolve_parents(abs.trim_start_matches('/')).map_err(|m| {
        recipe
            .error_at(step.span.clone(), m)
            .with_hint("check the symlinks along the destination path")
            .into()
    })
}

fn copy_entries(
    recipe: &Recipe,
    step: &Step,
    c: &CopyStep,
    src: &CopySource,
    tree: &FsTree,
) -> Result<Vec<LayerEntry>, BuildError> {
    let root_is_dir = matches!(src.entries[0].kind, SourceKind::Dir);
    let to_rel = resolve(recipe, step, tree, &c.to)?;
    let into_dir = !root_is_dir
        && (c.to_is_dir || c.to == "/" || matches!(tree.get(&to_rel).map(|e| &e.kind), Some(Kind::Dir)));
    let dest = if into_dir {
        let name = src.name.as_deref().expect("a file source has a name");
        if to_rel.is_empty() {
            name.to_string()
        } else {
            format!("{to_rel}/{name}")
        }
    } else {
        to_rel
    };
    let mut entries = if dest.is_empty() { Vec::new() } else { parent_entries(recipe, step, tree, &dest)? };
    for e in &src.entries {
        let path = match (dest.is_empty(), e.rel.is_empty()) {
            (true, true) => continue, // the context root copied to `/`: `/` itself is not an entry
            (true, false) => e.rel.clone(),
            (false, true) => dest.clone(),
            (false, false) => format!("{dest}/{}", e.rel),
        };
        let (kind, content) = match &e.kind {
            SourceKind::Dir => (TarKind::Dir, Content::None),
            SourceKind::Symlink(t) => (TarKind::Symlink(t.clone()), Content::None),
            SourceKind::File { size, sha256 } => {
                (TarKind::File { size: *size }, Content::Path { path: e.abs.clone(), sha256: *sha256 })
            }
        };
        entries.push(LayerEntry { path, kind, mode: e.mode, uid: c.owner.uid, gid: c.owner.gid, content });
    }
    Ok(entries)
}

fn write_entries(
    recipe: &Recipe,
    step: &Step,
    w: &WriteStep,
    tree: &FsTree,
) -> Result<Vec<LayerEntry>, BuildError> {
    let path = resolve(recipe, step, tree, &w.path)?;
    if let Some(Kind::Dir) = tree.get(&path).map(|e| &e.kind) {
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
    });
    Ok(entries)
}
