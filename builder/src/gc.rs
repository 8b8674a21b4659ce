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
