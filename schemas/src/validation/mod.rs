//! Checks the CRD schema cannot express, run by controllers before acting on a spec.
//!
//! The apiserver enforces types, enums, patterns and minimums from the
//! generated schema. Everything else, cross-field rules, name syntax,
//! references to other objects, minimum durations, is checked here, once, at
//! the edge: `validate` turns a wire spec into a `Valid*` value holding parsed
//! types (`Duration`, `NonZeroU32`, enums with data), so code downstream never
//! re-parses strings or re-checks rules.
//!
//! Every check runs and every failure is returned, not just the first, as
//! [`SpecError`]s formatted like the apiserver's field errors
//! (`spec.rpo: must be at least 10s, got 5s`).

use std::time::Duration;

mod drpair;
mod error;
mod migration;
mod names;
mod site;

pub use drpair::{
    ReplicaRule, ValidFailover, ValidHook, ValidHooks, ValidPairSpec, ValidTransform,
    VolumeSelection,
};
pub use error::{join_errors, SpecError};
pub use migration::ValidMigrationSpec;
pub use site::ValidSiteSpec;

/// Smallest `spec.rpo` accepted: 10 seconds.
///
/// Every sync pays a fixed cost whatever changed: pre/post-capture hooks, a
/// consistent capture of each volume, listing and serialising manifests, a TLS
/// stream to the peer, verification in staging, the atomic commit and a status
/// write. That costs seconds, so a shorter RPO would be missed by overhead
/// alone and would turn every pair into a steady stream of apiserver writes.
/// Status times also have one-second precision (metav1 Time), too coarse to
/// measure lag against a few-second objective.
pub const MIN_RPO: Duration = Duration::from_secs(10);

/// Smallest `spec.drill.every` accepted: 10 seconds. Weekly is the usual schedule; the floor
/// only keeps a typo (`7s` for `7d`) from starting a drill every instant.
pub const MIN_DRILL_EVERY: Duration = Duration::from_secs(10);

/// Smallest `spec.failover.siteLossTimeout` accepted: 10 seconds, a few
/// health-check intervals, so one missed check never triggers a failover.
pub const MIN_SITE_LOSS_TIMEOUT: Duration = Duration::from_secs(10);

/// `spec.failover.siteLossTimeout` when omitted: 2 minutes, long enough to ride
/// out a network blip or a control-plane restart, short enough to keep the
/// recovery time of an automatic failover in minutes.
pub const DEFAULT_SITE_LOSS_TIMEOUT: Duration = Duration::from_secs(120);

/// Hook timeout when `timeoutSeconds` is omitted: 30 seconds.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);
