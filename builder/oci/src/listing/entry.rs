//! One entry of a layer's listing and its kind: what the scanner, the
//! stored listing file and the merged tree all speak (a leaf of `listing`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use kiln_cache::Digest;

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
    pub(crate) fn from_tar(k: &TarKind, sha256: Option<Digest>) -> Kind {
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
    /// Extended attributes kiln keeps ([`KEPT_XATTRS`]), values in hex.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
}

/// The extended attributes layers carry, as the engine's archiver keeps
/// them: file capabilities (`setcap`). Others are dropped.
pub(crate) const KEPT_XATTRS: &[&str] = &["security.capability"];

impl ListEntry {
    /// The kept xattrs as (name, bytes), for a tar header.
    pub fn xattr_pairs(&self) -> Vec<(String, Vec<u8>)> {
        self.xattrs.iter().filter_map(|(k, v)| Some((k.clone(), hex::decode(v).ok()?))).collect()
    }
}
