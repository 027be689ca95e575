//! Which functions an op traces, as glob lists: include and exclude globs
//! over (demangled) function names, as ftrace's set_ftrace_filter and
//! set_ftrace_notrace and uftrace's -F/-N do.
//!
//! The engine's [`Filter`] takes any matcher and knows no glob syntax;
//! this module compiles glob lists with globset into one. It was the
//! engine's `textpoke::trace::filter`: names, behaviour and error messages
//! are those it had ([`GlobFilter::new`] was `Filter::new`).

use globset::{Glob, GlobSet, GlobSetBuilder};
use textpoke::trace::{Filter, FilterError};

/// Include and exclude globs. No include glob means "everything".
#[derive(Clone, Debug, Default)]
pub struct GlobFilter {
    include: Vec<String>,
    exclude: Vec<String>,
    inc: GlobSet,
    exc: GlobSet,
}

fn build(globs: &[String]) -> Result<GlobSet, FilterError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = Glob::new(g).map_err(|e| FilterError { glob: g.clone(), reason: e.kind().to_string() })?;
        b.add(glob);
    }
    b.build().map_err(|e| FilterError { glob: globs.join(","), reason: e.to_string() })
}

/// Traces what matches some `include` glob (all if empty) and no
/// `exclude` glob: [`GlobFilter::new`] as the tracer's [`Filter`].
pub fn glob_filter<I, E>(include: I, exclude: E) -> Result<Filter, FilterError>
where
    I: IntoIterator,
    I::Item: Into<String>,
    E: IntoIterator,
    E::Item: Into<String>,
{
    Ok(GlobFilter::new(include, exclude)?.into_filter())
}

impl GlobFilter {
    /// Traces everything.
    pub fn all() -> GlobFilter {
        GlobFilter::default()
    }

    /// Traces what matches some `include` glob (all if empty) and no
    /// `exclude` glob.
    pub fn new<I, E>(include: I, exclude: E) -> Result<GlobFilter, FilterError>
    where
        I: IntoIterator,
        I::Item: Into<String>,
        E: IntoIterator,
        E::Item: Into<String>,
    {
        let include: Vec<String> = include.into_iter().map(Into::into).collect();
        let exclude: Vec<String> = exclude.into_iter().map(Into::into).collect();
        Ok(GlobFilter { inc: build(&include)?, exc: build(&exclude)?, include, exclude })
    }

    pub fn matches(&self, function: &str) -> bool {
        (self.include.is_empty() || self.inc.is_match(function)) && !self.exc.is_match(function)
    }

    pub fn include(&self) -> &[String] {
        &self.include
    }
    pub fn exclude(&self) -> &[String] {
        &self.exclude
    }

    /// The tracer's filter matching as this one does.
    pub fn into_filter(self) -> Filter {
        Filter::new(move |function: &str| self.matches(function))
    }
}

impl From<GlobFilter> for Filter {
    fn from(f: GlobFilter) -> Filter {
        f.into_filter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_exclude() {
        let f = glob_filter(["tp_*", "main"], ["tp_skip*"]).unwrap();
        assert!(f.matches("tp_work") && f.matches("main"));
        assert!(!f.matches("tp_skip_me") && !f.matches("other"));
        assert!(Filter::all().matches("anything"));
        assert!(GlobFilter::all().matches("anything"));
        assert!(glob_filter(["a[b"], Vec::<String>::new()).is_err());
        let e = GlobFilter::new(["a[b"], Vec::<String>::new()).unwrap_err();
        assert_eq!(e.to_string(), "bad function filter \"a[b\": unclosed character class; missing ']'");
    }
}
