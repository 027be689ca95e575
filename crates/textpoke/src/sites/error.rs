//! Errors of the `sites` layer.

use std::io;
use std::path::PathBuf;

/// Why the sites of one loaded object could not be found.
///
/// An error is about one object: [`SiteTable`](super::SiteTable) records it
/// next to that object and goes on with the others.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SitesError {
    /// The object's file could not be opened (deleted, renamed, no
    /// permission). Its sites are unknown.
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The object's file is not an ELF file the `object` crate can read.
    #[error("cannot read {path} as ELF: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: object::read::Error,
    },

    /// The file is ELF but not of a kind this layer handles (other machine,
    /// 32-bit, relocatable object, ...).
    #[error("{path}: unsupported ELF file: {what}")]
    Unsupported { path: PathBuf, what: String },

    /// The file on disk is not the file that was loaded: it was replaced
    /// after the object was mapped. Reading its sections would give wrong
    /// addresses, so nothing is read.
    #[error("{path}: the file on disk does not match the loaded object: {what}")]
    FileMismatch { path: PathBuf, what: String },

    /// The object was unloaded (dlclose) before it could be examined.
    #[error("{path}: no longer loaded at bias {bias:#x}")]
    Unloaded { path: PathBuf, bias: usize },

    /// A site section is malformed (size not a multiple of the address size,
    /// ...).
    #[error("{path}: section {section}: {what}")]
    BadSection { path: PathBuf, section: &'static str, what: String },
}
