//! How the sandbox confines a `run` step as a container engine does
//! (moby's defaults, applied the way runc applies them): Docker's default
//! capability set, the default seccomp profile ([`super::seccomp`]),
//! masked and read-only `/proc` paths, and default signal dispositions.
//!
//! `no_new_privs` is left off, as with `docker run` and `docker build`:
//! setuid programs in the image (`su`, `ping`, `passwd`) work as they do
//! under the engine. The seccomp filter is therefore installed while the
//! helper still holds CAP_SYS_ADMIN, before the capabilities are dropped.

use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Docker's default capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT,
/// MKNOD, AUDIT_WRITE, SETFCAP (`CapBnd: 00000000a80425fb`).
pub(crate) const DEFAULT_CAPS: u64 = (1 << 0)
    | (1 << 1)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 10)
    | (1 << 13)
    | (1 << 18)
    | (1 << 27)
    | (1 << 29)
    | (1 << 31);

/// Paths of /proc (and /sys) hidden from the command, as the engine hides them.
pub(crate) const MASKED_PATHS: &[&str] = &[
    "proc/asound",
    "proc/acpi",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];

/// Paths of /proc the command may read but not write.
pub(crate) const READONLY_PATHS: &[&str] =
    &["proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"];

/// Masks and write-protects the paths above under `root` (the new root,
/// before pivot_root; /proc and /sys are kiln's own mounts there, so no
/// path here goes through anything the image made). A path the kernel
/// does not have is skipped.
pub(crate) fn mask_paths(root: &Path) -> Result<(), String> {
    for rel in MASKED_PATHS {
        let p = root.join(rel);
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        let r = if md.is_dir() {
            mount(Some("tmpfs"), &p, Some("tmpfs"), MsFlags::MS_RDONLY, Some("size=0"))
        } else {
            mount(Some("/dev/null"), &p, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        };
        // A read-only /sys may refuse a mount over its entries; it exposes nothing writable.
        if let Err(e) = r {
            if !rel.starts_with("sys/") {
                return Err(format!("cannot mask /{rel}: {e}"));
            }
        }
    }
    for rel in READONLY_PATHS {
        let p = root.join(rel);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        mount(Some(&p), &p, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)
            .and_then(|_| {
                mount(
                    None::<&str>,
                    &p,
                    None::<&str>,
                    MsFlags::MS_BIND
                        | MsFlags::MS_REMOUNT
                        | MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                    None::<&str>,
                )
            })
            .map_err(|e| format!("cannot make /{rel} read-only: {e}"))?;
    }
    Ok(())
}

/// Drops every capability outside [`DEFAULT_CAPS`] from the bounding set
/// (so no exec can regain it), clears the ambient and inheritable sets,
/// and keeps only the default ones in the permitted and effective sets.
/// A switch to a non-root user afterwards clears those too, as for a
/// non-root `USER` under the engine.
pub(crate) fn drop_capabilities() -> Result<(), String> {
    drop_capabilities_to(DEFAULT_CAPS)
}

/// As [`drop_capabilities`], keeping the capabilities of `keep` only.
pub(crate) fn drop_capabilities_to(keep_caps: u64) -> Result<(), String> {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
        .min(63);
    for cap in 0..=last {
        if keep_caps & (1 << cap) != 0 {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(1 << cap)) {
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(format!("cannot drop capability {cap}: {e}")),
        }
    }
    match rustix::thread::clear_ambient_capability_set() {
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(format!("cannot clear the ambient capabilities: {e}")),
    }
    let now = rustix::thread::capabilities(None).map_err(|e| format!("cannot read the capabilities: {e}"))?;
    let keep = CapabilitySet::from_bits_retain(keep_caps);
    let sets = CapabilitySets {
        effective: now.permitted & keep,
        permitted: now.permitted & keep,
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, sets).map_err(|e| format!("cannot set the capabilities: {e}"))
}

/// Closes every descriptor above stderr, right before exec (those kiln
/// opened are close-on-exec already; this is for what kiln inherited).
pub(crate) fn close_inherited_fds() {
    // SAFETY: close_range on a range of descriptor numbers (Linux 5.9+;
    // on older kernels it fails and the close-on-exec flags still hold).
    unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
}

/// Every signal back to its default action and none blocked: kiln (Rust)
/// ignores SIGPIPE, and an ignored signal stays ignored across exec, so
/// `yes | head` would never end.
pub(crate) fn reset_signals() {
    /// The kernel's `struct sigaction` (not libc's: glibc refuses to touch
    /// signals 32 and 33, which it reserves, yet they may arrive ignored).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
    // SAFETY: rt_sigaction with a valid struct and the kernel's sigset size
    // (8 bytes); sigprocmask with a zeroed set. SIGKILL and SIGSTOP refuse
    // (EINVAL), which is fine.
    unsafe {
        for sig in 1..=64 {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<u8>(),
                8usize,
            );
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_the_engines() {
        assert_eq!(DEFAULT_CAPS, 0xa804_25fb);
        // SYS_ADMIN, DAC_READ_SEARCH, SYS_MODULE, SYS_RAWIO, SYS_PTRACE, NET_ADMIN, SYS_TIME
        for dangerous in [21, 2, 16, 17, 19, 12, 25] {
            assert_eq!(DEFAULT_CAPS & (1 << dangerous), 0, "capability {dangerous}");
        }
    }
}
