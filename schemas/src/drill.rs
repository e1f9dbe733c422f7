//! `DRDrill`: a recovery test of a DRPair at its DR site: a committed generation restored into
//! a sandbox namespace, started, verified, timed and cleaned up, while replication goes on.
//!
//! Modelled on Zerto's test failover: the production copy is never touched (the drill's PVCs
//! are new volumes cloned from the generation's VolumeSnapshots), the active site is never
//! contacted, and the pair's epoch and the witness quorum are left alone.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::Generation;

/// Which pair to test, from which generation, how to verify it and how long to keep it.
/// Generates the namespaced `DRDrill` kind (short name `drill`), created in the pair's
/// namespace at the pair's DR site (the site where it is not active).
// kube's printcolumn(...) lists repeat `type_ = "string"`, which clippy misreads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "DRDrill",
    plural = "drdrills",
    namespaced,
    shortname = "drill",
    status = "DRDrillStatus",
    derive = "PartialEq",
    doc = "A recovery test of a DRPair at its DR site, and its result.",
    printcolumn(name = "Pair", type_ = "string", json_path = ".spec.pair"),
    printcolumn(
        name = "Generation",
        type_ = "integer",
        json_path = ".status.generation"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "RTO",
        type_ = "number",
        json_path = ".status.rtoSeconds",
        description = "Seconds from the drill's start to the application ready in the sandbox"
    ),
    printcolumn(
        name = "Data-Age",
        type_ = "number",
        json_path = ".status.dataAgeSeconds",
        description = "Seconds between the generation's capture and the drill's start"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct DRDrillSpec {
    /// Name of the DRPair to test, in the DRDrill's namespace.
    #[schemars(length(min = 1))]
    pub pair: String,
    /// Committed generation to restore; default: the newest committed at this site.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    /// Sandbox namespace; default `<namespace>-drill-<first 8 characters of the uid>`. It
    /// must not exist: the drill creates it and deletes it afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    /// How long the sandbox is kept after the verdict (humantime, e.g. `30m`); default `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// How to verify the restored app; absent: its workloads becoming ready is the verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<DrillVerify>,
}

/// How a drill is verified: a command run in one of the restored app's pods (through
/// `pods/exec`, in the first running pod by name), or a Job run in the sandbox; its exit status
/// is the verdict. A command may run again after a controller restart, so it must be safe to
/// repeat (read-only checks are).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillVerify {
    /// Container to run it in; required for pods with several containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The command and its arguments (no shell unless you name one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Instead of a command: the `spec` of a `batch/v1` Job created in the sandbox (as
    /// `ferry-drill-verify`); the drill passes when the Job completes and fails when it fails.
    /// Its pods can mount the sandbox's PVCs by their names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::any_object")]
    pub job: Option<serde_json::Value>,
}

/// `spec.drill` of a DRPair: drills the DR site's controller creates on its own, one every
/// `every`, each a DRDrill named `<pair>-<unix seconds>` labelled `ferry.dev/pair` and
/// `ferry.dev/scheduled: "true"` (the newest 5 are kept).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrillSchedule {
    /// How often (humantime, e.g. `7d`; at least `10s`). `DrillOverdue` turns True on the
    /// DR site's DRPair when no drill passed within `every` plus the smaller of `every` and
    /// one day.
    #[schemars(length(min = 1))]
    pub every: String,
    /// `spec.ttl` of each drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// `spec.verify` of each drill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<DrillVerify>,
}

wire_enum! {
    /// Phase of a DRDrill, in the order they run.
    pub enum DrillPhase {
        /// Accepted, not started.
        Pending = "Pending",
        /// Cloning the generation's volumes into the sandbox and applying its manifests.
        Restoring = "Restoring",
        /// The app is ready; the verification runs.
        Verifying = "Verifying",
        /// Verified; the sandbox stays until the TTL ends.
        Passed = "Passed",
        /// The restore or the verification failed; the condition says why.
        Failed = "Failed",
        /// The sandbox is gone (terminal).
        CleanedUp = "CleanedUp",
    }
}

/// Observed state of a DRDrill, written by the failover controller at the DR site. Times are
/// RFC 3339; durations are seconds as floating-point numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DRDrillStatus {
    /// Current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<DrillPhase>,
    /// The generation restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    /// The sandbox namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    /// When the drill started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the sandbox's objects were applied (after that only readiness is watched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_time: Option<Time>,
    /// When the restored app's workloads were all ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<Time>,
    /// When the verdict was reached (Passed or Failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Measured recovery time: seconds from startTime to readyTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
    /// Seconds from the generation's capture to startTime: the data a failover at that
    /// instant would have lost. Known for the newest committed generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_age_seconds: Option<f64>,
    /// The last lines of the verification command's output (stdout, then stderr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    /// Conditions keyed by type: `Succeeded` (True once Passed, False once Failed, naming
    /// the cause).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The result of a pair's last drill, as the DR site's DRPair status records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastDrill {
    /// The DRDrill's name.
    pub name: String,
    /// When its verdict was reached.
    pub time: Time,
    /// `Passed` or `Failed`.
    pub result: String,
    /// Its measured recovery time, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
}
