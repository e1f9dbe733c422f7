//! Identifier newtypes shared by the replicator, the failover controller and the witness.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Fencing epoch of a [`DRPair`](crate::DRPair): which site may write.
///
/// The epoch starts at 1 when a pair is first initialised and grows by one each
/// time the active site changes (planned migration, failover or failback).
/// A replicator, stager or committer that sees a message carrying an epoch
/// lower than the newest one it knows must reject it: that is how a
/// partitioned old primary is fenced. Epochs are never reused or decreased.
///
/// On the wire this is a plain unsigned integer (`"epoch": 7`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch that follows this one.
    ///
    /// # Panics
    ///
    /// Panics if the epoch is `u64::MAX`; at one failover per second that takes
    /// longer than the age of the universe, so it is treated as an invariant.
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.checked_add(1).expect("epoch overflowed u64"))
    }

    /// The raw value.
    #[must_use]
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Number of one replicated generation of a [`DRPair`](crate::DRPair).
///
/// A generation is one consistent capture of the application: every selected
/// volume plus its manifests, taken at one point in time and shipped as a unit.
/// Numbers start at 1 and grow by one per capture on the source site; a
/// generation is "complete" at the destination only once it has been staged,
/// verified and committed atomically (nothing sees a half-shipped one).
///
/// Not to be confused with Kubernetes' `metadata.generation`, which counts spec
/// changes of the object itself and is reported as `status.observedGeneration`.
///
/// On the wire this is a plain unsigned integer (`"generation": 42`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(transparent)]
pub struct Generation(pub u64);

impl Generation {
    /// The generation that follows this one.
    ///
    /// # Panics
    ///
    /// Panics if the generation is `u64::MAX` (not reachable in practice; an
    /// invariant like [`Epoch::next`]).
    #[must_use]
    pub fn next(self) -> Self {
        Self(self.0.checked_add(1).expect("generation overflowed u64"))
    }

    /// The raw value.
    #[must_use]
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_plain_integers_on_the_wire() {
        assert_eq!(serde_json::to_string(&Epoch(7)).unwrap(), "7");
        assert_eq!(
            serde_json::from_str::<Generation>("42").unwrap(),
            Generation(42)
        );
        assert_eq!(Epoch(1).next(), Epoch(2));
        assert_eq!(Generation(9).next().to_string(), "10");
    }
}
