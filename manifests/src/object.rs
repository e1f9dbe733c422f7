//! Identity of one manifest object (`serde_json::Value`): API group, kind, namespace and name.

use std::fmt;

use serde_json::{Map, Value};

/// Where an object sits in the API: its group, kind, namespace and name, read from
/// `apiVersion`, `kind` and `metadata` as the Kubernetes API conventions define them
/// ("Resources": `apiVersion` is `<group>/<version>`, or just `<version>` for the core group).
///
/// Missing fields read as empty strings, so a malformed object still has a key to sort and
/// report by. Ordered by group, kind, namespace, then name: the deterministic order capture
/// and ordering use.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// API group; empty for the core group (`apiVersion: v1`).
    pub group: String,
    /// Kind, e.g. `Deployment`.
    pub kind: String,
    /// `metadata.namespace`; empty for cluster-scoped objects.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// The key of `object`.
    #[must_use]
    pub fn of(object: &Value) -> Self {
        let meta = &object["metadata"];
        Self {
            group: group_of(object).to_string(),
            kind: str_at(object, "kind").to_string(),
            namespace: str_at(meta, "namespace").to_string(),
            name: str_at(meta, "name").to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    /// `kind.group namespace/name` (`Deployment.apps shop/web`, `ConfigMap shop/settings`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.kind)?;
        if !self.group.is_empty() {
            write!(f, ".{}", self.group)?;
        }
        if self.namespace.is_empty() {
            write!(f, " {}", self.name)
        } else {
            write!(f, " {}/{}", self.namespace, self.name)
        }
    }
}

/// The API group of `object`: the part of `apiVersion` before `/`, or `""` for the core group
/// (and for an object without `apiVersion`).
pub(crate) fn group_of(object: &Value) -> &str {
    let api_version = str_at(object, "apiVersion");
    api_version
        .split_once('/')
        .map(|(group, _)| group)
        .unwrap_or("")
}

/// `object.kind`, or `""`.
pub(crate) fn kind_of(object: &Value) -> &str {
    str_at(object, "kind")
}

/// Whether `object` is a `kind` of `group`.
pub(crate) fn is(object: &Value, group: &str, kind: &str) -> bool {
    kind_of(object) == kind && group_of(object) == group
}

/// Path of the pod template (`PodTemplateSpec`) inside a workload of the built-in kinds that
/// carry one: `spec.template` for Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and
/// ReplicationControllers, `spec.jobTemplate.spec.template` for CronJobs; `None` for others.
pub(crate) fn pod_template_path(object: &Value) -> Option<&'static [&'static str]> {
    match (group_of(object), kind_of(object)) {
        ("apps", "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet")
        | ("batch", "Job")
        | ("", "ReplicationController") => Some(&["spec", "template"]),
        ("batch", "CronJob") => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// The object at `path` below `value`, if every step exists.
pub(crate) fn value_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(*key))
}

/// The string member `key` of `value`, or `""`.
pub(crate) fn str_at<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The object at `path` below `value`, if every step is an object.
pub(crate) fn object_at_mut<'a>(
    value: &'a mut Value,
    path: &[&str],
) -> Option<&'a mut Map<String, Value>> {
    path.iter()
        .try_fold(value, |v, key| v.get_mut(*key))?
        .as_object_mut()
}

/// The object at `path` below `value`, created (replacing non-objects) where missing.
pub(crate) fn object_at_or_insert<'a>(
    value: &'a mut Value,
    path: &[&str],
) -> &'a mut Map<String, Value> {
    let mut current = value;
    for key in path {
        if !current.is_object() {
            *current = Value::Object(Map::new());
        }
        current = current
            .as_object_mut()
            .expect("just made an object")
            .entry(*key)
            .or_insert_with(|| Value::Object(Map::new()));
    }
    if !current.is_object() {
        *current = Value::Object(Map::new());
    }
    current.as_object_mut().expect("just made an object")
}

/// Removes `key` from the object at `path`, then removes that object from its parent if it
/// became empty (so `metadata.annotations: {}` does not linger).
pub(crate) fn remove_and_prune(value: &mut Value, path: &[&str], key: &str) -> Option<Value> {
    let removed = object_at_mut(value, path)?.remove(key);
    if let Some((last, parent)) = path.split_last() {
        if let Some(parent) = object_at_mut(value, parent) {
            if parent
                .get(*last)
                .and_then(Value::as_object)
                .is_some_and(Map::is_empty)
            {
                parent.remove(*last);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_read_group_kind_namespace_name() {
        let cases = [
            (
                json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "shop"}}),
                ("apps", "Deployment", "shop", "web"),
                "Deployment.apps shop/web",
            ),
            (
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "shop"}}),
                ("", "ConfigMap", "shop", "c"),
                "ConfigMap shop/c",
            ),
            (
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"}}),
                ("storage.k8s.io", "StorageClass", "", "fast"),
                "StorageClass.storage.k8s.io fast",
            ),
            (json!({}), ("", "", "", ""), " "),
        ];
        for (object, (group, kind, namespace, name), shown) in cases {
            let key = ObjectKey::of(&object);
            assert_eq!(
                (
                    key.group.as_str(),
                    key.kind.as_str(),
                    key.namespace.as_str(),
                    key.name.as_str()
                ),
                (group, kind, namespace, name),
                "{object}"
            );
            assert_eq!(key.to_string(), shown);
        }
    }

    #[test]
    fn remove_and_prune_drops_emptied_parents_only() {
        let mut v = json!({"metadata": {"annotations": {"a": "1"}, "name": "x"}});
        assert_eq!(
            remove_and_prune(&mut v, &["metadata", "annotations"], "a"),
            Some(json!("1"))
        );
        assert_eq!(v, json!({"metadata": {"name": "x"}}));
        let mut v = json!({"metadata": {"annotations": {"a": "1", "b": "2"}}});
        remove_and_prune(&mut v, &["metadata", "annotations"], "a");
        assert_eq!(v, json!({"metadata": {"annotations": {"b": "2"}}}));
        assert_eq!(remove_and_prune(&mut v, &["spec"], "x"), None);
    }
}
