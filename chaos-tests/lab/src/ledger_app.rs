//! The lab's protected workload, shared by the end-to-end tests and the chaos runs: the SQLite
//! ledger writer (a Deployment with a PVC) in namespace [`NAMESPACE`] at site `a`, and a
//! DRPair [`PAIR`] over it from `a` to `b` with `rpo: 30s`.

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_schemas::DRPair;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use crate::node::storage::bound_volume;
use crate::wait::until;

/// The app's namespace.
pub const NAMESPACE: &str = "shop";
/// The DRPair's (and the Deployment's) name.
pub const PAIR: &str = "ledger";

/// How the ledger app is protected.
#[derive(Clone, Copy, Debug)]
pub struct Protection {
    /// `ferry-lab up --lease`.
    pub lease: &'static str,
    /// `spec.failover.mode: Automatic` with `siteLossTimeout` [`Protection::SITE_LOSS_TIMEOUT_SECONDS`],
    /// else Manual (the default).
    pub automatic: bool,
    /// The app's pods carry the `ferry-gate` init container and the `ferry-fence` sidecar.
    pub gated: bool,
}

impl Protection {
    /// For planned migrations: the defaults.
    pub const PLANNED: Protection = Protection {
        lease: "10s",
        automatic: false,
        gated: false,
    };
    /// For failovers: an 8 s lease (it must outlast a witness leader election, about 2 s
    /// here), automatic failover after 10 s, gated pods.
    pub const AUTOMATIC: Protection = Protection {
        lease: "8s",
        automatic: true,
        gated: true,
    };
    /// For manual failovers: as [`Protection::AUTOMATIC`], with `mode: Manual`.
    pub const MANUAL: Protection = Protection {
        lease: "8s",
        automatic: false,
        gated: true,
    };
    /// The pair's `spec.failover.siteLossTimeout` when automatic, seconds.
    pub const SITE_LOSS_TIMEOUT_SECONDS: u64 = 10;
}

/// The app's objects: Namespace, PVC `ledger-data` (32 Mi), Deployment `ledger` (1 replica,
/// a commit every 20 ms) and the DRPair; gated, also the Role and RoleBinding the gate needs.
pub fn objects(protection: &Protection) -> Vec<Value> {
    let mut pod = json!({"containers": [{"name": "w", "image": "ferry-lab/sqlite-writer",
        "env": [{"name": "DATA_DIR", "value": "/data"}, {"name": "WRITE_INTERVAL_MS", "value": "20"}],
        "volumeMounts": [{"name": "d", "mountPath": "/data"}]}],
        "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "ledger-data"}}]});
    if protection.gated {
        // The gate holds the pod until this site holds the lease; the fence sidecar deletes
        // the pod once the lease ends, even with the site's controller gone.
        let env = json!([
            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ]);
        pod["initContainers"] = json!([
            {"name": "ferry-gate", "image": "ghcr.io/ferry-dr/ferry-gate:0.1.0",
             "args": ["--pair", PAIR], "env": env},
            {"name": "ferry-fence", "image": "ghcr.io/ferry-dr/ferry-gate:0.1.0",
             "args": ["--pair", PAIR, "--watch"], "restartPolicy": "Always", "env": env},
        ]);
    }
    let mut spec = json!({"selector": {"matchLabels": {"app": PAIR}}, "primarySite": "a", "secondarySite": "b", "rpo": "30s"});
    if protection.automatic {
        spec["failover"] = json!({"mode": "Automatic", "siteLossTimeout": format!("{}s", Protection::SITE_LOSS_TIMEOUT_SECONDS)});
    }
    let mut objects = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "ledger-data", "namespace": NAMESPACE}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "32Mi"}}}}),
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": PAIR, "namespace": NAMESPACE, "labels": {"app": PAIR}}, "spec": {
            "replicas": 1, "selector": {"matchLabels": {"app": PAIR}},
            "template": {"metadata": {"labels": {"app": PAIR}}, "spec": pod}}}),
        json!({"apiVersion": "ferry.dev/v1alpha1", "kind": "DRPair", "metadata": {"name": PAIR, "namespace": NAMESPACE}, "spec": spec}),
    ];
    if protection.gated {
        // What the gate does under the pod's ServiceAccount (docs/failover.md): read the
        // pair's site-local Lease, and delete its own pod when the lease ends. Enforced on a
        // real control plane. Labelled with the pair's selector, so that they are captured
        // and replicated with the app: the gate at the DR site needs them too.
        objects.insert(1, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "ferry-gate", "namespace": NAMESPACE, "labels": {"app": PAIR}},
            "rules": [
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"]},
                {"apiGroups": ["ferry.dev"], "resources": ["drpairs"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["delete"]},
            ]}));
        objects.insert(2, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "ferry-gate", "namespace": NAMESPACE, "labels": {"app": PAIR}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ferry-gate"},
            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": NAMESPACE}]}));
    }
    objects
}

/// Applies the app at site `a` (server-side apply), then waits until it writes there (gated
/// pods start once `a` holds the lease) and one generation holding some of its transactions
/// is committed at the peer.
///
/// # Errors
/// When an object is refused, or the app or the generation does not come within `timeout`.
pub async fn deploy(a: &Client, protection: &Protection, timeout: Duration) -> Result<()> {
    for object in objects(protection) {
        ferry_manifests::apply_object(a, &object, "ferry-lab")
            .await
            .with_context(|| format!("applying {}", object["kind"]))?;
    }
    until("the ledger writing at a", timeout, || async {
        match bound_volume(a, NAMESPACE, "ledger-data").await {
            Ok(Some(v)) => ferry_sqlite_writer::ledger::open_existing(&v.path)
                .ok()
                .and_then(|c| ferry_sqlite_writer::ledger::tip(&c).ok().flatten())
                .map(|_| ())
                .ok_or_else(|| "no transaction yet".to_string()),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    sync_now(a, "deployed", timeout).await
}

/// Asks the replicator of site `client` for a sync now (annotation `ferry.dev/sync-request:
/// token`) and waits until the generation it started is committed at the peer.
///
/// # Errors
/// When the annotation cannot be set or the generation is not committed within `timeout`.
pub async fn sync_now(client: &Client, token: &str, timeout: Duration) -> Result<()> {
    let pairs: Api<DRPair> = Api::namespaced(client.clone(), NAMESPACE);
    let patch = json!({"metadata": {"annotations": {ferry_schemas::contract::SYNC_REQUEST_ANNOTATION: token}}});
    pairs
        .patch(PAIR, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .context("requesting a sync")?;
    until("the requested generation committed", timeout, || async {
        let p = pairs.get(PAIR).await.map_err(|e| e.to_string())?;
        let s = p.status.unwrap_or_default();
        match (s.last_sync_request.as_deref(), s.generation) {
            (Some(t), Some(_)) if t == token => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// A committed generation's copy of `ledger-data` at a destination: the replica
/// VolumeSnapshot's content on the lab node, and the digest the destination verified it
/// against (annotation `ferry.dev/volume-digest`).
#[derive(Debug, Clone)]
pub struct ReplicaCopy {
    /// The snapshot content's directory (its `snapshotHandle`).
    pub path: std::path::PathBuf,
    /// The verified volume digest, hex; `None` on a seed, which carries none.
    pub digest: Option<String>,
}

/// The replica copy of generation `generation` at site `client`.
///
/// # Errors
/// When the snapshot or its content is missing or not ready.
pub async fn replica_copy(client: &Client, generation: u64) -> Result<ReplicaCopy> {
    use ferry_schemas::contract::{generation_snapshot, DIGEST_ANNOTATION};
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let gvk = |kind| GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", kind);
    let name = generation_snapshot(PAIR, "ledger-data", generation);
    let snapshot = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::from_gvk(&gvk("VolumeSnapshot")),
    )
    .get(&name)
    .await
    .with_context(|| format!("reading VolumeSnapshot {NAMESPACE}/{name}"))?;
    let content_name = snapshot.data["status"]["boundVolumeSnapshotContentName"]
        .as_str()
        .with_context(|| format!("VolumeSnapshot {name} is not bound"))?
        .to_string();
    let content = Api::<DynamicObject>::all_with(
        client.clone(),
        &ApiResource::from_gvk(&gvk("VolumeSnapshotContent")),
    )
    .get(&content_name)
    .await
    .with_context(|| format!("reading VolumeSnapshotContent {content_name}"))?;
    let path = content.data["status"]["snapshotHandle"]
        .as_str()
        .with_context(|| format!("VolumeSnapshotContent {content_name} has no snapshotHandle"))?;
    Ok(ReplicaCopy {
        path: path.into(),
        digest: snapshot
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DIGEST_ANNOTATION))
            .cloned(),
    })
}
