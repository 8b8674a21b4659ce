//! What a `copy` reads of the context: `.kilnignore`, a step's `exclude`, and
//! `.git`, which is left out unless asked for.

use std::fs;

use crate::support::*;

const RECIPE: &str = r#"
[image]
name = "ctx"

[[step]]
copy = "."
to = "/app"
exclude = ["logs/"]

[[step]]
copy = "logs"
to = "/logs"
exclude = ["*.log", "!keep.log", "/cache/"]
"#;

fn project() -> Project {
    let p = Project::new();
    p.recipe(RECIPE)
        .file(
            ".kilnignore",
            "# build output, and the test's cache and images\ntarget/\n*.tmp\n/cache/\n/out*/\n",
        )
        .file("src/main.rs", "fn main() {}\n")
        .file("notes.tmp", "scratch\n")
        .file("logs/a.log", "a\n")
        .file("logs/keep.log", "kept\n")
        .file("logs/readme.txt", "r\n")
        .file("logs/cache/x", "x\n")
        .file("logs/sub/cache/y", "y\n")
        .file(".git/HEAD", "ref: refs/heads/main\n")
        .file(".git/config", "[core]\n");
    for i in 0..500 {
        p.file(&format!("target/debug/obj{i}.o"), format!("object {i}\n"));
    }
    p
}

#[test]
fn excluded_files_are_not_in_the_image_and_change_no_key() {
    let p = project();
    // A FIFO in the excluded folder: `copy` refuses one it meets, so the build
    // passing shows the walk never reached it.
    let fifo = p.path("target/debug/pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let first = p.build(&["-o", "oci:out1"]);
    let d1 = first.digest();
    let files = image_files(&p.path("out1"));
    let paths: Vec<&str> = files.keys().map(String::as_str).collect();
    assert!(paths.contains(&"app/src/main.rs"), "{paths:?}");
    assert!(paths.contains(&"app/.kilnignore"), "{paths:?}");
    for gone in ["app/target", "app/notes.tmp", "app/.git", "app/logs", "logs/a.log", "logs/cache"] {
        assert!(!paths.iter().any(|p| p.starts_with(gone)), "{gone} is excluded: {paths:?}");
    }
    for kept in ["logs/keep.log", "logs/readme.txt", "logs/sub/cache/y"] {
        assert!(paths.contains(&kept), "{kept}: {paths:?}");
    }

    // Every excluded file changes, and new ones come: every step is a HIT, same image.
    for i in 0..500 {
        p.file(&format!("target/debug/obj{i}.o"), format!("rebuilt {i}\n"));
    }
    p.file("target/new.o", "new\n").file("notes.tmp", "other\n").file("logs/a.log", "more\n");
    p.file("logs/cache/x", "changed\n").file(".git/HEAD", "ref: refs/heads/other\n");
    let second = p.build(&["-o", "oci:out2"]);
    assert_eq!(second.digest(), d1);
    assert_eq!(second.cached(), [true, true], "{}", second.stderr);

    // A file that is not excluded: its step runs again (and so the one on top of it).
    p.file("logs/readme.txt", "changed\n");
    let third = p.build(&["-o", "oci:out3"]);
    third.digest();
    assert_eq!(third.cached(), [true, false], "{}", third.stderr);
    p.file("src/main.rs", "fn main() { println!(); }\n");
    let fourth = p.build(&["-o", "oci:out4"]);
    fourth.digest();
    assert_eq!(fourth.cached(), [false, false], "{}", fourth.stderr);
}

#[test]
fn git_comes_in_only_when_asked() {
    let p = project();
    p.file(".kilnignore", "target/\n/cache/\n/out/\n!.git\n");
    fs::remove_dir_all(p.path("target")).unwrap();
    p.build(&["-o", "oci:out"]).digest();
    let files = image_files(&p.path("out"));
    assert_eq!(files["app/.git/HEAD"].1, b"ref: refs/heads/main\n");
}

#[test]
fn bad_excludes_are_exit_2() {
    let p = project();
    // A pattern that leaves the copied folder.
    p.recipe("[image]\nname = \"x\"\n[[step]]\ncopy = \"src\"\nto = \"/s\"\nexclude = [\"../target\"]\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln.toml:6:"), "{}", r.stderr);
    assert!(r.stderr.contains("leaves the copied folder"), "{}", r.stderr);
    // `exclude` on a step that is not a copy from the context.
    p.recipe("[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\nexclude = [\"a\"]\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`exclude` only applies to `copy` steps"), "{}", r.stderr);
    // Copying what `.kilnignore` excludes, or `.git`: said, at the step.
    for src in ["target/debug", ".git", "notes.tmp"] {
        p.recipe(&format!("[image]\nname = \"x\"\n[[step]]\ncopy = \"{src}\"\nto = \"/s\"\n"));
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{src}: {}", r.stderr);
        assert!(r.stderr.contains("is excluded from the context"), "{src}: {}", r.stderr);
        assert!(r.stderr.contains("kiln.toml:4:"), "{src}: {}", r.stderr);
    }
}

#[test]
fn a_hostile_kilnignore_is_refused_without_echo() {
    let p = project();
    p.recipe("[image]\nname = \"x\"\n[[step]]\ncopy = \"src\"\nto = \"/s\"\n");
    // A symlink out of the context: never read.
    fs::remove_file(p.path(".kilnignore")).unwrap();
    p.symlink(".kilnignore", "/etc/shadow");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("is not a regular file"), "{}", r.stderr);
    // A line that is not a pattern: its line, not its text.
    fs::remove_file(p.path(".kilnignore")).unwrap();
    p.file(".kilnignore", "target/\nsecret-{token\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains(".kilnignore:2: the line is not a pattern kiln reads"), "{}", r.stderr);
    assert!(!r.stderr.contains("secret-"), "{}", r.stderr);
    p.file(".kilnignore", b"target/\n\xff\n");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains(".kilnignore:2: the line is not UTF-8"), "{}", r.stderr);
}

#[test]
fn an_allow_list_kilnignore_copies_only_what_it_lets_in() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\ncopy = \".\"\nto = \"/app\"\n")
        .file(".kilnignore", "*\n!src/\n!src/**\n")
        .file("src/main.rs", "fn main() {}\n")
        .file("other/secret", "s\n");
    p.build(&["-o", "oci:out"]).digest();
    let files = image_files(&p.path("out"));
    let paths: Vec<&str> = files.keys().map(String::as_str).collect();
    assert!(paths.contains(&"app/src/main.rs"), "{paths:?}");
    assert!(
        !paths.iter().any(|p| p.contains("other") || p.contains("kiln.toml") || p.contains("cache")),
        "{paths:?}"
    );
}
