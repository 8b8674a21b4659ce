//! Cache mounts of `run` steps (`cache = [...]`): kept across builds, never in
//! a layer or a key, taken in turn when `locked`, counted and pruned by
//! `kiln cache`, empty in `kiln verify`'s first build.

use std::fs;

use crate::run::project;
use crate::support::*;

const PIP: &str = r#"
[image]
name = "pip"
base = "stage:base"

[[step]]
copy = "requirements.txt"
to = "/requirements.txt"

[[step]]
run = "ls /root/.cache/pip > /seen; cat /requirements.txt >> /root/.cache/pip/wheels; cp /root/.cache/pip/wheels /installed"
cache = [{ target = "/root/.cache/pip" }]
"#;

fn mount_files(p: &Project, cache: &str) -> Vec<std::path::PathBuf> {
    let dir = p.path(cache).join("v1/mounts");
    walkdir::WalkDir::new(dir).into_iter().filter_map(Result::ok).map(|e| e.path().to_path_buf()).collect()
}

#[test]
fn a_cache_mount_keeps_its_files_across_builds_and_out_of_every_layer() {
    let Some(p) = project(PIP) else { return };
    p.file("requirements.txt", "flask\n");
    p.build(&["-o", "oci:first"]).digest();
    let files = image_files(&p.path("first"));
    assert_eq!(files["seen"].1, b"", "the first build finds the cache empty");
    assert_eq!(files["installed"].1, b"flask\n");
    for path in files.keys() {
        assert!(!path.starts_with("root/.cache"), "the mount is in no layer: {path}");
    }

    // A change re-runs the step: it finds what the first run left.
    p.file("requirements.txt", "requests\n");
    let second = p.build(&["-o", "oci:second"]);
    second.digest();
    assert_eq!(second.cached()[4..], [false, false], "{}", second.stderr);
    let files = image_files(&p.path("second"));
    assert_eq!(files["seen"].1, b"wheels\n");
    assert_eq!(files["installed"].1, b"flask\nrequests\n");
    assert!(!files.keys().any(|k| k.starts_with("root/.cache")), "{:?}", files.keys());

    // Counted and pruned by `kiln cache`.
    let du: serde_json::Value = serde_json::from_str(&p.kiln(&["cache", "du", "--json"]).stdout).unwrap();
    assert_eq!(du["mounts"], 1);
    assert!(du["mount_bytes"].as_u64().unwrap() >= 15, "{du}");
    let ls = p.kiln(&["cache", "ls"]);
    let line = ls.stdout.lines().find(|l| l.contains("/root/.cache/pip")).unwrap_or_default();
    assert!(line.contains("mount") && line.ends_with(" in 1 files"), "{}", ls.stdout);
    let pruned = p.kiln(&["cache", "prune", "--max-size", "0"]);
    assert!(pruned.stdout.contains("1 cache mounts"), "{}", pruned.stdout);
    let du: serde_json::Value = serde_json::from_str(&p.kiln(&["cache", "du", "--json"]).stdout).unwrap();
    assert_eq!(du["mounts"], 0);
}

#[test]
fn a_mount_is_the_steps_users_and_the_backends_agree() {
    let recipe = r#"
[image]
name = "owned"
base = "stage:base"

[[step]]
run = "mkdir -m 0777 /out"

[[step]]
run = "id -u > /out/uid; stat -c %u:%g:%a /home/app/.cache > /out/owner; touch /home/app/.cache/made-by-app"
user = "app"
cache = [{ id = "app-cache", target = "/home/app/.cache" }]
"#;
    let Some(p) = project(recipe) else { return };
    let local = p.build(&["-o", "oci:local"]).digest();
    let files = image_files(&p.path("local"));
    assert_eq!(files["out/uid"].1, b"1000\n");
    assert_eq!(files["out/owner"].1, b"1000:1000:755\n", "a new cache mount belongs to the step's user");
    assert!(!files.keys().any(|k| k.starts_with("home")), "no mount point in the layer: {:?}", files.keys());
    // Rootless: the new folder is given to the step's user inside the user namespace.
    if let Some(user) = rootless_user() {
        let r = p.kiln_as(
            user,
            "rootless-cache",
            &["build", "kiln.toml", "--backend", "local", "-o", "oci:rootless"],
            |_| {},
        );
        assert_eq!(r.digest(), local, "rootless and root builds differ:\n{}", r.stderr);
    }
    // The container backend: the store's folder moved into the step's root, given to the user.
    let args = [
        "build",
        "kiln.toml",
        "--backend",
        "container",
        "--cache-dir",
        "cache-container",
        "-o",
        "oci:container",
    ];
    let c = p.kiln(&args);
    assert_eq!(c.digest(), local, "the container backend differs:\n{}", c.stderr);
    if !require_docker() {
        return;
    }
    let docker = crate::run::build_on_docker(&p, "oci:docker");
    assert_eq!(docker.digest(), local, "the backends disagree:\n{}", docker.stderr);
}

#[test]
fn steps_sharing_a_locked_mount_take_turns() {
    let step = |mark: &str| {
        format!(
            r#"
[image]
name = "locked-{mark}"
base = "stage:base"

[[step]]
run = "echo {mark}-start >> /cache/log; echo {mark} > /cache/owner; sleep 1; test \"$(cat /cache/owner)\" = {mark}; echo {mark}-end >> /cache/log"
cache = [{{ id = "shared-log", target = "/cache", sharing = "locked" }}]
"#
        )
    };
    let Some(a) = project(&step("a")) else { return };
    let b = Project::new();
    fs::copy(a.path("busybox"), b.path("busybox")).unwrap();
    b.recipe(&format!("{}\n{}", crate::run::BASE, step("b")));
    // The base stage first, so both builds reach the step at about the same time.
    a.build(&["-o", "oci:warm"]).digest();
    let cache = a.cache.to_str().unwrap().to_string();
    let spawn = |p: &Project| {
        p.command(&["build", "kiln.toml", "--no-cache", "-o", "oci:out", "--cache-dir", &cache])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ra, rb) = (spawn(&a), spawn(&b));
    for (name, child) in [("a", ra), ("b", rb)] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let log =
        mount_files(&a, "cache").into_iter().find(|p| p.ends_with("data/log")).expect("the mount's log");
    let log = fs::read_to_string(log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    // The warm-up build wrote a-start, a-end; then each run whole, never interleaved.
    assert_eq!(lines.len(), 6, "{log}");
    for pair in lines.chunks(2) {
        let who = pair[0].trim_end_matches("-start");
        assert_eq!(pair, [format!("{who}-start"), format!("{who}-end")], "{log}");
    }
}

#[test]
fn verify_catches_an_image_that_depends_on_its_cache_mount() {
    let recipe = r#"
[image]
name = "leaky"
base = "stage:base"

[[step]]
run = "cat /cache/counter > /out 2>/dev/null; echo x >> /cache/counter"
cache = [{ target = "/cache" }]
"#;
    let Some(p) = project(recipe) else { return };
    let r = p.kiln(&["verify", "kiln.toml"]);
    assert_eq!(r.code, 1, "the second build found the first's counter:\n{}{}", r.stdout, r.stderr);
    assert!(r.stdout.contains("/out"), "{}", r.stdout);
    // Written so the image does not depend on it: reproducible.
    p.recipe(&format!(
        "{}\n{}",
        crate::run::BASE,
        recipe.replace("cat /cache/counter > /out 2>/dev/null; ", "")
    ));
    let r = p.kiln(&["verify", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
}

#[test]
fn a_mount_over_a_symlink_or_a_file_is_refused() {
    let recipe = r#"
[image]
name = "bad-mount"
base = "stage:base"

[[step]]
run = "ln -s /etc /linked && touch /file"

[[step]]
run = "true"
cache = [{ target = "/linked/x" }]
"#;
    let Some(p) = project(recipe) else { return };
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("would cover `/linked`"), "{}", r.stderr);
    p.recipe(&format!("{}\n{}", crate::run::BASE, recipe.replace("/linked/x", "/file")));
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("would cover `/file`"), "{}", r.stderr);
}

/// `--cache-mounts`: a fresh runner gets the cache mounts another pushed,
/// and only with the flag; it never replaces a mount it has.
#[test]
fn cache_mounts_travel_with_the_registry_cache_when_asked() {
    let Some(p) = project(PIP) else { return };
    let Some(reg) = crate::registry::TestRegistry::start(None) else { return };
    let cache = format!("registry:{}/kiln/mounts-cache", reg.host());
    p.file("requirements.txt", "flask\n");
    let r = p.build(&["-o", "oci:a", "--cache-to", &cache, "--cache-mounts"]);
    r.digest();
    assert!(r.stderr.contains("1 cache mount(s) of this build"), "{}", r.stderr);
    // Runner B: a fresh cache, a change that runs the step again.
    p.file("requirements.txt", "requests\n");
    let b = p.build(&["-o", "oci:b", "--cache-dir", "runner-b", "--cache-from", &cache, "--cache-mounts"]);
    b.digest();
    let files = image_files(&p.path("b"));
    assert_eq!(files["seen"].1, b"wheels\n", "runner B found runner A's cache mount");
    assert_eq!(files["installed"].1, b"flask\nrequests\n");
    // Without the flag, a fresh runner starts empty.
    let c = p.build(&["-o", "oci:c", "--cache-dir", "runner-c", "--cache-from", &cache]);
    c.digest();
    assert_eq!(image_files(&p.path("c"))["seen"].1, b"");
    // The flag without a registry cache is a usage error.
    let r = p.kiln(&["build", "kiln.toml", "--cache-mounts"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("`--cache-mounts` carries cache mounts through a registry cache"),
        "{}",
        r.stderr
    );
}

/// A mounts index may name a blob the store already holds (another image's
/// layer, say): it is read, and never removed.
#[test]
fn a_blob_the_store_holds_is_never_removed_by_a_mount_pull() {
    let Some(p) = project(PIP) else { return };
    let Some(reg) = crate::registry::TestRegistry::start(None) else { return };
    let cache = format!("registry:{}/kiln/mounts-held", reg.host());
    p.file("requirements.txt", "flask\n");
    p.build(&["-o", "oci:a", "--cache-to", &cache, "--cache-mounts"]).digest();
    // The same store, its mount folders gone, the packed mount's blob still there.
    fs::remove_dir_all(p.cache.join("v1/mounts")).unwrap();
    let blobs = || -> std::collections::BTreeSet<String> {
        fs::read_dir(p.cache.join("v1/blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let before = blobs();
    p.file("requirements.txt", "requests\n");
    let b = p.build(&["-o", "oci:b", "--cache-from", &cache, "--cache-mounts"]);
    b.digest();
    assert_eq!(image_files(&p.path("b"))["seen"].1, b"wheels\n", "the mount came back from the held blob");
    let after = blobs();
    let gone: Vec<_> = before.difference(&after).collect();
    assert!(gone.is_empty(), "blobs the store held were removed: {gone:?}");
}
