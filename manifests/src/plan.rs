//! The one instantiation pipeline: what is applied at a site to stand an app up from a
//! generation's manifests, whatever the reason (a warm standby after each commit, a planned
//! migration, a failover; drills and restores to come).
//!
//! Pure: manifests in, creation waves out. Reading the manifests and applying the waves
//! ([`crate::apply_object`]) are the caller's I/O.

use ferry_schemas::contract::generation_snapshot;
use ferry_schemas::drpair::Transform;
use serde_json::{json, Value};

use crate::{instantiation_order, standby, transform, TransformError};

/// What an instantiation stands up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
}

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
    }
    for object in &mut objects {
        object["metadata"]["namespace"] = json!(namespace);
    }
    Ok(instantiation_order(objects))
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
                   "spec": {"replicas": 3}}),
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
