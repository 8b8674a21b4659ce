//! `kiln lock`: pins the recipe's tagged `registry:` bases and resolves its
//! `[packages]` into kiln.lock.

use std::io::Write;
use std::path::Path;

use kiln_builder::packages::LockMode;
use kiln_builder::BuildError;

use super::common::{load, parse_platform};

pub(super) fn run(
    recipe: &Path,
    mode: LockMode,
    platform: Option<String>,
    insecure: Vec<String>,
) -> Result<u8, BuildError> {
    let recipe = load(recipe)?;
    let platform = parse_platform(platform.as_deref())?;
    let started = std::time::Instant::now();
    let tagged = kiln_builder::base::tagged_bases(&recipe)?;
    let has_packages = !kiln_builder::packages::all(&recipe).is_empty();
    if !tagged.is_empty() && mode != LockMode::Check {
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
    let o = kiln_builder::lock::packages(&recipe, platform, mode)?;
    let mut out = std::io::stdout().lock();
    for set in &o.sets {
        let what = match &set.stage {
            None => "the image".to_string(),
            Some(s) => format!("stage `{s}`"),
        };
        let bytes: u64 = set.lock.packages.iter().map(|p| p.size).sum();
        let suites: Vec<&str> = set.lock.sources.iter().map(|s| s.suite.as_str()).collect();
        let how = if set.index_packages == 0 {
            "kept; `--update` takes newer versions".to_string()
        } else {
            format!("resolved from {} packages of {}", set.index_packages, suites.join(", "))
        };
        eprintln!(
            "kiln lock: {what}: {} packages, {:.1} MB, for {} requested ({how})",
            set.lock.packages.len(),
            bytes as f64 / 1e6,
            set.lock.request.include.len(),
        );
        for s in &set.skipped {
            eprintln!("kiln lock: {what}: the suite `{s}` is not in the archive; skipped");
        }
        for u in &set.updates {
            eprintln!("kiln lock: {what}: {u}");
        }
        if mode != LockMode::Check {
            for p in &set.lock.packages {
                let _ = writeln!(out, "{}\t{}\t{}\t{}", p.name, p.version, p.architecture, p.suite);
            }
        }
    }
    let took = started.elapsed().as_secs_f64();
    if mode == LockMode::Check {
        for s in &o.stale {
            eprintln!("kiln lock --check: {s}");
        }
        let newer: usize = o.sets.iter().map(|s| s.updates.len()).sum();
        if o.stale.is_empty() && newer == 0 {
            eprintln!("kiln lock --check: {} is current with the archives ({took:.1}s)", o.path.display());
            return Ok(0);
        }
        eprintln!(
            "kiln lock --check: {} is out of date: {} package(s) differ from the archives{} ({took:.1}s); run `kiln lock --update {}`",
            o.path.display(),
            newer,
            if o.stale.is_empty() { "" } else { ", and it does not answer the recipe" },
            recipe.file.display()
        );
        return Ok(1);
    }
    let verb = if o.written { "wrote" } else { "is up to date:" };
    eprintln!("kiln lock: {verb} {} ({took:.1}s)", o.path.display());
    Ok(0)
}
