//! OpenAPI `pattern`s, matched as the API server matches them: Go's `regexp` (RE2 syntax,
//! unanchored search, linear time), here through the `regex` crate, which implements the same
//! syntax family without backtracking.
//!
//! The differences that change a match are translated before compiling:
//! - `\d \D \w \W \s \S` are ASCII in Go (`\s` is `[\t\n\f\r ]`, without `\v`) and Unicode in
//!   the `regex` crate; they become the explicit ASCII classes, inside brackets too.
//! - `\b \B` are ASCII word boundaries in Go; they become `(?-u:\b)` and `(?-u:\B)`.
//! - A `{` that does not start a repetition (`{n}`, `{n,}`, `{n,m}`) is a literal in Go and
//!   an error in the `regex` crate; it is escaped.
//!
//! What neither accepts (lookaround, backreferences) is a [`PatternError`]; the few things
//! only Go accepts (`\Q…\E`, `\C`) are errors here too, reported the same way rather than
//! matched differently.

/// A compiled `pattern`.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

/// A pattern that does not compile.
///
/// Displays as `error parsing regexp at offset <n> in '<pattern>': <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error parsing regexp at offset {offset} in '{pattern}': {message}")]
pub struct PatternError {
    /// The pattern source.
    pub pattern: String,
    /// Character offset of the problem.
    pub offset: usize,
    /// What is wrong, e.g. `look-around, including look-ahead and look-behind, is not
    /// supported`.
    pub message: String,
}

impl Pattern {
    /// Compiles `source` with Go's semantics (see the module docs).
    ///
    /// # Errors
    /// [`PatternError`] for malformed patterns and constructs RE2 does not have.
    pub fn new(source: &str) -> Result<Self, PatternError> {
        let error = |offset: usize, message: String| PatternError {
            pattern: source.to_string(),
            offset,
            message,
        };
        let translated = go_semantics(source).map_err(|(offset, m)| error(offset, m))?;
        // Offsets are counted in the translated pattern, which differs from the source only
        // after a Perl class or a literal brace.
        let ast = regex_syntax::ast::parse::Parser::new()
            .parse(&translated)
            .map_err(|e| {
                let offset = translated[..e.span().start.offset].chars().count();
                error(offset, e.kind().to_string())
            })?;
        if let Some((offset, message)) = beyond_re2(&ast) {
            return Err(error(translated[..offset].chars().count(), message));
        }
        let regex = regex::Regex::new(&translated)
            .map_err(|e| error(0, e.to_string().lines().last().unwrap_or("").trim().into()))?;
        Ok(Pattern {
            source: source.to_string(),
            regex,
        })
    }

    /// The pattern source.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True if the pattern matches anywhere in `text` (anchors restrict where).
    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// Largest count in `{m,n}`, as in RE2 (the `regex` crate bounds size instead).
const MAX_REPEAT: u32 = 1000;

/// The first repetition RE2 refuses and the `regex` crate accepts, as a byte offset and a
/// message: a count over [`MAX_REPEAT`] in `{m,n}`, or a repetition of a repetition (`a**`;
/// Go's "invalid nested repetition operator").
fn beyond_re2(ast: &regex_syntax::ast::Ast) -> Option<(usize, String)> {
    use regex_syntax::ast::{Ast, RepetitionKind, RepetitionRange};
    match ast {
        Ast::Repetition(rep) => {
            let over = match &rep.op.kind {
                RepetitionKind::Range(RepetitionRange::Exactly(n))
                | RepetitionKind::Range(RepetitionRange::AtLeast(n)) => *n > MAX_REPEAT,
                RepetitionKind::Range(RepetitionRange::Bounded(m, n)) => {
                    *m > MAX_REPEAT || *n > MAX_REPEAT
                }
                _ => false,
            };
            if over {
                let message = format!("invalid repeat count (over {MAX_REPEAT})");
                return Some((rep.op.span.start.offset, message));
            }
            if matches!(&*rep.ast, Ast::Repetition(_)) {
                let message = "invalid nested repetition operator".to_string();
                return Some((rep.op.span.start.offset, message));
            }
            beyond_re2(&rep.ast)
        }
        Ast::Group(group) => beyond_re2(&group.ast),
        Ast::Alternation(alt) => alt.asts.iter().find_map(beyond_re2),
        Ast::Concat(concat) => concat.asts.iter().find_map(beyond_re2),
        _ => None,
    }
}

/// The POSIX classes RE2 knows (`[[:alpha:]]`, negated `[[:^alpha:]]`).
const POSIX_CLASSES: [&str; 14] = [
    "alnum", "alpha", "ascii", "blank", "cntrl", "digit", "graph", "lower", "print", "punct",
    "space", "upper", "word", "xdigit",
];

/// Whether the text after a `{` makes it a repetition: digits, optionally a comma and more
/// digits, then `}` (Go's `parseRepeat`).
fn starts_repetition(rest: impl Iterator<Item = char>) -> bool {
    let mut digits = 0;
    let mut comma = false;
    for c in rest {
        match c {
            '0'..='9' => digits += 1,
            ',' if !comma && digits > 0 => comma = true,
            '}' => return digits > 0,
            _ => return false,
        }
    }
    false
}

/// Go's ASCII Perl classes, as bracket expressions (`\D` as `[^0-9]`).
fn ascii_class(name: char) -> Option<&'static str> {
    Some(match name {
        'd' => "[0-9]",
        'D' => "[^0-9]",
        'w' => "[0-9A-Za-z_]",
        'W' => "[^0-9A-Za-z_]",
        's' => r"[\t\n\x0C\r ]",
        'S' => r"[^\t\n\x0C\r ]",
        _ => return None,
    })
}

/// `source` with Go's ASCII meanings made explicit for the `regex` crate. Brackets nest in
/// the `regex` crate's classes, so `[\d.]` becomes `[[0-9].]`.
///
/// # Errors
/// The character offset and message of a POSIX class Go does not know (`[[:nope:]]`, which
/// the `regex` crate would read as a nested class of the characters `:nope:`).
fn go_semantics(source: &str) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(source.len() + 16);
    let mut chars = source.chars().peekable();
    // Depth of bracket expressions; a `]` right after `[` or `[^` is a literal.
    let mut depth = 0usize;
    let mut class_start = false;
    while let Some(c) = chars.next() {
        let at_class_start = std::mem::take(&mut class_start);
        match c {
            '\\' => {
                let Some(next) = chars.next() else {
                    out.push('\\');
                    break;
                };
                match (ascii_class(next), next) {
                    (Some(class), _) => out.push_str(class),
                    (None, 'b' | 'B') if depth == 0 => {
                        out.push_str("(?-u:\\");
                        out.push(next);
                        out.push(')');
                    }
                    _ => {
                        out.push('\\');
                        out.push(next);
                        // `\x{..}`, `\p{..}`, `\P{..}`: the braces belong to the escape.
                        if matches!(next, 'x' | 'p' | 'P') && chars.peek() == Some(&'{') {
                            for b in chars.by_ref() {
                                out.push(b);
                                if b == '}' {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            '{' if depth == 0 && !starts_repetition(chars.clone()) => out.push_str("\\{"),
            '[' if depth > 0 && chars.peek() == Some(&':') => {
                // A POSIX class `[:alpha:]`, copied whole once Go knows its name.
                let mut class = String::from("[");
                for p in chars.by_ref() {
                    class.push(p);
                    if p == ']' {
                        break;
                    }
                }
                let name = class.trim_start_matches("[:").trim_end_matches(":]");
                let name = name.strip_prefix('^').unwrap_or(name);
                if !POSIX_CLASSES.contains(&name) {
                    let at = source.find(&class).unwrap_or(0);
                    return Err((
                        source[..at].chars().count(),
                        format!("invalid character class range: `{class}`"),
                    ));
                }
                out.push_str(&class);
            }
            '[' => {
                depth += 1;
                out.push('[');
                if chars.peek() == Some(&'^') {
                    out.push('^');
                    chars.next();
                }
                class_start = true;
            }
            ']' if depth > 0 && !at_class_start => {
                depth -= 1;
                out.push(']');
            }
            _ => out.push(c),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perl_classes_and_word_boundaries_are_ascii_as_in_go() {
        let cases = [
            (r"^\d+$", "١٢٣", false), // Arabic-Indic digits: Unicode \d, not Go's
            (r"^\d+$", "123", true),
            (r"^\w+$", "héllo", false),
            (r"^\w+$", "hello_1", true),
            (r"^\s$", "\u{a0}", false), // no-break space
            (r"^\s$", "\u{b}", false),  // \v is not in Go's \s
            (r"^\s$", "\t", true),
            (r"^[\d.]+$", "1.2.3", true),
            (r"^[^\d]+$", "abc", true),
            (r"^[^\d]+$", "a1", false),
            (r"^[\D]+$", "a1", false),
            (r"\bé", "aé", true), // é is not an ASCII word character: a boundary in Go
            (r"^[]a]+$", "]a]", true),
            (r"^[[:alpha:]\d]+$", "ab12", true),
            (r"^(?i)web$", "WEB", true),
            (r"^\p{Greek}+$", "αβγ", true),
        ];
        for (pattern, text, want) in cases {
            let p = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(p.is_match(text), want, "{pattern} on {text:?}");
        }
    }

    #[test]
    fn what_re2_lacks_is_an_error_at_its_offset() {
        let e = Pattern::new("(?=x)").unwrap_err();
        assert_eq!(e.offset, 0, "{e}");
        assert!(e.message.contains("look-around"), "{e}");
        let e = Pattern::new(r"(a)\1").unwrap_err();
        assert_eq!(e.offset, 3, "{e}");
        assert!(e.message.contains("backreferences"), "{e}");
        assert!(Pattern::new("a{2,1}").is_err());
        assert!(Pattern::new("(unclosed").is_err());
        assert!(
            Pattern::new("a{1001}").is_err(),
            "RE2's repeat limit is 1000"
        );
    }

    #[test]
    fn pattern_matching() {
        let table: &[(&str, &str, bool)] = &[
            ("^[0-9]+(ms|s|m|h)$", "30s", true),
            ("^[0-9]+(ms|s|m|h)$", "150ms", true),
            ("^[0-9]+(ms|s|m|h)$", "5 minutes", false),
            ("^[0-9]+(ms|s|m|h)$", "5d", false),
            ("^[0-9]+(ms|s|m|h)$", "h", false),
            ("abc", "xxabcxx", true),
            ("^abc", "xxabc", false),
            ("abc$", "abcx", false),
            ("", "anything", true),
            ("^$", "", true),
            ("^$", "x", false),
            ("a.c", "abc", true),
            ("a.c", "a\nc", false),
            ("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "my-site-1", true),
            ("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "-bad", false),
            ("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "bad-", false),
            ("^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "Upper", false),
            ("^[^/]+$", "no-slash", true),
            ("^[^/]+$", "a/b", false),
            ("^[]a]+$", "]a]", true),
            ("^[a-]+$", "a-a", true),
            ("^[\\d.]+$", "1.2.3", true),
            ("^[\\D]+$", "abc", true),
            ("^[\\D]+$", "a1", false),
            ("^\\d{3}$", "123", true),
            ("^\\d{3}$", "12", false),
            ("^\\d{3}$", "1234", false),
            ("^a{2,}$", "aaaa", true),
            ("^a{2,}$", "a", false),
            ("^a{1,3}$", "aaa", true),
            ("^a{1,3}$", "aaaa", false),
            ("^a{0}b$", "b", true),
            ("^\\w+@\\w+\\.com$", "me@host.com", true),
            ("^\\w+@\\w+\\.com$", "me@hostxcom", false),
            ("^\\s*$", " \t\n", true),
            ("^\\S+$", "a b", false),
            ("\\bcat\\b", "a cat sat", true),
            ("\\bcat\\b", "concatenate", false),
            ("\\Bcat", "concat", true),
            ("^(a|b)*c$", "ababc", true),
            ("^(a|b)*c$", "abxc", false),
            ("^(a*)*$", "aaaa", true),
            (
                "^(a*)*b$",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaac",
                false,
            ),
            ("^(?:ab)+$", "abab", true),
            ("^(?P<x>ab)+$", "abab", true),
            ("^(?<x>ab)?c$", "c", true),
            ("^a+?b*?$", "aab", true),
            ("^\\x41\\x{1F600}$", "A😀", true),
            ("^[[:alpha:]][[:alnum:]_]*$", "a1_", true),
            ("^[[:alpha:]][[:alnum:]_]*$", "1a", false),
            ("^é+$", "éé", true),
            ("^a{,3}$", "a{,3}", true),
            ("^\\.\\*\\/$", ".*/", true),
            ("\\Aab\\z", "ab", true),
            ("x|^y$", "zy", false),
            ("x|^y$", "zx", true),
        ];
        for &(pattern, input, expected) in table {
            let compiled = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
            assert_eq!(compiled.is_match(input), expected, "{pattern} on {input:?}");
            assert_eq!(compiled.as_str(), pattern);
        }
    }

    #[test]
    fn pattern_errors() {
        // Each is refused by Go's regexp too.
        let table = [
            ("(?=a)", "look-around"),
            ("(?!a)", "look-around"),
            ("(?<=a)b", "look-around"),
            ("(a)\\1", "backreferences"),
            ("\\q", "unrecognized escape"),
            ("(abc", "unclosed group"),
            ("abc)", "unopened group"),
            ("[abc", "unclosed character class"),
            ("[z-a]", "character class range"),
            ("[[:nope:]]", "invalid"),
            ("*a", "missing"),
            ("a**", "repetition"),
            ("a{2,1}", "invalid"),
            ("a{1001}", "invalid repeat count"),
            ("abc\\", "incomplete escape"),
            ("\\xZZ", "hexadecimal"),
        ];
        for (pattern, fragment) in table {
            let error = Pattern::new(pattern).expect_err(pattern);
            assert!(error.to_string().contains(fragment), "{pattern}: {error}");
            assert_eq!(error.pattern, pattern);
        }
        let deep = format!("{}a{}", "(".repeat(500), ")".repeat(500));
        assert!(Pattern::new(&deep).is_err());
    }
}
