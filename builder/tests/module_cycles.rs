//! No import cycles between the modules of any crate of the workspace:
//! reads every `crate::NAME` a source file names and looks for a cycle among
//! each crate's top-level modules; and inside every folder module, the
//! children its `mod.rs` names against the siblings or parent each child
//! names (through `super::` or the folder's `crate::` path). (Cargo already refuses cycles between crates.)
//! Run alone: `cargo nextest run -p kiln-builder --test module_cycles`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The crates' source folders, from the workspace root.
const CRATES: &[&str] = &[
    "src",
    "recipes/src",
    "cache/src",
    "builder/src",
    "builder/oci/src",
    "builder/exec/src",
    "builder/debian/src",
    "builder/vm/src",
    "builder/remote/src",
];

/// Top-level module → the top-level modules it names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files: Vec<PathBuf> = Vec::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    for f in files {
        let rel = f.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        let module = first.trim_end_matches(".rs").to_string();
        if matches!(module.as_str(), "lib" | "main") {
            continue; // the crate root only declares and re-exports
        }
        let text = std::fs::read_to_string(&f).unwrap();
        let uses = g.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let before = text[..i].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `kiln_crate::`, not `crate::`
            }
            let name: String =
                text[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let is_module = name.chars().next().is_some_and(|c| c.is_lowercase());
            if is_module && name != module {
                uses.insert(name);
            }
        }
    }
    g
}

/// A cycle in `g`, if any (depth-first).
fn cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, m, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys().find_map(|n| visit(g, n, &mut Vec::new(), &mut done))
}

/// The source of a file without its line comments and its trailing
/// `#[cfg(test)] mod tests` (whose `super::` is the file itself).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

/// The names a path continuing at `rest` (just after `PREFIX::`) reaches
/// first: `a::b` gives `a`; `{a, b::{c, d}}` gives `a` and `b`; `*` gives `*`.
fn first_names(rest: &str) -> Vec<String> {
    let ident = |t: &str| -> String {
        t.chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '*').collect()
    };
    let Some(group) = rest.strip_prefix('{') else { return vec![ident(rest)] };
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.push(ident(group[start..i].trim()));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(ident(group[start..i].trim()));
                start = i + 1;
            }
            _ => {}
        }
    }
    out
}

/// Where `text` names a path through `prefix` (`super::`, `crate::build::`,
/// `self::`), not as the tail of a longer path or name: the names it reaches.
fn paths_through(text: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices(prefix) {
        if text[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        out.extend(first_names(&text[i + prefix.len()..]));
    }
    out
}

/// Inside the folder module `dir` (whose path in its crate is `path`, e.g.
/// `build`): `mod` (its mod.rs) -> the children it names; each child -> the
/// siblings it names through `super::` or the folder's `crate::` path, or
/// `mod` for anything else it takes from its parent.
fn folder_graph(dir: &Path, path: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut children = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if p.is_dir() && p.join("mod.rs").is_file() {
            children.insert(name, p.join("mod.rs"));
        } else if p.extension().is_some_and(|x| x == "rs") && name != "mod" {
            children.insert(name, p);
        }
    }
    let through_folder = format!("crate::{path}::");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let parent = code_of(&std::fs::read_to_string(dir.join("mod.rs")).unwrap());
    let mut named: Vec<String> = Vec::new();
    for prefix in ["self::", through_folder.as_str()] {
        named.extend(paths_through(&parent, prefix));
    }
    for c in children.keys() {
        // A plain `child::` path (what `use child::X` and `child::f()` write).
        if !paths_through(&parent, &format!("{c}::")).is_empty() {
            named.push(c.clone());
        }
    }
    g.entry("mod".into()).or_default().extend(named.into_iter().filter(|n| children.contains_key(n)));
    for (name, file) in &children {
        let text = code_of(&std::fs::read_to_string(file).unwrap());
        let uses = g.entry(name.clone()).or_default();
        for n in paths_through(&text, "super::").into_iter().chain(paths_through(&text, &through_folder)) {
            if n.is_empty() {
                continue;
            }
            uses.insert(if children.contains_key(&n) { n } else { "mod".into() });
        }
        if text.contains(&format!("crate::{path};")) || text.contains(&format!("crate::{path} as")) {
            uses.insert("mod".into());
        }
        uses.remove(name);
    }
    g
}

/// Every folder module under `src` (a folder with a `mod.rs`).
fn folder_modules(src: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![src.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                if p.join("mod.rs").is_file() {
                    out.push(p.clone());
                }
                todo.push(p);
            }
        }
    }
    out
}

#[test]
fn no_folder_module_has_a_cycle_between_its_parent_and_children() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for c in CRATES {
        let src = root.join(c);
        for dir in folder_modules(&src) {
            let path: Vec<String> = dir
                .strip_prefix(&src)
                .unwrap()
                .components()
                .map(|p| p.as_os_str().to_string_lossy().into_owned())
                .collect();
            let g = folder_graph(&dir, &path.join("::"));
            if let Some(cyc) = cycle(&g) {
                panic!("{}: the modules {} import each other in a circle", dir.display(), cyc.join(" -> "));
            }
        }
    }
}

#[test]
fn the_folder_checker_sees_super_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let write = |f: &str, t: &str| std::fs::write(dir.join(f), t).unwrap();
    write("mod.rs", "mod a;\nmod b;\nmod c;\nmod d;\npub use a::A; // c::nothing\npub use self::d::D;\n");
    write("a.rs", "use super::{b::{B, C}, Shared};\n");
    write("b.rs", "pub struct B;\n#[cfg(test)]\nfn only_in_tests() {}\nuse super::c::X;\n#[cfg(test)]\nmod tests { use super::*; }\n");
    write("c.rs", "use super::*;\n");
    write("d.rs", "use crate::folder::{b::B, Thing};\n");
    let g = folder_graph(&dir, "folder");
    assert_eq!(g["mod"], ["a".to_string(), "d".to_string()].into(), "a comment names nothing");
    assert_eq!(g["a"], ["b".to_string(), "mod".to_string()].into());
    assert_eq!(g["b"], ["c".to_string()].into(), "after a test-only item, and not from the tests module");
    assert_eq!(g["c"], ["mod".to_string()].into(), "a glob takes from the parent");
    assert_eq!(g["d"], ["b".to_string(), "mod".to_string()].into(), "the folder's crate:: path");
    let cyc = cycle(&g).expect("mod -> a -> mod");
    assert_eq!((cyc.first(), cyc.last()), (Some(&"a".to_string()), Some(&"a".to_string())));
    assert!(cyc.contains(&"mod".to_string()), "{cyc:?}");
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for c in CRATES {
        assert!(root.join(c).is_dir(), "no `{c}`: is the list of crates out of date?");
        let g = graph(&root.join(c));
        if let Some(cyc) = cycle(&g) {
            panic!("{c}: the modules {} import each other in a circle", cyc.join(" -> "));
        }
    }
}

#[test]
fn the_checker_finds_a_cycle() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["c".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
    ]
    .into();
    assert_eq!(cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}
