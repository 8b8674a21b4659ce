//! The async runtime every network and engine call of a command runs on
//! (registries, the Docker engine); a leaf, so the modules that need one
//! do not depend on the build.

use crate::error::BuildError;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, BuildError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kiln")
        .enable_all()
        .build()
        .map_err(|e| BuildError::Environment {
            message: format!("Cannot start kiln's worker threads: {e}"),
            hint: "check the process and memory limits".into(),
        })
}
