//! Writing a layer: entries sorted by path bytes (parents first), each header
//! normalized (design §3), file content streamed and checked against the
//! digest its cache key was computed from, then tar → sha256 (diff_id) →
//! parallel gzip → sha256 (digest) → temp file → rename. Memory stays flat
//! whatever the layer's size.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

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
    /// slice is the whole file, which must not have grown. With `sha256`,
    /// the digest kiln took of the bytes as it wrote them (a .deb's files):
    /// they are not hashed again, and go through the file pool.
    Slice {
        path: PathBuf,
        offset: u64,
        whole: bool,
        sha256: Option<Digest>,
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

/// Writes `entries` as a layer into the store, with every timestamp
/// `epoch`, and stores its listing. ([`write_layer_staged`] also makes the
/// layer as a folder, for a `run` step that needs it next.)
pub fn write_layer(
    store: &Store,
    mut entries: Vec<LayerEntry>,
    epoch: u64,
) -> Result<(LayerBlob, ListingFile), BuildError> {
    sort_entries(&mut entries)?;
    let tmp_dir = store.tmp_dir();
    let blob = BlobWriter::new(store)?;
    let mut failure: Option<BuildError> = None;
    let result = gzip::compress(blob, threads(), |w| {
        let mut tar = HashingWriter::new(BufWriter::with_capacity(256 * 1024, w));
        match write_entries(&mut tar, &entries, epoch, None) {
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
        (_, Some(e)) => return Err(name_write_target(e, &tmp_dir, None)),
        (Err(e), None) => return Err(BuildError::Write { path: tmp_dir, source: e }),
        (Ok(v), None) => v,
    };
    let (digest, size) = blob.commit()?;
    let listing = listing.save(store, &diff_id)?;
    Ok((LayerBlob { diff_id, digest, size }, listing))
}

/// Whether `entries` make the tar `known` was made from (a step made again
/// under `--no-cache` usually gives the tar it gave before): the tar is
/// only hashed, nothing is written; when it is the same (its diff_id), its
/// listing is stored and returned, and `known` is the layer. The gzip
/// bytes are a function of the tar's (one backend, one level, fixed
/// chunks), so `known`, a blob the store holds intact, is the blob the
/// compression would give.
pub fn same_layer(
    store: &Store,
    entries: &mut [LayerEntry],
    epoch: u64,
    known: &LayerBlob,
) -> Result<Option<ListingFile>, BuildError> {
    sort_entries(entries)?;
    let mut tar = HashingWriter::new(io::sink());
    let listing = write_entries(&mut tar, entries, epoch, None)
        .map_err(|e| name_write_target(e, &store.tmp_dir(), None))?;
    let (_, diff_id, _) = tar.finish();
    if diff_id != known.diff_id {
        tracing::debug!(was = %known.diff_id, now = %diff_id, "the step gave another tar than before");
        return Ok(None);
    }
    Ok(Some(listing.save(store, &diff_id)?))
}

/// A layer whose tar is written (to a file in the store's tmp folder) and
/// made as a folder, its gzip blob still being made on a thread of its own:
/// the folder is in use while [`StagedLayer::finish`] waits for the blob.
/// The blob's bytes are the ones [`write_layer`] gives for the
/// same entries.
#[derive(Debug)]
pub struct StagedLayer {
    pub diff_id: Digest,
    /// Taken by [`StagedLayer::finish`]; a layer dropped unfinished (its
    /// build failed) still waits for it, so no thread writes into the
    /// store after the build let go of it.
    compressor: Option<Compressor>,
    /// The blob, when it was known without compressing (see [`same_layer`]).
    known: Option<LayerBlob>,
}

/// The thread compressing a staged layer, and the gate that holds one of
/// its threads back while the build goes on (see [`gzip::Gate`]).
#[derive(Debug)]
struct Compressor {
    thread: std::thread::JoinHandle<Result<(Digest, u64), BuildError>>,
    gate: Arc<gzip::Gate>,
}

impl StagedLayer {
    /// Whether the blob is made (finishing does not wait).
    pub fn is_finished(&self) -> bool {
        self.compressor.as_ref().is_none_or(|c| c.thread.is_finished())
    }

    /// Waits for the blob.
    pub fn finish(mut self) -> Result<LayerBlob, BuildError> {
        if let Some(known) = self.known {
            return Ok(known);
        }
        let (digest, size) = join(self.compressor.take().expect("finished once"))?;
        Ok(LayerBlob { diff_id: self.diff_id, digest, size })
    }
}

impl Drop for StagedLayer {
    fn drop(&mut self) {
        if let Some(c) = self.compressor.take() {
            let _ = join(c);
        }
    }
}

/// Waits for the compression, on every core: the caller waits for it.
fn join(c: Compressor) -> Result<(Digest, u64), BuildError> {
    c.gate.set(threads());
    c.thread.join().unwrap_or_else(|_| {
        Err(BuildError::Environment {
            message: "The thread compressing a layer stopped without finishing it".into(),
            hint: "this is a bug in kiln; build again, and report it if it repeats".into(),
        })
    })
}

/// Writes `entries` as a tar into the store's tmp folder and makes them as
/// the folder `unpack` (which must not exist), storing the listing. The
/// gzip blob is made from the tar file as it grows, by threads at a low
/// priority: they take the cores the writing leaves idle, then run on
/// while the caller goes on. With `known` (as for [`same_layer`]),
/// nothing is compressed until the tar is written, and nothing at all
/// when it is the tar `known` was made from.
pub fn write_layer_staged(
    store: &Store,
    mut entries: Vec<LayerEntry>,
    epoch: u64,
    unpack: &std::path::Path,
    known: Option<LayerBlob>,
) -> Result<(StagedLayer, ListingFile), BuildError> {
    sort_entries(&mut entries)?;
    let tmp_dir = store.tmp_dir();
    let (file, tar_path) = tempfile::Builder::new()
        .prefix("layer-")
        .suffix(".tar")
        .tempfile_in(&tmp_dir)
        .map_err(BuildError::io_write(&tmp_dir))?
        .into_parts();
    let reader = File::open(&tar_path).map_err(BuildError::io_write(&*tar_path))?;
    let progress = Arc::new(Progress::default());
    let mut waiting = Some((reader, tar_path));
    let mut compressor = match known {
        Some(_) => None,
        None => {
            let (reader, tar_path) = waiting.take().expect("set above");
            Some(spawn_compressor(store, reader, tar_path, &progress)?)
        }
    };
    let stop = |c: Option<Compressor>| {
        if let Some(c) = c {
            let _ = join(c);
        }
    };
    let mut abandon = Abandon(Some(&progress));
    let mut tar =
        HashingWriter::new(BufWriter::with_capacity(1 << 20, Announcing { file, progress: &progress }));
    let written = write_entries(&mut tar, &entries, epoch, Some((unpack, crate::unpack::pool_dir(store))))
        .and_then(|listing| {
            let (buf, diff_id, _) = tar.finish();
            buf.into_inner().map_err(|e| BuildError::Write {
                path: PathBuf::from("<layer>"),
                source: io::Error::new(e.error().kind(), e.error().to_string()),
            })?;
            Ok((listing, diff_id))
        });
    let (listing, diff_id) = match written {
        Ok(v) => v,
        Err(e) => {
            drop(abandon);
            stop(compressor);
            return Err(name_write_target(e, &tmp_dir, Some(unpack)));
        }
    };
    abandon.0.take().expect("set above").end(true);
    let known = known.filter(|k| k.diff_id == diff_id);
    if let (None, Some((reader, tar_path))) = (known, waiting) {
        // Another tar than the known blob's (or none was known): compressed now.
        compressor = Some(spawn_compressor(store, reader, tar_path, &progress)?);
    }
    let listing = match listing.save(store, &diff_id) {
        Ok(l) => l,
        Err(e) => {
            stop(compressor);
            return Err(e);
        }
    };
    Ok((StagedLayer { diff_id, compressor, known }, listing))
}

/// Starts the thread that gzips the tar file `reader` as it grows, into a
/// blob; the file is removed when it is done.
fn spawn_compressor(
    store: &Store,
    reader: File,
    tar_path: tempfile::TempPath,
    progress: &Arc<Progress>,
) -> Result<Compressor, BuildError> {
    let (store, progress) = (store.clone(), Arc::clone(progress));
    // All cores but one, until someone waits for the blob.
    let gate = gzip::Gate::new(threads() - 1);
    let held = Arc::clone(&gate);
    let thread = std::thread::Builder::new()
        .name("layer-gzip".into())
        .spawn(move || {
            // Lower this thread (and the compressor threads it starts,
            // which inherit it): the step that needs the folder comes first.
            let _ = rustix::process::setpriority_process(None, 10);
            let (blob, ()) = gzip::compress_gated(BlobWriter::new(&store)?, threads(), Some(&held), |w| {
                follow(reader, &progress, w)
            })
            .map_err(BuildError::io_write(&*tar_path))?;
            drop(tar_path);
            Ok(blob.commit()?)
        })
        .map_err(|e| BuildError::Environment {
            message: format!("Cannot start a thread to compress a layer: {e}"),
            hint: "the machine is out of threads or memory".into(),
        })?;
    Ok(Compressor { thread, gate })
}

/// How much of a tar file is written, and whether its writer is done
/// (`Some(true)`) or gave up (`Some(false)`).
#[derive(Default)]
struct Progress {
    state: std::sync::Mutex<(u64, Option<bool>)>,
    moved: std::sync::Condvar,
}

impl Progress {
    fn end(&self, done: bool) {
        self.state.lock().expect("progress lock").1 = Some(done);
        self.moved.notify_all();
    }
}

/// Ends the writing as given up unless it was ended before.
struct Abandon<'a>(Option<&'a Progress>);

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            p.end(false);
        }
    }
}

/// A file whose writes are announced to the thread following it.
struct Announcing<'a> {
    file: File,
    progress: &'a Progress,
}

impl Write for Announcing<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.progress.state.lock().expect("progress lock").0 += n as u64;
        self.progress.moved.notify_all();
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Copies the file `r` to `w` as its writer writes it, to its end.
fn follow(mut r: File, progress: &Progress, w: &mut dyn Write) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let (written, end) = {
            let mut st = progress.state.lock().expect("progress lock");
            while st.0 == pos && st.1.is_none() {
                st = progress.moved.wait(st).expect("progress lock");
            }
            *st
        };
        if written > pos {
            let n = (written - pos).min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            w.write_all(&buf[..n])?;
            pos += n as u64;
        } else if end == Some(true) {
            return Ok(());
        } else {
            return Err(io::Error::other("the layer's tar was not finished"));
        }
    }
}

fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Sorts entries by path bytes (parents first); a path twice is refused.
fn sort_entries(entries: &mut [LayerEntry]) -> Result<(), BuildError> {
    entries.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    match entries.windows(2).find(|w| w[0].path == w[1].path) {
        Some(w) => Err(BuildError::usage(format!("The layer would hold `/{}` twice", w[0].path), None)),
        None => Ok(()),
    }
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
                    Content::Slice { sha256, .. } => *sha256,
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
                Content::Slice { path, offset, whole, sha256 } => {
                    copy_slice(path, (*offset, size, *whole, *sha256), w, &mut buf, tee.as_mut())?
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
    (offset, size, whole, known): (u64, u64, bool, Option<Digest>),
    w: &mut impl Write,
    buf: &mut [u8],
    tee: Option<&mut File>,
) -> Result<Digest, BuildError> {
    use std::io::{Seek, SeekFrom};
    let mut f = File::open(path).map_err(BuildError::io_read(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(BuildError::io_read(path))?;
    match known {
        Some(sha) if !whole => copy_unhashed(&f, path, size, w, buf, tee).map(|()| sha),
        _ => copy_n(f, path, size, w, buf, whole, tee),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder, a 3 MiB file (three gzip chunks), a small file and a
    /// symlink; the files as slices of one scratch file, as a .deb's are.
    fn entries(scratch: &std::path::Path, known: bool) -> Vec<LayerEntry> {
        let big: Vec<u8> = (0..3 * 1024 * 1024 + 77u32).map(|i| (i % 251) as u8).collect();
        let small = b"hello\n".to_vec();
        let mut data = big.clone();
        data.extend_from_slice(&small);
        std::fs::write(scratch, &data).unwrap();
        let slice = |offset: u64, bytes: &[u8]| Content::Slice {
            path: scratch.to_path_buf(),
            offset,
            whole: false,
            sha256: known.then(|| Digest::of(bytes)),
        };
        let entry = |path: &str, kind: TarKind, content: Content| LayerEntry {
            path: path.into(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            content,
            xattrs: Vec::new(),
        };
        vec![
            entry("usr/bin/big", TarKind::File { size: big.len() as u64 }, slice(0, &big)),
            entry("usr", TarKind::Dir, Content::None),
            entry("usr/bin", TarKind::Dir, Content::None),
            entry(
                "usr/bin/small",
                TarKind::File { size: small.len() as u64 },
                slice(big.len() as u64, &small),
            ),
            entry("usr/bin/link", TarKind::Symlink("small".into()), Content::None),
        ]
    }

    /// The folder's files are owned by root: these tests need it (CI has it).
    fn as_root() -> bool {
        let root = rustix::process::geteuid().is_root();
        if !root {
            eprintln!("SKIPPED: the folder's files are owned by root");
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        }
        root
    }

    /// A folder, a store in it, and where the entries' data goes.
    fn setup() -> (tempfile::TempDir, Store, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache")).unwrap();
        let scratch = dir.path().join("data");
        (dir, store, scratch)
    }

    fn leftovers(store: &Store) -> Vec<String> {
        std::fs::read_dir(store.tmp_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("layer-"))
            .collect()
    }

    #[test]
    fn a_staged_layer_is_the_layer_written_at_once_and_its_folder() {
        if !as_root() {
            return;
        }
        let (dir, store, scratch) = setup();
        let (blob, listing) = write_layer(&store, entries(&scratch, false), 7).unwrap();
        // Twice: the second time every file is already in the pool.
        for (n, known) in [(0, true), (1, true), (2, false)] {
            let folder = dir.path().join(format!("root{n}"));
            let (staged, staged_listing) =
                write_layer_staged(&store, entries(&scratch, known), 7, &folder, None).unwrap();
            assert_eq!(staged.diff_id, blob.diff_id);
            assert_eq!(staged.finish().unwrap(), blob, "the same blob, byte for byte");
            let rows = |l: &ListingFile| l.iter().unwrap().map(|e| e.unwrap()).collect::<Vec<_>>();
            assert_eq!(rows(&staged_listing), rows(&listing));
            let made = std::fs::read(folder.join("usr/bin/big")).unwrap();
            assert_eq!(made.len(), 3 * 1024 * 1024 + 77);
            assert_eq!(std::fs::read(folder.join("usr/bin/small")).unwrap(), b"hello\n");
            assert_eq!(std::fs::read_link(folder.join("usr/bin/link")).unwrap(), PathBuf::from("small"));
            // A digest known beforehand sends the file through the pool.
            let nlink = std::os::unix::fs::MetadataExt::nlink(
                &std::fs::metadata(folder.join("usr/bin/small")).unwrap(),
            );
            assert_eq!(nlink > 1, known, "pass {n}");
            assert!(leftovers(&store).is_empty(), "the staged tar is removed: {:?}", leftovers(&store));
        }
        let out = std::fs::read(store.blob_path(&blob.digest)).unwrap();
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&out[..]).read_to_end(&mut tar).unwrap();
        assert_eq!(Digest::of(&tar), blob.diff_id);
    }

    /// Files put in the pool beforehand (as a .deb's are while it is
    /// decoded): the layer's folder links them (the names agree) and the
    /// tar is unchanged; a pool file of other metadata is not taken.
    #[test]
    fn files_put_in_the_pool_beforehand_are_linked_with_their_metadata() {
        if !as_root() {
            return;
        }
        let (dir, store, scratch) = setup();
        let (blob, _) = write_layer(&store, entries(&scratch, false), 7).unwrap();
        let pool = crate::unpack::pool_dir(&store);
        std::fs::create_dir_all(&pool).unwrap();
        let sha = Digest::of(b"hello\n");
        assert!(crate::unpack::put_in_pool(&pool, &sha, b"hello\n", 0o100755, 0, 0, 7).is_some());
        // The same content under another mode and another time: other files.
        assert!(crate::unpack::put_in_pool(&pool, &sha, b"hello\n", 0o100644, 0, 0, 7).is_some());
        assert!(crate::unpack::put_in_pool(&pool, &sha, b"hello\n", 0o100755, 0, 0, 8).is_some());
        let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let pooled: Vec<PathBuf> = std::fs::read_dir(&pool).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(pooled.len(), 3, "{pooled:?}");
        let theirs =
            pooled.iter().find(|p| p.to_string_lossy().ends_with(&format!("{}-755-0-0-7", sha.hex())));
        let theirs = theirs.expect("named as the layer writer names it");
        let md = std::fs::metadata(theirs).unwrap();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o7777, 0o755);
        assert_eq!(std::os::unix::fs::MetadataExt::mtime(&md), 7);
        // Put again: the file the pool has is kept, not replaced.
        assert!(crate::unpack::put_in_pool(&pool, &sha, b"other\n", 0o100755, 0, 0, 7).is_none());
        assert_eq!(std::fs::read(theirs).unwrap(), b"hello\n");
        let before = ino(theirs);
        let folder = dir.path().join("root");
        let (staged, _) = write_layer_staged(&store, entries(&scratch, true), 7, &folder, None).unwrap();
        assert_eq!(staged.finish().unwrap(), blob, "the same blob");
        assert_eq!(ino(&folder.join("usr/bin/small")), before, "linked from the pool, not written");
        // Nothing half-made is left in the pool.
        assert!(std::fs::read_dir(&pool).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".tmp-")));
    }

    #[test]
    fn a_known_blob_of_the_same_tar_is_taken_without_compressing_and_another_tar_is_not() {
        if !as_root() {
            return;
        }
        let (dir, store, scratch) = setup();
        let (blob, _) = write_layer(&store, entries(&scratch, false), 7).unwrap();
        let blobs = || std::fs::read_dir(store.root().join("blobs/sha256")).unwrap().count();
        let before = blobs();
        // A stand-in digest: had anything been compressed, the real one would come back.
        let stand_in = LayerBlob { diff_id: blob.diff_id, digest: Digest::of(b"stand-in"), size: 1 };
        let listing = same_layer(&store, &mut entries(&scratch, false), 7, &stand_in).unwrap();
        assert!(listing.unwrap().iter().unwrap().count() > 0);
        let folder = dir.path().join("root-known");
        let (staged, _) =
            write_layer_staged(&store, entries(&scratch, false), 7, &folder, Some(stand_in)).unwrap();
        assert_eq!(staged.finish().unwrap(), stand_in);
        assert_eq!(std::fs::read(folder.join("usr/bin/small")).unwrap(), b"hello\n");
        assert_eq!(blobs(), before, "nothing was compressed");
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        // Another tar (another epoch): the known blob is not taken.
        let other = LayerBlob { diff_id: Digest::of(b"another tar"), ..stand_in };
        assert!(same_layer(&store, &mut entries(&scratch, false), 8, &other).unwrap().is_none());
        let (fresh, _) = write_layer(&store, entries(&scratch, false), 8).unwrap();
        let (staged, _) = write_layer_staged(
            &store,
            entries(&scratch, false),
            8,
            &dir.path().join("root-other"),
            Some(other),
        )
        .unwrap();
        assert_eq!(staged.finish().unwrap(), fresh);
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
    }

    #[test]
    fn a_staged_layer_that_fails_midway_stops_its_compressor_and_leaves_nothing() {
        if !as_root() {
            return;
        }
        let (dir, store, scratch) = setup();
        let mut e = entries(&scratch, false);
        // A context file that no longer has the digest its key was taken from.
        let changed = dir.path().join("changed");
        std::fs::write(&changed, b"new bytes").unwrap();
        e.push(LayerEntry {
            path: "zz".into(),
            kind: TarKind::File { size: 9 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            content: Content::Path { path: changed.clone(), sha256: Digest::of(b"old bytes"), stamp: None },
            xattrs: Vec::new(),
        });
        let blobs_before =
            std::fs::read_dir(store.root().join("blobs/sha256")).map(|d| d.count()).unwrap_or(0);
        let err = write_layer_staged(&store, e, 0, &dir.path().join("root"), None).unwrap_err();
        assert!(matches!(err, BuildError::Changed { ref path } if *path == changed), "{err:?}");
        assert!(leftovers(&store).is_empty(), "{:?}", leftovers(&store));
        let blobs_after =
            std::fs::read_dir(store.root().join("blobs/sha256")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(blobs_before, blobs_after, "no blob is committed for a layer that failed");
    }
}
