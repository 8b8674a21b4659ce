//! kiln's engine: compiles a validated recipe into an image in the
//! content-addressed store, and exports it. The image formats live in
//! `kiln-oci` (`builder/oci`); this crate orchestrates.
//!
//! - [`mod@build`]: the plan (one cache key per step) and the build itself.
//! - [`base`]: where an image starts: any image reference opened (layouts
//!   and archives through `kiln_oci::import`, `docker:`, `registry:`).
//! - `context`: copy sources inside the context, hashed through the stat index.
//! - [`inspect`], [`diff`]: reading images back.
//! - `exec` (the `kiln-exec` crate, `builder/exec`): where `run` steps
//!   execute ([`exec::Executor`]: the local sandbox, the Docker engine).
//! - `packages` (the `kiln-debian` crate, `builder/debian`): `[packages]`,
//!   Debian packages locked in kiln.lock and installed into one layer.
//! - `vm` (the `kiln-vm` crate, `builder/vm`): `-o vm:FILE`, the image as
//!   a bootable, reproducible VM disk.
//! - `registry` (the `kiln-remote` crate, `builder/remote`): `registry:`
//!   bases and outputs, the remote step cache.
//! - [`lock`], [`sbom`], [`verify`], [`gc`]: `kiln lock` (base pins,
//!   packages), `kiln sbom`, `kiln verify` (two builds compared) and
//!   `kiln cache prune|gc` (the store's, then the executor's leftovers).
//! - `runtime`: the async runtime registry and engine calls run on.

pub mod base;
pub mod build;
mod context;
pub mod diff;
pub mod gc;
pub mod inspect;
pub mod lock;
mod mount_archive;
mod runtime;
pub mod sbom;
pub mod verify;

// The formats, under the names the engine's modules use.
pub use kiln_debian as packages;
pub use kiln_exec as exec;
pub(crate) use kiln_oci::{changes, error, export, extract, fstree, image, import, layer, listing, tarball};
pub use kiln_remote as registry;
pub(crate) use kiln_vm as vm;

pub use build::{build, plan, BuildOptions, BuildOutcome, PlannedStep};
pub use exec::BackendChoice;
/// Text read from outside (an image's path, a user's argument) as a message shows it: escaped, cut.
pub use kiln_oci::error::shown;
/// `1970-01-01T00:00:00Z` for seconds since the epoch (what `kiln cache ls` shows).
pub use kiln_oci::image::rfc3339;
pub use kiln_oci::layer::LayerBlob;
pub(crate) use kiln_oci::reporter;
pub use kiln_oci::reporter::{Meter, NullMeter, NullReporter, Reporter, StepInfo};
pub use kiln_oci::BuildError;
