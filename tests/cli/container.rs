//! The container backend (`--backend container`, issue 17), on the host as
//! root: the layers the local backend gives, for every kind of change; what
//! a step can and cannot do; nothing left behind (processes, secrets); a
//! hostile base cannot make kiln write outside the step's root. Inside a
//! default-profile container it is tested in image.rs.

use std::fs;

use crate::run::{project, unpack};
use crate::support::*;

/// Every kind of change an overlay upper folder records: new, changed and
/// deleted files, folders deleted and made again (opaque), a file made a
/// folder and a folder made a file, renames, hard links to files of the
/// layer below, symlinks replaced, modes, owners and times changed, fifos,
/// and writes to what the engine owns (/etc/hosts, /dev) that are no change.
const EDGE: &str = r#"
[[stage]]
name = "prepared"
base = "stage:base"

[[stage.step]]
run = """
mkdir -p /a/b/c /d /e /keep/sub /gone/deep
echo one > /a/b/c/f1; echo two > /a/f2; echo x > /d/x; echo y > /e/y; echo file > /was-file
echo k > /keep/sub/k; echo g > /gone/deep/g
ln /a/f2 /a/f2link; ln -s /a/f2 /a/sym
mkfifo /a/fifo; ln /a/fifo /a/fifolink; chmod 4755 /a/f2; chown 1:2 /d/x
mkdir -m 1777 /w
"""

[image]
name = "edge"
base = "stage:prepared"

[[step]]
run = """
rm -rf /gone /a/b/c/f1
rm -rf /d && mkdir /d && echo new > /d/new
rm /e/y && rmdir /e && echo file > /e
rm /was-file && mkdir /was-file
chmod 700 /keep/sub
mv /a/f2link /a/moved
touch -d @5 /keep/sub/k
echo appended >> /a/f2
ln -sf /nowhere /a/sym
mkdir /keep/sub/n; : > /keep/sub/n/empty
echo 10.0.0.1 junk >> /etc/hosts; echo nope > /dev/null
"""

[[step]]
run = "touch /w/by-user && id -u > /w/uid && pwd > /w/pwd && echo $GREETING > /w/env"
user = "app"
workdir = "/home/app"
env = { GREETING = "hi" }

[config]
entrypoint = ["/bin/sh"]
"#;

/// The local and the container backend give the same layers, for the
/// changes above and for the run.rs set; `verify` passes on the container one.
#[test]
fn the_container_backend_gives_the_local_backends_layers() {
    let Some(p) = project(EDGE) else { return };
    let local = p.build(&["--backend", "local", "-o", "oci:local"]).digest();
    let container = p.kiln(&[
        "build",
        "kiln.toml",
        "--backend",
        "container",
        "--cache-dir",
        "cache-container",
        "-o",
        "oci:container",
    ]);
    assert_eq!(container.digest(), local, "the backends disagree:\n{}", container.stderr);
    let root = unpack(&p, "container");
    assert_eq!(fs::read_to_string(root.join("a/f2")).unwrap(), "two\nappended\n");
    assert_eq!(
        fs::read_to_string(root.join("a/moved")).unwrap(),
        "two\n",
        "a hard link is its own file once changed"
    );
    assert!(!root.join("gone").exists() && !root.join("a/b/c/f1").exists());
    assert!(root.join("was-file").is_dir() && root.join("e").is_file());
    assert_eq!(fs::read_to_string(root.join("w/env")).unwrap(), "hi\n");
    assert_eq!(fs::read_to_string(root.join("w/uid")).unwrap(), "1000\n");
    assert_eq!(fs::read_to_string(root.join("w/pwd")).unwrap(), "/home/app\n");
    assert!(!fs::read_to_string(root.join("etc/hosts")).unwrap_or_default().contains("junk"));
    let v = p.kiln(&["verify", "kiln.toml", "--backend", "container"]);
    assert_eq!(v.code, 0, "verify: {}{}", v.stdout, v.stderr);
    assert!(v.stdout.contains(&local), "{}", v.stdout);
}

/// A cache mount is the store's folder, moved into the step's root while
/// it runs and back after, never in a layer; it keeps what steps leave.
#[test]
fn cache_mounts_persist_and_stay_out_of_the_layers() {
    let Some(p) = project(
        r#"
[image]
name = "cached"
base = "stage:base"

[[step]]
run = "ls /root/.cache/tool > /seen-first; echo kept > /root/.cache/tool/file-$RUN"
cache = [{ target = "/root/.cache/tool" }]
env = { RUN = "1" }

[[step]]
run = "ls /root/.cache/tool > /seen-second"
cache = [{ target = "/root/.cache/tool" }]
"#,
    ) else {
        return;
    };
    let local = p.build(&["--backend", "local", "-o", "oci:local"]).digest();
    let args = ["build", "kiln.toml", "--backend", "container", "--cache-dir", "cache-container"];
    let container = p.kiln(&[&args[..], &["-o", "oci:container"]].concat());
    assert_eq!(container.digest(), local, "{}", container.stderr);
    let root = unpack(&p, "container");
    assert_eq!(fs::read_to_string(root.join("seen-first")).unwrap(), "");
    assert_eq!(fs::read_to_string(root.join("seen-second")).unwrap(), "file-1\n");
    assert!(!root.join("root/.cache/tool/file-1").exists(), "the cache is in no layer");
    // Back in the store for the next build.
    let du = p.kiln(&["cache", "du", "--json", "--cache-dir", "cache-container"]);
    let du: serde_json::Value = serde_json::from_str(&du.stdout).unwrap();
    assert_eq!(du["mounts"], 1, "{du}");
    assert!(du["mount_bytes"].as_u64().unwrap() >= 5, "{du}");
}

/// What a step cannot do on the container backend: change root, make
/// device nodes, open IP sockets with the network off, see the host's files.
#[test]
fn a_container_step_cannot_leave_its_root_or_reach_the_network() {
    let Some(p) = project(
        r#"
[image]
name = "confined"
base = "stage:base"

[[step]]
run = """
mkdir /probe
if chroot / true 2>/dev/null; then echo yes; else echo no; fi > /probe/chroot
if mknod /probe/node c 1 3 2>/dev/null; then echo yes; else echo no; fi > /probe/mknod
if test -e "$HOST_PATH"; then echo yes; else echo no; fi > /probe/host
if test -e /proc/1; then echo yes; else echo no; fi > /probe/proc
nc 127.0.0.1 9 < /dev/null > /probe/net 2>&1 || true
"""
env = { HOST_PATH = "HOST" }

[[step]]
run = "nc 127.0.0.1 9 < /dev/null > /probe/net-on 2>&1 || true"
network = true
"#,
    ) else {
        return;
    };
    let text = fs::read_to_string(p.path("kiln.toml")).unwrap();
    p.recipe(
        &text.replace("HOST_PATH = \"HOST\"", &format!("HOST_PATH = \"{}\"", p.path("kiln.toml").display())),
    );
    p.build(&["--backend", "container"]).digest();
    let root = unpack(&p, "out");
    let read = |f: &str| fs::read_to_string(root.join("probe").join(f)).unwrap();
    assert_eq!(read("chroot"), "no\n", "CAP_SYS_CHROOT is dropped");
    assert_eq!(read("mknod"), "no\n", "CAP_MKNOD is dropped");
    assert_eq!(read("host"), "no\n", "the host's files are outside the root");
    assert_eq!(read("proc"), "no\n", "no /proc of the container");
    assert!(read("net").contains("not permitted"), "IP sockets are refused: {}", read("net"));
    assert!(!read("net-on").contains("not permitted"), "network = true: {}", read("net-on"));

    // A command that needs /proc fails, and the hint says why.
    let text = fs::read_to_string(p.path("kiln.toml")).unwrap();
    p.recipe(&format!("{text}\n[[step]]\nrun = \"cat /proc/cpuinfo\"\n"));
    let r = p.kiln(&["build", "kiln.toml", "--backend", "container"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("no /proc and no /sys"), "{}", r.stderr);
}

/// Processes a step leaves running are killed when it ends; a secret is
/// in no blob and in no file left in the cache folder.
#[test]
fn container_steps_leave_no_process_and_no_secret_behind() {
    let Some(p) = project(
        r#"
[image]
name = "leftovers"
base = "stage:base"

[[step]]
run = "setsid sleep 61.75 < /dev/null > /dev/null 2>&1 & test -s /run/secrets/tok"
secrets = ["tok"]
"#,
    ) else {
        return;
    };
    p.file("tok.txt", "container-S3CRET-93");
    p.build(&["--backend", "container", "--secret", "id=tok,src=tok.txt"]).digest();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sleeping = fs::read_dir("/proc").unwrap().flatten().any(|e| {
        fs::read(e.path().join("cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"61.75"))
    });
    assert!(!sleeping, "a process the step started outlived it");
    let needle = b"container-S3CRET-93";
    for e in walkdir::WalkDir::new(&p.cache).into_iter().chain(walkdir::WalkDir::new(p.path("out"))).flatten()
    {
        if e.file_type().is_file() {
            let bytes = fs::read(e.path()).unwrap();
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the secret is in {:?}", e.path());
        }
    }
}

/// A base whose /etc and /run are symlinks to a folder of the host: the
/// per-run files and the secrets go into the step's root, never there.
#[test]
fn a_hostile_base_cannot_make_the_container_backend_write_outside_the_root() {
    let victim = tempfile::tempdir().unwrap();
    let Some(p) = project(&format!(
        r#"
[[stage]]
name = "hostile"
base = "stage:base"

[[stage.step]]
run = "rm -rf /run /etc && ln -s {v} /etc && ln -s {v} /run"

[image]
name = "hostile"
base = "stage:hostile"

[[step]]
run = "test -s /run/secrets/tok && echo ok > /probe"
secrets = ["tok"]
"#,
        v = victim.path().display()
    )) else {
        return;
    };
    p.file("tok.txt", "hostile-base-secret");
    let r = p.build(&["--backend", "container", "--secret", "id=tok,src=tok.txt"]);
    let names: Vec<_> = fs::read_dir(victim.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(names.is_empty(), "kiln wrote into the host's folder: {names:?}\n{}", r.stderr);
    // The steps ran in their root (/etc and /run folders of the step's own).
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `auto` on a host that allows namespaces keeps the local backend;
/// `--backend container` needs root.
#[test]
fn auto_keeps_the_local_backend_on_a_host_and_the_container_backend_needs_root() {
    let Some(p) = project("[image]\nname = \"auto\"\nbase = \"stage:base\"\n[[step]]\nrun = \"true\"\n")
    else {
        return;
    };
    let r = p.kiln_with(&["build", "kiln.toml", "--progress", "plain", "-o", "oci:out"], |c| {
        c.env("KILN_LOG", "info");
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("backend=local"), "{}", r.stderr);
    if let Some(user) = rootless_user() {
        let r = p.kiln_as(user, "rootless-cache", &["build", "kiln.toml", "--backend", "container"], |_| {});
        assert_eq!(r.code, 3, "{}", r.stderr);
        assert!(r.stderr.contains("container backend cannot run here"), "{}", r.stderr);
    }
}

/// A root step cannot signal the helper that watches it (it is another
/// user, and the step has no CAP_KILL), so what the step starts in the
/// background dies with it, before a cache mount leaves the root: a
/// process whose working folder is in the cache never ends up outside.
#[test]
fn a_step_cannot_stop_its_helper_or_outlive_it_through_a_cache_mount() {
    let marker = format!("kiln-test-escaped-{}", std::process::id());
    let Some(p) = project(&format!(
        r#"
[image]
name = "escape"
base = "stage:base"

[[step]]
cache = [{{ target = "/c" }}]
run = """
cd /c
setsid sh -c 'while true; do cd -P ../../../../../../../../..; echo out > {marker} 2>/dev/null; sleep 0.05; done' < /dev/null > /dev/null 2>&1 &
if kill -STOP $PPID 2>/dev/null; then echo stopped; else echo refused; fi > /probe-stop
if kill -9 $PPID 2>/dev/null; then echo killed; else echo refused; fi > /probe-kill
"""
timeout = "20s"
"#
    )) else {
        return;
    };
    let r = p.build(&["--backend", "container"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let escaped = std::path::Path::new("/").join(&marker);
    let outside = escaped.exists();
    let _ = fs::remove_file(&escaped);
    assert!(!outside, "a process of the step got out of its root");
    r.digest();
    let root = unpack(&p, "out");
    assert_eq!(fs::read_to_string(root.join("probe-stop")).unwrap(), "refused\n");
    assert_eq!(fs::read_to_string(root.join("probe-kill")).unwrap(), "refused\n");
}

/// A command that prints what the helper prints when it fails, and exits
/// as it does (125), is a failed step (exit 1), not a broken backend.
#[test]
fn a_command_posing_as_the_container_helper_is_a_failed_step() {
    let Some(p) = project(
        "[image]\nname = \"x\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"echo 'kiln sandbox: cannot change root'; exit 125\"\n",
    ) else {
        return;
    };
    let r = p.kiln(&["build", "kiln.toml", "--backend", "container"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("code 125") && !r.stderr.contains("could not run the step"), "{}", r.stderr);
}

/// The step root a killed kiln left (its secrets with it) is removed by the
/// next step; one another kiln is using (its lock held) is not.
#[test]
fn a_step_root_left_by_a_killed_kiln_is_swept() {
    let Some(p) = project("[image]\nname = \"x\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"true\"\n")
    else {
        return;
    };
    // A root whose lock nobody holds (its kiln died), and one whose lock is held (alive).
    let left = p.cache.join("v1/tmp/chroot-7-abc/root/run/secrets");
    fs::create_dir_all(&left).unwrap();
    fs::write(left.join("tok"), "left-behind").unwrap();
    fs::write(p.cache.join("v1/tmp/chroot-7-abc/alive"), "").unwrap();
    let live = p.cache.join("v1/tmp/chroot-8-def");
    fs::create_dir_all(&live).unwrap();
    let held = fs::File::create(live.join("alive")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&held), libc::LOCK_EX) }, 0);
    p.build(&["--backend", "container"]).digest();
    assert!(!p.cache.join("v1/tmp/chroot-7-abc").exists(), "the dead root is swept");
    assert!(live.exists(), "a root whose lock is held is another kiln's, in use");
    drop(held);
}

/// Only stdin, stdout and stderr reach a command: a descriptor kiln
/// inherited (here a folder of the host) does not.
#[test]
fn descriptors_kiln_inherits_do_not_reach_the_command() {
    use std::os::fd::AsRawFd;
    let Some(p) = project(
        "[image]\nname = \"x\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"ls /proc/self/fd > /fds\"\n",
    ) else {
        return;
    };
    let dir = fs::File::open(p.path("")).unwrap();
    let fd = dir.as_raw_fd();
    // SAFETY: clears close-on-exec on a descriptor this test owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
    let r = p.build(&["--backend", "local"]);
    drop(dir);
    r.digest();
    let root = unpack(&p, "out");
    let fds = fs::read_to_string(root.join("fds")).unwrap();
    assert_eq!(fds.split_whitespace().collect::<Vec<_>>(), ["0", "1", "2", "3"], "3 is ls's own: {fds}");
}

/// A step cannot become the helper's user (by `user`, by setuid, or by a
/// setuid file), which would let it signal the helper.
#[test]
fn a_step_cannot_become_the_helpers_user() {
    let Some(p) = project(
        r#"
[image]
name = "helper-uid"
base = "stage:base"

[[step]]
run = """
mkdir /h && cp /bin/busybox /h/id && chown 2147483646 /h/id && chmod 4755 /h/id
/h/id -u > /probe-setuid-file
"""
"#,
    ) else {
        return;
    };
    p.build(&["--backend", "container"]).digest();
    let root = unpack(&p, "out");
    assert_eq!(
        fs::read_to_string(root.join("probe-setuid-file")).unwrap(),
        "0\n",
        "no_new_privs: the setuid bit does nothing"
    );
    // By `user`: refused with the reason.
    let text = fs::read_to_string(p.path("kiln.toml")).unwrap();
    p.recipe(&format!("{text}\n[[step]]\nrun = \"true\"\nuser = \"2147483646\"\n"));
    let r = p.kiln(&["build", "kiln.toml", "--backend", "container"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("the container backend's helper runs as"), "{}", r.stderr);
}
