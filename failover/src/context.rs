//! What every reconcile of the controller shares: the site it runs at ([`Context`]) and how
//! a step fails ([`ReconcileError`], each variant carrying its source).

use kube::Client;

use crate::instantiate::InstantiateError;
use crate::peer::PeerError;

/// Shared state of the controller.
pub struct Context {
    /// This site's name.
    pub site: String,
    /// This site's API client.
    pub client: Client,
    /// The witness quorum, when this site uses one (`--witness`): planned migrations and
    /// failovers then go through it, and bump the epoch there first.
    pub quorum: Option<crate::quorum::Quorum>,
}

/// Why a reconcile step failed. All are transient: the step is retried with back-off (a
/// migration that cannot go on is ended as `Failed` by the step itself, with its reason).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A Kubernetes API call at this site failed.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The peer site's API could not be reached through its `Site` kubeconfig.
    #[error("reaching the peer site: {0}")]
    Peer(#[from] PeerError),
    /// Standing the app up from a generation failed (manifests, transform or an apply).
    #[error("{0}")]
    Instantiate(#[from] InstantiateError),
    /// Listing the app's objects (its PVCs, for a seed) failed.
    #[error("listing the app's PVCs: {0}")]
    Capture(#[from] ferry_manifests::CaptureError),
    /// Snapshotting a PVC as the seed of a generation failed.
    #[error("seeding {claim}: {source}")]
    Seed {
        /// The PVC.
        claim: String,
        /// What the snapshot operation reported.
        #[source]
        source: ferry_runtime::volumes::VolumeError,
    },
    /// The witness quorum refused or did not answer.
    #[error("witness quorum: {}", .0.message())]
    Quorum(#[from] tonic::Status),
    /// A status field this phase needs was not recorded by an earlier phase.
    #[error("status.{field} missing in phase {phase}")]
    MissingStatus {
        /// The field, e.g. `epoch`.
        field: &'static str,
        /// The phase, e.g. `Promoting`.
        phase: &'static str,
    },
}
