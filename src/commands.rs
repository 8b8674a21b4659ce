//! One function per command; each parses its arguments into engine calls.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command as Process;

use kiln_builder::BuildError;
use kiln_builder::BuildOptions;
use kiln_cache::prune::parse_size;
use kiln_cache::Store;
use kiln_recipes::recipe::Platform;
use kiln_recipes::{ImageRef, Recipe};

use crate::args::{CacheAction, Cli, Command, Common};

pub fn run(cli: Cli) -> Result<u8, BuildError> {
    match cli.command {
        Command::Build {
            recipe,
            outputs,
            common,
            backend,
            secrets,
            no_cache,
            progress,
            cache_to,
            monolithic_upload,
        } => {
            let recipe = load(&recipe)?;
            let mut opts = options(&common)?;
            opts.cache_to =
                cache_to.iter().map(|c| parse_cache_ref(c, "--cache-to")).collect::<Result<_, _>>()?;
            opts.registry.monolithic = monolithic_upload;
            opts.no_cache = no_cache;
            opts.backend = backend.choice();
            opts.secrets = secrets.iter().map(|s| parse_secret(s)).collect::<Result<_, _>>()?;
            opts.outputs = outputs.iter().map(|o| parse_ref(o, "-o")).collect::<Result<_, _>>()?;
            for o in &opts.outputs {
                if let ImageRef::Registry(r) = o {
                    // Checked before building, not when the push comes.
                    kiln_builder::registry::remote(r).map_err(|e| {
                        BuildError::usage(
                            format!("Bad -o `{o}`: {e}"),
                            Some("e.g. `-o registry:ghcr.io/org/app:1.0`"),
                        )
                    })?;
                }
            }
            let reporter = crate::progress::reporter(progress);
            let outcome = kiln_builder::build(&recipe, &opts, reporter)?;
            println!("{}", outcome.image.manifest);
            Ok(0)
        }
        Command::Plan { recipe, common, json } => {
            let recipe = load(&recipe)?;
            let opts = options(&common)?;
            let steps = kiln_builder::plan(&recipe, &opts)?;
            let mut out = std::io::stdout().lock();
            if json {
                let v: Vec<_> = steps
                    .iter()
                    .map(|s| {
                        serde_json::json!({"stage": s.info.stage, "step": s.info.index + 1, "line": s.info.line,
                        "description": s.info.description, "key": s.key.to_string(), "cached": s.hit})
                    })
                    .collect();
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                for s in &steps {
                    let hit = if s.hit { "HIT " } else { "MISS" };
                    let place = match &s.info.stage {
                        Some(st) => format!("{st} {}", s.info.index + 1),
                        None => format!("{}", s.info.index + 1),
                    };
                    let _ = writeln!(out, "{place:>3}  {hit}  {}  {}", s.key, s.info.description);
                }
            }
            Ok(0)
        }
        Command::Lock { recipe, platform, insecure_registry } => {
            let recipe = load(&recipe)?;
            let platform = parse_platform(platform.as_deref())?;
            let started = std::time::Instant::now();
            let tagged = kiln_builder::base::tagged_bases(&recipe)?;
            let has_packages = kiln_builder::packages::of(&recipe).is_some();
            if !tagged.is_empty() {
                let opts =
                    kiln_cache::registry::RegistryOptions { insecure: insecure_registry, monolithic: false };
                let (pins, changed) = kiln_builder::lock::bases(&recipe, &opts)?;
                let mut out = std::io::stdout().lock();
                for p in &pins {
                    let _ = writeln!(out, "{}\t{}", p.reference, p.digest);
                }
                eprintln!(
                    "kiln lock: {} {} base pin(s) in {}",
                    if changed { "wrote" } else { "up to date:" },
                    pins.len(),
                    kiln_builder::packages::lockfile::Lockfile::path_for(&recipe.dir).display()
                );
                if !has_packages {
                    return Ok(0);
                }
            }
            let o = kiln_builder::lock::packages(&recipe, platform)?;
            let verb = if o.changed { "wrote" } else { "is up to date:" };
            let bytes: u64 = o.lock.packages.iter().map(|p| p.size).sum();
            eprintln!(
                "kiln lock: {verb} {} ({} packages, {:.1} MB, for {} requested, out of {} in the index of {} {}; {:.1}s)",
                o.path.display(),
                o.lock.packages.len(),
                bytes as f64 / 1e6,
                o.lock.request.include.len(),
                o.index_packages,
                o.lock.source.mirror,
                o.lock.request.suite,
                started.elapsed().as_secs_f64()
            );
            let mut out = std::io::stdout().lock();
            for p in &o.lock.packages {
                let _ = writeln!(out, "{}\t{}\t{}", p.name, p.version, p.architecture);
            }
            Ok(0)
        }
        Command::Sbom { target, cache_dir } => {
            let store = open_store(cache_dir)?;
            let target = parse_ref(&target, "TARGET")?;
            let doc = kiln_builder::sbom::for_image(&store, &target)?;
            let _ = std::io::stdout().lock().write_all(&doc);
            Ok(0)
        }
        Command::Inspect { target, cache_dir, json } => {
            let store = open_store(cache_dir)?;
            let target = parse_ref(&target, "TARGET")?;
            let i = kiln_builder::inspect::inspect(&store, &target)?;
            let mut out = std::io::stdout().lock();
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&i).expect("json"));
            } else {
                let _ = writeln!(out, "manifest  {}", i.manifest);
                let _ = writeln!(out, "config    {}", i.config);
                let _ = writeln!(out, "platform  {}/{}", i.os, i.architecture);
                let _ = writeln!(out, "created   {}", i.created.as_deref().unwrap_or("-"));
                let _ = writeln!(out, "layers    {}", i.layers.len());
                for l in &i.layers {
                    let _ = writeln!(
                        out,
                        "  {}  {:>12}  {}",
                        l.digest,
                        l.size,
                        l.created_by.as_deref().unwrap_or("")
                    );
                }
                let _ = writeln!(out, "runtime   {}", i.config_json);
            }
            Ok(0)
        }
        Command::Diff { a, b, cache_dir, json } => {
            let store = open_store(cache_dir)?;
            let changes = kiln_builder::diff::diff(&store, &parse_ref(&a, "A")?, &parse_ref(&b, "B")?)?;
            let mut out = std::io::stdout().lock();
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&changes).expect("json"));
            } else {
                print_changes(&mut out, &changes);
            }
            Ok(if changes.is_empty() { 0 } else { 1 })
        }
        Command::Verify { recipe, context, platform, backend, secrets } => {
            for s in &secrets {
                parse_secret(s)?; // fail early, before two builds
            }
            verify(&recipe, context, platform, backend, &secrets)
        }
        Command::Cache { action, cache_dir } => {
            let store = open_store(cache_dir)?;
            let mut out = std::io::stdout().lock();
            match action {
                CacheAction::Du { json } => {
                    let u = store.usage()?;
                    if json {
                        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&u).expect("json"));
                    } else {
                        let _ = writeln!(
                            out,
                            "{}\t{} blobs\t{} steps\t{} images\t{} bases\t{} debs\t{} disks\t{} unpacked ({})\t{}",
                            human(u.blob_bytes),
                            u.blobs,
                            u.steps,
                            u.images,
                            u.bases,
                            u.debs,
                            u.disks,
                            u.unpacked,
                            human(u.unpacked_bytes),
                            u.root.display()
                        );
                    }
                }
                CacheAction::Ls { json } => {
                    let entries = store.entries()?;
                    if json {
                        let _ = writeln!(out, "{}", serde_json::to_string_pretty(&entries).expect("json"));
                    } else {
                        for e in entries {
                            let _ = writeln!(out, "{}\t{}\t{}\t{}", e.used_unix, e.kind, e.name, e.label);
                        }
                    }
                }
                CacheAction::Prune { max_size } => {
                    let max = parse_size(&max_size).ok_or_else(|| {
                        BuildError::usage(
                            format!("`{max_size}` is not a size"),
                            Some("write sizes like `500M`, `2G` or `1048576`"),
                        )
                    })?;
                    print_prune(&mut out, &store.prune(max, &wait_note)?);
                    remove_rootless_garbage(&store)?;
                }
                CacheAction::Gc => {
                    print_prune(&mut out, &store.gc(&wait_note)?);
                    remove_rootless_garbage(&store)?;
                    let swept = kiln_builder::exec::sweep_secret_folders();
                    if swept > 0 {
                        eprintln!("kiln cache: removed {swept} secret folder(s) a killed kiln left");
                    }
                }
            }
            Ok(0)
        }
    }
}

fn load(path: &Path) -> Result<Recipe, BuildError> {
    Ok(kiln_recipes::parse_file(path)?)
}

fn parse_ref(s: &str, what: &str) -> Result<ImageRef, BuildError> {
    ImageRef::parse(s).map_err(|e| BuildError::usage(format!("Bad {what} `{s}`: {e}"), None))
}

fn open_store(dir: Option<PathBuf>) -> Result<Store, BuildError> {
    Ok(Store::open(&dir.unwrap_or_else(Store::default_dir))?)
}

fn parse_platform(p: Option<&str>) -> Result<Option<Platform>, BuildError> {
    match p {
        Some(p) => Ok(Some(Platform::parse(p).map_err(|m| {
            BuildError::usage(format!("Bad --platform: {m}"), Some("e.g. `--platform linux/amd64`"))
        })?)),
        None => Ok(None),
    }
}

fn options(common: &Common) -> Result<BuildOptions, BuildError> {
    let platform = parse_platform(common.platform.as_deref())?;
    let epoch_override = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => Some(
            v.trim().parse::<u64>().ok().filter(|s| *s <= kiln_recipes::parse::MAX_EPOCH as u64).ok_or_else(
                || {
                    BuildError::usage(
                        format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds up to the year 9999"),
                        Some("unset it or set it to e.g. `0` (at most 253402300799)"),
                    )
                },
            )?,
        ),
        _ => None,
    };
    Ok(BuildOptions {
        context: common.context.clone(),
        cache_dir: common.cache_dir.clone().unwrap_or_else(Store::default_dir),
        no_cache: false,
        platform,
        epoch_override,
        outputs: Vec::new(),
        backend: kiln_builder::BackendChoice::Auto,
        executor: None,
        secrets: Vec::new(),
        cache_from: common
            .cache_from
            .iter()
            .map(|c| parse_cache_ref(c, "--cache-from"))
            .collect::<Result<_, _>>()?,
        cache_to: Vec::new(),
        registry: kiln_cache::registry::RegistryOptions {
            insecure: common.insecure_registry.clone(),
            monolithic: false,
        },
    })
}

/// `registry:HOST/REPO[:TAG]` for `--cache-from` / `--cache-to`.
fn parse_cache_ref(text: &str, flag: &str) -> Result<kiln_cache::registry::Remote, BuildError> {
    let hint = Some("write it as `registry:HOST/REPO[:TAG]` (the tag defaults to `kiln-cache`)");
    let Some(rest) = text.strip_prefix("registry:") else {
        return Err(BuildError::usage(format!("Bad {flag} `{text}`: caches live in registries"), hint));
    };
    kiln_builder::registry::cache_ref(rest)
        .map_err(|e| BuildError::usage(format!("Bad {flag} `{text}`: {e}"), hint))
}

/// `--secret id=ID,src=FILE`, `id=ID,env=VAR`, or `id=ID` (the variable ID).
fn parse_secret(spec: &str) -> Result<(String, Vec<u8>), BuildError> {
    let hint = Some("write `--secret id=ID,src=FILE` or `--secret id=ID,env=VARIABLE`");
    let mut id = None;
    let mut src = None;
    let mut env = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            Some(("env", v)) => env = Some(v.to_string()),
            _ => {
                return Err(BuildError::usage(
                    format!("Bad --secret `{spec}`: `{part}` is not understood"),
                    hint,
                ))
            }
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| BuildError::usage(format!("Bad --secret `{spec}`: it names no `id`"), hint))?;
    let value = match (src, env) {
        (Some(_), Some(_)) => {
            return Err(BuildError::usage(
                format!("Bad --secret `{spec}`: give `src` or `env`, not both"),
                hint,
            ))
        }
        (Some(path), None) => fs::read(&path).map_err(|e| {
            BuildError::usage(
                format!("Cannot read the secret `{id}` from `{}`: {e}", path.display()),
                Some("check the path given as `src`"),
            )
        })?,
        (None, var) => {
            let var = var.unwrap_or_else(|| id.clone());
            std::env::var_os(&var)
                .ok_or_else(|| {
                    BuildError::usage(
                        format!("The secret `{id}` reads the environment variable `{var}`, which is not set"),
                        Some("set the variable, or give a file with `src=FILE`"),
                    )
                })?
                .into_encoded_bytes()
        }
    };
    Ok((id, value))
}

/// What rootless runs left that only a user namespace can remove (their
/// files belong to subordinate ids). As root, a plain gc removed it already.
fn remove_rootless_garbage(store: &Store) -> Result<(), BuildError> {
    let _lock = store.lock_exclusive(&wait_note)?;
    // Twice: pool files become garbage once the layer folders linking them are gone.
    for _ in 0..2 {
        let garbage = store.rootless_garbage();
        if garbage.is_empty() {
            break;
        }
        if rustix::process::geteuid().is_root() {
            for p in garbage {
                let _ = fs::remove_dir_all(&p).or_else(|_| fs::remove_file(&p));
            }
        } else if kiln_builder::exec::rootless::Mapping::detect().is_ok() {
            kiln_builder::exec::local::remove_rootless(&garbage)?;
        } else {
            break; // nothing this user can do; `gc` as root removes it
        }
    }
    store.sweep_seals();
    Ok(())
}

/// What prune and gc say while builds hold the store.
fn wait_note() {
    eprintln!("kiln cache: waiting for the running build(s) on this cache to finish");
}

fn print_prune(out: &mut impl Write, r: &kiln_cache::PruneReport) {
    let _ = writeln!(
        out,
        "removed {} blobs ({}), {} records; {} left",
        r.removed_blobs,
        human(r.removed_bytes),
        r.removed_records,
        human(r.remaining_bytes)
    );
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// One change a line; a path's control characters (a newline, a terminal
/// escape: names in a layer are the layer author's) are shown escaped.
fn print_changes(out: &mut impl Write, changes: &[kiln_builder::diff::Change]) {
    use kiln_builder::diff::Change;
    let shown = |p: &str| -> String {
        p.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
    };
    for c in changes {
        let _ = match c {
            Change::Added { path } => writeln!(out, "+ {}", shown(path)),
            Change::Removed { path } => writeln!(out, "- {}", shown(path)),
            Change::Modified { path, what } => writeln!(out, "M {}  ({})", shown(path), what.join(", ")),
        };
    }
}

/// Builds the recipe twice, each time from a fresh copy of the context made
/// under a different umask, with a fresh cache, another TZ, at another
/// moment, in a separate process; then compares the manifest digests and,
/// if they differ, the files.
fn verify(
    recipe_path: &Path,
    context: Option<PathBuf>,
    platform: Option<String>,
    backend: crate::args::Backend,
    secrets: &[String],
) -> Result<u8, BuildError> {
    let recipe = load(recipe_path)?;
    let ctx_dir = context.unwrap_or_else(|| recipe.dir.clone());
    let work = tempfile::Builder::new()
        .prefix("kiln-verify-")
        .tempdir()
        .map_err(BuildError::io_write(std::env::temp_dir()))?;
    let exe = std::env::current_exe().map_err(BuildError::io_read("/proc/self/exe"))?;
    let mut digests = Vec::new();
    for (i, (umask, tz)) in [(0o022u32, "UTC"), (0o077, "Pacific/Kiritimati")].into_iter().enumerate() {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100)); // another second on the clock
        }
        let run = work.path().join(format!("build-{}", i + 1));
        let ctx = run.join("context");
        copy_tree(&ctx_dir, &ctx, umask)?;
        let out = run.join("image");
        let mut cmd = Process::new("sh");
        cmd.arg("-c")
            .arg(format!("umask {umask:03o}; exec \"$0\" \"$@\""))
            .arg(&exe)
            .arg("build")
            .arg(recipe_path)
            .arg("--context")
            .arg(&ctx)
            .arg("--cache-dir")
            .arg(run.join("cache"))
            .arg("-o")
            .arg(format!("oci:{}", out.display()))
            .arg("--progress")
            .arg("plain")
            .arg("--backend")
            .arg(backend.as_str())
            .env("TZ", tz);
        for s in secrets {
            cmd.arg("--secret").arg(s);
        }
        if let Some(p) = &platform {
            cmd.arg("--platform").arg(p);
        }
        eprintln!("verify: build {} (umask {umask:03o}, TZ={tz}, fresh cache in {})", i + 1, run.display());
        let output = cmd.output().map_err(BuildError::io_read(&exe))?;
        if !output.status.success() {
            std::io::stderr().write_all(&output.stderr).ok();
            return Ok(output.status.code().unwrap_or(1) as u8);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let digest = stdout.lines().last().unwrap_or("").trim().to_string();
        eprintln!("verify: build {} -> {digest}", i + 1);
        digests.push((digest, out));
    }
    if digests[0].0 == digests[1].0 {
        eprintln!("verify: reproducible");
        println!("{}", digests[0].0);
        return Ok(0);
    }
    eprintln!("verify: NOT reproducible: {} != {}", digests[0].0, digests[1].0);
    let store = Store::open(&work.path().join("diff-cache"))?;
    let a = ImageRef::Oci { dir: digests[0].1.clone(), tag: None };
    let b = ImageRef::Oci { dir: digests[1].1.clone(), tag: None };
    let changes = kiln_builder::diff::diff(&store, &a, &b)?;
    let mut out = std::io::stdout().lock();
    if changes.is_empty() {
        let _ =
            writeln!(out, "the files are identical; the difference is in the image config or layer encoding");
    }
    print_changes(&mut out, &changes);
    Ok(1)
}

/// Copies a folder as a fresh checkout would: new files, modes masked by `umask`.
fn copy_tree(src: &Path, dst: &Path, umask: u32) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    for e in walkdir::WalkDir::new(src).follow_links(false) {
        let e = e.map_err(|e| BuildError::Read { path: src.to_path_buf(), source: e.into() })?;
        let rel = e.path().strip_prefix(src).expect("under src");
        let to = dst.join(rel);
        let meta = fs::symlink_metadata(e.path()).map_err(BuildError::io_read(e.path()))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&to).map_err(BuildError::io_write(&to))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o777 & !umask))
                .map_err(BuildError::io_write(&to))?;
        } else if ft.is_symlink() {
            let t = fs::read_link(e.path()).map_err(BuildError::io_read(e.path()))?;
            std::os::unix::fs::symlink(t, &to).map_err(BuildError::io_write(&to))?;
        } else if ft.is_file() {
            fs::copy(e.path(), &to).map_err(BuildError::io_write(&to))?;
            let exec = meta.permissions().mode() & 0o100 != 0;
            let mode = if exec { 0o777 } else { 0o666 } & !umask;
            fs::set_permissions(&to, fs::Permissions::from_mode(mode)).map_err(BuildError::io_write(&to))?;
        }
    }
    Ok(())
}
