//! The four patch types the apiserver accepts: JSON merge, JSON, strategic merge and server-side apply.
//!
//! Everything here works on `serde_json::Value` objects and is pure: callers
//! read the stored object, call one of these functions and store the result.
//!
//! | `Content-Type`                            | [`PatchType`]                  | function                    |
//! |-------------------------------------------|--------------------------------|-----------------------------|
//! | `application/merge-patch+json`            | [`PatchType::Merge`]           | [`merge_patch`] (RFC 7386)  |
//! | `application/json-patch+json`             | [`PatchType::Json`]            | [`json_patch()`] (RFC 6902) |
//! | `application/strategic-merge-patch+json`  | [`PatchType::StrategicMerge`]  | [`strategic_merge_patch`]   |
//! | `application/apply-patch+yaml`            | [`PatchType::Apply`]           | [`server_side_apply`]       |
//!
//! The apply body is YAML on the wire; JSON is YAML, and every client the lab
//! serves (kubectl, kube-rs, client-go) sends JSON, so callers parse the body
//! as JSON and pass the value here.
//!
//! # List merge table
//!
//! The real apiserver takes list semantics from each type's Go struct tags
//! (`patchStrategy`, `patchMergeKey`, `listType`, `listMapKeys`). This module
//! approximates them with one table keyed by the list's field name, used by
//! both strategic merge patch and server-side apply:
//!
//! | field                                                                  | list kind             |
//! |------------------------------------------------------------------------|-----------------------|
//! | `containers`, `initContainers`, `ephemeralContainers`, `volumes`, `env`, `imagePullSecrets` | keyed by `name` |
//! | `volumeMounts`                                                         | keyed by `mountPath`  |
//! | `ports`                                                                | keyed by `containerPort` when an element has it, else by `port` (Service ports) |
//! | `conditions`                                                           | keyed by `type`       |
//! | `ownerReferences`                                                      | keyed by `uid`        |
//! | `metadata.finalizers`                                                  | set of strings        |
//! | anything else                                                          | atomic (replaced whole) |
//!
//! A keyed list whose elements are not all objects carrying the key, or a set
//! whose elements are not all strings, is treated as atomic by server-side
//! apply (custom resources reuse these field names freely); strategic merge
//! patch instead refuses a patch element that lacks the merge key, as the
//! apiserver does.
//!
//! # Strategic merge patch
//!
//! Follows `k8s.io/apimachinery/pkg/util/strategicpatch` and
//! <https://github.com/kubernetes/community/blob/master/contributors/devel/sig-api-machinery/strategic-merge-patch.md>:
//! maps merge recursively, `null` deletes a key, keyed lists merge element by
//! element (new elements are appended), sets take the union, other lists are
//! replaced. Directives: `$patch: replace` on a map (the map is replaced) or as
//! a list element (the rest of the patch list replaces the list); `$patch:
//! delete` on a keyed-list element (the element with that key is removed) or
//! on a map (the map becomes `{}`, as in the Go code); `$patch: merge` (the
//! default); `$deleteFromPrimitiveList/<field>` (remove those values from a
//! primitive list); `$retainKeys` (keys of the original map not listed are
//! cleared before merging). Merged lists are ordered as the API server orders
//! them (`api_server_order`). `$setElementOrder/<field>` is accepted and
//! stripped without further reordering. The apiserver refuses strategic merge patches
//! for custom resources (HTTP 415); that choice is left to the caller.
//!
//! # Server-side apply
//!
//! Follows <https://kubernetes.io/docs/reference/using-api/server-side-apply/>,
//! approximating `sigs.k8s.io/structured-merge-diff` (SMD):
//!
//! - The applied configuration's field set is computed in the `FieldsV1`
//!   format (`f:<name>`, `k:{<key fields>}` for keyed-list elements, `v:<json>`
//!   for set elements, `.` when a node with children is itself owned). Scalars,
//!   atomic lists, `null`, empty maps and empty lists are leaves. The set never
//!   lists `apiVersion`, `kind`, `metadata.name`, `metadata.namespace` or the
//!   server-owned metadata (`uid`, `resourceVersion`, `generation`,
//!   `creationTimestamp`, `managedFields`, `selfLink`, `deletionTimestamp`,
//!   `deletionGracePeriodSeconds`); those server-owned fields are also never
//!   copied from the applied configuration into the object.
//! - [`FieldScope`] says whether the resource has a status subresource: on the
//!   main resource `status` is ignored; on `/status` only `status` is taken
//!   and the entry carries `subresource: status`.
//! - Conflicts: a leaf of the applied set whose existing value differs from
//!   the applied value and that another manager (any operation, any
//!   subresource, a different manager name) owns. Without `force` the apply
//!   fails with [`ApplyError::Conflict`] in the apiserver's wording; with it
//!   the field leaves the other managers' sets (entries left empty are
//!   dropped). Same-value fields are shared, not conflicts.
//! - The applied configuration is merged into the existing object with the
//!   list table above (maps recursively, keyed lists by key, sets by union,
//!   everything else replaced).
//! - Fields in this manager's previous `Apply` entry that are absent from the
//!   new applied set are removed from the object, unless another manager owns
//!   that field or something below it, or the new applied set has something
//!   below it.
//! - The manager's `Apply` entry is replaced (or appended) with
//!   `{"manager", "operation": "Apply", "apiVersion", "time", "fieldsType":
//!   "FieldsV1", "fieldsV1"}`.
//! - An existing object with no `managedFields` at all is treated as owned by
//!   a `before-first-apply` `Update` manager, as the apiserver does, so the
//!   first apply conflicts with values it would silently overwrite.
//!
//! Not done, compared with SMD: no schema (so no per-type defaults, no
//! `listType=set` of non-strings, no `granularity=atomic` maps, no multi-field
//! list keys such as container ports' `containerPort`+`protocol`); no
//! version conversion of managed fields between API versions; conflicts are
//! decided on leaves only, and a manager never conflicts with its own
//! `Update` entries; duplicate keys in a keyed list are not rejected; a
//! field removed from the applied configuration leaves empty parent maps
//! behind; `resourceVersion` preconditions and name/namespace checks are the
//! caller's. `Update` operations are tracked by [`record_update`] only if the
//! caller calls it for each non-apply write; it grants the updater every
//! field whose value it changed or added (taking it from other managers) and
//! drops removed fields from every entry, which is what the apiserver does,
//! but compares leaf values without a schema.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

/// The `Content-Type` of a PATCH request, naming how its body is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PatchType {
    /// `application/merge-patch+json`: JSON merge patch, RFC 7386.
    Merge,
    /// `application/json-patch+json`: JSON patch, RFC 6902.
    Json,
    /// `application/strategic-merge-patch+json`: Kubernetes strategic merge patch.
    StrategicMerge,
    /// `application/apply-patch+yaml`: server-side apply.
    Apply,
}

impl PatchType {
    /// Parses a `Content-Type` header value, ignoring parameters (`; charset=utf-8`),
    /// surrounding whitespace and ASCII case.
    ///
    /// # Errors
    ///
    /// [`PatchError::UnsupportedMediaType`] for any other media type, including
    /// `application/apply-patch+cbor`, which the lab does not decode.
    pub fn from_content_type(content_type: &str) -> Result<Self, PatchError> {
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match media_type.as_str() {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::StrategicMerge),
            "application/apply-patch+yaml" => Ok(Self::Apply),
            _ => Err(PatchError::UnsupportedMediaType {
                content_type: content_type.to_owned(),
            }),
        }
    }

    /// The canonical `Content-Type` value for this patch type.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Merge => "application/merge-patch+json",
            Self::Json => "application/json-patch+json",
            Self::StrategicMerge => "application/strategic-merge-patch+json",
            Self::Apply => "application/apply-patch+yaml",
        }
    }
}

impl FromStr for PatchType {
    type Err = PatchError;

    /// Same as [`PatchType::from_content_type`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_content_type(s)
    }
}

impl fmt::Display for PatchType {
    /// Writes the canonical `Content-Type` value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.content_type())
    }
}

/// An error applying a merge, JSON or strategic merge patch.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// The `Content-Type` is not one of the four patch media types (HTTP 415).
    #[error("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {content_type:?})")]
    UnsupportedMediaType {
        /// The header value as received.
        content_type: String,
    },
    /// The stored object to patch is not a JSON object.
    #[error("the object to patch is not a JSON object")]
    TargetNotAnObject,
    /// A merge or strategic merge patch body is not a JSON object.
    #[error("the {patch_type} patch body must be a JSON object")]
    PatchNotAnObject {
        /// Which patch type.
        patch_type: PatchType,
    },
    /// Applying the patch replaced the whole object with a non-object.
    #[error("the patched document is not a JSON object")]
    ResultNotAnObject,
    /// A JSON patch body is not an array of RFC 6902 operations.
    #[error("invalid JSON patch document: {source}")]
    InvalidJsonPatch {
        /// Why it does not deserialize.
        #[source]
        source: serde_json::Error,
    },
    /// One JSON patch operation failed (a `test` mismatch, a missing path, ...);
    /// the object is left unchanged.
    #[error("JSON patch operation {index} ({op} {path:?}) failed: {reason}")]
    JsonPatchOperation {
        /// Index of the failing operation in the patch array.
        index: usize,
        /// The operation's `op` (`add`, `remove`, `replace`, `move`, `copy`, `test`).
        op: &'static str,
        /// The operation's `path` JSON pointer.
        path: String,
        /// What went wrong, as `json_patch` reports it.
        reason: String,
    },
    /// A `$patch` directive other than `replace`, `delete` or `merge`.
    #[error("{path}: unknown patch directive \"$patch\": {directive}")]
    UnknownDirective {
        /// Where in the patch, dotted (`spec.template`).
        path: String,
        /// The directive value as JSON.
        directive: String,
    },
    /// An element of a keyed list in a strategic merge patch lacks the merge key.
    #[error("{path}: map does not contain declared merge key: {key}")]
    MissingMergeKey {
        /// The list, dotted (`spec.template.spec.containers[1]`).
        path: String,
        /// The merge key the table declares for that list.
        key: &'static str,
    },
    /// `$retainKeys` or `$deleteFromPrimitiveList/<field>` is not a list of the
    /// expected kind.
    #[error("{path}: {directive} must be {expected}")]
    InvalidDirectiveValue {
        /// The map holding the directive, dotted.
        path: String,
        /// The directive key.
        directive: String,
        /// What it must be.
        expected: &'static str,
    },
}

/// Applies a JSON merge patch (RFC 7386) with `json_patch::merge`.
///
/// `target` and `patch` must be JSON objects; `null` members of the patch
/// delete, objects merge recursively, everything else replaces.
///
/// # Errors
///
/// [`PatchError::TargetNotAnObject`], [`PatchError::PatchNotAnObject`].
pub fn merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !target.is_object() {
        return Err(PatchError::TargetNotAnObject);
    }
    if !patch.is_object() {
        return Err(PatchError::PatchNotAnObject {
            patch_type: PatchType::Merge,
        });
    }
    let mut document = target.clone();
    json_patch::merge(&mut document, patch);
    Ok(document)
}

/// Applies a JSON patch (RFC 6902) with `json_patch::patch`.
///
/// `patch` is the request body: an array of `{"op", "path", ...}` operations,
/// applied in order and all-or-nothing.
///
/// # Errors
///
/// [`PatchError::TargetNotAnObject`]; [`PatchError::InvalidJsonPatch`] when the
/// body is not an operation array; [`PatchError::JsonPatchOperation`] naming the
/// index, op and path of the first failing operation;
/// [`PatchError::ResultNotAnObject`] when the patch replaced the root with a
/// non-object.
pub fn json_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    if !target.is_object() {
        return Err(PatchError::TargetNotAnObject);
    }
    let operations: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|source| PatchError::InvalidJsonPatch { source })?;
    let mut document = target.clone();
    for (index, operation) in operations.iter().enumerate() {
        // The apiserver (evanphx/json-patch) treats a missing path as null in `test`, and
        // clients rely on it: kube-runtime adds the first finalizer with
        // `test /metadata/finalizers == null`.
        if let json_patch::PatchOperation::Test(test) = operation {
            if test.value.is_null() && document.pointer(test.path.as_str()).is_none() {
                continue;
            }
        }
        json_patch::patch(&mut document, std::slice::from_ref(operation)).map_err(|error| {
            PatchError::JsonPatchOperation {
                index,
                op: operation_name(operation),
                path: error.path.to_string(),
                reason: error.kind.to_string(),
            }
        })?;
    }
    if !document.is_object() {
        return Err(PatchError::ResultNotAnObject);
    }
    Ok(document)
}

fn operation_name(operation: &json_patch::PatchOperation) -> &'static str {
    match operation {
        json_patch::PatchOperation::Add(_) => "add",
        json_patch::PatchOperation::Remove(_) => "remove",
        json_patch::PatchOperation::Replace(_) => "replace",
        json_patch::PatchOperation::Move(_) => "move",
        json_patch::PatchOperation::Copy(_) => "copy",
        json_patch::PatchOperation::Test(_) => "test",
    }
}

/// How a list is merged, from the table in the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ListKind {
    /// Elements are objects identified by this field.
    Keyed(&'static str),
    /// Elements are strings forming a set.
    Set,
    /// The list is replaced as a whole.
    Atomic,
}

/// The table's answer for list `field` inside map field `parent`, before
/// checking the elements. `ports` picks `containerPort` if any element has it.
fn declared_list_kind<'a>(
    parent: &str,
    field: &str,
    elements: impl IntoIterator<Item = &'a Value>,
) -> ListKind {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets" => ListKind::Keyed("name"),
        "volumeMounts" => ListKind::Keyed("mountPath"),
        "conditions" => ListKind::Keyed("type"),
        "ownerReferences" => ListKind::Keyed("uid"),
        "ports" => {
            if elements
                .into_iter()
                .any(|e| e.get("containerPort").is_some())
            {
                ListKind::Keyed("containerPort")
            } else {
                ListKind::Keyed("port")
            }
        }
        "finalizers" if parent == "metadata" => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// The list kind server-side apply uses: the declared kind, downgraded to
/// atomic when an element does not fit it.
fn effective_list_kind(parent: &str, field: &str, lists: &[&[Value]]) -> ListKind {
    let all = || lists.iter().flat_map(|l| l.iter());
    match declared_list_kind(parent, field, all()) {
        ListKind::Keyed(key) if all().all(|e| e.get(key).is_some()) => ListKind::Keyed(key),
        ListKind::Set if all().all(Value::is_string) => ListKind::Set,
        _ => ListKind::Atomic,
    }
}

/// Applies a Kubernetes strategic merge patch; see the [module docs](self)
/// for the list table and the directives honoured.
///
/// # Errors
///
/// [`PatchError::TargetNotAnObject`], [`PatchError::PatchNotAnObject`];
/// [`PatchError::UnknownDirective`] for a `$patch` other than
/// `replace`/`delete`/`merge`; [`PatchError::MissingMergeKey`] for a keyed-list
/// element without its key; [`PatchError::InvalidDirectiveValue`] for a
/// malformed `$retainKeys` or `$deleteFromPrimitiveList/<field>`.
pub fn strategic_merge_patch(target: &Value, patch: &Value) -> Result<Value, PatchError> {
    let Value::Object(original) = target else {
        return Err(PatchError::TargetNotAnObject);
    };
    let Value::Object(patch) = patch else {
        return Err(PatchError::PatchNotAnObject {
            patch_type: PatchType::StrategicMerge,
        });
    };
    smp_map(original.clone(), patch, "", "").map(Value::Object)
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";

/// Appends a field name to a dotted display path.
fn child_path(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// Merges `patch` into `original`, a map found at field `field` (`path` is for errors).
fn smp_map(
    mut original: Map<String, Value>,
    patch: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Map<String, Value>, PatchError> {
    match patch.get(DIRECTIVE) {
        None => {}
        Some(Value::String(d)) if d == "merge" => {}
        Some(Value::String(d)) if d == "replace" => {
            let mut rest = patch.clone();
            rest.remove(DIRECTIVE);
            return smp_map(Map::new(), &rest, field, path);
        }
        Some(Value::String(d)) if d == "delete" => return Ok(Map::new()),
        Some(other) => {
            return Err(PatchError::UnknownDirective {
                path: path.to_owned(),
                directive: other.to_string(),
            })
        }
    }
    if let Some(retain) = patch.get(RETAIN_KEYS) {
        let keys = string_list(retain).ok_or_else(|| PatchError::InvalidDirectiveValue {
            path: path.to_owned(),
            directive: RETAIN_KEYS.to_owned(),
            expected: "a list of strings",
        })?;
        original.retain(|k, _| keys.contains(&k.as_str()));
    }
    for (key, value) in patch {
        if key == DIRECTIVE
            || key == RETAIN_KEYS
            || key.starts_with(DELETE_FROM_PRIMITIVE_LIST)
            || key.starts_with(SET_ELEMENT_ORDER)
        {
            continue;
        }
        let child = child_path(path, key);
        let merged = match value {
            Value::Null => {
                original.remove(key);
                continue;
            }
            Value::Object(patch_map) => {
                let base = match original.remove(key) {
                    Some(Value::Object(map)) => map,
                    _ => Map::new(),
                };
                Value::Object(smp_map(base, patch_map, key, &child)?)
            }
            Value::Array(patch_list) => {
                let base = match original.remove(key) {
                    Some(Value::Array(list)) => list,
                    _ => Vec::new(),
                };
                Value::Array(smp_list(base, patch_list, field, key, &child)?)
            }
            scalar => scalar.clone(),
        };
        original.insert(key.clone(), merged);
    }
    for (key, value) in patch {
        let Some(target) = key.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) else {
            continue;
        };
        let Value::Array(doomed) = value else {
            return Err(PatchError::InvalidDirectiveValue {
                path: path.to_owned(),
                directive: key.clone(),
                expected: "a list",
            });
        };
        if let Some(Value::Array(list)) = original.get_mut(target) {
            list.retain(|item| !doomed.contains(item));
        }
    }
    Ok(original)
}

/// Reads a JSON array of strings.
fn string_list(value: &Value) -> Option<Vec<&str>> {
    value.as_array()?.iter().map(Value::as_str).collect()
}

/// The `$patch` directive of a list element, if it is an object that has one.
fn element_directive(element: &Value) -> Option<&Value> {
    element.as_object().and_then(|m| m.get(DIRECTIVE))
}

/// Merges patch list `patch` into list `original` found at `parent.field`.
fn smp_list(
    mut original: Vec<Value>,
    patch: &[Value],
    parent: &str,
    field: &str,
    path: &str,
) -> Result<Vec<Value>, PatchError> {
    let replace = Value::String("replace".to_owned());
    if patch.iter().any(|e| element_directive(e) == Some(&replace)) {
        let rest: Vec<Value> = patch
            .iter()
            .filter(|e| element_directive(e) != Some(&replace))
            .cloned()
            .collect();
        return smp_list(Vec::new(), &rest, parent, field, path);
    }
    let kind = declared_list_kind(parent, field, original.iter().chain(patch));
    match kind {
        ListKind::Keyed(key) if patch.iter().all(Value::is_object) => {
            let id_of = |e: &Value| e.get(key).cloned().unwrap_or(Value::Null);
            let server_order: Vec<Value> = original.iter().map(id_of).collect();
            let patch_order: Vec<Value> = patch
                .iter()
                .filter(|e| element_directive(e) != Some(&Value::String("delete".into())))
                .map(id_of)
                .collect();
            for (index, element) in patch.iter().enumerate() {
                let element_path = format!("{path}[{index}]");
                let Some(element_map) = element.as_object() else {
                    continue;
                };
                let Some(id) = element_map.get(key) else {
                    return Err(PatchError::MissingMergeKey {
                        path: element_path,
                        key,
                    });
                };
                let position = original.iter().position(|e| e.get(key) == Some(id));
                match element_map.get(DIRECTIVE) {
                    Some(Value::String(d)) if d == "delete" => {
                        original.retain(|e| e.get(key) != Some(id));
                        continue;
                    }
                    None => {}
                    Some(Value::String(d)) if d == "merge" => {}
                    Some(other) => {
                        return Err(PatchError::UnknownDirective {
                            path: element_path,
                            directive: other.to_string(),
                        })
                    }
                }
                match position {
                    Some(i) => {
                        let base = match std::mem::take(&mut original[i]) {
                            Value::Object(map) => map,
                            _ => Map::new(),
                        };
                        original[i] =
                            Value::Object(smp_map(base, element_map, field, &element_path)?);
                    }
                    None => original.push(Value::Object(smp_map(
                        Map::new(),
                        element_map,
                        field,
                        &element_path,
                    )?)),
                }
            }
            Ok(api_server_order(
                original,
                &server_order,
                &patch_order,
                id_of,
            ))
        }
        ListKind::Set if patch.iter().all(|e| !e.is_object() && !e.is_array()) => {
            let server_order = original.clone();
            for element in patch {
                if !original.contains(element) {
                    original.push(element.clone());
                }
            }
            Ok(api_server_order(
                original,
                &server_order,
                patch,
                Value::clone,
            ))
        }
        _ => Ok(patch.to_vec()),
    }
}

/// Orders a merged list as the API server's strategic merge does (`normalizeElementOrder`):
/// the patch's elements in the patch's order and the others in their old order, interleaved so
/// that an element of each kept from the old list keeps its old place relative to the other,
/// and a new element goes before the old-only elements that follow it. Checked against
/// kube-apiserver 1.32: `[1,2,3]` patched with `[2,4]` gives `[1,2,4,3]`; finalizers `[a,b]`
/// patched with `[c,a]` give `[c,a,b]`.
fn api_server_order(
    merged: Vec<Value>,
    server_order: &[Value],
    patch_order: &[Value],
    id_of: impl Fn(&Value) -> Value,
) -> Vec<Value> {
    let mut patched: Vec<Option<Value>> = vec![None; patch_order.len()];
    let mut server_only = Vec::new();
    for element in merged {
        let id = id_of(&element);
        match patch_order.iter().position(|p| *p == id) {
            Some(i) if patched[i].is_none() => patched[i] = Some(element),
            _ => server_only.push(element),
        }
    }
    let patched: Vec<Value> = patched.into_iter().flatten().collect();
    let old_index = |e: &Value| server_order.iter().position(|s| *s == id_of(e));
    let mut out = Vec::with_capacity(patched.len() + server_only.len());
    let (mut left, mut right) = (
        server_only.into_iter().peekable(),
        patched.into_iter().peekable(),
    );
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (Some(l), Some(r)) => {
                matches!((old_index(l), old_index(r)), (Some(a), Some(b)) if a < b)
            }
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        out.extend(if take_left { left.next() } else { right.next() });
    }
    out
}

/// Which part of an object a write covers, following whether the resource
/// has a status subresource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FieldScope {
    /// The resource has no status subresource (ConfigMap, Secret, ...): the
    /// whole object is tracked.
    #[default]
    WholeObject,
    /// The main endpoint of a resource that has a status subresource
    /// (Deployment, most custom resources): `status` is ignored.
    MainResource,
    /// The `/status` subresource: only `status` is taken and tracked, and the
    /// managed-fields entry carries `"subresource": "status"`.
    StatusSubresource,
}

impl FieldScope {
    fn subresource(self) -> Option<&'static str> {
        match self {
            FieldScope::StatusSubresource => Some("status"),
            FieldScope::WholeObject | FieldScope::MainResource => None,
        }
    }
}

/// Options for [`server_side_apply_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyOptions<'a> {
    /// The `fieldManager` query parameter.
    pub manager: &'a str,
    /// The `force` query parameter: take over conflicting fields instead of failing.
    pub force: bool,
    /// The time recorded in the managed-fields entry, RFC 3339 (`2024-05-01T10:00:00Z`).
    pub now_rfc3339: &'a str,
    /// Which part of the object this apply covers.
    pub scope: FieldScope,
}

/// One field owned by another manager whose value the apply would change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyConflict {
    /// The field path in SMD notation: `.spec.replicas`,
    /// `.spec.template.spec.containers[name="web"].image`.
    pub path: String,
    /// The owning manager's name.
    pub manager: String,
    /// The owning entry's operation, `Apply` or `Update`.
    pub operation: String,
    /// The owning entry's `apiVersion`.
    pub api_version: String,
    /// The owning entry's subresource, if any.
    pub subresource: Option<String>,
}

impl ApplyConflict {
    /// How the apiserver names the manager: `"name"`, plus
    /// ` with subresource "status"` and, for `Update` entries, ` using apps/v1`.
    pub fn manager_description(&self) -> String {
        let mut out = quote(&self.manager);
        if let Some(subresource) = &self.subresource {
            out.push_str(&format!(" with subresource {}", quote(subresource)));
        }
        if self.operation == "Update" {
            out.push_str(&format!(" using {}", self.api_version));
        }
        out
    }
}

/// Quotes like Go's `%q` for the strings that occur here.
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// Renders the apiserver's conflict message (`getConflictMessage`).
fn conflict_message(conflicts: &[ApplyConflict]) -> String {
    if let [only] = conflicts {
        return format!(
            "Apply failed with 1 conflict: conflict with {}: {}",
            only.manager_description(),
            only.path
        );
    }
    let mut by_manager: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for conflict in conflicts {
        by_manager
            .entry(conflict.manager_description())
            .or_default()
            .push(&conflict.path);
    }
    let mut lines = Vec::new();
    for (manager, paths) in by_manager {
        lines.push(format!("conflicts with {manager}:"));
        lines.extend(paths.into_iter().map(|p| format!("- {p}")));
    }
    format!(
        "Apply failed with {} conflicts: {}",
        conflicts.len(),
        lines.join("\n")
    )
}

/// What is wrong with one `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManagedFieldsProblem {
    /// The entry is not a JSON object.
    #[error("must be an object")]
    NotAnObject,
    /// `operation` is not `Apply` or `Update`.
    #[error("operation must be \"Apply\" or \"Update\", got {operation}")]
    UnknownOperation {
        /// The operation as JSON.
        operation: String,
    },
    /// `fieldsType` is not `FieldsV1`.
    #[error("fieldsType must be \"FieldsV1\", got {fields_type}")]
    UnsupportedFieldsType {
        /// The fields type as JSON.
        fields_type: String,
    },
    /// `fieldsV1`, or a node inside it, is not a JSON object.
    #[error("fieldsV1 must be a tree of JSON objects")]
    FieldsV1NotAnObject,
    /// A `fieldsV1` key is not `.`, `f:<name>`, `k:<object>`, `v:<json>` or `i:<index>`.
    #[error("invalid fieldsV1 key {key:?}")]
    InvalidFieldsV1Key {
        /// The key as found.
        key: String,
    },
}

/// An error from [`server_side_apply`] or [`record_update`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The applied configuration (or the new object of an update) is not a JSON object.
    #[error("the applied configuration must be a JSON object")]
    AppliedNotAnObject,
    /// The stored object is not a JSON object.
    #[error("the existing object is not a JSON object")]
    ExistingNotAnObject,
    /// The applied configuration has no `apiVersion` string.
    #[error("apiVersion must be set in the applied configuration")]
    MissingApiVersion,
    /// The applied configuration has no `kind` string.
    #[error("kind must be set in the applied configuration")]
    MissingKind,
    /// The applied configuration's `kind` differs from the stored object's.
    #[error("the applied configuration's kind {applied:?} does not match the existing object's kind {existing:?}")]
    KindMismatch {
        /// The stored object's kind.
        existing: String,
        /// The applied configuration's kind.
        applied: String,
    },
    /// The applied configuration sets `metadata.managedFields` (the apiserver
    /// requires it to be absent).
    #[error("metadata.managedFields must be nil")]
    ManagedFieldsInApplyConfiguration,
    /// `metadata.managedFields` of the stored object is present but not a list.
    #[error("metadata.managedFields must be a list")]
    ManagedFieldsNotAList,
    /// One `metadata.managedFields` entry of the stored object is malformed.
    #[error("metadata.managedFields[{index}]: {problem}")]
    InvalidManagedFields {
        /// Index of the entry.
        index: usize,
        /// What is wrong with it.
        problem: ManagedFieldsProblem,
    },
    /// An apply to the status subresource of an object that does not exist
    /// (the apiserver answers 404).
    #[error("cannot apply to the status subresource of an object that does not exist")]
    StatusOfMissingObject,
    /// The apply would change fields other managers own (HTTP 409); the message
    /// is the apiserver's, e.g. `Apply failed with 1 conflict: conflict with
    /// "kubectl-client-side-apply" using apps/v1: .spec.replicas`.
    #[error("{}", conflict_message(.conflicts))]
    Conflict {
        /// Each conflicting field and its owner, in field order.
        conflicts: Vec<ApplyConflict>,
    },
}

/// One step of a field path (`fieldpath.PathElement`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PathElement {
    /// A map or struct field: `f:<name>`.
    Field(String),
    /// A keyed-list element: `k:{...}`; key field name to canonical JSON value.
    Key(BTreeMap<String, String>),
    /// A set element: `v:<canonical JSON>`.
    Value(String),
    /// A list position: `i:<index>` (only read from stored entries).
    Index(usize),
}

impl PathElement {
    /// The `FieldsV1` key for this element.
    fn fields_v1_key(&self) -> String {
        match self {
            PathElement::Field(name) => format!("f:{name}"),
            PathElement::Key(key) => format!("k:{}", key_object_json(key)),
            PathElement::Value(value) => format!("v:{value}"),
            PathElement::Index(index) => format!("i:{index}"),
        }
    }

    /// Parses one `FieldsV1` key (not `.`).
    fn parse_fields_v1_key(key: &str) -> Option<Self> {
        let (prefix, rest) = key.split_at_checked(2)?;
        match prefix {
            "f:" => Some(PathElement::Field(rest.to_owned())),
            "k:" => match serde_json::from_str::<Value>(rest).ok()? {
                Value::Object(map) => Some(PathElement::Key(
                    map.iter()
                        .map(|(k, v)| (k.clone(), canonical_json(v)))
                        .collect(),
                )),
                _ => None,
            },
            "v:" => serde_json::from_str::<Value>(rest)
                .ok()
                .map(|v| PathElement::Value(canonical_json(&v))),
            "i:" => rest.parse().ok().map(PathElement::Index),
            _ => None,
        }
    }

    /// Whether a list element is the one this step names.
    fn selects(&self, element: &Value) -> bool {
        match self {
            PathElement::Key(key) => key
                .iter()
                .all(|(k, v)| element.get(k).map(canonical_json).as_deref() == Some(v)),
            PathElement::Value(value) => canonical_json(element) == *value,
            PathElement::Field(_) | PathElement::Index(_) => false,
        }
    }
}

impl fmt::Display for PathElement {
    /// SMD's notation: `.name`, `[name="web"]`, `[="x"]`, `[0]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathElement::Field(name) => write!(f, ".{name}"),
            PathElement::Key(key) => {
                let parts: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "[{}]", parts.join(","))
            }
            PathElement::Value(value) => write!(f, "[={value}]"),
            PathElement::Index(index) => write!(f, "[{index}]"),
        }
    }
}

/// `{"k":v,...}` with keys sorted and values already canonical.
fn key_object_json(key: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = key
        .iter()
        .map(|(k, v)| format!("{}:{v}", quote(k)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// Compact JSON with object keys sorted, whatever serde_json's map order.
fn canonical_json(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            let parts: Vec<String> = entries
                .into_iter()
                .map(|(k, v)| format!("{}:{}", quote(k), canonical_json(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(canonical_json).collect();
            format!("[{}]", parts.join(","))
        }
        scalar => scalar.to_string(),
    }
}

fn path_string(path: &[PathElement]) -> String {
    path.iter().map(ToString::to_string).collect()
}

/// A set of field paths as a tree (`fieldpath.Set`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FieldSet {
    /// Whether the path leading here is itself in the set.
    member: bool,
    children: BTreeMap<PathElement, FieldSet>,
}

impl FieldSet {
    fn is_empty(&self) -> bool {
        !self.member && self.children.is_empty()
    }

    fn node(&self, path: &[PathElement]) -> Option<&FieldSet> {
        match path.split_first() {
            None => Some(self),
            Some((head, rest)) => self.children.get(head)?.node(rest),
        }
    }

    fn contains(&self, path: &[PathElement]) -> bool {
        self.node(path).is_some_and(|n| n.member)
    }

    /// Whether the path or anything below it is in the set.
    fn covers(&self, path: &[PathElement]) -> bool {
        self.node(path).is_some_and(|n| !n.is_empty())
    }

    fn insert(&mut self, path: &[PathElement]) {
        match path.split_first() {
            None => self.member = true,
            Some((head, rest)) => self.children.entry(head.clone()).or_default().insert(rest),
        }
    }

    /// Takes the path out of the set, pruning nodes left empty.
    fn remove(&mut self, path: &[PathElement]) {
        match path.split_first() {
            None => self.member = false,
            Some((head, rest)) => {
                if let Some(child) = self.children.get_mut(head) {
                    child.remove(rest);
                    if child.is_empty() {
                        self.children.remove(head);
                    }
                }
            }
        }
    }

    /// Drops a whole subtree.
    fn remove_subtree(&mut self, path: &[PathElement]) {
        match path.split_first() {
            None => *self = FieldSet::default(),
            Some((head, [])) => {
                self.children.remove(head);
            }
            Some((head, rest)) => {
                if let Some(child) = self.children.get_mut(head) {
                    child.remove_subtree(rest);
                    if child.is_empty() {
                        self.children.remove(head);
                    }
                }
            }
        }
    }

    /// Every member path, parents before children.
    fn members(&self) -> Vec<Vec<PathElement>> {
        let mut out = Vec::new();
        self.collect_members(&mut Vec::new(), &mut out);
        out
    }

    fn collect_members(&self, prefix: &mut Vec<PathElement>, out: &mut Vec<Vec<PathElement>>) {
        if self.member {
            out.push(prefix.clone());
        }
        for (element, child) in &self.children {
            prefix.push(element.clone());
            child.collect_members(prefix, out);
            prefix.pop();
        }
    }

    /// Member paths with nothing below them: the values a manager sets.
    fn leaves(&self) -> Vec<Vec<PathElement>> {
        self.members()
            .into_iter()
            .filter(|p| self.node(p).is_some_and(|n| n.children.is_empty()))
            .collect()
    }

    fn to_fields_v1(&self) -> Value {
        let mut map = Map::new();
        if self.member && !self.children.is_empty() {
            map.insert(".".to_owned(), Value::Object(Map::new()));
        }
        for (element, child) in &self.children {
            map.insert(element.fields_v1_key(), child.to_fields_v1());
        }
        Value::Object(map)
    }

    fn from_fields_v1(value: &Value) -> Result<FieldSet, ManagedFieldsProblem> {
        let Value::Object(map) = value else {
            return Err(ManagedFieldsProblem::FieldsV1NotAnObject);
        };
        let mut set = FieldSet::default();
        for (key, child) in map {
            if key == "." {
                set.member = true;
                continue;
            }
            let element = PathElement::parse_fields_v1_key(key)
                .ok_or_else(|| ManagedFieldsProblem::InvalidFieldsV1Key { key: key.clone() })?;
            let mut child_set = FieldSet::from_fields_v1(child)?;
            if child_set.children.is_empty() {
                child_set.member = true;
            }
            set.children.insert(element, child_set);
        }
        Ok(set)
    }

    /// Adds every field of `value`, a value found at `parent.field`.
    fn add_value(&mut self, value: &Value, parent: &str, field: &str) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, child) in map {
                    self.children
                        .entry(PathElement::Field(key.clone()))
                        .or_default()
                        .add_value(child, field, key);
                }
            }
            Value::Array(items) if !items.is_empty() => {
                match effective_list_kind(parent, field, &[items.as_slice()]) {
                    ListKind::Keyed(key) => {
                        for item in items {
                            let node = self.children.entry(key_element(item, key)).or_default();
                            node.member = true;
                            node.add_value(item, field, "");
                        }
                    }
                    ListKind::Set => {
                        for item in items {
                            self.children
                                .entry(PathElement::Value(canonical_json(item)))
                                .or_default()
                                .member = true;
                        }
                    }
                    ListKind::Atomic => self.member = true,
                }
            }
            _ => self.member = true,
        }
    }

    /// The field set of a whole object, without the fields SSA never tracks,
    /// restricted to `scope`.
    fn of_object(object: &Value, scope: FieldScope) -> FieldSet {
        let mut set = FieldSet::default();
        set.add_value(object, "", "");
        for field in ["apiVersion", "kind"] {
            set.remove_subtree(&[PathElement::Field(field.to_owned())]);
        }
        for field in ["name", "namespace"]
            .iter()
            .chain(SERVER_OWNED_METADATA.iter())
        {
            set.remove_subtree(&[
                PathElement::Field("metadata".to_owned()),
                PathElement::Field((*field).to_owned()),
            ]);
        }
        let status = [PathElement::Field("status".to_owned())];
        match scope {
            FieldScope::WholeObject => {}
            FieldScope::MainResource => set.remove_subtree(&status),
            FieldScope::StatusSubresource => {
                let kept = set.children.remove(&status[0]);
                set = FieldSet::default();
                if let Some(kept) = kept {
                    set.children.insert(status[0].clone(), kept);
                }
            }
        }
        set
    }
}

/// Metadata the server owns: never tracked, never copied from an applied configuration.
const SERVER_OWNED_METADATA: [&str; 8] = [
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

/// The `k:{...}` step for an element of a list keyed by `key`.
fn key_element(item: &Value, key: &str) -> PathElement {
    let value = item.get(key).map(canonical_json).unwrap_or_default();
    PathElement::Key(BTreeMap::from([(key.to_owned(), value)]))
}

fn get_path<'v>(value: &'v Value, path: &[PathElement]) -> Option<&'v Value> {
    let Some((head, rest)) = path.split_first() else {
        return Some(value);
    };
    let next = match head {
        PathElement::Field(name) => value.as_object()?.get(name)?,
        PathElement::Index(index) => value.as_array()?.get(*index)?,
        PathElement::Key(_) | PathElement::Value(_) => {
            value.as_array()?.iter().find(|e| head.selects(e))?
        }
    };
    get_path(next, rest)
}

/// Removes the value at `path`, if there is one.
fn remove_path(value: &mut Value, path: &[PathElement]) {
    let Some((head, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match (head, value) {
            (PathElement::Field(name), Value::Object(map)) => {
                map.remove(name);
            }
            (PathElement::Index(index), Value::Array(items)) if *index < items.len() => {
                items.remove(*index);
            }
            (PathElement::Key(_) | PathElement::Value(_), Value::Array(items)) => {
                items.retain(|e| !head.selects(e));
            }
            _ => {}
        }
        return;
    }
    let next = match (head, value) {
        (PathElement::Field(name), Value::Object(map)) => map.get_mut(name),
        (PathElement::Index(index), Value::Array(items)) => items.get_mut(*index),
        (PathElement::Key(_) | PathElement::Value(_), Value::Array(items)) => {
            items.iter_mut().find(|e| head.selects(e))
        }
        _ => None,
    };
    if let Some(next) = next {
        remove_path(next, rest);
    }
}

/// Merges an applied value into an existing one found at `parent.field`.
fn apply_merge(existing: &Value, applied: &Value, parent: &str, field: &str) -> Value {
    match (existing, applied) {
        (Value::Object(existing_map), Value::Object(applied_map)) => {
            let mut out = existing_map.clone();
            for (key, applied_child) in applied_map {
                let merged = match out.get(key) {
                    Some(existing_child) => apply_merge(existing_child, applied_child, field, key),
                    None => applied_child.clone(),
                };
                out.insert(key.clone(), merged);
            }
            Value::Object(out)
        }
        (Value::Array(existing_items), Value::Array(applied_items)) => {
            match effective_list_kind(
                parent,
                field,
                &[existing_items.as_slice(), applied_items.as_slice()],
            ) {
                ListKind::Keyed(key) => {
                    let mut out = existing_items.clone();
                    for item in applied_items {
                        let id = item.get(key);
                        match out.iter().position(|e| e.get(key) == id) {
                            Some(i) => out[i] = apply_merge(&out[i], item, field, ""),
                            None => out.push(item.clone()),
                        }
                    }
                    Value::Array(out)
                }
                ListKind::Set => {
                    let mut out = existing_items.clone();
                    for item in applied_items {
                        if !out.contains(item) {
                            out.push(item.clone());
                        }
                    }
                    Value::Array(out)
                }
                ListKind::Atomic => applied.clone(),
            }
        }
        _ => applied.clone(),
    }
}

/// One parsed `metadata.managedFields` entry.
#[derive(Debug, Clone)]
struct ManagedEntry {
    manager: String,
    operation: String,
    api_version: String,
    time: Option<Value>,
    subresource: Option<String>,
    fields: FieldSet,
}

impl ManagedEntry {
    fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("manager".to_owned(), Value::String(self.manager.clone()));
        map.insert(
            "operation".to_owned(),
            Value::String(self.operation.clone()),
        );
        map.insert(
            "apiVersion".to_owned(),
            Value::String(self.api_version.clone()),
        );
        if let Some(time) = &self.time {
            map.insert("time".to_owned(), time.clone());
        }
        map.insert(
            "fieldsType".to_owned(),
            Value::String("FieldsV1".to_owned()),
        );
        map.insert("fieldsV1".to_owned(), self.fields.to_fields_v1());
        if let Some(subresource) = &self.subresource {
            map.insert("subresource".to_owned(), Value::String(subresource.clone()));
        }
        Value::Object(map)
    }

    fn from_json(index: usize, value: &Value) -> Result<ManagedEntry, ApplyError> {
        let invalid = |problem| ApplyError::InvalidManagedFields { index, problem };
        let Value::Object(map) = value else {
            return Err(invalid(ManagedFieldsProblem::NotAnObject));
        };
        let text = |key: &str| map.get(key).and_then(Value::as_str).map(str::to_owned);
        let operation = match map.get("operation") {
            Some(Value::String(op)) if op == "Apply" || op == "Update" => op.clone(),
            other => {
                return Err(invalid(ManagedFieldsProblem::UnknownOperation {
                    operation: other.map_or_else(|| "null".to_owned(), Value::to_string),
                }))
            }
        };
        match map.get("fieldsType") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "FieldsV1" => {}
            Some(other) => {
                return Err(invalid(ManagedFieldsProblem::UnsupportedFieldsType {
                    fields_type: other.to_string(),
                }))
            }
        }
        let fields = match map.get("fieldsV1") {
            None | Some(Value::Null) => FieldSet::default(),
            Some(fields) => FieldSet::from_fields_v1(fields).map_err(invalid)?,
        };
        Ok(ManagedEntry {
            manager: text("manager").unwrap_or_default(),
            operation,
            api_version: text("apiVersion").unwrap_or_default(),
            time: map.get("time").filter(|t| !t.is_null()).cloned(),
            subresource: text("subresource").filter(|s| !s.is_empty()),
            fields,
        })
    }
}

/// Reads `metadata.managedFields` of a stored object.
fn read_entries(object: &Value) -> Result<Vec<ManagedEntry>, ApplyError> {
    match object.pointer("/metadata/managedFields") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| ManagedEntry::from_json(i, item))
            .collect(),
        Some(_) => Err(ApplyError::ManagedFieldsNotAList),
    }
}

/// Writes `metadata.managedFields` (removing it when there are no entries).
fn write_entries(object: &mut Value, entries: &[ManagedEntry]) {
    let Value::Object(map) = object else {
        return;
    };
    let metadata = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    if let Value::Object(metadata) = metadata {
        if entries.is_empty() {
            metadata.remove("managedFields");
        } else {
            metadata.insert(
                "managedFields".to_owned(),
                Value::Array(entries.iter().map(ManagedEntry::to_json).collect()),
            );
        }
    }
}

fn string_field<'v>(object: &'v Value, field: &str) -> Option<&'v str> {
    object.get(field).and_then(Value::as_str)
}

/// Computes the `FieldsV1` set of an object as server-side apply would record
/// it for a manager that set every field of `object`: for example
/// `{"f:metadata":{"f:labels":{"f:app":{}}},"f:spec":{"f:replicas":{}}}`.
///
/// `apiVersion`, `kind`, `metadata.name`, `metadata.namespace` and the
/// server-owned metadata are left out; `scope` drops or keeps `status`.
pub fn fields_v1(object: &Value, scope: FieldScope) -> Value {
    FieldSet::of_object(object, scope).to_fields_v1()
}

/// Server-side apply of `applied` by `manager` to a resource without a status
/// subresource ([`FieldScope::WholeObject`]); see [`server_side_apply_with`].
///
/// # Errors
///
/// As [`server_side_apply_with`].
pub fn server_side_apply(
    existing: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now_rfc3339: &str,
) -> Result<Value, ApplyError> {
    server_side_apply_with(
        existing,
        applied,
        &ApplyOptions {
            manager,
            force,
            now_rfc3339,
            scope: FieldScope::WholeObject,
        },
    )
}

/// Server-side apply: merges the applied configuration into the existing
/// object (or creates it when `existing` is `None`), checks and records field
/// ownership in `metadata.managedFields`, and returns the new object. The
/// semantics, and how they differ from the real structured-merge-diff, are in
/// the [module docs](self).
///
/// On create the result is the applied configuration (without server-owned
/// metadata and, per `options.scope`, without `status`) plus the manager's
/// entry; the caller fills `uid`, `resourceVersion`, `creationTimestamp`.
///
/// # Errors
///
/// [`ApplyError::AppliedNotAnObject`], [`ApplyError::ExistingNotAnObject`],
/// [`ApplyError::MissingApiVersion`], [`ApplyError::MissingKind`],
/// [`ApplyError::KindMismatch`], [`ApplyError::ManagedFieldsInApplyConfiguration`];
/// [`ApplyError::ManagedFieldsNotAList`] and [`ApplyError::InvalidManagedFields`]
/// for malformed stored entries; [`ApplyError::StatusOfMissingObject`] for a
/// status apply without an object; [`ApplyError::Conflict`] listing every
/// conflicting field when `force` is false.
pub fn server_side_apply_with(
    existing: Option<&Value>,
    applied: &Value,
    options: &ApplyOptions<'_>,
) -> Result<Value, ApplyError> {
    let Value::Object(applied_map) = applied else {
        return Err(ApplyError::AppliedNotAnObject);
    };
    let api_version = string_field(applied, "apiVersion")
        .ok_or(ApplyError::MissingApiVersion)?
        .to_owned();
    let applied_kind = string_field(applied, "kind").ok_or(ApplyError::MissingKind)?;
    match applied.pointer("/metadata/managedFields") {
        None | Some(Value::Null) => {}
        Some(Value::Array(items)) if items.is_empty() => {}
        Some(_) => return Err(ApplyError::ManagedFieldsInApplyConfiguration),
    }
    let config = applied_configuration(applied_map, options.scope);
    let new_set = FieldSet::of_object(&config, options.scope);
    let subresource = options.scope.subresource().map(str::to_owned);
    let own_entry = ManagedEntry {
        manager: options.manager.to_owned(),
        operation: "Apply".to_owned(),
        api_version,
        time: Some(Value::String(options.now_rfc3339.to_owned())),
        subresource: subresource.clone(),
        fields: new_set.clone(),
    };

    let Some(existing) = existing else {
        if options.scope == FieldScope::StatusSubresource {
            return Err(ApplyError::StatusOfMissingObject);
        }
        let mut created = config;
        write_entries(&mut created, &[own_entry]);
        return Ok(created);
    };
    if !existing.is_object() {
        return Err(ApplyError::ExistingNotAnObject);
    }
    if let Some(existing_kind) = string_field(existing, "kind") {
        if existing_kind != applied_kind {
            return Err(ApplyError::KindMismatch {
                existing: existing_kind.to_owned(),
                applied: applied_kind.to_owned(),
            });
        }
    }

    let mut entries = read_entries(existing)?;
    if entries.is_empty() {
        let fields = FieldSet::of_object(existing, FieldScope::WholeObject);
        if !fields.is_empty() {
            entries.push(ManagedEntry {
                manager: "before-first-apply".to_owned(),
                operation: "Update".to_owned(),
                api_version: string_field(existing, "apiVersion")
                    .unwrap_or_default()
                    .to_owned(),
                time: None,
                subresource: None,
                fields,
            });
        }
    }
    let own_index = entries.iter().position(|e| {
        e.manager == options.manager && e.operation == "Apply" && e.subresource == subresource
    });
    let previous = own_index.map(|i| entries[i].fields.clone());

    let mut conflicts = Vec::new();
    for path in new_set.leaves() {
        let Some(current) = get_path(existing, &path) else {
            continue;
        };
        if get_path(&config, &path) == Some(current) {
            continue;
        }
        for (index, entry) in entries.iter_mut().enumerate() {
            if Some(index) == own_index
                || entry.manager == options.manager
                || !entry.fields.contains(&path)
            {
                continue;
            }
            if options.force {
                entry.fields.remove(&path);
            } else {
                conflicts.push(ApplyConflict {
                    path: path_string(&path),
                    manager: entry.manager.clone(),
                    operation: entry.operation.clone(),
                    api_version: entry.api_version.clone(),
                    subresource: entry.subresource.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(ApplyError::Conflict { conflicts });
    }

    let mut merged = apply_merge(existing, &config, "", "");
    if let Some(previous) = previous {
        for path in previous.members() {
            if new_set.covers(&path) {
                continue;
            }
            let owned_elsewhere = entries
                .iter()
                .enumerate()
                .any(|(i, e)| Some(i) != own_index && e.fields.covers(&path));
            if !owned_elsewhere {
                remove_path(&mut merged, &path);
            }
        }
    }

    match own_index {
        Some(index) => entries[index] = own_entry,
        None => entries.push(own_entry),
    }
    let own_position = own_index.unwrap_or(entries.len() - 1);
    let entries: Vec<ManagedEntry> = entries
        .into_iter()
        .enumerate()
        .filter(|(i, e)| *i == own_position || !e.fields.is_empty())
        .map(|(_, e)| e)
        .collect();
    write_entries(&mut merged, &entries);
    Ok(merged)
}

/// The part of an applied configuration that is merged: server-owned metadata
/// dropped, and `status` dropped or kept alone per `scope`.
fn applied_configuration(applied: &Map<String, Value>, scope: FieldScope) -> Value {
    let mut config = applied.clone();
    if let Some(Value::Object(metadata)) = config.get_mut("metadata") {
        for field in SERVER_OWNED_METADATA {
            metadata.remove(field);
        }
    }
    match scope {
        FieldScope::WholeObject => {}
        FieldScope::MainResource => {
            config.remove("status");
        }
        FieldScope::StatusSubresource => {
            config
                .retain(|k, _| matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status"));
            if let Some(Value::Object(metadata)) = config.get_mut("metadata") {
                metadata.retain(|k, _| k == "name" || k == "namespace");
            }
        }
    }
    Value::Object(config)
}

/// Records a non-apply write (create, update, or a merge/JSON/strategic patch)
/// by `manager` in `metadata.managedFields`, as the apiserver does for
/// `operation: Update`, and returns `new` with the entries written.
///
/// The base entries are those of `new` when it carries a non-empty list (a
/// client echoing or editing them), else those of `old`. A list of only empty
/// entries (`[{}]`) clears managed fields, and nothing is recorded. Otherwise
/// the manager's `Update` entry (per manager, `apiVersion` and subresource)
/// gains every field that `new` adds or whose leaf value it changes, and those
/// fields leave every other entry; fields `old` had and `new` lacks leave all
/// entries; entries left empty are dropped. Values are compared without a
/// schema (see the [module docs](self)).
///
/// # Errors
///
/// [`ApplyError::AppliedNotAnObject`] when `new` is not an object;
/// [`ApplyError::ExistingNotAnObject`] when `old` is not;
/// [`ApplyError::MissingApiVersion`] when `new` has no `apiVersion`;
/// [`ApplyError::ManagedFieldsNotAList`] / [`ApplyError::InvalidManagedFields`]
/// for malformed entries.
pub fn record_update(
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    now_rfc3339: &str,
    scope: FieldScope,
) -> Result<Value, ApplyError> {
    if !new.is_object() {
        return Err(ApplyError::AppliedNotAnObject);
    }
    if old.is_some_and(|o| !o.is_object()) {
        return Err(ApplyError::ExistingNotAnObject);
    }
    let api_version = string_field(new, "apiVersion")
        .ok_or(ApplyError::MissingApiVersion)?
        .to_owned();
    let mut result = new.clone();

    let supplied = match new.pointer("/metadata/managedFields") {
        Some(Value::Array(items)) if !items.is_empty() => Some(items),
        None | Some(Value::Null) | Some(Value::Array(_)) => None,
        Some(_) => return Err(ApplyError::ManagedFieldsNotAList),
    };
    if supplied.is_some_and(|items| {
        items
            .iter()
            .all(|i| i.as_object().is_some_and(Map::is_empty))
    }) {
        write_entries(&mut result, &[]);
        return Ok(result);
    }
    let mut entries = match (supplied, old) {
        (Some(_), _) => read_entries(new)?,
        (None, Some(old)) => read_entries(old)?,
        (None, None) => Vec::new(),
    };

    let new_set = FieldSet::of_object(new, scope);
    let old_set = old
        .map(|o| FieldSet::of_object(o, scope))
        .unwrap_or_default();
    let mut changed = FieldSet::default();
    for path in new_set.members() {
        let is_leaf = new_set.node(&path).is_some_and(|n| n.children.is_empty());
        let modified = !old_set.contains(&path)
            || (is_leaf && old.and_then(|o| get_path(o, &path)) != get_path(new, &path));
        if modified {
            changed.insert(&path);
        }
    }
    let removed: Vec<Vec<PathElement>> = old_set
        .members()
        .into_iter()
        .filter(|p| !new_set.contains(p))
        .collect();

    let subresource = scope.subresource().map(str::to_owned);
    let changed_paths = changed.members();
    for entry in &mut entries {
        for path in &removed {
            entry.fields.remove(path);
        }
        let is_own = entry.manager == manager
            && entry.operation == "Update"
            && entry.api_version == api_version
            && entry.subresource == subresource;
        if !is_own {
            for path in &changed_paths {
                entry.fields.remove(path);
            }
        }
    }
    match entries.iter_mut().find(|e| {
        e.manager == manager
            && e.operation == "Update"
            && e.api_version == api_version
            && e.subresource == subresource
    }) {
        Some(own) => {
            for path in &changed_paths {
                own.fields.insert(path);
            }
            if !changed_paths.is_empty() {
                own.time = Some(Value::String(now_rfc3339.to_owned()));
            }
        }
        None if !changed.is_empty() => entries.push(ManagedEntry {
            manager: manager.to_owned(),
            operation: "Update".to_owned(),
            api_version,
            time: Some(Value::String(now_rfc3339.to_owned())),
            subresource,
            fields: changed,
        }),
        None => {}
    }
    entries.retain(|e| !e.fields.is_empty());
    write_entries(&mut result, &entries);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: &str = "2024-05-01T10:00:00Z";
    const LATER: &str = "2024-05-01T11:00:00Z";

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}, "finalizers": ["a", "b"]},
            "spec": {
                "replicas": 2,
                "template": {"spec": {"containers": [
                    {"name": "web", "image": "web:1", "args": ["--x"],
                     "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                     "ports": [{"containerPort": 80}, {"containerPort": 443}],
                     "volumeMounts": [{"mountPath": "/data", "name": "data"}]},
                    {"name": "sidecar", "image": "proxy:1"}
                ]}}
            }
        })
    }

    #[test]
    fn patch_type_from_content_type() {
        let cases = [
            ("application/merge-patch+json", Some(PatchType::Merge)),
            ("application/json-patch+json", Some(PatchType::Json)),
            (
                "application/strategic-merge-patch+json",
                Some(PatchType::StrategicMerge),
            ),
            ("application/apply-patch+yaml", Some(PatchType::Apply)),
            (
                "Application/Apply-Patch+YAML; charset=utf-8",
                Some(PatchType::Apply),
            ),
            (" application/merge-patch+json ", Some(PatchType::Merge)),
            ("application/apply-patch+cbor", None),
            ("application/json", None),
            ("", None),
        ];
        for (input, want) in cases {
            match (PatchType::from_content_type(input), want) {
                (Ok(got), Some(want)) => assert_eq!(got, want, "{input:?}"),
                (Err(PatchError::UnsupportedMediaType { content_type }), None) => {
                    assert_eq!(content_type, input)
                }
                (got, want) => panic!("{input:?}: got {got:?}, want {want:?}"),
            }
        }
        for t in [
            PatchType::Merge,
            PatchType::Json,
            PatchType::StrategicMerge,
            PatchType::Apply,
        ] {
            assert_eq!(t.to_string().parse::<PatchType>().unwrap(), t);
        }
    }

    #[test]
    fn merge_patch_rfc7386() {
        let target =
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {"list": [1, 2]}});
        let patch = json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"list": [3]}});
        assert_eq!(
            merge_patch(&target, &patch).unwrap(),
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"list": [3]}})
        );
        assert!(matches!(
            merge_patch(&target, &json!([1])),
            Err(PatchError::PatchNotAnObject {
                patch_type: PatchType::Merge
            })
        ));
        assert!(matches!(
            merge_patch(&json!(1), &json!({})),
            Err(PatchError::TargetNotAnObject)
        ));
    }

    #[test]
    fn json_patch_test_of_a_missing_path_equals_null() {
        let target = json!({"metadata": {"name": "w"}});
        let patch = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}
        ]);
        assert_eq!(
            json_patch(&target, &patch).unwrap()["metadata"]["finalizers"],
            json!(["f"])
        );
        let wrong = json!([{"op": "test", "path": "/metadata/name", "value": null}]);
        assert!(
            json_patch(&target, &wrong).is_err(),
            "a present value is not null"
        );
    }

    #[test]
    fn json_patch_rfc6902() {
        let target = json!({"spec": {"replicas": 1, "items": ["a"]}});
        let patch = json!([
            {"op": "test", "path": "/spec/replicas", "value": 1},
            {"op": "replace", "path": "/spec/replicas", "value": 3},
            {"op": "add", "path": "/spec/items/-", "value": "b"},
            {"op": "copy", "from": "/spec/replicas", "path": "/spec/copy"},
            {"op": "move", "from": "/spec/copy", "path": "/spec/moved"},
            {"op": "remove", "path": "/spec/items/0"}
        ]);
        assert_eq!(
            json_patch(&target, &patch).unwrap(),
            json!({"spec": {"replicas": 3, "items": ["b"], "moved": 3}})
        );

        let failing = json!([
            {"op": "replace", "path": "/spec/replicas", "value": 3},
            {"op": "test", "path": "/spec/replicas", "value": 1}
        ]);
        let err = json_patch(&target, &failing).unwrap_err();
        assert!(
            matches!(&err, PatchError::JsonPatchOperation { index: 1, op: "test", path, .. } if path == "/spec/replicas"),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .starts_with("JSON patch operation 1 (test \"/spec/replicas\") failed"));

        let missing = json!([{"op": "remove", "path": "/spec/nope"}]);
        assert!(matches!(
            json_patch(&target, &missing),
            Err(PatchError::JsonPatchOperation {
                index: 0,
                op: "remove",
                ..
            })
        ));
        assert!(matches!(
            json_patch(&target, &json!({"op": "add"})),
            Err(PatchError::InvalidJsonPatch { .. })
        ));
        assert!(matches!(
            json_patch(&target, &json!([{"op": "replace", "path": "", "value": 5}])),
            Err(PatchError::ResultNotAnObject)
        ));
    }

    #[test]
    fn strategic_merge_containers_and_env_by_name() {
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "web", "image": "web:2", "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]},
            {"name": "new", "image": "new:1"}
        ]}}}});
        let got = strategic_merge_patch(&deployment(), &patch).unwrap();
        let containers = &got["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 3);
        assert_eq!(containers[0]["image"], "web:2");
        assert_eq!(containers[0]["args"], json!(["--x"]));
        assert_eq!(
            containers[0]["env"],
            json!([{"name": "A", "value": "1"}, {"name": "B", "value": "3"}, {"name": "C", "value": "4"}])
        );
        // As the API server orders them: a new element before the old-only ones after it.
        assert_eq!(containers[1], json!({"name": "new", "image": "new:1"}));
        assert_eq!(
            containers[2],
            json!({"name": "sidecar", "image": "proxy:1"})
        );
    }

    #[test]
    fn strategic_merge_table() {
        let cases: Vec<(&str, Value, Value, Value)> = vec![
            (
                "null deletes a key",
                json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
                json!({"metadata": {"labels": {"a": null}}}),
                json!({"metadata": {"labels": {"b": "2"}}}),
            ),
            (
                "$patch: delete on a keyed element",
                json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
                json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}),
                json!({"spec": {"containers": [{"name": "b"}]}}),
            ),
            (
                "$patch: delete on a map empties it",
                json!({"spec": {"selector": {"a": "1"}, "x": 1}}),
                json!({"spec": {"selector": {"$patch": "delete"}}}),
                json!({"spec": {"selector": {}, "x": 1}}),
            ),
            (
                "$patch: replace on a map",
                json!({"metadata": {"labels": {"a": "1", "b": "2"}}}),
                json!({"metadata": {"labels": {"$patch": "replace", "c": "3"}}}),
                json!({"metadata": {"labels": {"c": "3"}}}),
            ),
            (
                "$patch: replace in a keyed list",
                json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
                json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "c"}]}}),
                json!({"spec": {"containers": [{"name": "c"}]}}),
            ),
            (
                "finalizers merge as a set",
                json!({"metadata": {"finalizers": ["a", "b"]}}),
                json!({"metadata": {"finalizers": ["b", "c"]}}),
                json!({"metadata": {"finalizers": ["a", "b", "c"]}}),
            ),
            (
                "$deleteFromPrimitiveList",
                json!({"metadata": {"finalizers": ["a", "b"]}}),
                json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"]}}),
                json!({"metadata": {"finalizers": ["c", "b"]}}),
            ),
            // The orders below are kube-apiserver 1.32's answers to the same patches.
            (
                "a new keyed element goes before the old-only ones after it",
                json!({"env": [{"name": "1"}, {"name": "2"}, {"name": "3"}]}),
                json!({"env": [{"name": "2", "value": "x"}, {"name": "4"}]}),
                json!({"env": [{"name": "1"}, {"name": "2", "value": "x"}, {"name": "4"}, {"name": "3"}]}),
            ),
            (
                "a new set element goes first, the patch's order is kept",
                json!({"metadata": {"finalizers": ["a", "b"]}}),
                json!({"metadata": {"finalizers": ["c", "a"]}}),
                json!({"metadata": {"finalizers": ["c", "a", "b"]}}),
            ),
            (
                "other lists are atomic",
                json!({"spec": {"args": ["a", "b"], "finalizers": ["x"]}}),
                json!({"spec": {"args": ["c"], "finalizers": ["y"]}}),
                json!({"spec": {"args": ["c"], "finalizers": ["y"]}}),
            ),
            (
                "container ports by containerPort",
                json!({"ports": [{"containerPort": 80, "name": "http"}]}),
                json!({"ports": [{"containerPort": 80, "protocol": "TCP"}, {"containerPort": 81}]}),
                json!({"ports": [{"containerPort": 80, "name": "http", "protocol": "TCP"}, {"containerPort": 81}]}),
            ),
            (
                "service ports by port",
                json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}]}}),
                json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
                json!({"spec": {"ports": [{"port": 80, "targetPort": 9090}]}}),
            ),
            (
                "volumeMounts by mountPath",
                json!({"volumeMounts": [{"mountPath": "/a", "name": "x"}]}),
                json!({"volumeMounts": [{"mountPath": "/a", "readOnly": true}, {"mountPath": "/b", "name": "y"}]}),
                json!({"volumeMounts": [{"mountPath": "/a", "name": "x", "readOnly": true}, {"mountPath": "/b", "name": "y"}]}),
            ),
            (
                "conditions by type",
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Synced", "status": "True"}]}}),
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}}),
                json!({"status": {"conditions": [{"type": "Ready", "status": "True"}, {"type": "Synced", "status": "True"}]}}),
            ),
            (
                "ownerReferences by uid",
                json!({"metadata": {"ownerReferences": [{"uid": "1", "name": "a"}]}}),
                json!({"metadata": {"ownerReferences": [{"uid": "2", "name": "b"}]}}),
                json!({"metadata": {"ownerReferences": [{"uid": "2", "name": "b"}, {"uid": "1", "name": "a"}]}}),
            ),
            (
                "$retainKeys clears unlisted keys",
                json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
                json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
                json!({"spec": {"strategy": {"type": "Recreate"}}}),
            ),
            (
                "$setElementOrder is stripped",
                json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
                json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}], "containers": [{"name": "b", "image": "x"}]}}),
                json!({"spec": {"containers": [{"name": "a"}, {"name": "b", "image": "x"}]}}),
            ),
            (
                "directives inside new maps are processed",
                json!({}),
                json!({"spec": {"template": {"a": null, "b": 1, "containers": [{"name": "x", "$patch": "delete"}]}}}),
                json!({"spec": {"template": {"b": 1, "containers": []}}}),
            ),
        ];
        for (name, target, patch, want) in cases {
            let got =
                strategic_merge_patch(&target, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn strategic_merge_errors() {
        let err = strategic_merge_patch(
            &deployment(),
            &json!({"spec": {"template": {"spec": {"containers": [{"image": "x"}]}}}}),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.template.spec.containers[0]: map does not contain declared merge key: name"
        );
        let err = strategic_merge_patch(&deployment(), &json!({"spec": {"$patch": "explode"}}))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec: unknown patch directive \"$patch\": \"explode\""
        );
        assert!(matches!(
            strategic_merge_patch(&deployment(), &json!({"spec": {"$retainKeys": "x"}})),
            Err(PatchError::InvalidDirectiveValue { .. })
        ));
        assert!(matches!(
            strategic_merge_patch(&deployment(), &json!([])),
            Err(PatchError::PatchNotAnObject {
                patch_type: PatchType::StrategicMerge
            })
        ));
    }

    fn entry<'v>(object: &'v Value, manager: &str) -> Option<&'v Value> {
        object["metadata"]["managedFields"]
            .as_array()?
            .iter()
            .find(|e| e["manager"] == manager)
    }

    fn applied_deployment(image: &str, replicas: Option<i64>) -> Value {
        let mut spec =
            json!({"template": {"spec": {"containers": [{"name": "web", "image": image}]}}});
        if let Some(replicas) = replicas {
            spec["replicas"] = json!(replicas);
        }
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "prod", "labels": {"app": "web"}},
            "spec": spec
        })
    }

    #[test]
    fn ssa_create_records_fields_v1() {
        let applied = applied_deployment("web:1", Some(2));
        let created = server_side_apply(None, &applied, "ferry", false, NOW).unwrap();
        let mut expected = applied.clone();
        expected["metadata"]["managedFields"] = json!([{
            "manager": "ferry",
            "operation": "Apply",
            "apiVersion": "apps/v1",
            "time": NOW,
            "fieldsType": "FieldsV1",
            "fieldsV1": {
                "f:metadata": {"f:labels": {"f:app": {}}},
                "f:spec": {
                    "f:replicas": {},
                    "f:template": {"f:spec": {"f:containers": {
                        "k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}
                    }}}
                }
            }
        }]);
        assert_eq!(created, expected);
    }

    #[test]
    fn fields_v1_shapes() {
        let object = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "uid": "u", "resourceVersion": "1", "finalizers": ["x"], "annotations": {}},
            "spec": {"ports": [{"containerPort": 80}], "args": ["a"], "empty": []},
            "status": {"phase": "Running"}
        });
        assert_eq!(
            fields_v1(&object, FieldScope::MainResource),
            json!({
                "f:metadata": {"f:finalizers": {"v:\"x\"": {}}, "f:annotations": {}},
                "f:spec": {"f:ports": {"k:{\"containerPort\":80}": {".": {}, "f:containerPort": {}}}, "f:args": {}, "f:empty": {}}
            })
        );
        assert_eq!(
            fields_v1(&object, FieldScope::StatusSubresource),
            json!({"f:status": {"f:phase": {}}})
        );
        let set = FieldSet::of_object(&object, FieldScope::WholeObject);
        assert_eq!(FieldSet::from_fields_v1(&set.to_fields_v1()).unwrap(), set);
        let path = vec![
            PathElement::Field("spec".into()),
            PathElement::Field("ports".into()),
            key_element(&json!({"containerPort": 80}), "containerPort"),
        ];
        assert_eq!(path_string(&path), ".spec.ports[containerPort=80]");
    }

    #[test]
    fn ssa_updates_and_removes_dropped_fields() {
        let mut first = applied_deployment("web:1", Some(2));
        first["metadata"]["labels"]["tier"] = json!("front");
        first["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "sidecar", "image": "proxy:1"}));
        let created = server_side_apply(None, &first, "ferry", false, NOW).unwrap();

        // Re-apply without `tier`, without the sidecar, and with a new image.
        let second = applied_deployment("web:2", Some(2));
        let updated = server_side_apply(Some(&created), &second, "ferry", false, LATER).unwrap();
        assert_eq!(updated["metadata"]["labels"], json!({"app": "web"}));
        assert_eq!(
            updated["spec"]["template"]["spec"]["containers"],
            json!([{"name": "web", "image": "web:2"}])
        );
        let own = entry(&updated, "ferry").unwrap();
        assert_eq!(own["time"], LATER);
        assert_eq!(own["fieldsV1"], fields_v1(&second, FieldScope::WholeObject));
        assert_eq!(
            updated["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn ssa_keeps_dropped_fields_another_manager_owns() {
        let mut first = applied_deployment("web:1", None);
        first["metadata"]["labels"]["shared"] = json!("yes");
        let created = server_side_apply(None, &first, "ferry", false, NOW).unwrap();
        let mut other = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"shared": "yes", "mine": "1"}}});
        let both = server_side_apply(Some(&created), &other, "helm", false, NOW).unwrap();
        assert_eq!(
            both["metadata"]["labels"],
            json!({"app": "web", "shared": "yes", "mine": "1"})
        );

        let dropped = server_side_apply(
            Some(&both),
            &applied_deployment("web:1", None),
            "ferry",
            false,
            LATER,
        )
        .unwrap();
        assert_eq!(
            dropped["metadata"]["labels"],
            json!({"app": "web", "shared": "yes", "mine": "1"})
        );

        // Once helm drops it too, nobody owns it and helm's apply removes it.
        other["metadata"]["labels"] = json!({"mine": "1"});
        let gone = server_side_apply(Some(&dropped), &other, "helm", false, LATER).unwrap();
        assert_eq!(
            gone["metadata"]["labels"],
            json!({"app": "web", "mine": "1"})
        );
    }

    #[test]
    fn ssa_conflict_and_force() {
        let mut existing = applied_deployment("web:1", Some(3));
        existing["metadata"]["managedFields"] = json!([{
            "manager": "kubectl-client-side-apply",
            "operation": "Update",
            "apiVersion": "apps/v1",
            "time": NOW,
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:replicas": {}, "f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:image": {}, "f:name": {}}}}}}}
        }]);

        let err = server_side_apply(
            Some(&existing),
            &applied_deployment("web:1", Some(5)),
            "ferry",
            false,
            LATER,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"kubectl-client-side-apply\" using apps/v1: .spec.replicas"
        );

        let err = server_side_apply(
            Some(&existing),
            &applied_deployment("web:2", Some(5)),
            "ferry",
            false,
            LATER,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 2 conflicts: conflicts with \"kubectl-client-side-apply\" using apps/v1:\n\
             - .spec.replicas\n\
             - .spec.template.spec.containers[name=\"web\"].image"
        );
        let ApplyError::Conflict { conflicts } = err else {
            panic!()
        };
        assert_eq!(conflicts[0].manager, "kubectl-client-side-apply");

        // Same values: shared ownership, no conflict.
        let shared = server_side_apply(
            Some(&existing),
            &applied_deployment("web:1", Some(3)),
            "ferry",
            false,
            LATER,
        )
        .unwrap();
        assert_eq!(
            entry(&shared, "kubectl-client-side-apply").unwrap()["fieldsV1"]["f:spec"]
                ["f:replicas"],
            json!({})
        );

        // Force: the value changes and ownership moves.
        let forced = server_side_apply(
            Some(&existing),
            &applied_deployment("web:1", Some(5)),
            "ferry",
            true,
            LATER,
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 5);
        let previous = entry(&forced, "kubectl-client-side-apply").unwrap();
        assert!(previous["fieldsV1"]["f:spec"].get("f:replicas").is_none());
        assert!(previous["fieldsV1"]["f:spec"]["f:template"].is_object());
        assert_eq!(
            entry(&forced, "ferry").unwrap()["fieldsV1"]["f:spec"]["f:replicas"],
            json!({})
        );

        // Forcing both fields away leaves the other manager the fields it shares.
        let all = server_side_apply(
            Some(&existing),
            &applied_deployment("web:2", Some(5)),
            "ferry",
            true,
            LATER,
        )
        .unwrap();
        assert_eq!(
            entry(&all, "kubectl-client-side-apply").unwrap()["fieldsV1"],
            json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {"k:{\"name\":\"web\"}": {".": {}, "f:name": {}}}}}}})
        );

        // An entry left with no fields is dropped.
        existing["metadata"]["managedFields"][0]["fieldsV1"] =
            json!({"f:spec": {"f:replicas": {}}});
        let taken = server_side_apply(
            Some(&existing),
            &applied_deployment("web:1", Some(5)),
            "ferry",
            true,
            LATER,
        )
        .unwrap();
        assert!(entry(&taken, "kubectl-client-side-apply").is_none());
        assert_eq!(
            taken["metadata"]["managedFields"].as_array().unwrap().len(),
            1
        );
    }

    #[test]
    fn ssa_conflicts_with_other_appliers_without_using() {
        let created = server_side_apply(
            None,
            &applied_deployment("web:1", Some(1)),
            "helm",
            false,
            NOW,
        )
        .unwrap();
        let err = server_side_apply(
            Some(&created),
            &applied_deployment("web:1", Some(4)),
            "ferry",
            false,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"helm\": .spec.replicas"
        );
    }

    #[test]
    fn ssa_before_first_apply() {
        let existing = applied_deployment("web:1", Some(3));
        let err = server_side_apply(
            Some(&existing),
            &applied_deployment("web:1", Some(1)),
            "ferry",
            false,
            NOW,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"before-first-apply\" using apps/v1: .spec.replicas"
        );
        let ok = server_side_apply(
            Some(&existing),
            &applied_deployment("web:1", Some(3)),
            "ferry",
            false,
            NOW,
        )
        .unwrap();
        assert!(entry(&ok, "before-first-apply").is_some());
        assert!(entry(&ok, "ferry").is_some());
    }

    #[test]
    fn ssa_status_scopes() {
        let mut applied = applied_deployment("web:1", Some(1));
        applied["status"] = json!({"replicas": 9});
        applied["metadata"]["resourceVersion"] = json!("77");
        let main = ApplyOptions {
            manager: "ferry",
            force: false,
            now_rfc3339: NOW,
            scope: FieldScope::MainResource,
        };
        let created = server_side_apply_with(None, &applied, &main).unwrap();
        assert!(created.get("status").is_none());
        assert!(created["metadata"].get("resourceVersion").is_none());
        assert!(entry(&created, "ferry").unwrap()["fieldsV1"]
            .get("f:status")
            .is_none());

        let mut existing = created.clone();
        existing["status"] = json!({"replicas": 1});
        let kept = server_side_apply_with(Some(&existing), &applied, &main).unwrap();
        assert_eq!(kept["status"], json!({"replicas": 1}));

        let status_options = ApplyOptions {
            scope: FieldScope::StatusSubresource,
            manager: "controller",
            ..main
        };
        let status_apply = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 50}, "status": {"replicas": 2}});
        let updated =
            server_side_apply_with(Some(&existing), &status_apply, &status_options).unwrap();
        assert_eq!(updated["status"], json!({"replicas": 2}));
        assert_eq!(updated["spec"]["replicas"], 1);
        let own = entry(&updated, "controller").unwrap();
        assert_eq!(own["subresource"], "status");
        assert_eq!(own["fieldsV1"], json!({"f:status": {"f:replicas": {}}}));
        assert!(matches!(
            server_side_apply_with(None, &status_apply, &status_options),
            Err(ApplyError::StatusOfMissingObject)
        ));
    }

    #[test]
    fn ssa_rejects_bad_input() {
        let mut with_fields = applied_deployment("web:1", None);
        with_fields["metadata"]["managedFields"] = json!([{"manager": "x"}]);
        let cases: Vec<(Option<Value>, Value, ApplyError)> = vec![
            (None, json!([]), ApplyError::AppliedNotAnObject),
            (
                None,
                json!({"kind": "Deployment"}),
                ApplyError::MissingApiVersion,
            ),
            (None, json!({"apiVersion": "v1"}), ApplyError::MissingKind),
            (
                None,
                with_fields,
                ApplyError::ManagedFieldsInApplyConfiguration,
            ),
            (
                Some(json!({"apiVersion": "apps/v1", "kind": "StatefulSet"})),
                applied_deployment("web:1", None),
                ApplyError::KindMismatch {
                    existing: "StatefulSet".into(),
                    applied: "Deployment".into(),
                },
            ),
            (
                Some(
                    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"managedFields": [{"operation": "Patch"}]}}),
                ),
                applied_deployment("web:1", None),
                ApplyError::InvalidManagedFields {
                    index: 0,
                    problem: ManagedFieldsProblem::UnknownOperation {
                        operation: "\"Patch\"".into(),
                    },
                },
            ),
            (
                Some(
                    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"managedFields": [{"operation": "Apply", "fieldsV1": {"x:y": {}}}]}}),
                ),
                applied_deployment("web:1", None),
                ApplyError::InvalidManagedFields {
                    index: 0,
                    problem: ManagedFieldsProblem::InvalidFieldsV1Key { key: "x:y".into() },
                },
            ),
        ];
        for (existing, applied, want) in cases {
            assert_eq!(
                server_side_apply(existing.as_ref(), &applied, "m", false, NOW).unwrap_err(),
                want
            );
        }
    }

    #[test]
    fn record_update_tracks_writers() {
        let created = record_update(
            None,
            &applied_deployment("web:1", Some(1)),
            "kubectl-create",
            NOW,
            FieldScope::MainResource,
        )
        .unwrap();
        let creator = entry(&created, "kubectl-create").unwrap();
        assert_eq!(creator["operation"], "Update");
        assert_eq!(
            creator["fieldsV1"],
            fields_v1(
                &applied_deployment("web:1", Some(1)),
                FieldScope::MainResource
            )
        );

        // An apply taking over the image, then an update of replicas by a controller.
        let applied = server_side_apply(
            Some(&created),
            &applied_deployment("web:2", None),
            "ferry",
            true,
            NOW,
        )
        .unwrap();
        let mut scaled = applied.clone();
        scaled["spec"]["replicas"] = json!(4);
        scaled["status"] = json!({"replicas": 4});
        let tracked = record_update(
            Some(&applied),
            &scaled,
            "hpa",
            LATER,
            FieldScope::MainResource,
        )
        .unwrap();
        assert_eq!(
            entry(&tracked, "hpa").unwrap()["fieldsV1"],
            json!({"f:spec": {"f:replicas": {}}})
        );
        assert!(
            entry(&tracked, "kubectl-create").unwrap()["fieldsV1"]["f:spec"]
                .get("f:replicas")
                .is_none()
        );

        // The applier now conflicts with the updater.
        let err = server_side_apply(
            Some(&tracked),
            &applied_deployment("web:2", Some(2)),
            "ferry",
            false,
            LATER,
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "Apply failed with 1 conflict: conflict with \"hpa\" using apps/v1: .spec.replicas"
        );

        // Removing a field drops it from every entry; [{}] clears everything.
        let mut unlabelled = tracked.clone();
        unlabelled["metadata"]["labels"] = json!({});
        let after = record_update(
            Some(&tracked),
            &unlabelled,
            "hpa",
            LATER,
            FieldScope::MainResource,
        )
        .unwrap();
        for e in after["metadata"]["managedFields"].as_array().unwrap() {
            assert!(
                e["fieldsV1"]["f:metadata"]
                    .get("f:labels")
                    .is_none_or(|l| l.get("f:app").is_none()),
                "{e}"
            );
        }
        let mut reset = tracked.clone();
        reset["metadata"]["managedFields"] = json!([{}]);
        let cleared = record_update(
            Some(&tracked),
            &reset,
            "hpa",
            LATER,
            FieldScope::MainResource,
        )
        .unwrap();
        assert!(cleared["metadata"].get("managedFields").is_none());
    }
}
