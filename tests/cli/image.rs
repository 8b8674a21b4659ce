//! kiln's own image (`recipes/kiln/kiln.toml`, `make image`): built from the
//! recipe and its kiln.lock, it runs kiln in a container with the default
//! security profile (no privileges, no socket) for a recipe without `run`
//! steps, giving the digest kiln gives on the host (issue 17).

use std::fs;
use std::process::Command;

use crate::support::*;

#[test]
fn kilns_own_image_builds_and_runs_kiln_unprivileged() {
    if !require_root() || !require_docker() || !debian_mirror() || !require("objcopy") {
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let p = Project::new();
    fs::create_dir_all(p.path("recipes/kiln")).unwrap();
    fs::create_dir_all(p.path("target/image")).unwrap();
    for f in ["kiln.toml", "kiln.lock"] {
        fs::copy(repo.join("recipes/kiln").join(f), p.path(&format!("recipes/kiln/{f}"))).unwrap();
    }
    // As `make image` does, with the binary under test.
    let strip = Command::new("objcopy")
        .args(["--strip-debug", kiln_bin()])
        .arg(p.path("target/image/kiln"))
        .status()
        .unwrap();
    assert!(strip.success());
    let build = |out: &str| {
        p.kiln(&["build", "recipes/kiln/kiln.toml", "--context", ".", "-o", out, "--progress", "plain"])
    };
    let r = build("docker-archive:kiln-image.tar");
    let digest = r.digest();
    // Reproducible: a second build in a fresh cache gives the same image.
    let again = p.kiln_with(
        &["build", "recipes/kiln/kiln.toml", "--context", ".", "-o", "oci:again", "--progress", "plain"],
        |c| {
            c.env("KILN_CACHE_DIR", p.path("cache-again"));
        },
    );
    assert_eq!(again.digest(), digest);

    let tag = "kiln-test-own-image:1";
    let load =
        Command::new("docker").args(["load", "-q", "-i"]).arg(p.path("kiln-image.tar")).output().unwrap();
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    let loaded = String::from_utf8_lossy(&load.stdout).trim().rsplit(' ').next().unwrap().to_string();
    assert!(Command::new("docker").args(["tag", &loaded, tag]).status().unwrap().success());

    let version = Command::new("docker").args(["run", "--rm", tag, "--version"]).output().unwrap();
    assert!(version.status.success(), "{}", String::from_utf8_lossy(&version.stderr));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("kiln "));

    // A recipe without `run` steps, built inside the container (default
    // profile, no privileges, no socket): the digest the host gives.
    let work = Project::new();
    work.file("hello.txt", "hello from a container\n");
    work.recipe(
        "[image]\nname = \"inside\"\n[[step]]\ncopy = \"hello.txt\"\nto = \"/hello.txt\"\n[[step]]\nwrite = \"/etc/motd\"\ncontent = \"built by kiln in kiln\\n\"\n[config]\ncmd = [\"/hello.txt\"]\n",
    );
    let host = work.build(&[]).digest();
    let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(work.dir.path()).status();
    let inside = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/workspace", work.dir.path().display()))
        .args([tag, "build", "kiln.toml", "-o", "oci:/workspace/out-inside", "--progress", "plain"])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", tag, &loaded]).output();
    assert!(inside.status.success(), "{}", String::from_utf8_lossy(&inside.stderr));
    let printed = String::from_utf8_lossy(&inside.stdout);
    assert_eq!(printed.trim().lines().last().unwrap_or(""), host, "{printed}");
}
