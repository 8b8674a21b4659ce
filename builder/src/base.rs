//! Bases: where an image starts. `scratch` is empty; the other kinds are
//! imported into the store (see [`crate::import`]) and described by their
//! manifest digest, which is what the first step's key builds on.

use oci_spec::image::ImageConfiguration;

use kiln_cache::Store;
use kiln_recipes::recipe::Platform;
use kiln_recipes::{Base, Recipe};

use crate::error::BuildError;
use crate::image::{scratch_config, ImageLayer};

/// A base ready to build on: every blob is in the store.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// What the first step's key builds on: `scratch` or the manifest digest.
    pub id: String,
    pub config: ImageConfiguration,
    pub layers: Vec<ImageLayer>,
}

/// Connects to the engine, for `docker:REF` bases.
pub type Engine<'a> = &'a dyn Fn() -> Result<std::sync::Arc<crate::exec::docker::DockerEngine>, BuildError>;

pub fn load_base(
    store: &Store,
    recipe: &Recipe,
    base: &Base,
    base_span: Option<kiln_recipes::Span>,
    platform: &Platform,
    engine: Engine<'_>,
) -> Result<BaseImage, BuildError> {
    match base {
        Base::Scratch => {
            Ok(BaseImage { id: "scratch".into(), config: scratch_config(platform), layers: Vec::new() })
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
                _ => crate::import::import(store, &r),
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
                e => e,
            })?;
            let arch = img.config_json.architecture().to_string();
            if arch != platform.architecture {
                let span = base_span.clone().unwrap_or(0..0);
                return Err(recipe
                    .error_at(
                        span,
                        format!("the base is a `{arch}` image, but the build is for `{platform}`"),
                    )
                    .with_hint(format!("set `platform = \"linux/{arch}\"` or use a base for `{platform}`"))
                    .into());
            }
            Ok(BaseImage { id: img.manifest.to_string(), config: img.config_json, layers: img.layers })
        }
    }
}
