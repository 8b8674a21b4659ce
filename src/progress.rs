//! Reporters: the CLI's side of the engine's `Reporter` trait.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};
use serde_json::json;

use kiln_builder::LayerBlob;
use kiln_builder::{Meter, Reporter, StepInfo};
use kiln_cache::Digest;

use crate::args::Progress;

pub fn reporter(mode: Progress) -> Arc<dyn Reporter> {
    match mode {
        Progress::Json => Arc::new(JsonReporter::default()),
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

/// Milliseconds with at most three decimals (`2.402`, not `2.4023809999999997`).
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1000.0
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
    fn on_step_failed(&self, s: &StepInfo, elapsed: Duration) {
        eprintln!("{} FAILED {}", place(s), secs(elapsed));
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

/// One JSON object per line on stderr (every event and its fields are in
/// the README's "Progress as JSON"); a build that fails ends with one
/// `build_failed` event and no other text.
#[derive(Default)]
pub struct JsonReporter {
    /// The step that failed, for the `build_failed` event.
    failed: Mutex<Option<serde_json::Value>>,
}

impl JsonReporter {
    fn emit(&self, mut v: serde_json::Value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        v["time"] = json!(now.as_secs_f64());
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{v}");
    }

    /// The last event of a failed command: its exit code, the failed step
    /// (when a step failed), the message and the hint.
    pub fn build_failed(&self, e: &kiln_builder::BuildError) {
        let (message, location) = failure_text(e);
        let step = self.failed.lock().expect("failed").take();
        self.emit(json!({"event": "build_failed", "exit_code": e.exit_code(), "step": step,
            "message": message, "location": location, "hint": e.hint()}));
    }
}

/// An error's message with its causes, and for a recipe error where in
/// the recipe (`FILE:LINE:COLUMN`).
fn failure_text(e: &kiln_builder::BuildError) -> (String, Option<String>) {
    if let kiln_builder::BuildError::Recipe(r) = e {
        return (r.to_string(), Some(r.location().to_string()));
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(&format!(": {s}"));
        source = s.source();
    }
    (message, None)
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
        self.emit(json!({"event": "step_finished", "stage": s.stage, "step": s.index + 1, "cached": cached, "duration_ms": ms(elapsed)}));
    }
    fn on_output_written(&self, output: &str) {
        self.emit(json!({"event": "output_written", "output": output}));
    }
    fn on_build_finish(&self, manifest: &Digest, elapsed: Duration) {
        self.emit(
            json!({"event": "build_finished", "manifest": manifest.to_string(), "duration_ms": ms(elapsed)}),
        );
    }
    fn on_blob(&self, verb: &str, digest: &Digest, repository: &str, bytes: u64) {
        self.emit(json!({"event": "blob", "action": verb, "digest": digest.to_string(), "repository": repository, "bytes": bytes}));
    }
    fn on_notice(&self, message: &str) {
        self.emit(json!({"event": "notice", "message": message}));
    }
    fn on_step_failed(&self, s: &StepInfo, elapsed: Duration) {
        let step =
            json!({"stage": s.stage, "step": s.index + 1, "description": s.description, "line": s.line});
        self.emit(json!({"event": "step_failed", "stage": s.stage, "step": s.index + 1,
            "duration_ms": ms(elapsed)}));
        *self.failed.lock().expect("failed") = Some(step);
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
    fn on_step_failed(&self, s: &StepInfo, elapsed: Duration) {
        if let Some(bar) = self.running.lock().expect("bars").remove(&(s.stage.clone(), s.index)) {
            bar.finish_and_clear();
            self.bars.remove(&bar);
        }
        self.println(&format!("{} FAILED {} ({})", place(s), s.description, secs(elapsed)));
    }
    fn meter(&self, label: &str, total: Option<u64>) -> Box<dyn Meter> {
        let bar = match total {
            Some(n) => {
                let bar = self.bars.add(ProgressBar::new(n));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} {msg} {bytes}/{total_bytes} {binary_bytes_per_sec} [{bar:30}] {eta}",
                    )
                    .expect("template")
                    .progress_chars("=> "),
                );
                bar
            }
            None => {
                let bar = self.bars.add(ProgressBar::new_spinner());
                bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("template"));
                bar
            }
        };
        bar.set_message(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(100));
        Box::new(BarMeter { bar, bars: self.bars.clone(), bytes: total.is_some() })
    }
}

/// A bar of the terminal display. A finished download leaves a line with
/// its bytes, time and rate; a finished phase goes away.
struct BarMeter {
    bar: ProgressBar,
    bars: MultiProgress,
    bytes: bool,
}

impl Meter for BarMeter {
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn finish(&self) {
        if self.bar.is_finished() {
            return;
        }
        let done = self.bar.position();
        self.bar.finish_and_clear();
        self.bars.remove(&self.bar);
        if self.bytes && done > 0 {
            // A line above the bars, which stay as many as tasks run.
            let secs = self.bar.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "  {} {}/{} in {secs:.1}s ({}/s)",
                self.bar.message(),
                HumanBytes(done),
                HumanBytes(self.bar.length().unwrap_or(done)),
                HumanBytes((done as f64 / secs) as u64)
            );
            if self.bars.println(&line).is_err() {
                eprintln!("{line}");
            }
        }
    }
}

impl Drop for BarMeter {
    fn drop(&mut self) {
        self.finish();
    }
}
