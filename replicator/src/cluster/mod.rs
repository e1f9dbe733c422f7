//! Kubernetes adapters of the replicator: mover pods ([`movers`]), PVCs and VolumeSnapshots
//! ([`volumes`]), the destination's replicas ([`replicas`]), the source's capture
//! ([`capture`]) and its hooks ([`hooks`]), DRPair status and Events ([`status`]) and the
//! per-pair workers ([`pairs`]).
//! Everything above this module works on paths, sessions and gRPC only.

pub mod capture;
pub mod hooks;
pub mod movers;
pub mod pairs;
pub mod replicas;
pub mod status;
pub mod volumes;
