//! `kiln sbom`: the SPDX document of any image kiln can open.

use kiln_cache::Store;
use kiln_recipes::ImageRef;

use crate::BuildError;

/// The SBOM of the image `r` names (see [`crate::packages::sbom::for_layers`]).
pub fn for_image(store: &Store, r: &ImageRef) -> Result<Vec<u8>, BuildError> {
    let img = crate::base::open_image(store, r)?;
    crate::packages::sbom::for_layers(store, &img.layers, &r.to_string())
}
