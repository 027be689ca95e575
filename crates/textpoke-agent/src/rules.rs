//! Ordered filter rules (`+GLOB` traces, `-GLOB` stops tracing; the last
//! rule matching a function decides) and their translation into the
//! tracer's [`Filter`].
//!
//! The glob filter ([`GlobFilter`](textpoke_record::filter::GlobFilter))
//! is an include set and an exclude set, which cannot say "trace `work*`
//! although an earlier rule excluded `w*`". So except for the plain cases
//! that a glob [`Filter`] says exactly (only `+` rules, then
//! only `-` rules: what `textpoke record -F … -N …` gives), the rules are
//! evaluated over the names of the functions the tracer knows, and the
//! filter lists the chosen names literally (escaped). Functions of objects
//! loaded later are evaluated when the tracer finds them (the agent
//! recomputes the filter after every refresh).
//!
//! A rule drops the earlier rules it overrides everywhere: those with the
//! same glob, and all of them when its glob is `*`. They could decide
//! nothing any more, and `textpoke ctl PID enable|disable` may push rules
//! forever: kept, each (a compiled matcher of a few KiB) grew the
//! program's memory and the time every filter update takes (issue #10,
//! defect 1).

use globset::{Glob, GlobMatcher};
use std::collections::BTreeSet;
use textpoke::trace::{Filter, FilterError};
use textpoke_record::filter::glob_filter;

/// One rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub enable: bool,
    pub glob: String,
    matcher: GlobMatcher,
}

impl Rule {
    pub fn new(enable: bool, glob: &str) -> Result<Rule, FilterError> {
        let matcher = Glob::new(glob)
            .map_err(|e| FilterError { glob: glob.to_owned(), reason: e.kind().to_string() })?
            .compile_matcher();
        Ok(Rule { enable, glob: glob.to_owned(), matcher })
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matcher.is_match(name)
    }

    /// `+GLOB` or `-GLOB`.
    pub fn text(&self) -> String {
        format!("{}{}", if self.enable { '+' } else { '-' }, self.glob)
    }
}

/// The rules of the recording op.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// `+` each include glob (or `+*` when there is none), then `-` each
    /// exclude glob: the meaning of `textpoke record -F … -N …`.
    pub fn new(include: &[String], exclude: &[String]) -> Result<Rules, FilterError> {
        let mut rules = Vec::new();
        if include.is_empty() {
            rules.push(Rule::new(true, "*")?);
        }
        for g in include {
            rules.push(Rule::new(true, g)?);
        }
        for g in exclude {
            rules.push(Rule::new(false, g)?);
        }
        Ok(Rules { rules })
    }

    /// Adds `rule` after the others, dropping those it overrides for every
    /// name (same glob, or any glob when it is `*`).
    pub fn push(&mut self, rule: Rule) {
        if rule.glob == "*" {
            self.rules.clear();
        } else {
            self.rules.retain(|r| r.glob != rule.glob);
        }
        self.rules.push(rule);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// Whether `name` is traced: the last matching rule decides; none
    /// matching means not traced.
    pub fn traces(&self, name: &str) -> bool {
        self.rules.iter().rev().find(|r| r.matches(name)).is_some_and(|r| r.enable)
    }

    /// The rules are `+` rules followed by `-` rules, which a [`Filter`]
    /// expresses as globs.
    fn is_plain(&self) -> bool {
        let first_minus = self.rules.iter().position(|r| !r.enable).unwrap_or(self.rules.len());
        self.rules[..first_minus].iter().all(|r| r.enable) && self.rules[first_minus..].iter().all(|r| !r.enable)
    }

    /// The tracer filter for these rules over the functions `names`.
    pub fn filter<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<Filter, FilterError> {
        if self.is_plain() {
            let include: Vec<&str> = self.rules.iter().filter(|r| r.enable).map(|r| r.glob.as_str()).collect();
            let exclude: Vec<&str> = self.rules.iter().filter(|r| !r.enable).map(|r| r.glob.as_str()).collect();
            if include.is_empty() {
                return glob_filter(Vec::<String>::new(), ["*"]);
            }
            return glob_filter(include, exclude);
        }
        let chosen: BTreeSet<String> = names.into_iter().filter(|n| self.traces(n)).map(globset::escape).collect();
        if chosen.is_empty() {
            return glob_filter(Vec::<String>::new(), ["*"]);
        }
        glob_filter(chosen, Vec::<String>::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<&'static str> {
        vec!["work", "worker", "fib", "leaf", "main", "ns::f<int>()", "a[1]"]
    }

    fn traced(rules: &Rules) -> Vec<&'static str> {
        let f = rules.filter(names()).unwrap();
        names().into_iter().filter(|n| f.matches(n)).collect()
    }

    #[test]
    fn plain_rules_are_globs() {
        let r = Rules::new(&[], &[]).unwrap();
        assert_eq!(traced(&r), names());
        let r = Rules::new(&["w*".into()], &["worker".into()]).unwrap();
        assert_eq!(traced(&r), ["work"]);
        assert!(r.is_plain());
    }

    #[test]
    fn last_rule_wins() {
        let mut r = Rules::new(&[], &[]).unwrap();
        r.push(Rule::new(false, "*").unwrap());
        assert!(traced(&r).is_empty());
        r.push(Rule::new(true, "w*").unwrap());
        assert!(!r.is_plain());
        assert_eq!(traced(&r), ["work", "worker"]);
        r.push(Rule::new(false, "worker").unwrap());
        r.push(Rule::new(true, "ns::*").unwrap());
        r.push(Rule::new(true, "a[[]1]").unwrap());
        assert_eq!(traced(&r), ["work", "ns::f<int>()", "a[1]"]);
    }

    #[test]
    fn overridden_rules_are_dropped() {
        let text = |r: &Rules| r.iter().map(Rule::text).collect::<Vec<_>>().join(" ");
        let mut r = Rules::new(&[], &["leaf".into()]).unwrap();
        for _ in 0..10_000 {
            r.push(Rule::new(false, "*").unwrap());
            r.push(Rule::new(true, "*").unwrap());
        }
        assert_eq!(text(&r), "+*", "enable/disable cycles keep one rule");
        for _ in 0..10_000 {
            r.push(Rule::new(false, "w*").unwrap());
            r.push(Rule::new(true, "w*").unwrap());
        }
        assert_eq!(text(&r), "+* +w*");
        r.push(Rule::new(false, "worker").unwrap());
        r.push(Rule::new(false, "w*").unwrap());
        assert_eq!(text(&r), "+* -worker -w*", "the same glob moves last");
        assert_eq!(traced(&r), ["fib", "leaf", "main", "ns::f<int>()", "a[1]"]);
        r.push(Rule::new(false, "*").unwrap());
        assert_eq!(text(&r), "-*");
        assert!(traced(&r).is_empty());
    }
}
