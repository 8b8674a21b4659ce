//! The initramfs's `/init`: a tiny static x86-64 program that kiln writes
//! byte by byte, so it is the same on every host and needs nothing from the
//! image or the host (no busybox, no C compiler, no libc).
//!
//! What it does, in order:
//! 1. mounts devtmpfs on /dev and loads the kernel modules the root needs
//!    (`finit_module`, in dependency order; one already loaded is fine);
//! 2. mounts the root filesystem, retrying for 30 s while the disk appears;
//! 3. moves it onto `/` and chroots into it (as `switch_root` does), then
//!    mounts /proc, /sys and /dev there (where the image has those folders);
//! 4. either execs the image's init as PID 1 (`[vm] init`), or runs the
//!    image's entrypoint as its user, in its workdir, with its environment,
//!    reaps every process, and powers the machine off when the entrypoint
//!    exits.
//!
//! Any failure prints `kiln-init: ...` on the console and powers off.

/// What the init does after the root is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Run {
    /// Exec `path` as PID 1 (e.g. systemd).
    Exec { path: String },
    /// Run a command and power off when it exits.
    Command {
        path: String,
        argv: Vec<String>,
        env: Vec<String>,
        workdir: String,
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InitPlan {
    /// Module files in the initramfs, in load order.
    pub(crate) modules: Vec<String>,
    pub(crate) root_device: String,
    pub(crate) root_fstype: String,
    pub(crate) run: Run,
}

// x86-64 Linux system call numbers.
const SYS_WRITE: u32 = 1;
const SYS_OPEN: u32 = 2;
const SYS_CLOSE: u32 = 3;
const SYS_NANOSLEEP: u32 = 35;
const SYS_FORK: u32 = 57;
const SYS_EXECVE: u32 = 59;
const SYS_EXIT: u32 = 60;
const SYS_WAIT4: u32 = 61;
const SYS_CHDIR: u32 = 80;
const SYS_SETUID: u32 = 105;
const SYS_SETGID: u32 = 106;
const SYS_SETGROUPS: u32 = 116;
const SYS_CHROOT: u32 = 161;
const SYS_SYNC: u32 = 162;
const SYS_MOUNT: u32 = 165;
const SYS_REBOOT: u32 = 169;
const SYS_PAUSE: u32 = 34;
const SYS_FINIT_MODULE: u32 = 313;

const O_CLOEXEC: u32 = 0o2000000;
const MS_MOVE: u32 = 8192;
const EEXIST: i8 = 17;
const ECHILD: i8 = 10;

/// The init program for `plan`, as a static ELF executable.
pub(crate) fn build(plan: &InitPlan) -> Vec<u8> {
    let mut a = Asm::default();
    let devtmpfs = a.string("devtmpfs");
    let dev = a.string("/dev");
    let empty = a.string("");
    a.syscall(
        SYS_MOUNT,
        &[Arg::Data(devtmpfs), Arg::Data(dev), Arg::Data(devtmpfs), Arg::Imm(0), Arg::Imm(0)],
    );

    for m in &plan.modules {
        let path = a.string(m);
        let cannot_open = a.string(&format!("kiln-init: cannot open the module {m}\n"));
        let cannot_load = a.string(&format!("kiln-init: cannot load the module {m}\n"));
        let (open_failed, next) = (a.label(), a.label());
        a.syscall(SYS_OPEN, &[Arg::Data(path), Arg::Imm(O_CLOEXEC), Arg::Imm(0)]);
        a.test_rax();
        a.jump(Cond::Negative, open_failed);
        a.mov(R12, RAX);
        a.syscall(SYS_FINIT_MODULE, &[Arg::Reg(R12), Arg::Data(empty), Arg::Imm(0)]);
        a.mov(R13, RAX);
        a.syscall(SYS_CLOSE, &[Arg::Reg(R12)]);
        a.mov(RAX, R13);
        a.test_rax();
        a.jump(Cond::NotNegative, next);
        a.cmp_rax(-EEXIST);
        a.jump(Cond::Equal, next);
        a.print(cannot_load);
        a.jump(Cond::Always, next);
        a.bind(open_failed);
        a.print(cannot_open);
        a.bind(next);
    }

    let poweroff = a.label();
    let device = a.string(&plan.root_device);
    let newroot = a.string("/root");
    let fstype = a.string(&plan.root_fstype);
    let sleep = a.timespec(0, 50_000_000);
    let no_root = a.string(&format!(
        "kiln-init: cannot mount the root filesystem {} ({}) after 30 s\n",
        plan.root_device, plan.root_fstype
    ));
    let (retry, mounted) = (a.label(), a.label());
    a.mov_imm(RBX, 600);
    a.bind(retry);
    a.syscall(
        SYS_MOUNT,
        &[Arg::Data(device), Arg::Data(newroot), Arg::Data(fstype), Arg::Imm(0), Arg::Data(empty)],
    );
    a.test_rax();
    a.jump(Cond::NotNegative, mounted);
    a.syscall(SYS_NANOSLEEP, &[Arg::Data(sleep), Arg::Imm(0)]);
    a.dec_rbx();
    a.jump(Cond::NotEqual, retry);
    a.print(no_root);
    a.jump(Cond::Always, poweroff);

    a.bind(mounted);
    let dot = a.string(".");
    let slash = a.string("/");
    let no_switch = a.string("kiln-init: cannot switch to the root filesystem\n");
    let switch_failed = a.label();
    a.syscall(SYS_CHDIR, &[Arg::Data(newroot)]);
    a.syscall(SYS_MOUNT, &[Arg::Data(dot), Arg::Data(slash), Arg::Imm(0), Arg::Imm(MS_MOVE), Arg::Imm(0)]);
    a.test_rax();
    a.jump(Cond::Negative, switch_failed);
    a.syscall(SYS_CHROOT, &[Arg::Data(dot)]);
    a.test_rax();
    a.jump(Cond::Negative, switch_failed);
    a.syscall(SYS_CHDIR, &[Arg::Data(slash)]);
    for (what, at, fs) in
        [("proc", "/proc", "proc"), ("sysfs", "/sys", "sysfs"), ("devtmpfs", "/dev", "devtmpfs")]
    {
        let (what, at, fs) = (a.string(what), a.string(at), a.string(fs));
        a.syscall(SYS_MOUNT, &[Arg::Data(what), Arg::Data(at), Arg::Data(fs), Arg::Imm(0), Arg::Imm(0)]);
    }

    match &plan.run {
        Run::Exec { path } => {
            let p = a.string(path);
            let argv = a.pointers(&[p]);
            let env: Vec<usize> = ["HOME=/", "TERM=linux"].iter().map(|s| a.string(s)).collect();
            let envp = a.pointers(&env);
            let failed = a.string(&format!("kiln-init: cannot run the init {path}\n"));
            a.syscall(SYS_EXECVE, &[Arg::Data(p), Arg::Data(argv), Arg::Data(envp)]);
            a.print(failed);
            a.jump(Cond::Always, poweroff);
        }
        Run::Command { path, argv, env, workdir, uid, gid, groups } => {
            let gids = a.u32s(groups);
            let p = a.string(path);
            let args: Vec<usize> = argv.iter().map(|s| a.string(s)).collect();
            let argv_ptr = a.pointers(&args);
            let vars: Vec<usize> = env.iter().map(|s| a.string(s)).collect();
            let envp = a.pointers(&vars);
            let wd = a.string(workdir);
            let no_fork = a.string("kiln-init: cannot start a process\n");
            let no_user = a.string(&format!("kiln-init: cannot switch to user {uid}:{gid}\n"));
            let no_wd = a.string(&format!("kiln-init: cannot enter the working folder {workdir}\n"));
            let no_exec = a.string(&format!("kiln-init: cannot run {path}\n"));
            let (parent, child, user_fail, wd_fail, done) =
                (a.label(), a.label(), a.label(), a.label(), a.label());
            a.syscall(SYS_FORK, &[]);
            a.test_rax();
            a.jump(Cond::Positive, parent);
            a.jump(Cond::Equal, child);
            a.print(no_fork);
            a.jump(Cond::Always, poweroff);
            // The child: drop to the image's user, enter the workdir, exec.
            a.bind(child);
            a.syscall(SYS_SETGROUPS, &[Arg::Imm(groups.len() as u32), Arg::Data(gids)]);
            a.syscall(SYS_SETGID, &[Arg::Imm(*gid)]);
            a.test_rax();
            a.jump(Cond::Negative, user_fail);
            a.syscall(SYS_SETUID, &[Arg::Imm(*uid)]);
            a.test_rax();
            a.jump(Cond::Negative, user_fail);
            a.syscall(SYS_CHDIR, &[Arg::Data(wd)]);
            a.test_rax();
            a.jump(Cond::Negative, wd_fail);
            a.syscall(SYS_EXECVE, &[Arg::Data(p), Arg::Data(argv_ptr), Arg::Data(envp)]);
            a.print(no_exec);
            a.syscall(SYS_EXIT, &[Arg::Imm(127)]);
            a.bind(user_fail);
            a.print(no_user);
            a.syscall(SYS_EXIT, &[Arg::Imm(126)]);
            a.bind(wd_fail);
            a.print(no_wd);
            a.syscall(SYS_EXIT, &[Arg::Imm(126)]);
            // The parent: reap every process until the command has exited.
            a.bind(parent);
            a.mov(R12, RAX);
            let status = a.scratch(4);
            let reap = a.label();
            a.bind(reap);
            a.syscall(SYS_WAIT4, &[Arg::Imm(u32::MAX), Arg::Data(status), Arg::Imm(0), Arg::Imm(0)]);
            a.cmp_rax_r12();
            a.jump(Cond::Equal, done);
            a.cmp_rax(-ECHILD);
            a.jump(Cond::NotEqual, reap);
            a.bind(done);
            a.report_status(status, "the entrypoint");
        }
    }
    a.jump(Cond::Always, poweroff);
    a.bind(switch_failed);
    a.print(no_switch);
    a.bind(poweroff);
    a.syscall(SYS_SYNC, &[]);
    a.syscall(
        SYS_REBOOT,
        &[Arg::Imm(0xfee1_dead), Arg::Imm(672_274_793), Arg::Imm(0x4321_fedc), Arg::Imm(0)],
    );
    let forever = a.label();
    a.bind(forever);
    a.syscall(SYS_PAUSE, &[]);
    a.jump(Cond::Always, forever);
    a.finish()
}

// Registers by their encoding number.
type Reg = u8;
const RAX: Reg = 0;
const RCX: Reg = 1;
const RDX: Reg = 2;
const RBX: Reg = 3;
const RSI: Reg = 6;
const RDI: Reg = 7;
const R8: Reg = 8;
const R9: Reg = 9;
const R10: Reg = 10;
const R12: Reg = 12;
const R13: Reg = 13;
const ARG_REGS: [Reg; 6] = [RDI, RSI, RDX, R10, R8, R9];

#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A 32-bit value, zero-extended (`u32::MAX` is -1 only for calls that
    /// read an int, such as wait4's pid).
    Imm(u32),
    /// The address of data at this offset.
    Data(usize),
    Reg(Reg),
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Cond {
    Always,
    Equal,
    NotEqual,
    Negative,
    NotNegative,
    /// Greater than zero (signed), after `test`.
    Positive,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Label(usize);

/// Where the program is loaded; its headers, code and data in one segment.
const BASE: u64 = 0x40_0000;
const HEADERS: usize = 64 + 56;

/// A minimal x86-64 assembler: straight-line code, conditional jumps to
/// labels, and a read-only data area addressed absolutely.
#[derive(Default)]
pub(crate) struct Asm {
    code: Vec<u8>,
    data: Vec<u8>,
    /// Code offsets of 32-bit immediates that hold a data address.
    data_refs: Vec<(usize, usize)>,
    /// Data offsets of 64-bit pointers to other data.
    data_ptrs: Vec<(usize, usize)>,
    /// Code offsets of 32-bit jump displacements, and their label.
    jumps: Vec<(usize, usize)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    pub(crate) fn string(&mut self, s: &str) -> usize {
        let at = self.data.len();
        self.data.extend_from_slice(s.as_bytes());
        self.data.push(0);
        at
    }

    fn align8(&mut self) {
        while !self.data.len().is_multiple_of(8) {
            self.data.push(0);
        }
    }

    fn timespec(&mut self, sec: u64, nsec: u64) -> usize {
        self.align8();
        let at = self.data.len();
        self.data.extend_from_slice(&sec.to_le_bytes());
        self.data.extend_from_slice(&nsec.to_le_bytes());
        at
    }

    /// `len` zero bytes of data the program writes (the segment is writable).
    pub(crate) fn scratch(&mut self, len: usize) -> usize {
        self.align8();
        let at = self.data.len();
        self.data.resize(at + len, 0);
        at
    }

    /// `mov eax, [data]` (32 bits).
    fn load_eax(&mut self, off: usize) {
        self.code.extend_from_slice(&[0x8b, 0x04, 0x25]);
        self.data_refs.push((self.code.len(), off));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// Prints how a process whose wait status is at `status` ended, unless
    /// it exited 0: `kiln-init: WHAT exited with status N` or `... was
    /// killed by signal N`.
    pub(crate) fn report_status(&mut self, status: usize, what: &str) {
        let exited = self.string(&format!("kiln-init: {what} exited with status "));
        let killed = self.string(&format!("kiln-init: {what} was killed by signal "));
        let newline = self.string("\n");
        let digits = self.scratch(16);
        let (signaled, number, quiet) = (self.label(), self.label(), self.label());
        self.load_eax(status);
        self.code.extend_from_slice(&[0x89, 0xc1]); // mov ecx, eax
        self.code.extend_from_slice(&[0x81, 0xe1, 0x7f, 0, 0, 0]); // and ecx, 0x7f
        self.code.extend_from_slice(&[0x85, 0xc9]); // test ecx, ecx
        self.jump(Cond::NotEqual, signaled);
        self.code.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
        self.code.extend_from_slice(&[0x25, 0xff, 0, 0, 0]); // and eax, 0xff
        self.code.extend_from_slice(&[0x85, 0xc0]); // test eax, eax
        self.jump(Cond::Equal, quiet);
        self.print(exited);
        self.load_eax(status);
        self.code.extend_from_slice(&[0xc1, 0xe8, 0x08, 0x25, 0xff, 0, 0, 0]); // shr eax, 8; and eax, 0xff
        self.jump(Cond::Always, number);
        self.bind(signaled);
        self.print(killed);
        self.load_eax(status);
        self.code.extend_from_slice(&[0x25, 0x7f, 0, 0, 0]); // and eax, 0x7f
        self.bind(number);
        // The decimal digits, last first, down from the end of `digits`.
        self.mov_imm(RSI, 0);
        self.data_refs.push((self.code.len() - 4, digits + 16));
        self.mov_imm(RCX, 10);
        let more = self.label();
        self.bind(more);
        self.code.extend_from_slice(&[0x31, 0xd2]); // xor edx, edx
        self.code.extend_from_slice(&[0xf7, 0xf1]); // div ecx
        self.code.extend_from_slice(&[0x80, 0xc2, b'0']); // add dl, '0'
        self.code.extend_from_slice(&[0x48, 0xff, 0xce]); // dec rsi
        self.code.extend_from_slice(&[0x88, 0x16]); // mov [rsi], dl
        self.code.extend_from_slice(&[0x85, 0xc0]); // test eax, eax
        self.jump(Cond::NotEqual, more);
        self.mov_imm(RDX, 0);
        self.data_refs.push((self.code.len() - 4, digits + 16));
        self.code.extend_from_slice(&[0x48, 0x29, 0xf2]); // sub rdx, rsi
        self.mov_imm(RDI, 2);
        self.mov_imm(RAX, SYS_WRITE);
        self.code.extend_from_slice(&[0x0f, 0x05]);
        self.print(newline);
        self.bind(quiet);
    }

    /// An array of 32-bit values (setgroups' list).
    fn u32s(&mut self, items: &[u32]) -> usize {
        self.align8();
        let at = self.data.len();
        for i in items {
            self.data.extend_from_slice(&i.to_le_bytes());
        }
        at
    }

    /// A NULL-terminated array of pointers to data (argv, envp).
    pub(crate) fn pointers(&mut self, items: &[usize]) -> usize {
        self.align8();
        let at = self.data.len();
        for &i in items {
            self.data_ptrs.push((self.data.len(), i));
            self.data.extend_from_slice(&[0; 8]);
        }
        self.data.extend_from_slice(&[0; 8]);
        at
    }

    pub(crate) fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    pub(crate) fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    fn mov_imm(&mut self, reg: Reg, v: u32) {
        if reg >= 8 {
            self.code.push(0x41);
        }
        self.code.push(0xb8 + (reg & 7));
        self.code.extend_from_slice(&v.to_le_bytes());
    }

    /// `mov dst, src` (64-bit).
    fn mov(&mut self, dst: Reg, src: Reg) {
        let rex = 0x48 | ((src >> 3) << 2) | (dst >> 3);
        self.code.extend_from_slice(&[rex, 0x89, 0xc0 | ((src & 7) << 3) | (dst & 7)]);
    }

    pub(crate) fn syscall(&mut self, nr: u32, args: &[Arg]) {
        for (i, arg) in args.iter().enumerate() {
            let reg = ARG_REGS[i];
            match *arg {
                Arg::Imm(v) => self.mov_imm(reg, v),
                Arg::Data(off) => {
                    self.mov_imm(reg, 0);
                    let at = self.code.len() - 4;
                    self.data_refs.push((at, off));
                }
                Arg::Reg(r) => self.mov(reg, r),
            }
        }
        self.mov_imm(RAX, nr);
        self.code.extend_from_slice(&[0x0f, 0x05]);
    }

    /// write(2, msg) for a NUL-terminated string in data.
    pub(crate) fn print(&mut self, msg: usize) {
        let len = self.data[msg..].iter().position(|b| *b == 0).expect("terminated");
        self.syscall(SYS_WRITE, &[Arg::Imm(2), Arg::Data(msg), Arg::Imm(len as u32)]);
    }

    fn test_rax(&mut self) {
        self.code.extend_from_slice(&[0x48, 0x85, 0xc0]);
    }

    fn cmp_rax(&mut self, v: i8) {
        self.code.extend_from_slice(&[0x48, 0x83, 0xf8, v as u8]);
    }

    fn cmp_rax_r12(&mut self) {
        self.code.extend_from_slice(&[0x4c, 0x39, 0xe0]);
    }

    fn dec_rbx(&mut self) {
        self.code.extend_from_slice(&[0x48, 0xff, 0xcb]);
    }

    pub(crate) fn jump(&mut self, cond: Cond, to: Label) {
        match cond {
            Cond::Always => self.code.push(0xe9),
            c => {
                let op = match c {
                    Cond::Equal => 0x84,
                    Cond::NotEqual => 0x85,
                    Cond::Negative => 0x88,
                    Cond::NotNegative => 0x89,
                    Cond::Positive => 0x8f, // jg: ZF = 0 and SF = OF (test clears OF)
                    Cond::Always => unreachable!(),
                };
                self.code.extend_from_slice(&[0x0f, op]);
            }
        }
        self.jumps.push((self.code.len(), to.0));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// The ELF file.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        for (at, label) in std::mem::take(&mut self.jumps) {
            let target = self.labels[label].expect("every label is bound") as i64;
            let rel = (target - (at as i64 + 4)) as i32;
            self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
        }
        let code_end = HEADERS + self.code.len();
        let data_start = code_end.next_multiple_of(8);
        let addr = |off: usize| BASE + (data_start + off) as u64;
        for (at, off) in std::mem::take(&mut self.data_refs) {
            let a = u32::try_from(addr(off)).expect("below 4 GiB");
            self.code[at..at + 4].copy_from_slice(&a.to_le_bytes());
        }
        for (at, off) in std::mem::take(&mut self.data_ptrs) {
            self.data[at..at + 8].copy_from_slice(&addr(off).to_le_bytes());
        }
        let total = (data_start + self.data.len()) as u64;
        let mut elf = Vec::with_capacity(total as usize);
        // ELF header.
        elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&(BASE + HEADERS as u64).to_le_bytes()); // entry
        elf.extend_from_slice(&64u64.to_le_bytes()); // program headers
        elf.extend_from_slice(&0u64.to_le_bytes()); // no section headers
        elf.extend_from_slice(&0u32.to_le_bytes());
        elf.extend_from_slice(&64u16.to_le_bytes());
        elf.extend_from_slice(&56u16.to_le_bytes());
        elf.extend_from_slice(&1u16.to_le_bytes());
        elf.extend_from_slice(&64u16.to_le_bytes());
        elf.extend_from_slice(&0u16.to_le_bytes());
        elf.extend_from_slice(&0u16.to_le_bytes());
        // One loadable segment: read, execute, and write (the wait status).
        elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf.extend_from_slice(&7u32.to_le_bytes()); // PF_R | PF_W | PF_X
        elf.extend_from_slice(&0u64.to_le_bytes());
        elf.extend_from_slice(&BASE.to_le_bytes());
        elf.extend_from_slice(&BASE.to_le_bytes());
        elf.extend_from_slice(&total.to_le_bytes());
        elf.extend_from_slice(&total.to_le_bytes());
        elf.extend_from_slice(&0x1000u64.to_le_bytes());
        debug_assert_eq!(elf.len(), HEADERS);
        elf.extend_from_slice(&self.code);
        elf.resize(data_start, 0);
        elf.extend_from_slice(&self.data);
        elf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn run(elf: &[u8]) -> std::process::Output {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("prog");
        std::fs::write(&p, elf).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Another test's fork may still hold the file open for writing for
        // a moment ("text file busy"): try again.
        for _ in 0..100 {
            match std::process::Command::new(&p).output() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                r => return r.unwrap(),
            }
        }
        panic!("{} stayed busy", p.display());
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_assembler_makes_programs_that_run() {
        // Writes, a counted loop, a conditional jump, and exit.
        let mut a = Asm::default();
        let hello = a.string("hello\n");
        let x = a.string("x");
        a.print(hello);
        let (top, out) = (a.label(), a.label());
        a.mov_imm(RBX, 3);
        a.bind(top);
        a.syscall(SYS_WRITE, &[Arg::Imm(1), Arg::Data(x), Arg::Imm(1)]);
        a.dec_rbx();
        a.jump(Cond::NotEqual, top);
        a.syscall(SYS_CLOSE, &[Arg::Imm(9999)]); // -EBADF
        a.test_rax();
        a.jump(Cond::Negative, out);
        a.syscall(SYS_EXIT, &[Arg::Imm(1)]);
        a.bind(out);
        a.syscall(SYS_EXIT, &[Arg::Imm(7)]);
        let o = run(&a.finish());
        assert_eq!(String::from_utf8_lossy(&o.stderr), "hello\n");
        assert_eq!(String::from_utf8_lossy(&o.stdout), "xxx");
        assert_eq!(o.status.code(), Some(7));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn execve_gets_its_argv_and_environment() {
        let mut a = Asm::default();
        let sh = a.string("/bin/sh");
        let args = ["/bin/sh", "-c", "echo \"$0 $1 $GREETING\"", "zero", "one"].map(|s| a.string(s));
        let argv = a.pointers(&args);
        let env = [a.string("GREETING=hi there")];
        let envp = a.pointers(&env);
        a.syscall(SYS_EXECVE, &[Arg::Data(sh), Arg::Data(argv), Arg::Data(envp)]);
        a.syscall(SYS_EXIT, &[Arg::Imm(99)]);
        let o = run(&a.finish());
        assert_eq!(String::from_utf8_lossy(&o.stdout), "zero one hi there\n");
        assert_eq!(o.status.code(), Some(0));
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn how_a_command_ended_is_reported_unless_it_succeeded() {
        for (script, want) in [
            ("exit 0", ""),
            ("exit 3", "kiln-init: the command exited with status 3\n"),
            ("exit 255", "kiln-init: the command exited with status 255\n"),
            ("kill -9 $$", "kiln-init: the command was killed by signal 9\n"),
        ] {
            let mut a = Asm::default();
            let sh = a.string("/bin/sh");
            let args = [a.string("/bin/sh"), a.string("-c"), a.string(script)];
            let argv = a.pointers(&args);
            let envp = a.pointers(&[]);
            let status = a.scratch(4);
            let child = a.label();
            a.syscall(SYS_FORK, &[]);
            a.test_rax();
            a.jump(Cond::Equal, child);
            a.syscall(SYS_WAIT4, &[Arg::Imm(u32::MAX), Arg::Data(status), Arg::Imm(0), Arg::Imm(0)]);
            a.report_status(status, "the command");
            a.syscall(SYS_EXIT, &[Arg::Imm(0)]);
            a.bind(child);
            a.syscall(SYS_EXECVE, &[Arg::Data(sh), Arg::Data(argv), Arg::Data(envp)]);
            a.syscall(SYS_EXIT, &[Arg::Imm(99)]);
            let o = run(&a.finish());
            assert_eq!(String::from_utf8_lossy(&o.stderr), want, "{script}");
            assert_eq!(o.status.code(), Some(0));
        }
    }

    #[test]
    fn the_init_is_the_same_for_the_same_plan() {
        let plan = InitPlan {
            modules: vec!["/m/virtio_blk.ko".into(), "/m/ext4.ko".into()],
            root_device: "/dev/vda2".into(),
            root_fstype: "ext4".into(),
            run: Run::Command {
                path: "/bin/sh".into(),
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec!["PATH=/bin".into()],
                workdir: "/".into(),
                uid: 0,
                gid: 0,
                groups: vec![0],
            },
        };
        let a = build(&plan);
        assert_eq!(a, build(&plan));
        assert_eq!(&a[..4], b"\x7fELF");
        let mut other = plan.clone();
        other.run = Run::Exec { path: "/sbin/init".into() };
        assert_ne!(a, build(&other));
    }
}
