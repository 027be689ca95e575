//! Which functions an op traces: a [`Filter`] asks a matcher about each
//! (demangled) function name, as ftrace's set_ftrace_filter and
//! set_ftrace_notrace and uftrace's -F/-N choose functions.
//!
//! The engine knows no pattern syntax: a matcher is any shareable
//! `Fn(&str) -> bool`. Glob lists (what `textpoke record -F/-N` and `ctl`
//! take) are compiled above the engine, with globset, by the recorder
//! crate's `textpoke_record::filter`, which builds a [`Filter`] and
//! reports a glob that does not parse as a [`FilterError`].

use std::fmt;
use std::sync::Arc;

/// What a [`Filter`] asks: whether the op traces the function of this
/// name.
type Matcher = dyn Fn(&str) -> bool + Send + Sync;

/// Which functions an op traces: those its matcher says yes to, or all.
#[derive(Clone, Default)]
pub struct Filter {
    /// `None`: every function.
    matcher: Option<Arc<Matcher>>,
}

/// A filter that could not be built: a pattern that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad function filter {glob:?}: {reason}")]
pub struct FilterError {
    pub glob: String,
    pub reason: String,
}

impl Filter {
    /// Traces everything.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Traces the functions whose names `matcher` says yes to. It is asked
    /// on the control path only (registering an op, changing its filter,
    /// finding new sites), never on a traced call.
    pub fn new(matcher: impl Fn(&str) -> bool + Send + Sync + 'static) -> Filter {
        Filter { matcher: Some(Arc::new(matcher)) }
    }

    pub fn matches(&self, function: &str) -> bool {
        self.matcher.as_ref().is_none_or(|m| m(function))
    }
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.matcher.is_some() { "Filter(matcher)" } else { "Filter(all)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_matcher() {
        assert!(Filter::all().matches("anything"));
        let f = Filter::new(|name| name.starts_with("tp_") && name != "tp_skip");
        assert!(f.matches("tp_work") && !f.matches("tp_skip") && !f.matches("other"));
        assert!(f.clone().matches("tp_work"));
    }
}
