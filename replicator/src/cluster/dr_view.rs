//! The DR site's own view of a pair: at a site that holds a pair's copy but does not run it,
//! the lag is refreshed from `status.lastCaptureTime` on this site's clock, not only when a
//! generation arrives. Once the newest generation is older than `spec.rpo` the pair says so
//! on its own: phase `Stale`, `RPOMet=False` with the age, `currentLagSeconds` growing, and
//! `ferry_replication_lag_seconds` exported here too. During a disaster this is the view the
//! operator has, and it must not say all is well because the source went silent.
//!
//! Only a pair that is replicating to this site (phase `Replicating` or `Stale`) is touched:
//! a migration, failover or fencing owns the phase then. The next committed generation puts
//! the phase back to `Replicating` (`SiteObserver::committed`).

use std::time::{Duration, SystemTime};

use kube::Api;
use serde_json::json;

use ferry_schemas::conditions::{
    ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
};
use ferry_schemas::drpair::PairPhase;
use ferry_schemas::DRPair;

use super::pairs::SiteContext;
use crate::destination::PairKey;
use crate::metrics::PairLabels;

/// How often the DR site refreshes its view.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Keeps the DR site's view of `key` current until the pair is deleted or becomes active at
/// this site.
pub async fn run(ctx: SiteContext, key: PairKey) {
    let api: Api<DRPair> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let labels = PairLabels::new(&key.namespace, &key.name);
    let mut last_written: Option<(f64, bool)> = None;
    loop {
        let pair = match api.get_opt(&key.name).await {
            Ok(Some(pair)) if pair.metadata.deletion_timestamp.is_none() => pair,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(pair = %key, error = %e, "reading DRPair");
                tokio::time::sleep(REFRESH).await;
                continue;
            }
        };
        let status = pair.status.clone().unwrap_or_default();
        let active = status
            .active_site
            .clone()
            .unwrap_or_else(|| pair.spec.primary_site.clone());
        if active == ctx.site {
            return;
        }
        let replicating = matches!(
            status.phase,
            Some(PairPhase::Replicating) | Some(PairPhase::Stale)
        );
        let capture = super::pairs::recorded_capture(&status);
        let rpo = ferry_schemas::duration::parse_duration(&pair.spec.rpo).ok();
        if let (true, Some(capture), Some(rpo)) = (replicating, capture, rpo) {
            let lag = SystemTime::now()
                .duration_since(capture)
                .unwrap_or_default()
                .as_secs_f64();
            ctx.metrics.set_lag(&labels, lag);
            let met = lag <= rpo.as_secs_f64();
            // Written when RPOMet flips, and every second of lag while it is missed.
            let due = last_written.is_none_or(|(l, m)| m != met || (!met && lag - l >= 1.0));
            if due {
                let rpo_s = rpo.as_secs();
                let (phase, condition) = if met {
                    (
                        "Replicating",
                        (
                            T::RpoMet,
                            S::True,
                            R::WithinRpo,
                            format!("lag {lag:.0}s, rpo {rpo_s}s"),
                        ),
                    )
                } else {
                    (
                        "Stale",
                        (
                            T::RpoMet,
                            S::False,
                            R::RpoExceeded,
                            format!(
                                "no generation from site {active} for {lag:.0}s, rpo {rpo_s}s: the source is silent"
                            ),
                        ),
                    )
                };
                let fields = json!({
                    "phase": phase,
                    "currentLagSeconds": (lag * 10.0).round() / 10.0,
                    "rpoMet": met,
                });
                match ctx
                    .status
                    .apply(&key.namespace, &key.name, fields, &[condition])
                    .await
                {
                    Ok(()) => last_written = Some((lag, met)),
                    Err(e) => {
                        tracing::warn!(pair = %key, error = %e, "writing the DR site's view");
                        ctx.metrics.status_write_failed(&labels);
                    }
                }
                if !met && status.phase != Some(PairPhase::Stale) {
                    ctx.status
                        .event(
                            &pair,
                            true,
                            "SourceSilent",
                            "Receive",
                            format!(
                                "no generation from site {active} for {lag:.0}s (rpo {rpo_s}s)"
                            ),
                        )
                        .await;
                }
            }
        }
        tokio::time::sleep(REFRESH).await;
    }
}
