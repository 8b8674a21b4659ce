//! Writing a layer: entries sorted by path bytes (parents first), each header
//! normalized (design §3), file content streamed and checked against the
//! digest its cache key was computed from, then tar → sha256 (diff_id) →
//! parallel gzip → sha256 (digest) → temp file → rename. Memory stays flat
//! whatever the layer's size.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;

use kiln_cache::{BlobWriter, Digest, HashingWriter, Store};

use crate::error::BuildError;
use crate::gzip;
use crate::listing::{Kind, ListEntry, Listing, ListingFile};
use crate::tarball::{self, TarHeader, TarKind};

/// The OCI media type of kiln's layers.
pub const MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Where a regular file's content comes from.
#[derive(Debug, Clone)]
pub enum Content {
    None,
    /// A file on disk, expected to hash to `sha256` (what its cache key used).
    /// With `stamp`, the file's stat when that digest was taken: if the file
    /// still has it before and after it is read, the bytes are not hashed
    /// again (the same trust the stat index gives; any write changes ctime).
    Path {
        path: PathBuf,
        sha256: Digest,
        stamp: Option<Stamp>,
    },
    Bytes(Vec<u8>),
    /// The entry's `size` bytes at `offset` of a file kiln made itself (a
    /// sandbox's upper folder, an engine's layer tar): nothing to check
    /// them against; their digest goes into the listing. With `whole`, the
    /// slice is the whole file, which must not have grown.
    Slice {
        path: PathBuf,
        offset: u64,
        whole: bool,
    },
}

/// What identifies a file's content as long as it is not written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(m: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        }
    }
}

/// One entry to write; `path` is relative (no leading or trailing `/`).
#[derive(Debug, Clone)]
pub struct LayerEntry {
    pub path: String,
    pub kind: TarKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub content: Content,
    /// Kept extended attributes (see [`crate::listing::KEPT_XATTRS`]).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// A finished layer blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerBlob {
    pub diff_id: Digest,
    pub digest: Digest,
    pub size: u64,
}

/// Writes `entries` as a layer into the store, with every timestamp `epoch`.
/// Also stores the layer's listing, and returns it.
#[cfg(test)]
pub(crate) fn write_layer(
    store: &Store,
    entries: Vec<LayerEntry>,
    epoch: u64,
) -> Result<(LayerBlob, ListingFile), BuildError> {
    write_layer_unpacking(store, entries, epoch, None)
}

/// Writes `entries` as a layer into the store, with every timestamp
/// `epoch`, and stores its listing. With `unpack`, also makes the layer as
/// a folder there (which must not exist) while its content streams by, for
/// a `run` step that needs it next: the layer is never read back.
pub fn write_layer_unpacking(
    store: &Store,
    mut entries: Vec<LayerEntry>,
    epoch: u64,
    unpack: Option<&std::path::Path>,
) -> Result<(LayerBlob, ListingFile), BuildError> {
    entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(BuildError::usage(format!("The layer would hold `/{}` twice", w[0].path), None));
    }
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let blob = BlobWriter::new(store)?;
    let tmp_dir = store.tmp_dir();
    let mut failure: Option<BuildError> = None;
    let result = gzip::compress(blob, threads, |w| {
        let mut tar = HashingWriter::new(BufWriter::with_capacity(256 * 1024, w));
        let folder = unpack.map(|p| (p, crate::unpack::pool_dir(store)));
        match write_entries(&mut tar, &entries, epoch, folder) {
            Ok(listing) => {
                let (buf, diff_id, _) = tar.finish();
                buf.into_inner().map_err(|e| io::Error::new(e.error().kind(), e.error().to_string()))?;
                Ok((listing, diff_id))
            }
            Err(e) => {
                failure = Some(e);
                Err(io::Error::other("layer entry failed"))
            }
        }
    });
    let (blob, (listing, diff_id)) = match (result, failure) {
        (_, Some(e)) => return Err(name_write_target(e, &tmp_dir, unpack)),
        (Err(e), None) => return Err(BuildError::Write { path: tmp_dir, source: e }),
        (Ok(v), None) => v,
    };
    let (digest, size) = blob.commit()?;
    let listing = listing.save(store, &diff_id)?;
    Ok((LayerBlob { diff_id, digest, size }, listing))
}

/// Writes sorted `entries` as a tar to `w`; with `unpack` (folder, file
/// pool), also makes them as that folder.
fn write_entries(
    w: &mut impl Write,
    entries: &[LayerEntry],
    epoch: u64,
    unpack: Option<(&std::path::Path, PathBuf)>,
) -> Result<Listing, BuildError> {
    let mut listing = Listing { entries: Vec::with_capacity(entries.len()) };
    let mut buf = vec![0u8; 256 * 1024];
    let werr = |e: io::Error| BuildError::Write { path: PathBuf::from("<layer>"), source: e };
    let folder_path = unpack.as_ref().map(|(p, _)| p.to_path_buf()).unwrap_or_default();
    let uerr = |e: io::Error| BuildError::Write { path: folder_path.clone(), source: e };
    let mut folder = match unpack {
        Some((p, pool)) => Some(crate::unpack::Materializer::new(p.to_path_buf(), Some(pool)).map_err(uerr)?),
        None => None,
    };
    for e in entries {
        let xattrs: std::collections::BTreeMap<String, String> =
            e.xattrs.iter().map(|(k, v)| (k.clone(), hex::encode(v))).collect();
        let bytes_sha = match &e.content {
            Content::Bytes(b) => Some(Digest::of(b)),
            _ => None,
        };
        let mut tee = match folder.as_mut() {
            Some(m) => {
                let sha = match &e.content {
                    Content::Path { sha256, .. } => Some(*sha256),
                    _ => bytes_sha,
                };
                let we = crate::listing::WalkEntry {
                    path: &e.path,
                    kind: &e.kind,
                    mode: e.mode,
                    uid: e.uid,
                    gid: e.gid,
                    mtime: epoch,
                    xattrs: &xattrs,
                };
                m.entry(&we, sha).map_err(uerr)?
            }
            None => None,
        };
        let header = TarHeader {
            path: &e.path,
            kind: &e.kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime: epoch,
            xattrs: &e.xattrs,
        };
        tarball::write_header(w, &header).map_err(werr)?;
        let mut sha = None;
        if let TarKind::File { size } = e.kind {
            let got = match &e.content {
                Content::Bytes(b) => {
                    w.write_all(b).map_err(werr)?;
                    if let Some(f) = tee.as_mut() {
                        f.write_all(b).map_err(uerr)?;
                    }
                    bytes_sha.expect("bytes are hashed above")
                }
                Content::Path { path, sha256, stamp } => {
                    let got = copy_exact(path, size, w, &mut buf, tee.as_mut(), (*stamp).zip(Some(*sha256)))?;
                    if got != *sha256 {
                        return Err(BuildError::Changed { path: path.clone() });
                    }
                    got
                }
                Content::Slice { path, offset, whole } => {
                    copy_slice(path, *offset, size, *whole, w, &mut buf, tee.as_mut())?
                }
                Content::None => unreachable!("regular files carry content"),
            };
            tarball::pad(w, size).map_err(werr)?;
            if tee.is_some() {
                drop(tee.take());
                folder.as_mut().expect("a tee comes from the folder").file_done(&got).map_err(uerr)?;
            }
            sha = Some(got);
        }
        listing.entries.push(ListEntry {
            path: e.path.clone(),
            kind: Kind::from_tar(&e.kind, sha),
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            xattrs,
        });
    }
    tarball::write_trailer(w).map_err(werr)?;
    if let Some(m) = folder {
        m.finish().map_err(uerr)?;
    }
    Ok(listing)
}

fn copy_slice(
    path: &PathBuf,
    offset: u64,
    size: u64,
    whole: bool,
    w: &mut impl Write,
    buf: &mut [u8],
    tee: Option<&mut File>,
) -> Result<Digest, BuildError> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).map_err(BuildError::io_read(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(BuildError::io_read(path))?;
    copy_n(f, path, size, w, buf, whole, tee)
}

/// Copies exactly `size` bytes of `path` to `w`, hashing them; a file that
/// grew or shrank since it was looked at is an error.
fn copy_exact(
    path: &PathBuf,
    size: u64,
    w: &mut impl Write,
    buf: &mut [u8],
    tee: Option<&mut File>,
    known: Option<(Stamp, Digest)>,
) -> Result<Digest, BuildError> {
    let f = File::open(path).map_err(BuildError::io_read(path))?;
    let stamp = || f.metadata().map(|m| Stamp::of(&m)).map_err(BuildError::io_read(path));
    if let Some((before, sha)) = known {
        if stamp()? == before {
            copy_unhashed(&f, path, size, w, buf, tee)?;
            if stamp()? != before {
                return Err(BuildError::Changed { path: path.clone() });
            }
            return Ok(sha);
        }
    }
    copy_n(f, path, size, w, buf, true, tee)
}

/// Copies exactly `size` bytes of a file whose stat vouches for its digest.
fn copy_unhashed(
    f: &File,
    path: &PathBuf,
    size: u64,
    w: &mut impl Write,
    buf: &mut [u8],
    tee: Option<&mut File>,
) -> Result<(), BuildError> {
    pump(f, path, size, w, buf, tee, |_| {})
}

/// Copies `size` bytes of `f`; with `whole`, `f` must end right there.
fn copy_n(
    f: File,
    path: &PathBuf,
    size: u64,
    w: &mut impl Write,
    buf: &mut [u8],
    whole: bool,
    tee: Option<&mut File>,
) -> Result<Digest, BuildError> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    pump(&f, path, size, w, buf, tee, |bytes| hasher.update(bytes))?;
    if whole && (&f).read(&mut buf[..1]).map_err(BuildError::io_read(path))? != 0 {
        return Err(BuildError::Changed { path: path.clone() });
    }
    Ok(Digest::from_hasher(hasher))
}

/// Moves `size` bytes from `f` to `w` (and `tee`), showing each piece to `seen`.
fn pump(
    mut f: &File,
    path: &PathBuf,
    size: u64,
    w: &mut impl Write,
    buf: &mut [u8],
    mut tee: Option<&mut File>,
    mut seen: impl FnMut(&[u8]),
) -> Result<(), BuildError> {
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(left as usize);
        let n = f.read(&mut buf[..want]).map_err(BuildError::io_read(path))?;
        if n == 0 {
            return Err(BuildError::Changed { path: path.clone() });
        }
        seen(&buf[..n]);
        w.write_all(&buf[..n])
            .map_err(|e| BuildError::Write { path: PathBuf::from("<layer>"), source: e })?;
        if let Some(t) = tee.as_mut() {
            t.write_all(&buf[..n])
                .map_err(|e| BuildError::Write { path: PathBuf::from("<unpack>"), source: e })?;
        }
        left -= n as u64;
    }
    Ok(())
}

/// The writers deep in a layer's streams name their targets `<layer>` and
/// `<unpack>`; a user told the disk is full needs the real folder.
fn name_write_target(e: BuildError, layer: &std::path::Path, unpack: Option<&std::path::Path>) -> BuildError {
    match e {
        BuildError::Write { path, source } if path.as_os_str() == "<layer>" => {
            BuildError::Write { path: layer.to_path_buf(), source }
        }
        BuildError::Write { path, source } if path.as_os_str() == "<unpack>" => {
            BuildError::Write { path: unpack.unwrap_or(layer).to_path_buf(), source }
        }
        e => e,
    }
}

/// Writes `entries` as a plain tar at `path` (times 0; kiln normalizes when
/// it reads it back). For the rootless helper, which hands its changes over.
pub fn write_plain_tar(entries: &[LayerEntry], path: &std::path::Path) -> Result<(), BuildError> {
    let file = File::create(path).map_err(BuildError::io_write(path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut sorted = entries.to_vec();
    sorted.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    write_entries(&mut w, &sorted, 0, None).map_err(|e| name_write_target(e, path, None))?;
    w.flush().map_err(BuildError::io_write(path))
}
