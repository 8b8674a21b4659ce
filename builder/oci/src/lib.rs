//! kiln's image formats, with no knowledge of recipes' steps, backends or
//! the registry protocol: what the other engine crates build on. (The
//! manifest media types live here; a registry's failures reach
//! [`BuildError`] through the [`error::RegistryFailure`] trait the client
//! in `kiln-remote` implements.)
//!
//! - [`tarball`], `gzip`, [`layer`]: reproducible layers (headers written
//!   by hand, one compressor, entries sorted).
//! - [`listing`]: a layer's entries, checked as its tar is read, stored
//!   sorted on disk; [`fstree`]: the merged tree of a stack of layers.
//! - [`image`]: OCI config, manifest and index, canonical JSON; [`passwd`]:
//!   an image's users and groups; [`pathvar`]: the default PATH, and
//!   programs looked up through an image's PATH.
//! - [`import`] / [`export`]: OCI layouts and archives in and out of the
//!   store, hostile input refused; [`extract`]: files out of an image's layers.
//! - [`unpack`] and [`rootdir`]: layers as folders, never through a symlink;
//!   [`flatten`]: an image's layers as one folder (a VM disk's, the
//!   container backend's root);
//!   [`changes`]: a command's changes normalized into layer entries;
//!   [`whiteout`]: the names that say what a layer removes.
//! - [`reporter`]: the progress trait the engine reports through;
//!   [`error`]: [`BuildError`], with exit codes and hints.
//! - [`pathvar`]: the default PATH, and programs looked up through it.

pub mod changes;
pub mod error;
pub mod export;
pub mod extract;
pub mod flatten;
pub mod fstree;
mod gzip;
pub mod image;
pub mod import;
pub mod layer;
pub mod listing;
pub mod passwd;
pub mod pathvar;
pub mod reporter;
pub mod rootdir;
pub mod tarball;
pub mod unpack;
pub mod whiteout;

pub use error::BuildError;
