//! DRPair status and Events, at this site.
//!
//! Status is written with JSON merge patches (RFC 7386) to the `status` subresource; the
//! conditions list is rewritten whole, keeping each condition's `lastTransitionTime` while its
//! status does not change (Kubernetes API conventions). Events go through kube-runtime's
//! recorder (events.k8s.io/v1).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use serde_json::{json, Value};

use ferry_schemas::conditions::{ConditionStatus, PairConditionReason, PairConditionType};
use ferry_schemas::DRPair;

/// Field manager and Event reporter name.
pub const MANAGER: &str = "ferry-replicator";

/// Now, as a Kubernetes `Time`.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// Writes DRPair status and Events at one site.
#[derive(Clone)]
pub struct PairStatus {
    client: Client,
    recorder: Recorder,
}

impl std::fmt::Debug for PairStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairStatus").finish_non_exhaustive()
    }
}

/// A condition to set: type, status, reason, message.
pub type ConditionSet = (
    PairConditionType,
    ConditionStatus,
    PairConditionReason,
    String,
);

/// `conditions` with `set` applied: same-status conditions keep their transition time.
pub fn merge_conditions(
    existing: &[Condition],
    set: &[ConditionSet],
    observed_generation: Option<i64>,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing.to_vec();
    for (type_, status, reason, message) in set {
        let mut condition = type_.condition(
            *status,
            *reason,
            message.clone(),
            observed_generation,
            now(),
        );
        if let Some(old) = out.iter_mut().find(|c| c.type_ == type_.as_str()) {
            if old.status == condition.status {
                condition.last_transition_time = old.last_transition_time.clone();
            }
            *old = condition;
        } else {
            out.push(condition);
        }
    }
    out
}

impl PairStatus {
    /// Status and Events through `client`, Events reported by this site's replicator pod.
    pub fn new(client: Client, site: &str) -> Self {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: Some(format!("{MANAGER}-{site}")),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Merges `status` (a JSON object of DRPair status fields) into `namespace/name`'s status,
    /// with `conditions` applied to the current ones. With conditions to apply, a patch that
    /// would change nothing is not sent.
    ///
    /// # Errors
    /// The API error (e.g. the pair was deleted).
    pub async fn patch(
        &self,
        namespace: &str,
        name: &str,
        mut status: Value,
        conditions: &[ConditionSet],
    ) -> Result<(), kube::Error> {
        let api: Api<DRPair> = Api::namespaced(self.client.clone(), namespace);
        if !conditions.is_empty() {
            let current = api.get_status(name).await?;
            let current_status = serde_json::to_value(&current.status).unwrap_or(Value::Null);
            let existing = current.status.map(|s| s.conditions).unwrap_or_default();
            let merged = merge_conditions(&existing, conditions, current.metadata.generation);
            // Nothing changes: skip the write (agents refresh conditions every tick).
            let fields_unchanged = status
                .as_object()
                .is_none_or(|fields| fields.iter().all(|(k, v)| current_status.get(k) == Some(v)));
            if fields_unchanged && merged == existing {
                return Ok(());
            }
            status["conditions"] = serde_json::to_value(merged).unwrap_or(Value::Null);
        }
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map(|_| ())
    }

    /// Publishes an Event about `pair`: `warning` or normal, a CamelCase `reason`, an `action`
    /// (`Sync`, `Receive`), and a one-line `note`. Failures are logged, never returned.
    pub async fn event(
        &self,
        pair: &DRPair,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &pair.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "publishing an Event failed");
        }
    }
}
