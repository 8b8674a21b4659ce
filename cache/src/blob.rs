//! Writing blobs (hashed as they stream to a temp file, renamed into place
//! once complete) and checking them before use.

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::digest::{Digest, HashingWriter};
use crate::store::{Store, StoreError};

/// A blob being written. Dropping it without [`BlobWriter::commit`] leaves
/// nothing behind; a crash leaves only a file in `tmp/` that gc removes.
pub struct BlobWriter<'s> {
    store: &'s Store,
    out: HashingWriter<BufWriter<tempfile::NamedTempFile>>,
}

impl<'s> BlobWriter<'s> {
    pub fn new(store: &'s Store) -> Result<BlobWriter<'s>, StoreError> {
        let dir = store.tmp_dir();
        let tmp = tempfile::Builder::new().prefix("blob-").tempfile_in(&dir).map_err(StoreError::io(&dir))?;
        Ok(BlobWriter { store, out: HashingWriter::new(BufWriter::with_capacity(1 << 20, tmp)) })
    }

    /// Moves the blob into place under the digest of what was written.
    pub fn commit(self) -> Result<(Digest, u64), StoreError> {
        let (buf, digest, size) = self.out.finish();
        let tmp = buf.into_inner().map_err(|e| {
            let source = io::Error::new(e.error().kind(), e.error().to_string());
            let path = e.into_inner().into_inner().map(|t| t.path().to_path_buf()).unwrap_or_default();
            StoreError::Io { path, source }
        })?;
        let store = self.store;
        let dest = store.blob_path(&digest);
        if dest.is_file() && store.verify_blob(&digest)? {
            return Ok((digest, size)); // someone else wrote the same bytes first
        }
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o444))
            .map_err(StoreError::io(tmp.path()))?;
        tmp.persist(&dest).map_err(|e| StoreError::Io { path: dest.clone(), source: e.error })?;
        store.stamp_verified(&digest)?;
        Ok((digest, size))
    }

    /// Like [`BlobWriter::commit`], but refuses bytes that do not hash to `expected`.
    pub fn commit_expecting(self, expected: &Digest) -> Result<u64, StoreError> {
        let actual = Digest::from_hasher(self.out.hasher_clone());
        if actual != *expected {
            return Err(StoreError::DigestMismatch { expected: *expected, actual });
        }
        Ok(self.commit()?.1)
    }
}

impl Write for BlobWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// What a blob's file looked like when its content last hashed right.
fn stamp_of(meta: &fs::Metadata) -> String {
    format!(
        "{} {} {}.{} {}.{}",
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec()
    )
}

impl Store {
    /// Records that the blob's current file hashes right.
    pub(crate) fn stamp_verified(&self, d: &Digest) -> Result<(), StoreError> {
        let p = self.blob_path(d);
        let meta = fs::metadata(&p).map_err(StoreError::io(&p))?;
        self.write_atomic(
            &self.record_path(crate::RecordKind::Verified, &d.hex()),
            stamp_of(&meta).as_bytes(),
        )
    }

    /// Checks a blob before it is used or shipped. Cheap when the file is
    /// unchanged since it was last hashed (same inode, size, mtime and ctime:
    /// any write to the file changes its ctime); otherwise it is hashed again.
    /// A corrupt blob is removed and `false` returned, so the caller rebuilds it.
    pub fn verify_blob(&self, d: &Digest) -> Result<bool, StoreError> {
        let p = self.blob_path(d);
        let meta = match fs::metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(StoreError::Io { path: p, source: e }),
        };
        let stamp =
            fs::read_to_string(self.record_path(crate::RecordKind::Verified, &d.hex())).unwrap_or_default();
        if stamp == stamp_of(&meta) {
            return Ok(true);
        }
        let file = fs::File::open(&p).map_err(StoreError::io(&p))?;
        let (actual, _) = crate::digest::hash_reader(io::BufReader::with_capacity(1 << 20, file))
            .map_err(StoreError::io(&p))?;
        if actual != *d {
            self.discard_blob(d);
            return Ok(false);
        }
        self.stamp_verified(d)?;
        Ok(true)
    }

    /// Opens a blob for reading after checking it; a corrupt blob is an error.
    pub fn open_blob(&self, d: &Digest) -> Result<fs::File, StoreError> {
        if !self.verify_blob(d)? {
            return Err(StoreError::Missing(*d));
        }
        let p = self.blob_path(d);
        fs::File::open(&p).map_err(StoreError::io(&p))
    }

    /// Moves a finished file (made in [`Store::tmp_dir`]) into the store as
    /// a blob, hashing it first. The file is renamed, not copied, so a sparse
    /// file (a filesystem image) stays sparse.
    pub fn adopt_file(&self, tmp: &std::path::Path) -> Result<(Digest, u64), StoreError> {
        let file = fs::File::open(tmp).map_err(StoreError::io(tmp))?;
        let (digest, size) = crate::digest::hash_reader(io::BufReader::with_capacity(1 << 20, file))
            .map_err(StoreError::io(tmp))?;
        let dest = self.blob_path(&digest);
        if dest.is_file() && self.verify_blob(&digest)? {
            let _ = fs::remove_file(tmp);
            return Ok((digest, size));
        }
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444)).map_err(StoreError::io(tmp))?;
        fs::rename(tmp, &dest).map_err(StoreError::io(&dest))?;
        self.stamp_verified(&digest)?;
        Ok((digest, size))
    }

    /// Copies `r` into the store, checking it hashes to `expected`. When the
    /// store already holds that blob intact, `r` is not read at all.
    pub fn put_blob_from(&self, mut r: impl Read, expected: &Digest) -> Result<u64, StoreError> {
        if self.verify_blob(expected)? {
            let p = self.blob_path(expected);
            return Ok(fs::metadata(&p).map_err(StoreError::io(&p))?.len());
        }
        let mut w = BlobWriter::new(self)?;
        io::copy(&mut r, &mut w).map_err(StoreError::io(self.tmp_dir()))?;
        w.commit_expecting(expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_checked_and_a_flipped_byte_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = store.put_blob(b"layer bytes").unwrap();
        assert!(store.verify_blob(&d).unwrap());
        assert_eq!(store.read_blob(&d).unwrap(), b"layer bytes");

        let p = store.blob_path(&d);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        bytes[0] ^= 1;
        fs::write(&p, bytes).unwrap();
        assert!(!store.verify_blob(&d).unwrap(), "corruption must be detected");
        assert!(!p.exists(), "a corrupt blob is removed");
    }

    #[test]
    fn commit_expecting_refuses_wrong_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = store.put_blob_from(&b"abc"[..], &Digest::of(b"abd")).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }));
        assert_eq!(fs::read_dir(store.blobs_dir()).unwrap().count(), 0);
        assert_eq!(fs::read_dir(store.tmp_dir()).unwrap().count(), 0, "no temp file left");
    }
}
