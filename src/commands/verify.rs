//! `kiln verify`: two builds in different conditions, compared.

use std::io::Write;
use std::path::{Path, PathBuf};

use kiln_builder::verify::{Verdict, VerifyOptions};
use kiln_builder::BuildError;

use super::common::{apply_stamps, arg_values, load, parse_secret};
use crate::args::{Backend, RecipeArgs, Stamps};

pub(super) fn run(
    recipe_path: &Path,
    args: &RecipeArgs,
    stamps: &Stamps,
    context: Option<PathBuf>,
    platform: Option<String>,
    backend: Backend,
    secrets: &[String],
) -> Result<u8, BuildError> {
    for s in secrets {
        parse_secret(s)?; // fail early, before two builds
    }
    let mut recipe = load(recipe_path, args)?;
    apply_stamps(&mut recipe, stamps)?; // checked before two builds
    let mut build_args = vec!["--backend".to_string(), backend.as_str().to_string()];
    // The values as read here, so both builds see the same ones wherever they run.
    for v in arg_values(args)? {
        build_args.extend(["--arg".to_string(), format!("{}={}", v.name, v.value)]);
    }
    for l in &stamps.label {
        build_args.extend(["--label".to_string(), l.clone()]);
    }
    for a in &stamps.annotation {
        build_args.extend(["--annotation".to_string(), a.clone()]);
    }
    for s in secrets {
        build_args.extend(["--secret".to_string(), s.clone()]);
    }
    if let Some(p) = platform {
        build_args.extend(["--platform".to_string(), p]);
    }
    let opts = VerifyOptions {
        kiln: std::env::current_exe().map_err(BuildError::io_read("/proc/self/exe"))?,
        context: context.unwrap_or_else(|| recipe.dir.clone()),
        build_args,
    };
    let verdict = kiln_builder::verify::verify(recipe_path, &opts, &|m| eprintln!("verify: {m}"))?;
    match verdict {
        Verdict::Reproducible(digest) => {
            eprintln!("verify: reproducible");
            println!("{digest}");
            Ok(0)
        }
        Verdict::BuildFailed { code, stderr } => {
            std::io::stderr().write_all(&stderr).ok();
            Ok(code)
        }
        Verdict::Differs { changes, .. } => {
            let mut out = std::io::stdout().lock();
            if changes.is_empty() {
                let _ = writeln!(
                    out,
                    "the files are identical; the difference is in the image config or layer encoding"
                );
            }
            super::diff::print_changes(&mut out, &changes);
            Ok(1)
        }
    }
}
