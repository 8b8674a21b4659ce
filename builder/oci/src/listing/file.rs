//! A layer's listing on disk: its entries sorted by path in a compact binary
//! form, with a sparse index of every 64th path at the end. Written through
//! an external sort (runs of bounded size merged at the end), read by binary
//! search over the sparse index and by streaming, so neither side holds the
//! whole listing: a layer of a million files costs a few MB of memory, not
//! hundreds.
//!
//! ```text
//! "KLST\x02\n\0\0"                       magic, version 2
//! [u8; 32]                               the layer's diff_id (a listing of
//!                                        another layer is refused)
//! entry*                                 sorted by path, one per path
//! (varint offset, u32 crc, varint len, path)*
//!                                        every BLOCK-th entry: where its block
//!                                        starts, the block's CRC-32, its path
//! u64 count, u64 index offset, u32 CRC-32 of the index and those two,
//! "KLSTEND\0"
//! ```
//! An entry: varint-length path, a type byte and its fields (size and
//! sha256, link target, device numbers), mode, uid, gid (varints), then the
//! kept xattrs as (name, hex value) pairs.

use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use kiln_cache::Digest;

use super::entry::{Kind, ListEntry};
use crate::image::open_regular;

const MAGIC: &[u8; 8] = b"KLST\x02\n\0\0";
const END: &[u8; 8] = b"KLSTEND\0";
/// The magic and the diff_id.
const HEAD: u64 = 40;
/// count, index offset, index CRC, end marker.
const TAIL: u64 = 28;
/// Entries between two sparse index keys.
const BLOCK: u64 = 64;
/// Entries (or bytes of them) an unsorted run holds before it is sorted
/// and spilled to disk.
const RUN_ENTRIES: usize = 1 << 16;
const RUN_BYTES: usize = 16 << 20;
/// The longest path, link target (both 4096 at most, as the layer scan
/// checks), xattr name or hex value a listing holds.
const MAX_STRING: u64 = 1 << 16;
/// The most bytes a block of [`BLOCK`] entries can take.
const MAX_BLOCK: u64 = BLOCK * (3 * MAX_STRING + 64);

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("the listing is corrupt ({what})"))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends the encoding of `e`.
fn encode(out: &mut Vec<u8>, e: &ListEntry) {
    put_str(out, &e.path);
    match &e.kind {
        Kind::File { size, sha256 } => {
            out.push(0);
            put_varint(out, *size);
            out.extend_from_slice(sha256.bytes());
        }
        Kind::Dir => out.push(1),
        Kind::Symlink { target } => {
            out.push(2);
            put_str(out, target);
        }
        Kind::Hardlink { target } => {
            out.push(3);
            put_str(out, target);
        }
        Kind::Char { major, minor } | Kind::Block { major, minor } => {
            out.push(if matches!(e.kind, Kind::Char { .. }) { 4 } else { 5 });
            put_varint(out, u64::from(*major));
            put_varint(out, u64::from(*minor));
        }
        Kind::Fifo => out.push(6),
    }
    put_varint(out, u64::from(e.mode));
    put_varint(out, u64::from(e.uid));
    put_varint(out, u64::from(e.gid));
    put_varint(out, e.xattrs.len() as u64);
    for (k, v) in &e.xattrs {
        put_str(out, k);
        put_str(out, v);
    }
}

/// Reads encoded entries from a byte stream.
struct Decoder<R> {
    r: R,
}

impl<R: BufRead> Decoder<R> {
    fn byte(&mut self) -> io::Result<u8> {
        let mut b = [0u8; 1];
        self.r.read_exact(&mut b).map_err(|_| corrupt("truncated"))?;
        Ok(b[0])
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("a number is too long"))
    }

    fn u32(&mut self) -> io::Result<u32> {
        u32::try_from(self.varint()?).map_err(|_| corrupt("a number is out of range"))
    }

    fn string(&mut self) -> io::Result<String> {
        let n = self.varint()?;
        if n > MAX_STRING {
            return Err(corrupt("a string is too long"));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b).map_err(|_| corrupt("truncated"))?;
        String::from_utf8(b).map_err(|_| corrupt("a string is not UTF-8"))
    }

    /// The next entry; `None` at a clean end of the stream.
    fn entry(&mut self) -> io::Result<Option<ListEntry>> {
        if self.r.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let path = self.string()?;
        let kind = match self.byte()? {
            0 => {
                let size = self.varint()?;
                let mut sha = [0u8; 32];
                self.r.read_exact(&mut sha).map_err(|_| corrupt("truncated"))?;
                Kind::File { size, sha256: Digest::from_bytes(sha) }
            }
            1 => Kind::Dir,
            2 => Kind::Symlink { target: self.string()? },
            3 => Kind::Hardlink { target: self.string()? },
            4 => Kind::Char { major: self.u32()?, minor: self.u32()? },
            5 => Kind::Block { major: self.u32()?, minor: self.u32()? },
            6 => Kind::Fifo,
            _ => return Err(corrupt("an unknown entry type")),
        };
        let (mode, uid, gid) = (self.u32()?, self.u32()?, self.u32()?);
        let mut xattrs = BTreeMap::new();
        for _ in 0..self.varint()?.min(64) {
            let k = self.string()?;
            xattrs.insert(k, self.string()?);
        }
        Ok(Some(ListEntry { path, kind, mode, uid, gid, xattrs }))
    }
}

/// Writes a listing from entries in any order: of a path given twice, the
/// later entry is kept. Memory is bounded by one run ([`RUN_ENTRIES`]).
pub(crate) struct ListingWriter {
    tmp_dir: std::path::PathBuf,
    run: Vec<ListEntry>,
    run_bytes: usize,
    /// Sorted runs spilled to disk, oldest first.
    spilled: Vec<File>,
}

impl ListingWriter {
    /// A writer whose spilled runs go to unnamed files in `tmp_dir`.
    pub(crate) fn new(tmp_dir: &Path) -> ListingWriter {
        ListingWriter { tmp_dir: tmp_dir.to_path_buf(), run: Vec::new(), run_bytes: 0, spilled: Vec::new() }
    }

    pub(crate) fn push(&mut self, e: ListEntry) -> io::Result<()> {
        self.run_bytes += e.path.len() + 96;
        self.run.push(e);
        if self.run.len() >= RUN_ENTRIES || self.run_bytes >= RUN_BYTES {
            let sorted = sort_run(std::mem::take(&mut self.run));
            self.run_bytes = 0;
            let mut f = BufWriter::new(tempfile::tempfile_in(&self.tmp_dir)?);
            let mut buf = Vec::new();
            for e in &sorted {
                buf.clear();
                encode(&mut buf, e);
                f.write_all(&buf)?;
            }
            let mut f = f.into_inner().map_err(|e| e.into_error())?;
            f.seek(SeekFrom::Start(0))?;
            self.spilled.push(f);
        }
        Ok(())
    }

    /// Writes the sorted listing of the layer `diff_id` to `out` (a new
    /// file); returns the entry count.
    pub(crate) fn finish(mut self, out: File, diff_id: &Digest) -> io::Result<u64> {
        let last = sort_run(std::mem::take(&mut self.run));
        let mut w = FileWriter::new(out, diff_id)?;
        if self.spilled.is_empty() {
            for e in &last {
                w.entry(e)?;
            }
            return w.finish();
        }
        // Merge: the smallest path first; of equal paths, the newest run's.
        let mut sources: Vec<Box<dyn Iterator<Item = io::Result<ListEntry>>>> = Vec::new();
        for f in self.spilled {
            let mut d = Decoder { r: BufReader::with_capacity(64 << 10, f) };
            sources.push(Box::new(std::iter::from_fn(move || d.entry().transpose())));
        }
        sources.push(Box::new(last.into_iter().map(Ok)));
        let mut heap = BinaryHeap::new();
        for (i, s) in sources.iter_mut().enumerate() {
            if let Some(e) = s.next().transpose()? {
                heap.push(Head { entry: e, source: i });
            }
        }
        while let Some(Head { mut entry, source }) = heap.pop() {
            if let Some(e) = sources[source].next().transpose()? {
                heap.push(Head { entry: e, source });
            }
            // Later sources with the same path replace it.
            while heap.peek().is_some_and(|h| h.entry.path == entry.path) {
                let h = heap.pop().expect("peeked");
                if let Some(e) = sources[h.source].next().transpose()? {
                    heap.push(Head { entry: e, source: h.source });
                }
                entry = h.entry;
            }
            w.entry(&entry)?;
        }
        w.finish()
    }
}

/// Sorted by path; of a path given twice in the run, the later entry.
fn sort_run(mut run: Vec<ListEntry>) -> Vec<ListEntry> {
    run.sort_by(|a, b| a.path.cmp(&b.path)); // stable
    run.dedup_by(|later, kept| {
        let same = later.path == kept.path;
        if same {
            std::mem::swap(later, kept);
        }
        same
    });
    run
}

/// A merge head: ordered so that the max-heap pops the smallest path, and
/// of equal paths the oldest source first (the newest is popped last and kept).
struct Head {
    entry: ListEntry,
    source: usize,
}

impl PartialEq for Head {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}
impl Eq for Head {}
impl PartialOrd for Head {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Head {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.entry.path.cmp(&self.entry.path).then_with(|| o.source.cmp(&self.source))
    }
}

/// The checksum of the index and the frame numbers that go with it.
fn index_crc(index: &[u8], count: u64, data_end: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(index);
    h.update(&count.to_le_bytes());
    h.update(&data_end.to_le_bytes());
    h.finalize()
}

/// Writes sorted, distinct entries and the sparse index.
struct FileWriter {
    w: BufWriter<File>,
    pos: u64,
    count: u64,
    /// The block being written, and its first path.
    block: Vec<u8>,
    first: String,
    index: Vec<u8>,
}

impl FileWriter {
    fn new(out: File, diff_id: &Digest) -> io::Result<FileWriter> {
        let mut w = BufWriter::with_capacity(256 << 10, out);
        w.write_all(MAGIC)?;
        w.write_all(diff_id.bytes())?;
        Ok(FileWriter { w, pos: HEAD, count: 0, block: Vec::new(), first: String::new(), index: Vec::new() })
    }

    fn entry(&mut self, e: &ListEntry) -> io::Result<()> {
        if self.count.is_multiple_of(BLOCK) {
            self.end_block()?;
            self.first = e.path.clone();
        }
        encode(&mut self.block, e);
        self.count += 1;
        Ok(())
    }

    fn end_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        put_varint(&mut self.index, self.pos);
        self.index.extend_from_slice(&crc32fast::hash(&self.block).to_le_bytes());
        put_str(&mut self.index, &self.first);
        self.w.write_all(&self.block)?;
        self.pos += self.block.len() as u64;
        self.block.clear();
        Ok(())
    }

    fn finish(mut self) -> io::Result<u64> {
        self.end_block()?;
        self.w.write_all(&self.index)?;
        self.w.write_all(&self.count.to_le_bytes())?;
        self.w.write_all(&self.pos.to_le_bytes())?;
        self.w.write_all(&index_crc(&self.index, self.count, self.pos).to_le_bytes())?;
        self.w.write_all(END)?;
        self.w.flush()?;
        Ok(self.count)
    }
}

/// A listing file opened for lookups and streaming. Holds the sparse index
/// (one path in [`BLOCK`]) and the last blocks it decoded, not a file
/// descriptor: a stack of a thousand layers must not run out of them.
pub struct ListingFile {
    path: std::path::PathBuf,
    count: u64,
    /// Where the entries end (and the index starts).
    data_end: u64,
    /// Each block's first path, where it starts and its CRC-32.
    keys: Vec<(String, u64, u32)>,
    recent: Mutex<Vec<(usize, std::sync::Arc<Vec<ListEntry>>)>>,
}

impl std::fmt::Debug for ListingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListingFile").field("count", &self.count).finish()
    }
}

impl ListingFile {
    /// Opens the listing of the layer `diff_id`, checking its frame, that
    /// it is that layer's, and its sparse index (whose size is bounded by
    /// the entry count before anything is read).
    pub(crate) fn open(path: &Path, diff_id: &Digest) -> io::Result<ListingFile> {
        let file = open_regular(path)?;
        let len = file.metadata()?.len();
        if len < HEAD + TAIL {
            return Err(corrupt("too short"));
        }
        let mut head = [0u8; HEAD as usize];
        file.read_exact_at(&mut head, 0)?;
        let mut tail = [0u8; TAIL as usize];
        file.read_exact_at(&mut tail, len - TAIL)?;
        if &head[..8] != MAGIC || &tail[20..] != END {
            return Err(corrupt("not a listing of this version"));
        }
        if head[8..] != diff_id.bytes()[..] {
            return Err(corrupt("the listing of another layer"));
        }
        let word = |at: usize| u64::from_le_bytes(tail[at..at + 8].try_into().expect("8 bytes"));
        let (count, data_end) = (word(0), word(8));
        let index_crc = u32::from_le_bytes(tail[16..20].try_into().expect("4 bytes"));
        // Each entry takes at least 7 bytes; each index key at most a path and 15.
        let blocks = count.div_ceil(BLOCK);
        if data_end < HEAD || data_end > len - TAIL || count > (data_end - HEAD) / 7 {
            return Err(corrupt("a bad frame"));
        }
        let index_len = len - TAIL - data_end;
        if index_len > blocks * (MAX_STRING + 16) {
            return Err(corrupt("an index larger than its entries need"));
        }
        let mut index = vec![0u8; index_len as usize];
        file.read_exact_at(&mut index, data_end)?;
        if self::index_crc(&index, count, data_end) != index_crc {
            return Err(corrupt("the index does not match its checksum"));
        }
        let mut d = Decoder { r: &index[..] };
        let mut keys = Vec::with_capacity(blocks as usize);
        while !d.r.is_empty() {
            let at = d.varint()?;
            let mut crc = [0u8; 4];
            d.r.read_exact(&mut crc).map_err(|_| corrupt("truncated"))?;
            let path = d.string()?;
            let sorted = keys.last().is_none_or(|(p, o, _): &(String, u64, u32)| *p < path && *o < at);
            if at < HEAD || at >= data_end || !sorted {
                return Err(corrupt("a bad index"));
            }
            keys.push((path, at, u32::from_le_bytes(crc)));
        }
        if keys.len() as u64 != blocks || keys.first().is_some_and(|k| k.1 != HEAD) {
            return Err(corrupt("an index that does not match the count"));
        }
        let sizes = keys.windows(2).map(|w| w[1].1 - w[0].1).chain(keys.last().map(|k| data_end - k.1));
        if sizes.into_iter().any(|n| n > MAX_BLOCK) {
            return Err(corrupt("a block larger than its entries can be"));
        }
        Ok(ListingFile { path: path.to_path_buf(), count, data_end, keys, recent: Mutex::new(Vec::new()) })
    }

    /// Checks every block against its checksum (one sequential read, no
    /// decoding), so that later lookups do not meet damage half-way.
    pub(crate) fn verify(&self) -> io::Result<()> {
        let file = open_regular(&self.path)?;
        let mut buf = Vec::new();
        for (i, (_, start, crc)) in self.keys.iter().enumerate() {
            let end = self.keys.get(i + 1).map(|k| k.1).unwrap_or(self.data_end);
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(&mut buf, *start)?;
            if crc32fast::hash(&buf) != *crc {
                return Err(corrupt("a block does not match its checksum"));
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    /// Reads and checks block `i`.
    fn read_block(&self, i: usize) -> io::Result<Vec<ListEntry>> {
        let (first, start, crc) = &self.keys[i];
        let end = self.keys.get(i + 1).map(|k| k.1).unwrap_or(self.data_end);
        let mut bytes = vec![0u8; (end - start) as usize];
        open_regular(&self.path)?.read_exact_at(&mut bytes, *start)?;
        if crc32fast::hash(&bytes) != *crc {
            return Err(corrupt("a block does not match its checksum"));
        }
        let mut d = Decoder { r: &bytes[..] };
        let mut entries = Vec::with_capacity(BLOCK as usize);
        while let Some(e) = d.entry()? {
            if entries.last().is_some_and(|l: &ListEntry| l.path >= e.path) {
                return Err(corrupt("entries out of order"));
            }
            entries.push(e);
        }
        let want = if i + 1 < self.keys.len() { BLOCK } else { self.count - BLOCK * i as u64 };
        if entries.len() as u64 != want || entries.first().map(|e| &e.path) != Some(first) {
            return Err(corrupt("a block that does not match the index"));
        }
        Ok(entries)
    }

    fn block(&self, i: usize) -> io::Result<std::sync::Arc<Vec<ListEntry>>> {
        let mut recent = self.recent.lock().expect("listing cache");
        if let Some((_, b)) = recent.iter().find(|(at, _)| *at == i) {
            return Ok(b.clone());
        }
        let b = std::sync::Arc::new(self.read_block(i)?);
        if recent.len() >= 4 {
            recent.remove(0);
        }
        recent.push((i, b.clone()));
        Ok(b)
    }

    /// The entry at `path`, if the layer holds it.
    pub(crate) fn get(&self, path: &str) -> io::Result<Option<ListEntry>> {
        let i = self.keys.partition_point(|(k, ..)| k.as_str() <= path);
        if i == 0 {
            return Ok(None);
        }
        let b = self.block(i - 1)?;
        Ok(b.binary_search_by(|e| e.path.as_str().cmp(path)).ok().map(|j| b[j].clone()))
    }

    /// Every entry whose path is `from` or sorts after it, in order, read
    /// block by block (each checked).
    pub(crate) fn iter_from(
        &self,
        from: &str,
    ) -> io::Result<impl Iterator<Item = io::Result<ListEntry>> + '_> {
        let mut i = self.keys.partition_point(|(k, ..)| k.as_str() <= from).saturating_sub(1);
        let from = from.to_string();
        let mut block = Vec::<ListEntry>::new().into_iter();
        Ok(std::iter::from_fn(move || loop {
            if let Some(e) = block.next() {
                if e.path.as_str() < from.as_str() {
                    continue;
                }
                return Some(Ok(e));
            }
            if i >= self.keys.len() {
                return None;
            }
            match self.read_block(i) {
                Ok(b) => block = b.into_iter(),
                Err(e) => {
                    i = self.keys.len();
                    return Some(Err(e));
                }
            }
            i += 1;
        }))
    }

    /// Every entry, in path order.
    pub fn iter(&self) -> io::Result<impl Iterator<Item = io::Result<ListEntry>> + '_> {
        self.iter_from("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(path: &str, kind: Kind) -> ListEntry {
        ListEntry { path: path.into(), kind, mode: 0o644, uid: 1, gid: 2, xattrs: Default::default() }
    }

    fn write(entries: Vec<ListEntry>) -> (tempfile::TempDir, ListingFile) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ListingWriter::new(dir.path());
        for x in entries {
            w.push(x).unwrap();
        }
        let path = dir.path().join("listing");
        w.finish(File::create(&path).unwrap(), &Digest::of(b"layer")).unwrap();
        let l = ListingFile::open(&path, &Digest::of(b"layer")).unwrap();
        (dir, l) // the listing is read from its path while the folder lives
    }

    #[test]
    fn round_trips_every_kind_and_keeps_the_last_of_a_path() {
        let mut x = e("f", Kind::File { size: 3, sha256: Digest::of(b"abc") });
        x.xattrs.insert("security.capability".into(), "0102".into());
        let all = vec![
            e("z", Kind::Dir),
            x.clone(),
            e("s", Kind::Symlink { target: "/etc".into() }),
            e("h", Kind::Hardlink { target: "f".into() }),
            e("c", Kind::Char { major: 0, minor: 0 }),
            e("b", Kind::Block { major: 8, minor: 1 }),
            e("p", Kind::Fifo),
            e("z", Kind::Fifo),
        ];
        let (_dir, l) = write(all);
        let got: Vec<ListEntry> = l.iter().unwrap().map(Result::unwrap).collect();
        let paths: Vec<&str> = got.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["b", "c", "f", "h", "p", "s", "z"]);
        assert_eq!(got[2], x);
        assert_eq!(l.get("z").unwrap().unwrap().kind, Kind::Fifo);
        assert_eq!(l.get("a").unwrap(), None);
        assert_eq!(l.get("zz").unwrap(), None);
    }

    #[test]
    fn spilled_runs_merge_sorted_with_the_last_entry_of_each_path() {
        // More than one run, in reverse order, every path given twice.
        let n = RUN_ENTRIES * 2 + 100;
        let mut all = Vec::new();
        for round in 0..2u32 {
            for i in (0..n).rev() {
                let mut x = e(&format!("d/{i:07}"), Kind::Dir);
                x.uid = round;
                all.push(x);
            }
        }
        let (_dir, l) = write(all);
        assert_eq!(l.len(), n as u64);
        let mut count = 0;
        let mut prev = String::new();
        for x in l.iter().unwrap() {
            let x = x.unwrap();
            assert!(x.path > prev);
            assert_eq!(x.uid, 1, "{}", x.path);
            prev = x.path;
            count += 1;
        }
        assert_eq!(count, n);
        assert_eq!(l.get("d/0012345").unwrap().unwrap().uid, 1);
        let from: Vec<String> = l.iter_from("d/0131170").unwrap().map(|x| x.unwrap().path).collect();
        assert_eq!(from.first().map(String::as_str), Some("d/0131170"));
        assert_eq!(from.len(), n - 131170);
    }

    #[test]
    fn a_damaged_listing_is_refused_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = ListingWriter::new(dir.path());
        for i in 0..500 {
            w.push(e(&format!("f{i:04}"), Kind::Dir)).unwrap();
        }
        let path = dir.path().join("l");
        w.finish(File::create(&path).unwrap(), &Digest::of(b"layer")).unwrap();
        let good = std::fs::read(&path).unwrap();
        // Any flipped byte is found: by the frame, the index or a block's checksum.
        for at in (0..good.len()).step_by(7).chain([good.len() - 1]) {
            let mut bad = good.clone();
            bad[at] ^= 0x55;
            std::fs::write(&path, &bad).unwrap();
            let read_all = ListingFile::open(&path, &Digest::of(b"layer")).and_then(|l| {
                l.verify()?;
                l.iter()?.collect::<io::Result<Vec<_>>>()?;
                (0..500).try_for_each(|i| l.get(&format!("f{i:04}")).map(drop))
            });
            assert!(read_all.is_err(), "a flipped byte at {at} went unnoticed");
        }
        // What `verify` alone (the check on load) finds: everything but a flipped entry
        // byte that a block's CRC does not cover... which is none.
        for at in (0..good.len()).step_by(5) {
            let mut bad = good.clone();
            bad[at] ^= 0x01;
            std::fs::write(&path, &bad).unwrap();
            let loaded = ListingFile::open(&path, &Digest::of(b"layer")).and_then(|l| l.verify());
            assert!(loaded.is_err(), "a flipped byte at {at} passes the load check");
        }
        std::fs::write(&path, &good).unwrap();
        let other = ListingFile::open(&path, &Digest::of(b"another layer"));
        assert!(other.unwrap_err().to_string().contains("another layer"));
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(ListingFile::open(&path, &Digest::of(b"layer")).is_err());
        // A frame that claims more than the file could hold is refused before any allocation.
        let mut huge = good.clone();
        let n = huge.len();
        huge[n - 28..n - 20].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        assert!(ListingFile::open(&path, &Digest::of(b"layer")).is_err());
    }
}
