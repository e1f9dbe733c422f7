//! The lab's witness quorum: 3 (or 5) `ferry-witness` nodes, each a process of its own beside
//! the sites, as the third fault domain of a real deployment would hold them.
//!
//! Witness `i` keeps its files in `DIR/witnesses/w<i>/` ([`WitnessLayout`]) and listens on its
//! own loopback address, `127.<L>.<200+i>.1:7201`. Witnesses talk raft to each other directly;
//! sites reach them only through links (`links.rs`) that the witness's process runs, one per
//! site, so `ferry-lab site partition a` cuts site `a` off from every witness as well as from
//! its peers. `ferry-lab witness kill|start ID` is SIGKILL and restart of one witness; its
//! sled log survives, as a disk would.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::links::{self, Endpoint, Service};
use crate::sites::{alive, lab_octet, running_pid_in, spawn_lab_process};

/// The port every witness listens on (at its own address).
pub const WITNESS_PORT: u16 = 7201;

/// How the lab's witnesses judge sites; the same for every witness of a lab.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessSettings {
    /// `--site-loss-timeout`, milliseconds: silence after which a witness suspects a site.
    pub site_loss_timeout_ms: u64,
    /// `--skew-margin`, milliseconds: added to every lease expiry.
    pub skew_margin_ms: u64,
}

impl Default for WitnessSettings {
    fn default() -> Self {
        Self {
            site_loss_timeout_ms: 5_000,
            skew_margin_ms: 1_000,
        }
    }
}

/// What a witness needs to come back the same after a restart: `w<i>/witness.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WitnessRecord {
    /// Raft id, 1-based.
    pub id: u64,
    /// The witness's own address (raft peers and its links' targets).
    pub listen: SocketAddr,
    /// Every member of the initial quorum, by id.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// How it judges sites.
    pub settings: WitnessSettings,
}

/// Where witness `id` keeps its files: `witness.json`, `data/` (sled), `tls/`, `links.json`,
/// `pid` and `witness.log`.
#[derive(Clone, Debug)]
pub struct WitnessLayout {
    /// `DIR/witnesses/w<id>`.
    pub root: PathBuf,
}

impl WitnessLayout {
    /// The layout of witness `id` in lab directory `dir`.
    pub fn in_lab(dir: &Path, id: u64) -> Self {
        Self {
            root: dir.join("witnesses").join(format!("w{id}")),
        }
    }
    /// `witness.json`.
    pub fn record(&self) -> PathBuf {
        self.root.join("witness.json")
    }
    /// The sled directory.
    pub fn data(&self) -> PathBuf {
        self.root.join("data")
    }
    /// The TLS material (`ca.crt`, `tls.crt`, `tls.key`).
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    /// The process's pid file.
    pub fn pid(&self) -> PathBuf {
        self.root.join("pid")
    }
    /// The process's log.
    pub fn log(&self) -> PathBuf {
        self.root.join("witness.log")
    }
    /// Reads `witness.json`.
    ///
    /// # Errors
    /// When the witness was never created here or the record is damaged.
    pub fn read_record(&self) -> Result<WitnessRecord> {
        let raw = std::fs::read(self.record())
            .with_context(|| format!("reading {}", self.record().display()))?;
        serde_json::from_slice(&raw).with_context(|| format!("parsing {}", self.record().display()))
    }
    /// The pid of the running witness, if any.
    pub fn running_pid(&self) -> Option<i32> {
        running_pid_in(&self.pid())
    }
}

/// The address of witness `id` of the lab in `dir`: `127.<L>.<200+id>.1`.
pub fn witness_ip(dir: &Path, id: u64) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, lab_octet(dir), 200 + id as u8, 1))
}

/// Ids of the witnesses created in `dir`, ascending.
pub fn list_witnesses(dir: &Path) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir.join("witnesses"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("witness.json").exists())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix('w')?.parse().ok())
        .collect();
    ids.sort_unstable();
    ids
}

/// Writes the records of a new quorum of `count` witnesses (3 or 5), unless the lab has one.
///
/// # Errors
/// When `count` is not 3 or 5, or a record cannot be written.
pub fn create(dir: &Path, count: u64, settings: WitnessSettings) -> Result<Vec<WitnessRecord>> {
    let existing = list_witnesses(dir);
    if !existing.is_empty() {
        return existing
            .iter()
            .map(|id| WitnessLayout::in_lab(dir, *id).read_record())
            .collect();
    }
    if count != 3 && count != 5 {
        bail!("--witnesses: a quorum has 3 or 5 witnesses, not {count}");
    }
    let peers: BTreeMap<u64, SocketAddr> = (1..=count)
        .map(|id| (id, SocketAddr::new(witness_ip(dir, id), WITNESS_PORT)))
        .collect();
    let mut out = Vec::new();
    for id in 1..=count {
        let layout = WitnessLayout::in_lab(dir, id);
        std::fs::create_dir_all(&layout.root)
            .with_context(|| format!("creating {}", layout.root.display()))?;
        let record = WitnessRecord {
            id,
            listen: peers[&id],
            peers: peers.clone(),
            settings,
        };
        std::fs::write(layout.record(), serde_json::to_vec_pretty(&record)?)?;
        out.push(record);
    }
    Ok(out)
}

/// Starts witness `id` as a background process and waits until it accepts connections.
///
/// # Errors
/// When it is already running, was never created, cannot be spawned, or is not listening
/// within `timeout`.
pub fn start(dir: &Path, id: u64, timeout: Duration) -> Result<WitnessRecord> {
    let layout = WitnessLayout::in_lab(dir, id);
    let record = layout.read_record()?;
    if let Some(pid) = layout.running_pid() {
        bail!("witness {id} is already running (pid {pid})");
    }
    let pid = spawn_lab_process(
        &[
            "witness-serve".into(),
            "--dir".into(),
            dir.into(),
            "--id".into(),
            id.to_string().into(),
        ],
        &layout.log(),
        &layout.pid(),
    )?;
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(record.listen).is_err() {
        if !alive(pid) {
            bail!(
                "witness {id} exited during start-up; see {}",
                layout.log().display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "witness {id} not listening after {timeout:?}; see {}",
                layout.log().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(record)
}

/// Runs witness `id` in this process, with its links, until SIGTERM or SIGINT.
///
/// # Errors
/// When its record or TLS material is missing, or the witness fails.
pub async fn serve(dir: &Path, id: u64) -> Result<()> {
    let layout = WitnessLayout::in_lab(dir, id);
    let record = layout.read_record()?;
    let links = tokio::spawn(links::run(
        dir.to_path_buf(),
        Endpoint {
            name: format!("w{id}"),
            root: layout.root.clone(),
            ip: record.listen.ip(),
            services: vec![Service {
                name: links::WITNESS,
                target: record.listen,
            }],
        },
    ));
    let args = ferry_witness::cli::Args {
        id,
        listen: record.listen.to_string(),
        peers: record
            .peers
            .iter()
            .map(|(i, a)| (*i, a.to_string()))
            .collect(),
        data_dir: layout.data(),
        tls_dir: layout.tls(),
        site_loss_timeout: Duration::from_millis(record.settings.site_loss_timeout_ms),
        skew_margin: Duration::from_millis(record.settings.skew_margin_ms),
        join: false,
        snapshot_every: 500,
        clock_offset: None,
    };
    let result = ferry_witness::cli::run(args, ferry_witness::cli::shutdown_signal()).await;
    links.abort();
    result
}

/// The witness addresses site `site` dials (`host:port` of its link into each witness, so a
/// partition of the site cuts them), once every witness's process has opened them.
///
/// # Errors
/// When a witness has not opened a link for the site within `timeout`.
pub async fn addresses_for(dir: &Path, site: &str, timeout: Duration) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for id in list_witnesses(dir) {
        let layout = WitnessLayout::in_lab(dir, id);
        let record = layout.read_record()?;
        let port = links::wait_link(&layout.root, site, links::WITNESS, timeout).await?;
        out.push(SocketAddr::new(record.listen.ip(), port).to_string());
    }
    Ok(out)
}

/// Sends `signal` (`KILL`, `TERM`) to witness `id` and waits until it is gone.
///
/// # Errors
/// When it is not running or does not end within 10 s.
pub fn signal(dir: &Path, id: u64, signal: &str) -> Result<i32> {
    let layout = WitnessLayout::in_lab(dir, id);
    let pid = layout
        .running_pid()
        .with_context(|| format!("witness {id} is not running"))?;
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() && alive(pid) {
        bail!("kill -{signal} {pid} failed");
    }
    crate::sites::wait_gone(pid, Duration::from_secs(10))?;
    Ok(pid)
}
