//! Which pod processes use which volume, so a snapshot can freeze them for the instant of
//! the copy (the lab's `fsfreeze`): the copy then holds what a crash at that instant would
//! have left on disk, which is what "crash-consistent" means.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Registry of volume paths and the pids using them.
#[derive(Default)]
pub struct VolumeUsers {
    users: Mutex<BTreeMap<PathBuf, BTreeSet<u32>>>,
}

/// Processes stopped with SIGSTOP; dropping the guard resumes them with SIGCONT.
pub struct Frozen {
    pids: Vec<u32>,
}

fn signal(sig: &str, pid: u32) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for pid in &self.pids {
            signal("CONT", *pid);
        }
    }
}

impl VolumeUsers {
    /// Records that `pid` uses the volume at `path`.
    pub fn add(&self, path: &Path, pid: u32) {
        self.users
            .lock()
            .expect("volume users lock poisoned")
            .entry(path.to_path_buf())
            .or_default()
            .insert(pid);
    }

    /// Forgets `pid` everywhere (its process ended).
    pub fn remove_pid(&self, pid: u32) {
        let mut users = self.users.lock().expect("volume users lock poisoned");
        users.values_mut().for_each(|pids| {
            pids.remove(&pid);
        });
        users.retain(|_, pids| !pids.is_empty());
    }

    /// Stops every process using any of `paths` until the returned guard is dropped. Pids that
    /// are already gone are skipped.
    pub fn freeze(&self, paths: &[&Path]) -> Frozen {
        let users = self.users.lock().expect("volume users lock poisoned");
        let pids: BTreeSet<u32> = paths
            .iter()
            .filter_map(|p| users.get(*p))
            .flatten()
            .copied()
            .collect();
        let pids = pids
            .into_iter()
            .filter(|pid| signal("STOP", *pid))
            .collect();
        Frozen { pids }
    }
}
