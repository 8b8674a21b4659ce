//! kiln-debian: `[packages]`, Debian packages resolved once by `kiln lock`
//! into `kiln.lock` and installed by every build from exactly those files.
//! Depends on the formats (`kiln-oci`) and the leaves (the store, the
//! recipe types) only; the caller passes the async runtime.
//!
//! - `archive`: the mirrors, the signed InRelease, the Packages indexes.
//! - `resolve`: the dependency closure, with resolvo.
//! - [`lockfile`]: the `kiln.lock` file.
//! - [`install`]: `.deb` files → one layer, dpkg's database, and (with
//!   `scripts = false`) the fixups maintainer scripts would have made;
//!   `ldcache`: `/etc/ld.so.cache`.
//! - [`configure`]: the driver that runs the maintainer scripts in the
//!   sandbox (the CONFIGURE step).
//! - [`sbom`]: the SPDX document written into the image.
//! - [`deb822`]: Debian's control format, versions and relations.

mod archive;
pub mod configure;
pub mod deb822;
pub mod install;
mod ldcache;
pub mod lockfile;
mod resolve;
pub mod sbom;

// The formats this crate writes, under the names its modules use.
pub(crate) use kiln_oci::{error, image, layer, listing, tarball};

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::StreamExt;

use kiln_cache::{BlobWriter, Digest, ImageRecord, Store};
use kiln_recipes::recipe::{debian_architecture, Platform};
use kiln_recipes::{Packages, Recipe, StepKind, Suite};

use crate::error::BuildError;
use crate::layer::LayerEntry;
use archive::{IndexEntry, Mirror};
use kiln_oci::reporter::{Meter, Reporter};
use lockfile::{LockRequest, LockSource, LockedPackage, Lockfile, PackageLock};
use resolve::{Request, ResolveError};

/// The recipe's `[packages]`, if it has one.
pub fn of(recipe: &Recipe) -> Option<&Packages> {
    first_packages(&recipe.steps)
}

fn first_packages(steps: &[kiln_recipes::Step]) -> Option<&Packages> {
    steps.first().and_then(|s| match &s.kind {
        StepKind::Packages(p) => Some(p),
        _ => None,
    })
}

/// Every `[packages]` of the recipe: each stage's, then the image's.
pub fn all(recipe: &Recipe) -> Vec<&Packages> {
    recipe.stages.iter().filter_map(|st| first_packages(&st.steps)).chain(of(recipe)).collect()
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

/// Where `suite` is fetched from: its own `mirror` in the recipe; else the
/// recipe's `mirror` (for a `-security` suite, its `-security` twin:
/// `.../debian` → `.../debian-security`); else, with no `mirror` in the
/// recipe, the host's apt source that lists the suite, or the host's main
/// archive (likewise). `None`: nowhere known.
pub fn suite_mirror(p: &Packages, suite: &Suite) -> Option<String> {
    suite_mirror_in(p, suite, &archive::host_sources())
}

fn suite_mirror_in(p: &Packages, suite: &Suite, host: &[(String, Vec<String>)]) -> Option<String> {
    if let Some(m) = &suite.mirror {
        return Some(m.clone());
    }
    let security = suite.name.ends_with("-security");
    let for_suite = |m: &str| match security {
        true => m.ends_with("/debian").then(|| format!("{m}-security")),
        false => Some(m.to_string()),
    };
    if let Some(m) = &p.mirror {
        return for_suite(m);
    }
    if let Some((u, _)) = host.iter().find(|(_, s)| s.contains(&suite.name)) {
        return Some(u.clone());
    }
    archive::main_archive(host).and_then(|m| for_suite(&m))
}

fn no_mirror(suite: &str) -> BuildError {
    BuildError::usage(
        format!("No Debian mirror is known for the suite `{suite}`: the recipe sets none and the host's apt sources name none"),
        Some("set `mirror` in `[packages]` to the URL of a Debian mirror, or give the suite its own: `suites = [{ name = \"SUITE\", mirror = \"URL\" }]`"),
    )
}

/// How `kiln lock` treats a lock that already answers the recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Keep it; resolve only the sets whose request changed (or are new).
    Keep,
    /// Resolve every set again against the archives (`--update`).
    Update,
    /// Resolve again but write nothing; report what would change (`--check`).
    Check,
}

/// One set of packages `kiln lock` looked at.
#[derive(Debug)]
pub struct SetOutcome {
    /// The stage (`None`: the image).
    pub stage: Option<String>,
    pub lock: PackageLock,
    /// Whether the set differs from what kiln.lock held.
    pub changed: bool,
    /// Packages in the indexes read; 0 when the lock was kept unread.
    pub index_packages: usize,
    /// Implied suites the archive does not have.
    pub skipped: Vec<String>,
    /// What changed against kiln.lock, a line per package
    /// (`libssl3 3.0.17-1~deb12u2 -> 3.0.18-1~deb12u1 (bookworm-security)`).
    pub updates: Vec<String>,
}

/// What `kiln lock` did.
#[derive(Debug)]
pub struct LockOutcome {
    pub path: PathBuf,
    pub sets: Vec<SetOutcome>,
    /// Whether kiln.lock was written.
    pub written: bool,
    /// `--check`: kiln.lock is missing, or does not answer the recipe.
    pub stale: Vec<String>,
}

/// Resolves the recipe's `[packages]` (the image's and each stage's)
/// against their archives and writes kiln.lock, fetching on `rt`.
pub fn lock(
    rt: &tokio::runtime::Handle,
    recipe: &Recipe,
    platform: Option<Platform>,
    mode: LockMode,
) -> Result<LockOutcome, BuildError> {
    let sets = all(recipe);
    if sets.is_empty() {
        return Err(BuildError::usage(
            format!(
                "`{}` has no `[packages]` table and no `registry:` base with a tag; there is nothing to lock",
                recipe.file.display()
            ),
            Some("add `[packages]` with `suite` and `include`"),
        ));
    }
    let platform = platform.or_else(|| recipe.image.platform.clone()).unwrap_or_else(Platform::host);
    let path = Lockfile::path_for(&recipe.dir);
    let old = match Lockfile::load(&path) {
        Ok(l) => l,
        // An unreadable lock is resolved again; `--check` says why it is stale.
        Err(e) if mode != LockMode::Check => {
            tracing::debug!(error = %e, "the old kiln.lock is not read");
            None
        }
        Err(e) => return Err(e),
    };
    let mut outcome = LockOutcome { path: path.clone(), sets: Vec::new(), written: false, stale: Vec::new() };
    for p in sets {
        let arch = architecture(p, &platform)?;
        let want = LockRequest::new(p, &arch);
        let previous = old.as_ref().and_then(|o| o.section(p.stage.as_deref()));
        let label = section_label(p.stage.as_deref());
        match previous {
            None => outcome.stale.push(format!("kiln.lock has no section for {label}")),
            Some(prev) => {
                let diff = prev.mismatch(&want);
                if !diff.is_empty() {
                    outcome.stale.push(format!("{label}: {}", diff.join("; ")));
                }
            }
        }
        if mode == LockMode::Keep {
            if let Some(prev) = previous.filter(|prev| prev.mismatch(&want).is_empty()) {
                outcome.sets.push(SetOutcome {
                    stage: p.stage.clone(),
                    lock: prev.clone(),
                    changed: false,
                    index_packages: 0,
                    skipped: Vec::new(),
                    updates: Vec::new(),
                });
                continue;
            }
        }
        let (mut lock, index_packages, skipped) = resolve_set(rt, recipe, p, want)?;
        let updates = previous.map(|prev| updates(prev, &lock)).unwrap_or_default();
        // The same packages for the same request: the section stays as it
        // is (its InRelease dates too), so an archive that only published
        // again is not a diff.
        let changed = match previous {
            Some(prev) if prev.request == lock.request && prev.packages == lock.packages => {
                lock = prev.clone();
                false
            }
            _ => true,
        };
        outcome.sets.push(SetOutcome {
            stage: p.stage.clone(),
            lock,
            changed,
            index_packages,
            skipped,
            updates,
        });
    }
    let any_changed = outcome.sets.iter().any(|s| s.changed);
    let dropped = old.as_ref().is_some_and(|o| {
        o.stage.keys().any(|k| !outcome.sets.iter().any(|s| s.stage.as_deref() == Some(k)))
            || (o.image.is_some() && !outcome.sets.iter().any(|s| s.stage.is_none()))
    });
    if mode != LockMode::Check && (any_changed || dropped || old.is_none()) {
        let mut file = Lockfile {
            version: lockfile::LOCK_VERSION,
            image: None,
            stage: Default::default(),
            // Base pins are `kiln lock`'s other half (the build's `lock`); kept as they are.
            bases: match &old {
                Some(o) => o.bases.clone(),
                None => lockfile::load_pins(&path).unwrap_or_default(),
            },
        };
        for s in &outcome.sets {
            match &s.stage {
                None => file.image = Some(s.lock.clone()),
                Some(name) => {
                    file.stage.insert(name.clone(), s.lock.clone());
                }
            }
        }
        let tmp = path.with_extension("lock.tmp");
        std::fs::write(&tmp, file.render()).map_err(BuildError::io_write(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(BuildError::io_write(&path))?;
        outcome.written = true;
    }
    Ok(outcome)
}

/// `the image's [packages]` or `[stage.packages] of `build``.
fn section_label(stage: Option<&str>) -> String {
    match stage {
        None => "the image's `[packages]`".into(),
        Some(s) => format!("the `[stage.packages]` of `{s}`"),
    }
}

/// The packages whose version or archive differ, a line each.
fn updates(old: &PackageLock, new: &PackageLock) -> Vec<String> {
    let mut out = Vec::new();
    for n in &new.packages {
        match old.packages.iter().find(|o| o.name == n.name && o.architecture == n.architecture) {
            Some(o) if o.version == n.version && o.sha256 == n.sha256 => {}
            Some(o) => out.push(format!("{} {} -> {} ({})", n.name, o.version, n.version, n.suite)),
            None => out.push(format!("{} (new) {} ({})", n.name, n.version, n.suite)),
        }
    }
    for o in &old.packages {
        if !new.packages.iter().any(|n| n.name == o.name && n.architecture == o.architecture) {
            out.push(format!("{} {} -> (removed)", o.name, o.version));
        }
    }
    out
}

/// Reads every suite of `p` (each InRelease verified, each index checked
/// against it) and resolves the request over their union.
fn resolve_set(
    rt: &tokio::runtime::Handle,
    recipe: &Recipe,
    p: &Packages,
    want: LockRequest,
) -> Result<(PackageLock, usize, Vec<String>), BuildError> {
    let arch = want.architecture.clone();
    let keyring = vec![p.keyring.clone().unwrap_or_else(|| PathBuf::from(archive::DEFAULT_KEYRING))];
    let started = std::time::Instant::now();
    let keys = archive::load_keyring(&keyring)?;
    let mut sources = Vec::new();
    let mut skipped = Vec::new();
    let mut pkgs: Vec<IndexEntry> = Vec::new();
    let mut seen: std::collections::HashSet<(String, String, String)> = Default::default();
    for suite in &p.suites {
        let url = suite_mirror(p, suite);
        let Some(url) = url else {
            if suite.optional {
                skipped.push(suite.name.clone());
                continue;
            }
            return Err(no_mirror(&suite.name));
        };
        let mirror = Mirror::new(&url)?;
        let fetched = rt.block_on(async {
            let path = format!("dists/{}/InRelease", suite.name);
            let data = match mirror.get(&path).await {
                Ok(d) => d,
                Err(archive::FetchError::NotFound { .. }) if suite.optional => return Ok(None),
                Err(e) => return Err(e.into_build_error(&format!("suite `{}` (InRelease)", suite.name))),
            };
            let text = archive::verify_inrelease(&data, &keys, &format!("{}/{path}", mirror.url))?;
            let release = archive::Release::parse(&text)?;
            let fetches = p
                .components
                .iter()
                .map(|c| archive::fetch_packages(&mirror, &suite.name, &release, c, &arch));
            let indexes: Vec<Vec<IndexEntry>> =
                futures_util::future::join_all(fetches).await.into_iter().collect::<Result<_, _>>()?;
            Ok::<_, BuildError>(Some((release, Digest::of(&data).hex(), indexes)))
        })?;
        let Some((release, inrelease_sha, indexes)) = fetched else {
            skipped.push(suite.name.clone());
            continue;
        };
        sources.push(LockSource {
            suite: suite.name.clone(),
            date: release.date.clone(),
            inrelease_sha256: inrelease_sha,
        });
        // The same file in two suites (a point release took it in) counts
        // once, from the suite listed first.
        for mut e in indexes.into_iter().flatten() {
            if (e.architecture == arch || e.architecture == "all")
                && seen.insert((e.name.clone(), e.version.clone(), e.architecture.clone()))
            {
                e.suite = suite.name.clone();
                pkgs.push(e);
            }
        }
    }
    tracing::debug!(elapsed = ?started.elapsed(), suites = sources.len(), "indexes fetched and parsed");

    let mut include: Vec<Request> = p
        .include
        .iter()
        .map(|i| Request::parse(i))
        .collect::<Result<_, _>>()
        .map_err(|e| resolve_error(e, recipe))?;
    if p.scripts {
        // As apt: the Essential packages are on every system, and the
        // maintainer scripts count on them (a shell, dpkg's tools).
        let mut essential: Vec<&str> = pkgs
            .iter()
            .filter(|e| e.essential && !p.exclude.contains(&e.name))
            .map(|e| e.name.as_str())
            .collect();
        essential.sort();
        essential.dedup();
        // kiln lays out merged /usr itself, as debootstrap does: the
        // marker package says so, so `usrmerge | usr-is-merged` (bookworm's
        // init-system-helpers) takes it and not the converter and perl.
        if pkgs.iter().any(|e| e.name == "usr-is-merged") && !p.exclude.iter().any(|x| x == "usr-is-merged") {
            essential.push("usr-is-merged");
        }
        for name in essential {
            if !include.iter().any(|r| r.name == name) {
                include.push(Request::parse(name).map_err(|e| resolve_error(e, recipe))?);
            }
        }
    }
    let chosen = resolve::resolve(&pkgs, &include, &p.exclude).map_err(|e| resolve_error(e, recipe))?;
    tracing::debug!(elapsed = ?started.elapsed(), chosen = chosen.len(), "resolved");
    let lock = PackageLock {
        request: want,
        sources,
        packages: chosen
            .iter()
            .map(|i| {
                let e = &pkgs[*i];
                LockedPackage {
                    name: e.name.clone(),
                    version: e.version.clone(),
                    architecture: e.architecture.clone(),
                    suite: e.suite.clone(),
                    filename: e.filename.clone(),
                    size: e.size,
                    sha256: e.sha256.clone(),
                }
            })
            .collect(),
    };
    Ok((lock, pkgs.len(), skipped))
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

/// The section of the recipe's kiln.lock for `p`, checked against it:
/// exit 2 with the hint `kiln lock` when it is missing or out of date.
pub fn load_lock(recipe: &Recipe, p: &Packages, platform: &Platform) -> Result<PackageLock, BuildError> {
    let path = Lockfile::path_for(&recipe.dir);
    let arch = architecture(p, platform)?;
    let want = LockRequest::new(p, &arch);
    let hint = format!("run `kiln lock {}` to resolve the packages again", recipe.file.display());
    let label = section_label(p.stage.as_deref());
    let lock = Lockfile::load(&path)?.ok_or_else(|| {
        BuildError::usage(
            format!("`{}` has {label} but there is no `{}` beside it", recipe.file.display(), path.display()),
            Some(&hint),
        )
    })?;
    let section = lock.section(p.stage.as_deref()).ok_or_else(|| {
        BuildError::usage(format!("`{}` has no section for {label}", path.display()), Some(&hint))
    })?;
    let diff = section.mismatch(&want);
    if !diff.is_empty() {
        // A lock holds one architecture: for another platform, lock for it.
        let hint = match section.request.architecture != want.architecture {
            true => format!(
                "kiln.lock holds one architecture per target: run `kiln lock --platform {platform} {}`, or keep a recipe (or `architecture`) per platform",
                recipe.file.display()
            ),
            false => hint,
        };
        return Err(BuildError::usage(
            format!("`{}` is out of date with {label}: {}", path.display(), diff.join("; ")),
            Some(&hint),
        ));
    }
    Ok(section.clone())
}

/// What decides the packages' layer: the locked files, the release (named
/// in the SBOM), and how kiln installs. Not the mirror: the same files
/// come from any mirror of the archive.
pub fn key_params(lock: &PackageLock) -> serde_json::Value {
    serde_json::json!({
        "packages": lock.packages.iter().map(|p| format!("{} {} {} {} {}", p.name, p.version, p.architecture, p.suite, p.sha256)).collect::<Vec<_>>(),
        "suites": lock.request.suites,
        "scripts": lock.request.scripts,
        "install": install::INSTALL_SCHEMA,
    })
}

fn deb_digest(p: &LockedPackage) -> Digest {
    Digest::from_hex(&p.sha256).expect("lockfile sha256s are checked on load")
}

/// Hands each locked `.deb` to `on_each` (by its index in the lock) once
/// it is in the store: those already there first, biggest first, then
/// each download as it lands. A download comes from its suite's mirror,
/// several at a time, and is checked against its sha256 before it is
/// kept. `reporter` hears one line, and a meter counts the bytes. The first error is returned once
/// every download has ended.
fn fetch_each(
    store: &Store,
    rt: &tokio::runtime::Handle,
    p: &Packages,
    lock: &PackageLock,
    reporter: &dyn Reporter,
    on_each: &(dyn Fn(usize) + Sync),
) -> Result<(), BuildError> {
    let mut order: Vec<usize> = (0..lock.packages.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lock.packages[i].size));
    let mut missing: Vec<(usize, &LockedPackage)> = Vec::new();
    for i in order {
        let p = &lock.packages[i];
        if !store.has_blob(&deb_digest(p)) {
            missing.push((i, p));
            continue;
        }
        let record = ImageRecord {
            name: format!("deb {} {}", p.name, p.version),
            manifest: deb_digest(p),
            blobs: vec![deb_digest(p)],
        };
        let _ = store.write_record(kiln_cache::RecordKind::Deb, &p.sha256, &record);
        on_each(i);
    }
    if missing.is_empty() {
        return Ok(());
    }
    // Each suite's mirror, for the suites the missing files come from.
    let mut mirrors: std::collections::BTreeMap<&str, Arc<Mirror>> = Default::default();
    for (_, d) in &missing {
        if mirrors.contains_key(d.suite.as_str()) {
            continue;
        }
        // A locked suite is one of the request's, which are the recipe's (load_lock checked both).
        let suite = p.suites.iter().find(|s| s.name == d.suite).ok_or_else(|| no_mirror(&d.suite))?;
        let url = suite_mirror(p, suite).ok_or_else(|| no_mirror(&suite.name))?;
        mirrors.insert(d.suite.as_str(), Arc::new(Mirror::new(&url)?));
    }
    let bytes: u64 = missing.iter().map(|(_, p)| p.size).sum();
    let from: Vec<&str> = mirrors.values().map(|m| m.url.as_str()).collect();
    reporter.on_notice(&format!(
        "packages: downloading {} .deb file(s), {:.1} MB, from {}",
        missing.len(),
        bytes as f64 / 1e6,
        from.join(" and ")
    ));
    let meter = reporter.meter(&format!("downloading {} .deb file(s)", missing.len()), Some(bytes));
    let meter = meter.as_ref();
    let store = Arc::new(store.clone());
    let started = std::time::Instant::now();
    rt.block_on(async {
        let mut first: Option<BuildError> = None;
        let mut done = futures_util::stream::iter(missing.into_iter().map(|(i, p)| (i, p.clone())))
            .map(|(i, p)| {
                let mirror = mirrors[p.suite.as_str()].clone();
                let store = store.clone();
                async move { (i, download(&store, &mirror, &p, meter).await) }
            })
            .buffer_unordered(6);
        while let Some((i, r)) = done.next().await {
            match r {
                Ok(()) => on_each(i),
                Err(e) => first = first.or(Some(e)),
            }
        }
        meter.finish();
        tracing::debug!(elapsed = ?started.elapsed(), "the .deb files downloaded");
        first.map_or(Ok(()), Err)
    })
}

async fn download(
    store: &Store,
    mirror: &Mirror,
    p: &LockedPackage,
    meter: &dyn Meter,
) -> Result<(), BuildError> {
    let mut w = BlobWriter::new(store)?;
    let mut size = 0u64;
    let limit = p.size;
    mirror
        .get_into(&p.filename, &mut |chunk| {
            size += chunk.len() as u64;
            if size > limit {
                return Err(std::io::Error::other("the file is larger than kiln.lock says"));
            }
            meter.advance(chunk.len() as u64);
            std::io::Write::write_all(&mut w, chunk)
        })
        .await
        .map_err(|e| e.into_build_error(&format!("`{}` {}", p.name, p.version)))?;
    let expected = deb_digest(p);
    if size != p.size {
        // What was read is never shown (a `file://` mirror can name any
        // file of the host): only that it is not the locked file.
        return Err(tampered(p, "its size differs from kiln.lock's"));
    }
    match w.commit_expecting(&expected) {
        Ok(_) => {}
        Err(kiln_cache::StoreError::DigestMismatch { actual, .. }) => {
            tracing::debug!(package = %p.name, actual = %actual, "sha256 differs from kiln.lock");
            return Err(tampered(p, &format!("its sha256 is not kiln.lock's {}", p.sha256)));
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

/// The packages' layer entries, from the store's `.deb`s, the missing ones
/// downloaded first: each `.deb` is unpacked (on every core: xz decoding
/// is most of the time) as soon as it is in the store, while the rest
/// download. The file data sits in `scratch` until the layer is written.
/// With `pool` (the layer is about to be made as a folder too), the files
/// also go into the store's file pool as they are decoded, so that making
/// the folder, after the last download, is mostly links; the pool files
/// made are returned, to be held until the folder is made.
#[allow(clippy::too_many_arguments)]
pub fn fetch_and_unpack(
    store: &Store,
    rt: &tokio::runtime::Handle,
    p: &Packages,
    lock: &PackageLock,
    epoch: u64,
    scratch: &Path,
    pool: Option<&Path>,
    below: &install::Below<'_>,
    reporter: &dyn Reporter,
) -> Result<(Vec<LayerEntry>, kiln_oci::unpack::PoolFiles), BuildError> {
    let started = std::time::Instant::now();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // Best effort, as each file put there: without the folder, the layer
    // writer makes every file itself.
    let pool = pool
        .filter(|dir| std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).is_ok())
        .map(|dir| install::PrePool { dir, mtime: epoch });
    let slots: Vec<std::sync::Mutex<Option<Result<install::Unpacked, BuildError>>>> =
        lock.packages.iter().map(|_| std::sync::Mutex::new(None)).collect();
    let (ready, queue) = std::sync::mpsc::channel::<usize>();
    let queue = std::sync::Mutex::new(queue);
    let fetched = std::thread::scope(|s| {
        for _ in 0..threads.min(lock.packages.len()) {
            s.spawn(|| loop {
                let next = queue.lock().expect("queue").recv();
                let Ok(i) = next else { break }; // every .deb was handed out
                let p = &lock.packages[i];
                let d = deb_digest(p);
                let r = store.open_blob(&d).map_err(BuildError::from).and_then(|_| {
                    install::unpack_deb(
                        &store.blob_path(&d),
                        &p.name,
                        &d,
                        &scratch.join(format!("{i}.data")),
                        pool.as_ref(),
                    )
                });
                *slots[i].lock().expect("slot") = Some(r);
            });
        }
        let fetched = fetch_each(store, rt, p, lock, reporter, &|i| {
            let _ = ready.send(i);
        });
        drop(ready); // the workers end once the queue is empty
        fetched
    });
    fetched?;
    tracing::debug!(elapsed = ?started.elapsed(), "the .deb files unpacked");
    let mut unpacked: Vec<install::Unpacked> = slots
        .into_iter()
        .map(|s| s.into_inner().expect("slot").expect("every package was fetched, so unpacked"))
        .collect::<Result<_, _>>()?;
    let mut pooled = kiln_oci::unpack::PoolFiles::default();
    for u in &mut unpacked {
        pooled.append(&mut u.pooled);
    }
    for (u, p) in unpacked.iter().zip(&lock.packages) {
        // The architecture names dpkg's info files (`NAME:ARCH`): it must be
        // the locked one, and Multi-Arch one of dpkg's words.
        let multi_arch = u.control.get("Multi-Arch");
        if u.arch != p.architecture
            || !matches!(multi_arch, None | Some("same" | "foreign" | "allowed" | "no"))
        {
            return Err(BuildError::Integrity {
                message: format!(
                    "The package `{}` is refused: its Architecture or Multi-Arch field is not what kiln.lock locked ({})",
                    p.name, p.architecture
                ),
                hint: "the .deb is not the one the archive's index described; run `kiln lock` again".into(),
            });
        }
        if u.control.get("Version") != Some(p.version.as_str()) {
            return Err(BuildError::Integrity {
                message: format!(
                    "The package `{}` says it is version `{}`, kiln.lock says `{}`",
                    p.name,
                    crate::error::shown(u.control.get("Version").unwrap_or("")),
                    p.version
                ),
                hint: "run `kiln lock` again".into(),
            });
        }
    }
    let controls: Vec<&deb822::Paragraph> = unpacked.iter().map(|u| &u.control).collect();
    let doc = sbom::document(lock, &controls, epoch);
    let entries = install::layer_entries(&unpacked, &doc, below, lock.request.scripts)?;
    Ok((entries, pooled))
}
