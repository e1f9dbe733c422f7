//! The duration strings of Ferry's CRDs (`30s`, `5m`, `1h30m`, `500ms`), parsed once here.

use std::time::Duration;

/// Regular expression (RE2/ECMA syntax, as the apiserver evaluates it) that every
/// duration string in a Ferry CRD must match; it is the schema `pattern` of
/// `spec.rpo`, `spec.failover.dataLossAllowance` and `spec.failover.siteLossTimeout`.
///
/// A duration is one or more `<integer><unit>` pairs with no spaces, units being
/// `ns`, `us`, `ms`, `s`, `m` (minutes), `h` and `d` (24 hours): `30s`, `5m`,
/// `1h30m`, `500ms`. This is the intersection of Go's `time.ParseDuration` and
/// humantime, minus fractions, so the value means the same thing to a person,
/// `kubectl` and Ferry. [`parse_duration`] accepts exactly this language.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ns|us|ms|s|m|h|d))+$";

/// Units accepted by [`DURATION_PATTERN`], longest first so that `ms` wins over `m`.
const UNITS: [&str; 7] = ["ns", "us", "ms", "s", "m", "h", "d"];

/// Why a duration string was rejected by [`parse_duration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string was empty.
    #[error("empty duration")]
    Empty,
    /// The string contained whitespace (`5 minutes`, `1h 30m`).
    #[error("spaces are not allowed; write it like 30s, 5m or 1h30m")]
    Whitespace,
    /// A unit was not preceded by an integer (`m5`, `1h.5m`).
    #[error("expected an integer at byte {at}; write it like 30s, 5m or 1h30m")]
    ExpectedNumber {
        /// Byte offset into the string.
        at: usize,
    },
    /// A number had no unit after it (`30`).
    #[error("missing unit after the number at byte {at} (units: ns, us, ms, s, m, h, d)")]
    MissingUnit {
        /// Byte offset just after the number.
        at: usize,
    },
    /// A unit outside [`DURATION_PATTERN`]'s list (`5sec`, `1w`).
    #[error("unknown unit {unit:?} (units: ns, us, ms, s, m, h, d)")]
    UnknownUnit {
        /// The letters found where a unit was expected.
        unit: String,
    },
    /// Syntactically valid but too large for humantime / [`Duration`].
    #[error("too large")]
    Overflow,
}

/// Parses a CRD duration string such as `30s`, `5m`, `1h30m` or `500ms`.
///
/// Accepts exactly the language of [`DURATION_PATTERN`] (so a value the
/// apiserver admitted always parses, and a value it would reject never does,
/// even if it reached Ferry some other way), then lets humantime compute the
/// value.
///
/// # Errors
///
/// Returns a [`DurationError`] saying what is wrong with the text; the caller
/// adds the field path and the value.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    check_grammar(text)?;
    humantime::parse_duration(text).map_err(|_| DurationError::Overflow)
}

/// Checks `text` against [`DURATION_PATTERN`] by hand (no regex engine needed).
fn check_grammar(text: &str) -> Result<(), DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.chars().any(char::is_whitespace) {
        return Err(DurationError::Whitespace);
    }
    let bytes = text.as_bytes();
    let mut at = 0;
    while at < bytes.len() {
        let digits = bytes[at..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(DurationError::ExpectedNumber { at });
        }
        at += digits;
        let rest = &text[at..];
        let letters = rest
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit())
            .map_or(rest.len(), |(i, _)| i);
        if letters == 0 {
            return Err(DurationError::MissingUnit { at });
        }
        let unit = &rest[..letters];
        if !UNITS.contains(&unit) {
            return Err(DurationError::UnknownUnit {
                unit: unit.to_owned(),
            });
        }
        at += letters;
    }
    Ok(())
}

/// Formats a duration the way the CRD fields are written where possible
/// (`10s`, `5m`, `1h 30m`), for error messages and status text.
#[must_use]
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let cases: &[(&str, Duration)] = &[
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h30m", Duration::from_secs(5400)),
            ("500ms", Duration::from_millis(500)),
            ("1d", Duration::from_secs(86_400)),
            ("250us", Duration::from_micros(250)),
            ("10ns", Duration::from_nanos(10)),
            ("1m5s", Duration::from_secs(65)),
            ("0s", Duration::ZERO),
            ("90s", Duration::from_secs(90)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).as_ref(), Ok(want), "parsing {text:?}");
        }
    }

    #[test]
    fn rejects_what_the_schema_pattern_rejects() {
        let cases: &[(&str, DurationError)] = &[
            ("", DurationError::Empty),
            ("5 minutes", DurationError::Whitespace),
            ("1h 30m", DurationError::Whitespace),
            ("30", DurationError::MissingUnit { at: 2 }),
            ("m5", DurationError::ExpectedNumber { at: 0 }),
            ("1.5h", DurationError::UnknownUnit { unit: ".".into() }),
            ("5min", DurationError::UnknownUnit { unit: "min".into() }),
            ("1w", DurationError::UnknownUnit { unit: "w".into() }),
            ("1M", DurationError::UnknownUnit { unit: "M".into() }),
            ("-5s", DurationError::ExpectedNumber { at: 0 }),
            ("99999999999999999999999999s", DurationError::Overflow),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text).as_ref(), Err(want), "parsing {text:?}");
        }
    }

    #[test]
    fn formats_like_the_input() {
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }
}
