//! kiln's own image (`recipes/kiln/kiln.toml`, `make image`): built from the
//! recipe and its kiln.lock, it runs kiln in a container with the default
//! security profile (no privileges, no socket), where `auto` picks the
//! container backend for `run` steps and maintainer scripts, giving the
//! digests kiln gives on the host (issue 17).

use std::fs;
use std::process::Command;

use crate::support::*;

/// kiln's own image, built as `make image` builds it (with the binary under
/// test) twice, checked to be the same, and loaded under `tag`; `None` when
/// what it needs is missing outside CI.
fn own_image(tag: &str) -> Option<Project> {
    if !require_root() || !require_docker() || !debian_mirror() || !require("objcopy") {
        return None;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    fs::create_dir_all(p.path("recipes/kiln")).unwrap();
    fs::create_dir_all(p.path("target/image")).unwrap();
    for f in ["kiln.toml", "kiln.lock"] {
        fs::copy(repo.join("recipes/kiln").join(f), p.path(&format!("recipes/kiln/{f}"))).unwrap();
    }
    let strip = Command::new("objcopy")
        .args(["--strip-debug", kiln_bin()])
        .arg(p.path("target/image/kiln"))
        .status()
        .unwrap();
    assert!(strip.success());
    let args = ["build", "recipes/kiln/kiln.toml", "--context", ".", "--progress", "plain", "-o"];
    let r = p.kiln(&[&args[..], &["docker-archive:kiln-image.tar"]].concat());
    let digest = r.digest();
    // Reproducible: a second build in a fresh cache gives the same image.
    let again = p.kiln_with(&[&args[..], &["oci:again"]].concat(), |c| {
        c.env("KILN_CACHE_DIR", p.path("cache-again"));
    });
    assert_eq!(again.digest(), digest);
    let load =
        Command::new("docker").args(["load", "-q", "-i"]).arg(p.path("kiln-image.tar")).output().unwrap();
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    let loaded = String::from_utf8_lossy(&load.stdout).trim().rsplit(' ').next().unwrap().to_string();
    assert!(Command::new("docker").args(["tag", &loaded, tag]).status().unwrap().success());
    Some(p)
}

/// A project with a recipe kiln builds in an unprivileged container.
fn no_run_steps() -> Project {
    let work = Project::new();
    work.file("hello.txt", "hello from a container\n");
    work.recipe(
        "[image]\nname = \"inside\"\n[[step]]\ncopy = \"hello.txt\"\nto = \"/hello.txt\"\n[[step]]\nwrite = \"/etc/motd\"\ncontent = \"built by kiln in kiln\\n\"\n[config]\ncmd = [\"/hello.txt\"]\n",
    );
    let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(work.dir.path()).status();
    work
}

#[test]
fn kilns_own_image_builds_and_runs_kiln_unprivileged() {
    let tag = "kiln-test-own-image:1";
    let Some(_image) = own_image(tag) else { return };
    let version = Command::new("docker").args(["run", "--rm", tag, "--version"]).output().unwrap();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("kiln "));

    // A recipe without `run` steps, built inside the container (default
    // profile, no privileges, no socket): the digest the host gives.
    let work = no_run_steps();
    let host = work.build(&[]).digest();
    let inside = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/workspace", work.dir.path().display()))
        .args([tag, "build", "kiln.toml", "-o", "oci:/workspace/out-inside", "--progress", "plain"])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    assert!(inside.status.success(), "{}", String::from_utf8_lossy(&inside.stderr));
    let printed = String::from_utf8_lossy(&inside.stdout);
    assert_eq!(printed.trim().lines().last().unwrap_or(""), host, "{printed}");
}

/// The pipeline templates in deploy/: the kiln command line each holds,
/// run as the template runs it (in kiln's image, a shell, the variables
/// set), against a loopback registry. The first pushes the image and the
/// step cache; the others, each a fresh container, find every step there.
#[test]
fn the_pipeline_templates_build_and_push_from_kilns_image() {
    let tag = "kiln-test-own-image:2";
    let Some(_image) = own_image(tag) else { return };
    let Some(reg) = crate::registry::TestRegistry::start(None) else { return };
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = no_run_steps();
    let host = work.build(&[]).digest();
    let templates = ["github-actions.yml", "gitlab-ci.yml", "kubernetes-job.yaml", "tekton-task.yaml"];
    for (n, name) in templates.iter().enumerate() {
        let text = fs::read_to_string(repo.join("deploy").join(name)).unwrap();
        let lines: Vec<&str> = text
            .lines()
            .map(|l| l.trim().trim_start_matches("- ").trim())
            .filter(|l| l.starts_with("kiln build"))
            .collect();
        assert_eq!(lines.len(), 1, "{name}: one kiln build line expected: {lines:?}");
        let line = lines[0];
        for part in [
            "--cache-from \"registry:$KILN_CACHE\"",
            "--cache-to \"registry:$KILN_CACHE\"",
            "-o \"registry:$KILN_TARGET\"",
        ] {
            assert!(line.contains(part), "{name}: {line}");
        }
        let out = Command::new("docker")
            .args(["run", "--rm", "--network", "host", "-v"])
            .arg(format!("{}:/workspace", work.dir.path().display()))
            .args(["-e", &format!("KILN_CACHE={}/ci/cache", reg.host())])
            .args(["-e", &format!("KILN_TARGET={}/ci/app:{n}", reg.host())])
            .args(["-e", "KILN_RECIPE=kiln.toml", "--entrypoint", "/bin/sh", tag, "-c", line])
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{name}: {stderr}");
        assert_eq!(stdout.trim().lines().last().unwrap_or(""), host, "{name}: {stdout}");
        let meta = fs::read_to_string(work.path("kiln-build.json")).unwrap();
        assert!(meta.contains(&host), "{name}: {meta}");
        if n > 0 {
            // A fresh container: every step comes from the registry cache.
            assert_eq!(stderr.matches(" CACHED ").count(), 2, "{name}: {stderr}");
        }
    }
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
}

/// Issue 17's first three: in a default-profile container (no privileges,
/// no socket), kiln's image builds the busybox example (stages, `run`
/// steps) and pushes it to a loopback registry; the nginx example
/// (maintainer scripts) and the python one ([packages]); each the digest
/// the local backend gives on the host. A secret given to the build is in
/// no blob of the registry or the output.
#[test]
fn kilns_image_runs_run_steps_and_scripts_in_a_default_profile_container() {
    let tag = "kiln-test-own-image:3";
    let Some(_image) = own_image(tag) else { return };
    let Some(reg) = crate::registry::TestRegistry::start(None) else { return };
    let Some(bb) = busybox() else { return };
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let inside = |work: &Project, args: &[&str], env: &[&str]| {
        let mut c = Command::new("docker");
        c.args(["run", "--rm", "--network", "host", "-v", "/etc/apt:/etc/apt:ro", "-v"])
            .arg(format!("{}:/workspace", work.dir.path().display()));
        for e in env {
            c.args(["-e", e]);
        }
        let out = c.arg(tag).args(args).output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {stderr}");
        (stdout.trim().lines().last().unwrap_or("").to_string(), stderr.into_owned())
    };
    let example = |name: &str| {
        let work = Project::new();
        for e in fs::read_dir(repo.join("recipes/examples").join(name)).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                fs::copy(e.path(), work.path(&e.file_name().to_string_lossy())).unwrap();
            }
        }
        let _ = Command::new("cp")
            .arg("-r")
            .arg(repo.join("recipes/examples").join(name).join("etc"))
            .arg(work.path(""))
            .status();
        work
    };

    let busy = example("busybox");
    fs::copy(&bb, busy.path("busybox")).unwrap();
    let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(busy.dir.path()).status();
    let host = busy.build(&["--backend", "local"]).digest();
    let target = format!("{}/examples/busybox:1", reg.host());
    let (printed, stderr) = inside(
        &busy,
        &["build", "kiln.toml", "-o", &format!("registry:{target}"), "--progress", "plain"],
        &["KILN_LOG=info"],
    );
    assert_eq!(printed, host, "busybox: {stderr}");
    assert!(stderr.contains("backend=container"), "auto picks the container backend: {stderr}");

    // Fewer capabilities than the engine's default (a cluster that drops
    // some): refused before any step, naming them, rather than a build
    // whose files differ under the same keys.
    let dropped = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "--cap-drop", "CHOWN", "-v"])
        .arg(format!("{}:/workspace", busy.dir.path().display()))
        .args([tag, "build", "kiln.toml", "-o", "oci:/workspace/out-dropped"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&dropped.stderr);
    assert_eq!(dropped.status.code(), Some(3), "{err}");
    assert!(err.contains("CAP_CHOWN") && err.contains("default capabilities"), "{err}");
    // Not root: the hint says to run as root in the container.
    let user = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            "1000",
            "-e",
            "KILN_CACHE_DIR=/workspace/cache-1000",
            "-v",
        ])
        .arg(format!("{}:/workspace", busy.dir.path().display()))
        .args([tag, "build", "kiln.toml", "-o", "oci:/workspace/out-1000"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&user.stderr);
    assert_eq!(user.status.code(), Some(3), "{err}");
    assert!(err.contains("as root in the container"), "{err}");

    for name in ["nginx", "python"] {
        let work = example(name);
        let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(work.dir.path()).status();
        let host = work.build(&["--backend", "local"]).digest();
        let (printed, stderr) = inside(&work, &["build", "kiln.toml", "-o", "oci:/workspace/inside"], &[]);
        assert_eq!(printed, host, "{name}: {stderr}");
    }

    // A secret: used by a `run` step, pushed with the image, in no blob.
    let secret = Project::new();
    fs::copy(&bb, secret.path("busybox")).unwrap();
    secret.recipe(&format!(
        "{}\n[image]\nname = \"secret\"\nbase = \"stage:base\"\n[[step]]\nrun = \"test -s /run/secrets/tok && wc -c < /run/secrets/tok > /len\"\nsecrets = [\"tok\"]\n",
        crate::run::BASE
    ));
    let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(secret.dir.path()).status();
    let value = "in-container-S3CRET-5150";
    let target = format!("{}/examples/secret:1", reg.host());
    let (printed, stderr) = inside(
        &secret,
        &[
            "build",
            "kiln.toml",
            "--secret",
            "id=tok,env=TOK",
            "-o",
            &format!("registry:{target}"),
            "-o",
            "oci:/workspace/out",
        ],
        &[&format!("TOK={value}")],
    );
    assert!(printed.starts_with("sha256:"), "{stderr}");
    for dir in [reg.data_dir(), secret.path("out")] {
        for e in walkdir::WalkDir::new(&dir).into_iter().flatten().filter(|e| e.file_type().is_file()) {
            let bytes = fs::read(e.path()).unwrap();
            let mut plain = Vec::new();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                let _ = std::io::Read::read_to_end(
                    &mut flate2::read::MultiGzDecoder::new(&bytes[..]),
                    &mut plain,
                );
            }
            for b in [&bytes, &plain] {
                assert!(
                    !b.windows(value.len()).any(|w| w == value.as_bytes()),
                    "the secret is in {:?}",
                    e.path()
                );
            }
        }
    }
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
}
