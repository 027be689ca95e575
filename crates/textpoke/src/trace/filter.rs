//! Which functions an op traces: include and exclude glob lists over
//! (demangled) function names, as ftrace's set_ftrace_filter and
//! set_ftrace_notrace and uftrace's -F/-N do.

use globset::{Glob, GlobSet, GlobSetBuilder};

/// Include and exclude globs. No include glob means "everything".
#[derive(Clone, Debug, Default)]
pub struct Filter {
    include: Vec<String>,
    exclude: Vec<String>,
    inc: GlobSet,
    exc: GlobSet,
}

/// A glob that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad function filter {glob:?}: {reason}")]
pub struct FilterError {
    pub glob: String,
    pub reason: String,
}

fn build(globs: &[String]) -> Result<GlobSet, FilterError> {
    let mut b = GlobSetBuilder::new();
    for g in globs {
        let glob = Glob::new(g).map_err(|e| FilterError { glob: g.clone(), reason: e.kind().to_string() })?;
        b.add(glob);
    }
    b.build().map_err(|e| FilterError { glob: globs.join(","), reason: e.to_string() })
}

impl Filter {
    /// Traces everything.
    pub fn all() -> Filter {
        Filter::default()
    }

    /// Traces what matches some `include` glob (all if empty) and no
    /// `exclude` glob.
    pub fn new<I, E>(include: I, exclude: E) -> Result<Filter, FilterError>
    where
        I: IntoIterator,
        I::Item: Into<String>,
        E: IntoIterator,
        E::Item: Into<String>,
    {
        let include: Vec<String> = include.into_iter().map(Into::into).collect();
        let exclude: Vec<String> = exclude.into_iter().map(Into::into).collect();
        Ok(Filter { inc: build(&include)?, exc: build(&exclude)?, include, exclude })
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_exclude() {
        let f = Filter::new(["tp_*", "main"], ["tp_skip*"]).unwrap();
        assert!(f.matches("tp_work") && f.matches("main"));
        assert!(!f.matches("tp_skip_me") && !f.matches("other"));
        assert!(Filter::all().matches("anything"));
        assert!(Filter::new(["a[b"], Vec::<String>::new()).is_err());
    }
}
