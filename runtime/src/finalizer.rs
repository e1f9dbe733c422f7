//! Adding and removing one finalizer on an object, as the Kubernetes "Finalizers" documentation
//! describes them: a key in `metadata.finalizers` that holds an object's deletion until the
//! component that put it there has done its cleanup and removes it.
//!
//! Both calls replace the object read just before (a PUT carrying its `resourceVersion`), so
//! a concurrent change to the list (another component's finalizer) makes the API server answer
//! 409 Conflict instead of losing that change; the caller reads again and retries.

use kube::api::PostParams;
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Adds `finalizer` to `object` (as read from `api`) unless it is there or the object is
/// already being deleted (finalizers cannot be added then). Returns whether it wrote.
///
/// # Errors
/// The API's error: 409 when `object` is stale, 403 without `update` permission.
pub async fn add<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    if object.meta().deletion_timestamp.is_some() || has(object, finalizer) {
        return Ok(false);
    }
    let mut changed = object.clone();
    changed.finalizers_mut().push(finalizer.to_string());
    api.replace(&object.name_any(), &PostParams::default(), &changed)
        .await?;
    Ok(true)
}

/// Removes `finalizer` from `object` (as read from `api`) if it is there. Returns whether it
/// wrote; once the last finalizer of an object being deleted goes, the object goes.
///
/// # Errors
/// The API's error: 409 when `object` is stale, 404 when it is already gone.
pub async fn remove<K>(api: &Api<K>, object: &K, finalizer: &str) -> Result<bool, kube::Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    if !has(object, finalizer) {
        return Ok(false);
    }
    let mut changed = object.clone();
    changed.finalizers_mut().retain(|f| f != finalizer);
    api.replace(&object.name_any(), &PostParams::default(), &changed)
        .await?;
    Ok(true)
}

/// Whether `object` carries `finalizer`.
pub fn has<K: Resource>(object: &K, finalizer: &str) -> bool {
    object
        .meta()
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|x| x == finalizer))
}
