//! `kiln.lock`: what `kiln lock` resolved, so every build installs exactly
//! those files. TOML, sorted by package name, written beside the recipe.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use kiln_recipes::Packages;

use crate::error::BuildError;

pub(crate) const LOCK_VERSION: u32 = 2;
pub(crate) const FILE_NAME: &str = "kiln.lock";

/// The part of `[packages]` a lockfile answers. Mirrors and the keyring
/// are not in it: the same packages come from any mirror of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRequest {
    /// Every suite asked for, the release first (implied ones included).
    pub suites: Vec<String>,
    pub(crate) components: Vec<String>,
    pub(crate) architecture: String,
    pub include: Vec<String>,
    pub(crate) exclude: Vec<String>,
    /// Maintainer scripts run, so the `Essential` packages are in the set.
    pub scripts: bool,
}

impl LockRequest {
    pub(crate) fn new(p: &Packages, architecture: &str) -> LockRequest {
        let mut include = p.include.clone();
        include.sort();
        let mut exclude = p.exclude.clone();
        exclude.sort();
        LockRequest {
            suites: p.suites.iter().map(|s| s.name.clone()).collect(),
            components: p.components.clone(),
            architecture: architecture.to_string(),
            include,
            exclude,
            scripts: p.scripts,
        }
    }
}

/// One suite the packages were resolved from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockSource {
    pub suite: String,
    /// The `Date` of the InRelease that was verified.
    pub(crate) date: String,
    pub(crate) inrelease_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The suite (archive) the file comes from, e.g. `bookworm-security`.
    pub suite: String,
    pub(crate) filename: String,
    pub size: u64,
    pub(crate) sha256: String,
}

/// One target's packages: the image's `[packages]` or a stage's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageLock {
    pub request: LockRequest,
    /// The suites read, in request order; an implied suite the archive
    /// lacks is not here.
    #[serde(rename = "source")]
    pub sources: Vec<LockSource>,
    #[serde(rename = "package")]
    pub packages: Vec<LockedPackage>,
}

/// A `registry:` base with a tag, pinned to the digest the tag named when
/// `kiln lock` ran, so builds do not drift when the tag moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasePin {
    /// As the recipe writes it, e.g. `registry:HOST/REPO:TAG`.
    #[serde(rename = "ref")]
    pub reference: String,
    /// What the tag named: a manifest or an index, `sha256:HEX`.
    pub digest: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lockfile {
    pub(crate) version: u32,
    /// The image's `[packages]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PackageLock>,
    /// Each stage's `[stage.packages]`, by stage name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stage: BTreeMap<String, PackageLock>,
    #[serde(default, rename = "base", skip_serializing_if = "Vec::is_empty")]
    pub(crate) bases: Vec<BasePin>,
}

impl Lockfile {
    /// The section for `stage` (`None`: the image's).
    pub fn section(&self, stage: Option<&str>) -> Option<&PackageLock> {
        match stage {
            None => self.image.as_ref(),
            Some(s) => self.stage.get(s),
        }
    }
}

/// The base pins in the lockfile at `path` (none when there is no file).
/// Only the pins are read, so a recipe without `[packages]` can have them.
pub fn load_pins(path: &Path) -> Result<Vec<BasePin>, BuildError> {
    #[derive(Deserialize)]
    struct Pins {
        #[serde(default, rename = "base")]
        bases: Vec<BasePin>,
    }
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(BuildError::Read { path: path.to_path_buf(), source: e }),
    };
    let pins: Pins = toml::from_str(&text).map_err(|e| bad_lockfile(path, &text, &e))?;
    Ok(pins.bases)
}

/// Writes `pins` into the lockfile at `path`, keeping its packages.
/// Returns whether the file changed.
pub fn save_pins(path: &Path, mut pins: Vec<BasePin>) -> Result<bool, BuildError> {
    pins.sort_by(|a, b| a.reference.cmp(&b.reference));
    let text = match Lockfile::load(path) {
        Ok(Some(mut lock)) => {
            if lock.bases == pins {
                return Ok(false);
            }
            lock.bases = pins;
            lock.render()
        }
        _ => {
            if load_pins(path).ok() == Some(pins.clone()) {
                return Ok(false);
            }
            Lockfile { version: LOCK_VERSION, image: None, stage: BTreeMap::new(), bases: pins }.render()
        }
    };
    let tmp = path.with_extension("lock.tmp");
    std::fs::write(&tmp, text).map_err(BuildError::io_write(&tmp))?;
    std::fs::rename(&tmp, path).map_err(BuildError::io_write(path))?;
    Ok(true)
}

const HEADER: &str = "# Written by `kiln lock`: the exact Debian packages and base images this recipe uses.\n# Do not edit; run `kiln lock` again to update.\n";

fn bad_lockfile(path: &Path, text: &str, e: &toml::de::Error) -> BuildError {
    let line = e.span().map(|s| text[..s.start].lines().count().max(1));
    BuildError::usage(
        format!(
            "`{}`{} is not a valid lockfile: {}",
            path.display(),
            line.map(|l| format!(" line {l}")).unwrap_or_default(),
            // toml quotes what it read (an unknown key): shown escaped and cut.
            crate::error::shown(e.message().trim())
        ),
        Some("run `kiln lock RECIPE` to write it again"),
    )
}

impl Lockfile {
    pub fn path_for(recipe_dir: &Path) -> PathBuf {
        recipe_dir.join(FILE_NAME)
    }

    pub(crate) fn render(&self) -> String {
        let body = toml::to_string(self).expect("a lockfile serializes");
        format!("{HEADER}\n{body}")
    }

    /// Reads the lockfile at `path`; `None` when there is none.
    pub(crate) fn load(path: &Path) -> Result<Option<Lockfile>, BuildError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BuildError::Read { path: path.to_path_buf(), source: e }),
        };
        // The version first: an older layout would fail on its first key.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        let v: Version = toml::from_str(&text).map_err(|e| bad_lockfile(path, &text, &e))?;
        if v.version != LOCK_VERSION {
            return Err(BuildError::usage(
                format!(
                    "`{}` is lockfile version {}; this kiln reads version {LOCK_VERSION}",
                    path.display(),
                    v.version
                ),
                Some("run `kiln lock RECIPE` to write it again"),
            ));
        }
        let lock: Lockfile = toml::from_str(&text).map_err(|e| bad_lockfile(path, &text, &e))?;
        // A lockfile comes with the recipe, from whoever wrote it: every
        // field a path, a URL or a shell word is made of is checked, and
        // an error names the entry only by what passed the check.
        let plain = crate::deb822::is_plain_word;
        let request_words = |r: &LockRequest| {
            r.suites.iter().chain(&r.components).chain(&r.exclude).all(|w| plain(w))
                && plain(&r.architecture)
                && r.include.iter().all(|i| match i.split_once('=') {
                    Some((n, v)) => plain(n) && plain(v),
                    None => plain(i),
                })
        };
        for set in lock.image.iter().chain(lock.stage.values()) {
            let sources_ok = set.sources.iter().all(|s| {
                plain(&s.suite)
                    && s.inrelease_sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    && !s.date.contains(char::is_control)
            });
            if !request_words(&set.request) || !sources_ok {
                return Err(BuildError::usage(
                    format!("`{}`: a `request` or `source` table is malformed", path.display()),
                    Some("run `kiln lock RECIPE` to write it again"),
                ));
            }
            for p in &set.packages {
                let ok = p.sha256.len() == 64
                    && p.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                    && crate::deb822::is_pool_path(&p.filename)
                    && plain(&p.name)
                    && plain(&p.version)
                    && plain(&p.architecture)
                    && set.request.suites.contains(&p.suite);
                if !ok {
                    let name = if plain(&p.name) { p.name.as_str() } else { "?" };
                    return Err(BuildError::usage(
                        format!(
                            "`{}`: the entry for the package `{name}` is malformed (its name, version, architecture, suite, sha256 or filename)",
                            path.display()
                        ),
                        Some("run `kiln lock RECIPE` to write it again"),
                    ));
                }
            }
        }
        Ok(Some(lock))
    }
}

impl PackageLock {
    /// The differences between what the recipe asks and what this lock answers.
    pub(crate) fn mismatch(&self, want: &LockRequest) -> Vec<String> {
        let r = &self.request;
        let mut out = Vec::new();
        if r.suites != want.suites {
            out.push(format!("suites are {:?} in the recipe, {:?} in the lock", want.suites, r.suites));
        }
        if r.scripts != want.scripts {
            out.push(format!("scripts is {} in the recipe, {} in the lock", want.scripts, r.scripts));
        }
        if r.components != want.components {
            out.push(format!(
                "components are {:?} in the recipe, {:?} in the lock",
                want.components, r.components
            ));
        }
        if r.architecture != want.architecture {
            out.push(format!(
                "architecture is `{}` for this build, `{}` in the lock",
                want.architecture, r.architecture
            ));
        }
        let added: Vec<&String> = want.include.iter().filter(|i| !r.include.contains(i)).collect();
        let removed: Vec<&String> = r.include.iter().filter(|i| !want.include.contains(i)).collect();
        if !added.is_empty() {
            out.push(format!("include adds {}", quoted(&added)));
        }
        if !removed.is_empty() {
            out.push(format!("include no longer has {}", quoted(&removed)));
        }
        if r.exclude != want.exclude {
            out.push(format!("exclude is {:?} in the recipe, {:?} in the lock", want.exclude, r.exclude));
        }
        out
    }
}

fn quoted(v: &[&String]) -> String {
    v.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "version = 2\n[image.request]\nsuites = [\"s\"]\ncomponents = [\"main\"]\narchitecture = \"amd64\"\ninclude = [\"a\"]\nexclude = []\nscripts = true\n[[image.source]]\nsuite = \"s\"\ndate = \"d\"\ninrelease_sha256 = \"00\"\n[[image.package]]\nname = \"a\"\nversion = \"1.0-1\"\narchitecture = \"amd64\"\nsuite = \"s\"\nfilename = \"pool/a.deb\"\nsize = 1\nsha256 = \"0000000000000000000000000000000000000000000000000000000000000000\"\n";

    fn load(text: &str) -> Result<Option<Lockfile>, BuildError> {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("kiln.lock");
        std::fs::write(&path, text).unwrap();
        Lockfile::load(&path)
    }

    #[test]
    fn a_hostile_lockfile_is_refused_without_echoing_it() {
        assert!(load(GOOD).unwrap().unwrap().section(None).is_some());
        for (from, to) in [
            ("filename = \"pool/a.deb\"", "filename = \"../../etc/shadow\""),
            ("filename = \"pool/a.deb\"", "filename = \"pool/a.deb?x=1\""),
            ("name = \"a\"", "name = \"a; rm -rf /\""),
            ("name = \"a\"", "name = \"\\u001b[31mred\""),
            ("version = \"1.0-1\"", "version = \"1 2\""),
            ("suite = \"s\"\nfilename", "suite = \"other\"\nfilename"),
        ] {
            let text = GOOD.replace(from, to);
            assert_ne!(text, GOOD);
            let e = load(&text).unwrap_err().to_string();
            assert!(e.contains("malformed"), "{to}: {e}");
            assert!(!e.contains("rm -rf") && !e.contains('\u{1b}') && !e.contains("shadow"), "{e}");
        }
        // A request or an unknown key with terminal escapes: refused, never printed raw.
        let e = load(&GOOD.replace(
            "architecture = \"amd64\"\ninclude",
            "architecture = \"\\u001b]0;pwned\\u0007\"\ninclude",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("malformed") && !e.contains('\u{1b}'), "{e}");
        let e = load(&GOOD.replace("[image.request]", "[image]\n\"\\u001b[31mx\" = 1\n[image.request]"))
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\u{1b}'), "{e}");
        // An older layout: named by its version, not by a parse error.
        let e = load("version = 1\n[request]\nsuite = \"s\"\n").unwrap_err().to_string();
        assert!(e.contains("lockfile version 1"), "{e}");
    }
}
