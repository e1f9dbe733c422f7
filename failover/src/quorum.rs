//! This site's link to the witness quorum: registration, heartbeats, leases, fencing, and
//! acting on the quorum's decisions.
//!
//! Every [`TICK`] the agent:
//! 1. registers each DRPair of this site with the quorum (again whenever its spec changes);
//! 2. sends one heartbeat to every witness, reporting each pair's newest generation committed
//!    here and its capture time (what a failover *to* this site would start from);
//! 3. acts on a newer epoch a witness reports: a `Failover` decision naming this site becomes a
//!    Migration of type Failover here (see [`crate::takeover`]); any failover naming the other
//!    site demotes this one (app scaled to zero, volumes kept, status epoch and active site
//!    updated; it never starts the app again on its own);
//! 4. renews the lease of each pair active here and mirrors it in the site-local Lease that
//!    gates the app's pods ([`crate::lease`]), and *fences* the site when the lease cannot be
//!    renewed: the Lease is deleted and the app scaled to zero [`Quorum::fence_lead`] before
//!    the lease ends, counted from when the last successful renewal was *sent*, on this
//!    site's monotonic clock. The witnesses count the same lease from when they granted it
//!    (later) plus a skew margin, so the site is down before any witness may promote its peer
//!    (docs/failover.md gives the argument).
//!
//! A pair that is not active here is kept quiesced here, with no Lease. A pair owned by a
//! running Migration (phase `Migrating`) is left to the Migration controller; the agent only
//! keeps its lease renewed, so the app's pods may start at the target.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ferry_runtime::{Component, PairStatus};
use ferry_schemas::conditions::{
    ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
};
use ferry_schemas::drpair::{FailoverMode, PairPhase};
use ferry_schemas::migration::MigrationType;
use ferry_schemas::proto::witness::{
    self as wire, HeartbeatRequest, PairReport, RegisterPairRequest, RenewLeaseRequest,
};
use ferry_schemas::{DRPair, Migration, MigrationSpec};
use ferry_witness_client::QuorumClient;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use tonic::Code;

use crate::migration::Context;
use crate::quiesce;

/// How often the agent runs.
pub const TICK: Duration = Duration::from_millis(500);

/// The quorum and this site's lease policy.
#[derive(Clone)]
pub struct Quorum {
    /// The witnesses.
    pub client: QuorumClient,
    /// Lease duration requested per pair (e.g. 10 s).
    pub lease: Duration,
}

impl Quorum {
    /// How long before its lease ends a site fences itself: a quarter of the lease, so the app
    /// has stopped before the witnesses may count the lease as expired.
    pub fn fence_lead(&self) -> Duration {
        self.lease / 4
    }
}

fn pair_key(p: &DRPair) -> String {
    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any())
}

fn millis(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> i64 {
    t.0.as_millisecond()
}

#[derive(Default)]
struct PairLease {
    /// Until when this site may run the app (monotonic): last renewal's send time + lease.
    valid_until: Option<Instant>,
    last_renewal: Option<Instant>,
    registered: Option<RegisterPairRequest>,
    /// Whether the site-local Lease exists (`None`: not known since this agent started).
    mirrored: Option<bool>,
}

impl PairLease {
    /// Deletes the site-local Lease unless known to be gone already.
    async fn revoke(&mut self, client: &kube::Client, pair: &DRPair) -> Result<(), kube::Error> {
        if self.mirrored != Some(false) {
            crate::lease::revoke(
                client,
                &pair.namespace().unwrap_or_default(),
                &pair.name_any(),
            )
            .await?;
            self.mirrored = Some(false);
        }
        Ok(())
    }
}

/// Runs the agent until the process ends.
pub async fn run(ctx: Arc<Context>, quorum: Quorum) {
    let status = PairStatus::new(ctx.client.clone(), &ctx.site, Component::Controller);
    let mut leases: HashMap<String, PairLease> = HashMap::new();
    loop {
        if let Err(e) = tick(&ctx, &quorum, &status, &mut leases).await {
            tracing::warn!(error = %e, "witness agent tick");
        }
        tokio::time::sleep(TICK).await;
    }
}

async fn tick(
    ctx: &Context,
    quorum: &Quorum,
    status: &PairStatus,
    leases: &mut HashMap<String, PairLease>,
) -> Result<(), kube::Error> {
    let pairs = Api::<DRPair>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    forget_deleted(ctx, &pairs, leases).await?;
    let mut reports = Vec::new();
    for pair in &pairs {
        let key = pair_key(pair);
        let Ok(valid) = pair.spec.validate(None) else {
            continue;
        };
        let st = pair.status.clone().unwrap_or_default();
        let request = RegisterPairRequest {
            pair: key.clone(),
            primary_site: valid.primary_site.clone(),
            secondary_site: valid.secondary_site.clone(),
            mode: match valid.failover.mode {
                FailoverMode::Automatic => wire::FailoverMode::Automatic,
                FailoverMode::Manual => wire::FailoverMode::Manual,
            } as i32,
            rpo_ms: valid.rpo.as_millis() as u64,
            allowance_ms: valid.failover.data_loss_allowance.as_millis() as u64,
            active_site: st.active_site.clone().unwrap_or(valid.primary_site.clone()),
            epoch: st.epoch.map(|e| e.0).unwrap_or(1),
            site_loss_timeout_ms: valid.failover.site_loss_timeout.as_millis() as u64,
        };
        let lease = leases.entry(key.clone()).or_default();
        let changed = lease.registered.as_ref().is_none_or(|r| {
            (
                &r.primary_site,
                &r.secondary_site,
                r.mode,
                r.rpo_ms,
                r.allowance_ms,
                r.site_loss_timeout_ms,
            ) != (
                &request.primary_site,
                &request.secondary_site,
                request.mode,
                request.rpo_ms,
                request.allowance_ms,
                request.site_loss_timeout_ms,
            )
        });
        if changed {
            match quorum.client.register_pair(request.clone()).await {
                Ok(_) => lease.registered = Some(request),
                Err(e) => {
                    tracing::debug!(pair = %key, error = %e.message(), "registering with the witnesses")
                }
            }
        }
        reports.push(PairReport {
            pair: key,
            committed_generation: st.generation.map(|g| g.0).unwrap_or(0),
            capture_time_unix_ms: st.last_capture_time.as_ref().map(millis).unwrap_or(0),
            epoch: st.epoch.map(|e| e.0).unwrap_or(1),
        });
    }
    let round = quorum
        .client
        .heartbeat(HeartbeatRequest {
            site: ctx.site.clone(),
            sent_at_unix_ms: k8s_openapi::jiff::Timestamp::now().as_millisecond(),
            pairs: reports,
        })
        .await;
    // The newest state any witness reports for each pair (epochs only grow).
    let mut known: HashMap<String, wire::PairState> = HashMap::new();
    for reply in &round.replies {
        for p in &reply.pairs {
            if known.get(&p.pair).is_none_or(|k| k.epoch < p.epoch) {
                known.insert(p.pair.clone(), p.clone());
            }
        }
    }
    for pair in &pairs {
        let key = pair_key(pair);
        let st = pair.status.clone().unwrap_or_default();
        let ns = pair.namespace().unwrap_or_default();
        // A running Migration moves statuses and the app; the agent only keeps the lease.
        let migrating = st.phase == Some(PairPhase::Migrating);
        let local_epoch = st.epoch.map(|e| e.0).unwrap_or(1);
        let qs = known.get(&key);
        if let Some(qs) = qs.filter(|q| q.epoch > local_epoch && !migrating) {
            let decision = qs.history.iter().rev().find(|d| d.epoch == qs.epoch);
            let kind = decision.map(|d| d.kind.as_str()).unwrap_or("");
            if kind == "Migration" {
                continue; // the Migration controller moves the statuses
            }
            if qs.active_site == ctx.site {
                if kind == "Failover" {
                    ensure_failover_migration(ctx, pair, qs.epoch).await?;
                }
            } else {
                leases
                    .entry(key.clone())
                    .or_default()
                    .revoke(&ctx.client, pair)
                    .await?;
                demote(ctx, status, pair, qs).await?;
            }
            continue;
        }
        let active = st
            .active_site
            .clone()
            .unwrap_or(pair.spec.primary_site.clone());
        let lease = leases.entry(key.clone()).or_default();
        let mut conditions = vec![quorum_condition(round.reached_quorum())];
        if let Some(qs) = qs {
            conditions.push(blocked_condition(pair, qs));
        }
        if active != ctx.site && !migrating {
            // A site that is not active runs none of the app: a returning old primary whose
            // pods restarted with the site, or one that learned the new epoch from a
            // replicated generation before any heartbeat told it (no write when already quiet).
            lease.revoke(&ctx.client, pair).await?;
            quiesce::quiesce(&ctx.client, &ns, &pair.spec.selector).await?;
        }
        if active != ctx.site || lease.registered.is_none() {
            // Written again next round; a refusal now is logged.
            if let Err(e) = status
                .apply(&ns, &pair.name_any(), json!({}), &conditions)
                .await
            {
                tracing::warn!(pair = %pair_key(pair), error = %e, "writing DRPair conditions");
            }
            continue;
        }
        renew(ctx, quorum, status, pair, local_epoch, lease, conditions).await?;
    }
    Ok(())
}

/// Drops the Lease of every pair that is gone from this site (deleted, or its namespace with
/// it), so nothing of it stays behind. The app's `ferry-gate` reads a missing DRPair as an
/// unprotected app (`crate::gate`), so this does not stop it.
async fn forget_deleted(
    ctx: &Context,
    pairs: &[DRPair],
    leases: &mut HashMap<String, PairLease>,
) -> Result<(), kube::Error> {
    let present: std::collections::HashSet<String> = pairs.iter().map(pair_key).collect();
    let gone: Vec<String> = leases
        .keys()
        .filter(|k| !present.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        let (namespace, name) = key.split_once('/').unwrap_or_default();
        crate::lease::revoke(&ctx.client, namespace, name).await?;
        leases.remove(&key);
        tracing::info!(pair = %key, "pair deleted; its Lease removed");
    }
    Ok(())
}

fn quorum_condition(reached: bool) -> (T, S, R, String) {
    if reached {
        (
            T::WitnessQuorumLost,
            S::False,
            R::QuorumHeld,
            "a majority of witnesses answered".into(),
        )
    } else {
        (T::WitnessQuorumLost, S::True, R::QuorumLost, "fewer than a majority of witnesses answered the last heartbeat; no failover can be decided, and the active site fences itself when its lease ends".into())
    }
}

fn blocked_condition(pair: &DRPair, qs: &wire::PairState) -> (T, S, R, String) {
    if pair.spec.failover.mode == FailoverMode::Manual {
        return (
            T::FailoverBlocked,
            S::True,
            R::ManualMode,
            "spec.failover.mode is Manual: only a Migration of type Failover moves the pair".into(),
        );
    }
    if qs.blocked_reason.is_empty() {
        return (
            T::FailoverBlocked,
            S::False,
            R::QuorumHeld,
            "nothing blocks an automatic failover".into(),
        );
    }
    let reason = if qs.blocked_reason.starts_with("secondary lag") {
        R::DataLossAllowanceExceeded
    } else {
        R::FailoverRuleUnmet
    };
    (
        T::FailoverBlocked,
        S::True,
        reason,
        qs.blocked_reason.clone(),
    )
}

async fn renew(
    ctx: &Context,
    quorum: &Quorum,
    status: &PairStatus,
    pair: &DRPair,
    epoch: u64,
    lease: &mut PairLease,
    mut conditions: Vec<(T, S, R, String)>,
) -> Result<(), kube::Error> {
    let ns = pair.namespace().unwrap_or_default();
    let name = pair.name_any();
    let due = lease
        .last_renewal
        .is_none_or(|t| t.elapsed() >= quorum.lease / 4);
    if due {
        let sent = Instant::now();
        let sent_wall = SystemTime::now();
        let request = RenewLeaseRequest {
            pair: pair_key(pair),
            site: ctx.site.clone(),
            epoch,
            duration_ms: quorum.lease.as_millis() as u64,
        };
        match quorum.client.renew_lease(request).await {
            Ok(_) => {
                lease.valid_until = Some(sent + quorum.lease);
                lease.last_renewal = Some(sent);
                // The app's pods may start here until this site would fence itself.
                let held = crate::lease::Held {
                    site: &ctx.site,
                    epoch,
                    renewed: sent_wall,
                    duration: quorum.lease,
                    run_until: sent_wall + quorum.lease - quorum.fence_lead(),
                };
                crate::lease::record(&ctx.client, &ns, &name, &held).await?;
                lease.mirrored = Some(true);
            }
            Err(e) if e.code() == Code::FailedPrecondition => {
                // A newer epoch exists: the next heartbeat names it and demotes this site.
                tracing::warn!(pair = %pair_key(pair), error = %e.message(), "lease refused");
                lease.valid_until = Some(sent);
            }
            Err(e) => {
                tracing::warn!(pair = %pair_key(pair), error = %e.message(), "lease not renewed");
                lease.last_renewal = Some(sent - quorum.lease / 8);
            }
        }
    }
    let phase = pair.status.as_ref().and_then(|s| s.phase);
    if phase == Some(PairPhase::Migrating) {
        // The Migration owns the app; its pods start only while the Lease above is fresh.
        status.apply(&ns, &name, json!({}), &conditions).await?;
        return Ok(());
    }
    // A controller that (re)starts without a lease holds none: the first renewal must succeed.
    let valid_until = lease.valid_until.unwrap_or_else(Instant::now);
    let fenced = phase == Some(PairPhase::Fenced);
    if Instant::now() + quorum.fence_lead() >= valid_until {
        if !fenced {
            lease.revoke(&ctx.client, pair).await?;
            quiesce::quiesce(&ctx.client, &ns, &pair.spec.selector).await?;
            let message = format!("site {} could not renew its witness lease on {}: the app is scaled to zero here until the lease is held again", ctx.site, pair_key(pair));
            conditions.push((T::Ready, S::False, R::Fenced, message.clone()));
            status
                .apply(&ns, &name, json!({"phase": "Fenced"}), &conditions)
                .await?;
            status.event(pair, true, "Fenced", "Fence", message).await;
            tracing::warn!(pair = %pair_key(pair), "fenced: lease lost");
            return Ok(());
        }
    } else if fenced {
        // The lease is held again at the same epoch: nobody took over, resume here.
        quiesce::resume(&ctx.client, &ns, &pair.spec.selector).await?;
        let message = format!(
            "site {} holds the witness lease on {} again",
            ctx.site,
            pair_key(pair)
        );
        conditions.push((T::Ready, S::True, R::Protected, message.clone()));
        status
            .apply(&ns, &name, json!({"phase": "Replicating"}), &conditions)
            .await?;
        status
            .event(pair, false, "Unfenced", "Fence", message)
            .await;
        return Ok(());
    }
    status.apply(&ns, &name, json!({}), &conditions).await?;
    Ok(())
}

/// This site was superseded: stop the app for good, keep its volumes, and take the quorum's
/// epoch and active site.
async fn demote(
    ctx: &Context,
    status: &PairStatus,
    pair: &DRPair,
    qs: &wire::PairState,
) -> Result<(), kube::Error> {
    let ns = pair.namespace().unwrap_or_default();
    quiesce::quiesce(&ctx.client, &ns, &pair.spec.selector).await?;
    // The volumes are kept as a *diverged* seed: the app ran here after the newest generation
    // the other site holds, so they equal none of its generations. Replication back plans
    // against this site's scan of them and ships only the blocks that differ. The seed must
    // exist before the status below names the new active site: this site's replicator refuses
    // the new epoch's syncs until then.
    let st = pair.status.clone().unwrap_or_default();
    if let Some(generation) = st.generation {
        crate::migration::seed(&ctx.client, pair, &ns, generation.0, true)
            .await
            .map_err(|e| kube::Error::Service(e.to_string().into()))?;
    }
    let message = format!(
        "the witness quorum moved {} to site {} at epoch {}: this site is demoted, its app stays scaled to zero and its volumes are kept for failback",
        pair_key(pair),
        qs.active_site,
        qs.epoch
    );
    status
        .apply(
            &ns,
            &pair.name_any(),
            json!({"epoch": qs.epoch, "activeSite": qs.active_site, "phase": "FailedOver"}),
            &[(T::Ready, S::False, R::FailedOver, message.clone())],
        )
        .await?;
    status.event(pair, true, "Demoted", "Fence", message).await;
    tracing::warn!(pair = %pair_key(pair), active = %qs.active_site, epoch = qs.epoch, "demoted");
    Ok(())
}

/// The name of the Migration that carries out the quorum's failover of `pair` at `epoch`.
pub fn failover_migration_name(pair: &str, epoch: u64) -> String {
    format!("{pair}-failover-{epoch}")
}

async fn ensure_failover_migration(
    ctx: &Context,
    pair: &DRPair,
    epoch: u64,
) -> Result<(), kube::Error> {
    let ns = pair.namespace().unwrap_or_default();
    let api: Api<Migration> = Api::namespaced(ctx.client.clone(), &ns);
    let name = failover_migration_name(&pair.name_any(), epoch);
    if api.get_opt(&name).await?.is_some() {
        return Ok(());
    }
    let mut m = Migration::new(
        &name,
        MigrationSpec {
            pair: pair.name_any(),
            target_site: ctx.site.clone(),
            type_: MigrationType::Failover,
        },
    );
    m.metadata.namespace = Some(ns.clone());
    m.metadata.labels = Some(
        [(
            "ferry.dev/decided-by".to_string(),
            "witness-quorum".to_string(),
        )]
        .into(),
    );
    match api.create(&PostParams::default(), &m).await {
        Ok(_) => {
            tracing::warn!(pair = %pair_key(pair), epoch, migration = %name, "failover decided by the witness quorum");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}
