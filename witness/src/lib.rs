//! Ferry's witness quorum: 3 or 5 `ferry-witness` nodes that hold, for every DR pair, the
//! active site, the epoch and the active site's lease, detect site loss, and decide automatic
//! failovers, so that two sites never run the same app.
//!
//! Shaped like raft-rs: [`storage`] (sled-backed `raft::Storage`), [`node`] (the one Ready
//! loop), [`state`] (the replicated state machine), [`rule`] (when a pair may fail over),
//! [`detector`] (heartbeats to suspicion and decisions), [`clock`] (the one wall-clock seam), [`transport`] (raft messages between
//! witnesses), [`service`] (the `Witness` gRPC API), [`server`] (runs it all), [`client`]
//! (what site controllers use; the `ferry-witness-client` crate), [`cli`] (the `ferry-witness` command line). Consensus follows
//! the Raft paper (Ongaro and Ousterhout, 2014) as implemented by raft-rs; the lease and
//! fencing argument is in `docs/failover.md`.

pub mod cli;
pub mod clock;
pub use ferry_witness_client as client;
pub mod detector;
pub mod logger;
pub mod node;
pub mod rule;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod transport;
