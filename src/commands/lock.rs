//! `kiln lock`: pins the recipe's tagged `registry:` bases and resolves its
//! `[packages]` into kiln.lock.

use std::io::Write;
use std::path::Path;

use kiln_builder::packages::LockMode;
use kiln_builder::BuildError;

use super::common::{load, parse_platform};
use crate::args::RecipeArgs;

pub(super) fn run(
    recipe: &Path,
    args: &RecipeArgs,
    mode: LockMode,
    platform: Option<String>,
    insecure: Vec<String>,
) -> Result<u8, BuildError> {
    let recipe = load(recipe, args)?;
    let platform = parse_platform(platform.as_deref())?;
    let started = std::time::Instant::now();
    let tagged = kiln_builder::base::tagged_bases(&recipe)?;
    let has_packages = !kiln_builder::packages::all(&recipe).is_empty();
    let lock_path = kiln_builder::packages::lockfile::Lockfile::path_for(&recipe.dir);
    let existed = lock_path.exists();
    if tagged.is_empty() && !has_packages {
        eprintln!(
            "kiln lock: nothing to lock: {} has no [packages] and no tagged `registry:` base; kiln.lock is not needed",
            recipe.file.display()
        );
        return Ok(0);
    }
    if !tagged.is_empty() && mode != LockMode::Check {
        let opts = kiln_builder::registry::client::RegistryOptions { insecure, monolithic: false };
        let (pins, changed) = kiln_builder::lock::bases(&recipe, &opts)?;
        let mut out = std::io::stdout().lock();
        for p in &pins {
            let _ = writeln!(out, "{}\t{}", p.reference, p.digest);
        }
        let state = match (changed, existed) {
            (false, _) => "up to date",
            (true, false) => "written to a new kiln.lock",
            (true, true) => "updated",
        };
        eprintln!("kiln lock: {} base pin(s) in {}: {state}", pins.len(), lock_path.display());
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
            if s.ends_with("-security") {
                eprintln!(
                    "kiln lock: {what}: WARNING: the suite `{s}` is not in the archive (or no mirror for it is known): skipped, so no security updates are locked; list it in `suites` with its `mirror`"
                );
            } else {
                eprintln!("kiln lock: {what}: the suite `{s}` is not in the archive; skipped");
            }
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
        // The recipe's own mistake (no lock, or one for another request) is
        // bad input, as for `kiln build` (exit 2); newer packages in the
        // archives are exit 1, so a job tells the two apart.
        if !o.stale.is_empty() {
            return Err(BuildError::usage(
                format!(
                    "kiln lock --check: {} does not answer the recipe: {}",
                    o.path.display(),
                    o.stale.join("; ")
                ),
                Some(&format!("run `kiln lock {}` and commit kiln.lock", recipe.file.display())),
            ));
        }
        let newer: usize = o.sets.iter().map(|s| s.updates.len()).sum();
        if newer == 0 {
            eprintln!("kiln lock --check: {} is current with the archives ({took:.1}s)", o.path.display());
            return Ok(0);
        }
        eprintln!(
            "kiln lock --check: {} is behind the archives: {newer} package(s) have newer versions ({took:.1}s); run `kiln lock --update {}`",
            o.path.display(),
            recipe.file.display()
        );
        return Ok(1);
    }
    let state = match (o.written, existed) {
        (false, _) => "up to date, nothing changed",
        (true, false) => "created",
        (true, true) => "updated",
    };
    eprintln!("kiln lock: {} {state} ({took:.1}s)", o.path.display());
    Ok(0)
}
