//! Status condition types and reasons for Ferry's CRDs, as enums over metav1 `Condition`.
//!
//! Conditions follow the Kubernetes API conventions ("Typical status
//! properties" in sig-architecture/api-conventions.md): the list is keyed by
//! `type`, `status` is `True`, `False` or `Unknown`, `reason` is a CamelCase
//! machine-readable word and `message` is for people. `lastTransitionTime`
//! changes only when `status` changes. The wire format stays metav1
//! [`Condition`] so `kubectl wait --for=condition=Ready` works; these enums are
//! the only way Ferry code names a type or a reason.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

wire_enum! {
    /// `status` of a condition, per the Kubernetes API conventions.
    pub enum ConditionStatus {
        /// The condition holds.
        True = "True",
        /// The condition does not hold.
        False = "False",
        /// The controller cannot tell (for example, the peer site is unreachable).
        Unknown = "Unknown",
    }
}

impl From<bool> for ConditionStatus {
    fn from(holds: bool) -> Self {
        if holds {
            Self::True
        } else {
            Self::False
        }
    }
}

wire_enum! {
    /// Condition types of a [`DRPair`](crate::DRPair) (`status.conditions[].type`).
    ///
    /// `Synced`, `PeerReachable`, `RPOMet` and `Ready` are "normal-true": `True`
    /// is the healthy state. `FailoverBlocked` and `WitnessQuorumLost` are
    /// "abnormal-true" and are only present (or `False`) when healthy.
    pub enum PairConditionType {
        /// The newest capture reached the destination and was committed as a
        /// complete generation.
        Synced = "Synced",
        /// The peer site's replicator answered its last health check.
        PeerReachable = "PeerReachable",
        /// The age of the newest complete generation at the destination is
        /// within `spec.rpo` (mirrors `status.rpoMet`).
        RpoMet = "RPOMet",
        /// The pair is protected: the spec is valid, at least one complete
        /// generation exists at the destination and no migration is running.
        Ready = "Ready",
        /// Reserved: an automatic failover is wanted but not allowed (manual
        /// mode, data loss above `spec.failover.dataLossAllowance`, or no
        /// witness quorum).
        FailoverBlocked = "FailoverBlocked",
        /// Reserved: the witness quorum that arbitrates automatic failover
        /// cannot be reached from this site.
        WitnessQuorumLost = "WitnessQuorumLost",
        /// At the destination, with `spec.standby: Applied`: the newest generation's
        /// manifests are applied here, parked (normal-true). Written only once a pair has
        /// been in warm standby; `False` with `StandbyStored` after a switch back to cold.
        StandbyApplied = "StandbyApplied",
        /// At the source, for pairs with Block volumes (normal-true): the last sync read only
        /// the blocks the CSI driver's changed block tracking reported (KEP-3314
        /// SnapshotMetadata `GetMetadataDelta`). `False` with `FullScan` names each volume
        /// read whole and why (no SnapshotMetadataService for the driver, base snapshot gone,
        /// token refused, an error, a resized volume). Written once a volume has a base.
        ChangedBlockTracking = "ChangedBlockTracking",
        /// At the DR site, with `spec.drill` (abnormal-true): no drill of the pair passed
        /// within `spec.drill.every` plus the smaller of `every` and one day.
        DrillOverdue = "DrillOverdue",
    }
}

wire_enum! {
    /// Reasons for [`PairConditionType`] conditions (`status.conditions[].reason`).
    pub enum PairConditionReason {
        /// `Synced=True`: the last sync committed a generation.
        SyncSucceeded = "SyncSucceeded",
        /// `ChangedBlockTracking=True`: every Block volume was read through changed block
        /// tracking.
        ChangedBlocksRead = "ChangedBlocksRead",
        /// `ChangedBlockTracking=False`: at least one Block volume was read whole; the message
        /// names it and why.
        FullScan = "FullScan",
        /// `Synced=Unknown`: a sync is running and none has completed yet since
        /// the spec changed.
        SyncInProgress = "SyncInProgress",
        /// `Synced=False`: the last sync failed; the message says at which step.
        SyncFailed = "SyncFailed",
        /// `Synced=False` / `Ready=False`: no complete generation exists at the
        /// destination yet (initial sync).
        NoCompleteGeneration = "NoCompleteGeneration",
        /// `PeerReachable=True`.
        PeerResponding = "PeerResponding",
        /// `PeerReachable=False`: the peer's replicator did not answer.
        PeerUnreachable = "PeerUnreachable",
        /// `RPOMet=True`.
        WithinRpo = "WithinRPO",
        /// `RPOMet=False`: the newest complete generation is older than `spec.rpo`.
        RpoExceeded = "RPOExceeded",
        /// `Ready=True`.
        Protected = "Protected",
        /// `Ready=False`: the spec failed controller validation; the message
        /// lists every field error.
        InvalidSpec = "InvalidSpec",
        /// `Ready=False`: a Migration owns the pair.
        MigrationInProgress = "MigrationInProgress",
        /// `Ready=False`: the pair failed over and is not protected until a
        /// failback or re-protect.
        FailedOver = "FailedOver",
        /// `FailoverBlocked=True`: `spec.failover.mode` is `Manual`.
        ManualMode = "ManualMode",
        /// `FailoverBlocked=True`: failing over now would lose more than
        /// `spec.failover.dataLossAllowance`.
        DataLossAllowanceExceeded = "DataLossAllowanceExceeded",
        /// `FailoverBlocked=True` / `WitnessQuorumLost=True`: no witness quorum.
        QuorumLost = "QuorumLost",
        /// `FailoverBlocked=False` / `WitnessQuorumLost=False`.
        QuorumHeld = "QuorumHeld",
        /// `FailoverBlocked=True`: a condition of the failover rule does not hold (the
        /// secondary is unhealthy, holds no generation, or the loss is not yet agreed); the
        /// message is the witness leader's reason.
        FailoverRuleUnmet = "FailoverRuleUnmet",
        /// `Ready=False`: this site lost its witness lease or learned a newer epoch; the app
        /// is scaled to zero here (fenced).
        Fenced = "Fenced",
        /// `Ready=False`: the pair selects objects or PVCs that a DRPair created before it in
        /// the namespace already protects; it does not replicate. The message names that pair
        /// and the shared objects.
        OverlapsPair = "OverlapsPair",
        /// `StandbyApplied=True`: the newest generation's manifests are applied, parked.
        StandbyCurrent = "StandbyCurrent",
        /// `StandbyApplied=False`: applying a generation's manifests at the destination
        /// failed; the message names the object and the API server's answer (a missing
        /// permission names the verb and resource). The generation itself is committed.
        StandbyApplyFailed = "StandbyApplyFailed",
        /// `StandbyApplied=False`: `spec.standby` is `Stored` (cold standby): nothing is
        /// applied here until a migration or failover.
        StandbyStored = "StandbyStored",
        /// `DrillOverdue=False`: a drill passed recently enough; the message says when.
        DrillPassedRecently = "DrillPassedRecently",
        /// `DrillOverdue=True`: the message says when a drill last passed, if ever.
        NoRecentDrill = "NoRecentDrill",
        /// `Ready=False` at the site holding the copy: the pair was deleted at its active
        /// site with `deletionPolicy: Retain`; the message names that site and the
        /// generations kept here.
        Detached = "Detached",
        /// `Ready=False` at the active site, while the DRPair is being deleted: the other
        /// site could not be told (the message names it and the error); the finalizer
        /// stays until it can, or until the release-without-peer annotation is set.
        PeerReleasePending = "PeerReleasePending",
    }
}

wire_enum! {
    /// Condition types of a [`Migration`](crate::Migration), after `batch/v1` Job:
    /// `Progressing` while running, then exactly one of `Complete` or `Failed`.
    pub enum MigrationConditionType {
        /// The migration is running (`True`) or has stopped (`False`).
        Progressing = "Progressing",
        /// The application runs at the target site.
        Complete = "Complete",
        /// The migration stopped without completing; the reason says where.
        Failed = "Failed",
    }
}

wire_enum! {
    /// Reasons for [`MigrationConditionType`] conditions.
    pub enum MigrationConditionReason {
        /// `Progressing=True`: a phase is running (see `status.phase`).
        InProgress = "InProgress",
        /// `Complete=True`.
        Succeeded = "Succeeded",
        /// `Failed=True`: the spec failed controller validation.
        InvalidSpec = "InvalidSpec",
        /// `Failed=True`: the referenced DRPair does not exist.
        PairNotFound = "PairNotFound",
        /// `Failed=True`: a pre/post-capture hook failed or timed out.
        HookFailed = "HookFailed",
        /// `Failed=True`: the final sync did not commit.
        FinalSyncFailed = "FinalSyncFailed",
        /// `Failed=True`: the epoch could not be advanced at the target (fencing).
        PromotionFailed = "PromotionFailed",
        /// `Failed=True`: the generation's manifests could not be applied at the target.
        InstantiationFailed = "InstantiationFailed",
        /// `Failed=True`: the target holds no complete generation of the pair yet,
        /// or the migration was created at a site where the app is not active.
        TargetNotReady = "TargetNotReady",
        /// `Failed=True`: the target site's replicator did not answer.
        TargetUnreachable = "TargetUnreachable",
        /// `Failed=True`: a failover would lose more than `spec.failover.dataLossAllowance`.
        DataLossAllowanceExceeded = "DataLossAllowanceExceeded",
        /// `Failed=True`: the witness quorum could not be reached, or refused the move (a
        /// stale epoch); a failover needs the quorum's decision.
        QuorumUnavailable = "QuorumUnavailable",
    }
}

wire_enum! {
    /// Condition types of a [`Site`](crate::Site).
    pub enum SiteConditionType {
        /// The site's replicator answered its last health check.
        Reachable = "Reachable",
        /// The TLS secret (and kubeconfig secret, if set) exist and were accepted.
        CredentialsValid = "CredentialsValid",
    }
}

wire_enum! {
    /// Reasons for [`SiteConditionType`] conditions.
    pub enum SiteConditionReason {
        /// `Reachable=True`.
        Responding = "Responding",
        /// `Reachable=False`: no answer from `spec.replicatorEndpoint`.
        Unreachable = "Unreachable",
        /// `Reachable=False` / `CredentialsValid=False`: the TLS handshake failed.
        TlsHandshakeFailed = "TLSHandshakeFailed",
        /// `CredentialsValid=False`: a referenced secret does not exist or lacks a key.
        SecretMissing = "SecretMissing",
        /// `CredentialsValid=True`.
        CredentialsAccepted = "CredentialsAccepted",
    }
}

/// Builds a metav1 [`Condition`] from typed parts.
///
/// `now` becomes `lastTransitionTime`; callers that update an existing
/// condition whose `status` did not change must keep its old time instead
/// (API conventions). `observed_generation` is the object's
/// `metadata.generation` the condition was computed from.
fn build(
    type_: &'static str,
    status: ConditionStatus,
    reason: &'static str,
    message: String,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation,
        last_transition_time: now,
    }
}

macro_rules! condition_helpers {
    ($type_:ty, $reason:ty) => {
        impl $type_ {
            /// Builds a metav1 `Condition` of this type. `now` becomes
            /// `lastTransitionTime` (keep the old time when `status` is unchanged);
            /// `observed_generation` is the object's `metadata.generation`.
            #[must_use]
            pub fn condition(
                self,
                status: ConditionStatus,
                reason: $reason,
                message: impl Into<String>,
                observed_generation: Option<i64>,
                now: Time,
            ) -> Condition {
                build(
                    self.as_str(),
                    status,
                    reason.as_str(),
                    message.into(),
                    observed_generation,
                    now,
                )
            }

            /// The condition of this type in `conditions`, if present.
            #[must_use]
            pub fn find(self, conditions: &[Condition]) -> Option<&Condition> {
                conditions.iter().find(|c| c.type_ == self.as_str())
            }
        }
    };
}

condition_helpers!(PairConditionType, PairConditionReason);
condition_helpers!(MigrationConditionType, MigrationConditionReason);
condition_helpers!(SiteConditionType, SiteConditionReason);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_types_use_their_wire_names() {
        let names: Vec<&str> = PairConditionType::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(
            names,
            [
                "Synced",
                "PeerReachable",
                "RPOMet",
                "Ready",
                "FailoverBlocked",
                "WitnessQuorumLost",
                "StandbyApplied",
                "ChangedBlockTracking",
                "DrillOverdue"
            ]
        );
        assert_eq!(
            PairConditionType::parse("RPOMet"),
            Some(PairConditionType::RpoMet)
        );
        assert_eq!(PairConditionType::parse("RpoMet"), None);
        assert_eq!(
            serde_json::to_string(&PairConditionReason::WithinRpo).unwrap(),
            "\"WithinRPO\""
        );
    }

    #[test]
    fn builds_and_finds_conditions() {
        let now: Time = serde_json::from_str("\"2025-01-02T03:04:05Z\"").unwrap();
        let ready = PairConditionType::Ready.condition(
            ConditionStatus::True,
            PairConditionReason::Protected,
            "generation 4 committed",
            Some(2),
            now,
        );
        assert_eq!(ready.type_, "Ready");
        assert_eq!(ready.status, "True");
        assert_eq!(ready.reason, "Protected");
        let list = vec![ready];
        assert!(PairConditionType::Ready.find(&list).is_some());
        assert!(PairConditionType::Synced.find(&list).is_none());
    }
}
