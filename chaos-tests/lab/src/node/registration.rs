//! Joining a real control plane as a node, as the kubelet does: registers the Node
//! (capacity, allocatable, conditions, addresses, `daemonEndpoints`, `nodeInfo`), then keeps
//! it alive by renewing its Lease in `kube-node-lease` every 10 s (`leaseDurationSeconds:
//! 40`) and re-posting its status every minute with a fresh `lastHeartbeatTime`.
//!
//! Follows the Kubernetes docs "Nodes" (self-registration, heartbeats: "Node leases") and
//! KEP-589 (efficient node heartbeats). Without these, the node-lifecycle controller marks
//! the node `Ready=Unknown` after `--node-monitor-grace-period` (50 s) and taints it
//! unreachable, and the scheduler binds nothing to it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tracing::warn;

use super::NodeContext;

/// How often the node renews its Lease (the kubelet's default: a quarter of 40 s).
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// `leaseDurationSeconds` of the node's Lease, the kubelet's default.
pub const LEASE_SECONDS: i32 = 40;
/// How often the node re-posts its status (the kubelet's `nodeStatusReportFrequency` is 5
/// minutes when nothing changes; once a minute keeps `kubectl get nodes` fresh).
const STATUS_EVERY: u32 = 6;
/// The namespace of node Leases.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";
/// The port the node reports in `daemonEndpoints.kubeletEndpoint` (the kubelet's default).
pub const KUBELET_PORT: i32 = 10250;
/// Field manager of the node's writes.
const MANAGER: &str = "ferry-lab-kubelet";

/// Registers the node and heartbeats until aborted; errors are logged and retried at the
/// next beat (a control plane that is briefly away is normal during a site restart).
pub async fn run(ctx: Arc<NodeContext>) {
    let mut beat: u32 = 0;
    let mut registered = false;
    let mut ticker = tokio::time::interval(LEASE_RENEW);
    loop {
        ticker.tick().await;
        if !registered || beat % STATUS_EVERY == 0 {
            match register(&ctx).await {
                Ok(()) => registered = true,
                Err(e) => warn!(site = %ctx.site, error = %e, "registering the node; retrying"),
            }
        }
        if let Err(e) = renew_lease(&ctx).await {
            warn!(site = %ctx.site, error = %e, "renewing the node lease; retrying");
        }
        beat = beat.wrapping_add(1);
    }
}

/// The node's labels, as a kubelet sets them on registration.
fn labels(ctx: &NodeContext) -> serde_json::Value {
    json!({
        "kubernetes.io/hostname": ctx.node_name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
        "ferry.dev/lab-site": ctx.site,
    })
}

/// Creates the Node if absent, then posts its status through the status subresource.
///
/// # Errors
/// The API error of the create (other than AlreadyExists) or of the status write.
pub async fn register(ctx: &NodeContext) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": ctx.node_name, "labels": labels(ctx)},
    }))
    .map_err(kube::Error::SerdeError)?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => tracing::info!(site = %ctx.site, node = %ctx.node_name, "node registered"),
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(e) => return Err(e),
    }
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    // Generous capacity: the lab node runs processes, and a real scheduler must never hold
    // a pod back for resources the machine does not really partition.
    let capacity =
        json!({"cpu": "64", "memory": "256Gi", "pods": "250", "ephemeral-storage": "1Ti"});
    let status = json!({"status": {
        "capacity": capacity,
        "allocatable": capacity,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "ferry-lab node is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": ctx.ip.to_string()},
            {"type": "Hostname", "address": ctx.node_name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": KUBELET_PORT}},
        "nodeInfo": {
            "machineID": "", "systemUUID": "", "bootID": "",
            "kernelVersion": "", "osImage": "ferry-lab",
            "containerRuntimeVersion": "ferry-lab://process",
            "kubeletVersion": "v1.32.13", "kubeProxyVersion": "",
            "operatingSystem": "linux", "architecture": labels(ctx)["kubernetes.io/arch"],
        },
    }});
    nodes
        .patch_status(
            &ctx.node_name,
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    Ok(())
}

/// Renews (or creates) the node's Lease `kube-node-lease/<node>`, owned by the Node so
/// that it goes with it.
///
/// # Errors
/// The API error of the write.
pub async fn renew_lease(ctx: &NodeContext) -> Result<(), kube::Error> {
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), NODE_LEASE_NAMESPACE);
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let node_uid = Api::<Node>::all(ctx.client.clone())
        .get_opt(&ctx.node_name)
        .await?
        .and_then(|n| n.metadata.uid);
    let mut lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": ctx.node_name, "namespace": NODE_LEASE_NAMESPACE},
        "spec": {"holderIdentity": ctx.node_name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now},
    });
    if let Some(uid) = node_uid {
        lease["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "v1", "kind": "Node", "name": ctx.node_name, "uid": uid,
        }]);
    }
    leases
        .patch(
            &ctx.node_name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await?;
    Ok(())
}
