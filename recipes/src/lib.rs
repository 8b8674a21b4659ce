//! The kiln recipe language: the TOML schema, parsing with source spans, and
//! validation into a typed [`Recipe`] that the builder compiles.
//!
//! - [`args`]: `[args]`, `--arg` values and `${NAME}` substitution.
//! - `raw`: the serde shape of the file, exactly as written (unknown keys are errors).
//! - [`recipe`]: the validated, normalized recipe the rest of kiln uses.
//! - [`parse`]: turns text into a [`Recipe`], checking every value.
//! - [`diagnostic`]: [`RecipeError`], an error that points at the recipe text.
//! - [`reference`]: parsing of base and output references (`oci:DIR:TAG`, ...).

// A recipe error carries its source snippet; it is built once, on the cold path, so its
// size does not matter.
#![allow(clippy::result_large_err)]

pub mod args;
pub mod diagnostic;
pub mod parse;
mod raw;
pub mod recipe;
pub mod reference;

pub use args::{Arg, ArgValue};
pub use diagnostic::RecipeError;
pub use parse::{parse_file, parse_file_with_args, parse_str, parse_str_with_args};
pub use recipe::{
    Base, CacheMount, Command, Config, CopyStep, FileMode, Healthcheck, Image, Owner, Packages, Recipe,
    RunStep, SecretUse, Sharing, Span, Stage, Step, StepKind, Suite, Vm, VmBoot, VmFilesystem, WriteStep,
};
pub use reference::{ImageRef, RefError};
