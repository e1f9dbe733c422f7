//! The process kubelet: runs the site's pods as local processes.
//!
//! For every Pod bound to this node (pods without `spec.nodeName` are bound here first, as
//! the scheduler would) the kubelet starts one supervisor task, which:
//! 1. resolves each container's image through the [`Catalog`](super::catalog::Catalog);
//! 2. prepares volumes: a PVC's bound volume, emptyDir under the pod's directory, configMap
//!    and secret keys written as files, hostPath as is;
//! 3. starts the process in its own process group. As root it runs in a private mount
//!    namespace (`unshare --mount`) where each volume is bind-mounted at its `mountPath`,
//!    with `runAsUser`/`runAsGroup` applied through `setpriv` and `fsGroup` through group
//!    ownership of the volume. Not as root, there are no namespaces: environment values that
//!    start with a `mountPath` are rewritten to the host path, which the catalog apps accept
//!    (the documented fallback, docs/lab.md);
//! 4. runs the init containers in order, each to success (again after every site restart),
//!    then every regular container, each supervised on its own with its readiness and
//!    liveness probes ([`probes`](super::probes)); appends each container process's `start`
//!    and `stop` to the site timeline, keeps the pod's status true (phase, conditions,
//!    container states, readiness, restart counts), and restarts exited containers (and ones
//!    failing their liveness probe) as the pod's `restartPolicy` says, with exponential
//!    back-off;
//! 5. when the pod is deleted, sends the image's stop signal (SIGTERM, or SIGINT for
//!    `postgres`, as its image declares) to the process group, then SIGKILL after
//!    `terminationGracePeriodSeconds`.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::catalog::Launch;
use super::probes;
use super::projected::{self, TokenFile};
use super::timeline::{now_ms, TimelineEntry, TimelineEvent};
use super::NodeContext;
use crate::control_plane::ControlPlane;

mod exec;
mod prepare;
mod process;

use exec::{container_command, container_env_only};
pub use exec::{KubeletExec, EXEC_TIMEOUT};
use prepare::*;
pub use process::is_root;
use process::*;

/// Grace period when the pod does not say, in seconds (the Kubernetes default).
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// Longest wait between restarts of a crashing container.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Pods this kubelet is running, by uid.
#[derive(Default)]
pub struct Running {
    pods: Mutex<HashMap<String, RunningPod>>,
    /// Pods marked for deletion whose processes are being stopped; removed from the API
    /// (grace period 0) once stopped, as the kubelet finishes a graceful deletion.
    terminating: Mutex<std::collections::HashSet<String>>,
}

struct RunningPod {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    namespace: String,
    name: String,
    /// The names of the pod's regular containers, in spec order.
    containers: Vec<String>,
    /// Its regular containers whose processes run: where `pods/exec` runs commands.
    exec: ExecTargets,
}

/// The running regular containers of a pod, by container name.
type ExecTargets = Arc<Mutex<BTreeMap<String, ExecTarget>>>;

/// A running container as `pods/exec` and exec probes need it.
#[derive(Clone, Debug)]
struct ExecTarget {
    pid: u32,
    env: BTreeMap<String, String>,
    working_dir: Option<String>,
    run_as: Option<(i64, Option<i64>)>,
    /// The image's own program (name, argv): an exec of that name runs it.
    image_program: Option<(String, Vec<String>)>,
}

/// Errors preparing or starting a pod.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The image is not in the catalog.
    #[error("resolving the image of container {container}")]
    Image {
        /// Container name.
        container: String,
        /// The cause.
        #[source]
        source: super::catalog::CatalogError,
    },
    /// A volume could not be prepared.
    #[error("preparing volume {volume}: {reason}")]
    Volume {
        /// Volume name.
        volume: String,
        /// Why.
        reason: String,
    },
    /// The process could not be spawned.
    #[error("starting container {container}")]
    Spawn {
        /// Container name.
        container: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing files for the pod failed.
    #[error("writing pod files under {path}")]
    Files {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Watches the site's pods and keeps one supervisor per pod of this node. Runs until
/// aborted; watch errors are retried with back-off.
pub async fn run(ctx: Arc<NodeContext>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let mut stream = watcher(pods, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(pod) | Event::InitApply(pod)) => on_pod(&ctx, pod).await,
            Ok(Event::Delete(pod)) => stop_pod(&ctx, &pod.uid().unwrap_or_default()),
            Ok(Event::Init | Event::InitDone) => {}
            Err(e) => warn!(site = %ctx.site, error = %e, "pod watch failed; retrying"),
        }
    }
}

fn watcher(
    api: Api<Pod>,
    config: watcher::Config,
) -> impl futures::Stream<Item = Result<Event<Pod>, watcher::Error>> {
    watcher::watcher(api, config)
}

async fn on_pod(ctx: &Arc<NodeContext>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        finish_deletion(ctx, pod);
        return;
    }
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    match node.as_deref() {
        // On a real control plane the scheduler binds pods.
        None | Some("") if ctx.control_plane == ControlPlane::Kubernetes => return,
        None | Some("") => {
            // Bind the pod to this node, as the scheduler would (one node per site).
            let api: Api<Pod> =
                Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
            let patch = json!({"spec": {"nodeName": ctx.node_name}});
            if let Err(e) = api
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                warn!(pod = %pod.name_any(), error = %e, "binding pod to node");
            }
            return;
        }
        Some(n) if n != ctx.node_name => return,
        Some(_) => {}
    }
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default();
    if phase == "Succeeded" || phase == "Failed" {
        return;
    }
    let mut running = ctx.running.pods.lock().expect("kubelet lock poisoned");
    if running.get(&uid).is_some_and(|r| !r.task.is_finished()) {
        return;
    }
    let (stop, stopped) = watch::channel(false);
    let exec = ExecTargets::default();
    let (namespace, name) = (pod.namespace().unwrap_or_default(), pod.name_any());
    let containers = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
        .collect();
    let task = tokio::spawn(supervise(ctx.clone(), pod, stopped, exec.clone()));
    running.insert(
        uid,
        RunningPod {
            stop,
            task,
            namespace,
            name,
            containers,
            exec,
        },
    );
}

/// A pod marked for deletion: stop its processes (SIGTERM, SIGKILL after the grace period),
/// then remove it from the API with grace period 0. Until then the pod object stays, so
/// whoever waits for the pod to be gone knows its processes have ended.
fn finish_deletion(ctx: &Arc<NodeContext>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    if !ctx
        .running
        .terminating
        .lock()
        .expect("kubelet lock poisoned")
        .insert(uid.clone())
    {
        return;
    }
    let running = ctx
        .running
        .pods
        .lock()
        .expect("kubelet lock poisoned")
        .remove(&uid);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        if let Some(r) = running {
            let _ = r.stop.send(true);
            let _ = r.task.await;
        }
        let api: Api<Pod> =
            Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
        let params = kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..kube::api::DeleteParams::default()
        };
        if let Err(e) = api.delete(&pod.name_any(), &params).await {
            warn!(pod = %pod.name_any(), error = %e, "removing a terminated pod");
        }
        ctx.running
            .terminating
            .lock()
            .expect("kubelet lock poisoned")
            .remove(&uid);
    });
}

fn stop_pod(ctx: &NodeContext, uid: &str) {
    if let Some(r) = ctx
        .running
        .pods
        .lock()
        .expect("kubelet lock poisoned")
        .get(uid)
    {
        let _ = r.stop.send(true);
    }
}

/// Stops every pod process of this node and waits for them (site shutdown).
pub async fn stop_all(ctx: &NodeContext) {
    let pods: Vec<RunningPod> = ctx
        .running
        .pods
        .lock()
        .expect("kubelet lock poisoned")
        .drain()
        .map(|(_, r)| r)
        .collect();
    for r in &pods {
        let _ = r.stop.send(true);
    }
    for r in pods {
        let _ = r.task.await;
    }
}

/// A mount as the process will see it.
#[derive(Clone, Debug)]
struct Mount {
    host: PathBuf,
    path: String,
    read_only: bool,
    /// A block volume exposed as a device file (`volumeDevices`).
    device: bool,
}

/// Everything needed to start one container.
#[derive(Clone)]
struct Prepared {
    name: String,
    launch: Launch,
    env: BTreeMap<String, String>,
    mounts: Vec<Mount>,
    working_dir: Option<String>,
    run_as: Option<(i64, Option<i64>)>,
    log: PathBuf,
    /// An init container with `restartPolicy: Always`: a sidecar, started in init order and
    /// kept running beside the workload.
    sidecar: bool,
    /// `readinessProbe` (regular containers only).
    readiness: Option<probes::ProbeSpec>,
    /// `livenessProbe` (regular containers only).
    liveness: Option<probes::ProbeSpec>,
    /// The image's own program (name, argv), which `pods/exec` runs by that name.
    image_program: Option<(String, Vec<String>)>,
}

fn timeline(
    ctx: &NodeContext,
    pod: &Pod,
    event: TimelineEvent,
    pid: Option<u32>,
    exit: Option<String>,
) {
    let entry = TimelineEntry {
        at_ms: now_ms(),
        site: ctx.site.clone(),
        event,
        namespace: pod.namespace().unwrap_or_default(),
        pod: pod.name_any(),
        app: pod.labels().get("app").cloned(),
        drill: pod.labels().get(ferry_manifests::DRILL_LABEL).cloned(),
        pid,
        exit,
    };
    if let Err(e) = ctx.timeline.append(&entry) {
        warn!(error = %e, "appending to the timeline");
    }
}

async fn patch_status(ctx: &NodeContext, pod: &Pod, status: serde_json::Value) {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let patch = json!({"status": status});
    if let Err(e) = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        // The pod may be gone already; its supervisor is stopping.
        tracing::debug!(pod = %pod.name_any(), error = %e, "updating pod status");
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn conditions(ready: bool) -> serde_json::Value {
    pod_conditions(true, ready)
}

/// Pod conditions: `Initialized` once every init container has succeeded.
fn pod_conditions(initialized: bool, ready: bool) -> serde_json::Value {
    let now = now_rfc3339();
    let s = |b: bool| if b { "True" } else { "False" };
    json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "Initialized", "status": s(initialized), "lastTransitionTime": now},
        {"type": "ContainersReady", "status": s(ready), "lastTransitionTime": now},
        {"type": "Ready", "status": s(ready), "lastTransitionTime": now},
    ])
}

/// Runs one pod until it completes or is stopped.
#[tracing::instrument(skip_all, fields(site = %ctx.site, namespace = %pod.namespace().unwrap_or_default(), pod = %pod.name_any()))]
async fn supervise(
    ctx: Arc<NodeContext>,
    pod: Pod,
    mut stopped: watch::Receiver<bool>,
    exec: ExecTargets,
) {
    // Volumes may not be ready yet (a claim still binding): retry, as the kubelet does,
    // reporting ContainerCreating; an image outside the catalog will not appear, so wait.
    let containers = loop {
        let err = match prepare(&ctx, &pod).await {
            Ok(c) => break c,
            Err(e) => e,
        };
        let reason = if matches!(err, PodError::Image { .. }) {
            "ErrImagePull"
        } else {
            "ContainerCreating"
        };
        let message = match err.source() {
            Some(cause) => format!("{err}: {cause}"),
            None => err.to_string(),
        };
        tracing::debug!(%message, "pod not startable yet");
        let statuses: Vec<_> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .map(|c| json!({"name": c.name, "image": c.image, "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason, "message": message}}}))
            .collect();
        patch_status(&ctx, &pod, json!({"phase": "Pending", "hostIP": ctx.ip.to_string(), "conditions": conditions(false), "containerStatuses": statuses})).await;
        if reason == "ErrImagePull" {
            until_stopped(&mut stopped).await;
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = until_stopped(&mut stopped) => return,
        }
    };
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        .max(0) as u64;
    let start_time = now_rfc3339();
    tokio::spawn(projected::refresh(
        ctx.clone(),
        pod.clone(),
        containers.tokens.clone(),
        stopped.clone(),
    ));
    // Init containers run one after the other, each to success, before the workload, and
    // again whenever the pod is started anew (a site restart), as after a node reboot.
    let (sidecars_stop, sidecars_stopped) = watch::channel(false);
    let Some(sidecars) = run_init_containers(
        &ctx,
        &pod,
        &containers.init,
        &policy,
        grace,
        &mut stopped,
        sidecars_stopped,
    )
    .await
    else {
        return;
    };
    run_workload(
        &ctx,
        &pod,
        containers.main,
        &policy,
        grace,
        start_time,
        &stopped,
        &exec,
    )
    .await;
    // Sidecars stop after the workload, as the kubelet stops them last.
    let _ = sidecars_stop.send(true);
    for sidecar in sidecars {
        let _ = sidecar.await;
    }
}

/// What the kubelet reports of one regular container.
struct ContainerReport {
    /// Its `containerStatuses` entry.
    status: serde_json::Value,
    /// Whether it counts as ready (running, and its readiness probe passing if it has one).
    ready: bool,
    /// Its exit code once it has ended for good (the restart policy restarts it no more).
    finished: Option<i32>,
}

/// The regular containers' part of a pod's status, shared by their supervisors. Each update
/// publishes the whole status under the lock, so updates from concurrent containers reach
/// the API server in order and never undo each other.
struct PodReport {
    start_time: String,
    containers: Vec<ContainerReport>,
}

impl PodReport {
    /// Applies `change` to container `idx`'s report and publishes the pod's status: phase
    /// `Running` while any container has not ended for good, then `Succeeded` when all
    /// exited 0, else `Failed`; `Ready` when every container is ready.
    async fn update(
        report: &tokio::sync::Mutex<PodReport>,
        ctx: &NodeContext,
        pod: &Pod,
        idx: usize,
        change: impl FnOnce(&mut ContainerReport),
    ) {
        let mut report = report.lock().await;
        change(&mut report.containers[idx]);
        let statuses: Vec<_> = report.containers.iter().map(|c| c.status.clone()).collect();
        let exits: Option<Vec<i32>> = report.containers.iter().map(|c| c.finished).collect();
        let status = match exits {
            Some(exits) => {
                let phase = if exits.iter().all(|&c| c == 0) {
                    "Succeeded"
                } else {
                    "Failed"
                };
                json!({"phase": phase, "conditions": conditions(false), "containerStatuses": statuses})
            }
            None => {
                let ready = report.containers.iter().all(|c| c.ready);
                let ip = ctx.ip.to_string();
                json!({
                    "phase": "Running", "hostIP": ip, "podIP": ip, "podIPs": [{"ip": ip}],
                    "startTime": report.start_time, "conditions": conditions(ready),
                    "containerStatuses": statuses,
                })
            }
        };
        patch_status(ctx, pod, status).await;
    }
}

/// Runs the pod's regular containers, each supervised on its own as the kubelet does, until
/// the pod stops or, per `policy`, every container has ended.
#[allow(clippy::too_many_arguments)]
async fn run_workload(
    ctx: &Arc<NodeContext>,
    pod: &Pod,
    main: Vec<Prepared>,
    policy: &str,
    grace: u64,
    start_time: String,
    stopped: &watch::Receiver<bool>,
    exec: &ExecTargets,
) {
    let previous: BTreeMap<String, i32> = pod
        .status
        .iter()
        .flat_map(|s| s.container_statuses.iter().flatten())
        .map(|s| (s.name.clone(), s.restart_count))
        .collect();
    let report = Arc::new(tokio::sync::Mutex::new(PodReport {
        start_time,
        containers: main
            .iter()
            .map(|c| ContainerReport {
                status: json!({"name": c.name, "image": "", "imageID": "", "ready": false, "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}),
                ready: false,
                finished: None,
            })
            .collect(),
    }));
    let tasks: Vec<_> = main
        .into_iter()
        .enumerate()
        .map(|(idx, c)| {
            let restarts = previous.get(&c.name).copied().unwrap_or(0);
            run_container(
                ctx.clone(),
                pod.clone(),
                idx,
                c,
                policy.to_string(),
                grace,
                restarts,
                stopped.clone(),
                report.clone(),
                exec.clone(),
            )
        })
        .collect();
    futures::future::join_all(tasks).await;
}

/// Supervises regular container `idx` of `pod`: starts it, runs its probes, restarts it as
/// `policy` says with exponential back-off, and stops it (SIGTERM, SIGKILL after `grace`
/// seconds) when the pod stops.
#[allow(clippy::too_many_arguments)]
async fn run_container(
    ctx: Arc<NodeContext>,
    pod: Pod,
    idx: usize,
    c: Prepared,
    policy: String,
    grace: u64,
    mut restarts: i32,
    mut stopped: watch::Receiver<bool>,
    report: Arc<tokio::sync::Mutex<PodReport>>,
    exec: ExecTargets,
) {
    let ctx = &*ctx;
    let entry = |restarts: i32, ready: bool, state: serde_json::Value| json!({"name": c.name, "image": "", "imageID": "", "ready": ready, "started": state.get("running").is_some(), "restartCount": restarts, "state": state});
    loop {
        let mut child = match spawn(&c) {
            Ok(child) => child,
            Err(e) => {
                warn!(error = %e, container = %c.name, "spawning container");
                let terminated = json!({"terminated": {"exitCode": 128, "reason": "StartError", "message": e.to_string(), "finishedAt": now_rfc3339()}});
                PodReport::update(&report, ctx, &pod, idx, |r| {
                    r.status = entry(restarts, false, terminated);
                    r.ready = false;
                    r.finished = Some(128);
                })
                .await;
                return;
            }
        };
        let pid = child.id().unwrap_or_default();
        for m in &c.mounts {
            ctx.volume_users.add(&m.host, pid);
        }
        timeline(ctx, &pod, TimelineEvent::Start, Some(pid), None);
        let target = ExecTarget {
            pid,
            env: c.env.clone(),
            working_dir: c.working_dir.clone(),
            run_as: c.run_as,
            image_program: c.image_program.clone(),
        };
        exec.lock()
            .expect("kubelet lock poisoned")
            .insert(c.name.clone(), target.clone());
        info!(pid, container = %c.name, "started");
        let started_at = now_rfc3339();
        let running = json!({"running": {"startedAt": started_at}});
        // Without a readiness probe a running container is ready at once.
        let ready = c.readiness.is_none();
        PodReport::update(&report, ctx, &pod, idx, |r| {
            r.status = entry(restarts, ready, running.clone());
            r.status["containerID"] = json!(format!("lab://{pid}"));
            r.ready = ready;
        })
        .await;

        let probing = run_probes(ctx, &pod, idx, &c, &target, &report, restarts, &running);
        let exit = tokio::select! {
            status = child.wait() => status.ok(),
            _ = until_stopped(&mut stopped) => terminate(pid, c.launch.stop_signal, grace, &mut child).await,
            reason = probing => {
                info!(pid, container = %c.name, %reason, "liveness probe failed; killing the container");
                terminate(pid, c.launch.stop_signal, grace, &mut child).await
            }
        };
        ctx.volume_users.remove_pid(pid);
        exec.lock().expect("kubelet lock poisoned").remove(&c.name);
        let exit_text = exit.map(|s| s.to_string());
        timeline(ctx, &pod, TimelineEvent::Stop, Some(pid), exit_text.clone());
        info!(pid, container = %c.name, exit = ?exit_text, "stopped");
        if *stopped.borrow() {
            return;
        }
        let code = exit.and_then(|s| s.code()).unwrap_or(137);
        let restart = match policy.as_str() {
            "Never" => false,
            "OnFailure" => code != 0,
            _ => true,
        };
        let terminated = json!({"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }, "finishedAt": now_rfc3339(), "startedAt": started_at});
        if !restart {
            PodReport::update(&report, ctx, &pod, idx, |r| {
                r.status = entry(restarts, false, json!({"terminated": terminated}));
                r.ready = false;
                r.finished = Some(code);
            })
            .await;
            return;
        }
        restarts += 1;
        let backoff = Duration::from_millis(250u64.saturating_mul(1 << restarts.clamp(0, 10)))
            .min(MAX_BACKOFF);
        let waiting = json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off {backoff:?} restarting failed container={} pod={}", c.name, pod.name_any())}});
        PodReport::update(&report, ctx, &pod, idx, |r| {
            r.status = entry(restarts, false, waiting);
            r.status["lastState"] = json!({"terminated": terminated});
            r.ready = false;
        })
        .await;
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = until_stopped(&mut stopped) => return,
        }
    }
}

/// Runs container `c`'s readiness probe (publishing each change of readiness) and its
/// liveness probe; resolves only when the liveness probe fails, with the last failure.
#[allow(clippy::too_many_arguments)]
async fn run_probes(
    ctx: &NodeContext,
    pod: &Pod,
    idx: usize,
    c: &Prepared,
    target: &ExecTarget,
    report: &tokio::sync::Mutex<PodReport>,
    restarts: i32,
    running: &serde_json::Value,
) -> String {
    let exec = |command: Vec<String>, timeout: Duration| async move {
        let mut cmd = container_command(target, &command);
        let output = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| format!("command {command:?} timed out after {timeout:?}"))?
            .map_err(|e| format!("starting {:?}: {e}", command[0]))?;
        Ok(exit_code(output.status))
    };
    let readiness = async {
        let Some(spec) = &c.readiness else {
            return std::future::pending::<()>().await;
        };
        tokio::time::sleep(spec.initial_delay).await;
        let mut verdict = probes::Verdict::new(false);
        let mut published = false;
        loop {
            let result = probes::check(&spec.action, spec.timeout, exec).await;
            if let Err(reason) = &result {
                tracing::debug!(container = %c.name, %reason, "readiness probe failed");
            }
            let ready = verdict.record(spec, result.is_ok());
            if ready != published {
                PodReport::update(report, ctx, pod, idx, |r| {
                    r.status["ready"] = json!(ready);
                    r.status["state"] = running.clone();
                    r.status["restartCount"] = json!(restarts);
                    r.ready = ready;
                })
                .await;
                published = ready;
            }
            tokio::time::sleep(spec.period).await;
        }
    };
    let liveness = async {
        let Some(spec) = &c.liveness else {
            return std::future::pending::<String>().await;
        };
        tokio::time::sleep(spec.initial_delay).await;
        let mut verdict = probes::Verdict::new(true);
        loop {
            let result = probes::check(&spec.action, spec.timeout, exec).await;
            if !verdict.record(spec, result.is_ok()) {
                return result.err().unwrap_or_default();
            }
            tokio::time::sleep(spec.period).await;
        }
    };
    tokio::select! {
        () = readiness => unreachable!("the readiness loop never ends"),
        reason = liveness => reason,
    }
}

/// Runs `init` in order, each until it exits 0, restarting a failed one with back-off unless
/// `policy` is `Never` (then the pod fails). A sidecar (`restartPolicy: Always`) is started in
/// its turn and kept running (restarted when it exits) until `sidecars_stopped`; the tasks
/// running them are returned. `None` when the pod stopped or failed.
async fn run_init_containers(
    ctx: &Arc<NodeContext>,
    pod: &Pod,
    init: &[Prepared],
    policy: &str,
    grace: u64,
    stopped: &mut watch::Receiver<bool>,
    sidecars_stopped: watch::Receiver<bool>,
) -> Option<Vec<tokio::task::JoinHandle<()>>> {
    let mut sidecars = Vec::new();
    for (i, c) in init.iter().enumerate() {
        if c.sidecar {
            sidecars.push(tokio::spawn(run_sidecar(
                pod.clone(),
                c.clone(),
                grace,
                stopped.clone(),
                sidecars_stopped.clone(),
            )));
            continue;
        }
        let mut restarts = 0i32;
        loop {
            let mut child = match spawn(c) {
                Ok(child) => child,
                Err(e) => {
                    warn!(error = %e, "spawning init container");
                    patch_status(ctx, pod, json!({"phase": "Failed", "reason": "StartError", "message": e.to_string()})).await;
                    {
                        for s in &sidecars {
                            s.abort();
                        }
                        return None;
                    }
                }
            };
            let pid = child.id().unwrap_or_default();
            for m in &c.mounts {
                ctx.volume_users.add(&m.host, pid);
            }
            info!(pid, container = %c.name, "init container started");
            patch_status(ctx, pod, json!({
                "phase": "Pending", "hostIP": ctx.ip.to_string(), "conditions": pod_conditions(false, false),
                "initContainerStatuses": [{"name": c.name, "image": "", "imageID": "", "ready": false, "restartCount": restarts, "state": {"running": {"startedAt": now_rfc3339()}}}],
            }))
            .await;
            let exit = tokio::select! {
                status = child.wait() => status.ok(),
                _ = until_stopped(stopped) => terminate(pid, c.launch.stop_signal, grace, &mut child).await,
            };
            ctx.volume_users.remove_pid(pid);
            if *stopped.borrow() {
                {
                    for s in &sidecars {
                        s.abort();
                    }
                    return None;
                }
            }
            let code = exit.and_then(|s| s.code()).unwrap_or(137);
            info!(pid, container = %c.name, code, "init container exited");
            if code == 0 {
                break;
            }
            if policy == "Never" {
                patch_status(ctx, pod, json!({"phase": "Failed", "reason": "InitContainerFailed", "message": format!("init container {} ({} of {}) exited with {code}", c.name, i + 1, init.len())})).await;
                {
                    for s in &sidecars {
                        s.abort();
                    }
                    return None;
                }
            }
            restarts += 1;
            let backoff = Duration::from_millis(250u64.saturating_mul(1 << restarts.clamp(0, 10)))
                .min(MAX_BACKOFF);
            patch_status(ctx, pod, json!({
                "conditions": pod_conditions(false, false),
                "initContainerStatuses": [{"name": c.name, "image": "", "imageID": "", "ready": false, "restartCount": restarts, "state": {"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off {backoff:?} restarting failed init container (exit {code})")}}}],
            }))
            .await;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = until_stopped(stopped) => {
                    for s in &sidecars { s.abort(); }
                    return None;
                }
            }
        }
    }
    Some(sidecars)
}

/// Keeps sidecar `c` running until the pod or its sidecars stop: restarted with back-off
/// whenever it exits. Not on the timeline, which records the workload.
async fn run_sidecar(
    pod: Pod,
    c: Prepared,
    grace: u64,
    mut stopped: watch::Receiver<bool>,
    mut sidecars_stopped: watch::Receiver<bool>,
) {
    let mut restarts = 0u32;
    loop {
        let mut child = match spawn(&c) {
            Ok(child) => child,
            Err(e) => {
                warn!(error = %e, container = %c.name, "spawning sidecar");
                return;
            }
        };
        let pid = child.id().unwrap_or_default();
        info!(pid, container = %c.name, pod = %pod.name_any(), "sidecar started");
        let stop = tokio::select! {
            status = child.wait() => {
                info!(pid, container = %c.name, status = ?status.ok(), "sidecar exited");
                false
            }
            _ = until_stopped(&mut stopped) => true,
            _ = until_stopped(&mut sidecars_stopped) => true,
        };
        if stop {
            terminate(pid, c.launch.stop_signal, grace, &mut child).await;
            return;
        }
        restarts += 1;
        let backoff =
            Duration::from_millis(250u64.saturating_mul(1 << restarts.min(10))).min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = until_stopped(&mut stopped) => return,
            _ = until_stopped(&mut sidecars_stopped) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_expansion() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("$(A)/y", &env), "x/y");
    }

    #[test]
    fn mount_paths_rewritten_without_namespaces() {
        let mounts = [Mount {
            host: "/lab/v1".into(),
            path: "/data".into(),
            read_only: false,
            device: false,
        }];
        let env = BTreeMap::from([
            ("DATA_DIR".to_string(), "/data/db".to_string()),
            ("OTHER".to_string(), "/database".to_string()),
        ]);
        let out = rewrite_mount_paths(env, &mounts);
        assert_eq!(out["DATA_DIR"], "/lab/v1/db");
        assert_eq!(
            out["OTHER"], "/database",
            "only whole path components match"
        );
    }
}
