//! Deleting a DRPair (`spec.deletionPolicy`).
//!
//! At the pair's active site the replicator keeps the finalizer
//! [`PEER_RELEASE_FINALIZER`] on the DRPair. Deleting the pair there first tells the other site
//! (the `Release` RPC), which either keeps its generations and marks its DRPair `Detached`
//! (`Retain`, the default) or removes everything Ferry made for the pair (`Delete`); with
//! `Delete` this site then drops what it holds too (its block indexes, its movers). Only then
//! does the finalizer go and the DRPair with it.
//!
//! A peer that cannot be told holds the deletion, with `Ready=False` (`PeerReleasePending`)
//! naming it and the error, until it answers or an operator sets
//! [`RELEASE_WITHOUT_PEER_ANNOTATION`]. A DRPair deleted because its namespace is being deleted
//! always retains the copy: losing the app's namespace is exactly what the copy is for.
//!
//! At a site that holds the copy, the finalizer (left from a time the pair was active there)
//! is removed at once: deleting a copy's DRPair tells no one.

use kube::{Api, ResourceExt};
use serde_json::json;

use ferry_runtime::finalizer;
use ferry_runtime::volumes::{delete_snapshot, list_snapshots};
use ferry_schemas::conditions::{
    ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
};
use ferry_schemas::contract::{
    PAIR_LABEL, PEER_RELEASE_FINALIZER, RELEASE_WITHOUT_PEER_ANNOTATION, ROLE_LABEL,
};
use ferry_schemas::drpair::DeletionPolicy;
use ferry_schemas::proto::replication::{PairRef, ReleasePolicy, ReleaseRequest};
use ferry_schemas::{DRPair, Site};
use k8s_openapi::api::core::v1::Namespace;

use super::pairs::SiteContext;
use super::worker::{Next, RETRY};
use crate::destination::PairKey;

/// Puts the finalizer on a pair active at this site (not yet being deleted). A refusal is
/// logged; the next tick tries again.
pub async fn ensure_finalizer(api: &Api<DRPair>, pair: &DRPair, key: &PairKey) {
    if let Err(e) = finalizer::add(api, pair, PEER_RELEASE_FINALIZER).await {
        tracing::warn!(pair = %key, error = %e, "adding the peer-release finalizer");
    }
}

/// What deleting `pair` does to the copy, and why: the spec's policy, except `Retain` when
/// the pair's namespace is being deleted.
async fn policy_of(ctx: &SiteContext, pair: &DRPair, key: &PairKey) -> (DeletionPolicy, String) {
    let namespace = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&key.namespace)
        .await
        .ok()
        .flatten();
    if namespace.is_none_or(|ns| ns.metadata.deletion_timestamp.is_some()) {
        return (
            DeletionPolicy::Retain,
            format!("namespace {} deleted", key.namespace),
        );
    }
    (
        pair.spec.deletion_policy,
        format!("DRPair deleted at site {}", ctx.site),
    )
}

/// Finishes the deletion of `pair`, active at this site: tells the peer, cleans up here,
/// removes the finalizer. Returns what the worker does next ([`Next::Stop`] once done).
pub async fn finalize(ctx: &SiteContext, api: &Api<DRPair>, pair: &DRPair, key: &PairKey) -> Next {
    if !finalizer::has(pair, PEER_RELEASE_FINALIZER) {
        return Next::Stop;
    }
    let (policy, reason) = policy_of(ctx, pair, key).await;
    let skip = pair
        .annotations()
        .get(RELEASE_WITHOUT_PEER_ANNOTATION)
        .is_some_and(|v| v == "true");
    let peer = if pair.spec.primary_site == ctx.site {
        pair.spec.secondary_site.clone()
    } else {
        pair.spec.primary_site.clone()
    };
    if skip {
        let message = format!(
            "{RELEASE_WITHOUT_PEER_ANNOTATION} is set: deleted without telling site {peer}; its copy is left as it is"
        );
        ctx.status
            .event(pair, true, "ReleasedWithoutPeer", "Delete", message)
            .await;
    } else if let Err(message) = release_peer(ctx, pair, key, &peer, policy, &reason).await {
        let message = format!(
            "deletion waits to tell site {peer} (deletionPolicy {policy}): {message}; set annotation {RELEASE_WITHOUT_PEER_ANNOTATION}=true to delete without it"
        );
        let reported = pair
            .status
            .as_ref()
            .and_then(|s| T::Ready.find(&s.conditions))
            .is_some_and(|c| c.reason == R::PeerReleasePending.as_str());
        if !reported {
            ctx.status
                .event(pair, true, "PeerReleasePending", "Delete", message.clone())
                .await;
        }
        if let Err(e) = ctx
            .status
            .apply(
                &key.namespace,
                &key.name,
                json!({}),
                &[(T::Ready, S::False, R::PeerReleasePending, message)],
            )
            .await
        {
            tracing::warn!(pair = %key, error = %e, "writing DRPair status while deleting");
        }
        return Next::Wait(RETRY);
    }
    if policy == DeletionPolicy::Delete {
        if let Err(e) = ctx.movers.stop(&key.namespace, &key.name, "source").await {
            tracing::warn!(pair = %key, error = %e, "stopping source movers");
            return Next::Wait(RETRY);
        }
        if let Err(e) = ctx.hashes.remove_pair(&key.to_string()) {
            tracing::warn!(pair = %key, error = %e, "removing the pair's block indexes");
            return Next::Wait(RETRY);
        }
    }
    // The base snapshots changed block tracking keeps at the source are Ferry's own, whatever
    // the policy says about the copy at the peer.
    let selector = format!("{PAIR_LABEL}={},{ROLE_LABEL}=source", key.name);
    match list_snapshots(&ctx.client, &key.namespace, &selector).await {
        Ok(snapshots) => {
            for (name, _) in snapshots {
                if let Err(e) = delete_snapshot(&ctx.client, &key.namespace, &name).await {
                    tracing::warn!(pair = %key, error = %e, "deleting a base snapshot");
                    return Next::Wait(RETRY);
                }
            }
        }
        Err(e) => {
            tracing::warn!(pair = %key, error = %e, "listing base snapshots");
            return Next::Wait(RETRY);
        }
    }
    match finalizer::remove(api, pair, PEER_RELEASE_FINALIZER).await {
        Ok(_) => {
            tracing::info!(pair = %key, %policy, %reason, peer, "pair deleted; copy at the peer released");
            Next::Stop
        }
        Err(e) => {
            tracing::warn!(pair = %key, error = %e, "removing the peer-release finalizer");
            Next::Wait(std::time::Duration::ZERO)
        }
    }
}

/// Asks `peer`'s replicator to retain or delete its copy of `key`.
///
/// # Errors
/// A message naming the Site, the endpoint or the peer's answer.
async fn release_peer(
    ctx: &SiteContext,
    pair: &DRPair,
    key: &PairKey,
    peer: &str,
    policy: DeletionPolicy,
    reason: &str,
) -> Result<(), String> {
    let site = Api::<Site>::all(ctx.client.clone())
        .get_opt(peer)
        .await
        .map_err(|e| format!("reading Site {peer}: {e}"))?
        .ok_or_else(|| format!("Site {peer} not found"))?;
    let endpoint = site.spec.replicator_endpoint;
    let mut client = crate::transport::connect_peer(&endpoint, &ctx.tls)
        .map_err(|e| format!("replicator of site {peer} at {endpoint}: {e}"))?;
    let epoch = pair
        .status
        .as_ref()
        .and_then(|s| s.epoch)
        .map(|e| e.0)
        .unwrap_or(1);
    let reply = client
        .release(ReleaseRequest {
            pair: Some(PairRef {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
            }),
            epoch,
            source_site: ctx.site.clone(),
            policy: match policy {
                DeletionPolicy::Retain => ReleasePolicy::Retain,
                DeletionPolicy::Delete => ReleasePolicy::Delete,
            } as i32,
            reason: reason.to_string(),
        })
        .await
        .map_err(|s| format!("replicator of site {peer} at {endpoint}: {}", s.message()))?
        .into_inner();
    tracing::info!(pair = %key, peer, kept = ?reply.generations_kept, removed = ?reply.removed, "peer released its copy");
    Ok(())
}

/// At a site holding the copy: removes this site's finalizer from a DRPair being deleted.
pub async fn release_copy(ctx: &SiteContext, pair: &DRPair, key: &PairKey) {
    if pair.metadata.deletion_timestamp.is_none() || !finalizer::has(pair, PEER_RELEASE_FINALIZER) {
        return;
    }
    let api: Api<DRPair> = Api::namespaced(ctx.client.clone(), &key.namespace);
    if let Err(e) = finalizer::remove(&api, pair, PEER_RELEASE_FINALIZER).await {
        tracing::warn!(pair = %key, error = %e, "removing the finalizer of a copy's DRPair");
    }
}
