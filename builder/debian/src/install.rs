//! Locked `.deb` files → one layer, without dpkg or apt in the image.
//!
//! Each package's data archive (xz, zstd, gzip or plain tar) is walked with
//! the same checks as any layer kiln reads; the file data goes to one
//! scratch file per package and the layer is written from there (when the
//! next step needs the layer as a folder, each file also goes into the
//! store's file pool as it is decoded, for the folder to link). On top of
//! the packages' own files, kiln writes what dpkg and the maintainer scripts
//! would have left that images need (see [`fixups`]):
//! - `/var/lib/dpkg/status` and `info/PKG.{list,md5sums,conffiles}`, so
//!   `dpkg -l` and image scanners see the packages;
//! - the merged-/usr layout: `/bin`, `/sbin`, `/lib` (and `/lib32`,
//!   `/lib64`, `/libx32` when a package ships files in them or in their
//!   `/usr` twins) are symlinks into `/usr`, and files packages ship there
//!   are placed under `/usr`;
//! - `/etc/ld.so.cache` when the packages hold shared libraries and glibc;
//! - with ca-certificates: `/etc/ssl/certs/ca-certificates.crt` and
//!   `/etc/ca-certificates.conf`;
//! - alternatives for common tools (`awk`, `nawk`, `pager`, `editor`,
//!   `which`, `rmt`) through `/etc/alternatives`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use kiln_cache::Digest;

use super::configure::CONTROL_MEMBERS;
use super::deb822::{self, Paragraph};
use super::ldcache;
use crate::error::BuildError;
use crate::layer::{Content, LayerEntry};
use crate::listing::{walk_layer, walk_layer_listed};
use crate::tarball::TarKind;

/// Bump when the layer a package set makes changes for the same `.deb`s.
pub(crate) const INSTALL_SCHEMA: u32 = 4;

/// What the layers below the packages hold, where it matters.
pub struct Below<'a> {
    /// Their `/var/lib/dpkg/status`: its packages stay listed.
    pub status: Option<String>,
    /// Whether a path exists below: kiln makes no alternative link or
    /// ld.so.cache over what the base already has.
    pub exists: &'a dyn Fn(&str) -> Result<bool, BuildError>,
    /// Whether a path is a real folder below: a base that is not merged-/usr
    /// keeps its `/bin` (and the like), and packages' files go there.
    pub is_dir: &'a dyn Fn(&str) -> Result<bool, BuildError>,
}

/// One package, read from its `.deb`.
pub(crate) struct Unpacked {
    pub(crate) name: String,
    pub(crate) arch: String,
    pub(crate) multi_arch_same: bool,
    pub(crate) control: Paragraph,
    pub(crate) md5sums: Option<Vec<u8>>,
    pub(crate) conffiles: Option<Vec<u8>>,
    /// The maintainer scripts and other control members dpkg keeps
    /// (see [`CONTROL_MEMBERS`]): (name, bytes, mode).
    pub(crate) members: Vec<(String, Vec<u8>, u32)>,
    /// Entries in archive order (paths as the package ships them).
    pub(crate) entries: Vec<DebEntry>,
    /// The scratch file that holds the file data.
    pub(crate) data: PathBuf,
    /// The files this package put into the file pool.
    pub(crate) pooled: kiln_oci::unpack::PoolFiles,
}

pub(crate) struct DebEntry {
    pub(crate) path: String,
    pub(crate) kind: TarKind,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) xattrs: Vec<(String, Vec<u8>)>,
    /// Where a regular file's bytes start in [`Unpacked::data`].
    pub(crate) offset: u64,
    /// A regular file's digest, taken as its bytes were written there.
    pub(crate) sha256: Option<Digest>,
}

fn refused(package: &str, why: impl std::fmt::Display) -> BuildError {
    BuildError::Integrity {
        message: format!("The package `{package}` is refused: {why}"),
        hint: "the .deb may be damaged or not a Debian package; `kiln cache gc` removes a bad cached copy, and `kiln lock` re-resolves".into(),
    }
}

/// The members of an `ar` archive: (name, offset of data, size).
fn ar_members(f: &mut File, package: &str) -> Result<Vec<(String, u64, u64)>, BuildError> {
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic).map_err(|e| refused(package, format!("unreadable ({e})")))?;
    if &magic != b"!<arch>\n" {
        return Err(refused(package, "it is not an ar archive (a .deb starts with `!<arch>`)"));
    }
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut pos = 8u64;
    let mut out = Vec::new();
    while pos + 60 <= len {
        let mut h = [0u8; 60];
        f.seek(SeekFrom::Start(pos)).and_then(|_| f.read_exact(&mut h)).map_err(|e| refused(package, e))?;
        if &h[58..60] != b"`\n" {
            return Err(refused(package, "an ar member header is malformed"));
        }
        let name = String::from_utf8_lossy(&h[..16]).trim_end().trim_end_matches('/').to_string();
        let size: u64 = std::str::from_utf8(&h[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| refused(package, "an ar member has a bad size"))?;
        let data = pos + 60;
        if data + size > len {
            return Err(refused(package, format!("the member `{name}` is truncated")));
        }
        out.push((name, data, size));
        pos = data + size + (size % 2);
    }
    Ok(out)
}

fn decoder<'a>(name: &str, r: impl Read + 'a, package: &str) -> Result<Box<dyn Read + 'a>, BuildError> {
    Ok(match name.rsplit_once('.').map(|(_, e)| e) {
        Some("xz") => Box::new(liblzma::read::XzDecoder::new_multi_decoder(r)),
        Some("zst") => Box::new(zstd::stream::read::Decoder::new(r).map_err(|e| refused(package, e))?),
        Some("gz") => Box::new(flate2::read::MultiGzDecoder::new(r)),
        Some("tar") => Box::new(r),
        _ => {
            return Err(refused(package, format!("its member `{name}` has a compression kiln does not read")))
        }
    })
}

/// Where a .deb's files go as they are decoded, besides the scratch file:
/// the store's file pool, under the metadata the layer gives them (the
/// recipe's epoch as their time), when the layer is about to be made as a
/// folder (see [`kiln_oci::unpack::put_in_pool`]).
pub(crate) struct PrePool<'a> {
    pub(crate) dir: &'a Path,
    pub(crate) mtime: u64,
}

/// Files larger than this are not pooled as they are decoded (their bytes
/// would be held in memory): the layer writer pools them as before.
const PRE_POOL_MAX: u64 = 8 << 20;

/// A decoded file on its way to the pool: its bytes (the buffer is reused
/// file after file) and its mode, uid and gid.
#[derive(Default)]
struct Held {
    bytes: Vec<u8>,
    meta: Option<(u32, u32, u32)>,
}

/// Reads one `.deb` (already checked against its sha256): its control
/// files, and its data walked into `scratch` (and, with `pool`, its files
/// into the file pool).
pub(crate) fn unpack_deb(
    deb: &Path,
    package: &str,
    sha256: &Digest,
    scratch: &Path,
    pool: Option<&PrePool<'_>>,
) -> Result<Unpacked, BuildError> {
    let mut f = File::open(deb).map_err(BuildError::io_read(deb))?;
    let members = ar_members(&mut f, package)?;
    let find =
        |prefix: &str| members.iter().find(|(n, _, _)| n == prefix || n.starts_with(&format!("{prefix}.")));
    let (_, off, size) =
        find("debian-binary").ok_or_else(|| refused(package, "it has no `debian-binary`"))?;
    let mut version = String::new();
    f.seek(SeekFrom::Start(*off)).map_err(|e| refused(package, e))?;
    (&mut f).take(*size).read_to_string(&mut version).map_err(|e| refused(package, e))?;
    if !version.starts_with("2.") {
        return Err(refused(package, format!("it is .deb format `{}`, kiln reads 2.x", version.trim())));
    }

    // control.tar: control, md5sums, conffiles.
    let (cname, coff, csize) =
        find("control.tar").cloned().ok_or_else(|| refused(package, "it has no control.tar"))?;
    f.seek(SeekFrom::Start(coff)).map_err(|e| refused(package, e))?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let bad_tar = |e: BuildError| match e {
        BuildError::BadLayer { reason, .. } => refused(package, reason),
        e => e,
    };
    // Each member once (the last copy wins, as tar extraction would), and
    // at most 32 MiB of them in all: a control.tar of repeated or huge
    // members cannot hold kiln's memory.
    let mut members: BTreeMap<String, (Vec<u8>, u32)> = BTreeMap::new();
    let mut kept = 0u64;
    walk_layer(decoder(&cname, (&mut f).take(csize), package)?, sha256, &mut |e, r| {
        let path = e.path.trim_start_matches("./");
        if !matches!(e.kind, TarKind::File { .. }) {
            return Ok(());
        }
        let wanted = matches!(path, "control" | "md5sums" | "conffiles") || CONTROL_MEMBERS.contains(&path);
        if !wanted {
            return Ok(());
        }
        let mut v = Vec::new();
        r.take(1 << 24).read_to_end(&mut v)?;
        kept += v.len() as u64;
        if kept > 32 << 20 {
            return Err(std::io::Error::other("its control.tar holds more than 32 MiB of control files"));
        }
        match path {
            "control" | "md5sums" | "conffiles" => {
                files.insert(path.to_string(), v);
            }
            _ => {
                members.insert(path.to_string(), (v, e.mode & 0o7777));
            }
        }
        Ok(())
    })
    .map_err(bad_tar)?;
    let members: Vec<(String, Vec<u8>, u32)> = members.into_iter().map(|(k, (v, m))| (k, v, m)).collect();
    let control_text = files
        .get("control")
        .and_then(|c| String::from_utf8(c.clone()).ok())
        .ok_or_else(|| refused(package, "its control.tar has no UTF-8 `control` file"))?;
    let control = deb822::parse(&control_text)
        .ok()
        .and_then(|mut v| (v.len() == 1).then(|| v.remove(0)))
        .ok_or_else(|| refused(package, "its `control` file is not one deb822 paragraph"))?;
    if control.get("Package") != Some(package) {
        return Err(refused(
            package,
            format!("its control file names the package `{}`", control.get("Package").unwrap_or("")),
        ));
    }

    // data.tar: every entry, file bytes into the scratch file.
    let (dname, doff, dsize) =
        find("data.tar").cloned().ok_or_else(|| refused(package, "it has no data.tar"))?;
    f.seek(SeekFrom::Start(doff)).map_err(|e| refused(package, e))?;
    let mut out =
        BufWriter::with_capacity(1 << 20, File::create(scratch).map_err(BuildError::io_write(scratch))?);
    let mut written = 0u64;
    let mut entries = Vec::new();
    let mut shas = Vec::new();
    // A file's bytes and metadata, held from its visit to its listing
    // (which brings the digest the walker took of them) to be pooled.
    let held = std::cell::RefCell::new(Held::default());
    // Removed again unless the folder links them, when this package or
    // the build fails first.
    let mut pooled = kiln_oci::unpack::PoolFiles::default();
    let mut listed = |l: crate::listing::ListEntry| {
        let sha = match l.kind {
            crate::listing::Kind::File { sha256, .. } => Some(sha256),
            _ => None,
        };
        let mut h = held.borrow_mut();
        if let (Some(sha), Some((mode, uid, gid)), Some(pool)) = (sha, h.meta.take(), pool) {
            if let Some(made) =
                kiln_oci::unpack::put_in_pool(pool.dir, &sha, &h.bytes, mode, uid, gid, pool.mtime)
            {
                pooled.push(made);
            }
        }
        shas.push(sha);
        Ok(())
    };
    walk_layer_listed(
        decoder(&dname, (&mut f).take(dsize), package)?,
        sha256,
        &mut |e, r| {
            let offset = written;
            match *e.kind {
                // Files with xattrs keep their own inodes (not pooled).
                TarKind::File { size } if pool.is_some() && size <= PRE_POOL_MAX && e.xattrs.is_empty() => {
                    let mut h = held.borrow_mut();
                    h.bytes.clear();
                    h.bytes.reserve_exact(size as usize); // the buffer stays at the biggest file's size
                    r.read_to_end(&mut h.bytes)?;
                    out.write_all(&h.bytes)?;
                    written += h.bytes.len() as u64;
                    h.meta = Some((e.mode, e.uid, e.gid));
                }
                TarKind::File { .. } => written += std::io::copy(r, &mut out)?,
                _ => {}
            }
            if e.path.split('/').any(|c| c.starts_with(kiln_oci::whiteout::WHITEOUT)) {
                return Err(std::io::Error::other(format!("`{}` is a whiteout name", e.path)));
            }
            let xattrs =
                e.xattrs.iter().map(|(k, v)| (k.clone(), hex::decode(v).unwrap_or_default())).collect();
            entries.push(DebEntry {
                path: e.path.to_string(),
                kind: e.kind.clone(),
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                xattrs,
                offset,
                sha256: None,
            });
            Ok(())
        },
        &mut listed,
    )
    .map_err(bad_tar)?;
    // One listed entry follows each visit, in order, with the digest of
    // the bytes the visit wrote: they are not hashed again (and go into
    // the shared file pool under it), so the pairing is checked.
    if entries.len() != shas.len()
        || entries.iter().zip(&shas).any(|(e, s)| matches!(e.kind, TarKind::File { .. }) != s.is_some())
    {
        return Err(refused(package, "its data.tar could not be listed entry by entry"));
    }
    for (e, sha) in entries.iter_mut().zip(shas) {
        e.sha256 = sha;
    }
    out.flush().map_err(BuildError::io_write(scratch))?;
    Ok(Unpacked {
        name: package.to_string(),
        arch: control.get("Architecture").unwrap_or_default().to_string(),
        multi_arch_same: control.get("Multi-Arch") == Some("same"),
        control,
        md5sums: files.remove("md5sums"),
        conffiles: files.remove("conffiles"),
        members,
        entries,
        data: scratch.to_path_buf(),
        pooled,
    })
}

/// Top-level folders that merged-/usr makes symlinks into `/usr`.
const MERGED: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Where a path a package ships ends up, given the top folders that are
/// links into `/usr`.
fn merged_path(path: &str, merged: &[&str]) -> String {
    let top = path.split('/').next().unwrap_or("");
    if merged.contains(&top) {
        format!("usr/{path}")
    } else {
        path.to_string()
    }
}

/// The layer of `packages` (in name order): their files, the dpkg
/// database, and, when no maintainer scripts run (`scripts` false), the
/// fixups, as entries. With `scripts`, the scripts are kept in dpkg's
/// info folder for the next step to run. `sbom` is written into the image.
pub(crate) fn layer_entries(
    packages: &[Unpacked],
    sbom: &[u8],
    below: &Below<'_>,
    scripts: bool,
) -> Result<Vec<LayerEntry>, BuildError> {
    let mut tree: BTreeMap<String, LayerEntry> = BTreeMap::new();
    let mut merged: Vec<&str> = Vec::new();
    for m in MERGED {
        if !(below.is_dir)(m)? {
            merged.push(m);
        }
    }
    let mut merged_tops: BTreeSet<&str> = BTreeSet::new();
    for p in packages {
        for e in &p.entries {
            let top = e.path.split('/').next().unwrap_or("");
            if merged.contains(&top) {
                if e.path == top && matches!(e.kind, TarKind::Symlink(_)) {
                    continue; // the package ships the merged-/usr link itself; kiln makes it below
                }
                merged_tops.insert(MERGED.iter().find(|m| **m == top).expect("listed"));
            }
            let path = merged_path(&e.path, &merged);
            let kind = match &e.kind {
                TarKind::Hardlink(t) => TarKind::Hardlink(merged_path(t, &merged)),
                k => k.clone(),
            };
            let content = match kind {
                TarKind::File { .. } => {
                    Content::Slice { path: p.data.clone(), offset: e.offset, whole: false, sha256: e.sha256 }
                }
                _ => Content::None,
            };
            let entry = LayerEntry {
                path: path.clone(),
                kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                content,
                xattrs: e.xattrs.clone(),
            };
            match tree.get(&path) {
                // Folders shared by packages: the first package's wins, as with dpkg.
                Some(old) if matches!(old.kind, TarKind::Dir) && matches!(entry.kind, TarKind::Dir) => {}
                // A file shipped twice (a package that Replaces another's): the later one wins.
                _ => {
                    tree.insert(path, entry);
                }
            }
        }
    }

    // Merged /usr: the links, and the folders they point at. `/lib64` and
    // the like only where some package has files there, under either name
    // (trixie's libc6 ships /usr/lib64/ld-linux-x86-64.so.2 and leaves the
    // /lib64 link, the ELF interpreter's path, to base-files).
    for top in &merged {
        let wanted = ["bin", "sbin", "lib"].contains(top)
            || merged_tops.contains(top)
            || tree.contains_key(&format!("usr/{top}"));
        if wanted {
            ensure_dirs(&mut tree, &format!("usr/{top}"));
            tree.insert(top.to_string(), symlink(top, &format!("usr/{top}")));
        }
    }

    ensure_dirs(&mut tree, "var/lib/dpkg/info");
    for d in
        ["var/lib/dpkg/updates", "var/lib/dpkg/alternatives", "var/lib/dpkg/triggers", "etc/alternatives"]
    {
        ensure_dirs(&mut tree, d);
    }
    // dpkg's status: the base's packages that these do not replace, and these, by name.
    let mut paragraphs: BTreeMap<String, Paragraph> = BTreeMap::new();
    if let Some(text) = &below.status {
        let base = deb822::parse(text).map_err(|e| BuildError::BadImage {
            image: "the base".into(),
            reason: format!("its /var/lib/dpkg/status is malformed: {e}"),
        })?;
        for para in base {
            if let Some(name) = para.get("Package") {
                let key = format!("{name}:{}", para.get("Architecture").unwrap_or(""));
                paragraphs.insert(key, para);
            }
        }
    }
    for p in packages {
        paragraphs.retain(|_, para| para.get("Package") != Some(p.name.as_str()));
        let mut para = p.control.clone();
        para.fields
            .retain(|(k, _)| !k.eq_ignore_ascii_case("Status") && !k.eq_ignore_ascii_case("Conffiles"));
        para.fields.insert(1.min(para.fields.len()), ("Status".into(), "install ok installed".into()));
        if let Some(c) = conffiles_field(p, &tree)? {
            para.fields.push(("Conffiles".into(), c));
        }
        paragraphs.insert(format!("{}:{}", p.name, p.arch), para);
    }
    let mut status = String::new();
    for para in paragraphs.values() {
        status.push_str(&para.render());
        status.push('\n');
    }
    for p in packages {
        let info = if p.multi_arch_same { format!("{}:{}", p.name, p.arch) } else { p.name.clone() };
        let mut list = String::from("/.\n");
        for e in &p.entries {
            list.push('/');
            list.push_str(&e.path);
            list.push('\n');
        }
        put_file(&mut tree, &format!("var/lib/dpkg/info/{info}.list"), list.into_bytes(), 0o644);
        if let Some(m) = &p.md5sums {
            put_file(&mut tree, &format!("var/lib/dpkg/info/{info}.md5sums"), m.clone(), 0o644);
        }
        if let Some(c) = &p.conffiles {
            put_file(&mut tree, &format!("var/lib/dpkg/info/{info}.conffiles"), c.clone(), 0o644);
        }
        if scripts {
            for (name, bytes, mode) in &p.members {
                put_file(&mut tree, &format!("var/lib/dpkg/info/{info}.{name}"), bytes.clone(), *mode);
            }
        }
    }
    // dpkg's file-trigger registry, so a later `dpkg -i` in a `run` step
    // activates the packages' file triggers as on a real system.
    let mut file_triggers = String::new();
    for p in packages.iter().filter(|_| scripts) {
        let Some((_, bytes, _)) = p.members.iter().find(|(n, _, _)| n == "triggers") else { continue };
        for line in String::from_utf8_lossy(bytes).lines() {
            let mut w = line.split_whitespace();
            let (Some(kw), Some(name)) = (w.next(), w.next()) else { continue };
            if name.starts_with('/') && kw.starts_with("interest") && !name.contains(char::is_control) {
                let noawait = if kw == "interest-noawait" { "/noawait" } else { "" };
                file_triggers.push_str(&format!("{name} {}{noawait}\n", p.name));
            }
        }
    }
    if !file_triggers.is_empty() {
        put_file(&mut tree, "var/lib/dpkg/triggers/File", file_triggers.into_bytes(), 0o644);
    }
    // A conffile the layers below already have is kept, and the package's
    // version goes beside it as `FILE.dpkg-dist`, as dpkg does with
    // `--force-confold`: a recipe configures a package before its scripts
    // run (`create_main_cluster = false` for postgresql) by writing the
    // file in its base. The status keeps the package's md5, as dpkg does.
    for p in packages {
        for path in conffile_paths(p) {
            let rel = path.trim_start_matches('/');
            if !(below.exists)(rel)? {
                continue;
            }
            if let Some(mut e) = tree.remove(rel) {
                e.path = format!("{rel}.dpkg-dist");
                tree.insert(e.path.clone(), e);
            }
        }
    }
    put_file(&mut tree, "var/lib/dpkg/status", status.into_bytes(), 0o644);
    // The database layout with `NAME:ARCH` info files (multi-arch); without
    // this file dpkg reads the old layout and finds no `.list` of libc6.
    put_file(&mut tree, "var/lib/dpkg/info/format", b"1\n".to_vec(), 0o644);
    put_file(&mut tree, "var/lib/dpkg/available", Vec::new(), 0o644);
    ensure_dirs(&mut tree, "var/lib/kiln");
    put_file(&mut tree, "var/lib/kiln/sbom.spdx.json", sbom.to_vec(), 0o644);

    if !scripts {
        fixups(&mut tree, below)?;
    }
    Ok(tree.into_values().collect())
}

/// The package's conffiles: absolute paths, one per plain line of its
/// `conffiles` (`remove-on-upgrade /etc/x` and the like are not files it ships).
fn conffile_paths(p: &Unpacked) -> Vec<String> {
    let Some(list) = &p.conffiles else { return Vec::new() };
    String::from_utf8_lossy(list)
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('/') && !l.contains(char::is_whitespace) && !l.contains(char::is_control))
        .filter(|l| !l.split('/').any(|c| c == ".." || c == "."))
        .map(str::to_string)
        .collect()
}

/// dpkg's `Conffiles` status field: each conffile the package ships with
/// the md5 of its content, as dpkg records it after configuring.
fn conffiles_field(p: &Unpacked, tree: &BTreeMap<String, LayerEntry>) -> Result<Option<String>, BuildError> {
    use md5::Digest as _;
    let mut out = String::new();
    for path in conffile_paths(p) {
        let rel = path.trim_start_matches('/');
        let Some(e) = tree.get(rel).filter(|e| matches!(e.kind, TarKind::File { .. })) else { continue };
        let bytes = read_entry(e).map_err(|err| refused(&p.name, err))?;
        out.push_str(&format!("\n{path} {}", hex::encode(md5::Md5::digest(&bytes))));
    }
    Ok((!out.is_empty()).then_some(out))
}

fn symlink(path: &str, target: &str) -> LayerEntry {
    LayerEntry {
        path: path.to_string(),
        kind: TarKind::Symlink(target.to_string()),
        mode: 0o777,
        uid: 0,
        gid: 0,
        content: Content::None,
        xattrs: Vec::new(),
    }
}

fn put_file(tree: &mut BTreeMap<String, LayerEntry>, path: &str, bytes: Vec<u8>, mode: u32) {
    let e = LayerEntry {
        path: path.to_string(),
        kind: TarKind::File { size: bytes.len() as u64 },
        mode,
        uid: 0,
        gid: 0,
        content: Content::Bytes(bytes),
        xattrs: Vec::new(),
    };
    tree.insert(path.to_string(), e);
}

fn ensure_dirs(tree: &mut BTreeMap<String, LayerEntry>, path: &str) {
    let mut cur = String::new();
    for c in path.split('/') {
        if !cur.is_empty() {
            cur.push('/');
        }
        cur.push_str(c);
        tree.entry(cur.clone()).or_insert_with(|| LayerEntry {
            path: cur.clone(),
            kind: TarKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            content: Content::None,
            xattrs: Vec::new(),
        });
    }
}

/// Reads a regular file's bytes from the tree being built.
fn read_entry(e: &LayerEntry) -> std::io::Result<Vec<u8>> {
    let TarKind::File { size } = e.kind else { return Ok(Vec::new()) };
    match &e.content {
        Content::Bytes(b) => Ok(b.clone()),
        Content::Slice { path, offset, .. } => {
            let mut f = File::open(path)?;
            f.seek(SeekFrom::Start(*offset))?;
            let mut v = Vec::with_capacity(size as usize);
            f.take(size).read_to_end(&mut v)?;
            Ok(v)
        }
        _ => Ok(Vec::new()),
    }
}

/// Alternatives kiln sets up: (name, link, candidates by falling priority).
const ALTERNATIVES: &[(&str, &str, &[&str])] = &[
    ("awk", "usr/bin/awk", &["usr/bin/gawk", "usr/bin/mawk", "usr/bin/original-awk"]),
    ("nawk", "usr/bin/nawk", &["usr/bin/gawk", "usr/bin/mawk", "usr/bin/original-awk"]),
    ("pager", "usr/bin/pager", &["usr/bin/less", "usr/bin/more"]),
    ("editor", "usr/bin/editor", &["usr/bin/nano", "usr/bin/vim.basic", "usr/bin/vim.tiny"]),
    ("which", "usr/bin/which", &["usr/bin/which.debianutils"]),
    ("rmt", "usr/sbin/rmt", &["usr/sbin/rmt-tar"]),
];

/// What maintainer scripts would have done that images need.
fn fixups(tree: &mut BTreeMap<String, LayerEntry>, below: &Below<'_>) -> Result<(), BuildError> {
    let io = |e: std::io::Error| BuildError::Write { path: PathBuf::from("<packages layer>"), source: e };

    // ca-certificates: the bundle update-ca-certificates would make.
    let certs: Vec<String> = tree
        .keys()
        .filter(|p| p.starts_with("usr/share/ca-certificates/") && p.ends_with(".crt"))
        .cloned()
        .collect();
    if !certs.is_empty() && tree.contains_key("usr/sbin/update-ca-certificates") {
        let mut bundle = Vec::new();
        let mut conf =
            String::from("# Written by kiln for the certificates ca-certificates ships (all enabled).\n");
        for c in &certs {
            let mut b = read_entry(&tree[c]).map_err(io)?;
            if !b.ends_with(b"\n") {
                b.push(b'\n');
            }
            bundle.extend_from_slice(&b);
            let rel = c.trim_start_matches("usr/share/ca-certificates/");
            conf.push_str(rel);
            conf.push('\n');
            let name = Path::new(rel).file_stem().and_then(|s| s.to_str()).unwrap_or(rel);
            ensure_dirs(tree, "etc/ssl/certs");
            tree.insert(
                format!("etc/ssl/certs/{name}.pem"),
                symlink(&format!("etc/ssl/certs/{name}.pem"), &format!("/{c}")),
            );
        }
        ensure_dirs(tree, "etc/ssl/certs");
        put_file(tree, "etc/ssl/certs/ca-certificates.crt", bundle, 0o644);
        put_file(tree, "etc/ca-certificates.conf", conf.into_bytes(), 0o644);
    }

    // Alternatives: link → /etc/alternatives/NAME → the best candidate.
    for (name, link, candidates) in ALTERNATIVES {
        if tree.contains_key(*link) || (below.exists)(link)? {
            continue;
        }
        let Some(best) = candidates.iter().find(|c| tree.contains_key(**c)) else { continue };
        tree.insert(link.to_string(), symlink(link, &format!("/etc/alternatives/{name}")));
        let alt = format!("etc/alternatives/{name}");
        tree.insert(alt.clone(), symlink(&alt, &format!("/{best}")));
        let mut admin = format!("auto\n/{link}\n\n");
        for c in candidates.iter().filter(|c| tree.contains_key(**c)) {
            admin.push_str(&format!("/{c}\n0\n"));
        }
        admin.push('\n');
        put_file(tree, &format!("var/lib/dpkg/alternatives/{name}"), admin.into_bytes(), 0o644);
    }

    // ld.so.cache, as ldconfig would write it (a base's own is left alone:
    // glibc still finds the packages' libraries in its default folders).
    if (below.exists)("etc/ld.so.cache")? {
        return Ok(());
    }
    if let Some(cache) = ldcache::build(tree, read_entry).map_err(io)? {
        ensure_dirs(tree, "etc");
        put_file(tree, "etc/ld.so.cache", cache, 0o644);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A plain data.tar or control.tar: (path, bytes, mode), folders for
    /// paths ending in `/`.
    fn tar_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, bytes, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(if path.ends_with('/') {
                tar::EntryType::Directory
            } else {
                tar::EntryType::Regular
            });
            h.set_size(bytes.len() as u64);
            h.set_mode(*mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1);
            b.append_data(&mut h, path, *bytes).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// An `ar` archive of the members, as a .deb is.
    fn ar_of(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"!<arch>\n".to_vec();
        for (name, data) in members {
            let header = format!("{name:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n", 0, 0, 0, "100644", data.len());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    /// A .deb's files go into the pool as they are decoded, each under its
    /// own digest and the layer's metadata (a file after one that is not
    /// pooled is not paired with stale bytes); files over the limit are
    /// not; the pool files nothing links are removed with the package.
    #[test]
    fn a_deb_s_files_are_pooled_as_decoded_and_removed_unless_linked() {
        let root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
        if !root {
            eprintln!("SKIPPED: pool files are owned by root");
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let big = vec![7u8; PRE_POOL_MAX as usize + 1];
        let control = b"Package: demo\nVersion: 1\nArchitecture: amd64\n";
        let data = tar_of(&[
            ("./", b"", 0o755),
            ("./usr/", b"", 0o755),
            ("./usr/bin/", b"", 0o755),
            ("./usr/bin/small", b"hello\n", 0o755),
            ("./usr/bin/big", &big, 0o644),
            ("./usr/bin/after", b"after\n", 0o644),
        ]);
        let deb = dir.path().join("demo.deb");
        std::fs::write(
            &deb,
            ar_of(&[
                ("debian-binary", b"2.0\n".to_vec()),
                ("control.tar", tar_of(&[("./control", control, 0o644)])),
                ("data.tar", data),
            ]),
        )
        .unwrap();
        let pool = dir.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let pre = PrePool { dir: &pool, mtime: 7 };
        let sha = Digest::of(b"deb");
        let u = unpack_deb(&deb, "demo", &sha, &dir.path().join("scratch"), Some(&pre)).unwrap();
        let names = |p: &Path| {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let small = format!("{}-755-0-0-7", Digest::of(b"hello\n").hex());
        let after = format!("{}-644-0-0-7", Digest::of(b"after\n").hex());
        let mut want = vec![small.clone(), after.clone()];
        want.sort();
        assert_eq!(names(&pool), want, "the big file is not pooled; nothing half-made is left");
        assert_eq!(std::fs::read(pool.join(&after)).unwrap(), b"after\n");
        let md = std::fs::metadata(pool.join(&small)).unwrap();
        assert_eq!((md.mode() & 0o7777, md.mtime(), md.uid()), (0o755, 7, 0));
        assert_eq!(u.pooled.len(), 2);
        // Without the pool, nothing goes there.
        let none = unpack_deb(&deb, "demo", &sha, &dir.path().join("scratch2"), None).unwrap();
        assert!(none.pooled.is_empty());
        // A folder links one of them; the package dropped, the other goes.
        std::fs::hard_link(pool.join(&small), dir.path().join("linked")).unwrap();
        drop(u);
        assert_eq!(names(&pool), vec![small]);
    }
}
