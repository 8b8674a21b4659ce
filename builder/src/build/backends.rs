//! The engines a build may talk to, connected on first use: the Docker
//! engine (for `docker:` bases and outputs, and the docker backend) and the
//! executor `run` steps go to. A build that needs neither touches neither.

use std::sync::{Arc, OnceLock};

use crate::error::BuildError;
use crate::exec::docker::DockerEngine;
use crate::exec::{self, BackendChoice, Executor};

/// A connection attempt's outcome, kept so that every caller sees the same
/// error (`BuildError` is not `Clone`).
type Kept<T> = OnceLock<Result<T, (String, String)>>;

pub(super) struct Backends {
    choice: BackendChoice,
    rt: tokio::runtime::Handle,
    docker: Kept<Arc<DockerEngine>>,
    executor: Kept<Arc<dyn Executor>>,
}

impl Backends {
    /// `given` replaces the executor `choice` names (tests use a fake).
    pub(super) fn new(
        choice: BackendChoice,
        given: Option<Arc<dyn Executor>>,
        rt: tokio::runtime::Handle,
    ) -> Backends {
        Backends {
            choice,
            rt,
            docker: OnceLock::new(),
            executor: match given {
                Some(e) => OnceLock::from(Ok(e)),
                None => OnceLock::new(),
            },
        }
    }

    pub(super) fn docker(&self) -> Result<Arc<DockerEngine>, BuildError> {
        kept(&self.docker, || DockerEngine::connect(self.rt.clone()).map(Arc::new))
    }

    /// The executor for `run` steps: as asked, or for `auto` local where it works, else Docker.
    pub(super) fn executor(&self) -> Result<Arc<dyn Executor>, BuildError> {
        kept(&self.executor, || {
            let e = exec::choose(self.choice, &|| self.docker())?;
            tracing::info!(backend = %e.name(), "run steps go to the {} backend", e.name());
            Ok(e)
        })
    }
}

fn kept<T: Clone>(slot: &Kept<T>, connect: impl FnOnce() -> Result<T, BuildError>) -> Result<T, BuildError> {
    slot.get_or_init(|| {
        connect().map_err(|e| match e {
            BuildError::Environment { message, hint } => (message, hint),
            e => (e.to_string(), String::new()),
        })
    })
    .clone()
    .map_err(|(message, hint)| BuildError::Environment { message, hint })
}
