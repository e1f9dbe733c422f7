//! Durable object storage for one site: sled-backed, one resourceVersion counter, a watch window.
//!
//! This plays etcd's part. Every write happens under one lock, takes the next resourceVersion,
//! is persisted with that counter in one atomic sled batch, and is published to watchers in
//! resourceVersion order. Callers flush ([`Store::flush`]) before acknowledging a write, so a
//! site killed with SIGKILL comes back with every acknowledged object and resourceVersion.
//!
//! Watch resumption: the last [`WATCH_WINDOW`] events are kept in memory. A watch from a
//! resourceVersion older than the window (or from before a restart) gets 410 Gone, as a real
//! apiserver answers once etcd has compacted that revision.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::broadcast;

/// How many recent events a watch can resume from, by default.
pub const WATCH_WINDOW: usize = 10_000;
/// Events buffered per watcher before it is considered too slow and told to relist (410).
const BROADCAST_CAPACITY: usize = 8192;
/// Key of the persisted resourceVersion counter; sorts before every object key.
const RV_KEY: &[u8] = b"\0rv";

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed to read or write.
    #[error("storage i/o")]
    Sled(#[from] sled::Error),
    /// A stored value is not valid JSON (the database is damaged).
    #[error("stored object {key} is not valid JSON")]
    Corrupt {
        /// The storage key.
        key: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// The kind of change a watch event reports (`watch.EventType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The object was created.
    Added,
    /// The object was changed.
    Modified,
    /// The object was removed.
    Deleted,
}

impl EventKind {
    /// The wire name: `ADDED`, `MODIFIED`, `DELETED`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Added => "ADDED",
            EventKind::Modified => "MODIFIED",
            EventKind::Deleted => "DELETED",
        }
    }
}

/// One committed change, as watchers see it.
#[derive(Debug)]
pub struct WatchEvent {
    /// The resourceVersion the change was committed at.
    pub rv: u64,
    /// What happened.
    pub kind: EventKind,
    /// The resource's storage prefix, e.g. `apps/deployments`.
    pub prefix: String,
    /// Namespace of the object; empty for cluster-scoped objects.
    pub namespace: String,
    /// The object after the change (for `Deleted`, the last state).
    pub object: Value,
    /// The object before the change, if it existed; lets selector watches turn a label change
    /// that leaves the selection into a `DELETED`, as the apiserver does.
    pub old: Option<Value>,
}

/// A live feed of committed changes, in resourceVersion order.
pub type Subscription = broadcast::Receiver<Arc<WatchEvent>>;

/// Objects as (storage key, object) pairs, in key order.
pub type Listing = Vec<(String, Value)>;

/// What a [`Store::mutate`] closure asks for.
#[derive(Debug)]
pub enum Mutation {
    /// Store this object (create or replace). The store sets `metadata.resourceVersion`.
    Put(Value),
    /// Remove the object.
    Delete,
    /// Change nothing.
    Keep,
}

struct Inner {
    rv: u64,
    window: VecDeque<Arc<WatchEvent>>,
    /// The oldest resourceVersion a watch may start from.
    window_start: u64,
}

/// The site's object store.
pub struct Store {
    db: sled::Db,
    window_size: usize,
    inner: Mutex<Inner>,
    // One flush at a time: concurrent `flush_async` calls can deadlock in sled 0.34
    // (spacejam/sled#1412), and a queued flush still covers every write before it.
    flush_lock: tokio::sync::Mutex<()>,
    events: broadcast::Sender<Arc<WatchEvent>>,
}

/// The key of one object: `<prefix>/<namespace>/<name>` (namespace empty when cluster-scoped).
pub fn object_key(prefix: &str, namespace: &str, name: &str) -> String {
    format!("{prefix}/{namespace}/{name}")
}

fn parse(key: &[u8], bytes: &[u8]) -> Result<Value, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

impl Store {
    /// Opens (or creates) the store in directory `path`.
    ///
    /// # Errors
    /// [`StoreError::Sled`] when the database cannot be opened, e.g. another process holds it.
    pub fn open(path: &Path, window_size: usize) -> Result<Self, StoreError> {
        let db = sled::open(path)?;
        let rv = match db.get(RV_KEY)? {
            Some(b) => u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8])),
            None => 0,
        };
        let (events, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            db,
            window_size,
            inner: Mutex::new(Inner {
                rv,
                window: VecDeque::new(),
                window_start: rv,
            }),
            events,
            flush_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("store lock poisoned")
    }

    /// The current resourceVersion (the last one committed).
    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Reads one object.
    ///
    /// # Errors
    /// [`StoreError`] on i/o failure or a damaged value.
    pub fn get(&self, key: &str) -> Result<Option<Value>, StoreError> {
        self.db
            .get(key.as_bytes())?
            .map(|b| parse(key.as_bytes(), &b))
            .transpose()
    }

    /// Lists objects whose key starts with `key_prefix` (e.g. `apps/deployments/` or
    /// `apps/deployments/ns1/`), in key order, with the resourceVersion the list is consistent at.
    ///
    /// # Errors
    /// [`StoreError`] on i/o failure or a damaged value.
    pub fn list(&self, key_prefix: &str) -> Result<(Listing, u64), StoreError> {
        // Holding the lock makes the listing and its resourceVersion agree.
        let inner = self.lock();
        let mut out = Vec::new();
        for item in self.db.scan_prefix(key_prefix.as_bytes()) {
            let (k, v) = item?;
            if k.as_ref() != RV_KEY {
                out.push((String::from_utf8_lossy(&k).into_owned(), parse(&k, &v)?));
            }
        }
        Ok((out, inner.rv))
    }

    /// Atomically reads the object at `key`, lets `f` decide what to do, and commits that.
    /// `f` runs under the store lock, so read-check-write is race-free (resourceVersion
    /// preconditions are checked inside it). Returns `f`'s extra value and the stored object
    /// (with its new resourceVersion) for `Put`, or the removed object for `Delete`.
    ///
    /// # Errors
    /// `f`'s own error, or [`StoreError`] converted into `E` on i/o failure.
    pub fn mutate<E, T>(
        &self,
        key: &str,
        prefix: &str,
        namespace: &str,
        f: impl FnOnce(Option<Value>) -> Result<(Mutation, T), E>,
    ) -> Result<(Option<Value>, T), E>
    where
        E: From<StoreError>,
    {
        let mut inner = self.lock();
        let old = self.get(key)?;
        let (mutation, extra) = f(old.clone())?;
        let (kind, object) = match mutation {
            Mutation::Keep => return Ok((old, extra)),
            Mutation::Put(mut obj) => {
                let rv = inner.rv + 1;
                obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                let mut batch = sled::Batch::default();
                batch.insert(
                    key.as_bytes(),
                    serde_json::to_vec(&obj).expect("JSON values serialise"),
                );
                batch.insert(RV_KEY, &rv.to_be_bytes());
                self.db.apply_batch(batch).map_err(StoreError::from)?;
                inner.rv = rv;
                (
                    if old.is_some() {
                        EventKind::Modified
                    } else {
                        EventKind::Added
                    },
                    obj,
                )
            }
            Mutation::Delete => {
                let Some(mut obj) = old.clone() else {
                    return Ok((None, extra));
                };
                let rv = inner.rv + 1;
                let mut batch = sled::Batch::default();
                batch.remove(key.as_bytes());
                batch.insert(RV_KEY, &rv.to_be_bytes());
                self.db.apply_batch(batch).map_err(StoreError::from)?;
                inner.rv = rv;
                obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
                (EventKind::Deleted, obj)
            }
        };
        let event = Arc::new(WatchEvent {
            rv: inner.rv,
            kind,
            prefix: prefix.to_string(),
            namespace: namespace.to_string(),
            object: object.clone(),
            old,
        });
        inner.window.push_back(event.clone());
        if inner.window.len() > self.window_size {
            if let Some(dropped) = inner.window.pop_front() {
                inner.window_start = dropped.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(event);
        Ok((Some(object), extra))
    }

    /// Makes every committed write durable. Call before acknowledging a write to a client.
    ///
    /// # Errors
    /// [`StoreError::Sled`] when the flush fails (e.g. disk full).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _serial = self.flush_lock.lock().await;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Sled(sled::Error::ReportableBug(e.to_string())))??;
        Ok(())
    }

    /// Starts a watch from resourceVersion `from_rv`: returns the retained events after it and
    /// a receiver for everything later. `None` is returned when `from_rv` is older than the
    /// retained window (the caller answers 410 Gone with the oldest usable version).
    pub fn subscribe_from(
        &self,
        from_rv: u64,
    ) -> Result<(Vec<Arc<WatchEvent>>, Subscription), u64> {
        let inner = self.lock();
        if from_rv < inner.window_start || from_rv > inner.rv {
            return Err(inner.window_start);
        }
        let backlog = inner
            .window
            .iter()
            .filter(|e| e.rv > from_rv)
            .cloned()
            .collect();
        Ok((backlog, self.events.subscribe()))
    }

    /// Lists `key_prefix` and subscribes at the same instant, for watches that start with the
    /// current state (`resourceVersion` unset or `0`, or `sendInitialEvents=true`).
    ///
    /// # Errors
    /// [`StoreError`] on i/o failure or a damaged value.
    pub fn snapshot_and_subscribe(
        &self,
        key_prefix: &str,
    ) -> Result<(Listing, u64, Subscription), StoreError> {
        let inner = self.lock();
        let mut out = Vec::new();
        for item in self.db.scan_prefix(key_prefix.as_bytes()) {
            let (k, v) = item?;
            if k.as_ref() != RV_KEY {
                out.push((String::from_utf8_lossy(&k).into_owned(), parse(&k, &v)?));
            }
        }
        Ok((out, inner.rv, self.events.subscribe()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(store: &Store, name: &str, v: Value) -> Value {
        let key = object_key("core/configmaps", "ns", name);
        let (obj, ()) = store
            .mutate::<StoreError, ()>(&key, "core/configmaps", "ns", |_| {
                Ok((Mutation::Put(v), ()))
            })
            .unwrap();
        obj.unwrap()
    }

    #[test]
    fn resource_versions_survive_reopen_and_old_watches_expire() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), WATCH_WINDOW).unwrap();
            let a = put(&store, "a", json!({"metadata": {"name": "a"}}));
            assert_eq!(a["metadata"]["resourceVersion"], "1");
            put(&store, "b", json!({"metadata": {"name": "b"}}));
            let (backlog, _rx) = store.subscribe_from(1).unwrap();
            assert_eq!(backlog.len(), 1, "only the event after rv 1 is replayed");
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .block_on(store.flush())
                .unwrap();
        }
        let store = Store::open(dir.path(), WATCH_WINDOW).unwrap();
        assert_eq!(store.current_rv(), 2);
        assert_eq!(
            store
                .get(&object_key("core/configmaps", "ns", "a"))
                .unwrap()
                .unwrap()["metadata"]["name"],
            "a"
        );
        // The window did not survive the restart, like a compacted etcd revision.
        assert_eq!(store.subscribe_from(1).unwrap_err(), 2);
        assert!(store.subscribe_from(2).is_ok());
        let c = put(&store, "c", json!({"metadata": {"name": "c"}}));
        assert_eq!(c["metadata"]["resourceVersion"], "3");
    }
}
