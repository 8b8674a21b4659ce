//! Hostile recipes and bases (issue 13): what a `run` step may do as root,
//! layers that try to leave the image root, outputs onto what is not a
//! file, secrets that must leave no trace. Each test is written from the
//! class of attack, not only from the one input that found it.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use crate::run::{project, unpack};
use crate::support::*;

/// A static x86_64 program that makes syscall `nr` with zero arguments and
/// exits with its errno (0 when it succeeded): the image needs no libc.
fn syscall_probe(nr: u32) -> Vec<u8> {
    let base: u64 = 0x40_0000;
    let mut code = vec![0xb8];
    code.extend(nr.to_le_bytes()); // mov eax, nr
    code.extend([0x31, 0xff, 0x31, 0xf6, 0x31, 0xd2, 0x45, 0x31, 0xd2]); // zero rdi rsi rdx r10
    code.extend([0x45, 0x31, 0xc0, 0x45, 0x31, 0xc9]); // zero r8 r9
    code.extend([0x0f, 0x05]); // syscall
    code.extend([0xf7, 0xd8, 0x89, 0xc7]); // neg eax; mov edi, eax
    code.extend([0xb8, 60, 0, 0, 0, 0x0f, 0x05]); // exit(edi)
    let total = 64 + 56 + code.len() as u64;
    let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend((base + 120).to_le_bytes()); // entry
    elf.extend(64u64.to_le_bytes()); // phoff
    elf.extend(0u64.to_le_bytes()); // shoff
    elf.extend(0u32.to_le_bytes());
    elf.extend([64, 0, 56, 0, 1, 0, 0, 0, 0, 0, 0, 0]); // ehsize, phentsize, phnum, sh*
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    elf.extend(0u64.to_le_bytes());
    elf.extend(base.to_le_bytes());
    elf.extend(base.to_le_bytes());
    elf.extend(total.to_le_bytes());
    elf.extend(total.to_le_bytes());
    elf.extend(0x1000u64.to_le_bytes());
    elf.extend(code);
    elf
}

const PROBE_STEP: &str = r#"
[[step]]
copy = "probes"
to = "/probes"
mode = "0755"

[[step]]
run = """
mkdir -p /mnt /report
grep -E '^(CapEff|CapBnd|CapInh|Seccomp|NoNewPrivs|SigIgn|SigBlk):' /proc/self/status > /report/status
unshare -m true 2>/dev/null; echo "unshare $?" >> /report/calls
mount -t tmpfs none /mnt 2>/dev/null; echo "mount $?" >> /report/calls
if [ -x /probes/open_by_handle_at ]; then /probes/open_by_handle_at; echo "open_by_handle_at $?" >> /report/calls; /probes/keyctl; echo "keyctl $?" >> /report/calls; fi
for f in kcore timer_list keys sched_debug; do [ -e /proc/$f ] && echo "$f $(wc -c < /proc/$f)" >> /report/masked; done
(echo x > /proc/sys/kernel/hostname) 2>/dev/null; echo "sysctl $?" >> /report/calls
(mount -o remount,rw /sys) 2>/dev/null; echo "sys $?" >> /report/calls
timeout 20 sh -c 'yes | head -n 1' > /report/yes
(mknod /dev/kmsg2 c 1 11 && echo kiln-test > /dev/kmsg2) 2>/dev/null; echo "devnode $?" >> /report/calls
(mknod /rootnode c 1 11 && echo kiln-test > /rootnode) 2>/dev/null; echo "rootnode $?" >> /report/calls
rm -f /dev/kmsg2 /rootnode
"""
"#;

#[test]
fn a_root_step_is_confined_as_the_engine_confines_a_container() {
    let Some(p) = project(&format!("[image]\nname = \"confined\"\nbase = \"stage:base\"\n{PROBE_STEP}"))
    else {
        return;
    };
    fs::create_dir_all(p.path("probes")).unwrap();
    fs::write(p.path("probes/.keep"), "").unwrap();
    if cfg!(target_arch = "x86_64") {
        p.exec_file("probes/open_by_handle_at", syscall_probe(304));
        p.exec_file("probes/keyctl", syscall_probe(250));
    }
    let mut backends = vec!["local"];
    if require_docker() {
        backends.push("docker");
    }
    let mut reports = Vec::new();
    for backend in backends {
        let out = format!("out-{backend}");
        let r = p.kiln(&["build", "kiln.toml", "--backend", backend, "-o", &format!("oci:{out}")]);
        r.digest();
        let root = unpack(&p, &out);
        let status = fs::read_to_string(root.join("report/status")).unwrap();
        let calls = fs::read_to_string(root.join("report/calls")).unwrap();
        for want in [
            "CapEff:\t00000000a80425fb",
            "CapBnd:\t00000000a80425fb",
            "CapInh:\t0000000000000000",
            "Seccomp:\t2",
            "NoNewPrivs:\t0",
            "SigIgn:\t0000000000000000",
        ] {
            assert!(status.contains(want), "{backend}: no `{want}` in\n{status}");
        }
        // Device nodes a step makes do not open the host's devices (the engine
        // has a devices cgroup; the local sandbox mounts its root and /dev nodev).
        for call in ["unshare", "mount", "sysctl", "sys", "devnode", "rootnode"] {
            assert!(!calls.contains(&format!("{call} 0\n")), "{backend}: `{call}` succeeded:\n{calls}");
        }
        if cfg!(target_arch = "x86_64") {
            // EPERM from the filter; without it, root gets EFAULT and EINVAL.
            assert!(calls.contains("open_by_handle_at 1\n"), "{backend}:\n{calls}");
            assert!(calls.contains("keyctl 1\n"), "{backend}:\n{calls}");
        }
        let masked = fs::read_to_string(root.join("report/masked")).unwrap();
        assert!(!masked.is_empty(), "{backend}: no masked /proc file to read");
        for line in masked.lines() {
            assert!(line.ends_with(" 0"), "{backend}: /proc/{line} bytes: not masked");
        }
        assert_eq!(
            fs::read_to_string(root.join("report/yes")).unwrap(),
            "y\n",
            "{backend}: SIGPIPE ends `yes`"
        );
        reports.push((status, calls));
    }
    if reports.len() == 2 {
        assert_eq!(reports[0], reports[1], "the local sandbox confines as the engine does");
    }
}

#[test]
fn a_non_root_step_holds_no_capability() {
    let Some(p) = project(
        "[image]\nname = \"u\"\nbase = \"stage:base\"\n[[step]]\nrun = \"mkdir /r && chmod 777 /r\"\n[[step]]\nuser = \"1000:1000\"\nrun = \"grep -E '^Cap(Eff|Prm):' /proc/self/status > /r/caps\"\n",
    ) else {
        return;
    };
    p.build(&[]).digest();
    let root = unpack(&p, "out");
    let caps = fs::read_to_string(root.join("r/caps")).unwrap();
    assert_eq!(caps, "CapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n");
}

/// A host folder a hostile layer aims at, with a file it must not touch.
fn victim() -> tempfile::TempDir {
    let d = tempfile::Builder::new().prefix("kiln-victim-").tempdir().unwrap();
    fs::write(d.path().join("precious"), "keep").unwrap();
    fs::create_dir(d.path().join("sub")).unwrap();
    fs::write(d.path().join("sub/inner"), "keep").unwrap();
    d
}

fn assert_untouched(v: &tempfile::TempDir) {
    let mut names: Vec<String> = fs::read_dir(v.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["precious", "sub"], "the host folder changed");
    assert_eq!(fs::read_to_string(v.path().join("precious")).unwrap(), "keep");
    assert_eq!(fs::read_to_string(v.path().join("sub/inner")).unwrap(), "keep");
    let xattr = Command::new("getfattr").arg("-d").arg("-m").arg("-").arg(v.path().join("sub")).output();
    if let Ok(o) = xattr {
        assert!(!String::from_utf8_lossy(&o.stdout).contains("opaque"), "an opaque marker reached the host");
    }
}

#[test]
fn layers_that_lead_out_of_the_root_are_refused_and_the_host_is_untouched() {
    let v = victim();
    let host = v.path().to_str().unwrap().as_bytes().to_vec();
    let sub = format!("{}/sub", v.path().display()).into_bytes();
    // (name, entries, what the error says)
    let cases: Vec<(&str, Vec<RawEntry>, &str)> = vec![
        (
            "dup-write",
            vec![(b"d", b'2', &host), (b"d/file", b'0', b""), (b"d", b'5', b"")],
            "makes a symlink",
        ),
        (
            "dup-whiteout",
            vec![(b"d", b'2', &host), (b"d/.wh.precious", b'0', b""), (b"d", b'5', b"")],
            "makes a symlink",
        ),
        (
            "dup-opaque",
            vec![(b"d", b'2', &sub), (b"d/.wh..wh..opq", b'0', b""), (b"d", b'5', b"")],
            "makes a symlink",
        ),
        (
            "nested",
            vec![(b"a", b'5', b""), (b"a/b", b'2', &host), (b"a/b/c/file", b'0', b"")],
            "goes through `a/b`",
        ),
        ("retype", vec![(b"d", b'5', b""), (b"d", b'2', &host), (b"d/x", b'0', b"")], "appears twice"),
        (
            "hardlink-via-symlink",
            vec![(b"l", b'2', &host), (b"h", b'1', b"l/precious")],
            "not an earlier entry",
        ),
        (
            "hardlink-absolute-target",
            vec![(b"l", b'2', b"/"), (b"h", b'1', b"l/etc/passwd")],
            "not an earlier entry",
        ),
        ("hardlink-to-folder", vec![(b"d", b'5', b""), (b"h", b'1', b"d")], "points to the folder"),
        // A folder the layer fills first and makes a symlink last (the merged
        // tree would hold the symlink and what is "under" it).
        (
            "symlink-after-its-children",
            vec![(b"d/x", b'0', b""), (b"d/.wh..wh..opq", b'0', b""), (b"d", b'2', &host)],
            "as a folder and then as a symlink",
        ),
        ("whiteout-around-children", vec![(b"x/y", b'0', b""), (b".wh.x", b'0', b"")], "both in the layer"),
    ];
    for (name, entries, want) in cases {
        let p = Project::new();
        hostile_archive(&p, "base.tar", &entries);
        for out in [vec!["-o", "oci:out"], vec!["-o", "vm:out.raw"]] {
            p.recipe("[image]\nname = \"x\"\nbase = \"oci-archive:base.tar\"\n[[step]]\nrun = \"true\"\n");
            let r = p.build(&out);
            assert_eq!(r.code, 2, "{name}: {}", r.stderr);
            assert!(r.stderr.contains(want), "{name}: no `{want}` in {}", r.stderr);
            assert_untouched(&v);
        }
        // Nothing in the store shares an inode with the host's files.
        let host_inode = fs::metadata(v.path().join("precious")).unwrap().ino();
        for e in walkdir::WalkDir::new(&p.cache).into_iter().flatten() {
            assert_ne!(
                e.metadata().unwrap().ino(),
                host_inode,
                "{name}: a host file was linked into the store"
            );
        }
    }
}

#[test]
fn archive_outputs_never_replace_what_is_not_a_regular_file() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    fs::create_dir(p.path("adir")).unwrap();
    assert!(Command::new("mkfifo").arg(p.path("fifo")).status().unwrap().success());
    p.symlink("link.tar", "/etc/hostname");
    for (target, kind) in
        [("/dev/null", "device"), ("fifo", "fifo"), ("adir", "folder"), ("link.tar", "symlink")]
    {
        for format in ["oci-archive", "docker-archive"] {
            let r = p.build(&["-o", &format!("{format}:{target}")]);
            assert_eq!(r.code, 2, "{format}:{target}: {}", r.stderr);
            assert!(r.stderr.contains("is not a regular file"), "{kind}: {}", r.stderr);
        }
    }
    let md = fs::symlink_metadata("/dev/null").unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(&md.file_type()), "/dev/null is still a device");
    assert!(fs::symlink_metadata(p.path("fifo")).unwrap().file_type().is_fifo_like());
    assert!(fs::symlink_metadata(p.path("link.tar")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_dir(p.path("adir")).unwrap().count(), 0);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        std::os::unix::fs::FileTypeExt::is_fifo(self)
    }
}

#[test]
fn an_oci_output_into_a_folder_of_other_files_is_refused_and_left_alone() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n")
        .file("mine/oci-layout", "my own file")
        .file("mine/notes.txt", "notes");
    let r = p.build(&["-o", "oci:mine"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not an OCI layout"), "{}", r.stderr);
    assert_eq!(fs::read_to_string(p.path("mine/oci-layout")).unwrap(), "my own file");
    assert_eq!(fs::read_dir(p.path("mine")).unwrap().count(), 2);
    // An empty folder and an existing layout are both fine.
    fs::create_dir(p.path("empty")).unwrap();
    let d = p.build(&["-o", "oci:empty"]).digest();
    assert_eq!(p.build(&["-o", "oci:empty:second"]).digest(), d);
}

#[test]
fn temp_files_of_a_killed_archive_export_are_swept_by_the_next_one() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    // What a kiln killed mid-write leaves: its pid is gone.
    let dead = dead_pid();
    p.file(&format!("out/.image.tar.kiln-{dead}-abc123.tmp"), vec![0u8; 4096]);
    p.file("out/.other.tar.kiln-1-abc123.tmp", "not ours to judge: pid 1 lives");
    p.build(&["-o", "oci-archive:out/image.tar"]).digest();
    let mut names: Vec<String> = fs::read_dir(p.path("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [".other.tar.kiln-1-abc123.tmp", "image.tar"]);
}

#[test]
fn killing_kiln_during_a_step_with_a_secret_leaves_no_trace_of_it() {
    let Some(p) = project("[image]\nname = \"s\"\nbase = \"stage:base\"\n[[step]]\nsecrets = [\"tok\"]\nrun = \"cat /run/secrets/tok > /dev/null; sleep 30\"\n") else {
        return;
    };
    // Made at run time, so no file (this test's source included) holds it unless kiln leaked it.
    let value = &format!(
        "kiln-test-secret-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let mut child = p
        .command(&["build", "kiln.toml", "--secret", "id=tok,env=TOK", "--progress", "plain"])
        .env("TOK", value)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the step to start, then kill -9.
    let t = std::time::Instant::now();
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let running = Command::new("pgrep").args(["-f", "sleep 30"]).output().unwrap();
        if running.status.success() || t.elapsed().as_secs() > 60 {
            break;
        }
    }
    let pid = child.id();
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Only this kiln's folders: other tests make and sweep theirs at the same time.
    let mine: Vec<String> =
        shm_secret_dirs().into_iter().filter(|n| n.starts_with(&format!("kiln-secrets-{pid}-"))).collect();
    assert!(mine.is_empty(), "a secret folder was left in /dev/shm: {mine:?}");
    // No file anywhere kiln writes holds the value.
    for dir in [p.cache.clone(), std::path::PathBuf::from("/dev/shm"), std::env::temp_dir()] {
        for e in walkdir::WalkDir::new(&dir).into_iter().flatten() {
            if e.file_type().is_file() && e.metadata().map(|m| m.len() < 1 << 20).unwrap_or(false) {
                if let Ok(b) = fs::read(e.path()) {
                    assert!(
                        !b.windows(value.len()).any(|w| w == value.as_bytes()),
                        "{} holds the secret",
                        e.path().display()
                    );
                }
            }
        }
    }
}

fn shm_secret_dirs() -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir("/dev/shm")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("kiln-secrets-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn gc_sweeps_secret_folders_that_a_killed_kiln_left() {
    let dead = dead_pid();
    let left =
        std::path::Path::new("/dev/shm").join(format!("kiln-secrets-{dead}-test{}", std::process::id()));
    fs::create_dir_all(&left).unwrap();
    fs::write(left.join("tok"), "value").unwrap();
    let live = std::path::Path::new("/dev/shm").join(format!("kiln-secrets-{}-live", std::process::id()));
    fs::create_dir_all(&live).unwrap();
    let p = Project::new();
    let r = p.kiln(&["cache", "gc"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!left.exists(), "the dead kiln's secret folder is swept");
    assert!(live.exists(), "a running kiln's folder is kept");
    fs::remove_dir_all(&live).unwrap();
}

#[test]
fn a_multi_line_secret_is_masked_on_every_line_in_plain_and_json_progress() {
    let Some(p) = project("[image]\nname = \"s\"\nbase = \"stage:base\"\n[[step]]\nsecrets = [\"key\"]\nrun = \"cat /run/secrets/key; cat /run/secrets/key >&2\"\n") else {
        return;
    };
    let key = "-----BEGIN TEST KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nZmlyc3QtbGluZS1zZWNyZXQtdmFsdWU=\n-----END TEST KEY-----\n";
    p.file("key.pem", key);
    for progress in ["plain", "json"] {
        let r = p.kiln(&[
            "build",
            "kiln.toml",
            "--no-cache",
            "--secret",
            "id=key,src=key.pem",
            "--progress",
            progress,
        ]);
        r.digest();
        assert!(r.stderr.contains("[secret]"), "{progress}: {}", r.stderr);
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!r.stderr.contains(line), "{progress}: `{line}` shown in\n{}", r.stderr);
        }
    }
}

#[test]
fn a_corrupt_file_in_the_unpack_pool_is_rebuilt_never_shipped() {
    let Some(p) = project(
        "[image]\nname = \"pool\"\nbase = \"stage:base\"\n[[step]]\ncopy = \"data.bin\"\nto = \"/data.bin\"\n[[step]]\nrun = \"cp /data.bin /copy.bin\"\n",
    ) else {
        return;
    };
    p.file("data.bin", noise(7, 300_000));
    let clean = p.build(&[]).digest();
    // Flip one byte of every pool file of that size (the copied file's), in place.
    let mut flipped = 0;
    for e in fs::read_dir(p.cache.join("v1/files")).unwrap().flatten() {
        if e.metadata().unwrap().len() == 300_000 {
            let mut b = fs::read(e.path()).unwrap();
            b[1000] ^= 0xff;
            let mut f = fs::OpenOptions::new().write(true).open(e.path()).unwrap();
            std::io::Write::write_all(&mut f, &b).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0, "the pool holds the file");
    let r = p.build(&["--no-cache", "-o", "oci:again"]);
    assert_eq!(r.digest(), clean, "the corrupt pool file reached the image:\n{}", r.stderr);
    let root = unpack(&p, "again");
    assert_eq!(fs::read(root.join("copy.bin")).unwrap(), noise(7, 300_000));
}

/// The pid of a process that has exited: what a killed kiln leaves in names.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// A file only a reader of it could know: if any of it shows in an error,
/// kiln echoed bytes it read.
const HOST_SECRET: &str = "root:$6$kilnTESTsecretHASHvalue0123456789:19000:0:99999:7:::\n";

#[test]
fn a_base_that_is_no_archive_is_refused_without_quoting_it() {
    let p = Project::new();
    p.file("shadow", HOST_SECRET.repeat(20));
    // A tar header whose numeric fields hold the secret, with a right checksum:
    // tar parsers quote fields they cannot read.
    let mut h = [0u8; 512];
    h[..10].copy_from_slice(b"some/file\0");
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"kilnTEST"); // uid
    h[116..124].copy_from_slice(b"secretHA"); // gid
    h[124..136].copy_from_slice(b"SHvalue01234"); // size
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut tarish = h.to_vec();
    tarish.extend([0u8; 1024]);
    p.file("tarish.tar", tarish);
    for (base, file) in [
        ("docker-archive:shadow", "shadow"),
        ("oci-archive:shadow", "shadow"),
        ("docker-archive:tarish.tar", "tarish"),
        ("oci-archive:tarish.tar", "tarish"),
        ("docker-archive:/etc/shadow", "/etc/shadow"),
    ] {
        p.recipe(&format!("[image]\nname = \"x\"\nbase = \"{base}\"\n"));
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{base}: {}", r.stderr);
        for piece in ["kilnTEST", "secretHA", "SHvalue0", "$6$"] {
            assert!(!r.stderr.contains(piece), "{base}: `{piece}` echoed:\n{}", r.stderr);
        }
        if file == "/etc/shadow" {
            if let Ok(real) = fs::read_to_string("/etc/shadow") {
                for line in real.lines().filter(|l| l.len() > 12) {
                    assert!(!r.stderr.contains(&line[..12]), "/etc/shadow echoed:\n{}", r.stderr);
                }
            }
        }
    }
}

#[test]
fn a_layer_whose_header_fields_hold_text_is_refused_without_quoting_it() {
    let p = Project::new();
    // A layer entry whose uid field is text (tar-rs would quote it).
    let layer_tar = {
        let mut h = tar::Header::new_ustar();
        h.set_path("etc/ok").unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.as_old_mut().uid.copy_from_slice(b"SECRETX\0");
        h.set_cksum();
        let mut v = h.as_bytes().to_vec();
        v.extend([0u8; 1024]);
        v
    };
    write_oci_layout(&p, "lay", &layer_tar, None);
    p.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("malformed uid field"), "{}", r.stderr);
    assert!(!r.stderr.contains("SECRETX"), "{}", r.stderr);
}

/// An OCI layout of one uncompressed layer; `size` overrides the size its
/// descriptor claims. Returns the layer blob's path.
fn write_oci_layout(p: &Project, dir: &str, layer: &[u8], size: Option<u64>) -> std::path::PathBuf {
    use sha2::Digest;
    let hex = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let blobs = p.path(&format!("{dir}/blobs/sha256"));
    fs::create_dir_all(&blobs).unwrap();
    let layer_d = hex(layer);
    fs::write(blobs.join(&layer_d), layer).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{layer_d}"]}},"config":{{}}}}"#
    );
    let config_d = hex(config.as_bytes());
    fs::write(blobs.join(&config_d), &config).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{layer_d}","size":{}}}]}}"#,
        config.len(),
        size.unwrap_or(layer.len() as u64)
    );
    let manifest_d = hex(manifest.as_bytes());
    fs::write(blobs.join(&manifest_d), &manifest).unwrap();
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_d}","size":{}}}]}}"#,
        manifest.len()
    );
    fs::write(p.path(&format!("{dir}/index.json")), index).unwrap();
    fs::write(p.path(&format!("{dir}/oci-layout")), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    blobs.join(layer_d)
}

fn small_layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header("hello", tar::EntryType::Regular, 5, 0o644), &b"hello"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn base_blobs_that_are_not_regular_files_are_refused_at_once() {
    let host = tempfile::tempdir().unwrap();
    fs::write(host.path().join("target"), HOST_SECRET).unwrap();
    for kind in ["symlink", "fifo", "zero"] {
        let p = Project::new();
        let blob = write_oci_layout(&p, "lay", &small_layer(), None);
        fs::remove_file(&blob).unwrap();
        match kind {
            "symlink" => std::os::unix::fs::symlink(host.path().join("target"), &blob).unwrap(),
            "fifo" => assert!(Command::new("mkfifo").arg(&blob).status().unwrap().success()),
            _ => std::os::unix::fs::symlink("/dev/zero", &blob).unwrap(),
        }
        p.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n");
        let t = std::time::Instant::now();
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{kind}: {}", r.stderr);
        assert!(t.elapsed().as_secs() < 20, "{kind}: took {:?}", t.elapsed());
        assert!(r.stderr.contains("cannot be read"), "{kind}: {}", r.stderr);
        use sha2::Digest;
        let target_sha = hex::encode(sha2::Sha256::digest(HOST_SECRET.as_bytes()));
        assert!(!r.stderr.contains(&target_sha), "{kind}: the target was read: {}", r.stderr);
        let used: u64 = walkdir::WalkDir::new(&p.cache)
            .into_iter()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum();
        assert!(used < 1 << 20, "{kind}: the cache grew to {used} bytes");
    }
}

#[test]
fn a_descriptor_whose_size_is_not_its_blobs_is_refused() {
    let p = Project::new();
    let layer = small_layer();
    write_oci_layout(&p, "lay", &layer, Some(layer.len() as u64 + 7));
    p.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains(&format!("has {} bytes, but it has {}", layer.len() + 7, layer.len())),
        "{}",
        r.stderr
    );
    // With the right size the same layout builds, and umoci reads the result.
    let q = Project::new();
    write_oci_layout(&q, "lay", &layer, None);
    q.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    q.build(&[]).digest();
}

#[test]
fn oversized_documents_are_refused_not_cut_or_read_whole() {
    let p = Project::new();
    write_oci_layout(&p, "lay", &small_layer(), None);
    // An index.json past 16 MiB (padding after valid JSON would be cut silently before).
    let index = fs::read_to_string(p.path("lay/index.json")).unwrap();
    fs::write(p.path("lay/index.json"), format!("{index}{}", " ".repeat(17 << 20))).unwrap();
    p.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("larger than 16 MiB"), "{}", r.stderr);
}

/// A file entry with a PAX `SCHILY.xattr.security.capability` record.
fn pax_xattr_file(path: &str, content: &[u8], cap: &[u8]) -> Vec<u8> {
    let key = b"SCHILY.xattr.security.capability=";
    let body_len = key.len() + cap.len() + 1;
    let mut len = body_len + 1;
    while format!("{len} ").len() + body_len != len {
        len = format!("{len} ").len() + body_len;
    }
    let mut record = format!("{len} ").into_bytes();
    record.extend_from_slice(key);
    record.extend_from_slice(cap);
    record.push(b'\n');
    let mut out = Vec::new();
    let x = header("PaxHeaders/x", tar::EntryType::XHeader, record.len() as u64, 0o644);
    out.extend_from_slice(x.as_bytes());
    out.extend_from_slice(&record);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend(plain_file(path, content));
    out
}

fn plain_file(path: &str, content: &[u8]) -> Vec<u8> {
    let mut out = header(path, tar::EntryType::Regular, content.len() as u64, 0o755).as_bytes().to_vec();
    out.extend_from_slice(content);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// A ustar header owned by root, mtime 0, its checksum set.
fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_path(path).unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    h
}

#[test]
fn a_path_given_twice_never_puts_its_first_entrys_xattrs_on_a_shared_pool_file() {
    let Some(busybox) = busybox() else { return };
    if !require_root() {
        return;
    }
    let bb = fs::read(busybox).unwrap();
    let cap = [1u8, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]; // CAP_NET_BIND_SERVICE
    let mut layer = pax_xattr_file("bin/busybox", b"x", &cap);
    layer.extend(plain_file("bin/busybox", &bb));
    layer.extend([0u8; 1024]);
    let p = Project::new();
    write_oci_layout(&p, "lay", &layer, None);
    p.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n[[step]]\nrun = [\"/bin/busybox\", \"true\"]\n");
    p.build(&[]).digest();
    let pool: Vec<String> = fs::read_dir(p.cache.join("v1/files"))
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .collect();
    assert!(!pool.is_empty());
    let out = Command::new("python3")
        .arg("-c")
        .arg("import os, sys\nfor f in sys.argv[1:]:\n    if 'security.capability' in os.listxattr(f): print(f)")
        .args(&pool)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "a pool file got the first entry's capability");
}

#[test]
fn an_image_whose_passwd_is_a_fifo_is_refused_not_waited_on() {
    let Some(busybox) = busybox() else { return };
    if !require_root() {
        return;
    }
    let mut layer = plain_file("bin/busybox", &fs::read(busybox).unwrap());
    let fifo = header("etc/passwd", tar::EntryType::Fifo, 0, 0o644);
    layer.extend_from_slice(fifo.as_bytes());
    layer.extend([0u8; 1024]);
    let p = Project::new();
    write_oci_layout(&p, "lay", &layer, None);
    p.recipe("[image]\nname = \"x\"\nbase = \"oci:lay\"\n[[step]]\nrun = [\"/bin/busybox\", \"true\"]\n");
    let t = std::time::Instant::now();
    let r = p.build(&[]);
    assert!(t.elapsed().as_secs() < 30, "kiln waited on the fifo");
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("/etc/passwd is not a regular file"), "{}", r.stderr);
}

#[test]
fn a_gigantic_output_line_is_cut_and_kilns_memory_stays_small() {
    let Some(p) = project(
        "[image]\nname = \"o\"\nbase = \"stage:base\"\n[[step]]\nrun = \"head -c 200000000 /dev/zero | tr '\\\\0' a; echo; echo done\"\n",
    ) else {
        return;
    };
    let r = p.kiln_with(&["build", "kiln.toml", "--progress", "json", "-o", "oci:out"], |_| {});
    r.digest();
    let lines: Vec<serde_json::Value> = r.events().into_iter().filter(|e| e["event"] == "output").collect();
    let long = lines.iter().map(|e| e["line"].as_str().unwrap().len()).max().unwrap();
    assert!(long < 100_000, "a line of {long} bytes was shown");
    assert!(lines.iter().any(|e| e["line"] == "done"));
    assert!(r.stderr.len() < 1 << 20, "stderr is {} bytes", r.stderr.len());
}

/// An OCI layout at `dir` of `layers` (uncompressed tars), bottom first.
fn layout_of_layers(p: &Project, dir: &str, layers: &[Vec<u8>]) {
    use sha2::Digest;
    let hex = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let blobs = p.path(&format!("{dir}/blobs/sha256"));
    fs::create_dir_all(&blobs).unwrap();
    let mut diff_ids = Vec::new();
    let mut descs = Vec::new();
    for l in layers {
        fs::write(blobs.join(hex(l)), l).unwrap();
        diff_ids.push(format!("\"sha256:{}\"", hex(l)));
        descs.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:{}","size":{}}}"#,
            hex(l),
            l.len()
        ));
    }
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[{}]}},"config":{{}}}}"#,
        diff_ids.join(",")
    );
    fs::write(blobs.join(hex(config.as_bytes())), &config).unwrap();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[{}]}}"#,
        hex(config.as_bytes()),
        config.len(),
        descs.join(",")
    );
    fs::write(blobs.join(hex(manifest.as_bytes())), &manifest).unwrap();
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","size":{}}}]}}"#,
        hex(manifest.as_bytes()),
        manifest.len()
    );
    fs::write(p.path(&format!("{dir}/index.json")), index).unwrap();
    fs::write(p.path(&format!("{dir}/oci-layout")), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// A tar of (path, content) regular files and (path, target) hard links.
fn tar_with(files: &[(&str, &[u8])], links: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, content) in files {
        b.append(&header(path, tar::EntryType::Regular, content.len() as u64, 0o644), *content).unwrap();
    }
    for (path, target) in links {
        let mut h = header(path, tar::EntryType::Link, 0, 0o644);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
    }
    b.into_inner().unwrap()
}

/// The bytes of `path` in the top layer of the OCI layout at `dir`.
fn top_layer_file(dir: &std::path::Path, path: &str) -> Option<Vec<u8>> {
    use std::io::Read;
    let blob = |d: &str| fs::read(dir.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let top = blob(m["layers"].as_array().unwrap().last().unwrap()["digest"].as_str().unwrap());
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&top[..]));
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some(path) {
            let mut v = Vec::new();
            e.read_to_end(&mut v).unwrap();
            return Some(v);
        }
    }
    None
}

/// A hard link keeps the bytes its target had in the link's own layer, as
/// extracting the layers in order gives, even when a later layer replaces
/// the target's path with another file.
#[test]
fn copy_from_a_stage_takes_a_hard_links_bytes_from_its_own_layer() {
    let p = Project::new();
    let l1 = tar_with(&[("x", b"x-new")], &[("h", "x")]);
    let l2 = tar_with(&[("x", b"x-newer")], &[]);
    layout_of_layers(&p, "two", &[l1, l2]);
    p.recipe(
        "[[stage]]\nname = \"s\"\nbase = \"oci:two\"\n\n[image]\nname = \"y\"\n\n[[step]]\ncopy = \"/h\"\nfrom = \"s\"\nto = \"/h\"\n\n[[step]]\ncopy = \"/x\"\nfrom = \"s\"\nto = \"/x\"\n",
    );
    let r = p.build(&["-o", "oci:out"]);
    r.digest();
    // Each `copy` is its own layer: the top one holds /x, the one below /h.
    assert_eq!(top_layer_file(&p.path("out"), "x").as_deref(), Some(&b"x-newer"[..]));
    p.recipe(
        "[[stage]]\nname = \"s\"\nbase = \"oci:two\"\n\n[image]\nname = \"y\"\n\n[[step]]\ncopy = \"/h\"\nfrom = \"s\"\nto = \"/h\"\n",
    );
    p.build(&["-o", "oci:out2"]).digest();
    assert_eq!(top_layer_file(&p.path("out2"), "h").as_deref(), Some(&b"x-new"[..]));
}

/// Names in a layer are the layer author's: `kiln diff` shows their control
/// characters escaped, so a name cannot forge a line or drive the terminal.
#[test]
fn diff_shows_control_characters_in_names_escaped() {
    let p = Project::new();
    let evil = "evil\u{1b}]0;PWNED\u{7}\n+ /etc/shadow-added";
    layout_of_layers(&p, "base", &[tar_with(&[("a", b"a")], &[])]);
    layout_of_layers(&p, "evil", &[tar_with(&[("a", b"a"), (evil, b"e")], &[])]);
    let r = p.kiln(&["diff", "oci:base", "oci:evil"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(!r.stdout.contains('\u{1b}') && !r.stdout.contains('\u{7}'), "{:?}", r.stdout);
    assert_eq!(r.stdout.lines().count(), 1, "one change, one line: {:?}", r.stdout);
    assert!(r.stdout.starts_with("+ /evil\\u{1b}]0;PWNED"), "{:?}", r.stdout);
}

/// The cache's listings are derived data: one of another layer, one whose
/// frame claims a terabyte, or a sparse file of a terabyte is never used;
/// the listing is made again from the layer and the image is the same.
#[test]
fn a_wrong_or_oversized_stored_listing_is_made_again_from_its_layer() {
    let p = Project::new();
    layout_of_layers(&p, "base", &[tar_with(&[("etc/a", b"a")], &[]), tar_with(&[("etc/b", b"b")], &[])]);
    p.recipe(
        "[image]\nname = \"z\"\nbase = \"oci:base\"\n\n[[step]]\nwrite = \"/etc/new\"\ncontent = \"n\"\n",
    );
    let first = p.build(&[]).digest();
    let listings = p.cache.join("v1/listings");
    let mut files: Vec<_> = fs::read_dir(&listings).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 3);
    // Every listing swapped for the next one's.
    let bytes: Vec<Vec<u8>> = files.iter().map(|f| fs::read(f).unwrap()).collect();
    for (i, f) in files.iter().enumerate() {
        fs::write(f, &bytes[(i + 1) % bytes.len()]).unwrap();
    }
    assert_eq!(p.build(&["--no-cache"]).digest(), first);
    // A frame claiming more entries and index than any file could hold, in a
    // sparse file of a terabyte.
    for f in &files {
        let mut good = fs::read(f).unwrap();
        let n = good.len();
        good[n - 28..n - 20].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let out = fs::File::create(f).unwrap();
        out.set_len(1 << 40).unwrap();
        use std::os::unix::fs::FileExt;
        out.write_all_at(&good[..40], 0).unwrap();
        out.write_all_at(&good[n - 28..], (1 << 40) - 28).unwrap();
    }
    let r = p.build(&["--no-cache"]);
    assert_eq!(r.digest(), first);
}

/// A docker-archive whose `index.json` and `manifest.json` name different
/// images would be one image to kiln and another to `docker load`: refused.
#[test]
fn a_docker_archive_whose_index_and_manifest_json_disagree_is_refused() {
    let p = Project::new();
    p.recipe("[image]\nname = \"a\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    p.build(&["-o", "docker-archive:a.tar"]).digest();
    p.recipe("[image]\nname = \"b\"\n[[step]]\nwrite = \"/b\"\ncontent = \"b\"\n");
    p.build(&["-o", "docker-archive:b.tar"]).digest();
    // a's index.json and blobs, b's manifest.json and blobs.
    let mut out = tar::Builder::new(fs::File::create(p.path("mixed.tar")).unwrap());
    let mut seen = std::collections::HashSet::new();
    for (file, keep) in [("a.tar", "index.json"), ("b.tar", "manifest.json")] {
        let mut ar = tar::Archive::new(fs::File::open(p.path(file)).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let wanted = path == keep || path.starts_with("blobs/") || path == "oci-layout";
            if wanted && seen.insert(path.clone()) {
                let mut h = e.header().clone();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                out.append_data(&mut h, &path, data.as_slice()).unwrap();
            }
        }
    }
    out.finish().unwrap();
    drop(out);
    p.recipe("[image]\nname = \"c\"\nbase = \"docker-archive:mixed.tar\"\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("describe different images"), "{}", r.stderr);
    // A second `manifest.json` under another spelling, or as a link: refused.
    for (name, link) in
        [("x/../manifest.json", None), ("./manifest.json", None), ("manifest.json", Some("evil.json"))]
    {
        fs::copy(p.path("a.tar"), p.path("twice.tar")).unwrap();
        let bytes = fs::read(p.path("twice.tar")).unwrap();
        // Cut the two zero blocks that end the archive, then append.
        let mut end = bytes.len();
        while end >= 512 && bytes[end - 512..end].iter().all(|b| *b == 0) {
            end -= 512;
        }
        let mut f = fs::OpenOptions::new().write(true).open(p.path("twice.tar")).unwrap();
        f.set_len(end as u64).unwrap();
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).unwrap();
        let mut out = tar::Builder::new(f);
        let mut h = tar::Header::new_gnu();
        match link {
            None => {
                // Named byte for byte (tar-rs refuses `..` in names it sets).
                h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
                h.set_size(2);
                h.set_mode(0o644);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_cksum();
                out.append(&h, b"[]".as_slice()).unwrap();
            }
            Some(target) => {
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Symlink);
                out.append_link(&mut h, name, target).unwrap();
            }
        }
        out.finish().unwrap();
        p.recipe("[image]\nname = \"c\"\nbase = \"docker-archive:twice.tar\"\n");
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        assert!(r.stderr.contains("holds the member `manifest.json` twice"), "{name}: {}", r.stderr);
    }
    // Each archive alone is fine.
    p.recipe("[image]\nname = \"c\"\nbase = \"docker-archive:a.tar\"\n");
    p.build(&["-o", "oci:from-a"]).digest();
}

/// A recipe is shown in its errors: one that is a link (to the process's
/// environment, to a runner's file) is not read, so nothing leaks into a log.
#[test]
fn a_recipe_behind_a_symlink_is_not_read_and_nothing_of_its_target_is_shown() {
    let p = Project::new();
    std::os::unix::fs::symlink("/proc/self/environ", p.path("env.toml")).unwrap();
    fs::create_dir_all(p.path("real")).unwrap();
    fs::write(p.path("real/kiln.toml"), "KILN_TEST_SECRET = \"s3cret\"\n").unwrap();
    std::os::unix::fs::symlink("real", p.path("linked")).unwrap();
    for recipe in ["env.toml", "linked/kiln.toml"] {
        let r = p.kiln_with(&["plan", recipe], |c| {
            c.env("KILN_TEST_SECRET", "s3cret");
        });
        assert_eq!(r.code, 2, "{recipe}: {}", r.stderr);
        assert!(r.stderr.contains("through a symlink"), "{recipe}: {}", r.stderr);
        assert!(!r.stderr.contains("s3cret"), "{recipe}: {}", r.stderr);
    }
    let environ = format!("/proc/{}/environ", std::process::id());
    let r = p.kiln(&["plan", &environ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("a file of the kernel's"), "{}", r.stderr);
}
