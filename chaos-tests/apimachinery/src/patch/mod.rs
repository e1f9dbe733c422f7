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

use std::fmt;
use std::str::FromStr;

mod apply;
mod merge;
mod strategic;

pub use apply::{
    fields_v1, record_update, server_side_apply, server_side_apply_with, ApplyConflict, ApplyError,
    ApplyOptions, FieldScope, ManagedFieldsProblem,
};
pub use merge::{json_patch, merge_patch};
pub use strategic::strategic_merge_patch;

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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json::Value;

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
