//! What a `run` step changed, as both backends report it, turned into one
//! normalized layer. The local backend reads an overlay upper folder; the
//! Docker backend reads the layer tar the engine committed. Both end here, so
//! the same changes give the same layer bytes whichever backend ran them.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use crate::error::BuildError;
use crate::layer::{Content, LayerEntry};
use crate::listing::{Kind, Listing};
use crate::tarball::TarKind;

use crate::whiteout::{OPAQUE, WHITEOUT};

/// One changed path (relative, clean).
#[derive(Debug, Clone)]
pub struct Change {
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: ChangeKind,
    /// Kept extended attributes (file capabilities).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Clone)]
pub enum ChangeKind {
    /// `link`: files with the same value are hard links of one another.
    File {
        size: u64,
        content: Content,
        link: Option<u64>,
    },
    /// `opaque`: the folder hides everything the layers below hold in it.
    Dir {
        opaque: bool,
    },
    Symlink(String),
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
    /// The path was deleted.
    Whiteout,
}

/// The layer entries for `changes`: hard link groups are anchored on the
/// first path in byte order whatever order the backend found them in,
/// whiteouts become `.wh.NAME` and opaque folders `.wh..wh..opq` (OCI image
/// spec, "Representing Changes"). Metadata is kept as found; times are the
/// epoch when the layer is written.
pub fn to_layer_entries(mut changes: Vec<Change>) -> Vec<LayerEntry> {
    changes.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    let mut anchors: BTreeMap<u64, String> = BTreeMap::new();
    let mut out = Vec::with_capacity(changes.len());
    let join = |path: &str, name: &str| match path.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/{name}"),
        None => name.to_string(),
    };
    for c in changes {
        let (kind, content) = match c.kind {
            ChangeKind::File { size, content, link } => match link.map(|l| anchors.get(&l).cloned()) {
                Some(Some(anchor)) => (TarKind::Hardlink(anchor), Content::None),
                Some(None) => {
                    anchors.insert(link.expect("linked"), c.path.clone());
                    (TarKind::File { size }, content)
                }
                None => (TarKind::File { size }, content),
            },
            ChangeKind::Dir { opaque } => {
                if opaque {
                    out.push(marker(format!("{}/{OPAQUE}", c.path)));
                }
                (TarKind::Dir, Content::None)
            }
            ChangeKind::Symlink(t) => (TarKind::Symlink(t), Content::None),
            ChangeKind::Char(a, b) => (TarKind::CharDev(a, b), Content::None),
            ChangeKind::Block(a, b) => (TarKind::BlockDev(a, b), Content::None),
            ChangeKind::Fifo => (TarKind::Fifo, Content::None),
            ChangeKind::Whiteout => {
                let name = c.path.rsplit('/').next().unwrap_or(&c.path);
                out.push(marker(join(&c.path, &format!("{WHITEOUT}{name}"))));
                continue;
            }
        };
        let xattrs = if matches!(kind, TarKind::Hardlink(_)) { Vec::new() } else { c.xattrs };
        out.push(LayerEntry { path: c.path, kind, mode: c.mode, uid: c.uid, gid: c.gid, content, xattrs });
    }
    out
}

/// A whiteout or opaque marker: an empty file, mode 0, owned by root.
fn marker(path: String) -> LayerEntry {
    LayerEntry {
        path,
        kind: TarKind::File { size: 0 },
        mode: 0,
        uid: 0,
        gid: 0,
        content: Content::Bytes(Vec::new()),
        xattrs: Vec::new(),
    }
}

/// Reads an overlay upper folder: a 0:0 character device is a whiteout, a
/// folder with `opaque_xattr` (`trusted.overlay.opaque=y`, or the
/// `user.` one in a user namespace) is opaque. Sockets are skipped (they
/// cannot be archived), as Docker does.
pub fn from_upper(upper: &Path, opaque_xattr: &str) -> Result<Vec<Change>, BuildError> {
    let mut out = Vec::new();
    for entry in walkdir::WalkDir::new(upper).follow_links(false).sort_by_file_name().min_depth(1) {
        let entry = entry.map_err(|e| BuildError::Read {
            path: e.path().unwrap_or(upper).to_path_buf(),
            source: e.into_io_error().unwrap_or_else(|| std::io::Error::other("walk failed")),
        })?;
        let path = entry.path();
        let md = std::fs::symlink_metadata(path).map_err(BuildError::io_read(path))?;
        let rel = path.strip_prefix(upper).expect("under upper");
        let opaque = |p: &Path| read_xattr(p, opaque_xattr).as_deref() == Some(b"y".as_slice());
        if let Some(c) = change_of(path, rel, &md, &opaque)? {
            out.push(c);
        }
    }
    Ok(out)
}

/// The change the entry at `path` (`rel` in the image) records: a 0:0
/// character device is a whiteout, a folder is opaque when `opaque` says
/// so; `None` for a socket (it cannot be archived; Docker skips them too).
pub fn change_of(
    path: &Path,
    rel: &Path,
    md: &std::fs::Metadata,
    opaque: &dyn Fn(&Path) -> bool,
) -> Result<Option<Change>, BuildError> {
    let rel = rel.to_str().ok_or_else(|| {
        BuildError::usage(
            format!(
                "the command made `/{}`, whose name is not UTF-8",
                crate::error::shown(&rel.to_string_lossy())
            ),
            Some("kiln layers hold UTF-8 paths only; rename the file in the command"),
        )
    })?;
    let ft = md.file_type();
    let rdev = md.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let kind = if ft.is_char_device() && rdev == 0 {
        ChangeKind::Whiteout
    } else if ft.is_dir() {
        ChangeKind::Dir { opaque: opaque(path) }
    } else if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(BuildError::io_read(path))?;
        let t = t.to_str().ok_or_else(|| {
            BuildError::usage(format!("The symlink `/{rel}` points to a name that is not UTF-8"), None)
        })?;
        ChangeKind::Symlink(t.to_string())
    } else if ft.is_file() {
        let link = (md.nlink() > 1).then_some(md.ino());
        ChangeKind::File {
            size: md.len(),
            content: Content::Slice { path: path.to_path_buf(), offset: 0, whole: true, sha256: None },
            link,
        }
    } else if ft.is_char_device() {
        ChangeKind::Char(major, minor)
    } else if ft.is_block_device() {
        ChangeKind::Block(major, minor)
    } else if ft.is_fifo() {
        ChangeKind::Fifo
    } else {
        return Ok(None); // a socket
    };
    let xattrs = if matches!(kind, ChangeKind::Whiteout) {
        Vec::new()
    } else {
        crate::listing::KEPT_XATTRS
            .iter()
            .filter_map(|k| Some((k.to_string(), read_xattr(path, k)?)))
            .collect()
    };
    Ok(Some(Change {
        path: rel.to_string(),
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        kind,
        xattrs,
    }))
}

fn read_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    let n = rustix::fs::lgetxattr(path, name, &mut buf).ok()?;
    Some(buf[..n].to_vec())
}

/// The changes a layer tar holds (at `base` in `tar`, `size` bytes or to
/// the end), their contents left in that file.
pub fn from_tar(tar: &Path, base: u64, size: Option<u64>) -> Result<Vec<Change>, BuildError> {
    let mut f = std::fs::File::open(tar).map_err(BuildError::io_read(tar))?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(base)).map_err(BuildError::io_read(tar))?;
    let pseudo = kiln_cache::Digest::of(tar.as_os_str().as_encoded_bytes());
    let reader = std::io::BufReader::with_capacity(1 << 20, std::io::Read::take(f, size.unwrap_or(u64::MAX)));
    let (listing, _, offsets) = crate::listing::scan_layer_with_offsets(reader, &pseudo)?;
    from_layer_listing(&listing, &offsets, tar, base)
}

/// Reads a committed layer's listing (from an engine), with each file's
/// offset in `tar` (the uncompressed layer at `base` in that file): `.wh.`
/// files become whiteouts and opaque folders, hard links join their target's
/// group.
pub(crate) fn from_layer_listing(
    listing: &Listing,
    offsets: &BTreeMap<String, u64>,
    tar: &Path,
    base: u64,
) -> Result<Vec<Change>, BuildError> {
    let mut opaque: Vec<String> = Vec::new();
    let mut links: Vec<(&str, &str)> = Vec::new(); // (path, target), resolved once every file is known
    let mut out: Vec<Change> = Vec::new();
    let mut at: BTreeMap<String, usize> = BTreeMap::new(); // path → index in `out`
    for e in &listing.entries {
        let (dir, name) = match e.path.rsplit_once('/') {
            Some((d, n)) => (Some(d), n),
            None => (None, e.path.as_str()),
        };
        if name == OPAQUE {
            opaque.push(dir.unwrap_or("").to_string());
            continue;
        }
        let kind = if name.starts_with(WHITEOUT) {
            ChangeKind::Whiteout
        } else {
            match &e.kind {
                Kind::File { size, .. } => {
                    let offset = *offsets.get(&e.path).expect("every file has an offset");
                    ChangeKind::File {
                        size: *size,
                        content: Content::Slice {
                            path: tar.to_path_buf(),
                            offset: base + offset,
                            whole: false,
                            sha256: None,
                        },
                        link: None,
                    }
                }
                Kind::Hardlink { target } => {
                    links.push((&e.path, target));
                    continue;
                }
                Kind::Dir => ChangeKind::Dir { opaque: false },
                Kind::Symlink { target } => ChangeKind::Symlink(target.clone()),
                Kind::Char { major, minor } => ChangeKind::Char(*major, *minor),
                Kind::Block { major, minor } => ChangeKind::Block(*major, *minor),
                Kind::Fifo => ChangeKind::Fifo,
            }
        };
        let path = match (&kind, name.strip_prefix(WHITEOUT)) {
            (ChangeKind::Whiteout, Some(victim)) => {
                dir.map(|d| format!("{d}/{victim}")).unwrap_or_else(|| victim.to_string())
            }
            _ => e.path.clone(),
        };
        at.insert(path.clone(), out.len());
        out.push(Change { path, mode: e.mode, uid: e.uid, gid: e.gid, kind, xattrs: e.xattr_pairs() });
    }
    for (n, (path, target)) in links.into_iter().enumerate() {
        let Some(&i) = at.get(target) else {
            return Err(BuildError::usage(
                format!("the engine's layer links `/{path}` to `/{target}`, which it does not hold"),
                None,
            ));
        };
        let t = &mut out[i];
        let ChangeKind::File { size, content, link } = &mut t.kind else {
            return Err(BuildError::usage(
                format!("the engine's layer links `/{path}` to `/{target}`, which is not a file"),
                None,
            ));
        };
        let group = *link.get_or_insert(n as u64);
        let kind = ChangeKind::File { size: *size, content: content.clone(), link: Some(group) };
        let (mode, uid, gid, xattrs) = (t.mode, t.uid, t.gid, t.xattrs.clone());
        out.push(Change { path: path.to_string(), mode, uid, gid, kind, xattrs });
    }
    for dir in opaque {
        match at.get(&dir).map(|i| &mut out[*i]) {
            Some(Change { kind: ChangeKind::Dir { opaque }, .. }) => *opaque = true,
            _ => {
                return Err(BuildError::usage(
                    format!("the engine's layer marks `/{dir}` opaque but does not hold that folder"),
                    None,
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, link: Option<u64>) -> Change {
        Change {
            path: path.into(),
            mode: 0o644,
            uid: 0,
            gid: 0,
            kind: ChangeKind::File { size: 1, content: Content::Bytes(b"x".to_vec()), link },
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn hard_links_anchor_on_the_first_path_in_byte_order() {
        let entries = to_layer_entries(vec![file("a/b", Some(7)), file("a.c", Some(7)), file("z", None)]);
        let got: Vec<(&str, &TarKind)> = entries.iter().map(|e| (e.path.as_str(), &e.kind)).collect();
        assert_eq!(
            got,
            vec![
                ("a.c", &TarKind::File { size: 1 }),
                ("a/b", &TarKind::Hardlink("a.c".into())),
                ("z", &TarKind::File { size: 1 })
            ]
        );
    }

    #[test]
    fn file_capabilities_survive_upper_to_layer_to_folder() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIPPED: setting security.capability needs root");
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        // cap_net_raw, permitted and effective (VFS_CAP_REVISION_2).
        let cap: [u8; 20] = [1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let dir = tempfile::tempdir().unwrap();
        let upper = dir.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        std::fs::write(upper.join("ping"), b"binary").unwrap();
        rustix::fs::setxattr(
            upper.join("ping"),
            "security.capability",
            &cap,
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        let changes = from_upper(&upper, crate::unpack::OPAQUE_TRUSTED).unwrap();
        assert_eq!(changes[0].xattrs, vec![("security.capability".to_string(), cap.to_vec())]);
        let store = kiln_cache::Store::open(&dir.path().join("cache")).unwrap();
        let (blob, listing) = crate::layer::write_layer(&store, to_layer_entries(changes), 0).unwrap();
        assert_eq!(
            listing.iter().unwrap().next().unwrap().unwrap().xattr_pairs(),
            vec![("security.capability".to_string(), cap.to_vec())]
        );
        let layer = crate::image::ImageLayer {
            diff_id: blob.diff_id,
            digest: blob.digest,
            size: blob.size,
            media_type: crate::layer::MEDIA_TYPE.into(),
        };
        // Read back from the blob (not the saved listing) and unpacked into a folder.
        let _ = std::fs::remove_file(store.record_path(kiln_cache::RecordKind::Listing, &blob.diff_id.hex()));
        let folder = dir.path().join("folder");
        crate::unpack::unpack_blob(&store, &layer, &folder).unwrap();
        let mut got = [0u8; 64];
        let n = rustix::fs::lgetxattr(folder.join("ping"), "security.capability", &mut got).unwrap();
        assert_eq!(&got[..n], &cap);
    }

    #[test]
    fn whiteouts_and_opaque_folders_become_oci_markers() {
        let mut gone = file("etc/old", None);
        gone.kind = ChangeKind::Whiteout;
        let mut top = file("top", None);
        top.kind = ChangeKind::Whiteout;
        let mut d = file("var/cache", None);
        d.kind = ChangeKind::Dir { opaque: true };
        let entries = to_layer_entries(vec![gone, top, d]);
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["etc/.wh.old", ".wh.top", "var/cache/.wh..wh..opq", "var/cache"]);
    }
}
