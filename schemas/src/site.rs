//! `Site`: one Kubernetes cluster taking part in replication, and how to reach its replicator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Schema pattern of `spec.replicatorEndpoint`: `host:port`, where host is a DNS
/// name, an IPv4 address or a bracketed IPv6 address. The port range
/// (1 to 65535) is checked by [`SiteSpec::validate`].
pub const ENDPOINT_PATTERN: &str =
    r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):[0-9]{1,5}$";

/// How to reach one cluster taking part in replication. Generates the
/// cluster-scoped `Site` kind; the object's name is the site's name, which
/// DRPair primarySite and secondarySite refer to. Every site holds a Site for
/// itself and for each peer.
// kube's printcolumn(...) lists repeat `type_ = "string"`, which clippy misreads as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ferry.dev",
    version = "v1alpha1",
    kind = "Site",
    status = "SiteStatus",
    derive = "PartialEq",
    doc = "A Kubernetes cluster taking part in Ferry replication and how to reach its replicator.",
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".spec.replicatorEndpoint"
    ),
    printcolumn(name = "Reachable", type_ = "boolean", json_path = ".status.reachable"),
    printcolumn(name = "Last-Seen", type_ = "date", json_path = ".status.lastSeenTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// `host:port` of the site's replicator gRPC endpoint (mutual TLS).
    #[schemars(regex(pattern = ENDPOINT_PATTERN))]
    pub replicator_endpoint: String,
    /// Secret (keys `tls.crt`, `tls.key`, `ca.crt`) holding this cluster's
    /// client certificate for the site's replicator and the CA that signed it.
    pub tls_secret_ref: SecretRef,
    /// Secret (key `kubeconfig`) giving API access to the site, needed only
    /// where the failover controller instantiates applications remotely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_secret_ref: Option<SecretRef>,
}

/// Reference to a Secret by name and namespace (sites are cluster-scoped, so
/// the namespace cannot be implied).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Secret namespace.
    #[schemars(length(min = 1))]
    pub namespace: String,
}

/// Observed state of a Site, written by the local failover controller.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// Whether the site's replicator answered the last health check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable: Option<bool>,
    /// When the site's replicator last answered (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_time: Option<Time>,
    /// `metadata.generation` of the spec this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions keyed by type: Reachable, CredentialsValid.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
