//! A persistent raft-rs [`Storage`] on sled: the log, `HardState`, `ConfState` and the newest
//! snapshot of one witness.
//!
//! Layout (one sled database per witness, two trees):
//! - `log`: key = entry index as 8 big-endian bytes, value = the `eraftpb.Entry` in raft-rs's
//!   protobuf encoding. Keys are contiguous from [`SledStorage::first_index`] to
//!   [`SledStorage::last_index`].
//! - `meta`: `hard_state`, `conf_state`, `snapshot` (the whole `eraftpb.Snapshot`, data included).
//!
//! Mutations stage writes in sled; nothing is durable until [`SledStorage::persist`] returns
//! (sled's own background flush runs only every 500 ms). The node calls it after appending a
//! Ready's entries and hard state and before sending that Ready's persisted messages, as the
//! raft-rs `Ready` contract requires (a vote or an append acknowledgement must never be sent
//! for state a crash could lose: Raft paper §5.2 and §5.3, "stable storage").

use std::path::Path;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

const HARD_STATE: &[u8] = b"hard_state";
const CONF_STATE: &[u8] = b"conf_state";
const SNAPSHOT: &[u8] = b"snapshot";

/// Errors opening or writing a witness's raft storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed: I/O error, full disk, or a corrupted database file.
    #[error("raft storage at {path}")]
    Sled {
        /// The database directory.
        path: String,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A stored record does not decode as the raft-rs protobuf message it should be.
    #[error("raft storage record {key} is corrupt")]
    Corrupt {
        /// Which record: `hard_state`, `conf_state`, `snapshot` or `log[<index>]`.
        key: String,
        /// The decoder's error.
        #[source]
        source: protobuf::ProtobufError,
    },
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

/// One witness's raft storage. Reads serve raft-rs through [`Storage`]; writes come from the
/// node's Ready loop through `&mut self` methods, so there is one writer and no lock.
pub struct SledStorage {
    path: String,
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the newest snapshot (0, 0 when there is none).
    snapshot_meta: SnapshotMetadata,
    /// First and last index held in `log`; `first == last + 1` when it is empty.
    first: u64,
    last: u64,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl SledStorage {
    /// Opens (or creates) the storage in directory `path`. A new storage starts with
    /// `ConfState { voters: initial_voters }`, as every member of a freshly bootstrapped quorum
    /// does; an existing one keeps what it holds and ignores `initial_voters`.
    ///
    /// # Errors
    /// [`StoreError::Sled`] when the database cannot be opened or written,
    /// [`StoreError::Corrupt`] when a stored record does not decode.
    pub fn open(path: &Path, initial_voters: &[u64]) -> Result<Self, StoreError> {
        let path_s = path.display().to_string();
        let sled_err = |source| StoreError::Sled {
            path: path_s.clone(),
            source,
        };
        let db = sled::open(path).map_err(sled_err)?;
        let log = db.open_tree("log").map_err(sled_err)?;
        let meta = db.open_tree("meta").map_err(sled_err)?;
        let decode =
            |k: &[u8]| -> Result<Option<sled::IVec>, StoreError> { meta.get(k).map_err(sled_err) };
        let hard_state = match decode(HARD_STATE)? {
            Some(b) => parse(&b, "hard_state")?,
            None => HardState::default(),
        };
        let snapshot_meta = match decode(SNAPSHOT)? {
            Some(b) => parse::<Snapshot>(&b, "snapshot")?.take_metadata(),
            None => SnapshotMetadata::default(),
        };
        let conf_state = match decode(CONF_STATE)? {
            Some(b) => parse(&b, "conf_state")?,
            None => ConfState::default(),
        };
        let first_key = log.first().map_err(sled_err)?.map(|(k, _)| index_of(&k));
        let last_key = log.last().map_err(sled_err)?.map(|(k, _)| index_of(&k));
        let (first, last) = match (first_key, last_key) {
            (Some(f), Some(l)) => (f, l),
            _ => (snapshot_meta.index + 1, snapshot_meta.index),
        };
        let mut store = SledStorage {
            path: path_s.clone(),
            db,
            log,
            meta,
            hard_state,
            conf_state,
            snapshot_meta,
            first,
            last,
        };
        if store.conf_state == ConfState::default() && store.last == 0 {
            let cs = ConfState {
                voters: initial_voters.to_vec(),
                ..Default::default()
            };
            store.set_conf_state(cs)?;
            store.persist()?;
        }
        Ok(store)
    }

    fn sled_err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.clone(),
            source,
        }
    }

    /// Makes every staged write durable (sled `flush`: fsync of the log segment).
    ///
    /// # Errors
    /// [`StoreError::Sled`] when the flush fails (I/O error, full disk).
    pub fn persist(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.sled_err(e))
    }

    /// Appends `entries`, first dropping any held entries at or after `entries[0].index` (a new
    /// leader overwrote them, Raft paper §5.3).
    ///
    /// # Panics
    /// When `entries` would leave a gap after the last entry, or overwrite compacted entries:
    /// raft-rs never asks for either.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(head) = entries.first() else {
            return Ok(());
        };
        assert!(
            head.index >= self.first,
            "append overwrites compacted entries"
        );
        assert!(
            head.index <= self.last + 1,
            "append leaves a gap in the log"
        );
        let mut batch = sled::Batch::default();
        for index in head.index..=self.last {
            batch.remove(&key(index));
        }
        for e in entries {
            let bytes = e
                .write_to_bytes()
                .expect("encoding an in-memory raft entry");
            batch.insert(&key(e.index), bytes);
        }
        self.log.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.last = entries.last().map(|e| e.index).unwrap_or(self.last);
        Ok(())
    }

    /// Stores the node's `HardState` (term, vote, commit).
    pub fn set_hard_state(&mut self, hs: HardState) -> Result<(), StoreError> {
        self.write_meta(HARD_STATE, &hs)?;
        self.hard_state = hs;
        Ok(())
    }

    /// Moves the stored commit index to `commit` (raft-rs `LightReady::commit_index`).
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StoreError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(hs)
    }

    /// Stores the membership after a committed configuration change.
    pub fn set_conf_state(&mut self, cs: ConfState) -> Result<(), StoreError> {
        self.write_meta(CONF_STATE, &cs)?;
        self.conf_state = cs;
        Ok(())
    }

    /// Replaces the whole log with `snapshot`, received from the leader (Raft paper §7,
    /// InstallSnapshot): the snapshot's conf state becomes ours, commit and term move up to it.
    ///
    /// # Errors
    /// raft `SnapshotOutOfDate` when the snapshot is older than what the log already holds.
    pub fn apply_snapshot(&mut self, snapshot: Snapshot) -> raft::Result<()> {
        let meta = snapshot.get_metadata().clone();
        if meta.index < self.first.saturating_sub(1) {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        self.write_meta(SNAPSHOT, &snapshot)?;
        self.log.clear().map_err(|e| self.sled_err(e))?;
        self.first = meta.index + 1;
        self.last = meta.index;
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        self.set_hard_state(hs)?;
        self.set_conf_state(meta.get_conf_state().clone())?;
        self.snapshot_meta = meta;
        Ok(())
    }

    /// Stores a snapshot of the state machine as of applied index `index` (its bytes in
    /// `data`), then drops log entries before `index - keep`, so a follower a little behind
    /// still catches up from the log rather than from a snapshot.
    ///
    /// # Errors
    /// raft `Compacted`/`Unavailable` when `index` is outside the log; sled errors.
    pub fn create_snapshot(&mut self, index: u64, data: Vec<u8>, keep: u64) -> raft::Result<()> {
        let term = self.term(index)?;
        let mut snapshot = Snapshot {
            data: data.into(),
            ..Default::default()
        };
        let meta = snapshot.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(self.conf_state.clone());
        self.write_meta(SNAPSHOT, &snapshot)?;
        self.snapshot_meta = snapshot.take_metadata();
        let compact_to = index.saturating_sub(keep).max(self.first);
        let mut batch = sled::Batch::default();
        for i in self.first..compact_to {
            batch.remove(&key(i));
        }
        self.log.apply_batch(batch).map_err(|e| self.sled_err(e))?;
        self.first = compact_to;
        Ok(())
    }

    /// The newest stored snapshot (empty, index 0, when there is none).
    ///
    /// # Errors
    /// [`StoreError`] when it cannot be read or decoded.
    pub fn stored_snapshot(&self) -> Result<Snapshot, StoreError> {
        match self.meta.get(SNAPSHOT).map_err(|e| self.sled_err(e))? {
            Some(b) => parse(&b, "snapshot"),
            None => Ok(Snapshot::default()),
        }
    }

    /// Number of entries held in the log (bounded by snapshots and compaction).
    pub fn log_len(&self) -> u64 {
        self.last + 1 - self.first
    }

    /// The stored hard state.
    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// The stored membership.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    fn write_meta(&self, k: &[u8], m: &dyn protobuf::Message) -> Result<(), StoreError> {
        let bytes = m
            .write_to_bytes()
            .expect("encoding an in-memory raft message");
        self.meta.insert(k, bytes).map_err(|e| self.sled_err(e))?;
        Ok(())
    }

    fn entry(&self, index: u64) -> Result<Entry, StoreError> {
        match self.log.get(key(index)).map_err(|e| self.sled_err(e))? {
            Some(b) => parse(&b, &format!("log[{index}]")),
            None => Err(StoreError::Sled {
                path: self.path.clone(),
                source: sled::Error::ReportableBug(format!("log entry {index} missing")),
            }),
        }
    }
}

fn index_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&k[..8]);
    u64::from_be_bytes(b)
}

fn parse<M: protobuf::Message>(bytes: &[u8], what: &str) -> Result<M, StoreError> {
    M::parse_from_bytes(bytes).map_err(|source| StoreError::Corrupt {
        key: what.to_string(),
        source,
    })
}

impl Storage for SledStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        assert!(
            high <= self.last + 1,
            "entries({low}, {high}) past the last index"
        );
        let max = max_size.into().unwrap_or(u64::MAX);
        let mut out = Vec::new();
        let mut size = 0u64;
        for index in low..high {
            let e = self.entry(index)?;
            size += u64::from(e.compute_size());
            // Always at least one entry, as the trait requires.
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot_meta.index {
            return Ok(self.snapshot_meta.term);
        }
        if idx < self.first {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snapshot = self.stored_snapshot()?;
        if snapshot.get_metadata().index < request_index {
            // The node stores a fresh snapshot every few hundred entries; raft-rs retries.
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("e{index}").into_bytes().into(),
            ..Default::default()
        }
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    #[test]
    fn a_new_store_starts_with_the_initial_voters_and_an_empty_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = SledStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(s.conf_state().voters, vec![1, 2, 3]);
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (1, 0));
        assert_eq!(s.term(0).unwrap(), 0);
    }

    #[test]
    fn appended_entries_and_hard_state_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStorage::open(dir.path(), &[1, 2, 3]).unwrap();
            s.append(&[entry(1, 1), entry(2, 1), entry(3, 2)]).unwrap();
            let hs = HardState {
                term: 2,
                vote: 3,
                commit: 2,
                ..Default::default()
            };
            s.set_hard_state(hs).unwrap();
            s.persist().unwrap();
        }
        let s = SledStorage::open(dir.path(), &[9]).unwrap();
        assert_eq!(
            s.conf_state().voters,
            vec![1, 2, 3],
            "initial voters ignored"
        );
        assert_eq!((s.hard_state().term, s.hard_state().vote), (2, 3));
        assert_eq!(s.hard_state().commit, 2);
        assert_eq!(s.last_index().unwrap(), 3);
        let got = s.entries(1, 4, None, ctx()).unwrap();
        assert_eq!(got, vec![entry(1, 1), entry(2, 1), entry(3, 2)]);
    }

    #[test]
    fn a_conflicting_append_truncates_the_suffix() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStorage::open(dir.path(), &[1]).unwrap();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        s.append(&[entry(2, 2)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 2);
        assert_eq!(s.term(2).unwrap(), 2);
        assert!(matches!(
            s.term(3),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
    }

    #[test]
    fn entries_honour_max_size_but_return_at_least_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStorage::open(dir.path(), &[1]).unwrap();
        s.append(&[entry(1, 1), entry(2, 1), entry(3, 1)]).unwrap();
        assert_eq!(s.entries(1, 4, 0, ctx()).unwrap().len(), 1);
        let one = u64::from(entry(1, 1).compute_size());
        assert_eq!(s.entries(1, 4, 2 * one, ctx()).unwrap().len(), 2);
    }

    #[test]
    fn a_snapshot_compacts_the_log_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStorage::open(dir.path(), &[1, 2, 3]).unwrap();
            let es: Vec<Entry> = (1..=10).map(|i| entry(i, 1)).collect();
            s.append(&es).unwrap();
            s.create_snapshot(8, b"state@8".to_vec(), 2).unwrap();
            s.persist().unwrap();
            assert_eq!(s.first_index().unwrap(), 6);
            assert_eq!(s.log_len(), 5);
            assert!(matches!(
                s.entries(5, 7, None, ctx()),
                Err(raft::Error::Store(StorageError::Compacted))
            ));
        }
        let s = SledStorage::open(dir.path(), &[1]).unwrap();
        assert_eq!((s.first_index().unwrap(), s.last_index().unwrap()), (6, 10));
        let snap = Storage::snapshot(&s, 8, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 8);
        assert_eq!(snap.get_metadata().get_conf_state().voters, vec![1, 2, 3]);
        assert_eq!(&snap.data[..], b"state@8");
        assert!(matches!(
            Storage::snapshot(&s, 9, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStorage::open(dir.path(), &[1]).unwrap();
        s.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3, 4, 5];
        s.apply_snapshot(snap).unwrap();
        assert_eq!(
            (s.first_index().unwrap(), s.last_index().unwrap()),
            (21, 20)
        );
        assert_eq!(s.term(20).unwrap(), 4);
        assert_eq!(s.hard_state().commit, 20);
        assert_eq!(s.conf_state().voters, vec![1, 2, 3, 4, 5]);
        s.append(&[entry(21, 4)]).unwrap();
        assert_eq!(s.last_index().unwrap(), 21);
    }
}
