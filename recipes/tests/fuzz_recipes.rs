//! Fuzzing the recipe parser (issue 13): arbitrary text, and valid recipes
//! with pieces replaced by hostile ones. The parser never panics; what it
//! refuses it refuses with a located error. Bounded for CI
//! (`KILN_FUZZ_CASES`, default 256); `make fuzz` runs many more.

use std::path::Path;

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

const VALID: &str = r#"[image]
name = "hello"
base = "scratch"
epoch = 5
platform = "linux/amd64"

[[stage]]
name = "build"

[[stage.step]]
write = "/out/app"
content = "x"
mode = "0755"

[[step]]
copy = "/out/app"
from = "build"
to = "/app/"
owner = "1000:1000"

[[step]]
run = ["/bin/sh", "-c", "echo hi"]
env = { LANG = "C.UTF-8" }
secrets = ["tok"]
user = "1000"
workdir = "/app"

[config]
entrypoint = ["/app/app"]
env = { A = "1" }
labels = { "org.opencontainers.image.title" = "hello" }
ports = ["8080/tcp"]
volumes = ["/data"]
stop_signal = "SIGTERM"
"#;

/// Values a hostile recipe puts where a valid one has its own.
fn hostile_value() -> impl Strategy<Value = String> {
    let fixed = prop::sample::select(vec![
        "\"\"",
        "\"/\"",
        "\"../../etc/passwd\"",
        "\"/a/../../b\"",
        "\"\\u0000\"",
        "-1",
        "9223372036854775807",
        "253402300800",
        "1e309",
        "[]",
        "{}",
        "[[]]",
        "true",
        "\"stage:build\"",
        "\"stage:nope\"",
        "\"oci:/etc\"",
        "\"registry:\"",
        "\"SIGFOO\"",
        "\"0999\"",
        "\"linux/arm64/v8/x\"",
        "{ \"A\\u0000\" = \"1\" }",
    ])
    .prop_map(String::from);
    prop_oneof![
        3 => fixed,
        1 => ".{0,40}".prop_map(|s| format!("{s:?}")),
        1 => (1usize..5000).prop_map(|n| format!("\"/{}\"", "a".repeat(n))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = kiln_recipes::parse_str("kiln.toml", text, Path::new("."));
    }

    #[test]
    fn arbitrary_bytes_as_text_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = kiln_recipes::parse_str("kiln.toml", String::from_utf8_lossy(&bytes).into_owned(), Path::new("."));
    }

    #[test]
    fn a_valid_recipe_with_a_hostile_value_is_parsed_or_refused_at_a_place(
        line in any::<prop::sample::Index>(),
        value in hostile_value(),
    ) {
        let lines: Vec<&str> = VALID.lines().collect();
        let i = line.index(lines.len());
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        out[i] = match lines[i].split_once(" = ") {
            Some((key, _)) => format!("{key} = {value}"),
            None => value,
        };
        if let Err(e) = kiln_recipes::parse_str("kiln.toml", out.join("\n"), Path::new(".")) {
            prop_assert!(e.location().starts_with("kiln.toml"), "{}", e);
        }
    }
}
