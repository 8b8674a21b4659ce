//! The `kiln` binary: parses the command line, calls the engine, renders
//! results (stdout) and progress and errors (stderr). Exit codes: 0 success,
//! 1 the build failed, 2 bad usage or bad input, 3 an environment problem.

mod args;
mod commands;
mod metadata;
mod progress;

use std::process::ExitCode;

use clap::Parser;

use kiln_builder::BuildError;

fn main() -> ExitCode {
    // The local backend's sandbox helper: kiln re-executes itself, so the
    // namespaces are entered from a process that has no other threads.
    let mut args = std::env::args_os();
    match args.nth(1) {
        Some(a) if a == "__sandbox" => {
            let spec = args.next().map(std::path::PathBuf::from).unwrap_or_default();
            kiln_builder::exec::sandbox::main(&spec);
        }
        Some(a) if a == "__chroot" => {
            let spec = args.next().map(std::path::PathBuf::from).unwrap_or_default();
            kiln_builder::exec::container::main(&spec);
        }
        Some(a) if a == "__probe-namespaces" => kiln_builder::exec::container::probe_main(),
        Some(a) if a == "__userns-rm" => {
            let paths: Vec<std::path::PathBuf> = args.map(std::path::PathBuf::from).collect();
            kiln_builder::exec::sandbox::remove_main(&paths);
        }
        _ => {}
    }
    // Logs on stderr with KILN_LOG (see log_filter); colours only on a terminal.
    tracing_subscriber::fmt()
        .with_env_filter(log_filter(std::env::var("KILN_LOG").ok().as_deref()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    miette::set_hook(Box::new(|_| Box::new(miette::MietteHandlerOpts::new().terminal_links(false).build())))
        .expect("the miette hook is set once");
    let cli = args::Cli::parse();
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            report(&e);
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// KILN_LOG: a bare level up to `debug` is kiln's own events at that level
/// (the libraries it uses stay at warnings: `debug` is not thousands of
/// lines of OpenPGP and resolver internals); `trace` is everything; any
/// other value is tracing's env-filter syntax (e.g. `kiln=debug,pgp=trace`).
fn log_filter(value: Option<&str>) -> tracing_subscriber::EnvFilter {
    let directives = match value.map(str::trim) {
        None | Some("") => "error".to_string(),
        Some(l @ ("off" | "error" | "warn")) => l.to_string(),
        Some(l @ ("info" | "debug")) => format!("warn,kiln={l}"),
        Some(other) => other.to_string(),
    };
    tracing_subscriber::EnvFilter::builder().parse_lossy(directives)
}

fn report(e: &BuildError) {
    if let BuildError::Recipe(r) = e {
        let report = miette::Report::new(r.as_ref().clone_for_report());
        eprintln!("{report:?}");
        return;
    }
    eprintln!("error: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    if let Some(h) = e.hint() {
        eprintln!("  hint: {h}");
    }
}
