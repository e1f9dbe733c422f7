//! Ferry's failover controller (`ferry-controller`): it moves a DR pair's application between
//! its sites. This crate holds the planned migration ([`migration`]): quiesce the app at the
//! source ([`quiesce`]), take a final generation through the replicator, advance the epoch at
//! both sites, and stand the app up at the target from that generation ([`instantiate`]),
//! reaching the peer site through its `Site` kubeconfig ([`peer`]). With a witness quorum
//! ([`quorum`]) it also holds each active pair's lease, mirrors it in a site-local Lease
//! ([`lease`]) that the app's `ferry-gate` init container waits for ([`gate`]), fences this
//! site when the lease is lost, and carries out failovers the quorum decides or a person
//! requests ([`takeover`]). At a pair's DR site it runs DR drills ([`drill`]): a generation
//! restored into a sandbox namespace, verified, timed and cleaned up. Every reconcile shares a [`context::Context`] and fails with a
//! typed [`context::ReconcileError`].
//!
//! Data flows one way: the replicator produces committed generations (VolumeSnapshots and a
//! manifests Secret at the destination, DRPair status at both sites); this controller only
//! reads them and asks for a sync through the `ferry.dev/sync-request` annotation.

pub mod cli;
pub mod context;
pub mod drill;
pub mod gate;
pub mod instantiate;
pub mod lease;
pub mod migration;
pub mod peer;
pub mod quiesce;
pub mod quorum;
pub mod takeover;
