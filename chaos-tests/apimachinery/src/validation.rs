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
//! # `pattern` subset
//!
//! Patterns are matched with a built-in engine (no regex dependency) that
//! follows Go RE2 semantics, which is what the apiserver uses: a pattern
//! matches if it matches *anywhere* in the string unless anchored, and
//! matching is linear-time (Pike VM, no backtracking). Supported:
//!
//! - literals, `.` (any character but `\n`), anchors `^` `$` (start/end of text), `\A` `\z`;
//! - character classes `[a-z0-9-]`, negated `[^...]`, escapes inside classes and
//!   POSIX classes such as `[[:alpha:]]`;
//! - escapes `\d \D \w \W \s \S` (ASCII, as in RE2), `\b \B`, `\n \t \r \f \v \a`,
//!   `\xHH`, `\x{HHHH}` and any escaped ASCII punctuation (`\. \- \/ \\` ...);
//! - groups `( )`, `(?: )`, `(?P<name> )`, `(?<name> )` and alternation `|`;
//! - quantifiers `*` `+` `?` `{m}` `{m,}` `{m,n}` (counts up to 1000), optionally
//!   followed by `?` (laziness does not change whether a string matches).
//!
//! Anything else — lookaround, backreferences, `\p{..}` classes, inline flags
//! such as `(?i)`, malformed syntax — is a [`PatternError`]. During
//! [`validate`] such a pattern is reported once, as an internal field error at
//! the first field it applied to, instead of silently passing;
//! [`check_schema`] reports them up front when a CRD is created.

use std::collections::HashMap;
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

// ---------------------------------------------------------------------------
// Regular expressions (`pattern`).
// ---------------------------------------------------------------------------

/// Largest repeat count accepted in `{m,n}`, as in RE2.
const MAX_REPEAT: u32 = 1000;
/// Largest compiled program, bounding memory for nested repetitions.
const MAX_PROGRAM: usize = 50_000;
/// Deepest group nesting accepted.
const MAX_NESTING: usize = 200;

/// A compiled `pattern` in the subset described in the module docs, matched
/// with RE2 semantics (unanchored search, linear time).
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    program: Vec<Inst>,
    classes: Vec<Class>,
}

/// A pattern that is malformed or uses a construct outside the supported subset.
///
/// Displays as `error parsing regexp at offset <n> in '<pattern>': <message>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("error parsing regexp at offset {offset} in '{pattern}': {message}")]
pub struct PatternError {
    /// The pattern source.
    pub pattern: String,
    /// Character offset of the problem.
    pub offset: usize,
    /// What is wrong, e.g. `lookaround assertions are not supported`.
    pub message: String,
}

impl Pattern {
    /// Compiles `source`; errors with [`PatternError`] for malformed patterns and
    /// unsupported constructs.
    pub fn new(source: &str) -> Result<Self, PatternError> {
        let mut parser = Parser {
            source,
            chars: source.chars().collect(),
            pos: 0,
        };
        let node = parser.alternation(0)?;
        if parser.pos < parser.chars.len() {
            return Err(parser.error("unexpected )"));
        }
        let mut compiler = Compiler::default();
        compiler
            .compile(&node)
            .and_then(|()| compiler.emit(Inst::Match))
            .map_err(|message| PatternError {
                pattern: source.to_string(),
                offset: 0,
                message: message.to_string(),
            })?;
        Ok(Pattern {
            source: source.to_string(),
            program: compiler.program,
            classes: compiler.classes,
        })
    }

    /// The pattern source.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// True if the pattern matches anywhere in `text` (anchors restrict where).
    pub fn is_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let mut current = Threads::new(self.program.len());
        let mut next = Threads::new(self.program.len());
        let mut stack = Vec::new();
        for pos in 0..=chars.len() {
            // Unanchored search: a new thread starts at every position.
            if self.add(&mut current, &mut stack, 0, pos, &chars) {
                return true;
            }
            let Some(&c) = chars.get(pos) else {
                break;
            };
            next.clear();
            for i in 0..current.pcs.len() {
                let pc = current.pcs[i];
                let advances = match self.program[pc] {
                    Inst::Char(expected) => c == expected,
                    Inst::Any => c != '\n',
                    Inst::Class(class) => self.classes[class].matches(c),
                    _ => false,
                };
                if advances && self.add(&mut next, &mut stack, pc + 1, pos + 1, &chars) {
                    return true;
                }
            }
            std::mem::swap(&mut current, &mut next);
        }
        false
    }

    /// Adds the thread at `pc` and everything reachable from it without
    /// consuming input; true if that reaches `Match`.
    fn add(
        &self,
        threads: &mut Threads,
        stack: &mut Vec<usize>,
        pc: usize,
        pos: usize,
        chars: &[char],
    ) -> bool {
        stack.clear();
        stack.push(pc);
        while let Some(pc) = stack.pop() {
            if !threads.insert(pc) {
                continue;
            }
            match self.program[pc] {
                Inst::Match => return true,
                Inst::Jmp(target) => stack.push(target),
                Inst::Split(first, second) => {
                    stack.push(second);
                    stack.push(first);
                }
                Inst::Assert(assertion) => {
                    if assertion.holds(chars, pos) {
                        stack.push(pc + 1);
                    }
                }
                Inst::Char(_) | Inst::Any | Inst::Class(_) => {}
            }
        }
        false
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.source)
    }
}

/// A sparse set of program counters for one input position.
struct Threads {
    pcs: Vec<usize>,
    marks: Vec<u64>,
    generation: u64,
}

impl Threads {
    fn new(size: usize) -> Self {
        Threads {
            pcs: Vec::with_capacity(size),
            marks: vec![0; size],
            generation: 1,
        }
    }

    fn clear(&mut self) {
        self.pcs.clear();
        self.generation += 1;
    }

    fn insert(&mut self, pc: usize) -> bool {
        if self.marks[pc] == self.generation {
            return false;
        }
        self.marks[pc] = self.generation;
        self.pcs.push(pc);
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Assertion {
    StartText,
    EndText,
    WordBoundary,
    NotWordBoundary,
}

impl Assertion {
    fn holds(self, chars: &[char], pos: usize) -> bool {
        let word_at = |i: Option<usize>| i.and_then(|i| chars.get(i)).is_some_and(|c| is_word(*c));
        let boundary = || word_at(pos.checked_sub(1)) != word_at(Some(pos));
        match self {
            Assertion::StartText => pos == 0,
            Assertion::EndText => pos == chars.len(),
            Assertion::WordBoundary => boundary(),
            Assertion::NotWordBoundary => !boundary(),
        }
    }
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// A character class as sorted, merged inclusive code point ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Class {
    ranges: Vec<(u32, u32)>,
    negated: bool,
}

impl Class {
    fn matches(&self, c: char) -> bool {
        let c = u32::from(c);
        let hit = self
            .ranges
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok();
        hit != self.negated
    }
}

/// Sorts and merges ranges so they can be binary searched.
fn normalize(mut ranges: Vec<(u32, u32)>) -> Vec<(u32, u32)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match merged.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    merged
}

/// The code points not in `ranges`.
fn complement(ranges: &[(u32, u32)]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    let mut next = 0u32;
    for &(lo, hi) in &normalize(ranges.to_vec()) {
        if lo > next {
            out.push((next, lo - 1));
        }
        next = hi.saturating_add(1);
    }
    if next <= 0x10FFFF {
        out.push((next, 0x10FFFF));
    }
    out
}

fn perl_class(name: char) -> Option<Vec<(u32, u32)>> {
    let ranges = match name.to_ascii_lowercase() {
        'd' => vec![(0x30, 0x39)],
        'w' => vec![(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
        's' => vec![(0x09, 0x0A), (0x0C, 0x0D), (0x20, 0x20)],
        _ => return None,
    };
    Some(if name.is_ascii_uppercase() {
        complement(&ranges)
    } else {
        ranges
    })
}

fn posix_class(name: &str) -> Option<Vec<(u32, u32)>> {
    let ranges = match name {
        "alnum" => vec![(0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)],
        "alpha" => vec![(0x41, 0x5A), (0x61, 0x7A)],
        "ascii" => vec![(0x00, 0x7F)],
        "blank" => vec![(0x09, 0x09), (0x20, 0x20)],
        "cntrl" => vec![(0x00, 0x1F), (0x7F, 0x7F)],
        "digit" => vec![(0x30, 0x39)],
        "graph" => vec![(0x21, 0x7E)],
        "lower" => vec![(0x61, 0x7A)],
        "print" => vec![(0x20, 0x7E)],
        "punct" => vec![(0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)],
        "space" => vec![(0x09, 0x0D), (0x20, 0x20)],
        "upper" => vec![(0x41, 0x5A)],
        "word" => vec![(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
        "xdigit" => vec![(0x30, 0x39), (0x41, 0x46), (0x61, 0x66)],
        _ => return None,
    };
    Some(ranges)
}

/// Parsed pattern.
#[derive(Debug, Clone)]
enum Node {
    Literal(char),
    Any,
    Class(Class),
    Assert(Assertion),
    Concat(Vec<Node>),
    Alternate(Vec<Node>),
    Repeat {
        node: Box<Node>,
        min: u32,
        max: Option<u32>,
    },
}

/// What an escape sequence denotes.
enum Escape {
    Char(char),
    Ranges(Vec<(u32, u32)>),
    Assert(Assertion),
}

struct Parser<'a> {
    source: &'a str,
    chars: Vec<char>,
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl Into<String>) -> PatternError {
        PatternError {
            pattern: self.source.to_string(),
            offset: self.pos,
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).copied()
    }

    fn alternation(&mut self, depth: usize) -> Result<Node, PatternError> {
        let mut alternatives = vec![self.concatenation(depth)?];
        while self.peek() == Some('|') {
            self.pos += 1;
            alternatives.push(self.concatenation(depth)?);
        }
        Ok(if alternatives.len() == 1 {
            alternatives.remove(0)
        } else {
            Node::Alternate(alternatives)
        })
    }

    fn concatenation(&mut self, depth: usize) -> Result<Node, PatternError> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom(depth)?;
            items.push(self.quantifiers(atom)?);
        }
        Ok(Node::Concat(items))
    }

    fn atom(&mut self, depth: usize) -> Result<Node, PatternError> {
        let Some(c) = self.peek() else {
            return Err(self.error("unexpected end of pattern"));
        };
        match c {
            '(' => {
                if depth >= MAX_NESTING {
                    return Err(self.error("expression nests too deeply"));
                }
                self.pos += 1;
                if self.peek() == Some('?') {
                    self.group_prefix()?;
                }
                let inner = self.alternation(depth + 1)?;
                if self.peek() != Some(')') {
                    return Err(self.error("missing closing )"));
                }
                self.pos += 1;
                Ok(inner)
            }
            '[' => self.class(),
            '.' => {
                self.pos += 1;
                Ok(Node::Any)
            }
            '^' => {
                self.pos += 1;
                Ok(Node::Assert(Assertion::StartText))
            }
            '$' => {
                self.pos += 1;
                Ok(Node::Assert(Assertion::EndText))
            }
            '\\' => Ok(match self.escape(false)? {
                Escape::Char(c) => Node::Literal(c),
                Escape::Ranges(ranges) => Node::Class(Class {
                    ranges: normalize(ranges),
                    negated: false,
                }),
                Escape::Assert(assertion) => Node::Assert(assertion),
            }),
            '*' | '+' | '?' => Err(self.error("missing argument to repetition operator")),
            '{' if self.repetition().is_some() => {
                Err(self.error("missing argument to repetition operator"))
            }
            c => {
                self.pos += 1;
                Ok(Node::Literal(c))
            }
        }
    }

    /// Handles `(?` after the `(`: non-capturing and named groups only.
    fn group_prefix(&mut self) -> Result<(), PatternError> {
        match (self.peek_at(1), self.peek_at(2)) {
            (Some(':'), _) => {
                self.pos += 2;
                Ok(())
            }
            (Some('=' | '!'), _) | (Some('<'), Some('=' | '!')) => {
                Err(self.error("lookaround assertions are not supported"))
            }
            (Some('P'), Some('<')) | (Some('<'), _) => {
                self.pos += if self.peek_at(1) == Some('P') { 3 } else { 2 };
                let start = self.pos;
                while self
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                {
                    self.pos += 1;
                }
                if self.pos == start || self.peek() != Some('>') {
                    return Err(self.error("invalid named capture"));
                }
                self.pos += 1;
                Ok(())
            }
            _ => Err(self.error("inline flags and other (?...) groups are not supported")),
        }
    }

    /// Parses `{m}`, `{m,}` or `{m,n}` at the current position without
    /// consuming it: `(min, max, length)`, or `None` when `{` is a literal.
    fn repetition(&self) -> Option<(u32, Option<u32>, usize)> {
        let mut i = self.pos + 1;
        let digits = |i: &mut usize| -> Option<u32> {
            let start = *i;
            let mut n: u32 = 0;
            while let Some(d) = self.chars.get(*i).and_then(|c| c.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d);
                *i += 1;
            }
            (*i > start).then_some(n)
        };
        let min = digits(&mut i)?;
        let max = if self.chars.get(i) == Some(&',') {
            i += 1;
            if self.chars.get(i) == Some(&'}') {
                None
            } else {
                Some(digits(&mut i)?)
            }
        } else {
            Some(min)
        };
        (self.chars.get(i) == Some(&'}')).then_some((min, max, i + 1 - self.pos))
    }

    fn quantifiers(&mut self, atom: Node) -> Result<Node, PatternError> {
        let mut node = atom;
        let mut quantified = false;
        loop {
            let (min, max, len) = match self.peek() {
                Some('*') => (0, None, 1),
                Some('+') => (1, None, 1),
                Some('?') => (0, Some(1), 1),
                Some('{') => match self.repetition() {
                    Some(repetition) => repetition,
                    None => break,
                },
                _ => break,
            };
            if quantified {
                return Err(self.error("invalid nested repetition operator"));
            }
            if min > MAX_REPEAT || max.is_some_and(|max| max > MAX_REPEAT || max < min) {
                return Err(self.error("invalid repeat count"));
            }
            self.pos += len;
            if self.peek() == Some('?') {
                // Lazy quantifier: same set of matching strings.
                self.pos += 1;
            }
            node = Node::Repeat {
                node: Box::new(node),
                min,
                max,
            };
            quantified = true;
        }
        Ok(node)
    }

    fn class(&mut self) -> Result<Node, PatternError> {
        self.pos += 1;
        let negated = self.peek() == Some('^');
        if negated {
            self.pos += 1;
        }
        let mut ranges = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return Err(self.error("missing closing ]"));
            };
            if c == ']' && !first {
                self.pos += 1;
                break;
            }
            first = false;
            if c == '[' && self.peek_at(1) == Some(':') {
                ranges.extend(self.posix()?);
                continue;
            }
            let lo = match self.class_atom()? {
                Escape::Char(c) => c,
                Escape::Ranges(set) => {
                    ranges.extend(set);
                    continue;
                }
                Escape::Assert(_) => return Err(self.error("invalid escape in class")),
            };
            if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                self.pos += 1;
                let Escape::Char(hi) = self.class_atom()? else {
                    return Err(self.error("invalid character class range"));
                };
                if hi < lo {
                    return Err(self.error("invalid character class range"));
                }
                ranges.push((u32::from(lo), u32::from(hi)));
            } else {
                ranges.push((u32::from(lo), u32::from(lo)));
            }
        }
        Ok(Node::Class(Class {
            ranges: normalize(ranges),
            negated,
        }))
    }

    fn class_atom(&mut self) -> Result<Escape, PatternError> {
        match self.peek() {
            Some('\\') => self.escape(true),
            Some(c) => {
                self.pos += 1;
                Ok(Escape::Char(c))
            }
            None => Err(self.error("missing closing ]")),
        }
    }

    /// Parses `[:name:]` inside a class.
    fn posix(&mut self) -> Result<Vec<(u32, u32)>, PatternError> {
        let start = self.pos + 2;
        let mut end = start;
        while self.chars.get(end).is_some_and(|c| c.is_ascii_lowercase()) {
            end += 1;
        }
        if self.chars.get(end) != Some(&':') || self.chars.get(end + 1) != Some(&']') {
            return Err(self.error("invalid character class"));
        }
        let name: String = self.chars[start..end].iter().collect();
        let ranges =
            posix_class(&name).ok_or_else(|| self.error(format!("unknown class [:{name}:]")))?;
        self.pos = end + 2;
        Ok(ranges)
    }

    fn escape(&mut self, in_class: bool) -> Result<Escape, PatternError> {
        self.pos += 1;
        let Some(c) = self.peek() else {
            return Err(self.error("trailing backslash at end of expression"));
        };
        self.pos += 1;
        Ok(match c {
            'd' | 'D' | 'w' | 'W' | 's' | 'S' => Escape::Ranges(perl_class(c).unwrap_or_default()),
            'n' => Escape::Char('\n'),
            't' => Escape::Char('\t'),
            'r' => Escape::Char('\r'),
            'f' => Escape::Char('\u{c}'),
            'v' => Escape::Char('\u{b}'),
            'a' => Escape::Char('\u{7}'),
            'x' => Escape::Char(self.hex()?),
            'b' if !in_class => Escape::Assert(Assertion::WordBoundary),
            'B' if !in_class => Escape::Assert(Assertion::NotWordBoundary),
            'A' if !in_class => Escape::Assert(Assertion::StartText),
            'z' if !in_class => Escape::Assert(Assertion::EndText),
            '0'..='9' => {
                return Err(self.error("backreferences and octal escapes are not supported"))
            }
            'p' | 'P' => return Err(self.error("Unicode classes \\p{..} are not supported")),
            c if c.is_ascii_punctuation() => Escape::Char(c),
            c => return Err(self.error(format!("invalid escape sequence \\{c}"))),
        })
    }

    /// Parses the digits of `\xHH` or `\x{H..}` (after the `x`).
    fn hex(&mut self) -> Result<char, PatternError> {
        let braced = self.peek() == Some('{');
        if braced {
            self.pos += 1;
        }
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_hexdigit()) && (braced || self.pos < start + 2)
        {
            self.pos += 1;
        }
        let digits: String = self.chars[start..self.pos].iter().collect();
        let valid_length = if braced {
            !digits.is_empty() && digits.len() <= 6 && self.peek() == Some('}')
        } else {
            digits.len() == 2
        };
        if !valid_length {
            return Err(self.error("invalid escape sequence \\x"));
        }
        if braced {
            self.pos += 1;
        }
        u32::from_str_radix(&digits, 16)
            .ok()
            .and_then(char::from_u32)
            .ok_or_else(|| self.error("invalid escape sequence \\x"))
    }
}

/// One Pike VM instruction.
#[derive(Debug, Clone, Copy)]
enum Inst {
    Char(char),
    Any,
    Class(usize),
    Assert(Assertion),
    Split(usize, usize),
    Jmp(usize),
    Match,
}

#[derive(Default)]
struct Compiler {
    program: Vec<Inst>,
    classes: Vec<Class>,
}

impl Compiler {
    fn emit(&mut self, inst: Inst) -> Result<usize, &'static str> {
        if self.program.len() >= MAX_PROGRAM {
            return Err("expression too large");
        }
        self.program.push(inst);
        Ok(self.program.len() - 1)
    }

    fn compile(&mut self, node: &Node) -> Result<(), &'static str> {
        match node {
            Node::Literal(c) => {
                self.emit(Inst::Char(*c))?;
            }
            Node::Any => {
                self.emit(Inst::Any)?;
            }
            Node::Class(class) => {
                let index = match self.classes.iter().position(|known| known == class) {
                    Some(index) => index,
                    None => {
                        self.classes.push(class.clone());
                        self.classes.len() - 1
                    }
                };
                self.emit(Inst::Class(index))?;
            }
            Node::Assert(assertion) => {
                self.emit(Inst::Assert(*assertion))?;
            }
            Node::Concat(items) => {
                for item in items {
                    self.compile(item)?;
                }
            }
            Node::Alternate(alternatives) => {
                let mut jumps = Vec::new();
                let (last, init) = alternatives.split_last().ok_or("empty alternation")?;
                for alternative in init {
                    let split = self.emit(Inst::Split(0, 0))?;
                    self.compile(alternative)?;
                    jumps.push(self.emit(Inst::Jmp(0))?);
                    self.program[split] = Inst::Split(split + 1, self.program.len());
                }
                self.compile(last)?;
                let end = self.program.len();
                for jump in jumps {
                    self.program[jump] = Inst::Jmp(end);
                }
            }
            Node::Repeat { node, min, max } => {
                for _ in 0..*min {
                    self.compile(node)?;
                }
                match max {
                    None => {
                        let split = self.emit(Inst::Split(0, 0))?;
                        self.compile(node)?;
                        self.emit(Inst::Jmp(split))?;
                        self.program[split] = Inst::Split(split + 1, self.program.len());
                    }
                    Some(max) => {
                        let mut splits = Vec::new();
                        for _ in *min..*max {
                            splits.push(self.emit(Inst::Split(0, 0))?);
                            self.compile(node)?;
                        }
                        let end = self.program.len();
                        for split in splits {
                            self.program[split] = Inst::Split(split + 1, end);
                        }
                    }
                }
            }
        }
        Ok(())
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
                "names": {"type": "array", "items": {"type": "string", "pattern": "^(?i)web$"}},
                "other": {"type": "string", "pattern": "^(?i)web$"}
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
        assert!(got.iter().any(|m| m.starts_with(r#"spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[rpo].pattern: Invalid value: "(?=x)": must be a valid regular expression, but isn't: error parsing regexp at offset 1 in '(?=x)': lookaround"#)), "{got:?}");
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
        let table = [
            ("(?=a)", "lookaround"),
            ("(?!a)", "lookaround"),
            ("(?<=a)b", "lookaround"),
            ("(?i)abc", "inline flags"),
            ("(a)\\1", "backreferences"),
            ("\\p{L}", "Unicode classes"),
            ("\\q", "invalid escape"),
            ("(abc", "missing closing )"),
            ("abc)", "unexpected )"),
            ("[abc", "missing closing ]"),
            ("[z-a]", "invalid character class range"),
            ("[[:nope:]]", "unknown class"),
            ("*a", "missing argument"),
            ("a**", "nested repetition"),
            ("a{2,1}", "invalid repeat count"),
            ("a{1001}", "invalid repeat count"),
            ("((a{1000}){1000}){1000}", "too large"),
            ("abc\\", "trailing backslash"),
            ("\\xZZ", "invalid escape"),
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
