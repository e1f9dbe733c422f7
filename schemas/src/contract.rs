//! The names, labels and annotations on Kubernetes objects through which Ferry's components
//! and its users find each other's work: a replicator's replica snapshots and manifests
//! Secrets, the controller's seeds, the annotations kept on parked workloads, the sync request
//! a controller or a user sets on a DRPair.
//!
//! They are API as much as the CRDs are: an object written by one component under these names
//! is read by another (or by an older or newer version of it), so they change only with a
//! migration. Labels follow the Kubernetes recommended-labels style (`ferry.dev/<name>`).

/// Annotation on a DRPair asking for a sync now (any new value): the replicator echoes the
/// value in `status.lastSyncRequest` once the generation it started after seeing it is
/// committed.
pub const SYNC_REQUEST_ANNOTATION: &str = "ferry.dev/sync-request";

/// Finalizer the replicator puts on a DRPair at its active site, so that deleting the pair
/// first tells the other site (which retains or deletes its copy, `spec.deletionPolicy`).
pub const PEER_RELEASE_FINALIZER: &str = "ferry.dev/peer-release";

/// Annotation on a DRPair being deleted: `"true"` lets the deletion finish without telling
/// the other site (unreachable, or gone for good). The copy there is then left as it is.
pub const RELEASE_WITHOUT_PEER_ANNOTATION: &str = "ferry.dev/release-without-peer";

/// Label on every replica object (snapshot, manifests Secret, staging PVC) and mover pod:
/// the DRPair's name.
pub const PAIR_LABEL: &str = "ferry.dev/pair";
/// Label: the generation (decimal) a replica snapshot or manifests Secret belongs to.
pub const GENERATION_LABEL: &str = "ferry.dev/generation";
/// Prefix of the label a DR drill puts on the VolumeSnapshots and manifests Secret of the
/// generation it restores (`drill-hold.ferry.dev/<first 8 of its uid>: "true"`) until its
/// verdict: the destination's retention keeps a held generation past `--retain`, and prunes it
/// at the first commit after the hold is gone.
pub const DRILL_HOLD_PREFIX: &str = "drill-hold.ferry.dev/";
/// Label: the source volume (PVC name) a replica object belongs to.
pub const VOLUME_LABEL: &str = "ferry.dev/volume";
/// Label: `replica` on every object a destination keeps.
pub const ROLE_LABEL: &str = "ferry.dev/role";
/// Value of [`ROLE_LABEL`] on replica objects.
pub const REPLICA_ROLE: &str = "replica";
/// Label: `true` on snapshots a promotion took of the old source's own PVCs, which that site's
/// replicator adopts as its newest committed generation when the first sync back arrives.
pub const SEED_LABEL: &str = "ferry.dev/seed";
/// Label of a seed snapshot whose copy holds writes the peer never received (`"true"` or
/// `"false"`): the peer then plans the sync back against this site's scan of the volume.
pub const DIVERGED_LABEL: &str = "ferry.dev/seed-diverged";
/// Annotation of a replica snapshot: the hex BLAKE3 volume digest the source computed for the
/// generation and the destination verified the copy against.
pub const DIGEST_ANNOTATION: &str = "ferry.dev/volume-digest";
/// Key of the manifests bundle (JSON) in a generation's Secret.
pub const MANIFESTS_KEY: &str = "manifests.json";
/// Label on every mover pod: `source` or `destination`.
pub const MOVER_ROLE_LABEL: &str = "ferry.dev/mover-role";

/// Annotation holding a workload's replica count while Ferry keeps it at zero (quiesced for a
/// migration, or parked at a warm standby). Decimal `i32` ≥ 0, e.g. `"3"`; removed when the
/// count is restored.
pub const ORIGINAL_REPLICAS_ANNOTATION: &str = "ferry.dev/original-replicas";
/// Annotation holding a Job's or CronJob's `spec.suspend` (`"true"` or `"false"`) while Ferry
/// keeps it suspended; the counterpart of [`ORIGINAL_REPLICAS_ANNOTATION`] for kinds that are
/// suspended rather than scaled.
pub const ORIGINAL_SUSPEND_ANNOTATION: &str = "ferry.dev/original-suspend";

/// Name of the staging PVC the destination writes `volume`'s copy into.
pub fn staging_claim(pair: &str, volume: &str) -> String {
    format!("ferry-{pair}-{volume}-replica")
}

/// Name of the VolumeSnapshot holding `volume` at `generation` (a replica, or a seed).
pub fn generation_snapshot(pair: &str, volume: &str, generation: u64) -> String {
    format!("ferry-{pair}-{volume}-g{generation}")
}

/// Name of the Secret holding the manifests of `generation`.
pub fn manifests_secret(pair: &str, generation: u64) -> String {
    format!("ferry-{pair}-g{generation}-manifests")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names already on clusters: changing one strands existing replicas.
    #[test]
    fn names_are_stable() {
        assert_eq!(staging_claim("ledger", "data"), "ferry-ledger-data-replica");
        assert_eq!(
            generation_snapshot("ledger", "data", 7),
            "ferry-ledger-data-g7"
        );
        assert_eq!(manifests_secret("ledger", 7), "ferry-ledger-g7-manifests");
    }
}
