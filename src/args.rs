//! The command line (design §2).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Compiles declarative recipes into reproducible OCI images")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Progress {
    Auto,
    Plain,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Backend {
    Auto,
    Local,
    Docker,
    Container,
}

impl Backend {
    pub fn choice(self) -> kiln_builder::BackendChoice {
        match self {
            Backend::Auto => kiln_builder::BackendChoice::Auto,
            Backend::Local => kiln_builder::BackendChoice::Local,
            Backend::Docker => kiln_builder::BackendChoice::Docker,
            Backend::Container => kiln_builder::BackendChoice::Container,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Local => "local",
            Backend::Docker => "docker",
            Backend::Container => "container",
        }
    }
}

/// Values for the recipe's `[args]`.
#[derive(Debug, Args, Default, Clone)]
pub struct RecipeArgs {
    /// Set an argument the recipe declares in `[args]` (repeatable): `${NAME}` in the recipe
    /// becomes VALUE. Later values win; an argument the recipe does not declare is an error.
    #[arg(long = "arg", value_name = "NAME=VALUE")]
    pub arg: Vec<String>,
    /// Read arguments from FILE, one NAME=VALUE per line (blank lines and `#` comments skipped;
    /// the value is the rest of the line, unquoted); `--arg` wins over it.
    #[arg(long = "arg-file", value_name = "FILE")]
    pub arg_file: Vec<PathBuf>,
}

/// Labels and annotations given on the command line, over the recipe's.
#[derive(Debug, Args, Default, Clone)]
pub struct Stamps {
    /// Add or replace a label of the image config (repeatable): KEY=VALUE, over `[config] labels`.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub label: Vec<String>,
    /// Add or replace a manifest annotation (repeatable): KEY=VALUE, over `[image] annotations`;
    /// also on the OCI index entry of `oci:` outputs.
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    pub annotation: Vec<String>,
}

#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    pub args: RecipeArgs,
    /// The context folder `copy` reads from (default: the recipe's folder).
    #[arg(long, value_name = "DIR")]
    pub context: Option<PathBuf>,
    /// The cache folder (default: KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The target platform, e.g. linux/amd64 (default: the recipe's, else the host's).
    #[arg(long, value_name = "P")]
    pub platform: Option<String>,
    /// A registry whose step cache to use (repeatable, tried in order): registry:HOST/REPO[:TAG]
    /// (tag default `kiln-cache`). Only the layers the build needs are downloaded.
    #[arg(long = "cache-from", value_name = "REF")]
    pub cache_from: Vec<String>,
    /// A registry host (HOST[:PORT]) to speak plain HTTP to (repeatable); loopback hosts always are.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registry: Vec<String>,
    /// How long a `run` step may run when it sets no `timeout` of its own, e.g. 30m or 1h30m;
    /// past it, its whole process tree is killed and the build fails (default: no limit).
    #[arg(long = "step-timeout", value_name = "DURATION")]
    pub step_timeout: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build a recipe into an image; prints the manifest digest last on stdout.
    Build(BuildArgs),
    /// Show each step, its cache key and HIT or MISS; builds nothing.
    Plan {
        /// The recipe, a TOML file (e.g. recipes/examples/hello/kiln.toml).
        recipe: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Print the plan as JSON (one object per step) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Resolve the recipe's `[packages]` against the signed Debian archives, and pin its tagged
    /// `registry:` bases to digests, into kiln.lock (beside the recipe); what kiln.lock already
    /// answers is kept.
    Lock {
        /// The recipe, a TOML file (e.g. recipes/examples/hello/kiln.toml).
        recipe: PathBuf,
        /// Resolve every set of packages again, taking the newest versions (security updates among them).
        #[arg(long, conflicts_with = "check")]
        update: bool,
        /// For CI: write nothing; exit 1, naming them, when locked packages have newer versions in
        /// the archives (exit 2 when kiln.lock is missing or does not answer the recipe).
        #[arg(long)]
        check: bool,
        /// The target platform, which picks the Debian architecture (default: the recipe's, else the host's).
        #[arg(long, value_name = "P")]
        platform: Option<String>,
        /// A registry host (HOST[:PORT]) to speak plain HTTP to (repeatable); loopback hosts always are.
        #[arg(long = "insecure-registry", value_name = "HOST")]
        insecure_registry: Vec<String>,
        #[command(flatten)]
        args: RecipeArgs,
    },
    /// Print the SPDX 2.3 SBOM (JSON) of the Debian packages in an image.
    Sbom {
        /// oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, docker:REF or registry:HOST/REPO:TAG.
        target: String,
        /// The cache folder (default: KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Show the manifest, config and layers of an image.
    Inspect {
        /// oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, docker:REF or registry:HOST/REPO:TAG.
        target: String,
        /// The cache folder (default: KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// File-level differences between two images.
    Diff {
        /// The first image: oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE, docker:REF or registry:HOST/REPO:TAG.
        a: String,
        /// The second image, written the same way.
        b: String,
        /// The cache folder (default: KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print the differences as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build twice in fresh caches and folders (different umask, TZ and clock) and compare digests.
    Verify {
        /// The recipe, a TOML file (e.g. recipes/examples/hello/kiln.toml).
        recipe: PathBuf,
        /// The context folder `copy` reads from (default: the recipe's folder).
        #[arg(long, value_name = "DIR")]
        context: Option<PathBuf>,
        /// The target platform, e.g. linux/amd64 (default: the recipe's, else the host's).
        #[arg(long, value_name = "P")]
        platform: Option<String>,
        /// As for `build`; both builds use it.
        #[arg(long, value_enum, default_value = "auto")]
        backend: Backend,
        /// As for `build`; both builds get it.
        #[arg(long = "secret", value_name = "SPEC")]
        secrets: Vec<String>,
        #[command(flatten)]
        args: RecipeArgs,
        #[command(flatten)]
        stamps: Stamps,
    },
    /// Print a completion script for a shell, e.g. `kiln completions bash > /etc/bash_completion.d/kiln`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print kiln's man page (roff), e.g. `kiln man | man -l -`; with `--dir`, write one page
    /// per command there instead (kiln.1, kiln-build.1, ...).
    Man {
        /// Write kiln.1 and a page for each command into DIR (made if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Look after the cache.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
        /// The cache folder (default: KILN_CACHE_DIR, else $XDG_CACHE_HOME/kiln, else ~/.cache/kiln).
        #[arg(long, value_name = "DIR", global = true)]
        cache_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// How much the cache holds.
    Du {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The cached steps and images, least recently used first.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Evict least-recently-used entries until the cache fits SIZE (e.g. 500M, 2G); with `--remote`,
    /// compact a registry cache, dropping the steps no build used within `--older-than`.
    Prune {
        /// The size to fit in, e.g. 500M, 2G or a number of bytes (0 empties the cache).
        #[arg(long, value_name = "SIZE", conflicts_with = "remote")]
        max_size: Option<String>,
        /// A remote step cache (`registry:HOST/REPO[:TAG]`, as given to `--cache-to`) to prune.
        #[arg(long, value_name = "REF", requires = "older_than")]
        remote: Option<String>,
        /// With `--remote`: keep the steps a build used within this many days (e.g. 30d).
        #[arg(long, value_name = "DAYS", requires = "remote")]
        older_than: Option<String>,
        /// With `--remote`: a registry reached over plain HTTP (HOST[:PORT]; loopback always is).
        #[arg(long = "insecure-registry", value_name = "HOST", requires = "remote")]
        insecure: Vec<String>,
    },
    /// Remove blobs nothing refers to and leftovers of interrupted builds.
    Gc,
}

/// `kiln build`'s arguments.
#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The recipe, a TOML file (e.g. recipes/examples/hello/kiln.toml).
    pub recipe: PathBuf,
    /// Where to write the image (repeatable): oci:DIR[:TAG], oci-archive:FILE, docker-archive:FILE,
    /// docker:REF, registry:HOST/REPO:TAG, vm:FILE.raw|FILE.qcow2.
    #[arg(short = 'o', long = "output", value_name = "OUTPUT")]
    pub outputs: Vec<String>,
    #[command(flatten)]
    pub common: Common,
    /// Where `run` steps execute: `local` (namespaces + overlayfs; root, or rootless with subuids), `docker`
    /// (the engine at DOCKER_HOST), `container` (root inside an unprivileged container: a root folder
    /// per step and chroot), or `auto` (local where it works; container as root in a container that
    /// refuses namespaces; else docker).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Backend,
    /// A secret for `run` steps (repeatable): `id=ID,src=FILE` or `id=ID,env=VAR`
    /// (`id=ID` alone reads the variable ID). Mounted at /run/secrets/ID; never stored.
    #[arg(long = "secret", value_name = "SPEC")]
    pub secrets: Vec<String>,
    /// Rebuild every step, ignoring cached layers.
    #[arg(long)]
    pub no_cache: bool,
    /// Progress on stderr: bars on a terminal, plain lines, or JSON lines.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: Progress,
    /// Push this build's steps and layers to a registry cache (repeatable): registry:HOST/REPO[:TAG].
    #[arg(long = "cache-to", value_name = "REF")]
    pub cache_to: Vec<String>,
    /// Carry `run` steps' cache mounts with the registry cache: push them with `--cache-to`, and
    /// make the ones this cache lacks from `--cache-from`.
    #[arg(long)]
    pub cache_mounts: bool,
    /// Upload each blob in one request, for registries that refuse chunked uploads.
    #[arg(long)]
    pub monolithic_upload: bool,
    /// Write what CI needs to know as JSON to FILE once the build succeeds: the manifest and config
    /// digests, each output, each step (key, HIT/MISS, seconds, layer) and the bytes pushed and pulled.
    #[arg(long = "metadata-file", value_name = "FILE")]
    pub metadata_file: Option<PathBuf>,
    #[command(flatten)]
    pub stamps: Stamps,
}
