//! The site-local mirror of a pair's witness lease: a `coordination.k8s.io/v1` Lease named
//! [`lease_name`] in the app's namespace, which the site agent writes after every successful
//! renewal and deletes when it fences or demotes the site.
//!
//! The Lease says until when this site may run the app: annotation [`RUN_UNTIL_ANNOTATION`]
//! holds the instant the agent fences itself (the renewal's send time + lease − fence lead,
//! see [`crate::quorum`]). The app's pods carry the `ferry-gate` init container
//! ([`crate::gate`]), which lets a pod start only before that instant, so pods the kubelet
//! restarts on their own (a site coming back after a power cut, a node reboot) wait until
//! this site holds the lease again, and never start where the quorum moved the pair away.
//! `spec.holderIdentity`, `spec.renewTime` and `spec.leaseDurationSeconds` are set as the
//! Lease API documents them, for people and tools reading it.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

/// Annotation on the Lease: RFC 3339 instant (microseconds) until which this site may run
/// the app.
pub const RUN_UNTIL_ANNOTATION: &str = "ferry.dev/run-until";
/// Annotation on the Lease: the epoch the lease was granted at.
pub const EPOCH_ANNOTATION: &str = "ferry.dev/epoch";
/// Field manager of the Lease.
const MANAGER: &str = ferry_runtime::Component::Controller.manager();

/// The Lease of pair `pair` (the DRPair's name), in the pair's namespace.
pub fn lease_name(pair: &str) -> String {
    format!("ferry-lease-{pair}")
}

fn rfc3339_micros(t: SystemTime) -> String {
    Timestamp::try_from(t)
        .map(|ts| {
            ts.round(k8s_openapi::jiff::Unit::Microsecond)
                .unwrap_or(ts)
                .to_string()
        })
        .unwrap_or_default()
}

/// A lease this site holds on a pair.
#[derive(Clone, Copy, Debug)]
pub struct Held<'a> {
    /// This site.
    pub site: &'a str,
    /// The epoch it was granted at.
    pub epoch: u64,
    /// When the renewal that granted it was sent.
    pub renewed: SystemTime,
    /// The lease duration requested.
    pub duration: Duration,
    /// Until when this site may run the app (it fences itself then).
    pub run_until: SystemTime,
}

/// Records `held` in the Lease of `namespace/pair`.
///
/// # Errors
/// The API error.
pub async fn record(
    client: &Client,
    namespace: &str,
    pair: &str,
    held: &Held<'_>,
) -> Result<(), kube::Error> {
    let name = lease_name(pair);
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "ferry"},
            "annotations": {
                RUN_UNTIL_ANNOTATION: rfc3339_micros(held.run_until),
                EPOCH_ANNOTATION: held.epoch.to_string(),
            },
        },
        "spec": {
            "holderIdentity": held.site,
            "leaseDurationSeconds": held.duration.as_secs().max(1),
            "renewTime": rfc3339_micros(held.renewed),
        },
    });
    Api::<Lease>::namespaced(client.clone(), namespace)
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        )
        .await
        .map(|_| ())
}

/// Deletes the Lease of `namespace/pair`, so that no pod of the app starts here any more.
/// Deleting one that does not exist is success.
///
/// # Errors
/// The API error.
pub async fn revoke(client: &Client, namespace: &str, pair: &str) -> Result<(), kube::Error> {
    match Api::<Lease>::namespaced(client.clone(), namespace)
        .delete(&lease_name(pair), &DeleteParams::default())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Until when `lease` lets this site run the app, if it says.
pub fn run_until(lease: &Lease) -> Option<SystemTime> {
    let text = lease.annotations().get(RUN_UNTIL_ANNOTATION)?;
    let ts: Timestamp = text.parse().ok()?;
    Some(SystemTime::from(ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_until_round_trips_at_microsecond_precision() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_109_345_519_123);
        let mut lease = Lease::default();
        lease
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(RUN_UNTIL_ANNOTATION.into(), rfc3339_micros(t));
        assert_eq!(run_until(&lease), Some(t));
        assert_eq!(run_until(&Lease::default()), None);
    }
}
