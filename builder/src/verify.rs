//! `kiln verify`: the recipe built twice, each time by a separate kiln
//! process from a fresh copy of the context made under a different umask,
//! with a fresh cache, another TZ, at another second; the two manifest
//! digests compared and, when they differ, the two images' files. The
//! first build's cache mounts start empty and the second's hold what the
//! first left, so a recipe whose image depends on them is caught.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_cache::Store;
use kiln_recipes::ImageRef;

use crate::diff::Change;
use crate::BuildError;

/// How each of the two builds is run.
pub struct VerifyOptions {
    /// The kiln executable the builds run (each in its own process).
    pub kiln: PathBuf,
    pub context: PathBuf,
    /// Arguments passed to both builds (`--backend`, `--platform`, `--secret`).
    pub build_args: Vec<String>,
}

pub enum Verdict {
    /// Both builds gave this manifest digest.
    Reproducible(String),
    /// They differ: the digests, and the files that differ (none when the
    /// difference is in the config or the layers' encoding).
    Differs { first: String, second: String, changes: Vec<Change> },
    /// A build failed: its exit code and what it printed on stderr.
    BuildFailed { code: u8, stderr: Vec<u8> },
}

/// Builds `recipe` twice and compares; `note` tells what it is doing.
pub fn verify(recipe: &Path, opts: &VerifyOptions, note: &dyn Fn(&str)) -> Result<Verdict, BuildError> {
    let work = tempfile::Builder::new()
        .prefix("kiln-verify-")
        .tempdir()
        .map_err(BuildError::io_write(std::env::temp_dir()))?;
    let mut digests = Vec::new();
    for (i, (umask, tz)) in [(0o022u32, "UTC"), (0o077, "Pacific/Kiritimati")].into_iter().enumerate() {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1100)); // another second on the clock
        }
        let run = work.path().join(format!("build-{}", i + 1));
        let ctx = run.join("context");
        copy_tree(&opts.context, &ctx, umask)?;
        if i > 0 {
            // The first build ran with empty cache mounts; the second gets what
            // it left in them, so an image that depends on their contents differs.
            let first = Store::open(&work.path().join("build-1").join("cache"))?;
            first.hand_mounts_to(&Store::open(&run.join("cache"))?)?;
        }
        let out = run.join("image");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("umask {umask:03o}; exec \"$0\" \"$@\""))
            .arg(&opts.kiln)
            .arg("build")
            .arg(recipe)
            .arg("--context")
            .arg(&ctx)
            .arg("--cache-dir")
            .arg(run.join("cache"))
            .arg("-o")
            .arg(format!("oci:{}", out.display()))
            .arg("--progress")
            .arg("plain")
            .args(&opts.build_args)
            .env("TZ", tz);
        note(&format!("build {} (umask {umask:03o}, TZ={tz}, fresh cache in {})", i + 1, run.display()));
        let output = cmd.output().map_err(BuildError::io_read(&opts.kiln))?;
        if !output.status.success() {
            let code = output.status.code().unwrap_or(1).clamp(1, 255) as u8;
            return Ok(Verdict::BuildFailed { code, stderr: output.stderr });
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let digest = stdout.lines().last().unwrap_or("").trim().to_string();
        note(&format!("build {} -> {digest}", i + 1));
        digests.push((digest, out));
    }
    let [(first, a), (second, b)] = <[_; 2]>::try_from(digests).expect("two builds");
    if first == second {
        return Ok(Verdict::Reproducible(first));
    }
    note(&format!("NOT reproducible: {first} != {second}"));
    let store = Store::open(&work.path().join("diff-cache"))?;
    let changes = crate::diff::diff(
        &store,
        &ImageRef::Oci { dir: a, tag: None },
        &ImageRef::Oci { dir: b, tag: None },
    )?;
    Ok(Verdict::Differs { first, second, changes })
}

/// Copies a folder as a fresh checkout would: new files, modes masked by `umask`.
/// What `.kilnignore` excludes (and `.git`) is not copied: no `copy` reads
/// it, and a secret there (a token in `.git/config`) must not land in a
/// temporary folder a killed verify would leave behind.
fn copy_tree(src: &Path, dst: &Path, umask: u32) -> Result<(), BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let ctx = crate::context::Context::open(src)?;
    let walk = walkdir::WalkDir::new(&ctx.root).follow_links(false).into_iter().filter_entry(|e| {
        let rel = e.path().strip_prefix(&ctx.root).unwrap_or(e.path());
        !ctx.excluded(rel, e.file_type().is_dir())
    });
    let src = ctx.root.as_path();
    for e in walk {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copied_context_leaves_out_what_no_copy_reads() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let files = [
            (".kilnignore", "secret/\n"),
            (".git/config", "extraheader = AUTHORIZATION: basic TOKEN\n"),
            ("secret/key", "k\n"),
            ("src/main.rs", "fn main() {}\n"),
        ];
        for (path, text) in files {
            let p = src.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }
        copy_tree(src.path(), &dst.path().join("ctx"), 0o022).unwrap();
        let ctx = dst.path().join("ctx");
        assert!(ctx.join("src/main.rs").is_file() && ctx.join(".kilnignore").is_file());
        assert!(!ctx.join(".git").exists(), ".git is not copied");
        assert!(!ctx.join("secret").exists(), "what .kilnignore excludes is not copied");
    }
}
