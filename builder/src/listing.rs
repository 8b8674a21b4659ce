//! A layer's file list: every entry's path, type and metadata, with a sha256
//! of each regular file's content. Kept in the store by diff_id, so later
//! steps can look up their parents' metadata and `kiln diff` compares images
//! without unpacking them.

use std::collections::BTreeMap;
use std::io::Read;

use serde::{Deserialize, Serialize};

use kiln_cache::{Digest, Store};

use crate::error::BuildError;
use crate::tarball::TarKind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum Kind {
    File { size: u64, sha256: Digest },
    Dir,
    Symlink { target: String },
    Hardlink { target: String },
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

impl Kind {
    pub fn from_tar(k: &TarKind, sha256: Option<Digest>) -> Kind {
        match k {
            TarKind::File { size } => {
                Kind::File { size: *size, sha256: sha256.expect("files carry a digest") }
            }
            TarKind::Dir => Kind::Dir,
            TarKind::Symlink(t) => Kind::Symlink { target: t.clone() },
            TarKind::Hardlink(t) => Kind::Hardlink { target: t.clone() },
            TarKind::CharDev(a, b) => Kind::Char { major: *a, minor: *b },
            TarKind::BlockDev(a, b) => Kind::Block { major: *a, minor: *b },
            TarKind::Fifo => Kind::Fifo,
        }
    }
}

/// One entry of a layer (path relative to the root, no leading or trailing `/`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub path: String,
    #[serde(flatten)]
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub entries: Vec<ListEntry>,
}

impl Listing {
    pub fn save(&self, store: &Store, diff_id: &Digest) -> Result<(), BuildError> {
        Ok(store.write_record("listings", &diff_id.hex(), self)?)
    }

    /// The layer's listing, from the store or (if missing) by reading the layer blob.
    pub fn load(store: &Store, diff_id: &Digest, blob: &Digest) -> Result<Listing, BuildError> {
        if let Some(l) = store.read_record("listings", &diff_id.hex()) {
            return Ok(l);
        }
        let file = store.open_blob(blob)?;
        let (listing, actual) =
            scan_layer(flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file)), blob)?;
        if actual != *diff_id {
            return Err(BuildError::BadLayer {
                layer: *blob,
                reason: format!("its uncompressed content hashes to {actual}, not its diff_id {diff_id}"),
            });
        }
        listing.save(store, diff_id)?;
        Ok(listing)
    }
}

/// Limits on what a layer from outside may hold.
const MAX_PAX_BYTES: u64 = 1 << 20;
const MAX_PATH_BYTES: usize = 4096;

/// Reads an uncompressed layer tar, checking every entry, and returns its
/// listing and the sha256 of the tar (its diff_id). Refused: paths that are
/// absolute or contain `..`, hard links that point outside the layer's root,
/// oversized extended headers, and unknown entry types.
pub fn scan_layer(r: impl Read, layer: &Digest) -> Result<(Listing, Digest), BuildError> {
    let mut hashing = HashingReader { inner: r, hasher: sha2::Sha256::default() };
    let bad = |reason: String| BuildError::BadLayer { layer: *layer, reason };
    let mut entries: BTreeMap<String, ListEntry> = BTreeMap::new();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        for e in archive.entries().map_err(|e| bad(format!("not a tar archive ({e})")))? {
            let mut e = e.map_err(|e| bad(format!("unreadable tar entry ({e})")))?;
            let h = e.header();
            let et = h.entry_type();
            if (et.is_pax_global_extensions()
                || et.is_pax_local_extensions()
                || et.is_gnu_longname()
                || et.is_gnu_longlink())
                && h.size().unwrap_or(0) > MAX_PAX_BYTES
            {
                return Err(bad("an extended header is larger than 1 MiB".into()));
            }
            let raw = e.path_bytes().into_owned();
            let path = clean_path(&raw)
                .map_err(|why| bad(format!("entry `{}` {why}", String::from_utf8_lossy(&raw))))?;
            let Some(path) = path else { continue }; // the root itself
            let mode = h.mode().map_err(|e| bad(format!("entry `{path}` has a bad mode ({e})")))? & 0o7777;
            let uid = h.uid().map_err(|e| bad(format!("entry `{path}` has a bad uid ({e})")))? as u32;
            let gid = h.gid().map_err(|e| bad(format!("entry `{path}` has a bad gid ({e})")))? as u32;
            let link = || -> Result<String, BuildError> {
                let l = e.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
                String::from_utf8(l)
                    .map_err(|_| bad(format!("entry `{path}` has a link target that is not UTF-8")))
            };
            let kind = if et.is_file() || et.as_byte() == b'7' {
                let size = h.size().map_err(|_| bad(format!("entry `{path}` has a bad size")))?;
                let (sha256, n) = kiln_cache::digest::hash_reader(&mut e)
                    .map_err(|err| bad(format!("entry `{path}` is truncated ({err})")))?;
                if n != size {
                    return Err(bad(format!("entry `{path}` is truncated")));
                }
                Kind::File { size, sha256 }
            } else if et.is_dir() {
                Kind::Dir
            } else if et.is_symlink() {
                Kind::Symlink { target: link()? }
            } else if et.is_hard_link() {
                let t = link()?;
                let clean = clean_path(t.as_bytes())
                    .map_err(|why| bad(format!("hard link `{path}` points to `{t}`, which {why}")))?
                    .ok_or_else(|| bad(format!("hard link `{path}` points to the root")))?;
                Kind::Hardlink { target: clean }
            } else if et.is_character_special() || et.is_block_special() {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                if et.is_character_special() {
                    Kind::Char { major, minor }
                } else {
                    Kind::Block { major, minor }
                }
            } else if et.is_fifo() {
                Kind::Fifo
            } else {
                return Err(bad(format!(
                    "entry `{path}` has the unsupported type `{}`",
                    et.as_byte() as char
                )));
            };
            entries.insert(path.clone(), ListEntry { path, kind, mode, uid, gid });
        }
    }
    // Whatever follows the archive's end marker still counts toward the digest.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(|e| bad(format!("unreadable ({e})")))?;
    let diff_id = Digest::from_hasher(hashing.hasher);
    Ok((Listing { entries: entries.into_values().collect() }, diff_id))
}

/// A tar path made relative and clean; `None` for the root. Refuses `..`,
/// absolute paths, NUL and non-UTF-8.
pub fn clean_path(raw: &[u8]) -> Result<Option<String>, &'static str> {
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

struct HashingReader<R> {
    inner: R,
    hasher: sha2::Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_paths() {
        assert_eq!(clean_path(b"./a//b/"), Ok(Some("a/b".into())));
        assert_eq!(clean_path(b"./"), Ok(None));
        assert!(clean_path(b"a/../../b").is_err());
        assert!(clean_path(b"/etc/passwd").is_err());
    }
}
