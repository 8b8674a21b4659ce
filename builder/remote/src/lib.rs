//! kiln-remote: images in registries: `registry:` bases pulled into the
//! store and checked like any imported image, `-o registry:` pushes, and
//! the remote step cache (`--cache-from` / `--cache-to`). Depends on the
//! formats (`kiln-oci`), the store, and the recipes' platform type.
//!
//! - [`client`]: the OCI distribution client (on `oci-client`): manifests
//!   and blobs streamed into and out of the store; `client::auth`:
//!   credentials from KILN_REGISTRY_AUTH, a Docker config, helpers.
//!
//! The remote cache is a set of OCI artifact manifests in one repository:
//!
//! ```json
//! { "schemaVersion": 2,
//!   "mediaType": "application/vnd.oci.image.manifest.v1+json",
//!   "artifactType": "application/vnd.kiln.cache.index.v1",
//!   "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": "sha256:44136f…", "size": 2 },
//!   "layers": [ { "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:…",
//!                 "size": 1234, "annotations": { "dev.kiln.cache.diff-id": "sha256:…" } } ],
//!   "annotations": { "dev.kiln.cache.step.<KEY HEX>": "sha256:<layer digest> <last use>", … } }
//! ```
//!
//! Each `dev.kiln.cache.step.*` annotation maps a step key to the layer it
//! made and says when a build last used the step (unix seconds; an index
//! of an older kiln has no time); the layer's descriptor (listed once)
//! gives its size, media type and diff_id. Listing the layers also makes
//! the registry keep them.
//!
//! Registries have no compare-and-swap on tags, so builds never rewrite a
//! shared tag: each `--cache-to` pushes its own steps under a tag of its own,
//! `TAG-w-SECONDS-RANDOM` (a writer tag, never written again), and readers
//! merge the tag `TAG` (default `kiln-cache`) with every writer tag the
//! repository lists (`GET /v2/NAME/tags/list`). No entry is lost however
//! many builds push at once. `kiln cache prune --remote` compacts: it
//! reads them all, drops the steps whose layer no build used within the
//! age given, pushes the rest as `TAG`, and deletes the writer tags it read
//! (tags pushed meanwhile are left for the next prune). Run one prune at a
//! time for a cache.

pub mod client;

use std::collections::{BTreeMap, HashMap};

use serde_json::json;

use crate::client::{
    Manifest, Pushed, Registry, RegistryError, Remote, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use kiln_cache::{Digest, Store};
use kiln_recipes::recipe::Platform;

use kiln_oci::error::BuildError;
use kiln_oci::image::{self, canonical_json, ImageLayer, StoredImage};
use kiln_oci::import;
use kiln_oci::reporter::Reporter;

pub(crate) const CACHE_TAG: &str = "kiln-cache";
pub(crate) const ARTIFACT_TYPE: &str = "application/vnd.kiln.cache.index.v1";
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const STEP_PREFIX: &str = "dev.kiln.cache.step.";
const DIFF_ID: &str = "dev.kiln.cache.diff-id";
/// On the compacted index `kiln cache prune --remote` pushes (so its bytes
/// never equal a writer's, whose manifests prune deletes by digest).
const COMPACTED: &str = "dev.kiln.cache.compacted";
/// Writer tags read at most per cache (the newest); a prune reads them all.
pub const MAX_WRITERS_READ: usize = 2000;
/// Steps read from one cache's tag and writer tags, at most (about).
const MAX_STEPS_READ: usize = 5 * MAX_ENTRIES;
/// Steps kept in one index: about 1.5 MB of JSON, well under registries' manifest limits.
pub(crate) const MAX_ENTRIES: usize = 4000;

/// Parses the part after `registry:`.
pub fn remote(text: &str) -> Result<Remote, BuildError> {
    Ok(Remote::parse(text)?)
}

/// The manifest `r` names by digest: from the store when it has it (so a
/// pinned base that was pulled before needs no registry), else pulled and kept.
fn manifest_by_digest(store: &Store, reg: &Registry, r: &Remote) -> Result<Manifest, BuildError> {
    let d = r.digest.expect("a digest reference");
    if store.verify_blob(&d)? {
        let bytes = store.read_blob(&d)?;
        if let Some(media_type) = crate::client::media_type_of(&bytes) {
            return Ok(Manifest { bytes, digest: d, media_type });
        }
    }
    let m = reg.manifest(r)?.ok_or_else(|| RegistryError::NotFound { reference: r.to_string() })?;
    store.put_blob(&m.bytes)?;
    Ok(m)
}

/// What tag `r` names now (the manifest is kept in the store); `None` when
/// the registry has no such tag. `once`: no second attempt when the
/// connection fails (for a check the build can go on without).
pub fn resolve_tag(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    once: bool,
) -> Result<Option<Digest>, BuildError> {
    let m = if once { reg.manifest_once(r)? } else { reg.manifest(r)? };
    match m {
        Some(m) => {
            store.put_blob(&m.bytes)?;
            Ok(Some(m.digest))
        }
        None => Ok(None),
    }
}

/// The digest `r` names: its own, or what its tag names now.
pub fn digest_of(store: &Store, reg: &Registry, r: &Remote) -> Result<Digest, BuildError> {
    match r.digest {
        Some(d) => Ok(d),
        None => Ok(resolve_tag(store, reg, r, false)?
            .ok_or_else(|| RegistryError::NotFound { reference: r.to_string() })?),
    }
}

/// The image manifest for `platform` that `m` is or lists.
fn platform_manifest(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    m: Manifest,
    platform: &Platform,
) -> Result<Manifest, BuildError> {
    if m.media_type == OCI_MANIFEST || m.media_type == DOCKER_MANIFEST {
        return Ok(m);
    }
    let bad = |reason: String| BuildError::BadImage { image: format!("registry:{r}"), reason };
    if m.media_type != OCI_INDEX && m.media_type != DOCKER_LIST {
        return Err(bad(format!(
            "its manifest has the media type `{}`, which is not an image",
            m.media_type
        )));
    }
    let index: oci_spec::image::ImageIndex =
        serde_json::from_slice(&m.bytes).map_err(|e| bad(format!("its index is malformed ({e})")))?;
    let desc = image::select_platform(index.manifests(), platform).map_err(bad)?;
    let d: Digest = desc.digest().to_string().parse().map_err(|e| bad(format!("{e}")))?;
    let inner = manifest_by_digest(store, reg, &r.with_digest(d))?;
    if inner.media_type != OCI_MANIFEST && inner.media_type != DOCKER_MANIFEST {
        return Err(bad(format!("{d} is a `{}`, not an image manifest", inner.media_type)));
    }
    Ok(inner)
}

/// Pulls `r` (named by digest: a manifest, or an index to pick `platform`
/// from) into the store: manifest, config and layers, each checked against
/// its digest, then every layer read through like any imported image. What
/// the store holds already is not downloaded again. Returns the image and
/// the repository it can be mounted from.
pub fn pull(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    platform: &Platform,
    reporter: &dyn Reporter,
) -> Result<(StoredImage, Remote), BuildError> {
    let name = format!("registry:{r}");
    let top = manifest_by_digest(store, reg, r)?;
    let m = platform_manifest(store, reg, r, top, platform)?;
    let by_digest = r.with_digest(m.digest);
    let repository = format!("{}/{}", r.host, r.repo);
    // The sizes the manifest gives its config and layers: the bound on each
    // download, and the total its meter shows.
    let sizes: HashMap<String, u64> = serde_json::from_slice::<serde_json::Value>(&m.bytes)
        .ok()
        .map(|v| {
            let config = v["config"].clone();
            v["layers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .chain(std::iter::once(config))
                .filter_map(|l| Some((l["digest"].as_str()?.to_string(), l["size"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    let fetch = |d: &Digest| -> Result<(), BuildError> {
        let size = sizes.get(&d.to_string()).copied();
        let meter = reporter.meter(&format!("pulling {}", d.short()), size);
        let n = reg.fetch_blob(store, &by_digest, d, size, meter.as_ref())?;
        meter.finish();
        if n > 0 {
            reporter.on_blob("pulled", d, &repository, n);
        }
        Ok(())
    };
    let image = import::finish(store, &name, m.digest, &fetch)?;
    Ok((image, by_digest))
}

/// Pushes `image` to `r`'s tag: layers and config (each skipped when the
/// repository has it, mounted when `sources` names another repository of
/// the same registry that has it), then the manifest. Returns its digest.
pub fn push(
    store: &Store,
    reg: &Registry,
    image: &StoredImage,
    r: &Remote,
    sources: &HashMap<Digest, Remote>,
    reporter: &dyn Reporter,
) -> Result<Digest, BuildError> {
    let mut blobs: Vec<Digest> = image.layers.iter().map(|l| l.digest).collect();
    blobs.push(image.config);
    let skipped = push_blobs(store, reg, r, &blobs, sources, reporter)?;
    let bytes = store.read_blob(&image.manifest)?;
    let digest = reg.push_manifest(r, &bytes, image::MANIFEST_MEDIA_TYPE)?;
    reporter.on_notice(&format!("pushed {r}@{digest} ({skipped} blob(s) were there already)"));
    Ok(digest)
}

/// Pushes blobs the store holds to `r`, reporting each one that moved;
/// returns how many the repository had already.
pub fn push_blobs(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    blobs: &[Digest],
    sources: &HashMap<Digest, Remote>,
    reporter: &dyn Reporter,
) -> Result<usize, BuildError> {
    let repository = format!("{}/{}", r.host, r.repo);
    let mut skipped = 0;
    for d in blobs {
        let size = std::fs::metadata(store.blob_path(d)).map(|m| m.len()).ok();
        let meter = reporter.meter(&format!("pushing {}", d.short()), size);
        let pushed = reg.push_blob(store, r, d, sources.get(d), meter.as_ref());
        meter.finish();
        match pushed? {
            Pushed::Present => skipped += 1,
            Pushed::Mounted => reporter.on_blob("mounted", d, &repository, 0),
            Pushed::Uploaded(n) => reporter.on_blob("pushed", d, &repository, n),
        }
    }
    Ok(skipped)
}

/// A step-key index read from a registry: key → layer, and where it is.
#[derive(Debug, Clone, Default)]
pub struct CacheIndex {
    pub steps: Vec<(Digest, ImageLayer)>,
    /// When a build last used each step, by step key (unix seconds).
    pub used: HashMap<Digest, u64>,
}

impl CacheIndex {
    /// Reads an index manifest; entries that do not parse are skipped.
    pub(crate) fn parse(bytes: &[u8]) -> Result<CacheIndex, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
        if v["artifactType"] != ARTIFACT_TYPE {
            // Not quoted: the value is the registry's.
            return Err(format!("its artifactType is not {ARTIFACT_TYPE}"));
        }
        let mut layers: HashMap<Digest, ImageLayer> = HashMap::new();
        let mut used: HashMap<Digest, u64> = HashMap::new();
        for l in v["layers"].as_array().into_iter().flatten() {
            let (Some(d), Some(diff), Some(size), Some(mt)) = (
                l["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()),
                l["annotations"][DIFF_ID].as_str().and_then(|s| s.parse::<Digest>().ok()),
                l["size"].as_u64(),
                l["mediaType"].as_str(),
            ) else {
                continue;
            };
            layers.insert(d, ImageLayer { diff_id: diff, digest: d, size, media_type: mt.to_string() });
        }
        // The layers list is in recency order; steps follow it.
        let order: HashMap<Digest, usize> = v["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, l)| Some((l["digest"].as_str()?.parse::<Digest>().ok()?, i)))
            .collect();
        let mut steps = Vec::new();
        for (k, val) in v["annotations"].as_object().into_iter().flatten() {
            let mut words = val.as_str().unwrap_or("").split(' ');
            let (Some(key), Some(layer)) = (
                k.strip_prefix(STEP_PREFIX).and_then(Digest::from_hex),
                words.next().and_then(|s| s.parse::<Digest>().ok()).and_then(|d| layers.get(&d)),
            ) else {
                continue;
            };
            if let Some(t) = words.next().and_then(|t| t.parse::<u64>().ok()) {
                used.insert(key, t);
            }
            steps.push((key, layer.clone()));
        }
        steps.sort_by_key(|(k, l)| (order.get(&l.digest).copied().unwrap_or(usize::MAX), *k));
        Ok(CacheIndex { steps, used })
    }

    /// The indexes as one, the first holding a key winning; a layer's
    /// use is the latest any of them records.
    pub fn union(parts: impl IntoIterator<Item = CacheIndex>) -> CacheIndex {
        let mut seen = std::collections::HashSet::new();
        let mut out = CacheIndex::default();
        for part in parts {
            for (d, t) in part.used {
                let e = out.used.entry(d).or_insert(t);
                *e = (*e).max(t);
            }
            out.steps.extend(part.steps.into_iter().filter(|(k, _)| seen.insert(*k)));
        }
        out
    }

    /// Whether `key` maps to `layer` here and a build used it at or after `since`.
    pub fn has_used_since(&self, key: &Digest, layer: &Digest, since: u64) -> bool {
        self.steps.iter().any(|(k, l)| k == key && l.digest == *layer)
            && self.used.get(key).is_some_and(|t| *t >= since)
    }

    /// The manifest bytes (canonical JSON), with `extra` annotations.
    pub(crate) fn render_with(&self, extra: &[(&str, String)]) -> Vec<u8> {
        let mut layers = Vec::new();
        let mut listed = std::collections::HashSet::new();
        let mut annotations = BTreeMap::new();
        for (key, l) in &self.steps {
            let value = match self.used.get(key) {
                Some(t) => format!("{} {t}", l.digest),
                None => l.digest.to_string(),
            };
            annotations.insert(format!("{STEP_PREFIX}{}", key.hex()), value);
            if listed.insert(l.digest) {
                layers.push(json!({
                    "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size,
                    "annotations": { DIFF_ID: l.diff_id.to_string() },
                }));
            }
        }
        for (k, v) in extra {
            annotations.insert(k.to_string(), v.clone());
        }
        canonical_json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": Digest::of(b"{}").to_string(), "size": 2 },
            "layers": layers,
            "annotations": annotations,
        }))
    }

    pub(crate) fn render(&self) -> Vec<u8> {
        self.render_with(&[])
    }
}

/// The prefix of a cache tag's writer tags.
fn writer_prefix(tag: &str) -> String {
    // Tags are at most 128 characters: a long one is named by its digest.
    let base =
        if tag.len() > 90 { Digest::of(tag.as_bytes()).hex()[..16].to_string() } else { tag.to_string() };
    format!("{base}-w-")
}

/// A tag of this build's own under the cache `r`: `TAG-w-SECONDS-RANDOM`.
pub fn writer_ref(r: &Remote, now: u64) -> Remote {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut random = [0u8; 16];
    let _ =
        std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random));
    let unique = Digest::of(format!("{}-{nanos}-{host}-{random:?}", std::process::id()).as_bytes());
    let tag =
        format!("{}{now}-{}", writer_prefix(r.tag.as_deref().unwrap_or(CACHE_TAG)), &unique.hex()[..12]);
    Remote { tag: Some(tag), digest: None, ..r.clone() }
}

/// A remote cache as a reader sees it: its tag and writer tags merged, and
/// the writer tags read (name, manifest digest), newest first.
#[derive(Debug, Default)]
pub struct RemoteCache {
    pub index: CacheIndex,
    pub writers: Vec<(String, Digest)>,
}

/// Reads the cache at `r`: the tag itself and its writer tags (at most
/// `max_writers`, the newest), merged newest first. A writer tag deleted
/// between the listing and the read (a prune) is skipped.
pub fn read_cache(reg: &Registry, r: &Remote, max_writers: usize) -> Result<RemoteCache, BuildError> {
    let main = pull_index(reg, r)?;
    let prefix = writer_prefix(r.tag.as_deref().unwrap_or(CACHE_TAG));
    let mut tags: Vec<(u64, String)> = reg
        .tags(r)?
        .into_iter()
        .filter_map(|t| {
            let secs = t.strip_prefix(&prefix)?.split('-').next()?.parse::<u64>().ok()?;
            Some((secs, t))
        })
        .collect();
    tags.sort_by(|a, b| b.cmp(a));
    tags.truncate(max_writers);
    let mut parts = Vec::new();
    let mut writers = Vec::new();
    let mut steps = main.steps.len();
    for (_, tag) in tags {
        // A registry's answers are not trusted to be small: past this many
        // steps the older writer tags wait (for the next read, or prune).
        if steps > MAX_STEPS_READ {
            tracing::debug!(cache = %r, "the cache's writer tags hold more steps than kiln reads; the older ones are left");
            break;
        }
        let at = Remote { tag: Some(tag.clone()), digest: None, ..r.clone() };
        match reg.manifest(&at)? {
            None => continue,
            Some(m) => match CacheIndex::parse(&m.bytes) {
                Ok(idx) => {
                    steps += idx.steps.len();
                    parts.push(idx);
                    writers.push((tag, m.digest));
                }
                Err(reason) => tracing::debug!(tag, reason, "not a kiln cache index; skipped"),
            },
        }
    }
    parts.push(main);
    Ok(RemoteCache { index: CacheIndex::union(parts), writers })
}

/// What `kiln cache prune --remote` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RemotePruneReport {
    /// `registry:HOST/REPO:TAG`, where the compacted index now is.
    pub reference: String,
    pub kept: usize,
    pub removed: usize,
    pub writer_tags_deleted: usize,
    pub index: Digest,
}

/// Compacts the cache at `r`: the steps a build used at or after
/// `now - older_than` (seconds) are pushed as its tag, the others dropped,
/// and the writer tags read are deleted. The layers themselves stay until
/// the registry's garbage collection finds no manifest listing them.
pub fn prune_cache(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    older_than: u64,
    now: u64,
) -> Result<RemotePruneReport, BuildError> {
    let cache = read_cache(reg, r, usize::MAX)?;
    if cache.writers.is_empty() && reg.manifest(r)?.is_none() {
        return Err(client::RegistryError::NotFound {
            reference: format!(
                "{r} (no kiln cache: no such tag and no writer tags `{}*`)",
                writer_prefix(r.tag.as_deref().unwrap_or(CACHE_TAG))
            ),
        }
        .into());
    }
    let cutoff = now.saturating_sub(older_than);
    let total = cache.index.steps.len();
    let mut kept = cache.index.clone();
    kept.steps.retain(|(k, _)| cache.index.used.get(k).is_some_and(|t| *t >= cutoff));
    kept.steps.truncate(MAX_ENTRIES);
    kept.used.retain(|k, _| kept.steps.iter().any(|(s, _)| s == k));
    let index = push_artifact(store, reg, r, &kept.render_with(&[(COMPACTED, now.to_string())]))?;
    for (tag, digest) in &cache.writers {
        if *digest != index {
            reg.delete_manifest(r, digest).map_err(|e| BuildError::Environment {
                message: format!(
                    "The cache's steps are compacted at registry:{r}, but its writer tag `{tag}` cannot be deleted: {e}"
                ),
                hint: "the registry must allow deletes (a distribution registry: `storage: delete: enabled: true`) and the credentials must be allowed to delete; until then the writer tags stay, and readers keep merging them".into(),
            })?;
        }
    }
    Ok(RemotePruneReport {
        reference: format!("registry:{r}"),
        kept: kept.steps.len(),
        removed: total - kept.steps.len(),
        writer_tags_deleted: cache.writers.len(),
        index,
    })
}

/// The cache reference with its default tag when none was given.
pub fn cache_ref(text: &str) -> Result<Remote, BuildError> {
    Ok(Remote::parse_with_default_tag(text, CACHE_TAG)?)
}

/// The artifact type of a remote cache's mounts (`--cache-mounts`), a
/// second manifest beside the step index, at the tag `TAG-mounts`: one
/// layer per cache mount, a gzipped tar of its folder, named by its id.
const MOUNTS_ARTIFACT: &str = "application/vnd.kiln.cache.mounts.v1";
const MOUNT_MEDIA_TYPE: &str = "application/vnd.kiln.cache.mount.tar+gzip";
const MOUNT_ID: &str = "dev.kiln.cache.mount.id";
/// Cache mounts kept in one remote cache.
const MAX_MOUNTS: usize = 256;

/// A remote cache's mounts: (id, blob digest, size), newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountsIndex {
    pub mounts: Vec<(String, Digest, u64)>,
}

impl MountsIndex {
    /// Reads a mounts manifest; entries that do not parse are skipped.
    pub(crate) fn parse(bytes: &[u8]) -> Result<MountsIndex, String> {
        let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON ({e})"))?;
        if v["artifactType"] != MOUNTS_ARTIFACT {
            // Not quoted: the value is the registry's.
            return Err(format!("its artifactType is not {MOUNTS_ARTIFACT}"));
        }
        let mut mounts: Vec<(String, Digest, u64)> = Vec::new();
        for l in v["layers"].as_array().into_iter().flatten() {
            let (Some(id), Some(d), Some(size)) = (
                l["annotations"][MOUNT_ID].as_str(),
                l["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()),
                l["size"].as_u64(),
            ) else {
                continue;
            };
            let id_ok = !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control);
            if id_ok && !mounts.iter().any(|(i, ..)| i == id) && mounts.len() < MAX_MOUNTS {
                mounts.push((id.to_string(), d, size));
            }
        }
        Ok(MountsIndex { mounts })
    }

    /// `newer` first (an id there replaces the older entry), at most [`MAX_MOUNTS`].
    pub fn merged(newer: &[(String, Digest, u64)], older: &MountsIndex) -> MountsIndex {
        let mut out: Vec<(String, Digest, u64)> = Vec::new();
        for m in newer.iter().chain(&older.mounts) {
            if !out.iter().any(|(i, ..)| *i == m.0) && out.len() < MAX_MOUNTS {
                out.push(m.clone());
            }
        }
        MountsIndex { mounts: out }
    }

    pub(crate) fn render(&self) -> Vec<u8> {
        let layers: Vec<_> = self
            .mounts
            .iter()
            .map(|(id, d, size)| {
                json!({"mediaType": MOUNT_MEDIA_TYPE, "digest": d.to_string(), "size": size,
                       "annotations": { MOUNT_ID: id }})
            })
            .collect();
        canonical_json(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": MOUNTS_ARTIFACT,
            "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": Digest::of(b"{}").to_string(), "size": 2 },
            "layers": layers,
        }))
    }
}

/// Where a cache reference keeps its mounts: the same repository, tag `TAG-mounts`.
pub fn mounts_ref(r: &Remote) -> Remote {
    let tag = format!("{}-mounts", r.tag.as_deref().unwrap_or(CACHE_TAG));
    Remote { tag: Some(tag), digest: None, ..r.clone() }
}

/// The mounts of the cache at `r`; none when it has none.
pub fn pull_mounts(reg: &Registry, r: &Remote) -> Result<MountsIndex, BuildError> {
    let at = mounts_ref(r);
    match reg.manifest(&at)? {
        None => Ok(MountsIndex::default()),
        Some(m) => MountsIndex::parse(&m.bytes).map_err(|reason| BuildError::BadImage {
            image: format!("registry:{at}"),
            reason: format!("it is not a kiln cache-mounts index: {reason}"),
        }),
    }
}

/// Pushes the mounts index of the cache at `r` (its blobs must be there already).
pub fn push_mounts(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    index: &MountsIndex,
) -> Result<Digest, BuildError> {
    push_artifact(store, reg, &mounts_ref(r), &index.render())
}

/// An artifact manifest of kiln's at `at`, with the empty config it names.
fn push_artifact(store: &Store, reg: &Registry, at: &Remote, manifest: &[u8]) -> Result<Digest, BuildError> {
    let empty = store.put_blob(b"{}")?;
    reg.push_blob(store, at, &empty, None, &kiln_oci::reporter::NullMeter)?;
    Ok(reg.push_manifest(at, manifest, OCI_MANIFEST)?)
}

/// Reads the index at `r`; an absent one is empty.
pub fn pull_index(reg: &Registry, r: &Remote) -> Result<CacheIndex, BuildError> {
    match reg.manifest(r)? {
        None => Ok(CacheIndex::default()),
        Some(m) => CacheIndex::parse(&m.bytes).map_err(|reason| BuildError::BadImage {
            image: format!("registry:{r}"),
            reason: format!("it is not a kiln cache index: {reason}"),
        }),
    }
}

/// Pushes `index` to `r` (its layers must be there already).
pub fn push_index(
    store: &Store,
    reg: &Registry,
    r: &Remote,
    index: &CacheIndex,
) -> Result<Digest, BuildError> {
    push_artifact(store, reg, r, &index.render())
}

/// The `--cache-from` indexes, merged: step key → layer and the repository
/// that has it, the first cache listed winning. A cache that cannot be read
/// is reported and left out; the build goes on without it.
pub fn read_caches(
    reg: &Registry,
    from: &[Remote],
    reporter: &dyn Reporter,
) -> HashMap<Digest, (ImageLayer, Remote)> {
    let mut steps = HashMap::new();
    for r in from {
        match read_cache(reg, r, MAX_WRITERS_READ) {
            Ok(cache) => {
                let idx = cache.index;
                tracing::debug!(cache = %r, steps = idx.steps.len(), writers = cache.writers.len(), "remote cache index");
                for (k, l) in idx.steps {
                    steps.entry(k).or_insert_with(|| (l, r.clone()));
                }
            }
            Err(e) => {
                reporter.on_notice(&format!("cannot read the cache registry:{r} ({e}); building without it"))
            }
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> ImageLayer {
        ImageLayer {
            diff_id: Digest::of(&[n, 0]),
            digest: Digest::of(&[n]),
            size: n as u64 * 10,
            media_type: kiln_oci::layer::MEDIA_TYPE.into(),
        }
    }

    #[test]
    fn an_index_round_trips_and_merges_newest_first() {
        let a = (Digest::of(b"a"), layer(1));
        let b = (Digest::of(b"b"), layer(2));
        let c = (Digest::of(b"c"), layer(1)); // another key, same layer
        let old = CacheIndex { steps: vec![a.clone(), b.clone()], used: [(a.0, 100)].into() };
        let parsed = CacheIndex::parse(&old.render()).unwrap();
        assert_eq!(parsed.steps, old.steps);
        assert_eq!(parsed.used, old.used);
        let newer =
            CacheIndex { steps: vec![c.clone(), (a.0, layer(3))], used: [(c.0, 200), (a.0, 200)].into() };
        let merged = CacheIndex::union([newer, parsed]);
        let back = CacheIndex::parse(&merged.render()).unwrap();
        assert_eq!(back.steps.len(), 3);
        assert!(back.steps.contains(&(a.0, layer(3))), "the first index's entry wins");
        assert!(back.steps.contains(&c) && back.steps.contains(&b));
        assert_eq!(back.used[&a.0], 200, "the latest use");
        assert!(
            back.has_used_since(&c.0, &layer(1).digest, 150)
                && !back.has_used_since(&b.0, &layer(2).digest, 0)
        );
        assert!(!back.has_used_since(&a.0, &layer(1).digest, 0), "a maps to layer 3 now");
        assert_eq!(merged.render(), CacheIndex::parse(&merged.render()).unwrap().render(), "stable bytes");
        assert_ne!(merged.render(), merged.render_with(&[(COMPACTED, "1".into())]));
    }

    #[test]
    fn a_mounts_index_round_trips_merges_and_skips_bad_ids() {
        let a = ("pip".to_string(), Digest::of(b"a"), 10);
        let b = ("/var/cache/apt".to_string(), Digest::of(b"b"), 20);
        let idx = MountsIndex { mounts: vec![a.clone(), b.clone()] };
        assert_eq!(MountsIndex::parse(&idx.render()).unwrap(), idx);
        let newer = ("pip".to_string(), Digest::of(b"c"), 30);
        let merged = MountsIndex::merged(std::slice::from_ref(&newer), &idx);
        assert_eq!(merged.mounts, vec![newer, b]);
        let bad = String::from_utf8(idx.render()).unwrap().replace("\"pip\"", "\"a\\u0007b\"");
        assert_eq!(
            MountsIndex::parse(bad.as_bytes()).unwrap().mounts.len(),
            1,
            "a control character in an id"
        );
        assert!(
            MountsIndex::parse(&CacheIndex::default().render()).is_err(),
            "a step index is not a mounts index"
        );
        let r = cache_ref("127.0.0.1:5000/c").unwrap();
        assert_eq!(mounts_ref(&r).tag.as_deref(), Some("kiln-cache-mounts"));
    }

    #[test]
    fn other_artifacts_are_refused() {
        let err = CacheIndex::parse(br#"{"schemaVersion":2,"layers":[]}"#).unwrap_err();
        assert!(err.contains("artifactType"), "{err}");
    }

    #[test]
    fn cache_refs_get_the_default_tag() {
        assert_eq!(cache_ref("127.0.0.1:5000/c").unwrap().tag.as_deref(), Some(CACHE_TAG));
        assert_eq!(cache_ref("127.0.0.1:5000/c:mine").unwrap().tag.as_deref(), Some("mine"));
    }
}

#[cfg(test)]
mod writer_tests {
    use super::*;

    #[test]
    fn writer_tags_are_valid_unique_and_found_by_their_prefix() {
        let r = cache_ref("127.0.0.1:5000/ci/cache").unwrap();
        let a = writer_ref(&r, 1_764_720_000);
        let b = writer_ref(&r, 1_764_720_000);
        let (ta, tb) = (a.tag.clone().unwrap(), b.tag.clone().unwrap());
        assert_ne!(ta, tb);
        assert!(ta.starts_with("kiln-cache-w-1764720000-"), "{ta}");
        assert!(ta.len() <= 128 && ta.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
        let long = cache_ref(&format!("127.0.0.1:5000/ci/cache:{}", "t".repeat(120))).unwrap();
        assert!(writer_ref(&long, 1).tag.unwrap().len() <= 128);
    }
}
