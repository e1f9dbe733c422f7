//! The one instantiation pipeline: what is applied at a site to stand an app up from a
//! generation's manifests, whatever the reason (a warm standby after each commit, a planned
//! migration, a failover, a drill's sandbox; restores to come).
//!
//! Pure: manifests in, creation waves out. Reading the manifests and applying the waves
//! ([`crate::apply_object`]) are the caller's I/O.

use ferry_schemas::contract::generation_snapshot;
use ferry_schemas::drpair::Transform;
use serde_json::{json, Value};

use crate::{instantiation_order, standby, transform, TransformError};

/// What an instantiation stands up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instantiation {
    /// The app itself, from `generation`: every PVC is created from the generation's
    /// VolumeSnapshot (`dataSource`, named by [`generation_snapshot`]), workloads at the
    /// replica counts `spec.transform` gives.
    Run {
        /// The committed generation.
        generation: u64,
    },
    /// A warm standby (`spec.standby: Applied`): workloads parked at zero replicas (the count
    /// kept in `ferry.dev/original-replicas`), CronJobs and Jobs suspended, PVCs left out (a
    /// migration or failover creates them from the chosen generation's snapshots).
    Standby,
    /// A drill's sandbox: as [`Instantiation::Run`], shaped so that it cannot act as the
    /// production app: every object labelled `ferry.dev/drill: <drill>`, CronJobs and Jobs
    /// suspended (a drill must not run the app's batch work twice), Services of type
    /// `LoadBalancer` or `NodePort` made `ClusterIP` (no second external address), and
    /// Namespaces, Ingresses, Gateway API routes and the app's NetworkPolicies left out (the
    /// sandbox has its own namespace and isolation; a host name would collide with
    /// production's).
    Drill {
        /// The committed generation.
        generation: u64,
        /// The `ferry.dev/drill` label value (the DRDrill's uid).
        drill: String,
    },
}

/// Label on every object of a drill's sandbox, valued with the DRDrill's uid.
pub const DRILL_LABEL: &str = "ferry.dev/drill";

/// The objects to apply for `pair` in `namespace`, in creation waves (namespaces and CRDs
/// first, workloads last; [`instantiation_order`]): `objects` (a generation's manifests)
/// rewritten by `rules` (the pair's `spec.transform`), then shaped for `what`, every object
/// placed in `namespace`.
///
/// # Errors
/// [`TransformError`] naming the rule or object `rules` cannot be applied to.
pub fn plan_instantiation(
    objects: Vec<Value>,
    pair: &str,
    namespace: &str,
    rules: &Transform,
    what: Instantiation,
) -> Result<Vec<Vec<Value>>, TransformError> {
    let mut objects = transform(objects, rules)?;
    match what {
        Instantiation::Standby => {
            objects = standby(objects);
            objects.retain(|o| !is_claim(o));
        }
        Instantiation::Run { generation } => {
            for object in objects.iter_mut().filter(|o| is_claim(o)) {
                restore_from_snapshot(object, pair, generation);
            }
        }
        Instantiation::Drill { generation, drill } => {
            let left_out = |o: &Value| {
                let group = o["apiVersion"].as_str().unwrap_or_default();
                (o["kind"] == "Namespace" && group == "v1")
                    || (group.starts_with("networking.k8s.io/")
                        && (o["kind"] == "Ingress" || o["kind"] == "NetworkPolicy"))
                    || group.starts_with("gateway.networking.k8s.io/")
            };
            objects.retain(|o| !left_out(o));
            for object in &mut objects {
                if is_claim(object) {
                    restore_from_snapshot(object, pair, generation);
                }
                sandbox(object, &drill);
                rebind_to(object, namespace);
            }
        }
    }
    for object in &mut objects {
        object["metadata"]["namespace"] = json!(namespace);
    }
    Ok(instantiation_order(objects))
}

/// A RoleBinding's ServiceAccount subjects of its own (original) namespace follow it into
/// `namespace`, so the copied pods get the permissions the app's own had (a `ferry-gate`
/// init container reading DRPairs, say) and not those of the original namespace's accounts.
fn rebind_to(object: &mut Value, namespace: &str) {
    if object["kind"] != "RoleBinding" || object["apiVersion"] != "rbac.authorization.k8s.io/v1" {
        return;
    }
    let original = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(subjects) = object["subjects"].as_array_mut() {
        for subject in subjects
            .iter_mut()
            .filter(|s| s["kind"] == "ServiceAccount")
        {
            let own = subject["namespace"]
                .as_str()
                .is_none_or(|n| n.is_empty() || n == original);
            if own {
                subject["namespace"] = json!(namespace);
            }
        }
    }
}

/// A drill's changes to one object (see [`Instantiation::Drill`]).
fn sandbox(object: &mut Value, drill: &str) {
    object["metadata"]["labels"][DRILL_LABEL] = json!(drill);
    // Their pods too, so that anyone (monitoring, a chaos checker) can tell them apart from
    // the app's; selectors still match, a label more is no mismatch.
    for template in ["/spec/template", "/spec/jobTemplate/spec/template"] {
        if let Some(t) = object.pointer_mut(template).filter(|t| t.is_object()) {
            t["metadata"]["labels"][DRILL_LABEL] = json!(drill);
        }
    }
    if (object["kind"] == "CronJob" || object["kind"] == "Job")
        && object["apiVersion"] == "batch/v1"
    {
        object["spec"]["suspend"] = json!(true);
    }
    if object["kind"] == "Service" && object["apiVersion"] == "v1" {
        let external = matches!(
            object["spec"]["type"].as_str(),
            Some("LoadBalancer" | "NodePort")
        );
        if external {
            object["spec"]["type"] = json!("ClusterIP");
            if let Some(spec) = object["spec"].as_object_mut() {
                for field in [
                    "loadBalancerIP",
                    "loadBalancerSourceRanges",
                    "externalTrafficPolicy",
                    "healthCheckNodePort",
                    "allocateLoadBalancerNodePorts",
                    "loadBalancerClass",
                ] {
                    spec.remove(field);
                }
            }
            if let Some(ports) = object["spec"]["ports"].as_array_mut() {
                for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                    port.remove("nodePort");
                }
            }
        }
        if let Some(spec) = object["spec"].as_object_mut() {
            spec.remove("externalIPs");
        }
    }
}

fn is_claim(object: &Value) -> bool {
    object["kind"] == "PersistentVolumeClaim" && object["apiVersion"] == "v1"
}

/// Points a PVC at its VolumeSnapshot of `generation`; the source's binding (`volumeName`)
/// and any other data source go.
fn restore_from_snapshot(claim: &mut Value, pair: &str, generation: u64) {
    let name = claim["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(spec) = claim["spec"].as_object_mut() {
        spec.remove("volumeName");
        spec.remove("dataSourceRef");
    }
    claim["spec"]["dataSource"] = json!({
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": generation_snapshot(pair, &name, generation),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> Vec<Value> {
        vec![
            json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": {"name": "data", "namespace": "elsewhere"},
                   "spec": {"volumeName": "pv-1", "resources": {"requests": {"storage": "1Gi"}}}}),
            json!({"apiVersion": "apps/v1", "kind": "Deployment",
                   "metadata": {"name": "web", "namespace": "elsewhere"},
                   "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": "web"}}}}}),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "settings", "namespace": "elsewhere"}}),
        ]
    }

    fn flat(waves: Vec<Vec<Value>>) -> Vec<Value> {
        waves.into_iter().flatten().collect()
    }

    #[test]
    fn a_run_restores_claims_from_the_generations_snapshots() {
        let waves = plan_instantiation(
            app(),
            "ledger",
            "shop",
            &Transform::default(),
            Instantiation::Run { generation: 7 },
        )
        .unwrap();
        let objects = flat(waves);
        let claim = objects.iter().find(|o| is_claim(o)).unwrap();
        assert_eq!(claim["spec"]["dataSource"]["name"], "ferry-ledger-data-g7");
        assert!(claim["spec"].get("volumeName").is_none());
        assert!(objects.iter().all(|o| o["metadata"]["namespace"] == "shop"));
        let web = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(web["spec"]["replicas"], 3);
    }

    #[test]
    fn a_drill_sandbox_cannot_act_as_production() {
        let mut objects = app();
        objects
            .push(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}));
        objects.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "web"},
                            "spec": {"rules": [{"host": "shop.example.com"}]}}));
        objects.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-all"},
                            "spec": {"podSelector": {}, "ingress": [{}]}}));
        objects.push(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "web"},
                            "spec": {"hostnames": ["shop.example.com"]}}));
        objects.push(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                            "metadata": {"name": "gate", "namespace": "elsewhere"},
                            "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": "elsewhere"},
                                         {"kind": "ServiceAccount", "name": "ci", "namespace": "other"}]}));
        objects.push(
            json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
                            "spec": {"schedule": "0 2 * * *"}}),
        );
        objects.push(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                            "spec": {"type": "LoadBalancer", "loadBalancerIP": "1.2.3.4", "externalIPs": ["5.6.7.8"],
                                     "ports": [{"port": 80, "nodePort": 30080}]}}));
        let waves = plan_instantiation(
            objects,
            "ledger",
            "shop-drill-1",
            &Transform::default(),
            Instantiation::Drill {
                generation: 7,
                drill: "uid-1".into(),
            },
        )
        .unwrap();
        let objects = flat(waves);
        let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        for left_out in ["Namespace", "Ingress", "NetworkPolicy", "HTTPRoute"] {
            assert!(!kinds.contains(&left_out), "{left_out}: {kinds:?}");
        }
        assert!(objects
            .iter()
            .all(|o| o["metadata"]["labels"][DRILL_LABEL] == "uid-1"
                && o["metadata"]["namespace"] == "shop-drill-1"));
        let claim = objects.iter().find(|o| is_claim(o)).unwrap();
        assert_eq!(claim["spec"]["dataSource"]["name"], "ferry-ledger-data-g7");
        let binding = objects.iter().find(|o| o["kind"] == "RoleBinding").unwrap();
        assert_eq!(binding["subjects"][0]["namespace"], "shop-drill-1");
        assert_eq!(binding["subjects"][1]["namespace"], "other");
        let cron = objects.iter().find(|o| o["kind"] == "CronJob").unwrap();
        assert_eq!(cron["spec"]["suspend"], true);
        let web = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(
            web["spec"]["template"]["metadata"]["labels"][DRILL_LABEL],
            "uid-1"
        );
        let service = objects.iter().find(|o| o["kind"] == "Service").unwrap();
        assert_eq!(service["spec"]["type"], "ClusterIP");
        assert!(service["spec"].get("loadBalancerIP").is_none());
        assert!(service["spec"].get("externalIPs").is_none());
        assert!(service["spec"]["ports"][0].get("nodePort").is_none());
    }

    #[test]
    fn a_standby_parks_workloads_and_leaves_claims_out() {
        let waves = plan_instantiation(
            app(),
            "ledger",
            "shop",
            &Transform::default(),
            Instantiation::Standby,
        )
        .unwrap();
        let objects = flat(waves);
        assert!(objects.iter().all(|o| !is_claim(o)));
        let web = objects.iter().find(|o| o["kind"] == "Deployment").unwrap();
        assert_eq!(web["spec"]["replicas"], 0);
        assert_eq!(
            web["metadata"]["annotations"][ferry_schemas::contract::ORIGINAL_REPLICAS_ANNOTATION],
            "3"
        );
        assert_eq!(objects.len(), 2);
    }
}
