//! Failovers: a Migration of type `Failover`, run at its *target* site, the one taking over.
//!
//! The quorum decides; this module carries the decision out. A Migration created by the
//! quorum agent ([`crate::quorum`]) follows an automatic decision; one created by a person asks
//! the quorum to fail over now (`RequestFailover`) and is refused when the quorum cannot be
//! reached or answers with a stale epoch. Then, as in a planned migration, but without the
//! lost source:
//!
//! Pending (the decision: epoch, generation, data-loss window) → Promoting (wait for the old
//! lease to end, the decision's `not_before`; take the new epoch here, which makes this site's
//! replicator refuse the old source) → Instantiating (the app from the newest generation
//! committed here, through [`crate::instantiate`], the planned migration's code path) →
//! Completed, with `dataLossSeconds` (the generation's capture to the lost site's last
//! heartbeat) and `rtoSeconds` (that last heartbeat to the app ready here).

use std::time::Duration;

use ferry_schemas::conditions::{
    ConditionStatus as S, MigrationConditionReason as R, MigrationConditionType as T,
};
use ferry_schemas::migration::MigrationPhase as P;
use ferry_schemas::proto::witness::{PairState, ProposeMigrationRequest, RequestFailoverRequest};
use ferry_schemas::DRPair;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use serde_json::json;
use tonic::Code;

use crate::instantiate;
use crate::migration::{now, patch_pair_status, Context, ReconcileError, Step};
use crate::quorum::Quorum;

/// Annotation on a Failover Migration: Unix ms before which the app must not start here.
pub const NOT_BEFORE_ANNOTATION: &str = "ferry.dev/not-before-unix-ms";
/// Annotation on a Failover Migration: Unix ms of the lost site's last heartbeat.
pub const SITE_LOST_ANNOTATION: &str = "ferry.dev/site-last-heard-unix-ms";

fn annotation_ms(step: &Step<'_>, key: &str) -> i64 {
    step.migration
        .annotations()
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// One reconcile of a Failover Migration at this site.
pub(crate) async fn reconcile(
    step: &Step<'_>,
    ctx: &Context,
    pair: &DRPair,
    phase: P,
) -> Result<Action, ReconcileError> {
    let migration = step.migration;
    let target = migration.spec.target_site.clone();
    let pair_key = format!("{}/{}", step.namespace, pair.name_any());
    if target != ctx.site {
        if phase == P::Pending {
            return step.fail(R::TargetNotReady, format!("spec.targetSite: a Failover runs at the site taking over; create it at site {target}, not at {}", ctx.site)).await;
        }
        return Ok(Action::await_change());
    }
    let local_pairs = step.pairs(&ctx.client);
    match phase {
        P::Pending => {
            let Some(quorum) = &ctx.quorum else {
                return step.fail(R::QuorumUnavailable, "no witness quorum is configured at this site (ferry-controller --witness): a failover needs the quorum's decision".into()).await;
            };
            let state = match quorum.client.get_state().await {
                Ok(s) => s,
                Err(e) => {
                    return step
                        .fail(R::QuorumUnavailable, e.message().to_string())
                        .await
                }
            };
            let Some(mut qs) = state.pairs.into_iter().find(|p| p.pair == pair_key) else {
                return step
                    .fail(
                        R::QuorumUnavailable,
                        format!("pair {pair_key} is not registered with the witness quorum yet"),
                    )
                    .await;
            };
            if qs.active_site != ctx.site {
                let request = RequestFailoverRequest {
                    pair: pair_key.clone(),
                    to_site: ctx.site.clone(),
                    epoch: qs.epoch,
                    reason: format!("Migration {}/{}", step.namespace, migration.name_any()),
                };
                qs = match quorum.client.request_failover(request).await {
                    Ok(p) => p,
                    Err(e) => {
                        return step
                            .fail(R::QuorumUnavailable, e.message().to_string())
                            .await
                    }
                };
            }
            let Some(decision) = decision_of(&qs) else {
                return step
                    .fail(
                        R::QuorumUnavailable,
                        format!("the quorum holds no decision for epoch {}", qs.epoch),
                    )
                    .await;
            };
            let generation = pair.status.as_ref().and_then(|s| s.generation);
            let Some(generation) = generation else {
                return step
                    .fail(
                        R::TargetNotReady,
                        format!("no complete generation of {pair_key} at site {}", ctx.site),
                    )
                    .await;
            };
            step.api
                .patch(
                    &migration.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {
                        NOT_BEFORE_ANNOTATION: decision.not_before_unix_ms.to_string(),
                        SITE_LOST_ANNOTATION: decision.last_heard_unix_ms.to_string(),
                    }}})),
                )
                .await?;
            patch_pair_status(
                &local_pairs,
                &pair.name_any(),
                json!({"phase": "Migrating"}),
            )
            .await?;
            step.enter(
                P::Promoting,
                json!({"startTime": now(), "epoch": qs.epoch, "generation": generation.0, "dataLossSeconds": (decision.data_loss_seconds * 10.0).round() / 10.0}),
            )
            .await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        P::Promoting => {
            let status = migration.status.clone().unwrap_or_default();
            let epoch = status
                .epoch
                .map(|e| e.0)
                .ok_or(ReconcileError::MissingStatus {
                    field: "epoch",
                    phase: "Promoting",
                })?;
            // The old site's lease (plus the skew margin) must have ended: until then it may
            // still run the app.
            let wait =
                annotation_ms(step, NOT_BEFORE_ANNOTATION) - Timestamp::now().as_millisecond();
            if wait > 0 {
                return Ok(Action::requeue(Duration::from_millis(wait as u64)));
            }
            patch_pair_status(
                &local_pairs,
                &pair.name_any(),
                json!({"epoch": epoch, "activeSite": ctx.site, "phase": "FailedOver"}),
            )
            .await?;
            step.enter(P::Instantiating, json!({})).await?;
            Ok(Action::requeue(Duration::ZERO))
        }
        P::Instantiating => {
            let status = migration.status.clone().unwrap_or_default();
            let generation =
                status
                    .generation
                    .map(|g| g.0)
                    .ok_or(ReconcileError::MissingStatus {
                        field: "generation",
                        phase: "Instantiating",
                    })?;
            let waves = instantiate::plan(&ctx.client, pair, &step.namespace, generation).await?;
            instantiate::apply(&ctx.client, &waves).await?;
            let waiting = instantiate::not_ready(&ctx.client, &step.namespace, &waves).await?;
            if !waiting.is_empty() {
                tracing::info!(?waiting, "waiting for the app after failover");
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
            let lost_at = annotation_ms(step, SITE_LOST_ANNOTATION);
            let now_ms = Timestamp::now().as_millisecond();
            let rto = if lost_at > 0 {
                (now_ms - lost_at) as f64 / 1000.0
            } else {
                status
                    .start_time
                    .as_ref()
                    .map(crate::migration::seconds_since)
                    .unwrap_or(0.0)
            };
            let mut times = serde_json::to_value(&status.phase_times).unwrap_or(json!([]));
            if let Some(list) = times.as_array_mut() {
                list.push(json!({"phase": "Completed", "startTime": now()}));
            }
            let loss = status.data_loss_seconds.unwrap_or(0.0);
            let message = format!("{pair_key} runs at {} from generation {generation} after failover; data-loss window {loss:.1}s, RTO {rto:.1}s", ctx.site);
            let complete = T::Complete.condition(
                S::True,
                R::Succeeded,
                message.clone(),
                migration.metadata.generation,
                now(),
            );
            let progressing = T::Progressing.condition(
                S::False,
                R::Succeeded,
                "done",
                migration.metadata.generation,
                now(),
            );
            step.api
                .patch_status(
                    &migration.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"phase": "Completed", "phaseTimes": times, "completionTime": now(), "rtoSeconds": (rto * 1000.0).round() / 1000.0, "conditions": [complete, progressing]}})),
                )
                .await?;
            tracing::warn!(migration = %migration.name_any(), rto, loss, "failover completed");
            Ok(Action::await_change())
        }
        P::Quiescing | P::FinalSync | P::Completed | P::Failed => Ok(Action::await_change()),
    }
}

fn decision_of(qs: &PairState) -> Option<&ferry_schemas::proto::witness::FailoverRecord> {
    qs.history.iter().rev().find(|d| d.epoch == qs.epoch)
}

/// Records a planned migration from `source` to `target` at the quorum, moving the pair to
/// `epoch`. Idempotent: a quorum already at `epoch` with `target` active is success.
///
/// # Errors
/// [`ReconcileError`] when the quorum cannot be reached (retried) or moved elsewhere.
pub(crate) async fn propose_migration(
    quorum: &Quorum,
    step: &Step<'_>,
    source: &str,
    target: &str,
    epoch: u64,
) -> Result<(), ReconcileError> {
    let pair = format!("{}/{}", step.namespace, step.migration.spec.pair);
    let request = ProposeMigrationRequest {
        pair: pair.clone(),
        from_site: source.to_string(),
        to_site: target.to_string(),
        epoch: epoch - 1,
    };
    match quorum.client.propose_migration(request).await {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Code::FailedPrecondition => {
            let state = quorum.client.get_state().await?;
            match state.pairs.iter().find(|p| p.pair == pair) {
                Some(p) if p.epoch >= epoch && p.active_site == target => Ok(()),
                _ => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}
