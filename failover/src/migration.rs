//! The Migration controller: drives a planned migration of a DR pair from the site where it is
//! active to its peer, one idempotent phase at a time.
//!
//! A `Failback` is the same migration, back to the pair's primary site after a failover: the
//! replication that ran since from the secondary to the (demoted) primary shipped only the
//! blocks that differed from its own volumes, and the final sync closes the gap.
//!
//! Pending → Quiescing → FinalSync → Promoting → Instantiating → Completed (or Failed). The
//! phase is recorded in the Migration's status before the work of that phase starts, and each
//! phase's work can run again safely, so a controller killed at any point resumes where it
//! stood. Before Promoting, a failure resumes the app at the source; from Promoting on the
//! migration only moves forward, because the target's epoch already fences the source.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

use ferry_schemas::conditions::{
    ConditionStatus as S, MigrationConditionReason as R, MigrationConditionType as T,
};
use ferry_schemas::contract::SYNC_REQUEST_ANNOTATION;
use ferry_schemas::migration::MigrationPhase as P;
use ferry_schemas::{DRPair, Migration};

use crate::{instantiate, peer, quiesce};

/// How often a phase that waits on the cluster is re-checked.
const POLL: Duration = Duration::from_secs(1);

pub use crate::context::{Context, ReconcileError};

pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}

/// Runs the controller for Migrations at this site until the stream ends.
pub async fn run(ctx: Arc<Context>) {
    let migrations: Api<Migration> = Api::all(ctx.client.clone());
    Controller::new(migrations, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "reconcile");
            }
        })
        .await;
}

fn error_policy(_m: Arc<Migration>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, "migration step failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

pub(crate) struct Step<'a> {
    pub(crate) migration: &'a Migration,
    pub(crate) api: Api<Migration>,
    pub(crate) namespace: String,
}

impl Step<'_> {
    /// Records `phase` (with its start time) and anything in `extra`.
    pub(crate) async fn enter(&self, phase: P, extra: Value) -> Result<(), ReconcileError> {
        let status = self.migration.status.clone().unwrap_or_default();
        let mut times = serde_json::to_value(&status.phase_times).unwrap_or(json!([]));
        if let Some(list) = times.as_array_mut() {
            list.push(json!({"phase": phase.as_str(), "startTime": now()}));
        }
        let mut patch = json!({"phase": phase.as_str(), "phaseTimes": times, "observedGeneration": self.migration.metadata.generation});
        if let (Some(target), Some(source)) = (patch.as_object_mut(), extra.as_object()) {
            for (k, v) in source {
                target.insert(k.clone(), v.clone());
            }
        }
        let progressing = T::Progressing.condition(
            S::True,
            R::InProgress,
            format!("phase {}", phase.as_str()),
            self.migration.metadata.generation,
            now(),
        );
        patch["conditions"] = json!([progressing]);
        self.api
            .patch_status(
                &self.migration.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": patch})),
            )
            .await?;
        tracing::info!(migration = %self.migration.name_any(), phase = phase.as_str(), "phase");
        Ok(())
    }

    /// Ends the migration as Failed with `reason` and `message`.
    pub(crate) async fn fail(&self, reason: R, message: String) -> Result<Action, ReconcileError> {
        let status = self.migration.status.clone().unwrap_or_default();
        let mut times = serde_json::to_value(&status.phase_times).unwrap_or(json!([]));
        if let Some(list) = times.as_array_mut() {
            list.push(json!({"phase": "Failed", "startTime": now()}));
        }
        let failed = T::Failed.condition(
            S::True,
            reason,
            message.clone(),
            self.migration.metadata.generation,
            now(),
        );
        let progressing = T::Progressing.condition(
            S::False,
            reason,
            message.clone(),
            self.migration.metadata.generation,
            now(),
        );
        self.api
            .patch_status(
                &self.migration.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Failed", "phaseTimes": times, "completionTime": now(), "conditions": [failed, progressing]}})),
            )
            .await?;
        tracing::warn!(migration = %self.migration.name_any(), %message, "migration failed");
        Ok(Action::await_change())
    }

    pub(crate) fn pairs(&self, client: &Client) -> Api<DRPair> {
        Api::namespaced(client.clone(), &self.namespace)
    }
}

pub(crate) async fn patch_pair_status(
    api: &Api<DRPair>,
    name: &str,
    status: Value,
) -> Result<(), kube::Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .map(|_| ())
}

pub(crate) fn seconds_since(t: &Time) -> f64 {
    (Timestamp::now().as_millisecond() - t.0.as_millisecond()) as f64 / 1000.0
}

/// Snapshots the app's PVCs at this (old source) site as the seed of `generation`: replica
/// snapshots labelled `ferry.dev/seed=true`, which this site's replicator adopts as its newest
/// committed generation when the first sync back arrives. `diverged` when the volumes hold
/// writes after `generation` that the peer never received (a demotion after a failover):
/// the peer then plans against this site's scan of them.
pub(crate) async fn seed(
    client: &Client,
    pair: &DRPair,
    namespace: &str,
    generation: u64,
    diverged: bool,
) -> Result<(), ReconcileError> {
    use ferry_schemas::contract::{
        generation_snapshot, DIVERGED_LABEL, GENERATION_LABEL, PAIR_LABEL, REPLICA_ROLE,
        ROLE_LABEL, SEED_LABEL, VOLUME_LABEL,
    };
    let pair_name = pair.name_any();
    let app = ferry_manifests::capture(client, namespace, &pair.spec.selector).await?;
    let claims: Vec<String> = match &pair.spec.volumes {
        Some(named) => named.clone(),
        None => app.pvcs,
    };
    for claim in claims {
        let labels = std::collections::BTreeMap::from([
            (PAIR_LABEL.to_string(), pair_name.clone()),
            (ROLE_LABEL.to_string(), REPLICA_ROLE.to_string()),
            (GENERATION_LABEL.to_string(), generation.to_string()),
            (VOLUME_LABEL.to_string(), claim.clone()),
            (SEED_LABEL.to_string(), "true".to_string()),
            (DIVERGED_LABEL.to_string(), diverged.to_string()),
        ]);
        let name = generation_snapshot(&pair_name, &claim, generation);
        ferry_runtime::volumes::snapshot_claim(
            client,
            namespace,
            &name,
            &claim,
            &labels,
            &Default::default(),
        )
        .await
        .map_err(|source| ReconcileError::Seed {
            claim: claim.clone(),
            source,
        })?;
    }
    Ok(())
}

/// One reconcile of one Migration.
async fn reconcile(migration: Arc<Migration>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = migration.namespace().unwrap_or_default();
    let step = Step {
        migration: &migration,
        api: Api::namespaced(ctx.client.clone(), &namespace),
        namespace: namespace.clone(),
    };
    let status = migration.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or(P::Pending);
    if phase.is_terminal() {
        return Ok(Action::await_change());
    }
    let pair_name = migration.spec.pair.clone();
    let local_pairs = step.pairs(&ctx.client);
    let Some(pair) = local_pairs.get_opt(&pair_name).await? else {
        return step
            .fail(
                R::PairNotFound,
                format!("spec.pair: DRPair {namespace}/{pair_name} not found"),
            )
            .await;
    };
    if migration.spec.type_ == ferry_schemas::migration::MigrationType::Failover {
        return crate::takeover::reconcile(&step, &ctx, &pair, phase).await;
    }
    let run = Planned {
        ctx: &ctx,
        step: &step,
        pair_status: pair.status.clone().unwrap_or_default(),
        target: migration.spec.target_site.clone(),
        source: ctx.site.clone(),
        status,
        pair,
        local_pairs,
        pair_name,
        namespace,
    };
    match phase {
        P::Pending => run.pending().await,
        P::Quiescing => run.quiescing().await,
        P::FinalSync => run.final_sync().await,
        P::Promoting => run.promoting().await,
        P::Instantiating => run.instantiating().await,
        P::Completed | P::Failed => Ok(Action::await_change()),
    }
}

/// A planned migration (or failback) in progress at its source site: one method per phase,
/// each idempotent, each recording the next phase before returning.
struct Planned<'a> {
    ctx: &'a Context,
    step: &'a Step<'a>,
    /// The Migration's status as read this reconcile.
    status: ferry_schemas::MigrationStatus,
    /// The local DRPair and its status.
    pair: DRPair,
    pair_status: ferry_schemas::DRPairStatus,
    local_pairs: Api<DRPair>,
    pair_name: String,
    namespace: String,
    /// The site the app moves to, and this (source) site.
    target: String,
    source: String,
}

impl Planned<'_> {
    /// Checks the migration can start (active here, target is the peer, a complete generation there) and marks the pair Migrating.
    async fn pending(&self) -> Result<Action, ReconcileError> {
        let Planned {
            ctx,
            step,
            status,
            pair,
            pair_status,
            local_pairs,
            pair_name,
            target,
            ..
        } = self;
        let migration = step.migration;
        let active = pair_status
            .active_site
            .clone()
            .unwrap_or_else(|| pair.spec.primary_site.clone());
        if active != ctx.site {
            // Only the controller of the active site drives a migration.
            if status.phase.is_none() && migration.metadata.creation_timestamp.is_some() {
                return step.fail(R::TargetNotReady, format!("the app is active at site {active}, not at {}: create the Migration there", ctx.site)).await;
            }
            return Ok(Action::await_change());
        }
        let peer_site = if pair.spec.primary_site == ctx.site {
            &pair.spec.secondary_site
        } else {
            &pair.spec.primary_site
        };
        if target != peer_site {
            return step
                .fail(
                    R::InvalidSpec,
                    format!("spec.targetSite: {target} is not the pair's peer site {peer_site}"),
                )
                .await;
        }
        if migration.spec.type_ == ferry_schemas::migration::MigrationType::Failback
            && *target != pair.spec.primary_site
        {
            return step.fail(R::InvalidSpec, format!("spec.type: a Failback returns the app to its primary site {}, but the pair is active there already (spec.targetSite {target}); use type Planned", pair.spec.primary_site)).await;
        }
        if let Err(errors) = pair.spec.validate(None) {
            return step
                .fail(
                    R::InvalidSpec,
                    format!(
                        "DRPair {pair_name} is invalid: {}",
                        ferry_schemas::validation::join_errors(&errors)
                    ),
                )
                .await;
        }
        if pair_status.generation.is_none() {
            return step.fail(R::TargetNotReady, format!("no complete generation of {pair_name} at site {target} yet: wait for the pair to be Ready")).await;
        }
        let remote = match peer::peer_client(&ctx.client, target).await {
            Ok(client) => client,
            Err(e) => return step.fail(R::TargetUnreachable, e.to_string()).await,
        };
        match step.pairs(&remote).get_opt(pair_name).await {
            Ok(Some(p)) if p.status.as_ref().and_then(|s| s.generation).is_some() => {}
            Ok(_) => {
                return step
                    .fail(
                        R::TargetNotReady,
                        format!("site {target} holds no complete generation of {pair_name}"),
                    )
                    .await
            }
            Err(e) => {
                return step
                    .fail(R::TargetUnreachable, format!("site {target}: {e}"))
                    .await
            }
        }
        patch_pair_status(local_pairs, pair_name, json!({"phase": "Migrating"})).await?;
        step.enter(P::Quiescing, json!({"startTime": now()}))
            .await?;
        Ok(Action::requeue(Duration::ZERO))
    }

    /// Scales the app to zero at the source (the count kept in annotations).
    async fn quiescing(&self) -> Result<Action, ReconcileError> {
        let Planned {
            ctx,
            step,
            pair,
            namespace,
            ..
        } = self;
        quiesce::quiesce(&ctx.client, namespace, &pair.spec.selector).await?;
        step.enter(P::FinalSync, json!({})).await?;
        Ok(Action::requeue(Duration::ZERO))
    }

    /// Once the app stopped, asks the replicator for a final sync and waits until it is committed.
    async fn final_sync(&self) -> Result<Action, ReconcileError> {
        let Planned {
            ctx,
            step,
            pair,
            pair_status,
            local_pairs,
            pair_name,
            namespace,
            ..
        } = self;
        let migration = step.migration;
        let running = quiesce::running_pods(&ctx.client, namespace, &pair.spec.selector).await?;
        if !running.is_empty() {
            tracing::info!(pods = ?running, "waiting for the app to stop at the source");
            return Ok(Action::requeue(POLL));
        }
        let token = migration.uid().unwrap_or_default();
        if pair_status.last_sync_request.as_deref() == Some(token.as_str()) {
            let generation = pair_status.generation.map(|g| g.0).unwrap_or(0);
            let epoch = pair_status.epoch.map(|e| e.0).unwrap_or(1) + 1;
            step.enter(
                P::Promoting,
                json!({"generation": generation, "epoch": epoch}),
            )
            .await?;
            return Ok(Action::requeue(Duration::ZERO));
        }
        if pair.annotations().get(SYNC_REQUEST_ANNOTATION) != Some(&token) {
            local_pairs
                .patch(
                    pair_name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"metadata": {"annotations": {SYNC_REQUEST_ANNOTATION: token}}}),
                    ),
                )
                .await?;
        }
        Ok(Action::requeue(POLL))
    }

    /// Seeds the source's volumes, moves the epoch (quorum, then target, then source): the source is fenced from here on.
    async fn promoting(&self) -> Result<Action, ReconcileError> {
        let Planned {
            ctx,
            step,
            status,
            pair,
            local_pairs,
            pair_name,
            namespace,
            target,
            source,
            ..
        } = self;
        let epoch = status
            .epoch
            .map(|e| e.0)
            .ok_or(ReconcileError::MissingStatus {
                field: "epoch",
                phase: "Promoting",
            })?;
        let generation = status
            .generation
            .map(|g| g.0)
            .ok_or(ReconcileError::MissingStatus {
                field: "generation",
                phase: "Promoting",
            })?;
        // The app's volumes here hold exactly the final generation: keep them as its seed,
        // so replication back from the target starts with a delta, not a full copy.
        seed(&ctx.client, pair, namespace, generation, false).await?;
        if let Some(quorum) = &ctx.quorum {
            // The quorum first: the move is one raft entry, and the old epoch's lease dies
            // with it.
            crate::takeover::propose_migration(quorum, step, source, target, epoch).await?;
        }
        let remote = peer::peer_client(&ctx.client, target).await?;
        // The target first: from here on it refuses the old epoch, which fences the source.
        patch_pair_status(
            &step.pairs(&remote),
            pair_name,
            json!({"epoch": epoch, "activeSite": target, "phase": "Migrating"}),
        )
        .await?;
        patch_pair_status(
            local_pairs,
            pair_name,
            json!({"epoch": epoch, "activeSite": target}),
        )
        .await?;
        step.enter(P::Instantiating, json!({})).await?;
        Ok(Action::requeue(Duration::ZERO))
    }

    /// Stands the app up at the target from the final generation and waits until it is ready; Completed.
    async fn instantiating(&self) -> Result<Action, ReconcileError> {
        let Planned {
            ctx,
            step,
            status,
            pair,
            local_pairs,
            pair_name,
            namespace,
            target,
            source,
            ..
        } = self;
        let migration = step.migration;
        let generation = status
            .generation
            .map(|g| g.0)
            .ok_or(ReconcileError::MissingStatus {
                field: "generation",
                phase: "Instantiating",
            })?;
        let remote = peer::peer_client(&ctx.client, target).await?;
        let waves = instantiate::plan(&remote, pair, namespace, generation).await?;
        instantiate::apply(&remote, &waves).await?;
        let waiting = instantiate::not_ready(&remote, namespace, &waves).await?;
        if !waiting.is_empty() {
            tracing::info!(?waiting, "waiting for the app at the target");
            return Ok(Action::requeue(POLL));
        }
        // Replication now flows from the target back to this site.
        patch_pair_status(
            &step.pairs(&remote),
            pair_name,
            json!({"phase": "Replicating"}),
        )
        .await?;
        patch_pair_status(local_pairs, pair_name, json!({"phase": "Replicating"})).await?;
        let rto = status.start_time.as_ref().map(seconds_since).unwrap_or(0.0);
        let mut times = serde_json::to_value(&status.phase_times).unwrap_or(json!([]));
        if let Some(list) = times.as_array_mut() {
            list.push(json!({"phase": "Completed", "startTime": now()}));
        }
        let complete = T::Complete.condition(S::True, R::Succeeded, format!("{pair_name} runs at {target} from generation {generation}; {source} is scaled to zero"), migration.metadata.generation, now());
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
                    &Patch::Merge(json!({"status": {"phase": "Completed", "phaseTimes": times, "completionTime": now(), "rtoSeconds": (rto * 1000.0).round() / 1000.0, "dataLossSeconds": 0.0, "conditions": [complete, progressing]}})),
                )
                .await?;
        tracing::info!(migration = %migration.name_any(), rto, "migration completed");
        Ok(Action::await_change())
    }
}
