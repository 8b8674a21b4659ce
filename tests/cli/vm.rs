//! `-o vm:FILE`: disks that are reproducible, clean, hold what the image
//! holds, and boot.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// Partition `n` (1-based) of a raw disk, copied out to `out`.
fn partition(disk: &Path, n: usize, out: &Path) {
    let o = Command::new("sfdisk").arg("-J").arg(disk).output().unwrap();
    assert!(o.status.success(), "sfdisk -J: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let p = &v["partitiontable"]["partitions"][n - 1];
    let (start, size) = (p["start"].as_u64().unwrap() * 512, p["size"].as_u64().unwrap() * 512);
    let mut src = fs::File::open(disk).unwrap();
    src.seek(SeekFrom::Start(start)).unwrap();
    let mut dst = fs::File::create(out).unwrap();
    std::io::copy(&mut src.take(size), &mut dst).unwrap();
}

fn e2fsck_clean(part: &Path) {
    let o = Command::new("e2fsck").arg("-fn").arg(part).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "e2fsck -fn: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Every entry under `root`: type, mode, owner, and content digest or target.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut names: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for p in names {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let m = fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let what = if ft.is_symlink() {
                format!("symlink {}", fs::read_link(&p).unwrap().display())
            } else if ft.is_dir() {
                "dir".to_string()
            } else if ft.is_fifo() {
                "fifo".to_string()
            } else {
                format!("file {}", sha256_file(&p))
            };
            let mode = if ft.is_symlink() { 0 } else { m.mode() & 0o7777 };
            out.insert(rel, format!("{what} {mode:o} {}:{}", m.uid(), m.gid()));
            if ft.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The root filesystem of a disk (partition `n`): the partition file, and
/// its files dumped with debugfs (contents and symlinks only: rdump drops
/// setuid bits and skips fifos, so metadata comes from [`snapshot_ext4`]).
fn dump_root(p: &Project, disk: &Path, n: usize) -> (PathBuf, PathBuf) {
    let part = p.path("root.ext4");
    partition(disk, n, &part);
    let dest = p.path("dumped");
    fs::create_dir_all(&dest).unwrap();
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", dest.display()))
        .arg(&part)
        .output()
        .unwrap();
    assert!(o.status.success(), "debugfs rdump: {}", String::from_utf8_lossy(&o.stderr));
    (part, dest)
}

/// [`snapshot`] of an ext4 image, read with debugfs (`ls -p` of every
/// folder for types, modes and owners; `dumped` for contents and targets).
fn snapshot_ext4(part: &Path, dumped: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![String::new()];
    while !dirs.is_empty() {
        let script: String =
            dirs.iter().map(|d| format!("ls -p \"/{}\"\n", d.replace('"', "\"\""))).collect();
        let o = Command::new("debugfs")
            .arg("-f")
            .arg("-")
            .arg(part)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().unwrap().write_all(script.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let mut next = Vec::new();
        let mut current = 0usize;
        for line in text.lines() {
            if line.starts_with("debugfs: ls -p") {
                current += 1;
                continue;
            }
            let f: Vec<&str> = line.split('/').collect();
            if f.len() < 8 || !line.starts_with('/') {
                continue;
            }
            let (mode, uid, gid, name) = (u32::from_str_radix(f[2], 8).unwrap(), f[3], f[4], f[5]);
            if name == "." || name == ".." || f[1] == "0" {
                continue;
            }
            let dir = &dirs[current - 1];
            let rel = if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
            let host = dumped.join(&rel);
            let what = match mode & 0o170000 {
                0o040000 => {
                    next.push(rel.clone());
                    "dir".to_string()
                }
                0o100000 => format!("file {}", sha256_file(&host)),
                0o120000 => format!("symlink {}", fs::read_link(&host).unwrap().display()),
                0o010000 => "fifo".to_string(),
                other => format!("type {other:o}"),
            };
            let perm = if mode & 0o170000 == 0o120000 { 0 } else { mode & 0o7777 };
            out.insert(rel, format!("{what} {perm:o} {uid}:{gid}"));
        }
        dirs = next;
    }
    out
}

fn umoci_rootfs(p: &Project, layout: &str) -> PathBuf {
    let dest = p.path(&format!("{layout}-unpacked"));
    let o = Command::new("umoci")
        .args(["raw", "unpack", "--image", &format!("{}:latest", p.path(layout).display())])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(o.status.success(), "umoci: {}", String::from_utf8_lossy(&o.stderr));
    dest
}

/// The disk's files match the OCI image's, apart from what a disk adds:
/// lost+found, and the mount points kiln makes when the image lacks them.
fn assert_same_files(part: &Path, dumped: &Path, oci_root: &Path) -> BTreeMap<String, String> {
    let mut disk = snapshot_ext4(part, dumped);
    let oci = snapshot(oci_root);
    disk.remove("lost+found");
    for d in ["dev", "proc", "sys"] {
        if !oci.contains_key(d) {
            assert_eq!(disk.remove(d).as_deref(), Some("dir 755 0:0"), "/{d} is added as a mount point");
        }
    }
    let only_disk: Vec<_> = disk.iter().filter(|(k, v)| oci.get(*k) != Some(v)).collect();
    let only_oci: Vec<_> = oci.iter().filter(|(k, v)| disk.get(*k) != Some(v)).collect();
    assert!(only_disk.is_empty() && only_oci.is_empty(), "disk: {only_disk:#?}\noci: {only_oci:#?}");
    disk
}

fn vm_tools() -> bool {
    ["mke2fs", "debugfs", "e2fsck", "sfdisk", "qemu-img", "umoci"].iter().all(|t| require(t))
}

const DATA_RECIPE: &str = r#"[image]
name = "vmdata"

[[step]]
copy = "busybox"
to = "/bin/busybox"

[[step]]
copy = "app"
to = "/app"
owner = "1000:1000"

[[step]]
write = "/usr/bin/setuid-tool"
content = "not really\n"
mode = "4755"

[[step]]
run = ["/bin/busybox", "sh", "-c", "busybox ln /app/a.txt /app/hard && busybox ln -s ../app/a.txt /etc-link && busybox mkfifo /fifo && busybox rm /app/gone.txt && busybox mkdir -p /var/empty && busybox chown 5:6 /var/empty && busybox chmod 1777 /var/empty"]

[config]
entrypoint = ["/bin/busybox", "true"]

[vm]
boot = "none"
"#;

fn data_project() -> Option<Project> {
    if !vm_tools() || !require_root() {
        return None;
    }
    let busybox = busybox()?;
    let p = Project::new();
    p.recipe(DATA_RECIPE);
    fs::copy(busybox, p.path("busybox")).unwrap();
    p.file("app/a.txt", "a\n")
        .file("app/gone.txt", "deleted by a run step\n")
        .exec_file("app/run.sh", "#!/bin/sh\n")
        .file("app/with space \"quoted\".txt", "names debugfs must quote\n")
        .file("app/deep/er/file", noise(3, 200_000));
    Some(p)
}

#[test]
fn a_data_disk_is_reproducible_clean_and_holds_the_images_files() {
    let Some(p) = data_project() else { return };
    let r = p.build(&["-o", "oci:out", "-o", "vm:disk.raw", "-o", "vm:disk.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (raw, qcow2) = (sha256_file(&p.path("disk.raw")), sha256_file(&p.path("disk.qcow2")));

    // Again in a fresh cache, another folder, another umask and SOURCE_DATE_EPOCH unset: same bytes.
    let q = data_project().unwrap();
    let r = q.kiln_with(&["build", "kiln.toml", "-o", "vm:d/disk.raw", "-o", "vm:d/disk.qcow2"], |c| {
        c.env("KILN_CACHE_DIR", q.path("other-cache"));
        c.arg("--progress").arg("plain");
        with_umask(c, 0o077);
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&q.path("d/disk.raw")), raw, "the raw disk is reproducible");
    assert_eq!(sha256_file(&q.path("d/disk.qcow2")), qcow2, "the qcow2 disk is reproducible");

    // qemu-img reads the qcow2 as the same disk.
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(p.path("disk.raw"))
        .arg(p.path("disk.qcow2"))
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img compare: {}", String::from_utf8_lossy(&o.stdout));

    // One Linux partition; a clean ext4 holding exactly the image's files.
    let o = Command::new("sfdisk").arg("-d").arg(p.path("disk.raw")).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("label: dos") && table.contains("type=83") && !table.contains("bootable"),
        "{table}"
    );
    let (part, dumped) = dump_root(&p, &p.path("disk.raw"), 1);
    e2fsck_clean(&part);
    let snap = assert_same_files(&part, &dumped, &umoci_rootfs(&p, "out"));
    assert!(snap["usr/bin/setuid-tool"].ends_with(" 4755 0:0"), "{}", snap["usr/bin/setuid-tool"]);
    assert_eq!(snap["fifo"], "fifo 644 0:0");
    assert!(snap["var/empty"].ends_with("1777 5:6"), "{}", snap["var/empty"]);
    assert!(snap["app/a.txt"].ends_with("1000:1000"));
    assert!(!snap.contains_key("app/gone.txt"), "whiteouts are applied");
    // The hard link is one inode on the disk.
    let o = Command::new("debugfs").args(["-R", "stat /app/hard"]).arg(&part).output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Links: 2"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Every inode has the image's times (epoch 0), whatever the clock said.
    let o = Command::new("debugfs").args(["-R", "stat /app/run.sh"]).arg(&part).output().unwrap();
    let stat = String::from_utf8_lossy(&o.stdout);
    for t in ["ctime: 0x00000000", "atime: 0x00000000", "mtime: 0x00000000", "crtime: 0x00000000"] {
        assert!(stat.contains(t), "{t} in {stat}");
    }
}

#[test]
fn a_data_disk_needs_no_root_and_is_the_same() {
    let Some(p) = data_project() else { return };
    let Some(user) = rootless_user() else { return };
    let r = p.build(&["-o", "vm:root.raw"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // An ordinary user: no chown, no setuid files, no device nodes on the
    // host; the owners and modes go into the filesystem through debugfs.
    let r = p.kiln_as(user, "user-cache", &["build", "kiln.toml", "-o", "vm:user.raw"], |c| {
        c.env("PATH", "/usr/bin:/bin");
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&p.path("user.raw")), sha256_file(&p.path("root.raw")), "{}", r.stderr);
}

/// Sets the child's umask (through a shell, which applies it and execs).
fn with_umask(c: &mut Command, mask: u32) {
    let program = c.get_program().to_owned();
    let args: Vec<_> = c.get_args().map(|a| a.to_owned()).collect();
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!("umask {mask:o} && exec \"$0\" \"$@\"")).arg(program).args(args);
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    if let Some(d) = c.get_current_dir() {
        sh.current_dir(d);
    }
    *c = sh;
}

#[test]
fn a_config_change_reuses_the_root_filesystem() {
    let Some(p) = data_project() else { return };
    let r = p.kiln(&["build", "kiln.toml", "-o", "vm:disk.raw", "--progress", "plain"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("vm root ext4") && r.stderr.contains("made in"), "{}", r.stderr);
    p.recipe(
        &DATA_RECIPE.replace(
            "entrypoint = [\"/bin/busybox\", \"true\"]",
            "entrypoint = [\"/bin/busybox\", \"false\"]",
        ),
    );
    let r = p.kiln(&["build", "kiln.toml", "-o", "vm:disk2.raw", "--progress", "plain"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("cached"), "the root partition comes from the store: {}", r.stderr);
    assert_eq!(sha256_file(&p.path("disk.raw")), sha256_file(&p.path("disk2.raw")));
    let du = p.kiln(&["cache", "du"]);
    assert!(du.stdout.contains("1 disks"), "{}", du.stdout);
}

#[test]
fn vm_outputs_refuse_bad_input_with_a_hint() {
    if !vm_tools() {
        return;
    }
    let p = Project::new();
    p.file("hello.txt", "hi\n");
    let base = "[image]\nname = \"novm\"\n\n[[step]]\ncopy = \"hello.txt\"\nto = \"/hello.txt\"\n\n[config]\nentrypoint = [\"/hello\"]\n";

    // No kernel, and a bootable disk asked for (the default).
    p.recipe(base);
    let r = p.build(&["-o", "vm:disk.raw"]);
    assert_eq!(r.code, 2, "{}", r.failure());
    assert!(
        r.failure().contains("holds no kernel") && r.failure().contains("linux-image-amd64"),
        "{}",
        r.failure()
    );
    assert!(r.failure().contains("boot = \"none\""), "{}", r.failure());
    assert!(!p.path("disk.raw").exists());

    // Too small: names the size it needs, at the recipe's line.
    p.recipe(&format!("{base}\n[vm]\nboot = \"none\"\nsize = \"2M\"\n"));
    let r = p.build(&["-o", "vm:disk.raw"]);
    assert_eq!(r.code, 2, "{}", r.failure());
    assert!(
        r.failure().contains("kiln.toml:13") && r.failure().contains("needs at least"),
        "{}",
        r.failure()
    );
    assert!(r.failure().contains("size = \""), "{}", r.failure());
    assert!(!p.path("disk.raw").exists());
    let left: Vec<_> = fs::read_dir(p.path("."))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.starts_with(".kiln-disk").then_some(n)
        })
        .collect();
    assert!(left.is_empty(), "no temp disk is left: {left:?}");

    // The file name says the format.
    p.recipe(&format!("{base}\n[vm]\nboot = \"none\"\n"));
    let r = p.build(&["-o", "vm:disk.img"]);
    assert_eq!(r.code, 2, "{}", r.failure());
    assert!(r.failure().contains(".raw") && r.failure().contains(".qcow2"), "{}", r.failure());

    // Bad [vm] values are located.
    for (vm, want) in [
        ("boot = \"floppy\"", "not a boot method"),
        ("size = \"lots\"", "not a disk size"),
        ("size = \"1.5K\"", "multiple of 1 MiB"),
        ("filesystem = \"btrfs\"", "not a filesystem kiln writes"),
        ("init = \"sbin/init\"", "not an absolute path"),
        ("sise = \"1G\"", "unknown field"),
    ] {
        p.recipe(&format!("{base}\n[vm]\n{vm}\n"));
        let r = p.build(&["-o", "vm:disk.raw"]);
        assert_eq!(r.code, 2, "{vm}: {}", r.stderr);
        assert!(r.failure().contains(want), "{vm}: {}", r.stderr);
    }

    // A data disk when asked for, even without a kernel.
    p.recipe(&format!("{base}\n[vm]\nboot = \"none\"\n"));
    let r = p.build(&["-o", "vm:disk.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.failure());
    assert!(p.path("disk.qcow2").is_file());
}

/// Set when KVM failed to run a guest: later boots go straight to TCG.
static KVM_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Boots `disk` under qemu until it powers off; KVM when it works, else TCG.
/// Returns the console output, the time to the marker, and the accelerator.
pub fn boot(disk: &Path, format: &str, uefi: bool, marker: &str) -> (String, Duration, &'static str) {
    let kvm = fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    let mut last = String::new();
    for accel in ["kvm", "tcg"] {
        if accel == "kvm" && (!kvm || KVM_BROKEN.load(std::sync::atomic::Ordering::Relaxed)) {
            continue;
        }
        // KVM gets a short bound: where it cannot run a stock kernel (as on
        // some nested hosts) it fails or stalls early, and TCG takes over.
        let limit = if accel == "kvm" { Duration::from_secs(60) } else { Duration::from_secs(300) };
        let started = Instant::now();
        let mut child = Command::new("qemu-system-x86_64")
            .args(["-m", "512", "-nographic", "-no-reboot", "-accel", accel])
            .args(if uefi { &["-bios", OVMF][..] } else { &[][..] })
            .arg("-drive")
            .arg(format!("file={},format={format},if=virtio,snapshot=on", disk.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64");
        let (tx, rx) = std::sync::mpsc::channel();
        let pipes: [Box<dyn Read + Send>; 2] =
            [Box::new(child.stdout.take().unwrap()), Box::new(child.stderr.take().unwrap())];
        for (i, mut pipe) in pipes.into_iter().enumerate() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 || tx.send((i, buf[..n].to_vec(), Instant::now())).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let (mut text, mut err) = (Vec::new(), Vec::new());
        let mut at = None;
        let status = loop {
            while let Ok((i, chunk, when)) = rx.try_recv() {
                if i == 1 {
                    err.extend_from_slice(&chunk);
                    continue;
                }
                text.extend_from_slice(&chunk);
                if at.is_none() && String::from_utf8_lossy(&text).contains(marker) {
                    at = Some(when - started);
                }
            }
            if let Some(s) = child.try_wait().unwrap() {
                break Some(s);
            }
            // Where KVM cannot run this guest, qemu says so and stops the
            // guest without exiting: fall back to TCG at once.
            let kvm_failed = accel == "kvm" && {
                let e = String::from_utf8_lossy(&err);
                e.contains("KVM internal error") || e.contains("emulation failure")
            };
            if kvm_failed || started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                if kvm_failed {
                    KVM_BROKEN.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(100));
        while let Ok((i, chunk, _)) = rx.try_recv() {
            if i == 0 {
                text.extend_from_slice(&chunk)
            } else {
                err.extend_from_slice(&chunk)
            }
        }
        let err = String::from_utf8_lossy(&err).into_owned();
        let console = String::from_utf8_lossy(&text).into_owned();
        if let (Some(s), Some(t)) = (status, at) {
            if s.success() {
                return (console, t, accel);
            }
        }
        last = format!("[{accel}: {status:?}, marker at {at:?}]\n{console}\n{err}");
        let _ = std::io::stderr().write_all(format!("{accel} did not reach the marker; ").as_bytes());
    }
    panic!("the VM did not boot to `{marker}` and power off: {last}");
}

/// Debian's OVMF: UEFI firmware for qemu.
const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

#[test]
fn the_vm_example_is_reproducible_and_boots_to_its_marker() {
    if !vm_tools() || !require("qemu-system-x86_64") || !require_root() || !debian_mirror() {
        return;
    }
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples/vm-hello");
    let copy = |p: &Project| {
        assert!(Command::new("cp").arg("-a").arg(&example).arg(p.path("ex")).status().unwrap().success());
    };
    let a = Project::new();
    copy(&a);
    let r = a.kiln(&["build", "ex/kiln.toml", "-o", "vm:disk.raw", "-o", "vm:disk.qcow2", "-o", "oci:out"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let b = Project::new();
    copy(&b);
    let r = b.kiln_with(&["build", "ex/kiln.toml", "-o", "vm:x/disk.raw", "-o", "vm:x/disk.qcow2"], |c| {
        with_umask(c, 0o027);
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(sha256_file(&a.path("disk.raw")), sha256_file(&b.path("x/disk.raw")), "raw");
    assert_eq!(sha256_file(&a.path("disk.qcow2")), sha256_file(&b.path("x/disk.qcow2")), "qcow2");

    // A BIOS boot partition and the root; the root is clean and holds the image's files.
    let o = Command::new("sfdisk").arg("-d").arg(a.path("disk.raw")).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("type=c, bootable") && table.contains("type=83"), "{table}");
    let (part, dumped) = dump_root(&a, &a.path("disk.raw"), 2);
    e2fsck_clean(&part);
    assert_same_files(&part, &dumped, &umoci_rootfs(&a, "out"));

    let (console, t, accel) =
        boot(&a.path("disk.qcow2"), "qcow2", false, "KILN-VM-HELLO: hello from a kiln-built VM");
    assert!(console.contains("Power down") && !console.contains("kiln-init:"), "{console}");
    eprintln!("BIOS: booted to the marker in {:.1} s under {accel}", t.as_secs_f64());
    let (console, _, _) = boot(&a.path("disk.raw"), "raw", false, "KILN-VM-HELLO:");
    assert!(console.contains("(kernel 6.1."), "{console}");

    // The same recipe for UEFI: a GPT disk whose EFI system partition holds
    // systemd-boot; the root partition is the one already made.
    if !Path::new(OVMF).exists() {
        assert!(std::env::var_os("CI").is_none(), "{OVMF} is required in CI (ovmf)");
        eprintln!("SKIPPED: UEFI boot ({OVMF} is missing: apt-get install ovmf)");
        return;
    }
    let recipe = fs::read_to_string(a.path("ex/kiln.toml")).unwrap();
    fs::write(a.path("ex/kiln.toml"), recipe.replace("[vm]\n", "[vm]\nboot = \"uefi\"\n")).unwrap();
    let r = a.kiln(&["build", "ex/kiln.toml", "-o", "vm:efi.qcow2", "--progress", "plain"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("vm root ext4") && r.stderr.contains("cached"), "{}", r.stderr);
    let o = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(a.path("efi.qcow2"))
        .arg(a.path("efi.raw"))
        .output()
        .unwrap();
    assert!(o.status.success());
    let o = Command::new("sfdisk").arg("-d").arg(a.path("efi.raw")).output().unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("label: gpt") && table.contains("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
        "{table}"
    );
    let (console, t, accel) =
        boot(&a.path("efi.qcow2"), "qcow2", true, "KILN-VM-HELLO: hello from a kiln-built VM");
    assert!(console.contains("Power down"), "{console}");
    eprintln!("UEFI: booted to the marker in {:.1} s under {accel}", t.as_secs_f64());

    // `init`: the image's own program runs as PID 1 instead of the entrypoint.
    let recipe = fs::read_to_string(a.path("ex/kiln.toml")).unwrap().replace("boot = \"uefi\"\n", "");
    let recipe = recipe.replace(
        "[config]",
        "[[step]]\nwrite = \"/sbin/hello-init\"\nmode = \"0755\"\ncontent = \"#!/bin/busybox sh\\necho KILN-INIT-EXEC as pid $$\\nbusybox poweroff -f\\n\"\n\n[config]",
    );
    fs::write(a.path("ex/kiln.toml"), recipe.replace("[vm]\n", "[vm]\ninit = \"/sbin/hello-init\"\n"))
        .unwrap();
    let r = a.kiln(&["build", "ex/kiln.toml", "-o", "vm:init.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (console, _, _) = boot(&a.path("init.qcow2"), "qcow2", false, "KILN-INIT-EXEC as pid 1");
    assert!(!console.contains("KILN-VM-HELLO"), "{console}");
}
