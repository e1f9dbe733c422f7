//! The lab node of one site: what a kubelet, a CSI driver and the snapshot controller do on
//! a real cluster, acting on the site's API server through kube-rs like they would.
//!
//! - [`storage`]: provisions and binds PersistentVolumes for PVCs of the lab StorageClass
//!   (directories for `Filesystem`, sparse image files for `Block`), fills volumes from a
//!   VolumeSnapshot `dataSource`, and reclaims them.
//! - [`snapshots`]: fulfils VolumeSnapshots with point-in-time copies (reflink where the
//!   filesystem supports it), creating the VolumeSnapshotContent and the status a CSI driver
//!   plus external-snapshotter would.
//! - [`snapshot_metadata`]: the driver's SnapshotMetadata service (KEP-3314 changed block
//!   tracking), answering from the snapshot files' shared extents.
//! - [`kubelet`]: runs pods whose image is in the [`catalog`] as local processes, and
//!   [`workloads`] turns Deployments, StatefulSets and Jobs into pods.
//!
//! The pieces share a [`NodeContext`]: the site's client and paths, the [`timeline`] of pod
//! starts and stops, and the [`volumes::VolumeUsers`] registry that lets a snapshot freeze
//! the processes writing to a volume for the instant of the copy, as `fsfreeze` does.

pub mod backing;
pub mod catalog;
pub mod kubelet;
pub mod probes;
pub mod projected;
pub mod registration;
pub mod snapshot_metadata;
pub mod snapshots;
pub mod storage;
pub mod timeline;
pub mod volumes;
pub mod workloads;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use kube::Client;

use crate::control_plane::ControlPlane;

/// Name of the StorageClass (and VolumeSnapshotClass) the lab node serves.
pub const STORAGE_CLASS: &str = "ferry-lab";
/// The CSI driver name the lab's volumes and snapshots carry.
pub const CSI_DRIVER: &str = "hostpath.lab.ferry.dev";

/// Everything the node's controllers share.
pub struct NodeContext {
    /// Site name, e.g. `a`.
    pub site: String,
    /// The node's name in Pod `spec.nodeName`: `lab-<site>`.
    pub node_name: String,
    /// Client for the site's API server.
    pub client: Client,
    /// Root of the node's storage: `DIR/<site>/node`.
    pub root: PathBuf,
    /// The site's loopback address; pods listen on it (Pod `status.podIP`).
    pub ip: IpAddr,
    /// The API server's address, which pods get as `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT` on a real control plane.
    pub api: SocketAddr,
    /// Kubeconfig pods get in `KUBECONFIG`.
    pub kubeconfig: PathBuf,
    /// Where pod starts and stops are recorded.
    pub timeline: timeline::Timeline,
    /// Which processes use which volume.
    pub volume_users: volumes::VolumeUsers,
    /// Images the kubelet can run.
    pub catalog: catalog::Catalog,
    /// Pods the kubelet is running.
    pub running: kubelet::Running,
    /// Which control plane the node serves. On [`ControlPlane::Kubernetes`] the node joins
    /// as a node does (registration and heartbeats), runs only the pods the scheduler binds
    /// to it, and leaves workloads, binding and garbage collection to the real controllers.
    pub control_plane: ControlPlane,
}

impl NodeContext {
    /// Directory holding volumes: `<root>/volumes`.
    pub fn volumes_dir(&self) -> PathBuf {
        self.root.join("volumes")
    }

    /// Directory holding snapshot copies: `<root>/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Directory for pods' emptyDir, configMap and secret volumes: `<root>/pods`.
    pub fn pods_dir(&self) -> PathBuf {
        self.root.join("pods")
    }
}

/// Starts every node controller on the current tokio runtime. Each logs and retries its own
/// errors; they run until aborted through the returned handles.
/// On a real control plane the workload controllers are the controller manager's, and the
/// node registers itself and keeps its Lease renewed instead.
pub fn spawn_all(ctx: Arc<NodeContext>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = vec![
        tokio::spawn(storage::run(ctx.clone())),
        tokio::spawn(snapshots::run(ctx.clone())),
        tokio::spawn(snapshot_metadata::run(ctx.clone())),
    ];
    match ctx.control_plane {
        ControlPlane::Lab => tasks.push(tokio::spawn(workloads::run(ctx.clone()))),
        ControlPlane::Kubernetes => tasks.push(tokio::spawn(registration::run(ctx.clone()))),
    }
    tasks.push(tokio::spawn(kubelet::run(ctx)));
    tasks
}
