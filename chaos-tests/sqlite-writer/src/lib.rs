//! Ferry lab demo workload: a hash-chained SQLite ledger, its writer loop and its verifier.
//!
//! The binary `sqlite-writer` is a thin CLI over this library; the lab and tests may use
//! [`ledger`] directly to check a snapshot copy of the data directory.

pub mod cli;
pub mod ledger;
pub mod writer;
