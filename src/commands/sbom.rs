//! `kiln sbom`: the SPDX document of an image, on stdout.

use std::io::Write;
use std::path::PathBuf;

use kiln_builder::BuildError;

use super::common::{open_store, parse_ref};

pub(super) fn run(target: &str, cache_dir: Option<PathBuf>) -> Result<u8, BuildError> {
    let store = open_store(cache_dir)?;
    let target = parse_ref(target, "image")?;
    let doc = kiln_builder::sbom::for_image(&store, &target)?;
    let _ = std::io::stdout().lock().write_all(&doc);
    Ok(0)
}
