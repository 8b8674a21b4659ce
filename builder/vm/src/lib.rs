//! kiln-vm: `-o vm:FILE.raw|FILE.qcow2`, the image as a VM disk, made on
//! the host from the image's layers: no installer, no VM, no loop device,
//! no root. Depends on the formats (`kiln-oci`) and the store; it takes
//! Debian's version order from `kiln-debian` to pick the newest kernel.
//!
//! - `flatten`: the layers unpacked into one folder, whiteouts applied.
//! - `ext4`: that folder as a reproducible ext4 image.
//! - `initramfs` and `init`: the kernel the image holds, the modules its
//!   root needs, and kiln's own `/init` that mounts the root and runs the
//!   image's entrypoint.
//! - `bootfs`: the boot partition: FAT with syslinux (BIOS) or an EFI
//!   system partition with systemd-boot (UEFI).
//! - `disk`: the partition table (MBR or GPT) and the partitions put
//!   together; qcow2.
//! - `tools`: the host tools used, and their versions.
//!
//! Each partition file is kept in the store (`disks/KEY` records), keyed by
//! what it is made from: its layers, sizes, epoch and tool versions for the
//! root; the kernel, initramfs and command line for the boot partition. A
//! change to the entrypoint alone remakes the small boot partition only.

mod bootfs;
mod disk;
mod ext4;
mod flatten;
mod init;
mod initramfs;
mod tools;

// The formats this crate reads, under the names its modules use.
pub(crate) use kiln_oci::{error, extract, fstree, image, listing, passwd, reporter};

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::json;

use kiln_cache::{Digest, ImageRecord, Store};
use kiln_recipes::{Recipe, VmBoot};

use crate::error::BuildError;
use crate::fstree::TreeMap;
use crate::image::StoredImage;
use crate::listing::Kind;
use crate::reporter::Reporter;
use disk::{Partition, MIB};
use initramfs::{CpioEntry, Kernel};

/// Bumped when the bytes of a partition kiln makes change for the same inputs.
const SCHEMA: u32 = 1;

/// Room for the initramfs (kiln's init and the root's modules, a few MiB).
const INITRD_BUDGET: usize = 16 << 20;

/// Whether a `vm:` output is a qcow2 disk (`.qcow2`) or raw (`.raw`); any
/// other name is refused (checked before a build starts, and again here).
pub fn is_qcow2(out: &Path) -> Result<bool, BuildError> {
    match out.extension().and_then(|e| e.to_str()) {
        Some("raw") if !out.is_dir() => Ok(false),
        Some("qcow2") if !out.is_dir() => Ok(true),
        _ => Err(BuildError::usage(
            format!("`vm:{}` names neither a .raw nor a .qcow2 file", out.display()),
            Some("write the output as `vm:FILE.raw` or `vm:FILE.qcow2`"),
        )),
    }
}

/// Writes the disk for `image` (built from `recipe`) to `out`.
pub fn write_disk(
    store: &Store,
    image: &StoredImage,
    recipe: &Recipe,
    epoch: u64,
    out: &Path,
    reporter: &dyn Reporter,
) -> Result<(), BuildError> {
    let qcow2 = is_qcow2(out)?;
    let vm = &recipe.vm;
    let layered = crate::fstree::FsTree::of_layers(store, &image.layers)?;
    let tree = TreeMap::of(&layered)?;
    let arch = image.config_json.architecture().to_string();

    let kernel = match vm.boot {
        VmBoot::None => None,
        _ => {
            if arch != "amd64" {
                return Err(BuildError::usage(
                    format!("kiln makes bootable VM disks for amd64 images; this image is {arch}"),
                    Some(
                        "set `boot = \"none\"` in `[vm]` for a data disk, or build the image for linux/amd64",
                    ),
                ));
            }
            Some(initramfs::find_kernel(&tree).ok_or_else(|| {
                BuildError::usage(
                    format!(
                        "`vm:{}`: the image holds no kernel (`/boot/vmlinuz-VERSION` with `/lib/modules/VERSION`), so the disk cannot boot",
                        out.display()
                    ),
                    Some("add `linux-image-amd64` to `[packages] include`, or set `boot = \"none\"` in `[vm]` for a data disk"),
                )
            })?)
        }
    };

    // What the root filesystem needs, and the sizes of the partitions.
    let needs = ext4::needs(&tree);
    let root_min = needs.bytes.next_multiple_of(MIB);
    let root_partition = if kernel.is_some() { 2 } else { 1 };
    let label_seed = Digest::of(
        serde_json::to_vec(
            &json!({"disk": image.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>()}),
        )
        .expect("json")
        .as_slice(),
    );
    let firmware = match vm.boot {
        VmBoot::Uefi => bootfs::Firmware::Uefi,
        _ => bootfs::Firmware::Bios,
    };
    // Fixed ids: MBR for BIOS and data disks, GPT (an EFI system partition) for UEFI.
    let (table, root_partuuid) = if kernel.is_some() && firmware == bootfs::Firmware::Uefi {
        let id = |what: &str| uuid_from(&Digest::of(format!("{what} {label_seed}").as_bytes()));
        (disk::Table::Gpt(id("disk")), id("root"))
    } else {
        let label_id = u32::from_be_bytes(label_seed.bytes()[..4].try_into().expect("4 bytes")) | 1;
        (disk::Table::Dos(label_id), format!("{label_id:08x}-{root_partition:02}"))
    };
    let tail = table.tail();
    let cmdline = format!("root=PARTUUID={root_partuuid} rw panic=-1 {}", vm.cmdline);
    // The boot partition's size from the kernel's size in the tree and a
    // budget for the initramfs, so the root's size (and key) is known before
    // any file is read.
    let boot_size = match &kernel {
        Some(k) => {
            let kernel_size = match tree.get(&k.image).map(|e| &e.kind) {
                Some(Kind::File { size, .. }) => *size as usize,
                _ => 0,
            };
            bootfs::size_for(firmware, kernel_size, INITRD_BUDGET)
        }
        None => 0,
    };
    let root_size = match vm.size {
        Some(size) => {
            let need = disk::FIRST + boot_size + root_min + tail;
            if size < need {
                let boot_text = if boot_size > 0 {
                    format!(", the boot partition {} MiB", boot_size / MIB)
                } else {
                    String::new()
                };
                let message = format!(
                    "`size` is {} MiB, but the disk needs at least {} MiB: the root filesystem about {} MiB{boot_text}, and the partition table",
                    size / MIB,
                    need / MIB,
                    root_min / MIB
                );
                let hint = format!(
                    "set `size = \"{}M\"` or more, or leave `size` out for the content plus headroom",
                    need / MIB
                );
                return Err(match vm.size_span.clone() {
                    Some(span) => recipe.error_at(span, message).with_hint(hint).into(),
                    None => BuildError::usage(message, Some(&hint)),
                });
            }
            size - disk::FIRST - boot_size - tail
        }
        None => (root_min * 5 / 4 + 64 * MIB).next_multiple_of(MIB),
    };

    // The root filesystem, from the store or made now.
    let root_key = key(&json!({
        "schema": SCHEMA,
        "part": "root",
        "filesystem": "ext4",
        "layers": image.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        "epoch": epoch,
        "size": root_size,
        "inodes": needs.inodes,
        "tools": [tools::version(tools::Tool::Mke2fs)?],
    }));
    // When the root is made, its flattened folder stays until the boot
    // partition's inputs are read from it (no layer is read twice).
    let mut flat_kept: Option<tempfile::TempDir> = None;
    let root = cached_partition(
        store,
        &root_key,
        &format!("vm root ext4 {} MiB", root_size / MIB),
        reporter,
        |dir| {
            let tmp = store.tmp_dir();
            let keep = tempfile::Builder::new()
                .prefix("vm-root-")
                .tempdir_in(&tmp)
                .map_err(BuildError::io_write(&tmp))?;
            let flat_dir = keep.path().to_path_buf();
            let flat = flatten::flatten(store, &image.layers, &tree, &flat_dir)?;
            flat_kept = Some(keep);
            let uuid = uuid_from(&root_key);
            let out = dir.join("root.ext4");
            let params = ext4::Ext4 {
                flat: &flat,
                dir: &flat_dir,
                size: root_size,
                inodes: needs.inodes,
                uuid: &uuid,
                epoch,
                label: "kiln-root",
            };
            match ext4::make(&params, &out, dir) {
                Ok(()) => Ok(out),
                Err(ext4::Ext4Error::Other(e)) => Err(e),
                Err(ext4::Ext4Error::NoSpace(text)) => {
                    let message = format!(
                        "the image's files do not fit in a root filesystem of {} MiB ({})",
                        root_size / MIB,
                        text.lines().last().unwrap_or("").trim()
                    );
                    let hint = format!(
                        "set a larger `size` in `[vm]`, e.g. `size = \"{}M\"`",
                        (disk::FIRST + boot_size + tail + root_size * 3 / 2).div_ceil(MIB)
                    );
                    Err(match vm.size_span.clone() {
                        Some(span) => recipe.error_at(span, message).with_hint(hint).into(),
                        None => BuildError::usage(message, Some(&hint)),
                    })
                }
            }
        },
    )?;

    let boot = match &kernel {
        Some(k) => {
            let flat = flat_kept.as_ref().map(|d| d.path());
            let src = Source { store, image, tree: &tree, layered: &layered, flat };
            let b = boot_inputs(&src, k, vm.init.as_deref(), epoch, reporter)?;
            if (b.kernel.len() + b.initrd.len()) as u64 + (2 << 20) > boot_size {
                return Err(BuildError::BadImage {
                    image: format!("/{}", k.image),
                    reason: format!(
                        "the kernel ({} bytes) and initramfs ({} bytes) do not fit the {} MiB boot partition",
                        b.kernel.len(),
                        b.initrd.len(),
                        boot_size / MIB
                    ),
                });
            }
            Some(b)
        }
        None => None,
    };
    drop(flat_kept);

    let mut parts = Vec::new();
    if let Some(b) = &boot {
        let loader = match firmware {
            bootfs::Firmware::Bios => tools::version(tools::Tool::Syslinux)?,
            bootfs::Firmware::Uefi => format!("systemd-boot {}", Digest::of(&bootfs::systemd_boot()?)),
        };
        let boot_key = key(&json!({
            "schema": SCHEMA,
            "part": match firmware { bootfs::Firmware::Bios => "boot-bios", bootfs::Firmware::Uefi => "boot-uefi" },
            "kernel": b.kernel_digest.to_string(),
            "initrd": Digest::of(&b.initrd).to_string(),
            "cmdline": cmdline,
            "size": boot_size,
            "epoch": epoch,
            "tools": [
                tools::version(tools::Tool::MkfsFat)?,
                tools::version(tools::Tool::Mcopy)?,
                loader,
            ],
        }));
        let part = cached_partition(
            store,
            &boot_key,
            &match firmware {
                bootfs::Firmware::Bios => format!("vm boot (syslinux) {} MiB", boot_size / MIB),
                bootfs::Firmware::Uefi => {
                    format!("vm EFI system partition (systemd-boot) {} MiB", boot_size / MIB)
                }
            },
            reporter,
            |dir| {
                let out = dir.join("boot.fat");
                let volume_id = boot_key.hex()[..8].to_string();
                let params = bootfs::BootFs {
                    firmware,
                    kernel: &b.kernel,
                    initrd: &b.initrd,
                    cmdline: &cmdline,
                    size: boot_size,
                    volume_id: &volume_id,
                    epoch,
                };
                bootfs::make(&params, &out, dir)?;
                Ok(out)
            },
        )?;
        let (kind, uuid) = match &table {
            disk::Table::Dos(_) => ("c", None),
            disk::Table::Gpt(_) => {
                (disk::GPT_ESP, Some(uuid_from(&Digest::of(format!("esp {label_seed}").as_bytes()))))
            }
        };
        parts.push(Partition { file: store.blob_path(&part), size: boot_size, kind, bootable: true, uuid });
    }
    let (kind, uuid) = match &table {
        disk::Table::Dos(_) => ("83", None),
        disk::Table::Gpt(_) => (disk::GPT_ROOT_X86_64, Some(root_partuuid.clone())),
    };
    parts.push(Partition { file: store.blob_path(&root), size: root_size, kind, bootable: false, uuid });

    // The disk, written beside the output and renamed into place.
    let dir = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(BuildError::io_write(dir))?;
    let raw =
        tempfile::Builder::new().prefix(".kiln-disk-").tempfile_in(dir).map_err(BuildError::io_write(dir))?;
    let mbr =
        if boot.is_some() && firmware == bootfs::Firmware::Bios { Some(bootfs::mbr_code()?) } else { None };
    let phase = reporter.meter(&format!("vm:{}: assembling the disk", out.display()), None);
    disk::assemble(raw.path(), &table, &parts, mbr.as_deref())?;
    phase.finish();
    let result = if qcow2 {
        let q = tempfile::Builder::new()
            .prefix(".kiln-disk-")
            .tempfile_in(dir)
            .map_err(BuildError::io_write(dir))?;
        let phase = reporter.meter(&format!("vm:{}: converting to qcow2", out.display()), None);
        disk::to_qcow2(raw.path(), q.path())?;
        phase.finish();
        q
    } else {
        raw
    };
    fs::set_permissions(result.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(BuildError::io_write(out))?;
    result.persist(out).map_err(|e| BuildError::Write { path: out.to_path_buf(), source: e.error })?;
    Ok(())
}

fn key(v: &serde_json::Value) -> Digest {
    Digest::of(&crate::image::canonical_json(v))
}

/// A UUID (version 4 form) derived from a digest.
fn uuid_from(d: &Digest) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.bytes()[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// The partition stored under `key`, or `make` it in a fresh folder and
/// store it.
fn cached_partition(
    store: &Store,
    key: &Digest,
    label: &str,
    reporter: &dyn Reporter,
    make: impl FnOnce(&Path) -> Result<PathBuf, BuildError>,
) -> Result<Digest, BuildError> {
    if let Some(r) = store.read_record::<ImageRecord>(kiln_cache::RecordKind::Disk, &key.hex()) {
        if store.verify_blob(&r.manifest)? {
            store.touch_record(kiln_cache::RecordKind::Disk, &key.hex());
            reporter.on_notice(&format!("{label}: cached"));
            return Ok(r.manifest);
        }
    }
    let started = std::time::Instant::now();
    let tmp = store.tmp_dir();
    let dir = tempfile::Builder::new().prefix("vm-").tempdir_in(&tmp).map_err(BuildError::io_write(&tmp))?;
    let phase = reporter.meter(&format!("{label}: making it"), None);
    let file = make(dir.path())?;
    phase.finish();
    let (digest, _) = store.adopt_file(&file)?;
    store.write_record(
        kiln_cache::RecordKind::Disk,
        &key.hex(),
        &ImageRecord { name: label.to_string(), manifest: digest, blobs: vec![digest] },
    )?;
    reporter.on_notice(&format!("{label}: made in {:.1} s", started.elapsed().as_secs_f64()));
    Ok(digest)
}

/// The boot partition's contents: the kernel and an initramfs with kiln's init.
struct BootInputs {
    kernel: Vec<u8>,
    /// The kernel's digest (it is a blob in the store).
    kernel_digest: Digest,
    initrd: Vec<u8>,
}

/// What the boot partition takes from the image's layers: the kernel, the
/// root's modules in load order (uncompressed), /etc/passwd and /etc/group.
/// Kept in the store by the layers, so a change to the image's config alone
/// reads no layer again.
#[derive(serde::Serialize, serde::Deserialize)]
struct FromLayers {
    kernel: Digest,
    modules: Vec<(String, Digest)>,
    passwd: Option<Digest>,
    group: Option<Digest>,
}

/// Where the boot partition's inputs are read from: the image's layers, or
/// its flattened folder when the root filesystem was just made from it.
struct Source<'a> {
    store: &'a Store,
    image: &'a StoredImage,
    tree: &'a TreeMap,
    /// The same tree, as layers (which layer holds which file).
    layered: &'a crate::fstree::FsTree,
    flat: Option<&'a Path>,
}

fn from_layers(src: &Source<'_>, kernel: &Kernel, reporter: &dyn Reporter) -> Result<FromLayers, BuildError> {
    let (store, image, tree) = (src.store, src.image, src.tree);
    let k = key(&json!({
        "schema": SCHEMA,
        "part": "boot-inputs",
        "layers": image.layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>(),
        "kernel": kernel.version,
        "modules": initramfs::ROOT_MODULES,
    }));
    if let Some(r) = store.read_record::<ImageRecord>(kiln_cache::RecordKind::Disk, &k.hex()) {
        let all_there = r.blobs.iter().map(|d| store.verify_blob(d)).collect::<Result<Vec<bool>, _>>()?;
        if all_there.iter().all(|x| *x) {
            if let Ok(f) = serde_json::from_slice::<FromLayers>(&store.read_blob(&r.manifest)?) {
                store.touch_record(kiln_cache::RecordKind::Disk, &k.hex());
                return Ok(f);
            }
        }
    }
    let started = std::time::Instant::now();
    let passwd = tree.resolve_parents("etc/passwd").unwrap_or_default();
    let group = tree.resolve_parents("etc/group").unwrap_or_default();
    let builtin_path = format!("{}/modules.builtin", kernel.modules);
    let read = |paths: &[String]| match src.flat {
        Some(root) => read_flat(root, tree, paths),
        None => crate::extract::read_files(store, &image.layers, src.layered, paths),
    };
    let mut files = read(&[kernel.image.clone(), builtin_path.clone(), passwd.clone(), group.clone()])?;
    let builtin = initramfs::builtin_names(&String::from_utf8_lossy(
        files.get(&builtin_path).map(Vec::as_slice).unwrap_or(&[]),
    ));
    let by_name = initramfs::module_files(tree, kernel);

    // The modules wanted, then what they depend on, level by level.
    let mut depends: HashMap<String, Vec<String>> = HashMap::new();
    let mut bytes: HashMap<String, Vec<u8>> = HashMap::new();
    let mut frontier: Vec<String> =
        initramfs::ROOT_MODULES.iter().map(|m| m.to_string()).filter(|m| !builtin.contains(m)).collect();
    let mut needed_by: HashMap<String, String> = HashMap::new();
    while !frontier.is_empty() {
        let mut paths = Vec::new();
        for m in &frontier {
            let path = by_name.get(m).ok_or_else(|| {
                let why = match needed_by.get(m) {
                    Some(by) => format!("`{by}` depends on it"),
                    None => "the root filesystem needs it".into(),
                };
                BuildError::usage(
                    format!(
                        "the kernel {} has no module `{m}` ({why}), and it is not built in",
                        kernel.version
                    ),
                    Some(
                        "install the kernel's whole package (e.g. `linux-image-amd64`) and keep its modules",
                    ),
                )
            })?;
            paths.push(path.clone());
        }
        let mut read = read(&paths)?;
        let mut next = Vec::new();
        for (m, path) in frontier.iter().zip(&paths) {
            let raw = read.remove(path).ok_or_else(|| BuildError::BadImage {
                image: format!("/{path}"),
                reason: "the module is not a regular file in the image".into(),
            })?;
            let elf = initramfs::decompress_module(path, raw).map_err(|e| BuildError::BadImage {
                image: format!("/{path}"),
                reason: format!("cannot decompress the module: {e}"),
            })?;
            let ds = initramfs::modinfo_depends(&elf).map_err(|e| BuildError::BadImage {
                image: format!("/{path}"),
                reason: format!("not a kernel module: {e}"),
            })?;
            for d in &ds {
                if !builtin.contains(d)
                    && !depends.contains_key(d)
                    && !frontier.contains(d)
                    && !next.contains(d)
                {
                    needed_by.insert(d.clone(), m.clone());
                    next.push(d.clone());
                }
            }
            depends.insert(m.clone(), ds);
            bytes.insert(m.clone(), elf);
        }
        frontier = next;
    }
    let wanted: Vec<String> = initramfs::ROOT_MODULES.iter().map(|m| m.to_string()).collect();
    let order = initramfs::load_order(&wanted, &depends);

    let kernel_bytes = files.remove(&kernel.image).ok_or_else(|| BuildError::BadImage {
        image: format!("/{}", kernel.image),
        reason: "the kernel is not a regular file".into(),
    })?;
    let kernel_digest = store.put_blob(&kernel_bytes)?;
    let mut blobs = vec![kernel_digest];
    let mut modules = Vec::new();
    for m in order {
        let d = store.put_blob(&bytes[&m])?;
        blobs.push(d);
        modules.push((m, d));
    }
    let mut keep = |path: &str| -> Result<Option<Digest>, BuildError> {
        match files.get(path) {
            Some(b) => {
                let d = store.put_blob(b)?;
                blobs.push(d);
                Ok(Some(d))
            }
            None => Ok(None),
        }
    };
    let (passwd, group) = (keep(&passwd)?, keep(&group)?);
    let f = FromLayers { kernel: kernel_digest, modules, passwd, group };
    let manifest = store.put_blob(&crate::image::canonical_json(&f))?;
    blobs.push(manifest);
    store.write_record(
        kiln_cache::RecordKind::Disk,
        &k.hex(),
        &ImageRecord { name: format!("vm kernel {} and its root modules", kernel.version), manifest, blobs },
    )?;
    reporter.on_notice(&format!(
        "vm: kernel {} and {} module(s) read in {:.1} s",
        kernel.version,
        f.modules.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(f)
}

fn boot_inputs(
    src: &Source<'_>,
    kernel: &Kernel,
    init: Option<&str>,
    epoch: u64,
    reporter: &dyn Reporter,
) -> Result<BootInputs, BuildError> {
    let (store, image, tree) = (src.store, src.image, src.tree);
    let f = from_layers(src, kernel, reporter)?;
    let text = |d: &Option<Digest>| -> Result<String, BuildError> {
        Ok(match d {
            Some(d) => String::from_utf8_lossy(&store.read_blob(d)?).into_owned(),
            None => String::new(),
        })
    };
    let mut cpio: BTreeMap<String, CpioEntry> = BTreeMap::new();
    for d in ["dev", "m", "proc", "root", "sys"] {
        cpio.insert(d.into(), CpioEntry::Dir);
    }
    cpio.insert("dev/console".into(), CpioEntry::CharDev { major: 5, minor: 1 });
    let mut loaded = Vec::new();
    for (i, (name, d)) in f.modules.iter().enumerate() {
        // Numbered, so the archive's order is the load order.
        let file = format!("m/{i:02}-{name}.ko");
        loaded.push(format!("/{file}"));
        cpio.insert(file, CpioEntry::File { mode: 0o644, bytes: store.read_blob(d)? });
    }
    let run = match init {
        Some(path) if executable(tree, path) => init::Run::Exec { path: path.to_string() },
        Some(path) => {
            return Err(BuildError::usage(
                format!("`init = \"{path}\"` in `[vm]` is not an executable file in the image"),
                Some("name the image's init (e.g. `/lib/systemd/systemd`), or leave `init` out to run the entrypoint"),
            ))
        }
        None => entrypoint_run(image, tree, &text(&f.passwd)?, &text(&f.group)?)?,
    };
    let plan =
        init::InitPlan { modules: loaded, root_device: "/dev/vda2".into(), root_fstype: "ext4".into(), run };
    cpio.insert("init".into(), CpioEntry::File { mode: 0o755, bytes: init::build(&plan) });
    Ok(BootInputs {
        kernel: store.read_blob(&f.kernel)?,
        kernel_digest: f.kernel,
        initrd: initramfs::cpio(&cpio, epoch),
    })
}

/// How the VM runs the image: its entrypoint and cmd, as its user, in its
/// workdir, with its environment (the program found through PATH now, as
/// a container engine would).
fn entrypoint_run(
    image: &StoredImage,
    tree: &TreeMap,
    passwd: &str,
    group: &str,
) -> Result<init::Run, BuildError> {
    let config = image.config_json.config().clone().unwrap_or_default();
    let mut argv: Vec<String> = config.entrypoint().clone().unwrap_or_default();
    argv.extend(config.cmd().clone().unwrap_or_default());
    if argv.is_empty() {
        return Err(BuildError::usage(
            "the image has no entrypoint or cmd for the VM to run",
            Some("set `entrypoint` in `[config]`, or `init = \"/sbin/init\"` (or systemd) in `[vm]`"),
        ));
    }
    let env: Vec<String> = config.env().clone().unwrap_or_default();
    let path_var = kiln_oci::pathvar::of_env(&env).to_string();
    let workdir = config.working_dir().clone().filter(|w| !w.is_empty()).unwrap_or_else(|| "/".into());
    let program = if argv[0].contains('/') {
        let p = if argv[0].starts_with('/') {
            argv[0].clone()
        } else {
            format!("{}/{}", workdir.trim_end_matches('/'), argv[0])
        };
        executable(tree, &p).then_some(p)
    } else {
        // Absolute entries only: a relative one names nothing in the image.
        kiln_oci::pathvar::lookup(&argv[0], &path_var, |p| p.starts_with('/') && executable(tree, p))
    };
    let Some(path) = program else {
        return Err(BuildError::usage(
            format!("the entrypoint `{}` is not an executable file in the image (PATH={path_var})", argv[0]),
            Some("fix `entrypoint` in `[config]`, or install the program"),
        ));
    };
    let spec = config.user().clone().filter(|u| !u.is_empty()).unwrap_or_else(|| "0".into());
    let user = crate::passwd::resolve_user_in(&spec, passwd, group).map_err(|e| {
        BuildError::usage(format!("The VM cannot run the entrypoint: {e}"), Some("fix `user` in `[config]`"))
    })?;
    if argv.iter().chain(&env).chain([&workdir]).any(|s| s.contains('\0')) {
        return Err(BuildError::usage(
            "the image's entrypoint, cmd, env or workdir holds a NUL byte, which no program can be given",
            Some("remove the NUL byte from `[config]`"),
        ));
    }
    let mut env = env;
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        env.push(format!("HOME={}", user.home));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, format!("PATH={path_var}"));
    }
    Ok(init::Run::Command { path, argv, env, workdir, uid: user.uid, gid: user.gid, groups: user.groups })
}

/// Whether `path` (absolute) is, through symlinks, an executable regular file in the tree.
fn executable(tree: &TreeMap, path: &str) -> bool {
    let mut p = path.trim_start_matches('/').to_string();
    for _ in 0..40 {
        let Ok(resolved) = tree.resolve_parents(&p) else { return false };
        match tree.get(&resolved).map(|e| (&e.kind, e.mode)) {
            Some((Kind::File { .. }, mode)) => return mode & 0o111 != 0,
            Some((Kind::Hardlink { target }, _)) => {
                return tree
                    .get(target)
                    .is_some_and(|t| matches!(t.kind, Kind::File { .. }) && t.mode & 0o111 != 0)
            }
            Some((Kind::Symlink { target }, _)) => {
                p = if target.starts_with('/') {
                    target.trim_start_matches('/').to_string()
                } else {
                    match resolved.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target.clone(),
                    }
                };
            }
            _ => return false,
        }
    }
    false
}

/// [`read_files`] from the image's flattened folder.
fn read_flat(root: &Path, tree: &TreeMap, paths: &[String]) -> Result<HashMap<String, Vec<u8>>, BuildError> {
    let mut out = HashMap::new();
    for p in paths {
        if matches!(tree.get(p).map(|e| &e.kind), Some(Kind::File { .. } | Kind::Hardlink { .. })) {
            let f = root.join(p);
            out.insert(p.clone(), fs::read(&f).map_err(BuildError::io_read(&f))?);
        }
    }
    Ok(out)
}
