//! Golden bytes: a fixed recipe's step keys, config, manifest and one layer
//! listing, pinned. Any change to how keys are computed or how an image or
//! a listing is written fails here loudly; if the change is meant, it needs
//! a new store schema (keys) or a note in the changelog (formats), and new
//! values here.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::support::*;

const RECIPE: &str = r#"
[image]
name = "golden"
base = "scratch"
epoch = 1700000000

[[step]]
copy = "tree"
to = "/srv"

[[step]]
write = "/etc/motd"
content = "pinned\n"
owner = "1000:1000"
mode = "0640"

[config]
entrypoint = ["/srv/bin/tool"]
env = { LANG = "C.UTF-8" }
workdir = "/srv"
user = "1000:1000"
labels = { "org.example.golden" = "yes" }
"#;

/// The step keys, in order.
const KEYS: &[&str] = &[
    "sha256:dd7db04e3c4fac86ef24c78be45eea40623030c5e3dbe16df9f38c285f4fab45",
    "sha256:d0ac2929fb9522ba4c9b49f2b8cdc527b858bc2159a2a622edbcf9a7fab093ac",
];
/// Since issue 16 the manifest carries `org.opencontainers.image.created` (the epoch).
const MANIFEST: &str = "sha256:08178560491952797ac7b2532ca6a2ed10da6268eca1cf6c6d198af3b137c30f";
const CONFIG: &str = concat!(
    r#"{"architecture":"amd64","config":{"Entrypoint":["/srv/bin/tool"],"#,
    r#""Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin","LANG=C.UTF-8"],"#,
    r#""Labels":{"org.example.golden":"yes"},"User":"1000:1000","WorkingDir":"/srv"},"#,
    r#""created":"2023-11-14T22:13:20Z","history":["#,
    r#"{"comment":"kiln","created":"2023-11-14T22:13:20Z","created_by":"kiln: COPY tree -> /srv"},"#,
    r#"{"comment":"kiln","created":"2023-11-14T22:13:20Z","created_by":"kiln: WRITE /etc/motd"}],"#,
    r#""os":"linux","rootfs":{"diff_ids":["#,
    r#""sha256:624042a05388ba5b17f76a902e09f3b3ba296f1c699422a28c787d715767eb9d","#,
    r#""sha256:a8673529ad6c15252a11fe45d520d28d748c729f4eb9be6922ab280999a336ec"],"type":"layers"}}"#
);
/// The stored listing of the `write` step's layer, in hex.
const LISTING: &str = concat!(
    "4b4c5354020a0000",                                                 // magic, version 2
    "a8673529ad6c15252a11fe45d520d28d748c729f4eb9be6922ab280999a336ec", // the layer's diff_id
    "0365746301ed03000000",                                             // `etc`: folder, 0755, 0:0, no xattrs
    "086574632f6d6f74640007",                                           // `etc/motd`: file of 7 bytes,
    "dbdbfc4eea60c31dfdb68830dcf4393aa7e1fb5b64af6377e444c6c42e909203", // its sha256,
    "a003e807e80700",                                                   // 0640, 1000:1000, no xattrs
    "280c91f3b003657463",               // index: block at 40, its CRC-32, `etc`
    "02000000000000006400000000000000", // 2 entries, the index at 0x64
    "0a0c49e7",                         // CRC-32 of the index and those
    "4b4c5354454e4400",                 // end
);

fn project() -> Project {
    let p = Project::new();
    p.recipe(RECIPE);
    p.file("tree/readme", "read me\n")
        .file("tree/bin/tool", "#!/bin/sh\necho tool\n")
        .symlink("tree/latest", "bin/tool");
    for (path, mode) in
        [("tree/readme", 0o644), ("tree/bin/tool", 0o755), ("tree", 0o755), ("tree/bin", 0o755)]
    {
        fs::set_permissions(p.path(path), fs::Permissions::from_mode(mode)).unwrap();
    }
    p
}

#[test]
fn a_fixed_recipe_gives_the_pinned_keys_config_manifest_and_listing() {
    let p = project();
    let plan = p.kiln(&["plan", "kiln.toml", "--platform", "linux/amd64", "--json"]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let steps: Vec<serde_json::Value> = serde_json::from_str(&plan.stdout).unwrap();
    let keys: Vec<String> = steps.iter().map(|s| s["key"].as_str().unwrap().to_string()).collect();
    let digest = p.build(&["--platform", "linux/amd64"]).digest();
    let out = p.path("out");
    let blob = |d: &str| fs::read(out.join("blobs/sha256").join(d.trim_start_matches("sha256:"))).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&digest)).unwrap();
    let config = String::from_utf8(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let top: serde_json::Value = serde_json::from_str(&config).unwrap();
    let diff_id = top["rootfs"]["diff_ids"][1].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let listing = hex::encode(fs::read(p.cache.join("v1/listings").join(format!("{diff_id}.list"))).unwrap());
    assert_eq!(keys, KEYS, "step keys changed");
    assert_eq!(digest, MANIFEST, "the manifest changed");
    assert_eq!(config, CONFIG, "the config changed");
    assert_eq!(listing, LISTING, "the stored listing format changed");
}
