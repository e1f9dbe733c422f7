//! OpenAPI v3 structural-schema validation, pruning and defaulting of custom resources.
//!
//! Follows the custom resource validation rules of the Kubernetes docs
//! (<https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation>)
//! and the behaviour of `k8s.io/apiextensions-apiserver` (structural schemas,
//! pruning, defaulting). The apiserver processes a custom resource write as
//! [`prune`] → [`apply_defaults`] → [`validate`]; every function here takes a
//! CRD version's `schema.openAPIV3Schema` as a JSON value and never mutates it.
//!
//! Errors are [`FieldError`]s whose `Display` matches the apiserver's
//! `field.Error` wording (`k8s.io/apimachinery/pkg/util/validation/field`)
//! with the kube-openapi detail messages, so `ApiError::invalid` can build the
//! same `422 Invalid` message a real cluster returns.
//!
//! # `pattern`
//!
//! Patterns are matched as the apiserver matches them, with Go's RE2 semantics
//! ([`crate::pattern`]): a pattern matches if it matches *anywhere* in the
//! string unless anchored. A pattern that does not compile (lookaround,
//! backreferences, malformed syntax) is a [`PatternError`]. During [`validate`]
//! such a pattern is reported once, as an internal field error at the first
//! field it applied to, instead of silently passing; [`check_schema`] reports
//! them up front when a CRD is created.

use std::collections::HashMap;

pub use crate::pattern::{Pattern, PatternError};
use std::fmt::Write as _;

use serde_json::{Map, Value};

/// Root fields the server validates itself; never validated, pruned or defaulted here.
const ROOT_META: [&str; 3] = ["apiVersion", "kind", "metadata"];

/// One invalid field, as `field.Error` in `k8s.io/apimachinery/pkg/util/validation/field`.
///
/// `path` is dotted with `[i]` for list indices and `[key]` for map keys, e.g.
/// `spec.transform.patches[0].op` or `spec.selector.matchLabels[app]`; it is
/// empty only for an error about the whole object. `Display` renders
/// `<path>: <body>` (see [`FieldError::body`]), e.g. `spec.selector: Required value`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", self.render())]
pub struct FieldError {
    /// Field path, e.g. `spec.transform.patches[0].op`.
    pub path: String,
    /// What is wrong with the field.
    pub kind: FieldErrorKind,
}

/// The kind of a [`FieldError`], one per `field.ErrorType` the validator emits.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldErrorKind {
    /// A required field is missing (`Required value`, cause `FieldValueRequired`).
    Required,
    /// The value breaks a constraint described by `detail` (`Invalid value: <value>: <detail>`,
    /// cause `FieldValueInvalid`).
    Invalid {
        /// The offending value.
        value: Value,
        /// Why it is invalid, e.g. `spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'`.
        detail: String,
    },
    /// The value is not in an enumeration (`Unsupported value: <value>: supported values: ...`,
    /// cause `FieldValueNotSupported`).
    NotSupported {
        /// The offending value.
        value: Value,
        /// The allowed values, in schema order.
        allowed: Vec<Value>,
    },
    /// The value has the wrong type or format
    /// (`Invalid value: <value>: <path> in body must be of type <expected>: <value>`,
    /// cause `FieldValueTypeInvalid`). As in the apiserver, `value` is the JSON type
    /// name of the offending value (`"string"`) for type mismatches and the value
    /// itself for `format` mismatches.
    TypeInvalid {
        /// The JSON type name (type mismatch) or the offending string (format mismatch).
        value: Value,
        /// Expected type or format, e.g. `integer`, `integer,string`, `date-time`.
        expected: String,
    },
    /// A string exceeds `maxLength` (`Too long: may not be more than <max> bytes`,
    /// cause `FieldValueTooLong`; the value is omitted as the apiserver does).
    TooLong {
        /// The `maxLength` limit.
        max: usize,
    },
    /// A list or map exceeds `maxItems`/`maxProperties`
    /// (`Too many: <actual>: must have at most <max> items`, cause `FieldValueTooMany`).
    TooMany {
        /// Number of items present.
        actual: usize,
        /// The limit.
        max: usize,
    },
    /// The field may not be set or changed (`Forbidden: <detail>`, cause `FieldValueForbidden`).
    Forbidden {
        /// Why it is forbidden.
        detail: String,
    },
    /// The check itself could not run, e.g. an unsupported `pattern` in the schema
    /// (`Internal error: <detail>`, cause `InternalError`).
    Internal {
        /// What went wrong.
        detail: String,
    },
}

impl FieldError {
    /// A [`FieldErrorKind::Required`] error at `path`.
    pub fn required(path: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::Required,
        }
    }

    /// A [`FieldErrorKind::Invalid`] error at `path`.
    pub fn invalid(path: impl Into<String>, value: Value, detail: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::Invalid {
                value,
                detail: detail.into(),
            },
        }
    }

    /// A [`FieldErrorKind::NotSupported`] error at `path`.
    pub fn not_supported(path: impl Into<String>, value: Value, allowed: Vec<Value>) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::NotSupported { value, allowed },
        }
    }

    /// A [`FieldErrorKind::TypeInvalid`] error at `path`.
    pub fn type_invalid(
        path: impl Into<String>,
        value: Value,
        expected: impl Into<String>,
    ) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::TypeInvalid {
                value,
                expected: expected.into(),
            },
        }
    }

    /// A [`FieldErrorKind::TooLong`] error at `path`.
    pub fn too_long(path: impl Into<String>, max: usize) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::TooLong { max },
        }
    }

    /// A [`FieldErrorKind::TooMany`] error at `path`.
    pub fn too_many(path: impl Into<String>, actual: usize, max: usize) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::TooMany { actual, max },
        }
    }

    /// A [`FieldErrorKind::Forbidden`] error at `path`.
    pub fn forbidden(path: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::Forbidden {
                detail: detail.into(),
            },
        }
    }

    /// A [`FieldErrorKind::Internal`] error at `path`.
    pub fn internal(path: impl Into<String>, detail: impl Into<String>) -> Self {
        FieldError {
            path: path.into(),
            kind: FieldErrorKind::Internal {
                detail: detail.into(),
            },
        }
    }

    /// The `metav1.CauseType` of this error, used as `details.causes[].reason`:
    /// `FieldValueRequired`, `FieldValueInvalid`, `FieldValueNotSupported`,
    /// `FieldValueTypeInvalid`, `FieldValueTooLong`, `FieldValueTooMany`,
    /// `FieldValueForbidden` or `InternalError`.
    pub fn reason(&self) -> &'static str {
        match self.kind {
            FieldErrorKind::Required => "FieldValueRequired",
            FieldErrorKind::Invalid { .. } => "FieldValueInvalid",
            FieldErrorKind::NotSupported { .. } => "FieldValueNotSupported",
            FieldErrorKind::TypeInvalid { .. } => "FieldValueTypeInvalid",
            FieldErrorKind::TooLong { .. } => "FieldValueTooLong",
            FieldErrorKind::TooMany { .. } => "FieldValueTooMany",
            FieldErrorKind::Forbidden { .. } => "FieldValueForbidden",
            FieldErrorKind::Internal { .. } => "InternalError",
        }
    }

    /// The message without the field path (`field.Error.ErrorBody()`), used as
    /// `details.causes[].message`, e.g. `Unsupported value: "Foo": supported
    /// values: "Restore", "Fixed", "Zero"`.
    ///
    /// Values print as Go does: strings quoted, numbers and booleans bare,
    /// `null` as `"null"`; objects and arrays print as compact JSON.
    pub fn body(&self) -> String {
        match &self.kind {
            FieldErrorKind::Required => "Required value".to_string(),
            FieldErrorKind::Invalid { value, detail } => {
                with_detail(format!("Invalid value: {}", render_value(value)), detail)
            }
            FieldErrorKind::NotSupported { value, allowed } => {
                let body = format!("Unsupported value: {}", render_value(value));
                if allowed.is_empty() {
                    body
                } else {
                    let quoted: Vec<String> = allowed
                        .iter()
                        .map(|v| match v {
                            Value::String(s) => go_quote(s),
                            other => go_quote(&other.to_string()),
                        })
                        .collect();
                    format!("{body}: supported values: {}", quoted.join(", "))
                }
            }
            FieldErrorKind::TypeInvalid { value, expected } => {
                let shown = match value {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                format!(
                    "Invalid value: {}: {} in body must be of type {expected}: {}",
                    render_value(value),
                    subject(&self.path),
                    go_quote(&shown)
                )
            }
            FieldErrorKind::TooLong { max } => {
                let unit = if *max == 1 { "byte" } else { "bytes" };
                format!("Too long: may not be more than {max} {unit}")
            }
            FieldErrorKind::TooMany { actual, max } => {
                format!("Too many: {actual}: must have at most {max} items")
            }
            FieldErrorKind::Forbidden { detail } => with_detail("Forbidden".to_string(), detail),
            FieldErrorKind::Internal { detail } => {
                with_detail("Internal error".to_string(), detail)
            }
        }
    }

    fn render(&self) -> String {
        if self.path.is_empty() {
            self.body()
        } else {
            format!("{}: {}", self.path, self.body())
        }
    }
}

fn with_detail(mut body: String, detail: &str) -> String {
    if !detail.is_empty() {
        body.push_str(": ");
        body.push_str(detail);
    }
    body
}

/// How a path is named inside kube-openapi detail messages (`<path> in body ...`).
fn subject(path: &str) -> &str {
    if path.is_empty() {
        "<root>"
    } else {
        path
    }
}

/// Renders a bad value as `field.Error.ErrorBody` does.
fn render_value(value: &Value) -> String {
    match value {
        Value::Null => go_quote("null"),
        Value::String(s) => go_quote(s),
        Value::Number(n) => render_number(n),
        Value::Bool(b) => b.to_string(),
        Value::Array(_) | Value::Object(_) => value.to_string(),
    }
}

fn render_number(n: &serde_json::Number) -> String {
    if n.is_f64() {
        n.as_f64().map(fmt_f64).unwrap_or_else(|| n.to_string())
    } else {
        n.to_string()
    }
}

/// Formats a float as Go's `%v` does for round values (`1`, not `1.0`).
fn fmt_f64(x: f64) -> String {
    format!("{x}")
}

/// Quotes a string as Go's `strconv.Quote` / `%q` does.
pub(crate) fn go_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if c.is_control() => {
                let code = u32::from(c);
                let _ = if code < 0x80 {
                    write!(out, "\\x{code:02x}")
                } else if code < 0x10000 {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn child_path(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

fn flag(schema: &Map<String, Value>, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn properties(schema: &Map<String, Value>) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

/// JSON type name as kube-openapi reports it.
fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// True for JSON integers, including integral floats such as `1.0`
/// (kube-openapi accepts those for `type: integer`).
fn is_integer(value: &Value) -> bool {
    match value {
        Value::Number(n) if n.is_f64() => n
            .as_f64()
            .is_some_and(|x| x.is_finite() && x.fract() == 0.0),
        Value::Number(_) => true,
        _ => false,
    }
}

fn type_matches(value: &Value, expected: &str) -> bool {
    expected.split(',').any(|ty| match ty {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => is_integer(value),
        "number" => value.is_number(),
        // Unknown type names are a schema problem reported by `check_schema`.
        _ => true,
    })
}

/// JSON equality with numbers compared by value (`1 == 1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Validates `object` against a CRD version's `schema.openAPIV3Schema` and
/// returns every violation (empty when valid).
///
/// Supported keywords: `type` (`object`, `array`, `string`, `integer`,
/// `number`, `boolean`), `nullable`, `enum`, `properties`, `required`,
/// `additionalProperties` (a schema for map values), `minProperties`/`maxProperties`,
/// `items`, `minItems`/`maxItems`, `minLength`/`maxLength` (in characters),
/// `pattern` (see the module docs for the subset), `format: date-time`,
/// `minimum`/`maximum` with boolean `exclusiveMinimum`/`exclusiveMaximum`,
/// `multipleOf`, `allOf`/`anyOf`/`oneOf`/`not` (value validation only),
/// `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields` and
/// `x-kubernetes-embedded-resource` (an object with string `apiVersion` and
/// `kind` and an object `metadata`). Other keywords (`uniqueItems`, other
/// formats, list types, CEL rules) are ignored.
///
/// Unknown fields are not errors: the apiserver [`prune`]s them first. Root
/// `apiVersion`, `kind` and `metadata` are skipped (also in `required`).
/// Integers must be JSON integers; integral floats (`1.0`) are accepted as
/// kube-openapi does, `1.5` is not. A node with a type error is not checked
/// further. An unsupported `pattern` yields one [`FieldErrorKind::Internal`]
/// error per distinct pattern, placed first.
pub fn validate(object: &Value, schema: &Value) -> Vec<FieldError> {
    let mut validator = Validator::default();
    let mut errors = Vec::new();
    validator.node(object, schema, "", true, &mut errors);
    let mut all = validator.schema_errors;
    all.append(&mut errors);
    all
}

#[derive(Default)]
struct Validator {
    /// Compiled patterns by source; `None` when the pattern is unsupported.
    patterns: HashMap<String, Option<Pattern>>,
    /// Unsupported-pattern errors, one per distinct pattern.
    schema_errors: Vec<FieldError>,
}

impl Validator {
    fn pattern(&mut self, source: &str, path: &str) -> Option<&Pattern> {
        if !self.patterns.contains_key(source) {
            let compiled = match Pattern::new(source) {
                Ok(pattern) => Some(pattern),
                Err(error) => {
                    self.schema_errors.push(FieldError::internal(
                        path,
                        format!("schema pattern cannot be checked: {error}"),
                    ));
                    None
                }
            };
            self.patterns.insert(source.to_string(), compiled);
        }
        self.patterns.get(source).and_then(Option::as_ref)
    }

    fn node(
        &mut self,
        value: &Value,
        schema: &Value,
        path: &str,
        root: bool,
        out: &mut Vec<FieldError>,
    ) {
        let Some(s) = schema.as_object() else {
            return;
        };
        if value.is_null() && flag(s, "nullable") {
            return;
        }
        let expected = if flag(s, "x-kubernetes-int-or-string") {
            Some("integer,string")
        } else if let Some(ty) = s.get("type").and_then(Value::as_str) {
            Some(ty)
        } else if flag(s, "x-kubernetes-embedded-resource") {
            Some("object")
        } else {
            None
        };
        if let Some(expected) = expected {
            if !type_matches(value, expected) {
                out.push(FieldError::type_invalid(
                    path,
                    Value::String(json_type(value).to_string()),
                    expected,
                ));
                return;
            }
        }
        if let Some(Value::Array(allowed)) = s.get("enum") {
            if !allowed.iter().any(|a| json_eq(a, value)) {
                out.push(FieldError::not_supported(
                    path,
                    value.clone(),
                    allowed.clone(),
                ));
            }
        }
        match value {
            Value::String(text) => self.string(text, s, path, out),
            Value::Number(_) => number(value, s, path, out),
            Value::Array(items) => self.array(items, s, path, out),
            Value::Object(map) => self.object(map, s, path, root, out),
            Value::Null | Value::Bool(_) => {}
        }
        self.combinators(value, s, path, root, out);
    }

    fn string(
        &mut self,
        text: &str,
        s: &Map<String, Value>,
        path: &str,
        out: &mut Vec<FieldError>,
    ) {
        let value = || Value::String(text.to_string());
        let len = text.chars().count();
        if let Some(max) = s.get("maxLength").and_then(Value::as_u64) {
            if len as u64 > max {
                out.push(FieldError::too_long(
                    path,
                    usize::try_from(max).unwrap_or(usize::MAX),
                ));
            }
        }
        if let Some(min) = s.get("minLength").and_then(Value::as_u64) {
            if (len as u64) < min {
                out.push(FieldError::invalid(
                    path,
                    value(),
                    format!(
                        "{} in body should be at least {min} chars long",
                        subject(path)
                    ),
                ));
            }
        }
        if let Some(source) = s.get("pattern").and_then(Value::as_str) {
            if let Some(pattern) = self.pattern(source, path) {
                if !pattern.is_match(text) {
                    out.push(FieldError::invalid(
                        path,
                        value(),
                        format!("{} in body should match '{source}'", subject(path)),
                    ));
                }
            }
        }
        if s.get("format").and_then(Value::as_str) == Some("date-time") && !is_date_time(text) {
            out.push(FieldError::type_invalid(path, value(), "date-time"));
        }
    }

    fn array(
        &mut self,
        items: &[Value],
        s: &Map<String, Value>,
        path: &str,
        out: &mut Vec<FieldError>,
    ) {
        if let Some(max) = s.get("maxItems").and_then(Value::as_u64) {
            if items.len() as u64 > max {
                out.push(FieldError::too_many(
                    path,
                    items.len(),
                    usize::try_from(max).unwrap_or(usize::MAX),
                ));
            }
        }
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (items.len() as u64) < min {
                out.push(FieldError::invalid(
                    path,
                    Value::from(items.len()),
                    format!("{} in body should have at least {min} items", subject(path)),
                ));
            }
        }
        if let Some(item_schema) = s.get("items") {
            for (i, item) in items.iter().enumerate() {
                self.node(item, item_schema, &format!("{path}[{i}]"), false, out);
            }
        }
    }

    fn object(
        &mut self,
        map: &Map<String, Value>,
        s: &Map<String, Value>,
        path: &str,
        root: bool,
        out: &mut Vec<FieldError>,
    ) {
        let skipped = |key: &str| root && ROOT_META.contains(&key);
        if let Some(max) = s.get("maxProperties").and_then(Value::as_u64) {
            if map.len() as u64 > max {
                out.push(FieldError::too_many(
                    path,
                    map.len(),
                    usize::try_from(max).unwrap_or(usize::MAX),
                ));
            }
        }
        if let Some(min) = s.get("minProperties").and_then(Value::as_u64) {
            if (map.len() as u64) < min {
                out.push(FieldError::invalid(
                    path,
                    Value::from(map.len()),
                    format!(
                        "{} in body should have at least {min} properties",
                        subject(path)
                    ),
                ));
            }
        }
        if let Some(Value::Array(required)) = s.get("required") {
            for name in required.iter().filter_map(Value::as_str) {
                if !skipped(name) && !map.contains_key(name) {
                    out.push(FieldError::required(child_path(path, name)));
                }
            }
        }
        if flag(s, "x-kubernetes-embedded-resource") {
            embedded_resource(map, path, out);
        }
        let props = properties(s);
        let additional = s.get("additionalProperties").filter(|a| a.is_object());
        for (key, child) in map {
            if skipped(key) {
                continue;
            }
            if let Some(prop) = props.and_then(|p| p.get(key)) {
                self.node(child, prop, &child_path(path, key), false, out);
            } else if let Some(additional) = additional {
                self.node(child, additional, &format!("{path}[{key}]"), false, out);
            }
        }
    }

    fn combinators(
        &mut self,
        value: &Value,
        s: &Map<String, Value>,
        path: &str,
        root: bool,
        out: &mut Vec<FieldError>,
    ) {
        let fail = |detail: &str| {
            FieldError::invalid(
                path,
                value.clone(),
                format!("{} in body {detail}", subject(path)),
            )
        };
        if let Some(Value::Array(all)) = s.get("allOf") {
            let mut errors = Vec::new();
            for sub in all {
                self.node(value, sub, path, root, &mut errors);
            }
            if !errors.is_empty() {
                out.push(fail("must validate all the schemas (allOf)"));
                out.append(&mut errors);
            }
        }
        if let Some(Value::Array(any)) = s.get("anyOf") {
            let (valid, best) = self.alternatives(value, any, path, root, true);
            if valid == 0 {
                out.push(fail("should validate at least one schema (anyOf)"));
                out.extend(best);
            }
        }
        if let Some(Value::Array(one)) = s.get("oneOf") {
            let (valid, best) = self.alternatives(value, one, path, root, false);
            match valid {
                1 => {}
                0 => {
                    out.push(fail(
                        "must validate one and only one schema (oneOf). Found none valid",
                    ));
                    out.extend(best);
                }
                n => out.push(fail(&format!(
                    "must validate one and only one schema (oneOf). Found {n} valid alternatives"
                ))),
            }
        }
        if let Some(not) = s.get("not") {
            let mut errors = Vec::new();
            self.node(value, not, path, root, &mut errors);
            if errors.is_empty() {
                out.push(fail("shouldn't validate the schema (not)"));
            }
        }
    }

    /// Counts the alternatives `value` satisfies (stopping at the first when
    /// `stop_at_first`) and returns the errors of the closest failing one.
    fn alternatives(
        &mut self,
        value: &Value,
        schemas: &[Value],
        path: &str,
        root: bool,
        stop_at_first: bool,
    ) -> (usize, Vec<FieldError>) {
        let mut valid = 0;
        let mut best: Option<Vec<FieldError>> = None;
        for sub in schemas {
            let mut errors = Vec::new();
            self.node(value, sub, path, root, &mut errors);
            if errors.is_empty() {
                valid += 1;
                if stop_at_first {
                    break;
                }
            } else if best.as_ref().is_none_or(|b| errors.len() < b.len()) {
                best = Some(errors);
            }
        }
        (valid, best.unwrap_or_default())
    }
}

fn number(value: &Value, s: &Map<String, Value>, path: &str, out: &mut Vec<FieldError>) {
    let Some(x) = value.as_f64() else {
        return;
    };
    let mut fail = |detail: String| {
        out.push(FieldError::invalid(
            path,
            value.clone(),
            format!("{} in body {detail}", subject(path)),
        ));
    };
    if let Some(max) = s.get("maximum").and_then(Value::as_f64) {
        if flag(s, "exclusiveMaximum") {
            if x >= max {
                fail(format!("should be less than {}", fmt_f64(max)));
            }
        } else if x > max {
            fail(format!("should be less than or equal to {}", fmt_f64(max)));
        }
    }
    if let Some(min) = s.get("minimum").and_then(Value::as_f64) {
        if flag(s, "exclusiveMinimum") {
            if x <= min {
                fail(format!("should be greater than {}", fmt_f64(min)));
            }
        } else if x < min {
            fail(format!(
                "should be greater than or equal to {}",
                fmt_f64(min)
            ));
        }
    }
    if let Some(factor) = s.get("multipleOf").and_then(Value::as_f64) {
        if factor > 0.0 {
            let quotient = x / factor;
            if (quotient - quotient.round()).abs() > 1e-9 * quotient.abs().max(1.0) {
                fail(format!("should be a multiple of {}", fmt_f64(factor)));
            }
        }
    }
}

/// `x-kubernetes-embedded-resource` checks (`validateEmbeddedResource`).
fn embedded_resource(map: &Map<String, Value>, path: &str, out: &mut Vec<FieldError>) {
    for field in ["apiVersion", "kind"] {
        let field_path = child_path(path, field);
        match map.get(field) {
            None => out.push(FieldError::required(field_path)),
            Some(Value::String(s)) if s.is_empty() => {
                out.push(FieldError::invalid(
                    field_path,
                    Value::String(String::new()),
                    "must not be empty",
                ));
            }
            Some(Value::String(_)) => {}
            Some(other) => out.push(FieldError::invalid(
                field_path,
                other.clone(),
                "must be a string",
            )),
        }
    }
    if let Some(metadata) = map.get("metadata") {
        if !metadata.is_object() {
            out.push(FieldError::type_invalid(
                child_path(path, "metadata"),
                Value::String(json_type(metadata).to_string()),
                "object",
            ));
        }
    }
}

/// RFC 3339 `date-time` (`2006-01-02T15:04:05Z`, optional fraction, `Z` or `±hh:mm`).
fn is_date_time(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |at: usize, len: usize| -> Option<u32> {
        let digits = b.get(at..at + len)?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(
            digits
                .iter()
                .fold(0, |acc, d| acc * 10 + u32::from(d - b'0')),
        )
    };
    let byte_is = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        num(0, 4),
        num(5, 2),
        num(8, 2),
        num(11, 2),
        num(14, 2),
        num(17, 2),
    ) else {
        return false;
    };
    if !(byte_is(4, b"-")
        && byte_is(7, b"-")
        && byte_is(10, b"Tt")
        && byte_is(13, b":")
        && byte_is(16, b":"))
    {
        return false;
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut i = 19;
    if byte_is(i, b".") {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match b.get(i) {
        Some(b'Z' | b'z') => i + 1 == b.len(),
        Some(b'+' | b'-') => {
            i + 6 == b.len()
                && byte_is(i + 3, b":")
                && num(i + 1, 2).is_some_and(|h| h <= 23)
                && num(i + 4, 2).is_some_and(|m| m <= 59)
        }
        _ => false,
    }
}

/// Drops every field `schema` does not declare, as the apiserver prunes custom
/// resources before defaulting and validation.
///
/// An object keeps the keys listed in `properties`; all keys when
/// `x-kubernetes-preserve-unknown-fields: true` or when `additionalProperties`
/// is a schema or `true` (map values are then pruned by that schema); and
/// `apiVersion`/`kind`/`metadata` under `x-kubernetes-embedded-resource`.
/// Declared properties are pruned recursively even under preserve-unknown-fields;
/// preserved unknown subtrees are left untouched. Arrays are pruned item by item
/// with `items`. The root `apiVersion`, `kind` and `metadata` are never pruned.
pub fn prune(object: &mut Value, schema: &Value) {
    prune_node(object, schema, true);
}

fn prune_node(value: &mut Value, schema: &Value, root: bool) {
    let Some(s) = schema.as_object() else {
        return;
    };
    match value {
        Value::Object(map) => {
            let props = properties(s);
            let additional = s.get("additionalProperties");
            let keep_all = flag(s, "x-kubernetes-preserve-unknown-fields")
                || additional.is_some_and(|a| a.is_object() || a == &Value::Bool(true));
            let embedded = flag(s, "x-kubernetes-embedded-resource");
            let keeps_meta = |key: &str| (root || embedded) && ROOT_META.contains(&key);
            map.retain(|key, _| {
                keep_all || keeps_meta(key) || props.is_some_and(|p| p.contains_key(key))
            });
            for (key, child) in map.iter_mut() {
                if root && ROOT_META.contains(&key.as_str()) {
                    continue;
                }
                if let Some(prop) = props.and_then(|p| p.get(key)) {
                    prune_node(child, prop, false);
                } else if embedded && key == "metadata" {
                    continue;
                } else if let Some(additional) = additional.filter(|a| a.is_object()) {
                    prune_node(child, additional, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.get("items") {
                for item in items {
                    prune_node(item, item_schema, false);
                }
            }
        }
        _ => {}
    }
}

/// Fills in `default` values, as the apiserver does before validation.
///
/// For every object that is present, each property absent from it gets a
/// copy of its schema's `default`; a property holding `null` whose schema is
/// not `nullable: true` is replaced by its default, or removed when it has
/// none (nullable nulls are kept as they are). Defaulting then recurses into
/// all values, including freshly defaulted ones, through `properties`,
/// `additionalProperties` and `items`; absent parents are not created. The
/// root `apiVersion`, `kind` and `metadata` are left alone.
pub fn apply_defaults(object: &mut Value, schema: &Value) {
    default_node(object, schema, true);
}

fn default_node(value: &mut Value, schema: &Value, root: bool) {
    let Some(s) = schema.as_object() else {
        return;
    };
    match value {
        Value::Object(map) => {
            let skipped = |key: &str| root && ROOT_META.contains(&key);
            let props = properties(s);
            for (key, prop) in props.into_iter().flatten() {
                if skipped(key) {
                    continue;
                }
                let default = prop.get("default");
                match map.get(key) {
                    None => {
                        if let Some(default) = default {
                            map.insert(key.clone(), default.clone());
                        }
                    }
                    Some(Value::Null) if !prop.get("nullable").is_some_and(|n| n == true) => {
                        match default {
                            Some(default) => {
                                map.insert(key.clone(), default.clone());
                            }
                            None => {
                                map.remove(key);
                            }
                        }
                    }
                    Some(_) => {}
                }
            }
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map.iter_mut() {
                if skipped(key) {
                    continue;
                }
                if let Some(prop) = props.and_then(|p| p.get(key)) {
                    default_node(child, prop, false);
                } else if let Some(additional) = additional {
                    default_node(child, additional, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.get("items") {
                for item in items {
                    default_node(item, item_schema, false);
                }
            }
        }
        _ => {}
    }
}

/// Checks the parts of a schema this module relies on, as the apiserver does
/// when a CRD is created: every `pattern` must compile (with the supported
/// subset, see the module docs) and every `type` must be a known type.
///
/// Paths are `base` followed by the schema location, e.g. with base
/// `spec.versions[0].schema.openAPIV3Schema`:
/// `spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[rpo].pattern:
/// Invalid value: "(?i)x": must be a valid regular expression, but isn't: ...`.
pub fn check_schema(schema: &Value, base: &str) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_schema_node(schema, base, &mut errors);
    errors
}

fn check_schema_node(schema: &Value, path: &str, out: &mut Vec<FieldError>) {
    let Some(s) = schema.as_object() else {
        return;
    };
    if let Some(ty) = s.get("type") {
        const TYPES: [&str; 6] = ["object", "array", "string", "integer", "number", "boolean"];
        if !ty.as_str().is_some_and(|t| TYPES.contains(&t)) {
            out.push(FieldError::not_supported(
                child_path(path, "type"),
                ty.clone(),
                TYPES.iter().map(|t| Value::from(*t)).collect(),
            ));
        }
    }
    if let Some(pattern) = s.get("pattern") {
        let compiled = match pattern.as_str() {
            Some(source) => Pattern::new(source).map(drop).map_err(|e| e.to_string()),
            None => Err("must be a string".to_string()),
        };
        if let Err(error) = compiled {
            out.push(FieldError::invalid(
                child_path(path, "pattern"),
                pattern.clone(),
                format!("must be a valid regular expression, but isn't: {error}"),
            ));
        }
    }
    if let Some(props) = properties(s) {
        for (key, prop) in props {
            check_schema_node(
                prop,
                &format!("{}[{key}]", child_path(path, "properties")),
                out,
            );
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = s.get(key) {
            check_schema_node(sub, &child_path(path, key), out);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = s.get(key) {
            for (i, sub) in subs.iter().enumerate() {
                check_schema_node(sub, &format!("{}[{i}]", child_path(path, key)), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::ApiError;
    use serde_json::json;

    /// A DRPair CRD's `openAPIV3Schema`.
    fn drpair_schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {
                    "type": "object",
                    "required": ["selector", "primarySite", "secondarySite"],
                    "properties": {
                        "selector": {
                            "type": "object",
                            "properties": {
                                "matchLabels": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string", "maxLength": 63}
                                }
                            }
                        },
                        "primarySite": {"type": "string", "minLength": 1},
                        "secondarySite": {"type": "string", "minLength": 1},
                        "rpo": {
                            "type": "string",
                            "pattern": "^[0-9]+(ms|s|m|h)$",
                            "default": "5m"
                        },
                        "paused": {"type": "boolean", "default": false},
                        "failoverAfter": {"type": "string", "format": "date-time", "nullable": true},
                        "transform": {
                            "type": "object",
                            "properties": {
                                "replicas": {
                                    "type": "object",
                                    "properties": {
                                        "policy": {
                                            "type": "string",
                                            "enum": ["Restore", "Fixed", "Zero"],
                                            "default": "Restore"
                                        },
                                        "count": {"type": "integer", "minimum": 0}
                                    }
                                },
                                "patches": {
                                    "type": "array",
                                    "maxItems": 3,
                                    "items": {
                                        "type": "object",
                                        "required": ["op", "path"],
                                        "properties": {
                                            "op": {"type": "string", "enum": ["add", "remove", "replace"]},
                                            "path": {"type": "string", "pattern": "^/"},
                                            "value": {"x-kubernetes-preserve-unknown-fields": true}
                                        }
                                    }
                                }
                            }
                        }
                    }
                },
                "status": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "properties": {
                        "phase": {"type": "string", "enum": ["Pending", "Ready"]}
                    }
                }
            }
        })
    }

    fn drpair() -> Value {
        json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "DRPair",
            "metadata": {"name": "p1", "namespace": "default", "labels": {"a": "b"}},
            "spec": {
                "selector": {"matchLabels": {"app": "web"}},
                "primarySite": "eu-west",
                "secondarySite": "eu-north",
                "rpo": "30s",
                "transform": {
                    "replicas": {"policy": "Fixed", "count": 2},
                    "patches": [
                        {"op": "replace", "path": "/spec/replicas", "value": 1},
                        {"op": "add", "path": "/metadata/labels/dr", "value": {"any": ["thing"]}}
                    ]
                }
            },
            "status": {"phase": "Ready", "lastSync": {"at": "now"}}
        })
    }

    fn messages(errors: &[FieldError]) -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    }

    /// Sets the value at a `/`-separated pointer, creating nothing.
    fn set(object: &mut Value, pointer: &str, value: Value) {
        *object.pointer_mut(pointer).expect(pointer) = value;
    }

    fn remove(object: &mut Value, pointer: &str) {
        let (parent, key) = pointer.rsplit_once('/').unwrap();
        object
            .pointer_mut(parent)
            .and_then(Value::as_object_mut)
            .expect(parent)
            .remove(key);
    }

    #[test]
    fn display_matches_apiserver_wording() {
        let table = [
            (FieldError::required("spec.selector"), "spec.selector: Required value"),
            (
                FieldError::invalid(
                    "spec.rpo",
                    json!("5 minutes"),
                    "spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'",
                ),
                r#"spec.rpo: Invalid value: "5 minutes": spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'"#,
            ),
            (
                FieldError::not_supported(
                    "spec.transform.replicas.policy",
                    json!("Foo"),
                    vec![json!("Restore"), json!("Fixed"), json!("Zero")],
                ),
                r#"spec.transform.replicas.policy: Unsupported value: "Foo": supported values: "Restore", "Fixed", "Zero""#,
            ),
            (
                FieldError::not_supported("spec.level", json!(4), vec![json!(1), json!(2)]),
                r#"spec.level: Unsupported value: 4: supported values: "1", "2""#,
            ),
            (
                FieldError::type_invalid("spec.count", json!("string"), "integer"),
                r#"spec.count: Invalid value: "string": spec.count in body must be of type integer: "string""#,
            ),
            (
                FieldError::invalid(
                    "spec.count",
                    json!(0),
                    "spec.count in body should be greater than or equal to 1",
                ),
                "spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1",
            ),
            (
                FieldError::invalid("spec.x", Value::Null, ""),
                r#"spec.x: Invalid value: "null""#,
            ),
            (
                FieldError::invalid("spec.x", json!({"a": [1, true]}), "bad"),
                r#"spec.x: Invalid value: {"a":[1,true]}: bad"#,
            ),
            (
                FieldError::invalid("spec.ratio", json!(1.5), "bad"),
                "spec.ratio: Invalid value: 1.5: bad",
            ),
            (
                FieldError::too_long("spec.name", 5),
                "spec.name: Too long: may not be more than 5 bytes",
            ),
            (
                FieldError::too_many("spec.patches", 4, 3),
                "spec.patches: Too many: 4: must have at most 3 items",
            ),
            (
                FieldError::forbidden("spec.primarySite", "field is immutable"),
                "spec.primarySite: Forbidden: field is immutable",
            ),
            (
                FieldError::internal("spec.rpo", "oops"),
                "spec.rpo: Internal error: oops",
            ),
            (FieldError::required(""), "Required value"),
        ];
        for (error, expected) in table {
            assert_eq!(error.to_string(), expected);
        }
    }

    #[test]
    fn reasons_are_cause_types() {
        let table = [
            (FieldError::required("a"), "FieldValueRequired"),
            (FieldError::invalid("a", json!(1), "x"), "FieldValueInvalid"),
            (
                FieldError::not_supported("a", json!(1), vec![]),
                "FieldValueNotSupported",
            ),
            (
                FieldError::type_invalid("a", json!("string"), "integer"),
                "FieldValueTypeInvalid",
            ),
            (FieldError::too_long("a", 1), "FieldValueTooLong"),
            (FieldError::too_many("a", 2, 1), "FieldValueTooMany"),
            (FieldError::forbidden("a", "x"), "FieldValueForbidden"),
            (FieldError::internal("a", "x"), "InternalError"),
        ];
        for (error, reason) in table {
            assert_eq!(error.reason(), reason, "{error}");
        }
    }

    #[test]
    fn go_quote_escapes_like_strconv() {
        let table = [
            ("plain", r#""plain""#),
            ("a\"b\\c", r#""a\"b\\c""#),
            ("tab\tnl\n", r#""tab\tnl\n""#),
            ("\u{1}", r#""\x01""#),
            ("\u{85}", r#""\u0085""#),
            ("héllo ✓", "\"héllo ✓\""),
        ];
        for (input, expected) in table {
            assert_eq!(go_quote(input), expected);
        }
    }

    #[test]
    fn valid_drpair_has_no_errors() {
        let errors = validate(&drpair(), &drpair_schema());
        assert!(errors.is_empty(), "{:?}", messages(&errors));
    }

    #[test]
    fn invalid_drpairs_report_the_apiserver_messages() {
        type Mutation = fn(&mut Value);
        let table: Vec<(&str, Mutation, Vec<&str>)> = vec![
            (
                "missing selector",
                |o| remove(o, "/spec/selector"),
                vec!["spec.selector: Required value"],
            ),
            (
                "empty primary site",
                |o| set(o, "/spec/primarySite", json!("")),
                vec![r#"spec.primarySite: Invalid value: "": spec.primarySite in body should be at least 1 chars long"#],
            ),
            (
                "bad rpo",
                |o| set(o, "/spec/rpo", json!("5 minutes")),
                vec![r#"spec.rpo: Invalid value: "5 minutes": spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'"#],
            ),
            (
                "bad policy",
                |o| set(o, "/spec/transform/replicas/policy", json!("Foo")),
                vec![r#"spec.transform.replicas.policy: Unsupported value: "Foo": supported values: "Restore", "Fixed", "Zero""#],
            ),
            (
                "string count",
                |o| set(o, "/spec/transform/replicas/count", json!("two")),
                vec![r#"spec.transform.replicas.count: Invalid value: "string": spec.transform.replicas.count in body must be of type integer: "string""#],
            ),
            (
                "fractional count",
                |o| set(o, "/spec/transform/replicas/count", json!(1.5)),
                vec![r#"spec.transform.replicas.count: Invalid value: "number": spec.transform.replicas.count in body must be of type integer: "number""#],
            ),
            (
                "negative count",
                |o| set(o, "/spec/transform/replicas/count", json!(-1)),
                vec!["spec.transform.replicas.count: Invalid value: -1: spec.transform.replicas.count in body should be greater than or equal to 0"],
            ),
            (
                "bad patch op and missing path",
                |o| set(o, "/spec/transform/patches/1", json!({"op": "move"})),
                vec![
                    r#"spec.transform.patches[1].path: Required value"#,
                    r#"spec.transform.patches[1].op: Unsupported value: "move": supported values: "add", "remove", "replace""#,
                ],
            ),
            (
                "too many patches",
                |o| {
                    set(
                        o,
                        "/spec/transform/patches",
                        json!([
                            {"op": "remove", "path": "/a"},
                            {"op": "remove", "path": "/b"},
                            {"op": "remove", "path": "/c"},
                            {"op": "remove", "path": "d"}
                        ]),
                    )
                },
                vec![
                    "spec.transform.patches: Too many: 4: must have at most 3 items",
                    r#"spec.transform.patches[3].path: Invalid value: "d": spec.transform.patches[3].path in body should match '^/'"#,
                ],
            ),
            (
                "non-string label value",
                |o| set(o, "/spec/selector/matchLabels", json!({"app": 7})),
                vec![r#"spec.selector.matchLabels[app]: Invalid value: "integer": spec.selector.matchLabels[app] in body must be of type string: "integer""#],
            ),
            (
                "long label value",
                |o| set(o, "/spec/selector/matchLabels/app", json!("x".repeat(64))),
                vec!["spec.selector.matchLabels[app]: Too long: may not be more than 63 bytes"],
            ),
            (
                "spec not an object",
                |o| set(o, "/spec", json!([1])),
                vec![r#"spec: Invalid value: "array": spec in body must be of type object: "array""#],
            ),
            (
                "null non-nullable",
                |o| set(o, "/spec/rpo", Value::Null),
                vec![r#"spec.rpo: Invalid value: "null": spec.rpo in body must be of type string: "null""#],
            ),
            (
                "null nullable",
                |o| set(o, "/spec", {
                    let mut spec = drpair()["spec"].clone();
                    spec["failoverAfter"] = Value::Null;
                    spec
                }),
                vec![],
            ),
            (
                "bad date-time",
                |o| set(o, "/spec", {
                    let mut spec = drpair()["spec"].clone();
                    spec["failoverAfter"] = json!("tomorrow");
                    spec
                }),
                vec![r#"spec.failoverAfter: Invalid value: "tomorrow": spec.failoverAfter in body must be of type date-time: "tomorrow""#],
            ),
            (
                "bad status phase",
                |o| set(o, "/status/phase", json!("Lost")),
                vec![r#"status.phase: Unsupported value: "Lost": supported values: "Pending", "Ready""#],
            ),
            (
                "unknown fields are not errors",
                |o| {
                    o["spec"]["bogus"] = json!(1);
                    o["extra"] = json!(true);
                },
                vec![],
            ),
            (
                "metadata is skipped",
                |o| set(o, "/metadata", json!("not even an object")),
                vec![],
            ),
        ];
        let schema = drpair_schema();
        for (name, mutate, expected) in table {
            let mut object = drpair();
            mutate(&mut object);
            let mut got = messages(&validate(&object, &schema));
            let mut expected: Vec<String> = expected.into_iter().map(String::from).collect();
            got.sort();
            expected.sort();
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn reports_all_errors_and_builds_invalid_status() {
        let object = json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "DRPair",
            "metadata": {"name": "p1"},
            "spec": {"primarySite": "a", "rpo": "5 minutes"}
        });
        let errors = validate(&object, &drpair_schema());
        assert_eq!(
            messages(&errors),
            [
                "spec.selector: Required value",
                "spec.secondarySite: Required value",
                r#"spec.rpo: Invalid value: "5 minutes": spec.rpo in body should match '^[0-9]+(ms|s|m|h)$'"#,
            ]
        );
        let status = ApiError::invalid("ferry.dev", "DRPair", "p1", errors);
        assert_eq!(
            status.message,
            r#"DRPair.ferry.dev "p1" is invalid: [spec.selector: Required value, spec.secondarySite: Required value, spec.rpo: Invalid value: "5 minutes": spec.rpo in body should match '^[0-9]+(ms|s|m|h)$']"#
        );
        assert_eq!(status.details.causes[2].field, "spec.rpo");
        assert_eq!(status.details.causes[2].reason, "FieldValueInvalid");
    }

    #[test]
    fn required_root_metadata_is_skipped() {
        let schema = json!({
            "type": "object",
            "required": ["metadata", "spec"],
            "properties": {"metadata": {"type": "string"}, "spec": {"type": "object"}}
        });
        let errors = validate(&json!({"metadata": {"name": "x"}}), &schema);
        assert_eq!(messages(&errors), ["spec: Required value"]);
    }

    #[test]
    fn numeric_keywords() {
        let table = [
            (json!({"type": "integer", "minimum": 1}), json!(0), vec!["spec.count: Invalid value: 0: spec.count in body should be greater than or equal to 1"]),
            (json!({"type": "integer", "minimum": 1, "exclusiveMinimum": true}), json!(1), vec!["spec.count: Invalid value: 1: spec.count in body should be greater than 1"]),
            (json!({"type": "integer", "maximum": 10}), json!(11), vec!["spec.count: Invalid value: 11: spec.count in body should be less than or equal to 10"]),
            (json!({"type": "number", "maximum": 2.5, "exclusiveMaximum": true}), json!(2.5), vec!["spec.count: Invalid value: 2.5: spec.count in body should be less than 2.5"]),
            (json!({"type": "number", "multipleOf": 0.1}), json!(0.3), vec![]),
            (json!({"type": "integer", "multipleOf": 5}), json!(12), vec!["spec.count: Invalid value: 12: spec.count in body should be a multiple of 5"]),
            (json!({"type": "integer"}), json!(3.0), vec![]),
            (json!({"type": "integer"}), json!(true), vec![r#"spec.count: Invalid value: "boolean": spec.count in body must be of type integer: "boolean""#]),
            (json!({"type": "number"}), json!(7), vec![]),
            (json!({"type": "integer", "enum": [1, 2]}), json!(2.0), vec![]),
            (json!({"type": "string"}), json!("string"), vec![]),
            (json!({"type": "integer"}), json!("string"), vec![r#"spec.count: Invalid value: "string": spec.count in body must be of type integer: "string""#]),
        ];
        for (count_schema, value, expected) in table {
            let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {"count": count_schema}}}});
            let object = json!({"spec": {"count": value}});
            assert_eq!(
                messages(&validate(&object, &schema)),
                expected,
                "{count_schema} {value}"
            );
        }
    }

    #[test]
    fn collection_keywords() {
        let table = [
            (
                json!({"type": "array", "minItems": 1, "items": {"type": "string"}}),
                json!([]),
                vec!["x: Invalid value: 0: x in body should have at least 1 items"],
            ),
            (
                json!({"type": "array", "items": {"type": "string"}}),
                json!(["a", 1]),
                vec![
                    r#"x[1]: Invalid value: "integer": x[1] in body must be of type string: "integer""#,
                ],
            ),
            (
                json!({"type": "object", "maxProperties": 1, "additionalProperties": {"type": "integer"}}),
                json!({"a": 1, "b": 2}),
                vec!["x: Too many: 2: must have at most 1 items"],
            ),
            (
                json!({"type": "object", "minProperties": 2}),
                json!({"a": 1}),
                vec![r#"x: Invalid value: 1: x in body should have at least 2 properties"#],
            ),
            (
                json!({"type": "string", "maxLength": 1}),
                json!("é"),
                vec![],
            ),
        ];
        for (x_schema, value, expected) in table {
            let schema = json!({"type": "object", "properties": {"x": x_schema}});
            assert_eq!(
                messages(&validate(&json!({"x": value}), &schema)),
                expected,
                "{x_schema}"
            );
        }
    }

    #[test]
    fn int_or_string_preserve_and_embedded() {
        let schema = json!({
            "type": "object",
            "properties": {
                "port": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": "^[a-z]+$"},
                "raw": {"x-kubernetes-preserve-unknown-fields": true},
                "template": {"type": "object", "x-kubernetes-embedded-resource": true, "x-kubernetes-preserve-unknown-fields": true}
            }
        });
        let table = [
            (json!({"port": 8080}), vec![]),
            (json!({"port": "http"}), vec![]),
            (
                json!({"port": "HTTP"}),
                vec![r#"port: Invalid value: "HTTP": port in body should match '^[a-z]+$'"#],
            ),
            (
                json!({"port": true}),
                vec![
                    r#"port: Invalid value: "boolean": port in body must be of type integer,string: "boolean""#,
                ],
            ),
            (
                json!({"port": 1.5}),
                vec![
                    r#"port: Invalid value: "number": port in body must be of type integer,string: "number""#,
                ],
            ),
            (json!({"raw": null}), vec![]),
            (json!({"raw": [1, {"a": null}]}), vec![]),
            (
                json!({"template": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {}}}),
                vec![],
            ),
            (
                json!({"template": {"kind": "", "metadata": 3}}),
                vec![
                    "template.apiVersion: Required value",
                    r#"template.kind: Invalid value: "": must not be empty"#,
                    r#"template.metadata: Invalid value: "integer": template.metadata in body must be of type object: "integer""#,
                ],
            ),
            (
                json!({"template": "pod"}),
                vec![
                    r#"template: Invalid value: "string": template in body must be of type object: "string""#,
                ],
            ),
        ];
        for (object, expected) in table {
            assert_eq!(messages(&validate(&object, &schema)), expected, "{object}");
        }
    }

    #[test]
    fn combinators() {
        let schema = json!({
            "type": "object",
            "properties": {
                "any": {"type": "object", "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
                "one": {"type": "string", "oneOf": [{"pattern": "^a"}, {"pattern": "b$"}]},
                "all": {"type": "string", "allOf": [{"minLength": 2}, {"pattern": "^x"}]},
                "not": {"type": "string", "not": {"enum": ["forbidden"]}}
            }
        });
        let table = [
            (
                json!({"any": {"a": 1}, "one": "ax", "all": "xy", "not": "fine"}),
                vec![],
            ),
            (
                json!({"any": {"c": 1}}),
                vec![
                    r#"any: Invalid value: {"c":1}: any in body should validate at least one schema (anyOf)"#,
                    "any.a: Required value",
                ],
            ),
            (
                json!({"one": "ab"}),
                vec![
                    r#"one: Invalid value: "ab": one in body must validate one and only one schema (oneOf). Found 2 valid alternatives"#,
                ],
            ),
            (
                json!({"one": "x"}),
                vec![
                    r#"one: Invalid value: "x": one in body must validate one and only one schema (oneOf). Found none valid"#,
                    r#"one: Invalid value: "x": one in body should match '^a'"#,
                ],
            ),
            (
                json!({"all": "y"}),
                vec![
                    r#"all: Invalid value: "y": all in body must validate all the schemas (allOf)"#,
                    r#"all: Invalid value: "y": all in body should be at least 2 chars long"#,
                    r#"all: Invalid value: "y": all in body should match '^x'"#,
                ],
            ),
            (
                json!({"not": "forbidden"}),
                vec![
                    r#"not: Invalid value: "forbidden": not in body shouldn't validate the schema (not)"#,
                ],
            ),
        ];
        for (object, expected) in table {
            assert_eq!(messages(&validate(&object, &schema)), expected, "{object}");
        }
    }

    #[test]
    fn unsupported_pattern_is_reported_once() {
        let schema = json!({
            "type": "object",
            "properties": {
                "names": {"type": "array", "items": {"type": "string", "pattern": "^(?=web)$"}},
                "other": {"type": "string", "pattern": "^(?=web)$"}
            }
        });
        let object = json!({"names": ["a", "b", "c"], "other": "d"});
        let errors = validate(&object, &schema);
        assert_eq!(errors.len(), 1, "{:?}", messages(&errors));
        assert_eq!(errors[0].path, "names[0]");
        assert_eq!(errors[0].reason(), "InternalError");
        assert!(
            errors[0].to_string().contains("not supported"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn check_schema_reports_bad_patterns_and_types() {
        let mut schema = drpair_schema();
        schema["properties"]["spec"]["properties"]["rpo"]["pattern"] = json!("(?=x)");
        schema["properties"]["spec"]["properties"]["paused"]["type"] = json!("bool");
        let errors = check_schema(&schema, "spec.versions[0].schema.openAPIV3Schema");
        let got = messages(&errors);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.contains(&r#"spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[paused].type: Unsupported value: "bool": supported values: "object", "array", "string", "integer", "number", "boolean""#.to_string()), "{got:?}");
        assert!(got.iter().any(|m| m.starts_with(r#"spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[rpo].pattern: Invalid value: "(?=x)": must be a valid regular expression, but isn't: error parsing regexp at offset 0 in '(?=x)': look-around"#)), "{got:?}");
        assert!(check_schema(&drpair_schema(), "").is_empty());
    }

    #[test]
    fn prune_drops_undeclared_fields() {
        let mut object = drpair();
        object["extra"] = json!("dropped");
        object["metadata"]["annotations"] = json!({"kept": "yes"});
        object["spec"]["bogus"] = json!({"deep": 1});
        object["spec"]["transform"]["replicas"]["extra"] = json!(1);
        object["spec"]["transform"]["patches"][0]["extra"] = json!(1);
        object["spec"]["selector"]["matchLabels"]["tier"] = json!("db");
        object["status"]["phase"] = json!("Ready");
        let before_status = object["status"].clone();
        prune(&mut object, &drpair_schema());
        let mut expected = drpair();
        expected["metadata"]["annotations"] = json!({"kept": "yes"});
        expected["spec"]["selector"]["matchLabels"]["tier"] = json!("db");
        assert_eq!(object, expected);
        assert_eq!(object["status"], before_status);
    }

    #[test]
    fn prune_under_preserve_unknown_prunes_declared_children() {
        let schema = json!({
            "type": "object",
            "properties": {
                "status": {
                    "type": "object",
                    "x-kubernetes-preserve-unknown-fields": true,
                    "properties": {"site": {"type": "object", "properties": {"name": {"type": "string"}}}}
                },
                "strict": {"type": "object"},
                "embedded": {"type": "object", "x-kubernetes-embedded-resource": true, "properties": {"spec": {"type": "object"}}},
                "open": {"type": "object", "additionalProperties": true}
            }
        });
        let mut object = json!({
            "status": {"free": {"x": 1}, "site": {"name": "a", "junk": 1}},
            "strict": {"a": 1},
            "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "any": 1}, "spec": {}, "junk": 1},
            "open": {"a": {"b": 1}}
        });
        prune(&mut object, &schema);
        assert_eq!(
            object,
            json!({
                "status": {"free": {"x": 1}, "site": {"name": "a"}},
                "strict": {},
                "embedded": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "any": 1}, "spec": {}},
                "open": {"a": {"b": 1}}
            })
        );
    }

    #[test]
    fn defaults_fill_absent_and_non_nullable_null_fields() {
        let mut object = drpair();
        remove(&mut object, "/spec/rpo");
        remove(&mut object, "/spec/transform/replicas/policy");
        object["spec"]["failoverAfter"] = Value::Null;
        apply_defaults(&mut object, &drpair_schema());
        assert_eq!(object["spec"]["rpo"], json!("5m"));
        assert_eq!(object["spec"]["paused"], json!(false));
        assert_eq!(
            object["spec"]["transform"]["replicas"]["policy"],
            json!("Restore")
        );
        assert_eq!(object["spec"]["failoverAfter"], Value::Null);
        assert!(validate(&object, &drpair_schema()).is_empty());

        let schema = json!({
            "type": "object",
            "properties": {
                "metadata": {"type": "object", "properties": {"name": {"type": "string", "default": "never"}}},
                "spec": {
                    "type": "object",
                    "properties": {
                        "foo": {"type": "string", "default": "default"},
                        "bar": {"type": "string", "nullable": true, "default": "unused"},
                        "baz": {"type": "string"},
                        "nested": {
                            "type": "object",
                            "default": {},
                            "properties": {"inner": {"type": "integer", "default": 3}}
                        },
                        "absentParent": {
                            "type": "object",
                            "properties": {"inner": {"type": "integer", "default": 3}}
                        },
                        "items": {
                            "type": "array",
                            "items": {"type": "object", "properties": {"w": {"type": "integer", "default": 1}}}
                        },
                        "map": {
                            "type": "object",
                            "additionalProperties": {"type": "object", "properties": {"w": {"type": "integer", "default": 2}}}
                        }
                    }
                }
            }
        });
        let mut object = json!({
            "metadata": {},
            "spec": {"foo": null, "bar": null, "baz": null, "items": [{}, {"w": 5}], "map": {"k": {}}}
        });
        apply_defaults(&mut object, &schema);
        assert_eq!(
            object,
            json!({
                "metadata": {},
                "spec": {
                    "foo": "default",
                    "bar": null,
                    "nested": {"inner": 3},
                    "items": [{"w": 1}, {"w": 5}],
                    "map": {"k": {"w": 2}}
                }
            })
        );
    }

    #[test]
    fn date_time_format() {
        let table = [
            ("2024-02-29T12:00:00Z", true),
            ("2023-02-29T12:00:00Z", false),
            ("2024-01-01T00:00:00.123456789+02:00", true),
            ("2024-01-01t00:00:00z", true),
            ("2024-01-01T24:00:00Z", false),
            ("2024-01-01T00:00:00", false),
            ("2024-01-01 00:00:00Z", false),
            ("2024-13-01T00:00:00Z", false),
            ("2024-01-01T00:00:00.Z", false),
            ("2024-01-01T00:00:00+0200", false),
            ("", false),
        ];
        for (input, valid) in table {
            assert_eq!(is_date_time(input), valid, "{input}");
        }
    }
}
