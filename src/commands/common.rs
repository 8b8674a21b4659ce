//! What the commands share: loading a recipe, the build options from the
//! common flags, and parsing references, platforms, caches and secrets.

use std::fs;
use std::path::{Path, PathBuf};

use kiln_builder::BuildError;
use kiln_builder::BuildOptions;
use kiln_cache::Store;
use kiln_recipes::recipe::Platform;
use kiln_recipes::{ArgValue, ImageRef, Recipe};

use crate::args::{Common, RecipeArgs, Stamps};

/// The recipe at `path`, its `[args]` set from `--arg-file`s, then `--arg`s.
pub(super) fn load(path: &Path, args: &RecipeArgs) -> Result<Recipe, BuildError> {
    let values = arg_values(args)?;
    Ok(kiln_recipes::parse_file_with_args(path, &values)?)
}

/// `--label` and `--annotation` over the recipe's `[config] labels` and
/// `[image] annotations`. A bad one is exit 2, before any step.
pub(super) fn apply_stamps(recipe: &mut Recipe, stamps: &Stamps) -> Result<(), BuildError> {
    for l in &stamps.label {
        let (k, v) = l.split_once('=').filter(|(k, _)| !k.is_empty()).ok_or_else(|| {
            BuildError::usage(
                "`--label` takes KEY=VALUE".to_string(),
                Some("e.g. `--label org.opencontainers.image.revision=$GIT_SHA`"),
            )
        })?;
        if k.contains('\0') || v.contains('\0') {
            return Err(BuildError::usage("a `--label` holds a NUL byte".to_string(), None));
        }
        recipe.config.labels.insert(k.to_string(), v.to_string());
    }
    for a in &stamps.annotation {
        let (k, v) = a.split_once('=').ok_or_else(|| {
            BuildError::usage(
                "`--annotation` takes KEY=VALUE".to_string(),
                Some("e.g. `--annotation org.opencontainers.image.source=https://...`"),
            )
        })?;
        if let Some(why) = kiln_recipes::parse::annotation_problem(k, v) {
            return Err(BuildError::usage(
                format!("Bad --annotation: {why}"),
                Some("annotation keys are reverse-DNS names such as `org.opencontainers.image.source`"),
            ));
        }
        recipe.image.annotations.insert(k.to_string(), v.to_string());
    }
    Ok(())
}

/// The values `--arg-file` and `--arg` give, in the order they apply.
pub(super) fn arg_values(args: &RecipeArgs) -> Result<Vec<ArgValue>, BuildError> {
    let hint = "write NAME=VALUE, e.g. `--arg VERSION=1.2`; the recipe declares NAME in `[args]`";
    let mut values = Vec::new();
    for f in &args.arg_file {
        values.extend(kiln_recipes::args::read_arg_file(f).map_err(|m| BuildError::usage(m, Some(hint)))?);
    }
    for a in &args.arg {
        values.push(kiln_recipes::args::parse_arg(a).map_err(|m| BuildError::usage(m, Some(hint)))?);
    }
    Ok(values)
}

pub(super) fn parse_ref(s: &str, what: &str) -> Result<ImageRef, BuildError> {
    ImageRef::parse(s).map_err(|e| {
        BuildError::usage(
            format!("Bad {what} `{s}`: {e}"),
            Some("e.g. `oci:out/app`, `oci-archive:app.tar`, `docker:app:1.0`, `registry:HOST/REPO:TAG`"),
        )
    })
}

pub(super) fn open_store(dir: Option<PathBuf>) -> Result<Store, BuildError> {
    Ok(Store::open(&dir.unwrap_or_else(Store::default_dir))?)
}

pub(super) fn parse_platform(p: Option<&str>) -> Result<Option<Platform>, BuildError> {
    match p {
        Some(p) => Ok(Some(Platform::parse(p).map_err(|m| {
            BuildError::usage(format!("Bad --platform: {m}"), Some("e.g. `--platform linux/amd64`"))
        })?)),
        None => Ok(None),
    }
}

pub(super) fn options(common: &Common) -> Result<BuildOptions, BuildError> {
    let platform = parse_platform(common.platform.as_deref())?;
    let epoch_override = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => Some(
            v.trim().parse::<u64>().ok().filter(|s| *s <= kiln_recipes::parse::MAX_EPOCH as u64).ok_or_else(
                || {
                    BuildError::usage(
                        format!("SOURCE_DATE_EPOCH=`{v}` is not a number of seconds up to the year 9999"),
                        Some("unset it or set it to e.g. `0` (at most 253402300799)"),
                    )
                },
            )?,
        ),
        _ => None,
    };
    let step_timeout = match &common.step_timeout {
        None => None,
        Some(t) => Some(kiln_recipes::recipe::parse_duration(t).ok_or_else(|| {
            BuildError::usage(
                "Bad --step-timeout: not a duration kiln reads".to_string(),
                Some("a whole number and a unit (`ms`, `s`, `m`, `h`), or several: `--step-timeout 30m`, `1h30m` (at most a week)"),
            )
        })?),
    };
    Ok(BuildOptions {
        step_timeout,
        context: common.context.clone(),
        cache_dir: common.cache_dir.clone().unwrap_or_else(Store::default_dir),
        no_cache: false,
        platform,
        epoch_override,
        outputs: Vec::new(),
        backend: kiln_builder::BackendChoice::Auto,
        executor: None,
        secrets: Vec::new(),
        cache_from: common
            .cache_from
            .iter()
            .map(|c| parse_cache_ref(c, "--cache-from"))
            .collect::<Result<_, _>>()?,
        cache_to: Vec::new(),
        cache_mounts: false,
        registry: kiln_builder::registry::client::RegistryOptions {
            insecure: common.insecure_registry.clone(),
            monolithic: false,
        },
    })
}

/// `registry:HOST/REPO[:TAG]` for `--cache-from` / `--cache-to`.
pub(super) fn parse_cache_ref(
    text: &str,
    flag: &str,
) -> Result<kiln_builder::registry::client::Remote, BuildError> {
    let hint = Some("write it as `registry:HOST/REPO[:TAG]` (the tag defaults to `kiln-cache`)");
    let Some(rest) = text.strip_prefix("registry:") else {
        return Err(BuildError::usage(format!("Bad {flag} `{text}`: caches live in registries"), hint));
    };
    kiln_builder::registry::cache_ref(rest)
        .map_err(|e| BuildError::usage(format!("Bad {flag} `{text}`: {e}"), hint))
}

/// `--secret id=ID,src=FILE`, `id=ID,env=VAR`, or `id=ID` (the variable ID).
pub(super) fn parse_secret(spec: &str) -> Result<(String, Vec<u8>), BuildError> {
    let hint = Some("write `--secret id=ID,src=FILE` or `--secret id=ID,env=VARIABLE`");
    let mut id = None;
    let mut src = None;
    let mut env = None;
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("id", v)) => id = Some(v.to_string()),
            Some(("src" | "source", v)) => src = Some(PathBuf::from(v)),
            Some(("env", v)) => env = Some(v.to_string()),
            _ => {
                return Err(BuildError::usage(
                    format!("Bad --secret `{spec}`: `{part}` is not understood"),
                    hint,
                ))
            }
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or_else(|| BuildError::usage(format!("Bad --secret `{spec}`: it names no `id`"), hint))?;
    let value = match (src, env) {
        (Some(_), Some(_)) => {
            return Err(BuildError::usage(
                format!("Bad --secret `{spec}`: give `src` or `env`, not both"),
                hint,
            ))
        }
        (Some(path), None) => fs::read(&path).map_err(|e| {
            BuildError::usage(
                format!("Cannot read the secret `{id}` from `{}`: {e}", path.display()),
                Some("check the path given as `src`"),
            )
        })?,
        (None, var) => {
            let var = var.unwrap_or_else(|| id.clone());
            std::env::var_os(&var)
                .ok_or_else(|| {
                    BuildError::usage(
                        format!("The secret `{id}` reads the environment variable `{var}`, which is not set"),
                        Some("set the variable, or give a file with `src=FILE`"),
                    )
                })?
                .into_encoded_bytes()
        }
    };
    Ok((id, value))
}
