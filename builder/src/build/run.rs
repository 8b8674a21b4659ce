//! A `run` step on the chosen executor: its secrets looked up, its request
//! made, its output masked and cut before anything shows it, and a failed
//! command turned into the error that names the step.

use std::sync::Arc;

use oci_spec::image::ImageConfiguration;

use kiln_cache::Store;
use kiln_recipes::recipe::Platform;
use kiln_recipes::{Recipe, RunStep, Step};

use crate::changes::Change;
use crate::error::BuildError;
use crate::exec::{self, Executor, RunRequest, RunResult};
use crate::fstree::FsTree;
use crate::image::ImageLayer;
use crate::reporter::{Reporter, StepInfo};

use super::keys::{ConfigurePlan, RunPlan};
use super::model::step_label;

/// Where a `run` step runs and what it may read.
pub(super) struct RunEnv<'a> {
    pub(super) recipe: &'a Recipe,
    pub(super) store: &'a Store,
    pub(super) platform: &'a Platform,
    /// The executor, connected only once the step's own checks passed.
    pub(super) executor: &'a dyn Fn() -> Result<Arc<dyn Executor>, BuildError>,
    pub(super) reporter: &'a dyn Reporter,
    /// Every secret given to the build (`--secret`); a step gets those it names.
    pub(super) secrets: &'a [(String, Vec<u8>)],
    /// `--step-timeout`: the limit of a step that sets none.
    pub(super) step_timeout: Option<std::time::Duration>,
}

/// The parent image a step runs on.
pub(super) struct Parent<'a> {
    pub(super) layers: &'a [ImageLayer],
    pub(super) tree: &'a FsTree,
    pub(super) config: &'a ImageConfiguration,
}

/// Runs the command; its changes, and what must live until they are written.
pub(super) fn run_step(
    env: &RunEnv<'_>,
    step: &Step,
    info: &StepInfo,
    run: &RunStep,
    plan: RunPlan,
    parent: Parent<'_>,
) -> Result<(Vec<Change>, Box<dyn std::any::Any + Send>), BuildError> {
    let secrets = step_secrets(env, step, run, &plan.user, &parent)?;
    exec::check_platform(env.platform)?;
    // Held until the command is done: a `locked` mount's lock, a private instance.
    let (cache_mounts, _leases) = take_cache_mounts(env, step, run, &plan.user, &parent)?;
    let req = RunRequest {
        argv: plan.argv.clone(),
        env: plan.env,
        user: plan.user,
        workdir: plan.workdir,
        network: run.network,
        secrets: &secrets,
        cache_mounts: &cache_mounts,
        timeout: run.timeout.or(env.step_timeout),
        layers: parent.layers,
        tree: parent.tree,
        config: parent.config,
    };
    let values: Vec<&[u8]> = secrets.iter().map(|s| s.value.as_slice()).filter(|v| !v.is_empty()).collect();
    let mut on_line = |line: &str| env.reporter.on_step_output(info, &exec::cut_line(redact(line, &values)));
    let limit = req.timeout;
    let executor = (env.executor)()?;
    let result = executor.run(env.store, &req, &mut on_line)?;
    let (location, step, command) =
        (format!("{}:{}", env.recipe.file.display(), info.line), step_label(info), run.command.text());
    let shown = |tail: Vec<String>| tail.iter().map(|l| exec::cut_line(redact(l, &values))).collect();
    match result {
        RunResult::Changed { changes, keep } => Ok((changes, keep)),
        RunResult::TimedOut { tail } => Err(BuildError::TimedOut {
            location,
            step,
            command,
            limit: limit.map(show_duration).unwrap_or_default(),
            tail: shown(tail),
        }),
        RunResult::Failed { code, tail } => {
            let note = executor.failure_note(&tail);
            Err(BuildError::CommandFailed { location, step, command, code, tail: shown(tail), note })
        }
    }
}

/// The step's cache mounts from the store, each checked against the image
/// (its target and the folders above it are folders or absent there, never a
/// symlink or a file), and, for one just made, the numeric owner the step's
/// user has in the image.
fn take_cache_mounts(
    env: &RunEnv<'_>,
    step: &Step,
    run: &RunStep,
    user: &str,
    parent: &Parent<'_>,
) -> Result<(Vec<exec::CacheMountRequest>, Vec<kiln_cache::MountLease>), BuildError> {
    let mut mounts = Vec::new();
    let mut leases = Vec::new();
    // Taken in the order of their ids, so two steps that lock the same two
    // caches never wait for each other.
    let mut order: Vec<&kiln_recipes::CacheMount> = run.cache.iter().collect();
    order.sort_by(|a, b| a.id.cmp(&b.id));
    for m in order {
        let rel = m.target.trim_start_matches('/');
        let mut at = String::new();
        for part in rel.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            match parent.tree.kind(&at)? {
                None => break,
                Some(crate::listing::Kind::Dir) => {}
                Some(_) => {
                    return Err(env
                        .recipe
                        .error_at(step.span.clone(), format!("the cache mount `{}` would cover `/{at}`, which is not a folder in the image", m.target))
                        .with_hint("mount the cache on a folder (or a path the image does not have); a symlink on the way is not followed")
                        .into())
                }
            }
        }
        let how = match m.sharing {
            kiln_recipes::Sharing::Shared => kiln_cache::Take::Shared,
            kiln_recipes::Sharing::Locked => kiln_cache::Take::Locked,
            kiln_recipes::Sharing::Private => kiln_cache::Take::Private,
        };
        let waiting = || {
            env.reporter.on_notice(&format!(
                "waiting for the cache mount `{}`, which another step holds",
                m.id.escape_debug()
            ))
        };
        let lease = env.store.take_mount(&m.id, how, &waiting)?;
        let owner = if lease.fresh { Some(mount_owner(env, step, user, parent)?) } else { None };
        mounts.push(exec::CacheMountRequest { target: rel.to_string(), host: lease.data.clone(), owner });
        leases.push(lease);
    }
    Ok((mounts, leases))
}

/// The step's user as numbers, from the image's /etc/passwd and /etc/group
/// unless it is written `UID:GID` (as the sandbox resolves it).
fn mount_owner(
    env: &RunEnv<'_>,
    step: &Step,
    user: &str,
    parent: &Parent<'_>,
) -> Result<(u32, u32), BuildError> {
    if let Some((u, g)) = user.split_once(':') {
        if let (Ok(uid), Ok(gid)) = (u.parse::<u32>(), g.parse::<u32>()) {
            return Ok((uid, gid));
        }
    }
    let (passwd, group) = account_files(env, parent)?;
    let found =
        kiln_oci::passwd::resolve_user_in(user, &passwd, &group).map_err(|why| {
            BuildError::from(env.recipe.error_at(step.span.clone(), why).with_hint(
                "use numeric ids, e.g. `user = \"1000:1000\"`, or add the user in an earlier step",
            ))
        })?;
    Ok((found.uid, found.gid))
}

/// The image's /etc/passwd and /etc/group (empty when missing or over 1 MiB),
/// read in one pass over the layers.
fn account_files(env: &RunEnv<'_>, parent: &Parent<'_>) -> Result<(String, String), BuildError> {
    let mut wanted = Vec::new();
    for path in ["etc/passwd", "etc/group"] {
        if let Some(crate::listing::Kind::File { size, .. }) = parent.tree.kind(path)? {
            if size <= 1 << 20 {
                wanted.push(path.to_string());
            }
        }
    }
    let mut files = crate::extract::read_files(env.store, parent.layers, parent.tree, &wanted)?;
    let mut text = |p: &str| String::from_utf8_lossy(&files.remove(p).unwrap_or_default()).into_owned();
    Ok((text("etc/passwd"), text("etc/group")))
}

/// The packages' maintainer scripts (the step after `[packages]`): the
/// driver made from the packages' dpkg status, run like a `run` step, as
/// root in `/` with the network off. A failure names the script as dpkg
/// would have run it.
pub(super) fn configure_step(
    env: &RunEnv<'_>,
    step: &Step,
    info: &StepInfo,
    plan: ConfigurePlan,
    parent: Parent<'_>,
) -> Result<(Vec<Change>, Box<dyn std::any::Any + Send>), BuildError> {
    let has = |p: &str| parent.tree.get(p).map(|e| e.is_some());
    if !(has("bin/sh")? || has("usr/bin/sh")?) {
        return Err(env
            .recipe
            .error_at(step.span.clone(), "the packages' maintainer scripts need /bin/sh, and the image has none")
            .with_hint("keep `dash` (an Essential package) out of `exclude`, or set `scripts = false` for an image without a shell")
            .into());
    }
    let status = match plan.status {
        Some(s) => s,
        None => {
            // The packages' layer came from the cache: read it back (all of
            // it is decompressed to reach /var, so not when it was just made).
            let started = std::time::Instant::now();
            let b = crate::extract::read_file(env.store, parent.layers, parent.tree, "var/lib/dpkg/status")?;
            tracing::debug!(elapsed = ?started.elapsed(), "the packages' dpkg status read back");
            String::from_utf8_lossy(b.as_deref().unwrap_or_default()).into_owned()
        }
    };
    let driver = crate::packages::configure::driver(&status, &plan.lock)?;
    let run = RunStep {
        command: kiln_recipes::Command::Exec(driver.argv.clone()),
        env: Default::default(),
        network: false,
        secrets: Vec::new(),
        user: Some("0".into()),
        workdir: Some("/".into()),
        timeout: None, // `--step-timeout` applies, as to any step without its own
        cache: Vec::new(),
    };
    let rp = RunPlan { argv: driver.argv, env: plan.env, user: "0".into(), workdir: "/".into() };
    run_step(env, step, info, &run, rp, parent).map_err(|e| match e {
        BuildError::CommandFailed { location, step, code, tail, note, .. } => BuildError::CommandFailed {
            location,
            step,
            command: crate::packages::configure::failed(&tail, &driver.order)
                .unwrap_or_else(|| "the packages' maintainer scripts".into()),
            code,
            tail,
            note,
        },
        e => e,
    })
}

/// A time limit as a recipe would write it (`90s`, `10m`, `1h30m`, `250ms`).
fn show_duration(d: std::time::Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let (h, m, s) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    out
}

/// The secrets the step names, each of which must have been given, owned
/// by the step's user (or as the recipe says) and 0400 unless it says
/// otherwise: BuildKit's `--mount=type=secret,uid=,gid=,mode=`.
fn step_secrets(
    env: &RunEnv<'_>,
    step: &Step,
    run: &RunStep,
    user: &str,
    parent: &Parent<'_>,
) -> Result<Vec<exec::SecretFile>, BuildError> {
    let mut out = Vec::new();
    let mut owner: Option<(u32, u32)> = None;
    for s in &run.secrets {
        let id = &s.id;
        let Some((_, v)) = env.secrets.iter().find(|(i, _)| i == id) else {
            return Err(env
                .recipe
                .error_at(
                    step.span.clone(),
                    format!("this step needs the secret `{id}`, which was not given"),
                )
                .with_hint(format!(
                    "pass it with `--secret id={id},src=FILE` or `--secret id={id},env=VARIABLE`"
                ))
                .into());
        };
        let (uid, gid) = match (s.uid, s.gid) {
            (Some(u), Some(g)) => (u, g),
            _ => {
                let (u, g) = match owner {
                    Some(o) => o,
                    None => *owner.insert(step_owner(env, step, user, parent)?),
                };
                (s.uid.unwrap_or(u), s.gid.unwrap_or(g))
            }
        };
        out.push(exec::SecretFile {
            id: id.clone(),
            value: v.clone(),
            uid,
            gid,
            mode: s.mode.unwrap_or(0o400),
        });
    }
    Ok(out)
}

/// The numeric owner of what the step is given: root for root (no
/// /etc/passwd needed), else the step's user as [`mount_owner`] finds it.
fn step_owner(
    env: &RunEnv<'_>,
    step: &Step,
    user: &str,
    parent: &Parent<'_>,
) -> Result<(u32, u32), BuildError> {
    if matches!(user, "" | "root" | "0" | "0:0" | "root:root") {
        return Ok((0, 0));
    }
    mount_owner(env, step, user, parent)
}

/// Replaces secret values in a line of output. A line never holds more
/// than one line of a secret, so each line of a multi-line secret (a key, a
/// config file) is masked on its own; lines of fewer than 4 characters are
/// masked only when they are the whole secret (masking every `}` or `--`
/// of the output would hide it without protecting anything).
fn redact(line: &str, secrets: &[&[u8]]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for s in secrets {
        // Output is shown as lossy UTF-8: a secret that is not UTF-8 is
        // matched in the same form.
        let s = String::from_utf8_lossy(s);
        let whole = s.trim_end_matches(['\n', '\r']);
        if !whole.is_empty() && !whole.contains('\n') {
            parts.push(whole.to_string());
            continue;
        }
        parts.extend(whole.lines().map(|l| l.trim()).filter(|l| l.chars().count() >= 4).map(String::from));
    }
    // Longest first, so a part never leaves pieces of a longer one.
    parts.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut out = line.to_string();
    for p in parts {
        out = out.replace(&p, "[secret]");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{redact, show_duration};

    #[test]
    fn limits_are_shown_as_a_recipe_writes_them() {
        use std::time::Duration;
        for (d, shown) in
            [(1500, "1500ms"), (1000, "1s"), (90_000, "1m30s"), (5_400_000, "1h30m"), (3_600_000, "1h")]
        {
            assert_eq!(show_duration(Duration::from_millis(d)), shown);
            assert_eq!(kiln_recipes::recipe::parse_duration(shown), Some(Duration::from_millis(d)));
        }
    }

    #[test]
    fn every_line_of_a_multi_line_secret_is_masked() {
        let key = b"-----BEGIN KEY-----\nc2VjcmV0LWxpbmUtb25l\nc2Vjb25kLWxpbmU=\n-----END KEY-----\n";
        let secrets: Vec<&[u8]> = vec![key.as_slice(), b"hunter2\n", b"ab", b"S3cr\xe9tValue-42"];
        for line in ["c2VjcmV0LWxpbmUtb25l", "  x c2Vjb25kLWxpbmU= y", "pw=hunter2", "ab"] {
            let out = redact(line, &secrets);
            assert!(out.contains("[secret]"), "{line} -> {out}");
            for part in ["c2Vj", "hunter2"] {
                assert!(!out.contains(part), "{line} -> {out}");
            }
        }
        assert_eq!(redact("nothing here", &secrets), "nothing here");
        // A secret that is not UTF-8 is masked in the lossy form output takes.
        let lossy = String::from_utf8_lossy(b"x S3cr\xe9tValue-42 y").into_owned();
        assert_eq!(redact(&lossy, &secrets), "x [secret] y");
    }
}
