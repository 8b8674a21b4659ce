//! How a layer says that something of the layers below is gone (OCI image
//! spec, "Representing Changes"): the one definition every reader and
//! writer of layers uses. A leaf: it depends on nothing.

/// An entry named `.wh.NAME` hides `NAME` (and what is under it) in the
/// layers below.
pub const WHITEOUT: &str = ".wh.";
/// An entry of this name in a folder hides everything the layers below
/// hold in that folder.
pub const OPAQUE: &str = ".wh..wh..opq";
