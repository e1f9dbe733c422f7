//! Seeded random chaos runs: random kills, partitions and restarts of sites, replicators,
//! controllers and witnesses against the ledger app under automatic failover, checked after
//! every run against the invariants a DR pair must keep:
//!
//! 1. never two active sites at one epoch (DRPair status at both sites, and the quorum's
//!    decisions);
//! 2. epochs only increase (at each site);
//! 3. a site's committed generation never goes backwards;
//! 4. every promoted replica equals a source generation exactly: the replica snapshot a
//!    Failover started from scans to the digest the source computed for that generation
//!    (and which the destination verified at commit), and its ledger verifies;
//! 5. the app never runs at both sites at once (the sites' timelines);
//!
//! and, once every fault is repaired, that the lab converges: both sites agree on the epoch
//! and active site, and the app runs there and only there.
//!
//! Run `r` of a session with seed `s` uses seed `s + r`; the fault schedule is a function of
//! that seed alone, so `ferry-lab chaos --runs 1 --seed <s + r>` replays it (the timing of
//! the lab under it may differ). A failed run prints its seed, its faults, the violations and
//! the replay command, and keeps its lab directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_schemas::{DRPair, Migration};
use kube::api::Api;
use kube::{Client, ResourceExt};
use rand::{Rng, SeedableRng};

use crate::ledger_app::{self, Protection, NAMESPACE, PAIR};
use crate::node::timeline::{self, first_overlap, now_ms, running_intervals};
use crate::site::client_from;
use crate::sites::SiteLayout;
use crate::witnesses::{list_witnesses, WitnessLayout};

/// How long the lab may take to converge once every fault is repaired.
const CONVERGE: Duration = Duration::from_secs(180);
/// How often the monitor samples both sites.
const SAMPLE: Duration = Duration::from_millis(250);

/// What to run.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Number of runs.
    pub runs: u64,
    /// Seed of the first run; run `r` uses `seed + r`.
    pub seed: u64,
    /// Faults per run.
    pub steps: u32,
    /// Where the runs' labs go (default: the system temp dir).
    pub dir: Option<PathBuf>,
    /// The `ferry-lab` binary (default: this process's own; tests pass the built binary).
    pub exe: Option<PathBuf>,
    /// The sites' control plane.
    pub settings: crate::control_plane::LabSettings,
}

/// One injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of every process of a site.
    KillSite(String),
    /// A killed site started again.
    StartSite(String),
    /// A site cut off from its peer and the witnesses.
    Partition(String),
    /// A partition healed.
    Heal(String),
    /// SIGKILL of a witness.
    KillWitness(u64),
    /// A killed witness started again.
    StartWitness(u64),
    /// SIGKILL of a site's ferry-replicator or ferry-controller process (its pod restarts it).
    KillComponent {
        /// The site.
        site: String,
        /// `ferry-replicator` or `ferry-controller`.
        component: &'static str,
    },
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::KillSite(s) => write!(f, "kill site {s}"),
            Fault::StartSite(s) => write!(f, "start site {s}"),
            Fault::Partition(s) => write!(f, "partition site {s}"),
            Fault::Heal(s) => write!(f, "heal site {s}"),
            Fault::KillWitness(w) => write!(f, "kill witness {w}"),
            Fault::StartWitness(w) => write!(f, "start witness {w}"),
            Fault::KillComponent { site, component } => write!(f, "kill {component} at {site}"),
        }
    }
}

/// What the lab looks like to the fault chooser.
#[derive(Debug, Default)]
struct Faulted {
    killed_sites: BTreeSet<String>,
    partitioned: BTreeSet<String>,
    killed_witnesses: BTreeSet<u64>,
}

/// The fault schedule of a run: `steps` faults, each followed by a pause of 2–15 s, drawn
/// from `seed` alone. At most one site is down or partitioned at a time, and at most two of
/// the three witnesses.
pub fn schedule(seed: u64, steps: u32) -> Vec<(Fault, Duration)> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut state = Faulted::default();
    let sites = ["a", "b"];
    let mut out = Vec::new();
    for _ in 0..steps {
        let mut options: Vec<Fault> = Vec::new();
        let site_down = !state.killed_sites.is_empty() || !state.partitioned.is_empty();
        for s in sites {
            if state.killed_sites.contains(s) {
                options.extend([Fault::StartSite(s.into()), Fault::StartSite(s.into())]);
            } else if state.partitioned.contains(s) {
                options.extend([Fault::Heal(s.into()), Fault::Heal(s.into())]);
            } else {
                if !site_down {
                    options.extend([Fault::KillSite(s.into()), Fault::Partition(s.into())]);
                }
                for component in ["ferry-replicator", "ferry-controller"] {
                    options.push(Fault::KillComponent {
                        site: s.into(),
                        component,
                    });
                }
            }
        }
        for w in 1..=3 {
            if state.killed_witnesses.contains(&w) {
                options.push(Fault::StartWitness(w));
            } else if state.killed_witnesses.len() < 2 {
                options.push(Fault::KillWitness(w));
            }
        }
        let fault = options[rng.random_range(0..options.len())].clone();
        match &fault {
            Fault::KillSite(s) => {
                state.killed_sites.insert(s.clone());
            }
            Fault::StartSite(s) => {
                state.killed_sites.remove(s);
            }
            Fault::Partition(s) => {
                state.partitioned.insert(s.clone());
            }
            Fault::Heal(s) => {
                state.partitioned.remove(s);
            }
            Fault::KillWitness(w) => {
                state.killed_witnesses.insert(*w);
            }
            Fault::StartWitness(w) => {
                state.killed_witnesses.remove(w);
            }
            Fault::KillComponent { .. } => {}
        }
        out.push((
            fault,
            Duration::from_millis(rng.random_range(2_000..=15_000)),
        ));
    }
    out
}

/// One failover a run saw complete.
#[derive(Debug, Clone, PartialEq)]
pub struct FailoverFigures {
    /// The site that took over.
    pub site: String,
    /// The epoch it took.
    pub epoch: u64,
    /// The generation it started from.
    pub generation: u64,
    /// From the lost site's last heartbeat to the quorum's committed decision (detection by a
    /// majority and the failover rule: lease + margin, siteLossTimeout), seconds; 0 when the
    /// monitor did not see the decision's record.
    pub decision_seconds: f64,
    /// From the lost site's last heartbeat to the Failover Migration's creation at the site
    /// taking over (the decision plus the agent noticing it), seconds.
    pub takeover_seconds: f64,
    /// The Migration's `rtoSeconds`: the lost site's last heartbeat to the app ready.
    pub rto_seconds: f64,
    /// The Migration's `dataLossSeconds`.
    pub data_loss_seconds: f64,
}

/// The outcome of one run.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// The run's seed.
    pub seed: u64,
    /// The faults injected, in order.
    pub faults: Vec<String>,
    /// Invariants broken (empty when the run passed).
    pub violations: Vec<String>,
    /// Failovers completed during the run.
    pub failovers: Vec<FailoverFigures>,
    /// Samples the monitor took.
    pub samples: u64,
}

impl RunReport {
    /// Whether every invariant held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// One sample of a site's DRPair status.
#[derive(Debug, Clone)]
struct Sample {
    at_ms: u64,
    site: &'static str,
    epoch: Option<u64>,
    active: Option<String>,
    generation: Option<u64>,
}

/// What the monitor collects while a run goes on.
#[derive(Debug, Default)]
struct Observed {
    samples: Vec<Sample>,
    /// (epoch, active site) of every decision the quorum reported.
    decisions: BTreeSet<(u64, String)>,
    /// Failover decisions by epoch: (last heard from the lost site, decided at), Unix ms.
    decided: BTreeMap<u64, (i64, i64)>,
    /// Failover Migrations already checked, by `site/name`.
    checked: BTreeSet<String>,
    failovers: Vec<FailoverFigures>,
    violations: Vec<String>,
}

fn ferry_lab(exe: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(exe)
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .with_context(|| format!("running ferry-lab {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ferry-lab {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs every run of `options`, printing each outcome and a summary; returns the reports.
///
/// # Errors
/// When a lab cannot be started at all (a broken run is a report with violations, not an
/// error).
pub async fn run(options: &ChaosOptions) -> Result<Vec<RunReport>> {
    let exe = match &options.exe {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().context("locating ferry-lab")?,
    };
    let base = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    let mut reports = Vec::new();
    for r in 0..options.runs {
        let seed = options.seed.wrapping_add(r);
        let dir = base.join(format!("ferry-chaos-{seed}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        println!(
            "== chaos run {}/{} seed {seed} in {}",
            r + 1,
            options.runs,
            dir.display()
        );
        let report = run_once(&exe, &dir, seed, options).await;
        let _ = ferry_lab(&exe, &dir, &["down"]);
        let report = report.unwrap_or_else(|e| RunReport {
            seed,
            violations: vec![format!("the run could not proceed: {e:#}")],
            ..RunReport::default()
        });
        if report.ok() {
            println!(
                "   ok: {} faults, {} failovers, {} samples",
                report.faults.len(),
                report.failovers.len(),
                report.samples
            );
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            println!(
                "   FAILED (seed {seed}); faults: {}",
                report.faults.join(", ")
            );
            for v in &report.violations {
                println!("   - {v}");
            }
            println!(
                "   replay: ferry-lab chaos --runs 1 --seed {seed} --steps {}; lab kept in {}",
                options.steps,
                dir.display()
            );
        }
        reports.push(report);
    }
    print_summary(&reports);
    Ok(reports)
}

fn stats(values: &mut [f64]) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some((values[values.len() / 2], values[values.len() - 1]))
}

fn print_summary(reports: &[RunReport]) {
    let failed: Vec<u64> = reports.iter().filter(|r| !r.ok()).map(|r| r.seed).collect();
    let failovers: Vec<&FailoverFigures> = reports.iter().flat_map(|r| &r.failovers).collect();
    println!(
        "== {} runs, {} failed{}; {} failovers",
        reports.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" (seeds {failed:?})")
        },
        failovers.len()
    );
    let figures = |f: fn(&FailoverFigures) -> f64| -> Vec<f64> {
        failovers
            .iter()
            .map(|x| f(x))
            .filter(|v| *v > 0.0)
            .collect()
    };
    for (name, mut values) in [
        (
            "decision (last heartbeat -> committed decision)",
            figures(|f| f.decision_seconds),
        ),
        (
            "takeover start (last heartbeat -> Failover Migration)",
            figures(|f| f.takeover_seconds),
        ),
        (
            "RTO (last heartbeat -> app ready)",
            figures(|f| f.rto_seconds),
        ),
        ("data-loss window", figures(|f| f.data_loss_seconds)),
    ] {
        let values = &mut values;
        if let Some((median, max)) = stats(values) {
            println!("   {name}: median {median:.1} s, max {max:.1} s");
        }
    }
}

async fn run_once(exe: &Path, dir: &Path, seed: u64, options: &ChaosOptions) -> Result<RunReport> {
    let steps = options.steps;
    let protection = Protection::AUTOMATIC;
    let mut up: Vec<String> = ["up", "--sites", "a,b", "--lease", protection.lease]
        .map(String::from)
        .into();
    up.extend(options.settings.up_args());
    ferry_lab(exe, dir, &up.iter().map(String::as_str).collect::<Vec<_>>())?;
    let a = client_from(&dir.join("a/kubeconfig")).await?;
    let b = client_from(&dir.join("b/kubeconfig")).await?;
    ledger_app::deploy(&a, &protection, Duration::from_secs(120)).await?;
    let observed = Arc::new(Mutex::new(Observed::default()));
    let monitor = tokio::spawn(monitor(
        dir.to_path_buf(),
        a.clone(),
        b.clone(),
        observed.clone(),
    ));
    let mut report = RunReport {
        seed,
        ..RunReport::default()
    };
    let mut faulted = Faulted::default();
    for (fault, pause) in schedule(seed, steps) {
        println!("   {fault}, then {:.1} s", pause.as_secs_f64());
        report.faults.push(fault.to_string());
        inject(exe, dir, &fault, &mut faulted)?;
        tokio::time::sleep(pause).await;
    }
    // Repair everything, then wait for the lab to settle.
    for s in std::mem::take(&mut faulted.killed_sites) {
        ferry_lab(exe, dir, &["site", "start", &s])?;
    }
    for s in std::mem::take(&mut faulted.partitioned) {
        ferry_lab(exe, dir, &["site", "heal", &s])?;
    }
    for w in std::mem::take(&mut faulted.killed_witnesses) {
        ferry_lab(exe, dir, &["witness", "start", &w.to_string()])?;
    }
    if let Err(e) = converge(dir, &a, &b).await {
        report
            .violations
            .push(format!("no convergence after repair: {e:#}"));
    }
    // A last look at failovers that completed at the end.
    check_failovers(&a, &b, &observed).await;
    monitor.abort();
    let observed = std::mem::take(&mut *observed.lock().unwrap_or_else(|p| p.into_inner()));
    report.samples = observed.samples.len() as u64;
    report.violations.extend(observed.violations);
    report
        .violations
        .extend(check(&observed.samples, &observed.decisions));
    if let Some(at) = overlap(dir) {
        report
            .violations
            .push(format!("the app ran at both sites at {at} ms"));
    }
    report.failovers = observed.failovers;
    Ok(report)
}

fn inject(exe: &Path, dir: &Path, fault: &Fault, faulted: &mut Faulted) -> Result<()> {
    match fault {
        Fault::KillSite(s) => {
            ferry_lab(exe, dir, &["site", "kill", s])?;
            faulted.killed_sites.insert(s.clone());
        }
        Fault::StartSite(s) => {
            ferry_lab(exe, dir, &["site", "start", s])?;
            faulted.killed_sites.remove(s);
        }
        Fault::Partition(s) => {
            ferry_lab(exe, dir, &["site", "partition", s])?;
            faulted.partitioned.insert(s.clone());
        }
        Fault::Heal(s) => {
            ferry_lab(exe, dir, &["site", "heal", s])?;
            faulted.partitioned.remove(s);
        }
        Fault::KillWitness(w) => {
            ferry_lab(exe, dir, &["witness", "kill", &w.to_string()])?;
            faulted.killed_witnesses.insert(*w);
        }
        Fault::StartWitness(w) => {
            ferry_lab(exe, dir, &["witness", "start", &w.to_string()])?;
            faulted.killed_witnesses.remove(w);
        }
        Fault::KillComponent { site, component } => {
            let entries = timeline::read(&SiteLayout::in_lab(dir, site).timeline())?;
            // Not running right now (restarting after an earlier kill): nothing to kill.
            if let Some(pid) =
                timeline::running_pid(&entries, "ferry-system", &format!("{component}-"))
            {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
    Ok(())
}

async fn pair_status(client: &Client) -> Option<ferry_schemas::DRPairStatus> {
    let api: Api<DRPair> = Api::namespaced(client.clone(), NAMESPACE);
    tokio::time::timeout(Duration::from_secs(2), api.get_opt(PAIR))
        .await
        .ok()?
        .ok()??
        .status
}

/// Samples both sites' DRPair status every [`SAMPLE`], the quorum's decisions every few
/// samples, and checks each Failover Migration's promoted replica as soon as it completes.
async fn monitor(dir: PathBuf, a: Client, b: Client, observed: Arc<Mutex<Observed>>) {
    let quorum = quorum_client(&dir).ok();
    let mut tick = 0u64;
    loop {
        for (site, client) in [("a", &a), ("b", &b)] {
            if let Some(s) = pair_status(client).await {
                observed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .samples
                    .push(Sample {
                        at_ms: now_ms(),
                        site,
                        epoch: s.epoch.map(|e| e.0),
                        active: s.active_site,
                        generation: s.generation.map(|g| g.0),
                    });
            }
        }
        if tick % 4 == 0 {
            if let Some(q) = &quorum {
                if let Ok(Ok(state)) =
                    tokio::time::timeout(Duration::from_secs(2), q.get_state()).await
                {
                    let mut o = observed.lock().unwrap_or_else(|p| p.into_inner());
                    for p in state
                        .pairs
                        .iter()
                        .filter(|p| p.pair == format!("{NAMESPACE}/{PAIR}"))
                    {
                        o.decisions.insert((p.epoch, p.active_site.clone()));
                        for d in &p.history {
                            o.decisions.insert((d.epoch, d.to_site.clone()));
                            if d.kind == "Failover" && d.last_heard_unix_ms > 0 {
                                o.decided
                                    .insert(d.epoch, (d.last_heard_unix_ms, d.decided_at_unix_ms));
                            }
                        }
                    }
                }
            }
            check_failovers(&a, &b, &observed).await;
        }
        tick += 1;
        tokio::time::sleep(SAMPLE).await;
    }
}

fn quorum_client(dir: &Path) -> Result<ferry_witness::client::QuorumClient> {
    let tls = ferry_replicator::tls::TlsMaterial::from_dir(
        SiteLayout::in_lab(dir, "a").root.join("tls"),
    )?;
    let addresses: Vec<String> = list_witnesses(dir)
        .into_iter()
        .map(|id| {
            Ok(WitnessLayout::in_lab(dir, id)
                .read_record()?
                .listen
                .to_string())
        })
        .collect::<Result<_>>()?;
    ferry_witness::client::QuorumClient::new(&addresses, &tls)
        .map_err(|e| anyhow::anyhow!("{}", e.message()))
}

/// Checks every completed Failover Migration not checked yet: its promoted replica must scan
/// to the digest the destination verified, and its ledger must verify.
async fn check_failovers(a: &Client, b: &Client, observed: &Arc<Mutex<Observed>>) {
    for (site, client) in [("a", a), ("b", b)] {
        let api: Api<Migration> = Api::namespaced(client.clone(), NAMESPACE);
        let Ok(Ok(list)) =
            tokio::time::timeout(Duration::from_secs(2), api.list(&Default::default())).await
        else {
            continue;
        };
        for m in list.items {
            let key = format!("{site}/{}", m.name_any());
            let status = m.status.clone().unwrap_or_default();
            let completed = status.phase.map(|p| p.as_str()) == Some("Completed");
            if m.spec.type_ != ferry_schemas::migration::MigrationType::Failover || !completed {
                continue;
            }
            if observed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .checked
                .contains(&key)
            {
                continue;
            }
            let generation = status.generation.map(|g| g.0).unwrap_or(0);
            let verdict = check_replica(client, generation).await;
            let lost_at: f64 = m
                .annotations()
                .get(ferry_failover::takeover::SITE_LOST_ANNOTATION)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            let created = m
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_millisecond() as f64)
                .unwrap_or(0.0);
            let mut o = observed.lock().unwrap_or_else(|p| p.into_inner());
            o.checked.insert(key.clone());
            if let Err(e) = verdict {
                o.violations.push(format!(
                    "{key}: promoted replica of generation {generation}: {e:#}"
                ));
            }
            let epoch = status.epoch.map(|e| e.0).unwrap_or(0);
            let decision_seconds = o
                .decided
                .get(&epoch)
                .map(|(heard, decided)| (decided - heard) as f64 / 1000.0)
                .unwrap_or(0.0);
            o.failovers.push(FailoverFigures {
                site: site.to_string(),
                epoch,
                generation,
                decision_seconds,
                takeover_seconds: if lost_at > 0.0 {
                    (created - lost_at) / 1000.0
                } else {
                    0.0
                },
                rto_seconds: status.rto_seconds.unwrap_or(0.0),
                data_loss_seconds: status.data_loss_seconds.unwrap_or(0.0),
            });
        }
    }
}

/// The replica copy of `generation` at a site scans to the digest its destination verified
/// (the source's digest of that generation) and its ledger verifies.
async fn check_replica(client: &Client, generation: u64) -> Result<()> {
    let copy = ledger_app::replica_copy(client, generation).await?;
    let expected = copy
        .digest
        .clone()
        .context("the replica carries no verified digest")?;
    let path = copy.path.clone();
    let (digest, intact) = tokio::task::spawn_blocking(move || -> Result<(String, bool)> {
        use ferry_replicator::delta::{scan, Generation, ScanOptions, VolumeSnapshot};
        let scanned = scan(
            &VolumeSnapshot::Tree(path.clone()),
            &ScanOptions::default(),
            Generation(generation),
        )?;
        let scratch = tempfile_dir()?;
        for entry in std::fs::read_dir(&path)?.flatten() {
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), scratch.join(entry.file_name()))?;
            }
        }
        let conn = ferry_sqlite_writer::ledger::open_existing(&scratch)?;
        let intact = matches!(
            ferry_sqlite_writer::ledger::verify(&conn)?,
            ferry_sqlite_writer::ledger::Verdict::Ok { .. }
        );
        drop(conn);
        let _ = std::fs::remove_dir_all(&scratch);
        Ok((scanned.index.digest().to_string(), intact))
    })
    .await??;
    if digest != expected {
        bail!("it scans to digest {digest}, not the verified {expected}");
    }
    if !intact {
        bail!("its ledger does not verify");
    }
    Ok(())
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "ferry-chaos-check-{}-{}",
        std::process::id(),
        now_ms()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Waits until both sites agree on the epoch and the active site, and the app runs at that
/// site and not at the other.
async fn converge(dir: &Path, a: &Client, b: &Client) -> Result<()> {
    crate::wait::until(
        "both sites to agree and the app to run at the active one",
        CONVERGE,
        || async {
            let (sa, sb) = (pair_status(a).await, pair_status(b).await);
            let view = |s: &Option<ferry_schemas::DRPairStatus>| {
                s.as_ref()
                    .map(|s| (s.epoch.map(|e| e.0), s.active_site.clone()))
            };
            let (va, vb) = (view(&sa), view(&sb));
            if va.is_none() || va != vb {
                return Err(format!("a {va:?}, b {vb:?}"));
            }
            let active = va.and_then(|(_, s)| s).unwrap_or_default();
            let running = |site: &str| {
                timeline::read(&SiteLayout::in_lab(dir, site).timeline())
                    .map(|e| {
                        running_intervals(&e, PAIR)
                            .iter()
                            .any(|(_, end)| *end == u64::MAX)
                    })
                    .unwrap_or(false)
            };
            let (ra, rb) = (running("a"), running("b"));
            match (active.as_str(), ra, rb) {
                ("a", true, false) | ("b", false, true) => Ok(()),
                _ => Err(format!(
                    "active {active}, app running at a: {ra}, at b: {rb}"
                )),
            }
        },
    )
    .await
}

/// Invariants 1–3 over the samples and the quorum's decisions.
fn check(samples: &[Sample], decisions: &BTreeSet<(u64, String)>) -> Vec<String> {
    let mut out = Vec::new();
    let mut active_at: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (epoch, site) in decisions {
        active_at.entry(*epoch).or_default().insert(site.clone());
    }
    let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in samples {
        if let (Some(epoch), Some(active)) = (s.epoch, &s.active) {
            active_at.entry(epoch).or_default().insert(active.clone());
        }
        let (epoch, generation) = (s.epoch.unwrap_or(0), s.generation.unwrap_or(0));
        if let Some((e0, g0)) = last.get(s.site) {
            if epoch < *e0 {
                out.push(format!(
                    "epoch went back at site {} at {} ms: {e0} -> {epoch}",
                    s.site, s.at_ms
                ));
            }
            if generation < *g0 {
                out.push(format!(
                    "committed generation went back at site {} at {} ms: {g0} -> {generation}",
                    s.site, s.at_ms
                ));
            }
        }
        let entry = last.entry(s.site).or_insert((epoch, generation));
        *entry = (entry.0.max(epoch), entry.1.max(generation));
    }
    for (epoch, sites) in active_at {
        if sites.len() > 1 {
            out.push(format!("two active sites at epoch {epoch}: {sites:?}"));
        }
    }
    out
}

fn overlap(dir: &Path) -> Option<u64> {
    let read = |site: &str| timeline::read(&SiteLayout::in_lab(dir, site).timeline()).ok();
    first_overlap(&read("a")?, &read("b")?, PAIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_is_a_function_of_its_seed_and_keeps_one_site_up() {
        assert_eq!(schedule(7, 12), schedule(7, 12));
        assert_ne!(schedule(7, 12), schedule(8, 12));
        for seed in 0..200 {
            let mut down: BTreeSet<String> = BTreeSet::new();
            let mut witnesses_down = 0i32;
            for (fault, pause) in schedule(seed, 12) {
                assert!((2..=15).contains(&pause.as_secs()), "{pause:?}");
                match fault {
                    Fault::KillSite(s) | Fault::Partition(s) => {
                        assert!(down.is_empty(), "seed {seed}: a second site down");
                        down.insert(s);
                    }
                    Fault::StartSite(s) | Fault::Heal(s) => assert!(down.remove(&s)),
                    Fault::KillWitness(_) => witnesses_down += 1,
                    Fault::StartWitness(_) => witnesses_down -= 1,
                    Fault::KillComponent { .. } => {}
                }
                assert!((0..=2).contains(&witnesses_down), "seed {seed}");
            }
        }
    }

    fn sample(at_ms: u64, site: &'static str, epoch: u64, active: &str, generation: u64) -> Sample {
        Sample {
            at_ms,
            site,
            epoch: Some(epoch),
            active: Some(active.into()),
            generation: Some(generation),
        }
    }

    #[test]
    fn the_checks_catch_each_broken_invariant() {
        let good = [
            sample(1, "a", 1, "a", 3),
            sample(1, "b", 1, "a", 3),
            sample(2, "b", 2, "b", 3),
            sample(3, "a", 2, "b", 4),
        ];
        assert!(check(&good, &BTreeSet::new()).is_empty());
        let two_active = [sample(1, "a", 2, "a", 3), sample(1, "b", 2, "b", 3)];
        assert!(check(&two_active, &BTreeSet::new())[0].contains("two active sites at epoch 2"));
        let back = [sample(1, "a", 2, "b", 5), sample(2, "a", 1, "b", 4)];
        let v = check(&back, &BTreeSet::new());
        assert!(v.iter().any(|m| m.contains("epoch went back")), "{v:?}");
        assert!(
            v.iter().any(|m| m.contains("generation went back")),
            "{v:?}"
        );
        let decided = BTreeSet::from([(2, "b".to_string())]);
        assert!(!check(&[sample(1, "a", 2, "a", 1)], &decided).is_empty());
    }
}
