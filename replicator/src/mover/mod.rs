//! Movers: the processes that hold volume bytes, as VolSync's mover pods do.
//!
//! At the source a mover mounts a PVC restored from the generation's VolumeSnapshot and
//! streams its delta; at the destination a mover mounts the staging replica PVC and applies the
//! stream. The replicator drives movers through a [`MoverSession`] and never opens a volume
//! itself, so the same code runs against a cluster (mover pods, [`pods`]) and a local path
//! ([`MoverSession::in_process`]).

pub mod agent;
pub mod hub;
pub mod session;

pub use hub::{attach_and_serve, AttachError, MoverHub};
pub use session::{ApplyOutcome, MoverSession, ReadItem, SessionError};
