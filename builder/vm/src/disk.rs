//! The disk: a partition table with fixed ids (MBR for BIOS and data disks,
//! GPT for UEFI; written by `sfdisk` into a sparse file), syslinux's boot
//! code for BIOS, and the partition files copied in at their offsets (holes
//! stay holes); `.qcow2` through `qemu-img convert`.

use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::BuildError;
use crate::tools::{self, Tool};

pub(crate) const MIB: u64 = 1 << 20;
/// Where the first partition starts (1 MiB, the usual alignment).
pub(crate) const FIRST: u64 = MIB;

pub(crate) struct Partition {
    pub(crate) file: PathBuf,
    pub(crate) size: u64,
    /// An MBR type byte, e.g. `c` (FAT32 LBA) or `83` (Linux); or a GPT
    /// type GUID.
    pub(crate) kind: &'static str,
    /// MBR: the active flag. GPT: ignored.
    pub(crate) bootable: bool,
    /// GPT: the partition's GUID.
    pub(crate) uuid: Option<String>,
}

#[derive(Debug, Clone)]
pub(crate) enum Table {
    /// MBR with this disk id (partition ids are `ID-NN`).
    Dos(u32),
    /// GPT with this disk GUID.
    Gpt(String),
}

/// GPT partition types.
pub(crate) const GPT_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
pub(crate) const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";

/// The sfdisk script for `parts`, laid out one after another from 1 MiB.
pub(crate) fn script(table: &Table, parts: &[Partition]) -> String {
    let mut s = match table {
        Table::Dos(id) => format!("label: dos\nlabel-id: 0x{id:08x}\nunit: sectors\n\n"),
        Table::Gpt(id) => format!("label: gpt\nlabel-id: {id}\nunit: sectors\nfirst-lba: 2048\n\n"),
    };
    let mut at = FIRST;
    for p in parts {
        s.push_str(&format!("start={}, size={}, type={}", at / 512, p.size / 512, p.kind));
        match table {
            Table::Dos(_) if p.bootable => s.push_str(", bootable"),
            Table::Gpt(_) => {
                if let Some(u) = &p.uuid {
                    s.push_str(&format!(", uuid={u}"));
                }
            }
            _ => {}
        }
        s.push('\n');
        at += p.size;
    }
    s
}

impl Table {
    /// What the table needs after the last partition: GPT's backup, 1 MiB.
    pub(crate) fn tail(&self) -> u64 {
        match self {
            Table::Dos(_) => 0,
            Table::Gpt(_) => MIB,
        }
    }
}

/// The disk's size: 1 MiB before the partitions, them, and the table's tail.
pub(crate) fn total_size(table: &Table, parts: &[Partition]) -> u64 {
    FIRST + parts.iter().map(|p| p.size).sum::<u64>() + table.tail()
}

/// Writes the raw disk to `out`.
pub(crate) fn assemble(
    out: &Path,
    table: &Table,
    parts: &[Partition],
    mbr_code: Option<&[u8]>,
) -> Result<(), BuildError> {
    let total = total_size(table, parts);
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(out)
        .map_err(BuildError::io_write(out))?;
    f.set_len(total).map_err(BuildError::io_write(out))?;
    drop(f);
    let mut c = Command::new(tools::path(Tool::Sfdisk));
    c.args(["--no-reread", "--no-tell-kernel", "--wipe", "never", "-q"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C");
    let mut child = c.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BuildError::Environment {
            message: "`sfdisk` is not installed; kiln needs it to write a VM disk".into(),
            hint: "install it: `apt-get install fdisk`".into(),
        },
        _ => BuildError::io_write(out)(e),
    })?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(script(table, parts).as_bytes()).map_err(BuildError::io_write(out))?;
    }
    let o = child.wait_with_output().map_err(BuildError::io_write(out))?;
    if !o.status.success() {
        return Err(tools::failed(Tool::Sfdisk, &o));
    }
    let disk = fs::OpenOptions::new().write(true).open(out).map_err(BuildError::io_write(out))?;
    if let Some(code) = mbr_code {
        disk.write_all_at(&code[..code.len().min(440)], 0).map_err(BuildError::io_write(out))?;
    }
    let mut at = FIRST;
    for p in parts {
        let src = fs::File::open(&p.file).map_err(BuildError::io_read(&p.file))?;
        let len = src.metadata().map_err(BuildError::io_read(&p.file))?.len();
        if len > p.size {
            return Err(BuildError::usage(
                format!("partition `{}` is larger than its slot", p.file.display()),
                None,
            ));
        }
        copy_sparse(&src, &disk, at, len).map_err(BuildError::io_write(out))?;
        at += p.size;
    }
    Ok(())
}

/// Copies the data regions of `src` (not its holes) into `dst` at `offset`.
fn copy_sparse(src: &fs::File, dst: &fs::File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsFd;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 4 << 20];
    while pos < len {
        let data = match rustix::fs::seek(src.as_fd(), rustix::fs::SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(src.as_fd(), rustix::fs::SeekFrom::Hole(data))?.min(len);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[..n], offset + at)?;
            }
            at += n as u64;
        }
        pos = hole;
    }
    Ok(())
}

/// Converts the raw disk to qcow2 (in-order writes, so the same raw disk
/// always gives the same file).
pub(crate) fn to_qcow2(raw: &Path, out: &Path) -> Result<(), BuildError> {
    let mut c = Command::new(tools::path(Tool::QemuImg));
    c.args(["convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1,lazy_refcounts=off"]).arg(raw).arg(out);
    let o = tools::run(&mut c, Tool::QemuImg)?;
    if !o.status.success() {
        return Err(tools::failed(Tool::QemuImg, &o));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_laid_out_from_one_mib() {
        let parts = [
            Partition { file: "b".into(), size: 32 * MIB, kind: "c", bootable: true, uuid: None },
            Partition { file: "r".into(), size: 100 * MIB, kind: "83", bootable: false, uuid: None },
        ];
        assert_eq!(
            script(&Table::Dos(0x1234abcd), &parts),
            "label: dos\nlabel-id: 0x1234abcd\nunit: sectors\n\nstart=2048, size=65536, type=c, bootable\nstart=67584, size=204800, type=83\n"
        );
    }
}
