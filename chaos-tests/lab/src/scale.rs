//! `ferry-lab scale`: many DRPairs at one site (issue 14, item 9). A benchmark, not a test: it
//! prints figures and checks nothing beyond the run completing.
//!
//! Two lab sites with Ferry; at site `a`, `--pairs` small apps (a PVC holding 1 MiB and a
//! ConfigMap each) under one DRPair each with `--rpo`. It waits until every pair has a
//! committed generation, then watches for `--observe-seconds` while a few volumes change every
//! few seconds, and reports:
//! - each pair's lag (now minus its newest committed generation's capture time, sampled every
//!   5 s) as p50, p99 and maximum against the RPO, and how many samples were within it;
//! - CPU (share of one core) and resident memory (now and peak) of site `a`'s replicator and
//!   controller processes over the observed window;
//! - site `a`'s API server request rate by verb (lab control plane: its `/metrics`), measured
//!   before the pairs exist (the node's own controllers and this harness) and while they run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use ferry_schemas::drpair::DRPair;
use kube::api::{Api, ListParams};
use kube::Client;
use serde_json::json;

use crate::control_plane::{ControlPlane, LabSettings};
use crate::sites::SiteLayout;

/// Namespace of the apps.
pub const NAMESPACE: &str = "scale";
/// How often lag is sampled.
const SAMPLE: Duration = Duration::from_secs(5);

/// What `ferry-lab scale` runs.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// DRPairs (and apps) at site `a`.
    pub pairs: usize,
    /// Every pair's `spec.rpo` (humantime, e.g. `1m`).
    pub rpo: String,
    /// Seconds of steady state to observe once every pair has a generation.
    pub observe: Duration,
    /// Lab directory (default: a fresh one under the system temp dir).
    pub dir: Option<PathBuf>,
    /// Leave the lab running.
    pub keep: bool,
    /// The control plane.
    pub settings: LabSettings,
}

/// CPU and memory of one process over the observed window.
#[derive(Debug, Clone, Default)]
pub struct ProcessFigures {
    /// Share of one core (1.0 = one core busy all the time).
    pub cpu_cores: f64,
    /// Resident set at the end, MiB.
    pub rss_mib: f64,
    /// Peak resident set since the process started, MiB.
    pub peak_rss_mib: f64,
}

/// A pid's CPU seconds (user + system) from `/proc/<pid>/stat`.
fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("parsing stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// A `kB` line of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: i32, field: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} for pid {pid}"))?;
    Ok(kib / 1024.0)
}

/// The pid of site `site`'s process running lab image `image` (`ferry-lab image <image>`).
fn image_pid(dir: &Path, site: &str, image: &str) -> Result<i32> {
    let site_pid = SiteLayout::in_lab(dir, site)
        .running_pid()
        .with_context(|| format!("site {site} is not running"))?;
    crate::sites::descendants(site_pid)
        .into_iter()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|raw| {
                let args: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
                args.len() > 2 && args[1] == b"image" && args[2] == image.as_bytes()
            })
        })
        .with_context(|| format!("no {image} process at site {site}"))
}

/// Site `a`'s API server requests so far, by `VERB resource` (lab control plane only).
async fn request_counts(dir: &Path) -> Result<BTreeMap<String, u64>> {
    let record = SiteLayout::in_lab(dir, "a").read_record()?;
    let body = reqwest_free_get(record.listen, "/metrics").await?;
    Ok(body
        .lines()
        .filter_map(|l| l.strip_prefix("apiserver_request_total{verb=\""))
        .filter_map(|l| {
            let (verb, rest) = l.split_once("\",resource=\"")?;
            let (resource, n) = rest.split_once("\"} ")?;
            Some((format!("{verb} {resource}"), n.trim().parse().ok()?))
        })
        .collect())
}

/// `GET path` over plain HTTP/1.1 on `addr` (the lab's API server serves `/metrics` without
/// credentials, as its loopback-only address allows).
async fn reqwest_free_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

fn per_second(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    seconds: f64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(verb, n)| {
            let base = before.get(verb).copied().unwrap_or(0);
            (verb.clone(), n.saturating_sub(base) as f64 / seconds)
        })
        .collect()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn pair_name(i: usize) -> String {
    format!("p{i:03}")
}

/// Runs the benchmark and prints its report.
///
/// # Errors
/// When the lab cannot start, an object is refused, or the pairs do not all get a first
/// generation within ten minutes.
pub async fn run(options: &ScaleOptions) -> Result<()> {
    let dir = options.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("ferry-scale-{}", std::process::id()))
    });
    println!(
        "== {} DRPairs with rpo {} at site a ({} control plane), lab in {}",
        options.pairs,
        options.rpo,
        options.settings.control_plane.as_str(),
        dir.display()
    );
    let mut up = vec!["up".to_string(), "--sites".into(), "a,b".into()];
    up.extend(options.settings.up_args());
    crate::demo::ferry_lab(
        &None,
        &dir,
        &up.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let result = scenario(&dir, options).await;
    if !options.keep {
        crate::demo::ferry_lab(&None, &dir, &["down"])?;
    }
    result
}

async fn scenario(dir: &Path, options: &ScaleOptions) -> Result<()> {
    let a = crate::site::client_from(&dir.join("a/kubeconfig")).await?;
    let lab_plane = options.settings.control_plane == ControlPlane::Lab;
    let rpo = humantime::parse_duration(&options.rpo).context("parsing --rpo")?;

    // Baseline: what the site's API server serves with no pair (node controllers, Ferry idle).
    let baseline = if lab_plane {
        let before = request_counts(dir).await?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(20)).await;
        Some(per_second(
            &before,
            &request_counts(dir).await?,
            started.elapsed().as_secs_f64(),
        ))
    } else {
        None
    };

    apply(
        &a,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    .await?;
    for i in 0..options.pairs {
        let name = pair_name(i);
        let labels = json!({"app": name});
        apply(&a, &json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "8Mi"}}}})).await?;
        apply(
            &a,
            &json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": NAMESPACE, "labels": labels},
            "data": {"app": name}}),
        )
        .await?;
        apply(
            &a,
            &json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair",
            "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"selector": {"matchLabels": labels}, "primarySite": "a",
                     "secondarySite": "b", "rpo": options.rpo}}),
        )
        .await?;
    }
    // 1 MiB of data in each volume.
    let mut volumes = Vec::with_capacity(options.pairs);
    for i in 0..options.pairs {
        let name = pair_name(i);
        let volume = crate::wait::until(
            &format!("claim {name} bound"),
            Duration::from_secs(120),
            || async {
                crate::node::storage::bound_volume(&a, NAMESPACE, &name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "not bound".to_string())
            },
        )
        .await?;
        std::fs::write(volume.path.join("data"), random(i as u64, 1 << 20))?;
        volumes.push(volume.path);
    }
    println!(
        "== {} apps applied and written; waiting for every first generation",
        options.pairs
    );
    let created = Instant::now();
    let pairs: Api<DRPair> = Api::namespaced(a.clone(), NAMESPACE);
    crate::wait::until(
        "every pair has a committed generation",
        Duration::from_secs(600),
        || async {
            let list = pairs
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let done = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.generation).is_some())
                .count();
            (done == options.pairs)
                .then_some(())
                .ok_or_else(|| format!("{done} of {} pairs have a generation", options.pairs))
        },
    )
    .await?;
    println!(
        "== every pair has a generation after {:.0} s; observing {} s",
        created.elapsed().as_secs_f64(),
        options.observe.as_secs()
    );

    let processes = [
        ("replicator", "ferry-replicator"),
        ("controller", "ferry-controller"),
    ];
    let mut cpu_before = BTreeMap::new();
    for (role, image) in processes {
        let pid = image_pid(dir, "a", image)?;
        cpu_before.insert(role, (pid, cpu_seconds(pid)?));
    }
    let requests_before = if lab_plane {
        Some(request_counts(dir).await?)
    } else {
        None
    };
    let started = Instant::now();
    let mut lags: Vec<f64> = Vec::new();
    let mut per_pair_worst: BTreeMap<String, f64> = BTreeMap::new();
    let mut round = 0u64;
    while started.elapsed() < options.observe {
        // A few volumes change each round, as apps do.
        for k in 0..3 {
            let i = ((round * 7 + k * 13) as usize) % options.pairs;
            std::fs::write(volumes[i].join("data"), random(round * 1000 + k, 1 << 20))?;
        }
        round += 1;
        let now = SystemTime::now();
        for pair in pairs.list(&ListParams::default()).await?.items {
            let captured = pair
                .status
                .as_ref()
                .and_then(|s| s.last_capture_time.as_ref())
                .map(|t| SystemTime::from(t.0));
            let Some(captured) = captured else { continue };
            let lag = now
                .duration_since(captured)
                .unwrap_or_default()
                .as_secs_f64();
            lags.push(lag);
            let worst = per_pair_worst
                .entry(kube::ResourceExt::name_any(&pair))
                .or_default();
            *worst = worst.max(lag);
        }
        tokio::time::sleep(SAMPLE).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let requests = match requests_before {
        Some(before) => Some(per_second(&before, &request_counts(dir).await?, seconds)),
        None => None,
    };
    let mut figures = BTreeMap::new();
    for (role, (pid, before)) in &cpu_before {
        figures.insert(
            *role,
            ProcessFigures {
                cpu_cores: (cpu_seconds(*pid)? - before) / seconds,
                rss_mib: status_mib(*pid, "VmRSS:")?,
                peak_rss_mib: status_mib(*pid, "VmHWM:")?,
            },
        );
    }

    lags.sort_by(f64::total_cmp);
    let rpo_s = rpo.as_secs_f64();
    let within = lags.iter().filter(|l| **l <= rpo_s).count();
    let pairs_over = per_pair_worst.values().filter(|w| **w > rpo_s).count();
    println!(
        "\n{} DRPairs, rpo {} ({rpo_s:.0} s), {seconds:.0} s observed, {} lag samples:",
        options.pairs,
        options.rpo,
        lags.len()
    );
    println!("| lag p50 s | lag p99 s | lag max s | samples within the RPO | pairs ever over it |");
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {:.1} | {:.1} | {:.1} | {:.1}% | {pairs_over} of {} |",
        percentile(&lags, 50.0),
        percentile(&lags, 99.0),
        lags.last().copied().unwrap_or(f64::NAN),
        100.0 * within as f64 / lags.len().max(1) as f64,
        options.pairs
    );
    println!("\n| site a process | CPU (cores) | RSS MiB | peak RSS MiB |");
    println!("|---|---:|---:|---:|");
    for (role, f) in &figures {
        println!(
            "| {role} | {:.3} | {:.0} | {:.0} |",
            f.cpu_cores, f.rss_mib, f.peak_rss_mib
        );
    }
    if let (Some(baseline), Some(requests)) = (baseline, requests) {
        println!("\nSite a's API server, requests per second by verb and resource (node controllers and this harness included; rows under 0.5/s left out):");
        println!("| verb resource | no pairs | {} pairs |", options.pairs);
        println!("|---|---:|---:|");
        let verbs: std::collections::BTreeSet<&String> =
            baseline.keys().chain(requests.keys()).collect();
        for verb in verbs {
            if requests.get(verb).copied().unwrap_or(0.0) < 0.5 {
                continue;
            }
            println!(
                "| {verb} | {:.2} | {:.2} |",
                baseline.get(verb).copied().unwrap_or(0.0),
                requests.get(verb).copied().unwrap_or(0.0)
            );
        }
    } else {
        println!("\nAPI request rates: measured on the lab control plane only (its /metrics).");
    }
    Ok(())
}

async fn apply(client: &Client, object: &serde_json::Value) -> Result<()> {
    ferry_manifests::apply_object(client, object, "ferry-lab")
        .await
        .with_context(|| format!("applying {} {}", object["kind"], object["metadata"]["name"]))
}

/// `len` pseudo-random bytes from `seed` (BLAKE3's extendable output).
fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut hasher = blake3::Hasher::new();
    hasher.update(&seed.to_le_bytes());
    hasher.finalize_xof().fill(&mut out);
    out
}
