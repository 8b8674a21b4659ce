//! `kiln lock`: pins the recipe's tagged `registry:` bases and resolves its
//! `[packages]` into kiln.lock.

use std::io::Write;
use std::path::Path;

use kiln_builder::BuildError;

use super::common::{load, parse_platform};

pub(super) fn run(recipe: &Path, platform: Option<String>, insecure: Vec<String>) -> Result<u8, BuildError> {
    let recipe = load(recipe)?;
    let platform = parse_platform(platform.as_deref())?;
    let started = std::time::Instant::now();
    let tagged = kiln_builder::base::tagged_bases(&recipe)?;
    let has_packages = kiln_builder::packages::of(&recipe).is_some();
    if !tagged.is_empty() {
        let opts = kiln_builder::registry::client::RegistryOptions { insecure, monolithic: false };
        let (pins, changed) = kiln_builder::lock::bases(&recipe, &opts)?;
        let mut out = std::io::stdout().lock();
        for p in &pins {
            let _ = writeln!(out, "{}\t{}", p.reference, p.digest);
        }
        eprintln!(
            "kiln lock: {} {} base pin(s) in {}",
            if changed { "wrote" } else { "up to date:" },
            pins.len(),
            kiln_builder::packages::lockfile::Lockfile::path_for(&recipe.dir).display()
        );
        if !has_packages {
            return Ok(0);
        }
    }
    let o = kiln_builder::lock::packages(&recipe, platform)?;
    let verb = if o.changed { "wrote" } else { "is up to date:" };
    let bytes: u64 = o.lock.packages.iter().map(|p| p.size).sum();
    eprintln!(
        "kiln lock: {verb} {} ({} packages, {:.1} MB, for {} requested, out of {} in the index of {} {}; {:.1}s)",
        o.path.display(),
        o.lock.packages.len(),
        bytes as f64 / 1e6,
        o.lock.request.include.len(),
        o.index_packages,
        o.lock.source.mirror,
        o.lock.request.suite,
        started.elapsed().as_secs_f64()
    );
    let mut out = std::io::stdout().lock();
    for p in &o.lock.packages {
        let _ = writeln!(out, "{}\t{}\t{}", p.name, p.version, p.architecture);
    }
    Ok(0)
}
