//! DRPair status and Events at one site, written by one of Ferry's components.
//!
//! Status goes through server-side apply on the `status` subresource
//! (<https://kubernetes.io/docs/reference/using-api/server-side-apply/>), one field manager per
//! component ([`Component::manager`]). The CRD declares `status.conditions` a map list keyed by
//! `type`, so the API server merges each manager's conditions by type: the replicator's
//! `Synced` and the controller's `FailoverBlocked` never overwrite each other, however their
//! writes interleave. (A JSON merge patch replaces the whole list, and its read–merge–write
//! lost the other writer's conditions when two raced.)
//!
//! An apply states everything its manager wants in status: fields it does not send are removed
//! if it alone owned them. So each write sends the fields and conditions this manager already
//! owns (read from `metadata.managedFields`), updated with the new ones. Conditions keep their
//! `lastTransitionTime` while their status does not change (Kubernetes API conventions).
//! Events go through kube-runtime's recorder (events.k8s.io/v1) under the component's name.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ManagedFieldsEntry, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Map, Value};

use ferry_schemas::conditions::{ConditionStatus, PairConditionReason, PairConditionType};
use ferry_schemas::DRPair;

/// Which of Ferry's components writes: its field manager and the Events' reporter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// The replicator (`ferry-replicator`): sync, lag, RPO, peer and standby conditions.
    Replicator,
    /// The failover controller (`ferry-controller`): quorum, fencing and failover conditions.
    Controller,
}

impl Component {
    /// The field manager name (server-side apply) and Event reporter (`reportingController`).
    pub const fn manager(self) -> &'static str {
        match self {
            Component::Replicator => "ferry-replicator",
            Component::Controller => "ferry-controller",
        }
    }
}

/// Now, as a Kubernetes `Time`.
pub fn now() -> Time {
    Time(Timestamp::now())
}

/// A condition to set: type, status, reason, message.
pub type ConditionSet = (
    PairConditionType,
    ConditionStatus,
    PairConditionReason,
    String,
);

/// `existing` with `set` applied: a condition whose status does not change keeps its
/// `lastTransitionTime`; new types are appended.
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

/// What `manager` owns of `status` through server-side apply on the status subresource: the
/// top-level status fields other than `conditions`, and the condition types. Read from
/// `metadata.managedFields` (`fieldsV1`: `f:status` → `f:<field>`, and
/// `f:conditions` → `k:{"type":"<type>"}`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OwnedStatus {
    /// Top-level status field names, e.g. `generation`.
    pub fields: BTreeSet<String>,
    /// Condition types, e.g. `Synced`.
    pub conditions: BTreeSet<String>,
}

impl OwnedStatus {
    /// From an object's managed fields.
    pub fn of(managed: &[ManagedFieldsEntry], manager: &str) -> Self {
        let mut owned = OwnedStatus::default();
        let entries = managed.iter().filter(|m| {
            m.manager.as_deref() == Some(manager)
                && m.operation.as_deref() == Some("Apply")
                && m.subresource.as_deref() == Some("status")
        });
        for entry in entries {
            let Some(status) = entry
                .fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:status"))
                .and_then(Value::as_object)
            else {
                continue;
            };
            for (key, value) in status {
                match key.strip_prefix("f:") {
                    Some("conditions") => {
                        for item in value.as_object().into_iter().flat_map(|m| m.keys()) {
                            let key = item.strip_prefix("k:").unwrap_or_default();
                            if let Ok(Value::Object(k)) = serde_json::from_str::<Value>(key) {
                                if let Some(Value::String(t)) = k.get("type") {
                                    owned.conditions.insert(t.clone());
                                }
                            }
                        }
                    }
                    Some(field) => {
                        owned.fields.insert(field.to_string());
                    }
                    None => {}
                }
            }
        }
        owned
    }
}

/// Writes DRPair status and Events at one site for one component.
#[derive(Clone)]
pub struct PairStatus {
    client: Client,
    recorder: Recorder,
    component: Component,
}

impl std::fmt::Debug for PairStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairStatus")
            .field("component", &self.component)
            .finish_non_exhaustive()
    }
}

impl PairStatus {
    /// Status and Events through `client` for `component`, Events reported by its instance at
    /// `site` (`<manager>-<site>`).
    pub fn new(client: Client, site: &str, component: Component) -> Self {
        let reporter = Reporter {
            controller: component.manager().into(),
            instance: Some(format!("{}-{site}", component.manager())),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            component,
        }
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The component writing.
    pub fn component(&self) -> Component {
        self.component
    }

    /// Sets `fields` (a JSON object of DRPair status fields, e.g. `{"phase": "Replicating"}`)
    /// and `conditions` in `namespace/name`'s status by server-side apply under this
    /// component's field manager, keeping what the manager set before. A write that would
    /// change nothing is not sent.
    ///
    /// # Errors
    /// The API error (e.g. the pair was deleted, or a permission is missing).
    pub async fn apply(
        &self,
        namespace: &str,
        name: &str,
        fields: Value,
        conditions: &[ConditionSet],
    ) -> Result<(), kube::Error> {
        let api: Api<DRPair> = Api::namespaced(self.client.clone(), namespace);
        let current = api.get_status(name).await?;
        let manager = self.component.manager();
        let owned = OwnedStatus::of(current.managed_fields(), manager);
        let current_status = serde_json::to_value(&current.status).unwrap_or(Value::Null);
        let existing = current
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();

        let mut intent = Map::new();
        for field in &owned.fields {
            if let Some(v) = current_status.get(field).filter(|v| !v.is_null()) {
                intent.insert(field.clone(), v.clone());
            }
        }
        if let Value::Object(new) = fields {
            intent.extend(new);
        }
        let mine: Vec<Condition> = existing
            .iter()
            .filter(|c| owned.conditions.contains(&c.type_))
            .cloned()
            .collect();
        // Transition times come from the list as it is, whoever set the condition last.
        let merged = merge_conditions(&existing, conditions, current.metadata.generation);
        let wanted: BTreeSet<&str> = mine
            .iter()
            .map(|c| c.type_.as_str())
            .chain(conditions.iter().map(|(t, ..)| t.as_str()))
            .collect();
        let applied: Vec<Condition> = merged
            .into_iter()
            .filter(|c| wanted.contains(c.type_.as_str()))
            .collect();

        let unchanged_fields = intent
            .iter()
            .all(|(k, v)| current_status.get(k) == Some(v) && owned.fields.contains(k));
        let unchanged_conditions =
            applied.len() == mine.len() && applied.iter().all(|c| mine.contains(c));
        if unchanged_fields && unchanged_conditions && !applied.is_empty() {
            return Ok(());
        }
        if !applied.is_empty() {
            intent.insert(
                "conditions".into(),
                serde_json::to_value(applied).unwrap_or(Value::Null),
            );
        }
        let body = json!({
            "apiVersion": "ferry.dev/v1alpha1",
            "kind": "DRPair",
            "metadata": {"name": name, "namespace": namespace},
            "status": intent,
        });
        api.patch_status(
            name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(|_| ())
    }

    /// Publishes an Event about `pair`: `warning` or normal, a CamelCase `reason`, an `action`
    /// (`Sync`, `Receive`, `Fence`), and a one-line `note`. Failures are logged, never
    /// returned.
    pub async fn event(
        &self,
        pair: &DRPair,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        publish_event(
            &self.recorder,
            &pair.object_ref(&()),
            warning,
            reason,
            action,
            note,
        )
        .await;
    }
}

/// Publishes an Event (events.k8s.io/v1) about the object `regarding` through `recorder`:
/// `warning` or normal, a CamelCase `reason`, an `action`, a one-line `note`. Failures are
/// logged, never returned: an Event is a courtesy, status is the record.
pub async fn publish_event(
    recorder: &Recorder,
    regarding: &k8s_openapi::api::core::v1::ObjectReference,
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
    if let Err(e) = recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, reason, "publishing an Event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::FieldsV1;

    fn entry(manager: &str, operation: &str, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            subresource: Some("status".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..Default::default()
        }
    }

    #[test]
    fn owned_status_reads_the_managers_apply_entry_only() {
        let managed = vec![
            entry(
                "ferry-replicator",
                "Apply",
                json!({"f:status": {
                    "f:generation": {}, "f:phase": {},
                    "f:conditions": {"k:{\"type\":\"Synced\"}": {".": {}, "f:status": {}}}
                }}),
            ),
            entry(
                "ferry-controller",
                "Apply",
                json!({"f:status": {"f:conditions": {"k:{\"type\":\"FailoverBlocked\"}": {}}}}),
            ),
            entry(
                "ferry-replicator",
                "Update",
                json!({"f:status": {"f:epoch": {}}}),
            ),
        ];
        let owned = OwnedStatus::of(&managed, "ferry-replicator");
        assert_eq!(
            owned.fields,
            BTreeSet::from(["generation".to_string(), "phase".to_string()])
        );
        assert_eq!(owned.conditions, BTreeSet::from(["Synced".to_string()]));
        let controller = OwnedStatus::of(&managed, "ferry-controller");
        assert!(controller.fields.is_empty());
        assert_eq!(
            controller.conditions,
            BTreeSet::from(["FailoverBlocked".to_string()])
        );
    }

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        use ConditionStatus as S;
        use PairConditionReason as R;
        use PairConditionType as T;
        let first = merge_conditions(
            &[],
            &[(T::Synced, S::True, R::SyncSucceeded, "g1".into())],
            Some(1),
        );
        let mut old = first.clone();
        old[0].last_transition_time = Time(Timestamp::UNIX_EPOCH);
        let same = merge_conditions(
            &old,
            &[(T::Synced, S::True, R::SyncSucceeded, "g2".into())],
            Some(1),
        );
        assert_eq!(same[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
        assert_eq!(same[0].message, "g2");
        let flipped = merge_conditions(
            &old,
            &[(T::Synced, S::False, R::SyncFailed, "x".into())],
            Some(1),
        );
        assert_ne!(flipped[0].last_transition_time, Time(Timestamp::UNIX_EPOCH));
    }
}
