//! What every target of one build shares: the recipe and options, the store
//! (held under a shared lock), the context and its stat index, the platform
//! and epoch, the engines, the step cache, and the first failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kiln_cache::{StatIndex, Store};
use kiln_recipes::diagnostic::line_col;
use kiln_recipes::recipe::Platform;
use kiln_recipes::{Base, Recipe, Step};

use crate::base::{load_base, BaseImage};
use crate::context::Context;
use crate::error::BuildError;
use crate::image;
use crate::packages::lockfile::{self, BasePin, Lockfile};
use crate::reporter::{Reporter, StepInfo};

use super::backends::Backends;
use super::cache::StepCache;
use super::keys::Planner;
use super::model::{describe, BuildOptions, Built, PlannedStep, Target};

pub(super) struct Session {
    pub(super) recipe: Recipe,
    pub(super) opts: BuildOptions,
    pub(super) store: Store,
    pub(super) ctx: Context,
    pub(super) platform: Platform,
    pub(super) epoch: u64,
    pub(super) index: Mutex<StatIndex>,
    /// Each target's kiln.lock section, read once (by stage; `None` for the image).
    locks: Mutex<HashMap<Option<String>, crate::packages::lockfile::PackageLock>>,
    pub(super) reporter: Arc<dyn Reporter>,
    pub(super) rt: tokio::runtime::Handle,
    pub(super) backends: Backends,
    /// The local store, then the `--cache-from` registries.
    pub(super) cache: StepCache,
    /// kiln.lock's pins of `registry:` bases.
    pins: Vec<BasePin>,
    /// The first error of any target.
    failure: Mutex<Option<BuildError>>,
    /// Every target's steps, as they finish.
    steps: Mutex<Vec<PlannedStep>>,
}

impl Session {
    pub(super) fn open(
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
        let index = Mutex::new(StatIndex::load(&store, &ctx.root));
        let pins = if crate::base::tagged_bases(recipe)?.is_empty() {
            Vec::new()
        } else {
            lockfile::load_pins(&Lockfile::path_for(&recipe.dir))?
        };
        let s = Session {
            cache: StepCache::open(&store, recipe, opts, reporter.clone(), rt.clone()),
            backends: Backends::new(opts.backend, opts.executor.clone(), rt.clone()),
            recipe: recipe.clone(),
            opts: opts.clone(),
            store,
            ctx,
            platform,
            epoch: opts.epoch_override.or(recipe.image.epoch).unwrap_or(0),
            index,
            locks: Mutex::default(),
            reporter,
            rt,
            pins,
            failure: Mutex::new(None),
            steps: Mutex::new(Vec::new()),
        };
        Ok((s, lock))
    }

    pub(super) fn info(&self, t: Target<'_>, step: &Step) -> StepInfo {
        StepInfo {
            index: step.index,
            total: t.steps().len(),
            description: describe(step),
            line: line_col(&self.recipe.source, step.span.start).0,
            stage: t.name().map(str::to_string),
        }
    }

    pub(super) fn planner(&self) -> Planner<'_> {
        Planner {
            recipe: &self.recipe,
            ctx: &self.ctx,
            index: &self.index,
            locks: &self.locks,
            platform: &self.platform,
            epoch: self.epoch,
        }
    }

    /// The base a target starts from.
    pub(super) fn base(
        &self,
        t: Target<'_>,
        done: &HashMap<String, Arc<Built>>,
    ) -> Result<BaseImage, BuildError> {
        let (base, span) = t.base();
        if let Base::Stage(n) = base {
            let b = &done[n];
            return Ok(BaseImage {
                id: b.id.clone(),
                config: b.config.clone(),
                docker_config: b.docker_config.clone(),
                layers: b.layers.clone(),
                source: None,
            });
        }
        let remotes = crate::base::Remotes {
            registry: &|| self.cache.registry(),
            pins: &self.pins,
            reporter: self.reporter.as_ref(),
        };
        let docker = || self.backends.docker();
        let b = load_base(&self.store, &self.recipe, base, span, &self.platform, &docker, &remotes)?;
        if let Some(src) = &b.source {
            self.cache.add_sources(src, &b.layers);
        }
        Ok(b)
    }

    /// The runtime config `run` steps see: the base's, plus the final
    /// image's `[config] env`. The `[config]` user and workdir say how the
    /// finished image runs (like USER and WORKDIR after the last RUN of a
    /// Dockerfile), so steps run as the base's user in the base's workdir
    /// unless the step sets `user` or `workdir`.
    pub(super) fn run_config(&self, t: Target<'_>, base: &BaseImage) -> oci_spec::image::Config {
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

    /// Keeps the first failure of any target.
    pub(super) fn fail(&self, e: BuildError) {
        let mut slot = self.failure.lock().expect("failure");
        if slot.is_none() {
            *slot = Some(e);
        }
    }

    pub(super) fn take_failure(&self) -> Option<BuildError> {
        self.failure.lock().expect("failure").take()
    }

    pub(super) fn record_steps(&self, steps: &[PlannedStep]) {
        self.steps.lock().expect("steps").extend(steps.iter().cloned());
    }

    pub(super) fn take_steps(&self) -> Vec<PlannedStep> {
        std::mem::take(&mut *self.steps.lock().expect("steps"))
    }

    pub(super) fn save_index(&self) -> Result<(), BuildError> {
        Ok(self.index.lock().expect("index").save(&self.store)?)
    }
}
