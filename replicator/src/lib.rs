//! Ferry's replicator: keeps a DR pair's destination holding a complete, consistent
//! generation of the app, shipping only what changed.
//!
//! Data flows one way through stages, each taking the previous stage's output:
//! capture (volumes and manifests at one point in time) → [`delta`] (chunk, hash, diff
//! against the last generation the destination committed) → ship (gRPC source) → stage
//! (destination: write and verify) → commit (promote atomically).
//!
//! Modules: [`delta`] (the engine), [`mover`] (the processes holding volume bytes),
//! [`source`] (schedule and ship), [`destination`] (stage, verify, commit), [`transport`] and
//! [`tls`] (gRPC over mutual TLS), [`cluster`] (everything Kubernetes-specific, manifests
//! through the `ferry-manifests` crate), [`site`] and [`cli`] (the binary).

pub mod cli;
pub mod cluster;
pub mod delta;
pub mod destination;
pub mod metrics;
pub mod mover;
pub mod site;
pub mod source;
pub use ferry_tls as tls;
pub mod transport;
