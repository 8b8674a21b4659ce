//! A layer's file list: every entry's path, type and metadata, with a sha256
//! of each regular file's content. Kept in the store by diff_id, so later
//! steps can look up their parents' metadata and `kiln diff` compares images
//! without unpacking them.

mod entry;
mod file;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;

pub(crate) use entry::KEPT_XATTRS;
pub use entry::{Kind, ListEntry};
pub use file::ListingFile;
pub(crate) use file::ListingWriter;

use serde::{Deserialize, Serialize};

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::image::ImageLayer;
use crate::tarball::TarKind;
use crate::whiteout::{OPAQUE, WHITEOUT};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<ListEntry>,
}

impl Listing {
    /// Stores this listing (sorted, one entry per path) for the layer `diff_id`.
    pub(crate) fn save(&self, store: &Store, diff_id: &Digest) -> Result<ListingFile, BuildError> {
        let mut w = ListingWriter::new(&store.tmp_dir());
        for e in &self.entries {
            w.push(e.clone()).map_err(BuildError::io_write(store.tmp_dir()))?;
        }
        persist(store, diff_id, w)
    }

    /// The layer's listing: from the store, or else by reading (and so
    /// checking) the layer blob once, decompressed as its media type says.
    /// A stored listing that does not open or whose blocks do not match
    /// their checksums (damaged, or from another version) is made again
    /// from the blob.
    pub fn load(store: &Store, layer: &ImageLayer) -> Result<ListingFile, BuildError> {
        let path = store.record_path(kiln_cache::RecordKind::Listing, &layer.diff_id.hex());
        if path.symlink_metadata().is_ok() {
            match ListingFile::open(&path, &layer.diff_id).and_then(|l| l.verify().map(|()| l)) {
                Ok(l) => return Ok(l),
                Err(e) => {
                    tracing::warn!(listing = %path.display(), error = %e, "listing again from the layer")
                }
            }
        }
        Self::scan(store, layer)
    }

    /// Reads the layer blob through, checking every entry and that it
    /// uncompresses to its diff_id, and records its listing. For blobs that
    /// just came from elsewhere, even when a listing of the diff_id exists.
    /// The entries stream to the listing file; memory holds a run of them.
    pub fn scan(store: &Store, layer: &ImageLayer) -> Result<ListingFile, BuildError> {
        let tmp = store.tmp_dir();
        let mut w = ListingWriter::new(&tmp);
        let mut push = |e| w.push(e).map_err(BuildError::io_write(&tmp));
        let actual =
            scan(layer.open_tar(store)?, &layer.digest, None, &mut |_, _| Ok(()), Some(&mut push), true)?
                .expect("hashed");
        if actual != layer.diff_id {
            return Err(BuildError::BadLayer {
                layer: layer.digest,
                reason: format!("its content hashes to {actual}, but the config says {}", layer.diff_id),
            });
        }
        persist(store, &layer.diff_id, w)
    }
}

/// Writes a listing into the store through a temp file and a rename, and
/// opens it.
fn persist(store: &Store, diff_id: &Digest, w: ListingWriter) -> Result<ListingFile, BuildError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp_dir = store.tmp_dir();
    let tmp = tempfile::NamedTempFile::new_in(&tmp_dir).map_err(BuildError::io_write(&tmp_dir))?;
    let file = tmp.as_file().try_clone().map_err(BuildError::io_write(&tmp_dir))?;
    w.finish(file, diff_id).map_err(BuildError::io_write(&tmp_dir))?;
    let path = store.record_path(kiln_cache::RecordKind::Listing, &diff_id.hex());
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(BuildError::io_write(&path))?;
    tmp.persist(&path).map_err(|e| BuildError::io_write(&path)(e.error))?;
    ListingFile::open(&path, diff_id).map_err(BuildError::io_read(&path))
}

/// The largest extension header (PAX record set, GNU long name or link)
/// accepted from a layer; read only after its size is checked.
const MAX_EXTENSION_BYTES: u64 = 1 << 20;
const MAX_PATH_BYTES: usize = 4096;

/// What extension headers say about the entry that follows them.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    xattrs: BTreeMap<String, String>,
}

/// Reads an uncompressed layer tar, checking every entry, and returns its
/// listing and the sha256 of the tar (its diff_id).
///
/// The walk is kiln's own (tar-rs only decodes header fields): tar-rs reads
/// extension bodies into memory whatever their size, and cannot honour a PAX
/// `size` in raw mode. Refused: extension headers over 1 MiB, paths that are
/// absolute or contain `..`, hard links that point outside the root, device
/// nodes (except the 0:0 character device overlay uses for whiteouts), sparse
/// and unknown entry types, bad checksums and truncated data.
pub fn scan_layer(r: impl Read, layer: &Digest) -> Result<(Listing, Digest), BuildError> {
    collect(r, layer, None, &mut |_, _| Ok(()))
}

/// What [`walk_layer`] shows of each entry before its data.
#[derive(Clone, Copy)]
pub struct WalkEntry<'a> {
    pub path: &'a str,
    pub kind: &'a TarKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub xattrs: &'a BTreeMap<String, String>,
}

/// The checks of [`scan_layer`], calling `visit` with every entry and a
/// reader of its data (regular files; empty for the rest). Holds no
/// listing and hashes nothing.
pub fn walk_layer(
    r: impl Read,
    layer: &Digest,
    visit: &mut dyn FnMut(&WalkEntry<'_>, &mut dyn Read) -> std::io::Result<()>,
) -> Result<(), BuildError> {
    scan(r, layer, None, visit, None, false).map(drop)
}

/// [`walk_layer`], also giving each entry as listed (a file with the
/// digest of the bytes its visit read) right after its visit. The tar as
/// a whole is not hashed.
pub fn walk_layer_listed(
    r: impl Read,
    layer: &Digest,
    visit: &mut dyn FnMut(&WalkEntry<'_>, &mut dyn Read) -> std::io::Result<()>,
    listed: &mut dyn FnMut(ListEntry) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    scan(r, layer, None, visit, Some(listed), false).map(drop)
}

/// [`scan_layer`], also giving where each regular file's data starts in the tar.
pub(crate) fn scan_layer_with_offsets(
    r: impl Read,
    layer: &Digest,
) -> Result<(Listing, Digest, BTreeMap<String, u64>), BuildError> {
    let mut offsets = BTreeMap::new();
    let (listing, diff_id) = collect(r, layer, Some(&mut offsets), &mut |_, _| Ok(()))?;
    Ok((listing, diff_id, offsets))
}

type Visit<'v> = dyn FnMut(&WalkEntry<'_>, &mut dyn Read) -> std::io::Result<()> + 'v;

/// [`scan`] into a listing in memory (sorted, the last of a path kept).
fn collect(
    r: impl Read,
    layer: &Digest,
    offsets: Option<&mut BTreeMap<String, u64>>,
    visit: &mut Visit<'_>,
) -> Result<(Listing, Digest), BuildError> {
    let mut entries = Vec::new();
    let mut push = |e| {
        entries.push(e);
        Ok(())
    };
    let diff_id = scan(r, layer, offsets, visit, Some(&mut push), true)?.expect("hashed");
    // Stable: of a path given twice, the later entry is what the layer holds.
    entries.sort_by(|a: &ListEntry, b| a.path.cmp(&b.path));
    entries.dedup_by(|later, kept| {
        let same = later.path == kept.path;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    entries.shrink_to_fit();
    Ok((Listing { entries }, diff_id))
}

/// Walks the tar, checking every entry; hands each entry, with its file's
/// digest, to `sink` in tar order (a path may come more than once) and
/// returns the diff_id if `diff_id` asks for it. Nothing is hashed that
/// no one asked for.
fn scan(
    r: impl Read,
    layer: &Digest,
    mut offsets: Option<&mut BTreeMap<String, u64>>,
    visit: &mut Visit<'_>,
    mut sink: Option<&mut dyn FnMut(ListEntry) -> Result<(), BuildError>>,
    diff_id: bool,
) -> Result<Option<Digest>, BuildError> {
    let mut r = HashingReader::new(r, diff_id);
    let bad = |reason: String| BuildError::BadLayer { layer: *layer, reason };
    let io_bad = |e: std::io::Error| bad(format!("unreadable ({e})"));
    // What the checks need of each path seen so far is its type, kept by
    // a keyed 64-bit hash of the path: 16 bytes a path, not the path.
    let mut seen = Seen::default();
    let mut pending = Pending::default();
    let mut block = [0u8; 512];
    loop {
        if !read_block(&mut r, &mut block).map_err(io_bad)? || block.iter().all(|b| *b == 0) {
            break; // end of archive
        }
        let h = tar::Header::from_byte_slice(&block);
        let want = h.cksum().map_err(|_| bad("a header has a malformed checksum field".into()))?;
        let sum: u32 = block[..148].iter().chain(&[b' '; 8]).chain(&block[156..]).map(|b| *b as u32).sum();
        if sum != want {
            return Err(bad("a header's checksum does not match".into()));
        }
        let et = h.entry_type();
        let header_size = h.entry_size().map_err(|_| bad("a header has a malformed size field".into()))?;
        if matches!(et.as_byte(), b'x' | b'g' | b'L' | b'K') {
            if header_size > MAX_EXTENSION_BYTES {
                return Err(bad(format!("an extended header of {header_size} bytes is larger than 1 MiB")));
            }
            let mut body = vec![0u8; header_size as usize];
            r.read_exact(&mut body).map_err(|e| bad(format!("an extended header is truncated ({e})")))?;
            skip(&mut r, padding(header_size)).map_err(io_bad)?;
            match et.as_byte() {
                b'x' => parse_pax(&body, &mut pending).map_err(|why| bad(format!("a PAX header {why}")))?,
                b'L' => pending.path = Some(trim_nul(body)),
                b'K' => pending.link = Some(trim_nul(body)),
                _ => {} // global PAX records carry nothing kiln keeps
            }
            continue;
        }
        let p = std::mem::take(&mut pending);
        let raw = p.path.unwrap_or_else(|| h.path_bytes().into_owned());
        let path = clean_path(&raw).map_err(|why| {
            bad(format!("entry `{}` {why}", crate::error::shown(&String::from_utf8_lossy(&raw))))
        })?;
        let size = p.size.unwrap_or(header_size);
        let Some(path) = path else {
            skip(&mut r, size + padding(size)).map_err(io_bad)?; // the root itself
            continue;
        };
        let mode = h.mode().map_err(|_| bad(format!("entry `{path}` has a malformed mode field")))? & 0o7777;
        let uid = match p.uid {
            Some(u) => u,
            None => h.uid().map_err(|_| bad(format!("entry `{path}` has a malformed uid field")))?,
        };
        let gid = match p.gid {
            Some(g) => g,
            None => h.gid().map_err(|_| bad(format!("entry `{path}` has a malformed gid field")))?,
        };
        let (uid, gid) = match (u32::try_from(uid), u32::try_from(gid)) {
            // 4294967295 is -1 to chown: "leave the owner", so a file that
            // names it would keep root's (and its setuid bit) on disk.
            (Ok(u), Ok(g)) if u != u32::MAX && g != u32::MAX => (u, g),
            (Ok(_), Ok(_)) => return Err(bad(format!("entry `{path}` has the owner id 4294967295 (-1)"))),
            _ => return Err(bad(format!("entry `{path}` has an owner beyond 32 bits"))),
        };
        let link = || -> Result<String, BuildError> {
            let l =
                p.link.clone().or_else(|| h.link_name_bytes().map(|l| l.into_owned())).unwrap_or_default();
            if l.len() > MAX_PATH_BYTES {
                return Err(bad(format!(
                    "entry `{path}` has a link target longer than {MAX_PATH_BYTES} bytes, which no filesystem can hold"
                )));
            }
            String::from_utf8(l)
                .map_err(|_| bad(format!("entry `{path}` has a link target that is not UTF-8")))
        };
        let tar_kind = match et.as_byte() {
            b'0' | b'\0' | b'7' => TarKind::File { size },
            b'5' => TarKind::Dir,
            b'2' => TarKind::Symlink(link()?),
            b'1' => {
                let t = link()?;
                let clean = clean_path(t.as_bytes())
                    .map_err(|why| bad(format!("hard link `{path}` points to `{t}`, which {why}")))?
                    .ok_or_else(|| bad(format!("hard link `{path}` points to the root")))?;
                TarKind::Hardlink(clean)
            }
            b'3' | b'4' => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                if et.as_byte() == b'4' || major != 0 || minor != 0 {
                    return Err(bad(format!(
                        "entry `{path}` is a device node ({major}:{minor}); layers kiln reads may not carry devices"
                    )));
                }
                TarKind::CharDev(major, minor)
            }
            b'6' => TarKind::Fifo,
            other => {
                return Err(bad(format!("entry `{path}` has the unsupported type `{}`", other as char)));
            }
        };
        check_in_layer(&seen, &path, &tar_kind).map_err(bad)?;
        let mtime = h.mtime().unwrap_or(0);
        let entry = WalkEntry { path: &path, kind: &tar_kind, mode, uid, gid, mtime, xattrs: &p.xattrs };
        let sha = if let TarKind::File { size } = tar_kind {
            if let Some(o) = offsets.as_deref_mut() {
                o.insert(path.clone(), r.pos);
            }
            let mut data = HashingReader::new((&mut r).take(size), sink.is_some());
            visit(&entry, &mut data).map_err(|e| visit_error(e, &path, io_bad))?;
            std::io::copy(&mut data, &mut std::io::sink()).map_err(io_bad)?;
            if data.pos != size {
                return Err(bad(format!("entry `{path}` is truncated")));
            }
            let sha = data.hasher.map(Digest::from_hasher);
            skip(&mut r, padding(size)).map_err(io_bad)?;
            sha
        } else {
            visit(&entry, &mut std::io::empty()).map_err(|e| visit_error(e, &path, io_bad))?;
            skip(&mut r, size + padding(size)).map_err(io_bad)?;
            None
        };
        seen.insert(&path, &tar_kind);
        if let Some(sink) = sink.as_deref_mut() {
            let kind = Kind::from_tar(&tar_kind, sha);
            sink(ListEntry { path, kind, mode, uid, gid, xattrs: p.xattrs })?;
        }
    }
    // Whatever follows the end marker still counts toward the digest.
    std::io::copy(&mut r, &mut std::io::sink()).map_err(io_bad)?;
    Ok(r.hasher.map(Digest::from_hasher))
}

/// Refuses an entry that goes through something this layer makes a symlink
/// (or anything but a folder), a path this layer already holds as another
/// type, and a hard link whose target is not an earlier entry of the layer
/// that is not a folder. Readers that follow entries in tar order (unpack,
/// flatten) would otherwise be led out of the root by entries the listing,
/// which keeps only the last of each path, never shows.
fn check_in_layer(seen: &Seen, path: &str, kind: &TarKind) -> Result<(), String> {
    let mut at = path;
    while let Some((up, _)) = at.rsplit_once('/') {
        let whiteout = match up.rsplit_once('/') {
            Some((p, n)) => format!("{p}/{WHITEOUT}{n}"),
            None => format!("{WHITEOUT}{up}"),
        };
        if seen.get(&whiteout).is_some() {
            return Err(format!(
                "entry `{path}` is inside `{up}`, which the same layer whites out; a whiteout hides only what layers below hold"
            ));
        }
        match seen.get(up) {
            None => {}
            // Seen as a folder, so its own parents passed these checks
            // then, and none can have changed since (a retype is refused).
            Some(DIR) => break,
            Some(SYMLINK) => {
                return Err(format!(
                    "entry `{path}` goes through `{up}`, which the same layer makes a symlink"
                ))
            }
            Some(t) => {
                return Err(format!(
                    "entry `{path}` is inside `{up}`, which the same layer makes {}",
                    noun(t)
                ))
            }
        }
        at = up;
    }
    // A whiteout hides what the layers below hold, never what its own layer
    // holds; readers that follow tar order would disagree on such a pair.
    let (parent, name) = match path.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, path),
    };
    let join = |n: &str| parent.map(|p| format!("{p}/{n}")).unwrap_or_else(|| n.to_string());
    let pair = match name.strip_prefix(WHITEOUT) {
        _ if name == OPAQUE => None,
        Some(victim) => Some((path.to_string(), join(victim))),
        None => Some((join(&format!("{WHITEOUT}{name}")), path.to_string())),
    };
    if let Some((whiteout, victim)) = pair {
        if seen.get(if whiteout == path { &victim } else { &whiteout }).is_some() {
            return Err(format!(
                "`{victim}` and its whiteout `{whiteout}` are both in the layer; a whiteout hides only what layers below hold"
            ));
        }
    }
    if let Some(prev) = seen.get(path) {
        let now = type_of(kind);
        if prev != now {
            return Err(format!(
                "`{path}` appears twice in the layer, as {} and then as {}; a layer holds each path once",
                noun(prev),
                noun(now)
            ));
        }
    }
    if let TarKind::Hardlink(t) = kind {
        match seen.get(t) {
            None => {
                return Err(format!(
                    "hard link `{path}` points to `{t}`, which is not an earlier entry of the same layer"
                ))
            }
            Some(DIR) => return Err(format!("hard link `{path}` points to the folder `{t}`")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The type of every path seen earlier in a layer, by a 64-bit hash of the
/// path keyed at random for each scan: a false match between two paths of
/// one layer is a chance of about 1 in 10^7 for a million entries, and
/// cannot be aimed at. It can only refuse a layer or let a hard link
/// name a missing target, which unpacking then refuses; it cannot make
/// an entry escape.
#[derive(Default)]
struct Seen {
    keys: std::collections::hash_map::RandomState,
    types: HashMap<u64, u8, std::hash::BuildHasherDefault<Prehashed>>,
}

impl Seen {
    fn key(&self, path: &str) -> u64 {
        use std::hash::BuildHasher;
        self.keys.hash_one(path)
    }

    fn get(&self, path: &str) -> Option<u8> {
        self.types.get(&self.key(path)).copied()
    }

    /// Records `path`'s type, and its parents as folders where the layer
    /// has not given them: a later entry may not make one of them a
    /// symlink or anything else but a folder, or white it out.
    fn insert(&mut self, path: &str, kind: &TarKind) {
        let k = self.key(path);
        self.types.insert(k, type_of(kind));
        let mut at = path;
        while let Some((up, _)) = at.rsplit_once('/') {
            let k = self.key(up);
            if self.types.contains_key(&k) {
                break; // and so are its parents
            }
            self.types.insert(k, DIR);
            at = up;
        }
    }
}

/// The hasher of keys that are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

const DIR: u8 = 1;
const SYMLINK: u8 = 2;

fn type_of(k: &TarKind) -> u8 {
    match k {
        TarKind::File { .. } => 0,
        TarKind::Dir => DIR,
        TarKind::Symlink(_) => SYMLINK,
        TarKind::Hardlink(_) => 3,
        TarKind::CharDev(..) => 4,
        TarKind::BlockDev(..) => 5,
        TarKind::Fifo => 6,
    }
}

fn noun(t: u8) -> &'static str {
    ["a file", "a folder", "a symlink", "a hard link", "a character device", "a block device", "a fifo"]
        [usize::from(t).min(6)]
}

/// A visitor's failure: the disk it writes to (full, read-only, no
/// permission) is the environment's problem; anything else, the layer's.
fn visit_error(
    e: std::io::Error,
    path: &str,
    layer_bad: impl Fn(std::io::Error) -> BuildError,
) -> BuildError {
    use std::io::ErrorKind::*;
    match e.kind() {
        StorageFull | ReadOnlyFilesystem | PermissionDenied | QuotaExceeded | FileTooLarge => {
            BuildError::Write { path: std::path::PathBuf::from(path), source: e }
        }
        _ => layer_bad(e),
    }
}

/// Reads one 512-byte block; `false` at a clean end of input.
fn read_block(r: &mut impl Read, block: &mut [u8; 512]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < block.len() {
        match r.read(&mut block[got..])? {
            0 if got == 0 => return Ok(false),
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "a header is truncated")),
            n => got += n,
        }
    }
    Ok(true)
}

fn padding(size: u64) -> u64 {
    (512 - size % 512) % 512
}

fn skip(r: &mut impl Read, n: u64) -> std::io::Result<()> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink())?;
    if copied != n {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the data is truncated"));
    }
    Ok(())
}

fn trim_nul(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

/// Parses `LEN key=value\n` records, keeping what applies to the next entry.
fn parse_pax(mut body: &[u8], p: &mut Pending) -> Result<(), &'static str> {
    while !body.is_empty() {
        let space = body.iter().position(|b| *b == b' ').ok_or("has a record without a length")?;
        let len: usize = std::str::from_utf8(&body[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("has a record with a bad length")?;
        if len <= space + 1 || len > body.len() || body[len - 1] != b'\n' {
            return Err("has a record whose length does not fit");
        }
        let record = &body[space + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or("has a record without `=`")?;
        let (key, value) = (&record[..eq], &record[eq + 1..]);
        let number = || -> Result<u64, &'static str> {
            std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).ok_or("has a non-numeric value")
        };
        match key {
            b"path" => p.path = Some(value.to_vec()),
            b"linkpath" => p.link = Some(value.to_vec()),
            b"size" => p.size = Some(number()?),
            b"uid" => p.uid = Some(number()?),
            b"gid" => p.gid = Some(number()?),
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    let name = String::from_utf8_lossy(name);
                    if KEPT_XATTRS.contains(&name.as_ref()) {
                        p.xattrs.insert(name.into_owned(), hex::encode(value));
                    }
                }
                // times, names and other xattrs do not enter listings
            }
        }
        body = &body[len..];
    }
    Ok(())
}

/// A tar path made relative and clean; `None` for the root. Refuses `..`,
/// absolute paths, NUL and non-UTF-8.
pub(crate) fn clean_path(raw: &[u8]) -> Result<Option<String>, &'static str> {
    let s = std::str::from_utf8(raw).map_err(|_| "is not UTF-8")?;
    if s.len() > MAX_PATH_BYTES {
        return Err("is longer than 4096 bytes");
    }
    if s.starts_with('/') {
        return Err("is an absolute path");
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err("leaves the root through `..`"),
            c => parts.push(c),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

/// Counts what is read and, if asked, hashes it.
struct HashingReader<R> {
    inner: R,
    hasher: Option<sha2::Sha256>,
    /// Bytes read so far.
    pos: u64,
}

impl<R> HashingReader<R> {
    fn new(inner: R, hash: bool) -> Self {
        HashingReader { inner, hasher: hash.then(sha2::Sha256::default), pos: 0 }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(bytes: &[u8]) -> Result<Listing, String> {
        scan_layer(bytes, &Digest::of(b"")).map(|(l, _)| l).map_err(|e| e.to_string())
    }

    #[test]
    fn reads_back_what_kiln_writes_including_pax_names_and_large_ids() {
        use crate::tarball::{pad, write_header, write_trailer, TarHeader, TarKind};
        let long = format!("{}/{}", "d".repeat(200), "f".repeat(150));
        let mut out = Vec::new();
        let file = TarKind::File { size: 3 };
        write_header(
            &mut out,
            &TarHeader {
                path: &long,
                kind: &file,
                mode: 0o640,
                uid: 9_000_000,
                gid: 7,
                mtime: 0,
                xattrs: &[],
            },
        )
        .unwrap();
        out.extend_from_slice(b"abc");
        pad(&mut out, 3).unwrap();
        write_trailer(&mut out).unwrap();
        let l = scan(&out).unwrap();
        assert_eq!(l.entries.len(), 1);
        let e = &l.entries[0];
        assert_eq!((e.path.as_str(), e.mode, e.uid, e.gid), (long.as_str(), 0o640, 9_000_000, 7));
        assert_eq!(e.kind, Kind::File { size: 3, sha256: Digest::of(b"abc") });
    }

    #[test]
    fn the_owner_id_minus_one_is_refused() {
        for (uid, gid) in [(u32::MAX as u64, 0), (0, u32::MAX as u64)] {
            let mut h = tar::Header::new_gnu();
            h.set_path("usr/bin/su").unwrap();
            h.set_size(0);
            h.set_mode(0o4755);
            h.set_uid(uid);
            h.set_gid(gid);
            h.set_cksum();
            let mut out = h.as_bytes().to_vec();
            out.extend_from_slice(&[0u8; 1024]);
            let err = scan(&out).unwrap_err();
            assert!(err.contains("owner id 4294967295"), "{err}");
        }
    }

    #[test]
    fn oversized_extension_headers_are_refused_before_reading() {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(64 << 20);
        h.set_cksum();
        let err = scan(h.as_bytes()).unwrap_err(); // the body is not even there
        assert!(err.contains("larger than 1 MiB"), "{err}");
    }

    #[test]
    fn pax_paths_are_checked_too() {
        let body = b"20 path=../etc/evil\n";
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(body.len() as u64);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(body);
        out.resize(1024, 0);
        let mut f = tar::Header::new_ustar();
        f.set_path("harmless").unwrap();
        f.set_size(0);
        f.set_cksum();
        out.extend_from_slice(f.as_bytes());
        out.extend_from_slice(&[0u8; 1024]);
        let err = scan(&out).unwrap_err();
        assert!(err.contains("`../etc/evil` leaves the root"), "{err}");
    }

    #[test]
    fn link_targets_longer_than_a_path_can_be_are_refused() {
        let target = format!("{}/x", "t".repeat(5000));
        let record = format!("linkpath={target}\n");
        let mut n = record.len() + 3;
        while format!("{n} {record}").len() != n {
            n += 1;
        }
        let body = format!("{n} {record}");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(body.len() as u64);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.extend_from_slice(body.as_bytes());
        out.resize(512 + body.len().div_ceil(512) * 512, 0);
        let mut l = tar::Header::new_ustar();
        l.set_path("long").unwrap();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_mode(0o777);
        l.set_uid(0);
        l.set_gid(0);
        l.set_mtime(0);
        l.set_size(0);
        l.set_cksum();
        out.extend_from_slice(l.as_bytes());
        out.extend_from_slice(&[0u8; 1024]);
        let err = scan(&out).unwrap_err();
        assert!(err.contains("link target longer than 4096 bytes"), "{err}");
    }

    /// A tar of (path, type, link target) entries, in the order given.
    fn tar_of(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, t, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*t);
            h.set_path(path).unwrap();
            if !link.is_empty() {
                h.set_link_name(link).unwrap();
            }
            h.set_mode(0o755);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(0);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn a_layer_that_goes_through_its_own_symlink_or_retypes_a_path_is_refused() {
        use tar::EntryType::{Directory as D, Link as H, Regular as F, Symlink as S};
        type Layer<'a> = &'a [(&'a str, tar::EntryType, &'a str)];
        let cases: &[(Layer, &str)] = &[
            // The duplicate trick: the listing keeps only the last `d`.
            (&[("d", S, "/etc"), ("d/file", F, ""), ("d", D, "")], "which the same layer makes a symlink"),
            (&[("d", S, "/etc"), ("d/.wh.passwd", F, "")], "which the same layer makes a symlink"),
            (&[("d", S, "/etc"), ("d/.wh..wh..opq", F, "")], "which the same layer makes a symlink"),
            (
                &[("d", D, ""), ("d", S, "/etc")],
                "appears twice in the layer, as a folder and then as a symlink",
            ),
            (&[("f", F, ""), ("f/x", F, "")], "which the same layer makes a file"),
            (&[("a", D, ""), ("a/b", S, "/"), ("a/b/c/d", D, "")], "goes through `a/b`"),
            // Hard links through an in-image symlink, to folders, or to nothing in the layer.
            (&[("l", S, "/etc"), ("h", H, "l/shadow")], "not an earlier entry"),
            (&[("d", D, ""), ("h", H, "d")], "points to the folder `d`"),
            (&[("h", H, "etc/shadow")], "not an earlier entry"),
            // A path and its own whiteout, in either order.
            (&[("d", D, ""), ("d/x", F, ""), ("d/.wh.x", F, "")], "both in the layer"),
            (&[(".wh.x", F, ""), ("x", D, "")], "both in the layer"),
            // A folder the layer fills (or marks opaque) and then makes a symlink,
            // and one it whites out around what it puts inside.
            (
                &[("d/x", F, ""), ("d/.wh..wh..opq", F, ""), ("d", S, "/etc")],
                "appears twice in the layer, as a folder and then as a symlink",
            ),
            (&[("x/y", F, ""), (".wh.x", F, "")], "both in the layer"),
            (&[(".wh.x", F, ""), ("x/y", F, "")], "which the same layer whites out"),
            (&[(".wh.x", F, ""), ("x/y/z", D, "")], "which the same layer whites out"),
        ];
        for (entries, want) in cases {
            let err = scan(&tar_of(entries)).unwrap_err();
            assert!(err.contains(want), "{entries:?}: {err}");
        }
        // What stays allowed: a path given twice as the same type, a link to an earlier file.
        let ok = tar_of(&[("d", D, ""), ("d/f", F, ""), ("d", D, ""), ("d/h", H, "d/f"), ("s", S, "d")]);
        assert_eq!(scan(&ok).unwrap().entries.len(), 4);
    }

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path(b"./a//b/"), Ok(Some("a/b".into())));
        assert_eq!(clean_path(b"./"), Ok(None));
        assert!(clean_path(b"a/../../b").is_err());
        assert!(clean_path(b"/etc/passwd").is_err());
    }
}
