//! How the engine tells the world what it is doing. The library never prints;
//! the CLI implements this trait with progress bars, plain lines or JSON.

use std::time::Duration;

use kiln_cache::Digest;

use crate::layer::LayerBlob;

/// A step as reporters see it.
#[derive(Debug, Clone)]
pub struct StepInfo {
    /// 0-based.
    pub index: usize,
    pub total: usize,
    /// e.g. `COPY src -> /app/src`.
    pub description: String,
    /// 1-based line of the step in the recipe.
    pub line: usize,
    /// The `[[stage]]` it belongs to; `None` for the final image.
    pub stage: Option<String>,
}

pub trait Reporter: Send + Sync {
    fn on_build_start(&self, _image: &str, _steps: usize) {}
    fn on_step_start(&self, _step: &StepInfo) {}
    fn on_cache_hit(&self, _step: &StepInfo, _key: &Digest) {}
    fn on_layer_written(&self, _step: &StepInfo, _layer: &LayerBlob) {}
    /// A line a `run` step's command printed (secrets already redacted).
    fn on_step_output(&self, _step: &StepInfo, _line: &str) {}
    fn on_step_finish(&self, _step: &StepInfo, _cached: bool, _elapsed: Duration) {}
    fn on_output_written(&self, _output: &str) {}
    fn on_build_finish(&self, _manifest: &Digest, _elapsed: Duration) {}
    /// Something worth a line that is not a step event (e.g. a corrupt blob rebuilt).
    fn on_notice(&self, _message: &str) {}
    /// A blob moved to or from a registry (`verb` is `pulled`, `pushed` or
    /// `mounted`); `bytes` is what crossed the network.
    fn on_blob(&self, _verb: &str, _digest: &Digest, _repository: &str, _bytes: u64) {}
    /// A step failed after `elapsed`; the error itself comes back to the caller.
    fn on_step_failed(&self, _step: &StepInfo, _elapsed: Duration) {}
    /// A long task starts: a download or an upload of `total` bytes, or a
    /// phase of unknown length (`total` is `None`: making a disk image, waiting
    /// for a layer's compression). The meter it returns is told how far it got.
    fn meter(&self, _label: &str, _total: Option<u64>) -> Box<dyn Meter> {
        Box::new(NullMeter)
    }
}

/// How far a long task got (see [`Reporter::meter`]). Shared by the
/// downloads of one task, which run at once.
pub trait Meter: Send + Sync {
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The task ended (done or not); dropping the meter ends it too.
    fn finish(&self) {}
}

/// Measures nothing.
pub struct NullMeter;

impl Meter for NullMeter {
    fn advance(&self, _bytes: u64) {}
}

/// Reports nothing.
pub struct NullReporter;

impl Reporter for NullReporter {}
