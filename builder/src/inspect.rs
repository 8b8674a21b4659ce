//! `kiln inspect`: an image's manifest, config and layers.

use serde::Serialize;

use kiln_cache::{Digest, Store};
use kiln_recipes::ImageRef;

use crate::base::open_image as import;
use crate::error::BuildError;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub(crate) reference: String,
    pub manifest: Digest,
    pub config: Digest,
    pub architecture: String,
    pub os: String,
    pub created: Option<String>,
    pub layers: Vec<LayerInfo>,
    /// The manifest's annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The config's `config` object as stored (with Docker's `Healthcheck` and `Shell`).
    pub config_json: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct LayerInfo {
    pub digest: Digest,
    pub(crate) diff_id: Digest,
    pub size: u64,
    pub(crate) media_type: String,
    pub created_by: Option<String>,
}

pub fn inspect(store: &Store, target: &ImageRef) -> Result<Inspection, BuildError> {
    let img = import(store, target)?;
    let history: Vec<_> = img
        .config_json
        .history()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|h| !h.empty_layer().unwrap_or(false))
        .collect();
    let layers = img
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| LayerInfo {
            digest: l.digest,
            diff_id: l.diff_id,
            size: l.size,
            media_type: l.media_type.clone(),
            created_by: history.get(i).and_then(|h| h.created_by().clone()),
        })
        .collect();
    Ok(Inspection {
        reference: target.to_string(),
        manifest: img.manifest,
        config: img.config,
        architecture: img.config_json.architecture().to_string(),
        os: img.config_json.os().to_string(),
        created: img.config_json.created().clone(),
        layers,
        config_json: {
            let mut c = serde_json::to_value(img.config_json.config()).unwrap_or_default();
            if !img.docker_config.is_empty() {
                if c.is_null() {
                    c = serde_json::Value::Object(Default::default());
                }
                if let Some(obj) = c.as_object_mut() {
                    obj.extend(img.docker_config.clone());
                }
            }
            c
        },
        annotations: img.annotations,
    })
}
