//! Colours for the text outputs people read on terminals: the replay
//! here, the tables and messages of the `textpoke` command.
//!
//! Whether to colour is the caller's choice (the command's `--color` and
//! `NO_COLOR`); this module only says how. Colour is added around text
//! that is already escaped ([`escape`](crate::escape) turns the ESC of a
//! function or process name into `\e`, so a name never brings colour of
//! its own) and already padded, so that columns stay aligned: the escape
//! sequences take no room on the screen but count as characters for
//! `format!`'s widths.

/// A text style (SGR parameters of an ANSI escape sequence).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Headings.
    Bold,
    /// Comments and what matters less.
    Dim,
    /// Errors, lost events, the longest durations.
    Red,
    /// Warnings, long durations.
    Yellow,
    /// Notes.
    Cyan,
}

impl Style {
    fn sgr(self) -> &'static str {
        match self {
            Style::Bold => "\x1b[1m",
            Style::Dim => "\x1b[2m",
            Style::Red => "\x1b[31m",
            Style::Yellow => "\x1b[33m",
            Style::Cyan => "\x1b[36m",
        }
    }
}

/// Resets every style.
const RESET: &str = "\x1b[0m";

/// Whether to colour, and the colouring of the things every output has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Colors {
    /// Colour when `true`; plain text otherwise.
    pub on: bool,
}

impl Colors {
    /// No colour.
    pub const OFF: Colors = Colors { on: false };

    /// `text` in `style`, or `text` as it is when colour is off.
    pub fn paint(self, style: Style, text: &str) -> String {
        if self.on && !text.is_empty() {
            format!("{}{text}{RESET}", style.sgr())
        } else {
            text.to_string()
        }
    }

    /// `text` in the style [`duration_style`] gives `ns`.
    pub fn duration(self, ns: u64, text: &str) -> String {
        match duration_style(ns) {
            Some(s) => self.paint(s, text),
            None => text.to_string(),
        }
    }
}

/// How a duration stands out: a second or more red, a millisecond or more
/// yellow, shorter ones plain (the long calls are the ones to look at).
pub fn duration_style(ns: u64) -> Option<Style> {
    match ns {
        1_000_000_000.. => Some(Style::Red),
        1_000_000.. => Some(Style::Yellow),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_is_plain_and_on_wraps() {
        assert_eq!(Colors::OFF.paint(Style::Red, "x"), "x");
        assert_eq!(Colors { on: true }.paint(Style::Red, "x"), "\x1b[31mx\x1b[0m");
        assert_eq!(Colors { on: true }.paint(Style::Red, ""), "", "nothing to colour");
        assert_eq!(Colors { on: true }.duration(999_999, "short"), "short");
        assert_eq!(Colors { on: true }.duration(2_000_000, "long"), "\x1b[33mlong\x1b[0m");
        assert_eq!(Colors { on: true }.duration(1_000_000_000, "longest"), "\x1b[31mlongest\x1b[0m");
    }
}
