//! The destination's journal: per pair, the epoch it knows, the generations it has committed
//! and the one being staged. It lives in sled and is flushed before any answer that depends on
//! it, so the commit point of a generation is exactly one flushed write.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// One committed generation of a pair, as kept at the destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommittedGeneration {
    /// The generation number.
    pub generation: u64,
    /// The epoch it was shipped under.
    pub epoch: u64,
    /// When its capture was taken, seconds since the Unix epoch (UTC).
    pub capture_time_unix_seconds: f64,
    /// Volume (source PVC name) → where the replica keeps that volume's copy of this
    /// generation (a VolumeSnapshot name, or a directory for the local store).
    pub snapshots: std::collections::BTreeMap<String, String>,
    /// The copies are a diverged seed (see [`crate::destination::Seed`]): only this site's
    /// own scan of them says what they hold.
    #[serde(default)]
    pub diverged: bool,
}

/// What the journal holds for one pair.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    /// The newest epoch seen for the pair; older ones are refused.
    pub epoch: u64,
    /// Committed generations, newest first, at most the pair's retention.
    pub committed: Vec<CommittedGeneration>,
    /// A generation whose staging started but did not commit. While set, the staging volumes
    /// may be torn and must be reset from the newest committed generation before reuse.
    pub staging: Option<u64>,
}

impl PairRecord {
    /// The newest committed generation, if any.
    pub fn newest(&self) -> Option<&CommittedGeneration> {
        self.committed.first()
    }
}

/// Journal failures.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// sled failed (e.g. the disk is full); nothing was committed.
    #[error("journal storage at {path}")]
    Storage {
        /// The journal directory.
        path: String,
        /// The cause.
        #[source]
        source: sled::Error,
    },
    /// A stored record does not decode: the journal is damaged.
    #[error("journal record for {pair} is damaged")]
    Damaged {
        /// `namespace/name`.
        pair: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The journal: one sled tree, one JSON record per pair (`namespace/name`).
#[derive(Debug, Clone)]
pub struct Journal {
    db: sled::Db,
    path: String,
}

impl Journal {
    /// Opens (creating) the journal in directory `path`.
    ///
    /// # Errors
    /// [`JournalError::Storage`] when sled cannot open it (e.g. another process holds it).
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let shown = path.display().to_string();
        let db = sled::open(path).map_err(|source| JournalError::Storage {
            path: shown.clone(),
            source,
        })?;
        Ok(Self { db, path: shown })
    }

    fn storage(&self, source: sled::Error) -> JournalError {
        JournalError::Storage {
            path: self.path.clone(),
            source,
        }
    }

    /// The record of `pair` (`namespace/name`), empty when unknown.
    ///
    /// # Errors
    /// [`JournalError`] when sled fails or the record is damaged.
    pub fn load(&self, pair: &str) -> Result<PairRecord, JournalError> {
        match self.db.get(pair).map_err(|e| self.storage(e))? {
            None => Ok(PairRecord::default()),
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|source| JournalError::Damaged {
                pair: pair.to_string(),
                source,
            }),
        }
    }

    /// Writes `record` for `pair` and flushes: when this returns, the record survives a crash.
    ///
    /// # Errors
    /// [`JournalError::Storage`]; the previous record then still stands.
    pub fn store(&self, pair: &str, record: &PairRecord) -> Result<(), JournalError> {
        let bytes = serde_json::to_vec(record).map_err(|source| JournalError::Damaged {
            pair: pair.to_string(),
            source,
        })?;
        self.db.insert(pair, bytes).map_err(|e| self.storage(e))?;
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }

    /// Forgets `pair` (deleted with `deletionPolicy: Delete`) and flushes.
    ///
    /// # Errors
    /// [`JournalError::Storage`]; the record then still stands.
    pub fn remove(&self, pair: &str) -> Result<(), JournalError> {
        self.db.remove(pair).map_err(|e| self.storage(e))?;
        self.db.flush().map_err(|e| self.storage(e))?;
        Ok(())
    }
}
