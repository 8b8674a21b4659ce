//! Reporters: the CLI's side of the engine's `Reporter` trait.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use kiln_builder::LayerBlob;
use kiln_builder::{Reporter, StepInfo};
use kiln_cache::Digest;

use crate::args::Progress;

pub fn reporter(mode: Progress) -> Arc<dyn Reporter> {
    match mode {
        Progress::Json => Arc::new(JsonReporter),
        Progress::Plain => Arc::new(PlainReporter),
        Progress::Auto if std::io::stderr().is_terminal() => Arc::new(TtyReporter::default()),
        Progress::Auto => Arc::new(PlainReporter),
    }
}

/// `[2/5]`, or `[build 2/5]` for a step of the stage `build`.
fn place(s: &StepInfo) -> String {
    match &s.stage {
        Some(st) => format!("[{st} {}/{}]", s.index + 1, s.total),
        None => format!("[{}/{}]", s.index + 1, s.total),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

/// One line per event, for logs and CI.
pub struct PlainReporter;

impl Reporter for PlainReporter {
    fn on_step_start(&self, s: &StepInfo) {
        eprintln!("{} {}", place(s), s.description);
    }
    fn on_step_output(&self, s: &StepInfo, line: &str) {
        eprintln!("{} | {line}", place(s));
    }
    fn on_step_finish(&self, s: &StepInfo, cached: bool, elapsed: Duration) {
        let what = if cached { "CACHED" } else { "DONE" };
        eprintln!("{} {what} {}", place(s), secs(elapsed));
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
    fn on_blob(&self, verb: &str, digest: &Digest, repository: &str, bytes: u64) {
        eprintln!("{}", blob_line(verb, digest, repository, bytes));
    }
}

fn blob_line(verb: &str, digest: &Digest, repository: &str, bytes: u64) -> String {
    let dir = if verb == "pulled" { "from" } else { "to" };
    let size = if bytes >= 1_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} kB", bytes as f64 / 1e3)
    };
    format!("{verb} {digest} ({size}) {dir} {repository}")
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
        self.emit(json!({"event": "step_started", "stage": s.stage, "step": s.index + 1, "description": s.description, "line": s.line}));
    }
    fn on_cache_hit(&self, s: &StepInfo, key: &Digest) {
        self.emit(
            json!({"event": "cache_hit", "stage": s.stage, "step": s.index + 1, "key": key.to_string()}),
        );
    }
    fn on_layer_written(&self, s: &StepInfo, l: &LayerBlob) {
        self.emit(json!({"event": "layer_written", "stage": s.stage, "step": s.index + 1, "digest": l.digest.to_string(),
            "diff_id": l.diff_id.to_string(), "size": l.size}));
    }
    fn on_step_output(&self, s: &StepInfo, line: &str) {
        self.emit(json!({"event": "output", "stage": s.stage, "step": s.index + 1, "line": line}));
    }
    fn on_step_finish(&self, s: &StepInfo, cached: bool, elapsed: Duration) {
        self.emit(json!({"event": "step_finished", "stage": s.stage, "step": s.index + 1, "cached": cached, "duration_ms": elapsed.as_secs_f64() * 1000.0}));
    }
    fn on_output_written(&self, output: &str) {
        self.emit(json!({"event": "output_written", "output": output}));
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        self.emit(json!({"event": "build_finished", "manifest": manifest.to_string(), "duration_ms": elapsed.as_secs_f64() * 1000.0}));
    }
    fn on_blob(&self, verb: &str, digest: &Digest, repository: &str, bytes: u64) {
        self.emit(json!({"event": "blob", "action": verb, "digest": digest.to_string(), "repository": repository, "bytes": bytes}));
    }
    fn on_notice(&self, message: &str) {
        self.emit(json!({"event": "notice", "message": message}));
    }
}

/// A spinner per running step (several when stages build in parallel);
/// finished steps and everything else as the plain lines.
#[derive(Default)]
pub struct TtyReporter {
    bars: MultiProgress,
    running: Mutex<HashMap<(Option<String>, usize), ProgressBar>>,
}

impl TtyReporter {
    fn println(&self, line: &str) {
        if self.bars.println(line).is_err() {
            eprintln!("{line}");
        }
    }
}

impl Reporter for TtyReporter {
    fn on_step_start(&self, s: &StepInfo) {
        let bar = self.bars.add(ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed}").expect("template"));
        bar.set_prefix(place(s));
        bar.set_message(s.description.clone());
        bar.enable_steady_tick(Duration::from_millis(100));
        self.running.lock().expect("bars").insert((s.stage.clone(), s.index), bar);
    }
    fn on_step_output(&self, s: &StepInfo, line: &str) {
        self.println(&format!("{} | {line}", place(s)));
    }
    fn on_step_finish(&self, s: &StepInfo, cached: bool, elapsed: Duration) {
        if let Some(bar) = self.running.lock().expect("bars").remove(&(s.stage.clone(), s.index)) {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
        let what = if cached { "CACHED" } else { "DONE  " };
        self.println(&format!("{} {what} {} ({})", place(s), s.description, secs(elapsed)));
    }
    fn on_output_written(&self, output: &str) {
        self.println(&format!("wrote {output}"));
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        self.println(&format!("built {manifest} in {}", secs(elapsed)));
    }
    fn on_blob(&self, verb: &str, digest: &Digest, repository: &str, bytes: u64) {
        self.println(&blob_line(verb, digest, repository, bytes));
    }
    fn on_notice(&self, message: &str) {
        self.println(&format!("note: {message}"));
    }
}
