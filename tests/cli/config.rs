//! The image config and manifest beyond `[config]`'s basics: Docker's
//! `Healthcheck` and `Shell`, manifest annotations, `--label` and
//! `--annotation`, and what an image built on another inherits.

use std::fs;
use std::process::Command;

use crate::support::*;

const RECIPE: &str = r#"
[args]
REVISION = "unknown"

[image]
name = "cfg"
annotations = { "org.opencontainers.image.source" = "https://example.invalid/app", "org.opencontainers.image.revision" = "${REVISION}" }

[[step]]
write = "/etc/motd"
content = "hi\n"

[config]
entrypoint = ["/bin/app"]
shell = ["/bin/bash", "-c"]
healthcheck = { test = ["CMD", "/bin/check", "--quick"], interval = "30s", timeout = "5s", retries = 3, start_period = "10s" }
"#;

/// The layout's index entry, manifest and config, as JSON.
fn documents(p: &Project, out: &str) -> (serde_json::Value, serde_json::Value, serde_json::Value) {
    let dir = p.path(out);
    let read = |path: std::path::PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    };
    let index = read(dir.join("index.json"));
    let blob = |d: &serde_json::Value| {
        dir.join("blobs/sha256").join(d.as_str().unwrap().trim_start_matches("sha256:"))
    };
    let manifest = read(blob(&index["manifests"][0]["digest"]));
    let config = read(blob(&manifest["config"]["digest"]));
    (index["manifests"][0].clone(), manifest, config)
}

#[test]
fn healthcheck_shell_and_annotations_are_written() {
    let p = Project::new();
    p.recipe(RECIPE);
    let d = p
        .build(&[
            "-o",
            "oci:out",
            "--arg",
            "REVISION=abc123",
            "--label",
            "org.opencontainers.image.version=1.2",
            "--annotation",
            "org.example.pipeline=42",
        ])
        .digest();
    let (entry, manifest, config) = documents(&p, "out");
    let h = &config["config"]["Healthcheck"];
    assert_eq!(h["Test"], serde_json::json!(["CMD", "/bin/check", "--quick"]));
    assert_eq!(h["Interval"], 30_000_000_000u64);
    assert_eq!(h["Timeout"], 5_000_000_000u64);
    assert_eq!(h["StartPeriod"], 10_000_000_000u64);
    assert_eq!(h["Retries"], 3);
    assert_eq!(config["config"]["Shell"], serde_json::json!(["/bin/bash", "-c"]));
    assert_eq!(config["config"]["Labels"]["org.opencontainers.image.version"], "1.2");
    for a in [&manifest["annotations"], &entry["annotations"]] {
        assert_eq!(a["org.opencontainers.image.created"], "1970-01-01T00:00:00Z", "{a}");
        assert_eq!(a["org.opencontainers.image.source"], "https://example.invalid/app", "{a}");
        assert_eq!(a["org.opencontainers.image.revision"], "abc123", "{a}");
        assert_eq!(a["org.example.pipeline"], "42", "{a}");
    }
    assert_eq!(entry["annotations"]["org.opencontainers.image.ref.name"], "latest");

    // kiln inspect shows them.
    let r = p.kiln(&["inspect", "oci:out", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["config_json"]["Healthcheck"]["Retries"], 3);
    assert_eq!(v["annotations"]["org.example.pipeline"], "42");

    // Same inputs, same digest; another revision: another manifest, no step runs.
    assert_eq!(
        p.build(&[
            "-o",
            "oci:again",
            "--arg",
            "REVISION=abc123",
            "--label",
            "org.opencontainers.image.version=1.2",
            "--annotation",
            "org.example.pipeline=42"
        ])
        .digest(),
        d
    );
    let other = p.build(&["-o", "oci:other", "--arg", "REVISION=def456"]);
    assert_ne!(other.digest(), d);
    assert_eq!(other.cached(), [true]);

    // skopeo reads the annotations from the raw manifest.
    if require("skopeo") {
        let o = Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci:{}", p.path("out").display()))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let raw: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(raw["annotations"]["org.opencontainers.image.revision"], "abc123");
    }
}

#[test]
fn an_image_inherits_its_bases_healthcheck_and_none_turns_it_off() {
    let p = Project::new();
    p.recipe(RECIPE);
    p.build(&["-o", "oci:base"]).digest();
    p.file(
        "child/kiln.toml",
        "[image]\nname = \"child\"\nbase = \"oci:../base\"\n[[step]]\nwrite = \"/x\"\ncontent = \"\"\n",
    );
    let r = p.kiln(&["build", "child/kiln.toml", "-o", "oci:child-out"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (entry, manifest, config) = documents(&p, "child-out");
    assert_eq!(config["config"]["Healthcheck"]["Test"], serde_json::json!(["CMD", "/bin/check", "--quick"]));
    assert_eq!(config["config"]["Shell"], serde_json::json!(["/bin/bash", "-c"]));
    // Manifest annotations are the image's own, not the base's.
    assert!(manifest["annotations"].get("org.opencontainers.image.source").is_none(), "{manifest}");
    assert!(entry["annotations"].get("org.opencontainers.image.source").is_none(), "{entry}");

    p.file(
        "child/kiln.toml",
        "[image]\nname = \"child\"\nbase = \"oci:../base\"\n[config]\nhealthcheck = { test = [\"NONE\"] }\n",
    );
    let r = p.kiln(&["build", "child/kiln.toml", "-o", "oci:child-none"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (_, _, config) = documents(&p, "child-none");
    assert_eq!(config["config"]["Healthcheck"], serde_json::json!({"Test": ["NONE"]}));
}

#[test]
fn bad_labels_and_annotations_are_exit_2_before_any_step() {
    let p = Project::new();
    p.recipe(RECIPE);
    for (flag, value, want) in [
        ("--label", "novalue", "`--label` takes KEY=VALUE"),
        ("--label", "=x", "`--label` takes KEY=VALUE"),
        ("--annotation", "novalue", "`--annotation` takes KEY=VALUE"),
        ("--annotation", "a b=1", "not an annotation key"),
        ("--annotation", "org.opencontainers.image.created=2020", "kiln writes it"),
    ] {
        let r = p.kiln(&["build", "kiln.toml", "-o", "oci:out", flag, value]);
        assert_eq!(r.code, 2, "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{flag} {value}: {}", r.stderr);
        assert!(!p.path("out").exists());
    }
}

#[test]
fn docker_inspect_shows_the_healthcheck() {
    if !require_docker() {
        return;
    }
    let p = Project::new();
    p.recipe(&RECIPE.replace("name = \"cfg\"", "name = \"kiln-test-healthcheck\""));
    p.build(&["-o", "docker-archive:img.tar"]).digest();
    let load = Command::new("docker").args(["load", "-q", "-i"]).arg(p.path("img.tar")).output().unwrap();
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));
    let o = Command::new("docker")
        .args([
            "inspect",
            "--format",
            "{{json .Config.Healthcheck}} {{json .Config.Shell}}",
            "kiln-test-healthcheck:latest",
        ])
        .output()
        .unwrap();
    let _ = Command::new("docker").args(["rmi", "-f", "kiln-test-healthcheck:latest"]).output();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains(r#""Test":["CMD","/bin/check","--quick"]"#) && out.contains(r#""Interval":30000000000"#),
        "{out}"
    );
    assert!(out.contains(r#"["/bin/bash","-c"]"#), "{out}");
}
