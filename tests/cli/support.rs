//! A cargo-style project helper: files in a temp folder, a private cache, and
//! a `kiln` runner that captures stdout, stderr and the exit code.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Project {
    pub dir: tempfile::TempDir,
    pub cache: PathBuf,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// The manifest digest: the last stdout line.
    pub fn digest(&self) -> String {
        assert_eq!(self.code, 0, "build failed:\n{}", self.stderr);
        let d = self.stdout.lines().last().unwrap_or("").to_string();
        assert!(d.starts_with("sha256:") && d.len() == 71, "not a digest: {d:?}");
        d
    }

    /// JSON events of `--progress json`.
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stderr.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Each step's `cached` (HIT) from its `step_finished` event, in order.
    pub fn cached(&self) -> Vec<bool> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "step_finished")
            .map(|e| e["cached"].as_bool().unwrap())
            .collect()
    }

    /// The `build_failed` event's message and hint (`--progress json`).
    pub fn failure(&self) -> String {
        let e = self.events().into_iter().rfind(|e| e["event"] == "build_failed");
        let e = e.unwrap_or_else(|| panic!("no build_failed event in:\n{}", self.stderr));
        format!("{}\n  hint: {}", e["message"].as_str().unwrap_or(""), e["hint"].as_str().unwrap_or(""))
    }

    pub fn count(&self, event: &str) -> usize {
        self.events().iter().filter(|e| e["event"] == event).count()
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

pub fn kiln_bin() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

impl Project {
    pub fn new() -> Project {
        let dir = tempfile::Builder::new().prefix("kiln-test-").tempdir().unwrap();
        let cache = dir.path().join("cache");
        Project { dir, cache }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn file(&self, rel: &str, content: impl AsRef<[u8]>) -> &Project {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, content).unwrap();
        self
    }

    pub fn exec_file(&self, rel: &str, content: impl AsRef<[u8]>) -> &Project {
        self.file(rel, content);
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(0o755)).unwrap();
        self
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Project {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
        self
    }

    pub fn recipe(&self, text: &str) -> &Project {
        self.file("kiln.toml", text)
    }

    /// `kiln ARGS` with this project's cache.
    pub fn kiln(&self, args: &[&str]) -> Run {
        self.kiln_with(args, |_| {})
    }

    pub fn kiln_with(&self, args: &[&str], f: impl FnOnce(&mut Command)) -> Run {
        let mut c = self.command(args);
        f(&mut c);
        c.output().unwrap().into()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(kiln_bin());
        c.args(args)
            .current_dir(self.dir.path())
            .env("KILN_CACHE_DIR", &self.cache)
            .env_remove("SOURCE_DATE_EPOCH");
        c
    }

    /// `kiln ARGS --cache-dir CACHE` as `user` (no root), in this project,
    /// which is made writable for it; `CACHE` (a folder of the project) is
    /// the user's.
    pub fn kiln_as(&self, user: &str, cache: &str, args: &[&str], f: impl FnOnce(&mut Command)) -> Run {
        let _ = Command::new("chmod").args(["-R", "a+rwX"]).arg(self.dir.path()).status();
        let cache = self.path(cache);
        fs::create_dir_all(&cache).unwrap();
        assert!(Command::new("chown").args(["-R", user]).arg(&cache).status().unwrap().success());
        let mut c = Command::new("setpriv");
        c.args(["--reuid", user, "--regid", user, "--init-groups", kiln_bin()])
            .args(args)
            .arg("--cache-dir")
            .arg(&cache)
            .env("HOME", self.dir.path())
            .current_dir(self.dir.path());
        f(&mut c);
        c.output().unwrap().into()
    }

    /// `kiln build kiln.toml -o oci:out --cache-dir CACHE` on a terminal
    /// (`script`'s): its exit code and what the terminal showed.
    pub fn build_on_a_terminal(&self, cache: &Path) -> (Option<i32>, String) {
        let cmd = format!("{} build kiln.toml -o oci:out --cache-dir {} 2>&1", kiln_bin(), cache.display());
        let out = Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .current_dir(self.path(""))
            .env("TERM", "xterm")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kiln build kiln.toml -o oci:out --progress json ARGS`.
    pub fn build(&self, extra: &[&str]) -> Run {
        let mut args = vec!["build", "kiln.toml", "--progress", "json"];
        if !extra.contains(&"-o") {
            args.extend(["-o", "oci:out"]);
        }
        args.extend(extra);
        self.kiln(&args)
    }
}

/// A tool a test needs. Missing on a developer's machine: the test is
/// skipped with a note. Missing in CI (`CI` set): the test fails.
pub fn require(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("`{tool}` is required in CI (.ci/run installs it)");
        }
        eprintln!("SKIPPED: `{tool}` is not installed (run `make deps`)");
    }
    ok
}

/// Whether a Docker engine answers; in CI it must.
pub fn require_docker() -> bool {
    if !require("docker") {
        return false;
    }
    let ok = Command::new("docker").arg("info").output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("no Docker engine answers at DOCKER_HOST; .ci/run starts dockerd");
        }
        eprintln!("SKIPPED: no Docker engine is running (run `make deps`)");
    }
    ok
}

/// Whether the Debian mirror of the host's apt sources answers (the `[packages]` examples need it); in CI it must.
pub fn debian_mirror() -> bool {
    let ok = host_debian_mirror().is_some_and(|m| {
        Command::new("curl")
            .args(["-sf", "-o", "/dev/null", "--max-time", "20"])
            .arg(format!("{m}/dists/bookworm/InRelease"))
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!(
                "the Debian mirror of the host's apt sources is unreachable; the [packages] examples need it"
            );
        }
        eprintln!("SKIPPED: no reachable Debian mirror in the host's apt sources");
    }
    ok
}

/// The main Debian archive the host's apt sources name (a URI ending in
/// `/debian`), as kiln finds it.
pub fn host_debian_mirror() -> Option<String> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files.iter().filter_map(|f| std::fs::read_to_string(f).ok()).find_map(|text| {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .map(|w| w.trim_end_matches('/'))
            .find(|w| (w.starts_with("http://") || w.starts_with("https://")) && w.ends_with("/debian"))
            .map(str::to_string)
    })
}

/// Whether the tests run as root (the local backend needs it); in CI they must.
pub fn require_root() -> bool {
    let ok = Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("the run-step tests need root in CI (the local backend uses namespaces and overlayfs)");
        }
        eprintln!("SKIPPED: not root, so the local backend cannot run");
    }
    ok
}

/// The user `.ci/deps` makes for rootless runs (subordinate ids, newuidmap); in CI it must exist.
pub fn rootless_user() -> Option<&'static str> {
    let user = "kiln-rootless";
    let has_user = Command::new("id").arg(user).output().map(|o| o.status.success()).unwrap_or(false);
    let has_ids = std::fs::read_to_string("/etc/subuid")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("kiln-rootless:")));
    if has_user && has_ids && require("newuidmap") {
        return Some(user);
    }
    if std::env::var_os("CI").is_some() {
        panic!("the user `{user}` with subordinate ids is required in CI (.ci/deps makes it)");
    }
    eprintln!("SKIPPED: no user `{user}` with subordinate ids (run `make deps`)");
    None
}

/// Static busybox (Debian's busybox-static), for images that run something.
pub fn busybox() -> Option<PathBuf> {
    let p = Path::new("/bin/busybox");
    if p.exists() {
        return Some(p.to_path_buf());
    }
    if std::env::var_os("CI").is_some() {
        panic!("/bin/busybox is required in CI (busybox-static)");
    }
    eprintln!("SKIPPED: /bin/busybox is missing (apt-get install busybox-static)");
    None
}

/// Every blob of an OCI layout hashes to its name.
pub fn assert_layout_blobs_valid(dir: &Path) {
    use sha2::Digest;
    let blobs = dir.join("blobs/sha256");
    let mut n = 0;
    for e in fs::read_dir(&blobs).unwrap() {
        let e = e.unwrap();
        let bytes = fs::read(e.path()).unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            e.file_name().to_string_lossy(),
            "blob {:?} is corrupt",
            e.path()
        );
        n += 1;
    }
    assert!(n >= 2, "a layout holds at least a manifest and a config");
}

/// Random-ish bytes from a fixed seed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A raw tar entry: name bytes, type flag, link target bytes.
pub type RawEntry<'a> = (&'a [u8], u8, &'a [u8]);

/// An OCI archive whose only layer holds `entries` (files hold `evil`).
pub fn hostile_archive(p: &Project, file: &str, entries: &[RawEntry]) {
    use sha2::Digest;
    let mut tar_bytes = Vec::new();
    for (name, kind, link) in entries {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(if *kind == b'0' { 4 } else { 0 });
        h.set_cksum();
        tar_bytes.extend_from_slice(h.as_bytes());
        if *kind == b'0' {
            let mut block = [0u8; 512];
            block[..4].copy_from_slice(b"evil");
            tar_bytes.extend_from_slice(&block);
        }
    }
    tar_bytes.extend_from_slice(&[0u8; 1024]);
    let diff_id = hex::encode(sha2::Sha256::digest(&tar_bytes));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar_bytes).unwrap();
    let layer = gz.finish().unwrap();
    let layer_d = hex::encode(sha2::Sha256::digest(&layer));
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id}"]}},"config":{{}}}}"#
    );
    let config_d = hex::encode(sha2::Sha256::digest(config.as_bytes()));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{config_d}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{layer_d}","size":{}}}]}}"#,
        config.len(),
        layer.len()
    );
    let manifest_d = hex::encode(sha2::Sha256::digest(manifest.as_bytes()));
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{manifest_d}","size":{}}}]}}"#,
        manifest.len()
    );
    let mut b = tar::Builder::new(std::fs::File::create(p.path(file)).unwrap());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.as_bytes());
    add(&format!("blobs/sha256/{manifest_d}"), manifest.as_bytes());
    add(&format!("blobs/sha256/{config_d}"), config.as_bytes());
    add(&format!("blobs/sha256/{layer_d}"), &layer);
    b.finish().unwrap();
}

/// Every file of the image's layers, merged: path → (kind char, content or link target).
pub fn image_files(layout: &Path) -> std::collections::BTreeMap<String, (char, Vec<u8>)> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let mut out = std::collections::BTreeMap::new();
    for l in manifest["layers"].as_array().unwrap() {
        let f = fs::File::open(blob(l["digest"].as_str().unwrap())).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(f));
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
            let kind = e.header().entry_type().as_byte() as char;
            let mut data = Vec::new();
            if kind == '2' {
                data = e.link_name_bytes().unwrap().into_owned();
            } else {
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            }
            out.insert(path, (kind, data));
        }
    }
    out
}
