//! `kiln build`: the recipe into the store, then every output.

use std::sync::Arc;

use kiln_builder::BuildError;
use kiln_recipes::ImageRef;

use super::common::{apply_stamps, load, options, parse_cache_ref, parse_ref, parse_secret};
use crate::args::{BuildArgs, Progress};

pub(super) fn run(a: BuildArgs) -> Result<u8, BuildError> {
    if a.progress != Progress::Json {
        let reporter = crate::progress::reporter(a.progress);
        return build(a, reporter);
    }
    // JSON lines to the end: a failure is the `build_failed` event, not text.
    let json = Arc::new(crate::progress::JsonReporter::default());
    match build(a, json.clone()) {
        Err(e) => {
            json.build_failed(&e);
            Ok(e.exit_code() as u8)
        }
        done => done,
    }
}

fn build(a: BuildArgs, reporter: Arc<dyn kiln_builder::Reporter>) -> Result<u8, BuildError> {
    let mut recipe = load(&a.recipe, &a.common.args)?;
    apply_stamps(&mut recipe, &a.stamps)?;
    let mut opts = options(&a.common)?;
    opts.cache_to = a.cache_to.iter().map(|c| parse_cache_ref(c, "--cache-to")).collect::<Result<_, _>>()?;
    opts.registry.monolithic = a.monolithic_upload;
    opts.no_cache = a.no_cache;
    if a.cache_mounts && opts.cache_to.is_empty() && opts.cache_from.is_empty() {
        return Err(BuildError::usage(
            "`--cache-mounts` carries cache mounts through a registry cache, and none is given".to_string(),
            Some("add `--cache-to registry:HOST/REPO` and/or `--cache-from registry:HOST/REPO`"),
        ));
    }
    opts.cache_mounts = a.cache_mounts;
    opts.backend = a.backend.choice();
    opts.secrets = a.secrets.iter().map(|s| parse_secret(s)).collect::<Result<_, _>>()?;
    opts.outputs = a.outputs.iter().map(|o| parse_ref(o, "-o")).collect::<Result<_, _>>()?;
    for o in &opts.outputs {
        if let ImageRef::Registry(r) = o {
            // Checked before building, not when the push comes.
            kiln_builder::registry::remote(r).map_err(|e| {
                BuildError::usage(
                    format!("Bad -o `{o}`: {e}"),
                    Some("e.g. `-o registry:ghcr.io/org/app:1.0`"),
                )
            })?;
        }
    }
    if let Some(f) = &a.metadata_file {
        crate::metadata::check(f)?;
    }
    let reporter = crate::metadata::Counting::new(reporter);
    let outcome = kiln_builder::build(&recipe, &opts, reporter.clone())?;
    if let Some(f) = &a.metadata_file {
        let doc = crate::metadata::document(&recipe.image.name, &outcome, &reporter);
        crate::metadata::write(f, &doc)?;
    }
    println!("{}", outcome.image.manifest);
    Ok(0)
}
