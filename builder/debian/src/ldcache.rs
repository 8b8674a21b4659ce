//! `/etc/ld.so.cache` in glibc's format (`glibc-ld.so.cache1.1`, the only
//! one glibc ≥ 2.32 writes), made from the layer's files as `ldconfig`
//! would: the folders of `/etc/ld.so.conf.d/*.conf` (in name order, each
//! file's lines in order) and then the trusted `/lib` and `/usr/lib`; each
//! shared object with a SONAME whose link of that name exists in the
//! folder. Entries are sorted as glibc's lookup expects (by
//! `_dl_cache_libcmp`, descending). Writing it here keeps the bytes the
//! same whatever the host's glibc.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::layer::LayerEntry;
use crate::tarball::TarKind;

type Tree = BTreeMap<String, LayerEntry>;

/// The cache for `tree`, or `None` when the tree has no glibc configuration.
pub(crate) fn build(
    tree: &Tree,
    read: impl Fn(&LayerEntry) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Option<Vec<u8>>> {
    let confs: Vec<&String> =
        tree.keys().filter(|p| p.starts_with("etc/ld.so.conf.d/") && p.ends_with(".conf")).collect();
    if confs.is_empty() {
        return Ok(None);
    }
    let mut dirs: Vec<String> = Vec::new();
    let mut add = |d: &str| {
        let d = d.trim().trim_end_matches('/');
        if d.starts_with('/') && !d.contains("..") && !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_string());
        }
    };
    for c in &confs {
        let Some(e) = resolve(tree, c).and_then(|p| tree.get(&p)) else { continue };
        for line in String::from_utf8_lossy(&read(e)?).lines() {
            let line = line.split('#').next().unwrap_or("");
            if !line.trim().is_empty() && !line.trim_start().starts_with("include") {
                add(line);
            }
        }
    }
    add("/lib");
    add("/usr/lib");

    // (soname, flags) → path, first folder wins; folders that are the same
    // after symlinks (merged /usr) count once.
    let mut seen_dirs: Vec<String> = Vec::new();
    let mut libs: BTreeMap<(String, i32), String> = BTreeMap::new();
    for d in &dirs {
        let Some(real) = resolve(tree, d.trim_start_matches('/')) else { continue };
        if seen_dirs.contains(&real) || !matches!(tree.get(&real).map(|e| &e.kind), Some(TarKind::Dir)) {
            continue;
        }
        seen_dirs.push(real.clone());
        let prefix = format!("{real}/");
        let names: Vec<&str> = tree
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .filter(|n| {
                !n.contains('/') && (n.starts_with("lib") || n.starts_with("ld-")) && n.contains(".so")
            })
            .collect();
        for n in names {
            let Some(target) = resolve(tree, &format!("{prefix}{n}")) else { continue };
            let Some(e) = tree.get(&target) else { continue };
            if !matches!(e.kind, TarKind::File { .. }) {
                continue;
            }
            let bytes = read(e)?;
            let Some((soname, flags)) = elf_soname(&bytes) else { continue };
            // ldconfig points at the SONAME link in the folder.
            if !tree.contains_key(&format!("{prefix}{soname}")) {
                continue;
            }
            libs.entry((soname.clone(), flags)).or_insert_with(|| format!("{d}/{soname}"));
        }
    }
    if libs.is_empty() {
        return Ok(None);
    }
    let mut entries: Vec<(String, i32, String)> = libs.into_iter().map(|((s, f), p)| (s, f, p)).collect();
    entries.sort_by(|a, b| libcmp(&b.0, &a.0).then_with(|| b.1.cmp(&a.1)));

    const HEADER: usize = 17 + 3 + 4 + 4 + 1 + 3 + 4 + 12;
    const ENTRY: usize = 24;
    let strings_at = HEADER + ENTRY * entries.len();
    let mut strings: Vec<u8> = Vec::new();
    let mut interned: BTreeMap<String, u32> = BTreeMap::new();
    let mut intern = |s: &str| -> u32 {
        if let Some(o) = interned.get(s) {
            return *o;
        }
        let o = (strings_at + strings.len()) as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        interned.insert(s.to_string(), o);
        o
    };
    let mut table = Vec::with_capacity(ENTRY * entries.len());
    for (soname, flags, path) in &entries {
        let key = intern(soname);
        let value = intern(path);
        table.extend_from_slice(&flags.to_le_bytes());
        table.extend_from_slice(&key.to_le_bytes());
        table.extend_from_slice(&value.to_le_bytes());
        table.extend_from_slice(&0u32.to_le_bytes()); // osversion
        table.extend_from_slice(&0u64.to_le_bytes()); // hwcap
    }
    let mut out = Vec::with_capacity(strings_at + strings.len());
    out.extend_from_slice(b"glibc-ld.so.cache");
    out.extend_from_slice(b"1.1");
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
    out.push(2); // little-endian
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&0u32.to_le_bytes()); // no extensions
    out.extend_from_slice(&[0; 12]);
    out.extend_from_slice(&table);
    out.extend_from_slice(&strings);
    Ok(Some(out))
}

/// Follows symlinks (in any component) to a path in the tree, relative.
pub(crate) fn resolve(tree: &Tree, path: &str) -> Option<String> {
    let mut todo: Vec<String> = path.split('/').filter(|c| !c.is_empty()).map(str::to_string).rev().collect();
    let mut cur: Vec<String> = Vec::new();
    let mut hops = 0;
    while let Some(c) = todo.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        cur.push(c);
        let joined = cur.join("/");
        if let Some(LayerEntry { kind: TarKind::Symlink(t), .. }) = tree.get(&joined) {
            hops += 1;
            if hops > 40 {
                return None;
            }
            cur.pop();
            if t.starts_with('/') {
                cur.clear();
            }
            todo.extend(t.split('/').filter(|c| !c.is_empty()).map(str::to_string).rev());
        }
    }
    Some(cur.join("/"))
}

/// glibc's `_dl_cache_libcmp`: digit runs compare as numbers.
fn libcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() {
        if a[i].is_ascii_digit() {
            if j < b.len() && b[j].is_ascii_digit() {
                let (mut va, mut vb) = (0u64, 0u64);
                while i < a.len() && a[i].is_ascii_digit() {
                    va = va * 10 + (a[i] - b'0') as u64;
                    i += 1;
                }
                while j < b.len() && b[j].is_ascii_digit() {
                    vb = vb * 10 + (b[j] - b'0') as u64;
                    j += 1;
                }
                if va != vb {
                    return va.cmp(&vb);
                }
            } else {
                return Ordering::Greater;
            }
        } else if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        } else if j >= b.len() || a[i] != b[j] {
            return a[i].cmp(b.get(j).unwrap_or(&0));
        } else {
            i += 1;
            j += 1;
        }
    }
    0u8.cmp(b.get(j).unwrap_or(&0))
}

/// The SONAME of an ELF shared object and its ld.so.cache flags.
fn elf_soname(b: &[u8]) -> Option<(String, i32)> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[5] != 1 {
        return None; // not ELF, or not little-endian
    }
    let is64 = match b[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| b.get(o..o + 4).map(|s| u32::from_le_bytes(s.try_into().unwrap()));
    let u64_at = |o: usize| b.get(o..o + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap()));
    let word = |o: usize| if is64 { u64_at(o) } else { u32_at(o).map(u64::from) };
    if u16_at(16)? != 3 {
        return None; // not ET_DYN
    }
    let machine = u16_at(18)?;
    let e_flags = u32_at(if is64 { 48 } else { 36 })?;
    let (shoff, shentsize, shnum) = if is64 {
        (u64_at(40)? as usize, u16_at(58)? as usize, u16_at(60)? as usize)
    } else {
        (u32_at(32)? as usize, u16_at(46)? as usize, u16_at(48)? as usize)
    };
    let section = |i: usize| -> Option<(u32, usize, usize, u32)> {
        let o = shoff.checked_add(i.checked_mul(shentsize)?)?;
        if is64 {
            Some((u32_at(o + 4)?, u64_at(o + 24)? as usize, u64_at(o + 32)? as usize, u32_at(o + 40)?))
        } else {
            Some((u32_at(o + 4)?, u32_at(o + 16)? as usize, u32_at(o + 20)? as usize, u32_at(o + 24)?))
        }
    };
    let (dyn_off, dyn_size, link) =
        (0..shnum).filter_map(section).find(|s| s.0 == 6).map(|(_, o, s, l)| (o, s, l as usize))?;
    let (_, str_off, str_size, _) = section(link)?;
    let step = if is64 { 16 } else { 8 };
    let mut soname = None;
    let mut o = dyn_off;
    while o + step <= dyn_off + dyn_size {
        let tag = word(o)?;
        if tag == 0 {
            break;
        }
        if tag == 14 {
            soname = Some(word(o + step / 2)? as usize);
        }
        o += step;
    }
    let s = soname?;
    let strtab = b.get(str_off..str_off + str_size)?;
    let name = strtab.get(s..)?.split(|c| *c == 0).next()?;
    let name = String::from_utf8(name.to_vec()).ok()?;
    const LIBC6: i32 = 0x0003;
    let flags = LIBC6
        | match (machine, is64) {
            (62, true) => 0x0300,                          // x86-64
            (62, false) => 0x0800,                         // x32
            (183, _) => 0x0a00,                            // aarch64
            (40, _) if e_flags & 0x400 != 0 => 0x0900,     // arm hard-float
            (40, _) => 0x0b00,                             // arm soft-float
            (21, true) => 0x0500,                          // ppc64
            (22, true) => 0x0400,                          // s390x
            (243, true) if e_flags & 0x6 == 0x4 => 0x1000, // riscv64 double-float
            (243, true) => 0x0f00,                         // riscv64 soft-float
            _ => 0,
        };
    Some((name, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libcmp_compares_numbers_numerically() {
        assert_eq!(libcmp("libc.so.6", "libc.so.10"), Ordering::Less);
        assert_eq!(libcmp("libz.so.1", "libc.so.6"), Ordering::Greater);
        assert_eq!(libcmp("lib.so", "lib.so.1"), Ordering::Less);
        assert_eq!(libcmp("a", "a"), Ordering::Equal);
    }

    #[test]
    fn host_libc_has_a_soname() {
        let libc = ["/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"]
            .iter()
            .find_map(|p| std::fs::read(p).ok());
        if let Some(b) = libc {
            let (name, flags) = elf_soname(&b).expect("libc has a SONAME");
            assert_eq!(name, "libc.so.6");
            assert_eq!(flags, 0x0303);
        }
    }
}
