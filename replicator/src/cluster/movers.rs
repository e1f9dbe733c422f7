//! Mover pods: a pod per volume job that mounts one PVC and dials this replicator.
//!
//! This is how a cluster lets the replicator read or write a volume: as VolSync does, the
//! replicator never mounts anything itself; it starts a short-lived pod with the PVC mounted
//! (`volumeMounts` for Filesystem, `volumeDevices` for Block) running `ferry-replicator mover`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::destination::ReplicaError;
use ferry_schemas::contract::{MOVER_ROLE_LABEL, PAIR_LABEL};

use crate::mover::{MoverHub, MoverSession};

/// How long a mover pod may take to start and dial in, in seconds.
pub const MOVER_START_TIMEOUT: Duration = Duration::from_secs(120);
/// Where a mover sees a Filesystem volume (`volumeMounts.mountPath`).
pub const MOVER_ROOT: &str = "/data";
/// Where a mover sees a Block volume (`volumeDevices.devicePath`).
pub const MOVER_DEVICE: &str = "/dev/ferry-volume";

/// Starts mover pods for this replicator.
#[derive(Clone)]
pub struct MoverPods {
    client: Client,
    hub: MoverHub,
    image: String,
    attach: String,
}

impl MoverPods {
    /// Movers running `image`, dialling back to `attach` (this replicator's mover address, e.g.
    /// `http://10.0.0.5:7444`), handed over through `hub`.
    pub fn new(client: Client, hub: MoverHub, image: String, attach: String) -> Self {
        Self {
            client,
            hub,
            image,
            attach,
        }
    }

    /// Starts a mover on PVC `claim` in `namespace` for `pair` in `role` and waits until it
    /// dials in.
    ///
    /// # Errors
    /// [`ReplicaError::Kube`] when the pod cannot be created; [`ReplicaError::Timeout`] (naming
    /// the pod and its phase) when it does not dial in within [`MOVER_START_TIMEOUT`].
    pub async fn start(
        &self,
        namespace: &str,
        pair: &str,
        role: &str,
        claim: &str,
        block: bool,
        read_only: bool,
    ) -> Result<MoverSession, ReplicaError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("ferry-mover-{}", &token[..12]);
        let waiting = self.hub.expect(&token);
        let mut container = json!({
            "name": "mover",
            "image": self.image,
            "args": ["mover"],
            "env": [
                {"name": "FERRY_MOVER_ATTACH", "value": self.attach},
                {"name": "FERRY_MOVER_TOKEN", "value": token},
                {"name": "FERRY_MOVER_ROOT", "value": if block { MOVER_DEVICE } else { MOVER_ROOT }},
            ],
            // Applying a file tree sets ownership, which needs root in the pod.
            "securityContext": {"runAsUser": 0},
        });
        if block {
            container["volumeDevices"] = json!([{"name": "data", "devicePath": MOVER_DEVICE}]);
        } else {
            container["volumeMounts"] =
                json!([{"name": "data", "mountPath": MOVER_ROOT, "readOnly": read_only}]);
        }
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    "app.kubernetes.io/name": "ferry-mover",
                    "app.kubernetes.io/managed-by": "ferry-replicator",
                    PAIR_LABEL: pair,
                    MOVER_ROLE_LABEL: role,
                },
            },
            "spec": {
                "restartPolicy": "Never",
                "containers": [container],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}],
            },
        }))
        .map_err(|e| ReplicaError::Kube(format!("building mover pod {name}: {e}")))?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        if let Err(e) = pods.create(&PostParams::default(), &pod).await {
            self.hub.forget(&token);
            return Err(ReplicaError::Kube(format!(
                "creating mover pod {namespace}/{name} for PVC {claim}: {e}"
            )));
        }
        match tokio::time::timeout(MOVER_START_TIMEOUT, waiting).await {
            Ok(Ok(session)) => Ok(session),
            _ => {
                self.hub.forget(&token);
                let phase = pods
                    .get_opt(&name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|p| p.status)
                    .and_then(|s| s.phase)
                    .unwrap_or_else(|| "gone".into());
                let _ = pods.delete(&name, &DeleteParams::default()).await;
                Err(ReplicaError::Timeout(format!(
                    "waiting {}s for mover pod {namespace}/{name} (PVC {claim}, phase {phase}) to dial in",
                    MOVER_START_TIMEOUT.as_secs()
                )))
            }
        }
    }

    /// Deletes the mover pods of `pair` in `role`. Their sessions must be finished or dropped.
    ///
    /// # Errors
    /// [`ReplicaError::Kube`] when the API refuses.
    pub async fn stop(&self, namespace: &str, pair: &str, role: &str) -> Result<(), ReplicaError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let selector = format!("{PAIR_LABEL}={pair},{MOVER_ROLE_LABEL}={role}");
        pods.delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&selector),
        )
        .await
        .map(|_| ())
        .map_err(|e| {
            ReplicaError::Kube(format!(
                "deleting mover pods {selector} in {namespace}: {e}"
            ))
        })
    }
}

impl std::fmt::Debug for MoverPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoverPods").finish_non_exhaustive()
    }
}
