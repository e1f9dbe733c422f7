//! `SpecError`: one field-level validation failure, in the apiserver's words.

use std::time::Duration;

use crate::duration::{format_duration, DurationError};

/// One reason a spec was rejected: the field path (`spec.transform.replicas.count`),
/// the bad value where there is one, and what is wrong.
///
/// `Display` follows the apiserver's field errors: `<path>: <problem>`, with
/// values quoted. [`SpecError::reason`] is a stable, low-cardinality label for
/// metrics and Events; [`SpecError::field`] is the path alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A required value is missing or empty.
    #[error("{field}: required")]
    Required {
        /// Field path.
        field: String,
    },
    /// A value required because of another field's value is missing.
    #[error("{field}: required when {when}")]
    RequiredWhen {
        /// Field path.
        field: String,
        /// The rule, e.g. `policy is Fixed`.
        when: &'static str,
    },
    /// A value is set where another field's value forbids it.
    #[error("{field}: must not be set unless {unless}, got {value}")]
    Forbidden {
        /// Field path.
        field: String,
        /// The rule, e.g. `policy is Fixed`.
        unless: &'static str,
        /// The value found.
        value: String,
    },
    /// A duration string is not in the CRD duration syntax.
    #[error("{field}: invalid duration {value:?}: {detail}")]
    InvalidDuration {
        /// Field path.
        field: String,
        /// The text found.
        value: String,
        /// What is wrong with it (shown in the message, not a source).
        detail: DurationError,
    },
    /// A duration is below its documented minimum.
    #[error("{field}: must be at least {}, got {}", format_duration(*min), format_duration(*got))]
    DurationTooShort {
        /// Field path.
        field: String,
        /// The minimum.
        min: Duration,
        /// The value found.
        got: Duration,
    },
    /// An integer is below its minimum.
    #[error("{field}: must be at least {min}, got {got}")]
    TooSmall {
        /// Field path.
        field: String,
        /// The minimum.
        min: i64,
        /// The value found.
        got: i64,
    },
    /// Two fields that must differ are equal (`secondarySite` = `primarySite`).
    #[error("{field}: must differ from {other} (both are {value:?})")]
    NotDistinct {
        /// Field path.
        field: String,
        /// Path of the field it must differ from.
        other: &'static str,
        /// The shared value.
        value: String,
    },
    /// A label selector that selects everything.
    #[error("{field}: must not be empty (it would select every object in the namespace)")]
    EmptySelector {
        /// Field path.
        field: String,
    },
    /// A site name that no `Site` object has.
    #[error("{field}: unknown site {site:?} (known: {})", quote_list(known))]
    UnknownSite {
        /// Field path.
        field: String,
        /// The name found.
        site: String,
        /// The sites that exist.
        known: Vec<String>,
    },
    /// An object name (site, PVC, StorageClass, container, kind, group) with bad syntax.
    #[error("{field}: invalid name {value:?}: {detail}")]
    InvalidName {
        /// Field path.
        field: String,
        /// The name found.
        value: String,
        /// The rule it breaks.
        detail: &'static str,
    },
    /// A label key or value with bad syntax.
    #[error("{field}: invalid label {value:?}: {detail}")]
    InvalidLabel {
        /// Field path.
        field: String,
        /// The key or value found.
        value: String,
        /// The rule it breaks.
        detail: &'static str,
    },
    /// A label key that is both set and removed by the transform.
    #[error("{field}: label {key:?} is also in spec.transform.labels.set")]
    LabelSetAndRemoved {
        /// Field path (the `remove` entry).
        field: String,
        /// The key.
        key: String,
    },
    /// A JSON Pointer (RFC 6901) with bad syntax.
    #[error("{field}: invalid JSON pointer {value:?}: {detail}")]
    InvalidJsonPointer {
        /// Field path.
        field: String,
        /// The pointer found.
        value: String,
        /// The rule it breaks.
        detail: &'static str,
    },
    /// A `host:port` endpoint with bad syntax or port.
    #[error("{field}: invalid endpoint {value:?}: {detail}")]
    InvalidEndpoint {
        /// Field path.
        field: String,
        /// The endpoint found.
        value: String,
        /// The rule it breaks.
        detail: &'static str,
    },
    /// The same value twice in a list that must not repeat.
    #[error("{field}: duplicate value {value:?}")]
    Duplicate {
        /// Field path of the repeat.
        field: String,
        /// The repeated value.
        value: String,
    },
    /// A value outside a fixed set (a selector operator).
    #[error(
        "{field}: unsupported value {value:?}: supported values: {}",
        quote_list(supported)
    )]
    NotSupported {
        /// Field path.
        field: String,
        /// The value found.
        value: String,
        /// The allowed values.
        supported: &'static [&'static str],
    },
    /// A Migration's target is not one of its pair's two sites.
    #[error(
        "{field}: must be one of the pair's sites {primary:?} or {secondary:?}, got {target:?}"
    )]
    TargetNotInPair {
        /// Field path.
        field: String,
        /// The target found.
        target: String,
        /// The pair's primarySite.
        primary: String,
        /// The pair's secondarySite.
        secondary: String,
    },
    /// A Migration targets the site the application already runs on.
    #[error("{field}: {target:?} is already the pair's active site")]
    TargetAlreadyActive {
        /// Field path.
        field: String,
        /// The target found.
        target: String,
    },
    /// A Failback that does not return to the pair's primary site.
    #[error("{field}: a Failback must target the pair's primarySite {primary:?}, got {target:?}")]
    FailbackNotToPrimary {
        /// Field path.
        field: String,
        /// The target found.
        target: String,
        /// The pair's primarySite.
        primary: String,
    },
}

impl SpecError {
    /// Stable, low-cardinality label for metrics and Events (one per variant,
    /// snake case, never containing field values).
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Required { .. } | Self::RequiredWhen { .. } => "required",
            Self::Forbidden { .. } => "forbidden",
            Self::InvalidDuration { .. } => "invalid_duration",
            Self::DurationTooShort { .. } => "duration_too_short",
            Self::TooSmall { .. } => "too_small",
            Self::NotDistinct { .. } => "not_distinct",
            Self::EmptySelector { .. } => "empty_selector",
            Self::UnknownSite { .. } => "unknown_site",
            Self::InvalidName { .. } => "invalid_name",
            Self::InvalidLabel { .. } => "invalid_label",
            Self::LabelSetAndRemoved { .. } => "label_set_and_removed",
            Self::InvalidJsonPointer { .. } => "invalid_json_pointer",
            Self::InvalidEndpoint { .. } => "invalid_endpoint",
            Self::Duplicate { .. } => "duplicate",
            Self::NotSupported { .. } => "not_supported",
            Self::TargetNotInPair { .. } => "target_not_in_pair",
            Self::TargetAlreadyActive { .. } => "target_already_active",
            Self::FailbackNotToPrimary { .. } => "failback_not_to_primary",
        }
    }

    /// The field path the error is about, e.g. `spec.rpo`.
    #[must_use]
    pub fn field(&self) -> &str {
        match self {
            Self::Required { field }
            | Self::RequiredWhen { field, .. }
            | Self::Forbidden { field, .. }
            | Self::InvalidDuration { field, .. }
            | Self::DurationTooShort { field, .. }
            | Self::TooSmall { field, .. }
            | Self::NotDistinct { field, .. }
            | Self::EmptySelector { field }
            | Self::UnknownSite { field, .. }
            | Self::InvalidName { field, .. }
            | Self::InvalidLabel { field, .. }
            | Self::LabelSetAndRemoved { field, .. }
            | Self::InvalidJsonPointer { field, .. }
            | Self::InvalidEndpoint { field, .. }
            | Self::Duplicate { field, .. }
            | Self::NotSupported { field, .. }
            | Self::TargetNotInPair { field, .. }
            | Self::TargetAlreadyActive { field, .. }
            | Self::FailbackNotToPrimary { field, .. } => field,
        }
    }
}

/// `"a", "b"` for error messages.
fn quote_list<S: AsRef<str>>(items: &[S]) -> String {
    items
        .iter()
        .map(|s| format!("{:?}", s.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Joins errors into one message, separated by `; `, for a condition message or an Event.
#[must_use]
pub fn join_errors(errors: &[SpecError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
