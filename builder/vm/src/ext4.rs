//! A bit-for-bit reproducible ext4 image of a flattened root, made with
//! e2fsprogs without root and without mounting anything:
//!
//! 1. `mke2fs -d` copies the folder in (1.47 walks each folder in sorted
//!    order, so inode numbers do not depend on the host's filesystem), with
//!    kiln's own `mke2fs.conf` (the host's does not leak in), a UUID and a
//!    directory hash seed given by the caller, and `E2FSPROGS_FAKE_TIME` for
//!    the superblock's times.
//! 2. A `debugfs -w` script then sets what the folder could not carry or
//!    carries from the host: every inode's mode, owner and times, file
//!    capabilities, and the device nodes.
//!
//! e2fsprogs treats a fake time of 0 as unset, so with epoch 0 the
//! superblock's times are 1 (1970-01-01T00:00:01Z); every inode's times are
//! the image's.

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use crate::error::BuildError;
use crate::flatten::Flattened;
use crate::listing::Kind;
use crate::tools::{self, Tool};

const BLOCK: u64 = 4096;
const INODE_SIZE: u64 = 256;

/// kiln's mke2fs.conf: ext4 as Debian 12 makes it, minus `orphan_file` and
/// `metadata_csum_seed` (older kernels and e2fsck refuse them).
const MKE2FS_CONF: &str = "[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 0
\tlazy_itable_init = false
\tlazy_journal_init = true
[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
";

/// What the root needs: its data, folders and inodes (bytes, rounded up),
/// and how many inodes to make.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Needs {
    pub(crate) bytes: u64,
    pub(crate) inodes: u64,
}

/// An estimate of the smallest ext4 that holds `flat`, metadata included.
pub(crate) fn needs(tree: &crate::fstree::TreeMap) -> Needs {
    let mut data = 0u64;
    let mut dir_bytes: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for e in tree.entries.values() {
        match &e.kind {
            Kind::File { size, .. } => data += size.div_ceil(BLOCK) * BLOCK,
            Kind::Symlink { target } if target.len() >= 60 => data += BLOCK,
            _ => {}
        }
        let parent = e.path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        *dir_bytes.entry(parent).or_default() += 8 + e.path.len() as u64 - parent.len() as u64 + 4;
    }
    // Folders: at least a block each; big ones grow (plus an htree index).
    let dirs: u64 = dir_bytes.values().map(|b| b.div_ceil(BLOCK).max(1) * BLOCK * 5 / 4).sum::<u64>()
        + tree.entries.values().filter(|e| matches!(e.kind, Kind::Dir)).count() as u64 * BLOCK;
    let inodes = (tree.entries.len() as u64 + 16) * 5 / 4 + 1024;
    let content = data + dirs + inodes * INODE_SIZE;
    let journal = journal_blocks(content / BLOCK) * BLOCK;
    // Group descriptors, bitmaps and reserved GDT blocks: a few per 128 MiB group.
    let groups = content.div_ceil(128 << 20) + 1;
    let bytes = content + journal + groups * 300 * BLOCK + (2 << 20);
    Needs { bytes, inodes }
}

/// mke2fs's default journal size (blocks) for a filesystem of `blocks`.
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 2048 => 0,
        b if b < 32 * 1024 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

/// Parameters of one root filesystem.
pub(crate) struct Ext4<'a> {
    pub(crate) flat: &'a Flattened,
    pub(crate) dir: &'a Path,
    pub(crate) size: u64,
    pub(crate) inodes: u64,
    pub(crate) uuid: &'a str,
    pub(crate) epoch: u64,
    pub(crate) label: &'a str,
}

/// Why making the filesystem failed.
pub(crate) enum Ext4Error {
    /// It did not fit.
    NoSpace(String),
    Other(BuildError),
}

impl From<BuildError> for Ext4Error {
    fn from(e: BuildError) -> Self {
        Ext4Error::Other(e)
    }
}

/// Writes the filesystem to `out` (a new file in a temp folder, `scratch`
/// beside it for the scripts).
pub(crate) fn make(p: &Ext4<'_>, out: &Path, scratch: &Path) -> Result<(), Ext4Error> {
    let conf = scratch.join("mke2fs.conf");
    fs::write(&conf, MKE2FS_CONF).map_err(BuildError::io_write(&conf))?;
    let fake_time = p.epoch.max(1).to_string();
    let blocks = p.size / BLOCK;
    let mut cmd = Command::new(tools::path(Tool::Mke2fs));
    cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0"])
        .arg("-N")
        .arg(p.inodes.to_string())
        .arg("-L")
        .arg(p.label)
        .arg("-U")
        .arg(p.uuid)
        .arg("-E")
        // The journal is not written out: the file is new, so it reads as zeros.
        .arg(format!("hash_seed={},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=1", p.uuid))
        .arg("-d")
        .arg(p.dir)
        .arg(out)
        .arg(blocks.to_string());
    env(&mut cmd, &conf, &fake_time);
    let o = tools::run(&mut cmd, Tool::Mke2fs)?;
    if !o.status.success() {
        let text = String::from_utf8_lossy(&o.stderr).into_owned();
        if ["Could not allocate", "No space left", "Not enough space", "inode_table", "too small"]
            .iter()
            .any(|s| text.contains(s))
        {
            return Err(Ext4Error::NoSpace(text));
        }
        return Err(tools::failed(Tool::Mke2fs, &o).into());
    }
    let script = scratch.join("fix.debugfs");
    fs::write(&script, fix_script(p, scratch)?).map_err(BuildError::io_write(&script))?;
    let mut cmd = Command::new(tools::path(Tool::Debugfs));
    cmd.arg("-w").arg("-f").arg(&script).arg(out);
    env(&mut cmd, &conf, &fake_time);
    let o = tools::run(&mut cmd, Tool::Debugfs)?;
    // debugfs exits 0 whatever its commands did: any line on stderr other
    // than its banner is a failed command.
    let errors: Vec<&str> = std::str::from_utf8(&o.stderr)
        .unwrap_or("")
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty() && !l.starts_with("Allocated inode"))
        .collect();
    if !o.status.success() || !errors.is_empty() {
        let text = errors.join("\n");
        if text.contains("Could not allocate") || text.contains("No free space") {
            return Err(Ext4Error::NoSpace(text));
        }
        return Err(tools::failed(Tool::Debugfs, &o).into());
    }
    Ok(())
}

fn env(cmd: &mut Command, conf: &Path, fake_time: &str) {
    cmd.env("MKE2FS_CONFIG", conf)
        .env("E2FSPROGS_FAKE_TIME", fake_time)
        .env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env_remove("MKE2FS_SYNC")
        .env_remove("MKE2FS_DEVICE_SECTSIZE")
        .env_remove("MKE2FS_DEVICE_PHYS_SECTSIZE")
        .env_remove("MKE2FS_FIRST_META_BG")
        .env_remove("DEBUGFS_PAGER")
        .env("PAGER", "cat");
}

/// A path as a debugfs argument: quoted, with `"` doubled.
fn quote(path: &str) -> Result<String, BuildError> {
    if path.contains(['\n', '\r']) {
        return Err(BuildError::usage(
            format!("the image holds a file whose name has a line break (`/{}`)", path.escape_debug()),
            Some("a VM disk cannot carry it: rename or remove the file in a step"),
        ));
    }
    Ok(format!("\"/{}\"", path.replace('"', "\"\"")))
}

fn fix_script(p: &Ext4<'_>, scratch: &Path) -> Result<String, BuildError> {
    let mut s = String::new();
    let epoch = p.epoch;
    // Device nodes first, each made in its folder (debugfs's mknod takes a name).
    for e in p.flat.tree.entries.values() {
        let (t, major, minor) = match e.kind {
            Kind::Char { major, minor } => ('c', major, minor),
            Kind::Block { major, minor } => ('b', major, minor),
            _ => continue,
        };
        let (parent, name) = match e.path.rsplit_once('/') {
            Some((a, b)) => (quote(a)?, b),
            None => ("/".to_string(), e.path.as_str()),
        };
        if name.contains(['"', ' ', '\t']) {
            return Err(BuildError::usage(
                format!("the device node `/{}` has a name a VM disk cannot carry", e.path),
                Some("rename or remove the device node in a step"),
            ));
        }
        let _ = writeln!(s, "cd {parent}\nmknod {name} {t} {major} {minor}\ncd /");
    }
    let times = |s: &mut String, q: &str, mtime: u64| {
        for f in ["atime", "ctime", "crtime"] {
            let _ = writeln!(s, "sif {q} {f} @{epoch}");
        }
        let _ = writeln!(s, "sif {q} mtime @{mtime}");
    };
    let _ = writeln!(s, "sif / mode 040755\nsif / uid 0\nsif / gid 0");
    times(&mut s, "/", epoch);
    times(&mut s, "/lost+found", epoch);
    for (i, e) in p.flat.tree.entries.values().enumerate() {
        let kind_bits = match &e.kind {
            Kind::File { .. } => 0o100000,
            Kind::Dir => 0o040000,
            Kind::Symlink { .. } => 0o120000,
            Kind::Char { .. } => 0o020000,
            Kind::Block { .. } => 0o060000,
            Kind::Fifo => 0o010000,
            // A hard link is its target's inode: set once, through the target.
            Kind::Hardlink { .. } => continue,
        };
        let perm = if matches!(e.kind, Kind::Symlink { .. }) { 0o777 } else { e.mode & 0o7777 };
        let q = quote(&e.path)?;
        let _ = writeln!(s, "sif {q} mode 0{:o}", kind_bits | perm);
        let _ = writeln!(s, "sif {q} uid {}", e.uid);
        let _ = writeln!(s, "sif {q} gid {}", e.gid);
        let mtime = p.flat.mtimes.get(&e.path).copied().unwrap_or(epoch);
        times(&mut s, &q, mtime);
        for (name, value) in e.xattr_pairs() {
            let f = scratch.join(format!("xattr-{i}"));
            fs::File::create(&f).and_then(|mut w| w.write_all(&value)).map_err(BuildError::io_write(&f))?;
            let file = f.display().to_string().replace('"', "\"\"");
            let _ = writeln!(s, "ea_set -f \"{file}\" {q} {name}");
        }
    }
    Ok(s)
}
