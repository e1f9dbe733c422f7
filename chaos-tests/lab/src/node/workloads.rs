//! Workload controllers: Deployments, StatefulSets and Jobs become Pods, and their status
//! reports what the pods are doing.
//!
//! Follows the behaviour of kube-controller-manager's deployment, statefulset and job
//! controllers in the parts Ferry relies on (replica counts, readiness, scale to zero,
//! observedGeneration), with these simplifications, stated in docs/lab.md:
//! - a Deployment owns its Pods directly (no ReplicaSet), and a template change replaces
//!   every pod at once (as `strategy: Recreate`);
//! - a StatefulSet creates missing ordinals all together (as `podManagementPolicy:
//!   Parallel`), and its volumeClaimTemplates become PVCs `<template>-<set>-<ordinal>`
//!   that outlive the set, as on a cluster;
//! - a Job runs `parallelism` pods at a time until `completions` succeed, or fails after
//!   `backoffLimit` failures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::NodeContext;

/// Errors reconciling a workload.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// An API call failed.
    #[error("{action} for {kind} {namespace}/{name}")]
    Api {
        /// What was being done.
        action: &'static str,
        /// Workload kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The workload's selector cannot be used.
    #[error("{kind} {namespace}/{name} has an invalid selector")]
    Selector {
        /// Workload kind.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// Runs the three workload controllers until aborted.
pub async fn run(ctx: Arc<NodeContext>) {
    let client = ctx.client.clone();
    let pods = || Api::<Pod>::all(client.clone());
    let deployments = Controller::new(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(pods(), watcher::Config::default())
    .run(reconcile_deployment, error_policy, ctx.clone())
    .for_each(|_| async {});
    let statefulsets = Controller::new(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(pods(), watcher::Config::default())
    .run(reconcile_statefulset, error_policy, ctx.clone())
    .for_each(|_| async {});
    let jobs = Controller::new(Api::<Job>::all(client.clone()), watcher::Config::default())
        .owns(pods(), watcher::Config::default())
        .run(reconcile_job, error_policy, ctx.clone())
        .for_each(|_| async {});
    tokio::join!(deployments, statefulsets, jobs);
}

/// Logs a failed reconcile with its cause and retries it shortly.
fn error_policy<K>(_: Arc<K>, e: &WorkloadError, _: Arc<NodeContext>) -> Action {
    warn!(error = %e, cause = ?std::error::Error::source(e).map(|s| s.to_string()), "workload reconcile failed");
    Action::requeue(Duration::from_secs(1))
}

fn api_err<'a, K: Resource<DynamicType = ()>>(
    obj: &'a K,
    action: &'static str,
) -> impl FnOnce(kube::Error) -> WorkloadError + 'a {
    move |source| WorkloadError::Api {
        action,
        kind: static_kind::<K>(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        source,
    }
}

fn static_kind<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "Deployment" => "Deployment",
        "StatefulSet" => "StatefulSet",
        _ => "Job",
    }
}

/// A short stable hash of a pod template (`pod-template-hash`).
fn template_hash(t: &PodTemplateSpec) -> String {
    let bytes = serde_json::to_vec(t).expect("templates serialise");
    blake3::hash(&bytes).to_hex()[..10].to_string()
}

fn owner_ref<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    owner
        .controller_owner_ref(&())
        .expect("stored objects have a name and uid")
}

fn selector_string<K: Resource<DynamicType = ()>>(
    owner: &K,
    selector: Option<&LabelSelector>,
) -> Result<String, WorkloadError> {
    let value = serde_json::to_value(selector).unwrap_or_default();
    lab_apimachinery::selector::LabelSelector::from_label_selector_json(&value)
        .map(|s| s.to_string())
        .map_err(|_| WorkloadError::Selector {
            kind: static_kind::<K>(),
            namespace: owner.namespace().unwrap_or_default(),
            name: owner.name_any(),
        })
}

/// The live (not terminating) pods a workload controls.
async fn owned_pods<K: Resource<DynamicType = ()>>(
    ctx: &NodeContext,
    owner: &K,
    selector: &str,
) -> Result<Vec<Pod>, WorkloadError> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &owner.namespace().unwrap_or_default());
    let uid = owner.uid();
    let list = api
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(api_err(owner, "listing pods"))?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|r| Some(&r.uid) == uid.as_ref() && r.controller == Some(true))
        })
        .collect())
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// A pod built from a template, owned by `owner`.
fn pod_from_template<K: Resource<DynamicType = ()>>(
    owner: &K,
    template: &PodTemplateSpec,
    name: Option<String>,
    generate: Option<String>,
    extra_labels: BTreeMap<String, String>,
) -> Pod {
    let mut meta = template.metadata.clone().unwrap_or_default();
    meta.name = name;
    meta.generate_name = generate;
    meta.namespace = owner.namespace();
    meta.owner_references = Some(vec![owner_ref(owner)]);
    let mut labels = meta.labels.unwrap_or_default();
    labels.extend(extra_labels);
    meta.labels = Some(labels);
    Pod {
        metadata: meta,
        spec: template.spec.clone(),
        status: None,
    }
}

async fn delete_pod(ctx: &NodeContext, pod: &Pod) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    if let Err(e) = api.delete(&pod.name_any(), &DeleteParams::default()).await {
        warn!(pod = %pod.name_any(), error = %e, "deleting pod");
    }
}

async fn patch_status<K>(
    ctx: &NodeContext,
    obj: &K,
    status: serde_json::Value,
) -> Result<(), WorkloadError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .map(|_| ())
    .map_err(api_err(obj, "updating status"))
}

#[tracing::instrument(skip_all, fields(site = %ctx.site, namespace = %d.namespace().unwrap_or_default(), deployment = %d.name_any()))]
async fn reconcile_deployment(
    d: Arc<Deployment>,
    ctx: Arc<NodeContext>,
) -> Result<Action, WorkloadError> {
    let spec = d.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0) as usize;
    let selector = selector_string(d.as_ref(), Some(&spec.selector))?;
    let hash = template_hash(&spec.template);
    let pods = owned_pods(&ctx, d.as_ref(), &selector).await?;
    // A changed template replaces the old pods (Recreate).
    let (current, stale): (Vec<_>, Vec<_>) = pods
        .into_iter()
        .partition(|p| p.labels().get("pod-template-hash") == Some(&hash));
    for p in &stale {
        delete_pod(&ctx, p).await;
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    if current.len() < desired && stale.is_empty() {
        for _ in current.len()..desired {
            let pod = pod_from_template(
                d.as_ref(),
                &spec.template,
                None,
                Some(format!("{}-{hash}-", d.name_any())),
                BTreeMap::from([("pod-template-hash".into(), hash.clone())]),
            );
            api.create(&PostParams::default(), &pod)
                .await
                .map_err(api_err(d.as_ref(), "creating a pod"))?;
        }
    }
    if current.len() > desired {
        let mut newest_first = current.clone();
        newest_first.sort_by(|a, b| {
            b.creation_timestamp()
                .cmp(&a.creation_timestamp())
                .then(b.name_any().cmp(&a.name_any()))
        });
        for p in newest_first.iter().take(current.len() - desired) {
            delete_pod(&ctx, p).await;
        }
    }
    let live = current.len().min(desired.max(current.len()));
    let ready = current.iter().filter(|p| is_ready(p)).count().min(desired);
    let available = ready >= desired;
    let status = json!({
        "observedGeneration": d.metadata.generation,
        "replicas": live,
        "updatedReplicas": current.len(),
        "readyReplicas": ready,
        "availableReplicas": ready,
        "unavailableReplicas": desired.saturating_sub(ready),
        "conditions": [{"type": "Available", "status": if available { "True" } else { "False" }, "reason": if available { "MinimumReplicasAvailable" } else { "MinimumReplicasUnavailable" }}],
    });
    if differs(d.status.as_ref(), &status) {
        patch_status(&ctx, d.as_ref(), status).await?;
    }
    Ok(Action::await_change())
}

/// Whether writing `status` would change what is stored (avoids a write per reconcile).
fn differs<S: serde::Serialize>(current: Option<&S>, status: &serde_json::Value) -> bool {
    let current = serde_json::to_value(current).unwrap_or_default();
    status.as_object().into_iter().flatten().any(|(k, v)| {
        k != "conditions"
            && current.get(k) != Some(v)
            && !(v.is_number() && v.as_i64() == Some(0) && current.get(k).is_none())
    }) || (current
        .get("conditions")
        .and_then(|c| c.get(0))
        .and_then(|c| c.get("status"))
        != status
            .get("conditions")
            .and_then(|c| c.get(0))
            .and_then(|c| c.get("status")))
}

#[tracing::instrument(skip_all, fields(site = %ctx.site, namespace = %s.namespace().unwrap_or_default(), statefulset = %s.name_any()))]
async fn reconcile_statefulset(
    s: Arc<StatefulSet>,
    ctx: Arc<NodeContext>,
) -> Result<Action, WorkloadError> {
    let spec = s.spec.clone().unwrap_or_default();
    let desired = spec.replicas.unwrap_or(1).max(0) as usize;
    let selector = selector_string(s.as_ref(), Some(&spec.selector))?;
    let hash = template_hash(&spec.template);
    let ns = s.namespace().unwrap_or_default();
    let pods = owned_pods(&ctx, s.as_ref(), &selector).await?;
    let ordinal = |p: &Pod| {
        p.name_any()
            .rsplit_once('-')
            .and_then(|(_, o)| o.parse::<usize>().ok())
    };
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    for i in 0..desired {
        if pods.iter().any(|p| ordinal(p) == Some(i)) {
            continue;
        }
        let mut template = spec.template.clone();
        let pod_spec = template.spec.get_or_insert_with(Default::default);
        for claim in spec.volume_claim_templates.iter().flatten() {
            let tmpl_name = claim.name_any();
            let pvc_name = format!("{tmpl_name}-{}-{i}", s.name_any());
            if pvcs
                .get_opt(&pvc_name)
                .await
                .map_err(api_err(s.as_ref(), "reading a claim"))?
                .is_none()
            {
                let mut pvc = claim.clone();
                pvc.metadata.name = Some(pvc_name.clone());
                pvc.metadata.namespace = Some(ns.clone());
                let mut labels = pvc.metadata.labels.unwrap_or_default();
                labels.extend(spec.selector.match_labels.clone().unwrap_or_default());
                pvc.metadata.labels = Some(labels);
                pvc.status = None;
                pvcs.create(&PostParams::default(), &pvc)
                    .await
                    .map_err(api_err(s.as_ref(), "creating a claim"))?;
            }
            let vols = pod_spec.volumes.get_or_insert_with(Vec::new);
            vols.retain(|v| v.name != tmpl_name);
            vols.push(
                serde_json::from_value(
                    json!({"name": tmpl_name, "persistentVolumeClaim": {"claimName": pvc_name}}),
                )
                .expect("static volume shape"),
            );
        }
        let name = format!("{}-{i}", s.name_any());
        let labels = BTreeMap::from([
            ("controller-revision-hash".to_string(), hash.clone()),
            (
                "statefulset.kubernetes.io/pod-name".to_string(),
                name.clone(),
            ),
            ("apps.kubernetes.io/pod-index".to_string(), i.to_string()),
        ]);
        let pod = pod_from_template(s.as_ref(), &template, Some(name), None, labels);
        match api.create(&PostParams::default(), &pod).await {
            Ok(_) => {}
            // The previous pod of this ordinal is still being removed; the next event retries.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(api_err(s.as_ref(), "creating a pod")(e)),
        }
    }
    for p in pods
        .iter()
        .filter(|p| ordinal(p).is_none_or(|o| o >= desired))
    {
        delete_pod(&ctx, p).await;
    }
    let kept: Vec<&Pod> = pods
        .iter()
        .filter(|p| ordinal(p).is_some_and(|o| o < desired))
        .collect();
    let ready = kept.iter().filter(|p| is_ready(p)).count();
    let status = json!({
        "observedGeneration": s.metadata.generation,
        "replicas": kept.len(),
        "readyReplicas": ready,
        "currentReplicas": kept.len(),
        "updatedReplicas": kept.len(),
        "availableReplicas": ready,
        "currentRevision": hash,
        "updateRevision": hash,
    });
    if differs(s.status.as_ref(), &status) {
        patch_status(&ctx, s.as_ref(), status).await?;
    }
    Ok(Action::await_change())
}

#[tracing::instrument(skip_all, fields(site = %ctx.site, namespace = %j.namespace().unwrap_or_default(), job = %j.name_any()))]
async fn reconcile_job(j: Arc<Job>, ctx: Arc<NodeContext>) -> Result<Action, WorkloadError> {
    let spec = j.spec.clone().unwrap_or_default();
    if spec.suspend == Some(true) {
        return Ok(Action::await_change());
    }
    let completions = spec.completions.unwrap_or(1).max(0) as usize;
    let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
    let backoff_limit = spec.backoff_limit.unwrap_or(6).max(0) as usize;
    let selector = format!(
        "batch.kubernetes.io/controller-uid={}",
        j.uid().unwrap_or_default()
    );
    let pods = owned_pods(&ctx, j.as_ref(), &selector).await?;
    let succeeded = pods.iter().filter(|p| phase(p) == "Succeeded").count();
    let failed = pods.iter().filter(|p| phase(p) == "Failed").count();
    let active = pods
        .iter()
        .filter(|p| !matches!(phase(p), "Succeeded" | "Failed"))
        .count();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let finished = j
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        });
    if finished {
        return Ok(Action::await_change());
    }
    let mut status = json!({"active": active, "succeeded": succeeded, "failed": failed, "startTime": j.status.as_ref().and_then(|s| s.start_time.clone()).map(|t| serde_json::to_value(t).unwrap_or_default()).unwrap_or(json!(now))});
    if succeeded >= completions {
        status["completionTime"] = json!(now);
        status["conditions"] =
            json!([{"type": "Complete", "status": "True", "lastTransitionTime": now}]);
    } else if failed > backoff_limit {
        status["conditions"] = json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit", "lastTransitionTime": now}]);
    } else {
        let wanted = parallelism.min(completions - succeeded);
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &j.namespace().unwrap_or_default());
        for _ in active..wanted {
            let labels = BTreeMap::from([
                (
                    "batch.kubernetes.io/controller-uid".to_string(),
                    j.uid().unwrap_or_default(),
                ),
                ("batch.kubernetes.io/job-name".to_string(), j.name_any()),
                ("job-name".to_string(), j.name_any()),
            ]);
            let pod = pod_from_template(
                j.as_ref(),
                &spec.template,
                None,
                Some(format!("{}-", j.name_any())),
                labels,
            );
            api.create(&PostParams::default(), &pod)
                .await
                .map_err(api_err(j.as_ref(), "creating a pod"))?;
        }
    }
    if differs(j.status.as_ref(), &status) {
        patch_status(&ctx, j.as_ref(), status).await?;
    }
    Ok(Action::await_change())
}
