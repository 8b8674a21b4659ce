//! Fuzzing kiln's layer reader and unpacker with hostile tars (issue 13).
//!
//! Two generators: structured layers (names with `..`, `/`, whiteouts and
//! opaque markers; symlinks and hard links aimed out of the root; the same
//! path given twice as different types) and raw bytes mutated from a valid
//! tar. Properties: the reader never panics and refuses with a layer error;
//! what it accepts unpacks without creating, changing or removing anything
//! outside the root.
//!
//! Bounded for CI (`KILN_FUZZ_CASES`, default 256 a property); `make fuzz`
//! runs many more.

use std::fs;
use std::io::Write;
use std::path::Path;

use kiln_cache::Digest;
use kiln_oci::listing::{scan_layer, walk_layer};
use kiln_oci::unpack::Materializer;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

#[derive(Debug, Clone)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    Hardlink(String),
    Fifo,
    Char(u32, u32),
}

/// Names of one to four components from an alphabet full of traps.
fn name() -> impl Strategy<Value = String> {
    // Mostly plain names and whiteout markers; now and then `.`, `//` or `..`.
    let part = (0..100u8).prop_map(|n| match n {
        0..=69 => ["a", "b", "c", "d"][n as usize % 4],
        70..=92 => [".wh.a", ".wh.b", ".wh..wh..opq"][n as usize % 3],
        93..=97 => [".", ""][n as usize % 2],
        _ => "..",
    });
    (0..200u8, prop::collection::vec(part, 1..4))
        .prop_map(|(abs, parts)| format!("{}{}", if abs == 0 { "/" } else { "" }, parts.join("/")))
}

fn kind(outside: String) -> impl Strategy<Value = Kind> {
    let target = prop::sample::select(vec![
        "/".to_string(),
        "..".to_string(),
        "../..".to_string(),
        "../outside".to_string(),
        "a".to_string(),
        "a/b".to_string(),
        "/etc".to_string(),
        outside,
    ]);
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..3).prop_map(Kind::File),
        3 => Just(Kind::Dir),
        2 => target.prop_map(Kind::Symlink),
        // `@N`: the name of entry N of the layer (see `link_targets`).
        2 => prop_oneof![3 => (0..12usize).prop_map(|i| format!("@{i}")), 1 => name()].prop_map(Kind::Hardlink),
        1 => Just(Kind::Fifo),
        1 => prop::sample::select(vec![(0u32, 0u32), (0, 0), (1, 3)]).prop_map(|(a, b)| Kind::Char(a, b)),
    ]
}

/// Hard links aimed at `@N` point at the name of one of the entries before them.
fn link_targets(entries: &mut [(String, Kind)]) {
    let names: Vec<String> = entries.iter().map(|(n, _)| n.clone()).collect();
    for (at, (_, k)) in entries.iter_mut().enumerate() {
        if let Kind::Hardlink(t) = k {
            if let Some(i) = t.strip_prefix('@').and_then(|i| i.parse::<usize>().ok()) {
                if at > 0 {
                    *t = names[i % at].clone();
                }
            }
        }
    }
}

/// A tar of `entries` in the order given, owned by this process's user
/// (so unpacking works without root too).
fn tar_of(entries: &[(String, Kind)]) -> Vec<u8> {
    let uid = rustix::process::geteuid().as_raw() as u64;
    let gid = rustix::process::getegid().as_raw() as u64;
    let mut out = Vec::new();
    for (path, kind) in entries {
        let mut h = tar::Header::new_gnu();
        let bytes = path.as_bytes();
        let n = bytes.len().min(99);
        h.as_old_mut().name[..n].copy_from_slice(&bytes[..n]);
        let (t, size, link) = match kind {
            Kind::File(d) => (tar::EntryType::Regular, d.len(), ""),
            Kind::Dir => (tar::EntryType::Directory, 0, ""),
            Kind::Symlink(l) => (tar::EntryType::Symlink, 0, l.as_str()),
            Kind::Hardlink(l) => (tar::EntryType::Link, 0, l.as_str()),
            Kind::Fifo => (tar::EntryType::Fifo, 0, ""),
            Kind::Char(..) => (tar::EntryType::Char, 0, ""),
        };
        let l = link.as_bytes();
        h.as_old_mut().linkname[..l.len().min(99)].copy_from_slice(&l[..l.len().min(99)]);
        h.set_entry_type(t);
        if let Kind::Char(a, b) = kind {
            h.set_device_major(*a).unwrap();
            h.set_device_minor(*b).unwrap();
        }
        h.set_mode(0o755);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(0);
        h.set_size(size as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        if let Kind::File(d) = kind {
            out.extend_from_slice(d);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// A host folder holding the roots cases unpack into and things outside
/// them to guard; made once for the process.
fn host() -> &'static Path {
    static HOST: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("kiln-fuzz-").tempdir().unwrap();
        fs::create_dir(dir.path().join("outside")).unwrap();
        fs::write(dir.path().join("outside/keep"), b"keep").unwrap();
        fs::write(dir.path().join("keep"), b"keep").unwrap();
        dir
    })
    .path()
}

fn outside() -> String {
    host().join("outside").display().to_string()
}

/// Everything outside the cases' roots is as it was.
fn check_host() {
    for e in fs::read_dir(host()).unwrap() {
        let n = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(n == "outside" || n == "keep" || n.starts_with("root-"), "`{n}` appeared beside the root");
    }
    let inside: Vec<String> = fs::read_dir(host().join("outside"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(inside, ["keep"], "the folder outside the root changed");
    assert_eq!(fs::read(host().join("outside/keep")).unwrap(), b"keep");
    assert_eq!(fs::read(host().join("keep")).unwrap(), b"keep");
}

fn fresh_root() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    host().join(format!("root-{}", N.fetch_add(1, Ordering::Relaxed)))
}

/// Unpacks an accepted layer with kiln's materializer (no pool).
fn unpack(tar: &[u8], root: &Path) {
    let Ok(mut m) = Materializer::new(root.to_path_buf(), None) else { return };
    let _ = walk_layer(tar, &Digest::of(b""), &mut |e, data| {
        if let Some(mut f) = m.entry(e, None)? {
            std::io::copy(data, &mut f)?;
            f.flush()?;
        }
        Ok(())
    });
    let _ = m.finish();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn structured_hostile_layers_never_panic_and_never_leave_the_root(
        mut entries in prop::collection::vec((name(), kind(outside())), 1..12),
        dups in prop::collection::vec((any::<prop::sample::Index>(), kind(outside())), 0..4),
    ) {
        link_targets(&mut entries);
        // The same path again, as another type: the duplicate trick.
        for (at, k) in dups {
            let n = entries[at.index(entries.len())].0.clone();
            entries.push((n, k));
        }
        let tar = tar_of(&entries);
        match scan_layer(&tar[..], &Digest::of(b"")) {
            Ok(_) => {
                let root = fresh_root();
                unpack(&tar, &root);
                check_host();
                let _ = fs::remove_dir_all(&root);
            }
            Err(e) => prop_assert_eq!(e.exit_code(), 2, "{}", e),
        }
    }

    #[test]
    fn mutated_tar_bytes_never_panic(
        entries in prop::collection::vec((name(), prop::sample::select(vec![0u8, 1, 2])), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in prop::option::of(any::<prop::sample::Index>()),
    ) {
        let entries: Vec<(String, Kind)> = entries
            .into_iter()
            .map(|(n, k)| (n, match k { 0 => Kind::Dir, 1 => Kind::File(b"xy".to_vec()), _ => Kind::Symlink("a".into()) }))
            .collect();
        let mut tar = tar_of(&entries);
        for (at, b) in flips {
            let i = at.index(tar.len());
            tar[i] = b;
        }
        if let Some(c) = cut {
            tar.truncate(c.index(tar.len()));
        }
        if let Err(e) = scan_layer(&tar[..], &Digest::of(b"")) {
            prop_assert_eq!(e.exit_code(), 2, "{}", e);
        }
    }
}
