//! The build context: resolving a `copy` source inside it, listing what it
//! holds with normalized modes, hashing content through the stat index, and
//! the Merkle digest of the inputs that goes into the step key.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use kiln_cache::{Digest, StatIndex};
use kiln_recipes::{CopyStep, Recipe};

use crate::error::BuildError;

/// The most bytes a `.kilnignore` may hold.
const MAX_KILNIGNORE: u64 = 1 << 20;

/// A context folder, canonicalized, and what no `copy` reads from it.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) root: PathBuf,
    /// `.git` (by default) and the patterns of the root's `.kilnignore`.
    ignore: Gitignore,
}

impl Context {
    pub(crate) fn open(dir: &Path) -> Result<Context, BuildError> {
        let root = fs::canonicalize(dir).map_err(|e| {
            BuildError::usage(
                format!("The context folder `{}` cannot be opened: {e}", dir.display()),
                Some("pass an existing folder with `--context DIR`"),
            )
        })?;
        if !root.is_dir() {
            return Err(BuildError::usage(format!("The context `{}` is not a folder", dir.display()), None));
        }
        let ignore = load_kilnignore(&root)?;
        Ok(Context { root, ignore })
    }

    /// Whether `rel` (relative to the root) or a folder above it is excluded.
    pub(crate) fn excluded(&self, rel: &Path, is_dir: bool) -> bool {
        !rel.as_os_str().is_empty() && self.ignore.matched_path_or_any_parents(rel, is_dir).is_ignore()
    }
}

/// `.git`, then the lines of `ROOT/.kilnignore` (gitignore syntax; `!.git`
/// takes the default back). The file must be a regular file in the context:
/// a symlink is refused, so it can never make kiln read outside it. Errors name
/// the line, never its text.
fn load_kilnignore(root: &Path) -> Result<Gitignore, BuildError> {
    let mut b = GitignoreBuilder::new(root);
    b.add_line(None, ".git").expect("a valid pattern");
    let path = root.join(".kilnignore");
    let hint =
        "`.kilnignore` holds gitignore patterns, one per line, relative to the context, e.g. `target/`";
    let meta = match fs::symlink_metadata(&path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(BuildError::io_read(&path)(e)),
    };
    if let Some(meta) = meta {
        if !meta.is_file() {
            return Err(BuildError::usage(
                format!("`{}` is not a regular file (a symlink, folder or device)", path.display()),
                Some("make `.kilnignore` a plain file in the context's root"),
            ));
        }
        if meta.len() > MAX_KILNIGNORE {
            return Err(BuildError::usage(format!("`{}` is larger than 1 MiB", path.display()), Some(hint)));
        }
        let bytes = read_same_file(&path, &meta).map_err(BuildError::io_read(&path))?;
        for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
            let bad =
                |what: &str| BuildError::usage(format!("{}:{}: {what}", path.display(), i + 1), Some(hint));
            let line = std::str::from_utf8(line).map_err(|_| bad("the line is not UTF-8 text"))?;
            let line = line.strip_suffix('\r').unwrap_or(line);
            b.add_line(Some(path.clone()), line).map_err(|_| bad("the line is not a pattern kiln reads"))?;
        }
    }
    b.build().map_err(|_| {
        BuildError::usage(format!("`{}` cannot be read as patterns", path.display()), Some(hint))
    })
}

/// The file at `path`, if it is still the one `meta` described (a swap for a
/// symlink between the check and the open is refused), at most 1 MiB.
fn read_same_file(path: &Path, meta: &fs::Metadata) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    // Never through a symlink, never blocking on a fifo swapped in.
    let f = kiln_oci::image::open_regular(path)?;
    let now = f.metadata()?;
    if (now.dev(), now.ino()) != (meta.dev(), meta.ino()) || !now.is_file() {
        return Err(std::io::Error::other("the file changed while kiln read it"));
    }
    let mut bytes = Vec::new();
    f.take(MAX_KILNIGNORE).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The patterns of a `copy` step's `exclude`, rooted at the copied folder.
fn step_excludes(base: &Path, step: &CopyStep) -> Result<Option<Gitignore>, BuildError> {
    if step.exclude.is_empty() {
        return Ok(None);
    }
    let mut b = GitignoreBuilder::new(base);
    for p in &step.exclude {
        b.add_line(None, p).map_err(|e| {
            BuildError::usage(
                format!("`exclude` pattern `{}` is not a pattern kiln reads: {e}", crate::error::shown(p)),
                Some("patterns are gitignore lines, e.g. `target/`, `*.log`, `!keep.log`"),
            )
        })?;
    }
    Ok(Some(b.build().map_err(|e| BuildError::usage(format!("`exclude` cannot be read: {e}"), None))?))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceKind {
    Dir,
    File { size: u64, sha256: Digest },
    Symlink(String),
}

/// One file or folder of a copy source; `rel` is relative to the source
/// (empty for the source itself).
#[derive(Debug, Clone)]
pub(crate) struct SourceEntry {
    pub(crate) rel: String,
    pub(crate) abs: PathBuf,
    pub(crate) kind: SourceKind,
    /// Normalized: git semantics, or the step's `mode` for files.
    pub(crate) mode: u32,
    /// A file's stat when its digest was taken (see [`kiln_oci::layer::Content::Path`]).
    pub(crate) stamp: Option<crate::layer::Stamp>,
}

#[derive(Debug, Clone)]
pub(crate) struct CopySource {
    /// The source itself first, then its contents in path order.
    pub(crate) entries: Vec<SourceEntry>,
    /// The Merkle digest of every entry's path, kind, mode and content.
    pub(crate) inputs: Digest,
    /// The last path component of the source (`None` for the context root).
    pub(crate) name: Option<String>,
}

/// Lists and hashes the source of a copy step.
pub(crate) fn scan_copy(
    ctx: &Context,
    recipe: &Recipe,
    step: &CopyStep,
    index: &mut StatIndex,
) -> Result<CopySource, BuildError> {
    let joined = if step.src == "." { ctx.root.clone() } else { ctx.root.join(&step.src) };
    if let Err(e) = fs::symlink_metadata(&joined) {
        let msg = if e.kind() == std::io::ErrorKind::NotFound {
            format!("`{}` does not exist in the context `{}`", step.src, ctx.root.display())
        } else {
            // The recipe's own text, but shown at most 200 characters long.
            format!("`{}` cannot be read: {e}", crate::error::shown(&step.src))
        };
        return Err(recipe
            .error_at(step.src_span.clone(), msg)
            .with_hint("paths in `copy` are relative to the context (the recipe's folder unless `--context`)")
            .into());
    }
    let canon = fs::canonicalize(&joined).map_err(BuildError::io_read(&joined))?;
    if canon.starts_with(&ctx.root) {
        let rel = canon.strip_prefix(&ctx.root).expect("checked");
        // The context itself is never excluded (`*` then `!src/` is an allow-list).
        let as_written = Path::new(&step.src);
        let named_excluded = step.src != "." && ctx.excluded(as_written, canon.is_dir());
        if ctx.excluded(rel, canon.is_dir()) || named_excluded {
            return Err(recipe
                .error_at(step.src_span.clone(), format!("`{}` is excluded from the context", step.src))
                .with_label("excluded by `.kilnignore` (or `.git`, excluded by default)")
                .with_hint("take the pattern that matches it out of `.kilnignore`, or add a `!` line for it (`!.git` for `.git`)")
                .into());
        }
    }
    if !canon.starts_with(&ctx.root) {
        return Err(recipe
            .error_at(
                step.src_span.clone(),
                format!("`{}` leaves the context through a symlink (to `{}`)", step.src, canon.display()),
            )
            .with_label("resolves outside the context")
            .with_hint("copy only files inside the context; move the file in, or pass a wider `--context`")
            .into());
    }
    let file_mode = step.mode.map(|m| m.0);
    let mut entries = Vec::new();
    let mut to_hash: Vec<usize> = Vec::new();
    let excludes = step_excludes(&canon, step)?;
    // Excluded entries are pruned as the walk meets them: never stat-ed, read or hashed,
    // and nothing below an excluded folder is visited.
    let walker = walkdir::WalkDir::new(&canon)
        .follow_links(false)
        .sort_by(|a, b| a.file_name().cmp(b.file_name()))
        .into_iter()
        .filter_entry(|e| {
            if e.depth() == 0 {
                return true;
            }
            let is_dir = e.file_type().is_dir();
            let in_ctx = e.path().strip_prefix(&ctx.root).expect("the walk stays in the context");
            if ctx.ignore.matched(in_ctx, is_dir).is_ignore() {
                return false;
            }
            let in_src = e.path().strip_prefix(&canon).expect("the walk stays under its root");
            !excludes.as_ref().is_some_and(|x| x.matched(in_src, is_dir).is_ignore())
        });
    for item in walker {
        let item = item.map_err(|e| {
            let path = e.path().map(Path::to_path_buf).unwrap_or_else(|| canon.clone());
            BuildError::Read { path, source: e.into() }
        })?;
        let abs = item.path().to_path_buf();
        let rel_path = abs.strip_prefix(&canon).expect("walk stays under its root");
        let rel = rel_path
            .to_str()
            .ok_or_else(|| {
                BuildError::usage(
                    format!("The file name `{}` is not UTF-8", abs.display()),
                    Some("rename the file; image paths must be UTF-8"),
                )
            })?
            .to_string();
        let meta = fs::symlink_metadata(&abs).map_err(BuildError::io_read(&abs))?;
        let ft = meta.file_type();
        let stamp = ft.is_file().then(|| crate::layer::Stamp::of(&meta));
        let (kind, mode) = if ft.is_dir() {
            (SourceKind::Dir, 0o755)
        } else if ft.is_symlink() {
            let t = fs::read_link(&abs).map_err(BuildError::io_read(&abs))?;
            let t = t.to_str().ok_or_else(|| {
                BuildError::usage(format!("The symlink `{}` has a non-UTF-8 target", abs.display()), None)
            })?;
            (SourceKind::Symlink(t.to_string()), 0o777)
        } else if ft.is_file() {
            let git_mode = if meta.permissions().mode() & 0o100 != 0 { 0o755 } else { 0o644 };
            let key = index_key(&ctx.root, &abs);
            let kind = match index.lookup(&key, &meta) {
                Some(sha256) => SourceKind::File { size: meta.len(), sha256 },
                None => {
                    to_hash.push(entries.len());
                    SourceKind::File { size: meta.len(), sha256: Digest::of(b"") }
                }
            };
            (kind, file_mode.unwrap_or(git_mode))
        } else {
            return Err(BuildError::usage(
                format!("`{}` is a socket, FIFO or device, which `copy` does not take", abs.display()),
                Some("remove it from the copied folder or copy its siblings one by one"),
            ));
        };
        entries.push(SourceEntry { rel, abs, kind, mode, stamp });
    }
    hash_files(&mut entries, &to_hash, &ctx.root, index)?;

    let mut merkle = Vec::new();
    for e in &entries {
        let (tag, value) = match &e.kind {
            SourceKind::Dir => ("dir", String::new()),
            SourceKind::File { sha256, .. } => ("file", sha256.to_string()),
            SourceKind::Symlink(t) => ("symlink", t.clone()),
        };
        // NUL-separated fields, so no path or target can forge another entry.
        for field in [tag, &format!("{:o}", e.mode), &value, &e.rel] {
            merkle.extend_from_slice(field.as_bytes());
            merkle.push(0);
        }
    }
    let name =
        if canon == ctx.root { None } else { canon.file_name().and_then(|n| n.to_str()).map(str::to_string) };
    Ok(CopySource { entries, inputs: Digest::of(&merkle), name })
}

fn index_key(root: &Path, abs: &Path) -> String {
    abs.strip_prefix(root).unwrap_or(abs).to_string_lossy().into_owned()
}

/// A file's position among the entries, its stat when opened, its digest.
type Hashed = (usize, fs::Metadata, Digest);

/// Hashes the files the stat index did not know, on all cores.
fn hash_files(
    entries: &mut [SourceEntry],
    which: &[usize],
    root: &Path,
    index: &mut StatIndex,
) -> Result<(), BuildError> {
    if which.is_empty() {
        return Ok(());
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(which.len());
    let per = which.len().div_ceil(threads);
    let results: Vec<Result<Vec<Hashed>, BuildError>> = std::thread::scope(|s| {
        let handles: Vec<_> = which
            .chunks(per)
            .map(|part| {
                let entries = &*entries;
                s.spawn(move || {
                    part.iter()
                        .map(|&i| {
                            let p = &entries[i].abs;
                            let f = fs::File::open(p).map_err(BuildError::io_read(p))?;
                            let meta = f.metadata().map_err(BuildError::io_read(p))?;
                            let (d, _) = kiln_cache::digest::hash_reader(std::io::BufReader::with_capacity(
                                1 << 18,
                                f,
                            ))
                            .map_err(BuildError::io_read(p))?;
                            Ok((i, meta, d))
                        })
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("hash thread panicked")).collect()
    });
    for r in results {
        for (i, meta, d) in r? {
            let e = &mut entries[i];
            index.record(&index_key(root, &e.abs), &meta, d);
            e.kind = SourceKind::File { size: meta.len(), sha256: d };
            e.stamp = Some(crate::layer::Stamp::of(&meta));
        }
    }
    Ok(())
}
