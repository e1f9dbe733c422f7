//! The RFC patches: JSON merge patch (RFC 7386) and JSON patch (RFC 6902).

use serde_json::Value;

use super::{PatchError, PatchType};

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
