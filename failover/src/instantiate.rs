//! Standing an app up at a site from a committed generation: its manifests (kept by the
//! replicator in a Secret), transformed by the pair's rules, with every PVC created from the
//! generation's VolumeSnapshot (`dataSource`), applied in dependency order (after Velero's
//! restore priorities) with server-side apply.

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::DeleteParams;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde_json::Value;

use ferry_manifests::{plan_instantiation, Instantiation, ManifestBundle};
use ferry_schemas::contract::{manifests_secret, MANIFESTS_KEY};
use ferry_schemas::DRPair;

/// Field manager of everything the controller applies.
pub const MANAGER: &str = ferry_runtime::Component::Controller.manager();

/// Failures instantiating; each names the object.
#[derive(Debug, thiserror::Error)]
pub enum InstantiateError {
    /// The generation's manifests are missing or unreadable.
    #[error("manifests of generation {generation}: {message}")]
    Manifests {
        /// The generation.
        generation: u64,
        /// What is wrong.
        message: String,
    },
    /// The pair's transform could not be applied.
    #[error("spec.transform: {0}")]
    Transform(String),
    /// Applying an object failed.
    #[error("applying {kind} {namespace}/{name}: {message}")]
    Apply {
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API's message.
        message: String,
    },
}

/// The transformed objects of `generation` of `pair`, PVCs pointing at the generation's
/// snapshots, grouped in creation waves.
///
/// # Errors
/// [`InstantiateError::Manifests`] or [`InstantiateError::Transform`].
pub async fn plan(
    target: &Client,
    pair: &DRPair,
    namespace: &str,
    generation: u64,
) -> Result<Vec<Vec<Value>>, InstantiateError> {
    let pair_name = pair.metadata.name.clone().unwrap_or_default();
    let secret_name = manifests_secret(&pair_name, generation);
    let missing = |message: String| InstantiateError::Manifests {
        generation,
        message,
    };
    let secret = Api::<Secret>::namespaced(target.clone(), namespace)
        .get_opt(&secret_name)
        .await
        .map_err(|e| missing(format!("reading Secret {namespace}/{secret_name}: {e}")))?
        .ok_or_else(|| missing(format!("Secret {namespace}/{secret_name} not found")))?;
    let bytes = secret
        .data
        .and_then(|d| d.get(MANIFESTS_KEY).cloned())
        .ok_or_else(|| missing(format!("Secret {secret_name} has no {MANIFESTS_KEY}")))?;
    let bundle = ManifestBundle::from_json_bytes(&bytes.0).map_err(|e| missing(e.to_string()))?;
    plan_instantiation(
        bundle.objects,
        &pair_name,
        namespace,
        &pair.spec.transform,
        Instantiation::Run { generation },
    )
    .map_err(|e| InstantiateError::Transform(e.to_string()))
}

/// Applies `waves` at `target` with server-side apply (manager [`MANAGER`], forced).
///
/// # Errors
/// [`InstantiateError::Apply`] naming the first object refused.
pub async fn apply(target: &Client, waves: &[Vec<Value>]) -> Result<(), InstantiateError> {
    for wave in waves {
        for object in wave {
            apply_one(target, object).await?;
        }
    }
    Ok(())
}

/// A PVC left at the target by an earlier stay of the app there holds stale data and an
/// immutable spec: it is replaced by one created from this generation's snapshot. A PVC
/// already created from the same snapshot (a resumed instantiation) is kept.
async fn replace_stale_claim(client: &Client, object: &Value) -> Result<(), String> {
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let Some(existing) = api.get_opt(name).await.map_err(|e| e.to_string())? else {
        return Ok(());
    };
    let wanted = object["spec"]["dataSource"]["name"].as_str();
    let has = existing
        .spec
        .as_ref()
        .and_then(|s| s.data_source.as_ref())
        .map(|d| d.name.as_str());
    if has == wanted {
        return Ok(());
    }
    let uid = existing.metadata.uid.clone().unwrap_or_default();
    api.delete(name, &DeleteParams::default())
        .await
        .map_err(|e| format!("deleting the stale PVC: {e}"))?;
    tokio::time::timeout(
        std::time::Duration::from_secs(120),
        await_condition(api, name, conditions::is_deleted(&uid)),
    )
    .await
    .map_err(|_| "the stale PVC was not deleted within 120s".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(())
}

async fn apply_one(client: &Client, object: &Value) -> Result<(), InstantiateError> {
    let kind = object["kind"].as_str().unwrap_or_default().to_string();
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let fail = |message: String| InstantiateError::Apply {
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
        message,
    };
    if kind == "PersistentVolumeClaim" {
        replace_stale_claim(client, object).await.map_err(&fail)?;
    }
    ferry_manifests::apply_object(client, object, MANAGER)
        .await
        .map_err(|e| fail(e.message))
}

/// Workloads among `waves` that are not ready yet at `target`: `kind/name (ready/wanted)`.
///
/// # Errors
/// The API error.
pub async fn not_ready(
    target: &Client,
    namespace: &str,
    waves: &[Vec<Value>],
) -> Result<Vec<String>, kube::Error> {
    let mut waiting = Vec::new();
    for object in waves.iter().flatten() {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let (wanted, ready, observed, generation) = match object["kind"].as_str() {
            Some("Deployment") => {
                let Some(d) = Api::<Deployment>::namespaced(target.clone(), namespace)
                    .get_opt(name)
                    .await?
                else {
                    waiting.push(format!("Deployment/{name} (missing)"));
                    continue;
                };
                let status = d.status.unwrap_or_default();
                (
                    d.spec.and_then(|s| s.replicas).unwrap_or(1),
                    status.ready_replicas.unwrap_or(0),
                    status.observed_generation,
                    d.metadata.generation,
                )
            }
            Some("StatefulSet") => {
                let Some(s) = Api::<StatefulSet>::namespaced(target.clone(), namespace)
                    .get_opt(name)
                    .await?
                else {
                    waiting.push(format!("StatefulSet/{name} (missing)"));
                    continue;
                };
                let status = s.status.unwrap_or_default();
                (
                    s.spec.and_then(|s| s.replicas).unwrap_or(1),
                    status.ready_replicas.unwrap_or(0),
                    status.observed_generation,
                    s.metadata.generation,
                )
            }
            _ => continue,
        };
        if ready < wanted || observed < generation {
            waiting.push(format!(
                "{}/{name} ({ready}/{wanted} ready)",
                object["kind"].as_str().unwrap_or_default()
            ));
        }
    }
    Ok(waiting)
}
