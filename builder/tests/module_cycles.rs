//! No import cycles between the modules of any crate of the workspace:
//! reads every `crate::NAME` a source file names and looks for a cycle among
//! each crate's top-level modules; and inside every folder module, the
//! children its `mod.rs` names against the siblings or parent each child
//! names through `super::`. (Cargo already refuses cycles between crates.)
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

/// The source of a file without its `#[cfg(test)]` module (last, by
/// clippy's rule), whose `super::` is the file itself.
fn without_tests(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

/// Whether `text` names `name::` as a path (not `other_name::` or `x::name::`).
fn names_path(text: &str, name: &str) -> bool {
    let pat = format!("{name}::");
    text.match_indices(&pat)
        .any(|(i, _)| !text[..i].chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':'))
}

/// Inside the folder module `dir`: `mod` (its mod.rs) -> the children it
/// names; each child -> the siblings it names through `super::NAME`, or
/// `mod` for anything else it takes from its parent.
fn folder_graph(dir: &Path) -> BTreeMap<String, BTreeSet<String>> {
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
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let parent = std::fs::read_to_string(dir.join("mod.rs")).unwrap();
    let parent = without_tests(&parent);
    let uses = g.entry("mod".into()).or_default();
    uses.extend(children.keys().filter(|c| names_path(parent, c)).cloned());
    for (name, path) in &children {
        let text = std::fs::read_to_string(path).unwrap();
        let text = without_tests(&text);
        let uses = g.entry(name.clone()).or_default();
        for (i, _) in text.match_indices("super::") {
            let rest = &text[i + 7..];
            let named: Vec<String> = match rest.strip_prefix('{') {
                // `super::{a, b::c}`: the first name of each part.
                Some(group) => group[..group.find('}').unwrap_or(group.len())]
                    .split(',')
                    .map(|part| part.trim().split("::").next().unwrap_or("").to_string())
                    .collect(),
                None => vec![rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()],
            };
            for n in named.into_iter().filter(|n| !n.is_empty()) {
                uses.insert(if children.contains_key(&n) { n } else { "mod".into() });
            }
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
        for dir in folder_modules(&root.join(c)) {
            let g = folder_graph(&dir);
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
    std::fs::write(dir.join("mod.rs"), "mod a;\nmod b;\npub use a::A;\n").unwrap();
    std::fs::write(dir.join("a.rs"), "use super::{b::B, Shared};\n").unwrap();
    std::fs::write(dir.join("b.rs"), "pub struct B;\n#[cfg(test)]\nmod tests { use super::*; }\n").unwrap();
    let g = folder_graph(&dir);
    assert_eq!(g["mod"], ["a".to_string()].into());
    assert_eq!(g["a"], ["b".to_string(), "mod".to_string()].into());
    assert!(g["b"].is_empty(), "a test module's `super::` is its own file");
    assert_eq!(cycle(&g).unwrap(), ["a", "mod", "a"]);
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
