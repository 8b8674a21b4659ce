//! `kiln diff`: the files two images differ in; exit 1 when they differ.

use std::io::Write;
use std::path::PathBuf;

use kiln_builder::BuildError;

use super::common::{open_store, parse_ref};

pub(super) fn run(a: &str, b: &str, cache_dir: Option<PathBuf>, json: bool) -> Result<u8, BuildError> {
    let store = open_store(cache_dir)?;
    let changes =
        kiln_builder::diff::diff(&store, &parse_ref(a, "first image")?, &parse_ref(b, "second image")?)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&changes).expect("json"));
    } else {
        print_changes(&mut out, &changes);
    }
    Ok(if changes.is_empty() { 0 } else { 1 })
}

/// One change a line; a path's control characters (a newline, a terminal
/// escape: names in a layer are the layer author's) are shown escaped.
pub(super) fn print_changes(out: &mut impl Write, changes: &[kiln_builder::diff::Change]) {
    use kiln_builder::diff::Change;
    let shown = |p: &str| -> String {
        p.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
    };
    for c in changes {
        let _ = match c {
            Change::Added { path } => writeln!(out, "+ {}", shown(path)),
            Change::Removed { path } => writeln!(out, "- {}", shown(path)),
            Change::Modified { path, what } => writeln!(out, "M {}  ({})", shown(path), what.join(", ")),
        };
    }
}
