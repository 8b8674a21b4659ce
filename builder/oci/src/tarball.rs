//! Reproducible tar encoding: ustar headers written byte by byte, PAX records
//! only where ustar cannot hold a value (long names, large ids or sizes,
//! xattrs), always in the same form. No atime, ctime, user or group names.

use std::io::{self, Write};

pub(crate) const BLOCK: usize = 512;

/// What a tar entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TarKind {
    File { size: u64 },
    Dir,
    Symlink(String),
    Hardlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
    Fifo,
}

/// One header's worth of metadata; `path` is relative (no leading `/`) and
/// without a trailing `/` (added here for folders).
#[derive(Debug, Clone)]
pub(crate) struct TarHeader<'a> {
    pub(crate) path: &'a str,
    pub(crate) kind: &'a TarKind,
    pub(crate) mode: u32,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mtime: u64,
    pub(crate) xattrs: &'a [(String, Vec<u8>)],
}

const MAX_OCTAL_7: u64 = 0o7777777;
const MAX_OCTAL_11: u64 = 0o77777777777;

/// Writes the header block(s) for one entry (a PAX header first if needed).
pub(crate) fn write_header(w: &mut impl Write, h: &TarHeader<'_>) -> io::Result<()> {
    let mut name = h.path.to_string();
    if matches!(h.kind, TarKind::Dir) {
        name.push('/');
    }
    let mut pax: Vec<(&str, Vec<u8>)> = Vec::new();
    let split = split_ustar_name(&name);
    if split.is_none() {
        pax.push(("path", name.clone().into_bytes()));
    }
    let link = match h.kind {
        TarKind::Symlink(t) | TarKind::Hardlink(t) => Some(t.as_str()),
        _ => None,
    };
    if let Some(t) = link {
        if t.len() > 100 {
            pax.push(("linkpath", t.as_bytes().to_vec()));
        }
    }
    let size = match h.kind {
        TarKind::File { size } => *size,
        _ => 0,
    };
    if size > MAX_OCTAL_11 {
        pax.push(("size", size.to_string().into_bytes()));
    }
    if h.uid as u64 > MAX_OCTAL_7 {
        pax.push(("uid", h.uid.to_string().into_bytes()));
    }
    if h.gid as u64 > MAX_OCTAL_7 {
        pax.push(("gid", h.gid.to_string().into_bytes()));
    }
    let mut xattrs: Vec<&(String, Vec<u8>)> = h.xattrs.iter().collect();
    xattrs.sort_by(|a, b| a.0.cmp(&b.0));
    let xattr_keys: Vec<String> = xattrs.iter().map(|(k, _)| format!("SCHILY.xattr.{k}")).collect();
    for ((_, v), k) in xattrs.iter().zip(&xattr_keys) {
        pax.push((k.as_str(), v.clone()));
    }
    if !pax.is_empty() {
        pax.sort_by(|a, b| a.0.cmp(b.0));
        let mut body = Vec::new();
        for (k, v) in &pax {
            body.extend_from_slice(&pax_record(k, v));
        }
        let block =
            ustar_block(("././@PaxHeader", ""), b'x', 0o644, 0, 0, body.len() as u64, h.mtime, "", (0, 0));
        w.write_all(&block)?;
        w.write_all(&body)?;
        pad(w, body.len() as u64)?;
    }
    let (prefix, short) = split.unwrap_or(("", truncate_utf8(&name, 100)));
    let (flag, dev) = match h.kind {
        TarKind::File { .. } => (b'0', (0, 0)),
        TarKind::Dir => (b'5', (0, 0)),
        TarKind::Symlink(_) => (b'2', (0, 0)),
        TarKind::Hardlink(_) => (b'1', (0, 0)),
        TarKind::CharDev(a, b) => (b'3', (*a, *b)),
        TarKind::BlockDev(a, b) => (b'4', (*a, *b)),
        TarKind::Fifo => (b'6', (0, 0)),
    };
    let block = ustar_block(
        (prefix, short),
        flag,
        h.mode & 0o7777,
        // Values too large for their field went into the PAX header above.
        if h.uid as u64 > MAX_OCTAL_7 { 0 } else { h.uid },
        if h.gid as u64 > MAX_OCTAL_7 { 0 } else { h.gid },
        if size > MAX_OCTAL_11 { 0 } else { size },
        h.mtime.min(MAX_OCTAL_11),
        truncate_utf8(link.unwrap_or(""), 100),
        dev,
    );
    w.write_all(&block)
}

/// Zero bytes up to the next 512-byte boundary after `len` bytes of data.
pub(crate) fn pad(w: &mut impl Write, len: u64) -> io::Result<()> {
    let rem = (len % BLOCK as u64) as usize;
    if rem != 0 {
        w.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

/// The two zero blocks that end an archive.
pub(crate) fn write_trailer(w: &mut impl Write) -> io::Result<()> {
    w.write_all(&[0u8; BLOCK * 2])
}

/// `LEN key=value\n` where LEN counts the whole record, itself included.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let base = key.len() + value.len() + 3; // space, '=', newline
    let mut len = base + 1;
    while len != base + len.to_string().len() {
        len = base + len.to_string().len();
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Splits a name into ustar (prefix, name) fields if it fits.
fn split_ustar_name(name: &str) -> Option<(&str, &str)> {
    if name.len() <= 100 {
        return Some(("", name));
    }
    // The split must be at a '/', with prefix <= 155 bytes and name <= 100.
    let bytes = name.as_bytes();
    let body = name.strip_suffix('/').unwrap_or(name);
    for (i, b) in body.bytes().enumerate() {
        if b == b'/' && i <= 155 && bytes.len() - i - 1 <= 100 {
            return Some((&name[..i], &name[i + 1..]));
        }
    }
    None
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[allow(clippy::too_many_arguments)]
fn ustar_block(
    (prefix, name): (&str, &str),
    flag: u8,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: u64,
    link: &str,
    (major, minor): (u32, u32),
) -> [u8; BLOCK] {
    let mut b = [0u8; BLOCK];
    b[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut b[100..108], mode as u64);
    octal(&mut b[108..116], uid as u64);
    octal(&mut b[116..124], gid as u64);
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], mtime);
    b[156] = flag;
    b[157..157 + link.len()].copy_from_slice(link.as_bytes());
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    if matches!(flag, b'3' | b'4') {
        octal(&mut b[329..337], major as u64);
        octal(&mut b[337..345], minor as u64);
    }
    b[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    // The checksum is computed with its own field as spaces.
    b[148..156].fill(b' ');
    let sum: u32 = b.iter().map(|&x| x as u32).sum();
    let cks = format!("{sum:06o}\0 ");
    b[148..156].copy_from_slice(cks.as_bytes());
    b
}

/// Zero-padded octal, NUL-terminated, filling the field.
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_back(bytes: &[u8]) -> Vec<(String, u8, u32, u64, u64, Option<String>)> {
        let mut a = tar::Archive::new(bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                    h.entry_type().as_byte(),
                    h.mode().unwrap(),
                    e.header().uid().unwrap(),
                    h.mtime().unwrap(),
                    e.link_name_bytes().map(|l| String::from_utf8(l.to_vec()).unwrap()),
                )
            })
            .collect()
    }

    #[test]
    fn pax_record_length_counts_itself() {
        assert_eq!(pax_record("path", b"abc"), b"12 path=abc\n");
        let r = pax_record("path", &[b'x'; 95]);
        assert_eq!(r.len(), 105);
        assert!(r.starts_with(b"105 path="));
    }

    #[test]
    fn headers_round_trip_through_tar_rs() {
        let long = format!("{}/{}", "d".repeat(120), "f".repeat(120));
        let mut out = Vec::new();
        let dir = TarKind::Dir;
        let file = TarKind::File { size: 3 };
        let link = TarKind::Symlink("../target".into());
        write_header(
            &mut out,
            &TarHeader { path: "app", kind: &dir, mode: 0o755, uid: 0, gid: 0, mtime: 7, xattrs: &[] },
        )
        .unwrap();
        write_header(
            &mut out,
            &TarHeader {
                path: "app/x",
                kind: &file,
                mode: 0o4755,
                uid: 1000,
                gid: 1000,
                mtime: 7,
                xattrs: &[],
            },
        )
        .unwrap();
        out.extend_from_slice(b"abc");
        pad(&mut out, 3).unwrap();
        write_header(
            &mut out,
            &TarHeader {
                path: &long,
                kind: &link,
                mode: 0o777,
                uid: 5_000_000,
                gid: 0,
                mtime: 7,
                xattrs: &[],
            },
        )
        .unwrap();
        write_trailer(&mut out).unwrap();
        let got = read_back(&out);
        assert_eq!(got[0], ("app/".into(), b'5', 0o755, 0, 7, None));
        assert_eq!(got[1], ("app/x".into(), b'0', 0o4755, 1000, 7, None));
        assert_eq!(got[2], (long, b'2', 0o777, 5_000_000, 7, Some("../target".into())));
    }

    #[test]
    fn names_up_to_255_bytes_split_without_pax() {
        let name = format!("{}/{}", "p".repeat(150), "n".repeat(99));
        let (prefix, short) = split_ustar_name(&name).unwrap();
        assert_eq!((prefix.len(), short.len()), (150, 99));
        assert!(split_ustar_name(&"x".repeat(101)).is_none());
    }
}
