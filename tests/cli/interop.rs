//! Tools kiln did not write read its output.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use crate::support::*;

fn project() -> Option<Project> {
    let busybox = busybox()?;
    let p = Project::new();
    p.recipe(
        r#"
[image]
name = "interop"

[[step]]
copy = "bin"
to = "/bin"

[[step]]
copy = "app"
to = "/app"
owner = "1000:1000"

[[step]]
write = "/app/secret.conf"
content = "mode 600\n"
mode = "0600"
owner = "1000:1000"

[config]
entrypoint = ["/bin/sh", "-c", "cat /app/msg.txt; ls /app/link.txt"]
"#,
    );
    p.file("app/msg.txt", "printed by the entrypoint\n")
        .symlink("app/link.txt", "msg.txt")
        .exec_file("app/run.sh", "#!/bin/sh\n");
    fs::create_dir_all(p.path("bin")).unwrap();
    fs::copy(busybox, p.path("bin/busybox")).unwrap();
    for t in ["sh", "cat", "ls"] {
        p.symlink(&format!("bin/{t}"), "busybox");
    }
    Some(p)
}

#[test]
fn skopeo_inspects_the_layout() {
    if !require("skopeo") {
        return;
    }
    let Some(p) = project() else { return };
    let d = p.build(&["-o", "oci:out:v1", "-o", "oci-archive:img.tar"]).digest();
    for target in [
        format!("oci:{}:v1", p.path("out").display()),
        format!("oci-archive:{}", p.path("img.tar").display()),
    ] {
        let o = Command::new("skopeo").args(["inspect", &target]).output().unwrap();
        assert!(o.status.success(), "{target}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["Digest"], d);
        assert_eq!(v["Layers"].as_array().unwrap().len(), 3);
    }
}

#[test]
fn umoci_unpacks_files_modes_owners_and_symlinks() {
    if !require("umoci") {
        return;
    }
    let Some(p) = project() else { return };
    p.build(&["-o", "oci:out:v1"]).digest();
    let bundle = p.path("bundle");
    let o = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:v1", p.path("out").display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let root = bundle.join("rootfs");
    let meta = |rel: &str| fs::symlink_metadata(root.join(rel)).unwrap();
    assert_eq!(fs::read_to_string(root.join("app/msg.txt")).unwrap(), "printed by the entrypoint\n");
    assert_eq!(meta("app/msg.txt").permissions().mode() & 0o7777, 0o644);
    assert_eq!(meta("app/run.sh").permissions().mode() & 0o7777, 0o755);
    assert_eq!(meta("app/secret.conf").permissions().mode() & 0o7777, 0o600);
    assert_eq!((meta("app/msg.txt").uid(), meta("app/msg.txt").gid()), (1000, 1000));
    assert_eq!((meta("bin/busybox").uid(), meta("bin/busybox").gid()), (0, 0));
    assert_eq!(fs::read_link(root.join("app/link.txt")).unwrap().to_str(), Some("msg.txt"));
    assert_eq!(meta("app/msg.txt").mtime(), 0, "every mtime is the epoch");
}

#[test]
fn docker_loads_and_runs_the_archive() {
    if !require_docker() {
        return;
    }
    let Some(p) = project() else { return };
    p.build(&["-o", "docker-archive:img.tar"]).digest();
    let o = Command::new("docker").arg("load").arg("-i").arg(p.path("img.tar")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("interop:latest"));
    let o = Command::new("docker").args(["run", "--rm", "interop:latest"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "printed by the entrypoint\n/app/link.txt\n");
}

#[test]
fn what_docker_save_writes_works_as_a_base() {
    if !require_docker() {
        return;
    }
    let Some(p) = project() else { return };
    p.build(&["-o", "docker-archive:img.tar", "-o", "oci:orig"]).digest();
    let o = Command::new("docker").arg("load").arg("-i").arg(p.path("img.tar")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Docker's own archive format (plain-tar layers in Docker 20.10), not kiln's.
    let o = Command::new("docker")
        .args(["save", "-o"])
        .arg(p.path("saved.tar"))
        .arg("interop:latest")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    p.file(
        "child.toml",
        "[image]\nname = \"child\"\nbase = \"docker-archive:saved.tar\"\n[[step]]\nwrite = \"/app/added\"\ncontent = \"x\"\n",
    );
    p.kiln(&["build", "child.toml", "-o", "oci:child"]).digest();
    let r = p.kiln(&["diff", "oci:orig", "oci:child"]);
    assert_eq!(r.stdout, "+ /app/added\n", "{}", r.stderr);
}
