//! `[packages]`: a Debian-format repository made here (dpkg-deb, a Packages
//! index, an InRelease signed with a key made for the test), locked, built
//! and checked; the refusals; and the examples against the real mirror.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::Digest;

use crate::support::*;

/// A package for the test repository.
struct Deb {
    name: &'static str,
    version: &'static str,
    fields: &'static str,
    /// (path, content, mode)
    files: &'static [(&'static str, &'static str, u32)],
    compression: &'static str,
}

const PACKAGES: &[Deb] = &[
    Deb {
        name: "hello-app",
        version: "1.0-1",
        fields:
            "Depends: libgreet (>= 2.0), awk | gawk\nPre-Depends: base-layout\nRecommends: never-installed\n",
        files: &[
            ("bin/hello", "#!/bin/sh\necho hello\n", 0o755),
            ("usr/share/doc/hello-app/README", "hi\n", 0o644),
        ],
        compression: "xz",
    },
    Deb {
        name: "libgreet",
        version: "2.1-1",
        fields: "Multi-Arch: same\n",
        files: &[("usr/lib/x86_64-linux-gnu/libgreet.txt", "greet 2.1\n", 0o644)],
        compression: "zstd",
    },
    Deb {
        name: "libgreet",
        version: "1.5-1",
        fields: "Multi-Arch: same\n",
        files: &[("usr/lib/x86_64-linux-gnu/libgreet.txt", "greet 1.5\n", 0o644)],
        compression: "gzip",
    },
    Deb {
        name: "mawk",
        version: "1.3.4-1",
        fields: "Provides: awk\n",
        files: &[("usr/bin/mawk", "mawk\n", 0o755)],
        compression: "xz",
    },
    Deb {
        name: "base-layout",
        version: "1",
        fields: "Essential: yes\n",
        files: &[("etc/base-layout", "layout\n", 0o644), ("lib/base/marker", "in /lib\n", 0o644)],
        compression: "none",
    },
    Deb {
        name: "old-greet-user",
        version: "1",
        fields: "Depends: libgreet (<< 2.0)\n",
        files: &[("usr/share/old", "old\n", 0o644)],
        compression: "xz",
    },
    Deb {
        name: "never-installed",
        version: "1",
        fields: "",
        files: &[("usr/share/never", "never\n", 0o644)],
        compression: "xz",
    },
];

/// A signed repository under `repo/` and its public key at `repo/key.gpg`.
struct Repo {
    root: PathBuf,
    gnupg: PathBuf,
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn gpg(home: &Path) -> Command {
    let mut c = Command::new("gpg");
    c.arg("--homedir").arg(home).args([
        "--batch",
        "--quiet",
        "--pinentry-mode",
        "loopback",
        "--passphrase",
        "",
    ]);
    c
}

impl Repo {
    fn new(p: &Project) -> Option<Repo> {
        if !require("dpkg-deb") || !require("gpg") {
            return None;
        }
        let root = p.path("repo");
        let gnupg = p.path("gnupg");
        fs::create_dir_all(&gnupg).unwrap();
        fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        run(gpg(&gnupg).args([
            "--quick-gen-key",
            "kiln test archive <archive@kiln.invalid>",
            "ed25519",
            "sign",
            "never",
        ]));
        let out = gpg(&gnupg).arg("--export").output().unwrap();
        fs::create_dir_all(&root).unwrap();
        fs::write(root.join("key.gpg"), out.stdout).unwrap();

        let mut index = String::new();
        for d in PACKAGES {
            let build = p.path(&format!("debs/{}_{}", d.name, d.version));
            fs::create_dir_all(build.join("DEBIAN")).unwrap();
            let control = format!(
                "Package: {}\nVersion: {}\nArchitecture: amd64\nMaintainer: Test <test@kiln.invalid>\n{}Description: {} for kiln's tests\n",
                d.name, d.version, d.fields, d.name
            );
            fs::write(build.join("DEBIAN/control"), &control).unwrap();
            let mut md5 = String::new();
            for (path, content, mode) in d.files {
                let f = build.join(path);
                fs::create_dir_all(f.parent().unwrap()).unwrap();
                fs::write(&f, content).unwrap();
                fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(*mode)).unwrap();
                md5.push_str(&format!("{:x}  {path}\n", md5_of(content.as_bytes())));
            }
            fs::write(build.join("DEBIAN/md5sums"), md5).unwrap();
            let rel = format!("pool/main/{}_{}_amd64.deb", d.name, d.version);
            fs::create_dir_all(root.join("pool/main")).unwrap();
            run(Command::new("dpkg-deb")
                .args(["--root-owner-group", "-Z", d.compression, "--build"])
                .arg(&build)
                .arg(root.join(&rel))
                .env("SOURCE_DATE_EPOCH", "1700000000"));
            let bytes = fs::read(root.join(&rel)).unwrap();
            index.push_str(&control);
            index.push_str(&format!(
                "Filename: {rel}\nSize: {}\nSHA256: {}\n\n",
                bytes.len(),
                hex::encode(sha2::Sha256::digest(&bytes))
            ));
        }
        let repo = Repo { root, gnupg };
        repo.publish(&index);
        Some(repo)
    }

    /// Writes the index (plain and gzip) and a signed InRelease for it.
    fn publish(&self, index: &str) {
        let dists = self.root.join("dists/testing");
        fs::create_dir_all(dists.join("main/binary-amd64")).unwrap();
        fs::write(dists.join("main/binary-amd64/Packages"), index).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, index.as_bytes()).unwrap();
        fs::write(dists.join("main/binary-amd64/Packages.gz"), gz.finish().unwrap()).unwrap();
        let mut release = String::from("Origin: kiln-test\nSuite: testing\nCodename: testing\nDate: Tue, 14 Nov 2023 22:13:20 UTC\nArchitectures: amd64\nComponents: main\nSHA256:\n");
        for f in ["main/binary-amd64/Packages", "main/binary-amd64/Packages.gz"] {
            let b = fs::read(dists.join(f)).unwrap();
            release.push_str(&format!(" {} {} {f}\n", hex::encode(sha2::Sha256::digest(&b)), b.len()));
        }
        fs::write(dists.join("Release"), &release).unwrap();
        let _ = fs::remove_file(dists.join("InRelease"));
        run(gpg(&self.gnupg)
            .arg("--clearsign")
            .arg("-o")
            .arg(dists.join("InRelease"))
            .arg(dists.join("Release")));
    }

    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

fn md5_of(b: &[u8]) -> u128 {
    // md5sums files are only copied into the image; any stable hash would do
    // for the test, but dpkg's format is `<md5>  <path>`, so use a real one.
    let out = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            std::io::Write::write_all(c.stdin.as_mut().unwrap(), b)?;
            c.wait_with_output()
        })
        .unwrap();
    u128::from_str_radix(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap(), 16).unwrap()
}

fn recipe(repo: &Repo, include: &str, extra: &str) -> String {
    format!(
        r#"[image]
name = "pkgs"

[packages]
suite = "testing"
include = [{include}]
architecture = "amd64"
mirror = "{}"
keyring = "repo/key.gpg"
{extra}
[[step]]
write = "/etc/motd"
content = "on top of the packages\n"
"#,
        repo.url()
    )
}

/// Every file of the image's layers, merged: path → (kind char, content or link target).
fn image_files(layout: &Path) -> std::collections::BTreeMap<String, (char, Vec<u8>)> {
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
                e.read_to_end(&mut data).unwrap();
            }
            out.insert(path, (kind, data));
        }
    }
    out
}

fn lock_text(p: &Project) -> String {
    fs::read_to_string(p.path("kiln.lock")).unwrap()
}

#[test]
fn a_signed_local_repository_is_locked_built_and_stable() {
    let p = Project::new();
    let Some(repo) = Repo::new(&p) else { return };
    p.recipe(&recipe(&repo, r#""hello-app""#, ""));

    // Without a lock, the build says what to do.
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln lock"), "{}", r.stderr);

    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lock = lock_text(&p);
    // The closure: versions, alternatives through Provides, Pre-Depends;
    // Recommends and Essential packages nobody depends on stay out.
    for want in ["hello-app", "libgreet", "mawk", "base-layout"] {
        assert!(lock.contains(&format!("name = \"{want}\"")), "{want} missing:\n{lock}");
    }
    assert!(lock.contains("version = \"2.1-1\""), "{lock}");
    assert!(
        !lock.contains("1.5-1") && !lock.contains("never-installed") && !lock.contains("old-greet-user"),
        "{lock}"
    );
    assert_eq!(r.stdout.lines().count(), 4, "{}", r.stdout);
    // Locking again changes nothing.
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert!(r.stderr.contains("up to date"), "{}", r.stderr);
    assert_eq!(lock_text(&p), lock);

    let first = p.build(&[]).digest();
    let files = image_files(&p.path("out"));
    // Files, with merged /usr: /bin/hello lands in /usr/bin, /bin is a link.
    assert_eq!(files["usr/bin/hello"], ('0', b"#!/bin/sh\necho hello\n".to_vec()));
    assert_eq!(files["bin"], ('2', b"usr/bin".to_vec()));
    assert_eq!(files["lib"], ('2', b"usr/lib".to_vec()));
    assert_eq!(files["usr/lib/base/marker"].1, b"in /lib\n");
    assert_eq!(files["usr/lib/x86_64-linux-gnu/libgreet.txt"].1, b"greet 2.1\n");
    // The alternative for awk, as update-alternatives would make it.
    assert_eq!(files["usr/bin/awk"], ('2', b"/etc/alternatives/awk".to_vec()));
    assert_eq!(files["etc/alternatives/awk"], ('2', b"/usr/bin/mawk".to_vec()));
    // dpkg's database.
    let status = String::from_utf8(files["var/lib/dpkg/status"].1.clone()).unwrap();
    assert!(status.contains("Package: hello-app\nStatus: install ok installed\n"), "{status}");
    assert!(status.contains("Package: libgreet\nStatus: install ok installed\n"), "{status}");
    assert_eq!(status.matches("Package: ").count(), 4, "{status}");
    let list = String::from_utf8(files["var/lib/dpkg/info/hello-app.list"].1.clone()).unwrap();
    assert!(list.contains("/bin/hello\n") && list.starts_with("/.\n"), "{list}");
    assert!(
        files.contains_key("var/lib/dpkg/info/libgreet:amd64.list"),
        "multi-arch: same packages are NAME:ARCH"
    );
    assert!(files.contains_key("var/lib/dpkg/info/hello-app.md5sums"));
    // The recipe's own step sits above the packages.
    assert_eq!(files["etc/motd"].1, b"on top of the packages\n");
    if require("dpkg") {
        let root = p.path("rootfs");
        fs::create_dir_all(root.join("var/lib/dpkg")).unwrap();
        fs::write(root.join("var/lib/dpkg/status"), &status).unwrap();
        let out = run(Command::new("dpkg-query").arg("--admindir").arg(root.join("var/lib/dpkg")).args([
            "-W",
            "-f",
            "${Package} ${Version} ${Status}\n",
        ]));
        assert!(out.contains("hello-app 1.0-1 install ok installed"), "{out}");
    }

    // The SBOM: SPDX 2.3 with each package's version and .deb checksum.
    let r = p.kiln(&["sbom", "oci:out"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let sbom: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(sbom["spdxVersion"], "SPDX-2.3");
    let pkgs = sbom["packages"].as_array().unwrap();
    assert_eq!(pkgs.len(), 4);
    let app = pkgs.iter().find(|x| x["name"] == "hello-app").unwrap();
    assert_eq!(app["versionInfo"], "1.0-1");
    let sha = hex::encode(sha2::Sha256::digest(
        fs::read(repo.root.join("pool/main/hello-app_1.0-1_amd64.deb")).unwrap(),
    ));
    assert_eq!(app["checksums"][0]["checksumValue"], sha);

    // The same digest from a fresh cache, and from the cache with no mirror at all.
    let again = p.kiln_with(&["build", "kiln.toml", "-o", "oci:out2"], |c| {
        c.env("KILN_CACHE_DIR", p.path("cache2"));
    });
    assert_eq!(again.digest(), first);
    let offline = recipe(&repo, r#""hello-app""#, "").replace(&repo.url(), "http://127.0.0.1:9/debian");
    p.recipe(&offline);
    let r = p.build(&["--no-cache"]);
    assert_eq!(r.digest(), first, "cached .debs build without the mirror");

    // On a base with packages of its own, dpkg's status lists both sets.
    p.file(
        "base/kiln.toml",
        recipe(&repo, r#""never-installed""#, "").replace("repo/key.gpg", "../repo/key.gpg"),
    );
    assert_eq!(p.kiln(&["lock", "base/kiln.toml"]).code, 0);
    p.kiln(&["build", "base/kiln.toml", "-o", "oci:base-img"]).digest();
    p.recipe(
        &recipe(&repo, r#""hello-app""#, "")
            .replace("[packages]", "[packages]\n")
            .replace("name = \"pkgs\"", "name = \"pkgs\"\nbase = \"oci:base-img\""),
    );
    p.build(&["-o", "oci:on-base"]).digest();
    let files = image_files(&p.path("on-base"));
    let status = String::from_utf8(files["var/lib/dpkg/status"].1.clone()).unwrap();
    assert_eq!(status.matches("Package: ").count(), 5, "{status}");
    assert!(status.contains("Package: never-installed\n"), "{status}");

    // On a base whose /bin is a real folder (not merged /usr), it stays one
    // and the packages' /bin files go into it.
    p.file(
        "plain/kiln.toml",
        "[image]\nname = \"plain\"\n\n[[step]]\nwrite = \"/bin/old\"\ncontent = \"old\\n\"\n",
    );
    p.kiln(&["build", "plain/kiln.toml", "-o", "oci:plain-img"]).digest();
    p.recipe(
        &recipe(&repo, r#""hello-app""#, "")
            .replace("name = \"pkgs\"", "name = \"pkgs\"\nbase = \"oci:plain-img\""),
    );
    p.build(&["-o", "oci:on-plain"]).digest();
    let files = image_files(&p.path("on-plain"));
    assert_eq!(files["bin/hello"].1, b"#!/bin/sh\necho hello\n");
    assert_eq!(files["bin/old"].1, b"old\n");
    assert!(!files.contains_key("usr/bin/hello"));
    assert_eq!(files["lib"], ('2', b"usr/lib".to_vec()), "/lib was not a folder below, so it is merged");
}

#[test]
fn bad_input_is_refused_with_what_to_do() {
    let p = Project::new();
    let Some(repo) = Repo::new(&p) else { return };

    // An unknown package: named, with close names.
    p.recipe(&recipe(&repo, r#""hello-ap""#, ""));
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`hello-ap`") && r.stderr.contains("`hello-app`"), "{}", r.stderr);
    assert!(!p.path("kiln.lock").exists());

    // Constraints nothing satisfies: the conflict is explained.
    p.recipe(&recipe(&repo, r#""hello-app", "old-greet-user""#, ""));
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("cannot be installed together") && r.stderr.contains("libgreet"),
        "{}",
        r.stderr
    );

    // A lock out of date with the recipe.
    p.recipe(&recipe(&repo, r#""hello-app""#, ""));
    assert_eq!(p.kiln(&["lock", "kiln.toml"]).code, 0);
    p.recipe(&recipe(&repo, r#""hello-app", "mawk""#, ""));
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("out of date") && r.stderr.contains("`mawk`") && r.stderr.contains("kiln lock"),
        "{}",
        r.stderr
    );
    p.recipe(&recipe(&repo, r#""hello-app""#, ""));

    // A tampered .deb: refused, nothing installed, nothing kept.
    let deb = repo.root.join("pool/main/libgreet_2.1-1_amd64.deb");
    let good = fs::read(&deb).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 10] ^= 0xff;
    fs::write(&deb, &bad).unwrap();
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("refused") && r.stderr.contains("libgreet"), "{}", r.stderr);
    assert!(!p.path("out").exists(), "no image is written");
    let bad_sha = hex::encode(sha2::Sha256::digest(&bad));
    assert!(!p.cache.join("v1/blobs/sha256").join(&bad_sha).exists(), "the bad file is not kept");
    fs::write(&deb, &good).unwrap();

    // A tampered Packages index (the signature still fine): refused.
    let packages = repo.root.join("dists/testing/main/binary-amd64/Packages.gz");
    let saved = fs::read(&packages).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(
        &mut gz,
        b"Package: evil\nVersion: 1\nArchitecture: amd64\nFilename: x\nSize: 1\nSHA256: 00\n",
    )
    .unwrap();
    fs::write(&packages, gz.finish().unwrap()).unwrap();
    fs::remove_file(p.path("kiln.lock")).unwrap();
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("does not match the signed InRelease"), "{}", r.stderr);
    assert!(!p.path("kiln.lock").exists());
    fs::write(&packages, saved).unwrap();

    // A bad signature: the signed text changed after signing, or another key signed it.
    let inrelease = repo.root.join("dists/testing/InRelease");
    let signed = fs::read_to_string(&inrelease).unwrap();
    fs::write(&inrelease, signed.replace("Suite: testing", "Suite: testinG")).unwrap();
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("signature is refused"), "{}", r.stderr);
    fs::write(&inrelease, &signed).unwrap();
    let other = p.path("other-gnupg");
    fs::create_dir_all(&other).unwrap();
    fs::set_permissions(&other, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    run(gpg(&other).args(["--quick-gen-key", "someone else <x@kiln.invalid>", "ed25519", "sign", "never"]));
    let out = gpg(&other).arg("--export").output().unwrap();
    fs::write(p.path("other.gpg"), out.stdout).unwrap();
    p.recipe(&recipe(&repo, r#""hello-app""#, "").replace("repo/key.gpg", "other.gpg"));
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("signature is refused"), "{}", r.stderr);
    assert!(!p.path("kiln.lock").exists());

    // The mirror unreachable: exit 3, said plainly.
    p.recipe(&recipe(&repo, r#""hello-app""#, "").replace(&repo.url(), "http://127.0.0.1:9/debian"));
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("unreachable"), "{}", r.stderr);
    // ... and for a build whose packages are not cached yet.
    p.recipe(&recipe(&repo, r#""hello-app""#, ""));
    assert_eq!(p.kiln(&["lock", "kiln.toml"]).code, 0);
    p.recipe(&recipe(&repo, r#""hello-app""#, "").replace(&repo.url(), "http://127.0.0.1:9/debian"));
    let r = p.kiln_with(&["build", "kiln.toml", "-o", "oci:out"], |c| {
        c.env("KILN_CACHE_DIR", p.path("empty-cache"));
    });
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("mirror is unreachable") && r.stderr.contains("127.0.0.1:9"), "{}", r.stderr);
    assert!(!p.path("out").exists());
}

fn example(name: &str) -> Project {
    let p = Project::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples").join(name);
    assert!(Command::new("cp").arg("-a").arg(&src).arg(p.path("ex")).status().unwrap().success());
    p
}

#[test]
fn the_examples_lock_and_build_from_the_real_mirror_and_run() {
    if !debian_mirror() || !require_docker() {
        return;
    }
    for (name, tag) in [("python", "kiln-test-python:1"), ("debian-busybox", "kiln-test-dbb:1")] {
        let p = example(name);
        // The committed lock builds as is; then a fresh lock builds too.
        let committed = p.kiln(&["build", "ex/kiln.toml", "-o", "oci:a"]).digest();
        let r = p.kiln(&["lock", "ex/kiln.toml"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let built = p.kiln(&["build", "ex/kiln.toml", "-o", &format!("docker:{tag}")]).digest();
        let fresh = p.kiln_with(&["build", "ex/kiln.toml", "-o", "oci:b"], |c| {
            c.env("KILN_CACHE_DIR", p.path("cache-fresh"));
        });
        assert_eq!(fresh.digest(), built, "{name}: the same digest from a fresh cache");
        if lock_unchanged(&p, name) {
            assert_eq!(committed, built, "{name}: the committed lock is the current archive's");
        }
        let out = Command::new("docker").args(["run", "--rm", "--network", "none", tag]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        match name {
            "python" => assert!(stdout.starts_with("hello from Python 3."), "{stdout}"),
            _ => {
                assert!(
                    stdout.contains("BusyBox")
                        && stdout.contains("packages: busybox-static ca-certificates "),
                    "{stdout}"
                );
                // The bundle update-ca-certificates would have made.
                let certs: usize = stdout
                    .lines()
                    .find_map(|l| l.strip_suffix(" CA certificates in the bundle"))
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                assert!(certs > 100, "{stdout}");
            }
        }
        let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    }
}

#[test]
fn trixie_packages_run_with_their_usr_only_layout() {
    if !debian_mirror() || !require_docker() {
        return;
    }
    // trixie's packages ship only /usr paths: /lib64 (the ELF interpreter's
    // folder) must still be there for python3 to start.
    let p = Project::new();
    p.recipe(
        r#"[image]
name = "trixie-python"

[packages]
suite = "trixie"
include = ["python3-minimal"]
exclude = ["dpkg"]
mirror = "http://deb.debian.org/debian"

[config]
entrypoint = ["/usr/bin/python3", "-c", "import sys; print('python', sys.version_info[0])"]
"#,
    );
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    p.build(&["-o", "docker:kiln-test-trixie:1"]).digest();
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "kiln-test-trixie:1"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "python 3\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = Command::new("docker").args(["rmi", "-f", "kiln-test-trixie:1"]).output();
}

fn lock_unchanged(p: &Project, name: &str) -> bool {
    let committed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/examples").join(name).join("kiln.lock");
    let pkgs = |s: String| {
        s.lines()
            .filter(|l| !l.starts_with("date") && !l.starts_with("inrelease"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    pkgs(fs::read_to_string(committed).unwrap()) == pkgs(fs::read_to_string(p.path("ex/kiln.lock")).unwrap())
}
