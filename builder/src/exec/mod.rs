//! Backends for `run` steps (design §5). Both take the same request and
//! return the same [`Change`](crate::changes::Change)s, which become the
//! layer through one normalization, so the backends give identical layers.
//!
//! - [`local`]: namespaces and overlayfs, no daemon (the default).
//! - [`sandbox`]: the helper process the local backend re-executes.
//! - [`docker`]: a container in the engine at DOCKER_HOST, through bollard.

pub mod docker;
pub mod local;
pub mod rootless;
pub mod sandbox;

use std::collections::VecDeque;
use std::io::Read;

use oci_spec::image::ImageConfiguration;

use crate::changes::Change;
use crate::fstree::FsTree;
use crate::image::ImageLayer;

/// The hostname every `run` command sees, on both backends.
pub const HOSTNAME: &str = "kiln";

/// The /etc/hosts a command sees on the local backend (the engine writes its own).
pub const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// A private folder for secret files, in memory (/dev/shm) where there is
/// one, so a secret never lands on disk, even if kiln is killed.
fn secret_dir() -> Result<tempfile::TempDir, crate::BuildError> {
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
    tempfile::Builder::new()
        .prefix("kiln-secrets-")
        .tempdir_in(&base)
        .map_err(crate::BuildError::io_write(base))
}

/// The secrets as files (id, path), in a private folder that lives as long
/// as the returned guard; no folder when there are none.
pub type SecretFiles = (Option<tempfile::TempDir>, Vec<(String, std::path::PathBuf)>);

pub fn write_secrets(secrets: &[(String, Vec<u8>)]) -> Result<SecretFiles, crate::BuildError> {
    if secrets.is_empty() {
        return Ok((None, Vec::new()));
    }
    let dir = secret_dir()?;
    let mut files = Vec::new();
    for (id, value) in secrets {
        files.push((id.clone(), write_secret(dir.path(), id, value)?));
    }
    Ok((Some(dir), files))
}

/// Writes one secret, readable by its owner only.
fn write_secret(
    dir: &std::path::Path,
    id: &str,
    value: &[u8],
) -> Result<std::path::PathBuf, crate::BuildError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(id);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o400)
        .open(&path)
        .and_then(|mut f| f.write_all(value))
        .map_err(crate::BuildError::io_write(&path))?;
    Ok(path)
}

/// The PATH a command gets when the image sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How many lines of a failed command's output the error shows.
pub const TAIL_LINES: usize = 20;

/// Which backend runs `run` steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendChoice {
    /// Local where it works, else Docker.
    Auto,
    Local,
    Docker,
}

/// One command to run on top of a parent image.
pub struct RunRequest<'a> {
    pub argv: Vec<String>,
    /// The full environment, in order (see [`command_env`]).
    pub env: Vec<String>,
    pub user: String,
    pub workdir: String,
    pub network: bool,
    /// (id, value); mounted read-only at /run/secrets/ID.
    pub secrets: &'a [(String, Vec<u8>)],
    /// The parent image: its layers, merged tree and config.
    pub layers: &'a [ImageLayer],
    pub tree: &'a FsTree,
    pub config: &'a ImageConfiguration,
}

pub enum RunResult {
    /// The command succeeded; `keep` holds the files the changes point at.
    Changed { changes: Vec<Change>, keep: Box<dyn std::any::Any + Send> },
    /// The command exited non-zero (or was killed: 128 + signal).
    Failed { code: i32, tail: Vec<String> },
}

/// The command's environment, built as the engine builds it (moby's
/// `CreateDaemonEnvironment`): the default PATH and HOSTNAME first, then the
/// image's variables and the step's replacing or appending. Passing the
/// result to the engine leaves it unchanged, so both backends agree.
pub fn command_env(
    image_env: &[String],
    step_env: &std::collections::BTreeMap<String, String>,
) -> Vec<String> {
    let mut env = vec![format!("PATH={DEFAULT_PATH}"), format!("HOSTNAME={HOSTNAME}")];
    let mut set = |kv: String| {
        let key = kv.split('=').next().unwrap_or("").to_string();
        match env.iter_mut().find(|e| e.split('=').next() == Some(key.as_str())) {
            Some(slot) => *slot = kv,
            None => env.push(kv),
        }
    };
    for kv in image_env {
        set(kv.clone());
    }
    for (k, v) in step_env {
        set(format!("{k}={v}"));
    }
    env
}

/// Splits a command's output into lines for the reporter, keeping the last
/// [`TAIL_LINES`] for the error if the command fails.
#[derive(Default)]
pub struct Lines {
    tail: VecDeque<String>,
    partial: Vec<u8>,
}

impl Lines {
    pub fn feed(&mut self, mut bytes: &[u8], on_line: &mut dyn FnMut(&str)) {
        while let Some(i) = bytes.iter().position(|b| *b == b'\n') {
            self.partial.extend_from_slice(&bytes[..i]);
            self.emit(on_line);
            bytes = &bytes[i + 1..];
        }
        self.partial.extend_from_slice(bytes);
    }

    fn emit(&mut self, on_line: &mut dyn FnMut(&str)) {
        let line = String::from_utf8_lossy(&self.partial).trim_end_matches('\r').to_string();
        self.partial.clear();
        on_line(&line);
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    pub fn finish(mut self, on_line: &mut dyn FnMut(&str)) -> Vec<String> {
        if !self.partial.is_empty() {
            self.emit(on_line);
        }
        self.tail.into()
    }
}

/// Reads `r` to its end through [`Lines`], returning the last lines.
pub fn pump_lines(mut r: impl Read, on_line: &mut dyn FnMut(&str)) -> Vec<String> {
    let mut lines = Lines::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => lines.feed(&buf[..n], on_line),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    lines.finish(on_line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_is_built_as_the_engine_builds_it() {
        let step = [("B".to_string(), "2".to_string()), ("PATH".to_string(), "/x".to_string())].into();
        let env = command_env(&["A=1".into(), "B=1".into()], &step);
        assert_eq!(env, vec!["PATH=/x", "HOSTNAME=kiln", "A=1", "B=2"]);
    }

    #[test]
    fn output_tails_keep_the_last_lines() {
        let text: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let mut seen = 0;
        let tail = pump_lines(text.as_bytes(), &mut |_| seen += 1);
        assert_eq!(seen, 30);
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.last().unwrap(), "line 29");
    }
}
