//! kiln's engine: compiles a validated recipe into an image in the
//! content-addressed store, and exports it.
//!
//! - [`build`]: the plan (one cache key per step) and the build itself.
//! - [`base`] / [`import`]: where an image starts; reading OCI layouts and
//!   archives into the store, refusing hostile input.
//! - [`context`]: copy sources inside the context, hashed through the stat index.
//! - [`layer`], [`tarball`], [`gzip`]: reproducible layer writing.
//! - [`listing`], [`fstree`]: what files a layer / a stack of layers holds,
//!   stored sorted on disk and read by lookups and merges (never held whole).
//! - [`image`]: OCI config and manifest, canonical JSON; `passwd`: an
//!   image's users and groups.
//! - [`export`]: OCI layout, oci-archive and docker-archive outputs.
//! - [`inspect`], [`diff`]: reading images back.
//! - [`exec`]: the backends for `run` steps (local sandbox, Docker engine);
//!   [`changes`]: what a command changed, normalized into a layer.
//! - [`extract`]: files out of another stage's image (`copy ... from`).
//! - [`rootdir`]: the one resolver for paths inside an image root on the
//!   host (unpack, flatten): never through a symlink.
//! - [`packages`]: `[packages]`: Debian packages locked in kiln.lock and
//!   installed into one layer.
//! - [`vm`]: `-o vm:FILE`, the image as a bootable, reproducible VM disk.
//! - [`registry`]: `registry:` bases and outputs, the remote step cache.
//! - [`reporter`]: the trait the CLI implements to show progress; `runtime`:
//!   the async runtime registry and engine calls run on.
//! - [`error`]: [`BuildError`] with exit codes and hints.

pub mod base;
pub mod build;
pub mod changes;
pub mod context;
pub mod diff;
pub mod error;
pub mod exec;
pub mod export;
pub mod extract;
pub mod fstree;
pub mod gzip;
pub mod image;
pub mod import;
pub mod inspect;
pub mod layer;
pub mod listing;
pub mod packages;
mod passwd;
pub mod registry;
pub mod reporter;
pub mod rootdir;
mod runtime;
pub mod tarball;
pub mod unpack;
pub mod vm;

pub use build::{build, plan, BuildOptions, BuildOutcome, PlannedStep};
pub use error::BuildError;
pub use exec::BackendChoice;
pub use reporter::{NullReporter, Reporter, StepInfo};
