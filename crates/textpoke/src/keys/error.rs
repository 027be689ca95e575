//! Typed errors of static keys. Every one names the key(s) concerned; none
//! of them leaves a site half-patched unless it says so.

use std::path::PathBuf;

use crate::error::PokeError;

/// Why a key operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// `dec()` on a key whose reference count is 0.
    #[error(
        "static key `{key}`: dec() with reference count 0 (more dec() than inc() or enable()); nothing was patched"
    )]
    Underflow { key: String },

    /// `inc()` on a key whose reference count is `i32::MAX`.
    #[error("static key `{key}`: reference count overflow in inc(); nothing was patched")]
    Overflow { key: String },

    /// `disable()` (or an [`Update`](super::Update) disabling the key) while
    /// `inc()` references hold it enabled.
    #[error(
        "static key `{key}`: disable() while {count} references hold it enabled; balance each inc() with a dec() \
         instead (nothing was patched)"
    )]
    Shared { key: String, count: i32 },

    /// The key is not recorded in any loaded object: it was not defined with
    /// `define_static_key_*!`/`TEXTPOKE_DEFINE_STATIC_KEY_*`, its object's
    /// records were stripped, or its object is no longer loaded.
    #[error(
        "static key `{key}` at {addr:#x} is not recorded in any loaded object (define keys with \
         define_static_key_false!/true! or TEXTPOKE_DEFINE_STATIC_KEY_FALSE/TRUE; is its object still loaded?); \
         nothing was patched"
    )]
    Unregistered { key: String, addr: usize },

    /// No loaded object defines a key of this name.
    #[error("no loaded object defines a static key named `{name}`")]
    NotFound { name: String },

    /// Several loaded objects define a key of this name.
    #[error("{} loaded objects define a static key named `{name}`: {}; flip it through the key itself", .objects.len(), list(.objects))]
    Ambiguous { name: String, objects: Vec<PathBuf> },

    /// One update names the same key twice.
    #[error("static key `{key}` appears twice in one update; nothing was patched")]
    Duplicate { key: String },

    /// The records of the key's object are malformed; patching from them
    /// could miss sites or write wrong code.
    #[error("static key `{key}`: the textpoke records of {path} are malformed ({what}); nothing was patched")]
    BadObject { key: String, path: PathBuf, what: String },

    /// An earlier commit failed after writing some of this key's sites.
    #[error(
        "static key `{key}`: an earlier flip failed part-way and left its sites in an unknown state; \
         it is not patched any more"
    )]
    Poisoned { key: String },

    /// The poke engine refused or failed the batch (boxed: a `PokeError` is
    /// large, and keys return `Result` on every flip).
    #[error("static key(s) {keys}: patching {sites} branch site(s) failed: {source}")]
    Patch {
        keys: String,
        sites: usize,
        #[source]
        source: Box<PokeError>,
    },

    /// Objects kept being loaded and unloaded while the keys layer tried to
    /// pin them for a flip.
    #[error("static key(s) {keys}: libraries kept being loaded or unloaded during {attempts} attempts to pin them; nothing was patched, try again")]
    Unsettled { keys: String, attempts: u32 },
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl KeyError {
    /// Whether the error is a misuse of the key's API (unbalanced counts,
    /// unknown or ambiguous names) rather than a failure to patch.
    pub fn is_misuse(&self) -> bool {
        matches!(
            self,
            KeyError::Underflow { .. }
                | KeyError::Overflow { .. }
                | KeyError::Shared { .. }
                | KeyError::NotFound { .. }
                | KeyError::Ambiguous { .. }
                | KeyError::Duplicate { .. }
                | KeyError::Unregistered { .. }
        )
    }
}
