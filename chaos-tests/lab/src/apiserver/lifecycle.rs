//! What writes imply beyond the object itself: finalizers and deletionTimestamp, garbage
//! collection through ownerReferences, namespace termination, and CRD establishment.
//!
//! Follows the Kubernetes docs "Finalizers", "Garbage Collection" (propagation policies) and
//! "Namespaces" (termination), and apiextensions' Established condition. Differences: the
//! lab collects garbage synchronously inside the delete request instead of in a background
//! controller, and Foreground deletion removes dependents before the owner without the
//! `foregroundDeletion` finalizer being visible.

use std::sync::Arc;

use lab_apimachinery::status::ApiError;

use super::errors;
use serde::Deserialize;
use serde_json::{json, Value};

use super::objects::{self, meta_str, name_of};
use super::registry::ResourceInfo;
use super::store::{object_key, Mutation, Store, StoreError};
use super::verbs::{internal, update_with};
use super::ApiState;

const NAMESPACES: &str = "core/namespaces";
const CRDS: &str = "apiextensions.k8s.io/customresourcedefinitions";
const PODS: &str = "core/pods";

/// `metav1.DeleteOptions`, the parts the lab honours.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct DeleteOptions {
    /// `Orphan`, `Background` (default) or `Foreground`.
    pub propagation_policy: Option<String>,
    /// Conditions the object must meet to be deleted.
    pub preconditions: Option<Preconditions>,
    /// Seconds a pod gets to stop before it is killed; `0` removes it at once. Defaults to the
    /// pod's `terminationGracePeriodSeconds` (30).
    pub grace_period_seconds: Option<i64>,
}

/// `metav1.Preconditions`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Preconditions {
    /// The object's uid must equal this.
    pub uid: Option<String>,
    /// The object's resourceVersion must equal this.
    pub resource_version: Option<String>,
}

/// How deleting an owner treats its dependents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Propagation {
    /// Dependents lose the ownerReference and stay.
    Orphan,
    /// Dependents are deleted after the owner.
    Background,
    /// Dependents are deleted before the owner.
    Foreground,
}

impl Propagation {
    fn parse(p: Option<&str>) -> Result<Self, ApiError> {
        match p {
            None | Some("Background") => Ok(Self::Background),
            Some("Orphan") => Ok(Self::Orphan),
            Some("Foreground") => Ok(Self::Foreground),
            Some(other) => Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: {other:?}: supported values: \"Foreground\", \"Background\", \"Orphan\""
            ))),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        internal(e)
    }
}

/// Refuses writes into a namespace that is absent (404) or terminating (403), as the
/// NamespaceLifecycle admission plugin does.
///
/// # Errors
/// 404 NotFound or 403 Forbidden naming the namespace.
pub fn check_namespace_open(store: &Store, namespace: &str) -> Result<(), ApiError> {
    let ns = store
        .get(&object_key(NAMESPACES, "", namespace))?
        .ok_or_else(|| ApiError::not_found("", "namespaces", namespace))?;
    if ns["metadata"].get("deletionTimestamp").is_some() {
        return Err(ApiError::forbidden(
            "",
            "namespaces",
            namespace,
            &format!("unable to create new content in namespace {namespace} because it is being terminated"),
        ));
    }
    Ok(())
}

/// The annotation that marks the cluster's default StorageClass.
pub const ANN_DEFAULT_CLASS: &str = "storageclass.kubernetes.io/is-default-class";
const STORAGE_CLASSES: &str = "storage.k8s.io/storageclasses";

/// Gives a new PersistentVolumeClaim without `spec.storageClassName` the default
/// StorageClass, as the DefaultStorageClass admission plugin does, so captured claims name
/// their class as on a cluster. An explicit `""` (no class) is left alone.
///
/// # Errors
/// [`ApiError`] when the StorageClasses cannot be read.
pub fn admit_default_storage_class(
    store: &Store,
    info: &ResourceInfo,
    obj: &mut Value,
) -> Result<(), ApiError> {
    let is_claim = info.group.is_empty() && info.plural == "persistentvolumeclaims";
    if !is_claim
        || !obj["spec"]
            .get("storageClassName")
            .is_none_or(Value::is_null)
    {
        return Ok(());
    }
    let (classes, _) = store.list(&format!("{STORAGE_CLASSES}/"))?;
    let default = classes.iter().find_map(|(_, class)| {
        (class["metadata"]["annotations"][ANN_DEFAULT_CLASS] == "true")
            .then(|| class["metadata"]["name"].clone())
    });
    if let (Some(class), Some(spec)) = (default, obj["spec"].as_object_mut()) {
        spec.insert("storageClassName".into(), class);
    }
    Ok(())
}

/// The StorageClasses, read before a PersistentVolumeClaim update (the store is locked while
/// the update is computed), for [`admit_claim_resize`]; empty for any other resource.
///
/// # Errors
/// [`ApiError`] when the StorageClasses cannot be read.
pub fn classes_for_resize(store: &Store, info: &ResourceInfo) -> Result<Vec<Value>, ApiError> {
    if !(info.group.is_empty() && info.plural == "persistentvolumeclaims") {
        return Ok(Vec::new());
    }
    let (classes, _) = store.list(&format!("{STORAGE_CLASSES}/"))?;
    Ok(classes.into_iter().map(|(_, c)| c).collect())
}

/// A PersistentVolumeClaim's storage request may change only as the API server lets it:
/// never down (422, `field can not be less than previous value`), up only for a bound claim
/// (422 otherwise) whose StorageClass has `allowVolumeExpansion: true` (403, the
/// PersistentVolumeClaimResize admission plugin's message). See "Expanding Persistent Volumes
/// Claims" in the Kubernetes docs.
///
/// # Errors
/// [`ApiError`] 422 or 403 as above.
pub fn admit_claim_resize(
    classes: &[Value],
    info: &ResourceInfo,
    old: &Value,
    next: &Value,
) -> Result<(), ApiError> {
    if !(info.group.is_empty() && info.plural == "persistentvolumeclaims") {
        return Ok(());
    }
    let request = |o: &Value| {
        o["spec"]["resources"]["requests"]["storage"]
            .as_str()
            .and_then(|q| ferry_runtime::quantity::parse_quantity(q).ok())
    };
    let (Some(before), Some(after)) = (request(old), request(next)) else {
        return Ok(());
    };
    if after == before {
        return Ok(());
    }
    let name = name_of(old);
    let field = "spec.resources.requests.storage";
    if after < before {
        return Err(errors::invalid_field(
            "",
            "PersistentVolumeClaim",
            name,
            field,
            "Forbidden: field can not be less than previous value",
        ));
    }
    if old["status"]["phase"] != "Bound" {
        return Err(errors::invalid_field(
            "",
            "PersistentVolumeClaim",
            name,
            "spec",
            "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims",
        ));
    }
    let class = old["spec"]["storageClassName"].as_str().unwrap_or_default();
    let expandable = classes
        .iter()
        .any(|c| c["metadata"]["name"] == class && c["allowVolumeExpansion"] == json!(true));
    if !expandable {
        return Err(ApiError::forbidden(
            "",
            "persistentvolumeclaims",
            name,
            "only dynamically provisioned pvc can be resized and the storageclass that provisions the pvc must support resize",
        ));
    }
    Ok(())
}

/// Kind-specific validation of built-in objects the lab relies on (CRDs must be well formed
/// before they can be served).
///
/// # Errors
/// 422 Invalid naming the field.
pub fn check_builtin(info: &ResourceInfo, obj: &Value) -> Result<(), ApiError> {
    if info.storage_prefix() != CRDS {
        return Ok(());
    }
    let invalid = |field: &str, detail: String| {
        errors::invalid_field(&info.group, &info.kind, name_of(obj), field, &detail)
    };
    let spec = &obj["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    if group.is_empty() {
        return Err(invalid("spec.group", "Required value".into()));
    }
    if plural.is_empty() {
        return Err(invalid("spec.names.plural", "Required value".into()));
    }
    if spec["names"]["kind"]
        .as_str()
        .unwrap_or_default()
        .is_empty()
    {
        return Err(invalid("spec.names.kind", "Required value".into()));
    }
    if name_of(obj) != format!("{plural}.{group}") {
        return Err(invalid(
            "metadata.name",
            format!(
                "Invalid value: {:?}: must be spec.names.plural+\".\"+spec.group",
                name_of(obj)
            ),
        ));
    }
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    if versions.is_empty() {
        return Err(invalid(
            "spec.versions",
            "Invalid value: []: must have exactly one version marked as storage version".into(),
        ));
    }
    let storage = versions
        .iter()
        .filter(|v| v["storage"] == json!(true))
        .count();
    if storage != 1 {
        return Err(invalid(
            "spec.versions",
            format!(
                "Invalid value: {storage}: must have exactly one version marked as storage version"
            ),
        ));
    }
    Ok(())
}

/// Carries out what a stored write implies and returns the object as finally stored: a CRD
/// starts (or keeps) being served and gets its Established condition.
///
/// # Errors
/// 500 on storage failure.
pub fn after_write(
    state: &Arc<ApiState>,
    info: &ResourceInfo,
    stored: Value,
) -> Result<Value, ApiError> {
    if info.storage_prefix() != CRDS || stored["metadata"].get("deletionTimestamp").is_some() {
        return Ok(stored);
    }
    state.registry.install_crd(&stored);
    let established = stored["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Established" && c["status"] == "True")
    }) && stored["status"]["acceptedNames"] == stored["spec"]["names"];
    if established {
        return Ok(stored);
    }
    let now = objects::now_rfc3339();
    let storage_version = stored["spec"]["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["storage"] == json!(true)))
        .and_then(|v| v["name"].as_str())
        .unwrap_or_default()
        .to_string();
    update_with(state, info, "", name_of(&stored), |old| {
        let mut next = old.clone();
        next["status"] = json!({
            "acceptedNames": old["spec"]["names"],
            "storedVersions": [storage_version],
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
            ],
        });
        Ok((Mutation::Put(next), false))
    })
}

/// Serves every CRD found in the store; called once at start-up.
///
/// # Errors
/// [`StoreError`] when the store cannot be read.
pub fn serve_stored_crds(state: &ApiState) -> Result<(), StoreError> {
    let (crds, _) = state.store.list(&format!("{CRDS}/"))?;
    for (_, crd) in crds {
        if crd["metadata"].get("deletionTimestamp").is_none() {
            state.registry.install_crd(&crd);
        }
    }
    Ok(())
}

/// Deletes one object: marks it (deletionTimestamp) while finalizers remain, or removes it
/// and collects its dependents. Namespaces are marked Terminating and emptied first.
/// Returns the object as marked or as last stored.
///
/// # Errors
/// 404 when absent, 409 when a precondition fails, 400 for an unknown propagation policy.
pub fn delete(
    state: &Arc<ApiState>,
    info: &ResourceInfo,
    namespace: &str,
    name: &str,
    options: &DeleteOptions,
) -> Result<Value, ApiError> {
    let propagation = Propagation::parse(options.propagation_policy.as_deref())?;
    let prefix = info.storage_prefix();
    let key = object_key(&prefix, namespace, name);
    let (obj, removed) = state.store.mutate(&key, &prefix, namespace, |old| {
        let old = old.ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))?;
        if let Some(pre) = &options.preconditions {
            let uid_ok = pre.uid.as_deref().is_none_or(|u| Some(u) == meta_str(&old, "uid"));
            let rv_ok = pre.resource_version.as_deref().is_none_or(|r| Some(r) == meta_str(&old, "resourceVersion"));
            if !uid_ok || !rv_ok {
                return Err(errors::conflict(format!(
                    "Operation cannot be fulfilled on {} {name:?}: Precondition failed: UID or ResourceVersion in precondition does not match",
                    info.plural
                )));
            }
        }
        // Pods end gracefully: a scheduled, running pod is only marked, with its grace period,
        // and the kubelet removes it (grace 0) once its processes have stopped.
        if prefix == PODS && old["metadata"].get("deletionTimestamp").is_none() {
            let grace = options.grace_period_seconds.unwrap_or_else(|| {
                old["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30)
            });
            let scheduled = old["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty());
            let terminal = matches!(old["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
            if grace > 0 && scheduled && !terminal {
                let mut next = old.clone();
                next["metadata"]["deletionTimestamp"] = json!(objects::now_rfc3339());
                next["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
                return Ok((Mutation::Put(next), false));
            }
        }
        let marking = prefix == NAMESPACES || !objects::finalizers(&old).is_empty();
        if !marking {
            return Ok((Mutation::Delete, true));
        }
        if old["metadata"].get("deletionTimestamp").is_some() {
            return Ok((Mutation::Keep, false));
        }
        let mut next = old.clone();
        next["metadata"]["deletionTimestamp"] = json!(objects::now_rfc3339());
        next["metadata"]["deletionGracePeriodSeconds"] = json!(0);
        if prefix == NAMESPACES {
            next["status"]["phase"] = json!("Terminating");
        }
        Ok((Mutation::Put(next), false))
    })?;
    let obj = obj.ok_or_else(|| ApiError::not_found(&info.group, &info.plural, name))?;
    if removed {
        after_remove(state, &prefix, &obj, propagation)?;
    } else if prefix == NAMESPACES {
        purge_namespace(state, name)?;
    }
    Ok(obj)
}

/// Deletes an object found by storage key parts, with the default options (used for
/// dependents and namespace contents, whose resource may not be served at this moment).
fn delete_stored(
    state: &Arc<ApiState>,
    prefix: &str,
    obj: &Value,
    propagation: Propagation,
) -> Result<(), ApiError> {
    let namespace = meta_str(obj, "namespace").unwrap_or_default();
    let key = object_key(prefix, namespace, name_of(obj));
    let (last, removed) = state.store.mutate(&key, prefix, namespace, |old| {
        let Some(old) = old else {
            return Ok::<_, ApiError>((Mutation::Keep, false));
        };
        if objects::finalizers(&old).is_empty() {
            return Ok((Mutation::Delete, true));
        }
        if old["metadata"].get("deletionTimestamp").is_some() {
            return Ok((Mutation::Keep, false));
        }
        let mut next = old;
        next["metadata"]["deletionTimestamp"] = json!(objects::now_rfc3339());
        Ok((Mutation::Put(next), false))
    })?;
    if let (Some(last), true) = (last, removed) {
        after_remove(state, prefix, &last, propagation)?;
    }
    Ok(())
}

/// Everything stored, as (storage prefix, object). Keys are `<group>/<plural>/<ns>/<name>`.
fn everything(store: &Store) -> Result<Vec<(String, Value)>, ApiError> {
    let (all, _) = store.list("")?;
    Ok(all
        .into_iter()
        .filter_map(|(key, obj)| {
            let mut parts = key.splitn(3, '/');
            let prefix = format!("{}/{}", parts.next()?, parts.next()?);
            Some((prefix, obj))
        })
        .collect())
}

/// Carries out the consequences of an object's removal: its dependents are collected per
/// `propagation`, a removed CRD takes its custom resources with it, and a terminating
/// namespace that is now empty goes away.
///
/// # Errors
/// 500 on storage failure.
pub fn after_remove(
    state: &Arc<ApiState>,
    prefix: &str,
    removed: &Value,
    propagation: Propagation,
) -> Result<(), ApiError> {
    if let Some(uid) = meta_str(removed, "uid") {
        for (dep_prefix, dep) in everything(&state.store)? {
            let refs = dep["metadata"]["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !refs.iter().any(|r| r["uid"].as_str() == Some(uid)) {
                continue;
            }
            if propagation == Propagation::Orphan {
                let ns = meta_str(&dep, "namespace").unwrap_or_default().to_string();
                let key = object_key(&dep_prefix, &ns, name_of(&dep));
                state.store.mutate(&key, &dep_prefix, &ns, |old| {
                    let Some(mut next) = old else {
                        return Ok::<_, ApiError>((Mutation::Keep, ()));
                    };
                    if let Some(list) = next["metadata"]["ownerReferences"].as_array_mut() {
                        list.retain(|r| r["uid"].as_str() != Some(uid));
                    }
                    Ok((Mutation::Put(next), ()))
                })?;
            } else {
                delete_stored(state, &dep_prefix, &dep, propagation)?;
            }
        }
    }
    if prefix == CRDS {
        state.registry.remove_crd(removed);
        let group = removed["spec"]["group"].as_str().unwrap_or_default();
        let plural = removed["spec"]["names"]["plural"]
            .as_str()
            .unwrap_or_default();
        let cr_prefix = format!("{group}/{plural}");
        let (crs, _) = state.store.list(&format!("{cr_prefix}/"))?;
        for (_, cr) in crs {
            // Custom resources go with their definition, finalizers or not (the lab does not
            // wait for controllers that may no longer exist).
            let ns = meta_str(&cr, "namespace").unwrap_or_default().to_string();
            state.store.mutate(
                &object_key(&cr_prefix, &ns, name_of(&cr)),
                &cr_prefix,
                &ns,
                |_| Ok::<_, ApiError>((Mutation::Delete, ())),
            )?;
        }
    }
    if let Some(ns) = meta_str(removed, "namespace").filter(|n| !n.is_empty()) {
        finish_namespace(state, ns)?;
    }
    Ok(())
}

/// Deletes everything in a terminating namespace, then the namespace once it is empty.
fn purge_namespace(state: &Arc<ApiState>, namespace: &str) -> Result<(), ApiError> {
    for (prefix, obj) in everything(&state.store)? {
        if prefix != NAMESPACES && meta_str(&obj, "namespace") == Some(namespace) {
            delete_stored(state, &prefix, &obj, Propagation::Background)?;
        }
    }
    finish_namespace(state, namespace)
}

/// Removes a terminating namespace that has nothing left in it.
fn finish_namespace(state: &Arc<ApiState>, namespace: &str) -> Result<(), ApiError> {
    let key = object_key(NAMESPACES, "", namespace);
    let Some(ns) = state.store.get(&key)? else {
        return Ok(());
    };
    if ns["metadata"].get("deletionTimestamp").is_none() {
        return Ok(());
    }
    let occupied = everything(&state.store)?
        .iter()
        .any(|(p, o)| p != NAMESPACES && meta_str(o, "namespace") == Some(namespace));
    if !occupied {
        state.store.mutate(&key, NAMESPACES, "", |old| {
            Ok::<_, ApiError>((
                if old.is_some() {
                    Mutation::Delete
                } else {
                    Mutation::Keep
                },
                (),
            ))
        })?;
    }
    Ok(())
}
