//! `kiln cache prune` and `kiln cache gc`: the store's own eviction and
//! collection (`kiln_cache::prune`), then what only the executor can remove:
//! layers unpacked for rootless runs (their files belong to subordinate
//! ids) and secret folders a killed kiln left.

use kiln_cache::{PruneReport, Store};

use crate::exec;
use crate::BuildError;

/// Evicts least-recently-used records until the blobs take at most `max_bytes`.
pub fn prune(store: &Store, max_bytes: u64, waiting: &dyn Fn()) -> Result<PruneReport, BuildError> {
    let report = store.prune(max_bytes, waiting)?;
    exec::local::remove_rootless_garbage(store, waiting)?;
    Ok(report)
}

/// Removes what no record needs; returns the report and how many leftover
/// secret folders were removed.
pub fn gc(store: &Store, waiting: &dyn Fn()) -> Result<(PruneReport, usize), BuildError> {
    let report = store.gc(waiting)?;
    exec::local::remove_rootless_garbage(store, waiting)?;
    Ok((report, exec::sweep_secret_folders()))
}
