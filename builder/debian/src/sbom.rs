//! An SPDX 2.3 JSON document for a locked package set. kiln writes it into
//! the packages' layer (`/var/lib/kiln/sbom.spdx.json`) and `kiln sbom`
//! reads it back. Everything in it comes from kiln.lock, the packages'
//! control files and the image's epoch, so it is as reproducible as the
//! layer: no wall clock, no mirror (the files are pinned by sha256).

use serde_json::{json, Value};

use kiln_cache::Digest;

use super::deb822::Paragraph;
use super::lockfile::PackageLock;
use crate::image::rfc3339;

/// Where the SBOM sits in the image.
pub(crate) const PATH: &str = "var/lib/kiln/sbom.spdx.json";

fn spdx_id(name: &str, arch: &str) -> String {
    let clean = |s: &str| {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '-' }).collect::<String>()
    };
    format!("SPDXRef-Package-deb-{}-{}", clean(name), clean(arch))
}

/// The document; `controls` are the packages' control paragraphs, in lock order.
pub(crate) fn document(lock: &PackageLock, controls: &[&Paragraph], epoch: u64) -> Vec<u8> {
    let ids: Vec<String> = lock
        .packages
        .iter()
        .map(|p| format!("{} {} {} {}", p.name, p.version, p.architecture, p.sha256))
        .collect();
    let namespace = Digest::of(ids.join("\n").as_bytes()).hex();
    let mut packages = Vec::new();
    let mut relationships = Vec::new();
    for (p, control) in lock.packages.iter().zip(controls) {
        let id = spdx_id(&p.name, &p.architecture);
        let supplier =
            control.get("Maintainer").map(|m| format!("Person: {m}")).unwrap_or_else(|| "NOASSERTION".into());
        let mut pkg = json!({
            "name": p.name,
            "SPDXID": id,
            "versionInfo": p.version,
            "supplier": supplier,
            // The file is pinned by its sha256; any mirror of the archive has it.
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "checksums": [{ "algorithm": "SHA256", "checksumValue": p.sha256 }],
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": format!(
                    "pkg:deb/debian/{}@{}?arch={}&distro={}",
                    p.name, purl_escape(&p.version), p.architecture, lock.request.suites[0]
                ),
            }],
            "comment": format!("from the suite {}: {}", p.suite, p.filename),
        });
        if let Some(src) = control.get("Source") {
            pkg["sourceInfo"] = Value::String(format!("built from the Debian source package {src}"));
        }
        if let Some(h) = control.get("Homepage") {
            pkg["homepage"] = Value::String(h.to_string());
        }
        if let Some(d) = control.get("Description") {
            pkg["summary"] = Value::String(d.lines().next().unwrap_or_default().to_string());
        }
        packages.push(pkg);
        relationships.push(json!({
            "spdxElementId": "SPDXRef-DOCUMENT",
            "relationshipType": "DESCRIBES",
            "relatedSpdxElement": id,
        }));
    }
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("debian-packages-{}", lock.request.suites[0]),
        "documentNamespace": format!("https://kiln.invalid/spdx/debian-packages/{namespace}"),
        "creationInfo": {
            "created": rfc3339(epoch),
            "creators": [concat!("Tool: kiln-", env!("CARGO_PKG_VERSION"))],
        },
        "packages": packages,
        "relationships": relationships,
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("json");
    out.push(b'\n');
    out
}

/// Percent-encodes what a purl version may not hold (`:` of an epoch, `+`).
fn purl_escape(v: &str) -> String {
    v.chars()
        .map(|c| match c {
            ':' => "%3A".to_string(),
            '+' => "%2B".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// The SBOM of the image made of `layers` (named `name` in messages): the
/// one kiln wrote into it, or, for an image with Debian packages that kiln
/// did not install, one made from its `/var/lib/dpkg/status` (versions, no
/// package checksums).
pub fn for_layers(
    store: &kiln_cache::Store,
    layers: &[kiln_oci::image::ImageLayer],
    name: &str,
) -> Result<Vec<u8>, crate::BuildError> {
    let tree = kiln_oci::fstree::FsTree::of_layers(store, layers)?;
    let read = |path: &str| kiln_oci::extract::read_file(store, layers, &tree, path);
    if let Some(doc) = read(PATH)? {
        return Ok(doc);
    }
    if let Some(status) = read("var/lib/dpkg/status")? {
        return from_status(&String::from_utf8_lossy(&status), name);
    }
    Err(crate::BuildError::usage(
        format!("`{name}` holds no Debian packages: it has neither /{PATH} nor /var/lib/dpkg/status"),
        Some("`kiln sbom` describes images with Debian packages, such as those built with `[packages]`"),
    ))
}

/// An SPDX document from a dpkg status file: installed packages only.
fn from_status(text: &str, image: &str) -> Result<Vec<u8>, crate::BuildError> {
    let paragraphs = super::deb822::parse(text).map_err(|e| crate::BuildError::BadImage {
        image: image.to_string(),
        reason: format!("/var/lib/dpkg/status is malformed: {e}"),
    })?;
    let mut packages = Vec::new();
    let mut relationships = Vec::new();
    let mut names = Vec::new();
    for p in paragraphs.iter().filter(|p| p.get("Status").is_some_and(|s| s.ends_with(" installed"))) {
        let (Some(name), Some(version)) = (p.get("Package"), p.get("Version")) else { continue };
        let arch = p.get("Architecture").unwrap_or("all");
        let id = spdx_id(name, arch);
        names.push(format!("{name} {version} {arch}"));
        packages.push(json!({
            "name": name,
            "SPDXID": id,
            "versionInfo": version,
            "supplier": p.get("Maintainer").map(|m| format!("Person: {m}")).unwrap_or_else(|| "NOASSERTION".into()),
            "downloadLocation": "NOASSERTION",
            "filesAnalyzed": false,
            "licenseConcluded": "NOASSERTION",
            "licenseDeclared": "NOASSERTION",
            "copyrightText": "NOASSERTION",
            "externalRefs": [{
                "referenceCategory": "PACKAGE-MANAGER",
                "referenceType": "purl",
                "referenceLocator": format!("pkg:deb/debian/{name}@{}?arch={arch}", purl_escape(version)),
            }],
        }));
        relationships.push(json!({
            "spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": id,
        }));
    }
    let doc = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("dpkg-status-{image}"),
        "documentNamespace": format!("https://kiln.invalid/spdx/dpkg-status/{}", Digest::of(names.join("\n").as_bytes()).hex()),
        "creationInfo": { "created": rfc3339(0), "creators": [concat!("Tool: kiln-", env!("CARGO_PKG_VERSION"))] },
        "packages": packages,
        "relationships": relationships,
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("json");
    out.push(b'\n');
    Ok(out)
}
