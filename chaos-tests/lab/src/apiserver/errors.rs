//! The lab's shorthands for `metav1.Status` errors that `lab_apimachinery::status` leaves to
//! the caller's wording.

use lab_apimachinery::status::{ApiError, StatusCause, StatusDetails, StatusReason};

/// 404 for a path the API does not define, with the apiserver's generic message.
pub fn not_found_path() -> ApiError {
    ApiError::new(
        StatusReason::NotFound,
        "the server could not find the requested resource",
    )
}

/// 409 Conflict with a message composed by the caller (preconditions, apply conflicts).
pub fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusReason::Conflict, message)
}

/// 422 Invalid for one field: `<Kind>.<group> "<name>" is invalid: <field>: <detail>`.
pub fn invalid_field(group: &str, kind: &str, name: &str, field: &str, detail: &str) -> ApiError {
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    ApiError::new(
        StatusReason::Invalid,
        format!("{qualified} {name:?} is invalid: {field}: {detail}"),
    )
    .with_details(StatusDetails {
        name: name.to_string(),
        group: group.to_string(),
        kind: kind.to_string(),
        causes: vec![StatusCause {
            message: detail.to_string(),
            field: field.to_string(),
            ..StatusCause::default()
        }],
        retry_after_seconds: None,
    })
}

/// 422 for a patch that cannot be applied.
pub fn unprocessable(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusReason::Invalid, message)
}

/// 415 listing the patch types the server accepts.
pub fn unsupported_patch_type() -> ApiError {
    ApiError::unsupported_media_type(&[
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ])
}
