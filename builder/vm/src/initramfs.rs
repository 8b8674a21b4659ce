//! The kernel an image holds, the modules its root filesystem needs, and a
//! reproducible initramfs: a `newc` cpio kiln writes itself (sorted entries,
//! fixed inode numbers, the image's epoch as every time) holding kiln's
//! `/init` and those modules, uncompressed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Read;

use crate::fstree::TreeMap;
use crate::listing::Kind;
use kiln_debian::deb822::compare_versions;

/// The modules a root on a virtio disk with ext4 needs, by module name.
/// `crc32c_generic` because ext4's metadata checksums ask the crypto API for
/// crc32c, which would otherwise take a modprobe the initramfs does not have.
pub(crate) const ROOT_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "crc32c_generic", "ext4"];

/// A kernel found in the image.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    pub(crate) version: String,
    /// `boot/vmlinuz-VERSION`, relative to the root.
    pub(crate) image: String,
    /// The modules folder, symlinks resolved (e.g. `usr/lib/modules/VERSION`).
    pub(crate) modules: String,
}

/// The newest kernel in the image: `/boot/vmlinuz-VERSION` with
/// `/lib/modules/VERSION/kernel` beside it.
pub(crate) fn find_kernel(tree: &TreeMap) -> Option<Kernel> {
    let mut found: Vec<Kernel> = Vec::new();
    for e in tree.entries.values() {
        let Some(version) = e.path.strip_prefix("boot/vmlinuz-") else { continue };
        if version.contains('/') || !matches!(e.kind, Kind::File { .. }) {
            continue;
        }
        let Ok(modules) = tree.resolve_parents(&format!("lib/modules/{version}/kernel")) else { continue };
        if !matches!(tree.get(&modules).map(|m| &m.kind), Some(Kind::Dir)) {
            continue;
        }
        let modules = modules.trim_end_matches("/kernel").to_string();
        found.push(Kernel { version: version.to_string(), image: e.path.clone(), modules });
    }
    found.sort_by(|a, b| compare_versions(&a.version, &b.version));
    found.pop()
}

/// The module files of `kernel` in the tree, by module name.
pub(crate) fn module_files(tree: &TreeMap, kernel: &Kernel) -> HashMap<String, String> {
    let prefix = format!("{}/", kernel.modules);
    tree.entries
        .range(prefix.clone()..)
        .take_while(|(p, _)| p.starts_with(&prefix))
        .filter(|(p, e)| {
            matches!(e.kind, Kind::File { .. } | Kind::Hardlink { .. })
                && [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|x| p.ends_with(x))
        })
        .map(|(p, _)| (module_name(p), p.clone()))
        .collect()
}

/// The names in `modules.builtin` (modules compiled into the kernel).
pub(crate) fn builtin_names(text: &str) -> HashSet<String> {
    text.lines().filter(|l| !l.trim().is_empty()).map(module_name).collect()
}

/// The modules a module needs loaded first: the `depends=` of its `.modinfo`
/// section (what depmod reads; Debian's packages leave depmod to a
/// maintainer script, so there is no modules.dep to read).
pub(crate) fn modinfo_depends(elf: &[u8]) -> Result<Vec<String>, String> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o: usize| elf.get(o..o + 4).map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize);
    let u64_at = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().expect("8")) as usize);
    if elf.get(..5) != Some(b"\x7fELF\x02") || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let bad = || "its section headers are malformed".to_string();
    let shoff = u64_at(0x28).ok_or_else(bad)?;
    let shentsize = u16_at(0x3a).ok_or_else(bad)?;
    let shnum = u16_at(0x3c).ok_or_else(bad)?;
    let shstrndx = u16_at(0x3e).ok_or_else(bad)?;
    let section = |i: usize| -> Option<(usize, usize, usize)> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((u32_at(h)?, u64_at(h + 24)?, u64_at(h + 32)?))
    };
    let (_, str_off, str_size) = section(shstrndx).ok_or_else(bad)?;
    let names = elf.get(str_off..str_off.checked_add(str_size).ok_or_else(bad)?).ok_or_else(bad)?;
    for i in 0..shnum {
        let (name, off, size) = section(i).ok_or_else(bad)?;
        let name_bytes = names.get(name..).ok_or_else(bad)?;
        let end = name_bytes.iter().position(|b| *b == 0).unwrap_or(name_bytes.len());
        if &name_bytes[..end] != b".modinfo" {
            continue;
        }
        let info = elf.get(off..off.checked_add(size).ok_or_else(bad)?).ok_or_else(bad)?;
        for item in info.split(|b| *b == 0) {
            if let Some(d) = item.strip_prefix(b"depends=") {
                let d = String::from_utf8_lossy(d);
                return Ok(d.split(',').filter(|x| !x.is_empty()).map(module_name).collect());
            }
        }
        return Ok(Vec::new());
    }
    Err("it has no .modinfo section".into())
}

/// `names` in load order: each after the modules it depends on.
pub(crate) fn load_order(names: &[String], depends: &HashMap<String, Vec<String>>) -> Vec<String> {
    fn visit(
        n: &str,
        depends: &HashMap<String, Vec<String>>,
        seen: &mut HashSet<String>,
        out: &mut Vec<String>,
    ) {
        if !seen.insert(n.to_string()) {
            return;
        }
        for d in depends.get(n).into_iter().flatten() {
            if depends.contains_key(d) {
                visit(d, depends, seen, out);
            }
        }
        out.push(n.to_string());
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in names {
        visit(n, depends, &mut seen, &mut out);
    }
    out
}

/// A module's name from its file path (`kernel/fs/ext4/ext4.ko.xz` → `ext4`),
/// with `-` read as `_`, as the kernel does.
pub(crate) fn module_name(path: &str) -> String {
    let base = path.rsplit('/').next().unwrap_or(path);
    base.split(".ko").next().unwrap_or(base).replace('-', "_")
}

/// A module file's bytes, uncompressed (`.ko.xz`, `.ko.zst`, `.ko.gz`).
pub(crate) fn decompress_module(file: &str, raw: Vec<u8>) -> std::io::Result<Vec<u8>> {
    decompress(file, raw)
}

fn decompress(file: &str, raw: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if file.ends_with(".xz") {
        liblzma::read::XzDecoder::new(&raw[..]).read_to_end(&mut out)?;
    } else if file.ends_with(".zst") {
        zstd::stream::read::Decoder::new(&raw[..])?.read_to_end(&mut out)?;
    } else if file.ends_with(".gz") {
        flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out)?;
    } else {
        return Ok(raw);
    }
    Ok(out)
}

/// One entry of a cpio archive.
pub(crate) enum CpioEntry {
    Dir,
    File { mode: u32, bytes: Vec<u8> },
    CharDev { major: u32, minor: u32 },
}

/// A `newc` cpio of `entries` (paths relative, no leading `/`), in path
/// order with parents first, every time `mtime`.
pub(crate) fn cpio(entries: &BTreeMap<String, CpioEntry>, mtime: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut header = |out: &mut Vec<u8>, name: &str, mode: u32, nlink: u32, size: usize, rdev: (u32, u32)| {
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            mtime as u32,
            size as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        ino += 1;
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
    };
    for (name, e) in entries {
        match e {
            CpioEntry::Dir => header(&mut out, name, 0o040755, 2, 0, (0, 0)),
            CpioEntry::CharDev { major, minor } => header(&mut out, name, 0o020600, 1, 0, (*major, *minor)),
            CpioEntry::File { mode, bytes } => {
                header(&mut out, name, 0o100000 | mode, 1, bytes.len(), (0, 0));
                out.extend_from_slice(bytes);
                pad4(&mut out);
            }
        }
    }
    header(&mut out, "TRAILER!!!", 0, 1, 0, (0, 0));
    // The kernel reads the archive in 512-byte blocks, as cpio writes it.
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn cpio_reads_back_with_gnu_cpio() {
        let Ok(o) = std::process::Command::new("cpio").arg("--version").output() else { return };
        if !o.status.success() {
            return;
        }
        let mut e = BTreeMap::new();
        e.insert("dev".to_string(), CpioEntry::Dir);
        e.insert("dev/console".to_string(), CpioEntry::CharDev { major: 5, minor: 1 });
        e.insert("init".to_string(), CpioEntry::File { mode: 0o755, bytes: b"#!/bin/sh\n".to_vec() });
        e.insert("m".to_string(), CpioEntry::Dir);
        e.insert("m/a.ko".to_string(), CpioEntry::File { mode: 0o644, bytes: vec![7; 1001] });
        let bytes = cpio(&e, 1_700_000_000);
        assert_eq!(bytes, cpio(&e, 1_700_000_000));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.cpio");
        fs::write(&f, &bytes).unwrap();
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -itv < {} 2>&1", f.display()))
            .env("TZ", "UTC")
            .output()
            .unwrap();
        let list = String::from_utf8_lossy(&o.stdout);
        for want in ["drwxr-xr-x", "dev/console", "-rwxr-xr-x", "init", "m/a.ko", "1001", "Nov 14  2023"] {
            assert!(list.contains(want), "{want} missing from:\n{list}");
        }
    }

    #[test]
    fn modules_load_after_what_they_depend_on() {
        let deps: HashMap<String, Vec<String>> = [
            ("ext4", vec!["crc16", "mbcache", "jbd2"]),
            ("jbd2", vec![]),
            ("crc16", vec![]),
            ("mbcache", vec![]),
            ("virtio_blk", vec!["virtio_ring", "virtio"]),
            ("virtio_ring", vec![]),
            ("virtio", vec![]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
        .collect();
        let order = load_order(&["virtio_blk".into(), "ext4".into()], &deps);
        assert_eq!(order, ["virtio_ring", "virtio", "virtio_blk", "crc16", "mbcache", "jbd2", "ext4"]);
        assert_eq!(module_name("kernel/arch/x86/crypto/crc32c-intel.ko.xz"), "crc32c_intel");
    }

    #[test]
    fn modinfo_depends_reads_the_section() {
        // A minimal ELF64 with a section name table and a .modinfo section.
        let shstr = b"\0.shstrtab\0.modinfo\0";
        let info = b"license=GPL\0depends=mbcache,jbd2,crc16\0name=ext4\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let str_off = elf.len();
        elf.extend_from_slice(shstr);
        let info_off = elf.len();
        elf.extend_from_slice(info);
        let shoff = elf.len();
        let sh = |name: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        let headers = [sh(0, 0, 0), sh(1, str_off, shstr.len()), sh(11, info_off, info.len())].concat();
        elf.extend_from_slice(&headers);
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(modinfo_depends(&elf).unwrap(), ["mbcache", "jbd2", "crc16"]);
        assert!(modinfo_depends(b"not an elf").is_err());
    }

    #[test]
    fn the_newest_kernel_is_found_through_merged_usr() {
        use crate::listing::{ListEntry, Listing};
        let e = |path: &str, kind: Kind| ListEntry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            xattrs: Default::default(),
        };
        let file = || Kind::File { size: 1, sha256: kiln_cache::Digest::of(b"x") };
        let mut layered = crate::fstree::FsTree::default();
        layered
            .apply(&Listing {
                entries: vec![
                    e("boot", Kind::Dir),
                    e("boot/vmlinuz-6.1.0-9-amd64", file()),
                    e("boot/vmlinuz-6.1.0-10-amd64", file()),
                    e("boot/vmlinuz-7.0-nomodules", file()),
                    e("lib", Kind::Symlink { target: "usr/lib".into() }),
                    e("usr", Kind::Dir),
                    e("usr/lib", Kind::Dir),
                    e("usr/lib/modules", Kind::Dir),
                    e("usr/lib/modules/6.1.0-9-amd64", Kind::Dir),
                    e("usr/lib/modules/6.1.0-9-amd64/kernel", Kind::Dir),
                    e("usr/lib/modules/6.1.0-10-amd64", Kind::Dir),
                    e("usr/lib/modules/6.1.0-10-amd64/kernel", Kind::Dir),
                ],
            })
            .unwrap();
        let t = TreeMap::of(&layered).unwrap();
        let k = find_kernel(&t).unwrap();
        assert_eq!(k.version, "6.1.0-10-amd64");
        assert_eq!(k.image, "boot/vmlinuz-6.1.0-10-amd64");
        assert_eq!(k.modules, "usr/lib/modules/6.1.0-10-amd64");
    }
}
