//! The DRDrill controller: proves at a pair's DR site that a committed generation recovers,
//! without touching production or pausing replication (Zerto's test failover is the model).
//!
//! Pending → Restoring → Verifying → Passed or Failed → CleanedUp, one idempotent step per
//! reconcile, recorded in the DRDrill's status first:
//!
//! - **Pending**: checks the drill (its DRPair exists here and is not active here, the
//!   generation is held here, the TTL parses, the sandbox namespace is free), then records the
//!   generation, the sandbox namespace, the start time and the data age.
//! - **Restoring**: creates the sandbox namespace and a NetworkPolicy that denies all ingress
//!   and all egress but DNS; for each of the generation's VolumeSnapshots a pre-provisioned
//!   VolumeSnapshotContent (`deletionPolicy: Retain`) on the same snapshot handle, bound to a
//!   VolumeSnapshot of the same name in the sandbox, so the app's PVCs are new volumes cloned
//!   from the generation, never the committed snapshots or the staging volumes themselves (a
//!   PVC's `dataSource` must be in its own namespace); then the generation's manifests,
//!   planned by the one instantiation pipeline as a drill (`Instantiation::Drill`: labelled,
//!   CronJobs suspended, no external Service addresses, no Ingress), applied in order; waits
//!   until every workload is ready (at most [`READY_TIMEOUT`]), which gives `rtoSeconds`.
//! - **Verifying**: runs `spec.verify.command` in the first running pod of the sandbox
//!   (`pods/exec`); its exit status is the verdict, its output tail is kept.
//! - **Passed / Failed**: the DRPair's `status.lastDrill` here records it, and an Event; after
//!   `spec.ttl` the sandbox namespace goes, then the drill's VolumeSnapshotContents (the
//!   snapshot data stays: it is the committed generation), and the phase is `CleanedUp`.
//!   Deleting the DRDrill cleans up the same way first (finalizer `ferry.dev/drill-cleanup`).
//!
//! The active site is never contacted, the witness quorum is not asked and the pair's epoch is
//! not touched: replication goes on while the drill runs. Note that the lab does not enforce
//! NetworkPolicy (`docs/lab.md`); a cluster whose network plugin does, isolates the sandbox.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{json, Value};

use ferry_manifests::{plan_instantiation, Instantiation, ManifestBundle, DRILL_LABEL};
use ferry_runtime::finalizer;
use ferry_runtime::volumes::{content_resource, snapshot_resource};
use ferry_schemas::contract::{manifests_secret, MANIFESTS_KEY};
use ferry_schemas::drill::DrillPhase as P;
use ferry_schemas::{DRDrill, DRPair};

use crate::context::{Context, ReconcileError};
use crate::instantiate::{self, MANAGER};
use crate::migration::{now, seconds_since};

/// Finalizer that holds a DRDrill until its sandbox is gone.
pub const DRILL_FINALIZER: &str = "ferry.dev/drill-cleanup";
/// How long the restored app may take to become ready before the drill fails.
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the verification command may run.
pub const VERIFY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the sandbox stays after the verdict when `spec.ttl` is absent.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// How often a step that waits on the cluster looks again.
const POLL: Duration = Duration::from_secs(1);
/// Characters of the verification output kept in the status.
const OUTPUT_TAIL_CHARS: usize = 2000;

/// Runs the controller for DRDrills at this site until the stream ends.
pub async fn run(ctx: Arc<Context>) {
    let drills: Api<DRDrill> = Api::all(ctx.client.clone());
    Controller::new(drills, watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "drill reconcile");
            }
        })
        .await;
}

fn error_policy(_d: Arc<DRDrill>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, "drill step failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// One reconcile's view of a drill.
struct Drill<'a> {
    ctx: &'a Context,
    drill: &'a DRDrill,
    api: Api<DRDrill>,
    namespace: String,
    uid: String,
}

impl Drill<'_> {
    async fn status(&self, status: Value) -> Result<(), ReconcileError> {
        self.api
            .patch_status(
                &self.drill.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?;
        Ok(())
    }

    async fn event(&self, warning: bool, reason: &str, note: String) {
        let recorder = Recorder::new(
            self.ctx.client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(self.ctx.site.clone()),
            },
        );
        let regarding = self.drill.object_ref(&());
        ferry_runtime::publish_event(&recorder, &regarding, warning, reason, "Drill", note).await;
    }

    /// Ends the drill as Failed: the condition names the cause, the DRPair records it.
    async fn fail(&self, reason: &str, message: String) -> Result<Action, ReconcileError> {
        tracing::warn!(drill = %self.drill.name_any(), %message, "drill failed");
        let condition = json!({"type": "Succeeded", "status": "False", "reason": reason,
            "message": message, "lastTransitionTime": now(), "observedGeneration": self.drill.metadata.generation});
        self.status(json!({"phase": P::Failed.as_str(), "completionTime": now(), "conditions": [condition]}))
            .await?;
        self.event(true, "DrillFailed", message).await;
        release(self).await;
        // Only a drill that got as far as restoring is the pair's last drill here (one refused
        // at the active site, say, is not).
        let started = matches!(
            self.drill.status.as_ref().and_then(|s| s.phase),
            Some(P::Restoring | P::Verifying)
        );
        if started {
            self.record_on_pair("Failed", None).await;
        }
        Ok(Action::requeue(POLL))
    }

    /// `status.lastDrill` of the DRPair at this site. Best effort: the drill's own status is
    /// the record.
    async fn record_on_pair(&self, result: &str, rto_seconds: Option<f64>) {
        let pairs: Api<DRPair> = Api::namespaced(self.ctx.client.clone(), &self.namespace);
        let patch = json!({"status": {"lastDrill": {"name": self.drill.name_any(), "time": now(),
            "result": result, "rtoSeconds": rto_seconds}}});
        if let Err(e) = pairs
            .patch_status(
                &self.drill.spec.pair,
                &PatchParams::default(),
                &Patch::Merge(patch),
            )
            .await
        {
            tracing::warn!(error = %e, "recording the drill on the DRPair");
        }
    }

    fn sandbox(&self) -> String {
        self.drill
            .status
            .as_ref()
            .and_then(|s| s.target_namespace.clone())
            .or_else(|| self.drill.spec.target_namespace.clone())
            .unwrap_or_else(|| {
                // A namespace name is a DNS label: at most 63 characters.
                let uid8 = &self.uid[..self.uid.len().min(8)];
                let room = 63 - "-drill-".len() - uid8.len();
                let base = &self.namespace[..self.namespace.len().min(room)];
                format!("{}-drill-{uid8}", base.trim_end_matches('-'))
            })
    }

    fn ttl(&self) -> Result<Duration, String> {
        match &self.drill.spec.ttl {
            None => Ok(DEFAULT_TTL),
            Some(text) => {
                ferry_schemas::duration::parse_duration(text).map_err(|e| format!("spec.ttl: {e}"))
            }
        }
    }
}

async fn reconcile(drill: Arc<DRDrill>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = drill.namespace().unwrap_or_default();
    let d = Drill {
        ctx: &ctx,
        drill: &drill,
        api: Api::namespaced(ctx.client.clone(), &namespace),
        uid: drill.uid().unwrap_or_default(),
        namespace,
    };
    if drill.metadata.deletion_timestamp.is_some() {
        if finalizer::has(&*drill, DRILL_FINALIZER) {
            if !cleanup(&d).await? {
                return Ok(Action::requeue(POLL));
            }
            finalizer::remove(&d.api, &*drill, DRILL_FINALIZER).await?;
        }
        return Ok(Action::await_change());
    }
    let phase = drill.status.as_ref().and_then(|s| s.phase);
    match phase {
        None | Some(P::Pending) => start(&d).await,
        Some(P::Restoring) => restore(&d).await,
        Some(P::Verifying) => verify(&d).await,
        Some(P::Passed) | Some(P::Failed) => expire(&d).await,
        Some(P::CleanedUp) => Ok(Action::await_change()),
    }
}

/// Pending: checks everything a restore needs, then records what the drill will do.
async fn start(d: &Drill<'_>) -> Result<Action, ReconcileError> {
    finalizer::add(&d.api, d.drill, DRILL_FINALIZER).await?;
    let spec = &d.drill.spec;
    let pairs: Api<DRPair> = Api::namespaced(d.ctx.client.clone(), &d.namespace);
    let Some(pair) = pairs.get_opt(&spec.pair).await? else {
        return d
            .fail(
                "PairNotFound",
                format!(
                    "spec.pair: DRPair {}/{} does not exist at site {}",
                    d.namespace, spec.pair, d.ctx.site
                ),
            )
            .await;
    };
    let status = pair.status.clone().unwrap_or_default();
    let active = status
        .active_site
        .clone()
        .unwrap_or_else(|| pair.spec.primary_site.clone());
    if active == d.ctx.site {
        return d
            .fail(
                "ActiveSite",
                format!(
                    "DRPair {} is active at site {active}, this site: a drill runs at the pair's DR site (create the DRDrill there)",
                    spec.pair
                ),
            )
            .await;
    }
    if let Err(message) = d.ttl() {
        return d.fail("InvalidSpec", message).await;
    }
    if let Some(verify) = &spec.verify {
        if verify.job.is_some() && !verify.command.is_empty() {
            return d
                .fail(
                    "InvalidSpec",
                    "spec.verify: command and job are exclusive; give one".into(),
                )
                .await;
        }
        if verify.container.is_some() && verify.command.is_empty() {
            return d
                .fail(
                    "InvalidSpec",
                    "spec.verify.command: required when spec.verify.container is set".into(),
                )
                .await;
        }
    }
    let newest = status.generation.map(|g| g.0);
    let Some(generation) = spec.generation.or(newest) else {
        return d
            .fail(
                "NoGeneration",
                format!(
                    "no committed generation of {} at site {} yet",
                    spec.pair, d.ctx.site
                ),
            )
            .await;
    };
    let secret = manifests_secret(&spec.pair, generation);
    let held = Api::<Secret>::namespaced(d.ctx.client.clone(), &d.namespace)
        .get_opt(&secret)
        .await?
        .is_some();
    if !held {
        return d
            .fail(
                "GenerationNotHeld",
                format!(
                    "generation {generation} is not held at site {} (no Secret {}/{secret}; kept generations are in the DRPair's status here)",
                    d.ctx.site, d.namespace
                ),
            )
            .await;
    }
    let sandbox = d.sandbox();
    let label_ok = !sandbox.is_empty()
        && sandbox.len() <= 63
        && sandbox
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !sandbox.starts_with('-')
        && !sandbox.ends_with('-');
    if !label_ok {
        return d
            .fail(
                "InvalidSpec",
                format!("spec.targetNamespace: {sandbox:?} is not a namespace name (a DNS label: lowercase letters, digits and '-', at most 63)"),
            )
            .await;
    }
    if let Some(existing) = Api::<Namespace>::all(d.ctx.client.clone())
        .get_opt(&sandbox)
        .await?
    {
        if existing.labels().get(DRILL_LABEL) != Some(&d.uid) {
            return d
                .fail(
                    "NamespaceExists",
                    format!("spec.targetNamespace: namespace {sandbox} exists and is not this drill's sandbox"),
                )
                .await;
        }
    }
    // Held against the destination's retention until the verdict.
    if let Err(message) = hold(d, generation, true).await {
        return d.fail("GenerationNotHeld", message).await;
    }
    // The data a failover now would lose: known for the newest generation.
    let data_age = (Some(generation) == newest)
        .then_some(status.last_capture_time.as_ref())
        .flatten()
        .map(|t| (seconds_since(t) * 10.0).round() / 10.0);
    d.status(
        json!({"phase": P::Restoring.as_str(), "generation": generation,
        "targetNamespace": sandbox, "startTime": now(), "dataAgeSeconds": data_age}),
    )
    .await?;
    d.event(
        false,
        "DrillStarted",
        format!(
            "restoring generation {generation} of {} into namespace {sandbox}",
            spec.pair
        ),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// The generation's transformed manifests, planned into the sandbox as a drill.
async fn plan(d: &Drill<'_>, pair: &DRPair, generation: u64) -> Result<Vec<Vec<Value>>, String> {
    let secret_name = manifests_secret(&d.drill.spec.pair, generation);
    let secret = Api::<Secret>::namespaced(d.ctx.client.clone(), &d.namespace)
        .get_opt(&secret_name)
        .await
        .map_err(|e| format!("reading Secret {}/{secret_name}: {e}", d.namespace))?
        .ok_or_else(|| format!("Secret {}/{secret_name} is gone", d.namespace))?;
    let bytes = secret
        .data
        .and_then(|m| m.get(MANIFESTS_KEY).cloned())
        .ok_or_else(|| format!("Secret {secret_name} has no {MANIFESTS_KEY}"))?;
    let bundle = ManifestBundle::from_json_bytes(&bytes.0).map_err(|e| e.to_string())?;
    plan_instantiation(
        bundle.objects,
        &d.drill.spec.pair,
        &d.sandbox(),
        &pair.spec.transform,
        Instantiation::Drill {
            generation,
            drill: d.uid.clone(),
        },
    )
    .map_err(|e| format!("spec.transform of DRPair {}: {e}", d.drill.spec.pair))
}

/// A VolumeSnapshot `name` in the sandbox, bound to a pre-provisioned content on the same
/// snapshot handle as `name` in the pair's namespace.
async fn clone_snapshot(d: &Drill<'_>, sandbox: &str, name: &str) -> Result<(), String> {
    let client = &d.ctx.client;
    let source: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &d.namespace, &snapshot_resource());
    let vs = source
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "VolumeSnapshot {}/{name} of the generation is gone",
                d.namespace
            )
        })?;
    let content_name = vs.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .ok_or_else(|| format!("VolumeSnapshot {}/{name} is not bound", d.namespace))?;
    let contents: Api<DynamicObject> = Api::all_with(client.clone(), &content_resource());
    let content = contents
        .get(content_name)
        .await
        .map_err(|e| format!("reading VolumeSnapshotContent {content_name}: {e}"))?;
    let handle = content.data["status"]["snapshotHandle"]
        .as_str()
        .ok_or_else(|| format!("VolumeSnapshotContent {content_name} is not ready"))?;
    let uid8 = &d.uid[..d.uid.len().min(8)];
    let clone_name = format!("ferry-drill-{uid8}-{name}");
    let labels = json!({ DRILL_LABEL: d.uid });
    let mut spec = json!({
        "deletionPolicy": "Retain",
        "driver": content.data["spec"]["driver"],
        "source": {"snapshotHandle": handle},
        "volumeSnapshotRef": {"name": name, "namespace": sandbox},
    });
    for field in ["sourceVolumeMode", "volumeSnapshotClassName"] {
        if let Some(v) = content.data["spec"].get(field) {
            spec[field] = v.clone();
        }
    }
    let clone = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": {"name": clone_name, "labels": labels}, "spec": spec});
    contents
        .patch(
            &clone_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&clone),
        )
        .await
        .map_err(|e| format!("creating VolumeSnapshotContent {clone_name}: {e}"))?;
    let snapshot = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": name, "namespace": sandbox, "labels": labels},
        "spec": {"source": {"volumeSnapshotContentName": clone_name}}});
    Api::<DynamicObject>::namespaced_with(client.clone(), sandbox, &snapshot_resource())
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&snapshot),
        )
        .await
        .map_err(|e| format!("creating VolumeSnapshot {sandbox}/{name}: {e}"))?;
    Ok(())
}

/// The Deployments and StatefulSets in `sandbox`, as one wave of `{kind, metadata.name}`
/// (what [`instantiate::not_ready`] reads).
async fn sandbox_workloads(
    client: &Client,
    sandbox: &str,
) -> Result<Vec<Vec<Value>>, ReconcileError> {
    use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
    let mut wave = Vec::new();
    for d in Api::<Deployment>::namespaced(client.clone(), sandbox)
        .list(&ListParams::default())
        .await?
    {
        wave.push(json!({"kind": "Deployment", "metadata": {"name": d.name_any()}}));
    }
    for s in Api::<StatefulSet>::namespaced(client.clone(), sandbox)
        .list(&ListParams::default())
        .await?
    {
        wave.push(json!({"kind": "StatefulSet", "metadata": {"name": s.name_any()}}));
    }
    Ok(vec![wave])
}

/// Why the drill must stop because this site is (becoming) the pair's active site: a failover
/// or migration here while the drill runs would otherwise leave a second copy of the app
/// beside production.
fn became_active(d: &Drill<'_>, pair: &DRPair) -> Option<String> {
    use ferry_schemas::drpair::PairPhase;
    let status = pair.status.clone().unwrap_or_default();
    let active = status
        .active_site
        .clone()
        .unwrap_or_else(|| pair.spec.primary_site.clone());
    let moving = matches!(
        status.phase,
        Some(PairPhase::Migrating | PairPhase::FailedOver)
    );
    (active == d.ctx.site || moving).then(|| {
        format!(
            "DRPair {} is now active at (or moving to) site {active}: the drill stops and its sandbox goes",
            d.drill.spec.pair
        )
    })
}

/// Creates the sandbox namespace, labelled with the drill's uid. One that exists is used only
/// if it carries that label (this drill created it before a restart); anything else, even a
/// namespace created since the drill started, is refused, so cleanup never deletes a
/// namespace that is not the drill's.
async fn create_sandbox(d: &Drill<'_>, sandbox: &str) -> Result<(), String> {
    let namespaces: Api<Namespace> = Api::all(d.ctx.client.clone());
    let namespace: Namespace =
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": sandbox, "labels": { DRILL_LABEL: d.uid }}}))
        .map_err(|e| e.to_string())?;
    match namespaces.create(&PostParams::default(), &namespace).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let existing = namespaces.get(sandbox).await.map_err(|e| e.to_string())?;
            if existing.labels().get(DRILL_LABEL) == Some(&d.uid) {
                Ok(())
            } else {
                Err(format!(
                    "spec.targetNamespace: namespace {sandbox} exists and is not this drill's sandbox"
                ))
            }
        }
        Err(e) => Err(format!("creating namespace {sandbox}: {e}")),
    }
}

/// Restoring: sandbox, isolation, cloned snapshots, manifests; then waits for readiness.
async fn restore(d: &Drill<'_>) -> Result<Action, ReconcileError> {
    let status = d.drill.status.clone().unwrap_or_default();
    let (Some(generation), Some(started)) = (status.generation, status.start_time.clone()) else {
        return Err(ReconcileError::MissingStatus {
            field: "generation",
            phase: "Restoring",
        });
    };
    let generation = generation.0;
    let sandbox = d.sandbox();
    let pairs: Api<DRPair> = Api::namespaced(d.ctx.client.clone(), &d.namespace);
    let Some(pair) = pairs.get_opt(&d.drill.spec.pair).await? else {
        return d
            .fail(
                "PairNotFound",
                format!("DRPair {} was deleted", d.drill.spec.pair),
            )
            .await;
    };
    if let Some(why) = became_active(d, &pair) {
        return d.fail("ActiveSite", why).await;
    }
    if status.applied_time.is_none() {
        let waves = match plan(d, &pair, generation).await {
            Ok(waves) => waves,
            Err(message) => return d.fail("RestoreFailed", message).await,
        };
        if let Err(message) = create_sandbox(d, &sandbox).await {
            return d.fail("NamespaceExists", message).await;
        }
        // Isolation: nothing in, nothing out but DNS (the app's own NetworkPolicies are left
        // out of the plan, so none widens it).
        let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "ferry-drill-isolation", "namespace": sandbox, "labels": { DRILL_LABEL: d.uid }},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"],
                "egress": [{"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}});
        if let Err(e) = ferry_manifests::apply_object(&d.ctx.client, &policy, MANAGER).await {
            return d
                .fail(
                    "RestoreFailed",
                    format!(
                        "NetworkPolicy {sandbox}/ferry-drill-isolation: {}",
                        e.message
                    ),
                )
                .await;
        }
        for claim in waves
            .iter()
            .flatten()
            .filter(|o| o["kind"] == "PersistentVolumeClaim")
        {
            if let Some(name) = claim["spec"]["dataSource"]["name"].as_str() {
                if let Err(message) = clone_snapshot(d, &sandbox, name).await {
                    return d.fail("RestoreFailed", message).await;
                }
            }
        }
        if let Err(e) = instantiate::apply(&d.ctx.client, &waves).await {
            return d.fail("RestoreFailed", e.to_string()).await;
        }
        // Applied once: from here on only readiness is watched.
        d.status(json!({"appliedTime": now()})).await?;
    }
    // Readiness of what is in the sandbox now (the generation itself may be retired by the
    // replicator's retention meanwhile; the sandbox's volumes no longer need it).
    let workloads = sandbox_workloads(&d.ctx.client, &sandbox).await?;
    let waiting = instantiate::not_ready(&d.ctx.client, &sandbox, &workloads).await?;
    if !waiting.is_empty() {
        let waited = seconds_since(&started);
        if waited > READY_TIMEOUT.as_secs_f64() {
            return d
                .fail(
                    "NotReady",
                    format!(
                        "not ready after {}s: {}",
                        READY_TIMEOUT.as_secs(),
                        waiting.join(", ")
                    ),
                )
                .await;
        }
        return Ok(Action::requeue(POLL));
    }
    let rto = (seconds_since(&started) * 1000.0).round() / 1000.0;
    d.status(json!({"phase": P::Verifying.as_str(), "readyTime": now(), "rtoSeconds": rto}))
        .await?;
    d.event(
        false,
        "DrillReady",
        format!("generation {generation} ready in namespace {sandbox} after {rto:.1}s"),
    )
    .await;
    Ok(Action::requeue(Duration::ZERO))
}

/// Runs `command` in `container` of the first running pod of `sandbox`: `(success, output
/// tail)`.
async fn run_check(
    client: &Client,
    sandbox: &str,
    container: Option<&str>,
    command: &[String],
) -> Result<(bool, String), String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), sandbox);
    let mut running: Vec<Pod> = pods
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing pods in {sandbox}: {e}"))?
        .items
        .into_iter()
        .filter(|p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.metadata.deletion_timestamp.is_none()
        })
        .collect();
    running.sort_by_key(|p| p.name_any());
    let pod = running
        .first()
        .ok_or_else(|| format!("no running pod in namespace {sandbox} to verify in"))?;
    let name = pod.name_any();
    let result = ferry_runtime::exec::run(&pods, &name, container, command, OUTPUT_TAIL_CHARS)
        .await
        .map_err(|e| format!("exec in pod {sandbox}/{name}: {e}"))?;
    let output = format!("{}{}", result.stdout, result.stderr);
    let skip = output.chars().count().saturating_sub(OUTPUT_TAIL_CHARS);
    let output = output
        .chars()
        .skip(skip)
        .collect::<String>()
        .trim()
        .to_string();
    if result.success {
        Ok((true, output))
    } else {
        Ok((
            false,
            format!("{}\n{output}", result.message).trim().to_string(),
        ))
    }
}

/// The verification Job in the sandbox: created once from `spec.verify.job`; `None` while it
/// runs, then `(completed, what its conditions say)`. It gets at most [`VERIFY_TIMEOUT`]
/// (`activeDeadlineSeconds` unless the template sets one).
async fn verify_job(
    d: &Drill<'_>,
    sandbox: &str,
    spec: Value,
) -> Result<Option<(bool, String)>, String> {
    use k8s_openapi::api::batch::v1::Job;
    let jobs: Api<Job> = Api::namespaced(d.ctx.client.clone(), sandbox);
    let name = "ferry-drill-verify";
    let job = match jobs.get_opt(name).await.map_err(|e| e.to_string())? {
        Some(job) => job,
        None => {
            let mut spec = spec;
            if spec.get("activeDeadlineSeconds").is_none() {
                spec["activeDeadlineSeconds"] = json!(VERIFY_TIMEOUT.as_secs());
            }
            spec["template"]["metadata"]["labels"][DRILL_LABEL] = json!(d.uid);
            let job: Job = serde_json::from_value(json!({"apiVersion": "batch/v1", "kind": "Job",
                "metadata": {"name": name, "namespace": sandbox, "labels": { DRILL_LABEL: d.uid }},
                "spec": spec}))
            .map_err(|e| format!("spec.verify.job is not a Job spec: {e}"))?;
            jobs.create(&PostParams::default(), &job)
                .await
                .map_err(|e| format!("creating Job {sandbox}/{name} from spec.verify.job: {e}"))?
        }
    };
    let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
    let done = |kind: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == kind && c.status == "True")
            .map(|c| {
                format!(
                    "Job {name} {kind}{}",
                    c.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )
            })
    };
    Ok(match (done("Complete"), done("Failed")) {
        (Some(message), _) => Some((true, message)),
        (None, Some(message)) => Some((false, message)),
        (None, None) => None,
    })
}

/// Verifying: the command's verdict (or readiness alone).
async fn verify(d: &Drill<'_>) -> Result<Action, ReconcileError> {
    let status = d.drill.status.clone().unwrap_or_default();
    let sandbox = d.sandbox();
    let pairs: Api<DRPair> = Api::namespaced(d.ctx.client.clone(), &d.namespace);
    if let Some(pair) = pairs.get_opt(&d.drill.spec.pair).await? {
        if let Some(why) = became_active(d, &pair) {
            return d.fail("ActiveSite", why).await;
        }
    }
    if let Some(job) = d.drill.spec.verify.as_ref().and_then(|v| v.job.clone()) {
        return match verify_job(d, &sandbox, job).await {
            Ok(None) => Ok(Action::requeue(POLL)),
            Ok(Some((true, output))) => pass(d, &status, &sandbox, Some(output)).await,
            Ok(Some((false, output))) => {
                d.status(json!({"verification": output})).await?;
                d.fail("VerifyFailed", format!("spec.verify.job failed: {output}"))
                    .await
            }
            Err(message) => d.fail("VerifyFailed", message).await,
        };
    }
    let command = d
        .drill
        .spec
        .verify
        .as_ref()
        .filter(|v| !v.command.is_empty());
    let (passed, output) = match command {
        None => (true, None),
        Some(v) => match tokio::time::timeout(
            VERIFY_TIMEOUT,
            run_check(&d.ctx.client, &sandbox, v.container.as_deref(), &v.command),
        )
        .await
        {
            Ok(Ok((passed, output))) => (passed, Some(output)),
            Ok(Err(message)) => return d.fail("VerifyFailed", message).await,
            Err(_) => {
                return d
                    .fail(
                        "VerifyFailed",
                        format!(
                            "spec.verify.command did not finish within {}s",
                            VERIFY_TIMEOUT.as_secs()
                        ),
                    )
                    .await
            }
        },
    };
    if !passed {
        let message = format!(
            "spec.verify.command failed: {}",
            output.clone().unwrap_or_default()
        );
        d.status(json!({"verification": output})).await?;
        return d.fail("VerifyFailed", message).await;
    }
    pass(d, &status, &sandbox, output).await
}

/// Ends the drill as Passed, with the verification's output.
async fn pass(
    d: &Drill<'_>,
    status: &ferry_schemas::DRDrillStatus,
    sandbox: &str,
    output: Option<String>,
) -> Result<Action, ReconcileError> {
    let rto = status.rto_seconds;
    let message = format!(
        "generation {} of {} recovered in namespace {sandbox} in {:.1}s and verified",
        status.generation.map(|g| g.0).unwrap_or_default(),
        d.drill.spec.pair,
        rto.unwrap_or_default()
    );
    let condition = json!({"type": "Succeeded", "status": "True", "reason": "Verified",
        "message": message, "lastTransitionTime": now(), "observedGeneration": d.drill.metadata.generation});
    d.status(
        json!({"phase": P::Passed.as_str(), "completionTime": now(), "verification": output,
        "conditions": [condition]}),
    )
    .await?;
    d.event(false, "DrillPassed", message).await;
    release(d).await;
    d.record_on_pair("Passed", rto).await;
    Ok(Action::requeue(POLL))
}

/// Passed or Failed: cleans up once the TTL has run from the verdict.
async fn expire(d: &Drill<'_>) -> Result<Action, ReconcileError> {
    let ttl = d.ttl().unwrap_or(Duration::ZERO);
    let done = d
        .drill
        .status
        .as_ref()
        .and_then(|s| s.completion_time.clone())
        .unwrap_or_else(now);
    let left = ttl.as_secs_f64() - seconds_since(&done);
    if left > 0.0 {
        return Ok(Action::requeue(Duration::from_secs_f64(left.min(3600.0))));
    }
    if !cleanup(d).await? {
        return Ok(Action::requeue(POLL));
    }
    d.status(json!({"phase": P::CleanedUp.as_str()})).await?;
    d.event(
        false,
        "DrillCleanedUp",
        format!("namespace {} deleted", d.sandbox()),
    )
    .await;
    Ok(Action::await_change())
}

/// Labels (`hold`) or unlabels the VolumeSnapshots and manifests Secret of `generation` of the
/// drill's pair with this drill's hold ([`ferry_schemas::contract::DRILL_HOLD_PREFIX`]).
///
/// # Errors
/// A message naming the object; holding a generation with no VolumeSnapshot here is one.
async fn hold(d: &Drill<'_>, generation: u64, hold: bool) -> Result<(), String> {
    use ferry_schemas::contract::{
        DRILL_HOLD_PREFIX, GENERATION_LABEL, PAIR_LABEL as PAIR, REPLICA_ROLE, ROLE_LABEL,
    };
    let key = format!("{DRILL_HOLD_PREFIX}{}", &d.uid[..d.uid.len().min(8)]);
    let value = if hold { json!("true") } else { Value::Null };
    let patch = Patch::Merge(json!({"metadata": {"labels": { key.clone(): value }}}));
    let selector = format!(
        "{PAIR}={},{ROLE_LABEL}={REPLICA_ROLE},{GENERATION_LABEL}={generation}",
        d.drill.spec.pair
    );
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(d.ctx.client.clone(), &d.namespace, &snapshot_resource());
    let listed = snapshots
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|e| format!("listing the VolumeSnapshots of generation {generation}: {e}"))?;
    if hold && listed.items.is_empty() {
        return Err(format!(
            "generation {generation} has no VolumeSnapshot at site {}",
            d.ctx.site
        ));
    }
    for vs in &listed.items {
        snapshots
            .patch(&vs.name_any(), &PatchParams::default(), &patch)
            .await
            .map_err(|e| format!("labelling VolumeSnapshot {}: {e}", vs.name_any()))?;
    }
    let secret = manifests_secret(&d.drill.spec.pair, generation);
    match Api::<Secret>::namespaced(d.ctx.client.clone(), &d.namespace)
        .patch(&secret, &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 && !hold => Ok(()),
        Err(e) => Err(format!("labelling Secret {secret}: {e}")),
    }
}

/// Releases the drill's hold on its generation; a failure is logged (the label only keeps a
/// generation longer).
async fn release(d: &Drill<'_>) {
    let generation = d
        .drill
        .status
        .as_ref()
        .and_then(|s| s.generation)
        .map(|g| g.0);
    if let Some(generation) = generation {
        if let Err(e) = hold(d, generation, false).await {
            tracing::warn!(drill = %d.drill.name_any(), error = %e, "releasing the drill's hold");
        }
    }
}

/// Deletes the sandbox namespace (only if it is this drill's), then, once it is gone, the
/// drill's VolumeSnapshotContents. `true` when nothing of the drill remains.
async fn cleanup(d: &Drill<'_>) -> Result<bool, ReconcileError> {
    release(d).await;
    let namespaces: Api<Namespace> = Api::all(d.ctx.client.clone());
    let sandbox = d.sandbox();
    if let Some(ns) = namespaces.get_opt(&sandbox).await? {
        if ns.labels().get(DRILL_LABEL) == Some(&d.uid) {
            // Never a namespace that holds a pair: that would be a copy, not a sandbox.
            let pairs: Api<DRPair> = Api::namespaced(d.ctx.client.clone(), &sandbox);
            if !pairs
                .list(&ListParams::default().limit(1))
                .await?
                .items
                .is_empty()
            {
                tracing::warn!(namespace = %sandbox, "a DRPair lives in the drill's namespace; not deleting it");
            } else {
                if ns.metadata.deletion_timestamp.is_none() {
                    namespaces
                        .delete(&sandbox, &DeleteParams::default())
                        .await?;
                }
                return Ok(false);
            }
        }
    }
    let contents: Api<DynamicObject> = Api::all_with(d.ctx.client.clone(), &content_resource());
    let selector = format!("{DRILL_LABEL}={}", d.uid);
    let left = contents
        .list(&ListParams::default().labels(&selector))
        .await?;
    for content in &left.items {
        match contents
            .delete(&content.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(left.items.is_empty())
}

/// Scheduled drills kept per pair (older ones are deleted, their sandboxes with them).
pub const SCHEDULED_KEPT: usize = 5;
/// Label on scheduled drills: the pair they test.
pub const PAIR_LABEL: &str = ferry_schemas::contract::PAIR_LABEL;
/// Label on scheduled drills: `"true"`.
pub const SCHEDULED_LABEL: &str = "ferry.dev/scheduled";

/// Runs the drill schedule (`spec.drill` of each DRPair) at this site until the stream ends:
/// at the pair's DR site, a DRDrill every `every` (never two at once), the newest
/// [`SCHEDULED_KEPT`] kept, and the `DrillOverdue` condition on the DRPair.
pub async fn run_schedule(ctx: Arc<Context>) {
    let pairs: Api<DRPair> = Api::all(ctx.client.clone());
    Controller::new(pairs, watcher::Config::default())
        .run(schedule, schedule_error, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::warn!(error = %e, "drill schedule");
            }
        })
        .await;
}

fn schedule_error(_p: Arc<DRPair>, error: &ReconcileError, _ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, "drill schedule step failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn time_of(t: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time) -> f64 {
    t.0.as_millisecond() as f64 / 1000.0
}

async fn schedule(pair: Arc<DRPair>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    use ferry_schemas::conditions::{
        ConditionStatus as S, PairConditionReason as R, PairConditionType as T,
    };
    let Some(plan) = pair.spec.drill.clone() else {
        return Ok(Action::await_change());
    };
    let status = pair.status.clone().unwrap_or_default();
    let active = status
        .active_site
        .clone()
        .unwrap_or_else(|| pair.spec.primary_site.clone());
    // Drills run where the copy is; a pair being deleted or moved is left alone.
    if active == ctx.site || pair.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Ok(valid) = pair.spec.validate(None) else {
        return Ok(Action::await_change());
    };
    let Some(every) = valid.drill_every else {
        return Ok(Action::await_change());
    };
    let namespace = pair.namespace().unwrap_or_default();
    let name = pair.name_any();
    let drills: Api<DRDrill> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut all: Vec<DRDrill> = drills
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|d| d.spec.pair == name)
        .collect();
    all.sort_by(|a, b| {
        let t = |d: &DRDrill| d.metadata.creation_timestamp.as_ref().map(time_of);
        t(a).partial_cmp(&t(b)).unwrap_or(std::cmp::Ordering::Equal)
    });
    let scheduled: Vec<&DRDrill> = all
        .iter()
        .filter(|d| d.labels().get(SCHEDULED_LABEL).map(String::as_str) == Some("true"))
        .collect();
    let now_s = Timestamp::now().as_millisecond() as f64 / 1000.0;
    let every_s = every.as_secs_f64();

    // Due when the newest scheduled drill started `every` ago and none is still running.
    let newest = scheduled
        .last()
        .and_then(|d| d.metadata.creation_timestamp.as_ref().map(time_of));
    let running = scheduled.iter().any(|d| {
        !matches!(
            d.status.as_ref().and_then(|s| s.phase),
            Some(P::Passed | P::Failed | P::CleanedUp)
        )
    });
    let due_in = newest.map_or(0.0, |t| t + every_s - now_s);
    if due_in <= 0.0 && !running {
        let drill_name = format!("{name}-{}", now_s as u64);
        let drill = json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRDrill",
            "metadata": {"name": drill_name, "namespace": namespace,
                "labels": {PAIR_LABEL: name, SCHEDULED_LABEL: "true"}},
            "spec": {"pair": name, "ttl": plan.ttl, "verify": plan.verify}});
        let drill: DRDrill = serde_json::from_value(drill)
            .map_err(|e| ReconcileError::Kube(kube::Error::SerdeError(e)))?;
        match drills.create(&PostParams::default(), &drill).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(e.into()),
        }
        tracing::info!(pair = %name, drill = %drill_name, "scheduled drill created");
    }
    // History: the newest few scheduled drills stay.
    if scheduled.len() > SCHEDULED_KEPT {
        for old in &scheduled[..scheduled.len() - SCHEDULED_KEPT] {
            let terminal = matches!(
                old.status.as_ref().and_then(|s| s.phase),
                Some(P::Passed | P::Failed | P::CleanedUp)
            );
            if terminal {
                match drills
                    .delete(&old.name_any(), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    // Overdue: no pass within `every` plus the smaller of `every` and a day, counted from the
    // last pass, or from the first scheduled drill when none passed yet.
    let margin = every_s.min(86_400.0);
    let last_pass = all
        .iter()
        .filter(|d| {
            matches!(d.status.as_ref().and_then(|s| s.phase), Some(P::Passed))
                || (d.status.as_ref().and_then(|s| s.phase) == Some(P::CleanedUp)
                    && d.status.as_ref().is_some_and(|s| {
                        s.conditions
                            .iter()
                            .any(|c| c.type_ == "Succeeded" && c.status == "True")
                    }))
        })
        .filter_map(|d| d.status.as_ref()?.completion_time.as_ref().map(time_of))
        .fold(None, |acc: Option<f64>, t| {
            Some(acc.map_or(t, |a| a.max(t)))
        });
    let since = last_pass.or_else(|| {
        scheduled
            .first()
            .and_then(|d| d.metadata.creation_timestamp.as_ref().map(time_of))
    });
    let condition = match (since, last_pass) {
        (Some(t), _) if now_s - t > every_s + margin => Some((
            T::DrillOverdue,
            S::True,
            R::NoRecentDrill,
            match last_pass {
                Some(t) => format!(
                    "the last drill of {name} that passed here finished {:.0}s ago; spec.drill.every is {}",
                    now_s - t,
                    plan.every
                ),
                None => format!(
                    "no drill of {name} has passed here since the first scheduled one {:.0}s ago; spec.drill.every is {}",
                    now_s - t,
                    plan.every
                ),
            },
        )),
        (_, Some(t)) => Some((
            T::DrillOverdue,
            S::False,
            R::DrillPassedRecently,
            format!("a drill of {name} passed here {:.0}s ago", now_s - t),
        )),
        _ => None,
    };
    if let Some(condition) = condition {
        let writer = ferry_runtime::PairStatus::new(
            ctx.client.clone(),
            &ctx.site,
            ferry_runtime::Component::Controller,
        );
        writer
            .apply(&namespace, &name, json!({}), &[condition])
            .await?;
    }
    // Look again when the next drill is due, or soon while one runs or the verdict may change.
    let next = if running || due_in <= 0.0 {
        5.0
    } else {
        due_in.clamp(1.0, 3600.0)
    };
    Ok(Action::requeue(Duration::from_secs_f64(
        next.min(margin.max(5.0)),
    )))
}
