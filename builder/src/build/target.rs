//! One target's steps in order: each step's key, then the first tier of the
//! step cache that has its layer, or the layer made on a miss (its entries,
//! written, and unpacked for the executor when a missing `run` comes next).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use oci_spec::image::History;

use kiln_cache::{Digest, RecordKind};
use kiln_recipes::{Step, StepKind};

use crate::base::BaseImage;
use crate::changes;
use crate::error::BuildError;
use crate::exec::Executor;
use crate::fstree::FsTree;
use crate::image::{history, ImageLayer};
use crate::layer;
use crate::listing::ListingFile;
use crate::reporter::StepInfo;

use super::cache::Cached;
use super::keys::Prepared;
use super::model::{history_text, step_label, Built, PlannedStep, Target};
use super::run::{configure_step, run_step, Parent, RunEnv};
use super::session::Session;
use super::steps::{copy_entries, copy_from_entries, package_entries, write_entries};

type Done = HashMap<String, Arc<Built>>;

/// Keys only: what `plan` shows.
pub(super) fn plan_target(s: &Session, t: Target<'_>, done: &Done) -> Result<Built, BuildError> {
    let base = s.base(t, done)?;
    let run_config = s.run_config(t, &base);
    let mut parent = base.id.clone();
    let mut steps = Vec::new();
    for step in t.steps() {
        let (key, _) = s.planner().key(&parent, step, &run_config, done)?;
        let hit = !s.opts.no_cache && matches!(s.cache.lookup(&key)?, Cached::Hit(_) | Cached::Remote(..));
        steps.push(PlannedStep { info: s.info(t, step), key, hit, built: None });
        parent = key.to_string();
    }
    Ok(Built {
        id: parent,
        layers: Vec::new(),
        config: base.config,
        docker_config: base.docker_config,
        steps,
    })
}

/// Builds one target's steps into the store.
pub(super) fn build_target(s: &Session, t: Target<'_>, done: &Done) -> Result<Built, BuildError> {
    let base = s.base(t, done)?;
    let mut b = TargetBuild {
        s,
        t,
        done,
        run_config: s.run_config(t, &base),
        layers: base.layers.clone(),
        lower: None,
        packages_status: None,
        compressing: None,
        base,
    };
    let mut history_entries: Vec<History> = b.base.config.history().clone().unwrap_or_default();
    let mut parent = b.base.id.clone();
    let mut planned = Vec::new();
    let mut took = Vec::new();
    for step in t.steps() {
        let started = Instant::now();
        let info = s.info(t, step);
        // KILN_LOG=debug: each event of the step names it.
        let _span =
            tracing::debug_span!("step", step = %format!("{} {}", step_label(&info), info.description))
                .entered();
        s.reporter.on_step_start(&info);
        // The layer the step before left compressing is finished once this
        // step is done, whether it succeeded or not; first, when the step
        // reads files of the layers below (its user's ids in /etc/passwd,
        // for its secrets' and new cache mounts' owner).
        let mut before = b.compressing.take();
        let mut early = Ok(());
        if reads_accounts(step) {
            early = b.finish_compressing(before.take());
        }
        let stepped = early.and_then(|()| b.step(step, &info, &parent));
        let finished = b.finish_compressing(before);
        let (key, hit) = match (stepped, finished) {
            (Ok(v), Ok(())) => v,
            (Err(e), _) | (_, Err(e)) => {
                s.reporter.on_step_failed(&info, started.elapsed());
                return Err(e);
            }
        };
        history_entries.push(history(s.epoch, &format!("kiln: {}", history_text(step, &info)), false));
        s.reporter.on_step_finish(&info, hit, started.elapsed());
        took.push(started.elapsed());
        planned.push(PlannedStep { info, key, hit, built: None });
        parent = key.to_string();
    }
    let last = b.compressing.take();
    b.finish_compressing(last)?;
    // Each step's time and layer (one a step, after the base's), now that
    // every blob is made.
    let first = b.layers.len() - planned.len();
    for ((p, t), l) in planned.iter_mut().zip(took).zip(&b.layers[first..]) {
        p.built = Some((t, l.digest, l.size));
    }
    let mut config = b.base.config.clone();
    config.set_history(Some(history_entries));
    s.record_steps(&planned);
    let docker_config = b.base.docker_config.clone();
    Ok(Built { id: parent, layers: b.layers, config, docker_config, steps: planned })
}

/// A target being built: its base, and the image so far.
struct TargetBuild<'a> {
    s: &'a Session,
    t: Target<'a>,
    done: &'a Done,
    base: BaseImage,
    run_config: oci_spec::image::Config,
    layers: Vec<ImageLayer>,
    /// The merged tree of `layers`, made on the first miss (hits need none).
    lower: Option<FsTree>,
    /// The dpkg status a `[packages]` step made in this build, with its
    /// key: the `CONFIGURE` step after it needs it, and reading it back
    /// would decompress the whole layer.
    packages_status: Option<(Digest, String)>,
    /// The layer whose gzip blob is being made while the next step runs on
    /// its unpacked folder (see [`TargetBuild::write`]).
    compressing: Option<Compressing>,
}

/// A layer's blob being compressed on its own thread. Until it is done,
/// `layers[index]` has the layer's diff_id in place of its digest, which
/// only the executor that ran on its unpacked folder sees.
struct Compressing {
    index: usize,
    key: Digest,
    info: StepInfo,
    started: Instant,
    staged: layer::StagedLayer,
}

impl TargetBuild<'_> {
    /// One step: its key, and whether a cache tier had its layer.
    fn step(&mut self, step: &Step, info: &StepInfo, parent: &str) -> Result<(Digest, bool), BuildError> {
        let s = self.s;
        let (key, mut prepared) = s.planner().key(parent, step, &self.run_config, self.done)?;
        if let (Prepared::Configure(plan), Some((made, status))) =
            (&mut prepared, self.packages_status.take())
        {
            if made.to_string() == parent {
                plan.status = Some(status);
            }
        }
        let cached = if s.opts.no_cache { Cached::Miss } else { s.cache.lookup(&key)? };
        let hit = matches!(cached, Cached::Hit(_) | Cached::Remote(..));
        let (layer, written) = match cached {
            Cached::Hit(layer) => {
                s.store.touch_record(RecordKind::Step, &key.hex());
                s.reporter.on_cache_hit(info, &key);
                (layer, None)
            }
            Cached::Remote(layer, from) => {
                s.cache.remote_hit(&layer, from, key);
                if self.lower.is_some() {
                    s.cache.materialize(std::slice::from_ref(&layer))?;
                }
                s.reporter.on_cache_hit(info, &key);
                (layer, None)
            }
            Cached::Miss | Cached::Corrupt => {
                if matches!(cached, Cached::Corrupt) {
                    s.reporter.on_notice(&format!(
                        "{}: the cached layer was missing or corrupt; rebuilding it",
                        step_label(info)
                    ));
                }
                if self.lower.is_none() {
                    s.cache.materialize(&self.layers)?;
                    self.lower = Some(FsTree::of_layers(&s.store, &self.layers)?);
                }
                let (layer, listing) = self.make_layer(step, info, key, prepared)?;
                (layer, Some(listing))
            }
        };
        if let Some(tree) = self.lower.as_mut() {
            match written {
                Some(l) => tree.push_file(layer.digest, l)?,
                None => tree.push_layer(&s.store, &layer)?,
            }
        }
        self.layers.push(layer);
        Ok((key, hit))
    }

    /// Makes a step's layer on a miss: its entries, written (and unpacked
    /// for the executor when a `run` step that misses comes next), recorded.
    fn make_layer(
        &mut self,
        step: &Step,
        info: &StepInfo,
        key: Digest,
        prepared: Prepared,
    ) -> Result<(ImageLayer, ListingFile), BuildError> {
        let s = self.s;
        let (recipe, tree) = (&s.recipe, self.lower.as_ref().expect("made on the first miss"));
        let mut keep: Option<Box<dyn std::any::Any + Send>> = None;
        let mut executor: Option<Option<Arc<dyn Executor>>> = None;
        let entries = match (&step.kind, prepared) {
            (StepKind::Copy(c), Prepared::Copy(src)) => copy_entries(recipe, step, c, &src, tree)?,
            (StepKind::Copy(c), Prepared::CopyFrom(built)) => {
                s.cache.materialize(&built.layers)?;
                let (entries, tmp) = copy_from_entries(&s.store, recipe, step, c, &built.layers, tree)?;
                keep = Some(Box::new(tmp));
                entries
            }
            (StepKind::Write(w), Prepared::Write) => write_entries(recipe, step, w, tree)?,
            (StepKind::Packages(p), Prepared::Packages(lock)) => {
                let parent = (self.layers.as_slice(), tree);
                let ex = t_steps(self.t, step).first().and_then(|n| self.unpacks_for(n, &key));
                let unpacked_next = ex.is_some();
                executor = Some(ex);
                let (entries, scratch) = package_entries(
                    &s.store,
                    &s.rt,
                    s.reporter.as_ref(),
                    s.epoch,
                    p,
                    &lock,
                    parent,
                    unpacked_next,
                )?;
                keep = Some(Box::new(scratch));
                self.packages_status =
                    entries.iter().find(|e| e.path == "var/lib/dpkg/status").and_then(|e| match &e.content {
                        layer::Content::Bytes(b) => Some((key, String::from_utf8_lossy(b).into_owned())),
                        _ => None,
                    });
                entries
            }
            (StepKind::Run(_) | StepKind::Configure(_), prepared) => {
                let env = RunEnv {
                    recipe,
                    store: &s.store,
                    platform: &s.platform,
                    executor: &|| s.backends.executor(),
                    reporter: s.reporter.as_ref(),
                    secrets: &s.opts.secrets,
                    step_timeout: s.opts.step_timeout,
                };
                let parent = Parent { layers: &self.layers, tree, config: &self.base.config };
                let (changes, k) = match (&step.kind, prepared) {
                    (StepKind::Run(run), Prepared::Run(plan)) => {
                        run_step(&env, step, info, run, plan, parent)?
                    }
                    (StepKind::Configure(_), Prepared::Configure(plan)) => {
                        configure_step(&env, step, info, *plan, parent)?
                    }
                    _ => unreachable!("prepared matches the step kind"),
                };
                keep = Some(k);
                changes::to_layer_entries(changes)
            }
            _ => unreachable!("prepared matches the step kind"),
        };
        // The executor the layer goes to unpacked, asked once (a packages
        // step asked before its files were decoded).
        let executor =
            executor.unwrap_or_else(|| t_steps(self.t, step).first().and_then(|n| self.unpacks_for(n, &key)));
        let layer = self.write(entries, info, key, executor)?;
        drop(keep);
        Ok(layer)
    }

    /// Waits for a layer's blob, then records it as a step written then.
    fn finish_compressing(&mut self, c: Option<Compressing>) -> Result<(), BuildError> {
        let Some(c) = c else { return Ok(()) };
        let phase = (!c.staged.is_finished()).then(|| {
            self.s.reporter.meter(&format!("[{}] compressing its layer", step_label(&c.info)), None)
        });
        let blob = c.staged.finish();
        if let Some(p) = phase {
            p.finish();
        }
        let blob = blob?;
        tracing::debug!(elapsed = ?c.started.elapsed(), size = blob.size, "layer compressed");
        let layer = self.record(&c.info, c.key, blob)?;
        self.layers[c.index] = layer;
        Ok(())
    }

    /// The layer of `blob`, stored as the step's.
    fn record(&self, info: &StepInfo, key: Digest, blob: layer::LayerBlob) -> Result<ImageLayer, BuildError> {
        self.s.reporter.on_layer_written(info, &blob);
        let layer = ImageLayer {
            diff_id: blob.diff_id,
            digest: blob.digest,
            size: blob.size,
            media_type: layer::MEDIA_TYPE.to_string(),
        };
        self.s.store.put_step(&key, &layer.step_record())?;
        Ok(layer)
    }

    /// Writes the layer. With `executor` (the next step is a `run` that
    /// will miss on an executor that runs on unpacked folders: see
    /// [`Self::unpacks_for`]), the layer is made as that folder while its
    /// tar is written, and its gzip blob is made on
    /// another thread while the `run` step runs (the step needs only the
    /// folder; no key depends on the blob's digest).
    fn write(
        &mut self,
        entries: Vec<layer::LayerEntry>,
        info: &StepInfo,
        key: Digest,
        executor: Option<Arc<dyn Executor>>,
    ) -> Result<(ImageLayer, ListingFile), BuildError> {
        let s = self.s;
        let timer = Instant::now();
        // A step made again (`--no-cache`) that gives the tar it gave
        // before has the blob it had: it is not compressed again.
        let mut known = match s.store.step(&key) {
            Some(rec) if rec.media_type == layer::MEDIA_TYPE && s.store.verify_blob(&rec.digest)? => {
                Some(layer::LayerBlob { diff_id: rec.diff_id, digest: rec.digest, size: rec.size })
            }
            _ => None,
        };
        let mut entries = entries;
        // When no folder is needed, or the executor still holds the known
        // layer unpacked, the tar is only hashed: nothing is written.
        if let Some(k) =
            known.filter(|k| executor.as_ref().is_none_or(|e| e.has_unpacked(&s.store, &k.diff_id)))
        {
            if let Some(listing) = layer::same_layer(&s.store, &mut entries, s.epoch, &k)? {
                tracing::debug!(elapsed = ?timer.elapsed(), "the layer is as before; not written again");
                return Ok((self.record(info, key, k)?, listing));
            }
            known = None; // another tar: written and compressed below
        }
        let Some(executor) = executor else {
            let (blob, listing) = layer::write_layer(&s.store, entries, s.epoch)?;
            tracing::debug!(elapsed = ?timer.elapsed(), size = blob.size, "layer written");
            return Ok((self.record(info, key, blob)?, listing));
        };
        let staging = tempfile::Builder::new()
            .prefix("unpack-")
            .tempdir_in(s.store.tmp_dir())
            .map_err(BuildError::io_write(s.store.tmp_dir()))?;
        let folder = staging.path().join("root");
        let (staged, listing) = layer::write_layer_staged(&s.store, entries, s.epoch, &folder, known)?;
        match executor.adopt_unpacked(&s.store, &folder, &staged.diff_id, &listing) {
            Ok(true) => {}
            // The executor would make the folder again from the blob.
            Ok(false) => return Ok((self.record(info, key, staged.finish()?)?, listing)),
            Err(e) => {
                let _ = staged.finish();
                return Err(e);
            }
        }
        tracing::debug!(elapsed = ?timer.elapsed(), "layer unpacked, its tar written");
        let diff_id = staged.diff_id;
        self.compressing =
            Some(Compressing { index: self.layers.len(), key, info: info.clone(), started: timer, staged });
        let placeholder =
            ImageLayer { diff_id, digest: diff_id, size: 0, media_type: layer::MEDIA_TYPE.to_string() };
        Ok((placeholder, listing))
    }

    /// The executor to hand the layer being written to, unpacked: when
    /// `next` is a `run` step that will miss and the executor runs on
    /// unpacked folders (never for a step no `run` follows).
    fn unpacks_for(&self, next: &Step, key: &Digest) -> Option<Arc<dyn Executor>> {
        let s = self.s;
        if !matches!(next.kind, StepKind::Run(_) | StepKind::Configure(_)) {
            return None;
        }
        let executor = s.backends.executor().ok()?;
        executor.unpack_dir(&s.store)?;
        let (k, _) = s.planner().key(&key.to_string(), next, &self.run_config, self.done).ok()?;
        let misses =
            s.opts.no_cache || !matches!(s.cache.lookup(&k), Ok(Cached::Hit(_) | Cached::Remote(..)));
        misses.then_some(executor)
    }
}

/// Whether a `run` step reads the image's /etc/passwd and /etc/group from
/// the layers below it (see `run::mount_owner`): for a secret whose owner
/// the recipe leaves to the step's user, or a cache mount.
fn reads_accounts(step: &Step) -> bool {
    match &step.kind {
        StepKind::Run(r) => !r.cache.is_empty() || r.secrets.iter().any(|s| s.takes_step_owner()),
        _ => false,
    }
}

/// The steps of `t` after `step`.
fn t_steps<'a>(t: Target<'a>, step: &Step) -> &'a [Step] {
    &t.steps()[step.index + 1..]
}
