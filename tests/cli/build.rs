use std::fs;

use crate::support::*;

const RECIPE: &str = r#"
[image]
name = "app"

[[step]]
copy = "src"
to = "/app/src"
owner = "1000:1000"

[[step]]
write = "/etc/motd"
content = "hi\n"

[config]
entrypoint = ["/app/src/run"]
env = { MODE = "prod" }
"#;

fn project() -> Project {
    let p = Project::new();
    p.recipe(RECIPE)
        .file("src/a.txt", "a\n")
        .exec_file("src/run", "#!/bin/sh\n")
        .symlink("src/link", "a.txt");
    p
}

#[test]
fn build_prints_only_the_digest_on_stdout() {
    let p = project();
    let r = p.build(&[]);
    let d = r.digest();
    assert_eq!(r.stdout.trim(), d, "stdout carries results only");
    assert_eq!(r.count("step_finished"), 2);
    assert_eq!(r.count("build_finished"), 1);
    assert_layout_blobs_valid(&p.path("out"));
}

#[test]
fn default_output_is_out_name() {
    let p = project();
    let r = p.kiln(&["build", "kiln.toml"]);
    r.digest();
    assert!(p.path("out/app/index.json").is_file(), "default output oci:out/NAME");
    let index = std::fs::read_to_string(p.path("out/app/index.json")).unwrap();
    assert!(index.contains(r#""org.opencontainers.image.ref.name":"latest""#), "{index}");
}

#[test]
fn inspect_shows_layers_and_config() {
    let p = project();
    let d = p.build(&["-o", "oci:out:v1"]).digest();
    let r = p.kiln(&["inspect", "oci:out:v1", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["manifest"], d);
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert_eq!(v["created"], "1970-01-01T00:00:00Z");
    assert!(v["config_json"]["Env"].as_array().unwrap().iter().any(|e| e == "MODE=prod"));
    assert!(v["layers"][0]["created_by"].as_str().unwrap().contains("COPY src -> /app/src"));
}

#[test]
fn plan_shows_keys_and_hits_without_building() {
    let p = project();
    let r = p.kiln(&["plan", "kiln.toml", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v.as_array().unwrap().iter().all(|s| s["cached"] == false));
    assert!(!p.path("out").exists(), "plan builds nothing");
    p.build(&[]).digest();
    let r = p.kiln(&["plan", "kiln.toml"]);
    assert_eq!(r.stdout.lines().filter(|l| l.contains("HIT")).count(), 2, "{}", r.stdout);
}

#[test]
fn archives_hold_the_same_image() {
    let p = project();
    let d = p
        .build(&["-o", "oci:out", "-o", "oci-archive:img.oci.tar", "-o", "docker-archive:img.docker.tar"])
        .digest();
    for t in ["oci-archive:img.oci.tar", "docker-archive:img.docker.tar"] {
        let r = p.kiln(&["inspect", t, "--json"]);
        assert_eq!(r.code, 0, "{t}: {}", r.stderr);
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["manifest"], d, "{t}");
    }
}

#[test]
fn an_image_builds_on_an_oci_base_and_diff_shows_the_change() {
    let p = project();
    p.build(&["-o", "oci:base"]).digest();
    p.file(
        "child.toml",
        "[image]\nname = \"child\"\nbase = \"oci:base\"\n[[step]]\nwrite = \"/app/src/new.txt\"\ncontent = \"new\"\n",
    );
    let r = p.kiln(&["build", "child.toml", "-o", "oci:child", "-o", "docker-archive:child.tar"]);
    r.digest();
    let r = p.kiln(&["diff", "oci:base", "oci:child"]);
    assert_eq!(r.code, 1, "differences exit 1: {}", r.stderr);
    assert!(r.stdout.contains("+ /app/src/new.txt"), "{}", r.stdout);
    assert!(!r.stdout.contains("/etc/motd"), "unchanged files are not listed: {}", r.stdout);
    // The parent folder keeps the owner the base gave it.
    let r = p.kiln(&["diff", "oci:base", "oci:child", "--json"]);
    assert!(!r.stdout.contains("\"/app/src\""), "{}", r.stdout);
    // A docker-archive works as a base too.
    p.file("grand.toml", "[image]\nname = \"grand\"\nbase = \"docker-archive:child.tar\"\n");
    p.kiln(&["build", "grand.toml", "-o", "oci:grand"]).digest();
    assert_eq!(p.kiln(&["diff", "oci:child", "oci:grand"]).code, 0);
}

#[test]
fn cache_commands_report_and_prune() {
    let p = project();
    p.build(&[]).digest();
    let r = p.kiln(&["cache", "du", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(v["blob_bytes"].as_u64().unwrap() > 0);
    assert_eq!(v["steps"], 2);
    let r = p.kiln(&["cache", "ls"]);
    assert_eq!(r.stdout.lines().count(), 4, "a header, two steps and one image: {}", r.stdout);
    assert!(r.stdout.starts_with("LAST USED (UTC)"), "{}", r.stdout);
    let year = r.stdout.lines().nth(1).unwrap().get(..4).unwrap().parse::<u32>().unwrap();
    assert!(year >= 2024, "a human date: {}", r.stdout);
    let r = p.kiln(&["cache", "prune", "--max-size", "0"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&p.kiln(&["cache", "du", "--json"]).stdout).unwrap();
    assert_eq!(v["blob_bytes"], 0);
    assert_eq!(p.kiln(&["cache", "prune", "--max-size", "lots"]).code, 2);
    // After a prune everything rebuilds to the same digest.
    let before = p.build(&["--no-cache"]).digest();
    assert_eq!(p.build(&[]).digest(), before);
}

/// A tar of (path, type, mode, content) entries, in the order given.
fn tar_of(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (path, kind, mode, body) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(body.len() as u64);
        h.set_cksum();
        tar.append(&h, *body).unwrap();
    }
    tar.into_inner().unwrap()
}

/// An OCI layout whose one layer (`/etc/hello`) is compressed as `media_type` says.
fn layout_with_layer(p: &Project, dir: &str, media_type: &str, compress: impl Fn(&[u8]) -> Vec<u8>) {
    let tar = tar_of(&[
        ("etc/", tar::EntryType::Directory, 0o755, &b""[..]),
        ("etc/hello", tar::EntryType::Regular, 0o644, b"hi\n"),
    ]);
    layout_of_tar(p, dir, media_type, &tar, compress);
}

/// An OCI layout whose one layer is `tar`, compressed as `media_type` says.
fn layout_of_tar(p: &Project, dir: &str, media_type: &str, tar: &[u8], compress: impl Fn(&[u8]) -> Vec<u8>) {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let blob = compress(tar);
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        a => a,
    };
    let config = serde_json::json!({"architecture": arch, "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}})
    .to_string();
    let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config.as_bytes()), "size": config.len()},
        "layers": [{"mediaType": media_type, "digest": sha(&blob), "size": blob.len()}]})
    .to_string();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": sha(manifest.as_bytes()), "size": manifest.len()}]});
    for b in [config.as_bytes(), manifest.as_bytes(), &blob[..]] {
        p.file(&format!("{dir}/blobs/sha256/{}", &sha(b)[7..]), b);
    }
    p.file(&format!("{dir}/index.json"), index.to_string());
    p.file(&format!("{dir}/oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
}

#[test]
fn a_base_with_zstd_layers_builds_on_and_unknown_compressions_are_refused() {
    let p = Project::new();
    layout_with_layer(&p, "zstd-base", "application/vnd.oci.image.layer.v1.tar+zstd", |t| {
        zstd::encode_all(t, 3).unwrap()
    });
    p.recipe("[image]\nname = \"z\"\nbase = \"oci:zstd-base\"\n\n[[step]]\nwrite = \"/etc/motd\"\ncontent = \"z\\n\"\n");
    let r = p.build(&[]);
    r.digest();
    assert_layout_blobs_valid(&p.path("out"));
    let diff = p.kiln(&["diff", "oci:zstd-base", "oci:out"]);
    assert!(diff.stdout.contains("/etc/motd") && !diff.stdout.contains("/etc/hello"), "{}", diff.stdout);

    layout_with_layer(&p, "lz4-base", "application/vnd.oci.image.layer.v1.tar+lz4", |t| t.to_vec());
    p.recipe("[image]\nname = \"z\"\nbase = \"oci:lz4-base\"\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("not supported"), "{}", r.stderr);
}

/// `docker save` names no media types: a zstd layer in a docker-archive is
/// known by its magic number, as gzip is.
#[test]
fn a_docker_archive_with_a_zstd_layer_builds_on() {
    let p = Project::new();
    layout_with_layer(&p, "zstd-base", "application/vnd.oci.image.layer.v1.tar+zstd", |t| {
        zstd::encode_all(t, 3).unwrap()
    });
    // The same blobs as docker's manifest.json lays them out.
    let index: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(p.path("zstd-base/index.json")).unwrap()).unwrap();
    let m_hex = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(p.path(&format!("zstd-base/blobs/sha256/{m_hex}"))).unwrap())
            .unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap()[7..].to_string();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    let docker_manifest = serde_json::json!([{"Config": format!("{config}.json"), "RepoTags": ["z:latest"], "Layers": [format!("{layer}/layer.tar")]}]);
    let mut b = tar::Builder::new(fs::File::create(p.path("z.tar")).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("manifest.json", docker_manifest.to_string().as_bytes());
    add(&format!("{config}.json"), &fs::read(p.path(&format!("zstd-base/blobs/sha256/{config}"))).unwrap());
    add(
        &format!("{layer}/layer.tar"),
        &fs::read(p.path(&format!("zstd-base/blobs/sha256/{layer}"))).unwrap(),
    );
    b.finish().unwrap();
    drop(b);
    p.recipe("[image]\nname = \"z\"\nbase = \"docker-archive:z.tar\"\n\n[[step]]\nwrite = \"/etc/motd\"\ncontent = \"z\\n\"\n");
    p.build(&[]).digest();
}

/// The entries (path, mode) of the top layer of the OCI layout at `dir`.
fn top_layer_modes(dir: &std::path::Path) -> Vec<(String, u32)> {
    let blob = |d: &str| fs::read(dir.join("blobs/sha256").join(&d[7..])).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    let top = blob(layers.last().unwrap()["digest"].as_str().unwrap());
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&top[..]));
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string(),
                e.header().mode().unwrap(),
            )
        })
        .collect()
}

/// A base layer of more entries than one sorting run of its listing holds,
/// out of order, with a folder given twice (first and last): the listing is
/// merged from runs on disk, and the later entry of the folder is the one
/// a step on top sees, as when the layer is extracted.
#[test]
fn a_base_of_many_entries_out_of_order_is_listed_through_runs_on_disk() {
    let p = Project::new();
    let names: Vec<String> = (0..70_000).rev().map(|i| format!("srv/bulk/f{i:05}")).collect();
    let mut entries: Vec<(&str, tar::EntryType, u32, &[u8])> = vec![
        ("srv/", tar::EntryType::Directory, 0o700, b""),
        ("srv/bulk/", tar::EntryType::Directory, 0o755, b""),
    ];
    entries.extend(names.iter().map(|n| (n.as_str(), tar::EntryType::Regular, 0o644, &b""[..])));
    entries.push(("srv/", tar::EntryType::Directory, 0o750, b""));
    layout_of_tar(&p, "big", "application/vnd.oci.image.layer.v1.tar", &tar_of(&entries), |t| t.to_vec());
    p.recipe("[image]\nname = \"big\"\nbase = \"oci:big\"\n\n[[step]]\nwrite = \"/srv/new.txt\"\ncontent = \"n\\n\"\n");
    let first = p.build(&[]).digest();
    let modes = top_layer_modes(&p.path("out"));
    assert!(modes.contains(&("srv".to_string(), 0o750)), "the later `srv/` wins: {modes:?}");
    // The listing read back from the store gives the same answers.
    assert_eq!(p.build(&["--no-cache"]).digest(), first);
    let diff = p.kiln(&["diff", "oci:big", "oci:out"]);
    assert_eq!(diff.stdout.trim(), "+ /srv/new.txt", "{}", diff.stderr);
    // A damaged stored listing is made again from the layer, not misread.
    let listings = p.path("cache/v1/listings");
    let mut damaged = 0;
    for e in fs::read_dir(&listings).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = fs::read(&path).unwrap();
        if bytes.len() > 100_000 {
            let n = bytes.len() / 2; // in the blocks, not the index
            bytes[n] ^= 0xff;
            fs::write(&path, bytes).unwrap();
            damaged += 1;
        }
    }
    assert_eq!(damaged, 1, "the base layer's listing");
    assert_eq!(p.build(&["--no-cache"]).digest(), first);
}

/// An OCI layout of one image per platform (`arch`, content of `/etc/arch`),
/// listed with their platforms in `index.json` itself or, `nested`, in an
/// index that `index.json` names.
fn multi_platform_layout(p: &Project, dir: &str, arches: &[&str], nested: bool) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
    let put = |b: &[u8]| {
        p.file(&format!("{dir}/blobs/sha256/{}", &sha(b)[7..]), b);
        sha(b)
    };
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for arch in arches {
        let tar = tar_of(&[
            ("etc/", tar::EntryType::Directory, 0o755, &b""[..]),
            ("etc/arch", tar::EntryType::Regular, 0o644, arch.as_bytes()),
        ]);
        let layer = put(&tar);
        diff_ids.push(sha(&tar));
        let config = serde_json::json!({"architecture": arch, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": [sha(&tar)]}})
        .to_string();
        let config_d = put(config.as_bytes());
        let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_d, "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": tar.len()}]})
        .to_string();
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(manifest.as_bytes()), "size": manifest.len(),
            "platform": {"os": "linux", "architecture": arch}}));
    }
    let mut index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs});
    if nested {
        let inner = index.to_string();
        index = serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": put(inner.as_bytes()), "size": inner.len(),
            "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    }
    p.file(&format!("{dir}/index.json"), index.to_string());
    p.file(&format!("{dir}/oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#);
    diff_ids
}

/// A base of several platforms gives the build the image for the build's
/// platform (`--platform`, else the recipe's, else the host's), whether the
/// layout lists the platforms itself or under a tag; one it lacks is named.
#[test]
fn a_multi_platform_base_gives_the_image_for_the_build_platform() {
    let p = Project::new();
    let flat = multi_platform_layout(&p, "flat", &["amd64", "arm64"], false);
    let nested = multi_platform_layout(&p, "nested", &["amd64", "arm64"], true);
    for (base, diff_ids) in [("oci:flat", &flat), ("oci:nested:latest", &nested)] {
        p.recipe(&format!(
            "[image]\nname = \"m\"\nbase = \"{base}\"\n\n[[step]]\nwrite = \"/etc/motd\"\ncontent = \"m\\n\"\n"
        ));
        for (platform, want) in [("linux/amd64", &diff_ids[0]), ("linux/arm64", &diff_ids[1])] {
            let out = format!("out-{}", platform.replace('/', "-"));
            p.build(&["--platform", platform, "-o", &format!("oci:{out}")]).digest();
            let index: serde_json::Value =
                serde_json::from_slice(&fs::read(p.path(&out).join("index.json")).unwrap()).unwrap();
            let blob = |d: &str| fs::read(p.path(&out).join("blobs/sha256").join(&d[7..])).unwrap();
            let m: serde_json::Value =
                serde_json::from_slice(&blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
            let c: serde_json::Value =
                serde_json::from_slice(&blob(m["config"]["digest"].as_str().unwrap())).unwrap();
            assert_eq!(&c["rootfs"]["diff_ids"][0], want.as_str(), "{base} for {platform}");
            assert_eq!(c["architecture"], platform.split('/').nth(1).unwrap());
        }
        let r = p.build(&["--platform", "linux/riscv64"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains("no image for linux/riscv64") && r.stderr.contains("linux/arm64"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn plan_columns_line_up_whatever_the_stage_names() {
    let p = Project::new();
    p.recipe(
        "[[stage]]\nname = \"a-rather-long-stage-name\"\n[[stage.step]]\nwrite = \"/a\"\ncontent = \"a\"\n\n\
         [image]\nname = \"x\"\nbase = \"stage:a-rather-long-stage-name\"\n[[step]]\nwrite = \"/b\"\ncontent = \"b\"\n",
    );
    let r = p.kiln(&["plan", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let columns: Vec<usize> = r.stdout.lines().map(|l| l.find("MISS").expect("a MISS column")).collect();
    assert_eq!(columns.len(), 2, "{}", r.stdout);
    assert!(columns.windows(2).all(|w| w[0] == w[1]), "{}", r.stdout);
}
