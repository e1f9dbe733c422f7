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

/// The kubelet's side of `pods/exec`: runs a command in a running container of a pod (the
/// one named, or the pod's only container), with the container's environment and, as root,
/// inside its mount namespace (`nsenter`) as its user, so paths such as a volume's
/// `mountPath` resolve as in the container. Without root it runs on the host with the
/// container's (rewritten) environment. The command has [`EXEC_TIMEOUT`] to finish; the
/// caller's own timeout should be shorter. Errors use the API server's and kubelet's wording.
pub struct KubeletExec(pub Arc<NodeContext>);

/// Longest an exec may run before the kubelet kills it.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(300);

impl crate::apiserver::exec::ExecBackend for KubeletExec {
    fn exec(
        &self,
        namespace: String,
        pod: String,
        container: Option<String>,
        command: Vec<String>,
    ) -> crate::apiserver::exec::ExecFuture {
        let ctx = self.0.clone();
        Box::pin(async move {
            use lab_apimachinery::status::ApiError;
            let target = {
                let pods = ctx.running.pods.lock().expect("kubelet lock poisoned");
                let running = pods
                    .values()
                    .find(|r| r.namespace == namespace && r.name == pod)
                    .ok_or_else(|| ApiError::not_found("", "pods", &pod))?;
                let name = match (container, running.containers.as_slice()) {
                    (Some(c), names) if names.contains(&c) => c,
                    (Some(c), _) => {
                        return Err(ApiError::bad_request(format!(
                            "container {c} is not valid for pod {pod}"
                        )))
                    }
                    (None, [only]) => only.clone(),
                    (None, names) => {
                        return Err(ApiError::bad_request(format!(
                            "a container name must be specified for pod {pod}, choose one of: [{}]",
                            names.join(" ")
                        )))
                    }
                };
                let target = running
                    .exec
                    .lock()
                    .expect("kubelet lock poisoned")
                    .get(&name)
                    .cloned();
                target.ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unable to upgrade connection: container not found (\"{name}\")"
                    ))
                })?
            };
            let output =
                tokio::time::timeout(EXEC_TIMEOUT, container_command(&target, &command).output())
                    .await
                    .map_err(|_| {
                        ApiError::internal(format!("command {command:?} ran over {EXEC_TIMEOUT:?}"))
                    })?
                    .map_err(|e| {
                        ApiError::internal(format!("starting {:?} in pod {pod}: {e}", command[0]))
                    })?;
            Ok(crate::apiserver::exec::ExecOutput {
                stdout: output.stdout,
                stderr: output.stderr,
                exit_code: exit_code(output.status),
            })
        })
    }
}

/// `command` as it runs in container `target`: as root inside the container's mount
/// namespace, as its user; its environment only, stdin closed, killed when dropped.
fn container_command(target: &ExecTarget, command: &[String]) -> tokio::process::Command {
    let mut cmd = if is_root() {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args(["--target", &target.pid.to_string(), "--mount", "--"]);
        if let Some((uid, gid)) = target.run_as {
            let gid = gid.unwrap_or(uid);
            cmd.args([
                "setpriv".to_string(),
                format!("--reuid={uid}"),
                format!("--regid={gid}"),
                "--clear-groups".into(),
                "--".into(),
            ]);
        }
        cmd.args(command);
        cmd
    } else {
        let mut cmd = tokio::process::Command::new(&command[0]);
        cmd.args(&command[1..]);
        cmd
    };
    if let Some(dir) = &target.working_dir {
        cmd.current_dir(dir);
    }
    container_env_only(&mut cmd, &target.env)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// Gives `cmd` exactly the container's environment `env`, plus the host's `PATH` (the lab's
/// processes run the host's binaries).
fn container_env_only<'c>(
    cmd: &'c mut tokio::process::Command,
    env: &BTreeMap<String, String>,
) -> &'c mut tokio::process::Command {
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
        )
        .envs(env)
}

/// A process's exit code, or 128 + the signal that ended it, as a shell reports it.
fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(9))
}

/// Resolves once the pod's stop has been requested.
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = stopped.wait_for(|s| *s).await;
}

/// The image's stop signal (`stop_signal`, e.g. `TERM`) to the process group, SIGKILL after
/// `grace_seconds`; returns the exit status.
async fn terminate(
    pid: u32,
    stop_signal: &str,
    grace_seconds: u64,
    child: &mut tokio::process::Child,
) -> Option<std::process::ExitStatus> {
    signal_group(stop_signal, pid);
    match tokio::time::timeout(Duration::from_secs(grace_seconds), child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            signal_group("KILL", pid);
            child.wait().await.ok()
        }
    }
}

fn signal_group(sig: &str, pgid: u32) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .status();
}

/// Whether this process runs as root (pods then get private mount namespaces).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Quotes a string for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn spawn(c: &Prepared) -> Result<tokio::process::Child, PodError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&c.log)
        .map_err(|source| PodError::Files {
            path: c.log.clone(),
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| PodError::Files {
        path: c.log.clone(),
        source,
    })?;
    let mut argv: Vec<String> = vec![c.launch.program.to_string_lossy().into_owned()];
    argv.extend(c.launch.args.iter().cloned());
    let mut cmd = if is_root() {
        // Private mount namespace: bind every volume at its mountPath, then drop privileges.
        let mut script = String::from("set -e\n");
        for m in &c.mounts {
            let target = sh_quote(&m.path);
            if m.device {
                script.push_str(&format!(
                    "mkdir -p \"$(dirname {target})\"; touch {target}\n"
                ));
            } else {
                script.push_str(&format!("mkdir -p {target}\n"));
            }
            script.push_str(&format!(
                "mount --bind {} {target}\n",
                sh_quote(&m.host.to_string_lossy())
            ));
            if m.read_only {
                script.push_str(&format!("mount -o remount,bind,ro {target}\n"));
            }
        }
        if let Some(dir) = &c.working_dir {
            script.push_str(&format!("mkdir -p {0}; cd {0}\n", sh_quote(dir)));
        }
        let exec = argv
            .iter()
            .map(|a| sh_quote(a))
            .collect::<Vec<_>>()
            .join(" ");
        match c.run_as {
            Some((uid, gid)) => {
                let gid = gid.unwrap_or(uid);
                script.push_str(&format!(
                    "exec setpriv --reuid={uid} --regid={gid} --clear-groups -- {exec}\n"
                ));
            }
            None => script.push_str(&format!("exec {exec}\n")),
        }
        let mut cmd = tokio::process::Command::new("unshare");
        cmd.args([
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ]);
        cmd
    } else {
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        if let Some(dir) = &c.working_dir {
            cmd.current_dir(dir);
        }
        cmd
    };
    container_env_only(&mut cmd, &c.env)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn().map_err(|source| PodError::Spawn {
        container: c.name.clone(),
        source,
    })
}

/// The host directory of one of the pod's volumes, created if needed.
async fn volume_host_path(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
    volume: &k8s_openapi::api::core::v1::Volume,
    tokens: &mut Vec<TokenFile>,
) -> Result<(PathBuf, bool), PodError> {
    let ns = pod.namespace().unwrap_or_default();
    let err = |reason: String| PodError::Volume {
        volume: volume.name.clone(),
        reason,
    };
    let files_dir = pod_dir.join("volumes").join(&volume.name);
    let write_files = |files: BTreeMap<String, Vec<u8>>| -> Result<(PathBuf, bool), PodError> {
        std::fs::create_dir_all(&files_dir).map_err(|source| PodError::Files {
            path: files_dir.clone(),
            source,
        })?;
        for (k, v) in files {
            let p = files_dir.join(k);
            std::fs::write(&p, v).map_err(|source| PodError::Files {
                path: p.clone(),
                source,
            })?;
        }
        Ok((files_dir.clone(), false))
    };
    if let Some(pvc) = &volume.persistent_volume_claim {
        let found = super::storage::volume_path(&ctx.client, &ns, &pvc.claim_name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let (path, mode) = found.ok_or_else(|| {
            err(format!(
                "persistentvolumeclaim {:?} is not bound",
                pvc.claim_name
            ))
        })?;
        return Ok((path, mode == super::storage::VolumeMode::Block));
    }
    if volume.empty_dir.is_some() {
        std::fs::create_dir_all(&files_dir).map_err(|source| PodError::Files {
            path: files_dir.clone(),
            source,
        })?;
        return Ok((files_dir, false));
    }
    if let Some(cm) = &volume.config_map {
        let name = cm.name.clone();
        let found = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let cm = found.ok_or_else(|| err(format!("configmap {name:?} not found")))?;
        return write_files(
            cm.data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes()))
                .collect(),
        );
    }
    if let Some(secret) = &volume.secret {
        let name = secret.secret_name.clone().unwrap_or_default();
        let found = Api::<Secret>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&name)
            .await
            .map_err(|e| err(e.to_string()))?;
        let s = found.ok_or_else(|| err(format!("secret {name:?} not found")))?;
        let mut files: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        files.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        return write_files(files);
    }
    if let Some(source) = &volume.projected {
        tokens.extend(
            projected::fill(ctx, pod, source, &files_dir)
                .await
                .map_err(err)?,
        );
        return Ok((files_dir, false));
    }
    if let Some(hp) = &volume.host_path {
        return Ok((PathBuf::from(&hp.path), false));
    }
    Err(err("volume type not supported by the lab (persistentVolumeClaim, emptyDir, configMap, secret, projected, hostPath are)".into()))
}

/// Resolves env, volumes, image and identity for each container of the pod.
/// A pod's containers, ready to start.
struct PreparedPod {
    /// `initContainers`, in order.
    init: Vec<Prepared>,
    /// `containers`.
    main: Vec<Prepared>,
    /// Projected service-account tokens to keep fresh while the pod runs.
    tokens: Vec<TokenFile>,
}

async fn prepare(ctx: &NodeContext, pod: &Pod) -> Result<PreparedPod, PodError> {
    let spec = pod.spec.clone().unwrap_or_default();
    let ns = pod.namespace().unwrap_or_default();
    let pod_dir = ctx.pods_dir().join(format!(
        "{ns}_{}_{}",
        pod.name_any(),
        pod.uid().unwrap_or_default()
    ));
    std::fs::create_dir_all(&pod_dir).map_err(|source| PodError::Files {
        path: pod_dir.clone(),
        source,
    })?;
    let mut volumes: BTreeMap<String, (PathBuf, bool)> = BTreeMap::new();
    let mut tokens = Vec::new();
    for v in spec.volumes.iter().flatten() {
        volumes.insert(
            v.name.clone(),
            volume_host_path(ctx, pod, &pod_dir, v, &mut tokens).await?,
        );
    }
    let pod_sc = spec.security_context.clone().unwrap_or_default();
    if let (Some(fs_group), true) = (pod_sc.fs_group, is_root()) {
        let on_root_mismatch = pod_sc.fs_group_change_policy.as_deref() == Some("OnRootMismatch");
        for (path, _) in volumes.values() {
            // With OnRootMismatch, a volume whose root already has the group and the group
            // permissions is left alone, as the kubelet does (PostgreSQL needs its 0700 PGDATA).
            if on_root_mismatch && root_matches_fs_group(path, fs_group) {
                continue;
            }
            // fsGroup: the volume's group becomes fsGroup and is group-writable.
            let _ = std::process::Command::new("chgrp")
                .arg("-R")
                .arg(fs_group.to_string())
                .arg(path)
                .status();
            let _ = std::process::Command::new("chmod")
                .arg("-R")
                .arg("g+rwX")
                .arg(path)
                .status();
        }
    }
    let mut out = PreparedPod {
        init: Vec::new(),
        main: Vec::new(),
        tokens,
    };
    for c in spec.init_containers.iter().flatten() {
        out.init
            .push(prepare_container(ctx, pod, &pod_dir, c, &volumes, &pod_sc).await?);
    }
    for c in &spec.containers {
        out.main
            .push(prepare_container(ctx, pod, &pod_dir, c, &volumes, &pod_sc).await?);
    }
    Ok(out)
}

/// Whether the volume root at `path` already belongs to group `fs_group` with group rwx.
fn root_matches_fs_group(path: &std::path::Path, fs_group: i64) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| i64::from(m.gid()) == fs_group && m.mode() & 0o070 == 0o070)
        .unwrap_or(false)
}

async fn prepare_container(
    ctx: &NodeContext,
    pod: &Pod,
    pod_dir: &Path,
    c: &Container,
    volumes: &BTreeMap<String, (PathBuf, bool)>,
    pod_sc: &k8s_openapi::api::core::v1::PodSecurityContext,
) -> Result<Prepared, PodError> {
    let launch = ctx
        .catalog
        .resolve(
            c.image.as_deref().unwrap_or_default(),
            c.command.as_deref().unwrap_or_default(),
            c.args.as_deref().unwrap_or_default(),
        )
        .map_err(|source| PodError::Image {
            container: c.name.clone(),
            source,
        })?;
    let mut mounts = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let (host, _) = volumes.get(&m.name).ok_or_else(|| PodError::Volume {
            volume: m.name.clone(),
            reason: "no such volume in the pod".into(),
        })?;
        let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let p = host.join(sub);
                std::fs::create_dir_all(&p).map_err(|source| PodError::Files {
                    path: p.clone(),
                    source,
                })?;
                p
            }
            None => host.clone(),
        };
        mounts.push(Mount {
            host,
            path: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
            device: false,
        });
    }
    for d in c.volume_devices.iter().flatten() {
        let (host, _) = volumes.get(&d.name).ok_or_else(|| PodError::Volume {
            volume: d.name.clone(),
            reason: "no such volume in the pod".into(),
        })?;
        mounts.push(Mount {
            host: host.clone(),
            path: d.device_path.clone(),
            read_only: false,
            device: true,
        });
    }
    let env = container_env(ctx, pod, c).await?;
    let env = if is_root() {
        env
    } else {
        rewrite_mount_paths(env, &mounts)
    };
    let sc = c.security_context.clone().unwrap_or_default();
    let uid = sc.run_as_user.or(pod_sc.run_as_user);
    let gid = sc.run_as_group.or(pod_sc.run_as_group);
    Ok(Prepared {
        name: c.name.clone(),
        launch,
        env,
        mounts,
        working_dir: c.working_dir.clone(),
        run_as: uid.map(|u| (u, gid)),
        log: pod_dir.join(format!("{}.log", c.name)),
        sidecar: c.restart_policy.as_deref() == Some("Always"),
        readiness: container_probe(c, c.readiness_probe.as_ref(), ctx.ip),
        liveness: container_probe(c, c.liveness_probe.as_ref(), ctx.ip),
    })
}

/// A container's probe as the lab runs it; one it cannot run (`grpc`, a port the container
/// lacks) is logged and left out, so it neither gates readiness nor restarts the container.
fn container_probe(
    c: &Container,
    probe: Option<&k8s_openapi::api::core::v1::Probe>,
    pod_ip: std::net::IpAddr,
) -> Option<probes::ProbeSpec> {
    probes::ProbeSpec::new(probe?, c, pod_ip)
        .map_err(|reason| warn!(container = %c.name, %reason, "probe not run by the lab"))
        .ok()
}

/// Without mount namespaces, values naming a path under a mountPath point at the host path.
fn rewrite_mount_paths(
    env: BTreeMap<String, String>,
    mounts: &[Mount],
) -> BTreeMap<String, String> {
    env.into_iter()
        .map(|(k, v)| {
            let rewritten = mounts
                .iter()
                .filter(|m| {
                    v == m.path || v.starts_with(&format!("{}/", m.path.trim_end_matches('/')))
                })
                .max_by_key(|m| m.path.len())
                .map(|m| {
                    format!(
                        "{}{}",
                        m.host.to_string_lossy(),
                        &v[m.path.trim_end_matches('/').len()..]
                    )
                });
            (k, rewritten.unwrap_or(v))
        })
        .collect()
}

/// The container's environment: `env` (values, fieldRef, configMapKeyRef, secretKeyRef),
/// `envFrom`, plus `POD_IP` and how to reach the API server: `KUBECONFIG` for the site on
/// the lab's control plane, `KUBERNETES_SERVICE_HOST`/`PORT` on a real one.
async fn container_env(
    ctx: &NodeContext,
    pod: &Pod,
    c: &Container,
) -> Result<BTreeMap<String, String>, PodError> {
    let ns = pod.namespace().unwrap_or_default();
    let cms: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let env_err = |name: &str, reason: String| PodError::Volume {
        volume: format!("env {name}"),
        reason,
    };
    let mut env = BTreeMap::new();
    match ctx.control_plane {
        // The lab's API server has no identities: pods use the site's kubeconfig.
        ControlPlane::Lab => {
            env.insert(
                "KUBECONFIG".to_string(),
                ctx.kubeconfig.to_string_lossy().into_owned(),
            );
        }
        // Pods find the API server as in a cluster and act under their ServiceAccount
        // through the token projected into them (see `projected`).
        ControlPlane::Kubernetes => {
            let (host, port) = (ctx.api.ip().to_string(), ctx.api.port().to_string());
            env.insert("KUBERNETES_SERVICE_HOST".into(), host);
            env.insert("KUBERNETES_SERVICE_PORT".into(), port.clone());
            env.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), port);
        }
    }
    env.insert("POD_IP".to_string(), ctx.ip.to_string());
    env.insert("HOSTNAME".to_string(), pod.name_any());
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            if let Ok(cm) = cms.get(&r.name).await {
                env.extend(
                    cm.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (format!("{prefix}{k}"), v)),
                );
            }
        }
        if let Some(r) = &from.secret_ref {
            if let Ok(s) = secrets.get(&r.name).await {
                env.extend(s.data.unwrap_or_default().into_iter().map(|(k, v)| {
                    (
                        format!("{prefix}{k}"),
                        String::from_utf8_lossy(&v.0).into_owned(),
                    )
                }));
            }
        }
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(f) = &from.field_ref {
                    match f.field_path.as_str() {
                        "metadata.name" => pod.name_any(),
                        "metadata.namespace" => ns.clone(),
                        "metadata.uid" => pod.uid().unwrap_or_default(),
                        "spec.nodeName" => ctx.node_name.clone(),
                        "status.podIP" | "status.hostIP" => ctx.ip.to_string(),
                        other => {
                            return Err(env_err(
                                &e.name,
                                format!("fieldRef {other} is not supported by the lab"),
                            ))
                        }
                    }
                } else if let Some(k) = &from.config_map_key_ref {
                    // `optional: true`: a missing ConfigMap or key leaves the variable unset.
                    let optional = k.optional == Some(true);
                    let value = match cms.get_opt(&k.name).await {
                        Ok(cm) => cm.and_then(|cm| cm.data.unwrap_or_default().remove(&k.key)),
                        Err(x) => return Err(env_err(&e.name, x.to_string())),
                    };
                    match value {
                        Some(v) => v,
                        None if optional => continue,
                        None => {
                            return Err(env_err(
                                &e.name,
                                format!("key {} not in configmap {}", k.key, k.name),
                            ))
                        }
                    }
                } else if let Some(k) = &from.secret_key_ref {
                    let optional = k.optional == Some(true);
                    let value = match secrets.get_opt(&k.name).await {
                        Ok(s) => s.and_then(|s| s.data.unwrap_or_default().remove(&k.key)),
                        Err(x) => return Err(env_err(&e.name, x.to_string())),
                    };
                    match value {
                        Some(bytes) => String::from_utf8_lossy(&bytes.0).into_owned(),
                        None if optional => continue,
                        None => {
                            return Err(env_err(
                                &e.name,
                                format!("key {} not in secret {}", k.key, k.name),
                            ))
                        }
                    }
                } else {
                    String::new()
                }
            }
            (None, None) => String::new(),
        };
        env.insert(e.name.clone(), expand(&value, &env));
    }
    Ok(env)
}

/// Expands `$(VAR)` references to earlier variables, as the kubelet does.
fn expand(value: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = value.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
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
