//! Kubernetes adapters of the replicator: mover pods ([`movers`]), the destination's replicas
//! ([`replicas`]), the source's capture ([`capture`]) and its hooks ([`hooks`]) and the
//! per-pair workers ([`pairs`] watches the pairs, [`worker`] ships one, [`dr_view`] keeps a
//! DR site's own view of a pair's lag, [`deletion`] finalizes a deleted one). Status, Events and volume operations come from the
//! `ferry-runtime` crate.
//! Everything above this module works on paths, sessions and gRPC only.

pub mod capture;
pub mod cbt;
pub mod deletion;
pub mod dr_view;
pub mod hooks;
pub mod movers;
pub mod pairs;
pub mod replicas;
pub mod sites;
pub mod worker;
