//! Ferry's replicator: keeps a DR pair's destination holding a complete, consistent
//! generation of the app, shipping only what changed.
//!
//! Data flows one way through stages, each taking the previous stage's output:
//! capture (volumes and manifests at one point in time) → [`delta`] (chunk, hash, diff
//! against the last generation the destination committed) → ship (gRPC source) → stage
//! (destination: write and verify) → commit (promote atomically).
//!
//! This crate currently holds the delta engine; the other stages follow (issue 3).

pub mod delta;
