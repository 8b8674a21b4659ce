//! The build: plan each step's cache key, reuse the layers the store has,
//! make the ones it does not, assemble the config and manifest, export.
//!
//! A recipe is a set of targets: its `[[stage]]`s and the final image.
//!
//! - `model`: the options, targets and what they yield (a leaf: the other
//!   parts use it, it uses none of them).
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
mod model;
mod run;
mod schedule;
mod session;
mod steps;
mod target;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use kiln_cache::RecordKind;
use kiln_recipes::{ImageRef, Recipe};

use crate::error::BuildError;
use crate::exec;
use crate::image::{self, StoredImage};
use crate::reporter::Reporter;
use model::{needed_stages, Built, Target};
pub use model::{BuildOptions, BuildOutcome, PlannedStep};
use session::Session;

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
) -> Result<Vec<ImageRef>, BuildError> {
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
    Ok(outputs)
}

/// Builds the recipe into the store and writes every output.
pub fn build(
    recipe: &Recipe,
    opts: &BuildOptions,
    reporter: Arc<dyn Reporter>,
) -> Result<BuildOutcome, BuildError> {
    let started = Instant::now();
    // Outputs kiln would refuse once the image is built are refused now.
    for out in &opts.outputs {
        match out {
            ImageRef::Vm(path) => crate::vm::is_qcow2(path).map(|_| ())?,
            ImageRef::Docker(r) => exec::docker::check_ref(r)?,
            ImageRef::Registry(text) => crate::registry::remote(text).map(|_| ())?,
            other => crate::export::check_output(other)?,
        }
    }
    let rt = crate::runtime::runtime()?;
    let (s, _lock) = Session::open(recipe, opts, reporter.clone(), rt.handle().clone())?;
    let s = Arc::new(s);
    // So are credentials a registry output's registry refuses.
    for out in &opts.outputs {
        if let ImageRef::Registry(text) = out {
            s.cache.registry().check_push(&crate::registry::remote(text)?)?;
        }
    }
    let mount_ids = cache::mount_ids(recipe);
    if opts.cache_mounts && !opts.cache_from.is_empty() {
        s.cache.pull_mounts(&opts.cache_from, &mount_ids)?;
    }
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
    let extras = image::ImageExtras {
        annotations: recipe.image.annotations.clone(),
        docker_config: docker_config(&built.docker_config, &recipe.config),
    };
    let image = image::store_image(&s.store, config, built.layers.clone(), s.epoch, &extras)?;
    image.record(&s.store, RecordKind::Image, &image.manifest.hex(), &recipe.image.name)?;

    let outputs = write_outputs(&s, &image, recipe, opts, reporter.as_ref())?;
    let steps = s.take_steps();
    for to in &opts.cache_to {
        s.cache.push(to, &steps)?;
        if opts.cache_mounts {
            s.cache.push_mounts(to, &mount_ids)?;
        }
    }
    reporter.on_build_finish(&image.manifest, started.elapsed());
    Ok(BuildOutcome { image, steps, outputs })
}

/// The base's `Healthcheck` and `Shell` with the recipe's over them, as
/// Docker writes them (durations in nanoseconds; a `["NONE"]` test kept, so
/// the base's check stays off).
fn docker_config(base: &image::DockerConfig, c: &kiln_recipes::Config) -> image::DockerConfig {
    let mut out = base.clone();
    if let Some(h) = &c.healthcheck {
        let mut v = serde_json::Map::new();
        v.insert("Test".into(), serde_json::json!(h.test));
        for (key, d) in [
            ("Interval", h.interval),
            ("Timeout", h.timeout),
            ("StartPeriod", h.start_period),
            ("StartInterval", h.start_interval),
        ] {
            if let Some(d) = d {
                v.insert(key.into(), serde_json::json!(d.as_nanos() as u64));
            }
        }
        if let Some(r) = h.retries {
            v.insert("Retries".into(), serde_json::json!(r));
        }
        out.insert("Healthcheck".into(), serde_json::Value::Object(v));
    }
    if let Some(sh) = &c.shell {
        out.insert("Shell".into(), serde_json::json!(sh));
    }
    out
}
