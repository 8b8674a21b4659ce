//! Bases: where an image starts. `scratch` is empty; the other kinds are
//! imported into the store (see `kiln_oci::import`) and described by their
//! manifest digest, which is what the first step's key builds on.

use oci_spec::image::ImageConfiguration;

use crate::registry::client::Registry;
use crate::registry::client::{RegistryError, Remote};
use kiln_cache::{Digest, Store};
use kiln_recipes::recipe::Platform;
use kiln_recipes::{Base, Recipe};

use crate::error::BuildError;
use crate::image::StoredImage;
use crate::image::{scratch_config, ImageLayer};
use crate::packages::lockfile::BasePin;
use kiln_recipes::ImageRef;

/// A base ready to build on: every blob is in the store.
#[derive(Debug, Clone)]
pub(crate) struct BaseImage {
    /// What the first step's key builds on: `scratch` or the manifest digest.
    pub(crate) id: String,
    pub(crate) config: ImageConfiguration,
    /// The base's `Healthcheck` and `Shell`, which OCI's config type does not hold.
    pub(crate) docker_config: kiln_oci::image::DockerConfig,
    pub(crate) layers: Vec<ImageLayer>,
    /// For a `registry:` base, the repository its blobs can be mounted from.
    pub(crate) source: Option<Remote>,
}

/// What `registry:` bases need: a client, kiln.lock's pins, and where to
/// report downloads and a pinned tag that moved.
pub(crate) struct Remotes<'a> {
    /// The client, made on first use.
    pub(crate) registry: &'a dyn Fn() -> &'a Registry,
    pub(crate) pins: &'a [BasePin],
    pub(crate) reporter: &'a dyn crate::Reporter,
}

/// Connects to the engine, for `docker:REF` bases.
pub(crate) type Engine<'a> =
    &'a dyn Fn() -> Result<std::sync::Arc<crate::exec::docker::DockerEngine>, BuildError>;

pub(crate) fn load_base(
    store: &Store,
    recipe: &Recipe,
    base: &Base,
    base_span: Option<kiln_recipes::Span>,
    platform: &Platform,
    engine: Engine<'_>,
    remotes: &Remotes<'_>,
) -> Result<BaseImage, BuildError> {
    let at = |message: String, hint: &str| -> BuildError {
        recipe.error_at(base_span.clone().unwrap_or(0..0), message).with_hint(hint).into()
    };
    match base {
        Base::Scratch => Ok(BaseImage {
            id: "scratch".into(),
            config: scratch_config(platform),
            docker_config: Default::default(),
            layers: Vec::new(),
            source: None,
        }),
        Base::Registry(text) => {
            let r =
                Remote::parse(text).map_err(|e| at(e.to_string(), "e.g. `registry:ghcr.io/org/app:1.0`"))?;
            let not_found = |e: BuildError| match crate::registry::client::registry_error(&e) {
                Some(RegistryError::NotFound { reference }) => at(
                    format!("{reference} is not in the registry"),
                    "check the repository and tag, e.g. `skopeo list-tags docker://HOST/REPO`",
                ),
                _ => e,
            };
            let pinned = match r.digest {
                Some(_) => r.clone(),
                None => r.with_digest(resolve_registry_tag(store, base, &r, remotes).map_err(not_found)?),
            };
            let (img, source) =
                crate::registry::pull(store, (remotes.registry)(), &pinned, platform, remotes.reporter)
                    .map_err(not_found)?;
            check_arch(recipe, &img.config_json, base_span, platform)?;
            Ok(BaseImage {
                id: img.manifest.to_string(),
                config: img.config_json,
                docker_config: img.docker_config,
                layers: img.layers,
                source: Some(source),
            })
        }
        other => {
            let r = other.image_ref().expect("an image base (stages are resolved by the build)");
            let imported = match other {
                Base::Docker(reference) => engine()?.base_image(store, reference).and_then(|img| {
                    img.ok_or_else(|| {
                        recipe
                            .error_at(
                                base_span.clone().unwrap_or(0..0),
                                format!("the Docker engine has no image `{reference}`"),
                            )
                            .with_hint(format!("`docker pull {reference}` or `docker load` it first"))
                            .into()
                    })
                }),
                _ => open_image_for(store, &r, platform),
            };
            let img = imported.map_err(|e| match e {
                // A base that cannot be opened is a problem of the recipe: point at it.
                BuildError::Read { path, source } => recipe
                    .error_at(
                        base_span.clone().unwrap_or(0..0),
                        format!("cannot read the base `{}`: {source}", path.display()),
                    )
                    .with_hint("the path is relative to the recipe's folder")
                    .into(),
                BuildError::Usage { message, hint } => recipe
                    .error_at(base_span.clone().unwrap_or(0..0), format!("cannot read the base: {message}"))
                    .with_hint(hint.unwrap_or_else(|| "the path is relative to the recipe's folder".into()))
                    .into(),
                e => e,
            })?;
            check_arch(recipe, &img.config_json, base_span, platform)?;
            Ok(BaseImage {
                id: img.manifest.to_string(),
                config: img.config_json,
                docker_config: img.docker_config,
                layers: img.layers,
                source: None,
            })
        }
    }
}

fn check_arch(
    recipe: &Recipe,
    config: &ImageConfiguration,
    base_span: Option<kiln_recipes::Span>,
    platform: &Platform,
) -> Result<(), BuildError> {
    let arch = config.architecture().to_string();
    if arch != platform.architecture {
        let span = base_span.unwrap_or(0..0);
        return Err(recipe
            .error_at(span, format!("the base is a `{arch}` image, but the build is for `{platform}`"))
            .with_hint(format!("set `platform = \"linux/{arch}\"` or use a base for `{platform}`"))
            .into());
    }
    Ok(())
}

/// The digest a tagged `registry:` base builds from: kiln.lock's pin when
/// there is one (saying so when the tag has moved since), else what the
/// tag names now (saying that it is not pinned).
fn resolve_registry_tag(
    store: &Store,
    base: &Base,
    r: &Remote,
    remotes: &Remotes<'_>,
) -> Result<Digest, BuildError> {
    let name = base.to_string();
    let pin = remotes.pins.iter().find(|p| p.reference == name);
    let Some(pin) = pin else {
        let d = crate::registry::digest_of(store, (remotes.registry)(), r)?;
        remotes.reporter.on_notice(&format!(
            "{name} is not pinned in kiln.lock; building {d}, what the tag names now (`kiln lock` pins it)"
        ));
        return Ok(d);
    };
    let pinned: Digest = pin.digest.parse().map_err(|e| {
        BuildError::usage(
            format!("kiln.lock pins {name} to `{}`, which is not a digest ({e})", pin.digest),
            Some("run `kiln lock RECIPE` to write it again"),
        )
    })?;
    match crate::registry::resolve_tag(store, (remotes.registry)(), r, true) {
        Ok(Some(now)) if now != pinned => remotes.reporter.on_notice(&format!(
            "{name} has moved: kiln.lock pins {pinned}, the tag now names {now}; building the pinned image (`kiln lock` moves the pin)"
        )),
        Ok(Some(_)) => {}
        Ok(None) => remotes.reporter.on_notice(&format!(
            "{name} no longer exists in the registry; building the pinned {pinned}"
        )),
        Err(e) => remotes.reporter.on_notice(&format!("cannot check whether {name} has moved ({e}); building the pinned {pinned}")),
    }
    Ok(pinned)
}

/// Reads the image `r` names into the store, checked, and describes it:
/// local layouts and archives through `kiln_oci::import`, `docker:REF` from
/// the engine at DOCKER_HOST, `registry:` pulled (for `inspect`, `diff`,
/// `sbom` and bases).
pub(crate) fn open_image(store: &Store, r: &ImageRef) -> Result<StoredImage, BuildError> {
    open_image_for(store, r, &Platform::host())
}

/// [`open_image`], taking the image for `platform` from a multi-platform
/// layout or archive (a base, for the build's platform).
pub(crate) fn open_image_for(
    store: &Store,
    r: &ImageRef,
    platform: &Platform,
) -> Result<StoredImage, BuildError> {
    if let ImageRef::Docker(reference) = r {
        let rt = crate::runtime::runtime()?;
        let engine = crate::exec::docker::DockerEngine::connect(rt.handle().clone())?;
        return engine.base_image(store, reference)?.ok_or_else(|| {
            BuildError::usage(
                format!("The Docker engine has no image `{reference}`"),
                Some("check the name with `docker images`"),
            )
        });
    }
    if let ImageRef::Registry(text) = r {
        return pull_registry(store, text);
    }
    crate::import::import(store, r, platform)
}

/// `registry:HOST/REPO:TAG|@DIGEST` (for `inspect`, `diff`, `sbom`): what
/// the reference names now, for the host's platform, pulled and checked.
fn pull_registry(store: &Store, text: &str) -> Result<StoredImage, BuildError> {
    use crate::registry::client::{Registry, Remote};
    let rt = crate::runtime::runtime()?;
    let remote = Remote::parse(text)?;
    let reg = Registry::new(rt.handle().clone(), std::slice::from_ref(&remote), &Default::default());
    let pinned = remote.with_digest(crate::registry::digest_of(store, &reg, &remote)?);
    let platform = kiln_recipes::recipe::Platform::host();
    Ok(crate::registry::pull(store, &reg, &pinned, &platform, &crate::NullReporter)?.0)
}

/// The recipe's `registry:` bases that name a tag (a digest needs no pin).
pub fn tagged_bases(recipe: &Recipe) -> Result<Vec<(String, Remote)>, BuildError> {
    let mut out = Vec::new();
    for (base, span) in std::iter::once((&recipe.image.base, recipe.image.base_span.clone()))
        .chain(recipe.stages.iter().map(|s| (&s.base, s.base_span.clone())))
    {
        if let Base::Registry(text) = base {
            let r = Remote::parse(text)
                .map_err(|e| BuildError::from(recipe.error_at(span.unwrap_or(0..0), e.to_string())))?;
            if r.digest.is_none() {
                out.push((base.to_string(), r));
            }
        }
    }
    Ok(out)
}
