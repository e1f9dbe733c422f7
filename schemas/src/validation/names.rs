//! Syntax checks for Kubernetes names, label keys and values, kinds and JSON Pointers.
//!
//! Each returns the rule broken, worded like apimachinery's validation messages.

const SUBDOMAIN: &str = "must be a lowercase RFC 1123 subdomain: at most 253 characters of \
     'a-z', '0-9', '-' or '.', starting and ending with an alphanumeric character";
const LABEL: &str = "must be a lowercase RFC 1123 label: at most 63 characters of 'a-z', '0-9' \
     or '-', starting and ending with an alphanumeric character";
const LABEL_NAME: &str = "the name part must be at most 63 characters of alphanumerics, '-', '_' \
     or '.', starting and ending with an alphanumeric character";
const LABEL_PREFIX: &str = "the prefix before '/' must be a lowercase RFC 1123 subdomain";
const LABEL_VALUE: &str = "must be empty or at most 63 characters of alphanumerics, '-', '_' or \
     '.', starting and ending with an alphanumeric character";
const KIND: &str =
    "must be CamelCase alphanumerics starting with an upper-case letter, like Deployment";

fn starts_and_ends_alphanumeric(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    alnum(s.chars().next()) && alnum(s.chars().last())
}

/// RFC 1123 label (container names, namespaces).
pub(crate) fn dns1123_label(s: &str) -> Result<(), &'static str> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && starts_and_ends_alphanumeric(s);
    if ok {
        Ok(())
    } else {
        Err(LABEL)
    }
}

/// RFC 1123 subdomain (most object names: sites, PVCs, StorageClasses, API groups).
pub(crate) fn dns1123_subdomain(s: &str) -> Result<(), &'static str> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && starts_and_ends_alphanumeric(part)
        });
    if ok {
        Ok(())
    } else {
        Err(SUBDOMAIN)
    }
}

/// Label key: optional `prefix/` (a subdomain) and a name of at most 63 characters.
pub(crate) fn label_key(s: &str) -> Result<(), &'static str> {
    let (prefix, name) = match s.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        dns1123_subdomain(prefix).map_err(|_| LABEL_PREFIX)?;
    }
    if name.is_empty() || !label_chars(name) {
        return Err(LABEL_NAME);
    }
    Ok(())
}

/// Label value: empty, or at most 63 characters.
pub(crate) fn label_value(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || label_chars(s) {
        Ok(())
    } else {
        Err(LABEL_VALUE)
    }
}

fn label_chars(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && starts_and_ends_alphanumeric(s)
}

/// Resource kind, e.g. `Deployment`.
pub(crate) fn kind(s: &str) -> Result<(), &'static str> {
    let ok = s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(KIND)
    }
}

/// JSON Pointer (RFC 6901): empty, or `/`-separated tokens where `~` is
/// only followed by `0` or `1`.
pub(crate) fn json_pointer(s: &str) -> Result<(), &'static str> {
    if !s.is_empty() && !s.starts_with('/') {
        return Err("must be empty or start with '/'");
    }
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err("'~' must be followed by '0' or '1'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let cases: &[(&str, bool, bool)] = &[
            // (input, label ok, subdomain ok)
            ("site-a", true, true),
            ("a", true, true),
            ("eu.west-1", false, true),
            ("Site", false, false),
            ("-a", false, false),
            ("a-", false, false),
            ("a..b", false, false),
            ("", false, false),
            ("a_b", false, false),
        ];
        for (input, label, subdomain) in cases {
            assert_eq!(dns1123_label(input).is_ok(), *label, "label {input:?}");
            assert_eq!(
                dns1123_subdomain(input).is_ok(),
                *subdomain,
                "subdomain {input:?}"
            );
        }
        assert!(dns1123_label(&"a".repeat(64)).is_err());
        assert!(dns1123_subdomain(&"a".repeat(253)).is_ok());
        assert!(dns1123_subdomain(&"a".repeat(254)).is_err());
    }

    #[test]
    fn labels() {
        let keys: &[(&str, bool)] = &[
            ("app", true),
            ("app.kubernetes.io/name", true),
            ("Tier_1.x", true),
            ("ferry.dev/", false),
            ("/name", false),
            ("Example.com/name", false),
            ("bad key", false),
            ("_x", false),
        ];
        for (key, ok) in keys {
            assert_eq!(label_key(key).is_ok(), *ok, "label key {key:?}");
        }
        let values: &[(&str, bool)] = &[
            ("", true),
            ("v1.2_3-x", true),
            ("-x", false),
            ("a b", false),
        ];
        for (value, ok) in values {
            assert_eq!(label_value(value).is_ok(), *ok, "label value {value:?}");
        }
        assert!(label_value(&"a".repeat(64)).is_err());
    }

    #[test]
    fn kinds_and_pointers() {
        let kinds: &[(&str, bool)] = &[
            ("Deployment", true),
            ("deployment", false),
            ("", false),
            ("Stateful-Set", false),
        ];
        for (k, ok) in kinds {
            assert_eq!(kind(k).is_ok(), *ok, "kind {k:?}");
        }
        let pointers: &[(&str, bool)] = &[
            ("", true),
            ("/spec/replicas", true),
            ("/metadata/annotations/a~1b", true),
            ("/a~0", true),
            ("spec/replicas", false),
            ("/a~2", false),
            ("/a~", false),
        ];
        for (p, ok) in pointers {
            assert_eq!(json_pointer(p).is_ok(), *ok, "pointer {p:?}");
        }
    }
}
