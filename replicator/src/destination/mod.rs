//! The destination side of replication: receive a generation, stage it, verify it and
//! commit it atomically ([`service`]), journaling what is committed ([`journal`]) and keeping
//! the replica's copies ([`replicas`]).

pub mod journal;
pub mod replicas;
pub mod service;

pub use journal::{CommittedGeneration, Journal, JournalError, PairRecord};
pub use replicas::{LocalReplicas, PairKey, ReplicaError, ReplicaStore, Seed, VolumeSpec};
pub use service::{Destination, DestinationObserver, NoObserver, Rejection, Release, SiteView};
