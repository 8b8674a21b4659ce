//! The build: plan each step's cache key, reuse the layers the store has,
//! make the ones it does not, assemble the config and manifest, export.
//!
//! A recipe is a set of targets: its `[[stage]]`s and the final image.
//!
//! - `session`: what every target of one build shares (store, context,
//!   platform, engines, step cache); `backends`: the engines, on first use.
//! - `keys`: the planner: every step's key, no I/O but hashing the context.
//! - `cache`: the step cache's tiers (store, then `--cache-from`), `--cache-to`.
//! - `schedule`: targets as tasks that wait only for the stages they use.
//! - `target`: one target's steps in order: key, cache tier, or a new layer.
//! - `steps`: what `copy`, `write` and `[packages]` steps put in their layer.
//! - `run`: a `run` step on the executor, its secrets and its output masked.

mod backends;
mod cache;
mod keys;
mod run;
mod schedule;
mod session;
mod steps;
mod target;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use oci_spec::image::ImageConfiguration;

use kiln_cache::registry::{RegistryOptions, Remote};
use kiln_cache::{Digest, RecordKind};
use kiln_recipes::recipe::{Platform, Stage};
use kiln_recipes::{Base, CopyStep, ImageRef, Recipe, Step, StepKind};

use crate::error::BuildError;
use crate::exec::{self, BackendChoice, Executor};
use crate::image::{self, ImageLayer, StoredImage};
use crate::reporter::{Reporter, StepInfo};
use session::Session;

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
pub(crate) struct Built {
    /// The key of its last step, or its base's id when it has no steps.
    pub(crate) id: String,
    pub(crate) layers: Vec<ImageLayer>,
    /// The base's config with the steps' history: what `stage:NAME` starts from.
    pub(crate) config: ImageConfiguration,
    pub(crate) steps: Vec<PlannedStep>,
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
        let b = target::plan_target(&s, Target { stage: Some(stage), recipe }, &done)?;
        out.extend(b.steps.iter().cloned());
        done.insert(stage.name.clone(), Arc::new(b));
    }
    let b = target::plan_target(&s, Target { stage: None, recipe }, &done)?;
    out.extend(b.steps);
    s.save_index()?;
    Ok(out)
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
                s.backends.docker()?.load(&s.store, image, Some(&format!("{repo}:{tag}")))?;
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

    let final_built = rt.block_on(schedule::run_targets(s.clone(), stages));
    let Some(built) = final_built else {
        let e = s.take_failure();
        // A stage's task ended without a result or an error: kiln's own fault.
        return Err(e.unwrap_or_else(|| BuildError::Environment {
            message: "The build stopped without saying why (an internal error)".into(),
            hint: "run the command again; if it fails the same way, report it with KILN_LOG=debug output"
                .into(),
        }));
    };
    s.save_index()?;
    s.cache.materialize(&built.layers)?;

    let mut config = built.config.clone();
    config.set_config(Some(image::merge_config(built.config.config().as_ref(), &recipe.config)));
    config.set_architecture(s.platform.architecture.as_str().into());
    config.set_os(s.platform.os.as_str().into());
    config.set_variant(s.platform.variant.clone());
    let image = image::store_image(&s.store, config, built.layers.clone(), s.epoch, BTreeMap::new())?;
    image.record(&s.store, RecordKind::Image, &image.manifest.hex(), &recipe.image.name)?;

    write_outputs(&s, &image, recipe, opts, reporter.as_ref())?;
    let steps = s.take_steps();
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
