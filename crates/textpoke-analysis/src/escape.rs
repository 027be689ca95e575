//! Text from outside made safe to print: the one escaping every text
//! output of textpoke uses (report, replay, folded stacks, flame graph
//! labels, `list`, `ctl`, error messages).
//!
//! # Why
//!
//! Function names come from the traced program's symbol table, process
//! names from what the program set with `prctl(PR_SET_NAME)`, paths from
//! the file system: any of them can hold `ESC [2J`, BEL, CR or LF. Printed
//! raw, they rewrite the reader's terminal and forge lines of a report.
//!
//! # The scheme
//!
//! Like `ls -b` and `git`'s quoted paths, every character a terminal acts
//! on or that does not show is replaced by a visible escape; everything
//! else, non-ASCII letters included, is kept:
//!
//! | character                                  | shown as                    |
//! |--------------------------------------------|-----------------------------|
//! | backslash                                  | `\\`                        |
//! | TAB, LF, CR, ESC                           | `\t`, `\n`, `\r`, `\e`      |
//! | other ASCII controls (U+0000–U+001F), DEL  | `\xHH`, e.g. `\x07`, `\x7f` |
//! | C1 controls (U+0080–U+009F)                | `\u{HH}`, e.g. `\u{9b}`     |
//! | format characters: bidi controls (U+202A–U+202E, U+2066–U+2069), zero-width characters, BOM, ... (Unicode category Cf), line and paragraph separators (U+2028, U+2029) | `\u{HHHH}`, e.g. `\u{202e}` |
//!
//! So a backslash in escaped text always starts an escape, and the
//! original can be read back. Invalid UTF-8 never gets here: names and
//! paths are decoded lossily first (U+FFFD, which shows).
//!
//! # JSON
//!
//! The JSON outputs (`report --format json`, `dump --chrome`) carry the
//! exact names: JSON escapes the ASCII controls itself, and
//! [`to_json_writer`] (or [`to_json_writer_pretty`]) writes the rest of the characters above (DEL, C1
//! controls, format characters) as `\uXXXX` escapes, which JSON leaves
//! raw. The decoded strings are exact, and the bytes are as safe on a
//! terminal as the text outputs. (The SVG flame graph gets its labels
//! from the escaped folded stacks.)

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter};
use std::borrow::Cow;
use std::fmt::Write;
use std::io;

/// `s` with every character that a terminal would act on, or that would
/// not show, replaced by a visible escape (see the [module
/// documentation](crate::escape)); borrowed when nothing needs escaping.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\' || c.is_control() || is_invisible(c)
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\t' => out.push_str("\\t"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\x1b' => out.push_str("\\e"),
        c if c.is_ascii_control() => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// Writes `value` as compact JSON to `w`, as `serde_json::to_writer`
/// does, with the characters [`escape`] escapes and JSON leaves raw
/// written as `\u` escapes (see the [module documentation](crate::escape)).
pub fn to_json_writer<W: io::Write, T: Serialize + ?Sized>(w: W, value: &T) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(w, TerminalSafe(CompactFormatter)))
}

/// As [`to_json_writer`], indented (`serde_json::to_writer_pretty`).
pub fn to_json_writer_pretty<W: io::Write, T: Serialize + ?Sized>(w: W, value: &T) -> serde_json::Result<()> {
    value.serialize(&mut serde_json::Serializer::with_formatter(w, TerminalSafe(PrettyFormatter::new())))
}

/// A JSON formatter `F` that also escapes, in strings, what JSON allows
/// raw and a terminal acts on.
struct TerminalSafe<F>(F);

/// Formatter methods passed on to the wrapped formatter unchanged.
macro_rules! pass_on {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $name<W: ?Sized + io::Write>(&mut self, w: &mut W $(, $arg: $ty)*) -> io::Result<()> {
            self.0.$name(w $(, $arg)*)
        }
    )*};
}

impl<F: Formatter> Formatter for TerminalSafe<F> {
    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            // ASCII controls and backslashes never reach a fragment: JSON
            // escapes them itself.
            if needs_escape(c) {
                self.0.write_string_fragment(w, &fragment[start..i])?;
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(w, "\\u{u:04x}")?;
                }
                start = i + c.len_utf8();
            }
        }
        self.0.write_string_fragment(w, &fragment[start..])
    }

    pass_on! {
        begin_array();
        end_array();
        begin_array_value(first: bool);
        end_array_value();
        begin_object();
        end_object();
        begin_object_key(first: bool);
        end_object_key();
        begin_object_value();
        end_object_value();
    }
}

/// Unicode format characters (general category Cf, Unicode 15.1) and the
/// line and paragraph separators (Zl, Zp): they reorder text (bidi
/// overrides), hide in it (zero-width), or break lines without a newline.
const INVISIBLE: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x2028, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

fn is_invisible(c: char) -> bool {
    let c = c as u32;
    INVISIBLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::escape;
    use std::borrow::Cow;

    #[test]
    fn plain_text_is_borrowed_unchanged() {
        for s in ["main", "std::vec::Vec<T>::push", "operator new(unsigned long)", "décodé", "名前", "a;b c", ""] {
            assert!(matches!(escape(s), Cow::Borrowed(b) if b == s), "{s:?}");
        }
    }

    #[test]
    fn controls_are_made_visible() {
        assert_eq!(escape("evil\x1b[2J\x07\r\nforged"), "evil\\e[2J\\x07\\r\\nforged");
        assert_eq!(escape("a\tb\0c\x7fd\x01"), "a\\tb\\x00c\\x7fd\\x01");
        assert_eq!(escape("csi\u{9b}31m nel\u{85}"), "csi\\u{9b}31m nel\\u{85}");
        assert_eq!(escape("back\\slash"), "back\\\\slash");
    }

    #[test]
    fn invisible_and_reordering_characters_are_made_visible() {
        for (c, shown) in [
            ('\u{202a}', "\\u{202a}"),
            ('\u{202e}', "\\u{202e}"),
            ('\u{2066}', "\\u{2066}"),
            ('\u{2069}', "\\u{2069}"),
            ('\u{200b}', "\\u{200b}"),
            ('\u{200f}', "\\u{200f}"),
            ('\u{2028}', "\\u{2028}"),
            ('\u{2029}', "\\u{2029}"),
            ('\u{feff}', "\\u{feff}"),
            ('\u{e0041}', "\\u{e0041}"),
        ] {
            assert_eq!(escape(&format!("x{c}y")), format!("x{shown}y"));
        }
        // Neighbours that print are kept.
        assert_eq!(escape("\u{2010}\u{2030}\u{206a}"), "\u{2010}\u{2030}\\u{206a}");
    }

    /// Reads escaped text back, failing on a backslash that starts no
    /// escape of the scheme.
    fn unescape(s: &str) -> String {
        let mut out = String::new();
        let mut it = s.chars();
        while let Some(c) = it.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            let code = match it.next() {
                Some('\\') => '\\' as u32,
                Some('t') => 9,
                Some('n') => 10,
                Some('r') => 13,
                Some('e') => 27,
                Some('x') => u32::from_str_radix(&it.by_ref().take(2).collect::<String>(), 16).unwrap(),
                Some('u') => {
                    assert_eq!(it.next(), Some('{'));
                    let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                    u32::from_str_radix(&hex, 16).unwrap()
                }
                other => panic!("a backslash before {other:?} in {s:?}"),
            };
            out.push(char::from_u32(code).unwrap());
        }
        out
    }

    #[test]
    fn json_is_exact_and_terminal_safe() {
        let names = ["evil\x1b[2J\x07\r\n\x7f", "csi\u{9b}31m", "rlo\u{202e}x", "tag\u{e0041}", "back\\slash \"q\""];
        for pretty in [false, true] {
            let mut out = Vec::new();
            let v = serde_json::json!({ "names": names });
            if pretty {
                super::to_json_writer_pretty(&mut out, &v).unwrap();
            } else {
                super::to_json_writer(&mut out, &v).unwrap();
            }
            let text = String::from_utf8(out).unwrap();
            assert!(text.chars().all(|c| c == '\n' || c == ' ' || !super::needs_escape(c) || c == '\\'), "{text:?}");
            assert!(text.contains("\\u009b") && text.contains("\\udb40\\udc41"), "{text}");
            assert_eq!(pretty, text.contains('\n'));
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back["names"], serde_json::json!(names));
        }
    }

    #[test]
    fn escaped_text_shows_and_reads_back() {
        let all: String = (0..0x3000u32).chain(0xE0000..0xE0100).filter_map(char::from_u32).collect();
        let e = escape(&all);
        assert!(e.chars().all(|c| !c.is_control() && !super::is_invisible(c)), "{e:?}");
        assert_eq!(unescape(&e), all);
    }
}
