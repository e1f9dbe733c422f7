//! Kubernetes resource quantities (`1Gi`, `500M`, `1e3`) as bytes, as apimachinery's
//! `resource.Quantity` reads and writes them.

/// A resource quantity that is not a whole, non-negative number of bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuantityError {
    /// Not of the form `<number><suffix>` with a Kubernetes suffix.
    #[error("{value:?} is not a resource quantity")]
    Malformed {
        /// The text.
        value: String,
    },
    /// A negative quantity where a size is expected.
    #[error("{value:?} is negative")]
    Negative {
        /// The text.
        value: String,
    },
    /// More bytes than fit in 64 bits.
    #[error("{value:?} is too large")]
    Overflow {
        /// The text.
        value: String,
    },
}

/// Parses a Kubernetes resource quantity (`1Gi`, `256Mi`, `500M`, `1G`, `1024`, `1.5Gi`,
/// `1e3`) into bytes, rounding a fractional result up as `resource.Quantity.Value()` does.
///
/// Suffixes: binary `Ki Mi Gi Ti Pi Ei` (powers of 1024), decimal `n u m k M G T P E`, or a
/// decimal exponent `e<int>`/`E<int>` (apimachinery's `resource.Quantity` grammar).
///
/// # Errors
/// [`QuantityError::Malformed`] for text outside that grammar, [`QuantityError::Negative`]
/// for negative values, [`QuantityError::Overflow`] above `u64::MAX` bytes.
pub fn parse_quantity(value: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed {
        value: value.to_string(),
    };
    let overflow = || QuantityError::Overflow {
        value: value.to_string(),
    };
    let (negative, rest) = match value.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, value.strip_prefix('+').unwrap_or(value)),
    };
    let number_len = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(number_len);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(malformed());
    }
    // The value is digits / 10^len(fraction) * numerator / denominator, kept exact in u128.
    let digits = format!("{whole}{fraction}");
    let mut mantissa: u128 = 0;
    for d in digits.bytes() {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(d - b'0')))
            .ok_or_else(overflow)?;
    }
    let pow10 = |e: u32| 10u128.checked_pow(e).ok_or_else(overflow);
    let (numerator, denominator): (u128, u128) = match suffix {
        "" => (1, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        "n" => (1, pow10(9)?),
        "u" => (1, pow10(6)?),
        "m" => (1, pow10(3)?),
        "k" => (pow10(3)?, 1),
        "M" => (pow10(6)?, 1),
        "G" => (pow10(9)?, 1),
        "T" => (pow10(12)?, 1),
        "P" => (pow10(15)?, 1),
        "E" => (pow10(18)?, 1),
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().map_err(|_| malformed())?;
            if e >= 0 {
                (pow10(e.unsigned_abs())?, 1)
            } else {
                (1, pow10(e.unsigned_abs())?)
            }
        }
        _ => return Err(malformed()),
    };
    let denominator = denominator
        .checked_mul(pow10(
            u32::try_from(fraction.len()).map_err(|_| overflow())?,
        )?)
        .ok_or_else(overflow)?;
    let numerator = mantissa.checked_mul(numerator).ok_or_else(overflow)?;
    let bytes = numerator.div_ceil(denominator);
    if negative && bytes != 0 {
        return Err(QuantityError::Negative {
            value: value.to_string(),
        });
    }
    u64::try_from(bytes).map_err(|_| overflow())
}

/// Formats a byte count as a quantity: the largest binary suffix that divides it exactly
/// (`64Mi`, `1Gi`), else plain bytes (`1000`).
pub fn format_quantity(bytes: u64) -> String {
    const SUFFIXES: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    SUFFIXES
        .iter()
        .find(|(_, shift)| bytes != 0 && bytes % (1u64 << shift) == 0)
        .map_or_else(
            || bytes.to_string(),
            |(suffix, shift)| format!("{}{suffix}", bytes >> shift),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_quantities_into_bytes() {
        let cases: &[(&str, u64)] = &[
            ("1024", 1024),
            ("0", 0),
            ("1Ki", 1024),
            ("64Mi", 64 << 20),
            ("256Mi", 256 << 20),
            ("1Gi", 1 << 30),
            ("2Ti", 2 << 40),
            ("500M", 500_000_000),
            ("1G", 1_000_000_000),
            ("1k", 1000),
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            ("1e3", 1000),
            ("1E6", 1_000_000),
            ("+10", 10),
            ("1500m", 2), // 1.5 bytes rounds up
            ("1.", 1),
            (".5Ki", 512),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_quantity(text), Ok(*bytes), "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_byte_count() {
        for text in ["", "Gi", "1GB", "1 Gi", "abc", "1.2.3", "1e", "1x"] {
            assert!(
                matches!(parse_quantity(text), Err(QuantityError::Malformed { .. })),
                "{text}"
            );
        }
        assert!(matches!(
            parse_quantity("-1Gi"),
            Err(QuantityError::Negative { .. })
        ));
        assert!(matches!(
            parse_quantity("16Ei"),
            Err(QuantityError::Overflow { .. })
        ));
        assert!(matches!(
            parse_quantity("1e40"),
            Err(QuantityError::Overflow { .. })
        ));
    }

    #[test]
    fn formats_bytes_with_the_largest_exact_binary_suffix() {
        let cases: &[(u64, &str)] = &[
            (0, "0"),
            (1000, "1000"),
            (1024, "1Ki"),
            (64 << 20, "64Mi"),
            (1 << 30, "1Gi"),
            (3 << 29, "1536Mi"),
        ];
        for (bytes, text) in cases {
            assert_eq!(format_quantity(*bytes), *text);
            assert_eq!(parse_quantity(text), Ok(*bytes));
        }
    }
}
