//! `kiln build --metadata-file FILE`: what a CI job needs to know about the
//! build, as one JSON document (see the README's "CI" section): the image's
//! digests, every output written, every step (its key, HIT or MISS, time,
//! layer) and the bytes that crossed the network to and from registries.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use kiln_builder::{BuildError, BuildOutcome, LayerBlob, Reporter, StepInfo};
use kiln_cache::Digest;

/// Passes every event on, counting the bytes registries moved.
pub struct Counting {
    inner: Arc<dyn Reporter>,
    pushed: AtomicU64,
    pulled: AtomicU64,
}

impl Counting {
    pub fn new(inner: Arc<dyn Reporter>) -> Arc<Counting> {
        Arc::new(Counting { inner, pushed: AtomicU64::new(0), pulled: AtomicU64::new(0) })
    }
}

impl Reporter for Counting {
    fn on_build_start(&self, image: &str, steps: usize) {
        self.inner.on_build_start(image, steps)
    }
    fn on_step_start(&self, step: &StepInfo) {
        self.inner.on_step_start(step)
    }
    fn on_cache_hit(&self, step: &StepInfo, key: &Digest) {
        self.inner.on_cache_hit(step, key)
    }
    fn on_layer_written(&self, step: &StepInfo, layer: &LayerBlob) {
        self.inner.on_layer_written(step, layer)
    }
    fn on_step_output(&self, step: &StepInfo, line: &str) {
        self.inner.on_step_output(step, line)
    }
    fn on_step_finish(&self, step: &StepInfo, cached: bool, elapsed: Duration) {
        self.inner.on_step_finish(step, cached, elapsed)
    }
    fn on_output_written(&self, output: &str) {
        self.inner.on_output_written(output)
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        self.inner.on_build_finish(manifest, elapsed)
    }
    fn on_notice(&self, message: &str) {
        self.inner.on_notice(message)
    }
    fn on_step_failed(&self, step: &StepInfo, elapsed: Duration) {
        self.inner.on_step_failed(step, elapsed)
    }
    fn meter(&self, label: &str, total: Option<u64>) -> Box<dyn kiln_builder::Meter> {
        self.inner.meter(label, total)
    }
    fn on_blob(&self, verb: &str, digest: &Digest, repository: &str, bytes: u64) {
        match verb {
            "pushed" => self.pushed.fetch_add(bytes, Ordering::Relaxed),
            "pulled" => self.pulled.fetch_add(bytes, Ordering::Relaxed),
            _ => 0, // mounted: nothing crossed the network
        };
        self.inner.on_blob(verb, digest, repository, bytes)
    }
}

/// Refused before the build: anything but a new or regular file (the
/// document replaces it whole, so a device, a fifo or a symlink would be
/// replaced, not written) in a folder kiln can write.
pub fn check(path: &Path) -> Result<(), BuildError> {
    let parent = folder(path);
    let hint =
        Some("name a new or regular file in a folder you can write, e.g. `--metadata-file build.json`");
    if std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file()) {
        return Err(BuildError::usage(
            format!("--metadata-file `{}` exists and is not a regular file", path.display()),
            hint,
        ));
    }
    let probe = parent.join(format!(".kiln-metadata-{}", std::process::id()));
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(BuildError::usage(
            format!("--metadata-file `{}` cannot be written in `{}`: {e}", path.display(), parent.display()),
            hint,
        )),
    }
}

fn folder(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The document, for a build that succeeded.
pub fn document(name: &str, outcome: &BuildOutcome, counts: &Counting) -> serde_json::Value {
    let manifest = outcome.image.manifest.to_string();
    let outputs: Vec<_> = outcome
        .outputs
        .iter()
        .map(|o| {
            let reference = o.to_string();
            let kind = reference.split(':').next().unwrap_or_default().to_string();
            json!({ "kind": kind, "reference": reference, "digest": manifest })
        })
        .collect();
    let steps: Vec<_> = outcome
        .steps
        .iter()
        .map(|s| {
            let (seconds, layer) = match s.built {
                Some((t, digest, size)) => {
                    (json!(t.as_secs_f64()), json!({ "digest": digest.to_string(), "size": size }))
                }
                None => (json!(null), json!(null)),
            };
            json!({
                "stage": s.info.stage, "step": s.info.index + 1, "line": s.info.line,
                "description": s.info.description, "key": s.key.to_string(),
                "cache": if s.hit { "HIT" } else { "MISS" }, "seconds": seconds, "layer": layer,
            })
        })
        .collect();
    json!({
        "image": name,
        "manifest_digest": manifest,
        "config_digest": outcome.image.config.to_string(),
        "outputs": outputs,
        "steps": steps,
        "bytes_pushed": counts.pushed.load(Ordering::Relaxed),
        "bytes_pulled": counts.pulled.load(Ordering::Relaxed),
    })
}

/// Written whole or not at all (a temp file renamed over it).
pub fn write(path: &Path, doc: &serde_json::Value) -> Result<(), BuildError> {
    let parent = folder(path);
    let mut bytes = serde_json::to_vec_pretty(doc).expect("json");
    bytes.push(b'\n');
    kiln_cache::store::write_atomic_in(parent, path, &bytes).map_err(BuildError::io_write(path))
}
