use std::fs;
use std::time::{Duration, SystemTime};

use crate::support::*;

const RECIPE: &str = r#"
[image]
name = "cached"

[[step]]
copy = "one"
to = "/one"

[[step]]
copy = "two"
to = "/two"

[[step]]
write = "/three"
content = "3"
"#;

fn project() -> Project {
    let p = Project::new();
    p.recipe(RECIPE);
    for i in 0..20 {
        p.file(&format!("one/f{i}"), format!("one {i}"));
        p.file(&format!("two/f{i}"), format!("two {i}"));
    }
    p
}

#[test]
fn a_second_build_hits_every_step_and_writes_no_layer() {
    let p = project();
    let first = p.build(&[]);
    let d = first.digest();
    assert_eq!(first.cached(), vec![false, false, false]);
    let second = p.build(&[]);
    assert_eq!(second.digest(), d);
    assert_eq!(second.cached(), vec![true, true, true]);
    assert_eq!(second.count("layer_written"), 0, "no layer rewritten");
}

#[test]
fn touching_mtime_keeps_hits_and_changing_content_misses_from_there() {
    let p = project();
    let d = p.build(&[]).digest();
    let later = SystemTime::now() + Duration::from_secs(3600);
    fs::File::options().write(true).open(p.path("one/f3")).unwrap().set_modified(later).unwrap();
    let r = p.build(&[]);
    assert_eq!(r.digest(), d, "mtime is not content");
    assert_eq!(r.cached(), vec![true, true, true]);

    p.file("two/f7", "changed");
    let r = p.build(&[]);
    assert_ne!(r.digest(), d);
    assert_eq!(r.cached(), vec![true, false, false], "only the changed copy and what follows miss");
}

#[test]
fn a_corrupt_cached_blob_is_detected_rebuilt_and_never_exported() {
    let p = project();
    let d = p.build(&[]).digest();
    // Flip a byte in every cached layer blob (the big ones).
    let blobs = p.cache.join("v1/blobs/sha256");
    let mut flipped = 0;
    for e in fs::read_dir(&blobs).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = fs::read(&path).unwrap();
        if bytes.len() < 100 || bytes[0] != 0x1f {
            continue; // configs and manifests
        }
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
        fs::write(&path, bytes).unwrap();
        flipped += 1;
    }
    assert!(flipped >= 2);
    fs::remove_dir_all(p.path("out")).unwrap();
    let r = p.build(&[]);
    assert_eq!(r.digest(), d, "rebuilt to the same digest");
    assert!(r.count("layer_written") >= 2, "corrupt layers were rebuilt: {}", r.stderr);
    assert_layout_blobs_valid(&p.path("out"));
}

#[test]
fn no_cache_rebuilds_to_the_same_digest() {
    let p = project();
    let d = p.build(&[]).digest();
    let r = p.build(&["--no-cache"]);
    assert_eq!(r.digest(), d);
    assert_eq!(r.count("layer_written"), 3);
}
