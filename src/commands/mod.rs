//! One module per command; each turns its arguments into engine calls and
//! prints the result. What the commands share (recipe loading, options,
//! reference, platform and secret parsing) is in `common`.

mod build;
mod cache;
mod common;
mod diff;
mod inspect;
mod lock;
mod plan;
mod sbom;
mod verify;

use kiln_builder::BuildError;

use crate::args::{Cli, Command};

pub fn run(cli: Cli) -> Result<u8, BuildError> {
    match cli.command {
        Command::Build(args) => build::run(args),
        Command::Plan { recipe, common, json } => plan::run(&recipe, &common, json),
        Command::Lock { recipe, update, check, platform, insecure_registry, args } => {
            let mode = match (update, check) {
                (_, true) => kiln_builder::packages::LockMode::Check,
                (true, _) => kiln_builder::packages::LockMode::Update,
                _ => kiln_builder::packages::LockMode::Keep,
            };
            lock::run(&recipe, &args, mode, platform, insecure_registry)
        }
        Command::Sbom { target, cache_dir } => sbom::run(&target, cache_dir),
        Command::Inspect { target, cache_dir, json } => inspect::run(&target, cache_dir, json),
        Command::Diff { a, b, cache_dir, json } => diff::run(&a, &b, cache_dir, json),
        Command::Verify { recipe, context, platform, backend, secrets, args, stamps } => {
            verify::run(&recipe, &args, &stamps, context, platform, backend, &secrets)
        }
        Command::Cache { action, cache_dir } => cache::run(action, cache_dir),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut script);
            print_all(&script)
        }
        Command::Man { dir } => man(dir),
    }
}

/// `kiln man`: the page on stdout, or every command's page into a folder.
fn man(dir: Option<std::path::PathBuf>) -> Result<u8, BuildError> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut page).expect("rendering into memory");
            return print_all(&page);
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(BuildError::io_write(&dir))?;
            clap_mangen::generate_to(cmd, &dir).map_err(BuildError::io_write(&dir))?;
        }
    }
    Ok(0)
}

/// Writes `bytes` to stdout. A reader that stopped early (`| head`) ends
/// the command quietly, as for any Unix tool; other write errors are
/// reported.
fn print_all(bytes: &[u8]) -> Result<u8, BuildError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(BuildError::Environment {
            message: format!("Cannot write to stdout: {e}"),
            hint: "redirect the output to a file, e.g. `> kiln.1`".into(),
        }),
        _ => Ok(0),
    }
}
