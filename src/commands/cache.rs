//! `kiln cache du|ls|prune|gc`: the store's size, records, eviction and collection.

use std::io::Write;
use std::path::PathBuf;

use kiln_builder::BuildError;
use kiln_cache::prune::parse_size;

use super::common::open_store;
use crate::args::CacheAction;

pub(super) fn run(action: CacheAction, cache_dir: Option<PathBuf>) -> Result<u8, BuildError> {
    let store = open_store(cache_dir)?;
    let mut out = std::io::stdout().lock();
    match action {
        CacheAction::Du { json } => {
            let u = store.usage()?;
            if json {
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&u).expect("json"));
            } else {
                let _ = writeln!(
                    out,
                    "{}\t{} blobs\t{} steps\t{} images\t{} bases\t{} debs\t{} disks\t{} unpacked ({})\t{} cache mounts ({})\t{}",
                    human(u.blob_bytes),
                    u.blobs,
                    u.steps,
                    u.images,
                    u.bases,
                    u.debs,
                    u.disks,
                    u.unpacked,
                    human(u.unpacked_bytes),
                    u.mounts,
                    human(u.mount_bytes),
                    u.root.display()
                );
            }
        }
        CacheAction::Ls { json } => {
            let entries = store.entries()?;
            let mounts = store.cache_mounts()?;
            if json {
                // One list: the records, then the cache mounts (`kind` "mount", `name` its id).
                let mut v = serde_json::to_value(&entries).expect("json");
                let list = v.as_array_mut().expect("a list");
                for m in &mounts {
                    list.push(serde_json::json!({"kind": "mount", "name": m.id, "used_unix": m.used_unix,
                        "label": format!("{} in {} files", human(m.bytes), m.files), "bytes": m.bytes, "files": m.files}));
                }
                let _ = writeln!(out, "{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                // (last use, kind, name, what); a mount's id is the recipe's text,
                // shown escaped so it cannot drive the terminal.
                let mut rows: Vec<(u64, String, String, String)> =
                    entries.into_iter().map(|e| (e.used_unix, e.kind.to_string(), e.name, e.label)).collect();
                rows.extend(mounts.into_iter().map(|m| {
                    (
                        m.used_unix,
                        "mount".into(),
                        m.id.escape_debug().to_string(),
                        format!("{} in {} files", human(m.bytes), m.files),
                    )
                }));
                let kind_w = rows.iter().map(|r| r.1.len()).max().unwrap_or(0).max(4);
                let name_w = rows.iter().map(|r| r.2.chars().count()).max().unwrap_or(0).max(4);
                let _ = writeln!(
                    out,
                    "{:<19}  {:<kind_w$}  {:<name_w$}  WHAT",
                    "LAST USED (UTC)", "KIND", "NAME"
                );
                for (used, kind, name, what) in rows {
                    let when =
                        kiln_builder::rfc3339(used).replace('T', " ").trim_end_matches('Z').to_string();
                    let _ = writeln!(out, "{when:<19}  {kind:<kind_w$}  {name:<name_w$}  {what}");
                }
            }
        }
        CacheAction::Prune { remote: Some(remote), older_than, insecure, .. } => {
            let age = older_than.unwrap_or_default();
            let days = parse_days(&age).ok_or_else(|| {
                BuildError::usage(
                    format!("`{}` is not a number of days", kiln_builder::shown(&age)),
                    Some("write it as `30d` (at least `1d`: a step's last use is recorded once a day)"),
                )
            })?;
            let r = kiln_builder::gc::prune_remote(&store, &remote, days * 86_400, insecure)?;
            let _ = writeln!(
                out,
                "kept {} step(s), removed {} not used within {days} day(s); {} writer tag(s) compacted into {} ({})",
                r.kept, r.removed, r.writer_tags_deleted, r.reference, r.index
            );
        }
        CacheAction::Prune { max_size: None, .. } => {
            return Err(BuildError::usage(
                "`kiln cache prune` needs what to prune",
                Some("`--max-size SIZE` for this machine's cache, or `--remote registry:REF --older-than 30d` for a registry cache"),
            ));
        }
        CacheAction::Prune { max_size: Some(max_size), .. } => {
            let max = parse_size(&max_size).ok_or_else(|| {
                BuildError::usage(
                    format!("`{max_size}` is not a size"),
                    Some("write sizes like `500M`, `2G` or `1048576`"),
                )
            })?;
            kiln_builder::gc::prune(&store, max, &wait_note, &mut |r| print_prune(&mut out, r))?;
        }
        CacheAction::Gc => {
            let swept = kiln_builder::gc::gc(&store, &wait_note, &mut |r| print_prune(&mut out, r))?;
            if swept > 0 {
                eprintln!("kiln cache: removed {swept} secret folder(s) a killed kiln left");
            }
        }
    }
    Ok(0)
}

/// `--older-than` as days: `Nd`, N at least 1 (a step's last use is
/// recorded at most once a day, so a shorter age would drop steps in use).
fn parse_days(text: &str) -> Option<u64> {
    let n: u64 = text.strip_suffix('d')?.parse().ok()?;
    ((1..=100_000).contains(&n) && text.bytes().next().is_some_and(|b| b.is_ascii_digit())).then_some(n)
}

/// What prune and gc say while builds hold the store.
fn wait_note() {
    eprintln!("kiln cache: waiting for the running build(s) on this cache to finish");
}

fn print_prune(out: &mut impl Write, r: &kiln_cache::PruneReport) {
    let _ = writeln!(
        out,
        "removed {} blobs ({}), {} records, {} cache mounts; {} left",
        r.removed_blobs,
        human(r.removed_bytes),
        r.removed_records,
        r.removed_mounts,
        human(r.remaining_bytes)
    );
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_are_whole_days() {
        assert_eq!(super::parse_days("30d"), Some(30));
        assert_eq!(super::parse_days("1d"), Some(1));
        for bad in ["", "d", "0d", "30", "12h", "3x", "-1d", "+1d", " 30d", "1.5d", "99999999999999999999d"] {
            assert_eq!(super::parse_days(bad), None, "{bad}");
        }
    }
}
