//! Reporters: the CLI's side of the engine's `Reporter` trait.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use kiln_builder::layer::LayerBlob;
use kiln_builder::{Reporter, StepInfo};
use kiln_cache::Digest;

use crate::args::Progress;

pub fn reporter(mode: Progress) -> Box<dyn Reporter> {
    match mode {
        Progress::Json => Box::new(JsonReporter),
        Progress::Plain => Box::new(PlainReporter),
        Progress::Auto if std::io::stderr().is_terminal() => Box::new(TtyReporter::default()),
        Progress::Auto => Box::new(PlainReporter),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// One line per event, for logs and CI.
pub struct PlainReporter;

impl Reporter for PlainReporter {
    fn on_step_start(&self, s: &StepInfo) {
        eprintln!("[{}/{}] {}", s.index + 1, s.total, s.description);
    }
    fn on_step_finish(&self, s: &StepInfo, cached: bool, elapsed: Duration) {
        let what = if cached { "CACHED" } else { "DONE" };
        eprintln!("[{}/{}] {what} {}", s.index + 1, s.total, secs(elapsed));
    }
    fn on_output_written(&self, output: &str) {
        eprintln!("wrote {output}");
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        eprintln!("built {manifest} in {}", secs(elapsed));
    }
    fn on_notice(&self, message: &str) {
        eprintln!("note: {message}");
    }
}

/// One JSON object per line on stderr.
pub struct JsonReporter;

impl JsonReporter {
    fn emit(&self, mut v: serde_json::Value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        v["time"] = json!(now.as_secs_f64());
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{v}");
    }
}

impl Reporter for JsonReporter {
    fn on_build_start(&self, image: &str, steps: usize) {
        self.emit(json!({"event": "build_started", "image": image, "steps": steps}));
    }
    fn on_step_start(&self, s: &StepInfo) {
        self.emit(json!({"event": "step_started", "step": s.index + 1, "description": s.description, "line": s.line}));
    }
    fn on_cache_hit(&self, s: &StepInfo, key: &Digest) {
        self.emit(json!({"event": "cache_hit", "step": s.index + 1, "key": key.to_string()}));
    }
    fn on_layer_written(&self, s: &StepInfo, l: &LayerBlob) {
        self.emit(json!({"event": "layer_written", "step": s.index + 1, "digest": l.digest.to_string(),
            "diff_id": l.diff_id.to_string(), "size": l.size}));
    }
    fn on_step_finish(&self, s: &StepInfo, cached: bool, elapsed: Duration) {
        self.emit(json!({"event": "step_finished", "step": s.index + 1, "cached": cached, "duration_ms": elapsed.as_secs_f64() * 1000.0}));
    }
    fn on_output_written(&self, output: &str) {
        self.emit(json!({"event": "output_written", "output": output}));
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        self.emit(json!({"event": "build_finished", "manifest": manifest.to_string(), "duration_ms": elapsed.as_secs_f64() * 1000.0}));
    }
    fn on_notice(&self, message: &str) {
        self.emit(json!({"event": "notice", "message": message}));
    }
}

/// A spinner for the running step; otherwise the plain lines.
#[derive(Default)]
pub struct TtyReporter {
    bar: Mutex<Option<ProgressBar>>,
}

impl Reporter for TtyReporter {
    fn on_step_start(&self, s: &StepInfo) {
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{prefix}] {msg} {elapsed}").expect("template"),
        );
        bar.set_prefix(format!("{}/{}", s.index + 1, s.total));
        bar.set_message(s.description.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
        *self.bar.lock().expect("bar") = Some(bar);
    }
    fn on_step_finish(&self, s: &StepInfo, cached: bool, elapsed: Duration) {
        if let Some(bar) = self.bar.lock().expect("bar").take() {
            bar.finish_and_clear();
        }
        let what = if cached { "CACHED" } else { "DONE  " };
        eprintln!("[{}/{}] {what} {} ({})", s.index + 1, s.total, s.description, secs(elapsed));
    }
    fn on_output_written(&self, output: &str) {
        PlainReporter.on_output_written(output)
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        PlainReporter.on_build_finish(manifest, elapsed)
    }
    fn on_notice(&self, message: &str) {
        if let Some(bar) = self.bar.lock().expect("bar").as_ref() {
            bar.suspend(|| PlainReporter.on_notice(message));
        } else {
            PlainReporter.on_notice(message);
        }
    }
}
