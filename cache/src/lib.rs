//! kiln's content-addressed store: every blob (layer, config, manifest) kept
//! by its sha256, step records that map a cache key to a layer, the context
//! stat index, and the locks that make concurrent builds on one store safe.
//!
//! Layout under the cache dir (`v1/` is the schema version):
//!
//! ```text
//! v1/blobs/sha256/HEX     blobs, read-only, visible only once complete and checked
//! v1/steps/HEX.json       step key -> layer (diff_id, digest, size, media type)
//! v1/images/HEX.json      a built image (manifest digest) -> the blobs it needs
//! v1/bases/HEX.json       a base that passed the import checks (by manifest digest, or by an
//!                         archive's path and stat) -> its manifest and blobs
//! v1/listings/HEX.list    a layer's file list (by diff_id), sorted and indexed, for diffs and parent lookups
//! v1/index/HEX.json       stat index of one context folder (path, size, mtime, inode -> sha256)
//! v1/verified/HEX         when a blob was last hashed (inode, size, mtime, ctime)
//! v1/debs/HEX.json        a Debian package file kept for `[packages]`
//! v1/disks/HEX.json       a partition image kept for `-o vm:`
//! v1/seals/NAME.json      what an unpacked layer folder held when it was made
//! v1/unpacked/DIFFID/     layers unpacked for the local backend (derived; prune removes them first)
//! v1/files/SHA256-MODE-UID-GID-MTIME   the pool of unpacked files those folders hard-link to
//! v1/unpacked-userns-UID-SUBUID-COUNT/, v1/files-userns-UID-SUBUID-COUNT/
//!                         the same for one rootless id mapping (files of subordinate ids)
//! v1/mounts/HEX/          a `run` step's cache mount (by the sha256 of its id): `id`, `lock`, `data/`
//! v1/tmp/                 writes in progress, renamed into place when complete
//! v1/store.lock           shared by builds, exclusive for prune and gc
//! ```
//!
//! Each record kind is a [`RecordKind`]; [`Store`] names every folder, and
//! no other crate spells one.
//!
//! Modules: [`digest`] (the `sha256:` digest type and hashing writers),
//! [`store`] (opening, records, atomic writes), [`blob`] (writing and checking
//! blobs), [`index`] (the stat index), [`lock`] (file locks), [`mounts`] (cache mounts), [`prune`] (size
//! accounting, LRU eviction and garbage collection). The store speaks no
//! network: registries are `kiln-remote`'s, which streams their blobs in and
//! out through [`BlobWriter`] and [`Store`].

pub mod blob;
pub mod digest;
pub mod index;
pub mod lock;
pub mod mounts;
pub mod prune;
pub mod store;

pub use blob::BlobWriter;
pub use digest::{Digest, HashingWriter};
pub use index::StatIndex;
pub use lock::StoreLock;
pub use mounts::{CacheMountInfo, MountLease, Take};
pub use prune::{PruneReport, StoreUsage};
pub use store::{ImageRecord, RecordKind, StepRecord, Store, StoreError};
