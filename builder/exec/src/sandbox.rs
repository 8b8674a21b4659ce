//! The sandbox helper: what `kiln __sandbox SPEC` does, in a process of its
//! own. kiln's main process is multi-threaded (tokio), and `unshare` of
//! namespaces (a user namespace above all) needs a single-threaded caller,
//! so the builder re-executes its own binary for this and never unshares
//! itself.
//!
//! The helper: new mount, PID, IPC, UTS and (unless `network`) network
//! namespaces; loopback up; a fork, so the command is PID 1 of its
//! namespace; the overlay (init dir and unpacked layers below, the step's
//! upper folder on top, `nodev`), /proc with runc's masked and read-only
//! paths, a minimal /dev, read-only /sys and the secrets (from memfds, on
//! a tmpfs of this namespace) mounted; pivot_root; signals reset, the
//! seccomp filter installed, capabilities cut to the engine's default set
//! ([`super::confine`], [`super::seccomp`]); the user switched; exec. When the command
//! exits its namespaces die with it and every mount goes away, even after a
//! `kill -9` of kiln (the helper and the command die with their parent).

use std::ffi::CString;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, execve, fork, pivot_root, setgroups, sethostname, ForkResult, Gid, Uid};
use serde::{Deserialize, Serialize};

/// The line the helper prints once its user namespace exists (rootless),
/// before it waits for kiln to write the id maps.
pub(crate) const USERNS_READY: &str = "kiln sandbox: user namespace ready";

/// Exit status of the helper when the sandbox could not be set up (as
/// `docker run` uses 125 for its own failures). The reason is on stderr.
pub(crate) const SETUP_FAILED: i32 = 125;

/// What the helper needs, written by the builder as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SandboxSpec {
    /// Lower folders, topmost first. Relative ones are relative to `layers_dir`.
    pub(crate) lowers: Vec<PathBuf>,
    pub(crate) layers_dir: PathBuf,
    pub(crate) upper: PathBuf,
    pub(crate) work: PathBuf,
    pub(crate) merged: PathBuf,
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<String>,
    /// `uid[:gid]` or names from the image's /etc/passwd and /etc/group.
    pub(crate) user: String,
    pub(crate) workdir: String,
    pub(crate) network: bool,
    pub(crate) hostname: String,
    /// Mounted read-only at /run/secrets/ID.
    pub(crate) secrets: Vec<SandboxSecret>,
    /// An empty folder the command's private tmpfs for the secrets is
    /// mounted on (only in its mount namespace, so it dies with it).
    pub(crate) secret_dir: PathBuf,
    /// (name, file) bound over /etc/NAME: hosts, hostname, resolv.conf.
    pub(crate) etc_files: Vec<(String, PathBuf)>,
    /// The store's folders bound read-write (nosuid, nodev) over their
    /// targets; a new one is given to its owner once the user is known.
    pub(crate) cache_mounts: Vec<crate::CacheMountRequest>,
    /// Set when kiln is not root: the helper works in a user namespace.
    pub(crate) rootless: Option<RootlessPlan>,
    /// The command's time limit: past it, the helper kills the command,
    /// PID 1 of its namespace, so the kernel kills every process in it,
    /// and makes `timed_out` (a file the command cannot reach).
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) timed_out: PathBuf,
}

/// The helper's exit code when the command ran past its time limit (and
/// the spec's `timed_out` file exists).
pub(crate) const TIMED_OUT: i32 = 124;

extern "C" fn on_alarm(_: libc::c_int) {}

/// Interrupts the helper's wait (SIGALRM, no restart) once `ms` have
/// passed, then every 100 ms; `arm_alarm(0)` turns it off.
pub(crate) fn arm_alarm(ms: u64) {
    // SAFETY: a handler that does nothing, installed in a single-threaded
    // process; setitimer with a valid, zeroed-then-filled struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_alarm as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
        let mut it: libc::itimerval = std::mem::zeroed();
        it.it_value.tv_sec = (ms / 1000) as libc::time_t;
        it.it_value.tv_usec = ((ms % 1000) * 1000) as libc::suseconds_t;
        // Again every 100 ms, should the first land before the wait.
        if ms > 0 {
            it.it_interval.tv_usec = 100_000;
        }
        libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut());
    }
}

/// What the helper does inside its user namespace when rootless.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct RootlessPlan {
    /// The cache folder (the store is reopened in the helper).
    pub(crate) cache_dir: PathBuf,
    /// (digest, diff_id, media type, size) of each layer, bottom first.
    pub(crate) layers: Vec<(String, String, String, u64)>,
    /// The file pool of this mapping's unpacked layers.
    pub(crate) pool: PathBuf,
    pub(crate) init: InitPlan,
    /// Where the helper writes the changes as a tar.
    pub(crate) diff_out: PathBuf,
}

/// The per-run folder above the image, as Docker's "init layer": the
/// mount points and files the engine provides (so neither backend records
/// them in the layer), and the secrets' mount points. Made by kiln as root,
/// or by the helper inside its user namespace when rootless.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct InitPlan {
    /// (path, mode, uid, gid), parents first.
    pub(crate) dirs: Vec<(String, u32, u32, u32)>,
    /// (path, mode): empty files.
    pub(crate) files: Vec<(String, u32)>,
    /// (path, target).
    pub(crate) symlinks: Vec<(String, String)>,
}

/// Makes the init folder at `init` (which exists).
pub(crate) fn make_init(init: &Path, plan: &InitPlan) -> std::io::Result<()> {
    for (rel, mode, uid, gid) in &plan.dirs {
        let p = init.join(rel);
        if !p.is_dir() {
            std::fs::DirBuilder::new().mode(*mode).create(&p)?;
        }
        std::os::unix::fs::chown(&p, Some(*uid), Some(*gid))?;
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(*mode))?;
    }
    for (rel, mode) in &plan.files {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(*mode)
            .open(init.join(rel))?;
    }
    for (rel, target) in &plan.symlinks {
        std::os::unix::fs::symlink(target, init.join(rel))?;
    }
    Ok(())
}

/// Runs the helper; never returns.
pub fn main(spec_path: &Path) -> ! {
    let spec: SandboxSpec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => fail(&format!("cannot read the sandbox spec `{}`: {e}", spec_path.display())),
    };
    // Die with kiln.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // The secrets' memory files are bound into the sandbox, never handed to the command.
    for s in &spec.secrets {
        // SAFETY: fcntl on a descriptor number; a bad one fails the mount later.
        unsafe { libc::fcntl(s.fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    if let Some(plan) = &spec.rootless {
        enter_user_namespace();
        prepare_rootless(&spec, plan);
    }
    let mut flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if !spec.network {
        flags |= CloneFlags::CLONE_NEWNET;
    }
    if let Err(e) = unshare(flags) {
        fail(&format!("cannot create namespaces ({e})"));
    }
    check(
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>),
        "make / private",
    );
    check(sethostname(&spec.hostname), "set the hostname");
    if !spec.network {
        if let Err(e) = loopback_up() {
            fail(&format!("cannot bring up the loopback interface: {e}"));
        }
    }
    // SAFETY: the helper is single-threaded (it runs before kiln starts any thread).
    match unsafe { fork() } {
        Err(e) => fail(&format!("cannot fork: {e}")),
        Ok(ForkResult::Child) => child(&spec),
        Ok(ForkResult::Parent { child }) => {
            // PID 1 of the namespace: killing it, the kernel kills the rest.
            let (code, timed_out) = wait_for(child, spec.timeout_ms, &|| false);
            if timed_out {
                if let Some(plan) = &spec.rootless {
                    finish_rootless(&spec, plan, false);
                }
                if std::fs::write(&spec.timed_out, b"").is_err() {
                    fail("cannot record that the command ran past its time limit");
                }
                std::process::exit(TIMED_OUT);
            }
            if let Some(plan) = &spec.rootless {
                finish_rootless(&spec, plan, code == 0);
            }
            std::process::exit(code)
        }
    }
}

/// `kiln __userns-rm PATH...`: removes what belongs to the user's
/// subordinate ids, from inside a user namespace kiln maps (see
/// `local::remove_rootless`). Never returns.
pub fn remove_main(paths: &[PathBuf]) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    enter_user_namespace();
    let mut failed = false;
    for p in paths {
        let r = match std::fs::symlink_metadata(p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
            Ok(_) => std::fs::remove_file(p),
            Err(_) => Ok(()),
        };
        if let Err(e) = r {
            eprintln!("kiln: cannot remove `{}`: {e}", p.display());
            failed = true;
        }
    }
    std::process::exit(i32::from(failed))
}

/// Rootless: a new user namespace, whose id maps kiln writes (it runs the
/// setuid `newuidmap`/`newgidmap` for this pid) once told it exists.
fn enter_user_namespace() {
    use std::io::{Read, Write};
    if let Err(e) = unshare(CloneFlags::CLONE_NEWUSER) {
        fail(&format!("cannot create a user namespace ({e}); unprivileged user namespaces may be disabled"));
    }
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{USERNS_READY}");
    let _ = out.flush();
    let mut go = [0u8; 1];
    if !matches!(std::io::stdin().read(&mut go), Ok(1)) {
        std::process::exit(SETUP_FAILED); // kiln said why
    }
    if !rustix::process::getuid().is_root() {
        fail("the user namespace has no id map");
    }
}

/// Rootless: what kiln does as root, done here where owners can be set:
/// unpack the layers the stack lacks, make the init folder.
fn prepare_rootless(spec: &SandboxSpec, plan: &RootlessPlan) {
    let store = kiln_cache::Store::open(&plan.cache_dir)
        .unwrap_or_else(|e| fail(&format!("cannot open the cache: {e}")));
    for (digest, diff_id, media_type, size) in &plan.layers {
        let layer = crate::image::ImageLayer {
            digest: digest.parse().unwrap_or_else(|_| fail("a bad layer digest")),
            diff_id: diff_id.parse().unwrap_or_else(|_| fail("a bad layer diff_id")),
            media_type: media_type.clone(),
            size: *size,
        };
        let unpacked = crate::unpack::unpack_into(
            &store,
            &layer,
            &spec.layers_dir,
            plan.pool.clone(),
            crate::unpack::OPAQUE_USER,
        );
        if let Err(e) = unpacked {
            fail(&format!("cannot unpack layer {}: {e}", layer.digest));
        }
    }
    let init = spec.lowers.first().unwrap_or_else(|| fail("no init folder"));
    if let Err(e) = make_init(init, &plan.init) {
        fail(&format!("cannot make the init folder: {e}"));
    }
}

/// Rootless: the upper folder's changes as a layer tar for kiln (which
/// cannot read files owned by the mapped ids), then the folders removed.
fn finish_rootless(spec: &SandboxSpec, plan: &RootlessPlan, succeeded: bool) {
    if succeeded {
        let written = crate::changes::from_upper(&spec.upper, crate::unpack::OPAQUE_USER)
            .map_err(|e| e.to_string())
            .and_then(|changes| {
                let entries = crate::changes::to_layer_entries(changes);
                crate::layer::write_plain_tar(&entries, &plan.diff_out).map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            fail(&format!("cannot write the changes: {e}"));
        }
    }
    for d in [&spec.upper, &spec.work, &spec.merged] {
        let _ = std::fs::remove_dir_all(d);
    }
    if let Some(init) = spec.lowers.first() {
        let _ = std::fs::remove_dir_all(init);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("kiln sandbox: {message}");
    std::process::exit(SETUP_FAILED)
}

fn check<T>(r: nix::Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| fail(&format!("cannot {what}: {e}")))
}

/// PID 1 of the new namespace: mounts, pivot_root, user, exec.
fn child(spec: &SandboxSpec) -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // A mount namespace of its own, so pivot_root leaves the helper's view alone.
    check(unshare(CloneFlags::CLONE_NEWNS), "create the command's mount namespace");
    // The cache mounts' folders, opened now, before any mount of this
    // namespace: nothing a step left anywhere can redirect them later.
    let cache_sources: Vec<rustix::fd::OwnedFd> = spec
        .cache_mounts
        .iter()
        .map(|m| {
            rustix::fs::open(
                &m.host,
                rustix::fs::OFlags::PATH
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .unwrap_or_else(|e| fail(&format!("cannot open the cache for `/{}`: {e}", m.target)))
        })
        .collect();
    // The engine's umask, whatever kiln's caller had: a command's files do not depend on it.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    check(chdir(&spec.layers_dir), "enter the unpacked layers folder");
    let lowers: Vec<String> = spec.lowers.iter().map(|p| p.display().to_string()).collect();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={},index=off,metacopy=off,{},volatile",
        lowers.join(":"),
        spec.upper.display(),
        spec.work.display(),
        // In a user namespace, `userxattr` keeps redirects off (and refuses the option).
        if spec.rootless.is_some() { "userxattr" } else { "redirect_dir=off" }
    );
    if opts.len() > 4000 {
        fail(&format!(
            "the image has {} layers, more than one overlay mount can stack; use `--backend docker`",
            lowers.len()
        ));
    }
    // `volatile` (Linux 5.10+) skips syncing the upper folder, which a
    // throwaway build sandbox does not need; older kernels mount without it.
    // `nodev`: there is no devices cgroup here (the engine has one), so a
    // device node a step makes with CAP_MKNOD, or one a layer carries, must
    // not open the host's device. /dev's own nodes are binds of the host's
    // harmless ones, which keep working.
    let mounted =
        mount(Some("overlay"), &spec.merged, Some("overlay"), MsFlags::MS_NODEV, Some(opts.as_str()));
    if mounted == Err(nix::errno::Errno::EINVAL) {
        let plain = opts.trim_end_matches(",volatile");
        check(
            mount(Some("overlay"), &spec.merged, Some("overlay"), MsFlags::MS_NODEV, Some(plain)),
            "mount the overlay",
        );
    } else {
        check(mounted, "mount the overlay");
    }
    let root = &spec.merged;
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    check(mount(Some("proc"), &root.join("proc"), Some("proc"), nosuid, None::<&str>), "mount /proc");
    let dev = root.join("dev");
    check(
        mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
            Some("mode=755,size=65536k"),
        ),
        "mount /dev",
    );
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(node);
        if let Err(e) = std::fs::write(&target, b"") {
            fail(&format!("cannot create /dev/{node}: {e}"));
        }
        check(
            mount(Some(&Path::new("/dev").join(node)), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>),
            &format!("bind /dev/{node}"),
        );
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(name));
    }
    for d in ["pts", "shm", "mqueue"] {
        let _ = std::fs::DirBuilder::new().mode(0o755).create(dev.join(d));
    }
    let _ = std::fs::set_permissions(dev.join("shm"), std::fs::Permissions::from_mode(0o1777));
    let _ = mount(
        Some("devpts"),
        &dev.join("pts"),
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    );
    let _ = mount(Some("shm"), &dev.join("shm"), Some("tmpfs"), nosuid, Some("mode=1777,size=65536k"));
    // /sys read-only, as Docker mounts it; not every kernel allows it in every setup.
    let _ = mount(Some("sysfs"), &root.join("sys"), Some("sysfs"), nosuid | MsFlags::MS_RDONLY, None::<&str>);
    // The engine's per-container files: bound over the init folder's empty
    // ones, so what a command writes there never reaches the layer.
    for (name, src) in &spec.etc_files {
        let target = root.join("etc").join(name);
        check(
            mount(Some(src), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>),
            &format!("mount /etc/{name}"),
        );
    }
    let root_fd = rustix::fs::open(
        root,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap_or_else(|e| fail(&format!("cannot open the new root: {e}")));
    for (m, src) in spec.cache_mounts.iter().zip(&cache_sources) {
        // The target, on the overlay itself: through no symlink and no other
        // mount (an earlier cache mount, /proc), never out of the root.
        let at = rustix::fs::openat2(
            &root_fd,
            m.target.as_str(),
            rustix::fs::OFlags::PATH
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
            rustix::fs::ResolveFlags::BENEATH
                | rustix::fs::ResolveFlags::NO_SYMLINKS
                | rustix::fs::ResolveFlags::NO_MAGICLINKS
                | rustix::fs::ResolveFlags::NO_XDEV,
        )
        .unwrap_or_else(|e| fail(&format!("the cache mount's target `/{}` cannot be used: {e}", m.target)));
        let fd_path =
            |fd: &rustix::fd::OwnedFd| format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd));
        check(
            mount(
                Some(fd_path(src).as_str()),
                fd_path(&at).as_str(),
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            ),
            &format!("mount the cache `/{}`", m.target),
        );
        drop(at);
        // The path now ends on the bind mount (its folders were just checked).
        let target = root.join(&m.target);
        check(
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            ),
            &format!("make the cache `/{}` nosuid", m.target),
        );
    }
    if !spec.secrets.is_empty() {
        // A tmpfs that exists only in this mount namespace: nothing of a
        // secret outlives the step, whatever happens to kiln.
        check(
            mount(
                Some("tmpfs"),
                &spec.secret_dir,
                Some("tmpfs"),
                nosuid,
                Some("mode=0700,size=16m,nr_inodes=1024"),
            ),
            "mount the secrets' memory folder",
        );
    }
    for s in &spec.secrets {
        let id = &s.id;
        let target = root.join("run/secrets").join(id);
        let src = spec.secret_dir.join(id);
        if let Err(e) = copy_secret(s, &src) {
            fail(&format!(
                "cannot hold the secret `{id}` for {}:{} (mode {:04o}): {e}",
                s.uid, s.gid, s.mode
            ));
        }
        check(
            mount(Some(&src), &target, None::<&str>, MsFlags::MS_BIND, None::<&str>),
            &format!("mount the secret `{id}`"),
        );
        check(
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | nosuid,
                None::<&str>,
            ),
            &format!("make the secret `{id}` read-only"),
        );
    }
    if let Err(e) = super::confine::mask_paths(root) {
        fail(&e);
    }
    check(chdir(root), "enter the new root");
    check(pivot_root(".", "."), "pivot_root");
    check(umount2(".", MntFlags::MNT_DETACH), "detach the old root");
    check(chdir("/"), "enter /");
    // The working folder, made as Docker makes it: 0755, owned by root.
    // Made only now, inside the new root: a symlink on its way resolves
    // in the image, never on the host.
    if std::fs::symlink_metadata(&spec.workdir).is_err() {
        if let Err(e) = std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&spec.workdir) {
            fail(&format!("cannot create the working folder `{}`: {e}", spec.workdir));
        }
    }

    let user = resolve_user(&spec.user).unwrap_or_else(|e| fail(&e));
    // A cache mount made for this step belongs to its user (in a user
    // namespace, to the id the namespace maps it to).
    for m in &spec.cache_mounts {
        if let Some((uid, gid)) = m.owner {
            let p = Path::new("/").join(&m.target);
            if let Err(e) = std::os::unix::fs::lchown(&p, Some(uid), Some(gid)) {
                fail(&format!("cannot give the cache `/{}` to {uid}:{gid}: {e}", m.target));
            }
        }
    }
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    // As the engine confines a container: the seccomp profile first (without
    // no_new_privs it needs CAP_SYS_ADMIN), then the default capabilities;
    // the switch to the user below drops even those for a non-root user.
    super::confine::reset_signals();
    if let Err(e) = super::seccomp::install() {
        fail(&format!("cannot install the seccomp filter: {e}"));
    }
    if let Err(e) = super::confine::drop_capabilities() {
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
    // A change of user clears the parent-death signal: set it again.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err(e) = chdir(spec.workdir.as_str()) {
        fail(&format!("cannot enter the working folder `{}`: {e}", spec.workdir));
    }
    let program = find_program(&spec.argv[0], &env).unwrap_or_else(|| {
        eprintln!("kiln sandbox: `{}` not found in the image", spec.argv[0]);
        std::process::exit(127)
    });
    let cstr = |s: &str| CString::new(s).unwrap_or_else(|_| fail("an argument holds a NUL byte"));
    let argv: Vec<CString> = spec.argv.iter().map(|a| cstr(a)).collect();
    let envp: Vec<CString> = env.iter().map(|a| cstr(a)).collect();
    super::confine::close_inherited_fds();
    let err = execve(&cstr(&program), &argv, &envp).unwrap_err();
    eprintln!("kiln sandbox: cannot run `{}`: {err}", spec.argv[0]);
    std::process::exit(if err == nix::errno::Errno::ENOENT { 127 } else { 126 })
}

/// A secret as the helper gets it: a memory file it inherits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct SandboxSecret {
    pub(crate) id: String,
    pub(crate) fd: i32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mode: u32,
}

/// Copies a secret from the memory file kiln handed over into `dest`,
/// then gives it its owner and mode (ids as the sandbox's user namespace
/// sees them, when kiln is not root).
fn copy_secret(s: &SandboxSecret, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(dest)?;
    s.write_into(&mut out)
}

impl SandboxSecret {
    /// Writes the secret's bytes (from the memory file kiln handed over)
    /// into `out`, then gives it the secret's owner and mode.
    pub(crate) fn write_into(&self, out: &mut std::fs::File) -> std::io::Result<()> {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::FileExt;
        // SAFETY: the descriptor was inherited for this and nothing else owns it here.
        let src = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.fd) });
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            // At an offset: kiln shares the descriptor's position.
            let n = src.read_at(&mut buf, at)?;
            if n == 0 {
                return crate::own_secret(out, self.uid, self.gid, self.mode);
            }
            std::io::Write::write_all(out, &buf[..n])?;
            at += n as u64;
        }
    }
}

/// Waits for the helper's `child` (the command), killing it once
/// `timeout_ms` have passed or when `stop` says so; its exit code (128 +
/// signal when killed by one) and whether the time limit killed it.
pub(crate) fn wait_for(
    child: nix::unistd::Pid,
    timeout_ms: Option<u64>,
    stop: &dyn Fn() -> bool,
) -> (i32, bool) {
    let deadline = timeout_ms.map(|ms| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        arm_alarm(ms);
        deadline
    });
    let mut timed_out = false;
    let code = loop {
        if stop() {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
        }
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => break code,
            Ok(WaitStatus::Signaled(_, sig, _)) => break 128 + sig as i32,
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => {
                if !timed_out && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                    timed_out = true;
                }
                continue;
            }
            Err(e) => fail(&format!("cannot wait for the command: {e}")),
        }
    };
    if deadline.is_some() {
        arm_alarm(0);
    }
    (code, timed_out)
}

/// `argv[0]` found through the image's PATH, as the engine does.
pub(crate) fn find_program(name: &str, env: &[String]) -> Option<String> {
    kiln_oci::pathvar::lookup(name, kiln_oci::pathvar::of_env(env), |p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// `user[:group]`, numeric or by name, looked up in the image's own
/// /etc/passwd and /etc/group (read after pivot_root), as runc does.
pub(crate) fn resolve_user(spec: &str) -> Result<crate::passwd::User, String> {
    let passwd = read_account_file("/etc/passwd")?;
    let group = read_account_file("/etc/group")?;
    crate::passwd::resolve_user_in(spec, &passwd, &group)
}

/// One of the image's account files: missing is empty; anything but a
/// regular file of at most 4 MiB is refused (a fifo would hang the helper,
/// a link to /dev/zero would fill its memory).
fn read_account_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    const MAX: u64 = 4 << 20;
    let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
        Err(e) => return Err(format!("cannot read the image's {path}: {e}")),
    };
    if !f.metadata().is_ok_and(|m| m.is_file()) {
        return Err(format!("the image's {path} is not a regular file"));
    }
    let mut text = String::new();
    f.take(MAX + 1).read_to_string(&mut text).map_err(|e| format!("cannot read the image's {path}: {e}"))?;
    if text.len() as u64 > MAX {
        return Err(format!("the image's {path} is larger than 4 MiB"));
    }
    Ok(text)
}

/// `ip link set lo up`, with the ioctl the kernel has always had.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket/ioctl calls on a zeroed `ifreq` naming `lo`.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let r = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req);
        if r == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            let r = libc::ioctl(fd, libc::SIOCSIFFLAGS, &req);
            if r != 0 {
                let e = std::io::Error::last_os_error();
                libc::close(fd);
                return Err(e);
            }
        } else {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        libc::close(fd);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_through_the_image_path() {
        assert_eq!(find_program("/bin/sh", &[]), Some("/bin/sh".into()));
        let env = vec!["PATH=/nonexistent:/bin".to_string()];
        assert_eq!(find_program("sh", &env), Some("/bin/sh".into()));
        assert_eq!(find_program("no-such-program-kiln", &env), None);
    }
}
