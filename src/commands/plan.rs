//! `kiln plan`: every step's key and whether the cache has it; builds nothing.

use std::io::Write;
use std::path::Path;

use kiln_builder::BuildError;

use super::common::{load, options};
use crate::args::Common;

pub(super) fn run(recipe: &Path, common: &Common, json: bool) -> Result<u8, BuildError> {
    let recipe = load(recipe, &common.args)?;
    let opts = options(common)?;
    let steps = kiln_builder::plan(&recipe, &opts)?;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = steps
            .iter()
            .map(|s| {
                serde_json::json!({"stage": s.info.stage, "step": s.info.index + 1, "line": s.info.line,
                "description": s.info.description, "key": s.key.to_string(), "cached": s.hit})
            })
            .collect();
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v).expect("json"));
    } else {
        // The arguments as resolved: what `${NAME}` became in the steps below.
        for a in &recipe.args {
            let _ = writeln!(out, "arg  {}={}  ({})", a.name, a.value.escape_debug(), a.origin);
        }
        let place = |s: &kiln_builder::PlannedStep| match &s.info.stage {
            Some(st) => format!("{st} {}", s.info.index + 1),
            None => format!("{}", s.info.index + 1),
        };
        // One column width for every stage name's length.
        let width = steps.iter().map(|s| place(s).chars().count()).max().unwrap_or(0).max(3);
        for s in &steps {
            let hit = if s.hit { "HIT " } else { "MISS" };
            let _ = writeln!(out, "{:>width$}  {hit}  {}  {}", place(s), s.key, s.info.description);
        }
    }
    Ok(0)
}
