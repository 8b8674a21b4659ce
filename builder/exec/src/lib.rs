//! kiln-exec: where `run` steps execute (design §5). Every backend takes the
//! same request and returns the same [`Change`](kiln_oci::changes::Change)s,
//! which become the layer through one normalization, so the backends give
//! identical layers. Depends on the formats (`kiln-oci`) and the leaves
//! (the store, the recipe types) only.
//!
//! - [`local`]: namespaces and overlayfs, no daemon (the default);
//!   `rootless`: the user namespace and id mapping when kiln is not root.
//! - [`sandbox`]: the helper process the local backend re-executes;
//!   `confine` and `seccomp`: what it takes away from a step (the
//!   engine's default capabilities, seccomp profile, masked /proc).
//! - [`docker`]: a container in the engine at DOCKER_HOST, through bollard.
//! - [`container`]: for kiln inside an unprivileged container (no
//!   namespaces, no mounts): a root folder per step, `chroot`, and the
//!   changes read from inode and ctime stamps.
//!
//! The build sees a backend only through [`Executor`], chosen once by
//! [`choose`]; tests give the build their own.

mod confine;
pub mod container;
pub mod docker;
pub mod local;
mod rootless;
pub mod sandbox;
mod seccomp;

// The formats this crate reads and writes, under the names its modules use.
pub(crate) use kiln_oci::{
    changes, error, export, fstree, image, import, layer, listing, passwd, rootdir, unpack, BuildError,
};

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;

use oci_spec::image::ImageConfiguration;

use crate::changes::Change;
use crate::fstree::FsTree;
use crate::image::ImageLayer;

/// The hostname every `run` command sees, on both backends.
pub(crate) const HOSTNAME: &str = "kiln";

/// The /etc/hosts a command sees on the local backend (the engine writes its own).
pub(crate) const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// Where the Docker backend's secret files live: memory (/dev/shm) where
/// there is one, so a secret never lands on disk. The local backend needs
/// no file at all (memfds).
fn secret_base() -> std::path::PathBuf {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A private folder for secret files, named after this process
/// (`kiln-secrets-PID-…`), so [`sweep_secret_folders`] can tell a folder
/// whose kiln was killed from one in use.
fn secret_dir() -> Result<tempfile::TempDir, crate::BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let base = secret_base();
    let dir = tempfile::Builder::new()
        .prefix(&format!("kiln-secrets-{}-", std::process::id()))
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(&base)
        .map_err(crate::BuildError::io_write(&base))?;
    // 0700 whatever the umask: a secret file inside may be another user's
    // or group-readable, for the step; the folder keeps the host's users out.
    let mode =
        std::fs::metadata(dir.path()).map_err(crate::BuildError::io_write(dir.path()))?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .map_err(crate::BuildError::io_write(dir.path()))?;
    }
    Ok(dir)
}

/// Removes the secret folders that killed kiln processes of this user
/// left behind (`kiln cache gc`). Returns how many it removed.
pub fn sweep_secret_folders() -> usize {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let Ok(rd) = std::fs::read_dir(secret_base()) else { return 0 };
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("kiln-secrets-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let Ok(md) = e.path().symlink_metadata() else { continue };
        if !md.is_dir() || md.uid() != me {
            continue;
        }
        // Signal 0 only checks whether the process exists (EPERM: it does).
        let alive = pid > 0
            && match rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid).expect("pid > 0"))
            {
                Ok(()) => true,
                Err(e) => e != rustix::io::Errno::SRCH,
            };
        if !alive && std::fs::remove_dir_all(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// The secrets as files (id, path), in a private folder that lives as long
/// as the returned guard; no folder when there are none.
pub(crate) type SecretFiles = (Option<tempfile::TempDir>, Vec<(String, std::path::PathBuf)>);

pub(crate) fn write_secrets(secrets: &[SecretFile]) -> Result<SecretFiles, crate::BuildError> {
    if secrets.is_empty() {
        return Ok((None, Vec::new()));
    }
    let dir = secret_dir()?;
    let mut files = Vec::new();
    for s in secrets {
        files.push((s.id.clone(), write_secret(dir.path(), s)?));
    }
    Ok((Some(dir), files))
}

/// Writes one secret in the private folder, with its owner and mode (the
/// folder, 0700, keeps it from the host's other users whatever the mode).
fn write_secret(dir: &std::path::Path, s: &SecretFile) -> Result<std::path::PathBuf, crate::BuildError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(&s.id);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&path)
        .and_then(|mut f| f.write_all(&s.value).map(|()| f))
        .map_err(crate::BuildError::io_write(&path))?;
    own_secret(&f, s.uid, s.gid, s.mode).map_err(|e| crate::BuildError::Environment {
        message: format!("Cannot give the secret `{}` to {}:{} with mode {:04o}: {e}", s.id, s.uid, s.gid, s.mode),
        hint: "kiln gives a secret to another user only when it runs as root; run kiln as root, or let the step read it as kiln's own user".into(),
    })?;
    Ok(path)
}

/// Gives a secret's file its owner, then its mode.
pub(crate) fn own_secret(f: &std::fs::File, uid: u32, gid: u32, mode: u32) -> std::io::Result<()> {
    let me = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    if (uid, gid) != me {
        match rustix::fs::fchown(
            f,
            Some(rustix::process::Uid::from_raw(uid)),
            Some(rustix::process::Gid::from_raw(gid)),
        ) {
            // kiln is not root (the docker backend): a root step reads kiln's file anyway.
            Err(rustix::io::Errno::PERM) if (uid, gid) == (0, 0) => {}
            r => r?,
        }
    }
    rustix::fs::fchmod(f, rustix::fs::Mode::from_raw_mode(mode & 0o777))?;
    Ok(())
}

/// Refuses to run a command for a platform this machine cannot execute:
/// the host's own architecture, or one the kernel runs through a
/// registered `binfmt_misc` handler with the fix-binary flag (qemu-user's
/// `F`, which also works inside the sandbox's new root). kiln does not
/// emulate by itself; without this check a step would run natively and
/// its layer be labelled with the wrong platform.
pub fn check_platform(p: &kiln_recipes::recipe::Platform) -> Result<(), crate::BuildError> {
    let host = kiln_recipes::recipe::Platform::host();
    if p.os == host.os && p.architecture == host.architecture {
        return Ok(());
    }
    let qemu = match p.architecture.as_str() {
        "arm64" => "aarch64",
        "386" => "i386",
        "amd64" => "x86_64",
        other => other,
    };
    let handler = std::path::Path::new("/proc/sys/fs/binfmt_misc").join(format!("qemu-{qemu}"));
    if let Ok(text) = std::fs::read_to_string(&handler) {
        if binfmt_runs_in_sandbox(&text) {
            return Ok(());
        }
    }
    Err(crate::BuildError::Environment {
        message: format!(
            "A `run` step would run commands for {p}, but this machine is {host} and cannot execute them"
        ),
        hint: format!(
            "build on a {p} machine, or register an emulator for it (Debian's qemu-user-static with binfmt_misc: `{}` with the F flag); recipes of only `copy`, `write` and [packages] build for any platform",
            handler.display()
        ),
    })
}

/// Whether a `binfmt_misc` handler's text says it is enabled with the `F`
/// (fix binary) flag, so the interpreter is found even inside a new root.
fn binfmt_runs_in_sandbox(text: &str) -> bool {
    let enabled = text.lines().next() == Some("enabled");
    let fixed = text.lines().any(|l| l.strip_prefix("flags: ").is_some_and(|f| f.contains('F')));
    enabled && fixed
}

/// How many lines of a failed command's output the error shows.
pub(crate) const TAIL_LINES: usize = 20;

/// Where `run` steps execute: the one seam between the build and a backend.
pub trait Executor: Send + Sync + std::fmt::Debug {
    /// A short name for messages (`local`, `docker`).
    fn name(&self) -> &'static str;

    /// What this backend knows that may explain a failed command, from
    /// its output's last lines (never shown: the note is kiln's own words).
    fn failure_note(&self, _tail: &[String]) -> Option<kiln_oci::error::FailNote> {
        None
    }

    /// Where this executor wants a step's parent layer unpacked, by
    /// diff_id, while the layer is written (so a `run` step right after a
    /// `copy` never reads the layer back); `None` when it lays out parents
    /// itself.
    fn unpack_dir(&self, _store: &kiln_cache::Store) -> Option<std::path::PathBuf> {
        None
    }

    /// Takes the layer `diff_id`, unpacked at `staged` (in the store's
    /// tmp folder) while it was written, with its stored listing, into the
    /// folder [`Executor::unpack_dir`] named. Only called when that is
    /// `Some`. `true` when the executor's folder for the layer is sound
    /// (the staged one, or an earlier one that still holds its seal): a
    /// step can then run on it before the layer's blob exists; `false`
    /// when the executor would have to make it again from the blob.
    fn adopt_unpacked(
        &self,
        _store: &kiln_cache::Store,
        _staged: &std::path::Path,
        _diff_id: &kiln_cache::Digest,
        _listing: &kiln_oci::listing::ListingFile,
    ) -> Result<bool, crate::BuildError> {
        Ok(false)
    }

    /// Whether the executor holds the layer `diff_id` unpacked, sound (its
    /// seal intact), so a step can run on it without the layer being
    /// unpacked again.
    fn has_unpacked(&self, _store: &kiln_cache::Store, _diff_id: &kiln_cache::Digest) -> bool {
        false
    }

    /// Runs one command on top of the request's parent image, sending each
    /// output line to `on_line`; on success, the changes it made.
    fn run(
        &self,
        store: &kiln_cache::Store,
        req: &RunRequest<'_>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<RunResult, crate::BuildError>;
}

/// The executor `choice` names, if it can run here: for `auto`, the local
/// backend where this process can use it, else the engine `docker` connects to.
pub fn choose(
    choice: BackendChoice,
    docker: &dyn Fn() -> Result<std::sync::Arc<docker::DockerEngine>, crate::BuildError>,
) -> Result<std::sync::Arc<dyn Executor>, crate::BuildError> {
    match choice {
        BackendChoice::Docker => Ok(docker()?),
        BackendChoice::Local => match local::available() {
            Ok(mode) => Ok(std::sync::Arc::new(local::Local { mode })),
            Err(why) => Err(crate::BuildError::Environment {
                message: format!("The local backend cannot run here: {why}"),
                hint: "run kiln as root, give the user subordinate ids, or use `--backend docker` with a Docker engine".into(),
            }),
        },
        BackendChoice::Container => match container::available() {
            Ok(()) => Ok(std::sync::Arc::new(container::Container)),
            Err(why) => Err(crate::BuildError::Environment {
                message: format!("The container backend cannot run here: {why}"),
                hint: "run kiln as root in the container (`docker run --user 0`, `securityContext.runAsUser: 0`) with Docker's default capabilities (no `--cap-drop`; Kubernetes' \"baseline\" Pod Security level, not \"restricted\")".into(),
            }),
        },
        BackendChoice::Auto => match local::available() {
            // Root in a container that refuses namespaces (Docker's default
            // profile, a Kubernetes pod): the container is the sandbox.
            Ok(local::Mode::Root) if container::in_container() && !container::namespaces_work() => {
                match container::available() {
                    Ok(()) => Ok(std::sync::Arc::new(container::Container)),
                    Err(why) => Err(crate::BuildError::Environment {
                        message: format!("The container backend cannot run here: {why}"),
                        hint: "give the container Docker's default capabilities (no `--cap-drop`; Kubernetes' \"baseline\" Pod Security level, not \"restricted\")".into(),
                    }),
                }
            }
            Ok(mode) => Ok(std::sync::Arc::new(local::Local { mode })),
            Err(why) => match docker() {
                Ok(d) => Ok(d),
                Err(e) => Err(crate::BuildError::Environment {
                    message: format!("No backend can run `run` steps here: {why}; and no Docker engine answers ({e})"),
                    hint: if container::in_container() {
                        "run kiln as root in the container (`docker run --user 0`, `runAsUser: 0`): the container backend then runs the steps".into()
                    } else {
                        "run kiln as root for the local backend, give this user subordinate ids (rootless), or start a Docker engine".into()
                    },
                }),
            },
        },
    }
}

/// Which backend runs `run` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Local where it works; in a container that refuses namespaces, as
    /// root, the container backend; else Docker.
    Auto,
    Local,
    Docker,
    Container,
}

/// One command to run on top of a parent image.
pub struct RunRequest<'a> {
    pub argv: Vec<String>,
    /// The full environment, in order (see [`command_env`]).
    pub env: Vec<String>,
    pub user: String,
    pub workdir: String,
    pub network: bool,
    /// Mounted read-only at /run/secrets/ID.
    pub secrets: &'a [SecretFile],
    /// Folders of the store mounted read-write over paths in the image.
    pub cache_mounts: &'a [CacheMountRequest],
    /// Past it, the command and every process it started are killed.
    pub timeout: Option<std::time::Duration>,
    /// The parent image: its layers, merged tree and config.
    pub layers: &'a [ImageLayer],
    pub tree: &'a FsTree,
    pub config: &'a ImageConfiguration,
}

/// A secret as a backend mounts it: a file at /run/secrets/ID, read-only,
/// with the owner and mode the step asked for (the step's user and 0400
/// unless the recipe says otherwise), never part of the changes.
#[derive(Debug, Clone)]
pub struct SecretFile {
    pub id: String,
    pub value: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits only (at most 0777).
    pub mode: u32,
}

/// A cache mount as a backend mounts it: never part of the changes.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CacheMountRequest {
    /// The path in the image, relative (`root/.cache/pip`); it and the folders
    /// above it are folders or absent in the image (checked by the builder).
    pub target: String,
    /// The store's folder.
    pub host: PathBuf,
    /// For a folder just made: the numeric owner to give it (the step's user).
    pub owner: Option<(u32, u32)>,
}

pub enum RunResult {
    /// The command succeeded; `keep` holds the files the changes point at.
    Changed { changes: Vec<Change>, keep: Box<dyn std::any::Any + Send> },
    /// The command exited non-zero (or was killed: 128 + signal).
    Failed { code: i32, tail: Vec<String> },
    /// The command ran past the request's timeout and was killed, with
    /// every process it started.
    TimedOut { tail: Vec<String> },
}

/// The command's environment, built as the engine builds it (moby's
/// `CreateDaemonEnvironment`): the default PATH and HOSTNAME first, then the
/// image's variables and the step's replacing or appending. Passing the
/// result to the engine leaves it unchanged, so both backends agree.
pub fn command_env(
    image_env: &[String],
    step_env: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut env = vec![format!("PATH={}", kiln_oci::pathvar::DEFAULT_PATH), format!("HOSTNAME={HOSTNAME}")];
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        match env.iter_mut().find(|e| e.split('=').next() == Some(key.as_str())) {
            Some(slot) => *slot = kv,
            None => env.push(kv),
        }
    };
    for kv in image_env {
        set(kv.clone());
    }
    for (k, v) in step_env {
        set(format!("{k}={v}"));
    }
    env
}

/// How much of one output line is shown; the rest is cut (a command that
/// prints gigabytes without a newline must not make kiln hold them).
pub(crate) const MAX_LINE: usize = 16 * 1024;
/// Kept past [`MAX_LINE`] until the line is masked, so a secret of up to
/// this size that starts before the cut is masked whole, never shown in part.
const LINE_SLACK: usize = 64 * 1024;

/// Splits a command's output into lines for the reporter, keeping the last
/// [`TAIL_LINES`] for the error if the command fails. A line holds at most
/// [`MAX_LINE`] + 64 KiB bytes; what is past that is counted, not kept.
#[derive(Default)]
pub(crate) struct Lines {
    tail: VecDeque<String>,
    partial: Vec<u8>,
    dropped: usize,
}

impl Lines {
    pub(crate) fn feed(&mut self, mut bytes: &[u8], on_line: &mut dyn FnMut(&str)) {
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            self.keep(&bytes[..i]);
            self.emit(on_line);
            bytes = &bytes[i + 1..];
        }
        self.keep(bytes);
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = (MAX_LINE + LINE_SLACK).saturating_sub(self.partial.len());
        let n = room.min(bytes.len());
        self.partial.extend_from_slice(&bytes[..n]);
        self.dropped += bytes.len() - n;
    }

    fn emit(&mut self, on_line: &mut dyn FnMut(&str)) {
        let mut line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
        if self.dropped > 0 {
            line.push_str(&format!(" [{} more bytes]", self.dropped));
        }
        self.partial.clear();
        self.dropped = 0;
        on_line(&line);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    pub(crate) fn finish(mut self, on_line: &mut dyn FnMut(&str)) -> Vec<String> {
        if !self.partial.is_empty() || self.dropped > 0 {
            self.emit(on_line);
        }
        self.tail.into()
    }
}

/// A line as shown, once masked: at most [`MAX_LINE`] bytes.
pub fn cut_line(line: String) -> String {
    if line.len() <= MAX_LINE {
        return line;
    }
    let mut end = MAX_LINE;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{} [cut: the line has {} bytes]", &line[..end], line.len())
}

/// Reads `r` to its end through [`Lines`], returning the last lines.
pub(crate) fn pump_lines(mut r: impl Read, on_line: &mut dyn FnMut(&str)) -> Vec<String> {
    let mut lines = Lines::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => lines.feed(&buf[..n], on_line),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    lines.finish(on_line)
}

#[cfg(test)]
mod tests {
    /// The docker backend's secret files sit in a folder only kiln's user
    /// can enter, whatever the umask: a file in it may be group- or
    /// world-readable for the step (its `mode`), or another user's.
    #[test]
    fn the_secret_folder_is_0700_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let old = rustix::process::umask(rustix::fs::Mode::empty());
        let dir = super::secret_dir();
        rustix::process::umask(old);
        let dir = dir.unwrap();
        let mode = std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    use super::*;

    #[test]
    fn an_emulator_counts_only_when_enabled_with_the_fix_binary_flag() {
        let on = "enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POCF\noffset 0\n";
        assert!(binfmt_runs_in_sandbox(on));
        assert!(
            !binfmt_runs_in_sandbox(&on.replace("POCF", "P")),
            "without F the interpreter is not found in a new root"
        );
        assert!(!binfmt_runs_in_sandbox(&on.replace("enabled", "disabled")));
    }

    #[test]
    fn the_environment_is_built_as_the_engine_builds_it() {
        let step = [("B".to_string(), "2".to_string()), ("PATH".to_string(), "/x".to_string())].into();
        let env = command_env(&["A=1".into(), "B=1".into()], &step);
        assert_eq!(env, vec!["PATH=/x", "HOSTNAME=kiln", "A=1", "B=2"]);
    }

    #[test]
    fn output_tails_keep_the_last_lines() {
        let text: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let mut seen = 0;
        let tail = pump_lines(text.as_bytes(), &mut |_| seen += 1);
        assert_eq!(seen, 30);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.last().unwrap(), "line 29");
    }
}
