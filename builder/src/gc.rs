//! `kiln cache prune` and `kiln cache gc`: the store's own eviction and
//! collection (`kiln_cache::prune`), then what only the executor can remove:
//! layers unpacked for rootless runs (their files belong to subordinate
//! ids) and secret folders a killed kiln left.

use kiln_cache::{PruneReport, Store};

use crate::exec;
use crate::BuildError;

/// Evicts least-recently-used records until the blobs take at most
/// `max_bytes`; `report` gets the store's report before the rootless cleanup.
pub fn prune(
    store: &Store,
    max_bytes: u64,
    waiting: &dyn Fn(),
    report: &mut dyn FnMut(&PruneReport),
) -> Result<(), BuildError> {
    report(&store.prune(max_bytes, waiting)?);
    exec::local::remove_rootless_garbage(store, waiting)
}

/// Removes what no record needs; `report` gets the store's report before
/// the rootless cleanup. Returns how many leftover secret folders it removed.
pub fn gc(
    store: &Store,
    waiting: &dyn Fn(),
    report: &mut dyn FnMut(&PruneReport),
) -> Result<usize, BuildError> {
    report(&store.gc(waiting)?);
    exec::local::remove_rootless_garbage(store, waiting)?;
    Ok(exec::sweep_secret_folders())
}

/// `kiln cache prune --remote registry:REF --older-than AGE`: compacts the
/// remote step cache at REF, keeping the steps a build used within
/// `older_than` seconds (see [`crate::registry::prune_cache`]).
pub fn prune_remote(
    store: &kiln_cache::Store,
    reference: &str,
    older_than: u64,
    insecure: Vec<String>,
) -> Result<crate::registry::RemotePruneReport, crate::BuildError> {
    let text = reference.strip_prefix("registry:").ok_or_else(|| {
        crate::BuildError::usage(
            format!("`{}` is not a remote cache", crate::shown(reference)),
            Some("write it as given to `--cache-to`: registry:HOST/REPO[:TAG]"),
        )
    })?;
    let r = crate::registry::cache_ref(text)?;
    let rt = crate::runtime::runtime()?;
    let opts = crate::registry::client::RegistryOptions { insecure, monolithic: false };
    let reg = crate::registry::client::Registry::new(rt.handle().clone(), std::slice::from_ref(&r), &opts);
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    crate::registry::prune_cache(store, &reg, &r, older_than, now)
}
