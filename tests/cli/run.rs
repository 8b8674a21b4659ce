//! `run` steps on both backends, secrets, network, multi-stage recipes.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use crate::support::*;

/// A busybox base from scratch: the binary copied in, its applets installed by a `run` step.
pub(crate) const BASE: &str = r#"
[[stage]]
name = "base"

[[stage.step]]
copy = "busybox"
to = "/bin/busybox"
mode = "0755"

[[stage.step]]
write = "/etc/passwd"
content = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"

[[stage.step]]
write = "/etc/group"
content = "root:x:0:\napp:x:1000:\n"

[[stage.step]]
run = ["/bin/busybox", "--install", "-s", "/bin"]
"#;

/// A project whose recipe is [`BASE`] followed by `rest`; `None` when the
/// local backend cannot run here (not root) outside CI.
pub(crate) fn project(rest: &str) -> Option<Project> {
    let busybox = busybox()?;
    if !require_root() {
        return None;
    }
    let p = Project::new();
    fs::copy(busybox, p.path("busybox")).unwrap();
    p.recipe(&format!("{BASE}\n{rest}"));
    Some(p)
}

/// `kiln build --backend docker -o OUT` with a cache of its own (`cache-docker`).
pub(crate) fn build_on_docker(p: &Project, out: &str) -> Run {
    let cache = p.path("cache-docker");
    p.kiln(&["build", "kiln.toml", "--backend", "docker", "-o", out, "--cache-dir", cache.to_str().unwrap()])
}

/// `umoci unpack` of an OCI layout; returns the rootfs path.
pub(crate) fn unpack(p: &Project, layout: &str) -> std::path::PathBuf {
    let dest = p.path(&format!("{layout}-unpacked"));
    let out = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:latest", p.path(layout).display())])
        .arg(&dest)
        .output()
        .unwrap();
    assert!(out.status.success(), "umoci: {}", String::from_utf8_lossy(&out.stderr));
    dest.join("rootfs")
}

fn layer_digests(p: &Project, layout: &str) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&p.kiln(&["inspect", &format!("oci:{layout}"), "--json"]).stdout).unwrap();
    v["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

fn docker_run(image: &str, script: &str) -> String {
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", image, "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "docker run: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const CHANGES: &str = r#"
[[stage]]
name = "prepared"
base = "stage:base"

[[stage.step]]
run = """
echo doomed > /etc/doomed
mkdir -p /var/cache/pkgs/sub /keep
echo a > /var/cache/pkgs/a
echo b > /var/cache/pkgs/sub/b
echo kept > /keep/file
"""

[image]
name = "changes"
base = "stage:prepared"

[[step]]
run = """
rm /etc/doomed
rm -rf /var/cache/pkgs/*
rm -rf /keep && mkdir /keep && echo new > /keep/new
echo data > /f && ln /f /hard && ln -s f /sym
cp /bin/busybox /su && chmod 4755 /su
mkdir -p /home/app && echo mine > /home/app/file && chown -R 1000:1000 /home/app
"""

[config]
entrypoint = ["/bin/sh"]
"#;

#[test]
fn local_and_docker_backends_give_identical_layers_and_verify_passes() {
    let Some(p) = project(CHANGES) else { return };
    if !require_docker() {
        return;
    }
    let local = p.build(&["--backend", "local", "-o", "oci:local"]);
    let d_local = local.digest();
    let docker = build_on_docker(&p, "oci:docker");
    assert_eq!(docker.digest(), d_local, "the backends disagree:\n{}", docker.stderr);
    assert_eq!(layer_digests(&p, "local"), layer_digests(&p, "docker"));
    for backend in ["local", "docker"] {
        let v = p.kiln(&["verify", "kiln.toml", "--backend", backend]);
        assert_eq!(v.code, 0, "verify --backend {backend}: {}{}", v.stdout, v.stderr);
        assert!(v.stdout.contains(&d_local), "{}", v.stdout);
    }
}

#[test]
fn deleted_files_and_emptied_folders_stay_deleted_in_umoci_and_docker() {
    let Some(p) = project(CHANGES) else { return };
    let docker = require_docker();
    let tag = format!("kiln-test-changes:{}", std::process::id());
    let docker_out = format!("docker:{tag}");
    let mut args = vec!["-o", "oci:out"];
    if docker {
        args.extend(["-o", &docker_out]);
    }
    p.build(&args).digest();
    let root = unpack(&p, "out");
    assert!(!root.join("etc/doomed").exists());
    assert!(root.join("var/cache/pkgs").is_dir());
    assert_eq!(fs::read_dir(root.join("var/cache/pkgs")).unwrap().count(), 0, "the folder is empty");
    // A folder deleted and made again hides what the layers below held (opaque).
    let keep: Vec<_> = fs::read_dir(root.join("keep")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(keep, vec!["new"]);
    if docker {
        let out = docker_run(
            &tag,
            "test ! -e /etc/doomed && test -z \"$(ls -A /var/cache/pkgs)\" && ls /keep && echo OK",
        );
        assert_eq!(out, "new\nOK\n");
        let _ = Command::new("docker").args(["rmi", &tag]).output();
    }
}

#[test]
fn hard_links_symlinks_setuid_and_owners_come_through() {
    let Some(p) = project(CHANGES) else { return };
    p.build(&[]).digest();
    let root = unpack(&p, "out");
    let f = fs::metadata(root.join("f")).unwrap();
    let hard = fs::metadata(root.join("hard")).unwrap();
    assert_eq!(f.ino(), hard.ino(), "a hard link stays a hard link");
    assert_eq!(f.nlink(), 2);
    assert_eq!(fs::read_link(root.join("sym")).unwrap().to_str(), Some("f"));
    assert_eq!(fs::metadata(root.join("su")).unwrap().mode() & 0o7777, 0o4755, "setuid is kept");
    let owned = fs::metadata(root.join("home/app/file")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
    let dir = fs::metadata(root.join("home/app")).unwrap();
    assert_eq!((dir.uid(), dir.gid()), (1000, 1000));
}

#[test]
fn network_is_loopback_only_unless_asked() {
    let Some(p) = project(
        r#"
[image]
name = "net"
base = "stage:base"

[[step]]
run = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /closed.txt"

[[step]]
run = "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | sort > /open.txt"
network = true

[[step]]
run = "hostname > /hostname.txt && cat /etc/hostname >> /hostname.txt && echo '10.0.0.1 junk' >> /etc/hosts"
"#,
    ) else {
        return;
    };
    let mut backends = vec!["local"];
    if require_docker() {
        backends.push("docker");
    }
    for backend in backends {
        let out = format!("oci:{backend}");
        let cache = p.path(&format!("cache-{backend}"));
        p.build(&["--backend", backend, "-o", &out, "--cache-dir", cache.to_str().unwrap()]).digest();
        let root = unpack(&p, backend);
        assert_eq!(fs::read_to_string(root.join("closed.txt")).unwrap(), "lo\n", "{backend}");
        let open = fs::read_to_string(root.join("open.txt")).unwrap();
        assert!(
            open.lines().any(|l| l != "lo"),
            "{backend}: with network = true the command sees more: {open}"
        );
    }
}

/// Every blob of the store and of the output, decompressed when gzip.
fn all_bytes(dirs: &[std::path::PathBuf]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for d in dirs {
        for e in walkdir::WalkDir::new(d).into_iter().filter_map(Result::ok) {
            if !e.file_type().is_file() {
                continue;
            }
            let bytes = fs::read(e.path()).unwrap();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                let mut plain = Vec::new();
                if flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut plain).is_ok() {
                    out.push(plain);
                }
            }
            out.push(bytes);
        }
    }
    out
}

#[test]
fn secrets_reach_the_command_but_no_blob_key_digest_or_log() {
    let Some(p) = project(
        r#"
[image]
name = "secret"
base = "stage:base"

[[step]]
run = "test \"$(cat /run/secrets/token)\" = \"$EXPECTED\" && wc -c < /run/secrets/token > /token-length && cat /run/secrets/token"
secrets = ["token"]
env = { EXPECTED = "s3cret-VALUE-4711" }
"#,
    ) else {
        return;
    };
    // The expected value sits in the recipe for the check; the secret itself comes from a file.
    p.file("token.txt", "s3cret-VALUE-4711");
    let r = p.build(&["--secret", "id=token,src=token.txt"]);
    let d = r.digest();
    assert!(!r.stderr.contains("s3cret-VALUE-4711\"") && r.stderr.contains("[secret]"), "{}", r.stderr);
    // Search every blob for the value as the file holds it: on its own line, without the quotes around it.
    let needle = b"s3cret-VALUE-4711\n";
    for bytes in all_bytes(&[p.cache.clone(), p.path("out")]) {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the secret leaked into a blob");
    }
    let root = unpack(&p, "out");
    assert_eq!(fs::read_to_string(root.join("token-length")).unwrap().trim(), "17");
    assert!(!root.join("run/secrets/token").exists());

    // Another value: the same keys and digest (the step is a HIT and does not run again).
    p.file("token.txt", "another-value-1234");
    let again = p.build(&["--secret", "id=token,src=token.txt"]);
    assert_eq!(again.digest(), d);
    assert_eq!(again.count("output"), 0);
    // In a fresh cache the command runs with the new value and the image is the same.
    let fresh = p.path("cache-fresh");
    let other = p.kiln_with(
        &["build", "kiln.toml", "--progress", "json", "-o", "oci:out2", "--secret", "id=token,env=TOKEN_VAR"],
        |c| {
            c.env("KILN_CACHE_DIR", &fresh).env("TOKEN_VAR", "s3cret-VALUE-4711");
        },
    );
    assert_eq!(other.digest(), d);

    // A step that needs a secret nobody gave: a usage error at its line.
    let missing = p.build(&[]);
    assert_eq!(missing.code, 0, "all steps are cached, so no secret is needed: {}", missing.stderr);
    let missing = p.kiln(&["build", "kiln.toml", "--no-cache"]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(missing.stderr.contains("needs the secret `token`"), "{}", missing.stderr);
}

#[test]
fn a_second_build_hits_every_run_step_and_runs_no_command() {
    let Some(p) = project(
        r#"
[image]
name = "hits"
base = "stage:base"

[[step]]
run = "echo EXECUTED-MARKER && date +%s%N > /stamp"
"#,
    ) else {
        return;
    };
    let first = p.build(&[]);
    let d = first.digest();
    let ran = |r: &Run| r.events().iter().any(|e| e["event"] == "output" && e["line"] == "EXECUTED-MARKER");
    assert!(ran(&first), "{}", first.stderr);
    let second = p.build(&[]);
    assert_eq!(second.digest(), d);
    assert!(!ran(&second), "the command ran again: {}", second.stderr);
    assert_eq!(second.count("output"), 0);
    assert_eq!(second.count("cache_hit"), second.count("step_finished"));
    assert_eq!(second.count("layer_written"), 0);
}

#[test]
fn independent_stages_build_at_the_same_time() {
    let Some(p) = project(
        r#"
[[stage]]
name = "left"
base = "stage:base"

[[stage.step]]
run = "sleep 1; echo left > /left"

[[stage]]
name = "right"
base = "stage:base"

[[stage.step]]
run = "sleep 1; echo right > /right"

[image]
name = "both"
base = "stage:base"

[[step]]
copy = "/left"
from = "left"
to = "/out/"

[[step]]
copy = "/right"
from = "right"
to = "/out/"
"#,
    ) else {
        return;
    };
    let r = p.build(&[]);
    r.digest();
    let interval = |stage: &str| {
        let ev = r.events();
        let t = |name: &str| {
            ev.iter()
                .find(|e| e["event"] == name && e["stage"] == stage)
                .unwrap_or_else(|| panic!("no {name} for {stage}: {}", r.stderr))["time"]
                .as_f64()
                .unwrap()
        };
        (t("step_started"), t("step_finished"))
    };
    let (l0, l1) = interval("left");
    let (r0, r1) = interval("right");
    assert!(l0 < r1 && r0 < l1, "the stages did not overlap: left {l0}..{l1}, right {r0}..{r1}");
    let root = unpack(&p, "out");
    assert_eq!(fs::read_to_string(root.join("out/left")).unwrap(), "left\n");
    assert_eq!(fs::read_to_string(root.join("out/right")).unwrap(), "right\n");
}

#[test]
fn a_failing_command_exits_1_with_its_line_and_output_and_earlier_steps_stay_cached() {
    let recipe = |cmd: &str| {
        format!(
            r#"
[image]
name = "fails"
base = "stage:base"

[[step]]
run = "echo first > /first"

[[step]]
run = "{cmd}"
"#
        )
    };
    let Some(p) = project(&recipe("echo about to fail; echo details >&2; exit 7")) else { return };
    let r = p.kiln(&["build", "kiln.toml", "--progress", "plain"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let line = format!("{BASE}\n{}", recipe("x")).lines().position(|l| l.starts_with("run = \"x\"")).unwrap();
    assert!(r.stderr.contains(&format!("kiln.toml:{}", line)), "names the step's line: {}", r.stderr);
    for want in ["exit 7", "code 7", "about to fail", "details"] {
        assert!(r.stderr.contains(want), "missing {want:?}: {}", r.stderr);
    }
    assert!(r.stdout.is_empty());
    // Fixed: the earlier steps are HITs, the fixed one runs.
    p.recipe(&format!("{BASE}\n{}", recipe("echo fixed > /second")));
    let fixed = p.build(&[]);
    fixed.digest();
    let hits: Vec<bool> = fixed
        .events()
        .iter()
        .filter(|e| e["event"] == "step_finished" && e["stage"].is_null())
        .map(|e| e["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(hits, vec![true, false]);
}

#[test]
fn without_root_the_local_backend_says_to_use_docker() {
    let Some(p) = project("[image]\nname = \"x\"\nbase = \"stage:base\"\n") else { return };
    if !require("setpriv") {
        return;
    }
    let cache = p.path("nobody-cache");
    fs::create_dir_all(&cache).unwrap();
    let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(p.dir.path()).status();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", kiln_bin(), "build", "kiln.toml"])
        .args(["--backend", "local", "--cache-dir"])
        .arg(&cache)
        .current_dir(p.dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("--backend docker"), "{stderr}");
}

#[test]
fn the_busybox_example_runs_in_docker() {
    let Some(busybox) = busybox() else { return };
    if !require_root() || !require_docker() {
        return;
    }
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples/busybox");
    let p = Project::new();
    assert!(Command::new("cp").arg("-a").arg(&examples).arg(p.path("ex")).status().unwrap().success());
    fs::copy(busybox, p.path("ex/busybox")).unwrap();
    let tag = format!("kiln-test-example:{}", std::process::id());
    let r = p.kiln(&["build", "ex/kiln.toml", "-o", &format!("docker:{tag}")]);
    r.digest();
    let out = Command::new("docker").args(["run", "--rm", &tag]).output().unwrap();
    let _ = Command::new("docker").args(["rmi", &tag]).output();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("hello from a run step") && stdout.contains("uid 1000 in /home/app"), "{stdout}");
}

#[test]
fn unpacked_layers_are_counted_kept_by_gc_and_pruned_first() {
    let Some(p) =
        project("[image]\nname = \"gc\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"echo x > /x\"\n")
    else {
        return;
    };
    let d = p.build(&[]).digest();
    let du = |p: &Project| -> serde_json::Value {
        serde_json::from_str(&p.kiln(&["cache", "du", "--json"]).stdout).unwrap()
    };
    assert!(du(&p)["unpacked"].as_u64().unwrap() >= 2, "{}", du(&p));
    assert_eq!(p.kiln(&["cache", "gc"]).code, 0);
    assert!(du(&p)["unpacked"].as_u64().unwrap() >= 2, "gc keeps the unpacked layers records still use");
    let blobs = du(&p)["blob_bytes"].as_u64().unwrap();
    assert_eq!(p.kiln(&["cache", "prune", "--max-size", &blobs.to_string()]).code, 0);
    let after = du(&p);
    assert_eq!(after["unpacked_bytes"], 0, "unpacked layers go first: {after}");
    assert_eq!(after["blob_bytes"].as_u64().unwrap(), blobs, "no record was evicted");
    // Everything still builds (and unpacks again when a run step misses).
    assert_eq!(p.build(&["--no-cache"]).digest(), d);
}

#[test]
fn containers_left_by_a_killed_kiln_are_removed_by_the_next_docker_build() {
    let Some(p) =
        project("[image]\nname = \"orphan\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"sleep 30\"\n")
    else {
        return;
    };
    if !require_docker() {
        return;
    }
    let labelled = || {
        let out =
            Command::new("docker").args(["ps", "-aq", "--filter", "label=io.kiln.pid"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect::<Vec<_>>()
    };
    let before = labelled();
    let mut child = p.command(&["build", "kiln.toml", "--backend", "docker"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while labelled().len() <= before.len() {
        assert!(std::time::Instant::now() < deadline, "no container started");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let orphan: Vec<String> = labelled().into_iter().filter(|c| !before.contains(c)).collect();
    assert_eq!(orphan.len(), 1, "the killed build left its container");
    // The next build on the engine removes it (its kiln is gone), whatever it builds.
    p.recipe(&format!(
        "{BASE}\n[image]\nname = \"next\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"true\"\n"
    ));
    p.build(&["--backend", "docker"]).digest();
    assert!(!labelled().contains(&orphan[0]), "the orphan is gone");
}

#[test]
fn killing_kiln_mid_step_leaves_no_mount_and_no_process() {
    // A sleep no other process runs: its argument carries this test's pid.
    let marker = format!("30.{}", std::process::id());
    let Some(p) = project(&format!(
        "[image]\nname = \"killed\"\nbase = \"stage:base\"\n\n[[step]]\nrun = [\"/bin/sleep\", \"{marker}\"]\n"
    )) else {
        return;
    };
    let running = || {
        fs::read_dir("/proc").unwrap().filter_map(Result::ok).any(|e| {
            fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| c.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
    };
    let mut child = p.command(&["build", "kiln.toml", "--backend", "local"]).spawn().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !running() {
        assert!(std::time::Instant::now() < deadline, "the command never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while running() {
        assert!(std::time::Instant::now() < deadline, "the command outlived kiln");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(p.cache.to_str().unwrap()), "a mount leaked:\n{mounts}");
    // The next build works, and gc clears what the killed one left in tmp/.
    p.recipe(&format!(
        "{BASE}\n[image]\nname = \"next\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"true\"\n"
    ));
    p.build(&[]).digest();
    assert_eq!(p.kiln(&["cache", "gc"]).code, 0);
    assert_eq!(fs::read_dir(p.cache.join("v1/tmp")).unwrap().count(), 0);
}

#[test]
fn an_engine_image_is_a_base_and_is_read_once() {
    let Some(p) =
        project("[image]\nname = \"first\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"echo one > /one\"\n")
    else {
        return;
    };
    if !require_docker() {
        return;
    }
    let tag = format!("kiln-test-base:{}", std::process::id());
    p.build(&["-o", "oci:first", "-o", &format!("docker:{tag}")]).digest();
    let on_top = |base: &str| {
        format!("[image]\nname = \"second\"\nbase = \"{base}\"\n\n[[step]]\nwrite = \"/two\"\ncontent = \"two\\n\"\n")
    };
    p.recipe(&on_top(&format!("docker:{tag}")));
    let from_engine = p.build(&["-o", "oci:from-engine"]);
    from_engine.digest();
    p.recipe(&on_top("oci:first"));
    p.build(&["-o", "oci:from-layout"]).digest();
    // Same files (the engine hands back plain-tar layers, so the blobs differ).
    let diff = p.kiln(&["diff", "oci:from-engine", "oci:from-layout"]);
    assert_eq!(diff.code, 0, "{}{}", diff.stdout, diff.stderr);
    // Again: the base is found by the engine's image ID, every step is a hit.
    p.recipe(&on_top(&format!("docker:{tag}")));
    let again = p.build(&["-o", "oci:from-engine"]);
    assert_eq!(again.digest(), from_engine.digest());
    assert_eq!(again.count("cache_hit"), again.count("step_finished"));
    let inspect = p.kiln(&["inspect", &format!("docker:{tag}")]);
    assert_eq!(inspect.code, 0, "{}", inspect.stderr);
    let _ = Command::new("docker").args(["rmi", &tag]).output();
    // A missing engine image is a recipe error at the base.
    p.recipe(&on_top("docker:kiln-test-no-such-image:1"));
    let missing = p.build(&[]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(missing.stderr.contains("has no image"), "{}", missing.stderr);
}

#[test]
fn a_command_exiting_125_is_a_failed_step_not_a_broken_sandbox() {
    let Some(p) = project("[image]\nname = \"x\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"exit 125\"\n")
    else {
        return;
    };
    let r = p.kiln(&["build", "kiln.toml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("code 125"), "{}", r.stderr);
}

#[test]
fn plan_shows_every_stage_step_with_the_keys_build_uses() {
    let Some(p) = project(
        "[[stage]]\nname = \"side\"\nbase = \"stage:base\"\n\n[[stage.step]]\nrun = \"echo side > /side\"\n\n\
         [image]\nname = \"planned\"\nbase = \"stage:base\"\n\n[[step]]\ncopy = \"/side\"\nfrom = \"side\"\nto = \"/side\"\n\n\
         [[step]]\nrun = \"echo final > /final\"\n",
    ) else {
        return;
    };
    let plan = |p: &Project| -> Vec<serde_json::Value> {
        serde_json::from_str(&p.kiln(&["plan", "kiln.toml", "--json"]).stdout).unwrap()
    };
    let before = plan(&p);
    let stages: Vec<&str> = before.iter().map(|s| s["stage"].as_str().unwrap_or("-")).collect();
    assert_eq!(stages, vec!["base", "base", "base", "base", "side", "-", "-"]);
    assert!(before.iter().all(|s| s["cached"] == false));
    let built = p.build(&[]);
    built.digest();
    let started: Vec<String> = built
        .events()
        .iter()
        .filter(|e| e["event"] == "layer_written")
        .map(|e| format!("{}:{}", e["stage"].as_str().unwrap_or("-"), e["step"]))
        .collect();
    assert_eq!(started.len(), 7, "{started:?}");
    let after = plan(&p);
    assert!(after.iter().all(|s| s["cached"] == true), "{after:?}");
    let keys = |v: &[serde_json::Value]| v.iter().map(|s| s["key"].clone()).collect::<Vec<_>>();
    assert_eq!(keys(&before), keys(&after), "the plan's keys are the ones the build stored");
}

#[test]
fn rootless_builds_give_the_layers_root_builds_give() {
    let Some(p) = project(CHANGES) else { return };
    let Some(user) = rootless_user() else { return };
    let as_root = p.build(&["-o", "oci:root-out"]).digest();
    let r = p.kiln_as(
        user,
        "rootless-cache",
        &["build", "kiln.toml", "--backend", "local", "-o", "oci:rootless-out"],
        |_| {},
    );
    let cache = p.path("rootless-cache");
    assert_eq!(r.digest(), as_root, "rootless and root builds differ:\n{}", r.stderr);
    // The files, owners and modes a rootless command made come through too.
    let root = unpack(&p, "rootless-out");
    let owned = fs::metadata(root.join("home/app/file")).unwrap();
    assert_eq!((owned.uid(), owned.gid()), (1000, 1000));
    assert_eq!(fs::metadata(root.join("su")).unwrap().mode() & 0o7777, 0o4755);
    // The user can clean up what belongs to its subordinate ids.
    let as_user = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid", user, "--regid", user, "--init-groups", kiln_bin()])
            .args(args)
            .arg("--cache-dir")
            .arg(&cache)
            .env("HOME", p.dir.path())
            .current_dir(p.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    as_user(&["cache", "prune", "--max-size", "0"]);
    let leftover: Vec<_> = walkdir::WalkDir::new(cache.join("v1"))
        .min_depth(2)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            let s = e.path().to_string_lossy();
            s.contains("unpacked-userns-")
                || s.contains("files-userns-")
                || e.path().starts_with(cache.join("v1/tmp"))
        })
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(leftover.is_empty(), "left behind: {leftover:?}");
}

/// Issue 18, bug 1: the folders kiln makes for the sandbox do not depend on
/// the caller's umask, so a non-root step builds under umask 077 as under
/// 022 (and `kiln verify`, whose second build runs under 077, passes).
#[test]
fn non_root_steps_build_alike_under_umask_022_and_077_and_verify_passes() {
    let Some(p) = project(
        r#"
[image]
name = "umask"
base = "stage:base"

[[step]]
run = "mkdir -p /home/app && chown 1000:1000 /home/app"

[[step]]
run = "id -u > who && mkdir -p d/e sub/deep && echo x > sub/deep/f"
user = "1000:1000"
workdir = "/home/app"
"#,
    ) else {
        return;
    };
    let under = |mask: &str, out: &str, cache: &str| -> Run {
        Command::new("sh")
            .arg("-c")
            .arg(format!("umask {mask} && exec \"$0\" \"$@\""))
            .arg(kiln_bin())
            .args(["build", "kiln.toml", "-o", &format!("oci:{out}"), "--cache-dir", cache])
            .current_dir(p.path(""))
            .env_remove("SOURCE_DATE_EPOCH")
            .output()
            .unwrap()
            .into()
    };
    let a = under("022", "a", p.path("cache-022").to_str().unwrap());
    let b = under("077", "b", p.path("cache-077").to_str().unwrap());
    assert_eq!(b.code, 0, "umask 077: {}", b.stderr);
    assert_eq!(a.digest(), b.digest(), "the umask changed the image");
    let root = unpack(&p, "b");
    assert_eq!(fs::read_to_string(root.join("home/app/who")).unwrap(), "1000\n");
    let v = p.kiln(&["verify", "kiln.toml"]);
    assert_eq!(v.code, 0, "verify: {}{}", v.stdout, v.stderr);
}

/// Issue 18, bug 2: a `run` step for a platform the host cannot execute is
/// refused (exit 3, saying what would be needed) instead of running
/// natively under the wrong label; `copy`/`write` recipes still build.
#[test]
fn run_steps_for_a_platform_the_host_cannot_execute_are_refused() {
    let Some(p) = project("[image]\nname = \"p\"\nbase = \"stage:base\"\n[[step]]\nrun = \"true\"\n") else {
        return;
    };
    let (other, qemu) =
        if cfg!(target_arch = "x86_64") { ("linux/arm64", "aarch64") } else { ("linux/amd64", "x86_64") };
    if std::path::Path::new(&format!("/proc/sys/fs/binfmt_misc/qemu-{qemu}")).exists() {
        eprintln!("SKIPPED: this machine runs {other} binaries through binfmt_misc");
        return;
    }
    let r = p.build(&["--platform", other]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("commands for {other}")), "{}", r.stderr);
    assert!(r.stderr.contains("qemu-user-static"), "the hint says what would be needed: {}", r.stderr);
    assert!(!p.path("out").exists());
    let q = Project::new();
    q.recipe("[image]\nname = \"c\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    q.build(&["--platform", other]).digest();
    let v: serde_json::Value =
        serde_json::from_str(&q.kiln(&["inspect", "oci:out", "--json"]).stdout).unwrap();
    assert_eq!(v["architecture"], other.split('/').nth(1).unwrap(), "{v}");
}

#[test]
fn run_steps_see_the_builds_epoch_as_source_date_epoch_unless_they_set_it() {
    let Some(p) = project(
        r#"
[image]
name = "sde"
base = "stage:base"
epoch = 1700000000

[[step]]
run = "echo \"$SOURCE_DATE_EPOCH\" > /sde"

[[step]]
run = "echo \"$SOURCE_DATE_EPOCH\" > /sde-set"
env = { SOURCE_DATE_EPOCH = "7" }
"#,
    ) else {
        return;
    };
    let r = p.build(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let root = unpack(&p, "out");
    assert_eq!(fs::read_to_string(root.join("sde")).unwrap(), "1700000000\n");
    assert_eq!(fs::read_to_string(root.join("sde-set")).unwrap(), "7\n", "the step's own value wins");
    // Only the commands get it: the image's runtime config does not.
    let v: serde_json::Value =
        serde_json::from_str(&p.kiln(&["inspect", "oci:out", "--json"]).stdout).unwrap();
    let env = v["config_json"]["Env"].as_array().unwrap();
    assert!(!env.iter().any(|e| e.as_str().unwrap().starts_with("SOURCE_DATE_EPOCH=")), "{env:?}");

    // kiln's own SOURCE_DATE_EPOCH overrides the recipe's epoch, for the steps too.
    let other = p.kiln_with(&["build", "kiln.toml", "--progress", "json", "-o", "oci:out2"], |c| {
        c.env("SOURCE_DATE_EPOCH", "5");
    });
    assert_eq!(other.code, 0, "{}", other.stderr);
    let root = unpack(&p, "out2");
    assert_eq!(fs::read_to_string(root.join("sde")).unwrap(), "5\n");
}

#[test]
fn a_missing_secret_is_reported_before_any_backend_is_reached() {
    // No engine answers here: the step's own check must come first (exit 2 at its line), not the backend's (3).
    let p = Project::new();
    p.recipe(
        r#"
[image]
name = "no-secret"
base = "scratch"

[[step]]
run = "true"
secrets = ["token"]
"#,
    );
    let r = p.kiln_with(&["build", "kiln.toml", "--backend", "docker", "-o", "oci:out"], |c| {
        c.env("DOCKER_HOST", "unix:///nonexistent/kiln-no-engine.sock");
    });
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("needs the secret `token`"), "{}", r.stderr);
    assert!(r.stderr.contains("kiln.toml:"), "the error names the recipe line: {}", r.stderr);
}

/// Whether any process runs `sleep` with this argument (a marker).
fn sleeping(marker: &str) -> bool {
    fs::read_dir("/proc").unwrap().flatten().any(|e| {
        fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == marker.as_bytes()) && c.starts_with(b"sleep"))
    })
}

#[test]
fn a_step_past_its_timeout_is_killed_with_every_process_it_started_and_not_cached() {
    let Some(p) = project(
        "[image]\nname = \"slow\"\nbase = \"stage:base\"\n\n[[step]]\nrun = \"echo starting; sleep 47.25 & sleep 47.25; echo never\"\ntimeout = \"1500ms\"\n",
    ) else {
        return;
    };
    let text = fs::read_to_string(p.path("kiln.toml")).unwrap();
    // A step is named by the line of its `[[step]]` header, the one above `run`.
    let line = text.lines().position(|l| l.starts_with("run = \"echo starting")).unwrap();
    let mut backends = vec!["local", "container"];
    if require_docker() {
        backends.push("docker");
    }
    for backend in backends {
        for round in 0..2 {
            let started = std::time::Instant::now();
            let r = p.build(&["--backend", backend]);
            assert_eq!(r.code, 1, "{backend}: {}", r.stderr);
            assert!(started.elapsed() < std::time::Duration::from_secs(30), "{backend}: not stopped in time");
            let failed = r.failure();
            assert!(
                failed.contains(&format!("kiln.toml:{}", line))
                    && failed.contains("ran past its time limit of 1500ms"),
                "{backend}: line {line}: {failed}"
            );
            // Nothing cached: the second round runs the step again.
            let printed = |l: &str| r.events().iter().any(|e| e["event"] == "output" && e["line"] == l);
            assert!(printed("starting"), "{backend} round {round}: the step did not run");
            assert!(!printed("never"), "{backend}: the command went on past its limit");
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert!(!sleeping("47.25"), "{backend}: a process of the step outlived its time limit");
        }
    }
    // Rootless too, and the step's folders (owned by subordinate ids, which
    // kiln cannot remove) are cleaned up by the helper.
    if let Some(user) = rootless_user() {
        let r = p.kiln_as(user, "rootless-cache", &["build", "kiln.toml", "--backend", "local"], |_| {});
        assert_eq!(r.code, 1, "rootless: {}", r.stderr);
        assert!(r.stderr.contains("ran past its time limit of 1500ms"), "rootless: {}", r.stderr);
        let tmp = p.path("rootless-cache/v1/tmp");
        let left: Vec<_> = fs::read_dir(&tmp)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        assert!(left.iter().all(|n| !n.starts_with("run-")), "rootless leftovers: {left:?}");
        assert!(!sleeping("47.25"), "rootless: a process of the step outlived its time limit");
    }
    // A limit from the command line, for steps that set none.
    p.recipe(&text.replace("timeout = \"1500ms\"\n", ""));
    let r = p.build(&["--step-timeout", "1s"]);
    assert!(r.stderr.contains("ran past its time limit of 1s"), "{}", r.stderr);
    let bad = p.build(&["--step-timeout", "soon"]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
    assert!(bad.stderr.contains("--step-timeout"), "{}", bad.stderr);
    // A command cannot pass its own failure off as a timeout (the helper's
    // exit code, and output that looks like kiln's).
    p.recipe(&text.replace(
        "echo starting; sleep 47.25 & sleep 47.25; echo never",
        "echo 'kiln sandbox: the command ran past its time limit'; exit 124",
    ));
    let r = p.build(&["--step-timeout", "30s"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let failed = r.failure();
    let failed = failed.lines().next().unwrap_or_default();
    assert!(failed.contains("exited with code 124") && !failed.contains("time limit of"), "{}", r.stderr);
}

/// Secrets for non-root steps: by default owned by the step's user (a
/// name from the image's /etc/passwd, or `UID:GID`), 0400; the recipe can
/// give the owner and mode, as BuildKit's `uid=`, `gid=` and `mode=`. The
/// same on the local and the docker backend: the owner and mode are what
/// the command sees, so they are in the step's key only when written.
#[test]
fn secrets_belong_to_the_step_user_or_to_the_owner_and_mode_the_recipe_gives() {
    let Some(p) = project(
        r#"
[image]
name = "secret-owner"
base = "stage:base"

[[step]]
run = "mkdir -m 1777 /out"

[[step]]
run = "cat /run/secrets/tok > /dev/null && stat -c '%u:%g %a' /run/secrets/tok > /out/by-name"
user = "app"
secrets = ["tok"]

[[step]]
run = "stat -c '%u:%g %a' /run/secrets/tok > /out/by-number && cat /run/secrets/tok >/dev/null"
user = "1000:1000"
secrets = ["tok"]

[[step]]
run = "stat -c '%u:%g %a' /run/secrets/tok > /out/given && if cat /run/secrets/tok >/dev/null 2>&1; then echo readable; else echo unreadable; fi >> /out/given"
user = "1000:1000"
secrets = [{ id = "tok", uid = 0, gid = 1000, mode = "0400" }]

[[step]]
run = "stat -c '%u:%g %a' /run/secrets/tok > /out/group && cat /run/secrets/tok > /dev/null && echo readable >> /out/group"
user = "1000:1000"
secrets = [{ id = "tok", uid = 0, gid = 1000, mode = "0440" }]

[[step]]
run = "stat -c '%u:%g %a' /run/secrets/tok > /out/root-owned"
secrets = ["tok"]

[[step]]
run = "echo bob:x:2000:2000::/:/bin/sh >> /etc/passwd && echo bob:x:2000: >> /etc/group"

[[step]]
run = "stat -c '%u:%g %a' /run/secrets/tok > /out/bob && cat /run/secrets/tok > /dev/null"
user = "bob"
secrets = ["tok"]
"#,
    ) else {
        return;
    };
    p.file("tok.txt", "token-for-app");
    let r = p.build(&["--secret", "id=tok,src=tok.txt"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let root = unpack(&p, "out");
    let read = |f: &str| fs::read_to_string(root.join("out").join(f)).unwrap();
    assert_eq!(read("by-name").trim(), "1000:1000 400");
    assert_eq!(read("by-number").trim(), "1000:1000 400");
    assert_eq!(read("given"), "0:1000 400\nunreadable\n");
    assert_eq!(read("group"), "0:1000 440\nreadable\n");
    assert_eq!(read("root-owned").trim(), "0:0 400");
    // A user the step before added (its layer still being compressed when this step starts).
    assert_eq!(read("bob").trim(), "2000:2000 400");

    // Rootless: the same owners, inside the sandbox's user namespace.
    if let Some(user) = rootless_user() {
        let args = ["build", "kiln.toml", "-o", "oci:out-rootless", "--secret", "id=tok,src=tok.txt"];
        let rootless = p.kiln_as(user, "rootless-cache", &args, |_| {});
        assert_eq!(rootless.digest(), r.digest(), "rootless: {}", rootless.stderr);
    }
    // The container backend (a secret written into the step's root while it runs).
    let args = ["--backend", "container", "--cache-dir", "cache-container", "-o", "oci:out-container"];
    let container =
        p.kiln(&[&["build", "kiln.toml", "--secret", "id=tok,src=tok.txt"][..], &args[..]].concat());
    assert_eq!(container.digest(), r.digest(), "container: {}", container.stderr);

    if !require_docker() {
        return;
    }
    let docker = p.kiln(&[
        "build",
        "kiln.toml",
        "--backend",
        "docker",
        "-o",
        "oci:out-docker",
        "--cache-dir",
        p.path("cache-docker2").to_str().unwrap(),
        "--secret",
        "id=tok,src=tok.txt",
    ]);
    assert_eq!(docker.code, 0, "{}", docker.stderr);
    assert_eq!(docker.digest(), r.digest(), "the same layers on the docker backend");
}

/// Issue 18: with `--progress json` a failure is the last event,
/// `build_failed` (exit code, the step, message, hint), and every line on
/// stderr is JSON; plain progress shows a FAILED line for the step.
#[test]
fn a_failed_build_ends_json_progress_with_build_failed_and_plain_with_failed() {
    let Some(p) = project(
        r#"
[image]
name = "fails"
base = "stage:base"

[[step]]
run = "echo before-failing && exit 3"
"#,
    ) else {
        return;
    };
    let r = p.build(&[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let lines: Vec<serde_json::Value> = r
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let failed = lines.iter().find(|e| e["event"] == "step_failed").expect("a step_failed event");
    assert_eq!(failed["step"], 1);
    assert!(failed["stage"].is_null());
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "build_failed", "{last}");
    assert_eq!(last["exit_code"], 1);
    assert_eq!(last["step"]["step"], 1);
    assert!(last["step"]["description"].as_str().unwrap().starts_with("RUN"), "{last}");
    assert!(last["message"].as_str().unwrap().contains("exit"), "{last}");
    assert!(last["hint"].is_string(), "{last}");

    // A bad recipe: the same event, with where in the recipe, exit 2.
    p.recipe("[image]\nname = \"x\"\nepoch = \"soon\"\n");
    let bad = p.build(&[]);
    assert_eq!(bad.code, 2);
    let events: Vec<serde_json::Value> =
        bad.stderr.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 1, "{}", bad.stderr);
    assert_eq!(events[0]["event"], "build_failed");
    assert_eq!(events[0]["exit_code"], 2);
    assert_eq!(events[0]["location"], "kiln.toml:3:9");
    assert!(events[0]["step"].is_null());

    // Plain progress: the step's FAILED line.
    p.recipe(&format!(
        "{BASE}\n[image]\nname = \"fails\"\nbase = \"stage:base\"\n[[step]]\nrun = \"exit 3\"\n"
    ));
    let plain = p.kiln(&["build", "kiln.toml", "--progress", "plain"]);
    assert_eq!(plain.code, 1);
    assert!(plain.stderr.lines().any(|l| l.starts_with("[1/1] FAILED ")), "{}", plain.stderr);
}

/// Issue 18: KILN_LOG=debug is kiln's own events, each naming its step, no
/// colour codes when stderr is not a terminal.
#[test]
fn kiln_log_debug_names_steps_and_has_no_colour_off_a_terminal() {
    let Some(p) = project("[image]\nname = \"log\"\nbase = \"stage:base\"\n[[step]]\nrun = \"true\"\n")
    else {
        return;
    };
    let r = p.kiln_with(&["build", "kiln.toml", "--progress", "plain"], |c| {
        c.env("KILN_LOG", "debug");
    });
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("DEBUG step{step=1/1 RUN"), "{}", r.stderr);
    assert!(!r.stderr.contains('\u{1b}'), "ANSI escapes off a terminal:\n{}", r.stderr);
    let foreign: Vec<&str> =
        r.stderr.lines().filter(|l| l.contains("DEBUG") && !l.contains(" kiln")).collect();
    assert!(foreign.is_empty(), "debug lines of other crates: {foreign:?}");
}

/// Issue 18: on a terminal (`script`'s), a failing step shows FAILED.
#[test]
fn a_failing_step_shows_failed_on_a_terminal() {
    if !require("script") {
        return;
    }
    let Some(p) = project("[image]\nname = \"tty\"\nbase = \"stage:base\"\n[[step]]\nrun = \"exit 4\"\n")
    else {
        return;
    };
    let (code, shown) = p.build_on_a_terminal(&p.cache);
    assert_eq!(code, Some(1), "{shown}");
    assert!(shown.contains("[1/1] FAILED RUN exit 4"), "{shown:?}");
}
