//! The seccomp filter of a `run` step: Docker's default profile (moby's
//! `profiles/seccomp/default.json`) for a process holding Docker's default
//! capabilities, compiled here into a classic BPF program.
//!
//! What the profile allows, this filter allows; everything else fails with
//! `EPERM`, as with the engine. Given the capabilities a step keeps, that
//! refuses among others `mount`, `umount2`, `unshare`, `setns`,
//! `pivot_root`, `open_by_handle_at`, `keyctl`/`add_key`/`request_key`,
//! `bpf`, `perf_event_open`, loading kernel modules, `kexec_*`,
//! `reboot`, `swapon`, `acct`, setting the clocks, `syslog`, `userfaultfd`;
//! `clone` with a namespace flag; `socket(AF_VSOCK)`; `personality` other
//! than the few values the profile names. `clone3` answers `ENOSYS`, so C
//! libraries fall back to `clone`, whose flags the filter can see.
//!
//! Departure: the engine also admits the 32-bit ABIs of the host (i386
//! and x32 on x86_64, arm on arm64) with their own tables; this filter
//! refuses every foreign ABI outright.

/// A syscall the filter lets through only with certain arguments.
#[derive(Debug, Clone, Copy)]
enum Rule {
    Allow,
    Errno(u32),
    /// Allowed unless argument `.0` equals `.1`.
    ArgNot(u32, u32),
    /// Allowed when argument `.0` is one of these values.
    ArgIn(u32, &'static [u32]),
    /// Allowed when argument `.0` has none of the bits of `.1`.
    ArgMaskedZero(u32, u32),
}

/// `CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC |
/// CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`, as the profile masks them.
const NAMESPACE_FLAGS: u32 = 0x7E02_0000;
/// `personality` values the profile allows: PER_LINUX, PER_LINUX32,
/// UNAME26, UNAME26|PER_LINUX32, and the query 0xffffffff.
const PERSONALITIES: &[u32] = &[0, 8, 0x20000, 0x20008, 0xffff_ffff];
const AF_VSOCK: u32 = 40;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

#[cfg(target_arch = "x86_64")]
const SPECIAL: &[(&str, u32, Rule)] = &[
    ("socket", 41, Rule::ArgNot(0, AF_VSOCK)),
    ("clone", 56, Rule::ArgMaskedZero(0, NAMESPACE_FLAGS)),
    ("personality", 135, Rule::ArgIn(0, PERSONALITIES)),
    ("clone3", 435, Rule::Errno(libc::ENOSYS as u32)),
];
#[cfg(target_arch = "aarch64")]
const SPECIAL: &[(&str, u32, Rule)] = &[
    ("personality", 92, Rule::ArgIn(0, PERSONALITIES)),
    ("socket", 198, Rule::ArgNot(0, AF_VSOCK)),
    ("clone", 220, Rule::ArgMaskedZero(0, NAMESPACE_FLAGS)),
    ("clone3", 435, Rule::Errno(libc::ENOSYS as u32)),
];

/// The syscalls the profile allows outright (for Docker's default
/// capabilities, which hold CAP_SYS_CHROOT but not CAP_SYS_ADMIN,
/// CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, ...), by number on this arch.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[(&str, u32)] = &[
    ("read", 0),
    ("write", 1),
    ("open", 2),
    ("close", 3),
    ("stat", 4),
    ("fstat", 5),
    ("lstat", 6),
    ("poll", 7),
    ("lseek", 8),
    ("mmap", 9),
    ("mprotect", 10),
    ("munmap", 11),
    ("brk", 12),
    ("rt_sigaction", 13),
    ("rt_sigprocmask", 14),
    ("rt_sigreturn", 15),
    ("ioctl", 16),
    ("pread64", 17),
    ("pwrite64", 18),
    ("readv", 19),
    ("writev", 20),
    ("access", 21),
    ("pipe", 22),
    ("select", 23),
    ("sched_yield", 24),
    ("mremap", 25),
    ("msync", 26),
    ("mincore", 27),
    ("madvise", 28),
    ("shmget", 29),
    ("shmat", 30),
    ("shmctl", 31),
    ("dup", 32),
    ("dup2", 33),
    ("pause", 34),
    ("nanosleep", 35),
    ("getitimer", 36),
    ("alarm", 37),
    ("setitimer", 38),
    ("getpid", 39),
    ("sendfile", 40),
    ("connect", 42),
    ("accept", 43),
    ("sendto", 44),
    ("recvfrom", 45),
    ("sendmsg", 46),
    ("recvmsg", 47),
    ("shutdown", 48),
    ("bind", 49),
    ("listen", 50),
    ("getsockname", 51),
    ("getpeername", 52),
    ("socketpair", 53),
    ("setsockopt", 54),
    ("getsockopt", 55),
    ("fork", 57),
    ("vfork", 58),
    ("execve", 59),
    ("exit", 60),
    ("wait4", 61),
    ("kill", 62),
    ("uname", 63),
    ("semget", 64),
    ("semop", 65),
    ("semctl", 66),
    ("shmdt", 67),
    ("msgget", 68),
    ("msgsnd", 69),
    ("msgrcv", 70),
    ("msgctl", 71),
    ("fcntl", 72),
    ("flock", 73),
    ("fsync", 74),
    ("fdatasync", 75),
    ("truncate", 76),
    ("ftruncate", 77),
    ("getdents", 78),
    ("getcwd", 79),
    ("chdir", 80),
    ("fchdir", 81),
    ("rename", 82),
    ("mkdir", 83),
    ("rmdir", 84),
    ("creat", 85),
    ("link", 86),
    ("unlink", 87),
    ("symlink", 88),
    ("readlink", 89),
    ("chmod", 90),
    ("fchmod", 91),
    ("chown", 92),
    ("fchown", 93),
    ("lchown", 94),
    ("umask", 95),
    ("gettimeofday", 96),
    ("getrlimit", 97),
    ("getrusage", 98),
    ("sysinfo", 99),
    ("times", 100),
    ("ptrace", 101),
    ("getuid", 102),
    ("getgid", 104),
    ("setuid", 105),
    ("setgid", 106),
    ("geteuid", 107),
    ("getegid", 108),
    ("setpgid", 109),
    ("getppid", 110),
    ("getpgrp", 111),
    ("setsid", 112),
    ("setreuid", 113),
    ("setregid", 114),
    ("getgroups", 115),
    ("setgroups", 116),
    ("setresuid", 117),
    ("getresuid", 118),
    ("setresgid", 119),
    ("getresgid", 120),
    ("getpgid", 121),
    ("setfsuid", 122),
    ("setfsgid", 123),
    ("getsid", 124),
    ("capget", 125),
    ("capset", 126),
    ("rt_sigpending", 127),
    ("rt_sigtimedwait", 128),
    ("rt_sigqueueinfo", 129),
    ("rt_sigsuspend", 130),
    ("sigaltstack", 131),
    ("utime", 132),
    ("mknod", 133),
    ("statfs", 137),
    ("fstatfs", 138),
    ("getpriority", 140),
    ("setpriority", 141),
    ("sched_setparam", 142),
    ("sched_getparam", 143),
    ("sched_setscheduler", 144),
    ("sched_getscheduler", 145),
    ("sched_get_priority_max", 146),
    ("sched_get_priority_min", 147),
    ("sched_rr_get_interval", 148),
    ("mlock", 149),
    ("munlock", 150),
    ("mlockall", 151),
    ("munlockall", 152),
    ("modify_ldt", 154),
    ("prctl", 157),
    ("arch_prctl", 158),
    ("adjtimex", 159),
    ("setrlimit", 160),
    ("chroot", 161),
    ("sync", 162),
    ("gettid", 186),
    ("readahead", 187),
    ("setxattr", 188),
    ("lsetxattr", 189),
    ("fsetxattr", 190),
    ("getxattr", 191),
    ("lgetxattr", 192),
    ("fgetxattr", 193),
    ("listxattr", 194),
    ("llistxattr", 195),
    ("flistxattr", 196),
    ("removexattr", 197),
    ("lremovexattr", 198),
    ("fremovexattr", 199),
    ("tkill", 200),
    ("time", 201),
    ("futex", 202),
    ("sched_setaffinity", 203),
    ("sched_getaffinity", 204),
    ("set_thread_area", 205),
    ("io_setup", 206),
    ("io_destroy", 207),
    ("io_getevents", 208),
    ("io_submit", 209),
    ("io_cancel", 210),
    ("get_thread_area", 211),
    ("epoll_create", 213),
    ("epoll_ctl_old", 214),
    ("epoll_wait_old", 215),
    ("remap_file_pages", 216),
    ("getdents64", 217),
    ("set_tid_address", 218),
    ("restart_syscall", 219),
    ("semtimedop", 220),
    ("fadvise64", 221),
    ("timer_create", 222),
    ("timer_settime", 223),
    ("timer_gettime", 224),
    ("timer_getoverrun", 225),
    ("timer_delete", 226),
    ("clock_gettime", 228),
    ("clock_getres", 229),
    ("clock_nanosleep", 230),
    ("exit_group", 231),
    ("epoll_wait", 232),
    ("epoll_ctl", 233),
    ("tgkill", 234),
    ("utimes", 235),
    ("mq_open", 240),
    ("mq_unlink", 241),
    ("mq_timedsend", 242),
    ("mq_timedreceive", 243),
    ("mq_notify", 244),
    ("mq_getsetattr", 245),
    ("waitid", 247),
    ("ioprio_set", 251),
    ("ioprio_get", 252),
    ("inotify_init", 253),
    ("inotify_add_watch", 254),
    ("inotify_rm_watch", 255),
    ("openat", 257),
    ("mkdirat", 258),
    ("mknodat", 259),
    ("fchownat", 260),
    ("futimesat", 261),
    ("newfstatat", 262),
    ("unlinkat", 263),
    ("renameat", 264),
    ("linkat", 265),
    ("symlinkat", 266),
    ("readlinkat", 267),
    ("fchmodat", 268),
    ("faccessat", 269),
    ("pselect6", 270),
    ("ppoll", 271),
    ("set_robust_list", 273),
    ("get_robust_list", 274),
    ("splice", 275),
    ("tee", 276),
    ("sync_file_range", 277),
    ("vmsplice", 278),
    ("utimensat", 280),
    ("epoll_pwait", 281),
    ("signalfd", 282),
    ("timerfd_create", 283),
    ("eventfd", 284),
    ("fallocate", 285),
    ("timerfd_settime", 286),
    ("timerfd_gettime", 287),
    ("accept4", 288),
    ("signalfd4", 289),
    ("eventfd2", 290),
    ("epoll_create1", 291),
    ("dup3", 292),
    ("pipe2", 293),
    ("inotify_init1", 294),
    ("preadv", 295),
    ("pwritev", 296),
    ("rt_tgsigqueueinfo", 297),
    ("recvmmsg", 299),
    ("fanotify_mark", 301),
    ("prlimit64", 302),
    ("name_to_handle_at", 303),
    ("clock_adjtime", 305),
    ("syncfs", 306),
    ("sendmmsg", 307),
    ("getcpu", 309),
    ("process_vm_readv", 310),
    ("process_vm_writev", 311),
    ("sched_setattr", 314),
    ("sched_getattr", 315),
    ("renameat2", 316),
    ("seccomp", 317),
    ("getrandom", 318),
    ("memfd_create", 319),
    ("execveat", 322),
    ("membarrier", 324),
    ("mlock2", 325),
    ("copy_file_range", 326),
    ("preadv2", 327),
    ("pwritev2", 328),
    ("pkey_mprotect", 329),
    ("pkey_alloc", 330),
    ("pkey_free", 331),
    ("statx", 332),
    ("io_pgetevents", 333),
    ("rseq", 334),
    ("pidfd_send_signal", 424),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("pidfd_open", 434),
    ("close_range", 436),
    ("openat2", 437),
    ("faccessat2", 439),
    ("epoll_pwait2", 441),
    ("landlock_create_ruleset", 444),
    ("landlock_add_rule", 445),
    ("landlock_restrict_self", 446),
    ("memfd_secret", 447),
    ("process_mrelease", 448),
    ("futex_waitv", 449),
];

#[cfg(target_arch = "aarch64")]
const ALLOWED: &[(&str, u32)] = &[
    ("io_setup", 0),
    ("io_destroy", 1),
    ("io_submit", 2),
    ("io_cancel", 3),
    ("io_getevents", 4),
    ("setxattr", 5),
    ("lsetxattr", 6),
    ("fsetxattr", 7),
    ("getxattr", 8),
    ("lgetxattr", 9),
    ("fgetxattr", 10),
    ("listxattr", 11),
    ("llistxattr", 12),
    ("flistxattr", 13),
    ("removexattr", 14),
    ("lremovexattr", 15),
    ("fremovexattr", 16),
    ("getcwd", 17),
    ("eventfd2", 19),
    ("epoll_create1", 20),
    ("epoll_ctl", 21),
    ("epoll_pwait", 22),
    ("dup", 23),
    ("dup3", 24),
    ("fcntl", 25),
    ("inotify_init1", 26),
    ("inotify_add_watch", 27),
    ("inotify_rm_watch", 28),
    ("ioctl", 29),
    ("ioprio_set", 30),
    ("ioprio_get", 31),
    ("flock", 32),
    ("mknodat", 33),
    ("mkdirat", 34),
    ("unlinkat", 35),
    ("symlinkat", 36),
    ("linkat", 37),
    ("renameat", 38),
    ("statfs", 43),
    ("fstatfs", 44),
    ("truncate", 45),
    ("ftruncate", 46),
    ("fallocate", 47),
    ("faccessat", 48),
    ("chdir", 49),
    ("fchdir", 50),
    ("chroot", 51),
    ("fchmod", 52),
    ("fchmodat", 53),
    ("fchownat", 54),
    ("fchown", 55),
    ("openat", 56),
    ("close", 57),
    ("pipe2", 59),
    ("getdents64", 61),
    ("lseek", 62),
    ("read", 63),
    ("write", 64),
    ("readv", 65),
    ("writev", 66),
    ("pread64", 67),
    ("pwrite64", 68),
    ("preadv", 69),
    ("pwritev", 70),
    ("sendfile", 71),
    ("pselect6", 72),
    ("ppoll", 73),
    ("signalfd4", 74),
    ("vmsplice", 75),
    ("splice", 76),
    ("tee", 77),
    ("readlinkat", 78),
    ("newfstatat", 79),
    ("fstat", 80),
    ("sync", 81),
    ("fsync", 82),
    ("fdatasync", 83),
    ("sync_file_range", 84),
    ("timerfd_create", 85),
    ("timerfd_settime", 86),
    ("timerfd_gettime", 87),
    ("utimensat", 88),
    ("capget", 90),
    ("capset", 91),
    ("exit", 93),
    ("exit_group", 94),
    ("waitid", 95),
    ("set_tid_address", 96),
    ("futex", 98),
    ("set_robust_list", 99),
    ("get_robust_list", 100),
    ("nanosleep", 101),
    ("getitimer", 102),
    ("setitimer", 103),
    ("timer_create", 107),
    ("timer_gettime", 108),
    ("timer_getoverrun", 109),
    ("timer_settime", 110),
    ("timer_delete", 111),
    ("clock_gettime", 113),
    ("clock_getres", 114),
    ("clock_nanosleep", 115),
    ("ptrace", 117),
    ("sched_setparam", 118),
    ("sched_setscheduler", 119),
    ("sched_getscheduler", 120),
    ("sched_getparam", 121),
    ("sched_setaffinity", 122),
    ("sched_getaffinity", 123),
    ("sched_yield", 124),
    ("sched_get_priority_max", 125),
    ("sched_get_priority_min", 126),
    ("sched_rr_get_interval", 127),
    ("restart_syscall", 128),
    ("kill", 129),
    ("tkill", 130),
    ("tgkill", 131),
    ("sigaltstack", 132),
    ("rt_sigsuspend", 133),
    ("rt_sigaction", 134),
    ("rt_sigprocmask", 135),
    ("rt_sigpending", 136),
    ("rt_sigtimedwait", 137),
    ("rt_sigqueueinfo", 138),
    ("rt_sigreturn", 139),
    ("setpriority", 140),
    ("getpriority", 141),
    ("setregid", 143),
    ("setgid", 144),
    ("setreuid", 145),
    ("setuid", 146),
    ("setresuid", 147),
    ("getresuid", 148),
    ("setresgid", 149),
    ("getresgid", 150),
    ("setfsuid", 151),
    ("setfsgid", 152),
    ("times", 153),
    ("setpgid", 154),
    ("getpgid", 155),
    ("getsid", 156),
    ("setsid", 157),
    ("getgroups", 158),
    ("setgroups", 159),
    ("uname", 160),
    ("getrlimit", 163),
    ("setrlimit", 164),
    ("getrusage", 165),
    ("umask", 166),
    ("prctl", 167),
    ("getcpu", 168),
    ("gettimeofday", 169),
    ("adjtimex", 171),
    ("getpid", 172),
    ("getppid", 173),
    ("getuid", 174),
    ("geteuid", 175),
    ("getgid", 176),
    ("getegid", 177),
    ("gettid", 178),
    ("sysinfo", 179),
    ("mq_open", 180),
    ("mq_unlink", 181),
    ("mq_timedsend", 182),
    ("mq_timedreceive", 183),
    ("mq_notify", 184),
    ("mq_getsetattr", 185),
    ("msgget", 186),
    ("msgctl", 187),
    ("msgrcv", 188),
    ("msgsnd", 189),
    ("semget", 190),
    ("semctl", 191),
    ("semtimedop", 192),
    ("semop", 193),
    ("shmget", 194),
    ("shmctl", 195),
    ("shmat", 196),
    ("shmdt", 197),
    ("socketpair", 199),
    ("bind", 200),
    ("listen", 201),
    ("accept", 202),
    ("connect", 203),
    ("getsockname", 204),
    ("getpeername", 205),
    ("sendto", 206),
    ("recvfrom", 207),
    ("setsockopt", 208),
    ("getsockopt", 209),
    ("shutdown", 210),
    ("sendmsg", 211),
    ("recvmsg", 212),
    ("readahead", 213),
    ("brk", 214),
    ("munmap", 215),
    ("mremap", 216),
    ("execve", 221),
    ("mmap", 222),
    ("fadvise64", 223),
    ("mprotect", 226),
    ("msync", 227),
    ("mlock", 228),
    ("munlock", 229),
    ("mlockall", 230),
    ("munlockall", 231),
    ("mincore", 232),
    ("madvise", 233),
    ("remap_file_pages", 234),
    ("rt_tgsigqueueinfo", 240),
    ("accept4", 242),
    ("recvmmsg", 243),
    ("wait4", 260),
    ("prlimit64", 261),
    ("fanotify_mark", 263),
    ("clock_adjtime", 266),
    ("syncfs", 267),
    ("sendmmsg", 269),
    ("process_vm_readv", 270),
    ("process_vm_writev", 271),
    ("sched_setattr", 274),
    ("sched_getattr", 275),
    ("renameat2", 276),
    ("seccomp", 277),
    ("getrandom", 278),
    ("memfd_create", 279),
    ("execveat", 281),
    ("membarrier", 283),
    ("mlock2", 284),
    ("copy_file_range", 285),
    ("preadv2", 286),
    ("pwritev2", 287),
    ("pkey_mprotect", 288),
    ("pkey_alloc", 289),
    ("pkey_free", 290),
    ("statx", 291),
    ("io_pgetevents", 292),
    ("rseq", 293),
    ("pidfd_send_signal", 424),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("pidfd_open", 434),
    ("close_range", 436),
    ("openat2", 437),
    ("faccessat2", 439),
    ("epoll_pwait2", 441),
    ("landlock_create_ruleset", 444),
    ("landlock_add_rule", 445),
    ("landlock_restrict_self", 446),
    ("memfd_secret", 447),
    ("process_mrelease", 448),
    ("futex_waitv", 449),
];

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const EPERM: u32 = libc::EPERM as u32;

// Classic BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JA: u16 = 0x05;
const AND_K: u16 = 0x54;
const RET_K: u16 = 0x06;

/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_low(i: u32) -> u32 {
    16 + 8 * i // little-endian: the low 32 bits come first
}

fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The filter as a BPF program.
pub(crate) fn program() -> Vec<libc::sock_filter> {
    let mut rules: Vec<(u32, Rule)> = ALLOWED.iter().map(|(_, nr)| (*nr, Rule::Allow)).collect();
    rules.extend(SPECIAL.iter().map(|(_, nr, r)| (*nr, *r)));
    rules.sort_by_key(|(nr, _)| *nr);
    rules.dedup_by_key(|(nr, _)| *nr);
    let mut p = vec![
        insn(LD_W_ABS, 0, 0, ARCH),
        insn(JEQ_K, 1, 0, AUDIT_ARCH),
        insn(RET_K, 0, 0, RET_ERRNO | EPERM),
        insn(LD_W_ABS, 0, 0, NR),
    ];
    p.extend(tree(&rules));
    p
}

/// A binary search over sorted syscall numbers (the accumulator holds the
/// number): a handful of comparisons per syscall instead of hundreds.
fn tree(rules: &[(u32, Rule)]) -> Vec<libc::sock_filter> {
    if rules.len() <= 4 {
        let mut out = Vec::new();
        for (nr, rule) in rules {
            let body = rule_body(*rule);
            out.push(insn(JEQ_K, 0, body.len() as u8, *nr));
            out.extend(body);
        }
        out.push(insn(RET_K, 0, 0, RET_ERRNO | EPERM));
        return out;
    }
    let mid = rules.len() / 2;
    let left = tree(&rules[..mid]);
    let right = tree(&rules[mid..]);
    let mut out = vec![insn(JGE_K, 0, 1, rules[mid].0), insn(JA, 0, 0, left.len() as u32)];
    out.extend(left);
    out.extend(right);
    out
}

/// What runs once the syscall matched; always ends in a return.
fn rule_body(rule: Rule) -> Vec<libc::sock_filter> {
    let deny = insn(RET_K, 0, 0, RET_ERRNO | EPERM);
    let allow = insn(RET_K, 0, 0, RET_ALLOW);
    match rule {
        Rule::Allow => vec![allow],
        Rule::Errno(e) => vec![insn(RET_K, 0, 0, RET_ERRNO | e)],
        Rule::ArgNot(i, v) => vec![insn(LD_W_ABS, 0, 0, arg_low(i)), insn(JEQ_K, 0, 1, v), deny, allow],
        Rule::ArgIn(i, values) => {
            let n = values.len();
            let mut out = vec![insn(LD_W_ABS, 0, 0, arg_low(i))];
            for (k, v) in values.iter().enumerate() {
                out.push(insn(JEQ_K, (n - k) as u8, 0, *v));
            }
            out.extend([deny, allow]);
            out
        }
        Rule::ArgMaskedZero(i, mask) => {
            vec![insn(LD_W_ABS, 0, 0, arg_low(i)), insn(AND_K, 0, 0, mask), insn(JEQ_K, 1, 0, 0), deny, allow]
        }
    }
}

/// Installs the filter on the calling thread, for it and what it execs.
/// Without `no_new_privs` (so setuid programs in the image keep working,
/// as under the engine), the caller needs CAP_SYS_ADMIN in its user
/// namespace: call it before the capabilities are dropped.
pub(crate) fn install() -> std::io::Result<()> {
    let mut p = program();
    let prog = libc::sock_fprog { len: p.len() as u16, filter: p.as_mut_ptr() };
    // SAFETY: `prog` points at `p`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER as libc::c_ulong, &prog as *const _)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The 32-bit x86 ABI a 64-bit x86 kernel also runs (`int 0x80`).
#[cfg(test)]
const AUDIT_ARCH_I386: u32 = 0x4000_0003;
/// Syscall numbers at or above this are x86's x32 ABI.
const X32_BIT: u32 = 0x4000_0000;
const JA_K: u16 = JA;

/// Refuses syscall `nr` when any of `args` holds one of `values`.
fn refuse_when(nr: u32, args: &[u32], values: &[u32]) -> Vec<libc::sock_filter> {
    let mut body = Vec::new();
    let checks = args.len() * (1 + values.len());
    let mut at = 0;
    for a in args {
        body.push(insn(LD_W_ABS, 0, 0, arg_low(*a)));
        at += 1;
        for v in values {
            // To the deny after the jump that ends the checks.
            body.push(insn(JEQ_K, (checks - at) as u8, 0, *v));
            at += 1;
        }
    }
    body.push(insn(JA_K, 0, 0, 1));
    body.push(insn(RET_K, 0, 0, RET_ERRNO | EPERM));
    let mut out = vec![insn(LD_W_ABS, 0, 0, NR), insn(JEQ_K, 0, body.len() as u8, nr)];
    out.extend(body);
    out
}

/// Refuses `socket` for every family but `allowed`.
fn sockets_only(allowed: &[u32]) -> Vec<libc::sock_filter> {
    let n = allowed.len();
    let mut body = vec![insn(LD_W_ABS, 0, 0, arg_low(0))];
    for (i, f) in allowed.iter().enumerate() {
        // Past the deny at the end of the block.
        body.push(insn(JEQ_K, (n - i) as u8, 0, *f));
    }
    body.push(insn(RET_K, 0, 0, RET_ERRNO | EPERM));
    let mut out = vec![insn(LD_W_ABS, 0, 0, NR), insn(JEQ_K, 0, body.len() as u8, libc::SYS_socket as u32)];
    out.extend(body);
    out
}

/// The container backend's filter for a step, on top of the container's
/// own: every call of another ABI (32-bit x86, x32) refused, as the local
/// backend's profile refuses them; a change to one of `forbidden_uids` (the
/// helper's, which would let the step signal it) refused; and with the
/// network off, `socket` for Unix and netlink sockets only (IPv4, IPv6,
/// packet, XDP and every other family fail with `EPERM`) and no
/// `io_uring_setup` (an io_uring can open sockets).
pub(crate) fn step_program(network: bool, forbidden_uids: &[u32]) -> Vec<libc::sock_filter> {
    let deny = insn(RET_K, 0, 0, RET_ERRNO | EPERM);
    let mut p = vec![
        insn(LD_W_ABS, 0, 0, ARCH),
        insn(JEQ_K, 1, 0, AUDIT_ARCH),
        deny,
        insn(LD_W_ABS, 0, 0, NR),
        insn(JGE_K, 0, 1, X32_BIT),
        deny,
    ];
    p.extend(refuse_when(libc::SYS_setuid as u32, &[0], forbidden_uids));
    p.extend(refuse_when(libc::SYS_setfsuid as u32, &[0], forbidden_uids));
    p.extend(refuse_when(libc::SYS_setreuid as u32, &[0, 1], forbidden_uids));
    p.extend(refuse_when(libc::SYS_setresuid as u32, &[0, 1, 2], forbidden_uids));
    if !network {
        p.extend([insn(LD_W_ABS, 0, 0, NR), insn(JEQ_K, 0, 1, libc::SYS_io_uring_setup as u32), deny]);
        p.extend(sockets_only(&[libc::AF_UNIX as u32, libc::AF_NETLINK as u32]));
    }
    p.push(insn(RET_K, 0, 0, RET_ALLOW));
    p
}

/// Installs [`step_program`] on the calling thread (with `no_new_privs`
/// unless the caller holds CAP_SYS_ADMIN; see the caller).
pub(crate) fn install_step_filter(network: bool, forbidden_uids: &[u32]) -> std::io::Result<()> {
    let mut p = step_program(network, forbidden_uids);
    let prog = libc::sock_fprog { len: p.len() as u16, filter: p.as_mut_ptr() };
    // SAFETY: as in `install`.
    let r = unsafe {
        libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER as libc::c_ulong, &prog as *const _)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program on (arch, nr, args) as the kernel would.
    fn eval(p: &[libc::sock_filter], arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                AND_K => acc &= i.k,
                JA => pc += i.k as usize,
                JEQ_K => pc += if acc == i.k { i.jt } else { i.jf } as usize,
                JGE_K => pc += if acc >= i.k { i.jt } else { i.jf } as usize,
                RET_K => return i.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    fn nr(name: &str) -> u32 {
        ALLOWED
            .iter()
            .map(|(n, v)| (*n, *v))
            .chain(SPECIAL.iter().map(|(n, v, _)| (*n, *v)))
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    #[test]
    fn the_profile_allows_what_docker_allows_and_refuses_the_rest() {
        let p = program();
        assert!(p.len() < 4096, "a BPF program holds at most 4096 instructions");
        let deny = RET_ERRNO | EPERM;
        for (name, n) in ALLOWED {
            assert_eq!(eval(&p, AUDIT_ARCH, *n, [0; 6]), RET_ALLOW, "{name} is allowed");
        }
        let allowed: Vec<u32> = ALLOWED.iter().map(|(_, n)| *n).collect();
        let special: Vec<u32> = SPECIAL.iter().map(|(_, n, _)| *n).collect();
        for n in 0..600u32 {
            if !allowed.contains(&n) && !special.contains(&n) {
                assert_eq!(eval(&p, AUDIT_ARCH, n, [0; 6]), deny, "syscall {n} is refused");
            }
        }
        for refused in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_pivot_root,
            libc::SYS_open_by_handle_at,
            libc::SYS_keyctl,
            libc::SYS_add_key,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_kexec_load,
            libc::SYS_reboot,
        ] {
            assert_eq!(eval(&p, AUDIT_ARCH, refused as u32, [0; 6]), deny, "syscall {refused}");
        }
        // Arguments.
        let clone = nr("clone");
        assert_eq!(eval(&p, AUDIT_ARCH, clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(
            eval(&p, AUDIT_ARCH, clone, [(libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, 0, 0, 0, 0, 0]),
            deny
        );
        assert_eq!(eval(&p, AUDIT_ARCH, clone, [libc::CLONE_NEWNS as u64, 0, 0, 0, 0, 0]), deny);
        assert_eq!(eval(&p, AUDIT_ARCH, nr("clone3"), [0; 6]), RET_ERRNO | libc::ENOSYS as u32);
        let socket = nr("socket");
        assert_eq!(eval(&p, AUDIT_ARCH, socket, [libc::AF_INET as u64, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(eval(&p, AUDIT_ARCH, socket, [libc::AF_VSOCK as u64, 0, 0, 0, 0, 0]), deny);
        let pers = nr("personality");
        assert_eq!(eval(&p, AUDIT_ARCH, pers, [0xffff_ffff, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(eval(&p, AUDIT_ARCH, pers, [0x0040000, 0, 0, 0, 0, 0]), deny, "ADDR_NO_RANDOMIZE");
        // Another ABI (i386 through int 0x80, x32 numbers) never reaches the table.
        assert_eq!(eval(&p, 0x4000_0003, 0, [0; 6]), deny);
        assert_eq!(eval(&p, AUDIT_ARCH, 0x4000_0000, [0; 6]), deny);
    }

    #[test]
    fn the_network_off_filter_refuses_ip_sockets_only() {
        let p = step_program(false, &[7777, 65533]);
        let deny = RET_ERRNO | EPERM;
        let socket = libc::SYS_socket as u32;
        for family in [libc::AF_INET, libc::AF_INET6, libc::AF_PACKET, libc::AF_XDP, libc::AF_VSOCK, 255] {
            assert_eq!(eval(&p, AUDIT_ARCH, socket, [family as u64, 1, 0, 0, 0, 0]), deny, "family {family}");
        }
        for family in [libc::AF_UNIX, libc::AF_NETLINK] {
            assert_eq!(
                eval(&p, AUDIT_ARCH, socket, [family as u64, 1, 0, 0, 0, 0]),
                RET_ALLOW,
                "family {family}"
            );
        }
        assert_eq!(eval(&p, AUDIT_ARCH, libc::SYS_io_uring_setup as u32, [0; 6]), deny);
        assert_eq!(eval(&p, AUDIT_ARCH, libc::SYS_openat as u32, [2; 6]), RET_ALLOW);
        assert_eq!(eval(&p, AUDIT_ARCH, X32_BIT | 41, [2; 6]), deny, "x32 socket");
        assert_eq!(eval(&p, AUDIT_ARCH_I386, 102, [1; 6]), deny, "i386 socketcall");
        assert_eq!(eval(&p, AUDIT_ARCH_I386, 5, [0; 6]), deny, "another ABI altogether");
        // With the network on, sockets and io_uring are the container's business.
        let on = step_program(true, &[7777, 65533]);
        assert_eq!(eval(&on, AUDIT_ARCH, socket, [libc::AF_INET as u64, 1, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(eval(&on, AUDIT_ARCH, libc::SYS_io_uring_setup as u32, [0; 6]), RET_ALLOW);
        assert_eq!(eval(&on, AUDIT_ARCH_I386, 5, [0; 6]), deny, "other ABIs stay refused");
    }

    #[test]
    fn a_step_cannot_take_the_helpers_user_id() {
        for network in [false, true] {
            let p = step_program(network, &[7777, 65533]);
            let deny = RET_ERRNO | EPERM;
            let nr = |n: libc::c_long| n as u32;
            assert_eq!(eval(&p, AUDIT_ARCH, nr(libc::SYS_setuid), [7777, 0, 0, 0, 0, 0]), deny);
            assert_eq!(eval(&p, AUDIT_ARCH, nr(libc::SYS_setfsuid), [65533, 0, 0, 0, 0, 0]), deny);
            assert_eq!(eval(&p, AUDIT_ARCH, nr(libc::SYS_setreuid), [1000, 7777, 0, 0, 0, 0]), deny);
            assert_eq!(eval(&p, AUDIT_ARCH, nr(libc::SYS_setresuid), [0, 0, 65533, 0, 0, 0]), deny);
            assert_eq!(
                eval(&p, AUDIT_ARCH, nr(libc::SYS_setresuid), [1000, 1000, 1000, 7777, 0, 0]),
                RET_ALLOW,
                "arg 3 is not a uid"
            );
            assert_eq!(
                eval(&p, AUDIT_ARCH, nr(libc::SYS_setuid), [1000, 7777, 0, 0, 0, 0]),
                RET_ALLOW,
                "setuid has one argument"
            );
            assert_eq!(
                eval(&p, AUDIT_ARCH, nr(libc::SYS_setreuid), [u32::MAX as u64, 0, 0, 0, 0, 0]),
                RET_ALLOW
            );
            assert_eq!(eval(&p, AUDIT_ARCH, nr(libc::SYS_setgid), [7777, 0, 0, 0, 0, 0]), RET_ALLOW);
        }
    }
}
