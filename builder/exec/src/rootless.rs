//! Rootless runs of the local backend: a user namespace in which the
//! invoking user is root and the user's subordinate ids (/etc/subuid,
//! /etc/subgid) are ids 1..N, so layers keep files owned by any user. The
//! id maps are written by the setuid helpers `newuidmap` and `newgidmap`
//! (Debian's `uidmap`), which check the ranges.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The user namespace's id maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) sub_uid: (u32, u32),
    pub(crate) sub_gid: (u32, u32),
    newuidmap: PathBuf,
    newgidmap: PathBuf,
}

impl Mapping {
    /// This user's maps, or why there are none.
    pub(crate) fn detect() -> Result<Mapping, String> {
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let name = user_name(uid);
        let find = |tool: &str| {
            ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.is_file())
                .ok_or_else(|| format!("`{tool}` is not installed (Debian package `uidmap`)"))
        };
        let newuidmap = find("newuidmap")?;
        let newgidmap = find("newgidmap")?;
        let sub_uid = range("/etc/subuid", uid, name.as_deref())?;
        let sub_gid = range("/etc/subgid", uid, name.as_deref())?;
        Ok(Mapping { uid, gid, sub_uid, sub_gid, newuidmap, newgidmap })
    }

    /// Writes the maps of the process `pid` (which has unshared its user namespace).
    pub(crate) fn apply(&self, pid: u32) -> Result<(), String> {
        let run = |tool: &Path, own: u32, (start, count): (u32, u32)| -> Result<(), String> {
            let out = Command::new(tool)
                .arg(pid.to_string())
                .args(["0", &own.to_string(), "1", "1", &start.to_string(), &count.to_string()])
                .output()
                .map_err(|e| format!("cannot run `{}`: {e}", tool.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "`{}` refused: {}",
                    tool.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(())
        };
        run(&self.newuidmap, self.uid, self.sub_uid)?;
        run(&self.newgidmap, self.gid, self.sub_gid)
    }

    /// A name for what this mapping puts on disk (unpacked layers differ by mapping).
    pub(crate) fn tag(&self) -> String {
        format!("{}-{}-{}", self.uid, self.sub_uid.0, self.sub_uid.1)
    }
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find_map(|f| (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string()))
}

/// The first range of at least 65536 ids for the user in `file`.
fn range(file: &str, uid: u32, name: Option<&str>) -> Result<(u32, u32), String> {
    let text = std::fs::read_to_string(file).map_err(|_| format!("`{file}` is missing"))?;
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split(':').collect();
            let mine = f.len() == 3 && (Some(f[0]) == name || f[0] == uid.to_string());
            if !mine {
                return None;
            }
            Some((f[1].parse::<u32>().ok()?, f[2].parse::<u32>().ok()?))
        })
        .find(|(_, count)| *count >= 65536)
        .ok_or_else(|| {
            format!("`{file}` gives this user no range of 65536 ids (e.g. `usermod --add-subuids 100000-165535 USER`)")
        })
}
