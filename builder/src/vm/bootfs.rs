//! The BIOS boot partition: a FAT filesystem (`mkfs.fat --invariant`, files
//! copied with mtools under SOURCE_DATE_EPOCH) holding the kernel, the
//! initramfs and syslinux, whose boot sector `syslinux --install` writes.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::error::BuildError;
use crate::vm::tools::{self, Tool};

/// FAT cannot hold times before 1980: earlier epochs are written as this.
pub const FAT_EPOCH_MIN: u64 = 315_532_800;

pub struct BootFs<'a> {
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub cmdline: &'a str,
    /// Bytes, a multiple of 1 MiB.
    pub size: u64,
    /// 8 hex digits.
    pub volume_id: &'a str,
    pub epoch: u64,
}

/// The partition size for a kernel and initramfs: both, plus syslinux and room.
pub fn size_for(kernel: usize, initrd: usize) -> u64 {
    let bytes = (kernel + initrd) as u64 * 11 / 10 + (4 << 20);
    bytes.next_multiple_of(1 << 20).max(32 << 20)
}

pub fn syslinux_cfg(cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nDEFAULT kiln\nPROMPT 0\nTIMEOUT 0\nLABEL kiln\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {cmdline}\n"
    )
}

/// Writes the partition to `out`, using `scratch` for its input files.
pub fn make(b: &BootFs<'_>, out: &Path, scratch: &Path) -> Result<(), BuildError> {
    let file = fs::File::create(out).map_err(BuildError::io_write(out))?;
    file.set_len(b.size).map_err(BuildError::io_write(out))?;
    drop(file);
    let sde = b.epoch.max(FAT_EPOCH_MIN).to_string();
    let env = |c: &mut Command| {
        c.env("SOURCE_DATE_EPOCH", &sde).env("TZ", "UTC").env("LC_ALL", "C").env("MTOOLS_SKIP_CHECK", "1");
    };
    let mut c = Command::new(tools::path(Tool::MkfsFat));
    c.args(["--invariant", "-n", "KILNBOOT", "-i", b.volume_id]).arg(out);
    env(&mut c);
    check(&mut c, Tool::MkfsFat)?;
    for (name, bytes) in [
        ("vmlinuz", b.kernel),
        ("initrd.img", b.initrd),
        ("syslinux.cfg", syslinux_cfg(b.cmdline).as_bytes()),
    ] {
        let src = scratch.join(name);
        fs::write(&src, bytes).map_err(BuildError::io_write(&src))?;
        let mut c = Command::new(tools::path(Tool::Mcopy));
        c.arg("-i").arg(out).arg(&src).arg(format!("::/{name}"));
        env(&mut c);
        check(&mut c, Tool::Mcopy)?;
    }
    let mut c = Command::new(tools::path(Tool::Syslinux));
    c.arg("--install").arg(out);
    env(&mut c);
    check(&mut c, Tool::Syslinux)?;
    Ok(())
}

fn check(c: &mut Command, tool: Tool) -> Result<(), BuildError> {
    let o = tools::run(c, tool)?;
    if !o.status.success() {
        return Err(tools::failed(tool, &o));
    }
    Ok(())
}

/// syslinux's master boot record code (the first 440 bytes of the disk).
pub fn mbr_code() -> Result<Vec<u8>, BuildError> {
    for p in ["/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin", "/usr/share/syslinux/mbr.bin"] {
        if let Ok(b) = fs::read(p) {
            if b.len() <= 440 {
                return Ok(b);
            }
        }
    }
    Err(BuildError::Environment {
        message: "syslinux's mbr.bin is not installed; kiln needs it for a BIOS-bootable disk".into(),
        hint: "install it: `apt-get install syslinux-common`".into(),
    })
}
