//! `kiln inspect`: an image's manifest, config, platform and layers.

use std::io::Write;
use std::path::PathBuf;

use kiln_builder::BuildError;

use super::common::{open_store, parse_ref};

pub(super) fn run(target: &str, cache_dir: Option<PathBuf>, json: bool) -> Result<u8, BuildError> {
    let store = open_store(cache_dir)?;
    let target = parse_ref(target, "image")?;
    let i = kiln_builder::inspect::inspect(&store, &target)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&i).expect("json"));
        return Ok(0);
    }
    let _ = writeln!(out, "manifest  {}", i.manifest);
    let _ = writeln!(out, "config    {}", i.config);
    let _ = writeln!(out, "platform  {}/{}", i.os, i.architecture);
    let _ = writeln!(out, "created   {}", i.created.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "layers    {}", i.layers.len());
    for l in &i.layers {
        let _ = writeln!(out, "  {}  {:>12}  {}", l.digest, l.size, l.created_by.as_deref().unwrap_or(""));
    }
    let _ = writeln!(out, "runtime   {}", i.config_json);
    if !i.annotations.is_empty() {
        // As JSON: the values are the image's, escaped for the terminal.
        let _ = writeln!(out, "annotations {}", serde_json::to_string(&i.annotations).expect("json"));
    }
    Ok(0)
}
