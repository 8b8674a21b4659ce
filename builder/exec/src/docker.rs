//! The Docker backend: the engine at DOCKER_HOST, through bollard (API
//! version negotiated; Docker 20.10 / API 1.41 and newer).
//!
//! A `run` step: the parent image loaded into the engine once (found again
//! by its image ID, which is the digest of the config kiln made for it), a
//! container with the same environment, user, working folder, hostname and
//! network rule as the local sandbox, then `commit` and `GET /images/ID/get`
//! to read the layer the engine recorded. Its entries go through the same
//! normalization as the local backend's upper folder.
//!
//! Also `docker:REF` outputs: the built image loaded and tagged.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveImageOptionsBuilder,
};
use bytes::Bytes;
use futures_util::StreamExt;
use oci_spec::image::{ConfigBuilder, ImageConfiguration, ImageConfigurationBuilder};

use kiln_cache::{Digest, Store};

use super::{RunRequest, RunResult};
use crate::changes::{self, Change, ChangeKind};
use crate::error::BuildError;
use crate::image::{self, StoredImage};
use crate::listing::Kind;

impl std::fmt::Debug for DockerEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DockerEngine")
    }
}

impl super::Executor for DockerEngine {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn run(
        &self,
        store: &Store,
        req: &RunRequest<'_>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<RunResult, BuildError> {
        self.run_step(store, req, on_line)
    }
}

pub struct DockerEngine {
    client: bollard::Docker,
    rt: tokio::runtime::Handle,
}

fn engine_error(e: impl std::fmt::Display) -> BuildError {
    BuildError::Environment {
        message: format!("The Docker engine failed: {e}"),
        hint: "check that dockerd is running and healthy (`docker info`), or use `--backend local` (on a host, as root) or `--backend container` (as root in a container)".into(),
    }
}

impl DockerEngine {
    /// Connects to DOCKER_HOST (default: the local socket) and negotiates the API version.
    pub fn connect(rt: tokio::runtime::Handle) -> Result<DockerEngine, BuildError> {
        let host = std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let unreachable = |e: &dyn std::fmt::Display| {
            BuildError::Environment {
            message: format!("Cannot reach a Docker engine at `{host}`: {e}"),
            hint: "start dockerd (e.g. `dockerd &`) or set DOCKER_HOST; without an engine, `--backend local` (on a host, as root) or `--backend container` (as root in a container) runs the steps".into(),
        }
        };
        let client = bollard::Docker::connect_with_defaults().map_err(|e| unreachable(&e))?;
        let client = rt
            .block_on(async {
                let c = client.negotiate_version().await?;
                c.ping().await?;
                Ok::<_, bollard::errors::Error>(c)
            })
            .map_err(|e| unreachable(&e))?;
        let engine = DockerEngine { client, rt };
        engine.remove_orphans();
        Ok(engine)
    }

    /// Removes containers an earlier kiln left behind when it was killed
    /// mid-step (each is labelled with its kiln's pid and boot id).
    fn remove_orphans(&self) {
        let filters = std::collections::HashMap::from([("label".to_string(), vec![LABEL_PID.to_string()])]);
        let opts = bollard::query_parameters::ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let Ok(list) = self.rt.block_on(self.client.list_containers(Some(opts))) else { return };
        for c in list {
            let labels = c.labels.unwrap_or_default();
            let alive = labels.get(LABEL_BOOT).is_none_or(|b| *b != boot_id())
                || labels.get(LABEL_PID).and_then(|p| p.parse::<i32>().ok()).is_some_and(pid_alive);
            if let (false, Some(id)) = (alive, c.id) {
                let opts = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
                let _ = self.rt.block_on(self.client.remove_container(&id, Some(opts)));
            }
        }
    }

    /// Loads a stored image into the engine unless it already has it (by
    /// image ID = config digest); tags it `tag` when given.
    pub fn load(&self, store: &Store, image: &StoredImage, tag: Option<&str>) -> Result<(), BuildError> {
        let id = image.config.to_string();
        let present = self.rt.block_on(self.client.inspect_image(&id)).is_ok();
        if present && tag.is_none() {
            return Ok(());
        }
        if present {
            let (repo, t) = split_ref(tag.expect("tag"));
            let opts = bollard::query_parameters::TagImageOptionsBuilder::default().repo(repo).tag(t).build();
            return self.rt.block_on(self.client.tag_image(&id, Some(opts))).map_err(|e| {
                BuildError::usage(format!("The engine refused the tag `{}`: {e}", tag.unwrap_or("")), None)
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        let store2 = store.clone();
        let image2 = image.clone();
        let repo_tag = tag.map(str::to_string);
        let writer = std::thread::spawn(move || -> Result<(), BuildError> {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, ChannelWriter(tx.clone()));
            let r = crate::export::write_archive_to(
                &store2,
                &image2,
                Some(repo_tag.as_deref()),
                &mut w,
                Path::new("<docker load>"),
            )
            .and_then(|()| {
                w.flush().map_err(|e| BuildError::Write { path: "<docker load>".into(), source: e })
            });
            if let Err(e) = &r {
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
            r
        });
        let stream =
            futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let result = self.rt.block_on(async {
            let mut s =
                self.client.import_image_stream(ImportImageOptionsBuilder::default().build(), stream, None);
            while let Some(item) = s.next().await {
                item?;
            }
            Ok::<_, bollard::errors::Error>(())
        });
        let written = writer.join().unwrap_or_else(|_| {
            Err(BuildError::Environment {
                message: "The writer of the archive for the engine stopped with an internal error".into(),
                hint: "run the command again; if it fails the same way, report it with KILN_LOG=debug output"
                    .into(),
            })
        });
        written?;
        result.map_err(|e| match tag {
            Some(t) => BuildError::usage(
                format!("The engine did not load the image as `{t}`: {e}"),
                Some("check the reference: `docker:NAME[:TAG]`"),
            ),
            None => engine_error(e),
        })
    }

    /// Runs `req` in a container; on success, the changes it made (their
    /// data lives in the returned spool file until it is dropped).
    fn run_step(
        &self,
        store: &Store,
        req: &RunRequest<'_>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<RunResult, BuildError> {
        let parent = self.parent_image(store, req)?;
        self.load(store, &parent, None)?;
        let tmp = store.tmp_dir();
        let work = tempfile::Builder::new()
            .prefix("docker-")
            .tempdir_in(&tmp)
            .map_err(BuildError::io_write(&tmp))?;
        let (_secret_dir, secrets) = super::write_secrets(req.secrets)?;
        let mut binds: Vec<String> =
            secrets.iter().map(|(id, p)| format!("{}:/run/secrets/{id}:ro", p.display())).collect();
        // Cache mounts: the store's folders, bound read-write. The engine
        // runs on this machine (DOCKER_HOST is local for bind mounts); a new
        // folder is given to the step's user here.
        for m in req.cache_mounts {
            // A root step writes whoever owns it (the engine's default
            // capabilities), so kiln not being root only matters for others.
            let we_are_root = rustix::process::geteuid().is_root();
            match m.owner {
                Some((0, 0)) if !we_are_root => {}
                Some((uid, gid)) => std::os::unix::fs::lchown(&m.host, Some(uid), Some(gid)).map_err(|e| {
                    BuildError::Environment {
                        message: format!("Cannot give the cache mount `/{}` to {uid}:{gid}: {e}", m.target),
                        hint: "with the docker backend, kiln gives a new cache mount's folder to a non-root step's user itself, which needs kiln to run as root".into(),
                    }
                })?,
                None => {}
            }
            binds.push(format!("{}:/{}:rw", m.host.display(), m.target));
        }
        let labels = std::collections::HashMap::from([
            (LABEL_PID.to_string(), std::process::id().to_string()),
            (LABEL_BOOT.to_string(), boot_id()),
        ]);
        let body = ContainerCreateBody {
            labels: Some(labels),
            image: Some(parent.config.to_string()),
            entrypoint: Some(req.argv.clone()),
            env: Some(req.env.clone()),
            user: Some(req.user.clone()),
            working_dir: Some(req.workdir.clone()),
            hostname: Some(super::HOSTNAME.into()),
            network_disabled: None,
            host_config: Some(HostConfig {
                network_mode: Some(if req.network { "bridge".into() } else { "none".into() }),
                binds: (!binds.is_empty()).then_some(binds),
                ..Default::default()
            }),
            ..Default::default()
        };
        let c = &self.client;
        let created = self
            .rt
            .block_on(c.create_container(Some(CreateContainerOptionsBuilder::default().build()), body))
            .map_err(engine_error)?;
        let id = created.id;
        let outcome = self.run_container(&id, req.timeout, on_line);
        let result = match outcome {
            Ok((None, tail)) => Ok(RunResult::TimedOut { tail }),
            Ok((Some(0), _)) => {
                self.collect(&id, req, work).map(|(changes, keep)| RunResult::Changed { changes, keep })
            }
            Ok((Some(code), tail)) => Ok(RunResult::Failed { code, tail }),
            Err(e) => Err(e),
        };
        let _ = self.rt.block_on(c.remove_container(
            &id,
            Some(RemoveContainerOptionsBuilder::default().force(true).v(true).build()),
        ));
        result
    }

    /// Starts the container and follows its output to its end; its exit
    /// code, or `None` when it ran past `timeout` and was killed (the
    /// container's PID namespace, every process in it, dies with it).
    fn run_container(
        &self,
        id: &str,
        timeout: Option<std::time::Duration>,
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(Option<i32>, Vec<String>), BuildError> {
        let c = &self.client;
        match self.rt.block_on(c.start_container(id, None)) {
            Ok(()) => {}
            // The engine refuses to start a program that is not there: that is the command failing.
            Err(bollard::errors::Error::DockerResponseServerError { message, .. }) => {
                on_line(&message);
                return Ok((Some(127), vec![message]));
            }
            Err(e) => return Err(engine_error(e)),
        }
        let mut lines = super::Lines::default();
        let followed = self.rt.block_on(async {
            let opts = LogsOptionsBuilder::default().follow(true).stdout(true).stderr(true).build();
            let mut logs = c.logs(id, Some(opts));
            let follow = async {
                while let Some(chunk) = logs.next().await {
                    match chunk {
                        Ok(out) => lines.feed(&out.into_bytes(), on_line),
                        Err(e) => return Err(engine_error(e)),
                    }
                }
                Ok(())
            };
            match timeout {
                None => follow.await.map(|()| true),
                Some(t) => match tokio::time::timeout(t, follow).await {
                    Ok(r) => r.map(|()| true),
                    Err(_) => Ok(false),
                },
            }
        })?;
        // Past the limit: killed (it may have ended meanwhile), and waited
        // for a while at most; the caller force-removes it either way.
        let killed = |lines: super::Lines, on_line: &mut dyn FnMut(&str)| {
            let kill =
                bollard::query_parameters::KillContainerOptionsBuilder::default().signal("SIGKILL").build();
            let _ = self.rt.block_on(c.kill_container(id, Some(kill)));
            let _ = self.rt.block_on(tokio::time::timeout(
                std::time::Duration::from_secs(10),
                c.wait_container(id, None).next(),
            ));
            (None, lines.finish(on_line))
        };
        if !followed {
            return Ok(killed(lines, on_line));
        }
        // Its output ended: it has exited or is about to (with a limit, the
        // wait is bounded too, should the engine never answer).
        let waited = self.rt.block_on(async {
            let wait = c.wait_container(id, None).into_future();
            match timeout {
                None => Ok(wait.await.0),
                Some(_) => tokio::time::timeout(std::time::Duration::from_secs(10), wait).await.map(|w| w.0),
            }
        });
        let Ok(status) = waited else {
            return Ok(killed(lines, on_line));
        };
        let tail = lines.finish(on_line);
        match status {
            Some(Ok(r)) => Ok((Some(r.status_code as i32), tail)),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                Ok((Some(code as i32), tail))
            }
            Some(Err(e)) => Err(engine_error(e)),
            None => Err(engine_error("the wait ended without a status")),
        }
    }

    /// Commits the container, reads the new layer from `GET /images/ID/get`.
    fn collect(
        &self,
        id: &str,
        req: &RunRequest<'_>,
        work: tempfile::TempDir,
    ) -> Result<(Vec<Change>, Box<dyn std::any::Any + Send>), BuildError> {
        let c = &self.client;
        let committed = self
            .rt
            .block_on(c.commit_container(
                CommitContainerOptionsBuilder::default().container(id).pause(false).build(),
                bollard::models::ContainerConfig::default(),
            ))
            .map_err(engine_error)?;
        let image_id = committed.id;
        let spool = work.path().join("save.tar");
        let saved = self.rt.block_on(async {
            let mut f = tokio::fs::File::create(&spool).await.map_err(BuildError::io_write(&spool))?;
            let mut s = c.export_image(&image_id);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(engine_error)?;
                tokio::io::AsyncWriteExt::write_all(&mut f, &chunk)
                    .await
                    .map_err(BuildError::io_write(&spool))?;
            }
            tokio::io::AsyncWriteExt::flush(&mut f).await.map_err(BuildError::io_write(&spool))?;
            Ok::<_, BuildError>(())
        });
        let _ = self.rt.block_on(c.remove_image(
            &image_id,
            Some(RemoveImageOptionsBuilder::default().force(true).build()),
            None,
        ));
        saved?;
        let (tar_path, base, size) = last_layer(&spool, work.path())?;
        // The engine wrote this layer: one kiln cannot read is the engine's
        // fault (exit 3), not the recipe's.
        let mut changes = changes::from_tar(&tar_path, base, Some(size)).map_err(|e| match e {
            BuildError::BadLayer { reason, .. } => BuildError::Environment {
                message: format!("The engine's layer of the step's changes cannot be read: {reason}"),
                hint: "check the Docker engine (`docker info`) and run the build again".into(),
            },
            e => e,
        })?;
        drop_mount_points(&mut changes, req)?;
        Ok((changes, Box::new(work)))
    }

    /// The image the container starts from: the parent's layers under a
    /// config that holds only the platform, so the engine adds nothing of
    /// its own (no volumes, no entrypoint); what the command sees comes from
    /// the request.
    fn parent_image(&self, store: &Store, req: &RunRequest<'_>) -> Result<StoredImage, BuildError> {
        let config: ImageConfiguration = ImageConfigurationBuilder::default()
            .architecture(req.config.architecture().clone())
            .os(req.config.os().clone())
            .config(ConfigBuilder::default().build().expect("config"))
            .build()
            .expect("config");
        image::store_image(store, config, req.layers.to_vec(), 0, &Default::default())
    }

    /// An image of the engine as a base: exported once (`GET /images/REF/get`),
    /// checked and imported like a `docker save` archive, and recorded by
    /// the engine's image ID, so later builds read nothing while the
    /// reference names the same image. `Ok(None)`: the engine has no such image.
    pub fn base_image(&self, store: &Store, reference: &str) -> Result<Option<StoredImage>, BuildError> {
        let inspect = match self.rt.block_on(self.client.inspect_image(reference)) {
            Ok(i) => i,
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => {
                return Ok(None)
            }
            Err(e) => return Err(engine_error(e)),
        };
        let id = inspect.id.unwrap_or_default();
        let key = Digest::of(format!("docker-engine\0{id}").as_bytes()).hex();
        if let Some(img) = crate::import::imported_as(store, &key) {
            return Ok(Some(img));
        }
        let tmp = store.tmp_dir();
        let spool = tempfile::Builder::new()
            .prefix("docker-base-")
            .tempfile_in(&tmp)
            .map_err(BuildError::io_write(&tmp))?;
        let path = spool.path().to_path_buf();
        self.rt.block_on(async {
            let mut f = tokio::fs::File::create(&path).await.map_err(BuildError::io_write(&path))?;
            let mut s = self.client.export_image(reference);
            while let Some(chunk) = s.next().await {
                let chunk = chunk.map_err(engine_error)?;
                tokio::io::AsyncWriteExt::write_all(&mut f, &chunk)
                    .await
                    .map_err(BuildError::io_write(&path))?;
            }
            tokio::io::AsyncWriteExt::flush(&mut f).await.map_err(BuildError::io_write(&path))
        })?;
        let name = format!("docker:{reference}");
        // `docker save` of one image: an archive of one platform.
        let img = crate::import::import_archive(
            store,
            &name,
            &path,
            true,
            &kiln_recipes::recipe::Platform::host(),
        )?;
        img.record(store, kiln_cache::RecordKind::Base, &key, &name)?;
        Ok(Some(img))
    }
}

/// Where the last layer of a `docker save` archive is: (file, offset, size).
/// A compressed layer (newer engines may keep them so) is unpacked into
/// `work` first.
fn last_layer(spool: &Path, work: &Path) -> Result<(std::path::PathBuf, u64, u64), BuildError> {
    let bad = |why: String| BuildError::Environment {
        message: format!("The engine's saved image is not usable: {why}"),
        hint: "check the engine's version (Docker 20.10 or newer)".into(),
    };
    let f = File::open(spool).map_err(BuildError::io_read(spool))?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    let mut members: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut manifest = None;
    for e in ar.entries().map_err(|e| bad(e.to_string()))? {
        let mut e = e.map_err(|e| bad(e.to_string()))?;
        let name = String::from_utf8_lossy(&e.path_bytes()).trim_start_matches("./").to_string();
        if name == "manifest.json" {
            let mut s = String::new();
            e.read_to_string(&mut s).map_err(|e| bad(e.to_string()))?;
            manifest = Some(s);
        } else {
            members.insert(name, (e.raw_file_position(), e.size()));
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&manifest.ok_or_else(|| bad("it has no manifest.json".into()))?)
            .map_err(|e| bad(e.to_string()))?;
    let last = manifest[0]["Layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(|l| l.as_str())
        .ok_or_else(|| bad("its manifest.json lists no layers".into()))?;
    let &(offset, size) = members.get(last).ok_or_else(|| bad(format!("it lacks the member `{last}`")))?;
    let mut f = File::open(spool).map_err(BuildError::io_read(spool))?;
    f.seek(SeekFrom::Start(offset)).map_err(BuildError::io_read(spool))?;
    let mut magic = [0u8; 2];
    let _ = f.read(&mut magic);
    if magic == [0x1f, 0x8b] {
        f.seek(SeekFrom::Start(offset)).map_err(BuildError::io_read(spool))?;
        let out = work.join("layer.tar");
        let mut w = File::create(&out).map_err(BuildError::io_write(&out))?;
        let n = std::io::copy(&mut flate2::read::MultiGzDecoder::new(f.take(size)), &mut w)
            .map_err(|e| bad(format!("its layer does not decompress ({e})")))?;
        return Ok((out, 0, n));
    }
    Ok((spool.to_path_buf(), offset, size))
}

/// The engine creates bind-mount points (a secret's file, a cache mount's
/// folder, and the folders above them when the image lacks them) in the
/// container's own layer; the local sandbox keeps them below. Drop them,
/// unless the command changed more under those folders.
fn drop_mount_points(changes: &mut Vec<Change>, req: &RunRequest<'_>) -> Result<(), BuildError> {
    let files: Vec<String> = req.secrets.iter().map(|s| format!("run/secrets/{}", s.id)).collect();
    changes.retain(|c| !(files.contains(&c.path) && matches!(c.kind, ChangeKind::File { size: 0, .. })));
    // Deepest first, so a folder is judged after what is below it.
    let mut dirs: Vec<String> = Vec::new();
    if !req.secrets.is_empty() {
        dirs.extend(["run/secrets".to_string(), "run".to_string()]);
    }
    for m in req.cache_mounts {
        let mut at = m.target.as_str();
        loop {
            if !dirs.iter().any(|d| d == at) {
                dirs.push(at.to_string());
            }
            match at.rfind('/') {
                Some(i) => at = &at[..i],
                None => break,
            }
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.matches('/').count()));
    for dir in &dirs {
        let dir = dir.as_str();
        let prefix = format!("{dir}/");
        let has_children = changes.iter().any(|c| c.path.starts_with(&prefix));
        let below = req.tree.get(dir)?;
        let unchanged = |c: &Change| match &below {
            None => true,
            Some(e) => matches!(e.kind, Kind::Dir) && (e.mode, e.uid, e.gid) == (c.mode, c.uid, c.gid),
        };
        if !has_children {
            changes.retain(|c| {
                !(c.path == dir && matches!(c.kind, ChangeKind::Dir { opaque: false }) && unchanged(c))
            });
        }
    }
    Ok(())
}

/// Labels on the containers kiln runs steps in.
const LABEL_PID: &str = "io.kiln.pid";
const LABEL_BOOT: &str = "io.kiln.boot";

/// This boot of the machine (pids are only unique within one).
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default().trim().to_string()
}

fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// `name[:tag]` → (repository, tag), `latest` by default.
/// Refuses a `docker:` reference the engine would refuse when kiln loads
/// the image (checked before a build starts): `[HOST[:PORT]/]NAME[:TAG]`,
/// the name's parts lowercase letters and digits joined by `.`, `_`, `__`
/// or `-`, the tag up to 128 of letters, digits, `_`, `.` and `-`.
pub fn check_ref(r: &str) -> Result<(), crate::BuildError> {
    let bad = |why: &str| {
        crate::BuildError::usage(
            format!("`docker:{}` is not a reference the engine takes: {why}", r.escape_debug()),
            Some("write `docker:NAME[:TAG]`, e.g. `docker:kiln-example-app:1.0` (names are lowercase)"),
        )
    };
    let (name, tag) = split_ref(r);
    let tag_ok = |t: &str| {
        !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    if !tag_ok(tag) {
        return Err(bad(
            "the tag is 1 to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`",
        ));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // A first part with a `.` or a `:`, or `localhost`, is a registry host:
    // DNS labels (letters, digits, `-`) joined by `.`, and a port.
    if parts.len() > 1 && (parts[0].contains(['.', ':']) || parts[0] == "localhost") {
        let host = parts.remove(0);
        let (domain, port) = host.split_once(':').unwrap_or((host, "1"));
        let label_ok = |l: &str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        if !domain.split('.').all(label_ok) || port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad("the registry host is DNS labels joined by `.`, with an optional `:PORT`"));
        }
    }
    // Each part: lowercase letters and digits, runs of them joined by one
    // separator: `.`, `_`, `__` or one or more `-` (the distribution grammar).
    let part_ok = |p: &str| {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        if !p.starts_with(alnum) || !p.ends_with(alnum) {
            return false;
        }
        // Between runs of letters and digits, each separator is one of the allowed ones.
        p.split(alnum)
            .filter(|s| !s.is_empty())
            .all(|s| matches!(s, "." | "_" | "__") || s.chars().all(|c| c == '-'))
    };
    if name.is_empty() || name.len() > 255 || !parts.iter().all(|p| part_ok(p)) {
        return Err(bad("the name's parts are lowercase letters and digits, joined by `.`, `_` or `-`"));
    }
    Ok(())
}

pub fn split_ref(r: &str) -> (&str, &str) {
    match r.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (r, "latest"),
    }
}

/// Sends what is written as chunks down a channel (the body of a request).
struct ChannelWriter(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::other("the engine stopped reading"))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn references_the_engine_takes_pass_and_others_are_refused() {
        for good in
            ["kiln-example-x", "localhost:5000/a/b_c:v1.0", "a.b/c__d-e:latest", "busybox-run:latest", "x"]
        {
            assert!(check_ref(good).is_ok(), "{good}");
        }
        for bad in [
            "Upper",
            "app:bad tag",
            "app:-x",
            "",
            "a//b",
            "-a",
            "a..b",
            "a___b",
            "app:",
            "a/B:1",
            "a._b",
            "a.-b",
            "a&b=c:1/x",
            "a&b.c/x",
            "h.io:/x",
            "a-/b",
        ] {
            assert!(check_ref(bad).is_err(), "{bad}");
        }
    }
    use super::*;

    #[test]
    fn references_split_into_repository_and_tag() {
        assert_eq!(split_ref("app"), ("app", "latest"));
        assert_eq!(split_ref("app:v1"), ("app", "v1"));
        assert_eq!(split_ref("localhost:5000/app"), ("localhost:5000/app", "latest"));
        assert_eq!(split_ref("localhost:5000/app:v2"), ("localhost:5000/app", "v2"));
    }
}
