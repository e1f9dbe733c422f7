//! `DRPair`: one application replicated from a primary site to a secondary site.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::duration::DURATION_PATTERN;
use crate::ids::{Epoch, Generation};

/// `spec.retainGenerations` when omitted.
pub const DEFAULT_RETAIN_GENERATIONS: u32 = 3;

/// Desired replication of one application, the objects matched by selector in
/// this namespace, from primarySite to secondarySite.
///
/// Generates the namespaced `DRPair` kind (short name `drp`); the same object
/// exists on both sites. Rules the schema cannot express (distinct sites, the
/// minimum RPO, a non-empty selector) are checked by the controller, which
/// reports violations in the Ready condition.
// kube's printcolumn(...) lists repeat `type_ = "string"`, which clippy misreads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "DRPair",
    plural = "drpairs",
    namespaced,
    shortname = "drp",
    status = "DRPairStatus",
    derive = "PartialEq",
    doc = "Replication of one application between a primary and a secondary site.",
    printcolumn(name = "Active", type_ = "string", json_path = ".status.activeSite"),
    printcolumn(name = "RPO", type_ = "string", json_path = ".spec.rpo"),
    printcolumn(
        name = "Lag",
        type_ = "number",
        json_path = ".status.currentLagSeconds",
        description = "Seconds since the newest complete generation at the destination was captured"
    ),
    printcolumn(name = "Last-Sync", type_ = "date", json_path = ".status.lastSyncTime"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Last-Drill",
        type_ = "string",
        json_path = ".status.lastDrill.result",
        priority = 1,
        description = "Result of the pair's last DRDrill at this site"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
// Checked at admission by the API server (CEL, Kubernetes 1.29+); the controller checks again.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.primarySite != self.secondarySite",
    "message": "must differ from spec.primarySite",
    "fieldPath": ".secondarySite"
}]))]
pub struct DRPairSpec {
    /// Selects the application's objects (workloads, PVCs, ConfigMaps,
    /// Secrets, Services...) in this namespace. Must not be empty.
    pub selector: LabelSelector,
    /// Name of the Site the application normally runs on.
    #[schemars(length(min = 1, max = 253))]
    pub primary_site: String,
    /// Name of the Site that receives the replicas; must differ from primarySite.
    #[schemars(length(min = 1, max = 253))]
    pub secondary_site: String,
    /// Recovery point objective: the most data, as time, the pair may lose.
    /// Ferry syncs often enough that the newest complete generation at the
    /// destination is never older than this. Integer and unit pairs without
    /// spaces: 30s, 5m, 1h30m, 500ms (units ns, us, ms, s, m, h, d). At least 10s.
    // CEL's duration() has no `d` unit; anything in days is well above the minimum.
    #[schemars(
        regex(pattern = DURATION_PATTERN),
        length(max = 32),
        extend("x-kubernetes-validations" = [{
            "rule": "self.contains('d') || duration(self) >= duration('10s')",
            "message": "must be at least 10s"
        }])
    )]
    pub rpo: String,
    /// Names of the PersistentVolumeClaims to replicate. Omitted: every PVC
    /// matched by the selector, Filesystem and Block mode alike. Empty list:
    /// manifests only, no volume data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<String>>,
    /// How manifests are rewritten before they are stored or applied at the
    /// destination.
    #[serde(default, skip_serializing_if = "Transform::is_empty")]
    pub transform: Transform,
    /// What the destination does with each complete generation.
    #[serde(default)]
    pub standby: StandbyMode,
    /// Commands run in the application's pods around each capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hooks: Option<Hooks>,
    /// When and how the pair fails over to the secondary site.
    #[serde(default)]
    pub failover: FailoverSpec,
    /// How many complete generations each destination keeps (the newest
    /// plus older ones to roll back to). At least 1; default 3.
    #[serde(default = "default_retain_generations")]
    #[schemars(range(min = 1))]
    pub retain_generations: u32,
    /// What deleting the DRPair at its active site does to the copy at the other site:
    /// `Retain` (default) keeps every generation there and marks that site's DRPair
    /// `Detached`; `Delete` removes the copy at both sites. Deleting the app's namespace
    /// always retains.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// Every this many generations the source reads every volume whole. In the others a file
    /// of a Filesystem volume whose size and modification time (ns) match the previous
    /// generation is not read (rsync's and restic's quick check), which misses only a file
    /// rewritten in place with its old mtime restored, and a Block volume is read through the
    /// CSI driver's changed block tracking where it has one. At least 1 (1: always read
    /// everything); default 24.
    #[serde(default = "default_full_scan_every")]
    #[schemars(range(min = 1))]
    pub full_scan_every: u32,
    /// Scheduled DR drills at the DR site (see the DRDrill kind); none when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<crate::drill::DrillSchedule>,
}

fn default_retain_generations() -> u32 {
    DEFAULT_RETAIN_GENERATIONS
}

/// Default of `spec.fullScanEvery`: with `rpo: 1m`, a full read about every 24 minutes.
pub const DEFAULT_FULL_SCAN_EVERY: u32 = 24;

fn default_full_scan_every() -> u32 {
    DEFAULT_FULL_SCAN_EVERY
}

/// Manifest rewrites applied at the destination, in this order: labels,
/// replicas, storage classes, then `patches` in list order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Transform {
    /// Label changes applied to every replicated object.
    #[serde(default, skip_serializing_if = "LabelTransform::is_empty")]
    pub labels: LabelTransform,
    /// Replica counts of Deployments and StatefulSets at the destination.
    #[serde(default)]
    pub replicas: ReplicasTransform,
    /// Source StorageClass name to destination StorageClass name, for PVCs.
    /// Classes not listed keep their name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub storage_class_map: BTreeMap<String, String>,
    /// JSON Patches (RFC 6902) applied to matching objects, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<ResourcePatch>,
}

impl Transform {
    /// Whether this is the default transform (nothing rewritten, replicas restored).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// Label changes applied to every replicated object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LabelTransform {
    /// Labels added, or overwritten, with these values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Label keys removed. A key may not be both set and removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl LabelTransform {
    /// Whether no label is set or removed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

wire_enum! {
    /// How replica counts are set when the application is instantiated at the destination.
    #[derive(Default)]
    pub enum ReplicaPolicy {
        /// The count the workload had at the source when it was captured.
        #[default]
        Restore = "Restore",
        /// `count` replicas for every workload.
        Fixed = "Fixed",
        /// Zero replicas: objects exist but nothing runs until scaled up.
        Zero = "Zero",
    }
}

/// Replica counts at the destination: a policy, plus `count` when it is `Fixed`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
// Checked at admission by the API server (CEL); the controller checks again.
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.policy) && self.policy == 'Fixed' ? has(self.count) : !has(self.count)",
    "message": "count is required when policy is Fixed, and forbidden otherwise",
    "fieldPath": ".count"
}]))]
pub struct ReplicasTransform {
    /// Restore (default), Fixed or Zero.
    #[serde(default)]
    pub policy: ReplicaPolicy,
    /// Replicas per workload; required when policy is Fixed, forbidden otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub count: Option<i32>,
}

/// A JSON Patch applied to every replicated object of one kind (and
/// optionally one name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResourcePatch {
    /// API group of the target objects; "" (the default) for the core group.
    #[serde(default)]
    pub group: String,
    /// Kind of the target objects, e.g. Deployment.
    #[schemars(length(min = 1))]
    pub kind: String,
    /// Name of the one target object; omitted: every object of the kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// RFC 6902 operations, applied in order; the whole patch fails if one does.
    #[schemars(length(min = 1))]
    pub patch: Vec<JsonPatchOperation>,
}

wire_enum! {
    /// An RFC 6902 operation name (lower case, as the RFC spells them).
    pub enum PatchOp {
        /// Adds `value` at `path` (RFC 6902 §4.1).
        Add = "add",
        /// Removes the value at `path` (§4.2).
        Remove = "remove",
        /// Replaces the value at `path` with `value` (§4.3).
        Replace = "replace",
        /// Moves the value at `from` to `path` (§4.4).
        Move = "move",
        /// Copies the value at `from` to `path` (§4.5).
        Copy = "copy",
        /// Fails the patch unless the value at `path` equals `value` (§4.6).
        Test = "test",
    }
}

/// One RFC 6902 operation.
///
/// `value` is required by `add`, `replace` and `test` and `from` by `move` and
/// `copy` (checked by validation); members an operation does not use are
/// ignored, as the RFC says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JsonPatchOperation {
    /// add, remove, replace, move, copy or test.
    pub op: PatchOp,
    /// JSON Pointer (RFC 6901) to the target location, e.g. /spec/replicas.
    pub path: String,
    /// Any JSON value, including null; for add, replace and test.
    #[serde(
        default,
        deserialize_with = "present_value",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(schema_with = "crate::schema::any_json")]
    pub value: Option<Value>,
    /// JSON Pointer to the source location; for move and copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// Deserializes a present `value` member, keeping an explicit `null` as
/// `Some(Value::Null)` (plain `Option<Value>` would turn it into `None`).
fn present_value<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

wire_enum! {
    /// What the destination does with each complete generation.
    #[derive(Default)]
    pub enum StandbyMode {
        /// Keep volumes and manifests in staging; apply nothing until a
        /// migration or failover (cold standby).
        #[default]
        Stored = "Stored",
        /// Also apply the manifests with zero replicas and keep volumes bound,
        /// so a failover only scales up (warm standby).
        Applied = "Applied",
    }
}

wire_enum! {
    /// What deleting a DRPair at its active site does to the pair's copy at the other site
    /// (`spec.deletionPolicy`), after the `persistentVolumeReclaimPolicy` of a
    /// PersistentVolume.
    #[derive(Default)]
    pub enum DeletionPolicy {
        /// The other site keeps its generations (snapshots, manifests, staging volumes)
        /// and its DRPair, marked `Detached`: still usable by a Failover Migration there.
        #[default]
        Retain = "Retain",
        /// Both sites remove everything Ferry made for the pair: replica PVCs,
        /// VolumeSnapshots, manifests Secrets, movers, Leases and the other site's DRPair.
        Delete = "Delete",
    }
}

/// Commands run in the application's pods around each capture.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hooks {
    /// Runs before volumes are captured, e.g. to flush and freeze writes. If it
    /// fails or times out the capture is abandoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_capture: Option<Hook>,
    /// Runs after volumes are captured, even if the capture failed, e.g. to
    /// thaw writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post_capture: Option<Hook>,
}

/// A command executed in every selected pod (like `kubectl exec`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Hook {
    /// Program and arguments; not run through a shell.
    #[schemars(length(min = 1))]
    pub command: Vec<String>,
    /// Container to run it in; default: the pod's first container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Seconds before the hook is killed and counted as failed; default 30.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<u32>,
}

wire_enum! {
    /// Who decides to fail over when the primary site is lost.
    #[derive(Default)]
    pub enum FailoverMode {
        /// Only a person, by creating a Migration of type Failover.
        #[default]
        Manual = "Manual",
        /// Ferry, once the witness quorum agrees the primary has been lost for
        /// siteLossTimeout and the data loss would be within dataLossAllowance.
        Automatic = "Automatic",
    }
}

/// When and how the pair fails over to the secondary site.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverSpec {
    /// Manual (default) or Automatic.
    #[serde(default)]
    pub mode: FailoverMode,
    /// Automatic failover only proceeds if the newest complete generation at
    /// the secondary is at most this old. Same syntax as rpo; default: the rpo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub data_loss_allowance: Option<String>,
    /// How long the primary must be unreachable, as agreed by the witness
    /// quorum, before it counts as lost. Same syntax as rpo; default 2m, at least 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub site_loss_timeout: Option<String>,
}

wire_enum! {
    /// Lifecycle phase of a DRPair. Conditions carry the detail; the phase is a
    /// summary for people and printer columns.
    pub enum PairPhase {
        /// Accepted, not yet checked: no status written beyond this.
        Pending = "Pending",
        /// Spec valid; the first full sync is running and no complete
        /// generation exists at the destination yet.
        Initializing = "Initializing",
        /// Healthy: a complete generation exists at the destination, syncs
        /// run and the RPO is met.
        Replicating = "Replicating",
        /// Still replicating or trying to, but the RPO is missed, the last
        /// sync failed or the peer is unreachable (see conditions).
        Degraded = "Degraded",
        /// A Migration owns the pair; regular syncs are paused.
        Migrating = "Migrating",
        /// The application was failed over to the secondary and the pair is
        /// unprotected until failback or re-protection.
        FailedOver = "FailedOver",
        /// This site lost its witness lease (or learned a newer epoch): the app is scaled to
        /// zero here and nothing is shipped until the lease is held again.
        Fenced = "Fenced",
        /// The spec is invalid or a permanent error stopped replication; the
        /// Ready condition's message says why.
        Error = "Error",
        /// At a site holding the pair's copy: no generation arrived for longer than
        /// `spec.rpo`, so the source is silent (lost, partitioned or stopped);
        /// `currentLagSeconds` keeps growing and `RPOMet` is `False`.
        Stale = "Stale",
        /// At a site holding the pair's copy: the pair was deleted at its active site with
        /// `deletionPolicy: Retain`. The generations here are kept and nothing more arrives;
        /// a Failover Migration here can still start the app from them.
        Detached = "Detached",
    }
}

/// Observed state of a DRPair, written by the failover controller from what the
/// replicators report. Units: times are RFC 3339 (second precision), durations
/// are seconds as floating-point numbers (lastSyncDurationSeconds,
/// currentLagSeconds), sizes are bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DRPairStatus {
    /// Summary phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PairPhase>,
    /// Site the application currently runs on (the replication source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_site: Option<String>,
    /// Fencing epoch: grows by one each time the active site changes; older
    /// epochs are rejected by every replicator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// Newest generation that is complete (committed) at the destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    /// When the newest complete generation finished committing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// When the newest complete generation was captured at the source (its point in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_capture_time: Option<Time>,
    /// Seconds the newest complete generation took from capture start to commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_duration_seconds: Option<f64>,
    /// Bytes shipped for the newest complete generation (changed data only,
    /// after delta; not the volume size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_bytes: Option<u64>,
    /// Seconds between the capture of the newest complete generation at the
    /// destination and the time this status was written: the data, as time,
    /// a failover now would lose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_lag_seconds: Option<f64>,
    /// Whether currentLagSeconds is within spec.rpo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_met: Option<bool>,
    /// metadata.generation of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The value of the `ferry.dev/sync-request` annotation last honoured: a
    /// generation captured after that request was seen is committed at the
    /// destination. A controller that needs a sync now (a migration's final
    /// sync) sets a new annotation value and waits for it to appear here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_request: Option<String>,
    /// At the DR site: the pair's last DRDrill there and its result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill: Option<crate::drill::LastDrill>,
    /// Conditions keyed by type: Synced, PeerReachable, RPOMet, Ready,
    /// FailoverBlocked, WitnessQuorumLost, at a warm standby StandbyApplied and, at the
    /// source of a pair with Block volumes, ChangedBlockTracking.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_value_keeps_explicit_null() {
        let with_null: JsonPatchOperation =
            serde_json::from_str(r#"{"op":"add","path":"/a","value":null}"#).unwrap();
        assert_eq!(with_null.value, Some(Value::Null));
        let absent: JsonPatchOperation =
            serde_json::from_str(r#"{"op":"remove","path":"/a"}"#).unwrap();
        assert_eq!(absent.value, None);
        assert_eq!(
            serde_json::to_string(&with_null).unwrap(),
            r#"{"op":"add","path":"/a","value":null}"#
        );
    }

    #[test]
    fn defaults_apply_when_fields_are_omitted() {
        let spec: DRPairSpec = serde_json::from_value(serde_json::json!({
            "selector": {"matchLabels": {"app": "db"}},
            "primarySite": "a",
            "secondarySite": "b",
            "rpo": "1m",
        }))
        .unwrap();
        assert_eq!(spec.retain_generations, DEFAULT_RETAIN_GENERATIONS);
        assert_eq!(spec.standby, StandbyMode::Stored);
        assert_eq!(spec.failover.mode, FailoverMode::Manual);
        assert_eq!(spec.transform.replicas.policy, ReplicaPolicy::Restore);
        assert_eq!(spec.volumes, None);
    }
}
