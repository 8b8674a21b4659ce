//! The host tools a VM disk is made with, the Debian package of each, and
//! their versions (part of each partition's cache key: another version of a
//! tool may write other bytes).

use std::process::{Command, Output, Stdio};

use crate::error::BuildError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tool {
    Mke2fs,
    Debugfs,
    Sfdisk,
    MkfsFat,
    Mcopy,
    Mmd,
    Syslinux,
    QemuImg,
}

impl Tool {
    pub(crate) fn command(self) -> &'static str {
        match self {
            Tool::Mke2fs => "mke2fs",
            Tool::Debugfs => "debugfs",
            Tool::Sfdisk => "sfdisk",
            Tool::MkfsFat => "mkfs.fat",
            Tool::Mcopy => "mcopy",
            Tool::Mmd => "mmd",
            Tool::Syslinux => "syslinux",
            Tool::QemuImg => "qemu-img",
        }
    }

    /// The Debian package that has it.
    pub(crate) fn package(self) -> &'static str {
        match self {
            Tool::Mke2fs | Tool::Debugfs => "e2fsprogs",
            Tool::Sfdisk => "fdisk",
            Tool::MkfsFat => "dosfstools",
            Tool::Mcopy | Tool::Mmd => "mtools",
            Tool::Syslinux => "syslinux",
            Tool::QemuImg => "qemu-utils",
        }
    }
}

/// Where the tool is: found on PATH, or in the sbin folders an ordinary
/// user's PATH may lack.
pub(crate) fn path(tool: Tool) -> std::path::PathBuf {
    let name = tool.command();
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    name.into()
}

fn missing(tool: Tool) -> BuildError {
    BuildError::Environment {
        message: format!("`{}` is not installed; kiln needs it to write a VM disk", tool.command()),
        hint: format!("install it: `apt-get install {}`", tool.package()),
    }
}

/// Runs `cmd` (made from [`path`]) and collects its output; a tool that is
/// not there is an environment error naming its package.
pub(crate) fn run(cmd: &mut Command, tool: Tool) -> Result<Output, BuildError> {
    tracing::debug!(?cmd, "vm tool");
    cmd.stdin(Stdio::null()).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing(tool),
        _ => BuildError::Environment {
            message: format!("Cannot run `{}`: {e}", tool.command()),
            hint: format!("check the `{}` package is installed and works", tool.package()),
        },
    })
}

/// The error for a tool that ran and failed, with what it printed.
pub(crate) fn failed(tool: Tool, o: &Output) -> BuildError {
    let mut text = String::from_utf8_lossy(&o.stderr).trim().to_string();
    if text.is_empty() {
        text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    }
    let tail: Vec<&str> = text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
    BuildError::Environment {
        message: format!("`{}` failed ({}):\n  | {}", tool.command(), o.status, tail.join("\n  | ")),
        hint: format!(
            "this is a problem with `{}` ({}) or the disk; the output above says what",
            tool.command(),
            tool.package()
        ),
    }
}

/// The tool's version line, for cache keys.
pub(crate) fn version(tool: Tool) -> Result<String, BuildError> {
    let arg = match tool {
        Tool::Mke2fs | Tool::Debugfs => "-V",
        Tool::MkfsFat => "--help",
        _ => "--version",
    };
    let o = run(Command::new(path(tool)).arg(arg), tool)?;
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    let line = match tool {
        // mkfs.fat has no --version; its banner is not printed with --help,
        // so the package's version stands in.
        Tool::MkfsFat => {
            dpkg_version("dosfstools").unwrap_or_else(|| text.lines().next().unwrap_or("").into())
        }
        _ => text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string(),
    };
    Ok(format!("{}: {line}", tool.command()))
}

fn dpkg_version(package: &str) -> Option<String> {
    let o = Command::new("dpkg-query").args(["-W", "-f", "${Version}", package]).output().ok()?;
    o.status.success().then(|| format!("{package} {}", String::from_utf8_lossy(&o.stdout)))
}
