//! Crash safety and concurrency on one store.

use std::process::Stdio;
use std::time::Duration;

use crate::support::*;

/// ~150 MB over 300 files, half noise, half text.
fn big_project() -> Project {
    let p = Project::new();
    p.recipe("[image]\nname = \"big\"\n[[step]]\ncopy = \"data\"\nto = \"/data\"\n[[step]]\nwrite = \"/done\"\ncontent = \"ok\"\n");
    for i in 0..300u64 {
        let body =
            if i % 2 == 0 { noise(i, 500_000) } else { format!("line {i}\n").repeat(60_000).into_bytes() };
        p.file(&format!("data/d{}/f{i}", i % 10), body);
    }
    p
}

#[test]
fn kill_dash_nine_at_any_point_leaves_a_usable_store() {
    let p = big_project();
    // The clean digest, from a separate cache.
    let clean = p.kiln_with(&["build", "kiln.toml", "-o", "oci:clean"], |c| {
        c.env("KILN_CACHE_DIR", p.path("clean-cache"));
    });
    let clean = clean.digest();
    for delay_ms in [30u64, 150, 400, 800, 1500] {
        let mut child = p
            .command(&["build", "kiln.toml", "-o", "oci:out"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
    }
    let r = p.build(&[]);
    assert_eq!(r.digest(), clean, "{}", r.stderr);
    assert_layout_blobs_valid(&p.path("out"));
    // gc cleans what the killed builds left in tmp/.
    assert_eq!(p.kiln(&["cache", "gc"]).code, 0);
    assert_eq!(std::fs::read_dir(p.cache.join("v1/tmp")).unwrap().count(), 0);
    assert_eq!(p.build(&[]).digest(), clean);
}

#[test]
fn three_builds_at_once_on_an_empty_cache_agree() {
    let p = big_project();
    let children: Vec<_> = (0..3)
        .map(|i| {
            p.command(&["build", "kiln.toml", "-o", &format!("oci:out{i}")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let digests: Vec<String> =
        children.into_iter().map(|c| Run::from(c.wait_with_output().unwrap()).digest()).collect();
    assert_eq!(digests[0], digests[1]);
    assert_eq!(digests[1], digests[2]);
    for i in 0..3 {
        assert_layout_blobs_valid(&p.path(&format!("out{i}")));
    }
}
