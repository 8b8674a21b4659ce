//! What a build is made of, shared by its parts: the options, the targets
//! (the stages and the final image) and what each yields, and how steps
//! are described in progress lines and the image's history.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use oci_spec::image::ImageConfiguration;

use crate::registry::client::{RegistryOptions, Remote};
use kiln_cache::Digest;
use kiln_recipes::recipe::{Platform, Stage};
use kiln_recipes::{Base, CopyStep, ImageRef, Recipe, Step, StepKind};

use crate::exec::{BackendChoice, Executor};
use crate::image::{ImageLayer, StoredImage};
use crate::reporter::StepInfo;

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
    /// `--step-timeout`: the time limit of a `run` step that sets none.
    pub step_timeout: Option<std::time::Duration>,
    /// `--cache-from`: registries whose step indexes are tried, in order.
    pub cache_from: Vec<Remote>,
    /// `--cache-to`: where this build's steps and their layers are pushed.
    pub cache_to: Vec<Remote>,
    /// `--cache-mounts`: `run` steps' cache mounts go with the cache
    /// (pushed to `cache_to`, made from `cache_from` when missing).
    pub cache_mounts: bool,
    /// Plain-HTTP hosts and the upload mode for every registry the build uses.
    pub registry: RegistryOptions,
}

/// A step with its cache key, and whether the store has its layer.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    pub info: StepInfo,
    pub key: Digest,
    pub hit: bool,
    /// Once built: how long the step took, and its layer (digest, size).
    pub built: Option<(std::time::Duration, Digest, u64)>,
}

#[derive(Debug, Clone)]
pub struct BuildOutcome {
    pub image: StoredImage,
    pub steps: Vec<PlannedStep>,
    /// The outputs written (the default one when none was asked for).
    pub outputs: Vec<ImageRef>,
}

/// A target built (or, for `plan`, keyed): what the next targets build on.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    /// The key of its last step, or its base's id when it has no steps.
    pub(crate) id: String,
    pub(crate) layers: Vec<ImageLayer>,
    /// The base's config with the steps' history: what `stage:NAME` starts from.
    pub(crate) config: ImageConfiguration,
    /// The base's `Healthcheck` and `Shell` (see [`kiln_oci::image::DockerConfig`]).
    pub(crate) docker_config: kiln_oci::image::DockerConfig,
    pub(crate) steps: Vec<PlannedStep>,
}

/// One image of the recipe: a stage, or the final image (`stage: None`).
#[derive(Clone, Copy)]
pub(super) struct Target<'r> {
    pub(super) stage: Option<&'r Stage>,
    pub(super) recipe: &'r Recipe,
}

impl<'r> Target<'r> {
    pub(super) fn base(&self) -> (&'r Base, Option<kiln_recipes::Span>) {
        match self.stage {
            Some(s) => (&s.base, s.base_span.clone()),
            None => (&self.recipe.image.base, self.recipe.image.base_span.clone()),
        }
    }
    pub(super) fn steps(&self) -> &'r [Step] {
        match self.stage {
            Some(s) => &s.steps,
            None => &self.recipe.steps,
        }
    }
    pub(super) fn name(&self) -> Option<&'r str> {
        self.stage.map(|s| s.name.as_str())
    }
    /// The stages this target uses directly.
    pub(super) fn deps(&self) -> BTreeSet<&'r str> {
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
pub(super) fn needed_stages(recipe: &Recipe) -> Vec<&Stage> {
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
pub(super) fn history_text(step: &Step, info: &StepInfo) -> String {
    match &step.kind {
        StepKind::Run(r) => match &r.command {
            kiln_recipes::Command::Shell(s) => format!("RUN /bin/sh -c {s}"),
            exec => format!("RUN {}", exec.text()),
        },
        _ => info.description.clone(),
    }
}

pub(super) fn step_label(info: &StepInfo) -> String {
    match &info.stage {
        Some(s) => format!("{s} {}/{}", info.index + 1, info.total),
        None => format!("{}/{}", info.index + 1, info.total),
    }
}

pub(super) fn describe(step: &Step) -> String {
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
            format!("PACKAGES {} {names} (kiln.lock)", p.release())
        }
        StepKind::Configure(p) => format!("CONFIGURE the maintainer scripts of the {} packages", p.release()),
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
