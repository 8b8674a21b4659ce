//! The boot partition: a FAT filesystem (`mkfs.fat --invariant`, files
//! copied with mtools under SOURCE_DATE_EPOCH) holding the kernel and the
//! initramfs, and
//! - for BIOS, syslinux, whose boot sector `syslinux --install` writes;
//! - for UEFI (an EFI system partition), systemd-boot as the removable-media
//!   loader `\EFI\BOOT\BOOTX64.EFI`, with one loader entry.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::error::BuildError;
use crate::tools::{self, Tool};

/// FAT cannot hold times before 1980: earlier epochs are written as this.
pub(crate) const FAT_EPOCH_MIN: u64 = 315_532_800;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Firmware {
    Bios,
    Uefi,
}

pub(crate) struct BootFs<'a> {
    pub(crate) firmware: Firmware,
    pub(crate) kernel: &'a [u8],
    pub(crate) initrd: &'a [u8],
    pub(crate) cmdline: &'a str,
    /// Bytes, a multiple of 1 MiB.
    pub(crate) size: u64,
    /// 8 hex digits.
    pub(crate) volume_id: &'a str,
    pub(crate) epoch: u64,
}

/// The partition size for a kernel and initramfs: both, plus the loader
/// and room; an EFI system partition is FAT32, so at least 64 MiB.
pub(crate) fn size_for(firmware: Firmware, kernel: usize, initrd: usize) -> u64 {
    let bytes = (kernel + initrd) as u64 * 11 / 10 + (4 << 20);
    let min = match firmware {
        Firmware::Bios => 32 << 20,
        Firmware::Uefi => 64 << 20,
    };
    bytes.next_multiple_of(1 << 20).max(min)
}

/// Where Debian's systemd-boot-efi puts the loader.
pub(crate) const SYSTEMD_BOOT: &str = "/usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// systemd-boot's loader, read from the host.
pub(crate) fn systemd_boot() -> Result<Vec<u8>, BuildError> {
    fs::read(SYSTEMD_BOOT).map_err(|_| BuildError::Environment {
        message: format!(
            "systemd-boot is not installed (`{SYSTEMD_BOOT}`); kiln needs it for a UEFI-bootable disk"
        ),
        hint: "install it: `apt-get install systemd-boot-efi`".into(),
    })
}

pub(crate) fn loader_conf() -> &'static str {
    "default kiln.conf\ntimeout 0\neditor no\n"
}

pub(crate) fn loader_entry(cmdline: &str) -> String {
    format!("title kiln\nlinux /vmlinuz\ninitrd /initrd.img\noptions {cmdline}\n")
}

pub(crate) fn syslinux_cfg(cmdline: &str) -> String {
    format!(
        "SERIAL 0 115200\nDEFAULT kiln\nPROMPT 0\nTIMEOUT 0\nLABEL kiln\n  LINUX /vmlinuz\n  INITRD /initrd.img\n  APPEND {cmdline}\n"
    )
}

/// Writes the partition to `out`, using `scratch` for its input files.
pub(crate) fn make(b: &BootFs<'_>, out: &Path, scratch: &Path) -> Result<(), BuildError> {
    let file = fs::File::create(out).map_err(BuildError::io_write(out))?;
    file.set_len(b.size).map_err(BuildError::io_write(out))?;
    drop(file);
    let sde = b.epoch.max(FAT_EPOCH_MIN).to_string();
    let env = |c: &mut Command| {
        c.env("SOURCE_DATE_EPOCH", &sde).env("TZ", "UTC").env("LC_ALL", "C").env("MTOOLS_SKIP_CHECK", "1");
    };
    let mut c = Command::new(tools::path(Tool::MkfsFat));
    c.args(["--invariant", "-n", "KILNBOOT", "-i", b.volume_id]);
    if b.firmware == Firmware::Uefi {
        c.args(["-F", "32"]);
    }
    c.arg(out);
    env(&mut c);
    check(&mut c, Tool::MkfsFat)?;
    let mut files: Vec<(&str, Vec<u8>)> =
        vec![("vmlinuz", b.kernel.to_vec()), ("initrd.img", b.initrd.to_vec())];
    match b.firmware {
        Firmware::Bios => files.push(("syslinux.cfg", syslinux_cfg(b.cmdline).into_bytes())),
        Firmware::Uefi => {
            let mut c = Command::new(tools::path(Tool::Mmd));
            c.arg("-i").arg(out).args(["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"]);
            env(&mut c);
            check(&mut c, Tool::Mmd)?;
            files.push(("EFI/BOOT/BOOTX64.EFI", systemd_boot()?));
            files.push(("loader/loader.conf", loader_conf().as_bytes().to_vec()));
            files.push(("loader/entries/kiln.conf", loader_entry(b.cmdline).into_bytes()));
        }
    }
    for (i, (name, bytes)) in files.iter().enumerate() {
        let src = scratch.join(format!("boot-file-{i}"));
        fs::write(&src, bytes).map_err(BuildError::io_write(&src))?;
        let mut c = Command::new(tools::path(Tool::Mcopy));
        c.arg("-i").arg(out).arg(&src).arg(format!("::/{name}"));
        env(&mut c);
        check(&mut c, Tool::Mcopy)?;
    }
    if b.firmware == Firmware::Bios {
        let mut c = Command::new(tools::path(Tool::Syslinux));
        c.arg("--install").arg(out);
        env(&mut c);
        check(&mut c, Tool::Syslinux)?;
    }
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
pub(crate) fn mbr_code() -> Result<Vec<u8>, BuildError> {
    for p in ["/usr/lib/syslinux/mbr/mbr.bin", "/usr/lib/SYSLINUX/mbr.bin", "/usr/share/syslinux/mbr.bin"] {
        if let Ok(b) = fs::read(p) {
            if b.len() <= 440 {
                return Ok(b);
            }
        }
    }
    Err(BuildError::Environment {
        message: "The syslinux file mbr.bin is not installed; kiln needs it for a BIOS-bootable disk".into(),
        hint: "install it: `apt-get install syslinux-common`".into(),
    })
}
