//! Lab control: starting, stopping and inspecting site processes under a lab directory.
//!
//! A lab directory holds one [`SiteLayout`] per site, `DIR/<site>/`. Each site listens on
//! its own loopback address, `127.0.<n>.1` for the n-th site, so pods of two sites may use
//! the same port. Sites serve plain HTTP without authentication: kubectl sends bearer tokens
//! only over TLS, and the lab's API is reachable on loopback only.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::control_plane::{ControlPlane, LabSettings};

/// How long a site on a real control plane may take to start.
const KUBERNETES_START: Duration = Duration::from_secs(180);

/// What a site needs to come back the same after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SiteRecord {
    /// Site name, e.g. `a`.
    pub name: String,
    /// Address the API server listens on.
    pub listen: SocketAddr,
    /// `https` on a real control plane; absent (plain HTTP) on the lab's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
}

impl SiteRecord {
    /// The API server's URL: `http://` on the lab's control plane, `https://` on a real one.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            self.scheme.as_deref().unwrap_or("http"),
            self.listen
        )
    }
}

/// Where a site keeps its files: `root/site.json` (name and address), `root/kubeconfig`,
/// `root/apiserver/` (the store), `root/node/` (volumes, snapshots, pod files),
/// `root/timeline.jsonl`, `root/pid` and `root/site.log`.
#[derive(Clone, Debug)]
pub struct SiteLayout {
    /// The site's directory, `DIR/<site>` in a lab directory.
    pub root: PathBuf,
}

impl SiteLayout {
    /// The layout rooted at `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    /// The layout of site `name` under lab directory `dir`.
    pub fn in_lab(dir: &Path, name: &str) -> Self {
        Self {
            root: dir.join(name),
        }
    }
    /// `site.json`.
    pub fn record(&self) -> PathBuf {
        self.root.join("site.json")
    }
    /// The kubeconfig clients use.
    pub fn kubeconfig(&self) -> PathBuf {
        self.root.join("kubeconfig")
    }
    /// The API server's store.
    pub fn store(&self) -> PathBuf {
        self.root.join("apiserver")
    }
    /// The node's storage root.
    pub fn node(&self) -> PathBuf {
        self.root.join("node")
    }
    /// The timeline of pod starts and stops.
    pub fn timeline(&self) -> PathBuf {
        self.root.join("timeline.jsonl")
    }
    /// The site process's pid file.
    pub fn pid(&self) -> PathBuf {
        self.root.join("pid")
    }
    /// The site process's log.
    pub fn log(&self) -> PathBuf {
        self.root.join("site.log")
    }
    /// Written by the site process once its control plane and node run (holds its pid).
    pub fn ready(&self) -> PathBuf {
        self.root.join("ready")
    }
    /// Reads `site.json`.
    ///
    /// # Errors
    /// When the site was never started here or the record is damaged.
    pub fn read_record(&self) -> Result<SiteRecord> {
        let raw = std::fs::read(self.record())
            .with_context(|| format!("reading {}", self.record().display()))?;
        serde_json::from_slice(&raw).with_context(|| format!("parsing {}", self.record().display()))
    }
    /// The pid of the running site process, if its pid file names a live process.
    pub fn running_pid(&self) -> Option<i32> {
        running_pid_in(&self.pid())
    }
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 is the state; `Z` is a zombie that only waits to be reaped.
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// The byte `L` (1–250) of the lab in `dir`, derived from its path, so that two labs on one
/// machine (e.g. tests running side by side) rarely share addresses, and hence ports such as
/// the replicator's.
pub fn lab_octet(dir: &Path) -> u8 {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let hash = blake3::hash(canonical.to_string_lossy().as_bytes());
    1 + hash.as_bytes()[0] % 250
}

/// The loopback address of the n-th site (0-based) of the lab in `dir`: `127.<L>.<n+1>.1`,
/// `L` being [`lab_octet`].
pub fn site_ip(dir: &Path, index: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, lab_octet(dir), (index + 1) as u8, 1))
}

/// The pid in `pid_file`, if it names a live process.
pub fn running_pid_in(pid_file: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    alive(pid).then_some(pid)
}

/// Starts this `ferry-lab` binary with `args` in the background, in its own process group,
/// its output appended to `log` and its pid written to `pid_file`; returns the pid.
///
/// # Errors
/// When the log cannot be opened or the process cannot be spawned.
pub fn spawn_lab_process(args: &[std::ffi::OsString], log: &Path, pid_file: &Path) -> Result<i32> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("locating the ferry-lab binary")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().context("spawning a lab process")?;
    std::fs::write(pid_file, child.id().to_string())?;
    Ok(child.id() as i32)
}

/// Starts site `name` as a background process (its own process group) and waits until its
/// API server answers and its node runs. A site started before reuses its address, token
/// and store, and the control plane `DIR/lab.json` names.
///
/// # Errors
/// When the process cannot be spawned or does not become ready within `timeout`.
pub fn start_site(dir: &Path, name: &str, index: usize, timeout: Duration) -> Result<SiteRecord> {
    let paths = SiteLayout::in_lab(dir, name);
    if let Some(pid) = paths.running_pid() {
        bail!("site {name} is already running (pid {pid})");
    }
    std::fs::create_dir_all(&paths.root)
        .with_context(|| format!("creating {}", paths.root.display()))?;
    let settings = LabSettings::read(dir)?;
    let plane = settings.control_plane;
    crate::node::backing::prepare(&paths, settings.node_storage)?;
    if paths.read_record().is_err() {
        // First start: port 0 lets the lab's API server pick a free port, which it records
        // for restarts; kube-apiserver takes its usual port on the site's own address.
        let (port, scheme) = match plane {
            ControlPlane::Lab => (0, None),
            ControlPlane::Kubernetes => {
                (crate::control_plane::APISERVER_PORT, Some("https".into()))
            }
        };
        let r = SiteRecord {
            name: name.into(),
            listen: SocketAddr::new(site_ip(dir, index), port),
            scheme,
        };
        std::fs::write(paths.record(), serde_json::to_vec_pretty(&r)?)?;
    }
    // A real control plane starts etcd and kube-apiserver first (tens of seconds on 2 cores,
    // longer after a power cut while etcd replays its log).
    let timeout = match plane {
        ControlPlane::Lab => timeout,
        ControlPlane::Kubernetes => timeout.max(KUBERNETES_START),
    };
    let _ = std::fs::remove_file(paths.ready());
    let _ = std::fs::remove_file(paths.kubeconfig());
    let pid = spawn_lab_process(
        &[
            "serve".into(),
            "--dir".into(),
            dir.into(),
            "--site".into(),
            name.into(),
        ],
        &paths.log(),
        &paths.pid(),
    )?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = paths.read_record() {
            if r.listen.port() != 0
                && paths.ready().exists()
                && std::net::TcpStream::connect(r.listen).is_ok()
            {
                return Ok(r);
            }
        }
        if !alive(pid) {
            bail!(
                "site {name} exited during start-up; see {}",
                paths.log().display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "site {name} not ready after {timeout:?}; see {}",
                paths.log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every descendant of `pid` (children, their children, ...), read from `/proc`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Field 4 (after the parenthesised command) is the parent pid.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((child, ppid));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (child, _) in parent_of.iter().filter(|(_, pp)| *pp == p) {
            out.push(*child);
            frontier.push(*child);
        }
    }
    out
}

/// Sends `signal` (e.g. `KILL`, `TERM`) to the site process. With `KILL`, every process the
/// site started (its pods, in their own process groups) is killed at the same moment, as a
/// power cut would; with `TERM` the site stops its pods itself.
///
/// # Errors
/// When the site is not running or `kill` fails.
pub fn signal_site(dir: &Path, name: &str, signal: &str) -> Result<i32> {
    let paths = SiteLayout::in_lab(dir, name);
    let pid = paths
        .running_pid()
        .with_context(|| format!("site {name} is not running"))?;
    let mut targets = vec![pid];
    if signal == "KILL" {
        // Freeze the site so it cannot start another pod, then collect the tree: once the
        // site dies its children are re-parented and no longer findable from it.
        send_signal("STOP", &[pid])?;
        targets.extend(descendants(pid));
    }
    send_signal(signal, &targets)?;
    if signal == "KILL" {
        // SIGKILL is delivered asynchronously: return once every process is really gone.
        for target in &targets {
            wait_gone(*target, Duration::from_secs(10))?;
        }
    }
    Ok(pid)
}

fn send_signal(signal: &str, targets: &[i32]) -> Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(targets.iter().map(|p| p.to_string()))
        .status()
        .context("running kill")?;
    // A process that exited in the meantime makes kill fail; only the living matter.
    if !status.success() && targets.iter().any(|p| alive(*p)) && signal != "KILL" {
        bail!("kill -{signal} {targets:?} failed");
    }
    Ok(())
}

/// Waits until process `pid` is gone.
///
/// # Errors
/// When it is still alive after `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("process {pid} still alive after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Names of the sites under a lab directory (subdirectories holding a `site.json`).
pub fn list_sites(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("site.json").exists())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Stops every site (SIGTERM, then SIGKILL after 10 s) and witness of the lab in `dir`,
/// saying what it stopped on stdout (`ferry-lab down`).
///
/// # Errors
/// When a process cannot be signalled or outlives its SIGKILL by 10 s.
pub fn down(dir: &Path) -> Result<()> {
    let mut unmount_failures = Vec::new();
    for name in list_sites(dir) {
        match signal_site(dir, &name, "TERM") {
            Ok(pid) => {
                if wait_gone(pid, Duration::from_secs(10)).is_err() {
                    signal_site(dir, &name, "KILL")?;
                    wait_gone(pid, Duration::from_secs(10))?;
                }
                println!("site {name}: stopped");
            }
            Err(_) => println!("site {name}: not running"),
        }
        // Every site and witness is stopped even if one mount outlives its site.
        if let Err(e) = crate::node::backing::release(&SiteLayout::in_lab(dir, &name)) {
            unmount_failures.push(format!("site {name}: {e:#}"));
        }
    }
    for id in crate::witnesses::list_witnesses(dir) {
        if crate::witnesses::WitnessLayout::in_lab(dir, id)
            .running_pid()
            .is_none()
        {
            println!("witness {id}: not running");
            continue;
        }
        if crate::witnesses::signal(dir, id, "TERM").is_err() {
            crate::witnesses::signal(dir, id, "KILL")?;
        }
        println!("witness {id}: stopped");
    }
    anyhow::ensure!(
        unmount_failures.is_empty(),
        "unmounting node storage: {}",
        unmount_failures.join("; ")
    );
    Ok(())
}
