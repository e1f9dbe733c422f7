//! `Migration`: one request to move a DRPair's application to another site, and its progress.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::ids::{Epoch, Generation};

/// Which pair to move where, and how. Generates the namespaced `Migration`
/// kind (short name `mig`); run once, then kept as history.
// kube's printcolumn(...) lists repeat `type_ = "string"`, which clippy misreads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Migration",
    plural = "migrations",
    namespaced,
    shortname = "mig",
    status = "MigrationStatus",
    derive = "PartialEq",
    doc = "A request to move a DRPair's application to another site, and its progress.",
    printcolumn(name = "Pair", type_ = "string", json_path = ".spec.pair"),
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetSite"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "RTO",
        type_ = "number",
        json_path = ".status.rtoSeconds",
        description = "Seconds from start to the application running at the target"
    ),
    printcolumn(
        name = "Data-Loss",
        type_ = "number",
        json_path = ".status.dataLossSeconds",
        description = "Seconds of writes at the source not carried to the target"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationSpec {
    /// Name of the DRPair to migrate, in the Migration's namespace.
    #[schemars(length(min = 1))]
    pub pair: String,
    /// Site to run the application on afterwards: one of the pair's sites.
    #[schemars(length(min = 1))]
    pub target_site: String,
    /// Planned (default), Failover or Failback.
    #[serde(default, rename = "type")]
    pub type_: MigrationType,
}

wire_enum! {
    /// Kind of migration (`spec.type`).
    #[derive(Default)]
    pub enum MigrationType {
        /// Both sites are up: quiesce the source, final sync, then switch.
        /// Loses no data.
        #[default]
        Planned = "Planned",
        /// The active site is lost or must be abandoned: promote the newest
        /// complete generation at the target. Loses the writes after it.
        Failover = "Failover",
        /// Return to the pair's primarySite after a failover, once it is back:
        /// a planned migration in the reverse direction.
        Failback = "Failback",
    }
}

wire_enum! {
    /// Phase of a Migration, in the order they run. A Failover skips Quiescing
    /// and FinalSync when the source is unreachable.
    pub enum MigrationPhase {
        /// Accepted; waiting for the pair to be free (one migration at a time).
        Pending = "Pending",
        /// Scaling the application down at the source so no more writes happen.
        Quiescing = "Quiescing",
        /// Capturing and shipping the last generation from the quiesced source.
        FinalSync = "FinalSync",
        /// Advancing the epoch at the target, which fences the old source.
        Promoting = "Promoting",
        /// Applying the generation's manifests at the target and scaling up.
        Instantiating = "Instantiating",
        /// The application runs at the target (terminal).
        Completed = "Completed",
        /// Stopped without completing; the Failed condition says why (terminal).
        Failed = "Failed",
    }
}

impl MigrationPhase {
    /// Whether the migration has stopped (Completed or Failed) and will not change again.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed)
    }
}

/// When a Migration entered one phase.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTime {
    /// The phase.
    pub phase: MigrationPhase,
    /// When it started (RFC 3339).
    pub start_time: Time,
}

/// Observed state of a Migration, written by the failover controller. Units:
/// times are RFC 3339 (second precision), durations are seconds as
/// floating-point numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// Current phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<MigrationPhase>,
    /// Start time of each phase entered so far, in the order entered; skipped
    /// phases are absent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["phase"]))]
    pub phase_times: Vec<PhaseTime>,
    /// When the controller started acting on the migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When it reached Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Seconds of writes accepted at the source that are not in the generation
    /// promoted at the target: from that generation's capture to the moment
    /// the source stopped taking writes (quiesced or lost). 0 for a completed
    /// Planned migration or Failback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_loss_seconds: Option<f64>,
    /// Recovery time in seconds: from startTime until the application was
    /// running at the target (completionTime of a Completed migration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rto_seconds: Option<f64>,
    /// Generation promoted at the target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    /// Epoch the pair has after promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// metadata.generation of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions keyed by type: Progressing, Complete, Failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
