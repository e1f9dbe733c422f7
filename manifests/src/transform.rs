//! Rewrites sanitised objects for the destination as the DRPair's `spec.transform` says, and
//! parks workloads for a warm standby.

use std::collections::BTreeMap;

use ferry_schemas::drpair::{LabelTransform, ReplicaPolicy, ResourcePatch, Transform};
use serde_json::{Map, Value};

use super::object::{
    group_of, is, object_at_mut, object_at_or_insert, pod_template_path, remove_and_prune, str_at,
    ObjectKey,
};

pub use ferry_schemas::contract::{ORIGINAL_REPLICAS_ANNOTATION, ORIGINAL_SUSPEND_ANNOTATION};

/// Errors rewriting manifests. Each names the object or patch at fault.
#[derive(Debug, thiserror::Error)]
pub enum TransformError {
    /// `replicas.policy: Fixed` without `replicas.count`.
    #[error("spec.transform.replicas: policy Fixed needs a count")]
    FixedWithoutCount,
    /// [`ORIGINAL_REPLICAS_ANNOTATION`] or [`ORIGINAL_SUSPEND_ANNOTATION`] holds something
    /// that is not a replica count, or not a boolean.
    #[error("{object}: annotation {annotation} is not valid: {value:?}")]
    BadAnnotation {
        /// The object carrying it.
        object: Box<ObjectKey>,
        /// The annotation's key.
        annotation: &'static str,
        /// Its value.
        value: String,
    },
    /// Removing label `key` left a workload's or Service's selector empty: it would select
    /// every pod in the namespace (and the API rejects an empty workload selector).
    #[error("{object}: removing label {key:?} empties {field}")]
    SelectorEmptied {
        /// The workload or Service.
        object: Box<ObjectKey>,
        /// The removed label key.
        key: String,
        /// The selector's field path, e.g. `spec.selector`.
        field: &'static str,
    },
    /// `spec.transform.patches[index]` is not a valid RFC 6902 patch (an operation lacks
    /// `value` or `from`, or a path is not a JSON Pointer).
    #[error("spec.transform.patches[{index}] ({kind}.{group}) is not a valid JSON patch")]
    InvalidPatch {
        /// Index in `spec.transform.patches`.
        index: usize,
        /// Target group ("" for core).
        group: String,
        /// Target kind.
        kind: String,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// An operation of a patch failed on an object (a `test` that did not match, a path that
    /// does not exist, ...). The object is left as it was before the patch.
    #[error("spec.transform.patches[{index}] operation {operation} failed on {object}")]
    PatchFailed {
        /// Index in `spec.transform.patches`.
        index: usize,
        /// Index of the failing operation within the patch.
        operation: usize,
        /// The object: group, kind, namespace and name.
        object: Box<ObjectKey>,
        /// The JSON-patch error.
        #[source]
        source: json_patch::PatchError,
    },
}

impl TransformError {
    /// Stable, low-cardinality label for metrics and Events.
    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::FixedWithoutCount => "fixed_without_count",
            Self::BadAnnotation { .. } => "bad_annotation",
            Self::SelectorEmptied { .. } => "selector_emptied",
            Self::InvalidPatch { .. } => "invalid_patch",
            Self::PatchFailed { .. } => "patch_failed",
        }
    }
}

/// Rewrites sanitised objects for instantiation at the destination, applying the DRPair's
/// `spec.transform` in the order its documentation gives: labels, replicas, storage classes,
/// then `patches` in list order. Objects keep their order; none are added or removed.
///
/// There is no separate "source replicas" input: the count a workload had at the source is
/// its own `spec.replicas`, or [`ORIGINAL_REPLICAS_ANNOTATION`] when the source had been
/// scaled down by Ferry (quiesced for a migration), which travels inside the object.
///
/// - **Labels** (`labels.set`, then `labels.remove`): on `metadata.labels` of every object,
///   and on the pod template's labels of Deployments, StatefulSets, DaemonSets, ReplicaSets,
///   Jobs, ReplicationControllers (`spec.template.metadata.labels`) and CronJobs
///   (`spec.jobTemplate.spec.template.metadata.labels`). Selectors follow, so a workload
///   still selects its pods and a Service its endpoints: in a workload's `spec.selector`
///   (a metav1 `LabelSelector`; CronJob: `spec.jobTemplate.spec.selector`) a set key that the
///   selector uses becomes `matchLabels[key] = value`, replacing any `matchExpressions` on that
///   key, and a removed key disappears from both; in a Service's or ReplicationController's
///   map selector a set key that is present takes the new value and a removed key goes. Keys a
///   selector does not use are not added to it.
/// - **Replicas** of Deployments, StatefulSets and ReplicaSets (group `apps`):
///   [`ReplicaPolicy::Restore`] sets `spec.replicas` from [`ORIGINAL_REPLICAS_ANNOTATION`] when
///   present, else keeps the captured `spec.replicas`; `Fixed` sets `count`; both remove the
///   annotation, and both give Jobs and CronJobs back the `spec.suspend` recorded in
///   [`ORIGINAL_SUSPEND_ANNOTATION`], if any. `Zero` parks every workload as [`standby`] does,
///   so the count to scale back up to stays in the annotation. `count` is ignored unless the
///   policy is `Fixed` (validation rejects it there).
/// - **Storage classes** (`storageClassMap`, source name → destination name): PVC
///   `spec.storageClassName`, StatefulSet `spec.volumeClaimTemplates[].spec.storageClassName`,
///   and the legacy `volume.beta.kubernetes.io/storage-class` annotation on either. Unlisted
///   names, and claims without a class, are left alone.
/// - **Patches**: each RFC 6902 patch is applied (with the `json-patch` crate, all operations
///   or none) to every object whose API group (`""` for core, from `apiVersion`) and kind
///   match, and whose `metadata.name` matches when `name` is given. A patch matching nothing is
///   not an error.
///
/// # Errors
/// [`TransformError::FixedWithoutCount`]; [`TransformError::BadAnnotation`] for an
/// unparsable [`ORIGINAL_REPLICAS_ANNOTATION`] or [`ORIGINAL_SUSPEND_ANNOTATION`];
/// [`TransformError::SelectorEmptied`] when a removed label was a selector's only term;
/// [`TransformError::InvalidPatch`] and [`TransformError::PatchFailed`] (naming the patch, the
/// operation index and the object). On error nothing is returned: the caller has no
/// half-transformed set.
pub fn transform(mut objects: Vec<Value>, t: &Transform) -> Result<Vec<Value>, TransformError> {
    let replicas = match t.replicas.policy {
        ReplicaPolicy::Restore => Replicas::Restore,
        ReplicaPolicy::Fixed => {
            Replicas::Fixed(t.replicas.count.ok_or(TransformError::FixedWithoutCount)?)
        }
        ReplicaPolicy::Zero => Replicas::Zero,
    };
    for object in &mut objects {
        apply_labels(object, &t.labels)?;
        apply_replicas(object, replicas)?;
        apply_storage_classes(object, &t.storage_class_map);
    }
    for (index, resource_patch) in t.patches.iter().enumerate() {
        apply_patch(&mut objects, index, resource_patch)?;
    }
    Ok(objects)
}

/// Parks an application for a warm standby (`standby: Applied`): its objects can be applied
/// at the destination without anything running. Deployments, StatefulSets and ReplicaSets get
/// `spec.replicas: 0`, the count to scale back up to kept in [`ORIGINAL_REPLICAS_ANNOTATION`]
/// (`spec.replicas` before parking, 1 when unset as the API defaults it); CronJobs and Jobs
/// get `spec.suspend: true`, the previous value kept in [`ORIGINAL_SUSPEND_ANNOTATION`].
/// An annotation that is already there is kept, so parking twice changes nothing. Other
/// objects, DaemonSets included (they cannot be scaled), are returned unchanged.
///
/// Use it on the output of [`transform`]; a later `transform` with
/// [`ReplicaPolicy::Restore`] on the parked objects brings the counts back.
#[must_use]
pub fn standby(mut objects: Vec<Value>) -> Vec<Value> {
    for object in &mut objects {
        park(object);
    }
    objects
}

#[derive(Clone, Copy, Debug)]
enum Replicas {
    Restore,
    Fixed(i32),
    Zero,
}

fn is_scalable(object: &Value) -> bool {
    group_of(object) == "apps"
        && matches!(
            str_at(object, "kind"),
            "Deployment" | "StatefulSet" | "ReplicaSet"
        )
}

fn is_suspendable(object: &Value) -> bool {
    is(object, "batch", "CronJob") || is(object, "batch", "Job")
}

fn annotation<'a>(object: &'a Value, key: &str) -> Option<&'a str> {
    object["metadata"]["annotations"][key].as_str()
}

fn set_annotation(object: &mut Value, key: &str, value: String) {
    object_at_or_insert(object, &["metadata", "annotations"]).insert(key.into(), value.into());
}

fn park(object: &mut Value) {
    if is_scalable(object) {
        if annotation(object, ORIGINAL_REPLICAS_ANNOTATION).is_none() {
            let replicas = object["spec"]["replicas"].as_i64().unwrap_or(1);
            set_annotation(object, ORIGINAL_REPLICAS_ANNOTATION, replicas.to_string());
        }
        object_at_or_insert(object, &["spec"]).insert("replicas".into(), 0.into());
    } else if is_suspendable(object) {
        if annotation(object, ORIGINAL_SUSPEND_ANNOTATION).is_none() {
            let suspended = object["spec"]["suspend"].as_bool().unwrap_or(false);
            set_annotation(object, ORIGINAL_SUSPEND_ANNOTATION, suspended.to_string());
        }
        object_at_or_insert(object, &["spec"]).insert("suspend".into(), true.into());
    }
}

fn apply_replicas(object: &mut Value, replicas: Replicas) -> Result<(), TransformError> {
    if let Replicas::Zero = replicas {
        park(object);
        return Ok(());
    }
    if is_scalable(object) {
        let original = annotation(object, ORIGINAL_REPLICAS_ANNOTATION)
            .map(|value| {
                value
                    .parse::<i32>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| TransformError::BadAnnotation {
                        object: Box::new(ObjectKey::of(object)),
                        annotation: ORIGINAL_REPLICAS_ANNOTATION,
                        value: value.to_string(),
                    })
            })
            .transpose()?;
        let count = match replicas {
            Replicas::Fixed(count) => Some(count),
            _ => original,
        };
        remove_and_prune(
            object,
            &["metadata", "annotations"],
            ORIGINAL_REPLICAS_ANNOTATION,
        );
        if let Some(count) = count {
            object_at_or_insert(object, &["spec"]).insert("replicas".into(), count.into());
        }
    } else if is_suspendable(object) {
        if let Some(value) = annotation(object, ORIGINAL_SUSPEND_ANNOTATION) {
            let suspend = value
                .parse::<bool>()
                .map_err(|_| TransformError::BadAnnotation {
                    object: Box::new(ObjectKey::of(object)),
                    annotation: ORIGINAL_SUSPEND_ANNOTATION,
                    value: value.to_string(),
                })?;
            remove_and_prune(
                object,
                &["metadata", "annotations"],
                ORIGINAL_SUSPEND_ANNOTATION,
            );
            object_at_or_insert(object, &["spec"]).insert("suspend".into(), suspend.into());
        }
    }
    Ok(())
}

fn relabel(labels: &mut Map<String, Value>, t: &LabelTransform) {
    for (key, value) in &t.set {
        labels.insert(key.clone(), value.clone().into());
    }
    for key in &t.remove {
        labels.remove(key);
    }
}

/// Applies `t` to the label map at `path`, creating it if needed and dropping it if emptied.
fn relabel_at(object: &mut Value, path: &[&str], t: &LabelTransform) {
    relabel(object_at_or_insert(object, path), t);
    if object_at_mut(object, path).is_some_and(|m| m.is_empty()) {
        let (last, parent) = path.split_last().expect("label paths are not empty");
        remove_and_prune(object, parent, last);
    }
}

fn apply_labels(object: &mut Value, t: &LabelTransform) -> Result<(), TransformError> {
    if t.is_empty() {
        return Ok(());
    }
    relabel_at(object, &["metadata", "labels"], t);
    if let Some(template) = pod_template_path(object) {
        if object_at_mut(object, template).is_some() {
            let mut path = template.to_vec();
            path.extend(["metadata", "labels"]);
            relabel_at(object, &path, t);
        }
    }
    let workload = pod_template_path(object).is_some();
    match (group_of(object), str_at(object, "kind")) {
        ("batch", "CronJob") => {
            rewrite_label_selector(object, &["spec", "jobTemplate", "spec", "selector"], t)?;
        }
        ("", "ReplicationController" | "Service") => rewrite_map_selector(object, t)?,
        _ if workload => rewrite_label_selector(object, &["spec", "selector"], t)?,
        _ => {}
    }
    Ok(())
}

/// Rewrites the metav1 `LabelSelector` at `path` for the label transform `t`.
fn rewrite_label_selector(
    object: &mut Value,
    path: &[&str],
    t: &LabelTransform,
) -> Result<(), TransformError> {
    let key = Box::new(ObjectKey::of(object));
    let Some(selector) = object_at_mut(object, path) else {
        return Ok(());
    };
    let non_empty = |s: &Map<String, Value>| {
        ["matchLabels", "matchExpressions"]
            .iter()
            .any(|f| match s.get(*f) {
                Some(Value::Object(m)) => !m.is_empty(),
                Some(Value::Array(a)) => !a.is_empty(),
                _ => false,
            })
    };
    let was_selecting = non_empty(selector);
    let mut expressions = match selector.remove("matchExpressions") {
        Some(Value::Array(e)) => e,
        _ => Vec::new(),
    };
    let mut match_labels = match selector.remove("matchLabels") {
        Some(Value::Object(m)) => m,
        _ => Map::new(),
    };
    let mentions = |e: &Value, k: &str| str_at(e, "key") == k;
    for (k, v) in &t.set {
        let used = match_labels.contains_key(k) || expressions.iter().any(|e| mentions(e, k));
        if used {
            expressions.retain(|e| !mentions(e, k));
            match_labels.insert(k.clone(), v.clone().into());
        }
    }
    let mut emptied_by = None;
    for k in &t.remove {
        let used = match_labels.remove(k).is_some() || expressions.iter().any(|e| mentions(e, k));
        expressions.retain(|e| !mentions(e, k));
        if used {
            emptied_by = Some(k.clone());
        }
    }
    if !match_labels.is_empty() {
        selector.insert("matchLabels".into(), Value::Object(match_labels));
    }
    if !expressions.is_empty() {
        selector.insert("matchExpressions".into(), Value::Array(expressions));
    }
    if was_selecting && !non_empty(selector) {
        return Err(TransformError::SelectorEmptied {
            object: key,
            key: emptied_by.unwrap_or_default(),
            field: if path.len() == 2 {
                "spec.selector"
            } else {
                "spec.jobTemplate.spec.selector"
            },
        });
    }
    Ok(())
}

/// Rewrites the map selector at `spec.selector` (Service, ReplicationController).
fn rewrite_map_selector(object: &mut Value, t: &LabelTransform) -> Result<(), TransformError> {
    let key = Box::new(ObjectKey::of(object));
    let Some(selector) = object_at_mut(object, &["spec", "selector"]) else {
        return Ok(());
    };
    let was_selecting = !selector.is_empty();
    for (k, v) in &t.set {
        if let Some(old) = selector.get_mut(k) {
            *old = v.clone().into();
        }
    }
    let mut emptied_by = None;
    for k in &t.remove {
        if selector.remove(k).is_some() {
            emptied_by = Some(k.clone());
        }
    }
    if was_selecting && selector.is_empty() {
        return Err(TransformError::SelectorEmptied {
            object: key,
            key: emptied_by.unwrap_or_default(),
            field: "spec.selector",
        });
    }
    Ok(())
}

const LEGACY_STORAGE_CLASS_ANNOTATION: &str = "volume.beta.kubernetes.io/storage-class";

fn map_claim_class(claim: &mut Value, map: &BTreeMap<String, String>) {
    if let Some(spec) = object_at_mut(claim, &["spec"]) {
        if let Some(Value::String(class)) = spec.get_mut("storageClassName") {
            if let Some(new) = map.get(class.as_str()) {
                *class = new.clone();
            }
        }
    }
    if let Some(annotations) = object_at_mut(claim, &["metadata", "annotations"]) {
        if let Some(Value::String(class)) = annotations.get_mut(LEGACY_STORAGE_CLASS_ANNOTATION) {
            if let Some(new) = map.get(class.as_str()) {
                *class = new.clone();
            }
        }
    }
}

fn apply_storage_classes(object: &mut Value, map: &BTreeMap<String, String>) {
    if map.is_empty() {
        return;
    }
    if is(object, "", "PersistentVolumeClaim") {
        map_claim_class(object, map);
    } else if is(object, "apps", "StatefulSet") {
        if let Some(Value::Array(templates)) = object
            .get_mut("spec")
            .and_then(|s| s.get_mut("volumeClaimTemplates"))
        {
            for template in templates {
                map_claim_class(template, map);
            }
        }
    }
}

fn apply_patch(
    objects: &mut [Value],
    index: usize,
    rp: &ResourcePatch,
) -> Result<(), TransformError> {
    let ops = serde_json::to_value(&rp.patch)
        .and_then(serde_json::from_value::<json_patch::Patch>)
        .map_err(|source| TransformError::InvalidPatch {
            index,
            group: rp.group.clone(),
            kind: rp.kind.clone(),
            source,
        })?;
    for object in objects.iter_mut() {
        let matches = group_of(object) == rp.group
            && str_at(object, "kind") == rp.kind
            && rp
                .name
                .as_deref()
                .is_none_or(|name| str_at(&object["metadata"], "name") == name);
        if !matches {
            continue;
        }
        json_patch::patch(object, &ops.0).map_err(|source| TransformError::PatchFailed {
            index,
            operation: source.operation,
            object: Box::new(ObjectKey::of(object)),
            source,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_schemas::drpair::{JsonPatchOperation, PatchOp, ReplicasTransform};
    use serde_json::json;

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "shop", "tier": "web", "site": "a"}},
            "spec": {"replicas": 3,
                     "selector": {"matchLabels": {"app": "shop", "tier": "web"},
                                  "matchExpressions": [{"key": "site", "operator": "In", "values": ["a"]}]},
                     "template": {"metadata": {"labels": {"app": "shop", "tier": "web", "site": "a"}},
                                  "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}],
                                           "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}}
        })
    }

    fn statefulset() -> Value {
        json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "db", "namespace": "shop", "labels": {"app": "shop"},
                         "annotations": {ORIGINAL_REPLICAS_ANNOTATION: "2"}},
            "spec": {"replicas": 0, "serviceName": "db",
                     "selector": {"matchLabels": {"app": "shop", "tier": "db"}},
                     "template": {"metadata": {"labels": {"app": "shop", "tier": "db"}},
                                  "spec": {"containers": [{"name": "pg", "image": "postgres:16"}]}},
                     "volumeClaimTemplates": [
                        {"metadata": {"name": "pgdata"},
                         "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                                  "resources": {"requests": {"storage": "10Gi"}}}},
                        {"metadata": {"name": "wal", "annotations": {LEGACY_STORAGE_CLASS_ANNOTATION: "fast"}},
                         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}
        })
    }

    fn service(headless: bool) -> Value {
        let mut s = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": if headless {"db"} else {"web"}, "namespace": "shop", "labels": {"app": "shop"}},
            "spec": {"selector": {"app": "shop", "tier": if headless {"db"} else {"web"}}, "ports": [{"port": 80}]}
        });
        if headless {
            s["spec"]["clusterIP"] = json!("None");
        }
        s
    }

    fn pvc() -> Value {
        json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": "data", "namespace": "shop"},
            "spec": {"storageClassName": "fast", "accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}
        })
    }

    fn cronjob() -> Value {
        json!({
            "apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": "report", "namespace": "shop", "labels": {"app": "shop"}},
            "spec": {"schedule": "*/5 * * * *", "suspend": false,
                     "jobTemplate": {"spec": {"template": {"metadata": {"labels": {"app": "shop", "tier": "batch"}},
                                                           "spec": {"restartPolicy": "Never",
                                                                    "containers": [{"name": "r", "image": "busybox"}]}}}}}
        })
    }

    fn configmap() -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "settings", "namespace": "shop", "labels": {"app": "shop"}},
               "data": {"LOG_LEVEL": "info"}})
    }

    fn secret() -> Value {
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "creds", "namespace": "shop"},
               "data": {"password": "aHVudGVyMg=="}})
    }

    fn custom_resource() -> Value {
        json!({"apiVersion": "shop.example.com/v1", "kind": "Catalog",
               "metadata": {"name": "main", "namespace": "shop", "labels": {"app": "shop"}},
               "spec": {"currency": "EUR", "replicas": 5}})
    }

    fn app() -> Vec<Value> {
        vec![
            deployment(),
            statefulset(),
            service(false),
            service(true),
            pvc(),
            cronjob(),
            configmap(),
            secret(),
            custom_resource(),
        ]
    }

    fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {objects:#?}"))
    }

    fn labels(set: &[(&str, &str)], remove: &[&str]) -> LabelTransform {
        LabelTransform {
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
        }
    }

    fn op(op: PatchOp, path: &str, value: Option<Value>) -> JsonPatchOperation {
        JsonPatchOperation {
            op,
            path: path.into(),
            value,
            from: None,
        }
    }

    #[test]
    fn empty_transform_restores_replicas_and_changes_nothing_else() {
        let out = transform(app(), &Transform::default()).unwrap();
        let mut want = app();
        // The StatefulSet was quiesced at the source: its original count comes back.
        want[1]["spec"]["replicas"] = json!(2);
        want[1]["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("annotations");
        assert_eq!(out, want);
    }

    #[test]
    fn labels_are_rewritten_on_objects_templates_and_selectors() {
        let t = Transform {
            labels: labels(&[("site", "b"), ("env", "dr")], &["tier"]),
            ..Default::default()
        };
        let out = transform(app(), &t).unwrap();
        let relabelled = json!({"app": "shop", "site": "b", "env": "dr"});

        let d = find(&out, "Deployment", "web");
        assert_eq!(d["metadata"]["labels"], relabelled);
        assert_eq!(d["spec"]["template"]["metadata"]["labels"], relabelled);
        // tier removed, the expression on site replaced by site=b, env not added.
        assert_eq!(
            d["spec"]["selector"],
            json!({"matchLabels": {"app": "shop", "site": "b"}})
        );

        let sts = find(&out, "StatefulSet", "db");
        assert_eq!(
            sts["spec"]["selector"],
            json!({"matchLabels": {"app": "shop"}})
        );
        assert_eq!(sts["spec"]["template"]["metadata"]["labels"], relabelled);

        let cj = find(&out, "CronJob", "report");
        assert_eq!(
            cj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"],
            relabelled
        );

        let svc = find(&out, "Service", "web");
        assert_eq!(svc["spec"]["selector"], json!({"app": "shop"}));
        assert_eq!(svc["metadata"]["labels"], relabelled);

        // Objects without labels get the set ones; data is untouched.
        let creds = find(&out, "Secret", "creds");
        assert_eq!(
            creds["metadata"]["labels"],
            json!({"site": "b", "env": "dr"})
        );
        assert_eq!(creds["data"], secret()["data"]);
        let cr = find(&out, "Catalog", "main");
        assert_eq!(cr["spec"], custom_resource()["spec"]);
    }

    #[test]
    fn set_keys_used_by_a_selector_take_the_new_value() {
        let t = Transform {
            labels: labels(&[("tier", "front")], &[]),
            ..Default::default()
        };
        let out = transform(vec![deployment(), service(false)], &t).unwrap();
        assert_eq!(
            out[0]["spec"]["selector"]["matchLabels"],
            json!({"app": "shop", "tier": "front"})
        );
        assert_eq!(
            out[0]["spec"]["template"]["metadata"]["labels"]["tier"],
            "front"
        );
        assert_eq!(
            out[1]["spec"]["selector"],
            json!({"app": "shop", "tier": "front"})
        );
    }

    #[test]
    fn labels_emptied_by_remove_are_dropped() {
        let t = Transform {
            labels: labels(&[], &["app"]),
            ..Default::default()
        };
        let out = transform(vec![configmap()], &t).unwrap();
        assert_eq!(
            out[0]["metadata"],
            json!({"name": "settings", "namespace": "shop"})
        );
    }

    #[test]
    fn selector_keys_not_used_are_not_added() {
        let t = Transform {
            labels: labels(&[("env", "dr")], &[]),
            ..Default::default()
        };
        let out = transform(vec![deployment(), service(false)], &t).unwrap();
        assert_eq!(out[0]["spec"]["selector"], deployment()["spec"]["selector"]);
        assert_eq!(
            out[1]["spec"]["selector"],
            service(false)["spec"]["selector"]
        );
        assert_eq!(
            out[0]["spec"]["template"]["metadata"]["labels"]["env"],
            "dr"
        );
    }

    #[test]
    fn removing_the_only_selector_label_is_an_error() {
        let t = Transform {
            labels: labels(&[], &["app", "tier"]),
            ..Default::default()
        };
        let err = transform(vec![configmap(), service(false)], &t).unwrap_err();
        assert!(
            matches!(&err, TransformError::SelectorEmptied { object, field: "spec.selector", .. }
                if object.kind == "Service" && object.name == "web"),
            "{err:?}"
        );
        let err = transform(
            vec![deployment()],
            &Transform {
                labels: labels(&[], &["app", "tier", "site"]),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.metric_label(), "selector_emptied");
        assert!(
            err.to_string()
                .starts_with("Deployment.apps shop/web: removing label"),
            "{err}"
        );
    }

    #[test]
    fn replica_policies() {
        // (policy, count, replicas of [Deployment, StatefulSet], their annotations)
        type Case = (
            ReplicaPolicy,
            Option<i32>,
            [Option<i64>; 2],
            [Option<&'static str>; 2],
        );
        let cases: [Case; 3] = [
            // Deployment keeps its captured 3; the quiesced StatefulSet gets its 2 back.
            (
                ReplicaPolicy::Restore,
                None,
                [Some(3), Some(2)],
                [None, None],
            ),
            (
                ReplicaPolicy::Fixed,
                Some(1),
                [Some(1), Some(1)],
                [None, None],
            ),
            // Zero parks: the count to restore stays in the annotation.
            (
                ReplicaPolicy::Zero,
                None,
                [Some(0), Some(0)],
                [Some("3"), Some("2")],
            ),
        ];
        for (policy, count, replicas, annotations) in cases {
            let t = Transform {
                replicas: ReplicasTransform { policy, count },
                ..Default::default()
            };
            let out = transform(vec![deployment(), statefulset(), custom_resource()], &t).unwrap();
            for i in 0..2 {
                assert_eq!(
                    out[i]["spec"]["replicas"].as_i64(),
                    replicas[i],
                    "{policy:?} {i}"
                );
                assert_eq!(
                    out[i]["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION].as_str(),
                    annotations[i],
                    "{policy:?} {i}"
                );
            }
            // A custom resource's spec.replicas is not ours to change.
            assert_eq!(out[2], custom_resource(), "{policy:?}");
        }
        let fixed_without_count = Transform {
            replicas: ReplicasTransform {
                policy: ReplicaPolicy::Fixed,
                count: None,
            },
            ..Default::default()
        };
        assert!(matches!(
            transform(app(), &fixed_without_count),
            Err(TransformError::FixedWithoutCount)
        ));
    }

    #[test]
    fn bad_original_replicas_annotation_is_an_error() {
        let mut sts = statefulset();
        sts["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION] = json!("two");
        let err = transform(vec![sts], &Transform::default()).unwrap_err();
        assert!(
            matches!(&err, TransformError::BadAnnotation { value, .. } if value == "two"),
            "{err:?}"
        );
    }

    #[test]
    fn storage_classes_are_mapped_on_claims_and_claim_templates() {
        let t = Transform {
            storage_class_map: BTreeMap::from([("fast".to_string(), "dr-ssd".to_string())]),
            ..Default::default()
        };
        let mut other = pvc();
        other["metadata"]["name"] = json!("other");
        other["spec"]["storageClassName"] = json!("slow");
        let out = transform(vec![pvc(), statefulset(), other], &t).unwrap();
        assert_eq!(out[0]["spec"]["storageClassName"], "dr-ssd");
        let templates = &out[1]["spec"]["volumeClaimTemplates"];
        assert_eq!(templates[0]["spec"]["storageClassName"], "dr-ssd");
        assert_eq!(
            templates[1]["metadata"]["annotations"][LEGACY_STORAGE_CLASS_ANNOTATION],
            "dr-ssd"
        );
        assert!(templates[1]["spec"].get("storageClassName").is_none());
        assert_eq!(out[2]["spec"]["storageClassName"], "slow");
    }

    #[test]
    fn patches_apply_to_matching_group_kind_and_name() {
        let t = Transform {
            patches: vec![
                ResourcePatch {
                    group: "apps".into(),
                    kind: "Deployment".into(),
                    name: Some("web".into()),
                    patch: vec![op(
                        PatchOp::Replace,
                        "/spec/template/spec/containers/0/image",
                        Some(json!("registry.dr.example.com/nginx:1.27")),
                    )],
                },
                ResourcePatch {
                    group: String::new(),
                    kind: "ConfigMap".into(),
                    name: None,
                    patch: vec![op(PatchOp::Add, "/data/SITE", Some(json!("dr")))],
                },
                ResourcePatch {
                    // Matches nothing: not an error.
                    group: "apps".into(),
                    kind: "Deployment".into(),
                    name: Some("absent".into()),
                    patch: vec![op(PatchOp::Remove, "/spec/nothing", None)],
                },
            ],
            ..Default::default()
        };
        let out = transform(app(), &t).unwrap();
        assert_eq!(
            find(&out, "Deployment", "web")["spec"]["template"]["spec"]["containers"][0]["image"],
            "registry.dr.example.com/nginx:1.27"
        );
        assert_eq!(
            find(&out, "ConfigMap", "settings")["data"],
            json!({"LOG_LEVEL": "info", "SITE": "dr"})
        );
        // The core-group patch does not touch a custom resource or a Secret.
        assert_eq!(find(&out, "Secret", "creds"), &secret());
    }

    #[test]
    fn failing_patch_names_the_object_and_operation() {
        let t = Transform {
            patches: vec![ResourcePatch {
                group: "apps".into(),
                kind: "StatefulSet".into(),
                name: None,
                patch: vec![
                    op(PatchOp::Replace, "/spec/serviceName", Some(json!("db-dr"))),
                    op(
                        PatchOp::Test,
                        "/spec/podManagementPolicy",
                        Some(json!("Parallel")),
                    ),
                ],
            }],
            ..Default::default()
        };
        let err = transform(app(), &t).unwrap_err();
        match &err {
            TransformError::PatchFailed {
                index: 0,
                operation: 1,
                object,
                ..
            } => assert_eq!(object.to_string(), "StatefulSet.apps shop/db"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "spec.transform.patches[0] operation 1 failed on StatefulSet.apps shop/db"
        );

        let invalid = Transform {
            patches: vec![ResourcePatch {
                group: String::new(),
                kind: "ConfigMap".into(),
                name: None,
                patch: vec![op(PatchOp::Add, "/data/x", None)],
            }],
            ..Default::default()
        };
        assert!(matches!(
            transform(app(), &invalid),
            Err(TransformError::InvalidPatch { index: 0, .. })
        ));
    }

    #[test]
    fn standby_parks_workloads_and_restore_brings_them_back() {
        let mut suspended = cronjob();
        suspended["metadata"]["name"] = json!("paused");
        suspended["spec"]["suspend"] = json!(true);
        let active = transform(
            vec![
                deployment(),
                statefulset(),
                cronjob(),
                suspended,
                configmap(),
            ],
            &Transform::default(),
        )
        .unwrap();
        let parked = standby(active.clone());

        assert_eq!(parked[0]["spec"]["replicas"], 0);
        assert_eq!(
            parked[0]["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION],
            "3"
        );
        assert_eq!(parked[1]["spec"]["replicas"], 0);
        assert_eq!(
            parked[1]["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION],
            "2"
        );
        assert_eq!(parked[2]["spec"]["suspend"], true);
        assert_eq!(
            parked[2]["metadata"]["annotations"][ORIGINAL_SUSPEND_ANNOTATION],
            "false"
        );
        assert_eq!(
            parked[3]["metadata"]["annotations"][ORIGINAL_SUSPEND_ANNOTATION],
            "true"
        );
        assert_eq!(parked[4], configmap());
        assert_eq!(
            standby(parked.clone()),
            parked,
            "parking twice changes nothing"
        );

        let restored = transform(parked, &Transform::default()).unwrap();
        assert_eq!(restored, active);
    }

    #[test]
    fn standby_defaults_unset_replicas_to_one() {
        let mut d = deployment();
        d["spec"].as_object_mut().unwrap().remove("replicas");
        let parked = standby(vec![d]);
        assert_eq!(
            parked[0]["metadata"]["annotations"][ORIGINAL_REPLICAS_ANNOTATION],
            "1"
        );
    }
}
