//! Strategic merge patch: lists merged by the keys of the module's table, the `$patch`,
//! `$retainKeys`, `$deleteFromPrimitiveList` and `$setElementOrder` directives, and merged
//! lists ordered as the API server orders them.

use serde_json::{Map, Value};

use super::{PatchError, PatchType};

/// How a list is merged, from the table in the [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ListKind {
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
pub(super) fn effective_list_kind(parent: &str, field: &str, lists: &[&[Value]]) -> ListKind {
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
