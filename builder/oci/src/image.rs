//! An image as kiln handles it: its config and its layers; building the OCI
//! config and manifest with canonical JSON (sorted keys, no whitespace), so
//! the same image always has the same bytes and digests.

use std::collections::BTreeMap;

use oci_spec::image::{
    Config, ConfigBuilder, DescriptorBuilder, History, HistoryBuilder, ImageConfiguration,
    ImageConfigurationBuilder, ImageManifest, ImageManifestBuilder, MediaType, RootFsBuilder,
};
use serde::Serialize;

use kiln_cache::{Digest, ImageRecord, StepRecord, Store};
use kiln_recipes::recipe::Platform;

use crate::error::BuildError;

pub const MANIFEST_MEDIA_TYPE: &str = OCI_MANIFEST;
/// The manifest and index media types kiln reads, OCI's and Docker's
/// (the one place they are spelled; the registry client asks for these).
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub(crate) const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// One layer of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageLayer {
    pub diff_id: Digest,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

impl From<StepRecord> for ImageLayer {
    fn from(r: StepRecord) -> ImageLayer {
        ImageLayer { diff_id: r.diff_id, digest: r.digest, size: r.size, media_type: r.media_type }
    }
}

impl ImageLayer {
    pub fn step_record(&self) -> StepRecord {
        StepRecord {
            diff_id: self.diff_id,
            digest: self.digest,
            size: self.size,
            media_type: self.media_type.clone(),
        }
    }

    /// The layer's tar stream from the store, decompressed as its media type
    /// says: `+gzip`, `+zstd`, or a plain tar; any other is refused.
    pub fn open_tar(&self, store: &Store) -> Result<Box<dyn std::io::Read>, BuildError> {
        let file = std::io::BufReader::with_capacity(1 << 20, store.open_blob(&self.digest)?);
        let mt = self.media_type.as_str();
        let refused = |reason: String| BuildError::BadLayer { layer: self.digest, reason };
        Ok(if mt.ends_with("gzip") {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else if mt.ends_with("zstd") {
            Box::new(
                zstd::stream::read::Decoder::with_buffer(file).map_err(|e| refused(format!("zstd: {e}")))?,
            )
        } else if mt.ends_with("tar") {
            Box::new(file)
        } else {
            return Err(refused(format!("its media type `{mt}` is not supported (gzip, zstd or plain tar)")));
        })
    }
}

/// An image whose blobs are all in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest: Digest,
    pub(crate) manifest_size: u64,
    pub config: Digest,
    pub config_json: ImageConfiguration,
    pub layers: Vec<ImageLayer>,
    /// The manifest's annotations (also put on an OCI index entry for it).
    pub annotations: BTreeMap<String, String>,
    /// What the config's `config` holds that OCI does not model and Docker
    /// does: `Healthcheck` and `Shell`, kept so images built on this one
    /// inherit them.
    pub docker_config: DockerConfig,
}

/// `Healthcheck` and `Shell` of a config's `config` object, as JSON.
pub type DockerConfig = serde_json::Map<String, serde_json::Value>;

/// [`DockerConfig`] of a config's JSON (a base's: another builder's word),
/// kept only in the shapes Docker writes: `Healthcheck` with a `Test` of
/// strings, durations as whole nanoseconds and a `Retries` count (other
/// keys dropped); `Shell` as strings. Anything else is dropped whole.
pub(crate) fn docker_config_of(config: &[u8]) -> DockerConfig {
    use serde_json::Value;
    const MAX_ITEMS: usize = 256;
    let strings = |v: &Value| {
        v.as_array()
            .filter(|a| !a.is_empty() && a.len() <= MAX_ITEMS && a.iter().all(Value::is_string))
            .cloned()
    };
    let mut out = DockerConfig::new();
    let Ok(Value::Object(mut top)) = serde_json::from_slice(config) else { return out };
    let Some(Value::Object(c)) = top.remove("config") else { return out };
    if let Some(Value::Object(h)) = c.get("Healthcheck") {
        if let Some(test) = h.get("Test").and_then(strings) {
            let mut kept = serde_json::Map::new();
            kept.insert("Test".into(), Value::Array(test));
            for key in ["Interval", "Timeout", "StartPeriod", "StartInterval", "Retries"] {
                // Docker's fields are int64.
                if let Some(n) = h.get(key).filter(|v| v.as_u64().is_some_and(|n| n <= i64::MAX as u64)) {
                    kept.insert(key.into(), n.clone());
                }
            }
            out.insert("Healthcheck".into(), Value::Object(kept));
        }
    }
    if let Some(shell) = c.get("Shell").and_then(strings) {
        out.insert("Shell".into(), Value::Array(shell));
    }
    out
}

/// What a new image adds beyond its config and layers.
#[derive(Debug, Clone, Default)]
pub struct ImageExtras {
    /// The manifest's annotations; `org.opencontainers.image.created` (the epoch) is added.
    pub annotations: BTreeMap<String, String>,
    /// Put into the config's `config` object.
    pub docker_config: DockerConfig,
}

/// The annotation kiln gives every manifest it writes: the epoch.
pub const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";

impl StoredImage {
    pub(crate) fn blobs(&self) -> Vec<Digest> {
        let mut v = vec![self.manifest, self.config];
        v.extend(self.layers.iter().map(|l| l.digest));
        v
    }

    /// Records the image as `kind/key` (`images` or `bases`), so prune keeps
    /// its blobs together and later builds find it.
    pub fn record(
        &self,
        store: &Store,
        kind: kiln_cache::RecordKind,
        key: &str,
        name: &str,
    ) -> Result<(), BuildError> {
        let rec = ImageRecord { name: name.to_string(), manifest: self.manifest, blobs: self.blobs() };
        store.write_record(kind, key, &rec)?;
        Ok(())
    }
}

#[cfg(test)]
mod docker_config_tests {
    use super::docker_config_of;

    #[test]
    fn a_bases_docker_fields_are_kept_only_in_dockers_shapes() {
        let good = br#"{"config":{"Healthcheck":{"Test":["CMD","x"],"Interval":30000000000,"Retries":3,"Evil":{"a":1}},"Shell":["/bin/bash","-c"]}}"#;
        let c = docker_config_of(good);
        assert_eq!(
            serde_json::Value::Object(c),
            serde_json::json!({"Healthcheck": {"Test": ["CMD", "x"], "Interval": 30000000000u64, "Retries": 3}, "Shell": ["/bin/bash", "-c"]})
        );
        for bad in [
            br#"{"config":{"Healthcheck":{"Test":"CMD x"},"Shell":"/bin/sh"}}"#.as_slice(),
            br#"{"config":{"Healthcheck":{"Test":[1]},"Shell":[]}}"#,
            br#"{"config":{"Healthcheck":[],"Shell":[{"a":1}]}}"#,
            br#"not json"#,
        ] {
            assert!(docker_config_of(bad).is_empty(), "{}", String::from_utf8_lossy(bad));
        }
        let big = format!(r#"{{"config":{{"Shell":[{}]}}}}"#, vec!["\"x\""; 300].join(","));
        assert!(docker_config_of(big.as_bytes()).is_empty());
        let c = docker_config_of(
            br#"{"config":{"Healthcheck":{"Test":["NONE"],"Interval":-5,"Timeout":1.5,"Retries":18446744073709551615}}}"#,
        );
        assert_eq!(serde_json::Value::Object(c), serde_json::json!({"Healthcheck": {"Test": ["NONE"]}}));
    }
}

/// Canonical JSON: objects with sorted keys (serde_json's map is ordered),
/// no whitespace. oci-spec keeps labels in hash maps, so going through
/// `Value` is what makes the bytes stable.
pub fn canonical_json<T: Serialize>(v: &T) -> Vec<u8> {
    let value = serde_json::to_value(v).expect("OCI types serialize");
    serde_json::to_vec(&value).expect("JSON values serialize")
}

/// `1970-01-01T00:00:00Z` style time for an epoch in seconds.
pub fn rfc3339(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// The config of an empty image for `platform`.
pub fn scratch_config(platform: &Platform) -> ImageConfiguration {
    let mut c = ImageConfigurationBuilder::default()
        .architecture(platform.architecture.as_str())
        .os(platform.os.as_str())
        .rootfs(
            RootFsBuilder::default().typ("layers").diff_ids(Vec::<String>::new()).build().expect("rootfs"),
        )
        .build()
        .expect("config");
    if let Some(v) = &platform.variant {
        c.set_variant(Some(v.clone()));
    }
    c
}

/// A history entry for a step.
pub fn history(epoch: u64, created_by: &str, empty_layer: bool) -> History {
    let mut b = HistoryBuilder::default().created(rfc3339(epoch)).created_by(created_by).comment("kiln");
    if empty_layer {
        b = b.empty_layer(true);
    }
    b.build().expect("history")
}

/// Applies the recipe's `[config]` on top of the base's runtime config,
/// as Dockerfile instructions would.
pub fn merge_config(base: Option<&Config>, r: &kiln_recipes::Config) -> Config {
    let mut c = base.cloned().unwrap_or_else(|| ConfigBuilder::default().build().expect("config"));
    if let Some(ep) = &r.entrypoint {
        c.set_entrypoint(Some(ep.clone()));
        if r.cmd.is_none() {
            c.set_cmd(None); // a new entrypoint drops the base's cmd, as in Dockerfiles
        }
    }
    if let Some(cmd) = &r.cmd {
        c.set_cmd(Some(cmd.clone()));
    }
    let mut env: Vec<String> = c.env().clone().unwrap_or_default();
    for (k, v) in &r.env {
        let item = format!("{k}={v}");
        match env.iter_mut().find(|e| e.split_once('=').map(|(n, _)| n) == Some(k.as_str())) {
            Some(slot) => *slot = item,
            None => env.push(item),
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        // As BuildKit does for images that set no PATH.
        env.insert(0, format!("PATH={}", crate::pathvar::DEFAULT_PATH));
    }
    c.set_env(Some(env));
    if let Some(w) = &r.workdir {
        c.set_working_dir(Some(w.clone()));
    }
    if let Some(u) = &r.user {
        c.set_user(Some(u.clone()));
    }
    if !r.labels.is_empty() {
        let mut labels = c.labels().clone().unwrap_or_default();
        labels.extend(r.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        c.set_labels(Some(labels));
    }
    if !r.ports.is_empty() {
        c.set_exposed_ports(Some(union(c.exposed_ports().as_deref(), &r.ports)));
    }
    if !r.volumes.is_empty() {
        c.set_volumes(Some(union(c.volumes().as_deref(), &r.volumes)));
    }
    if let Some(s) = &r.stop_signal {
        c.set_stop_signal(Some(s.clone()));
    }
    c
}

/// The base's values and the recipe's, sorted, each once.
fn union(base: Option<&[String]>, more: &[String]) -> Vec<String> {
    let mut v: Vec<String> = base.unwrap_or_default().iter().chain(more).cloned().collect();
    v.sort();
    v.dedup();
    v
}

/// Writes the config and manifest blobs for `layers` on top of `config`.
pub fn store_image(
    store: &Store,
    mut config: ImageConfiguration,
    layers: Vec<ImageLayer>,
    epoch: u64,
    extras: &ImageExtras,
) -> Result<StoredImage, BuildError> {
    config.set_created(Some(rfc3339(epoch)));
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    config.set_rootfs(RootFsBuilder::default().typ("layers").diff_ids(diff_ids).build().expect("rootfs"));
    let mut value = serde_json::to_value(&config).expect("OCI types serialize");
    if !extras.docker_config.is_empty() {
        let top = value.as_object_mut().expect("a config is an object");
        let inner = top.entry("config").or_insert_with(|| serde_json::Value::Object(Default::default()));
        if let Some(inner) = inner.as_object_mut() {
            inner.extend(extras.docker_config.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    let config_bytes = serde_json::to_vec(&value).expect("JSON values serialize");
    let config_digest = store.put_blob(&config_bytes)?;

    let layer_descs = layers
        .iter()
        .map(|l| {
            DescriptorBuilder::default()
                .media_type(MediaType::Other(l.media_type.clone()))
                .digest(oci_digest(&l.digest))
                .size(l.size)
                .build()
                .expect("descriptor")
        })
        .collect::<Vec<_>>();
    let mut manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(
            DescriptorBuilder::default()
                .media_type(MediaType::ImageConfig)
                .digest(oci_digest(&config_digest))
                .size(config_bytes.len() as u64)
                .build()
                .expect("descriptor"),
        )
        .layers(layer_descs)
        .build()
        .expect("manifest");
    let mut annotations = extras.annotations.clone();
    annotations.insert(CREATED_ANNOTATION.into(), rfc3339(epoch));
    manifest.set_annotations(Some(annotations.clone().into_iter().collect()));
    let manifest_bytes = canonical_json(&manifest);
    let manifest_digest = store.put_blob(&manifest_bytes)?;
    Ok(StoredImage {
        manifest: manifest_digest,
        manifest_size: manifest_bytes.len() as u64,
        config: config_digest,
        config_json: config,
        layers,
        annotations,
        docker_config: extras.docker_config.clone(),
    })
}

pub(crate) fn oci_digest(d: &Digest) -> oci_spec::image::Digest {
    d.to_string().parse().expect("sha256 digests are valid OCI digests")
}

/// The largest JSON document (index, manifest, config, record) kiln reads
/// from a file or a registry: real ones are kilobytes; registries cap
/// manifests at 4 MiB.
pub(crate) const MAX_DOCUMENT: u64 = 16 << 20;

/// Opens a file kiln was pointed at (an archive, a blob of a layout) for
/// reading: never through a symlink in its last component, and only a
/// regular file (a fifo would hang, `/dev/zero` would never end). The
/// errors are `InvalidData` for what is there but not a file.
pub fn open_regular(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP => std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "it is a symlink, which kiln does not follow here",
        ),
        e => e.into(),
    })?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "it is not a regular file"));
    }
    rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
    Ok(std::fs::File::from(fd))
}

/// A JSON document from a file ([`open_regular`]), refused past
/// [`MAX_DOCUMENT`] bytes rather than cut.
pub(crate) fn read_document(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = open_regular(path)?;
    let mut v = Vec::new();
    f.take(MAX_DOCUMENT + 1).read_to_end(&mut v)?;
    if v.len() as u64 > MAX_DOCUMENT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is larger than {} MiB", MAX_DOCUMENT >> 20),
        ));
    }
    Ok(v)
}

/// What is wrong with a JSON document, without the document's own bytes
/// (serde's messages quote the values they refuse): the kind of error and
/// where it is.
pub(crate) fn json_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "it cannot be read",
        Category::Syntax => "it is not valid JSON",
        Category::Eof => "it ends too early",
        Category::Data => "it does not have the expected fields and types",
    };
    format!("{what}, at line {} column {}", e.line(), e.column())
}

/// The one place an image is picked for a platform from an index (an OCI
/// layout's, an archive's, a registry's): the manifest whose platform has
/// the same OS and architecture, and the same variant when `platform` names
/// one. The error lists what the index has.
pub fn select_platform<'a>(
    manifests: &'a [oci_spec::image::Descriptor],
    platform: &kiln_recipes::recipe::Platform,
) -> Result<&'a oci_spec::image::Descriptor, String> {
    let matches = |p: &oci_spec::image::Platform| {
        p.os().to_string() == platform.os
            && p.architecture().to_string() == platform.architecture
            && (platform.variant.is_none() || p.variant() == &platform.variant)
    };
    manifests.iter().find(|d| d.platform().as_ref().is_some_and(matches)).ok_or_else(|| {
        let have: Vec<String> = manifests
            .iter()
            .filter_map(|d| d.platform().as_ref())
            .map(|p| match p.variant() {
                Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
                None => format!("{}/{}", p.os(), p.architecture()),
            })
            .collect();
        format!(
            "it has no image for {platform} (it has: {})",
            if have.is_empty() { "none".into() } else { have.join(", ") }
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn canonical_json_sorts_label_keys() {
        let mut r = kiln_recipes::Config::default();
        for k in ["z", "a", "m", "b", "y"] {
            r.labels.insert(k.into(), "v".into());
        }
        let c = merge_config(None, &r);
        let s = String::from_utf8(canonical_json(&c)).unwrap();
        assert!(s.contains(r#""Labels":{"a":"v","b":"v","m":"v","y":"v","z":"v"}"#), "{s}");
    }
}
