//! The binary under fuzzed recipes (issue 13): whatever the recipe holds,
//! `kiln plan` answers 0 or refuses with exit 2 and a location; it never
//! panics, in the parser or in the renderer of its errors. Bounded for CI
//! (`KILN_FUZZ_CASES`, default 256 cases here too).

use crate::support::*;

const VALID: &str = "[image]\nname = \"hello\"\nepoch = 5\n\n[[step]]\nwrite = \"/etc/motd\"\ncontent = \"hi\"\nmode = \"0644\"\n\n[[step]]\nrun = \"echo hi\"\nenv = { LANG = \"C.UTF-8\" }\n\n[config]\nentrypoint = [\"/bin/sh\"]\nlabels = { a = \"b\" }\nstop_signal = \"SIGTERM\"\n";

const HOSTILE: &[&str] = &[
    "\"\"",
    "\"/\"",
    "\"../../etc/passwd\"",
    "\"\\u0000\"",
    "-1",
    "253402300800",
    "1e309",
    "[]",
    "{}",
    "[[]]",
    "\"stage:nope\"",
    "\"oci:/etc\"",
    "\"docker-archive:/etc/shadow\"",
    "\"SIGFOO\"",
    "\"0999\"",
    "\"\u{202e}\u{1b}[31m\"",
];

#[test]
fn fuzzed_recipes_are_planned_or_refused_with_exit_2_never_a_crash() {
    let cases: usize = std::env::var("KILN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
    let p = Project::new();
    let lines: Vec<&str> = VALID.lines().collect();
    let mut refused = 0;
    for case in 0..cases {
        let r = noise(case as u64 + 1, 8);
        let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        let i = r[0] as usize % out.len();
        let value = match r[1] % 4 {
            0 => format!("\"{}\"", "y".repeat(60_000 + r[2] as usize * 100)),
            1 => String::from_utf8_lossy(&noise(case as u64 + 99, 1 + r[3] as usize % 64)).into_owned(),
            _ => HOSTILE[r[2] as usize % HOSTILE.len()].to_string(),
        };
        out[i] = match out[i].split_once(" = ") {
            Some((k, _)) if !r[4].is_multiple_of(5) => format!("{k} = {value}"),
            _ => value,
        };
        p.recipe(&out.join("\n"));
        let run = p.kiln(&["plan", "kiln.toml"]);
        assert!(
            run.code == 0 || run.code == 2,
            "case {case}: exit {} for\n{}\n{}",
            run.code,
            out.join("\n").chars().take(2000).collect::<String>(),
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "case {case}: {}", run.stderr);
        if run.code == 2 {
            refused += 1;
            assert!(
                run.stderr.contains("kiln.toml"),
                "case {case}: a refusal names the recipe: {}",
                run.stderr
            );
        }
    }
    assert!(refused > cases / 4, "the fuzzer reaches the refusals ({refused} of {cases})");
}
