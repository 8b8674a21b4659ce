//! The recipe file exactly as written, as serde sees it. Every table denies
//! unknown keys, so a typo is an error with its place rather than a silent no-op.
//! Values whose checks need a good message (`run`, `mode`, `entrypoint`, ...)
//! are kept as [`toml::Value`] and checked in `parse.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRecipe {
    /// `[args]`: names and their default values (checked in `parse.rs`).
    pub(crate) args: Option<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
    pub(crate) image: Option<Spanned<RawImage>>,
    pub(crate) packages: Option<Spanned<RawPackages>>,
    #[serde(default, rename = "step")]
    pub(crate) steps: Vec<Spanned<RawStep>>,
    #[serde(default, rename = "stage")]
    pub(crate) stages: Vec<Spanned<RawStage>>,
    pub(crate) config: Option<Spanned<RawConfig>>,
    pub(crate) vm: Option<Spanned<RawVm>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawVm {
    pub(crate) size: Option<Spanned<toml::Value>>,
    pub(crate) filesystem: Option<Spanned<String>>,
    pub(crate) cmdline: Option<Spanned<String>>,
    pub(crate) boot: Option<Spanned<String>>,
    pub(crate) init: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawImage {
    pub(crate) name: Spanned<String>,
    pub(crate) base: Option<Spanned<String>>,
    pub(crate) epoch: Option<Spanned<i64>>,
    pub(crate) platform: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<Spanned<String>, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPackages {
    pub(crate) suite: Option<Spanned<String>>,
    pub(crate) suites: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    pub(crate) scripts: Option<Spanned<bool>>,
    #[serde(default)]
    pub(crate) include: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) exclude: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) components: Vec<Spanned<String>>,
    pub(crate) architecture: Option<Spanned<String>>,
    pub(crate) mirror: Option<Spanned<String>>,
    pub(crate) keyring: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStage {
    pub(crate) name: Spanned<String>,
    pub(crate) base: Option<Spanned<String>>,
    pub(crate) packages: Option<Spanned<RawPackages>>,
    #[serde(default, rename = "step")]
    pub(crate) steps: Vec<Spanned<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStep {
    pub(crate) copy: Option<Spanned<String>>,
    pub(crate) from: Option<Spanned<String>>,
    pub(crate) to: Option<Spanned<String>>,
    pub(crate) write: Option<Spanned<String>>,
    pub(crate) content: Option<Spanned<String>>,
    pub(crate) run: Option<Spanned<toml::Value>>,
    pub(crate) env: Option<Spanned<BTreeMap<String, String>>>,
    pub(crate) network: Option<Spanned<bool>>,
    /// Ids, or `{ id, uid, gid, mode }` tables (read in parse.rs).
    pub(crate) secrets: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    pub(crate) owner: Option<Spanned<String>>,
    pub(crate) mode: Option<Spanned<toml::Value>>,
    pub(crate) user: Option<Spanned<String>>,
    pub(crate) workdir: Option<Spanned<String>>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) exclude: Option<Spanned<Vec<Spanned<String>>>>,
    pub(crate) cache: Option<Spanned<Vec<Spanned<RawCacheMount>>>>,
}

/// `cache = [{ target = "/root/.cache/pip", id = "pip", sharing = "locked" }]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCacheMount {
    pub(crate) target: Spanned<String>,
    pub(crate) id: Option<Spanned<String>>,
    pub(crate) sharing: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub(crate) entrypoint: Option<Spanned<toml::Value>>,
    pub(crate) cmd: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, Spanned<String>>,
    pub(crate) workdir: Option<Spanned<String>>,
    pub(crate) user: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(crate) ports: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) volumes: Vec<Spanned<String>>,
    pub(crate) stop_signal: Option<Spanned<String>>,
    pub(crate) healthcheck: Option<Spanned<RawHealthcheck>>,
    pub(crate) shell: Option<Spanned<toml::Value>>,
}

/// `[config] healthcheck = { test = [...], interval = "30s", ... }`: Docker's `Healthcheck`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHealthcheck {
    pub(crate) test: Spanned<toml::Value>,
    pub(crate) interval: Option<Spanned<String>>,
    pub(crate) timeout: Option<Spanned<String>>,
    pub(crate) start_period: Option<Spanned<String>>,
    pub(crate) start_interval: Option<Spanned<String>>,
    pub(crate) retries: Option<Spanned<i64>>,
}
