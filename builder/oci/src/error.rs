//! The builder's errors, each with the exit code of design §2 and a hint.

use std::io;
use std::path::PathBuf;

use kiln_cache::registry::RegistryError;
use kiln_cache::{Digest, StoreError};
use kiln_recipes::RecipeError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A problem in the recipe, located in its text.
    #[error(transparent)]
    Recipe(Box<RecipeError>),

    #[error(transparent)]
    Store(#[from] StoreError),

    /// A registry refused, could not be reached, or lacks what was asked.
    #[error("{0}")]
    Registry(RegistryError),

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
    CommandFailed { location: String, step: String, command: String, code: i32, tail: Vec<String> },
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

// By hand, not `#[from]`: that would make the registry error the source
// too, and the message would print twice.
impl From<RegistryError> for BuildError {
    fn from(e: RegistryError) -> Self {
        BuildError::Registry(e)
    }
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
            | BuildError::CommandFailed { .. } => 1,
            BuildError::Environment { .. } => 3,
            BuildError::Registry(RegistryError::NotFound { .. } | RegistryError::BadReference { .. }) => 2,
            BuildError::Registry(RegistryError::Store(StoreError::DigestMismatch { .. })) => 2,
            BuildError::Registry(_) => 3,
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
            BuildError::Registry(RegistryError::Refused { host, .. }) => Some(format!(
                "check the credentials for {host}: `docker login {host}`, or KILN_REGISTRY_AUTH with a Docker config"
            )),
            BuildError::Registry(RegistryError::Unreachable { host, .. }) => Some(format!(
                "nothing half-transferred was kept; check that {host} is up and reachable and run the command again (a registry that speaks plain HTTP needs `--insecure-registry {host}`)"
            )),
            BuildError::Registry(RegistryError::NotFound { .. }) => {
                Some("check the repository, tag or digest, e.g. `skopeo list-tags docker://HOST/REPO`".into())
            }
            BuildError::Registry(RegistryError::Auth(_)) => {
                Some("fix the Docker config (or KILN_REGISTRY_AUTH) it names".into())
            }
            BuildError::Registry(RegistryError::Protocol { .. }) => {
                Some("nothing was kept from this transfer; try again, and if it persists check the registry".into())
            }
            BuildError::Environment { hint, .. } => Some(hint.clone()),
            BuildError::Integrity { hint, .. } if !hint.is_empty() => Some(hint.clone()),
            BuildError::CommandFailed { .. } => Some(
                "fix the command; the steps before it stay cached, so the next build starts here".into(),
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
