//! Quiescing an app at a site: scale its workloads to zero and suspend its CronJobs,
//! recording the original values in annotations so they can be restored (here, if the
//! migration is abandoned, or at the target by the `Restore` replicas rule).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use ferry_manifests::label_selector_query;
use ferry_manifests::{ORIGINAL_REPLICAS_ANNOTATION, ORIGINAL_SUSPEND_ANNOTATION};

/// The selector as a `labelSelector` query, or an error naming it.
fn query(selector: &LabelSelector) -> Result<String, kube::Error> {
    label_selector_query(selector).map_err(|e| kube::Error::Service(e.to_string().into()))
}

/// Scales every Deployment and StatefulSet of the app (`selector` in `namespace`) to zero and
/// suspends its CronJobs. Idempotent: an original count already recorded is kept, and what is
/// already quiesced is not written again.
///
/// # Errors
/// The first API error, naming nothing more than kube does; callers retry.
pub async fn quiesce(
    client: &Client,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<(), kube::Error> {
    let params = ListParams::default().labels(&query(selector)?);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for d in deployments.list(&params).await? {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        scale_down(&deployments, &d.name_any(), d.annotations(), replicas).await?;
    }
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    for s in statefulsets.list(&params).await? {
        let replicas = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        scale_down(&statefulsets, &s.name_any(), s.annotations(), replicas).await?;
    }
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), namespace);
    for c in cronjobs.list(&params).await? {
        let suspended = c.spec.as_ref().and_then(|s| s.suspend) == Some(true);
        if suspended && c.annotations().contains_key(ORIGINAL_SUSPEND_ANNOTATION) {
            continue; // already quiesced: no write
        }
        let mut patch = json!({"spec": {"suspend": true}});
        if !c.annotations().contains_key(ORIGINAL_SUSPEND_ANNOTATION) {
            let suspended = c.spec.as_ref().and_then(|s| s.suspend).unwrap_or(false);
            patch["metadata"] =
                json!({"annotations": {ORIGINAL_SUSPEND_ANNOTATION: suspended.to_string()}});
        }
        cronjobs
            .patch(
                &c.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
    }
    Ok(())
}

async fn scale_down<K>(
    api: &Api<K>,
    name: &str,
    annotations: &BTreeMap<String, String>,
    replicas: i32,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if replicas == 0 && annotations.contains_key(ORIGINAL_REPLICAS_ANNOTATION) {
        return Ok(()); // already quiesced: no write
    }
    let mut patch = json!({"spec": {"replicas": 0}});
    if !annotations.contains_key(ORIGINAL_REPLICAS_ANNOTATION) {
        patch["metadata"] =
            json!({"annotations": {ORIGINAL_REPLICAS_ANNOTATION: replicas.to_string()}});
    }
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Undoes [`quiesce`]: restores the recorded counts and suspend flags and drops the
/// annotations (a migration abandoned before promotion).
///
/// # Errors
/// The first API error.
pub async fn resume(
    client: &Client,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<(), kube::Error> {
    let params = ListParams::default().labels(&query(selector)?);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for d in deployments.list(&params).await? {
        restore(&deployments, &d.name_any(), d.annotations()).await?;
    }
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    for s in statefulsets.list(&params).await? {
        restore(&statefulsets, &s.name_any(), s.annotations()).await?;
    }
    Ok(())
}

async fn restore<K>(
    api: &Api<K>,
    name: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if let Some(count) = annotations
        .get(ORIGINAL_REPLICAS_ANNOTATION)
        .and_then(|c| c.parse::<i32>().ok())
    {
        let patch = json!({"metadata": {"annotations": {ORIGINAL_REPLICAS_ANNOTATION: null}}, "spec": {"replicas": count}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(())
}

/// Pods of the app's workloads that still exist (any phase but Succeeded/Failed): the source
/// is quiet only when this is empty.
///
/// # Errors
/// The API error.
pub async fn running_pods(
    client: &Client,
    namespace: &str,
    selector: &LabelSelector,
) -> Result<Vec<String>, kube::Error> {
    let params = ListParams::default().labels(&query(selector)?);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut names = Vec::new();
    let mut selectors = Vec::new();
    for d in Api::<Deployment>::namespaced(client.clone(), namespace)
        .list(&params)
        .await?
    {
        if let Some(spec) = d.spec {
            selectors.push(spec.selector);
        }
    }
    for s in Api::<StatefulSet>::namespaced(client.clone(), namespace)
        .list(&params)
        .await?
    {
        if let Some(spec) = s.spec {
            selectors.push(spec.selector);
        }
    }
    for selector in selectors {
        for pod in pods
            .list(&ListParams::default().labels(&query(&selector)?))
            .await?
        {
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            if phase != "Succeeded" && phase != "Failed" {
                names.push(pod.name_any());
            }
        }
    }
    Ok(names)
}
