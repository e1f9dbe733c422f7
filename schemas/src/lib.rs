//! Ferry's API: the `ferry.dev/v1alpha1` CRD types, the CRDs generated from
//! them, and the validation controllers run before acting on a spec.
//!
//! This crate's one job is to define what the replicator, the failover
//! controller and the witness say to each other and to users:
//!
//! - [`Site`], [`DRPair`], [`Migration`] and [`DRDrill`], with `kube`'s `CustomResource`
//!   derive and `schemars` schemas that are structural (every field typed, no
//!   untyped `oneOf`/`anyOf`), so the generated CRDs install as they are;
//! - enums for every closed set of strings (phases, policies, modes, condition
//!   types and reasons) and newtypes for identifiers ([`Epoch`], [`Generation`]);
//! - [`crd`]: the CustomResourceDefinitions and their YAML, which the `crdgen`
//!   binary writes to `deploy/helm/ferry/crds/` (`cargo run -p ferry-schemas --bin crdgen`);
//! - [`contract`]: the object names, labels and annotations the components (and users) find
//!   each other's objects by;
//! - [`validation`]: the rules the schema cannot express; it turns a wire spec
//!   into a `Valid*` value where durations are [`std::time::Duration`]s,
//!   parsed once here from strings like `30s` ([`duration`]).
//!
//! It does no I/O: no API calls, no files, no clock, no environment (callers
//! pass `now` where a time is needed). It holds no behaviour the other crates
//! share beyond types and validation: reconciling, replicating and deciding
//! failover live in their own crates. Test builders are in `fixtures`, behind
//! `cfg(test)` or the `fixtures` feature.
//!
//! Invariants: the committed `deploy/helm/ferry/crds/*.yaml` equal what [`crd::crd_files`]
//! renders (a test fails otherwise); a spec accepted by the apiserver's schema
//! can still fail [`validation`], never the reverse for the duration fields.

#[macro_use]
mod wire_enum;

pub mod conditions;
pub mod contract;
pub mod crd;
pub mod drill;
pub mod drpair;
pub mod duration;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod ids;
pub mod migration;
pub mod proto;
mod schema;
pub mod site;
pub mod validation;

pub use drill::{DRDrill, DRDrillSpec, DRDrillStatus};
pub use drpair::{DRPair, DRPairSpec, DRPairStatus};
pub use ids::{Epoch, Generation};
pub use migration::{Migration, MigrationSpec, MigrationStatus};
pub use site::{Site, SiteSpec, SiteStatus};
pub use validation::SpecError;
