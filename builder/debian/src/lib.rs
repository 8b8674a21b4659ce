//! kiln-debian: `[packages]`, Debian packages resolved once by `kiln lock`
//! into `kiln.lock` and installed by every build from exactly those files.
//! Depends on the formats (`kiln-oci`) and the leaves (the store, the
//! recipe types) only; the caller passes the async runtime.
//!
//! - `archive`: the mirror, the signed InRelease, the Packages indexes.
//! - `resolve`: the dependency closure, with resolvo.
//! - [`lockfile`]: the `kiln.lock` file.
//! - [`install`]: `.deb` files → one layer, dpkg's database and the fixups
//!   maintainer scripts would have made; `ldcache`: `/etc/ld.so.cache`.
//! - [`sbom`]: the SPDX document written into the image.
//! - [`deb822`]: Debian's control format, versions and relations.

mod archive;
pub mod deb822;
pub mod install;
mod ldcache;
pub mod lockfile;
mod resolve;
pub mod sbom;

// The formats this crate writes, under the names its modules use.
pub(crate) use kiln_oci::{error, image, layer, listing, tarball};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;

use kiln_cache::{BlobWriter, Digest, ImageRecord, Store};
use kiln_recipes::recipe::{debian_architecture, Platform};
use kiln_recipes::{Packages, Recipe, StepKind};

use crate::error::BuildError;
use crate::layer::LayerEntry;
use archive::{IndexEntry, Mirror};
use lockfile::{LockRequest, LockSource, LockedPackage, Lockfile};
use resolve::{Request, ResolveError};

/// The recipe's `[packages]`, if it has one.
pub fn of(recipe: &Recipe) -> Option<&Packages> {
    recipe.steps.first().and_then(|s| match &s.kind {
        StepKind::Packages(p) => Some(p),
        _ => None,
    })
}

/// The Debian architecture packages are installed for.
pub(crate) fn architecture(p: &Packages, platform: &Platform) -> Result<String, BuildError> {
    match &p.architecture {
        Some(a) => Ok(a.clone()),
        None => debian_architecture(platform).map(str::to_string).ok_or_else(|| {
            BuildError::usage(
                format!("Debian has no architecture for the platform `{platform}`"),
                Some("set `architecture` in `[packages]`"),
            )
        }),
    }
}

/// The mirror to use: the recipe's, the host's apt sources', or `fallback`.
pub fn mirror_url(p: &Packages, fallback: Option<&str>) -> Result<String, BuildError> {
    p.mirror
        .clone()
        .or_else(archive::host_default_mirror)
        .or_else(|| fallback.map(str::to_string))
        .ok_or_else(|| {
            BuildError::usage(
                "No Debian mirror is set, and the host's apt sources name none",
                Some("set `mirror` in `[packages]` to the URL of a Debian mirror"),
            )
        })
}

/// What `kiln lock` did.
#[derive(Debug)]
pub struct LockOutcome {
    pub path: PathBuf,
    pub lock: Lockfile,
    /// False when the existing kiln.lock already held this resolution.
    pub changed: bool,
    pub index_packages: usize,
}

/// Resolves the recipe's `[packages]` against its mirror and writes
/// kiln.lock, fetching on `rt`.
pub fn lock(
    rt: &tokio::runtime::Handle,
    recipe: &Recipe,
    platform: Option<Platform>,
) -> Result<LockOutcome, BuildError> {
    let p = of(recipe).ok_or_else(|| {
        BuildError::usage(
            format!(
                "`{}` has no `[packages]` table and no `registry:` base with a tag; there is nothing to lock",
                recipe.file.display()
            ),
            Some("add `[packages]` with `suite` and `include`"),
        )
    })?;
    let platform = platform.or_else(|| recipe.image.platform.clone()).unwrap_or_else(Platform::host);
    let arch = architecture(p, &platform)?;
    let mirror = Mirror::new(&mirror_url(p, None)?)?;
    let keyring = vec![p.keyring.clone().unwrap_or_else(|| PathBuf::from(archive::DEFAULT_KEYRING))];
    let started = std::time::Instant::now();
    let keys = archive::load_keyring(&keyring)?;

    let (release, inrelease_sha, indexes) = rt.block_on(async {
        let path = format!("dists/{}/InRelease", p.suite);
        let data = mirror
            .get(&path)
            .await
            .map_err(|e| e.into_build_error(&format!("suite `{}` (InRelease)", p.suite)))?;
        let text = archive::verify_inrelease(&data, &keys, &format!("{}/{path}", mirror.url))?;
        let release = archive::Release::parse(&text)?;
        let fetches =
            p.components.iter().map(|c| archive::fetch_packages(&mirror, &p.suite, &release, c, &arch));
        let indexes: Vec<Vec<IndexEntry>> =
            futures_util::future::join_all(fetches).await.into_iter().collect::<Result<_, _>>()?;
        Ok::<_, BuildError>((release, Digest::of(&data).hex(), indexes))
    })?;
    tracing::debug!(elapsed = ?started.elapsed(), "indexes fetched and parsed");

    let pkgs: Vec<IndexEntry> =
        indexes.into_iter().flatten().filter(|e| e.architecture == arch || e.architecture == "all").collect();
    let include: Vec<Request> = p
        .include
        .iter()
        .map(|i| Request::parse(i))
        .collect::<Result<_, _>>()
        .map_err(|e| resolve_error(e, recipe))?;
    let chosen = resolve::resolve(&pkgs, &include, &p.exclude).map_err(|e| resolve_error(e, recipe))?;
    tracing::debug!(elapsed = ?started.elapsed(), chosen = chosen.len(), "resolved");

    let path = Lockfile::path_for(&recipe.dir);
    let old = Lockfile::load(&path).ok().flatten();
    let lock = Lockfile {
        version: lockfile::LOCK_VERSION,
        request: LockRequest::new(p, &arch),
        source: LockSource {
            mirror: mirror.url.clone(),
            date: release.date.clone(),
            inrelease_sha256: inrelease_sha,
        },
        packages: chosen
            .iter()
            .map(|i| {
                let e = &pkgs[*i];
                LockedPackage {
                    name: e.name.clone(),
                    version: e.version.clone(),
                    architecture: e.architecture.clone(),
                    filename: e.filename.clone(),
                    size: e.size,
                    sha256: e.sha256.clone(),
                }
            })
            .collect(),
        // Base pins are `kiln lock`'s other half (the build's `lock`); kept as they are.
        bases: match &old {
            Some(o) => o.bases.clone(),
            None => lockfile::load_pins(&path).unwrap_or_default(),
        },
    };
    // The same packages from the same request: keep the file as it is, so
    // re-locking an unchanged archive is not a diff.
    let same = old.as_ref().is_some_and(|o| o.request == lock.request && o.packages == lock.packages);
    if !same {
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, lock.render()).map_err(BuildError::io_write(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(BuildError::io_write(&path))?;
    }
    Ok(LockOutcome {
        path,
        lock: if same { old.expect("checked") } else { lock },
        changed: !same,
        index_packages: pkgs.len(),
    })
}

fn resolve_error(e: ResolveError, recipe: &Recipe) -> BuildError {
    let file = recipe.file.display();
    match e {
        ResolveError::Unknown(list) => {
            let mut msg = String::new();
            let mut hint = Vec::new();
            for (name, close) in &list {
                if !msg.is_empty() {
                    msg.push_str("; ");
                }
                msg.push_str(&format!("`{name}`"));
                if !close.is_empty() {
                    let c: Vec<String> = close.iter().map(|c| format!("`{c}`")).collect();
                    hint.push(format!("for `{name}`, did you mean {}?", c.join(", ")));
                }
            }
            let hint = if hint.is_empty() {
                "check the names with `apt-cache search`; `components` may need `contrib` or `non-free`"
                    .to_string()
            } else {
                hint.join(" ")
            };
            BuildError::usage(format!("{file}: no package in the archive is named {msg}"), Some(&hint))
        }
        ResolveError::BadRequest(s) => BuildError::usage(
            format!("{file}: `{s}` in `include` is not `NAME` or `NAME=VERSION`"),
            Some("e.g. `include = [\"python3-minimal\"]`"),
        ),
        ResolveError::Unsatisfiable(why) => BuildError::usage(
            format!("{file}: the packages cannot be installed together:\n{}", why.trim_end()),
            Some("drop or change a pinned version in `include`, or `exclude` a package the conflict names"),
        ),
    }
}

/// The recipe's kiln.lock, checked against `[packages]`: exit 2 with the
/// hint `kiln lock` when it is missing or out of date.
pub fn load_lock(recipe: &Recipe, p: &Packages, platform: &Platform) -> Result<Lockfile, BuildError> {
    let path = Lockfile::path_for(&recipe.dir);
    let arch = architecture(p, platform)?;
    let want = LockRequest::new(p, &arch);
    let hint = format!("run `kiln lock {}` to resolve the packages again", recipe.file.display());
    let lock = Lockfile::load(&path)?.ok_or_else(|| {
        BuildError::usage(
            format!(
                "`{}` has `[packages]` but there is no `{}` beside it",
                recipe.file.display(),
                path.display()
            ),
            Some(&hint),
        )
    })?;
    let diff = lock.mismatch(&want);
    if !diff.is_empty() {
        return Err(BuildError::usage(
            format!("`{}` is out of date with the recipe: {}", path.display(), diff.join("; ")),
            Some(&hint),
        ));
    }
    Ok(lock)
}

/// What decides the packages' layer: the locked files, the mirror named in
/// the SBOM, and how kiln installs.
pub fn key_params(lock: &Lockfile) -> serde_json::Value {
    serde_json::json!({
        "packages": lock.packages.iter().map(|p| format!("{} {} {} {}", p.name, p.version, p.architecture, p.sha256)).collect::<Vec<_>>(),
        "mirror": lock.source.mirror,
        "suite": lock.request.suite,
        "install": install::INSTALL_SCHEMA,
    })
}

fn deb_digest(p: &LockedPackage) -> Digest {
    Digest::from_hex(&p.sha256).expect("lockfile sha256s are checked on load")
}

/// Downloads the locked `.deb`s the store lacks, several at a time, each
/// checked against its sha256 before it is kept. `on_notice` hears one line.
pub fn fetch(
    store: &Store,
    rt: &tokio::runtime::Handle,
    lock: &Lockfile,
    mirror: &str,
    on_notice: &dyn Fn(&str),
) -> Result<(), BuildError> {
    let missing: Vec<&LockedPackage> =
        lock.packages.iter().filter(|p| !store.has_blob(&deb_digest(p))).collect();
    for p in &lock.packages {
        if store.has_blob(&deb_digest(p)) {
            let record = ImageRecord {
                name: format!("deb {} {}", p.name, p.version),
                manifest: deb_digest(p),
                blobs: vec![deb_digest(p)],
            };
            let _ = store.write_record(kiln_cache::RecordKind::Deb, &p.sha256, &record);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let bytes: u64 = missing.iter().map(|p| p.size).sum();
    on_notice(&format!(
        "packages: downloading {} .deb file(s), {:.1} MB, from {mirror}",
        missing.len(),
        bytes as f64 / 1e6
    ));
    let mirror = Arc::new(Mirror::new(mirror)?);
    let store = Arc::new(store.clone());
    rt.block_on(async {
        let results: Vec<Result<(), BuildError>> = futures_util::stream::iter(missing.into_iter().cloned())
            .map(|p| {
                let mirror = mirror.clone();
                let store = store.clone();
                async move { download(&store, &mirror, &p).await }
            })
            .buffer_unordered(6)
            .collect()
            .await;
        results.into_iter().collect::<Result<Vec<()>, _>>().map(|_| ())
    })
}

async fn download(store: &Store, mirror: &Mirror, p: &LockedPackage) -> Result<(), BuildError> {
    let mut w = BlobWriter::new(store)?;
    let mut size = 0u64;
    let limit = p.size;
    mirror
        .get_into(&p.filename, &mut |chunk| {
            size += chunk.len() as u64;
            if size > limit {
                return Err(std::io::Error::other("the file is larger than kiln.lock says"));
            }
            std::io::Write::write_all(&mut w, chunk)
        })
        .await
        .map_err(|e| e.into_build_error(&format!("`{}` {}", p.name, p.version)))?;
    let expected = deb_digest(p);
    if size != p.size {
        return Err(tampered(p, &format!("{size} bytes where kiln.lock says {}", p.size)));
    }
    match w.commit_expecting(&expected) {
        Ok(_) => {}
        Err(kiln_cache::StoreError::DigestMismatch { actual, .. }) => {
            return Err(tampered(p, &format!("sha256 {} where kiln.lock says {}", actual.hex(), p.sha256)))
        }
        Err(e) => return Err(e.into()),
    }
    let record = ImageRecord {
        name: format!("deb {} {}", p.name, p.version),
        manifest: expected,
        blobs: vec![expected],
    };
    store.write_record(kiln_cache::RecordKind::Deb, &p.sha256, &record)?;
    Ok(())
}

fn tampered(p: &LockedPackage, what: &str) -> BuildError {
    BuildError::Integrity {
        message: format!("The downloaded `{}` ({}) is refused: {what}", p.filename, p.name),
        hint: "the mirror serves a different file than the one locked; check `mirror`, or run `kiln lock` if the archive really changed".into(),
    }
}

/// The packages' layer entries, read from the store's `.deb`s; the file
/// data sits in `scratch` until the layer is written.
pub fn layer_entries(
    store: &Store,
    lock: &Lockfile,
    epoch: u64,
    scratch: &Path,
    below: &install::Below<'_>,
) -> Result<Vec<LayerEntry>, BuildError> {
    // Unpack on every core: xz decoding is most of the time.
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<install::Unpacked, BuildError>>>> =
        lock.packages.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.min(lock.packages.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(p) = lock.packages.get(i) else { break };
                let d = deb_digest(p);
                let r = store.open_blob(&d).map_err(BuildError::from).and_then(|_| {
                    install::unpack_deb(&store.blob_path(&d), &p.name, &d, &scratch.join(format!("{i}.data")))
                });
                *slots[i].lock().expect("slot") = Some(r);
            });
        }
    });
    let unpacked: Vec<install::Unpacked> = slots
        .into_iter()
        .map(|s| s.into_inner().expect("slot").expect("every package was unpacked"))
        .collect::<Result<_, _>>()?;
    for (u, p) in unpacked.iter().zip(&lock.packages) {
        if u.control.get("Version") != Some(p.version.as_str()) {
            return Err(BuildError::Integrity {
                message: format!(
                    "The package `{}` says it is version `{}`, kiln.lock says `{}`",
                    p.name,
                    u.control.get("Version").unwrap_or(""),
                    p.version
                ),
                hint: "run `kiln lock` again".into(),
            });
        }
    }
    let controls: Vec<&deb822::Paragraph> = unpacked.iter().map(|u| &u.control).collect();
    let doc = sbom::document(lock, &controls, epoch);
    install::layer_entries(&unpacked, &doc, below)
}
