//! Writing a stored image to its outputs: an OCI image layout folder, a tar
//! of one (`oci-archive`), or a `docker save` style archive that is also an
//! OCI layout (`docker-archive`). Every blob is checked before it is shipped;
//! archives are written to a temp file and renamed, so a failed export never
//! leaves a half-written output.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use oci_spec::image::{DescriptorBuilder, ImageIndex, ImageIndexBuilder, MediaType};
use serde_json::json;

use kiln_cache::{Digest, Store};
use kiln_recipes::ImageRef;

use crate::error::BuildError;
use crate::image::{canonical_json, oci_digest, StoredImage};
use crate::tarball::{self, TarHeader, TarKind};

pub(crate) const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// Writes `image` (named `name`) to `out`.
pub fn export(store: &Store, image: &StoredImage, name: &str, out: &ImageRef) -> Result<(), BuildError> {
    for d in image.blobs() {
        if !store.verify_blob(&d)? {
            return Err(BuildError::Store(kiln_cache::StoreError::Missing(d)));
        }
    }
    match out {
        ImageRef::Oci { dir, tag } => write_layout(store, image, dir, tag.as_deref().unwrap_or("latest")),
        ImageRef::OciArchive(file) => write_archive(store, image, file, None),
        ImageRef::DockerArchive(file) => write_archive(store, image, file, Some(&format!("{name}:latest"))),
        other => Err(BuildError::usage(
            format!("The output `{other}` is not supported yet"),
            Some("use `oci:DIR[:TAG]`, `oci-archive:FILE` or `docker-archive:FILE`"),
        )),
    }
}

fn index_json(image: &StoredImage, tag: &str, mut others: Vec<oci_spec::image::Descriptor>) -> Vec<u8> {
    let desc = DescriptorBuilder::default()
        .media_type(MediaType::ImageManifest)
        .digest(oci_digest(&image.manifest))
        .size(image.manifest_size)
        .annotations(
            image
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([(REF_NAME.to_string(), tag.to_string())])
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()
        .expect("descriptor");
    others
        .retain(|d| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).map(String::as_str) != Some(tag));
    others.push(desc);
    others.sort_by_key(|d| {
        (
            d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).cloned().unwrap_or_default(),
            d.digest().to_string(),
        )
    });
    let index: ImageIndex = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(others)
        .build()
        .expect("index");
    canonical_json(&index)
}

/// Refuses, before anything is built, a file output kiln would refuse when
/// it writes it: an `oci:` folder that is a file or holds files but no
/// layout, an archive that is a folder.
pub fn check_output(out: &ImageRef) -> Result<(), BuildError> {
    let path = match out {
        ImageRef::Oci { dir, .. } => {
            check_layout_dir(dir)?;
            dir
        }
        ImageRef::OciArchive(file) | ImageRef::DockerArchive(file) => {
            check_archive_file(file)?;
            file
        }
        _ => return Ok(()),
    };
    check_writable_place(out, path)
}

/// The temp file is renamed over an archive output: never over a device,
/// a fifo, a folder or a symlink, which would be replaced, not written.
fn check_archive_file(file: &Path) -> Result<(), BuildError> {
    match fs::symlink_metadata(file) {
        Ok(m) if !m.file_type().is_file() => Err(BuildError::usage(
            format!("`{}` exists and is not a regular file", file.display()),
            Some("an archive output is written to a new or regular file; kiln leaves this one untouched"),
        )),
        _ => Ok(()),
    }
}

/// The folder an output is written in (or the nearest one above it that
/// exists, as kiln makes the rest) must be a folder kiln can write, on a
/// filesystem that holds files (not procfs or sysfs).
fn check_writable_place(out: &ImageRef, path: &Path) -> Result<(), BuildError> {
    let mut at = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    while fs::symlink_metadata(at).is_err() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    let hint = Some("write outputs into a folder you can write, e.g. `-o oci:out/app`");
    let special = fs::canonicalize(at).is_ok_and(|c| c.starts_with("/proc") || c.starts_with("/sys"));
    let folder = fs::metadata(at).is_ok_and(|m| m.is_dir());
    if !folder || special || rustix::fs::access(at, rustix::fs::Access::WRITE_OK).is_err() {
        return Err(BuildError::usage(
            format!("`{out}` cannot be written: `{}` is not a folder kiln can write in", at.display()),
            hint,
        ));
    }
    Ok(())
}

/// An `oci:` output's folder: new, or an OCI layout (its other tags are
/// kept, as `skopeo copy` does); never a folder of other files.
fn check_layout_dir(dir: &Path) -> Result<(), BuildError> {
    let index_path = dir.join("index.json");
    match fs::symlink_metadata(dir) {
        Ok(m) if !m.is_dir() => {
            return Err(BuildError::usage(
                format!("`{}` exists and is not a folder", dir.display()),
                Some("an `oci:` output is a folder: name a new folder or an existing OCI layout"),
            ))
        }
        Ok(_)
            if !index_path.exists()
                && fs::read_dir(dir).map_err(BuildError::io_read(dir))?.next().is_some() =>
        {
            return Err(BuildError::usage(
                format!(
                    "`{}` is a folder with files in it, but not an OCI layout (no `index.json`)",
                    dir.display()
                ),
                Some("write to an empty folder or to an existing OCI layout; kiln leaves this one untouched"),
            ))
        }
        _ => {}
    }
    Ok(())
}

fn write_layout(store: &Store, image: &StoredImage, dir: &Path, tag: &str) -> Result<(), BuildError> {
    check_layout_dir(dir)?;
    let index_path = dir.join("index.json");
    let others = match crate::image::read_document(&index_path) {
        Ok(bytes) => match serde_json::from_slice::<ImageIndex>(&bytes) {
            Ok(i) => i.manifests().clone(),
            Err(e) => {
                return Err(BuildError::usage(
                    format!(
                        "`{}` exists but is not an OCI index ({})",
                        index_path.display(),
                        crate::image::json_error(&e)
                    ),
                    Some("write to an empty folder or to an existing OCI layout"),
                ))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(BuildError::usage(
                format!("`{}` is not an OCI index: {e}", index_path.display()),
                Some("write to an empty folder or to an existing OCI layout"),
            ))
        }
        Err(e) => return Err(BuildError::Read { path: index_path, source: e }),
    };
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(BuildError::io_write(&blobs))?;
    for d in image.blobs() {
        link_or_copy(&store.blob_path(&d), &blobs.join(d.hex()))?;
    }
    write_file_atomic(&dir.join("oci-layout"), OCI_LAYOUT)?;
    write_file_atomic(&index_path, &index_json(image, tag, others))
}

/// Hard-links a store blob into an output (blobs are read-only and checked by
/// inode and ctime, so a shared inode is safe), copying across filesystems.
fn link_or_copy(src: &Path, dst: &Path) -> Result<(), BuildError> {
    if let (Ok(a), Ok(b)) = (fs::metadata(src), fs::metadata(dst)) {
        if a.ino() == b.ino() && a.dev() == b.dev() {
            return Ok(());
        }
    }
    let _ = fs::remove_file(dst);
    if fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    let tmp = dst.with_extension("kiln-tmp");
    fs::copy(src, &tmp).map_err(BuildError::io_write(dst))?;
    fs::rename(&tmp, dst).map_err(BuildError::io_write(dst))
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    kiln_cache::store::write_atomic_in(dir, path, bytes).map_err(BuildError::io_write(path))
}

/// A tar of the OCI layout; with `repo_tag`, also docker's `manifest.json`.
fn write_archive(
    store: &Store,
    image: &StoredImage,
    file: &Path,
    repo_tag: Option<&str>,
) -> Result<(), BuildError> {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    check_archive_file(file)?;
    fs::create_dir_all(dir).map_err(BuildError::io_write(dir))?;
    let base = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    sweep_temp_files(dir, &base);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{base}.kiln-{}-", std::process::id()))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(BuildError::io_write(dir))?;
    let mut w = BufWriter::with_capacity(1 << 20, tmp);
    write_archive_to(store, image, repo_tag.map(Some), &mut w, file)?;
    let werr = |e: io::Error| BuildError::Write { path: file.to_path_buf(), source: e };
    let tmp = w.into_inner().map_err(|e| werr(io::Error::new(e.error().kind(), e.error().to_string())))?;
    fs::set_permissions(tmp.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(BuildError::io_write(file))?;
    tmp.persist(file).map_err(|e| BuildError::Write { path: file.to_path_buf(), source: e.error })?;
    Ok(())
}

/// Removes the temp files of earlier exports to `dir/base` whose kiln is
/// gone (killed mid-write): `.BASE.kiln-PID-XXXXXX.tmp`.
fn sweep_temp_files(dir: &Path, base: &str) {
    let prefix = format!(".{base}.kiln-");
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else { continue };
        if !rest.ends_with(".tmp") {
            continue;
        }
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let gone = rustix::process::Pid::from_raw(pid)
            .is_some_and(|p| rustix::process::test_kill_process(p) == Err(rustix::io::Errno::SRCH));
        if gone && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Writes the archive of [`write_archive`] to `w` (`name` for messages).
/// `repo_tag`: `None` for a plain OCI archive; `Some(None)` for docker's
/// `manifest.json` without a tag.
pub fn write_archive_to(
    store: &Store,
    image: &StoredImage,
    repo_tag: Option<Option<&str>>,
    w: &mut impl Write,
    name: &Path,
) -> Result<(), BuildError> {
    let werr = |e: io::Error| BuildError::Write { path: name.to_path_buf(), source: e };
    let mut files: BTreeMap<String, ArchiveFile> = BTreeMap::new();
    for d in image.blobs() {
        files.insert(format!("blobs/sha256/{}", d.hex()), ArchiveFile::Blob(d));
    }
    files.insert("oci-layout".into(), ArchiveFile::Bytes(OCI_LAYOUT.to_vec()));
    files.insert("index.json".into(), ArchiveFile::Bytes(index_json(image, "latest", Vec::new())));
    if let Some(tag) = repo_tag {
        let manifest = json!([{
            "Config": format!("blobs/sha256/{}", image.config.hex()),
            "RepoTags": tag.into_iter().collect::<Vec<_>>(),
            "Layers": image.layers.iter().map(|l| format!("blobs/sha256/{}", l.digest.hex())).collect::<Vec<_>>(),
        }]);
        files
            .insert("manifest.json".into(), ArchiveFile::Bytes(serde_json::to_vec(&manifest).expect("json")));
    }
    for d in ["blobs", "blobs/sha256"] {
        let h =
            TarHeader { path: d, kind: &TarKind::Dir, mode: 0o755, uid: 0, gid: 0, mtime: 0, xattrs: &[] };
        tarball::write_header(w, &h).map_err(werr)?;
    }
    for (path, f) in &files {
        let size = match f {
            ArchiveFile::Bytes(b) => b.len() as u64,
            ArchiveFile::Blob(d) => {
                fs::metadata(store.blob_path(d)).map_err(BuildError::io_read(store.blob_path(d)))?.len()
            }
        };
        let kind = TarKind::File { size };
        let h = TarHeader { path, kind: &kind, mode: 0o644, uid: 0, gid: 0, mtime: 0, xattrs: &[] };
        tarball::write_header(w, &h).map_err(werr)?;
        match f {
            ArchiveFile::Bytes(b) => w.write_all(b).map_err(werr)?,
            ArchiveFile::Blob(d) => {
                let mut src = store.open_blob(d)?;
                let n = io::copy(&mut src, w).map_err(werr)?;
                if n != size {
                    return Err(BuildError::Changed { path: store.blob_path(d) });
                }
            }
        }
        tarball::pad(w, size).map_err(werr)?;
    }
    tarball::write_trailer(w).map_err(werr)?;
    Ok(())
}

enum ArchiveFile {
    Bytes(Vec<u8>),
    Blob(Digest),
}

/// The default output for an image: `oci:out/NAME`.
pub fn default_output(name: &str) -> ImageRef {
    ImageRef::Oci { dir: PathBuf::from("out").join(name), tag: None }
}
