//! References to images in the forms the CLI and recipes accept:
//! `oci:DIR[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE`, `docker:REF`,
//! `registry:HOST/REPO:TAG`, `vm:FILE`.

use std::path::PathBuf;

/// A place an image is read from or written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    Oci { dir: PathBuf, tag: Option<String> },
    OciArchive(PathBuf),
    DockerArchive(PathBuf),
    Docker(String),
    Registry(String),
    Vm(PathBuf),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RefError {
    #[error("`{0}` has no transport; write it as `oci:DIR[:TAG]`, `oci-archive:FILE`, `docker-archive:FILE`, `docker:REF`, `registry:HOST/REPO:TAG` or `vm:FILE`")]
    NoTransport(String),
    #[error("unknown transport `{0}:`; expected `oci:`, `oci-archive:`, `docker-archive:`, `docker:`, `registry:` or `vm:`")]
    UnknownTransport(String),
    #[error("`{0}` names no path")]
    Empty(String),
    #[error("`{0}` is not a valid tag: tags are 1 to 128 of `A-Za-z0-9_.-`, not starting with `.` or `-`")]
    BadTag(String),
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, RefError> {
        let (transport, rest) = s.split_once(':').ok_or_else(|| RefError::NoTransport(s.into()))?;
        if rest.is_empty() {
            return Err(RefError::Empty(s.into()));
        }
        Ok(match transport {
            "oci" => {
                let (dir, tag) = split_tag(rest)?;
                ImageRef::Oci { dir: PathBuf::from(dir), tag }
            }
            "oci-archive" => ImageRef::OciArchive(rest.into()),
            "docker-archive" => ImageRef::DockerArchive(rest.into()),
            "docker" => ImageRef::Docker(rest.into()),
            "registry" => ImageRef::Registry(rest.into()),
            "vm" => ImageRef::Vm(rest.into()),
            other => return Err(RefError::UnknownTransport(other.into())),
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Oci { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Oci { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageRef::OciArchive(p) => write!(f, "oci-archive:{}", p.display()),
            ImageRef::DockerArchive(p) => write!(f, "docker-archive:{}", p.display()),
            ImageRef::Docker(r) => write!(f, "docker:{r}"),
            ImageRef::Registry(r) => write!(f, "registry:{r}"),
            ImageRef::Vm(p) => write!(f, "vm:{}", p.display()),
        }
    }
}

/// Splits `DIR[:TAG]`. The part after the last `:` is a tag when it holds no
/// `/`; a path that itself contains `:` can be written with a trailing tag.
fn split_tag(s: &str) -> Result<(&str, Option<String>), RefError> {
    match s.rsplit_once(':') {
        Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => {
            if !is_valid_tag(tag) {
                return Err(RefError::BadTag(tag.into()));
            }
            Ok((dir, Some(tag.to_string())))
        }
        _ => Ok((s, None)),
    }
}

/// OCI distribution tag grammar: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub(crate) fn is_valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_layouts_with_and_without_tags() {
        assert_eq!(
            ImageRef::parse("oci:out/hello").unwrap(),
            ImageRef::Oci { dir: "out/hello".into(), tag: None }
        );
        assert_eq!(
            ImageRef::parse("oci:out/hello:v1").unwrap(),
            ImageRef::Oci { dir: "out/hello".into(), tag: Some("v1".into()) }
        );
        assert_eq!(ImageRef::parse("oci:/a:b/c").unwrap(), ImageRef::Oci { dir: "/a:b/c".into(), tag: None });
        assert_eq!(ImageRef::parse("oci:x:-bad"), Err(RefError::BadTag("-bad".into())));
    }

    #[test]
    fn rejects_unknown_transports() {
        assert!(matches!(ImageRef::parse("foo:bar"), Err(RefError::UnknownTransport(_))));
        assert!(matches!(ImageRef::parse("out/dir"), Err(RefError::NoTransport(_))));
        assert!(matches!(ImageRef::parse("oci:"), Err(RefError::Empty(_))));
    }
}
