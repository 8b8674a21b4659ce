use std::fs;

use crate::support::*;

/// A bad input exits 2, names the place, and writes no output.
fn assert_refused(p: &Project, want_location: &str, want_message: &str) {
    let r = p.kiln(&["build", "kiln.toml", "-o", "oci:out", "--progress", "plain"]);
    assert_eq!(r.code, 2, "exit 2 expected; stderr:\n{}", r.stderr);
    assert!(r.stderr.contains(want_location), "no `{want_location}` in:\n{}", r.stderr);
    assert!(r.stderr.contains(want_message), "no `{want_message}` in:\n{}", r.stderr);
    assert!(r.stdout.is_empty(), "stdout must stay empty: {}", r.stdout);
    assert!(!p.path("out").exists(), "nothing written to the output");
}

#[test]
fn invalid_toml() {
    let p = Project::new();
    p.recipe("[image\nname = \"x\"\n");
    assert_refused(&p, "kiln.toml:1:", "");
}

#[test]
fn unknown_key_with_a_suggestion() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n\n[[step]]\ncopy = \"a\"\ntoo = \"/a\"\n").file("a", "a");
    assert_refused(&p, "kiln.toml:6:1", "unknown field `too`");
    let json = p.build(&[]);
    assert!(json.stderr.contains("did you mean `to`?"), "{}", json.stderr);
}

#[test]
fn wrong_type() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\nepoch = \"yesterday\"\n");
    assert_refused(&p, "kiln.toml:3:9", "this is the string \"yesterday\", expected a whole number");
    // kiln's and Rust's type names never show.
    for (recipe, want) in [
        ("image = 5\n", "this is a number `5`, expected a table"),
        (
            "[image]\nname = \"x\"\n[[step]]\nrun = \"true\"\nnetwork = \"yes\"\n",
            "expected `true` or `false`",
        ),
        ("[image]\nname = [\"x\"]\n", "this is an array, expected a string"),
        ("[image]\nname = \"x\"\n[config]\nuser = 0\n", "e.g. `user = \"1000:1000\"`"),
        ("[image]\nname = \"x\"\n[config]\nports = [80]\n", "e.g. `ports = [\"80/tcp\"]`"),
    ] {
        p.recipe(recipe);
        let r = p.kiln(&["build", "kiln.toml", "--progress", "plain"]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(want), "no `{want}` in:\n{}", r.stderr);
        for internal in ["Raw", "struct", "i64", "kiln::recipe", "sequence"] {
            assert!(!r.stderr.contains(internal), "`{internal}` shown:\n{}", r.stderr);
        }
    }
}

#[test]
fn missing_copy_source() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\ncopy = \"nope\"\nto = \"/x\"\n");
    assert_refused(&p, "kiln.toml:4:8", "`nope` does not exist in the context");
}

#[test]
fn source_escaping_with_dotdot() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\ncopy = \"../etc\"\nto = \"/x\"\n");
    assert_refused(&p, "kiln.toml:4:8", "leaves the context");
}

#[test]
fn source_escaping_through_a_symlink() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\ncopy = \"sneaky/passwd\"\nto = \"/x\"\n")
        .symlink("sneaky", "/etc");
    assert_refused(&p, "kiln.toml:4:8", "leaves the context through a symlink");
}

#[test]
fn missing_base() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\nbase = \"oci-archive:nope.tar\"\n");
    assert_refused(&p, "kiln.toml:3:8", "cannot read the base");
}

#[test]
fn bad_output_and_platform_are_usage_errors() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n");
    let r = p.kiln(&["build", "kiln.toml", "-o", "ftp:somewhere"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("unknown transport"), "{}", r.stderr);
    let r = p.kiln(&["build", "kiln.toml", "--platform", "plan9/amd64"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = p.kiln(&["build"]);
    assert_eq!(r.code, 2, "clap usage errors exit 2");
}

/// Issue 18: an output kiln would refuse once the image is built is
/// refused before any step runs.
#[test]
fn outputs_kiln_would_refuse_are_refused_before_any_step() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n");
    p.file("a-file", "x");
    p.file("full/other", "x");
    fs::create_dir_all(p.path("a-folder.tar")).unwrap();
    fs::create_dir_all(p.path("a-folder.raw")).unwrap();
    for (out, want) in [
        ("vm:disk.img", "names neither a .raw nor a .qcow2 file"),
        ("vm:a-folder.raw", "names neither a .raw nor a .qcow2 file"),
        ("docker:Upper-Case:1", "not a reference the engine takes"),
        ("docker:app:bad tag", "not a reference the engine takes"),
        ("docker:app:-x", "not a reference the engine takes"),
        ("oci-archive:a-folder.tar", "exists and is not a regular file"),
        ("docker-archive:a-folder.tar", "exists and is not a regular file"),
        ("oci:a-file", "exists and is not a folder"),
        ("oci:full", "not an OCI layout"),
        ("oci:/proc/x", "is not a folder kiln can write in"),
        ("oci-archive:a-file/x.tar", "is not a folder kiln can write in"),
    ] {
        let r = p.build(&["-o", out]);
        assert_eq!(r.code, 2, "{out}: {}", r.stderr);
        assert_eq!(r.count("step_started"), 0, "{out}: a step ran: {}", r.stderr);
        let last = r.events().pop().unwrap();
        assert_eq!(last["event"], "build_failed");
        assert!(last["message"].as_str().unwrap().contains(want), "{out}: {last}");
    }
}

#[test]
fn base_archives_with_hostile_entries_are_refused() {
    let cases: [(&str, Vec<RawEntry>, &str); 5] = [
        ("dotdot", vec![(b"../evil", b'0', b"")], "leaves the root through `..`"),
        ("absolute", vec![(b"/etc/evil", b'0', b"")], "is an absolute path"),
        ("symlink", vec![(b"link", b'2', b"/etc"), (b"link/evil", b'0', b"")], "makes a symlink"),
        ("hardlink", vec![(b"h", b'1', b"../../etc/shadow")], "leaves the root"),
        ("device", vec![(b"dev/sda", b'4', b"")], "device node"),
    ];
    for (name, entries, want) in cases {
        let p = Project::new();
        hostile_archive(&p, "base.tar", &entries);
        p.recipe("[image]\nname = \"x\"\nbase = \"oci-archive:base.tar\"\n[[step]]\nwrite = \"/ok\"\ncontent = \"\"\n");
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{name}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{name}: no `{want}` in {}", r.stderr);
        assert!(!p.path("out").exists(), "{name}: no output");
        assert!(!std::path::Path::new("/etc/evil").exists());
    }
}

#[test]
fn an_output_folder_that_is_not_a_layout_is_left_alone() {
    let p = Project::new();
    p.recipe("[image]\nname = \"x\"\n[[step]]\nwrite = \"/a\"\ncontent = \"a\"\n")
        .file("out/index.json", "junk");
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("out/index.json` exists but is not an OCI index"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(p.path("out/index.json")).unwrap(), "junk");
    assert!(!p.path("out/blobs").exists(), "nothing written into it");
}

#[test]
fn an_error_past_column_65535_is_reported_not_a_crash() {
    let p = Project::new();
    p.recipe(&format!(
        "[image]\nname = \"x\"\n[config]\nlabels = {{ a = \"{}\", b = 1 }}\n",
        "y".repeat(70_000)
    ));
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln.toml:4:"), "{}", r.stderr);
    assert!(r.stderr.len() < 10_000, "the 70,000-column line is not printed whole");
}

#[test]
fn a_recipe_that_is_not_utf8_is_refused_at_its_place() {
    let p = Project::new();
    p.file("kiln.toml", b"[image]\nname = \"x\"\n# caf\xe9\n".as_slice());
    let r = p.build(&[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kiln.toml:3:6") && r.stderr.contains("not UTF-8"), "{}", r.stderr);
}

#[test]
fn paths_past_what_a_layer_holds_are_refused_in_the_recipe() {
    let p = Project::new();
    for (path, want) in [
        (format!("/{}", "a/".repeat(2100)), "at most 4096"),
        (format!("/{}", "n".repeat(300)), "at most 255"),
    ] {
        p.recipe(&format!("[image]\nname = \"x\"\n[[step]]\nwrite = \"{path}\"\ncontent = \"\"\n"));
        let r = p.build(&[]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(want) && r.stderr.contains("kiln.toml:4:"), "{}", r.stderr);
    }
}

/// Issue 18: every flag and argument of every command says what it is.
#[test]
fn every_flag_and_argument_in_help_has_a_description() {
    let p = Project::new();
    let subcommands = |args: &[&str]| -> Vec<String> {
        let help = p.kiln(&[args, &["--help"]].concat()).stdout;
        help.split("Commands:")
            .nth(1)
            .map(|s| {
                s.lines()
                    .skip(1) // the rest of the `Commands:` line
                    .take_while(|l| !l.trim().is_empty())
                    .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                    .filter(|c| c != "help")
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut commands: Vec<Vec<String>> = vec![vec![]];
    for c in subcommands(&[]) {
        for sub in subcommands(&[c.as_str()]) {
            commands.push(vec![c.clone(), sub]);
        }
        commands.push(vec![c]);
    }
    assert!(commands.len() > 10, "{commands:?}");
    let mut checked = 0;
    for cmd in &commands {
        let args: Vec<&str> = cmd.iter().map(String::as_str).chain(["--help"]).collect();
        let r = p.kiln(&args);
        assert_eq!(r.code, 0, "{cmd:?}: {}", r.stderr);
        for line in r.stdout.lines() {
            let item = line.trim_start();
            if item.starts_with('-') || item.starts_with('<') {
                let parts: Vec<&str> = item.split("  ").map(str::trim).filter(|s| !s.is_empty()).collect();
                assert!(parts.len() >= 2, "`kiln {}` has an undescribed `{}`", cmd.join(" "), item.trim());
                checked += 1;
            }
        }
    }
    assert!(checked > 40, "only {checked} flags seen");
}

/// Issue 18: completion scripts and man pages come from the same definitions as `--help`.
#[test]
fn completions_and_man_pages_cover_every_command() {
    let p = Project::new();
    let bash = p.kiln(&["completions", "bash"]);
    assert_eq!(bash.code, 0, "{}", bash.stderr);
    assert!(bash.stdout.contains("_kiln()") && bash.stdout.contains("--no-cache"), "{}", bash.stdout);
    for shell in ["zsh", "fish"] {
        let r = p.kiln(&["completions", shell]);
        assert_eq!(r.code, 0, "{shell}: {}", r.stderr);
        assert!(r.stdout.contains("cache-dir"), "{shell}");
    }
    assert_eq!(p.kiln(&["completions", "tcsh"]).code, 2);
    let man = p.kiln(&["man"]);
    assert_eq!(man.code, 0, "{}", man.stderr);
    assert!(man.stdout.contains(".TH kiln 1") && man.stdout.contains("verify"), "{}", man.stdout);
    let r = p.kiln(&["man", "--dir", "pages"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let build = std::fs::read_to_string(p.path("pages/kiln-build.1")).unwrap();
    assert!(build.contains("no\\-cache") || build.contains("no-cache"), "{build}");
    assert!(p.path("pages/kiln-cache-prune.1").exists());
}

/// Issue 18: an image that is not there is bad input (exit 2), as the README's table says.
#[test]
fn inspect_and_diff_of_a_missing_image_exit_2() {
    let p = Project::new();
    for args in [
        vec!["inspect", "oci:no-such-layout"],
        vec!["inspect", "oci-archive:no-such.tar"],
        vec!["inspect", "docker-archive:no-such.tar"],
        vec!["diff", "oci:no-such-a", "oci:no-such-b"],
        vec!["sbom", "oci:no-such-layout"],
    ] {
        let r = p.kiln(&args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("no-such"), "{args:?}: {}", r.stderr);
    }
}
