//! The local backend: no daemon. The parent's layers are unpacked once into
//! the store (`v1/unpacked/DIFF_ID`, whiteouts as overlay expects them) and
//! stacked as overlay lower folders under a per-run init folder; the
//! command runs in the sandbox helper ([`super::sandbox`]); the overlay's
//! upper folder is what it changed.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use kiln_cache::Store;

use super::rootless::Mapping;
use super::sandbox::{
    make_init, InitPlan, RootlessPlan, SandboxSecret, SandboxSpec, SETUP_FAILED, TIMED_OUT,
};
use super::{RunRequest, RunResult};
use crate::changes;
use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::listing::Kind;

/// How the local backend runs here.
#[derive(Debug, Clone)]
pub(crate) enum Mode {
    /// As root: namespaces, overlay and owners directly.
    Root,
    /// As another user, in a user namespace mapping the user's subordinate ids.
    Rootless(Mapping),
}

/// Whether this process can run the local backend, and how.
pub(crate) fn available() -> Result<Mode, String> {
    if rustix::process::geteuid().is_root() {
        return Ok(Mode::Root);
    }
    Mapping::detect()
        .map(Mode::Rootless)
        .map_err(|why| format!("kiln is not root, and a rootless user namespace cannot be set up: {why}"))
}

/// The local backend as an [`Executor`](super::Executor).
#[derive(Debug)]
pub(crate) struct Local {
    pub(crate) mode: Mode,
}

impl super::Executor for Local {
    fn name(&self) -> &'static str {
        "local"
    }

    /// As root, layers are unpacked into the shared `unpacked/` folder as
    /// they are written; rootless ones are unpacked by the helper.
    fn unpack_dir(&self, store: &Store) -> Option<PathBuf> {
        matches!(self.mode, Mode::Root).then(|| unpacked_dir(store))
    }

    /// Moved into `unpacked/DIFF_ID` and sealed, as if unpacked there.
    /// When an earlier build's folder is there, it is kept if it still
    /// holds its seal (the staged one is removed first: unlinking its
    /// files touches the inodes they share with it through the pool).
    fn adopt_unpacked(
        &self,
        store: &Store,
        staged: &std::path::Path,
        diff_id: &kiln_cache::Digest,
        listing: &crate::listing::ListingFile,
    ) -> Result<bool, BuildError> {
        let Some(dir) = self.unpack_dir(store) else { return Ok(false) };
        fs::create_dir_all(&dir).map_err(BuildError::io_write(&dir))?;
        let dest = dir.join(diff_id.hex());
        if crate::unpack::adopt(staged, &dest)? {
            crate::unpack::seal(store, &dest, listing)?;
            return Ok(true);
        }
        let _ = fs::remove_dir_all(staged);
        Ok(crate::unpack::check_seal(store, &dest, &crate::unpack::pool_dir(store)))
    }

    fn has_unpacked(&self, store: &Store, diff_id: &kiln_cache::Digest) -> bool {
        let Some(dir) = self.unpack_dir(store) else { return false };
        crate::unpack::check_seal(store, &dir.join(diff_id.hex()), &crate::unpack::pool_dir(store))
    }

    fn run(
        &self,
        store: &Store,
        req: &RunRequest<'_>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<RunResult, BuildError> {
        run(store, &self.mode, req, on_line)
    }
}

/// Runs `req` in the sandbox; on success, the changes (whose file contents
/// live in the returned work folder until it is dropped).
fn run(
    store: &Store,
    mode: &Mode,
    req: &RunRequest<'_>,
    on_line: &mut dyn FnMut(&str),
) -> Result<RunResult, BuildError> {
    let t = std::time::Instant::now();
    let tmp = store.tmp_dir();
    let work =
        tempfile::Builder::new().prefix("run-").tempdir_in(&tmp).map_err(BuildError::io_write(&tmp))?;
    let w = work.path();
    // 0755 whatever the caller's umask: the upper folder is the sandbox's
    // `/`, which a non-root step must be able to enter.
    for d in ["upper", "work", "merged", "init", "secrets"] {
        let p = w.join(d);
        fs::create_dir(&p)
            .and_then(|()| fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)))
            .map_err(BuildError::io_write(&p))?;
    }
    let init = init_plan(req)?;
    // As root, kiln unpacks and makes the init folder itself; rootless, the
    // helper does both inside its user namespace, where it may set owners.
    let (lowers, rootless) = match mode {
        Mode::Root => {
            let lowers = unpack_layers(store, req.layers)?;
            make_init(&w.join("init"), &init).map_err(BuildError::io_write(w.join("init")))?;
            (lowers, None)
        }
        Mode::Rootless(m) => {
            let plan = RootlessPlan {
                cache_dir: store.root().parent().unwrap_or(store.root()).to_path_buf(),
                pool: store.file_pool_dir(Some(&m.tag())),
                layers: req
                    .layers
                    .iter()
                    .map(|l| (l.digest.to_string(), l.diff_id.to_string(), l.media_type.clone(), l.size))
                    .collect(),
                init,
                diff_out: w.join("diff.tar"),
            };
            (stack_names(req.layers), Some(plan))
        }
    };
    tracing::debug!(elapsed = ?t.elapsed(), layers = lowers.len(), "layers unpacked");

    // Secrets live in memory files the helper inherits and binds into the
    // sandbox: they are never a path on any filesystem, and nothing is left
    // behind whatever happens to kiln.
    let (_memfds, secrets) = sandbox_secrets(req.secrets)?;
    // /etc/hosts, /etc/hostname and /etc/resolv.conf as the engine makes them:
    // loopback names, the hostname, and the host's resolvers when the network is on.
    let mut etc_files = Vec::new();
    let resolv = if req.network { fs::read("/etc/resolv.conf").unwrap_or_default() } else { Vec::new() };
    for (name, content) in [
        ("hosts", super::HOSTS.as_bytes().to_vec()),
        ("hostname", format!("{}\n", super::HOSTNAME).into_bytes()),
        ("resolv.conf", resolv),
    ] {
        let p = w.join(format!("etc-{name}"));
        fs::write(&p, content).map_err(BuildError::io_write(&p))?;
        etc_files.push((name.to_string(), p));
    }
    let mut all_lowers = vec![w.join("init")];
    all_lowers.extend(lowers.into_iter().rev());
    let layers_dir = match mode {
        Mode::Root => unpacked_dir(store),
        Mode::Rootless(m) => rootless_unpacked_dir(store, m),
    };
    let spec = SandboxSpec {
        lowers: all_lowers,
        layers_dir,
        upper: w.join("upper"),
        work: w.join("work"),
        merged: w.join("merged"),
        argv: req.argv.clone(),
        env: req.env.clone(),
        user: req.user.clone(),
        workdir: req.workdir.clone(),
        network: req.network,
        hostname: super::HOSTNAME.into(),
        secrets: secrets.clone(),
        secret_dir: w.join("secrets"),
        cache_mounts: req.cache_mounts.to_vec(),
        etc_files,
        rootless: rootless.clone(),
        timeout_ms: req.timeout.map(|t| t.as_millis().max(1) as u64),
        timed_out: w.join("timed-out"),
    };
    let spec_path = w.join("spec.json");
    fs::write(&spec_path, serde_json::to_vec(&spec).expect("json"))
        .map_err(BuildError::io_write(&spec_path))?;

    let (reader, writer) = std::io::pipe().map_err(BuildError::io_write(&tmp))?;
    let mut command = helper_command("__sandbox", &spec_path, &secrets)?;
    let mut child = command
        .stdin(if rootless.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(writer.try_clone().map_err(BuildError::io_write(&tmp))?)
        .stderr(writer)
        .spawn()
        .map_err(|e| BuildError::Environment {
            message: format!("Cannot start the sandbox helper: {e}"),
            hint: "check that kiln's executable can be run".into(),
        })?;
    // The command holds kiln's copies of the pipe's write end: drop them, or
    // the output would never end.
    drop(command);
    let mut reader = std::io::BufReader::new(reader);
    if let Mode::Rootless(m) = mode {
        map_user_namespace(&mut child, &mut reader, m)?;
    }
    let tail = super::pump_lines(reader, on_line);
    let status = child.wait().map_err(BuildError::io_read(&spec_path))?;
    tracing::debug!(elapsed = ?t.elapsed(), %status, "command finished");
    let code = status.code().unwrap_or(128);
    // 125 with the helper's own last word is the sandbox failing, not the command.
    let setup = tail.last().filter(|l| code == SETUP_FAILED && l.starts_with("kiln sandbox:"));
    if let Some(why) = setup {
        return Err(BuildError::Environment {
            message: format!("The local sandbox could not be set up: {}", why.trim_start_matches("kiln sandbox: ")),
            hint: "the local backend needs root (or subordinate ids) and overlayfs; inside an unprivileged container, `--backend container` (as root); `--backend docker` runs steps in a Docker engine instead"
                .into(),
        });
    }
    // The helper's file, out of the command's reach: a command cannot fake it.
    if code == TIMED_OUT && req.timeout.is_some() && w.join("timed-out").exists() {
        return Ok(RunResult::TimedOut { tail });
    }
    if !status.success() {
        return Ok(RunResult::Failed { code, tail });
    }
    let changes = match &rootless {
        None => changes::from_upper(&w.join("upper"), crate::unpack::OPAQUE_TRUSTED)?,
        // The helper wrote the changes as a layer tar, with the namespace's ids.
        Some(plan) => changes::from_tar(&plan.diff_out, 0, None)?,
    };
    tracing::debug!(elapsed = ?t.elapsed(), changes = changes.len(), "upper folder read");
    Ok(RunResult::Changed { changes, keep: Box::new(work) })
}

/// The secrets as a helper gets them: each in a memory file (kept open
/// by the returned descriptors while the helper runs) it inherits.
pub(crate) fn sandbox_secrets(
    secrets: &[crate::SecretFile],
) -> Result<(Vec<std::os::fd::OwnedFd>, Vec<SandboxSecret>), BuildError> {
    let memfds = secret_memfds(secrets)?;
    let handed = secrets
        .iter()
        .zip(&memfds)
        .map(|(s, fd)| SandboxSecret {
            id: s.id.clone(),
            fd: std::os::fd::AsRawFd::as_raw_fd(fd),
            uid: s.uid,
            gid: s.gid,
            mode: s.mode,
        })
        .collect();
    Ok((memfds, handed))
}

/// Starts building `kiln SUBCOMMAND SPEC` (the sandbox or chroot helper):
/// kiln's own executable, an empty environment, and the secrets' memory
/// files made inheritable in the child only.
pub(crate) fn helper_command(
    subcommand: &str,
    spec: &std::path::Path,
    secrets: &[SandboxSecret],
) -> Result<Command, BuildError> {
    let exe = std::env::current_exe().map_err(|e| BuildError::Environment {
        message: format!("Cannot find kiln's own executable to start the step's helper: {e}"),
        hint: "run kiln from a path that exists".into(),
    })?;
    let mut command = Command::new(exe);
    if !secrets.is_empty() {
        let fds: Vec<i32> = secrets.iter().map(|s| s.fd).collect();
        // SAFETY: only fcntl between fork and exec (async-signal-safe); the
        // descriptors stay close-on-exec in kiln, so no other child (a
        // step of another stage) ever inherits them.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, move || {
                for fd in &fds {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    command.arg(subcommand).arg(spec).env_clear();
    Ok(command)
}

/// Each secret in a sealed memory file (`memfd`), 0400, close-on-exec.
fn secret_memfds(secrets: &[crate::SecretFile]) -> Result<Vec<std::os::fd::OwnedFd>, BuildError> {
    use std::io::Write as _;
    let mut out = Vec::new();
    for crate::SecretFile { id, value, .. } in secrets {
        let err = |e: std::io::Error| BuildError::Environment {
            message: format!("Cannot hold the secret `{id}` in memory: {e}"),
            hint: "the local backend keeps secrets in memfd files (Linux 3.17+)".into(),
        };
        let fd = rustix::fs::memfd_create("kiln-secret", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| err(e.into()))?;
        let mut f = fs::File::from(fd);
        f.write_all(value).map_err(err)?;
        rustix::fs::fchmod(&f, rustix::fs::Mode::from_raw_mode(0o400)).map_err(|e| err(e.into()))?;
        out.push(std::os::fd::OwnedFd::from(f));
    }
    Ok(out)
}

/// What rootless runs left that only a user namespace can remove (their
/// files belong to subordinate ids), after a prune or gc of the store. As
/// root, the store's own gc removed it already, or it is removed here.
pub fn remove_rootless_garbage(store: &Store, waiting: &dyn Fn()) -> Result<(), BuildError> {
    let _lock = store.lock_exclusive(waiting)?;
    // Twice: pool files become garbage once the layer folders linking them are gone.
    for _ in 0..2 {
        let garbage = store.rootless_garbage();
        if garbage.is_empty() {
            break;
        }
        if rustix::process::geteuid().is_root() {
            for p in garbage {
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        } else if Mapping::detect().is_ok() {
            remove_rootless(&garbage)?;
        } else {
            break; // nothing this user can do; `gc` as root removes it
        }
    }
    store.sweep_seals();
    Ok(())
}

/// Removes `paths` (files of a rootless run: their owners are the user's
/// subordinate ids) from inside a mapped user namespace.
fn remove_rootless(paths: &[PathBuf]) -> Result<(), BuildError> {
    if paths.is_empty() {
        return Ok(());
    }
    let env_err = |message: String| BuildError::Environment {
        message,
        hint: "remove them as root, or check /etc/subuid and newuidmap".into(),
    };
    let m = Mapping::detect().map_err(|why| env_err(format!("Cannot remove rootless layers: {why}")))?;
    let exe = std::env::current_exe().map_err(|e| env_err(format!("Cannot find kiln's executable: {e}")))?;
    let mut child = Command::new(exe)
        .arg("__userns-rm")
        .args(paths)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .env_clear()
        .spawn()
        .map_err(|e| env_err(format!("Cannot start the cleanup helper: {e}")))?;
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    map_user_namespace(&mut child, &mut out, &m)?;
    let status = child.wait().map_err(|e| env_err(format!("The cleanup helper failed: {e}")))?;
    if !status.success() {
        return Err(env_err("Some rootless files could not be removed".into()));
    }
    Ok(())
}

/// The helper says when its user namespace exists (a line on `out`); kiln
/// writes its id maps (newuidmap runs as a separate, setuid process) and
/// lets it go on (a byte on its stdin). On failure the helper is killed.
fn map_user_namespace(
    child: &mut std::process::Child,
    out: &mut impl std::io::BufRead,
    m: &Mapping,
) -> Result<(), BuildError> {
    let mut line = String::new();
    let _ = out.read_line(&mut line);
    let mut go = child.stdin.take().expect("stdin is piped for a rootless helper");
    let failed = if line.trim_end() != super::sandbox::USERNS_READY {
        Some(format!("The rootless helper did not start: {}", line.trim()))
    } else {
        m.apply(child.id()).err().map(|why| format!("Cannot map the helper's user namespace: {why}"))
    };
    if let Some(message) = failed {
        drop(go);
        let _ = child.kill();
        let _ = child.wait();
        return Err(BuildError::Environment {
            message,
            hint: "check that unprivileged user namespaces are enabled and that /etc/subuid and /etc/subgid give this user ids, or use `--backend docker`".into(),
        });
    }
    let _ = std::io::Write::write_all(&mut go, b"1");
    Ok(())
}

/// Unpacked layers for a rootless mapping: their owners are that mapping's ids.
pub(crate) fn rootless_unpacked_dir(store: &Store, m: &Mapping) -> PathBuf {
    store.unpacked_dir(Some(&m.tag()))
}

pub(crate) fn unpacked_dir(store: &Store) -> PathBuf {
    store.unpacked_dir(None)
}

/// Each layer unpacked once into `unpacked/DIFF_ID` (returned as relative
/// names, bottom first, a layer repeated kept at its topmost place only:
/// applying a layer again on top makes the lower copy invisible).
pub(crate) fn unpack_layers(store: &Store, layers: &[ImageLayer]) -> Result<Vec<PathBuf>, BuildError> {
    let dir = unpacked_dir(store);
    for l in layers {
        crate::unpack::unpack_into(
            store,
            l,
            &dir,
            crate::unpack::pool_dir(store),
            crate::unpack::OPAQUE_TRUSTED,
        )?;
    }
    Ok(stack_names(layers))
}

/// The layers' folder names, bottom first, a layer repeated kept at its
/// topmost place only.
pub(crate) fn stack_names(layers: &[ImageLayer]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for l in layers {
        let name = PathBuf::from(l.diff_id.hex());
        out.retain(|n| n != &name);
        out.push(name);
    }
    out
}

pub(crate) fn init_plan(req: &RunRequest<'_>) -> Result<InitPlan, BuildError> {
    let mut plan = InitPlan::default();
    // What Docker's init layer always holds (moby daemon/initlayer): folders
    // 0755 root, empty files 0755.
    for d in ["dev", "dev/pts", "dev/shm", "proc", "sys", "etc"] {
        plan.dirs.push((d.into(), 0o755, 0, 0));
    }
    for f in ["etc/resolv.conf", "etc/hosts", "etc/hostname", "dev/console"] {
        plan.files.push((f.into(), 0o755));
    }
    plan.symlinks.push(("etc/mtab".into(), "/proc/mounts".into()));
    // Secret mount points; their folders copy what the image has, so a
    // copy-up records the image's metadata, as with the engine.
    if !req.secrets.is_empty() {
        for dir in ["run", "run/secrets"] {
            let (mode, uid, gid) = match req.tree.get(dir)? {
                Some(e) if matches!(e.kind, Kind::Dir) => (e.mode, e.uid, e.gid),
                _ => (0o755, 0, 0),
            };
            plan.dirs.push((dir.into(), mode, uid, gid));
        }
        for s in req.secrets {
            plan.files.push((format!("run/secrets/{}", s.id), 0o400));
        }
    }
    // Cache mounts' points and the folders above them, in this folder below
    // the command's, so none of them is a change; a folder the image has
    // keeps its metadata.
    for m in req.cache_mounts {
        let mut at = String::new();
        for part in m.target.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if plan.dirs.iter().any(|(d, ..)| *d == at) {
                continue;
            }
            let (mode, uid, gid) = match req.tree.get(&at)? {
                Some(e) if matches!(e.kind, Kind::Dir) => (e.mode, e.uid, e.gid),
                _ => (0o755, 0, 0),
            };
            plan.dirs.push((at.clone(), mode, uid, gid));
        }
    }
    Ok(plan)
}
