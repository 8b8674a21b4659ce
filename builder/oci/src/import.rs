//! Reading images kiln did not write — OCI layouts, OCI archives, docker
//! archives — into the store. This is hostile-input code: archive members are
//! never written to a path they name (only into the store by digest), every
//! blob is checked against its digest, every layer is read through and
//! refused if an entry would land outside the root (`..`, absolute paths,
//! writing through a symlink), is a device node, or has an oversized header.

use std::collections::HashMap;
use std::fs;
use std::io::{BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};

use kiln_cache::{BlobWriter, Digest, ImageRecord, Store};
use kiln_recipes::ImageRef;

use crate::error::BuildError;
use crate::fstree::FsTree;
use crate::image::{json_error, ImageLayer, StoredImage, CONFIG_MEDIA_TYPE, MAX_DOCUMENT};
use crate::listing::Listing;

// The media types the registry client also asks for, defined once in image.rs.
use crate::image::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX};
use kiln_recipes::recipe::Platform;
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_TAR_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Imports the image a local reference (`oci:`, `oci-archive:`,
/// `docker-archive:`) names into the store (checked) and describes it.
/// The orchestrator's `base::open_image` also reads `docker:` and `registry:` ones.
/// An index of several platforms gives the image for `platform`.
pub fn import(store: &Store, r: &ImageRef, platform: &Platform) -> Result<StoredImage, BuildError> {
    let name = r.to_string();
    let bad = |reason: String| BuildError::BadImage { image: name.clone(), reason };
    match r {
        ImageRef::Oci { dir, tag } => {
            let index_path = dir.join("index.json");
            let index = crate::image::read_document(&index_path).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => bad(format!("its `index.json` cannot be used: {e}")),
                std::io::ErrorKind::NotFound => BuildError::usage(
                    format!("There is no OCI layout at `{}` (no `index.json`)", dir.display()),
                    Some("check the path: `oci:DIR` names a folder that `kiln build -o oci:DIR` or `skopeo copy` wrote"),
                ),
                _ => BuildError::Read { path: index_path.clone(), source: e },
            })?;
            let fetch = |d: &Digest| -> Result<(), BuildError> {
                let p = dir.join("blobs/sha256").join(d.hex());
                let f = crate::image::open_regular(&p)
                    .map_err(|e| bad(format!("blob {d} cannot be read ({e})")))?;
                store
                    .put_blob_from(BufReader::with_capacity(1 << 20, f), d)
                    .map_err(|e| bad(format!("{e}")))?;
                Ok(())
            };
            let manifest = resolve_index(&index, tag.as_deref(), &fetch, store, platform).map_err(bad)?;
            finish(store, &name, manifest, &fetch)
        }
        ImageRef::OciArchive(file) | ImageRef::DockerArchive(file) => {
            // A record keyed by the file's identity skips re-reading an unchanged archive.
            let meta = fs::symlink_metadata(file).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => BuildError::usage(
                    format!("`{}` does not exist", file.display()),
                    Some("check the path of the archive"),
                ),
                _ => BuildError::Read { path: file.to_path_buf(), source: e },
            })?;
            if !meta.file_type().is_file() {
                return Err(bad(format!(
                    "`{}` is not a regular file (kiln reads archives from regular files, not through symlinks)",
                    file.display()
                )));
            }
            let source_key = Digest::of(
                format!(
                    "{}\0{}\0{}.{}\0{}.{}\0{}\0{platform}",
                    fs::canonicalize(file).map_err(BuildError::io_read(file))?.display(),
                    meta.size(),
                    meta.mtime(),
                    meta.mtime_nsec(),
                    meta.ctime(),
                    meta.ctime_nsec(),
                    meta.ino()
                )
                .as_bytes(),
            );
            if let Some(img) = checked_before(store, &source_key.hex()) {
                return Ok(img);
            }
            let img = import_archive(store, &name, file, matches!(r, ImageRef::DockerArchive(_)), platform)?;
            img.record(store, kiln_cache::RecordKind::Base, &source_key.hex(), &name)?;
            Ok(img)
        }
        other => Err(BuildError::usage(
            format!("Reading `{other}` is not supported yet"),
            Some("use `oci:DIR[:TAG]`, `oci-archive:FILE` or `docker-archive:FILE`"),
        )),
    }
}

/// Imports an OCI archive, or (`docker`) what `docker save` writes.
pub fn import_archive(
    store: &Store,
    name: &str,
    file: &Path,
    docker: bool,
    platform: &Platform,
) -> Result<StoredImage, BuildError> {
    let bad = |reason: String| BuildError::BadImage { image: name.to_string(), reason };
    // read_archive's reasons say what the archive is ("is not a tar archive").
    let members = read_archive(store, file).map_err(|why| bad(format!("the archive {why}")))?;
    let have = |d: &Digest| -> Result<(), BuildError> {
        if store.has_blob(d) {
            Ok(())
        } else {
            Err(bad(format!("the archive lacks blob {d}")))
        }
    };
    // A docker-archive that is also an OCI layout (kiln's own, Docker 25's
    // `docker save`) is read through its index: that has the manifest as
    // written, annotations and all. An older one only has `manifest.json`.
    if let (true, Some(m), false) = (docker, members.get("manifest.json"), members.contains_key("index.json"))
    {
        let m = docker_manifest(store, &members, m).map_err(bad)?;
        return finish(store, name, m, &have);
    }
    let index = members.get("index.json").ok_or_else(|| bad("the archive has no `index.json`".into()))?;
    let index = read_document_blob(store, index).map_err(bad)?;
    let m = resolve_index(&index, None, &have, store, platform).map_err(bad)?;
    if let (true, Some(mj)) = (docker, members.get("manifest.json")) {
        // `docker load` reads `manifest.json`: both must be the same image.
        let (config, layers) = docker_manifest_parts(store, &members, mj).map_err(bad)?;
        let theirs: ImageManifest = serde_json::from_slice(&read_document_blob(store, &m).map_err(bad)?)
            .map_err(|e| bad(format!("its manifest is malformed ({})", json_error(&e))))?;
        let same = theirs.config().digest().to_string() == config.to_string()
            && theirs
                .layers()
                .iter()
                .map(|l| l.digest().to_string())
                .eq(layers.iter().map(|d| d.to_string()));
        if !same {
            return Err(bad("its `index.json` and `manifest.json` describe different images".into()));
        }
    }
    finish(store, name, m, &have)
}

/// A base imported before under `key` (e.g. an engine image ID), if its
/// blobs are all still intact.
pub fn imported_as(store: &Store, key: &str) -> Option<StoredImage> {
    checked_before(store, key)
}

/// Streams an archive's regular files into the store by content. Returns
/// member name → digest (names are only looked up, never used as paths).
///
/// The file is hostile input that may not even be a tar (a recipe can name
/// any file): no message quotes its bytes. tar-rs's own errors quote the
/// header fields they cannot parse, so they are replaced by what failed.
fn read_archive(store: &Store, file: &Path) -> Result<HashMap<String, Digest>, String> {
    let mut f = crate::image::open_regular(file).map_err(|e| format!("cannot be opened ({e})"))?;
    let mut first = [0u8; 512];
    let n = f.read(&mut first).map_err(|e| format!("cannot be read ({})", e.kind()))?;
    if n < 512 || !header_checksum_ok(&first) {
        return Err("is not a tar archive (its first 512 bytes are not a tar header)".into());
    }
    let f = std::io::Read::chain(std::io::Cursor::new(first), f);
    let mut a = tar::Archive::new(BufReader::with_capacity(1 << 20, f));
    let mut out = HashMap::new();
    // Links, resolved once every file is in: (name, target as the archive names it).
    let mut links: Vec<(String, String)> = Vec::new();
    let mut last = String::from("(the first member)");
    for e in a.entries().map_err(|_| "is not a tar archive".to_string())? {
        let mut e = e.map_err(|_| format!("has a malformed member header after {last}"))?;
        let kind = e.header().entry_type();
        if !(kind.is_file() || kind.is_symlink() || kind.is_hard_link()) {
            continue;
        }
        // Named as an extracting tool names it (`docker load` cleans each name):
        // `./a`, `/a` and `x/../a` are all `a`, and may be there only once.
        let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let name = clean_member(&raw).ok_or_else(|| {
            format!("has a member `{}` that leads out of the archive", crate::error::shown(&raw))
        })?;
        last = format!("`{}`", crate::error::shown(&name));
        if out.contains_key(&name) || links.iter().any(|(n, _)| *n == name) {
            return Err(format!("holds the member {last} twice"));
        }
        if !kind.is_file() {
            let target =
                e.link_name_bytes().map(|t| String::from_utf8_lossy(&t).into_owned()).unwrap_or_default();
            // A symlink's target is relative to its folder; a hard link's to the archive's root.
            let joined = match (kind.is_symlink(), name.rfind('/')) {
                (true, Some(i)) if !target.starts_with('/') => format!("{}/{target}", &name[..i]),
                _ => target,
            };
            let target = clean_member(&joined)
                .ok_or_else(|| format!("has a link {last} that leads out of the archive"))?;
            links.push((name, target));
            continue;
        }
        let mut w = BlobWriter::new(store).map_err(|e| e.to_string())?;
        std::io::copy(&mut e, &mut w).map_err(|e| format!("member {last} is truncated ({})", e.kind()))?;
        let (d, _) = w.commit().map_err(|e| e.to_string())?;
        out.insert(name, d);
    }
    // A link names another member (through links, a few deep), as extraction would make it.
    for (name, target) in &links {
        let mut at = target.clone();
        let mut hops = 0;
        let digest = loop {
            if let Some(d) = out.get(&at) {
                break *d;
            }
            match links.iter().find(|(n, _)| *n == at) {
                Some((_, next)) if hops < 8 => {
                    at = next.clone();
                    hops += 1;
                }
                _ => {
                    return Err(format!(
                        "has a link `{}` to no file of the archive",
                        crate::error::shown(name)
                    ))
                }
            }
        };
        out.insert(name.clone(), digest);
    }
    for (name, d) in &out {
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            if hex != d.hex() {
                return Err(format!(
                    "member `{}` does not match its digest (it hashes to {d})",
                    crate::error::shown(name)
                ));
            }
        }
    }
    Ok(out)
}

/// A member's name as extraction makes it: `.` and empty parts dropped,
/// `..` taking one back, a leading `/` ignored; `None` when it would leave
/// the archive's root or names nothing.
fn clean_member(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Picks the manifest from an index: by tag, the only one, or (an index of
/// one image per platform) the one for `platform`. A nested index (a
/// multi-platform image under a tag) is followed to `platform` too.
fn resolve_index(
    index: &[u8],
    tag: Option<&str>,
    fetch: &dyn Fn(&Digest) -> Result<(), BuildError>,
    store: &Store,
    platform: &Platform,
) -> Result<Digest, String> {
    let index: ImageIndex = serde_json::from_slice(index)
        .map_err(|e| format!("its `index.json` is not an OCI index ({})", json_error(&e)))?;
    let ms = index.manifests();
    let tag_of = |d: &oci_spec::image::Descriptor| {
        d.annotations().as_ref().and_then(|a| a.get(crate::export::REF_NAME)).cloned()
    };
    let desc = match tag {
        Some(t) => ms.iter().find(|d| tag_of(d).as_deref() == Some(t)).ok_or_else(|| {
            let tags: Vec<String> = ms.iter().filter_map(tag_of).collect();
            format!(
                "it has no image tagged `{t}` (tags: {})",
                if tags.is_empty() { "none".into() } else { tags.join(", ") }
            )
        })?,
        None if ms.len() == 1 => &ms[0],
        None if ms.iter().all(|d| d.platform().is_some()) => crate::image::select_platform(ms, platform)?,
        None => {
            let tags: Vec<String> = ms.iter().filter_map(tag_of).collect();
            return Err(format!(
                "it holds {} images; name one as `oci:DIR:TAG` (tags: {})",
                ms.len(),
                tags.join(", ")
            ));
        }
    };
    let digest: Digest = desc.digest().to_string().parse().map_err(|e| format!("{e}"))?;
    let mt = desc.media_type().to_string();
    if mt == OCI_INDEX || mt == DOCKER_LIST {
        fetch(&digest).map_err(|e| e.to_string())?;
        let nested = read_document_blob(store, &digest)?;
        let nested_index: ImageIndex = serde_json::from_slice(&nested)
            .map_err(|e| format!("its nested index is malformed ({})", json_error(&e)))?;
        let pick = crate::image::select_platform(nested_index.manifests(), platform)?;
        return pick.digest().to_string().parse().map_err(|e| format!("{e}"));
    }
    Ok(digest)
}

/// The config and layers (as the archive's members) of a docker-archive's
/// one `manifest.json` entry.
fn docker_manifest_parts(
    store: &Store,
    members: &HashMap<String, Digest>,
    manifest_json: &Digest,
) -> Result<(Digest, Vec<Digest>), String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Entry {
        config: String,
        layers: Vec<String>,
    }
    let bytes = read_document_blob(store, manifest_json)?;
    let entries: Vec<Entry> = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its `manifest.json` is malformed ({})", json_error(&e)))?;
    let [entry] = entries.as_slice() else {
        return Err(format!("it holds {} images; kiln reads archives of one", entries.len()));
    };
    let member = |name: &str| {
        members.get(name.trim_start_matches("./")).copied().ok_or_else(|| format!("it lacks `{name}`"))
    };
    let layers = entry.layers.iter().map(|l| member(l)).collect::<Result<_, _>>()?;
    Ok((member(&entry.config)?, layers))
}

/// Builds a manifest for a docker-archive's `manifest.json` entry.
fn docker_manifest(
    store: &Store,
    members: &HashMap<String, Digest>,
    manifest_json: &Digest,
) -> Result<Digest, String> {
    let (config, layer_digests) = docker_manifest_parts(store, members, manifest_json)?;
    let config_size = fs::metadata(store.blob_path(&config)).map(|m| m.len()).unwrap_or(0);
    let mut layers = Vec::new();
    for d in layer_digests {
        let size = fs::metadata(store.blob_path(&d)).map(|m| m.len()).unwrap_or(0);
        // `docker save` names no media types: the blob's magic number says.
        let mt = match magic(store, &d) {
            [0x1f, 0x8b, _, _] => crate::layer::MEDIA_TYPE,
            [0x28, 0xb5, 0x2f, 0xfd] => LAYER_TAR_ZSTD,
            _ => LAYER_TAR,
        };
        layers.push(serde_json::json!({"mediaType": mt, "digest": d.to_string(), "size": size}));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::image::MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": config.to_string(), "size": config_size},
        "layers": layers,
    });
    store.put_blob(&serde_json::to_vec(&manifest).expect("json")).map_err(|e| e.to_string())
}

/// The first four bytes of a blob (zeros if it is shorter).
fn magic(store: &Store, d: &Digest) -> [u8; 4] {
    let mut magic = [0u8; 4];
    if let Ok(mut f) = fs::File::open(store.blob_path(d)) {
        let _ = f.read(&mut magic);
    }
    magic
}

/// An image recorded as `bases/KEY` once it passed every check, if all its
/// blobs are still intact.
fn checked_before(store: &Store, key: &str) -> Option<StoredImage> {
    let rec = store.read_record::<ImageRecord>(kiln_cache::RecordKind::Base, key)?;
    if !rec.blobs.iter().all(|b| store.verify_blob(b).unwrap_or(false)) {
        return None;
    }
    let img = stored_image(store, &rec.manifest).ok()?;
    store.touch_record(kiln_cache::RecordKind::Base, key);
    Some(img)
}

/// Fetches the manifest's blobs, checks every layer, and describes the image.
/// An image that passed before is not checked again.
pub fn finish(
    store: &Store,
    name: &str,
    manifest: Digest,
    fetch: &dyn Fn(&Digest) -> Result<(), BuildError>,
) -> Result<StoredImage, BuildError> {
    if let Some(img) = checked_before(store, &manifest.hex()) {
        return Ok(img);
    }
    let bad = |reason: String| BuildError::BadImage { image: name.to_string(), reason };
    fetch(&manifest)?;
    let m: ImageManifest = serde_json::from_slice(&read_document_blob(store, &manifest).map_err(bad)?)
        .map_err(|e| bad(format!("manifest {manifest} is malformed ({})", json_error(&e))))?;
    let config: Digest = m.config().digest().to_string().parse().map_err(|e| bad(format!("{e}")))?;
    fetch(&config)?;
    for l in m.layers() {
        let d: Digest = l.digest().to_string().parse().map_err(|e| bad(format!("{e}")))?;
        fetch(&d)?;
    }
    let img = stored_image(store, &manifest)?;
    let mut tree = FsTree::default();
    for l in &img.layers {
        // Scan, not load: a listing of the same diff_id from elsewhere says nothing of this blob.
        let listing = Listing::scan(store, l)?;
        tree.push_file(l.digest, listing)?;
    }
    img.record(store, kiln_cache::RecordKind::Base, &manifest.hex(), name)?;
    Ok(img)
}

/// Describes an image whose manifest and config are in the store.
pub(crate) fn stored_image(store: &Store, manifest: &Digest) -> Result<StoredImage, BuildError> {
    let name = manifest.to_string();
    let bad = |reason: String| BuildError::BadImage { image: name.clone(), reason };
    let mbytes = read_document_blob(store, manifest).map_err(bad)?;
    let m: ImageManifest = serde_json::from_slice(&mbytes)
        .map_err(|e| bad(format!("malformed manifest ({})", json_error(&e))))?;
    let mt = m.media_type().as_ref().map(|t| t.to_string()).unwrap_or_default();
    if !(mt.is_empty() || mt == crate::image::MANIFEST_MEDIA_TYPE || mt == DOCKER_MANIFEST) {
        return Err(bad(format!("unsupported manifest type `{mt}`")));
    }
    let config: Digest = m.config().digest().to_string().parse().map_err(|e| bad(format!("{e}")))?;
    let cbytes = read_document_blob(store, &config).map_err(bad)?;
    let cj: ImageConfiguration =
        serde_json::from_slice(&cbytes).map_err(|e| bad(format!("malformed config ({})", json_error(&e))))?;
    let diff_ids = cj.rootfs().diff_ids();
    if diff_ids.len() != m.layers().len() {
        return Err(bad(format!(
            "the manifest has {} layers but the config {} diff_ids",
            m.layers().len(),
            diff_ids.len()
        )));
    }
    // A descriptor's size is copied into every manifest built on this
    // image: it must be the blob's, or other tools refuse the result.
    let check_size = |what: &str, d: &Digest, said: u64| -> Result<(), BuildError> {
        match fs::metadata(store.blob_path(d)) {
            Ok(md) if md.len() != said => {
                Err(bad(format!("the manifest says {what} {d} has {said} bytes, but it has {}", md.len())))
            }
            _ => Ok(()),
        }
    };
    check_size("the config", &config, m.config().size())?;
    let mut layers = Vec::new();
    for (l, diff) in m.layers().iter().zip(diff_ids) {
        let digest: Digest = l.digest().to_string().parse().map_err(|e| bad(format!("{e}")))?;
        check_size("the layer", &digest, l.size())?;
        layers.push(ImageLayer {
            diff_id: diff.parse().map_err(|e| bad(format!("{e}")))?,
            digest,
            size: l.size(),
            media_type: l.media_type().to_string(),
        });
    }
    Ok(StoredImage {
        manifest: *manifest,
        manifest_size: mbytes.len() as u64,
        config,
        config_json: cj,
        layers,
        annotations: m.annotations().clone().unwrap_or_default().into_iter().collect(),
        docker_config: crate::image::docker_config_of(&cbytes),
    })
}

/// A manifest, index or config from the store, refused past [`MAX_DOCUMENT`]
/// bytes before it is read.
pub(crate) fn read_document_blob(store: &Store, d: &Digest) -> Result<Vec<u8>, String> {
    let size = fs::metadata(store.blob_path(d)).map(|m| m.len()).unwrap_or(0);
    if size > MAX_DOCUMENT {
        return Err(format!(
            "the document {d} has {size} bytes; kiln reads manifests, indexes and configs of up to {} MiB",
            MAX_DOCUMENT >> 20
        ));
    }
    store.read_blob(d).map_err(|e| e.to_string())
}

/// Whether a 512-byte block is a tar header whose checksum adds up.
fn header_checksum_ok(block: &[u8; 512]) -> bool {
    let h = tar::Header::from_byte_slice(block);
    let Ok(want) = h.cksum() else { return false };
    let sum: u32 = block[..148].iter().chain(&[b' '; 8]).chain(&block[156..]).map(|b| *b as u32).sum();
    sum == want
}

#[cfg(test)]
mod member_names {
    use super::clean_member;

    #[test]
    fn names_are_cleaned_as_extraction_cleans_them() {
        for (raw, want) in [
            ("manifest.json", Some("manifest.json")),
            ("./manifest.json", Some("manifest.json")),
            ("/manifest.json", Some("manifest.json")),
            (".//manifest.json", Some("manifest.json")),
            ("x/../manifest.json", Some("manifest.json")),
            ("blobs/sha256/../sha256/ab", Some("blobs/sha256/ab")),
            ("../manifest.json", None),
            ("a/../../b", None),
            ("./", None),
        ] {
            assert_eq!(clean_member(raw).as_deref(), want, "{raw}");
        }
    }
}
