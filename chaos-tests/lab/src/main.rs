//! `ferry-lab`: starts, stops and inspects the lab's Kubernetes sites.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_lab::control_plane::{ControlPlane, KubeKit, LabSettings};
use ferry_lab::install::InstallOptions;
use ferry_lab::site::SiteRuntime;
use ferry_lab::sites::{self, SiteLayout};
use ferry_lab::witnesses::{self, WitnessSettings};

#[derive(Parser)]
#[command(
    name = "ferry-lab",
    about = "Kubernetes sites on one machine, for Ferry's demo and tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// Which control plane the sites run (recorded in `DIR/lab.json` by `up`).
#[derive(Args, Clone, Debug)]
struct PlaneArgs {
    /// `lab` (the lab's own API server; needs nothing but this binary) or `kubernetes` (real
    /// etcd, kube-apiserver, kube-controller-manager and kube-scheduler; needs root).
    #[arg(
        long,
        value_enum,
        default_value = "lab",
        env = "FERRY_LAB_CONTROL_PLANE"
    )]
    control_plane: ControlPlane,
    /// Directory of kube-apiserver, kube-controller-manager and kube-scheduler (default:
    /// $FERRY_LAB_KUBE_BIN, then PATH); etcd comes from PATH.
    #[arg(long, env = "FERRY_LAB_KUBE_BIN")]
    kube_bin: Option<PathBuf>,
    /// Directory of snapshot.storage.k8s.io CRD files to install on a real control plane
    /// (default: the lab's own definitions).
    #[arg(long, env = "FERRY_LAB_SNAPSHOT_CRDS")]
    snapshot_crds: Option<PathBuf>,
    /// What backs each node's volumes and snapshots: `auto` (XFS with reflink on a loop
    /// device when root and mkfs.xfs allow, plain directories otherwise), `reflink` (or fail),
    /// `copies` (plain directories; every snapshot is a full copy).
    #[arg(
        long,
        value_enum,
        default_value = "auto",
        env = "FERRY_LAB_NODE_STORAGE"
    )]
    node_storage: ferry_lab::node::backing::NodeStorage,
}

impl PlaneArgs {
    /// The settings these arguments choose; a real control plane's kit is checked now, so
    /// a missing binary is reported before anything starts.
    fn settings(&self) -> Result<LabSettings> {
        if self.control_plane == ControlPlane::Kubernetes {
            KubeKit::locate(self.kube_bin.as_deref())?;
            anyhow::ensure!(
                ferry_lab::node::kubelet::is_root(),
                "--control-plane kubernetes needs root: pods get their service-account token \
                 at /var/run/secrets/kubernetes.io/serviceaccount in their own mount namespace"
            );
        }
        Ok(LabSettings {
            control_plane: self.control_plane,
            kube_bin: self.kube_bin.clone(),
            snapshot_crds: self.snapshot_crds.clone(),
            node_storage: self.node_storage,
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the sites and return once they are ready.
    Up {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Comma-separated site names.
        #[arg(long, default_value = "a,b", value_delimiter = ',')]
        sites: Vec<String>,
        /// Only the sites, without Ferry's components or witnesses.
        #[arg(long)]
        bare: bool,
        #[command(flatten)]
        plane: PlaneArgs,
        /// Witnesses of the quorum: 3 or 5, or 0 for none (no leases, no automatic failover).
        #[arg(long, default_value_t = 3)]
        witnesses: u64,
        /// The witness lease each active site holds per pair.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        lease: Duration,
        /// How long without a heartbeat before a witness suspects a site.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        site_loss_timeout: Duration,
    },
    /// Stop every site of the lab.
    Down {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Show each site's state.
    Status {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Fault injection and control of one site.
    Site {
        /// What to do.
        #[arg(value_parser = ["kill", "start", "partition", "heal"])]
        action: String,
        /// Site name.
        name: String,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Fault injection and control of one witness.
    Witness {
        /// What to do: `kill` is SIGKILL, `start` restarts it with its log intact.
        #[arg(value_parser = ["kill", "start"])]
        action: String,
        /// Witness id (1-based).
        id: u64,
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Run one witness in the foreground (what `up` starts in the background).
    #[command(hide = true)]
    WitnessServe {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Witness id.
        #[arg(long)]
        id: u64,
    },
    /// Run a lab image's entrypoint (what the process kubelet starts for a catalog image).
    Image {
        /// Image name: `sqlite-writer`.
        name: String,
        /// The image's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The main job: two sites, an app replicated with rpo 30s, a DR drill, a planned migration, a report.
    Demo {
        /// Lab directory (default: a fresh one under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the lab running and print how to explore it.
        #[arg(long)]
        keep: bool,
        /// Seconds of steady replication to watch before migrating.
        #[arg(long, default_value_t = 40)]
        observe_seconds: u64,
        #[command(flatten)]
        plane: PlaneArgs,
    },
    /// Benchmark: many DRPairs with small volumes at one site; prints lag p50/p99 against the
    /// RPO, the replicator's and controller's CPU and memory, and the API request rate.
    Scale {
        /// DRPairs (each over its own PVC and ConfigMap) at site a.
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Every pair's spec.rpo.
        #[arg(long, default_value = "1m")]
        rpo: String,
        /// Seconds to observe once every pair has a generation.
        #[arg(long, default_value_t = 300)]
        observe_seconds: u64,
        /// Lab directory (default: a fresh one under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Leave the lab running.
        #[arg(long)]
        keep: bool,
        #[command(flatten)]
        plane: PlaneArgs,
    },
    /// Seeded random chaos runs against automatic failover, each checked against the DR
    /// invariants; exits non-zero if any run broke one (its seed and a replay command are
    /// printed).
    Chaos {
        /// Number of runs.
        #[arg(long, default_value_t = 50)]
        runs: u64,
        /// Seed of the first run (run r uses seed + r; default: from the clock).
        #[arg(long)]
        seed: Option<u64>,
        /// Faults per run.
        #[arg(long, default_value_t = 6)]
        steps: u32,
        /// Where to put the runs' labs (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        plane: PlaneArgs,
    },
    /// Run one site in the foreground (what `up` starts in the background).
    Serve {
        /// Lab directory.
        #[arg(long)]
        dir: PathBuf,
        /// Site name.
        #[arg(long)]
        site: String,
        /// Used when the lab has no `lab.json` yet (a site served without `up`).
        #[command(flatten)]
        plane: PlaneArgs,
    },
}

fn main() -> ExitCode {
    // Images run without the lab's logging set-up: they own their stdout.
    let mut argv = std::env::args();
    if argv.nth(1).as_deref() == Some("image") {
        return run_image(argv.collect());
    }
    // A chaos run kills sites under its own clients: their connection errors are expected
    // noise, so it reports through its own output only (RUST_LOG still overrides).
    let default_filter = if std::env::args().nth(1).as_deref() == Some("chaos") {
        "off"
    } else {
        "info"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Up {
            dir,
            sites: names,
            bare,
            plane,
            witnesses,
            lease,
            site_loss_timeout,
        } => {
            let quorum = (!bare && witnesses > 0).then_some((
                witnesses,
                WitnessSettings {
                    site_loss_timeout_ms: site_loss_timeout.as_millis() as u64,
                    ..WitnessSettings::default()
                },
            ));
            let install = (!bare).then_some(InstallOptions { lease });
            up(&dir, &names, &plane.settings()?, quorum, install)
        }
        Cmd::Witness { action, id, dir } => {
            if action == "kill" {
                let pid = witnesses::signal(&dir, id, "KILL")?;
                println!("witness {id}: killed (pid {pid})");
            } else {
                let r = witnesses::start(&dir, id, Duration::from_secs(30))?;
                println!("witness {id}: started at {}", r.listen);
            }
            Ok(())
        }
        Cmd::WitnessServe { dir, id } => {
            tokio::runtime::Runtime::new()?.block_on(witnesses::serve(&dir, id))
        }
        Cmd::Down { dir } => sites::down(&dir),
        Cmd::Status { dir } => status(&dir),
        Cmd::Site { action, name, dir } => match action.as_str() {
            "kill" => {
                let pid = sites::signal_site(&dir, &name, "KILL")?;
                let entry = ferry_lab::node::timeline::TimelineEntry {
                    at_ms: ferry_lab::node::timeline::now_ms(),
                    site: name.clone(),
                    event: ferry_lab::node::timeline::TimelineEvent::SiteKilled,
                    namespace: String::new(),
                    pod: String::new(),
                    app: None,
                    drill: None,
                    pid: Some(pid as u32),
                    exit: None,
                };
                ferry_lab::node::timeline::append_to(
                    &SiteLayout::in_lab(&dir, &name).timeline(),
                    &entry,
                )?;
                sites::wait_gone(pid, Duration::from_secs(10))?;
                println!("site {name}: killed (pid {pid} and its process group)");
                Ok(())
            }
            "partition" | "heal" => {
                let cut = action == "partition";
                if !sites::list_sites(&dir).contains(&name) {
                    anyhow::bail!("no site {name} in {}", dir.display());
                }
                ferry_lab::links::set_partitioned(&dir, &name, cut)?;
                let others: Vec<String> = sites::list_sites(&dir)
                    .into_iter()
                    .filter(|s| *s != name)
                    .collect();
                if cut {
                    let witnesses = witnesses::list_witnesses(&dir).len();
                    println!(
                        "site {name}: partitioned from {} and {witnesses} witnesses (links cut within {:?})",
                        others.join(", "),
                        ferry_lab::links::POLL
                    );
                } else {
                    println!("site {name}: healed; links to {} open", others.join(", "));
                }
                Ok(())
            }
            _ => {
                let index = sites::list_sites(&dir)
                    .iter()
                    .position(|s| *s == name)
                    .unwrap_or(0);
                let r = sites::start_site(&dir, &name, index, Duration::from_secs(30))?;
                println!("site {name}: started at {}", r.url());
                Ok(())
            }
        },
        Cmd::Serve { dir, site, plane } => serve(&dir, &site, &plane),
        Cmd::Demo {
            dir,
            keep,
            observe_seconds,
            plane,
        } => {
            let options = ferry_lab::demo::DemoOptions {
                dir,
                keep,
                observe_seconds,
                exe: None,
                settings: plane.settings()?,
            };
            let report =
                tokio::runtime::Runtime::new()?.block_on(ferry_lab::demo::run(&options))?;
            if !report.ok() {
                anyhow::bail!("the demo's checks failed (see the report above)");
            }
            Ok(())
        }
        Cmd::Chaos {
            runs,
            seed,
            steps,
            dir,
            plane,
        } => {
            let seed = seed.unwrap_or_else(ferry_lab::node::timeline::now_ms);
            println!("chaos: {runs} runs from seed {seed}, {steps} faults each");
            let options = ferry_lab::chaos::ChaosOptions {
                runs,
                seed,
                steps,
                dir,
                exe: None,
                settings: plane.settings()?,
            };
            let reports =
                tokio::runtime::Runtime::new()?.block_on(ferry_lab::chaos::run(&options))?;
            let failed = reports.iter().filter(|r| !r.ok()).count();
            if failed > 0 {
                anyhow::bail!("{failed} of {runs} chaos runs broke an invariant (see above)");
            }
            Ok(())
        }
        Cmd::Scale {
            pairs,
            rpo,
            observe_seconds,
            dir,
            keep,
            plane,
        } => {
            let options = ferry_lab::scale::ScaleOptions {
                pairs,
                rpo,
                observe: Duration::from_secs(observe_seconds),
                dir,
                keep,
                settings: plane.settings()?,
            };
            tokio::runtime::Runtime::new()?.block_on(ferry_lab::scale::run(&options))
        }
        Cmd::Image { .. } => unreachable!("images are dispatched before logging starts"),
    }
}

/// Runs a catalog image's entrypoint with `args` (`[name, args...]`).
fn run_image(args: Vec<String>) -> ExitCode {
    match args.split_first() {
        Some((name, rest)) => ferry_lab::images::run(name, rest),
        None => {
            eprintln!("ferry-lab image: missing image name");
            ExitCode::from(2)
        }
    }
}

fn up(
    dir: &Path,
    names: &[String],
    settings: &LabSettings,
    quorum: Option<(u64, WitnessSettings)>,
    install: Option<InstallOptions>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if sites::list_sites(&dir).is_empty() {
        settings.write(&dir)?;
    } else {
        let existing = LabSettings::read(&dir)?.control_plane;
        anyhow::ensure!(
            existing == settings.control_plane,
            "the lab in {} runs the {} control plane; it cannot be brought up with {}",
            dir.display(),
            existing.as_str(),
            settings.control_plane.as_str()
        );
    }
    for (i, name) in names.iter().enumerate() {
        let r = sites::start_site(&dir, name, i, Duration::from_secs(30))?;
        println!(
            "site {name}: ready at {} ({} control plane)",
            r.url(),
            settings.control_plane.as_str()
        );
        println!(
            "  node storage: {}",
            ferry_lab::node::backing::describe(&SiteLayout::in_lab(&dir, name))
        );
        println!(
            "  kubectl --kubeconfig {} get ns",
            SiteLayout::in_lab(&dir, name).kubeconfig().display()
        );
    }
    if let Some((count, settings)) = quorum {
        witnesses::create(&dir, count, settings)?;
        // Their certificates come from the lab CA, with the sites'.
        ferry_lab::install::lab_tls(&dir, names)?;
        for id in witnesses::list_witnesses(&dir) {
            if witnesses::WitnessLayout::in_lab(&dir, id)
                .running_pid()
                .is_some()
            {
                continue;
            }
            let r = witnesses::start(&dir, id, Duration::from_secs(30))?;
            println!("witness {id}: ready at {}", r.listen);
        }
    }
    if let Some(options) = install {
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(ferry_lab::install::install(&dir, names, options))?;
    }
    Ok(())
}

fn status(dir: &Path) -> Result<()> {
    let names = sites::list_sites(dir);
    anyhow::ensure!(!names.is_empty(), "no lab under {}", dir.display());
    for name in names {
        let paths = SiteLayout::in_lab(dir, &name);
        let r = paths.read_record()?;
        match paths.running_pid() {
            Some(pid) => println!("site {name}: running (pid {pid}) at {}", r.url()),
            None => println!("site {name}: stopped"),
        }
        println!(
            "  node storage: {}",
            ferry_lab::node::backing::describe(&paths)
        );
    }
    for id in witnesses::list_witnesses(dir) {
        let layout = witnesses::WitnessLayout::in_lab(dir, id);
        let r = layout.read_record()?;
        match layout.running_pid() {
            Some(pid) => println!("witness {id}: running (pid {pid}) at {}", r.listen),
            None => println!("witness {id}: stopped"),
        }
    }
    Ok(())
}

fn serve(dir: &Path, site: &str, plane: &PlaneArgs) -> Result<()> {
    let paths = SiteLayout::in_lab(dir, site);
    let mut record = paths.read_record()?;
    let settings = if LabSettings::path(dir).exists() {
        LabSettings::read(dir)?
    } else {
        plane.settings()?
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let catalog = ferry_lab::node::catalog::Catalog::discover()
            .context("locating the lab image catalog's binaries")?;
        let running = match settings.control_plane {
            ControlPlane::Lab => {
                SiteRuntime::start_with_catalog(site, &paths.root, record.listen, catalog).await?
            }
            ControlPlane::Kubernetes => {
                let kit = KubeKit::locate(settings.kube_bin.as_deref())?;
                SiteRuntime::start_kubernetes(
                    site,
                    &paths.root,
                    record.listen.ip(),
                    &kit,
                    settings.snapshot_crds.as_deref(),
                    catalog,
                )
                .await?
            }
        };
        if record.listen != running.addr() {
            // Restarts reuse the port the first start picked.
            record.listen = running.addr();
            std::fs::write(paths.record(), serde_json::to_vec_pretty(&record)?)?;
        }
        // Links from the other sites into this one (see links.rs).
        let links = tokio::spawn(ferry_lab::links::run(
            dir.to_path_buf(),
            ferry_lab::links::Endpoint {
                name: site.to_string(),
                root: paths.root.clone(),
                ip: record.listen.ip(),
                services: vec![
                    ferry_lab::links::Service {
                        name: ferry_lab::links::REPLICATION,
                        target: std::net::SocketAddr::new(
                            record.listen.ip(),
                            ferry_lab::links::REPLICATION_PORT,
                        ),
                    },
                    ferry_lab::links::Service {
                        name: ferry_lab::links::API,
                        target: record.listen,
                    },
                ],
            },
        ));
        // Written last: `start_site` returns once the whole site (control plane and node) runs.
        std::fs::write(paths.ready(), std::process::id().to_string())?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        links.abort();
        running.shutdown().await;
        Ok(())
    })
}
