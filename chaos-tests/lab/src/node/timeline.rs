//! The per-site timeline: one JSON line per pod process start and stop, appended and synced,
//! so chaos tests can prove that two sites never ran the same app at once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What happened to a pod's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimelineEvent {
    /// The process started.
    Start,
    /// The process ended (it exited or was stopped).
    Stop,
    /// The whole site was killed; every process of it ended at this instant.
    SiteKilled,
}

/// One timeline line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Wall-clock time in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Site name.
    pub site: String,
    /// What happened.
    pub event: TimelineEvent,
    /// Pod namespace (empty for `site_killed`).
    pub namespace: String,
    /// Pod name (empty for `site_killed`).
    pub pod: String,
    /// The pod's `app` label, which names the app across sites.
    pub app: Option<String>,
    /// The pod's `ferry.dev/drill` label: the pod belongs to a DR drill's sandbox, an
    /// isolated test copy of the app, not the app itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Exit status for `stop`, when known.
    pub exit: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An append-only timeline file.
pub struct Timeline {
    path: PathBuf,
    lock: Mutex<()>,
}

impl Timeline {
    /// A timeline at `path` (created on first append).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one entry and syncs it to disk, so it survives the site being killed.
    ///
    /// # Errors
    /// The I/O error when the file cannot be written.
    pub fn append(&self, entry: &TimelineEntry) -> std::io::Result<()> {
        let _guard = self.lock.lock().expect("timeline lock poisoned");
        append_to(&self.path, entry)
    }
}

/// Appends one entry to the timeline file at `path` (used by `ferry-lab site kill`, which is
/// not the site process).
///
/// # Errors
/// The I/O error when the file cannot be written.
pub fn append_to(path: &Path, entry: &TimelineEntry) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(entry).expect("timeline entries serialise");
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

/// Reads every entry of a timeline file, skipping a torn last line.
///
/// # Errors
/// The I/O error when the file exists but cannot be read.
pub fn read(path: &Path) -> std::io::Result<Vec<TimelineEntry>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Intervals `[start_ms, end_ms)` during which some pod of `app` ran, per the entries of one
/// site's timeline; an interval still open ends at `u64::MAX`. A `site_killed` entry ends
/// every open interval. Pods of a DR drill's sandbox are not the app running (the drill's
/// isolated copy), so they are left out.
pub fn running_intervals(entries: &[TimelineEntry], app: &str) -> Vec<(u64, u64)> {
    let mut open: std::collections::BTreeMap<(String, String, Option<u32>), u64> =
        std::collections::BTreeMap::new();
    let mut out = Vec::new();
    for e in entries {
        match e.event {
            TimelineEvent::SiteKilled => {
                out.extend(
                    std::mem::take(&mut open)
                        .into_values()
                        .map(|s| (s, e.at_ms)),
                );
            }
            _ if e.app.as_deref() != Some(app) || e.drill.is_some() => {}
            TimelineEvent::Start => {
                open.insert((e.namespace.clone(), e.pod.clone(), e.pid), e.at_ms);
            }
            TimelineEvent::Stop => {
                if let Some(s) = open.remove(&(e.namespace.clone(), e.pod.clone(), e.pid)) {
                    out.push((s, e.at_ms));
                }
            }
        }
    }
    out.extend(open.into_values().map(|s| (s, u64::MAX)));
    out
}

/// The pid of the process of the newest running pod in `namespace` whose name starts with
/// `pod_prefix` (e.g. `ferry-controller-`), per one site's timeline; `None` when none runs.
pub fn running_pid(entries: &[TimelineEntry], namespace: &str, pod_prefix: &str) -> Option<u32> {
    let mut running = None;
    for e in entries {
        match e.event {
            TimelineEvent::SiteKilled => running = None,
            _ if e.namespace != namespace || !e.pod.starts_with(pod_prefix) => {}
            TimelineEvent::Start => running = e.pid,
            TimelineEvent::Stop if e.pid == running => running = None,
            TimelineEvent::Stop => {}
        }
    }
    running
}

/// The first instant (ms) at which `app` ran at both sites, given their timelines, if any:
/// what must never happen for a DR pair.
pub fn first_overlap(site_a: &[TimelineEntry], site_b: &[TimelineEntry], app: &str) -> Option<u64> {
    let a = running_intervals(site_a, app);
    let b = running_intervals(site_b, app);
    a.iter()
        .flat_map(|x| b.iter().map(move |y| (x, y)))
        .filter(|(x, y)| x.0 < y.1 && y.0 < x.1)
        .map(|(x, y)| x.0.max(y.0))
        .min()
}
