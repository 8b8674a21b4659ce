//! The builder's errors, each with the exit code of design §2 and a hint.

use std::io;
use std::path::PathBuf;

use kiln_cache::{Digest, StoreError};
use kiln_recipes::RecipeError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A problem in the recipe, located in its text.
    #[error(transparent)]
    Recipe(Box<RecipeError>),

    #[error(transparent)]
    Store(#[from] StoreError),

    /// A registry refused, could not be reached, or lacks what was asked
    /// (the registry client, `kiln-remote`, says which exit code and hint).
    #[error("{0}")]
    Registry(Box<dyn RegistryFailure>),

    #[error("Cannot read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("`{}` changed while kiln was reading it", path.display())]
    Changed { path: PathBuf },

    #[error("Cannot write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// An image kiln reads (a base, or a target of `inspect`/`diff`) is malformed or hostile.
    #[error("The image `{image}` is not usable: {}", escape_controls(reason))]
    BadImage { image: String, reason: String },

    /// A layer tar breaks the rules kiln enforces on input.
    #[error("Layer {layer} is refused: {}", escape_controls(reason))]
    BadLayer { layer: Digest, reason: String },

    #[error("{message}")]
    Usage { message: String, hint: Option<String> },

    #[error("The builds differ: {0}")]
    NotReproducible(String),

    /// Input that failed a signature or checksum check (a mirror's index, a
    /// package): refused, nothing of it kept.
    #[error("{message}")]
    Integrity { message: String, hint: String },

    /// Something outside kiln is missing or refuses (no engine, no permission).
    #[error("{message}")]
    Environment { message: String, hint: String },

    /// A `run` step's command exited non-zero.
    #[error("{location}: step {step} failed: `{command}` exited with code {code}{}", tail_text(tail))]
    CommandFailed {
        location: String,
        step: String,
        command: String,
        code: i32,
        tail: Vec<String>,
        /// What the backend knows that may explain it (shown in the hint).
        note: Option<FailNote>,
    },

    /// A `run` step's command ran past its time limit and was killed.
    #[error("{location}: step {step} failed: `{command}` ran past its time limit of {limit} and was stopped, with every process it started{}", tail_text(tail))]
    TimedOut { location: String, step: String, command: String, limit: String, tail: Vec<String> },
}

/// What a backend knows about a failed command that may explain it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailNote {
    /// It looked for /proc or /sys, which the container backend cannot mount.
    NoProcInContainer,
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return " and printed nothing".into();
    }
    let mut s = format!("; the last {} line(s) of its output:", tail.len());
    for l in tail {
        s.push_str("\n  | ");
        s.push_str(l);
    }
    s
}

/// A registry client's error, as [`BuildError::Registry`] carries it. The
/// client lives above this crate (`kiln-remote`), so it says itself what
/// its failures mean; `as_any` lets the engine tell them apart. Its
/// message is shown as the error's (not as a source, which would print it twice).
pub trait RegistryFailure: std::error::Error + Send + Sync + 'static {
    /// 2 when the reference or what it names is wrong, else 3.
    fn exit_code(&self) -> i32;
    fn hint(&self) -> Option<String>;
    fn as_any(&self) -> &dyn std::any::Any;
}

impl From<RecipeError> for BuildError {
    fn from(e: RecipeError) -> Self {
        BuildError::Recipe(Box::new(e))
    }
}

impl BuildError {
    pub fn io_read(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> BuildError {
        let path = path.into();
        move |source| BuildError::Read { path, source }
    }

    pub fn io_write(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> BuildError {
        let path = path.into();
        move |source| BuildError::Write { path, source }
    }

    pub fn usage(message: impl Into<String>, hint: Option<&str>) -> BuildError {
        BuildError::Usage { message: message.into(), hint: hint.map(str::to_string) }
    }

    /// 1: the build failed; 2: bad usage or bad input; 3: the environment.
    pub fn exit_code(&self) -> i32 {
        match self {
            BuildError::Recipe(_)
            | BuildError::BadImage { .. }
            | BuildError::BadLayer { .. }
            | BuildError::Usage { .. }
            | BuildError::Integrity { .. } => 2,
            BuildError::Changed { .. }
            | BuildError::NotReproducible(_)
            | BuildError::CommandFailed { .. }
            | BuildError::TimedOut { .. } => 1,
            BuildError::Environment { .. } => 3,
            BuildError::Registry(e) => e.exit_code(),
            BuildError::Store(StoreError::DigestMismatch { .. }) => 2,
            BuildError::Store(_) | BuildError::Read { .. } | BuildError::Write { .. } => 3,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        match self {
            BuildError::Recipe(e) => e.hint().map(str::to_string),
            BuildError::Store(StoreError::Io { .. }) => Some(
                "check the cache folder's permissions and free space, or pick another with `--cache-dir` or KILN_CACHE_DIR"
                    .into(),
            ),
            BuildError::Read { .. } => Some("check that the file exists and is readable".into()),
            BuildError::Write { .. } => Some("check the folder's permissions and free space".into()),
            BuildError::Changed { .. } => Some("something modified the context during the build; run the build again".into()),
            BuildError::Usage { hint, .. } => hint.clone(),
            BuildError::Registry(e) => e.hint(),
            BuildError::Environment { hint, .. } => Some(hint.clone()),
            BuildError::Integrity { hint, .. } if !hint.is_empty() => Some(hint.clone()),
            BuildError::CommandFailed { note, .. } => Some(format!(
                "{}fix the command; the steps before it stay cached, so the next build starts here",
                match note {
                    Some(FailNote::NoProcInContainer) => "the container backend has no /proc and no /sys in a step (an unprivileged container allows no mount); build such a step where the local or docker backend runs, or ",
                    None => "",
                }
            )),
            BuildError::TimedOut { .. } => Some(
                "raise the step's `timeout` (or `--step-timeout`), or find what it waits for; nothing of it was cached, and the steps before it stay cached".into(),
            ),
            _ => None,
        }
    }
}

/// A name read from hostile input (an archive member, a layer entry), made
/// safe to show: control characters escaped (no terminal sequences reach a
/// CI log) and cut to 200 characters.
pub fn shown(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if i == 200 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Control characters escaped, so names from hostile input cannot send
/// terminal sequences to a log.
fn escape_controls(s: &str) -> String {
    s.chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
        .collect()
}
