//! The step cache, in tiers (as sccache's multilevel storage): the local
//! store first, then the `--cache-from` registries' step indexes, whose
//! layers are fetched (and checked like any imported layer) only when a
//! build needs their bytes; `--cache-to` pushes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::registry::client::{Registry, RegistryError, Remote};
use kiln_cache::{Digest, Store, StoreError};
use kiln_recipes::{Base, Recipe};

use super::model::{BuildOptions, PlannedStep};
use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::listing::Listing;
use crate::reporter::Reporter;

/// What the cache knows of a step key.
pub(super) enum Cached {
    Hit(ImageLayer),
    /// Not in the store, but in a `--cache-from` registry.
    Remote(ImageLayer, Remote),
    Miss,
    /// A record whose blob is gone or failed its digest check.
    Corrupt,
}

/// The tiers, and what the build learned of where remote layers are.
pub(super) struct StepCache {
    store: Store,
    rt: tokio::runtime::Handle,
    reporter: Arc<dyn Reporter>,
    registry_opts: crate::registry::client::RegistryOptions,
    /// Made on first use: building a TLS client costs a few milliseconds.
    registry: OnceLock<Registry>,
    /// Every registry reference of the build (for the client's plain-HTTP list).
    remotes: Vec<Remote>,
    /// Steps other builds pushed (`--cache-from`): key → layer and its repository.
    remote_steps: HashMap<Digest, (ImageLayer, Remote)>,
    /// Blobs known to be in a registry: where to fetch or mount them from.
    sources: Mutex<HashMap<Digest, Remote>>,
    /// Remote hits whose layer is not in the store yet: layer digest → keys.
    /// Their step records are written when the layer is fetched.
    pending: Mutex<HashMap<Digest, Vec<Digest>>>,
}

impl StepCache {
    /// Reads the `--cache-from` indexes (a cache that cannot be read is
    /// reported and left out).
    pub(super) fn open(
        store: &Store,
        recipe: &Recipe,
        opts: &BuildOptions,
        reporter: Arc<dyn Reporter>,
        rt: tokio::runtime::Handle,
    ) -> StepCache {
        let remotes = remotes_of(recipe, opts);
        let registry = OnceLock::new();
        let remote_steps = match opts.cache_from.is_empty() {
            true => HashMap::new(),
            false => {
                let reg = registry.get_or_init(|| Registry::new(rt.clone(), &remotes, &opts.registry));
                crate::registry::read_caches(reg, &opts.cache_from, reporter.as_ref())
            }
        };
        StepCache {
            store: store.clone(),
            rt,
            reporter,
            registry_opts: opts.registry.clone(),
            registry,
            remotes,
            remote_steps,
            sources: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn registry(&self) -> &Registry {
        self.registry.get_or_init(|| Registry::new(self.rt.clone(), &self.remotes, &self.registry_opts))
    }

    /// A remote hit: its layer is fetched from `from` when needed, and the
    /// step recorded then.
    pub(super) fn remote_hit(&self, layer: &ImageLayer, from: Remote, key: Digest) {
        self.sources.lock().expect("sources").insert(layer.digest, from);
        self.pending.lock().expect("pending").entry(layer.digest).or_default().push(key);
    }

    /// Layers a registry base came from: where to mount them from on a push.
    pub(super) fn add_sources(&self, from: &Remote, layers: &[ImageLayer]) {
        let mut sources = self.sources.lock().expect("sources");
        for l in layers {
            sources.entry(l.digest).or_insert_with(|| from.clone());
        }
    }

    pub(super) fn sources(&self) -> HashMap<Digest, Remote> {
        self.sources.lock().expect("sources").clone()
    }

    /// Whether the store holds `key`'s layer intact, or a `--cache-from`
    /// registry has it.
    pub(super) fn lookup(&self, key: &Digest) -> Result<Cached, BuildError> {
        let remote = || self.remote_steps.get(key).map(|(l, r)| Cached::Remote(l.clone(), r.clone()));
        let Some(rec) = self.store.step(key) else { return Ok(remote().unwrap_or(Cached::Miss)) };
        if self.store.verify_blob(&rec.digest)? {
            return Ok(Cached::Hit(rec.into()));
        }
        Ok(remote().unwrap_or(Cached::Corrupt))
    }

    /// Makes sure the store holds these layers, fetching remote hits' layers
    /// from their registries (checked against digest and diff_id, every
    /// entry read through as for any imported layer), and
    /// records the steps that were waiting for them.
    pub(super) fn materialize(&self, layers: &[ImageLayer]) -> Result<(), BuildError> {
        for l in layers {
            let waiting = self.pending.lock().expect("pending").contains_key(&l.digest);
            if waiting && self.store.verify_blob(&l.digest)? {
                // The store holds the blob (another build's layer) but a registry's
                // index says which diff_id it has: that pairing is checked before a
                // step record, which later builds trust (`--no-cache` keeps a blob
                // whose tar is the recorded diff_id), takes it.
                if let Err(e) = Listing::scan(&self.store, l) {
                    let from = self.sources.lock().expect("sources").get(&l.digest).cloned();
                    return Err(BuildError::BadImage {
                        image: from
                            .map_or_else(|| "a registry cache".to_string(), |f| format!("registry:{f}")),
                        reason: format!("its cached layer {} is refused: {e}", l.digest),
                    });
                }
            } else if !self.store.verify_blob(&l.digest)? {
                let from = self.sources.lock().expect("sources").get(&l.digest).cloned();
                let from = from.ok_or(StoreError::Missing(l.digest))?;
                let meter = self.reporter.meter(&format!("pulling layer {}", l.digest.short()), Some(l.size));
                let n = self.registry().fetch_blob(
                    &self.store,
                    &from,
                    &l.digest,
                    Some(l.size),
                    meter.as_ref(),
                )?;
                meter.finish();
                // The index is another builder's word: the layer must be a clean
                // tar that uncompresses to the diff_id it claims.
                if let Err(e) = Listing::scan(&self.store, l) {
                    self.store.discard_blob(&l.digest);
                    return Err(BuildError::BadImage {
                        image: format!("registry:{from}"),
                        reason: format!("its cached layer {} is refused: {e}", l.digest),
                    });
                }
                self.reporter.on_blob("pulled", &l.digest, &format!("{}/{}", from.host, from.repo), n);
            }
            let keys = self.pending.lock().expect("pending").remove(&l.digest);
            for k in keys.into_iter().flatten() {
                self.store.put_step(&k, &l.step_record())?;
            }
        }
        Ok(())
    }

    /// `--cache-to`: pushes the layer of every step of this build, then the
    /// step index, merged with what `to` held (this build's steps first).
    pub(super) fn push(&self, to: &Remote, steps: &[PlannedStep]) -> Result<(), BuildError> {
        let mut entries: Vec<(Digest, ImageLayer)> = Vec::new();
        for st in steps {
            let layer = match self.store.step(&st.key) {
                Some(rec) => ImageLayer::from(rec),
                None => match self.remote_steps.get(&st.key) {
                    Some((l, _)) => l.clone(),
                    None => continue, // not expected: every step is recorded or a remote hit
                },
            };
            entries.push((st.key, layer));
        }
        let sources = self.sources.lock().expect("sources").clone();
        let mut layers: Vec<&ImageLayer> = Vec::new();
        for (_, l) in &entries {
            if !layers.iter().any(|x| x.digest == l.digest) {
                layers.push(l);
            }
        }
        let mut skipped = 0;
        for l in layers {
            let one = [l.digest];
            let push = || {
                crate::registry::push_blobs(
                    &self.store,
                    self.registry(),
                    to,
                    &one,
                    &sources,
                    self.reporter.as_ref(),
                )
            };
            skipped += match push() {
                // A remote hit this build never needed, and no mount from where it is: fetch it, push it.
                Err(e)
                    if matches!(
                        crate::registry::client::registry_error(&e),
                        Some(RegistryError::Store(StoreError::Missing(_)))
                    ) =>
                {
                    self.materialize(std::slice::from_ref(l))?;
                    push()?
                }
                other => other?,
            };
        }
        // Never a shared tag rewritten (registries have no compare-and-swap):
        // this build's steps, each used now, under a writer tag of its own.
        // A build whose steps the cache holds, recorded as used today, pushes nothing.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let have = match crate::registry::read_cache(self.registry(), to, crate::registry::MAX_WRITERS_READ) {
            Ok(c) => c.index,
            Err(e) => {
                self.reporter.on_notice(&format!("the cache at registry:{to} cannot be read ({e}); this build's steps are pushed all the same"));
                Default::default()
            }
        };
        let today = now - now % 86_400;
        if entries.iter().all(|(k, l)| have.has_used_since(k, &l.digest, today)) {
            self.reporter.on_notice(&format!(
                "cache: the {} step(s) of this build are in the cache at registry:{to} already, used today (it holds {})",
                entries.len(),
                have.steps.len()
            ));
            return Ok(());
        }
        let used = entries.iter().map(|(k, _)| (*k, now)).collect();
        let index = crate::registry::CacheIndex { steps: entries, used };
        let at = crate::registry::writer_ref(to, now);
        let digest = crate::registry::push_index(&self.store, self.registry(), &at, &index)?;
        let all = crate::registry::CacheIndex::union([index.clone(), have]).steps.len();
        self.reporter.on_notice(&format!(
            "cache: {} step(s) of this build in registry:{at}@{digest} (the cache holds {all}; {skipped} layer(s) were there already)",
            index.steps.len(),
        ));
        Ok(())
    }
}

impl StepCache {
    /// `--cache-mounts` with `--cache-to`: each of `ids` that the store has is
    /// packed, pushed into `to`'s repository, and named in its mounts index
    /// (merged with what was there).
    pub(super) fn push_mounts(&self, to: &Remote, ids: &[String]) -> Result<(), BuildError> {
        let mut pushed = Vec::new();
        for id in ids {
            if self.store.mount_data(id).is_none() {
                continue;
            }
            // Locked: no step writes (or swaps a folder for a link) while it is packed.
            let lease = self.store.take_mount(id, kiln_cache::Take::Locked, &|| {})?;
            let mut w = kiln_cache::BlobWriter::new(&self.store)?;
            crate::mount_archive::pack(&lease.data, &mut w).map_err(BuildError::io_read(&lease.data))?;
            let (digest, size) = w.commit()?;
            drop(lease);
            let sources = HashMap::new();
            crate::registry::push_blobs(
                &self.store,
                self.registry(),
                to,
                &[digest],
                &sources,
                self.reporter.as_ref(),
            )?;
            pushed.push((id.clone(), digest, size));
        }
        if pushed.is_empty() {
            return Ok(());
        }
        let old = crate::registry::pull_mounts(self.registry(), to).unwrap_or_default();
        let index = crate::registry::MountsIndex::merged(&pushed, &old);
        crate::registry::push_mounts(&self.store, self.registry(), to, &index)?;
        self.reporter.on_notice(&format!(
            "cache: {} cache mount(s) of this build in registry:{}",
            pushed.len(),
            crate::registry::mounts_ref(to)
        ));
        Ok(())
    }

    /// `--cache-mounts` with `--cache-from`: each of `ids` the store lacks is
    /// made from the first cache that has it. A cache that cannot be read, or
    /// a mount that does not unpack cleanly, is reported and left out.
    pub(super) fn pull_mounts(&self, from: &[Remote], ids: &[String]) -> Result<(), BuildError> {
        let mut wanted: Vec<&String> = ids.iter().filter(|id| self.store.mount_data(id).is_none()).collect();
        for r in from {
            if wanted.is_empty() {
                break;
            }
            let index = match crate::registry::pull_mounts(self.registry(), r) {
                Ok(i) => i,
                Err(e) => {
                    self.reporter.on_notice(&format!("cannot read the cache mounts of registry:{r} ({e})"));
                    continue;
                }
            };
            for (id, digest, size) in &index.mounts {
                let Some(at) = wanted.iter().position(|w| *w == id) else { continue };
                // A blob the store already holds (another image's layer, say) is
                // read, never removed: only what this fetch brought in is discarded.
                let had = self.store.verify_blob(digest)?;
                if !had {
                    let meter =
                        self.reporter.meter(&format!("pulling cache mount {}", digest.short()), Some(*size));
                    let fetched =
                        self.registry().fetch_blob(&self.store, r, digest, Some(*size), meter.as_ref());
                    meter.finish();
                    match fetched {
                        Ok(n) => {
                            self.reporter.on_blob("pulled", digest, &format!("{}/{}", r.host, r.repo), n)
                        }
                        Err(e) => {
                            self.reporter.on_notice(&format!(
                                "the cache mount `{}` of registry:{r} cannot be fetched ({e}); it starts empty",
                                id.escape_debug()
                            ));
                            continue;
                        }
                    }
                }
                let blob = self.store.blob_path(digest);
                let mut fill = |dir: &std::path::Path| {
                    let f = std::fs::File::open(&blob).map_err(|e| e.to_string())?;
                    crate::mount_archive::unpack(std::io::BufReader::new(f), dir)
                };
                match self.store.restore_mount(id, &mut fill)? {
                    Ok(_) => {
                        wanted.remove(at);
                    }
                    Err(why) => self.reporter.on_notice(&format!(
                        "the cache mount `{}` of registry:{r} is refused ({why}); it starts empty",
                        id.escape_debug()
                    )),
                }
                // The packed form is not kept: the mount is the folder.
                if !had {
                    self.store.discard_blob(digest);
                }
            }
        }
        Ok(())
    }
}

/// The ids of every cache mount a recipe's `run` steps use, each once.
pub(super) fn mount_ids(recipe: &Recipe) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let steps = recipe.stages.iter().flat_map(|s| s.steps.iter()).chain(recipe.steps.iter());
    for step in steps {
        if let kiln_recipes::StepKind::Run(r) = &step.kind {
            for m in &r.cache {
                if !ids.contains(&m.id) {
                    ids.push(m.id.clone());
                }
            }
        }
    }
    ids
}

/// Every registry reference a build uses (bases, outputs, caches), so the
/// client knows which loopback hosts speak plain HTTP.
fn remotes_of(recipe: &Recipe, opts: &BuildOptions) -> Vec<Remote> {
    let bases =
        std::iter::once(&recipe.image.base).chain(recipe.stages.iter().map(|s| &s.base)).filter_map(|b| {
            match b {
                Base::Registry(r) => Remote::parse(r).ok(),
                _ => None,
            }
        });
    let outputs = opts.outputs.iter().filter_map(|o| match o {
        kiln_recipes::ImageRef::Registry(r) => Remote::parse(r).ok(),
        _ => None,
    });
    bases.chain(outputs).chain(opts.cache_from.iter().cloned()).chain(opts.cache_to.iter().cloned()).collect()
}
