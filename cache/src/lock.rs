//! Advisory file locks (flock): builds share the store, prune and gc own it.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use rustix::fs::{flock, FlockOperation};

/// Held until dropped (the kernel releases a flock when its file closes, so a
/// killed build never leaves a stale lock behind).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

impl StoreLock {
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).truncate(false).read(true).write(true).open(path)
    }

    /// Blocks until a shared lock is held; calls `waiting` first when
    /// someone holds it exclusively.
    pub(crate) fn shared_waiting(path: &Path, waiting: &dyn Fn()) -> io::Result<StoreLock> {
        let file = Self::open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockShared) {
            Ok(()) => return Ok(StoreLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => waiting(),
            Err(e) => return Err(e.into()),
        }
        flock(&file, FlockOperation::LockShared)?;
        Ok(StoreLock { _file: file })
    }

    /// Blocks until a shared lock is held.
    pub(crate) fn shared(path: &Path) -> io::Result<StoreLock> {
        Self::shared_waiting(path, &|| {})
    }

    /// An exclusive lock if no one holds the lock now.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<StoreLock>> {
        let file = Self::open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(StoreLock { _file: file })),
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Blocks until an exclusive lock is held; calls `waiting` first when
    /// the lock is taken (a build is running).
    pub fn exclusive(path: &Path, waiting: &dyn Fn()) -> io::Result<StoreLock> {
        let file = Self::open(path)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(StoreLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => waiting(),
            Err(e) => return Err(e.into()),
        }
        flock(&file, FlockOperation::LockExclusive)?;
        Ok(StoreLock { _file: file })
    }
}
