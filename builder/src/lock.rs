//! `kiln lock`: pins what a recipe takes from outside, into kiln.lock: the
//! digests its tagged `registry:` bases name now, and its `[packages]`
//! resolved against a Debian mirror.

use crate::registry::client::{Registry, RegistryError, RegistryOptions, Remote};
use kiln_recipes::recipe::Platform;
use kiln_recipes::Recipe;

use crate::base::tagged_bases;
use crate::packages::lockfile::{BasePin, Lockfile};
use crate::packages::{LockMode, LockOutcome};
use crate::BuildError;

/// `kiln lock` for bases: resolves every tagged `registry:` base of the
/// recipe to the digest its tag names now and writes the pins into
/// kiln.lock. Returns the pins and whether the file changed.
pub fn bases(recipe: &Recipe, opts: &RegistryOptions) -> Result<(Vec<BasePin>, bool), BuildError> {
    let tagged: Vec<(String, Remote)> = tagged_bases(recipe)?;
    let rt = crate::runtime::runtime()?;
    let remotes: Vec<Remote> = tagged.iter().map(|(_, r)| r.clone()).collect();
    let reg = Registry::new(rt.handle().clone(), &remotes, opts);
    let mut pins = Vec::new();
    for (name, r) in &tagged {
        let m = reg.manifest(r)?.ok_or_else(|| RegistryError::NotFound { reference: r.to_string() })?;
        pins.push(BasePin { reference: name.clone(), digest: m.digest.to_string() });
    }
    pins.sort_by(|a, b| a.reference.cmp(&b.reference));
    pins.dedup();
    let changed = crate::packages::lockfile::save_pins(&Lockfile::path_for(&recipe.dir), pins.clone())?;
    Ok((pins, changed))
}

/// `kiln lock` for `[packages]` (the image's and each stage's): resolves
/// them and writes kiln.lock, as `mode` says.
pub fn packages(
    recipe: &Recipe,
    platform: Option<Platform>,
    mode: LockMode,
) -> Result<LockOutcome, BuildError> {
    let rt = crate::runtime::runtime()?;
    crate::packages::lock(rt.handle(), recipe, platform, mode)
}
