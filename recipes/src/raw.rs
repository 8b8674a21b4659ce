//! The recipe file exactly as written, as serde sees it. Every table denies
//! unknown keys, so a typo is an error with its place rather than a silent no-op.
//! Values whose checks need a good message (`run`, `mode`, `entrypoint`, ...)
//! are kept as [`toml::Value`] and checked in `parse.rs`.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRecipe {
    pub image: Option<Spanned<RawImage>>,
    pub packages: Option<Spanned<RawPackages>>,
    #[serde(default, rename = "step")]
    pub steps: Vec<Spanned<RawStep>>,
    #[serde(default, rename = "stage")]
    pub stages: Vec<Spanned<RawStage>>,
    pub config: Option<Spanned<RawConfig>>,
    pub vm: Option<Spanned<RawVm>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVm {
    pub size: Option<Spanned<toml::Value>>,
    pub filesystem: Option<Spanned<String>>,
    pub cmdline: Option<Spanned<String>>,
    pub boot: Option<Spanned<String>>,
    pub init: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawImage {
    pub name: Spanned<String>,
    pub base: Option<Spanned<String>>,
    pub epoch: Option<Spanned<i64>>,
    pub platform: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPackages {
    pub suite: Option<Spanned<String>>,
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    #[serde(default)]
    pub exclude: Vec<Spanned<String>>,
    #[serde(default)]
    pub components: Vec<Spanned<String>>,
    pub architecture: Option<Spanned<String>>,
    pub mirror: Option<Spanned<String>>,
    pub keyring: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    pub name: Spanned<String>,
    pub base: Option<Spanned<String>>,
    #[serde(default, rename = "step")]
    pub steps: Vec<Spanned<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStep {
    pub copy: Option<Spanned<String>>,
    pub from: Option<Spanned<String>>,
    pub to: Option<Spanned<String>>,
    pub write: Option<Spanned<String>>,
    pub content: Option<Spanned<String>>,
    pub run: Option<Spanned<toml::Value>>,
    pub env: Option<Spanned<BTreeMap<String, String>>>,
    pub network: Option<Spanned<bool>>,
    pub secrets: Option<Spanned<Vec<String>>>,
    pub owner: Option<Spanned<String>>,
    pub mode: Option<Spanned<toml::Value>>,
    pub user: Option<Spanned<String>>,
    pub workdir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub entrypoint: Option<Spanned<toml::Value>>,
    pub cmd: Option<Spanned<toml::Value>>,
    #[serde(default)]
    pub env: BTreeMap<String, Spanned<String>>,
    pub workdir: Option<Spanned<String>>,
    pub user: Option<Spanned<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub ports: Vec<Spanned<String>>,
    #[serde(default)]
    pub volumes: Vec<Spanned<String>>,
    pub stop_signal: Option<Spanned<String>>,
}
