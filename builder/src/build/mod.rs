//! The build: plan each step's cache key, reuse the layers the store has,
//! make the ones it does not, assemble the config and manifest, export.
//!
//! A recipe is a set of targets: its `[[stage]]`s and the final image. The
//! stages the final image needs are built as tokio tasks that wait only for
//! the stages they use, so independent stages build at the same time; each
//! target's steps run in order on a blocking thread.
//!
//! - `keys`: the planner: every step's key, no I/O but hashing the context.
//! - `cache`: the step cache's tiers (store, then `--cache-from`), `--cache-to`.
//! - `steps`: what `copy` and `write` steps put in their layer.

mod cache;
mod keys;
mod steps;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use oci_spec::image::{History, ImageConfiguration};

use kiln_cache::registry::{RegistryOptions, Remote};
use kiln_cache::{Digest, StatIndex, Store};
use kiln_recipes::diagnostic::line_col;
use kiln_recipes::recipe::{Platform, Stage};
use kiln_recipes::{Base, CopyStep, ImageRef, Recipe, RunStep, Step, StepKind};

use crate::base::{load_base, BaseImage};
use crate::changes;
use crate::context::Context;
use crate::error::BuildError;
use crate::exec::docker::DockerEngine;
use crate::exec::{self, BackendChoice, Executor, RunRequest, RunResult};
use crate::fstree::FsTree;
use crate::image::{self, history, ImageLayer, StoredImage};
use crate::layer::{self, LayerEntry};
use crate::listing::ListingFile;
use crate::reporter::{Reporter, StepInfo};
use crate::tarball::TarKind;
use cache::{Cached, StepCache};
pub use keys::KEY_SCHEMA;
use keys::{Planner, Prepared, RunPlan};
use steps::{copy_entries, place_entries, write_entries, Source};

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
    /// Which backend runs `run` steps.
    pub backend: BackendChoice,
    /// An executor to use instead of the one `backend` names (tests).
    pub executor: Option<Arc<dyn Executor>>,
    /// Secret values by id (from `--secret`); never in a key, a layer or a log.
    pub secrets: Vec<(String, Vec<u8>)>,
    /// `--cache-from`: registries whose step indexes are tried, in order.
    pub cache_from: Vec<Remote>,
    /// `--cache-to`: where this build's steps and their layers are pushed.
    pub cache_to: Vec<Remote>,
    /// Plain-HTTP hosts and the upload mode for every registry the build uses.
    pub registry: RegistryOptions,
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

/// A target built (or, for `plan`, keyed): what the next targets build on.
#[derive(Debug, Clone)]
pub struct Built {
    /// The key of its last step, or its base's id when it has no steps.
    pub id: String,
    pub layers: Vec<ImageLayer>,
    /// The base's config with the steps' history: what `stage:NAME` starts from.
    pub config: ImageConfiguration,
    pub steps: Vec<PlannedStep>,
}

/// A step whose layer must be made, and what it is made on.
struct Miss<'a> {
    t: Target<'a>,
    step: &'a Step,
    info: &'a StepInfo,
    key: Digest,
    /// The parent image: its layers and merged tree.
    layers: &'a [ImageLayer],
    tree: &'a FsTree,
    base: &'a BaseImage,
    run_config: &'a oci_spec::image::Config,
}

/// One image of the recipe: a stage, or the final image (`stage: None`).
#[derive(Clone, Copy)]
struct Target<'r> {
    stage: Option<&'r Stage>,
    recipe: &'r Recipe,
}

impl<'r> Target<'r> {
    fn base(&self) -> (&'r Base, Option<kiln_recipes::Span>) {
        match self.stage {
            Some(s) => (&s.base, s.base_span.clone()),
            None => (&self.recipe.image.base, self.recipe.image.base_span.clone()),
        }
    }
    fn steps(&self) -> &'r [Step] {
        match self.stage {
            Some(s) => &s.steps,
            None => &self.recipe.steps,
        }
    }
    fn name(&self) -> Option<&'r str> {
        self.stage.map(|s| s.name.as_str())
    }
    /// The stages this target uses directly.
    fn deps(&self) -> BTreeSet<&'r str> {
        let mut d = BTreeSet::new();
        if let (Base::Stage(n), _) = self.base() {
            d.insert(n.as_str());
        }
        for s in self.steps() {
            if let StepKind::Copy(CopyStep { from: Some(n), .. }) = &s.kind {
                d.insert(n.as_str());
            }
        }
        d
    }
}

/// The stages the final image needs, in recipe order.
fn needed_stages(recipe: &Recipe) -> Vec<&Stage> {
    let by_name: HashMap<&str, &Stage> = recipe.stages.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut need: BTreeSet<&str> = BTreeSet::new();
    let mut todo: Vec<&str> = Target { stage: None, recipe }.deps().into_iter().collect();
    while let Some(n) = todo.pop() {
        if need.insert(n) {
            todo.extend(Target { stage: Some(by_name[n]), recipe }.deps());
        }
    }
    recipe.stages.iter().filter(|s| need.contains(s.name.as_str())).collect()
}

/// State shared by every target of one build.
struct Session {
    recipe: Recipe,
    opts: BuildOptions,
    store: Store,
    ctx: Context,
    platform: Platform,
    epoch: u64,
    index: Mutex<StatIndex>,
    reporter: Arc<dyn Reporter>,
    rt: tokio::runtime::Handle,
    /// Connected on first use.
    docker: OnceLock<Result<Arc<DockerEngine>, (String, String)>>,
    /// Where `run` steps execute: given in the options, or chosen on first use.
    executor: OnceLock<Result<Arc<dyn Executor>, (String, String)>>,
    /// The first error of any target.
    failure: Mutex<Option<BuildError>>,
    /// Every target's steps, as they finish.
    steps: Mutex<Vec<PlannedStep>>,
    /// kiln.lock's pins of `registry:` bases.
    pins: Vec<crate::packages::lockfile::BasePin>,
    /// The local store, then the `--cache-from` registries.
    cache: StepCache,
}

impl Session {
    fn open(
        recipe: &Recipe,
        opts: &BuildOptions,
        reporter: Arc<dyn Reporter>,
        rt: tokio::runtime::Handle,
    ) -> Result<(Session, kiln_cache::StoreLock), BuildError> {
        let store = Store::open(&opts.cache_dir)?;
        let lock = store.lock_shared()?;
        let ctx = Context::open(opts.context.as_deref().unwrap_or(&recipe.dir))?;
        let platform =
            opts.platform.clone().or_else(|| recipe.image.platform.clone()).unwrap_or_else(Platform::host);
        let epoch = opts.epoch_override.or(recipe.image.epoch).unwrap_or(0);
        let index = Mutex::new(StatIndex::load(&store, &ctx.root));
        let pins = if crate::base::tagged_bases(recipe)?.is_empty() {
            Vec::new()
        } else {
            crate::packages::lockfile::load_pins(&crate::packages::lockfile::Lockfile::path_for(&recipe.dir))?
        };
        let cache = StepCache::open(&store, recipe, opts, reporter.clone(), rt.clone());
        let s = Session {
            recipe: recipe.clone(),
            opts: opts.clone(),
            store,
            ctx,
            platform,
            epoch,
            index,
            reporter,
            rt,
            docker: OnceLock::new(),
            executor: match &opts.executor {
                Some(e) => OnceLock::from(Ok(e.clone())),
                None => OnceLock::new(),
            },
            failure: Mutex::new(None),
            steps: Mutex::new(Vec::new()),
            pins,
            cache,
        };
        Ok((s, lock))
    }

    fn info(&self, t: Target<'_>, step: &Step) -> StepInfo {
        StepInfo {
            index: step.index,
            total: t.steps().len(),
            description: describe(step),
            line: line_col(&self.recipe.source, step.span.start).0,
            stage: t.name().map(str::to_string),
        }
    }

    fn planner(&self) -> Planner<'_> {
        Planner {
            recipe: &self.recipe,
            ctx: &self.ctx,
            index: &self.index,
            platform: &self.platform,
            epoch: self.epoch,
        }
    }

    fn docker(&self) -> Result<Arc<DockerEngine>, BuildError> {
        self.docker
            .get_or_init(|| {
                DockerEngine::connect(self.rt.clone()).map(Arc::new).map_err(|e| match e {
                    BuildError::Environment { message, hint } => (message, hint),
                    e => (e.to_string(), String::new()),
                })
            })
            .clone()
            .map_err(|(message, hint)| BuildError::Environment { message, hint })
    }

    /// The executor for `run` steps: as asked, or for `auto` local where it works, else Docker.
    fn executor(&self) -> Result<Arc<dyn Executor>, BuildError> {
        self.executor
            .get_or_init(|| {
                exec::choose(self.opts.backend, &|| self.docker()).map_err(|e| match e {
                    BuildError::Environment { message, hint } => (message, hint),
                    e => (e.to_string(), String::new()),
                })
            })
            .clone()
            .map_err(|(message, hint)| BuildError::Environment { message, hint })
    }

    /// The base a target starts from.
    fn base(&self, t: Target<'_>, done: &HashMap<String, Arc<Built>>) -> Result<BaseImage, BuildError> {
        match t.base() {
            (Base::Stage(n), _) => {
                let b = &done[n];
                Ok(BaseImage {
                    id: b.id.clone(),
                    config: b.config.clone(),
                    layers: b.layers.clone(),
                    source: None,
                })
            }
            (base, span) => {
                let remotes = crate::base::Remotes {
                    registry: &|| self.cache.registry(),
                    pins: &self.pins,
                    reporter: self.reporter.as_ref(),
                };
                let b = load_base(
                    &self.store,
                    &self.recipe,
                    base,
                    span,
                    &self.platform,
                    &|| self.docker(),
                    &remotes,
                )?;
                if let Some(src) = &b.source {
                    self.cache.add_sources(src, &b.layers);
                }
                Ok(b)
            }
        }
    }

    /// The runtime config `run` steps see: the base's, plus the final
    /// image's `[config] env`. The `[config]` user and workdir say how the
    /// finished image runs (like USER and WORKDIR after the last RUN of a
    /// Dockerfile), so steps run as the base's user in the base's workdir
    /// unless the step sets `user` or `workdir`.
    fn run_config(&self, t: Target<'_>, base: &BaseImage) -> oci_spec::image::Config {
        let base_config = base.config.config().as_ref();
        match t.stage {
            None => {
                let env_only =
                    kiln_recipes::Config { env: self.recipe.config.env.clone(), ..Default::default() };
                image::merge_config(base_config, &env_only)
            }
            Some(_) => image::merge_config(base_config, &Default::default()),
        }
    }

    fn fail(&self, e: BuildError) {
        let mut slot = self.failure.lock().expect("failure");
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    /// Keys only: what `plan` shows.
    fn plan_target(&self, t: Target<'_>, done: &HashMap<String, Arc<Built>>) -> Result<Built, BuildError> {
        let base = self.base(t, done)?;
        let run_config = self.run_config(t, &base);
        let mut parent = base.id.clone();
        let mut steps = Vec::new();
        for step in t.steps() {
            let (key, _) = self.planner().key(&parent, step, &run_config, done)?;
            let hit = !self.opts.no_cache
                && matches!(self.cache.lookup(&key)?, Cached::Hit(_) | Cached::Remote(..));
            steps.push(PlannedStep { info: self.info(t, step), key, hit });
            parent = key.to_string();
        }
        Ok(Built { id: parent, layers: Vec::new(), config: base.config, steps })
    }

    /// Makes a step's layer on a miss: its entries, written (and unpacked
    /// for the executor when a `run` step that misses comes next), recorded.
    fn make_layer(
        &self,
        m: &Miss<'_>,
        prepared: Prepared,
        done: &HashMap<String, Arc<Built>>,
    ) -> Result<(ImageLayer, ListingFile), BuildError> {
        let (recipe, step, tree) = (&self.recipe, m.step, m.tree);
        let mut keep: Option<Box<dyn std::any::Any + Send>> = None;
        let entries = match (&step.kind, prepared) {
            (StepKind::Copy(c), Prepared::Copy(src)) => copy_entries(recipe, step, c, &src, tree)?,
            (StepKind::Copy(c), Prepared::CopyFrom(built)) => {
                let (entries, tmp) = self.copy_from_entries(step, c, &built, tree)?;
                keep = Some(Box::new(tmp));
                entries
            }
            (StepKind::Write(w), Prepared::Write) => write_entries(recipe, step, w, tree)?,
            (StepKind::Packages(p), Prepared::Packages(lock)) => {
                let (entries, scratch) = self.package_entries(p, &lock, m.layers, tree)?;
                keep = Some(Box::new(scratch));
                entries
            }
            (StepKind::Run(run), Prepared::Run(plan)) => {
                let (changes, k) = self.run(step, m.info, run, plan, m.layers, tree, &m.base.config)?;
                keep = Some(k);
                changes::to_layer_entries(changes)
            }
            _ => unreachable!("prepared matches the step kind"),
        };
        let timer = Instant::now();
        let staging = match self.unpack_next(t_steps(m.t, step), &m.key, m.run_config, done) {
            true => Some(
                tempfile::Builder::new()
                    .prefix("unpack-")
                    .tempdir_in(self.store.tmp_dir())
                    .map_err(BuildError::io_write(self.store.tmp_dir()))?,
            ),
            false => None,
        };
        let folder = staging.as_ref().map(|d| d.path().join("root"));
        let (blob, listing) =
            layer::write_layer_unpacking(&self.store, entries, self.epoch, folder.as_deref())?;
        // Only when it was unpacked, which `unpack_next` decided by asking
        // the executor (never for a step no `run` follows).
        if let Some(f) = &folder {
            if let Some(dir) = self.executor().ok().and_then(|e| e.unpack_dir(&self.store)) {
                let dest = dir.join(blob.diff_id.hex());
                std::fs::create_dir_all(&dir).map_err(BuildError::io_write(&dir))?;
                crate::unpack::adopt(f, &dest)?;
                crate::unpack::seal(&self.store, &dest, &listing)?;
            }
        }
        tracing::debug!(elapsed = ?timer.elapsed(), size = blob.size, unpacked = folder.is_some(), "layer written");
        drop(keep);
        self.reporter.on_layer_written(m.info, &blob);
        let layer = ImageLayer {
            diff_id: blob.diff_id,
            digest: blob.digest,
            size: blob.size,
            media_type: layer::MEDIA_TYPE.to_string(),
        };
        self.store.put_step(&m.key, &layer.step_record())?;
        Ok((layer, listing))
    }

    /// Builds one target's steps into the store.
    fn build_target(&self, t: Target<'_>, done: &HashMap<String, Arc<Built>>) -> Result<Built, BuildError> {
        let base = self.base(t, done)?;
        let run_config = self.run_config(t, &base);
        let mut layers: Vec<ImageLayer> = base.layers.clone();
        let mut history_entries: Vec<History> = base.config.history().clone().unwrap_or_default();
        let mut lower: Option<FsTree> = None; // built on the first miss
        let mut parent = base.id.clone();
        let mut planned = Vec::new();
        let r = &self.reporter;

        for step in t.steps() {
            let started = Instant::now();
            let info = self.info(t, step);
            r.on_step_start(&info);
            let (key, prepared) = self.planner().key(&parent, step, &run_config, done)?;
            let cached = if self.opts.no_cache { Cached::Miss } else { self.cache.lookup(&key)? };
            let hit = matches!(cached, Cached::Hit(_) | Cached::Remote(..));
            let (layer, written) = match cached {
                Cached::Hit(layer) => {
                    self.store.touch_record("steps", &key.hex());
                    r.on_cache_hit(&info, &key);
                    (layer, None)
                }
                Cached::Remote(layer, from) => {
                    self.cache.remote_hit(&layer, from, key);
                    if lower.is_some() {
                        self.cache.materialize(std::slice::from_ref(&layer))?;
                    }
                    r.on_cache_hit(&info, &key);
                    (layer, None)
                }
                Cached::Miss | Cached::Corrupt => {
                    if matches!(cached, Cached::Corrupt) {
                        r.on_notice(&format!(
                            "{}: the cached layer was missing or corrupt; rebuilding it",
                            step_label(&info)
                        ));
                    }
                    if lower.is_none() {
                        self.cache.materialize(&layers)?;
                        lower = Some(FsTree::of_layers(&self.store, &layers)?);
                    }
                    let tree = lower.as_ref().expect("just built");
                    let miss = Miss {
                        t,
                        step,
                        info: &info,
                        key,
                        layers: &layers,
                        tree,
                        base: &base,
                        run_config: &run_config,
                    };
                    let (layer, listing) = self.make_layer(&miss, prepared, done)?;
                    (layer, Some(listing))
                }
            };
            if let Some(tree) = lower.as_mut() {
                match written {
                    Some(l) => tree.push_file(layer.digest, l)?,
                    None => tree.push_layer(&self.store, &layer)?,
                }
            }
            layers.push(layer);
            history_entries.push(history(self.epoch, &format!("kiln: {}", history_text(step, &info)), false));
            r.on_step_finish(&info, hit, started.elapsed());
            planned.push(PlannedStep { info, key, hit });
            parent = key.to_string();
        }
        let mut config = base.config.clone();
        config.set_history(Some(history_entries));
        self.steps.lock().expect("steps").extend(planned.iter().cloned());
        Ok(Built { id: parent, layers, config, steps: planned })
    }

    /// The packages' layer: the locked `.deb`s (downloaded if the store
    /// lacks them), unpacked into a scratch folder that must outlive the
    /// layer's writing.
    fn package_entries(
        &self,
        p: &kiln_recipes::Packages,
        lock: &crate::packages::lockfile::Lockfile,
        layers: &[ImageLayer],
        tree: &FsTree,
    ) -> Result<(Vec<LayerEntry>, tempfile::TempDir), BuildError> {
        let mirror = crate::packages::mirror_url(p, Some(&lock.source.mirror))?;
        crate::packages::fetch(&self.store, &self.rt, lock, &mirror, &|m| self.reporter.on_notice(m))?;
        let scratch = tempfile::Builder::new()
            .prefix("packages-")
            .tempdir_in(self.store.tmp_dir())
            .map_err(BuildError::io_write(self.store.tmp_dir()))?;
        let base_status = crate::extract::read_file(&self.store, layers, tree, "var/lib/dpkg/status")?;
        let below = crate::packages::install::Below {
            status: base_status.map(|b| String::from_utf8_lossy(&b).into_owned()),
            exists: &|path| Ok(tree.get(path)?.is_some()),
            is_dir: &|path| Ok(matches!(tree.kind(path)?, Some(crate::listing::Kind::Dir))),
        };
        let entries = crate::packages::layer_entries(&self.store, lock, self.epoch, scratch.path(), &below)?;
        Ok((entries, scratch))
    }

    /// Whether the layer being written should also be unpacked now: the
    /// next step is a `run` that will miss, on the local backend.
    fn unpack_next(
        &self,
        rest: &[Step],
        key: &Digest,
        run_config: &oci_spec::image::Config,
        done: &HashMap<String, Arc<Built>>,
    ) -> bool {
        let Some(next @ Step { kind: StepKind::Run(_), .. }) = rest.first() else { return false };
        if self.executor().ok().and_then(|e| e.unpack_dir(&self.store)).is_none() {
            return false;
        }
        match self.planner().key(&key.to_string(), next, run_config, done) {
            Ok((k, _)) => {
                self.opts.no_cache
                    || !matches!(self.cache.lookup(&k), Ok(Cached::Hit(_) | Cached::Remote(..)))
            }
            Err(_) => false,
        }
    }

    /// Runs a `run` step's command on the chosen backend.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        step: &Step,
        info: &StepInfo,
        run: &RunStep,
        plan: RunPlan,
        layers: &[ImageLayer],
        tree: &FsTree,
        config: &ImageConfiguration,
    ) -> Result<(Vec<changes::Change>, Box<dyn std::any::Any + Send>), BuildError> {
        let mut secrets = Vec::new();
        for id in &run.secrets {
            let Some((_, v)) = self.opts.secrets.iter().find(|(i, _)| i == id) else {
                return Err(self
                    .recipe
                    .error_at(
                        step.span.clone(),
                        format!("this step needs the secret `{id}`, which was not given"),
                    )
                    .with_hint(format!(
                        "pass it with `--secret id={id},src=FILE` or `--secret id={id},env=VARIABLE`"
                    ))
                    .into());
            };
            secrets.push((id.clone(), v.clone()));
        }
        exec::check_platform(&self.platform)?;
        let req = RunRequest {
            argv: plan.argv.clone(),
            env: plan.env,
            user: plan.user,
            workdir: plan.workdir,
            network: run.network,
            secrets: &secrets,
            layers,
            tree,
            config,
        };
        let values: Vec<&[u8]> =
            secrets.iter().map(|(_, v)| v.as_slice()).filter(|v| !v.is_empty()).collect();
        let mut on_line =
            |line: &str| self.reporter.on_step_output(info, &exec::cut_line(redact(line, &values)));
        let result = self.executor()?.run(&self.store, &req, &mut on_line)?;
        match result {
            RunResult::Changed { changes, keep } => Ok((changes, keep)),
            RunResult::Failed { code, tail } => Err(BuildError::CommandFailed {
                location: format!("{}:{}", self.recipe.file.display(), info.line),
                step: step_label(info),
                command: run.command.text(),
                code,
                tail: tail.iter().map(|l| exec::cut_line(redact(l, &values))).collect(),
            }),
        }
    }

    fn copy_from_entries(
        &self,
        step: &Step,
        c: &CopyStep,
        built: &Built,
        tree: &FsTree,
    ) -> Result<(Vec<LayerEntry>, tempfile::TempDir), BuildError> {
        let stage = c.from.as_deref().expect("copy from a stage");
        self.cache.materialize(&built.layers)?;
        let (entries, tmp) =
            crate::extract::stage_source(&self.store, &built.layers, &c.src).map_err(|m| {
                BuildError::from(
                    self.recipe
                        .error_at(
                            c.src_span.clone(),
                            format!("cannot copy `{}` out of stage `{stage}`: {m}", c.src),
                        )
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
        let out = place_entries(&self.recipe, step, c, root_is_dir, name, sources, tree)?;
        Ok((out, tmp))
    }
}

/// What the image's history says of a step: the command in full for `run`
/// (progress lines show it shortened to one line).
fn history_text(step: &Step, info: &StepInfo) -> String {
    match &step.kind {
        StepKind::Run(r) => match &r.command {
            kiln_recipes::Command::Shell(s) => format!("RUN /bin/sh -c {s}"),
            exec => format!("RUN {}", exec.text()),
        },
        _ => info.description.clone(),
    }
}

/// The steps of `t` after `step`.
fn t_steps<'a>(t: Target<'a>, step: &Step) -> &'a [Step] {
    &t.steps()[step.index + 1..]
}

/// Replaces secret values in a line of output. A line never holds more
/// than one line of a secret, so each line of a multi-line secret (a key, a
/// config file) is masked on its own; lines of fewer than 4 characters are
/// masked only when they are the whole secret (masking every `}` or `--`
/// of the output would hide it without protecting anything).
fn redact(line: &str, secrets: &[&[u8]]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for s in secrets {
        // Output is shown as lossy UTF-8: a secret that is not UTF-8 is
        // matched in the same form.
        let s = String::from_utf8_lossy(s);
        let whole = s.trim_end_matches(['\n', '\r']);
        if !whole.is_empty() && !whole.contains('\n') {
            parts.push(whole.to_string());
            continue;
        }
        parts.extend(whole.lines().map(|l| l.trim()).filter(|l| l.chars().count() >= 4).map(String::from));
    }
    // Longest first, so a part never leaves pieces of a longer one.
    parts.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut out = line.to_string();
    for p in parts {
        out = out.replace(&p, "[secret]");
    }
    out
}

fn step_label(info: &StepInfo) -> String {
    match &info.stage {
        Some(s) => format!("{s} {}/{}", info.index + 1, info.total),
        None => format!("{}/{}", info.index + 1, info.total),
    }
}

/// Computes every step's key and whether it is cached; builds nothing.
pub fn plan(recipe: &Recipe, opts: &BuildOptions) -> Result<Vec<PlannedStep>, BuildError> {
    let rt = crate::runtime::runtime()?;
    let (s, _lock) = Session::open(recipe, opts, Arc::new(crate::NullReporter), rt.handle().clone())?;
    let mut done: HashMap<String, Arc<Built>> = HashMap::new();
    let mut out = Vec::new();
    for stage in needed_stages(recipe) {
        let b = s.plan_target(Target { stage: Some(stage), recipe }, &done)?;
        out.extend(b.steps.iter().cloned());
        done.insert(stage.name.clone(), Arc::new(b));
    }
    let b = s.plan_target(Target { stage: None, recipe }, &done)?;
    out.extend(b.steps);
    s.index.lock().expect("index").save(&s.store)?;
    Ok(out)
}

type Slot = tokio::sync::watch::Receiver<Option<Option<Arc<Built>>>>;

/// The scheduler: every needed stage and the final image as a tokio task
/// that waits only for the stages it uses; each target's steps run on a
/// blocking thread. The final image's result, or `None` when a target failed.
async fn run_targets(s: Arc<Session>, stages: Vec<&Stage>) -> Option<Arc<Built>> {
    let recipe: &Recipe = &s.recipe;
    let mut slots: HashMap<String, Slot> = HashMap::new();
    let mut tasks = Vec::new();
    let spawn = |stage: Option<String>, deps: Vec<(String, Slot)>| {
        let s = s.clone();
        let (tx, rx) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            let mut done = HashMap::new();
            for (name, mut slot) in deps {
                let got = slot.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone().flatten());
                match got {
                    Some(b) => {
                        done.insert(name, b);
                    }
                    None => {
                        let _ = tx.send(Some(None)); // a stage it needs failed
                        return;
                    }
                }
            }
            let s2 = s.clone();
            let res = tokio::task::spawn_blocking(move || {
                let recipe = &s2.recipe;
                let t = Target {
                    stage: stage
                        .as_deref()
                        .map(|n| recipe.stages.iter().find(|x| x.name == n).expect("stage")),
                    recipe,
                };
                s2.build_target(t, &done)
            })
            .await;
            let built = match res {
                Ok(Ok(b)) => Some(Arc::new(b)),
                Ok(Err(e)) => {
                    s.fail(e);
                    None
                }
                Err(panic) => std::panic::resume_unwind(panic.into_panic()),
            };
            let _ = tx.send(Some(built));
        });
        (rx, task)
    };
    for st in &stages {
        let deps = Target { stage: Some(st), recipe }
            .deps()
            .into_iter()
            .map(|n| (n.to_string(), slots[n].clone()))
            .collect();
        let (rx, task) = spawn(Some(st.name.clone()), deps);
        slots.insert(st.name.clone(), rx);
        tasks.push(task);
    }
    let deps = Target { stage: None, recipe }
        .deps()
        .into_iter()
        .map(|n| (n.to_string(), slots[n].clone()))
        .collect();
    let (mut rx, task) = spawn(None, deps);
    tasks.push(task);
    let result = rx.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone().flatten());
    for t in tasks {
        let _ = t.await; // stages nothing waits for still finish (their layers are cached)
    }
    result
}

/// Writes the built image to every output (the default one when none is named).
fn write_outputs(
    s: &Session,
    image: &StoredImage,
    recipe: &Recipe,
    opts: &BuildOptions,
    reporter: &dyn Reporter,
) -> Result<(), BuildError> {
    let outputs = if opts.outputs.is_empty() {
        vec![crate::export::default_output(&recipe.image.name)]
    } else {
        opts.outputs.clone()
    };
    for out in &outputs {
        match out {
            ImageRef::Docker(r) => {
                let (repo, tag) = exec::docker::split_ref(r);
                s.docker()?.load(&s.store, image, Some(&format!("{repo}:{tag}")))?;
            }
            ImageRef::Vm(path) => crate::vm::write_disk(&s.store, image, recipe, s.epoch, path, reporter)?,
            ImageRef::Registry(text) => {
                let to = crate::registry::remote(text)?;
                let sources = s.cache.sources();
                crate::registry::push(&s.store, s.cache.registry(), image, &to, &sources, reporter)?;
            }
            _ => crate::export::export(&s.store, image, &recipe.image.name, out)?,
        }
        reporter.on_output_written(&out.to_string());
    }
    Ok(())
}

/// Builds the recipe into the store and writes every output.
pub fn build(
    recipe: &Recipe,
    opts: &BuildOptions,
    reporter: Arc<dyn Reporter>,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
    let rt = crate::runtime::runtime()?;
    let (s, _lock) = Session::open(recipe, opts, reporter.clone(), rt.handle().clone())?;
    let s = Arc::new(s);
    let stages = needed_stages(recipe);
    let total: usize = recipe.steps.len() + stages.iter().map(|st| st.steps.len()).sum::<usize>();
    reporter.on_build_start(&recipe.image.name, total);

    let final_built = rt.block_on(run_targets(s.clone(), stages));
    let Some(built) = final_built else {
        let e = s.failure.lock().expect("failure").take();
        // A stage's task ended without a result or an error: kiln's own fault.
        return Err(e.unwrap_or_else(|| BuildError::Environment {
            message: "The build stopped without saying why (an internal error)".into(),
            hint: "run the command again; if it fails the same way, report it with KILN_LOG=debug output"
                .into(),
        }));
    };
    s.index.lock().expect("index").save(&s.store)?;
    s.cache.materialize(&built.layers)?;

    let mut config = built.config.clone();
    config.set_config(Some(image::merge_config(built.config.config().as_ref(), &recipe.config)));
    config.set_architecture(s.platform.architecture.as_str().into());
    config.set_os(s.platform.os.as_str().into());
    config.set_variant(s.platform.variant.clone());
    let image = image::store_image(&s.store, config, built.layers.clone(), s.epoch, BTreeMap::new())?;
    image.record(&s.store, "images", &image.manifest.hex(), &recipe.image.name)?;

    write_outputs(&s, &image, recipe, opts, reporter.as_ref())?;
    let steps = std::mem::take(&mut *s.steps.lock().expect("steps"));
    for to in &opts.cache_to {
        s.cache.push(to, &steps)?;
    }
    reporter.on_build_finish(&image.manifest, started.elapsed());
    Ok(BuildOutcome { image, steps })
}

fn describe(step: &Step) -> String {
    match &step.kind {
        StepKind::Copy(c) => {
            let slash = if c.to_is_dir && c.to != "/" { "/" } else { "" };
            match &c.from {
                None => format!("COPY {} -> {}{slash}", c.src, c.to),
                Some(f) => format!("COPY --from={f} {} -> {}{slash}", c.src, c.to),
            }
        }
        StepKind::Write(w) => format!("WRITE {}", w.path),
        StepKind::Packages(p) => {
            let mut names = p.include.join(" ");
            if names.len() > 80 {
                names = format!("{}...", names.chars().take(80).collect::<String>());
            }
            format!("PACKAGES {} {names} (kiln.lock)", p.suite)
        }
        StepKind::Run(r) => {
            let cmd = r.command.text();
            let one_line: String =
                cmd.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
            let mut short: String = one_line.chars().take(100).collect();
            if short.len() < one_line.len() {
                short.push_str("...");
            }
            format!("RUN {short}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn every_line_of_a_multi_line_secret_is_masked() {
        let key = b"-----BEGIN KEY-----\nc2VjcmV0LWxpbmUtb25l\nc2Vjb25kLWxpbmU=\n-----END KEY-----\n";
        let secrets: Vec<&[u8]> = vec![key.as_slice(), b"hunter2\n", b"ab", b"S3cr\xe9tValue-42"];
        for line in ["c2VjcmV0LWxpbmUtb25l", "  x c2Vjb25kLWxpbmU= y", "pw=hunter2", "ab"] {
            let out = redact(line, &secrets);
            assert!(out.contains("[secret]"), "{line} -> {out}");
            for part in ["c2Vj", "hunter2"] {
                assert!(!out.contains(part), "{line} -> {out}");
            }
        }
        assert_eq!(redact("nothing here", &secrets), "nothing here");
        // A secret that is not UTF-8 is masked in the lossy form output takes.
        let lossy = String::from_utf8_lossy(b"x S3cr\xe9tValue-42 y").into_owned();
        assert_eq!(redact(&lossy, &secrets), "x [secret] y");
    }
}
