//! Registries: push, `registry:` bases, the remote step cache, auth, and
//! transfers cut off in the middle. Each test starts its own Debian
//! `docker-registry` (distribution 2.8) on 127.0.0.1.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

/// A distribution registry on a free loopback port, killed on drop.
pub(crate) struct TestRegistry {
    dir: tempfile::TempDir,
    port: u16,
    child: Arc<Mutex<Option<Child>>>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestRegistry {
    /// `None` (test skipped) without `docker-registry`, except in CI.
    pub(crate) fn start(htpasswd: Option<(&str, &str)>) -> Option<TestRegistry> {
        Self::start_with(htpasswd, None)
    }

    /// `token`: the `auth: token:` section's body (bearer tokens from a token server).
    fn start_with(htpasswd: Option<(&str, &str)>, token: Option<String>) -> Option<TestRegistry> {
        if !require("docker-registry") {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("kiln-registry-").tempdir().unwrap();
        let port = free_port();
        let mut auth = String::new();
        if let Some(t) = token {
            auth = format!("auth:\n  token:\n{t}");
        }
        if let Some((user, password)) = htpasswd {
            assert!(require("htpasswd"), "htpasswd (apache2-utils) is needed for the auth test");
            let o = Command::new("htpasswd").args(["-Bbn", user, password]).output().unwrap();
            assert!(o.status.success());
            fs::write(dir.path().join("htpasswd"), &o.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
        }
        fs::write(
            dir.path().join("config.yml"),
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let r = TestRegistry { dir, port, child: Arc::new(Mutex::new(None)) };
        r.restart();
        Some(r)
    }

    /// Starts the registry (again), on the same port and storage.
    fn restart(&self) {
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.path().join("log")).unwrap())
            .spawn()
            .unwrap();
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Where the registry stores blobs and manifests.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(crate) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        kill(&self.child);
    }
}

fn kill(child: &Mutex<Option<Child>>) {
    if let Some(mut c) = child.lock().unwrap().take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A TCP proxy in front of a registry that, once `cut_after` bytes have
/// gone through it (either way), drops every connection and (`kill`)
/// stops the registry: the registry dying in the middle of a transfer, or
/// (without `kill`) a connection reset once.
struct Proxy {
    port: u16,
    armed: Arc<AtomicBool>,
    tripped: Arc<AtomicBool>,
}

impl Proxy {
    fn start(reg: &TestRegistry, cut_after: u64, kill_registry: bool) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = reg.port;
        let armed = Arc::new(AtomicBool::new(true));
        let tripped = Arc::new(AtomicBool::new(false));
        let moved = Arc::new(AtomicU64::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let child = reg.child.clone();
        let (a, t) = (armed.clone(), tripped.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                conns.lock().unwrap().push(client.try_clone().unwrap());
                conns.lock().unwrap().push(server.try_clone().unwrap());
                for (mut from, mut to) in
                    [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let (a, t, moved, conns, child) =
                        (a.clone(), t.clone(), moved.clone(), conns.clone(), child.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            let total = moved.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                            if a.load(Ordering::SeqCst)
                                && total > cut_after
                                && !t.swap(true, Ordering::SeqCst)
                            {
                                if kill_registry {
                                    kill(&child);
                                } else {
                                    a.store(false, Ordering::SeqCst); // once
                                }
                                for c in conns.lock().unwrap().iter() {
                                    let _ = c.shutdown(Shutdown::Both);
                                }
                            }
                        }
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Proxy { port, armed, tripped }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// From now on, forward without cutting.
    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }
}

/// kiln with no credentials from the machine: HOME is the project, and
/// neither KILN_REGISTRY_AUTH nor DOCKER_CONFIG leaks in.
fn isolated(p: &Project, args: &[&str]) -> Run {
    p.kiln_with(args, |c| {
        c.env("HOME", p.dir.path()).env_remove("KILN_REGISTRY_AUTH").env_remove("DOCKER_CONFIG");
    })
}

/// An image that runs: busybox and an entrypoint printing `msg`.
fn app(msg: &str) -> Option<Project> {
    let busybox = busybox()?;
    let p = Project::new();
    p.recipe(&format!(
        r#"
[image]
name = "app"

[[step]]
copy = "busybox"
to = "/bin/busybox"
mode = "0755"

[[step]]
write = "/msg"
content = "{msg}\n"

[config]
entrypoint = ["/bin/busybox", "cat", "/msg"]
"#
    ));
    fs::copy(busybox, p.path("busybox")).unwrap();
    Some(p)
}

/// `PUT` of a manifest (`body`, of `media_type`) to a registry URL, with curl.
fn put_manifest(url: &str, media_type: &str, body: &str) -> std::process::Output {
    Command::new("curl")
        .args(["-sf", "-X", "PUT", "-H", &format!("Content-Type: {media_type}"), "--data-binary", body, url])
        .output()
        .unwrap()
}

fn layout_layers(dir: &std::path::Path) -> Vec<String> {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap().trim_start_matches("sha256:").to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("blobs/sha256").join(m)).unwrap()).unwrap();
    manifest["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

fn store_blobs(cache: &std::path::Path) -> Vec<String> {
    match fs::read_dir(cache.join("v1/blobs/sha256")) {
        Ok(d) => d.flatten().map(|e| format!("sha256:{}", e.file_name().to_string_lossy())).collect(),
        Err(_) => Vec::new(),
    }
}

fn tmp_entries(cache: &std::path::Path) -> Vec<PathBuf> {
    match fs::read_dir(cache.join("v1/tmp")) {
        Ok(d) => d.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn a_pushed_image_is_read_by_skopeo_and_docker_and_builds_on_as_a_base() {
    let Some(reg) = TestRegistry::start(None) else { return };
    let Some(p) = app("hello from the registry") else { return };
    let host = reg.host();
    let target = format!("{host}/kiln/app:v1");
    let pushed = isolated(&p, &["build", "kiln.toml", "-o", &format!("registry:{target}")]);
    let digest = pushed.digest();
    assert!(pushed.stderr.contains(&format!("pushed {target}@{digest}")), "{}", pushed.stderr);

    if require("skopeo") {
        let o = Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", &format!("docker://{target}")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["Digest"], digest.as_str());
    }

    // A second push sends no layer: the registry has them.
    let again =
        isolated(&p, &["build", "kiln.toml", "-o", &format!("registry:{target}"), "--progress", "json"]);
    assert_eq!(again.digest(), digest);
    assert!(again.events().iter().all(|e| e["event"] != "blob"), "{}", again.stderr);

    // One request per blob, for registries that refuse chunked uploads.
    let mono = Project::new();
    fs::copy(p.path("kiln.toml"), mono.path("kiln.toml")).unwrap();
    fs::copy(p.path("busybox"), mono.path("busybox")).unwrap();
    let target2 = format!("{host}/kiln/mono:v1");
    let r = isolated(
        &mono,
        &[
            "build",
            "kiln.toml",
            "-o",
            &format!("registry:{target2}"),
            "--monolithic-upload",
            "--progress",
            "json",
        ],
    );
    assert_eq!(r.digest(), digest);
    assert!(r.events().iter().any(|e| e["event"] == "blob" && e["action"] == "pushed"), "{}", r.stderr);
    if require("skopeo") {
        let o = Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", &format!("docker://{target2}")])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    // `kiln inspect` reads it from the registry.
    let inspected = isolated(&p, &["inspect", &format!("registry:{target}"), "--json"]);
    assert_eq!(inspected.code, 0, "{}", inspected.stderr);
    let v: serde_json::Value = serde_json::from_str(&inspected.stdout).unwrap();
    assert_eq!(v["manifest"], digest.as_str());

    // Deleted locally: a fresh cache, another folder. The base is pulled and checked.
    let b = Project::new();
    b.recipe(&format!("[image]\nname = \"app\"\nbase = \"registry:{target}\"\n"));
    let built = isolated(&b, &["build", "kiln.toml", "-o", "oci:out", "--progress", "json"]);
    assert_eq!(built.digest(), digest, "no steps on the same image: the same manifest");
    assert!(built.stderr.contains("is not pinned in kiln.lock"), "{}", built.stderr);
    let pulled: Vec<String> = built
        .events()
        .iter()
        .filter(|e| e["event"] == "blob" && e["action"] == "pulled")
        .map(|e| e["digest"].as_str().unwrap().to_string())
        .collect();
    for l in layout_layers(&b.path("out")) {
        assert!(pulled.contains(&l), "layer {l} was pulled: {pulled:?}");
    }

    // Pinned by `kiln lock`, the tag moving does not move the build.
    assert_eq!(isolated(&b, &["lock", "kiln.toml"]).code, 0);
    let lock = fs::read_to_string(b.path("kiln.lock")).unwrap();
    assert!(lock.contains(&digest), "{lock}");
    let Some(other) = app("another image") else { return };
    let moved = isolated(&other, &["build", "kiln.toml", "-o", &format!("registry:{target}")]).digest();
    assert_ne!(moved, digest);
    let pinned = isolated(&b, &["build", "kiln.toml", "-o", "oci:out"]);
    assert_eq!(pinned.digest(), digest);
    assert!(pinned.stderr.contains("has moved"), "{}", pinned.stderr);
    assert!(pinned.stderr.contains(&moved), "the new digest is named: {}", pinned.stderr);

    // A multi-platform index: the build platform's image is picked.
    if require("curl") {
        let raw = |d: &str| {
            let o = Command::new("curl")
                .args(["-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
                .arg(format!("http://{host}/v2/kiln/app/manifests/{d}"))
                .output()
                .unwrap();
            assert!(o.status.success());
            o.stdout.len()
        };
        let host_arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let other_arch = if host_arch == "amd64" { "arm64" } else { "amd64" };
        let entry = |d: &str, arch: &str| {
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": raw(d),
                "platform": {"os": "linux", "architecture": arch}})
        };
        let index = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [entry(&digest, other_arch), entry(&moved, host_arch)]});
        let put = put_manifest(
            &format!("http://{host}/v2/kiln/app/manifests/multi"),
            "application/vnd.oci.image.index.v1+json",
            &index.to_string(),
        );
        assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
        let m = Project::new();
        m.recipe(&format!("[image]\nname = \"app\"\nbase = \"registry:{host}/kiln/app:multi\"\n"));
        assert_eq!(isolated(&m, &["build", "kiln.toml"]).digest(), moved, "the {host_arch} entry");
    }

    // By digest, with no pin needed.
    let c = Project::new();
    c.recipe(&format!("[image]\nname = \"app\"\nbase = \"registry:{host}/kiln/app@{digest}\"\n"));
    assert_eq!(isolated(&c, &["build", "kiln.toml", "-o", "oci:out"]).digest(), digest);

    // Pushed to another repository of the same registry: the base's layers are mounted, not sent.
    let copy = format!("registry:{host}/kiln/copy:v1");
    let mounted = isolated(&c, &["build", "kiln.toml", "-o", &copy, "--progress", "json"]);
    assert_eq!(mounted.digest(), digest);
    let actions = |what: &str| -> Vec<String> {
        mounted
            .events()
            .iter()
            .filter(|e| e["event"] == "blob" && e["action"] == what)
            .map(|e| e["digest"].as_str().unwrap().to_string())
            .collect()
    };
    let mut layers = layout_layers(&c.path("out"));
    let mut got = actions("mounted");
    layers.sort();
    got.sort();
    assert_eq!(got, layers, "{}", mounted.stderr);
    assert!(actions("pushed").iter().all(|d| !layers.contains(d)), "no layer uploaded");

    // A base that is not there: exit 2 at the recipe's line.
    let d = Project::new();
    d.recipe(&format!("[image]\nname = \"x\"\nbase = \"registry:{host}/kiln/nothing:v1\"\n"));
    let missing = isolated(&d, &["build", "kiln.toml"]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(missing.stderr.contains("kiln.toml:3"), "{}", missing.stderr);

    if require_docker() {
        let pull = Command::new("docker").args(["pull", &target]).output().unwrap();
        assert!(pull.status.success(), "{}", String::from_utf8_lossy(&pull.stderr));
        let run = Command::new("docker").args(["run", "--rm", &target]).output().unwrap();
        let _ = Command::new("docker").args(["rmi", "-f", &target]).output();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        assert_eq!(String::from_utf8_lossy(&run.stdout), "another image\n");
    }

    // With the registry gone, the pinned base in the store still builds, at once.
    kill(&reg.child);
    let offline = isolated(&b, &["build", "kiln.toml", "-o", "oci:out"]);
    assert_eq!(offline.digest(), digest);
    assert!(offline.stderr.contains("cannot check whether"), "{}", offline.stderr);
    assert!(!offline.stderr.contains("tried"), "the tag check is not retried: {}", offline.stderr);
}

#[test]
fn bad_registry_references_are_refused_before_building() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    let r = p.kiln(&["build", "kiln.toml", "-o", "registry:reg.example/UPPER:v1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("Bad -o") && !r.stderr.contains("WRITE"), "{}", r.stderr);
    let r = p.kiln(&["build", "kiln.toml", "--cache-from", "oci:cache"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("registry:HOST/REPO"), "{}", r.stderr);
    p.recipe("[image]\nname = \"x\"\nbase = \"registry:reg.example/UPPER:v1\"\n");
    let r = p.kiln(&["build", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln.toml:3"), "the base's line: {}", r.stderr);
}

/// Two stages (one of them only copied from) and `run` steps that print
/// a marker, so a step that runs shows in the output.
fn fleet_project() -> Option<Project> {
    let busybox = busybox()?;
    let p = Project::new();
    p.recipe(
        r#"
[[stage]]
name = "tools"

[[stage.step]]
copy = "busybox"
to = "/bin/busybox"
mode = "0755"

[[stage.step]]
run = ["/bin/busybox", "sh", "-c", "echo STEP-$((40+2)); /bin/busybox mkdir -p /out; /bin/busybox head -c 300000 /dev/urandom > /out/scratch; echo made > /out/made"]

[image]
name = "fleet"

[[step]]
copy = "busybox"
to = "/bin/busybox"
mode = "0755"

[[step]]
copy = "/out/made"
from = "tools"
to = "/made"

[[step]]
run = ["/bin/busybox", "sh", "-c", "echo STEP-$((40+2)); echo final > /final"]
"#,
    );
    fs::copy(busybox, p.path("busybox")).unwrap();
    Some(p)
}

#[test]
fn a_fresh_runner_gets_every_step_from_the_registry_cache_and_only_the_final_layers() {
    if !require_root() {
        return;
    }
    let Some(reg) = TestRegistry::start(None) else { return };
    let Some(a) = fleet_project() else { return };
    let Some(b) = fleet_project() else { return };
    let cache = format!("registry:{}/kiln/cache", reg.host());

    let ra =
        isolated(&a, &["build", "kiln.toml", "-o", "oci:out", "--progress", "json", "--cache-to", &cache]);
    let da = ra.digest();
    assert!(ra.stderr.contains("STEP-42"), "runner A runs the steps");

    // `plan` with the cache: every step a HIT, nothing built.
    let planned = isolated(&b, &["plan", "kiln.toml", "--json", "--cache-from", &cache]);
    let steps: serde_json::Value = serde_json::from_str(&planned.stdout).unwrap();
    assert!(steps.as_array().unwrap().iter().all(|s| s["cached"] == true), "{}", planned.stdout);

    // Runner B: another folder, a fresh cache.
    let rb =
        isolated(&b, &["build", "kiln.toml", "-o", "oci:out", "--progress", "json", "--cache-from", &cache]);
    assert_eq!(rb.digest(), da);
    assert!(!rb.stderr.contains("STEP-42"), "no run command executed: {}", rb.stderr);
    assert_eq!(rb.count("output"), 0);
    let finished: Vec<_> = rb.events().into_iter().filter(|e| e["event"] == "step_finished").collect();
    assert_eq!(finished.len(), 5);
    assert!(finished.iter().all(|e| e["cached"] == true), "every step HIT: {}", rb.stderr);

    // Downloaded: the final image's layers, once each; not the stage's own layer.
    let mut pulled: Vec<String> = rb
        .events()
        .iter()
        .filter(|e| e["event"] == "blob" && e["action"] == "pulled")
        .map(|e| e["digest"].as_str().unwrap().to_string())
        .collect();
    pulled.sort();
    let mut want = layout_layers(&b.path("out"));
    want.sort();
    assert_eq!(pulled, want, "{}", rb.stderr);

    // B's next build is all local; `plan` agrees.
    let again = isolated(&b, &["build", "kiln.toml", "-o", "oci:out", "--progress", "json"]);
    assert_eq!(again.digest(), da);
    assert_eq!(again.count("blob"), 0);

    // Relayed to a second registry by a runner that has nothing local: the layers it never
    // needed (the stage's) are fetched to be pushed, and a runner there gets every step.
    if let Some(reg2) = TestRegistry::start(None) {
        let cache2 = format!("registry:{}/kiln/cache", reg2.host());
        let d = fleet_project().unwrap();
        let rd = isolated(&d, &["build", "kiln.toml", "--cache-from", &cache, "--cache-to", &cache2]);
        assert_eq!(rd.digest(), da);
        let e = fleet_project().unwrap();
        let re = isolated(&e, &["build", "kiln.toml", "--progress", "json", "--cache-from", &cache2]);
        assert_eq!(re.digest(), da);
        assert_eq!(re.count("output"), 0, "{}", re.stderr);
        let plan =
            isolated(&e, &["plan", "kiln.toml", "--json", "--cache-dir", "fresh", "--cache-from", &cache2]);
        let steps: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap();
        assert!(steps.as_array().unwrap().iter().all(|s| s["cached"] == true), "{}", plan.stdout);
    }

    // A cache index whose layers do not match what it claims is refused, and nothing of it kept.
    if require("curl") {
        // The builds pushed writer tags; a prune compacts them into `kiln-cache`.
        let pruned = isolated(&b, &["cache", "prune", "--remote", &cache, "--older-than", "1d"]);
        assert_eq!(pruned.code, 0, "{}", pruned.stderr);
        let url = format!("http://{}/v2/kiln/cache/manifests", reg.host());
        let o = Command::new("curl")
            .args(["-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json"])
            .arg(format!("{url}/kiln-cache"))
            .output()
            .unwrap();
        assert!(o.status.success());
        let mut index: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let wrong = format!("sha256:{}", "0".repeat(64));
        for l in index["layers"].as_array_mut().unwrap() {
            l["annotations"]["dev.kiln.cache.diff-id"] = serde_json::json!(wrong);
        }
        let put = put_manifest(
            &format!("{url}/tampered"),
            "application/vnd.oci.image.manifest.v1+json",
            &index.to_string(),
        );
        assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
        let t = fleet_project().unwrap();
        let rt = isolated(&t, &["build", "kiln.toml", "--cache-from", &format!("{cache}:tampered")]);
        assert_eq!(rt.code, 2, "{}", rt.stderr);
        assert!(rt.stderr.contains("is refused"), "{}", rt.stderr);
        for l in layout_layers(&b.path("out")) {
            assert!(!store_blobs(&t.cache).contains(&l), "{l} was not kept");
        }

        // The same lie (each layer named with another's diff_id) to a runner
        // whose store already holds every blob (other builds' layers) but no
        // step record: nothing is downloaded, and the index's diff_ids are
        // still checked before a step record takes them (a record `--no-cache`
        // would trust later).
        let mut rotated: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let layers = rotated["layers"].as_array_mut().unwrap();
        assert!(layers.len() >= 2);
        let ids: Vec<serde_json::Value> =
            layers.iter().map(|l| l["annotations"]["dev.kiln.cache.diff-id"].clone()).collect();
        for (i, l) in layers.iter_mut().enumerate() {
            l["annotations"]["dev.kiln.cache.diff-id"] = ids[(i + 1) % ids.len()].clone();
        }
        let put = put_manifest(
            &format!("{url}/rotated"),
            "application/vnd.oci.image.manifest.v1+json",
            &rotated.to_string(),
        );
        assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
        let w = fleet_project().unwrap();
        assert_eq!(isolated(&w, &["build", "kiln.toml", "--cache-from", &cache]).code, 0);
        for e in fs::read_dir(w.cache.join("v1/steps")).unwrap() {
            fs::remove_file(e.unwrap().path()).unwrap();
        }
        let lied = isolated(&w, &["build", "kiln.toml", "--cache-from", &format!("{cache}:rotated")]);
        assert_eq!(lied.code, 2, "{}", lied.stderr);
        assert!(lied.stderr.contains("is refused"), "{}", lied.stderr);
    }

    // A cache that cannot be reached is a note, not a failure.
    let c = fleet_project().unwrap();
    let down = format!("registry:127.0.0.1:{}/kiln/cache", free_port());
    let rc = isolated(&c, &["build", "kiln.toml", "-o", "oci:out", "--cache-from", &down]);
    assert_eq!(rc.digest(), da);
    assert!(rc.stderr.contains("building without it"), "{}", rc.stderr);
}

#[test]
fn credentials_are_checked_named_in_errors_and_never_printed() {
    let password = "Kiln-S3cret-pa55word";
    let Some(reg) = TestRegistry::start(Some(("ci", password))) else { return };
    let Some(p) = app("auth") else { return };
    let host = reg.host();
    let out = format!("registry:{host}/kiln/auth:v1");

    let anonymous = isolated(&p, &["build", "kiln.toml", "-o", &out]);
    assert_eq!(anonymous.code, 3, "{}", anonymous.stderr);
    assert!(
        anonymous.stderr.contains(&format!("registry {host} refused anonymous access")),
        "{}",
        anonymous.stderr
    );

    let wrong = format!(r#"{{"auths": {{"{host}": {{"username": "ci", "password": "not-{password}"}}}}}}"#);
    let refused = p.kiln_with(&["build", "kiln.toml", "-o", &out, "--progress", "json"], |c| {
        c.env("HOME", p.dir.path()).env("KILN_REGISTRY_AUTH", &wrong).env("KILN_LOG", "debug");
    });
    assert_eq!(refused.code, 3, "{}", refused.stderr);
    // Found before the build, not at the push (issue 18).
    assert_eq!(refused.count("step_started"), 0, "{}", refused.stderr);
    assert!(
        refused.stderr.contains(&format!(
            "registry {host} refused the credentials of user `ci` from KILN_REGISTRY_AUTH"
        )),
        "{}",
        refused.stderr
    );
    assert!(!refused.stderr.contains(password) && !refused.stdout.contains(password));

    // The right ones, from ~/.docker/config.json (the `auth` form).
    let auth =
        Command::new("sh").arg("-c").arg(format!("printf 'ci:{password}' | base64 -w0")).output().unwrap();
    let auth = String::from_utf8(auth.stdout).unwrap();
    p.file(".docker/config.json", format!(r#"{{"auths": {{"http://{host}": {{"auth": "{auth}"}}}}}}"#));
    let ok = p.kiln_with(&["build", "kiln.toml", "-o", &out, "--progress", "json"], |c| {
        c.env("HOME", p.dir.path())
            .env_remove("KILN_REGISTRY_AUTH")
            .env_remove("DOCKER_CONFIG")
            .env("KILN_LOG", "debug");
    });
    let digest = ok.digest();
    assert!(!ok.stderr.contains(password) && !ok.stdout.contains(password) && !ok.stderr.contains(&auth));

    // A credential helper named in the config.
    p.exec_file(
        "helpers/docker-credential-kilntest",
        format!("#!/bin/sh\nread host\necho '{{\"ServerURL\":\"'$host'\",\"Username\":\"ci\",\"Secret\":\"{password}\"}}'\n"),
    );
    p.file(".docker/config.json", format!(r#"{{"credHelpers": {{"{host}": "kilntest"}}}}"#));
    let b = Project::new();
    b.recipe(&format!("[image]\nname = \"app\"\nbase = \"registry:{host}/kiln/auth:v1\"\n"));
    let path = format!("{}:{}", p.path("helpers").display(), std::env::var("PATH").unwrap_or_default());
    let pulled = b.kiln_with(&["build", "kiln.toml"], |c| {
        c.env("HOME", p.dir.path()).env_remove("KILN_REGISTRY_AUTH").env("PATH", &path);
    });
    assert_eq!(pulled.digest(), digest);
    assert!(!pulled.stderr.contains(password));
}

/// base64url without padding, for the JWTs below.
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A token server as distribution's `auth: token` expects: it checks HTTP
/// basic credentials and answers with a JWT (RS256, the signing
/// certificate in `x5c`) granting the requested scope.
struct TokenServer {
    port: u16,
    dir: tempfile::TempDir,
}

impl TokenServer {
    fn start(user: &'static str, password: &'static str) -> Option<TokenServer> {
        if !require("openssl") {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("kiln-token-").tempdir().unwrap();
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=kiln-test-token",
            ])
            .arg("-keyout")
            .arg(dir.path().join("key.pem"))
            .arg("-out")
            .arg(dir.path().join("cert.pem"))
            .output()
            .unwrap();
        assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(dir.path().join("cert.pem"))
            .output()
            .unwrap()
            .stdout;
        // x5c is standard base64 (with padding), not base64url.
        let x5c = {
            let u = b64url(&der).replace('-', "+").replace('_', "/");
            let pad = (4 - u.len() % 4) % 4;
            u + &"=".repeat(pad)
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let key = dir.path().join("key.pem");
        let expected = format!("Basic {}", {
            let u = b64url(format!("{user}:{password}").as_bytes()).replace('-', "+").replace('_', "/");
            let pad = (4 - u.len() % 4) % 4;
            u + &"=".repeat(pad)
        });
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let authorized = head.lines().any(|l| {
                    l.split_once(':')
                        .is_some_and(|(k, v)| k.eq_ignore_ascii_case("authorization") && v.trim() == expected)
                });
                if !authorized {
                    let body = r#"{"details":"wrong user or password"}"#;
                    let _ = write!(conn, "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    continue;
                }
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
                let mut access = Vec::new();
                for (k, v) in query.split('&').filter_map(|kv| kv.split_once('=')) {
                    if k == "scope" {
                        let v = v.replace("%3A", ":").replace("%2F", "/").replace("%2C", ",");
                        let parts: Vec<&str> = v.splitn(3, ':').collect();
                        if let [kind, name, actions] = parts[..] {
                            access.push(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}));
                        }
                    }
                }
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [x5c]});
                let claims = serde_json::json!({
                    "iss": "kiln-test-issuer", "sub": user, "aud": "kiln-test", "exp": now + 600,
                    "nbf": now - 60, "iat": now - 60, "jti": format!("{now}-{port}-{}", access.len()), "access": access,
                });
                let signing_input = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut sign = Command::new("openssl")
                    .args(["dgst", "-sha256", "-sign"])
                    .arg(&key)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                sign.stdin.take().unwrap().write_all(signing_input.as_bytes()).unwrap();
                let sig = sign.wait_with_output().unwrap().stdout;
                let body = serde_json::json!({"token": format!("{signing_input}.{}", b64url(&sig)), "expires_in": 600}).to_string();
                let _ = write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            }
        });
        Some(TokenServer { port, dir })
    }

    /// The registry's `auth: token:` settings for this server.
    fn registry_config(&self) -> String {
        format!(
            "    realm: http://127.0.0.1:{}/token\n    service: kiln-test\n    issuer: kiln-test-issuer\n    rootcertbundle: {}\n",
            self.port,
            self.dir.path().join("cert.pem").display()
        )
    }
}

#[test]
fn bearer_tokens_are_exchanged_at_the_registrys_token_server() {
    let password = "T0ken-pa55word";
    let Some(tokens) = TokenServer::start("ci", "T0ken-pa55word") else { return };
    let Some(reg) = TestRegistry::start_with(None, Some(tokens.registry_config())) else { return };
    let Some(p) = app("bearer") else { return };
    let out = format!("registry:{}/kiln/bearer:v1", reg.host());

    let anonymous = isolated(&p, &["build", "kiln.toml", "-o", &out]);
    assert_eq!(anonymous.code, 3, "{}", anonymous.stderr);
    assert!(anonymous.stderr.contains("refused anonymous access"), "{}", anonymous.stderr);

    let with =
        |pw: &str| format!(r#"{{"auths": {{"{}": {{"username": "ci", "password": "{pw}"}}}}}}"#, reg.host());
    let wrong = p.kiln_with(&["build", "kiln.toml", "-o", &out], |c| {
        c.env("HOME", p.dir.path()).env("KILN_REGISTRY_AUTH", with("nope"));
    });
    assert_eq!(wrong.code, 3, "{}", wrong.stderr);
    assert!(wrong.stderr.contains("at its token server"), "{}", wrong.stderr);

    let ok = p.kiln_with(&["build", "kiln.toml", "-o", &out], |c| {
        c.env("HOME", p.dir.path()).env("KILN_REGISTRY_AUTH", with(password));
    });
    let digest = ok.digest();
    assert!(!ok.stderr.contains(password));
    let b = Project::new();
    b.recipe(&format!("[image]\nname = \"app\"\nbase = \"{out}\"\n"));
    let pulled = b.kiln_with(&["build", "kiln.toml"], |c| {
        c.env("HOME", b.dir.path()).env("KILN_REGISTRY_AUTH", with(password));
    });
    assert_eq!(pulled.digest(), digest);
}

/// A big incompressible layer, so a transfer takes many packets.
fn big_project() -> Project {
    let p = Project::new();
    p.recipe("[image]\nname = \"big\"\n\n[[step]]\ncopy = \"blob\"\nto = \"/blob\"\n");
    p.file("blob", noise(7, 24 << 20));
    p
}

#[test]
fn a_registry_that_dies_mid_transfer_leaves_nothing_behind_and_the_retry_works() {
    let Some(reg) = TestRegistry::start(None) else { return };
    let p = big_project();

    // Push through a proxy that stops the registry after 4 MB.
    let proxy = Proxy::start(&reg, 4 << 20, true);
    let target = format!("registry:{}/kiln/big:v1", proxy.host());
    let cut = isolated(&p, &["build", "kiln.toml", "-o", &target]);
    assert!(proxy.tripped.load(Ordering::SeqCst), "the registry was stopped mid-push");
    assert_eq!(cut.code, 3, "{}", cut.stderr);
    assert!(cut.stderr.contains(&format!("registry {}", proxy.host())), "{}", cut.stderr);
    reg.restart();
    proxy.disarm();
    let digest = isolated(&p, &["build", "kiln.toml", "-o", &target, "-o", "oci:out"]).digest();

    // Pull into a fresh cache through a new proxy that stops it again.
    let proxy = Proxy::start(&reg, 4 << 20, true);
    let b = Project::new();
    b.recipe(&format!("[image]\nname = \"big\"\nbase = \"registry:{}/kiln/big:v1\"\n", proxy.host()));
    let cut = isolated(&b, &["build", "kiln.toml"]);
    assert!(proxy.tripped.load(Ordering::SeqCst), "the registry was stopped mid-pull");
    assert_eq!(cut.code, 3, "{}", cut.stderr);
    let layers = layout_layers(&p.path("out"));
    let big = layers.last().unwrap();
    assert!(!store_blobs(&b.cache).contains(big), "no part of the layer is in the store");
    assert!(tmp_entries(&b.cache).is_empty(), "no temp file left: {:?}", tmp_entries(&b.cache));
    reg.restart();
    proxy.disarm();
    assert_eq!(isolated(&b, &["build", "kiln.toml"]).digest(), digest);

    // A connection reset once, mid-layer: kiln tries again by itself.
    let proxy = Proxy::start(&reg, 4 << 20, false);
    let c = Project::new();
    c.recipe(&format!("[image]\nname = \"big\"\nbase = \"registry:{}/kiln/big:v1\"\n", proxy.host()));
    let again = isolated(&c, &["build", "kiln.toml"]);
    assert!(proxy.tripped.load(Ordering::SeqCst), "the connection was cut");
    assert_eq!(again.digest(), digest, "{}", again.stderr);
}

#[test]
fn prune_to_a_budget_waits_for_a_running_build_which_succeeds() {
    if !require_root() {
        return;
    }
    let Some(busybox) = busybox() else { return };
    let p = Project::new();
    p.recipe(
        "[image]\nname = \"slow\"\n\n[[step]]\ncopy = \"busybox\"\nto = \"/bin/busybox\"\nmode = \"0755\"\n\n[[step]]\nrun = [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox sleep 3; echo done > /done\"]\n",
    );
    fs::copy(busybox, p.path("busybox")).unwrap();
    let before = p.build(&[]).digest();
    let build = p
        .command(&["build", "kiln.toml", "-o", "oci:out", "--no-cache"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the build holds the store, prune everything.
    std::thread::sleep(Duration::from_millis(1500));
    let prune = p.kiln(&["cache", "prune", "--max-size", "0"]);
    let build = build.wait_with_output().map(Run::from).unwrap();
    assert_eq!(prune.code, 0, "{}", prune.stderr);
    assert!(prune.stderr.contains("waiting for the running build"), "{}", prune.stderr);
    assert_eq!(build.digest(), before, "the running build succeeds: {}", build.stderr);
    assert_layout_blobs_valid(&p.path("out"));
}

#[test]
fn the_metadata_file_tells_ci_the_digests_steps_outputs_and_bytes_moved() {
    let Some(reg) = TestRegistry::start(None) else { return };
    let Some(p) = app("hello, metadata") else { return };
    let target = format!("{}/kiln/meta:v1", reg.host());
    let args = |meta: &str| -> Vec<String> {
        ["build", "kiln.toml", "-o", &format!("registry:{target}"), "-o", "oci:out", "--progress", "json"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--metadata-file".to_string(), meta.to_string()])
            .collect()
    };
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&fs::read(p.path(name)).unwrap()).unwrap()
    };
    let first = isolated(&p, &args("meta.json").iter().map(String::as_str).collect::<Vec<_>>());
    let digest = first.digest();
    let m = read("meta.json");
    assert_eq!(m["manifest_digest"], digest.as_str());
    assert_eq!(m["image"], "app");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(p.path("out/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(p.path(&format!("out/blobs/sha256/{}", &digest["sha256:".len()..]))).unwrap(),
    )
    .unwrap();
    assert_eq!(m["config_digest"], manifest["config"]["digest"]);
    let kinds: Vec<&str> =
        m["outputs"].as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["registry", "oci"]);
    assert!(m["outputs"].as_array().unwrap().iter().all(|o| o["digest"] == digest.as_str()));
    // Every step, MISS, with the layer it wrote; the image's layers are those.
    let steps = m["steps"].as_array().unwrap();
    assert_eq!(steps.len(), first.count("step_started"));
    assert!(steps.iter().all(|s| s["cache"] == "MISS" && s["seconds"].as_f64().is_some()));
    let layers: Vec<&serde_json::Value> = steps.iter().map(|s| &s["layer"]["digest"]).collect();
    let in_manifest: Vec<&serde_json::Value> =
        manifest["layers"].as_array().unwrap().iter().map(|l| &l["digest"]).collect();
    assert_eq!(layers, in_manifest);
    let pushed: u64 = first
        .events()
        .iter()
        .filter(|e| e["event"] == "blob" && e["action"] == "pushed")
        .map(|e| e["bytes"].as_u64().unwrap())
        .sum();
    assert!(pushed > 0);
    assert_eq!(m["bytes_pushed"].as_u64(), Some(pushed));
    assert_eq!(m["bytes_pulled"].as_u64(), Some(0));

    // Again: every step a HIT with the same layers, nothing pushed.
    let second = isolated(&p, &args("again.json").iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(second.digest(), digest);
    let again = read("again.json");
    let steps2 = again["steps"].as_array().unwrap();
    assert!(steps2.iter().all(|s| s["cache"] == "HIT"), "{again}");
    let keys = |v: &[serde_json::Value]| {
        v.iter().map(|s| (s["key"].clone(), s["layer"].clone())).collect::<Vec<_>>()
    };
    assert_eq!(keys(steps2), keys(steps));
    assert_eq!(again["bytes_pushed"].as_u64(), Some(0));

    // A file that can never be written is refused before any step runs.
    fs::create_dir(p.path("a-folder")).unwrap();
    for bad in ["a-folder", "missing/dir/meta.json", "/dev/null"] {
        let r = isolated(&p, &args(bad).iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert_eq!(r.count("step_started"), 0, "{}", r.stderr);
        assert!(r.stderr.contains("--metadata-file"), "{}", r.stderr);
    }
}

/// The `RAN-…` lines the run steps of a build printed (JSON progress).
fn ran_lines(r: &Run) -> Vec<String> {
    r.events()
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str().filter(|l| l.starts_with("RAN-")).map(str::to_string))
        .collect()
}

/// Three recipes, two sharing a stage: the fleet's.
fn fleet_recipes() -> Option<Vec<Project>> {
    let busybox = busybox()?;
    let shared = r#"
[[stage]]
name = "tools"

[[stage.step]]
copy = "busybox"
to = "/bin/busybox"
mode = "0755"

[[stage.step]]
run = ["/bin/busybox", "sh", "-c", "echo RAN-shared; /bin/busybox mkdir -p /out; echo made > /out/made"]
"#;
    let texts = [
        format!("{shared}\n[image]\nname = \"one\"\n[[step]]\ncopy = \"/out/made\"\nfrom = \"tools\"\nto = \"/made\"\n[[step]]\ncopy = \"busybox\"\nto = \"/bin/busybox\"\nmode = \"0755\"\n[[step]]\nrun = [\"/bin/busybox\", \"sh\", \"-c\", \"echo RAN-one; echo one > /one\"]\n"),
        format!("{shared}\n[image]\nname = \"two\"\n[[step]]\ncopy = \"/out/made\"\nfrom = \"tools\"\nto = \"/made-too\"\n[[step]]\ncopy = \"busybox\"\nto = \"/bin/busybox\"\nmode = \"0755\"\n[[step]]\nrun = [\"/bin/busybox\", \"sh\", \"-c\", \"echo RAN-two; echo two > /two\"]\n"),
        "[image]\nname = \"three\"\n[[step]]\ncopy = \"busybox\"\nto = \"/bin/busybox\"\nmode = \"0755\"\n[[step]]\nrun = [\"/bin/busybox\", \"sh\", \"-c\", \"echo RAN-three; echo three > /three\"]\n".to_string(),
    ];
    Some(
        texts
            .iter()
            .map(|t| {
                let p = Project::new();
                p.recipe(t);
                fs::copy(&busybox, p.path("busybox")).unwrap();
                p
            })
            .collect(),
    )
}

/// Issue 17: four runners at once (fresh caches) build three recipes, two
/// sharing a stage, each pushing `--cache-to` one registry cache; no entry
/// is lost: a fifth runner builds all three with every step a HIT and the
/// same digests. Then `kiln cache prune --remote` keeps the steps a recent
/// build used and drops the others (their last use set 40 days back).
#[test]
fn a_fleet_shares_one_registry_cache_without_losing_entries_and_prune_keeps_what_was_used() {
    if !require_root() || !require("curl") {
        return;
    }
    let Some(reg) = TestRegistry::start(None) else { return };
    let Some(recipes) = fleet_recipes() else { return };
    let cache = format!("registry:{}/fleet/cache", reg.host());
    // Runner i builds recipe i % 3; all four at once.
    let runs: Vec<(usize, Run)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (p, cache) = (&recipes[i % 3], &cache);
                s.spawn(move || {
                    let dir = format!("runner-{i}");
                    let out = format!("oci:out-{i}");
                    (
                        i,
                        p.kiln(&[
                            "build",
                            "kiln.toml",
                            "--cache-dir",
                            &dir,
                            "-o",
                            &out,
                            "--progress",
                            "json",
                            "--cache-to",
                            cache,
                        ]),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut digests = [String::new(), String::new(), String::new()];
    let mut ran = 0;
    for (i, r) in &runs {
        digests[i % 3] = r.digest();
        ran += ran_lines(r).len();
    }
    // Every runner started with nothing: the races allow each to run its own steps.
    eprintln!("fleet: {ran} run commands executed across 4 runners (at most 2 per runner)");
    assert!(ran <= 8, "{ran}");
    // The fifth runner: every step of every recipe from the registry.
    for (n, p) in recipes.iter().enumerate() {
        let r = p.kiln(&[
            "build",
            "kiln.toml",
            "--cache-dir",
            "runner-5",
            "-o",
            "oci:out-5",
            "--progress",
            "json",
            "--cache-from",
            &cache,
        ]);
        assert_eq!(r.digest(), digests[n], "recipe {n}: {}", r.stderr);
        assert!(ran_lines(&r).is_empty(), "recipe {n}: a step ran again: {}", r.stderr);
        assert!(r.cached().iter().all(|c| *c), "recipe {n}: every step a HIT: {}", r.stderr);
    }

    // Age every writer tag's uses 40 days (as a month-old fleet would have
    // left them), then recipe one builds again (its stage shared with two).
    let base = format!("http://{}/v2/fleet/cache", reg.host());
    let list = Command::new("curl").args(["-sf", &format!("{base}/tags/list")]).output().unwrap();
    let tags: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let writers: Vec<String> =
        tags["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    assert!(writers.len() >= 3 && writers.iter().all(|t| t.starts_with("kiln-cache-w-")), "{writers:?}");
    let old =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() - 40 * 86_400;
    for t in &writers {
        let get = Command::new("curl")
            .args([
                "-sf",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("{base}/manifests/{t}"),
            ])
            .output()
            .unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&get.stdout).unwrap();
        for (k, v) in m["annotations"].as_object_mut().unwrap() {
            if k.starts_with("dev.kiln.cache.step.") {
                let layer = v.as_str().unwrap().split(' ').next().unwrap().to_string();
                *v = serde_json::json!(format!("{layer} {old}"));
            }
        }
        let put = put_manifest(
            &format!("{base}/manifests/{t}"),
            "application/vnd.oci.image.manifest.v1+json",
            &m.to_string(),
        );
        assert!(put.status.success());
    }
    let again = recipes[0].kiln(&[
        "build",
        "kiln.toml",
        "--cache-dir",
        "runner-6",
        "-o",
        "oci:out-6",
        "--cache-from",
        &cache,
        "--cache-to",
        &cache,
    ]);
    assert_eq!(again.digest(), digests[0]);
    assert!(
        again.stderr.contains("step(s) of this build in registry:"),
        "its uses are recorded: {}",
        again.stderr
    );

    // Mistakes: an age that is not whole days, no age, a repository with no cache (nothing pushed there).
    for bad in [&["--older-than", "12h"][..], &["--older-than", "0d"][..]] {
        let r = recipes[0].kiln(&[&["cache", "prune", "--remote", &cache][..], bad].concat());
        assert_eq!(r.code, 2, "{bad:?}: {}", r.stderr);
        assert!(r.stderr.contains("number of days"), "{}", r.stderr);
    }
    assert_eq!(recipes[0].kiln(&["cache", "prune"]).code, 2);
    let nothing = format!("registry:{}/fleet/typo", reg.host());
    let r = recipes[0].kiln(&["cache", "prune", "--remote", &nothing, "--older-than", "30d"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("no kiln cache"), "{}", r.stderr);
    let typo = Command::new("curl")
        .args(["-s", &format!("http://{}/v2/fleet/typo/tags/list", reg.host())])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&typo.stdout).contains("kiln-cache"), "nothing was pushed there");

    let pruned = recipes[0].kiln(&["cache", "prune", "--remote", &cache, "--older-than", "30d"]);
    assert_eq!(pruned.code, 0, "{}", pruned.stderr);
    // Recipe two's own three steps and three's `run` go; three's copy is the stage's first step.
    assert!(pruned.stdout.contains("kept 5 step(s), removed 4"), "{}", pruned.stdout);
    let list = Command::new("curl").args(["-sf", &format!("{base}/tags/list")]).output().unwrap();
    let tags: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(tags["tags"], serde_json::json!(["kiln-cache"]), "the writer tags are compacted");
    // Recipe one: every step still a HIT; recipe three: its steps are gone.
    let one = recipes[0].kiln(&[
        "build",
        "kiln.toml",
        "--cache-dir",
        "runner-7",
        "-o",
        "oci:out-7",
        "--progress",
        "json",
        "--cache-from",
        &cache,
    ]);
    assert!(one.cached().iter().all(|c| *c), "{}", one.stderr);
    let three = recipes[2].kiln(&[
        "build",
        "kiln.toml",
        "--cache-dir",
        "runner-7",
        "-o",
        "oci:out-7",
        "--progress",
        "json",
        "--cache-from",
        &cache,
    ]);
    assert_eq!(ran_lines(&three), ["RAN-three"], "pruned steps run again: {}", three.stderr);
    assert_eq!(three.digest(), digests[2]);
}

/// A hostile or broken writer tag (not a kiln index, or an index naming a
/// layer the registry lacks the diff_id of) among a cache's tags is
/// skipped: the builds reading the cache go on with the others, and a
/// prune leaves it in place.
#[test]
fn a_writer_tag_that_is_not_a_kiln_index_is_skipped() {
    if !require_root() || !require("curl") {
        return;
    }
    let Some(reg) = TestRegistry::start(None) else { return };
    let Some(a) = fleet_project() else { return };
    let Some(b) = fleet_project() else { return };
    let cache = format!("registry:{}/kiln/junk", reg.host());
    let da = isolated(&a, &["build", "kiln.toml", "--cache-to", &cache]).digest();
    let junk = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.not-kiln", "config": {"mediaType": "application/vnd.oci.empty.v1+json",
        "digest": format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"{}"))), "size": 2},
        "layers": [], "annotations": {"dev.kiln.cache.step.zz": "\u{1b}[2J not a digest"}});
    let url = format!("http://{}/v2/kiln/junk/manifests/kiln-cache-w-99999999999-junk", reg.host());
    let put = put_manifest(&url, "application/vnd.oci.image.manifest.v1+json", &junk.to_string());
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let rb = isolated(&b, &["build", "kiln.toml", "--progress", "json", "--cache-from", &cache]);
    assert_eq!(rb.digest(), da);
    assert!(rb.cached().iter().all(|c| *c), "every step from the good writer tag: {}", rb.stderr);
    assert!(!rb.stderr.contains('\u{1b}'), "nothing of the junk is echoed: {}", rb.stderr);
    let pruned = isolated(&b, &["cache", "prune", "--remote", &cache, "--older-than", "1d"]);
    assert_eq!(pruned.code, 0, "{}", pruned.stderr);
    let tags = Command::new("curl")
        .args(["-sf", &format!("http://{}/v2/kiln/junk/tags/list", reg.host())])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&tags.stdout).contains("kiln-cache-w-99999999999-junk"),
        "the junk is not kiln's to delete"
    );
}
