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
            let files: Vec<(String, DebFile)> = d
                .files
                .iter()
                .map(|(path, content, mode)| {
                    (path.to_string(), DebFile::Data(content.as_bytes().to_vec(), *mode))
                })
                .collect();
            index.push_str(&build_deb(p, &root, d.name, d.version, d.fields, &files, &[], d.compression));
        }
        let repo = Repo { root, gnupg };
        repo.publish(&index);
        Some(repo)
    }

    /// Writes the index (plain and gzip) and a signed InRelease for it.
    fn publish(&self, index: &str) {
        self.publish_suite(&self.root, "testing", index)
    }

    /// The same for `suite` of the archive at `root`, signed with this repo's key.
    fn publish_suite(&self, root: &Path, suite: &str, index: &str) {
        let dists = root.join("dists").join(suite);
        fs::create_dir_all(dists.join("main/binary-amd64")).unwrap();
        fs::write(dists.join("main/binary-amd64/Packages"), index).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, index.as_bytes()).unwrap();
        fs::write(dists.join("main/binary-amd64/Packages.gz"), gz.finish().unwrap()).unwrap();
        let mut release = format!("Origin: kiln-test\nSuite: {suite}\nCodename: {suite}\nDate: Tue, 14 Nov 2023 22:13:20 UTC\nArchitectures: amd64\nComponents: main\nSHA256:\n");
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

/// A file a test package ships.
enum DebFile {
    Data(Vec<u8>, u32),
    Link(String),
}

/// Builds `NAME_VERSION_amd64.deb` into `root`'s pool with dpkg-deb;
/// returns its paragraph for the Packages index. `control` holds extra
/// control members (maintainer scripts, `conffiles`, `triggers`).
#[allow(clippy::too_many_arguments)]
fn build_deb(
    p: &Project,
    root: &Path,
    name: &str,
    version: &str,
    fields: &str,
    files: &[(String, DebFile)],
    control: &[(&str, &str)],
    compression: &str,
) -> String {
    let build = p.path(&format!("debs/{name}_{version}"));
    let _ = fs::remove_dir_all(&build);
    fs::create_dir_all(build.join("DEBIAN")).unwrap();
    let text = format!(
        "Package: {name}\nVersion: {version}\nArchitecture: amd64\nMaintainer: Test <test@kiln.invalid>\n{fields}Description: {name} for kiln's tests\n"
    );
    fs::write(build.join("DEBIAN/control"), &text).unwrap();
    let mut md5 = String::new();
    for (path, f) in files {
        let dest = build.join(path);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        match f {
            DebFile::Data(content, mode) => {
                fs::write(&dest, content).unwrap();
                fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(*mode)).unwrap();
                md5.push_str(&format!("{:x}  {path}\n", md5_of(content)));
            }
            DebFile::Link(target) => std::os::unix::fs::symlink(target, &dest).unwrap(),
        }
    }
    fs::write(build.join("DEBIAN/md5sums"), md5).unwrap();
    for (member, content) in control {
        let f = build.join("DEBIAN").join(member);
        fs::write(&f, content).unwrap();
        let mode = if ["preinst", "postinst", "prerm", "postrm"].contains(member) { 0o755 } else { 0o644 };
        fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }
    let rel = format!("pool/main/{name}_{version}_amd64.deb");
    fs::create_dir_all(root.join("pool/main")).unwrap();
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Z", compression, "--build"])
        .arg(&build)
        .arg(root.join(&rel))
        .env("SOURCE_DATE_EPOCH", "1700000000"));
    let bytes = fs::read(root.join(&rel)).unwrap();
    format!(
        "{text}Filename: {rel}\nSize: {}\nSHA256: {}\n\n",
        bytes.len(),
        hex::encode(sha2::Sha256::digest(&bytes))
    )
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
scripts = false
{extra}
[[step]]
write = "/etc/motd"
content = "on top of the packages\n"
"#,
        repo.url()
    )
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
    assert!(r.stderr.contains("kiln.lock created"), "{}", r.stderr);
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
    assert!(r.stderr.contains("kiln.lock up to date, nothing changed"), "{}", r.stderr);
    assert_eq!(lock_text(&p), lock);
    // A recipe with nothing to lock says so and writes nothing.
    let none = Project::new();
    none.recipe("[image]\nname = \"x\"\n");
    let r = none.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("nothing to lock"), "{}", r.stderr);
    assert!(!none.path("kiln.lock").exists());

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
fn a_deb_whose_control_disagrees_with_the_index_or_hoards_memory_is_refused() {
    let p = Project::new();
    let Some(repo) = Repo::new(&p) else { return };
    // The index says `all`; the .deb's control says amd64 (an Architecture
    // names dpkg's info files, so it must be the locked one).
    let main = p.path("archive/debian");
    let mut index = build_deb(&p, &main, "tool", "1", "", &[], &[], "xz");
    index = index.replace("Architecture: amd64", "Architecture: all");
    // A control.tar with one postinst repeated 40 times, 1 MiB each: more
    // than kiln keeps of a package's control files.
    let big = "#!/bin/sh\n".to_string() + &"#".repeat(1 << 20) + "\n";
    let hoard = build_deb(&p, &main, "hoard", "1", "", &[], &[("postinst", &big)], "xz");
    let deb = main.join("pool/main/hoard_1_amd64.deb");
    let dir = p.path("hoard-ctl");
    fs::create_dir_all(&dir).unwrap();
    run(Command::new("sh").current_dir(&dir).arg("-c").arg(format!(
        "ar x {deb} && mkdir c && tar -xf control.tar.* -C c && rm control.tar.* && \
         for i in $(seq 40); do tar -rf control.tar -C c ./postinst; done && tar -rf control.tar -C c ./control && \
         xz control.tar && rm {deb} && ar rc {deb} debian-binary control.tar.xz data.tar.*",
        deb = deb.display()
    )));
    let bytes = fs::read(&deb).unwrap();
    let hoard = hoard
        .lines()
        .map(|l| {
            if l.starts_with("Size: ") {
                format!("Size: {}", bytes.len())
            } else if l.starts_with("SHA256: ") {
                format!("SHA256: {}", hex::encode(sha2::Sha256::digest(&bytes)))
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    index.push_str(&hoard);
    index.push_str("\n\n");
    repo.publish_suite(&main, "testing", &index);
    let archive = p.path("archive").display().to_string();
    for (pkg, want) in
        [("tool", "Architecture or Multi-Arch"), ("hoard", "more than 32 MiB of control files")]
    {
        p.recipe(&format!(
            "[image]\nname = \"x\"\n[packages]\nsuite = \"testing\"\ninclude = [\"{pkg}\"]\narchitecture = \"amd64\"\nmirror = \"file://{archive}/debian\"\nkeyring = \"repo/key.gpg\"\nscripts = false\n"
        ));
        let r = p.kiln(&["lock", "kiln.toml"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{pkg}: {}", r.stderr);
        assert!(r.stderr.contains("refused") && r.stderr.contains(want), "{pkg}: {}", r.stderr);
        assert!(!p.path("out").exists());
    }
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

    // Maintainer scripts on, and no shell among the packages: exit 2 at
    // `[packages]`, saying what to do, before anything runs.
    p.recipe(&recipe(&repo, r#""hello-app""#, "").replace("scripts = false", "scripts = true"));
    assert_eq!(p.kiln(&["lock", "kiln.toml"]).code, 0);
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("need /bin/sh") && r.stderr.contains("set `scripts ="), "{}", r.stderr);
    assert!(!p.path("out").exists());
}

/// The archive for the maintainer-script tests: `testing` at
/// `archive/debian` and `testing-security` at `archive/debian-security`
/// (where kiln finds it from `mirror` alone), signed with `repo`'s key.
/// `shell` (Essential) is the host's busybox as /bin/sh and the tools the
/// scripts use; `greeter` has every kind of script, a conffile and a
/// Depends on `libgreet`, whose trigger it activates; the security suite
/// has a newer `libgreet`; `broken`'s postinst fails.
fn scripts_archive(p: &Project, repo: &Repo, libgreet_security: &str) {
    let main = p.path("archive/debian");
    let security = p.path("archive/debian-security");
    let busybox = fs::read(busybox().unwrap()).unwrap();
    let mut shell = vec![("bin/busybox".to_string(), DebFile::Data(busybox, 0o755))];
    for tool in ["sh", "mkdir", "chmod", "rm", "cat", "echo", "grep", "ln"] {
        shell.push((format!("bin/{tool}"), DebFile::Link("busybox".into())));
    }
    let mut index = build_deb(p, &main, "shell", "1", "Essential: yes\n", &shell, &[], "xz");
    let log = "/var/lib/greeter.log";
    let greeter_files = vec![
        ("etc/greeter.conf".to_string(), DebFile::Data(b"greeting = hello\n".to_vec(), 0o644)),
        ("usr/share/greet-plugins/default".to_string(), DebFile::Data(b"plugin\n".to_vec(), 0o644)),
    ];
    let preinst = format!("#!/bin/sh\necho \"preinst $1 of $DPKG_MAINTSCRIPT_PACKAGE\" >> {log}\n");
    let postinst = format!(
        "#!/bin/sh\nset -e\necho \"postinst $1 of $DPKG_MAINTSCRIPT_PACKAGE ($DPKG_MAINTSCRIPT_NAME, $DPKG_MAINTSCRIPT_ARCH) epoch=$SOURCE_DATE_EPOCH frontend=$DEBIAN_FRONTEND\" >> {log}\n\
         /usr/sbin/policy-rc.d greeter start || echo \"service start refused: $?\" >> {log}\n\
         grep -q '^greeter:' /etc/passwd 2>/dev/null || echo 'greeter:x:101:101::/nonexistent:/bin/false' >> /etc/passwd\n\
         echo leftover > /etc/passwd-\nmkdir -p /var/log && echo noise > /var/log/dpkg.log\nmkdir -p /tmp && echo temp > /tmp/greeter.tmp\n"
    );
    index.push_str(&build_deb(
        p,
        &main,
        "greeter",
        "1.0",
        "Depends: libgreet (>= 1.0), shell\n",
        &greeter_files,
        &[
            ("preinst", &preinst),
            ("postinst", &postinst),
            ("prerm", "#!/bin/sh\nexit 0\n"),
            ("conffiles", "/etc/greeter.conf\n"),
        ],
        "xz",
    ));
    let libgreet = |version: &str| {
        format!(
            "#!/bin/sh\ncase \"$1\" in\n  configure) echo \"postinst configure of libgreet {version}\" >> {log} ;;\n  triggered) echo \"libgreet triggered by $2\" >> {log} ;;\nesac\n"
        )
    };
    let lib_files = |v: &str| {
        vec![("usr/lib/libgreet.txt".to_string(), DebFile::Data(format!("greet {v}\n").into_bytes(), 0o644))]
    };
    index.push_str(&build_deb(
        p,
        &main,
        "libgreet",
        "1.0",
        "Depends: shell\n",
        &lib_files("1.0"),
        &[("postinst", &libgreet("1.0")), ("triggers", "interest-noawait /usr/share/greet-plugins\n")],
        "xz",
    ));
    index.push_str(&build_deb(
        p,
        &main,
        "broken",
        "1",
        "",
        &[],
        &[("postinst", "#!/bin/sh\necho 'broken: cannot configure the frobnicator' >&2\nexit 3\n")],
        "xz",
    ));
    repo.publish_suite(&main, "testing", &index);
    let sec = build_deb(
        p,
        &security,
        "libgreet",
        libgreet_security,
        "Depends: shell\n",
        &lib_files(libgreet_security),
        &[
            ("postinst", &libgreet(libgreet_security)),
            ("triggers", "interest-noawait /usr/share/greet-plugins\n"),
        ],
        "xz",
    );
    repo.publish_suite(&security, "testing-security", &sec);
}

fn scripts_recipe(include: &str) -> String {
    format!(
        r#"[image]
name = "scripts"

[packages]
suite = "testing"
include = [{include}]
architecture = "amd64"
mirror = "file://{{ARCHIVE}}/debian"
keyring = "repo/key.gpg"

[[step]]
run = "cat /var/lib/greeter.log > /greeter.log"
"#
    )
}

/// A project with the scripts archive (libgreet 1.0+sec1 in the security
/// suite) and its path; `None` (skipped) without root or busybox.
fn scripts_project() -> Option<(Project, Repo, String)> {
    if !require_root() {
        return None;
    }
    let p = Project::new();
    let repo = Repo::new(&p)?;
    busybox()?;
    scripts_archive(&p, &repo, "1.0+sec1");
    let archive = p.path("archive").display().to_string();
    Some((p, repo, archive))
}

#[test]
fn maintainer_scripts_run_in_the_sandbox_and_security_updates_are_taken() {
    let Some((p, repo, archive)) = scripts_project() else { return };
    p.recipe(&scripts_recipe(r#""greeter""#).replace("{ARCHIVE}", &archive));

    // The lock: the union of both suites, the newest libgreet from the
    // security suite (found beside the main archive), and the Essential
    // `shell` the scripts need although nothing asked for it.
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("libgreet\t1.0+sec1\tamd64\ttesting-security"), "{}", r.stdout);
    assert!(r.stdout.contains("shell\t1\tamd64\ttesting"), "{}", r.stdout);
    assert!(r.stderr.contains("the suite `testing-updates` is not in the archive; skipped"), "{}", r.stderr);
    let lock = lock_text(&p);
    assert!(lock.contains("[[image.source]]\nsuite = \"testing-security\""), "{lock}");
    assert!(!lock.contains("file://"), "no mirror in the lock: {lock}");

    let r = p.build(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let first = r.digest();
    let files = image_files(&p.path("out"));
    let log = String::from_utf8(files["greeter.log"].1.clone()).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines,
        [
            "preinst install of greeter",
            "postinst configure of libgreet 1.0+sec1",
            "postinst configure of greeter (postinst, amd64) epoch=0 frontend=noninteractive",
            "service start refused: 101",
            "libgreet triggered by /usr/share/greet-plugins",
        ],
        "dependencies first, dpkg's environment, policy-rc.d, the trigger once"
    );
    let passwd = String::from_utf8(files["etc/passwd"].1.clone()).unwrap();
    assert!(passwd.contains("greeter:x:101:101"), "{passwd}");
    // Left out as debuerreotype does: backups, logs, temp files, the policy.
    for gone in ["etc/passwd-", "var/log/dpkg.log", "tmp/greeter.tmp", "usr/sbin/policy-rc.d"] {
        assert!(!files.contains_key(gone), "{gone} is in the image");
    }
    let status = String::from_utf8(files["var/lib/dpkg/status"].1.clone()).unwrap();
    let conf = format!("Conffiles:\n /etc/greeter.conf {:032x}\n", md5_of(b"greeting = hello\n"));
    assert!(status.contains(&conf), "{status}");
    assert!(files.contains_key("var/lib/dpkg/info/greeter.prerm"), "scripts are kept for dpkg");
    assert_eq!(
        String::from_utf8_lossy(&files["var/lib/dpkg/triggers/File"].1),
        "/usr/share/greet-plugins libgreet/noawait\n"
    );

    // Rebuilt: both packages steps HIT; reproducible across caches.
    let r = p.build(&[]);
    assert_eq!(r.count("cache_hit"), 3, "{}", r.stdout);
    let fresh = p.kiln_with(&["build", "kiln.toml", "-o", "oci:fresh"], |c| {
        c.env("KILN_CACHE_DIR", p.path("cache-fresh"));
    });
    assert_eq!(fresh.digest(), first);
    let r = p.kiln(&["verify", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);

    // `--check`: current, then a newer security update appears: exit 1,
    // naming it, and nothing written; `lock` keeps, `--update` takes it.
    let r = p.kiln(&["lock", "--check", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    scripts_archive(&p, &repo, "1.0+sec2");
    let before = lock_text(&p);
    let r = p.kiln(&["lock", "--check", "kiln.toml"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("libgreet 1.0+sec1 -> 1.0+sec2 (testing-security)"), "{}", r.stderr);
    assert_eq!(lock_text(&p), before);
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("kept"), "{}", r.stderr);
    assert_eq!(lock_text(&p), before);
    let r = p.kiln(&["lock", "--update", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(lock_text(&p).contains("version = \"1.0+sec2\""));
    assert_eq!(p.kiln(&["lock", "--check", "kiln.toml"]).code, 0);
    // The archive signed again with the same packages (a new InRelease):
    // `--update` leaves the file as it is.
    let updated = lock_text(&p);
    scripts_archive(&p, &repo, "1.0+sec2");
    let r = p.kiln(&["lock", "--update", "kiln.toml"]);
    assert!(r.stderr.contains("up to date, nothing changed"), "{}", r.stderr);
    assert_eq!(lock_text(&p), updated);
    // `--check` on a lock that does not answer the recipe: exit 2 (the
    // recipe's mistake, as for a build), not 1 (updates in the archive).
    p.recipe(&scripts_recipe(r#""greeter", "libgreet""#).replace("{ARCHIVE}", &archive));
    let r = p.kiln(&["lock", "--check", "kiln.toml"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("does not answer the recipe") && r.stderr.contains("`libgreet`"),
        "{}",
        r.stderr
    );
    assert_eq!(lock_text(&p), updated);
    // A lock holds one architecture: another platform is told to lock for it.
    p.recipe(
        &scripts_recipe(r#""greeter""#)
            .replace("{ARCHIVE}", &archive)
            .replace("architecture = \"amd64\"\n", ""),
    );
    assert_eq!(p.kiln(&["lock", "kiln.toml"]).code, 0);
    let r = p.kiln(&["plan", "kiln.toml", "--platform", "linux/arm64"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln lock --platform linux/arm64 kiln.toml"), "{}", r.stderr);

    // A failing script: exit 1 naming the package, the script and its
    // output; nothing cached, so it runs (and fails) again.
    p.recipe(&scripts_recipe(r#""greeter", "broken""#).replace("{ARCHIVE}", &archive));
    assert_eq!(p.kiln(&["lock", "kiln.toml"]).code, 0);
    for _ in 0..2 {
        let r = p.build(&[]);
        assert_eq!(r.code, 1, "{}", r.stderr);
        assert!(
            r.stderr.contains("/var/lib/dpkg/info/broken.postinst configure")
                && r.stderr.contains("exited with code 3")
                && r.stderr.contains("broken: cannot configure the frobnicator"),
            "{}",
            r.stderr
        );
    }
}

#[test]
fn packages_in_a_stage_have_their_own_lock_section() {
    let Some((p, _repo, archive)) = scripts_project() else { return };
    p.recipe(&format!(
        r#"[[stage]]
name = "settings"

[[stage.step]]
write = "/etc/greeter.conf"
content = "greeting = configured by the recipe\n"

[[stage]]
name = "build"
base = "stage:settings"

[stage.packages]
suites = ["testing", {{ name = "testing-security", mirror = "file://{archive}/debian-security" }}]
include = ["greeter"]
architecture = "amd64"
mirror = "file://{archive}/debian"
keyring = "repo/key.gpg"

[[stage.step]]
run = "grep greet /usr/lib/libgreet.txt > /out.txt && cat /etc/greeter.conf /etc/greeter.conf.dpkg-dist >> /out.txt"

[image]
name = "final"

[packages]
suite = "testing"
include = ["libgreet=1.0"]
architecture = "amd64"
mirror = "file://{archive}/debian"
keyring = "repo/key.gpg"
scripts = false

[[step]]
copy = "/out.txt"
from = "build"
to = "/out.txt"
"#
    ));
    // Without a lock: exit 2, naming the stage's section.
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lock = lock_text(&p);
    assert!(lock.contains("[stage.build.request]") && lock.contains("[image.request]"), "{lock}");
    assert!(lock.contains("scripts = false"), "{lock}");
    let r = p.build(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let files = image_files(&p.path("out"));
    assert_eq!(
        String::from_utf8_lossy(&files["out.txt"].1),
        "greet 1.0+sec1\ngreeting = configured by the recipe\ngreeting = hello\n",
        "the stage took the security update; a conffile its base has is kept, the package's beside it"
    );
    assert_eq!(files["usr/lib/libgreet.txt"].1, b"greet 1.0\n", "the image its pinned version");
    assert!(!files.contains_key("var/lib/greeter.log"), "the stage's packages stay in the stage");
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

/// Runs `docker run ARGS`, returning stdout (asserting success).
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a server in a container says first on its published port
/// (`PORT/tcp`): an HTTP GET's answer, or the greeting it sends by itself.
fn answer(container: &str, port: &str, request: &[u8]) -> String {
    use std::io::Write as _;
    let mapped = docker(&["port", container, port]);
    let addr = mapped
        .lines()
        .find(|l| l.starts_with("127.0.0.1:"))
        .unwrap_or_else(|| panic!("{mapped}"))
        .to_string();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
            s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
            let _ = s.write_all(request);
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
                if request.is_empty() && got.contains(&b'\n') {
                    break;
                }
            }
            if !got.is_empty() {
                return String::from_utf8_lossy(&got).into_owned();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let logs = Command::new("docker").args(["logs", container]).output().unwrap();
    panic!("{container} never answered on {port}: {}", String::from_utf8_lossy(&logs.stderr));
}

/// Builds a real-install example with `kiln verify` and as a docker image,
/// checks what its maintainer scripts left and what they must not, and
/// has it answer.
fn real_install_example(name: &str) {
    if !debian_mirror() || !require_docker() || !require_root() || (name == "postgres" && !require("psql")) {
        return;
    }
    let p = example(name);
    let tag = format!("kiln-test-{name}:1");
    let r = p.kiln(&["verify", "ex/kiln.toml"]);
    assert_eq!(r.code, 0, "{name}: kiln verify: {}{}", r.stdout, r.stderr);
    let built = p.kiln(&["build", "ex/kiln.toml", "-o", &format!("docker:{tag}"), "-o", "oci:img"]).digest();
    assert!(r.stdout.contains(&built), "{name}: verify's digest is the build's: {}", r.stdout);
    let files = image_files(&p.path("img"));
    for gone in ["var/log/dpkg.log", "var/cache/ldconfig/aux-cache", "etc/passwd-", "usr/sbin/policy-rc.d"] {
        assert!(!files.contains_key(gone), "{name}: {gone} is in the image");
    }
    match name {
        "nginx" => {
            // The security archive's fixes are in: at least one package comes
            // from bookworm-security at a `+debNNuN` version.
            let lock = fs::read_to_string(p.path("ex/kiln.lock")).unwrap();
            let from_security = lock
                .split("[[image.package]]")
                .filter(|e| e.contains("suite = \"bookworm-security\"") && e.contains("+deb12u"))
                .count();
            assert!(from_security > 0, "no package from bookworm-security:\n{lock}");
            let passwd = String::from_utf8_lossy(&files["etc/passwd"].1).into_owned();
            assert!(
                passwd.contains("\nwww-data:") && passwd.contains(":33:33:www-data:/var/www:"),
                "{passwd}"
            );
            assert!(files.contains_key("etc/nginx/sites-enabled/default"), "the postinst enabled the site");
            let c = docker(&["run", "-d", "--rm", "-p", "127.0.0.1::80", &tag]);
            let c = c.trim();
            let page = answer(c, "80/tcp", b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n");
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
            assert!(page.starts_with("HTTP/1.1 200") && page.contains("Welcome to nginx"), "{page}");
        }
        "sshd" => {
            assert!(
                !files.keys().any(|k| k.starts_with("etc/ssh/ssh_host_")),
                "no host key is made at build time"
            );
            assert!(files.contains_key("etc/ssh/sshd_config") && files.contains_key("etc/pam.d/common-auth"));
            let passwd = String::from_utf8_lossy(&files["etc/passwd"].1).into_owned();
            assert!(passwd.contains("\nsshd:"), "{passwd}");
            let out = docker(&[
                "run",
                "--rm",
                "--entrypoint",
                "/bin/sh",
                &tag,
                "-c",
                "ssh-keygen -A >/dev/null && mkdir -p /run/sshd && /usr/sbin/sshd -t && echo sshd-t-ok",
            ]);
            assert_eq!(out, "sshd-t-ok\n");
            let c = docker(&["run", "-d", "--rm", "-p", "127.0.0.1::22", &tag]);
            let c = c.trim();
            let banner = answer(c, "22/tcp", b"");
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
            assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner}");
        }
        "postgres" => {
            assert!(
                !files.keys().any(|k| k.starts_with("var/lib/postgresql/15/main")),
                "no cluster at build time"
            );
            assert_eq!(
                String::from_utf8_lossy(&files["etc/postgresql-common/createcluster.conf"].1).lines().last(),
                Some("create_main_cluster = false"),
                "the recipe's file is kept (postgresql-common's ucf keeps a changed file)"
            );
            let c = docker(&[
                "run",
                "-d",
                "--rm",
                "-e",
                "POSTGRES_PASSWORD=kiln-test",
                "-p",
                "127.0.0.1::5432",
                &tag,
            ]);
            let c = c.trim();
            let mapped = docker(&["port", c, "5432/tcp"]);
            let (host, port) = mapped.lines().find_map(|l| l.split_once(':')).unwrap();
            let mut last = String::new();
            for _ in 0..100 {
                let out = Command::new("psql")
                    .args(["-h", host, "-p", port, "-U", "postgres", "-tAc", "select 1"])
                    .env("PGPASSWORD", "kiln-test")
                    .output()
                    .unwrap();
                last = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                if out.status.success() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
            assert_eq!(last, "1\n", "psql on loopback");
        }
        _ => {
            assert_eq!(
                files.keys().filter(|k| !k.is_empty()).count(),
                1,
                "only the program: {:?}",
                files.keys()
            );
            let out = docker(&["run", "--rm", "--network", "none", &tag]);
            assert!(out.starts_with("hello from a static C program built by kiln"), "{out}");
        }
    }
    let _ = Command::new("docker").args(["rmi", "-f", &tag]).output();
}

#[test]
fn the_nginx_example_builds_reproducibly_and_answers() {
    real_install_example("nginx");
}

#[test]
fn the_sshd_example_builds_reproducibly_and_answers() {
    real_install_example("sshd");
}

#[test]
fn the_c_app_example_builds_reproducibly_and_answers() {
    real_install_example("c-app");
}

#[test]
fn the_postgres_example_builds_reproducibly_and_answers() {
    real_install_example("postgres");
}

/// Users, groups, alternatives and conffiles of an install: what the
/// maintainer scripts make.
fn install_facts(files: &std::collections::BTreeMap<String, (char, Vec<u8>)>) -> Vec<String> {
    let mut facts = Vec::new();
    for (file, kind) in [("etc/passwd", "user"), ("etc/group", "group")] {
        for line in String::from_utf8_lossy(&files[file].1).lines() {
            let f: Vec<&str> = line.split(':').collect();
            facts.push(format!("{kind} {} {}", f[0], f[2]));
        }
    }
    for (path, (kind, data)) in files {
        if let Some(name) = path.strip_prefix("etc/alternatives/") {
            if *kind == '2' {
                facts.push(format!("alternative {name} -> {}", String::from_utf8_lossy(data)));
            }
        }
    }
    let status = String::from_utf8_lossy(&files["var/lib/dpkg/status"].1).into_owned();
    let mut in_conffiles = false;
    for line in status.lines() {
        if line.starts_with("Conffiles:") {
            in_conffiles = true;
        } else if in_conffiles && line.starts_with(' ') {
            facts.push(format!("conffile {}", line.split_whitespace().next().unwrap_or("")));
        } else {
            in_conffiles = false;
        }
    }
    facts.sort();
    facts
}

#[test]
fn the_scripts_make_what_mmdebstrap_makes() {
    if !debian_mirror() || !require_root() || !require("mmdebstrap") {
        return;
    }
    // The host's Debian sources, for mmdebstrap (which reads such a file).
    let sources = fs::read_dir("/etc/apt/sources.list.d")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "sources"))
        .find(|p| fs::read_to_string(p).is_ok_and(|t| t.contains("/debian") && t.contains("bookworm")));
    let Some(sources) = sources else {
        assert!(std::env::var_os("CI").is_none(), "no deb822 Debian sources on this host");
        return;
    };
    let p = Project::new();
    // apt (mmdebstrap) takes usrmerge for init-system-helpers' `usrmerge |
    // usr-is-merged`, kiln takes usr-is-merged as debootstrap does (no perl):
    // named here, so both installs hold the same packages' scripts.
    p.recipe("[image]\nname = \"nginx-apt\"\n\n[packages]\nsuite = \"bookworm\"\ninclude = [\"nginx-light\", \"apt\", \"usrmerge\"]\n");
    assert_eq!(p.kiln(&["lock", "kiln.toml"]).code, 0);
    let r = p.build(&[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let kiln = install_facts(&image_files(&p.path("out")));

    let tar = p.path("mmdebstrap.tar");
    let out = Command::new("mmdebstrap")
        .args(["--quiet", "--variant=apt", "--include=nginx-light", "bookworm"])
        .arg(&tar)
        .arg(&sources)
        .output()
        .unwrap();
    assert!(out.status.success(), "mmdebstrap: {}", String::from_utf8_lossy(&out.stderr));
    let mut files = std::collections::BTreeMap::new();
    let mut ar = tar::Archive::new(fs::File::open(&tar).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path =
            e.path().unwrap().to_string_lossy().trim_start_matches("./").trim_end_matches('/').to_string();
        let kind = e.header().entry_type().as_byte() as char;
        let keep = path == "etc/passwd"
            || path == "etc/group"
            || path == "var/lib/dpkg/status"
            || path.starts_with("etc/alternatives/");
        if !keep {
            continue;
        }
        let mut data = Vec::new();
        if kind == '2' {
            data = e.link_name_bytes().unwrap().into_owned();
        } else {
            e.read_to_end(&mut data).unwrap();
        }
        files.insert(path, (kind, data));
    }
    let debian = install_facts(&files);
    let only_kiln: Vec<&String> = kiln.iter().filter(|f| !debian.contains(f)).collect();
    let only_debian: Vec<&String> = debian.iter().filter(|f| !kiln.contains(f)).collect();
    assert!(
        only_kiln.is_empty() && only_debian.is_empty(),
        "kiln and mmdebstrap differ:\nonly kiln: {only_kiln:#?}\nonly mmdebstrap: {only_debian:#?}"
    );
    assert!(kiln.iter().any(|f| f.starts_with("user www-data")));
    assert!(kiln.iter().any(|f| f.starts_with("conffile /etc/nginx/")));
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
scripts = false

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

/// Issue 18: on a terminal (here `script`'s), a download shows its bytes
/// (done / total, and a rate); `run::a_failing_step_shows_failed_on_a_terminal` shows FAILED.
#[test]
fn the_terminal_display_shows_download_bytes_and_a_rate() {
    if !require("script") {
        return;
    }
    let p = Project::new();
    let Some(repo) = Repo::new(&p) else { return };
    p.recipe(&recipe(&repo, r#""hello-app""#, ""));
    let r = p.kiln(&["lock", "kiln.toml"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (code, shown) = p.build_on_a_terminal(&p.path("cache-tty"));
    assert_eq!(code, Some(0), "{shown}");
    assert!(byte_counter(&shown), "no byte counter (`N KiB/N KiB`) in the display:\n{shown:?}");
    assert!(shown.contains("/s"), "no rate in the display:\n{shown:?}");
}

/// Whether `s` shows bytes done over a total as indicatif writes them
/// (`1.20 KiB/1.20 KiB`, `512 B/512 B`): a number, a unit, a slash, a number.
fn byte_counter(s: &str) -> bool {
    let words: Vec<&str> = s.split([' ', '\r', '\n']).collect();
    words.windows(3).any(|w| {
        let number = |t: &str| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit() || c == '.');
        number(w[0])
            && ["B", "KiB", "MiB", "GiB"]
                .iter()
                .any(|u| w[1].strip_prefix(u).and_then(|r| r.strip_prefix('/')).is_some_and(number))
    })
}
