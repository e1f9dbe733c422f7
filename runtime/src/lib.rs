//! What Ferry's components share when they run against a cluster, as kube-runtime is for
//! kube-rs controllers: DRPair status and Events written under each component's own name
//! ([`status`]: server-side apply, one field manager per component), PVCs and CSI
//! VolumeSnapshots ([`volumes`]) and their sizes ([`quantity`]), finalizers ([`finalizer`]) and the shutdown signal
//! ([`signal`]).
//!
//! The names and labels these objects carry are API and live in `ferry_schemas::contract`;
//! this crate does the I/O.

pub mod exec;
pub mod finalizer;
pub mod quantity;
pub mod signal;
pub mod status;
pub mod volumes;

pub use signal::shutdown_signal;
pub use status::{publish_event, Component, ConditionSet, PairStatus};
