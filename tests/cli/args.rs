//! `[args]`, `--arg` and `--arg-file`: `${NAME}` in a recipe, and a value
//! reaching a step's key only through the fields it appears in.

use crate::support::*;

const RECIPE: &str = r#"
[args]
VERSION = "1.0"
GREETING = "hello"

[image]
name = "args"

[[step]]
write = "/etc/shell-text"
content = "$HOME $$ $${GREETING}"

[[step]]
write = "/etc/greeting"
content = "${GREETING}\n"

[config]
labels = { "org.opencontainers.image.version" = "${VERSION}" }
"#;

fn label(p: &Project, out: &str) -> String {
    let r = p.kiln(&["inspect", &format!("oci:{out}"), "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["config_json"]["Labels"]["org.opencontainers.image.version"].as_str().unwrap().to_string()
}

#[test]
fn an_argument_only_in_a_label_rebuilds_no_layer() {
    let p = Project::new();
    p.recipe(RECIPE);
    let first = p.build(&["-o", "oci:out1"]);
    let d1 = first.digest();
    assert_eq!(first.cached(), [false, false]);
    assert_eq!(label(&p, "out1"), "1.0");

    // The label's argument changed: the config (and so the manifest) changes, no step runs.
    let plan = p.kiln(&["plan", "kiln.toml", "--arg", "VERSION=2.0"]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    assert!(plan.stdout.contains("arg  VERSION=2.0  (--arg)"), "{}", plan.stdout);
    assert!(plan.stdout.contains("arg  GREETING=hello  (default)"), "{}", plan.stdout);
    assert_eq!(plan.stdout.lines().filter(|l| l.contains("HIT")).count(), 2, "{}", plan.stdout);
    let second = p.build(&["-o", "oci:out2", "--arg", "VERSION=2.0"]);
    let d2 = second.digest();
    assert_eq!(second.cached(), [true, true], "{}", second.stderr);
    assert_ne!(d1, d2);
    assert_eq!(label(&p, "out2"), "2.0");

    // The same value from a file gives the same image.
    p.file("ci.args", "# CI's values\nVERSION=2.0\n");
    assert_eq!(p.build(&["-o", "oci:out3", "--arg-file", "ci.args"]).digest(), d2);
    // `--arg` wins over the file.
    let d = p.build(&["-o", "oci:out4", "--arg-file", "ci.args", "--arg", "VERSION=1.0"]).digest();
    assert_eq!(d, d1);

    // An argument in a step's content: that step runs again, the one below it does not.
    let third = p.build(&["-o", "oci:out5", "--arg", "GREETING=bonjour"]);
    third.digest();
    assert_eq!(third.cached(), [true, false], "{}", third.stderr);
    let r = p.kiln(&["diff", "oci:out1", "oci:out5"]);
    assert!(r.stdout.contains("/etc/greeting"), "{}", r.stdout);
}

#[test]
fn only_dollar_brace_is_special() {
    let p = Project::new();
    p.recipe(RECIPE);
    p.build(&["-o", "oci:out"]).digest();
    let files = image_files(&p.path("out"));
    assert_eq!(files["etc/greeting"].1, b"hello\n");
    assert_eq!(
        files["etc/shell-text"].1, b"$HOME $$ ${GREETING}",
        "`$${{` is a literal `${{`; other `$` stay"
    );
}

#[test]
fn bad_arguments_are_exit_2_before_any_step() {
    let p = Project::new();
    p.recipe(RECIPE);
    let cases: [(&[&str], &str); 4] = [
        (&["--arg", "NOT_DECLARED=1"], "`NOT_DECLARED` (--arg) is not declared"),
        (&["--arg", "VERSION"], "`--arg` takes NAME=VALUE"),
        (&["--arg", "9X=1"], "is not an argument name"),
        (&["--arg-file", "missing.args"], "cannot read the argument file"),
    ];
    for (args, want) in cases {
        let mut all = vec!["build", "kiln.toml", "-o", "oci:out"];
        all.extend(args);
        let r = p.kiln(&all);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert!(!p.path("out").exists(), "{args:?}: nothing is built");
    }
    // A bad line of an argument file: its place, never its bytes.
    p.file("bad.args", "VERSION=1\nTOKEN-hunter2\n");
    let r = p.kiln(&["plan", "kiln.toml", "--arg-file", "bad.args"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("bad.args:2: the line is not NAME=VALUE"), "{}", r.stderr);
    assert!(!r.stderr.contains("hunter2"), "{}", r.stderr);
    // A declared name in an argument file that the recipe does not declare: the file's line.
    p.file("other.args", "\nOTHER=1\n");
    let r = p.kiln(&["verify", "kiln.toml", "--arg-file", "other.args"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("`OTHER` (other.args:2) is not declared"), "{}", r.stderr);

    // An undefined `${X}` in the recipe: exit 2 at the reference.
    p.recipe("[image]\nname = \"x\"\n\n[[step]]\nwrite = \"/a\"\ncontent = \"${UNDEFINED}\"\n");
    let r = p.kiln(&["build", "kiln.toml", "-o", "oci:out"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln.toml:6:12"), "{}", r.stderr);
    assert!(r.stderr.contains("`UNDEFINED` is not declared in `[args]`"), "{}", r.stderr);
}

#[test]
fn verify_builds_with_the_same_arguments() {
    let p = Project::new();
    p.recipe(RECIPE);
    p.file("ci.args", "GREETING=hi\n");
    let r = p.kiln(&["verify", "kiln.toml", "--arg-file", "ci.args", "--arg", "VERSION=3"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let d = r.stdout.lines().last().unwrap().to_string();
    let b = p.build(&["-o", "oci:out", "--arg", "GREETING=hi", "--arg", "VERSION=3"]);
    assert_eq!(b.digest(), d);
}
