//! The validated recipe: every path normalized, every value checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::diagnostic::RecipeError;

/// A byte range in the recipe source.
pub type Span = std::ops::Range<usize>;

#[derive(Debug, Clone)]
pub struct Recipe {
    /// The recipe file as the user named it (used in messages).
    pub file: PathBuf,
    /// The recipe text, for diagnostics.
    pub source: Arc<String>,
    /// The folder that relative paths in the recipe (bases) are resolved from.
    pub dir: PathBuf,
    /// `[[stage]]` tables in recipe order; each may use only stages before it.
    pub stages: Vec<Stage>,
    pub image: Image,
    /// The final image's steps. With `[packages]`, the first is
    /// [`StepKind::Packages`] (then [`StepKind::Configure`] unless
    /// `scripts = false`): the packages' layers sit below the others.
    pub steps: Vec<Step>,
    pub config: Config,
    /// `[vm]`: how `-o vm:FILE` makes the disk (defaults when absent).
    pub vm: Vm,
    /// `[args]` as resolved (defaults and the command line's values), in name order.
    pub args: Vec<crate::args::Arg>,
}

/// `[vm]`: the disk `-o vm:FILE.raw|FILE.qcow2` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vm {
    /// The whole disk's size in bytes (a multiple of 1 MiB); `None`: the
    /// content plus headroom.
    pub size: Option<u64>,
    pub size_span: Option<Span>,
    pub(crate) filesystem: VmFilesystem,
    /// Kernel command line arguments, after the ones kiln sets (`root=`, `rw`, `panic=-1`).
    pub cmdline: String,
    pub boot: VmBoot,
    /// An absolute path in the image run as PID 1 (e.g. `/lib/systemd/systemd`);
    /// `None`: kiln's init runs the image's entrypoint and cmd, then powers off.
    pub init: Option<String>,
}

impl Default for Vm {
    fn default() -> Vm {
        Vm {
            size: None,
            size_span: None,
            filesystem: VmFilesystem::Ext4,
            cmdline: DEFAULT_CMDLINE.into(),
            boot: VmBoot::Bios,
            init: None,
        }
    }
}

/// The kernel arguments when `[vm]` sets no `cmdline`: the serial console.
pub(crate) const DEFAULT_CMDLINE: &str = "console=ttyS0,115200";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmFilesystem {
    Ext4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmBoot {
    /// A BIOS (syslinux) boot partition with the image's kernel.
    Bios,
    /// An EFI system partition with a unified kernel image.
    Uefi,
    /// No boot partition: a data disk holding the root filesystem.
    None,
}

impl std::fmt::Display for VmBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmBoot::Bios => "bios",
            VmBoot::Uefi => "uefi",
            VmBoot::None => "none",
        })
    }
}

/// An intermediate image (`[[stage]]`): built only when the final image
/// (or a stage it uses) refers to it.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub base: Base,
    pub base_span: Option<Span>,
    pub steps: Vec<Step>,
}

impl Recipe {
    /// An error located at `span` of this recipe.
    pub fn error_at(&self, span: Span, message: impl Into<String>) -> RecipeError {
        RecipeError::new(&self.file.display().to_string(), &self.source, Some(span), message)
    }
}

#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub base: Base,
    pub base_span: Option<Span>,
    /// `epoch` as written; `None` means the default (0, or SOURCE_DATE_EPOCH).
    pub epoch: Option<u64>,
    pub platform: Option<Platform>,
    /// `[image] annotations`: written into the manifest and the OCI index entry.
    pub annotations: BTreeMap<String, String>,
}

/// An OS/architecture pair such as `linux/amd64` or `linux/arm/v7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of the machine kiln runs on.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            "riscv64" => "riscv64",
            "s390x" => "s390x",
            "arm" => "arm",
            other => other,
        };
        Platform { os: "linux".into(), architecture: architecture.into(), variant: None }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, String> {
        const ARCHES: &[&str] =
            &["amd64", "arm64", "arm", "386", "ppc64le", "riscv64", "s390x", "mips64le", "loong64"];
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("`{s}` is not a platform of the form `os/arch[/variant]`"));
        }
        if parts[0] != "linux" {
            return Err(format!("OS `{}` is not supported; kiln builds `linux` images", parts[0]));
        }
        if !ARCHES.contains(&parts[1]) {
            return Err(format!(
                "unknown architecture `{}`; expected one of {}",
                parts[1],
                ARCHES.join(", ")
            ));
        }
        Ok(Platform {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| v.to_string()),
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Where the image starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    Scratch,
    /// An OCI image layout folder, optionally a tag in it (`org.opencontainers.image.ref.name`).
    Oci {
        dir: PathBuf,
        tag: Option<String>,
    },
    /// A tar of an OCI image layout.
    OciArchive(PathBuf),
    /// What `docker save` writes.
    DockerArchive(PathBuf),
    /// The result of the recipe's `[[stage]]` of that name.
    Stage(String),
    /// An image in the Docker engine at DOCKER_HOST.
    Docker(String),
    /// An image in a registry: `HOST/REPO:TAG` or `HOST/REPO@sha256:...`.
    Registry(String),
}

impl Base {
    /// Where a non-scratch base is read from.
    pub fn image_ref(&self) -> Option<crate::ImageRef> {
        use crate::ImageRef;
        match self {
            Base::Scratch => None,
            Base::Oci { dir, tag } => Some(ImageRef::Oci { dir: dir.clone(), tag: tag.clone() }),
            Base::OciArchive(p) => Some(ImageRef::OciArchive(p.clone())),
            Base::DockerArchive(p) => Some(ImageRef::DockerArchive(p.clone())),
            Base::Stage(_) => None,
            Base::Docker(r) => Some(ImageRef::Docker(r.clone())),
            Base::Registry(r) => Some(ImageRef::Registry(r.clone())),
        }
    }
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Base::Scratch => write!(f, "scratch"),
            Base::Oci { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            Base::Oci { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            Base::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            Base::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            Base::Stage(n) => write!(f, "stage:{n}"),
            Base::Docker(r) => write!(f, "docker:{r}"),
            Base::Registry(r) => write!(f, "registry:{r}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Step {
    /// 0-based position among the image's steps.
    pub index: usize,
    /// The step's table in the recipe.
    pub span: Span,
    pub kind: StepKind,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    Copy(CopyStep),
    Write(WriteStep),
    Run(RunStep),
    /// The `[packages]` table: Debian packages installed from `kiln.lock`.
    Packages(Packages),
    /// Right after [`StepKind::Packages`] when `scripts` is on: the
    /// packages' maintainer scripts, run in the sandbox.
    Configure(Packages),
}

/// `[packages]`: Debian packages, resolved by `kiln lock` into `kiln.lock`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packages {
    /// The stage these packages are for (`[stage.packages]`); `None` for
    /// the image's `[packages]`. Names the section of kiln.lock.
    pub stage: Option<String>,
    /// The archives read, the release first. `suite = "bookworm"` gives
    /// `bookworm` and, where the archive has them, `bookworm-updates` and
    /// `bookworm-security`; `suites = [...]` lists them exactly.
    pub suites: Vec<Suite>,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// Default: `["main"]`.
    pub components: Vec<String>,
    /// Default: from the image's platform (see `debian_architecture`).
    pub architecture: Option<String>,
    /// The main archive's mirror. Default: the host's apt sources.
    pub mirror: Option<String>,
    /// An OpenPGP keyring (resolved against the recipe's folder);
    /// default: the Debian archive keyring.
    pub keyring: Option<PathBuf>,
    /// `true` (the default): the packages' maintainer scripts run in the
    /// sandbox, as on a real install, and Debian's `Essential` packages
    /// come too. `false`: files only, no shell needed (distroless images).
    pub scripts: bool,
}

impl Packages {
    /// The release: the first suite (`bookworm`).
    pub fn release(&self) -> &str {
        &self.suites[0].name
    }
}

/// One archive `[packages]` reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suite {
    pub name: String,
    /// Its own mirror (the security archive lives apart from the main one).
    pub mirror: Option<String>,
    /// Implied by `suite = "..."` rather than listed: skipped, with a
    /// notice, when the archive does not have it.
    pub optional: bool,
}

/// Debian's name for a platform's architecture, if Debian has one.
pub fn debian_architecture(p: &Platform) -> Option<&'static str> {
    Some(match (p.architecture.as_str(), p.variant.as_deref()) {
        ("amd64", _) => "amd64",
        ("arm64", _) => "arm64",
        ("386", _) => "i386",
        ("arm", Some("v5")) => "armel",
        ("arm", _) => "armhf",
        ("ppc64le", _) => "ppc64el",
        ("s390x", _) => "s390x",
        ("riscv64", _) => "riscv64",
        ("mips64le", _) => "mips64el",
        _ => return None,
    })
}

/// Runs a command in the image being built; its changes become the layer.
/// A secret a `run` step reads: `"ID"` or `{ id = "ID", uid = 1000, gid = 1000, mode = "0440" }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUse {
    pub id: String,
    /// The file's owner; `None`: the step's user (its group for `gid`).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// The file's mode; `None`: 0400.
    pub mode: Option<u32>,
}

impl SecretUse {
    /// Whether anything but the id was written (the step's key then names it).
    pub fn is_plain(&self) -> bool {
        self.uid.is_none() && self.gid.is_none() && self.mode.is_none()
    }

    /// Whether its owner comes (in part) from the step's user, whose ids the
    /// image's /etc/passwd and /etc/group give.
    pub fn takes_step_owner(&self) -> bool {
        self.uid.is_none() || self.gid.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct RunStep {
    pub command: Command,
    /// Added to the image's environment for this command only.
    pub env: BTreeMap<String, String>,
    /// `false` (the default): the command sees only a loopback interface.
    pub network: bool,
    /// Secrets, mounted at `/run/secrets/ID`; their values come from the command line.
    pub secrets: Vec<SecretUse>,
    /// Overrides the image's `user` for this command (kiln extension).
    pub user: Option<String>,
    /// Overrides the image's `workdir` for this command (kiln extension).
    pub workdir: Option<String>,
    /// How long the command may run (`timeout = "10m"`); past it, its
    /// whole process tree is killed and the step fails. Not in the step's
    /// key: a command that finishes in time makes the same layer.
    pub timeout: Option<std::time::Duration>,
    /// `cache = [{ target = "/root/.cache/pip" }, ...]`: folders kept in the
    /// store across builds, mounted read-write; never in a layer or a key
    /// (the mounts' targets, ids and sharing are in the key, not their contents).
    pub cache: Vec<CacheMount>,
}

/// One of a `run` step's cache mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheMount {
    /// An absolute path in the image, normalized.
    pub target: String,
    /// Which cache (default: the target): steps with the same id share it.
    pub id: String,
    pub sharing: Sharing,
}

/// How steps running at once use one cache mount, as BuildKit's `sharing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// Every step uses it at once (the default).
    Shared,
    /// One step at a time; the others wait.
    Locked,
    /// A step that finds it in use gets a new, empty one for itself.
    Private,
}

impl Sharing {
    pub fn as_str(self) -> &'static str {
        match self {
            Sharing::Shared => "shared",
            Sharing::Locked => "locked",
            Sharing::Private => "private",
        }
    }
}

/// A duration as recipes and flags write it: a whole number and a unit
/// (`ms`, `s`, `m`, `h`), or several (`1h30m`), greater than zero and at
/// most a week.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut total: u128 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 || digits > 9 {
            return None;
        }
        let n: u128 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
        let millis = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return None,
        };
        total += n * millis;
        rest = &rest[unit_len..];
    }
    (total > 0 && total <= 7 * 24 * 3_600_000).then(|| std::time::Duration::from_millis(total as u64))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run by `/bin/sh -c`.
    Shell(String),
    /// Exec form: the program and its arguments, no shell.
    Exec(Vec<String>),
}

impl Command {
    /// As written: the shell string, or the exec form's array.
    pub fn text(&self) -> String {
        match self {
            Command::Shell(s) => s.clone(),
            Command::Exec(v) => format!("{v:?}"),
        }
    }

    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
            Command::Exec(v) => v.clone(),
        }
    }
}

/// Copies a file or folder of the context into the image.
#[derive(Debug, Clone)]
pub struct CopyStep {
    /// The source: relative to the context, normalized (`.` for the whole
    /// context); or, with `from`, an absolute path in that stage's image.
    pub src: String,
    /// The stage to copy out of (`from = "NAME"`); `None`: the context.
    pub from: Option<String>,
    pub src_span: Span,
    /// The absolute destination, normalized (no trailing slash except for `/`).
    pub to: String,
    /// `to` was written with a trailing slash: a file source goes *into* that folder.
    pub to_is_dir: bool,
    pub owner: Owner,
    /// `None`: git semantics (0644, or 0755 when the owner may execute; folders 0755).
    pub mode: Option<FileMode>,
    /// `exclude`: gitignore patterns, matched against paths relative to the
    /// source; what they match is never read. Only for copies from the context.
    pub exclude: Vec<String>,
}

/// Writes a file with inline content.
#[derive(Debug, Clone)]
pub struct WriteStep {
    pub path: String,
    pub content: String,
    pub owner: Owner,
    pub mode: FileMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Permission bits (at most 07777).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMode(pub u32);

impl std::fmt::Display for FileMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// The `[config]` table: what goes into the OCI image config.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<String>,
    pub volumes: Vec<String>,
    pub stop_signal: Option<String>,
    pub healthcheck: Option<Healthcheck>,
    /// Docker's `Shell`: the shell of shell-form commands in images built on this one.
    pub shell: Option<Vec<String>>,
}

/// Docker's `Healthcheck` (what `docker inspect` shows and the engine runs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Healthcheck {
    /// `["CMD", ...]`, `["CMD-SHELL", "..."]` or `["NONE"]` (turns off a base's).
    pub test: Vec<String>,
    pub interval: Option<std::time::Duration>,
    pub timeout: Option<std::time::Duration>,
    pub start_period: Option<std::time::Duration>,
    pub start_interval: Option<std::time::Duration>,
    pub retries: Option<u32>,
}
