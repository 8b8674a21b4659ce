//! Step keys (design §4): each step's key from its parent's key, the
//! platform, the epoch and what the step reads, computed before anything is
//! built (`kiln plan` shows them); no I/O but hashing the context's files
//! through the stat index.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;

use kiln_cache::{Digest, StatIndex};
use kiln_recipes::recipe::Platform;
use kiln_recipes::{Recipe, RunStep, Step, StepKind};

use super::model::Built;
use crate::context::{scan_copy, Context, CopySource};
use crate::error::BuildError;
use crate::exec;
use crate::packages::lockfile::PackageLock;

/// Bump when anything that decides a layer's bytes changes, so old cache
/// entries are never taken for new ones.
pub(crate) const KEY_SCHEMA: u32 = 3;

/// What a step needs to write its layer on a miss.
pub(super) enum Prepared {
    Copy(CopySource),
    CopyFrom(Arc<Built>),
    Write,
    Run(RunPlan),
    Packages(Box<PackageLock>),
    Configure(Box<ConfigurePlan>),
}

/// The packages' maintainer scripts: the lock names the packages, the
/// environment is in the key; the driver is made from the packages'
/// layer's dpkg status when it runs.
pub(super) struct ConfigurePlan {
    pub(super) lock: PackageLock,
    pub(super) env: Vec<String>,
    /// The packages' `/var/lib/dpkg/status` when the step before made it
    /// in this build (else it is read back from the layer).
    pub(super) status: Option<String>,
}

/// A `run` step resolved against its image's config; all of it is in the key.
pub(super) struct RunPlan {
    pub(super) argv: Vec<String>,
    pub(super) env: Vec<String>,
    pub(super) user: String,
    pub(super) workdir: String,
}

/// What keys are computed from: the recipe, its context, and the build's
/// platform and epoch.
pub(super) struct Planner<'a> {
    pub(super) recipe: &'a Recipe,
    pub(super) ctx: &'a Context,
    pub(super) index: &'a Mutex<StatIndex>,
    pub(super) locks: &'a Mutex<HashMap<Option<String>, PackageLock>>,
    pub(super) platform: &'a Platform,
    pub(super) epoch: u64,
}

impl Planner<'_> {
    /// The packages' section of kiln.lock, read and checked once a build.
    fn lock(&self, p: &kiln_recipes::recipe::Packages) -> Result<PackageLock, BuildError> {
        let mut locks = self.locks.lock().expect("locks");
        if let Some(l) = locks.get(&p.stage) {
            return Ok(l.clone());
        }
        let lock = crate::packages::load_lock(self.recipe, p, self.platform)?;
        locks.insert(p.stage.clone(), lock.clone());
        Ok(lock)
    }

    /// The step's key, and what making its layer needs.
    pub(super) fn key(
        &self,
        parent: &str,
        step: &Step,
        run_config: &oci_spec::image::Config,
        done: &HashMap<String, Arc<Built>>,
    ) -> Result<(Digest, Prepared), BuildError> {
        let (params, prepared) = match &step.kind {
            StepKind::Copy(c) => match &c.from {
                None => {
                    let src = {
                        let mut index = self.index.lock().expect("index");
                        scan_copy(self.ctx, self.recipe, c, &mut index)?
                    };
                    let p = json!({
                        "copy": c.src, "to": c.to, "to_is_dir": c.to_is_dir,
                        "owner": c.owner.to_string(), "mode": c.mode.map(|m| m.to_string()),
                        "inputs": src.inputs.to_string(),
                    });
                    (p, Prepared::Copy(src))
                }
                Some(stage) => {
                    let built = done[stage].clone();
                    let p = json!({
                        "copy": c.src, "from": stage, "stage": built.id, "to": c.to, "to_is_dir": c.to_is_dir,
                        "owner": c.owner.to_string(), "mode": c.mode.map(|m| m.to_string()),
                    });
                    (p, Prepared::CopyFrom(built))
                }
            },
            StepKind::Write(w) => {
                let p = json!({
                    "write": w.path, "content": Digest::of(w.content.as_bytes()).to_string(),
                    "owner": w.owner.to_string(), "mode": w.mode.to_string(),
                });
                (p, Prepared::Write)
            }
            StepKind::Packages(p) => {
                let lock = self.lock(p)?;
                (
                    json!({ "packages": crate::packages::key_params(&lock) }),
                    Prepared::Packages(Box::new(lock)),
                )
            }
            StepKind::Configure(p) => {
                // The parent's key holds the packages; what the driver
                // adds is its schema and the image's environment.
                let lock = self.lock(p)?;
                let env = exec::command_env(
                    &run_config.env().clone().unwrap_or_default(),
                    &crate::packages::configure::environment(&lock, self.epoch),
                );
                (
                    json!({ "configure": crate::packages::configure::fingerprint(), "env": env }),
                    Prepared::Configure(Box::new(ConfigurePlan { lock, env, status: None })),
                )
            }
            StepKind::Run(r) => {
                let plan = run_plan(r, run_config, self.epoch);
                let mut p = json!({
                    "run": plan.argv, "env": plan.env, "user": plan.user, "workdir": plan.workdir,
                    "network": r.network, "secrets": r.secrets.iter().map(|s| &s.id).collect::<Vec<_>>(),
                });
                // A secret's owner and mode, where the recipe gives them (what the
                // command can read); absent otherwise, so keys stay as they were.
                if r.secrets.iter().any(|s| !s.is_plain()) {
                    p["secret_files"] = r
                        .secrets
                        .iter()
                        .map(|s| json!({"id": s.id, "uid": s.uid, "gid": s.gid, "mode": s.mode}))
                        .collect();
                }
                // The mounts (where, which, how shared), never what they hold; absent
                // when there are none, so keys of steps without them stay as they were.
                if !r.cache.is_empty() {
                    p["cache"] = r
                        .cache
                        .iter()
                        .map(|m| json!({"target": m.target, "id": m.id, "sharing": m.sharing.as_str()}))
                        .collect();
                }
                (p, Prepared::Run(plan))
            }
        };
        let doc = json!({
            "schema": KEY_SCHEMA, "parent": parent, "platform": self.platform.to_string(),
            "epoch": self.epoch, "step": params,
        });
        Ok((Digest::of(&serde_json::to_vec(&doc).expect("json")), prepared))
    }
}

/// A `run` step against its image's runtime config: the engine's view of
/// env, user and working folder, which both backends are given as is.
/// The command also gets `SOURCE_DATE_EPOCH` (the build's epoch), which
/// tools that write timestamps (pip's `.pyc` files, gzip, tar, man-db)
/// use instead of the clock, as in Debian's package builds; a value the
/// image or the step sets wins. It is in the key (as the epoch already
/// was), and never in the image's config.
pub(super) fn run_plan(r: &RunStep, config: &oci_spec::image::Config, epoch: u64) -> RunPlan {
    let image_env = config.env().clone().unwrap_or_default();
    let user = r
        .user
        .clone()
        .or_else(|| config.user().clone())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "0".into());
    let workdir = r
        .workdir
        .clone()
        .or_else(|| config.working_dir().clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    let mut env = exec::command_env(&image_env, &r.env);
    if !env.iter().any(|e| e.starts_with("SOURCE_DATE_EPOCH=")) {
        env.push(format!("SOURCE_DATE_EPOCH={epoch}"));
    }
    RunPlan { argv: r.command.argv(), env, user, workdir }
}
