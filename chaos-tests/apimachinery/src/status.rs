//! `metav1.Status` errors with the codes, reasons and wording of `k8s.io/apimachinery/pkg/api/errors`.
//!
//! Every error the lab API server returns is serialised as a `metav1.Status`
//! object (<https://kubernetes.io/docs/reference/kubernetes-api/common-definitions/status/>):
//!
//! ```json
//! {"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",
//!  "message":"deployments.apps \"web\" not found","reason":"NotFound",
//!  "details":{"name":"web","group":"apps","kind":"deployments"},"code":404}
//! ```
//!
//! [`ApiError`] holds one such failure. Its constructors mirror the Go helpers
//! (`NewNotFound`, `NewConflict`, `NewInvalid`, ...) including their message
//! wording, because clients (kubectl, client-go, kube-rs) match on the code and
//! reason and humans compare the messages with what a real cluster prints.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::validation::{go_quote, FieldError};

/// Message of a conflict caused by a stale `metadata.resourceVersion`
/// (`OptimisticLockErrorMsg` in `k8s.io/apimachinery/pkg/api/errors`).
pub const OPTIMISTIC_LOCK_ERROR_MSG: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

/// A `metav1.StatusReason`: the machine-readable reason of a failure.
///
/// Serialises as its wire string (see [`StatusReason::as_str`]); each reason
/// has the HTTP code the apiserver pairs it with ([`StatusReason::code`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StatusReason {
    /// 404: the resource does not exist.
    NotFound,
    /// 409: a create collided with an existing object of the same name.
    AlreadyExists,
    /// 409: an update collided with a concurrent change (stale resourceVersion).
    Conflict,
    /// 422: the object failed validation; `details.causes` lists the fields.
    Invalid,
    /// 400: the request itself is malformed.
    BadRequest,
    /// 410: the resource is gone (deprecated by the apiserver in favour of `Expired`).
    Gone,
    /// 410: the requested content (e.g. a watch from a too-old resourceVersion) expired.
    Expired,
    /// 405: the verb is not supported on this resource.
    MethodNotAllowed,
    /// 415: the request body's content type is not accepted.
    UnsupportedMediaType,
    /// 403: the user may not perform this action.
    Forbidden,
    /// 401: the request carries no valid credentials.
    Unauthorized,
    /// 406: none of the media types in `Accept` can be produced.
    NotAcceptable,
    /// 500: the server failed unexpectedly.
    InternalError,
    /// 503: the server cannot serve the request right now.
    ServiceUnavailable,
    /// 504: the request could not complete in time.
    Timeout,
}

impl StatusReason {
    /// Every reason, in declaration order.
    pub const ALL: [StatusReason; 15] = [
        StatusReason::NotFound,
        StatusReason::AlreadyExists,
        StatusReason::Conflict,
        StatusReason::Invalid,
        StatusReason::BadRequest,
        StatusReason::Gone,
        StatusReason::Expired,
        StatusReason::MethodNotAllowed,
        StatusReason::UnsupportedMediaType,
        StatusReason::Forbidden,
        StatusReason::Unauthorized,
        StatusReason::NotAcceptable,
        StatusReason::InternalError,
        StatusReason::ServiceUnavailable,
        StatusReason::Timeout,
    ];

    /// The wire string, as in `metav1.StatusReason*` constants (`"NotFound"`, `"Expired"`, ...).
    pub const fn as_str(self) -> &'static str {
        match self {
            StatusReason::NotFound => "NotFound",
            StatusReason::AlreadyExists => "AlreadyExists",
            StatusReason::Conflict => "Conflict",
            StatusReason::Invalid => "Invalid",
            StatusReason::BadRequest => "BadRequest",
            StatusReason::Gone => "Gone",
            StatusReason::Expired => "Expired",
            StatusReason::MethodNotAllowed => "MethodNotAllowed",
            StatusReason::UnsupportedMediaType => "UnsupportedMediaType",
            StatusReason::Forbidden => "Forbidden",
            StatusReason::Unauthorized => "Unauthorized",
            StatusReason::NotAcceptable => "NotAcceptable",
            StatusReason::InternalError => "InternalError",
            StatusReason::ServiceUnavailable => "ServiceUnavailable",
            StatusReason::Timeout => "Timeout",
        }
    }

    /// The HTTP status code the apiserver sends with this reason.
    pub const fn code(self) -> u16 {
        match self {
            StatusReason::NotFound => 404,
            StatusReason::AlreadyExists | StatusReason::Conflict => 409,
            StatusReason::Invalid => 422,
            StatusReason::BadRequest => 400,
            StatusReason::Gone | StatusReason::Expired => 410,
            StatusReason::MethodNotAllowed => 405,
            StatusReason::UnsupportedMediaType => 415,
            StatusReason::Forbidden => 403,
            StatusReason::Unauthorized => 401,
            StatusReason::NotAcceptable => 406,
            StatusReason::InternalError => 500,
            StatusReason::ServiceUnavailable => 503,
            StatusReason::Timeout => 504,
        }
    }
}

impl fmt::Display for StatusReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A reason string that is not one of the [`StatusReason`] variants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status reason {0:?}")]
pub struct UnknownStatusReason(pub String);

impl FromStr for StatusReason {
    type Err = UnknownStatusReason;

    /// Parses a wire string (`"NotFound"`); errors with [`UnknownStatusReason`] otherwise.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StatusReason::ALL
            .into_iter()
            .find(|reason| reason.as_str() == s)
            .ok_or_else(|| UnknownStatusReason(s.to_string()))
    }
}

/// One `metav1.StatusCause`: `{"reason": .., "message": .., "field": ..}`, empty
/// strings omitted on the wire.
///
/// For validation failures `reason` is the cause type (`FieldValueInvalid`,
/// `FieldValueRequired`, ...), `message` the error body without the field
/// path, and `field` the dotted field path; see `From<&FieldError>`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCause {
    /// Machine-readable cause type (`metav1.CauseType`), e.g. `FieldValueRequired`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// Human-readable description of the cause.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Field path the cause applies to, e.g. `spec.transform.patches[0].op`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub field: String,
}

impl From<&FieldError> for StatusCause {
    /// Mirrors `NewInvalid`: cause type from [`FieldError::reason`], message from
    /// [`FieldError::body`], field from the path.
    fn from(error: &FieldError) -> Self {
        StatusCause {
            reason: error.reason().to_string(),
            message: error.body(),
            field: error.path.clone(),
        }
    }
}

impl From<FieldError> for StatusCause {
    fn from(error: FieldError) -> Self {
        StatusCause::from(&error)
    }
}

/// `metav1.StatusDetails`: which object failed and why, empty parts omitted.
///
/// Note that for resource-addressed errors (not found, conflict, ...) the
/// apiserver puts the *resource* (`deployments`) in `kind`; only `Invalid`
/// carries the actual kind (`DRPair`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusDetails {
    /// Name of the object concerned, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// API group of the object (empty for the core group).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub group: String,
    /// Kind (for `Invalid`) or resource (for the other constructors).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Individual causes, e.g. one per invalid field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub causes: Vec<StatusCause>,
    /// Seconds the client should wait before retrying (`Timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u32>,
}

impl StatusDetails {
    /// True when nothing would be serialised, in which case `details` is omitted.
    pub fn is_empty(&self) -> bool {
        self.name.is_empty()
            && self.group.is_empty()
            && self.kind.is_empty()
            && self.causes.is_empty()
            && self.retry_after_seconds.is_none()
    }

    fn resource(group: &str, resource: &str, name: &str) -> Self {
        StatusDetails {
            name: name.to_string(),
            group: group.to_string(),
            kind: resource.to_string(),
            ..StatusDetails::default()
        }
    }
}

/// A failed API request, rendered on the wire as a `metav1.Status` with
/// `"status":"Failure"`.
///
/// `Display` is the message. `Serialize` produces the exact wire object (field
/// order `kind, apiVersion, metadata, status, message, reason, details, code`;
/// empty message and details omitted), so `serde_json::to_string(&err)` is the
/// response body; [`ApiError::to_status_json`] gives the same as a `Value`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// HTTP status code (normally `reason.code()`).
    pub code: u16,
    /// Machine-readable reason.
    pub reason: StatusReason,
    /// Human-readable message, worded as the apiserver words it.
    pub message: String,
    /// Object and causes; omitted on the wire when empty.
    pub details: StatusDetails,
}

/// The `metav1.Status` wire shape, in the apiserver's field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusWire<'a> {
    kind: &'static str,
    api_version: &'static str,
    metadata: EmptyListMeta,
    status: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    message: &'a str,
    reason: &'static str,
    #[serde(skip_serializing_if = "StatusDetails::is_empty")]
    details: &'a StatusDetails,
    code: u16,
}

/// Serialises as `{}` (an empty `metav1.ListMeta`).
#[derive(Serialize)]
struct EmptyListMeta {}

impl Serialize for ApiError {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StatusWire {
            kind: "Status",
            api_version: "v1",
            metadata: EmptyListMeta {},
            status: "Failure",
            message: &self.message,
            reason: self.reason.as_str(),
            details: &self.details,
            code: self.code,
        }
        .serialize(serializer)
    }
}

/// `resource.group`, or just `resource` for the core group (`GroupResource.String()`).
fn qualified(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// Joins error strings the way `utilerrors.Aggregate` does: one error as is,
/// several as `[a, b]`, identical messages once.
fn aggregate(messages: &[String]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for message in messages {
        if !seen.contains(&message.as_str()) {
            seen.push(message);
        }
    }
    match seen.as_slice() {
        [one] => (*one).to_string(),
        many => format!("[{}]", many.join(", ")),
    }
}

impl ApiError {
    /// A failure with `reason`, its default HTTP code, `message` and no details.
    pub fn new(reason: StatusReason, message: impl Into<String>) -> Self {
        ApiError {
            code: reason.code(),
            reason,
            message: message.into(),
            details: StatusDetails::default(),
        }
    }

    /// Replaces the details (builder style).
    pub fn with_details(mut self, details: StatusDetails) -> Self {
        self.details = details;
        self
    }

    /// 404 `NotFound` (`NewNotFound`): `deployments.apps "web" not found`, or
    /// `configmaps "x" not found` for the core group (`group` empty).
    pub fn not_found(group: &str, resource: &str, name: &str) -> Self {
        ApiError::new(
            StatusReason::NotFound,
            format!(
                "{} {} not found",
                qualified(group, resource),
                go_quote(name)
            ),
        )
        .with_details(StatusDetails::resource(group, resource, name))
    }

    /// 409 `AlreadyExists` (`NewAlreadyExists`): `configmaps "x" already exists`.
    pub fn already_exists(group: &str, resource: &str, name: &str) -> Self {
        ApiError::new(
            StatusReason::AlreadyExists,
            format!(
                "{} {} already exists",
                qualified(group, resource),
                go_quote(name)
            ),
        )
        .with_details(StatusDetails::resource(group, resource, name))
    }

    /// 409 `Conflict` (`NewConflict`):
    /// `Operation cannot be fulfilled on deployments.apps "web": <reason_msg>`.
    pub fn conflict(group: &str, resource: &str, name: &str, reason_msg: &str) -> Self {
        ApiError::new(
            StatusReason::Conflict,
            format!(
                "Operation cannot be fulfilled on {} {}: {reason_msg}",
                qualified(group, resource),
                go_quote(name)
            ),
        )
        .with_details(StatusDetails::resource(group, resource, name))
    }

    /// 409 `Conflict` for an update carrying a stale `metadata.resourceVersion`,
    /// with [`OPTIMISTIC_LOCK_ERROR_MSG`] as the reason: `Operation cannot be
    /// fulfilled on deployments.apps "web": the object has been modified; please
    /// apply your changes to the latest version and try again`.
    pub fn stale_resource_version(group: &str, resource: &str, name: &str) -> Self {
        ApiError::conflict(group, resource, name, OPTIMISTIC_LOCK_ERROR_MSG)
    }

    /// 422 `Invalid` (`NewInvalid`) for an object of `kind` in `group` that failed
    /// validation with `causes`.
    ///
    /// Message: `DRPair.ferry.dev "p1" is invalid: <error>` for one error,
    /// `... is invalid: [<e1>, <e2>]` for several (duplicates dropped), and
    /// `... is invalid` for none. `details.causes` holds one [`StatusCause`]
    /// per field error and `details.kind` the kind itself.
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<FieldError>) -> Self {
        let qualified_kind = qualified(group, kind);
        let message = if causes.is_empty() {
            format!("{qualified_kind} {} is invalid", go_quote(name))
        } else {
            let errors: Vec<String> = causes.iter().map(ToString::to_string).collect();
            format!(
                "{qualified_kind} {} is invalid: {}",
                go_quote(name),
                aggregate(&errors)
            )
        };
        ApiError::new(StatusReason::Invalid, message).with_details(StatusDetails {
            name: name.to_string(),
            group: group.to_string(),
            kind: kind.to_string(),
            causes: causes.iter().map(StatusCause::from).collect(),
            retry_after_seconds: None,
        })
    }

    /// 410 `Expired` (`NewResourceExpired`), e.g. for a watch or list from a
    /// compacted resourceVersion: `too old resource version: 5 (100)`.
    pub fn expired(message: impl Into<String>) -> Self {
        ApiError::new(StatusReason::Expired, message)
    }

    /// 410 `Gone` (`NewGone`); prefer [`ApiError::expired`] for too-old resource versions.
    pub fn gone(message: impl Into<String>) -> Self {
        ApiError::new(StatusReason::Gone, message)
    }

    /// 400 `BadRequest` (`NewBadRequest`) with `message` as given.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusReason::BadRequest, message)
    }

    /// 405 `MethodNotAllowed` (`NewMethodNotSupported`):
    /// `<action> is not supported on resources of kind "deployments.apps"`.
    pub fn method_not_allowed(group: &str, resource: &str, action: &str) -> Self {
        ApiError::new(
            StatusReason::MethodNotAllowed,
            format!(
                "{action} is not supported on resources of kind {}",
                go_quote(&qualified(group, resource))
            ),
        )
        .with_details(StatusDetails::resource(group, resource, ""))
    }

    /// 415 `UnsupportedMediaType`, as the apiserver's content negotiation words it:
    /// `the body of the request was in an unknown format - accepted media types include: <accepted>`.
    pub fn unsupported_media_type(accepted: &[&str]) -> Self {
        ApiError::new(
            StatusReason::UnsupportedMediaType,
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
        )
    }

    /// 406 `NotAcceptable`, as the apiserver's content negotiation words it:
    /// `only the following media types are accepted: <accepted>`.
    pub fn not_acceptable(accepted: &[&str]) -> Self {
        ApiError::new(
            StatusReason::NotAcceptable,
            format!(
                "only the following media types are accepted: {}",
                accepted.join(", ")
            ),
        )
    }

    /// 500 `InternalError` (`NewInternalError`): `Internal error occurred: <message>`,
    /// with the bare message as the single cause.
    pub fn internal(message: impl Into<String>) -> Self {
        let message = message.into();
        ApiError::new(
            StatusReason::InternalError,
            format!("Internal error occurred: {message}"),
        )
        .with_details(StatusDetails {
            causes: vec![StatusCause {
                message,
                ..StatusCause::default()
            }],
            ..StatusDetails::default()
        })
    }

    /// 403 `Forbidden` (`NewForbidden`): `deployments.apps "web" is forbidden: <reason_msg>`,
    /// `deployments.apps is forbidden: ...` without a name, `forbidden: ...` without a resource.
    pub fn forbidden(group: &str, resource: &str, name: &str, reason_msg: &str) -> Self {
        let message = if group.is_empty() && resource.is_empty() {
            format!("forbidden: {reason_msg}")
        } else if name.is_empty() {
            format!("{} is forbidden: {reason_msg}", qualified(group, resource))
        } else {
            format!(
                "{} {} is forbidden: {reason_msg}",
                qualified(group, resource),
                go_quote(name)
            )
        };
        ApiError::new(StatusReason::Forbidden, message)
            .with_details(StatusDetails::resource(group, resource, name))
    }

    /// 401 `Unauthorized` (`NewUnauthorized`); an empty message becomes `not authorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let message = message.into();
        let message = if message.is_empty() {
            "not authorized".to_string()
        } else {
            message
        };
        ApiError::new(StatusReason::Unauthorized, message)
    }

    /// 503 `ServiceUnavailable` (`NewServiceUnavailable`) with `message` as given.
    pub fn service_unavailable(message: impl Into<String>) -> Self {
        ApiError::new(StatusReason::ServiceUnavailable, message)
    }

    /// 504 `Timeout` (`NewTimeoutError`): `Timeout: <message>`, with
    /// `details.retryAfterSeconds` when `retry_after_seconds` is non-zero.
    pub fn timeout(message: &str, retry_after_seconds: u32) -> Self {
        ApiError::new(StatusReason::Timeout, format!("Timeout: {message}")).with_details(
            StatusDetails {
                retry_after_seconds: (retry_after_seconds > 0).then_some(retry_after_seconds),
                ..StatusDetails::default()
            },
        )
    }

    /// The `metav1.Status` object as a JSON value (same content as `Serialize`).
    pub fn to_status_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Parses a `metav1.Status` failure body back into an [`ApiError`].
    ///
    /// Returns `None` unless `value` has `"kind":"Status"`, `"status":"Failure"`
    /// and a known `reason`; a missing `code` defaults to the reason's code.
    pub fn from_status_json(value: &Value) -> Option<Self> {
        if value.get("kind")?.as_str()? != "Status" || value.get("status")?.as_str()? != "Failure" {
            return None;
        }
        let reason: StatusReason = value.get("reason")?.as_str()?.parse().ok()?;
        let code = match value.get("code") {
            Some(code) => u16::try_from(code.as_u64()?).ok()?,
            None => reason.code(),
        };
        let message = value
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let details = match value.get("details") {
            Some(details) => StatusDetails::deserialize(details).ok()?,
            None => StatusDetails::default(),
        };
        Some(ApiError {
            code,
            reason,
            message,
            details,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validation::FieldErrorKind;
    use serde_json::json;

    #[test]
    fn reasons_round_trip_with_codes() {
        let table = [
            (StatusReason::NotFound, "NotFound", 404),
            (StatusReason::AlreadyExists, "AlreadyExists", 409),
            (StatusReason::Conflict, "Conflict", 409),
            (StatusReason::Invalid, "Invalid", 422),
            (StatusReason::BadRequest, "BadRequest", 400),
            (StatusReason::Gone, "Gone", 410),
            (StatusReason::Expired, "Expired", 410),
            (StatusReason::MethodNotAllowed, "MethodNotAllowed", 405),
            (
                StatusReason::UnsupportedMediaType,
                "UnsupportedMediaType",
                415,
            ),
            (StatusReason::Forbidden, "Forbidden", 403),
            (StatusReason::Unauthorized, "Unauthorized", 401),
            (StatusReason::NotAcceptable, "NotAcceptable", 406),
            (StatusReason::InternalError, "InternalError", 500),
            (StatusReason::ServiceUnavailable, "ServiceUnavailable", 503),
            (StatusReason::Timeout, "Timeout", 504),
        ];
        assert_eq!(table.len(), StatusReason::ALL.len());
        for (reason, wire, code) in table {
            assert_eq!(reason.as_str(), wire);
            assert_eq!(reason.to_string(), wire);
            assert_eq!(reason.code(), code, "{wire}");
            assert_eq!(wire.parse::<StatusReason>(), Ok(reason));
            assert_eq!(serde_json::to_value(reason).unwrap(), json!(wire));
        }
        assert_eq!(
            "Nope".parse::<StatusReason>(),
            Err(UnknownStatusReason("Nope".into()))
        );
    }

    #[test]
    fn constructors_use_apiserver_wording() {
        let table: Vec<(ApiError, u16, StatusReason, &str)> = vec![
            (
                ApiError::not_found("apps", "deployments", "web"),
                404,
                StatusReason::NotFound,
                r#"deployments.apps "web" not found"#,
            ),
            (
                ApiError::not_found("", "configmaps", "x"),
                404,
                StatusReason::NotFound,
                r#"configmaps "x" not found"#,
            ),
            (
                ApiError::already_exists("", "configmaps", "x"),
                409,
                StatusReason::AlreadyExists,
                r#"configmaps "x" already exists"#,
            ),
            (
                ApiError::conflict("ferry.dev", "drpairs", "p1", "boom"),
                409,
                StatusReason::Conflict,
                r#"Operation cannot be fulfilled on drpairs.ferry.dev "p1": boom"#,
            ),
            (
                ApiError::stale_resource_version("apps", "deployments", "web"),
                409,
                StatusReason::Conflict,
                r#"Operation cannot be fulfilled on deployments.apps "web": the object has been modified; please apply your changes to the latest version and try again"#,
            ),
            (
                ApiError::expired("too old resource version: 5 (100)"),
                410,
                StatusReason::Expired,
                "too old resource version: 5 (100)",
            ),
            (
                ApiError::gone("gone"),
                410,
                StatusReason::Gone,
                "gone",
            ),
            (
                ApiError::bad_request("the server rejected our request"),
                400,
                StatusReason::BadRequest,
                "the server rejected our request",
            ),
            (
                ApiError::method_not_allowed("apps", "deployments", "deletecollection"),
                405,
                StatusReason::MethodNotAllowed,
                r#"deletecollection is not supported on resources of kind "deployments.apps""#,
            ),
            (
                ApiError::unsupported_media_type(&["application/json", "application/yaml"]),
                415,
                StatusReason::UnsupportedMediaType,
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
            ),
            (
                ApiError::not_acceptable(&["application/json"]),
                406,
                StatusReason::NotAcceptable,
                "only the following media types are accepted: application/json",
            ),
            (
                ApiError::internal("disk on fire"),
                500,
                StatusReason::InternalError,
                "Internal error occurred: disk on fire",
            ),
            (
                ApiError::forbidden("", "secrets", "s", "user cannot get"),
                403,
                StatusReason::Forbidden,
                r#"secrets "s" is forbidden: user cannot get"#,
            ),
            (
                ApiError::forbidden("apps", "deployments", "", "no list"),
                403,
                StatusReason::Forbidden,
                "deployments.apps is forbidden: no list",
            ),
            (
                ApiError::forbidden("", "", "", "nope"),
                403,
                StatusReason::Forbidden,
                "forbidden: nope",
            ),
            (
                ApiError::unauthorized(""),
                401,
                StatusReason::Unauthorized,
                "not authorized",
            ),
            (
                ApiError::service_unavailable("etcd is down"),
                503,
                StatusReason::ServiceUnavailable,
                "etcd is down",
            ),
            (
                ApiError::timeout("request did not complete within 60s", 2),
                504,
                StatusReason::Timeout,
                "Timeout: request did not complete within 60s",
            ),
        ];
        for (error, code, reason, message) in table {
            assert_eq!(error.code, code, "{message}");
            assert_eq!(error.reason, reason, "{message}");
            assert_eq!(error.message, message);
            assert_eq!(error.to_string(), message);
        }
    }

    #[test]
    fn wire_shape_is_exact() {
        let table = [
            (
                ApiError::not_found("apps", "deployments", "web"),
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"deployments.apps \"web\" not found","reason":"NotFound","details":{"name":"web","group":"apps","kind":"deployments"},"code":404}"#,
            ),
            (
                ApiError::not_found("", "configmaps", "x"),
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"configmaps \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"configmaps"},"code":404}"#,
            ),
            (
                ApiError::expired("too old resource version: 5 (100)"),
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 5 (100)","reason":"Expired","code":410}"#,
            ),
            (
                ApiError::internal("boom"),
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Internal error occurred: boom","reason":"InternalError","details":{"causes":[{"message":"boom"}]},"code":500}"#,
            ),
            (
                ApiError::timeout("slow", 3),
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Timeout: slow","reason":"Timeout","details":{"retryAfterSeconds":3},"code":504}"#,
            ),
        ];
        for (error, wire) in table {
            assert_eq!(serde_json::to_string(&error).unwrap(), wire);
            let value: Value = serde_json::from_str(wire).unwrap();
            assert_eq!(error.to_status_json(), value);
            assert_eq!(ApiError::from_status_json(&value), Some(error));
        }
    }

    #[test]
    fn invalid_with_one_cause() {
        let cause = FieldError::invalid(
            "spec.rpo",
            json!("5 minutes"),
            "spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'",
        );
        let error = ApiError::invalid("ferry.dev", "DRPair", "p1", vec![cause]);
        assert_eq!(error.code, 422);
        assert_eq!(
            error.message,
            r#"DRPair.ferry.dev "p1" is invalid: spec.rpo: Invalid value: "5 minutes": spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'"#
        );
        assert_eq!(
            error.to_status_json(),
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": error.message,
                "reason": "Invalid",
                "details": {
                    "name": "p1",
                    "group": "ferry.dev",
                    "kind": "DRPair",
                    "causes": [{
                        "reason": "FieldValueInvalid",
                        "message": "Invalid value: \"5 minutes\": spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'",
                        "field": "spec.rpo"
                    }]
                },
                "code": 422
            })
        );
    }

    #[test]
    fn invalid_with_several_causes_aggregates_and_dedups() {
        let causes = vec![
            FieldError::required("spec.selector"),
            FieldError::required("spec.selector"),
            FieldError::not_supported(
                "spec.transform.replicas.policy",
                json!("Foo"),
                vec![json!("Restore"), json!("Fixed"), json!("Zero")],
            ),
        ];
        let error = ApiError::invalid("ferry.dev", "DRPair", "p1", causes);
        assert_eq!(
            error.message,
            r#"DRPair.ferry.dev "p1" is invalid: [spec.selector: Required value, spec.transform.replicas.policy: Unsupported value: "Foo": supported values: "Restore", "Fixed", "Zero"]"#
        );
        let reasons: Vec<&str> = error
            .details
            .causes
            .iter()
            .map(|c| c.reason.as_str())
            .collect();
        assert_eq!(
            reasons,
            [
                "FieldValueRequired",
                "FieldValueRequired",
                "FieldValueNotSupported"
            ]
        );
        assert_eq!(error.details.causes[0].message, "Required value");
        assert_eq!(error.details.causes[0].field, "spec.selector");
    }

    #[test]
    fn invalid_without_causes_and_core_group() {
        let error = ApiError::invalid("", "ConfigMap", "cm", Vec::new());
        assert_eq!(error.message, r#"ConfigMap "cm" is invalid"#);
        assert_eq!(
            error.to_status_json()["details"],
            json!({"name": "cm", "kind": "ConfigMap"})
        );
    }

    #[test]
    fn field_error_converts_to_cause() {
        let error = FieldError {
            path: "spec.count".into(),
            kind: FieldErrorKind::TypeInvalid {
                value: json!("string"),
                expected: "integer".into(),
            },
        };
        assert_eq!(
            StatusCause::from(error),
            StatusCause {
                reason: "FieldValueTypeInvalid".into(),
                message: r#"Invalid value: "string": spec.count in body must be of type integer: "string""#
                    .into(),
                field: "spec.count".into(),
            }
        );
    }

    #[test]
    fn from_status_json_rejects_non_status() {
        let table = [
            json!({"kind": "Pod", "status": "Failure", "reason": "NotFound"}),
            json!({"kind": "Status", "status": "Success", "reason": "NotFound"}),
            json!({"kind": "Status", "status": "Failure", "reason": "Weird"}),
            json!({"kind": "Status", "status": "Failure"}),
        ];
        for value in table {
            assert_eq!(ApiError::from_status_json(&value), None, "{value}");
        }
        let minimal = json!({"kind": "Status", "status": "Failure", "reason": "Conflict"});
        assert_eq!(
            ApiError::from_status_json(&minimal),
            Some(ApiError::new(StatusReason::Conflict, ""))
        );
    }

    #[test]
    fn names_are_go_quoted() {
        let error = ApiError::not_found("", "configmaps", "we\"ird\n");
        assert_eq!(error.message, r#"configmaps "we\"ird\n" not found"#);
    }
}
