use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::support::*;

const RECIPE: &str = r#"
[image]
name = "repro"

[[step]]
copy = "tree"
to = "/srv"

[config]
cmd = ["/srv/bin/tool"]
"#;

/// The same sources as a checkout under `umask` would have them.
fn checkout(umask: u32) -> Project {
    let p = Project::new();
    p.recipe(RECIPE);
    p.file("tree/readme", "read me\n")
        .exec_file("tree/bin/tool", "#!/bin/sh\necho tool\n")
        .symlink("tree/latest", "bin/tool");
    p.file("tree/data/blob", noise(1, 300_000));
    for (path, exec) in [("tree/readme", false), ("tree/bin/tool", true), ("tree/data/blob", false)] {
        let mode = if exec { 0o777 } else { 0o666 } & !umask;
        fs::set_permissions(p.path(path), fs::Permissions::from_mode(mode)).unwrap();
    }
    for d in ["tree", "tree/bin", "tree/data"] {
        fs::set_permissions(p.path(d), fs::Permissions::from_mode(0o777 & !umask)).unwrap();
    }
    p
}

#[test]
fn same_digest_across_folders_caches_umasks_and_clocks() {
    let a = checkout(0o022);
    let da = a.kiln_with(&["build", "kiln.toml", "-o", "oci:out"], |c| {
        c.env("TZ", "UTC");
    });
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let b = checkout(0o077);
    let db = b.kiln_with(&["build", "kiln.toml", "-o", "oci:out"], |c| {
        c.env("TZ", "Asia/Kathmandu");
    });
    assert_eq!(da.digest(), db.digest());
}

#[test]
fn epoch_and_source_date_epoch_set_every_timestamp() {
    let p = checkout(0o022);
    let d0 = p.build(&[]).digest();
    let r = p.kiln_with(&["build", "kiln.toml", "-o", "oci:out2", "--progress", "json"], |c| {
        c.env("SOURCE_DATE_EPOCH", "1700000000");
    });
    assert_ne!(r.digest(), d0);
    let v: serde_json::Value =
        serde_json::from_str(&p.kiln(&["inspect", "oci:out2", "--json"]).stdout).unwrap();
    assert_eq!(v["created"], "2023-11-14T22:13:20Z");
}

#[test]
fn verify_passes_on_the_examples() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples");
    let Some(busybox) = busybox() else { return };
    let mut n = 0;
    for e in fs::read_dir(&examples).unwrap() {
        let dir = e.unwrap().path();
        if !dir.join("kiln.toml").is_file() {
            continue;
        }
        // Work on a copy so the test does not write into the checkout.
        let p = Project::new();
        let status = std::process::Command::new("cp").arg("-a").arg(&dir).arg(p.path("ex")).status().unwrap();
        assert!(status.success());
        fs::copy(&busybox, p.path("ex/busybox")).unwrap();
        let r = p.kiln(&["verify", "ex/kiln.toml"]);
        assert_eq!(r.code, 0, "{}: {}{}", dir.display(), r.stdout, r.stderr);
        assert!(r.stderr.contains("reproducible"), "{}", r.stderr);
        n += 1;
    }
    assert!(n >= 1, "no examples found");
}
