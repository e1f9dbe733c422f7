//! Watch streams: ADDED, MODIFIED, DELETED, BOOKMARK and ERROR events as newline-delimited
//! JSON, following "Efficient detection of changes" in the Kubernetes API concepts doc.
//!
//! - `resourceVersion` unset or `0`: the current state as ADDED events, then changes.
//! - `resourceVersion=N`: every change after N; N older than the store's window gets one
//!   ERROR event with a 410 Expired Status, after which clients relist.
//! - `sendInitialEvents=true`: the current state, then a BOOKMARK annotated
//!   `k8s.io/initial-events-end: "true"`, then changes.
//! - `allowWatchBookmarks=true`: a BOOKMARK carrying the latest resourceVersion every
//!   [`BOOKMARK_EVERY`] while idle.
//! - `timeoutSeconds`: the stream ends after that long (default [`DEFAULT_TIMEOUT`]).
//! - A label-selected watch sees an object that stops matching as DELETED and one that starts
//!   matching as ADDED, as the apiserver's cacher does.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use lab_apimachinery::status::ApiError;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::registry::ResourceInfo;
use super::store::{EventKind, WatchEvent};
use super::stream_response;
use super::verbs::{collection_prefix, internal, present, Req, Selectors};

/// Interval between idle bookmarks.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(5);
/// How long a watch lasts when the client does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

struct Filter {
    info: ResourceInfo,
    prefix: String,
    namespace: Option<String>,
    selectors: Selectors,
}

impl Filter {
    /// The event type a watcher should see for `e`, if any.
    fn translate(&self, e: &WatchEvent) -> Option<&'static str> {
        if e.prefix != self.prefix
            || self
                .namespace
                .as_deref()
                .is_some_and(|ns| ns != e.namespace)
        {
            return None;
        }
        let now = self.selectors.matches(&e.object);
        let before = e.old.as_ref().is_some_and(|o| self.selectors.matches(o));
        match (e.kind, before, now) {
            (EventKind::Added, _, true) => Some("ADDED"),
            (EventKind::Modified, true, true) => Some("MODIFIED"),
            (EventKind::Modified, false, true) => Some("ADDED"),
            (EventKind::Modified, true, false) => Some("DELETED"),
            (EventKind::Deleted, _, true) => Some("DELETED"),
            _ => None,
        }
    }

    fn line(&self, kind: &str, object: Value) -> Bytes {
        let mut out =
            serde_json::to_vec(&json!({"type": kind, "object": present(&self.info, object)}))
                .expect("JSON values serialise");
        out.push(b'\n');
        Bytes::from(out)
    }

    fn bookmark(&self, rv: u64, initial_end: bool) -> Bytes {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        self.line("BOOKMARK", json!({"metadata": meta}))
    }
}

fn error_line(err: &ApiError) -> Bytes {
    let mut out = serde_json::to_vec(&json!({"type": "ERROR", "object": err.to_status_json()}))
        .expect("JSON values serialise");
    out.push(b'\n');
    Bytes::from(out)
}

/// Starts a watch and returns the streaming response.
///
/// # Errors
/// 400 for unparsable selectors or resourceVersion; 500 when the store cannot be read.
/// A too-old resourceVersion is not an error here: it is reported in-stream, as the
/// apiserver does.
pub fn serve(req: &Req<'_>) -> Result<Response, ApiError> {
    let q = req.query;
    let filter = Filter {
        info: req.info.clone(),
        prefix: req.info.storage_prefix(),
        namespace: req.target.namespace.clone(),
        selectors: Selectors::from_query(q)?,
    };
    let from_rv = match q.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv}")))?,
        ),
    };
    let send_initial = q.send_initial_events == Some(true) || from_rv.is_none();
    let bookmarks = q.allow_watch_bookmarks == Some(true);
    let timeout = q
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);

    let store = &req.state.store;
    let (initial, start_rv, backlog, events) = if send_initial {
        let (objs, rv, events) = store
            .snapshot_and_subscribe(&collection_prefix(
                req.info,
                req.target.namespace.as_deref(),
            ))
            .map_err(internal)?;
        let objs: Vec<Value> = objs
            .into_iter()
            .map(|(_, o)| o)
            .filter(|o| filter.selectors.matches(o))
            .collect();
        (objs, rv, Vec::new(), Some(events))
    } else {
        let rv = from_rv.unwrap_or_default();
        match store.subscribe_from(rv) {
            Ok((backlog, events)) => (Vec::new(), rv, backlog, Some(events)),
            Err(oldest) => {
                let err = ApiError::expired(format!("too old resource version: {rv} ({oldest})"));
                let _ = tx.try_send(Ok(error_line(&err)));
                (Vec::new(), rv, Vec::new(), None)
            }
        }
    };
    let explicit_initial_end = q.send_initial_events == Some(true);
    if let Some(events) = events {
        let stopping = req.state.stopping.clone();
        tokio::spawn(run(
            filter,
            tx,
            initial,
            explicit_initial_end,
            start_rv,
            backlog,
            events,
            bookmarks,
            timeout,
            stopping,
        ));
    }
    Ok(stream_response(Body::from_stream(ReceiverStream::new(rx))))
}

#[allow(clippy::too_many_arguments)]
async fn run(
    filter: Filter,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    initial: Vec<Value>,
    initial_end_bookmark: bool,
    start_rv: u64,
    backlog: Vec<Arc<WatchEvent>>,
    mut events: broadcast::Receiver<Arc<WatchEvent>>,
    bookmarks: bool,
    timeout: Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_rv = start_rv;
    for obj in initial {
        if tx.send(Ok(filter.line("ADDED", obj))).await.is_err() {
            return;
        }
    }
    if initial_end_bookmark && tx.send(Ok(filter.bookmark(start_rv, true))).await.is_err() {
        return;
    }
    for e in backlog {
        last_rv = e.rv;
        if let Some(kind) = filter.translate(&e) {
            if tx
                .send(Ok(filter.line(kind, e.object.clone())))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval(BOOKMARK_EVERY);
    ticker.tick().await;
    loop {
        let line = tokio::select! {
            _ = &mut deadline => return,
            _ = &mut stop => return,
            _ = tx.closed() => return,
            _ = ticker.tick(), if bookmarks => filter.bookmark(last_rv, false),
            received = events.recv() => match received {
                Ok(e) if e.rv <= last_rv => continue,
                Ok(e) => {
                    last_rv = e.rv;
                    match filter.translate(&e) {
                        Some(kind) => filter.line(kind, e.object.clone()),
                        None => continue,
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let err = ApiError::expired(format!("too old resource version: {last_rv}: the watcher fell behind"));
                    let _ = tx.send(Ok(error_line(&err))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(Ok(line)).await.is_err() {
            return;
        }
    }
}
