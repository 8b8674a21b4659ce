//! The container backend: `run` steps where kiln itself runs in an
//! unprivileged container (a Kubernetes pod, a CI runner with Docker's
//! default profile), which refuses new namespaces and mounts. The
//! container is the sandbox; inside it, each step gets a root of its own:
//!
//! 1. the parent image flattened into a fresh folder ([`kiln_oci::flatten`])
//!    with its owners, modes, capabilities and times, then the folders and
//!    files Docker's init layer holds (as the local backend's init folder);
//!    cache mounts renamed into place;
//! 2. a stamp of every path (inode, ctime, type);
//! 3. the command run by a single-threaded helper (`kiln __chroot`), in a
//!    `chroot` to that folder, with the engine's default capabilities minus
//!    `CAP_SYS_CHROOT` and `CAP_MKNOD`, and (network off) a seccomp filter
//!    that refuses IP sockets;
//! 4. the folder walked again: a path whose inode, ctime or type changed,
//!    or that is new, is a change, with the folders above it (as overlayfs
//!    copies them up); a path gone is a whiteout; a folder remade is opaque.
//!
//! ctime is set by the kernel on every change of content or metadata and
//! cannot be set back, so the stamps see what the command did. kiln waits
//! for the clock to pass the newest stamp before the command starts, so a
//! change in the same clock tick still shows.
//!
//! The same [`changes`](crate::changes) normalization follows, so the layer
//! is the local backend's, byte for byte (a test builds the examples with
//! both). Why not kaniko's way (the parent laid into the container's own
//! `/`): it deletes the container's own files, kiln's included, and needs
//! the container to be throwaway; a folder per step keeps kiln and the
//! container intact and lets steps of different stages run side by side.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_cache::Store;
use rustix::fs::{AtFlags, FileType, Mode};
use serde::{Deserialize, Serialize};

use super::sandbox::{InitPlan, SandboxSecret, SETUP_FAILED, TIMED_OUT};
use super::{RunRequest, RunResult};
use crate::changes::{self, Change, ChangeKind};
use crate::error::BuildError;
use crate::rootdir::{self, RootDir};

/// The container backend as an [`Executor`](super::Executor).
#[derive(Debug)]
pub(crate) struct Container;

/// Whether this process can run the container backend: it needs root (in
/// the container) for owners, `chroot` and the user switch.
pub(crate) fn available() -> Result<(), String> {
    if !rustix::process::geteuid().is_root() {
        return Err(
            "kiln is not root in this container (the container backend sets owners and changes root)".into(),
        );
    }
    // A step with fewer capabilities than the engine gives would make
    // other files than on the other backends under the same key, and
    // spread them through a shared cache: refuse rather than build.
    let have =
        rustix::thread::capabilities(None).map_err(|e| format!("cannot read kiln's capabilities: {e}"))?;
    let missing: Vec<&str> = NEEDED_CAPS
        .iter()
        .filter(|(bit, _)| {
            !have.permitted.contains(rustix::thread::CapabilitySet::from_bits_retain(1 << bit))
        })
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "this container lacks {} of Docker's default capabilities, which the container backend needs (steps would make other files than elsewhere)",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// The capabilities the container backend needs: the engine's default set
/// that steps keep (so a step does what it does on the other backends),
/// and CAP_SYS_CHROOT, CAP_KILL, CAP_SETPCAP and CAP_MKNOD for the helper.
/// NET_RAW, NET_BIND_SERVICE and AUDIT_WRITE are not needed to make files.
const NEEDED_CAPS: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (1, "CAP_DAC_OVERRIDE"),
    (3, "CAP_FOWNER"),
    (4, "CAP_FSETID"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (18, "CAP_SYS_CHROOT"),
    (27, "CAP_MKNOD"),
    (31, "CAP_SETFCAP"),
];

/// Whether kiln runs in a container: the files and variables engines and
/// Kubernetes leave (`/.dockerenv`, `/run/.containerenv`,
/// `KUBERNETES_SERVICE_HOST`, `container=`), or a container's cgroup.
pub(crate) fn in_container() -> bool {
    if Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists() {
        return true;
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() || std::env::var_os("container").is_some() {
        return true;
    }
    fs::read_to_string("/proc/1/cgroup")
        .is_ok_and(|c| ["docker", "kubepods", "containerd", "libpod", "lxc"].iter().any(|k| c.contains(k)))
}

/// Whether the local sandbox's first calls (new mount, PID, IPC, UTS and
/// network namespaces; `/` made private) work here, tried in a helper
/// process (`kiln __probe-namespaces`), since kiln's own process has threads.
pub(crate) fn namespaces_work() -> bool {
    let Ok(exe) = std::env::current_exe() else { return false };
    Command::new(exe)
        .arg("__probe-namespaces")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env_clear()
        .status()
        .is_ok_and(|s| s.success())
}

/// `kiln __probe-namespaces`: exits 0 when the namespaces can be made.
pub fn probe_main() -> ! {
    use nix::sched::{unshare, CloneFlags};
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    let ok = unshare(flags).is_ok()
        && nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .is_ok();
    std::process::exit(if ok { 0 } else { 1 })
}

/// What the helper needs, written by kiln as JSON.
#[derive(Debug, Serialize, Deserialize)]
struct ChrootSpec {
    root: PathBuf,
    argv: Vec<String>,
    env: Vec<String>,
    user: String,
    workdir: String,
    network: bool,
    /// Written into the empty files at /run/secrets/ID while the step runs.
    secrets: Vec<SandboxSecret>,
    timeout_ms: Option<u64>,
    timed_out: PathBuf,
    /// Where the helper says why it could not run the step (a file the
    /// command cannot reach, so its own output cannot pose as kiln's).
    failed: PathBuf,
}

/// Paths the engine owns in a container, never a change: /dev, /proc and
/// /sys (mounts there), the per-run /etc files, the secrets, the cache mounts.
struct Excluded(Vec<String>);

impl Excluded {
    fn of(req: &RunRequest<'_>) -> Excluded {
        let mut paths: Vec<String> =
            ["dev", "proc", "sys", "etc/hosts", "etc/hostname", "etc/resolv.conf"].map(String::from).into();
        paths.extend(req.secrets.iter().map(|s| format!("run/secrets/{}", s.id)));
        paths.extend(req.cache_mounts.iter().map(|m| m.target.clone()));
        Excluded(paths)
    }

    fn holds(&self, rel: &str) -> bool {
        self.0.iter().any(|p| rel == p || rel.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('/')))
    }
}

/// A path's identity before the command: a changed inode, birth time,
/// ctime or type is a change. The birth time tells a folder removed and
/// made again apart from the one it replaced when the file system gives
/// the new one the old inode number (it often does, at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    born: Option<(i64, u32)>,
    ctime: (i64, i64),
    kind: u32,
}

impl Stamp {
    fn of(path: &Path, md: &fs::Metadata) -> Stamp {
        let born = rustix::fs::statx(
            rustix::fs::CWD,
            path,
            AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::BTIME,
        )
        .ok()
        .filter(|x| x.stx_mask & rustix::fs::StatxFlags::BTIME.bits() != 0)
        .map(|x| (x.stx_btime.tv_sec, x.stx_btime.tv_nsec));
        Stamp { ino: md.ino(), born, ctime: (md.ctime(), md.ctime_nsec()), kind: md.mode() & libc::S_IFMT }
    }

    fn is_dir(&self) -> bool {
        self.kind == libc::S_IFDIR
    }

    /// The same inode as `other` (not one made since under its number).
    fn same_inode(&self, other: &Stamp) -> bool {
        self.ino == other.ino && self.born == other.born
    }
}

/// A path found under the root.
struct Found {
    rel: String,
    path: PathBuf,
    md: fs::Metadata,
    stamp: Stamp,
}

/// Every path under `root` but the excluded ones, with its metadata.
fn walk(root: &Path, excluded: &Excluded) -> Result<Vec<Found>, BuildError> {
    let mut out = Vec::new();
    let it = walkdir::WalkDir::new(root).follow_links(false).min_depth(1).into_iter().filter_entry(|e| {
        e.path().strip_prefix(root).ok().and_then(Path::to_str).is_none_or(|rel| !excluded.holds(rel))
    });
    for entry in it {
        let entry = entry.map_err(|e| BuildError::Read {
            path: e.path().unwrap_or(root).to_path_buf(),
            source: e.into_io_error().unwrap_or_else(|| std::io::Error::other("walk failed")),
        })?;
        let path = entry.path().to_path_buf();
        let md = fs::symlink_metadata(&path).map_err(BuildError::io_read(&path))?;
        let rel = path.strip_prefix(root).expect("under root");
        let rel = rel.to_str().map(str::to_string).ok_or_else(|| {
            BuildError::usage(
                format!(
                    "the command made `/{}`, whose name is not UTF-8",
                    crate::error::shown(&rel.to_string_lossy())
                ),
                Some("kiln layers hold UTF-8 paths only; rename the file in the command"),
            )
        })?;
        let stamp = Stamp::of(&path, &md);
        out.push(Found { rel, path, md, stamp });
    }
    Ok(out)
}

/// The changes between `before` and the folder as it is now, as an
/// overlay's upper folder would hold them.
fn diff(
    root: &Path,
    before: &HashMap<String, Stamp>,
    excluded: &Excluded,
) -> Result<Vec<Change>, BuildError> {
    let now = walk(root, excluded)?;
    let stamps: HashMap<&str, Stamp> = now.iter().map(|f| (f.rel.as_str(), f.stamp)).collect();
    // A folder that is not the one the image had (removed and made again,
    // or made where a file was) hides what was below it: opaque.
    let remade = |rel: &str| {
        before
            .get(rel)
            .is_some_and(|b| stamps.get(rel).is_some_and(|n| n.is_dir() && (!n.same_inode(b) || !b.is_dir())))
    };
    let mut keep: std::collections::HashSet<String> = std::collections::HashSet::new();
    let add_with_parents = |rel: &str, keep: &mut std::collections::HashSet<String>| {
        let mut at = rel;
        while keep.insert(at.to_string()) {
            match at.rsplit_once('/') {
                Some((parent, _)) => at = parent,
                None => break,
            }
        }
    };
    for f in &now {
        if before.get(f.rel.as_str()) != Some(&f.stamp) {
            add_with_parents(&f.rel, &mut keep);
        }
    }
    // A path gone, below a folder that is still the image's: a whiteout
    // (below one gone or remade, the folder's own entry hides it).
    let mut whiteouts = Vec::new();
    for rel in before.keys() {
        if stamps.contains_key(rel.as_str()) {
            continue; // replaced: the new entry is a change above
        }
        let parent_kept = match rel.rsplit_once('/') {
            Some((parent, _)) => before
                .get(parent)
                .is_some_and(|pb| stamps.get(parent).is_some_and(|pn| pn.same_inode(pb) && pn.is_dir())),
            None => true,
        };
        if parent_kept {
            if let Some((parent, _)) = rel.rsplit_once('/') {
                add_with_parents(parent, &mut keep);
            }
            whiteouts.push(rel.clone());
        }
    }
    let mut out = Vec::new();
    for Found { rel, path, md, .. } in &now {
        if !keep.contains(rel.as_str()) {
            continue;
        }
        let opaque = remade(rel);
        if let Some(c) = changes::change_of(path, Path::new(rel), md, &|_| opaque)? {
            out.push(c);
        }
    }
    for rel in whiteouts {
        out.push(Change {
            path: rel,
            mode: 0,
            uid: 0,
            gid: 0,
            kind: ChangeKind::Whiteout,
            xattrs: Vec::new(),
        });
    }
    Ok(out)
}

/// Makes what Docker's init layer holds in the root (as the local backend's
/// init folder does), through [`RootDir`]: /dev (with the host's harmless
/// nodes), /proc and /sys emptied, the per-run /etc files with their
/// content, the secrets' empty files, the cache mounts' folders.
fn apply_init(root: &Path, plan: &InitPlan, etc_files: &[(&str, Vec<u8>)]) -> std::io::Result<()> {
    let mut rd = RootDir::open(root)?;
    for d in ["dev", "proc", "sys"] {
        rd.remove(d)?;
    }
    for (rel, mode, uid, gid) in &plan.dirs {
        let (dir, name) = rd.parent(rel, Some(&mut |_| {}))?;
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {}
            Ok(_) => {
                rd.remove_in(&dir, name)?;
                rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))?;
            }
            Err(rustix::io::Errno::NOENT) => rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))?,
            Err(e) => return Err(e.into()),
        }
        rustix::fs::chownat(
            &dir,
            name,
            Some(rustix::process::Uid::from_raw(*uid)),
            Some(rustix::process::Gid::from_raw(*gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        rustix::fs::chmodat(&dir, name, Mode::from_raw_mode(*mode), AtFlags::empty())?;
    }
    for (rel, mode) in &plan.files {
        let (dir, name) = rd.parent(rel, Some(&mut |_| {}))?;
        rd.remove_in(&dir, name)?;
        let content = etc_files.iter().find(|(n, _)| rel.strip_prefix("etc/") == Some(*n));
        // The per-run /etc files are what the local backend binds over them (0644).
        let mode = if content.is_some() { 0o644 } else { *mode };
        let mut f = rootdir::create_file(&dir, name, mode)?;
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
        if let Some((_, bytes)) = content {
            std::io::Write::write_all(&mut f, bytes)?;
        }
    }
    for (rel, target) in &plan.symlinks {
        let (dir, name) = rd.parent(rel, Some(&mut |_| {}))?;
        rd.remove_in(&dir, name)?;
        rustix::fs::symlinkat(target.as_str(), &dir, name)?;
    }
    // A small /dev as the engine gives it: the host's harmless nodes.
    let (root_fd, _) = rd.parent("dev/x", None)?;
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let host = fs::metadata(Path::new("/dev").join(node))?;
        if !host.file_type().is_char_device() {
            continue;
        }
        rustix::fs::mknodat(
            &root_fd,
            node,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            host.rdev(),
        )?;
        rustix::fs::chmodat(&root_fd, node, Mode::from_raw_mode(0o666), AtFlags::empty())?;
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        rustix::fs::symlinkat(target, &root_fd, name)?;
    }
    match rustix::fs::mkdirat(&root_fd, "mqueue", Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    rustix::fs::chmodat(&root_fd, "shm", Mode::from_raw_mode(0o1777), AtFlags::empty())?;
    Ok(())
}

/// A cache mount moved into a step's root, moved back by [`MovedMount::put_back`].
struct MovedMount {
    host: PathBuf,
    target: String,
    _lock: kiln_cache::StoreLock,
}

/// Renames each cache mount's folder into the root at its target (the
/// image's folder there goes to `aside`), holding a lock so no other step
/// looks for it meanwhile. Same filesystem as the store: a rename, no copy.
fn move_mounts_in(
    root: &Path,
    aside: &Path,
    mounts: &[crate::CacheMountRequest],
) -> Result<MovedMounts, BuildError> {
    let mut moved = MovedMounts { root: root.to_path_buf(), moved: Vec::new(), safe: true };
    // Locked in one order (the store's paths), so two steps taking the
    // same mounts never wait for each other.
    let mut order: Vec<(usize, &crate::CacheMountRequest)> = mounts.iter().enumerate().collect();
    order.sort_by(|a, b| a.1.host.cmp(&b.1.host));
    for (i, m) in order {
        let lock_path = m.host.with_file_name("moved.lock");
        let lock =
            kiln_cache::StoreLock::exclusive(&lock_path, &|| {}).map_err(BuildError::io_write(&lock_path))?;
        if let Some((uid, gid)) = m.owner {
            std::os::unix::fs::lchown(&m.host, Some(uid), Some(gid))
                .map_err(BuildError::io_write(&m.host))?;
        }
        let mut rd = RootDir::open(root).map_err(BuildError::io_write(root))?;
        let at = root.join(&m.target);
        let (dir, name) = rd.parent(&m.target, None).map_err(BuildError::io_write(&at))?;
        let aside_fd =
            rustix::fs::open(aside, rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY, Mode::empty())
                .map_err(|e| BuildError::io_write(aside)(e.into()))?;
        match rustix::fs::renameat(&dir, name, &aside_fd, format!("mount-{i}").as_str()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(BuildError::io_write(&at)(e.into())),
        }
        rustix::fs::renameat(rustix::fs::CWD, &m.host, &dir, name).map_err(|e| BuildError::Environment {
            message: format!("Cannot move the cache `/{}` into the step's root: {e}", m.target),
            hint: "the container backend moves a cache mount into place; keep the cache folder on one filesystem".into(),
        })?;
        moved.moved.push(MovedMount { host: m.host.clone(), target: m.target.clone(), _lock: lock });
    }
    Ok(moved)
}

/// The cache mounts moved into a root: put back when dropped, whatever
/// ended the step, unless `safe` was cleared (a helper that did not exit
/// on its own may have left a process inside one).
struct MovedMounts {
    root: PathBuf,
    moved: Vec<MovedMount>,
    safe: bool,
}

impl Drop for MovedMounts {
    fn drop(&mut self) {
        if self.safe {
            for m in self.moved.drain(..) {
                m.put_back(&self.root);
            }
        }
    }
}

impl MovedMount {
    /// Back to the store; what the step left there in place of a folder
    /// is dropped (the store makes the folder again on its next use).
    fn put_back(self, root: &Path) {
        let Ok(mut rd) = RootDir::open(root) else { return };
        let Ok((dir, name)) = rd.parent(&self.target, None) else { return };
        match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let _ = rustix::fs::renameat(&dir, name, rustix::fs::CWD, &self.host);
            }
            _ => {}
        }
    }
}

impl super::Executor for Container {
    fn name(&self) -> &'static str {
        "container"
    }

    /// This backend can mount nothing: a command that looked for /proc or
    /// /sys did not find them.
    fn failure_note(&self, tail: &[String]) -> Option<kiln_oci::error::FailNote> {
        tail.iter()
            .any(|l| l.contains("/proc") || l.contains("/sys"))
            .then_some(kiln_oci::error::FailNote::NoProcInContainer)
    }

    fn run(
        &self,
        store: &Store,
        req: &RunRequest<'_>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<RunResult, BuildError> {
        // A step with secrets runs alone: steps of other stages share its
        // user and the container's PID namespace, and could read its memory.
        let _turn = if req.secrets.is_empty() {
            Turn::Shared(STEPS.read().unwrap_or_else(|e| e.into_inner()))
        } else {
            Turn::Alone(STEPS.write().unwrap_or_else(|e| e.into_inner()))
        };
        let t = std::time::Instant::now();
        let tmp = store.tmp_dir();
        sweep_dead_roots(&tmp);
        let work = tempfile::Builder::new()
            .prefix(&format!("{ROOT_PREFIX}{}-", std::process::id()))
            .tempdir_in(&tmp)
            .map_err(BuildError::io_write(&tmp))?;
        let alive = work.path().join("alive");
        let alive = kiln_cache::StoreLock::exclusive(&alive, &|| {}).map_err(BuildError::io_write(&alive))?;
        let w = work.path();
        let root = w.join("root");
        let aside = w.join("aside");
        for d in [&root, &aside] {
            fs::create_dir(d).map_err(BuildError::io_write(d))?;
            fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(BuildError::io_write(d))?;
        }
        let tree = crate::fstree::TreeMap::of(req.tree)?;
        let flat = kiln_oci::flatten::flatten(store, req.layers, &tree, &root, true)?;
        kiln_oci::flatten::own_as_root(&root, &flat)?;
        let plan = super::local::init_plan(req)?;
        let resolv = if req.network { fs::read("/etc/resolv.conf").unwrap_or_default() } else { Vec::new() };
        let etc_files = [
            ("hosts", super::HOSTS.as_bytes().to_vec()),
            ("hostname", format!("{}\n", super::HOSTNAME).into_bytes()),
            ("resolv.conf", resolv),
        ];
        apply_init(&root, &plan, &etc_files).map_err(BuildError::io_write(&root))?;
        let mut moved = move_mounts_in(&root, &aside, req.cache_mounts)?;
        let excluded = Excluded::of(req);
        let before: HashMap<String, Stamp> =
            walk(&root, &excluded)?.into_iter().map(|f| (f.rel, f.stamp)).collect();
        wait_for_the_clock(w, before.values().map(|s| s.ctime).max().unwrap_or((0, 0)))
            .map_err(BuildError::io_write(w))?;
        tracing::debug!(elapsed = ?t.elapsed(), paths = before.len(), "root laid out");

        let (_memfds, secrets) = super::local::sandbox_secrets(req.secrets)?;
        let spec = ChrootSpec {
            root: root.clone(),
            argv: req.argv.clone(),
            env: req.env.clone(),
            user: req.user.clone(),
            workdir: req.workdir.clone(),
            network: req.network,
            secrets: secrets.clone(),
            timeout_ms: req.timeout.map(|t| t.as_millis().max(1) as u64),
            timed_out: w.join("timed-out"),
            failed: w.join("setup-failed"),
        };
        let spec_path = w.join("spec.json");
        fs::write(&spec_path, serde_json::to_vec(&spec).expect("json"))
            .map_err(BuildError::io_write(&spec_path))?;
        let result = run_helper(&spec_path, &secrets, on_line);
        // The helper's exit, as it ended: a helper that did not exit on its
        // own (killed from outside) may have left processes of the step, so
        // nothing is moved out of the root then.
        let exited = matches!(result, Ok((_, _, true)));
        let result = result.and_then(|(code, tail, _)| {
            // The helper's own file says whether it failed; the command's output cannot.
            let why = fs::read_to_string(w.join("setup-failed")).unwrap_or_default();
            if code == SETUP_FAILED && !why.is_empty() {
                return Err(BuildError::Environment {
                    message: format!("The container backend could not run the step: {why}"),
                    hint: "the container backend needs root in the container and Docker's default capabilities (CAP_SYS_CHROOT, CAP_SETUID, CAP_SETGID, CAP_CHOWN, CAP_FOWNER, CAP_KILL, CAP_MKNOD, CAP_SETPCAP)".into(),
                });
            }
            if code == TIMED_OUT && req.timeout.is_some() && w.join("timed-out").exists() {
                return Ok(RunResult::TimedOut { tail });
            }
            if code != 0 {
                return Ok(RunResult::Failed { code, tail });
            }
            let changes = diff(&root, &before, &excluded)?;
            tracing::debug!(elapsed = ?t.elapsed(), changes = changes.len(), "root compared");
            Ok(RunResult::Changed { changes, keep: Box::new(()) })
        });
        moved.safe = exited;
        drop(moved);
        match result? {
            // The folder goes first, then its lock (fields drop in order).
            RunResult::Changed { changes, .. } => {
                Ok(RunResult::Changed { changes, keep: Box::new((work, alive)) })
            }
            other => Ok(other),
        }
    }
}

/// Waits until a file made now gets a ctime past `newest`: the kernel
/// stamps with a clock that ticks every few milliseconds, and a change the
/// command makes in the tick the layout ended in would look like none.
fn wait_for_the_clock(dir: &Path, newest: (i64, i64)) -> std::io::Result<()> {
    let probe = dir.join("clock");
    for _ in 0..1000 {
        fs::write(&probe, b"")?;
        let md = fs::symlink_metadata(&probe)?;
        if (md.ctime(), md.ctime_nsec()) > newest {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(std::io::Error::other("the file system's clock does not move"))
}

/// One step's turn at the container backend (see [`STEPS`]).
enum Turn {
    Shared(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

/// Steps with secrets take this alone; the others share it.
static STEPS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// The step roots' folder names in the store's tmp folder: `chroot-PID-…`.
const ROOT_PREFIX: &str = "chroot-";

/// Removes step roots a killed kiln left, secrets included. A live step
/// holds a lock on its root's `alive` file (a lock, not a pid: kilns in
/// other containers may share the cache folder, each with its own pids).
fn sweep_dead_roots(tmp: &Path) {
    let Ok(rd) = fs::read_dir(tmp) else { return };
    for e in rd.flatten() {
        if !e.file_name().to_str().is_some_and(|n| n.starts_with(ROOT_PREFIX)) {
            continue;
        }
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let alive = e.path().join("alive");
        if fs::symlink_metadata(&alive).is_err() {
            // Made a moment ago, its lock not yet taken; or a root far older.
            let young = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().map(|d| d < std::time::Duration::from_secs(60)).unwrap_or(true));
            if !young {
                let _ = fs::remove_dir_all(e.path());
            }
            continue;
        }
        if let Ok(Some(_dead)) = kiln_cache::StoreLock::try_exclusive(&alive) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Starts `kiln __chroot SPEC` with the secrets' memory files, sends its
/// output to `on_line`; its exit code, last lines, and whether it exited
/// (rather than being killed by a signal).
fn run_helper(
    spec_path: &Path,
    secrets: &[SandboxSecret],
    on_line: &mut dyn FnMut(&str),
) -> Result<(i32, Vec<String>, bool), BuildError> {
    let (reader, writer) = std::io::pipe().map_err(BuildError::io_write(spec_path))?;
    let mut command = super::local::helper_command("__chroot", spec_path, secrets)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(writer.try_clone().map_err(BuildError::io_write(spec_path))?)
        .stderr(writer)
        .spawn()
        .map_err(|e| BuildError::Environment {
            message: format!("Cannot start the step's helper: {e}"),
            hint: "check that kiln's executable can be run".into(),
        })?;
    // The command holds kiln's copies of the pipe's write end: drop them, or
    // the output would never end.
    drop(command);
    let tail = super::pump_lines(reader, on_line);
    let status = child.wait().map_err(BuildError::io_read(spec_path))?;
    Ok((status.code().unwrap_or(128), tail, status.code().is_some()))
}

static TERMINATED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The file descriptor of the spec's `failed` file (close-on-exec).
static FAILED_FD: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// User ids the helper runs as while the step runs (the first the kernel
/// takes): ids no image gives a user, outside the 16-bit range where it can.
const HELPER_UIDS: [u32; 2] = [2_147_483_646, 65_533];

/// Real, effective and saved user id to a helper id, capabilities kept.
fn become_helper_user() -> std::io::Result<()> {
    use rustix::thread::{capabilities, set_capabilities, CapabilitySets};
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut last = None;
    for uid in HELPER_UIDS {
        let u = nix::unistd::Uid::from_raw(uid);
        match nix::unistd::setresuid(u, u, u) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) => last = Some(std::io::Error::from(e)),
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    // A change away from uid 0 clears the effective set; the permitted one is kept.
    let now = capabilities(None)?;
    set_capabilities(
        None,
        CapabilitySets { effective: now.permitted, permitted: now.permitted, inheritable: now.inheritable },
    )?;
    Ok(())
}

/// Back to root in the step's process (the permitted set becomes the
/// effective one again), with the ordinary rule restored: a change to a
/// non-root user afterwards clears every capability.
fn back_to_root() -> std::io::Result<()> {
    let root = nix::unistd::Uid::from_raw(0);
    nix::unistd::setresuid(root, root, root)?;
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

extern "C" fn on_term(_: libc::c_int) {
    TERMINATED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// `kiln __chroot SPEC`: runs the step in its root; never returns. The
/// helper is a child subreaper, so every process the command leaves
/// behind becomes its child and is killed before it exits; when kiln dies
/// it is told (SIGTERM), kills the step and empties the secrets' files.
pub fn main(spec_path: &Path) -> ! {
    use nix::sys::signal::Signal;
    use nix::unistd::{fork, ForkResult};
    let spec: ChrootSpec = match fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => fail(&format!("cannot read the step's spec `{}`: {e}", spec_path.display())),
    };
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    // SAFETY: a handler that stores to an atomic, in a single-threaded process.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_term as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
    for s in &spec.secrets {
        // SAFETY: fcntl on a descriptor number.
        unsafe { libc::fcntl(s.fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    if let Ok(f) = fs::OpenOptions::new().write(true).create(true).truncate(true).open(&spec.failed) {
        let _ = FAILED_FD.set(std::os::fd::IntoRawFd::into_raw_fd(f));
    }
    let _ = nix::sys::prctl::set_child_subreaper(true);
    for s in &spec.secrets {
        if let Err(e) = write_secret(&spec.root, s) {
            fail(&format!(
                "cannot hold the secret `{}` for {}:{} (mode {:04o}): {e}",
                s.id, s.uid, s.gid, s.mode
            ));
        }
    }
    // The helper becomes a user no step is, keeping its capabilities: a
    // root step (which has no CAP_KILL) cannot signal, stop or trace it,
    // so it always outlives the step, kills what the step left and
    // empties the secrets.
    if let Err(e) = become_helper_user() {
        fail(&format!("cannot take the helper's own user id: {e}"));
    }
    // SAFETY: the helper is single-threaded.
    let child = match unsafe { fork() } {
        Err(e) => fail(&format!("cannot fork: {e}")),
        Ok(ForkResult::Child) => step(&spec),
        Ok(ForkResult::Parent { child }) => child,
    };
    let (code, timed_out) = super::sandbox::wait_for(child, spec.timeout_ms, &|| {
        TERMINATED.load(std::sync::atomic::Ordering::SeqCst)
    });
    kill_the_rest();
    for s in &spec.secrets {
        empty_secret(&spec.root, &s.id);
    }
    if timed_out {
        if fs::write(&spec.timed_out, b"").is_err() {
            fail("cannot record that the command ran past its time limit");
        }
        std::process::exit(TIMED_OUT);
    }
    std::process::exit(code)
}

/// Kills every process left (a subreaper's orphans are its children)
/// until it has no children.
fn kill_the_rest() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let me = std::process::id();
    loop {
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
                let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { continue };
                // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
                let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1));
                if ppid.and_then(|p| p.parse::<u32>().ok()) == Some(me) {
                    // SAFETY: kill on a pid number.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        // Reap every child that is gone before looking again (one scan per
        // zombie would take time in the square of a fork bomb's size).
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Err(nix::errno::Errno::ECHILD) => return,
                Ok(WaitStatus::StillAlive) => break,
                _ => {}
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// The secret's bytes into the empty file kiln made at /run/secrets/ID
/// (opened without following a symlink; nothing has run in the root yet),
/// then its owner and mode.
fn write_secret(root: &Path, s: &SandboxSecret) -> std::io::Result<()> {
    let mut rd = RootDir::open(root)?;
    let rel = format!("run/secrets/{}", s.id);
    let (dir, name) = rd.parent(&rel, None)?;
    let fd = rustix::fs::openat(
        &dir,
        name,
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // The file exists: no create, so its folder keeps its ctime.
    s.write_into(&mut fs::File::from(fd))
}

/// Empties a secret's file once the step is over (its folder is removed
/// with the step's root; emptying leaves the folder's ctime alone, so it
/// is not a change).
fn empty_secret(root: &Path, id: &str) {
    let Ok(mut rd) = RootDir::open(root) else { return };
    let rel = format!("run/secrets/{id}");
    let Ok((dir, name)) = rd.parent(&rel, None) else { return };
    if let Ok(fd) = rustix::fs::openat(
        &dir,
        name,
        rustix::fs::OFlags::WRONLY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::NONBLOCK
            | rustix::fs::OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        if rustix::fs::fstat(&fd).is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
        {
            let _ = rustix::fs::ftruncate(&fd, 0);
        }
    }
}

/// The capabilities a step keeps: the engine's default set without
/// CAP_SYS_CHROOT (a `chroot` is how root leaves one), CAP_MKNOD (no
/// devices cgroup need stand between a node and the host's device) and
/// CAP_KILL (so a root step cannot signal the helper, whose user it is not).
const STEP_CAPS: u64 = super::confine::DEFAULT_CAPS & !(1 << 18) & !(1 << 27) & !(1 << 5);

/// The step: a session of its own, the root, the user, the confinement, exec.
fn step(spec: &ChrootSpec) -> ! {
    use nix::unistd::{chdir, chroot, execve, setgroups, Gid, Uid};
    use std::os::unix::fs::DirBuilderExt;
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if let Err(e) = back_to_root() {
        fail(&format!("cannot take root again for the step: {e}"));
    }
    let _ = nix::unistd::setsid();
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    check(chroot(&spec.root), "change root");
    check(chdir("/"), "enter /");
    if fs::symlink_metadata(&spec.workdir).is_err() {
        if let Err(e) = fs::DirBuilder::new().recursive(true).mode(0o755).create(&spec.workdir) {
            fail(&format!("cannot create the working folder `{}`: {e}", spec.workdir));
        }
    }
    let user = super::sandbox::resolve_user(&spec.user).unwrap_or_else(|e| fail(&e));
    if HELPER_UIDS.contains(&user.uid) {
        fail(&format!(
            "the step's user id {} is the one the container backend's helper runs as; give the step another user",
            user.uid
        ));
    }
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    super::confine::reset_signals();
    // With CAP_SYS_ADMIN (kiln as root on a host), the engine's profile as
    // on the local backend; in a container the engine's own filter is
    // already on kiln and everything it starts.
    let admin = rustix::thread::capabilities(None)
        .is_ok_and(|c| c.effective.contains(rustix::thread::CapabilitySet::SYS_ADMIN));
    // no_new_privs always: a filter without CAP_SYS_ADMIN needs it, and it
    // keeps a setuid file (one the step made, owned by the helper's user)
    // from making the step the helper's user. Setuid programs in the image
    // therefore do not raise a step's privileges on this backend.
    if let Err(e) = rustix::thread::set_no_new_privs(true) {
        fail(&format!("cannot set no_new_privs: {e}"));
    }
    if admin {
        if let Err(e) = super::seccomp::install() {
            fail(&format!("cannot install the seccomp filter: {e}"));
        }
    }
    if let Err(e) = super::seccomp::install_step_filter(spec.network, &HELPER_UIDS) {
        fail(&format!("cannot install the step's filter: {e}"));
    }
    if let Err(e) = super::confine::drop_capabilities_to(STEP_CAPS) {
        fail(&e);
    }
    let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
    check(setgroups(&groups), "set the supplementary groups");
    check(
        nix::unistd::setresgid(Gid::from_raw(user.gid), Gid::from_raw(user.gid), Gid::from_raw(user.gid)),
        "set the group",
    );
    check(
        nix::unistd::setresuid(Uid::from_raw(user.uid), Uid::from_raw(user.uid), Uid::from_raw(user.uid)),
        "set the user",
    );
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
    if let Err(e) = chdir(spec.workdir.as_str()) {
        fail(&format!("cannot enter the working folder `{}`: {e}", spec.workdir));
    }
    let program = super::sandbox::find_program(&spec.argv[0], &env).unwrap_or_else(|| {
        eprintln!("kiln sandbox: `{}` not found in the image", spec.argv[0]);
        std::process::exit(127)
    });
    let cstr = |s: &str| std::ffi::CString::new(s).unwrap_or_else(|_| fail("an argument holds a NUL byte"));
    let argv: Vec<std::ffi::CString> = spec.argv.iter().map(|a| cstr(a)).collect();
    let envp: Vec<std::ffi::CString> = env.iter().map(|a| cstr(a)).collect();
    // Only stdin, stdout and stderr reach the command: a descriptor kiln
    // inherited (a folder of the host, say) would be a way out of the root.
    super::confine::close_inherited_fds();
    let err = execve(&cstr(&program), &argv, &envp).unwrap_err();
    eprintln!("kiln sandbox: cannot run `{}`: {err}", spec.argv[0]);
    std::process::exit(if err == nix::errno::Errno::ENOENT { 127 } else { 126 })
}

fn fail(message: &str) -> ! {
    eprintln!("kiln sandbox: {message}");
    if let Some(fd) = FAILED_FD.get() {
        // SAFETY: write on the helper's own descriptor.
        unsafe { libc::write(*fd, message.as_ptr().cast(), message.len()) };
    }
    std::process::exit(SETUP_FAILED)
}

fn check<T>(r: nix::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| fail(&format!("cannot {what}: {e}")))
}
